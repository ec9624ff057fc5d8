"""divkit.sparse_divergence and divkit.topk_divergence as torch.library custom ops:
torch.compile(fullgraph=True) without graph breaks and with the eager results bit for bit, the
op path equal to the autograd.Function path, vmap, and double backward."""

import pytest
import torch

import divkit
from divkit import _ops

pytestmark = pytest.mark.skipif(not _ops.ENABLED, reason="torch.library.custom_op needs torch>=2.4")


class Tiny(torch.nn.Module):
    """A two-layer 'language model' whose loss is one sparse or top-k divergence (``which``)."""

    def __init__(self, which: str):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Linear(8, 12)
        self.head = torch.nn.Linear(12, 32, bias=False)
        self.teacher = torch.nn.Linear(8, 32)
        self.which = which

    def forward(self, x, labels):
        z = torch.tanh(self.body(x)) @ self.head.weight.T
        t = self.teacher(x).detach()
        if self.which.startswith("sparse"):
            top = torch.log_softmax(t, -1).topk(5, dim=-1)
            idx, lp = top.indices, top.values
        if self.which == "sparse":
            return divkit.sparse_divergence(z, idx, lp, "jsd", beta=0.3, labels=labels)
        if self.which == "sparse_none":
            loss = divkit.sparse_divergence(
                z, idx, lp, "reverse_kl", tail="renormalize", labels=labels, reduction="none"
            )
            return (loss * torch.arange(loss.shape[-1])).sum()
        if self.which == "sparse_bf16":
            w = torch.linspace(0.5, 1.5, 5).expand(labels.shape)
            return divkit.sparse_divergence(
                z.to(torch.bfloat16),
                idx,
                lp,
                weights=w,
                reduction="sum",
                temperature=2.0,
                grad_dtype=torch.float32,
            )
        if self.which == "topk":
            return divkit.topk_divergence(z, t, 6, "forward_kl", labels=labels, temperature=2.0)
        if self.which == "topk_none":
            loss = divkit.topk_divergence(z, t, 4, "tvd", labels=labels, reduction="none")
            return loss.sum() * 3
        if self.which == "topk_batchmean":
            return divkit.topk_divergence(z, t, 32, "hellinger", reduction="batchmean")
        raise AssertionError(self.which)


CASES = ["sparse", "sparse_none", "sparse_bf16", "topk", "topk_none", "topk_batchmean"]


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 8, generator=g)
    labels = torch.randint(0, 32, (2, 5), generator=g)
    labels[1, 2] = -100
    return x, labels


def _loss_and_grads(model, f, x, labels):
    model.zero_grad()
    loss = f(x, labels)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


class Sum(torch.nn.Module):
    def __init__(self, cases):
        super().__init__()
        self.parts = torch.nn.ModuleList(Tiny(c) for c in cases)

    def forward(self, x, labels):
        return sum(m(x, labels) for m in self.parts)


def test_fullgraph_compile_equals_eager():
    """fullgraph=True fails on any graph break; one frame compiled; loss and every parameter's
    gradient equal to eager bit for bit; without grad, the loss too."""
    from torch._dynamo.testing import CompileCounterWithBackend

    model = Sum(CASES)
    x, labels = _data()
    ref = _loss_and_grads(model, model, x, labels)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    got = _loss_and_grads(model, compiled, x, labels)
    assert counter.frame_count == 1
    assert torch.equal(ref[0], got[0])
    assert len(ref[1]) == len(got[1]) == 3 * len(CASES)
    for a, b in zip(ref[1], got[1]):
        assert torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(compiled(x, labels), model(x, labels))


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("which", ["sparse", "sparse_none", "topk", "topk_batchmean"])
def test_no_graph_break_in_explain(which, grad):
    torch._dynamo.reset()
    with torch.set_grad_enabled(grad):
        explain = torch._dynamo.explain(Tiny(which))(*_data())
    assert explain.graph_break_count == 0 and explain.graph_count == 1, explain.break_reasons


