"""Light Schrodinger Bridge (Korotin, Gushchin and Burnaev, ICLR 2024, "Light Schrodinger
Bridge"; also exposed as ``divkit.ot.LightSB``): a simulation-free Schrodinger bridge / entropic
OT solver between two distributions known through samples.

Problem. The Schrodinger bridge with the Wiener prior of volatility ``eps`` between p0 (x) and
p1 (y) has the static plan ``pi* = argmin KL(pi || p0(x) N(y | x, eps I))`` over couplings of p0
and p1, i.e. entropic OT with cost ``|x - y|^2 / 2`` and regularization ``eps``. Its conditional
plans are ``pi*(y | x) = exp(<x, y> / eps) v*(y) / c*(x)`` for an adjusted Schrodinger potential
v*.

Parameterization (sum-exp-quadratic, a Gaussian mixture): with weights alpha_k, means r_k and
diagonal covariances S_k (``S_k = diag(exp(s_k))``),

    v_theta(y) = sum_k alpha_k N(y | r_k, eps S_k),
    c_theta(x) = int exp(<x, y>/eps) v_theta(y) dy
               = sum_k alpha_k exp((x' S_k x / 2 + r_k' x) / eps),
    pi_theta(y | x) = sum_k w_k(x) N(y | r_k + S_k x, eps S_k),
                      w_k(x) ∝ alpha_k exp((x' S_k x / 2 + r_k' x) / eps),

so the conditional plans are Gaussian mixtures sampled exactly, without simulation. The
objective (the paper's loss: KL(pi* || pi_theta) up to a constant that does not depend on theta)

    L(theta) = E_{x ~ p0}[log c_theta(x)] - E_{y ~ p1}[log v_theta(y)]

is minimized by stochastic gradient on samples of p0 and p1 (unpaired). Pure torch (any float
dtype and device), computed with log-sum-exp over the K components.
"""

from __future__ import annotations

import math
from typing import List, NamedTuple, Optional

import torch
from torch import nn

from . import _validate as check

__all__ = ["LightSB", "LightSBConditional", "lightsb_objective"]


class LightSBConditional(NamedTuple):
    """The conditional plans ``pi(y | x_i)`` as Gaussian mixtures: log_weights [n, K] (each row
    normalized), means [n, K, d], variances [n, K, d] (diagonal covariances ``eps S_k``)."""

    log_weights: torch.Tensor
    means: torch.Tensor
    variances: torch.Tensor


def _log_c(x, log_alpha, r, log_s, eps):
    # [n, K]: log alpha_k + (x' S_k x / 2 + r_k' x) / eps
    s = log_s.exp()
    quad = 0.5 * (x * x) @ s.T + x @ r.T
    return torch.log_softmax(log_alpha, 0)[None, :] + quad / eps


def _log_v(y, log_alpha, r, log_s, eps):
    # [m, K]: log alpha_k + log N(y | r_k, eps S_k)
    var = eps * log_s.exp()  # [K, d]
    d = y.shape[1]
    diff = y[:, None, :] - r[None, :, :]
    logn = -0.5 * ((diff * diff) / var[None]).sum(-1) - 0.5 * torch.log(var).sum(-1)[None]
    logn = logn - 0.5 * d * math.log(2 * math.pi)
    return torch.log_softmax(log_alpha, 0)[None, :] + logn


