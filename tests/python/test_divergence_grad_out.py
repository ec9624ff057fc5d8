"""divergence(..., grad_out=...): the student gradient written into a caller's buffer."""

import pytest
import torch

import divkit


def _logits(n=6, v=37, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g).to(dtype)
    t = (s.float() + 0.5 * torch.randn(n, v, generator=g)).to(dtype)
    return s, t


@pytest.mark.parametrize("kind", ["forward_kl", "jsd", "renyi"])
def test_grad_out_matches_the_default_buffer(kind):
    s, t = _logits()
    a = s.clone().requires_grad_()
    loss_a = divkit.divergence(a, t, kind, alpha=0.5)
    loss_a.backward()

    b = s.clone().requires_grad_()
    buf = torch.full_like(s, float("nan"))
    loss_b = divkit.divergence(b, t, kind, alpha=0.5, grad_out=buf)
    # Written by the forward call, bit for bit the gradient of the default path.
    assert torch.equal(buf, a.grad)
    loss_b.backward()
    assert torch.equal(loss_a, loss_b)
    assert torch.equal(b.grad, a.grad)


def test_grad_out_scaled_by_the_upstream_gradient():
    s, t = _logits()
    a = s.clone().requires_grad_()
    (3.0 * divkit.divergence(a, t, "reverse_kl")).backward()
    b = s.clone().requires_grad_()
    buf = torch.empty_like(s)
    (3.0 * divkit.divergence(b, t, "reverse_kl", grad_out=buf)).backward()
    assert torch.equal(b.grad, a.grad)


def test_grad_out_reused_across_calls_and_grad_dtype():
    s, t = _logits(dtype=torch.bfloat16)
    buf = torch.empty(s.shape, dtype=torch.float32)
    for seed in range(2):
        s, t = _logits(dtype=torch.bfloat16, seed=seed)
        _, ref, _ = divkit.divergence_and_grad(s, t, "jsd", grad_dtype=torch.float32)
        loss, g, _ = divkit.divergence_and_grad(s, t, "jsd", grad_dtype=torch.float32, grad_out=buf)
        assert g is buf
        assert torch.equal(buf, ref)


def test_grad_out_with_leading_dims_and_labels():
    s, t = _logits(n=12)
    s3, t3 = s.view(3, 4, -1), t.view(3, 4, -1)
    labels = torch.zeros(3, 4, dtype=torch.long)
    labels[1, 2] = -100
    _, ref, _ = divkit.divergence_and_grad(s3, t3, labels=labels)
    buf = torch.empty_like(s3)
    _, g, _ = divkit.divergence_and_grad(s3, t3, labels=labels, grad_out=buf)
    assert g is buf and torch.equal(buf, ref)
    assert torch.all(buf[1, 2] == 0)


def test_grad_out_is_student_means_in_place():
    s, t = _logits()
    _, ref, _ = divkit.divergence_and_grad(s.clone(), t)
    x = s.clone()
    _, g, _ = divkit.divergence_and_grad(x, t, grad_out=x)
    assert g.data_ptr() == x.data_ptr()
    assert torch.equal(x, ref)


def test_grad_out_not_written_without_a_student_gradient():
    s, t = _logits()
    buf = torch.full_like(s, 7.0)
    divkit.divergence(s, t, grad_out=buf)  # s does not require grad
    assert torch.all(buf == 7.0)


def _fails(match, **kw):
    s, t = _logits()
    s.requires_grad_()
    with pytest.raises(divkit.Error, match=match):
        divkit.divergence(s, t, **kw)


def test_grad_out_errors():
    s, t = _logits()
    _fails(r"divergence: grad_out must be a torch.Tensor", grad_out=[1.0])
    _fails(r"divergence: grad_out has shape \(6, 36\)", grad_out=torch.empty(6, 36))
    _fails(
        r"divergence: grad_out has dtype torch.float64; expected torch.float32",
        grad_out=torch.empty(6, 37, dtype=torch.float64),
    )
    _fails(
        r"expected torch.float32 \(grad_dtype\)",
        grad_out=torch.empty(6, 37, dtype=torch.bfloat16),
        grad_dtype=torch.float32,
    )
    _fails(
        r"divergence: grad_out must be laid out as \[N, V\] rows", grad_out=torch.empty(37, 6).t()
    )
    _fails(r"divergence: grad_out requires grad", grad_out=torch.empty(6, 37, requires_grad=True))
    _fails(
        r"grad_out and inplace_grad=True cannot be combined",
        grad_out=torch.empty(6, 37),
        inplace_grad=True,
    )


def test_grad_out_aliasing_errors():
    s, t = _logits()
    s.requires_grad_()
    with pytest.raises(divkit.Error, match="divergence: grad_out shares memory with teacher"):
        divkit.divergence(s, t, grad_out=t)
    big = torch.randn(7, 37)
    with pytest.raises(divkit.Error, match="grad_out shares memory with teacher_logits"):
        divkit.divergence(s, big[:6], grad_out=big[1:])
    w = torch.ones(6 * 37)
    with pytest.raises(divkit.Error, match="grad_out shares memory with weights"):
        divkit.divergence(s, t, weights=w[:6], grad_out=w.view(6, 37))
    x = torch.randn(7, 37)
    with pytest.raises(divkit.Error, match="grad_out shares memory with student_logits"):
        divkit.divergence_and_grad(x[:6], t, grad_out=x[1:])
    with pytest.raises(divkit.Error, match="divergence_and_grad: grad_out has shape"):
        divkit.divergence_and_grad(s.detach(), t, grad_out=torch.empty(6, 38))


def test_grad_out_with_the_torch_backend():
    s, t = _logits()
    _, ref, _ = divkit.divergence_and_grad(s, t, "jsd", backend="torch")
    buf = torch.full_like(s, float("nan"))
    _, g, _ = divkit.divergence_and_grad(s, t, "jsd", backend="torch", grad_out=buf)
    assert g is buf and torch.equal(buf, ref)
    a = s.clone().requires_grad_()
    buf2 = torch.empty_like(s)
    divkit.divergence(a, t, "jsd", backend="torch", grad_out=buf2).backward()
    assert torch.equal(a.grad, ref)
