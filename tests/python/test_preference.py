"""divkit's preference losses: the hand-derived reference values of objectives.md, gradcheck in
float64, independent torch formulas (cDPO, TDPO, SparsePO, D2O, HyPO, SuperHF), edge values,
and bad input. (Comparisons with TRL's own code are in test_preference_trl.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

import divkit
from divkit import preference as P

W, L_, R = -10.0, -12.0, -11.0  # objectives.md: logpi_w, logpi_l, ref_w = ref_l, beta = 0.1


def t(*xs, dtype=torch.float64):
    return torch.tensor(xs, dtype=dtype)


@pytest.mark.parametrize(
    "loss_type,kw,value",
    [
        ("sigmoid", {}, 0.598139),
        ("sigmoid", {"label_smoothing": 0.1}, 0.618139),
        ("robust", {"label_smoothing": 0.1}, 0.573139),
        ("hinge", {}, 0.8),
        ("ipo", {}, 9.0),
        ("nca_pair", {}, 1.338793),
        ("bco_pair", {}, 1.288793),
        ("sppo_hard", {}, 32.0),
        ("apo_zero", {}, 0.950042),
        ("apo_down", {}, 0.975145),
        ("sigmoid", {"f_divergence_type": "js_divergence"}, 0.644397),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_values(loss_type, kw, value, dtype):
    losses, cr, rj = divkit.preference_loss(
        t(W, dtype=dtype),
        t(L_, dtype=dtype),
        t(R, dtype=dtype),
        t(R, dtype=dtype),
        loss_type=loss_type,
        **kw,
    )
    assert losses.dtype == dtype
    assert losses.item() == pytest.approx(value, abs=1e-6)
    assert cr.item() == pytest.approx(0.1) and rj.item() == pytest.approx(-0.1)


def test_tdpo1_reference_value():
    # TDPO1 with SeqKL_w 0.3, SeqKL_l 0.5: -logsig(0.1 (2 - 0.2)) = 0.607192 (objectives.md),
    # through the same sequence-level path tdpo_loss uses.
    lw, ll = t(W - R + 0.3), t(L_ - R + 0.5)
    losses, _, _ = divkit.preference_loss(lw, ll, t(0.0), t(0.0))
    assert losses.item() == pytest.approx(0.607192, abs=1e-6)


def rand(n, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g, dtype=torch.float64) * scale - 15).requires_grad_()


@pytest.mark.parametrize("loss_type", divkit.LOSS_TYPES)
@pytest.mark.parametrize("f", ["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"])
def test_gradcheck(loss_type, f):
    # sft has no score: it accepts any f-divergence, as TRL does.
    if f != "reverse_kl" and loss_type not in (
        "sigmoid",
        "sigmoid_norm",
        "hinge",
        "ipo",
        "exo_pair",
        "robust",
        "discopop",
        "sft",
    ):
        with pytest.raises(divkit.Error, match="f_divergence_type"):
            divkit.preference_loss(
                t(W), t(L_), t(R), t(R), loss_type=loss_type, f_divergence_type=f
            )
        return
    pc, pr, rc, rr = (rand(5, s, 0.3) for s in range(4))
    lengths = torch.tensor([3, 5, 1, 7, 2]), torch.tensor([4, 4, 2, 9, 1])
    eps = 0.1
    beta = 0.05 if loss_type == "hinge" else 0.1  # keeps beta D < 1: away from hinge's kink
    upstream = torch.linspace(0.5, 2.0, 5, dtype=torch.float64)

    def fn(pc, pr, rc, rr):
        losses, _, _ = divkit.preference_loss(
            pc,
            pr,
            rc,
            rr,
            loss_type=loss_type,
            beta=beta,
            label_smoothing=eps,
            f_divergence_type=f,
            f_alpha_divergence_coef=0.6,
            chosen_lengths=lengths[0],
            rejected_lengths=lengths[1],
        )
        return losses * upstream

    assert gradcheck(fn, (pc, pr, rc, rr))


def test_gradcheck_combined_and_weighted():
    pc, pr, rc, rr = (rand(6, 10 + s) for s in range(4))
    w = torch.rand(6, dtype=torch.float64) + 0.5
    assert gradcheck(
        lambda *x: divkit.preference_loss(
            *x,
            loss_type=["sigmoid", "aot_unpaired", "discopop"],
            loss_weights=[0.5, 1.0, 2.0],
            policy_weights=w,
        )[0],
        (pc, pr, rc, rr),
    )


def cdpo(pc, pr, rc, rr, beta, eps):
    z = beta * ((pc - rc) - (pr - rr))
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


@pytest.mark.parametrize("eps", [0.0, 0.25, 0.5])
def test_cdpo_matches_torch(eps):
    x = [rand(7, s, 5.0) for s in range(4)]
    got = divkit.preference_loss(*x, label_smoothing=eps, beta=0.3)[0]
    torch.testing.assert_close(got, cdpo(*x, 0.3, eps), rtol=1e-12, atol=1e-12)
    if eps == 0.5:  # label smoothing 0.5 makes the loss even in the margin
        y = [x[1], x[0], x[3], x[2]]
        torch.testing.assert_close(
            got, divkit.preference_loss(*y, label_smoothing=eps, beta=0.3)[0]
        )


def test_large_margins():
    pc, pr = t(0.0, -1e4), t(-1e4, 0.0)
    rc = rr = t(-1.0, -1.0)
    for lt in divkit.LOSS_TYPES:
        if lt == "exo_pair":
            kw = {"label_smoothing": 1e-3}
        else:
            kw = {}
        x = [v.clone().requires_grad_() for v in (pc, pr, rc, rr)]
        losses, _, _ = divkit.preference_loss(
            *x, loss_type=lt, chosen_lengths=[1, 1], rejected_lengths=[1, 1], **kw
        )
        losses.sum().backward()
        assert torch.isfinite(losses).all(), lt
        assert all(torch.isfinite(v.grad).all() for v in x), lt
    losses, _, _ = divkit.preference_loss(pc, pr, rc, rr, loss_type="discopop")
    assert losses[0].item() == pytest.approx(0.0, abs=1e-12)  # right way: vanishing loss
    # wrong way: TRL's fp32 form gives exp(1000) * sigmoid(-20000) = inf * 0 = NaN
    assert losses[1].item() == pytest.approx(1000.0, rel=1e-12)


def test_float32_inputs_and_grad_dtype():
    x = [rand(4, s).float().detach().requires_grad_() for s in range(4)]
    losses, cr, _ = divkit.preference_loss(*x)
    assert losses.dtype == torch.float32 and cr.dtype == torch.float32
    assert not cr.requires_grad
    losses.mean().backward()
    ref = [v.detach().double().requires_grad_() for v in x]
    cdpo(*ref, 0.1, 0.0).mean().backward()
    for a, b in zip(x, ref):
        assert a.grad.dtype == torch.float32
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-5, atol=1e-8)


def test_metrics():
    cr, rj = t(0.3, -0.1, 0.2), t(0.1, 0.0, 0.5)
    m = divkit.preference_metrics(cr, rj, prefix="eval_")
    assert m == pytest.approx(
        {
            "eval_rewards/chosen": 0.4 / 3,
            "eval_rewards/rejected": 0.2,
            "eval_rewards/accuracies": 1 / 3,
            "eval_rewards/margins": (0.2 - 0.1 - 0.3) / 3,
        }
    )


def test_wpo_weights_formula():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 7, (2, 5), generator=g)
    labels[0, :2] = -100
    w = divkit.wpo_weights(logits, labels)
    p = logits.softmax(-1)
    for b in range(2):
        keep = labels[b] != -100
        lp = p[b][keep].gather(-1, labels[b][keep, None]).squeeze(-1).log()
        ref = torch.exp((lp - (p[b][keep] ** 2).sum(-1).log()).mean())
        assert w[b].item() == pytest.approx(ref.item(), rel=1e-12)


def test_cpo_orpo_kto_gradcheck():
    pc, pr = (
        (-torch.rand(5, dtype=torch.float64) * 2 - 0.05).requires_grad_(),
        (-torch.rand(5, dtype=torch.float64) * 2 - 0.05).requires_grad_(),
    )
    assert gradcheck(
        lambda a, b: divkit.cpo_loss(a, b, loss_type="simpo", alpha=0.3, beta=2.0)[0], (pc, pr)
    )
    assert gradcheck(lambda a, b: divkit.odds_ratio_loss(a, b)[0], (pc, pr))
    rc, rr = rand(5, 20), rand(3, 21)
    pc2, pr2 = rand(5, 22), rand(3, 23)
    kl_p, kl_r = rand(4, 24), rand(4, 25).detach() - 1
    assert gradcheck(
        lambda a, b, c, d: divkit.kto_loss(a, b, kl_p.detach(), c, d, kl_r, desirable_weight=1.3)[
            0
        ],
        (pc2, pr2, rc, rr),
    )


def test_orpo_total_loss():
    pc, pr, nll = t(-0.5, -2.0), t(-1.5, -0.3), torch.tensor(1.25, dtype=torch.float64)
    loss, _, _ = divkit.orpo_loss(pc, pr, nll, beta=0.2)
    odds = lambda lp: lp - torch.log1p(-lp.exp())  # noqa: E731
    want = nll - (0.2 * F.logsigmoid(odds(pc) - odds(pr))).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)


def test_kto_unpaired_edges():
    # only desirable examples; KL clamped at 0 when the policy is below the reference
    losses, cr, rj, kl = divkit.kto_loss(t(-3.0, -4.0), t(), t(-5.0), t(-3.5, -3.0), t(), t(-4.0))
    assert kl.item() == 0.0 and rj.numel() == 0
    want = 1 - torch.sigmoid(0.1 * (t(-3.0, -4.0) - t(-3.5, -3.0)))
    torch.testing.assert_close(losses, want)


# ---- D2O, HyPO, SuperHF ------------------------------------------------------------------


def test_d2o_formula():
    ps, rs = rand(6, 30).reshape(2, 3), rand(6, 31).reshape(2, 3).detach()
    pl, rl = rand(2, 32), rand(2, 33).detach()
    losses, _, _ = divkit.d2o_loss(ps, rs, pl, rl, beta=0.2, alpha=0.05)
    want = -F.logsigmoid(0.2 / 3 * (ps - rs).sum(-1) - 0.05 * (pl - rl))
    torch.testing.assert_close(losses, want, rtol=1e-12, atol=1e-12)


def test_hypo_value_and_gradient():
    x = [rand(2, 40 + s) for s in range(4)]
    ps = rand(8, 44).reshape(2, 4)
    rs = rand(8, 45).reshape(2, 4).detach()
    losses, _, _, kl = divkit.hypo_loss(*x, ps, rs, lam=0.3)
    dpo = cdpo(*x, 0.1, 0.0)
    r = (ps - rs).detach()
    torch.testing.assert_close(losses, dpo + 0.3 * r.mean(-1))
    torch.testing.assert_close(kl, r.mean(-1))
    (g,) = torch.autograd.grad(losses.sum(), ps)
    loo = (r.sum(-1, keepdim=True) - r) / 3
    torch.testing.assert_close(g, 0.3 * (r - loo) / 4)
    # the leave-one-out baseline makes the gradient vanish when all samples have one log-ratio
    (g,) = torch.autograd.grad(divkit.hypo_loss(*x, ps, ps.detach() + 2.0)[0].sum(), ps)
    assert g.abs().max().item() < 1e-15


def test_superhf_filters_by_reward():
    lp = rand(6, 50).reshape(2, 3)
    rewards = torch.tensor([[0.1, 0.9, 0.5], [2.0, -1.0, 3.0]])
    kl = torch.rand(2, 3, dtype=torch.float64)
    loss, idx = divkit.superhf_loss(lp, rewards, kl=kl, kl_coef=0.5, top_k=2)
    assert idx.tolist() == [[1, 2], [2, 0]]
    keep = torch.tensor([[False, True, True], [True, False, True]])
    want = -lp[keep].mean() + 0.5 * kl[keep].mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)


# ---- token level -------------------------------------------------------------------------


def token_batch(seed, b=2, tlen=5, v=11, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    mk = lambda: torch.randn(b, tlen, v, generator=g, dtype=torch.float64).to(dtype)  # noqa
    labels = [torch.randint(0, v, (b, tlen), generator=g) for _ in range(2)]
    labels[0][:, :2] = -100
    labels[1][0, :1] = -100
    labels[1][1, -1] = -100
    return mk(), mk(), mk(), mk(), labels[0], labels[1]


def torch_token_terms(pol, ref, labels):
    mask = labels != -100
    lp, lr = pol.log_softmax(-1), ref.log_softmax(-1)
    idx = labels.clamp(min=0)[..., None]
    ratio = ((lp.gather(-1, idx) - lr.gather(-1, idx)).squeeze(-1) * mask).sum(-1)
    kl = ((lr.exp() * (lr - lp)).sum(-1) * mask).sum(-1)  # KL(ref || policy)
    return ratio, kl


@pytest.mark.parametrize("variant", ["tdpo1", "tdpo2"])
def test_tdpo_matches_torch(variant):
    pcl, prl, rcl, rrl, cl, rl = token_batch(60)
    pcl.requires_grad_(), prl.requires_grad_()
    losses, cr, rj = divkit.tdpo_loss(
        pcl, prl, rcl, rrl, cl, rl, beta=0.5, alpha=0.7, variant=variant
    )
    gw = torch.autograd.grad(losses.sum(), (pcl, prl))
    a = 1.0 if variant == "tdpo1" else 0.7
    rw, kw = torch_token_terms(pcl, rcl, cl)
    rl_, kr = torch_token_terms(prl, rrl, rl)
    kw_eff = kw if variant == "tdpo1" else kw.detach()
    want = -F.logsigmoid(0.5 * ((rw - rl_) - a * (kr - kw_eff)))
    gt = torch.autograd.grad(want.sum(), (pcl, prl))
    # the KL comes from divkit's fp32 token kernel
    torch.testing.assert_close(losses, want, rtol=1e-5, atol=1e-6)
    for x, y in zip(gw, gt):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(cr, (0.5 * (rw + kw)).detach(), rtol=1e-5, atol=1e-6)


def test_tdpo2_stop_gradient_on_chosen_kl():
    # tdpo2's chosen-side gradient is c_b * grad(sum log-ratio of the label tokens), with
    # c_b = -beta sigma(-beta logits_b): nothing from the chosen KL
    pcl, prl, rcl, rrl, cl, rl = token_batch(61)
    pcl.requires_grad_()
    l2, _, _ = divkit.tdpo_loss(pcl, prl, rcl, rrl, cl, rl, variant="tdpo2", beta=0.5)
    (g2,) = torch.autograd.grad(l2.sum(), pcl)
    rw, _ = torch_token_terms(pcl, rcl, cl)
    (gr,) = torch.autograd.grad(rw.sum(), pcl)
    c = -0.5 * (1 - torch.exp(-l2.detach()))  # -beta sigma(-beta x) = -beta (1 - e^(-loss))
    torch.testing.assert_close(g2, c[:, None, None] * gr, rtol=1e-5, atol=1e-7)
    assert g2[cl == -100].abs().max() == 0  # prompt positions get no gradient


def test_tdpo_bf16_logits():
    pcl, prl, rcl, rrl, cl, rl = token_batch(62, dtype=torch.bfloat16)
    losses, _, _ = divkit.tdpo_loss(pcl, prl, rcl, rrl, cl, rl)
    ref = divkit.tdpo_loss(pcl.double(), prl.double(), rcl.double(), rrl.double(), cl, rl)[0]
    torch.testing.assert_close(losses.double(), ref, rtol=1e-4, atol=1e-5)


def test_tdpo_gradcheck():
    pcl, prl, rcl, rrl, cl, rl = token_batch(63, b=2, tlen=3, v=5)
    pcl.requires_grad_(), prl.requires_grad_()
    # divkit's token kernel computes in fp32: gradcheck with fp32-sized steps and tolerances
    assert gradcheck(
        lambda a, b: divkit.tdpo_loss(a, b, rcl, rrl, cl, rl, variant="tdpo1")[0],
        (pcl, prl),
        eps=1e-3,
        atol=2e-3,
        rtol=2e-2,
    )


def test_sparsepo_matches_torch_and_reduces_to_tdpo1():
    pcl, prl, rcl, rrl, cl, rl = token_batch(64)
    ones = divkit.sparsepo_loss(pcl, prl, rcl, rrl, cl, rl, beta=0.3)[0]
    tdpo1 = divkit.tdpo_loss(pcl, prl, rcl, rrl, cl, rl, beta=0.3, variant="tdpo1")[0]
    torch.testing.assert_close(ones, tdpo1, rtol=1e-12, atol=1e-12)
    g = torch.Generator().manual_seed(1)
    masks = [torch.rand(2, 5, generator=g, dtype=torch.float64).requires_grad_() for _ in range(4)]
    losses, _, _ = divkit.sparsepo_loss(
        pcl,
        prl,
        rcl,
        rrl,
        cl,
        rl,
        chosen_reward_mask=masks[0],
        rejected_reward_mask=masks[1],
        chosen_kl_mask=masks[2],
        rejected_kl_mask=masks[3],
        beta=0.3,
        l1_reward=0.01,
        l1_kl=0.02,
    )
    mw, ml = cl != -100, rl != -100
    lp = lambda x, lab: (
        x.log_softmax(-1)
        .gather(-1, lab.clamp(min=0)[..., None])  # noqa
        .squeeze(-1)
    )
    klt = lambda p, r: (
        (
            r.log_softmax(-1).exp() * (r.log_softmax(-1) - p.log_softmax(-1))  # noqa
        ).sum(-1)
    )
    u = (masks[0] * (lp(pcl, cl) - lp(rcl, cl)) * mw).sum(-1) - (
        masks[1] * (lp(prl, rl) - lp(rrl, rl)) * ml
    ).sum(-1)
    d = -(masks[2] * klt(pcl, rcl) * mw).sum(-1) + (masks[3] * klt(prl, rrl) * ml).sum(-1)
    l1 = 0.01 * ((masks[0] * mw).sum(-1) + (masks[1] * ml).sum(-1)) + 0.02 * (
        (masks[2] * mw).sum(-1) + (masks[3] * ml).sum(-1)
    )
    want = -F.logsigmoid(0.3 * (u - d)) + l1
    torch.testing.assert_close(losses, want, rtol=1e-5, atol=1e-6)
    # gradients reach the masks
    gm = torch.autograd.grad(losses.sum(), masks)
    gt = torch.autograd.grad(want.sum(), masks)
    for a, b in zip(gm, gt):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_sparsepo_mask_module():
    torch.manual_seed(0)
    m = P.SparsePOMask(8, 3, dropout=0.0)
    hs = [torch.randn(2, 5, 8) for _ in range(3)]
    r, k = m(hs)
    assert r.shape == (2, 5) and k.shape == (2, 5)
    assert (r >= 0).all() and (k >= 0).all()
    pcl, prl, rcl, rrl, cl, rl = (
        x.float() if x.is_floating_point() else x for x in token_batch(65)
    )
    loss = divkit.sparsepo_loss(
        pcl,
        prl,
        rcl,
        rrl,
        cl,
        rl,
        chosen_reward_mask=r,
        rejected_reward_mask=r,
        chosen_kl_mask=k,
        rejected_kl_mask=k,
        l1_reward=0.1,
    )[0].sum()
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def _sparsepo_mask_is_live(m, hs) -> bool:
    """Whether every head of a SparsePOMask gives a non-zero mask on ``hs`` and passes a
    non-zero gradient to its mixer and to some per-layer projection (not a dead start)."""
    m.zero_grad()
    r, k = m(hs)
    (r.sum() + k.sum()).backward()
    for h in m.heads:
        if not (h["mix"].weight.grad is not None and h["mix"].weight.grad.abs().sum() > 0):
            return False
        layer_grads = [f[1].weight.grad for f in h["per_layer"]]
        if not any(g is not None and g.abs().sum() > 0 for g in layer_grads):
            return False
    return bool((r > 0).any() and (k > 0).any())


@pytest.mark.parametrize("num_layers,shared", [(4, False), (12, True)])
def test_sparsepo_mask_not_dead_at_init(num_layers, shared):
    # A fixed seed and typical inputs (N(0, 1) hidden states of a reference model, H = 64): the
    # masks are not all zero and the mask parameters get gradients.
    torch.manual_seed(0)
    m = P.SparsePOMask(64, num_layers, shared=shared)
    hs = [torch.randn(2, 16, 64) for _ in range(num_layers)]
    assert _sparsepo_mask_is_live(m, hs)
    r, _ = m.eval()(hs)
    assert (r > 0).float().mean() >= 0.25
    # The dead start the check guards against (documented in SparsePOMask's docstring): a mixer
    # whose weights and bias are negative zeroes every mask and every gradient.
    with torch.no_grad():
        for h in m.heads:
            h["mix"].weight.copy_(-h["mix"].weight.abs())
            h["mix"].bias.fill_(-0.1)
    assert not _sparsepo_mask_is_live(m.train(), hs)


# ---- bad input ---------------------------------------------------------------------------


def test_bad_input():
    a, b = t(-1.0, -2.0), t(-1.0)
    with pytest.raises(ValueError, match="policy_rejected_logps.*batch sizes disagree"):
        divkit.preference_loss(a, b, a, a)
    with pytest.raises(divkit.Error, match="chosen_lengths must be > 0"):
        divkit.preference_loss(a, a, a, a, loss_type="ipo", chosen_lengths=[1, 0])
    with pytest.raises(divkit.Error, match=r"preference_loss: rejected_lengths must be >= 1"):
        divkit.preference_loss(a, a, a, a, loss_type="ipo", rejected_lengths=[1, 0.5])
    with pytest.raises(divkit.Error, match="sigmoid_norm needs chosen_lengths"):
        divkit.preference_loss(a, a, a, a, loss_type="sigmoid_norm")
    with pytest.raises(divkit.Error, match="beta must be"):
        divkit.preference_loss(a, a, a, a, beta=0.0)
    with pytest.raises(divkit.Error, match="label_smoothing must be in"):
        divkit.preference_loss(a, a, a, a, label_smoothing=-0.1)
    with pytest.raises(divkit.Error, match="label_smoothing must be < 0.5 for loss_type robust"):
        divkit.preference_loss(a, a, a, a, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(divkit.Error, match="unknown loss_type 'dpo'"):
        divkit.preference_loss(a, a, a, a, loss_type="dpo")
    with pytest.raises(divkit.Error, match="unknown f_divergence_type"):
        divkit.preference_loss(a, a, a, a, f_divergence_type="kl")
    with pytest.raises(ValueError, match="loss_weights has 1 entries for 2"):
        divkit.preference_loss(a, a, a, a, loss_type=["sigmoid", "ipo"], loss_weights=[1.0])
    with pytest.raises(divkit.Error, match="finite"):
        divkit.preference_loss(t(float("nan"), 0.0), a, a, a)
    with pytest.raises(ValueError, match="empty"):
        divkit.preference_loss(t(), t(), t(), t())
    with pytest.raises(divkit.Error, match="unknown loss_type"):
        divkit.cpo_loss(a, a, loss_type="kto")
    with pytest.raises(divkit.Error, match="beta"):
        divkit.cpo_loss(a, a, beta=-1.0)
    with pytest.raises(divkit.Error, match="policy_chosen_logps must be < 0"):
        divkit.odds_ratio_loss(t(0.0), t(-1.0))
    with pytest.raises(divkit.Error, match="unknown loss_type"):
        divkit.kto_loss(a, a, None, a, a, None, loss_type="bco")
    with pytest.raises(ValueError, match="reference_chosen_logps.*disagree"):
        divkit.kto_loss(a, a, None, b, a, None)
    pcl, prl, rcl, rrl, cl, rl = token_batch(66)
    with pytest.raises(ValueError, match="unknown variant"):
        divkit.tdpo_loss(pcl, prl, rcl, rrl, cl, rl, variant="tdpo3")
    with pytest.raises(divkit.Error, match="beta"):
        divkit.tdpo_loss(pcl, prl, rcl, rrl, cl, rl, beta=0)
    with pytest.raises(ValueError, match="batch sizes disagree"):
        divkit.tdpo_loss(pcl, prl[:1], rcl, rrl, cl, rl)
    with pytest.raises(ValueError, match="chosen_labels has shape"):
        divkit.tdpo_loss(pcl, prl, rcl, rrl, cl[:, :3], rl)
    with pytest.raises(ValueError, match="k >= 2"):
        divkit.hypo_loss(
            a,
            a,
            a,
            a,
            torch.zeros(2, 1, dtype=torch.float64),
            torch.zeros(2, 1, dtype=torch.float64),
        )


def test_token_losses_bad_values_name_their_arguments():
    # Non-finite coefficients and masks are reported under the caller's argument names, not
    # under those of the sequence-level loss they feed (policy_chosen_logps, ...).
    pcl, prl, rcl, rrl, cl, rl = token_batch(67)
    nan_mask = torch.ones(2, 5, dtype=torch.float64)
    nan_mask[1, 3] = float("nan")
    with pytest.raises(divkit.Error, match=r"^tdpo_loss: alpha must be finite"):
        divkit.tdpo_loss(pcl, prl, rcl, rrl, cl, rl, alpha=float("inf"))
    with pytest.raises(divkit.Error, match=r"^sparsepo_loss: l1_kl must be finite"):
        divkit.sparsepo_loss(pcl, prl, rcl, rrl, cl, rl, l1_kl=float("inf"))
    with pytest.raises(divkit.Error, match=r"^sparsepo_loss: rejected_kl_mask has NaN"):
        divkit.sparsepo_loss(pcl, prl, rcl, rrl, cl, rl, rejected_kl_mask=nan_mask)
    # a label token of probability 0 under the policy: an infinite log-ratio
    masked = pcl.clone()
    masked[0, 3, cl[0, 3]] = float("-inf")
    with pytest.raises(divkit.Error, match=r"^tdpo_loss: the chosen side's summed token terms"):
        divkit.tdpo_loss(masked, prl, rcl, rrl, cl, rl)
    g = torch.Generator().manual_seed(68)
    h, rh = (torch.randn(2, 5, 6, generator=g) for _ in range(2))
    w = torch.randn(11, 6, generator=g).requires_grad_()
    ref = dict(ref_chosen_hidden=rh, ref_rejected_hidden=rh, ref_weight=torch.randn(11, 6))
    with pytest.raises(divkit.Error, match=r"^sparsepo_loss_fused: l1_reward must be finite"):
        divkit.sparsepo_loss_fused(h, h, w, cl, rl, l1_reward=float("-inf"), **ref)
    with pytest.raises(divkit.Error, match=r"^sparsepo_loss_fused: chosen_reward_mask has NaN"):
        divkit.sparsepo_loss_fused(h, h, w, cl, rl, chosen_reward_mask=nan_mask.float(), **ref)
    x = [t(-1.0, -2.0)] * 4
    with pytest.raises(divkit.Error, match=r"^hypo_loss: lam must be finite"):
        divkit.hypo_loss(*x, torch.zeros(2, 2), torch.zeros(2, 2), lam=float("inf"))


def test_saturated_pairs_keep_relative_accuracy():
    # Pairs far on the right side (beta * margin from 20 to 600): the losses and gradients are
    # tiny but representable in fp64, and TRL's fp64 autograd of logsigmoid gives them to full
    # relative accuracy. Written with 1 - sigma(z) they kept only sigma(z)'s absolute error (a
    # zero gradient beyond z = 37). Reference: fp64 torch in the forms sigma(-z), sigma(z)
    # sigma(-z).
    z = torch.tensor([20.0, 45.0, 120.0, 600.0], dtype=torch.float64)
    beta = 0.5
    lw = (z / beta).requires_grad_()  # chosen log-ratio; rejected log-ratio 0 (or -lw)
    zero = torch.zeros(4, dtype=torch.float64)

    def grads(v, xs):
        return [
            torch.zeros_like(x) if g is None else g
            for x, g in zip(xs, torch.autograd.grad(v.sum(), xs, allow_unused=True))
        ]

    def check(got, want, xs):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
        for a, b in zip(grads(got, xs), grads(want, xs)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=0)

    ll = (-lw.detach()).requires_grad_()
    xs = [lw, ll]
    sig, lsig = torch.sigmoid, F.logsigmoid
    cases = {
        "sigmoid": -lsig(beta * (lw - ll)),
        "apo_zero": sig(-beta * lw) + sig(beta * ll),
        # sigma(beta l_w) as 1 - sigma(-beta l_w): torch's sigmoid backward is s (1 - s)
        "apo_down": (1 - sig(-beta * lw)) + sig(-beta * (lw - ll)),
        "discopop": None,
    }
    for lt, want in cases.items():
        got = divkit.preference_loss(lw, ll, zero, zero, loss_type=lt, beta=beta)[0]
        if want is None:  # exp(-x) dominates once m = sigma(x / tau) is 1: both forms vanish
            x = beta * (lw - ll)
            want = -lsig(x) * sig(-x / 0.05) + torch.exp(-x + lsig(x / 0.05))
        check(got, want, xs)
    got = divkit.cpo_loss(lw, ll, beta=beta)[0]
    check(got, -lsig(beta * (lw - ll)), xs)
    # KTO: desirable 1 - sigma(beta l) and undesirable sigma(beta l), l = pc - rc
    got = divkit.kto_loss(lw, ll, None, zero, zero, None, beta=beta)[0]
    check(got, torch.cat([sig(-beta * lw), sig(beta * ll)]), xs)


@pytest.mark.parametrize(
    "f_type,a,l_far", [("forward_kl", 0.5, -90.0), ("alpha_divergence", 0.5, -200.0)]
)
def test_f_dpo_score_exponent_clamped_at_80(f_type, a, l_far):
    # The docstring's clamp: beyond it the score is constant (its value at the clamp) and its
    # derivative 0; below it the closed form with its derivative.
    def score(l):
        if f_type == "forward_kl":
            return 1.0 - torch.exp(torch.clamp(-l, max=80.0))
        return torch.expm1(torch.clamp((a - 1.0) * l, max=80.0)) / (a - 1.0)

    pw = torch.tensor([l_far, -3.0], dtype=torch.float64, requires_grad=True)
    pl = torch.tensor([-1.0, -2.0], dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(2, dtype=torch.float64)
    losses, cr, rr = P.preference_loss(
        pw, pl, zero, zero, beta=0.1, f_divergence_type=f_type, f_alpha_divergence_coef=a
    )
    want = -F.logsigmoid(0.1 * (score(pw.detach()) - score(pl.detach())))
    torch.testing.assert_close(losses, want, rtol=1e-12, atol=0.0)
    assert bool(torch.isfinite(losses).all())
    losses.sum().backward()
    assert float(pw.grad[0]) == 0.0  # beyond the clamp
    assert float(pw.grad[1]) != 0.0 and float(pl.grad[0]) != 0.0


def test_alphapo_reward_exponent_clamped_at_80():
    alpha = 1.0
    pw = torch.tensor([-100.0, -3.0], dtype=torch.float64, requires_grad=True)
    pl = torch.tensor([-2.0, -4.0], dtype=torch.float64, requires_grad=True)
    losses, cr, rr = P.cpo_loss(pw, pl, beta=0.1, alpha=alpha)

    def reward(lp):
        return -torch.expm1(torch.clamp(-alpha * lp, max=80.0)) / alpha

    want = -F.logsigmoid(0.1 * (reward(pw.detach()) - reward(pl.detach())))
    torch.testing.assert_close(losses, want, rtol=1e-12, atol=0.0)
    losses.sum().backward()
    assert float(pw.grad[0]) == 0.0 and float(pw.grad[1]) != 0.0
