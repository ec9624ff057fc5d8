"""Knowledge-distillation losses on logits: BD-KD, NKD, USKD, OFA-KD, DAC-KL, Swing
distillation and MDCS consistency self-distillation.

Every loop over the vocabulary (or class) dimension runs in divkit's C++ kernels
(``include/divkit/distill.h`` and the token-level divergences); per-row arithmetic is torch.
Conventions (directions, shapes, ``labels`` / ``ignore_index``, reductions): see
:mod:`divkit.distill`.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from .. import _C, _ops
from .. import _validate as check
from .._autograd import recompute_in_backward
from ..functional import _rows, divergence
from . import _common as common

__all__ = [
    "row_entropy",
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
]


@check.public("row_entropy")
def row_entropy(logits: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """Entropy H(softmax(logits / T)) in nats per row of ``[..., V]`` logits (no gradient),
    computed by divkit's C++ kernel. Returns ``[...]`` float32 (float64 for float64 logits)."""
    fn = "row_entropy"
    x, lead, n, _ = common.flat(fn, "logits", logits)
    temperature = check.positive(fn, "temperature", temperature)
    if _ops.use_ops(x, fn=fn):
        return _ops.row_entropy_op(x.detach(), temperature).reshape(lead)
    out = torch.empty(n, dtype=common.out_dtype(x))
    _C.row_entropy(x.detach(), temperature, out)
    return out.reshape(lead)


# ---------------------------------------------------------------------------------------------
# BD-KD.
# ---------------------------------------------------------------------------------------------


@check.public("bdkd_loss")
def bdkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    gap_scale: float = 1.0,
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    return_weights: bool = False,
):
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
    reduction = check.reduction(fn, reduction)
    gap_scale = check.real(fn, "gap_scale", gap_scale, allow_nan=False)
    if not (check.isfinite(gap_scale) and gap_scale >= 0):
        check.fail(fn, f"gap_scale must be finite and >= 0, got {gap_scale:g}")
    s = check.logits(fn, "student_logits", student_logits)
    t = check.logits(fn, "teacher_logits", teacher_logits)
    check.same_shape(fn, "teacher_logits", t, s, "student_logits")
    temperature = check.positive(fn, "temperature", temperature)
    lead = s.shape[:-1]
    n = math.prod(lead)
    lab = common.labels(fn, labels, lead, n, False)
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
    valid = common.valid(lab, ignore_index, n)
    w = torch.where(valid, w, torch.zeros_like(w))
    per_row = (1 - w) * fkl + w * rkl
    loss = common.reduce(per_row, valid, lead, reduction)
    return (loss, w.reshape(lead)) if return_weights else loss


# ---------------------------------------------------------------------------------------------
# NKD and USKD.
# ---------------------------------------------------------------------------------------------


def _nkd_rows(s, t, lab, ignore_index: int, tau: float, dtype, fn: str = "nkd_loss"):
    """NKD's target and non-target terms per row [N], both differentiable in the student (the
    kernel recomputes the gradient in backward from the two upstream gradients)."""
    n = s.shape[0]

    def run(inputs, grad_out, need):
        (student,) = inputs
        target = torch.empty(n, dtype=dtype)
        nontarget = torch.empty(n, dtype=dtype)
        if grad_out is None:
            _C.nkd_rows(student, t, lab, ignore_index, tau, target, nontarget, None, None, None)
            return (target, nontarget), None
        g_target, g_nontarget = grad_out
        a = torch.zeros(n, dtype=dtype) if g_target is None else g_target.to(dtype).contiguous()
        b = (
            torch.zeros(n, dtype=dtype)
            if g_nontarget is None
            else g_nontarget.to(dtype).contiguous()
        )
        grad = torch.empty(student.shape, dtype=student.dtype)
        _C.nkd_rows(student, t, lab, ignore_index, tau, target, nontarget, a, b, grad)
        return (target, nontarget), (grad,)

    return recompute_in_backward(run, (s,), n_diff=2, fn=fn)


