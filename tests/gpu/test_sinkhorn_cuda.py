"""divkit's CUDA Sinkhorn (src/ot/sinkhorn_cuda.cu) against the C++ CPU core and POT: every cost
kind, the cost held and on the fly, batches, the options (unbalanced, eps scaling, check_every,
symmetric, a given cost, the plan), the gradients; two runs bitwise equal, a batch bitwise equal
to its problems alone, held and on-the-fly costs bitwise equal; the sample divergences built on
it; the errors; a side stream; the memory of the on-the-fly path.

Runs under pytest or tests/gpu/mini_pytest.py (no fixtures, no ids)."""

import warnings

import pytest
import torch

import divkit
from divkit import _C
from divkit.backends import torch_ot
from divkit.ot import monge_gap, sinkhorn, sinkhorn_divergence, sinkhorn_kd_loss


def _skip_reason():
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not _C.cuda_built():
        return "divkit was built without CUDA"
    if "sinkhorn" not in _C.cuda_ops():
        return "this build has no CUDA Sinkhorn"
    return ""


pytestmark = pytest.mark.skipif(bool(_skip_reason()), reason=_skip_reason() or "GPU ready")


def _rel(a, b):
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _clouds(B, n, m, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, n, d, generator=g, dtype=torch.float64)
    y = torch.randn(B, m, d, generator=g, dtype=torch.float64) + 0.5
    a = torch.rand(B, n, generator=g, dtype=torch.float64) + 0.2
    b = torch.rand(B, m, generator=g, dtype=torch.float64) + 0.2
    return x.to(dtype), y.to(dtype), (a / a.sum(1, keepdim=True)), (b / b.sum(1, keepdim=True))


class _NoFallback:
    """Makes the PyTorch fallback raise, so a test knows that the CUDA kernel ran."""

    def __enter__(self):
        self.old = torch_ot.sinkhorn

        def boom(*a, **k):
            raise AssertionError("the PyTorch fallback ran instead of the CUDA kernel")

        torch_ot.sinkhorn = boom

    def __exit__(self, *exc):
        torch_ot.sinkhorn = self.old


