"""The device-generic fallback of :func:`divkit.ot.sinkhorn`, in PyTorch ops on any device.

It transcribes ``src/ot/sinkhorn.cc`` (see ``include/divkit/ot.h``): the same problem, updates,
stopping rule, epsilon scaling, symmetric averaging, results and envelope gradients.

* Cost ``C_ij = |x_i - y_j|^p`` on the clouds centered on their joint mean, by direct
  differences (p = 1, or d <= 8) or ``|x|^2 + |y|^2 - 2 x.y`` clamped at 0 (p = 2, d > 8), as the
  core. It is held as a ``[B, n, m]`` float64 tensor when that fits in ``cost_cache_mib`` (the
  core's budget; a given cost matrix is always held), and otherwise computed on the fly in
  blocks of rows (:data:`BLOCK_ENTRIES` entries a block) in every half-iteration and in the
  final pass, as the core does: memory O(B (n + m) d) plus one block, never the n x m cost.
  The plan (``return_plan`` or a cost gradient) is n x m by nature.
* Everything in float64 on the inputs' device, whatever their dtype (the core iterates in the
  inputs' dtype: float32 inputs agree with it to float32 rounding, float64 ones to ~1e-12).
* Log-domain updates only: the core's kernel-domain iterations agree with them to rounding.
* The B problems of a batch iterate together; a problem that has converged is frozen by masks
  (``torch.where``), so that each gets the core's iterates, iteration count and potentials.
  The convergence flags are read back to the host every :data:`SYNC_EVERY` iterations, not
  every iteration: at most that many iterations of work are wasted after the last problem
  converges, and nothing else synchronizes inside the loop. The argument checks (finite
  values, weights, masses) and the epsilon-scaling schedule read a few values back once per
  call.
* ``cfg.sync`` False (CUDA graph capture; the mode of the CUDA kernels): no host read, no
  synchronization, no host-to-device copy. All ``max_iter`` iterations run (a converged problem
  stays frozen by its mask: the same results); the epsilon schedule is computed on the device
  with the host loop's multiplications in its order, padded to its longest possible length
  (:data:`MAX_STAGES`); the argument checks become device flags, and a problem whose inputs
  would have raised gets NaN transport_cost, reg_cost and marginal_error and ``converged``
  False (every problem for a non-finite or negative value, or symmetric inputs that differ;
  that problem alone for a zero total weight or unequal masses). Checks that need no value
  (shapes, options) still raise.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import torch

from .. import _validate as check

__all__ = ["sinkhorn", "SYNC_EVERY", "BLOCK_ENTRIES", "MAX_STAGES"]

#: Iterations between two reads of the convergence flags by the host.
SYNC_EVERY = 16
#: Cost entries (B x rows x m) per block when the cost is computed on the fly: 32 MiB of
#: float64 per temporary (the final pass holds about six).
BLOCK_ENTRIES = 1 << 22
#: Epsilon-scaling stages at most (the core's bound).
MAX_STAGES = 200

_F64 = torch.float64


def check_options(fn: str, cfg: Any) -> None:
    """The core's option checks (``check_options`` in sinkhorn.cc)."""
    if not (math.isfinite(cfg.eps) and cfg.eps > 0):
        check.fail(fn, f"eps must be finite and > 0, got {cfg.eps:g}")
    if cfg.p not in (1, 2):
        check.fail(fn, f"p must be 1 or 2, got {cfg.p}")
    if not (cfg.tol >= 0):
        check.fail(fn, f"tol must be >= 0, got {cfg.tol:g}")
    if cfg.max_iter < 1:
        check.fail(fn, f"max_iter must be >= 1, got {cfg.max_iter}")
    if cfg.check_every < 1:
        check.fail(fn, f"check_every must be >= 1, got {cfg.check_every}")
    s = cfg.eps_scaling
    if not (s == 0.0 or 0.0 < s < 1.0):
        check.fail(fn, f"eps_scaling must be 0 (off) or in (0, 1), got {s:g}")
    for name, r in (("rho_a", cfg.rho_a), ("rho_b", cfg.rho_b)):
        if not (r > 0):
            check.fail(fn, f"{name} must be > 0 (+inf: balanced), got {r:g}")


def _first(mask: torch.Tensor) -> str:
    return "[" + ", ".join(str(int(v)) for v in mask.nonzero()[0].tolist()) + "]"


