"""Preference-optimization losses: the DPO family with every TRL loss type, f-DPO, cDPO, WPO,
CPO / SimPO / AlphaPO, ORPO, KTO, D2O, HyPO, SuperHF, and token-level TDPO and SparsePO.

Names and arguments follow TRL (``DPOTrainer``/``dpo_loss``, ``CPOTrainer.cpo_loss``,
``ORPOTrainer.odds_ratio_loss``, ``KTOTrainer.kto_loss``), so a TRL user switches by changing an
import. The sequence-level arithmetic (losses, rewards and their gradients with respect to the
four log-prob inputs) runs in divkit's C++ core in fp64 with stable forms (log-sigmoid,
softplus, log1mexp, clamped exponents); see ``include/divkit/preference.h``.

Notation: ``l_w = log pi(y_w) - log pi_ref(y_w)``, ``l_l = log pi(y_l) - log pi_ref(y_l)``,
``D = l_w - l_l``; sequence log-probs are sums over completion tokens (labels != -100).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from . import _C
from .functional import _check_real, _check_str, _type_name, divergence
from .fused import fused_linear_logprobs

__all__ = [
    "LOSS_TYPES", "F_DIVERGENCE_TYPES", "preference_loss", "dpo_loss", "preference_metrics",
    "wpo_weights", "cpo_loss", "simpo_loss", "odds_ratio_loss", "orpo_loss", "kto_loss",
    "d2o_loss", "hypo_loss", "superhf_loss", "tdpo_loss", "sparsepo_loss", "SparsePOMask",
    "tdpo_loss_fused", "sparsepo_loss_fused",
    "sequence_logps", "token_logratio_and_kl",
]

#: loss_type names of :func:`preference_loss`, in the core's order.
LOSS_TYPES: Tuple[str, ...] = tuple(_C.preference_loss_types())
#: f_divergence_type names (f-DPO).
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


# ---------------------------------------------------------------------------------------------
# Argument handling and the generic autograd Function over a core kernel.
# ---------------------------------------------------------------------------------------------


def _vec(fn: str, name: str, x, n: Optional[int] = None, allow_empty: bool = False) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {_type_name(x)}")
    if x.dim() != 1:
        raise ValueError(f"{fn}: {name} must be 1-D [B], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{fn}: {name} must have a floating dtype, got {x.dtype}")
    if n is not None and x.shape[0] != n:
        raise ValueError(f"{fn}: {name} has {x.shape[0]} entries, expected {n} (the batch size "
                         f"of the first argument); batch sizes disagree")
    if x.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{fn}: {name} is empty: the batch needs at least one pair")
    return x


def _lengths(fn: str, name: str, x, n: int) -> Optional[torch.Tensor]:
    if x is None:
        return None
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    if x.dim() != 1 or x.shape[0] != n:
        raise ValueError(f"{fn}: {name} must have shape [{n}], got {tuple(x.shape)}")
    x = x.detach().cpu()
    if x.dtype not in (torch.int32, torch.int64, torch.float32, torch.float64):
        x = x.to(torch.float64)
    if bool((x <= 0).any()):
        raise _C.Error(f"{fn}: {name} must be > 0, got {x[x <= 0][0].item()}")
    return x.contiguous()


def _compute_dtype(*xs: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _host(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.detach().to(device="cpu", dtype=dtype).contiguous()


class _SequenceKernel(torch.autograd.Function):
    """Autograd over a core kernel ``run(host_inputs, grad_losses, need) -> (outs, grads)``:
    outs[0] (the losses) is differentiable, the other outputs are not (rewards, as TRL detaches
    them). Backward calls the kernel again with the upstream gradient (B-sized vectors: the
    recomputation costs less than keeping the partials)."""

    @staticmethod
    def forward(ctx, run, *inputs):
        outs, _ = run(inputs, None, None)
        ctx.run = run
        ctx.save_for_backward(*inputs)
        if len(outs) > 1:
            ctx.mark_non_differentiable(*outs[1:])
        return tuple(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_losses, *_):
        inputs = ctx.saved_tensors
        need = ctx.needs_input_grad[1:]
        _, grads = ctx.run(inputs, grad_losses, need)
        return (None, *grads)


def _apply(run, inputs: Sequence[torch.Tensor]):
    if torch.is_grad_enabled() and any(x.requires_grad for x in inputs):
        return _SequenceKernel.apply(run, *inputs)
    return run(tuple(inputs), None, None)[0]


def _grad_bufs(inputs, need, dtype, count):
    if need is None:
        return [None] * count
    return [torch.empty(x.shape[0], dtype=dtype) if (i < len(need) and need[i]) else None
            for i, x in enumerate(inputs[:count])]


def _back(bufs, inputs):
    return tuple(None if g is None else g.to(device=x.device, dtype=x.dtype)
                 for g, x in zip(bufs, inputs))


# ---------------------------------------------------------------------------------------------
# DPO family.
# ---------------------------------------------------------------------------------------------


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    loss_type: Union[str, Sequence[str]] = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    chosen_lengths=None,
    rejected_lengths=None,
    loss_weights: Optional[Sequence[float]] = None,
    policy_weights: Optional[torch.Tensor] = None,
    discopop_tau: float = 0.05,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO-family per-pair losses, as TRL's ``dpo_loss``: returns
    ``(losses, chosen_rewards, rejected_rewards)``, each of shape ``[B]``.

    With ``s`` the f-DPO score (Wang et al. 2023, "Beyond Reverse KL"; ``f_divergence_type``):
    ``reverse_kl`` s = l (DPO), ``forward_kl`` s = 1 - exp(-l), ``js_divergence``
    s = log 2 + logsig(l), ``alpha_divergence`` s = (exp((a-1) l) - 1)/(a-1) with
    ``a = f_alpha_divergence_coef`` (exponents clamped at 80; a = 1 is reverse_kl), and
    ``z = beta (s(l_w) - s(l_l))``, ``eps = label_smoothing``, the per-pair loss is (TRL 1.16's
    ``DPOTrainer._compute_loss``):

    - ``sigmoid``: -(1-eps) logsig(z) - eps logsig(-z)  (DPO, Rafailov et al. 2023; cDPO label
      smoothing: TRL 1.16 ignores eps here, eps = 0 is TRL's loss)
    - ``hinge``: relu(1 - z) (SLiC); ``ipo``: (s(l_w)/n_w - s(l_l)/n_l - 1/(2 beta))^2 with the
      completion lengths n (as TRL; without lengths the inputs are taken as already averaged)
    - ``exo_pair``: sigma(z)(logsig(z) - log(1-eps)) + sigma(-z)(logsig(-z) - log eps), eps > 0
    - ``nca_pair``: -logsig(beta l_w) - logsig(-beta l_w)/2 - logsig(-beta l_l)/2
    - ``robust``: (-(1-eps) logsig(z) + eps logsig(-z)) / (1 - 2 eps), eps < 0.5
    - ``bco_pair``: -logsig(beta l_w) - logsig(-beta l_l)
    - ``sppo_hard``: (l_w - 1/(2 beta))^2 + (l_l + 1/(2 beta))^2
    - ``aot`` / ``aot_unpaired``: sigmoid-with-smoothing loss on the difference of the batch-sorted
      policy and reference log-ratios (aot), or of sorted l_w and l_l (aot_unpaired)
    - ``apo_zero``: 1 - sigma(beta l_w) + sigma(beta l_l); ``apo_down``: sigma(beta l_w) + 1 -
      sigma(beta (l_w - l_l))
    - ``discopop``: m = sigma(z / discopop_tau); -logsig(z)(1-m) + exp(-z) m (finite for any z)
    - ``sigmoid_norm``: the sigmoid loss on beta (s(l_w)/n_w - s(l_l)/n_l) (lengths required)
    - ``sft``: -sum_j pc_j / sum_j n_w,j, the chosen completions' token-mean NLL over the batch,
      the same value for every pair, as TRL (``["sigmoid", "sft"]`` is RPO/MPO's DPO + NLL);
      without ``chosen_lengths`` the inputs are taken as averaged (n = 1)

    f-divergences apply to sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust and discopop, as in
    TRL (sft accepts and ignores them). A list of loss types combines them:
    ``losses = sum_k loss_weights[k] * loss_k``.
    ``policy_weights`` (WPO, Zhou et al. 2024: the product w_w * w_l of :func:`wpo_weights`)
    multiplies each pair's loss, without gradient. Rewards are ``beta l_w`` and ``beta l_l``
    (detached), as TRL logs them.

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: ``[B]``
            float tensors (any device; the arithmetic runs on the CPU in fp64, the results come
            back as fp64 if any input is fp64, else fp32, on the inputs' device).
        chosen_lengths, rejected_lengths: completion lengths ``[B]`` (> 0), for ipo and
            sigmoid_norm.

    Example::

        losses, chosen_rewards, rejected_rewards = divkit.preference_loss(
            pc, pr, rc, rr, loss_type=["sigmoid", "bco_pair"], loss_weights=[0.8, 0.2])
        losses.mean().backward()
    """
    fn = "preference_loss"
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    for t in types:
        _check_str("loss_type", t, fn)
    if loss_weights is None:
        weights = [1.0] * len(types)
    else:
        weights = [_check_real("loss_weights", w, fn) for w in loss_weights]
        if len(weights) != len(types):
            raise ValueError(f"{fn}: loss_weights has {len(weights)} entries for {len(types)} "
                             f"loss types")
    beta = _check_real("beta", beta, fn)
    label_smoothing = _check_real("label_smoothing", label_smoothing, fn)
    f_alpha = _check_real("f_alpha_divergence_coef", f_alpha_divergence_coef, fn)
    tau = _check_real("discopop_tau", discopop_tau, fn)
    _check_str("f_divergence_type", f_divergence_type, fn)
    pc = _vec(fn, "policy_chosen_logps", policy_chosen_logps)
    n = pc.shape[0]
    pr = _vec(fn, "policy_rejected_logps", policy_rejected_logps, n)
    rc = _vec(fn, "ref_chosen_logps", ref_chosen_logps, n)
    rr = _vec(fn, "ref_rejected_logps", ref_rejected_logps, n)
    nw = _lengths(fn, "chosen_lengths", chosen_lengths, n)
    nl = _lengths(fn, "rejected_lengths", rejected_lengths, n)
    dtype = _compute_dtype(pc, pr, rc, rr)
    sw = None
    if policy_weights is not None:
        sw = _host(_vec(fn, "policy_weights", policy_weights, n), dtype)
    device = pc.device

    def run(inputs, grad_losses, need):
        host = [_host(x, dtype) for x in inputs]
        losses, cr, rj = (torch.empty(n, dtype=dtype) for _ in range(3))
        g = _grad_bufs(inputs, need, dtype, 4)
        gl = None if grad_losses is None else _host(grad_losses, dtype)
        _C.preference_loss(*host, types, weights, beta, label_smoothing, f_divergence_type,
                           f_alpha, tau, nw, nl, sw, losses, cr, rj, gl, *g)
        outs = (losses.to(device), cr.to(device), rj.to(device))
        return outs, _back(g, inputs)

    return _apply(run, (pc, pr, rc, rr))


