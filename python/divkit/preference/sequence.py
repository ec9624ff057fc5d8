"""Sequence-level preference losses: the DPO family with every TRL loss type, f-DPO, cDPO, WPO,
CPO / SimPO / AlphaPO, ORPO, KTO, D2O, HyPO and SuperHF.

Names and arguments follow TRL; the arithmetic on the ``[B]`` (or ``[B, K]``) log-prob vectors and
its gradients run in divkit's C++ core in fp64 (``include/divkit/preference.h``,
``include/divkit/rlhf.h``); see :mod:`divkit.preference` for the notation.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import torch

from .. import _C, _ops
from .. import _validate as check
from .._autograd import recompute_in_backward
from . import _common as common

__all__ = [
    "LOSS_TYPES",
    "F_DIVERGENCE_TYPES",
    "preference_loss",
    "dpo_loss",
    "preference_metrics",
    "sequence_logps",
    "wpo_weights",
    "cpo_loss",
    "simpo_loss",
    "odds_ratio_loss",
    "orpo_loss",
    "kto_loss",
    "d2o_loss",
    "hypo_loss",
    "superhf_loss",
]

#: loss_type names of :func:`preference_loss`, in the core's order.
LOSS_TYPES: Tuple[str, ...] = tuple(_C.preference_loss_types())
#: f_divergence_type names (f-DPO).
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


# ---------------------------------------------------------------------------------------------
# DPO family.
# ---------------------------------------------------------------------------------------------


@check.public("preference_loss")
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
    ``a = f_alpha_divergence_coef`` (a = 1 is reverse_kl); the exponents of forward_kl and
    alpha_divergence are clamped at 80 (s constant and ds/dl = 0 beyond), and
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
        check.string(fn, "loss_type", t)
    if loss_weights is None:
        weights = [1.0] * len(types)
    else:
        weights = [check.real(fn, "loss_weights", w) for w in loss_weights]
        if len(weights) != len(types):
            check.fail(fn, f"loss_weights has {len(weights)} entries for {len(types)} loss types")
    beta = check.real(fn, "beta", beta)
    label_smoothing = check.real(fn, "label_smoothing", label_smoothing)
    f_alpha = check.real(fn, "f_alpha_divergence_coef", f_alpha_divergence_coef)
    tau = check.real(fn, "discopop_tau", discopop_tau)
    check.string(fn, "f_divergence_type", f_divergence_type)
    pc = check.vector(fn, "policy_chosen_logps", policy_chosen_logps)
    n = pc.shape[0]
    pr = check.vector(fn, "policy_rejected_logps", policy_rejected_logps, n)
    rc = check.vector(fn, "ref_chosen_logps", ref_chosen_logps, n)
    rr = check.vector(fn, "ref_rejected_logps", ref_rejected_logps, n)
    nw = check.lengths(fn, "chosen_lengths", chosen_lengths, n)
    nl = check.lengths(fn, "rejected_lengths", rejected_lengths, n)
    dtype = common.compute_dtype(pc, pr, rc, rr)
    sw = None
    if policy_weights is not None:
        sw = common.host(check.vector(fn, "policy_weights", policy_weights, n), dtype)
    if _ops.use_ops(pc, pr, rc, rr, fn=fn):
        return _ops.preference_loss(
            pc, pr, rc, rr, nw, nl, sw, types, weights, beta, label_smoothing,
            f_divergence_type, f_alpha, tau,
        )  # fmt: skip
    device = pc.device

    def run(inputs, grad_losses, need):
        # Built per call, not captured: a loss kept alive until interpreter exit would otherwise
        # hold a nanobind instance past the module's teardown (nanobind reports it as a leak).
        args = _C.PreferenceArgs(
            loss_types=types,
            loss_weights=weights,
            beta=beta,
            label_smoothing=label_smoothing,
            f_divergence_type=f_divergence_type,
            f_alpha_divergence_coef=f_alpha,
            discopop_tau=tau,
        )
        host = [common.host(x, dtype) for x in inputs]
        losses, cr, rj = (torch.empty(n, dtype=dtype) for _ in range(3))
        g = common.grad_bufs(inputs, need, dtype, 4)
        gl = None if grad_losses is None else common.host(grad_losses, dtype)
        _C.preference_loss(*host, args, nw, nl, sw, losses, cr, rj, gl, *g)
        outs = (losses.to(device), cr.to(device), rj.to(device))
        return outs, common.back(g, inputs)

    return recompute_in_backward(run, (pc, pr, rc, rr), fn=fn)


#: TRL's name for the same function.
dpo_loss = preference_loss


@check.public("preference_metrics", finite_args=("chosen_rewards", "rejected_rewards"))
def preference_metrics(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, prefix: str = ""
) -> Dict[str, float]:
    """The reward metrics TRL's trainers log, from the rewards of :func:`preference_loss` (or
    any of the losses here): ``rewards/chosen`` and ``rewards/rejected`` (means),
    ``rewards/accuracies`` (fraction of pairs with chosen > rejected) and ``rewards/margins``
    (mean of chosen - rejected). ``prefix`` (e.g. ``"eval_"``) is prepended to the keys."""
    fn = "preference_metrics"
    c = check.vector(fn, "chosen_rewards", chosen_rewards).detach()
    r = check.vector(fn, "rejected_rewards", rejected_rewards, c.shape[0]).detach()
    return {
        f"{prefix}rewards/chosen": c.mean().item(),
        f"{prefix}rewards/rejected": r.mean().item(),
        f"{prefix}rewards/accuracies": (c > r).float().mean().item(),
        f"{prefix}rewards/margins": (c - r).mean().item(),
    }


@check.public("sequence_logps", logits_args=("logits",))
def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100, average: bool = False
) -> torch.Tensor:
    """Per-sequence log-probability ``sum_t log softmax(logits[:, t])[labels[:, t]]`` over the
    tokens whose label is not ``ignore_index`` (``logits[:, t]`` predicts ``labels[:, t]``:
    already shifted), or its mean over those tokens with ``average=True``. ``[B, T, V]`` ->
    ``[B]``, differentiable, in the logits' dtype promoted to at least fp32."""
    labels, mask = _token_labels("sequence_logps", logits, labels, ignore_index)
    average = check.boolean("sequence_logps", "average", average)
    lp = common.label_logps(logits, labels, mask)
    s = lp.sum(-1)
    return s / mask.sum(-1).clamp(min=1) if average else s


