"""Hugging Face transformers: divkit's fused cross-entropy in a causal LM's forward and in
``Trainer``.

Two entry points, both computing ``CE(hidden @ lm_head.weight.T, shifted labels)`` with
:func:`divkit.fused_linear_cross_entropy` in chunks of tokens (fp32 GEMMs and row sums), so that
the ``[tokens x V]`` logits are never built during training:

* :func:`apply_divkit_kernel` (and ``apply_divkit_kernel_to_llama`` & co.): patches a model (an
  instance, found by its class) so that ``model(input_ids, labels=...)`` returns that loss, as
  Liger-Kernel's ``apply_liger_kernel_to_*`` does. The patched forward runs the model's own
  forward with ``labels=None`` and ``logits_to_keep=1`` (the logits of the last position only,
  then dropped: ``outputs.logits`` is None in training), and takes the last hidden states from
  the decoder's output. Without labels, or in eval mode with ``keep_logits_in_eval``, it is the
  stock forward.
* :class:`FusedCrossEntropyLoss`: a ``compute_loss_func`` for ``transformers.Trainer``: the same
  loss from the hidden states of the model's forward (captured from the decoder), with
  ``num_items_in_batch``.
* :class:`FusedDistillationLoss`: a ``compute_loss_func`` for knowledge distillation from a
  teacher model: :func:`divkit.fused_linear_divergence` from both models' last hidden states
  and lm_heads, with ``num_items_in_batch``; neither model's logits are built.

The loss is Hugging Face's ``ForCausalLMLoss``: labels shifted left by one (the last position
ignored), tokens with ``ignore_index`` (-100) excluded, ``mean`` over the non-ignored tokens, or
the sum divided by ``num_items_in_batch`` when the trainer passes it (gradient accumulation);
Gemma 2/3's ``final_logit_softcapping`` applied (``softcap``). Arithmetic in fp32 whatever the
model's dtype (Hugging Face upcasts the logits to fp32 too).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Dict, Optional

import torch

from .. import _validate as check
from ..fused import fused_linear_cross_entropy, fused_linear_divergence

__all__ = [
    "SUPPORTED_MODELS",
    "apply_divkit_kernel",
    "revert_divkit_kernel",
    "apply_divkit_kernel_to_llama",
    "apply_divkit_kernel_to_qwen2",
    "apply_divkit_kernel_to_mistral",
    "apply_divkit_kernel_to_gemma",
    "apply_divkit_kernel_to_phi3",
    "causal_lm_loss",
    "FusedCrossEntropyLoss",
    "FusedDistillationLoss",
]

#: Causal-LM classes whose forward is ``decoder -> last_hidden_state -> lm_head`` (+ Gemma's
#: final softcap): the classes the patch is tested with. Others raise unless ``force=True``.
SUPPORTED_MODELS = frozenset(
    {
        "LlamaForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "MistralForCausalLM",
        "GemmaForCausalLM",
        "Gemma2ForCausalLM",
        "Phi3ForCausalLM",
    }
)

_FN = "apply_divkit_kernel"
_LOSS_KWARGS = ("num_items_in_batch", "shift_labels", "ignore_index")


def _softcap(model) -> Optional[float]:
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    cap = getattr(text, "final_logit_softcapping", None)
    return float(cap) if cap else None


def _decoder(model):
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if not isinstance(base, torch.nn.Module):
        check.fail(_FN, f"{type(model).__name__} has no decoder module (base_model_prefix)")
    return base


def _lm_head(model) -> torch.nn.Linear:
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        check.fail(_FN, f"{type(model).__name__}'s output embeddings are not an nn.Linear")
    return head


def causal_lm_loss(
    model,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_items_in_batch=None,
    shift_labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Hugging Face's causal-LM loss from the last hidden states ``[B, T, H]`` and ``labels [B,
    T]`` (shifted here unless ``shift_labels`` is given), fused with ``model``'s lm_head."""
    if shift_labels is None:
        labels = labels.to(hidden.device)
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    head = _lm_head(model)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(hidden.device)
    return fused_linear_cross_entropy(
        hidden,
        head.weight,
        shift_labels.to(hidden.device),
        head.bias,
        ignore_index=ignore_index,
        softcap=_softcap(model),
        num_items_in_batch=num_items_in_batch,
    )


class _HiddenCapture:
    """A forward hook on the decoder that keeps its last hidden states (the lm_head's input)."""

    def __init__(self, model):
        self.hidden: Optional[torch.Tensor] = None
        self.handle = _decoder(model).register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        hidden = getattr(output, "last_hidden_state", None)
        self.hidden = output[0] if hidden is None else hidden

    def take(self) -> torch.Tensor:
        hidden, self.hidden = self.hidden, None
        if hidden is None:
            check.fail("divkit.integrations.hf", "the decoder's hidden states were not seen")
        return hidden

    def remove(self) -> None:
        self.handle.remove()


