"""Token-level preference losses: TDPO and SparsePO from the policy's and the reference's
logits (or, through :func:`token_logratio_and_kl`'s fused path, from the policy's hidden states),
and SparsePO's mask model."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from .. import _ops
from .. import _validate as check
from ..functional import divergence
from ..fused import fused_linear_logprobs
from ..rlhf import exact_kl_fused
from . import _common as common
from . import _token_head
from .sequence import preference_loss

__all__ = ["token_logratio_and_kl", "tdpo_loss", "sparsepo_loss", "SparsePOMask"]


# ---------------------------------------------------------------------------------------------
# Token-level: TDPO and SparsePO from logits.
# ---------------------------------------------------------------------------------------------


@check.public("token_logratio_and_kl")
def token_logratio_and_kl(
    policy_logits: Optional[torch.Tensor],
    ref_logits: Optional[torch.Tensor],
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    kl_grad: bool = True,
    policy_hidden: Optional[torch.Tensor] = None,
    lm_head_weight: Optional[torch.Tensor] = None,
    lm_head_bias: Optional[torch.Tensor] = None,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
    keep_bytes: Optional[int] = None,
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
    materializing its ``[tokens x V]`` logits; the reference either as ``ref_logits`` (log pi(y)
    by :func:`divkit.fused_linear_logprobs`, the KL by :func:`divkit.rlhf.exact_kl_fused`) or as
    ``ref_hidden [B, T, H_ref]`` + ``ref_weight [V, H_ref]`` (+ ``ref_bias``). With reference
    hidden states on the CPU (and a reference that does not require grad) both heads run in one
    pass of divkit's C++ engine: each chunk of both heads' logits gives the two label log-probs
    and the KL together, and the backward is one more pass that reads the chunks kept within
    ``keep_bytes`` (default 64 MiB of fp32 logits; 0 keeps none) and recomputes the others.
    ``chunk_size`` bounds the tokens per chunk of the fused path. Gradients reach every input that requires grad; fp32 results (fp64 for fp64
    logits on the logits path)."""
    fn = "token_logratio_and_kl"
    if policy_hidden is not None or policy_logits is None:
        return _fused_token_terms(
            fn,
            policy_hidden,
            lm_head_weight,
            lm_head_bias,
            ref_logits,
            ref_hidden,
            ref_weight,
            ref_bias,
            labels,
            ignore_index,
            kl_grad,
            chunk_size,
            keep_bytes,
        )
    check.tensor(fn, "policy_logits", policy_logits, dtypes=None, cpu=False)
    check.tensor(fn, "ref_logits", ref_logits, dtypes=None, cpu=False)
    if policy_logits.dim() != 3 or ref_logits.shape != policy_logits.shape:
        check.fail(
            fn,
            f"policy and reference logits must both be [B, T, V] of one "
            f"shape, got {tuple(policy_logits.shape)} and "
            f"{None if ref_logits is None else tuple(ref_logits.shape)}",
        )
    ignore_index = check.integer(fn, "ignore_index", ignore_index)
    labels = check.labels(
        fn,
        labels,
        policy_logits.shape[:2],
        required=True,
        lead="the logits' [B, T]",
        cpu=False,
        vocab=policy_logits.shape[-1],
        ignore_index=ignore_index,
    ).reshape(policy_logits.shape[:2])
    mask = labels != ignore_index
    logratio = common.label_logps(policy_logits, labels, mask) - common.label_logps(
        ref_logits, labels, mask
    )
    student = policy_logits if kl_grad else policy_logits.detach()
    with check.renamed(_KL_NAMES):
        kl = divergence(
            student,
            ref_logits,
            "forward_kl",
            labels=labels,
            ignore_index=ignore_index,
            reduction="none",
        )
    return logratio, kl.to(logratio.dtype) * mask, mask


