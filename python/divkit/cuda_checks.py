"""Deferred input checks of divkit's CUDA kernels, for CUDA graph capture.

By default a divkit call on CUDA tensors ends with one host read of the kernels' input-check
flags (one stream synchronization) and raises :class:`divkit.Error` for NaN/+inf logits, rows
without mass, invalid top-k teachers or non-finite weights. Inside :func:`deferred_checks` the
calls that run divkit's CUDA kernels (``divergence``, ``sparse_divergence``, ``topk_divergence``
and the ops built on them) skip that read: nothing waits for the GPU, so the calls can be
captured in a CUDA graph, and a call whose inputs would have raised returns a NaN loss (every
element for ``reduction="none"``) with gradients that mean nothing; check
``torch.isfinite(loss)`` on the device when convenient.

CPU calls always check and raise. One thing changes there: an in-place call
(``inplace_grad=True``) normally reads every row of both logits for NaN/+inf before it writes a
gradient row, so that an error leaves ``student_logits`` untouched; inside
:func:`deferred_checks` it checks each row as it reads it, which saves that extra read of both
inputs (20 bytes moved per logit instead of 12): a bad row still raises, but the other rows of
``student_logits`` may already hold their gradient.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

__all__ = ["check_finite", "deferred_checks"]

_CHECK_FINITE = contextvars.ContextVar("divkit_cuda_check_finite", default=True)


@contextlib.contextmanager
def deferred_checks() -> Iterator[None]:
    """Within the block, divkit's CUDA kernels report bad inputs through a NaN loss instead of
    raising (no host synchronization inside the calls), and in-place CPU calls check each row as
    they read it rather than all rows first; see the module docstring."""
    token = _CHECK_FINITE.set(False)
    try:
        yield
    finally:
        _CHECK_FINITE.reset(token)


def check_finite() -> bool:
    """False inside :func:`deferred_checks`."""
    return _CHECK_FINITE.get()
