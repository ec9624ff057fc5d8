"""divkit.ot.sinkhorn's PyTorch fallback (backend="torch") against the C++ core and POT."""

from __future__ import annotations

import warnings

import numpy as np
import ot as pot
import pytest
import torch

import divkit
from divkit.ot import sinkhorn, sinkhorn_divergence

FIELDS = ("f", "g", "transport_cost", "reg_cost")


def clouds(B, n, m, d, dtype, seed=0, weights=False):
    gen = torch.Generator().manual_seed(seed)
    lead = (B,) if B else ()
    x = torch.randn(*lead, n, d, generator=gen, dtype=torch.float64).to(dtype)
    y = (torch.randn(*lead, m, d, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    if not weights:
        return x, y, None, None
    a = torch.rand(*lead, n, generator=gen, dtype=torch.float64) + 0.1
    b = torch.rand(*lead, m, generator=gen, dtype=torch.float64) + 0.1
    a = a / a.sum(-1, keepdim=True)
    b = b / b.sum(-1, keepdim=True)
    return x, y, a.to(dtype), b.to(dtype)


def rel(got, want):
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-300))


def both(*args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return (
            sinkhorn(*args, backend="torch", **kw),
            sinkhorn(*args, backend="core", **kw),
        )


def assert_same(r_t, r_c, tol, same_iter=True):
    for k in FIELDS:
        assert rel(getattr(r_t, k), getattr(r_c, k)) <= tol, k
        assert getattr(r_t, k).dtype == getattr(r_c, k).dtype, k
    # The residual is a small difference: compared in absolute terms, to the scale of the plan.
    assert abs(r_t.marginal_error.double() - r_c.marginal_error).max() <= max(tol, 1e-12)
    if same_iter:
        assert torch.equal(r_t.n_iter, r_c.n_iter)
        assert torch.equal(r_t.converged, r_c.converged)
    if r_c.plan is not None:
        assert r_t.plan.dtype == r_c.plan.dtype
        assert rel(r_t.plan, r_c.plan) <= tol


# (options, B): balanced and unbalanced, kernel domain (the default cache) and on-the-fly log
# domain (cost_cache_mib=0), p = 1 and 2, d > 8 (the expanded cost), eps scaling, check_every.
CASES = [
    ({}, 0),
    ({}, 3),
    ({"cost_cache_mib": 0}, 2),
    ({"rho": 1.0}, 2),
    ({"rho": (0.5, float("inf")), "cost_cache_mib": 0}, 0),
    ({"p": 1}, 2),
    ({"eps_scaling": 0.5}, 3),
    ({"eps_scaling": 0.7, "rho": 2.0}, 2),
    ({"check_every": 4, "tol": 1e-9}, 0),
    ({"d": 12}, 2),
]


@pytest.mark.parametrize("weights", [False, True], ids=["uniform", "weights"])
@pytest.mark.parametrize("opts,B", CASES, ids=lambda v: str(v).replace(" ", ""))
def test_fp64_matches_core(opts, B, weights):
    opts = dict(opts)
    d = opts.pop("d", 3)
    x, y, a, b = clouds(B, 23, 31, d, torch.float64, seed=1, weights=weights)
    r_t, r_c = both(x, y, a, b, eps=0.5, max_iter=300, return_plan=True, **opts)
    assert_same(r_t, r_c, 1e-10)


def test_fp64_cost_matrix_and_symmetric():
    x, y, a, b = clouds(2, 17, 19, 2, torch.float64, seed=2, weights=True)
    C = torch.cdist(x, y) ** 2
    for kw in ({}, {"rho": 0.7}, {"eps_scaling": 0.5}):
        assert_same(*both(None, None, a, b, cost=C, eps=0.1, return_plan=True, **kw), 1e-10)
    for kw in ({}, {"rho": 1.5}, {"check_every": 3}):
        assert_same(*both(x, x, a, a, eps=0.05, symmetric=True, **kw), 1e-10)


def test_fp32_matches_core():
    # The core iterates in float32, the fallback in float64: a fixed number of iterations
    # (tol = 0) and float32's tolerance.
    x, y, a, b = clouds(2, 40, 30, 3, torch.float32, seed=3, weights=True)
    for kw in ({}, {"rho": 1.0}, {"cost_cache_mib": 0}, {"p": 1}):
        r_t, r_c = both(x, y, a, b, eps=0.2, tol=0.0, max_iter=100, return_plan=True, **kw)
        for k in FIELDS:
            assert rel(getattr(r_t, k), getattr(r_c, k)) <= 2e-5, (kw, k)
            assert getattr(r_t, k).dtype == torch.float32
        assert r_t.plan.dtype == torch.float32 and rel(r_t.plan, r_c.plan) <= 2e-4
        # float32's residual may reach exactly 0 (a fixed point) before max_iter.
        assert bool((r_c.n_iter <= r_t.n_iter).all())


def _grads(backend, dtype, p, rho, cost):
    x, y, a, b = clouds(2, 13, 11, 3, torch.float64, seed=4, weights=True)
    ins = [a, b] + ([torch.cdist(x, y) ** p] if cost else [x, y])
    ins = [t.to(dtype).requires_grad_() for t in ins]
    a, b = ins[0], ins[1]
    # float32: a fixed number of iterations (its residual cannot reach 1e-12).
    fp64 = dtype == torch.float64
    kw = dict(eps=0.3, p=p, rho=rho, tol=1e-12 if fp64 else 0.0, max_iter=5000 if fp64 else 400)
    kw.update(backend=backend, warn=False)
    if cost:
        r = sinkhorn(None, None, a, b, cost=ins[2], **kw)
    else:
        r = sinkhorn(ins[2], ins[3], a, b, **kw)
    go = torch.tensor([0.7, -1.3], dtype=dtype)
    (r.reg_cost * go).sum().backward()
    return [t.grad for t in ins]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize(
    "p,rho,cost",
    [(2, None, False), (1, None, False), (2, 0.8, False), (2, None, True), (2, 0.8, True)],
)
def test_gradients_match_core(dtype, p, rho, cost):
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    for gt, gc in zip(_grads("torch", dtype, p, rho, cost), _grads("core", dtype, p, rho, cost)):
        assert gt.dtype == gc.dtype == dtype
        assert rel(gt, gc) <= tol


def test_sinkhorn_divergence_backend_torch():
    x, y, a, b = clouds(0, 20, 25, 2, torch.float64, seed=5, weights=True)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    vals = [
        sinkhorn_divergence(xi, y, a, b, eps=0.1, backend=bk)
        for xi, bk in zip(xs, ("torch", "core"))
    ]
    for v, xi in zip(vals, xs):
        v.backward()
    assert rel(vals[0], vals[1]) <= 1e-10 and rel(xs[0].grad, xs[1].grad) <= 1e-9


def test_against_pot():
    x, y, a, b = clouds(0, 30, 20, 2, torch.float64, seed=6, weights=True)
    M = (torch.cdist(x, y) ** 2).numpy()
    an, bn = a.numpy(), b.numpy()
    r = sinkhorn(x, y, a, b, eps=0.5, tol=1e-12, max_iter=10000, return_plan=True, backend="torch")
    P = pot.sinkhorn(an, bn, M, 0.5, method="sinkhorn_log", stopThr=1e-13, numItermax=10000)
    assert np.abs(r.plan.numpy() - P).max() <= 1e-10 * P.max()
    r = sinkhorn(
        x, y, a, b, eps=0.5, rho=2.0, tol=1e-13, max_iter=10000, return_plan=True, backend="torch"
    )
    P = pot.sinkhorn_unbalanced(
        an, bn, M, 0.5, 2.0, method="sinkhorn", stopThr=1e-14, numItermax=10000
    )
    assert np.abs(r.plan.numpy() - P).max() <= 1e-9 * P.max()


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"eps": 0.0}, "eps"),
        ({"eps": float("nan")}, "eps"),
        ({"p": 3}, "p must be 1 or 2"),
        ({"tol": -1.0}, "tol must be >= 0"),
        ({"max_iter": 0}, "max_iter must be >= 1"),
        ({"check_every": 0}, "check_every must be >= 1"),
        ({"eps_scaling": 1.5}, "eps_scaling"),
        ({"rho": -1.0}, "rho"),
        ({"a": torch.tensor([0.5, -0.5, 1.0], dtype=torch.float64)}, "a has a negative weight"),
        ({"b": torch.tensor([0.0, 0.0], dtype=torch.float64)}, "b sums to 0"),
        ({"b": torch.tensor([float("nan"), 1.0], dtype=torch.float64)}, "b has a non-finite"),
        ({"b": torch.tensor([2.0, 1.0], dtype=torch.float64)}, "equal total mass"),
        ({"x": torch.tensor([[0.0], [float("inf")], [1.0]], dtype=torch.float64)}, "x has a non"),
        ({"symmetric": True}, "symmetric needs"),
        ({"y": torch.ones(2, 1, dtype=torch.float32)}, "y must have x's dtype"),
    ],
)
def test_errors_name_the_function_and_argument(kw, match):
    args = dict(
        x=torch.zeros(3, 1, dtype=torch.float64),
        y=torch.ones(2, 1, dtype=torch.float64),
        a=None,
        b=None,
        eps=0.1,
    )
    args.update(kw)
    for backend in ("torch", "core"):
        with pytest.raises(divkit.Error, match=f"^sinkhorn: .*{match}"):
            sinkhorn(**args, backend=backend)


