"""divkit.divergence against independent float64 PyTorch implementations (divkit_reference)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import divkit
import divkit_reference as ref
from conftest import CASES, KIND_CASES, case_id, logits, max_err

# The kernel computes in fp32 (row sums in fp64): values within a few 1e-6 relative of the
# fp64 reference, gradients within a few 1e-6 of the largest gradient entry.
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-5


def assert_loss_close(got, want):
    got, want = got.double(), want.double()
    assert got.shape == want.shape
    tol = LOSS_RTOL * want.abs() + 1e-7
    assert ((got - want).abs() <= tol).all(), f"got {got}, want {want}"


def assert_grad_close(got, want):
    assert got.shape == want.shape
    scale = max(want.abs().max().item(), 1e-6)
    err = max_err(got, want)
    assert err <= GRAD_RTOL * scale + 1e-8, f"max abs error {err:.3g} (largest entry {scale:.3g})"


def run(s, t, kind, grad_teacher=False, grad_output=None, **kw):
    """divkit's loss and gradients through autograd, from fp32 leaves."""
    s = s.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(grad_teacher)
    loss = divkit.divergence(s, t, kind, **kw)
    go = torch.ones_like(loss) if grad_output is None else grad_output.to(loss.dtype)
    loss.backward(go)
    return loss.detach(), s.grad, (t.grad if grad_teacher else None)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_every_kind_matches_reference(case):
    kind, params = case
    s, t = logits(3, 5, 37, seed=1), logits(3, 5, 37, seed=2)
    labels = torch.randint(0, 37, (3, 5), generator=torch.Generator().manual_seed(3))
    labels[0, 1] = labels[2, 4] = -100
    got = run(s, t, kind, grad_teacher=True, labels=labels, **params)
    want = ref.loss_and_grads(s, t, kind, grad_teacher=True, labels=labels, **params)
    assert got[0].dtype == torch.float32 and got[0].shape == ()
    assert_loss_close(got[0], want[0])
    assert_grad_close(got[1], want[1])
    assert_grad_close(got[2], want[2])


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
@pytest.mark.parametrize("case", KIND_CASES, ids=case_id)
def test_reductions(case, reduction):
    kind, params = case
    s, t = logits(4, 6, 50, seed=4), logits(4, 6, 50, seed=5)
    labels = torch.zeros(4, 6, dtype=torch.long)
    labels[1, :3] = -100
    go = logits(4, 6, seed=6) if reduction == "none" else torch.tensor(0.75)
    got = run(s, t, kind, grad_output=go, labels=labels, reduction=reduction, **params)
    want = ref.loss_and_grads(
        s, t, kind, grad_output=go, labels=labels, reduction=reduction, **params
    )
    assert got[0].shape == ((4, 6) if reduction == "none" else ())
    assert_loss_close(got[0], want[0])
    assert_grad_close(got[1], want[1])
    if reduction == "none":
        assert (got[0][1, :3] == 0).all()


