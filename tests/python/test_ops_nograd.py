"""Custom ops of the helpers without a gradient that read values on the host:
divkit::calibrate_reward and divkit::best_of_n (divkit.rlhf), divkit::swing_noise,
divkit::weight_aligning and divkit::teacher_class_means (divkit.distill). Each: no graph break
under torch.compile(fullgraph=True), eager's bits, the op path (ALWAYS) equal to the function
path, opcheck, vmap equal to a loop, fake CUDA tensors, inputs that require grad giving the same
non-differentiable result, and a divkit.Error naming the function and the argument on bad input,
eager and compiled (the value checks run inside the ops when the graph runs)."""

import pytest
import torch

import divkit
import divkit.distill
import divkit.rlhf
from divkit import _ops
from test_ops_ot import _equal, _no_break

pytestmark = pytest.mark.skipif(not _ops.ENABLED, reason="torch.library.custom_op needs torch>=2.4")


def _compiled_equals_eager(f, inputs, monkeypatch):
    """f's compiled (fullgraph, aot_eager) and op-path (ALWAYS) results equal eager's bits."""
    _no_break(f, *inputs)
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(*inputs)
    want = f(*inputs)
    _equal(got, want)
    monkeypatch.setattr(_ops, "ALWAYS", True)
    _equal(f(*inputs), want)
    monkeypatch.setattr(_ops, "ALWAYS", False)
    return want


def _raises_eager_and_compiled(f, inputs, match):
    for call in (f, torch.compile(f, fullgraph=True, backend="aot_eager")):
        torch._dynamo.reset()
        with pytest.raises(divkit.Error, match=match):
            call(*inputs)


def _fake_cuda():
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode()


# ---------------------------------------------------------------------------------------------
# calibrate_reward
# ---------------------------------------------------------------------------------------------


def _rewards(dtype=torch.float32, seed=0, batch=()):
    g = torch.Generator().manual_seed(seed)
    # Rounded values: ties between rewards and reference rewards (the CDF counts <=).
    r = (torch.randn(*batch, 3, 4, generator=g, dtype=dtype) * 4).round() / 4
    ref = (torch.randn(*batch, 3, 6, generator=g, dtype=dtype) * 4).round() / 4
    return r, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_calibrate_reward_compiles_fullgraph_with_eager_bits(dtype, monkeypatch):
    r, ref = _rewards(dtype)

    def f(r, ref):
        return divkit.rlhf.calibrate_reward(r, ref), divkit.rlhf.calibrate_reward(r[:, 1], ref)

    c, c1 = _compiled_equals_eager(f, [r, ref], monkeypatch)
    # An independent count: the empirical CDF of the reference rewards at r.
    want = (ref[:, None, :] <= r[:, :, None]).double().mean(-1).float()
    assert torch.equal(c, want) and torch.equal(c1, want[:, 1])
    assert c.dtype == torch.float32


def test_calibrate_reward_opcheck_vmap_grad_and_errors():
    r, ref = _rewards()
    torch.library.opcheck(_ops.calibrate_reward_op, (r, ref))
    torch.library.opcheck(_ops.calibrate_reward_op, (r[:, 0], ref.double()))
    rb, refb = _rewards(batch=(2,), seed=1)
    got = torch.vmap(divkit.rlhf.calibrate_reward)(rb, refb)
    assert torch.equal(
        got, torch.stack([divkit.rlhf.calibrate_reward(rb[i], refb[i]) for i in (0, 1)])
    )
    # Inputs that require grad: the same values, no gradient (a step function), eager and compiled.
    rg = r.clone().requires_grad_(True)
    for call in (
        divkit.rlhf.calibrate_reward,
        torch.compile(divkit.rlhf.calibrate_reward, backend="aot_eager"),
    ):
        torch._dynamo.reset()
        out = call(rg, ref)
        assert not out.requires_grad and torch.equal(out, divkit.rlhf.calibrate_reward(r, ref))
    bad = ref.clone()
    bad[2, 3] = float("nan")
    _raises_eager_and_compiled(
        divkit.rlhf.calibrate_reward, [r, bad], r"calibrate_reward: ref_rewards has NaN"
    )
    with pytest.raises(divkit.Error, match="calibrate_reward: rewards must be"):
        divkit.rlhf.calibrate_reward(r[:2], ref)
    with _fake_cuda():
        out = _ops.calibrate_reward_op(
            torch.empty(3, 4, device="cuda"), torch.empty(3, 6, device="cuda")
        )
        assert out.shape == (3, 4) and out.dtype == torch.float32 and out.device.type == "cuda"


