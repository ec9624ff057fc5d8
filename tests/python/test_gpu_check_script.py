"""scripts/gpu_check.sh and the GPU benchmarks' logic, without a GPU: the check stops at once and
says why when torch sees no GPU; --dry-run runs the test runner and both benchmarks on CPU
tensors and writes gpu_check.json and the tables; the fused benchmark's ratios and writers."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import divkit

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _env():
    env = dict(os.environ)
    env["PYTHON"] = sys.executable
    # The divkit this test imported (the source tree with a built _C, or an installed wheel).
    env["PYTHONPATH"] = str(Path(divkit.__file__).resolve().parent.parent)
    return env


def _bench_module():
    spec = importlib.util.spec_from_file_location("gpu_fused", ROOT / "bench" / "gpu_fused.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_check_without_a_gpu_stops_before_building_and_says_why(tmp_path):
    r = subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1
    assert "no GPU: no CUDA device visible to torch" in r.stdout
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["status"] == "failed: no GPU visible to torch"
    assert result["gpu"].startswith("none: no CUDA device visible to torch")
    assert "build" not in result and not (tmp_path / "build.log").exists()


def test_unknown_option_is_refused():
    r = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown option --bogus" in r.stderr


def test_dry_run_writes_every_result(tmp_path):
    r = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", str(tmp_path)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["mode"] == "dry-run" and result["status"] == "ok"
    for key in ("tests", "bench_fused", "bench"):
        assert result[key] == "ok", key
    fused = json.loads((tmp_path / "gpu_fused_bench.json").read_text())
    assert fused["dry_run"] and {(r["op"], r["impl"]) for r in fused["rows"]} == {
        (op, impl) for op in ("jsd", "cross_entropy") for impl in _bench_module().IMPLS
    }
    # divkit's loss is the materialized loss on the same inputs.
    for op, q in fused["ratios"].items():
        assert q["loss_rel_diff_materialized"] <= 1e-5, op
        assert q["time_over_gemms"] > 0
        assert q["time_over_torch_rows"] > 0
    md = (tmp_path / "gpu_fused_bench.md").read_text()
    assert "| op | impl | ms | peak MiB | above inputs MiB | status |" in md
    token = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert len(token["rows"]) == 6 and (tmp_path / "gpu_bench.md").exists()


def test_fused_bench_ratios_and_markdown():
    m = _bench_module()
    rows = [
        {"op": "jsd", "impl": "divkit", "ms": 110.0, "peak_mib": 3000.0, "loss": 0.5},
        {"op": "jsd", "impl": "liger", "ms": 100.0, "peak_mib": 6000.0, "loss": 0.5005},
        {"op": "jsd", "impl": "materialized", "ms": None, "status": "out of memory"},
        {"op": "jsd", "impl": "gemms", "ms": 100.0, "loss": None},
    ]
    for r in rows:
        r.setdefault("status", "ok")
    q = m.ratios(rows)["jsd"]
    assert q["time_over_gemms"] == pytest.approx(1.1)
    assert q["time_over_liger"] == pytest.approx(1.1)
    assert q["peak_over_liger"] == pytest.approx(0.5)
    assert q["loss_rel_diff_liger"] == pytest.approx(1e-3)
    assert q["loss_rel_diff_materialized"] is None
    assert q["time_over_torch_rows"] is None  # no divkit_torch_rows row
    result = {
        "device": "X",
        "torch": "t",
        "liger": None,
        "dry_run": False,
        "shape": {"n": 1, "h": 2, "v": 3, "dtype": "bfloat16"},
        "rows": rows,
        "ratios": m.ratios(rows),
    }
    md = m.markdown(result)
    assert "| jsd | materialized | n/a | n/a | n/a | out of memory |" in md
    assert "| jsd | 1.100 | 1.100 | 0.500 | 1.0e-03 | n/a |" in md
    assert "Liger not installed" in md
