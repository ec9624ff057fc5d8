"""Vocabulary-parallel losses on real torch.distributed process groups (gloo, 2 and 3 processes
on this machine): every rank holds a contiguous vocabulary shard (uneven sizes), and the loss and
gradients must equal the unsharded computation (divkit's single-process functions, themselves
checked against float64 references in test_fused_linear.py / test_values.py)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from _dist import run_ranks
from conftest import KIND_CASES


def _shard_bounds(v: int, world: int, rank: int):
    base, extra = divmod(v, world)
    sizes = [base + (r < extra) for r in range(world)]
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def _close(got, want, tol, what):
    got, want = got.double(), want.double()
    scale = want.abs().max().item() + 1e-3
    err = (got - want).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:g} * {scale:.3g}"


def _checks(rank: int, world: int):
    import divkit

    torch.manual_seed(0)
    n, v, hs, ht = 29, 61, 12, 20
    lo, hi = _shard_bounds(v, world, rank)
    g = torch.Generator().manual_seed(1)
    s_full = torch.randn(n, v, generator=g) * 2
    t_full = torch.randn(n, v, generator=g) * 2
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::7] = -100
    weights = torch.rand(n, generator=g) + 0.5

    # 1. token-level divergence over sharded logits: every kind.
    for kind, params in KIND_CASES:
        for reduction in ("mean", "none"):
            s = s_full[:, lo:hi].clone().requires_grad_(True)
            t = t_full[:, lo:hi].clone().requires_grad_(True)
            out = divkit.distributed.vocab_parallel_divergence(
                s,
                t,
                kind,
                labels=labels,
                weights=weights,
                reduction=reduction,
                temperature=1.3,
                scale_by_t_squared=True,
                **params,
            )
            sf = s_full.clone().requires_grad_(True)
            tf = t_full.clone().requires_grad_(True)
            want = divkit.divergence(
                sf,
                tf,
                kind,
                labels=labels,
                weights=weights,
                reduction=reduction,
                temperature=1.3,
                scale_by_t_squared=True,
                **params,
            )
            _close(out.detach(), want.detach(), 1e-5, f"{kind} {reduction} loss")
            up = torch.linspace(-1, 1, n) if reduction == "none" else torch.tensor(1.0)
            (out * up).sum().backward()
            (want * up).sum().backward()
            _close(s.grad, sf.grad[:, lo:hi], 1e-5, f"{kind} {reduction} grad student")
            _close(t.grad, tf.grad[:, lo:hi], 1e-5, f"{kind} {reduction} grad teacher")

    # 2. fused distillation with sharded weights (hard + soft terms, biases, teacher grads).
    gh = torch.Generator().manual_seed(2)
    sh = torch.randn(n, hs, generator=gh)
    th = torch.randn(n, ht, generator=gh)
    sw = torch.randn(v, hs, generator=gh) / hs**0.5
    tw = torch.randn(v, ht, generator=gh) * 2 / ht**0.5
    sb, tb = torch.randn(v, generator=gh), torch.randn(v, generator=gh)
    for kind, params, reduction in (
        ("forward_kl", {}, "mean"),
        ("jsd", {"beta": 0.3}, "sum"),
        ("renyi", {"alpha": 2.0}, "none"),
        ("tvd", {}, "mean"),
    ):
        local = [
            x.clone().requires_grad_(True)
            for x in (sh, sw[lo:hi], sb[lo:hi], th, tw[lo:hi], tb[lo:hi])
        ]
        full = [x.clone().requires_grad_(True) for x in (sh, sw, sb, th, tw, tb)]
        kw = dict(
            labels=labels,
            hard_weight=0.3,
            soft_weight=0.7,
            reduction=reduction,
            chunk_size=8,
            temperature=1.5,
            **params,
        )
        out = divkit.fused_linear_divergence(
            local[0],
            local[1],
            local[3],
            local[4],
            kind,
            student_bias=local[2],
            teacher_bias=local[5],
            process_group=dist.group.WORLD,
            **kw,
        )
        want = divkit.fused_linear_divergence(
            full[0],
            full[1],
            full[3],
            full[4],
            kind,
            student_bias=full[2],
            teacher_bias=full[5],
            **kw,
        )
        _close(out.detach(), want.detach(), 2e-5, f"fused {kind} loss")
        up = torch.linspace(0.5, 1.5, n) if reduction == "none" else torch.tensor(0.8)
        (out * up).sum().backward()
        (want * up).sum().backward()
        for name, a, b, sl in (
            ("student_hidden", local[0], full[0], slice(None)),
            ("student_weight", local[1], full[1], slice(lo, hi)),
            ("student_bias", local[2], full[2], slice(lo, hi)),
            ("teacher_hidden", local[3], full[3], slice(None)),
            ("teacher_weight", local[4], full[4], slice(lo, hi)),
            ("teacher_bias", local[5], full[5], slice(lo, hi)),
        ):
            _close(a.grad, b.grad[sl], 3e-5, f"fused {kind} grad {name}")

    # 3. cross-entropy (smoothing, z-loss, softcap) and log-probs (entropy, top-k).
    for opts, reduction in (
        ({}, "mean"),
        ({"label_smoothing": 0.1, "lse_square_scale": 1e-3, "softcap": 3.0}, "none"),
    ):
        local = [x.clone().requires_grad_(True) for x in (sh, sw[lo:hi], sb[lo:hi])]
        full = [x.clone().requires_grad_(True) for x in (sh, sw, sb)]
        out = divkit.fused_linear_cross_entropy(
            local[0],
            local[1],
            labels,
            local[2],
            reduction=reduction,
            chunk_size=7,
            process_group=dist.group.WORLD,
            **opts,
        )
        want = divkit.fused_linear_cross_entropy(
            full[0], full[1], labels, full[2], reduction=reduction, **opts
        )
        _close(out.detach(), want.detach(), 2e-5, f"ce {opts} loss")
        up = torch.linspace(0.5, 1.5, n) if reduction == "none" else torch.tensor(1.0)
        (out * up).sum().backward()
        (want * up).sum().backward()
        _close(local[0].grad, full[0].grad, 3e-5, "ce grad hidden")
        _close(local[1].grad, full[1].grad[lo:hi], 3e-5, "ce grad weight")
        _close(local[2].grad, full[2].grad[lo:hi], 3e-5, "ce grad bias")

    local = [x.clone().requires_grad_(True) for x in (sh, sw[lo:hi], sb[lo:hi])]
    full = [x.clone().requires_grad_(True) for x in (sh, sw, sb)]
    res = divkit.fused_linear_logprobs(
        local[0],
        local[1],
        labels,
        local[2],
        temperature=0.9,
        return_entropy=True,
        topk=4,
        process_group=dist.group.WORLD,
    )
    ref = divkit.fused_linear_logprobs(
        full[0], full[1], labels, full[2], temperature=0.9, return_entropy=True, topk=4
    )
    for name in ("logprobs", "entropy", "topk_mass"):
        _close(getattr(res, name), getattr(ref, name), 2e-5, f"logprobs {name}")
    gl, ge = torch.linspace(-1, 1, n), torch.linspace(1, 2, n)
    ((res.logprobs * gl).sum() + (res.entropy * ge).sum()).backward()
    ((ref.logprobs * gl).sum() + (ref.entropy * ge).sum()).backward()
    _close(local[0].grad, full[0].grad, 3e-5, "logprobs grad hidden")
    _close(local[1].grad, full[1].grad[lo:hi], 3e-5, "logprobs grad weight")

    # 4. errors name the argument on every rank.
    bad = labels.clone()
    bad[3] = v + 5
    try:
        divkit.fused_linear_cross_entropy(sh, sw[lo:hi], bad, process_group=dist.group.WORLD)
    except divkit.Error as e:
        assert f"labels[3] = {v + 5}" in str(e), str(e)
    else:
        raise AssertionError("out-of-range label was accepted")


def _rank(rank: int, world: int):
    import divkit

    divkit.set_num_threads(1)
    _checks(rank, world)


@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_matches_unsharded(world, tmp_path):
    run_ranks(world, _rank, tmp_path)
