"""The custom ops added for issue 19's audit: divkit::preference_loss (the DPO family, and so the
sequence step of TDPO / SparsePO) and divkit::vocab_parallel_divergence (a process group by its
c10d name): torch.compile(fullgraph=True) with no graph break and eager's bits, opcheck, vmap,
double backward; and every divkit op's dispatch on CUDA (a kernel for the CUDA keys, the fake
kernels on fake CUDA tensors; no CUDA device runs here)."""

import os
import tempfile

import pytest
import torch

import divkit
import divkit.rlhf
from divkit import _ops

pytestmark = pytest.mark.skipif(not _ops.ENABLED, reason="torch.library.custom_op needs torch>=2.4")

#: Every divkit op; the public functions that reach the C++ core on tensors that may need grads
#: and are not listed here are left as graph breaks (see docs/integrations.md).
OPS = {
    "divkit::divergence",
    "divkit::fused_linear_cross_entropy",
    "divkit::fused_linear_divergence",
    "divkit::fused_linear_logprobs",
    "divkit::fused_linear_logprobs_backward",
    "divkit::fused_linear_sparse_divergence",
    "divkit::sparse_divergence",
    "divkit::topk_divergence",
    "divkit::vocab_parallel_divergence",
    "divkit::preference_loss",
    "divkit::cpo_loss",
    "divkit::odds_ratio_loss",
    "divkit::kto_loss",
    "divkit::kl_estimator",
    "divkit::d2o_loss",
    "divkit::hypo_online_kl",
    "divkit::superhf_loss",
    "divkit::ensemble_rewards",
    "divkit::infalign_transform",
    "divkit::ofa_loss",
    "divkit::swing_loss",
    "divkit::dac_kl_loss",
    "divkit::dac_kl_mass_bounds",
    "divkit::nkd_loss",
    "divkit::sample_divergence",
    "divkit::kde_log_density",
    "divkit::sinkhorn",
    "divkit::sparse_ot",
    "divkit::kde_log_likelihood",
    "divkit::kde_bandwidth",
    "divkit::uskd_soft_labels",
    "divkit::row_entropy",
    "divkit::sorted_probs",
    "divkit::checked_labels",
    "divkit::checked_range",
    "divkit::selective_contrast",
    "divkit::calibrate_reward",
    "divkit::best_of_n",
    "divkit::swing_noise",
    "divkit::weight_aligning",
    "divkit::teacher_class_means",
}


def _no_break(f, *args):
    explain = torch._dynamo.explain(f)(*args)
    assert explain.graph_break_count == 0, explain.break_reasons


def _compiled_equals_eager(f, inputs, wrt, rtol=0.0):
    """rtol = 0: the compiled call gives eager's bits; otherwise the two take different
    summation orders (see the caller) and agree to rtol."""
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(*inputs)
    got_grads = torch.autograd.grad(got, wrt, allow_unused=True)
    want = f(*inputs)
    want_grads = torch.autograd.grad(want, wrt, allow_unused=True)
    _same(got, want, rtol)
    _same_grads(got_grads, want_grads, rtol)
    return want, want_grads


def _same(a, b, rtol=0.0):
    if rtol == 0.0:
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * float(b.abs().max()))


def _same_grads(got, want, rtol=0.0):
    assert any(g is not None for g in want)
    for a, b in zip(got, want):
        assert (a is None and b is None) or (a is not None and b is not None)
        if a is not None:
            _same(a, b, rtol)


def _pref_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(6, generator=g, dtype=dtype) - 10).requires_grad_(i < 2) for i in range(4)]


