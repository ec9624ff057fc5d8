r"""Distillation and decoding methods from the literature (divkit issue 6).

Every loop over the vocabulary (or class) dimension of a [N, V] tensor runs in divkit's C++
kernels (``include/divkit/distill.h`` and the token-level divergences); what is per sample, per
class or per domain (feature norms, class means, domain weights, document scores, label-robust
losses over C classes) is plain torch here.

Directions: ``forward_kl`` = KL(p_teacher || q_student), ``reverse_kl`` = KL(q_student ||
p_teacher). Logits ``[..., V]`` are flattened to ``[N, V]``; ``labels`` ``[...]`` with
``ignore_index`` (-100) mark ignored rows; ``reduction`` is ``none`` | ``sum`` | ``mean`` (over
non-ignored rows) | ``batchmean`` (sum / N). Logits may be float32, bfloat16, float16 or float64
(arithmetic in fp64 in the kernels; the gradient has the logits' dtype).

Where a paper's exact formula is not public, the docstring says "not verified" and states the
choice divkit made; the tests check the properties the method must have.
"""

from __future__ import annotations

import math
import os
from typing import Any, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from . import _C
from .functional import _check_logits, _rows, _type_name, divergence

__all__ = [
    "bdkd_loss", "nkd_loss", "uskd_soft_labels", "uskd_loss", "ofa_loss", "dac_kl_loss",
    "dac_kl_mass_bounds", "DACKLBounds", "DACKLLoss", "swing_temperatures", "swing_loss",
    "swing_noise", "mdcs_consistency_loss", "nd_loss", "teacher_class_means", "ldr_kl_loss",
    "aldr_kl_loss", "ALDRKLLoss", "comp_sum_loss", "generalized_cross_entropy", "mae_loss",
    "smooth_adversarial_comp_sum_loss", "miniplm_scores", "miniplm_difference_sampling",
    "load_document_logprobs", "ddk_domain_weights", "weight_aligning", "weight_align_",
    "row_entropy", "uscd_logits", "USCDLogitsProcessor", "USCDResult",
]

Error = _C.Error
_REDUCTIONS = ("none", "sum", "mean", "batchmean")


# ---------------------------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------------------------


def _real(fn: str, name: str, x: Any) -> float:
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, (int, float, np.floating, np.integer)):
        raise TypeError(f"{fn}: {name} must be a real number, got {_type_name(x)}")
    x = float(x)
    if math.isnan(x):
        raise Error(f"{fn}: {name} must not be nan")
    return x


def _positive(fn: str, name: str, x: Any) -> float:
    x = _real(fn, name, x)
    if not (math.isfinite(x) and x > 0):
        raise Error(f"{fn}: {name} must be finite and > 0, got {x:g}")
    return x


def _reduction(fn: str, reduction: Any) -> str:
    if reduction not in _REDUCTIONS:
        raise Error(f"{fn}: reduction must be one of {', '.join(_REDUCTIONS)}, got {reduction!r}")
    return reduction


def _flat(fn: str, name: str, x: Any) -> Tuple[torch.Tensor, torch.Size, int, int]:
    x = _check_logits(name, x, fn)
    lead = x.shape[:-1]
    v = x.shape[-1]
    n = math.prod(lead)
    return _rows(x, n, v), lead, n, v


def _same_shape(fn: str, name: str, x: torch.Tensor, ref: torch.Tensor, ref_name: str) -> None:
    if tuple(x.shape) != tuple(ref.shape):
        raise Error(f"{fn}: {name} has shape {tuple(x.shape)}, expected {tuple(ref.shape)} (the "
                    f"shape of {ref_name})")


def _labels(fn: str, labels: Any, lead: torch.Size, n: int, required: bool) -> Optional[torch.Tensor]:
    if labels is None:
        if required:
            raise Error(f"{fn}: labels is required")
        return None
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{fn}: labels must be a torch.Tensor, got {_type_name(labels)}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"{fn}: labels must have an integer dtype, got {labels.dtype}")
    if tuple(labels.shape) != tuple(lead):
        raise Error(f"{fn}: labels has shape {tuple(labels.shape)}, expected {tuple(lead)} (the "
                    f"logits' shape without the last dimension)")
    return labels.detach().reshape(n).to(torch.int64).cpu()


