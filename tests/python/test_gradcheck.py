"""torch.autograd.gradcheck in float64 for every kind.

The kernel computes in fp32 even from float64 inputs (and returns an fp32 loss), so the finite
differences see fp32 rounding: a loss of size ~1 carries ~1e-7 of noise, which a central
difference with eps = 1e-3 turns into ~1e-4 of error in a derivative. Hence eps = 1e-3,
tolerances for fp32 arithmetic (atol 2e-3, rtol 2e-2) instead of gradcheck's float64 defaults,
and logits of scale 1 so that the losses stay ~1.
The gradients themselves are compared tightly with float64 autograd in test_values.py; this
test checks the autograd plumbing (shapes, teacher gradient, upstream gradient, reductions)
against the function's own values.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

import divkit
from conftest import CASES, case_id, logits

GRADCHECK = dict(eps=1e-3, atol=2e-3, rtol=2e-2)


@pytest.fixture(autouse=True)
def _one_thread():
    # gradcheck makes hundreds of calls on 6-row inputs; a parallel region per call costs
    # milliseconds of thread wake-up on a loaded 2-core machine. Results do not depend on the
    # thread count (test_runtime.py checks that bit for bit). conftest restores the count.
    divkit.set_num_threads(1)


# Seeds (found by a search) whose tvd inputs stay away from tvd's kink, see inputs().
_TVD_SEED = {0: 49000, 1: 9001}


def inputs(kind, seed=0):
    if kind == "tvd":
        seed = _TVD_SEED[seed]
    s = logits(2, 3, 6, scale=1.0, seed=100 + seed, dtype=torch.float64)
    t = logits(2, 3, 6, scale=1.0, seed=200 + seed, dtype=torch.float64)
    if kind == "tvd":
        # |p - q| has a kink at p = q: every log-ratio log p - log q must be far from 0 compared
        # with what an eps step can move it, at the temperatures used here.
        gap = min(
            (torch.log_softmax(t / T, -1) - torch.log_softmax(s / T, -1)).abs().min().item()
            for T in (1.5, 2.0)
        )
        assert gap > 0.05
    return s.requires_grad_(True), t.requires_grad_(True)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gradcheck(case, reduction):
    kind, params = case
    s, t = inputs(kind)
    labels = torch.tensor([[0, -100, 2], [1, 1, 1]])
    weights = torch.tensor([[0.5, 1.0, 2.0], [1.0, 0.25, 1.5]], dtype=torch.float64)

    def f(s, t):
        return divkit.divergence(
            s,
            t,
            kind,
            labels=labels,
            weights=weights,
            temperature=1.5,
            reduction=reduction,
            **params,
        )

    assert gradcheck(f, (s, t), **GRADCHECK)


@pytest.mark.parametrize("kind", ["forward_kl", "jsd", "renyi"])
def test_gradcheck_sum_batchmean_scaled(kind):
    s, t = inputs(kind, seed=1)
    for reduction in ("sum", "batchmean"):

        def f(s, t):
            return divkit.divergence(
                s, t, kind, alpha=0.7, reduction=reduction, temperature=2.0, scale_by_t_squared=True
            )

        assert gradcheck(f, (s, t), **GRADCHECK)