def test_zero_weights():
    x, y, a, b = clouds(2, 9, 8, 2, torch.float64, seed=7, weights=True)
    a[0, 3] = 0.0
    b[1, :2] = 0.0
    a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    for kw in ({}, {"rho": 1.0}):
        ins = [t.clone().requires_grad_() for t in (x, y, a, b) for _ in range(2)]
        rs = [
            sinkhorn(*ins[k::2], eps=0.2, return_plan=True, backend=bk, **kw)
            for k, bk in enumerate(("torch", "core"))
        ]
        assert_same(rs[0], rs[1], 1e-10)
        for k, r in enumerate(rs):
            r.reg_cost.sum().backward()
        for u, v in zip(ins[0::2], ins[1::2]):
            assert rel(u.grad, v.grad) <= 1e-9


def test_cost_errors():
    C = torch.tensor([[0.0, float("nan")]], dtype=torch.float64)
    with pytest.raises(divkit.Error, match="^sinkhorn: cost has a non-finite value"):
        sinkhorn(None, None, cost=C, eps=0.1, backend="torch")


def test_result_lives_on_the_input_device():
    # CPU here; the same code runs on CUDA (no .cpu() anywhere in the fallback).
    x, y, a, b = clouds(0, 5, 6, 2, torch.float64)
    r = sinkhorn(x, y, eps=0.5, backend="torch", return_plan=True)
    assert all(t.device == x.device for t in r if isinstance(t, torch.Tensor))


