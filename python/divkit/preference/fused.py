"""TDPO and SparsePO fused with the policy's lm_head: the policy given as hidden states and
weight, its ``[tokens x V]`` logits never materialized."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .. import _device, _ops
from .. import _validate as check
from . import _token_head
from ._token_head import PairInputs
from .tokens import (
    _MASK_NAMES,
    _finite,
    _sparsepo_combine,
    _tdpo_combine,
    _tdpo_variant,
    token_logratio_and_kl,
)

__all__ = ["tdpo_loss_fused", "sparsepo_loss_fused"]


def _side(side: str) -> dict:
    """token_logratio_and_kl's (and its inner functions') argument names -> the caller's."""
    return {
        "policy_hidden": f"policy_{side}_hidden",
        "hidden": f"policy_{side}_hidden",
        "ref_logits": f"ref_{side}_logits",
        "ref_hidden": f"ref_{side}_hidden",
        "labels": f"{side}_labels",
    }


def _fused_pair(fn, p: PairInputs, chosen_kl_grad: bool):
    """The per-side path: each side's per-token (logratio, kl, mask) from
    :func:`token_logratio_and_kl`'s fused path, with errors named after that side's arguments."""
    hc, hr = p.policy_chosen_hidden, p.policy_rejected_hidden
    for name, x in (("policy_chosen_hidden", hc), ("policy_rejected_hidden", hr)):
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            check.fail(fn, f"{name} must be a [B, T, H] tensor")
    if hr.shape[0] != hc.shape[0]:
        check.fail(
            fn,
            f"policy_rejected_hidden has batch size {hr.shape[0]}, policy_chosen_hidden "
            f"{hc.shape[0]}; batch sizes disagree",
        )
    if hc.shape[0] == 0:
        check.fail(fn, "the batch is empty")
    if (p.ref_chosen_logits is None) != (p.ref_rejected_logits is None) or (
        p.ref_chosen_hidden is None
    ) != (p.ref_rejected_hidden is None):
        check.fail(fn, "give the reference for both the chosen and the rejected side")
    common = dict(
        lm_head_weight=p.lm_head_weight,
        lm_head_bias=p.lm_head_bias,
        ref_weight=p.ref_weight,
        ref_bias=p.ref_bias,
        ignore_index=p.ignore_index,
        chunk_size=p.chunk_size,
        keep_bytes=p.keep_bytes,
    )
    with check.renamed(_side("chosen")), _token_head.backend_scope(p.backend):
        w = token_logratio_and_kl(
            None,
            p.ref_chosen_logits,
            p.chosen_labels,
            policy_hidden=hc,
            ref_hidden=p.ref_chosen_hidden,
            kl_grad=chosen_kl_grad,
            **common,
        )
    with check.renamed(_side("rejected")), _token_head.backend_scope(p.backend):
        l_ = token_logratio_and_kl(
            None,
            p.ref_rejected_logits,
            p.rejected_labels,
            policy_hidden=hr,
            ref_hidden=p.ref_rejected_hidden,
            **common,
        )
    return w, l_


def _pair_in_forward(fn, loss, p: PairInputs):
    """The pair engine with the gradients computed in the forward (one pass over each chunk of
    logits in all; :func:`_token_head.pair_in_forward`), when it applies: reference hidden
    states (on one device with the policy; the C++ engine on the CPU, the PyTorch loop elsewhere
    or with backend "torch"), a policy that requires grad, no custom-op tracing, chosen and
    rejected of one length, and one pair's logits within keep_bytes. None otherwise."""
    hc, hr = p.policy_chosen_hidden, p.policy_rejected_hidden
    w, b, rw, rb = p.lm_head_weight, p.lm_head_bias, p.ref_weight, p.ref_bias
    rhc, rhr = p.ref_chosen_hidden, p.ref_rejected_hidden
    if p.ref_chosen_logits is not None or p.ref_rejected_logits is not None:
        return None
    if rhc is None or rhr is None:
        return None
    if not torch.is_grad_enabled() or not any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in (hc, hr, w, b)
    ):
        return None
    for name, x in (("policy_chosen_hidden", hc), ("policy_rejected_hidden", hr)):
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            check.fail(fn, f"{name} must be a [B, T, H] tensor")
    if hc.shape[:2] != hr.shape[:2]:
        return None  # different lengths: the per-side path
    with _token_head.backend_scope(_device.backend(fn, p.backend)):
        if not _token_head.usable(hc, w, b, rhc, rw, rb) or not _token_head.usable(
            hr, w, b, rhr, rw, rb
        ):
            return None
    if _ops.use_ops(hc, hr, w, b, rhc, rhr, rw, rb, *loss.extras, fn=fn):
        return None
    ii = check.integer(fn, "ignore_index", p.ignore_index)
    labels = []
    for side, h, rh, lab in (
        ("chosen", hc, rhc, p.chosen_labels),
        ("rejected", hr, rhr, p.rejected_labels),
    ):
        with check.renamed(_side(side)):
            check.lm_head(fn, h, w, None, rh, rw, lab)
            labels.append(
                check.labels(
                    fn,
                    lab,
                    h.shape[:2],
                    required=True,
                    lead="the hidden states' [B, T]",
                    cpu=False,
                    vocab=w.shape[0],
                    ignore_index=ii,
                ).reshape(h.shape[:2])
            )
    if hc.shape[0] == 0:
        check.fail(fn, "the batch is empty")
    keep = p.keep_bytes
    if keep is not None:
        keep = check.integer(fn, "keep_bytes", keep, min=0)
    checked = dataclasses.replace(
        p, chosen_labels=labels[0], rejected_labels=labels[1], ignore_index=ii, keep_bytes=keep
    )
    return _token_head.pair_in_forward(fn, loss, checked)


