"""Argument handling and reductions shared by the distillation modules."""

from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import torch

from .. import _ops
from .. import _validate as check
from ..functional import _rows


def flat(fn: str, name: str, x: Any) -> Tuple[torch.Tensor, torch.Size, int, int]:
    """Logits [..., V] checked and viewed as rows [N, V]: (rows, lead shape, N, V)."""
    x = check.logits(fn, name, x)
    lead = x.shape[:-1]
    v = x.shape[-1]
    n = math.prod(lead)
    return _rows(x, n, v), lead, n, v


def labels(fn: str, x: Any, lead: torch.Size, n: int, required: bool) -> Optional[torch.Tensor]:
    """Labels [...] as a flat int64 tensor [N] (None passes unless required)."""
    x = check.labels(fn, x, lead, required=required)
    return None if x is None else x.reshape(n).to(torch.int64)


def row_values(fn: str, name: str, x: Any, lead: torch.Size, n: int) -> torch.Tensor:
    """A floating tensor with one value per row, shape [...], viewed as [N]."""
    x = check.floating(fn, name, check.per_token(fn, name, x, lead))
    return x.reshape(n)


def fixed_teacher(fn: str, teacher: Any, student: torch.Tensor, n: int, v: int) -> torch.Tensor:
    """Teacher logits of the student's shape that must not require grad, as rows [N, V]."""
    t = check.logits(fn, "teacher_logits", teacher)
    check.same_shape(fn, "teacher_logits", t, student, "student_logits")
    check.no_grad(fn, "teacher_logits", t, "this loss treats the teacher as fixed")
    return _rows(t.detach(), n, v)


def out_dtype(*xs: torch.Tensor) -> torch.dtype:
    """float64 when an input is float64, else float32 (the kernels' per-row outputs)."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def valid(labels: Optional[torch.Tensor], ignore_index: int, n: int) -> torch.Tensor:
    """The rows that are not ignored."""
    return torch.ones(n, dtype=torch.bool) if labels is None else labels != ignore_index


def reduce(per_row: torch.Tensor, valid: torch.Tensor, lead: torch.Size, reduction: str):
    """none: [...]; sum; mean: over the non-ignored rows; batchmean: over all N rows. Over zero
    rows (all ignored, or N = 0) mean and batchmean are 0, as the core's reduction."""
    if reduction == "none":
        return per_row.reshape(lead)
    total = per_row.sum()
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        return total / max(per_row.numel(), 1)
    if _ops.compiling():  # no host sync (a graph break) while tracing; the same value
        return total / valid.sum().clamp(min=1)
    return total / max(int(valid.sum()), 1)


def reduce_samples(per: torch.Tensor, reduction: str):
    """The reduction of a per-sample loss [N] without ignored samples (mean = batchmean); the
    mean of zero samples is 0 (the core's rule), not NaN."""
    if reduction == "none":
        return per
    return per.sum() if reduction == "sum" else per.sum() / max(per.numel(), 1)