def _pref(pc, pr, rc, rr):
    losses, chosen, rejected = divkit.preference_loss(
        pc,
        pr,
        rc,
        rr,
        loss_type=["sigmoid", "ipo", "robust"],
        loss_weights=[1.0, 0.5, 0.2],
        beta=0.3,
        label_smoothing=0.1,
        f_divergence_type="js_divergence",
        chosen_lengths=torch.tensor([3, 4, 5, 6, 7, 8]),
        rejected_lengths=torch.tensor([2, 2, 3, 3, 4, 4]),
        policy_weights=torch.linspace(0.5, 1.0, 6),
    )
    return (losses * torch.arange(1.0, 7.0)).sum() + 0 * (chosen.sum() + rejected.sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_preference_loss_compiles_fullgraph_with_eager_bits(dtype):
    inputs = _pref_inputs(dtype)
    _no_break(_pref, *inputs)
    _compiled_equals_eager(_pref, inputs, inputs[:2])


def test_preference_loss_op_path_equals_function_path(monkeypatch):
    inputs = _pref_inputs()
    want = _pref(*inputs)
    want_grads = torch.autograd.grad(want, inputs[:2])
    monkeypatch.setattr(_ops, "ALWAYS", True)
    got = _pref(*inputs)
    got_grads = torch.autograd.grad(got, inputs[:2])
    assert torch.equal(got, want)
    for a, b in zip(got_grads, want_grads):
        assert torch.equal(a, b)


def test_preference_loss_opcheck():
    pc, pr, rc, rr = (x.detach().requires_grad_(True) for x in _pref_inputs())
    args = (pc, pr, rc, rr, None, None, None, None, "sigmoid,hinge", [1.0, 0.5])
    args += (0.3, 0.0, "reverse_kl", 0.5, 0.05, [False] * 4)
    # test_schema, test_autograd_registration, test_faketensor, test_aot_dispatch_dynamic
    torch.library.opcheck(_ops.preference_loss_op, args)


def test_preference_loss_vmap_and_double_backward():
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(3, 5, generator=g) for _ in range(4)]
    got = torch.vmap(lambda *a: divkit.preference_loss(*a, beta=0.2)[0])(*xs)
    want = torch.stack([divkit.preference_loss(*(x[i] for x in xs), beta=0.2)[0] for i in range(3)])
    assert torch.equal(got, want)
    pc = xs[0][0].clone().requires_grad_()
    for always in (False, True):
        _ops.ALWAYS = always
        try:
            losses = divkit.preference_loss(pc, *(x[0] for x in xs[1:]))[0]
            (gr,) = torch.autograd.grad(losses.sum(), pc, create_graph=True)
            with pytest.raises(divkit.Error, match="preference_loss: double backward"):
                gr.sum().backward()
        finally:
            _ops.ALWAYS = False


@pytest.mark.parametrize("fused", ["tdpo_loss_fused", "sparsepo_loss_fused"])
def test_token_level_fused_losses_compile_fullgraph(fused):
    """TDPO / SparsePO from hidden states: fused log-probs, fused KL and the sequence step, all
    ops: one graph, eager's bits."""
    g = torch.Generator().manual_seed(3)
    b, t, h, v = 2, 5, 8, 11
    hidden = torch.randn(2 * b, t, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g, requires_grad=True)
    ref_hidden, ref_weight = torch.randn(2 * b, t, h, generator=g), torch.randn(v, h, generator=g)
    labels = torch.randint(0, v, (2 * b, t), generator=g)
    labels[:, :2] = -100
    extra = {"l1_reward": 0.1} if fused == "sparsepo_loss_fused" else {"variant": "tdpo2"}

    def f(hidden, weight):
        (hc, hr), (lc, lr), (rc, rr) = hidden.chunk(2), labels.chunk(2), ref_hidden.chunk(2)
        losses, _, _ = getattr(divkit, fused)(
            hc,
            hr,
            weight,
            lc,
            lr,
            ref_chosen_hidden=rc,
            ref_rejected_hidden=rr,
            ref_weight=ref_weight,
            beta=0.5,
            **extra,
        )
        return losses.mean()

    _no_break(f, hidden, weight)
    # Eager computes these gradients with the logits chunks kept between passes (or in the
    # forward); a traced call runs the ops, which recompute them: the same sums in another
    # order, so equal to rounding, not bit for bit.
    _compiled_equals_eager(f, (hidden, weight), (hidden, weight), rtol=1e-6)


