#!/usr/bin/env bash
# The main job: installs everything (scripts/install.sh) and runs examples/distill_tiny.py, a
# distillation of a small teacher into a smaller student with several divergences.
# Extra arguments go to the example, e.g.  bash scripts/run_main.sh --kinds forward_kl,jsd
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/install.sh
echo "[main] .venv/bin/python examples/distill_tiny.py $*"
start=$SECONDS
.venv/bin/python examples/distill_tiny.py "$@"
echo "[main] done in $((SECONDS - start))s"
