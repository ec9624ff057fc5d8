"""Helpers shared by the preference modules: host copies for the core's sequence kernels."""

from __future__ import annotations

from typing import Sequence

import torch


def compute_dtype(*xs: torch.Tensor) -> torch.dtype:
    """float64 when an input is float64, else float32."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def host(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A detached contiguous CPU copy (or view) of x in dtype, as the core reads it."""
    return x.detach().to(device="cpu", dtype=dtype).contiguous()


def grad_bufs(inputs: Sequence[torch.Tensor], need, dtype: torch.dtype, count: int):
    """Gradient buffers [B] for the first ``count`` inputs that need one (None otherwise)."""
    if need is None:
        return [None] * count
    return [
        torch.empty(x.shape[0], dtype=dtype) if (i < len(need) and need[i]) else None
        for i, x in enumerate(inputs[:count])
    ]


def back(bufs, inputs):
    """The gradients on the inputs' devices and in their dtypes."""
    return tuple(
        None if g is None else g.to(device=x.device, dtype=x.dtype) for g, x in zip(bufs, inputs)
    )


def label_logps(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[labels] per token, 0 where mask is False (fp32 at least)."""
    x = logits if logits.dtype == torch.float64 else logits.float()
    idx = labels.masked_fill(~mask, 0).unsqueeze(-1)
    lp = torch.log_softmax(x, -1).gather(-1, idx).squeeze(-1)
    return lp * mask