def _fused_token_terms(
    fn, h, w, b, ref_logits, rh, rw, rb, labels, ignore_index, kl_grad, chunk_size, keep_bytes
):
    if not isinstance(h, torch.Tensor) or h.dim() != 3:
        check.fail(fn, "policy hidden states must be a [B, T, H] tensor (or give policy_logits)")
    if w is None:
        check.fail(fn, "lm_head_weight is required with policy hidden states")
    check.lm_head(fn, h, w, ref_logits, rh, rw, labels)
    mask = labels != ignore_index
    if (
        ref_logits is None
        and _token_head.usable(h, w, b, rh, rw, rb)
        and not _ops.use_ops(h, w, b, rh, rw, rb, fn=fn)
    ):
        ignore_index = check.integer(fn, "ignore_index", ignore_index)
        flat = check.labels(
            fn,
            labels,
            h.shape[:2],
            required=True,
            lead="the hidden states' [B, T]",
            cpu=False,
            vocab=w.shape[0],
            ignore_index=ignore_index,
        )
        side = _token_head.SideInputs(
            hidden=h,
            weight=w,
            bias=b,
            ref_hidden=rh,
            ref_weight=rw,
            ref_bias=rb,
            labels=flat,
            ignore_index=ignore_index,
            kl_grad=kl_grad,
        )
        lp, ref_lp, kl = _token_head.token_terms(
            fn, side, chunk_size=chunk_size, keep_bytes=keep_bytes
        )
        return lp - ref_lp, kl, mask
    lp = fused_linear_logprobs(h, w, labels, b, ignore_index=ignore_index, chunk_size=chunk_size)
    if ref_logits is None:
        ref_lp = fused_linear_logprobs(
            rh, rw, labels, rb, ignore_index=ignore_index, chunk_size=chunk_size
        )
    else:
        ref_lp = common.label_logps(ref_logits, labels, mask).float()
    hk, wk, bk = (
        (h, w, b) if kl_grad else (h.detach(), w.detach(), None if b is None else b.detach())
    )
    kl = exact_kl_fused(
        hk,
        wk,
        lm_head_bias=bk,
        ref_logits=ref_logits,
        ref_hidden=rh,
        ref_weight=rw,
        ref_bias=rb,
        labels=labels,
        ignore_index=ignore_index,
        direction="ref_policy",
        chunk_size=chunk_size,
    )
    return (lp.float() - ref_lp) * mask, kl.float() * mask, mask


# The inner functions' argument names -> the caller's, for the messages.
_KL_NAMES = {"student_logits": "policy_logits", "teacher_logits": "ref_logits"}
_CHOSEN = {
    "policy_logits": "policy_chosen_logits",
    "ref_logits": "ref_chosen_logits",
    "labels": "chosen_labels",
}
_REJECTED = {
    "policy_logits": "policy_rejected_logits",
    "ref_logits": "ref_rejected_logits",
    "labels": "rejected_labels",
}


#: SparsePO's token masks (checked finite by the public functions).
_MASK_NAMES = ("chosen_reward_mask", "rejected_reward_mask", "chosen_kl_mask", "rejected_kl_mask")


def _token_inputs(fn, pcl, prl, rcl, rrl, cl, rl):
    for name, x in (
        ("policy_chosen_logits", pcl),
        ("policy_rejected_logits", prl),
        ("ref_chosen_logits", rcl),
        ("ref_rejected_logits", rrl),
    ):
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            check.fail(fn, f"{name} must be a [B, T, V] tensor")
    if prl.shape[0] != pcl.shape[0]:
        check.fail(
            fn,
            f"policy_rejected_logits has batch size {prl.shape[0]}, "
            f"policy_chosen_logits {pcl.shape[0]}; batch sizes disagree",
        )
    if pcl.shape[0] == 0:
        check.fail(fn, "the batch is empty")


@check.public("tdpo_loss")
def tdpo_loss(
    policy_chosen_logits,
    policy_rejected_logits,
    ref_chosen_logits,
    ref_rejected_logits,
    chosen_labels,
    rejected_labels,
    *,
    beta: float = 0.1,
    alpha: float = 0.5,
    variant: str = "tdpo2",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
):
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
    _token_inputs(
        fn,
        policy_chosen_logits,
        policy_rejected_logits,
        ref_chosen_logits,
        ref_rejected_logits,
        chosen_labels,
        rejected_labels,
    )
    variant, beta, alpha = _tdpo_variant(fn, variant, beta, alpha)
    with check.renamed(_CHOSEN):
        lr_w, kl_w, _ = token_logratio_and_kl(
            policy_chosen_logits,
            ref_chosen_logits,
            chosen_labels,
            ignore_index=ignore_index,
            kl_grad=variant == "tdpo1",
        )
    with check.renamed(_REJECTED):
        lr_l, kl_l, _ = token_logratio_and_kl(
            policy_rejected_logits, ref_rejected_logits, rejected_labels, ignore_index=ignore_index
        )
    return _tdpo_combine(lr_w, kl_w, lr_l, kl_l, beta, alpha, label_smoothing)


