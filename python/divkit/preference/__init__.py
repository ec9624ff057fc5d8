"""Preference-optimization losses: the DPO family with every TRL loss type, f-DPO, cDPO, WPO,
CPO / SimPO / AlphaPO, ORPO, KTO, D2O, HyPO, SuperHF (:mod:`~divkit.preference.sequence`), and
token-level TDPO and SparsePO (:mod:`~divkit.preference.tokens`; fused with the policy's lm_head
in :mod:`~divkit.preference.fused`). Every name is also here, in ``divkit.preference``.

Names and arguments follow TRL (``DPOTrainer``/``dpo_loss``, ``CPOTrainer.cpo_loss``,
``ORPOTrainer.odds_ratio_loss``, ``KTOTrainer.kto_loss``), so a TRL user switches by changing an
import. The sequence-level arithmetic (losses, rewards and their gradients with respect to the
four log-prob inputs) runs in divkit's C++ core in fp64 with stable forms (log-sigmoid,
softplus, log1mexp, clamped exponents); see ``include/divkit/preference.h``.

Notation: ``l_w = log pi(y_w) - log pi_ref(y_w)``, ``l_l = log pi(y_l) - log pi_ref(y_l)``,
``D = l_w - l_l``; sequence log-probs are sums over completion tokens (labels != -100).
"""

from .fused import sparsepo_loss_fused, tdpo_loss_fused
from .sequence import (
    F_DIVERGENCE_TYPES,
    LOSS_TYPES,
    cpo_loss,
    d2o_loss,
    dpo_loss,
    hypo_loss,
    kto_loss,
    odds_ratio_loss,
    orpo_loss,
    preference_loss,
    preference_metrics,
    sequence_logps,
    simpo_loss,
    superhf_loss,
    wpo_weights,
)
from .tokens import SparsePOMask, sparsepo_loss, tdpo_loss, token_logratio_and_kl

__all__ = [
    "LOSS_TYPES",
    "F_DIVERGENCE_TYPES",
    "preference_loss",
    "dpo_loss",
    "preference_metrics",
    "wpo_weights",
    "cpo_loss",
    "simpo_loss",
    "odds_ratio_loss",
    "orpo_loss",
    "kto_loss",
    "d2o_loss",
    "hypo_loss",
    "superhf_loss",
    "tdpo_loss",
    "sparsepo_loss",
    "SparsePOMask",
    "tdpo_loss_fused",
    "sparsepo_loss_fused",
    "sequence_logps",
    "token_logratio_and_kl",
]
