"""The CUDA kernels of sparse_divergence and topk_divergence against the CPU kernels and an fp64
reference; two runs bitwise equal; in place; streams; check_finite=False (no host read).

Calls divkit._C directly (the DivergenceArgs form with `stream`), so that the test covers the
C++ dispatch whatever the Python layer chooses; one test goes through the public functions.
"""

import pytest
import torch

import divkit
from divkit import _C


def _skip_reason():
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not _C.cuda_built():
        return "divkit was built without CUDA"
    return ""


pytestmark = pytest.mark.skipif(bool(_skip_reason()), reason=_skip_reason() or "GPU ready")

KINDS = list(_C.kinds())
PARAMS = {"jsd": {"beta": 0.3}, "alpha_divergence": {"alpha": 0.7}, "renyi": {"alpha": 1.6}}
REDUCTIONS = ["none", "sum", "mean", "batchmean"]


def _args(kind, reduction="mean", stream=0, **kw):
    a = dict(kind=kind, reduction=reduction, stream=stream, temperature=1.3)
    a.update(PARAMS.get(kind, {"alpha": 0.2}))
    a.update(kw)
    return _C.DivergenceArgs(**a)


def _loss(n, args, device):
    return torch.zeros(n if args.reduction == "none" else 1, dtype=torch.float32, device=device)


def _sparse(s, idx, lp, tail, args, labels=None, weights=None, grad_dtype=None):
    loss = _loss(s.shape[0], args, s.device)
    gs = torch.empty_like(s, dtype=grad_dtype or s.dtype)
    _C.sparse_divergence(s, idx, lp, loss, gs, labels, weights, tail, args)
    return loss, gs


def _topk(s, t, k, args, labels=None, weights=None, grad_dtype=None):
    loss = _loss(s.shape[0], args, s.device)
    gs = torch.empty_like(s, dtype=grad_dtype or s.dtype)
    _C.topk_divergence(s, t, k, loss, gs, labels, weights, args)
    return loss, gs