@pytest.mark.parametrize("kind", ["forward_kl", "jsd", "chi2"])
def test_ignored_tokens_are_not_read(kind):
    s, t = logits(5, 20, seed=7), logits(5, 20, seed=8)
    labels = torch.tensor([3, 7, 7, 1, 7], dtype=torch.int32)
    clean = run(s, t, kind, grad_teacher=True, labels=labels, ignore_index=7)
    # Rows with the ignore label may hold anything: NaN, +inf, all -inf.
    s2, t2 = s.clone(), t.clone()
    s2[1] = float("nan")
    t2[2] = float("inf")
    s2[4] = float("-inf")
    got = run(s2, t2, kind, grad_teacher=True, labels=labels, ignore_index=7)
    for a, b in zip(got, clean):
        assert torch.equal(a, b)
    want = ref.loss_and_grads(s, t, kind, grad_teacher=True, labels=labels, ignore_index=7)
    assert_loss_close(got[0], want[0])
    for g in got[1:]:
        assert (g[[1, 2, 4]] == 0).all()


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
def test_all_tokens_ignored(reduction):
    s, t = logits(3, 10, seed=9), logits(3, 10, seed=10)
    labels = torch.full((3,), -100)
    loss, gs, gt = run(s, t, "forward_kl", grad_teacher=True, labels=labels, reduction=reduction)
    assert (loss == 0).all() and (gs == 0).all() and (gt == 0).all()


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "tvd"])
def test_weights(kind, reduction):
    s, t = logits(2, 7, 30, seed=11), logits(2, 7, 30, seed=12)
    labels = torch.ones(2, 7, dtype=torch.long)
    labels[0, 0] = -100
    weights = torch.rand(2, 7, generator=torch.Generator().manual_seed(13))
    weights[1, 2] = 0.0
    got = run(s, t, kind, grad_teacher=True, labels=labels, weights=weights, reduction=reduction)
    want = ref.loss_and_grads(
        s, t, kind, grad_teacher=True, labels=labels, weights=weights, reduction=reduction
    )
    assert_loss_close(got[0], want[0])
    assert_grad_close(got[1], want[1])
    assert_grad_close(got[2], want[2])
    assert (got[1][1, 2] == 0).all()


def test_weights_float64_and_low_precision():
    s, t = logits(6, 30, seed=14), logits(6, 30, seed=15)
    w = torch.rand(6, generator=torch.Generator().manual_seed(16), dtype=torch.float64)
    want = ref.loss(s, t, "forward_kl", weights=w)
    assert_loss_close(divkit.divergence(s, t, weights=w), want)
    # bf16 weights are converted to fp32 by the wrapper
    wb = w.to(torch.bfloat16)
    assert_loss_close(divkit.divergence(s, t, weights=wb), ref.loss(s, t, weights=wb.double()))


@pytest.mark.parametrize("num_items", [7, 12.5, torch.tensor(9), torch.tensor(3.0)])
@pytest.mark.parametrize("reduction", ["sum", "mean", "batchmean"])
def test_num_items_in_batch(reduction, num_items):
    s, t = logits(3, 4, 25, seed=17), logits(3, 4, 25, seed=18)
    labels = torch.ones(3, 4, dtype=torch.long)
    labels[2] = -100
    kw = dict(labels=labels, reduction=reduction, num_items_in_batch=num_items)
    got = run(s, t, "jsd", **kw)
    want = ref.loss_and_grads(s, t, "jsd", **kw)
    assert_loss_close(got[0], want[0])
    assert_grad_close(got[1], want[1])


@pytest.mark.parametrize("temperature", [0.5, 2.0, 3.0])
@pytest.mark.parametrize("scale", [False, True])
@pytest.mark.parametrize("case", KIND_CASES, ids=case_id)
def test_temperature(case, temperature, scale):
    kind, params = case
    s, t = logits(5, 40, seed=19), logits(5, 40, seed=20)
    kw = dict(temperature=temperature, scale_by_t_squared=scale, **params)
    got = run(s, t, kind, grad_teacher=True, **kw)
    want = ref.loss_and_grads(s, t, kind, grad_teacher=True, **kw)
    assert_loss_close(got[0], want[0])
    assert_grad_close(got[1], want[1])
    assert_grad_close(got[2], want[2])


def test_reference_value_from_objectives_table():
    # student p = [0.1, 0.9], teacher p = [0.9, 0.1]: forward and reverse KL are 0.8 ln 9.
    s = torch.tensor([[0.1, 0.9]]).log()
    t = torch.tensor([[0.9, 0.1]]).log()
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        beta = {"forward_kl": 0.5, "reverse_kl": 0.5, "jsd": 0.0}[kind]
        assert divkit.divergence(s, t, kind, beta=beta).item() == pytest.approx(
            0.8 * math.log(9), rel=1e-6
        )
    assert divkit.divergence(s, t, "tvd").item() == pytest.approx(0.8, rel=1e-6)
    assert divkit.divergence(s, t, "jeffreys").item() == pytest.approx(1.6 * math.log(9), rel=1e-6)


