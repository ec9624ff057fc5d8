"""divkit.sparse_divergence and divkit.topk_divergence against a materialized float64 torch
computation written here: log_softmax of the full student logits, gather at the teacher's
indices, renormalize or add the tail bucket, then the divergence formula; gradients by torch
autograd through it, and torch.autograd.gradcheck of divkit's own Functions."""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck

import divkit
from conftest import CASES, KIND_CASES, case_id, logits

NEG_INF = float("-inf")


@pytest.fixture(autouse=True)
def _one_thread():
    # Many small calls: waking a thread team per call costs more than the work on 2 cores
    # (results do not depend on the thread count; conftest restores it).
    divkit.set_num_threads(1)


# ---- the reference -------------------------------------------------------------------------


def _where_pos(x, y):
    """x * y with 0 where x == 0 (0 log 0 = 0), without NaN gradients from the masked side."""
    safe = torch.where(x > 0, y, torch.zeros_like(y))
    return torch.where(x > 0, x * safe, torch.zeros_like(x))


def divergence_formula(lp, lq, kind, beta=0.5, alpha=0.1):
    """D(p, q) per row from log-probabilities over the last dim (float64)."""
    p, q = lp.exp(), lq.exp()
    both_zero = (p == 0) & (q == 0)  # a masked entry on both sides contributes nothing
    zero = torch.zeros_like(p)

    def kl(pa, la, lb):
        return _where_pos(pa, la - lb).sum(-1)

    if (
        kind == "jsd"
        and beta == 0
        or kind in ("alpha_divergence", "renyi")
        and alpha == 1
        or kind == "skew_forward_kl"
        and alpha == 0
    ):
        kind = "forward_kl"
    if (
        kind == "jsd"
        and beta == 1
        or kind == "alpha_divergence"
        and alpha == 0
        or kind == "skew_reverse_kl"
        and alpha == 0
    ):
        kind = "reverse_kl"
    if kind == "forward_kl":
        return kl(p, lp, lq)
    if kind == "reverse_kl":
        return kl(q, lq, lp)
    if kind == "jeffreys":
        return kl(p, lp, lq) + kl(q, lq, lp)
    if kind == "cross_entropy":
        return -_where_pos(p, lq).sum(-1)
    if kind == "jsd":
        lm = torch.log(beta * p + (1 - beta) * q)
        return beta * kl(p, lp, lm) + (1 - beta) * kl(q, lq, lm)
    if kind == "skew_forward_kl":
        return kl(p, lp, torch.log(alpha * p + (1 - alpha) * q))
    if kind == "skew_reverse_kl":
        return kl(q, lq, torch.log((1 - alpha) * p + alpha * q))
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if kind == "hellinger":
        return ((p.sqrt() - q.sqrt()) ** 2).sum(-1)
    if kind == "chi2":
        return torch.where(both_zero, zero, (p - q) ** 2 / q).sum(-1)
    w = torch.where(
        both_zero, zero, torch.exp(alpha * lp + (1 - alpha) * lq.where(~both_zero, zero))
    )
    if kind == "alpha_divergence":
        return (1 - w.sum(-1)) / (alpha * (1 - alpha))
    if kind == "renyi":
        return torch.log(w.sum(-1)) / (alpha - 1)
    raise AssertionError(kind)


def buckets(s, idx, lp, tail, temperature):
    """(log p, log q) over the k (renormalize) or k + 1 (bucket) entries, float64."""
    ls = torch.log_softmax(s.double() / temperature, -1)
    lq = ls.gather(-1, idx.long())
    lp = lp.double()
    v, k = s.shape[-1], idx.shape[-1]
    if tail == "renormalize" or k == v:
        return lp - lp.logsumexp(-1, keepdim=True), lq - lq.logsumexp(-1, keepdim=True)
    in_top = torch.zeros_like(ls, dtype=torch.bool).scatter(-1, idx.long(), True)
    lq_tail = ls.masked_fill(in_top, NEG_INF).logsumexp(-1, keepdim=True)
    mass = lp.logsumexp(-1, keepdim=True)
    lp_tail = torch.log(-torch.expm1(mass))
    return torch.cat([lp, lp_tail], -1), torch.cat([lq, lq_tail], -1)