def _tdpo_variant(fn, variant, beta, alpha):
    variant = check.string(fn, "variant", variant)
    if variant not in ("tdpo1", "tdpo2"):
        check.fail(fn, f"unknown variant '{variant}' (valid: tdpo1, tdpo2)")
    beta = check.positive(fn, "beta", beta)
    alpha = _finite(fn, "alpha", alpha) if variant == "tdpo2" else 1.0
    return variant, beta, alpha


def _finite(fn, name, x) -> float:
    """A finite real number (an infinite coefficient would reach the sequence-level loss as an
    infinite input, reported under that function's argument names)."""
    v = check.real(fn, name, x)
    if not check.isfinite(v):
        check.fail(fn, f"{name} must be finite, got {v:g}")
    return v


# preference_loss's argument names -> what they hold when a token-level loss calls it (a
# non-finite value there comes from the token terms, e.g. a label token of probability 0).
_SEQ_NAMES = {
    "policy_chosen_logps": "the chosen side's summed token terms (log-ratio and KL)",
    "policy_rejected_logps": "the rejected side's summed token terms (log-ratio and KL)",
}


def _tdpo_combine(lr_w, kl_w, lr_l, kl_l, beta, alpha, label_smoothing):
    lw, ll = lr_w.sum(-1), lr_l.sum(-1)
    kw, kr = kl_w.sum(-1), kl_l.sum(-1)
    # logits = (lw + alpha kw) - (ll + alpha kr): the DPO sigmoid loss of these "log-ratios".
    zeros = torch.zeros_like(lw)
    with check.renamed(_SEQ_NAMES):
        losses, _, _ = preference_loss(
            lw + alpha * kw,
            ll + alpha * kr,
            zeros,
            zeros,
            beta=beta,
            label_smoothing=label_smoothing,
        )
    return losses, (beta * (lw + kw)).detach(), (beta * (ll + kr)).detach()


@check.public("sparsepo_loss", finite_args=_MASK_NAMES)
def sparsepo_loss(
    policy_chosen_logits,
    policy_rejected_logits,
    ref_chosen_logits,
    ref_rejected_logits,
    chosen_labels,
    rejected_labels,
    *,
    chosen_reward_mask=None,
    rejected_reward_mask=None,
    chosen_kl_mask=None,
    rejected_kl_mask=None,
    beta: float = 0.1,
    l1_reward: float = 0.0,
    l1_kl: float = 0.0,
    ignore_index: int = -100,
):
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
    _token_inputs(
        fn,
        policy_chosen_logits,
        policy_rejected_logits,
        ref_chosen_logits,
        ref_rejected_logits,
        chosen_labels,
        rejected_labels,
    )
    beta = check.positive(fn, "beta", beta)
    l1_reward = _finite(fn, "l1_reward", l1_reward)
    l1_kl = _finite(fn, "l1_kl", l1_kl)
    with check.renamed(_CHOSEN):
        lr_w, kl_w, m_w = token_logratio_and_kl(
            policy_chosen_logits, ref_chosen_logits, chosen_labels, ignore_index=ignore_index
        )
    with check.renamed(_REJECTED):
        lr_l, kl_l, m_l = token_logratio_and_kl(
            policy_rejected_logits, ref_rejected_logits, rejected_labels, ignore_index=ignore_index
        )
    return _sparsepo_combine(
        fn,
        lr_w,
        kl_w,
        m_w,
        lr_l,
        kl_l,
        m_l,
        chosen_reward_mask,
        rejected_reward_mask,
        chosen_kl_mask,
        rejected_kl_mask,
        beta,
        l1_reward,
        l1_kl,
    )


def _sparsepo_combine(
    fn,
    lr_w,
    kl_w,
    m_w,
    lr_l,
    kl_l,
    m_l,
    chosen_reward_mask,
    rejected_reward_mask,
    chosen_kl_mask,
    rejected_kl_mask,
    beta,
    l1_reward,
    l1_kl,
):

    def mask(name, m, ref):
        if m is None:
            return torch.ones_like(ref)
        if not isinstance(m, torch.Tensor) or m.shape != ref.shape:
            check.fail(fn, f"{name} must be a tensor of shape {tuple(ref.shape)}")
        return m.to(ref.dtype)

    mr_w, mr_l = (
        mask("chosen_reward_mask", chosen_reward_mask, lr_w),
        mask("rejected_reward_mask", rejected_reward_mask, lr_l),
    )
    mk_w, mk_l = (
        mask("chosen_kl_mask", chosen_kl_mask, lr_w),
        mask("rejected_kl_mask", rejected_kl_mask, lr_l),
    )
    u_w, u_l = (mr_w * lr_w).sum(-1), (mr_l * lr_l).sum(-1)
    d_w, d_l = -(mk_w * kl_w).sum(-1), -(mk_l * kl_l).sum(-1)
    zeros = torch.zeros_like(u_w)
    with check.renamed(_SEQ_NAMES):
        losses, _, _ = preference_loss(u_w - d_w, u_l - d_l, zeros, zeros, beta=beta)
    l1 = l1_reward * ((mr_w.abs() * m_w).sum(-1) + (mr_l.abs() * m_l).sum(-1)) + l1_kl * (
        (mk_w.abs() * m_w).sum(-1) + (mk_l.abs() * m_l).sum(-1)
    )
    return losses + l1, (beta * (u_w - d_w)).detach(), (beta * (u_l - d_l)).detach()


