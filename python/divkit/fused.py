"""Fused linear-head losses: from hidden states to loss and gradients in chunks of tokens, never
materializing the [tokens x vocabulary] logits (C++ core: include/divkit/fused_linear.h).

For a head ``logits = hidden @ weight.T + bias`` the core computes each chunk's logits with an
fp32 GEMM, the loss and d loss / d logits of the chunk in that buffer, and the gradients of
hidden, weight and bias with two more GEMMs. Peak extra memory is O(chunk x V), independent of
the number of tokens. Inputs may be float32, bfloat16, float16 or float64; they are converted
to fp32 (a weight one block of rows at a time, never as a whole copy) and multiplied and
accumulated in fp32 (no logits rounded to bf16, unlike Liger-Kernel's fused losses). Gradients
come back in each input's dtype.

With ``process_group`` the weights (and biases) are the rank's shard of the vocabulary, a
contiguous block of rows in rank order (as Megatron's vocabulary-parallel head; blocks may differ
in size); every rank passes the same hidden states and labels (global token ids), and gets the
same loss and the gradients of its own shard (and the full hidden-state gradient). The same C++
chunk loop runs on every rank, calling back into ``torch.distributed.all_reduce`` between the
phases of each chunk. See :mod:`divkit.distributed`.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch.autograd.function import once_differentiable

from . import _C
from .functional import (_check_int, _check_num_items, _check_real, _check_str, _type_name,
                         _FLOAT_DTYPES)

__all__ = [
    "fused_linear_divergence",
    "fused_linear_cross_entropy",
    "fused_linear_logprobs",
    "fused_linear_sparse_divergence",
    "LogprobsResult",
]


def _tensor(fn: str, name: str, x, *, ndim: Optional[int] = None, optional: bool = False):
    if x is None:
        if optional:
            return None
        raise TypeError(f"{fn}: {name} is required")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {_type_name(x)}")
    if x.device.type != "cpu":
        raise ValueError(f"{fn}: {name} is on device {x.device}; divkit's kernels run on the CPU")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{fn}: {name} has dtype {x.dtype}; expected torch.float32, "
                        f"torch.bfloat16, torch.float16 or torch.float64")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{fn}: {name} must be {ndim}-D, got shape {tuple(x.shape)}")
    if ndim is None and x.dim() < 1:
        raise ValueError(f"{fn}: {name} must have at least one dimension [..., H]")
    return x


def _labels(fn: str, labels, lead_shape, *, optional: bool = False):
    if labels is None:
        if optional:
            return None
        raise TypeError(f"{fn}: labels are required")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{fn}: labels must be a torch.Tensor, got {_type_name(labels)}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"{fn}: labels must have an integer dtype, got {labels.dtype}")
    if tuple(labels.shape) != tuple(lead_shape):
        raise ValueError(f"{fn}: labels has shape {tuple(labels.shape)}, expected "
                         f"{tuple(lead_shape)} (the hidden states' shape without H)")
    labels = labels.detach().reshape(-1)
    if labels.dtype not in (torch.int32, torch.int64):
        labels = labels.to(torch.int64)
    return labels


def _collective(group):
    """(rank, world size, all_reduce) of a torch.distributed process group, for the core's
    vocabulary-parallel mode: the core calls all_reduce(buffer, op) with a float64 numpy array
    viewing its own buffer, reduced in place over the group."""
    import torch.distributed as dist
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}

    def all_reduce(buffer, op):
        dist.all_reduce(torch.from_numpy(buffer), op=ops[op], group=group)

    return dist.get_rank(group), dist.get_world_size(group), all_reduce


def _options(group=None, **fields) -> "_C.FusedLinearOptions":
    """The core's options object, with the vocabulary-parallel collective of ``group`` if given."""
    opts = _C.FusedLinearOptions()
    for name, value in fields.items():
        setattr(opts, name, value)
    if group is not None:
        opts.rank, opts.world, opts.all_reduce = _collective(group)
    return opts


