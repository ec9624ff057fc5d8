"""Distillation from sparse (top-k) and truncated teachers.

:func:`sparse_divergence` takes the teacher as the top-k log-probabilities an inference server
returns (vLLM / OpenAI-style ``top_logprobs``): indices and log-probabilities per token, against
the student's full logits. :func:`topk_divergence` truncates full teacher logits to their top-k
(OstQuant's KL-Top). Both are autograd Functions over divkit's C++ kernels, and
``torch.library`` custom ops when traced or under vmap (:mod:`divkit._ops`); the argument
conventions are those of :func:`divkit.divergence`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch

from . import _C, _device, _ops, memory
from . import _validate as check
from ._autograd import grads_in_forward
from .backends import torch_ops
from .functional import (
    _check_inplace,
    _check_inplace_dtype,
    _check_label_range,
    _Config,
    _core_args,
    _inplace_needs_a_copy,
    _parse_options,
    _rows,
    _scaling,
)

__all__ = ["sparse_divergence", "topk_divergence", "TAILS"]

#: Names accepted by ``tail``.
TAILS = ("bucket", "renormalize")

_LOGPROB_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def _check_teacher_part(fn: str, name: str, x: Any, lead_shape: torch.Size) -> torch.Tensor:
    """teacher_indices / teacher_logprobs: dense tensors [..., k] with the logits' leading shape
    (on the logits' device: _device.route checked it)."""
    check.tensor(fn, name, x, dtypes=None, dense=True, cpu=False)
    if x.dim() != len(lead_shape) + 1 or tuple(x.shape[:-1]) != tuple(lead_shape):
        check.fail(
            fn,
            f"{name} has shape {tuple(x.shape)}, expected "
            f"{tuple(lead_shape) + ('k',)} (student_logits' shape with k in place of "
            f"V)",
        )
    return x


def _run(student: torch.Tensor, kernel: Callable, cfg: _Config, need_s: bool):
    """Runs kernel(s2, loss, grad_s2) -> loss on the [N, V] rows of student: (loss, grad_s), the
    loss in its reduced shape, grad_s in the logits' shape (None unless need_s)."""
    lead_shape = student.shape[:-1]
    v = student.shape[-1]
    n = math.prod(lead_shape)
    s2 = _rows(student.detach(), n, v)
    dev = student.device
    loss = torch.empty(n if cfg.reduction == "none" else 1, dtype=torch.float32, device=dev)
    grad_s = grad_s2 = None
    if need_s:
        if cfg.inplace_grad:
            grad_s2 = s2
            grad_s = s2.view(student.shape)
        else:
            grad_s = memory._empty(student.shape, cfg.grad_dtype or student.dtype, dev)
            grad_s2 = grad_s.view(n, v)
    loss = kernel(s2, loss, grad_s2)
    if cfg.inplace_grad and grad_s2 is not None:
        # The logits now hold the gradient: moving their version counter (shared by views and
        # detached aliases) makes autograd raise if an operation saved them for its backward,
        # instead of computing with the gradient (as divkit.divergence does).
        _ops.increment_version(s2)
    loss = loss.reshape(lead_shape) if cfg.reduction == "none" else loss.reshape(())
    return loss, grad_s


def _apply(fn: str, student: torch.Tensor, kernel: Callable, cfg: _Config, others: tuple = ()):
    """The loss of kernel (see :func:`_run`), under autograd when the student requires grad (the
    gradient is computed in forward, as divkit.divergence's)."""
    need_s = torch.is_grad_enabled() and student.requires_grad
    if not need_s:
        return _run(student, kernel, cfg, False)[0]
    _check_inplace(fn, student, cfg, others)
    if cfg.inplace_grad and _inplace_needs_a_copy(fn, student):
        cfg = cfg._replace(inplace_grad=False)

    def run(need):
        loss, grad_s = _run(student, kernel, cfg, need[0])
        return loss, (grad_s,)

    return grads_in_forward(run, (student,), _scaling(fn, cfg))


def _core_or_args(route: Optional[_device.Route], cfg: _Config):
    """The core's options object for route (None: the CPU core, as the ops pass it)."""
    args = _core_args(cfg)
    return args if route is None else route.core_args(args)


def _sparse_kernel(idx, lp, tail, labels, weights, cfg: _Config, route, fn: str):
    """kernel(s2, loss, grad_s2) of sparse_divergence; idx and lp are [..., k]."""
    n, k = math.prod(idx.shape[:-1]), idx.shape[-1]
    # n explicit: k = 0 must reach the core's check, which -1 cannot reshape to.
    idx2, lp2 = idx.reshape(n, k), lp.reshape(n, k)

    def kernel(s2, loss, grad_s2):
        if route is not None and not route.core:
            return torch_ops.sparse_divergence(
                s2, idx2, lp2, tail, labels, weights, cfg, grad_s2, fn=fn
            )
        args = _core_or_args(route, cfg)
        _C.sparse_divergence(s2, idx2, lp2, loss, grad_s2, labels, weights, tail, args)
        return loss

    return kernel


def _topk_kernel(teacher, k: int, labels, weights, cfg: _Config, route, fn: str):
    """kernel(s2, loss, grad_s2) of topk_divergence; teacher is [..., V]."""
    v = teacher.shape[-1]
    t2 = _rows(teacher.detach(), math.prod(teacher.shape[:-1]), v)

    def kernel(s2, loss, grad_s2):
        if route is not None and not route.core:
            return torch_ops.topk_divergence(s2, t2, k, labels, weights, cfg, grad_s2, fn=fn)
        args = _core_or_args(route, cfg)
        _C.topk_divergence(s2, t2, k, loss, grad_s2, labels, weights, args)
        return loss

    return kernel


def _op_path(fn: str, student: torch.Tensor, cfg: _Config, tensors) -> Optional[_Config]:
    """The options for the custom op when the call goes through it (traced, under vmap, on
    subclasses; every call with DIVKIT_CUSTOM_OPS=always), else None. A traced call drops
    inplace_grad (a compiled graph owns its buffers); an eager in-place call stays on the
    autograd.Function path, the only one that writes into the logits."""
    need_s = torch.is_grad_enabled() and student.requires_grad
    if cfg.inplace_grad and need_s and _ops.traced(student, *tensors):
        _check_inplace_dtype(fn, student, cfg)
        cfg = cfg._replace(inplace_grad=False)
    if cfg.inplace_grad and need_s:
        return None
    if not _ops.use_ops(student, *tensors, fn=fn):
        return None
    return cfg._replace(inplace_grad=False)


def _op_options(cfg: _Config) -> tuple:
    """The ops' scalar arguments, in their order (inplace_grad is not one of them)."""
    return (
        cfg.kind,
        cfg.beta,
        cfg.alpha,
        cfg.temperature,
        cfg.scale_by_t_squared,
        cfg.ignore_index,
        cfg.reduction,
        cfg.num_items_in_batch,
        cfg.grad_dtype,
        cfg.backend,
    )


def _teacher_fixed(fn: str, name: str, x: torch.Tensor) -> torch.Tensor:
    return check.no_grad(fn, name, x, "divkit computes no gradient with respect to the teacher")


@check.public("sparse_divergence")
def sparse_divergence(
    student_logits: torch.Tensor,
    teacher_indices: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    kind: str = "forward_kl",
    *,
    tail: str = "bucket",
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    weights: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    num_items_in_batch=None,
    scale_by_t_squared: bool = False,
    inplace_grad: bool = False,
    grad_dtype: Optional[torch.dtype] = None,
    backend: str = "auto",
):
    r"""Divergence between a top-k teacher (as an inference server returns it) and the student.

    The teacher of each token is given by k (index, log-probability) pairs: ``teacher_indices``
    ``[..., k]`` into the vocabulary and ``teacher_logprobs`` ``[..., k]``, e.g. the
    ``top_logprobs`` of vLLM or an OpenAI-compatible server. The student is its full logits
    ``s`` ``[..., V]``; with temperature ``T``, ``q = softmax(s / T)``. ``tail`` says what happens
    to the probability outside the k entries:

    ``"bucket"`` (default)
        k + 1 buckets: the k entries and the tail. p_b = exp(lp_b) and
        p_tail = 1 - sum_b p_b (computed as -expm1(logsumexp(lp)), >= 0); q_b = q[i_b] and
        q_tail = the student's mass outside the k indices (summed directly, no cancellation).
        D(p, q) over the k + 1 buckets; every student logit gets a gradient (the tail's spreads
        over the non-top-k logits through the softmax). With k = V it is ``"renormalize"``.
        Probabilities summing to slightly more than 1 (rounding, up to 1.01) are scaled to 1.
    ``"renormalize"``
        p_b = exp(lp_b) / sum_c exp(lp_c) and q_b = q[i_b] / sum_c q[i_c] over the k entries;
        D(p, q) over them. The gradient is 0 outside the k indices.

    ``kind`` and its parameters are those of :func:`divkit.divergence` (``forward_kl`` =
    KL(p_teacher || q_student), ``reverse_kl`` = KL(q_student || p_teacher), ``jsd``, ``skew_*``,
    ``tvd``, ``hellinger``, ``jeffreys``, ``chi2``, ``alpha_divergence``, ``renyi``,
    ``cross_entropy``), applied to the bucket distributions.

    **Temperature** divides the student logits only. The teacher log-probabilities are used as
    given: a server reports them for the distribution it computed (its sampling temperature, or
    the raw one: vLLM's ``logprobs_mode`` chooses raw or processed values), and the tail
    1 - sum p is only meaningful for that distribution. To temper the teacher with
    ``tail="renormalize"``, pass ``logprobs / T``
    (renormalization makes it exactly softmax(t / T) over the k entries).

    Args:
        student_logits: ``[..., V]`` CPU tensor, float32, bfloat16, float16 or float64.
        teacher_indices: ``[..., k]`` integer tensor (int32 or int64 used as is; other integer
            dtypes are converted), distinct indices in [0, V) per token.
        teacher_logprobs: ``[..., k]`` float32, float64 or bfloat16 (float16 is converted)
            log-probabilities: <= 0 (up to 1e-3 of rounding), ``-inf`` for probability 0, not NaN.
        kind, beta, alpha, temperature, labels, ignore_index, weights, reduction,
        num_items_in_batch, scale_by_t_squared, inplace_grad, grad_dtype: as in
            :func:`divkit.divergence`. An ignored token's logits, indices and logprobs are not
            read (servers' padding may hold anything).
        tail: ``"bucket"`` or ``"renormalize"``.
        backend: ``"auto"``, ``"core"`` or ``"torch"``, as in :func:`divkit.divergence`.

    Returns:
        The float32 loss (a scalar, or ``[...]`` for ``reduction="none"``); differentiable with
        respect to ``student_logits``. The teacher gets no gradient: a teacher tensor that
        requires grad raises ``ValueError`` (pass it detached).

    Raises ``divkit.Error`` (a ValueError) naming the argument for duplicate or out-of-range
    indices, k > V, positive or NaN logprobs, mismatched shapes, NaN/+inf student logits.

    Example (vLLM's ``top_logprobs`` turned into tensors)::

        loss = divkit.sparse_divergence(student_logits, top_ids, top_logprobs, "forward_kl",
                                        tail="bucket", labels=labels)
    """
    fn = "sparse_divergence"
    cfg = _parse_options(
        fn,
        kind,
        beta,
        alpha,
        temperature,
        ignore_index,
        reduction,
        num_items_in_batch,
        scale_by_t_squared,
        inplace_grad,
        grad_dtype,
        backend,
    )
    tail = check.string(fn, "tail", tail)
    route = _device.route(
        fn,
        fn,
        cfg.backend,
        (
            ("student_logits", student_logits),
            ("teacher_indices", teacher_indices),
            ("teacher_logprobs", teacher_logprobs),
            ("labels", labels),
            ("weights", weights),
        ),
    )
    student = check.logits(fn, "student_logits", student_logits, cpu=False)
    lead_shape = student.shape[:-1]
    idx = _check_teacher_part(fn, "teacher_indices", teacher_indices, lead_shape)
    lp = _check_teacher_part(fn, "teacher_logprobs", teacher_logprobs, lead_shape)
    if tuple(idx.shape) != tuple(lp.shape):
        check.fail(
            fn,
            f"teacher_indices has shape {tuple(idx.shape)} but teacher_logprobs has "
            f"shape {tuple(lp.shape)}; they must match",
        )
    check.integral(fn, "teacher_indices", idx)
    check.floating(fn, "teacher_logprobs", lp)
    _teacher_fixed(fn, "teacher_logprobs", lp)
    idx = idx.detach()
    if idx.dtype not in (torch.int32, torch.int64):
        idx = idx.to(torch.int64)
    lp = lp.detach()
    if lp.dtype not in _LOGPROB_DTYPES:
        lp = lp.to(torch.float32)
    labels_t = check.labels(fn, labels, lead_shape, cpu=False)
    _check_label_range(fn, labels_t, student, cfg.ignore_index)
    weights_t = check.weights(fn, weights, lead_shape, cpu=False)
    op_cfg = _op_path(fn, student, cfg, (idx, lp, labels_t, weights_t))
    if op_cfg is not None:
        return _ops.sparse_divergence_op(
            student,
            idx,
            lp,
            labels_t,
            weights_t,
            *_op_options(op_cfg),
            tail,
            torch.is_grad_enabled() and student.requires_grad,
        )[0]
    kernel = _sparse_kernel(idx, lp, tail, labels_t, weights_t, cfg, route, fn)
    return _apply(fn, student, kernel, cfg, (("teacher_indices", idx), ("teacher_logprobs", lp)))


@check.public("topk_divergence")
def topk_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    k: int,
    kind: str = "forward_kl",
    *,
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    weights: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    num_items_in_batch=None,
    scale_by_t_squared: bool = False,
    inplace_grad: bool = False,
    grad_dtype: Optional[torch.dtype] = None,
    backend: str = "auto",
):
    r"""Divergence over the teacher's top-k vocabulary entries (OstQuant's KL-Top).

    Per token, the k indices of the teacher's largest logits are selected (ties go to the lowest
    index: larger logit first, then lower index, so the selection is deterministic); then
    p = softmax(t / T) and q = softmax(s / T) restricted to those k entries and renormalized,
    and D(p, q) over them, for any ``kind`` of :func:`divkit.divergence` (``forward_kl`` =
    KL(p_teacher || q_student), ...). The gradient w.r.t. the student logits is 0 outside the k
    entries; the teacher gets none (pass it detached). Hu et al. 2025, "OstQuant" (KL-Top loss).

    Args:
        student_logits, teacher_logits: ``[..., V]`` CPU tensors of float32, bfloat16, float16
            or float64 (the dtypes may differ).
        k: 1 <= k <= V.
        the rest (``backend`` included): as in :func:`divkit.divergence`.

    Returns:
        The float32 loss, differentiable with respect to ``student_logits``.
    """
    fn = "topk_divergence"
    cfg = _parse_options(
        fn,
        kind,
        beta,
        alpha,
        temperature,
        ignore_index,
        reduction,
        num_items_in_batch,
        scale_by_t_squared,
        inplace_grad,
        grad_dtype,
        backend,
    )
    k = check.integer(fn, "k", k)
    route = _device.route(
        fn,
        fn,
        cfg.backend,
        (
            ("student_logits", student_logits),
            ("teacher_logits", teacher_logits),
            ("labels", labels),
            ("weights", weights),
        ),
    )
    student = check.logits(fn, "student_logits", student_logits, cpu=False)
    teacher = check.logits(fn, "teacher_logits", teacher_logits, cpu=False)
    check.same_shape(fn, "teacher_logits", teacher, student, "student_logits")
    _teacher_fixed(fn, "teacher_logits", teacher)
    lead_shape = student.shape[:-1]
    labels_t = check.labels(fn, labels, lead_shape, cpu=False)
    _check_label_range(fn, labels_t, student, cfg.ignore_index)
    weights_t = check.weights(fn, weights, lead_shape, cpu=False)
    op_cfg = _op_path(fn, student, cfg, (teacher, labels_t, weights_t))
    if op_cfg is not None:
        return _ops.topk_divergence_op(
            student,
            teacher,
            labels_t,
            weights_t,
            k,
            *_op_options(op_cfg),
            torch.is_grad_enabled() and student.requires_grad,
        )[0]
    kernel = _topk_kernel(teacher, k, labels_t, weights_t, cfg, route, fn)
    return _apply(fn, student, kernel, cfg, (("teacher_logits", teacher),))
