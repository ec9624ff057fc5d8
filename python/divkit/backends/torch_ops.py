"""The device-generic fallback: divkit's token divergences in PyTorch ops, for any device.

It serves devices without a divkit kernel (MPS, XPU, a build without CUDA) and
``backend="torch"``. Same API, conventions and results (to the CPU tests' tolerances) as the C++
core; the per-entry formulas are transcribed from ``src/divergence/divergences-inl.h`` (the
cancellation-free forms included), and the reduction is the rule of ``src/core/reduction.h``.

* Arithmetic in fp32 (fp64 when an input is fp64), row sums in fp64.
* Rows are processed in chunks of ``chunk_size`` tokens (default: about 2**22 vocabulary entries
  per chunk), so that the fp32 temporaries never exceed a few ``[chunk, V]`` tensors.
* Gradients are computed explicitly, in the same pass as the loss, chunk by chunk (the softmax
  chain rule ``dL/ds = (u - q sum u) / T`` of the core, not torch autograd), and written into
  preallocated outputs: into the student logits' own storage for ``inplace_grad=True``.
* The fused heads' chunk loops are shared with the CUDA path: their GEMMs (:class:`_Head`) use
  bf16/fp16 tensor cores with fp32 output on CUDA, and their row step is PyTorch ops
  (:class:`TorchRows`) or divkit's row kernel on the chunk's logits (:class:`CoreRows`, chosen
  by the call's route: ``Route.rows == "core"`` for CUDA tensors on a CUDA build).
* Bad input is found before anything is written (a first pass over the chunks): NaN or +inf
  logits, or a row with every logit -inf, in a token that is not ignored, raise divkit.Error
  naming the argument and the row. These checks read a flag back to the host per chunk (a
  synchronization on an accelerator: the fallback is not meant for CUDA graph capture).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional, Tuple

import numpy as np
import torch

from .. import _C
from .. import _validate as check

__all__ = [
    "divergence",
    "sparse_divergence",
    "topk_divergence",
    "fused_linear_divergence",
    "fused_linear_sparse_divergence",
    "fused_linear_cross_entropy",
    "fused_linear_logprobs",
    "fused_linear_logprobs_backward",
    "fused_linear_logprobs_sharded",
    "fused_linear_logprobs_sharded_backward",
    "fused_linear_label_terms",
    "fused_linear_label_terms_backward",
    "DEFAULT_CHUNK_ENTRIES",
    "CUDA_CHUNK_ENTRIES",
    "TorchRows",
    "CoreRows",
    "ShardRows",
    "row_step",
]

#: Vocabulary entries per chunk when ``chunk_size`` is not given: 16 MiB per fp32 temporary.
DEFAULT_CHUNK_ENTRIES = 1 << 22

_FLT_MAX = float(np.finfo(np.float32).max)
_INF = float("inf")


def _f32(x: float) -> float:
    """x rounded to fp32, as the core stores its parameters."""
    return float(np.float32(x))


def _rows_per_chunk(chunk_size: Optional[int], n: int, v: int, device=None) -> int:
    if chunk_size:
        return max(1, int(chunk_size))
    entries = DEFAULT_CHUNK_ENTRIES
    if device is not None and torch.device(device).type == "cuda":
        entries = CUDA_CHUNK_ENTRIES
    return max(1, entries // max(v, 1))


# ---------------------------------------------------------------------------------------------
# The options and the reduction (src/core/reduction.h).
# ---------------------------------------------------------------------------------------------


class _Spec:
    """The divergence and its parameters, with the limits resolved to their KL kind as the core
    does (jsd beta 0/1, alpha_divergence alpha 1/0, renyi alpha 1, skew alpha 0)."""

    def __init__(self, cfg: Any) -> None:
        _C.validate_spec(cfg.kind, cfg.beta, cfg.alpha, cfg.temperature, cfg.scale_by_t_squared)
        kind, beta, alpha = cfg.kind, _f32(cfg.beta), _f32(cfg.alpha)
        if kind == "jsd" and beta == 0.0:
            kind = "forward_kl"
        elif kind == "jsd" and beta == 1.0:
            kind = "reverse_kl"
        elif kind == "alpha_divergence" and alpha == 1.0:
            kind = "forward_kl"
        elif kind == "alpha_divergence" and alpha == 0.0:
            kind = "reverse_kl"
        elif kind == "renyi" and alpha == 1.0:
            kind = "forward_kl"
        elif kind == "skew_forward_kl" and alpha == 0.0:
            kind = "forward_kl"
        elif kind == "skew_reverse_kl" and alpha == 0.0:
            kind = "reverse_kl"
        self.kind, self.beta, self.alpha = kind, beta, alpha
        self.temperature = _f32(cfg.temperature)
        self.inv_t = _f32(np.float32(1.0) / np.float32(self.temperature))
        self.t2 = self.temperature * self.temperature if cfg.scale_by_t_squared else 1.0


class _Plan:
    """Counted tokens, weights and the divisor of the reduced loss, as device tensors."""

    def __init__(self, fn: str, cfg: Any, n: int, labels, weights, device) -> None:
        if cfg.reduction not in check.REDUCTIONS:
            check.fail(
                fn,
                f"reduction '{cfg.reduction}' is unknown; valid reductions: "
                f"{', '.join(check.REDUCTIONS)}",
            )
        if cfg.num_items_in_batch > 0 and cfg.reduction == "none":
            check.fail(
                fn,
                "num_items_in_batch divides a reduced loss; it cannot be used with reduction "
                "'none'",
            )
        if labels is not None:
            self.active = labels.to(device).reshape(-1) != cfg.ignore_index
        else:
            self.active = torch.ones(n, dtype=torch.bool, device=device)
        if weights is not None:
            w = weights.to(device=device, dtype=torch.float64).reshape(-1)
            bad = ~torch.isfinite(w)
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                check.fail(fn, f"weights must be finite, got {w[i].item():g} at index {i}")
            self.weight = w
        else:
            self.weight = torch.ones(n, dtype=torch.float64, device=device)
        self.reduction = cfg.reduction
        if cfg.num_items_in_batch > 0:
            self.divisor = torch.tensor(cfg.num_items_in_batch, dtype=torch.float64, device=device)
        elif cfg.reduction == "mean":
            self.divisor = self.active.sum().to(torch.float64).clamp(min=1.0)
        elif cfg.reduction == "batchmean":
            self.divisor = torch.tensor(float(max(n, 1)), dtype=torch.float64, device=device)
        else:
            self.divisor = torch.ones((), dtype=torch.float64, device=device)
        #: d(reduced loss) / d(row value), per token.
        self.grad_scale = self.weight / self.divisor
        self.counted = self.active & (self.weight != 0)

    def loss(self, row_loss: torch.Tensor, scale: float) -> torch.Tensor:
        """The float32 loss from the rows' unweighted values (fp64), times scale (T^2 or 1)."""
        term = torch.where(self.counted, row_loss * self.weight, torch.zeros_like(row_loss))
        if self.reduction == "none":
            return (term * scale).to(torch.float32)
        return (term.sum() * scale / self.divisor).to(torch.float32).reshape(())


def _bad_rows(fn: str, name: str, x2: torch.Tensor, active: torch.Tensor, rows: int, what: str):
    """Raises for the first counted row of x2 with a NaN/+inf or with every logit -inf."""
    first = None
    for a in range(0, x2.shape[0], rows):
        x = x2[a : a + rows]
        act = active[a : a + rows]
        nonfinite = (torch.isnan(x) | torch.isposinf(x)).any(-1) & act
        no_mass = torch.isneginf(x).all(-1) & act
        bad = nonfinite | no_mass
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            first = (a + i, bool(nonfinite[i]))
            break
    if first is None:
        return
    row, nf = first
    if nf:
        check.fail(fn, f"{name} contains NaN or +inf at row {row}")
    check.fail(fn, f"{name} row {row}{what}; mark it with labels = ignore_index")


# ---------------------------------------------------------------------------------------------
# The per-entry math (divergences-inl.h), on [rows, V] tensors of the compute dtype.
# ---------------------------------------------------------------------------------------------