def _grad_buffer(x: Optional[torch.Tensor], need: bool) -> Optional[torch.Tensor]:
    return torch.empty(x.shape, dtype=x.dtype) if need and x is not None else None


def _chunk(fn: str, chunk_size) -> int:
    if chunk_size is None:
        return 0
    c = _check_int("chunk_size", chunk_size, fn)
    if c < 1:
        raise ValueError(f"{fn}: chunk_size must be >= 1 (or None to choose it), got {c}")
    return c


# ---------------------------------------------------------------------------------------------
# Distillation
# ---------------------------------------------------------------------------------------------


class _DistillConfig(NamedTuple):
    kind: str
    beta: float
    alpha: float
    temperature: float
    scale_by_t_squared: bool
    ignore_index: int
    reduction: str
    num_items_in_batch: float
    hard_weight: float
    soft_weight: float
    chunk_size: int


def _take_grads(ctx, grad_out):
    """The gradients computed in forward, scaled by the (scalar) upstream gradient. They are
    handed over, not kept: with no other reference autograd adopts each one as the leaf's .grad
    instead of copying it (a weight-sized copy saved). A second backward through the same graph
    therefore raises."""
    if ctx.grads is None:
        raise RuntimeError("divkit fused loss: backward was already run through this graph; the "
                           "gradients are computed once, in forward (recompute the loss)")
    grads, ctx.grads = ctx.grads, None
    scale = grad_out.reshape(())
    if bool(scale == 1):
        return grads
    return [None if g is None else g.mul_(scale.to(g.dtype)) for g in grads]


def _distill_options(cfg: _DistillConfig, reduction: str, group) -> "_C.FusedLinearOptions":
    return _options(group, kind=cfg.kind, beta=cfg.beta, alpha=cfg.alpha,
                    temperature=cfg.temperature, scale_by_t_squared=cfg.scale_by_t_squared,
                    ignore_index=cfg.ignore_index, reduction=reduction,
                    num_items_in_batch=cfg.num_items_in_batch if reduction != "none" else 0.0,
                    hard_weight=cfg.hard_weight, soft_weight=cfg.soft_weight,
                    chunk_size=cfg.chunk_size)


def _distill_call(cfg: _DistillConfig, group, sh, sw, sb, th, tw, tb, labels, weights, token_ids,
                  need, reduction: Optional[str] = None):
    """One core call. need: 6 flags (student hidden/weight/bias, teacher hidden/weight/bias).
    Returns (loss, six gradients or None)."""
    reduction = reduction or cfg.reduction
    n = sh.shape[0]
    loss = torch.empty(n if reduction == "none" else 1, dtype=torch.float32)
    grads = [_grad_buffer(x, f) for x, f in zip((sh, sw, sb, th, tw, tb), need)]
    _C.fused_linear_divergence((sh, sw, sb), (th, tw, tb), labels, weights, token_ids,
                               _distill_options(cfg, reduction, group), loss, tuple(grads[:3]),
                               tuple(grads[3:]))
    return loss, grads


class _FusedLinearDivergenceFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sh, sw, sb, th, tw, tb, labels, weights, token_ids, cfg: _DistillConfig,
                group):
        need = tuple(bool(f) for f in ctx.needs_input_grad[:6])
        ctx.cfg, ctx.group = cfg, group
        if cfg.reduction == "none" and any(need):
            # The upstream gradient is per token: backward reruns the chunks with it as weights.
            loss, _ = _distill_call(cfg, group, sh, sw, sb, th, tw, tb, labels, weights,
                                    token_ids, (False,) * 6)
            ctx.save_for_backward(sh, sw, sb, th, tw, tb, labels, weights, token_ids)
            ctx.need = need
            return loss
        loss, grads = _distill_call(cfg, group, sh, sw, sb, th, tw, tb, labels, weights,
                                    token_ids, need)
        ctx.grads = grads
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        cfg: _DistillConfig = ctx.cfg
        if cfg.reduction == "none":
            sh, sw, sb, th, tw, tb, labels, weights, token_ids = ctx.saved_tensors
            w = grad_out.to(torch.float64)
            if weights is not None:
                w = w * weights.to(torch.float64)
            _, grads = _distill_call(cfg, ctx.group, sh, sw, sb, th, tw, tb, labels,
                                     w.contiguous(), token_ids, ctx.need, reduction="sum")
        else:
            grads = _take_grads(ctx, grad_out)
        return (*grads, None, None, None, None, None)


