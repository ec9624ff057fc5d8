"""divkit.ot.sinkhorn(sync=False), the mode without host reads that a CUDA graph can capture:
its CUDA path is in tests/gpu/test_sinkhorn_cuda.py; here, on CPU tensors, the option's checks
and errors, the stats output of the C++ core (the device results' glue), and the fixed schedule
of the PyTorch fallback, all against the synchronizing call."""

from __future__ import annotations

import warnings

import pytest
import torch

import divkit
from divkit import _C
from divkit.ot import sinkhorn

FIELDS = ("f", "g", "transport_cost", "reg_cost", "n_iter", "marginal_error", "converged")


def batch(B=3, n=23, m=17, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, n, d, generator=g, dtype=torch.float64)
    y = torch.randn(B, m, d, generator=g, dtype=torch.float64) + 0.5
    x[B - 1] *= 3.0  # converges later than the others
    a = torch.rand(B, n, generator=g, dtype=torch.float64) + 0.2
    b = torch.rand(B, m, generator=g, dtype=torch.float64) + 0.2
    return x, y, a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)


def assert_same(r, ref):
    for k in FIELDS:
        u, v = getattr(r, k), getattr(ref, k)
        assert u.dtype == v.dtype and u.shape == v.shape, k
        assert torch.equal(u, v), (k, u, v)


@pytest.mark.parametrize("backend", ["core", "torch"])
@pytest.mark.parametrize(
    "opts",
    [
        dict(eps=0.3, tol=1e-8, max_iter=500),
        dict(eps=0.2, tol=1e-7, max_iter=500, eps_scaling=0.5),
        dict(eps=0.2, tol=1e-7, max_iter=500, check_every=3, rho=2.0),
        dict(eps=0.2, tol=1e-7, max_iter=400),  # two of the three stop unconverged
    ],
)
def test_sync_false_gives_the_synchronizing_results(backend, opts):
    x, y, a, b = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ref = sinkhorn(x, y, a, b, backend=backend, **opts)
    # The problems stop at different iterations.
    its = ref.n_iter.tolist()
    assert len(set(its)) > 1, its
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # sync=False ignores warn
        r = sinkhorn(x, y, a, b, backend=backend, sync=False, **opts)
    assert_same(r, ref)


def test_sync_false_gradients_and_given_cost():
    x, y, a, b = batch(B=2, seed=1)
    grads = []
    for sync in (True, False):
        xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
        r = sinkhorn(xs, ys, a, b, eps=0.3, sync=sync)
        r.reg_cost.sum().backward()
        grads.append((xs.grad, ys.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    C = torch.cdist(x[0], y[0]) ** 2
    for backend in ("core", "torch"):
        ref = sinkhorn(None, None, a[0], b[0], cost=C, eps=0.1, backend=backend, return_plan=True)
        r = sinkhorn(None, None, a[0], b[0], cost=C, eps=0.1, backend=backend, return_plan=True,
                     sync=False)  # fmt: skip
        assert_same(r, ref)
        assert torch.equal(r.plan, ref.plan)


def test_sync_must_be_a_bool_or_none():
    x, y, a, b = batch(B=1)
    with pytest.raises(divkit.Error, match="sinkhorn: sync must be a bool, got str"):
        sinkhorn(x, y, eps=0.1, sync="no")
    with pytest.raises(divkit.Error, match="sinkhorn: sync must be a bool, got int"):
        sinkhorn(x, y, eps=0.1, sync=0)


def _core_args(B, n, m, d):
    x, y, a, b = batch(B, n, m, d)
    f = torch.empty(B, n, dtype=torch.float64)
    g = torch.empty(B, m, dtype=torch.float64)
    return x, y, a, b, f, g


def _options(**kw):
    base = dict(eps=0.1, p=2, tol=1e-9, max_iter=200, check_every=1, eps_scaling=0.0,
                rho_a=float("inf"), rho_b=float("inf"), cost_cache_bytes=1 << 26, symmetric=False)  # fmt: skip
    base.update(kw)
    return _C.SinkhornOptions(**base)


def test_core_stats_output_equals_the_returned_stats():
    x, y, a, b, f, g = _core_args(3, 11, 9, 2)
    ref = _C.sinkhorn(x, y, None, a, b, f, g, None, None, None, None, None, _options())
    st = torch.full((3, 6), float("nan"), dtype=torch.float64)
    f2, g2 = torch.empty_like(f), torch.empty_like(g)
    out = _C.sinkhorn(x, y, None, a, b, f2, g2, None, None, None, None, None,
                      _options(sync=False), st)  # fmt: skip
    assert out == ref  # the CPU returns its stats whatever sync says
    assert torch.equal(st, torch.tensor([[*r[:5], float(r[5])] for r in ref], dtype=torch.float64))
    assert torch.equal(f2, f) and torch.equal(g2, g)
    assert _options(sync=False).sync is False and _options().sync is True


def test_core_stats_output_errors():
    x, y, a, b, f, g = _core_args(2, 5, 4, 2)
    with pytest.raises(divkit.Error, match=r"sinkhorn: stats must be given when sync is false"):
        _C.sinkhorn(x, y, None, a, b, f, g, None, None, None, None, None, _options(sync=False))
    for bad, msg in (
        (torch.empty(2, 5, dtype=torch.float64), r"stats must have shape \[2, 6\], got \[2, 5\]"),
        (torch.empty(2, 6, dtype=torch.float32), r"stats must be float64, got float32"),
    ):
        with pytest.raises(divkit.Error, match="sinkhorn: " + msg):
            _C.sinkhorn(x, y, None, a, b, f, g, None, None, None, None, None, _options(), bad)


def test_sinkhorn_divergence_passes_sync_on():
    from divkit.ot import sinkhorn_divergence

    x, y, a, b = batch(B=2, seed=2)
    ref = sinkhorn_divergence(x, y, a, b, eps=0.3, tol=1e-9)
    got = sinkhorn_divergence(x, y, a, b, eps=0.3, tol=1e-9, sync=False)
    assert torch.equal(got, ref)
    with pytest.raises(divkit.Error, match="sync must be a bool"):
        sinkhorn_divergence(x, y, a, b, eps=0.3, sync="off")
