"""Token-level divergences between a teacher and a student distribution, with fused gradients.

The functions here are thin PyTorch wrappers over divkit's C++ kernels (``divkit._C``): tensors
cross into C++ through DLPack without copies, the loss and its gradient are computed in one pass
per token, and the gradient is handed back to autograd in ``backward``.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple, Optional, Tuple

import numpy as np
import torch

from . import _C, _device, _ops, cuda_checks, memory
from . import _validate as check
from ._autograd import Scaling, grads_in_forward
from .backends import torch_ops

__all__ = ["divergence", "divergence_and_grad", "KINDS", "REDUCTIONS"]

#: Names accepted by ``kind``, in the core's order.
KINDS: Tuple[str, ...] = tuple(_C.kinds())
#: Names accepted by ``reduction``.
REDUCTIONS: Tuple[str, ...] = tuple(_C.reductions())

_FN = "divergence"
_NP_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.float64))


# ---------------------------------------------------------------------------------------------
# Layout and options (the argument checks are in _validate).
# ---------------------------------------------------------------------------------------------


def _rows(x: torch.Tensor, n: int, v: int) -> torch.Tensor:
    """[..., V] -> [N, V] with a unit column stride and rows that do not overlap, as the core
    requires (a view when the layout allows it; broadcast rows, stride 0, are copied)."""
    x2 = x.reshape(n, v)
    if (v > 1 and x2.stride(1) != 1) or (n > 1 and x2.stride(0) < v):
        x2 = x2.contiguous()
    return x2


class _Config(NamedTuple):
    """The checked options of a token divergence: those of the core (the fields before
    ``inplace_grad``, see :data:`_CORE_FIELDS`), then the Python side's. Also the options of
    :func:`divkit.distributed.vocab_parallel_divergence` and of the ``divkit::divergence`` and
    ``divkit::vocab_parallel_divergence`` ops, whose arguments list the core fields in this
    order."""

    kind: str
    beta: float
    alpha: float
    temperature: float
    scale_by_t_squared: bool
    ignore_index: int
    reduction: str
    num_items_in_batch: float
    inplace_grad: bool
    grad_dtype: Optional[torch.dtype]
    backend: str = "auto"


#: _Config's fields that the core's option objects take under the same names
#: (``_C.DivergenceArgs``; ``_C.FusedLinearOptions`` for the vocabulary-parallel divergence).
_CORE_FIELDS = _Config._fields[: _Config._fields.index("inplace_grad")]


def _core_fields(cfg: _Config) -> dict:
    """The core's options of ``cfg`` by name (:data:`_CORE_FIELDS`, in order)."""
    return {name: getattr(cfg, name) for name in _CORE_FIELDS}


def _core_args(cfg: _Config) -> "_C.DivergenceArgs":
    """The scalar arguments as the kernels' one options object."""
    return _C.DivergenceArgs(**_core_fields(cfg))


def _parse_options(
    fn: str,
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
    backend="auto",
) -> _Config:
    return _Config(
        kind=check.string(fn, "kind", kind),
        beta=check.real(fn, "beta", beta),
        alpha=check.real(fn, "alpha", alpha),
        temperature=check.real(fn, "temperature", temperature),
        scale_by_t_squared=check.boolean(fn, "scale_by_t_squared", scale_by_t_squared),
        ignore_index=check.integer(fn, "ignore_index", ignore_index),
        reduction=check.string(fn, "reduction", reduction),
        num_items_in_batch=check.num_items(fn, num_items_in_batch),
        inplace_grad=check.boolean(fn, "inplace_grad", inplace_grad),
        grad_dtype=check.grad_dtype(fn, grad_dtype),
        backend=_device.backend(fn, backend),
    )


# ---------------------------------------------------------------------------------------------
# The kernel call.
# ---------------------------------------------------------------------------------------------