#: TRL's name for the same function.
dpo_loss = preference_loss


def preference_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                       prefix: str = "") -> Dict[str, float]:
    """The reward metrics TRL's trainers log, from the rewards of :func:`preference_loss` (or
    any of the losses here): ``rewards/chosen`` and ``rewards/rejected`` (means),
    ``rewards/accuracies`` (fraction of pairs with chosen > rejected) and ``rewards/margins``
    (mean of chosen - rejected). ``prefix`` (e.g. ``"eval_"``) is prepended to the keys."""
    fn = "preference_metrics"
    c = _vec(fn, "chosen_rewards", chosen_rewards).detach()
    r = _vec(fn, "rejected_rewards", rejected_rewards, c.shape[0]).detach()
    return {
        f"{prefix}rewards/chosen": c.mean().item(),
        f"{prefix}rewards/rejected": r.mean().item(),
        f"{prefix}rewards/accuracies": (c > r).float().mean().item(),
        f"{prefix}rewards/margins": (c - r).mean().item(),
    }


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                   average: bool = False) -> torch.Tensor:
    """Per-sequence log-probability ``sum_t log softmax(logits[:, t])[labels[:, t]]`` over the
    tokens whose label is not ``ignore_index`` (``logits[:, t]`` predicts ``labels[:, t]``:
    already shifted), or its mean over those tokens with ``average=True``. ``[B, T, V]`` ->
    ``[B]``, differentiable, in the logits' dtype promoted to at least fp32."""
    mask = labels != ignore_index
    lp = _label_logps(logits, labels, mask)
    s = lp.sum(-1)
    return s / mask.sum(-1).clamp(min=1) if average else s


