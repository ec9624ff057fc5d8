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
from torch.autograd.function import once_differentiable

from . import _C
from .fused import (_CEConfig, _DistillConfig, _cross_entropy_apply, _divergence_apply,
                    _logprobs_apply, _options, _take_grads)
from .functional import (_check_int, _check_num_items, _check_real, _check_str, _FLOAT_DTYPES)

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
    opts = _options(group, **dict(fields, reduction=reduction,
                                  num_items_in_batch=0.0 if reduction == "none"
                                  else fields["num_items_in_batch"]))
    _C.vocab_parallel_divergence(s, t, labels, weights, opts, loss, gs, gt)
    return loss, [gs, gt]


class _VPDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, t, labels, weights, fields: dict, group):
        shapes = (s.shape, t.shape)
        s2 = s.detach().reshape(-1, s.shape[-1]).contiguous()
        t2 = t.detach().reshape(-1, t.shape[-1]).contiguous()
        need = tuple(bool(f) for f in ctx.needs_input_grad[:2])
        ctx.fields, ctx.group, ctx.shapes = fields, group, shapes
        reduction = fields["reduction"]
        if reduction == "none":
            # The upstream gradient is per token: backward reruns with it as weights.
            loss, _ = _vp_call(s2, t2, labels, weights, fields, group, (False, False), "none")
            ctx.save_for_backward(s2, t2, labels, weights)
            ctx.need = need
            return loss.reshape(shapes[0][:-1])
        loss, grads = _vp_call(s2, t2, labels, weights, fields, group, need, reduction)
        ctx.grads = [None if g is None else g.reshape(shape) for g, shape in zip(grads, shapes)]
        return loss.reshape(())

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        if ctx.fields["reduction"] == "none":
            s2, t2, labels, weights = ctx.saved_tensors
            w = grad_out.reshape(-1).to(torch.float64)
            if weights is not None:
                w = w * weights
            _, grads = _vp_call(s2, t2, labels, w.contiguous(), ctx.fields, ctx.group, ctx.need,
                                "sum")
            grads = [None if g is None else g.reshape(shape)
                     for g, shape in zip(grads, ctx.shapes)]
        else:
            grads = _take_grads(ctx, grad_out)
        return (*grads, None, None, None, None)


def vocab_parallel_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                              kind: str = "forward_kl", *, process_group=None, labels=None,
                              weights=None, beta: float = 0.5, alpha: float = 0.1,
                              temperature: float = 1.0, scale_by_t_squared: bool = False,
                              ignore_index: int = -100, reduction: str = "mean",
                              num_items_in_batch=None) -> torch.Tensor:
    """:func:`divkit.divergence` over logits whose vocabulary dimension is sharded over the ranks
    of ``process_group`` (each rank passes its shard ``[..., V_r]``, shards contiguous in rank
    order). Same formulas, directions, options and result as the unsharded call; gradients are
    those of the rank's shard (float32)."""
    fn = "vocab_parallel_divergence"
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(x, torch.Tensor) or x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{fn}: {name} must be a float torch.Tensor")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"{fn}: student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape")
    lead = student_logits.shape[:-1]
    lab = None
    if labels is not None:
        lab = labels.detach().reshape(-1).to(torch.int64)
        if tuple(labels.shape) != tuple(lead):
            raise ValueError(f"{fn}: labels has shape {tuple(labels.shape)}, expected {tuple(lead)}")
    wts = None if weights is None else weights.detach().reshape(-1).double().contiguous()
    fields = dict(kind=_check_str("kind", kind, fn), beta=_check_real("beta", beta, fn),
                  alpha=_check_real("alpha", alpha, fn),
                  temperature=_check_real("temperature", temperature, fn),
                  scale_by_t_squared=bool(scale_by_t_squared),
                  ignore_index=_check_int("ignore_index", ignore_index, fn),
                  reduction=_check_str("reduction", reduction, fn),
                  num_items_in_batch=_check_num_items(num_items_in_batch, fn))
    _C.validate_spec(fields["kind"], fields["beta"], fields["alpha"], fields["temperature"],
                     fields["scale_by_t_squared"])
    if process_group is None:
        process_group = dist.group.WORLD
    return _VPDivergence.apply(student_logits, teacher_logits, lab, wts, fields, process_group)


# ---------------------------------------------------------------------------------------------
# Fused linear heads with sharded weights: the core's vocabulary-parallel mode, through fused.py
# ---------------------------------------------------------------------------------------------


def vocab_parallel_fused_linear_divergence(sh, sw, sb, th, tw, tb, labels, weights, ids,
                                           cfg: _DistillConfig, group, lead):
    """:func:`divkit.fused_linear_divergence` on validated arguments, sharded over ``group``."""
    return _divergence_apply(sh, sw, sb, th, tw, tb, labels, weights, ids, cfg, group, lead)


def vocab_parallel_fused_linear_cross_entropy(h, w, b, labels, cfg: _CEConfig, group, lead,
                                              return_stats):
    """:func:`divkit.fused_linear_cross_entropy` on validated arguments, sharded over ``group``."""
    return _cross_entropy_apply(h, w, b, labels, cfg, group, lead, bool(return_stats))


def vocab_parallel_fused_linear_logprobs(h, w, b, labels, temperature, ignore_index,
                                         return_entropy, topk, chunk, group, lead):
    """:func:`divkit.fused_linear_logprobs` on validated arguments, sharded over ``group``."""
    return _logprobs_apply(h, w, b, labels, temperature, ignore_index, bool(return_entropy),
                           topk, chunk, group, lead)
