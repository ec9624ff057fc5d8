"""Vocabulary-parallel losses over torch.distributed: the vocabulary (the lm_head's rows, or the
logits' last dimension) is split over the ranks of a process group, rank r holding a contiguous
shard in rank order (Megatron's vocabulary-parallel layout; shards may have different sizes).
Every rank passes the same tokens (hidden states and labels, labels as global token ids) and gets
the same loss as the unsharded computation; gradients are those of its own shard, plus the full
gradient of the hidden states (all-reduced, as the input of a vocabulary-parallel layer).

The computation is the C++ core's (include/divkit/vocab_parallel.h, fused_linear.h): per chunk of
tokens, each rank computes its shard's row statistics, the core calls back into
``torch.distributed.all_reduce`` (small float64 buffers) to combine them, then computes the
divergence's partial sums under the global normalizers, combines them likewise, and finally the
shard's gradients. Every kind of :func:`divkit.divergence` is supported, Renyi included. The fused
losses are :func:`divkit.fused_linear_divergence`, :func:`divkit.fused_linear_cross_entropy` and
:func:`divkit.fused_linear_logprobs` with ``process_group=``; this module keeps the token-level
:func:`vocab_parallel_divergence` and thin entry points for the fused ones.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.distributed as dist

from . import _C, _ops
from . import _validate as check
from .fused import (
    _CEConfig,
    _cross_entropy_apply,
    _DistillConfig,
    _divergence_apply,
    _head_loss,
    _logprobs_apply,
    _options,
    _token_weights,
)

__all__ = ["vocab_parallel_divergence", "shard_offsets"]


def shard_offsets(local_vocab: int, group=None) -> Tuple[int, int]:
    """(offset, global V) of this rank's vocabulary shard: shards are contiguous in rank order."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    sizes = torch.zeros(world, dtype=torch.int64)
    sizes[rank] = local_vocab
    dist.all_reduce(sizes, group=group)
    return int(sizes[:rank].sum()), int(sizes.sum())


# ---------------------------------------------------------------------------------------------
# Token-level divergence over sharded logits
# ---------------------------------------------------------------------------------------------


def _vp_call(s, t, labels, weights, fields: dict, group, need, reduction: str):
    """One core call on [N, V_r] shards: (float32 loss, fp32 shard gradients or None)."""
    loss = torch.empty(s.shape[0] if reduction == "none" else 1, dtype=torch.float32)
    gs = torch.empty(s.shape, dtype=torch.float32) if need[0] else None
    gt = torch.empty(t.shape, dtype=torch.float32) if need[1] else None
    opts = _options(
        group,
        **dict(
            fields,
            reduction=reduction,
            num_items_in_batch=0.0 if reduction == "none" else fields["num_items_in_batch"],
        ),
    )
    _C.vocab_parallel_divergence(s.detach(), t.detach(), labels, weights, opts, loss, gs, gt)
    return loss, [gs, gt]


def vocab_parallel_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "forward_kl",
    *,
    process_group=None,
    labels=None,
    weights=None,
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    scale_by_t_squared: bool = False,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch=None,
) -> torch.Tensor:
    """:func:`divkit.divergence` over logits whose vocabulary dimension is sharded over the ranks
    of ``process_group`` (each rank passes its shard ``[..., V_r]``, shards contiguous in rank
    order). Same formulas, directions, options and result as the unsharded call; gradients are
    those of the rank's shard (float32)."""
    fn = "vocab_parallel_divergence"
    s = check.logits(fn, "student_logits", student_logits)
    t = check.logits(fn, "teacher_logits", teacher_logits)
    check.same_shape(fn, "teacher_logits", t, s, "student_logits")
    lead = s.shape[:-1]
    lab = check.labels(fn, labels, lead)
    wts = None if weights is None else check.per_token(fn, "weights", weights, lead)
    wts = None if wts is None else wts.detach().reshape(-1).double().contiguous()
    fields = dict(
        kind=check.string(fn, "kind", kind),
        beta=check.real(fn, "beta", beta),
        alpha=check.real(fn, "alpha", alpha),
        temperature=check.real(fn, "temperature", temperature),
        scale_by_t_squared=bool(scale_by_t_squared),
        ignore_index=check.integer(fn, "ignore_index", ignore_index),
        reduction=check.reduction(fn, reduction),
        num_items_in_batch=check.num_items(fn, num_items_in_batch),
    )
    # The nanobind call cannot be traced; under torch.compile the core checks the spec when the
    # op runs.
    if not _ops.compiling():
        _C.validate_spec(
            fields["kind"],
            fields["beta"],
            fields["alpha"],
            fields["temperature"],
            fields["scale_by_t_squared"],
        )
    group = dist.group.WORLD if process_group is None else process_group
    if _ops.use_ops(s, t, lab, fn=fn):
        s2 = s.reshape(-1, s.shape[-1]).contiguous()
        t2 = t.reshape(-1, t.shape[-1]).contiguous()
        loss = _ops.vocab_parallel_divergence(s2, t2, lab, wts, fields, group)
        return loss.reshape(lead) if fields["reduction"] == "none" else loss.reshape(())

    def call(ts, need, upstream):
        if upstream is None:
            loss, grads = _vp_call(*ts, lab, wts, fields, group, need, fields["reduction"])
        else:
            loss, grads = _vp_call(
                *ts, lab, _token_weights(upstream, wts), fields, group, need, "sum"
            )
        return (loss,), grads

    # reshape / contiguous stay inside the autograd graph (the shard gradients are [N, V_r]).
    loss = _head_loss(
        fn,
        call,
        [s.reshape(-1, s.shape[-1]).contiguous(), t.reshape(-1, t.shape[-1]).contiguous()],
        fields["reduction"] != "none",
    )
    return loss.reshape(lead) if fields["reduction"] == "none" else loss.reshape(())


# ---------------------------------------------------------------------------------------------
# Fused linear heads with sharded weights: the core's vocabulary-parallel mode, through fused.py
# ---------------------------------------------------------------------------------------------


def vocab_parallel_fused_linear_divergence(
    sh, sw, sb, th, tw, tb, labels, weights, ids, cfg: _DistillConfig, group, lead
):
    """:func:`divkit.fused_linear_divergence` on validated arguments, sharded over ``group``."""
    return _divergence_apply(sh, sw, sb, th, tw, tb, labels, weights, ids, cfg, group, lead)


def vocab_parallel_fused_linear_cross_entropy(
    h, w, b, labels, cfg: _CEConfig, group, lead, return_stats
):
    """:func:`divkit.fused_linear_cross_entropy` on validated arguments, sharded over ``group``."""
    return _cross_entropy_apply(h, w, b, labels, cfg, group, lead, bool(return_stats))


def vocab_parallel_fused_linear_logprobs(
    h, w, b, labels, temperature, ignore_index, return_entropy, topk, chunk, group, lead
):
    """:func:`divkit.fused_linear_logprobs` on validated arguments, sharded over ``group``."""
    return _logprobs_apply(
        h, w, b, labels, temperature, ignore_index, bool(return_entropy), topk, chunk, group, lead
    )