def _nkd_terms(fn, student_logits, teacher_logits, labels, temperature, ignore_index):
    s, lead, n, _ = common.flat(fn, "student_logits", student_logits)
    t = check.logits(fn, "teacher_logits", teacher_logits)
    check.same_shape(fn, "teacher_logits", t, student_logits, "student_logits")
    check.no_grad(fn, "teacher_logits", t, "the teacher is detached in NKD")
    t = _rows(t.detach(), n, s.shape[1])
    lab = common.labels(fn, labels, lead, n, True)
    tau = check.positive(fn, "temperature", temperature)
    if _ops.use_ops(s, t, lab, fn=fn):  # the op checks the rows below when it runs
        target, nontarget = _ops.nkd_rows(s, t, lab, int(ignore_index), tau, fn)
        return target, nontarget, lab, lead, n, tau
    target, nontarget = _nkd_rows(s, t, lab, int(ignore_index), tau, common.out_dtype(s, t), fn)
    # The non-target distributions are renormalized over j != y: not defined when every
    # non-target logit of a row is -inf (the kernel checks whole rows only). Checked on the [N]
    # outputs, not by another pass over the logits.
    bad = torch.isnan(target.detach()) | torch.isnan(nontarget.detach())
    if bool(bad.any()):
        r = int(bad.nonzero()[0, 0])
        check.fail(
            fn,
            f"row {r}: every non-target logit of student_logits or teacher_logits is -inf (the "
            f"non-target distribution over j != labels[{r}] is not defined)",
        )
    return target, nontarget, lab, lead, n, tau


@check.public("nkd_loss")
def nkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    gamma: float = 1.5,
    ignore_index: int = -100,
    reduction: str = "mean",
):
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
    reduction = check.reduction(fn, reduction)
    gamma = check.real(fn, "gamma", gamma, allow_nan=False)
    if not (check.isfinite(gamma) and gamma >= 0):
        check.fail(fn, f"gamma must be finite and >= 0, got {gamma:g}")
    target, nontarget, lab, lead, n, tau = _nkd_terms(
        fn, student_logits, teacher_logits, labels, temperature, ignore_index
    )
    per_row = target + (gamma * tau * tau) * nontarget
    return common.reduce(per_row, common.valid(lab, ignore_index, n), lead, reduction)


@check.public("uskd_soft_labels", logits_args=("student_logits", "weak_logits"))
def uskd_soft_labels(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    weak_logits: torch.Tensor,
    *,
    ignore_index: int = -100,
):
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
    s = check.logits(fn, "student_logits", student_logits)
    wk = check.logits(fn, "weak_logits", weak_logits)
    check.same_shape(fn, "weak_logits", wk, s, "student_logits")
    lead = s.shape[:-1]
    c = s.shape[-1]
    n = math.prod(lead)
    lab = common.labels(fn, labels, lead, n, True)
    sd, wd = s.detach().reshape(n, c), wk.detach().reshape(n, c)
    if _ops.use_ops(sd, lab, wd, fn=fn):
        # An op with shapes known before it runs: the batch mean over non-ignored rows and
        # the label check read values (graph breaks, were they traced).
        target, z = _ops.uskd_soft_labels_op(sd, lab, wd, ignore_index, fn)
    else:
        target, z = _uskd_soft_label_rows(fn, sd, lab, wd, ignore_index)
    dt = common.out_dtype(s)
    return target.to(dt).reshape(lead), z.to(dt).reshape(s.shape)


def _uskd_soft_label_rows(fn: str, s: torch.Tensor, lab: torch.Tensor, wk: torch.Tensor, ii: int):
    """(target [N], nontarget [N, C]) float64 of :func:`uskd_soft_labels` from rows s, wk
    [N, C] (no gradient) and labels [N]."""
    n, c = s.shape
    valid = lab != ii
    if bool(((lab < 0) | (lab >= c))[valid].any()):
        check.fail(fn, f"labels out of range [0, {c}) (and not ignore_index)")
    safe = torch.where(valid, lab, torch.zeros_like(lab))
    with torch.no_grad():
        lq = torch.log_softmax(s.double(), -1)
        lqy = lq.gather(1, safe[:, None])
        qy2 = lqy[:, 0].exp() ** 2
        mean = qy2[valid].mean() if bool(valid.any()) else qy2.new_zeros(())
        target = qy2 - mean + 1.0
        w = torch.softmax(wk.double(), -1)
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
    return target, z


