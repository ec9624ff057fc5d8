"""divkit.ot.sinkhorn(sync=False), the mode without host reads that a CUDA graph can capture:
its CUDA path is in tests/gpu/test_sinkhorn_cuda.py; here, on CPU tensors, the option's checks
and errors, the stats output of the C++ core (the device results' glue), and the fixed schedule
of the PyTorch fallback, all against the synchronizing call."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import divkit
from divkit import _C
from divkit.ot import sinkhorn

FIELDS = ("f", "g", "transport_cost", "reg_cost", "n_iter", "marginal_error", "converged")


def batch(B=3, n=23, m=17, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, n, d, generator=g, dtype=torch.float64)
    y = torch.randn(B, m, d, generator=g, dtype=torch.float64) + 0.5
    x[B - 1] *= 3.0  # converges later than the others
    a = torch.rand(B, n, generator=g, dtype=torch.float64) + 0.2
    b = torch.rand(B, m, generator=g, dtype=torch.float64) + 0.2
    return x, y, a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)


def assert_same(r, ref):
    for k in FIELDS:
        u, v = getattr(r, k), getattr(ref, k)
        assert u.dtype == v.dtype and u.shape == v.shape, k
        assert torch.equal(u, v), (k, u, v)


@pytest.mark.parametrize("backend", ["core", "torch"])
@pytest.mark.parametrize(
    "opts",
    [
        dict(eps=0.3, tol=1e-8, max_iter=500),
        dict(eps=0.2, tol=1e-7, max_iter=500, eps_scaling=0.5),
        dict(eps=0.2, tol=1e-7, max_iter=500, check_every=3, rho=2.0),
        dict(eps=0.2, tol=1e-7, max_iter=400),  # two of the three stop unconverged
    ],
)
def test_sync_false_gives_the_synchronizing_results(backend, opts):
    x, y, a, b = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ref = sinkhorn(x, y, a, b, backend=backend, **opts)
    # The problems stop at different iterations.
    its = ref.n_iter.tolist()
    assert len(set(its)) > 1, its
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # sync=False ignores warn
        r = sinkhorn(x, y, a, b, backend=backend, sync=False, **opts)
    assert_same(r, ref)


def test_sync_false_gradients_and_given_cost():
    x, y, a, b = batch(B=2, seed=1)
    grads = []
    for sync in (True, False):
        xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
        r = sinkhorn(xs, ys, a, b, eps=0.3, sync=sync)
        r.reg_cost.sum().backward()
        grads.append((xs.grad, ys.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    C = torch.cdist(x[0], y[0]) ** 2
    for backend in ("core", "torch"):
        ref = sinkhorn(None, None, a[0], b[0], cost=C, eps=0.1, backend=backend, return_plan=True)
        r = sinkhorn(None, None, a[0], b[0], cost=C, eps=0.1, backend=backend, return_plan=True,
                     sync=False)  # fmt: skip
        assert_same(r, ref)
        assert torch.equal(r.plan, ref.plan)


def test_sync_must_be_a_bool_or_none():
    x, y, a, b = batch(B=1)
    with pytest.raises(divkit.Error, match="sinkhorn: sync must be a bool, got str"):
        sinkhorn(x, y, eps=0.1, sync="no")
    with pytest.raises(divkit.Error, match="sinkhorn: sync must be a bool, got int"):
        sinkhorn(x, y, eps=0.1, sync=0)


def _core_args(B, n, m, d):
    x, y, a, b = batch(B, n, m, d)
    f = torch.empty(B, n, dtype=torch.float64)
    g = torch.empty(B, m, dtype=torch.float64)
    return x, y, a, b, f, g


def _options(**kw):
    base = dict(eps=0.1, p=2, tol=1e-9, max_iter=200, check_every=1, eps_scaling=0.0,
                rho_a=float("inf"), rho_b=float("inf"), cost_cache_bytes=1 << 26, symmetric=False)  # fmt: skip
    base.update(kw)
    return _C.SinkhornOptions(**base)


def test_core_stats_output_equals_the_returned_stats():
    x, y, a, b, f, g = _core_args(3, 11, 9, 2)
    ref = _C.sinkhorn(x, y, None, a, b, f, g, None, None, None, None, None, _options())
    st = torch.full((3, 6), float("nan"), dtype=torch.float64)
    f2, g2 = torch.empty_like(f), torch.empty_like(g)
    out = _C.sinkhorn(x, y, None, a, b, f2, g2, None, None, None, None, None,
                      _options(sync=False), st)  # fmt: skip
    assert out == ref  # the CPU returns its stats whatever sync says
    assert torch.equal(st, torch.tensor([[*r[:5], float(r[5])] for r in ref], dtype=torch.float64))
    assert torch.equal(f2, f) and torch.equal(g2, g)
    assert _options(sync=False).sync is False and _options().sync is True


def test_core_stats_output_errors():
    x, y, a, b, f, g = _core_args(2, 5, 4, 2)
    with pytest.raises(divkit.Error, match=r"sinkhorn: stats must be given when sync is false"):
        _C.sinkhorn(x, y, None, a, b, f, g, None, None, None, None, None, _options(sync=False))
    for bad, msg in (
        (torch.empty(2, 5, dtype=torch.float64), r"stats must have shape \[2, 6\], got \[2, 5\]"),
        (torch.empty(2, 6, dtype=torch.float32), r"stats must be float64, got float32"),
    ):
        with pytest.raises(divkit.Error, match="sinkhorn: " + msg):
            _C.sinkhorn(x, y, None, a, b, f, g, None, None, None, None, None, _options(), bad)


def test_sinkhorn_divergence_passes_sync_on():
    from divkit.ot import sinkhorn_divergence

    x, y, a, b = batch(B=2, seed=2)
    ref = sinkhorn_divergence(x, y, a, b, eps=0.3, tol=1e-9)
    got = sinkhorn_divergence(x, y, a, b, eps=0.3, tol=1e-9, sync=False)
    assert torch.equal(got, ref)
    with pytest.raises(divkit.Error, match="sync must be a bool"):
        sinkhorn_divergence(x, y, a, b, eps=0.3, sync="off")


# ---------------------------------------------------------------------------------------------
# The fallback's sync=False path has no host read, no synchronization and no host-to-device
# copy. Proved without a GPU on "meta" tensors, which hold no values (any .item(), bool(),
# tolist(), nonzero or torch.equal raises), under a dispatch mode that also fails on every
# operation taking a non-scalar CPU tensor into a device result (a host-to-device copy) and on
# torch.tensor / torch.as_tensor made on a device.
# ---------------------------------------------------------------------------------------------


class NoHostTraffic(TorchDispatchMode):
    READS = frozenset(
        {
            torch.ops.aten._local_scalar_dense.default,
            torch.ops.aten.equal.default,
            torch.ops.aten.nonzero.default,
            torch.ops.aten.item.default,
        }
    )

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.READS:
            raise AssertionError(f"host read: {func}")
        out = func(*args, **kwargs)
        ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if any(t.device.type != "cpu" for t in outs) and any(
            t.device.type == "cpu" and t.dim() > 0 for t in ins
        ):
            raise AssertionError(f"host-to-device copy: {func}")
        self.ops += 1
        return out


# Made from host data: not seen by the dispatch mode when made on a device.
MAKERS = (torch.tensor, torch.as_tensor, torch.from_numpy)
WRAPPERS = ("sinkhorn", "sinkhorn_divergence", "sinkhorn_kd_loss", "monge_gap")


@pytest.fixture
def on_meta(monkeypatch):
    """Runs a call under :class:`NoHostTraffic`. The public functions refuse meta tensors (no
    engine computes values on them): here divkit.ot's Sinkhorn functions are their undecorated
    bodies (the decorator's checks read no value for them: no finite-value arguments) and the
    router sends meta tensors to the fallback."""
    for name in WRAPPERS:
        monkeypatch.setattr(divkit.ot, name, getattr(divkit.ot, name).__wrapped__)
    route = divkit._device.route

    def meta_route(fn, op, backend, tensors):
        devs = {t.device.type for _, t in tensors if isinstance(t, torch.Tensor)}
        if devs == {"meta"}:
            return divkit._device.Route("torch", torch.device("meta"))
        return route(fn, op, backend, tensors)

    monkeypatch.setattr(divkit._device, "route", meta_route)

    def run(call, min_ops=100):
        made = []  # torch.tensor / as_tensor called from divkit (their data would be copied)

        def profile(frame, event, arg):
            if event == "c_call" and arg in MAKERS and "divkit" in frame.f_code.co_filename:
                made.append(f"{frame.f_code.co_filename}:{frame.f_lineno}")

        old = sys.getprofile()
        sys.setprofile(profile)
        try:
            with NoHostTraffic() as mode:
                out = call()
        finally:
            sys.setprofile(old)
        assert not made, made
        assert mode.ops >= min_ops, mode.ops  # the call did run under the mode
        return out

    return run


def meta(t):
    return None if t is None else t.to("meta")


META_CASES = [
    dict(),
    dict(p=1),
    dict(eps_scaling=0.5),
    dict(eps_scaling=0.7, rho=2.0, check_every=3),
    dict(rho=(0.5, float("inf"))),
    dict(cost_cache_mib=0),  # the cost on the fly, in blocks of rows
    dict(d=12),  # p = 2 by the expanded cost
    dict(symmetric=True),
    dict(cost=True),
    dict(cost=True, eps_scaling=0.5),
]


@pytest.mark.parametrize("weights", [False, True], ids=["uniform", "weights"])
@pytest.mark.parametrize("batched", [False, True], ids=["single", "batch"])
@pytest.mark.parametrize("grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("opts", META_CASES, ids=lambda o: str(o).replace(" ", ""))
def test_fallback_sync_false_reads_nothing_back(on_meta, opts, weights, batched, grad):
    opts = dict(opts)
    x, y, a, b = batch(B=2, d=opts.pop("d", 3))
    if opts.pop("symmetric", False):
        y, b = x, a
        opts["symmetric"] = True
    cost = None
    if opts.pop("cost", False):
        cost, x, y = torch.cdist(x, y) ** 2, None, None
    if not batched:
        x, y, a, b, cost = (None if t is None else t[0] for t in (x, y, a, b, cost))
    if not weights:
        a = b = None
    x, y, a, b, cost = map(meta, (x, y, a, b, cost))
    if grad:
        for t in (x, y, a, b, cost):
            if t is not None:
                t.requires_grad_()
    r = on_meta(
        lambda: divkit.ot.sinkhorn(
            x,
            y,
            a,
            b,
            cost=cost,
            eps=0.2,
            max_iter=17,  # past SYNC_EVERY, where sync=True reads the flags
            backend="torch",
            return_plan=True,
            sync=False,
            **opts,
        )
    )
    lead = (2,) if batched else ()
    assert r.reg_cost.device.type == "meta" and r.reg_cost.shape == lead
    assert r.n_iter.dtype == torch.int64 and r.converged.dtype == torch.bool
    assert r.converged.shape == lead and r.plan is not None
    if grad:
        on_meta(lambda: r.reg_cost.sum().backward(), min_ops=3)
        for t in (x, y, a, b, cost):
            if t is not None:
                assert t.grad is not None and t.grad.device.type == "meta"


def test_fallback_sync_true_reads_back_on_meta(on_meta):
    """The check above can fail: the synchronizing call reads its checks and flags back."""
    x, y, _, _ = batch(B=2)
    with pytest.raises((RuntimeError, NotImplementedError, AssertionError)):
        on_meta(
            lambda: divkit.ot.sinkhorn(
                meta(x), meta(y), eps=0.2, max_iter=40, backend="torch", sync=True
            )
        )


def test_schedule_guard_catches_a_host_to_device_copy(on_meta):
    """The runner fails on the host-built eps schedule that sync=True copies to the device,
    and on its torch.tensor from host data even where no copy follows."""
    from divkit.backends import torch_ot

    scale = meta(torch.ones(3, dtype=torch.float64))
    with pytest.raises(AssertionError, match="host-to-device copy"):
        on_meta(
            lambda: torch_ot._schedule_on_host(
                torch.ones(3, dtype=torch.float64), 0.1, 0.5, torch.device("meta")
            )
        )
    with pytest.raises(AssertionError, match="torch_ot.py"):  # torch.tensor from host data
        on_meta(
            lambda: torch_ot._schedule_on_host(
                torch.ones(3, dtype=torch.float64), 0.1, 0.5, torch.device("cpu")
            )
        )
    sched, n_stage, n_st = on_meta(lambda: torch_ot._schedule_on_device(scale, 0.1, 0.5), 200)
    assert sched.shape == (3, torch_ot.MAX_STAGES + 1) and n_st == torch_ot.MAX_STAGES


@pytest.mark.parametrize("kw", [dict(), dict(p=1, eps_scaling=0.5)])
def test_wrappers_sync_false_read_nothing_back(on_meta, kw):
    monge_gap, sinkhorn_divergence = divkit.ot.monge_gap, divkit.ot.sinkhorn_divergence
    sinkhorn_kd_loss = divkit.ot.sinkhorn_kd_loss
    x, y, a, b = batch(B=2)
    xm, ym, am, bm = (meta(t).requires_grad_() for t in (x, y, a, b))
    div = on_meta(
        lambda: sinkhorn_divergence(
            xm, ym, am, bm, eps=0.3, max_iter=17, backend="torch", sync=False, **kw
        )
    )
    on_meta(lambda: div.sum().backward(), min_ops=3)
    assert div.shape == (2,) and xm.grad is not None and bm.grad is not None
    x0, y0 = meta(x[0]).requires_grad_(), meta(x[0] * 0.5 + 1.0).requires_grad_()
    gap = on_meta(
        lambda: monge_gap(x0, y0, eps=0.3, max_iter=17, backend="torch", sync=False, **kw)
    )
    on_meta(lambda: gap.backward(), min_ops=3)
    assert gap.shape == () and x0.grad is not None and y0.grad is not None
    s, t = meta(torch.randn(5, 11, dtype=torch.float64)).requires_grad_(), meta(torch.randn(5, 11))
    loss = on_meta(lambda: sinkhorn_kd_loss(s, t.double(), sync=False))
    on_meta(lambda: loss.backward(), min_ops=3)
    assert loss.shape == () and s.grad is not None


# ---------------------------------------------------------------------------------------------
# Bad input with sync=False: NaN costs and marginal error and converged False instead of an
# error (every problem for a bad value, that problem alone for a zero total weight or unequal
# masses), the other problems' results untouched, as the CUDA kernels' sync=False.
# ---------------------------------------------------------------------------------------------

STATS = ("transport_cost", "reg_cost", "marginal_error")


def sync_false(*args, **kw):
    return sinkhorn(*args, backend="torch", sync=False, **kw)


def assert_bad(r, bad):
    bad = torch.tensor(bad)
    for k in STATS:
        v = getattr(r, k)
        assert torch.equal(v.isnan(), bad), (k, v)
    assert not r.converged[bad].any()


def assert_rows_same(r, ref, rows, fields=FIELDS):
    for k in fields:
        u, v = getattr(r, k)[rows], getattr(ref, k)[rows]
        assert torch.equal(u, v), (k, u, v)


OPTS = dict(eps=0.3, tol=1e-8, max_iter=450)


BAD_VALUES = [(w, v) for w in ("x", "y", "a", "b", "cost") for v in (float("nan"), float("inf"))]


@pytest.mark.parametrize("what,value", BAD_VALUES + [("a", -0.5), ("b", -0.5)])
def test_bad_value_makes_every_problem_nan(what, value):
    x, y, a, b = batch()
    cost = None
    if what == "cost":
        cost, x, y = torch.cdist(x, y) ** 2, None, None
    ref = sync_false(x, y, a, b, cost=cost, **OPTS)
    assert ref.converged.all()
    bad = {"x": x, "y": y, "a": a, "b": b, "cost": cost}[what].clone()
    bad[1].view(-1)[2] = value
    args = dict(x=x, y=y, a=a, b=b, cost=cost)
    args[what] = bad
    with pytest.raises(divkit.Error, match=f"sinkhorn: {what} has a"):
        sinkhorn(backend="torch", **args, **OPTS)
    r = sync_false(**args, **OPTS)
    assert_bad(r, [True, True, True])
    # The problems without the bad value iterate as before: their potentials and counts.
    assert_rows_same(r, ref, [0, 2], fields=("f", "g", "n_iter"))


@pytest.mark.parametrize("rho", [None, 2.0])
@pytest.mark.parametrize("which", ["a", "b"])
def test_zero_total_weight_makes_that_problem_nan(which, rho):
    x, y, a, b = batch()
    ref = sync_false(x, y, a, b, rho=rho, **OPTS)
    w = (a if which == "a" else b).clone()
    w[1] = 0.0
    args = dict(a=w, b=b) if which == "a" else dict(a=a, b=w)
    with pytest.raises(divkit.Error, match=f"sinkhorn: {which} sums to 0 in problem 1"):
        sinkhorn(x, y, backend="torch", rho=rho, **args, **OPTS)
    r = sync_false(x, y, rho=rho, **args, **OPTS)
    assert_bad(r, [False, True, False])
    assert_rows_same(r, ref, [0, 2])


def test_unequal_masses_make_that_problem_nan():
    x, y, a, b = batch()
    a2 = a.clone()
    a2[2] *= 1.5
    with pytest.raises(divkit.Error, match="sinkhorn: a and b must have equal total mass"):
        sinkhorn(x, y, a2, b, backend="torch", **OPTS)
    r = sync_false(x, y, a2, b, **OPTS)
    assert_bad(r, [False, False, True])
    ref = sinkhorn(x, y, a, b, backend="torch", **OPTS)  # the valid problems, synchronizing
    assert_rows_same(r, ref, [0, 1])
    # Unbalanced, unequal masses are a valid problem: nothing is NaN.
    r = sync_false(x, y, a2, b, rho=1.0, **OPTS)
    ref = sinkhorn(x, y, a2, b, rho=1.0, backend="torch", **OPTS)
    assert_same(r, ref)


def test_symmetric_inputs_that_differ_make_every_problem_nan():
    x, _, a, _ = batch()
    ref = sync_false(x, x, a, a, symmetric=True, **OPTS)
    assert_same(ref, sinkhorn(x, x, a, a, symmetric=True, backend="torch", **OPTS))
    y = x.clone()
    y[0, 0, 0] += 1.0
    with pytest.raises(divkit.Error, match="sinkhorn: symmetric needs y equal to x"):
        sinkhorn(x, y, a, a, symmetric=True, backend="torch", **OPTS)
    assert_bad(sync_false(x, y, a, a, symmetric=True, **OPTS), [True, True, True])
    b = a.clone()
    b[2] = b[2].flip(0)
    assert_bad(sync_false(x, x, a, b, symmetric=True, **OPTS), [True, True, True])
    # Checks that need no value still raise.
    with pytest.raises(divkit.Error, match="symmetric needs rho_a equal to rho_b"):
        sync_false(x, x, a, a, symmetric=True, rho=(1.0, 2.0), **OPTS)


def test_device_schedule_equals_the_host_loop():
    """The eps schedule without a host read: the host loop's values bitwise, and its stage
    counts, for scales that give no stage, a few, exactly MAX_STAGES (inf) and NaN."""
    from divkit.backends import torch_ot

    scale = torch.tensor(
        [0.05, 0.1, 0.1000001, 3.7, 1e300, float("inf"), float("nan"), 0.0], dtype=torch.float64
    )
    for s in (0.0, 0.5, 0.9, 0.999):
        hs, hn, hst = torch_ot._schedule_on_host(scale, 0.1, s, torch.device("cpu"))
        ds, dn, dst = torch_ot._schedule_on_device(scale, 0.1, s)
        assert torch.equal(dn, hn), (s, dn, hn)
        assert torch.equal(ds[:, : hst + 1], hs), s
        assert (ds[:, hst + 1 :] == 0.1).all()
        assert dst == (torch_ot.MAX_STAGES if s > 0 else 0)


@pytest.mark.parametrize("backend", ["core", "torch"])
def test_wrappers_sync_false_give_the_synchronizing_results(backend):
    from divkit.ot import monge_gap, sinkhorn_kd_loss

    x, _, a, _ = batch(B=2, seed=3)  # x[0]: not spread out by batch()
    mapped = x[0] * 0.5 + 1.0
    ref = monge_gap(x[0], mapped, a[0], eps=1.0, tol=1e-9, backend=backend)
    assert torch.equal(
        monge_gap(x[0], mapped, a[0], eps=1.0, tol=1e-9, backend=backend, sync=False), ref
    )
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(6, 13, generator=g), torch.randn(6, 13, generator=g)
    ref = sinkhorn_kd_loss(s, t)
    assert torch.equal(sinkhorn_kd_loss(s, t, sync=False), ref)
    with pytest.raises(divkit.Error, match="sinkhorn_kd_loss: sync must be a bool"):
        sinkhorn_kd_loss(s, t, sync="off")
