"""bench/bench_trainers.py: its --quick run (every pair: TRL's DPO, KTO, GKD, CPO, ORPO trainers
and transformers' Trainer, stock vs divkit's) and the loss agreement it prints and saves; and
``divkit bench``'s check of its JSON (agreement passes, a divergent loss or a failed divkit
trainer fails)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import divkit
from divkit.bench_cli import check_output

pytest.importorskip("trl")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "bench_trainers.py"
AGREE = re.compile(
    r"^loss agreement (\w+) vs (\w+): step 0 relative difference (\S+), largest over the "
    r"steps (\S+) relative, (\S+) absolute$"
)


def test_quick_run_losses_agree(tmp_path):
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    # The script's subprocesses import the divkit this test imported (the installed wheel in CI,
    # the source tree with its built _C in development), not whatever the repository holds.
    env = dict(os.environ)
    here = str(Path(divkit.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(
        [here] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    r = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--quick",
            "--json",
            str(out_json),
            "--markdown",
            str(out_md),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    found = {}
    for line in r.stdout.splitlines():
        m = AGREE.match(line.strip())
        if m:
            found[m.group(1)] = (m.group(2), *(float(x) for x in m.group(3, 4, 5)))
    assert set(found) == {
        "dpo_divkit",
        "kto_divkit",
        "gkd_divkit",
        "cpo_divkit",
        "orpo_divkit",
        "hf_divkit",
        "hf_patched",
    }
    for dk, (stock, step0, max_rel, max_abs) in found.items():
        # The same math on the same weights and batches: step 0 to fp32 round-off, the later
        # steps to what it grows to through the optimizer steps.
        assert step0 <= 1e-5, (dk, stock, step0)
        assert max_rel <= 2e-3 and max_abs <= 1e-2, (dk, stock, max_rel, max_abs)
    saved = json.loads(out_json.read_text())
    assert not saved["failures"]
    losses = {case: rs[0]["losses"] for case, rs in saved["runs"].items()}
    # Every trainer logged every step (warm-up and timed), and trained on a non-trivial loss.
    n = saved["sizes"]["warmup"] + saved["sizes"]["steps"]
    assert all(len(v) == n and v[0] > 0.01 for v in losses.values()), losses
    md = out_md.read_text()
    assert "| pair | divkit side | stock s/step |" in md and "| DPO (sigmoid) | dpo_divkit |" in md
    c = check_output("trainers", r.stdout, str(out_json))
    assert not c.mismatches and c.compared == 7 * n


def _saved(tmp_path, divkit_losses, failures=None):
    saved = {
        "runs": {
            "dpo_trl": [{"losses": [0.6931, 0.65, 0.6]}],
            "dpo_divkit": [{"losses": divkit_losses}],
        },
        "rows": [{"pair": "dpo", "stock": "dpo_trl", "divkit": "dpo_divkit"}],
        "failures": failures or {},
    }
    path = tmp_path / "r.json"
    path.write_text(json.dumps(saved))
    return str(path)


def test_check_trainers_json(tmp_path):
    c = check_output("trainers", "", _saved(tmp_path, [0.6931 * (1 + 5e-5), 0.6505, 0.6]))
    assert c.compared == 3 and not c.mismatches
    c = check_output("trainers", "", _saved(tmp_path, [0.6932, 0.65, 0.6]))  # step 0: 1.4e-4
    assert len(c.mismatches) == 1 and "step 0 loss" in c.mismatches[0]
    c = check_output("trainers", "", _saved(tmp_path, [0.6931, 0.66, 0.6]))  # step 1: 1.5e-2
    assert len(c.mismatches) == 1 and "step 1 loss" in c.mismatches[0]
    c = check_output("trainers", "", _saved(tmp_path, [0.6931, 0.65]))
    assert c.mismatches == ["dpo_divkit round 1: 2 losses vs 3"]
    c = check_output("trainers", "", _saved(tmp_path, [0.6931, 0.65, 0.6], {"kto_divkit": "boom"}))
    assert c.mismatches == ["kto_divkit failed: boom"] and c.compared == 3
    c = check_output("trainers", "", _saved(tmp_path, [0.6931, 0.65, 0.6], {"kto_trl": "x"}))
    assert not c.mismatches and c.notes == ["kto_trl failed: x"]
    assert check_output("trainers", "", str(tmp_path / "none.json")).mismatches
    # Runs are matched by round: the divkit run of round 2 (index 1) against the stock run of
    # round 2, not against the first run in the list.
    saved = {
        "runs": {
            "dpo_trl": [{"round": 0, "losses": [1.0, 1.0]}, {"round": 1, "losses": [2.0, 2.0]}],
            "dpo_divkit": [{"round": 1, "losses": [2.0, 2.0]}],
        },
        "rows": [{"pair": "dpo", "stock": "dpo_trl", "divkit": "dpo_divkit"}],
        "failures": {"dpo_divkit": "round 1 failed"},
    }
    path = tmp_path / "rounds.json"
    path.write_text(json.dumps(saved))
    c = check_output("trainers", "", str(path))
    assert c.compared == 2 and c.mismatches == ["dpo_divkit failed: round 1 failed"]