def _run(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: Optional[torch.Tensor],
    weights: Optional[torch.Tensor],
    cfg: _Config,
    need_student: bool,
    need_teacher: bool,
    route: Optional[_device.Route] = None,
    fn: str = _FN,
    grad_out: Optional[torch.Tensor] = None,
):
    """Runs the kernel (the core's, or the torch fallback's when ``route`` says so). Returns
    (loss, grad_student, grad_teacher), the gradients (or None) in the logits' shapes. The
    student gradient goes into ``grad_out`` when given (checked by :func:`_check_grad_out`)."""
    lead_shape = student.shape[:-1]
    v = student.shape[-1]
    n = math.prod(lead_shape)
    s2 = _rows(student.detach(), n, v)
    t2 = _rows(teacher.detach(), n, v)

    dev = student.device
    if cfg.reduction == "none":
        loss = torch.empty(n, dtype=torch.float32, device=dev)
    else:
        loss = torch.empty(1, dtype=torch.float32, device=dev)

    # The gradients are allocated in the logits' shapes and handed to the core as [N, V] views,
    # so that backward can return the very tensors it keeps (Scaling.keep). Fresh ones come from
    # the host cache (divkit.memory): a block reused from an earlier call has its pages in place.
    grad_s = grad_t = None
    grad_s2 = grad_t2 = None
    if need_student:
        if cfg.inplace_grad:
            grad_s2 = s2  # the logits' own storage (or, if _rows had to copy, the copy's)
            grad_s = s2.view(student.shape)
        elif grad_out is not None:
            grad_s = grad_out
            grad_s2 = grad_out.view(n, v)
        else:
            grad_s = memory._empty(student.shape, cfg.grad_dtype or student.dtype, dev)
            grad_s2 = grad_s.view(n, v)
    if need_teacher:
        grad_t = memory._empty(teacher.shape, cfg.grad_dtype or teacher.dtype, dev)
        grad_t2 = grad_t.view(n, v)

    if route is not None and not route.core:
        loss = torch_ops.divergence(s2, t2, labels, weights, cfg, grad_s2, grad_t2, fn=fn)
    else:
        args = _core_args(cfg) if route is None else route.core_args(_core_args(cfg))
        if cfg.inplace_grad and grad_s2 is not None:
            # In place, deferred checks also apply on the CPU: each row is checked as it is read
            # instead of every row before the first write (which reads both inputs once more).
            args.check_finite = cuda_checks.check_finite()
        with check.attributed(fn):
            _C.divergence(s2, t2, loss, grad_s2, grad_t2, labels, weights, args)
    if cfg.inplace_grad and grad_s2 is not None:
        # The logits now hold the gradient: moving their version counter (shared by views and
        # detached aliases) makes autograd raise if an operation saved them for its backward
        # (divergence and divergence_and_grad alike), instead of computing with the gradient.
        _ops.increment_version(s2)
    loss = loss.reshape(lead_shape) if cfg.reduction == "none" else loss.reshape(())
    return loss, grad_s, grad_t


def _check_label_range(fn: str, labels, student, ignore_index: int) -> None:
    """The labels only mark ignored tokens here, but a label that is neither ignore_index nor a
    vocabulary index means the labels and the logits disagree (another tokenizer, or a different
    ignore_index), which would otherwise count ignored tokens silently. Checked where it costs no
    host synchronization of the caller's stream: CPU labels, or CUDA outside deferred_checks();
    not while tracing (the value is data)."""
    if labels is None or _ops.traced(student, labels):
        return
    if labels.device.type != "cpu" and not cuda_checks.check_finite():
        return
    check.label_range(fn, "labels", labels, student.shape[-1], ignore_index)


def _tensor_args(student, teacher, labels, weights):
    """The (name, value) pairs whose devices must agree."""
    return (
        ("student_logits", student),
        ("teacher_logits", teacher),
        ("labels", labels),
        ("weights", weights),
    )


