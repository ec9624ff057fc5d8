"""The top-k mass of fused_linear_logprobs at the edges of k (1, 2, V - 1, V) over rows with many
exact ties (integer logits), masked (-inf bias) entries and a wide spread, on the C++ core and the
PyTorch chunk loop (backend="torch"), against a float64 sort (within the numerics contract's 1e-5
relative: the PyTorch loop computes in fp32 from logits up to 200)."""

from __future__ import annotations

import pytest
import torch

import divkit


def _rows(v: int):
    # z_ij = hidden_i * weight_j exactly (H = 1, small integers): ties of about v / 11 entries.
    g = torch.Generator().manual_seed(v)
    w = torch.randint(-5, 6, (v, 1), generator=g).float()
    h = torch.tensor([[1.0], [2.0], [0.5], [3.0], [0.25], [40.0]])
    b = torch.zeros(v)
    b[1::9] = float("-inf")  # masked vocabulary entries
    labels = torch.tensor([0, 3, 4, -100, 6, 8]) % v
    labels[3] = -100
    return h, w, b, labels


def _want(h, w, b, labels, k: int):
    z = h.double() @ w.double().T + b.double()
    p = torch.softmax(z, -1)
    want = p.sort(-1, descending=True).values[:, :k].sum(-1)
    return torch.where(labels == -100, torch.zeros_like(want), want)


@pytest.mark.parametrize("v", [37, 203])
def test_topk_mass_edges_with_ties(v):
    h, w, b, labels = _rows(v)
    for k in (1, 2, v - 1, v):
        want = _want(h, w, b, labels, k)
        for be in ("core", "torch"):
            got = divkit.fused_linear_logprobs(h, w, labels, bias=b, topk=k, backend=be)
            torch.testing.assert_close(
                got.topk_mass.double(), want, rtol=1e-5, atol=1e-7, msg=f"k={k} {be}"
            )