def _token_labels(fn: str, logits, labels, ignore_index):
    """Checks logits ``[B, T, V]`` (any number of leading dimensions) and labels of shape
    ``logits.shape[:-1]`` in [0, V) or ignore_index; returns (labels, mask)."""
    logits = check.logits(fn, "logits", logits, cpu=False)
    if logits.dim() < 2:
        check.fail(fn, f"logits must be [B, T, V] (at least 2-D), got shape {tuple(logits.shape)}")
    ii = check.integer(fn, "ignore_index", ignore_index)
    lab = check.labels(
        fn,
        labels,
        logits.shape[:-1],
        required=True,
        cpu=False,
        vocab=logits.shape[-1],
        ignore_index=ii,
    ).reshape(logits.shape[:-1])
    return lab.to(torch.int64), lab != ii


@check.public("wpo_weights", logits_args=("logits",))
def wpo_weights(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100
) -> torch.Tensor:
    """WPO's per-sequence weight (Zhou et al. 2024, eq. 2, as TRL's ``use_weighting``):
    ``w = exp(mean_t [log p_t(y_t) - log sum_v p_t(v)^2])`` over completion tokens, without
    gradient. ``[B, T, V]``, labels ``[B, T]`` -> ``[B]``; pass ``w_chosen * w_rejected`` as
    ``policy_weights`` of :func:`preference_loss`."""
    labels, mask = _token_labels("wpo_weights", logits, labels, ignore_index)
    with torch.no_grad():
        x = logits if logits.dtype == torch.float64 else logits.float()
        logp = torch.log_softmax(x, -1)
        log_sum_sq = torch.logsumexp(2 * logp, -1)
        lp = logp.gather(-1, labels.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
        mean = ((lp - log_sum_sq) * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        return torch.exp(mean)


# ---------------------------------------------------------------------------------------------
# CPO / SimPO / AlphaPO, ORPO, KTO.
# ---------------------------------------------------------------------------------------------


@check.public("cpo_loss")
def cpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    *,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    alpha: float = 0.0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CPO / SimPO / AlphaPO, reference-free, as TRL's ``CPOTrainer.cpo_loss``: returns
    ``(losses, chosen_rewards, rejected_rewards)``.

    r = logp, or AlphaPO's r = (1 - p^(-alpha)) / alpha when ``alpha != 0`` (Gupta et al. 2025;
    the exponent -alpha logp is clamped at 80: r constant and dr/dlogp = 0 beyond);
    x = r_w - r_l. ``sigmoid`` (CPO, Xu et al. 2024): -(1-eps) logsig(beta x) - eps
    logsig(-beta x); ``hinge``: relu(1 - beta x); ``ipo``: (x - 1/(2 beta))^2; ``simpo`` (Meng et
    al. 2024): the sigmoid form on beta (x - simpo_gamma / beta). For simpo and ipo pass
    average log-probs (TRL does). CPO's behaviour-cloning term ``cpo_alpha * NLL(chosen)`` is
    added by the caller, as in TRL. Rewards: beta r_w, beta r_l (detached)."""
    fn = "cpo_loss"
    check.string(fn, "loss_type", loss_type)
    beta = check.real(fn, "beta", beta)
    eps = check.real(fn, "label_smoothing", label_smoothing)
    gamma = check.real(fn, "simpo_gamma", simpo_gamma)
    alpha = check.real(fn, "alpha", alpha)
    pc = check.vector(fn, "policy_chosen_logps", policy_chosen_logps)
    n = pc.shape[0]
    pr = check.vector(fn, "policy_rejected_logps", policy_rejected_logps, n)
    if _ops.use_ops(pc, pr, fn=fn):
        return _ops.cpo_loss(pc, pr, loss_type, beta, eps, gamma, alpha)
    dtype, device = common.compute_dtype(pc, pr), pc.device

    def run(inputs, grad_losses, need):
        # Built per call, not captured: see preference_loss (a nanobind instance held by a loss
        # alive at interpreter exit is reported as a leak).
        args = _C.CpoArgs(
            loss_type=loss_type, beta=beta, label_smoothing=eps, simpo_gamma=gamma, alpha=alpha
        )
        host = [common.host(x, dtype) for x in inputs]
        losses, cr, rj = (torch.empty(n, dtype=dtype) for _ in range(3))
        g = common.grad_bufs(inputs, need, dtype, 2)
        gl = None if grad_losses is None else common.host(grad_losses, dtype)
        _C.cpo_loss(*host, args, losses, cr, rj, gl, *g)
        return (losses.to(device), cr.to(device), rj.to(device)), common.back(g, inputs)

    return recompute_in_backward(run, (pc, pr), fn=fn)


@check.public("simpo_loss")
def simpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    *,
    beta: float = 2.0,
    simpo_gamma: float = 0.5,
    label_smoothing: float = 0.0,
    alpha: float = 0.0,
):
    """SimPO (Meng et al. 2024): :func:`cpo_loss` with ``loss_type="simpo"`` on average
    log-probs; ``alpha != 0`` gives AlphaPO. Returns ``(losses, chosen_rewards,
    rejected_rewards)``."""
    return cpo_loss(
        policy_chosen_logps,
        policy_rejected_logps,
        loss_type="simpo",
        beta=beta,
        simpo_gamma=simpo_gamma,
        label_smoothing=label_smoothing,
        alpha=alpha,
    )


@check.public("odds_ratio_loss")
def odds_ratio_loss(
    policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, *, beta: float = 0.1
):
    """ORPO's odds-ratio term (Hong et al. 2024), as TRL's ``ORPOTrainer.odds_ratio_loss``:
    from average log-probs p_w, p_l < 0,
    ``log_odds = (p_w - p_l) - (log1mexp(p_w) - log1mexp(p_l))`` with log1mexp(x) = log(1 - e^x)
    (stable form), ``losses = beta * logsig(log_odds)``. Returns TRL's tuple ``(losses,
    chosen_rewards, rejected_rewards, mean(logsig(log_odds)), mean(log_odds))``; the ORPO loss is
    ``nll - losses.mean()`` (:func:`orpo_loss`)."""
    fn = "odds_ratio_loss"
    beta = check.real(fn, "beta", beta)
    pc = check.vector(fn, "policy_chosen_logps", policy_chosen_logps)
    n = pc.shape[0]
    pr = check.vector(fn, "policy_rejected_logps", policy_rejected_logps, n)
    dtype, device = common.compute_dtype(pc, pr), pc.device
    if _ops.use_ops(pc, pr, fn=fn):
        losses, cr, rj, lo = _ops.odds_ratio_loss(pc, pr, beta)
        return losses, cr, rj, torch.mean(losses.detach() / beta), torch.mean(lo)

    def run(inputs, grad_losses, need):
        host = [common.host(x, dtype) for x in inputs]
        losses, cr, rj, lo = (torch.empty(n, dtype=dtype) for _ in range(4))
        g = common.grad_bufs(inputs, need, dtype, 2)
        gl = None if grad_losses is None else common.host(grad_losses, dtype)
        _C.odds_ratio_loss(*host, beta, losses, cr, rj, lo, gl, *g)
        outs = (losses.to(device), cr.to(device), rj.to(device), lo.to(device))
        return outs, common.back(g, inputs)

    losses, cr, rj, lo = recompute_in_backward(run, (pc, pr), fn=fn)
    return losses, cr, rj, torch.mean(losses.detach() / beta), torch.mean(lo)


@check.public("orpo_loss", finite_args=("policy_nll_loss",))
def orpo_loss(policy_chosen_logps, policy_rejected_logps, policy_nll_loss, *, beta: float = 0.1):
    """The full ORPO loss ``policy_nll_loss - mean(beta * logsig(log_odds))`` (TRL's
    ``ORPOTrainer.get_batch_loss_metrics``); returns ``(loss, chosen_rewards,
    rejected_rewards)``."""
    losses, cr, rj, _, _ = odds_ratio_loss(policy_chosen_logps, policy_rejected_logps, beta=beta)
    return policy_nll_loss - losses.mean(), cr, rj


@check.public("kto_loss")
def kto_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    policy_KL_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    reference_KL_logps,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
):
    """KTO (Ethayarajh et al. 2024), as TRL's ``KTOTrainer``: unpaired desirable (chosen,
    ``[Bc]``) and undesirable (rejected, ``[Br]``) examples; either may be empty.

    z0 = max(0, mean(policy_KL_logps - reference_KL_logps)) over mismatched completions y'
    (no gradient; ``None`` KL inputs give z0 = 0). ``kto``: desirable ``w_d (1 - sigma(beta
    (l_w - z0)))``, undesirable ``w_u (1 - sigma(beta (z0 - l_l)))``; ``apo_zero_unpaired``:
    ``w_d (1 - sigma(beta l_w))`` and ``w_u sigma(beta l_l)``. Returns ``(losses,
    chosen_rewards, rejected_rewards, kl)`` with ``losses`` ``[Bc + Br]`` (chosen first, as TRL
    concatenates them; TRL's loss is ``losses.nanmean()``) and kl = z0."""
    fn = "kto_loss"
    check.string(fn, "loss_type", loss_type)
    beta = check.real(fn, "beta", beta)
    wd = check.real(fn, "desirable_weight", desirable_weight)
    wu = check.real(fn, "undesirable_weight", undesirable_weight)
    pc = check.vector(fn, "policy_chosen_logps", policy_chosen_logps, allow_empty=True)
    pr = check.vector(fn, "policy_rejected_logps", policy_rejected_logps, allow_empty=True)
    rc = check.vector(
        fn, "reference_chosen_logps", reference_chosen_logps, pc.shape[0], allow_empty=True
    )
    rr = check.vector(
        fn, "reference_rejected_logps", reference_rejected_logps, pr.shape[0], allow_empty=True
    )
    if (policy_KL_logps is None) != (reference_KL_logps is None):
        check.fail(fn, "policy_KL_logps and reference_KL_logps must be given together")
    dtype, device = common.compute_dtype(pc, pr, rc, rr), pc.device
    pkl = rkl = None
    if policy_KL_logps is not None:
        pkl = check.vector(fn, "policy_KL_logps", policy_KL_logps, allow_empty=True)
        rkl = check.vector(
            fn, "reference_KL_logps", reference_KL_logps, pkl.shape[0], allow_empty=True
        )
        pkl, rkl = common.host(pkl, dtype), common.host(rkl, dtype)
    nc, nr = pc.shape[0], pr.shape[0]
    if _ops.use_ops(pc, pr, rc, rr, fn=fn):
        return _ops.kto_loss(pc, pr, rc, rr, pkl, rkl, loss_type, beta, wd, wu)

    def run(inputs, grad_losses, need):
        h = [common.host(x, dtype) for x in inputs]
        losses = torch.empty(nc + nr, dtype=dtype)
        cr, rj = torch.empty(nc, dtype=dtype), torch.empty(nr, dtype=dtype)
        kl = torch.empty(1, dtype=dtype)
        any_need = need is not None and any(need)
        g = [torch.empty(nc, dtype=dtype), torch.empty(nr, dtype=dtype)] if any_need else [None] * 2
        gl = None if grad_losses is None else common.host(grad_losses, dtype)
        _C.kto_loss(
            h[0], h[1], pkl, h[2], h[3], rkl, loss_type, beta, wd, wu, losses, cr, rj, kl, gl, *g
        )
        grads = None
        if any_need:  # the reference log-probs get the opposite of the policy's gradient
            grads = tuple(
                (g[i % 2] if i < 2 else -g[i % 2]).to(
                    device=inputs[i].device, dtype=inputs[i].dtype
                )
                if need[i]
                else None
                for i in range(4)
            )
        outs = (losses.to(device), cr.to(device), rj.to(device), kl.reshape(()).to(device))
        return outs, grads

    return recompute_in_backward(run, (pc, pr, rc, rr), fn=fn)


# ---------------------------------------------------------------------------------------------
# D2O, HyPO, SuperHF (torch arithmetic on [B] / [B, K] tensors).
# ---------------------------------------------------------------------------------------------


@check.public("d2o_loss")
def d2o_loss(
    policy_sample_logps: torch.Tensor,
    ref_sample_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    alpha: float = 0.1,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
    beta = check.positive(fn, "beta", beta)
    alpha = check.real(fn, "alpha", alpha)
    ps, rs = check.matrix(fn, "policy_sample_logps", policy_sample_logps), ref_sample_logps
    if not isinstance(rs, torch.Tensor) or rs.shape != ps.shape:
        check.fail(
            fn, f"ref_sample_logps must have the shape of policy_sample_logps {tuple(ps.shape)}"
        )
    b = ps.shape[0]
    pl = check.vector(fn, "policy_rejected_logps", policy_rejected_logps, b)
    rl = check.vector(fn, "ref_rejected_logps", ref_rejected_logps, b)
    if _ops.use_ops(ps, rs, pl, rl, fn=fn):
        return _ops.d2o_loss(ps, rs, pl, rl, beta, alpha)
    dtype, device = common.compute_dtype(ps, rs, pl, rl), ps.device

    def run(inputs, grad_out, need):
        h = [common.host(x, dtype) for x in inputs]
        losses, pos, neg = (torch.empty(b, dtype=dtype) for _ in range(3))
        g = [None] * 4
        if need is not None:
            g = [
                torch.empty(x.shape, dtype=dtype) if need[i] else None for i, x in enumerate(inputs)
            ]
        go = None if grad_out is None else common.host(grad_out, dtype)
        _C.d2o_loss(*h, beta, alpha, losses, pos, neg, go, *g)
        return (losses.to(device), pos.to(device), neg.to(device)), common.back(g, inputs)

    return recompute_in_backward(run, (ps, rs, pl, rl), fn=fn)


@check.public("hypo_loss", finite_args=("policy_sample_logps", "ref_sample_logps"))
def hypo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    policy_sample_logps: torch.Tensor,
    ref_sample_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    lam: float = 0.01,
    loss_type: str = "sigmoid",
    **dpo_kwargs,
):
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
    lam = check.real(fn, "lam", lam)
    if not check.isfinite(lam):
        check.fail(fn, f"lam must be finite, got {lam:g}")
    losses, cr, rj = preference_loss(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        loss_type=loss_type,
        beta=beta,
        **dpo_kwargs,
    )
    ps = check.matrix(fn, "policy_sample_logps", policy_sample_logps)
    if ps.shape[0] != losses.shape[0]:
        check.fail(
            fn,
            f"policy_sample_logps has {ps.shape[0]} rows for a batch of "
            f"{losses.shape[0]} pairs; batch sizes disagree",
        )
    k = ps.shape[1]
    if k < 2:
        check.fail(
            fn,
            f"policy_sample_logps needs k >= 2 samples per prompt for the "
            f"leave-one-out baseline, got {k}",
        )
    if not isinstance(ref_sample_logps, torch.Tensor) or ref_sample_logps.shape != ps.shape:
        check.fail(fn, "ref_sample_logps must have the shape of policy_sample_logps")
    dtype, device = common.compute_dtype(ps, ref_sample_logps), ps.device
    rs = ref_sample_logps.detach()
    if _ops.use_ops(ps, rs, fn=fn):
        surrogate = _ops.hypo_online_kl(ps, rs)
        return losses + lam * surrogate.to(losses.dtype), cr, rj, surrogate.detach()

    def run(inputs, grad_out, need):
        # value: the Monte-Carlo KL; gradient: REINFORCE with the leave-one-out baseline.
        kl = torch.empty(ps.shape[0], dtype=dtype)
        g = torch.empty(ps.shape, dtype=dtype) if need is not None and need[0] else None
        go = None if grad_out is None else common.host(grad_out, dtype)
        _C.hypo_online_kl(common.host(inputs[0], dtype), common.host(rs, dtype), kl, go, g)
        return (kl.to(device),), common.back([g], inputs)

    (surrogate,) = recompute_in_backward(run, (ps,), fn=fn)
    return losses + lam * surrogate.to(losses.dtype), cr, rj, surrogate.detach()


@check.public("superhf_loss", finite_args=("policy_logps", "rewards", "ref_logps", "kl"))
def superhf_loss(
    policy_logps: torch.Tensor,
    rewards: torch.Tensor,
    *,
    kl: Optional[torch.Tensor] = None,
    ref_logps: Optional[torch.Tensor] = None,
    lengths=None,
    kl_coef: float = 0.35,
    top_k: int = 1,
):
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
    lp = check.matrix(fn, "policy_logps", policy_logps)
    if not isinstance(rewards, torch.Tensor) or rewards.shape != lp.shape:
        check.fail(fn, f"rewards must have the shape of policy_logps {tuple(lp.shape)}")
    top_k = check.integer(fn, "top_k", top_k)
    if not 1 <= top_k <= lp.shape[1]:
        check.fail(fn, f"top_k must be in [1, {lp.shape[1]}], got {top_k}")
    kl_coef = check.real(fn, "kl_coef", kl_coef)
    n = None if lengths is None else torch.as_tensor(lengths, dtype=lp.dtype)
    # While compiling, the value check runs in the op (a host sync would break the graph).
    if n is not None and (n.shape != lp.shape or (not _ops.compiling() and bool((n <= 0).any()))):
        check.fail(fn, "lengths must have the shape of policy_logps and be > 0")
    if kl is None:
        if ref_logps is None:
            check.fail(fn, "give kl or ref_logps for the KL prior")
        # Same shape, not broadcastable: a [N] or [B, 1] ref_logps would broadcast silently.
        if not isinstance(ref_logps, torch.Tensor) or ref_logps.shape != lp.shape:
            check.fail(fn, f"ref_logps must have the shape of policy_logps {tuple(lp.shape)}")
        kl = lp - ref_logps.detach()
    elif not isinstance(kl, torch.Tensor) or kl.shape != lp.shape:
        check.fail(fn, f"kl must have the shape of policy_logps {tuple(lp.shape)}")
    if _ops.use_ops(lp, kl, rewards, n, fn=fn):
        return _ops.superhf_loss(lp, kl, rewards, n, kl_coef, top_k)
    dtype, device = common.compute_dtype(lp, kl), lp.device
    r_host = common.host(rewards, torch.float64)
    n_host = None if n is None else common.host(n, dtype)
    idx = torch.empty(lp.shape[0], top_k, dtype=torch.int64)

    def run(inputs, grad_out, need):
        loss = torch.empty(1, dtype=dtype)
        g = [None, None]
        if need is not None:
            g = [torch.empty(lp.shape, dtype=dtype) if need[i] else None for i in range(2)]
        go = None if grad_out is None else common.host(grad_out.reshape(1), dtype)
        _C.superhf_loss(
            common.host(inputs[0], dtype),
            r_host,
            common.host(inputs[1], dtype),
            n_host,
            kl_coef,
            top_k,
            loss,
            idx,
            go,
            *g,
        )
        return (loss.reshape(()).to(device),), common.back(g, inputs)

    (loss,) = recompute_in_backward(run, (lp, kl), fn=fn)
    return loss, idx.to(device)
