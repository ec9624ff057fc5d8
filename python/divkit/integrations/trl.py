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

* ``DivkitCPOTrainer`` and ``DivkitORPOTrainer``: TRL's ``CPOTrainer`` / ``ORPOTrainer``
  (``trl.experimental``) whose loss methods are :func:`divkit.cpo_loss` and
  :func:`divkit.odds_ratio_loss`; everything else is TRL's.
* :class:`DivkitKTOTrainer`: TRL's ``KTOTrainer`` whose loss is :func:`divkit.kto_loss`
  (``kto`` and ``apo_zero_unpaired``, desirable / undesirable weights, the KL baseline z0 from
  TRL's mismatched completions), its log-probs from :func:`divkit.fused_linear_logprobs` on the
  last hidden states (:func:`add_divkit_lm_head` in place of TRL's fused head); metrics TRL's.
* :class:`DivkitSparsePOTrainer`: SparsePO (Christopoulou et al. 2024), which TRL does not
  have, on ``DPOTrainer``'s data path: :func:`divkit.sparsepo_loss_fused` from hidden states,
  learned (or all-ones, or reward-only) token masks.
* :class:`DivkitTDPOTrainer`: token-level DPO (TDPO1 / TDPO2, Zeng et al. 2024), which TRL does
  not have, on TRL's ``DPOTrainer`` data path (same datasets, collator and ``DPOConfig``):
  :func:`divkit.tdpo_loss_fused` from the policy's and the reference's last hidden states, no
  ``[tokens x V]`` logits of either; TRL's reward metrics.
* :class:`DivkitDistillationTrainer`: TRL's on-policy ``DistillationTrainer`` with its chunked
  JSD replaced by :func:`divkit.fused_linear_divergence` (any ``divkit_kind``; TRL's ``beta`` and
  ``temperature``; the completion tokens' sum over ``num_items_in_batch`` or their mean, as
  TRL); models with a logit scale or a final softcap keep TRL's loss (with a warning, once).
* :class:`DivkitDPOTrainer`: TRL's ``DPOTrainer`` whose loss is :func:`divkit.preference_loss`
  (every TRL loss type and their weighted lists, f-DPO, WPO weights, ``ld_alpha``, the MoE
  auxiliary loss), its per-token outputs (log-probs, entropy, mean logits, top-1 flags, WPO's
  ``log sum p^2``) from divkit's fused head on every model TRL heads (:func:`add_divkit_lm_head`
  in place of TRL's: the policy or the PEFT adapter's base, the reference model, the
  precomputation of reference log-probs): no ``[tokens x V]`` logits; TRL's metrics (rewards,
  margins, accuracies, log-probs, entropy, logits, token accuracy, token count) are computed by
  TRL's own ``_compute_loss`` from them.

Configs: the divkit options are fields of config dataclasses that subclass TRL's (so that
``transformers.HfArgumentParser`` reads them from the command line): :class:`DivkitGKDConfig`
(``GKDConfig``), :class:`DivkitDistillationConfig` (``DistillationConfig``),
:class:`DivkitKTOConfig` (``KTOConfig``), :class:`DivkitDPOConfig`, :class:`DivkitTDPOConfig`
and :class:`DivkitSparsePOConfig` (``DPOConfig``). Their fields are checked on construction
(``divkit.Error`` naming the field). The trainers' keyword arguments of the same names still
work with TRL's stock configs; given with a divkit config, a keyword must equal the field, else
``divkit.Error`` (one option, one place: neither silently wins). CPO and ORPO have no option of
divkit's own and read TRL's configs as they are.

