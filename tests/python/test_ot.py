"""divkit.ot against POT (installed as a test dependency) and independent torch computations."""

from __future__ import annotations

import contextlib
import io
import math
import warnings

import numpy as np
import ot as pot
import pytest
import torch

import divkit
from divkit import ot as dot


def clouds(n=40, m=50, d=3, seed=0, shift=0.5, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(m, d, generator=g, dtype=torch.float64) * 1.2 + shift
    a = torch.rand(n, generator=g, dtype=torch.float64) + 0.2
    b = torch.rand(m, generator=g, dtype=torch.float64) + 0.2
    return x.to(dtype), y.to(dtype), (a / a.sum()).to(dtype), (b / b.sum()).to(dtype)


def pot_cost(x, y, p):
    return pot.dist(
        x.double().numpy(), y.double().numpy(), metric="sqeuclidean" if p == 2 else "euclidean"
    )


def entropic_cost(P, M, a, b, eps):
    """<P, M> + eps KL(P || a b^T), the primal value equal to our reg_cost at convergence."""
    ab = np.outer(a, b)
    mask = P > 0
    kl = np.sum(P[mask] * np.log(P[mask] / ab[mask])) - P.sum() + ab.sum()
    return float((P * M).sum() + eps * kl)


@pytest.mark.parametrize("cache_mib", [64.0, 0.0])  # cost cached / computed on the fly
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("d", [2, 16, 64])
def test_sinkhorn_matches_pot_log(p, d, cache_mib):
    x, y, a, b = clouds(d=d)
    M = pot_cost(x, y, p)
    eps = 0.1 * M.mean()
    res = dot.sinkhorn(
        x,
        y,
        a,
        b,
        eps=eps,
        p=p,
        tol=1e-11,
        max_iter=5000,
        return_plan=True,
        cost_cache_mib=cache_mib,
    )
    assert bool(res.converged)
    P, log = pot.sinkhorn(
        a.numpy(),
        b.numpy(),
        M,
        eps,
        method="sinkhorn_log",
        stopThr=1e-13,
        numItermax=100000,
        log=True,
    )
    np.testing.assert_allclose(res.plan.numpy(), P, atol=1e-10)
    assert res.transport_cost.item() == pytest.approx(float((P * M).sum()), rel=1e-9)
    assert res.reg_cost.item() == pytest.approx(
        entropic_cost(P, M, a.numpy(), b.numpy(), eps), rel=1e-8
    )
    # POT: P = diag(u) K diag(v), K = exp(-M / eps): f / eps + log a = log u + const.
    f_pot = eps * (log["log_u"] - np.log(a.numpy()))
    f = res.f.numpy()
    np.testing.assert_allclose(f - f.mean(), f_pot - f_pot.mean(), atol=1e-8)
    # The reported marginal error is the plan's.
    err = np.abs(res.plan.numpy().sum(1) - a.numpy()).sum()
    assert res.marginal_error.item() == pytest.approx(err, rel=1e-6, abs=1e-15)
    assert np.abs(res.plan.numpy().sum(0) - b.numpy()).sum() < 1e-12


def test_sinkhorn_float32_close_to_float64():
    x, y, a, b = clouds(n=200, m=170, d=3)
    eps = 0.2
    r64 = dot.sinkhorn(x, y, a, b, eps=eps, tol=1e-9)
    r32 = dot.sinkhorn(x.float(), y.float(), a.float(), b.float(), eps=eps, tol=1e-6)
    assert r32.reg_cost.dtype == torch.float32
    assert r32.reg_cost.item() == pytest.approx(r64.reg_cost.item(), rel=1e-5)
    assert r32.transport_cost.item() == pytest.approx(r64.transport_cost.item(), rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cached_and_on_the_fly_costs_match_pot_at_d64(dtype):
    # The benchmark's problem at a test size: n = 400, m = 300, d = 64; the cost cache (GEMM
    # expansion) and the on-the-fly path against POT on its own cost matrix.
    x, y, a, b = clouds(n=400, m=300, d=64, seed=21, dtype=dtype)
    M = pot_cost(x, y, 2)
    eps = 0.05 * M.mean()
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    # (POT's plain solver: no underflow at this eps, max C / eps = 38; 30 iterations)
    # (the float32 weights renormalized in fp64: otherwise their masses differ by ~1e-8 and POT
    # cannot reach 1e-13)
    a64, b64 = a.double(), b.double()
    P = pot.sinkhorn(
        (a64 / a64.sum()).numpy(),
        (b64 / b64.sum()).numpy(),
        M,
        eps,
        method="sinkhorn",
        stopThr=1e-13,
        numItermax=20000,
    )
    out = {}
    for mib in (64.0, 0.0):
        r = dot.sinkhorn(
            x, y, a, b, eps=eps, tol=tol, max_iter=10000, return_plan=True, cost_cache_mib=mib
        )
        assert bool(r.converged)
        out[mib] = r
        pl = r.plan.double().numpy()
        np.testing.assert_allclose(pl, P, atol=(2e-6 if dtype == torch.float32 else 1e-11))
        assert r.transport_cost.item() == pytest.approx(
            float((P * M).sum()), rel=(1e-5 if dtype == torch.float32 else 1e-10)
        )
    rel = 1e-5 if dtype == torch.float32 else 1e-12
    assert out[64.0].reg_cost.item() == pytest.approx(out[0.0].reg_cost.item(), rel=rel)
    # The cache also serves the gradients (x and y are still used for them).
    xr = x.clone().requires_grad_()
    dot.sinkhorn(xr, y, a, b, eps=eps, tol=tol, max_iter=10000).reg_cost.backward()
    gexp = 2 * (
        a[:, None].double() * x.double() - torch.from_numpy(P) @ y.double()
    )  # sum_j P_ij 2 (x_i - y_j)
    torch.testing.assert_close(
        xr.grad.double(), gexp, rtol=0, atol=(1e-4 if dtype == torch.float32 else 1e-9)
    )


def test_cost_matrix_histograms_match_pot():
    g = torch.Generator().manual_seed(3)
    C = torch.rand(30, 20, generator=g, dtype=torch.float64)
    a = torch.rand(30, generator=g, dtype=torch.float64)
    b = torch.rand(20, generator=g, dtype=torch.float64)
    a, b = a / a.sum(), b / b.sum()
    res = dot.sinkhorn(
        None, None, a, b, eps=0.05, cost=C, tol=1e-11, max_iter=10000, return_plan=True
    )
    P = pot.sinkhorn(
        a.numpy(),
        b.numpy(),
        C.numpy(),
        0.05,
        method="sinkhorn_log",
        stopThr=1e-13,
        numItermax=100000,
    )
    np.testing.assert_allclose(res.plan.numpy(), P, atol=1e-10)
    # Gradient w.r.t. the cost is the plan.
    Cr = C.clone().requires_grad_()
    dot.sinkhorn(None, None, a, b, eps=0.05, cost=Cr, tol=1e-11, max_iter=10000).reg_cost.backward()
    np.testing.assert_allclose(Cr.grad.numpy(), P, atol=1e-10)


def test_unbalanced_matches_pot_kl():
    x, y, a, b = clouds(n=25, m=35, d=2)
    b = b * 1.5  # unequal masses are allowed when unbalanced
    M = pot_cost(x, y, 2)
    eps, rho = 0.3, 1.0
    res = dot.sinkhorn(x, y, a, b, eps=eps, rho=rho, tol=1e-12, max_iter=10000, return_plan=True)
    P = pot.unbalanced.sinkhorn_unbalanced(
        a.numpy(),
        b.numpy(),
        M,
        eps,
        rho,
        reg_type="kl",
        method="sinkhorn",
        stopThr=1e-14,
        numItermax=100000,
    )
    np.testing.assert_allclose(res.plan.numpy(), P, atol=1e-9)


def test_batch_equals_single_problems():
    xs, ys = zip(*[clouds(n=20, m=15, d=3, seed=s)[:2] for s in range(3)])
    X, Y = torch.stack(xs), torch.stack(ys)
    res = dot.sinkhorn(X, Y, eps=0.5, tol=1e-10)
    assert res.reg_cost.shape == (3,) and res.f.shape == (3, 20)
    for i in range(3):
        single = dot.sinkhorn(xs[i], ys[i], eps=0.5, tol=1e-10)
        assert single.reg_cost.item() == res.reg_cost[i].item()
        assert torch.equal(single.g, res.g[i])


def test_approaches_exact_ot_as_eps_shrinks():
    x, y, a, b = clouds(n=30, m=30, d=2, seed=5)
    M = pot_cost(x, y, 2)
    exact = pot.emd2(a.numpy(), b.numpy(), M)
    gaps = []
    for eps in (0.3, 0.05, 0.01):
        r = dot.sinkhorn(x, y, a, b, eps=eps, eps_scaling=0.8, tol=1e-6, max_iter=50000)
        assert bool(r.converged)
        gaps.append(abs(r.transport_cost.item() - exact))
    assert gaps[2] < gaps[0]
    assert gaps[2] < 2e-2 * exact


def test_gradcheck_points_and_unbalanced_weights():
    x, y, a, b = clouds(n=6, m=5, d=2, seed=7)
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    for p in (1, 2):
        f = lambda xx, yy: (
            dot.sinkhorn(xx, yy, a, b, eps=0.5, p=p, tol=1e-14, max_iter=100000).reg_cost
        )
        assert torch.autograd.gradcheck(f, (xr, yr), eps=1e-6, atol=1e-6)
    ar, br = a.clone().requires_grad_(), b.clone().requires_grad_()
    g = lambda aa, bb: (
        dot.sinkhorn(x, y, aa, bb, eps=0.5, rho=2.0, tol=1e-14, max_iter=100000).reg_cost
    )
    assert torch.autograd.gradcheck(g, (ar, br), eps=1e-6, atol=1e-6)


def test_balanced_weight_gradient_along_zero_sum_direction():
    x, y, a, b = clouds(n=8, m=7, d=2, seed=8)
    ar = a.clone().requires_grad_()
    val = lambda aa: dot.sinkhorn(x, y, aa, b, eps=0.4, tol=1e-14, max_iter=100000).reg_cost
    val(ar).backward()
    h = 1e-6
    e = torch.zeros_like(a)
    e[0], e[3] = 1.0, -1.0
    fd = (val(a + h * e) - val(a - h * e)).item() / (2 * h)
    assert (ar.grad * e).sum().item() == pytest.approx(fd, abs=1e-7)


def test_sinkhorn_divergence_properties():
    x, y, a, b = clouds(n=30, m=25, d=3, seed=9)
    kw = dict(eps=2.0, tol=1e-9, max_iter=20000)
    s = dot.sinkhorn_divergence(x, y, a, b, **kw)
    assert s.item() > 0
    assert dot.sinkhorn_divergence(y, x, b, a, **kw).item() == pytest.approx(s.item(), rel=1e-8)
    assert abs(dot.sinkhorn_divergence(x, x, a, a, **kw).item()) < 1e-10
    # Moving y towards x lowers the divergence; its gradient is finite-difference exact.
    yr = y.clone().requires_grad_()
    dot.sinkhorn_divergence(x, yr, a, b, **kw).backward()
    v = torch.randn_like(y)
    h = 1e-6
    fd = (
        dot.sinkhorn_divergence(x, y + h * v, a, b, **kw)
        - dot.sinkhorn_divergence(x, y - h * v, a, b, **kw)
    ).item() / (2 * h)
    assert (yr.grad * v).sum().item() == pytest.approx(fd, rel=1e-5, abs=1e-8)


def test_sinkhorn_divergence_small_eps_matches_pot():
    # eps = 3% of the mean cost, where alternating updates of the self-terms are slow; the
    # self-terms use the averaged symmetric update.
    x, y, a, b = clouds(n=40, m=35, d=2, seed=22)
    eps = 0.03 * pot_cost(x, y, 2).mean()
    kw = dict(eps=eps, tol=1e-9, max_iter=200000)
    s = dot.sinkhorn_divergence(x, y, a, b, **kw).item()
    assert s > 0
    assert dot.sinkhorn_divergence(x, x, a, a, **kw).item() == pytest.approx(0.0, abs=1e-12)
    xx = dot.sinkhorn(x, x, a, a, symmetric=True, **kw)
    yy = dot.sinkhorn(y, y, b, b, symmetric=True, **kw)
    xy = dot.sinkhorn(x, y, a, b, **kw)
    assert bool(xx.converged) and bool(yy.converged) and bool(xy.converged)
    assert torch.equal(xx.f, xx.g)

    # POT's alternating log-domain solver does not reach 1e-9 on the self-terms here in 20000
    # iterations (we need ~22 passes); after 2000 its values are within ~1e-6 (measured).
    it = 2000

    def pot_values(u, v, wu, wv):
        M = pot_cost(u, v, 2)
        P = pot.sinkhorn(
            wu.numpy(),
            wv.numpy(),
            M,
            eps,
            method="sinkhorn_log",
            stopThr=1e-12,
            numItermax=it,
            warn=False,
        )
        return entropic_cost(P, M, wu.numpy(), wv.numpy(), eps), float((P * M).sum())

    (rxy, lxy), (rxx, lxx), (ryy, lyy) = (
        pot_values(x, y, a, b),
        pot_values(x, x, a, a),
        pot_values(y, y, b, b),
    )
    assert xy.reg_cost.item() == pytest.approx(rxy, rel=1e-9)
    assert xx.reg_cost.item() == pytest.approx(rxx, rel=2e-6)
    assert yy.reg_cost.item() == pytest.approx(ryy, rel=2e-6)
    assert s == pytest.approx(rxy - 0.5 * (rxx + ryy), rel=2e-6)
    # POT's own divergence debiases the linear costs <P, C> (empirical_sinkhorn2), clipped at 0.
    ref = pot.bregman.empirical_sinkhorn_divergence(
        x.numpy(),
        y.numpy(),
        eps,
        a.numpy(),
        b.numpy(),
        method="sinkhorn_log",
        numIterMax=it,
        stopThr=1e-12,
        warn=False,
    )
    ours = xy.transport_cost - 0.5 * (xx.transport_cost + yy.transport_cost)
    assert ours.item() == pytest.approx(float(ref), rel=1e-5)
    assert float(ref) == pytest.approx(lxy - 0.5 * (lxx + lyy), rel=1e-12)
    with pytest.raises(divkit.Error, match="symmetric needs y equal to x"):
        dot.sinkhorn(x, x + 1e-3, a, a, eps=eps, symmetric=True)


def test_nonconvergence_is_reported_with_a_warning():
    x, y, a, b = clouds(n=30, m=30, d=2, seed=10)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        r = dot.sinkhorn(x, y, a, b, eps=0.001, tol=1e-12, max_iter=5)
    assert not bool(r.converged)
    assert r.n_iter.item() == 5
    assert r.marginal_error.item() > 1e-12
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dot.sinkhorn(x, y, a, b, eps=0.001, tol=1e-12, max_iter=5, warn=False)


def sinkd_reference(zs, zt, T, eps, iters):
    P, Q = torch.softmax(zs / T, -1), torch.softmax(zt / T, -1)
    W = (P[:, None, :] - Q[None, :, :]).abs().sum(-1)
    B = W.shape[0]
    f = torch.zeros(B, dtype=W.dtype)
    g = torch.zeros(B, dtype=W.dtype)
    lw = -math.log(B)
    for _ in range(iters):
        f = -eps * torch.logsumexp(lw + (g[None, :] - W.detach()) / eps, 1)
        g = -eps * torch.logsumexp(lw + (f[:, None] - W.detach()) / eps, 0)
    plan = torch.exp(2 * lw + (f[:, None] + g[None, :] - W.detach()) / eps)
    return (plan * W).sum()


def test_sinkhorn_kd_loss_matches_reference_and_gradient():
    g = torch.Generator().manual_seed(11)
    zs = torch.randn(8, 12, generator=g, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(8, 12, generator=g, dtype=torch.float64)
    loss = dot.sinkhorn_kd_loss(zs, zt)
    zs2 = zs.detach().clone().requires_grad_()
    ref = sinkd_reference(zs2, zt, 2.0, 0.1, 20)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-10)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(zs.grad, zs2.grad, rtol=1e-8, atol=1e-12)
    assert dot.sinkhorn_kd_loss(zt, zt).item() < loss.item()


def test_monge_gap_matches_pot_and_gradcheck():
    x, _, _, _ = clouds(n=20, m=20, d=2, seed=12)
    g = torch.Generator().manual_seed(13)
    mapped = x @ torch.tensor([[0.3, 1.0], [-1.0, 0.2]], dtype=torch.float64) + 0.1 * torch.randn(
        20, 2, generator=g, dtype=torch.float64
    )
    eps = 0.2
    val = dot.monge_gap(x, mapped, eps=eps, tol=1e-12, max_iter=20000)
    w = np.full(20, 1 / 20)
    M = pot_cost(x, mapped, 2)
    P = pot.sinkhorn(w, w, M, eps, method="sinkhorn_log", stopThr=1e-13, numItermax=100000)
    expect = float(((x - mapped) ** 2).sum(-1).mean()) - entropic_cost(P, M, w, w, eps)
    assert val.item() == pytest.approx(expect, rel=1e-8)
    mr = mapped.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda mm: dot.monge_gap(x, mm, eps=eps, tol=1e-14, max_iter=100000),
        (mr,),
        eps=1e-6,
        atol=1e-6,
    )


@pytest.mark.parametrize("k,gamma", [(None, 1.0), (None, 0.1), (5, 1.0)])
def test_sparse_ot_matches_pot(k, gamma):
    x, y, a, b = clouds(n=30, m=40, d=2, seed=14)
    C = torch.cdist(x, y) ** 2
    res = dot.sparse_ot(a, b, C, gamma=gamma, k=k, tol=1e-5)
    assert res.plan.is_sparse
    Pd = res.plan.to_dense().numpy()
    with contextlib.redirect_stdout(io.StringIO()):  # POT's projection prints shapes
        P = pot.smooth.smooth_ot_semi_dual(
            a.numpy(),
            b.numpy(),
            C.numpy(),
            gamma,
            reg_type="l2" if k is None else "sparsity_constrained",
            max_nz=k,
            stopThr=1e-12,
        )
    np.testing.assert_allclose(Pd, P, atol=2e-5)
    assert res.converged and res.marginal_error <= 1e-5
    np.testing.assert_allclose(Pd.sum(0), b.numpy(), atol=1e-12)  # columns exact
    if k is not None:
        assert (Pd > 0).sum(0).max() <= k
    assert res.transport_cost.item() == pytest.approx(float((Pd * C.numpy()).sum()), rel=1e-10)
    if k is None:  # strong duality: the semi-dual value is POT's primal objective (both plans
        # meet the marginals to ~1e-5, which bounds the gap)
        primal = float((P * C.numpy()).sum() + 0.5 * gamma * (P * P).sum())
        assert res.reg_cost.item() == pytest.approx(primal, rel=2e-5)


def test_sparse_ot_reg_cost_gradients():
    # Danskin: dV/dcost = P and dV/da = alpha; dV/db against central differences along a
    # direction that keeps the masses equal (b_0 up, b_1 down).
    x, y, a, b = clouds(n=9, m=7, d=2, seed=16)
    C = (torch.cdist(x, y) ** 2).requires_grad_()
    a = a.clone().requires_grad_()
    b = b.clone().requires_grad_()
    kw = dict(gamma=0.4, k=3, tol=1e-13, max_iter=5000)
    res = dot.sparse_ot(a, b, C, **kw)
    res.reg_cost.backward()
    torch.testing.assert_close(C.grad, res.plan.to_dense(), rtol=0, atol=0)
    torch.testing.assert_close(a.grad, res.alpha, rtol=0, atol=0)
    h = 1e-6
    with torch.no_grad():
        e = torch.zeros_like(b)
        e[0], e[1] = h, -h
        fd = (
            dot.sparse_ot(a, b + e, C, **kw).reg_cost - dot.sparse_ot(a, b - e, C, **kw).reg_cost
        ) / (2 * h)
    assert float(b.grad[0] - b.grad[1]) == pytest.approx(float(fd), abs=1e-6)
    Cp = C.detach().clone()
    Cp[2, 3] += h
    Cm = C.detach().clone()
    Cm[2, 3] -= h
    fd_c = (
        dot.sparse_ot(a.detach(), b.detach(), Cp, **kw).reg_cost
        - dot.sparse_ot(a.detach(), b.detach(), Cm, **kw).reg_cost
    ) / (2 * h)
    assert float(C.grad[2, 3]) == pytest.approx(float(fd_c), abs=1e-6)


def test_sparse_ot_reports_non_convergence():
    x, y, a, b = clouds(n=30, m=30, d=2, seed=17)
    C = torch.cdist(x, y) ** 2
    with pytest.warns(RuntimeWarning, match="did not converge"):
        res = dot.sparse_ot(a, b, C, gamma=0.01, tol=1e-14, max_iter=2)
    assert not res.converged and res.n_iter <= 2 and res.marginal_error > 1e-14


def kernel_sums(x, y, a, b, kernel, sigma):
    def k(u, v):
        d2 = ((u[:, None, :] - v[None, :, :]) ** 2).sum(-1)
        return torch.exp(-d2 / (2 * sigma**2)) if kernel == "gaussian" else -d2.clamp_min(0).sqrt()

    return a @ k(x, x) @ a, b @ k(y, y) @ b, a @ k(x, y) @ b


@pytest.mark.parametrize("kernel", ["gaussian", "energy"])
def test_mmd_matches_direct_sums_and_gradcheck(kernel):
    x, y, a, b = clouds(n=15, m=12, d=3, seed=15)
    xx, yy, xy = kernel_sums(x, y, a, b, kernel, 0.8)
    v = dot.mmd(x, y, a, b, kernel=kernel, sigma=0.8)
    assert v.item() == pytest.approx((xx + yy - 2 * xy).item(), rel=1e-12)
    assert abs(dot.mmd(x, x, a, a, kernel=kernel, sigma=0.8).item()) < 1e-12
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda u, w: dot.mmd(u, w, a, b, kernel=kernel, sigma=0.8), (xr, yr)
    )
    # Unweighted MMD with the energy kernel is the energy distance.
    if kernel == "energy":
        x2, y2 = x.numpy(), y.numpy()
        e = (
            2 * pot.dist(x2, y2, "euclidean").mean()
            - pot.dist(x2, x2, "euclidean").mean()
            - pot.dist(y2, y2, "euclidean").mean()
        )
        assert dot.mmd(x, y, kernel="energy").item() == pytest.approx(e, rel=1e-12)


