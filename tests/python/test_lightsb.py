"""Light Schrodinger Bridge (divkit.lightsb / divkit.ot.LightSB): the objective against a float64
formula written here (the official code's loss: log C(x) - log v(y)); Gaussian-to-Gaussian
bridges, where the entropic OT plan is known in closed form (per coordinate for diagonal
covariances: Cov(x, y) = c with c^2 + eps c = a^2 b^2): the closed-form parameters reproduce the
conditional plans' means and covariances, the objective is smallest there, and fit() from
samples recovers them; sampling matches the conditional moments; bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import divkit
from divkit import lightsb


def ref_objective(x, y, log_alpha, r, log_s, eps):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    la = np.asarray(log_alpha, np.float64)
    r, s = np.asarray(r, np.float64), np.exp(np.asarray(log_s, np.float64))
    alpha = np.exp(la) / np.exp(la).sum()
    k, d = r.shape
    lc = []
    for xi in x:
        t = [
            math.log(alpha[j]) + (0.5 * (xi * s[j] * xi).sum() + r[j] @ xi) / eps for j in range(k)
        ]
        lc.append(np.logaddexp.reduce(t))
    lv = []
    for yi in y:
        t = []
        for j in range(k):
            var = eps * s[j]
            logn = -0.5 * (((yi - r[j]) ** 2) / var).sum() - 0.5 * np.log(2 * np.pi * var).sum()
            t.append(math.log(alpha[j]) + logn)
        lv.append(np.logaddexp.reduce(t))
    return float(np.mean(lc) - np.mean(lv))


def closed_form(m0, a, m1, b, eps):
    """Per coordinate: the entropic OT plan between N(m0, a^2) and N(m1, b^2) with cost
    (x - y)^2 / 2 and regularization eps; y | x ~ N(m1 + (c/a^2)(x - m0), b^2 - c^2/a^2)."""
    c = 0.5 * (-eps + np.sqrt(eps * eps + 4 * a * a * b * b))
    slope = c / (a * a)
    return slope, m1 - slope * m0, b * b - c * c / (a * a)


def test_objective_matches_float64_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, generator=g, dtype=torch.float64)
    y = torch.randn(5, 3, generator=g, dtype=torch.float64) + 1
    la = torch.randn(4, generator=g, dtype=torch.float64)
    r = torch.randn(4, 3, generator=g, dtype=torch.float64)
    ls = torch.randn(4, 3, generator=g, dtype=torch.float64) * 0.3
    for eps in (0.1, 1.0):
        got = float(lightsb.lightsb_objective(x, y, la, r, ls, eps))
        assert got == pytest.approx(ref_objective(x, y, la, r, ls, eps), rel=1e-12, abs=1e-12)
    # float32 parameters: the same value to single precision.
    got32 = float(
        lightsb.lightsb_objective(x.float(), y.float(), la.float(), r.float(), ls.float(), 0.5)
    )
    assert got32 == pytest.approx(ref_objective(x, y, la, r, ls, 0.5), rel=1e-5)


EPS = 0.5
M0, A = np.array([0.0, 1.0]), np.array([1.0, 0.5])
M1, B = np.array([2.0, -1.0]), np.array([0.7, 1.5])


def gaussian_model():
    slope, icpt, var = closed_form(M0, A, M1, B, EPS)
    m = lightsb.LightSB(2, n_potentials=1, epsilon=EPS, dtype=torch.float64)
    with torch.no_grad():
        m.r.copy_(torch.tensor(icpt)[None])
        m.log_s.copy_(torch.log(torch.tensor(slope))[None])
    return m, slope, icpt, var


def test_closed_form_parameters_give_the_entropic_ot_conditionals():
    m, slope, icpt, var = gaussian_model()
    x = torch.tensor([[0.0, 0.0], [1.0, -2.0], [-0.5, 3.0]], dtype=torch.float64)
    c = m.conditional(x)
    torch.testing.assert_close(c.means[:, 0], torch.tensor(icpt) + torch.tensor(slope) * x)
    torch.testing.assert_close(c.variances[:, 0], torch.tensor(var).expand(3, 2))
    # Sampling: empirical moments of y | x.
    y = m.sample(x, 20000, generator=torch.Generator().manual_seed(1))
    assert y.shape == (3, 20000, 2)
    torch.testing.assert_close(y.mean(1), c.means[:, 0], atol=0.03, rtol=0)
    torch.testing.assert_close(y.var(1), c.variances[:, 0], rtol=0.05, atol=0)
    # The bridge at time t: mean t E[y | x] + (1 - t) x, variance t^2 Var(y | x) + t (1 - t) eps.
    xt = m.sample_at_time(x[:1].expand(20000, 2), 0.3, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(xt.mean(0), 0.3 * c.means[0, 0] + 0.7 * x[0], atol=0.03, rtol=0)
    v = 0.09 * torch.tensor(var) + 0.21 * EPS
    torch.testing.assert_close(xt.var(0), v, rtol=0.05, atol=0)
    # The objective (exact expectations over large samples) is smallest at the closed form.
    g = torch.Generator().manual_seed(2)
    x0 = torch.tensor(M0) + torch.tensor(A) * torch.randn(
        20000, 2, generator=g, dtype=torch.float64
    )
    x1 = torch.tensor(M1) + torch.tensor(B) * torch.randn(
        20000, 2, generator=g, dtype=torch.float64
    )
    best = float(m.objective(x0, x1).detach())
    for dr, ds in (
        ([0.2, 0], [0, 0]),
        ([0, -0.2], [0, 0]),
        ([0, 0], [0.2, 0]),
        ([0, 0], [0, -0.2]),
    ):
        mp, *_ = gaussian_model()
        with torch.no_grad():
            mp.r += torch.tensor(dr)
            mp.log_s += torch.tensor(ds)
        assert float(mp.objective(x0, x1).detach()) > best


@pytest.fixture
def one_thread():
    # Many tiny ops: one thread is several times faster than a contended pool.
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def test_fit_recovers_the_gaussian_bridge(one_thread):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    n = 4000
    x0 = torch.tensor(M0) + torch.tensor(A) * torch.randn(n, 2, generator=g, dtype=torch.float64)
    x1 = torch.tensor(M1) + torch.tensor(B) * torch.randn(n, 2, generator=g, dtype=torch.float64)
    m = lightsb.LightSB(2, n_potentials=2, epsilon=EPS, dtype=torch.float64)
    hist = m.fit(x0, x1, steps=1500, lr=2e-2, batch_size=512, generator=g)
    assert hist[-1] < hist[0]
    _, slope, icpt, var = gaussian_model()
    xq = torch.tensor([[0.0, 1.0], [1.0, 0.5], [-1.0, 1.5]], dtype=torch.float64)
    c = m.conditional(xq)
    w = c.log_weights.exp()[..., None]
    mean = (w * c.means).sum(1)
    second = (w * (c.variances + c.means**2)).sum(1)
    cvar = second - mean**2
    torch.testing.assert_close(
        mean, torch.tensor(icpt) + torch.tensor(slope) * xq, atol=0.1, rtol=0
    )
    torch.testing.assert_close(cvar, torch.tensor(var).expand(3, 2), rtol=0.2, atol=0.02)


def test_exposed_in_ot_and_bad_input():
    assert divkit.ot.LightSB is lightsb.LightSB
    z = torch.zeros(3, 2)
    with pytest.raises(divkit.Error, match="lightsb_objective: epsilon must be finite and > 0"):
        lightsb.lightsb_objective(z, z, torch.zeros(1), torch.zeros(1, 2), torch.zeros(1, 2), 0.0)
    with pytest.raises(divkit.Error, match="lightsb_objective: log_alpha has 2 entries"):
        lightsb.lightsb_objective(z, z, torch.zeros(2), torch.zeros(1, 2), torch.zeros(1, 2), 1.0)
    with pytest.raises(divkit.Error, match="lightsb_objective: y must have dimension d = 2"):
        lightsb.lightsb_objective(
            z, torch.zeros(3, 3), torch.zeros(1), torch.zeros(1, 2), torch.zeros(1, 2), 1.0
        )
    with pytest.raises(divkit.Error, match="LightSB: n_potentials must be an int >= 1"):
        lightsb.LightSB(2, n_potentials=0)
    m = lightsb.LightSB(2)
    with pytest.raises(divkit.Error, match="LightSB.conditional: x must have dimension d = 2"):
        m.conditional(torch.zeros(3, 3))
    with pytest.raises(divkit.Error, match="LightSB.sample_at_time: t must be in"):
        m.sample_at_time(z, 1.5)
    with pytest.raises(divkit.Error, match="LightSB.fit: x1 must be"):
        m.fit(z, torch.zeros(3, 1), steps=1)