Differences from TRL 1.16, on purpose: TRL's ``GKDTrainer.compute_loss`` calls
``generalized_jsd_loss`` without its ``temperature`` (the config's ``temperature`` only affects
generation); here ``divkit_temperature`` (default 1.0, TRL's effective value) is applied to the
loss. The evaluation loss (``return_outputs=True``, the prediction step) is TRL's own.
``DivkitDPOTrainer`` applies ``label_smoothing`` to ``sigmoid`` and ``sigmoid_norm`` as cDPO
(TRL 1.16 ignores it there), with a warning (once) when it is > 0.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import List, Optional

import torch

from .. import _validate as check
from ..functional import KINDS
from ..fused import fused_linear_divergence
from ..preference import (
    cpo_loss,
    kto_loss,
    odds_ratio_loss,
    preference_loss,
    sparsepo_loss_fused,
    tdpo_loss_fused,
)

# The trl.experimental trainers (GKD, CPO, ORPO) are made on first access (module __getattr__).
__all__ = [
    "DivkitDPOConfig",
    "DivkitDistillationConfig",
    "DivkitGKDConfig",  # noqa: F822
    "DivkitKTOConfig",
    "DivkitSparsePOConfig",
    "DivkitTDPOConfig",
    "DivkitCPOTrainer",  # noqa: F822
    "DivkitDPOTrainer",
    "DivkitORPOTrainer",  # noqa: F822
    "DivkitDistillationTrainer",
    "DivkitGKDTrainer",  # noqa: F822
    "DivkitKTOTrainer",
    "DivkitSparsePOTrainer",
    "DivkitTDPOTrainer",
    "add_divkit_lm_head",
    "last_hidden_and_head",
]


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


# ---------------------------------------------------------------------------------------------
# Configs: the divkit options as fields of TRL's config dataclasses (HfArgumentParser reads them
# from the command line). A trainer reads its options from ``args`` when ``args`` is one of these
# configs; a keyword argument given as well must agree with the field (else divkit.Error): one
# option, one place. With a stock TRL config the keywords (or their defaults) are used.
# ---------------------------------------------------------------------------------------------


def _field(default, help):
    return dataclasses.field(default=default, metadata={"help": help})


def _has_field(args, name) -> bool:
    return dataclasses.is_dataclass(args) and any(f.name == name for f in dataclasses.fields(args))


def _setting(args, fn, name, keyword, default):
    """The value of option ``name``: ``args.<name>`` when the config has that field (a keyword
    that is not None must equal it), else the keyword, else ``default``."""
    if _has_field(args, name):
        value = getattr(args, name)
        if keyword is not None and keyword != value:
            check.fail(
                fn,
                f"{name}={keyword!r} (keyword) disagrees with args.{name}={value!r} "
                f"({type(args).__name__}); set it in one place",
            )
        return value
    return default if keyword is None else keyword


def _fused_options(args, fn, keyword, names):
    """Keywords of fused_linear_divergence from the config's ``divkit_<name>`` fields (a None
    chunk size is left out) merged with the ``divkit_options`` keyword dict, which must agree
    with the config on the keys both give."""
    opts = {}
    for name in names:
        if _has_field(args, "divkit_" + name):
            value = getattr(args, "divkit_" + name)
            if value is not None:
                opts[name] = value
    for key, value in dict(keyword or {}).items():
        if key in opts and opts[key] != value:
            check.fail(
                fn,
                f"divkit_options[{key!r}]={value!r} disagrees with args.divkit_{key}="
                f"{opts[key]!r} ({type(args).__name__}); set it in one place",
            )
        opts[key] = value
    return opts


def _check_kind(fn, name, value):
    return check.string(fn, name, value, choices=KINDS)


def _check_finite(fn, name, value):
    import math

    v = check.real(fn, name, value)
    if not math.isfinite(v):
        check.fail(fn, f"{name} must be finite, got {v:g}")
    return v


def _check_chunk(fn, name, value):
    if value is not None:
        check.integer(fn, name, value, min=1)
    return value


_TDPO_VARIANTS = ("tdpo1", "tdpo2")
_GKD_FUSED = ("alpha", "hard_weight", "soft_weight", "scale_by_t_squared", "chunk_size")
_DISTILLATION_FUSED = ("alpha", "chunk_size")
_KIND_HELP = (
    "divkit divergence of the distillation loss (divkit.KINDS): jsd (TRL's generalized JSD with "
    "the config's beta), forward_kl = KL(p_teacher || q_student), reverse_kl, tvd, ..."
)
_ALPHA_HELP = "alpha of the divergences that take one (alpha / skew divergences); see divkit.KINDS"
_CHUNK_HELP = "tokens per chunk of the fused head (None: divkit chooses)"


def _make_gkd_config():
    from trl.experimental.gkd import GKDConfig

    @dataclasses.dataclass
    class DivkitGKDConfig(GKDConfig):
        """``GKDConfig`` with the options of :class:`DivkitGKDTrainer`: ``divkit_kind`` (default
        ``"jsd"``, with TRL's ``beta``), ``divkit_temperature`` (the loss's softmax temperature,
        default 1.0; TRL's ``temperature`` stays the generation temperature), ``divkit_alpha``,
        ``divkit_hard_weight``, ``divkit_soft_weight``, ``divkit_scale_by_t_squared``,
        ``divkit_chunk_size`` (keywords of :func:`divkit.fused_linear_divergence`). Checked on
        construction: a bad value raises ``divkit.Error`` naming the field."""

        divkit_kind: str = _field("jsd", _KIND_HELP)
        divkit_temperature: float = _field(
            1.0, "softmax temperature of both models in the divkit loss (not generation's)"
        )
        divkit_alpha: float = _field(0.1, _ALPHA_HELP)
        divkit_hard_weight: float = _field(
            0.0, "weight of the cross-entropy on the completion tokens added to the loss"
        )
        divkit_soft_weight: float = _field(1.0, "weight of the divergence term")
        divkit_scale_by_t_squared: bool = _field(
            False, "multiply the divergence by temperature**2 (Hinton et al.)"
        )
        divkit_chunk_size: Optional[int] = _field(None, _CHUNK_HELP)

        def __post_init__(self):
            super().__post_init__()
            fn = "DivkitGKDConfig"
            _check_kind(fn, "divkit_kind", self.divkit_kind)
            check.positive(fn, "divkit_temperature", self.divkit_temperature)
            _check_finite(fn, "divkit_alpha", self.divkit_alpha)
            check.nonnegative(fn, "divkit_hard_weight", self.divkit_hard_weight)
            check.nonnegative(fn, "divkit_soft_weight", self.divkit_soft_weight)
            check.boolean(fn, "divkit_scale_by_t_squared", self.divkit_scale_by_t_squared)
            _check_chunk(fn, "divkit_chunk_size", self.divkit_chunk_size)

    return DivkitGKDConfig


def _make_gkd():
    from trl.experimental.gkd import GKDTrainer

    class DivkitGKDTrainer(GKDTrainer):
        """``trl.experimental.gkd.GKDTrainer`` with divkit's fused distillation loss (see the module
        docstring). Its options are the fields of :class:`DivkitGKDConfig` (``args=``), or with a
        plain ``GKDConfig`` the keyword arguments ``divkit_kind`` (default ``"jsd"``),
        ``divkit_temperature`` (default 1.0), ``divkit_options`` (a dict of further
        :func:`divkit.fused_linear_divergence` keywords: ``alpha``, ``hard_weight``, ``chunk_size``,
        ``scale_by_t_squared``, ...). A keyword given with a ``DivkitGKDConfig`` must equal the
        field, else ``divkit.Error``."""

        def __init__(
            self,
            *args,
            divkit_kind: Optional[str] = None,
            divkit_temperature: Optional[float] = None,
            divkit_options: Optional[dict] = None,
            **kwargs,
        ):
            super().__init__(*args, **kwargs)
            fn = "DivkitGKDTrainer"
            kind = _setting(self.args, fn, "divkit_kind", divkit_kind, "jsd")
            self.divkit_kind = _check_kind(fn, "divkit_kind", kind)
            temperature = _setting(self.args, fn, "divkit_temperature", divkit_temperature, 1.0)
            self.divkit_temperature = check.positive(fn, "divkit_temperature", temperature)
            self.divkit_options = _fused_options(self.args, fn, divkit_options, _GKD_FUSED)

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

    return DivkitGKDTrainer


def _make_cpo():
    from trl.experimental.cpo import CPOTrainer

    class DivkitCPOTrainer(CPOTrainer):
        """``trl.experimental.cpo.CPOTrainer`` whose ``cpo_loss`` is :func:`divkit.cpo_loss`
        (CPO / SimPO / AlphaPO: ``loss_type`` sigmoid, hinge, ipo, simpo; ``beta``,
        ``label_smoothing``, ``simpo_gamma``, ``alpha`` from the config); the log-probs, the
        behaviour-cloning term (``cpo_alpha``) and the metrics are TRL's."""

        def cpo_loss(self, policy_chosen_logps, policy_rejected_logps):
            return cpo_loss(
                policy_chosen_logps,
                policy_rejected_logps,
                loss_type=self.loss_type,
                beta=self.beta,
                label_smoothing=self.label_smoothing,
                simpo_gamma=getattr(self, "simpo_gamma", 0.5),
                alpha=self.alpha,
            )

    return DivkitCPOTrainer


def _make_orpo():
    from trl.experimental.orpo import ORPOTrainer

    class DivkitORPOTrainer(ORPOTrainer):
        """``trl.experimental.orpo.ORPOTrainer`` whose ``odds_ratio_loss`` is
        :func:`divkit.odds_ratio_loss` (log(1 - e^x) in a stable form); the NLL term, the
        log-probs and the metrics are TRL's."""

        def odds_ratio_loss(self, policy_chosen_logps, policy_rejected_logps):
            return odds_ratio_loss(policy_chosen_logps, policy_rejected_logps, beta=self.beta)

    return DivkitORPOTrainer


_LAZY = {
    "DivkitGKDConfig": _make_gkd_config,
    "DivkitGKDTrainer": _make_gkd,
    "DivkitCPOTrainer": _make_cpo,
    "DivkitORPOTrainer": _make_orpo,
}


def __getattr__(name):
    # The trainers of trl.experimental are made on first use: importing this module does not
    # import TRL's experimental modules (nor their warnings).
    make = _LAZY.get(name)
    if make is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    cls = make()
    cls.__qualname__ = cls.__name__ = name
    globals()[name] = cls
    return cls


def _dpo_base():
    from trl import DPOTrainer

    return DPOTrainer


class _Capture:
    """Forward hooks that keep the outputs of the models TRL calls (policy first, then the
    reference), in call order."""

    def __init__(self, modules):
        self.outputs: List = []
        self.handles = [
            m.register_forward_hook(self._hook) for m in dict.fromkeys(modules) if m is not None
        ]

    def _hook(self, module, args, output):
        self.outputs.append(output)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


_SMOOTHING_WARNED = []


class DivkitDPOTrainer(_dpo_base()):
    """``trl.DPOTrainer`` with the loss of :func:`divkit.preference_loss` (see the module
    docstring); configured by the same ``DPOConfig`` (``loss_type``, ``loss_weights``, ``beta``,
    ``label_smoothing``, ``f_divergence_type``, ``f_alpha_divergence_coef``, ``use_weighting``,
    ``ld_alpha``, ``discopop_tau``, ``precompute_ref_log_probs``).

    With ``divkit_fused_head=True`` (default) divkit's fused head (:func:`add_divkit_lm_head`)
    takes the place of TRL's on every model TRL gives one (the policy, or the base model under a
    PEFT adapter, whose disabled-adapter forward is then the reference; the reference model; the
    precomputation of reference log-probs), with TRL's outputs: the log-probs, entropy, mean
    logits, top-1 flags and, with ``use_weighting``, ``log sum p^2`` for WPO's weights, all from
    :func:`divkit.fused_linear_logprobs` on the last hidden states: no ``[tokens x V]`` logits in
    the step. TRL's ``_compute_loss`` reads them for its metrics (entropy, logits/chosen and
    rejected, mean token accuracy, token counts) as from its own head. A model divkit's head
    cannot serve (final logit softcap, logit scale, MoE router auxiliary loss, non-Linear
    lm_head) keeps TRL's head, with a warning (once). ``False`` keeps TRL's head everywhere."""

    def __init__(self, *args, divkit_fused_head: Optional[bool] = None, **kwargs):
        fn = "DivkitDPOTrainer"
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        fused = _setting(config, fn, "divkit_fused_head", divkit_fused_head, True)
        self.divkit_fused_head = check.boolean(fn, "divkit_fused_head", fused)
        # Which models got divkit's head (False: TRL's kept), in the order TRL heads them.
        self.divkit_heads: List[bool] = []
        if not self.divkit_fused_head:
            super().__init__(*args, **kwargs)
            return
        import trl.trainer.dpo_trainer as dpo_module

        trl_head = dpo_module.add_fused_lm_head

        def install(model, temperature=1.0, cast_lm_head_to_fp32=False, outputs=("log_probs",)):
            # TRL heads its models, then precomputes the reference log-probs, inside its
            # __init__: the swap is made there, so that every forward with fused_lm_head=True
            # (precomputation included) is divkit's. divkit's head computes in fp32 whatever
            # cast_lm_head_to_fp32 says.
            ok = add_divkit_lm_head(model, temperature, outputs)
            self.divkit_heads.append(ok)
            if not ok:
                trl_head(
                    model,
                    temperature=temperature,
                    cast_lm_head_to_fp32=cast_lm_head_to_fp32,
                    outputs=outputs,
                )

        dpo_module.add_fused_lm_head = install
        try:
            super().__init__(*args, **kwargs)
        finally:
            dpo_module.add_fused_lm_head = trl_head

    def _compute_loss(self, model, inputs, return_outputs):
        if (
            self.label_smoothing > 0
            and {"sigmoid", "sigmoid_norm"} & set(self.loss_types)
            and not _SMOOTHING_WARNED
        ):
            _SMOOTHING_WARNED.append(True)
            warnings.warn(
                "DivkitDPOTrainer: label_smoothing > 0 applies cDPO smoothing to the sigmoid "
                "and sigmoid_norm losses; TRL 1.16's DPOTrainer ignores it for them",
                UserWarning,
                stacklevel=2,
            )
        with _Capture([model, self.ref_model]) as seen:
            out = super()._compute_loss(model, inputs, return_outputs)
        loss = self._divkit_loss(inputs, seen.outputs)
        if return_outputs:
            return (loss, *out[1:]) if isinstance(out, tuple) else (loss, out)
        return loss

    def _sequence_logps(self, per_token, shift_mask):
        """TRL's per-sequence log-probs: the sum over the completion, or with ld_alpha the shared
        length's sum plus ld_alpha times the tail's (Liu et al. 2024, LD-DPO)."""
        if self.ld_alpha is None:
            return per_token.sum(dim=1)
        pos = shift_mask.cumsum(dim=1)
        lens = shift_mask.sum(dim=1).long()
        shared = torch.minimum(*lens.chunk(2, dim=0))
        shared = torch.cat([shared, shared], dim=0).unsqueeze(1)
        return (per_token * ((pos > 0) & (pos <= shared))).sum(dim=1) + self.ld_alpha * (
            per_token * (pos > shared)
        ).sum(dim=1)

    def _divkit_loss(self, inputs, outputs):
        completion_mask = inputs["completion_mask"]
        shift_mask = completion_mask[..., 1:]
        seq_len = shift_mask.size(1)
        policy = outputs[0]
        per_token = policy.log_probs[:, -seq_len:]
        chosen, rejected = self._sequence_logps(per_token, shift_mask).chunk(2, dim=0)
        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref = outputs[1].log_probs[:, -seq_len:].detach()
            ref_chosen, ref_rejected = self._sequence_logps(ref, shift_mask).chunk(2, dim=0)
        lengths = completion_mask.sum(dim=1).clamp(min=1)
        chosen_len, rejected_len = lengths.chunk(2, dim=0)
        weights = None
        if self.use_weighting:
            # WPO (Zhou et al. 2024, Eq. 2), as TRL: exp of the mean aligned log-prob, w_w * w_l.
            with torch.no_grad():
                aligned = (per_token - policy.log_sum_sq_probs[:, -seq_len:]) * shift_mask
                w = torch.exp(aligned.sum(dim=1) / shift_mask.sum(dim=1).clamp_min(1))
                weights = torch.mul(*w.chunk(2, dim=0))
        losses, _, _ = preference_loss(
            chosen,
            rejected,
            ref_chosen.to(chosen.dtype),
            ref_rejected.to(chosen.dtype),
            loss_type=list(self.loss_types),
            loss_weights=list(self.loss_weights),
            beta=self.beta,
            label_smoothing=self.label_smoothing,
            f_divergence_type=self.f_divergence_type,
            f_alpha_divergence_coef=self.f_alpha_divergence_coef,
            chosen_lengths=chosen_len,
            rejected_lengths=rejected_len,
            policy_weights=weights,
            discopop_tau=self.args.discopop_tau,
        )
        loss = losses.mean()
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * policy.aux_loss
        return loss


def _distillation_base():
    from trl import DistillationTrainer

    return DistillationTrainer


_SCALE_WARNED = []


def _distillation_config_base():
    from trl import DistillationConfig

    return DistillationConfig


@dataclasses.dataclass
class DivkitDistillationConfig(_distillation_config_base()):
    """``trl.DistillationConfig`` with the options of :class:`DivkitDistillationTrainer`:
    ``divkit_kind`` (default ``"jsd"``, with TRL's ``beta``; TRL's ``temperature`` is the loss's
    temperature, as in TRL), ``divkit_alpha``, ``divkit_chunk_size`` (keywords of
    :func:`divkit.fused_linear_divergence`). Checked on construction: a bad value raises
    ``divkit.Error`` naming the field."""

    divkit_kind: str = _field("jsd", _KIND_HELP)
    divkit_alpha: float = _field(0.1, _ALPHA_HELP)
    divkit_chunk_size: Optional[int] = _field(None, _CHUNK_HELP)

    def __post_init__(self):
        super().__post_init__()
        fn = "DivkitDistillationConfig"
        _check_kind(fn, "divkit_kind", self.divkit_kind)
        _check_finite(fn, "divkit_alpha", self.divkit_alpha)
        _check_chunk(fn, "divkit_chunk_size", self.divkit_chunk_size)


class DivkitDistillationTrainer(_distillation_base()):
    """``trl.DistillationTrainer`` whose loss is :func:`divkit.fused_linear_divergence` (see the
    module docstring). Its options are the fields of :class:`DivkitDistillationConfig`
    (``args=``), or with a plain ``DistillationConfig`` the keyword arguments ``divkit_kind``
    (default ``"jsd"``: TRL's generalized JSD with the config's ``beta``) and
    ``divkit_options`` (further keywords of :func:`divkit.fused_linear_divergence`); a keyword
    given with a ``DivkitDistillationConfig`` must equal the field, else ``divkit.Error``.
    Generation, metrics (the student's entropy included) and the data path are TRL's."""

    def __init__(
        self,
        *args,
        divkit_kind: Optional[str] = None,
        divkit_options: Optional[dict] = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        fn = "DivkitDistillationTrainer"
        kind = _setting(self.args, fn, "divkit_kind", divkit_kind, "jsd")
        self.divkit_kind = _check_kind(fn, "divkit_kind", kind)
        self.divkit_options = _fused_options(self.args, fn, divkit_options, _DISTILLATION_FUSED)
        if self.divkit_options.get("hard_weight"):
            # TRL hands the loss a completion mask, not the next tokens: a hard-label term would
            # be the cross-entropy against token 0.
            check.fail(fn, "divkit_options: hard_weight is not available (TRL passes no labels)")

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        # TRL's _compute_loss finds the hidden states, heads, scales and masks, then calls the
        # module's _chunked_divergence_loss: that one call is divkit's for the duration.
        import trl.trainer.distillation_trainer as module

        original = module._chunked_divergence_loss
        module._chunked_divergence_loss = functools.partial(self._divkit_loss, original)
        try:
            return super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)
        finally:
            module._chunked_divergence_loss = original

    def _divkit_loss(
        self,
        original,
        student_hidden_states,
        teacher_hidden_states,
        student_lm_head_weight,
        teacher_lm_head_weight,
        completion_mask,
        beta,
        num_items_in_batch=None,
        student_lm_head_bias=None,
        teacher_lm_head_bias=None,
        student_logit_scale=1.0,
        teacher_logit_scale=1.0,
        student_final_logit_softcapping=None,
        teacher_final_logit_softcapping=None,
        temperature=1.0,
    ):
        if (
            student_logit_scale != 1.0
            or teacher_logit_scale != 1.0
            or student_final_logit_softcapping
            or teacher_final_logit_softcapping
        ):
            if not _SCALE_WARNED:
                _SCALE_WARNED.append(True)
                warnings.warn(
                    "DivkitDistillationTrainer: a logit scale or final softcap is not part of "
                    "divkit's fused distillation head; TRL's loss is used for this model",
                    UserWarning,
                    stacklevel=2,
                )
            return original(
                student_hidden_states,
                teacher_hidden_states,
                student_lm_head_weight,
                teacher_lm_head_weight,
                completion_mask,
                beta,
                num_items_in_batch=num_items_in_batch,
                student_lm_head_bias=student_lm_head_bias,
                teacher_lm_head_bias=teacher_lm_head_bias,
                student_logit_scale=student_logit_scale,
                teacher_logit_scale=teacher_logit_scale,
                student_final_logit_softcapping=student_final_logit_softcapping,
                teacher_final_logit_softcapping=teacher_final_logit_softcapping,
                temperature=temperature,
            )
        valid = completion_mask != 0
        # Labels only mark the tokens (hard_weight 0 reads no label value): 0 or ignore_index.
        labels = torch.where(valid, 0, -100).to(torch.int64)
        loss = fused_linear_divergence(
            student_hidden_states,
            student_lm_head_weight,
            teacher_hidden_states,
            teacher_lm_head_weight.detach(),
            self.divkit_kind,
            student_bias=student_lm_head_bias,
            teacher_bias=None if teacher_lm_head_bias is None else teacher_lm_head_bias.detach(),
            labels=labels,
            beta=beta,
            temperature=temperature,
            reduction="mean",
            num_items_in_batch=num_items_in_batch,
            **self.divkit_options,
        )
        with torch.no_grad():
            from ..fused import fused_linear_logprobs

            entropy = fused_linear_logprobs(
                student_hidden_states.detach(),
                student_lm_head_weight.detach(),
                labels,
                None if student_lm_head_bias is None else student_lm_head_bias.detach(),
                temperature=temperature,
                return_entropy=True,
            ).entropy
            entropy_sum = (entropy * valid).sum()
        return loss, entropy_sum, valid.sum()


def _kto_base():
    from trl import KTOTrainer

    return KTOTrainer


_HEAD_WARNED = []


def _head_unsupported(model) -> Optional[str]:
    """Why divkit's fused head cannot stand in for TRL's on this model (None: it can)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    cfg = model.config if cfg is None else cfg
    if getattr(cfg, "final_logit_softcapping", None):
        return "a final logit softcap"
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"):
        v = getattr(cfg, name, None)
        if v is not None and v != 1:
            return f"a logit scale ({name})"
    if getattr(cfg, "output_router_logits", False):
        return "a router auxiliary loss"
    if not isinstance(model.get_output_embeddings(), torch.nn.Linear):
        return "an lm_head that is not an nn.Linear"
    return None


def add_divkit_lm_head(model, temperature: float = 1.0, outputs=("log_probs",)) -> bool:
    """Makes ``model(..., labels=labels, fused_lm_head=True)`` (the call TRL 1.16's trainers make
    after ``trl.trainer.utils.add_fused_lm_head``) compute its per-token outputs with
    :func:`divkit.fused_linear_logprobs` from the decoder's last hidden states: no ``[tokens x
    V]`` logits, the log-probs ``log softmax(h W^T + b) / T`` of the next token (labels shifted
    as TRL shifts them, or ``shift_labels`` as given), 0 where the label is -100; ``outputs``
    may add ``"entropy"`` (differentiable), ``"mean_logits"`` (the vocabulary mean of the
    logits, ``h . mean(W) + mean(b)``, no gradient), ``"log_sum_sq_probs"`` (``log sum_v p_v^2``,
    WPO's weights; no gradient) and ``"is_top1"`` (bool: the label is the argmax, the first one
    on ties as TRL's head; token accuracy), TRL's fields of the same names; the others are None.
    Returns a ``trl.trainer.utils.FusedCausalLMOutput``. Calls without ``fused_lm_head=True`` go
    to the model's previous forward (generation is unchanged). Models with a final logit softcap, a
    logit scale, a router auxiliary loss or a non-Linear lm_head are left as they are (a warning,
    once) and False is returned."""
    fn = "add_divkit_lm_head"
    temperature = check.positive(fn, "temperature", temperature)
    allowed = {"log_probs", "entropy", "mean_logits", "log_sum_sq_probs", "is_top1"}
    outputs = tuple(outputs)
    for name in outputs:
        if name not in allowed:
            check.fail(fn, f"outputs: '{name}' is not one of {sorted(allowed)}")
    why = _head_unsupported(model)
    if why is not None:
        if not _HEAD_WARNED:
            _HEAD_WARNED.append(True)
            warnings.warn(
                f"add_divkit_lm_head: {type(model).__name__} has {why}, which divkit's fused "
                "head does not apply; the model's own (TRL's) head is kept",
                UserWarning,
                stacklevel=2,
            )
        return False
    import types

    import transformers
    from trl.trainer.utils import FusedCausalLMOutput

    from ..fused import fused_linear_logprobs

    previous = model.forward
    # As TRL: before transformers 5, vision-language models expose their language backbone as
    # `model` rather than through `base_model_prefix`.
    text_config = model.config.get_text_config()
    backbone_attr = "base_model"
    if text_config is not model.config and int(transformers.__version__.split(".")[0]) < 5:
        backbone_attr = "model"

    @functools.wraps(type(model).forward)
    def forward(
        self,
        *args,
        fused_lm_head=False,
        labels=None,
        shift_labels=None,
        num_items_in_batch=None,
        **kwargs,
    ):
        if not fused_lm_head:
            extra = dict(
                labels=labels, shift_labels=shift_labels, num_items_in_batch=num_items_in_batch
            )
            kwargs.update({k: v for k, v in extra.items() if v is not None})
            return previous(*args, **kwargs)
        kwargs["use_cache"] = False
        # Looked up on each call: FSDP and PEFT replace the backbone and the head after patching.
        hidden = getattr(self, backbone_attr)(*args, **kwargs).last_hidden_state
        head = self.get_output_embeddings()
        if shift_labels is None:
            # Position i predicts token i + 1: labels shifted left, the last position ignored
            # (the hidden states stay whole, so no strided copy is made), trimmed at the end.
            targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
        else:
            targets = shift_labels
        targets = targets.to(head.weight.device)
        hidden = hidden.to(head.weight.device)
        res = fused_linear_logprobs(
            hidden,
            head.weight,
            targets,
            head.bias,
            temperature=temperature,
            return_entropy="entropy" in outputs,
            return_log_sum_sq_probs="log_sum_sq_probs" in outputs,
            return_is_top1="is_top1" in outputs,
        )
        if isinstance(res, torch.Tensor):
            log_probs, entropy, log_sum_sq, is_top1 = res, None, None, None
        else:
            log_probs, entropy = res.logprobs, res.entropy
            log_sum_sq, is_top1 = res.log_sum_sq_probs, res.is_top1
        mask = targets != -100
        mean_logits = None
        if "mean_logits" in outputs:
            with torch.no_grad():
                w = (
                    head.weight.full_tensor()
                    if hasattr(head.weight, "full_tensor")
                    else head.weight
                )
                mean = hidden.float() @ w.float().mean(0)
                if head.bias is not None:
                    b = head.bias
                    b = b.full_tensor() if hasattr(b, "full_tensor") else b
                    mean = mean + b.float().mean()
                mean_logits = (mean / temperature).masked_fill(~mask, 0)
        per_token = (log_probs, entropy, log_sum_sq, mean_logits, is_top1)
        if shift_labels is None:
            mask = mask[:, :-1]
            per_token = tuple(None if x is None else x[:, :-1] for x in per_token)
        log_probs, entropy, log_sum_sq, mean_logits, is_top1 = per_token
        denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(
            loss=-log_probs.sum() / denom,
            log_probs=log_probs,
            entropy=entropy,
            log_sum_sq_probs=log_sum_sq,
            mean_logits=mean_logits,
            is_top1=is_top1,
            label_mask=mask,
        )

    model.forward = types.MethodType(forward, model)
    return True


def _kto_config_base():
    from trl import KTOConfig

    return KTOConfig


@dataclasses.dataclass
class DivkitKTOConfig(_kto_config_base()):
    """``trl.KTOConfig`` with :class:`DivkitKTOTrainer`'s option ``divkit_fused_head`` (default
    True: the log-probs from divkit's fused head; False: TRL's head)."""

    divkit_fused_head: bool = _field(
        True,
        "compute the per-token log-probs, entropy and mean logits with divkit's fused head "
        "(no [tokens x V] logits); false keeps TRL's head",
    )

    def __post_init__(self):
        super().__post_init__()
        check.boolean("DivkitKTOConfig", "divkit_fused_head", self.divkit_fused_head)


class DivkitKTOTrainer(_kto_base()):
    """``trl.KTOTrainer`` with the loss of :func:`divkit.kto_loss` (see the module docstring),
    configured by the same ``KTOConfig`` (or :class:`DivkitKTOConfig`). With
    ``divkit_fused_head=True`` (default; the config's field, or the keyword argument with a plain
    ``KTOConfig``) the policy's and the reference's per-token log-probs, the entropy and
    mean-logit metrics come from :func:`divkit.fused_linear_logprobs` on the decoder's last
    hidden states (:func:`add_divkit_lm_head` in place of TRL's fused head): no ``[tokens x V]``
    logits of either model; ``False`` keeps TRL's head."""

    def __init__(self, *args, divkit_fused_head: Optional[bool] = None, **kwargs):
        super().__init__(*args, **kwargs)
        fn = "DivkitKTOTrainer"
        fused = _setting(self.args, fn, "divkit_fused_head", divkit_fused_head, True)
        self.divkit_fused_head = check.boolean(fn, "divkit_fused_head", fused)
        if self.divkit_fused_head:
            model = self.model
            if hasattr(model, "get_base_model"):  # PEFT: the head goes on the base model
                model = model.get_base_model()
            add_divkit_lm_head(model, outputs=("log_probs", "entropy", "mean_logits"))
            if self.ref_model is not None:
                add_divkit_lm_head(self.ref_model)

    def _compute_kl_logps(self, model, batch):
        self._divkit_in_kl = True
        try:
            out = super()._compute_kl_logps(model, batch)
        finally:
            self._divkit_in_kl = False
        self._divkit_kl.append(out)
        return out

    def _compute_loss(self, model, inputs, return_outputs):
        self._divkit_kl, self._divkit_in_kl = [], False
        seen = []

        def hook(module, args, output):
            if not self._divkit_in_kl:
                seen.append(output)

        handles = [
            m.register_forward_hook(hook)
            for m in dict.fromkeys((model, self.ref_model))
            if m is not None
        ]
        try:
            out = super()._compute_loss(model, inputs, return_outputs)
        finally:
            for h in handles:
                h.remove()
        loss = self._divkit_loss(inputs, seen)
        if return_outputs:
            return (loss, *out[1:]) if isinstance(out, tuple) else (loss, out)
        return loss

    def _divkit_loss(self, inputs, outputs):
        seq_len = inputs["input_ids"].size(1) - 1
        logps = outputs[0].log_probs[:, -seq_len:].sum(-1)
        chosen = torch.as_tensor(inputs["label"], dtype=torch.bool, device=logps.device)
        if self.precompute_ref_logps:
            ref = inputs["ref_logps"].to(logps.dtype)
            ref_kl = inputs["ref_KL_logps"] if self.calculate_KL else None
        else:
            ref = outputs[1].log_probs[:, -seq_len:].sum(-1).detach()
            ref_kl = self._divkit_kl[1] if self.calculate_KL else None
        policy_kl = self._divkit_kl[0] if self.calculate_KL else None
        losses = kto_loss(
            logps[chosen],
            logps[~chosen],
            policy_kl,
            ref[chosen],
            ref[~chosen],
            ref_kl,
            beta=self.beta,
            desirable_weight=self.desirable_weight,
            undesirable_weight=self.undesirable_weight,
            loss_type=self.loss_type,
        )[0]
        loss = losses.nanmean()
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs[0].aux_loss
        return loss


def _dpo_config_base():
    from trl import DPOConfig

    return DPOConfig


@dataclasses.dataclass
class DivkitDPOConfig(_dpo_config_base()):
    """``trl.DPOConfig`` with :class:`DivkitDPOTrainer`'s option ``divkit_fused_head`` (default
    True: the per-token outputs from divkit's fused head; False: TRL's head)."""

    divkit_fused_head: bool = _field(
        True,
        "compute the per-token log-probs and the metrics' statistics with divkit's fused head "
        "(no [tokens x V] logits); false keeps TRL's head",
    )

    def __post_init__(self):
        super().__post_init__()
        check.boolean("DivkitDPOConfig", "divkit_fused_head", self.divkit_fused_head)


@dataclasses.dataclass
class DivkitTDPOConfig(_dpo_config_base()):
    """``trl.DPOConfig`` with :class:`DivkitTDPOTrainer`'s options ``tdpo_variant`` (``"tdpo1"``
    or ``"tdpo2"``, default) and ``tdpo_alpha`` (TDPO2's weight of the sequence KL, default
    0.5); ``beta`` and ``label_smoothing`` are DPOConfig's. Checked on construction: a bad value
    raises ``divkit.Error`` naming the field."""

    tdpo_variant: str = _field("tdpo2", "tdpo1 or tdpo2 (Zeng et al. 2024)")
    tdpo_alpha: float = _field(0.5, "TDPO2's weight of the sequence-level KL term")

    def __post_init__(self):
        super().__post_init__()
        fn = "DivkitTDPOConfig"
        check.string(fn, "tdpo_variant", self.tdpo_variant, choices=_TDPO_VARIANTS)
        _check_finite(fn, "tdpo_alpha", self.tdpo_alpha)
        if self.precompute_ref_log_probs:
            check.fail(fn, "precompute_ref_log_probs must be False: TDPO needs a reference model")


class DivkitTDPOTrainer(_dpo_base()):
    """TDPO on ``trl.DPOTrainer``'s data path (see the module docstring): ``DPOConfig``'s
    ``beta`` and ``label_smoothing``; ``tdpo_variant`` (``"tdpo1"`` or ``"tdpo2"``, default) and
    ``tdpo_alpha`` (TDPO2's weight of the sequence KL, default 0.5) are the fields of
    :class:`DivkitTDPOConfig` (``args=``), or keyword arguments with a plain ``DPOConfig`` (a
    keyword given with a ``DivkitTDPOConfig`` must equal the field, else ``divkit.Error``).
    Needs a reference model (token-level KL needs its distributions, not precomputed
    log-probs). Logs TRL's ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies`` and
    ``rewards/margins`` (the TDPO rewards ``beta (sum log-ratio + SeqKL)``)."""

    def __init__(
        self,
        *args,
        tdpo_variant: Optional[str] = None,
        tdpo_alpha: Optional[float] = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        fn = "DivkitTDPOTrainer"
        variant = _setting(self.args, fn, "tdpo_variant", tdpo_variant, "tdpo2")
        self.tdpo_variant = check.string(fn, "tdpo_variant", variant, choices=_TDPO_VARIANTS)
        alpha = _setting(self.args, fn, "tdpo_alpha", tdpo_alpha, 0.5)
        self.tdpo_alpha = _check_finite(fn, "tdpo_alpha", alpha)
        if self.ref_model is None or self.precompute_ref_logps:
            check.fail(
                fn,
                "TDPO needs a reference model (ref_model=..., precompute_ref_log_probs=False): "
                "its per-token KL needs the reference's distributions",
            )

    def _compute_loss(self, model, inputs, return_outputs):
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        labels = ids.masked_fill(inputs["completion_mask"] == 0, -100)
        labels = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
        hidden, head = last_hidden_and_head(model, ids, mask)
        with torch.no_grad():
            ref_hidden, ref_head = last_hidden_and_head(self.ref_model, ids, mask)
        (hc, hr), (lc, lr), (rc, rr) = hidden.chunk(2), labels.chunk(2), ref_hidden.chunk(2)
        losses, chosen_rewards, rejected_rewards = tdpo_loss_fused(
            hc,
            hr,
            head.weight,
            lc,
            lr,
            ref_chosen_hidden=rc,
            ref_rejected_hidden=rr,
            ref_weight=ref_head.weight.detach(),
            lm_head_bias=head.bias,
            ref_bias=None if ref_head.bias is None else ref_head.bias.detach(),
            beta=self.beta,
            alpha=self.tdpo_alpha,
            variant=self.tdpo_variant,
            label_smoothing=self.label_smoothing,
        )
        _log_rewards(self, chosen_rewards, rejected_rewards)
        loss = losses.mean()
        return (loss, None) if return_outputs else loss


def _log_rewards(trainer, chosen_rewards, rejected_rewards, extra=None):
    """TRL's reward metrics (DPOTrainer's names), gathered over the ranks."""
    mode = "train" if trainer.model.training else "eval"
    gather = trainer.accelerator.gather_for_metrics
    metrics = trainer._metrics[mode]
    metrics["rewards/chosen"].append(gather(chosen_rewards).mean().item())
    metrics["rewards/rejected"].append(gather(rejected_rewards).mean().item())
    margins = chosen_rewards - rejected_rewards
    metrics["rewards/accuracies"].append(gather((margins > 0).float()).mean().item())
    metrics["rewards/margins"].append(gather(margins).mean().item())
    for key, value in (extra or {}).items():
        metrics[key].append(gather(value.detach().reshape(1)).mean().item())


_SPARSEPO_MASKS = ("learned", "shared", "ones", "reward_only")


@dataclasses.dataclass
class DivkitSparsePOConfig(_dpo_config_base()):
    """``trl.DPOConfig`` with :class:`DivkitSparsePOTrainer`'s options: ``sparsepo_mask``
    (``"learned"``, default, ``"shared"``, ``"ones"``, ``"reward_only"``), ``sparsepo_l1_reward``
    and ``sparsepo_l1_kl`` (the masks' L1 weights, default 0), ``sparsepo_dropout`` (the learned
    mask model's dropout, default 0.1); ``beta`` is DPOConfig's. Checked on construction: a bad
    value raises ``divkit.Error`` naming the field. A mask model of your own stays a keyword
    argument of the trainer (``sparsepo_mask_model=``)."""

    sparsepo_mask: str = _field("learned", "learned, shared, ones (TDPO1) or reward_only (DPO)")
    sparsepo_l1_reward: float = _field(0.0, "weight of the reward mask's L1 norm")
    sparsepo_l1_kl: float = _field(0.0, "weight of the KL mask's L1 norm")
    sparsepo_dropout: float = _field(0.1, "dropout of the learned mask model")

    def __post_init__(self):
        super().__post_init__()
        fn = "DivkitSparsePOConfig"
        check.string(fn, "sparsepo_mask", self.sparsepo_mask, choices=_SPARSEPO_MASKS)
        check.nonnegative(fn, "sparsepo_l1_reward", self.sparsepo_l1_reward)
        check.nonnegative(fn, "sparsepo_l1_kl", self.sparsepo_l1_kl)
        dropout = check.real(fn, "sparsepo_dropout", self.sparsepo_dropout)
        if not 0.0 <= dropout < 1.0:
            check.fail(fn, f"sparsepo_dropout must be in [0, 1), got {dropout:g}")
        if self.precompute_ref_log_probs:
            check.fail(
                fn, "precompute_ref_log_probs must be False: SparsePO needs a reference model"
            )
        if self.label_smoothing:
            check.fail(fn, "label_smoothing is not part of SparsePO; leave it at 0")


class DivkitSparsePOTrainer(_dpo_base()):
    """SparsePO (Christopoulou et al. 2024; huawei-noah/HEBO, SparsePO), which TRL does not have,
    on TRL's ``DPOTrainer`` data path (same datasets, collator and ``DPOConfig``; ``beta`` from
    the config): :func:`divkit.sparsepo_loss_fused` from the policy's and the reference's last
    hidden states, no ``[tokens x V]`` logits of either. Per completion token the reward
    ``log pi - log pi_ref`` is weighted by a mask m^r and the KL(pi_ref || pi) by a mask m^kl;
    ``loss = -logsig(beta (u - d)) + l1_reward |m^r|_1 + l1_kl |m^kl|_1`` (see
    :func:`divkit.sparsepo_loss`).

    Options: the fields of :class:`DivkitSparsePOConfig` (``args=``), or keyword arguments with
    a plain ``DPOConfig`` (a keyword given with a ``DivkitSparsePOConfig`` must equal the field,
    else ``divkit.Error``). ``sparsepo_mask`` picks the masks:

    * ``"learned"`` (default): two masks from :class:`divkit.SparsePOMask` on the reference's
      hidden states of every decoder layer, trained with the policy (its parameters are added
      to the optimizer, learning rate and schedule the policy's, no weight decay; saved as
      ``sparsepo_mask.pt`` beside the model); ``"shared"``: one learned mask for both;
    * ``"ones"``: m^r = m^kl = 1, which is TDPO1 (:class:`DivkitTDPOTrainer` with
      ``tdpo_variant="tdpo1"``);
    * ``"reward_only"``: m^r = 1, m^kl = 0, which is DPO's sigmoid loss (``DPOTrainer`` with
      ``loss_type="sigmoid"``).

    ``sparsepo_l1_reward``, ``sparsepo_l1_kl`` (the L1 weights, default 0), ``sparsepo_dropout``
    (the mask model's dropout, default 0.1 as the official code), ``sparsepo_mask_model`` (a
    module of your own: called on the list of the reference's per-layer hidden states ``[B, T,
    H]``, returns ``(reward_mask, kl_mask)`` ``[B, T]``). Needs a reference model. Logs TRL's
    reward metrics (rewards ``beta (u - d)`` per response) and ``sparsepo/reward_mask`` and
    ``sparsepo/kl_mask``, the masks' means over the completion tokens."""

    def __init__(
        self,
        *args,
        sparsepo_mask: Optional[str] = None,
        sparsepo_l1_reward: Optional[float] = None,
        sparsepo_l1_kl: Optional[float] = None,
        sparsepo_dropout: Optional[float] = None,
        sparsepo_mask_model: Optional[torch.nn.Module] = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        fn = "DivkitSparsePOTrainer"
        a = self.args
        mode = _setting(a, fn, "sparsepo_mask", sparsepo_mask, "learned")
        self.sparsepo_mask = check.string(fn, "sparsepo_mask", mode, choices=_SPARSEPO_MASKS)
        l1_reward = _setting(a, fn, "sparsepo_l1_reward", sparsepo_l1_reward, 0.0)
        self.sparsepo_l1_reward = check.real(fn, "sparsepo_l1_reward", l1_reward)
        l1_kl = _setting(a, fn, "sparsepo_l1_kl", sparsepo_l1_kl, 0.0)
        self.sparsepo_l1_kl = check.real(fn, "sparsepo_l1_kl", l1_kl)
        sparsepo_dropout = _setting(a, fn, "sparsepo_dropout", sparsepo_dropout, 0.1)
        if self.ref_model is None or self.precompute_ref_logps:
            check.fail(
                fn,
                "SparsePO needs a reference model (ref_model=..., precompute_ref_log_probs=False): "
                "its per-token KL needs the reference's distributions",
            )
        if self.label_smoothing:
            check.fail(fn, "label_smoothing is not part of SparsePO; leave it at 0")
        learned = mode in ("learned", "shared")
        if sparsepo_mask_model is not None and not learned:
            check.fail(
                fn,
                f"sparsepo_mask_model is used with sparsepo_mask 'learned' or 'shared', "
                f"not '{mode}'",
            )
        if learned and sparsepo_mask_model is None:
            from ..preference import SparsePOMask

            cfg = self.ref_model.config.get_text_config()
            sparsepo_mask_model = SparsePOMask(
                cfg.hidden_size,
                cfg.num_hidden_layers,
                dropout=sparsepo_dropout,
                shared=mode == "shared",
            )
        self.sparsepo_mask_model = (
            None if sparsepo_mask_model is None else sparsepo_mask_model.to(self.args.device)
        )

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        mask_model = self.sparsepo_mask_model
        if mask_model is not None and not getattr(self, "_sparsepo_in_optimizer", False):
            params = [p for p in mask_model.parameters() if p.requires_grad]
            if params:
                self.optimizer.add_param_group({"params": params, "weight_decay": 0.0})
            self._sparsepo_in_optimizer = True
        return optimizer

    def _save(self, output_dir=None, state_dict=None):
        super()._save(output_dir, state_dict)
        if self.sparsepo_mask_model is not None:
            import os

            out = output_dir if output_dir is not None else self.args.output_dir
            torch.save(self.sparsepo_mask_model.state_dict(), os.path.join(out, "sparsepo_mask.pt"))

    def _masks(self, ref_layers, like):
        """(chosen reward, rejected reward, chosen KL, rejected KL) masks, or Nones (ones)."""
        if self.sparsepo_mask == "ones":
            return None, None, None, None
        if self.sparsepo_mask == "reward_only":
            zeros = torch.zeros(like.shape[0] // 2, like.shape[1], device=like.device)
            return None, None, zeros, zeros
        self.sparsepo_mask_model.train(self.model.training)
        reward, kl = self.sparsepo_mask_model(list(ref_layers))
        return (*reward.chunk(2), *kl.chunk(2))

    def _compute_loss(self, model, inputs, return_outputs):
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        labels = ids.masked_fill(inputs["completion_mask"] == 0, -100)
        labels = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
        hidden, head = last_hidden_and_head(model, ids, mask)
        learned = self.sparsepo_mask in ("learned", "shared")
        with torch.no_grad():
            decoder = self.ref_model.get_decoder()
            ref_out = decoder(
                input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=learned
            )
            ref_hidden, ref_head = ref_out.last_hidden_state, self.ref_model.get_output_embeddings()
        # The mask model reads the reference's per-layer hidden states (the outputs of the L
        # decoder layers): position t's mask weighs the token that position predicts.
        rwc, rwl, kmc, kml = self._masks(ref_out.hidden_states[1:] if learned else None, labels)
        (hc, hr), (lc, lr), (rc, rr) = hidden.chunk(2), labels.chunk(2), ref_hidden.chunk(2)
        losses, chosen_rewards, rejected_rewards = sparsepo_loss_fused(
            hc,
            hr,
            head.weight,
            lc,
            lr,
            ref_chosen_hidden=rc,
            ref_rejected_hidden=rr,
            ref_weight=ref_head.weight.detach(),
            lm_head_bias=head.bias,
            ref_bias=None if ref_head.bias is None else ref_head.bias.detach(),
            chosen_reward_mask=rwc,
            rejected_reward_mask=rwl,
            chosen_kl_mask=kmc,
            rejected_kl_mask=kml,
            beta=self.beta,
            l1_reward=self.sparsepo_l1_reward,
            l1_kl=self.sparsepo_l1_kl,
        )
        extra = {}
        if learned:
            tokens = (labels != -100).float()
            n = tokens.sum().clamp(min=1)
            extra["sparsepo/reward_mask"] = (torch.cat([rwc, rwl]) * tokens).sum() / n
            extra["sparsepo/kl_mask"] = (torch.cat([kmc, kml]) * tokens).sum() / n
        _log_rewards(self, chosen_rewards, rejected_rewards, extra)
        loss = losses.mean()
        return (loss, None) if return_outputs else loss
