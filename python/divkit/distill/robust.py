"""Label-robust classification losses over C classes: LDR-KL and ALDR-KL, the comp-sum family
(cross-entropy, generalized cross-entropy, MAE) and its smooth adversarial variant. Per-sample
arithmetic in torch (the class dimension is small); differentiable in the logits."""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch
from torch import nn

from .. import _ops
from .. import _validate as check
from . import _common as common
from .kd import row_entropy

__all__ = [
    "ldr_kl_loss",
    "aldr_kl_loss",
    "ALDRKLLoss",
    "comp_sum_loss",
    "generalized_cross_entropy",
    "mae_loss",
    "smooth_adversarial_comp_sum_loss",
]


# ---------------------------------------------------------------------------------------------
# LDR and comp-sum losses (over C classes, torch).
# ---------------------------------------------------------------------------------------------


def _class_logits(fn: str, logits: Any, labels: Any):
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        check.fail(fn, "logits must be a 2-D floating tensor [N, C]")
    n, c = logits.shape
    if (
        not isinstance(labels, torch.Tensor)
        or tuple(labels.shape) != (n,)
        or labels.is_floating_point()
    ):
        check.fail(fn, f"labels must be an integer tensor of shape [{n}]")
    if _ops.ENABLED and _ops.compiling():  # checked when the graph runs
        return logits, _ops.checked_labels_op(labels, c, None, fn), n, c
    if bool(((labels < 0) | (labels >= c)).any()):
        check.fail(fn, f"labels out of range [0, {c})")
    return logits, labels.long(), n, c


def _ldr_margins(logits, labels, margin):
    zy = logits.gather(1, labels[:, None])
    a = logits - zy + margin
    return a.scatter(1, labels[:, None], torch.zeros_like(zy))  # a_y = 0


@check.public("ldr_kl_loss", logits_args=("logits",))
def ldr_kl_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    lam: Union[float, torch.Tensor] = 1.0,
    margin: float = 0.1,
    reduction: str = "mean",
):
    r"""LDR-KL loss (label-distributionally robust, KL-regularized).

    Zhu et al., "Label Distributionally Robust Losses for Multi-class Classification:
    Consistency, Robustness and Adaptivity" (ICML 2023; code
    Optimization-AI/ICML2023_LDR). With a_k = margin 1[k != y] + z_k - z_y::

        loss_i = max_{p in simplex} sum_k p_k a_k - lam KL(p || uniform)
               = lam log( (1/C) sum_k exp(a_k / lam) )

    lam -> 0 is the top-1 SVM-like max_k a_k; lam = 1 and margin = 0 is CE - log C (the
    temperature-scaled CE family for other lam). ``lam`` may be a tensor [N] (per instance).
    """
    fn = "ldr_kl_loss"
    reduction = check.reduction(fn, reduction)
    logits, labels, n, c = _class_logits(fn, logits, labels)
    margin = check.real(fn, "margin", margin, allow_nan=False)
    if isinstance(lam, torch.Tensor) and (lam.numel() > 1 or (lam.dim() == 1 and n == 0)):
        if tuple(lam.shape) != (n,) or bool((lam <= 0).any()):
            check.fail(fn, f"lam must be > 0, a number or a tensor of shape [{n}]")
        lam_t = lam.to(logits.dtype)[:, None]
    else:
        lam_t = check.positive(fn, "lam", lam)
    return common.reduce_samples(_ldr_kl(logits, labels, lam_t, margin, c), reduction)


def _ldr_kl(logits, labels, lam_t, margin: float, c: int) -> torch.Tensor:
    """LDR-KL per sample [N] at lam_t (a number, or [N, 1] of logits' dtype; the caller checked
    the arguments)."""
    a = _ldr_margins(logits, labels, margin)
    per = (torch.logsumexp(a / lam_t, dim=1, keepdim=True) - math.log(c)) * lam_t
    return per[:, 0]


