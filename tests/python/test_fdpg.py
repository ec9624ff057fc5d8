"""f-DPG (divkit.fdpg / divkit.rlhf.fdpg_loss): the loss against a float64 formula written here,
and on a toy autoregressive policy (vocabulary 3, length 3: 27 sequences) where the target is
known exactly: the exhaustive expectation of the estimator's gradient is the gradient of
D_f(pi_theta || p), both by formulas written here and by divkit's own divergences on the
27-way distributions; sampled batches average to it; bad input."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import divkit
from divkit import fdpg
from divkit.functional import divergence as token_divergence

V, L = 3, 3
SEQS = torch.tensor(list(itertools.product(range(V), repeat=L)))  # [27, L]
CASES = [
    ("forward_kl", 0.5),
    ("reverse_kl", 0.5),
    ("jsd", 0.5),
    ("tvd", 0.5),
    ("alpha", 0.5),
    ("alpha", -0.5),
    ("alpha", 1.7),
]


def seq_logps(theta: torch.Tensor) -> torch.Tensor:
    """log pi(x) of every sequence: theta[0, 0] the first token's logits, theta[l, prev] the
    logits of token l given token l - 1."""
    lp = torch.log_softmax(theta, -1)
    out = lp[0, 0, SEQS[:, 0]]
    for t in range(1, L):
        out = out + lp[t, SEQS[:, t - 1], SEQS[:, t]]
    return out


def toy(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(L, V, V, generator=g, dtype=torch.float64)
    base = torch.randn(L, V, V, generator=g, dtype=torch.float64)
    log_a = seq_logps(base)
    log_b = 2.0 * torch.rand(SEQS.shape[0], generator=g, dtype=torch.float64) - 1.0
    return theta, log_a + log_b  # log P = log a + log b


def true_divergence(lpi: torch.Tensor, lp: torch.Tensor, kind: str, alpha: float):
    pi, p = lpi.exp(), lp.exp()
    if kind == "forward_kl":
        return (p * (lp - lpi)).sum()
    if kind == "reverse_kl":
        return (pi * (lpi - lp)).sum()
    if kind == "jsd":
        m = 0.5 * (p + pi)
        return 0.5 * (p * (lp - m.log())).sum() + 0.5 * (pi * (lpi - m.log())).sum()
    if kind == "tvd":
        return 0.5 * (p - pi).abs().sum()
    return (1 - (p**alpha * pi ** (1 - alpha)).sum()) / (alpha * (1 - alpha))


def divkit_divergence(lpi, lp, kind, alpha):
    name = {"alpha": "alpha_divergence"}.get(kind, kind)
    return token_divergence(lpi[None], lp[None], name, beta=0.5, alpha=alpha, reduction="sum")


@pytest.mark.parametrize("kind,alpha", CASES)
@pytest.mark.parametrize("baseline", [None, 0.3])
def test_exhaustive_expected_gradient_is_divergence_gradient(kind, alpha, baseline):
    theta, log_P = toy()
    theta.requires_grad_(True)
    lpi = seq_logps(theta)
    n = SEQS.shape[0]
    # Uniform proposal over all sequences, the batch being every sequence once: the batch mean
    # is the exact expectation and the importance-sampling Z is exact.
    lq = torch.full((n,), -math.log(n), dtype=torch.float64)
    loss, st = fdpg.fdpg_loss(
        lpi, lq, log_P, kind, alpha=alpha, baseline=baseline, return_stats=True
    )
    (g_loss,) = torch.autograd.grad(loss, theta, retain_graph=True)
    lp = log_P - torch.logsumexp(log_P, 0)
    assert st.log_z == pytest.approx(float(torch.logsumexp(log_P, 0)), abs=1e-12)
    d = true_divergence(lpi, lp, kind, alpha)
    (g_true,) = torch.autograd.grad(d, theta, retain_graph=True)
    torch.testing.assert_close(g_loss, g_true, rtol=1e-9, atol=1e-12)
    assert st.divergence == pytest.approx(float(d.detach()), rel=1e-9, abs=1e-12)
    dk = divkit_divergence(lpi, lp, kind, alpha)
    (g_dk,) = torch.autograd.grad(dk, theta)
    torch.testing.assert_close(g_loss, g_dk, rtol=1e-5, atol=1e-7)
    assert float(dk.detach()) == pytest.approx(float(d.detach()), rel=1e-6, abs=1e-8)


@pytest.mark.parametrize("kind", ["forward_kl", "jsd", "reverse_kl"])
def test_sampled_batches_average_to_the_gradient(kind):
    # Off-policy samples from the base model q = a, loo baseline, exact log Z: unbiased.
    g = torch.Generator().manual_seed(1)
    theta, log_P = toy(1)
    base = torch.randn(L, V, V, generator=g, dtype=torch.float64)
    lq_all = seq_logps(base)
    theta.requires_grad_(True)
    lz = float(torch.logsumexp(log_P, 0))
    lpi_all = seq_logps(theta)
    (g_true,) = torch.autograd.grad(
        true_divergence(lpi_all, log_P - lz, kind, 0.5), theta, retain_graph=True
    )
    # The loss is linear in the log-probs: accumulate d loss / d log pi(x) over the batches,
    # then back-propagate once to theta.
    leaf = lpi_all.detach().requires_grad_(True)
    total = torch.zeros_like(leaf)
    n_batches, n = 400, 64
    idx = torch.multinomial(lq_all.exp().expand(n_batches, -1), n, replacement=True, generator=g)
    for b in range(n_batches):
        i = idx[b]
        loss = fdpg.fdpg_loss(leaf[i], lq_all[i], log_P[i], kind, log_z=lz)
        total += torch.autograd.grad(loss, leaf)[0]
    (mean,) = torch.autograd.grad(lpi_all, theta, grad_outputs=total / n_batches)
    cos = float((mean * g_true).sum() / (mean.norm() * g_true.norm()))
    assert cos > 0.98, cos
    assert float(mean.norm() / g_true.norm()) == pytest.approx(1.0, abs=0.1)


def test_loss_matches_float64_formula():
    g = torch.Generator().manual_seed(2)
    n = 9
    lp = (torch.randn(n, generator=g) - 5).requires_grad_(True)
    lq = torch.randn(n, generator=g) - 5
    ls = torch.randn(n, generator=g)
    for kind, alpha in CASES:
        loss = fdpg.fdpg_loss(lp, lq, ls, kind, alpha=alpha)
        assert loss.dtype == torch.float32
        p64, q64, s64 = lp.detach().double(), lq.double(), ls.double()
        lz = math.log(sum(math.exp(s - q) for s, q in zip(s64.tolist(), q64.tolist())) / n)
        ref = 0.0
        fps = []
        for i in range(n):
            t = math.exp(p64[i] - (s64[i] - lz))
            fps.append(
                {
                    "forward_kl": -1 / t,
                    "reverse_kl": math.log(t) + 1,
                    "jsd": 0.5 * math.log(2 * t / (1 + t)),
                    "tvd": 0.5 * (1 if t > 1 else -1 if t < 1 else 0),
                    "alpha": (1 - t ** (-alpha)) / alpha,
                }[kind]
            )
        for i in range(n):
            b = (sum(fps) - fps[i]) / (n - 1)
            ref += math.exp(p64[i] - q64[i]) * (fps[i] - b) * float(p64[i]) / n
        assert float(loss.detach()) == pytest.approx(ref, rel=1e-5, abs=1e-6), kind
        (gr,) = torch.autograd.grad(loss, lp)
        # d loss / d log pi_i = coef_i / n: the coefficients are constants.
        coef = [
            math.exp(p64[i] - q64[i]) * (fps[i] - (sum(fps) - fps[i]) / (n - 1)) / n
            for i in range(n)
        ]
        torch.testing.assert_close(
            gr.double(), torch.tensor(coef, dtype=torch.float64), rtol=1e-5, atol=1e-7
        )


def test_alpha_limits_and_exposed_in_rlhf():
    lt = torch.linspace(-3, 3, 13, dtype=torch.float64)
    torch.testing.assert_close(
        fdpg.fdpg_f_prime(lt, "alpha", 1.0), fdpg.fdpg_f_prime(lt, "forward_kl")
    )
    torch.testing.assert_close(
        fdpg.fdpg_f_prime(lt, "alpha", 1e-9),
        fdpg.fdpg_f_prime(lt, "reverse_kl") - 1,
        atol=1e-7,
        rtol=0,
    )
    for kind in fdpg.FDPG_DIVERGENCES:
        assert float(fdpg.fdpg_f(torch.zeros(1, dtype=torch.float64), kind, 0.3)) == pytest.approx(
            0
        )
    assert divkit.rlhf.fdpg_loss is fdpg.fdpg_loss


def test_bad_input():
    x = torch.zeros(4)
    with pytest.raises(divkit.Error, match="fdpg_loss: unknown divergence 'kl'"):
        fdpg.fdpg_loss(x, x, x, "kl")
    with pytest.raises(divkit.Error, match="fdpg_loss: proposal_logps has 3 entries"):
        fdpg.fdpg_loss(x, torch.zeros(3), x)
    with pytest.raises(divkit.Error, match="fdpg_loss: baseline='loo' needs at least 2"):
        fdpg.fdpg_loss(x[:1], x[:1], x[:1])
    with pytest.raises(divkit.Error, match="fdpg_loss: unknown baseline"):
        fdpg.fdpg_loss(x, x, x, baseline="ema")
    with pytest.raises(divkit.Error, match="fdpg_loss: f'"):
        fdpg.fdpg_loss(x, x, torch.tensor([0.0, 0, 0, -math.inf]), "reverse_kl")
    with pytest.raises(divkit.Error, match="fdpg_loss: target_log_scores must not be NaN"):
        fdpg.fdpg_loss(x, x, torch.tensor([0.0, 0, 0, math.nan]))
    with pytest.raises(divkit.Error, match="fdpg_loss: policy_logps must be 1-D"):
        fdpg.fdpg_loss(torch.zeros(2, 2), x, x)
