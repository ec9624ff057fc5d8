"""Vocabulary-parallel calls on a real gloo process group: an argument rejected on one rank (a NaN
in its weight shard) raises divkit.Error on every rank, instead of leaving the others waiting in a
collective; the chunk loop then still works on the same group."""

from __future__ import annotations

import torch
import torch.distributed as dist

from _dist import run_ranks


def _checks(rank: int):
    import divkit

    g = torch.Generator().manual_seed(0)
    n, v, h = 6, 9, 4
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g)
    labels = torch.randint(0, v, (n,), generator=g)
    lo, hi = (0, 4) if rank == 0 else (4, v)
    shard = weight[lo:hi].clone()
    if rank == 1:
        shard[2, 1] = float("nan")
    try:
        divkit.fused_linear_cross_entropy(hidden, shard, labels, process_group=dist.group.WORLD)
    except divkit.Error as e:
        want = "weight contains NaN or inf at row 2" if rank == 1 else "other rank"
        assert want in str(e), str(e)
    else:
        raise AssertionError("the NaN in rank 1's shard was not reported")
    # The group is still usable, and the result is the unsharded one.
    out = divkit.fused_linear_cross_entropy(
        hidden, weight[lo:hi], labels, process_group=dist.group.WORLD
    )
    ref = divkit.fused_linear_cross_entropy(hidden, weight, labels)
    got, want = float(out), float(ref)
    assert abs(got - want) <= 1e-5 * max(1.0, abs(want)), (got, want)
    _argument_errors_name_the_function(rank)


def _argument_errors_name_the_function(rank: int):
    """Bad options of vocab_parallel_divergence (the same on every rank) raise divkit.Error
    naming vocab_parallel_divergence and the argument, not the inner divergence."""
    import divkit
    from divkit.distributed import vocab_parallel_divergence

    s = torch.randn(3, 5)
    t = torch.randn(3, 5)
    bad = [
        (dict(kind="nope"), "kind 'nope'"),
        (dict(temperature=-1.0), "temperature"),
        (dict(kind="jsd", beta=2.0), "beta"),
        (dict(kind="renyi", alpha=-1.0), "alpha"),
        (dict(scale_by_t_squared="yes"), "scale_by_t_squared"),
    ]
    for kw, what in bad:
        kind = kw.pop("kind", "forward_kl")
        try:
            vocab_parallel_divergence(s, t, kind, **kw)
        except divkit.Error as e:
            msg = str(e)
            assert msg.startswith("vocab_parallel_divergence: ") and what in msg, msg
        else:
            raise AssertionError(f"{kind} {kw}: no error")


def _rank(rank: int, world: int):
    _checks(rank)


def test_an_error_on_one_rank_is_raised_on_every_rank(tmp_path):
    run_ranks(2, _rank, tmp_path)


def test_without_a_process_group_the_error_names_the_argument():
    import divkit
    from divkit.distributed import vocab_parallel_divergence

    assert not dist.is_initialized()
    try:
        vocab_parallel_divergence(torch.randn(2, 4), torch.randn(2, 4))
    except divkit.Error as e:
        assert str(e).startswith("vocab_parallel_divergence: process_group"), str(e)
    else:
        raise AssertionError("no error without an initialized process group")