def test_monge_gap_and_kd_loss_through_the_fallback(monkeypatch):
    x, y, _, _ = clouds(0, 12, 12, 2, torch.float64, seed=8)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    vals = [
        divkit.ot.monge_gap(xi, y, eps=0.2, backend=bk) for xi, bk in zip(xs, ("torch", "core"))
    ]
    for v in vals:
        v.backward()
    assert rel(vals[0], vals[1]) <= 1e-10 and rel(xs[0].grad, xs[1].grad) <= 1e-9
    # sinkhorn_kd_loss's backend= reaches its Sinkhorn iterations (the fallback is called).
    s, t = (torch.randn(6, 10, generator=torch.Generator().manual_seed(k)) for k in (9, 10))
    want = divkit.ot.sinkhorn_kd_loss(s.double(), t.double(), backend="core")
    calls = []
    orig = divkit.backends.torch_ot.sinkhorn
    monkeypatch.setattr(
        divkit.backends.torch_ot, "sinkhorn", lambda *a, **k: calls.append(1) or orig(*a, **k)
    )
    got = divkit.ot.sinkhorn_kd_loss(s.double(), t.double(), backend="torch")
    assert calls and rel(got, want) <= 1e-10
    with pytest.raises(divkit.Error, match="sinkhorn_kd_loss: unknown backend .gpu."):
        divkit.ot.sinkhorn_kd_loss(s, t, backend="gpu")