def reference(
    s,
    idx,
    lp,
    kind="forward_kl",
    *,
    tail="bucket",
    temperature=1.0,
    labels=None,
    weights=None,
    reduction="mean",
    num_items_in_batch=None,
    beta=0.5,
    alpha=0.1,
):
    lpb, lqb = buckets(s, idx, lp, tail, temperature)
    d = divergence_formula(lpb, lqb, kind, beta, alpha)
    active = torch.ones(d.shape, dtype=torch.bool) if labels is None else labels != -100
    d = torch.where(active, d, torch.zeros_like(d))
    if weights is not None:
        d = d * weights.double()
    if reduction == "none":
        return d
    if num_items_in_batch is not None:
        return d.sum() / num_items_in_batch
    if reduction == "sum":
        return d.sum()
    if reduction == "mean":
        return d.sum() / max(int(active.sum()), 1)
    return d.sum() / d.numel()


def teacher_topk(n_lead, v, k, seed, student=None, dtype=torch.float32):
    """A teacher related to the student, given as its top-k (indices, log-probabilities) in
    rank order, as servers return them."""
    t = logits(*n_lead, v, seed=seed + 1, dtype=torch.float64)
    if student is not None:
        t = 0.7 * student.double() + 0.7 * t
    lp, idx = torch.log_softmax(t, -1).topk(k, -1)
    return idx, lp.to(dtype)


def student_and_teacher(lead=(2, 3), v=11, k=4, seed=0, dtype=torch.float64):
    s = logits(*lead, v, seed=seed, dtype=dtype)
    idx, lp = teacher_topk(lead, v, k, seed, s)
    return s, idx, lp


def check(got_loss, want_loss, got_grad=None, want_grad=None, rtol=2e-5, atol=2e-6):
    torch.testing.assert_close(got_loss.double(), want_loss.double(), rtol=rtol, atol=atol)
    if got_grad is not None:
        scale = max(1.0, want_grad.abs().max().item())
        torch.testing.assert_close(
            got_grad.double(), want_grad.double(), rtol=0, atol=atol * scale * 10
        )


# ---- values and gradients ------------------------------------------------------------------


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_materialized_reference(case, tail):
    kind, params = case
    s, idx, lp = student_and_teacher(seed=3)
    labels = torch.tensor([[0, -100, 2], [1, 1, 1]])
    weights = torch.tensor([[0.5, 1.0, 2.0], [1.0, 0.25, 1.5]], dtype=torch.float64)
    kw = dict(tail=tail, temperature=1.5, labels=labels, weights=weights, **params)
    s1 = s.clone().requires_grad_(True)
    loss = divkit.sparse_divergence(s1, idx, lp, kind, **kw)
    loss.backward()
    s2 = s.clone().requires_grad_(True)
    want = reference(s2, idx, lp, kind, **kw)
    want.backward()
    check(loss, want, s1.grad, s2.grad)
    assert loss.dtype == torch.float32 and s1.grad.dtype == s.dtype
    # The ignored token gets no gradient.
    assert torch.all(s1.grad[0, 1] == 0)


@pytest.mark.parametrize("reduction", ["none", "sum", "batchmean", "mean"])
def test_reductions_and_num_items(reduction):
    s, idx, lp = student_and_teacher(seed=5, dtype=torch.float32)
    labels = torch.tensor([[0, -100, 2], [-100, 1, 1]])
    for num_items in [None] if reduction == "none" else [None, 7]:
        got = divkit.sparse_divergence(
            s,
            idx,
            lp,
            "jsd",
            beta=0.3,
            labels=labels,
            reduction=reduction,
            num_items_in_batch=num_items,
        )
        want = reference(
            s,
            idx,
            lp,
            "jsd",
            beta=0.3,
            labels=labels,
            reduction=reduction,
            num_items_in_batch=num_items,
        )
        check(got, want)
    assert got.shape == (() if reduction != "none" else (2, 3))


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("case", KIND_CASES, ids=case_id)
def test_gradcheck(case, tail):
    kind, params = case
    # fp32 arithmetic inside: gradcheck tolerances for fp32 (see test_gradcheck.py).
    s, idx, lp = student_and_teacher(lead=(3,), v=7, k=3, seed=11)
    s = (s / 2).requires_grad_(True)
    if kind == "tvd":  # keep |p - q| away from its kink
        lp = lp.clone()
        lp[:, 0] -= 0.3
    labels = torch.tensor([0, -100, 1])

    def f(x):
        return divkit.sparse_divergence(
            x, idx, lp, kind, tail=tail, labels=labels, temperature=1.3, reduction="none", **params
        )

    assert gradcheck(f, (s,), eps=1e-3, atol=2e-3, rtol=2e-2)


