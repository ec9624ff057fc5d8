"""Custom ops of divkit.ot and the functions built on them: divkit::sinkhorn (so
sinkhorn_divergence, sinkhorn_kd_loss, monge_gap), divkit::sparse_ot, the PyTorch-fallback route
of sinkhorn / mmd / cs_divergence (run inside the ops), divkit::kde_log_likelihood and
divkit::kde_bandwidth. Each: no graph break under
torch.compile(fullgraph=True), the compiled call equal to eager bit for bit (values, returned
fields, gradients), the op path (ALWAYS) equal to the function path, opcheck, vmap against the
loop, a clear divkit.Error on double backward and on bad input, eager and compiled."""

import warnings

import pytest
import torch

import divkit
import divkit.ot as ot
from divkit import _ops

pytestmark = pytest.mark.skipif(not _ops.ENABLED, reason="torch.library.custom_op needs torch>=2.4")


def _no_break(f, *args):
    torch._dynamo.reset()
    explain = torch._dynamo.explain(f)(*args)
    assert explain.graph_break_count == 0, explain.break_reasons


def _equal(a, b):
    """Equal bits, for tensors, Python values, None, and tuples of them."""
    if isinstance(a, tuple):
        assert isinstance(b, tuple) and len(a) == len(b)
        for x, y in zip(a, b):
            _equal(x, y)
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    else:
        assert a == b


def _check(f, inputs, wrt, monkeypatch, double_backward=True):
    """f(*inputs) -> (loss, extra outputs): compiled == eager; ALWAYS == eager; double backward
    raises on both paths."""
    _no_break(lambda *a: f(*a)[0], *inputs)
    torch._dynamo.reset()
    got, got_extra = torch.compile(f, fullgraph=True, backend="aot_eager")(*inputs)
    want, want_extra = f(*inputs)
    _equal(got, want)
    _equal(got_extra, want_extra)
    want_grads = torch.autograd.grad(want, wrt)
    _equal(torch.autograd.grad(got, wrt), want_grads)
    monkeypatch.setattr(_ops, "ALWAYS", True)
    got, got_extra = f(*inputs)
    _equal(got, want)
    _equal(got_extra, want_extra)
    _equal(torch.autograd.grad(got, wrt), want_grads)
    if double_backward:
        for always in (True, False):
            monkeypatch.setattr(_ops, "ALWAYS", always)
            (g,) = torch.autograd.grad(f(*inputs)[0], wrt[0], create_graph=True)
            with pytest.raises(divkit.Error, match="double backward"):
                g.sum().backward()
    monkeypatch.setattr(_ops, "ALWAYS", False)


def _clouds(batch=(), dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, 6, 3, generator=g, dtype=dtype).requires_grad_(True)
    y = (torch.randn(*batch, 5, 3, generator=g, dtype=dtype) + 0.3).requires_grad_(True)
    a = torch.rand(*batch, 6, generator=g, dtype=dtype) + 0.2
    b = torch.rand(*batch, 5, generator=g, dtype=dtype) + 0.2
    a = (a / a.sum(-1, keepdim=True)).requires_grad_(True)
    b = (b / b.sum(-1, keepdim=True)).requires_grad_(True)
    return x, y, a, b


def _fields(r):
    return tuple(getattr(r, k) for k in r._fields if k != "reg_cost")


def _sinkhorn(**kw):
    def f(x, y, a, b):
        r = ot.sinkhorn(x, y, a, b, eps=0.3, **kw)
        w = torch.arange(1.0, r.reg_cost.numel() + 1, dtype=r.reg_cost.dtype)
        return (r.reg_cost.reshape(-1) * w).sum(), _fields(r)

    return f


SINKHORN = {
    "balanced": ({}, ()),
    "balanced_f32": ({}, (), torch.float32),
    "plan_cached": ({"return_plan": True}, ()),
    "plan_on_the_fly": ({"return_plan": True, "cost_cache_mib": 0.0}, ()),
    "unbalanced": ({"rho": (1.0, 2.0)}, ()),
    "batched": ({"return_plan": True}, (3,)),
    "batched_unbalanced_f32": ({"rho": 0.7}, (2,), torch.float32),
    "eps_scaling": ({"eps_scaling": 0.5, "p": 1}, ()),
    "torch_fallback": ({"backend": "torch", "return_plan": True}, (2,)),
}


