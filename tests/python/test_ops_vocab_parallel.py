"""The fused heads with ``process_group=`` (vocabulary-parallel) through their custom ops, the
group passed by its c10d name: torch.compile(fullgraph=True) with no graph break and eager's
bits (losses and shard gradients), opcheck, the ranks' token check when the compiled graph
runs, a clear divkit.Error on vmap and on double backward. Real gloo process groups (2 ranks)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from _dist import run_ranks
from divkit import _ops

pytestmark = pytest.mark.skipif(not _ops.ENABLED, reason="torch.library.custom_op needs torch>=2.4")

N, H, V = 7, 6, 13


def _data():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(N, H, generator=g)
    t_hidden = torch.randn(N, H, generator=g)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[2] = -100
    w, tw = torch.randn(V, H, generator=g), torch.randn(V, H, generator=g)
    b = torch.randn(V, generator=g)
    return hidden, t_hidden, labels, w, tw, b


def _expect_error(match: str, f, *args):
    import divkit

    try:
        f(*args)
    except divkit.Error as e:
        assert match in str(e), str(e)
    else:
        raise AssertionError(f"no divkit.Error ({match})")


def _checks(rank: int, world: int):
    import divkit

    group = dist.group.WORLD
    hidden, t_hidden, labels, w, tw, b = _data()
    lo, hi = [0, 6, V][rank], [0, 6, V][rank + 1]
    up = torch.linspace(0.5, 1.5, N)

    def heads(reduction):
        def ce(h, w, b):
            out = divkit.fused_linear_cross_entropy(
                h, w, labels, b, reduction=reduction, chunk_size=3, process_group=group
            )
            return (out * up).sum() if reduction == "none" else out * 2

        def distill(h, w, b):
            out = divkit.fused_linear_divergence(
                h, w, t_hidden, tw[lo:hi], "jsd", student_bias=b, labels=labels, reduction=reduction,
                hard_weight=0.4, soft_weight=0.6, chunk_size=4, process_group=group,
            )  # fmt: skip
            return (out * up).sum() if reduction == "none" else out * 2

        def logprobs(h, w, b):
            res = divkit.fused_linear_logprobs(
                h, w, labels, b, temperature=0.8, return_entropy=True, process_group=group
            )
            return (res.logprobs * up).sum() + res.entropy.sum()

        return {"ce": ce, "distill": distill, "logprobs": logprobs}

    for reduction in ("mean", "none"):
        for name, f in heads(reduction).items():
            if name == "logprobs" and reduction == "none":
                continue
            xs = [x.clone().requires_grad_(True) for x in (hidden, w[lo:hi], b[lo:hi])]
            where = f"{name} {reduction}"
            torch._dynamo.reset()
            explain = torch._dynamo.explain(f)(*xs)
            assert explain.graph_break_count == 0, (where, explain.break_reasons)
            torch._dynamo.reset()
            got = torch.compile(f, fullgraph=True, backend="aot_eager")(*xs)
            got_grads = torch.autograd.grad(got, xs)
            want = f(*xs)
            want_grads = torch.autograd.grad(want, xs)
            assert torch.equal(got, want), where
            for a, c in zip(got_grads, want_grads):
                assert torch.equal(a, c), where
            # Double backward: a clear error, on the op path and the eager path.
            for always in (True, False):
                _ops.ALWAYS = always
                try:
                    out = f(*xs)
                    (gw,) = torch.autograd.grad(out, xs[1], create_graph=True)
                    _expect_error("double backward", lambda: gw.sum().backward())
                finally:
                    _ops.ALWAYS = False

    # The unsharded head gives the same loss (to rounding: the row sums are split).
    full = divkit.fused_linear_cross_entropy(hidden, w, labels, b, chunk_size=3)
    torch._dynamo.reset()
    compiled = torch.compile(heads("mean")["ce"], fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(hidden, w[lo:hi], b[lo:hi]), full * 2)

    # The ranks' token check runs in the op, when the compiled graph runs.
    mine = hidden + rank
    _expect_error("ranks passed different tokens", compiled, mine, w[lo:hi], b[lo:hi])

    # opcheck (its calls are collectives too: every rank makes the same ones).
    name = group.group_name
    h2, w2, b2 = hidden.clone(), w[lo:hi].clone(), b[lo:hi].clone()
    ce_args = (h2, w2, b2, labels, None, -100, 0.0, 0.0, 0.0, "mean", 0.0, 4, True, "auto")
    torch.library.opcheck(_ops.fused_ce_op, ce_args + ([False] * 3, name))
    lp_args = (h2, w2, b2, labels, 1.0, -100, True, 2, 4, "auto", False, False, name)
    torch.library.opcheck(_ops.fused_logprobs_op, lp_args)

    # vmap: refused with a process group (each call is a collective).
    with torch.no_grad():
        hs = hidden.detach()[None].expand(2, N, H)
        _expect_error(
            "fused_linear_cross_entropy: torch.vmap is not supported with process_group",
            torch.vmap(
                lambda h: divkit.fused_linear_cross_entropy(
                    h, w[lo:hi], labels, process_group=group
                )
            ),  # fmt: skip
            hs,
        )


def test_vocab_parallel_fused_heads_compile_fullgraph(tmp_path):
    # hard_exit: PyTorch's gloo teardown can abort a rank (see _dist._worker).
    run_ranks(2, _checks, tmp_path, hard_exit=True)
