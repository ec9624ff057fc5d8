#!/usr/bin/env bash
# Installs everything divkit needs, idempotently (a second run does no work it need not do):
#   1. Debian packages: build tools, CMake, Highway, OpenBLAS, GoogleTest, Google Benchmark
#      (and python3 with venv and headers when the python3 in use is Debian's or is missing).
#      apt-get update runs once, and only when a package is missing; root or sudo is needed
#      only then.
#   2. A virtual environment in .venv (created if absent): torch 2.13.0 (CPU) is installed
#      FIRST, then the build and test dependencies.
#   3. divkit itself into .venv: pip install --no-build-isolation ".[test,tools]" (an incremental
#      rebuild: scikit-build-core keeps its build tree in .venv/divkit-build/, outside the
#      source tree's own folders; a plain `pip install .` builds in a temporary folder).
#
# Environment:
#   DIVKIT_PYTHON              interpreter that creates .venv (default: python3)
#   DIVKIT_TORCH_PIP_ARGS      extra pip arguments for the torch install, e.g.
#                              "--index-url https://download.pytorch.org/whl/cpu" where pip's
#                              configuration offers no CPU wheel of torch (PyPI's default
#                              torch wheel pulls in the CUDA libraries)
#   CMAKE_BUILD_PARALLEL_LEVEL parallel compile jobs (default 2)
#   DIVKIT_SKIP_APT=1          skip step 1 (system packages managed by hand)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"
PYTHON="${DIVKIT_PYTHON:-python3}"
TORCH_VERSION="2.13.0"

log() { printf '[install] %s\n' "$*"; }

# --- 1. system packages ------------------------------------------------------------------
apt_packages=(build-essential cmake pkg-config libhwy-dev libopenblas-dev libgtest-dev
              libbenchmark-dev)

python_ok() {
  # A python3 with venv/ensurepip and the headers that nanobind compiles against.
  command -v "$PYTHON" >/dev/null 2>&1 &&
    "$PYTHON" -c 'import ensurepip, os, sys, sysconfig, venv
sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")) else 1)' \
      >/dev/null 2>&1
}
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

if [[ "${DIVKIT_SKIP_APT:-0}" != 1 ]]; then
  missing=()
  for p in "${apt_packages[@]}"; do installed "$p" || missing+=("$p"); done
  py_path="$(command -v "$PYTHON" || true)"
  if [[ -z "$py_path" || "$(readlink -f "$py_path")" == /usr/bin/* ]] || ! python_ok; then
    # Debian's own python3: its venv module and its headers are separate packages.
    for p in python3 python3-venv python3-dev; do installed "$p" || missing+=("$p"); done
  fi
  if ((${#missing[@]})); then
    if [[ "$(id -u)" == 0 ]]; then
      as_root=(env DEBIAN_FRONTEND=noninteractive)
    elif command -v sudo >/dev/null 2>&1; then
      as_root=(sudo env DEBIAN_FRONTEND=noninteractive)
    else
      echo "[install] error: Debian packages missing (${missing[*]}), and neither root nor sudo" >&2
      exit 1
    fi
    log "apt-get install ${missing[*]}"
    "${as_root[@]}" apt-get update
    "${as_root[@]}" apt-get install -y --no-install-recommends "${missing[@]}"
  else
    log "Debian packages: all present"
  fi
fi
if ! python_ok; then
  echo "[install] error: $PYTHON is missing, or lacks venv/ensurepip or its headers (Python.h)" >&2
  exit 1
fi

# --- 2. virtual environment and Python dependencies -----------------------------------------
if [[ ! -x .venv/bin/python ]]; then
  log "creating .venv with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check)

# torch first, on its own: a bare "torch" requirement resolved later could pull the CUDA build.
if .venv/bin/python -c "import sys, torch
sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null; then
  log "torch $TORCH_VERSION: present"
else
  log "pip install torch==$TORCH_VERSION"
  # shellcheck disable=SC2086  # DIVKIT_TORCH_PIP_ARGS is a list of arguments
  "${PIP[@]}" install "torch==$TORCH_VERSION" ${DIVKIT_TORCH_PIP_ARGS:-}
fi

# Build dependencies (needed because of --no-build-isolation) and test dependencies; pip does
# nothing for requirements already satisfied. torch stays pinned so that nothing replaces it.
build_deps=("scikit-build-core>=0.11" "nanobind>=2.0" ninja "cmake>=3.22" numpy)
run_deps=(tqdm matplotlib)  # the tools extra: divkit demo's progress bars and figure
test_deps=(pytest hypothesis trl pot)
log "pip install ${build_deps[*]} ${run_deps[*]} ${test_deps[*]}"
"${PIP[@]}" install -q "${build_deps[@]}" "${run_deps[@]}" "${test_deps[@]}" "torch==$TORCH_VERSION"
# Liger-Kernel, the peer of the fused linear-head tests and benchmark: its chunked losses are
# plain PyTorch; --no-deps skips Triton, which only its GPU kernels need.
if ! .venv/bin/python -c "import liger_kernel" 2>/dev/null; then
  log "pip install --no-deps liger-kernel"
  "${PIP[@]}" install -q --no-deps "liger-kernel>=0.5"
fi

# --- 3. divkit itself -----------------------------------------------------------------------
# The package's own extras: test (pytest and the peers) and tools (what the divkit command's
# demo and compare import: tqdm, matplotlib), where pyproject.toml declares them.
extra_names=()
for e in test tools; do
  if grep -q "^$e *=" pyproject.toml; then extra_names+=("$e"); fi
done
extras=""
if ((${#extra_names[@]})); then
  extras="[$(IFS=,; echo "${extra_names[*]}")]"
fi
# The build tree lives in .venv (git-ignored, removed with it), one per wheel tag.
build_dir=".venv/divkit-build/{wheel_tag}"
log "pip install --no-build-isolation --config-settings=build-dir=$build_dir .$extras"
"${PIP[@]}" install -q --no-build-isolation --config-settings="build-dir=$build_dir" ".$extras" \
  "torch==$TORCH_VERSION"
.venv/bin/python -c "import divkit, os
print('[install] divkit', divkit.__version__, 'installed in', os.path.dirname(divkit.__file__))"
