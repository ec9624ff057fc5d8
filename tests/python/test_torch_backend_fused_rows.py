"""The fused heads' PyTorch chunk loop with divkit's row kernel as its row step (the CUDA path of
the fused heads: torch GEMMs + divkit's row kernel on each chunk's logits), run here on CPU tensors
with the CPU kernel as the row step, against the C++ fused head: the same results to the
tolerances of test_torch_backend.py, through the public functions and autograd."""

from __future__ import annotations

import contextlib

import pytest
import torch

import divkit
from conftest import KIND_CASES, case_id, logits
from divkit import _device, cuda_checks
from divkit.backends import torch_ops
from test_fused_linear_masked_bias import MASKED, _ce_reference, _data
from test_torch_backend import compare, sparse_teacher


@pytest.fixture
def core_rows(monkeypatch):
    """backend="torch" calls get the chunk loop with the core's row step (route.rows="core"),
    as CUDA tensors do on a CUDA build; counts the row-step calls."""
    real = _device.route
    calls = []

    def route(fn, op, backend_name, tensors):
        r = real(fn, op, backend_name, tensors)
        if backend_name == "torch" and op in _device.CORE_ROWS:
            calls.append(op)
            return r._replace(rows="core")
        return r

    monkeypatch.setattr(_device, "route", route)
    real_div = torch_ops.CoreRows.divergence
    real_sparse = torch_ops.CoreRows.sparse

    def div(self, *a, **k):
        calls.append("core_divergence")
        return real_div(self, *a, **k)

    def sparse(self, *a, **k):
        calls.append("core_sparse")
        return real_sparse(self, *a, **k)

    monkeypatch.setattr(torch_ops.CoreRows, "divergence", div)
    monkeypatch.setattr(torch_ops.CoreRows, "sparse", sparse)
    real_label = torch_ops._label_rows

    def label(*a, **k):
        calls.append("core_label")
        return real_label(*a, **k)

    monkeypatch.setattr(torch_ops, "_label_rows", label)
    return calls


def _distill(backend, base, kind, params, labels, weights, hard_weight, reduction, grad_teacher):
    xs = [x.clone().requires_grad_(grad_teacher or i < 3) for i, x in enumerate(base)]
    loss = divkit.fused_linear_divergence(
        xs[0],
        xs[1],
        xs[2],
        xs[3],
        kind,
        student_bias=xs[4],
        teacher_bias=xs[5],
        labels=labels,
        weights=weights,
        hard_weight=hard_weight,
        reduction=reduction,
        chunk_size=4,  # chunks of 4, 4 and 3 tokens
        temperature=1.5,
        backend=backend,
        **params,
    )
    go = torch.rand(loss.shape, generator=torch.Generator().manual_seed(47))
    loss.backward(go)
    return (loss.detach(), *[x.grad for x in xs])


@pytest.mark.parametrize("case", KIND_CASES, ids=case_id)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("hard_weight", [0.0, 0.5])
@pytest.mark.parametrize("grad_teacher", [False, True])
def test_fused_linear_divergence_core_rows(core_rows, case, reduction, hard_weight, grad_teacher):
    kind, params = case
    n, hs, ht, v = 11, 8, 6, 37
    base = [
        logits(n, hs, seed=40, scale=1.0),
        logits(v, hs, seed=41, scale=0.5),
        logits(n, ht, seed=42, scale=1.0),
        logits(v, ht, seed=43, scale=0.5),
        logits(v, seed=44, scale=0.5),
        logits(v, seed=45, scale=0.5),
    ]
    labels = torch.arange(n) * 3 % v
    labels[4] = -100
    weights = torch.rand(n, generator=torch.Generator().manual_seed(46)) + 0.5
    args = (base, kind, params, labels, weights, hard_weight, reduction, grad_teacher)
    core = _distill("core", *args)
    loop = _distill("torch", *args)
    assert "core_divergence" in core_rows  # the loop ran with the core's row step
    compare(core, loop)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_linear_divergence_core_rows_low_precision(core_rows, dtype):
    n, h, v = 9, 8, 37
    base = [
        logits(n, h, seed=70, scale=1.0).to(dtype),
        logits(v, h, seed=71, scale=0.5).to(dtype),
        logits(n, h, seed=72, scale=1.0).to(dtype),
        logits(v, h, seed=73, scale=0.5).to(dtype),
        None,
        None,
    ]
    out = []
    for backend in ("core", "torch"):
        xs = [None if x is None else x.clone().requires_grad_(True) for x in base[:4]]
        loss = divkit.fused_linear_divergence(*xs, "jsd", beta=0.3, chunk_size=4, backend=backend)
        loss.backward()
        out.append((loss.detach(), *[x.grad for x in xs]))
    assert "core_divergence" in core_rows
    compare(out[0], out[1])


