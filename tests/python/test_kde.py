"""Gaussian KDE with a KL-optimal bandwidth (divkit.kde / divkit.ot.kde_*): log-density against
scipy.stats.gaussian_kde (whitened, to match scipy's kernel covariance factor^2 Cov(x)) and a
float64 numpy brute force; the selector against a brute-force search; the selected bandwidth
near the KL-optimal one computed with the true density; bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import divkit
from divkit import kde

scipy_stats = pytest.importorskip("scipy.stats")


def brute_log_density(x, y, h, w=None):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    w = np.ones(len(x)) if w is None else np.asarray(w, np.float64)
    r2 = ((y[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    t = np.log(w)[None, :] - r2 / (2 * h * h)
    m = t.max(1, keepdims=True)
    lse = (m + np.log(np.exp(t - m).sum(1, keepdims=True)))[:, 0]
    return lse - math.log(w.sum()) - 0.5 * x.shape[1] * math.log(2 * math.pi * h * h)


@pytest.mark.parametrize("d", [1, 3])
def test_log_density_matches_scipy(d):
    rng = np.random.default_rng(d)
    a = rng.normal(size=(d, d)) + 2 * np.eye(d)
    x = rng.normal(size=(300, d)) @ a.T + 1.0
    y = rng.normal(size=(50, d)) @ a.T
    ref = scipy_stats.gaussian_kde(x.T, bw_method=0.3)
    cov = np.cov(x.T, ddof=1).reshape(d, d)
    chol = np.linalg.cholesky(cov)
    white = lambda z: np.linalg.solve(chol, z.T).T  # noqa: E731
    got = kde.kde_log_density(torch.tensor(white(x)), torch.tensor(white(y)), 0.3).numpy()
    got -= np.log(np.diag(chol)).sum()
    np.testing.assert_allclose(got, ref.logpdf(y.T), rtol=1e-9, atol=1e-9)


def test_log_density_matches_brute_force_float32_and_weights():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(80, 4)).astype(np.float32)
    y = (3 * rng.normal(size=(20, 4))).astype(np.float32)
    w = rng.uniform(0.1, 1.0, size=80)
    for h in (0.1, 1.0):
        got = kde.kde_log_density(torch.tensor(x), torch.tensor(y), h, w=torch.tensor(w))
        assert got.dtype == torch.float64
        np.testing.assert_allclose(got.numpy(), brute_log_density(x, y, h, w), rtol=1e-10)
        ll = kde.kde_log_likelihood(torch.tensor(x), h, y=torch.tensor(y))
        assert ll == pytest.approx(brute_log_density(x, y, h).mean(), rel=1e-10)


def test_bandwidth_matches_brute_force_and_true_kl():
    rng = np.random.default_rng(6)
    d = 2
    x = torch.tensor(rng.normal(size=(400, d)))
    y = torch.tensor(rng.normal(size=(2000, d)))
    r = kde.kde_bandwidth(x, y, tol=1e-6)
    hs = np.exp(np.linspace(np.log(0.02), np.log(5), 160))  # spacing 0.035 in log h
    ll = [kde.kde_log_likelihood(x, h, y=y) for h in hs]
    assert r.log_likelihood >= max(ll) - 1e-12
    assert abs(math.log(r.bandwidth) - math.log(hs[int(np.argmax(ll))])) < 0.025
    # The held-out log-likelihood estimates -KL(rho || p_h) - H(rho): with 2000 held-out
    # points its maximizer is close to the bandwidth minimizing the KL to the true N(0, I),
    # itself computed with 8000 fresh points.
    z = torch.tensor(rng.normal(size=(8000, d)))
    h_kl = hs[int(np.argmax([kde.kde_log_likelihood(x, h, y=z) for h in hs[::4]])) * 4]
    assert abs(math.log(r.bandwidth) - math.log(h_kl)) < 0.25
    entropy = 0.5 * d * math.log(2 * math.pi * math.e)
    kl = -kde.kde_log_likelihood(x, r.bandwidth, y=z) - entropy
    assert 0 < kl < 0.2
    # Leave-one-out on x alone lands near the held-out choice.
    r_loo = kde.kde_bandwidth(x)
    assert abs(math.log(r_loo.bandwidth) - math.log(r.bandwidth)) < 0.3
    assert len(r.grid_bandwidths) == 24 and r.n_evals > 24


def test_exposed_in_ot_and_bad_input():
    assert divkit.ot.kde_bandwidth is kde.kde_bandwidth
    x = torch.zeros(4, 2)
    with pytest.raises(divkit.Error, match="kde_log_density: bandwidth must be finite and > 0"):
        kde.kde_log_density(x, x, 0.0)
    with pytest.raises(divkit.Error, match="kde_log_density: y must have x's dimension d = 2"):
        kde.kde_log_density(x, torch.zeros(3, 3), 1.0)
    with pytest.raises(divkit.Error, match="kde_log_likelihood: w must have shape"):
        kde.kde_log_likelihood(x, 1.0, w=torch.ones(3))
    with pytest.raises(divkit.Error, match="kde_log_likelihood: w must be finite and >= 0"):
        kde.kde_log_likelihood(x, 1.0, w=torch.tensor([1.0, -1, 1, 1]))
    with pytest.raises(divkit.Error, match="kde_bandwidth: h_max must be > h_min"):
        kde.kde_bandwidth(x, h_min=1.0, h_max=0.5)
    with pytest.raises(divkit.Error, match="kde_bandwidth: grid must be an int >= 3"):
        kde.kde_bandwidth(x, grid=2)
    with pytest.raises(divkit.Error, match="kde_bandwidth: leave-one-out"):
        kde.kde_bandwidth(x[:1])
    with pytest.raises(divkit.Error, match="kde_log_density: x has dtype torch.int64"):
        kde.kde_log_density(torch.zeros(4, 2, dtype=torch.long), x, 1.0)
    with pytest.raises(divkit.Error, match="kde_log_likelihood: x has a non-finite value"):
        kde.kde_log_likelihood(torch.tensor([[0.0], [math.nan]]), 1.0)
