"""Entropic optimal transport and OT-based objectives (PyTorch wrappers over divkit's C++ core).

Conventions (see ``include/divkit/ot.h`` for the full statement):

* cost between points ``C_ij = |x_i - y_j|^p`` with ``p`` in {1, 2}; ``p = 2`` is the SQUARED
  Euclidean distance, as in POT's ``ot.dist`` and OTT's ``SqEuclidean`` (GeomLoss's ``p=2``
  halves it);
* entropic OT ``OT_eps(a, b) = min_P <P, C> + eps KL(P || a b^T)`` over couplings of a and b
  (or with ``rho KL`` penalties on the marginals: unbalanced OT);
* potentials f, g with ``P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps)``, log-domain Sinkhorn
  (Cuturi 2013; Peyre and Cuturi 2019), the cost computed on the fly (memory O(n + m)) or,
  for small problems, cached (``cost_cache_mib``);
* gradients by the envelope theorem (no back-propagation through the iterations).

Every function takes CPU tensors (float32 or float64) and, through its PyTorch fallback
(:mod:`divkit.backends.torch_ot`, ``backend="torch"``), tensors on any device: :func:`sinkhorn`
(with the functions built on it), :func:`sparse_ot`, :func:`mmd` and :func:`cs_divergence`;
in a CUDA build, :func:`sinkhorn` (and so :func:`sinkhorn_divergence`, :func:`sinkhorn_kd_loss`
and :func:`monge_gap`) runs CUDA tensors on divkit's CUDA kernels instead of the fallback;
non-convergence is reported in the result and as a ``RuntimeWarning``, never hidden.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Tuple, Union

import torch

from . import _C, _device, _ops
from . import _validate as check
from ._autograd import Scaling, grads_in_forward
from .backends import torch_ot

__all__ = [
    "SinkhornResult",
    "sinkhorn",
    "sinkhorn_divergence",
    "sinkhorn_kd_loss",
    "monge_gap",
    "SparseOTResult",
    "sparse_ot",
    "mmd",
    "cs_divergence",
]

_FLOATS = (torch.float32, torch.float64)


def _tensor(fn: str, name: str, x: Any, dims: Tuple[int, ...], optional: bool = False, cpu=True):
    """cpu=False: any device (sinkhorn, which routes to its PyTorch fallback off the CPU)."""
    return check.tensor(fn, name, x, dtypes=_FLOATS, ndim=dims, optional=optional, cpu=cpu)


class SinkhornResult(NamedTuple):
    """Result of :func:`sinkhorn`. For a batch ``x [B, n, d]`` every field has a leading B.

    f, g: dual potentials [n], [m] (x's dtype); transport_cost: ``<P, C>`` (no gradient);
    reg_cost: the dual objective, equal to ``OT_eps`` at convergence, differentiable in x, y,
    a, b (and cost); n_iter: iterations done; marginal_error: ``||P 1 - a||_1`` of the
    returned potentials (the columns are exact) or, unbalanced, the last fixed-point residual;
    converged: bool tensor; plan: [n, m] when ``return_plan`` (else None)."""

    f: torch.Tensor
    g: torch.Tensor
    transport_cost: torch.Tensor
    reg_cost: torch.Tensor
    n_iter: torch.Tensor
    marginal_error: torch.Tensor
    converged: torch.Tensor
    plan: Optional[torch.Tensor]


class _Cfg(NamedTuple):
    eps: float
    p: int
    tol: float
    max_iter: int
    check_every: int
    eps_scaling: float
    rho_a: float
    rho_b: float
    cost_cache_bytes: int
    symmetric: bool
    return_plan: bool
    warn: bool
    fn: str
    sync: bool = True


def _solve(x, y, cost, a, b, cfg: _Cfg, need: Tuple[bool, bool, bool, bool, bool]):
    """Runs the core on 3-D inputs (CPU tensors, or CUDA tensors in a CUDA build: the outputs
    on their device, the kernels on PyTorch's current stream). Returns (stats list, f, g, plan,
    grads...)."""
    need_x, need_y, need_a, need_b, need_c = need
    if cost is not None:
        B, n, m = cost.shape
        dt, dev = cost.dtype, cost.device
    else:
        B, n, _ = x.shape
        m = y.shape[1]
        dt, dev = x.dtype, x.device
    f64 = dict(dtype=torch.float64, device=dev)
    f = torch.empty(B, n, **f64)
    g = torch.empty(B, m, **f64)
    plan = torch.empty(B, n, m, dtype=dt, device=dev) if (cfg.return_plan or need_c) else None
    gx = torch.empty(B, n, x.shape[2], **f64) if need_x else None
    gy = torch.empty(B, m, y.shape[2], **f64) if need_y else None
    ga = torch.empty(B, n, **f64) if need_a else None
    gb = torch.empty(B, m, **f64) if need_b else None
    options = _C.SinkhornOptions(
        eps=cfg.eps,
        p=cfg.p,
        tol=cfg.tol,
        max_iter=cfg.max_iter,
        check_every=cfg.check_every,
        eps_scaling=cfg.eps_scaling,
        rho_a=cfg.rho_a,
        rho_b=cfg.rho_b,
        cost_cache_bytes=cfg.cost_cache_bytes,
        symmetric=cfg.symmetric,
        sync=cfg.sync,
    )
    if dev.type == "cuda":
        options.stream = torch.cuda.current_stream(dev).cuda_stream
    if cfg.sync:
        stats = _C.sinkhorn(x, y, cost, a, b, f, g, plan, gx, gy, ga, gb, options)
        return stats, f, g, plan, gx, gy, ga, gb
    # No host read: the per-problem results stay on the device, columns (transport_cost,
    # reg_cost, mass, n_iter, marginal_error, converged).
    st = torch.empty(B, 6, **f64)
    _C.sinkhorn(x, y, cost, a, b, f, g, plan, gx, gy, ga, gb, options, st)
    stats = dict(
        transport_cost=st[:, 0],
        reg_cost=st[:, 1],
        n_iter=st[:, 3].to(torch.int64),
        marginal_error=st[:, 4],
        converged=st[:, 5] != 0,
    )
    return stats, f, g, plan, gx, gy, ga, gb


def _stats_tensors(stats, device=None) -> dict:
    """The core's per-problem stats as the fallback gives them: a dict of [B] tensors (on
    ``device``, the inputs' device, as the fallback's)."""
    return dict(
        transport_cost=torch.tensor([s[0] for s in stats], dtype=torch.float64, device=device),
        reg_cost=torch.tensor([s[1] for s in stats], dtype=torch.float64, device=device),
        n_iter=torch.tensor([s[3] for s in stats], dtype=torch.int64, device=device),
        marginal_error=torch.tensor([s[4] for s in stats], dtype=torch.float64, device=device),
        converged=torch.tensor([s[5] for s in stats], dtype=torch.bool, device=device),
    )


def _sinkhorn_run(x, y, cost, a, b, cfg: _Cfg, need, core: bool):
    """One solve on 3-D inputs by the C++ core (or the PyTorch fallback when ``core`` is False);
    ``need`` = (x, y, cost, a, b). Returns (reg_cost [B] in the inputs' dtype, stats (a dict of
    [B] tensors), f, g, plan or None, (grad x, grad y, grad a, grad b)); the cost's gradient is
    the plan."""
    need_x, need_y, need_c, need_a, need_b = need
    xd, yd, cd, ad, bd = (None if t is None else t.detach() for t in (x, y, cost, a, b))
    solve = _solve if core else torch_ot.sinkhorn
    stats, f, g, plan, gx, gy, ga, gb = solve(
        xd, yd, cd, ad, bd, cfg, (need_x, need_y, need_a, need_b, need_c)
    )
    ref = cost if cost is not None else x
    if not isinstance(stats, dict):
        stats = _stats_tensors(stats, ref.device)
    dt = ref.dtype
    return stats["reg_cost"].to(dt), stats, f, g, plan, (gx, gy, ga, gb)


def _unchanged(t: torch.Tensor, fn: str, name: str):
    """A gradient also returned to the caller, for backward: raises there if the caller changed
    it in place since forward (its version counter moved)."""
    version = t._version

    def get():
        if t._version != version:
            raise RuntimeError(
                f"{fn}: the returned {name} is the gradient kept for backward and was modified "
                f"in place since forward; modify a clone (.clone()) instead"
            )
        return t

    return get


def _warn_sinkhorn(cfg: _Cfg, stats: dict, warn=check.warn) -> None:
    conv, err = stats["converged"], stats["marginal_error"]
    if not bool(conv.all()):
        bad = ~conv
        warn(
            f"{cfg.fn}: did not converge within max_iter={cfg.max_iter} iterations for "
            f"{int(bad.sum())} of {conv.shape[0]} problem(s) (marginal error "
            f"{float(err[bad].max()):.3g} > tol {cfg.tol:g}); increase max_iter or eps, or use "
            f"eps_scaling",
        )


def _sinkhorn_apply(x, y, cost, a, b, cfg: _Cfg, box: dict, core: bool = True) -> torch.Tensor:
    """reg_cost [B], with the envelope gradients computed by the solver (the C++ core, or the
    PyTorch fallback when ``core`` is False) in forward."""

    def run(need):
        reg, stats, f, g, plan, (gx, gy, ga, gb) = _sinkhorn_run(x, y, cost, a, b, cfg, need, core)
        box.update(stats=stats, f=f, g=g, plan=plan)
        gc = None
        if need[2]:
            # The cost's gradient is the plan; when the caller gets it too, a change made to it
            # in place is caught (as autograd does for saved tensors) rather than differentiated.
            gc = _unchanged(plan, cfg.fn, "plan") if cfg.return_plan else plan
        return reg, (gx, gy, gc, ga, gb)

    if not (
        torch.is_grad_enabled()
        and any(t is not None and t.requires_grad for t in (x, y, cost, a, b))
    ):
        return run((False,) * 5)[0]
    return grads_in_forward(run, (x, y, cost, a, b), Scaling(fp64=True, fn=cfg.fn))


def _capturing(*ts) -> bool:
    """Whether the current stream of the first CUDA tensor's device is being captured into a
    CUDA graph."""
    if not torch.cuda.is_available():  # also fake CUDA tensors traced on a CPU-only torch
        return False
    for t in ts:
        if isinstance(t, torch.Tensor) and t.device.type == "cuda":
            with torch.cuda.device(t.device):
                return torch.cuda.is_current_stream_capturing()
    return False


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _host_checks(sync, *ts) -> bool:
    """Whether a wrapper may check values on the host (a read back): not with ``sync=False`` or
    while a CUDA graph is being captured, where the solver flags bad problems on the device."""
    return sync is not False and not _capturing(*ts)


def _weights(fn, name, w, lead, batched):
    w = _tensor(fn, name, w, (2,) if batched else (1,), optional=True, cpu=False)
    if w is None:
        return None
    if tuple(w.shape) != tuple(lead):
        check.fail(fn, f"{name} must have shape {tuple(lead)}, got {tuple(w.shape)}")
    return w if batched else w.unsqueeze(0)


@check.public("sinkhorn")
def sinkhorn(
    x: Optional[torch.Tensor],
    y: Optional[torch.Tensor],
    a: Optional[torch.Tensor] = None,
    b: Optional[torch.Tensor] = None,
    *,
    eps: float,
    p: int = 2,
    cost: Optional[torch.Tensor] = None,
    tol: float = 1e-6,
    max_iter: int = 1000,
    check_every: int = 1,
    eps_scaling: Optional[float] = None,
    rho: Union[None, float, Tuple[float, float]] = None,
    return_plan: bool = False,
    warn: bool = True,
    cost_cache_mib: float = 64.0,
    symmetric: bool = False,
    backend: str = "auto",
    sync: Optional[bool] = None,
) -> SinkhornResult:
    r"""Entropic OT between weighted point clouds (or histograms with a cost matrix).

    ``OT_eps(a, b) = min_P <P, C> + eps KL(P || a b^T)`` subject to ``P 1 = a, P^T 1 = b``
    (balanced; ``rho`` replaces the constraints by ``rho KL(P 1 || a) + rho KL(P^T 1 || b)``,
    a number or ``(rho_a, rho_b)``, ``inf`` meaning that side is constrained). Cost
    ``C_ij = |x_i - y_j|^p`` (p = 2: squared distance, POT/OTT convention) computed on the fly
    (or cached, see ``cost_cache_mib``),
    or ``cost [n, m]`` given (then x and y are None and a, b are the histograms). Solved by
    log-domain Sinkhorn (Cuturi 2013), stopping when the L1 marginal residual <= tol (checked
    every ``check_every`` iterations) or after ``max_iter``; ``eps_scaling`` in (0, 1) anneals
    eps from the clouds' diameter^p down to eps (one iteration per step).

    Args:
        x: [n, d] or a batch [B, n, d], float32 or float64 (the kernels compute in that dtype).
        y: [m, d] or [B, m, d], same dtype.
        a, b: weights [n], [m] (or [B, n], [B, m]), >= 0; default uniform. Balanced problems
            need ``sum a == sum b``.
        eps: the entropic regularization, > 0, absolute (cost units).
        cost_cache_mib: point clouds whose n x m cost and its transpose fit in this many MiB
            (2 n m x 4 or 8 bytes; default 64: n = m up to ~2900 in float32) keep them in
            memory instead of recomputing them every half-iteration (faster at large d; the
            values are equal to rounding). 0: always on the fly, memory O(n + m). When the
            budget also holds the kernel exp((f0 + g0 - C) / eps) and its transpose (twice
            that; also for a given cost), a balanced problem iterates in the kernel domain
            with absorption (one multiply-add an entry instead of one exp; same iterates to
            rounding).
        symmetric: a self-transport problem OT(a, a) (y must equal x, b equal a): keeps
            g = f and uses the averaged update ``f <- (f + T(f)) / 2`` (Feydy et al. 2019),
            which converges in far fewer passes at small eps; same result as the general
            solver. Used by :func:`sinkhorn_divergence` for its two self-terms.
        backend: ``"auto"`` (the C++ core for CPU tensors and, in a CUDA build, for CUDA
            tensors: divkit's CUDA kernels, float64 throughout, log-domain updates, on
            PyTorch's current stream, convergence flags read back every 16 iterations; the
            PyTorch fallback on other devices), ``"core"`` (CPU tensors, or CUDA tensors in a
            CUDA build; another device raises ``"sinkhorn: no kernel for device <d>"``) or
            ``"torch"``: the fallback
            (:mod:`divkit.backends.torch_ot`) on any device, the same formulas in float64 with
            the cost held as an n x m matrix within ``cost_cache_mib`` and computed on the
            fly in blocks of rows beyond it, and log-domain updates only (the kernel-domain
            iterations agree with them to rounding); it reads the convergence flags back to
            the host every 16 iterations, so it may run up to 15 iterations past convergence
            (their results discarded).
        sync: whether the host may read the convergence flags (and the input checks) back
            during the call. ``None`` (default): True, except on CUDA tensors while the current
            stream is being captured (``torch.cuda.is_current_stream_capturing()``), where it
            is False. ``False``: a fixed schedule with no host read, no synchronization and no
            host-to-device copy, so that the call can be captured in a ``torch.cuda.CUDAGraph``
            (divkit's CUDA kernels): ``max_iter`` iterations always run (up to ``2 max_iter``
            log-sum-exp launches, whatever the convergence; each problem is frozen by a device
            flag once it has converged, so f, g, n_iter, converged and every other result equal
            the ``sync=True`` ones), and n_iter, converged and the costs are device tensors
            written by the kernels. Bad inputs cannot raise there: a problem whose inputs would
            have raised gets NaN costs and marginal_error and ``converged`` False (every problem
            for a non-finite or negative value or symmetric inputs that differ, that problem
            alone for a zero total weight or unequal masses; check them on the device);
            ``warn`` is ignored (it would read ``converged``). On CPU tensors the C++ core has
            nothing to read back: the same results, and bad input raises as with ``sync=True``.
            The PyTorch fallback (``backend="torch"``, or a device without divkit kernels, CPU
            tensors included) does as the CUDA kernels, with no host read: ``max_iter``
            iterations, the eps-scaling schedule computed on the device (padded to 200
            stages), the input checks as device flags with the same NaN results, so it can be
            captured too (not yet run on a GPU). Either way a bad problem's f, g, plan and
            gradients are not meaningful, and the checks that need no value (shapes, options)
            still raise. ``True`` while capturing raises. Not available through the custom op
            (``torch.compile``, ``torch.vmap``).
    Returns:
        :class:`SinkhornResult`; only ``reg_cost`` carries gradients (envelope theorem: grad x
        ``sum_j P_ij dC_ij/dx_i``, grad a ``f`` up to a constant, grad cost ``P``).
    """
    fn = "sinkhorn"
    route = _device.route(fn, fn, backend, (("x", x), ("y", y), ("a", a), ("b", b), ("cost", cost)))
    capturing = _capturing(x, y, a, b, cost)
    if sync is None:
        sync = not capturing
    else:
        sync = check.boolean(fn, "sync", sync)
        if sync and capturing:
            check.fail(
                fn,
                "sync=True reads the convergence flags back to the host, which a CUDA graph "
                "capture does not allow; pass sync=False (or leave it None)",
            )
    eps = check.positive(fn, "eps", eps)
    p = check.integer(fn, "p", p)
    tol = check.real(fn, "tol", tol)
    max_iter = check.integer(fn, "max_iter", max_iter)
    check_every = check.integer(fn, "check_every", check_every)
    scaling = 0.0 if eps_scaling is None else check.real(fn, "eps_scaling", eps_scaling)
    if rho is None:
        rho_a = rho_b = math.inf
    elif isinstance(rho, (tuple, list)):
        if len(rho) != 2:
            check.fail(fn, f"rho must be a number or a pair (rho_a, rho_b), got {rho!r}")
        rho_a, rho_b = check.real(fn, "rho_a", rho[0]), check.real(fn, "rho_b", rho[1])
    else:
        rho_a = rho_b = check.real(fn, "rho", rho)
        # The core checks rho_a and rho_b; a single rho is named as the caller passed it.
        if not rho_a > 0:
            check.fail(fn, f"rho must be > 0 (+inf: balanced), got {rho_a:g}")
    cache_mib = check.real(fn, "cost_cache_mib", cost_cache_mib)
    if not (cache_mib >= 0 and check.isfinite(cache_mib)):
        check.fail(fn, f"cost_cache_mib must be finite and >= 0, got {cache_mib:g}")
    cfg = _Cfg(
        eps,
        p,
        tol,
        max_iter,
        check_every,
        scaling,
        rho_a,
        rho_b,
        # Capped to fit the core's int64 byte count; any budget beyond memory caches everything.
        min(int(cache_mib * 2**20), 2**62),
        check.boolean(fn, "symmetric", symmetric),
        check.boolean(fn, "return_plan", return_plan),
        check.boolean(fn, "warn", warn),
        fn,
        sync,
    )

    if cost is not None:
        if x is not None or y is not None:
            check.fail(fn, "give either points (x, y) or cost, not both")
        cost = _tensor(fn, "cost", cost, (2, 3), cpu=False)
        batched = cost.dim() == 3
        c3 = cost if batched else cost.unsqueeze(0)
        B, n, m = c3.shape
        x3 = y3 = None
    else:
        x = _tensor(fn, "x", x, (2, 3), cpu=False)
        y = _tensor(fn, "y", y, (2, 3), cpu=False)
        if x.dim() != y.dim():
            check.fail(
                fn, f"y must have x's number of dimensions {x.dim()}, got shape {tuple(y.shape)}"
            )
        # Here rather than in the core, which sees unbatched clouds with a batch of one added.
        if y.shape[-1] != x.shape[-1]:
            lead = "m" if x.dim() == 2 else f"{x.shape[0]}, m"
            check.fail(
                fn,
                f"y must have shape [{lead}, {x.shape[-1]}] (x's dimension d = {x.shape[-1]}), "
                f"got {list(y.shape)}",
            )
        batched = x.dim() == 3
        x3 = x if batched else x.unsqueeze(0)
        y3 = y if batched else y.unsqueeze(0)
        B, n, m = x3.shape[0], x3.shape[1], y3.shape[1]
        c3 = None
    lead_a = (B, n) if batched else (n,)
    lead_b = (B, m) if batched else (m,)
    a3 = _weights(fn, "a", a, lead_a, batched)
    b3 = _weights(fn, "b", b, lead_b, batched)

    ops = _ops.use_ops(x3, y3, c3, a3, b3, fn=fn)
    if ops and not sync:
        if _ops.traced(x3, y3, c3, a3, b3):
            check.fail(
                fn, "sync=False is not available through the custom op (torch.compile, vmap)"
            )
        ops = False  # DIVKIT_CUSTOM_OPS=always on plain tensors: the eager path
    if ops:
        # Through the op (traced, vmap): it warns itself when it runs.
        reg, f, g, tc, n_iter, err, conv, plan = _ops.sinkhorn(x3, y3, c3, a3, b3, cfg, route.core)
    else:
        box: dict = {}
        reg = _sinkhorn_apply(x3, y3, c3, a3, b3, cfg, box, core=route.core)
        stats = box["stats"]
        dt = reg.dtype
        tc = stats["transport_cost"].to(dt)
        n_iter = stats["n_iter"]
        err = stats["marginal_error"]
        conv = stats["converged"]
        f, g, plan = box["f"].to(dt), box["g"].to(dt), box["plan"] if return_plan else None
        if cfg.warn and sync:
            _warn_sinkhorn(cfg, stats)
    if not batched:
        return SinkhornResult(
            f[0],
            g[0],
            tc[0],
            reg[0],
            n_iter[0],
            err[0],
            conv[0],
            plan[0] if plan is not None else None,
        )
    return SinkhornResult(f, g, tc, reg, n_iter, err, conv, plan)


@check.public("sinkhorn_divergence")
def sinkhorn_divergence(
    x: torch.Tensor,
    y: torch.Tensor,
    a: Optional[torch.Tensor] = None,
    b: Optional[torch.Tensor] = None,
    *,
    eps: float,
    p: int = 2,
    **kwargs,
) -> torch.Tensor:
    r"""Debiased Sinkhorn divergence (Genevay et al. 2018; Feydy et al. 2019):

    ``S_eps(a, b) = OT_eps(a, b) - OT_eps(a, a) / 2 - OT_eps(b, b) / 2``

    plus, when ``rho`` is given (unbalanced; Sejourne et al. 2019, as GeomLoss), the mass term
    ``eps / 2 (sum a - sum b)^2``; ``OT_eps`` is the regularized cost of :func:`sinkhorn`
    (KL(P || a b^T) regularizer), so ``S >= 0``, ``S = 0`` for identical inputs, and S
    interpolates between OT (eps -> 0) and an MMD (eps -> inf). Symmetric in (x, a) <-> (y, b). Differentiable in x, y, a, b; batched
    inputs give [B]. The self-terms use the averaged symmetric update (``symmetric=True`` of
    :func:`sinkhorn`; Feydy et al. 2019), which converges in a few passes where alternating
    updates need many at small eps. Extra keyword arguments go to :func:`sinkhorn`.
    """
    fn = "sinkhorn_divergence"
    if "symmetric" in kwargs:
        check.fail(
            fn,
            "symmetric is set by sinkhorn_divergence (True for its self-terms OT(a, a) and "
            "OT(b, b), False for OT(a, b)); leave it out",
        )
    rho = kwargs.get("rho")
    if isinstance(rho, (tuple, list)) and len(rho) == 2 and not rho[0] == rho[1]:
        check.fail(
            fn,
            f"rho must be one number or a pair of equal ones (the self-terms OT(a, a) and "
            f"OT(b, b) penalize both of their marginals alike), got {tuple(rho)!r}",
        )
    xy = sinkhorn(x, y, a, b, eps=eps, p=p, **kwargs).reg_cost
    xx = sinkhorn(x, x, a, a, eps=eps, p=p, symmetric=True, **kwargs).reg_cost
    yy = sinkhorn(y, y, b, b, eps=eps, p=p, symmetric=True, **kwargs).reg_cost
    s = xy - 0.5 * xx - 0.5 * yy
    if kwargs.get("rho") is not None:
        # Unbalanced (Sejourne et al. 2019, eq. 8; GeomLoss): without the mass term S is not
        # >= 0 for measures of different masses. (Balanced masses are equal: the term is 0.)
        s = s + 0.5 * eps * (_mass(a, x) - _mass(b, y)) ** 2
    return s


def _mass(w: Optional[torch.Tensor], pts: torch.Tensor) -> torch.Tensor:
    """Total weight per problem ([] or [B]); uniform weights (None) have mass 1."""
    if w is None:
        return torch.ones(pts.shape[:-2], dtype=pts.dtype, device=pts.device)
    return w.sum(-1)


@check.public("sinkhorn_kd_loss")
def sinkhorn_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 2.0,
    eps: float = 0.1,
    n_iter: int = 20,
    sync: Optional[bool] = None,
    backend: str = "auto",
) -> torch.Tensor:
    r"""SinKD batch-wise Sinkhorn distillation loss (Cui et al. 2024, code 2018cx/SinKD).

    With ``P = softmax(z_s / T)`` and ``Q = softmax(z_t / T)`` for a batch of B rows, the cost
    is the L1 distance between rows, ``W_kl = sum_v |P_kv - Q_lv|`` (B x B), and the loss is
    ``<Pi, W>`` for the entropic coupling Pi of the uniform marginals (1/B each) after
    ``n_iter`` Sinkhorn iterations at ``eps`` (log domain; SinKD's "20 alternating row/column
    normalizations" of exp(-W / eps)). Defaults T = 2, eps = 0.1. SinKD's repository reports
    the same quantity with rows summing to 1 (B times ours) and a further constant factor.

    Gradient: through W with the coupling held fixed (the envelope gradient of the regularized
    cost; SinKD differentiates through the iterations). logits [B, V], float32/float64.
    ``sync``: as in :func:`sinkhorn` (``False``: no host read, so CUDA-graph capturable; the
    same loss). ``backend``: where the Sinkhorn iterations run, as in :func:`sinkhorn` (the cost
    and the loss around them are PyTorch ops on the logits' device).
    """
    fn = "sinkhorn_kd_loss"
    _device.backend(fn, backend)
    s = _tensor(fn, "student_logits", student_logits, (2,), cpu=False)
    t = _tensor(fn, "teacher_logits", teacher_logits, (2,), cpu=False)
    if s.shape != t.shape:
        check.fail(
            fn,
            f"teacher_logits must have student_logits' shape {tuple(s.shape)}, got "
            f"{tuple(t.shape)}",
        )
    if t.dtype != s.dtype:
        check.fail(
            fn, f"teacher_logits must have student_logits' dtype {_dtype(s)}, got {_dtype(t)}"
        )
    if s.shape[0] < 1:
        check.fail(fn, f"student_logits must have at least one row, got {tuple(s.shape)}")
    # Checked on the logits: the solver would report NaN softmax rows as a bad "cost".
    if _host_checks(sync, s, t):
        check.finite(fn, "student_logits", s, logits=True)
        check.finite(fn, "teacher_logits", t, logits=True)
    T = check.real(fn, "temperature", temperature)
    if not (check.isfinite(T) and T > 0):
        check.fail(fn, f"temperature must be finite and > 0, got {T:g}")
    n_iter = check.integer(fn, "n_iter", n_iter)
    if n_iter < 1:
        check.fail(fn, f"n_iter must be >= 1, got {n_iter}")
    P = torch.softmax(s / T, dim=-1)
    Q = torch.softmax(t / T, dim=-1)
    W = torch.cdist(P.unsqueeze(0), Q.unsqueeze(0), p=1)[0]
    res = sinkhorn(
        None,
        None,
        eps=eps,
        cost=W.detach(),
        tol=0.0,
        max_iter=n_iter,
        return_plan=True,
        warn=False,
        sync=sync,
        backend=backend,
    )
    return (res.plan.to(W.dtype) * W).sum()


@check.public("monge_gap")
def monge_gap(
    x: torch.Tensor,
    mapped: torch.Tensor,
    a: Optional[torch.Tensor] = None,
    *,
    eps: float,
    p: int = 2,
    **kwargs,
) -> torch.Tensor:
    r"""Monge gap of a map T on reference points (Uscidda and Cuturi 2023, as OTT's
    ``monge_gap_from_samples``):

    ``M(T) = sum_i a_i c(x_i, T(x_i)) - OT_eps(a; x, T(x))``

    the mean displacement cost of the map minus the entropic OT cost (the :func:`sinkhorn`
    reg_cost) between the points and their images, both weighted by ``a`` (uniform default).
    ``mapped`` = T(x) [n, d]; the gap is 0-ish for an optimal (cyclically monotone) map and
    grows with its sub-optimality. Differentiable in x and mapped (autograd for the first term,
    envelope gradients for the second).
    """
    fn = "monge_gap"
    x = _tensor(fn, "x", x, (2,), cpu=False)
    mapped = _tensor(fn, "mapped", mapped, (2,), cpu=False)
    if x.shape != mapped.shape:
        check.fail(fn, f"mapped must have x's shape {tuple(x.shape)}, got {tuple(mapped.shape)}")
    # Checked here: sinkhorn would name mapped "y".
    if mapped.dtype != x.dtype:
        check.fail(fn, f"mapped must have x's dtype {_dtype(x)}, got {_dtype(mapped)}")
    if _host_checks(kwargs.get("sync"), x, mapped):
        check.finite(fn, "mapped", mapped)
    p = check.integer(fn, "p", p)
    n = x.shape[0]
    w = (
        torch.full((n,), 1.0 / n, dtype=x.dtype, device=x.device)
        if a is None
        else _tensor(fn, "a", a, (1,), cpu=False)
    )
    d2 = ((x - mapped) ** 2).sum(-1)
    if p == 2:
        disp = d2
    else:
        # sqrt's derivative is infinite at 0 (a point the map leaves where it is): the
        # subgradient 0 there, as sinkhorn's p = 1 gradient takes, instead of 0 * inf = NaN.
        pos = d2 > 0
        disp = torch.where(pos, torch.sqrt(torch.where(pos, d2, torch.ones_like(d2))), 0.0)
    ot = sinkhorn(x, mapped, w, w, eps=eps, p=p, **kwargs).reg_cost
    return (w.to(disp.dtype) * disp).sum() - ot


class SparseOTResult(NamedTuple):
    """Result of :func:`sparse_ot`: plan (sparse COO [n, m], coalesced, cost's dtype);
    transport_cost ``<P, C>`` (no gradient); reg_cost, the semi-dual objective ``V(alpha)``
    (equal to ``<P, C> + gamma/2 ||P||^2`` at the optimum when ``k`` is None), differentiable
    in a, b and cost; alpha, the semi-dual potential [n]; n_iter (L-BFGS iterations);
    marginal_error ``||P 1 - a||_1`` (the columns are exact); converged. A traced call
    (``torch.compile``, ``torch.vmap``) gives the plan dense ``[n, m]`` (its number of non-zeros
    depends on the data) and n_iter, marginal_error, converged as 0-d tensors."""

    plan: torch.Tensor
    transport_cost: torch.Tensor
    reg_cost: torch.Tensor
    alpha: torch.Tensor
    n_iter: Union[int, torch.Tensor]
    marginal_error: Union[float, torch.Tensor]
    converged: Union[bool, torch.Tensor]


def _sparse_ot_run(a, b, cost, gamma, k, tol, max_iter, core: bool, need_b: bool):
    """One solve by the C++ core (or the PyTorch fallback when ``core`` is False): (reg_cost,
    box of the results, grad b or None)."""
    if core:
        alpha = torch.empty(a.shape[0], dtype=torch.float64)
        grad_b = torch.empty(b.shape[0], dtype=torch.float64) if need_b else None
        row, col, val, tc, reg, n_it, err, conv = _C.sparse_ot(
            a.detach(), b.detach(), cost.detach(), alpha, grad_b, gamma, k, tol, max_iter
        )
        row, col, val = (torch.from_numpy(v) for v in (row, col, val))
    else:
        row, col, val, tc, reg, n_it, err, conv, alpha, grad_b = torch_ot.sparse_ot(
            a, b, cost, gamma, k, tol, max_iter, need_b
        )
    idx = torch.stack([row, col])
    plan = torch.sparse_coo_tensor(
        idx, val, tuple(cost.shape), is_coalesced=True, check_invariants=False
    )
    box = dict(plan=plan, alpha=alpha, tc=tc, n_iter=n_it, err=err, conv=conv)
    return torch.tensor(reg, dtype=cost.dtype, device=cost.device), box, grad_b


def _warn_sparse_ot(box: dict, max_iter: int, tol: float, k: int, warn=check.warn) -> None:
    if not box["conv"]:
        warn(
            f"sparse_ot: did not converge within max_iter={max_iter} iterations (marginal error "
            f"{box['err']:.3g} > tol {tol:g}); increase max_iter or gamma"
            + (
                ", or k: a binding sparsity constraint may admit no plan with these marginals"
                if k
                else ""
            ),
        )


def _sparse_ot_apply(
    a, b, cost, gamma: float, k: int, tol: float, max_iter: int, box: dict, core: bool = True
) -> torch.Tensor:
    """reg_cost of the C++ solver (or of the PyTorch fallback when ``core`` is False);
    gradients by Danskin's theorem: dV/dcost = P, dV/da = alpha, dV/db from the solver."""

    def run(need):
        reg, out, grad_b = _sparse_ot_run(a, b, cost, gamma, k, tol, max_iter, core, need[1])
        box.update(out)
        plan = out["plan"]
        # alpha and the plan are returned too: the gradients are copies (n and nnz entries), so
        # that a change the caller makes to the results in place does not reach them. The dense
        # plan is made only when backward asks for it.
        grads = (
            out["alpha"].clone() if need[0] else None,
            grad_b,
            plan.clone().to_dense if need[2] else None,
        )
        return reg, grads

    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (a, b, cost))):
        return run((False,) * 3)[0]
    return grads_in_forward(run, (a, b, cost), Scaling(fp64=True, fn="sparse_ot"))


@check.public("sparse_ot")
def sparse_ot(
    a: torch.Tensor,
    b: torch.Tensor,
    cost: torch.Tensor,
    *,
    gamma: float,
    k: Optional[int] = None,
    tol: float = 1e-6,
    max_iter: int = 500,
    warn: bool = True,
    backend: str = "auto",
) -> SparseOTResult:
    r"""Quadratically regularized and sparsity-constrained OT (Blondel, Seguy and Rolet 2018;
    Liu, Puigcerver and Blondel 2023), with the plan returned sparse:

    ``min_P <P, C> + (gamma / 2) ||P||_F^2``  s.t.  ``P 1 = a, P^T 1 = b, P >= 0`` and, with
    ``k``, at most k non-zeros per column (k = None: no sparsity constraint; the quadratic
    regularization alone already gives sparse plans).

    Solved in the C++ core (``include/divkit/ot.h``) through the semi-dual ``V(alpha) =
    <alpha, a> - sum_j b_j max_{t in Delta_k} [<t, alpha - c_j> - (gamma b_j / 2) |t|^2]``,
    whose inner problem is the projection of ``(alpha - c_j) / (gamma b_j)`` onto the k-sparse
    simplex, by L-BFGS with a strong-Wolfe line search, in float64; ``P_:j = b_j t_j``. The
    same problem as POT's ``ot.smooth.smooth_ot_semi_dual(reg_type='l2')`` or
    ``(reg_type='sparsity_constrained', max_nz=k)``.

    With ``k``, the semi-dual is a convex relaxation of the constrained problem (Liu et al.
    2023): where the constraint binds, the plan read off its optimum may not meet the row
    marginals (k = 1 with generic weights cannot), and the result then says converged=False
    with the marginal error reached (the solver stops when V stalls).

    a [n], b [m] (equal total mass to 1e-6 relative; b is scaled to a's total, so the plan's
    columns sum to ``b sum(a) / sum(b)``) and cost [n, m]: float32 or float64 tensors. reg_cost
    is differentiable in a, b and cost (dV/dcost = P by Danskin's theorem; dV/da = alpha, only
    meaningful along directions that keep sum a fixed). Memory O(n m) (a float64 copy of the
    cost). Not converging within ``max_iter`` is reported in the result (and as a
    RuntimeWarning when ``warn``). ``backend``: ``"auto"`` (the C++ core for CPU tensors, the
    PyTorch fallback :func:`divkit.backends.torch_ot.sparse_ot` on other devices), ``"core"``
    or ``"torch"`` (the same semi-dual, L-BFGS and line search, evaluated for all columns at
    once with a sort per column; the host reads a few scalars back per evaluation).
    """
    fn = "sparse_ot"
    route = _device.route(fn, fn, backend, (("a", a), ("b", b), ("cost", cost)))
    a = _tensor(fn, "a", a, (1,), cpu=False)
    b = _tensor(fn, "b", b, (1,), cpu=False)
    C = _tensor(fn, "cost", cost, (2,), cpu=False)
    n, m = C.shape
    if a.shape[0] != n:
        check.fail(fn, f"a must have shape [{n}] (cost's rows), got {tuple(a.shape)}")
    if b.shape[0] != m:
        check.fail(fn, f"b must have shape [{m}] (cost's columns), got {tuple(b.shape)}")
    gamma = check.real(fn, "gamma", gamma)
    warn = check.boolean(fn, "warn", warn)
    if k is None:
        kk = 0
    else:
        kk = check.integer(fn, "k", k)
        if kk < 1:
            check.fail(fn, f"k must be >= 1 (non-zeros per column) or None, got {kk}")
    tol = check.real(fn, "tol", tol)
    max_iter = check.integer(fn, "max_iter", max_iter)
    if _ops.use_ops(a, b, C, fn=fn) and _ops.traced(a, b, C):
        # Through the op (traced, vmap; not DIVKIT_CUSTOM_OPS=always on plain tensors, whose
        # result keeps its eager types): the plan is dense, the statistics are 0-d tensors,
        # and the op warns itself when it runs.
        reg, plan, tc, alpha, n_iter, err, conv = _ops.sparse_ot(
            a, b, C, gamma, kk, tol, max_iter, warn, route.core
        )
        return SparseOTResult(plan.to(C.dtype), tc, reg, alpha.to(C.dtype), n_iter, err, conv)
    box: dict = {}
    reg = _sparse_ot_apply(a, b, C, gamma, kk, tol, max_iter, box, core=route.core)
    if warn:
        _warn_sparse_ot(box, max_iter, tol, kk)
    return SparseOTResult(
        box["plan"].to(C.dtype),
        torch.tensor(box["tc"], dtype=C.dtype, device=C.device),
        reg,
        box["alpha"].to(C.dtype),
        box["n_iter"],
        box["err"],
        box["conv"],
    )


def _sample_div_apply(x, y, a, b, which: str, kernel, sigma: float, core=True) -> torch.Tensor:
    """MMD or CS divergence, with the gradients for x and y computed in forward (by the C++
    core, or the PyTorch fallback when ``core`` is False)."""

    if _ops.use_ops(x, y, a, b, fn="mmd" if which == "mmd" else "cs_divergence"):
        return _ops.sample_divergence(x, y, a, b, which, kernel, sigma, core)

    def run(need):
        if not core:
            val, gx, gy = torch_ot.sample_divergence(which, x, y, a, b, kernel, sigma, need)
            return val.to(x.dtype), (gx, gy)
        gx = torch.empty(x.shape, dtype=torch.float64) if need[0] else None
        gy = torch.empty(y.shape, dtype=torch.float64) if need[1] else None
        val = _C.sample_divergence(
            which,
            x.detach(),
            y.detach(),
            a.detach() if a is not None else None,
            b.detach() if b is not None else None,
            kernel,
            sigma,
            gx,
            gy,
        )
        return torch.tensor(val, dtype=x.dtype), (gx, gy)

    if not (torch.is_grad_enabled() and (x.requires_grad or y.requires_grad)):
        return run((False, False))[0]
    return grads_in_forward(run, (x, y), Scaling(fp64=True, fn=which))


def _sample_args(fn, x, y, a, b, backend):
    """The checked tensors and the route (C++ core or PyTorch fallback) of mmd / cs."""
    route = _device.route(fn, fn, backend, (("x", x), ("y", y), ("a", a), ("b", b)))
    x = _tensor(fn, "x", x, (2,), cpu=False)
    y = _tensor(fn, "y", y, (2,), cpu=False)
    a = _tensor(fn, "a", a, (1,), optional=True, cpu=False)
    b = _tensor(fn, "b", b, (1,), optional=True, cpu=False)
    return x, y, a, b, route


@check.public("mmd")
def mmd(
    x: torch.Tensor,
    y: torch.Tensor,
    a: Optional[torch.Tensor] = None,
    b: Optional[torch.Tensor] = None,
    *,
    kernel: str = "gaussian",
    sigma: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    r"""Squared maximum mean discrepancy between weighted samples (Gretton et al. 2012; biased
    V-statistic): ``MMD^2 = a'Kxx a + b'Kyy b - 2 a'Kxy b`` with ``kernel = 'gaussian'``
    ``k = exp(-|u - v|^2 / (2 sigma^2))`` or ``'energy'`` ``k = -|u - v|`` (the energy
    distance). Symmetric, >= 0, 0 for identical samples. x [n, d], y [m, d] float32/float64,
    computed in float64 with O(n + m) memory; differentiable in x and y. ``backend``: as in
    :func:`sparse_ot` (the fallback sums the kernel values block by block of rows)."""
    fn = "mmd"
    x, y, a, b, route = _sample_args(fn, x, y, a, b, backend)
    kernel = check.string(fn, "kernel", kernel)  # the core checks the name
    sigma = check.positive(fn, "sigma", sigma)
    return _sample_div_apply(x, y, a, b, "mmd", kernel, sigma, route.core)


@check.public("cs_divergence")
def cs_divergence(
    x: torch.Tensor,
    y: torch.Tensor,
    a: Optional[torch.Tensor] = None,
    b: Optional[torch.Tensor] = None,
    *,
    sigma: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    r"""Cauchy-Schwarz divergence between weighted samples with a Gaussian kernel (Principe et
    al. 2000; the CS-IB objective of Yu et al. 2024):
    ``D_CS = log(a'Kxx a) + log(b'Kyy b) - 2 log(a'Kxy b)`` = ``-log(<p, q>^2 / (<p, p>
    <q, q>))`` for the kernel density estimates p, q. Symmetric, >= 0 (Cauchy-Schwarz), 0 for
    identical samples; +inf when the cross term underflows. Differentiable in x and y.
    ``backend``: as in :func:`mmd`."""
    fn = "cs_divergence"
    x, y, a, b, route = _sample_args(fn, x, y, a, b, backend)
    sigma = check.positive(fn, "sigma", sigma)
    return _sample_div_apply(x, y, a, b, "cs", "gaussian", sigma, route.core)


# Sample-based measures built on the OT toolbox, in their own modules: the Gaussian KDE with its
# KL-optimal bandwidth, the Wasserstein dependency measure and the Light Schrodinger Bridge.
from .kde import KdeBandwidthResult, kde_bandwidth, kde_log_density, kde_log_likelihood  # noqa: E402
from .wdm import WassersteinDependency, WDMOutput, wasserstein_dependency, wdm_critic  # noqa: E402

__all__ += [
    "kde_log_density",
    "kde_log_likelihood",
    "kde_bandwidth",
    "KdeBandwidthResult",
    "wasserstein_dependency",
    "WassersteinDependency",
    "WDMOutput",
    "wdm_critic",
]
from .lightsb import LightSB, LightSBConditional, lightsb_objective  # noqa: E402

__all__ += ["LightSB", "LightSBConditional", "lightsb_objective"]