def _pair_loss_fused(fn, loss, p: PairInputs):
    """A token-level pair loss (:class:`_token_head.PairLoss`) fused with the policy's lm_head:
    the gradients-in-forward pair engine where it applies, else the per-side path (per-token
    terms from :func:`token_logratio_and_kl`, then the loss's combine)."""
    fast = _pair_in_forward(fn, loss, p)
    if fast is not None:
        return fast
    chosen, rejected = _fused_pair(fn, p, loss.kl_grad_chosen)
    return loss.combine(chosen, rejected, *loss.extras)


@check.public("tdpo_loss_fused")
def tdpo_loss_fused(
    policy_chosen_hidden,
    policy_rejected_hidden,
    lm_head_weight,
    chosen_labels,
    rejected_labels,
    *,
    ref_chosen_logits=None,
    ref_rejected_logits=None,
    ref_chosen_hidden=None,
    ref_rejected_hidden=None,
    ref_weight=None,
    lm_head_bias=None,
    ref_bias=None,
    beta: float = 0.1,
    alpha: float = 0.5,
    variant: str = "tdpo2",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    chunk_size: Optional[int] = None,
    keep_bytes: Optional[int] = None,
    backend: str = "auto",
):
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
    if they require grad).

    With reference hidden states (not requiring grad) one pass computes both label log-probs
    and the KL from each chunk of both heads' logits: the C++ engine on CPU tensors, the
    PyTorch chunk loop (torch's GEMMs; ``divkit.backends.torch_ops``) on other devices such as
    CUDA and with ``backend="torch"`` (``"core"``: the C++ engine or an error). When the
    policy requires grad and one pair's fp32 logits (chosen and rejected, the reference's
    where the KL is differentiated) fit ``keep_bytes`` (default 256 MiB), pairs are taken in
    groups that fit: the group's logits are kept from its forward pass to its gradient pass,
    which runs in the forward (the gradient of ``losses.sum()``); the backward scales it by the
    upstream gradient when that is the same for every pair (``losses.sum()``, ``.mean()``) and
    otherwise recomputes. Else the per-token terms come from :func:`token_logratio_and_kl`'s
    fused path, whose backward recomputes the chunks beyond ``keep_bytes`` per side (default 64
    MiB there; 0 keeps none). ``chunk_size`` tokens per chunk (default ~32 MiB of logits per
    chunk buffer on these paths, ~64 MiB with reference logits). Hidden states fp32, bf16, fp16
    or fp64; arithmetic in fp32 (sequence level in fp64)."""
    fn = "tdpo_loss_fused"
    backend = _device.backend(fn, backend)
    variant, beta, alpha = _tdpo_variant(fn, variant, beta, alpha)
    loss = _token_head.PairLoss(
        lambda w, l_: _tdpo_combine(w[0], w[1], l_[0], l_[1], beta, alpha, label_smoothing),
        kl_grad_chosen=variant == "tdpo1",
    )
    inputs = PairInputs(
        policy_chosen_hidden=policy_chosen_hidden,
        policy_rejected_hidden=policy_rejected_hidden,
        lm_head_weight=lm_head_weight,
        chosen_labels=chosen_labels,
        rejected_labels=rejected_labels,
        ref_chosen_logits=ref_chosen_logits,
        ref_rejected_logits=ref_rejected_logits,
        ref_chosen_hidden=ref_chosen_hidden,
        ref_rejected_hidden=ref_rejected_hidden,
        ref_weight=ref_weight,
        lm_head_bias=lm_head_bias,
        ref_bias=ref_bias,
        ignore_index=ignore_index,
        chunk_size=chunk_size,
        keep_bytes=keep_bytes,
        backend=backend,
    )
    return _pair_loss_fused(fn, loss, inputs)


@check.public("sparsepo_loss_fused", finite_args=_MASK_NAMES)
def sparsepo_loss_fused(
    policy_chosen_hidden,
    policy_rejected_hidden,
    lm_head_weight,
    chosen_labels,
    rejected_labels,
    *,
    ref_chosen_logits=None,
    ref_rejected_logits=None,
    ref_chosen_hidden=None,
    ref_rejected_hidden=None,
    ref_weight=None,
    lm_head_bias=None,
    ref_bias=None,
    chosen_reward_mask=None,
    rejected_reward_mask=None,
    chosen_kl_mask=None,
    rejected_kl_mask=None,
    beta: float = 0.1,
    l1_reward: float = 0.0,
    l1_kl: float = 0.0,
    ignore_index: int = -100,
    chunk_size: Optional[int] = None,
    keep_bytes: Optional[int] = None,
    backend: str = "auto",
):
    """:func:`sparsepo_loss` fused with the policy's lm_head (SparsePO, Christopoulou et al.
    2024): the policy and reference are given as in :func:`tdpo_loss_fused`, the masks and
    L1 penalties as in :func:`sparsepo_loss`; ``loss = -logsig(beta (u - d)) + L1`` with
    ``u = sum_t m^r_t log-ratio_t`` and ``d_t = -m^kl_t KL_t(pi_ref || pi)``. Never
    materializes the policy's ``[tokens x V]`` logits; equals :func:`sparsepo_loss` on the
    materialized logits up to fp32 rounding. The paths are those of :func:`tdpo_loss_fused`
    (both KLs differentiated): with reference hidden states and a policy that requires grad,
    pairs whose fp32 logits (both heads, both sides: ``16 V T`` bytes per pair) fit
    ``keep_bytes`` (default 256 MiB) get their gradients in the forward, one pass over each
    chunk of logits in all, the masks' gradients too when they require grad (e.g. from
    :class:`SparsePOMask`); ``chunk_size``, ``keep_bytes`` and ``backend`` as there. Masks
    ``[B, T]``, any floating dtype (used in fp32). Returns ``(losses, chosen_rewards,
    rejected_rewards)``."""
    fn = "sparsepo_loss_fused"
    backend = _device.backend(fn, backend)
    beta = check.positive(fn, "beta", beta)
    l1_reward = _finite(fn, "l1_reward", l1_reward)
    l1_kl = _finite(fn, "l1_kl", l1_kl)
    masks = (chosen_reward_mask, rejected_reward_mask, chosen_kl_mask, rejected_kl_mask)
    _sparsepo_mask_shapes(fn, policy_chosen_hidden, policy_rejected_hidden, masks)
    loss = _token_head.PairLoss(
        lambda w, l_, *m: _sparsepo_combine(fn, *w, *l_, *m, beta, l1_reward, l1_kl),
        kl_grad_chosen=True,
        extras=masks,
    )
    inputs = PairInputs(
        policy_chosen_hidden=policy_chosen_hidden,
        policy_rejected_hidden=policy_rejected_hidden,
        lm_head_weight=lm_head_weight,
        chosen_labels=chosen_labels,
        rejected_labels=rejected_labels,
        ref_chosen_logits=ref_chosen_logits,
        ref_rejected_logits=ref_rejected_logits,
        ref_chosen_hidden=ref_chosen_hidden,
        ref_rejected_hidden=ref_rejected_hidden,
        ref_weight=ref_weight,
        lm_head_bias=lm_head_bias,
        ref_bias=ref_bias,
        ignore_index=ignore_index,
        chunk_size=chunk_size,
        keep_bytes=keep_bytes,
        backend=backend,
    )
    return _pair_loss_fused(fn, loss, inputs)


def _sparsepo_mask_shapes(fn, hc, hr, masks):
    """The masks against the hidden states' [B, T] before any pass (the pair engine slices them
    by pair, where a wrong batch size would go unseen); the same message as
    :func:`_sparsepo_combine`'s. Hidden states that are not [B, T, H] are reported later."""
    names = ("chosen_reward_mask", "rejected_reward_mask", "chosen_kl_mask", "rejected_kl_mask")
    for name, m, h in zip(names, masks, (hc, hr, hc, hr)):
        if m is None or not isinstance(h, torch.Tensor) or h.dim() != 3:
            continue
        if not isinstance(m, torch.Tensor) or m.shape != h.shape[:2]:
            check.fail(fn, f"{name} must be a tensor of shape {tuple(h.shape[:2])}")