@pytest.mark.parametrize("case", KIND_CASES[:4], ids=case_id)
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("hard_weight", [0.0, 0.5])
def test_fused_linear_sparse_divergence_core_rows(core_rows, case, tail, hard_weight):
    kind, params = case
    n, h, v = 13, 8, 37
    base = [
        logits(n, h, seed=60, scale=1.0),
        logits(v, h, seed=61, scale=1.0),
        logits(v, seed=62, scale=1.0),
    ]
    idx, lp = sparse_teacher(n, v, 5, seed=63)
    labels = torch.arange(n) * 3 % v
    labels[3] = -100
    weights = torch.rand(n, generator=torch.Generator().manual_seed(64)) + 0.5
    out = []
    for backend in ("core", "torch"):
        xs = [x.clone().requires_grad_(True) for x in base]
        loss = divkit.fused_linear_sparse_divergence(
            xs[0],
            xs[1],
            idx,
            lp,
            kind,
            tail=tail,
            student_bias=xs[2],
            labels=labels,
            weights=weights,
            hard_weight=hard_weight,
            chunk_size=4,
            temperature=1.5,
            backend=backend,
            **params,
        )
        loss.backward()
        out.append((loss.detach(), *[x.grad for x in xs]))
    assert "core_sparse" in core_rows
    compare(out[0], out[1])


def test_core_rows_errors_name_the_fused_function(core_rows):
    n, h, v = 4, 3, 5
    sh = logits(n, h, seed=1).requires_grad_(True)
    sw = logits(v, h, seed=2)
    tw = logits(v, h, seed=3)
    tw[2, 0] = float("nan")
    with pytest.raises(divkit.Error, match="^fused_linear_divergence: "):
        divkit.fused_linear_divergence(sh, sw, sh.detach(), tw, backend="torch")


