"""bfloat16 / float16 inputs: divkit's error against the float64 truth is at most about twice
the error PyTorch makes computing in float32 from the same (rounded) inputs."""

from __future__ import annotations

import pytest
import torch

import divkit
import divkit_reference as ref
from conftest import KIND_CASES, case_id, logits, max_err

FACTOR = 2.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", KIND_CASES, ids=case_id)
def test_low_precision_inputs(case, dtype):
    kind, params = case
    s = logits(8, 1000, scale=3.0, seed=300, dtype=dtype)
    t = logits(8, 1000, scale=3.0, seed=301, dtype=dtype)
    labels = torch.tensor([0, 1, -100, 3, 4, 5, 6, 7])
    kw = dict(labels=labels, temperature=1.0, **params)

    exact = ref.loss_and_grads(s, t, kind, **kw)  # float64 on the inputs
    torch32 = ref.loss_and_grads(s, t, kind, dtype=torch.float32, **kw)  # PyTorch in fp32

    # Loss (fp32 in both). The floor covers a PyTorch error that happens to be ~0.
    loss = divkit.divergence(s, t, kind, **kw)
    err, err_torch = max_err(loss, exact[0]), max_err(torch32[0], exact[0])
    floor = 2e-7 * exact[0].abs().item() + 1e-8
    assert err <= FACTOR * err_torch + floor, (err, err_torch)

    # fp32 gradient from the low-precision inputs.
    _, gs32, _ = divkit.divergence_and_grad(s, t, kind, grad_dtype=torch.float32, **kw)
    err, err_torch = max_err(gs32, exact[1]), max_err(torch32[1], exact[1])
    floor = 2e-7 * exact[1].abs().max().item()
    assert err <= FACTOR * err_torch + floor, (err, err_torch)

    # Gradient in the input dtype through autograd: compare with PyTorch's fp32 gradient
    # rounded to that dtype.
    sl = s.clone().requires_grad_(True)
    divkit.divergence(sl, t, kind, **kw).backward()
    assert sl.grad.dtype == dtype
    err, err_torch = max_err(sl.grad, exact[1]), max_err(torch32[1].to(dtype), exact[1])
    assert err <= FACTOR * err_torch + floor, (err, err_torch)


def test_grad_dtype_float32_through_autograd():
    # Autograd hands bf16 logits a bf16 gradient; grad_dtype=float32 rounds it once, after the
    # upstream scaling, instead of twice.
    s = logits(16, 300, seed=302, dtype=torch.bfloat16)
    t = logits(16, 300, seed=303, dtype=torch.bfloat16)
    go = torch.tensor(0.3)
    _, exact, _ = ref.loss_and_grads(s, t, "forward_kl", grad_output=go)
    errs = {}
    for gd in (None, torch.float32):
        sl = s.clone().requires_grad_(True)
        divkit.divergence(sl, t, grad_dtype=gd).backward(go)
        assert sl.grad.dtype == torch.bfloat16
        errs[gd] = max_err(sl.grad, exact)
    assert errs[torch.float32] <= errs[None]
    assert max_err(exact.to(torch.bfloat16), exact) == pytest.approx(errs[torch.float32], rel=0.5)