@check.public("lightsb_objective", finite_args=("x", "y", "log_alpha", "r", "log_s"))
def lightsb_objective(
    x: torch.Tensor,
    y: torch.Tensor,
    log_alpha: torch.Tensor,
    r: torch.Tensor,
    log_s: torch.Tensor,
    epsilon: float,
) -> torch.Tensor:
    r"""The LightSB loss ``mean_i log c_theta(x_i) - mean_j log v_theta(y_j)`` on samples x [n, d]
    of p0 and y [m, d] of p1 (unpaired), for the parameters log_alpha [K] (normalized by a
    softmax), r [K, d] and log_s [K, d] (``S_k = diag(exp(log_s_k))``) and the volatility
    ``epsilon``; differentiable in every tensor argument."""
    fn = "lightsb_objective"
    x = check.tensor(fn, "x", x, ndim=(2,), cpu=False)
    y = check.tensor(fn, "y", y, ndim=(2,), cpu=False)
    log_alpha = check.tensor(fn, "log_alpha", log_alpha, ndim=(1,), cpu=False)
    r = check.tensor(fn, "r", r, ndim=(2,), cpu=False)
    log_s = check.tensor(fn, "log_s", log_s, ndim=(2,), cpu=False)
    eps = check.positive(fn, "epsilon", epsilon)
    k, d = r.shape
    if log_alpha.shape[0] != k:
        check.fail(fn, f"log_alpha has {log_alpha.shape[0]} entries, expected K = {k} (r's rows)")
    check.same_shape(fn, "log_s", log_s, r, "r")
    for name, t in (("x", x), ("y", y), ("log_alpha", log_alpha), ("log_s", log_s)):
        if t.dtype != r.dtype:
            dt = str(r.dtype).replace("torch.", "")
            check.fail(
                fn, f"{name} must have r's dtype {dt}, got {str(t.dtype).replace('torch.', '')}"
            )
    for name, t in (("x", x), ("y", y)):
        if t.shape[1] != d:
            check.fail(fn, f"{name} must have dimension d = {d} (r's columns), got {t.shape[1]}")
        if t.shape[0] < 1:
            check.fail(fn, f"{name} must have at least one point")
    lc = torch.logsumexp(_log_c(x, log_alpha, r, log_s, eps), 1).mean()
    lv = torch.logsumexp(_log_v(y, log_alpha, r, log_s, eps), 1).mean()
    return lc - lv


