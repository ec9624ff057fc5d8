"""The one-pass label terms of TDPO / SparsePO fused heads on the PyTorch chunk loop (the route of
CUDA tensors, and backend="torch"): torch_ops.fused_linear_label_terms and its backward against
the C++ engine (_C.fused_linear_label_terms) on CPU tensors, and against a float64 autograd
reference on materialized logits; tdpo_loss_fused / sparsepo_loss_fused with backend="torch"
against backend="core"."""

from __future__ import annotations

import pytest
import torch

import divkit
from divkit.backends import torch_ops
from divkit.preference import _token_head


def _close(got, want, tol, what):
    got, want = got.double(), want.double()
    scale = want.abs().max().item() + 1e-3
    err = (got - want).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:g} * {scale:.3g}"


def _terms(fn, h, w, b, rh, rw, rb, labels, ii, kl_grad, chunk, keep, backend):
    side = _token_head.SideInputs(
        hidden=h,
        weight=w,
        bias=b,
        ref_hidden=rh,
        ref_weight=rw,
        ref_bias=rb,
        labels=labels,
        ignore_index=ii,
        kl_grad=kl_grad,
    )
    return _token_head.token_terms(fn, side, chunk_size=chunk, keep_bytes=keep, backend=backend)


def _heads(n, h, hr, v, dtype=torch.float32, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, h, generator=g).to(dtype)
    w = (torch.randn(v, h, generator=g) * 0.6).to(dtype)
    b = torch.randn(v, generator=g).to(dtype) if bias else None
    rh = torch.randn(n, hr, generator=g).to(dtype)
    rw = (torch.randn(v, hr, generator=g) * 0.6).to(dtype)
    rb = torch.randn(v, generator=g).to(dtype) if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    return hs, w, b, rh, rw, rb, labels


def _reference(hs, w, b, rh, rw, rb, labels, ii):
    """float64 autograd on the materialized logits: (lp, ref_lp, KL(p_ref || pi))."""
    z = hs.double() @ w.double().T + (0 if b is None else b.double())
    zr = rh.double() @ rw.double().T + (0 if rb is None else rb.double())
    lq, lp = torch.log_softmax(z, -1), torch.log_softmax(zr, -1)
    act = labels != ii
    y = torch.where(act, labels, torch.zeros_like(labels)).unsqueeze(-1)
    zero = torch.zeros((), dtype=torch.float64)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    return (
        torch.where(act, lq.gather(-1, y).squeeze(-1), zero),
        torch.where(act, lp.gather(-1, y).squeeze(-1), zero),
        torch.where(act, kl, zero),
    )