def _row_vec(fn: str, name: str, x: Any, lead: torch.Size, n: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {_type_name(x)}")
    if not x.is_floating_point():
        raise TypeError(f"{fn}: {name} must have a floating dtype, got {x.dtype}")
    if tuple(x.shape) != tuple(lead):
        raise Error(f"{fn}: {name} has shape {tuple(x.shape)}, expected {tuple(lead)} (the "
                    f"logits' shape without the last dimension)")
    return x.reshape(n)


def _out_dtype(*xs: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _valid(labels: Optional[torch.Tensor], ignore_index: int, n: int) -> torch.Tensor:
    return torch.ones(n, dtype=torch.bool) if labels is None else labels != ignore_index


def _reduce(per_row: torch.Tensor, valid: torch.Tensor, lead: torch.Size, reduction: str):
    if reduction == "none":
        return per_row.reshape(lead)
    total = per_row.sum()
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        return total / max(per_row.numel(), 1)
    return total / max(int(valid.sum()), 1)


def _grad_like(x: torch.Tensor, need: bool) -> Optional[torch.Tensor]:
    return torch.empty(x.shape, dtype=x.dtype) if need else None


def row_entropy(logits: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """Entropy H(softmax(logits / T)) in nats per row of ``[..., V]`` logits (no gradient),
    computed by divkit's C++ kernel. Returns ``[...]`` float32 (float64 for float64 logits)."""
    fn = "row_entropy"
    x, lead, n, _ = _flat(fn, "logits", logits)
    out = torch.empty(n, dtype=_out_dtype(x))
    _C.row_entropy(x.detach(), _positive(fn, "temperature", temperature), out)
    return out.reshape(lead)


# ---------------------------------------------------------------------------------------------
# BD-KD.
# ---------------------------------------------------------------------------------------------


def bdkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
              temperature: float = 1.0, gap_scale: float = 1.0, labels: Optional[torch.Tensor] = None,
              ignore_index: int = -100, reduction: str = "mean", return_weights: bool = False):
    r"""BD-KD: per-sample balance of forward and reverse KL from the entropy gap.

    Amara et al., "BD-KD: Balancing the Divergences for Online Knowledge Distillation"
    (arXiv 2212.12965). With p = softmax(t / T) (teacher), q = softmax(s / T) (student) and the
    entropies H_s = H(q), H_t = H(p) of each row (no gradient through them)::

        w_i    = sigmoid((H_s - H_t) / gap_scale)        (gap_scale = 0: the step 1[H_s > H_t],
                                                          0.5 on a tie)
        loss_i = (1 - w_i) KL(p || q) + w_i KL(q || p)    (forward_kl + reverse_kl)

    The exact weights of the paper are not public (not verified: no official or public
    reimplementation code found; the arXiv v2 text was not readable). divkit's reading of "shift the
    focus to the student": a student less confident than the teacher (H_s > H_t) is pushed by
    the mode-seeking reverse KL, a student more confident than the teacher by the mass-covering
    forward KL. w_i lies in [0, 1]; w = 0 is forward KL and w = 1 reverse KL exactly. Gradients
    flow to the student and, when it requires grad (online KD), to the teacher, through divkit's
    fused divergence kernels (reduction='none' per token). Returns the reduced loss, and the
    weights ``[...]`` when ``return_weights``.
    """
    fn = "bdkd_loss"
    reduction = _reduction(fn, reduction)
    gap_scale = _real(fn, "gap_scale", gap_scale)
    if not (math.isfinite(gap_scale) and gap_scale >= 0):
        raise Error(f"{fn}: gap_scale must be finite and >= 0, got {gap_scale:g}")
    s = _check_logits("student_logits", student_logits, fn)
    t = _check_logits("teacher_logits", teacher_logits, fn)
    _same_shape(fn, "teacher_logits", t, s, "student_logits")
    temperature = _positive(fn, "temperature", temperature)
    lead = s.shape[:-1]
    n = math.prod(lead)
    lab = _labels(fn, labels, lead, n, False)
    h_s = row_entropy(s, temperature=temperature).reshape(n).double()
    h_t = row_entropy(t, temperature=temperature).reshape(n).double()
    gap = h_s - h_t
    if gap_scale == 0:
        w = (gap > 0).double() + 0.5 * (gap == 0).double()
    else:
        w = torch.sigmoid(gap / gap_scale)
    kw = dict(temperature=temperature, labels=labels, ignore_index=ignore_index, reduction="none")
    fkl = divergence(s, t, "forward_kl", **kw).reshape(n)
    rkl = divergence(s, t, "reverse_kl", **kw).reshape(n)
    w = w.to(fkl.dtype)
    valid = _valid(lab, ignore_index, n)
    w = torch.where(valid, w, torch.zeros_like(w))
    per_row = (1 - w) * fkl + w * rkl
    loss = _reduce(per_row, valid, lead, reduction)
    return (loss, w.reshape(lead)) if return_weights else loss


# ---------------------------------------------------------------------------------------------
# NKD and USKD.
# ---------------------------------------------------------------------------------------------


class _NKDFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, labels, ignore_index, tau, dtype):
        n = student.shape[0]
        target = torch.empty(n, dtype=dtype)
        nontarget = torch.empty(n, dtype=dtype)
        _C.nkd_rows(student.detach(), teacher.detach(), labels, ignore_index, tau, target,
                    nontarget, None, None, None)
        ctx.save_for_backward(student, teacher, labels)
        ctx.args = (ignore_index, tau, dtype)
        return target, nontarget

    @staticmethod
    def backward(ctx, g_target, g_nontarget):
        student, teacher, labels = ctx.saved_tensors
        ignore_index, tau, dtype = ctx.args
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        n = student.shape[0]
        a = torch.zeros(n, dtype=dtype) if g_target is None else g_target.to(dtype).contiguous()
        b = torch.zeros(n, dtype=dtype) if g_nontarget is None else g_nontarget.to(dtype).contiguous()
        grad = torch.empty(student.shape, dtype=student.dtype)
        _C.nkd_rows(student.detach(), teacher.detach(), labels, ignore_index, tau,
                    torch.empty(n, dtype=dtype), torch.empty(n, dtype=dtype), a, b, grad)
        return grad, None, None, None, None, None


def _nkd_terms(fn, student_logits, teacher_logits, labels, temperature, ignore_index):
    s, lead, n, _ = _flat(fn, "student_logits", student_logits)
    t = _check_logits("teacher_logits", teacher_logits, fn)
    _same_shape(fn, "teacher_logits", t, student_logits, "student_logits")
    t = _rows(t, n, s.shape[1])
    if t.requires_grad and torch.is_grad_enabled():
        raise Error(f"{fn}: teacher_logits requires grad, but the teacher is detached in NKD; "
                    f"pass teacher_logits.detach()")
    lab = _labels(fn, labels, lead, n, True)
    tau = _positive(fn, "temperature", temperature)
    target, nontarget = _NKDFunction.apply(s, t, lab, int(ignore_index), tau, _out_dtype(s, t))
    return target, nontarget, lab, lead, n, tau


def nkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
             temperature: float = 1.0, gamma: float = 1.5, ignore_index: int = -100,
             reduction: str = "mean"):
    r"""NKD, normalized knowledge distillation.

    Yang et al., "From Knowledge Distillation to Self-Knowledge Distillation: A Unified Approach
    with Normalized Loss and Customized Soft Labels" (ICCV 2023; code
    yzd-v/cls_KD nkd.py). With y the label, p = softmax(t), q = softmax(s) at T = 1 for the
    target, and the non-target distributions renormalized over j != y at temperature tau::

        loss_i = -p_y log q_y  -  gamma tau^2 sum_{j != y} p^_j log q^_j
        p^ = softmax_{j != y}(t / tau),   q^ = softmax_{j != y}(s / tau)

    (cross-entropy form, as nkd.py; it differs from KL(p^ || q^) by the teacher's non-target
    entropy, a constant). gamma = 0 leaves the target term. The teacher is detached (it must not
    require grad); defaults tau = 1, gamma = 1.5 (the paper's ImageNet setting). Both terms and
    the student gradient are computed in one C++ pass per row (``include/divkit/distill.h``).
    """
    fn = "nkd_loss"
    reduction = _reduction(fn, reduction)
    gamma = _real(fn, "gamma", gamma)
    if not (math.isfinite(gamma) and gamma >= 0):
        raise Error(f"{fn}: gamma must be finite and >= 0, got {gamma:g}")
    target, nontarget, lab, lead, n, tau = _nkd_terms(fn, student_logits, teacher_logits, labels,
                                                     temperature, ignore_index)
    per_row = target + (gamma * tau * tau) * nontarget
    return _reduce(per_row, _valid(lab, ignore_index, n), lead, reduction)


def uskd_soft_labels(student_logits: torch.Tensor, labels: torch.Tensor,
                     weak_logits: torch.Tensor, *, ignore_index: int = -100):
    r"""USKD's customized soft labels, without a teacher.

    Yang et al., "From Knowledge Distillation to Self-Knowledge Distillation: A Unified
    Approach with Normalized Loss and Customized Soft Labels" (ICCV 2023; USKD). Verified
    against the official code (yzd-v/cls_KD, ``mmcls/models/dis_losses/uskd.py`` and
    ``mmcls/distillation/losses/uskd.py``, ``USKDLoss.forward``, hard labels). With
    q = softmax(s) the student's final output and w = softmax(weak_logits) the output of the
    classifier on the intermediate feature (``fc(fea_mid)`` there), returns ``(target,
    nontarget)``, both without gradient:

    * ``target`` ``[...]``: t_y = q_y^2 - mean_batch(q_y^2) + 1 (the squared target
      probability, shifted so that its batch mean over non-ignored rows is 1; not clamped).
    * ``nontarget`` ``[..., C]``: Zipf labels. Every class j (the label included) is scored
      r_j = w_j / (1 - w_y + 1e-6) + log q_j / (1 - log q_y + 1e-6), the classes are ranked by
      decreasing r (rank k = 1, 2, ... over all C classes), class j gets 1 / k_j, then the
      label's entry is dropped and the rest renormalized to sum 1. The official code computes
      the second term from the student's *log*-probabilities (its ``s_i`` is reassigned to
      ``log_softmax`` before the rank); divkit follows the released code.

    Ignored rows are all zero. Class-count-sized arithmetic (a sort over C classes) in torch.
    """
    fn = "uskd_soft_labels"
    s = _check_logits("student_logits", student_logits, fn)
    wk = _check_logits("weak_logits", weak_logits, fn)
    _same_shape(fn, "weak_logits", wk, s, "student_logits")
    lead = s.shape[:-1]
    c = s.shape[-1]
    n = math.prod(lead)
    lab = _labels(fn, labels, lead, n, True)
    valid = lab != ignore_index
    if bool(((lab < 0) | (lab >= c))[valid].any()):
        raise Error(f"{fn}: labels out of range [0, {c}) (and not ignore_index)")
    safe = torch.where(valid, lab, torch.zeros_like(lab))
    with torch.no_grad():
        lq = torch.log_softmax(s.detach().reshape(n, c).double(), -1)
        lqy = lq.gather(1, safe[:, None])
        qy2 = lqy[:, 0].exp() ** 2
        mean = qy2[valid].mean() if bool(valid.any()) else qy2.new_zeros(())
        target = qy2 - mean + 1.0
        w = torch.softmax(wk.detach().reshape(n, c).double(), -1)
        wy = w.gather(1, safe[:, None])
        score = w / (1 - wy + 1e-6) + lq / (1 - lqy + 1e-6)
        order = score.argsort(dim=1, descending=True, stable=True)
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(1, c + 1).expand(n, c).contiguous())
        z = 1.0 / ranks.double()
        z.scatter_(1, safe[:, None], 0.0)
        z = z / z.sum(1, keepdim=True).clamp_min(1e-300)
        target = torch.where(valid, target, torch.zeros_like(target))
        z = torch.where(valid[:, None], z, torch.zeros_like(z))
    dt = _out_dtype(s)
    return target.to(dt).reshape(lead), z.to(dt).reshape(s.shape)