# ---------------------------------------------------------------------------------------------
# best_of_n
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_best_of_n_compiles_fullgraph_with_eager_bits(dtype, monkeypatch):
    g = torch.Generator().manual_seed(2)
    rewards = torch.randn(4, 5, generator=g, dtype=dtype)
    rewards[1] = 0.5  # a tie: the first index
    rewards[2, 0] = float("-inf")  # a masked sample
    rewards.requires_grad_(True)
    samples = torch.arange(40).reshape(4, 5, 2)

    def f(rewards, samples):
        idx, best, chosen = divkit.rlhf.best_of_n(rewards, samples)
        return idx, (best * torch.arange(1.0, 5.0, dtype=dtype)).sum(), chosen

    idx, loss, chosen = _compiled_equals_eager(f, [rewards, samples], monkeypatch)
    want = rewards.detach().argmax(-1)
    assert torch.equal(idx, want) and idx[1] == 0
    assert torch.equal(chosen, samples[torch.arange(4), want])
    # The gradient reaches the chosen rewards, compiled as eager.
    torch._dynamo.reset()
    (got,) = torch.autograd.grad(
        torch.compile(f, backend="aot_eager")(rewards, samples)[1], rewards
    )
    (grad,) = torch.autograd.grad(loss, rewards)
    assert torch.equal(got, grad)
    assert torch.equal(
        grad,
        torch.zeros(4, 5, dtype=dtype).scatter(
            1, want[:, None], torch.arange(1.0, 5.0, dtype=dtype)[:, None]
        ),
    )


def test_best_of_n_opcheck_vmap_and_errors():
    g = torch.Generator().manual_seed(3)
    rewards = torch.randn(2, 3, 5, generator=g)
    torch.library.opcheck(_ops.best_of_n_op, (rewards[0],))
    torch.library.opcheck(_ops.best_of_n_op, (rewards[1].double(),))
    got = torch.vmap(lambda r: divkit.rlhf.best_of_n(r)[:2])(rewards)
    for i in range(2):
        _equal(tuple(x[i] for x in got), divkit.rlhf.best_of_n(rewards[i])[:2])
    bad = rewards[0].clone()
    bad[1, 2] = float("nan")
    f = lambda r: divkit.rlhf.best_of_n(r)[0]  # noqa: E731
    _raises_eager_and_compiled(f, [bad], r"best_of_n: rewards has NaN or \+inf values \(row 1")
    bad = rewards[0].clone()
    bad[2] = float("-inf")
    _raises_eager_and_compiled(f, [bad], r"best_of_n: rewards: row 2 is all -inf")
    with pytest.raises(divkit.Error, match=r"best_of_n: samples must be \[B, N, ...\]"):
        divkit.rlhf.best_of_n(rewards[0], torch.zeros(3, 4))
    with _fake_cuda():
        out = _ops.best_of_n_op(torch.empty(3, 5, device="cuda"))
        assert out.shape == (3,) and out.dtype == torch.int64 and out.device.type == "cuda"