@pytest.mark.parametrize("which", CASES)
def test_ops_path_equals_autograd_function_path(which, monkeypatch):
    """Eager calls on plain tensors skip the dispatcher; through the ops the bits are the same."""
    model = Tiny(which)
    x, labels = _data()
    ref = _loss_and_grads(model, model, x, labels)
    monkeypatch.setattr(_ops, "ALWAYS", True)
    got = _loss_and_grads(model, model, x, labels)
    assert torch.equal(ref[0], got[0])
    assert len(ref[1]) == len(got[1]) == 3
    for a, b in zip(ref[1], got[1]):
        assert torch.equal(a, b)


def _sparse_teacher(g, shape, k=4):
    top = torch.log_softmax(torch.randn(*shape, generator=g), -1).topk(k, dim=-1)
    return top.indices, top.values


def test_vmap_is_one_call_per_entry():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(3, 4, 16, generator=g), torch.randn(3, 4, 16, generator=g)
    idx, lp = _sparse_teacher(g, (3, 4, 16))
    got = torch.vmap(lambda a, i, b: divkit.sparse_divergence(a, i, b, "jsd"))(s, idx, lp)
    ref = [divkit.sparse_divergence(s[i], idx[i], lp[i], "jsd") for i in range(3)]
    assert torch.equal(got, torch.stack(ref))
    # An unbatched teacher (in_dims None) is shared by every entry.
    got = torch.vmap(lambda a: divkit.topk_divergence(a, t[0], 5, reduction="none"))(s)
    ref = [divkit.topk_divergence(s[i], t[0], 5, reduction="none") for i in range(3)]
    assert torch.equal(got, torch.stack(ref))


def test_vmap_with_grad_and_func_grad_raise_divkit_errors():
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(3, 4, 16, generator=g), torch.randn(3, 4, 16, generator=g)
    idx, lp = _sparse_teacher(g, (3, 4, 16))
    with pytest.raises(divkit.Error, match="sparse_divergence: vmap over inputs that require"):
        torch.vmap(lambda a: divkit.sparse_divergence(a, idx[0], lp[0]))(s.clone().requires_grad_())
    with pytest.raises(divkit.Error, match="topk_divergence: vmap over inputs that require"):
        torch.vmap(lambda a: divkit.topk_divergence(a, t[0], 3))(s.clone().requires_grad_())
    with pytest.raises(divkit.Error, match="sparse_divergence: torch.func.grad"):
        torch.func.grad(lambda a: divkit.sparse_divergence(a, idx, lp))(s)
    with pytest.raises(divkit.Error, match="topk_divergence: torch.func.grad"):
        torch.func.grad(lambda a: divkit.topk_divergence(a, t, 3))(s)


@pytest.mark.parametrize("always", [False, True], ids=["function", "op"])
def test_double_backward_raises(always, monkeypatch):
    monkeypatch.setattr(_ops, "ALWAYS", always)
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    idx, lp = _sparse_teacher(g, (6, 16))
    w = torch.randn(16, 16, generator=g, requires_grad=True)
    # A gradient penalty: the second-order term of the divergence would be silently missing.
    (gw,) = torch.autograd.grad(divkit.sparse_divergence(s @ w, idx, lp), w, create_graph=True)
    with pytest.raises(divkit.Error, match="sparse_divergence: double backward"):
        (gw**2).sum().backward()
    loss = divkit.topk_divergence(s @ w, t, 5, reduction="none").sum()
    (gw,) = torch.autograd.grad(loss, w, create_graph=True)
    with pytest.raises(divkit.Error, match="topk_divergence: double backward"):
        gw.sum().backward()
    # First-order use is unaffected: plain backward gives gradients that do not require grad.
    (gw,) = torch.autograd.grad(divkit.topk_divergence(s @ w, t, 5), w)
    assert not gw.requires_grad


def test_inplace_grad_under_compile_gets_its_own_buffer():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 16, generator=g, requires_grad=True)
    idx, lp = _sparse_teacher(g, (3, 16))

    def f(x):
        return divkit.sparse_divergence(x * 2.0, idx, lp, inplace_grad=True)

    torch._dynamo.reset()
    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    loss.backward()
    got = x.grad.clone()
    x.grad = None
    f(x).backward()
    assert torch.equal(got, x.grad)