def fused_linear_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    kind: str = "forward_kl",
    *,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    hard_weight: float = 0.0,
    soft_weight: float = 1.0,
    chunk_size: Optional[int] = None,
    process_group=None,
    teacher_token_ids: Optional[torch.Tensor] = None,
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    scale_by_t_squared: bool = False,
    ignore_index: int = -100,
    weights: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    num_items_in_batch=None,
) -> torch.Tensor:
    """Knowledge distillation from hidden states, fused with both linear heads.

    With ``z_s = student_hidden @ student_weight.T + student_bias`` and likewise ``z_t`` for the
    teacher, ``q = softmax(z_s / T)`` (student) and ``p = softmax(z_t / T)`` (teacher)::

        loss = hard_weight * CE(z_s, labels) + soft_weight * D_kind(p, q)

    where ``D_kind`` is any divergence of :func:`divkit.divergence` with its direction
    (``forward_kl`` = KL(p_teacher || q_student), ``reverse_kl`` = KL(q_student || p_teacher),
    ``jsd`` with ``beta`` as TRL's generalized_jsd_loss, ...), and CE the plain cross-entropy of
    the student's logits at temperature 1 (Hinton et al. 2015; TRL's GKD and Liger's
    distillation losses combine the two this way). Both terms are reduced alike (``reduction``,
    ``num_items_in_batch``, tokens with ``labels == ignore_index`` excluded; ``weights``
    multiplies both terms per token).

    Shapes: ``student_hidden [..., Hs]``, ``student_weight [V, Hs]``, ``teacher_hidden [...,
    Ht]``, ``teacher_weight [V_t, Ht]``, biases ``[V]``, labels ``[...]``. The hidden sizes may
    differ. A teacher vocabulary larger than the student's needs ``teacher_token_ids [V]``: the
    teacher's row of each student token (``torch.arange(V)`` truncates); the teacher
    distribution is then renormalized over those tokens. Never padded with logit 0.

    dtypes: float32, bfloat16, float16 or float64; computed in fp32 (fp32 GEMMs, fp32 logits,
    fp64 row sums); the loss is float32; gradients are in each input's dtype. Gradients flow to
    every input that requires grad, the teacher's too (online distillation).

    Memory: O(chunk_size x V) extra (default: about 256 MiB of logits per chunk buffer, 32 to
    1024 tokens), plus an fp32 accumulator for a weight gradient that is not fp32. With a reduced loss the gradients are computed in the forward call (as Liger
    does); with ``reduction="none"`` the backward reruns the chunks with the upstream gradient
    as weights.
    """
    fn = "fused_linear_divergence"
    sh = _tensor(fn, "student_hidden", student_hidden)
    sw = _tensor(fn, "student_weight", student_weight, ndim=2)
    th = _tensor(fn, "teacher_hidden", teacher_hidden)
    tw = _tensor(fn, "teacher_weight", teacher_weight, ndim=2)
    sb = _tensor(fn, "student_bias", student_bias, ndim=1, optional=True)
    tb = _tensor(fn, "teacher_bias", teacher_bias, ndim=1, optional=True)
    lead = sh.shape[:-1]
    if tuple(th.shape[:-1]) != tuple(lead):
        raise ValueError(f"{fn}: teacher_hidden has shape {tuple(th.shape)} and student_hidden "
                         f"{tuple(sh.shape)}: the token dimensions must agree")
    lab = _labels(fn, labels, lead, optional=True)
    if weights is not None:
        if not isinstance(weights, torch.Tensor) or not weights.is_floating_point():
            raise TypeError(f"{fn}: weights must be a floating torch.Tensor or None")
        if tuple(weights.shape) != tuple(lead):
            raise ValueError(f"{fn}: weights has shape {tuple(weights.shape)}, expected "
                             f"{tuple(lead)}")
        weights = weights.detach().reshape(-1)
        if weights.dtype not in (torch.float32, torch.float64):
            weights = weights.to(torch.float32)
    ids = None
    if teacher_token_ids is not None:
        if not isinstance(teacher_token_ids, torch.Tensor) or teacher_token_ids.is_floating_point():
            raise TypeError(f"{fn}: teacher_token_ids must be an integer torch.Tensor")
        ids = teacher_token_ids.detach().reshape(-1)
        if ids.dtype not in (torch.int32, torch.int64):
            ids = ids.to(torch.int64)
    cfg = _DistillConfig(
        kind=_check_str("kind", kind, fn), beta=_check_real("beta", beta, fn),
        alpha=_check_real("alpha", alpha, fn),
        temperature=_check_real("temperature", temperature, fn),
        scale_by_t_squared=bool(scale_by_t_squared),
        ignore_index=_check_int("ignore_index", ignore_index, fn),
        reduction=_check_str("reduction", reduction, fn),
        num_items_in_batch=_check_num_items(num_items_in_batch, fn),
        hard_weight=_check_real("hard_weight", hard_weight, fn),
        soft_weight=_check_real("soft_weight", soft_weight, fn),
        chunk_size=_chunk(fn, chunk_size))
    return _divergence_apply(sh, sw, sb, th, tw, tb, lab, weights, ids, cfg, process_group, lead)


