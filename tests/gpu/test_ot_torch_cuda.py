"""The OT fallbacks (divkit.backends.torch_ot) on CUDA tensors against the C++ CPU core: Sinkhorn
with the cost held and computed on the fly in blocks (backend="torch": a CUDA build runs
"auto" on its CUDA kernel, tests/gpu/test_sinkhorn_cuda.py), sparse_ot, mmd, cs_divergence.

Runs under pytest or tests/gpu/mini_pytest.py (no fixtures, no ids)."""

import warnings

import pytest
import torch

from divkit.backends import torch_ot
from divkit.ot import cs_divergence, mmd, sinkhorn, sparse_ot

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _rel(a, b):
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _clouds(n, m, d, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(m, d, generator=g, dtype=torch.float64) + 0.5
    return x, y


@pytest.mark.parametrize("cache_mib", [64.0, 0.0])
@pytest.mark.parametrize("p", [1, 2])
def test_sinkhorn_on_cuda_matches_cpu(cache_mib, p):
    x, y = _clouds(300, 257, 3, seed=1)
    old = torch_ot.BLOCK_ENTRIES
    torch_ot.BLOCK_ENTRIES = 64 * 257  # several blocks when on the fly
    try:
        out = []
        for dev in ("cpu", "cuda"):
            xs = x.to(dev).requires_grad_()
            # backend="torch" on CUDA: the fallback (a CUDA build runs "auto" on its kernel,
            # tests/gpu/test_sinkhorn_cuda.py).
            be = "torch" if dev == "cuda" else "auto"
            r = sinkhorn(
                xs, y.to(dev), eps=0.3, p=p, cost_cache_mib=cache_mib, max_iter=2000, backend=be
            )
            r.reg_cost.backward()
            assert r.reg_cost.device.type == dev
            out.append((r.reg_cost, r.f, xs.grad))
    finally:
        torch_ot.BLOCK_ENTRIES = old
    for a, b in zip(out[1], out[0]):
        assert _rel(a, b) <= 1e-9


def test_sinkhorn_large_on_the_fly_stays_small():
    # A 16384 x 16384 float64 cost = 2 GiB: never held (blocks of BLOCK_ENTRIES entries).
    n = 16384
    x, y = _clouds(n, n, 16, seed=2)
    x, y = x.cuda(), y.cuda()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    r = sinkhorn(x, y, eps=1.0, cost_cache_mib=0, max_iter=50, tol=0.0, warn=False, backend="torch")
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert torch.isfinite(r.reg_cost)
    assert extra < n * n * 8 / 4, f"extra peak {extra / 2**20:.0f} MiB"


def test_sample_divergences_on_cuda_match_cpu():
    x, y = _clouds(500, 300, 4, seed=3)
    for fn, kw in ((mmd, {}), (mmd, {"kernel": "energy"}), (cs_divergence, {"sigma": 2.0})):
        out = []
        for dev in ("cpu", "cuda"):
            xs = x.to(dev).requires_grad_()
            v = fn(xs, y.to(dev), **kw)
            v.backward()
            out.append((v, xs.grad))
        assert _rel(out[1][0], out[0][0]) <= 1e-10 and _rel(out[1][1], out[0][1]) <= 1e-9


def test_sparse_ot_on_cuda_matches_cpu():
    g = torch.Generator().manual_seed(4)
    a = torch.rand(40, generator=g, dtype=torch.float64) + 0.1
    b = torch.rand(30, generator=g, dtype=torch.float64) + 0.1
    a, b = a / a.sum(), b / b.sum()
    C = torch.rand(40, 30, generator=g, dtype=torch.float64)
    out = []
    for dev in ("cpu", "cuda"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            r = sparse_ot(a.to(dev), b.to(dev), C.to(dev), gamma=0.1, tol=1e-10)
        assert r.converged and r.plan.device.type == dev
        out.append(r)
    assert _rel(out[1].reg_cost, out[0].reg_cost) <= 1e-9
    assert _rel(out[1].plan.to_dense(), out[0].plan.to_dense()) <= 1e-7


_FIELDS = ("f", "g", "transport_cost", "reg_cost", "n_iter", "marginal_error", "converged")


def _batch(B, n, m, d, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, n, d, generator=g, dtype=torch.float64)
    y = torch.randn(B, m, d, generator=g, dtype=torch.float64) + 0.5
    x[B - 1] *= 4.0  # slower to converge
    a = torch.rand(B, n, generator=g, dtype=torch.float64) + 0.2
    b = torch.rand(B, m, generator=g, dtype=torch.float64) + 0.2
    return x, y, a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)


@pytest.mark.parametrize("eps_scaling", [None, 0.5])
def test_fallback_sync_false_captures_in_a_cuda_graph(eps_scaling):
    # The fallback's sync=False (automatic inside the capture): no host read, no
    # synchronization, no host-to-device copy; every result equals the synchronizing call's.
    x, y, a, b = (t.cuda() for t in _batch(3, 40, 33, 3, seed=21))
    kw = dict(eps=0.05, tol=1e-9, max_iter=150, eps_scaling=eps_scaling, warn=False)
    kw.update(backend="torch", return_plan=True)
    ref = sinkhorn(x, y, a, b, **kw)
    eager = sinkhorn(x, y, a, b, sync=False, **kw)
    for k in _FIELDS + ("plan",):
        assert torch.equal(getattr(eager, k), getattr(ref, k)), k
    xs, ys, as_, bs = (t.clone() for t in (x, y, a, b))
    xs.requires_grad_()  # the envelope gradient is computed in forward: captured too
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside the capture, as CUDA graphs ask
        sinkhorn(xs, ys, as_, bs, sync=False, **kw)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cap = sinkhorn(xs, ys, as_, bs, **kw)
    x2, y2, a2, b2 = (t.cuda() for t in _batch(3, 40, 33, 3, seed=22))
    for dst, src in zip((xs, ys, as_, bs), (x2, y2, a2, b2)):
        with torch.no_grad():
            dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    ref2 = sinkhorn(x2, y2, a2, b2, **kw)
    for k in _FIELDS + ("plan",):
        assert torch.equal(getattr(cap, k).detach(), getattr(ref2, k).detach()), k


def test_fallback_sync_false_bad_input_gives_nan_on_cuda():
    x, y, a, b = (t.cuda() for t in _batch(3, 10, 8, 2, seed=23))
    b2 = b.clone()
    b2[1] *= 2.0  # unequal masses in problem 1 only
    r = sinkhorn(x, y, a, b2, eps=0.3, backend="torch", sync=False)
    ref = sinkhorn(x, y, a, b, eps=0.3, backend="torch")
    assert torch.isnan(r.reg_cost[1]) and not bool(r.converged[1])
    assert torch.equal(r.reg_cost[[0, 2]], ref.reg_cost[[0, 2]])
    x[2, 0, 0] = float("nan")  # a bad value: every problem
    r = sinkhorn(x, y, a, b, eps=0.3, backend="torch", sync=False)
    assert torch.isnan(r.reg_cost).all() and not r.converged.any()