@pytest.mark.parametrize("shape", [(37,), (1, 1), (4, 1), (2, 3, 4, 9), (1, 128)])
def test_shapes(shape):
    s, t = logits(*shape, seed=21), logits(*shape, seed=22)
    for reduction in ("none", "mean"):
        got = run(s, t, "reverse_kl", grad_teacher=True, reduction=reduction)
        want = ref.loss_and_grads(s, t, "reverse_kl", grad_teacher=True, reduction=reduction)
        assert got[0].shape == (shape[:-1] if reduction == "none" else ())
        assert got[1].shape == shape and got[2].shape == shape
        assert_loss_close(got[0], want[0])
        assert_grad_close(got[1], want[1])
        assert_grad_close(got[2], want[2])


def test_strided_inputs():
    base_s, base_t = logits(4, 9, 64, seed=23), logits(64, 9, 4, seed=24)
    s = base_s[:, 1:-1, 3:-5]  # rows not collapsible into one stride: copied
    t = base_t.transpose(0, 2)[:, 1:-1, 3:-5]  # non-unit stride along V: copied
    u = logits(1, 56, seed=25).expand(4, 7, 56)  # row stride 0
    for teacher in (t, u):
        sl, tl = s.requires_grad_(True), teacher.requires_grad_(True)
        loss = divkit.divergence(sl, tl, "forward_kl")
        gs, gt = torch.autograd.grad(loss, (sl, tl))
        want = ref.loss_and_grads(s, teacher, "forward_kl", grad_teacher=True)
        assert_loss_close(loss, want[0])
        assert_grad_close(gs, want[1])
        assert_grad_close(gt, want[2])
        # and as the numpy path sees them
        assert_loss_close(
            torch.from_numpy(divkit.divergence(s.detach().numpy(), teacher.detach().numpy())),
            want[0],
        )
    # A row-strided view (padding after each row) goes through without a copy.
    padded = logits(6, 80, seed=26)
    s2, t2 = padded[:, :50], logits(6, 50, seed=27)
    assert_loss_close(divkit.divergence(s2, t2), ref.loss(s2, t2))


def test_mixed_dtypes():
    s, t = logits(4, 33, seed=28), logits(4, 33, seed=29)
    for sd, td in [
        (torch.float32, torch.bfloat16),
        (torch.float16, torch.float64),
        (torch.float64, torch.float32),
    ]:
        s1, t1 = s.to(sd), t.to(td)
        got = run(s1, t1, "jsd", grad_teacher=True)
        want = ref.loss_and_grads(s1, t1, "jsd", grad_teacher=True)
        assert got[1].dtype == sd and got[2].dtype == td
        assert_loss_close(got[0], want[0])


def test_teacher_gradient_only():
    s, t = logits(3, 21, seed=30), logits(3, 21, seed=31).requires_grad_(True)
    loss = divkit.divergence(s, t, "reverse_kl")
    loss.backward()
    _, _, gt = ref.loss_and_grads(s, t, "reverse_kl", grad_teacher=True)
    assert_grad_close(t.grad, gt)