def _check_inplace(fn: str, student: torch.Tensor, cfg: _Config, others) -> None:
    """inplace_grad=True writes the gradient into student_logits: its dtype must be the
    gradient's, and no other input (``others``: (name, tensor) pairs) may share its memory."""
    if not cfg.inplace_grad:
        return
    _check_inplace_dtype(fn, student, cfg)
    if student.numel() == 0:
        return
    s_lo, s_hi = _byte_range(student)
    for name, t in others:
        if t.numel() == 0:
            continue
        t_lo, t_hi = _byte_range(t)
        if s_lo < t_hi and t_lo < s_hi:
            check.fail(
                fn,
                f"inplace_grad=True but {name} shares memory with student_logits; the "
                f"gradient would overwrite it",
            )


def _check_inplace_dtype(fn: str, student: torch.Tensor, cfg: _Config) -> None:
    if cfg.grad_dtype is not None and cfg.grad_dtype != student.dtype:
        check.fail(
            fn,
            f"grad_dtype={cfg.grad_dtype} cannot be used with inplace_grad=True: the "
            f"gradient is written into student_logits, whose dtype is {student.dtype}",
        )


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    """a and b are the same elements of the same storage (same data, dtype, shape, strides)."""
    return (
        a.data_ptr() == b.data_ptr()
        and a.dtype == b.dtype
        and tuple(a.shape) == tuple(b.shape)
        and a.stride() == b.stride()
    )


def _check_grad_out(fn: str, grad_out, student: torch.Tensor, cfg: _Config, others):
    """grad_out=: a caller-provided buffer for the student gradient. Returns (grad_out or None,
    cfg): grad_out that is student_logits itself (same data, dtype, shape and strides) is the
    in-place case and becomes ``inplace_grad=True``. Otherwise it must be a tensor of the
    student's shape, of the gradient's dtype (``grad_dtype``, default the student's), on the
    student's device, laid out as [N, V] rows with a unit column stride (e.g. contiguous), not
    requiring grad, and sharing no memory with student_logits or ``others`` ((name, tensor)
    pairs: the other inputs)."""
    if grad_out is None:
        return None, cfg
    if not isinstance(grad_out, torch.Tensor):
        check.fail_type(
            fn, f"grad_out must be a torch.Tensor or None, got {check.type_name(grad_out)}"
        )
    if cfg.inplace_grad:
        check.fail(
            fn,
            "grad_out and inplace_grad=True cannot be combined (grad_out=student_logits is the "
            "in-place form)",
        )
    if _same_view(grad_out, student):
        _check_inplace_dtype(fn, student, cfg)
        return None, cfg._replace(inplace_grad=True)
    if grad_out.device != student.device:
        check.fail(
            fn, f"grad_out is on device {grad_out.device}, student_logits on {student.device}"
        )
    want = cfg.grad_dtype or student.dtype
    if grad_out.dtype != want:
        what = "grad_dtype" if cfg.grad_dtype is not None else "the dtype of student_logits"
        check.fail_type(fn, f"grad_out has dtype {grad_out.dtype}; expected {want} ({what})")
    check.same_shape(fn, "grad_out", grad_out, student, "student_logits")
    if grad_out.is_sparse or grad_out.layout != torch.strided or _row_view(grad_out) is None:
        check.fail(
            fn,
            f"grad_out must be laid out as [N, V] rows with a unit column stride (e.g. "
            f"contiguous); got strides {grad_out.stride()}",
        )
    if grad_out.requires_grad:
        check.fail(fn, "grad_out requires grad; pass a buffer autograd does not track (detach it)")
    if grad_out.numel() > 0:
        g_lo, g_hi = _byte_range(grad_out)
        for name, t in (("student_logits", student),) + tuple(others):
            if t is None or t.numel() == 0:
                continue
            t_lo, t_hi = _byte_range(t)
            if g_lo < t_hi and t_lo < g_hi:
                check.fail(
                    fn,
                    f"grad_out shares memory with {name}; the gradient would overwrite it "
                    f"(grad_out=student_logits itself is the in-place form)",
                )
    return grad_out, cfg