# ---------------------------------------------------------------------------------------------
# swing_noise
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_swing_noise_compiles_fullgraph_with_eager_bits(dtype, monkeypatch):
    x = torch.zeros(2, 3, 7, dtype=dtype)

    def f(x):
        return x + divkit.distill.swing_noise(2**63 - 5, (2, 3, 7), dtype=dtype)

    out = _compiled_equals_eager(f, [x], monkeypatch)
    assert out.dtype == dtype
    # A property of the noise: a different seed gives other values; the same seed the same.
    assert not torch.equal(out, divkit.distill.swing_noise(-3, (2, 3, 7), dtype=dtype))
    assert torch.equal(out, divkit.distill.swing_noise(2**63 - 5, [2, 3, 7], dtype=dtype))


def test_swing_noise_opcheck_vmap_and_errors():
    torch.library.opcheck(_ops.swing_noise_op, (5, [4, 3], torch.float32))
    torch.library.opcheck(_ops.swing_noise_op, (-5, [3], torch.float64))
    x = torch.zeros(3, 2, 3, dtype=torch.float64)
    got = torch.vmap(lambda x: x + divkit.distill.swing_noise(9, (2, 3)))(x)
    assert torch.equal(got, divkit.distill.swing_noise(9, (2, 3)).expand(3, 2, 3))
    with pytest.raises(divkit.Error, match="swing_noise: shape must be an int >= 0"):
        divkit.distill.swing_noise(1, (2, -3))
    with pytest.raises(divkit.Error, match="swing_noise: dtype must be"):
        divkit.distill.swing_noise(1, (2, 3), dtype=torch.int32)
    torch._dynamo.reset()
    f = torch.compile(lambda x: x + divkit.distill.swing_noise(1, (2, -3)), backend="aot_eager")
    with pytest.raises(divkit.Error, match="swing_noise: shape must be an int >= 0"):
        f(torch.zeros(2, 3))
    with _fake_cuda():
        assert _ops.swing_noise_op(1, [2, 5], torch.float32).shape == (2, 5)


# ---------------------------------------------------------------------------------------------
# weight_aligning
# ---------------------------------------------------------------------------------------------


def _classifier(dtype=torch.float32, seed=4, batch=()):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*batch, 6, 5, generator=g, dtype=dtype)
    w[..., 3:, :] *= 3  # new classes with larger norms
    b = torch.randn(*batch, 6, generator=g, dtype=dtype)
    return w.requires_grad_(True), b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weight_aligning_compiles_fullgraph_with_eager_bits(dtype, monkeypatch):
    w, b = _classifier(dtype)

    def f(w, b):
        return (
            divkit.distill.weight_aligning(w, 3, as_tensor=True),
            divkit.distill.weight_aligning(w, 2, b, as_tensor=True),
        )

    (wa, gamma), (wa2, ba2, gamma2) = _compiled_equals_eager(f, [w, b], monkeypatch)
    # An independent computation in float64; the new classes' mean norm becomes the old ones'.
    norms = w.detach().double().norm(dim=1)
    assert gamma.dtype == torch.float64 and gamma.dim() == 0
    torch.testing.assert_close(gamma, norms[:3].mean() / norms[3:].mean(), rtol=1e-15, atol=0)
    new = wa.double().norm(dim=1)
    torch.testing.assert_close(new[3:].mean(), norms[:3].mean(), rtol=1e-5, atol=0)
    assert torch.equal(wa[:3], w.detach()[:3]) and not wa.requires_grad
    assert torch.equal(ba2[:2], b[:2]) and torch.equal(ba2[2:], b[2:] * float(gamma2))
    # Eager's default result type: gamma a float of the same value; traced, a tensor.
    w0, g0 = divkit.distill.weight_aligning(w, 3)
    assert isinstance(g0, float) and g0 == float(gamma) and torch.equal(w0, wa)
    torch._dynamo.reset()
    got = torch.compile(
        lambda w: divkit.distill.weight_aligning(w, 3), fullgraph=True, backend="aot_eager"
    )(w)
    assert isinstance(got[1], torch.Tensor) and float(got[1]) == g0


