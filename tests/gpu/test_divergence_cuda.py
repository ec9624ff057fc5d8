"""The CUDA token-divergence kernels against the CPU kernels and an fp64 reference.

Calls divkit._C.divergence directly (the DivergenceArgs form with `stream`), so that the test
covers the C++ dispatch whatever the Python layer chooses.
"""

import pytest
import torch

from divkit import _C


def _skip_reason():
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not _C.cuda_built():
        return "divkit was built without CUDA"
    return ""


# No conftest.py here: tests/python's conftest is imported by name ("from conftest import ...").
pytestmark = pytest.mark.skipif(bool(_skip_reason()), reason=_skip_reason() or "GPU ready")

KINDS = list(_C.kinds())
PARAMS = {"jsd": {"beta": 0.3}, "alpha_divergence": {"alpha": 0.7}, "renyi": {"alpha": 1.6}}


def _args(kind, reduction="mean", stream=0, **kw):
    a = dict(kind=kind, reduction=reduction, stream=stream, temperature=1.3)
    a.update(PARAMS.get(kind, {"alpha": 0.2}))
    a.update(kw)
    return _C.DivergenceArgs(**a)


def _run(s, t, args, labels=None, weights=None, grad_teacher=True, grad_dtype=None):
    n = s.shape[0]
    loss = torch.zeros(n if args.reduction == "none" else 1, dtype=torch.float32, device=s.device)
    gs = torch.empty_like(s, dtype=grad_dtype or s.dtype)
    gt = torch.empty_like(t, dtype=grad_dtype or t.dtype) if grad_teacher else None
    _C.divergence(s, t, loss, gs, gt, labels, weights, args)
    return loss, gs, gt


def _inputs(n, v, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, v, generator=g) * 2).to(dtype)
    t = (torch.randn(n, v, generator=g) * 2).to(dtype)
    return s, t


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_cpu(kind, dtype):
    s, t = _inputs(7, 1000, dtype)
    labels = torch.tensor([1, -100, 3, 4, -100, 6, 7])
    weights = torch.linspace(0.5, 2.0, 7)
    for reduction in ["none", "sum", "mean", "batchmean"]:
        args = _args(kind, reduction)
        cpu = _run(s, t, args, labels, weights)
        dev = _run(s.cuda(), t.cuda(), args, labels.cuda(), weights.cuda())
        tol = 2e-5 if dtype == torch.float32 else 1e-2
        for a, b in zip(cpu, dev):
            torch.testing.assert_close(b.cpu().float(), a.float(), rtol=tol, atol=tol * 1e-2)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "cross_entropy"])
def test_fp32_against_fp64(kind):
    s, t = _inputs(5, 4096, torch.float32, seed=1)
    T = 1.3
    beta = PARAMS.get(kind, {}).get("beta", 0.5)
    s64 = s.double().requires_grad_()
    lq = torch.log_softmax(s64 / T, -1)
    lp = torch.log_softmax(t.double() / T, -1)
    p, q = lp.exp(), lq.exp()
    if kind == "forward_kl":
        row = (p * (lp - lq)).sum(-1)
    elif kind == "reverse_kl":
        row = (q * (lq - lp)).sum(-1)
    elif kind == "cross_entropy":
        row = -(p * lq).sum(-1)
    else:
        lm = torch.log(beta * p + (1 - beta) * q)
        row = beta * (p * (lp - lm)).sum(-1) + (1 - beta) * (q * (lq - lm)).sum(-1)
    ref = row.mean()
    ref.backward()
    loss, gs, _ = _run(s.cuda(), t.cuda(), _args(kind, temperature=T), grad_teacher=False)
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item()) + 1e-7
    err = (gs.cpu().double() - s64.grad).abs().max().item()
    assert err <= 1e-5 * s64.grad.abs().max().item() + 1e-9


@pytest.mark.parametrize("kind", KINDS)
def test_two_runs_same_bits(kind):
    s, t = _inputs(64, 5000, torch.bfloat16, seed=2)
    s, t = s.cuda(), t.cuda()
    a = _run(s, t, _args(kind, "sum"))
    b = _run(s, t, _args(kind, "sum"))
    for x, y in zip(a, b):
        assert torch.equal(
            x.view(torch.uint8) if x.dtype != torch.float32 else x,
            y.view(torch.uint8) if y.dtype != torch.float32 else y,
        )


def test_inplace_and_stream():
    s, t = _inputs(9, 3000, torch.float32, seed=3)
    ref = _run(s.cuda(), t.cuda(), _args("jsd"), grad_teacher=False)
    stream = torch.cuda.Stream()
    sc, tc = s.cuda(), t.cuda()
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        loss = torch.zeros(1, device="cuda")
        _C.divergence(sc, tc, loss, sc, None, None, None, _args("jsd", stream=stream.cuda_stream))
    stream.synchronize()
    assert torch.equal(loss, ref[0])
    assert torch.equal(sc, ref[1])