def _byte_range(x: torch.Tensor) -> Tuple[int, int]:
    lo = hi = x.data_ptr()
    for size, stride in zip(x.shape, x.stride()):
        if stride >= 0:
            hi += (size - 1) * stride * x.element_size()
        else:
            lo += (size - 1) * stride * x.element_size()
    return lo, hi + x.element_size()


def _scaling(fn: str, cfg: _Config) -> Scaling:
    """Gradients computed in forward, kept by the graph; the student's scaled in place when it
    lives in the logits' storage."""
    return Scaling(inplace=0 if cfg.inplace_grad else None, fn=f"divkit.{fn}")


# ---------------------------------------------------------------------------------------------
# numpy inputs: loss only.
# ---------------------------------------------------------------------------------------------


def _numpy_divergence(student, teacher, labels, weights, cfg: _Config, fn: str = _FN):
    if cfg.inplace_grad or cfg.grad_dtype is not None:
        check.fail(
            fn,
            "inplace_grad and grad_dtype apply to torch tensors; numpy inputs give the loss only",
        )
    for name, x in (("student_logits", student), ("teacher_logits", teacher)):
        if not isinstance(x, np.ndarray):
            check.fail_type(
                fn, f"{name} must be a numpy.ndarray like student_logits, got {check.type_name(x)}"
            )
        if x.dtype not in _NP_FLOAT_DTYPES:
            check.fail_type(fn, f"{name} has dtype {x.dtype}; expected float32, float16 or float64")
        if x.ndim < 1:
            check.fail(fn, f"{name} must have at least one dimension [..., V], got a 0-d array")
    if teacher.shape != student.shape:
        check.fail(
            fn,
            f"teacher_logits has shape {teacher.shape}, expected "
            f"{student.shape} (the shape of student_logits)",
        )
    lead_shape = student.shape[:-1]
    nv = student.shape[-1]
    n = math.prod(lead_shape)

    def token_array(name, x, kinds_ok):
        if x is None:
            return None
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        if not isinstance(x, np.ndarray):
            check.fail_type(fn, f"{name} must be a numpy.ndarray or None, got {check.type_name(x)}")
        if x.shape != lead_shape:
            check.fail(
                fn,
                f"{name} has shape {x.shape}, expected {lead_shape} (the "
                f"logits' shape without the last dimension)",
            )
        if x.dtype.kind not in kinds_ok:
            want = "an integer" if kinds_ok == "iu" else "a floating"
            check.fail_type(fn, f"{name} must have {want} dtype, got {x.dtype}")
        return x.reshape(n)

    labels = token_array("labels", labels, "iu")
    if labels is not None and labels.dtype not in (np.int32, np.int64):
        labels = labels.astype(np.int64)
    weights = token_array("weights", weights, "f")
    if weights is not None and weights.dtype not in (np.float32, np.float64):
        weights = weights.astype(np.float32)

    def rows(x):
        x2 = x.reshape(n, nv)
        unit_columns = nv <= 1 or x2.strides[1] == x2.itemsize
        if not unit_columns or (n > 1 and x2.strides[0] < nv * x2.itemsize):
            x2 = np.ascontiguousarray(x2)
        return x2

    s2 = rows(student)
    t2 = rows(teacher)
    loss = np.empty(n if cfg.reduction == "none" else 1, dtype=np.float32)
    _C.divergence(s2, t2, loss, None, None, labels, weights, _core_args(cfg))
    return loss.reshape(lead_shape) if cfg.reduction == "none" else loss.reshape(())


# ---------------------------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------------------------


