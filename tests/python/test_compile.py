"""divkit's kernel entries as torch.library custom ops: torch.compile(fullgraph=True) without
graph breaks and with the eager results bit for bit, vmap, double backward, and the in-place
gradient's version counter."""

import warnings

import pytest
import torch

import divkit
from divkit import _ops

pytestmark = pytest.mark.skipif(not _ops.ENABLED, reason="torch.library.custom_op needs torch>=2.4")


class Tiny(torch.nn.Module):
    """A two-layer 'language model' whose loss is one divkit call (``which``)."""

    def __init__(self, which: str):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Linear(8, 12)
        self.head = torch.nn.Linear(12, 32, bias=False)
        self.teacher = torch.nn.Linear(8, 32)
        self.which = which

    def forward(self, x, labels):
        h = torch.tanh(self.body(x))
        w = self.head.weight
        tw, tb = self.teacher.weight.detach(), self.teacher.bias.detach()
        if self.which == "divergence":
            t = self.teacher(x).detach()
            return divkit.divergence(h @ w.T, t, "jsd", beta=0.3, labels=labels, temperature=2.0)
        if self.which == "divergence_none":
            t = self.teacher(x).detach()
            loss = divkit.divergence(h @ w.T, t, "reverse_kl", labels=labels, reduction="none")
            return (loss * torch.arange(loss.shape[-1])).sum()
        if self.which == "divergence_bf16":
            t = self.teacher(x).detach()
            z = (h @ w.T).to(torch.bfloat16)
            return divkit.divergence(z, t, "forward_kl", labels=labels, grad_dtype=torch.float32)
        if self.which == "cross_entropy":
            return divkit.fused_linear_cross_entropy(h, w, labels, num_items_in_batch=7)
        if self.which == "cross_entropy_none":
            return divkit.fused_linear_cross_entropy(h, w, labels, reduction="none").sum() * 0.5
        if self.which == "cross_entropy_stats":
            loss, lp, ent = divkit.fused_linear_cross_entropy(h, w, labels, return_stats=True)
            return loss + 0.0 * (lp.sum() + ent.sum())
        if self.which == "fused_divergence":
            return divkit.fused_linear_divergence(
                h, w, x, tw, "jsd", teacher_bias=tb, labels=labels, hard_weight=0.3, temperature=2.0
            )
        if self.which == "fused_divergence_none":
            loss = divkit.fused_linear_divergence(
                h, w, x, tw, "reverse_kl", labels=labels, reduction="none"
            )
            return loss.sum() * 3
        if self.which.startswith("fused_sparse"):
            top = torch.log_softmax(self.teacher(x).detach(), -1).topk(5, dim=-1)
            none = self.which.endswith("none")
            loss = divkit.fused_linear_sparse_divergence(
                h,
                w,
                top.indices,
                top.values,
                "reverse_kl" if none else "forward_kl",
                labels=labels,
                hard_weight=0.0 if none else 0.5,
                reduction="none" if none else "mean",
            )
            return loss.sum() if none else loss
        if self.which == "logprobs":
            r = divkit.fused_linear_logprobs(h, w, labels, return_entropy=True, topk=3)
            return r.logprobs.sum() + 0.1 * r.entropy.sum()
        raise AssertionError(self.which)


CASES = [
    "divergence",
    "divergence_none",
    "divergence_bf16",
    "cross_entropy",
    "cross_entropy_none",
    "cross_entropy_stats",
    "fused_divergence",
    "fused_divergence_none",
    "logprobs",
    "fused_sparse",
    "fused_sparse_none",
]


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
    """The sum of several of Tiny's losses (one compiled graph for all of them)."""

    def __init__(self, cases):
        super().__init__()
        self.parts = torch.nn.ModuleList(Tiny(c) for c in cases)

    def forward(self, x, labels):
        return sum(m(x, labels) for m in self.parts)


@pytest.mark.parametrize("cases", [CASES[:5], CASES[5:]], ids=["divergence", "fused"])
def test_fullgraph_compile_equals_eager(cases):
    """fullgraph=True fails on any graph break; one frame compiled; loss and every parameter's
    gradient equal to eager bit for bit."""
    from torch._dynamo.testing import CompileCounterWithBackend

    model = Sum(cases)
    x, labels = _data()
    ref = _loss_and_grads(model, model, x, labels)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    got = _loss_and_grads(model, compiled, x, labels)
    assert counter.frame_count == 1
    assert torch.equal(ref[0], got[0])
    assert len(ref[1]) == len(got[1]) > 0
    for a, b in zip(ref[1], got[1]):
        assert torch.equal(a, b)


def test_no_graph_break_in_explain():
    explain = torch._dynamo.explain(Tiny("divergence"))(*_data())
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
    for a, b in zip(ref[1], got[1]):
        assert torch.equal(a, b)


def test_vmap_is_one_call_per_entry():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(3, 4, 16, generator=g), torch.randn(3, 4, 16, generator=g)
    got = torch.vmap(lambda a, b: divkit.divergence(a, b, "jsd"))(s, t)
    assert torch.equal(got, torch.stack([divkit.divergence(s[i], t[i], "jsd") for i in range(3)]))
    h, w = torch.randn(3, 4, 8, generator=g), torch.randn(16, 8, generator=g)
    labels = torch.randint(0, 16, (3, 4), generator=g)
    got = torch.vmap(lambda a, y: divkit.fused_linear_cross_entropy(a, w, y))(h, labels)
    ref = [divkit.fused_linear_cross_entropy(h[i], w, labels[i]) for i in range(3)]
    assert torch.equal(got, torch.stack(ref))


