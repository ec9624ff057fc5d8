"""f-DPG: policy gradients toward an explicit target distribution for any f-divergence (Go et
al. 2023, "Aligning Language Models with Preferences through f-divergence Minimization"; also
exposed as ``divkit.rlhf.fdpg_loss``).

Target: ``p(x) = P(x) / Z`` with ``P(x) = a(x) b(x)`` evaluable (a: a base LM, b: a scorer, e.g.
``b = exp(r / beta)`` or an indicator), Z unknown. The policy ``pi_theta`` minimizes

    D_f(pi_theta || p) = E_p[ f(pi_theta(x) / p(x)) ],

whose gradient is ``E_pi[ f'(pi/p) grad log pi ]`` (a baseline B can be subtracted since
``E_pi[grad log pi] = 0``). From samples x_i of a proposal q (q = pi_theta: on-policy; q = a or
an earlier policy: off-policy), the estimate is

    grad = (1/n) sum_i w_i (f'(t_i) - B) grad log pi_theta(x_i),   w_i = pi(x_i) / q(x_i),
    t_i = pi(x_i) / p(x_i),

i.e. policy gradient with the pseudo-reward ``r_i = -f'(t_i)`` and the importance weight w_i.
Z is estimated on the batch by importance sampling (``Z ~ (1/n) sum_i P(x_i) / q(x_i)``) unless
given. The divergences (f with f(1) = 0; the same conventions as ``divkit.functional``'s kinds,
the first argument being the target p):

==============  =======================================  =====================================
f               D_f(pi || p)                             f'(t)
==============  =======================================  =====================================
forward_kl      KL(p || pi) (DPG / GDC)                  -1/t
reverse_kl      KL(pi || p) (RL with a KL penalty)       log t + 1
jsd             JS(p, pi) = KL(p||m)/2 + KL(pi||m)/2     log(2t / (1 + t)) / 2
tvd             sum |p - pi| / 2                         sign(t - 1) / 2
alpha           (1 - sum p^a pi^(1-a)) / (a (1 - a))     (1 - t^(-a)) / a   (a = 1: forward KL,
                (Amari, divkit's alpha_divergence)                          a = 0: reverse KL)
==============  =======================================  =====================================
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple, Union

import torch

from . import _validate as check

__all__ = ["FDPG_DIVERGENCES", "FDPGStats", "fdpg_f", "fdpg_f_prime", "fdpg_loss"]

#: The f-divergences :func:`fdpg_loss` takes.
FDPG_DIVERGENCES: Tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd", "tvd", "alpha")
_BASELINES = ("loo", "mean")


class FDPGStats(NamedTuple):
    """Per-batch diagnostics (float64, detached): pseudo_rewards ``-f'(t_i)``, advantages
    ``-(f'(t_i) - B_i)``, importance_weights ``pi/q``, log_z (estimated or given) and divergence,
    the importance-sampling estimate ``(1/n) sum_i (p(x_i)/q(x_i)) f(t_i)`` of
    ``D_f(pi || p)``."""

    pseudo_rewards: torch.Tensor
    advantages: torch.Tensor
    importance_weights: torch.Tensor
    log_z: float
    divergence: float


def _alpha_kind(divergence: str, alpha: float, fn: str = "fdpg_f") -> str:
    divergence = check.string(fn, "divergence", divergence, choices=FDPG_DIVERGENCES)
    alpha = check.real(fn, "alpha", alpha)
    if not check.isfinite(alpha):
        check.fail(fn, f"alpha must be finite, got {alpha:g}")
    if divergence != "alpha":
        return divergence
    if alpha == 1.0:
        return "forward_kl"
    if alpha == 0.0:
        return "reverse_kl"
    return "alpha"


@check.public("fdpg_f_prime", finite_args=("log_t",))
def fdpg_f_prime(log_t: torch.Tensor, divergence: str, alpha: float = 0.5) -> torch.Tensor:
    """``f'(t)`` as a function of ``log t = log pi(x) - log p(x)`` (see the module's table),
    elementwise, in the dtype of log_t."""
    kind = _alpha_kind(divergence, alpha, "fdpg_f_prime")
    if kind == "forward_kl":
        return -torch.exp(-log_t)
    if kind == "reverse_kl":
        return log_t + 1.0
    if kind == "jsd":
        return 0.5 * (math.log(2.0) + log_t - torch.nn.functional.softplus(log_t))
    if kind == "tvd":
        return 0.5 * torch.sign(log_t)
    return -torch.expm1(-alpha * log_t) / alpha


@check.public("fdpg_f", finite_args=("log_t",))
def fdpg_f(log_t: torch.Tensor, divergence: str, alpha: float = 0.5) -> torch.Tensor:
    """``f(t)`` (with f(1) = 0) as a function of ``log t``, so that
    ``D_f(pi || p) = E_p[f(pi/p)]``."""
    kind = _alpha_kind(divergence, alpha)
    t = torch.exp(log_t)
    if kind == "forward_kl":
        return -log_t
    if kind == "reverse_kl":
        return t * log_t
    if kind == "jsd":
        sp = torch.nn.functional.softplus(log_t)  # log(1 + t)
        return 0.5 * (t * (math.log(2.0) + log_t - sp) + math.log(2.0) - sp)
    if kind == "tvd":
        return 0.5 * torch.abs(t - 1.0)
    a = alpha
    return (1.0 - torch.exp((1.0 - a) * log_t) + (1.0 - a) * (t - 1.0)) / (a * (1.0 - a))


@check.public("fdpg_loss")
def fdpg_loss(
    policy_logps: torch.Tensor,
    proposal_logps: torch.Tensor,
    target_log_scores: torch.Tensor,
    divergence: str = "jsd",
    *,
    alpha: float = 0.5,
    log_z: Optional[float] = None,
    baseline: Union[str, float, None] = "loo",
    return_stats: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, FDPGStats]]:
    r"""The f-DPG surrogate loss whose gradient is the estimate of ``grad D_f(pi_theta || p)``:

    ``loss = (1/n) sum_i w_i (f'(t_i) - B_i) log pi_theta(x_i)``

    with ``w_i = pi(x_i)/q(x_i)``, ``t_i = pi(x_i) Z / P(x_i)``, w, t and B detached (Go et al.
    2023, the f-DPG estimator; NAVER's disco ``FDivergenceLoss``). Minimize it.

    policy_logps [n]: ``log pi_theta(x_i)``, sequence log-probabilities of the sampled
        completions (with grad; any float dtype, any device). proposal_logps [n]: ``log q(x_i)``
        of the distribution they were sampled from (pass ``policy_logps.detach()`` on-policy).
        target_log_scores [n]: ``log P(x_i) = log a(x_i) + log b(x_i)``, the unnormalized
        target.
    divergence: one of :data:`FDPG_DIVERGENCES`; alpha: the order of ``'alpha'`` (any finite
        value; 1 and 0 are forward and reverse KL).
    log_z: ``log Z`` if known; None: the batch's importance-sampling estimate
        ``LSE_i(log P(x_i) - log q(x_i)) - log n`` (consistent, biased for small n).
    baseline: B, subtracted from f' (added to the pseudo-reward's negation); ``'loo'``
        (default): for sample i the mean of the other samples' f' (keeps the estimate unbiased;
        needs n >= 2), ``'mean'``: the batch mean of f', a float: a given constant (e.g. a moving
        average of earlier batches' f', as disco's), None: no baseline.
    return_stats: also return :class:`FDPGStats`.

    The coefficients are computed in float64; the loss has policy_logps' dtype. The loss's value
    is not the divergence (see ``FDPGStats.divergence`` for that)."""
    fn = "fdpg_loss"
    lp = check.vector(fn, "policy_logps", policy_logps)
    n = lp.shape[0]
    lq = check.vector(fn, "proposal_logps", proposal_logps, n)
    ls = check.vector(fn, "target_log_scores", target_log_scores, n)
    for name, x in (("proposal_logps", lq), ("target_log_scores", ls)):
        if x.device != lp.device:
            check.fail(fn, f"{name} is on {x.device}, policy_logps on {lp.device}")
    divergence = check.string(fn, "divergence", divergence, choices=FDPG_DIVERGENCES)
    alpha = check.real(fn, "alpha", alpha, allow_nan=False)
    if not check.isfinite(alpha):
        check.fail(fn, f"alpha must be finite, got {alpha:g}")
    return_stats = check.boolean(fn, "return_stats", return_stats)

    lp64 = lp.detach().double()
    lq64 = lq.detach().double()
    ls64 = ls.detach().double()
    if not bool(torch.isfinite(lp64).all()):
        check.fail(fn, "policy_logps must be finite")
    if not bool(torch.isfinite(lq64).all()):
        check.fail(fn, "proposal_logps must be finite (samples of q have q(x) > 0)")
    if bool(torch.isnan(ls64).any()) or bool((ls64 == math.inf).any()):
        check.fail(fn, "target_log_scores must not be NaN or +inf (-inf: P(x) = 0 is allowed)")
    if log_z is None:
        if bool((ls64 == -math.inf).all()):
            check.fail(fn, "target_log_scores are all -inf: Z cannot be estimated from the batch")
        lz = float(torch.logsumexp(ls64 - lq64, 0)) - math.log(n)
    else:
        lz = check.real(fn, "log_z", log_z, allow_nan=False)
        if not check.isfinite(lz):
            check.fail(fn, f"log_z must be finite, got {lz:g}")

    log_t = lp64 - (ls64 - lz)  # +inf where P(x) = 0
    # The unchecked forms: log_t is +inf where P(x) = 0, which the public functions reject.
    fp = fdpg_f_prime.__wrapped__(log_t, divergence, alpha)
    if not bool(torch.isfinite(fp).all()):
        check.fail(
            fn,
            f"f'(pi/p) is not finite for some sample (P(x) = 0 with divergence '{divergence}'); "
            f"use 'forward_kl', 'jsd', 'tvd' or 'alpha' with alpha > 0 for targets with zeros",
        )
    if isinstance(baseline, str):
        baseline = check.string(fn, "baseline", baseline, choices=_BASELINES)
        if baseline == "loo":
            if n < 2:
                check.fail(fn, "baseline='loo' needs at least 2 samples")
            b = (fp.sum() - fp) / (n - 1)
        else:
            b = fp.mean().expand(n)
    elif baseline is None:
        b = torch.zeros_like(fp)
    else:
        bv = check.real(fn, "baseline", baseline, allow_nan=False)
        if not check.isfinite(bv):
            check.fail(fn, f"baseline must be finite, got {bv:g}")
        b = torch.full_like(fp, bv)
    w = torch.exp(lp64 - lq64)
    if not bool(torch.isfinite(w).all()):
        check.fail(
            fn,
            "the importance weights pi(x)/q(x) overflow float64 (policy_logps - proposal_logps "
            "> 709 for some sample): q does not cover pi",
        )
    coef = w * (fp - b)
    loss = (coef.to(lp.dtype) * lp).mean()
    if not return_stats:
        return loss
    # D_f(pi || p) = E_q[(p/q) f(pi/p)]: samples with P(x) = 0 add 0 (the estimate leaves out
    # the part of D_f from the mass pi puts where p = 0).
    pq = torch.exp(ls64 - lz - lq64)
    fv = torch.where(
        pq > 0, fdpg_f.__wrapped__(torch.where(pq > 0, log_t, 0.0), divergence, alpha), 0.0
    )
    div = float((pq * fv).mean())
    stats = FDPGStats(-fp, -(fp - b), w, lz, div)
    return loss, stats