def _divergence_apply(sh, sw, sb, th, tw, tb, labels, weights, ids, cfg: _DistillConfig, group,
                      lead):
    """fused_linear_divergence on validated arguments (group: a vocabulary-parallel process
    group, or None)."""
    # reshape / contiguous stay inside the autograd graph.
    loss = _FusedLinearDivergenceFunction.apply(
        _contig_rows(sh.reshape(-1, sh.shape[-1])), _contig_rows(sw), sb,
        _contig_rows(th.reshape(-1, th.shape[-1])), _contig_rows(tw), tb, labels, weights, ids,
        cfg, group)
    if cfg.reduction == "none":
        return loss.reshape(lead)
    return loss.reshape(())


def _contig_rows(x: torch.Tensor) -> torch.Tensor:
    """[N, H] with unit column stride and non-overlapping rows (a copy only when needed)."""
    if x.shape[1] > 1 and x.stride(1) != 1 or (x.shape[0] > 1 and x.stride(0) < x.shape[1]):
        return x.contiguous()
    return x


class _FusedLinearSparseFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sh, sw, sb, idx, lp, labels, weights, tail: str, cfg: _DistillConfig):
        need = tuple(bool(f) for f in ctx.needs_input_grad[:3])
        ctx.cfg, ctx.tail, ctx.need = cfg, tail, need
        if cfg.reduction == "none" and any(need):
            loss, _ = _sparse_call(cfg, tail, sh, sw, sb, idx, lp, labels, weights, (False,) * 3)
            ctx.save_for_backward(sh, sw, sb, idx, lp, labels, weights)
            return loss
        loss, ctx.grads = _sparse_call(cfg, tail, sh, sw, sb, idx, lp, labels, weights, need)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        cfg = ctx.cfg
        if cfg.reduction == "none":
            sh, sw, sb, idx, lp, labels, weights = ctx.saved_tensors
            w = grad_out.to(torch.float64)
            if weights is not None:
                w = w * weights.to(torch.float64)
            _, grads = _sparse_call(cfg, ctx.tail, sh, sw, sb, idx, lp, labels, w.contiguous(),
                                    ctx.need, reduction="sum")
        else:
            grads = _take_grads(ctx, grad_out)
        return (*grads, None, None, None, None, None, None)


