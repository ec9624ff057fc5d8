r"""Distillation methods from the literature, and the classification, data-selection,
incremental-learning and decoding methods that come with them.

Modules: :mod:`~divkit.distill.kd` (KD losses on logits: BD-KD, NKD, USKD, OFA-KD, DAC-KL,
Swing, MDCS), :mod:`~divkit.distill.features` (ND loss), :mod:`~divkit.distill.robust`
(label-robust classification losses: LDR-KL, ALDR-KL, comp-sum), :mod:`~divkit.distill.selection`
(MiniPLM difference sampling, DDK domain mixing), :mod:`~divkit.distill.incremental` (Weight
Aligning) and :mod:`~divkit.distill.decoding` (USCD). Every name is also here, in
``divkit.distill``.

Every loop over the vocabulary (or class) dimension of a [N, V] tensor runs in divkit's C++
kernels (``include/divkit/distill.h`` and the token-level divergences); what is per sample, per
class or per domain (feature norms, class means, domain weights, document scores, label-robust
losses over C classes) is plain torch.

Directions: ``forward_kl`` = KL(p_teacher || q_student), ``reverse_kl`` = KL(q_student ||
p_teacher). Logits ``[..., V]`` are flattened to ``[N, V]``; ``labels`` ``[...]`` with
``ignore_index`` (-100) mark ignored rows; ``reduction`` is ``none`` | ``sum`` | ``mean`` (over
non-ignored rows) | ``batchmean`` (sum / N). Logits may be float32, bfloat16, float16 or float64
(arithmetic in fp64 in the kernels; the gradient has the logits' dtype).

Where a paper's exact formula is not public, the docstring says "not verified" and states the
choice divkit made; the tests check the properties the method must have.
"""

from .._validate import Error as Error  # divkit.distill.Error, as before the split
from .decoding import USCDLogitsProcessor, USCDResult, uscd_logits
from .features import nd_loss, teacher_class_means
from .incremental import weight_align_, weight_aligning
from .kd import (
    DACKLBounds,
    DACKLLoss,
    bdkd_loss,
    dac_kl_loss,
    dac_kl_mass_bounds,
    mdcs_consistency_loss,
    nkd_loss,
    ofa_loss,
    row_entropy,
    swing_loss,
    swing_noise,
    swing_temperatures,
    uskd_loss,
    uskd_soft_labels,
)
from .robust import (
    ALDRKLLoss,
    aldr_kl_loss,
    comp_sum_loss,
    generalized_cross_entropy,
    ldr_kl_loss,
    mae_loss,
    smooth_adversarial_comp_sum_loss,
)
from .selection import (
    ddk_domain_weights,
    load_document_logprobs,
    miniplm_difference_sampling,
    miniplm_scores,
)

__all__ = [
    "bdkd_loss",
    "nkd_loss",
    "uskd_soft_labels",
    "uskd_loss",
    "ofa_loss",
    "dac_kl_loss",
    "dac_kl_mass_bounds",
    "DACKLBounds",
    "DACKLLoss",
    "swing_temperatures",
    "swing_loss",
    "swing_noise",
    "mdcs_consistency_loss",
    "nd_loss",
    "teacher_class_means",
    "ldr_kl_loss",
    "aldr_kl_loss",
    "ALDRKLLoss",
    "comp_sum_loss",
    "generalized_cross_entropy",
    "mae_loss",
    "smooth_adversarial_comp_sum_loss",
    "miniplm_scores",
    "miniplm_difference_sampling",
    "load_document_logprobs",
    "ddk_domain_weights",
    "weight_aligning",
    "weight_align_",
    "row_entropy",
    "uscd_logits",
    "USCDLogitsProcessor",
    "USCDResult",
]