@check.public("uskd_loss")
def uskd_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    weak_logits: torch.Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 0.1,
    mu: float = 0.005,
    ignore_index: int = -100,
    reduction: str = "mean",
):
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
    reduction = check.reduction(fn, reduction)
    alpha = check.real(fn, "alpha", alpha, allow_nan=False)
    beta = check.real(fn, "beta", beta, allow_nan=False)
    mu = check.real(fn, "mu", mu, allow_nan=False)
    for name, x in (("alpha", alpha), ("beta", beta), ("mu", mu)):
        if not (check.isfinite(x) and x >= 0):
            check.fail(fn, f"{name} must be finite and >= 0, got {x:g}")
    s = check.logits(fn, "student_logits", student_logits)
    target, z = uskd_soft_labels(s, labels, weak_logits, ignore_index=ignore_index)
    lead = s.shape[:-1]
    c = s.shape[-1]
    n = math.prod(lead)
    lab = common.labels(fn, labels, lead, n, True)
    valid = lab != ignore_index
    safe = torch.where(valid, lab, torch.zeros_like(lab))
    with torch.no_grad():
        # Teacher logits for NKD's kernel: log z off the label (its non-target softmax is z)
        # and, at the label, log sum z = 0, so that its T = 1 target probability is 1/2.
        tl = z.reshape(n, c).double().clamp_min(1e-300).log()
        tl.scatter_(1, safe[:, None], 0.0)
        tl = torch.where(valid[:, None], tl, torch.zeros_like(tl))
    tgt, nontarget, lab, lead, n, _ = _nkd_terms(
        fn, s, tl.reshape(s.shape).to(common.out_dtype(s)), labels, 1.0, ignore_index
    )
    scale = (2.0 * target.reshape(n)).to(tgt.dtype)
    per_row = alpha * scale * tgt + beta * nontarget
    if mu > 0:
        with torch.no_grad():
            e = _smoothed_one_hot(safe, c, 0.1).to(common.out_dtype(s))
        wk = weak_logits.reshape(n, c)
        weak = divergence(
            wk, e.log(), "cross_entropy", labels=lab, ignore_index=ignore_index, reduction="none"
        ).reshape(n)
        per_row = per_row + mu * weak.to(per_row.dtype)
    return common.reduce(per_row, valid, lead, reduction)


def _smoothed_one_hot(labels: torch.Tensor, c: int, eps: float) -> torch.Tensor:
    """(1 - eps) onehot(labels) + eps / C, float64 [N, C] (USKD's weak-supervision target)."""
    e = torch.full((labels.numel(), c), eps / c, dtype=torch.float64)
    e.scatter_add_(
        1, labels.reshape(-1, 1), torch.full((labels.numel(), 1), 1.0 - eps, dtype=torch.float64)
    )
    return e


# ---------------------------------------------------------------------------------------------
# OFA-KD.
# ---------------------------------------------------------------------------------------------


def _row_loss(s: torch.Tensor, kernel, dtype, fn: str) -> torch.Tensor:
    """A per-row loss [N] from a C++ kernel ``kernel(student, out, coef, grad)``; backward
    recomputes with coef = the upstream gradient, so that no [N, V] buffer is kept between the
    passes."""
    n = s.shape[0]

    def run(inputs, grad_out, need):
        (student,) = inputs
        out = torch.empty(n, dtype=dtype)
        if grad_out is None:
            kernel(student, out, None, None)
            return (out,), None
        grad = torch.empty(student.shape, dtype=student.dtype)
        kernel(student, out, grad_out.to(dtype).contiguous(), grad)
        return (out,), (grad,)

    return recompute_in_backward(run, (s,), fn=fn)[0]