@pytest.mark.parametrize("name", sorted(SINKHORN))
def test_sinkhorn_compiles_fullgraph_with_eager_bits(name, monkeypatch):
    kw, batch, *dt = SINKHORN[name]
    inputs = _clouds(batch, *dt)
    _check(_sinkhorn(**kw), inputs, inputs, monkeypatch)


def test_sinkhorn_cost_gradient_and_kd_loss(monkeypatch):
    g = torch.Generator().manual_seed(3)
    cost = torch.rand(2, 4, 5, generator=g, dtype=torch.float64).requires_grad_(True)

    def f(cost):
        r = ot.sinkhorn(None, None, eps=0.2, cost=cost)
        return (r.reg_cost * torch.tensor([1.0, 3.0], dtype=cost.dtype)).sum(), _fields(r)

    _check(f, [cost], [cost], monkeypatch)
    s = torch.randn(6, 9, generator=g).requires_grad_(True)
    t = torch.randn(6, 9, generator=g)

    def kd(s):
        return ot.sinkhorn_kd_loss(s, t, temperature=1.5, eps=0.2, n_iter=7) * 2, ()

    _check(kd, [s], [s], monkeypatch, double_backward=False)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_sinkhorn_divergence_and_monge_gap(backend, monkeypatch):
    """backend="torch" also checks the symmetric self-terms, whose two potentials the fallback
    returns as one tensor (the op hands out separate ones)."""
    x, y, a, b = _clouds()

    def div(x, y, a, b):
        return ot.sinkhorn_divergence(x, y, a, b, eps=0.4, backend=backend) * 2, ()

    _check(div, [x, y, a, b], [x, y, a, b], monkeypatch)

    def gap(x, y, a, b):
        return ot.monge_gap(x, x + 0.2 * y[:1], a, eps=0.5, warn=False, backend=backend), ()

    _check(gap, [x, y, a, b], [x, y], monkeypatch)