def _fused_forward(model, orig: Callable, keep_logits_in_eval: bool) -> Callable:
    """The patched forward of ``model`` (``orig`` its bound forward; the signature is
    ``orig``'s, which Trainer reads to keep dataset columns)."""
    sig = inspect.signature(orig)
    has_keep = "logits_to_keep" in sig.parameters

    @functools.wraps(orig)
    def forward(*args, **kwargs):
        bound = sig.bind_partial(*args, **kwargs)
        labels = bound.arguments.get("labels")
        if labels is None or (keep_logits_in_eval and not model.training):
            return orig(*args, **kwargs)
        call = dict(bound.arguments)
        extra = dict(call.pop("kwargs", {}))
        loss_kwargs = {k: extra.pop(k) for k in _LOSS_KWARGS if k in extra}
        call["labels"] = None
        if has_keep:
            call["logits_to_keep"] = 1
        outputs = orig(**call, **extra)
        loss = causal_lm_loss(model, model._divkit_capture.take(), labels, **loss_kwargs)
        if not has_keep:
            outputs["loss"] = loss
            return outputs
        fields = {k: v for k, v in outputs.items() if k not in ("loss", "logits")}
        return type(outputs)(loss=loss, **fields)

    return forward


def apply_divkit_kernel(model, *, keep_logits_in_eval: bool = False, force: bool = False):
    """Patches ``model`` (a transformers causal LM instance) so that its forward with ``labels``
    returns divkit's fused cross-entropy (Hugging Face's loss, see the module docstring) and no
    logits (``outputs.logits`` is None). ``keep_logits_in_eval``: in eval mode the stock forward
    runs (full logits, e.g. for metrics). Raises :class:`divkit.Error` for a class outside
    :data:`SUPPORTED_MODELS` unless ``force`` (a decoder -> lm_head model without logit scaling).
    Returns the model; :func:`revert_divkit_kernel` undoes it."""
    name = type(model).__name__
    if name not in SUPPORTED_MODELS and not force:
        check.fail(
            _FN,
            f"{name} is not one of the tested classes ({', '.join(sorted(SUPPORTED_MODELS))}); "
            f"pass force=True if its forward is decoder -> last_hidden_state -> lm_head",
        )
    _lm_head(model)
    if getattr(model, "_divkit_capture", None) is not None:
        return model
    model._divkit_capture = _HiddenCapture(model)
    bound_orig = model.forward
    model._divkit_orig_forward = bound_orig
    model.forward = _fused_forward(model, bound_orig, keep_logits_in_eval)
    return model


def revert_divkit_kernel(model):
    """Undoes :func:`apply_divkit_kernel`."""
    capture = getattr(model, "_divkit_capture", None)
    if capture is not None:
        capture.remove()
        del model.forward, model._divkit_capture, model._divkit_orig_forward
    return model


def _for(class_name: str):
    def apply(model, **kwargs):
        if type(model).__name__ != class_name:
            check.fail(_FN, f"expected a {class_name}, got {type(model).__name__}")
        return apply_divkit_kernel(model, **kwargs)

    apply.__name__ = f"apply_divkit_kernel_to_{class_name.replace('ForCausalLM', '').lower()}"
    apply.__doc__ = f":func:`apply_divkit_kernel` for a ``{class_name}`` (checked)."
    return apply


apply_divkit_kernel_to_llama = _for("LlamaForCausalLM")
apply_divkit_kernel_to_qwen2 = _for("Qwen2ForCausalLM")
apply_divkit_kernel_to_mistral = _for("MistralForCausalLM")
apply_divkit_kernel_to_gemma = _for("GemmaForCausalLM")
apply_divkit_kernel_to_phi3 = _for("Phi3ForCausalLM")