@check.public("ofa_loss")
def ofa_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    eps: float = 1.0,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
):
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
    reduction = check.reduction(fn, reduction)
    s, lead, n, v = common.flat(fn, "student_logits", student_logits)
    t = common.fixed_teacher(fn, teacher_logits, student_logits, n, v)
    lab = common.labels(fn, labels, lead, n, True)
    eps = check.positive(fn, "eps", eps)
    temperature = check.positive(fn, "temperature", temperature)
    ii = int(ignore_index)
    if _ops.use_ops(s, t, lab, fn=fn):
        per_row = _ops.ofa_rows(s, t, lab, ii, eps, temperature)
        return common.reduce(per_row, common.valid(lab, ii, n), lead, reduction)

    def run(student, out, coef, grad):
        _C.ofa_rows(student, t, lab, ii, eps, temperature, out, coef, grad)

    per_row = _row_loss(s, run, common.out_dtype(s, t), fn)
    return common.reduce(per_row, common.valid(lab, ii, n), lead, reduction)


# ---------------------------------------------------------------------------------------------
# DAC-KL.
# ---------------------------------------------------------------------------------------------


def _clipped_kl_rows(
    s,
    lower,
    upper,
    t,
    lab,
    ignore_index: int,
    temperature: float,
    sharpness: float,
    dtype,
    fn: str = "dac_kl_loss",
) -> torch.Tensor:
    """The clipped KL per row [N], differentiable in the student and in both bounds (recomputed
    in backward)."""
    n = s.shape[0]

    def run(inputs, grad_out, need):
        student, lo, hi = inputs
        out = torch.empty(n, dtype=dtype)
        if grad_out is None:
            _C.clipped_kl_rows(
                student,
                t,
                lo,
                hi,
                temperature,
                sharpness,
                lab,
                ignore_index,
                out,
                None,
                None,
                None,
                None,
            )
            return (out,), None
        need_s, need_lo, need_hi = need
        grad = torch.empty(student.shape, dtype=student.dtype) if need_s else None
        g_lo = torch.empty(n, dtype=dtype) if need_lo else None
        g_hi = torch.empty(n, dtype=dtype) if need_hi else None
        _C.clipped_kl_rows(
            student,
            t,
            lo,
            hi,
            temperature,
            sharpness,
            lab,
            ignore_index,
            out,
            grad_out.to(dtype).contiguous(),
            grad,
            g_lo,
            g_hi,
        )
        if g_lo is not None:
            g_lo = g_lo.to(lo.dtype)
        if g_hi is not None:
            g_hi = g_hi.to(hi.dtype)
        return (out,), (grad, g_lo, g_hi)

    return recompute_in_backward(run, (s, lower, upper), fn=fn)[0]


@check.public("dac_kl_mass_bounds")
def dac_kl_mass_bounds(
    teacher_logits: torch.Tensor,
    *,
    mass_lo: float = 0.0,
    mass_hi: float = 0.9,
    temperature: float = 1.0,
):
    r"""Quantile bounds of the teacher's high-density region for :func:`dac_kl_loss`.

    Sort p = softmax(t / T) decreasingly; token k is in the region when the mass before it,
    c_k = sum_{m < k} p_(m), satisfies mass_lo <= c_k < mass_hi. Returns ``(lower, upper)``
    ``[...]``: the smallest and the largest kept probability (no gradient; float64 for float64
    logits, else float32 rounded outward, so that the bounds keep their own tokens). mass_lo = 0,
    mass_hi = 0.9 keeps the 90% nucleus; mass_lo > 0 also clips the dominant tokens. Sorting in
    C++ (``mass_bounds`` in ``include/divkit/distill.h``).
    """
    fn = "dac_kl_mass_bounds"
    t, lead, n, _ = common.flat(fn, "teacher_logits", teacher_logits)
    lo = torch.empty(n, dtype=common.out_dtype(t))
    hi = torch.empty(n, dtype=common.out_dtype(t))
    temperature = check.positive(fn, "temperature", temperature)
    mass_lo = check.real(fn, "mass_lo", mass_lo, allow_nan=False)
    mass_hi = check.real(fn, "mass_hi", mass_hi, allow_nan=False)
    if _ops.use_ops(t, fn=fn):
        lo, hi = _ops.mass_bounds_op(t, temperature, mass_lo, mass_hi)
        return lo.reshape(lead), hi.reshape(lead)
    _C.mass_bounds(t.detach(), temperature, mass_lo, mass_hi, lo, hi)
    return lo.reshape(lead), hi.reshape(lead)


