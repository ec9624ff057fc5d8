"""A small case of every CUDA Sinkhorn path (src/ot/sinkhorn_cuda.cu), run under
compute-sanitizer memcheck: p = 1 and 2, the cost held and on the fly, float32 and float64, a
batch with frozen problems, the unbalanced, eps-scaling and symmetric modes, a given cost with
the plan, every gradient, an error path read back to the host, and sync=False (the device eps
schedule and results, eps scaling, a bad input flagged on the device)."""

import torch

import divkit
from divkit import _C
from divkit.ot import sinkhorn

assert "sinkhorn" in _C.cuda_ops(), "this build has no CUDA Sinkhorn"
g = torch.Generator().manual_seed(0)
B, n, m, d = 3, 37, 300, 3  # m > 256: several columns per thread; n not a multiple of 8
for dtype in (torch.float64, torch.float32):
    x = torch.randn(B, n, d, generator=g, dtype=torch.float64).to(dtype).cuda()
    y = torch.randn(B, m, d, generator=g, dtype=torch.float64).to(dtype).cuda()
    a = torch.rand(B, n, generator=g, dtype=torch.float64).cuda() + 0.1
    b = torch.rand(B, m, generator=g, dtype=torch.float64).cuda() + 0.1
    a, b = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
    for p in (1, 2):
        for cache_mib in (64.0, 0.0):
            ts = [t.clone().requires_grad_() for t in (x, y, a, b)]
            r = sinkhorn(*ts, eps=0.2, p=p, cost_cache_mib=cache_mib, max_iter=20,
                         return_plan=True, warn=False)  # fmt: skip
            r.reg_cost.sum().backward()
    sinkhorn(x, y, a, b * 2, eps=0.2, rho=(1.0, 3.0), max_iter=20, warn=False)
    sinkhorn(x, y, a, b, eps=0.05, eps_scaling=0.5, check_every=3, max_iter=20, warn=False)
    xs = x.clone().requires_grad_()
    sinkhorn(
        xs, xs, a, a, eps=0.1, symmetric=True, max_iter=20, warn=False
    ).reg_cost.sum().backward()
C = torch.rand(2, 20, 270, generator=g, dtype=torch.float64).cuda().requires_grad_()
r = sinkhorn(None, None, cost=C, eps=0.1, return_plan=True, max_iter=50, warn=False)
r.reg_cost.sum().backward()
bad = torch.randn(2, 9, 2, device="cuda", dtype=torch.float64)
bad[1, 4, 0] = float("inf")
try:
    sinkhorn(bad, bad + 1, eps=0.1)
    raise SystemExit("expected an error for a non-finite point")
except divkit.Error as e:
    assert "[1, 4, 0]" in str(e), str(e)
for cache_mib in (64.0, 0.0):
    r = sinkhorn(x, y, a, b, eps=0.05, eps_scaling=0.5, max_iter=20, cost_cache_mib=cache_mib,
                 sync=False)  # fmt: skip
r = sinkhorn(bad, bad + 1, eps=0.1, max_iter=5, sync=False)
torch.cuda.synchronize()
assert bool(torch.isnan(r.reg_cost).all()), r.reg_cost
print("memcheck sinkhorn case done")