def test_masked_logits():
    s, t = logits(3, 12, seed=32), logits(3, 12, seed=33)
    mask = torch.zeros(12, dtype=torch.bool)
    mask[[0, 5, 11]] = True
    sm, tm = s.masked_fill(mask, float("-inf")), t.masked_fill(mask, float("-inf"))
    for kind, params in KIND_CASES:
        got = run(sm, tm, kind, **params)
        want = ref.loss_and_grads(s[:, ~mask], t[:, ~mask], kind, **params)
        assert_loss_close(got[0], want[0])
        assert (got[1][:, mask] == 0).all()
        assert_grad_close(got[1][:, ~mask], want[1])
    # Teacher-only mask: forward KL stays finite (0 log 0 = 0), reverse KL is +inf.
    fkl = divkit.divergence(s, tm, "forward_kl", reduction="none")
    assert torch.isfinite(fkl).all()
    q_ref = ref.per_token(s, tm, "cross_entropy") - ref.per_token(
        tm[:, ~mask], tm[:, ~mask], "cross_entropy"
    )
    assert_loss_close(fkl, q_ref)
    s_leaf = s.clone().requires_grad_(True)
    rkl = divkit.divergence(s_leaf, tm, "reverse_kl", reduction="none")
    assert torch.isinf(rkl).all() and (rkl > 0).all()
    rkl.sum().backward()
    assert torch.isfinite(s_leaf.grad).all()


def test_grad_output_scaling_and_graph():
    s = logits(4, 10, seed=34).requires_grad_(True)
    t = logits(4, 10, seed=35)
    (divkit.divergence(s, t) * 3.0 + 1.0).backward()
    g3 = s.grad.clone()
    s.grad = None
    divkit.divergence(s, t).backward()
    torch.testing.assert_close(g3, 3 * s.grad, rtol=1e-6, atol=0)
    # retain_graph: backward twice accumulates
    s.grad = None
    loss = divkit.divergence(s, t) * 2
    loss.backward(retain_graph=True)
    loss.backward()
    torch.testing.assert_close(s.grad, 2 * g3 / 3 * 2, rtol=1e-6, atol=0)


def test_no_grad_and_no_requires_grad():
    s = logits(3, 10, seed=36).requires_grad_(True)
    t = logits(3, 10, seed=37)
    with torch.no_grad():
        loss = divkit.divergence(s, t)
    assert loss.grad_fn is None and not loss.requires_grad
    loss2 = divkit.divergence(s.detach(), t)
    assert loss2.grad_fn is None
    assert torch.equal(loss, loss2)
    loss3 = divkit.divergence(s, t)
    assert loss3.requires_grad and torch.equal(loss3.detach(), loss)


@pytest.mark.parametrize("grad_dtype", [None, torch.float32, torch.float64])
def test_divergence_and_grad(grad_dtype):
    s, t = logits(2, 3, 40, seed=38), logits(2, 3, 40, seed=39)
    sb, tb = s.to(torch.bfloat16), t.to(torch.bfloat16)
    loss, gs, gt = divkit.divergence_and_grad(
        sb, tb, "jsd", grad_teacher=True, grad_dtype=grad_dtype, reduction="sum"
    )
    expect = grad_dtype or torch.bfloat16
    assert gs.dtype == expect and gt.dtype == expect and gs.shape == s.shape
    want = ref.loss_and_grads(sb, tb, "jsd", grad_teacher=True, reduction="sum")
    assert_loss_close(loss, want[0])
    if grad_dtype is not None:
        assert_grad_close(gs, want[1])
        assert_grad_close(gt, want[2])
    l2, gs2, gt2 = divkit.divergence_and_grad(s, t, grad_student=False)
    assert gs2 is None and gt2 is None and l2.shape == ()


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
def test_empty_batch(reduction):
    s = torch.empty(2, 0, 9).requires_grad_(True)
    loss = divkit.divergence(s, torch.empty(2, 0, 9), reduction=reduction)
    assert loss.shape == ((2, 0) if reduction == "none" else ())
    assert (loss == 0).all()
    loss.sum().backward()
    assert s.grad.shape == s.shape
    out = divkit.divergence(
        s.detach().numpy(), np.empty((2, 0, 9), np.float32), reduction=reduction
    )
    assert out.shape == ((2, 0) if reduction == "none" else ()) and (out == 0).all()


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_repeated_backward_accumulates(inplace, scale):
    t = logits(2, 3, 11, seed=40)
    s = logits(2, 3, 11, seed=41).requires_grad_(True)
    _, want, _ = ref.loss_and_grads(s, t, "forward_kl")
    loss = divkit.divergence(s, t, inplace_grad=inplace) * scale
    calls = 1 if inplace and scale != 1.0 else 3  # scaled in place: one backward only
    for _ in range(calls):
        loss.backward(retain_graph=True)
    assert_grad_close(s.grad, calls * scale * want)