def test_cs_divergence_matches_direct_sums_and_gradcheck():
    x, y, a, b = clouds(n=15, m=12, d=3, seed=16)
    xx, yy, xy = kernel_sums(x, y, a, b, "gaussian", 1.3)
    v = dot.cs_divergence(x, y, a, b, sigma=1.3)
    assert v.item() == pytest.approx(
        (torch.log(xx) + torch.log(yy) - 2 * torch.log(xy)).item(), rel=1e-12
    )
    assert v.item() > 0
    assert abs(dot.cs_divergence(x, x, a, a, sigma=1.3).item()) < 1e-12
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda u, w: dot.cs_divergence(u, w, a, b, sigma=1.3), (xr, yr))


# ---- bad input: each raises divkit.Error (a ValueError) naming the argument ----


def test_bad_input_raises_naming_the_argument():
    x, y, a, b = clouds(n=5, m=4, d=2)
    assert issubclass(divkit.Error, ValueError)
    with pytest.raises(divkit.Error, match="a has a negative weight"):
        dot.sinkhorn(
            x, y, torch.tensor([0.5, -0.1, 0.2, 0.2, 0.2], dtype=torch.float64), b, eps=0.1
        )
    with pytest.raises(divkit.Error, match="equal total mass"):
        dot.sinkhorn(x, y, a, b * 2, eps=0.1)
    xn = x.clone()
    xn[2, 1] = float("nan")
    with pytest.raises(
        divkit.Error, match=r"x has a non-finite value \(NaN or inf\) at \[0, 2, 1\]"
    ):
        dot.sinkhorn(xn, y, eps=0.1)
    for e in (0.0, -1.0, float("inf")):
        with pytest.raises(divkit.Error, match="eps must be finite and > 0"):
            dot.sinkhorn(x, y, eps=e)
    with pytest.raises(divkit.Error, match="y must have shape"):
        dot.sinkhorn(x, torch.randn(4, 3, dtype=torch.float64), eps=0.1)
    with pytest.raises(divkit.Error, match="a must have shape"):
        dot.sinkhorn(x, y, a[:3], b, eps=0.1)
    with pytest.raises(divkit.Error, match="p must be 1 or 2"):
        dot.sinkhorn(x, y, eps=0.1, p=3)
    with pytest.raises(divkit.Error, match="max_iter must be >= 1"):
        dot.sinkhorn(x, y, eps=0.1, max_iter=0)
    with pytest.raises(divkit.Error, match="cost_cache_mib must be finite and >= 0"):
        dot.sinkhorn(x, y, eps=0.1, cost_cache_mib=-1)
    with pytest.raises(divkit.Error, match="y must have x's dtype"):
        dot.sinkhorn(x, y.float(), eps=0.1)
    C = torch.rand(5, 4, dtype=torch.float64)
    with pytest.raises(divkit.Error, match="k must be >= 1"):
        dot.sparse_ot(a, b, C, gamma=1.0, k=0)
    with pytest.raises(divkit.Error, match="gamma must be finite and > 0"):
        dot.sparse_ot(a, b, C, gamma=0.0)
    with pytest.raises(divkit.Error, match="b must have shape"):
        dot.sparse_ot(a, b[:3], C, gamma=1.0)
    with pytest.raises(divkit.Error, match="a and b must have equal total mass"):
        dot.sparse_ot(a, b * 2, C, gamma=1.0)
    with pytest.raises(divkit.Error, match="cost has a non-finite value"):
        dot.sparse_ot(a, b, C.masked_fill(C > 0.5, float("nan")), gamma=1.0)
    with pytest.raises(divkit.Error, match="sigma must be finite and > 0"):
        dot.mmd(x, y, sigma=-1.0)
    with pytest.raises(divkit.Error, match="kernel must be"):
        dot.mmd(x, y, kernel="laplace")
    with pytest.raises(divkit.Error, match="cs_divergence: y has a non-finite value"):
        dot.cs_divergence(x, torch.full((3, 2), float("nan"), dtype=torch.float64))
    with pytest.raises(divkit.Error, match="teacher_logits must have student_logits' shape"):
        dot.sinkhorn_kd_loss(torch.randn(4, 5), torch.randn(4, 6))
    with pytest.raises(divkit.Error, match="mapped must have x's shape"):
        dot.monge_gap(x, y, eps=0.1)
