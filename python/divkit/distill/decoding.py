"""Decoding: USCD, uncertainty-aware selective contrastive decoding (inference only)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import _C, _ops
from .. import _validate as check
from ..functional import _rows
from . import _common as common

__all__ = [
    "uscd_logits",
    "USCDLogitsProcessor",
    "USCDResult",
]


# ---------------------------------------------------------------------------------------------
# USCD.
# ---------------------------------------------------------------------------------------------


class USCDResult(NamedTuple):
    logits: torch.Tensor  # [..., V] the scores to sample from (log-probabilities)
    uncertainty: torch.Tensor  # [...] std of the standard prompt's probabilities (small: flat)
    applied: torch.Tensor  # [...] bool: where the contrast was applied


@check.public("uscd_logits")
def uscd_logits(
    standard_logits: torch.Tensor,
    lame_logits: torch.Tensor,
    *,
    lame_weight: float = 0.7,
    std_threshold: float = 0.005,
    filter_ratio: float = 2.0 / 3.0,
) -> USCDResult:
    r"""USCD: one selective contrastive decoding step (inference only, no gradient).

    Wang et al., "USCD: Improving Code Generation of LLMs by Uncertainty-Aware Selective
    Contrastive Decoding" (2024). ``standard_logits`` come from the standard few-shot prompt,
    ``lame_logits`` from the lame prompt (the examples removed), both ``[..., V]`` for the same
    position. Verified against the official code (alphadl/CodeGen-USCD,
    ``bigcode_eval/contrast.py``, ``EnsembleLogitsProcessor``; defaults from its run script
    ``model_slrum/codellama_7b_weight_10_-07_pass@1_1.sh``: source weights 1.0 and -0.7,
    ``mean_num`` 0.005, ``filter_num`` 0.666667). With p = softmax(standard), p_l =
    softmax(lame) and u = std(p) (sample standard deviation over the V entries, as torch.std;
    a flat, uncertain distribution has a small u)::

        u >  std_threshold:  logits = log p                                   (no contrast)
        u <= std_threshold:  logits_j = log(p_j - lame_weight p_l_j)   if p_j >= filter_ratio mean(p)
                                                                           and the difference > 0
                             -inf                                       otherwise

    The contrast is in probability space, as the official processor takes the log of the
    weighted sum of the two probability rows (a negative difference gives NaN there, replaced
    by -inf). A row can be all -inf when the lame prompt outweighs every kept token, as in the
    official code. One C++ pass per row (``selective_contrast``). Returns
    :class:`USCDResult` (logits float32, or float64 for float64 inputs).
    """
    fn = "uscd_logits"
    s, lead, n, v = common.flat(fn, "standard_logits", standard_logits)
    l = check.logits(fn, "lame_logits", lame_logits)
    check.same_shape(fn, "lame_logits", l, standard_logits, "standard_logits")
    l = _rows(l.detach(), n, v)
    lame_weight = check.real(fn, "lame_weight", lame_weight, allow_nan=False)
    std_threshold = check.real(fn, "std_threshold", std_threshold, allow_nan=False)
    filter_ratio = check.real(fn, "filter_ratio", filter_ratio, allow_nan=False)
    if _ops.use_ops(s, l, fn=fn):
        out, unc, applied = _ops.selective_contrast_op(
            s.detach(), l, lame_weight, std_threshold, filter_ratio
        )
    else:
        dt = common.out_dtype(s, l)
        out = torch.empty(n, v, dtype=dt)
        unc = torch.empty(n, dtype=dt)
        applied = torch.empty(n, dtype=torch.int32)
        _C.selective_contrast(
            s.detach(), l, lame_weight, std_threshold, filter_ratio, out, unc, applied
        )
    return USCDResult(
        out.reshape(standard_logits.shape), unc.reshape(lead), applied.bool().reshape(lead)
    )


class USCDLogitsProcessor:
    """Stateless USCD step for a generation loop: ``processor(standard_logits, lame_logits)``
    returns the scores to sample from (see :func:`uscd_logits`). Run the model on both prompts
    each step and feed the chosen token to both."""

    @check.public("USCDLogitsProcessor")
    def __init__(
        self,
        lame_weight: float = 0.7,
        std_threshold: float = 0.005,
        filter_ratio: float = 2.0 / 3.0,
    ):
        self.lame_weight, self.std_threshold, self.filter_ratio = (
            lame_weight,
            std_threshold,
            filter_ratio,
        )
        # Validate once, on a dummy row, so that a bad setting fails at construction.
        uscd_logits(
            torch.zeros(1, 2),
            torch.zeros(1, 2),
            lame_weight=lame_weight,
            std_threshold=std_threshold,
            filter_ratio=filter_ratio,
        )

    @check.public("USCDLogitsProcessor")
    def __call__(self, standard_logits: torch.Tensor, lame_logits: torch.Tensor) -> torch.Tensor:
        return uscd_logits(
            standard_logits,
            lame_logits,
            lame_weight=self.lame_weight,
            std_threshold=self.std_threshold,
            filter_ratio=self.filter_ratio,
        ).logits
