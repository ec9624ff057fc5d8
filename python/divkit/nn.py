"""``torch.nn`` modules over divkit's functional API."""

from __future__ import annotations

from typing import Any, Optional

import torch

from . import _C, _device
from . import _validate as check
from .functional import _parse_options, divergence
from .fused import fused_linear_cross_entropy, fused_linear_divergence

__all__ = ["DivergenceLoss", "FusedLinearDistillationLoss", "FusedLinearCrossEntropyLoss"]

# Options fixed at construction; labels, weights and num_items_in_batch are per call.
_OPTION_DEFAULTS = {
    "beta": 0.5,
    "alpha": 0.1,
    "temperature": 1.0,
    "ignore_index": -100,
    "reduction": "mean",
    "scale_by_t_squared": False,
    "inplace_grad": False,
    "grad_dtype": None,
    "backend": "auto",
}


def _merge_options(fn: str, options: dict, defaults: dict, note: str = "") -> dict:
    """The module's options: defaults updated by the given ones, every name known."""
    for name in options:
        if name not in defaults:
            check.fail_type(
                fn, f"unexpected option {name!r}; options are {', '.join(defaults)}{note}"
            )
    return dict(defaults, **options)


class DivergenceLoss(torch.nn.Module):
    r"""A token-level divergence between teacher and student logits as a loss module.

    ``DivergenceLoss(kind="forward_kl", **options)`` calls :func:`divkit.divergence` with the
    options given at construction (``beta``, ``alpha``, ``temperature``, ``ignore_index``,
    ``reduction``, ``scale_by_t_squared``, ``inplace_grad``, ``grad_dtype``, ``backend``); see
    its docstring for the formula of each kind and its direction: ``forward_kl`` is KL(p_teacher
    || q_student), ``reverse_kl`` is KL(q_student || p_teacher), ``jsd`` is TRL's generalized JSD
    with ``beta`` (0: forward KL, 1: reverse KL). The kind and its parameters are checked here,
    when the module is built.

    ``forward(student_logits, teacher_logits, labels=None, weights=None,
    num_items_in_batch=None)`` returns the float32 loss.

    Example::

        loss_fn = divkit.nn.DivergenceLoss("jsd", beta=0.5, temperature=2.0)
        loss = loss_fn(student_logits, teacher_logits, labels=labels)
    """

    @check.public("DivergenceLoss")
    def __init__(self, kind: str = "forward_kl", **options: Any) -> None:
        super().__init__()
        fn = "DivergenceLoss"
        merged = _merge_options(
            fn,
            options,
            _OPTION_DEFAULTS,
            " (labels, weights and num_items_in_batch are passed to forward)",
        )
        kind = check.string(fn, "kind", kind)
        cfg = _parse_options(
            fn,
            kind,
            merged["beta"],
            merged["alpha"],
            merged["temperature"],
            merged["ignore_index"],
            merged["reduction"],
            None,
            merged["scale_by_t_squared"],
            merged["inplace_grad"],
            merged["grad_dtype"],
            merged["backend"],
        )
        # The core checks the kind, its parameters and the reduction now, not at the first call.
        _C.validate_spec(
            cfg.kind, cfg.beta, cfg.alpha, cfg.temperature, cfg.scale_by_t_squared, fn=fn
        )
        check.reduction(fn, cfg.reduction)
        self.kind = kind
        self.options = {name: merged[name] for name in _OPTION_DEFAULTS}

    @check.public("DivergenceLoss")
    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        weights: Optional[torch.Tensor] = None,
        num_items_in_batch=None,
    ) -> torch.Tensor:
        return divergence(
            student_logits,
            teacher_logits,
            self.kind,
            labels=labels,
            weights=weights,
            num_items_in_batch=num_items_in_batch,
            **self.options,
        )

    def extra_repr(self) -> str:
        changed = ", ".join(
            f"{k}={v!r}" for k, v in self.options.items() if v != _OPTION_DEFAULTS[k]
        )
        return f"kind={self.kind!r}" + (f", {changed}" if changed else "")


_DISTILL_DEFAULTS = {
    "beta": 0.5,
    "alpha": 0.1,
    "temperature": 1.0,
    "scale_by_t_squared": False,
    "ignore_index": -100,
    "reduction": "mean",
    "hard_weight": 0.0,
    "soft_weight": 1.0,
    "chunk_size": None,
    "process_group": None,
    "backend": "auto",
}