def _run(dev, x, y, a, b, **kw):
    """sinkhorn on dev with gradients for x, y, a, b; returns the tensors to compare."""
    ts = [
        t.to(dev).detach().clone().requires_grad_() if t is not None else None for t in (x, y, a, b)
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        r = sinkhorn(*ts, **kw)
    r.reg_cost.sum().backward()
    out = {
        "reg_cost": r.reg_cost,
        "transport_cost": r.transport_cost,
        "f": r.f,
        "g": r.g,
        "n_iter": r.n_iter,
        "converged": r.converged,
        "marginal_error": r.marginal_error,
    }
    if r.plan is not None:
        out["plan"] = r.plan
    for name, t in zip("xyab", ts):
        if t is not None:
            out["grad_" + name] = t.grad
    return out


def _compare(cuda, cpu, tol, counts=True):
    """counts=False: the iteration counts, flags and residuals are not compared (float32 inputs,
    which the CPU iterates in float32: its residual has a float32 floor)."""
    for k, v in cpu.items():
        assert cuda[k].device.type == "cuda", k
        if not counts and k in ("n_iter", "converged", "marginal_error"):
            continue
        if k in ("n_iter", "converged"):
            assert torch.equal(cuda[k].cpu(), v), (k, cuda[k], v)
        elif k == "marginal_error":
            assert torch.allclose(cuda[k].cpu(), v, rtol=1e-3, atol=tol), (k, cuda[k], v)
        else:
            assert _rel(cuda[k], v) <= tol, (k, _rel(cuda[k], v))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("cache_mib", [64.0, 0.0])
@pytest.mark.parametrize("p", [1, 2])
def test_matches_the_cpu_core(dtype, cache_mib, p):
    # m > 256: several columns per thread; d = 12: the CPU's expanded cost (p = 2).
    for d in (3, 12):
        x, y, a, b = _clouds(2, 300, 257, d, seed=p + d, dtype=dtype)
        f64 = dtype == torch.float64
        kw = dict(eps=0.3, p=p, cost_cache_mib=cache_mib, max_iter=2000, tol=1e-8 if f64 else 1e-5)
        with _NoFallback():
            got = _run("cuda", x, y, a, b, **kw)
        want = _run("cpu", x, y, a, b, **kw)
        # float32: the CPU computes costs and exps in float32, the GPU in float64.
        _compare(got, want, 1e-9 if f64 else 2e-4, counts=f64)


def test_options_match_the_cpu_core():
    x, y, a, b = _clouds(3, 70, 45, 2, seed=5)
    cases = [
        dict(eps=0.2, rho=(1.0, 2.5)),  # unbalanced
        dict(eps=0.02, eps_scaling=0.5, check_every=3),
        dict(eps=0.05, max_iter=7),  # unconverged
        dict(eps=0.1, return_plan=True),
    ]
    for kw in cases:
        bb = b * 1.7 if "rho" in kw else b
        got = _run("cuda", x, y, a, bb, **kw)
        want = _run("cpu", x, y, a, bb, **kw)
        _compare(got, want, 1e-9)
    # Symmetric self-transport (sinkhorn_divergence's self-terms).
    got = _run("cuda", x, x, a, a, eps=0.05, symmetric=True)
    want = _run("cpu", x, x, a, a, eps=0.05, symmetric=True)
    _compare(got, want, 1e-9)


def test_given_cost_matches_the_cpu_core_and_pot():
    import ot as pot

    g = torch.Generator().manual_seed(7)
    C = torch.rand(3, 40, 300, generator=g, dtype=torch.float64) * 2
    _, _, a, b = _clouds(3, 40, 300, 1, seed=8)
    kw = dict(eps=0.1, return_plan=True, tol=1e-11, max_iter=5000)
    Cc = C.cuda().requires_grad_()
    r = sinkhorn(None, None, a.cuda(), b.cuda(), cost=Cc, **kw)
    r.reg_cost.sum().backward()
    rc = sinkhorn(None, None, a, b, cost=C, **kw)
    assert _rel(r.reg_cost, rc.reg_cost) <= 1e-10
    assert _rel(r.plan, rc.plan) <= 1e-9
    assert _rel(Cc.grad, rc.plan) <= 1e-9  # d reg / d C = P
    for k in range(3):
        P = pot.bregman.sinkhorn_log(a[k], b[k], C[k], 0.1, numItermax=5000, stopThr=1e-12)
        assert float((r.plan[k].cpu() - P).abs().max()) <= 1e-8
    # POT on the GPU (its torch backend) agrees too.
    P = pot.bregman.sinkhorn_log(a[0].cuda(), b[0].cuda(), C[0].cuda(), 0.1, numItermax=5000,
                                 stopThr=1e-12)  # fmt: skip
    assert float((r.plan[0] - P).abs().max()) <= 1e-8


def test_two_runs_are_bitwise_equal():
    x, y, a, b = _clouds(2, 500, 333, 5, seed=9)
    for cache_mib in (64.0, 0.0):
        r1 = _run("cuda", x, y, a, b, eps=0.1, cost_cache_mib=cache_mib, return_plan=True)
        r2 = _run("cuda", x, y, a, b, eps=0.1, cost_cache_mib=cache_mib, return_plan=True)
        for k in r1:
            assert torch.equal(r1[k], r2[k]), k


def test_held_and_on_the_fly_costs_are_bitwise_equal():
    # The held cost comes from the on-the-fly tiles: the same values, the same iterates.
    x, y, a, b = _clouds(2, 200, 300, 4, seed=10)
    for p in (1, 2):
        held = _run("cuda", x, y, a, b, eps=0.2, p=p, cost_cache_mib=64.0)
        fly = _run("cuda", x, y, a, b, eps=0.2, p=p, cost_cache_mib=0.0)
        for k in held:
            assert torch.equal(held[k], fly[k]), (p, k)


def test_a_batch_is_bitwise_its_problems_alone():
    # Each problem keeps its own iterates, iteration count and stopping point in a batch.
    x, y, a, b = _clouds(4, 120, 90, 3, seed=11)
    x[2] *= 3.0  # a slower problem: the others are frozen while it iterates
    batch = _run("cuda", x, y, a, b, eps=0.2, cost_cache_mib=0.0)
    for k in range(4):
        one = _run("cuda", x[k : k + 1], y[k : k + 1], a[k : k + 1], b[k : k + 1], eps=0.2,
                   cost_cache_mib=0.0)  # fmt: skip
        for key in batch:
            assert torch.equal(batch[key][k : k + 1], one[key]), (k, key)
    assert len(set(batch["n_iter"].tolist())) > 1


def test_sample_divergences_match_the_cpu_core():
    x, y, a, b = _clouds(1, 150, 120, 3, seed=12)
    x, y, a, b = x[0], y[0], a[0], b[0]
    out = []
    for dev in ("cpu", "cuda"):
        xs, ys = x.to(dev).requires_grad_(), y.to(dev).requires_grad_()
        s = sinkhorn_divergence(xs, ys, a.to(dev), b.to(dev), eps=0.1)
        mg = monge_gap(xs, 0.9 * xs + 0.1, eps=0.1)
        (s + mg).backward()
        out.append((s, mg, xs.grad, ys.grad))
    for u, v in zip(out[1], out[0]):
        assert _rel(u, v) <= 1e-9
    g = torch.Generator().manual_seed(13)
    zs, zt = torch.randn(2, 32, 50, generator=g, dtype=torch.float64)
    out = []
    for dev in ("cpu", "cuda"):
        s = zs.to(dev).requires_grad_()
        loss = sinkhorn_kd_loss(s, zt.to(dev))
        loss.backward()
        out.append((loss, s.grad))
    for u, v in zip(out[1], out[0]):
        assert _rel(u, v) <= 1e-9


def test_errors_are_the_cpu_messages():
    x, y, a, b = _clouds(2, 10, 8, 2, seed=14)
    xb = x.clone()
    xb[1, 3, 1] = float("nan")
    with pytest.raises(
        divkit.Error, match=r"x has a non-finite value \(NaN or inf\) at \[1, 3, 1\]"
    ):
        sinkhorn(xb.cuda(), y.cuda(), eps=0.1)
    ab = a.clone()
    ab[0, 2] = -0.5
    with pytest.raises(divkit.Error, match=r"a has a negative weight -0.5\d* at \[0, 2\]"):
        sinkhorn(x.cuda(), y.cuda(), ab.cuda(), b.cuda(), eps=0.1)
    with pytest.raises(divkit.Error, match="equal total mass"):
        sinkhorn(x.cuda(), y.cuda(), a.cuda(), 2 * b.cuda(), eps=0.1)
    with pytest.raises(divkit.Error, match="is on cpu but"):
        sinkhorn(x.cuda(), y, eps=0.1)
    # After an error the device is usable.
    r = sinkhorn(x.cuda(), y.cuda(), eps=0.1)
    assert torch.isfinite(r.reg_cost).all()


def test_runs_on_the_current_stream():
    x, y, a, b = _clouds(2, 256, 200, 3, seed=15)
    ref = sinkhorn(x.cuda(), y.cuda(), a.cuda(), b.cuda(), eps=0.1)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        xs, ys, as_, bs = (t.cuda() for t in (x, y, a, b))
        r = sinkhorn(xs, ys, as_, bs, eps=0.1)
    torch.cuda.synchronize()
    assert torch.equal(r.f, ref.f) and torch.equal(r.reg_cost, ref.reg_cost)


def test_on_the_fly_memory_stays_small():
    # n = m = 100000: the float64 cost alone would take 80 GB, more than the GPU has; on the fly
    # the workspace is O((n + m) d) (cudaMallocAsync, outside torch's allocator, whose peak here
    # is only the outputs).
    n = 100_000
    x, y, _, _ = _clouds(1, n, n, 4, seed=16)
    x, y = x.cuda(), y.cuda()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    r = sinkhorn(x, y, eps=1.0, cost_cache_mib=0, max_iter=2, tol=0.0, warn=False)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert torch.isfinite(r.reg_cost).all()
    assert extra < 64 << 20, f"extra peak {extra / 2**20:.0f} MiB"


def _result_tensors(r):
    return {k: getattr(r, k) for k in ("f", "g", "transport_cost", "reg_cost", "n_iter",
                                       "marginal_error", "converged")}  # fmt: skip


@pytest.mark.parametrize("eps_scaling", [None, 0.5])
def test_sync_false_equals_sync_true_and_captures_in_a_cuda_graph(eps_scaling):
    # A batch whose problems converge at different iterations (not multiples of 16), and one
    # that stops unconverged at max_iter: sync=False runs max_iter iterations with every problem
    # frozen at its own stopping point, so every result equals the synchronizing call's.
    x, y, a, b = _clouds(3, 40, 33, 3, seed=17)
    x[2] *= 4.0  # slower to converge at this eps
    x, y, a, b = (t.cuda() for t in (x, y, a, b))
    kw = dict(eps=0.05, tol=1e-9, max_iter=150, eps_scaling=eps_scaling, warn=False)
    ref = sinkhorn(x, y, a, b, **kw)
    with _NoFallback():
        eager = sinkhorn(x, y, a, b, sync=False, **kw)
    for k, v in _result_tensors(ref).items():
        assert torch.equal(getattr(eager, k), v), k
    assert eager.n_iter.device.type == "cuda" and eager.converged.dtype == torch.bool
    # Captured: sync=None becomes False inside the capture (no host read, no synchronization).
    xs, ys, as_, bs = (t.clone() for t in (x, y, a, b))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside the capture, as CUDA graphs ask
        sinkhorn(xs, ys, as_, bs, sync=False, **kw)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with _NoFallback(), torch.cuda.graph(graph):
        cap = sinkhorn(xs, ys, as_, bs, **kw)
    graph.replay()
    torch.cuda.synchronize()
    for k, v in _result_tensors(ref).items():
        assert torch.equal(getattr(cap, k), v), k
    # New inputs copied into the captured ones: the replay solves the new problems.
    x2, y2, a2, b2 = (t.cuda() for t in _clouds(3, 40, 33, 3, seed=18))
    for dst, src in zip((xs, ys, as_, bs), (x2, y2, a2, b2)):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    ref2 = sinkhorn(x2, y2, a2, b2, **kw)
    for k, v in _result_tensors(ref2).items():
        assert torch.equal(getattr(cap, k), v), k
    with pytest.raises(divkit.Error, match="sync=True"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            sinkhorn(xs, ys, as_, bs, sync=True, **kw)


def test_sync_false_bad_input_gives_nan_not_an_error():
    x, y, a, b = _clouds(2, 10, 8, 2, seed=19)
    x[1, 3, 1] = float("nan")
    r = sinkhorn(x.cuda(), y.cuda(), a.cuda(), b.cuda(), eps=0.1, sync=False)
    torch.cuda.synchronize()
    assert torch.isnan(r.reg_cost).all() and not r.converged.any()
    x, y, a, b = _clouds(2, 10, 8, 2, seed=19)
    b[1] *= 2.0  # unequal masses in problem 1 only
    r = sinkhorn(x.cuda(), y.cuda(), a.cuda(), b.cuda(), eps=0.1, sync=False)
    ok = sinkhorn(x[:1].cuda(), y[:1].cuda(), a[:1].cuda(), b[:1].cuda(), eps=0.1)
    assert torch.isnan(r.reg_cost[1]) and not bool(r.converged[1])
    assert torch.equal(r.reg_cost[:1], ok.reg_cost)


def test_sinkhorn_divergence_captures_in_a_cuda_graph():
    # The three solves of the debiased divergence (two symmetric) inside one capture.
    x, y, a, b = (t.cuda() for t in _clouds(2, 30, 25, 3, seed=20))
    kw = dict(eps=0.1, tol=1e-9, max_iter=120)
    ref = sinkhorn_divergence(x, y, a, b, **kw)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        sinkhorn_divergence(x, y, a, b, sync=False, **kw)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cap = sinkhorn_divergence(x, y, a, b, **kw)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(cap, ref)