def test_weight_align_in_place_compiles():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 6)
    ref = torch.nn.Linear(4, 6)
    ref.load_state_dict(lin.state_dict())
    gamma = divkit.distill.weight_align_(ref, 4)
    torch._dynamo.reset()
    got = torch.compile(
        lambda: divkit.distill.weight_align_(lin, 4), fullgraph=True, backend="aot_eager"
    )()
    assert float(got) == gamma
    assert torch.equal(lin.weight, ref.weight) and torch.equal(lin.bias, ref.bias)


def test_weight_aligning_opcheck_vmap_and_errors():
    w, b = _classifier()
    wd = w.detach()
    torch.library.opcheck(_ops.weight_aligning_op, (wd, b, 2))
    torch.library.opcheck(_ops.weight_aligning_op, (wd.double(), None, 4))
    wb, bb = _classifier(batch=(3,), seed=5)
    got = torch.vmap(lambda w, b: divkit.distill.weight_aligning(w, 2, b))(wb.detach(), bb)
    for i in range(3):
        _equal(
            tuple(x[i] for x in got),
            divkit.distill.weight_aligning(wb[i], 2, bb[i], as_tensor=True),
        )
    zero = wd.clone()
    zero[3:] = 0
    f = lambda w: divkit.distill.weight_aligning(w, 3, as_tensor=True)  # noqa: E731
    _raises_eager_and_compiled(f, [zero], "weight_aligning: the new classes' weights are all zero")
    nan = wd.clone()
    nan[1, 1] = float("nan")
    _raises_eager_and_compiled(f, [nan], r"weight_aligning: weight has NaN or inf values \(row 1")
    with pytest.raises(
        divkit.Error, match=r"weight_aligning: bias must be a tensor of shape \[6\]"
    ):
        divkit.distill.weight_aligning(w, 3, b[:4])
    torch._dynamo.reset()
    with pytest.raises(
        divkit.Error, match=r"weight_aligning: bias must be a tensor of shape \[6\]"
    ):
        torch.compile(lambda w, b: divkit.distill.weight_aligning(w, 3, b), backend="aot_eager")(
            w, b[:4]
        )
    with pytest.raises(divkit.Error, match=r"weight_aligning: num_old must be an int in \[1, 5\]"):
        divkit.distill.weight_aligning(w, 6)
    with pytest.raises(divkit.Error, match="weight_aligning: as_tensor must be a bool"):
        divkit.distill.weight_aligning(w, 3, as_tensor=1)
    with _fake_cuda():
        x = torch.empty(6, 5, device="cuda")
        wa, ba, gamma = _ops.weight_aligning_op(x, torch.empty(6, device="cuda"), 2)
        assert wa.shape == (6, 5) and ba.shape == (6,) and gamma.shape == ()
        assert gamma.dtype == torch.float64 and gamma.device.type == "cuda"


# ---------------------------------------------------------------------------------------------
# teacher_class_means
# ---------------------------------------------------------------------------------------------


def _features(dtype=torch.float32, seed=6, batch=()):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(*batch, 9, 4, generator=g, dtype=dtype)
    labels = torch.randint(0, 4, (*batch, 9), generator=g)  # class 4 of 5 has no sample
    return f.requires_grad_(True), labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_teacher_class_means_compiles_fullgraph_with_eager_bits(dtype, monkeypatch):
    f, labels = _features(dtype)

    def fn(f, labels):
        return divkit.distill.teacher_class_means(f, labels, 5)

    means = _compiled_equals_eager(fn, [f, labels], monkeypatch)
    assert not means.requires_grad and means.dtype == dtype
    for c in range(5):
        rows = f.detach()[labels == c]
        want = rows.mean(0) if len(rows) else torch.zeros(4, dtype=dtype)
        torch.testing.assert_close(means[c], want, rtol=1e-6, atol=1e-7)


