"""Feature-level distillation: ND loss (feature norm and direction toward the teacher's class
means)."""

from __future__ import annotations

import math

import torch

from .. import _ops
from .. import _validate as check
from . import _common as common

__all__ = [
    "teacher_class_means",
    "nd_loss",
]


# ---------------------------------------------------------------------------------------------
# ND loss.
# ---------------------------------------------------------------------------------------------


@check.public("teacher_class_means", finite_args=("features",))
def teacher_class_means(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """Class means of (teacher) features ``[N, D]`` with labels ``[N]``: ``[num_classes, D]``
    (zero for a class with no sample). Computed once over the training set for ND loss. No
    gradient (the teacher's features are constants). Traced (``torch.compile``,
    ``torch.vmap``), the custom op ``divkit::teacher_class_means``, which checks the labels and
    values when the graph runs."""
    fn = "teacher_class_means"
    if not isinstance(features, torch.Tensor) or features.dim() != 2:
        check.fail(fn, "features must be a 2-D tensor [N, D]")
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != (features.shape[0],):
        check.fail(fn, f"labels must be a tensor of shape [{features.shape[0]}]")
    num_classes = check.integer(fn, "num_classes", num_classes, min=0)
    if labels.is_floating_point():
        check.fail_type(fn, f"labels must have an integer dtype, got {labels.dtype}")
    if _ops.use_ops(features, labels, fn=fn):
        return _ops.teacher_class_means_op(features.detach(), labels, num_classes)
    if bool(((labels < 0) | (labels >= num_classes)).any()):
        check.fail(fn, f"labels out of range [0, {num_classes})")
    return _class_means(features, labels, num_classes)


def _class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int):
    """teacher_class_means for checked arguments (also the op's implementation)."""
    f = features.detach()
    sums = torch.zeros(num_classes, f.shape[1], dtype=f.dtype, device=f.device)
    sums = sums.index_add_(0, labels, f)
    counts = torch.bincount(labels, minlength=num_classes).to(f.dtype).clamp_min(1)
    return sums / counts[:, None]


@check.public("nd_loss", finite_args=("student_features", "teacher_features", "class_means"))
def nd_loss(
    student_features: torch.Tensor,
    teacher_features: torch.Tensor,
    labels: torch.Tensor,
    class_means: torch.Tensor,
    *,
    reduction: str = "mean",
):
    r"""ND loss: student feature norm and direction toward the teacher's class means.

    Wang et al., "Improving Knowledge Distillation via Regularizing Feature Norm and Direction".
    Verified against the official ``DirectNormLoss`` (WangYZ1608/Knowledge-Distillation-via-ND,
    ``CIFAR/utils.py``, ``project_center``). With e_y = mu_y / ||mu_y|| the unit direction of
    the teacher's class mean of the label (the official ``center_emb_train.json`` holds the
    teacher's per-class mean embeddings on the training set: :func:`teacher_class_means`)::

        loss_i = 1 - <f_s, e_y> / max(||f_s||, ||f_t||)

    ``mean`` is the official sum over the batch / N (its ``nd_loss_factor`` is the caller's
    weight). The projection rewards both alignment with e_y and a large student norm (up to the
    larger of the two norms); as in the official code the gradient also flows through ||f_s||
    when it is the larger norm. Per-sample arithmetic in torch, differentiable in the student
    features (teacher features and class means are fixed).
    """
    fn = "nd_loss"
    reduction = check.reduction(fn, reduction)
    for name, x in (
        ("student_features", student_features),
        ("teacher_features", teacher_features),
        ("class_means", class_means),
    ):
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
            check.fail(fn, f"{name} must be a 2-D floating tensor")
    if teacher_features.shape != student_features.shape:
        check.fail(
            fn,
            f"teacher_features has shape {tuple(teacher_features.shape)}, expected "
            f"{tuple(student_features.shape)} (project the student features to the "
            f"teacher's dimension first)",
        )
    if class_means.shape[1] != student_features.shape[1]:
        check.fail(
            fn,
            f"class_means has dimension {class_means.shape[1]}, expected "
            f"{student_features.shape[1]}",
        )
    n = student_features.shape[0]
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != (n,):
        check.fail(fn, f"labels must be a tensor of shape [{n}]")
    traced = _ops.ENABLED and _ops.compiling()  # then the checks run in ops, in the graph
    if traced:
        labels = _ops.checked_labels_op(labels, class_means.shape[0], None, fn)
    elif bool(((labels < 0) | (labels >= class_means.shape[0])).any()):
        check.fail(fn, f"labels out of range [0, {class_means.shape[0]})")
    mu = class_means.detach()[labels]
    mu_norm = mu.norm(dim=1)
    zero = "class_means has a zero vector for a label in the batch"
    if traced:
        mu_norm = _ops.checked_range_op(mu_norm, 0.0, math.inf, fn, zero, True)
    elif bool((mu_norm == 0).any()):
        check.fail(fn, zero)
    e = mu / mu_norm[:, None]
    fs = student_features
    max_norm = torch.maximum(fs.norm(dim=1), teacher_features.detach().norm(dim=1)).clamp_min(1e-12)
    per = 1 - (fs * e.to(fs.dtype)).sum(1) / max_norm
    return common.reduce_samples(per, reduction)
