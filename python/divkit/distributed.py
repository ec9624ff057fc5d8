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

from . import _C, _device, _ops
from . import _validate as check
from .backends import torch_ops
from .functional import _Config, _core_fields
from .fused import (
    _CEConfig,
    _check_same_tokens,
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


def _vp_call(s, t, labels, weights, cfg: _Config, group, need, reduction: str, agree=False):
    """One call on [N, V_r] shards with the options ``cfg`` (``cfg.backend`` picks the engine)
    and ``reduction`` in place of ``cfg.reduction``: (float32 loss, fp32 shard gradients or
    None). The C++ core on CPU tensors; the PyTorch loop (torch.distributed collectives on the
    tensors' device, NCCL for CUDA) elsewhere and for ``backend="torch"``. ``agree``: first check
    that the ranks pass the same tokens (the eager path has done so with its argument checks)."""
    fn = "vocab_parallel_divergence"
    cfg = cfg._replace(
        reduction=reduction,
        num_items_in_batch=0.0 if reduction == "none" else cfg.num_items_in_batch,
    )
    where = _device.route(fn, fn, cfg.backend, (("student_logits", s), ("teacher_logits", t)))
    if agree:
        # Ranks with different token counts would wait on each other's chunks.
        _check_same_tokens(
            fn, group, (), labels, count=s.shape[0], weights=weights, device=s.device
        )
    if not where.core:
        return torch_ops.vocab_parallel_divergence(
            s.detach(), t.detach(), labels, weights, cfg, group, tuple(need), fn=fn
        )
    loss = torch.empty(s.shape[0] if reduction == "none" else 1, dtype=torch.float32)
    gs = torch.empty(s.shape, dtype=torch.float32) if need[0] else None
    gt = torch.empty(t.shape, dtype=torch.float32) if need[1] else None
    opts = _options(group, **_core_fields(cfg))
    _C.vocab_parallel_divergence(s.detach(), t.detach(), labels, weights, opts, loss, gs, gt)
    return loss, [gs, gt]


def _vp_arguments(fn, student_logits, teacher_logits, labels, weights, options: _Config):
    """The validated arguments of vocab_parallel_divergence: (s, t, labels, fp64 weights or
    None, the checked options)."""
    s = check.logits(fn, "student_logits", student_logits, cpu=False)
    t = check.logits(fn, "teacher_logits", teacher_logits, cpu=False)
    _device.common_device(fn, (("student_logits", s), ("teacher_logits", t)))
    check.same_shape(fn, "teacher_logits", t, s, "student_logits")
    lead = s.shape[:-1]
    lab = check.labels(fn, labels, lead, cpu=False)
    wts = None if weights is None else check.per_token(fn, "weights", weights, lead, cpu=False)
    _device.common_device(fn, (("student_logits", s), ("labels", lab), ("weights", wts)))
    wts = None if wts is None else wts.detach().reshape(-1).double().contiguous()
    o = options
    cfg = o._replace(
        kind=check.string(fn, "kind", o.kind),
        beta=check.real(fn, "beta", o.beta),
        alpha=check.real(fn, "alpha", o.alpha),
        temperature=check.real(fn, "temperature", o.temperature),
        scale_by_t_squared=check.boolean(fn, "scale_by_t_squared", o.scale_by_t_squared),
        ignore_index=check.integer(fn, "ignore_index", o.ignore_index),
        reduction=check.reduction(fn, o.reduction),
        num_items_in_batch=check.num_items(fn, o.num_items_in_batch),
    )
    # The nanobind call cannot be traced; under torch.compile the core checks the spec when the
    # op runs.
    if not _ops.compiling():
        _C.validate_spec(
            cfg.kind, cfg.beta, cfg.alpha, cfg.temperature, cfg.scale_by_t_squared, fn=fn
        )
    return s, t, lab, wts, cfg._replace(backend=_device.backend(fn, o.backend))


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
    backend: str = "auto",
) -> torch.Tensor:
    """:func:`divkit.divergence` over logits whose vocabulary dimension is sharded over the ranks
    of ``process_group`` (each rank passes its shard ``[..., V_r]``, shards contiguous in rank
    order). Same formulas, directions, options and result as the unsharded call; gradients are
    those of the rank's shard (float32). Every rank passes the same tokens (labels, weights):
    a difference raises on every rank.

    CPU tensors run the C++ core; CUDA tensors (and ``backend="torch"``) run the same phases in
    PyTorch ops with ``torch.distributed`` collectives on the tensors' device (NCCL for CUDA),
    one chunk of rows at a time. The CUDA path has not yet run on a GPU."""
    fn = "vocab_parallel_divergence"
    if not dist.is_available() or not dist.is_initialized():
        check.fail(
            fn,
            "process_group: torch.distributed is not initialized (call "
            "torch.distributed.init_process_group first; a world of one rank is allowed)",
        )
    group = dist.group.WORLD if process_group is None else process_group
    # A bad argument on one rank must raise on every rank, not leave the others waiting in a
    # collective: the local checks' outcome travels with the tokens' fingerprint.
    error = None
    try:
        options = _Config(
            kind=kind,
            beta=beta,
            alpha=alpha,
            temperature=temperature,
            scale_by_t_squared=scale_by_t_squared,
            ignore_index=ignore_index,
            reduction=reduction,
            num_items_in_batch=num_items_in_batch,
            inplace_grad=False,
            grad_dtype=None,
            backend=backend,
        )
        s, t, lab, wts, cfg = _vp_arguments(
            fn, student_logits, teacher_logits, labels, weights, options
        )
    except check.Error as e:
        error = e
    if _ops.compiling():
        if error is not None:
            raise error
    else:
        x = student_logits if isinstance(student_logits, torch.Tensor) else None
        count = -1 if error is not None else s.numel() // max(s.shape[-1], 1)
        _check_same_tokens(
            fn,
            group,
            (),
            None if error is not None else lab,
            count=count,
            weights=None if error is not None else wts,
            device=x.device if x is not None else torch.device("cpu"),
            error=error,
        )
    lead = s.shape[:-1]
    if _ops.use_ops(s, t, lab, fn=fn):
        s2 = s.reshape(-1, s.shape[-1]).contiguous()
        t2 = t.reshape(-1, t.shape[-1]).contiguous()
        loss = _ops.vocab_parallel_divergence(s2, t2, lab, wts, cfg, group)
        return loss.reshape(lead) if cfg.reduction == "none" else loss.reshape(())

    def call(ts, need, upstream):
        if upstream is None:
            loss, grads = _vp_call(*ts, lab, wts, cfg, group, need, cfg.reduction)
        else:
            loss, grads = _vp_call(*ts, lab, _token_weights(upstream, wts), cfg, group, need, "sum")
        return (loss,), grads

    # reshape / contiguous stay inside the autograd graph (the shard gradients are [N, V_r]).
    loss = _head_loss(
        fn,
        call,
        [s.reshape(-1, s.shape[-1]).contiguous(), t.reshape(-1, t.shape[-1]).contiguous()],
        cfg.reduction != "none",
    )
    return loss.reshape(lead) if cfg.reduction == "none" else loss.reshape(())


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
