"""Wasserstein dependency measure (divkit.wdm / divkit.ot.wasserstein_dependency): on Gaussian
pairs with correlation rho, a critic trained on one sample and evaluated on a fresh one gives an
estimate that increases with rho and is zero within the estimator's noise for independent
pairs, for both Lipschitz variants; the gradient penalty against a hand-computed value; bad
input."""

from __future__ import annotations

import math

import pytest
import torch

import divkit
from divkit import wdm


def pairs(rho: float, n: int, g: torch.Generator, d: int = 2):
    x = torch.randn(n, d, generator=g)
    e = torch.randn(n, d, generator=g)
    return x, rho * x + math.sqrt(1 - rho * rho) * e


@pytest.fixture
def one_thread():
    # Many tiny ops: one thread is several times faster than a contended pool.
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def trained_estimate(rho: float, lipschitz: str, seed: int = 0):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    m = wdm.WassersteinDependency(2, 2, hidden=(16, 16), lipschitz=lipschitz, gp_weight=5.0)
    opt = torch.optim.Adam(m.parameters(), lr=5e-3)
    for _ in range(80):
        x, y = pairs(rho, 128, g)
        out = m(x, y, generator=g)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    # Held-out evaluation: the per-pair differences give the estimator's standard error.
    x, y = pairs(rho, 4000, g)
    with torch.no_grad():
        s = torch.roll(torch.arange(x.shape[0]), 1)
        d = m.critic(torch.cat([x, y], 1)).squeeze(1) - m.critic(torch.cat([x, y[s]], 1)).squeeze(1)
    return float(d.mean()), float(d.std() / math.sqrt(d.numel()))


@pytest.mark.parametrize("lipschitz", ["gradient_penalty", "spectral_norm"])
def test_monotone_in_correlation_and_zero_when_independent(lipschitz, one_thread):
    est = {rho: trained_estimate(rho, lipschitz) for rho in (0.0, 0.5, 0.9)}
    e0, se0 = est[0.0]
    assert abs(e0) < 4 * se0 + 0.02, est
    assert est[0.5][0] > e0 + 4 * est[0.5][1], est
    assert est[0.9][0] > est[0.5][0] + 4 * est[0.9][1], est


def test_penalty_and_estimate_formula():
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    critic = torch.nn.Linear(3, 1)
    x = torch.randn(5, 2, generator=g)
    y = torch.randn(5, 1, generator=g)
    out = wdm.wasserstein_dependency(
        critic, x, y, gp_weight=2.0, generator=torch.Generator().manual_seed(7)
    )
    # A linear critic has gradient w everywhere: penalty = 2 (|w| - 1)^2.
    w = critic.weight.detach()
    assert float(out.penalty.detach()) == pytest.approx(2.0 * (float(w.norm()) - 1) ** 2, rel=1e-6)
    # The estimate: the x part cancels, f(joint) - f(product) = w_y (mean y - mean y_s) = 0
    # for a permutation: exactly 0 up to rounding.
    assert abs(float(out.estimate.detach())) < 1e-6
    assert float(out.loss.detach()) == pytest.approx(float((-out.estimate + out.penalty).detach()))
    sn = wdm.wasserstein_dependency(critic, x, y, lipschitz="spectral_norm")
    assert float(sn.penalty) == 0.0


def test_cyclic_permutation_has_no_fixed_point():
    for n in (2, 3, 17):
        s = wdm._cyclic_permutation(n, "cpu", torch.Generator().manual_seed(n))
        assert sorted(s.tolist()) == list(range(n))
        assert all(int(s[i]) != i for i in range(n))


def test_exposed_in_ot_and_bad_input():
    assert divkit.ot.wasserstein_dependency is wdm.wasserstein_dependency
    critic = wdm.wdm_critic(3, (4,))
    x = torch.zeros(4, 2)
    with pytest.raises(divkit.Error, match="wasserstein_dependency: y has 3 rows"):
        wdm.wasserstein_dependency(critic, x, torch.zeros(3, 1))
    with pytest.raises(divkit.Error, match="wasserstein_dependency: x must have at least 2 rows"):
        wdm.wasserstein_dependency(critic, x[:1], torch.zeros(1, 1))
    with pytest.raises(divkit.Error, match="wasserstein_dependency: unknown lipschitz"):
        wdm.wasserstein_dependency(critic, x, torch.zeros(4, 1), lipschitz="clip")
    with pytest.raises(divkit.Error, match="wasserstein_dependency: gp_weight"):
        wdm.wasserstein_dependency(critic, x, torch.zeros(4, 1), gp_weight=-1.0)
    with pytest.raises(divkit.Error, match="WassersteinDependency: x_dim"):
        wdm.WassersteinDependency(0, 1)