class LightSB(nn.Module):
    """The Light Schrodinger Bridge solver (see the module docstring): parameters ``log_alpha
    [K]``, ``r [K, d]``, ``log_s [K, d]``; ``fit(x0, x1)`` minimizes :func:`lightsb_objective`
    with Adam; ``conditional(x)`` returns the Gaussian-mixture plans pi(y | x) and ``sample(x)``
    draws y ~ pi(. | x) for each row of x; ``sample_at_time(x, t)`` a point of the bridge process
    at time t.

    dim: d; n_potentials: K; epsilon: the Wiener prior's volatility (the entropic
    regularization of OT with cost |x - y|^2 / 2); dtype: the parameters' dtype."""

    @check.public("LightSB")
    def __init__(
        self,
        dim: int,
        n_potentials: int = 10,
        epsilon: float = 1.0,
        *,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        fn = "LightSB"
        d = check.size(fn, "dim", dim)
        k = check.size(fn, "n_potentials", n_potentials)
        self.epsilon = check.positive(fn, "epsilon", epsilon)
        if dtype not in (torch.float32, torch.float64):
            check.fail(fn, f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.log_alpha = nn.Parameter(torch.zeros(k, dtype=dtype))
        self.r = nn.Parameter(torch.randn(k, d, dtype=dtype))
        self.log_s = nn.Parameter(torch.full((k, d), math.log(0.1), dtype=dtype))

    @check.public("LightSB.objective", finite_args=("x", "y"))
    def objective(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """:func:`lightsb_objective` at the current parameters; x and y are cast to the
        parameters' dtype, as :meth:`fit` and :meth:`conditional` do."""
        fn = "LightSB.objective"
        x = check.tensor(fn, "x", x, ndim=(2,), cpu=False).to(self.r.dtype)
        y = check.tensor(fn, "y", y, ndim=(2,), cpu=False).to(self.r.dtype)
        return lightsb_objective(x, y, self.log_alpha, self.r, self.log_s, self.epsilon)

    forward = objective

    @check.public("LightSB.log_potential", finite_args=("y",))
    def log_potential(self, y: torch.Tensor) -> torch.Tensor:
        """``log v_theta(y)`` [m] for y [m, d]."""
        y = check.tensor("LightSB.log_potential", "y", y, ndim=(2,), cpu=False)
        return torch.logsumexp(_log_v(y, self.log_alpha, self.r, self.log_s, self.epsilon), 1)

    @check.public("LightSB.conditional", finite_args=("x",))
    def conditional(self, x: torch.Tensor) -> LightSBConditional:
        """The Gaussian-mixture conditional plans pi_theta(y | x_i) for x [n, d]."""
        fn = "LightSB.conditional"
        x = check.tensor(fn, "x", x, ndim=(2,), cpu=False)
        if x.shape[1] != self.r.shape[1]:
            check.fail(fn, f"x must have dimension d = {self.r.shape[1]}, got {x.shape[1]}")
        x = x.to(self.r.dtype)
        lw = torch.log_softmax(_log_c(x, self.log_alpha, self.r, self.log_s, self.epsilon), 1)
        s = self.log_s.exp()
        means = self.r[None] + s[None] * x[:, None, :]
        var = (self.epsilon * s)[None].expand_as(means)
        return LightSBConditional(lw, means, var)

    @torch.no_grad()
    def sample(
        self, x: torch.Tensor, n_samples: int = 1, *, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        """y ~ pi_theta(. | x_i): [n, d] for ``n_samples=1``, else [n, n_samples, d]."""
        fn = "LightSB.sample"
        ns = check.integer(fn, "n_samples", n_samples, min=1)
        c = self.conditional(x)
        n, k, d = c.means.shape
        comp = torch.multinomial(
            c.log_weights.exp().cpu(), ns, replacement=True, generator=generator
        ).to(x.device)  # [n, ns]
        idx = comp[..., None].expand(n, ns, d)
        mu = torch.gather(c.means, 1, idx)
        var = torch.gather(c.variances, 1, idx)
        z = torch.randn(n, ns, d, generator=generator, dtype=mu.dtype).to(mu.device)
        y = mu + var.sqrt() * z
        return y[:, 0] if ns == 1 else y

    @torch.no_grad()
    def sample_at_time(
        self, x: torch.Tensor, t: float, *, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        """A point of the bridge at time t in [0, 1] started at each row of x: y ~ pi(. | x),
        then the Brownian bridge from x to y with volatility eps,
        ``x_t = t y + (1 - t) x + sqrt(t (1 - t) eps) z`` (the SB's process given its ends)."""
        fn = "LightSB.sample_at_time"
        tv = check.real(fn, "t", t, allow_nan=False)
        if not 0.0 <= tv <= 1.0:
            check.fail(fn, f"t must be in [0, 1], got {tv:g}")
        y = self.sample(x, generator=generator)
        x = x.to(y.dtype)
        z = torch.randn(y.shape, generator=generator, dtype=y.dtype).to(y.device)
        return tv * y + (1 - tv) * x + math.sqrt(tv * (1 - tv) * self.epsilon) * z

    def fit(
        self,
        x0: torch.Tensor,
        x1: torch.Tensor,
        *,
        steps: int = 2000,
        lr: float = 1e-2,
        batch_size: int = 256,
        init_means_from_target: bool = True,
        generator: Optional[torch.Generator] = None,
    ) -> List[float]:
        """Minimizes the objective with Adam on minibatches drawn (independently, with
        replacement) from the samples x0 [n0, d] of p0 and x1 [n1, d] of p1. With
        ``init_means_from_target`` the means r_k start at random points of x1 (as the official
        code). Returns the loss of each step."""
        fn = "LightSB.fit"
        x0 = check.tensor(fn, "x0", x0, ndim=(2,), cpu=False)
        x1 = check.tensor(fn, "x1", x1, ndim=(2,), cpu=False)
        d = self.r.shape[1]
        for name, t in (("x0", x0), ("x1", x1)):
            if t.shape[1] != d or t.shape[0] < 1:
                check.fail(fn, f"{name} must be [n, {d}] with n >= 1, got {tuple(t.shape)}")
        steps = check.integer(fn, "steps", steps, min=0)
        lr = check.positive(fn, "lr", lr)
        bs = check.integer(fn, "batch_size", batch_size, min=1)
        x0, x1 = x0.to(self.r.dtype), x1.to(self.r.dtype)
        if check.boolean(fn, "init_means_from_target", init_means_from_target):
            i = torch.randint(0, x1.shape[0], (self.r.shape[0],), generator=generator)
            with torch.no_grad():
                self.r.copy_(x1[i.to(x1.device)])
        opt = torch.optim.Adam(self.parameters(), lr=lr)
        hist = []
        for _ in range(steps):
            i0 = torch.randint(0, x0.shape[0], (bs,), generator=generator).to(x0.device)
            i1 = torch.randint(0, x1.shape[0], (bs,), generator=generator).to(x1.device)
            loss = self.objective(x0[i0], x1[i1])
            opt.zero_grad()
            loss.backward()
            opt.step()
            hist.append(float(loss.detach()))
        return hist
