"""A token's divergence value does not depend on which gradients are asked for: the loss has the
same bits with no gradient, the student's, the teacher's, both, into a ``grad_out=`` buffer and
in place, for every kind (alpha and Renyi at several orders: each order takes its own branches),
fp32 and bf16 logits, vocabularies below and beyond the row block's L2 rule, rows near D = 0, far
from it, with masked entries, and beyond Renyi's unshifted range."""

import pytest
import torch

import divkit

KINDS = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.3}),
    ("skew_forward_kl", {"alpha": 0.1}),
    ("skew_reverse_kl", {"alpha": 0.1}),
    ("tvd", {}),
    ("hellinger", {}),
    ("jeffreys", {}),
    ("chi2", {}),
    ("cross_entropy", {}),
    ("alpha_divergence", {"alpha": 0.5}),
    ("alpha_divergence", {"alpha": 0.3}),
    ("alpha_divergence", {"alpha": 0.7}),
    ("alpha_divergence", {"alpha": -0.5}),
    ("alpha_divergence", {"alpha": 1.5}),
    ("renyi", {"alpha": 0.5}),
    ("renyi", {"alpha": 0.3}),
    ("renyi", {"alpha": 0.8}),
    ("renyi", {"alpha": 2.0}),
]


def _logits(n, v, noise, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = 2 * torch.randn(n, v, generator=g)
    t = s + noise * torch.randn(n, v, generator=g)
    s[0, 1] = float("-inf")  # a masked student entry (Renyi alpha > 1: an infinite row)
    t[-1, 2] = float("-inf")  # a masked teacher entry
    return s.to(dtype), t.to(dtype)


def _losses(s, t, kind, kw):
    out = {}
    for mode in ("none", "student", "teacher", "both", "grad_out", "inplace"):
        a = s.clone().requires_grad_(mode in ("student", "both", "grad_out", "inplace"))
        b = t.clone().requires_grad_(mode in ("teacher", "both"))
        extra = {}
        if mode == "grad_out":
            extra["grad_out"] = torch.empty_like(s)
        if mode == "inplace":
            a = s.clone()
            extra["inplace_grad"] = True
            loss, _, _ = divkit.divergence_and_grad(a, b, kind, reduction="none", **kw, **extra)
        else:
            loss = divkit.divergence(a, b, kind, reduction="none", **kw, **extra)
        out[mode] = loss.detach()
    return out


@pytest.mark.parametrize("kind,kw", KINDS, ids=[f"{k}-{v}" for k, v in KINDS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("v", [37, 1000, 140000])
def test_loss_bits_independent_of_gradients(kind, kw, dtype, v):
    n = 2 if v > 10000 else 4
    for noise in (0.01, 1.0, 40.0):
        s, t = _logits(n, v, noise, dtype)
        losses = _losses(s, t, kind, kw)
        ref = losses["none"]
        for mode, loss in losses.items():
            # equal, NaN-free: +inf rows compare equal to +inf
            assert torch.equal(loss, ref), (mode, noise, loss, ref)


@pytest.mark.parametrize("alpha", [0.3, 0.5, 0.8])
@pytest.mark.parametrize("grad", [False, True])
def test_renyi_far_from_zero_with_and_without_the_student_gradient(alpha, grad):
    """Rows whose sum of w = p^alpha q^(1-alpha) is far below 1 (entries with w << q): the value
    against float64, with and without the student gradient (the student-gradient path once summed
    w as q + (w - q), which loses such a w)."""
    rows = [([0.0, -80.0], [-80.0, 0.0]), ([0.0, -20.0, -3.0], [-20.0, 0.0, -1.0])]
    for s_row, t_row in rows:
        s = torch.tensor([s_row]).requires_grad_(grad)
        t = torch.tensor([t_row])
        p, q = t.double().softmax(-1), s.detach().double().softmax(-1)
        want = (torch.log((p**alpha * q ** (1 - alpha)).sum()) / (alpha - 1)).item()
        got = divkit.divergence(s, t, "renyi", alpha=alpha, reduction="none").item()
        assert got == pytest.approx(want, rel=1e-5)