def divergence(
    student_logits,
    teacher_logits,
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
    grad_out: Optional[torch.Tensor] = None,
):
    r"""Token-level divergence D(p, q) between teacher and student, with a fused gradient.

    With student logits ``s`` and teacher logits ``t`` of shape ``[..., V]`` (flattened to
    ``[N, V]``; each of the N rows is a token) and temperature ``T``::

        q = softmax(s / T)    (student)        p = softmax(t / T)    (teacher)

    ``kind`` selects D, computed per token (all logs are natural logs):

    ====================  =======================================================================
    ``forward_kl``        KL(p_teacher || q_student) = sum_j p_j (log p_j - log q_j)
    ``reverse_kl``        KL(q_student || p_teacher) = sum_j q_j (log q_j - log p_j)
    ``jsd`` (beta)        generalized Jensen-Shannon divergence, as TRL's ``generalized_jsd_loss``
                          and Liger's JSD: m = beta p + (1 - beta) q,
                          D = beta KL(p || m) + (1 - beta) KL(q || m); beta in [0, 1];
                          beta = 0 is exactly forward_kl and beta = 1 exactly reverse_kl
                          (Agarwal et al. 2024, "On-Policy Distillation of Language Models", GKD)
    ``skew_forward_kl``   KL(p || alpha p + (1 - alpha) q), alpha in [0, 1] (DistiLLM, Ko et al.
      (alpha)             2024). The true KL: DistiLLM's code drops the teacher entropy, a constant
    ``skew_reverse_kl``   KL(q || (1 - alpha) p + alpha q), alpha in [0, 1] (DistiLLM)
      (alpha)
    ``tvd``               total variation 0.5 sum_j |p_j - q_j|, in [0, 1]
    ``hellinger``         squared Hellinger sum_j (sqrt p_j - sqrt q_j)^2 WITHOUT the 1/2 factor
                          (the f-divergence of f(u) = (sqrt u - 1)^2), in [0, 2]
    ``jeffreys``          KL(p || q) + KL(q || p), the symmetric KL (D2O's regularizer,
                          Duan et al. 2024)
    ``chi2``              Pearson chi^2(p || q) = sum_j (p_j - q_j)^2 / q_j (SequenceMatch)
    ``alpha_divergence``  Amari alpha-divergence (1 - sum_j p_j^alpha q_j^(1-alpha)) /
      (alpha)             (alpha (1 - alpha)), any finite alpha; alpha = 1 is forward_kl and
                          alpha = 0 is reverse_kl (the limits) (f-DPO, Wang et al. 2023)
    ``renyi`` (alpha)     Renyi divergence of order alpha > 0:
                          log(sum_j p_j^alpha q_j^(1-alpha)) / (alpha - 1); alpha = 1 is forward_kl
    ``cross_entropy``     soft-label cross-entropy H(p, q) = -sum_j p_j log q_j
    ====================  =======================================================================

    Note that ``alpha`` defaults to 0.1, DistiLLM's skew; set it explicitly for
    ``alpha_divergence`` and ``renyi`` (e.g. ``alpha=0.5``).

    Conventions (PyTorch, TRL, Liger): 0 log 0 = 0; a ``-inf`` logit is a masked entry with
    probability 0; a divergence that is mathematically infinite gives ``+inf`` for that token (and
    no gradient from it). NaN or ``+inf`` logits in a non-ignored token raise ``ValueError``.

    Args:
        student_logits: ``[..., V]`` CPU tensor of dtype float32, bfloat16, float16 or float64
            (or a numpy array: then the loss is returned as a numpy array, without gradient).
        teacher_logits: same shape as ``student_logits``; its dtype may differ.
        kind: one of :data:`KINDS` (table above).
        beta: mixture weight of ``jsd``, in [0, 1].
        alpha: parameter of ``skew_forward_kl``, ``skew_reverse_kl`` (in [0, 1]),
            ``alpha_divergence`` (finite) and ``renyi`` (> 0).
        temperature: T > 0; both logits are divided by it.
        labels: optional integer tensor of shape ``[...]``; tokens whose label equals
            ``ignore_index`` are ignored: loss 0, gradient 0, not counted by ``"mean"``, and their
            logits are not read (padding may hold anything). Other labels must be in ``[0, V)``
            (divkit.Error otherwise: see ``_check_label_range``); their values are not used.
        ignore_index: the label of ignored tokens (default -100, as in PyTorch and TRL).
        weights: optional float tensor of shape ``[...]``; token i's loss and gradient are
            multiplied by ``weights[i]`` (``"mean"`` still divides by the number of non-ignored
            tokens, not by the sum of the weights). No gradient flows to ``weights``.
        reduction: ``"none"`` (the per-token loss, shape ``[...]``, ignored tokens give 0),
            ``"sum"``, ``"mean"`` (sum / number of non-ignored tokens; TRL's ``"batchmean"``
            with labels is this one) or ``"batchmean"`` (sum / N, N = number of tokens).
        num_items_in_batch: optional number > 0 that replaces the divisor of ``"mean"`` and
            ``"batchmean"`` (and divides the ``"sum"``), as Hugging Face trainers pass it for
            gradient accumulation; an int, a float or a one-element tensor.
        scale_by_t_squared: multiply loss and gradients by T^2 (Hinton et al. 2015); off by
            default, as in TRL.
        inplace_grad: write the gradient with respect to the student logits into the student
            logits' own buffer, as Liger's kernels do, so that the only extra memory is a
            row block per thread. **The contents of ``student_logits`` are overwritten** by the
            forward call (when the student requires grad), so they must not be used afterwards
            (not by another loss either): their version counter is moved, so autograd raises
            if an operation saved them for its backward. Logits that cannot be viewed as
            ``[N, V]`` rows (e.g. ``logits[:, :-1]``) get a separate gradient buffer instead,
            with a warning (once): pass the full logits with ``labels = ignore_index`` at the
            positions to skip. Under ``torch.compile`` the gradient always gets its own buffer.
            With ``inplace_grad=True`` a graph can be backpropagated once. NaN/+inf logits are
            found before anything is overwritten, at the cost of one more read of both logits;
            inside :func:`divkit.cuda_checks.deferred_checks` each row is checked as it is read
            instead (faster; a bad row still raises, but the other rows may already hold their
            gradient).
        grad_dtype: dtype of the gradient buffers the kernel writes; default: the dtype of the
            corresponding logits. Autograd always hands the logits a gradient of their own
            dtype, so ``grad_dtype=torch.float32`` for bf16/fp16 logits only changes the
            rounding: the gradient stays in fp32 until autograd casts it, so scaling it by an
            upstream gradient other than 1 rounds once instead of twice (at twice the memory).
            Use :func:`divergence_and_grad` to obtain fp32 gradients themselves.
        backend: ``"auto"`` (default: the C++ core for CPU tensors, and for CUDA tensors when
            divkit was built with CUDA; the PyTorch fallback on other devices), ``"core"`` (the
            C++ core or an error) or ``"torch"`` (the PyTorch fallback,
            :mod:`divkit.backends.torch_ops`, on any device). Every tensor argument must be on
            one device.
        grad_out: optional buffer for the student gradient, reused across calls so that the
            kernel writes into memory that is already mapped (without it, the gradient comes
            from divkit's host cache, :mod:`divkit.memory`, which reuses a block once torch
            has freed it; ``grad_out`` is for a buffer you manage): a tensor of the student's
            shape, of dtype ``grad_dtype`` (default: the student's), on its device, laid out
            as ``[N, V]`` rows (e.g. contiguous), not requiring grad and sharing no memory with
            the inputs. It is written by the forward call when the student gradient is
            computed (student requires grad), and backward returns it (scaled by the upstream
            gradient when that is not 1). Passing ``student_logits`` itself is the same as
            ``inplace_grad=True``. Not supported under ``torch.compile``.

    Returns:
        The loss as a float32 tensor: a scalar, or of shape ``[...]`` for ``reduction="none"``.
        When ``student_logits`` (and/or ``teacher_logits``) requires grad, the kernel computes
        the gradient in the same pass, saves it, and ``backward`` multiplies it by the upstream
        gradient (a scalar, or per token for ``"none"``).

    Numerics: arithmetic in fp32 (also for float64 inputs) with row sums accumulated in fp64,
    combined in a fixed order, so that results are bit-for-bit identical for any thread count.

    Example::

        loss = divkit.divergence(student_logits, teacher_logits.detach(), "jsd", beta=0.5,
                                 labels=labels)
        loss.backward()
    """
    fn = _FN
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
    if isinstance(student_logits, np.ndarray):
        if grad_out is not None:
            check.fail(fn, "grad_out applies to torch tensors; numpy inputs give the loss only")
        return _numpy_divergence(student_logits, teacher_logits, labels, weights, cfg)

    route = _device.route(
        fn, fn, cfg.backend, _tensor_args(student_logits, teacher_logits, labels, weights)
    )
    student = check.logits(fn, "student_logits", student_logits, cpu=False)
    teacher = check.logits(fn, "teacher_logits", teacher_logits, cpu=False)
    check.same_shape(fn, "teacher_logits", teacher, student, "student_logits")
    lead_shape = student.shape[:-1]
    labels_t = check.labels(fn, labels, lead_shape, cpu=False)
    _check_label_range(fn, labels_t, student, cfg.ignore_index)
    weights_t = check.weights(fn, weights, lead_shape, cpu=False)

    grad_on = torch.is_grad_enabled()
    need_s = grad_on and student.requires_grad
    need_t = grad_on and teacher.requires_grad
    grad_buf, cfg = _check_grad_out(
        fn,
        grad_out,
        student,
        cfg,
        (("teacher_logits", teacher), ("labels", labels_t), ("weights", weights_t)),
    )
    if grad_buf is not None and _ops.traced(student, teacher, grad_buf):
        check.fail(
            fn,
            "grad_out is not supported under torch.compile or on traced tensors (the compiled "
            "graph owns its buffers); leave it out there",
        )
    inplace = cfg.inplace_grad and need_s
    if inplace and _ops.traced(student, teacher):
        # A compiled graph owns its buffers (functionalization would copy the logits anyway):
        # the gradient gets its own buffer, the same values.
        _check_inplace_dtype(fn, student, cfg)
        cfg = cfg._replace(inplace_grad=False)
        inplace = False
    if inplace:
        _check_inplace(fn, student, cfg, (("teacher_logits", teacher),))
        if _inplace_needs_a_copy(fn, student):
            cfg = cfg._replace(inplace_grad=False)
            inplace = False
    elif not need_s:
        cfg = cfg._replace(inplace_grad=False)
    if inplace:
        return _divergence_inplace(student, teacher, labels_t, weights_t, cfg, route, fn)
    if grad_buf is None and _ops.use_ops(student, teacher, labels_t, weights_t, fn=fn):
        loss, _, _ = _ops.divergence_op(
            student,
            teacher,
            labels_t,
            weights_t,
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
            need_s,
            need_t,
        )
        return loss
    if not (need_s or need_t):
        loss, _, _ = _run(student, teacher, labels_t, weights_t, cfg, False, False, route)
        return loss

    def run(need):
        loss, grad_s, grad_t = _run(
            student, teacher, labels_t, weights_t, cfg, *need, route, grad_out=grad_buf
        )
        return loss, (grad_s, grad_t)

    return grads_in_forward(run, (student, teacher), _scaling(fn, cfg))