def _xt(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x * y with 0 * (anything) = 0 (0 log 0 = 0 and masked entries)."""
    return torch.where(x == 0, torch.zeros_like(x), x * y)


def _prod_over_mix(p, q, m):
    zero = m == 0
    return torch.where(zero, torch.zeros_like(m), p * q / torch.where(zero, torch.ones_like(m), m))


def _log_ratio_to_mixture(lr, a: float):
    """log(b / m) for m = a b + (1 - a) o, from lr = log(b / o) (see the core)."""
    neg = torch.clamp(-lr, min=-104.0, max=80.0)
    near = -torch.log1p((1.0 - a) * torch.expm1(neg))
    # a = 1: m = b, log(b / m) = 0 (lr - log(1 - a) would be +inf).
    far = lr - _f32(math.log1p(-a)) if a < 1.0 else torch.zeros_like(lr)
    return torch.where(lr < -80.0, far, near)


def _power_mean(p, q, lq, lr, alpha: float):
    """w = p^alpha q^(1 - alpha), with the core's conventions at masked q."""
    x = alpha * lr
    direct = (x > 80.0) | (q == 0)
    masked_q = torch.isneginf(lq)
    ex = torch.exp(torch.where(direct, lq + torch.where(masked_q, torch.zeros_like(x), x), x))
    w = torch.where(direct, ex, q * ex)
    if alpha > 1.0:
        at_masked = torch.where(p > 0, torch.full_like(p, _INF), torch.zeros_like(p))
    else:
        at_masked = torch.zeros_like(p)
    return torch.where(masked_q, at_masked, w)


def _mix_minus_power_mean(p, q, lq, lr, alpha: float):
    mirror = alpha > 0.5
    b = p if mirror else q
    c = 1.0 - alpha if mirror else alpha
    diff = -lr if mirror else lr
    stable = (b > 0) & (diff.abs() < 60.0)
    dd = torch.where(stable, diff, torch.zeros_like(diff))
    via = b * (c * torch.expm1(dd) - torch.expm1(c * dd))
    mix = alpha * p + (1.0 - alpha) * q
    return torch.where(stable, via, mix - _power_mean(p, q, lq, lr, alpha))


def _power_mean_minus_base(p, q, lq, lr, alpha: float, base_is_p: bool):
    b = p if base_is_p else q
    c = 1.0 - alpha if base_is_p else alpha
    diff = -lr if base_is_p else lr
    zero_base = b == 0
    x = torch.clamp(c * torch.where(zero_base, torch.zeros_like(diff), diff), min=-104.0)
    direct = zero_base | (x > 80.0)
    return torch.where(
        direct,
        _power_mean(p, q, lq, lr, alpha) - b,
        b * torch.expm1(torch.where(direct, torch.zeros_like(x), x)),
    )


def _terms(spec: _Spec, p, q, lp, lq, lr, need_t: bool):
    """(g, u, v): the entry's term, the student factor u = q dg/dq (None when u = -p) and the
    teacher factor v = p dg/dp (None unless need_t)."""
    k = spec.kind
    v = None
    if k == "forward_kl":
        g = _xt(p, lr)
        u = None
        if need_t:
            v = g + p
    elif k == "cross_entropy":
        g = _xt(p, -lq)
        u = None
        if need_t:
            v = g
    elif k == "reverse_kl":
        g = _xt(q, -lr)
        u = g + q
        if need_t:
            v = -q
    elif k == "jsd":
        b = spec.beta
        # log m in log space: b p + (1 - b) q rounds to 0 where p = 0 and q is the smallest
        # subnormal, and q log(q / m) would be +inf for a divergence bounded by log 2.
        lm = torch.logaddexp(lp + math.log(b), lq + math.log1p(-b))
        u = (1.0 - b) * _xt(q, lq - lm)
        tp = b * _xt(p, lp - lm)
        g = tp + u
        if need_t:
            v = tp
    elif k == "skew_forward_kl":
        a = spec.alpha
        pqm = _prod_over_mix(p, q, a * p + (1.0 - a) * q)
        g = _xt(p, _log_ratio_to_mixture(lr, a))
        u = (a - 1.0) * pqm
        if need_t:
            v = (1.0 - a) * pqm + g
    elif k == "skew_reverse_kl":
        a = spec.alpha
        pqm = _prod_over_mix(p, q, (1.0 - a) * p + a * q)
        g = _xt(q, _log_ratio_to_mixture(-lr, a))
        u = (1.0 - a) * pqm + g
        if need_t:
            v = (a - 1.0) * pqm
    elif k == "tvd":
        hs = 0.5 * torch.sign(p - q)
        g = 0.5 * (p - q).abs()
        u = -q * hs
        if need_t:
            v = p * hs
    elif k == "hellinger":
        sp, sq = torch.sqrt(p), torch.sqrt(q)
        g = (sp - sq) ** 2
        u = q - sp * sq
        if need_t:
            v = p - sp * sq
    elif k == "jeffreys":
        fwd, rev = _xt(p, lr), _xt(q, -lr)
        g = fwd + rev
        u = rev + (q - p)
        if need_t:
            v = fwd + (p - q)
    elif k == "chi2":
        direct = (lr > 80.0) | (p == 0)
        x = torch.exp(torch.where(direct, lp + lr, lr))
        r = torch.where(torch.isneginf(lp), torch.zeros_like(p), torch.where(direct, x, p * x))
        near = (p <= 1.5 * q) & (q > 0)
        em1 = torch.expm1(torch.where(near, lr, torch.zeros_like(lr)))
        g = torch.where(near, q * em1 * em1, (r - 2.0 * p) + q)
        u = q - r
        if need_t:
            v = 2.0 * (r - p)
    elif k == "alpha_divergence":
        a = spec.alpha
        g = _mix_minus_power_mean(p, q, lq, lr, a) * _f32(1.0 / (a * (1.0 - a)))
        u = _power_mean_minus_base(p, q, lq, lr, a, False) * _f32(-1.0 / a)
        if need_t:
            v = _power_mean_minus_base(p, q, lq, lr, a, True) * _f32(-1.0 / (1.0 - a))
    else:
        raise AssertionError(k)
    return g, u, v


class _Entries:
    """p, q, their logs and log(p / q) of a chunk, from centered, scaled logits; ``lse``: the
    rows' (student, teacher) log-sum-exps [rows, 1] when the row is wider than the chunk (a
    vocabulary shard: the global normalizers)."""

    def __init__(self, zs: torch.Tensor, zt: torch.Tensor, lse=None) -> None:
        # z = (x - max) / T: the max is subtracted first, so that the logs keep their precision.
        if lse is None:
            self.lse_s = torch.logsumexp(zs, -1, keepdim=True)
            self.lse_t = torch.logsumexp(zt, -1, keepdim=True)
        else:
            self.lse_s, self.lse_t = lse
        self.lq = zs - self.lse_s
        self.lp = zt - self.lse_t
        self.q = torch.exp(self.lq)
        self.p = torch.exp(self.lp)
        # log p - log q from the logit difference: its error is that of the difference.
        self.lr = (zt - zs) - (self.lse_t - self.lse_s)


def _center(x: torch.Tensor, inv_t: float) -> torch.Tensor:
    m = x.amax(-1, keepdim=True)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    return (x - m) * inv_t


def _chunk(spec: _Spec, e: _Entries, need_s: bool, need_t: bool, scale: torch.Tensor, shard=None):
    """One chunk: (row values fp64 with +inf where infinite, grad_s, grad_t) in the compute
    dtype; ``scale`` [rows, 1] is d(loss)/d(row value) / T. With ``shard`` (a
    :class:`_Shard`) the rows are a vocabulary shard's and their sums are combined over the
    group (one all-reduce; Renyi two)."""
    if spec.kind == "renyi":
        return _renyi_chunk(spec, e, need_s, need_t, scale, shard)
    g, u, v = _terms(spec, e.p, e.q, e.lp, e.lq, e.lr, need_t)
    sums = [g.sum(-1, dtype=torch.float64)]
    if need_s and u is not None:
        sums.append(u.sum(-1, dtype=torch.float64))
    if need_t:
        sums.append(v.sum(-1, dtype=torch.float64))
    if shard is not None:
        sums = list(shard.sum_(torch.stack(sums)))
    value = sums[0]
    bad = ~(value.abs() <= _FLT_MAX)
    gs = gt = None
    if need_s or need_t:
        if need_s:
            if u is None:  # u = -p, sum u = -1
                gs = scale * (e.q - e.p)
            else:
                su = sums[1]
                bad |= ~(su.abs() <= _FLT_MAX)
                gs = scale * (u - e.q * su.to(u.dtype).unsqueeze(-1))
        if need_t:
            sv = sums[-1]
            bad |= ~(sv.abs() <= _FLT_MAX)
            gt = scale * (v - e.p * sv.to(v.dtype).unsqueeze(-1))
    value = torch.where(bad, torch.full_like(value, _INF), value)
    keep = ~bad.unsqueeze(-1)
    if gs is not None:
        gs = torch.where(keep, gs, torch.zeros_like(gs))
    if gt is not None:
        gt = torch.where(keep, gt, torch.zeros_like(gt))
    return value, gs, gt


def _renyi_chunk(
    spec: _Spec, e: _Entries, need_s: bool, need_t: bool, scale: torch.Tensor, shard=None
):
    """Renyi rows in log space: D = L / (alpha - 1), L = log sum w (see the core's RenyiRow);
    over a vocabulary shard, max log w is combined by a max and the two sums by a sum."""
    a = spec.alpha
    p, q, lq, lr = e.p, e.q, e.lq, e.lr
    masked_q = torch.isneginf(lq)
    if a > 1.0:
        at_masked = torch.where(p > 0, torch.full_like(p, _INF), torch.full_like(p, -_INF))
    else:
        at_masked = torch.full_like(p, -_INF)
    logw = torch.where(
        masked_q, at_masked, a * torch.where(masked_q, torch.zeros_like(lr), lr) + lq
    )
    s1 = (-_mix_minus_power_mean(p, q, lq, lr, a)).sum(-1, dtype=torch.float64)
    amax = logw.amax(-1, keepdim=True)
    if shard is not None:
        amax = shard.max_(amax)
    infinite = ~(amax < _INF) | torch.isneginf(amax)  # [rows, 1]
    amax_safe = torch.where(infinite, torch.zeros_like(amax), amax)
    sum_w = torch.exp(logw - amax_safe).sum(-1, dtype=torch.float64)
    if shard is not None:
        s1, sum_w = shard.sum_(torch.stack([s1, sum_w]))
    near_zero = s1.abs() < 0.5
    log_rel = torch.log(sum_w)
    log_sum_w = torch.where(near_zero, torch.log1p(s1), amax_safe.squeeze(-1).double() + log_rel)
    value = log_sum_w / (a - 1.0)
    bad = infinite.squeeze(-1) | ~(value.abs() <= _FLT_MAX)
    value = torch.where(bad, torch.full_like(value, _INF), value)
    gs = gt = None
    if need_s or need_t:
        dt = p.dtype
        vl = log_sum_w.to(dt).unsqueeze(-1)
        vrel = log_rel.to(dt).unsqueeze(-1)
        nz = near_zero.unsqueeze(-1)

        def w_hat_minus(base, c):
            soft = torch.exp((logw - amax_safe) - vrel) - base
            x = c * lr - vl
            stable = nz & (base > 0) & (x.abs() < 60.0)
            via = base * torch.expm1(torch.where(stable, x, torch.zeros_like(x)))
            return torch.where(stable, via, soft)

        keep = ~bad.unsqueeze(-1)
        if need_s:
            gs = torch.where(keep, -scale * w_hat_minus(q, a), torch.zeros_like(q))
        if need_t:
            k = scale * (a / (a - 1.0))
            gt = torch.where(keep, k * w_hat_minus(p, a - 1.0), torch.zeros_like(p))
    return value, gs, gt


# ---------------------------------------------------------------------------------------------
# The row driver shared by the three ops.
# ---------------------------------------------------------------------------------------------


def _compute_dtype(*xs: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _drive(
    n: int,
    rows: int,
    plan: _Plan,
    spec: _Spec,
    chunk_fn: Callable[[int, int, torch.Tensor], Tuple[torch.Tensor, Any, Any]],
    device,
) -> torch.Tensor:
    """Calls chunk_fn(a, b, scale) for each chunk of rows [a, b) and returns the row values
    [n] (fp64, 0 for ignored rows); chunk_fn writes its gradients itself."""
    row_loss = torch.zeros(n, dtype=torch.float64, device=device)
    for a in range(0, n, rows):
        b = min(n, a + rows)
        act = plan.active[a:b]
        scale = (spec.t2 * plan.grad_scale[a:b] / spec.temperature).unsqueeze(-1)
        scale = torch.where(act.unsqueeze(-1), scale, torch.zeros_like(scale))
        value = chunk_fn(a, b, scale)
        row_loss[a:b] = torch.where(act, value, torch.zeros_like(value))
    return row_loss


def _sanitize(x: torch.Tensor, act: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The chunk in the compute dtype, ignored rows zeroed (their logits are never used)."""
    x = x.to(dtype)
    return torch.where(act.unsqueeze(-1), x, torch.zeros_like(x))


def _store(out: Optional[torch.Tensor], a: int, b: int, g: Optional[torch.Tensor], act) -> None:
    if out is None:
        return
    g = torch.where(act.unsqueeze(-1), g, torch.zeros_like(g))
    out[a:b].copy_(g)


def divergence(
    s2: torch.Tensor,
    t2: torch.Tensor,
    labels: Optional[torch.Tensor],
    weights: Optional[torch.Tensor],
    cfg: Any,
    grad_s2: Optional[torch.Tensor] = None,
    grad_t2: Optional[torch.Tensor] = None,
    *,
    fn: str = "divergence",
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """The token divergence of ``[N, V]`` student and teacher logits (``cfg``: the options of
    :func:`divkit.divergence`); writes the gradients into ``grad_s2`` / ``grad_t2`` ([N, V], may
    be ``s2`` itself for ``inplace_grad``) when given. Returns the float32 loss ([N] for
    ``reduction="none"``, else a 0-d tensor) on the logits' device."""
    spec = _Spec(cfg)
    n, v = s2.shape
    if v == 0:
        check.fail(fn, "student_logits has V = 0 (an empty vocabulary)")
    device = s2.device
    plan = _Plan(fn, cfg, n, labels, weights, device)
    rows = _rows_per_chunk(chunk_size, n, v)
    nm = " has every logit -inf (no distribution)"
    _bad_rows(fn, "student_logits", s2, plan.active, rows, nm)
    _bad_rows(fn, "teacher_logits", t2, plan.active, rows, nm)
    dt = _compute_dtype(s2, t2)
    need_s, need_t = grad_s2 is not None, grad_t2 is not None

    def chunk(a, b, scale):
        act = plan.active[a:b]
        zs = _center(_sanitize(s2[a:b], act, dt), spec.inv_t)
        zt = _center(_sanitize(t2[a:b], act, dt), spec.inv_t)
        value, gs, gt = _chunk(spec, _Entries(zs, zt), need_s, need_t, scale.to(dt))
        _store(grad_s2, a, b, gs, act)
        _store(grad_t2, a, b, gt, act)
        return value

    return plan.loss(_drive(n, rows, plan, spec, chunk, device), spec.t2)


# ---------------------------------------------------------------------------------------------
# Sparse and truncated teachers (src/sparse): the divergence over k (renormalize) or k + 1
# (bucket: the k entries and the tail) buckets, per bucket in fp64 as the core does.
# ---------------------------------------------------------------------------------------------

_RENORM_NO_MASS = " is -inf at every teacher index (no student probability to renormalize)"
_NO_MASS = " has every logit -inf (no distribution)"


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _bucket_values(spec: _Spec, lpd, lqd, qd, dt):
    """Row values (fp64, +inf where infinite), student factors u (fp64) and their sums, and the
    rows without a gradient, from the buckets' fp64 log p, log q and q."""
    if spec.kind == "renyi":
        a = spec.alpha
        masked_q = torch.isneginf(lqd)
        if a > 1.0:
            at = torch.where(lpd > -_INF, torch.full_like(lpd, _INF), torch.full_like(lpd, -_INF))
        else:
            at = torch.full_like(lpd, -_INF)
        logw = torch.where(masked_q, at, lqd + a * torch.where(masked_q, lqd, lpd - lqd))
        amax = logw.amax(-1, keepdim=True)
        infinite = (~(amax < _INF) | torch.isneginf(amax)).squeeze(-1)
        amax_safe = torch.where(torch.isfinite(amax), amax, torch.zeros_like(amax))
        pf, qf, lpf, lqf = torch.exp(lpd).to(dt), qd.to(dt), lpd.to(dt), lqd.to(dt)
        lrf = (lpd - lqd).to(dt)
        s1 = (-_mix_minus_power_mean(pf, qf, lqf, lrf, a)).sum(-1, dtype=torch.float64)
        sum_w = torch.exp(logw - amax_safe).sum(-1)
        log_sum_w = torch.where(
            s1.abs() < 0.5, torch.log1p(s1), amax_safe.squeeze(-1) + torch.log(sum_w)
        )
        value = log_sum_w / (a - 1.0)
        bad = infinite | ~(value.abs() <= _FLT_MAX)
        u = -torch.exp(logw - log_sum_w.unsqueeze(-1))
        u = torch.where(bad.unsqueeze(-1), torch.zeros_like(u), u)
        sum_u = u.sum(-1)
    else:
        pf, qf, lpf, lqf = torch.exp(lpd).to(dt), qd.to(dt), lpd.to(dt), lqd.to(dt)
        g, uf, _ = _terms(spec, pf, qf, lpf, lqf, (lpd - lqd).to(dt), False)
        if uf is None:
            uf = -pf
        value = g.sum(-1, dtype=torch.float64)
        sum_u = uf.sum(-1, dtype=torch.float64)
        bad = ~(value.abs() <= _FLT_MAX) | ~(sum_u.abs() <= _FLT_MAX)
        u = uf.double()
    return torch.where(bad, torch.full_like(value, _INF), value), u, sum_u, bad


def _bucket_chunk(spec, xs, idx, lpd, has_tail: bool, need_s: bool, scale):
    """One chunk of sparse rows: xs [c, V] student logits (compute dtype), idx [c, k], lpd
    [c, k] the teacher's fp64 log-probabilities (up to a constant when renormalized). Returns
    (row values, the student gradient [c, V] or None)."""
    dt = xs.dtype
    k = idx.shape[1]
    temp = float(spec.temperature)
    xk = xs.gather(-1, idx)
    lse_p = torch.logsumexp(lpd, -1, keepdim=True)
    # The tail's exps are relative to its own max, exp(shift) times exp(ref / T): relative to
    # the row's max they could all underflow (the k entries holding all but e^-87 T of the
    # student's mass), and a finite divergence would become +inf.
    shift = torch.zeros_like(lse_p)
    if has_tail:
        mx = xs.amax(-1, keepdim=True)
        tail = xs.scatter(-1, idx, -_INF)
        tail_max = tail.amax(-1, keepdim=True)
        base = torch.where(tail_max > -_INF, tail_max, mx)
        e = torch.exp((tail - base) * spec.inv_t)
        z_tail = e.sum(-1, keepdim=True, dtype=torch.float64)
        shift = (base.double() - mx.double()) / temp
        ref = mx.double()
    else:
        e = None
        z_tail = torch.zeros_like(lse_p)
        ref = xk.amax(-1, keepdim=True).double()
    lqd = (xk.double() - ref) / temp
    z = torch.exp(lqd).sum(-1, keepdim=True) + z_tail * torch.exp(shift)
    log_z = torch.log(z)
    lqd = lqd - log_z
    qd = torch.exp(lqd)
    if has_tail:
        lq_tail = torch.where(
            z_tail > 0, shift + torch.log(z_tail) - log_z, torch.full_like(z_tail, -_INF)
        )
        over = lse_p > 0
        lp_top = torch.where(over, lpd - lse_p, lpd)
        lp_tail = torch.where(over, torch.full_like(lse_p, -_INF), _log1mexp(lse_p.clamp(max=0)))
        lpd = torch.cat([lp_top, lp_tail], -1)
        lqd = torch.cat([lqd, lq_tail], -1)
        qd = torch.cat([qd, torch.exp(lq_tail)], -1)
    else:
        lpd = lpd - lse_p
    value, u, sum_u, bad = _bucket_values(spec, lpd, lqd, qd, dt)
    if not need_s:
        return value, None
    sum_u = sum_u.unsqueeze(-1)
    gk = (scale * (u[:, :k] - qd[:, :k] * sum_u)).to(dt)
    if has_tail:
        c = torch.where(
            z_tail > 0,
            scale * (u[:, k:] / z_tail - sum_u * torch.exp(shift) / z),
            torch.zeros_like(z_tail),
        )
        full = e * c.to(dt)
    else:
        full = torch.zeros_like(xs)
    full.scatter_(-1, idx, gk)
    return value, torch.where(bad.unsqueeze(-1), torch.zeros_like(full), full)


def _first_row(mask: torch.Tensor) -> Optional[int]:
    return int(mask.nonzero()[0, 0]) if bool(mask.any()) else None


def _check_label_range(fn: str, lab: torch.Tensor, active: torch.Tensor, v: int, ignore_index):
    """Every active label (int64, [N]) is a vocabulary index in [0, v)."""
    r = _first_row(active & ((lab < 0) | (lab >= v)))
    if r is not None:
        check.fail(
            fn,
            f"labels[{r}] = {int(lab[r])} is out of range [0, {v}) and is not ignore_index "
            f"({ignore_index})",
        )


def sparse_divergence(
    s2: torch.Tensor,
    idx2: torch.Tensor,
    lp2: torch.Tensor,
    tail: str,
    labels: Optional[torch.Tensor],
    weights: Optional[torch.Tensor],
    cfg: Any,
    grad_s2: Optional[torch.Tensor] = None,
    *,
    fn: str = "sparse_divergence",
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """The divergence between the student's ``[N, V]`` logits and a teacher given as ``[N, k]``
    (index, log-probability) pairs (see :func:`divkit.sparse_divergence`)."""
    spec = _Spec(cfg)
    if tail not in ("renormalize", "bucket"):
        check.fail(fn, f"tail '{tail}' is unknown; valid tails: renormalize, bucket")
    n, v = s2.shape
    k = idx2.shape[1]
    if v == 0:
        check.fail(fn, "student_logits has V = 0 (an empty vocabulary)")
    if k < 1:
        check.fail(fn, "teacher_indices has k = 0 entries per row; k must be >= 1")
    if k > v:
        check.fail(
            fn, f"teacher_indices has k = {k} entries per row, more than the vocabulary V = {v}"
        )
    device = s2.device
    plan = _Plan(fn, cfg, n, labels, weights, device)
    act = plan.active
    renorm = tail == "renormalize" or k == v
    # The teacher, counted rows only (padding rows may hold anything).
    idx = torch.where(
        act.unsqueeze(-1), idx2.to(torch.int64), torch.zeros_like(idx2, dtype=torch.int64)
    )
    lp = torch.where(
        act.unsqueeze(-1), lp2.to(torch.float64), torch.full_like(lp2, -1.0, dtype=torch.float64)
    )
    r = _first_row(((idx < 0) | (idx >= v)).any(-1))
    if r is not None:
        b = int(((idx[r] < 0) | (idx[r] >= v)).nonzero()[0, 0])
        check.fail(
            fn,
            f"teacher_indices holds {int(idx[r, b])} at row {r}, column {b}, outside the "
            f"vocabulary [0, {v})",
        )
    srt = idx.sort(-1).values
    r = _first_row((srt[:, 1:] == srt[:, :-1]).any(-1) & act)
    if r is not None:
        j = int(srt[r, 1:][srt[r, 1:] == srt[r, :-1]][0])
        check.fail(
            fn,
            f"teacher_indices repeats index {j} at row {r} (each of a row's k entries must be a "
            f"distinct token)",
        )
    r = _first_row((torch.isnan(lp) | (lp > 1e-3)).any(-1))
    if r is not None:
        b = int((torch.isnan(lp[r]) | (lp[r] > 1e-3)).nonzero()[0, 0])
        x = float(lp[r, b])
        check.fail(
            fn,
            f"teacher_logprobs must be log-probabilities (<= 0, or -inf), got {x:g} at row "
            f"{r}, column {b}" + (" (logits instead of log-probabilities?)" if x > 0 else ""),
        )
    m = lp.amax(-1)
    if renorm:
        r = _first_row(torch.isneginf(m) & act)
        if r is not None:
            check.fail(
                fn,
                f"teacher_logprobs are all -inf at row {r}: nothing to renormalize (use "
                f"tail='bucket' with k < V, or mark the row with labels = ignore_index)",
            )
    else:
        mass = torch.exp(torch.logsumexp(lp, -1))
        r = _first_row((mass > 1.0 + 1e-2) & act)
        if r is not None:
            check.fail(
                fn,
                f"teacher_logprobs at row {r} have probabilities summing to {float(mass[r]):g} "
                f"> 1; tail='bucket' needs log-probabilities of one distribution (pass "
                f"tail='renormalize' for unnormalized scores)",
            )
    rows = _rows_per_chunk(chunk_size, n, v)
    _bad_rows(fn, "student_logits", s2, act, rows, _RENORM_NO_MASS if renorm else _NO_MASS)
    dt = _compute_dtype(s2)
    if renorm:
        # No student mass on the k entries.
        for a in range(0, n, rows):
            xk = s2[a : a + rows].gather(-1, idx[a : a + rows])
            r = _first_row(torch.isneginf(xk).all(-1) & act[a : a + rows])
            if r is not None:
                check.fail(
                    fn,
                    f"student_logits row {a + r}{_RENORM_NO_MASS}; mark it with "
                    f"labels = ignore_index",
                )
    need_s = grad_s2 is not None

    def chunk(a, b, scale):
        ca = act[a:b]
        xs = _sanitize(s2[a:b], ca, dt)
        value, gs = _bucket_chunk(spec, xs, idx[a:b], lp[a:b], not renorm, need_s, scale)
        _store(grad_s2, a, b, gs, ca)
        return value

    return plan.loss(_drive(n, rows, plan, spec, chunk, device), spec.t2)


def topk_divergence(
    s2: torch.Tensor,
    t2: torch.Tensor,
    k: int,
    labels: Optional[torch.Tensor],
    weights: Optional[torch.Tensor],
    cfg: Any,
    grad_s2: Optional[torch.Tensor] = None,
    *,
    fn: str = "topk_divergence",
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """The divergence over the teacher's top-k entries of each row (larger logit first, then
    lower index), both distributions renormalized over them; the student's gradient is 0
    elsewhere (see :func:`divkit.topk_divergence`)."""
    spec = _Spec(cfg)
    n, v = s2.shape
    if v == 0:
        check.fail(fn, "student_logits has V = 0 (an empty vocabulary)")
    if not 1 <= k <= v:
        check.fail(fn, f"k must be in [1, V = {v}], got {k}")
    device = s2.device
    plan = _Plan(fn, cfg, n, labels, weights, device)
    act = plan.active
    rows = _rows_per_chunk(chunk_size, n, v)
    _bad_rows(fn, "student_logits", s2, act, rows, _RENORM_NO_MASS)
    _bad_rows(fn, "teacher_logits", t2, act, rows, _NO_MASS)
    dt = _compute_dtype(s2, t2)
    need_s = grad_s2 is not None
    temp = float(spec.temperature)

    def select(a, b):
        # The core selects on the fp32 logits; a stable descending sort puts the lower index
        # first among equal values.
        xt = _sanitize(t2[a:b], act[a:b], torch.float32)
        idx = torch.sort(xt, dim=-1, descending=True, stable=True).indices[:, :k]
        lpd = (xt.gather(-1, idx).double() - xt.amax(-1, keepdim=True).double()) / temp
        return idx, lpd

    for a in range(0, n, rows):
        idx, _ = select(a, a + rows)
        xk = s2[a : a + rows].gather(-1, idx)
        r = _first_row(torch.isneginf(xk).all(-1) & act[a : a + rows])
        if r is not None:
            check.fail(
                fn,
                f"student_logits row {a + r}{_RENORM_NO_MASS}; mark it with labels = ignore_index",
            )

    def chunk(a, b, scale):
        ca = act[a:b]
        idx, lpd = select(a, b)
        xs = _sanitize(s2[a:b], ca, dt)
        value, gs = _bucket_chunk(spec, xs, idx, lpd, False, need_s, scale)
        _store(grad_s2, a, b, gs, ca)
        return value

    return plan.loss(_drive(n, rows, plan, spec, chunk, device), spec.t2)


# ---------------------------------------------------------------------------------------------
# The fused heads' chunk loop: GEMMs (_Head) and the row step (TorchRows / CoreRows). The loop
# below is one function per head whatever the device; the row step is what differs: PyTorch ops
# (this fallback) or divkit's row kernel on the chunk's logits (the CUDA kernel on a CUDA
# build; the CPU kernel in the tests, which compare the loop with the C++ fused head).
# ---------------------------------------------------------------------------------------------

#: Vocabulary entries per chunk on CUDA when ``chunk_size`` is not given (256 MiB of fp32
#: logits): the GEMMs need a few hundred rows to keep the tensor cores busy at V ~ 128k.
CUDA_CHUNK_ENTRIES = 1 << 26

_LOW = (torch.bfloat16, torch.float16)
# Whether torch's GEMMs with out_dtype (fp32 output from bf16/fp16 operands) work, per (GEMM,
# device type); found on first use (older torch and non-CUDA devices lack them).
_OUT_DTYPE: dict = {}


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b of bf16/fp16 operands with fp32 accumulation and an fp32 result (no rounding of
    the product to bf16); where torch lacks out_dtype, the product rounded to the operands'
    dtype (Liger's precision) in fp32."""
    key = ("mm", a.device.type)
    if _OUT_DTYPE.get(key, True):
        try:
            out = torch.mm(a, b, out_dtype=torch.float32)
            _OUT_DTYPE[key] = True
            return out
        except torch.cuda.OutOfMemoryError:
            raise  # not a missing feature
        except (RuntimeError, TypeError, NotImplementedError):
            _OUT_DTYPE[key] = False
    return torch.mm(a, b).float()


def _addmm_f32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> None:
    """acc (fp32) += alpha * a @ b of bf16/fp16 operands, without an fp32 temporary of acc's
    size where torch can (addmm with out_dtype into acc)."""
    key = ("addmm", a.device.type)
    if _OUT_DTYPE.get(key, True):
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, alpha=alpha, out=acc)
            _OUT_DTYPE[key] = True
            return
        except torch.cuda.OutOfMemoryError:
            raise  # not a missing feature
        except (RuntimeError, TypeError, NotImplementedError):
            _OUT_DTYPE[key] = False
    prod = _mm_f32(a, b)
    acc.add_(prod, alpha=alpha)


def _low_operands(h: torch.Tensor, w: torch.Tensor, dt) -> bool:
    """Whether a head's GEMMs keep bf16/fp16 operands (CUDA, one dtype, fp32 compute)."""
    return (
        h.device.type == "cuda" and h.dtype == w.dtype and h.dtype in _LOW and dt == torch.float32
    )


class _Head:
    """The GEMMs of one linear head ``z = h @ w.T + b`` over chunks of rows, accumulating in
    the compute dtype ``dt`` (fp32, or fp64 for fp64 inputs).

    On CUDA with bf16/fp16 hidden states and weight of one dtype, the operands stay in that
    dtype (tensor cores, fp32 accumulation, fp32 logits; the weight is never copied); the
    gradient GEMMs take the chunk's logit gradient rounded to that dtype (as Liger-Kernel and
    a bf16 autograd head do; fp16 scaled by a power of two first) and accumulate the weight
    gradient in fp32. Elsewhere the operands are converted to ``dt`` (the weight once per
    call)."""

    def __init__(self, h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], dt) -> None:
        self.low = _low_operands(h, w, dt)
        self.h, self.dt = h, dt
        self.w = w if self.low else w.to(dt)
        self.b = None if b is None else b.to(dt)
        #: The dtype of the hidden states' gradient buffer: each chunk's rows (fp32 GEMM output)
        #: are rounded into it as they come, so that no fp32 [N, H] copy is held.
        self.hidden_grad_dtype = h.dtype if self.low else dt
        self._prep: Optional[tuple] = None  # the last chunk's converted logit gradient

    def rows(self, a: int, e: int) -> torch.Tensor:
        """The hidden states of rows [a, e) as a GEMM operand (a new chunk begins)."""
        self._prep = None
        hc = self.h[a:e]
        return hc if self.low else hc.to(self.dt)

    def logits(self, hc: torch.Tensor) -> torch.Tensor:
        """The chunk's logits [c, V] in ``dt``."""
        z = _mm_f32(hc, self.w.T) if self.low else hc @ self.w.T
        if self.b is not None:
            z += self.b
        return z

    def _low_grad(self, dz: torch.Tensor):
        """(dz * s rounded to the operands' dtype, 1 / s), converted once per chunk (both
        gradient GEMMs take it). bf16 has fp32's exponent range: s = 1. fp16 has not: a logit
        gradient of a mean over many tokens (~1 / (N V)) would flush to zero, so the chunk is
        scaled by a power of two s that puts its largest entry near 2^10 (exact; one host read
        of the chunk's max; headroom for the product where torch lacks out_dtype)."""
        if self._prep is not None and self._prep[0] is dz:
            return self._prep[1], self._prep[2]
        inv = 1.0
        if self.w.dtype == torch.float16:
            amax = float(dz.abs().amax())
            if amax > 0 and math.isfinite(amax):
                e = math.floor(math.log2(2.0**10 / amax))
                lo, inv = (dz * 2.0**e).to(torch.float16), 2.0**-e
            else:
                lo = dz.to(torch.float16)
        else:
            lo = dz.to(self.w.dtype)
        self._prep = (dz, lo, inv)
        return lo, inv

    def grad_hidden(self, dz: torch.Tensor) -> torch.Tensor:
        """dz @ w: the hidden states' gradient of the chunk."""
        if self.low:
            lo, inv = self._low_grad(dz)
            out = _mm_f32(lo, self.w)
            return out if inv == 1.0 else out.mul_(inv)
        return dz @ self.w

    def add_grad_weight(self, acc: torch.Tensor, dz: torch.Tensor, hc: torch.Tensor) -> None:
        """acc += dz.T @ hc, in place."""
        if self.low:
            lo, inv = self._low_grad(dz)
            _addmm_f32(acc, lo.T, hc, alpha=inv)
        else:
            acc.addmm_(dz.T, hc)


class TorchRows:
    """The row step in PyTorch ops (:func:`divergence`, :func:`sparse_divergence`). Each step
    returns the chunk's weighted row values (fp64) and writes the student's logit gradient over
    the chunk's logits ``zs`` (which the loop no longer needs)."""

    name = "torch"

    def divergence(self, zs, zt, labels, weights, cfg, need_s: bool, need_t: bool, fn: str):
        gs = zs if need_s and not need_t else (torch.empty_like(zs) if need_s else None)
        gt = torch.empty_like(zt) if need_t else None
        value = divergence(zs, zt, labels, weights, cfg, gs, gt, fn=fn, chunk_size=zs.shape[0])
        return value.to(torch.float64), gs, gt

    def sparse(self, zs, idx, lp, tail, labels, weights, cfg, need_s: bool, fn: str):
        gs = zs if need_s else None
        value = sparse_divergence(
            zs, idx, lp, tail, labels, weights, cfg, gs, fn=fn, chunk_size=zs.shape[0]
        )
        return value.to(torch.float64), gs


class CoreRows(TorchRows):
    """The row step through divkit's row kernels (``_C.divergence`` / ``_C.sparse_divergence``
    with reduction "none", the chunk's token weights, and the gradient written in place over
    the chunk's logits), with the options of the call's route (``Route.core_args``: the CUDA
    stream and whatever else the route sets for the core; None: the CPU core as is)."""

    name = "core"

    def __init__(self, route: Any = None) -> None:
        self.route = route

    def _args(self, cfg) -> "_C.DivergenceArgs":
        args = _C.DivergenceArgs(
            kind=cfg.kind,
            beta=cfg.beta,
            alpha=cfg.alpha,
            temperature=cfg.temperature,
            scale_by_t_squared=cfg.scale_by_t_squared,
            ignore_index=cfg.ignore_index,
            reduction="none",
        )
        return args if self.route is None else self.route.core_args(args)

    def divergence(self, zs, zt, labels, weights, cfg, need_s: bool, need_t: bool, fn: str):
        # In place for the student only: the teacher's gradient is computed from the student's
        # logits, which an in-place student gradient would have overwritten.
        gs = zs if need_s and not need_t else (torch.empty_like(zs) if need_s else None)
        gt = torch.empty_like(zt) if need_t else None
        loss = torch.empty(zs.shape[0], dtype=torch.float32, device=zs.device)
        with check.attributed(fn):
            _C.divergence(zs, zt, loss, gs, gt, labels, weights, self._args(cfg))
        return loss.to(torch.float64), gs, gt

    def sparse(self, zs, idx, lp, tail, labels, weights, cfg, need_s: bool, fn: str):
        gs = zs if need_s else None
        loss = torch.empty(zs.shape[0], dtype=torch.float32, device=zs.device)
        with check.attributed(fn):
            _C.sparse_divergence(zs, idx, lp, loss, gs, labels, weights, tail, self._args(cfg))
        return loss.to(torch.float64), gs


def row_step(route: Any = None) -> TorchRows:
    """The row step of a call's route (``divkit._device.Route``): divkit's kernels where
    ``route.rows == "core"``, else PyTorch ops."""
    if route is not None and getattr(route, "rows", "torch") == "core":
        return CoreRows(route)
    return TorchRows()


def _core_label_rows(route: Any, z: torch.Tensor) -> bool:
    """Whether the label heads' rows of the chunk logits ``z`` run through divkit's label-row
    kernel (``_C.label_rows``: the CUDA kernel for CUDA tensors, the CPU one for CPU tensors):
    where the route says so (``route.rows == "core"``) and the logits are fp32 (fp64 inputs keep
    the PyTorch rows, in fp64)."""
    return (
        route is not None
        and getattr(route, "rows", "torch") == "core"
        and z.dtype == torch.float32
        and hasattr(_C, "label_rows")
    )


def _label_rows(route: Any, z: torch.Tensor, labels: torch.Tensor, fn: str, first: int, **kw):
    """``_C.label_rows`` on one chunk's logits ``z`` [c, V] (fp32; the gradient, when the
    coefficients are given, written over them) with ``labels`` [c]; the keyword arguments are
    the fp64 [c] outputs and coefficients and the options (see include/divkit/fused_linear.h,
    label_rows). On CUDA: PyTorch's current stream, and no host read inside
    :func:`divkit.cuda_checks.deferred_checks` (a bad row then gives NaN statistics)."""
    from .. import cuda_checks

    stream = getattr(route, "stream", None)
    with check.attributed(fn):
        _C.label_rows(
            z,
            labels,
            **kw,
            first_token=first,
            stream=0 if stream is None else int(stream),
            check_finite=True if stream is None else cuda_checks.check_finite(),
            fn=fn,
        )


def _f64_rows(c: int, device, on: bool = True) -> Optional[torch.Tensor]:
    return torch.empty(c, dtype=torch.float64, device=device) if on else None


# ---------------------------------------------------------------------------------------------
# Vocabulary-parallel (src/fused_linear/vocab_parallel.cc): the fused heads' weights are this
# rank's contiguous block of the vocabulary, blocks in rank order; every rank passes the same
# tokens. The row statistics of each chunk are combined over the group with torch.distributed
# all-reduces (NCCL on CUDA, gloo on the CPU), in the core's phases: the rows' max, then the
# sums of exp under it (and the label's logit from the rank holding it), then the divergence's
# sums under the global normalizers. Every rank makes the same collectives in the same order:
# their sizes depend on the tokens and the options, never on the shard, and every check after
# the first collective reads combined values, so that all ranks raise together.
# ---------------------------------------------------------------------------------------------


class _Shard:
    """This rank's place in the vocabulary-parallel ``group``: ``offset`` and ``global_v`` of
    its shard of ``v_local`` rows, ``max_v`` the largest shard (every rank takes its chunk size
    from it). ``local_checks()`` (the checks whose outcome may differ between ranks) runs first;
    its error, and ``flags`` (the outputs asked for) that differ between the ranks, raise on
    every rank, agreed on with the one all-reduce of the layout."""

    def __init__(self, fn: str, group, v_local: int, device, local_checks, flags=()) -> None:
        import torch.distributed as dist

        self.dist, self.group, self.device = dist, group, device
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        error = None
        try:
            local_checks()
        except check.Error as e:
            error = e
        world = self.world
        layout = torch.zeros(world + 1 + len(flags), dtype=torch.float64, device=device)
        layout[self.rank] = float(v_local)
        layout[world] = 0.0 if error is None else 1.0
        for k, f in enumerate(flags):
            layout[world + 1 + k] = 1.0 if f else 0.0
        got = [float(x) for x in self.sum_(layout).cpu()]
        if got[world] > 0:
            if error is not None:
                raise error
            check.fail(
                fn,
                f"the arguments were rejected on {int(got[world])} other rank(s) of the "
                f"vocabulary-parallel group (see their error)",
            )
        if any(c not in (0.0, float(world)) for c in got[world + 1 :]):
            check.fail(
                fn,
                "the ranks of the vocabulary-parallel group disagree on which outputs are asked "
                "for (every rank must ask for the same gradients and statistics)",
            )
        sizes = [int(x) for x in got[:world]]
        self.v = int(v_local)
        self.offset = sum(sizes[: self.rank])
        self.global_v = sum(sizes)
        self.max_v = max(sizes)

    def sum_(self, x: torch.Tensor) -> torch.Tensor:
        """x summed over the group, in place (x on the call's device); returns x."""
        self.dist.all_reduce(x, op=self.dist.ReduceOp.SUM, group=self.group)
        return x

    def max_(self, x: torch.Tensor) -> torch.Tensor:
        self.dist.all_reduce(x, op=self.dist.ReduceOp.MAX, group=self.group)
        return x

    def local_labels(self, y: torch.Tensor, act: torch.Tensor):
        """(column of each label in this shard, clamped; whether this shard holds it)."""
        c = y - self.offset
        mine = act & (c >= 0) & (c < self.v)
        return torch.where(mine, c, torch.zeros_like(c)), mine


def _shard_max(shard: _Shard, zs) -> list:
    """The rows' global max of each [c, V_r] chunk in ``zs`` (fp64 [c]; +inf where some rank's
    row has a NaN or +inf, -inf where every rank's is all -inf), in one all-reduce."""
    ms = []
    for z in zs:
        m = z.amax(-1).double()  # shards are never empty (_head_checks)
        ms.append(torch.where((torch.isnan(z) | torch.isposinf(z)).any(-1), _INF, m))
    out = shard.max_(torch.stack(ms))
    return list(out)


def _shard_label_rows(shard: _Shard, z, act, y, fn: str, first: int, *, entropy=False, z_sum=False):
    """The label statistics of one chunk's logits ``z`` [c, V_r] (already divided by T and
    softcapped) over the shard's group: (lse, z_label, entropy or None, sum of z or None, number
    of unmasked entries or None), fp64 [c]; the sum of z and the count are over the unmasked
    entries (z > -inf: label smoothing spreads over them) of every shard; z_label, entropy, the sum
    and the count are 0 at inactive rows, lse is the row's wherever it is
    finite (so that exp(z - lse) stays finite at an ignored row, whose coefficients are 0).
    Raises on every rank for a counted row that is NaN, +inf or -inf everywhere."""
    (m,) = _shard_max(shard, [z])
    r = _first_row(act & ~torch.isfinite(m))
    if r is not None:
        check.fail(
            fn,
            f"the logits of token {first + r} (hidden @ weight^T + bias) are NaN, +inf or all -inf",
        )
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    c = z - m.to(z.dtype).unsqueeze(-1)
    e = torch.exp(c)
    col, mine = shard.local_labels(y, act)
    zy = z.gather(-1, col.unsqueeze(-1)).squeeze(-1).double()
    parts = [e.sum(-1, dtype=torch.float64), torch.where(mine, zy, torch.zeros_like(zy))]
    if entropy:
        parts.append(_xt(e, c).sum(-1, dtype=torch.float64))
    if z_sum:
        # A masked entry adds 0 to the sum (the same sum as z.sum without one).
        unmasked = ~torch.isneginf(z)
        parts.append(unmasked.sum(-1, dtype=torch.float64))
        parts.append(torch.where(unmasked, z, torch.zeros_like(z)).sum(-1, dtype=torch.float64))
    parts = list(shard.sum_(torch.stack(parts)))
    ok = (parts[0] > 0) & (parts[0] < _INF)
    s = torch.where(ok, parts[0], torch.ones_like(parts[0]))
    log_s = torch.log(s)
    zero = torch.zeros_like(log_s)
    lse = m + log_s
    ent = torch.where(act, log_s - parts[2] / s, zero) if entropy else None
    zs = torch.where(act, parts[-1], zero) if z_sum else None
    count = torch.where(act, parts[-2], zero) if z_sum else None
    return lse, torch.where(act, parts[1], zero), ent, zs, count


class ShardRows(TorchRows):
    """The soft term's row step on a vocabulary shard: the token divergence of the chunk's
    shard logits under the group's normalizers (the core's sharded_divergence_rows in PyTorch
    ops). With ``overwrite_input`` (a chunk the caller no longer needs, such as the fused head's
    logits) the student gradient is written over ``zs`` when the teacher's is not asked for;
    without it (the caller's own logits, or a gradient bound for a separate buffer) ``zs`` and
    ``zt`` are only read and the gradients are new tensors."""

    name = "shard"

    def __init__(self, shard: _Shard, overwrite_input: bool = True) -> None:
        self.shard = shard
        self.overwrite_input = overwrite_input

    def divergence(self, zs, zt, labels, weights, cfg, need_s: bool, need_t: bool, fn: str):
        spec = _Spec(cfg)
        c = zs.shape[0]
        act = (
            labels.reshape(-1) != cfg.ignore_index
            if labels is not None
            else torch.ones(c, dtype=torch.bool, device=zs.device)
        )
        dt = zs.dtype
        xs, xt = _sanitize(zs, act, dt), _sanitize(zt, act, dt)
        # 1. The global max and sum of exp of both rows.
        ms, mt = _shard_max(self.shard, [xs, xt])
        for m, who in ((ms, "student"), (mt, "teacher")):
            r = _first_row(act & torch.isposinf(m))
            if r is not None:
                check.fail(fn, f"the {who} logits of row {r} contain NaN or +inf (on some rank)")
        centered = []
        for x, m in ((xs, ms), (xt, mt)):
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            centered.append((x - m.to(dt).unsqueeze(-1)) * spec.inv_t)
        sums = self.shard.sum_(
            torch.stack([torch.exp(z).sum(-1, dtype=torch.float64) for z in centered])
        )
        for k, who in enumerate(("student", "teacher")):
            r = _first_row(act & ~(sums[k] > 0))
            if r is not None:
                check.fail(
                    fn,
                    f"the {who} logits of row {r} are -inf on every rank (no distribution); "
                    f"mark the row with labels = ignore_index",
                )
        safe = torch.where(act, sums, torch.ones_like(sums))
        lse = torch.log(safe).to(dt).unsqueeze(-1)
        e = _Entries(centered[0], centered[1], (lse[0], lse[1]))
        # 2. and 3. The sums under them, combined, and the shard's gradients.
        w = torch.where(
            act, weights.to(torch.float64), torch.zeros_like(weights, dtype=torch.float64)
        )
        scale = (spec.t2 * w / spec.temperature).to(dt).unsqueeze(-1)
        value, gs, gt = _chunk(spec, e, need_s, need_t, scale, self.shard)
        # _chunk's gradients are new tensors: the ignored rows are zeroed in place.
        if gs is not None:
            gs.masked_fill_(~act.unsqueeze(-1), 0.0)
            if self.overwrite_input and not need_t:
                zs.copy_(gs)
                gs = zs
        if gt is not None:
            gt.masked_fill_(~act.unsqueeze(-1), 0.0)
        value = torch.where(~(value.abs() <= _FLT_MAX), torch.full_like(value, _INF), value)
        row = torch.where(act & (w != 0), w * value * spec.t2, torch.zeros_like(value))
        return row, gs, gt


def vocab_parallel_divergence(
    s2: torch.Tensor,
    t2: torch.Tensor,
    labels: Optional[torch.Tensor],
    weights: Optional[torch.Tensor],
    cfg: Any,
    group,
    need: Tuple[bool, bool],
    *,
    fn: str = "vocab_parallel_divergence",
    chunk_size: Optional[int] = None,
) -> Tuple[torch.Tensor, list]:
    """The token divergence of logits ``[N, V_r]`` sharded over ``group`` (the core's
    vocab_parallel_divergence in PyTorch ops, for CUDA tensors over NCCL and for
    ``backend="torch"``): per chunk of rows, :class:`ShardRows` under the group's normalizers.
    Returns the float32 loss ([N] for ``reduction="none"``, else [1]) and the fp32 gradients of
    this rank's shards (None where ``need`` is False). The logits are never written."""
    n, v = s2.shape
    dev = s2.device

    def local():
        if v == 0:
            check.fail(fn, "student_logits has no columns on this rank (an empty vocabulary shard)")
        if tuple(t2.shape) != (n, v):
            check.fail(
                fn,
                f"student_logits {tuple(s2.shape)} and teacher_logits {tuple(t2.shape)} must "
                f"have the same shape",
            )

    shard = _Shard(fn, group, v, dev, local, (bool(need[0]), bool(need[1])))
    plan = _Plan(fn, cfg, n, labels, weights, dev)
    act = plan.active
    if labels is not None:
        _check_label_range(
            fn, labels.to(dev).reshape(-1).to(torch.int64), act, shard.global_v, cfg.ignore_index
        )
    soft_cfg = _SoftCfg(cfg)
    # The gradients go to their own buffers: the row step only reads the chunks, which may be
    # views of the caller's logits (no copy when they are already in the compute dtype).
    step = ShardRows(shard, overwrite_input=False)
    dt = _compute_dtype(s2, t2)
    gs = torch.zeros((n, v), dtype=torch.float32, device=dev) if need[0] else None
    gt = torch.zeros((n, v), dtype=torch.float32, device=dev) if need[1] else None
    scale = torch.where(act, plan.weight / plan.divisor, torch.zeros_like(plan.weight))
    row_loss = torch.zeros(n, dtype=torch.float64, device=dev)
    lab = None if labels is None else labels.to(dev).reshape(-1)
    # Every rank takes the same chunks (from the largest shard), so the collectives pair up.
    rows = _rows_per_chunk(chunk_size, n, shard.max_v, dev)
    for a in range(0, n, rows):
        b = min(n, a + rows)
        zs = s2[a:b].to(dt)
        zt = t2[a:b].to(dt)
        lab_c = None if lab is None else lab[a:b]
        row, gzs, gzt = step.divergence(
            zs, zt, lab_c, scale[a:b], soft_cfg, bool(need[0]), bool(need[1]), fn
        )
        row_loss[a:b] = row
        if gs is not None:
            gs[a:b] = gzs
        if gt is not None:
            gt[a:b] = gzt
    loss = row_loss if cfg.reduction == "none" else row_loss.sum().reshape(1)
    return loss.to(torch.float32), [gs, gt]


# ---------------------------------------------------------------------------------------------
# The fused linear head (src/fused_linear/distill_loop.cc): chunks of tokens through the GEMM,
# the soft term (the token divergence above, per row, weighted soft_weight * w_i / divisor) and
# the hard-label cross-entropy (T = 1, weighted hard_weight * w_i / divisor), then the gradient
# GEMMs. Only one chunk of logits (and of their gradients) exists at a time.
# ---------------------------------------------------------------------------------------------


class _SoftCfg:
    """The divergence options of the soft term: per-row losses, weighted by the caller."""

    def __init__(self, cfg: Any) -> None:
        self.kind, self.beta, self.alpha = cfg.kind, cfg.beta, cfg.alpha
        self.temperature, self.scale_by_t_squared = cfg.temperature, cfg.scale_by_t_squared
        self.ignore_index = cfg.ignore_index
        self.reduction, self.num_items_in_batch = "none", 0.0


def fused_linear_divergence(
    sh: torch.Tensor,
    sw: torch.Tensor,
    sb: Optional[torch.Tensor],
    th: torch.Tensor,
    tw: torch.Tensor,
    tb: Optional[torch.Tensor],
    labels: Optional[torch.Tensor],
    weights: Optional[torch.Tensor],
    cfg: Any,
    need,
    reduction: str,
    *,
    fn: str = "fused_linear_divergence",
    sparse_teacher: Optional[Tuple[torch.Tensor, torch.Tensor, str]] = None,
    route: Any = None,
    group: Any = None,
):
    """``hard_weight * CE(z_s, labels) + soft_weight * D(p_teacher, q_student)`` of the heads
    ``z = hidden @ weight.T + bias`` (``[N, H]`` hidden states); ``cfg``: the options of
    :func:`divkit.fused_linear_divergence`; ``need``: six flags (student hidden, weight, bias,
    teacher hidden, weight, bias). With ``sparse_teacher = (indices [N, k], logprobs [N, k],
    tail)`` the teacher is sparse (:func:`divkit.fused_linear_sparse_divergence`; th, tw, tb are
    None). With ``group`` (a torch.distributed process group) the weights and biases are this
    rank's vocabulary shard: the loss is the unsharded one, the weight and bias gradients the
    shard's, the hidden states' gradients all-reduced. Returns (loss [N] or [1] float32, six
    gradients or None)."""
    n, v = sh.shape[0], sw.shape[0]
    shard = None
    if group is not None:
        shard = _distill_shard(fn, group, sh, sw, sb, th, tw, tb, need, cfg, sparse_teacher)
    if shard is None:
        _bias_checks(fn, "student_bias", sb)
        _bias_checks(fn, "teacher_bias", tb)
    if shard is None and sparse_teacher is None and tw.shape[0] != v:
        check.fail(
            fn,
            f"teacher_weight has {tw.shape[0]} rows but student_weight {v}: the PyTorch "
            f"fallback needs one vocabulary (teacher_token_ids is not supported there)",
        )
    if v == 0:
        check.fail(fn, "student_weight has V = 0 (an empty vocabulary)")
    hw, sw_f = float(cfg.hard_weight), float(cfg.soft_weight)
    if not (math.isfinite(hw) and math.isfinite(sw_f)):
        check.fail(fn, "hard_weight and soft_weight must be finite")
    if hw != 0.0 and labels is None:
        check.fail(fn, "hard_weight != 0 needs labels")
    dev = sh.device
    plan_cfg = _SoftCfg(cfg)
    plan_cfg.reduction, plan_cfg.num_items_in_batch = reduction, cfg.num_items_in_batch
    plan = _Plan(fn, plan_cfg, n, labels, weights, dev)
    act = plan.active
    lab = None
    gv = v if shard is None else shard.global_v
    if labels is not None:
        lab = labels.to(dev).reshape(-1).to(torch.int64)
        if hw != 0.0:
            _check_label_range(fn, lab, act, gv, cfg.ignore_index)
    dt = _compute_dtype(*(x for x in (sh, sw, th, tw) if x is not None))
    rows_step = row_step(route) if shard is None else ShardRows(shard)
    s_head = _Head(sh, sw, sb, dt)
    t_head = _Head(th, tw, tb, dt) if tw is not None else None
    need_zs = any(need[:3])
    need_zt = any(need[3:]) and sw_f != 0.0
    g = [None] * 6
    if need[0]:
        g[0] = torch.empty(sh.shape, dtype=s_head.hidden_grad_dtype, device=dev)
    if need[1]:
        g[1] = torch.zeros(sw.shape, dtype=dt, device=dev)
    if need[2] and sb is not None:
        g[2] = torch.zeros(sb.shape, dtype=dt, device=dev)
    if need[3]:
        g[3] = torch.zeros(th.shape, dtype=t_head.hidden_grad_dtype, device=dev)
    if need[4]:
        g[4] = torch.zeros(tw.shape, dtype=dt, device=dev)
    if need[5] and tb is not None:
        g[5] = torch.zeros(tb.shape, dtype=dt, device=dev)
    soft_cfg = _SoftCfg(cfg)
    # Every rank of a group takes the same chunks (from the largest shard).
    rows = _rows_per_chunk(cfg.chunk_size, n, v if shard is None else shard.max_v, dev)
    row_loss = torch.zeros(n, dtype=torch.float64, device=dev)
    scale = plan.weight / plan.divisor  # per token: w_i / divisor
    scale = torch.where(act, scale, torch.zeros_like(scale))
    for a in range(0, n, rows):
        b = min(n, a + rows)
        hs_c = s_head.rows(a, b)
        zs = s_head.logits(hs_c)
        lab_c = lab[a:b] if lab is not None else None
        # The hard term first: the soft row step may write its gradient over zs.
        dz_hard = None
        if hw != 0.0:
            y = torch.where(act[a:b], lab[a:b], torch.zeros_like(lab[a:b]))
            hwr = hw * scale[a:b]
            if shard is None:
                lse = torch.logsumexp(zs, -1)
                bad = act[a:b] & ~torch.isfinite(lse)
                r = _first_row(bad)
                if r is not None:
                    check.fail(fn, f"the student logits of token {a + r} are NaN, +inf or all -inf")
                col, mine = y, act[a:b]
                ce = (lse - zs.gather(-1, y.unsqueeze(-1)).squeeze(-1)).double()
            else:
                lse64, zy, _, _, _ = _shard_label_rows(shard, zs, act[a:b], y, fn, a)
                lse = lse64.to(dt)
                col, mine = shard.local_labels(y, act[a:b])
                ce = lse64 - zy
            row_loss[a:b] += torch.where(act[a:b], hwr * ce, torch.zeros_like(ce))
            if need_zs:
                dz_hard = torch.exp(zs - lse.unsqueeze(-1))
                # The one-hot term is the label's rank's.
                one = torch.where(mine, -1.0, 0.0).to(dt).unsqueeze(-1)
                dz_hard.scatter_add_(-1, col.unsqueeze(-1), one)
                dz_hard *= hwr.to(dt).unsqueeze(-1)
        dzs = None
        if sw_f != 0.0 and sparse_teacher is not None:
            idx, lp, tail = sparse_teacher
            soft, gzs = rows_step.sparse(
                zs, idx[a:b], lp[a:b], tail, lab_c, sw_f * scale[a:b], soft_cfg, need_zs, fn
            )
            row_loss[a:b] += soft
            dzs = gzs
        elif sw_f != 0.0:
            ht_c = t_head.rows(a, b)
            zt = t_head.logits(ht_c)
            soft, gzs, gzt = rows_step.divergence(
                zs, zt, lab_c, sw_f * scale[a:b], soft_cfg, need_zs, need_zt, fn
            )
            row_loss[a:b] += soft
            dzs = gzs
            if need_zt:
                if g[3] is not None:
                    g[3][a:b] = _sum_over(shard, t_head.grad_hidden(gzt))
                if g[4] is not None:
                    t_head.add_grad_weight(g[4], gzt, ht_c)
                if g[5] is not None:
                    g[5] += gzt.sum(0)
        if need_zs:
            if dzs is None:
                dzs = dz_hard if dz_hard is not None else torch.zeros_like(zs)
            elif dz_hard is not None:
                dzs += dz_hard
            if g[0] is not None:
                g[0][a:b] = _sum_over(shard, s_head.grad_hidden(dzs))
            if g[1] is not None:
                s_head.add_grad_weight(g[1], dzs, hs_c)
            if g[2] is not None:
                g[2] += dzs.sum(0)
    loss = row_loss if reduction == "none" else row_loss.sum().reshape(1)
    inputs = (sh, sw, sb, th, tw, tb)
    grads = [None if x is None else x.to(inp.dtype) for x, inp in zip(g, inputs)]
    return loss.to(torch.float32), grads


def _sum_over(shard: Optional["_Shard"], x: torch.Tensor) -> torch.Tensor:
    """A chunk's hidden-state gradient (fp32 or fp64, before its rounding to the buffer's
    dtype) summed over the vocabulary shards of the group."""
    return x if shard is None else shard.sum_(x.contiguous())


def _bias_checks(fn: str, name: str, b: Optional[torch.Tensor]) -> None:
    """A head's bias ``name`` has no NaN or +inf entry (-inf is allowed: it masks that
    vocabulary entry); the error names the argument and the first bad index, as the core's
    check does, rather than the logits it would spoil. One host read of a [V] vector; skipped
    for device tensors inside :func:`divkit.cuda_checks.deferred_checks` (no host read there:
    the bad rows then give NaN statistics, as the kernels' deferred checks do)."""
    if b is None:
        return
    from .. import cuda_checks

    if b.device.type != "cpu" and not cuda_checks.check_finite():
        return
    j = _first_row(torch.isnan(b) | torch.isposinf(b))
    if j is not None:
        check.fail(
            fn,
            f"{name} contains NaN or +inf at index {j} (-inf is allowed: it masks that "
            f"vocabulary entry)",
        )


def _head_checks(fn: str, prefix: str, h, w, b) -> None:
    """A vocabulary shard's head: one hidden size, a bias of its rows (no NaN or +inf entry), at
    least one row."""
    if w.shape[0] == 0:
        check.fail(fn, f"{prefix}weight has no rows on this rank (an empty vocabulary shard)")
    if w.shape[1] != h.shape[1]:
        check.fail(
            fn,
            f"{prefix}weight has shape {tuple(w.shape)} but {prefix}hidden has H = "
            f"{h.shape[1]}: the hidden sizes must agree",
        )
    if b is not None and tuple(b.shape) != (w.shape[0],):
        check.fail(
            fn,
            f"{prefix}bias has shape {tuple(b.shape)}, expected ({w.shape[0]},) (the rows of "
            f"{prefix}weight)",
        )
    _bias_checks(fn, f"{prefix}bias", b)


def _distill_shard(fn, group, sh, sw, sb, th, tw, tb, need, cfg, sparse_teacher) -> "_Shard":
    v = sw.shape[0]

    def local():
        if sparse_teacher is not None:
            check.fail(fn, "a vocabulary-parallel shard is not supported with a sparse teacher")
        _head_checks(fn, "student_", sh, sw, sb)
        _head_checks(fn, "teacher_", th, tw, tb)
        if tw.shape[0] != v:
            check.fail(
                fn,
                f"student_weight has {v} rows on this rank and teacher_weight {tw.shape[0]}: "
                f"the vocabulary shards must match",
            )

    soft = float(cfg.soft_weight) != 0.0
    flags = (any(need[:3]), any(need[3:]) and soft, bool(need[0]), bool(need[3]) and soft)
    return _Shard(fn, group, v, sh.device, local, flags)


def fused_linear_sparse_divergence(
    sh,
    sw,
    sb,
    idx,
    lp,
    tail,
    labels,
    weights,
    cfg,
    need,
    reduction,
    *,
    fn="fused_linear_sparse_divergence",
    route: Any = None,
):
    """The fused student head against a sparse teacher (indices, log-probabilities [N, k]):
    (loss, three gradients or None); see :func:`fused_linear_divergence`."""
    loss, grads = fused_linear_divergence(
        sh,
        sw,
        sb,
        None,
        None,
        None,
        labels,
        weights,
        cfg,
        tuple(need) + (False,) * 3,
        reduction,
        fn=fn,
        sparse_teacher=(idx, lp, tail),
        route=route,
    )
    return loss, grads[:3]


def _add_head_grads(head: "_Head", g: list, dz, hc, a: int, e: int, shard=None) -> None:
    """The gradient GEMMs of one chunk's logit gradient ``dz``: the hidden states' rows [a, e)
    (summed over a vocabulary shard's group), the weight's and the bias's accumulated."""
    if g[0] is not None:
        g[0][a:e] = _sum_over(shard, head.grad_hidden(dz))
    if g[1] is not None:
        head.add_grad_weight(g[1], dz, hc)
    if g[2] is not None:
        g[2] += dz.sum(0)


def fused_linear_cross_entropy(
    h: torch.Tensor,
    w: torch.Tensor,
    b: Optional[torch.Tensor],
    labels: torch.Tensor,
    token_weights: Optional[torch.Tensor],
    cfg: Any,
    need,
    reduction: str,
    return_stats: bool,
    *,
    fn: str = "fused_linear_cross_entropy",
    group: Any = None,
    route: Any = None,
):
    """Cross-entropy of ``z = hidden @ weight.T + bias`` (softcapped when ``cfg.softcap`` > 0)
    with label smoothing and z-loss, in chunks of tokens (see
    :func:`divkit.fused_linear_cross_entropy`); ``token_weights`` scale each token (the
    upstream gradient of a per-token loss); ``group``: the weight and bias are this rank's
    vocabulary shard (see :func:`fused_linear_divergence`); ``route``: the call's route, whose
    ``rows == "core"`` (CUDA tensors on a CUDA build) makes divkit's label-row kernel the row
    step (unsharded fp32 logits). Returns ((loss[, logprobs, entropy]), three gradients or
    None)."""
    n, v = h.shape[0], w.shape[0]
    dev = h.device
    shard = None
    if group is not None:
        shard = _Shard(
            fn,
            group,
            v,
            dev,
            lambda: _head_checks(fn, "", h, w, b),
            (any(need), bool(need[0]), return_stats),
        )
        v = shard.global_v
    else:
        _bias_checks(fn, "bias", b)
    plan_cfg = _SoftCfg.__new__(_SoftCfg)
    plan_cfg.ignore_index = cfg.ignore_index
    plan_cfg.reduction, plan_cfg.num_items_in_batch = reduction, cfg.num_items_in_batch
    plan = _Plan(fn, plan_cfg, n, labels, token_weights, dev)
    act = plan.active
    lab = labels.to(dev).reshape(-1).to(torch.int64)
    _check_label_range(fn, lab, act, v, cfg.ignore_index)
    eps, zsq, cap = float(cfg.label_smoothing), float(cfg.lse_square_scale), float(cfg.softcap)
    dt = _compute_dtype(h, w)
    head = _Head(h, w, b, dt)
    g = [None, None, None]
    if need[0]:
        g[0] = torch.empty(h.shape, dtype=head.hidden_grad_dtype, device=dev)
    if need[1]:
        g[1] = torch.zeros(w.shape, dtype=dt, device=dev)
    if need[2] and b is not None:
        g[2] = torch.zeros(b.shape, dtype=dt, device=dev)
    want = any(x is not None for x in g)
    rows = _rows_per_chunk(cfg.chunk_size, n, v if shard is None else shard.max_v, dev)
    row_loss = torch.zeros(n, dtype=torch.float64, device=dev)
    logprobs = torch.zeros(n, dtype=torch.float32, device=dev) if return_stats else None
    entropy = torch.zeros(n, dtype=torch.float32, device=dev) if return_stats else None
    scale = torch.where(act, plan.weight / plan.divisor, torch.zeros_like(plan.weight))
    for a in range(0, n, rows):
        e = min(n, a + rows)
        ca = act[a:e]
        hc = head.rows(a, e)
        x = head.logits(hc)
        if shard is None and _core_label_rows(route, x):
            # divkit's row kernel: statistics, and the gradient (scale folded into the
            # coefficients) written over x. Label smoothing spreads over the V' unmasked entries
            # of each row (smooth_unmasked: a -inf bias entry is not in the vocabulary): the
            # kernel's mean_z is over them and it gives each the c of -eps s / V' (c V / V'),
            # as the PyTorch rows below; without a masked entry, the same bits as
            # smoothing over every entry.
            c = e - a
            s = scale[a:e]
            lse, zy = _f64_rows(c, dev), _f64_rows(c, dev)
            mean_z, ent = _f64_rows(c, dev, eps != 0.0), _f64_rows(c, dev, return_stats)
            coef = {}
            if want:
                coef = dict(
                    coef_a0=s.contiguous(),
                    coef_a1=(2.0 * zsq) * s if zsq != 0.0 else None,
                    coef_b=-(1.0 - eps) * s,
                    coef_c=(-eps / v) * s,
                )
            _label_rows(
                route,
                x,
                lab[a:e],
                fn,
                a,
                lse=lse,
                z_label=zy,
                mean_z=mean_z,
                entropy=ent,
                ignore_index=cfg.ignore_index,
                softcap=cap,
                smooth_unmasked=eps != 0.0,
                **coef,
            )
            loss_r = (1.0 - eps) * (lse - zy)
            if eps != 0.0:
                loss_r = loss_r + eps * (lse - mean_z)
            if zsq != 0.0:
                loss_r = loss_r + zsq * lse**2
            row_loss[a:e] = torch.where(ca, loss_r * s, torch.zeros_like(loss_r))
            if return_stats:
                zero = torch.zeros_like(lse)
                logprobs[a:e] = torch.where(ca, zy - lse, zero).to(torch.float32)
                entropy[a:e] = torch.where(ca, ent, zero).to(torch.float32)
            if want:
                _add_head_grads(head, g, x, hc, a, e, shard)
            continue
        z = x
        if cap > 0:
            # softcap(-inf) = -inf: a masked entry (-inf bias) keeps probability 0 (tanh would
            # give it the logit -cap), as in the core's kernel.
            z = torch.where(torch.isneginf(x), x, cap * torch.tanh(x / cap))
        y = torch.where(ca, lab[a:e], torch.zeros_like(lab[a:e]))
        if shard is None:
            lse = torch.logsumexp(z, -1)
            r = _first_row(ca & ~torch.isfinite(lse))
            if r is not None:
                check.fail(fn, f"the logits of token {a + r} are NaN, +inf or all -inf")
            col, one = y, torch.full_like(z[:, :1], -(1.0 - eps))
            zy = z.gather(-1, y.unsqueeze(-1)).squeeze(-1)
            loss_r = (1.0 - eps) * (lse - zy).double()
            mean_z = count = None
            if eps != 0.0:
                # Label smoothing over the V' unmasked entries of the row (z > -inf: a masked
                # entry is not in the vocabulary), as the core's kernel. Without a masked entry
                # this is sum(z) / V, and eps / V' below is eps / V: no branch, no host read.
                unmasked = ~torch.isneginf(z)
                count = unmasked.sum(-1, dtype=torch.float64)
                zs = torch.where(unmasked, z, torch.zeros_like(z)).sum(-1, dtype=torch.float64)
                mean_z = zs / torch.where(count > 0, count, torch.ones_like(count))
        else:
            lse64, zy, ent64, zsum, count = _shard_label_rows(
                shard, z, ca, y, fn, a, entropy=return_stats, z_sum=eps != 0.0
            )
            lse = lse64.to(z.dtype)
            col, mine = shard.local_labels(y, ca)
            one = torch.where(mine, -(1.0 - eps), 0.0).to(z.dtype).unsqueeze(-1)
            loss_r = (1.0 - eps) * (lse64 - zy)
            mean_z = None
            if eps != 0.0:
                # count is 0 at inactive rows; V' >= 1 at an active one.
                mean_z = zsum / torch.where(ca, count, torch.ones_like(count))
        if eps != 0.0:
            loss_r = loss_r + eps * (lse.double() - mean_z)
        if zsq != 0.0:
            loss_r = loss_r + zsq * lse.double() ** 2
        row_loss[a:e] = torch.where(ca, loss_r * scale[a:e], torch.zeros_like(loss_r))
        p = torch.exp(z - lse.unsqueeze(-1))
        if return_stats:
            lp = torch.where(ca, zy - lse, torch.zeros_like(lse))
            ent = -_xt(p, z - lse.unsqueeze(-1)).sum(-1) if shard is None else ent64
            logprobs[a:e] = lp.to(torch.float32)
            entropy[a:e] = torch.where(ca, ent, torch.zeros_like(ent)).to(torch.float32)
        if want:
            # d loss_i / d z = (1 - eps)(p - 1[y]) + eps (p - 1[j unmasked] / V') + 2 zsq lse p
            dz = p * (1.0 + 2.0 * zsq * lse.unsqueeze(-1))
            if eps != 0.0:
                share = (eps / torch.where(count > 0, count, torch.ones_like(count))).to(dz.dtype)
                dz = dz - torch.where(torch.isneginf(z), 0.0, share.unsqueeze(-1)).to(dz.dtype)
            dz.scatter_add_(-1, col.unsqueeze(-1), one)
            if cap > 0:
                # dz/dx = 1 - tanh(x / cap)^2, 0 at a masked entry (z = -inf, where the
                # expression in z would be -inf).
                dz = dz * torch.where(torch.isneginf(z), 0.0, 1.0 - (z / cap) ** 2)
            dz = dz * scale[a:e].to(dt).unsqueeze(-1)
            _add_head_grads(head, g, dz, hc, a, e, shard)
    loss = row_loss if reduction == "none" else row_loss.sum().reshape(1)
    grads = [None if x is None else x.to(inp.dtype) for x, inp in zip(g, (h, w, b))]
    outs = (loss.to(torch.float32),) + ((logprobs, entropy) if return_stats else ())
    return outs, grads


def _logprob_grad_bufs(h, w, b, need, dt) -> list:
    """[hidden, weight, bias] gradient buffers of the log-probs' backward (None where not
    needed): the hidden one written row block by row block, the weight's and bias's accumulated
    over the chunks (zeroed, in the compute dtype)."""
    g = [None, None, None]
    if need[0]:
        hdt = h.dtype if _low_operands(h, w, dt) else dt
        g[0] = torch.empty(h.shape, dtype=hdt, device=h.device)
    if need[1]:
        g[1] = torch.zeros(w.shape, dtype=dt, device=h.device)
    if need[2] and b is not None:
        g[2] = torch.zeros(b.shape, dtype=dt, device=h.device)
    return g


def _logprob_chunks(h, w, b, labels, ignore_index, temperature, chunk_size, fn, route=None):
    """Yields (a, e, active, y, hc, head, z, lse, inv_t) per chunk of tokens, with ``z`` the
    chunk's logits / T in the compute dtype and ``head`` its :class:`_Head` (for
    fused_linear_logprobs). Where the chunk's rows go through divkit's label-row kernel
    (:func:`_core_label_rows`), ``z`` is the raw logits, ``y`` the labels as given and ``lse``
    None: the kernel divides by T and checks the rows."""
    n, v = h.shape[0], w.shape[0]
    dev = h.device
    _bias_checks(fn, "bias", b)
    lab = labels.to(dev).reshape(-1).to(torch.int64)
    act = lab != ignore_index
    _check_label_range(fn, lab, act, v, ignore_index)
    if not (math.isfinite(temperature) and temperature > 0):
        check.fail(fn, f"temperature must be finite and > 0, got {temperature:g}")
    dt = _compute_dtype(h, w)
    head = _Head(h, w, b, dt)
    inv_t = _f32(np.float32(1.0) / np.float32(temperature))
    rows = _rows_per_chunk(chunk_size, n, v, dev)
    for a in range(0, n, rows):
        e = min(n, a + rows)
        ca = act[a:e]
        hc = head.rows(a, e)
        x = head.logits(hc)
        if _core_label_rows(route, x):
            yield a, e, ca, lab[a:e], hc, head, x, None, inv_t
            continue
        z = x * inv_t
        lse = torch.logsumexp(z, -1)
        r = _first_row(ca & ~torch.isfinite(lse))
        if r is not None:
            hint = ", or overflow float32 once divided by the temperature" if inv_t != 1 else ""
            check.fail(fn, f"the logits of token {a + r} are NaN, +inf or all -inf{hint}")
        y = torch.where(ca, lab[a:e], torch.zeros_like(lab[a:e]))
        yield a, e, ca, y, hc, head, z, lse, inv_t


def fused_linear_logprobs(
    h,
    w,
    b,
    labels,
    ignore_index,
    temperature,
    return_entropy,
    topk,
    chunk_size,
    *,
    fn="fused_linear_logprobs",
    extra=(False, False),
    route=None,
):
    """Per-token log p(label) (and the entropy, the top-k mass, and with ``extra`` log sum p^2
    and the bool top-1 flag: the label is the first maximal logit, as torch.argmax) of
    softmax((h @ w.T + b) / T), 0 for ignored tokens, in chunks of tokens (see
    :func:`divkit.fused_linear_logprobs`); ``route``: as in :func:`fused_linear_cross_entropy`
    (divkit's label-row kernel as the row step)."""
    n = h.shape[0]
    dev = h.device
    lp = torch.zeros(n, dtype=torch.float32, device=dev)
    ent = torch.zeros(n, dtype=torch.float32, device=dev) if return_entropy else None
    mass = torch.zeros(n, dtype=torch.float32, device=dev) if topk else None
    sq = torch.zeros(n, dtype=torch.float32, device=dev) if extra[0] else None
    top1 = torch.zeros(n, dtype=torch.bool, device=dev) if extra[1] else None
    for a, e, ca, y, _, _, z, lse, _ in _logprob_chunks(
        h, w, b, labels, ignore_index, temperature, chunk_size, fn, route
    ):
        if lse is None:  # divkit's label-row kernel
            c = e - a
            lse, zy = _f64_rows(c, dev), _f64_rows(c, dev)
            ent_c, sq_c = _f64_rows(c, dev, return_entropy), _f64_rows(c, dev, sq is not None)
            mass_c, top1_c = _f64_rows(c, dev, bool(topk)), _f64_rows(c, dev, top1 is not None)
            _label_rows(
                route,
                z,
                y,
                fn,
                a,
                lse=lse,
                z_label=zy,
                entropy=ent_c,
                topk_mass=mass_c,
                log_sum_sq=sq_c,
                is_top1=top1_c,
                topk=min(topk, z.shape[-1]) if topk else 0,
                ignore_index=ignore_index,
                temperature=temperature,
            )
            # The kernel gives 0 at ignored rows.
            lp[a:e] = (zy - lse).float()
            for out, got in ((ent, ent_c), (mass, mass_c), (sq, sq_c)):
                if out is not None:
                    out[a:e] = got.float()
            if top1 is not None:
                top1[a:e] = top1_c > 0.5
            continue
        zero = torch.zeros_like(lse)
        lpz = z - lse.unsqueeze(-1)
        lp[a:e] = torch.where(ca, lpz.gather(-1, y.unsqueeze(-1)).squeeze(-1), zero).float()
        p = torch.exp(lpz)
        if return_entropy:
            ent[a:e] = torch.where(ca, -(_xt(p, lpz)).sum(-1), zero).float()
        if topk:
            k = min(topk, z.shape[-1])
            mass[a:e] = torch.where(ca, p.topk(k, -1).values.sum(-1), zero).float()
        if sq is not None:
            # From exp(z - max) (the max's term is 1): log sum e^2 - 2 log sum e keeps its
            # absolute accuracy where sum p^2 is near 1, which log(sum p^2) of rounded p loses.
            ex = torch.exp(z - z.amax(-1, keepdim=True))
            lsq = torch.log(ex.square().sum(-1)) - 2 * torch.log(ex.sum(-1))
            sq[a:e] = torch.where(ca, lsq, zero).float()
        if top1 is not None:
            top1[a:e] = ca & (z.argmax(-1) == y)
    return tuple(x for x in (lp, ent, mass, sq, top1) if x is not None)


def fused_linear_logprobs_backward(
    h,
    w,
    b,
    labels,
    ignore_index,
    temperature,
    g_lp,
    g_ent,
    need,
    chunk_size,
    *,
    fn="fused_linear_logprobs",
    route=None,
):
    """The gradients (hidden, weight, bias; None where not needed) of sum_i g_lp[i] lp_i +
    g_ent[i] H_i, recomputing each chunk's logits (``route``: as in
    :func:`fused_linear_logprobs`)."""
    dev = h.device
    dt = _compute_dtype(h, w)
    g = _logprob_grad_bufs(h, w, b, need, dt)
    for a, e, ca, y, hc, head, z, lse, inv_t in _logprob_chunks(
        h, w, b, labels, ignore_index, temperature, chunk_size, fn, route
    ):
        if lse is None:  # divkit's label-row kernel: dz written over the logits
            c = e - a

            def coef(x):
                if x is None:
                    return torch.zeros(c, dtype=torch.float64, device=dev)
                return x[a:e].to(dev, torch.float64)

            g_c = coef(g_lp)
            _label_rows(
                route,
                z,
                y,
                fn,
                a,
                coef_a0=-g_c,
                coef_b=g_c,
                coef_c=torch.zeros_like(g_c),
                coef_e=None if g_ent is None else -coef(g_ent),
                ignore_index=ignore_index,
                temperature=temperature,
            )
            _add_head_grads(head, g, z, hc, a, e)
            continue
        lpz = z - lse.unsqueeze(-1)
        p = torch.exp(lpz)
        dz = torch.zeros_like(z)
        if g_lp is not None:
            c = torch.where(ca, g_lp[a:e].to(dev, dt), torch.zeros_like(lse))
            dz -= c.unsqueeze(-1) * p
            dz.scatter_add_(-1, y.unsqueeze(-1), c.unsqueeze(-1))
        if g_ent is not None:
            c = torch.where(ca, g_ent[a:e].to(dev, dt), torch.zeros_like(lse))
            hrow = -(_xt(p, lpz)).sum(-1, keepdim=True)
            dz -= c.unsqueeze(-1) * _xt(p, lpz + hrow)
        dz = dz * inv_t
        _add_head_grads(head, g, dz, hc, a, e)
    return [None if x is None else x.to(inp.dtype) for x, inp in zip(g, (h, w, b))]


# The vocabulary-parallel fused_linear_logprobs (the core's sharded_label_forward), kept apart from
# the unsharded functions above.


def _sharded_logprob_chunks(
    h, w, b, labels, ignore_index, temperature, chunk_size, fn, group, flags
):
    """Yields (a, e, active, y, hc, head, z, lse, z_label, entropy, shard, inv_t) per chunk of
    tokens, ``z`` the chunk's shard logits / T, ``lse``, ``z_label`` and ``entropy`` the rows'
    global values (fp64)."""
    n, v = h.shape[0], w.shape[0]
    dev = h.device
    shard = _Shard(fn, group, v, dev, lambda: _head_checks(fn, "", h, w, b), flags)
    lab = labels.to(dev).reshape(-1).to(torch.int64)
    act = lab != ignore_index
    _check_label_range(fn, lab, act, shard.global_v, ignore_index)
    if not (math.isfinite(temperature) and temperature > 0):
        check.fail(fn, f"temperature must be finite and > 0, got {temperature:g}")
    dt = _compute_dtype(h, w)
    head = _Head(h, w, b, dt)
    inv_t = _f32(np.float32(1.0) / np.float32(temperature))
    rows = _rows_per_chunk(chunk_size, n, shard.max_v, dev)
    for a in range(0, n, rows):
        e = min(n, a + rows)
        ca = act[a:e]
        hc = head.rows(a, e)
        z = head.logits(hc) * inv_t
        y = torch.where(ca, lab[a:e], torch.zeros_like(lab[a:e]))
        lse, zy, ent, _, _ = _shard_label_rows(shard, z, ca, y, fn, a, entropy=True)
        yield a, e, ca, y, hc, head, z, lse, zy, ent, shard, inv_t


def fused_linear_logprobs_sharded(
    h,
    w,
    b,
    labels,
    ignore_index,
    temperature,
    return_entropy,
    topk,
    chunk_size,
    group,
    *,
    fn="fused_linear_logprobs",
):
    """:func:`fused_linear_logprobs` with the weight and bias this rank's vocabulary shard of
    ``group``: the outputs are those of the unsharded head, on every rank."""
    n = h.shape[0]
    dev = h.device
    lp = torch.zeros(n, dtype=torch.float32, device=dev)
    ent = torch.zeros(n, dtype=torch.float32, device=dev) if return_entropy else None
    mass = torch.zeros(n, dtype=torch.float32, device=dev) if topk else None
    flags = (bool(return_entropy), bool(topk))
    for a, e, ca, y, _, _, z, lse, zy, ent_c, shard, _ in _sharded_logprob_chunks(
        h, w, b, labels, ignore_index, temperature, chunk_size, fn, group, flags
    ):
        if topk > shard.global_v:
            check.fail(fn, f"topk must be in [1, V = {shard.global_v}], got {topk}")
        zero = torch.zeros_like(lse)
        lp[a:e] = torch.where(ca, zy - lse, zero).float()
        if return_entropy:
            ent[a:e] = ent_c.float()
        if topk:
            # The k largest logits of every shard (-inf where a shard has fewer), gathered with
            # one all-reduce of the [world, rows, k] slots, each rank filling its own.
            k_loc = min(topk, z.shape[-1])
            mine = torch.full((e - a, topk), -_INF, dtype=torch.float64, device=dev)
            if k_loc:
                mine[:, :k_loc] = z.topk(k_loc, -1).values.double()
            slots = torch.zeros((shard.world, e - a, topk), dtype=torch.float64, device=dev)
            slots[shard.rank] = mine
            # -inf + 0 = -inf: the other ranks' zeros leave a slot's values as they are.
            cand = shard.sum_(slots).permute(1, 0, 2).reshape(e - a, -1)
            k = min(topk, shard.global_v)
            top = cand.topk(k, -1).values
            m = torch.exp(top - lse.unsqueeze(-1)).sum(-1).clamp(max=1.0)
            mass[a:e] = torch.where(ca, m, zero).float()
    outs = [lp]
    if return_entropy:
        outs.append(ent)
    if topk:
        outs.append(mass)
    return tuple(outs)


def fused_linear_logprobs_sharded_backward(
    h,
    w,
    b,
    labels,
    ignore_index,
    temperature,
    g_lp,
    g_ent,
    need,
    chunk_size,
    group,
    *,
    fn="fused_linear_logprobs",
):
    """The gradients (hidden, weight, bias) of sum_i g_lp[i] lp_i + g_ent[i] H_i over this
    rank's vocabulary shard (the hidden states' all-reduced), recomputing each chunk."""
    dev = h.device
    dt = _compute_dtype(h, w)
    g = _logprob_grad_bufs(h, w, b, need, dt)
    flags = (bool(need[0]), g_lp is not None, g_ent is not None)
    for a, e, ca, y, hc, head, z, lse, _, ent, shard, inv_t in _sharded_logprob_chunks(
        h, w, b, labels, ignore_index, temperature, chunk_size, fn, group, flags
    ):
        lpz = z - lse.to(z.dtype).unsqueeze(-1)
        p = torch.exp(lpz)
        dz = torch.zeros_like(z)
        zero = torch.zeros_like(z[:, 0])
        if g_lp is not None:
            c = torch.where(ca, g_lp[a:e].to(dev, dt), zero)
            dz -= c.unsqueeze(-1) * p
            col, mine = shard.local_labels(y, ca)
            dz.scatter_add_(-1, col.unsqueeze(-1), torch.where(mine, c, zero).unsqueeze(-1))
        if g_ent is not None:
            c = torch.where(ca, g_ent[a:e].to(dev, dt), zero)
            hrow = ent.to(dt).unsqueeze(-1)
            dz -= c.unsqueeze(-1) * _xt(p, lpz + hrow)
        dz = dz * inv_t
        if g[0] is not None:
            g[0][a:e] = _sum_over(shard, head.grad_hidden(dz))
        if g[1] is not None:
            head.add_grad_weight(g[1], dz, hc)
        if g[2] is not None:
            g[2] += dz.sum(0)
    return [None if x is None else x.to(inp.dtype) for x, inp in zip(g, (h, w, b))]


# ---------------------------------------------------------------------------------------------
# The label terms of the token-level preference losses (TDPO, SparsePO: the core's
# fused_linear_divergence with FusedLabelTerms): one pass over each chunk of the policy's and
# the reference's logits gives both label log-probs and KL(pi_ref || pi); the backward is one
# more pass, reading the chunks kept by the forward instead of recomputing their logits.
# ---------------------------------------------------------------------------------------------


def _label_terms_setup(fn, h, w, rh, rw, labels, ignore_index):
    n, v = h.shape[0], w.shape[0]
    if v == 0:
        check.fail(fn, "lm_head_weight has V = 0 (an empty vocabulary)")
    if rw is not None and rw.shape[0] != v:
        check.fail(
            fn,
            f"ref_weight has {rw.shape[0]} rows but lm_head_weight {v}: the vocabularies "
            f"must agree",
        )
    lab = labels.to(h.device).reshape(-1).to(torch.int64)
    act = lab != ignore_index
    _check_label_range(fn, lab, act, v, ignore_index)
    return n, v, lab, act


def _softmax_rows(fn: str, who: str, z: torch.Tensor, act: torch.Tensor, first: int):
    """(centered logits, their log-sum-exp [c, 1], log-softmax, softmax) of a chunk's logits at
    T = 1 (ignored rows zeroed first); raises for a counted row that is NaN, +inf or all
    -inf."""
    bad = ((torch.isnan(z) | torch.isposinf(z)).any(-1) | torch.isneginf(z).all(-1)) & act
    r = _first_row(bad)
    if r is not None:
        check.fail(fn, f"the {who} logits of token {first + r} are NaN, +inf or all -inf")
    zc = _center(_sanitize(z, act, z.dtype), 1.0)
    lse = torch.logsumexp(zc, -1, keepdim=True)
    lz = zc - lse
    return zc, lse, lz, torch.exp(lz)


def _kept_or_computed(kept, a: int, e: int, head: "_Head", hc, fill: bool):
    """The chunk's logits: from ``kept`` (rows [0, K)) when it holds them and was filled, else
    by the GEMM, copied into ``kept`` when it should hold them (``fill``)."""
    inside = kept is not None and e <= kept.shape[0]
    if inside and not fill:
        return kept[a:e]
    z = head.logits(hc)
    if inside:
        kept[a:e].copy_(z)
    return z


def fused_linear_label_terms(
    h,
    w,
    b,
    rh,
    rw,
    rb,
    labels,
    ignore_index,
    chunk_size,
    keep_rows=0,
    keep_ref=False,
    *,
    fn,
    route: Any = None,
):
    """(log pi(y), log pi_ref(y), KL(pi_ref || pi), kept policy logits, kept reference logits)
    per token of the policy head ``(h [N, H], w [V, H], b)`` and the reference head ``(rh, rw,
    rb)``, all at T = 1, 0 at ignored tokens (fp32 [N]); the KL is the core's forward_kl with
    the reference as the teacher. The logits of the chunks of tokens [0, keep_rows) are kept (in
    the compute dtype) for :func:`fused_linear_label_terms_backward`, the reference's only with
    ``keep_ref``. ``route`` (``divkit._device.Route``): where ``route.rows == "core"`` and the
    logits are fp32, each chunk's KL rows go through divkit's divergence kernel (the CUDA kernel
    for CUDA tensors, on ``route.stream``; the CPU kernel for CPU tensors in the tests), as the
    fused head's row step (:class:`CoreRows`); else PyTorch ops. The log-probabilities of the
    labels stay PyTorch ops (they need the rows' log-softmax, which checks them first)."""
    _bias_checks(fn, "lm_head_bias", b)
    _bias_checks(fn, "ref_bias", rb)
    n, v, lab, act = _label_terms_setup(fn, h, w, rh, rw, labels, ignore_index)
    dev = h.device
    dt = _compute_dtype(h, w, rh, rw)
    ph, rhd = _Head(h, w, b, dt), _Head(rh, rw, rb, dt)
    lp = torch.zeros(n, dtype=torch.float32, device=dev)
    ref_lp = torch.zeros(n, dtype=torch.float32, device=dev)
    kl = torch.zeros(n, dtype=torch.float32, device=dev)
    kept_s = torch.empty((keep_rows, v), dtype=dt, device=dev) if keep_rows else None
    kept_t = torch.empty((keep_rows, v), dtype=dt, device=dev) if keep_rows and keep_ref else None
    rows = _rows_per_chunk(chunk_size, n, v, dev)
    kernel = route is not None and getattr(route, "rows", "torch") == "core" and dt == torch.float32
    kl_cfg = _LabelKl(ignore_index)
    for a in range(0, n, rows):
        e = min(n, a + rows)
        ca = act[a:e]
        y = torch.where(ca, lab[a:e], torch.zeros_like(lab[a:e])).unsqueeze(-1)
        zs = _kept_or_computed(kept_s, a, e, ph, ph.rows(a, e), True)
        zt = _kept_or_computed(kept_t, a, e, rhd, rhd.rows(a, e), True)
        xs, lse_s, lq, _ = _softmax_rows(fn, "policy", zs, ca, a)
        xt, lse_t, lpt, _ = _softmax_rows(fn, "reference", zt, ca, a)
        zero = torch.zeros(e - a, dtype=torch.float64, device=dev)
        if kernel:
            # divkit's forward_kl rows (reference = teacher), 0 at ignored tokens; the rows were
            # checked by _softmax_rows above, so the kernel's own checks do not fire.
            row_kl = CoreRows(route).divergence(zs, zt, lab[a:e], None, kl_cfg, False, False, fn)[0]
        else:
            e_ = _Entries(xs, xt, (lse_s, lse_t))
            row_kl = _xt(e_.p, e_.lr).sum(-1, dtype=torch.float64)
            # Beyond the fp32 range the core reports +inf.
            row_kl = torch.where(row_kl.abs() <= _FLT_MAX, row_kl, torch.full_like(row_kl, _INF))
        kl[a:e] = torch.where(ca, row_kl, zero).float()
        lp[a:e] = torch.where(ca, lq.gather(-1, y).squeeze(-1).double(), zero).float()
        ref_lp[a:e] = torch.where(ca, lpt.gather(-1, y).squeeze(-1).double(), zero).float()
    return lp, ref_lp, kl, kept_s, kept_t


class _LabelKl(NamedTuple):
    """The label terms' KL as :class:`CoreRows` options: forward_kl at T = 1."""

    ignore_index: int
    kind: str = "forward_kl"
    beta: float = 0.5
    alpha: float = 0.5
    temperature: float = 1.0
    scale_by_t_squared: bool = False


def fused_linear_label_terms_backward(
    h,
    w,
    b,
    rh,
    rw,
    rb,
    labels,
    ignore_index,
    chunk_size,
    g_lp,
    g_kl,
    need,
    kept_s=None,
    kept_t=None,
    out=None,
    *,
    fn,
):
    """The gradients (policy hidden, weight, bias) of ``sum_i g_lp[i] lp_i + g_kl[i] KL_i``
    (either None: not asked), from the kept logits where :func:`fused_linear_label_terms` kept
    them and recomputed elsewhere. ``out``: (hidden, weight, bias) buffers, the first written
    and the other two added to (compute dtype, for a caller that accumulates over calls), None
    where not needed; without it the gradients are returned in the inputs' dtypes."""
    n, v, lab, act = _label_terms_setup(fn, h, w, rh, rw, labels, ignore_index)
    dev = h.device
    dt = _compute_dtype(h, w, rh, rw)
    ph = _Head(h, w, b, dt)
    rhd = _Head(rh, rw, rb, dt) if g_kl is not None else None
    if out is None:
        g = [None, None, None]
        if need[0]:
            g[0] = torch.empty(h.shape, dtype=ph.hidden_grad_dtype, device=dev)
        if need[1]:
            g[1] = torch.zeros(w.shape, dtype=dt, device=dev)
        if need[2] and b is not None:
            g[2] = torch.zeros(b.shape, dtype=dt, device=dev)
    else:
        g = list(out)
    rows = _rows_per_chunk(chunk_size, n, v, dev)
    zero = torch.zeros((), dtype=dt, device=dev)
    for a in range(0, n, rows):
        e = min(n, a + rows)
        ca = act[a:e]
        y = torch.where(ca, lab[a:e], torch.zeros_like(lab[a:e])).unsqueeze(-1)
        hc = ph.rows(a, e)
        zs = _kept_or_computed(kept_s, a, e, ph, hc, False)
        q = _softmax_rows(fn, "policy", zs, ca, a)[3]
        dz = torch.zeros_like(q)
        if g_lp is not None:
            c = torch.where(ca, g_lp[a:e].to(dev, dt), zero).unsqueeze(-1)
            dz -= c * q
            dz.scatter_add_(-1, y, c)
        if g_kl is not None:
            zt = _kept_or_computed(kept_t, a, e, rhd, rhd.rows(a, e), False)
            p = _softmax_rows(fn, "reference", zt, ca, a)[3]
            c = torch.where(ca, g_kl[a:e].to(dev, dt), zero).unsqueeze(-1)
            dz += c * (q - p)
        if g[0] is not None:
            g[0][a:e] = ph.grad_hidden(dz)
        if g[1] is not None:
            ph.add_grad_weight(g[1], dz, hc)
        if g[2] is not None:
            g[2] += dz.sum(0)
    if out is not None:
        return g
    return [None if x is None else x.to(inp.dtype) for x, inp in zip(g, (h, w, b))]