def test_gradient_reaches_every_logit_only_in_bucket_mode():
    s, idx, lp = student_and_teacher(lead=(4,), v=15, k=5, seed=13)
    in_top = torch.zeros(4, 15, dtype=torch.bool).scatter(-1, idx, True)
    for tail in ("bucket", "renormalize"):
        x = s.clone().requires_grad_(True)
        divkit.sparse_divergence(x, idx, lp, tail=tail).backward()
        assert torch.all(x.grad[in_top] != 0)
        if tail == "bucket":
            assert torch.all(x.grad[~in_top] != 0)
        else:
            assert torch.all(x.grad[~in_top] == 0)


def test_upstream_gradient_and_inplace():
    s, idx, lp = student_and_teacher(seed=17, dtype=torch.float32)
    x = s.clone().requires_grad_(True)
    (3.0 * divkit.sparse_divergence(x, idx, lp, "reverse_kl")).backward()
    y = s.clone().requires_grad_(True)
    reference(y, idx, lp, "reverse_kl").mul(3.0).backward()
    torch.testing.assert_close(x.grad, y.grad.float(), rtol=0, atol=1e-6)
    # In place: the gradient lands in the logits' own storage, with the same values.
    z = s.clone().requires_grad_(True)
    z.grad = None
    loss = divkit.sparse_divergence(z, idx, lp, "reverse_kl", inplace_grad=True)
    (3.0 * loss).backward()
    torch.testing.assert_close(z.grad, x.grad, rtol=0, atol=0)
    assert torch.equal(z.detach(), z.grad)  # the storage now holds the gradient


