"""The two ways divkit's kernels meet autograd, written once for every family.

* :class:`GradsInForward`: the kernel computes the loss and its gradients in one pass (token
  divergences, the fused heads, OT solvers); backward only scales the saved gradients by the
  upstream gradient. :func:`grads_in_forward` applies it.
* :class:`RecomputeInBackward`: the forward call computes the outputs only; backward calls the
  kernel again with the upstream gradient (sequence-level losses over ``[B]`` vectors, row
  losses whose ``[N, V]`` gradient should not be held between the passes).
  :func:`recompute_in_backward` applies it, or calls the kernel directly when no input needs a
  gradient.

A kernel is a Python closure over the call's options, so that each family writes only the
closure and never its own ``torch.autograd.Function``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence, Tuple

import torch

from ._ops import _is_real, first_order, upstream_is_one

__all__ = [
    "Scaling",
    "GradsInForward",
    "grads_in_forward",
    "RecomputeInBackward",
    "recompute_in_backward",
]


class Scaling(NamedTuple):
    """How :class:`GradsInForward` multiplies a saved gradient ``g`` by the upstream gradient
    ``go`` (shaped like the loss: a scalar, or one value per leading index of ``g``, which it is
    broadcast over).

    fp64: the product is computed in float64 and cast to ``go``'s dtype (the OT solvers' float64
        gradients); otherwise it is rounded once to ``g``'s dtype.
    keep: the gradients stay referenced by the graph, so that an upstream gradient of 1 returns
        the very tensors (autograd then copies them rather than adopting one as a leaf's .grad,
        and a second backward finds them unchanged). ``keep=False`` hands them over: autograd
        may adopt them without a copy (a weight-sized copy saved) and a second backward raises.
    inplace: the index of a gradient written into an input's own storage (``inplace_grad``): it
        is scaled in place, which a second backward cannot undo, so that one raises.
    fn: the public function, for the messages.
    """

    fp64: bool = False
    keep: bool = True
    inplace: Optional[int] = None
    fn: str = "divkit"


def _broadcast(go: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return go.reshape(tuple(go.shape) + (1,) * (g.dim() - go.dim()))


class GradsInForward(torch.autograd.Function):
    """``apply(run, scaling, *inputs)``: ``run(need) -> (outputs, grads)`` with ``need`` a tuple
    of bools (one per input: does it need a gradient?) and ``grads`` one tensor (or None, or a
    zero-argument callable that makes it when backward runs) per input. ``outputs`` is the loss
    or a tuple whose first entry is the loss (the others are not differentiable)."""

    @staticmethod
    def forward(ctx, run: Callable, scaling: Scaling, *inputs):
        outs, grads = run(tuple(bool(n) for n in ctx.needs_input_grad[2:]))
        ctx.grads = tuple(grads)
        from ._validate import outer_name  # here: the merge of the imports above stays clean

        # Messages raised in backward name the public function the user called.
        ctx.scaling = scaling._replace(fn=outer_name(scaling.fn))
        ctx.consumed = False
        if isinstance(outs, tuple):
            ctx.mark_non_differentiable(*outs[1:])
        return outs

    @staticmethod
    @first_order(lambda ctx: ctx.scaling.fn)
    def backward(ctx, grad_out, *_):
        sc: Scaling = ctx.scaling
        if ctx.grads is None:
            raise RuntimeError(
                f"{sc.fn}: backward was already run through this graph; the "
                f"gradients are computed once, in forward (recompute the loss)"
            )
        grads = ctx.grads
        if not sc.keep:
            ctx.grads = None
        is_one = upstream_is_one(grad_out)
        go64 = grad_out.to(torch.float64) if sc.fp64 else None
        out = []
        for i, g in enumerate(grads):
            if callable(g):
                g = g()
            if g is None:
                out.append(None)
            elif sc.fp64:
                out.append(
                    g.to(grad_out.dtype) if is_one else (g * _broadcast(go64, g)).to(grad_out.dtype)
                )
            elif is_one:
                out.append(g)
            elif i == sc.inplace:
                # The buffer is an input's storage, already overwritten: scaled in place so that
                # no [N, V] temporary is made. A second backward cannot undo that.
                if ctx.consumed:
                    raise RuntimeError(
                        f"{sc.fn}(inplace_grad=True): the gradient, kept in the student logits' "
                        f"storage, was already scaled by a previous backward; with "
                        f"inplace_grad=True and an upstream gradient other than 1, call backward "
                        f"once"
                    )
                ctx.consumed = True
                out.append(g.mul_(_broadcast(grad_out, g)))
            elif not sc.keep:
                out.append(g.mul_(grad_out.to(g.dtype)))
            else:
                # grad_out is fp32: the product is computed in fp32, rounded once to g's dtype.
                out.append(torch.mul(g, _broadcast(grad_out, g), out=torch.empty_like(g)))
        return (None, None, *out)


def grads_in_forward(run: Callable, inputs: Sequence[torch.Tensor], scaling: Scaling = Scaling()):
    """Applies :class:`GradsInForward` (see there for ``run``)."""
    return GradsInForward.apply(run, scaling, *inputs)


def _upstream_finite(fn: str, g: Optional[torch.Tensor]) -> None:
    """Raises when an upstream gradient holds inf or NaN. The recomputing backward takes it as
    per-token (per-pair) weights of the core's summed loss, whose checks would otherwise name
    ``weights`` or ``grad_losses``, arguments the caller never passed; autograd's own ops would
    pass the values on, which the core's weighted sums cannot do per entry."""
    if g is None or not _is_real(g) or (g.is_cuda and torch.cuda.is_current_stream_capturing()):
        return  # no values (fake or traced), or no host read allowed (a CUDA graph's capture)
    if bool(torch.isfinite(g).all()):
        return
    from ._validate import fail

    flat = g.detach().reshape(-1)
    i = int((~torch.isfinite(flat)).nonzero()[0, 0])
    fail(
        fn,
        f"the gradient flowing back into its output is {float(flat[i])} at index {i} "
        "(flattened): upstream gradients must be finite (an overflowing loss scale or a NaN in "
        "another term of the loss)",
    )