@check.public("dac_kl_loss")
def dac_kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    lower: Optional[torch.Tensor] = None,
    upper: Optional[torch.Tensor] = None,
    *,
    mass_lo: float = 0.0,
    mass_hi: float = 0.9,
    temperature: float = 1.0,
    sharpness: float = 0.0,
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
):
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
    reduction = check.reduction(fn, reduction)
    s, lead, n, v = common.flat(fn, "student_logits", student_logits)
    t = common.fixed_teacher(fn, teacher_logits, student_logits, n, v)
    lab = common.labels(fn, labels, lead, n, False)
    temperature = check.positive(fn, "temperature", temperature)
    sharpness = check.real(fn, "sharpness", sharpness, allow_nan=False)
    if (lower is None) != (upper is None):
        check.fail(fn, "give both lower and upper, or neither (quantile bounds)")
    if lower is None:
        lower, upper = dac_kl_mass_bounds(
            t, mass_lo=mass_lo, mass_hi=mass_hi, temperature=temperature
        )
        # A region of one token (its probability alone reaches mass_hi) has lower == upper:
        # the next float up keeps the same tokens and meets the kernel's lower < upper.
        upper = torch.where(upper > lower, upper, torch.nextafter(lower, upper.new_tensor(2.0)))
        # t is rows [N, V]: the bounds come back [N], the checks below want [...].
        lower, upper = lower.reshape(lead), upper.reshape(lead)
    lo = common.row_values(fn, "lower", lower, lead, n)
    hi = common.row_values(fn, "upper", upper, lead, n)
    if _ops.use_ops(s, t, lo, hi, lab, fn=fn):
        per_row = _ops.clipped_kl_rows(s, lo, hi, t, lab, int(ignore_index), temperature, sharpness)
        return common.reduce(per_row, common.valid(lab, ignore_index, n), lead, reduction)
    per_row = _clipped_kl_rows(
        s, lo, hi, t, lab, int(ignore_index), temperature, sharpness, common.out_dtype(s, t)
    )
    return common.reduce(per_row, common.valid(lab, ignore_index, n), lead, reduction)


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

    @check.public("DACKLBounds")
    def __init__(self, k: int = 32, hidden: int = 64):
        super().__init__()
        k = check.size("DACKLBounds", "k", k)
        hidden = check.size("DACKLBounds", "hidden", hidden)
        self.k = k
        self.net = nn.Sequential(nn.Linear(k, hidden), nn.ReLU(), nn.Linear(hidden, 2))
        with torch.no_grad():
            self.net[2].weight.mul_(0.01)
            self.net[2].bias.copy_(
                torch.tensor([math.log(1e-3 / (1 - 1e-3)), math.log(0.525 / 0.475)])
            )

    @check.public("DACKLBounds")
    def forward(self, teacher_logits: torch.Tensor, temperature: float = 1.0):
        fn = "DACKLBounds"
        t, lead, n, _ = common.flat(fn, "teacher_logits", teacher_logits)
        w = self.net[0].weight
        dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
        temperature = check.positive(fn, "temperature", temperature)
        if _ops.use_ops(t, w, fn=fn):
            feats = _ops.sorted_probs_op(t.detach(), temperature, self.k, dtype)
        else:
            feats = torch.empty(n, self.k, dtype=dtype)
            _C.sorted_probs(t.detach(), temperature, feats)
        p_max = feats[:, :1].clamp_min(1e-300)
        u = self.net((feats / p_max).to(w.dtype))
        upper = p_max.to(w.dtype)[:, 0] * 2 * torch.sigmoid(u[:, 1])
        lower = upper * torch.sigmoid(u[:, 0])
        return lower.reshape(lead), upper.reshape(lead)


