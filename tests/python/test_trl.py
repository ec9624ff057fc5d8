"""divkit's jsd against TRL's own GKDTrainer.generalized_jsd_loss (values and gradients).

TRL's reduction "batchmean" with labels divides by the number of non-ignored tokens, which is
divkit's "mean"; without labels it divides by the size of the first dimension, which is
divkit's "batchmean" for 2-D [N, V] logits.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

import divkit
from conftest import logits, max_err

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
trl_jsd = gkd.GKDTrainer.generalized_jsd_loss

BETAS = [0.0, 0.1, 0.5, 0.9, 1.0]


def trl_value_and_grads(s, t, **kw):
    s64 = s.detach().double().requires_grad_(True)
    t64 = t.detach().double().requires_grad_(True)
    value = trl_jsd(s64, t64, **kw)
    gs, gt = torch.autograd.grad(value, (s64, t64))
    return value.detach(), gs, gt


def divkit_value_and_grads(s, t, **kw):
    s = s.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(True)
    value = divkit.divergence(s, t, "jsd", **kw)
    value.backward()
    return value.detach(), s.grad, t.grad


def assert_close(got, want):
    assert got[0].item() == pytest.approx(want[0].item(), rel=1e-5, abs=1e-7)
    for g, w in zip(got[1:], want[1:]):
        assert max_err(g, w) <= 1e-5 * w.abs().max().item() + 1e-9


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", BETAS)
def test_trl_batchmean_with_labels(beta, temperature):
    s, t = logits(2, 9, 64, seed=400), logits(2, 9, 64, seed=401)
    labels = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(402))
    labels[0, :4] = -100
    labels[1, -2:] = -100
    want = trl_value_and_grads(
        s, t, labels=labels, beta=beta, temperature=temperature, reduction="batchmean"
    )
    got = divkit_value_and_grads(
        s, t, labels=labels, beta=beta, temperature=temperature, reduction="mean"
    )
    assert_close(got, want)


@pytest.mark.parametrize("beta", BETAS)
def test_trl_sum_and_num_items(beta):
    s, t = logits(3, 5, 40, seed=403), logits(3, 5, 40, seed=404)
    labels = torch.ones(3, 5, dtype=torch.long)
    labels[1, 2:] = -100
    want = trl_value_and_grads(s, t, labels=labels, beta=beta, reduction="sum")
    got = divkit_value_and_grads(s, t, labels=labels, beta=beta, reduction="sum")
    assert_close(got, want)
    want = trl_value_and_grads(s, t, labels=labels, beta=beta, num_items_in_batch=23)
    got = divkit_value_and_grads(s, t, labels=labels, beta=beta, num_items_in_batch=23)
    assert_close(got, want)


@pytest.mark.parametrize("beta", BETAS)
def test_trl_batchmean_2d_without_labels(beta):
    s, t = logits(12, 50, seed=405), logits(12, 50, seed=406)
    want = trl_value_and_grads(s, t, beta=beta)
    got = divkit_value_and_grads(s, t, beta=beta, reduction="batchmean")
    assert_close(got, want)


def test_trl_bf16_inputs():
    # TRL computes in the inputs' dtype; compare divkit from bf16 inputs with TRL in fp64 on
    # the same bf16 values.
    s = logits(4, 128, seed=407, dtype=torch.bfloat16)
    t = logits(4, 128, seed=408, dtype=torch.bfloat16)
    want = trl_value_and_grads(s, t, beta=0.5)
    got = divkit.divergence(s, t, "jsd", beta=0.5, reduction="batchmean")
    assert got.item() == pytest.approx(want[0].item(), rel=1e-5)