class RecomputeInBackward(torch.autograd.Function):
    """``apply(run, n_diff, *inputs)``: ``run(inputs, grad_out, need) -> (outputs, grads)``.

    Forward calls ``run(detached inputs, None, None)`` and keeps the inputs; the first
    ``n_diff`` outputs are differentiable, the others (rewards, statistics) are not. Backward
    calls ``run(detached inputs, grad_out, need)`` with ``grad_out`` the upstream gradient of the
    differentiable output (a tuple of them when ``n_diff > 1``) and ``need`` one bool per input;
    ``grads`` has one tensor or None per input."""

    @staticmethod
    def forward(ctx, run: Callable, n_diff: int, *inputs):
        outs, _ = run(tuple(x.detach() for x in inputs), None, None)
        ctx.run, ctx.n_diff = run, n_diff
        ctx.fn = getattr(run, "fn", "divkit")
        ctx.save_for_backward(*inputs)
        outs = tuple(outs)
        if len(outs) > n_diff:
            ctx.mark_non_differentiable(*outs[n_diff:])
        return outs

    @staticmethod
    @first_order(lambda ctx: ctx.fn)
    def backward(ctx, *grad_outs):
        need = tuple(bool(n) for n in ctx.needs_input_grad[2:])
        if not any(need):
            return (None, None) + (None,) * len(need)
        inputs = tuple(x.detach() for x in ctx.saved_tensors)
        for g in grad_outs[: ctx.n_diff]:
            _upstream_finite(ctx.fn, g)
        go = grad_outs[0] if ctx.n_diff == 1 else grad_outs[: ctx.n_diff]
        _, grads = ctx.run(inputs, go, need)
        return (None, None, *grads)


def recompute_in_backward(
    run: Callable, inputs: Sequence[torch.Tensor], n_diff: int = 1, *, fn: Optional[str] = None
) -> Tuple[torch.Tensor, ...]:
    """The outputs of ``run`` (see :class:`RecomputeInBackward`), through autograd when an input
    requires grad, else by one direct call. ``fn``: the public function, kept as ``run.fn`` for
    backward's messages (the double-backward error)."""
    from ._validate import outer_name

    run.fn = outer_name(fn or getattr(run, "fn", "divkit"))
    if torch.is_grad_enabled() and any(x.requires_grad for x in inputs):
        return RecomputeInBackward.apply(run, n_diff, *inputs)
    return tuple(run(tuple(x.detach() for x in inputs), None, None)[0])
