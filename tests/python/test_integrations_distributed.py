"""divkit's fused heads under data parallelism on real gloo process groups (2 processes): a
DTensor (FSDP2-style sharded) lm_head weight, DDP, and vocabulary-parallel calls whose ranks
pass different tokens (an error on every rank, not a wrong loss)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from _dist import run_ranks

N, H, V = 6, 8, 20


def _data(rank):
    g = torch.Generator().manual_seed(10 + rank)
    hidden = torch.randn(N, H, generator=g)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[rank] = -100
    return hidden, labels


def _weights():
    g = torch.Generator().manual_seed(0)
    return torch.randn(V, H, generator=g), torch.randn(H, H, generator=g)


def _reference(world, body_layer: bool):
    """Data parallelism's gradients: the mean over ranks of each rank's loss gradient (the loss
    on the hidden states, or on tanh(hidden @ body) with body_layer)."""
    import divkit

    w, body = _weights()
    w = w.clone().requires_grad_(True)
    body = body.clone().requires_grad_(True)
    total = 0
    for r in range(world):
        h, y = _data(r)
        x = torch.tanh(h @ body) if body_layer else h
        total = total + divkit.fused_linear_cross_entropy(x, w, y)
    (total / world).backward()
    return w.grad, body.grad


def _checks(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import divkit

    want_w, _ = _reference(world, False)
    h, y = _data(rank)
    w_full, body_full = _weights()

    # 1. A weight sharded over the vocabulary as FSDP2 keeps it (a DTensor, Shard(0)).
    mesh = init_device_mesh("cpu", (world,))
    w = torch.nn.Parameter(distribute_tensor(w_full, mesh, [Shard(0)]))
    loss = divkit.fused_linear_cross_entropy(h, w, y)
    want_loss = divkit.fused_linear_cross_entropy(h, w_full, y)
    assert torch.equal(loss, want_loss), (loss, want_loss)
    loss.backward()
    assert isinstance(w.grad, type(w.data)) and w.grad.placements == w.placements
    torch.testing.assert_close(w.grad.full_tensor(), want_w, rtol=1e-5, atol=1e-6)
    # fused_linear_logprobs and fused_linear_divergence take DTensor weights too.
    lp = divkit.fused_linear_logprobs(h, w, y)
    torch.testing.assert_close(lp, divkit.fused_linear_logprobs(h, w_full, y))
    kd = divkit.fused_linear_divergence(h, w, h, w_full, "jsd", labels=y)
    torch.testing.assert_close(
        kd, divkit.fused_linear_divergence(h, w_full, h, w_full, "jsd", labels=y)
    )

    # 2. DDP: a model whose loss is divkit's fused head on its own lm_head weight.
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(H, H, bias=False)
            self.lm_head = torch.nn.Linear(H, V, bias=False)
            with torch.no_grad():
                self.body.weight.copy_(body_full.T)
                self.lm_head.weight.copy_(w_full)

        def forward(self, h, y):
            return divkit.fused_linear_cross_entropy(
                torch.tanh(self.body(h)), self.lm_head.weight, y
            )

    want_w, want_body = _reference(world, True)
    ddp = torch.nn.parallel.DistributedDataParallel(Model())
    ddp(h, y).backward()
    torch.testing.assert_close(ddp.module.lm_head.weight.grad, want_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ddp.module.body.weight.grad, want_body.T, rtol=1e-5, atol=1e-6)

    # 3. Vocabulary-parallel mode: ranks that pass different hidden states raise on every rank.
    shard = w_full[rank * V // world : (rank + 1) * V // world]
    same_h, same_y = _data(0)
    out = divkit.fused_linear_cross_entropy(same_h, shard, same_y, process_group=dist.group.WORLD)
    torch.testing.assert_close(out, divkit.fused_linear_cross_entropy(same_h, w_full, same_y))
    try:
        divkit.fused_linear_cross_entropy(h, shard, same_y, process_group=dist.group.WORLD)
    except divkit.Error as e:
        assert "ranks passed different tokens (hidden states differ)" in str(e), str(e)
    else:
        raise AssertionError("different hidden states across ranks were accepted")


def test_dtensor_ddp_and_vocab_parallel_token_check(tmp_path):
    # hard_exit: PyTorch's gloo teardown at interpreter exit can abort a rank whose device mesh
    # still references the group (see _dist._worker).
    run_ranks(2, _checks, tmp_path, hard_exit=True)