@check.public("aldr_kl_loss", logits_args=("logits",))
def aldr_kl_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float = 2.0,
    lam0: float = 1.0,
    margin: float = 0.1,
    prev_lam: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    return_lam: bool = False,
):
    r"""ALDR-KL: LDR-KL with an adaptive per-instance temperature lam_i.

    Zhu et al. (ICML 2023). Verified against the authors' ``ALDRLoss_V1`` (the ``loss`` module
    that DixianZhu/LDR ``experiment.py`` imports; read from a copy in the public code index,
    the module file itself is not in DixianZhu/LDR's indexed files). Per instance, from the
    lam_i' kept from the previous visit of that instance (``prev_lam``; lam0 on the first
    visit, the official initialization)::

        p      = softmax(z / lam_i'),     KL_i = sum_k p_k log(C p_k) = KL(p || uniform)
        lam_i  = lam0 (1 - KL_i / (alpha log C))                    (no gradient)
        loss_i = lam_i log((1/C) sum_k exp(a_k / lam_i))  -  alpha log C / (2 lam0) (lam_i - lam0)^2
        a_k    = margin 1[k != y] + z_k - z_y

    lam_i is the stationary point in lam of the second line (d/dlam of lam log mean exp(a/lam)
    is -KL(softmax(a/lam) || u)), taken one step per visit with p from the stored lam, as the
    official loss does (and with p from the logits z, without the margin, as there). The
    quadratic term carries no gradient (lam_i is detached); the logits' gradient is LDR-KL's
    at lam_i. Differences from the official code, stated: the KL is computed exactly here
    (the official adds 1e-5 to p before the log), and the official loss first divides the
    logits by their mean absolute value (and applies softplus on CIFAR-100); apply such a
    normalization to ``logits`` before calling if wanted. alpha > 1 (the official comment: "alpha
    > 1.0"; it keeps lam_i >= lam0 (1 - 1/alpha) > 0), lam0 > 0, C >= 2. Returns the loss, and
    lam_i [N] (float64) when ``return_lam``: store it per instance and pass it back as
    ``prev_lam`` on the next visit (:class:`ALDRKLLoss` does this).
    """
    fn = "aldr_kl_loss"
    reduction = check.reduction(fn, reduction)
    logits, labels, n, c = _class_logits(fn, logits, labels)
    alpha = check.real(fn, "alpha", alpha, allow_nan=False)
    if not (check.isfinite(alpha) and alpha > 1):
        check.fail(fn, f"alpha must be finite and > 1, got {alpha:g}")
    lam0 = check.positive(fn, "lam0", lam0)
    margin = check.real(fn, "margin", margin, allow_nan=False)
    if c < 2:
        check.fail(fn, f"logits must have C >= 2 classes, got {c}")
    if prev_lam is None:
        prev = torch.full((n,), lam0, dtype=torch.float64)
    else:
        if not isinstance(prev_lam, torch.Tensor) or tuple(prev_lam.shape) != (n,):
            check.fail(fn, f"prev_lam must be a tensor of shape [{n}]")
        prev = prev_lam.detach().double().reshape(n)
        if _ops.ENABLED and _ops.compiling():  # checked when the graph runs
            msg = "prev_lam must be finite and > 0"
            big = torch.finfo(torch.float64).max  # (0, max]: finite and > 0
            prev = _ops.checked_range_op(prev, 0.0, big, fn, msg, True)
        elif not bool((torch.isfinite(prev) & (prev > 0)).all()):
            check.fail(fn, "prev_lam must be finite and > 0")
    log_c = math.log(c)
    with torch.no_grad():
        # KL(softmax(z / lam') || uniform) = log C - H(softmax(z / lam'))
        kl = log_c - row_entropy(logits.detach().double() / prev[:, None]).double()
        lam = lam0 * (1 - kl / (alpha * log_c))
    if _ops.ENABLED and _ops.compiling():
        # lam > 0 by construction (alpha > 1); as a tensor, without reading it on the host.
        per = _ldr_kl(logits, labels, lam.to(logits.dtype)[:, None], margin, c)
    else:
        per = ldr_kl_loss(
            logits,
            labels,
            lam=lam.to(logits.dtype) if n != 1 else float(lam[0]),
            margin=margin,
            reduction="none",
        )
    per = per - (alpha * log_c / (2 * lam0) * (lam - lam0) ** 2).to(per.dtype)
    out = common.reduce_samples(per, reduction)
    return (out, lam) if return_lam else out


class ALDRKLLoss(nn.Module):
    """:func:`aldr_kl_loss` with the per-instance temperatures kept in a buffer, as the official
    ``ALDRLoss_V1`` keeps them: ``loss_fn(logits, labels, ids)`` with ``ids`` [N] the dataset
    indices of the batch (int64, in [0, num_samples)); the buffer starts at lam0."""

    @check.public("ALDRKLLoss")
    def __init__(
        self,
        num_samples: int,
        *,
        alpha: float = 2.0,
        lam0: float = 1.0,
        margin: float = 0.1,
        reduction: str = "mean",
    ):
        super().__init__()
        num_samples = check.size("ALDRKLLoss", "num_samples", num_samples, max=2**31)
        self.alpha, self.lam0, self.margin, self.reduction = alpha, lam0, margin, reduction
        self.register_buffer("lam", torch.full((num_samples,), float(lam0), dtype=torch.float64))

    @check.public("ALDRKLLoss")
    def forward(self, logits: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor):
        msg = f"ids must be an int64 tensor [N] of indices in [0, {self.lam.numel()})"
        if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64 or ids.dim() != 1:
            check.fail("ALDRKLLoss", msg)
        if _ops.ENABLED and _ops.compiling():  # checked when the graph runs
            ids = _ops.checked_range_op(ids, 0, self.lam.numel() - 1, "ALDRKLLoss", msg)
        elif bool(((ids < 0) | (ids >= self.lam.numel())).any()):
            check.fail("ALDRKLLoss", msg)
        loss, lam = aldr_kl_loss(
            logits,
            labels,
            alpha=self.alpha,
            lam0=self.lam0,
            margin=self.margin,
            prev_lam=self.lam[ids],
            reduction=self.reduction,
            return_lam=True,
        )
        self.lam[ids] = lam.to(self.lam.dtype)
        return loss