def test_sinkhorn_warns_when_compiled():
    """The convergence flags are read by the op when it runs: the warning still comes."""
    x, y, _, _ = (t.detach() for t in _clouds())
    torch._dynamo.reset()
    f = torch.compile(
        lambda x, y: ot.sinkhorn(x, y, eps=0.01, max_iter=2).reg_cost,
        fullgraph=True,
        backend="aot_eager",
    )
    with pytest.warns(RuntimeWarning, match="sinkhorn: did not converge within max_iter=2") as rec:
        f(x, y)
    # Attributed to the caller's code, not to torch's dispatcher or the generated graph.
    assert [r.filename for r in rec] == [__file__]
    g = torch.compile(
        lambda x, y: ot.sinkhorn(x, y, eps=0.01, max_iter=2, warn=False).reg_cost,
        fullgraph=True,
        backend="aot_eager",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g(x, y)


def test_sinkhorn_bad_input_raises_eager_and_compiled():
    x, y, _, _ = (t.detach() for t in _clouds())
    torch._dynamo.reset()
    f = torch.compile(lambda x, y: ot.sinkhorn(x, y, eps=0.3).reg_cost, fullgraph=True)
    bad = x.clone()
    bad[2, 1] = float("nan")
    for call in (f, lambda x, y: ot.sinkhorn(x, y, eps=0.3).reg_cost):
        with pytest.raises(divkit.Error, match=r"sinkhorn: x has a non-finite value"):
            call(bad, y)
    # An argument error is raised while tracing: with fullgraph=True Dynamo reports it as its
    # own error (Unsupported); without, the call falls back to eager, which raises it.
    torch._dynamo.reset()
    g = torch.compile(lambda x, y: ot.sinkhorn(x, y, eps=-1.0).reg_cost)
    with pytest.raises(divkit.Error, match="sinkhorn: eps"):
        g(x, y)


def test_sinkhorn_opcheck_vmap_and_fake_cuda():
    x, y, a, b = (t.detach() for t in _clouds((2,)))
    opts = (0.3, 2, 1e-6, 200, 1, 0.0, float("inf"), float("inf"), 1 << 20, False)
    for plan, need in ((False, [False] * 5), (True, [True, True, False, True, True])):
        xs, ys, as_, bs = (
            t.clone().requires_grad_(n) for t, n in zip((x, y, a, b), need[:2] + need[3:])
        )
        args = (xs, ys, None, as_, bs) + opts + (plan, True, "sinkhorn", "core", need)
        torch.library.opcheck(_ops.sinkhorn_op, args)
    cost = torch.rand(2, 4, 3, dtype=torch.float64, requires_grad=True)
    need = [False, False, True, False, False]
    args = (None, None, cost, None, None) + opts + (False, True, "sinkhorn", "torch", need)
    torch.library.opcheck(_ops.sinkhorn_op, args)
    # vmap: one call per entry, the batched call's bits.
    got = torch.vmap(lambda p, q: ot.sinkhorn(p, q, eps=0.3).reg_cost)(x, y)
    for i in range(2):
        assert torch.equal(got[i], ot.sinkhorn(x[i], y[i], eps=0.3).reg_cost)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        xc, yc = torch.empty(2, 6, 3, device="cuda"), torch.empty(2, 5, 3, device="cuda")
        need = [True, True, False, False, False]
        out = _ops.sinkhorn_op(
            xc, yc, None, None, None, *opts, True, True, "sinkhorn", "torch", need
        )
        shapes = [(2,), (2, 6), (2, 5), (2,), (2,), (2,), (2,), (2, 6, 5)]
        assert [tuple(t.shape) for t in out[:8]] == shapes
        assert all(t.device.type == "cuda" for t in out)
        assert out[8].shape == xc.shape and out[8].dtype == torch.float64


# ---------------------------------------------------------------------------------------------
# sparse_ot: a traced call returns the plan dense and its statistics as 0-d tensors.
# ---------------------------------------------------------------------------------------------


def _sparse_inputs(dtype):
    g = torch.Generator().manual_seed(5)
    a = torch.rand(5, generator=g, dtype=dtype) + 0.2
    b = torch.rand(4, generator=g, dtype=dtype) + 0.2
    a, b = (a / a.sum()).requires_grad_(True), (b / b.sum()).requires_grad_(True)
    return a, b, torch.rand(5, 4, generator=g, dtype=dtype).requires_grad_(True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [None, 2])
def test_sparse_ot_compiles_fullgraph_with_eager_bits(dtype, k, monkeypatch):
    a, b, cost = _sparse_inputs(dtype)

    def f(a, b, cost):
        return ot.sparse_ot(a, b, cost, gamma=0.3, k=k, warn=False).reg_cost * 3

    _no_break(f, a, b, cost)
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda a, b, c: ot.sparse_ot(a, b, c, gamma=0.3, k=k, warn=False),
        fullgraph=True,
        backend="aot_eager",
    )
    got = compiled(a, b, cost)
    want = ot.sparse_ot(a, b, cost, gamma=0.3, k=k, warn=False)
    assert got.plan.layout == torch.strided and want.plan.layout == torch.sparse_coo
    _equal(got.plan, want.plan.to_dense())
    for field in ("transport_cost", "reg_cost", "alpha"):
        _equal(getattr(got, field), getattr(want, field))
    assert int(got.n_iter) == want.n_iter and bool(got.converged) == want.converged
    assert float(got.marginal_error) == want.marginal_error
    wrt = (a, b, cost)
    want_grads = torch.autograd.grad(want.reg_cost * 3, wrt)
    _equal(torch.autograd.grad(got.reg_cost * 3, wrt), want_grads)
    monkeypatch.setattr(_ops, "ALWAYS", True)
    _equal(torch.autograd.grad(f(a, b, cost), wrt), want_grads)
    for always in (True, False):
        monkeypatch.setattr(_ops, "ALWAYS", always)
        (g,) = torch.autograd.grad(f(a, b, cost), cost, create_graph=True)
        with pytest.raises(divkit.Error, match="sparse_ot: double backward"):
            g.sum().backward()


