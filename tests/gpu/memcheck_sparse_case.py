"""A small case of every CUDA sparse / top-k kernel path, run under compute-sanitizer memcheck:
both tails, the top-k selection, labels and weights, in place, an error path (a bad teacher row
read back to the host), and check_finite=False."""

import torch

from divkit import _C

n, v, k = 5, 333, 7
s = torch.randn(n, v, device="cuda").to(torch.bfloat16)
t = torch.randn(n, v, device="cuda")
g = torch.Generator().manual_seed(0)
idx = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)]).cuda()
lp = torch.log_softmax(torch.randn(n, v, device="cuda"), -1).gather(1, idx)
labels = torch.tensor([1, -100, 2, 3, 4], device="cuda")
weights = torch.rand(n, device="cuda")
for kind in _C.kinds():
    args = _C.DivergenceArgs(kind=kind, reduction="none", alpha=0.7 if kind != "renyi" else 1.5)
    for tail in ["bucket", "renormalize"]:
        loss = torch.zeros(n, device="cuda", dtype=torch.float64)
        _C.sparse_divergence(s, idx, lp, loss, torch.empty_like(s), labels, weights, tail, args)
    loss = torch.zeros(n, device="cuda")
    _C.topk_divergence(s, t, k, loss, torch.empty_like(s), labels, weights, args)
    sc = s.clone()
    _C.sparse_divergence(
        sc,
        idx.int(),
        lp.double(),
        torch.zeros(1, device="cuda"),
        sc,
        None,
        None,
        "bucket",
        _C.DivergenceArgs(kind=kind),
    )
bad = idx.clone()
bad[3, 1] = v + 5
try:
    _C.sparse_divergence(
        s, bad, lp, torch.zeros(1, device="cuda"), None, None, None, "bucket", _C.DivergenceArgs()
    )
    raise SystemExit("expected an error for an index out of range")
except _C.Error as e:
    assert "row 3" in str(e), str(e)
quiet = _C.DivergenceArgs(check_finite=False)
_C.sparse_divergence(s, bad, lp, torch.zeros(1, device="cuda"), None, None, None, "bucket", quiet)
torch.cuda.synchronize()
print("memcheck sparse case done")