def _sparse_call(cfg, tail, sh, sw, sb, idx, lp, labels, weights, need, reduction=None):
    reduction = reduction or cfg.reduction
    loss = torch.empty(sh.shape[0] if reduction == "none" else 1, dtype=torch.float32)
    grads = [_grad_buffer(x, f) for x, f in zip((sh, sw, sb), need)]
    opts = _distill_options(cfg, reduction, None)
    opts.tail = tail
    _C.fused_linear_sparse_divergence(
        (sh.detach(), sw.detach(), None if sb is None else sb.detach()), idx, lp, labels, weights,
        opts, loss, tuple(grads))
    return loss, grads


def fused_linear_sparse_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_indices: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    kind: str = "forward_kl",
    *,
    tail: str = "bucket",
    student_bias: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    hard_weight: float = 0.0,
    soft_weight: float = 1.0,
    chunk_size: Optional[int] = None,
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    scale_by_t_squared: bool = False,
    ignore_index: int = -100,
    weights: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    num_items_in_batch=None,
) -> torch.Tensor:
    """Distillation from a sparse top-k teacher (an inference server's ``top_logprobs``), fused
    with the student's linear head: ``hard_weight * CE(z_s, labels) + soft_weight *
    D_kind(p_teacher, q_student)`` where ``z_s = student_hidden @ student_weight.T +
    student_bias``, the teacher is given by ``teacher_indices [..., k]`` and
    ``teacher_logprobs [..., k]``, and ``D_kind`` and ``tail`` are as in
    :func:`divkit.sparse_divergence` (``"bucket"``: the k entries plus one tail bucket;
    ``"renormalize"``: both sides renormalized over the k entries). Directions as there
    (``forward_kl`` = KL(p_teacher || q_student)); the temperature divides the student's logits
    only. Never materializes the student's [tokens x V] logits: O(chunk x V) extra memory.
    dtypes: float32 / bfloat16 / float16 / float64 hidden states and weight, computed in fp32;
    gradients (student hidden, weight, bias) in the inputs' dtypes.
    """
    fn = "fused_linear_sparse_divergence"
    sh = _tensor(fn, "student_hidden", student_hidden)
    sw = _tensor(fn, "student_weight", student_weight, ndim=2)
    sb = _tensor(fn, "student_bias", student_bias, ndim=1, optional=True)
    lead = sh.shape[:-1]
    for name, x in (("teacher_indices", teacher_indices), ("teacher_logprobs", teacher_logprobs)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {_type_name(x)}")
        if tuple(x.shape[:-1]) != tuple(lead) or x.dim() != len(lead) + 1:
            raise ValueError(f"{fn}: {name} has shape {tuple(x.shape)}, expected "
                             f"{tuple(lead)} + (k,)")
    if isinstance(teacher_logprobs, torch.Tensor) and teacher_logprobs.requires_grad:
        raise ValueError(f"{fn}: teacher_logprobs requires grad; a sparse teacher gets no "
                         f"gradient (pass teacher_logprobs.detach())")
    idx = teacher_indices.detach().reshape(-1, teacher_indices.shape[-1]).contiguous()
    lp = teacher_logprobs.detach().reshape(-1, teacher_logprobs.shape[-1]).contiguous()
    lab = _labels(fn, labels, lead, optional=True)
    if weights is not None:
        weights = weights.detach().reshape(-1).to(torch.float64).contiguous()
    cfg = _DistillConfig(
        kind=_check_str("kind", kind, fn), beta=_check_real("beta", beta, fn),
        alpha=_check_real("alpha", alpha, fn),
        temperature=_check_real("temperature", temperature, fn),
        scale_by_t_squared=bool(scale_by_t_squared),
        ignore_index=_check_int("ignore_index", ignore_index, fn),
        reduction=_check_str("reduction", reduction, fn),
        num_items_in_batch=_check_num_items(num_items_in_batch, fn),
        hard_weight=_check_real("hard_weight", hard_weight, fn),
        soft_weight=_check_real("soft_weight", soft_weight, fn),
        chunk_size=_chunk(fn, chunk_size))
    loss = _FusedLinearSparseFunction.apply(
        _contig_rows(sh.reshape(-1, sh.shape[-1])), _contig_rows(sw), sb, idx, lp, lab, weights,
        _check_str("tail", tail, fn), cfg)
    return loss.reshape(lead) if cfg.reduction == "none" else loss.reshape(())


# ---------------------------------------------------------------------------------------------
# Cross-entropy
# ---------------------------------------------------------------------------------------------


class _CEConfig(NamedTuple):
    ignore_index: int
    label_smoothing: float
    lse_square_scale: float
    softcap: float
    reduction: str
    num_items_in_batch: float
    chunk_size: int


def _head(h, w, b):
    return (h.detach(), w.detach(), None if b is None else b.detach())


def _ce_options(cfg: _CEConfig, reduction: str, group) -> "_C.FusedLinearOptions":
    return _options(group, ignore_index=cfg.ignore_index, label_smoothing=cfg.label_smoothing,
                    z_loss_scale=cfg.lse_square_scale, softcap=cfg.softcap, reduction=reduction,
                    num_items_in_batch=cfg.num_items_in_batch, chunk_size=cfg.chunk_size)


class _FusedLinearCEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, b, labels, cfg: _CEConfig, want_stats: bool, group):
        need = tuple(bool(f) for f in ctx.needs_input_grad[:3])
        n = h.shape[0]
        reduction = cfg.reduction
        loss = torch.empty(n if reduction == "none" else 1, dtype=torch.float32)
        compute_grads = any(need) and reduction != "none"
        grads = [_grad_buffer(x, f and compute_grads) for x, f in zip((h, w, b), need)]
        logprobs = torch.empty(n, dtype=torch.float32) if want_stats else None
        entropy = torch.empty(n, dtype=torch.float32) if want_stats else None
        _C.fused_linear_cross_entropy(_head(h, w, b), labels, None,
                                      _ce_options(cfg, reduction, group), loss, tuple(grads),
                                      (logprobs, entropy, None, None))
        ctx.cfg, ctx.grads, ctx.need, ctx.group = cfg, grads, need, group
        if reduction == "none" and any(need):
            ctx.save_for_backward(h, w, b, labels)
        outs = (loss,) + ((logprobs, entropy) if want_stats else ())
        if want_stats:
            ctx.mark_non_differentiable(logprobs, entropy)
        return outs if want_stats else loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, *unused):
        cfg: _CEConfig = ctx.cfg
        if cfg.reduction == "none":
            # Per-token upstream gradients: rerun the chunks with them as token weights.
            h, w, b, labels = ctx.saved_tensors
            grads = [_grad_buffer(x, f) for x, f in zip((h, w, b), ctx.need)]
            loss = torch.empty(1, dtype=torch.float32)
            _C.fused_linear_cross_entropy(
                _head(h, w, b), labels, grad_out.reshape(-1).to(torch.float64).contiguous(),
                _ce_options(cfg._replace(num_items_in_batch=0.0), "sum", ctx.group), loss,
                tuple(grads), (None,) * 4)
            return (*grads, None, None, None, None)
        return (*_take_grads(ctx, grad_out), None, None, None, None)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    softcap: Optional[float] = None,
    reduction: str = "mean",
    num_items_in_batch=None,
    chunk_size: Optional[int] = None,
    return_stats: bool = False,
    process_group=None,
):
    """Cross-entropy of ``logits = hidden @ weight.T + bias`` against ``labels``, fused.

    As ``torch.nn.functional.cross_entropy(logits, labels, ignore_index, reduction,
    label_smoothing)`` with Liger-Kernel's extra options, on ``z = softcap * tanh(logits /
    softcap)`` when ``softcap`` is given (Gemma 2)::

        loss_i = (1 - eps) (lse_i - z_{i,y}) + eps (lse_i - mean_j z_ij) + lse_square_scale * lse_i^2

    (label smoothing ``eps`` as PyTorch; z-loss as PaLM / Liger's ``lse_square_scale``).
    ``reduction``: none | sum | mean (over non-ignored tokens) | batchmean; ``num_items_in_batch``
    divides the sum instead (Hugging Face gradient accumulation).

    Shapes: ``hidden [..., H]``, ``weight [V, H]``, ``bias [V]``, ``labels [...]``; labels must
    be in ``[0, V)`` or ``ignore_index``. dtypes: float32 / bfloat16 / float16 / float64,
    computed in fp32; gradients in the inputs' dtypes. With ``return_stats=True`` returns
    ``(loss, logprobs, entropy)``, the per-token ``log p(label)`` and entropy of the (softcapped)
    distribution, not differentiable.
    """
    fn = "fused_linear_cross_entropy"
    h = _tensor(fn, "hidden", hidden)
    w = _tensor(fn, "weight", weight, ndim=2)
    b = _tensor(fn, "bias", bias, ndim=1, optional=True)
    lead = h.shape[:-1]
    lab = _labels(fn, labels, lead)
    cap = 0.0 if softcap is None else _check_real("softcap", softcap, fn)
    if softcap is not None and not cap > 0:
        raise ValueError(f"{fn}: softcap must be > 0 (or None), got {cap:g}")
    cfg = _CEConfig(ignore_index=_check_int("ignore_index", ignore_index, fn),
                    label_smoothing=_check_real("label_smoothing", label_smoothing, fn),
                    lse_square_scale=_check_real("lse_square_scale", lse_square_scale, fn),
                    softcap=cap, reduction=_check_str("reduction", reduction, fn),
                    num_items_in_batch=_check_num_items(num_items_in_batch, fn),
                    chunk_size=_chunk(fn, chunk_size))
    return _cross_entropy_apply(h, w, b, lab, cfg, process_group, lead, bool(return_stats))


