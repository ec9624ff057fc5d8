"""The device-generic fallback of :func:`divkit.ot.sinkhorn`, in PyTorch ops on any device.

It transcribes ``src/ot/sinkhorn.cc`` (see ``include/divkit/ot.h``): the same problem, updates,
stopping rule, epsilon scaling, symmetric averaging, results and envelope gradients.

* Cost ``C_ij = |x_i - y_j|^p`` on the clouds centered on their joint mean, by direct
  differences (p = 1, or d <= 8) or ``|x|^2 + |y|^2 - 2 x.y`` clamped at 0 (p = 2, d > 8), as the
  core; it is held as a ``[B, n, m]`` float64 tensor (memory O(B n m), unlike the core's
  on-the-fly cost).
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
"""

from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import torch

from .. import _validate as check

__all__ = ["sinkhorn", "SYNC_EVERY"]

#: Iterations between two reads of the convergence flags by the host.
SYNC_EVERY = 16

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


def _weights(fn: str, name: str, w: Optional[torch.Tensor], B: int, n: int, dev) -> torch.Tensor:
    if w is None:
        return torch.full((B, n), 1.0 / n, dtype=_F64, device=dev)
    w = w.to(_F64)
    bad = ~torch.isfinite(w)
    neg = w < 0
    zero = ~(w.sum(1) > 0)
    flags = torch.stack([bad.any(), neg.any(), zero.any()]).tolist()
    if flags[0]:
        check.fail(fn, f"{name} has a non-finite value at {_first(bad)}")
    if flags[1]:
        check.fail(fn, f"{name} has a negative weight at {_first(neg)}")
    if flags[2]:
        check.fail(fn, f"{name} sums to 0 in problem {int(zero.nonzero()[0, 0])}")
    return w


