"""divkit's fused linear-head losses against Liger-Kernel's own chunked implementations (its
chunked losses are plain PyTorch, so they run on the CPU; compiled=False skips torch.compile)."""

from __future__ import annotations

import pytest
import torch

import divkit

liger_chunked = pytest.importorskip("liger_kernel.chunked_loss")


def _inputs(n=48, v=97, hs=24, ht=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    sh = torch.randn(n, hs, generator=g)
    th = torch.randn(n, ht, generator=g)
    sw = torch.randn(v, hs, generator=g) / hs**0.5
    tw = 2 * torch.randn(v, ht, generator=g) / ht**0.5
    sb, tb = 0.3 * torch.randn(v, generator=g), 0.3 * torch.randn(v, generator=g)
    y = torch.randint(0, v, (n,), generator=g)
    y[::5] = -100
    return sh, sw, sb, th, tw, tb, y


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_fused_jsd_matches_liger(beta, temperature):
    # Without ignored tokens divkit's "batchmean" and "mean" agree with Liger (which masks ignored
    # tokens and divides by the count of the others, divkit's "mean": test_fused_differential.py).
    sh, sw, sb, th, tw, tb, y = _inputs()
    y = y.clamp(min=0)
    liger = liger_chunked.LigerFusedLinearJSDLoss(
        weight_hard_loss=0.4,
        weight_soft_loss=0.6,
        beta=beta,
        temperature=temperature,
        compiled=False,
        chunk_size=16,
    )
    a = [x.clone().requires_grad_(True) for x in (sh, sw, sb)]
    want = liger(a[0], a[1], th, tw, y, a[2], tb)
    want.backward()
    b = [x.clone().requires_grad_(True) for x in (sh, sw, sb)]
    got = divkit.fused_linear_divergence(
        b[0],
        b[1],
        th,
        tw,
        "jsd",
        beta=beta,
        temperature=temperature,
        student_bias=b[2],
        teacher_bias=tb,
        labels=y,
        hard_weight=0.4,
        soft_weight=0.6,
        chunk_size=7,
        reduction="batchmean",
    )
    got.backward()
    assert abs(got.item() - want.item()) <= 2e-5 * (1 + abs(want.item()))
    for x, r in zip(b, a):
        scale = r.grad.abs().max().item() + 1e-6
        assert (x.grad - r.grad).abs().max().item() <= 2e-5 * scale
