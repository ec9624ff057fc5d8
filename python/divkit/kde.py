"""Gaussian kernel density estimation with a KL-optimal bandwidth (the C++ core's
``include/divkit/kde.h``; also exposed as ``divkit.ot.kde_*``).

Estimator: ``p_h(y) = (1/W) sum_i w_i N(y; x_i, h^2 I)`` for data ``x [n, d]``, weights ``w``.
Bandwidth: the held-out mean log-likelihood ``L(h) = (1/m) sum_j log p_h(y_j)`` tends to
``-KL(rho || p_h) - H(rho)`` for ``y_j ~ rho``, so its maximizer is the KL-optimal bandwidth
("Kernel Density Estimators in Large Dimensions"); without held-out points the leave-one-out
likelihood of ``x`` is maximized instead.

All computed in float64 from float32/float64 CPU tensors by a streaming log-sum-exp over the data
(memory O((n + m) d)), OpenMP over query points, deterministic; not differentiable (the results
carry no gradient).
"""

from __future__ import annotations

from typing import Any, List, NamedTuple, Optional, Union

import torch

from . import _C, _ops
from . import _validate as check

__all__ = ["kde_log_density", "kde_log_likelihood", "kde_bandwidth", "KdeBandwidthResult"]

_FLOATS = (torch.float32, torch.float64)


def _points(fn: str, name: str, x: Any, optional: bool = False) -> Optional[torch.Tensor]:
    x = check.tensor(fn, name, x, dtypes=_FLOATS, ndim=(2,), optional=optional)
    if x is None:
        return None
    if x.shape[0] < 1 or x.shape[1] < 1:
        check.fail(fn, f"{name} must be [n, d] with n >= 1 and d >= 1, got {tuple(x.shape)}")
    return x.detach()


def _weights(fn: str, w: Any, n: int) -> Optional[torch.Tensor]:
    w = check.tensor(fn, "w", w, dtypes=_FLOATS, ndim=(1,), optional=True)
    if w is None:
        return None
    if w.shape[0] != n:
        check.fail(fn, f"w must have shape [{n}] (one weight per point of x), got {tuple(w.shape)}")
    return w.detach()


def _args(fn, x, y, w, y_optional):
    x = _points(fn, "x", x)
    y = _points(fn, "y", y, optional=y_optional)
    if y is not None and y.shape[1] != x.shape[1]:
        check.fail(fn, f"y must have x's dimension d = {x.shape[1]}, got {y.shape[1]}")
    return x, y, _weights(fn, w, x.shape[0])


@check.public("kde_log_density")
def kde_log_density(
    x: torch.Tensor, y: torch.Tensor, bandwidth: float, w: Optional[torch.Tensor] = None
) -> torch.Tensor:
    r"""``log p_h(y_j)`` of a Gaussian KDE with isotropic bandwidth ``h``:

    ``log p_h(y) = LSE_i(log w_i - |y - x_i|^2 / (2 h^2)) - log sum_i w_i - (d/2) log(2 pi h^2)``

    x [n, d] (data), y [m, d] (queries) float32/float64, w [n] >= 0 optional (uniform). Returns
    float64 [m]. scipy.stats.gaussian_kde uses the kernel covariance ``factor^2 Cov(x)``: whiten
    x and y by ``Cov(x)^(-1/2)`` and subtract ``log|det Cov(x)^(1/2)|`` to compare."""
    fn = "kde_log_density"
    x, y, w = _args(fn, x, y, w, False)
    h = check.positive(fn, "bandwidth", bandwidth)
    if _ops.use_ops(x, y, w, fn=fn):
        return _ops.kde_log_density_op(x, y, w, h)
    out = torch.empty(y.shape[0], dtype=torch.float64)
    _C.kde_log_density(x, w, y, h, out)
    return out


