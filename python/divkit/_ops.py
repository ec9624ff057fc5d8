"""divkit's kernel entries as ``torch.library`` custom operators (torch >= 2.4).

An op is opaque to ``torch.compile``: Dynamo records one call to it instead of tracing into the
nanobind module (which it cannot do), and the fake (meta) kernels give the output shapes without
running the core, so a model that calls divkit compiles with ``fullgraph=True``. The autograd
formulas are registered with the ops (``register_autograd``), so the compiled backward calls the
same kernels; ``vmap`` runs the op once per batch entry; a second derivative raises a
:class:`divkit.Error` instead of silently leaving out the terms the kernels do not compute.

The public functions (:func:`divkit.divergence`, the fused heads of :mod:`divkit.fused`,
:func:`divkit.sparse_divergence`, :func:`divkit.topk_divergence`) check their arguments in Python
and, when the call is traced (torch.compile, export), under vmap, or on tensor subclasses, call
these ops with the checked, normalized values (:func:`use_ops`). Eager
calls on plain tensors keep the ``torch.autograd.Function`` path of ``_autograd.py``: the
dispatcher's Python overhead is a few times a small kernel call's. With torch < 2.4 (no
``torch.library.custom_op``) or ``DIVKIT_CUSTOM_OPS=0`` the ops are not registered;
``DIVKIT_CUSTOM_OPS=always`` routes every call through them (tests). The results are the same
bits either way.

Ops (namespace ``divkit``):

* ``divergence``: token divergence; returns (loss, grad_student, grad_teacher), the gradients
  computed in the forward call (empty when not asked for), scaled by the upstream gradient in
  backward.
* ``fused_linear_cross_entropy``, ``fused_linear_divergence``, ``fused_linear_sparse_divergence``,
  ``fused_linear_logprobs`` (+ ``fused_linear_logprobs_backward``): the fused heads; with
  ``process_group=`` the group travels by its c10d name, as for ``vocab_parallel_divergence``.
* ``sparse_divergence``, ``topk_divergence``: the sparse (top-k) and truncated teachers of
  :mod:`divkit.sparse`; return (loss, grad_student), as ``divergence``.
* ``vocab_parallel_divergence``: :func:`divkit.distributed.vocab_parallel_divergence`, the
  process group passed by its c10d name (``group.group_name``, resolved in the op, as torch's
  functional collectives do); vmap raises (each call is a collective).
* ``preference_loss``: the DPO family of :func:`divkit.preference_loss` (and so the sequence
  step of ``tdpo_loss[_fused]`` and ``sparsepo_loss[_fused]``, whose token terms are the fused
  heads above); returns (losses, chosen_rewards, rejected_rewards, 4 gradients), the gradients
  computed by a second call in backward.
* The other sequence, RLHF and distillation losses (``cpo_loss``, ``kto_loss``, ``nkd_loss``,
  ...), the row statistics ``row_entropy`` and ``sorted_probs``, ``uskd_soft_labels``.
* ``sinkhorn``, ``sparse_ot``, ``sample_divergence`` (``mmd``, ``cs_divergence``): the solvers of
  :mod:`divkit.ot` on the core's route or the PyTorch fallback's (run inside the op);
  ``kde_log_density``, ``kde_log_likelihood``, ``kde_bandwidth``.
* Helpers without a gradient that read values on the host: ``calibrate_reward``, ``best_of_n``,
  ``swing_noise``, ``weight_aligning``, ``teacher_class_means`` (each runs the eager function's
  code and value checks; the public functions pass detached tensors).

Every op is registered for all devices (CompositeExplicitAutograd): a CUDA tensor reaches the
same Python implementation, which asks :mod:`divkit._device` for the engine (the core's CUDA
kernel on a CUDA build, else the PyTorch fallback) as the eager path does.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _validate as check

__all__ = [
    "ENABLED",
    "ALWAYS",
    "compiling",
    "increment_version",
    "traced",
    "use_ops",
    "first_order",
]


def _custom_ops_available() -> bool:
    lib = getattr(torch, "library", None)
    return (
        hasattr(lib, "custom_op")
        and hasattr(lib, "register_fake")
        and os.environ.get("DIVKIT_CUSTOM_OPS", "1") != "0"
    )


#: Whether the ops are registered (torch >= 2.4 and DIVKIT_CUSTOM_OPS is not "0").
ENABLED: bool = _custom_ops_available()
#: Eager calls on plain tensors skip the dispatcher (its Python overhead is a few times a small
#: kernel call's); the ops serve tracing (torch.compile, torch.export), functorch transforms
#: (vmap), fake and subclass tensors. True routes every call through the ops (tests).
ALWAYS: bool = os.environ.get("DIVKIT_CUSTOM_OPS", "") == "always"

_PLAIN = (torch.Tensor, torch.nn.Parameter)
_wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)


def traced(*xs: Optional[Tensor]) -> bool:
    """Whether the call is traced (torch.compile, export) or sees tensors that are not plain
    values (vmap's batched tensors, fake tensors, subclasses): the core cannot take those."""
    if compiling():
        return True
    for x in xs:
        if x is None:
            continue
        if type(x) not in _PLAIN or (_wrapped is not None and _wrapped(x)):
            return True
    return False


_grad_tracking = getattr(getattr(torch._C, "_functorch", None), "is_gradtrackingtensor", None)


def use_ops(*xs: Optional[Tensor], fn: str = "divkit") -> bool:
    """Whether a call on tensors xs goes through the custom ops. torch.func's differentiating
    transforms (grad, jacrev, jvp) raise: the ops' autograd formulas serve torch.autograd."""
    if not ENABLED:
        return False
    if ALWAYS or compiling():
        return True
    if not traced(*xs):
        return False
    if _grad_tracking is not None and any(x is not None and _grad_tracking(x) for x in xs):
        check.fail(
            fn,
            "torch.func.grad / jacrev / jvp are not supported; use loss.backward() or "
            "torch.autograd.grad (torch.vmap of the loss works)",
        )
    return True


def compiling() -> bool:
    """Whether torch.compile / torch.export is tracing the caller."""
    fn = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(fn()) if fn is not None else False


def increment_version(x: Tensor) -> None:
    """Moves x's version counter (for in-place writes the dispatcher does not see)."""
    fn = getattr(torch.autograd.graph, "increment_version", None)
    if fn is not None:
        fn(x)
    else:  # torch < 2.2
        torch._C._autograd._increment_version(x)


def _warn_at_caller(msg: str) -> None:
    """A RuntimeWarning given by an op when it runs, attributed to the first frame outside
    divkit, torch and generated code (the dispatcher's and a compiled graph's frames): the
    caller's line."""
    skip = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (torch, check))

    def internal(f) -> bool:
        name = f.f_code.co_filename
        return name.startswith("<") or os.path.abspath(name).startswith(skip)

    level, f = 2, sys._getframe(1)
    while f is not None and internal(f):
        f, level = f.f_back, level + 1
    warnings.warn(msg, RuntimeWarning, stacklevel=level)


def _is_real(x: Tensor) -> bool:
    """A tensor with values (not a fake or functional tensor being traced)."""
    return type(x) is torch.Tensor or type(x) is torch.nn.Parameter


def upstream_is_one(go: Tensor) -> bool:
    """Whether the upstream gradient ``go`` is the scalar 1, so that a saved gradient can be
    returned as it is (no pass over it). The answer reads ``go`` on the host; where that cannot
    be done (a fake or traced tensor, or a CUDA stream being captured into a graph, which
    forbids synchronization) it is False, and the caller multiplies by ``go``: the same values,
    since g * 1 == g exactly."""
    if go.dim() != 0 or not _is_real(go):
        return False
    if go.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return bool(go == 1)


class _NoDoubleBackward(torch.autograd.Function):
    """Identity whose backward raises: marks a gradient returned by a kernel under
    ``create_graph=True``, whose own derivative the kernels do not compute."""

    @staticmethod
    def forward(ctx, fn: str, *xs):
        ctx.fn = fn
        out = tuple(x.detach() for x in xs)
        return out[0] if len(out) == 1 else out

    @staticmethod
    def backward(ctx, *grads):
        check.fail(
            ctx.fn,
            "double backward (a derivative of the gradient, after backward with "
            "create_graph=True) is not supported: divkit's kernels compute first derivatives "
            "only",
        )


def guard_double_backward(fn: str, grads: Sequence[Optional[Tensor]]) -> List[Optional[Tensor]]:
    """The gradients a backward returns; under create_graph=True each is given a graph node that
    raises :class:`divkit.Error` if it is differentiated (as ``once_differentiable``, whose
    RuntimeError does not name the function, and which leaves a gradient that depends on no
    differentiable input out of the graph, so that a gradient penalty would silently miss the
    kernel's second-order term)."""
    grads = list(grads)
    if not torch.is_grad_enabled() or compiling():
        return grads
    idx = [i for i, g in enumerate(grads) if isinstance(g, Tensor)]
    if idx:
        fakes = []
        for i in idx:
            g = grads[i].detach()
            g.requires_grad_(True)
            fakes.append(g)
        out = _NoDoubleBackward.apply(fn, *fakes)
        out = out if isinstance(out, tuple) else (out,)
        for i, g in zip(idx, out):
            grads[i] = g
    return grads


def first_order(fn: Callable[[object], str]):
    """Decorator of an autograd.Function's backward, in place of ``once_differentiable``: runs
    it without grad and guards its gradients (:func:`guard_double_backward`); ``fn(ctx)`` names
    the public function for the message."""

    def deco(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *args):
            create_graph = torch.is_grad_enabled()
            with torch.no_grad():
                out = backward(ctx, *args)
            if not create_graph:
                return out
            single = not isinstance(out, tuple)
            out = guard_double_backward(fn(ctx), (out,) if single else out)
            return out[0] if single else tuple(out)

        return wrapper

    return deco


def _scale(g: Tensor, go: Tensor) -> Tensor:
    """g (a gradient saved by forward) times the upstream gradient go (a scalar, or one value per
    leading index of g), rounded once to g's dtype. An upstream gradient of 1 returns g itself in
    eager mode (no [N, V] temporary)."""
    if _is_real(g) and upstream_is_one(go):
        return g
    go = go.reshape(tuple(go.shape) + (1,) * (g.dim() - go.dim()))
    return torch.mul(g, go).to(g.dtype)


_EMPTY = (0,)


def _unaliased(inputs, *outs: Tensor) -> Tuple[Tensor, ...]:
    """outs, each sharing no memory with the inputs or an earlier output (a custom op's rule):
    a solver may return one tensor twice (a symmetric problem's two potentials) or a view of
    its input (a dtype conversion that was a no-op)."""
    seen = {t.untyped_storage().data_ptr() for t in inputs if t is not None and t.numel()}
    res = []
    for t in outs:
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                t = t.clone()
                ptr = t.untyped_storage().data_ptr()
            seen.add(ptr)
        res.append(t)
    return tuple(res)


def _empty_like_device(x: Tensor) -> Tensor:
    return x.new_empty(_EMPTY, dtype=torch.float32)