def _weights(fn: str, name: str, w: Optional[torch.Tensor], B: int, n: int, dev, flags=None):
    """The float64 weights [B, n] (default 1/n), checked: errors, or with ``flags`` (a list;
    sync=False) no host read: appends (a 0-d bool, set when any weight is non-finite or
    negative; a [B] bool, set for the problems whose weights sum to 0)."""
    if w is None:
        return torch.full((B, n), 1.0 / n, dtype=_F64, device=dev)
    w = w.to(_F64)
    bad = ~torch.isfinite(w)
    neg = w < 0
    zero = ~(w.sum(1) > 0)
    if flags is not None:
        flags.append(((bad | neg).any(), zero))
        return w
    flags = torch.stack([bad.any(), neg.any(), zero.any()]).tolist()
    if flags[0]:
        check.fail(fn, f"{name} has a non-finite value at {_first(bad)}")
    if flags[1]:
        check.fail(fn, f"{name} has a negative weight at {_first(neg)}")
    if flags[2]:
        check.fail(fn, f"{name} sums to 0 in problem {int(zero.nonzero()[0, 0])}")
    return w


def _schedule_on_host(scale: torch.Tensor, eps: float, s: float, dev):
    """The epsilon-scaling schedule (the core's loop: eps_k = scale s^k while > eps, at most
    :data:`MAX_STAGES`) read back and built on the host: (sched [B, n_st + 1] padded with eps,
    n_stage [B], n_st the longest)."""
    B = scale.shape[0]
    stages = []
    if s > 0:
        for sc in scale.tolist():
            st, e = [], sc
            while e > eps and len(st) < MAX_STAGES:
                st.append(e)
                e *= s
            stages.append(st)
    n_st = max((len(st) for st in stages), default=0)
    sched = torch.full((B, n_st + 1), eps, dtype=_F64)
    for k, st in enumerate(stages):
        sched[k, : len(st)] = torch.tensor(st, dtype=_F64)
    n_stage = torch.tensor([len(st) for st in stages] or [0] * B, dtype=torch.int64)
    return sched.to(dev), n_stage.to(dev), n_st


def _schedule_on_device(scale: torch.Tensor, eps: float, s: float):
    """The schedule of :func:`_schedule_on_host` with no host read: the same multiplications in
    the same order (so the same values), padded to :data:`MAX_STAGES` stages for every problem
    (n_st = MAX_STAGES; the iterations past a problem's own stages see eps, as on the host)."""
    B, dev = scale.shape[0], scale.device
    if not s > 0:
        zero = torch.zeros(B, dtype=torch.int64, device=dev)
        return torch.full((B, 1), eps, dtype=_F64, device=dev), zero, 0
    cols = [scale]
    for _ in range(MAX_STAGES - 1):
        cols.append(cols[-1] * s)
    e = torch.stack(cols, 1)  # [B, MAX_STAGES]: scale s^k, one rounding per multiplication
    # Stage k exists while every e_0..e_k > eps (the host loop stops at the first e <= eps).
    keep = torch.cummin((e > eps).to(torch.int64), 1).values.bool()
    sched = torch.cat([torch.where(keep, e, eps), e.new_full((B, 1), eps)], 1)
    return sched, keep.sum(1), MAX_STAGES


