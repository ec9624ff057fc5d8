"""RLHF utilities and diagnostics: KL estimators (objectives.md values, verl's clamps,
unbiasedness by Monte Carlo), the exact KL from logits against torch, ensembles, InfAlign's
calibration, best-of-N, model soup, top-k indicators and gradient entanglement."""

from __future__ import annotations

import math

import pytest
import torch

import divkit
from divkit import rlhf


def test_kl_estimator_reference_values():
    lp, ref = torch.tensor([-1.0], dtype=torch.float64), torch.tensor([-1.5], dtype=torch.float64)
    assert rlhf.kl_estimator(lp, ref, "k1").item() == pytest.approx(0.5)
    assert rlhf.kl_estimator(lp, ref, "k2").item() == pytest.approx(0.125)
    assert rlhf.kl_estimator(lp, ref, "k3").item() == pytest.approx(0.106531, abs=1e-6)
    assert rlhf.kl_estimator(lp, ref, "low_var_kl").item() == pytest.approx(0.106531, abs=1e-6)
    assert rlhf.kl_estimator(lp, ref, "abs").item() == pytest.approx(0.5)


def test_kl_estimator_verl_clamps():
    lp = torch.tensor([0.0, 0.0, 0.0])
    ref = torch.tensor([30.0, -30.0, 1e-9])
    k3 = rlhf.kl_estimator(lp, ref, "k3", clamp=True)
    # r clamped to +-20, the result to [-10, 10]
    assert k3[0].item() == 10.0
    assert k3[1].item() == 10.0  # r = -20: e^-20 + 19 > 10
    assert k3[2].item() == pytest.approx(0.5e-18, rel=1e-3)  # expm1: no cancellation near 0
    assert rlhf.kl_estimator(lp, ref, "k3")[0].item() == pytest.approx(math.exp(30) - 31, rel=1e-6)


def test_kl_estimators_are_unbiased():
    # y ~ pi: k1 and k3 average to KL(pi || ref); k3 is never negative
    g = torch.Generator().manual_seed(0)
    pi = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    ref = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    y = torch.multinomial(pi, 200000, replacement=True, generator=g)
    kl = (pi * (pi / ref).log()).sum().item()
    for kind in ("k1", "k3"):
        est = rlhf.kl_estimator(pi.log()[y], ref.log()[y], kind)
        assert est.mean().item() == pytest.approx(kl, rel=0.02)
    assert (rlhf.kl_estimator(pi.log()[y], ref.log()[y], "k3") >= 0).all()


def test_exact_kl_directions():
    g = torch.Generator().manual_seed(1)
    pol = torch.randn(2, 4, 9, generator=g, dtype=torch.float64).requires_grad_()
    ref = torch.randn(2, 4, 9, generator=g, dtype=torch.float64)
    labels = torch.tensor([[1, 2, -100, 3], [0, 0, 0, -100]])
    lp, lr = pol.log_softmax(-1), ref.log_softmax(-1)
    mask = labels != -100
    want = (lp.exp() * (lp - lr)).sum(-1) * mask
    got = rlhf.exact_kl(pol, ref, labels=labels)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    (g1,) = torch.autograd.grad(got.sum(), pol)
    (g2,) = torch.autograd.grad(want.sum(), pol)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)
    back = rlhf.exact_kl(pol, ref, direction="ref_policy")
    torch.testing.assert_close(back.double(), (lr.exp() * (lr - lp)).sum(-1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="direction"):
        rlhf.exact_kl(pol, ref, direction="forward")


def test_ensembles():
    r = torch.tensor([[1.0, 2.0], [3.0, 0.0], [2.0, 1.0]])  # 3 models x 2 samples
    torch.testing.assert_close(rlhf.ensemble_rewards(r, "mean"), torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(rlhf.ensemble_rewards(r, "wco"), torch.tensor([1.0, 0.0]))
    var = torch.tensor([2.0 / 3.0, 2.0 / 3.0])  # population variance
    torch.testing.assert_close(
        rlhf.ensemble_rewards(r, "uwo", uwo_lambda=0.5), torch.tensor([2.0, 1.0]) - 0.5 * var
    )
    with pytest.raises(ValueError, match="unknown method"):
        rlhf.ensemble_rewards(r, "max")


def test_calibration_and_transform():
    ref = torch.tensor([[0.0, 1.0, 2.0, 3.0], [5.0, 5.0, 5.0, 5.0]])
    c = rlhf.calibrate_reward(torch.tensor([1.5, 5.0]), ref)
    torch.testing.assert_close(c, torch.tensor([0.5, 1.0]))
    c2 = rlhf.calibrate_reward(torch.tensor([[-1.0, 3.0], [4.0, 6.0]]), ref)
    torch.testing.assert_close(c2, torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
    # the calibrated reward of a reference sample is uniform on [0, 1]: mean ~ 1/2
    g = torch.Generator().manual_seed(3)
    samples = torch.randn(1, 2001, generator=g)
    cal = rlhf.calibrate_reward(samples, samples)
    assert cal.mean().item() == pytest.approx(0.5, abs=0.01)
    # phi is increasing for best-of-N, decreasing for jailbreaking
    u = torch.linspace(0, 1, 5)
    assert (rlhf.infalign_transform(u, 2.0, scenario="best_of_n").diff() > 0).all()
    assert (rlhf.infalign_transform(u, -2.0, scenario="best_of_n_jailbreak").diff() < 0).all()
    with pytest.raises(ValueError, match="t must be > 0"):
        rlhf.infalign_transform(u, -1.0, scenario="best_of_n")


def test_best_of_n():
    r = torch.tensor([[0.1, 0.7, 0.3], [2.0, 1.0, 2.0]])
    idx, best, chosen = rlhf.best_of_n(r, [["a", "b", "c"], ["d", "e", "f"]])
    assert idx.tolist() == [1, 0] and best.tolist() == pytest.approx([0.7, 2.0])
    assert chosen == ["b", "d"]
    x = torch.arange(12).reshape(2, 3, 2)
    assert rlhf.best_of_n(r, x)[2].tolist() == [[2, 3], [6, 7]]


def test_model_soup():
    torch.manual_seed(0)
    ms = [torch.nn.Linear(3, 2) for _ in range(3)]
    sds = [m.state_dict() for m in ms]
    soup = rlhf.model_soup(sds, weights=[1.0, 1.0, 2.0])
    want = (sds[0]["weight"] + sds[1]["weight"] + 2 * sds[2]["weight"]) / 4
    torch.testing.assert_close(soup["weight"], want)
    m = torch.nn.Linear(3, 2)
    m.load_state_dict(soup)
    with pytest.raises(ValueError, match="weights"):
        rlhf.model_soup(sds, weights=[1.0])
    # an infinite weight (or sum) gave a soup of NaNs (or zeros), silently
    for bad in ([1.0, math.inf, 1.0], [1e308, 1e308, 1.0]):
        with pytest.raises(divkit.Error, match="model_soup: weights must be >= 0 with a finite"):
            rlhf.model_soup(sds, weights=bad)


def test_topk_entropy_mass():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]], dtype=torch.float64))
    ent, mass, me, mm = rlhf.topk_entropy_mass(logits, 2)
    assert mass.item() == pytest.approx(0.75)
    q = torch.tensor([2 / 3, 1 / 3], dtype=torch.float64)
    assert ent.item() == pytest.approx(-(q * q.log()).sum().item())
    # k = V: the full entropy and mass 1; averages skip ignored tokens
    ent, mass, me, mm = rlhf.topk_entropy_mass(
        logits.repeat(2, 1), 4, labels=torch.tensor([0, -100])
    )
    p = logits.exp()
    assert me.item() == pytest.approx(-(p * p.log()).sum().item())
    assert mm.item() == pytest.approx(1.0) and mass[1].item() == 0.0
    with pytest.raises(ValueError, match="k must be"):
        rlhf.topk_entropy_mass(logits, 5)