def _divergence_inplace(student, teacher, labels, weights, cfg: _Config, route, fn: str):
    """inplace_grad=True on logits that are [N, V] rows: the kernel writes the student gradient
    into their storage, and their version counter moves, so that autograd raises if anything
    saved the logits for its own backward (instead of computing with the gradient)."""

    def run(need):
        loss, grad_s, grad_t = _run(student.detach(), teacher, labels, weights, cfg, *need, route)
        return loss, (grad_s, grad_t)

    return grads_in_forward(run, (student, teacher), _scaling(fn, cfg))


def _row_view(x: torch.Tensor) -> Optional[torch.Tensor]:
    """x as [N, V] rows with a unit column stride (a view), or None when its layout has none."""
    v = x.shape[-1]
    n = x.numel() // v if v else 0
    try:
        x2 = x.view(n, v)
    except RuntimeError:
        return None
    if (v > 1 and x2.stride(1) != 1) or (n > 1 and x2.stride(0) < v):
        return None
    return x2


def _inplace_needs_a_copy(fn: str, student: torch.Tensor) -> bool:
    """True, with a warning (once per function), when student cannot be viewed as [N, V] rows:
    an in-place call then writes the gradient into a buffer of its own."""
    if _row_view(student) is not None:
        return False
    _warn_once(
        "inplace_copy:" + fn,
        f"divkit.{fn}(inplace_grad=True): student_logits of shape "
        f"{tuple(student.shape)} and strides {student.stride()} cannot be viewed as "
        f"[N, V] rows (e.g. logits[:, :-1]), so the gradient gets its own buffer and no "
        f"memory is saved. Pass the full logits with labels = ignore_index at the "
        f"positions to skip (their gradient is 0), or a contiguous tensor.",
    )
    return True