def _cost_rows(x: torch.Tensor, y: torch.Tensor, p: int, i0: int, i1: int) -> torch.Tensor:
    """|x_i - y_j|^p [B, i1 - i0, m] for the rows i0 <= i < i1 of centered float64 clouds, as
    the core's cost tiles."""
    d = x.shape[2]
    xb = x[:, i0:i1]
    if p == 2 and d > 8:
        xn = (xb * xb).sum(-1)
        yn = (y * y).sum(-1)
        c = (xn[:, :, None] + yn[:, None, :]) - 2.0 * torch.bmm(xb, y.transpose(1, 2))
        return c.clamp_min(0.0)
    # Direct differences, in blocks of rows so that the [rows, m, d] temporary stays small.
    B, n, m = x.shape[0], i1 - i0, y.shape[1]
    c = torch.empty(B, n, m, dtype=_F64, device=x.device)
    rows = max(1, (1 << 22) // max(1, B * m * d))
    for i in range(0, n, rows):
        diff = xb[:, i : i + rows, None, :] - y[:, None, :, :]
        c[:, i : i + rows] = (diff * diff).sum(-1)
    return c.sqrt_() if p == 1 else c


class _Cost:
    """The cost of a problem, held ([B, n, m]) or computed on the fly in blocks of rows:
    ``blocks()`` yields (i0, i1, C[:, i0:i1])."""

    def __init__(self, n: int, held: Optional[torch.Tensor] = None, x=None, y=None, p=2, rows=0):
        self.n, self.held, self.x, self.y, self.p = n, held, x, y, p
        self.rows = n if held is not None else max(1, rows)

    def blocks(self):
        for i0 in range(0, self.n, self.rows):
            i1 = min(self.n, i0 + self.rows)
            if self.held is not None:
                yield i0, i1, self.held[:, i0:i1]
            else:
                yield i0, i1, _cost_rows(self.x, self.y, self.p, i0, i1)


def _cost(x: torch.Tensor, y: torch.Tensor, p: int) -> torch.Tensor:
    """|x_i - y_j|^p [B, n, m] of centered float64 clouds, held whole."""
    return _cost_rows(x, y, p, 0, x.shape[1])


def sinkhorn(x, y, cost, a, b, cfg: Any, need: Tuple[bool, bool, bool, bool, bool]):
    """Solves the B problems of 3-D inputs (x [B, n, d], y [B, m, d], or cost [B, n, m]; a, b
    [B, n], [B, m] or None). ``need`` = (grad x, grad y, grad a, grad b, grad cost). Returns
    (stats, f, g, plan, grad_x, grad_y, grad_a, grad_b): stats a dict of [B] tensors
    (transport_cost, reg_cost, n_iter, marginal_error, converged), the potentials and
    gradients float64, the plan in the inputs' dtype (when ``cfg.return_plan`` or the cost
    needs a gradient)."""
    fn = cfg.fn
    need_x, need_y, need_a, need_b, need_c = need
    check_options(fn, cfg)
    sync = getattr(cfg, "sync", True)
    # sync=False: the value checks as device flags, (0-d "every problem", [B] "this problem").
    flags: Optional[list] = None if sync else []
    points = cost is None
    src = x if points else cost
    dev, dt = src.device, src.dtype
    if points:
        B, n, d = x.shape
        m = y.shape[1]
        if n < 1 or m < 1:
            check.fail(fn, f"{'x' if n < 1 else 'y'} must have at least one point")
        if d < 1:
            check.fail(fn, "x and y must have at least one coordinate (d >= 1), got d = 0")
        if y.dtype != x.dtype:
            check.fail(fn, f"y must have x's dtype {x.dtype}, got {y.dtype}")
        xd, yd = x.to(_F64), y.to(_F64)
        bx, by = ~torch.isfinite(xd), ~torch.isfinite(yd)
        if flags is not None:
            flags.append((bx.any() | by.any(), None))
        else:
            found = torch.stack([bx.any(), by.any()]).tolist()
            if found[0]:
                check.fail(fn, f"x has a non-finite value (NaN or inf) at {_first(bx)}")
            if found[1]:
                check.fail(fn, f"y has a non-finite value (NaN or inf) at {_first(by)}")
        # Centered on the joint mean, as the core (its expansion cancels less near the origin).
        center = torch.cat([xd, yd], 1).mean(1, keepdim=True)
        xd, yd = xd - center, yd - center
        # Held when it fits the core's cache budget, else on the fly in blocks of rows.
        if B * n * m * 8 <= cfg.cost_cache_bytes:
            C = _Cost(n, held=_cost(xd, yd, cfg.p))
        else:
            C = _Cost(n, x=xd, y=yd, p=cfg.p, rows=BLOCK_ENTRIES // max(1, B * m))
        lo = torch.minimum(xd.amin(1), yd.amin(1))
        hi = torch.maximum(xd.amax(1), yd.amax(1))
        diam2 = ((hi - lo) ** 2).sum(-1)
        scale = diam2 if cfg.p == 2 else diam2.sqrt()
    else:
        B, n, m = cost.shape
        if n < 1 or m < 1:
            check.fail(fn, "cost must have at least one point (n >= 1 and m >= 1)")
        held = cost.to(_F64)
        bc = ~torch.isfinite(held)
        if flags is not None:
            flags.append((bc.any(), None))
        elif bool(bc.any()):
            check.fail(fn, f"cost has a non-finite value at {_first(bc)}")
        scale = held.abs().amax((1, 2))
        C = _Cost(n, held=held)
    aw = _weights(fn, "a", a, B, n, dev, flags)
    bw = _weights(fn, "b", b, B, m, dev, flags)
    ma, mb = aw.sum(1), bw.sum(1)
    bal_a, bal_b = math.isinf(cfg.rho_a), math.isinf(cfg.rho_b)
    if bal_a and bal_b:
        bad = (ma - mb).abs() > 1e-6 * torch.maximum(ma, mb)
        if flags is not None:
            flags.append((None, bad))
        elif bool(bad.any()):
            k = int(bad.nonzero()[0, 0])
            check.fail(
                fn,
                f"a and b must have equal total mass for a balanced problem (or give rho for an "
                f"unbalanced one), got sum a = {float(ma[k]):g}, sum b = {float(mb[k]):g} in "
                f"problem {k}",
            )
    sym = cfg.symmetric
    if sym:
        if not points or n != m:
            check.fail(fn, "symmetric needs points with y equal to x (a self-transport problem)")
        if flags is not None:
            flags.append(((x != y).any() | (aw != bw).any(), None))
        else:
            if not torch.equal(x, y):
                check.fail(fn, "symmetric needs y equal to x")
            if not torch.equal(aw, bw):
                check.fail(fn, "symmetric needs b equal to a")
        if cfg.rho_a != cfg.rho_b:
            check.fail(fn, "symmetric needs rho_a equal to rho_b")
    la, lb = aw.log(), bw.log()  # log 0 = -inf: a zero weight drops out of the LSE

    # Epsilon scaling: eps_k = scale s^k while > eps (at most 200), one iteration each; the
    # schedule differs between problems, so eps is a [B, 1] tensor per iteration.
    eps = cfg.eps
    if not sync:
        sched, n_stage, n_st = _schedule_on_device(scale, eps, cfg.eps_scaling)
    else:
        sched, n_stage, n_st = _schedule_on_host(scale, eps, cfg.eps_scaling, dev)
    tau_a = (lambda e: 1.0) if bal_a else (lambda e: cfg.rho_a / (cfg.rho_a + e))
    tau_b = (lambda e: 1.0) if bal_b else (lambda e: cfg.rho_b / (cfg.rho_b + e))

    def t_f(g, e):  # f_i = -tau_a eps LSE_j(log b_j + (g_j - C_ij) / eps)
        parts = []
        for _, _, c in C.blocks():
            parts.append(torch.logsumexp(lb[:, None, :] + (g[:, None, :] - c) / e[:, :, None], 2))
        return -tau_a(e) * e * (parts[0] if len(parts) == 1 else torch.cat(parts, 1))

    def t_g(f, e):  # g_j = -tau_b eps LSE_i(log a_i + (f_i - C_ij) / eps)
        parts = []
        for i0, i1, c in C.blocks():
            z = la[:, i0:i1, None] + (f[:, i0:i1, None] - c) / e[:, :, None]
            parts.append(torch.logsumexp(z, 1))
        lse = parts[0] if len(parts) == 1 else torch.logsumexp(torch.stack(parts), 0)
        return -tau_b(e) * e * lse

    f = torch.zeros(B, n, dtype=_F64, device=dev)
    g = torch.zeros(B, m, dtype=_F64, device=dev)
    err = torch.full((B,), math.inf, dtype=_F64, device=dev)
    n_iter = torch.zeros(B, dtype=torch.int64, device=dev)
    conv = torch.zeros(B, dtype=torch.bool, device=dev)
    active = torch.ones(B, dtype=torch.bool, device=dev)
    ce = cfg.check_every
    for it in range(cfg.max_iter):
        # This iteration's eps per problem (the schedule is padded with eps).
        e = sched[:, min(it, n_st)][:, None]
        k = it - n_stage  # iterations at eps so far (negative in the stages)
        fnew = t_f(f if sym else g, e)
        # The L1 residual of the rows of the plan (f, g): row sums a_i exp((f_i - fnew_i) / eps).
        res = (aw * torch.expm1((f - fnew) / eps).abs()).sum(1)
        if sym:
            chk = active & (k >= 0) & (k % ce == 0)
        else:  # meaningful once g came from an f at eps (k >= 1)
            chk = active & (k >= 1) & (k % ce == 0)
        err = torch.where(chk, res, err)
        done = chk & (err <= cfg.tol)
        if sym:
            # Averaged update f <- (f + T(f)) / 2; a converged problem keeps f (its residual).
            step = active & ~done
            f = torch.where(step[:, None], 0.5 * (f + fnew), f)
            g = f
            n_iter += step
        else:
            f = torch.where(active[:, None], fnew, f)
            g = torch.where(active[:, None], t_g(f, e), g)
            n_iter += active
        conv |= done
        active &= ~done
        # sync=False (divkit.ot.sinkhorn's option): no early stop, max_iter iterations.
        if sync and (it + 1) % SYNC_EVERY == 0 and not bool(active.any()):
            break

    # Final pass, block by block of rows: e_ij = P_ij / a_i = exp(f_i / eps + log b_j +
    # (g_j - C_ij) / eps).
    need_plan = cfg.return_plan or need_c
    grad_pts = points and (need_x or need_y)
    s = torch.empty(B, n, dtype=_F64, device=dev)
    tce = torch.empty(B, n, dtype=_F64, device=dev)
    plan = torch.empty(B, n, m, dtype=dt, device=dev) if need_plan else None
    sc = torch.zeros(B, m, dtype=_F64, device=dev) if need_b else None
    gx = torch.empty(B, n, xd.shape[2], dtype=_F64, device=dev) if points and need_x else None
    gy = torch.zeros(B, m, yd.shape[2], dtype=_F64, device=dev) if points and need_y else None
    wcol = torch.zeros(B, m, dtype=_F64, device=dev) if points and need_y else None
    for i0, i1, c in C.blocks():
        le = f[:, i0:i1, None] / eps + lb[:, None, :] + (g[:, None, :] - c) / eps
        E = torch.exp(le.clamp(-745.0, 709.0))
        s[:, i0:i1] = E.sum(2)
        tce[:, i0:i1] = (E * c).sum(2)
        P = aw[:, i0:i1, None] * E
        if need_plan:
            plan[:, i0:i1] = P.to(dt)
        if need_b:
            # Column sums of P_ij / b_j, from their own exponent (as the core's pass over the
            # columns), so that a zero b_j gives its gradient rather than 0 / 0.
            lc = la[:, i0:i1, None] + (f[:, i0:i1, None] + g[:, None, :] - c) / eps
            sc += torch.exp(lc.clamp(-745.0, 709.0)).sum(1)
        if grad_pts:
            # grad x_i = sum_j P_ij dC_ij/dx_i: 2 (x_i - y_j) for p = 2, (x_i - y_j) /
            # |x_i - y_j| for p = 1 (0 at coincident points).
            W = 2.0 * P if cfg.p == 2 else torch.where(c > 0, P / torch.where(c > 0, c, 1.0), 0.0)
            if need_x:
                gx[:, i0:i1] = xd[:, i0:i1] * W.sum(2, keepdim=True) - torch.bmm(W, yd)
            if need_y:
                wcol += W.sum(1)
                gy -= torch.bmm(W.transpose(1, 2), xd[:, i0:i1])
    if gy is not None:
        gy += yd * wcol[:, :, None]
    tc = (aw * tce).sum(1)
    mass = (aw * s).sum(1)
    rerr = (aw * s - aw).abs().sum(1)
    if bal_a and bal_b:
        marg = rerr
        if cfg.tol > 0:
            conv = conv | (rerr <= cfg.tol)
    else:
        marg = err

    def F(w, pot, rho):  # <w, f> (balanced) or -rho <w, exp(-f / rho) - 1>
        return (w * pot).sum(1) if math.isinf(rho) else (-rho * w * torch.expm1(-pot / rho)).sum(1)

    def dF(pot, rho):
        return pot if math.isinf(rho) else -rho * torch.expm1(-pot / rho)

    reg = F(aw, f, cfg.rho_a) + F(bw, g, cfg.rho_b) - eps * (mass - ma * mb)
    ga = dF(f, cfg.rho_a) - eps * (s - mb[:, None]) if need_a else None
    gb = dF(g, cfg.rho_b) - eps * (sc - ma[:, None]) if need_b else None
    if flags is not None:
        # The problems whose inputs would have raised: NaN costs, not converged (as the CUDA
        # kernels' sync=False results).
        bad = torch.zeros(B, dtype=torch.bool, device=dev)
        for every, this in flags:
            if every is not None:
                bad = bad | every
            if this is not None:
                bad = bad | this
        tc = torch.where(bad, math.nan, tc)
        reg = torch.where(bad, math.nan, reg)
        marg = torch.where(bad, math.nan, marg)
        conv = conv & ~bad
    stats = dict(
        transport_cost=tc,
        reg_cost=reg,
        n_iter=n_iter,
        marginal_error=marg,
        converged=conv,
    )
    return stats, f, g, plan, gx, gy, ga, gb


# ---------------------------------------------------------------------------------------------
# MMD and the Cauchy-Schwarz divergence (src/ot/sample_divergences.cc): fp64, kernel values
# summed block by block of rows, never stored whole.
# ---------------------------------------------------------------------------------------------


def _cloud(fn: str, name: str, wname: str, x: torch.Tensor, w: Optional[torch.Tensor]):
    """The points (float64) and weights (default 1/n) of a cloud, checked as the core does."""
    n, d = x.shape
    if n < 1:
        check.fail(fn, f"{name} must have at least one point")
    if d < 1:
        check.fail(fn, f"{name} must have at least one coordinate")
    xd = x.detach().to(_F64)
    bad = ~torch.isfinite(xd)
    if bool(bad.any()):
        i, k = bad.nonzero()[0].tolist()
        check.fail(fn, f"{name} has a non-finite value (NaN or inf) at [{i}, {k}]")
    if w is None:
        return xd, torch.full((n,), 1.0 / n, dtype=_F64, device=x.device)
    if w.dim() != 1 or w.shape[0] != n:
        check.fail(fn, f"{wname} must have shape [{n}], got {list(w.shape)}")
    wd = w.detach().to(_F64)
    bad = ~torch.isfinite(wd) | (wd < 0)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        check.fail(fn, f"{wname} must be finite and >= 0, got {float(wd[i]):g} at [{i}]")
    if not bool(wd.sum() > 0):
        check.fail(fn, f"{wname} sums to 0")
    return xd, wd


def _pair_sums(P, wp, Q, wq, kernel: str, sigma: float, need_grad: bool):
    """S = sum_ij wp_i wq_j k(p_i, q_j) and, when asked, its gradient with respect to the p_i
    ([np, d]), in blocks of rows of P."""
    total = torch.zeros((), dtype=_F64, device=P.device)
    grad = torch.empty_like(P) if need_grad else None
    rows = max(1, BLOCK_ENTRIES // max(1, Q.shape[0] * (P.shape[1] if need_grad else 1)))
    inv2s2 = 1.0 / (2.0 * sigma * sigma)
    for i in range(0, P.shape[0], rows):
        pb = P[i : i + rows]
        diff = pb[:, None, :] - Q[None, :, :] if need_grad else None
        r2 = (diff * diff).sum(-1) if need_grad else torch.cdist(pb, Q).square()
        if kernel == "gaussian":
            kv = torch.exp(-r2 * inv2s2)
            coef = -2.0 * inv2s2 * kv
        else:
            r = torch.sqrt(r2)
            kv = -r
            coef = torch.where(r > 0, -1.0 / torch.where(r > 0, r, 1.0), 0.0)
        total = total + (wp[i : i + rows] * (kv * wq).sum(1)).sum()
        if need_grad:
            grad[i : i + rows] = wp[i : i + rows, None] * ((wq * coef)[:, :, None] * diff).sum(1)
    return total, grad


def sample_divergence(
    which: str, x, y, a, b, kernel: str, sigma: float, need: Tuple[bool, bool]
) -> Tuple[float, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """MMD^2 (``which = "mmd"``) or the Cauchy-Schwarz divergence (``"cs"``) of weighted samples
    x [n, d], y [m, d], as ``_C.sample_divergence``: (value as a 0-d float64 tensor, grad x,
    grad y) with the gradients float64 where ``need`` asks."""
    fn = "mmd" if which == "mmd" else "cs_divergence"
    if kernel not in ("gaussian", "energy"):
        check.fail(fn, f"kernel must be gaussian or energy, got '{kernel}'")
    if kernel == "gaussian" and not (math.isfinite(sigma) and sigma > 0):
        check.fail(fn, f"sigma must be finite and > 0, got {sigma:g}")
    X, wa = _cloud(fn, "x", "a", x, a)
    Y, wb = _cloud(fn, "y", "b", y, b)
    if X.shape[1] != Y.shape[1]:
        check.fail(fn, f"y must have x's dimension d = {X.shape[1]}, got {Y.shape[1]}")
    gx_, gy_ = need
    xx, gxx = _pair_sums(X, wa, X, wa, kernel, sigma, gx_)
    yy, gyy = _pair_sums(Y, wb, Y, wb, kernel, sigma, gy_)
    xy, gxy = _pair_sums(X, wa, Y, wb, kernel, sigma, gx_)
    gyx = _pair_sums(Y, wb, X, wa, kernel, sigma, True)[1] if gy_ else None
    if which == "mmd":
        # d/dx of a'Kxx a = 2 * (row gradient), by symmetry of k.
        gx = 2.0 * gxx - 2.0 * gxy if gx_ else None
        gy = 2.0 * gyy - 2.0 * gyx if gy_ else None
        return xx + yy - 2.0 * xy, gx, gy
    # Gaussian kernel sums are > 0; the cross term underflows to 0 only for clouds many sigma
    # apart, where the divergence is +inf (and the gradients are not defined: zeros).
    if not bool(xy > 0):
        zx = torch.zeros_like(X) if gx_ else None
        zy = torch.zeros_like(Y) if gy_ else None
        return torch.tensor(math.inf, dtype=_F64, device=X.device), zx, zy
    gx = 2.0 * gxx / xx - 2.0 * gxy / xy if gx_ else None
    gy = 2.0 * gyy / yy - 2.0 * gyx / xy if gy_ else None
    return torch.log(xx) + torch.log(yy) - 2.0 * torch.log(xy), gx, gy


# ---------------------------------------------------------------------------------------------
# Quadratically regularized and sparsity-constrained OT (src/ot/sparse_ot.cc): the semi-dual
# evaluated for every column at once (the k-sparse simplex projection by a sort per column), and
# the core's L-BFGS with its strong-Wolfe line search, driven from the host (a few scalars read
# back per evaluation).
# ---------------------------------------------------------------------------------------------


class _SemiDual:
    """F(alpha) = -V(alpha), its gradient P 1 - a, and the columns' supports."""

    def __init__(self, a, b, ct, gamma: float, k: int) -> None:
        self.a, self.b, self.ct, self.gamma = a, b, ct, gamma  # ct [m, n]
        m, n = ct.shape
        self.k = n if k == 0 else min(k, n)
        self.pos = b > 0
        self.scale = gamma * b
        self.r = torch.arange(1, self.k + 1, dtype=_F64, device=ct.device)

    def evaluate(self, alpha: torch.Tensor):
        """(F, grad, t [m, n] the columns' t_j, phi [m])."""
        X = alpha[None, :] - self.ct  # [m, n]: alpha_i - C_ij
        safe = torch.where(self.pos, self.scale, torch.ones_like(self.scale))
        Z = X / safe[:, None]
        # The k largest z of each column (ties: the lower row), projected onto the simplex.
        vals, idx = torch.sort(Z, dim=1, descending=True, stable=True)
        vals, idx = vals[:, : self.k], idx[:, : self.k]
        css = vals.cumsum(1)
        keep = vals - (css - 1.0) / self.r > 0
        cnt = keep.sum(1).clamp_min(1)
        theta = (css.gather(1, (cnt - 1)[:, None]) - 1.0) / cnt[:, None].to(_F64)
        t = torch.where(vals > theta, vals - theta, torch.zeros_like(vals))
        # z - theta loses the low bits of large z: rescale so that each column sums to 1.
        t = t / t.sum(1, keepdim=True)
        sc = self.scale[:, None]
        phi = (t * sc * vals - 0.5 * sc * t * t).sum(1)
        # A column with b_j = 0 has no mass: phi_j is max_i (alpha_i - C_ij), t_j the unit vector
        # at the first maximum.
        best = X.argmax(1)
        phi = torch.where(self.pos, phi, X.gather(1, best[:, None]).squeeze(1))
        unit = torch.zeros_like(t)
        unit[:, 0] = 1.0
        t = torch.where(self.pos[:, None], t, unit)
        idx = torch.where(self.pos[:, None], idx, best[:, None].expand_as(idx))
        T = torch.zeros_like(self.ct).scatter_(1, idx, t)  # [m, n]
        F = -(alpha * self.a).sum() + (self.b * phi).sum()
        grad = -self.a + (self.b[:, None] * T).sum(0)
        return F, grad, T, phi


class _Eval:
    __slots__ = ("F", "grad", "T", "phi")

    def __init__(self, f: _SemiDual, x: torch.Tensor) -> None:
        F, self.grad, self.T, self.phi = f.evaluate(x)
        self.F = float(F)


def _dot(u: torch.Tensor, v: torch.Tensor) -> float:
    return float((u * v).sum())


def _line_search(f: _SemiDual, x, at0: _Eval, d):
    """Strong-Wolfe line search (Nocedal & Wright 3.5/3.6 with the core's safeguards and its
    approximate-Wolfe acceptance). Returns (x_new, evaluation) or None."""
    c1, c2 = 1e-4, 0.9
    f0, g0 = at0.F, _dot(at0.grad, d)
    state = {}

    def phi(s):
        xt = x + s * d
        e = _Eval(f, xt)
        state["x"], state["e"] = xt, e
        return e.F, _dot(e.grad, d)

    def approx_wolfe(fs, gs):
        return fs <= f0 + 1e-12 * abs(f0) and gs >= c2 * g0 and gs <= (1.0 - 2.0 * c1) * -g0

    def done():
        return state["x"], state["e"]

    def zoom(lo, flo, glo, hi, fhi):
        for _ in range(40):
            w = hi - lo
            den = 2.0 * (fhi - flo - glo * w)
            s = lo - glo * w * w / den if den > 0 else lo + 0.5 * w
            a_, b_ = min(lo, hi) + 0.1 * abs(w), max(lo, hi) - 0.1 * abs(w)
            if not (a_ <= s <= b_):
                s = lo + 0.5 * w
            fs, gs = phi(s)
            if approx_wolfe(fs, gs):
                return done()
            if fs > f0 + c1 * s * g0 or fs >= flo:
                hi, fhi = s, fs
            else:
                if abs(gs) <= -c2 * g0:
                    return done()
                if gs * w >= 0:
                    hi, fhi = lo, flo
                lo, flo, glo = s, fs, gs
            if abs(hi - lo) <= 1e-16 * max(1.0, abs(lo)):
                break
        if lo > 0.0:
            phi(lo)
            return done()
        return None

    s, s_prev, f_prev, g_prev = 1.0, 0.0, f0, g0
    for it in range(40):
        fs, gs = phi(s)
        if not math.isfinite(fs):
            return None
        if approx_wolfe(fs, gs):
            return done()
        if fs > f0 + c1 * s * g0 or (it > 0 and fs >= f_prev):
            return zoom(s_prev, f_prev, g_prev, s, fs)
        if abs(gs) <= -c2 * g0:
            return done()
        if gs >= 0:
            return zoom(s, fs, gs, s_prev, f_prev)
        s_prev, f_prev, g_prev = s, fs, gs
        s *= 2.0
    return None


def sparse_ot(a, b, cost, gamma: float, k: int, tol: float, max_iter: int, need_grad_b: bool):
    """The core's ``sparse_ot`` on any device: (row, col, value, transport_cost, reg_cost,
    n_iter, marginal_error, converged, alpha [n] float64, grad_b [m] float64 or None), the plan
    as COO triplets in row-major order (tensors on the inputs' device)."""
    fn = "sparse_ot"
    n, m = cost.shape
    if n < 1 or m < 1:
        check.fail(fn, f"cost must be non-empty, got shape {list(cost.shape)}")
    if not (math.isfinite(gamma) and gamma > 0):
        check.fail(fn, f"gamma must be finite and > 0, got {gamma:g}")
    if k < 0:
        check.fail(fn, f"k must be >= 1 (non-zeros per column) or 0 (no constraint), got {k}")
    if not (tol >= 0):
        check.fail(fn, f"tol must be >= 0, got {tol:g}")
    if max_iter < 1:
        check.fail(fn, f"max_iter must be >= 1, got {max_iter}")
    ws = []
    for name, w in (("a", a), ("b", b)):
        wd = w.detach().to(_F64)
        nf, neg = ~torch.isfinite(wd), wd < 0
        if bool(nf.any()):
            check.fail(fn, f"{name} has a non-finite value at [{int(nf.nonzero()[0, 0])}]")
        if bool(neg.any()):
            i = int(neg.nonzero()[0, 0])
            check.fail(fn, f"{name} has a negative weight {float(wd[i]):g} at [{i}]")
        ws.append(wd)
    av, bv = ws
    sa, sb = float(av.sum()), float(bv.sum())
    if not sa > 0:
        check.fail(fn, "a sums to 0")
    if not sb > 0:
        check.fail(fn, "b sums to 0")
    if abs(sa - sb) > 1e-6 * max(sa, sb):
        check.fail(fn, f"a and b must have equal total mass, got {sa:g} and {sb:g}")
    # As the core: b scaled to a's total, or a mismatch below the check's tolerance (float32
    # rounding) leaves a marginal error no alpha can remove and alpha diverges.
    bv = bv * (sa / sb)
    C = cost.detach().to(_F64)
    bad = ~torch.isfinite(C)
    if bool(bad.any()):
        i, j = bad.nonzero()[0].tolist()
        check.fail(fn, f"cost has a non-finite value at [{i}, {j}]")
    f = _SemiDual(av, bv, C.T.contiguous(), gamma, k)

    # L-BFGS on F = -V (Nocedal & Wright, Algorithm 7.4/7.5), as the core.
    history_len, stall = 20, 50
    x = torch.zeros(n, dtype=_F64, device=C.device)
    cur = _Eval(f, x)
    S: list = []
    Y: list = []
    rho: list = []
    n_iter = 0
    err = float(cur.grad.abs().sum())
    restarted = False
    hist = [cur.F]
    while err > tol and n_iter < max_iter:
        if len(hist) > stall and hist[-1 - stall] - cur.F <= 1e-14 * max(1.0, abs(cur.F)):
            break
        q = cur.grad.clone()
        al = [0.0] * len(S)
        for h in range(len(S) - 1, -1, -1):
            al[h] = rho[h] * _dot(S[h], q)
            q -= al[h] * Y[h]
        h0 = gamma if not S else _dot(S[-1], Y[-1]) / _dot(Y[-1], Y[-1])
        q *= h0
        for h in range(len(S)):
            be = rho[h] * _dot(Y[h], q)
            q += S[h] * (al[h] - be)
        d = -q
        if not (_dot(d, cur.grad) < 0):  # not a descent direction: steepest descent
            S, Y, rho = [], [], []
            d = -gamma * cur.grad
        n_iter += 1
        found = _line_search(f, x, cur, d)
        if found is None:
            # A stale curvature history stalls the search at the semi-dual's kinks: drop it
            # once and go on; a second failure in a row means no further progress is possible.
            if restarted or not S:
                break
            restarted = True
            S, Y, rho = [], [], []
            continue
        restarted = False
        xt, trial = found
        s_, y_ = xt - x, trial.grad - cur.grad
        sy = _dot(s_, y_)
        if sy > 1e-12 * math.sqrt(_dot(s_, s_) * _dot(y_, y_)):
            if len(S) == history_len:
                S.pop(0), Y.pop(0), rho.pop(0)
            S.append(s_)
            Y.append(y_)
            rho.append(1.0 / sy)
        x, cur = xt, trial
        err = float(cur.grad.abs().sum())
        hist.append(cur.F)
    # The plan: P_ij = b_j t_ij over the supports of the columns with mass, row-major.
    P = (bv[:, None] * cur.T).T  # [n, m]
    P = torch.where(f.pos[None, :], P, torch.zeros_like(P))
    row, col = (P > 0).nonzero(as_tuple=True)
    val = P[row, col]
    tc = float((val * C[row, col]).sum())
    grad_b = None
    if need_grad_b:
        # d(b_j phi_j)/db_j = phi_j - (gamma b_j / 2) |t_j|^2.
        grad_b = -(cur.phi - 0.5 * gamma * bv * (cur.T * cur.T).sum(1))
    conv = err <= tol
    return row, col, val, tc, -cur.F, n_iter, err, conv, x, grad_b
