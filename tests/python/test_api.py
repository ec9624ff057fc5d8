"""inplace_grad, the DivergenceLoss module, numpy inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import divkit
import divkit_reference as ref
from conftest import KIND_CASES, case_id, logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("case", KIND_CASES, ids=case_id)
def test_inplace_grad_equals_normal_gradient(case, dtype):
    kind, params = case
    s0 = logits(2, 5, 64, seed=700, dtype=dtype)
    t = logits(2, 5, 64, seed=701, dtype=dtype)
    labels = torch.tensor([[1, 2, -100, 3, 4], [-100, 0, 0, 0, 0]])

    s = s0.clone().requires_grad_(True)
    loss = divkit.divergence(s, t, kind, labels=labels, **params)
    loss.backward()

    buf = s0.clone()
    s_in = buf.clone().requires_grad_(True)  # leaf whose storage gets the gradient
    loss_in = divkit.divergence(s_in, t, kind, labels=labels, inplace_grad=True, **params)
    # The logits' storage now holds the gradient.
    assert torch.equal(s_in.detach(), s.grad)
    loss_in.backward()
    assert torch.equal(loss_in, loss)
    assert torch.equal(s_in.grad, s.grad)


def test_inplace_grad_non_leaf_and_scaling():
    # The usual case: logits produced by a layer; the gradient flows on through it.
    torch.manual_seed(0)
    h = torch.randn(6, 16, requires_grad=True)
    w = torch.randn(16, 50, requires_grad=True)
    t = logits(6, 50, seed=702)
    grads = []
    for inplace in (False, True):
        h.grad = w.grad = None
        loss = divkit.divergence(h @ w, t, "reverse_kl", inplace_grad=inplace, reduction="sum")
        (0.5 * loss).backward()
        grads.append((h.grad.clone(), w.grad.clone()))
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    # reduction none, per-token upstream gradient
    go = torch.rand(6)
    out = []
    for inplace in (False, True):
        s = logits(6, 50, seed=703).requires_grad_(True)
        divkit.divergence(s, t, "tvd", reduction="none", inplace_grad=inplace).backward(go)
        out.append(s.grad)
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)


def test_inplace_grad_with_copied_layout():
    # Logits that cannot be flattened as a view: a copy gets the gradient, the result is right.
    base = logits(3, 6, 40, seed=704)
    s = base[:, :4].clone().transpose(0, 1).requires_grad_(True)  # [4, 3, 40] non-collapsible
    t = logits(4, 3, 40, seed=705)
    want = ref.loss_and_grads(s, t, "forward_kl")
    loss = divkit.divergence(s, t, inplace_grad=True)
    loss.backward()
    torch.testing.assert_close(s.grad.double(), want[1], rtol=0, atol=1e-6)


def test_divergence_loss_module():
    loss_fn = divkit.nn.DivergenceLoss("jsd", beta=0.3, temperature=2.0, reduction="sum")
    assert isinstance(loss_fn, torch.nn.Module)
    assert "jsd" in repr(loss_fn) and "beta=0.3" in repr(loss_fn)
    assert list(loss_fn.parameters()) == [] and loss_fn.state_dict() == {}
    s = logits(2, 4, 30, seed=706).requires_grad_(True)
    t = logits(2, 4, 30, seed=707)
    labels = torch.tensor([[0, 1, -100, 2], [3, 3, 3, -100]])
    weights = torch.rand(2, 4)
    loss = loss_fn(s, t, labels=labels, weights=weights, num_items_in_batch=5)
    want = divkit.divergence(
        s.detach(),
        t,
        "jsd",
        beta=0.3,
        temperature=2.0,
        reduction="sum",
        labels=labels,
        weights=weights,
        num_items_in_batch=5,
    )
    assert torch.equal(loss.detach(), want)
    loss.backward()
    assert s.grad.shape == s.shape
    default = divkit.nn.DivergenceLoss()
    assert default.kind == "forward_kl" and default.options["reduction"] == "mean"
    assert repr(default) == "DivergenceLoss(kind='forward_kl')"


@pytest.mark.parametrize("case", KIND_CASES, ids=case_id)
def test_module_for_every_kind(case):
    kind, params = case
    s, t = logits(3, 17, seed=708), logits(3, 17, seed=709)
    got = divkit.nn.DivergenceLoss(kind, **params)(s, t)
    assert got.item() == pytest.approx(ref.loss(s, t, kind, **params).item(), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("np_dtype", [np.float32, np.float16, np.float64])
def test_numpy_inputs(np_dtype):
    s = logits(2, 3, 25, seed=710).numpy().astype(np_dtype)
    t = logits(2, 3, 25, seed=711).numpy().astype(np_dtype)
    labels = np.array([[0, -100, 1], [2, 2, 2]])
    for reduction in ("mean", "none"):
        got = divkit.divergence(s, t, "jsd", labels=labels, reduction=reduction)
        assert isinstance(got, np.ndarray) and got.dtype == np.float32
        assert got.shape == ((2, 3) if reduction == "none" else ())
        want = divkit.divergence(
            torch.from_numpy(s),
            torch.from_numpy(t),
            "jsd",
            labels=torch.from_numpy(labels),
            reduction=reduction,
        )
        np.testing.assert_array_equal(got, want.numpy())


def test_numpy_read_only_and_strided():
    s = logits(4, 30, seed=712).numpy()
    t = logits(30, 4, seed=713).numpy().T  # column-strided: copied
    s.setflags(write=False)
    w = np.linspace(0.1, 1.0, 4).astype(np.float64)
    got = divkit.divergence(s, t, weights=w, reduction="sum")
    want = ref.loss(
        torch.from_numpy(s.copy()),
        torch.from_numpy(t.copy()),
        weights=torch.from_numpy(w),
        reduction="sum",
    )
    assert float(got) == pytest.approx(want.item(), rel=1e-5)