@check.public("comp_sum_loss", logits_args=("logits",))
def comp_sum_loss(
    logits: torch.Tensor, labels: torch.Tensor, *, tau: float = 1.0, reduction: str = "mean"
):
    r"""Comp-sum losses Phi^tau (Mao, Mohri, Zhong, "Cross-Entropy Loss Functions: Theoretical
    Analysis and Applications", ICML 2023). With u = sum_{k != y} exp(z_k -
    z_y) = 1/p_y - 1::

        tau = 1:   log(1 + u) = -log p_y                          (cross-entropy / logistic)
        tau != 1:  ((1 + u)^(1 - tau) - 1) / (1 - tau) = (1 - p_y^(tau - 1)) / (tau - 1)
                   tau = 0: sum-exponential u;  tau in (1, 2): generalized cross-entropy with
                   q = tau - 1;  tau = 2: mean absolute error 1 - p_y

    computed from log p_y (log-softmax over C classes) with expm1 for accuracy. tau >= 0.
    """
    return _comp_sum("comp_sum_loss", logits, labels, tau, reduction)


def _comp_sum(fn: str, logits, labels, tau, reduction):
    """comp_sum_loss, its messages naming ``fn`` (also those of a traced call's label check,
    raised when the graph runs, where the public wrapper cannot rename them)."""
    reduction = check.reduction(fn, reduction)
    logits, labels, n, c = _class_logits(fn, logits, labels)
    tau = check.real(fn, "tau", tau, allow_nan=False)
    if not (check.isfinite(tau) and tau >= 0):
        check.fail(fn, f"tau must be finite and >= 0, got {tau:g}")
    lp = torch.log_softmax(logits, dim=1).gather(1, labels[:, None])[:, 0]
    if tau == 1:
        per = -lp
    else:
        per = -torch.expm1((tau - 1) * lp) / (tau - 1)
    return common.reduce_samples(per, reduction)


@check.public("generalized_cross_entropy", logits_args=("logits",))
def generalized_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, *, q: float = 0.7, reduction: str = "mean"
):
    """Generalized cross-entropy (1 - p_y^q) / q, q in (0, 1]: :func:`comp_sum_loss` with
    tau = 1 + q (Zhang & Sabuncu 2018; comp-sum family of Mao et al. 2023)."""
    q = check.real("generalized_cross_entropy", "q", q, allow_nan=False)
    if not 0 < q <= 1:
        check.fail("generalized_cross_entropy", f"q must be in (0, 1], got {q:g}")
    return _comp_sum("generalized_cross_entropy", logits, labels, 1 + q, reduction)


@check.public("mae_loss", logits_args=("logits",))
def mae_loss(logits: torch.Tensor, labels: torch.Tensor, *, reduction: str = "mean"):
    """Mean absolute error 1 - p_y (the comp-sum loss with tau = 2; Mao et al. 2023)."""
    return _comp_sum("mae_loss", logits, labels, 2.0, reduction)


# The penalty ||adv_logits - logits|| has no value at a -inf (masked) logit: finite inputs only.
@check.public("smooth_adversarial_comp_sum_loss", finite_args=("logits", "adv_logits"))
def smooth_adversarial_comp_sum_loss(
    logits: torch.Tensor,
    adv_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    tau: float = 1.0,
    nu: float = 1.0,
    reduction: str = "mean",
):
    r"""Smooth adversarial comp-sum loss (Mao, Mohri, Zhong 2023)::

        loss_i = Phi^tau(z_i, y_i) + nu ||z'_i - z_i||_2

    where z' = h(x') are the logits at an adversarial input x' chosen by the caller (e.g. PGD
    maximizing ||h(x') - h(x)|| in the perturbation ball), as the paper's regularized
    adversarial algorithm. The smooth term's exact form is not verified (no public code found;
    the paper's text beyond its abstract was not readable here). nu >= 0.
    """
    fn = "smooth_adversarial_comp_sum_loss"
    reduction = check.reduction(fn, reduction)
    logits, labels, n, c = _class_logits(fn, logits, labels)
    if not isinstance(adv_logits, torch.Tensor) or adv_logits.shape != logits.shape:
        check.fail(fn, f"adv_logits must be a tensor of shape {tuple(logits.shape)}")
    nu = check.real(fn, "nu", nu, allow_nan=False)
    if not (check.isfinite(nu) and nu >= 0):
        check.fail(fn, f"nu must be finite and >= 0, got {nu:g}")
    per = _comp_sum(fn, logits, labels, tau, "none")
    diff = adv_logits - logits
    # sqrt with a zero-safe gradient (the norm is not differentiable at 0).
    sq = (diff * diff).sum(1)
    norm = torch.where(sq > 0, sq.clamp_min(1e-300).sqrt(), torch.zeros_like(sq))
    per = per + nu * norm
    return common.reduce_samples(per, reduction)