CASES = [
    # n, H, H_ref, V, chunk_size, keep_bytes, ignore_index, bias
    (13, 8, 6, 29, 4, 0, -100, True),
    (13, 8, 6, 29, 4, 1 << 30, -100, True),
    (20, 5, 9, 64, None, None, -100, False),
    (7, 3, 3, 1, 2, 1 << 30, 7, True),
    (1, 4, 4, 17, 1, 0, -100, True),
    (32, 16, 12, 101, 5, 4 * 101 * 2 * 10, 0, True),  # keeps the first chunks only
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
@pytest.mark.parametrize("kl_grad", [True, False])
def test_token_terms_torch_matches_core_and_fp64(case, kl_grad):
    n, h, hr, v, chunk, keep, ii, bias = case
    hs, w, b, rh, rw, rb, labels = _heads(n, h, hr, v, bias=bias)
    labels[::3] = ii
    g = torch.Generator().manual_seed(9)
    up = [torch.randn(n, generator=g) for _ in range(3)]
    got = {}
    for be in ("torch", "core"):
        xs = [x.clone().requires_grad_(True) if x is not None else None for x in (hs, w, b)]
        outs = _terms("t", xs[0], xs[1], xs[2], rh, rw, rb, labels, ii, kl_grad, chunk, keep, be)
        (sum((o * u).sum() for o, u in zip(outs, up))).backward()
        got[be] = (outs, [None if x is None else x.grad for x in xs])
    ref = [x.clone().double().requires_grad_(True) if x is not None else None for x in (hs, w, b)]
    r_lp, r_ref, r_kl = _reference(ref[0], ref[1], ref[2], rh, rw, rb, labels, ii)
    if not kl_grad:
        r_kl = r_kl.detach()
    loss = (r_lp * up[0]).sum() + (r_kl * up[2]).sum()
    loss.backward()
    for name, a, c, r in zip(
        ("lp", "ref_lp", "kl"), got["torch"][0], got["core"][0], (r_lp, r_ref, r_kl)
    ):
        _close(a, c, 2e-5, f"{name} vs core")
        _close(a, r.detach(), 2e-5, f"{name} vs fp64")
        assert (a[labels == ii] == 0).all(), name
    for name, a, c, r in zip(("hidden", "weight", "bias"), got["torch"][1], got["core"][1], ref):
        if a is None:
            assert c is None and not bias and name == "bias"
            continue
        _close(a, c, 3e-5, f"grad {name} vs core")
        _close(a, r.grad, 3e-5, f"grad {name} vs fp64")


def test_token_terms_torch_reads_the_kept_logits():
    """With the budget for every chunk, the backward computes no policy or reference logits
    (the forward kept them); with keep_bytes=0 it recomputes each chunk of both heads."""
    hs, w, b, rh, rw, rb, labels = _heads(12, 6, 5, 23)
    calls = []
    orig = torch_ops._Head.logits

    def counting(self, hc):
        calls.append(hc.shape[0])
        return orig(self, hc)

    torch_ops._Head.logits = counting
    try:
        for keep, want in ((1 << 30, 0), (0, 2 * 3)):
            x = hs.clone().requires_grad_(True)
            outs = _terms("t", x, w, b, rh, rw, rb, labels, -100, True, 4, keep, "torch")
            assert len(calls) == 2 * 3  # forward: both heads, 3 chunks
            calls.clear()
            (outs[0].sum() + outs[2].sum()).backward()
            assert len(calls) == want, (keep, calls)
            calls.clear()
    finally:
        torch_ops._Head.logits = orig


def test_token_terms_torch_fp64_and_bf16_inputs():
    hs, w, b, rh, rw, rb, labels = _heads(9, 6, 4, 19, dtype=torch.float64)
    x = hs.clone().requires_grad_(True)
    lp, ref_lp, kl = _terms("t", x, w, b, rh, rw, rb, labels, -100, True, 4, None, "torch")
    r = _reference(hs, w, b, rh, rw, rb, labels, -100)
    for a, c in zip((lp, ref_lp, kl), r):
        _close(a, c, 1e-6, "fp64 inputs")
    hs, w, b, rh, rw, rb, labels = _heads(9, 6, 4, 19, dtype=torch.bfloat16)
    outs = {}
    for be in ("torch", "core"):
        outs[be] = _terms("t", hs, w, b, rh, rw, rb, labels, -100, True, 4, None, be)
    for a, c in zip(outs["torch"], outs["core"]):
        _close(a, c, 2e-5, "bf16 inputs: torch vs core")


def _pair_inputs(bsz=3, t=6, h=8, hr=5, v=37, seed=1):
    g = torch.Generator().manual_seed(seed)
    hc, hrj = torch.randn(bsz, t, h, generator=g), torch.randn(bsz, t, h, generator=g)
    w, b = torch.randn(v, h, generator=g) * 0.5, torch.randn(v, generator=g)
    rhc, rhr = torch.randn(bsz, t, hr, generator=g), torch.randn(bsz, t, hr, generator=g)
    rw, rb = torch.randn(v, hr, generator=g) * 0.5, torch.randn(v, generator=g)
    cl, rl = torch.randint(0, v, (bsz, t), generator=g), torch.randint(0, v, (bsz, t), generator=g)
    cl[:, :2] = -100
    rl[0, :4] = -100
    return (hc, hrj, w, b), (rhc, rhr, rw, rb), cl, rl


@pytest.mark.parametrize("fn_name", ["tdpo_loss_fused", "sparsepo_loss_fused"])
@pytest.mark.parametrize("keep_bytes", [None, 0, 1 << 30])
@pytest.mark.parametrize("upstream", ["uniform", "per_pair"])
def test_pair_losses_torch_matches_core(fn_name, keep_bytes, upstream, monkeypatch):
    policy, (rhc, rhr, rw, rb), cl, rl = _pair_inputs()
    fn = getattr(divkit, fn_name)
    used = []
    orig = torch_ops.fused_linear_label_terms

    def spy(*a, **k):
        used.append(1)
        return orig(*a, **k)

    monkeypatch.setattr(torch_ops, "fused_linear_label_terms", spy)
    extra = {"variant": "tdpo1"} if fn_name == "tdpo_loss_fused" and keep_bytes == 0 else {}
    if fn_name == "sparsepo_loss_fused":
        extra = {"l1_kl": 0.1}
    got = {}
    for be in ("torch", "core"):
        xs = [x.clone().requires_grad_(True) for x in policy]
        out = fn(
            xs[0],
            xs[1],
            xs[2],
            cl,
            rl,
            ref_chosen_hidden=rhc,
            ref_rejected_hidden=rhr,
            ref_weight=rw,
            lm_head_bias=xs[3],
            ref_bias=rb,
            chunk_size=4,
            keep_bytes=keep_bytes,
            backend=be,
            **extra,
        )
        up = torch.tensor([1.0, 2.0, 0.5]) if upstream == "per_pair" else torch.full((3,), 0.7)
        (out[0] * up).sum().backward()
        got[be] = (out, [x.grad for x in xs])
        if be == "torch":
            assert used, "the PyTorch label-terms loop did not run"
            n_torch = len(used)
        else:
            assert len(used) == n_torch, "backend='core' ran the PyTorch loop"
    for i, (a, c) in enumerate(zip(got["torch"][0], got["core"][0])):
        _close(a, c, 2e-5, f"{fn_name} output {i}")
    for name, a, c in zip(("hc", "hr", "w", "b"), got["torch"][1], got["core"][1]):
        _close(a, c, 3e-5, f"{fn_name} grad {name}")


def test_token_logratio_and_kl_torch_backend_through_scope():
    """The per-side path (token_logratio_and_kl) takes the enclosing backend_scope."""
    (hc, _, w, b), (rhc, _, rw, rb), cl, _ = _pair_inputs()
    res = {}
    for be in ("torch", "core"):
        x = hc.clone().requires_grad_(True)
        with _token_head.backend_scope(be):
            lr, kl, mask = divkit.preference.token_logratio_and_kl(
                None,
                None,
                cl,
                policy_hidden=x,
                lm_head_weight=w,
                lm_head_bias=b,
                ref_hidden=rhc,
                ref_weight=rw,
                ref_bias=rb,
                chunk_size=5,
            )
        (lr.sum() + (kl * 0.3).sum()).backward()
        res[be] = (lr, kl, x.grad)
    for a, c, what in zip(res["torch"], res["core"], ("logratio", "kl", "grad")):
        _close(a, c, 3e-5, what)


def test_label_terms_torch_errors():
    hs, w, b, rh, rw, rb, labels = _heads(8, 4, 4, 11)
    bad = w.clone()
    bad[3, 0] = float("nan")
    with pytest.raises(divkit.Error, match="policy logits of token 0 are NaN"):
        torch_ops.fused_linear_label_terms(hs, bad, b, rh, rw, rb, labels, -100, 3, fn="t")
    rbad = rb.clone()
    rbad[:] = float("-inf")
    lab = labels.clone()
    lab[:5] = -100
    with pytest.raises(divkit.Error, match="reference logits of token 5 are NaN, \\+inf or all"):
        torch_ops.fused_linear_label_terms(hs, w, b, rh, rw, rbad, lab, -100, 3, fn="t")
    # Ignored tokens are never read.
    lab[:] = -100
    lp, ref_lp, kl, _, _ = torch_ops.fused_linear_label_terms(
        hs, w, b, rh, rw, rbad, lab, -100, 3, fn="t"
    )
    assert (lp == 0).all() and (ref_lp == 0).all() and (kl == 0).all()
    lab = labels.clone()
    lab[2] = 11
    with pytest.raises(divkit.Error, match="labels\\[2\\] = 11 is out of range"):
        torch_ops.fused_linear_label_terms(hs, w, b, rh, rw, rb, lab, -100, 3, fn="t")
    with pytest.raises(divkit.Error, match="ref_weight has 10 rows"):
        torch_ops.fused_linear_label_terms(hs, w, b, rh, rw[:10], rb, labels, -100, 3, fn="t")
    # A NaN / +inf bias entry is named by the argument and its index (-inf masks the entry).
    for bad_value in (float("nan"), float("inf")):
        for name in ("lm_head_bias", "ref_bias"):
            pb, prb = b.clone(), rb.clone()
            (pb if name == "lm_head_bias" else prb)[6] = bad_value
            with pytest.raises(divkit.Error, match=f"t: {name} contains NaN or \\+inf at index 6"):
                torch_ops.fused_linear_label_terms(hs, w, pb, rh, rw, prb, labels, -100, 3, fn="t")
    policy, (rhc, rhr, rw2, rb2), cl, rl = _pair_inputs()
    with pytest.raises(divkit.Error, match="tdpo_loss_fused.*backend"):
        divkit.tdpo_loss_fused(
            *policy[:3],
            cl,
            rl,
            ref_chosen_hidden=rhc,
            ref_rejected_hidden=rhr,
            ref_weight=rw2,
            backend="gpu",
        )


def test_token_head_engine_routing():
    cpu = torch.zeros(2, 3)
    meta = torch.zeros(2, 3, device="meta")
    assert _token_head.engine("f", [("x", cpu)], "auto") == "core"
    assert _token_head.engine("f", [("x", cpu)], "torch") == "torch"
    with _token_head.backend_scope("torch"):
        assert _token_head.engine("f", [("x", cpu)]) == "torch"
    assert _token_head.engine("f", [("x", cpu)]) == "core"
    with pytest.raises(divkit.Error, match="no kernel for device meta"):
        _token_head.engine("f", [("x", meta)], "core")
    with pytest.raises(divkit.Error, match="x is on meta but"):
        _token_head.engine("f", [("y", cpu), ("x", meta)], "auto")
    # The one pass takes tensors on one device; a meta tensor has no values.
    assert not _token_head.usable(meta, meta, None, meta, meta, None)
    assert _token_head.usable(cpu, cpu, None, cpu, cpu, None)
    assert not _token_head.usable(cpu, cpu, None, cpu.requires_grad_(), cpu, None)


class _Calls(list):
    on = True  # False: the plain PyTorch rows


@pytest.fixture
def kernel_kl_rows(monkeypatch):
    """backend="torch" calls of the one pass get divkit's divergence kernel as the KL row step
    (route.rows="core", as CUDA tensors under backend "auto" on a CUDA build), here the CPU
    kernel on CPU tensors; counts the kernel's row-step calls."""
    from divkit import _device

    real = _device.route
    calls = []

    def route(fn, op, backend_name, tensors):
        r = real(fn, op, backend_name, tensors)
        if backend_name == "torch" and op == "fused_linear_label_terms" and calls.on:
            return r._replace(rows="core")
        return r

    monkeypatch.setattr(_device, "route", route)
    calls = _Calls()
    real_div = torch_ops.CoreRows.divergence

    def div(self, *a, **k):
        calls.append(a[0].shape[0])
        return real_div(self, *a, **k)

    monkeypatch.setattr(torch_ops.CoreRows, "divergence", div)
    return calls


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_token_terms_kernel_kl_rows_match_torch_rows_and_core(case, kernel_kl_rows):
    n, h, hr, v, chunk, keep, ii, bias = case
    hs, w, b, rh, rw, rb, labels = _heads(n, h, hr, v, bias=bias, seed=3)
    labels[1::4] = ii
    assert _token_head.engine("t", [("x", hs)], "torch") == "torch_rows"
    got = {}
    for be in ("torch_rows", "torch", "core"):
        kernel_kl_rows.on = be == "torch_rows"
        xs = [x.clone().requires_grad_(True) if x is not None else None for x in (hs, w, b)]
        outs = _terms(
            "t", xs[0], xs[1], xs[2], rh, rw, rb, labels, ii, True, chunk, keep,
            "core" if be == "core" else "torch",
        )  # fmt: skip
        (outs[0].sum() + 0.5 * outs[2].sum()).backward()
        got[be] = (outs, [None if x is None else x.grad for x in xs])
        if be == "torch_rows":
            rows = chunk or n
            assert len(kernel_kl_rows) == (n + rows - 1) // rows and sum(kernel_kl_rows) == n
        kernel_kl_rows.clear()
    (lp_k, ref_k, kl_k), grads_k = got["torch_rows"]
    (lp_t, ref_t, kl_t), grads_t = got["torch"]
    # Only the KL rows changed route: the log-probabilities and the backward are the same ops.
    assert torch.equal(lp_k, lp_t) and torch.equal(ref_k, ref_t)
    for a, c in zip(grads_k, grads_t):
        assert (a is None and c is None) or torch.equal(a, c)
    _close(kl_k, kl_t, 2e-5, "kernel KL vs PyTorch KL")
    _close(kl_k, got["core"][0][2], 2e-5, "kernel KL vs core")
    assert (kl_k[labels == ii] == 0).all()
    r_kl = _reference(hs, w, b, rh, rw, rb, labels, ii)[2]
    _close(kl_k, r_kl, 2e-5, "kernel KL vs fp64")


def test_token_terms_kernel_kl_rows_only_for_fp32(kernel_kl_rows):
    # fp64 inputs keep the PyTorch rows in fp64 (the kernel computes in fp32), as the label rows.
    hs, w, b, rh, rw, rb, labels = _heads(9, 6, 4, 19, dtype=torch.float64)
    _terms("t", hs, w, b, rh, rw, rb, labels, -100, True, 4, None, "torch")
    assert kernel_kl_rows == []


def test_pair_loss_kernel_kl_rows_matches_core(kernel_kl_rows):
    policy, (rhc, rhr, rw, rb), cl, rl = _pair_inputs()
    got = {}
    for be in ("torch", "core"):
        xs = [x.clone().requires_grad_(True) for x in policy]
        out = divkit.tdpo_loss_fused(
            xs[0], xs[1], xs[2], cl, rl, ref_chosen_hidden=rhc, ref_rejected_hidden=rhr,
            ref_weight=rw, lm_head_bias=xs[3], ref_bias=rb, chunk_size=4, backend=be,
        )  # fmt: skip
        out[0].sum().backward()
        got[be] = (out, [x.grad for x in xs])
        assert bool(kernel_kl_rows) == (be == "torch"), be
        kernel_kl_rows.clear()
    for i, (a, c) in enumerate(zip(got["torch"][0], got["core"][0])):
        _close(a, c, 2e-5, f"tdpo output {i}")
    for name, a, c in zip(("hc", "hr", "w", "b"), got["torch"][1], got["core"][1]):
        _close(a, c, 3e-5, f"tdpo grad {name}")