def test_vmap_with_grad_and_func_grad_raise_divkit_errors():
    s, t = torch.randn(3, 4, 16), torch.randn(3, 4, 16)
    with pytest.raises(divkit.Error, match="divergence: vmap over inputs that require grad"):
        torch.vmap(lambda a: divkit.divergence(a, t[0]))(s.clone().requires_grad_())
    with pytest.raises(divkit.Error, match="divergence: torch.func.grad"):
        torch.func.grad(lambda a: divkit.divergence(a, t))(s)


@pytest.mark.parametrize("always", [False, True])
def test_double_backward_raises(always, monkeypatch):
    monkeypatch.setattr(_ops, "ALWAYS", always)
    s, t = torch.randn(6, 16), torch.randn(6, 16)
    w = torch.randn(16, 16, requires_grad=True)
    # A gradient penalty: the second-order term of the divergence would be silently missing.
    (g,) = torch.autograd.grad(divkit.divergence(s @ w, t), w, create_graph=True)
    with pytest.raises(divkit.Error, match="divergence: double backward"):
        (g**2).sum().backward()
    labels = torch.randint(0, 16, (6,))
    (g,) = torch.autograd.grad(
        divkit.fused_linear_cross_entropy(s, w, labels), w, create_graph=True
    )
    with pytest.raises(divkit.Error, match="fused_linear_cross_entropy: double backward"):
        g.sum().backward()
    (g,) = torch.autograd.grad(
        divkit.fused_linear_logprobs(s, w, labels).sum(), w, create_graph=True
    )
    with pytest.raises(divkit.Error, match="fused_linear_logprobs: double backward"):
        g.sum().backward()
    # First-order use is unaffected: plain backward gives gradients that do not require grad.
    (g,) = torch.autograd.grad(divkit.divergence(s @ w, t), w)
    assert not g.requires_grad


def test_inplace_grad_bumps_the_version_counter():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, 32, generator=g, requires_grad=True)
    t = torch.randn(4, 6, 32, generator=g)
    logits = x.exp()  # exp saves its output (the logits) for its backward
    loss = divkit.divergence(logits, t, inplace_grad=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    # Nothing saved the logits: the same gradient as without inplace_grad, in their storage.
    logits = x * 2.0
    version = logits._version
    loss = divkit.divergence(logits, t, inplace_grad=True)
    assert logits._version > version
    loss.backward()
    grad_inplace = x.grad.clone()
    x.grad = None
    divkit.divergence(x * 2.0, t).backward()
    assert torch.equal(grad_inplace, x.grad)


def test_inplace_grad_on_a_strided_view_warns_once(monkeypatch):
    monkeypatch.setattr("divkit.functional._WARNED", set())
    x = torch.randn(2, 5, 16, requires_grad=True)
    t = torch.randn(2, 5, 16)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(2):
            logits = x * 1.0
            divkit.divergence(logits[:, :-1], t[:, :-1], inplace_grad=True).backward()
    msgs = [str(w.message) for w in seen if "inplace_grad=True" in str(w.message)]
    assert len(msgs) == 1 and "cannot be viewed as [N, V] rows" in msgs[0]
    grad_view = x.grad.clone()
    x.grad = None
    divkit.divergence((x * 1.0)[:, :-1], t[:, :-1]).backward()
    assert torch.equal(grad_view, 2 * x.grad)


@pytest.mark.parametrize("fn", ["sparse_divergence", "topk_divergence"])
def test_sparse_inplace_grad_on_a_strided_view_warns_once(monkeypatch, fn):
    # As divergence's: the logits cannot hold their gradient, so a warning says that no memory is
    # saved; the gradient is that of the call without inplace_grad.
    monkeypatch.setattr("divkit.functional._WARNED", set())
    x = torch.randn(2, 5, 16, requires_grad=True)
    t = torch.randn(2, 5, 16)
    idx = t.topk(3, dim=-1).indices
    lp = torch.log_softmax(t, -1).gather(-1, idx)

    def call(logits, **kw):
        if fn == "sparse_divergence":
            return divkit.sparse_divergence(logits, idx[:, :-1], lp[:, :-1], **kw)
        return divkit.topk_divergence(logits, t[:, :-1], 3, **kw)

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(2):
            call((x * 1.0)[:, :-1], inplace_grad=True).backward()
    msgs = [str(w.message) for w in seen if "inplace_grad=True" in str(w.message)]
    assert len(msgs) == 1 and f"divkit.{fn}(inplace_grad=True)" in msgs[0]
    assert "cannot be viewed as [N, V] rows" in msgs[0]
    grad_view = x.grad.clone()
    x.grad = None
    call((x * 1.0)[:, :-1]).backward()
    assert torch.equal(grad_view, 2 * x.grad)


def test_inplace_grad_under_compile_gets_its_own_buffer():
    x = torch.randn(3, 16, requires_grad=True)
    t = torch.randn(3, 16)

    def f(x):
        return divkit.divergence(x * 2.0, t, inplace_grad=True)

    torch._dynamo.reset()
    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    loss.backward()
    got = x.grad.clone()
    x.grad = None
    f(x).backward()
    assert torch.equal(got, x.grad)
