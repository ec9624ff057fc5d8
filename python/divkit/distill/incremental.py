"""Class-incremental learning: Weight Aligning of the classifier's new-class rows."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from .. import _ops
from .. import _validate as check

__all__ = [
    "weight_aligning",
    "weight_align_",
]


# ---------------------------------------------------------------------------------------------
# Weight Aligning.
# ---------------------------------------------------------------------------------------------


@check.public("weight_aligning", finite_args=("weight", "bias"))
def weight_aligning(
    weight: torch.Tensor,
    num_old: int,
    bias: Optional[torch.Tensor] = None,
    *,
    as_tensor: bool = False,
):
    r"""Weight Aligning for class-incremental learning.

    Zhao et al., "Maintaining Discrimination and Fairness in Class Incremental Learning" (CVPR
    2020). The classifier rows of the new classes are rescaled so that their
    mean norm equals that of the old classes::

        gamma = mean_{i < num_old} ||W_i|| / mean_{i >= num_old} ||W_i||,   W_new <- gamma W_new

    Returns ``(aligned_weight, gamma)`` (and the aligned bias when ``bias`` is given: the new
    classes' biases are scaled by the same gamma so their logits scale together; the paper's
    FC layer has no bias). Does not modify its inputs; see :func:`weight_align_`. No gradient
    (the results are detached copies). gamma is a float; with ``as_tensor=True``, and always
    when traced (``torch.compile``, ``torch.vmap``: a Python float would end the graph), a 0-d
    float64 tensor of the same value on the weight's device. Traced, the custom op
    ``divkit::weight_aligning`` computes it and checks the values when the graph runs.
    """
    fn = "weight_aligning"
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        check.fail(fn, "weight must be a 2-D floating tensor [C, D]")
    c = weight.shape[0]
    if isinstance(num_old, bool) or not isinstance(num_old, int) or not 0 < num_old < c:
        check.fail(fn, f"num_old must be an int in [1, {c - 1}] (C = {c}), got {num_old!r}")
    as_tensor = check.boolean(fn, "as_tensor", as_tensor)
    via_op = _ops.use_ops(weight, bias, fn=fn)
    if (
        via_op
        and bias is not None
        and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (c,))
    ):
        check.fail(fn, f"bias must be a tensor of shape [{c}]")
    if via_op:
        # The bias's shape is checked before the op (whose fake kernel trusts it).
        b = None if bias is None else bias.detach()
        w, b, gamma = _ops.weight_aligning_op(weight.detach(), b, num_old)
        # DIVKIT_CUSTOM_OPS=always on plain tensors: the eager result type.
        if not (as_tensor or _ops.traced(weight, bias)):
            gamma = float(gamma)
        return (w, gamma) if bias is None else (w, b, gamma)
    w, b, gamma = _align(weight, num_old, bias)
    gamma = gamma if as_tensor else float(gamma)
    return (w, gamma) if bias is None else (w, b, gamma)


def _align(weight: torch.Tensor, num_old: int, bias: Optional[torch.Tensor]):
    """(aligned weight, aligned bias or None, gamma as a 0-d float64 tensor on the weight's
    device) for a checked weight (also the op's implementation)."""
    fn = "weight_aligning"
    c = weight.shape[0]
    with torch.no_grad():
        norms = weight.detach().double().norm(dim=1)
        new_mean = norms[num_old:].mean()
        if float(new_mean) == 0:
            check.fail(fn, "the new classes' weights are all zero")
        gamma_t = norms[:num_old].mean() / new_mean
        gamma = float(gamma_t)
        w = weight.detach().clone()
        w[num_old:] *= gamma
        if bias is None:
            return w, None, gamma_t
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (c,):
            check.fail(fn, f"bias must be a tensor of shape [{c}]")
        b = bias.detach().clone()
        b[num_old:] *= gamma
        return w, b, gamma_t


@check.public("weight_align_")
def weight_align_(
    linear: nn.Linear, num_old: int, *, as_tensor: bool = False
) -> Union[float, torch.Tensor]:
    """In-place Weight Aligning of an ``nn.Linear`` classifier (see :func:`weight_aligning`);
    returns gamma (a float; a 0-d float64 tensor with ``as_tensor=True`` or when traced)."""
    if not isinstance(linear, nn.Linear):
        check.fail_type(
            "weight_align_", f"linear must be a torch.nn.Linear, got {check.type_name(linear)}"
        )
    res = weight_aligning(linear.weight, num_old, linear.bias, as_tensor=as_tensor)
    with torch.no_grad():
        linear.weight.copy_(res[0])
        if linear.bias is not None:
            linear.bias.copy_(res[1])
    return res[-1]