def test_teacher_class_means_opcheck_vmap_and_errors():
    f, labels = _features()
    torch.library.opcheck(_ops.teacher_class_means_op, (f.detach(), labels, 5))
    torch.library.opcheck(_ops.teacher_class_means_op, (f.detach().double(), labels.int(), 4))
    fb, lb = _features(batch=(3,), seed=7)
    got = torch.vmap(lambda f, l: divkit.distill.teacher_class_means(f, l, 4))(fb, lb)
    for i in range(3):
        assert torch.equal(got[i], divkit.distill.teacher_class_means(fb[i], lb[i], 4))
    bad = labels.clone()
    bad[5] = 5
    fn = lambda f, l: divkit.distill.teacher_class_means(f, l, 5)  # noqa: E731
    _raises_eager_and_compiled(fn, [f, bad], r"teacher_class_means: labels out of range \[0, 5\)")
    nan = f.detach().clone()
    nan[2, 0] = float("inf")
    _raises_eager_and_compiled(fn, [nan, labels], "teacher_class_means: features has NaN or inf")
    with pytest.raises(divkit.Error, match="teacher_class_means: labels must have an integer"):
        divkit.distill.teacher_class_means(f, labels.float(), 5)
    with pytest.raises(divkit.Error, match="teacher_class_means: num_classes must be an int"):
        divkit.distill.teacher_class_means(f, labels, 5.0)
    with _fake_cuda():
        x = torch.empty(9, 4, device="cuda")
        out = _ops.teacher_class_means_op(x, torch.zeros(9, dtype=torch.int64, device="cuda"), 5)
        assert out.shape == (5, 4) and out.device.type == "cuda"


# ---------------------------------------------------------------------------------------------
# topk_entropy_mass: torch code whose value checks run in ops when traced.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_topk_entropy_mass_compiles_fullgraph_with_eager_bits(dtype, monkeypatch):
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(2, 3, 7, generator=g).to(dtype)
    logits[0, 1, 2] = float("-inf")  # a masked entry
    logits.requires_grad_(True)
    labels = torch.tensor([[1, 2, -100], [0, 6, 3]])

    def f(logits):
        return (
            divkit.rlhf.topk_entropy_mass(logits, 3, labels=labels, temperature=0.7),
            divkit.rlhf.topk_entropy_mass(logits, 7),
        )

    (ent, mass, mean_ent, mean_mass), (ent7, mass7, _, _) = _compiled_equals_eager(
        f, [logits], monkeypatch
    )
    # Independent properties: the mass of all V tokens is 1 and the top-V entropy the entropy.
    p = torch.softmax(logits.detach().double(), -1)
    torch.testing.assert_close(mass7.double(), torch.ones(2, 3, dtype=torch.float64))
    want = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)
    torch.testing.assert_close(ent7.double(), want, rtol=1e-5, atol=1e-6)
    assert ent[0, 2] == 0 and mass[0, 2] == 0
    torch.testing.assert_close(mean_mass, mass.sum() / 5)
    assert not ent.requires_grad


def test_topk_entropy_mass_errors_eager_and_compiled():
    logits = torch.randn(2, 3, 7)
    labels = torch.tensor([[1, 2, -100], [0, 7, 3]])
    f = lambda x, lab: divkit.rlhf.topk_entropy_mass(x, 2, labels=lab)[2]  # noqa: E731
    _raises_eager_and_compiled(
        f, [logits, labels], r"topk_entropy_mass: labels must be in \[0, 7\)"
    )
    nan = logits.clone()
    nan[1, 0, 3] = float("nan")
    _raises_eager_and_compiled(f, [nan, labels.clamp(max=6)], "topk_entropy_mass: logits has NaN")
    inf = logits.clone()
    inf[0, 0, 0] = float("inf")
    _raises_eager_and_compiled(
        f, [inf, labels.clamp(max=6)], r"topk_entropy_mass: logits has NaN or \+inf"
    )
    # A row of only -inf has no distribution: eager and compiled raise (not a NaN mean).
    masked = logits.clone()
    masked[1, 2] = float("-inf")
    _raises_eager_and_compiled(f, [masked, labels.clamp(max=6)], "topk_entropy_mass: .*all -inf")
