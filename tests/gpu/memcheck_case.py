"""A small case of every CUDA divergence kernel path, run under compute-sanitizer memcheck."""

import torch

from divkit import _C

s = torch.randn(5, 333, device="cuda").to(torch.bfloat16)
t = torch.randn(5, 333, device="cuda")
labels = torch.tensor([1, -100, 2, 3, 4], device="cuda")
weights = torch.rand(5, device="cuda")
for kind in _C.kinds():
    for reduction in ["none", "mean"]:
        loss = torch.zeros(5 if reduction == "none" else 1, device="cuda", dtype=torch.float64)
        gs, gt = torch.empty_like(s), torch.empty_like(t)
        args = _C.DivergenceArgs(
            kind=kind, reduction=reduction, alpha=0.7 if kind != "renyi" else 1.5
        )
        _C.divergence(s, t, loss, gs, gt, labels, weights, args)
    sc = s.clone()
    _C.divergence(
        sc, t, torch.zeros(1, device="cuda"), sc, None, None, None, _C.DivergenceArgs(kind=kind)
    )
torch.cuda.synchronize()
print("memcheck case done")
