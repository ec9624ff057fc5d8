"""Property tests (hypothesis): D(p, p) = 0, non-negativity, bounds, limits, shapes."""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import divkit
from conftest import KIND_CASES, logits

# Example counts come from the hypothesis profile that conftest.py loads (40 by default;
# DIVKIT_HYPOTHESIS_PROFILE=thorough for 1000).
SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

kind_cases = st.sampled_from(KIND_CASES)
shapes = st.tuples(st.integers(1, 4), st.integers(1, 3), st.integers(1, 70))
scales = st.sampled_from([0.0, 0.1, 1.0, 4.0, 12.0])
seeds = st.integers(0, 2**31 - 1)
temperatures = st.sampled_from([0.5, 1.0, 2.0])


def fp32_atol(x: torch.Tensor, temperature: float, kind: str, params: dict) -> float:
    """Absolute rounding error to expect from fp32 arithmetic on logits x / T: the log-probs
    carry ~|x / T| * 6e-8 of rounding, which the alpha-family formulas divide by alpha (1 - alpha)
    (Amari) or alpha - 1 (Renyi)."""
    tol = 1e-6 * (1.0 + x.abs().max().item() / temperature)
    a = params.get("alpha", 0.5)
    if kind == "alpha_divergence" and a not in (0.0, 1.0):  # the limits are exact KLs
        tol /= min(1.0, abs(a * (1 - a)))
    if kind == "renyi" and a != 1.0:
        tol /= min(1.0, abs(a - 1))
    return tol


def with_params(case, data):
    kind, params = case
    params = dict(params)
    if kind == "jsd":
        params["beta"] = data.draw(st.floats(0.0, 1.0))
    elif kind in ("skew_forward_kl", "skew_reverse_kl"):
        params["alpha"] = data.draw(st.floats(0.0, 1.0))
    elif kind == "alpha_divergence":
        # Within 0.05 of the limits 0 and 1 the formula cancels badly in fp32 (see
        # test_alpha_near_one_identical_inputs); the limits themselves are exact.
        params["alpha"] = data.draw(
            st.one_of(
                st.sampled_from([0.0, 1.0]),
                st.floats(-2.0, -0.05),
                st.floats(0.05, 0.95),
                st.floats(1.05, 3.0),
            )
        )
    elif kind == "renyi":
        params["alpha"] = data.draw(
            st.one_of(st.just(1.0), st.floats(0.05, 0.95), st.floats(1.05, 4.0))
        )
    return kind, params


@SETTINGS
@given(
    case=kind_cases,
    shape=shapes,
    scale=scales,
    seed=seeds,
    temperature=temperatures,
    data=st.data(),
)
def test_divergence_of_a_distribution_with_itself_is_zero(
    case, shape, scale, seed, temperature, data
):
    kind, params = with_params(case, data)
    x = logits(*shape, scale=scale, seed=seed)
    loss = divkit.divergence(
        x, x.clone(), kind, reduction="none", temperature=temperature, **params
    )
    atol = fp32_atol(x, temperature, kind, params)
    if kind == "cross_entropy":  # H(p, p) is the entropy, not 0
        p = torch.log_softmax(x.double() / temperature, -1)
        want = -(p.exp() * p).sum(-1)
        assert torch.allclose(loss.double(), want, rtol=1e-5, atol=atol)
    else:
        assert loss.abs().max().item() <= atol


