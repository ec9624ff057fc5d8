"""The vocabulary-parallel fused heads on the PyTorch chunk loop (backend="torch", the route that
CUDA tensors take), on real gloo process groups (2 and 3 processes on this machine): the loss and
every gradient must equal the C++ core's vocabulary-parallel result on the same shards and the
unsharded single-process result (itself checked against float64 references in
test_fused_linear.py), and the ranks' bad arguments must raise on every rank."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from _dist import run_ranks
from conftest import KIND_CASES


def _bounds(v: int, world: int, rank: int):
    # Uneven shards: rank 0 holds fewer rows than rank 1.
    sizes = [v // world - 3 + (2 * 3 if r == world - 1 else 0) for r in range(world)]
    sizes[-1] += v - sum(sizes)
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def _close(got, want, tol, what):
    got, want = got.double(), want.double()
    scale = want.abs().max().item() + 1e-3
    err = (got - want).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:g} * {scale:.3g}"


def _data(n=23, v=41, hs=10, ht=14):
    g = torch.Generator().manual_seed(3)
    sh, th = torch.randn(n, hs, generator=g), torch.randn(n, ht, generator=g)
    sw, tw = torch.randn(v, hs, generator=g) * 0.5, torch.randn(v, ht, generator=g) * 0.5
    sb, tb = torch.randn(v, generator=g), torch.randn(v, generator=g)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::5] = -100
    # Ignored tokens whose logits overflow exp() unless shifted by their max: never read, and
    # their (zero) gradients must stay finite.
    sh[::5] *= 300.0
    th[::5] *= 300.0
    weights = torch.rand(n, generator=g) + 0.5
    return sh, sw, sb, th, tw, tb, labels, weights


def _divergence_checks(rank, world):
    import divkit

    sh, sw, sb, th, tw, tb, labels, weights = _data()
    n, v = sh.shape[0], sw.shape[0]
    lo, hi = _bounds(v, world, rank)
    grp = dist.group.WORLD
    cases = [(k, p, "mean", 0.3, 1.5, True) for k, p in KIND_CASES]
    cases += [
        ("forward_kl", {}, "none", 0.0, 1.0, True),
        ("jsd", {"beta": 0.3, "ignore_index": 5}, "sum", 0.5, 0.8, True),
        ("renyi", {"alpha": 0.5}, "batchmean", 0.0, 2.0, True),
        ("reverse_kl", {}, "none", 1.0, 1.0, True),
        # No labels (every token counts), a num_items_in_batch divisor.
        ("tvd", {"num_items_in_batch": 17}, "sum", 0.0, 1.0, False),
        ("hellinger", {}, "mean", 0.0, 0.7, False),
    ]
    for kind, params, reduction, hard, temp, with_labels in cases:
        ii = params.get("ignore_index", -100)
        lab = torch.where(labels == -100, ii, labels)
        kw = dict(
            labels=lab if with_labels else None,
            weights=weights if reduction != "batchmean" else None,
            hard_weight=hard,
            soft_weight=0.7,
            reduction=reduction,
            chunk_size=6,
            temperature=temp,
            scale_by_t_squared=temp != 1.0,
            **params,
        )
        what = f"{kind} {reduction} hard={hard} T={temp}"
        grads, losses = {}, {}
        for mode in ("torch", "core", "full"):
            xs = (sh, sw, sb, th, tw, tb)
            if mode != "full":
                xs = (sh, sw[lo:hi], sb[lo:hi], th, tw[lo:hi], tb[lo:hi])
            xs = [x.clone().requires_grad_(True) for x in xs]
            out = divkit.fused_linear_divergence(
                xs[0],
                xs[1],
                xs[3],
                xs[4],
                kind,
                student_bias=xs[2],
                teacher_bias=xs[5],
                process_group=None if mode == "full" else grp,
                backend="core" if mode == "full" else mode,
                **kw,
            )
            up = torch.linspace(0.5, 1.5, n) if reduction == "none" else torch.tensor(0.8)
            (out * up).sum().backward()
            losses[mode] = out.detach()
            grads[mode] = [x.grad for x in xs]
        for ref in ("core", "full"):
            _close(losses["torch"], losses[ref], 2e-5, f"{what}: loss vs {ref}")
        names = ("student_hidden", "student_weight", "student_bias", "teacher_hidden")
        names += ("teacher_weight", "teacher_bias")
        for i, name in enumerate(names):
            sl = slice(None) if name.endswith("hidden") else slice(lo, hi)
            _close(grads["torch"][i], grads["core"][i], 3e-5, f"{what}: {name} vs core")
            _close(grads["torch"][i], grads["full"][i][sl], 3e-5, f"{what}: {name} vs full")


def _label_head_checks(rank, world):
    import divkit

    sh, sw, sb, _, _, _, labels, _ = _data()
    n, v = sh.shape[0], sw.shape[0]
    lo, hi = _bounds(v, world, rank)
    grp = dist.group.WORLD
    ce_cases = [
        ({}, "mean", -100),
        ({"label_smoothing": 0.1, "lse_square_scale": 1e-3, "softcap": 3.0}, "none", -100),
        ({"label_smoothing": 0.2}, "sum", 7),
        ({"num_items_in_batch": 11}, "sum", -100),
        # -inf bias entries on every shard stay masked under softcap.
        ({"softcap": 2.0, "masked": True}, "mean", -100),
        # Label smoothing over the unmasked entries: V' summed over the shards, a finite loss.
        ({"label_smoothing": 0.15, "masked": True}, "mean", -100),
        (
            {"label_smoothing": 0.1, "softcap": 2.0, "lse_square_scale": 1e-3, "masked": True},
            "none",
            7,
        ),
    ]
    for opts, reduction, ii in ce_cases:
        opts = dict(opts)
        lab = labels.clone()
        if ii != -100:
            lab[lab == -100] = ii
        bias = sb
        if opts.pop("masked", False):
            bias = sb.clone()
            for j in (1, v // 2, v - 2):
                bias[j] = float("-inf")
                lab[lab == j] = 0
        res, grads = {}, {}
        for mode in ("torch", "core", "full"):
            xs = (sh, sw, bias) if mode == "full" else (sh, sw[lo:hi], bias[lo:hi])
            xs = [x.clone().requires_grad_(True) for x in xs]
            loss, lp, ent = divkit.fused_linear_cross_entropy(
                xs[0],
                xs[1],
                lab,
                xs[2],
                reduction=reduction,
                ignore_index=ii,
                chunk_size=7,
                return_stats=True,
                process_group=None if mode == "full" else grp,
                backend="core" if mode == "full" else mode,
                **opts,
            )
            up = torch.linspace(0.5, 1.5, n) if reduction == "none" else torch.tensor(1.0)
            (loss * up).sum().backward()
            res[mode] = (loss.detach(), lp, ent)
            grads[mode] = [x.grad for x in xs]
        what = f"ce {opts} {reduction}"
        for mode in res:
            assert torch.isfinite(res[mode][0]).all(), f"{what}: {mode} loss"
        for ref in ("core", "full"):
            for name, a, b in zip(("loss", "logprobs", "entropy"), res["torch"], res[ref]):
                _close(a, b, 2e-5, f"{what}: {name} vs {ref}")
            for i, name in enumerate(("hidden", "weight", "bias")):
                want = grads[ref][i] if ref == "core" or i == 0 else grads[ref][i][lo:hi]
                _close(grads["torch"][i], want, 3e-5, f"{what}: grad {name} vs {ref}")

    for temp, topk, chunk in ((0.9, 4, 5), (1.0, 30, None), (1.7, 1, 23)):
        res, grads = {}, {}
        for mode in ("torch", "core", "full"):
            xs = (sh, sw, sb) if mode == "full" else (sh, sw[lo:hi], sb[lo:hi])
            xs = [x.clone().requires_grad_(True) for x in xs]
            out = divkit.fused_linear_logprobs(
                xs[0],
                xs[1],
                labels,
                xs[2],
                temperature=temp,
                return_entropy=True,
                topk=topk,
                chunk_size=chunk,
                process_group=None if mode == "full" else grp,
                backend="core" if mode == "full" else mode,
            )
            gl, ge = torch.linspace(-1, 1, n), torch.linspace(1, 2, n)
            ((out.logprobs * gl).sum() + (out.entropy * ge).sum()).backward()
            res[mode] = out
            grads[mode] = [x.grad for x in xs]
        what = f"logprobs T={temp} topk={topk}"
        for ref in ("core", "full"):
            for name in ("logprobs", "entropy", "topk_mass"):
                a, b = getattr(res["torch"], name), getattr(res[ref], name)
                _close(a, b, 2e-5, f"{what}: {name} vs {ref}")
            for i, name in enumerate(("hidden", "weight", "bias")):
                want = grads[ref][i] if ref == "core" or i == 0 else grads[ref][i][lo:hi]
                _close(grads["torch"][i], want, 3e-5, f"{what}: grad {name} vs {ref}")
    # Log-probs alone (no entropy): the plain tensor, and its gradient.
    xs = [x.clone().requires_grad_(True) for x in (sh, sw[lo:hi], sb[lo:hi])]
    lp = divkit.fused_linear_logprobs(
        xs[0], xs[1], labels, xs[2], process_group=grp, backend="torch"
    )
    full = [x.clone().requires_grad_(True) for x in (sh, sw, sb)]
    want = divkit.fused_linear_logprobs(full[0], full[1], labels, full[2])
    _close(lp, want, 2e-5, "logprobs alone")
    lp.sum().backward()
    want.sum().backward()
    _close(xs[0].grad, full[0].grad, 3e-5, "logprobs alone: grad hidden")
    _close(xs[1].grad, full[1].grad[lo:hi], 3e-5, "logprobs alone: grad weight")


def _expect_error(fn, *needles):
    import divkit

    try:
        fn()
    except divkit.Error as e:
        for s in needles:
            assert s in str(e), str(e)
    else:
        raise AssertionError(f"no error (expected one containing {needles})")


def _error_checks(rank, world):
    import divkit

    sh, sw, sb, th, tw, tb, labels, _ = _data()
    v = sw.shape[0]
    lo, hi = _bounds(v, world, rank)
    grp = dist.group.WORLD
    kw = dict(process_group=grp, backend="torch")
    # Ranks passing different tokens raise on every rank.
    other = sh + (0.5 if rank == 1 else 0.0)
    for f in (
        lambda: divkit.fused_linear_cross_entropy(other, sw[lo:hi], labels, **kw),
        lambda: divkit.fused_linear_logprobs(other, sw[lo:hi], labels, **kw),
        lambda: divkit.fused_linear_divergence(other, sw[lo:hi], th, tw[lo:hi], **kw),
    ):
        _expect_error(f, "the ranks passed different tokens", "hidden states")
    lab = labels.clone()
    if rank == 0:
        lab[2] = 3 if int(lab[2]) != 3 else 4
    _expect_error(
        lambda: divkit.fused_linear_cross_entropy(sh, sw[lo:hi], lab, **kw),
        "different tokens",
        "labels",
    )
    # Student and teacher shards whose sizes disagree (on one rank only): every rank raises.
    tw_bad = tw[lo:hi] if rank == 0 else tw[lo : hi - 1]
    _expect_error(
        lambda: divkit.fused_linear_divergence(sh, sw[lo:hi], th, tw_bad, **kw),
        "fused_linear_divergence",
        "the vocabulary shards must match" if rank == 1 else "rejected on 1 other rank",
    )
    # A weight whose hidden size is wrong on one rank.
    w_bad = sw[lo:hi] if rank == 0 else sw[lo:hi, :-1]
    _expect_error(
        lambda: divkit.fused_linear_cross_entropy(sh, w_bad, labels, **kw),
        "fused_linear_cross_entropy",
        "hidden sizes must agree" if rank == 1 else "rejected on 1 other rank",
    )
    # An empty shard on one rank.
    w_empty = sw[lo:hi] if rank == 0 else sw[:0]
    _expect_error(
        lambda: divkit.fused_linear_logprobs(sh, w_empty, labels, **kw),
        "fused_linear_logprobs",
        "an empty vocabulary shard" if rank == 1 else "rejected on 1 other rank",
    )
    # A NaN bias entry on one rank's shard: that rank names the bias and the index.
    b_bad = torch.zeros(hi - lo)
    if rank == 1:
        b_bad[1] = float("nan")
    for name, f in (
        (
            "bias",
            lambda: divkit.fused_linear_cross_entropy(sh, sw[lo:hi], labels, bias=b_bad, **kw),
        ),
        ("bias", lambda: divkit.fused_linear_logprobs(sh, sw[lo:hi], labels, bias=b_bad, **kw)),
        (
            "student_bias",
            lambda: divkit.fused_linear_divergence(
                sh, sw[lo:hi], th, tw[lo:hi], student_bias=b_bad, **kw
            ),
        ),
    ):
        _expect_error(
            f,
            f"{name} contains NaN or +inf at index 1" if rank == 1 else "rejected on 1 other rank",
        )
    # A label beyond the global vocabulary; a NaN logit on one rank's shard only.
    bad = labels.clone()
    bad[3] = v + 5
    _expect_error(
        lambda: divkit.fused_linear_cross_entropy(sh, sw[lo:hi], bad, **kw),
        f"labels[3] = {v + 5}",
        f"[0, {v})",
    )
    nan_w = sw[lo:hi].clone()
    if rank == 1:
        nan_w[0, 0] = float("nan")
    row = int((labels != -100).nonzero()[0, 0])
    for f in (
        lambda: divkit.fused_linear_cross_entropy(sh, nan_w, labels, **kw),
        lambda: divkit.fused_linear_logprobs(sh, nan_w, labels, **kw),
        lambda: divkit.fused_linear_divergence(
            sh, nan_w, th, tw[lo:hi], labels=labels, hard_weight=0.5, **kw
        ),
    ):
        _expect_error(f, f"token {row}", "NaN")
    _expect_error(
        lambda: divkit.fused_linear_divergence(sh, nan_w, th, tw[lo:hi], **kw),
        "row 0",
        "NaN or +inf",
    )
    # The statistics the core refuses on a shard are refused on this route too.
    for extra in ("return_log_sum_sq_probs", "return_is_top1"):
        _expect_error(
            lambda: divkit.fused_linear_logprobs(sh, sw[lo:hi], labels, **kw, **{extra: True}),
            "fused_linear_logprobs",
            "not supported with process_group",
        )
    # The group still works after the errors.
    out = divkit.fused_linear_cross_entropy(sh, sw[lo:hi], labels, **kw)
    want = divkit.fused_linear_cross_entropy(sh, sw, labels)
    _close(out, want, 2e-5, "after the errors")


def _token_checks(rank, world):
    """vocab_parallel_divergence (logits already sharded) on the PyTorch loop against the core on
    the same shards and the unsharded divergence: every kind, reductions, labels, weights,
    temperature, num_items_in_batch, both gradients; and its errors on every rank."""
    import divkit
    from divkit.distributed import vocab_parallel_divergence

    g = torch.Generator().manual_seed(5)
    n, v = 19, 37
    s = torch.randn(n, v, generator=g) * 2
    t = torch.randn(n, v, generator=g) * 2
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::4] = -100
    s[::4] *= 400.0  # ignored rows whose exp() overflows: never read, zero gradients
    weights = torch.rand(n, generator=g) + 0.5
    lo, hi = _bounds(v, world, rank)
    cases = [(k, p, "mean", 1.5, True) for k, p in KIND_CASES]
    cases += [
        ("forward_kl", {}, "none", 1.0, True),
        ("jsd", {"beta": 0.3}, "sum", 0.8, True),
        ("renyi", {"alpha": 0.5}, "batchmean", 2.0, False),
        ("reverse_kl", {"num_items_in_batch": 11}, "sum", 1.0, True),
        ("tvd", {}, "none", 1.0, False),
    ]
    for kind, params, reduction, temp, with_labels in cases:
        kw = dict(
            labels=labels if with_labels else None,
            weights=weights if reduction != "batchmean" else None,
            reduction=reduction,
            temperature=temp,
            scale_by_t_squared=temp != 1.0,
            **params,
        )
        what = f"token {kind} {reduction} T={temp}"
        got = {}
        for mode in ("torch", "core", "full"):
            xs = (s, t) if mode == "full" else (s[:, lo:hi], t[:, lo:hi])
            xs = [x.clone().requires_grad_(True) for x in xs]
            if mode == "full":
                out = divkit.divergence(xs[0], xs[1], kind, **kw)
            else:
                out = vocab_parallel_divergence(xs[0], xs[1], kind, backend=mode, **kw)
            up = torch.linspace(0.5, 1.5, n) if reduction == "none" else torch.tensor(0.8)
            (out * up).sum().backward()
            got[mode] = (out.detach(), xs[0].grad, xs[1].grad)
        for ref in ("core", "full"):
            sl = slice(None) if ref == "core" else slice(lo, hi)
            _close(got["torch"][0], got[ref][0], 2e-5, f"{what}: loss vs {ref}")
            _close(got["torch"][1], got[ref][1][:, sl], 3e-5, f"{what}: grad student vs {ref}")
            _close(got["torch"][2], got[ref][2][:, sl], 3e-5, f"{what}: grad teacher vs {ref}")
        assert torch.isfinite(got["torch"][1]).all(), what
    # The logits are never written.
    ss, tt = s[:, lo:hi].clone(), t[:, lo:hi].clone()
    vocab_parallel_divergence(ss, tt, "jsd", labels=labels, backend="torch")
    assert torch.equal(ss, s[:, lo:hi]) and torch.equal(tt, t[:, lo:hi])
    # Nor when gradients are asked for: the student's alone (the case where the row step may
    # write it over its input, which the loop reads from the caller's fp32 logits without a
    # copy), and both; the gradients match the core's.
    for need_t in (False, True):
        for kind in ("forward_kl", "renyi"):
            xs = {}
            for mode in ("torch", "core"):
                ss = s[:, lo:hi].clone().requires_grad_(True)
                tt = t[:, lo:hi].clone().requires_grad_(need_t)
                out = vocab_parallel_divergence(ss, tt, kind, labels=labels, backend=mode)
                out.backward()
                what = f"{kind} need_t={need_t} {mode}"
                assert torch.equal(ss.detach(), s[:, lo:hi]), f"{what}: student logits written"
                assert torch.equal(tt.detach(), t[:, lo:hi]), f"{what}: teacher logits written"
                xs[mode] = (out.detach(), ss.grad, tt.grad)
            _close(xs["torch"][0], xs["core"][0], 2e-5, f"{kind}: loss")
            _close(xs["torch"][1], xs["core"][1], 3e-5, f"{kind}: grad student")
    # Errors raise on every rank, on both engines.
    for kw in (dict(backend="torch"), dict(backend="core")):
        sv, tv = s[:, lo:hi], t[:, lo:hi]
        m = n - 1 if rank == 1 else n
        _expect_error(
            lambda: vocab_parallel_divergence(sv[:m], tv[:m], **kw),
            "vocab_parallel_divergence",
            "different tokens",
            "token count",
        )
        lab = labels.clone()
        if rank == 0:
            lab[1] = 3 if int(lab[1]) != 3 else 4
        _expect_error(
            lambda: vocab_parallel_divergence(sv, tv, labels=lab, **kw),
            "different tokens",
            "labels",
        )
        bad = labels.clone()
        bad[1] = v  # the global V: out of range on every rank
        _expect_error(lambda: vocab_parallel_divergence(sv, tv, labels=bad, **kw), "labels")
        t_bad = tv[:, :-1] if rank == 1 else tv
        _expect_error(
            lambda: vocab_parallel_divergence(sv, t_bad, **kw),
            "vocab_parallel_divergence",
            "the shape of student_logits" if rank == 1 else "rejected on another rank",
        )
        nan = sv.clone()
        if rank == 1:
            nan[2, 0] = float("nan")
        # The PyTorch loop finds it in the all-reduced row max; the core in its agreed checks.
        core_elsewhere = kw["backend"] == "core" and rank != 1
        needle = "rejected on 1 other rank" if core_elsewhere else "NaN"
        _expect_error(lambda: vocab_parallel_divergence(nan, tv, **kw), needle)
    _expect_error(
        lambda: vocab_parallel_divergence(sv, tv, backend="gpu"), "backend", "vocab_parallel"
    )


def _bf16_checks(rank, world):
    """bf16 hidden states and shards: both engines compute in fp32 from the same values."""
    import divkit

    sh, sw, sb, th, tw, tb, labels, _ = (
        x.to(torch.bfloat16) if x.is_floating_point() else x for x in _data()
    )
    lo, hi = _bounds(sw.shape[0], world, rank)
    grp = dist.group.WORLD
    res = {}
    for mode in ("torch", "core"):
        xs = [x.clone().requires_grad_(True) for x in (sh, sw[lo:hi], th, tw[lo:hi])]
        out = divkit.fused_linear_divergence(
            *xs,
            "jsd",
            labels=labels,
            hard_weight=0.5,
            chunk_size=9,
            process_group=grp,
            backend=mode,
        )
        out.backward()
        res[mode] = [out.detach()] + [x.grad for x in xs]
    for i, (a, b) in enumerate(zip(res["torch"], res["core"])):
        assert a.dtype == b.dtype, i
        _close(a, b, 1e-2 if i else 2e-5, f"bf16 output {i}")


def _rank(rank: int, world: int, part: str):
    import divkit
    from divkit.backends import torch_ops

    divkit.set_num_threads(1)
    # Every check below must reach the PyTorch loop's vocabulary-parallel mode.
    made = []
    real = torch_ops._Shard.__init__

    def counted(self, *a, **k):
        made.append(a[0])
        real(self, *a, **k)

    torch_ops._Shard.__init__ = counted
    checks = {
        "divergence": _divergence_checks,
        "labels": _label_head_checks,
        "errors": _error_checks,
        "bf16": _bf16_checks,
        "token": _token_checks,
    }
    checks[part](rank, world)
    want = {
        "divergence": {"fused_linear_divergence"},
        "labels": {"fused_linear_cross_entropy", "fused_linear_logprobs"},
        "errors": {
            "fused_linear_divergence",
            "fused_linear_cross_entropy",
            "fused_linear_logprobs",
        },
        "bf16": {"fused_linear_divergence"},
        "token": {"vocab_parallel_divergence"},
    }[part]
    assert set(made) == want, made


@pytest.mark.parametrize(
    "part,world",
    # Three ranks: a middle shard, whose offset is neither 0 nor V - V_r.
    [
        ("divergence", 2),
        ("labels", 2),
        ("errors", 2),
        ("bf16", 2),
        ("labels", 3),
        ("token", 2),
        ("token", 3),
    ],
)
def test_torch_vocab_parallel_matches_core_and_unsharded(part, world, tmp_path):
    # The group is left to process exit, and that exit skips interpreter finalization:
    # a gloo group's teardown there can abort in PyTorch's own code (see _dist._worker).
    run_ranks(world, _rank, tmp_path, part, destroy=False, hard_exit=True)
