"""The C++-backed RLHF utilities and sample-based losses from Python: gradcheck (fp64) of the
kernels' gradients, values against torch formulas, dtypes and shapes kept."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

import divkit
from divkit import rlhf


def r64(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_()


@pytest.mark.parametrize("kind", ["k1", "k2", "k3", "abs"])
def test_kl_estimator_gradcheck_and_torch(kind):
    lp, ref = r64(3, 4, seed=1), r64(3, 4, seed=2)
    assert gradcheck(lambda a, b: rlhf.kl_estimator(a, b, kind), (lp, ref))
    r = ref - lp
    want = {"k1": -r, "k2": 0.5 * r * r, "k3": torch.expm1(r) - r, "abs": r.abs()}[kind]
    torch.testing.assert_close(rlhf.kl_estimator(lp, ref, kind), want, rtol=1e-12, atol=1e-14)
    # dtype and shape follow torch's promotion
    out = rlhf.kl_estimator(lp.detach().float(), ref.detach().to(torch.bfloat16), kind)
    assert out.dtype == torch.float32 and out.shape == (3, 4)


def test_kl_estimator_clamp_gradient_matches_torch():
    lp = torch.tensor([0.0, 0.0, 0.0, 0.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([30.0, -30.0, 2.0, -2.0], dtype=torch.float64)
    got = rlhf.kl_estimator(lp, ref, "k3", clamp=True)
    (g,) = torch.autograd.grad(got.sum(), lp)
    r = (ref - lp).clamp(-20, 20)
    want = (torch.exp(r) - r - 1).clamp(-10, 10)
    (gw,) = torch.autograd.grad(want.sum(), lp)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g, gw)


@pytest.mark.parametrize("method", ["mean", "wco", "uwo"])
def test_ensemble_gradcheck(method):
    r = r64(4, 3, 2, seed=3)
    assert gradcheck(lambda x: rlhf.ensemble_rewards(x, method, uwo_lambda=0.3, dim=1), (r,))
    want = {
        "mean": r.mean(1),
        "wco": r.min(1).values,
        "uwo": r.mean(1) - 0.3 * r.var(1, unbiased=False),
    }[method]
    torch.testing.assert_close(rlhf.ensemble_rewards(r, method, uwo_lambda=0.3, dim=1), want)


def test_infalign_gradcheck_and_best_of_n_gradient():
    u = torch.rand(5, dtype=torch.float64).requires_grad_()
    assert gradcheck(lambda x: rlhf.infalign_transform(x, -2.5), (u,))
    r = r64(3, 4, seed=4)
    idx, best, _ = rlhf.best_of_n(r)
    assert idx.tolist() == r.argmax(-1).tolist()
    (g,) = torch.autograd.grad(best.sum(), r)
    assert g.sum().item() == 3 and (g[torch.arange(3), idx] == 1).all()


def test_d2o_gradcheck():
    ps, rs, pl, rl = r64(2, 3, seed=5), r64(2, 3, seed=6), r64(2, seed=7), r64(2, seed=8)
    assert gradcheck(lambda *x: divkit.d2o_loss(*x, beta=0.4, alpha=0.3)[0], (ps, rs, pl, rl))
    # f32 inputs: f32 losses, the torch formula
    out = divkit.d2o_loss(
        ps.detach().float(),
        rs.detach().float(),
        pl.detach().float(),
        rl.detach().float(),
        beta=0.4,
        alpha=0.3,
    )
    want = -F.logsigmoid(0.4 / 3 * (ps - rs).sum(-1) - 0.3 * (pl - rl))
    assert out[0].dtype == torch.float32
    torch.testing.assert_close(out[0].double(), want.detach(), rtol=1e-6, atol=1e-6)


def test_superhf_gradient_and_kl_from_ref():
    lp, kl = r64(2, 4, seed=9), r64(2, 4, seed=10)
    rewards = torch.tensor([[0.1, 0.9, 0.5, 0.2], [2.0, -1.0, 3.0, 0.0]])
    lengths = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    assert gradcheck(
        lambda a, b: divkit.superhf_loss(a, rewards, kl=b, lengths=lengths, top_k=2)[0], (lp, kl)
    )
    # without kl: k1 from ref_logps, with its gradient reaching the policy log-probs
    ref = r64(2, 4, seed=11).detach()
    loss, idx = divkit.superhf_loss(lp, rewards, ref_logps=ref, kl_coef=0.5, top_k=1)
    assert idx.tolist() == [[1], [2]]
    want = (-lp[0, 1] - lp[1, 2]) / 2 + 0.5 * ((lp - ref)[0, 1] + (lp - ref)[1, 2]) / 2
    torch.testing.assert_close(loss, want)
    (g,) = torch.autograd.grad(loss, lp)
    assert g[0, 1].item() == pytest.approx(-0.25) and g[0, 0].item() == 0
    # ref_logps of a broadcastable but other shape is an error, not a silent broadcast
    for bad in (ref[0], ref[:, :1], ref[0].tolist()):
        with pytest.raises(divkit.Error, match="superhf_loss: ref_logps must have the shape"):
            divkit.superhf_loss(lp, rewards, ref_logps=bad)
    with pytest.raises(divkit.Error, match="superhf_loss: kl must have the shape"):
        divkit.superhf_loss(lp, rewards, kl=kl.tolist())