class DACKLLoss(nn.Module):
    """:func:`dac_kl_loss` with learnable bounds (:class:`DACKLBounds`) and a soft mask."""

    @check.public("DACKLLoss")
    def __init__(
        self,
        k: int = 32,
        hidden: int = 64,
        *,
        temperature: float = 1.0,
        sharpness: float = 0.5,
        reduction: str = "mean",
        ignore_index: int = -100,
    ):
        super().__init__()
        self.bounds = DACKLBounds(k, hidden)
        self.temperature, self.sharpness = temperature, sharpness
        self.reduction, self.ignore_index = reduction, ignore_index

    @check.public("DACKLLoss")
    def forward(self, student_logits, teacher_logits, labels=None):
        lower, upper = self.bounds(teacher_logits, self.temperature)
        return dac_kl_loss(
            student_logits,
            teacher_logits,
            lower,
            upper,
            temperature=self.temperature,
            sharpness=self.sharpness,
            labels=labels,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
        )


# ---------------------------------------------------------------------------------------------
# Swing distillation.
# ---------------------------------------------------------------------------------------------


@check.public("swing_temperatures")
def swing_temperatures(
    privacy_scores: torch.Tensor, *, t_min: float = 1.0, t_max: float = 4.0
) -> torch.Tensor:
    r"""Swing distillation's per-token temperatures: T_i = t_min + (t_max - t_min) * score_i for
    privacy scores in [0, 1] (the likelihood that the token is private: a private token gets a
    flatter teacher). The paper's mapping is not public (not verified; linear here)."""
    fn = "swing_temperatures"
    if not isinstance(privacy_scores, torch.Tensor) or not privacy_scores.is_floating_point():
        check.fail_type(
            fn,
            f"privacy_scores must be a floating torch.Tensor, got "
            f"{check.type_name(privacy_scores)}",
        )
    t_min = check.positive(fn, "t_min", t_min)
    t_max = check.positive(fn, "t_max", t_max)
    if t_max < t_min:
        check.fail(fn, f"t_max ({t_max:g}) must be >= t_min ({t_min:g})")
    sc = privacy_scores.detach()
    if _ops.ENABLED and _ops.compiling():  # checked when the graph runs
        sc = _ops.checked_range_op(sc, 0.0, 1.0, fn, "privacy_scores must lie in [0, 1]")
    elif bool(((sc < 0) | (sc > 1) | sc.isnan()).any()):
        check.fail(fn, "privacy_scores must lie in [0, 1]")
    return t_min + (t_max - t_min) * sc