def _teacher(n, v, k, seed=0, lp_dtype=torch.float32, idx_dtype=torch.int64):
    """Top-k indices (distinct per row) and log-probabilities of a softmax over V."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=g, dtype=torch.float64) * 1.5
    lp_full = torch.log_softmax(logits, -1)
    lp, idx = lp_full.topk(k, dim=-1)
    perm = torch.stack([torch.randperm(k, generator=g) for _ in range(n)])  # unsorted columns
    return idx.gather(1, perm).to(idx_dtype), lp.gather(1, perm).to(lp_dtype)


def _student(n, v, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g) * 2).to(dtype)


def _close(dev, cpu, dtype):
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    for a, b in zip(cpu, dev):
        torch.testing.assert_close(b.cpu().float(), a.float(), rtol=tol, atol=tol * 1e-2)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_sparse_matches_cpu(kind, dtype, tail):
    n, v, k = 7, 1000, 20
    s = _student(n, v, dtype)
    idx, lp = _teacher(n, v, k)
    labels = torch.tensor([1, -100, 3, 4, -100, 6, 7])
    weights = torch.linspace(0.5, 2.0, n)
    for reduction in REDUCTIONS:
        args = _args(kind, reduction)
        cpu = _sparse(s, idx, lp, tail, args, labels, weights)
        dev = _sparse(s.cuda(), idx.cuda(), lp.cuda(), tail, args, labels.cuda(), weights.cuda())
        _close(dev, cpu, dtype)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_topk_matches_cpu(kind, dtype):
    n, v, k = 6, 1500, 33
    s = _student(n, v, dtype)
    g = torch.Generator().manual_seed(5)
    # Quarter steps: ties in the selection, which go to the lower index on both.
    t = (torch.round(torch.randn(n, v, generator=g) * 8) / 4).to(dtype)
    t[2, :700] = float("-inf")  # -inf teacher logits are masked entries
    labels = torch.tensor([1, 2, 3, -100, 5, 6], dtype=torch.int32)  # row 2 (-inf) counts
    weights = torch.linspace(0.5, 2.0, n, dtype=torch.float64)
    for reduction in REDUCTIONS:
        args = _args(kind, reduction)
        cpu = _topk(s, t, k, args, labels, weights)
        dev = _topk(s.cuda(), t.cuda(), k, args, labels.cuda(), weights.cuda())
        _close(dev, cpu, dtype)


@pytest.mark.parametrize("v,k", [(1, 1), (5, 5), (33, 32), (4097, 1), (4097, 300), (128256, 64)])
def test_shapes(v, k):
    """k = V (bucket is renormalize), k = 1, V not a multiple of anything, a real vocabulary."""
    n = 3
    s = _student(n, v, torch.bfloat16, seed=v)
    idx, lp = _teacher(n, v, k, seed=k, idx_dtype=torch.int32)
    t = _student(n, v, torch.float32, seed=v + 1)
    for tail in ["bucket", "renormalize"]:
        args = _args("jsd", "sum")
        _close(
            _sparse(s.cuda(), idx.cuda(), lp.cuda(), tail, args),
            _sparse(s, idx, lp, tail, args),
            torch.bfloat16,
        )
    args = _args("forward_kl", "sum")
    _close(_topk(s.cuda(), t.cuda(), k, args), _topk(s, t, k, args), torch.bfloat16)


def _fp64_sparse(s, idx, lp, T, bucket):
    """forward KL over the k (+ tail) buckets in fp64, and its student gradient."""
    s64 = s.double().requires_grad_()
    lq_full = torch.log_softmax(s64 / T, -1)
    lq = lq_full.gather(1, idx.long())
    lp = lp.double()
    if bucket:
        p_tail = (1 - lp.exp().sum(-1)).clamp_min(0)
        q_tail = (1 - lq.exp().sum(-1)).clamp_min(1e-300)
        row = (lp.exp() * (lp - lq)).sum(-1) + torch.where(
            p_tail > 0, p_tail * (p_tail.log() - q_tail.log()), torch.zeros_like(p_tail)
        )
    else:
        lp = lp - torch.logsumexp(lp, -1, keepdim=True)
        lq = lq - torch.logsumexp(lq, -1, keepdim=True)
        row = (lp.exp() * (lp - lq)).sum(-1)
    row.mean().backward()
    return row.mean().item(), s64.grad


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_fp32_against_fp64(tail):
    n, v, k, T = 5, 4096, 50, 1.3
    s = _student(n, v, torch.float32, seed=9)
    idx, lp = _teacher(n, v, k, seed=9, lp_dtype=torch.float64)
    ref, ref_grad = _fp64_sparse(s, idx, lp, T, tail == "bucket")
    loss, gs = _sparse(s.cuda(), idx.cuda(), lp.cuda(), tail, _args("forward_kl", temperature=T))
    assert abs(loss.item() - ref) <= 1e-5 * abs(ref) + 1e-7
    err = (gs.cpu().double() - ref_grad).abs().max().item()
    assert err <= 1e-5 * ref_grad.abs().max().item() + 1e-9


def _bits(x):
    return x.view(torch.uint8) if x.dtype != torch.float32 else x


@pytest.mark.parametrize("kind", KINDS)
def test_two_runs_same_bits(kind):
    n, v, k = 64, 5000, 40
    s = _student(n, v, torch.bfloat16, seed=2).cuda()
    idx, lp = _teacher(n, v, k, seed=2)
    idx, lp = idx.cuda(), lp.cuda()
    t = _student(n, v, torch.bfloat16, seed=3).cuda()
    for run in [
        lambda: _sparse(s, idx, lp, "bucket", _args(kind, "sum")),
        lambda: _sparse(s, idx, lp, "renormalize", _args(kind, "none")),
        lambda: _topk(s, t, k, _args(kind, "sum")),
    ]:
        a, b = run(), run()
        for x, y in zip(a, b):
            assert torch.equal(_bits(x), _bits(y))


def test_inplace_and_stream():
    n, v, k = 9, 3000, 16
    s = _student(n, v, torch.float32, seed=3)
    idx, lp = _teacher(n, v, k, seed=3)
    ref = _sparse(s.cuda(), idx.cuda(), lp.cuda(), "bucket", _args("jsd"))
    stream = torch.cuda.Stream()
    sc, ic, lc = s.cuda(), idx.cuda(), lp.cuda()
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        loss = torch.zeros(1, device="cuda")
        args = _args("jsd", stream=stream.cuda_stream)
        _C.sparse_divergence(sc, ic, lc, loss, sc, None, None, "bucket", args)
    stream.synchronize()
    assert torch.equal(loss, ref[0])
    assert torch.equal(sc, ref[1])
    t = _student(n, v, torch.float32, seed=4).cuda()
    ref = _topk(s.cuda(), t, k, _args("reverse_kl"))
    sc = s.cuda()
    loss = torch.zeros(1, device="cuda")
    _C.topk_divergence(sc, t, k, loss, sc, None, None, _args("reverse_kl"))
    assert torch.equal(loss, ref[0]) and torch.equal(sc, ref[1])


def test_errors_match_cpu():
    n, v, k = 4, 100, 5
    s = _student(n, v, torch.float32)
    idx, lp = _teacher(n, v, k)
    bad_idx = idx.clone()
    bad_idx[2, 3] = bad_idx[2, 1]  # a repeated index at row 2
    bad_lp = lp.clone()
    bad_lp[1, 0] = 0.5  # a logit, not a log-probability, at row 1
    nan_s = s.clone()
    nan_s[3, 7] = float("nan")
    cases = [(s, bad_idx, lp), (s, idx, bad_lp), (nan_s, idx, lp)]
    for ss, ii, ll in cases:
        with pytest.raises(_C.Error) as cpu:
            _sparse(ss, ii, ll, "bucket", _args("forward_kl"))
        with pytest.raises(_C.Error) as dev:
            _sparse(ss.cuda(), ii.cuda(), ll.cuda(), "bucket", _args("forward_kl"))
        assert str(dev.value) == str(cpu.value)
    t = _student(n, v, torch.float32, seed=6)
    t[1, :] = float("-inf")
    with pytest.raises(_C.Error, match="teacher_logits row 1 has every logit -inf"):
        _topk(s.cuda(), t.cuda(), k, _args("forward_kl"))


def test_check_finite_off_gives_nan_and_no_sync():
    n, v, k = 4, 100, 5
    s = _student(n, v, torch.float32)
    s[1, 3] = float("inf")
    idx, lp = _teacher(n, v, k)
    args = _args("forward_kl", "none", check_finite=False)
    loss, _ = _sparse(s.cuda(), idx.cuda(), lp.cuda(), "bucket", args)
    assert torch.isnan(loss).all()
    ok = _student(n, v, torch.float32)
    loss, gs = _sparse(ok.cuda(), idx.cuda(), lp.cuda(), "bucket", args)
    ref = _sparse(ok.cuda(), idx.cuda(), lp.cuda(), "bucket", _args("forward_kl", "none"))
    assert torch.equal(loss, ref[0]) and torch.equal(gs, ref[1])


def test_cuda_graph_capture():
    """check_finite=False: no host read inside the call, so it can be captured and replayed."""
    n, v, k = 8, 2000, 16
    s = _student(n, v, torch.float32).cuda()
    t = _student(n, v, torch.float32, seed=7).cuda()
    idx, lp = _teacher(n, v, k)
    idx, lp = idx.cuda(), lp.cuda()
    loss_s, loss_t = torch.zeros(1, device="cuda"), torch.zeros(1, device="cuda")
    gs_s, gs_t = torch.empty_like(s), torch.empty_like(s)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        args = _args("jsd", stream=stream.cuda_stream, check_finite=False)
        _C.sparse_divergence(s, idx, lp, loss_s, gs_s, None, None, "bucket", args)  # warm-up
        with torch.cuda.graph(graph, stream=stream):
            _C.sparse_divergence(s, idx, lp, loss_s, gs_s, None, None, "bucket", args)
            _C.topk_divergence(s, t, k, loss_t, gs_t, None, None, args)
    torch.cuda.current_stream().wait_stream(stream)
    s.mul_(0.5)
    graph.replay()
    torch.cuda.synchronize()
    ref = _sparse(s, idx, lp, "bucket", _args("jsd"))
    assert torch.equal(loss_s, ref[0]) and torch.equal(gs_s, ref[1])
    ref = _topk(s, t, k, _args("jsd"))
    assert torch.equal(loss_t, ref[0]) and torch.equal(gs_t, ref[1])


def test_public_functions_run_on_cuda():
    n, v, k = 5, 700, 12
    s = _student(n, v, torch.float32).cuda().requires_grad_()
    idx, lp = _teacher(n, v, k)
    loss = divkit.sparse_divergence(s, idx.cuda(), lp.cuda(), kind="forward_kl")
    loss.backward()
    s_cpu = s.detach().cpu().requires_grad_()
    ref = divkit.sparse_divergence(s_cpu, idx, lp, kind="forward_kl")
    ref.backward()
    assert loss.device.type == "cuda" and s.grad.device.type == "cuda"
    torch.testing.assert_close(loss.cpu(), ref, rtol=2e-5, atol=1e-8)
    torch.testing.assert_close(s.grad.cpu(), s_cpu.grad, rtol=2e-5, atol=1e-8)


def test_deferred_checks_public_api():
    from divkit.cuda_checks import deferred_checks

    n, v, k = 4, 100, 5
    s = _student(n, v, torch.float32)
    s[2, 1] = float("nan")
    idx, lp = _teacher(n, v, k)
    t = _student(n, v, torch.float32, seed=8)
    with deferred_checks():
        assert torch.isnan(divkit.sparse_divergence(s.cuda(), idx.cuda(), lp.cuda())).all()
        assert torch.isnan(divkit.topk_divergence(s.cuda(), t.cuda(), k)).all()
    with pytest.raises(divkit.Error, match="row 2"):
        divkit.sparse_divergence(s.cuda(), idx.cuda(), lp.cuda())