class FusedCrossEntropyLoss:
    """A ``compute_loss_func`` for ``transformers.Trainer``: Hugging Face's causal-LM loss
    computed by divkit's fused cross-entropy from the decoder's last hidden states (captured by
    a forward hook on ``model``'s decoder), with the trainer's ``num_items_in_batch``.

    In training, the model's forward is asked for the logits of the last position only
    (``logits_to_keep=1``, through a forward pre-hook), so the ``[tokens x V]`` logits are never
    built; in eval mode the forward is the stock one (metrics see full logits)::

        trainer = Trainer(model=model, args=args, train_dataset=ds,
                          compute_loss_func=FusedCrossEntropyLoss(model))
    """

    def __init__(self, model, *, ignore_index: int = -100):
        _lm_head(model)
        self.model = model
        self.ignore_index = check.integer("FusedCrossEntropyLoss", "ignore_index", ignore_index)
        self._capture = _HiddenCapture(model)
        accepts = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._pre = (
            model.register_forward_pre_hook(self._pre_hook, with_kwargs=True) if accepts else None
        )

    def _pre_hook(self, module, args, kwargs: Dict[str, Any]):
        if module.training:
            return args, {**kwargs, "logits_to_keep": 1}
        return None

    def __call__(self, outputs, labels, num_items_in_batch=None):
        return causal_lm_loss(
            self.model,
            self._capture.take(),
            labels,
            num_items_in_batch=num_items_in_batch,
            ignore_index=self.ignore_index,
        )

    def remove(self) -> None:
        """Removes the hooks from the model."""
        self._capture.remove()
        if self._pre is not None:
            self._pre.remove()


_KD_INPUTS = ("input_ids", "attention_mask", "position_ids", "inputs_embeds")


class FusedDistillationLoss:
    """A ``compute_loss_func`` for ``transformers.Trainer`` that distills ``teacher`` into
    ``model``: :func:`divkit.fused_linear_divergence` of kind ``kind`` (any of
    :data:`divkit.KINDS`; ``forward_kl`` = KL(p_teacher || q_student)) from the student's last
    hidden states (captured from its decoder) and the teacher's (its decoder run on the same
    inputs, without grad), with both lm_heads: neither ``[tokens x V]`` logits are built in
    training (the student's forward is asked for the last position's logits only).

    Labels are shifted as Hugging Face shifts them (position i predicts token i + 1; -100
    ignored); the loss is the sum over the other tokens divided by the trainer's
    ``num_items_in_batch`` (gradient accumulation), or their mean without it.
    ``options``: further keywords of :func:`divkit.fused_linear_divergence` (``beta``,
    ``alpha``, ``temperature``, ``hard_weight``, ``soft_weight``, ``chunk_size``, ...)::

        trainer = Trainer(model=student, args=args, train_dataset=ds,
                          compute_loss_func=FusedDistillationLoss(student, teacher, "jsd",
                                                                   beta=0.5))

    Models with a final logit softcap are refused (the fused distillation head has none)."""

    def __init__(self, model, teacher, kind: str = "forward_kl", *, ignore_index: int = -100,
                 **options):  # fmt: skip
        fn = "FusedDistillationLoss"
        for name, m in (("model", model), ("teacher", teacher)):
            _lm_head(m)
            if _softcap(m) is not None:
                check.fail(fn, f"{name} has a final logit softcap, which the fused head lacks")
        self.model, self.teacher = model, teacher
        self.kind = check.string(fn, "kind", kind)
        self.ignore_index = check.integer(fn, "ignore_index", ignore_index)
        self.options = dict(options)
        self._inputs: Optional[Dict[str, Any]] = None
        self._capture = _HiddenCapture(model)
        self._accepts_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._pre = model.register_forward_pre_hook(self._pre_hook, with_kwargs=True)

    def _pre_hook(self, module, args, kwargs: Dict[str, Any]):
        inputs = {k: kwargs[k] for k in _KD_INPUTS if kwargs.get(k) is not None}
        if args:
            inputs.setdefault("input_ids", args[0])
        self._inputs = inputs
        if module.training and self._accepts_keep:
            return args, {**kwargs, "logits_to_keep": 1}
        return None

    def __call__(self, outputs, labels, num_items_in_batch=None):
        hidden = self._capture.take()
        inputs, self._inputs = self._inputs, None
        if inputs is None:
            check.fail("FusedDistillationLoss", "the model's inputs were not seen")
        self.teacher.eval()
        with torch.no_grad():
            out = _decoder(self.teacher)(**inputs, use_cache=False)
            teacher_hidden = getattr(out, "last_hidden_state", None)
            teacher_hidden = out[0] if teacher_hidden is None else teacher_hidden
        labels = labels.to(hidden.device)
        shift = torch.nn.functional.pad(labels, (0, 1), value=self.ignore_index)[..., 1:]
        head, teacher_head = _lm_head(self.model), _lm_head(self.teacher)
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(hidden.device)
        return fused_linear_divergence(
            hidden,
            head.weight,
            teacher_hidden.to(hidden.device),
            teacher_head.weight.detach(),
            self.kind,
            student_bias=head.bias,
            teacher_bias=None if teacher_head.bias is None else teacher_head.bias.detach(),
            labels=shift,
            ignore_index=self.ignore_index,
            reduction="mean",
            num_items_in_batch=num_items_in_batch,
            **self.options,
        )

    def remove(self) -> None:
        """Removes the hooks from the model."""
        self._capture.remove()
        self._pre.remove()