def _cross_entropy_apply(h, w, b, labels, cfg: _CEConfig, group, lead, return_stats: bool):
    """fused_linear_cross_entropy on validated arguments (group: a vocabulary-parallel process
    group, or None)."""
    h2 = _contig_rows(h.reshape(-1, h.shape[-1]))
    out = _FusedLinearCEFunction.apply(h2, _contig_rows(w), b, labels, cfg, return_stats, group)
    if return_stats:
        loss, logprobs, entropy = out
        loss = loss.reshape(lead) if cfg.reduction == "none" else loss.reshape(())
        return loss, logprobs.reshape(lead), entropy.reshape(lead)
    return out.reshape(lead) if cfg.reduction == "none" else out.reshape(())


# ---------------------------------------------------------------------------------------------
# Selective log-softmax
# ---------------------------------------------------------------------------------------------


class LogprobsResult(NamedTuple):
    """Per-token outputs of :func:`fused_linear_logprobs` (each shaped like ``labels``)."""

    logprobs: torch.Tensor
    entropy: Optional[torch.Tensor]
    topk_mass: Optional[torch.Tensor]


class _FusedLinearLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, b, labels, ignore_index: int, temperature: float, chunk: int,
                want_entropy: bool, topk: int, group):
        n = h.shape[0]
        logprobs = torch.empty(n, dtype=torch.float32)
        entropy = torch.empty(n, dtype=torch.float32) if want_entropy else None
        topk_mass = torch.empty(n, dtype=torch.float32) if topk > 0 else None
        opts = _options(group, ignore_index=ignore_index, temperature=temperature,
                        chunk_size=chunk, topk=topk)
        _C.fused_linear_logprobs(_head(h, w, b), labels, opts, (logprobs, entropy, None, topk_mass))
        ctx.save_for_backward(h, w, b, labels)
        ctx.args = (ignore_index, temperature, chunk, group)
        if topk_mass is not None:
            ctx.mark_non_differentiable(topk_mass)
        return logprobs, entropy, topk_mass

    @staticmethod
    @once_differentiable
    def backward(ctx, g_logprobs, g_entropy, _unused):
        h, w, b, labels = ctx.saved_tensors
        ignore_index, temperature, chunk, group = ctx.args
        need = ctx.needs_input_grad[:3]
        grads = [_grad_buffer(x, f) for x, f in zip((h, w, b), need)]
        gl = None if g_logprobs is None else g_logprobs.to(torch.float64).contiguous()
        ge = None if g_entropy is None else g_entropy.to(torch.float64).contiguous()
        opts = _options(group, ignore_index=ignore_index, temperature=temperature,
                        chunk_size=chunk)
        _C.fused_linear_logprobs_backward(_head(h, w, b), labels, opts, gl, ge, tuple(grads))
        return (*grads, None, None, None, None, None, None, None)


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    topk: Optional[int] = None,
    chunk_size: Optional[int] = None,
    process_group=None,
):
    """Per-token ``log p(label)`` of ``p = softmax((hidden @ weight.T + bias) / temperature)``
    without materializing the logits (TRL's ``selective_log_softmax`` fused with the lm_head;
    what DPO, GRPO and PPO need of the policy). Tokens with ``labels == ignore_index`` give 0.

    Returns the log-probs ``[...]`` (float32), differentiable with respect to hidden, weight and
    bias; the backward recomputes each chunk's logits (nothing of size V is kept). With
    ``return_entropy=True`` or ``topk=k`` returns a :class:`LogprobsResult` with the per-token
    entropy ``-sum_j p_j log p_j`` (differentiable) and the top-k probability mass (not
    differentiable), the likelihood over-optimisation indicators of Shi et al. 2024.
    dtypes: float32 / bfloat16 / float16 / float64 inputs, computed in fp32.
    """
    fn = "fused_linear_logprobs"
    h = _tensor(fn, "hidden", hidden)
    w = _tensor(fn, "weight", weight, ndim=2)
    b = _tensor(fn, "bias", bias, ndim=1, optional=True)
    lead = h.shape[:-1]
    lab = _labels(fn, labels, lead)
    temperature = _check_real("temperature", temperature, fn)
    ignore_index = _check_int("ignore_index", ignore_index, fn)
    k = 0 if topk is None else _check_int("topk", topk, fn)
    if topk is not None and k < 1:
        raise ValueError(f"{fn}: topk must be >= 1 (or None), got {k}")
    chunk = _chunk(fn, chunk_size)
    return _logprobs_apply(h, w, b, lab, temperature, ignore_index, bool(return_entropy), k, chunk,
                           process_group, lead)


def _logprobs_apply(h, w, b, labels, temperature, ignore_index, return_entropy: bool, topk: int,
                    chunk: int, group, lead):
    """fused_linear_logprobs on validated arguments (topk 0: not asked for; group: a
    vocabulary-parallel process group, or None)."""
    h2 = _contig_rows(h.reshape(-1, h.shape[-1]))
    logprobs, entropy, topk_mass = _FusedLinearLogprobsFunction.apply(
        h2, _contig_rows(w), b, labels, ignore_index, temperature, chunk, return_entropy, topk,
        group)
    logprobs = logprobs.reshape(lead)
    if not return_entropy and not topk:
        return logprobs
    return LogprobsResult(logprobs, None if entropy is None else entropy.reshape(lead),
                          None if topk_mass is None else topk_mass.reshape(lead))
