"""The C++ core's CUDA chunk loops (src/fused_linear/label_loop_cuda.cu and
distill_loop_cuda.cu, the device GEMMs of head_cuda.cu over cuBLAS) called through ``_C`` with CUDA
tensors, against the same ``_C`` call on CPU tensors: loss, statistics and gradients of
fused_linear_cross_entropy, fused_linear_logprobs and its backward (fp32, bf16, fp16 heads) and
fused_linear_divergence (soft and hard terms, teacher gradients) and fused_linear_sparse_divergence
(both tails); two runs bitwise equal; the
errors read after the call and ``check_finite=False``. The public Python functions do not take
this loop yet (their CUDA route is the PyTorch chunk loop of torch_ops); these tests are what
verifies it on a GPU.

Runs under pytest or tests/gpu/mini_pytest.py (no fixtures, no ids)."""

import pytest
import torch

import divkit
from divkit import _C

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not _C.cuda_built(),
    reason="no CUDA device, or a build without CUDA",
)

N, H, V = 37, 64, 1000


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).to(dtype)
    w = (torch.randn(V, H, generator=g) / H**0.5).to(dtype)
    b = (0.3 * torch.randn(V, generator=g)).float()
    labels = torch.randint(0, V, (N,), generator=g)
    labels[2] = -100
    weights = torch.rand(N, generator=g) + 0.5
    return h, w, b, labels, weights


def _options(device, **kw):
    o = _C.FusedLinearOptions()
    o.chunk_size = 8
    for k, v in kw.items():
        setattr(o, k, v)
    if device == "cuda":
        o.stream = torch.cuda.current_stream().cuda_stream
    return o


def _ce(device, dtype, reduction="mean", **kw):
    h, w, b, labels, weights = (x.to(device) for x in _inputs(dtype))
    n_loss = N if reduction == "none" else 1
    loss = torch.empty(n_loss, dtype=torch.float64, device=device)
    grads = tuple(torch.empty_like(x, dtype=torch.float32) for x in (h, w, b))
    stats = tuple(torch.empty(N, dtype=torch.float64, device=device) for _ in range(4))
    opts = _options(device, reduction=reduction, topk=5, **kw)
    _C.fused_linear_cross_entropy((h, w, b), labels, weights, opts, loss, grads, stats)
    if device == "cuda":
        torch.cuda.synchronize()
    return [t.cpu() for t in (loss, *grads, *stats)]


def _close(got, want, rtol, what):
    for i, (g, w) in enumerate(zip(got, want)):
        scale = w.abs().max().item() + 1e-30
        err = (g.double() - w.double()).abs().max().item()
        assert err <= rtol * scale, f"{what}[{i}]: max error {err:g} (scale {scale:g})"


def test_cross_entropy_matches_the_cpu():
    for dtype, rtol in ((torch.float32, 2e-5), (torch.bfloat16, 2e-2), (torch.float16, 4e-3)):
        for kw in ({}, {"label_smoothing": 0.1, "z_loss_scale": 1e-3, "softcap": 20.0}):
            for reduction in ("mean", "none"):
                cpu = _ce("cpu", dtype, reduction, **kw)
                gpu = _ce("cuda", dtype, reduction, **kw)
                _close(gpu[:1] + gpu[4:8], cpu[:1] + cpu[4:8], 2e-5, f"{dtype} {kw} stats")
                _close(gpu[1:4], cpu[1:4], rtol, f"{dtype} {kw} grads")
                again = _ce("cuda", dtype, reduction, **kw)
                for a, b in zip(gpu, again):
                    assert torch.equal(a, b), "two runs differ"


def test_logprobs_and_backward_match_the_cpu():
    for dtype, rtol in ((torch.float32, 2e-5), (torch.bfloat16, 2e-2)):
        out = {}
        for device in ("cpu", "cuda"):
            h, w, b, labels, _ = (x.to(device) for x in _inputs(dtype, seed=1))
            stats = tuple(torch.empty(N, dtype=torch.float32, device=device) for _ in range(4))
            opts = _options(device, temperature=0.7, topk=3)
            _C.fused_linear_logprobs((h, w, b), labels, opts, stats, None)
            g = torch.randn(N, generator=torch.Generator().manual_seed(2)).double().to(device)
            ge = 0.5 * g.flip(0)
            grads = tuple(torch.empty_like(x, dtype=torch.float32) for x in (h, w, b))
            _C.fused_linear_logprobs_backward((h, w, b), labels, opts, g, ge, grads)
            out[device] = [t.cpu() for t in (*stats, *grads)]
        _close(out["cuda"][:4], out["cpu"][:4], 2e-5, f"{dtype} logprobs stats")
        _close(out["cuda"][4:], out["cpu"][4:], rtol, f"{dtype} logprobs grads")


