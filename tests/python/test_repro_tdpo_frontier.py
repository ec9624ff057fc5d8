"""examples/repro_tdpo_frontier.py runs end to end with tiny settings and writes its table and
PNG (the full run is the reproduction; this is its smoke test), and its exact evaluation agrees
with Monte Carlo and with the closed-form KL-regularized optimum."""

from __future__ import annotations

import importlib.util
import math
import pathlib

import numpy as np
import pytest

_PATH = pathlib.Path(__file__).resolve().parents[2] / "examples" / "repro_tdpo_frontier.py"
spec = importlib.util.spec_from_file_location("repro_tdpo_frontier", _PATH)
repro = importlib.util.module_from_spec(spec)
spec.loader.exec_module(repro)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tdpo")
    return out, repro.main(["--tiny", "--out", str(out)])


def test_tiny_run_writes_table_and_plot(tiny):
    out, res = tiny
    assert set(res["points"]) == set(repro.METHODS)
    table = (out / "table.md").read_text()
    for m in ("f-DPO (JS)", "TDPO1", "TDPO2 (alpha 0.5)"):
        assert f"- {m}: KL at equal reward / DPO's" in table
    assert "Verdict: the TDPO paper's claim" in table
    assert (out / "frontier.png").stat().st_size > 0


def test_kl_estimates_agree_and_are_nonnegative(tiny):
    _, res = tiny
    assert res["start"]["kl"] == pytest.approx(0.0, abs=1e-9)
    for pts in res["points"].values():
        assert all(p["kl"] >= 0 and math.isfinite(p["reward"]) for p in pts)
    mc = res["mc_check"]
    assert mc["exact"] > 0.05  # the policy moved: the check is not 0 = 0
    # Exhaustive enumeration against two unbiased Monte Carlo estimators (4 standard errors).
    assert abs(mc["logratio"] - mc["exact"]) < 4 * mc["logratio_se"]
    assert abs(mc["tokens"] - mc["exact"]) < 4 * mc["tokens_se"]


def test_optimal_frontier_bounds_every_policy(tiny):
    _, res = tiny
    exact = res["exact"]
    # pi*_beta -> pi_ref as beta -> inf, and -> the best completions as beta -> 0.
    far, near = exact.optimal([1e5, 1e-3])
    assert far["kl"] < 1e-6 and far["reward"] == pytest.approx(res["start"]["reward"], abs=1e-4)
    assert near["reward"] == pytest.approx(4 + 0.5 * (repro.T - 1), abs=1e-3)
    # No trained checkpoint beats the KL-regularized optimum at its own KL.
    assert res["excess_over_optimal"] < 1e-2
    # A huge beta keeps every method much closer to the reference than a small one.
    for m in repro.METHODS:
        kl = {b: np.mean([p["kl"] for p in res["points"][m] if p["beta"] == b and p["step"] == 10])
              for b in (0.3, 1000.0)}  # fmt: skip
        assert kl[1000.0] < 0.5 * kl[0.3]