def _label_logps(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    x = logits if logits.dtype == torch.float64 else logits.float()
    idx = labels.masked_fill(~mask, 0).unsqueeze(-1)
    lp = torch.log_softmax(x, -1).gather(-1, idx).squeeze(-1)
    return lp * mask


def wpo_weights(logits: torch.Tensor, labels: torch.Tensor, *,
                ignore_index: int = -100) -> torch.Tensor:
    """WPO's per-sequence weight (Zhou et al. 2024, eq. 2, as TRL's ``use_weighting``):
    ``w = exp(mean_t [log p_t(y_t) - log sum_v p_t(v)^2])`` over completion tokens, without
    gradient. ``[B, T, V]``, labels ``[B, T]`` -> ``[B]``; pass ``w_chosen * w_rejected`` as
    ``policy_weights`` of :func:`preference_loss`."""
    with torch.no_grad():
        mask = labels != ignore_index
        x = logits if logits.dtype == torch.float64 else logits.float()
        logp = torch.log_softmax(x, -1)
        log_sum_sq = torch.logsumexp(2 * logp, -1)
        lp = logp.gather(-1, labels.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
        mean = ((lp - log_sum_sq) * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        return torch.exp(mean)


# ---------------------------------------------------------------------------------------------
# CPO / SimPO / AlphaPO, ORPO, KTO.
# ---------------------------------------------------------------------------------------------


def cpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, *,
             loss_type: str = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0,
             simpo_gamma: float = 0.5, alpha: float = 0.0
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CPO / SimPO / AlphaPO, reference-free, as TRL's ``CPOTrainer.cpo_loss``: returns
    ``(losses, chosen_rewards, rejected_rewards)``.

    r = logp, or AlphaPO's r = (1 - p^(-alpha)) / alpha when ``alpha != 0`` (Gupta et al. 2025);
    x = r_w - r_l. ``sigmoid`` (CPO, Xu et al. 2024): -(1-eps) logsig(beta x) - eps
    logsig(-beta x); ``hinge``: relu(1 - beta x); ``ipo``: (x - 1/(2 beta))^2; ``simpo`` (Meng et
    al. 2024): the sigmoid form on beta (x - simpo_gamma / beta). For simpo and ipo pass
    average log-probs (TRL does). CPO's behaviour-cloning term ``cpo_alpha * NLL(chosen)`` is
    added by the caller, as in TRL. Rewards: beta r_w, beta r_l (detached)."""
    fn = "cpo_loss"
    _check_str("loss_type", loss_type, fn)
    beta = _check_real("beta", beta, fn)
    eps = _check_real("label_smoothing", label_smoothing, fn)
    gamma = _check_real("simpo_gamma", simpo_gamma, fn)
    alpha = _check_real("alpha", alpha, fn)
    pc = _vec(fn, "policy_chosen_logps", policy_chosen_logps)
    n = pc.shape[0]
    pr = _vec(fn, "policy_rejected_logps", policy_rejected_logps, n)
    dtype, device = _compute_dtype(pc, pr), pc.device

    def run(inputs, grad_losses, need):
        host = [_host(x, dtype) for x in inputs]
        losses, cr, rj = (torch.empty(n, dtype=dtype) for _ in range(3))
        g = _grad_bufs(inputs, need, dtype, 2)
        gl = None if grad_losses is None else _host(grad_losses, dtype)
        _C.cpo_loss(*host, loss_type, beta, eps, gamma, alpha, losses, cr, rj, gl, *g)
        return (losses.to(device), cr.to(device), rj.to(device)), _back(g, inputs)

    return _apply(run, (pc, pr))


def simpo_loss(policy_chosen_logps, policy_rejected_logps, *, beta: float = 2.0,
               simpo_gamma: float = 0.5, label_smoothing: float = 0.0, alpha: float = 0.0):
    """SimPO (Meng et al. 2024): :func:`cpo_loss` with ``loss_type="simpo"`` on average
    log-probs; ``alpha != 0`` gives AlphaPO. Returns ``(losses, chosen_rewards,
    rejected_rewards)``."""
    return cpo_loss(policy_chosen_logps, policy_rejected_logps, loss_type="simpo", beta=beta,
                    simpo_gamma=simpo_gamma, label_smoothing=label_smoothing, alpha=alpha)


def odds_ratio_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, *,
                    beta: float = 0.1):
    """ORPO's odds-ratio term (Hong et al. 2024), as TRL's ``ORPOTrainer.odds_ratio_loss``:
    from average log-probs p_w, p_l < 0,
    ``log_odds = (p_w - p_l) - (log1mexp(p_w) - log1mexp(p_l))`` with log1mexp(x) = log(1 - e^x)
    (stable form), ``losses = beta * logsig(log_odds)``. Returns TRL's tuple ``(losses,
    chosen_rewards, rejected_rewards, mean(logsig(log_odds)), mean(log_odds))``; the ORPO loss is
    ``nll - losses.mean()`` (:func:`orpo_loss`)."""
    fn = "odds_ratio_loss"
    beta = _check_real("beta", beta, fn)
    pc = _vec(fn, "policy_chosen_logps", policy_chosen_logps)
    n = pc.shape[0]
    pr = _vec(fn, "policy_rejected_logps", policy_rejected_logps, n)
    dtype, device = _compute_dtype(pc, pr), pc.device

    def run(inputs, grad_losses, need):
        host = [_host(x, dtype) for x in inputs]
        losses, cr, rj, lo = (torch.empty(n, dtype=dtype) for _ in range(4))
        g = _grad_bufs(inputs, need, dtype, 2)
        gl = None if grad_losses is None else _host(grad_losses, dtype)
        _C.odds_ratio_loss(*host, beta, losses, cr, rj, lo, gl, *g)
        return (losses.to(device), cr.to(device), rj.to(device), lo.to(device)), _back(g, inputs)

    losses, cr, rj, lo = _apply(run, (pc, pr))
    return losses, cr, rj, torch.mean(losses.detach() / beta), torch.mean(lo)


def orpo_loss(policy_chosen_logps, policy_rejected_logps, policy_nll_loss, *, beta: float = 0.1):
    """The full ORPO loss ``policy_nll_loss - mean(beta * logsig(log_odds))`` (TRL's
    ``ORPOTrainer.get_batch_loss_metrics``); returns ``(loss, chosen_rewards,
    rejected_rewards)``."""
    losses, cr, rj, _, _ = odds_ratio_loss(policy_chosen_logps, policy_rejected_logps, beta=beta)
    return policy_nll_loss - losses.mean(), cr, rj


def kto_loss(policy_chosen_logps, policy_rejected_logps, policy_KL_logps,
             reference_chosen_logps, reference_rejected_logps, reference_KL_logps, *,
             beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
             loss_type: str = "kto"):
    """KTO (Ethayarajh et al. 2024), as TRL's ``KTOTrainer``: unpaired desirable (chosen,
    ``[Bc]``) and undesirable (rejected, ``[Br]``) examples; either may be empty.

    z0 = max(0, mean(policy_KL_logps - reference_KL_logps)) over mismatched completions y'
    (no gradient; ``None`` KL inputs give z0 = 0). ``kto``: desirable ``w_d (1 - sigma(beta
    (l_w - z0)))``, undesirable ``w_u (1 - sigma(beta (z0 - l_l)))``; ``apo_zero_unpaired``:
    ``w_d (1 - sigma(beta l_w))`` and ``w_u sigma(beta l_l)``. Returns ``(losses,
    chosen_rewards, rejected_rewards, kl)`` with ``losses`` ``[Bc + Br]`` (chosen first, as TRL
    concatenates them; TRL's loss is ``losses.nanmean()``) and kl = z0."""
    fn = "kto_loss"
    _check_str("loss_type", loss_type, fn)
    beta = _check_real("beta", beta, fn)
    wd = _check_real("desirable_weight", desirable_weight, fn)
    wu = _check_real("undesirable_weight", undesirable_weight, fn)
    pc = _vec(fn, "policy_chosen_logps", policy_chosen_logps, allow_empty=True)
    pr = _vec(fn, "policy_rejected_logps", policy_rejected_logps, allow_empty=True)
    rc = _vec(fn, "reference_chosen_logps", reference_chosen_logps, pc.shape[0], True)
    rr = _vec(fn, "reference_rejected_logps", reference_rejected_logps, pr.shape[0], True)
    if (policy_KL_logps is None) != (reference_KL_logps is None):
        raise ValueError(f"{fn}: policy_KL_logps and reference_KL_logps must be given together")
    dtype, device = _compute_dtype(pc, pr, rc, rr), pc.device
    pkl = rkl = None
    if policy_KL_logps is not None:
        pkl = _host(_vec(fn, "policy_KL_logps", policy_KL_logps, allow_empty=True), dtype)
        rkl = _host(_vec(fn, "reference_KL_logps", reference_KL_logps, pkl.shape[0], True), dtype)
    nc, nr = pc.shape[0], pr.shape[0]

    def run(inputs, grad_losses, need):
        h = [_host(x, dtype) for x in inputs]
        losses = torch.empty(nc + nr, dtype=dtype)
        cr, rj = torch.empty(nc, dtype=dtype), torch.empty(nr, dtype=dtype)
        kl = torch.empty(1, dtype=dtype)
        any_need = need is not None and any(need)
        g = [torch.empty(nc, dtype=dtype), torch.empty(nr, dtype=dtype)] if any_need else [None] * 2
        gl = None if grad_losses is None else _host(grad_losses, dtype)
        _C.kto_loss(h[0], h[1], pkl, h[2], h[3], rkl, loss_type, beta, wd, wu, losses, cr, rj, kl,
                    gl, *g)
        grads = None
        if any_need:  # the reference log-probs get the opposite of the policy's gradient
            grads = tuple((g[i % 2] if i < 2 else -g[i % 2]).to(device=inputs[i].device,
                                                                  dtype=inputs[i].dtype)
                          if need[i] else None for i in range(4))
        outs = (losses.to(device), cr.to(device), rj.to(device), kl.reshape(()).to(device))
        return outs, grads

    return _apply(run, (pc, pr, rc, rr))


# ---------------------------------------------------------------------------------------------
# D2O, HyPO, SuperHF (torch arithmetic on [B] / [B, K] tensors).
# ---------------------------------------------------------------------------------------------


def d2o_loss(policy_sample_logps: torch.Tensor, ref_sample_logps: torch.Tensor,
             policy_rejected_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, *,
             beta: float = 0.1, alpha: float = 0.1) -> Tuple[torch.Tensor, torch.Tensor,
                                                            torch.Tensor]:
    """D2O (Duan et al. 2024, "Negating Negatives"): K self-generated samples y_i against a
    human-annotated negative y_l,
    ``-logsig((beta/K) sum_i log(pi(y_i)/pi_ref-(y_i)) - alpha log(pi(y_l)/pi_ref+(y_l)))``.
    ``ref_sample_logps`` are under the reference the paper calls pi_ref- and
    ``ref_rejected_logps`` under pi_ref+ (the same model is a valid choice). The paper's official
    code was not found: this is its equation as described, not verified against an
    implementation. Shapes ``[B, K]``, ``[B, K]``, ``[B]``, ``[B]``; returns ``(losses,
    sample_rewards, rejected_rewards)`` with rewards ``(beta/K) sum_i log-ratio`` and
    ``alpha * log-ratio`` (detached). The arithmetic (fp64, log-sigmoid) and its gradient
    with respect to all four inputs run in divkit's C++ core (``include/divkit/rlhf.h``)."""
    fn = "d2o_loss"
    beta = _pos(fn, "beta", beta)
    alpha = _check_real("alpha", alpha, fn)
    ps, rs = _mat(fn, "policy_sample_logps", policy_sample_logps), ref_sample_logps
    if not isinstance(rs, torch.Tensor) or rs.shape != ps.shape:
        raise ValueError(f"{fn}: ref_sample_logps must have the shape of policy_sample_logps "
                         f"{tuple(ps.shape)}")
    b = ps.shape[0]
    pl = _vec(fn, "policy_rejected_logps", policy_rejected_logps, b)
    rl = _vec(fn, "ref_rejected_logps", ref_rejected_logps, b)
    dtype, device = _compute_dtype(ps, rs, pl, rl), ps.device

    def run(inputs, grad_out, need):
        h = [_host(x, dtype) for x in inputs]
        losses, pos, neg = (torch.empty(b, dtype=dtype) for _ in range(3))
        g = [None] * 4
        if need is not None:
            g = [torch.empty(x.shape, dtype=dtype) if need[i] else None
                 for i, x in enumerate(inputs)]
        go = None if grad_out is None else _host(grad_out, dtype)
        _C.d2o_loss(*h, beta, alpha, losses, pos, neg, go, *g)
        return (losses.to(device), pos.to(device), neg.to(device)), _back(g, inputs)

    return _apply(run, (ps, rs, pl, rl))


def hypo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
              policy_sample_logps: torch.Tensor, ref_sample_logps: torch.Tensor, *,
              beta: float = 0.1, lam: float = 0.01, loss_type: str = "sigmoid", **dpo_kwargs):
    """HyPO (Song et al. 2024, "The Importance of Online Data"): offline DPO on the preference
    pairs plus ``lam`` times an online estimate of KL(pi || pi_ref) on k >= 2 samples
    ``y_j ~ pi`` per prompt (``[B, k]`` sequence log-probs under the policy and the reference).

    The KL term's value is the Monte-Carlo estimate ``mean_j r_j``, r_j = log pi(y_j) - log
    pi_ref(y_j); its gradient is REINFORCE with a leave-one-out baseline,
    ``mean_j (r_j - mean_{i != j} r_i) grad log pi(y_j)`` (the samples are not reparameterized).
    Not verified against the authors' code. The online term runs in divkit's C++ core
    (``include/divkit/rlhf.h``, ``hypo_online_kl``). Returns ``(losses, chosen_rewards,
    rejected_rewards, kl)`` with ``losses = dpo_losses + lam * kl_surrogate`` per prompt."""
    fn = "hypo_loss"
    lam = _check_real("lam", lam, fn)
    losses, cr, rj = preference_loss(policy_chosen_logps, policy_rejected_logps,
                                     ref_chosen_logps, ref_rejected_logps, loss_type=loss_type,
                                     beta=beta, **dpo_kwargs)
    ps = _mat(fn, "policy_sample_logps", policy_sample_logps)
    if ps.shape[0] != losses.shape[0]:
        raise ValueError(f"{fn}: policy_sample_logps has {ps.shape[0]} rows for a batch of "
                         f"{losses.shape[0]} pairs; batch sizes disagree")
    k = ps.shape[1]
    if k < 2:
        raise ValueError(f"{fn}: policy_sample_logps needs k >= 2 samples per prompt for the "
                         f"leave-one-out baseline, got {k}")
    if not isinstance(ref_sample_logps, torch.Tensor) or ref_sample_logps.shape != ps.shape:
        raise ValueError(f"{fn}: ref_sample_logps must have the shape of policy_sample_logps")
    dtype, device = _compute_dtype(ps, ref_sample_logps), ps.device
    rs = ref_sample_logps.detach()

    def run(inputs, grad_out, need):
        # value: the Monte-Carlo KL; gradient: REINFORCE with the leave-one-out baseline.
        kl = torch.empty(ps.shape[0], dtype=dtype)
        g = torch.empty(ps.shape, dtype=dtype) if need is not None and need[0] else None
        go = None if grad_out is None else _host(grad_out, dtype)
        _C.hypo_online_kl(_host(inputs[0], dtype), _host(rs, dtype), kl, go, g)
        return (kl.to(device),), _back([g], inputs)

    (surrogate,) = _apply(run, (ps,))
    return losses + lam * surrogate.to(losses.dtype), cr, rj, surrogate.detach()


def superhf_loss(policy_logps: torch.Tensor, rewards: torch.Tensor, *, kl: Optional[torch.Tensor]
                 = None, ref_logps: Optional[torch.Tensor] = None, lengths=None,
                 kl_coef: float = 0.35, top_k: int = 1):
    """SuperHF (Mukobi et al. 2023): for each prompt, sample N completions, keep the ``top_k``
    by reward (``rewards`` ``[B, N]``) and train on them with a supervised loss plus a KL prior:
    ``loss = mean_kept(-log pi(y) / |y|) + kl_coef * mean_kept(KL_y)``.

    ``policy_logps`` ``[B, N]``: sequence log-probs under the policy (``lengths`` ``[B, N]``
    makes the NLL per token; default 1). ``kl`` ``[B, N]``: the KL(pi || pi_ref) of each
    completion, e.g. the sum over its tokens of :func:`divkit.rlhf.exact_kl`; when omitted it
    is estimated from ``ref_logps`` by k1 (log pi - log pi_ref). SuperHF's released code uses
    the exact per-token KL to the base model; ``kl_coef`` 0.35 follows its best reported run
    (not verified). The selection (descending reward, lower index first on ties), the loss and
    its gradient run in divkit's C++ core (``include/divkit/rlhf.h``). Returns ``(loss,
    kept_indices [B, top_k])``."""
    fn = "superhf_loss"
    lp = _mat(fn, "policy_logps", policy_logps)
    if not isinstance(rewards, torch.Tensor) or rewards.shape != lp.shape:
        raise ValueError(f"{fn}: rewards must have the shape of policy_logps {tuple(lp.shape)}")
    top_k = int(top_k)
    if not 1 <= top_k <= lp.shape[1]:
        raise ValueError(f"{fn}: top_k must be in [1, {lp.shape[1]}], got {top_k}")
    kl_coef = _check_real("kl_coef", kl_coef, fn)
    n = None if lengths is None else torch.as_tensor(lengths, dtype=lp.dtype)
    if n is not None and (n.shape != lp.shape or bool((n <= 0).any())):
        raise ValueError(f"{fn}: lengths must have the shape of policy_logps and be > 0")
    if kl is None:
        if ref_logps is None:
            raise ValueError(f"{fn}: give kl or ref_logps for the KL prior")
        kl = lp - ref_logps.detach()
    elif kl.shape != lp.shape:
        raise ValueError(f"{fn}: kl must have the shape of policy_logps {tuple(lp.shape)}")
    dtype, device = _compute_dtype(lp, kl), lp.device
    r_host = _host(rewards, torch.float64)
    n_host = None if n is None else _host(n, dtype)
    idx = torch.empty(lp.shape[0], top_k, dtype=torch.int64)

    def run(inputs, grad_out, need):
        loss = torch.empty(1, dtype=dtype)
        g = [None, None]
        if need is not None:
            g = [torch.empty(lp.shape, dtype=dtype) if need[i] else None for i in range(2)]
        go = None if grad_out is None else _host(grad_out.reshape(1), dtype)
        _C.superhf_loss(_host(inputs[0], dtype), r_host, _host(inputs[1], dtype), n_host,
                        kl_coef, top_k, loss, idx, go, *g)
        return (loss.reshape(()).to(device),), _back(g, inputs)

    (loss,) = _apply(run, (lp, kl))
    return loss, idx.to(device)


def _pos(fn, name, x) -> float:
    v = _check_real(name, x, fn)
    if not (v > 0 and math.isfinite(v)):
        raise _C.Error(f"{fn}: {name} must be a finite number > 0, got {v:g}")
    return v


def _mat(fn, name, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"{fn}: {name} must be a 2-D float tensor [B, K]")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{fn}: {name} is empty")
    return x


# ---------------------------------------------------------------------------------------------
# Token-level: TDPO and SparsePO from logits.
# ---------------------------------------------------------------------------------------------


def token_logratio_and_kl(policy_logits: Optional[torch.Tensor], ref_logits: Optional[torch.Tensor],
                          labels: torch.Tensor, *, ignore_index: int = -100,
                          kl_grad: bool = True, policy_hidden: Optional[torch.Tensor] = None,
                          lm_head_weight: Optional[torch.Tensor] = None,
                          lm_head_bias: Optional[torch.Tensor] = None,
                          ref_hidden: Optional[torch.Tensor] = None,
                          ref_weight: Optional[torch.Tensor] = None,
                          ref_bias: Optional[torch.Tensor] = None,
                          chunk_size: Optional[int] = None,
                          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-token quantities of the token-level losses, with (already shifted) labels
    ``[B, T]``:

    - ``logratio[b, t] = log pi(y_t) - log pi_ref(y_t)`` for the label token, and
    - ``kl[b, t] = KL(pi_ref || pi) = sum_v p_ref(v) (log p_ref(v) - log pi(v))`` (the policy is
      the student and the reference the teacher of divkit's ``forward_kl``, which is
      KL(teacher || student)); with ``kl_grad=False`` computed from the detached policy
      (TDPO2's stop-gradient),

    both 0 where ``labels == ignore_index``, and the mask ``[B, T]``.

    Logits path: ``policy_logits`` and ``ref_logits`` ``[B, T, V]`` (a log-softmax gather and
    :func:`divkit.divergence`). Fused path (``policy_logits=None``): the policy as
    ``policy_hidden [B, T, H]`` + ``lm_head_weight [V, H]`` (+ ``lm_head_bias``), never
    materializing its ``[tokens x V]`` logits: log pi(y) by :func:`divkit.fused_linear_logprobs`
    and the KL by :func:`divkit.rlhf.exact_kl_fused`; the reference either as ``ref_logits``
    or as ``ref_hidden [B, T, H_ref]`` + ``ref_weight [V, H_ref]`` (+ ``ref_bias``), the latter
    fully fused (both heads in one C++ kernel). ``chunk_size`` bounds the tokens per chunk of
    the fused path. Gradients reach every input that requires grad; fp32 results (fp64 for fp64
    logits on the logits path)."""
    fn = "token_logratio_and_kl"
    if policy_hidden is not None or policy_logits is None:
        return _fused_token_terms(fn, policy_hidden, lm_head_weight, lm_head_bias, ref_logits,
                                  ref_hidden, ref_weight, ref_bias, labels, ignore_index,
                                  kl_grad, chunk_size)
    if policy_logits.dim() != 3 or ref_logits is None or ref_logits.shape != policy_logits.shape:
        raise ValueError(f"{fn}: policy and reference logits must both be [B, T, V] of one "
                         f"shape, got {tuple(policy_logits.shape)} and "
                         f"{None if ref_logits is None else tuple(ref_logits.shape)}")
    if labels.shape != policy_logits.shape[:2]:
        raise ValueError(f"{fn}: labels must have shape {tuple(policy_logits.shape[:2])} (the "
                         f"logits' [B, T]), got {tuple(labels.shape)}")
    mask = labels != ignore_index
    logratio = _label_logps(policy_logits, labels, mask) - _label_logps(ref_logits, labels, mask)
    student = policy_logits if kl_grad else policy_logits.detach()
    kl = divergence(student, ref_logits, "forward_kl", labels=labels, ignore_index=ignore_index,
                    reduction="none")
    return logratio, kl.to(logratio.dtype) * mask, mask


def _fused_token_terms(fn, h, w, b, ref_logits, rh, rw, rb, labels, ignore_index, kl_grad,
                       chunk_size):
    from . import rlhf
    if not isinstance(h, torch.Tensor) or h.dim() != 3:
        raise ValueError(f"{fn}: policy hidden states must be a [B, T, H] tensor (or give "
                         f"policy_logits)")
    if w is None:
        raise ValueError(f"{fn}: lm_head_weight is required with policy hidden states")
    rlhf._check_head(fn, h, w, ref_logits, rh, rw, labels)
    mask = labels != ignore_index
    lp = fused_linear_logprobs(h, w, labels, b, ignore_index=ignore_index,
                               chunk_size=chunk_size)
    if ref_logits is None:
        ref_lp = fused_linear_logprobs(rh, rw, labels, rb, ignore_index=ignore_index,
                                       chunk_size=chunk_size)
    else:
        ref_lp = _label_logps(ref_logits, labels, mask).float()
    hk, wk, bk = (h, w, b) if kl_grad else (h.detach(), w.detach(),
                                             None if b is None else b.detach())
    kl = rlhf.exact_kl_fused(hk, wk, lm_head_bias=bk, ref_logits=ref_logits, ref_hidden=rh,
                             ref_weight=rw, ref_bias=rb, labels=labels, ignore_index=ignore_index,
                             direction="ref_policy", chunk_size=chunk_size)
    return (lp.float() - ref_lp) * mask, kl.float() * mask, mask


def _token_inputs(fn, pcl, prl, rcl, rrl, cl, rl):
    for name, x in (("policy_chosen_logits", pcl), ("policy_rejected_logits", prl),
                    ("ref_chosen_logits", rcl), ("ref_rejected_logits", rrl)):
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            raise ValueError(f"{fn}: {name} must be a [B, T, V] tensor")
    if prl.shape[0] != pcl.shape[0]:
        raise ValueError(f"{fn}: policy_rejected_logits has batch size {prl.shape[0]}, "
                         f"policy_chosen_logits {pcl.shape[0]}; batch sizes disagree")
    if pcl.shape[0] == 0:
        raise ValueError(f"{fn}: the batch is empty")


def tdpo_loss(policy_chosen_logits, policy_rejected_logits, ref_chosen_logits,
              ref_rejected_logits, chosen_labels, rejected_labels, *, beta: float = 0.1,
              alpha: float = 0.5, variant: str = "tdpo2", ignore_index: int = -100,
              label_smoothing: float = 0.0):
    """Token-level DPO (Zeng et al. 2024; official code Vance0124/Token-level-Direct-Preference-
    Optimization). Returns ``(losses, chosen_rewards, rejected_rewards)``, each ``[B]``.

    Per completion token (``logits[:, t]`` predicts ``labels[:, t]``; -100 marks prompt and
    padding), ``KL_t = KL(pi_ref || pi_theta)`` over the vocabulary (the reference first: the
    official code's direction), ``SeqKL = sum_t KL_t``; ``D = sum_t log-ratio(chosen) - sum_t
    log-ratio(rejected)``. ``tdpo1``: ``logits = D - (SeqKL_l - SeqKL_w)``; ``tdpo2``: ``logits =
    D - alpha (SeqKL_l - stopgrad(SeqKL_w))``; loss ``-logsig(beta logits)`` (label smoothing
    as cDPO). Rewards ``beta (sum log-ratio + SeqKL)``, detached, as the official code logs
    them. The per-token quantities come from :func:`token_logratio_and_kl` (the KL from
    divkit's fused token kernel); the sequence-level arithmetic from :func:`preference_loss`.
    Logits fp32, bf16, fp16 or fp64."""
    fn = "tdpo_loss"
    _token_inputs(fn, policy_chosen_logits, policy_rejected_logits, ref_chosen_logits,
                  ref_rejected_logits, chosen_labels, rejected_labels)
    variant, beta, alpha = _tdpo_variant(fn, variant, beta, alpha)
    lr_w, kl_w, _ = token_logratio_and_kl(policy_chosen_logits, ref_chosen_logits, chosen_labels,
                                          ignore_index=ignore_index, kl_grad=variant == "tdpo1")
    lr_l, kl_l, _ = token_logratio_and_kl(policy_rejected_logits, ref_rejected_logits,
                                          rejected_labels, ignore_index=ignore_index)
    return _tdpo_combine(lr_w, kl_w, lr_l, kl_l, beta, alpha, label_smoothing)


def _tdpo_variant(fn, variant, beta, alpha):
    variant = _check_str("variant", variant, fn)
    if variant not in ("tdpo1", "tdpo2"):
        raise ValueError(f"{fn}: unknown variant '{variant}' (valid: tdpo1, tdpo2)")
    beta = _pos(fn, "beta", beta)
    alpha = _check_real("alpha", alpha, fn) if variant == "tdpo2" else 1.0
    return variant, beta, alpha


def _tdpo_combine(lr_w, kl_w, lr_l, kl_l, beta, alpha, label_smoothing):
    lw, ll = lr_w.sum(-1), lr_l.sum(-1)
    kw, kr = kl_w.sum(-1), kl_l.sum(-1)
    # logits = (lw + alpha kw) - (ll + alpha kr): the DPO sigmoid loss of these "log-ratios".
    zeros = torch.zeros_like(lw)
    losses, _, _ = preference_loss(lw + alpha * kw, ll + alpha * kr, zeros, zeros, beta=beta,
                                   label_smoothing=label_smoothing)
    return losses, (beta * (lw + kw)).detach(), (beta * (ll + kr)).detach()


def sparsepo_loss(policy_chosen_logits, policy_rejected_logits, ref_chosen_logits,
                  ref_rejected_logits, chosen_labels, rejected_labels, *,
                  chosen_reward_mask=None, rejected_reward_mask=None, chosen_kl_mask=None,
                  rejected_kl_mask=None, beta: float = 0.1, l1_reward: float = 0.0,
                  l1_kl: float = 0.0, ignore_index: int = -100):
    """SparsePO (Christopoulou et al. 2024; huawei-noah/HEBO, SparsePO): token masks weight
    the reward and the KL of each completion token. Returns ``(losses, chosen_rewards,
    rejected_rewards)``.

    ``u = sum_t m^r_t (log pi_t - log pi_ref,t)`` per response, u = u_w - u_l;
    ``d_t = -m^kl_t KL_t(pi_ref || pi)``, d = sum d_w - sum d_l; loss
    ``-logsig(beta (u - d)) + l1_reward (|m^r_w|_1 + |m^r_l|_1) + l1_kl (|m^kl_w|_1 +
    |m^kl_l|_1)`` (L1 over completion tokens). Masks ``[B, T]`` (tensors, possibly with
    gradient, e.g. from :class:`SparsePOMask`); ``None`` means all ones, which gives TDPO1.
    Rewards ``beta (u_w - d_w)``, ``beta (u_l - d_l)`` (detached)."""
    fn = "sparsepo_loss"
    _token_inputs(fn, policy_chosen_logits, policy_rejected_logits, ref_chosen_logits,
                  ref_rejected_logits, chosen_labels, rejected_labels)
    beta = _pos(fn, "beta", beta)
    l1_reward = _check_real("l1_reward", l1_reward, fn)
    l1_kl = _check_real("l1_kl", l1_kl, fn)
    lr_w, kl_w, m_w = token_logratio_and_kl(policy_chosen_logits, ref_chosen_logits,
                                            chosen_labels, ignore_index=ignore_index)
    lr_l, kl_l, m_l = token_logratio_and_kl(policy_rejected_logits, ref_rejected_logits,
                                            rejected_labels, ignore_index=ignore_index)
    return _sparsepo_combine(fn, lr_w, kl_w, m_w, lr_l, kl_l, m_l, chosen_reward_mask,
                             rejected_reward_mask, chosen_kl_mask, rejected_kl_mask, beta,
                             l1_reward, l1_kl)


def _sparsepo_combine(fn, lr_w, kl_w, m_w, lr_l, kl_l, m_l, chosen_reward_mask,
                      rejected_reward_mask, chosen_kl_mask, rejected_kl_mask, beta, l1_reward,
                      l1_kl):

    def mask(name, m, ref):
        if m is None:
            return torch.ones_like(ref)
        if not isinstance(m, torch.Tensor) or m.shape != ref.shape:
            raise ValueError(f"{fn}: {name} must be a tensor of shape {tuple(ref.shape)}")
        return m.to(ref.dtype)

    mr_w, mr_l = mask("chosen_reward_mask", chosen_reward_mask, lr_w), mask(
        "rejected_reward_mask", rejected_reward_mask, lr_l)
    mk_w, mk_l = mask("chosen_kl_mask", chosen_kl_mask, lr_w), mask(
        "rejected_kl_mask", rejected_kl_mask, lr_l)
    u_w, u_l = (mr_w * lr_w).sum(-1), (mr_l * lr_l).sum(-1)
    d_w, d_l = -(mk_w * kl_w).sum(-1), -(mk_l * kl_l).sum(-1)
    zeros = torch.zeros_like(u_w)
    losses, _, _ = preference_loss(u_w - d_w, u_l - d_l, zeros, zeros, beta=beta)
    l1 = l1_reward * ((mr_w.abs() * m_w).sum(-1) + (mr_l.abs() * m_l).sum(-1)) + l1_kl * (
        (mk_w.abs() * m_w).sum(-1) + (mk_l.abs() * m_l).sum(-1))
    return losses + l1, (beta * (u_w - d_w)).detach(), (beta * (u_l - d_l)).detach()


def _fused_pair(fn, policy_chosen_hidden, policy_rejected_hidden, lm_head_weight, chosen_labels,
                rejected_labels, ref_chosen_logits, ref_rejected_logits, ref_chosen_hidden,
                ref_rejected_hidden, ref_weight, lm_head_bias, ref_bias, ignore_index,
                chunk_size, chosen_kl_grad):
    for name, x in (("policy_chosen_hidden", policy_chosen_hidden),
                    ("policy_rejected_hidden", policy_rejected_hidden)):
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            raise ValueError(f"{fn}: {name} must be a [B, T, H] tensor")
    if policy_rejected_hidden.shape[0] != policy_chosen_hidden.shape[0]:
        raise ValueError(f"{fn}: policy_rejected_hidden has batch size "
                         f"{policy_rejected_hidden.shape[0]}, policy_chosen_hidden "
                         f"{policy_chosen_hidden.shape[0]}; batch sizes disagree")
    if policy_chosen_hidden.shape[0] == 0:
        raise ValueError(f"{fn}: the batch is empty")
    if (ref_chosen_logits is None) != (ref_rejected_logits is None) or \
            (ref_chosen_hidden is None) != (ref_rejected_hidden is None):
        raise ValueError(f"{fn}: give the reference for both the chosen and the rejected side")
    common = dict(lm_head_weight=lm_head_weight, lm_head_bias=lm_head_bias, ref_weight=ref_weight,
                  ref_bias=ref_bias, ignore_index=ignore_index, chunk_size=chunk_size)
    w = token_logratio_and_kl(None, ref_chosen_logits, chosen_labels,
                              policy_hidden=policy_chosen_hidden, ref_hidden=ref_chosen_hidden,
                              kl_grad=chosen_kl_grad, **common)
    l_ = token_logratio_and_kl(None, ref_rejected_logits, rejected_labels,
                               policy_hidden=policy_rejected_hidden,
                               ref_hidden=ref_rejected_hidden, **common)
    return w, l_


def tdpo_loss_fused(policy_chosen_hidden, policy_rejected_hidden, lm_head_weight, chosen_labels,
                    rejected_labels, *, ref_chosen_logits=None, ref_rejected_logits=None,
                    ref_chosen_hidden=None, ref_rejected_hidden=None, ref_weight=None,
                    lm_head_bias=None, ref_bias=None, beta: float = 0.1, alpha: float = 0.5,
                    variant: str = "tdpo2", ignore_index: int = -100,
                    label_smoothing: float = 0.0, chunk_size: Optional[int] = None):
    """:func:`tdpo_loss` fused with the policy's lm_head: the policy is given as hidden states
    ``policy_chosen_hidden``, ``policy_rejected_hidden`` ``[B, T, H]`` and ``lm_head_weight``
    ``[V, H]`` (+ ``lm_head_bias``), and its ``[tokens x V]`` logits are never materialized.
    The reference is given either as logits (``ref_chosen_logits``, ``ref_rejected_logits``
    ``[B, T, V]``) or as hidden states (``ref_chosen_hidden``, ``ref_rejected_hidden``
    ``[B, T, H_ref]``) with ``ref_weight [V, H_ref]`` (+ ``ref_bias``); the latter fuses both
    heads in one C++ kernel. Same formula as :func:`tdpo_loss` (TDPO1/TDPO2 of Zeng et al. 2024:
    per-token KL(pi_ref || pi_theta) summed over completion tokens, TDPO2 with ``alpha`` and the
    stop-gradient on the chosen KL) and the same ``(losses, chosen_rewards, rejected_rewards)``;
    equal to :func:`tdpo_loss` on the materialized logits ``hidden @ weight.T`` up to fp32
    rounding. Gradients reach the hidden states, the weight and bias (and the reference inputs
    if they require grad). Per-token terms from :func:`token_logratio_and_kl`'s fused path;
    ``chunk_size`` tokens per chunk (default ~64 MiB of logits). Hidden states fp32, bf16,
    fp16 or fp64; arithmetic in fp32 (sequence level in fp64)."""
    fn = "tdpo_loss_fused"
    variant, beta, alpha = _tdpo_variant(fn, variant, beta, alpha)
    (lr_w, kl_w, _), (lr_l, kl_l, _) = _fused_pair(
        fn, policy_chosen_hidden, policy_rejected_hidden, lm_head_weight, chosen_labels,
        rejected_labels, ref_chosen_logits, ref_rejected_logits, ref_chosen_hidden,
        ref_rejected_hidden, ref_weight, lm_head_bias, ref_bias, ignore_index, chunk_size,
        variant == "tdpo1")
    return _tdpo_combine(lr_w, kl_w, lr_l, kl_l, beta, alpha, label_smoothing)


def sparsepo_loss_fused(policy_chosen_hidden, policy_rejected_hidden, lm_head_weight,
                        chosen_labels, rejected_labels, *, ref_chosen_logits=None,
                        ref_rejected_logits=None, ref_chosen_hidden=None,
                        ref_rejected_hidden=None, ref_weight=None, lm_head_bias=None,
                        ref_bias=None, chosen_reward_mask=None, rejected_reward_mask=None,
                        chosen_kl_mask=None, rejected_kl_mask=None, beta: float = 0.1,
                        l1_reward: float = 0.0, l1_kl: float = 0.0, ignore_index: int = -100,
                        chunk_size: Optional[int] = None):
    """:func:`sparsepo_loss` fused with the policy's lm_head (SparsePO, Christopoulou et al.
    2024): the policy and reference are given as in :func:`tdpo_loss_fused`, the masks and
    L1 penalties as in :func:`sparsepo_loss`; ``loss = -logsig(beta (u - d)) + L1`` with
    ``u = sum_t m^r_t log-ratio_t`` and ``d_t = -m^kl_t KL_t(pi_ref || pi)``. Never
    materializes the policy's ``[tokens x V]`` logits; equals :func:`sparsepo_loss` on the
    materialized logits up to fp32 rounding. Returns ``(losses, chosen_rewards,
    rejected_rewards)``."""
    fn = "sparsepo_loss_fused"
    beta = _pos(fn, "beta", beta)
    l1_reward = _check_real("l1_reward", l1_reward, fn)
    l1_kl = _check_real("l1_kl", l1_kl, fn)
    (lr_w, kl_w, m_w), (lr_l, kl_l, m_l) = _fused_pair(
        fn, policy_chosen_hidden, policy_rejected_hidden, lm_head_weight, chosen_labels,
        rejected_labels, ref_chosen_logits, ref_rejected_logits, ref_chosen_hidden,
        ref_rejected_hidden, ref_weight, lm_head_bias, ref_bias, ignore_index, chunk_size, True)
    return _sparsepo_combine(fn, lr_w, kl_w, m_w, lr_l, kl_l, m_l, chosen_reward_mask,
                             rejected_reward_mask, chosen_kl_mask, rejected_kl_mask, beta,
                             l1_reward, l1_kl)


class SparsePOMask(nn.Module):
    """SparsePO's mask model (huawei-noah/HEBO, SparsePO): on the reference model's hidden states
    of L layers, per layer LayerNorm -> Linear(H, 1) -> ReLU -> Dropout, then a Linear(L, 1)
    mixer -> ReLU, giving a non-negative mask per token. ``shared=True`` uses one mask for the
    reward and the KL; otherwise two heads. ``forward(hidden_states)`` takes a sequence of L
    tensors ``[B, T, H]`` and returns ``(reward_mask, kl_mask)``, each ``[B, T]``."""

    def __init__(self, hidden_size: int, num_layers: int, *, dropout: float = 0.1,
                 shared: bool = False):
        super().__init__()
        heads = 1 if shared else 2

        def head():
            return nn.ModuleDict({
                "per_layer": nn.ModuleList(nn.Sequential(nn.LayerNorm(hidden_size),
                                                         nn.Linear(hidden_size, 1), nn.ReLU(),
                                                         nn.Dropout(dropout))
                                           for _ in range(num_layers)),
                "mix": nn.Linear(num_layers, 1),
            })

        self.heads = nn.ModuleList(head() for _ in range(heads))
        self.num_layers = num_layers

    def forward(self, hidden_states: Sequence[torch.Tensor]):
        if len(hidden_states) != self.num_layers:
            raise ValueError(f"SparsePOMask: expected {self.num_layers} hidden-state tensors, got "
                             f"{len(hidden_states)}")
        masks = []
        for h in self.heads:
            per = torch.cat([f(x.detach()) for f, x in zip(h["per_layer"], hidden_states)], -1)
            masks.append(torch.relu(h["mix"](per)).squeeze(-1))
        return (masks[0], masks[0]) if len(masks) == 1 else (masks[0], masks[1])