class FusedLinearDistillationLoss(torch.nn.Module):
    r"""Distillation from hidden states through both linear heads, fused (never materializing
    the logits): ``hard_weight * CE(student, labels) + soft_weight * D_kind(p_teacher,
    q_student)``. See :func:`divkit.fused_linear_divergence` for the formulas, directions
    (``forward_kl`` = KL(p_teacher || q_student)) and dtypes.

    ``forward(student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None,
    student_bias=None, teacher_bias=None, weights=None, num_items_in_batch=None)``; the argument
    order follows Liger's ``LigerFusedLinearJSDLoss``, so ``FusedLinearDistillationLoss("jsd",
    hard_weight=0.5, soft_weight=0.5, reduction="mean")`` replaces it (Liger 0.8.5 masks the
    tokens whose label is ``ignore_index`` in both terms and divides by the number of the others,
    divkit's ``mean``; ``batchmean`` divides by all N tokens).

    Example::

        loss_fn = divkit.nn.FusedLinearDistillationLoss("reverse_kl", temperature=2.0)
        loss = loss_fn(student_h, student.lm_head.weight, teacher_h, teacher.lm_head.weight,
                       labels)
    """

    @check.public("FusedLinearDistillationLoss")
    def __init__(self, kind: str = "forward_kl", **options: Any) -> None:
        super().__init__()
        fn = "FusedLinearDistillationLoss"
        self.kind = check.string(fn, "kind", kind)
        self.options = _merge_options(fn, options, _DISTILL_DEFAULTS)
        o = self.options
        _device.backend(fn, o["backend"])
        _C.validate_spec(
            self.kind,
            check.real(fn, "beta", o["beta"]),
            check.real(fn, "alpha", o["alpha"]),
            check.real(fn, "temperature", o["temperature"]),
            check.boolean(fn, "scale_by_t_squared", o["scale_by_t_squared"]),
            fn=fn,
        )

    @check.public("FusedLinearDistillationLoss")
    def forward(
        self,
        student_hidden,
        student_weight,
        teacher_hidden,
        teacher_weight,
        labels=None,
        student_bias=None,
        teacher_bias=None,
        weights=None,
        num_items_in_batch=None,
    ) -> torch.Tensor:
        return fused_linear_divergence(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            self.kind,
            student_bias=student_bias,
            teacher_bias=teacher_bias,
            labels=labels,
            weights=weights,
            num_items_in_batch=num_items_in_batch,
            **self.options,
        )

    def extra_repr(self) -> str:
        changed = ", ".join(
            f"{k}={v!r}" for k, v in self.options.items() if v != _DISTILL_DEFAULTS[k]
        )
        return f"kind={self.kind!r}" + (f", {changed}" if changed else "")


_CE_DEFAULTS = {
    "ignore_index": -100,
    "label_smoothing": 0.0,
    "lse_square_scale": 0.0,
    "softcap": None,
    "reduction": "mean",
    "chunk_size": None,
    "process_group": None,
    "backend": "auto",
}


class FusedLinearCrossEntropyLoss(torch.nn.Module):
    r"""Cross-entropy of ``hidden @ weight.T + bias`` against labels, fused (see
    :func:`divkit.fused_linear_cross_entropy`): label smoothing, z-loss (``lse_square_scale``),
    logit soft-capping, reductions, as Liger's ``LigerFusedLinearCrossEntropyLoss``.

    ``forward(weight, hidden, labels, bias=None, num_items_in_batch=None)``: Liger's argument
    order (weight first), so the module swaps in for Liger's.

    Example::

        loss_fn = divkit.nn.FusedLinearCrossEntropyLoss(label_smoothing=0.1)
        loss = loss_fn(model.lm_head.weight, hidden_states, labels)
    """

    @check.public("FusedLinearCrossEntropyLoss")
    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.options = _merge_options("FusedLinearCrossEntropyLoss", options, _CE_DEFAULTS)
        _device.backend("FusedLinearCrossEntropyLoss", self.options["backend"])

    @check.public("FusedLinearCrossEntropyLoss")
    def forward(self, weight, hidden, labels, bias=None, num_items_in_batch=None):
        return fused_linear_cross_entropy(
            hidden, weight, labels, bias, num_items_in_batch=num_items_in_batch, **self.options
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items() if v != _CE_DEFAULTS[k])
