"""Custom ops of divkit.distill's remaining core calls: divkit::uskd_soft_labels (so uskd_loss
compiles to one graph with NKD's op), divkit::row_entropy (so bdkd_loss) and divkit::sorted_probs
(DACKLBounds, so DACKLLoss), divkit::selective_contrast (uscd_logits), and the value checks of
torch-only losses run by ops while traced (divkit::checked_labels, divkit::checked_range). Each: no graph break under torch.compile(fullgraph=True), eager's
bits (values and gradients, the modules' parameters included), the op path (ALWAYS) equal to the
function path, opcheck, vmap, fake CUDA tensors, a clear divkit.Error on double backward and on
bad input."""

import pytest
import torch

import divkit
import divkit.distill
from divkit import _ops
from test_ops_ot import _check, _equal

pytestmark = pytest.mark.skipif(not _ops.ENABLED, reason="torch.library.custom_op needs torch>=2.4")


# ---------------------------------------------------------------------------------------------
# USKD: the soft labels as an op, so that uskd_loss compiles to one graph.
# ---------------------------------------------------------------------------------------------


def _uskd_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(11)
    s = torch.randn(2, 3, 7, generator=g, dtype=dtype).requires_grad_(True)
    wk = torch.randn(2, 3, 7, generator=g, dtype=dtype).requires_grad_(True)
    return s, wk, torch.tensor([[1, 2, -100], [0, 6, 3]])


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_uskd_loss_compiles_fullgraph_with_eager_bits(reduction, dtype, monkeypatch):
    s, wk, labels = _uskd_inputs(dtype)
    scale = torch.arange(6.0, dtype=dtype).reshape(2, 3)

    def f(s, wk):
        out = divkit.distill.uskd_loss(s, labels, wk, mu=0.2, reduction=reduction)
        soft = divkit.distill.uskd_soft_labels(s, labels, wk)
        return (out * scale).sum() if reduction == "none" else out, soft

    _check(f, [s, wk], [s, wk], monkeypatch)


def test_uskd_soft_labels_opcheck_vmap_errors():
    s, wk, labels = (t.detach() for t in _uskd_inputs())
    s2, w2, lab = s.reshape(6, 7), wk.reshape(6, 7), labels.reshape(6)
    torch.library.opcheck(_ops.uskd_soft_labels_op, (s2, lab, w2, -100, "uskd_soft_labels"))
    got = torch.vmap(lambda a, b, c: divkit.distill.uskd_soft_labels(a, b, c))(s, labels, wk)
    for i in range(2):
        _equal(tuple(t[i] for t in got), divkit.distill.uskd_soft_labels(s[i], labels[i], wk[i]))
    bad = labels.clone()
    bad[1, 1] = 7
    torch._dynamo.reset()
    f = torch.compile(lambda a, b: divkit.distill.uskd_loss(a, bad, b), fullgraph=True)
    for call in (f, lambda a, b: divkit.distill.uskd_loss(a, bad, b)):
        with pytest.raises(divkit.Error, match=r"uskd_\w+: labels out of range"):
            call(s, wk)


# ---------------------------------------------------------------------------------------------
# row_entropy (bdkd_loss) and sorted_probs (DACKLBounds / DACKLLoss).
# ---------------------------------------------------------------------------------------------