@check.public("swing_noise")
def swing_noise(
    seed: int, shape: Sequence[int], *, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """The standard normal noise eps [N, V] that :func:`swing_loss` adds (times noise_std) to
    the tempered teacher logits with this seed (counter-based: the same for any thread count).
    A CPU tensor without gradient; traced (``torch.compile``), the custom op
    ``divkit::swing_noise``."""
    seed = check.integer("swing_noise", "seed", seed)
    if not isinstance(shape, (tuple, list, torch.Size)):
        check.fail_type(
            "swing_noise", f"shape must be a sequence of ints, got {check.type_name(shape)}"
        )
    shape = tuple(check.integer("swing_noise", "shape", d, min=0) for d in shape)
    if len(shape) < 1:
        check.fail("swing_noise", "shape must have at least one dimension")
    if math.prod(shape) > 2**40:
        check.fail("swing_noise", f"shape {shape} has more than 2**40 elements")
    if dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        check.fail_type(
            "swing_noise",
            f"dtype must be torch.float32, float64, bfloat16 or float16, got {dtype!r}",
        )
    if _ops.use_ops(fn="swing_noise"):
        return _ops.swing_noise_op(seed, list(shape), dtype)
    return _swing_noise(seed, shape, dtype)


def _swing_noise(seed: int, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """swing_noise for checked arguments (also the op's implementation)."""
    v = shape[-1]
    n = math.prod(shape[:-1])
    out = torch.empty(n, v, dtype=dtype)
    _C.swing_noise(int(seed) & 0xFFFFFFFFFFFFFFFF, out)
    return out.reshape(tuple(shape))


@check.public("swing_loss")
def swing_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    privacy_scores: Optional[torch.Tensor] = None,
    *,
    temperatures: Optional[torch.Tensor] = None,
    t_min: float = 1.0,
    t_max: float = 4.0,
    noise_std: float = 0.0,
    seed: int = 0,
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    scale_by_t_squared: bool = False,
):
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
    reduction = check.reduction(fn, reduction)
    s, lead, n, v = common.flat(fn, "student_logits", student_logits)
    t = common.fixed_teacher(fn, teacher_logits, student_logits, n, v)
    lab = common.labels(fn, labels, lead, n, False)
    if (privacy_scores is None) == (temperatures is None):
        check.fail(fn, "give exactly one of privacy_scores and temperatures")
    if temperatures is None:
        scores = common.row_values(fn, "privacy_scores", privacy_scores, lead, n)
        # row_values flattened the scores to [N]; the temperatures are checked as [...].
        temperatures = swing_temperatures(scores, t_min=t_min, t_max=t_max).reshape(lead)
    temps = common.row_values(fn, "temperatures", temperatures, lead, n)
    temps = temps.detach().double().contiguous()
    noise_std = check.real(fn, "noise_std", noise_std, allow_nan=False)
    seed_u = check.integer(fn, "seed", seed) & 0xFFFFFFFFFFFFFFFF
    ii = int(ignore_index)
    if _ops.use_ops(s, t, temps, lab, fn=fn):
        per_row = _ops.tempered_kl_rows(s, t, temps, noise_std, seed_u, lab, ii)
    else:

        def run(student, out, coef, grad):
            _C.tempered_kl_rows(student, t, temps, noise_std, seed_u, lab, ii, out, coef, grad)

        per_row = _row_loss(s, run, common.out_dtype(s, t), fn)
    if scale_by_t_squared:
        per_row = per_row * (temps * temps).to(per_row.dtype)
    return common.reduce(per_row, common.valid(lab, ii, n), lead, reduction)


# ---------------------------------------------------------------------------------------------
# MDCS consistency self-distillation.
# ---------------------------------------------------------------------------------------------


@check.public("mdcs_consistency_loss", logits_args=("strong_logits", "weak_logits"))
def mdcs_consistency_loss(
    strong_logits: torch.Tensor,
    weak_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    return_mask: bool = False,
):
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
    reduction = check.reduction(fn, reduction)
    s = check.logits(fn, "strong_logits", strong_logits)
    w = check.logits(fn, "weak_logits", weak_logits)
    check.same_shape(fn, "weak_logits", w, s, "strong_logits")
    lead = s.shape[:-1]
    n = math.prod(lead)
    lab = common.labels(fn, labels, lead, n, True)
    ignore_index = check.integer(fn, "ignore_index", ignore_index)
    if _ops.ENABLED and _ops.compiling():  # checked when the graph runs
        lab = _ops.checked_labels_op(lab, s.shape[-1], ignore_index, fn)
    else:
        check.label_range(fn, "labels", lab, s.shape[-1], ignore_index)
    temperature = check.positive(fn, "temperature", temperature)
    with torch.no_grad():
        pred = w.detach().reshape(n, s.shape[-1]).argmax(-1)
        mask = (pred == lab) & (lab != ignore_index)
        cis_labels = torch.where(mask, lab, torch.full_like(lab, ignore_index))
    red = (
        "mean" if reduction == "mean" else ("sum" if reduction in ("sum", "batchmean") else "none")
    )
    loss = divergence(
        s,
        w.detach(),
        "forward_kl",
        temperature=temperature,
        labels=cis_labels.reshape(lead),
        ignore_index=ignore_index,
        reduction=red,
    )
    if reduction == "batchmean":
        loss = loss / max(n, 1)
    loss = loss * (temperature * temperature)
    return (loss, mask.reshape(lead)) if return_mask else loss