@pytest.fixture
def world_of_one():
    """A one-rank gloo process group in this process (the group an op resolves by name)."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a default process group already exists in this process")
    fd, path = tempfile.mkstemp()
    os.close(fd)
    os.remove(path)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()
        if os.path.exists(path):
            os.remove(path)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_vocab_parallel_divergence_compiles_fullgraph(world_of_one, reduction):
    from divkit.distributed import vocab_parallel_divergence

    g = torch.Generator().manual_seed(4)
    s = torch.randn(3, 4, 7, generator=g, requires_grad=True)
    t = torch.randn(3, 4, 7, generator=g)
    labels = torch.randint(0, 7, (3, 4), generator=g)
    labels[0, 0] = -100
    scale = torch.arange(12.0).reshape(3, 4)

    def f(s):
        out = vocab_parallel_divergence(
            s, t, "jsd", labels=labels, reduction=reduction, process_group=world_of_one
        )
        return (out * scale).sum() if reduction == "none" else out

    _no_break(f, s)
    loss, (grad,) = _compiled_equals_eager(f, (s,), (s,))
    # One rank holds the whole vocabulary: the unsharded divergence.
    ref = divkit.divergence(s, t, "jsd", labels=labels, reduction=reduction)
    ref = (ref * scale).sum() if reduction == "none" else ref
    (ref_grad,) = torch.autograd.grad(ref, s)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-7)


def test_vocab_parallel_divergence_opcheck_vmap_double_backward(world_of_one):
    from divkit.distributed import vocab_parallel_divergence

    g = torch.Generator().manual_seed(5)
    s = torch.randn(5, 9, generator=g, requires_grad=True)
    t = torch.randn(5, 9, generator=g, requires_grad=True)
    name = _ops.group_name(world_of_one)
    for reduction in ("mean", "none"):
        need = [reduction != "none"] * 2
        args = (s, t, None, None, None, "forward_kl", 0.5, 0.1, 1.0, False, -100, reduction)
        torch.library.opcheck(_ops.vocab_parallel_divergence_op, args + (0.0, name, need))
    with pytest.raises(divkit.Error, match="vocab_parallel_divergence: torch.vmap"):
        with torch.no_grad():
            torch.vmap(lambda a: vocab_parallel_divergence(a, a))(s.detach()[None].expand(2, 5, 9))
    for always in (False, True):
        _ops.ALWAYS = always
        try:
            w = torch.randn(9, 9, requires_grad=True)
            loss = vocab_parallel_divergence(s.detach() @ w, t.detach())
            (gw,) = torch.autograd.grad(loss, w, create_graph=True)
            with pytest.raises(divkit.Error, match="vocab_parallel_divergence: double backward"):
                gw.sum().backward()
        finally:
            _ops.ALWAYS = False


def test_divergence_ops_take_the_options_in_config_order():
    """The divergence ops list the core's options in the order of functional._Config's fields
    (their callers pass them positionally from one _Config): beta and alpha, both floats, would
    otherwise trade places unseen."""
    from divkit import functional

    assert functional._CORE_FIELDS == (
        "kind", "beta", "alpha", "temperature", "scale_by_t_squared", "ignore_index",
        "reduction", "num_items_in_batch",
    )  # fmt: skip
    for op, first in (
        (torch.ops.divkit.divergence, 4),
        (torch.ops.divkit.vocab_parallel_divergence, 5),
    ):
        names = tuple(a.name for a in op.default._schema.arguments)
        assert names[first : first + len(functional._CORE_FIELDS)] == functional._CORE_FIELDS


@pytest.mark.parametrize("kind", ["skew_forward_kl", "alpha_divergence", "renyi"])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_vocab_parallel_divergence_options_reach_the_op(world_of_one, kind, reduction):
    """Every option of vocab_parallel_divergence, none at its default, gives the same bits
    through the op as eagerly, and (one rank holding the whole vocabulary) the unsharded
    divergence's result."""
    from divkit.distributed import vocab_parallel_divergence

    g = torch.Generator().manual_seed(6)
    s = torch.randn(6, 11, generator=g, requires_grad=True)
    t = torch.randn(6, 11, generator=g, requires_grad=True)
    labels = torch.randint(0, 11, (6,), generator=g)
    labels[1] = -5
    weights = torch.rand(6, generator=g) + 0.5
    up = torch.linspace(0.5, 2.0, 6)
    kw = dict(
        labels=labels, weights=weights, beta=0.3, alpha=0.7, temperature=1.9,
        scale_by_t_squared=True, ignore_index=-5, reduction=reduction,
        num_items_in_batch=None if reduction == "none" else 4.0,
    )  # fmt: skip
    runs = []
    for always in (False, True):
        _ops.ALWAYS = always
        try:
            out = vocab_parallel_divergence(s, t, kind, process_group=world_of_one, **kw)
        finally:
            _ops.ALWAYS = False
        loss = (out * up).sum() if reduction == "none" else out
        runs.append((out, *torch.autograd.grad(loss, (s, t))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    ref = divkit.divergence(s, t, kind, **kw)
    ref_grads = torch.autograd.grad((ref * up).sum() if reduction == "none" else ref, (s, t))
    for a, b in zip(runs[0], (ref, *ref_grads)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("head", ["cross_entropy", "cross_entropy_stats", "divergence", "sparse"])
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_head_ops_autograd_equals_eager(head, reduction):
    """The fused heads' op autograd (one helper for the four head ops): a reduced loss hands
    over the gradients of its forward call, reduction="none" calls the op again with a
    per-token upstream gradient (and, for cross-entropy, without the statistics). Every
    differentiable input's gradient, bias included, is eager's bit for bit."""
    g = torch.Generator().manual_seed(8)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    n, hdim, v = 7, 5, 19
    h, w, b, th, tw, tb = r(n, hdim), r(v, hdim), r(v), r(n, hdim), r(v, hdim), r(v)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[2] = -100
    top = torch.log_softmax(r(n, v), -1).topk(4, dim=-1)
    up = torch.linspace(0.5, 2.0, n)

    def run(always):
        _ops.ALWAYS = always
        try:
            xs = [x.clone().requires_grad_() for x in (h, w, b, th, tw, tb)]
            kw = dict(labels=labels, reduction=reduction, chunk_size=3)
            if head.startswith("cross_entropy"):
                stats = head.endswith("stats")
                out = divkit.fused_linear_cross_entropy(
                    xs[0], xs[1], labels, xs[2], reduction=reduction, chunk_size=3,
                    label_smoothing=0.1, return_stats=stats,
                )  # fmt: skip
                loss, extra = (out[0], out[1:]) if stats else (out, ())
                wrt = xs[:3]
            elif head == "divergence":
                loss = divkit.fused_linear_divergence(
                    xs[0], xs[1], xs[3], xs[4], "jsd", student_bias=xs[2], teacher_bias=xs[5],
                    hard_weight=0.3, beta=0.3, **kw,
                )  # fmt: skip
                extra, wrt = (), xs
            else:
                loss = divkit.fused_linear_sparse_divergence(
                    xs[0], xs[1], top.indices, top.values, "reverse_kl", student_bias=xs[2],
                    hard_weight=0.3, **kw,
                )  # fmt: skip
                extra, wrt = (), xs[:3]
            total = (loss * up).sum() if reduction == "none" else loss * 1.5
            return [loss.detach(), *(e.detach() for e in extra), *torch.autograd.grad(total, wrt)]
        finally:
            _ops.ALWAYS = False

    eager, through_op = run(False), run(True)
    assert len(eager) == len(through_op)
    for a, b in zip(eager, through_op):
        assert torch.equal(a, b)


def test_every_op_has_a_kernel_for_cuda():
    """The ops are registered for every device (CompositeExplicitAutograd): the CUDA and
    AutogradCUDA keys resolve to a kernel, so CUDA tensors dispatch to the same implementation,
    which routes to the core's CUDA kernel or the PyTorch fallback (divkit._device). Only the
    dispatch is checked here: this machine has no CUDA device."""
    names = {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("divkit::")}
    assert names == OPS
    for name in sorted(names):
        for key in ("CPU", "CUDA", "AutogradCUDA", "Meta"):
            assert torch._C._dispatch_has_computed_kernel_for_dispatch_key(name, key), (name, key)


def test_fake_kernels_trace_fake_cuda_tensors():
    """Under FakeTensorMode, tensors on device "cuda" go through the ops' fake kernels (no CUDA
    runtime needed): shapes, dtypes and the device come out right."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        s = torch.empty(4, 10, device="cuda")
        t = torch.empty(4, 10, device="cuda", dtype=torch.bfloat16)
        loss, gs, gt = _ops.divergence_op(
            s, t, None, None, "jsd", 0.5, 0.1, 1.0, False, -100, "mean", 0.0, None, "auto", True,
            False,
        )  # fmt: skip
        assert loss.device.type == gs.device.type == "cuda"
        assert loss.shape == () and gs.shape == s.shape and gs.dtype == s.dtype
        h, w = torch.empty(4, 6, device="cuda"), torch.empty(10, 6, device="cuda")
        labels = torch.zeros(4, dtype=torch.int64, device="cuda")
        out = _ops.fused_logprobs_op(h, w, None, labels, 1.0, -100, True, 0, 0, "auto")
        assert [x.shape for x in out] == [(4,), (4,), (0,), (0,), (0,)]
        assert out[0].device.type == "cuda"
        out = _ops.fused_logprobs_op(h, w, None, labels, 1.0, -100, False, 0, 0, "auto", True, True)
        assert [x.shape for x in out] == [(4,), (0,), (0,), (4,), (4,)]
        assert out[3].dtype == torch.float32 and out[4].dtype == torch.bool
        xs = [torch.empty(3, device="cuda") for _ in range(4)]
        out = _ops.preference_loss_op(
            *xs, None, None, None, None, "sigmoid", [1.0], 0.1, 0.0, "reverse_kl", 0.5, 0.05,
            [False] * 4,
        )  # fmt: skip
        assert out[0].shape == (3,) and out[0].device.type == "cuda"
        loss, gs, gt = _ops.vocab_parallel_divergence_op(
            s, s, None, None, None, "forward_kl", 0.5, 0.1, 1.0, False, -100, "none", 0.0,
            "no-group-needed-by-the-fake-kernel", [False, False],
        )  # fmt: skip
        assert loss.shape == (4,) and loss.device.type == "cuda"


def _logps(n, seed, grad=True):
    g = torch.Generator().manual_seed(seed)
    return (-torch.rand(n, generator=g) * 3 - 0.1).requires_grad_(grad)


def _cpo(pc, pr, rc, rr):
    losses, c, r = divkit.cpo_loss(pc, pr, loss_type="simpo", beta=2.0, alpha=0.2)
    return (losses * torch.arange(1.0, 6.0)).sum() + 0 * (c.sum() + r.sum())


def _orpo(pc, pr, rc, rr):
    losses, c, r, mean_ratio, mean_odds = divkit.odds_ratio_loss(pc, pr, beta=0.3)
    return losses.sum() * 2 + mean_odds + 0 * (c.sum() + r.sum() + mean_ratio)


def _kto(pc, pr, rc, rr):
    losses, c, r, kl = divkit.kto_loss(
        pc[:3], pr[3:], pc * 0.5, rc[:3], rr[3:], rc * 0.7, beta=0.4, desirable_weight=1.3
    )
    return (losses * torch.arange(1.0, 6.0)).sum() + 0 * (c.sum() + r.sum() + kl)


def _kl(pc, pr, rc, rr):
    x = torch.stack([pc, pr])
    y = torch.stack([rc, rr])
    return (
        divkit.rlhf.kl_estimator(x, y, "k3", clamp=True) * torch.arange(10.0).reshape(2, 5)
    ).sum()


SEQUENCE = {"cpo": _cpo, "orpo": _orpo, "kto": _kto, "kl_estimator": _kl}


@pytest.mark.parametrize("name", sorted(SEQUENCE))
def test_sequence_losses_compile_fullgraph_and_match_the_function_path(name, monkeypatch):
    f = SEQUENCE[name]
    inputs = [_logps(5, i) for i in range(4)]
    _no_break(f, *inputs)
    want, want_grads = _compiled_equals_eager(f, inputs, inputs)
    monkeypatch.setattr(_ops, "ALWAYS", True)  # every call through the op, eagerly
    got = f(*inputs)
    got_grads = torch.autograd.grad(got, inputs, allow_unused=True)
    assert torch.equal(got, want)
    _same_grads(got_grads, want_grads)
    # Double backward: a clear error on both paths.
    for always in (True, False):
        monkeypatch.setattr(_ops, "ALWAYS", always)
        (g,) = torch.autograd.grad(f(*inputs), inputs[0], create_graph=True)
        with pytest.raises(divkit.Error, match="double backward"):
            g.sum().backward()


def test_sequence_ops_opcheck():
    pc, pr, rc, rr = (_logps(4, i) for i in range(4))
    torch.library.opcheck(
        _ops.cpo_loss_op, (pc, pr, None, "sigmoid", 0.5, 0.1, 0.5, 0.0, [False] * 2)
    )
    torch.library.opcheck(_ops.odds_ratio_loss_op, (pc, pr, None, 0.2, [False] * 2))
    kto = (pc[:2], pr[2:], rc[:2], rr[2:], pc.detach(), rc.detach(), None, "kto", 0.3, 1.0)
    torch.library.opcheck(_ops.kto_loss_op, kto + (1.2, [False] * 4))
    torch.library.opcheck(
        _ops.kl_estimator_op, (pc, rc, None, "k2", False, torch.float32, [False] * 2)
    )


def test_kl_estimator_vmap():
    g = torch.Generator().manual_seed(7)
    a, b = -torch.rand(3, 4, generator=g), -torch.rand(3, 4, generator=g)
    got = torch.vmap(lambda x, y: divkit.rlhf.kl_estimator(x, y, "k1"))(a, b)
    assert torch.equal(got, divkit.rlhf.kl_estimator(a, b, "k1"))


def test_kl_estimator_non_finite_input_raises_under_compile():
    """The public function's value check cannot run while tracing; the op checks when it runs."""
    torch._dynamo.reset()
    f = torch.compile(lambda a, b: divkit.rlhf.kl_estimator(a, b), fullgraph=True, backend="eager")
    a, b = -torch.rand(4), -torch.rand(4)
    assert torch.equal(f(a, b), divkit.rlhf.kl_estimator(a, b))
    a[2] = float("nan")
    with pytest.raises(divkit.Error, match="kl_estimator: logprobs"):
        f(a, b)


@pytest.mark.skipif(not divkit._C.cuda_built(), reason="divkit built without CUDA")
def test_public_calls_trace_fake_cuda_tensors():
    """The public functions, not only the ops, take fake CUDA tensors on a CPU-only torch: the
    route asks for no CUDA stream there (the op routes again when it runs). No requires_grad:
    a CPU-only torch aborts building an autograd node for a fake CUDA tensor, divkit or not."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        s = torch.empty(4, 10, device="cuda")
        t = torch.empty(4, 10, device="cuda")
        loss = divkit.divergence(s, t, "jsd")
        assert loss.shape == () and loss.device.type == "cuda"
        h, w = torch.empty(4, 6, device="cuda"), torch.empty(10, 6, device="cuda")
        labels = torch.zeros(4, dtype=torch.int64, device="cuda")
        ce = divkit.fused_linear_cross_entropy(h, w, labels)
        assert ce.shape == () and ce.device.type == "cuda"