if ENABLED:
    # -----------------------------------------------------------------------------------------
    # Token divergence.
    # -----------------------------------------------------------------------------------------

    def _route(op: str, backend: str, tensors):
        """Where the kernel runs (None: the CPU core, the common case, without a lookup)."""
        if backend != "torch" and all(x is None or x.device.type == "cpu" for x in tensors):
            return None
        from . import _device

        return _device.route(op, op, backend, [("tensor", x) for x in tensors])

    def _arg_names(op) -> List[str]:
        """The names of a divkit op's arguments, in order (from its registered schema)."""
        packet = getattr(torch.ops.divkit, op._name.split("::")[-1])
        return [a.name for a in packet.default._schema.arguments]

    def _arg_picker(op, *names: str) -> Callable:
        """A function of an op's arguments (all of them, in the schema's order, as its fake
        kernel and setup_context see them) -> the values of the named ones, found by name in
        the schema, so adding an argument cannot shift them."""
        at = [_arg_names(op).index(n) for n in names]
        return lambda args: tuple(args[i] for i in at)

    @torch.library.custom_op("divkit::divergence", mutates_args=())
    def divergence_op(
        student: Tensor,
        teacher: Tensor,
        labels: Optional[Tensor],
        weights: Optional[Tensor],
        kind: str,
        beta: float,
        alpha: float,
        temperature: float,
        scale_by_t_squared: bool,
        ignore_index: int,
        reduction: str,
        num_items_in_batch: float,
        grad_dtype: Optional[torch.dtype],
        backend: str,
        need_student: bool,
        need_teacher: bool,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        from . import functional

        cfg = functional._Config(
            kind,
            beta,
            alpha,
            temperature,
            scale_by_t_squared,
            ignore_index,
            reduction,
            num_items_in_batch,
            False,
            grad_dtype,
            backend,
        )
        route = _route("divergence", backend, (student, teacher, labels, weights))
        loss, gs, gt = functional._run(
            student, teacher, labels, weights, cfg, need_student, need_teacher, route
        )
        return (
            loss,
            _empty_like_device(student) if gs is None else gs,
            _empty_like_device(student) if gt is None else gt,
        )

    @divergence_op.register_fake
    def _divergence_fake(
        student,
        teacher,
        labels,
        weights,
        kind,
        beta,
        alpha,
        temperature,
        scale_by_t_squared,
        ignore_index,
        reduction,
        num_items_in_batch,
        grad_dtype,
        backend,
        need_student,
        need_teacher,
    ):
        shape = student.shape[:-1] if reduction == "none" else ()
        loss = student.new_empty(shape, dtype=torch.float32)
        gs = (
            student.new_empty(student.shape, dtype=grad_dtype or student.dtype)
            if need_student
            else _empty_like_device(student)
        )
        gt = (
            teacher.new_empty(teacher.shape, dtype=grad_dtype or teacher.dtype)
            if need_teacher
            else _empty_like_device(student)
        )
        return loss, gs, gt

    _divergence_need = _arg_picker(divergence_op, "need_student", "need_teacher")

    def _divergence_setup(ctx, inputs, output):
        _, gs, gt = output
        ctx.mark_non_differentiable(gs, gt)
        ctx.need = _divergence_need(inputs)
        ctx.save_for_backward(gs, gt)

    def _divergence_backward(ctx, g_loss, _gs, _gt):
        gs, gt = ctx.saved_tensors
        grads = [
            _scale(gs, g_loss) if ctx.need[0] and ctx.needs_input_grad[0] else None,
            _scale(gt, g_loss) if ctx.need[1] and ctx.needs_input_grad[1] else None,
        ]
        grads = guard_double_backward("divergence", grads)
        return (*grads,) + (None,) * (len(ctx.needs_input_grad) - 2)

    divergence_op.register_autograd(_divergence_backward, setup_context=_divergence_setup)

    def _loop_vmap(op, n_tensors: int):
        """A vmap rule for op: one call per batch entry (the first n_tensors arguments may be
        batched), outputs stacked along a new first dimension. The kernels see plain rows. An op
        with a ``group_name`` argument (a vocabulary-parallel process group) refuses vmap when
        a group is given (each call is a collective: a loop would make the ranks' collectives
        depend on their vmaps)."""
        names = _arg_names(op)
        group_at = names.index("group_name") if "group_name" in names else None

        def rule(info, in_dims, *args):
            if group_at is not None and group_at < len(args) and args[group_at] is not None:
                check.fail(
                    op._name.split("::")[-1],
                    "torch.vmap is not supported with process_group (each call is a "
                    "collective over the group); call it on the batched tensors directly: "
                    "their leading dimensions are tokens",
                )
            if torch.is_grad_enabled() and any(
                isinstance(x, Tensor) and x.requires_grad for x in args[:n_tensors]
            ):
                check.fail(
                    op._name.split("::")[-1],
                    "vmap over inputs that require grad is not supported (the gradient "
                    "would not reach them): call it on the batched tensors directly (their "
                    "leading dimensions are tokens already), or vmap under torch.no_grad()",
                )

            def entry(x, d, b):
                return x.select(d, b) if (x is not None and d is not None) else x

            outs = [
                op(
                    *(entry(x, d, b) for x, d in zip(args[:n_tensors], in_dims[:n_tensors])),
                    *args[n_tensors:],
                )
                for b in range(info.batch_size)
            ]
            if isinstance(outs[0], Tensor):
                return torch.stack(outs), 0
            stacked = tuple(torch.stack([o[i] for o in outs]) for i in range(len(outs[0])))
            return stacked, (0,) * len(stacked)

        if hasattr(op, "register_vmap"):
            op.register_vmap(rule)

    _loop_vmap(divergence_op, 4)

    # -----------------------------------------------------------------------------------------
    # Fused heads (without a process group). Inputs are [N, H] rows and [V, H] weights; a
    # reduced loss has its gradients computed in the forward call (scaled in backward, handed
    # over to autograd); reduction="none" computes nothing in forward and calls the op again in
    # backward with the upstream gradient as token weights of a summed loss.
    # -----------------------------------------------------------------------------------------

    def _rows2(x: Tensor) -> Tensor:
        from .fused import _contig_rows

        return _contig_rows(x.reshape(-1, x.shape[-1]))

    def _need(xs, reduced: bool) -> List[bool]:
        on = reduced and torch.is_grad_enabled()
        return [bool(on and x is not None and x.requires_grad) for x in xs]

    def _grads_or_empty(ref: Tensor, grads) -> List[Tensor]:
        return [_empty_like_device(ref) if g is None else g for g in grads]

    def _fake_grads(xs, need) -> List[Tensor]:
        return [
            x.new_empty(x.shape) if (x is not None and n) else _empty_like_device(xs[0])
            for x, n in zip(xs, need)
        ]

    def _handover(g: Tensor, go: Tensor) -> Tensor:
        """A reduced head's saved gradient times the scalar upstream gradient, as the
        autograd.Function path does it (go rounded to g's dtype first)."""
        if _is_real(g) and upstream_is_one(go):
            return g
        return g * go.to(g.dtype)

    def _name(group) -> Optional[str]:
        """A vocabulary-parallel process group as an op argument: its c10d name (None: none)."""
        return None if group is None else group.group_name

    def _group(name: Optional[str]):
        """The process group of a c10d name (None: none), resolved as torch's functional
        collectives do."""
        if name is None:
            return None
        from torch.distributed.distributed_c10d import _resolve_process_group

        return _resolve_process_group(name)

    def _engine(route) -> str:
        # "auto" lets the op route again when it runs: on CUDA that keeps divkit's row kernel
        # inside the PyTorch chunk loop (route.rows == "core").
        if route is None or route.core or route.rows == "core":
            return "auto"
        return "torch"

    def _head_autograd(op, fn: str, n_diff: int, grads_at: int = 1, second_call=None):
        """Registers the autograd of a head op: its arguments are its tensors (the first n_diff
        differentiable), ``upstream``, its options (``reduction`` among them), ``need`` and any
        after it; its outputs are the loss, then from position grads_at the gradients of the
        n_diff inputs. A reduced loss has those gradients computed in the forward call: backward
        hands them over scaled by the upstream gradient. reduction="none" computes none in the
        forward: backward calls the op again with the same arguments but ``upstream`` (the
        upstream gradient, token weights of a summed loss), ``need`` and the ``second_call``
        overrides (argument name -> value). Positions come from the op's schema, by name."""
        names = _arg_names(op)
        upstream_at, reduction_at, need_at = (
            names.index(n) for n in ("upstream", "reduction", "need")
        )
        overrides = {names.index(k): v for k, v in (second_call or {}).items()}

        def setup(ctx, inputs, output):
            ctx.mark_non_differentiable(*output[1:])
            ctx.reduced = inputs[reduction_at] != "none"
            if ctx.reduced:
                ctx.save_for_backward(*output[grads_at:])
            else:
                ctx.save_for_backward(*inputs[:upstream_at])
                ctx.args = inputs[upstream_at + 1 :]

        def backward(ctx, g_loss, *_):
            need = list(ctx.needs_input_grad[:n_diff])
            if ctx.reduced:
                grads = [
                    _handover(g, g_loss) if n else None for g, n in zip(ctx.saved_tensors, need)
                ]
            else:
                args = [*ctx.saved_tensors, g_loss, *ctx.args]
                args[need_at] = need
                for at, value in overrides.items():
                    args[at] = value
                out = op(*args)
                grads = [g if n else None for g, n in zip(out[grads_at:], need)]
            grads = guard_double_backward(fn, grads)
            return (*grads,) + (None,) * (len(ctx.needs_input_grad) - n_diff)

        op.register_autograd(backward, setup_context=setup)

    @torch.library.custom_op("divkit::fused_linear_cross_entropy", mutates_args=())
    def fused_ce_op(
        hidden: Tensor,
        weight: Tensor,
        bias: Optional[Tensor],
        labels: Tensor,
        upstream: Optional[Tensor],
        ignore_index: int,
        label_smoothing: float,
        lse_square_scale: float,
        softcap: float,
        reduction: str,
        num_items_in_batch: float,
        chunk_size: int,
        return_stats: bool,
        backend: str,
        need: List[bool],
        group_name: Optional[str] = None,
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        from . import fused

        cfg = fused._CEConfig(
            ignore_index,
            label_smoothing,
            lse_square_scale,
            softcap,
            reduction,
            num_items_in_batch,
            chunk_size,
        )
        route = _route("fused_linear_cross_entropy", backend, (hidden, weight, bias, labels))
        group = _group(group_name)
        if group is not None and upstream is None:
            fused._check_same_tokens("fused_linear_cross_entropy", group, (hidden,), labels)
        outs, grads = fused._ce_call(
            cfg, group, route, return_stats, labels, [hidden, weight, bias], need, upstream
        )
        n = hidden.shape[0]
        loss = outs[0].reshape(n if reduction == "none" and upstream is None else 1)
        stats = (outs[1], outs[2]) if len(outs) == 3 else (None, None)
        return (loss, *_grads_or_empty(hidden, [*stats, *grads]))

    _fused_ce_options = _arg_picker(fused_ce_op, "reduction", "return_stats", "need")

    @fused_ce_op.register_fake
    def _fused_ce_fake(hidden, weight, bias, labels, upstream, *rest):
        args = (hidden, weight, bias, labels, upstream, *rest)
        reduction, return_stats, need = _fused_ce_options(args)
        n = hidden.shape[0]
        summed = reduction != "none" or upstream is not None
        loss = hidden.new_empty((1 if summed else n,), dtype=torch.float32)
        stat = (
            hidden.new_empty((n,), dtype=torch.float32)
            if return_stats and upstream is None
            else _empty_like_device(hidden)
        )
        return (loss, stat, stat.new_empty(stat.shape), *_fake_grads([hidden, weight, bias], need))

    # The logprobs / entropy statistics are the forward's only: the second call asks for none.
    _head_autograd(
        fused_ce_op,
        "fused_linear_cross_entropy",
        3,
        grads_at=3,
        second_call={"return_stats": False},
    )
    _loop_vmap(fused_ce_op, 5)

    def fused_ce(h, w, b, labels, cfg, return_stats: bool, route, group=None):
        """fused_linear_cross_entropy through the op: (loss, logprobs, entropy) with loss [N] or
        [1] (the caller reshapes); group: a vocabulary-parallel process group or None."""
        h2, w2 = _rows2(h), _rows2(w)
        need = _need((h2, w2, b), cfg.reduction != "none")
        out = fused_ce_op(
            h2, w2, b, labels, None, *cfg, return_stats, _engine(route), need, _name(group)
        )
        return out[0], out[1], out[2]

    @torch.library.custom_op("divkit::fused_linear_divergence", mutates_args=())
    def fused_divergence_op(
        student_hidden: Tensor,
        student_weight: Tensor,
        student_bias: Optional[Tensor],
        teacher_hidden: Tensor,
        teacher_weight: Tensor,
        teacher_bias: Optional[Tensor],
        labels: Optional[Tensor],
        weights: Optional[Tensor],
        teacher_token_ids: Optional[Tensor],
        upstream: Optional[Tensor],
        kind: str,
        beta: float,
        alpha: float,
        temperature: float,
        scale_by_t_squared: bool,
        ignore_index: int,
        reduction: str,
        num_items_in_batch: float,
        hard_weight: float,
        soft_weight: float,
        chunk_size: int,
        backend: str,
        need: List[bool],
        group_name: Optional[str] = None,
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        from . import fused

        cfg = fused._DistillConfig(
            kind,
            beta,
            alpha,
            temperature,
            scale_by_t_squared,
            ignore_index,
            reduction,
            num_items_in_batch,
            hard_weight,
            soft_weight,
            chunk_size,
        )
        ts = (
            student_hidden,
            student_weight,
            student_bias,
            teacher_hidden,
            teacher_weight,
            teacher_bias,
        )
        route = _route("fused_linear_divergence", backend, (*ts, labels, weights))
        group = _group(group_name)
        if upstream is None:
            if group is not None:
                fused._check_same_tokens(
                    "fused_linear_divergence", group, (student_hidden, teacher_hidden), labels
                )
            loss, grads = fused._distill_call(
                cfg, group, *ts, labels, weights, teacher_token_ids, need, route=route
            )
        else:
            loss, grads = fused._distill_call(
                cfg,
                group,
                *ts,
                labels,
                fused._token_weights(upstream, weights),
                teacher_token_ids,
                need,
                reduction="sum",
                route=route,
            )
        n = student_hidden.shape[0]
        loss = loss.reshape(n if reduction == "none" and upstream is None else 1)
        return (loss, *_grads_or_empty(student_hidden, grads))

    _fused_divergence_options = _arg_picker(fused_divergence_op, "reduction", "need")

    @fused_divergence_op.register_fake
    def _fused_divergence_fake(sh, sw, sb, th, tw, tb, labels, weights, ids, upstream, *rest):
        args = (sh, sw, sb, th, tw, tb, labels, weights, ids, upstream, *rest)
        reduction, need = _fused_divergence_options(args)
        summed = reduction != "none" or upstream is not None
        loss = sh.new_empty((1 if summed else sh.shape[0],), dtype=torch.float32)
        return (loss, *_fake_grads([sh, sw, sb, th, tw, tb], need))

    _head_autograd(fused_divergence_op, "fused_linear_divergence", 6)
    _loop_vmap(fused_divergence_op, 10)

    def fused_divergence(sh, sw, sb, th, tw, tb, labels, weights, ids, cfg, route, group=None):
        """fused_linear_divergence through the op: the loss, [N] or [1]."""
        xs = (_rows2(sh), _rows2(sw), sb, _rows2(th), _rows2(tw), tb)
        need = _need(xs, cfg.reduction != "none")
        out = fused_divergence_op(
            *xs, labels, weights, ids, None, *cfg, _engine(route), need, _name(group)
        )
        return out[0]

    @torch.library.custom_op("divkit::fused_linear_logprobs", mutates_args=())
    def fused_logprobs_op(
        hidden: Tensor,
        weight: Tensor,
        bias: Optional[Tensor],
        labels: Tensor,
        temperature: float,
        ignore_index: int,
        return_entropy: bool,
        topk: int,
        chunk_size: int,
        backend: str,
        log_sum_sq: bool = False,
        is_top1: bool = False,
        group_name: Optional[str] = None,
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        from . import fused

        route = _route("fused_linear_logprobs", backend, (hidden, weight, bias, labels))
        fallback = route is not None and not route.core
        group = _group(group_name)
        if group is not None:
            fused._check_same_tokens("fused_linear_logprobs", group, (hidden,), labels)
        outs = fused._lp_forward(
            [hidden, weight, bias],
            labels,
            temperature,
            ignore_index,
            return_entropy,
            topk,
            chunk_size,
            group,
            fallback,
            (log_sum_sq, is_top1),
            route=route,
        )
        outs = list(outs)
        lp = outs.pop(0)
        rest = [outs.pop(0) if on else None for on in (return_entropy, topk, log_sum_sq)]
        top1 = outs.pop(0) if is_top1 else hidden.new_empty((0,), dtype=torch.bool)
        return (lp, *_grads_or_empty(hidden, rest), top1)

    @fused_logprobs_op.register_fake
    def _fused_logprobs_fake(
        hidden,
        weight,
        bias,
        labels,
        temperature,
        ignore_index,
        ent,
        topk,
        chunk_size,
        backend,
        log_sum_sq=False,
        is_top1=False,
        group_name=None,
    ):
        n = hidden.shape[0]

        def vec(on, dtype=torch.float32):
            return hidden.new_empty((n,) if on else (0,), dtype=dtype)

        return vec(True), vec(ent), vec(topk > 0), vec(log_sum_sq), vec(is_top1, torch.bool)

    @torch.library.custom_op("divkit::fused_linear_logprobs_backward", mutates_args=())
    def fused_logprobs_backward_op(
        hidden: Tensor,
        weight: Tensor,
        bias: Optional[Tensor],
        labels: Tensor,
        grad_logprobs: Tensor,
        grad_entropy: Optional[Tensor],
        temperature: float,
        ignore_index: int,
        chunk_size: int,
        backend: str,
        need: List[bool],
        group_name: Optional[str] = None,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        from . import fused

        route = _route("fused_linear_logprobs", backend, (hidden, weight, bias, labels))
        fallback = route is not None and not route.core
        with_ent = grad_entropy is not None
        grads = fused._lp_backward(
            [hidden, weight, bias],
            labels,
            temperature,
            ignore_index,
            with_ent,
            0,
            chunk_size,
            _group(group_name),
            fallback,
            (grad_logprobs, grad_entropy) if with_ent else grad_logprobs,
            need,
            route=route,
        )
        return tuple(_grads_or_empty(hidden, grads))

    _fused_logprobs_backward_need = _arg_picker(fused_logprobs_backward_op, "need")

    @fused_logprobs_backward_op.register_fake
    def _fused_logprobs_backward_fake(hidden, weight, bias, *rest):
        (need,) = _fused_logprobs_backward_need((hidden, weight, bias, *rest))
        return tuple(_fake_grads([hidden, weight, bias], need))

    def _fused_logprobs_setup(ctx, inputs, output):
        ctx.mark_non_differentiable(*output[2:])
        ctx.save_for_backward(*inputs[:4])
        ctx.args = inputs[4:10]
        ctx.group = inputs[12]

    def _fused_logprobs_backward(ctx, g_lp, g_ent, *_):
        need = list(ctx.needs_input_grad[:3])
        h, w, b, labels = ctx.saved_tensors
        temperature, ignore_index, return_entropy, _topk, chunk, backend = ctx.args
        g_lp = torch.zeros(h.shape[0], dtype=torch.float32) if g_lp is None else g_lp
        out = fused_logprobs_backward_op(
            h,
            w,
            b,
            labels,
            g_lp,
            g_ent if return_entropy else None,
            temperature,
            ignore_index,
            chunk,
            backend,
            need,
            ctx.group,
        )
        grads = guard_double_backward(
            "fused_linear_logprobs", [g if n else None for g, n in zip(out, need)]
        )
        return (*grads,) + (None,) * 10

    fused_logprobs_op.register_autograd(
        _fused_logprobs_backward, setup_context=_fused_logprobs_setup
    )
    _loop_vmap(fused_logprobs_op, 4)
    _loop_vmap(fused_logprobs_backward_op, 6)

    def fused_logprobs(
        h,
        w,
        b,
        labels,
        temperature,
        ignore_index,
        return_entropy,
        topk,
        chunk,
        fallback,
        log_sum_sq=False,
        is_top1=False,
        group=None,
    ):
        """fused_linear_logprobs through the op: (logprobs[, entropy][, topk_mass]
        [, log_sum_sq_probs][, is_top1]) as [N]; group: a vocabulary-parallel process group or
        None."""
        out = fused_logprobs_op(
            _rows2(h),
            _rows2(w),
            b,
            labels,
            temperature,
            ignore_index,
            return_entropy,
            topk,
            chunk,
            "torch" if fallback else "auto",
            log_sum_sq,
            is_top1,
            _name(group),
        )
        on = (True, return_entropy, bool(topk), log_sum_sq, is_top1)
        return tuple(x for x, o in zip(out, on) if o)

    @torch.library.custom_op("divkit::fused_linear_sparse_divergence", mutates_args=())
    def fused_sparse_divergence_op(
        student_hidden: Tensor,
        student_weight: Tensor,
        student_bias: Optional[Tensor],
        teacher_indices: Tensor,
        teacher_logprobs: Tensor,
        labels: Optional[Tensor],
        weights: Optional[Tensor],
        upstream: Optional[Tensor],
        kind: str,
        beta: float,
        alpha: float,
        temperature: float,
        scale_by_t_squared: bool,
        ignore_index: int,
        reduction: str,
        num_items_in_batch: float,
        hard_weight: float,
        soft_weight: float,
        chunk_size: int,
        tail: str,
        backend: str,
        need: List[bool],
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        from . import fused

        cfg = fused._DistillConfig(
            kind,
            beta,
            alpha,
            temperature,
            scale_by_t_squared,
            ignore_index,
            reduction,
            num_items_in_batch,
            hard_weight,
            soft_weight,
            chunk_size,
        )
        ts = (student_hidden, student_weight, student_bias)
        route = _route("fused_linear_sparse_divergence", backend, (*ts, labels, weights))
        sparse = (teacher_indices, teacher_logprobs)
        if upstream is None:
            loss, grads = fused._sparse_call(
                cfg, tail, *ts, *sparse, labels, weights, need, route=route
            )
        else:
            loss, grads = fused._sparse_call(
                cfg,
                tail,
                *ts,
                *sparse,
                labels,
                fused._token_weights(upstream, weights),
                need,
                reduction="sum",
                route=route,
            )
        n = student_hidden.shape[0]
        loss = loss.reshape(n if reduction == "none" and upstream is None else 1)
        return (loss, *_grads_or_empty(student_hidden, grads))

    _fused_sparse_options = _arg_picker(fused_sparse_divergence_op, "reduction", "need")

    @fused_sparse_divergence_op.register_fake
    def _fused_sparse_fake(sh, sw, sb, idx, lp, labels, weights, upstream, *rest):
        args = (sh, sw, sb, idx, lp, labels, weights, upstream, *rest)
        reduction, need = _fused_sparse_options(args)
        summed = reduction != "none" or upstream is not None
        loss = sh.new_empty((1 if summed else sh.shape[0],), dtype=torch.float32)
        return (loss, *_fake_grads([sh, sw, sb], need))

    _head_autograd(fused_sparse_divergence_op, "fused_linear_sparse_divergence", 3)
    _loop_vmap(fused_sparse_divergence_op, 8)

    def fused_sparse_divergence(sh, sw, sb, idx, lp, labels, weights, cfg, tail, route):
        """fused_linear_sparse_divergence through the op: the loss, [N] or [1]."""
        xs = (_rows2(sh), _rows2(sw), sb)
        need = _need(xs, cfg.reduction != "none")
        out = fused_sparse_divergence_op(
            *xs, idx, lp, labels, weights, None, *cfg, tail, _engine(route), need
        )
        return out[0]

    # -----------------------------------------------------------------------------------------
    # Sparse and top-k teachers (divkit.sparse_divergence, divkit.topk_divergence): as the token
    # divergence, the student's gradient computed in the forward call (empty when not asked
    # for) and scaled by the upstream gradient in backward; the teacher gets none.
    # -----------------------------------------------------------------------------------------

    def _sparse_family_fake(student, reduction, grad_dtype, need_student):
        shape = student.shape[:-1] if reduction == "none" else ()
        loss = student.new_empty(shape, dtype=torch.float32)
        gs = (
            student.new_empty(student.shape, dtype=grad_dtype or student.dtype)
            if need_student
            else _empty_like_device(student)
        )
        return loss, gs

    def _sparse_family_options(op) -> Callable:
        """The (reduction, grad_dtype, need_student) of a sparse-family op's arguments."""
        return _arg_picker(op, "reduction", "grad_dtype", "need_student")

    def _sparse_family_autograd(op, fn: str):
        """Registers a sparse-family op's autograd: the student's gradient, computed in the
        forward call when ``need_student``, scaled by the upstream gradient; no other input's."""
        need_at = _arg_names(op).index("need_student")

        def setup(ctx, inputs, output):
            ctx.mark_non_differentiable(output[1])
            ctx.need = inputs[need_at]
            ctx.save_for_backward(output[1])

        def backward(ctx, g_loss, _gs):
            (gs,) = ctx.saved_tensors
            grad = _scale(gs, g_loss) if ctx.need and ctx.needs_input_grad[0] else None
            (grad,) = guard_double_backward(fn, [grad])
            return (grad,) + (None,) * (len(ctx.needs_input_grad) - 1)

        op.register_autograd(backward, setup_context=setup)

    @torch.library.custom_op("divkit::sparse_divergence", mutates_args=())
    def sparse_divergence_op(
        student: Tensor,
        teacher_indices: Tensor,
        teacher_logprobs: Tensor,
        labels: Optional[Tensor],
        weights: Optional[Tensor],
        kind: str,
        beta: float,
        alpha: float,
        temperature: float,
        scale_by_t_squared: bool,
        ignore_index: int,
        reduction: str,
        num_items_in_batch: float,
        grad_dtype: Optional[torch.dtype],
        backend: str,
        tail: str,
        need_student: bool,
    ) -> Tuple[Tensor, Tensor]:
        from . import functional, sparse

        cfg = functional._Config(
            kind,
            beta,
            alpha,
            temperature,
            scale_by_t_squared,
            ignore_index,
            reduction,
            num_items_in_batch,
            False,
            grad_dtype,
            backend,
        )
        ts = (student, teacher_indices, teacher_logprobs, labels, weights)
        route = _route("sparse_divergence", backend, ts)
        kernel = sparse._sparse_kernel(
            teacher_indices,
            teacher_logprobs,
            tail,
            labels,
            weights,
            cfg,
            route,
            "sparse_divergence",
        )
        loss, gs = sparse._run(student, kernel, cfg, need_student)
        return loss, _empty_like_device(student) if gs is None else gs

    _sparse_divergence_options = _sparse_family_options(sparse_divergence_op)

    @sparse_divergence_op.register_fake
    def _sparse_divergence_fake(student, idx, lp, labels, weights, *rest):
        args = (student, idx, lp, labels, weights, *rest)
        return _sparse_family_fake(student, *_sparse_divergence_options(args))

    _sparse_family_autograd(sparse_divergence_op, "sparse_divergence")
    _loop_vmap(sparse_divergence_op, 5)

    @torch.library.custom_op("divkit::topk_divergence", mutates_args=())
    def topk_divergence_op(
        student: Tensor,
        teacher: Tensor,
        labels: Optional[Tensor],
        weights: Optional[Tensor],
        k: int,
        kind: str,
        beta: float,
        alpha: float,
        temperature: float,
        scale_by_t_squared: bool,
        ignore_index: int,
        reduction: str,
        num_items_in_batch: float,
        grad_dtype: Optional[torch.dtype],
        backend: str,
        need_student: bool,
    ) -> Tuple[Tensor, Tensor]:
        from . import functional, sparse

        cfg = functional._Config(
            kind,
            beta,
            alpha,
            temperature,
            scale_by_t_squared,
            ignore_index,
            reduction,
            num_items_in_batch,
            False,
            grad_dtype,
            backend,
        )
        route = _route("topk_divergence", backend, (student, teacher, labels, weights))
        kernel = sparse._topk_kernel(teacher, k, labels, weights, cfg, route, "topk_divergence")
        loss, gs = sparse._run(student, kernel, cfg, need_student)
        return loss, _empty_like_device(student) if gs is None else gs

    _topk_divergence_options = _sparse_family_options(topk_divergence_op)

    @topk_divergence_op.register_fake
    def _topk_divergence_fake(student, teacher, labels, weights, k, *rest):
        args = (student, teacher, labels, weights, k, *rest)
        return _sparse_family_fake(student, *_topk_divergence_options(args))

    _sparse_family_autograd(topk_divergence_op, "topk_divergence")
    _loop_vmap(topk_divergence_op, 4)

    # -----------------------------------------------------------------------------------------
    # Vocabulary-parallel token divergence (divkit.distributed.vocab_parallel_divergence). A
    # ProcessGroup cannot be an op argument: the group travels by name, as in torch's functional
    # collectives, and is resolved by c10d in the op. Reduced losses get their shard gradients
    # in the forward call; reduction="none" calls again in backward with the upstream gradient
    # as token weights of a summed loss.
    # -----------------------------------------------------------------------------------------

    def group_name(group) -> str:
        """The c10d name of a process group (what ``_resolve_process_group`` takes back)."""
        return _name(group)

    @torch.library.custom_op("divkit::vocab_parallel_divergence", mutates_args=())
    def vocab_parallel_divergence_op(
        student: Tensor,
        teacher: Tensor,
        labels: Optional[Tensor],
        weights: Optional[Tensor],
        upstream: Optional[Tensor],
        kind: str,
        beta: float,
        alpha: float,
        temperature: float,
        scale_by_t_squared: bool,
        ignore_index: int,
        reduction: str,
        num_items_in_batch: float,
        group_name: str,
        need: List[bool],
        backend: str = "auto",
    ) -> Tuple[Tensor, Tensor, Tensor]:
        from . import distributed, functional
        from .fused import _token_weights

        cfg = functional._Config(
            kind,
            beta,
            alpha,
            temperature,
            scale_by_t_squared,
            ignore_index,
            reduction,
            num_items_in_batch,
            False,
            None,
            backend,
        )
        group = _group(group_name)
        if upstream is None:
            loss, grads = distributed._vp_call(
                student, teacher, labels, weights, cfg, group, need, reduction, True
            )
        else:
            wts = _token_weights(upstream, weights)
            loss, grads = distributed._vp_call(
                student, teacher, labels, wts, cfg, group, need, "sum"
            )
        return (loss, *_grads_or_empty(student, grads))

    _vocab_parallel_options = _arg_picker(vocab_parallel_divergence_op, "reduction", "need")

    @vocab_parallel_divergence_op.register_fake
    def _vocab_parallel_fake(s, t, labels, weights, upstream, *rest):
        reduction, need = _vocab_parallel_options((s, t, labels, weights, upstream, *rest))
        summed = reduction != "none" or upstream is not None
        loss = s.new_empty((1 if summed else s.shape[0],), dtype=torch.float32)
        grads = [
            x.new_empty(x.shape, dtype=torch.float32) if n else _empty_like_device(s)
            for x, n in zip((s, t), need)
        ]
        return (loss, *grads)

    _head_autograd(vocab_parallel_divergence_op, "vocab_parallel_divergence", 2)

    def _vocab_parallel_vmap(info, in_dims, *args):
        # Each call is a collective over the group: a loop over batch entries would make the
        # ranks' collectives depend on each rank's vmap, so vmap is refused.
        check.fail(
            "vocab_parallel_divergence",
            "torch.vmap is not supported (each call is a collective over the process group); "
            "call it on the batched logits directly: their leading dimensions are tokens",
        )

    if hasattr(vocab_parallel_divergence_op, "register_vmap"):
        vocab_parallel_divergence_op.register_vmap(_vocab_parallel_vmap)

    def vocab_parallel_divergence(s2, t2, labels, weights, cfg, group):
        """vocab_parallel_divergence through the op on [N, V_r] rows with the checked options
        ``cfg`` (a ``functional._Config``): the loss, [N] or [1]."""
        from . import functional

        need = _need((s2, t2), cfg.reduction != "none")
        options = functional._core_fields(cfg).values()  # in the op's order
        out = vocab_parallel_divergence_op(
            s2, t2, labels, weights, None, *options, group_name(group), need, cfg.backend
        )
        return out[0]

    # -----------------------------------------------------------------------------------------
    # Sequence-level DPO family (divkit.preference_loss: DPO, TDPO and SparsePO's last step).
    # Inputs [B]; the core runs on host copies in fp64/fp32; backward calls the op again with
    # the upstream gradient of the losses.
    # -----------------------------------------------------------------------------------------

    @torch.library.custom_op("divkit::preference_loss", mutates_args=())
    def preference_loss_op(
        policy_chosen_logps: Tensor,
        policy_rejected_logps: Tensor,
        ref_chosen_logps: Tensor,
        ref_rejected_logps: Tensor,
        chosen_lengths: Optional[Tensor],
        rejected_lengths: Optional[Tensor],
        policy_weights: Optional[Tensor],
        grad_losses: Optional[Tensor],
        loss_types: str,
        loss_weights: List[float],
        beta: float,
        label_smoothing: float,
        f_divergence_type: str,
        f_alpha_divergence_coef: float,
        discopop_tau: float,
        need: List[bool],
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        from . import _C
        from .preference import _common as common

        inputs = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
        dtype = common.compute_dtype(*inputs)
        n = inputs[0].shape[0]
        args = _C.PreferenceArgs(
            loss_types=loss_types.split(","),
            loss_weights=list(loss_weights),
            beta=beta,
            label_smoothing=label_smoothing,
            f_divergence_type=f_divergence_type,
            f_alpha_divergence_coef=f_alpha_divergence_coef,
            discopop_tau=discopop_tau,
        )
        host = [common.host(x, dtype) for x in inputs]
        sw = None if policy_weights is None else common.host(policy_weights, dtype)
        losses, cr, rj = (torch.empty(n, dtype=dtype) for _ in range(3))
        g = common.grad_bufs(inputs, None if grad_losses is None else need, dtype, 4)
        gl = None if grad_losses is None else common.host(grad_losses, dtype)
        _C.preference_loss(
            *host, args, chosen_lengths, rejected_lengths, sw, losses, cr, rj, gl, *g
        )
        device = inputs[0].device
        grads = common.back(g, inputs)
        outs = [losses.to(device), cr.to(device), rj.to(device)]
        return (*outs, *(_empty_like_device(inputs[0]) if x is None else x for x in grads))

    @preference_loss_op.register_fake
    def _preference_fake(pc, pr, rc, rr, nw, nl, sw, grad_losses, *rest):
        need = rest[-1]
        dtype = torch.float64 if any(x.dtype == torch.float64 for x in (pc, pr, rc, rr)) else None
        dtype = dtype or torch.float32
        n = pc.shape[0]
        outs = [pc.new_empty((n,), dtype=dtype) for _ in range(3)]
        grads = [
            x.new_empty(x.shape) if (grad_losses is not None and k) else _empty_like_device(pc)
            for x, k in zip((pc, pr, rc, rr), need)
        ]
        return (*outs, *grads)

    def _preference_setup(ctx, inputs, output):
        ctx.mark_non_differentiable(*output[1:])
        ctx.save_for_backward(*inputs[:7])
        ctx.args = inputs[8:15]

    def _preference_backward(ctx, g_losses, *_):
        need = list(ctx.needs_input_grad[:4])
        out = preference_loss_op(*ctx.saved_tensors, g_losses, *ctx.args, need)
        grads = [g if k else None for g, k in zip(out[3:], need)]
        grads = guard_double_backward("preference_loss", grads)
        return (*grads,) + (None,) * 12

    preference_loss_op.register_autograd(_preference_backward, setup_context=_preference_setup)
    _loop_vmap(preference_loss_op, 8)

    def preference_loss(pc, pr, rc, rr, nw, nl, sw, types, weights, beta, smoothing, f, fa, tau):
        """preference_loss through the op: (losses, chosen_rewards, rejected_rewards). The loss
        types travel as one comma-separated string (a schema has no list of strings)."""
        if any("," in t for t in types):
            check.fail("preference_loss", f"unknown loss_type in {types}")
        out = preference_loss_op(
            pc,
            pr,
            rc,
            rr,
            nw,
            nl,
            sw,
            None,
            ",".join(types),
            weights,
            beta,
            smoothing,
            f,
            fa,
            tau,
            [False] * 4,
        )
        return out[0], out[1], out[2]

    # -----------------------------------------------------------------------------------------
    # The TRL trainers' other sequence losses (cpo_loss, odds_ratio_loss, kto_loss) and the
    # per-token KL estimators of RLHF (kl_estimator): as preference_loss, the first call gives
    # the outputs, backward calls the op again with the upstream gradient of the first output.
    # Signature of each: (differentiable inputs, extra tensors, grad_out, options, need).
    # -----------------------------------------------------------------------------------------

    def _second_call_autograd(op, fn: str, n_in: int, n_extra: int, n_out: int, n_args: int):
        """Registers the autograd of a sequence op whose second call (grad_out given) returns
        the gradients of the n_in inputs after its n_out outputs."""

        def setup(ctx, inputs, output):
            ctx.mark_non_differentiable(*output[1:])
            ctx.save_for_backward(*inputs[: n_in + n_extra])
            ctx.args = inputs[n_in + n_extra + 1 : -1]

        def backward(ctx, g_out, *_):
            need = list(ctx.needs_input_grad[:n_in])
            out = op(*ctx.saved_tensors, g_out, *ctx.args, need)
            grads = [g if k else None for g, k in zip(out[n_out:], need)]
            grads = guard_double_backward(fn, grads)
            return (*grads,) + (None,) * (n_extra + 1 + n_args + 1)

        op.register_autograd(backward, setup_context=setup)
        _loop_vmap(op, n_in + n_extra + 1)

    def _seq_dtype(*xs) -> torch.dtype:
        return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32

    def _seq_grads_fake(xs, grad_out, need):
        return [
            x.new_empty(x.shape) if (grad_out is not None and k) else _empty_like_device(xs[0])
            for x, k in zip(xs, need)
        ]

    def _seq_back(g, inputs):
        from .preference import _common as common

        return [_empty_like_device(inputs[0]) if x is None else x for x in common.back(g, inputs)]

    @torch.library.custom_op("divkit::cpo_loss", mutates_args=())
    def cpo_loss_op(
        policy_chosen_logps: Tensor,
        policy_rejected_logps: Tensor,
        grad_losses: Optional[Tensor],
        loss_type: str,
        beta: float,
        label_smoothing: float,
        simpo_gamma: float,
        alpha: float,
        need: List[bool],
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        from . import _C
        from .preference import _common as common

        inputs = (policy_chosen_logps, policy_rejected_logps)
        dtype, n, device = _seq_dtype(*inputs), inputs[0].shape[0], inputs[0].device
        args = _C.CpoArgs(
            loss_type=loss_type,
            beta=beta,
            label_smoothing=label_smoothing,
            simpo_gamma=simpo_gamma,
            alpha=alpha,
        )
        host = [common.host(x, dtype) for x in inputs]
        losses, cr, rj = (torch.empty(n, dtype=dtype) for _ in range(3))
        g = common.grad_bufs(inputs, None if grad_losses is None else need, dtype, 2)
        gl = None if grad_losses is None else common.host(grad_losses, dtype)
        _C.cpo_loss(*host, args, losses, cr, rj, gl, *g)
        return (losses.to(device), cr.to(device), rj.to(device), *_seq_back(g, inputs))

    @cpo_loss_op.register_fake
    def _cpo_fake(pc, pr, grad_losses, *rest):
        outs = [pc.new_empty(pc.shape, dtype=_seq_dtype(pc, pr)) for _ in range(3)]
        return (*outs, *_seq_grads_fake((pc, pr), grad_losses, rest[-1]))

    _second_call_autograd(cpo_loss_op, "cpo_loss", 2, 0, 3, 5)

    def cpo_loss(pc, pr, loss_type, beta, eps, gamma, alpha):
        out = cpo_loss_op(pc, pr, None, loss_type, beta, eps, gamma, alpha, [False] * 2)
        return out[0], out[1], out[2]

    @torch.library.custom_op("divkit::odds_ratio_loss", mutates_args=())
    def odds_ratio_loss_op(
        policy_chosen_logps: Tensor,
        policy_rejected_logps: Tensor,
        grad_losses: Optional[Tensor],
        beta: float,
        need: List[bool],
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        from . import _C
        from .preference import _common as common

        inputs = (policy_chosen_logps, policy_rejected_logps)
        dtype, n, device = _seq_dtype(*inputs), inputs[0].shape[0], inputs[0].device
        host = [common.host(x, dtype) for x in inputs]
        losses, cr, rj, lo = (torch.empty(n, dtype=dtype) for _ in range(4))
        g = common.grad_bufs(inputs, None if grad_losses is None else need, dtype, 2)
        gl = None if grad_losses is None else common.host(grad_losses, dtype)
        _C.odds_ratio_loss(*host, beta, losses, cr, rj, lo, gl, *g)
        outs = (losses.to(device), cr.to(device), rj.to(device), lo.to(device))
        return (*outs, *_seq_back(g, inputs))

    @odds_ratio_loss_op.register_fake
    def _odds_ratio_fake(pc, pr, grad_losses, beta, need):
        outs = [pc.new_empty(pc.shape, dtype=_seq_dtype(pc, pr)) for _ in range(4)]
        return (*outs, *_seq_grads_fake((pc, pr), grad_losses, need))

    _second_call_autograd(odds_ratio_loss_op, "odds_ratio_loss", 2, 0, 4, 1)

    def odds_ratio_loss(pc, pr, beta):
        """(losses, chosen_rewards, rejected_rewards, log_odds) through the op."""
        return tuple(odds_ratio_loss_op(pc, pr, None, beta, [False] * 2)[:4])

    @torch.library.custom_op("divkit::kto_loss", mutates_args=())
    def kto_loss_op(
        policy_chosen_logps: Tensor,
        policy_rejected_logps: Tensor,
        reference_chosen_logps: Tensor,
        reference_rejected_logps: Tensor,
        policy_KL_logps: Optional[Tensor],
        reference_KL_logps: Optional[Tensor],
        grad_losses: Optional[Tensor],
        loss_type: str,
        beta: float,
        desirable_weight: float,
        undesirable_weight: float,
        need: List[bool],
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        from . import _C
        from .preference import _common as common

        inputs = (
            policy_chosen_logps,
            policy_rejected_logps,
            reference_chosen_logps,
            reference_rejected_logps,
        )
        dtype, device = _seq_dtype(*inputs), inputs[0].device
        nc, nr = inputs[0].shape[0], inputs[1].shape[0]
        pkl = None if policy_KL_logps is None else common.host(policy_KL_logps, dtype)
        rkl = None if reference_KL_logps is None else common.host(reference_KL_logps, dtype)
        h = [common.host(x, dtype) for x in inputs]
        losses = torch.empty(nc + nr, dtype=dtype)
        cr, rj = torch.empty(nc, dtype=dtype), torch.empty(nr, dtype=dtype)
        kl = torch.empty(1, dtype=dtype)
        backward = grad_losses is not None and any(need)
        g = [torch.empty(nc, dtype=dtype), torch.empty(nr, dtype=dtype)] if backward else [None] * 2
        gl = None if grad_losses is None else common.host(grad_losses, dtype)
        _C.kto_loss(
            h[0],
            h[1],
            pkl,
            h[2],
            h[3],
            rkl,
            loss_type,
            beta,
            desirable_weight,
            undesirable_weight,
            losses,
            cr,
            rj,
            kl,
            gl,
            *g,
        )
        # The reference log-probs get the opposite of the policy's gradient.
        grads = [
            (g[i % 2] if i < 2 else -g[i % 2]) if backward and need[i] else None for i in range(4)
        ]
        outs = (losses.to(device), cr.to(device), rj.to(device), kl.reshape(()).to(device))
        return (*outs, *_seq_back(grads, inputs))

    @kto_loss_op.register_fake
    def _kto_fake(pc, pr, rc, rr, pkl, rkl, grad_losses, *rest):
        dtype = _seq_dtype(pc, pr, rc, rr)
        outs = [
            pc.new_empty((pc.shape[0] + pr.shape[0],), dtype=dtype),
            pc.new_empty(pc.shape, dtype=dtype),
            pc.new_empty(pr.shape, dtype=dtype),
            pc.new_empty((), dtype=dtype),
        ]
        return (*outs, *_seq_grads_fake((pc, pr, rc, rr), grad_losses, rest[-1]))

    _second_call_autograd(kto_loss_op, "kto_loss", 4, 2, 4, 4)

    def kto_loss(pc, pr, rc, rr, pkl, rkl, loss_type, beta, wd, wu):
        """(losses, chosen_rewards, rejected_rewards, kl) through the op."""
        return tuple(
            kto_loss_op(pc, pr, rc, rr, pkl, rkl, None, loss_type, beta, wd, wu, [False] * 4)[:4]
        )

    @torch.library.custom_op("divkit::kl_estimator", mutates_args=())
    def kl_estimator_op(
        logprobs: Tensor,
        ref_logprobs: Tensor,
        grad_out: Optional[Tensor],
        kind: str,
        clamp: bool,
        out_dtype: torch.dtype,
        need: List[bool],
    ) -> Tuple[Tensor, Tensor, Tensor]:
        from . import _C
        from .rlhf import _flat, _shaped

        inputs = (logprobs, ref_logprobs)
        if grad_out is None:  # the values (the public function's check is skipped when traced)
            check.finite("kl_estimator", "logprobs", logprobs)
            check.finite("kl_estimator", "ref_logprobs", ref_logprobs)
        dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
        a, b = (_flat(x, dtype) for x in inputs)
        out = torch.empty(a.numel(), dtype=dtype)
        backward = grad_out is not None
        g = [torch.empty(a.numel(), dtype=dtype) if backward and k else None for k in need]
        go = None if grad_out is None else _flat(grad_out, dtype)
        _C.kl_estimator(a, b, kind, clamp, out, go, *g)
        grads = [_empty_like_device(logprobs) if x is None else x for x in _shaped(g, inputs)]
        return (out.reshape(logprobs.shape).to(logprobs.device, out_dtype), *grads)

    @kl_estimator_op.register_fake
    def _kl_estimator_fake(a, b, grad_out, kind, clamp, out_dtype, need):
        out = a.new_empty(a.shape, dtype=out_dtype)
        return (out, *_seq_grads_fake((a, b), grad_out, need))

    _second_call_autograd(kl_estimator_op, "kl_estimator", 2, 0, 1, 3)

    def kl_estimator(a, b, kind, clamp, out_dtype):
        return kl_estimator_op(a, b, None, kind, clamp, out_dtype, [False] * 2)[0]

    # -----------------------------------------------------------------------------------------
    # D2O, HyPO's online KL, SuperHF (preference) and ensemble_rewards, infalign_transform
    # (rlhf): the same second-call pattern as the sequence losses above.
    # -----------------------------------------------------------------------------------------

    @torch.library.custom_op("divkit::d2o_loss", mutates_args=())
    def d2o_loss_op(
        policy_sample_logps: Tensor,
        ref_sample_logps: Tensor,
        policy_rejected_logps: Tensor,
        ref_rejected_logps: Tensor,
        grad_out: Optional[Tensor],
        beta: float,
        alpha: float,
        need: List[bool],
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        from . import _C
        from .preference import _common as common

        inputs = (policy_sample_logps, ref_sample_logps, policy_rejected_logps, ref_rejected_logps)
        dtype, b, device = _seq_dtype(*inputs), inputs[0].shape[0], inputs[0].device
        h = [common.host(x, dtype) for x in inputs]
        losses, pos, neg = (torch.empty(b, dtype=dtype) for _ in range(3))
        backward = grad_out is not None
        g = [
            torch.empty(x.shape, dtype=dtype) if backward and k else None
            for x, k in zip(inputs, need)
        ]
        go = None if grad_out is None else common.host(grad_out, dtype)
        _C.d2o_loss(*h, beta, alpha, losses, pos, neg, go, *g)
        return (losses.to(device), pos.to(device), neg.to(device), *_seq_back(g, inputs))

    @d2o_loss_op.register_fake
    def _d2o_fake(ps, rs, pl, rl, grad_out, beta, alpha, need):
        dtype = _seq_dtype(ps, rs, pl, rl)
        outs = [ps.new_empty((ps.shape[0],), dtype=dtype) for _ in range(3)]
        return (*outs, *_seq_grads_fake((ps, rs, pl, rl), grad_out, need))

    _second_call_autograd(d2o_loss_op, "d2o_loss", 4, 0, 3, 2)

    def d2o_loss(ps, rs, pl, rl, beta, alpha):
        """(losses, sample_rewards, rejected_rewards) through the op."""
        return tuple(d2o_loss_op(ps, rs, pl, rl, None, beta, alpha, [False] * 4)[:3])

    @torch.library.custom_op("divkit::hypo_online_kl", mutates_args=())
    def hypo_online_kl_op(
        policy_sample_logps: Tensor,
        ref_sample_logps: Tensor,
        grad_out: Optional[Tensor],
        need: List[bool],
    ) -> Tuple[Tensor, Tensor]:
        from . import _C
        from .preference import _common as common

        ps, rs = policy_sample_logps, ref_sample_logps
        if grad_out is None:  # the public function's check is skipped when traced
            check.finite("hypo_loss", "policy_sample_logps", ps)
            check.finite("hypo_loss", "ref_sample_logps", rs)
        dtype, device = _seq_dtype(ps, rs), ps.device
        kl = torch.empty(ps.shape[0], dtype=dtype)
        g = torch.empty(ps.shape, dtype=dtype) if grad_out is not None and need[0] else None
        go = None if grad_out is None else common.host(grad_out, dtype)
        _C.hypo_online_kl(common.host(ps, dtype), common.host(rs, dtype), kl, go, g)
        return (kl.to(device), *_seq_back([g], (ps,)))

    @hypo_online_kl_op.register_fake
    def _hypo_fake(ps, rs, grad_out, need):
        kl = ps.new_empty((ps.shape[0],), dtype=_seq_dtype(ps, rs))
        return (kl, *_seq_grads_fake((ps,), grad_out, need))

    _second_call_autograd(hypo_online_kl_op, "hypo_loss", 1, 1, 1, 0)

    def hypo_online_kl(ps, rs):
        """HyPO's online KL surrogate [B] through the op (rs gets no gradient)."""
        return hypo_online_kl_op(ps, rs, None, [False])[0]

    @torch.library.custom_op("divkit::superhf_loss", mutates_args=())
    def superhf_loss_op(
        policy_logps: Tensor,
        kl: Tensor,
        rewards: Tensor,
        lengths: Optional[Tensor],
        grad_out: Optional[Tensor],
        kl_coef: float,
        top_k: int,
        need: List[bool],
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        from . import _C
        from .preference import _common as common

        lp = policy_logps
        if grad_out is None:  # the public function's check is skipped when traced
            for name, x in (("policy_logps", lp), ("rewards", rewards), ("kl", kl)):
                check.finite("superhf_loss", name, x)
            if lengths is not None and bool((lengths <= 0).any()):
                check.fail("superhf_loss", "lengths must have the shape of policy_logps and be > 0")
        dtype, device = _seq_dtype(lp, kl), lp.device
        loss = torch.empty(1, dtype=dtype)
        idx = torch.empty(lp.shape[0], top_k, dtype=torch.int64)
        backward = grad_out is not None
        g = [torch.empty(lp.shape, dtype=dtype) if backward and k else None for k in need]
        go = None if grad_out is None else common.host(grad_out.reshape(1), dtype)
        n = None if lengths is None else common.host(lengths, dtype)
        _C.superhf_loss(
            common.host(lp, dtype),
            common.host(rewards, torch.float64),
            common.host(kl, dtype),
            n,
            kl_coef,
            top_k,
            loss,
            idx,
            go,
            *g,
        )
        return (loss.reshape(()).to(device), idx.to(device), *_seq_back(g, (lp, kl)))

    @superhf_loss_op.register_fake
    def _superhf_fake(lp, kl, rewards, lengths, grad_out, kl_coef, top_k, need):
        loss = lp.new_empty((), dtype=_seq_dtype(lp, kl))
        idx = lp.new_empty((lp.shape[0], top_k), dtype=torch.int64)
        return (loss, idx, *_seq_grads_fake((lp, kl), grad_out, need))

    _second_call_autograd(superhf_loss_op, "superhf_loss", 2, 2, 2, 2)

    def superhf_loss(lp, kl, rewards, lengths, kl_coef, top_k):
        """(loss, kept_indices) through the op."""
        return tuple(
            superhf_loss_op(lp, kl, rewards, lengths, None, kl_coef, top_k, [False] * 2)[:2]
        )

    @torch.library.custom_op("divkit::ensemble_rewards", mutates_args=())
    def ensemble_rewards_op(
        rewards: Tensor,
        grad_out: Optional[Tensor],
        method: str,
        uwo_lambda: float,
        out_dtype: torch.dtype,
        need: List[bool],
    ) -> Tuple[Tensor, Tensor]:
        """rewards [..., E] (the ensemble dimension last) -> [...]."""
        from . import _C
        from .rlhf import _flat

        if grad_out is None:  # the public function's check is skipped when traced
            check.finite("ensemble_rewards", "rewards", rewards)
        dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
        lead, e, device = rewards.shape[:-1], rewards.shape[-1], rewards.device
        r = rewards.detach().to("cpu", dtype).reshape(-1, e).contiguous()
        out = torch.empty(r.shape[0], dtype=dtype)
        g = torch.empty(r.shape, dtype=dtype) if grad_out is not None and need[0] else None
        go = None if grad_out is None else _flat(grad_out, dtype)
        _C.ensemble_rewards(r, method, uwo_lambda, out, go, g)
        if g is None:
            g = _empty_like_device(rewards)
        else:
            g = g.reshape(rewards.shape).to(device, rewards.dtype)
        return out.reshape(lead).to(device, out_dtype), g

    @ensemble_rewards_op.register_fake
    def _ensemble_fake(rewards, grad_out, method, uwo_lambda, out_dtype, need):
        out = rewards.new_empty(rewards.shape[:-1], dtype=out_dtype)
        return (out, *_seq_grads_fake((rewards,), grad_out, need))

    _second_call_autograd(ensemble_rewards_op, "ensemble_rewards", 1, 0, 1, 3)

    def ensemble_rewards(rewards_last, method, uwo_lambda, out_dtype):
        return ensemble_rewards_op(rewards_last, None, method, uwo_lambda, out_dtype, [False])[0]

    @torch.library.custom_op("divkit::infalign_transform", mutates_args=())
    def infalign_transform_op(
        calibrated: Tensor,
        grad_out: Optional[Tensor],
        t: float,
        out_dtype: torch.dtype,
        need: List[bool],
    ) -> Tuple[Tensor, Tensor]:
        from . import _C
        from .rlhf import _flat, _shaped

        u = calibrated
        if grad_out is None:
            check.finite("infalign_transform", "calibrated", u)
        dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
        out = torch.empty(u.numel(), dtype=dtype)
        g = torch.empty(u.numel(), dtype=dtype) if grad_out is not None and need[0] else None
        go = None if grad_out is None else _flat(grad_out, dtype)
        _C.infalign_transform(_flat(u, dtype), t, out, go, g)
        (gu,) = _shaped([g], (u,))
        gu = _empty_like_device(u) if gu is None else gu
        return out.reshape(u.shape).to(u.device, out_dtype), gu

    @infalign_transform_op.register_fake
    def _infalign_fake(u, grad_out, t, out_dtype, need):
        return (u.new_empty(u.shape, dtype=out_dtype), *_seq_grads_fake((u,), grad_out, need))

    _second_call_autograd(infalign_transform_op, "infalign_transform", 1, 0, 1, 2)

    def infalign_transform(u, t, out_dtype):
        return infalign_transform_op(u, None, t, out_dtype, [False])[0]

    # -----------------------------------------------------------------------------------------
    # Distillation row losses (divkit.distill): OFA-KD and SWING, a loss per row [N] whose
    # second call (grad_out given) also returns the student's gradient [N, V].
    # Signature: (student, teacher, labels, [temps,] grad_out, options, need).
    # -----------------------------------------------------------------------------------------

    def _row_loss_call(kernel, student, dtype, grad_out, need):
        out = torch.empty(student.shape[0], dtype=dtype, device=student.device)
        if grad_out is None or not need[0]:
            kernel(student, out, None, None)
            return out, _empty_like_device(student)
        grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
        kernel(student, out, grad_out.to(dtype).contiguous(), grad)
        return out, grad

    def _row_loss_fake(student, teacher, grad_out, need):
        out = student.new_empty((student.shape[0],), dtype=_seq_dtype(student, teacher))
        g = student.new_empty(student.shape) if grad_out is not None and need[0] else None
        return out, (_empty_like_device(student) if g is None else g)

    @torch.library.custom_op("divkit::ofa_loss", mutates_args=())
    def ofa_rows_op(
        student: Tensor,
        teacher: Tensor,
        labels: Tensor,
        grad_out: Optional[Tensor],
        ignore_index: int,
        eps: float,
        temperature: float,
        need: List[bool],
    ) -> Tuple[Tensor, Tensor]:
        from . import _C

        def kernel(s, out, coef, grad):
            _C.ofa_rows(s, teacher, labels, ignore_index, eps, temperature, out, coef, grad)

        return _row_loss_call(kernel, student, _seq_dtype(student, teacher), grad_out, need)

    @ofa_rows_op.register_fake
    def _ofa_fake(student, teacher, labels, grad_out, *rest):
        return _row_loss_fake(student, teacher, grad_out, rest[-1])

    _second_call_autograd(ofa_rows_op, "ofa_loss", 1, 2, 1, 3)

    def ofa_rows(s, t, lab, ii, eps, temperature):
        """OFA-KD's loss per row [N] through the op."""
        return ofa_rows_op(s, t, lab, None, ii, eps, temperature, [False])[0]

    @torch.library.custom_op("divkit::swing_loss", mutates_args=())
    def tempered_kl_rows_op(
        student: Tensor,
        teacher: Tensor,
        temperatures: Tensor,
        labels: Optional[Tensor],
        grad_out: Optional[Tensor],
        noise_std: float,
        seed: int,
        ignore_index: int,
        need: List[bool],
    ) -> Tuple[Tensor, Tensor]:
        from . import _C

        seed_u = seed & 0xFFFFFFFFFFFFFFFF  # passed as a signed 64-bit int

        def kernel(s, out, coef, grad):
            _C.tempered_kl_rows(
                s, teacher, temperatures, noise_std, seed_u, labels, ignore_index, out, coef, grad
            )

        return _row_loss_call(kernel, student, _seq_dtype(student, teacher), grad_out, need)

    @tempered_kl_rows_op.register_fake
    def _tempered_kl_fake(student, teacher, temperatures, labels, grad_out, *rest):
        return _row_loss_fake(student, teacher, grad_out, rest[-1])

    _second_call_autograd(tempered_kl_rows_op, "swing_loss", 1, 3, 1, 3)

    def tempered_kl_rows(s, t, temps, noise_std, seed_u, lab, ii):
        """SWING's tempered (noisy) KL per row [N] through the op."""
        seed = seed_u - (1 << 64) if seed_u >= (1 << 63) else seed_u
        return tempered_kl_rows_op(s, t, temps, lab, None, noise_std, seed, ii, [False])[0]

    @torch.library.custom_op("divkit::dac_kl_loss", mutates_args=())
    def clipped_kl_rows_op(
        student: Tensor,
        lower: Tensor,
        upper: Tensor,
        teacher: Tensor,
        labels: Optional[Tensor],
        grad_out: Optional[Tensor],
        ignore_index: int,
        temperature: float,
        sharpness: float,
        need: List[bool],
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """DAC-KL's clipped KL per row [N], then the gradients of student, lower, upper."""
        from . import _C

        dtype, n = _seq_dtype(student, teacher), student.shape[0]
        out = torch.empty(n, dtype=dtype)
        backward = grad_out is not None
        grad = torch.empty(student.shape, dtype=student.dtype) if backward and need[0] else None
        g_lo = torch.empty(n, dtype=dtype) if backward and need[1] else None
        g_hi = torch.empty(n, dtype=dtype) if backward and need[2] else None
        go = grad_out.to(dtype).contiguous() if backward else None
        _C.clipped_kl_rows(
            student, teacher, lower, upper, temperature, sharpness, labels, ignore_index, out,
            go, grad, g_lo, g_hi,
        )  # fmt: skip
        grads = [
            _empty_like_device(student) if x is None else x.to(like.dtype)
            for x, like in ((grad, student), (g_lo, lower), (g_hi, upper))
        ]
        return (out, *grads)

    @clipped_kl_rows_op.register_fake
    def _clipped_kl_fake(student, lower, upper, teacher, labels, grad_out, *rest):
        out = student.new_empty((student.shape[0],), dtype=_seq_dtype(student, teacher))
        return (out, *_seq_grads_fake((student, lower, upper), grad_out, rest[-1]))

    _second_call_autograd(clipped_kl_rows_op, "dac_kl_loss", 3, 2, 1, 3)

    def clipped_kl_rows(s, lo, hi, t, lab, ii, temperature, sharpness):
        """DAC-KL's clipped KL per row [N] through the op."""
        return clipped_kl_rows_op(s, lo, hi, t, lab, None, ii, temperature, sharpness, [False] * 3)[
            0
        ]

    @torch.library.custom_op("divkit::dac_kl_mass_bounds", mutates_args=())
    def mass_bounds_op(
        teacher: Tensor, temperature: float, mass_lo: float, mass_hi: float
    ) -> Tuple[Tensor, Tensor]:
        """(lower, upper) [N] from teacher rows [N, V] (no gradient)."""
        from . import _C

        dtype = _seq_dtype(teacher)
        lo, hi = (torch.empty(teacher.shape[0], dtype=dtype) for _ in range(2))
        _C.mass_bounds(teacher.detach(), temperature, mass_lo, mass_hi, lo, hi)
        return lo, hi

    @mass_bounds_op.register_fake
    def _mass_bounds_fake(teacher, temperature, mass_lo, mass_hi):
        dtype = _seq_dtype(teacher)
        return tuple(teacher.new_empty((teacher.shape[0],), dtype=dtype) for _ in range(2))

    _loop_vmap(mass_bounds_op, 1)

    @torch.library.custom_op("divkit::nkd_loss", mutates_args=())
    def nkd_rows_op(
        student: Tensor,
        teacher: Tensor,
        labels: Tensor,
        grad_target: Optional[Tensor],
        grad_nontarget: Optional[Tensor],
        ignore_index: int,
        tau: float,
        fn: str,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """NKD's target and non-target terms per row [N] (also USKD's); given the upstream
        gradients of both, the student's gradient [N, V] after them."""
        from . import _C

        dtype, n = _seq_dtype(student, teacher), student.shape[0]
        target, nontarget = torch.empty(n, dtype=dtype), torch.empty(n, dtype=dtype)
        if grad_target is None and grad_nontarget is None:
            _C.nkd_rows(
                student, teacher, labels, ignore_index, tau, target, nontarget, None, None, None
            )
            # The public function's check (a host sync) is skipped when traced: here instead.
            bad = torch.isnan(target) | torch.isnan(nontarget)
            if bool(bad.any()):
                r = int(bad.nonzero()[0, 0])
                check.fail(
                    fn,
                    f"row {r}: every non-target logit of student_logits or teacher_logits is "
                    f"-inf (the non-target distribution over j != labels[{r}] is not defined)",
                )
            return target, nontarget, _empty_like_device(student)
        a = (
            torch.zeros(n, dtype=dtype)
            if grad_target is None
            else grad_target.to(dtype).contiguous()
        )
        b = (
            torch.zeros(n, dtype=dtype)
            if grad_nontarget is None
            else grad_nontarget.to(dtype).contiguous()
        )
        grad = torch.empty(student.shape, dtype=student.dtype)
        _C.nkd_rows(student, teacher, labels, ignore_index, tau, target, nontarget, a, b, grad)
        return target, nontarget, grad

    @nkd_rows_op.register_fake
    def _nkd_fake(student, teacher, labels, g_t, g_n, ignore_index, tau, fn):
        dtype = _seq_dtype(student, teacher)
        rows = [student.new_empty((student.shape[0],), dtype=dtype) for _ in range(2)]
        grad = student.new_empty(student.shape) if (g_t is not None or g_n is not None) else None
        return (*rows, _empty_like_device(student) if grad is None else grad)

    def _nkd_setup(ctx, inputs, output):
        ctx.mark_non_differentiable(output[2])
        ctx.save_for_backward(*inputs[:3])
        ctx.args = inputs[5:]

    def _nkd_backward(ctx, g_target, g_nontarget, _):
        if not ctx.needs_input_grad[0]:
            return (None,) * 8
        s, t, lab = ctx.saved_tensors
        grad = nkd_rows_op(s, t, lab, g_target, g_nontarget, *ctx.args)[2]
        (grad,) = guard_double_backward(ctx.args[-1], [grad])
        return (grad,) + (None,) * 7

    nkd_rows_op.register_autograd(_nkd_backward, setup_context=_nkd_setup)
    _loop_vmap(nkd_rows_op, 5)

    def nkd_rows(s, t, lab, ignore_index, tau, fn):
        """(target, nontarget) [N] through the op."""
        out = nkd_rows_op(s, t, lab, None, None, ignore_index, tau, fn)
        return out[0], out[1]

    # -----------------------------------------------------------------------------------------
    # Sample divergences of divkit.ot (mmd, cs_divergence): the float64 gradients of x and y
    # are computed in forward (as the eager path) and scaled in backward. backend="torch" runs
    # the PyTorch fallback (other devices, or asked for) inside the op.
    # -----------------------------------------------------------------------------------------

    @torch.library.custom_op("divkit::sample_divergence", mutates_args=())
    def sample_divergence_op(
        x: Tensor,
        y: Tensor,
        a: Optional[Tensor],
        b: Optional[Tensor],
        which: str,
        kernel: str,
        sigma: float,
        need: List[bool],
        backend: str = "core",
    ) -> Tuple[Tensor, Tensor, Tensor]:
        from . import _C

        if backend == "torch":
            from .backends import torch_ot

            val, gx, gy = torch_ot.sample_divergence(which, x, y, a, b, kernel, sigma, need)
            grads = [_empty_like_device(x) if g is None else g for g in (gx, gy)]
            return (val.to(x.dtype), *grads)
        gx = torch.empty(x.shape, dtype=torch.float64) if need[0] else None
        gy = torch.empty(y.shape, dtype=torch.float64) if need[1] else None
        val = _C.sample_divergence(
            which,
            x.detach(),
            y.detach(),
            None if a is None else a.detach(),
            None if b is None else b.detach(),
            kernel,
            sigma,
            gx,
            gy,
        )
        grads = [_empty_like_device(x) if g is None else g for g in (gx, gy)]
        return (torch.tensor(val, dtype=x.dtype), *grads)

    @sample_divergence_op.register_fake
    def _sample_divergence_fake(x, y, a, b, which, kernel, sigma, need, backend="core"):
        grads = [
            z.new_empty(z.shape, dtype=torch.float64) if k else _empty_like_device(x)
            for z, k in zip((x, y), need)
        ]
        return (x.new_empty((), dtype=x.dtype), *grads)

    def _sample_divergence_setup(ctx, inputs, output):
        ctx.mark_non_differentiable(*output[1:])
        ctx.save_for_backward(output[1], output[2])
        ctx.need = inputs[7]
        ctx.fn = "mmd" if inputs[4] == "mmd" else "cs_divergence"

    def _sample_divergence_backward(ctx, g_val, *_):
        go64 = g_val.to(torch.float64)
        grads = [
            (g * go64).to(g_val.dtype) if k else None for g, k in zip(ctx.saved_tensors, ctx.need)
        ]
        grads = guard_double_backward(ctx.fn, grads)
        return (*grads,) + (None,) * 7

    sample_divergence_op.register_autograd(
        _sample_divergence_backward, setup_context=_sample_divergence_setup
    )
    _loop_vmap(sample_divergence_op, 4)

    def sample_divergence(x, y, a, b, which, kernel, sigma, core: bool = True):
        """MMD^2 or the CS divergence (a scalar of x's dtype) through the op, computed by the
        C++ core or (core=False) the PyTorch fallback, whose host reads stay inside the op."""
        on = torch.is_grad_enabled()
        need = [on and x.requires_grad, on and y.requires_grad]
        backend = "core" if core else "torch"
        return sample_divergence_op(x, y, a, b, which, kernel, sigma, need, backend)[0]

    # -----------------------------------------------------------------------------------------
    # kde_log_density (no gradient: its inputs are detached by the public function).
    # -----------------------------------------------------------------------------------------

    @torch.library.custom_op("divkit::kde_log_density", mutates_args=())
    def kde_log_density_op(x: Tensor, y: Tensor, w: Optional[Tensor], bandwidth: float) -> Tensor:
        from . import _C

        out = torch.empty(y.shape[0], dtype=torch.float64)
        _C.kde_log_density(x, w, y, bandwidth, out)
        return out

    @kde_log_density_op.register_fake
    def _kde_log_density_fake(x, y, w, bandwidth):
        return y.new_empty((y.shape[0],), dtype=torch.float64, device="cpu")

    def _kde_vmap(info, in_dims, x, y, w, bandwidth):
        def entry(t, d, i):
            return t.select(d, i) if (t is not None and d is not None) else t

        outs = [
            kde_log_density_op(*(entry(t, d, i) for t, d in zip((x, y, w), in_dims[:3])), bandwidth)
            for i in range(info.batch_size)
        ]
        return torch.stack(outs), 0

    if hasattr(kde_log_density_op, "register_vmap"):
        kde_log_density_op.register_vmap(_kde_vmap)

    # -----------------------------------------------------------------------------------------
    # Entropic OT (divkit.ot.sinkhorn, and so sinkhorn_divergence, sinkhorn_kd_loss, monge_gap):
    # 3-D inputs [B, ...]; the solver (the C++ core, or the PyTorch fallback for backend="torch"
    # and tensors off the CPU) computes the envelope gradients in forward, scaled in backward in
    # float64 as the eager path does. The non-convergence warning is given by the op, when it
    # runs (a traced caller cannot read the flags).
    # -----------------------------------------------------------------------------------------

    @torch.library.custom_op("divkit::sinkhorn", mutates_args=())
    def sinkhorn_op(
        x: Optional[Tensor],
        y: Optional[Tensor],
        cost: Optional[Tensor],
        a: Optional[Tensor],
        b: Optional[Tensor],
        eps: float,
        p: int,
        tol: float,
        max_iter: int,
        check_every: int,
        eps_scaling: float,
        rho_a: float,
        rho_b: float,
        cost_cache_bytes: int,
        symmetric: bool,
        return_plan: bool,
        warn: bool,
        fn: str,
        backend: str,
        need: List[bool],
    ) -> Tuple[
        Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
        Tensor,
    ]:  # fmt: skip
        """(reg_cost, f, g, transport_cost, n_iter, marginal_error, converged, plan, grad x,
        grad y, grad a, grad b); need = (x, y, cost, a, b); the cost's gradient is the plan."""
        from . import ot

        cfg = ot._Cfg(
            eps, p, tol, max_iter, check_every, eps_scaling, rho_a, rho_b, cost_cache_bytes,
            symmetric, return_plan, warn, fn,
        )  # fmt: skip
        reg, stats, f, g, plan, grads = ot._sinkhorn_run(
            x, y, cost, a, b, cfg, tuple(need), backend == "core"
        )
        dt = reg.dtype
        if warn:
            ot._warn_sinkhorn(cfg, stats, _warn_at_caller)
        ref = cost if cost is not None else x
        plan = _empty_like_device(ref) if plan is None else plan
        return _unaliased(
            (x, y, cost, a, b),
            reg,
            f.to(dt),
            g.to(dt),
            stats["transport_cost"].to(dt),
            stats["n_iter"],
            stats["marginal_error"],
            stats["converged"],
            plan,
            *(_empty_like_device(ref) if t is None else t for t in grads),
        )

    _sinkhorn_options = _arg_picker(sinkhorn_op, "return_plan", "need")

    @sinkhorn_op.register_fake
    def _sinkhorn_fake(x, y, cost, a, b, *rest):
        return_plan, need = _sinkhorn_options((x, y, cost, a, b, *rest))
        if cost is not None:
            ref, (B, n, m) = cost, cost.shape
        else:
            ref, (B, n, m) = x, (x.shape[0], x.shape[1], y.shape[1])
        dt = ref.dtype

        def new(shape, dtype=torch.float64):
            return ref.new_empty(shape, dtype=dtype)

        plan = new((B, n, m), dt) if (return_plan or need[2]) else _empty_like_device(ref)
        grads = [
            new(z.shape) if (z is not None and k) else _empty_like_device(ref)
            for z, k in zip((x, y, a, b), (need[0], need[1], need[3], need[4]))
        ]
        stats = [new((B,), dt), new((B,), torch.int64), new((B,)), new((B,), torch.bool)]
        return (new((B,), dt), new((B, n), dt), new((B, m), dt), *stats, plan, *grads)

    def _sinkhorn_setup(ctx, inputs, output):
        ctx.mark_non_differentiable(*output[1:])
        ctx.need = inputs[-1]
        ctx.fn = inputs[17]
        ctx.save_for_backward(output[8], output[9], output[7], output[10], output[11])

    def _sinkhorn_backward(ctx, g_reg, *_):
        # As GradsInForward with Scaling(fp64=True): the product in float64, cast to g_reg's dtype.
        go64 = g_reg.to(torch.float64)
        grads = [
            (g * go64.reshape((-1,) + (1,) * (g.dim() - 1))).to(g_reg.dtype) if (k and n) else None
            for g, k, n in zip(ctx.saved_tensors, ctx.need, ctx.needs_input_grad[:5])
        ]
        grads = guard_double_backward(ctx.fn, grads)
        return (*grads,) + (None,) * 15

    sinkhorn_op.register_autograd(_sinkhorn_backward, setup_context=_sinkhorn_setup)
    _loop_vmap(sinkhorn_op, 5)

    def sinkhorn(x, y, cost, a, b, cfg, core: bool):
        """sinkhorn through the op on 3-D inputs: (reg_cost, f, g, transport_cost, n_iter,
        marginal_error, converged, plan or None)."""
        on = torch.is_grad_enabled()
        need = [bool(on and t is not None and t.requires_grad) for t in (x, y, cost, a, b)]
        out = sinkhorn_op(x, y, cost, a, b, *cfg[:12], cfg.fn, "core" if core else "torch", need)
        return (*out[:7], out[7] if cfg.return_plan else None)

    # -----------------------------------------------------------------------------------------
    # Quadratically regularized / sparsity-constrained OT (divkit.ot.sparse_ot). The plan's
    # number of non-zeros depends on the data, so the op returns it dense [n, m] (a traced
    # sparse_ot gives the dense plan); the gradients (Danskin: alpha, the solver's grad b, the
    # plan) are computed in forward and scaled in float64 in backward.
    # -----------------------------------------------------------------------------------------

    @torch.library.custom_op("divkit::sparse_ot", mutates_args=())
    def sparse_ot_op(
        a: Tensor,
        b: Tensor,
        cost: Tensor,
        gamma: float,
        k: int,
        tol: float,
        max_iter: int,
        warn: bool,
        backend: str,
        need: List[bool],
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(reg_cost, plan [n, m] float64, transport_cost, alpha [n] float64, n_iter, marginal_error,
        converged, grad b [m] float64 or empty); the gradients of a and cost are alpha and the
        plan."""
        from . import ot

        reg, box, grad_b = ot._sparse_ot_run(
            a, b, cost, gamma, k, tol, max_iter, backend == "core", need[1]
        )
        if warn:
            ot._warn_sparse_ot(box, max_iter, tol, k, _warn_at_caller)
        plan = box["plan"].to_dense()
        dev = cost.device
        return _unaliased(
            (a, b, cost),
            reg,
            plan,
            torch.tensor(float(box["tc"]), dtype=cost.dtype, device=dev),
            box["alpha"],
            torch.tensor(int(box["n_iter"]), dtype=torch.int64, device=dev),
            torch.tensor(float(box["err"]), dtype=torch.float64, device=dev),
            torch.tensor(bool(box["conv"]), device=dev),
            _empty_like_device(cost) if grad_b is None else grad_b,
        )

    @sparse_ot_op.register_fake
    def _sparse_ot_fake(a, b, cost, gamma, k, tol, max_iter, warn, backend, need):
        f64 = torch.float64
        return (
            cost.new_empty(()),
            cost.new_empty(cost.shape, dtype=f64),
            cost.new_empty(()),
            cost.new_empty((cost.shape[0],), dtype=f64),
            cost.new_empty((), dtype=torch.int64),
            cost.new_empty((), dtype=f64),
            cost.new_empty((), dtype=torch.bool),
            cost.new_empty((cost.shape[1],), dtype=f64) if need[1] else _empty_like_device(cost),
        )

    def _sparse_ot_setup(ctx, inputs, output):
        ctx.mark_non_differentiable(*output[1:])
        ctx.need = inputs[-1]
        ctx.save_for_backward(output[3], output[7], output[1])

    def _sparse_ot_backward(ctx, g_reg, *_):
        # As GradsInForward with Scaling(fp64=True): the product in float64 (go64 broadcast to
        # g's rank, so that a float32 g is promoted), cast to g_reg's dtype.
        go64 = g_reg.to(torch.float64)
        grads = [
            (g * go64.reshape((1,) * g.dim())).to(g_reg.dtype) if (k and n) else None
            for g, k, n in zip(ctx.saved_tensors, ctx.need, ctx.needs_input_grad[:3])
        ]
        grads = guard_double_backward("sparse_ot", grads)
        return (*grads,) + (None,) * 7

    sparse_ot_op.register_autograd(_sparse_ot_backward, setup_context=_sparse_ot_setup)
    _loop_vmap(sparse_ot_op, 3)

    def sparse_ot(a, b, cost, gamma, k, tol, max_iter, warn, core: bool):
        """sparse_ot through the op: (reg_cost, dense plan, transport_cost, alpha, n_iter,
        marginal_error, converged)."""
        on = torch.is_grad_enabled()
        need = [bool(on and t.requires_grad) for t in (a, b, cost)]
        backend = "core" if core else "torch"
        return sparse_ot_op(a, b, cost, gamma, k, tol, max_iter, warn, backend, need)[:7]

    # -----------------------------------------------------------------------------------------
    # kde_log_likelihood and kde_bandwidth (no gradient): their eager results are Python numbers;
    # the ops return them as float64 (int64 for n_evals) tensors, which a traced call gives back.
    # -----------------------------------------------------------------------------------------

    @torch.library.custom_op("divkit::kde_log_likelihood", mutates_args=())
    def kde_log_likelihood_op(
        x: Tensor, y: Optional[Tensor], w: Optional[Tensor], bandwidth: float
    ) -> Tensor:
        from . import _C

        return torch.tensor(_C.kde_log_likelihood(x, w, y, bandwidth), dtype=torch.float64)

    @kde_log_likelihood_op.register_fake
    def _kde_log_likelihood_fake(x, y, w, bandwidth):
        return x.new_empty((), dtype=torch.float64, device="cpu")

    @torch.library.custom_op("divkit::kde_bandwidth", mutates_args=())
    def kde_bandwidth_op(
        x: Tensor,
        y: Optional[Tensor],
        w: Optional[Tensor],
        h_min: float,
        h_max: float,
        grid: int,
        tol: float,
        max_iter: int,
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(bandwidth, log_likelihood, n_evals, grid_bandwidths [grid], grid_log_likelihoods
        [grid])."""
        from . import _C

        b, ll, ne, gb, gl = _C.kde_select_bandwidth(x, w, y, h_min, h_max, grid, tol, max_iter)
        f64 = torch.float64
        return (
            torch.tensor(b, dtype=f64),
            torch.tensor(ll, dtype=f64),
            torch.tensor(ne, dtype=torch.int64),
            torch.tensor(list(gb), dtype=f64),
            torch.tensor(list(gl), dtype=f64),
        )

    @kde_bandwidth_op.register_fake
    def _kde_bandwidth_fake(x, y, w, h_min, h_max, grid, tol, max_iter):
        def new(shape, dtype=torch.float64):
            return x.new_empty(shape, dtype=dtype, device="cpu")

        return new(()), new(()), new((), torch.int64), new((grid,)), new((grid,))

    _loop_vmap(kde_log_likelihood_op, 3)
    _loop_vmap(kde_bandwidth_op, 3)

    # -----------------------------------------------------------------------------------------
    # USKD's soft labels (divkit.distill.uskd_soft_labels, and so uskd_loss): torch code whose
    # batch mean over the non-ignored rows and label check read values; as an op, the output
    # shapes are known before it runs. No gradient (the labels are constants of the loss).
    # -----------------------------------------------------------------------------------------

    @torch.library.custom_op("divkit::uskd_soft_labels", mutates_args=())
    def uskd_soft_labels_op(
        student: Tensor, labels: Tensor, weak: Tensor, ignore_index: int, fn: str
    ) -> Tuple[Tensor, Tensor]:
        """(target [N], nontarget [N, C]) float64 from rows [N, C] and labels [N]."""
        from .distill.kd import _uskd_soft_label_rows

        return _uskd_soft_label_rows(fn, student, labels, weak, ignore_index)

    @uskd_soft_labels_op.register_fake
    def _uskd_soft_labels_fake(student, labels, weak, ignore_index, fn):
        f64 = torch.float64
        return student.new_empty((student.shape[0],), dtype=f64), student.new_empty(
            student.shape, dtype=f64
        )

    _loop_vmap(uskd_soft_labels_op, 3)

    # -----------------------------------------------------------------------------------------
    # Row statistics of divkit.distill without gradients: row_entropy (so bdkd_loss's weights)
    # and the sorted teacher probabilities of DACKLBounds.
    # -----------------------------------------------------------------------------------------

    @torch.library.custom_op("divkit::row_entropy", mutates_args=())
    def row_entropy_op(logits: Tensor, temperature: float) -> Tensor:
        """H(softmax(logits / T)) per row [N] of logits [N, V] (float64 for float64 logits)."""
        from . import _C

        out = torch.empty(logits.shape[0], dtype=_seq_dtype(logits))
        _C.row_entropy(logits, temperature, out)
        return out

    @row_entropy_op.register_fake
    def _row_entropy_fake(logits, temperature):
        return logits.new_empty((logits.shape[0],), dtype=_seq_dtype(logits))

    _loop_vmap(row_entropy_op, 1)

    @torch.library.custom_op("divkit::sorted_probs", mutates_args=())
    def sorted_probs_op(teacher: Tensor, temperature: float, k: int, dtype: torch.dtype) -> Tensor:
        """The k largest probabilities of softmax(teacher / T) per row, decreasing: [N, k]."""
        from . import _C

        out = torch.empty(teacher.shape[0], k, dtype=dtype)
        _C.sorted_probs(teacher, temperature, out)
        return out

    @sorted_probs_op.register_fake
    def _sorted_probs_fake(teacher, temperature, k, dtype):
        return teacher.new_empty((teacher.shape[0], k), dtype=dtype)

    _loop_vmap(sorted_probs_op, 1)

    # -----------------------------------------------------------------------------------------
    # A label range check for torch-only losses while traced: the check reads values (a graph
    # break), so it runs in an op, when the graph runs, on a copy of the labels that the loss
    # then uses (an op whose output nothing used could be dropped from the graph).
    # -----------------------------------------------------------------------------------------

    @torch.library.custom_op("divkit::checked_labels", mutates_args=())
    def checked_labels_op(
        labels: Tensor, n_classes: int, ignore_index: Optional[int], fn: str
    ) -> Tensor:
        """labels (a copy, int64) after checking them: in [0, n_classes), or ignore_index."""
        out = labels.to(torch.int64, copy=True)
        if ignore_index is None:
            if bool(((out < 0) | (out >= n_classes)).any()):
                check.fail(fn, f"labels out of range [0, {n_classes})")
        else:
            check.label_range(fn, "labels", out, n_classes, ignore_index)
        return out

    @checked_labels_op.register_fake
    def _checked_labels_fake(labels, n_classes, ignore_index, fn):
        return labels.new_empty(labels.shape, dtype=torch.int64)

    _loop_vmap(checked_labels_op, 1)

    @torch.library.custom_op("divkit::checked_range", mutates_args=())
    def checked_range_op(
        x: Tensor, lo: float, hi: float, fn: str, message: str, lo_exclusive: bool = False
    ) -> Tensor:
        """x (a copy) after checking that every value lies in [lo, hi], or (lo, hi] when
        lo_exclusive (NaN does not); else divkit.Error("fn: message")."""
        low = (x <= lo) if lo_exclusive else (x < lo)
        if bool((low | (x > hi) | x.isnan()).any()):
            check.fail(fn, message)
        return x.clone()

    @checked_range_op.register_fake
    def _checked_range_fake(x, lo, hi, fn, message, lo_exclusive=False):
        return torch.empty_like(x)

    _loop_vmap(checked_range_op, 1)

    # -----------------------------------------------------------------------------------------
    # USCD's selective contrastive decoding step (divkit.distill.uscd_logits; no gradient).
    # -----------------------------------------------------------------------------------------

    @torch.library.custom_op("divkit::selective_contrast", mutates_args=())
    def selective_contrast_op(
        standard: Tensor,
        lame: Tensor,
        lame_weight: float,
        std_threshold: float,
        filter_ratio: float,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """(logits [N, V], uncertainty [N], applied [N] int32) from rows [N, V]."""
        from . import _C

        n, v = standard.shape
        dt = _seq_dtype(standard, lame)
        out, unc = torch.empty(n, v, dtype=dt), torch.empty(n, dtype=dt)
        applied = torch.empty(n, dtype=torch.int32)
        _C.selective_contrast(
            standard, lame, lame_weight, std_threshold, filter_ratio, out, unc, applied
        )
        return out, unc, applied

    @selective_contrast_op.register_fake
    def _selective_contrast_fake(standard, lame, *rest):
        n, dt = standard.shape[0], _seq_dtype(standard, lame)
        return (
            standard.new_empty(standard.shape, dtype=dt),
            standard.new_empty((n,), dtype=dt),
            standard.new_empty((n,), dtype=torch.int32),
        )

    _loop_vmap(selective_contrast_op, 2)

    # -----------------------------------------------------------------------------------------
    # Helpers without a gradient that read values on the host: calibrate_reward and best_of_n
    # (divkit.rlhf), swing_noise, weight_aligning and teacher_class_means (divkit.distill). Each
    # op runs the eager function's own implementation (so the same bits) and its value checks
    # (skipped by the public function while traced); the public functions pass detached
    # tensors, as their eager path computes on them, so no op needs an autograd formula.
    # -----------------------------------------------------------------------------------------

    @torch.library.custom_op("divkit::calibrate_reward", mutates_args=())
    def calibrate_reward_op(rewards: Tensor, ref_rewards: Tensor) -> Tensor:
        """The calibrated rewards, float32 with the rewards' shape ([B] or [B, N]) and device,
        from ref_rewards [B, M] (no gradient: a step function)."""
        from .rlhf import _calibrate

        check.finite("calibrate_reward", "rewards", rewards)
        check.finite("calibrate_reward", "ref_rewards", ref_rewards)
        return _calibrate(rewards, ref_rewards)

    @calibrate_reward_op.register_fake
    def _calibrate_reward_fake(rewards, ref_rewards):
        return rewards.new_empty(rewards.shape, dtype=torch.float32)

    _loop_vmap(calibrate_reward_op, 2)

    @torch.library.custom_op("divkit::best_of_n", mutates_args=())
    def best_of_n_op(rewards: Tensor) -> Tensor:
        """The index of the best of the N rewards per row of rewards [B, N] (int64 [B], on the
        rewards' device; the first on ties)."""
        from .rlhf import _best_indices

        check.finite("best_of_n", "rewards", rewards, logits=True)
        return _best_indices(rewards)

    @best_of_n_op.register_fake
    def _best_of_n_fake(rewards):
        return rewards.new_empty((rewards.shape[0],), dtype=torch.int64)

    _loop_vmap(best_of_n_op, 1)

    @torch.library.custom_op("divkit::swing_noise", mutates_args=())
    def swing_noise_op(seed: int, shape: List[int], dtype: torch.dtype) -> Tensor:
        """SWING's counter-based standard normal noise of this shape (CPU tensor)."""
        from .distill.kd import _swing_noise

        return _swing_noise(seed, shape, dtype)

    @swing_noise_op.register_fake
    def _swing_noise_fake(seed, shape, dtype):
        return torch.empty(shape, dtype=dtype, device="cpu")

    @torch.library.custom_op("divkit::weight_aligning", mutates_args=())
    def weight_aligning_op(
        weight: Tensor, bias: Optional[Tensor], num_old: int
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """(aligned weight [C, D], aligned bias [C] (empty without bias), gamma: a 0-d float64
        tensor on the weight's device)."""
        from .distill.incremental import _align

        check.finite("weight_aligning", "weight", weight)
        check.finite("weight_aligning", "bias", bias)
        w, b, gamma = _align(weight, num_old, bias)
        return w, (_empty_like_device(weight) if b is None else b), gamma

    @weight_aligning_op.register_fake
    def _weight_aligning_fake(weight, bias, num_old):
        b = _empty_like_device(weight) if bias is None else torch.empty_like(bias)
        return torch.empty_like(weight), b, weight.new_empty((), dtype=torch.float64)

    _loop_vmap(weight_aligning_op, 2)

    @torch.library.custom_op("divkit::teacher_class_means", mutates_args=())
    def teacher_class_means_op(features: Tensor, labels: Tensor, num_classes: int) -> Tensor:
        """Class means [num_classes, D] of features [N, D] with labels [N] in [0, num_classes)."""
        from .distill.features import _class_means

        fn = "teacher_class_means"
        check.finite(fn, "features", features)
        if bool(((labels < 0) | (labels >= num_classes)).any()):
            check.fail(fn, f"labels out of range [0, {num_classes})")
        return _class_means(features, labels, num_classes)

    @teacher_class_means_op.register_fake
    def _teacher_class_means_fake(features, labels, num_classes):
        return features.new_empty((num_classes, features.shape[1]))

    _loop_vmap(teacher_class_means_op, 2)