def uskd_loss(student_logits: torch.Tensor, labels: torch.Tensor, weak_logits: torch.Tensor, *,
              alpha: float = 1.0, beta: float = 0.1, mu: float = 0.005,
              ignore_index: int = -100, reduction: str = "mean"):
    r"""USKD: self-knowledge distillation with customized soft labels (no teacher).

    Yang et al. (ICCV 2023). Verified against the official ``USKDLoss`` (yzd-v/cls_KD,
    ``mmcls/models/dis_losses/uskd.py``; defaults alpha 1.0, beta 0.1, mu 0.005). With
    (t_y, z) = :func:`uskd_soft_labels` (no gradient), q = softmax(s), q^ the student's
    softmax over the non-target classes and w = softmax(weak_logits)::

        loss_i = alpha (-t_y log q_y)  +  beta (-sum_{j != y} z_j log q^_j)
                 + mu (-sum_j e_j log w_j),     e = 0.9 onehot(y) + 0.1 / C

    The last term is the official "weak supervision" of the intermediate classifier (label
    smoothing 0.1); it is the only one that reaches ``weak_logits`` (mu = 0 drops it). Pass
    the intermediate classifier's logits (``fc(features)``, an ``nn.Linear`` the caller owns).
    Hard labels only (the official mixup / soft-label branch is not implemented). The target
    and non-target terms are NKD's C++ kernel (with a teacher whose target probability is 1/2
    and whose non-target softmax is z, scaled by 2 t_y); the weak term is divkit's
    ``cross_entropy`` divergence kernel.
    """
    fn = "uskd_loss"
    reduction = _reduction(fn, reduction)
    alpha = _real(fn, "alpha", alpha)
    beta = _real(fn, "beta", beta)
    mu = _real(fn, "mu", mu)
    for name, x in (("alpha", alpha), ("beta", beta), ("mu", mu)):
        if not (math.isfinite(x) and x >= 0):
            raise Error(f"{fn}: {name} must be finite and >= 0, got {x:g}")
    s = _check_logits("student_logits", student_logits, fn)
    target, z = uskd_soft_labels(s, labels, weak_logits, ignore_index=ignore_index)
    lead = s.shape[:-1]
    c = s.shape[-1]
    n = math.prod(lead)
    lab = _labels(fn, labels, lead, n, True)
    valid = lab != ignore_index
    safe = torch.where(valid, lab, torch.zeros_like(lab))
    with torch.no_grad():
        # Teacher logits for NKD's kernel: log z off the label (its non-target softmax is z)
        # and, at the label, log sum z = 0, so that its T = 1 target probability is 1/2.
        tl = z.reshape(n, c).double().clamp_min(1e-300).log()
        tl.scatter_(1, safe[:, None], 0.0)
        tl = torch.where(valid[:, None], tl, torch.zeros_like(tl))
    tgt, nontarget, lab, lead, n, _ = _nkd_terms(fn, s, tl.reshape(s.shape).to(_out_dtype(s)),
                                                labels, 1.0, ignore_index)
    scale = (2.0 * target.reshape(n)).to(tgt.dtype)
    per_row = alpha * scale * tgt + beta * nontarget
    if mu > 0:
        with torch.no_grad():
            e = _smoothed_one_hot(safe, c, 0.1).to(_out_dtype(s))
        wk = weak_logits.reshape(n, c)
        weak = divergence(wk, e.log(), "cross_entropy", labels=lab, ignore_index=ignore_index,
                          reduction="none").reshape(n)
        per_row = per_row + mu * weak.to(per_row.dtype)
    return _reduce(per_row, valid, lead, reduction)


def _smoothed_one_hot(labels: torch.Tensor, c: int, eps: float) -> torch.Tensor:
    """(1 - eps) onehot(labels) + eps / C, float64 [N, C] (USKD's weak-supervision target)."""
    e = torch.full((labels.numel(), c), eps / c, dtype=torch.float64)
    e.scatter_add_(1, labels.reshape(-1, 1), torch.full((labels.numel(), 1), 1.0 - eps,
                                                         dtype=torch.float64))
    return e


# ---------------------------------------------------------------------------------------------
# OFA-KD.
# ---------------------------------------------------------------------------------------------


class _RowLossFunction(torch.autograd.Function):
    """A per-row loss from a C++ kernel `run(student, out, coef, grad)`; backward recomputes
    with coef = the upstream gradient (so that no [N, V] buffer is kept between passes)."""

    @staticmethod
    def forward(ctx, student, run, dtype):
        out = torch.empty(student.shape[0], dtype=dtype)
        run(student.detach(), out, None, None)
        ctx.save_for_backward(student)
        ctx.run, ctx.dtype = run, dtype
        return out

    @staticmethod
    def backward(ctx, g):
        (student,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        grad = torch.empty(student.shape, dtype=student.dtype)
        ctx.run(student.detach(), torch.empty(student.shape[0], dtype=ctx.dtype),
                g.to(ctx.dtype).contiguous(), grad)
        return grad, None, None


def _detached_teacher(fn: str, teacher: torch.Tensor, student: torch.Tensor, n: int, v: int):
    t = _check_logits("teacher_logits", teacher, fn)
    _same_shape(fn, "teacher_logits", t, student, "student_logits")
    if t.requires_grad and torch.is_grad_enabled():
        raise Error(f"{fn}: teacher_logits requires grad, but this loss treats the teacher as "
                    f"fixed; pass teacher_logits.detach()")
    return _rows(t.detach(), n, v)


def ofa_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
             eps: float = 1.0, temperature: float = 1.0, ignore_index: int = -100,
             reduction: str = "mean"):
    r"""OFA-KD's adaptive target enhancement in logit space.

    Hao et al., "One-for-All: Bridge the Gap Between Heterogeneous Architectures in Knowledge
    Distillation" (NeurIPS 2023). Verified against the official ``ofa_loss`` (Hao840/OFAKD,
    ``distillers/ofa.py``). With
    p = softmax(t / T) (teacher, fixed), q = softmax(s / T) (student), e the one-hot label::

        w_j = (p_j + e_j)^eps - e_j,      loss_i = -sum_j w_j log q_j

    eps = 1 is the soft cross-entropy H(p, q) (= forward KL + the teacher entropy); eps > 1
    enhances the target class relative to the others, the more so the more confident the
    teacher is. ``mean`` averages over non-ignored rows as the paper's ``loss.mean()``. The
    per-row loss and gradient come from one C++ pass (``include/divkit/distill.h``).
    """
    fn = "ofa_loss"
    reduction = _reduction(fn, reduction)
    s, lead, n, v = _flat(fn, "student_logits", student_logits)
    t = _detached_teacher(fn, teacher_logits, student_logits, n, v)
    lab = _labels(fn, labels, lead, n, True)
    eps = _positive(fn, "eps", eps)
    temperature = _positive(fn, "temperature", temperature)
    ii = int(ignore_index)

    def run(student, out, coef, grad):
        _C.ofa_rows(student, t, lab, ii, eps, temperature, out, coef, grad)

    per_row = _RowLossFunction.apply(s, run, _out_dtype(s, t))
    return _reduce(per_row, _valid(lab, ii, n), lead, reduction)


# ---------------------------------------------------------------------------------------------
# DAC-KL.
# ---------------------------------------------------------------------------------------------


class _ClippedKLFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, lower, upper, teacher, labels, ignore_index, temperature, sharpness,
                dtype):
        out = torch.empty(student.shape[0], dtype=dtype)
        _C.clipped_kl_rows(student.detach(), teacher, lower.detach(), upper.detach(), temperature,
                           sharpness, labels, ignore_index, out, None, None, None, None)
        ctx.save_for_backward(student, lower, upper)
        ctx.args = (teacher, labels, ignore_index, temperature, sharpness, dtype)
        return out

    @staticmethod
    def backward(ctx, g):
        student, lower, upper = ctx.saved_tensors
        teacher, labels, ignore_index, temperature, sharpness, dtype = ctx.args
        need_s, need_lo, need_hi = ctx.needs_input_grad[:3]
        n = student.shape[0]
        grad = torch.empty(student.shape, dtype=student.dtype) if need_s else None
        g_lo = torch.empty(n, dtype=dtype) if need_lo else None
        g_hi = torch.empty(n, dtype=dtype) if need_hi else None
        _C.clipped_kl_rows(student.detach(), teacher, lower.detach(), upper.detach(), temperature,
                           sharpness, labels, ignore_index, torch.empty(n, dtype=dtype),
                           g.to(dtype).contiguous(), grad, g_lo, g_hi)
        if g_lo is not None:
            g_lo = g_lo.to(lower.dtype)
        if g_hi is not None:
            g_hi = g_hi.to(upper.dtype)
        return grad, g_lo, g_hi, None, None, None, None, None, None


