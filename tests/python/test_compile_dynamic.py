"""torch.compile(dynamic=True): float arguments become SymFloats, which Dynamo cannot pass to
math.isnan / math.isfinite; divkit's argument checks compare instead, so the public functions
trace without a graph break and give eager's bits, with the float options as graph inputs (a
second call with another value reuses the graph). A bad value still raises divkit.Error."""

import pytest
import torch

import divkit
import divkit.ot
import divkit.rlhf
from divkit import _ops

pytestmark = pytest.mark.skipif(not _ops.ENABLED, reason="torch.library.custom_op needs torch>=2.4")

N, V, H = 8, 16, 6


def _inputs():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(N, V, generator=g).requires_grad_()
    t = torch.randn(N, V, generator=g)
    h = torch.randn(N, H, generator=g).requires_grad_()
    w = torch.randn(V, H, generator=g).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g)
    return s, t, h, w, labels


# (name, f(x, tensors)): x is the float option the compiled function takes as an argument.
CASES = {
    "divergence": lambda x, s, t, h, w, lab: divkit.divergence(s, t, "jsd", beta=x),
    "divergence_temperature": lambda x, s, t, h, w, lab: divkit.divergence(s, t, temperature=x),
    "fused_linear_cross_entropy": lambda x, s, t, h, w, lab: divkit.fused_linear_cross_entropy(
        h, w, lab, label_smoothing=x
    ),
    "fused_linear_divergence": lambda x, s, t, h, w, lab: divkit.fused_linear_divergence(
        h, w, h.detach() * 0.5, w.detach(), kind="reverse_kl", temperature=1 + x
    ),
    "fused_linear_logprobs": lambda x, s, t, h, w, lab: divkit.fused_linear_logprobs(
        h, w, lab, temperature=1 + x
    ).sum(),
    "preference_loss": lambda x, s, t, h, w, lab: divkit.preference_loss(
        s[:4, 0], s[:4, 1], t[:4, 0], t[:4, 1], beta=x, loss_type="ipo"
    )[0].mean(),
    "sinkhorn_divergence": lambda x, s, t, h, w, lab: divkit.ot.sinkhorn_divergence(
        h[:4], h[4:], eps=1 + x
    ),
    "kl_estimator": lambda x, s, t, h, w, lab: divkit.rlhf.kl_estimator(s[:, 0], t[:, 0]).sum() * x,
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_dynamic_compile_equals_eager(name):
    f = CASES[name]
    torch._dynamo.reset()
    compiled = torch.compile(f, dynamic=True, fullgraph=True, backend="aot_eager")
    for x in (0.3, 0.45):
        xs, xc = _inputs(), _inputs()
        want = f(x, *xs)
        got = compiled(x, *xc)
        assert torch.equal(got, want), (got, want)
        want.backward()
        got.backward()
        for a, b in zip(xs, xc):
            if a.grad is not None:
                assert torch.equal(a.grad, b.grad)


def test_dynamic_compile_bad_float_still_raises():
    """A NaN option raises divkit.Error naming the argument (the check runs on the concrete
    value while tracing; without fullgraph, Dynamo hands the call back to eager)."""
    torch._dynamo.reset()
    compiled = torch.compile(CASES["divergence"], dynamic=True, backend="aot_eager")
    with pytest.raises(divkit.Error, match="divergence: beta must not be nan"):
        compiled(float("nan"), *_inputs())