def _kd_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(12)
    s = torch.randn(2, 3, 9, generator=g, dtype=dtype).requires_grad_(True)
    t = torch.randn(2, 3, 9, generator=g, dtype=dtype)
    return s, t, torch.tensor([[1, 2, -100], [0, 8, 3]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gap_scale", [0.0, 0.7])
def test_bdkd_loss_compiles_fullgraph_with_eager_bits(dtype, gap_scale, monkeypatch):
    s, t, labels = _kd_inputs(dtype)

    def f(s, t):
        loss, w = divkit.distill.bdkd_loss(
            s, t, temperature=1.5, gap_scale=gap_scale, labels=labels, return_weights=True
        )
        return loss * 2, (w, divkit.distill.row_entropy(s, temperature=0.5))

    _check(f, [s, t], [s], monkeypatch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dackl_bounds_and_loss_compile_fullgraph_with_eager_bits(dtype, monkeypatch):
    s, t, labels = _kd_inputs(dtype)
    torch.manual_seed(0)
    loss_fn = divkit.distill.DACKLLoss(k=4, hidden=8).to(dtype)
    params = list(loss_fn.parameters())

    def f(s, *params):
        lower, upper = loss_fn.bounds(t, 1.3)
        return loss_fn(s, t, labels) * 2 + (upper - lower).sum(), (lower, upper)

    _check(f, [s, *params], [s, *params], monkeypatch)


def test_row_ops_opcheck_vmap_fake_cuda_and_errors():
    s, t, labels = _kd_inputs()
    rows = s.detach().reshape(6, 9)
    torch.library.opcheck(_ops.row_entropy_op, (rows, 0.8))
    torch.library.opcheck(_ops.sorted_probs_op, (rows, 1.2, 5, torch.float64))
    got = torch.vmap(lambda x: divkit.distill.row_entropy(x, temperature=2.0))(s.detach())
    assert torch.equal(got, divkit.distill.row_entropy(s.detach(), temperature=2.0))
    bounds = divkit.distill.DACKLBounds(k=3, hidden=4)
    with torch.no_grad():
        got = torch.vmap(lambda x: bounds(x)[1])(t)
        for i in range(2):
            assert torch.equal(got[i], bounds(t[i])[1])
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(4, 10, device="cuda")
        assert _ops.row_entropy_op(x, 1.0).shape == (4,)
        out = _ops.sorted_probs_op(x, 1.0, 3, torch.float32)
        assert out.shape == (4, 3) and out.device.type == "cuda"
        a, b = _ops.uskd_soft_labels_op(
            x, torch.zeros(4, dtype=torch.int64, device="cuda"), x, -100, "f"
        )
        assert a.shape == (4,) and b.shape == (4, 10) and b.device.type == "cuda"
    bad = t.clone()
    bad[0, 1, 2] = float("nan")
    torch._dynamo.reset()
    f = torch.compile(lambda x: bounds(x)[0], fullgraph=True)
    for call in (f, lambda x: bounds(x)[0]):
        with pytest.raises(divkit.Error, match="teacher_logits"):
            call(bad)


# ---------------------------------------------------------------------------------------------
# Torch-only losses whose label check reads values: the check runs in divkit::checked_labels
# while traced.
# ---------------------------------------------------------------------------------------------


def _cls_inputs():
    g = torch.Generator().manual_seed(13)
    z = torch.randn(6, 5, generator=g).requires_grad_(True)
    adv = (z.detach() + 0.1 * torch.randn(6, 5, generator=g)).requires_grad_(True)
    return z, adv, torch.tensor([1, 4, 0, 2, 2, 3])


D = divkit.distill
ROBUST = {  # the public function (named by the messages) and a call of it
    "ldr_kl": ("ldr_kl_loss", lambda z, adv, y: D.ldr_kl_loss(z, y, lam=0.7, margin=0.2)),
    "comp_sum": ("comp_sum_loss", lambda z, adv, y: D.comp_sum_loss(z, y, tau=0.5)),
    "gce": ("generalized_cross_entropy", lambda z, adv, y: D.generalized_cross_entropy(z, y)),
    "mae": ("mae_loss", lambda z, adv, y: D.mae_loss(z, y, reduction="sum")),
    "smooth_adv": (
        "smooth_adversarial_comp_sum_loss",
        lambda z, adv, y: D.smooth_adversarial_comp_sum_loss(z, adv, y, tau=1.5, nu=0.3),
    ),
    "mdcs": (
        "mdcs_consistency_loss",
        lambda z, adv, y: D.mdcs_consistency_loss(z, adv, y, temperature=2.0),
    ),
}


@pytest.mark.parametrize("name", sorted(ROBUST))
def test_label_checked_losses_compile_fullgraph_with_eager_bits(name):
    z, adv, y = _cls_inputs()
    fn, f = ROBUST[name]
    wrt = [z, adv] if name == "smooth_adv" else [z]
    torch._dynamo.reset()
    explain = torch._dynamo.explain(f)(z, adv, y)
    assert explain.graph_break_count == 0, explain.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got, want = compiled(z, adv, y), f(z, adv, y)
    _equal(got, want)
    _equal(torch.autograd.grad(got, wrt), torch.autograd.grad(want, wrt))
    bad = y.clone()
    bad[4] = 5
    for call in (compiled, f):
        with pytest.raises(divkit.Error, match=rf"^{fn}: labels (out of range|must be in)"):
            call(z, adv, bad)


def test_checked_labels_opcheck():
    y = torch.tensor([0, 3, -100, 2])
    torch.library.opcheck(_ops.checked_labels_op, (y, 4, -100, "f"))
    torch.library.opcheck(_ops.checked_labels_op, (y.clamp_min(0).int(), 4, None, "f"))
    with pytest.raises(divkit.Error, match=r"f: labels must be in \[0, 3\) or ignore_index"):
        _ops.checked_labels_op(y, 3, -100, "f")


def test_swing_temperatures_and_uscd_compile_fullgraph(monkeypatch):
    g = torch.Generator().manual_seed(14)
    scores = torch.rand(2, 3, generator=g)
    s = torch.randn(2, 3, 9, generator=g).requires_grad_(True)
    t = torch.randn(2, 3, 9, generator=g)

    def f(scores, s):
        temps = D.swing_temperatures(scores, t_min=1.0, t_max=3.0)
        return D.swing_loss(s, t, temperatures=temps, noise_std=0.2, seed=9) * 2, (temps,)

    _check(f, [scores, s], [s], monkeypatch)
    bad = scores.clone()
    bad[1, 2] = 1.5
    torch._dynamo.reset()
    compiled = torch.compile(lambda p: D.swing_temperatures(p), fullgraph=True)
    for call in (compiled, D.swing_temperatures):
        with pytest.raises(divkit.Error, match=r"swing_temperatures: privacy_scores must lie in"):
            call(bad)
    # USCD (no gradient): one decoding step, every field.
    std, lame = s.detach() * 0.01, t

    def uscd(std, lame):
        return tuple(D.uscd_logits(std, lame, lame_weight=0.5, std_threshold=0.05))

    torch._dynamo.reset()
    explain = torch._dynamo.explain(uscd)(std, lame)
    assert explain.graph_break_count == 0, explain.break_reasons
    torch._dynamo.reset()
    want = uscd(std, lame)
    assert bool(want[2].any())  # the contrast is applied somewhere: a test of its path
    _equal(torch.compile(uscd, fullgraph=True, backend="aot_eager")(std, lame), want)
    monkeypatch.setattr(_ops, "ALWAYS", True)
    _equal(uscd(std, lame), want)
    rows = (std.reshape(6, 9), lame.reshape(6, 9))
    torch.library.opcheck(_ops.selective_contrast_op, rows + (0.7, 0.005, 2.0 / 3.0))
    torch.library.opcheck(_ops.checked_range_op, (scores, 0.0, 1.0, "f", "x"))
    got = torch.vmap(uscd)(std, lame)
    for i in range(2):
        _equal(tuple(x[i] for x in got), uscd(std[i], lame[i]))


def test_aldr_kl_compiles_fullgraph_with_eager_bits():
    """ALDR-KL's per-instance lambda (computed from the data, no host read) and the module's
    buffer update, compiled; prev_lam and ids checked by ops when the graph runs."""
    z, _, y = _cls_inputs()
    prev = torch.linspace(0.5, 2.0, 6, dtype=torch.float64)

    def f(z, prev):
        loss, lam = D.aldr_kl_loss(z, y, alpha=3.0, prev_lam=prev, return_lam=True)
        return loss * 2, lam

    torch._dynamo.reset()
    explain = torch._dynamo.explain(lambda *a: f(*a)[0])(z, prev)
    assert explain.graph_break_count == 0, explain.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got, want = compiled(z, prev), f(z, prev)
    _equal(got, want)
    _equal(torch.autograd.grad(got[0], z), torch.autograd.grad(want[0], z))
    bad = prev.clone()
    bad[3] = 0.0
    for call in (compiled, f):
        with pytest.raises(divkit.Error, match="aldr_kl_loss: prev_lam must be finite and > 0"):
            call(z, bad)
    # The module: the buffer of per-instance lambdas updated in the graph, as eagerly.
    mods = [D.ALDRKLLoss(10, alpha=2.5) for _ in range(2)]
    ids = torch.tensor([7, 0, 3, 9, 2, 5])
    torch._dynamo.reset()
    step = torch.compile(mods[0], fullgraph=True, backend="aot_eager")
    for _ in range(2):  # the second visit reads the lambdas the first stored
        _equal(step(z, y, ids), mods[1](z, y, ids))
        _equal(mods[0].lam, mods[1].lam)
    with pytest.raises(divkit.Error, match=r"ALDRKLLoss: ids must be an int64 tensor"):
        step(z, y, torch.tensor([7, 0, 3, 10, 2, 5]))


def test_nd_loss_compiles_fullgraph_with_eager_bits():
    g = torch.Generator().manual_seed(15)
    fs = torch.randn(6, 4, generator=g).requires_grad_(True)
    ft = torch.randn(6, 4, generator=g)
    y = torch.tensor([0, 2, 1, 2, 0, 1])
    means = D.teacher_class_means(torch.randn(12, 4, generator=g), y.repeat(2), num_classes=3)

    def f(fs, means, y):
        return D.nd_loss(fs, ft, y, means) * 2

    torch._dynamo.reset()
    explain = torch._dynamo.explain(f)(fs, means, y)
    assert explain.graph_break_count == 0, explain.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got, want = compiled(fs, means, y), f(fs, means, y)
    _equal(got, want)
    _equal(torch.autograd.grad(got, fs), torch.autograd.grad(want, fs))
    zero = means.clone()
    zero[1] = 0.0
    for call in (compiled, f):
        with pytest.raises(divkit.Error, match="nd_loss: labels out of range"):
            call(fs, means, torch.tensor([0, 2, 1, 3, 0, 1]))
        with pytest.raises(divkit.Error, match="nd_loss: class_means has a zero vector"):
            call(fs, zero, y)