def test_errors_after_the_call_and_check_finite_off():
    h, w, b, labels, weights = (x.cuda() for x in _inputs(torch.float32))
    loss = torch.empty(1, dtype=torch.float64, device="cuda")
    bad = labels.clone()
    bad[4] = V
    with pytest.raises(divkit.Error, match=r"labels\[4\] = 1000 is out of range"):
        _C.fused_linear_cross_entropy(
            (h, w, b), bad, None, _options("cuda"), loss, (None, None, None), (None,) * 4
        )
    h2 = h.clone()
    h2[5, 0] = float("inf")
    with pytest.raises(divkit.Error, match="the logits of token 5"):
        _C.fused_linear_cross_entropy(
            (h2, w, b), labels, None, _options("cuda"), loss, (None, None, None), (None,) * 4
        )
    _C.fused_linear_cross_entropy(
        (h2, w, b),
        labels,
        None,
        _options("cuda", check_finite=False),
        loss,
        (None,) * 3,
        (None,) * 4,
    )
    torch.cuda.synchronize()
    assert torch.isnan(loss).all()


def _distill(device, dtype, kind, hard_weight=0.0, reduction="mean", **kw):
    g = torch.Generator().manual_seed(5)
    sh, th = torch.randn(N, H, generator=g), torch.randn(N, H + 16, generator=g)
    sw = torch.randn(V, H, generator=g) / H**0.5
    tw = torch.randn(V, H + 16, generator=g) / (H + 16) ** 0.5
    sb, tb = 0.3 * torch.randn(V, generator=g), 0.3 * torch.randn(V, generator=g)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[3] = -100
    student = (sh.to(dtype).to(device), sw.to(dtype).to(device), sb.to(device))
    teacher = (th.to(dtype).to(device), tw.to(dtype).to(device), tb.to(device))
    loss = torch.empty(N if reduction == "none" else 1, dtype=torch.float64, device=device)
    gs = tuple(torch.empty_like(x, dtype=torch.float32) for x in student)
    gt = tuple(torch.empty_like(x, dtype=torch.float32) for x in teacher)
    opts = _options(device, kind=kind, reduction=reduction, hard_weight=hard_weight, **kw)
    _C.fused_linear_divergence(student, teacher, labels.to(device), None, None, opts, loss, gs, gt)
    if device == "cuda":
        torch.cuda.synchronize()
    return [t.cpu() for t in (loss, *gs, *gt)]


def test_fused_linear_divergence_matches_the_cpu():
    for kind in ("forward_kl", "reverse_kl", "jsd", "alpha_divergence"):
        for dtype, rtol in ((torch.float32, 2e-5), (torch.bfloat16, 2e-2)):
            for hard in (0.0, 0.5):
                cpu = _distill("cpu", dtype, kind, hard, temperature=2.0, beta=0.3, alpha=0.7)
                gpu = _distill("cuda", dtype, kind, hard, temperature=2.0, beta=0.3, alpha=0.7)
                _close(gpu[:1], cpu[:1], 2e-5, f"{kind} {dtype} hard {hard} loss")
                _close(gpu[1:], cpu[1:], rtol, f"{kind} {dtype} hard {hard} grads")
                again = _distill("cuda", dtype, kind, hard, temperature=2.0, beta=0.3, alpha=0.7)
                for a, b in zip(gpu, again):
                    assert torch.equal(a, b), "two runs differ"


def _sparse(device, tail, hard_weight=0.0):
    g = torch.Generator().manual_seed(6)
    sh = torch.randn(N, H, generator=g)
    sw = torch.randn(V, H, generator=g) / H**0.5
    sb = 0.3 * torch.randn(V, generator=g)
    teacher = torch.log_softmax(2 * torch.randn(N, V, generator=g), -1)
    lp, idx = teacher.topk(8, dim=-1)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[3] = -100
    student = tuple(x.to(device) for x in (sh, sw, sb))
    loss = torch.empty(1, dtype=torch.float64, device=device)
    gs = tuple(torch.empty_like(x) for x in student)
    opts = _options(device, kind="forward_kl", tail=tail, hard_weight=hard_weight)
    _C.fused_linear_sparse_divergence(
        student, idx.to(device), lp.double().to(device), labels.to(device), None, opts, loss, gs
    )
    if device == "cuda":
        torch.cuda.synchronize()
    return [t.cpu() for t in (loss, *gs)]


def test_fused_linear_sparse_divergence_matches_the_cpu():
    for tail in ("bucket", "renormalize"):
        for hard in (0.0, 0.5):
            cpu, gpu = _sparse("cpu", tail, hard), _sparse("cuda", tail, hard)
            _close(gpu, cpu, 2e-5, f"sparse {tail} hard {hard}")
            again = _sparse("cuda", tail, hard)
            for a, b in zip(gpu, again):
                assert torch.equal(a, b), "two runs differ"