def test_sparse_ot_opcheck_vmap_errors():
    a, b, cost = _sparse_inputs(torch.float64)
    for need in ([False] * 3, [True] * 3):
        torch.library.opcheck(
            _ops.sparse_ot_op, (a, b, cost, 0.4, 0, 1e-6, 100, False, "core", need)
        )
    torch.library.opcheck(
        _ops.sparse_ot_op, (a, b, cost, 0.4, 2, 1e-6, 50, False, "torch", [True] * 3)
    )
    with torch.no_grad():
        costs = torch.rand(3, 5, 4, dtype=torch.float64)
        got = torch.vmap(lambda c: ot.sparse_ot(a, b, c, gamma=0.5, warn=False).reg_cost)(costs)
        for i in range(3):
            assert torch.equal(got[i], ot.sparse_ot(a, b, costs[i], gamma=0.5, warn=False).reg_cost)
    torch._dynamo.reset()
    f = torch.compile(lambda c: ot.sparse_ot(a, b, c, gamma=0.5).reg_cost, fullgraph=True)
    bad = cost.detach().clone()
    bad[1, 1] = float("inf")
    with pytest.raises(divkit.Error, match="sparse_ot: cost"):
        f(bad)
    with pytest.warns(RuntimeWarning, match="sparse_ot: did not converge"):
        torch.compile(
            lambda c: ot.sparse_ot(a, b, c, gamma=0.01, max_iter=1).reg_cost, fullgraph=True
        )(cost.detach())


# ---------------------------------------------------------------------------------------------
# mmd / cs_divergence routed to the PyTorch fallback (backend="torch"): inside the op.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["mmd", "mmd_energy", "cs"])
def test_sample_divergences_on_the_torch_fallback_compile_fullgraph(which, monkeypatch):
    x, y, a, b = _clouds(dtype=torch.float32)

    def f(x, y, a, b):
        if which == "cs":
            return ot.cs_divergence(x, y, a.detach(), None, sigma=1.4, backend="torch") * 2, ()
        kernel = "energy" if which == "mmd_energy" else "gaussian"
        return ot.mmd(x, y, None, b.detach(), kernel=kernel, backend="torch") * 2, ()

    _check(f, [x, y, a, b], [x, y], monkeypatch)
    args = (x, y, None, b.detach(), "mmd", "gaussian", 1.2, [True, True], "torch")
    torch.library.opcheck(_ops.sample_divergence_op, args)
    torch._dynamo.reset()
    g = torch.compile(lambda x, y: ot.mmd(x, y, backend="torch"), fullgraph=True)
    bad = x.detach().clone()
    bad[0, 0] = float("nan")
    with pytest.raises(divkit.Error, match=r"mmd: x has a non-finite value"):
        g(bad, y.detach())


# ---------------------------------------------------------------------------------------------
# kde_log_likelihood, kde_bandwidth: Python numbers eagerly, tensors when traced or asked for.
# ---------------------------------------------------------------------------------------------


def _kde_points():
    g = torch.Generator().manual_seed(9)
    return torch.randn(12, 2, generator=g), torch.randn(5, 2, generator=g), torch.rand(12) + 0.1


def test_kde_log_likelihood_and_bandwidth_compile_fullgraph(monkeypatch):
    x, y, w = _kde_points()

    def f(x, y, w):
        held = ot.kde_log_likelihood(x, 0.6, y, w)
        loo = ot.kde_log_likelihood(x, 0.4)
        return held + 2 * loo, ot.kde_bandwidth(x, y, w, grid=6)

    _no_break(lambda *a: f(*a)[0], x, y, w)
    torch._dynamo.reset()
    got, got_bw = torch.compile(f, fullgraph=True, backend="aot_eager")(x, y, w)
    held, loo = ot.kde_log_likelihood(x, 0.6, y, w), ot.kde_log_likelihood(x, 0.4)
    assert isinstance(held, float) and isinstance(loo, float)
    assert got.dtype == torch.float64 and got.shape == () and float(got) == held + 2 * loo
    want_bw = ot.kde_bandwidth(x, y, w, grid=6)
    assert isinstance(want_bw.bandwidth, float) and isinstance(want_bw.grid_bandwidths, list)
    tensors = ot.kde_bandwidth(x, y, w, grid=6, as_tensor=True)
    _equal(tuple(got_bw), tuple(tensors))
    assert float(tensors.bandwidth) == want_bw.bandwidth
    assert int(tensors.n_evals) == want_bw.n_evals and tensors.n_evals.dtype == torch.int64
    assert tensors.grid_log_likelihoods.tolist() == want_bw.grid_log_likelihoods
    as_t = ot.kde_log_likelihood(x, 0.6, y, w, as_tensor=True)
    assert as_t.dtype == torch.float64 and float(as_t) == held
    # The op path on plain tensors (DIVKIT_CUSTOM_OPS=always) keeps the eager types and values.
    monkeypatch.setattr(_ops, "ALWAYS", True)
    got = ot.kde_log_likelihood(x, 0.6, y, w)
    assert isinstance(got, float) and got == held
    _equal(ot.kde_log_likelihood(x, 0.6, y, w, as_tensor=True), as_t)
    assert ot.kde_bandwidth(x, y, w, grid=6) == want_bw
    _equal(tuple(ot.kde_bandwidth(x, y, w, grid=6, as_tensor=True)), tuple(tensors))