class SparsePOMask(nn.Module):
    """SparsePO's mask model (huawei-noah/HEBO, SparsePO): on the reference model's hidden states
    of L layers, per layer LayerNorm -> Linear(H, 1) -> ReLU -> Dropout, then a Linear(L, 1)
    mixer -> ReLU, giving a non-negative mask per token. ``shared=True`` uses one mask for the
    reward and the KL; otherwise two heads. ``forward(hidden_states)`` takes a sequence of L
    tensors ``[B, T, H]`` and returns ``(reward_mask, kl_mask)``, each ``[B, T]``.

    Dead start: the mixer's inputs are non-negative (ReLU outputs), so when its weights (and
    bias) come out mostly negative at init, the final ReLU gives a zero mask for every token and
    zero gradients to every mask parameter, and training cannot leave that state. The official
    code (``SimpleMaskAllLayers`` in huawei-noah/HEBO ``SparsePO/src/masks/mask_models.py``)
    has the same risk: PyTorch's default init, a final ReLU, nothing to prevent it; this module
    keeps that architecture. With PyTorch's default init, H = 64 and N(0, 1) hidden states, about
    a third of the seeds start dead at L = 1, a quarter at L = 2, one in seven at L = 4 and one
    in fifty at L = 32. Check ``(mask > 0).any()`` on the first batch (or re-initialize
    ``heads[i]["mix"]`` with non-negative weights) before training. Differences from the
    official module, kept: one LayerNorm per layer (the official one shares a single
    LayerNorm), a bias in the mixer, and no dropout after the mixer's ReLU."""

    @check.public("SparsePOMask")
    def __init__(
        self, hidden_size: int, num_layers: int, *, dropout: float = 0.1, shared: bool = False
    ):
        super().__init__()
        fn = "SparsePOMask"
        hidden_size = check.size(fn, "hidden_size", hidden_size)
        num_layers = check.size(fn, "num_layers", num_layers, max=4096)
        dropout = check.real(fn, "dropout", dropout)
        if not 0 <= dropout <= 1:
            check.fail(fn, f"dropout must be in [0, 1], got {dropout:g}")
        heads = 1 if check.boolean(fn, "shared", shared) else 2

        def head():
            return nn.ModuleDict(
                {
                    "per_layer": nn.ModuleList(
                        nn.Sequential(
                            nn.LayerNorm(hidden_size),
                            nn.Linear(hidden_size, 1),
                            nn.ReLU(),
                            nn.Dropout(dropout),
                        )
                        for _ in range(num_layers)
                    ),
                    "mix": nn.Linear(num_layers, 1),
                }
            )

        self.heads = nn.ModuleList(head() for _ in range(heads))
        self.num_layers = num_layers

    @check.public("SparsePOMask")
    def forward(self, hidden_states: Sequence[torch.Tensor]):
        if not isinstance(hidden_states, (list, tuple)) or not all(
            isinstance(h, torch.Tensor) for h in hidden_states
        ):
            check.fail_type(
                "SparsePOMask", "hidden_states must be a list or tuple of tensors [B, T, H]"
            )
        if len(hidden_states) != self.num_layers:
            check.fail(
                "SparsePOMask",
                f"expected {self.num_layers} hidden-state tensors, got {len(hidden_states)}",
            )
        masks = []
        for h in self.heads:
            per = torch.cat([f(x.detach()) for f, x in zip(h["per_layer"], hidden_states)], -1)
            masks.append(torch.relu(h["mix"](per)).squeeze(-1))
        return (masks[0], masks[0]) if len(masks) == 1 else (masks[0], masks[1])