def _cost(x: torch.Tensor, y: torch.Tensor, p: int) -> torch.Tensor:
    """|x_i - y_j|^p [B, n, m] of centered float64 clouds, as the core's cost tiles."""
    d = x.shape[2]
    if p == 2 and d > 8:
        xn = (x * x).sum(-1)
        yn = (y * y).sum(-1)
        c = (xn[:, :, None] + yn[:, None, :]) - 2.0 * torch.bmm(x, y.transpose(1, 2))
        return c.clamp_min(0.0)
    # Direct differences, in blocks of rows so that the [rows, m, d] temporary stays small.
    B, n, m = x.shape[0], x.shape[1], y.shape[1]
    c = torch.empty(B, n, m, dtype=_F64, device=x.device)
    rows = max(1, (1 << 22) // max(1, B * m * d))
    for i in range(0, n, rows):
        diff = x[:, i : i + rows, None, :] - y[:, None, :, :]
        c[:, i : i + rows] = (diff * diff).sum(-1)
    return c.sqrt_() if p == 1 else c


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
        flags = torch.stack([bx.any(), by.any()]).tolist()
        if flags[0]:
            check.fail(fn, f"x has a non-finite value (NaN or inf) at {_first(bx)}")
        if flags[1]:
            check.fail(fn, f"y has a non-finite value (NaN or inf) at {_first(by)}")
        # Centered on the joint mean, as the core (its expansion cancels less near the origin).
        center = torch.cat([xd, yd], 1).mean(1, keepdim=True)
        xd, yd = xd - center, yd - center
        C = _cost(xd, yd, cfg.p)
        lo = torch.minimum(xd.amin(1), yd.amin(1))
        hi = torch.maximum(xd.amax(1), yd.amax(1))
        diam2 = ((hi - lo) ** 2).sum(-1)
        scale = diam2 if cfg.p == 2 else diam2.sqrt()
    else:
        B, n, m = cost.shape
        if n < 1 or m < 1:
            check.fail(fn, "cost must have at least one point (n >= 1 and m >= 1)")
        C = cost.to(_F64)
        bc = ~torch.isfinite(C)
        if bool(bc.any()):
            check.fail(fn, f"cost has a non-finite value at {_first(bc)}")
        scale = C.abs().amax((1, 2))
    aw = _weights(fn, "a", a, B, n, dev)
    bw = _weights(fn, "b", b, B, m, dev)
    ma, mb = aw.sum(1), bw.sum(1)
    bal_a, bal_b = math.isinf(cfg.rho_a), math.isinf(cfg.rho_b)
    if bal_a and bal_b:
        bad = (ma - mb).abs() > 1e-6 * torch.maximum(ma, mb)
        if bool(bad.any()):
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
    stages = []
    if cfg.eps_scaling > 0:
        for sc in scale.tolist():
            st, e = [], sc
            while e > eps and len(st) < 200:
                st.append(e)
                e *= cfg.eps_scaling
            stages.append(st)
    n_st = max((len(s) for s in stages), default=0)
    sched = torch.full((B, n_st + 1), eps, dtype=_F64)
    for k, st in enumerate(stages):
        sched[k, : len(st)] = torch.tensor(st, dtype=_F64)
    sched = sched.to(dev)
    n_stage = torch.tensor([len(s) for s in stages] or [0] * B, dtype=torch.int64).to(dev)
    tau_a = (lambda e: 1.0) if bal_a else (lambda e: cfg.rho_a / (cfg.rho_a + e))
    tau_b = (lambda e: 1.0) if bal_b else (lambda e: cfg.rho_b / (cfg.rho_b + e))

    def t_f(g, e):  # f_i = -tau_a eps LSE_j(log b_j + (g_j - C_ij) / eps)
        z = lb[:, None, :] + (g[:, None, :] - C) / e[:, :, None]
        return -tau_a(e) * e * torch.logsumexp(z, 2)

    def t_g(f, e):  # g_j = -tau_b eps LSE_i(log a_i + (f_i - C_ij) / eps)
        z = la[:, :, None] + (f[:, :, None] - C) / e[:, :, None]
        return -tau_b(e) * e * torch.logsumexp(z, 1)

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
        if (it + 1) % SYNC_EVERY == 0 and not bool(active.any()):
            break

    # Final pass: e_ij = P_ij / a_i = exp(f_i / eps + log b_j + (g_j - C_ij) / eps).
    le = f[:, :, None] / eps + lb[:, None, :] + (g[:, None, :] - C) / eps
    E = torch.exp(le.clamp(-745.0, 709.0))
    s = E.sum(2)
    tc = (aw * (E * C).sum(2)).sum(1)
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
    P = aw[:, :, None] * E
    plan = P.to(dt) if (cfg.return_plan or need_c) else None
    ga = dF(f, cfg.rho_a) - eps * (s - mb[:, None]) if need_a else None
    gb = None
    if need_b:
        # Column sums of P_ij / b_j, from their own exponent (as the core's pass over the
        # columns), so that a zero b_j gives its gradient rather than 0 / 0.
        lc = la[:, :, None] + (f[:, :, None] + g[:, None, :] - C) / eps
        sc = torch.exp(lc.clamp(-745.0, 709.0)).sum(1)
        gb = dF(g, cfg.rho_b) - eps * (sc - ma[:, None])
    gx = gy = None
    if points and (need_x or need_y):
        # grad x_i = sum_j P_ij dC_ij/dx_i: 2 (x_i - y_j) for p = 2, (x_i - y_j) / |x_i - y_j|
        # for p = 1 (0 at coincident points).
        W = 2.0 * P if cfg.p == 2 else torch.where(C > 0, P / torch.where(C > 0, C, 1.0), 0.0)
        if need_x:
            gx = xd * W.sum(2, keepdim=True) - torch.bmm(W, yd)
        if need_y:
            gy = yd * W.sum(1)[:, :, None] - torch.bmm(W.transpose(1, 2), xd)
    stats = dict(
        transport_cost=tc,
        reg_cost=reg,
        n_iter=n_iter,
        marginal_error=marg,
        converged=conv,
    )
    return stats, f, g, plan, gx, gy, ga, gb