def dac_kl_mass_bounds(teacher_logits: torch.Tensor, *, mass_lo: float = 0.0,
                       mass_hi: float = 0.9, temperature: float = 1.0):
    r"""Quantile bounds of the teacher's high-density region for :func:`dac_kl_loss`.

    Sort p = softmax(t / T) decreasingly; token k is in the region when the mass before it,
    c_k = sum_{m < k} p_(m), satisfies mass_lo <= c_k < mass_hi. Returns ``(lower, upper)``
    ``[...]``: the smallest and the largest kept probability (no gradient). mass_lo = 0,
    mass_hi = 0.9 keeps the 90% nucleus; mass_lo > 0 also clips the dominant tokens. Sorting in
    C++ (``mass_bounds`` in ``include/divkit/distill.h``).
    """
    fn = "dac_kl_mass_bounds"
    t, lead, n, _ = _flat(fn, "teacher_logits", teacher_logits)
    lo = torch.empty(n, dtype=_out_dtype(t))
    hi = torch.empty(n, dtype=_out_dtype(t))
    _C.mass_bounds(t.detach(), _positive(fn, "temperature", temperature),
                   _real(fn, "mass_lo", mass_lo), _real(fn, "mass_hi", mass_hi), lo, hi)
    return lo.reshape(lead), hi.reshape(lead)


def dac_kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                lower: Optional[torch.Tensor] = None, upper: Optional[torch.Tensor] = None, *,
                mass_lo: float = 0.0, mass_hi: float = 0.9, temperature: float = 1.0,
                sharpness: float = 0.0, labels: Optional[torch.Tensor] = None,
                ignore_index: int = -100, reduction: str = "mean"):
    r"""DAC-KL-style distribution-adaptive clipping: forward KL on the teacher's high-density
    region.

    Liu et al., "Multi-Granularity Semantic Revision for Large Language Model Distillation".
    The paper's equations are not public (not verified: no official or public code found);
    divkit implements
    its description. With p = softmax(t / T) (teacher, fixed) and q = softmax(s / T) (student),
    a mask over the vocabulary from per-row bounds 0 < lower < upper in probability space::

        hard (sharpness = 0): w_j = 1[lower <= p_j <= upper]
        soft (sharpness > 0): w_j = sigmoid((log p_j - log lower) / sharpness)
                                    * sigmoid((log upper - log p_j) / sharpness)
        p~ = w p / sum(w p),  q~ = w q / sum(w q),   loss_i = KL(p~ || q~)

    The bounds come either from quantiles of the teacher (``lower = upper = None``:
    :func:`dac_kl_mass_bounds` with ``mass_lo``, ``mass_hi``) or from a module that predicts
    them (:class:`DACKLBounds`); with a soft mask the loss is differentiable in the bounds, so
    that module learns. A row whose region holds no teacher mass contributes 0. All [N, V] work
    runs in C++ (``clipped_kl_rows``).
    """
    fn = "dac_kl_loss"
    reduction = _reduction(fn, reduction)
    s, lead, n, v = _flat(fn, "student_logits", student_logits)
    t = _detached_teacher(fn, teacher_logits, student_logits, n, v)
    lab = _labels(fn, labels, lead, n, False)
    temperature = _positive(fn, "temperature", temperature)
    sharpness = _real(fn, "sharpness", sharpness)
    if (lower is None) != (upper is None):
        raise Error(f"{fn}: give both lower and upper, or neither (quantile bounds)")
    if lower is None:
        lower, upper = dac_kl_mass_bounds(t, mass_lo=mass_lo, mass_hi=mass_hi,
                                          temperature=temperature)
    lo = _row_vec(fn, "lower", lower, lead, n)
    hi = _row_vec(fn, "upper", upper, lead, n)
    per_row = _ClippedKLFunction.apply(s, lo, hi, t, lab, int(ignore_index), temperature,
                                       sharpness, _out_dtype(s, t))
    return _reduce(per_row, _valid(lab, ignore_index, n), lead, reduction)


class DACKLBounds(nn.Module):
    r"""DAC-KL's small learnable module: teacher's sorted top-k probabilities -> region bounds.

    Input features: the k largest probabilities of softmax(t / T) per row (computed in C++),
    divided by the largest. A two-layer MLP gives (u_lo, u_hi) and::

        upper = p_max * 2 sigmoid(u_hi),   lower = upper * sigmoid(u_lo)

    so 0 < lower < upper always, and upper < p_max clips the dominant tokens. Initialized near
    upper = 1.05 p_max, lower = 1e-3 upper. The architecture is not given in the paper's
    abstract (not verified). Use with ``dac_kl_loss(..., lower, upper, sharpness > 0)`` (see
    :class:`DACKLLoss`).
    """

    def __init__(self, k: int = 32, hidden: int = 64):
        super().__init__()
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise Error(f"DACKLBounds: k must be an int >= 1, got {k!r}")
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise Error(f"DACKLBounds: hidden must be an int >= 1, got {hidden!r}")
        self.k = k
        self.net = nn.Sequential(nn.Linear(k, hidden), nn.ReLU(), nn.Linear(hidden, 2))
        with torch.no_grad():
            self.net[2].weight.mul_(0.01)
            self.net[2].bias.copy_(torch.tensor([math.log(1e-3 / (1 - 1e-3)),
                                                 math.log(0.525 / 0.475)]))

    def forward(self, teacher_logits: torch.Tensor, temperature: float = 1.0):
        fn = "DACKLBounds"
        t, lead, n, _ = _flat(fn, "teacher_logits", teacher_logits)
        w = self.net[0].weight
        feats = torch.empty(n, self.k, dtype=torch.float64 if w.dtype == torch.float64 else
                            torch.float32)
        _C.sorted_probs(t.detach(), _positive(fn, "temperature", temperature), feats)
        p_max = feats[:, :1].clamp_min(1e-300)
        u = self.net((feats / p_max).to(w.dtype))
        upper = p_max.to(w.dtype)[:, 0] * 2 * torch.sigmoid(u[:, 1])
        lower = upper * torch.sigmoid(u[:, 0])
        return lower.reshape(lead), upper.reshape(lead)


class DACKLLoss(nn.Module):
    """:func:`dac_kl_loss` with learnable bounds (:class:`DACKLBounds`) and a soft mask."""

    def __init__(self, k: int = 32, hidden: int = 64, *, temperature: float = 1.0,
                 sharpness: float = 0.5, reduction: str = "mean", ignore_index: int = -100):
        super().__init__()
        self.bounds = DACKLBounds(k, hidden)
        self.temperature, self.sharpness = temperature, sharpness
        self.reduction, self.ignore_index = reduction, ignore_index

    def forward(self, student_logits, teacher_logits, labels=None):
        lower, upper = self.bounds(teacher_logits, self.temperature)
        return dac_kl_loss(student_logits, teacher_logits, lower, upper,
                           temperature=self.temperature, sharpness=self.sharpness, labels=labels,
                           ignore_index=self.ignore_index, reduction=self.reduction)


# ---------------------------------------------------------------------------------------------
# Swing distillation.
# ---------------------------------------------------------------------------------------------