def test_route_picks_core_rows_only_on_cuda_builds_with_the_kernel(monkeypatch):
    # The CPU route is unchanged; on CUDA (faked here: no GPU needed to decide) the fused heads
    # get the core's rows only when the build has the row kernel, and backend="torch" never.
    cpu = _device.route("fused_linear_divergence", "fused_linear_divergence", "auto", ())
    assert cpu.core and cpu.rows == "torch"
    x = torch.empty(1, device="meta")
    monkeypatch.setattr(_device, "cuda_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda dev: type("S", (), {"cuda_stream": 7}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    class FakeCuda:
        device = torch.device("cuda", 0)

    monkeypatch.setattr(_device, "common_device", lambda fn, ts: FakeCuda.device)
    for op, kernels, want in [
        ("fused_linear_divergence", ["divergence"], ("torch", "core", 7)),
        ("fused_linear_divergence", [], ("torch", "torch", None)),
        ("fused_linear_sparse_divergence", ["divergence"], ("torch", "torch", None)),
        ("fused_linear_sparse_divergence", ["sparse_divergence"], ("torch", "core", 7)),
        ("fused_linear_cross_entropy", ["divergence"], ("torch", "torch", None)),
        ("fused_linear_cross_entropy", ["label_rows"], ("torch", "core", 7)),
        ("fused_linear_logprobs", ["label_rows"], ("torch", "core", 7)),
        ("fused_linear_logprobs", ["divergence"], ("torch", "torch", None)),
        ("divergence", ["divergence"], ("core", "torch", 7)),
    ]:
        monkeypatch.setattr(_device, "has_cuda_kernel", lambda o, k=kernels: o in k)
        r = _device.route(op, op, "auto", (("x", x),))
        assert (r.engine, r.rows, r.stream) == want, op
        r = _device.route(op, op, "torch", (("x", x),))
        assert (r.engine, r.rows) == ("torch", "torch")


# The label heads: the chunk loop with divkit's label-row kernel (_C.label_rows, the CPU one
# here) as its row step, against the C++ heads.


def _ce_inputs(n=13, h=8, v=41, seed=60):
    base = [
        logits(n, h, seed=seed),
        logits(v, h, seed=seed + 1, scale=0.5),
        logits(v, seed=seed + 2),
    ]
    labels = torch.arange(n) * 7 % v
    labels[2] = -100
    labels[9] = -100
    return base, labels


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps,zsq,softcap", [(0.0, 0.0, None), (0.1, 1e-3, None), (0.2, 0.0, 3.0)])
@pytest.mark.parametrize("return_stats", [False, True])
def test_fused_linear_cross_entropy_core_rows(
    core_rows, reduction, eps, zsq, softcap, return_stats
):
    base, labels = _ce_inputs()
    out = []
    for backend in ("core", "torch"):
        xs = [x.clone().requires_grad_(True) for x in base]
        res = divkit.fused_linear_cross_entropy(
            xs[0],
            xs[1],
            labels,
            bias=xs[2],
            label_smoothing=eps,
            lse_square_scale=zsq,
            softcap=softcap,
            reduction=reduction,
            chunk_size=4,
            return_stats=return_stats,
            backend=backend,
        )
        loss = res[0] if return_stats else res
        go = torch.rand(loss.shape, generator=torch.Generator().manual_seed(61))
        loss.backward(go)
        stats = [x.detach() for x in res[1:]] if return_stats else []
        out.append((loss.detach(), *[x.grad for x in xs], *stats))
    assert "core_label" in core_rows
    compare(out[0], out[1])


@pytest.mark.parametrize(
    "opts",
    [
        {"label_smoothing": 0.1},
        {"label_smoothing": 0.2, "softcap": 3.0, "return_stats": True},
        {"label_smoothing": 0.1, "lse_square_scale": 1e-2, "reduction": "none"},
        {"label_smoothing": 0.3, "softcap": 8.0, "reduction": "sum"},
    ],
)
@pytest.mark.parametrize("deferred", [False, True])
def test_fused_linear_cross_entropy_core_rows_masked_smoothing(
    core_rows, monkeypatch, opts, deferred
):
    # Label smoothing with -inf bias entries (masked vocabulary rows) on the kernel's rows: the
    # kernel spreads eps over the V' = V - 3 unmasked entries (smooth_unmasked) in every chunk
    # (no PyTorch rows, inside deferred_checks too), and matches the C++ head and a float64
    # reference over the unmasked entries only.
    kw = []
    real = torch_ops._label_rows

    def spy(*a, **k):
        kw.append(k)
        return real(*a, **k)

    monkeypatch.setattr(torch_ops, "_label_rows", spy)
    x, w, b, lab = _data(n=13, seed=21)  # lab[2] is ignore_index
    x = x * 2
    out = {}
    for backend in ("core", "torch"):
        xs = [t.clone().requires_grad_(True) for t in (x, w, b)]
        with cuda_checks.deferred_checks() if deferred else contextlib.nullcontext():
            res = divkit.fused_linear_cross_entropy(
                xs[0], xs[1], lab, bias=xs[2], chunk_size=4, backend=backend, **opts
            )
        res = res if isinstance(res, tuple) else (res,)
        (0.3 * res[0].double()).sum().backward()
        out[backend] = ([r.detach() for r in res], [t.grad for t in xs])
    # Every chunk (4 of 13 tokens) of each pass takes the kernel's rows (reduction="none": a
    # forward pass, then a pass weighted by the upstream gradient).
    assert len(kw) == (8 if opts.get("reduction") == "none" else 4)
    assert all(k["smooth_unmasked"] for k in kw)
    compare(
        (*out["core"][0], *out["core"][1]),
        (*out["torch"][0], *out["torch"][1]),
    )
    want, want_g = _ce_reference(
        x,
        w,
        b,
        lab,
        opts.get("softcap"),
        zsq=opts.get("lse_square_scale", 0.0),
        reduction=opts.get("reduction", "mean"),
        stats=opts.get("return_stats", False),
        eps=opts["label_smoothing"],
    )
    outs, grads = out["torch"]
    assert torch.isfinite(outs[0]).all()
    for k, (o, r) in enumerate(zip(outs, want)):
        r = r.reshape(o.shape)
        err = float((o.double() - r).abs().max())
        assert err <= 1e-5 * (1.0 + float(r.abs().max())), f"output {k}: {err:.3g}"
    for k, (g, r) in enumerate(zip(grads, want_g)):
        err = float((g.double() - r).abs().max())
        assert err <= 1e-5 * float(r.abs().max()), f"gradient {k}: {err:.3g}"
    # The masked rows of the weight and bias take exactly no gradient.
    assert torch.equal(grads[2][list(MASKED)], torch.zeros(len(MASKED)))
    assert torch.equal(grads[1][list(MASKED)], torch.zeros(len(MASKED), x.shape[1]))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("return_entropy", [False, True])
@pytest.mark.parametrize("topk", [None, 3])
def test_fused_linear_logprobs_core_rows(core_rows, temperature, return_entropy, topk):
    base, labels = _ce_inputs(seed=62)
    # Entries 0 and 7 tie as every token's maximum: token 0 (label 0) is top-1, token 1 (label
    # 7, tied with the earlier entry 0) is not.
    base[2][7] += 20.0
    base[1][0], base[2][0] = base[1][7], base[2][7]
    out = []
    for backend in ("core", "torch"):
        xs = [x.clone().requires_grad_(True) for x in base]
        r = divkit.fused_linear_logprobs(
            xs[0],
            xs[1],
            labels,
            bias=xs[2],
            temperature=temperature,
            return_entropy=return_entropy,
            topk=topk,
            chunk_size=4,
            return_log_sum_sq_probs=True,
            return_is_top1=True,
            backend=backend,
        )
        g = torch.Generator().manual_seed(63)
        loss = (r.logprobs * torch.rand(r.logprobs.shape, generator=g)).sum()
        if return_entropy:
            loss = loss + (r.entropy * torch.rand(r.entropy.shape, generator=g)).sum()
        loss.backward()
        extra = [x.detach() for x in (r.topk_mass, r.log_sum_sq_probs) if x is not None]
        out.append((r.logprobs.detach(), *[x.grad for x in xs], *extra, r.is_top1))
    assert core_rows.count("core_label") >= 2  # forward and backward
    assert torch.equal(out[0][-1], out[1][-1])
    assert bool(out[0][-1][0]) and not bool(out[0][-1][1])
    compare(out[0][:-1], out[1][:-1])


def test_label_core_rows_errors_and_fp64(core_rows):
    base, labels = _ce_inputs(seed=64)
    # A finite hidden state whose logits overflow to +-inf (a NaN one is rejected before the
    # chunk loop, naming hidden), so that the row kernel's error path is the one taken.
    base[0][6, 0] = 3e38
    with pytest.raises(divkit.Error, match="^fused_linear_cross_entropy: the logits of token 6 "):
        divkit.fused_linear_cross_entropy(base[0], base[1], labels, chunk_size=4, backend="torch")
    with pytest.raises(divkit.Error, match="^fused_linear_logprobs: the logits of token 6 "):
        divkit.fused_linear_logprobs(base[0], base[1], labels, chunk_size=4, backend="torch")
    # fp64 inputs keep the PyTorch rows (in fp64).
    base, labels = _ce_inputs(seed=65)
    calls = len(core_rows)
    divkit.fused_linear_cross_entropy(
        base[0].double(), base[1].double(), labels, chunk_size=4, backend="torch"
    )
    assert "core_label" not in core_rows[calls:]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op", ["divergence", "cross_entropy", "logprobs"])
def test_low_precision_gemms_path(monkeypatch, op, dtype):
    # The CUDA GEMM path of _Head (bf16/fp16 operands kept, fp32 output and accumulation), forced
    # on CPU tensors: torch's CPU GEMMs have no out_dtype, so the products are rounded here
    # (the fallback _mm_f32 takes where out_dtype is missing): bf16-level agreement with the core.
    real_init = torch_ops._Head.__init__
    lows = []

    def init(self, h, w, b, dt):
        real_init(self, h, w, b, dt)
        if h.dtype == w.dtype == dtype and dt == torch.float32:
            self.low, self.w = True, w
            lows.append(True)

    monkeypatch.setattr(torch_ops._Head, "__init__", init)
    n, h, v = 10, 16, 37
    gen = torch.Generator().manual_seed(80)
    base = [
        torch.randn(n, h, generator=gen).to(dtype),
        (0.3 * torch.randn(v, h, generator=gen)).to(dtype),
        torch.randn(n, h, generator=gen).to(dtype),
        (0.3 * torch.randn(v, h, generator=gen)).to(dtype),
    ]
    labels = torch.arange(n) * 3 % v
    out = []
    for backend in ("core", "torch"):
        xs = [x.clone().requires_grad_(True) for x in base]
        if op == "divergence":
            loss = divkit.fused_linear_divergence(
                *xs, "jsd", labels=labels, hard_weight=0.5, chunk_size=4, backend=backend
            )
            grads = xs
        elif op == "cross_entropy":
            loss = divkit.fused_linear_cross_entropy(
                xs[0], xs[1], labels, chunk_size=4, backend=backend
            )
            grads = xs[:2]
        else:
            loss = divkit.fused_linear_logprobs(
                xs[0], xs[1], labels, chunk_size=4, backend=backend
            ).sum()
            grads = xs[:2]
        loss.backward()
        out.append((loss.detach().double(), [x.grad.double() for x in grads if x.grad is not None]))
    assert lows  # the forced path ran
    (lc, gc), (lt, gt) = out
    assert abs(float(lt - lc)) <= 2e-2 * max(1.0, abs(float(lc)))
    assert len(gc) == len(gt)
    for a, b in zip(gt, gc):
        assert float((a - b).abs().max()) <= 3e-2 * float(b.abs().max())


def test_fp16_logit_gradient_is_scaled_not_flushed():
    # A mean over many tokens gives logit gradients ~1 / (N V), below fp16's smallest normal:
    # the fp16 GEMM path scales each chunk by a power of two before rounding.
    gen = torch.Generator().manual_seed(81)
    h = torch.randn(6, 16, generator=gen).half()
    w = (0.3 * torch.randn(50, 16, generator=gen)).half()
    head = torch_ops._Head(h, w, None, torch.float32)
    head.low, head.w = True, w  # the CUDA path, forced
    dz = torch.randn(6, 50, generator=gen) * 1e-9
    hc = head.rows(0, 6)
    lo, inv = head._low_grad(dz)
    assert lo.dtype == torch.float16 and float(lo.abs().max()) > 2.0**9
    assert float((lo.float() * inv - dz).abs().max()) <= 2.0**-10 * float(dz.abs().max())
    gh = head.grad_hidden(dz)
    want = dz.double() @ w.double()
    assert float((gh.double() - want).abs().max()) <= 2e-2 * float(want.abs().max())
    acc = torch.zeros(50, 16)
    head.add_grad_weight(acc, dz, hc)
    want = dz.double().T @ h.double()
    assert float((acc.double() - want).abs().max()) <= 2e-2 * float(want.abs().max())
    # Unscaled, the same gradient would have flushed to zero in fp16.
    assert float(dz.half().abs().max()) == 0.0