@pytest.mark.parametrize("fn", ["sparse", "topk"])
def test_inplace_grad_moves_the_version_counter(fn):
    # exp saves its output for backward: once the logits hold the gradient, autograd must raise
    # rather than backpropagate through the overwritten values.
    s, idx, lp = student_and_teacher(seed=23, dtype=torch.float32)
    x = s.clone().requires_grad_(True)
    z = torch.exp(x)
    if fn == "sparse":
        loss = divkit.sparse_divergence(z, idx, lp, inplace_grad=True)
    else:
        loss = divkit.topk_divergence(z, s.exp(), 4, inplace_grad=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_per_token_upstream_gradient():
    s, idx, lp = student_and_teacher(seed=19)
    g = torch.rand(2, 3, dtype=torch.float32)
    x = s.clone().requires_grad_(True)
    (divkit.sparse_divergence(x, idx, lp, "hellinger", reduction="none") * g).sum().backward()
    y = s.clone().requires_grad_(True)
    (reference(y, idx, lp, "hellinger", reduction="none") * g.double()).sum().backward()
    check(x.grad, y.grad)


def test_k_one_and_k_equal_v():
    s, idx, lp = student_and_teacher(lead=(5,), v=9, k=1, seed=23)
    for case in KIND_CASES:  # one entry, renormalized: a point mass on both sides
        kind, params = case
        assert divkit.sparse_divergence(
            s, idx, lp, kind, tail="renormalize", **params
        ).item() == pytest.approx(0, abs=1e-6)
    x = s.clone().requires_grad_(True)
    divkit.sparse_divergence(x, idx, lp, tail="bucket").backward()
    y = s.clone().requires_grad_(True)
    reference(y, idx, lp, tail="bucket").backward()
    check(x.grad, y.grad)
    # k = V: bucket equals renormalize equals divergence() with the log-probs as logits.
    s, idx, lp = student_and_teacher(lead=(5,), v=9, k=9, seed=29)
    t = torch.empty(5, 9, dtype=torch.float64).scatter_(-1, idx, lp.double())
    for kind, params in KIND_CASES:
        b = divkit.sparse_divergence(s, idx, lp, kind, tail="bucket", **params)
        r = divkit.sparse_divergence(s, idx, lp, kind, tail="renormalize", **params)
        d = divkit.divergence(s, t, kind, **params)
        assert b.item() == r.item()
        assert b.item() == pytest.approx(d.item(), rel=2e-5, abs=1e-6)


def test_masked_entries():
    # -inf teacher logprobs (probability 0) and -inf student logits (masked) are allowed.
    s, idx, lp = student_and_teacher(lead=(3,), v=10, k=4, seed=31)
    lp = lp.clone()
    lp[0, 3] = NEG_INF
    s = s.clone()
    s[0, idx[0, 3]] = NEG_INF  # both 0 at that entry
    tail_entry = [j for j in range(10) if j not in idx[1].tolist()][0]
    s[1, tail_entry] = NEG_INF
    for tail in ("bucket", "renormalize"):
        for kind, params in KIND_CASES:
            got = divkit.sparse_divergence(s, idx, lp, kind, tail=tail, reduction="none", **params)
            want = reference(s, idx, lp, kind, tail=tail, reduction="none", **params)
            check(got, want)
    # Student -inf where the teacher has mass: forward KL is +inf for that token, no gradient.
    s2 = s.clone()
    s2[2, idx[2, 0]] = NEG_INF
    x = s2.requires_grad_(True)
    loss = divkit.sparse_divergence(x, idx, lp, reduction="none")
    assert math.isinf(loss[2].item()) and math.isfinite(loss[1].item())
    loss[:2].sum().backward()
    assert torch.all(x.grad[2] == 0)


def test_all_teacher_mass_in_the_tail():
    # Every teacher logprob -inf with tail="bucket": p = (0, ..., 0, 1), a valid teacher.
    s, idx, lp = student_and_teacher(lead=(2,), v=8, k=3, seed=37)
    lp = torch.full_like(lp, NEG_INF)
    got = divkit.sparse_divergence(s, idx, lp, "forward_kl", tail="bucket", reduction="none")
    check(got, reference(s, idx, lp, "forward_kl", tail="bucket", reduction="none"))


def test_bf16_inputs():
    s, idx, lp = student_and_teacher(lead=(4, 3), v=50, k=8, seed=41, dtype=torch.bfloat16)
    lp = lp.to(torch.bfloat16)
    for tail in ("bucket", "renormalize"):
        x = s.clone().requires_grad_(True)
        loss = divkit.sparse_divergence(x, idx.int(), lp, "jsd", tail=tail, temperature=2.0)
        loss.backward()
        y = s.double().requires_grad_(True)
        reference(y, idx, lp, "jsd", tail=tail, temperature=2.0).backward()
        torch.testing.assert_close(
            loss.double(),
            reference(s, idx, lp, "jsd", tail=tail, temperature=2.0),
            rtol=2e-5,
            atol=1e-6,
        )
        assert x.grad.dtype == torch.bfloat16
        torch.testing.assert_close(x.grad.double(), y.grad, rtol=1e-2, atol=1e-6)


def test_float16_logprobs_and_int16_indices_are_converted():
    s, idx, lp = student_and_teacher(seed=43)
    got = divkit.sparse_divergence(s, idx.to(torch.int16), lp.half())
    check(got, reference(s, idx, lp.half().float()))


def test_large_vocabulary_tail():
    # V = 128256, a student whose top-k holds all but ~1e-8 of its mass: the tail's share comes
    # from the direct tail sum, not 1 - sum q.
    s = logits(2, 128256, seed=47, dtype=torch.float32)
    idx, lp = teacher_topk((2,), 128256, 16, 47, s)
    s = s.scatter_add(-1, idx, torch.full(idx.shape, 30.0))
    got = divkit.sparse_divergence(s, idx, lp, "forward_kl")
    check(got, reference(s, idx, lp, "forward_kl"))


# ---- topk_divergence -----------------------------------------------------------------------


def topk_reference(s, t, k, kind, temperature=1.0, **kw):
    _, idx = t.double().topk(k, -1)  # continuous random data: no ties
    lp = torch.log_softmax(t.double() / temperature, -1).gather(-1, idx)
    return reference(s, idx, lp, kind, tail="renormalize", temperature=temperature, **kw)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_topk_matches_reference(case):
    kind, params = case
    s = logits(2, 3, 13, seed=53, dtype=torch.float64)
    t = logits(2, 3, 13, seed=54, dtype=torch.float32)
    labels = torch.tensor([[0, -100, 2], [1, 1, 1]])
    x = s.clone().requires_grad_(True)
    loss = divkit.topk_divergence(x, t, 5, kind, temperature=0.8, labels=labels, **params)
    loss.backward()
    y = s.clone().requires_grad_(True)
    want = topk_reference(y, t, 5, kind, temperature=0.8, labels=labels, **params)
    want.backward()
    check(loss, want, x.grad, y.grad)


def test_topk_ties_go_to_lowest_index_and_gradcheck():
    t = torch.tensor([[-1.0, 2.0, -1.0, 2.0, 0.5, 2.0, -1.0, 2.0]])
    s = torch.linspace(0, 0.7, 8, dtype=torch.float64).unsqueeze(0).requires_grad_(True)
    loss = divkit.topk_divergence(s, t, 2)
    loss.backward()
    assert s.grad[0].nonzero().flatten().tolist() == [1, 3]
    q1 = 1 / (1 + math.exp(0.2))
    assert loss.item() == pytest.approx(
        0.5 * math.log(0.5 / q1) + 0.5 * math.log(0.5 / (1 - q1)), abs=1e-6
    )
    s2 = logits(3, 9, seed=59, dtype=torch.float64).div(2).requires_grad_(True)
    t2 = logits(3, 9, seed=60)
    assert gradcheck(
        lambda x: divkit.topk_divergence(x, t2, 4, "jsd", temperature=1.5, reduction="none"),
        (s2,),
        eps=1e-3,
        atol=2e-3,
        rtol=2e-2,
    )


def test_topk_k_equal_v_is_divergence():
    s = logits(4, 10, seed=61)
    t = logits(4, 10, seed=62)
    for kind, params in KIND_CASES:
        got = divkit.topk_divergence(s, t, 10, kind, temperature=1.7, **params)
        want = divkit.divergence(s, t, kind, temperature=1.7, **params)
        assert got.item() == pytest.approx(want.item(), rel=2e-5, abs=1e-6)


# ---- bad input -----------------------------------------------------------------------------


def test_bad_sparse_input():
    s, idx, lp = student_and_teacher(lead=(3,), v=8, k=3, seed=71, dtype=torch.float32)
    sd = divkit.sparse_divergence

    def raises(exc, match, *args, **kw):
        with pytest.raises(exc, match=match):
            sd(*args, **kw)

    dup = idx.clone()
    dup[1, 2] = dup[1, 0]
    raises(divkit.Error, r"teacher_indices repeats .* row 1", s, dup, lp)
    out = idx.clone()
    out[2, 0] = 8
    raises(divkit.Error, r"teacher_indices .*8 at row 2.*\[0, 8\)", s, out, lp)
    neg = idx.clone()
    neg[0, 0] = -1
    raises(divkit.Error, r"teacher_indices holds -1", s, neg, lp)
    pos = lp.clone()
    pos[1, 1] = 0.5
    raises(divkit.Error, r"teacher_logprobs .*0\.5 at row 1", s, idx, pos)
    nan = lp.clone()
    nan[0, 0] = float("nan")
    raises(divkit.Error, r"teacher_logprobs .*nan at row 0", s, idx, nan)
    heavy = torch.full_like(lp, math.log(0.5))
    raises(divkit.Error, r"teacher_logprobs at row 0 .*summing to 1\.5", s, idx, heavy)
    sd(s, idx, heavy, tail="renormalize")  # unnormalized scores are fine renormalized
    big = torch.arange(9).expand(3, 9)
    raises(divkit.Error, r"k = 9 .*V = 8", s, big, torch.full((3, 9), -3.0))
    raises(divkit.Error, r"k = 0", s, idx[:, :0], lp[:, :0])
    raises(ValueError, r"teacher_logprobs has shape", s, idx, lp[:, :2])
    raises(ValueError, r"teacher_indices has shape", s, idx[:2], lp[:2])
    raises(TypeError, r"teacher_indices must have an integer dtype", s, idx.float(), lp)
    raises(TypeError, r"teacher_logprobs must have a floating dtype", s, idx, idx)
    raises(divkit.Error, r"tail 'drop' is unknown", s, idx, lp, tail="drop")
    raises(ValueError, r"teacher_logprobs requires grad", s, idx, lp.clone().requires_grad_(True))
    bad_s = s.clone()
    bad_s[2, 5] = float("nan")
    raises(divkit.Error, r"student_logits contains NaN or \+inf at row 2", bad_s, idx, lp)
    masked = s.clone()
    masked[1, idx[1]] = NEG_INF
    raises(
        divkit.Error,
        r"student_logits row 1 is -inf at every teacher index",
        masked,
        idx,
        lp,
        tail="renormalize",
    )
    # In place: a bad row leaves the student unchanged.
    bad_s.requires_grad_(True)
    before = bad_s.detach().clone()
    raises(divkit.Error, r"row 2", bad_s, idx, lp, inplace_grad=True)
    assert torch.equal(bad_s.detach().nan_to_num(), before.nan_to_num())
    # An ignored token's indices and logprobs are not read.
    out[2, 1] = 99
    sd(s, out, lp, labels=torch.tensor([0, 1, -100]))
    # A label that is neither ignore_index nor a vocabulary index: labels and logits disagree.
    raises(
        divkit.Error,
        r"labels must be in \[0, 8\).* got 8 at flat position 1",
        s,
        idx,
        lp,
        labels=torch.tensor([0, 8, -100]),
    )
    raises(
        divkit.Error,
        r"labels must be in \[0, 8\).* got -1",
        s,
        idx,
        lp,
        labels=torch.tensor([0, -1, 2]),
        ignore_index=-100,
    )


def test_bad_topk_input():
    s = logits(3, 8, seed=73)
    t = logits(3, 8, seed=74)
    for k in (0, 9):
        with pytest.raises(divkit.Error, match=rf"k must be in \[1, V = 8\], got {k}"):
            divkit.topk_divergence(s, t, k)
    with pytest.raises(TypeError, match="k must be an int"):
        divkit.topk_divergence(s, t, 2.0)
    with pytest.raises(ValueError, match="teacher_logits has shape"):
        divkit.topk_divergence(s, t[:, :7], 2)
    with pytest.raises(ValueError, match="teacher_logits requires grad"):
        divkit.topk_divergence(s, t.clone().requires_grad_(True), 2)
    t2 = t.clone()
    t2[1, 3] = float("nan")
    with pytest.raises(divkit.Error, match="teacher_logits contains NaN or \\+inf at row 1"):
        divkit.topk_divergence(s, t2, 2)
    with pytest.raises(divkit.Error, match=r"topk_divergence: labels must be in \[0, 8\).* got 8"):
        divkit.topk_divergence(s, t, 2, labels=torch.tensor([0, 8, -100]))


@pytest.mark.parametrize("backend", ["core", "torch"])
@pytest.mark.parametrize("kind", ["forward_kl", "cross_entropy", "jeffreys", "chi2"])
def test_bucket_tail_beyond_the_student_maxs_underflow(kind, backend):
    # A peaked student: its mass outside the teacher's k entries is e^-120 (below fp32's
    # smallest subnormal relative to its max), the teacher's tail 1e-11: the divergence is
    # finite (p_tail log(p_tail / q_tail) ~ 1e-9 for forward KL), not +inf, and so is the
    # gradient of the tail entries.
    s = torch.tensor([[-46.7, -29.7, 31.2, -30.5, -31.6], [0.0, 61.0, 1.0, -2.0, 0.5]])
    idx = torch.tensor([[2], [1]])
    lp = torch.tensor([[-1.0e-11], [-1.0e-7]])
    x = s.clone().requires_grad_(True)
    got = divkit.sparse_divergence(
        x, idx, lp, kind, temperature=0.5, reduction="none", backend=backend
    )
    got.sum().backward()
    y = s.double().requires_grad_(True)
    want = reference(y, idx, lp, kind, temperature=0.5, reduction="none")
    want.sum().backward()
    assert bool(torch.isfinite(got).all())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-12)
    check(x.grad, y.grad)
