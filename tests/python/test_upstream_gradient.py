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


def _per_token_outputs():
    """(name, inputs requiring grad, fn(*inputs) -> per-token/per-pair output) of functions whose
    backward recomputes with the upstream gradient as weights."""
    from divkit import preference as P

    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(4, 8, generator=g), torch.randn(10, 8, generator=g)
    ht, wt = torch.randn(4, 8, generator=g), torch.randn(10, 8, generator=g)
    y = torch.tensor([1, 4, 9, 0])
    pw, pl = torch.randn(4, generator=g) - 1, torch.randn(4, generator=g) - 2
    z = torch.zeros(4)
    return [
        (
            "preference_loss",
            (pw,),
            lambda a: P.preference_loss(a, pl, z, z)[0],
        ),
        ("cpo_loss", (pw,), lambda a: P.cpo_loss(a, pl)[0]),
        (
            "fused_linear_cross_entropy",
            (h, w),
            lambda a, b: divkit.fused_linear_cross_entropy(a, b, y, reduction="none"),
        ),
        (
            "fused_linear_divergence",
            (h, w),
            lambda a, b: divkit.fused_linear_divergence(a, b, ht, wt, reduction="none"),
        ),
    ]


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_upstream_gradient_raises_naming_the_function(bad):
    """The recomputing backward takes the upstream gradient as the core's token weights: inf or
    NaN there raises a divkit.Error naming the public function and the upstream gradient (the
    core's own check named `weights` or `grad_losses`, arguments the caller never passed); a
    finite one gives autograd's gradient (weights times the unit-upstream gradient)."""
    for name, inputs, fn in _per_token_outputs():
        xs = [x.clone().requires_grad_() for x in inputs]
        out = fn(*xs)
        up = torch.ones_like(out)
        up[1] = bad
        with pytest.raises(divkit.Error, match=rf"^{name}: the gradient flowing back.* at index 1"):
            out.backward(up)
        # A finite one weights the entries: linear in the upstream gradient.
        up = torch.linspace(0.5, 2.0, out.numel()).reshape(out.shape)
        xs = [x.clone().requires_grad_() for x in inputs]
        fn(*xs).backward(up)
        want = [torch.zeros_like(x) for x in inputs]
        for i in range(out.numel()):
            ys = [x.clone().requires_grad_() for x in inputs]
            unit = torch.zeros(out.numel())
            unit[i] = 1.0
            fn(*ys).backward(unit.reshape(out.shape))
            for acc, y in zip(want, ys):
                acc += float(up.reshape(-1)[i]) * y.grad
        for a, b in zip(xs, want):
            torch.testing.assert_close(a.grad, b, rtol=1e-5, atol=1e-6)