def swing_temperatures(privacy_scores: torch.Tensor, *, t_min: float = 1.0,
                       t_max: float = 4.0) -> torch.Tensor:
    r"""Swing distillation's per-token temperatures: T_i = t_min + (t_max - t_min) * score_i for
    privacy scores in [0, 1] (the likelihood that the token is private: a private token gets a
    flatter teacher). The paper's mapping is not public (not verified; linear here)."""
    fn = "swing_temperatures"
    if not isinstance(privacy_scores, torch.Tensor) or not privacy_scores.is_floating_point():
        raise TypeError(f"{fn}: privacy_scores must be a floating torch.Tensor, got "
                        f"{_type_name(privacy_scores)}")
    t_min = _positive(fn, "t_min", t_min)
    t_max = _positive(fn, "t_max", t_max)
    if t_max < t_min:
        raise Error(f"{fn}: t_max ({t_max:g}) must be >= t_min ({t_min:g})")
    sc = privacy_scores.detach()
    if bool(((sc < 0) | (sc > 1) | sc.isnan()).any()):
        raise Error(f"{fn}: privacy_scores must lie in [0, 1]")
    return t_min + (t_max - t_min) * sc


def swing_noise(seed: int, shape: Sequence[int], *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The standard normal noise eps [N, V] that :func:`swing_loss` adds (times noise_std) to
    the tempered teacher logits with this seed (counter-based: the same for any thread count)."""
    shape = tuple(int(d) for d in shape)
    if len(shape) < 1:
        raise Error("swing_noise: shape must have at least one dimension")
    v = shape[-1]
    n = math.prod(shape[:-1])
    out = torch.empty(n, v, dtype=dtype)
    _C.swing_noise(int(seed) & 0xFFFFFFFFFFFFFFFF, out)
    return out.reshape(shape)


def swing_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
               privacy_scores: Optional[torch.Tensor] = None, *,
               temperatures: Optional[torch.Tensor] = None, t_min: float = 1.0,
               t_max: float = 4.0, noise_std: float = 0.0, seed: int = 0,
               labels: Optional[torch.Tensor] = None, ignore_index: int = -100,
               reduction: str = "mean", scale_by_t_squared: bool = False):
    r"""Swing distillation: per-token temperatures from a privacy score, noisy soft targets.

    Li et al., "Swing Distillation: A Privacy-Preserving Knowledge Distillation Framework".
    With T_i from :func:`swing_temperatures` (or given ``temperatures``)::

        p = softmax(t / T_i + noise_std * eps_i),  q = softmax(s / T_i),
        loss_i = KL(p || q)     (forward KL, teacher || student; times T_i^2 if asked)

    eps = :func:`swing_noise` (seed) is seeded standard normal noise on the tempered teacher
    logits, so the noisy soft target stays a distribution. The paper's noise mechanism is not
    public (not verified: Gaussian in logit space here). The teacher is fixed. One C++ pass per
    row (``tempered_kl_rows``).
    """
    fn = "swing_loss"
    reduction = _reduction(fn, reduction)
    s, lead, n, v = _flat(fn, "student_logits", student_logits)
    t = _detached_teacher(fn, teacher_logits, student_logits, n, v)
    lab = _labels(fn, labels, lead, n, False)
    if (privacy_scores is None) == (temperatures is None):
        raise Error(f"{fn}: give exactly one of privacy_scores and temperatures")
    if temperatures is None:
        temperatures = swing_temperatures(_row_vec(fn, "privacy_scores", privacy_scores, lead, n),
                                          t_min=t_min, t_max=t_max)
    temps = _row_vec(fn, "temperatures", temperatures, lead, n).detach().double().contiguous()
    noise_std = _real(fn, "noise_std", noise_std)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{fn}: seed must be an int, got {_type_name(seed)}")
    seed_u = seed & 0xFFFFFFFFFFFFFFFF
    ii = int(ignore_index)

    def run(student, out, coef, grad):
        _C.tempered_kl_rows(student, t, temps, noise_std, seed_u, lab, ii, out, coef, grad)

    per_row = _RowLossFunction.apply(s, run, _out_dtype(s, t))
    if scale_by_t_squared:
        per_row = per_row * (temps * temps).to(per_row.dtype)
    return _reduce(per_row, _valid(lab, ii, n), lead, reduction)


# ---------------------------------------------------------------------------------------------
# MDCS consistency self-distillation.
# ---------------------------------------------------------------------------------------------


def mdcs_consistency_loss(strong_logits: torch.Tensor, weak_logits: torch.Tensor,
                          labels: torch.Tensor, *, temperature: float = 1.0,
                          ignore_index: int = -100, reduction: str = "mean",
                          return_mask: bool = False):
    r"""MDCS consistency self-distillation with confident-instance sampling (CIS).

    Zhao et al., "MDCS: More Diverse Experts with Consistency Self-distillation for Long-tailed
    Recognition" (ICCV 2023). Verified against the official ``MDCSLoss.forward`` (fistyee/MDCS,
    ``model/loss.py``): per expert, the weakly augmented view is the teacher (detached), the
    strongly augmented one the student::

        loss_i = m_i T^2 KL(softmax(weak / T) || softmax(strong / T))    (forward KL)
        m_i    = 1[argmax weak_i == y_i]        (only correctly classified instances)

    ``mean`` averages over the selected instances (0 when none is selected), as the official
    ``F.kl_div(..., reduction='batchmean')`` on the selected rows. The official loss calls this
    once per expert on the expert's logit-adjusted outputs and sums the experts' terms (T = 1,
    weight 0.6, warm-up min(epoch / 20, 1)); those are the caller's: call once per expert and
    add. The KL and its gradient are divkit's fused divergence kernel.
    """
    fn = "mdcs_consistency_loss"
    reduction = _reduction(fn, reduction)
    s = _check_logits("strong_logits", strong_logits, fn)
    w = _check_logits("weak_logits", weak_logits, fn)
    _same_shape(fn, "weak_logits", w, s, "strong_logits")
    lead = s.shape[:-1]
    n = math.prod(lead)
    lab = _labels(fn, labels, lead, n, True)
    temperature = _positive(fn, "temperature", temperature)
    with torch.no_grad():
        pred = w.detach().reshape(n, -1).argmax(-1)
        mask = (pred == lab) & (lab != ignore_index)
        cis_labels = torch.where(mask, lab, torch.full_like(lab, ignore_index))
    red = "mean" if reduction == "mean" else ("sum" if reduction in ("sum", "batchmean") else "none")
    loss = divergence(s, w.detach(), "forward_kl", temperature=temperature,
                      labels=cis_labels.reshape(lead), ignore_index=ignore_index, reduction=red)
    if reduction == "batchmean":
        loss = loss / max(n, 1)
    loss = loss * (temperature * temperature)
    return (loss, mask.reshape(lead)) if return_mask else loss


# ---------------------------------------------------------------------------------------------
# ND loss.
# ---------------------------------------------------------------------------------------------


def teacher_class_means(features: torch.Tensor, labels: torch.Tensor,
                        num_classes: int) -> torch.Tensor:
    """Class means of (teacher) features ``[N, D]`` with labels ``[N]``: ``[num_classes, D]``
    (zero for a class with no sample). Computed once over the training set for ND loss."""
    fn = "teacher_class_means"
    if not isinstance(features, torch.Tensor) or features.dim() != 2:
        raise Error(f"{fn}: features must be a 2-D tensor [N, D]")
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != (features.shape[0],):
        raise Error(f"{fn}: labels must be a tensor of shape [{features.shape[0]}]")
    if bool(((labels < 0) | (labels >= num_classes)).any()):
        raise Error(f"{fn}: labels out of range [0, {num_classes})")
    f = features.detach()
    sums = torch.zeros(num_classes, f.shape[1], dtype=f.dtype).index_add_(0, labels, f)
    counts = torch.bincount(labels, minlength=num_classes).to(f.dtype).clamp_min(1)
    return sums / counts[:, None]


def nd_loss(student_features: torch.Tensor, teacher_features: torch.Tensor,
            labels: torch.Tensor, class_means: torch.Tensor, *, reduction: str = "mean"):
    r"""ND loss: student feature norm and direction toward the teacher's class means.

    Wang et al., "Improving Knowledge Distillation via Regularizing Feature Norm and Direction".
    Verified against the official ``DirectNormLoss`` (WangYZ1608/Knowledge-Distillation-via-ND,
    ``CIFAR/utils.py``, ``project_center``). With e_y = mu_y / ||mu_y|| the unit direction of
    the teacher's class mean of the label (the official ``center_emb_train.json`` holds the
    teacher's per-class mean embeddings on the training set: :func:`teacher_class_means`)::

        loss_i = 1 - <f_s, e_y> / max(||f_s||, ||f_t||)

    ``mean`` is the official sum over the batch / N (its ``nd_loss_factor`` is the caller's
    weight). The projection rewards both alignment with e_y and a large student norm (up to the
    larger of the two norms); as in the official code the gradient also flows through ||f_s||
    when it is the larger norm. Per-sample arithmetic in torch, differentiable in the student
    features (teacher features and class means are fixed).
    """
    fn = "nd_loss"
    reduction = _reduction(fn, reduction)
    for name, x in (("student_features", student_features), ("teacher_features", teacher_features),
                    ("class_means", class_means)):
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
            raise Error(f"{fn}: {name} must be a 2-D floating tensor")
    if teacher_features.shape != student_features.shape:
        raise Error(f"{fn}: teacher_features has shape {tuple(teacher_features.shape)}, expected "
                    f"{tuple(student_features.shape)} (project the student features to the "
                    f"teacher's dimension first)")
    if class_means.shape[1] != student_features.shape[1]:
        raise Error(f"{fn}: class_means has dimension {class_means.shape[1]}, expected "
                    f"{student_features.shape[1]}")
    n = student_features.shape[0]
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != (n,):
        raise Error(f"{fn}: labels must be a tensor of shape [{n}]")
    if bool(((labels < 0) | (labels >= class_means.shape[0])).any()):
        raise Error(f"{fn}: labels out of range [0, {class_means.shape[0]})")
    mu = class_means.detach()[labels]
    mu_norm = mu.norm(dim=1)
    if bool((mu_norm == 0).any()):
        raise Error(f"{fn}: class_means has a zero vector for a label in the batch")
    e = mu / mu_norm[:, None]
    fs = student_features
    max_norm = torch.maximum(fs.norm(dim=1), teacher_features.detach().norm(dim=1)).clamp_min(1e-12)
    per = 1 - (fs * e.to(fs.dtype)).sum(1) / max_norm
    if reduction == "none":
        return per
    return per.sum() if reduction == "sum" else per.mean()


# ---------------------------------------------------------------------------------------------
# LDR and comp-sum losses (over C classes, torch).
# ---------------------------------------------------------------------------------------------


def _class_logits(fn: str, logits: Any, labels: Any):
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        raise Error(f"{fn}: logits must be a 2-D floating tensor [N, C]")
    n, c = logits.shape
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != (n,) or labels.is_floating_point():
        raise Error(f"{fn}: labels must be an integer tensor of shape [{n}]")
    if bool(((labels < 0) | (labels >= c)).any()):
        raise Error(f"{fn}: labels out of range [0, {c})")
    return logits, labels.long(), n, c


def _ldr_margins(logits, labels, margin):
    zy = logits.gather(1, labels[:, None])
    a = logits - zy + margin
    return a.scatter(1, labels[:, None], torch.zeros_like(zy))  # a_y = 0


def ldr_kl_loss(logits: torch.Tensor, labels: torch.Tensor, *, lam: Union[float, torch.Tensor] = 1.0,
                margin: float = 0.1, reduction: str = "mean"):
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
    reduction = _reduction(fn, reduction)
    logits, labels, n, c = _class_logits(fn, logits, labels)
    margin = _real(fn, "margin", margin)
    if isinstance(lam, torch.Tensor) and lam.numel() > 1:
        if tuple(lam.shape) != (n,) or bool((lam <= 0).any()):
            raise Error(f"{fn}: lam must be > 0, a number or a tensor of shape [{n}]")
        lam_t = lam.to(logits.dtype)[:, None]
    else:
        lam_t = _positive(fn, "lam", lam)
    a = _ldr_margins(logits, labels, margin)
    per = (torch.logsumexp(a / lam_t, dim=1, keepdim=True) - math.log(c)) * lam_t
    per = per[:, 0]
    if reduction == "none":
        return per
    return per.sum() if reduction == "sum" else per.mean()


def aldr_kl_loss(logits: torch.Tensor, labels: torch.Tensor, *, alpha: float = 2.0,
                 lam0: float = 1.0, margin: float = 0.1,
                 prev_lam: Optional[torch.Tensor] = None, reduction: str = "mean",
                 return_lam: bool = False):
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
    reduction = _reduction(fn, reduction)
    logits, labels, n, c = _class_logits(fn, logits, labels)
    alpha = _real(fn, "alpha", alpha)
    if not (math.isfinite(alpha) and alpha > 1):
        raise Error(f"{fn}: alpha must be finite and > 1, got {alpha:g}")
    lam0 = _positive(fn, "lam0", lam0)
    margin = _real(fn, "margin", margin)
    if c < 2:
        raise Error(f"{fn}: logits must have C >= 2 classes, got {c}")
    if prev_lam is None:
        prev = torch.full((n,), lam0, dtype=torch.float64)
    else:
        if not isinstance(prev_lam, torch.Tensor) or tuple(prev_lam.shape) != (n,):
            raise Error(f"{fn}: prev_lam must be a tensor of shape [{n}]")
        prev = prev_lam.detach().double().reshape(n)
        if not bool((torch.isfinite(prev) & (prev > 0)).all()):
            raise Error(f"{fn}: prev_lam must be finite and > 0")
    log_c = math.log(c)
    with torch.no_grad():
        # KL(softmax(z / lam') || uniform) = log C - H(softmax(z / lam'))
        kl = log_c - row_entropy(logits.detach().double() / prev[:, None]).double()
        lam = lam0 * (1 - kl / (alpha * log_c))
    per = ldr_kl_loss(logits, labels, lam=lam.to(logits.dtype) if n > 1 else float(lam[0]),
                      margin=margin, reduction="none")
    per = per - (alpha * log_c / (2 * lam0) * (lam - lam0) ** 2).to(per.dtype)
    out = per if reduction == "none" else (per.sum() if reduction == "sum" else per.mean())
    return (out, lam) if return_lam else out


class ALDRKLLoss(nn.Module):
    """:func:`aldr_kl_loss` with the per-instance temperatures kept in a buffer, as the official
    ``ALDRLoss_V1`` keeps them: ``loss_fn(logits, labels, ids)`` with ``ids`` [N] the dataset
    indices of the batch (int64, in [0, num_samples)); the buffer starts at lam0."""

    def __init__(self, num_samples: int, *, alpha: float = 2.0, lam0: float = 1.0,
                 margin: float = 0.1, reduction: str = "mean"):
        super().__init__()
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise Error(f"ALDRKLLoss: num_samples must be an int >= 1, got {num_samples!r}")
        self.alpha, self.lam0, self.margin, self.reduction = alpha, lam0, margin, reduction
        self.register_buffer("lam", torch.full((num_samples,), float(lam0), dtype=torch.float64))

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor):
        if (not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64 or ids.dim() != 1
                or bool(((ids < 0) | (ids >= self.lam.numel())).any())):
            raise Error(f"ALDRKLLoss: ids must be an int64 tensor [N] of indices in "
                        f"[0, {self.lam.numel()})")
        loss, lam = aldr_kl_loss(logits, labels, alpha=self.alpha, lam0=self.lam0,
                                 margin=self.margin, prev_lam=self.lam[ids],
                                 reduction=self.reduction, return_lam=True)
        self.lam[ids] = lam.to(self.lam.dtype)
        return loss


def comp_sum_loss(logits: torch.Tensor, labels: torch.Tensor, *, tau: float = 1.0,
                  reduction: str = "mean"):
    r"""Comp-sum losses Phi^tau (Mao, Mohri, Zhong, "Cross-Entropy Loss Functions: Theoretical
    Analysis and Applications", ICML 2023). With u = sum_{k != y} exp(z_k -
    z_y) = 1/p_y - 1::

        tau = 1:   log(1 + u) = -log p_y                          (cross-entropy / logistic)
        tau != 1:  ((1 + u)^(1 - tau) - 1) / (1 - tau) = (1 - p_y^(tau - 1)) / (tau - 1)
                   tau = 0: sum-exponential u;  tau in (1, 2): generalized cross-entropy with
                   q = tau - 1;  tau = 2: mean absolute error 1 - p_y

    computed from log p_y (log-softmax over C classes) with expm1 for accuracy. tau >= 0.
    """
    fn = "comp_sum_loss"
    reduction = _reduction(fn, reduction)
    logits, labels, n, c = _class_logits(fn, logits, labels)
    tau = _real(fn, "tau", tau)
    if not (math.isfinite(tau) and tau >= 0):
        raise Error(f"{fn}: tau must be finite and >= 0, got {tau:g}")
    lp = torch.log_softmax(logits, dim=1).gather(1, labels[:, None])[:, 0]
    if tau == 1:
        per = -lp
    else:
        per = -torch.expm1((tau - 1) * lp) / (tau - 1)
    if reduction == "none":
        return per
    return per.sum() if reduction == "sum" else per.mean()


def generalized_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, q: float = 0.7,
                              reduction: str = "mean"):
    """Generalized cross-entropy (1 - p_y^q) / q, q in (0, 1]: :func:`comp_sum_loss` with
    tau = 1 + q (Zhang & Sabuncu 2018; comp-sum family of Mao et al. 2023)."""
    q = _real("generalized_cross_entropy", "q", q)
    if not 0 < q <= 1:
        raise Error(f"generalized_cross_entropy: q must be in (0, 1], got {q:g}")
    return comp_sum_loss(logits, labels, tau=1 + q, reduction=reduction)


def mae_loss(logits: torch.Tensor, labels: torch.Tensor, *, reduction: str = "mean"):
    """Mean absolute error 1 - p_y (the comp-sum loss with tau = 2; Mao et al. 2023)."""
    return comp_sum_loss(logits, labels, tau=2.0, reduction=reduction)


def smooth_adversarial_comp_sum_loss(logits: torch.Tensor, adv_logits: torch.Tensor,
                                     labels: torch.Tensor, *, tau: float = 1.0, nu: float = 1.0,
                                     reduction: str = "mean"):
    r"""Smooth adversarial comp-sum loss (Mao, Mohri, Zhong 2023)::

        loss_i = Phi^tau(z_i, y_i) + nu ||z'_i - z_i||_2

    where z' = h(x') are the logits at an adversarial input x' chosen by the caller (e.g. PGD
    maximizing ||h(x') - h(x)|| in the perturbation ball), as the paper's regularized
    adversarial algorithm. The smooth term's exact form is not verified (no public code found;
    the paper's text beyond its abstract was not readable here). nu >= 0.
    """
    fn = "smooth_adversarial_comp_sum_loss"
    reduction = _reduction(fn, reduction)
    logits, labels, n, c = _class_logits(fn, logits, labels)
    if not isinstance(adv_logits, torch.Tensor) or adv_logits.shape != logits.shape:
        raise Error(f"{fn}: adv_logits must be a tensor of shape {tuple(logits.shape)}")
    nu = _real(fn, "nu", nu)
    if not (math.isfinite(nu) and nu >= 0):
        raise Error(f"{fn}: nu must be finite and >= 0, got {nu:g}")
    per = comp_sum_loss(logits, labels, tau=tau, reduction="none")
    diff = adv_logits - logits
    # sqrt with a zero-safe gradient (the norm is not differentiable at 0).
    sq = (diff * diff).sum(1)
    norm = torch.where(sq > 0, sq.clamp_min(1e-300).sqrt(), torch.zeros_like(sq))
    per = per + nu * norm
    if reduction == "none":
        return per
    return per.sum() if reduction == "sum" else per.mean()


# ---------------------------------------------------------------------------------------------
# MiniPLM difference sampling.
# ---------------------------------------------------------------------------------------------


def load_document_logprobs(path: Union[str, os.PathLike]) -> dict:
    """Reads per-document log-probabilities for :func:`miniplm_difference_sampling`.

    ``.npz``: arrays ``teacher``, ``reference`` and optionally ``lengths``; ``.pt``: a dict with
    those keys; any other extension: a text file with whitespace-separated columns ``teacher
    reference [length]``, one document per line (``#`` starts a comment). Returns a dict of
    float64 tensors."""
    fn = "load_document_logprobs"
    path = os.fspath(path)
    if not os.path.exists(path):
        raise Error(f"{fn}: path {path!r} does not exist")
    if path.endswith(".npz"):
        with np.load(path) as z:
            d = {k: torch.from_numpy(np.asarray(z[k], dtype=np.float64)) for k in z.files}
    elif path.endswith(".pt"):
        d = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in torch.load(path).items()}
    else:
        arr = np.loadtxt(path, dtype=np.float64, comments="#", ndmin=2)
        if arr.shape[1] not in (2, 3):
            raise Error(f"{fn}: {path!r} must have 2 or 3 columns (teacher reference [length]), "
                        f"got {arr.shape[1]}")
        d = {"teacher": torch.from_numpy(arr[:, 0].copy()),
             "reference": torch.from_numpy(arr[:, 1].copy())}
        if arr.shape[1] == 3:
            d["lengths"] = torch.from_numpy(arr[:, 2].copy())
    for k in ("teacher", "reference"):
        if k not in d:
            raise Error(f"{fn}: {path!r} has no {k!r} entry")
    return d


def miniplm_scores(teacher_logprobs, reference_logprobs, lengths=None) -> torch.Tensor:
    r"""MiniPLM's difference score per document: (log p_teacher(x) - log p_ref(x)) / |x|
    (per token when ``lengths`` is given; the sums as given otherwise). float64 [D]."""
    fn = "miniplm_scores"
    lt = torch.as_tensor(teacher_logprobs, dtype=torch.float64).reshape(-1)
    lr = torch.as_tensor(reference_logprobs, dtype=torch.float64).reshape(-1)
    if lt.shape != lr.shape:
        raise Error(f"{fn}: reference_logprobs has {lr.numel()} documents, teacher_logprobs "
                    f"{lt.numel()}")
    if not bool(torch.isfinite(lt).all() and torch.isfinite(lr).all()):
        raise Error(f"{fn}: log-probabilities must be finite")
    d = lt - lr
    if lengths is not None:
        ln = torch.as_tensor(lengths, dtype=torch.float64).reshape(-1)
        if ln.shape != lt.shape or bool((ln <= 0).any()):
            raise Error(f"{fn}: lengths must be > 0, one per document ({lt.numel()})")
        d = d / ln
    return d


def miniplm_difference_sampling(teacher_logprobs=None, reference_logprobs=None, *,
                                lengths=None, path=None, ratio: float = 0.5,
                                mode: str = "select", temperature: float = 1.0) -> torch.Tensor:
    r"""MiniPLM difference sampling of pre-training documents.

    Gu et al., "MiniPLM: Knowledge Distillation for Pre-Training Language Models" (code
    thu-coai/MiniPLM). From offline per-document log-probs of the large teacher
    and a small reference model, score r(x) = (log p_teacher(x) - log p_ref(x)) / |x| (see
    :func:`miniplm_scores`): documents the teacher finds much likelier than the small model are
    the difficult, diverse ones worth keeping.

    * ``mode="select"``: the indices (int64, increasing) of the ceil(ratio * D) highest-scoring
      documents (ties broken by index), as MiniPLM's top-ratio selection (ratio 0.5 in the paper).
    * ``mode="weights"``: sampling weights D softmax(r / temperature) (mean 1), a soft variant.

    Inputs: arrays (anything torch.as_tensor takes) or ``path`` (:func:`load_document_logprobs`).
    """
    fn = "miniplm_difference_sampling"
    if path is not None:
        if teacher_logprobs is not None or reference_logprobs is not None:
            raise Error(f"{fn}: give either path or the log-prob arrays, not both")
        d = load_document_logprobs(path)
        teacher_logprobs, reference_logprobs = d["teacher"], d["reference"]
        lengths = d.get("lengths", lengths)
    if teacher_logprobs is None or reference_logprobs is None:
        raise Error(f"{fn}: teacher_logprobs and reference_logprobs (or path) are required")
    score = miniplm_scores(teacher_logprobs, reference_logprobs, lengths)
    dn = score.numel()
    if mode == "select":
        ratio = _real(fn, "ratio", ratio)
        if not 0 < ratio <= 1:
            raise Error(f"{fn}: ratio must be in (0, 1], got {ratio:g}")
        k = min(dn, math.ceil(ratio * dn))
        order = torch.argsort(-score, stable=True)
        return order[:k].sort().values
    if mode == "weights":
        temperature = _positive(fn, "temperature", temperature)
        return torch.softmax(score / temperature, 0) * dn
    raise Error(f"{fn}: mode must be 'select' or 'weights', got {mode!r}")


# ---------------------------------------------------------------------------------------------
# DDK domain mixing.
# ---------------------------------------------------------------------------------------------


def ddk_domain_weights(student_losses, teacher_losses, previous_weights=None, *,
                       smoothing: float = 0.5, temperature: float = 1.0,
                       min_weight: float = 0.0) -> torch.Tensor:
    r"""DDK: domain mixture weights updated smoothly from teacher-student loss gaps.

    Liu et al., "DDK: Distilling Domain Knowledge for Efficient Large Language Models". Per domain d, the gap g_d = L_student(d) - L_teacher(d) (validation losses)::

        pi      = softmax(g / temperature)                       (more data where the gap is)
        w_new   = (1 - smoothing) w_prev + smoothing pi          (the smooth update)
        w_new   = max(w_new, min_weight), renormalized to sum 1

    w_prev = uniform when not given. The paper's exact discrepancy factor and smoothing are not
    verified (no official or public code found). Returns float64 [D] that sums to 1.
    Per-domain arithmetic in torch.
    """
    fn = "ddk_domain_weights"
    ls = torch.as_tensor(student_losses, dtype=torch.float64).reshape(-1)
    lt = torch.as_tensor(teacher_losses, dtype=torch.float64).reshape(-1)
    if ls.numel() == 0 or ls.shape != lt.shape:
        raise Error(f"{fn}: student_losses and teacher_losses must be non-empty with one value per "
                    f"domain, got {ls.numel()} and {lt.numel()}")
    if not bool(torch.isfinite(ls).all() and torch.isfinite(lt).all()):
        raise Error(f"{fn}: losses must be finite")
    dn = ls.numel()
    smoothing = _real(fn, "smoothing", smoothing)
    if not 0 <= smoothing <= 1:
        raise Error(f"{fn}: smoothing must be in [0, 1], got {smoothing:g}")
    temperature = _positive(fn, "temperature", temperature)
    min_weight = _real(fn, "min_weight", min_weight)
    if not 0 <= min_weight <= 1.0 / dn:
        raise Error(f"{fn}: min_weight must be in [0, 1/D] = [0, {1.0 / dn:g}], got {min_weight:g}")
    if previous_weights is None:
        prev = torch.full((dn,), 1.0 / dn, dtype=torch.float64)
    else:
        prev = torch.as_tensor(previous_weights, dtype=torch.float64).reshape(-1)
        if prev.shape != ls.shape or bool((prev < 0).any()) or not math.isclose(            float(prev.sum()), 1.0, rel_tol=0, abs_tol=1e-6):
            raise Error(f"{fn}: previous_weights must be {dn} non-negative weights summing to 1")
    pi = torch.softmax((ls - lt) / temperature, 0)
    w = (1 - smoothing) * prev + smoothing * pi
    w = w.clamp_min(min_weight)
    return w / w.sum()


# ---------------------------------------------------------------------------------------------
# Weight Aligning.
# ---------------------------------------------------------------------------------------------


def weight_aligning(weight: torch.Tensor, num_old: int, bias: Optional[torch.Tensor] = None):
    r"""Weight Aligning for class-incremental learning.

    Zhao et al., "Maintaining Discrimination and Fairness in Class Incremental Learning" (CVPR
    2020). The classifier rows of the new classes are rescaled so that their
    mean norm equals that of the old classes::

        gamma = mean_{i < num_old} ||W_i|| / mean_{i >= num_old} ||W_i||,   W_new <- gamma W_new

    Returns ``(aligned_weight, gamma)`` (and the aligned bias when ``bias`` is given: the new
    classes' biases are scaled by the same gamma so their logits scale together; the paper's
    FC layer has no bias). Does not modify its inputs; see :func:`weight_align_`.
    """
    fn = "weight_aligning"
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise Error(f"{fn}: weight must be a 2-D floating tensor [C, D]")
    c = weight.shape[0]
    if isinstance(num_old, bool) or not isinstance(num_old, int) or not 0 < num_old < c:
        raise Error(f"{fn}: num_old must be an int in [1, {c - 1}] (C = {c}), got {num_old!r}")
    with torch.no_grad():
        norms = weight.detach().double().norm(dim=1)
        new_mean = norms[num_old:].mean()
        if float(new_mean) == 0:
            raise Error(f"{fn}: the new classes' weights are all zero")
        gamma = float(norms[:num_old].mean() / new_mean)
        w = weight.detach().clone()
        w[num_old:] *= gamma
        if bias is None:
            return w, gamma
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (c,):
            raise Error(f"{fn}: bias must be a tensor of shape [{c}]")
        b = bias.detach().clone()
        b[num_old:] *= gamma
        return w, b, gamma


def weight_align_(linear: nn.Linear, num_old: int) -> float:
    """In-place Weight Aligning of an ``nn.Linear`` classifier (see :func:`weight_aligning`);
    returns gamma."""
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"weight_align_: linear must be a torch.nn.Linear, got {_type_name(linear)}")
    res = weight_aligning(linear.weight, num_old, linear.bias)
    with torch.no_grad():
        linear.weight.copy_(res[0])
        if linear.bias is not None:
            linear.bias.copy_(res[1])
    return res[-1]


# ---------------------------------------------------------------------------------------------
# USCD.
# ---------------------------------------------------------------------------------------------


class USCDResult(NamedTuple):
    logits: torch.Tensor       # [..., V] the scores to sample from (log-probabilities)
    uncertainty: torch.Tensor  # [...] std of the standard prompt's probabilities (small: flat)
    applied: torch.Tensor      # [...] bool: where the contrast was applied


def uscd_logits(standard_logits: torch.Tensor, lame_logits: torch.Tensor, *,
                lame_weight: float = 0.7, std_threshold: float = 0.005,
                filter_ratio: float = 2.0 / 3.0) -> USCDResult:
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
    s, lead, n, v = _flat(fn, "standard_logits", standard_logits)
    l = _check_logits("lame_logits", lame_logits, fn)
    _same_shape(fn, "lame_logits", l, standard_logits, "standard_logits")
    l = _rows(l.detach(), n, v)
    dt = _out_dtype(s, l)
    out = torch.empty(n, v, dtype=dt)
    unc = torch.empty(n, dtype=dt)
    applied = torch.empty(n, dtype=torch.int32)
    _C.selective_contrast(s.detach(), l, _real(fn, "lame_weight", lame_weight),
                          _real(fn, "std_threshold", std_threshold),
                          _real(fn, "filter_ratio", filter_ratio), out, unc, applied)
    return USCDResult(out.reshape(standard_logits.shape), unc.reshape(lead),
                      applied.bool().reshape(lead))


class USCDLogitsProcessor:
    """Stateless USCD step for a generation loop: ``processor(standard_logits, lame_logits)``
    returns the scores to sample from (see :func:`uscd_logits`). Run the model on both prompts
    each step and feed the chosen token to both."""

    def __init__(self, lame_weight: float = 0.7, std_threshold: float = 0.005,
                 filter_ratio: float = 2.0 / 3.0):
        self.lame_weight, self.std_threshold, self.filter_ratio = (lame_weight, std_threshold,
                                                                   filter_ratio)
        # Validate once, on a dummy row, so that a bad setting fails at construction.
        uscd_logits(torch.zeros(1, 2), torch.zeros(1, 2), lame_weight=lame_weight,
                    std_threshold=std_threshold, filter_ratio=filter_ratio)

    def __call__(self, standard_logits: torch.Tensor, lame_logits: torch.Tensor) -> torch.Tensor:
        return uscd_logits(standard_logits, lame_logits, lame_weight=self.lame_weight,
                           std_threshold=self.std_threshold,
                           filter_ratio=self.filter_ratio).logits