def test_num_items_and_ignored_rows():
    s, t = _inputs(6, 777, torch.float32, seed=4)
    labels = torch.tensor([-100, 2, -100, 3, 4, 5])
    args = _args("forward_kl", "sum", num_items_in_batch=11.0)
    cpu = _run(s, t, args, labels)
    dev = _run(s.cuda(), t.cuda(), args, labels.cuda())
    for a, b in zip(cpu, dev):
        torch.testing.assert_close(b.cpu(), a, rtol=2e-5, atol=1e-8)
    assert torch.all(dev[1][0] == 0) and torch.all(dev[1][2] == 0)


def test_non_finite_and_mixed_devices_raise():
    s, t = _inputs(4, 100, torch.float32)
    s[2, 5] = float("nan")
    with pytest.raises(_C.Error, match="student_logits contains NaN or \\+inf at row 2"):
        _run(s.cuda(), t.cuda(), _args("forward_kl"))
    with pytest.raises(_C.Error, match="teacher_logits is on cpu but student_logits is on cuda:0"):
        _run(s.cuda(), t, _args("forward_kl"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("v", [1000, 1001, 6144, 20000])
def test_row_cache_and_vector_loads(monkeypatch, dtype, v):
    """The shared-memory row cache on and off (DIVKIT_CUDA_ROW_CACHE_BYTES) and rows whose start
    is not 16-byte aligned (a sliced view): the same results as the CPU to tolerance, and each
    configuration the same bits run to run."""
    s, t = _inputs(6, v + 3, dtype, seed=v)
    sc, tc = s.cuda()[:, 3:], t.cuda()[:, 3:]  # row starts off the 16-byte grid
    s, t = s[:, 3:], t[:, 3:]
    cpu = _run(s, t, _args("jsd", "none"))
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    for budget in ["0", str(8 * v), "262144"]:
        monkeypatch.setenv("DIVKIT_CUDA_ROW_CACHE_BYTES", budget)
        a = _run(sc, tc, _args("jsd", "none"))
        b = _run(sc, tc, _args("jsd", "none"))
        for x, y, c in zip(a, b, cpu):
            assert torch.equal(x, y)
            torch.testing.assert_close(x.cpu().float(), c.float(), rtol=tol, atol=tol * 1e-2)


def test_check_finite_off():
    """No host read: a NaN input gives a NaN loss instead of an error; good inputs the same bits."""
    s, t = _inputs(4, 100, torch.float32)
    ok = _run(s.cuda(), t.cuda(), _args("forward_kl", "none"))
    same = _run(s.cuda(), t.cuda(), _args("forward_kl", "none", check_finite=False))
    for x, y in zip(ok, same):
        assert torch.equal(x, y)
    s[2, 5] = float("nan")
    loss, _, _ = _run(s.cuda(), t.cuda(), _args("forward_kl", "none", check_finite=False))
    assert torch.isnan(loss).all()


def test_deferred_checks_public_api():
    import divkit
    from divkit.cuda_checks import deferred_checks

    s, t = _inputs(4, 100, torch.float32)
    s[1, 0] = float("inf")
    with deferred_checks():
        loss = divkit.divergence(s.cuda(), t.cuda(), kind="forward_kl")
    assert torch.isnan(loss).all()
    with pytest.raises(divkit.Error):
        divkit.divergence(s.cuda(), t.cuda(), kind="forward_kl")


def test_cuda_graph_capture():
    s, t = _inputs(8, 3000, torch.float32, seed=8)
    s, t = s.cuda(), t.cuda()
    loss, gs = torch.zeros(1, device="cuda"), torch.empty_like(s)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        args = _args("reverse_kl", stream=stream.cuda_stream, check_finite=False)
        _C.divergence(s, t, loss, gs, None, None, None, args)  # warm-up
        with torch.cuda.graph(graph, stream=stream):
            _C.divergence(s, t, loss, gs, None, None, None, args)
    torch.cuda.current_stream().wait_stream(stream)
    s.mul_(0.5)
    graph.replay()
    torch.cuda.synchronize()
    ref = _run(s, t, _args("reverse_kl"), grad_teacher=False)
    assert torch.equal(loss, ref[0]) and torch.equal(gs, ref[1])


def test_public_api_forward_and_backward_capture_in_a_cuda_graph():
    """divkit.divergence(...).backward() under torch.cuda.graph with deferred_checks(): no host
    read in forward (the finite check) or backward (the upstream gradient's value); the replay
    gives the eager call's loss and gradient bitwise."""
    import divkit
    from divkit.cuda_checks import deferred_checks

    s0, t0 = _inputs(8, 3000, torch.float32, seed=9)
    s, t = s0.cuda().requires_grad_(), t0.cuda()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), deferred_checks():
        for _ in range(2):  # warm-up outside the capture
            s.grad = None
            divkit.divergence(s, t, kind="jsd").backward()
        s.grad = None
        with torch.cuda.graph(graph, stream=stream):
            loss = divkit.divergence(s, t, kind="jsd")
            loss.backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    ref_s = s0.cuda().requires_grad_()
    ref = divkit.divergence(ref_s, t, kind="jsd")
    ref.backward()
    assert torch.equal(loss, ref) and torch.equal(s.grad, ref_s.grad)