_WARNED = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(msg, UserWarning, stacklevel=3)


def divergence_and_grad(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
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
    grad_student: bool = True,
    grad_teacher: bool = False,
    inplace_grad: bool = False,
    grad_dtype: Optional[torch.dtype] = None,
    backend: str = "auto",
    grad_out: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The loss and its gradients without autograd: ``(loss, grad_student, grad_teacher)``.

    Same arguments and formulas as :func:`divergence`. The gradients (of the reduced loss, or
    of the sum of the per-token losses for ``reduction="none"``) have the logits' shapes and
    dtype ``grad_dtype`` (default: the logits' dtypes), e.g. float32 gradients from bfloat16
    logits; a gradient that is not asked for (``grad_student`` / ``grad_teacher`` False) is
    None. With ``inplace_grad=True`` the student gradient is written into (and returned as a
    view of) ``student_logits``. ``backend`` and ``grad_out`` (the buffer the student gradient
    is written into and returned as): as in :func:`divergence`.
    """
    fn = "divergence_and_grad"
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
    route = _device.route(
        fn, "divergence", cfg.backend, _tensor_args(student_logits, teacher_logits, labels, weights)
    )
    student = check.logits(fn, "student_logits", student_logits, cpu=False)
    teacher = check.logits(fn, "teacher_logits", teacher_logits, cpu=False)
    check.same_shape(fn, "teacher_logits", teacher, student, "student_logits")
    need_s = check.boolean(fn, "grad_student", grad_student)
    need_t = check.boolean(fn, "grad_teacher", grad_teacher)
    lead_shape = student.shape[:-1]
    labels_t = check.labels(fn, labels, lead_shape, cpu=False)
    _check_label_range(fn, labels_t, student, cfg.ignore_index)
    weights_t = check.weights(fn, weights, lead_shape, autograd=False, cpu=False)
    grad_buf, cfg = _check_grad_out(
        fn,
        grad_out,
        student,
        cfg,
        (("teacher_logits", teacher), ("labels", labels_t), ("weights", weights_t)),
    )
    if need_s:
        _check_inplace(fn, student, cfg, (("teacher_logits", teacher),))
    with torch.no_grad():
        return _run(
            student, teacher, labels_t, weights_t, cfg, need_s, need_t, route, fn, grad_out=grad_buf
        )