@check.public("kde_log_likelihood")
def kde_log_likelihood(
    x: torch.Tensor,
    bandwidth: float,
    y: Optional[torch.Tensor] = None,
    w: Optional[torch.Tensor] = None,
    *,
    as_tensor: bool = False,
) -> Union[float, torch.Tensor]:
    r"""Mean log-likelihood ``(1/m) sum_j log p_h(y_j)`` of held-out points y under the KDE of x
    (= ``-KL(rho || p_h) - H(rho)`` in expectation for y ~ rho), or, with ``y=None``, the
    leave-one-out log-likelihood of x (each ``x_j`` under the KDE of the others; needs two points
    of weight > 0). A float (-inf when a point has zero density in float64); with
    ``as_tensor=True``, and always when traced (``torch.compile``, ``torch.vmap``: a Python float
    would end the graph), a 0-d float64 tensor of the same value."""
    fn = "kde_log_likelihood"
    x, y, w = _args(fn, x, y, w, True)
    h = check.positive(fn, "bandwidth", bandwidth)
    as_tensor = check.boolean(fn, "as_tensor", as_tensor)
    if y is None and x.shape[0] < 2:
        check.fail(fn, "leave-one-out (y=None) needs at least 2 points in x")
    if _ops.use_ops(x, y, w, fn=fn):
        value = _ops.kde_log_likelihood_op(x, y, w, h)
        # DIVKIT_CUSTOM_OPS=always on plain tensors: the eager result type.
        return value if as_tensor or _ops.traced(x, y, w) else float(value)
    value = _C.kde_log_likelihood(x, w, y, h)
    return torch.tensor(value, dtype=torch.float64) if as_tensor else float(value)


class KdeBandwidthResult(NamedTuple):
    """bandwidth: the selected h; log_likelihood: L(h) there (held-out or leave-one-out);
    n_evals: evaluations of L; grid_bandwidths / grid_log_likelihoods: the coarse grid.
    Python numbers and lists, or (``as_tensor=True``, or traced) float64 tensors (0-d, and
    [grid] for the grid; n_evals int64)."""

    bandwidth: Union[float, torch.Tensor]
    log_likelihood: Union[float, torch.Tensor]
    n_evals: Union[int, torch.Tensor]
    grid_bandwidths: Union[List[float], torch.Tensor]
    grid_log_likelihoods: Union[List[float], torch.Tensor]


@check.public("kde_bandwidth")
def kde_bandwidth(
    x: torch.Tensor,
    y: Optional[torch.Tensor] = None,
    w: Optional[torch.Tensor] = None,
    *,
    h_min: Optional[float] = None,
    h_max: Optional[float] = None,
    grid: int = 24,
    tol: float = 1e-4,
    max_iter: int = 100,
    as_tensor: bool = False,
) -> KdeBandwidthResult:
    r"""The KL-optimal bandwidth of a Gaussian KDE of x: the h maximizing the held-out
    log-likelihood of y (``y`` given) or the leave-one-out log-likelihood of x (``y=None``),
    i.e. minimizing ``KL(rho || p_h)`` up to the entropy of rho.

    Search: ``grid`` values of log h evenly spaced over ``[h_min, h_max]`` (defaults ``1e-3 s``
    and ``10 s``, s the root mean per-coordinate standard deviation of x), then golden-section
    refinement around the best grid point down to a bracket of ``tol`` in log h.

    ``as_tensor=True`` (and always when traced: ``torch.compile``, ``torch.vmap``) gives the
    fields as tensors (see :class:`KdeBandwidthResult`), the same values."""
    fn = "kde_bandwidth"
    x, y, w = _args(fn, x, y, w, True)
    lo = 0.0 if h_min is None else check.positive(fn, "h_min", h_min)
    hi = 0.0 if h_max is None else check.positive(fn, "h_max", h_max)
    if h_min is not None and h_max is not None and not hi > lo:
        check.fail(fn, f"h_max must be > h_min, got h_min = {lo:g}, h_max = {hi:g}")
    g = check.integer(fn, "grid", grid, min=3)
    t = check.positive(fn, "tol", tol)
    it = check.integer(fn, "max_iter", max_iter, min=0)
    as_tensor = check.boolean(fn, "as_tensor", as_tensor)
    if y is None and x.shape[0] < 2:
        check.fail(fn, "leave-one-out (y=None) needs at least 2 points in x")
    if _ops.use_ops(x, y, w, fn=fn):
        out = KdeBandwidthResult(*_ops.kde_bandwidth_op(x, y, w, lo, hi, g, t, it))
        if as_tensor or _ops.traced(x, y, w):
            return out
        # DIVKIT_CUSTOM_OPS=always on plain tensors: the eager result types.
        b, ll, ne, gb, gl = out
        return KdeBandwidthResult(float(b), float(ll), int(ne), gb.tolist(), gl.tolist())
    b, ll, ne, gb, gl = _C.kde_select_bandwidth(x, w, y, lo, hi, g, t, it)
    if as_tensor:
        f64 = torch.float64
        return KdeBandwidthResult(
            torch.tensor(b, dtype=f64),
            torch.tensor(ll, dtype=f64),
            torch.tensor(ne, dtype=torch.int64),
            torch.tensor(list(gb), dtype=f64),
            torch.tensor(list(gl), dtype=f64),
        )
    return KdeBandwidthResult(float(b), float(ll), int(ne), list(gb), list(gl))