def test_jsd_beta_near_but_not_at_endpoints():
    # beta = 0 / 1 are TRL's forward / reverse KL, but the divergence tends to 0 as beta
    # approaches them: a beta inside (0, 1) must not round to an endpoint on its way to fp32.
    s, t = logits(4, 50, seed=42), logits(4, 50, seed=43)
    assert divkit.divergence(s, t, "jsd", beta=0.0).item() > 0.5
    assert divkit.divergence(s, t, "jsd", beta=1.0).item() > 0.5
    for beta in (1e-300, 1e-44, 1e-9, 1 - 1e-12, 1 - 1e-9):
        assert abs(divkit.divergence(s, t, "jsd", beta=beta).item()) < 1e-6


@pytest.mark.parametrize("kind", ["skew_forward_kl", "skew_reverse_kl"])
@pytest.mark.parametrize("alpha", [0.01, 0.3, 0.7, 0.97])
@pytest.mark.parametrize("spread", [0.05, 1.0, 3.0])
def test_skew_kl_every_alpha_matches_reference(kind, alpha, spread):
    # The AVX-512 kernels fit log(alpha + (1 - alpha) e^x) per alpha and use the fit for vectors
    # whose every |log(p / q)| < 8 (all of these rows; V = 1000, so whole 16-lane vectors): alphas
    # toward both ends, teacher = student + noise of 0.05 to 3.
    s = logits(4, 1000, seed=5)
    t = s + spread * torch.randn(4, 1000, generator=torch.Generator().manual_seed(6))
    got = run(s, t, kind, grad_teacher=True, alpha=alpha, reduction="sum")
    want = ref.loss_and_grads(s, t, kind, grad_teacher=True, alpha=alpha, reduction="sum")
    assert_loss_close(got[0], want[0])
    assert_grad_close(got[1], want[1])
    assert_grad_close(got[2], want[2])


@pytest.mark.parametrize("backend", ["core", "torch"])
@pytest.mark.parametrize("kind", ["skew_forward_kl", "skew_reverse_kl"])
def test_skew_kl_alpha_one_is_zero_where_the_ratio_is_tiny(kind, backend):
    # alpha = 1 makes the mixture the distribution itself (KL(p || p) = 0), also at entries where
    # its probability is e^-85 of the other's (log ratio below -80, still a normal float).
    s = torch.zeros(2, 37)
    t = torch.zeros(2, 37)
    t[:, 5] = 85.0  # teacher: e^-85 at every other entry; student: uniform
    if kind == "skew_reverse_kl":
        s, t = t, s
    s.requires_grad_(True)
    t.requires_grad_(True)
    loss = divkit.divergence(s, t, kind, alpha=1.0, reduction="none", backend=backend)
    loss.sum().backward()
    assert torch.equal(loss.detach(), torch.zeros(2))
    assert torch.equal(s.grad, torch.zeros_like(s))
    assert torch.equal(t.grad, torch.zeros_like(t))


def test_divergence_and_grad_inplace_moves_the_version_counter():
    # The gradient written into logits that an operation saved for its backward (exp saves its
    # output): backpropagating the returned gradient through them must raise, not use it.
    x = logits(4, 30, seed=44).requires_grad_(True)
    z = torch.exp(x)
    _, grad, _ = divkit.divergence_and_grad(z, logits(4, 30, seed=45), inplace_grad=True)
    assert grad.data_ptr() == z.data_ptr()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.backward(grad.clone())
