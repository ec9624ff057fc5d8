"""divkit.distill: each method against an independent float64 torch implementation written
here, the properties the method must have, gradcheck, and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import divkit
from divkit import distill as D

torch.set_default_dtype(torch.float32)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _logits(n, v, seed=0, scale=2.0, dtype=torch.float64):
    return (torch.randn(n, v, generator=_gen(seed), dtype=torch.float64) * scale).to(dtype)


def _labels(n, v, seed=0):
    return torch.randint(0, v, (n,), generator=_gen(seed + 100))


def _fkl(t, s, T=1.0):
    lp, lq = F.log_softmax(t / T, -1), F.log_softmax(s / T, -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def _ent(x, T=1.0):
    lp = F.log_softmax(x / T, -1)
    return -(lp.exp() * lp).sum(-1)


# ---------------------------------------------------------------------------------------------
# BD-KD
# ---------------------------------------------------------------------------------------------


def test_bdkd_matches_reference_and_weights_in_unit_interval():
    s, t = _logits(6, 11, 1), _logits(6, 11, 2, scale=3.0)
    loss, w = D.bdkd_loss(
        s, t, temperature=2.0, gap_scale=0.5, reduction="none", return_weights=True
    )
    wr = torch.sigmoid((_ent(s, 2.0) - _ent(t, 2.0)) / 0.5)
    ref = (1 - wr) * _fkl(t, s, 2.0) + wr * _fkl(s, t, 2.0)
    # The weights come from divkit's fp64 entropy kernel; the KLs from the fused fp32 kernels.
    torch.testing.assert_close(w.double(), wr, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    assert bool(((w >= 0) & (w <= 1)).all())


def test_bdkd_extremes_are_forward_and_reverse_kl():
    # rows 0-2: student much flatter than the teacher (H_s > H_t) -> reverse KL;
    # rows 3-5: student much sharper -> forward KL.
    s = torch.cat([_logits(3, 9, 3, scale=0.1), _logits(3, 9, 4, scale=8.0)])
    t = torch.cat([_logits(3, 9, 5, scale=8.0), _logits(3, 9, 6, scale=0.1)])
    for gap_scale in (0.0, 1e-6):
        loss, w = D.bdkd_loss(s, t, gap_scale=gap_scale, reduction="none", return_weights=True)
        assert w[:3].tolist() == [1.0, 1.0, 1.0] and w[3:].tolist() == [0.0, 0.0, 0.0]
        torch.testing.assert_close(loss[:3].double(), _fkl(s[:3], t[:3]), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loss[3:].double(), _fkl(t[3:], s[3:]), rtol=1e-5, atol=1e-6)


def test_bdkd_gradcheck_student_and_teacher():
    s = _logits(3, 5, 7).requires_grad_()
    t = _logits(3, 5, 8).requires_grad_()  # online KD: the teacher learns too
    # The weights carry no gradient (as in the paper's per-sample balance): gradcheck with the
    # step weights (gap_scale = 0), which are locally constant, so that finite differences see
    # the same function; fp32 arithmetic in the fused divergence kernels: a coarse step.
    gaps = D.row_entropy(s, temperature=1.5) - D.row_entropy(t, temperature=1.5)
    assert bool((gaps.abs() > 1e-2).all())
    assert torch.autograd.gradcheck(
        lambda a, b: D.bdkd_loss(a, b, temperature=1.5, gap_scale=0.0),
        (s, t),
        eps=1e-3,
        atol=2e-3,
        rtol=1e-2,
    )
    # With smooth weights the gradient is that of the loss at fixed weights.
    loss, w = D.bdkd_loss(s, t, temperature=1.5, reduction="sum", return_weights=True)
    g = torch.autograd.grad(loss, (s, t))
    fixed = (
        (1 - w) * divkit.divergence(s, t, temperature=1.5, reduction="none")
        + w * divkit.divergence(s, t, "reverse_kl", temperature=1.5, reduction="none")
    ).sum()
    for a, b in zip(g, torch.autograd.grad(fixed, (s, t))):
        torch.testing.assert_close(a, b)


def test_bdkd_ignore_index_and_mean():
    s, t = _logits(5, 6, 9), _logits(5, 6, 10)
    y = torch.tensor([1, -100, 2, -100, 0])
    per = D.bdkd_loss(s, t, labels=y, reduction="none")
    assert per[1] == 0 and per[3] == 0
    mean = D.bdkd_loss(s, t, labels=y)
    torch.testing.assert_close(mean, per.sum() / 3)
    assert per.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# NKD / USKD
# ---------------------------------------------------------------------------------------------


def _nkd_ref(s, t, y, tau, gamma):
    n, v = s.shape
    p = F.softmax(t, -1)
    lq = F.log_softmax(s, -1)
    target = -(p.gather(1, y[:, None]) * lq.gather(1, y[:, None]))[:, 0]
    mask = F.one_hot(y, v).bool()
    tn = (t / tau).masked_fill(mask, -math.inf)
    sn = (s / tau).masked_fill(mask, -math.inf)
    ph = F.softmax(tn, -1)
    lqh = F.log_softmax(sn, -1).masked_fill(mask, 0.0)
    nontarget = -(ph * lqh).sum(-1)
    return target + gamma * tau * tau * nontarget


@pytest.mark.parametrize("tau,gamma", [(1.0, 1.5), (2.0, 3.5), (0.7, 0.0)])
def test_nkd_matches_reference(tau, gamma):
    s, t, y = _logits(8, 13, 11), _logits(8, 13, 12), _labels(8, 13, 1)
    got = D.nkd_loss(s, t, y, temperature=tau, gamma=gamma, reduction="none")
    torch.testing.assert_close(got, _nkd_ref(s, t, y, tau, gamma), rtol=1e-10, atol=1e-12)


def test_nkd_gamma_zero_is_target_term_and_fp32():
    s, t, y = (
        _logits(6, 10, 13, dtype=torch.float32),
        _logits(6, 10, 14, dtype=torch.float32),
        _labels(6, 10, 2),
    )
    got = D.nkd_loss(s, t, y, gamma=0.0, reduction="sum")
    p = F.softmax(t.double(), -1).gather(1, y[:, None])[:, 0]
    lq = F.log_softmax(s.double(), -1).gather(1, y[:, None])[:, 0]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), -(p * lq).sum(), rtol=1e-6, atol=1e-6)


def test_nkd_gradcheck_and_ignore():
    s = _logits(4, 6, 15).requires_grad_()
    t = _logits(4, 6, 16)
    y = torch.tensor([0, -100, 5, 2])
    assert torch.autograd.gradcheck(
        lambda a: D.nkd_loss(a, t, y, temperature=1.5, gamma=2.0), (s,), eps=1e-6, atol=1e-6
    )
    per = D.nkd_loss(s, t, y, reduction="none")
    assert per[1] == 0
    (g,) = torch.autograd.grad(per.sum(), s)
    assert bool((g[1] == 0).all())


def test_nkd_bf16_within_fp32_reference():
    s, t, y = _logits(5, 33, 17), _logits(5, 33, 18), _labels(5, 33, 3)
    got = D.nkd_loss(s.bfloat16(), t.bfloat16(), y, temperature=2.0)
    ref = _nkd_ref(s.bfloat16().double(), t.bfloat16().double(), y, 2.0, 1.5).mean()
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6)


def _uskd_ref(s, y, wk, alpha, beta, mu):
    # USKD as the official USKDLoss computes it (yzd-v/cls_KD uskd.py), per row, in fp64.
    n, c = s.shape
    q = F.softmax(s, -1)
    lq = F.log_softmax(s, -1)
    qy2 = q[torch.arange(n), y] ** 2
    t = qy2 + 1 - qy2.mean()
    w = F.softmax(wk, -1)
    lw = F.log_softmax(wk, -1)
    loss = []
    zs = []
    for i in range(n):
        yi = int(y[i])
        score = [
            float(w[i, j] / (1 - w[i, yi] + 1e-6) + lq[i, j] / (1 - lq[i, yi] + 1e-6))
            for j in range(c)
        ]
        order = sorted(range(c), key=lambda j: -score[j])
        zipf = torch.zeros(c, dtype=torch.float64)
        for k, j in enumerate(order, start=1):
            zipf[j] = 1.0 / k
        zipf[yi] = 0.0
        zipf = zipf / zipf.sum()
        zs.append(zipf)
        others = [j for j in range(c) if j != yi]
        lqh = F.log_softmax(s[i, others], -1)
        e = torch.full((c,), 0.1 / c, dtype=torch.float64)
        e[yi] += 0.9
        loss.append(
            -alpha * t[i] * lq[i, yi] - beta * (zipf[others] * lqh).sum() - mu * (e * lw[i]).sum()
        )
    return torch.stack(loss), t, torch.stack(zs)


def test_uskd_matches_official_formula():
    n, c = 6, 9
    s, wk, y = _logits(n, c, 19), _logits(n, c, 20), _labels(n, c, 4)
    target, z = D.uskd_soft_labels(s, y, wk)
    ref, tref, zref = _uskd_ref(s, y, wk, 1.0, 0.1, 0.005)
    torch.testing.assert_close(target, tref)
    torch.testing.assert_close(z, zref)
    assert float(target.mean()) == pytest.approx(1.0)  # the batch mean is shifted to 1
    # The weak term is divkit's cross_entropy divergence, which accumulates in fp32.
    got = D.uskd_loss(s, y, wk, reduction="none")
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)
    got = D.uskd_loss(s, y, wk, alpha=0.7, beta=0.3, mu=0.2, reduction="mean")
    torch.testing.assert_close(
        got, _uskd_ref(s, y, wk, 0.7, 0.3, 0.2)[0].mean(), rtol=1e-6, atol=1e-7
    )
    torch.testing.assert_close(
        D.uskd_loss(s, y, wk, mu=0.0, reduction="none"),
        _uskd_ref(s, y, wk, 1.0, 0.1, 0.0)[0],
        rtol=1e-10,
        atol=1e-12,
    )
    # Gradients: the soft labels are constants; the weak term alone reaches weak_logits.
    sg, wg = s.clone().requires_grad_(), wk.clone().requires_grad_()
    gs, gw = torch.autograd.grad(D.uskd_loss(sg, y, wg, mu=0.2, reduction="sum"), (sg, wg))
    sr, wr = s.clone().requires_grad_(), wk.clone().requires_grad_()
    lq = F.log_softmax(sr, -1)
    mask = F.one_hot(y, c).bool()
    lqh = F.log_softmax(sr.masked_fill(mask, -math.inf), -1).masked_fill(mask, 0.0)
    e = torch.full((n, c), 0.1 / c, dtype=torch.float64) + 0.9 * F.one_hot(y, c)
    lr = (
        -tref * lq.gather(1, y[:, None])[:, 0]
        - 0.1 * (zref * lqh).sum(-1)
        - 0.2 * (e * F.log_softmax(wr, -1)).sum(-1)
    ).sum()
    gsr, gwr = torch.autograd.grad(lr, (sr, wr))
    torch.testing.assert_close(gs, gsr, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(gw, gwr, rtol=1e-6, atol=1e-7)
    # Ignored rows: zero loss and labels; the batch mean is over the others.
    yi = y.clone()
    yi[2] = -100
    t2, z2 = D.uskd_soft_labels(s, yi, wk)
    assert float(t2[2]) == 0.0 and float(z2[2].abs().sum()) == 0.0
    assert float(t2[yi != -100].mean()) == pytest.approx(1.0)
    assert float(D.uskd_loss(s, yi, wk, reduction="none")[2]) == 0.0


# ---------------------------------------------------------------------------------------------
# OFA
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps,T", [(1.0, 1.0), (1.5, 2.0), (0.5, 1.0)])
def test_ofa_matches_reference(eps, T):
    s, t, y = _logits(7, 12, 21), _logits(7, 12, 22), _labels(7, 12, 5)
    e = F.one_hot(y, 12).double()
    ref = -(((F.softmax(t / T, -1) + e) ** eps - e) * F.log_softmax(s / T, -1)).sum(-1).mean()
    torch.testing.assert_close(
        D.ofa_loss(s, t, y, eps=eps, temperature=T), ref, rtol=1e-10, atol=1e-12
    )


def test_ofa_eps_one_is_soft_cross_entropy_and_gradcheck():
    s, t, y = _logits(5, 9, 23), _logits(5, 9, 24), _labels(5, 9, 6)
    ce = divkit.divergence(s, t, "cross_entropy", reduction="none")
    torch.testing.assert_close(
        D.ofa_loss(s, t, y, eps=1.0, reduction="none"), ce.double(), rtol=1e-6, atol=1e-6
    )
    sg = s.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a: D.ofa_loss(a, t, y, eps=1.7, temperature=1.3), (sg,), eps=1e-6, atol=1e-6
    )


# ---------------------------------------------------------------------------------------------
# DAC-KL
# ---------------------------------------------------------------------------------------------


def _clipped_ref(s, t, lo, hi, T, sharp):
    p, lp = F.softmax(t / T, -1), F.log_softmax(t / T, -1)
    q = F.softmax(s / T, -1)
    if sharp == 0:
        # Slack of a few ulps: torch's softmax and the kernel's may round a boundary token apart.
        w = ((p >= lo[:, None] * (1 - 1e-12)) & (p <= hi[:, None] * (1 + 1e-12))).double()
    else:
        w = torch.sigmoid((lp - lo.log()[:, None]) / sharp) * torch.sigmoid(
            (hi.log()[:, None] - lp) / sharp
        )
    pt = w * p / (w * p).sum(-1, keepdim=True)
    qt = w * q / (w * q).sum(-1, keepdim=True)
    term = torch.where(
        pt > 0, pt * (pt.clamp_min(1e-300).log() - qt.clamp_min(1e-300).log()), torch.zeros_like(pt)
    )
    return term.sum(-1)


def test_dac_kl_quantile_bounds_and_hard_mask():
    s, t = _logits(6, 20, 25), _logits(6, 20, 26)
    lo, hi = D.dac_kl_mass_bounds(t, mass_lo=0.0, mass_hi=0.8)
    # Independent bounds: sort, mass before each token.
    p = F.softmax(t, -1)
    for i in range(6):
        ps = p[i].sort(descending=True).values
        before = torch.cat([ps.new_zeros(1), ps.cumsum(0)[:-1]])
        kept = ps[(before >= 0) & (before < 0.8)]
        assert float(hi[i]) == pytest.approx(float(kept[0]), rel=1e-12)
        assert float(lo[i]) == pytest.approx(float(kept[-1]), rel=1e-12)
    got = D.dac_kl_loss(s, t, mass_lo=0.0, mass_hi=0.8, reduction="none")
    torch.testing.assert_close(got, _clipped_ref(s, t, lo, hi, 1.0, 0.0), rtol=1e-9, atol=1e-12)
    # The full region is the plain forward KL.
    full = D.dac_kl_loss(s, t, mass_lo=0.0, mass_hi=1.0, reduction="none")
    torch.testing.assert_close(full, _fkl(t, s), rtol=1e-9, atol=1e-12)


def test_dac_kl_float32_quantile_bounds_keep_their_boundary_tokens():
    # float32 bounds rounded to nearest could fall inside the kept probabilities (the kernel
    # compares float64 ones with them) and drop the boundary tokens, the top token among them:
    # the float32 loss must be the float64 loss of the same values.
    s, t = _logits(16, 37, 27, scale=6.0), _logits(16, 37, 28, scale=6.0)
    s32, t32 = s.float(), t.float()
    lo, hi = D.dac_kl_mass_bounds(t32, temperature=2.0)
    lo64, hi64 = D.dac_kl_mass_bounds(t32.double(), temperature=2.0)
    assert lo.dtype == torch.float32
    assert bool((lo.double() <= lo64).all()) and bool((hi.double() >= hi64).all())
    got = D.dac_kl_loss(s32, t32, temperature=2.0, reduction="none")
    want = D.dac_kl_loss(s32.double(), t32.double(), temperature=2.0, reduction="none")
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_dac_kl_soft_mask_reference_and_gradcheck_in_bounds():
    s, t = _logits(4, 10, 27), _logits(4, 10, 28)
    p = F.softmax(t, -1)
    lo = p.max(-1).values * 0.05
    hi = p.max(-1).values * 0.9
    got = D.dac_kl_loss(s, t, lo, hi, sharpness=0.3, reduction="none")
    torch.testing.assert_close(got, _clipped_ref(s, t, lo, hi, 1.0, 0.3), rtol=1e-9, atol=1e-12)
    sg, log_lo, log_hi = (
        s.clone().requires_grad_(),
        lo.log().requires_grad_(),
        hi.log().requires_grad_(),
    )
    f = lambda a, b, c: D.dac_kl_loss(a, t, b.exp(), c.exp(), sharpness=0.3, temperature=1.2)
    assert torch.autograd.gradcheck(f, (sg, log_lo, log_hi), eps=1e-6, atol=1e-6)


def _clipped_ref_log_space(s, t, lo, hi, T, sharp):
    """_clipped_ref with q~ from log-probabilities (no underflow where q is below 1e-308)."""
    lp, lq = F.log_softmax(t / T, -1), F.log_softmax(s / T, -1)
    if sharp == 0:
        p = lp.exp()
        w = ((p >= lo[:, None] * (1 - 1e-12)) & (p <= hi[:, None] * (1 + 1e-12))).to(s.dtype)
    else:
        w = torch.sigmoid((lp - lo.log()[:, None]) / sharp) * torch.sigmoid(
            (hi.log()[:, None] - lp) / sharp
        )
    # Outside the region log w = -1e4 (finite, so that autograd meets no inf - inf): its terms are
    # exactly 0.
    lw = torch.where(w > 0, w.clamp_min(1e-300).log(), torch.full_like(w, -1e4))
    lpt = lw + lp - torch.logsumexp(lw + lp, -1, keepdim=True)
    lqt = lw + lq - torch.logsumexp(lw + lq, -1, keepdim=True)
    return (lpt.exp() * (lpt - lqt)).sum(-1)


@pytest.mark.parametrize("sharp", [0.0, 0.4])
def test_dac_kl_student_with_almost_no_mass_in_the_region_is_finite(sharp):
    # Row 0: the student's logits on the teacher's region (tokens 0 and 1) lie 800 and 1500 below
    # its max, so its mass there is 0 in float64 and summing q gave +inf; the loss is finite (the
    # region's two tokens 700 apart in log q). Row 1: one region token far down, one not.
    t = torch.tensor([[6.0, 5.5, 0.0, 0.0, -1.0, 0.0], [3.0, 0.0, 4.0, 0.0, 0.0, 1.0]]).double()
    s = torch.tensor([[0.0, -700.0, 800.0, 0.0, 1.0, 0.0], [0.0, 1.0, -1500.0, 2.0, 0.0, 0.0]])
    s = s.double()
    p = F.softmax(t, -1)
    lo = p.max(-1).values * 0.3
    hi = p.max(-1).values * 1.5
    want = _clipped_ref_log_space(s, t, lo, hi, 1.0, sharp)
    assert bool(torch.isfinite(want).all()) and float(want.min()) > 100
    got = D.dac_kl_loss(s, t, lo, hi, sharpness=sharp, reduction="none")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0.0)
    # The gradients (student; the bounds too with the soft mask) against autograd through the
    # log-space reference.
    sg, lg, hg = (x.clone().requires_grad_() for x in (s, lo, hi))
    D.dac_kl_loss(sg, t, lg, hg, sharpness=sharp, reduction="sum").backward()
    sr, lr, hr = (x.clone().requires_grad_() for x in (s, lo, hi))
    _clipped_ref_log_space(sr, t, lr, hr, 1.0, sharp).sum().backward()
    torch.testing.assert_close(sg.grad, sr.grad, rtol=1e-9, atol=1e-12)
    if sharp > 0:
        torch.testing.assert_close(lg.grad, lr.grad, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(hg.grad, hr.grad, rtol=1e-9, atol=1e-12)
    # float32 logits: the same finite loss.
    got32 = D.dac_kl_loss(s.float(), t.float(), lo.float(), hi.float(), sharpness=sharp)
    assert math.isfinite(float(got32))
    torch.testing.assert_close(got32.double(), want.mean(), rtol=1e-5, atol=0.0)


def test_dac_kl_learnable_bounds_module_trains():
    torch.manual_seed(0)
    s, t = _logits(16, 24, 29, dtype=torch.float32), _logits(16, 24, 30, dtype=torch.float32)
    loss_fn = D.DACKLLoss(k=8, hidden=16, sharpness=0.5)
    lower, upper = loss_fn.bounds(t)
    assert bool((lower > 0).all() and (lower < upper).all())
    pmax = F.softmax(t, -1).max(-1).values
    torch.testing.assert_close(upper, pmax * 1.05, rtol=0.05, atol=0)
    loss = loss_fn(s.requires_grad_(), t)
    loss.backward()
    grads = [p.grad for p in loss_fn.parameters()]
    assert all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)
    assert s.grad is not None and float(s.grad.abs().sum()) > 0


# ---------------------------------------------------------------------------------------------
# Swing
# ---------------------------------------------------------------------------------------------


def test_swing_matches_reference_with_noise():
    s, t = _logits(5, 14, 31), _logits(5, 14, 32)
    score = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    temps = 1.0 + 3.0 * score
    torch.testing.assert_close(D.swing_temperatures(score, t_min=1.0, t_max=4.0), temps)
    eps = D.swing_noise(7, (5, 14))
    assert abs(float(eps.mean())) < 0.3 and 0.7 < float(eps.std()) < 1.3
    got = D.swing_loss(s, t, score, t_min=1.0, t_max=4.0, noise_std=0.3, seed=7, reduction="none")
    lp = F.log_softmax(t / temps[:, None] + 0.3 * eps, -1)
    lq = F.log_softmax(s / temps[:, None], -1)
    ref = (lp.exp() * (lp - lq)).sum(-1)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)
    # Same seed: same loss; another seed: another one; no noise: per-token-temperature KL.
    assert float(D.swing_loss(s, t, score, noise_std=0.3, seed=7)) == float(
        D.swing_loss(s, t, score, noise_std=0.3, seed=7)
    )
    assert float(D.swing_loss(s, t, score, noise_std=0.3, seed=8)) != float(
        D.swing_loss(s, t, score, noise_std=0.3, seed=7)
    )
    clean = D.swing_loss(s, t, temperatures=temps, reduction="none")
    torch.testing.assert_close(
        clean,
        (F.softmax(t / temps[:, None], -1) * (F.log_softmax(t / temps[:, None], -1) - lq)).sum(-1),
        rtol=1e-9,
        atol=1e-12,
    )


def test_swing_privacy_scores_with_batch_and_sequence_dims():
    # [B, L, V] logits with [B, L] privacy scores (the LM layout): the rows' losses of the
    # flattened [B * L, V] call, and those of the temperatures the scores map to.
    s, t = _logits(6, 11, 37), _logits(6, 11, 38)
    score = torch.linspace(0, 1, 6, dtype=torch.float64)
    want = D.swing_loss(s, t, score, noise_std=0.2, seed=3, reduction="none")
    got = D.swing_loss(
        s.reshape(2, 3, 11),
        t.reshape(2, 3, 11),
        score.reshape(2, 3),
        noise_std=0.2,
        seed=3,
        reduction="none",
    )
    assert got.shape == (2, 3)
    torch.testing.assert_close(got.reshape(6), want, rtol=0, atol=0)
    temps = D.swing_temperatures(score.reshape(2, 3))
    by_t = D.swing_loss(
        s.reshape(2, 3, 11),
        t.reshape(2, 3, 11),
        temperatures=temps,
        noise_std=0.2,
        seed=3,
        reduction="none",
    )
    torch.testing.assert_close(by_t, got, rtol=0, atol=0)


def test_swing_gradcheck_and_thread_independence():
    s, t = _logits(3, 7, 33).requires_grad_(), _logits(3, 7, 34)
    sc = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda a: D.swing_loss(a, t, sc, noise_std=0.2, seed=1, scale_by_t_squared=True),
        (s,),
        eps=1e-6,
        atol=1e-6,
    )
    big_s, big_t = (
        _logits(64, 50, 35, dtype=torch.float32),
        _logits(64, 50, 36, dtype=torch.float32),
    )
    sc = torch.rand(64, generator=_gen(1))
    old = divkit.get_num_threads()
    try:
        divkit.set_num_threads(1)
        a = D.swing_loss(big_s, big_t, sc, noise_std=0.5, seed=3, reduction="none")
        divkit.set_num_threads(2)
        b = D.swing_loss(big_s, big_t, sc, noise_std=0.5, seed=3, reduction="none")
    finally:
        divkit.set_num_threads(old)
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# MDCS
# ---------------------------------------------------------------------------------------------


def test_mdcs_only_correct_instances():
    strong, weak = _logits(8, 6, 37), _logits(8, 6, 38)
    y = weak.argmax(-1).clone()
    y[::2] = (y[::2] + 1) % 6  # half of them misclassified by the weak view
    loss, mask = D.mdcs_consistency_loss(strong, weak, y, temperature=2.0, return_mask=True)
    assert mask.tolist() == [False, True] * 4
    # The official MDCSLoss term: F.kl_div(log_softmax(strong / T)[sel], softmax(weak / T)[sel],
    # 'batchmean') * T^2, the selected rows those the weak view classifies correctly.
    sel = weak.argmax(-1) == y
    ref = (
        F.kl_div(
            F.log_softmax(strong[sel] / 2.0, -1),
            F.softmax(weak[sel] / 2.0, -1),
            reduction="batchmean",
        )
        * 4.0
    )
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(
        D.mdcs_consistency_loss(strong, weak, y, temperature=2.0, reduction="none").double(),
        4.0 * _fkl(weak, strong, 2.0) * sel,
        rtol=1e-6,
        atol=1e-7,
    )
    # Gradient only through the strong view, only on the selected rows.
    sg, wg = strong.clone().requires_grad_(), weak.clone().requires_grad_()
    D.mdcs_consistency_loss(sg, wg, y).backward()
    assert wg.grad is None or float(wg.grad.abs().sum()) == 0
    assert float(sg.grad[::2].abs().sum()) == 0 and float(sg.grad[1::2].abs().sum()) > 0
    # None correct: zero loss.
    bad = (weak.argmax(-1) + 1) % 6
    assert float(D.mdcs_consistency_loss(strong, weak, bad)) == 0.0


# ---------------------------------------------------------------------------------------------
# ND loss
# ---------------------------------------------------------------------------------------------


def test_nd_loss_reference_and_properties():
    n, d, c = 10, 5, 3
    fs = torch.randn(n, d, generator=_gen(2), dtype=torch.float64)
    ft = torch.randn(n, d, generator=_gen(3), dtype=torch.float64)
    y = torch.arange(n) % c
    means = D.teacher_class_means(ft, y, c)
    for k in range(c):
        torch.testing.assert_close(means[k], ft[y == k].mean(0))
    got = D.nd_loss(fs, ft, y, means, reduction="none")
    ref = torch.stack(
        [
            1 - fs[i] @ (means[y[i]] / means[y[i]].norm()) / max(fs[i].norm(), ft[i].norm())
            for i in range(n)
        ]
    )
    torch.testing.assert_close(got, ref)
    # Aligned with the class mean and at least as long as the teacher feature: the minimum 0.
    e = means[y] / means[y].norm(dim=1, keepdim=True)
    aligned = e * (ft.norm(dim=1, keepdim=True) * 2)
    torch.testing.assert_close(
        D.nd_loss(aligned, ft, y, means, reduction="none"),
        torch.zeros(n, dtype=torch.float64),
        atol=1e-12,
        rtol=0,
    )
    fsg = fs.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a: D.nd_loss(a, ft, y, means), (fsg,))
    # The official DirectNormLoss loop (WangYZ1608 CIFAR/utils.py): the gradient passes through
    # ||f_s|| where it is the larger norm; half the rows made longer than the teacher's.
    fs2 = fs.clone()
    fs2[::2] *= 10
    fa, fb = fs2.clone().requires_grad_(), fs2.clone().requires_grad_()
    (ga,) = torch.autograd.grad(D.nd_loss(fa, ft, y, means), fa)
    ref = (
        sum(
            1 - torch.dot(fb[i], means[y[i]] / means[y[i]].norm()) / max(fb[i].norm(), ft[i].norm())
            for i in range(n)
        )
        / n
    )
    (gb,) = torch.autograd.grad(ref, fb)
    torch.testing.assert_close(ga, gb)


# ---------------------------------------------------------------------------------------------
# LDR / comp-sum
# ---------------------------------------------------------------------------------------------


def _ldr_ref(z, y, lam, margin):
    n, c = z.shape
    out = []
    for i in range(n):
        a = [(margin if k != y[i] else 0.0) + float(z[i, k] - z[i, y[i]]) for k in range(c)]
        li = float(lam[i]) if isinstance(lam, torch.Tensor) else lam
        out.append(li * math.log(sum(math.exp(ak / li) for ak in a) / c))
    return torch.tensor(out, dtype=torch.float64)


def test_ldr_kl_reference_limits_and_gradcheck():
    z, y = _logits(6, 5, 39), _labels(6, 5, 7)
    torch.testing.assert_close(
        D.ldr_kl_loss(z, y, lam=0.7, margin=0.2, reduction="none"), _ldr_ref(z, y, 0.7, 0.2)
    )
    # lam = 1, margin = 0: cross-entropy - log C.
    torch.testing.assert_close(
        D.ldr_kl_loss(z, y, lam=1.0, margin=0.0, reduction="none"),
        F.cross_entropy(z, y, reduction="none") - math.log(5),
    )
    # lam -> 0: max_k a_k.
    a = z - z.gather(1, y[:, None]) + 0.1
    a = a.scatter(1, y[:, None], 0.0)
    torch.testing.assert_close(
        D.ldr_kl_loss(z, y, lam=1e-4, reduction="none"), a.max(1).values, atol=1e-3, rtol=0
    )
    zg = z.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a: D.ldr_kl_loss(a, y, lam=0.5), (zg,))


def _aldr_ref(z, y, alpha, lam0, margin, prev):
    # ALDR-KL as written in the paper's code (ALDRLoss_V1), per row in fp64, KL exact.
    n, c = z.shape
    out, lams = [], []
    for i in range(n):
        p = F.softmax(z[i] / prev[i], -1)
        kl = float((p * torch.log(c * p)).sum())
        lam = lam0 * (1 - kl / (alpha * math.log(c)))
        a = torch.tensor(
            [margin * (k != int(y[i])) + float(z[i, k] - z[i, y[i]]) for k in range(c)],
            dtype=torch.float64,
        )
        ldr = lam * math.log(float(torch.exp(a / lam).mean()))
        out.append(ldr - alpha * math.log(c) / (2 * lam0) * (lam - lam0) ** 2)
        lams.append(lam)
    return torch.tensor(out, dtype=torch.float64), torch.tensor(lams, dtype=torch.float64)


def test_aldr_kl_matches_official_rule():
    z, y = _logits(6, 5, 41), _labels(6, 5, 8)
    loss, lam = D.aldr_kl_loss(z, y, alpha=2.0, lam0=1.0, reduction="none", return_lam=True)
    ref, lam_ref = _aldr_ref(z, y, 2.0, 1.0, 0.1, torch.ones(6, dtype=torch.float64))
    torch.testing.assert_close(lam, lam_ref)
    torch.testing.assert_close(loss, ref)
    # lam in [lam0 (1 - 1/alpha), lam0]; a flat row keeps lam0.
    assert bool(((lam >= 0.5 - 1e-12) & (lam <= 1.0 + 1e-12)).all())
    flat = torch.zeros(1, 5, dtype=torch.float64)
    assert float(D.aldr_kl_loss(flat, y[:1], return_lam=True)[1][0]) == pytest.approx(1.0)
    # Second visit: p from the stored lam.
    loss2, lam2 = D.aldr_kl_loss(
        z, y, alpha=3.0, lam0=0.5, margin=0.2, prev_lam=lam, reduction="none", return_lam=True
    )
    ref2, lam2_ref = _aldr_ref(z, y, 3.0, 0.5, 0.2, lam)
    torch.testing.assert_close(lam2, lam2_ref)
    torch.testing.assert_close(loss2, ref2)
    # lam carries no gradient: the logits' gradient is LDR-KL's at lam.
    zg = z.clone().requires_grad_()
    (g1,) = torch.autograd.grad(D.aldr_kl_loss(zg, y, reduction="sum"), zg)
    zg2 = z.clone().requires_grad_()
    (g2,) = torch.autograd.grad(D.ldr_kl_loss(zg2, y, lam=lam, reduction="sum"), zg2)
    torch.testing.assert_close(g1, g2)
    # The module keeps lam per instance across visits, as the official loss does.
    mod = D.ALDRKLLoss(10, alpha=2.0, lam0=1.0)
    ids = torch.tensor([7, 1, 3, 0, 9, 4])
    first = mod(z, y, ids)
    torch.testing.assert_close(first, ref.mean())
    torch.testing.assert_close(mod.lam[ids], lam_ref)
    assert float(mod.lam[2]) == 1.0
    second = mod(z, y, ids)
    torch.testing.assert_close(second, _aldr_ref(z, y, 2.0, 1.0, 0.1, lam_ref)[0].mean())
    with pytest.raises(divkit.Error, match="aldr_kl_loss: alpha must be finite and > 1"):
        D.aldr_kl_loss(z, y, alpha=1.0)
    with pytest.raises(divkit.Error, match="aldr_kl_loss: prev_lam must be finite and > 0"):
        D.aldr_kl_loss(z, y, prev_lam=torch.zeros(6))
    with pytest.raises(divkit.Error, match="ALDRKLLoss: ids must be"):
        mod(z, y, torch.tensor([0, 1, 2, 3, 4, 10]))


@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0, 1.3, 1.7, 2.0, 3.0])
def test_comp_sum_matches_definition(tau):
    z, y = _logits(7, 6, 43), _labels(7, 6, 9)
    zy = z.gather(1, y[:, None])
    u = (torch.exp(z - zy).sum(1, keepdim=True) - 1)[:, 0]
    ref = torch.log1p(u) if tau == 1.0 else ((1 + u) ** (1 - tau) - 1) / (1 - tau)
    torch.testing.assert_close(
        D.comp_sum_loss(z, y, tau=tau, reduction="none"), ref, rtol=1e-10, atol=1e-12
    )
    zg = z.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a: D.comp_sum_loss(a, y, tau=tau), (zg,))


def test_comp_sum_named_members_and_adversarial():
    z, y = _logits(5, 4, 45), _labels(5, 4, 10)
    py = F.softmax(z, -1).gather(1, y[:, None])[:, 0]
    torch.testing.assert_close(D.mae_loss(z, y, reduction="none"), 1 - py)
    torch.testing.assert_close(
        D.generalized_cross_entropy(z, y, q=0.7, reduction="none"), (1 - py**0.7) / 0.7
    )
    torch.testing.assert_close(
        D.comp_sum_loss(z, y, reduction="none"), F.cross_entropy(z, y, reduction="none")
    )
    adv = z + _logits(5, 4, 46, scale=0.1)
    got = D.smooth_adversarial_comp_sum_loss(z, adv, y, tau=1.0, nu=0.5, reduction="none")
    torch.testing.assert_close(
        got, F.cross_entropy(z, y, reduction="none") + 0.5 * (adv - z).norm(dim=1)
    )
    same = D.smooth_adversarial_comp_sum_loss(z, z, y, reduction="none")
    torch.testing.assert_close(same, F.cross_entropy(z, y, reduction="none"))
    zg, ag = z.clone().requires_grad_(), adv.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: D.smooth_adversarial_comp_sum_loss(a, b, y, tau=1.5, nu=0.3), (zg, ag)
    )


# ---------------------------------------------------------------------------------------------
# MiniPLM
# ---------------------------------------------------------------------------------------------


def test_miniplm_selection_weights_and_files(tmp_path):
    lt = torch.tensor([-10.0, -50.0, -20.0, -8.0, -30.0, -12.0], dtype=torch.float64)
    lr = torch.tensor([-12.0, -51.0, -30.0, -9.0, -20.0, -12.0], dtype=torch.float64)
    ln = torch.tensor([2.0, 1.0, 5.0, 1.0, 10.0, 3.0], dtype=torch.float64)
    score = (lt - lr) / ln  # [1, 1, 2, 1, -1, 0]
    torch.testing.assert_close(D.miniplm_scores(lt, lr, ln), score)
    sel = D.miniplm_difference_sampling(lt, lr, lengths=ln, ratio=0.5)
    assert sel.tolist() == [0, 1, 2]  # score 2 then the first two of the tied 1s
    w = D.miniplm_difference_sampling(lt, lr, lengths=ln, mode="weights", temperature=0.5)
    torch.testing.assert_close(w, torch.softmax(score / 0.5, 0) * 6)
    assert float(w.mean()) == pytest.approx(1.0)
    # Files: text columns, npz, pt.
    txt = tmp_path / "docs.txt"
    np.savetxt(txt, np.stack([lt.numpy(), lr.numpy(), ln.numpy()], 1))
    npz = tmp_path / "docs.npz"
    np.savez(npz, teacher=lt.numpy(), reference=lr.numpy(), lengths=ln.numpy())
    pt = tmp_path / "docs.pt"
    torch.save({"teacher": lt, "reference": lr, "lengths": ln}, pt)
    for p in (txt, npz, pt):
        assert D.miniplm_difference_sampling(path=p, ratio=0.5).tolist() == [0, 1, 2]


# ---------------------------------------------------------------------------------------------
# DDK
# ---------------------------------------------------------------------------------------------


def test_ddk_weights_sum_to_one_and_move_toward_gap():
    ls = torch.tensor([2.0, 3.0, 2.5])
    lt = torch.tensor([1.9, 2.0, 2.4])  # domain 1 has the largest gap
    w = D.ddk_domain_weights(ls, lt, smoothing=0.3, temperature=0.5)
    pi = torch.softmax((ls - lt).double() / 0.5, 0)
    torch.testing.assert_close(w, 0.7 / 3 + 0.3 * pi)
    assert float(w.sum()) == pytest.approx(1.0)
    assert int(w.argmax()) == 1 and float(w[1]) > 1 / 3
    # Iterating moves monotonically toward the largest-gap domain, smoothly.
    prev = w
    for _ in range(5):
        nxt = D.ddk_domain_weights(ls, lt, prev, smoothing=0.3, temperature=0.5)
        assert float(nxt[1]) > float(prev[1])
        assert float((nxt - prev).abs().max()) <= 0.3 + 1e-12
        prev = nxt
    # Smoothing 0 keeps the previous weights; min_weight floors the others.
    torch.testing.assert_close(D.ddk_domain_weights(ls, lt, w, smoothing=0.0), w)
    fl = D.ddk_domain_weights(ls, lt, smoothing=1.0, temperature=0.01, min_weight=0.1)
    assert float(fl.min()) >= 0.1 / (1 + 0.2) - 1e-12 and float(fl.sum()) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# Weight Aligning
# ---------------------------------------------------------------------------------------------


def test_weight_aligning_equalizes_mean_norms():
    w = torch.randn(10, 4, generator=_gen(5), dtype=torch.float64)
    w[6:] *= 3.0  # new classes biased to large norms
    b = torch.randn(10, generator=_gen(6), dtype=torch.float64)
    w2, b2, gamma = D.weight_aligning(w, 6, b)
    norms = w2.norm(dim=1)
    assert float(norms[:6].mean()) == pytest.approx(float(norms[6:].mean()), rel=1e-12)
    assert gamma == pytest.approx(float(w[:6].norm(dim=1).mean() / w[6:].norm(dim=1).mean()))
    torch.testing.assert_close(w2[:6], w[:6])
    torch.testing.assert_close(w2[6:], w[6:] * gamma)
    torch.testing.assert_close(b2[6:], b[6:] * gamma)
    lin = torch.nn.Linear(4, 10).double()
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    g = D.weight_align_(lin, 6)
    assert g == pytest.approx(gamma)
    torch.testing.assert_close(lin.weight.detach(), w2)


# ---------------------------------------------------------------------------------------------
# USCD
# ---------------------------------------------------------------------------------------------


def _uscd_ref(std, lame, w, thr, ratio):
    # The official rule (alphadl/CodeGen-USCD bigcode_eval/contrast.py), written here in fp64:
    # torch.std of the standard probabilities decides; the contrast is log(p - w p_lame) on the
    # tokens with p >= ratio * mean(p), NaN / log(0) -> -inf.
    out = []
    for i in range(std.shape[0]):
        p, pl = F.softmax(std[i], -1), F.softmax(lame[i], -1)
        if torch.std(p) > thr:
            out.append(torch.log(p))
            continue
        keep = p >= ratio * p.mean()
        d = torch.where(keep, p, torch.zeros_like(p)) - w * torch.where(
            keep, pl, torch.zeros_like(pl)
        )
        # (The official nan_to_num also turns -inf into the lowest finite float when a NaN
        # occurs; both are probability 0. divkit writes -inf for both.)
        out.append(torch.nan_to_num(torch.log(d), nan=-math.inf, neginf=-math.inf))
    return torch.stack(out)


def test_uscd_selective_contrast():
    v = 16
    sharp = torch.zeros(1, v, dtype=torch.float64)
    sharp[0, 3] = 12.0  # confident: large std of the probabilities
    flat = _logits(2, v, 47, scale=0.3)  # uncertain: small std
    std = torch.cat([sharp, flat])
    lame = _logits(3, v, 48)
    res = D.uscd_logits(std, lame, lame_weight=0.7, std_threshold=0.05, filter_ratio=0.8)
    torch.testing.assert_close(
        res.uncertainty, torch.stack([torch.std(F.softmax(x, -1)) for x in std])
    )
    assert res.applied.tolist() == [False, True, True]
    ref = _uscd_ref(std, lame, 0.7, 0.05, 0.8)
    torch.testing.assert_close(res.logits, ref)
    assert bool(torch.isinf(res.logits[1:]).any()) and bool(torch.isfinite(res.logits[1:]).any())
    # The official defaults (weights 1.0 / -0.7, mean_num 0.005, filter_num 0.666667) at V = 50.
    big_s, big_l = _logits(4, 50, 50, scale=0.4), _logits(4, 50, 51)
    torch.testing.assert_close(
        D.uscd_logits(big_s, big_l).logits,
        _uscd_ref(big_s, big_l, 0.7, 0.005, 0.666667),
        rtol=1e-5,
        atol=1e-7,
    )
    # threshold below every deviation: nothing contrasted, log-probabilities returned.
    none = D.uscd_logits(std, lame, std_threshold=-1.0)
    assert not bool(none.applied.any())
    torch.testing.assert_close(none.logits, F.log_softmax(std, -1))
    # lame_weight = 0 and filter_ratio = 0: the contrast is log p everywhere.
    plain = D.uscd_logits(std, lame, lame_weight=0.0, std_threshold=1.0, filter_ratio=0.0)
    torch.testing.assert_close(plain.logits, F.log_softmax(std, -1))
    proc = D.USCDLogitsProcessor(lame_weight=0.7, std_threshold=0.05, filter_ratio=0.8)
    torch.testing.assert_close(proc(std, lame), res.logits)
    # float32 inputs: float32 output, same values.
    torch.testing.assert_close(
        D.uscd_logits(std.float(), lame.float(), std_threshold=0.05, filter_ratio=0.8).logits,
        ref.float(),
        rtol=1e-5,
        atol=1e-6,
    )


def test_row_entropy_matches_torch_and_fp16():
    x = _logits(4, 31, 49)
    torch.testing.assert_close(D.row_entropy(x, temperature=1.7), _ent(x, 1.7))
    got = D.row_entropy(x.half())
    torch.testing.assert_close(got.double(), _ent(x.half().double()), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_bad_input_raises_clear_errors():
    s, t, y = _logits(3, 5, 50), _logits(3, 5, 51), torch.tensor([0, 1, 2])
    with pytest.raises(divkit.Error, match="nkd_loss: labels\\[1\\] = 7 is out of range"):
        D.nkd_loss(s, t, torch.tensor([0, 7, 1]))
    with pytest.raises(divkit.Error, match="labels is required"):
        D.nkd_loss(s, t, None)
    # Labels that only mark ignored rows must still be classes or ignore_index.
    with pytest.raises(divkit.Error, match=r"dac_kl_loss: labels\[1\] = 5 is out of range"):
        D.dac_kl_loss(s, t, labels=torch.tensor([0, 5, -100]))
    with pytest.raises(divkit.Error, match=r"swing_loss: labels\[2\] = -1 is out of range"):
        D.swing_loss(
            s, t, torch.full((3,), 0.5, dtype=torch.float64), labels=torch.tensor([0, 1, -1])
        )
    with pytest.raises(divkit.Error, match="teacher_logits has shape"):
        D.ofa_loss(s, t[:, :4], y)
    with pytest.raises(divkit.Error, match="ofa_loss: eps must be finite and > 0"):
        D.ofa_loss(s, t, y, eps=0.0)
    with pytest.raises(divkit.Error, match="gamma must be finite and >= 0"):
        D.nkd_loss(s, t, y, gamma=-1.0)
    with pytest.raises(divkit.Error, match="teacher_logits requires grad"):
        D.nkd_loss(s, t.clone().requires_grad_(), y)
    bad = s.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(
        divkit.Error, match="student_logits has a non-finite value \\(nan\\) in row 2"
    ):
        D.ofa_loss(bad, t, y)
    with pytest.raises(divkit.Error, match="row 0: the bounds must satisfy 0 < lower < upper"):
        D.dac_kl_loss(
            s,
            t,
            torch.full((3,), 0.5, dtype=torch.float64),
            torch.full((3,), 0.1, dtype=torch.float64),
        )
    with pytest.raises(divkit.Error, match="give both lower and upper"):
        D.dac_kl_loss(s, t, torch.full((3,), 0.5, dtype=torch.float64))
    with pytest.raises(divkit.Error, match="mass_lo and mass_hi must satisfy"):
        D.dac_kl_mass_bounds(t, mass_lo=0.5, mass_hi=0.5)
    with pytest.raises(divkit.Error, match="sharpness must be finite and >= 0"):
        D.dac_kl_loss(s, t, sharpness=-1.0)
    with pytest.raises(divkit.Error, match="privacy_scores must lie in \\[0, 1\\]"):
        D.swing_loss(s, t, torch.tensor([0.1, 1.5, 0.2]))
    with pytest.raises(divkit.Error, match="exactly one of privacy_scores and temperatures"):
        D.swing_loss(s, t)
    with pytest.raises(divkit.Error, match="temperatures\\[1\\] must be finite and > 0"):
        D.swing_loss(s, t, temperatures=torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64))
    with pytest.raises(divkit.Error, match="noise_std must be finite and >= 0"):
        D.swing_loss(s, t, torch.rand(3), noise_std=-0.1)
    with pytest.raises(divkit.Error, match="gap_scale must be finite and >= 0"):
        D.bdkd_loss(s, t, gap_scale=-1.0)
    with pytest.raises(divkit.Error, match="reduction must be one of"):
        D.bdkd_loss(s, t, reduction="avg")
    with pytest.raises(divkit.Error, match="labels out of range"):
        D.comp_sum_loss(s, torch.tensor([0, 5, 1]))
    with pytest.raises(divkit.Error, match="tau must be finite and >= 0"):
        D.comp_sum_loss(s, y, tau=-0.5)
    with pytest.raises(divkit.Error, match="lam must be finite and > 0"):
        D.ldr_kl_loss(s, y, lam=0.0)
    with pytest.raises(divkit.Error, match="class_means has a zero vector"):
        D.nd_loss(s, t, y, torch.zeros(3, 5, dtype=torch.float64))
    with pytest.raises(divkit.Error, match="ratio must be in \\(0, 1\\]"):
        D.miniplm_difference_sampling([1.0, 2.0], [0.0, 0.0], ratio=0.0)
    with pytest.raises(divkit.Error, match="reference_logprobs has 1 documents"):
        D.miniplm_scores([1.0, 2.0], [0.0])
    with pytest.raises(divkit.Error, match="path .* does not exist"):
        D.miniplm_difference_sampling(path="/nonexistent/file.npz")
    with pytest.raises(divkit.Error, match="previous_weights must be 2 non-negative weights"):
        D.ddk_domain_weights([1.0, 2.0], [1.0, 1.0], [0.9, 0.9])
    with pytest.raises(divkit.Error, match="num_old must be an int in \\[1, 9\\]"):
        D.weight_aligning(torch.randn(10, 3), 10)
    with pytest.raises(divkit.Error, match="uscd_logits: filter_ratio must be finite and >= 0"):
        D.uscd_logits(s, t, filter_ratio=-0.5)
    with pytest.raises(
        divkit.Error, match="USCDLogitsProcessor: lame_weight must be finite and >= 0"
    ):
        D.USCDLogitsProcessor(lame_weight=-1.0)
    with pytest.raises(divkit.Error, match="DACKLBounds: k must be an int >= 1"):
        D.DACKLBounds(k=0)
    with pytest.raises(divkit.Error, match="strong_logits has a non-finite|labels is required"):
        D.mdcs_consistency_loss(s, t, None)