@SETTINGS
@given(
    case=kind_cases,
    shape=shapes,
    scale=scales,
    seed=seeds,
    temperature=temperatures,
    data=st.data(),
)
def test_non_negative_and_bounded(case, shape, scale, seed, temperature, data):
    kind, params = with_params(case, data)
    s = logits(*shape, scale=scale, seed=seed)
    t = logits(*shape, scale=scale, seed=seed + 1)
    loss = divkit.divergence(s, t, kind, reduction="none", temperature=temperature, **params)
    assert loss.shape == shape[:-1] and loss.dtype == torch.float32
    assert not torch.isnan(loss).any()
    assert (loss >= -fp32_atol(s, temperature, kind, params)).all()
    if kind == "tvd":
        assert (loss <= 1 + 1e-6).all()
    if kind == "hellinger":
        assert (loss <= 2 + 1e-6).all()
    if kind == "jsd":
        b = params["beta"]
        if 0 < b < 1:  # bounded by the entropy of the mixture weights
            bound = -(b * math.log(b) + (1 - b) * math.log(1 - b))
            assert (loss <= bound + 1e-5).all()


@SETTINGS
@given(shape=shapes, scale=scales, seed=seeds)
def test_limits(shape, scale, seed):
    s = logits(*shape, scale=scale, seed=seed)
    t = logits(*shape, scale=scale, seed=seed + 1)

    def d(kind, **kw):
        return divkit.divergence(s, t, kind, reduction="none", **kw)

    fkl, rkl = d("forward_kl"), d("reverse_kl")
    tol = dict(rtol=1e-5, atol=fp32_atol(torch.cat([s, t]), 1.0, "", {}))
    assert torch.allclose(d("jsd", beta=0.0), fkl, **tol)
    assert torch.allclose(d("jsd", beta=1.0), rkl, **tol)
    assert torch.allclose(d("alpha_divergence", alpha=1.0), fkl, **tol)
    assert torch.allclose(d("alpha_divergence", alpha=0.0), rkl, **tol)
    assert torch.allclose(d("renyi", alpha=1.0), fkl, **tol)
    assert torch.allclose(d("skew_forward_kl", alpha=0.0), fkl, **tol)
    assert torch.allclose(d("skew_reverse_kl", alpha=0.0), rkl, **tol)
    assert torch.allclose(d("jeffreys"), fkl + rkl, **tol)
    assert (d("skew_forward_kl", alpha=1.0).abs() <= tol["atol"]).all()
    # forward KL = cross-entropy - teacher entropy
    ent = divkit.divergence(t, t, "cross_entropy", reduction="none")
    assert torch.allclose(d("cross_entropy") - ent, fkl, rtol=1e-4, atol=10 * tol["atol"])


@SETTINGS
@given(
    case=kind_cases,
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=3),
    v=st.integers(1, 20),
    reduction=st.sampled_from(["none", "sum", "mean", "batchmean"]),
    data=st.data(),
)
def test_shapes(case, lead, v, reduction, data):
    kind, params = with_params(case, data)
    shape = (*lead, v)
    s = logits(*shape, seed=len(lead) + v).requires_grad_(True)
    t = logits(*shape, seed=v).requires_grad_(True)
    loss = divkit.divergence(s, t, kind, reduction=reduction, **params)
    assert loss.dtype == torch.float32
    assert loss.shape == (tuple(lead) if reduction == "none" else ())
    loss.sum().backward()
    assert s.grad.shape == shape and t.grad.shape == shape
    assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()
    if v == 1:  # one entry, probability 1: every divergence is 0 and so is its gradient
        # (up to fp32 rounding of Amari's alpha p + (1 - alpha) q - p^alpha q^(1-alpha))
        assert (loss.abs() <= 1e-6).all() and (s.grad == 0).all()


def test_alpha_near_one_identical_inputs():
    # Near the KL limits the naive (mix - w) / (alpha (1 - alpha)) cancels in fp32 (~1e-3 at
    # alpha = 0.999); the kernel's expm1 form gives D(p, p) = 0.
    x = logits(1, 1, 14, scale=12.0, seed=0)
    for kind in ("alpha_divergence", "renyi"):
        for alpha in (0.999, 1.001, 0.001):
            loss = divkit.divergence(x, x.clone(), kind, alpha=alpha, temperature=0.5)
            assert abs(loss.item()) <= 1e-6, (kind, alpha, loss.item())