def test_kde_opcheck_vmap_errors():
    x, y, w = _kde_points()
    torch.library.opcheck(_ops.kde_log_likelihood_op, (x, y, w, 0.5))
    torch.library.opcheck(_ops.kde_log_likelihood_op, (x, None, None, 0.5))
    torch.library.opcheck(_ops.kde_bandwidth_op, (x, y, None, 0.0, 0.0, 5, 1e-3, 20))
    torch.library.opcheck(_ops.kde_bandwidth_op, (x, None, w, 0.01, 3.0, 4, 1e-3, 20))
    ys = torch.randn(3, 5, 2)
    got = torch.vmap(lambda q: ot.kde_log_likelihood(x, 0.7, q))(ys)
    assert got.shape == (3,)
    for i in range(3):
        assert float(got[i]) == ot.kde_log_likelihood(x, 0.7, ys[i])
    got = torch.vmap(lambda q: ot.kde_bandwidth(x, q, grid=4).bandwidth)(ys)
    for i in range(3):
        assert float(got[i]) == ot.kde_bandwidth(x, ys[i], grid=4).bandwidth
    torch._dynamo.reset()
    f = torch.compile(lambda x: ot.kde_log_likelihood(x, 0.5), fullgraph=True)
    bad = x.clone()
    bad[3, 0] = float("nan")
    with pytest.raises(divkit.Error, match="kde_log_likelihood: x"):
        f(bad)
    with pytest.raises(divkit.Error, match="kde_log_likelihood: as_tensor"):
        ot.kde_log_likelihood(x, 0.5, as_tensor="yes")
    torch._dynamo.reset()
    g = torch.compile(lambda x: ot.kde_bandwidth(x, x[:1, :1]).bandwidth)
    with pytest.raises(divkit.Error, match="kde_bandwidth: y must have x's dimension"):
        g(x)


def test_public_ot_calls_trace_fake_cuda_tensors():
    """The OT functions route fake CUDA tensors (on a CPU-only torch) to their ops, whose fake
    kernels give the shapes, dtypes and device: what a compiled CUDA model traces. Batched
    inputs: indexing a fake CUDA tensor needs a CUDA-enabled torch."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, y = torch.empty(2, 6, 3, device="cuda"), torch.empty(2, 5, 3, device="cuda")
        r = ot.sinkhorn(x, y, eps=0.3, return_plan=True)
        shapes = [(2, 6), (2, 5), (2,), (2,), (2,), (2,), (2,), (2, 6, 5)]
        assert [tuple(t.shape) for t in r] == shapes
        assert all(t.device.type == "cuda" for t in r)
        assert r.n_iter.dtype == torch.int64 and r.converged.dtype == torch.bool
        assert ot.sinkhorn_divergence(x, y, eps=0.3).shape == (2,)
        x2, y2 = torch.empty(6, 3, device="cuda"), torch.empty(5, 3, device="cuda")
        assert ot.mmd(x2, y2).device.type == ot.cs_divergence(x2, y2).device.type == "cuda"
        a, b = torch.empty(6, device="cuda"), torch.empty(5, device="cuda")
        r = ot.sparse_ot(a, b, torch.empty(6, 5, device="cuda"), gamma=0.5)
        assert r.plan.shape == (6, 5) and r.plan.layout == torch.strided
        assert r.alpha.shape == (6,) and r.plan.device.type == "cuda"
