"""The upstream-gradient shortcut of divkit's autograd (``_ops.upstream_is_one``): a saved
gradient is returned as it is when the upstream gradient is the scalar 1, and multiplied by it
otherwise; where the value cannot be read (a CUDA stream being captured into a graph) the
multiplication must give the same bits, which is what these tests check on the CPU."""

import pytest
import torch

import divkit
from divkit import _ops


def test_upstream_is_one_reads_the_value():
    assert _ops.upstream_is_one(torch.tensor(1.0))
    assert _ops.upstream_is_one(torch.tensor(1.0, dtype=torch.float64))
    assert not _ops.upstream_is_one(torch.tensor(2.0))
    assert not _ops.upstream_is_one(torch.ones(3))  # per-token upstream gradients


@pytest.mark.parametrize("inplace", [False, True])
def test_multiplying_by_one_gives_the_shortcut_bits(monkeypatch, inplace):
    """The path taken under CUDA graph capture (no host read: multiply by the upstream gradient)
    against the shortcut, for the token divergence with a gradient buffer and in place, and a
    fused head."""
    g = torch.Generator().manual_seed(0)
    s0, t = torch.randn(6, 50, generator=g), torch.randn(6, 50, generator=g)
    h0, w0 = torch.randn(6, 8, generator=g), torch.randn(50, 8, generator=g)

    def grads():
        s = s0.clone().requires_grad_()
        x = s * 1.0 if inplace else s  # inplace_grad needs a non-leaf it may overwrite
        divkit.divergence(x, t, kind="jsd", inplace_grad=inplace).backward()
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        labels = torch.arange(6) % 50
        divkit.fused_linear_cross_entropy(h, w, labels).backward()
        return s.grad, h.grad, w.grad

    short = grads()
    monkeypatch.setattr(_ops, "upstream_is_one", lambda go: False)
    import divkit._autograd as ag

    monkeypatch.setattr(ag, "upstream_is_one", lambda go: False)
    multiplied = grads()
    for a, b in zip(short, multiplied):
        assert torch.equal(a, b)