def test_gradient_entanglement():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3, bias=False)
    xw, xl = torch.randn(4), torch.randn(4)
    lpw = lin(xw).log_softmax(-1)[0]
    lpl = lin(xl).log_softmax(-1)[1]
    out = rlhf.gradient_entanglement(lpw, lpl, lin.parameters())
    gw = torch.autograd.grad(lpw, lin.weight, retain_graph=True)[0]
    gl = torch.autograd.grad(lpl, lin.weight)[0]
    assert out["inner"] == pytest.approx((gw * gl).sum().item(), rel=1e-6)
    assert out["chosen_sq_norm"] == pytest.approx((gw * gw).sum().item(), rel=1e-6)
    assert out["chosen_rises"] == (out["inner"] <= out["chosen_sq_norm"])
    # the prediction holds: a small step along grad(lpw - lpl) moves the log-probs as predicted
    with torch.no_grad():
        lin.weight += 1e-4 * (gw - gl)
        new_w = lin(xw).log_softmax(-1)[0]
        new_l = lin(xl).log_softmax(-1)[1]
    assert (new_w > lpw.detach()).item() == out["chosen_rises"]
    assert (new_l < lpl.detach()).item() == out["rejected_falls"]


def test_non_tensor_arguments_are_named():
    # A list where a tensor belongs: the message names the argument (it was an AttributeError
    # about 'list' objects).
    x, m = torch.zeros(3), torch.zeros(3, 4)
    lg, lab = torch.zeros(2, 3, 5), torch.zeros(2, 3, dtype=torch.long)
    cases = [
        ("kl_estimator", "logprobs", lambda: rlhf.kl_estimator([0.0] * 3, x)),
        ("kl_estimator", "ref_logprobs", lambda: rlhf.kl_estimator(x, [0.0] * 3)),
        ("calibrate_reward", "rewards", lambda: rlhf.calibrate_reward([0.0] * 3, m)),
        ("calibrate_reward", "ref_rewards", lambda: rlhf.calibrate_reward(x, m.tolist())),
        ("infalign_transform", "calibrated", lambda: rlhf.infalign_transform([0.5], 1.0)),
        ("topk_entropy_mass", "logits", lambda: rlhf.topk_entropy_mass(lg.tolist(), 2)),
        ("gradient_entanglement", "chosen_logp", lambda: rlhf.gradient_entanglement(1.0, x, [])),
        (
            "token_logratio_and_kl",
            "ref_logits",
            lambda: divkit.preference.token_logratio_and_kl(lg, lg.tolist(), lab),
        ),
    ]
    for fn, name, call in cases:
        with pytest.raises(divkit.Error, match=rf"^{fn}: {name} must be a torch.Tensor"):
            call()
