"""The custom ops added after issue 19's audit for the remaining preference / RLHF functions:
divkit::d2o_loss, divkit::hypo_online_kl (HyPO's online term), divkit::superhf_loss,
divkit::ensemble_rewards, divkit::infalign_transform. Each: torch.compile(fullgraph=True) with
no graph break and eager's bits, the op path (ALWAYS) equal to the function path, opcheck, vmap
and a clear divkit.Error on double backward (the test pattern of test_ops_audit.py)."""

import pytest
import torch

import divkit
import divkit.rlhf
from divkit import _ops

pytestmark = pytest.mark.skipif(not _ops.ENABLED, reason="torch.library.custom_op needs torch>=2.4")


def _no_break(f, *args):
    torch._dynamo.reset()
    explain = torch._dynamo.explain(f)(*args)
    assert explain.graph_break_count == 0, explain.break_reasons


def _grads(out, wrt):
    return torch.autograd.grad(out, wrt, allow_unused=True)


def _same_grads(got, want):
    assert any(g is not None for g in want)
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)


def _logps(shape, seed, grad=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (-torch.rand(shape, generator=g, dtype=dtype) * 3 - 0.1).requires_grad_(grad)


def _d2o(ps, rs, pl, rl):
    losses, pos, neg = divkit.d2o_loss(ps, rs, pl, rl, beta=0.3, alpha=0.2)
    return (losses * torch.arange(1.0, 4.0)).sum() + 0 * (pos.sum() + neg.sum())


def _d2o_inputs():
    return [_logps((3, 4), 0), _logps((3, 4), 1), _logps(3, 2), _logps(3, 3)]


def _hypo(pc, pr, rc, rr, ps, rs):
    losses, c, r, kl = divkit.hypo_loss(pc, pr, rc, rr, ps, rs, beta=0.2, lam=0.5)
    return (losses * torch.arange(1.0, 4.0)).sum() + 0 * (c.sum() + r.sum() + kl.sum())


def _hypo_inputs():
    return [_logps(3, i, i < 2) for i in range(4)] + [_logps((3, 4), 5), _logps((3, 4), 6, False)]


def _superhf(lp, kl):
    rewards = torch.tensor([[0.1, 0.9, 0.3, 0.2], [0.5, 0.4, 0.8, 0.1], [0.0, 0.2, 0.1, 0.7]])
    loss, idx = divkit.superhf_loss(lp, rewards, kl=kl, kl_coef=0.35, top_k=2)
    return loss * 3 + 0 * idx.sum()


def _superhf_inputs():
    return [_logps((3, 4), 0), _logps((3, 4), 1).abs().detach().requires_grad_(True)]


def _ensemble(r):
    out = divkit.rlhf.ensemble_rewards(r, "uwo", uwo_lambda=0.5, dim=1)
    return (out * torch.arange(1.0, 3.0).reshape(2, 1)).sum()


def _ensemble_wco(r):
    return divkit.rlhf.ensemble_rewards(r, "wco").sum() * 2


def _ensemble_inputs():
    return [_logps((2, 4, 3), 0)]


def _infalign(u):
    return (divkit.rlhf.infalign_transform(u, 2.0, scenario="best_of_n") * torch.arange(6.0)).sum()


def _infalign_inputs():
    return [torch.rand(6, generator=torch.Generator().manual_seed(3)).requires_grad_(True)]


def _superhf_lengths(lp, kl):
    rewards = torch.tensor([[0.1, 0.9, 0.3, 0.2], [0.5, 0.4, 0.8, 0.1], [0.0, 0.2, 0.1, 0.7]])
    lengths = torch.tensor([[3.0, 5.0, 2.0, 7.0], [1.0, 4.0, 4.0, 2.0], [6.0, 2.0, 3.0, 5.0]])
    loss, idx = divkit.superhf_loss(lp, rewards, kl=kl, lengths=lengths, top_k=3)
    return loss + 0 * idx.sum()


CASES = {
    "superhf_lengths": (_superhf_lengths, _superhf_inputs),
    "d2o": (_d2o, _d2o_inputs),
    "hypo": (_hypo, _hypo_inputs),
    "superhf": (_superhf, _superhf_inputs),
    "ensemble_uwo": (_ensemble, _ensemble_inputs),
    "ensemble_wco": (_ensemble_wco, _ensemble_inputs),
    "infalign": (_infalign, _infalign_inputs),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_compiles_fullgraph_with_eager_bits(name, monkeypatch):
    f, make = CASES[name]
    inputs = make()
    wrt = [x for x in inputs if x.requires_grad]
    _no_break(f, *inputs)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(*inputs)
    got_grads = _grads(got, wrt)
    want = f(*inputs)
    want_grads = _grads(want, wrt)
    assert torch.equal(got, want)
    _same_grads(got_grads, want_grads)
    monkeypatch.setattr(_ops, "ALWAYS", True)  # every call through the op, eagerly
    got = f(*inputs)
    assert torch.equal(got, want)
    _same_grads(_grads(got, wrt), want_grads)
    # Double backward: a clear error on both paths.
    for always in (True, False):
        monkeypatch.setattr(_ops, "ALWAYS", always)
        (g,) = torch.autograd.grad(f(*inputs), wrt[0], create_graph=True)
        with pytest.raises(divkit.Error, match="double backward"):
            g.sum().backward()


def test_opcheck():
    ps, rs = _logps((3, 4), 0), _logps((3, 4), 1)
    pl, rl = _logps(3, 2), _logps(3, 3)
    torch.library.opcheck(_ops.d2o_loss_op, (ps, rs, pl, rl, None, 0.3, 0.2, [False] * 4))
    torch.library.opcheck(_ops.hypo_online_kl_op, (ps, rs.detach(), None, [False]))
    rewards = torch.rand(3, 4, generator=torch.Generator().manual_seed(1))
    kl = rs.detach().abs().requires_grad_(True)
    torch.library.opcheck(_ops.superhf_loss_op, (ps, kl, rewards, None, None, 0.35, 2, [False] * 2))
    lengths = torch.full((3, 4), 5.0)
    torch.library.opcheck(
        _ops.superhf_loss_op, (ps, kl, rewards, lengths, None, 0.35, 1, [False] * 2)
    )
    for method in ("mean", "wco", "uwo"):
        torch.library.opcheck(
            _ops.ensemble_rewards_op, (ps, None, method, 0.5, torch.float32, [False])
        )
    u = torch.rand(5, requires_grad=True)
    torch.library.opcheck(_ops.infalign_transform_op, (u, None, -1.5, torch.float32, [False]))


def test_vmap_equals_the_batched_call():
    g = torch.Generator().manual_seed(4)
    ps, rs = -torch.rand(2, 3, 4, generator=g), -torch.rand(2, 3, 4, generator=g)
    pl, rl = -torch.rand(2, 3, generator=g), -torch.rand(2, 3, generator=g)
    got = torch.vmap(lambda a, b, c, d: divkit.d2o_loss(a, b, c, d)[0])(ps, rs, pl, rl)
    for i in range(2):
        assert torch.equal(got[i], divkit.d2o_loss(ps[i], rs[i], pl[i], rl[i])[0])
    r = torch.randn(2, 5, 3, generator=g)
    got = torch.vmap(lambda x: divkit.rlhf.ensemble_rewards(x, "uwo", dim=1))(r)
    assert torch.equal(got, divkit.rlhf.ensemble_rewards(r, "uwo", dim=2))
    u = torch.rand(3, 4, generator=g)
    got = torch.vmap(lambda x: divkit.rlhf.infalign_transform(x, 1.5))(u)
    assert torch.equal(got, divkit.rlhf.infalign_transform(u, 1.5))
    lp, kl, rw = -torch.rand(2, 3, 4, generator=g), torch.rand(2, 3, 4, generator=g), r[:, :3, :4]
    rw = torch.randn(2, 3, 4, generator=g)
    got = torch.vmap(lambda a, b, c: divkit.superhf_loss(a, c, kl=b, top_k=2)[0])(lp, kl, rw)
    for i in range(2):
        assert torch.equal(got[i], divkit.superhf_loss(lp[i], rw[i], kl=kl[i], top_k=2)[0])


def test_non_finite_input_raises_under_compile():
    """The public functions' value checks cannot run while tracing; the ops check when they run."""
    torch._dynamo.reset()
    f = torch.compile(
        lambda r: divkit.rlhf.ensemble_rewards(r, "mean"), fullgraph=True, backend="eager"
    )
    r = torch.randn(3, 4)
    assert torch.equal(f(r), divkit.rlhf.ensemble_rewards(r, "mean"))
    r[1, 2] = float("nan")
    with pytest.raises(divkit.Error, match="ensemble_rewards: rewards"):
        f(r)


# ---------------------------------------------------------------------------------------------
# Distillation: OFA-KD and SWING.
# ---------------------------------------------------------------------------------------------


def _kd_inputs():
    g = torch.Generator().manual_seed(11)
    s = torch.randn(2, 3, 7, generator=g).requires_grad_(True)
    t = torch.randn(2, 3, 7, generator=g)
    labels = torch.tensor([[1, 2, -100], [0, 6, 3]])
    return [s, t, labels]


def _ofa(s, t, labels):
    return divkit.distill.ofa_loss(s, t, labels, eps=1.3, temperature=2.0) * 3


def _ofa_none(s, t, labels):
    out = divkit.distill.ofa_loss(s, t, labels, reduction="none")
    return (out * torch.arange(6.0).reshape(2, 3)).sum()


def _swing(s, t, labels):
    temps = torch.tensor([[1.0, 2.0, 3.0], [1.5, 2.5, 4.0]])
    return divkit.distill.swing_loss(
        s, t, temperatures=temps, noise_std=0.3, seed=-5, labels=labels
    )


def _dac_quantile(s, t, labels):
    return divkit.distill.dac_kl_loss(s, t, mass_lo=0.05, mass_hi=0.8, labels=labels) * 2


def _dac_soft(s, t, labels):
    lower = torch.full((2, 3), 0.02)
    upper = torch.full((2, 3), 0.6)
    out = divkit.distill.dac_kl_loss(s, t, lower, upper, sharpness=0.5, reduction="none")
    return (out * torch.arange(6.0).reshape(2, 3)).sum()


def _nkd(s, t, labels):
    return divkit.distill.nkd_loss(s, t, labels, temperature=2.0, gamma=1.5)


def _uskd(s, t, labels):
    return divkit.distill.uskd_loss(s.reshape(6, 7), labels.reshape(6), t.reshape(6, 7), mu=0.0)


def test_uskd_op_path_equals_the_function_path(monkeypatch):
    """USKD reaches NKD's kernel and its soft labels through ops (compiled: test_ops_ot.py)."""
    inputs = _kd_inputs()
    want = _uskd(*inputs)
    want_grads = _grads(want, inputs[:1])
    monkeypatch.setattr(_ops, "ALWAYS", True)
    got = _uskd(*inputs)
    assert torch.equal(got, want)
    _same_grads(_grads(got, inputs[:1]), want_grads)


KD = {
    "nkd": _nkd,
    "ofa": _ofa,
    "ofa_none": _ofa_none,
    "swing": _swing,
    "dac_quantile": _dac_quantile,
    "dac_soft": _dac_soft,
}


@pytest.mark.parametrize("name", sorted(KD))
def test_distill_compiles_fullgraph_with_eager_bits(name, monkeypatch):
    f = KD[name]
    inputs = _kd_inputs()
    wrt = inputs[:1]
    _no_break(f, *inputs)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(*inputs)
    got_grads = _grads(got, wrt)
    want = f(*inputs)
    want_grads = _grads(want, wrt)
    assert torch.equal(got, want)
    _same_grads(got_grads, want_grads)
    monkeypatch.setattr(_ops, "ALWAYS", True)
    got = f(*inputs)
    assert torch.equal(got, want)
    _same_grads(_grads(got, wrt), want_grads)
    for always in (True, False):
        monkeypatch.setattr(_ops, "ALWAYS", always)
        (g,) = torch.autograd.grad(f(*inputs), wrt[0], create_graph=True)
        with pytest.raises(divkit.Error, match="double backward"):
            g.sum().backward()


def test_distill_opcheck_and_vmap():
    s, t, labels = _kd_inputs()
    s2, t2, lab = s.reshape(6, 7), t.reshape(6, 7), labels.reshape(6)
    torch.library.opcheck(_ops.ofa_rows_op, (s2, t2, lab, None, -100, 1.2, 2.0, [False]))
    temps = torch.tensor([1.0, 2.0, 3.0, 1.5, 2.5, 4.0], dtype=torch.float64)
    torch.library.opcheck(
        _ops.tempered_kl_rows_op, (s2, t2, temps, lab, None, 0.2, -7, -100, [False])
    )
    torch.library.opcheck(
        _ops.tempered_kl_rows_op, (s2, t2, temps, None, None, 0.0, 3, -100, [False])
    )
    lo, hi = torch.full((6,), 0.02).requires_grad_(True), torch.full((6,), 0.6).requires_grad_(True)
    torch.library.opcheck(
        _ops.clipped_kl_rows_op, (s2, lo, hi, t2, lab, None, -100, 1.5, 0.5, [False] * 3)
    )
    torch.library.opcheck(
        _ops.clipped_kl_rows_op, (s2, lo, hi, t2, None, None, -100, 1.0, 0.0, [False] * 3)
    )
    torch.library.opcheck(_ops.mass_bounds_op, (t2, 1.0, 0.1, 0.9))
    torch.library.opcheck(_ops.nkd_rows_op, (s2, t2, lab, None, None, -100, 1.5, "nkd_loss"))
    got = torch.vmap(lambda a, b, c: divkit.distill.ofa_loss(a, b, c, reduction="sum"))(
        s.detach(), t, labels
    )
    for i in range(2):
        want = divkit.distill.ofa_loss(s[i].detach(), t[i], labels[i], reduction="sum")
        assert torch.equal(got[i], want)


# ---------------------------------------------------------------------------------------------
# Optimal transport: mmd, cs_divergence.
# ---------------------------------------------------------------------------------------------


def _points():
    g = torch.Generator().manual_seed(21)
    x = torch.randn(5, 3, generator=g).requires_grad_(True)
    y = (torch.randn(4, 3, generator=g) + 0.5).requires_grad_(True)
    b = torch.rand(4, generator=g) + 0.1
    return [x, y, b / b.sum()]


def _mmd(x, y, b):
    return divkit.ot.mmd(x, y, None, b, sigma=1.5) * 3


def _mmd_energy(x, y, b):
    return divkit.ot.mmd(x, y, kernel="energy")


def _cs(x, y, b):
    return divkit.ot.cs_divergence(x, y, None, b, sigma=2.0) * 0.5


OT = {"mmd": _mmd, "mmd_energy": _mmd_energy, "cs": _cs}


@pytest.mark.parametrize("name", sorted(OT))
def test_sample_divergences_compile_fullgraph_with_eager_bits(name, monkeypatch):
    f = OT[name]
    inputs = _points()
    wrt = inputs[:2]
    _no_break(f, *inputs)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(*inputs)
    got_grads = _grads(got, wrt)
    want = f(*inputs)
    want_grads = _grads(want, wrt)
    assert torch.equal(got, want)
    _same_grads(got_grads, want_grads)
    monkeypatch.setattr(_ops, "ALWAYS", True)
    got = f(*inputs)
    assert torch.equal(got, want)
    _same_grads(_grads(got, wrt), want_grads)
    for always in (True, False):
        monkeypatch.setattr(_ops, "ALWAYS", always)
        (g,) = torch.autograd.grad(f(*inputs), wrt[0], create_graph=True)
        with pytest.raises(divkit.Error, match="double backward"):
            g.sum().backward()


def test_sample_divergence_opcheck_and_vmap():
    x, y, b = _points()
    for which, kernel in (("mmd", "gaussian"), ("mmd", "energy"), ("cs", "gaussian")):
        torch.library.opcheck(
            _ops.sample_divergence_op, (x, y, None, b, which, kernel, 1.3, [True, True])
        )
        torch.library.opcheck(
            _ops.sample_divergence_op, (x, y, None, None, which, kernel, 1.3, [False, False])
        )
    xs, ys = torch.randn(2, 5, 3), torch.randn(2, 4, 3)
    got = torch.vmap(lambda p, q: divkit.ot.mmd(p, q))(xs, ys)
    for i in range(2):
        assert torch.equal(got[i], divkit.ot.mmd(xs[i], ys[i]))


def test_kde_log_density_compiles_fullgraph_opcheck_vmap(monkeypatch):
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(6, 2, generator=g), torch.randn(4, 2, generator=g)
    w = torch.rand(6, generator=g) + 0.1

    def f(x, y, w):
        return divkit.ot.kde_log_density(x, y, 0.7, w)

    _no_break(f, x, y, w)
    torch._dynamo.reset()
    want = f(x, y, w)
    assert torch.equal(torch.compile(f, fullgraph=True, backend="aot_eager")(x, y, w), want)
    monkeypatch.setattr(_ops, "ALWAYS", True)
    assert torch.equal(f(x, y, w), want)
    torch.library.opcheck(_ops.kde_log_density_op, (x, y, w, 0.7))
    torch.library.opcheck(_ops.kde_log_density_op, (x, y, None, 1.2))
    ys = torch.randn(3, 4, 2, generator=g)
    got = torch.vmap(lambda q: divkit.ot.kde_log_density(x, q, 0.7))(ys)
    for i in range(3):
        assert torch.equal(got[i], divkit.ot.kde_log_density(x, ys[i], 0.7))


def test_superhf_bad_lengths_raise_under_compile():
    lp, kl = (x.detach() for x in _superhf_inputs())
    rewards = torch.rand(3, 4)
    torch._dynamo.reset()
    f = torch.compile(
        lambda a, b, n: divkit.superhf_loss(a, rewards, kl=b, lengths=n)[0],
        fullgraph=True,
        backend="eager",
    )
    n = torch.full((3, 4), 2.0)
    assert torch.equal(f(lp, kl, n), divkit.superhf_loss(lp, rewards, kl=kl, lengths=n)[0])
    n[1, 1] = 0.0
    with pytest.raises(divkit.Error, match="lengths must"):
        f(lp, kl, n)
