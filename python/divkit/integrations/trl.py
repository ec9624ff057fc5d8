"""TRL: trainers whose loss is divkit's, selected by subclassing the stock trainer.

* :class:`DivkitGKDTrainer`: TRL's ``GKDTrainer`` (``trl.experimental.gkd``) with the
  distillation loss computed by :func:`divkit.fused_linear_divergence` from the student's and the
  teacher's last hidden states and lm_head weights, in chunks of tokens: neither model's
  ``[tokens x V]`` logits are built. ``divkit_kind`` picks any of :data:`divkit.KINDS`
  (default ``"jsd"`` with TRL's ``beta``: m = beta p + (1 - beta) q, beta = 0 forward KL
  KL(p_teacher || q_student), beta = 1 reverse KL), ``divkit_temperature`` the softmax
  temperature of both sides. The reduction is TRL's: the sum over the completion tokens
  (``labels != -100``, shifted as TRL shifts them) divided by ``num_items_in_batch`` when the
  trainer passes it, else by their number.

Differences from TRL 1.16, on purpose: TRL's ``GKDTrainer.compute_loss`` calls
``generalized_jsd_loss`` without its ``temperature`` (the config's ``temperature`` only affects
generation); here ``divkit_temperature`` (default 1.0, TRL's effective value) is applied to the
loss. The evaluation loss (``return_outputs=True``, the prediction step) is TRL's own.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _validate as check
from ..fused import fused_linear_divergence

__all__ = ["DivkitGKDTrainer", "last_hidden_and_head"]


def last_hidden_and_head(model, input_ids, attention_mask):
    """The decoder's last hidden states ``[B, T, H]`` and the lm_head (an nn.Linear) of a
    transformers causal LM, without computing logits."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    hidden = decoder(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False
    ).last_hidden_state
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        check.fail("DivkitGKDTrainer", f"{type(model).__name__}'s lm_head is not an nn.Linear")
    return hidden, head


def _gkd_base():
    from trl.experimental.gkd import GKDTrainer

    return GKDTrainer


class DivkitGKDTrainer(_gkd_base()):
    """``trl.experimental.gkd.GKDTrainer`` with divkit's fused distillation loss (see the module
    docstring). Extra keyword arguments: ``divkit_kind`` (default ``"jsd"``),
    ``divkit_temperature`` (default 1.0), ``divkit_options`` (a dict of further
    :func:`divkit.fused_linear_divergence` keywords: ``alpha``, ``hard_weight``, ``chunk_size``,
    ``scale_by_t_squared``, ...)."""

    def __init__(
        self,
        *args,
        divkit_kind: str = "jsd",
        divkit_temperature: float = 1.0,
        divkit_options: Optional[dict] = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        fn = "DivkitGKDTrainer"
        self.divkit_kind = check.string(fn, "divkit_kind", divkit_kind)
        self.divkit_temperature = check.positive(fn, "divkit_temperature", divkit_temperature)
        self.divkit_options = dict(divkit_options or {})

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            return super().compute_loss(model, inputs, True, num_items_in_batch)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        student_hidden, student_head = last_hidden_and_head(model, ids, mask)
        self.teacher_model.eval()
        with torch.no_grad():
            teacher_hidden, teacher_head = last_hidden_and_head(self.teacher_model, ids, mask)
        # Position i predicts token i + 1: labels shifted left, the last position ignored (the
        # hidden states stay whole, so no strided copy is made).
        labels = torch.nn.functional.pad(inputs["labels"], (0, 1), value=-100)[:, 1:]
        return fused_linear_divergence(
            student_hidden,
            student_head.weight,
            teacher_hidden,
            teacher_head.weight.detach(),
            self.divkit_kind,
            student_bias=student_head.bias,
            teacher_bias=None if teacher_head.bias is None else teacher_head.bias.detach(),
            labels=labels,
            beta=self.beta,
            temperature=self.divkit_temperature,
            reduction="mean",
            num_items_in_batch=num_items_in_batch,
            **self.divkit_options,
        )
