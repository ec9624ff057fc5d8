"""Bad input to divkit.ot found by a differential hunt against POT: each case raises divkit.Error
naming the public function and the argument the caller passed (not an internal name)."""

from __future__ import annotations

import pytest
import torch

import divkit
from divkit import ot as dot

D = torch.float64


def _clouds(n=5, m=4, d=2):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=g, dtype=D), torch.randn(m, d, generator=g, dtype=D)


@pytest.mark.parametrize("name", ["return_plan", "symmetric"])
def test_sinkhorn_flags_must_be_bools(name):
    # bool("no") is True: a string used to turn the option on silently.
    x, y = _clouds()
    with pytest.raises(divkit.Error, match=f"sinkhorn: {name} must be a bool, got str"):
        dot.sinkhorn(x, y, eps=0.1, **{name: "no"})


def test_sinkhorn_scalar_rho_error_names_rho():
    x, y = _clouds()
    for bad in (-1.0, 0.0):
        with pytest.raises(divkit.Error, match=r"sinkhorn: rho must be > 0 \(\+inf: balanced\)"):
            dot.sinkhorn(x, y, eps=0.1, rho=bad)
    with pytest.raises(divkit.Error, match=r"sinkhorn: rho_b must be > 0"):
        dot.sinkhorn(x, y, eps=0.1, rho=(1.0, -2.0))


def test_sinkhorn_dimension_mismatch_reports_the_callers_shapes():
    # Unbatched clouds were reported with the internal batch of one: "[1, *, 2], got [1, 4, 3]".
    x, _ = _clouds()
    y = torch.randn(4, 3, dtype=D)
    with pytest.raises(
        divkit.Error,
        match=r"sinkhorn: y must have shape \[m, 2\] \(x's dimension d = 2\), got \[4, 3\]",
    ):
        dot.sinkhorn(x, y, eps=0.1)
    with pytest.raises(
        divkit.Error,
        match=r"sinkhorn: y must have shape \[1, m, 2\] \(x's dimension d = 2\), got \[1, 4, 3\]",
    ):
        dot.sinkhorn(x[None], y[None], eps=0.1)


def test_monge_gap_names_mapped_not_y():
    x, _ = _clouds()
    mapped = x + 0.1
    with pytest.raises(divkit.Error, match="monge_gap: mapped must have x's dtype float64"):
        dot.monge_gap(x, mapped.float(), eps=0.1)
    bad = mapped.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(divkit.Error, match="monge_gap: mapped has NaN or inf values"):
        dot.monge_gap(x, bad, eps=0.1)


def test_sinkhorn_kd_loss_bad_logits_name_the_logits():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(4, 6, generator=g, dtype=D)
    t = torch.randn(4, 6, generator=g, dtype=D)
    with pytest.raises(
        divkit.Error, match="sinkhorn_kd_loss: teacher_logits must have student_logits' dtype"
    ):
        dot.sinkhorn_kd_loss(s, t.float())
    for name in ("student_logits", "teacher_logits"):
        for v in (float("nan"), float("inf")):
            args = {"student_logits": s.clone(), "teacher_logits": t.clone()}
            args[name][2, 3] = v
            with pytest.raises(divkit.Error, match=f"sinkhorn_kd_loss: {name} has NaN or \\+inf"):
                dot.sinkhorn_kd_loss(**args)
        args = {"student_logits": s.clone(), "teacher_logits": t.clone()}
        args[name][1] = float("-inf")
        with pytest.raises(divkit.Error, match=f"sinkhorn_kd_loss: {name}: row 1 is all -inf"):
            dot.sinkhorn_kd_loss(**args)
    with pytest.raises(divkit.Error, match="sinkhorn_kd_loss: student_logits must have at least"):
        dot.sinkhorn_kd_loss(s[:0], t[:0])
    # A masked (-inf) entry that leaves the row a distribution is allowed.
    sm = s.clone()
    sm[0, 0] = float("-inf")
    assert torch.isfinite(dot.sinkhorn_kd_loss(sm, t))


def test_mmd_kernel_must_be_a_string():
    # It reached the binding, whose TypeError listed nanobind's signature instead.
    x, y = _clouds()
    with pytest.raises(divkit.Error, match="mmd: kernel must be a str, got NoneType"):
        dot.mmd(x, y, kernel=None)


@pytest.mark.parametrize("backend", ["core", "torch"])
def test_sparse_ot_mass_mismatch_within_the_check_converges(backend):
    # sum a - sum b within the accepted 1e-6 (float32 rounding) is a marginal error no alpha can
    # remove: with tol below it, alpha ran off to -1e13 and reg_cost to 1e6 (0.27 here).
    g = torch.Generator().manual_seed(2)
    a = torch.rand(6, generator=g, dtype=D) + 0.1
    b = torch.rand(5, generator=g, dtype=D) + 0.1
    a, b = a / a.sum(), b / b.sum()
    C = torch.rand(6, 5, generator=g, dtype=D)
    ref = dot.sparse_ot(a, b, C, gamma=0.1, tol=1e-10, backend=backend)
    got = dot.sparse_ot(a, b * (1 + 3e-7), C, gamma=0.1, tol=1e-9, backend=backend)
    assert bool(got.converged)
    assert abs(float(got.reg_cost) - float(ref.reg_cost)) < 1e-8
    torch.testing.assert_close(got.alpha, ref.alpha, atol=1e-6, rtol=0)
    # float32 weights whose sums round apart.
    a32, b32, C32 = a.float(), b.float(), C.float()
    assert float(a32.double().sum()) != float(b32.double().sum())
    got32 = dot.sparse_ot(a32, b32, C32, gamma=0.1, tol=1e-9, backend=backend)
    assert bool(got32.converged)
    assert abs(float(got32.reg_cost) - float(ref.reg_cost)) < 1e-5


@pytest.mark.parametrize("backend", ["core", "torch"])
@pytest.mark.parametrize("batched", [False, True])
def test_sinkhorn_plan_modified_in_place_is_caught_in_backward(backend, batched):
    # The returned plan is the cost's gradient: changing it in place silently changed cost.grad.
    g = torch.Generator().manual_seed(4)
    C = torch.rand(5, 4, generator=g, dtype=D)
    C = (C[None].repeat(2, 1, 1) if batched else C).requires_grad_()
    res = dot.sinkhorn(None, None, cost=C, eps=0.1, return_plan=True, backend=backend)
    plan = res.plan.detach().clone()
    res.reg_cost.sum().backward(retain_graph=True)
    torch.testing.assert_close(C.grad, plan, rtol=0, atol=0)
    res.plan.mul_(2)
    with pytest.raises(RuntimeError, match="sinkhorn: the returned plan .* modified in place"):
        res.reg_cost.sum().backward()


@pytest.mark.parametrize("backend", ["core", "torch"])
def test_sparse_ot_outputs_modified_in_place_leave_the_gradients(backend):
    # The returned alpha and plan were the gradients of a and cost: zeroing them in place
    # changed a.grad and cost.grad.
    g = torch.Generator().manual_seed(5)
    a = torch.rand(6, generator=g, dtype=D) + 0.1
    b = torch.rand(5, generator=g, dtype=D) + 0.1
    a, b = (a / a.sum()).requires_grad_(), b / b.sum()
    C = torch.rand(6, 5, generator=g, dtype=D, requires_grad=True)
    res = dot.sparse_ot(a, b, C, gamma=0.1, backend=backend)
    alpha, plan = res.alpha.detach().clone(), res.plan.detach().to_dense()
    res.alpha.zero_()
    res.plan.values().zero_()
    res.reg_cost.backward()
    torch.testing.assert_close(a.grad, alpha, rtol=0, atol=0)
    torch.testing.assert_close(C.grad, plan, rtol=0, atol=0)


def test_monge_gap_p1_gradient_finite_at_a_fixed_point_of_the_map():
    # |x_i - T(x_i)| through torch.sqrt has an infinite derivative at 0: a map that leaves a point
    # where it is gave NaN gradients (for that point, in x and mapped). The subgradient 0 there
    # is the one sinkhorn's p = 1 gradient uses.
    g = torch.Generator().manual_seed(6)
    x = torch.randn(6, 2, generator=g, dtype=D)
    mapped = x + 0.3 * torch.randn(6, 2, generator=g, dtype=D)
    mapped[2] = x[2]
    X, Mp = x.clone().requires_grad_(), mapped.clone().requires_grad_()
    gap = dot.monge_gap(X, Mp, eps=0.1, p=1, tol=1e-9, max_iter=2000, warn=False)
    gap.backward()
    assert torch.isfinite(X.grad).all() and torch.isfinite(Mp.grad).all()
    # Row 2: the displacement term contributes 0, so the gradient is minus the OT term's.
    X2, M2 = x.clone().requires_grad_(), mapped.clone().requires_grad_()
    w = torch.full((6,), 1 / 6, dtype=D)
    dot.sinkhorn(
        X2, M2, w, w, eps=0.1, p=1, tol=1e-9, max_iter=2000, warn=False
    ).reg_cost.backward()
    torch.testing.assert_close(Mp.grad[2], -M2.grad[2], rtol=0, atol=1e-12)
    torch.testing.assert_close(X.grad[2], -X2.grad[2], rtol=0, atol=1e-12)


def test_lightsb_dtypes():
    # Mixed dtypes reached torch's matmul ("expected m1 and m2 to have the same dtype"), naming
    # no argument; LightSB.objective alone did not cast the data to the parameters' dtype as
    # fit, conditional and sample do.
    from divkit import lightsb

    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(5, 2, generator=g), torch.randn(4, 2, generator=g)
    la, r, ls = torch.zeros(3), torch.randn(3, 2, generator=g), torch.zeros(3, 2)
    for name in ("x", "y", "log_alpha", "log_s"):
        args = dict(x=x, y=y, log_alpha=la, r=r, log_s=ls)
        args[name] = args[name].double()
        with pytest.raises(
            divkit.Error,
            match=f"lightsb_objective: {name} must have r's dtype float32, got float64",
        ):
            lightsb.lightsb_objective(**args, epsilon=0.1)
    model = lightsb.LightSB(2, 3, epsilon=0.1, dtype=D)
    want = model.objective(x.double(), y.double())
    torch.testing.assert_close(model.objective(x, y), want.detach(), rtol=0, atol=0)


def test_unbalanced_sinkhorn_divergence_has_the_mass_term():
    # Sejourne et al. 2019 (and GeomLoss): with rho, S = OT(a, b) - OT(a, a) / 2 - OT(b, b) / 2
    # + eps / 2 (m(a) - m(b))^2; without the last term S was negative (down to -232 here) for
    # measures of different masses on the same points, against the documented S >= 0.
    g = torch.Generator().manual_seed(8)
    x = torch.randn(8, 2, generator=g, dtype=D)
    y = torch.randn(6, 2, generator=g, dtype=D)
    a = torch.full((8,), 1 / 8, dtype=D)
    kw = dict(tol=1e-12, max_iter=10000)
    for eps, rho, s in ((0.1, 0.1, 10.0), (1.0, 1.0, 2.0), (10.0, 10.0, 10.0), (10.0, 1.0, 0.5)):
        assert float(dot.sinkhorn_divergence(x, x, a, a * s, eps=eps, rho=rho, **kw)) >= 0
        b = torch.rand(6, generator=g, dtype=D) * s / 3
        got = dot.sinkhorn_divergence(x, y, a, b, eps=eps, rho=rho, **kw)
        ot = lambda u, v, wu, wv: dot.sinkhorn(u, v, wu, wv, eps=eps, rho=rho, **kw).reg_cost
        want = ot(x, y, a, b) - ot(x, x, a, a) / 2 - ot(y, y, b, b) / 2
        want = want + eps / 2 * (a.sum() - b.sum()) ** 2
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    # Batched, and the term's gradient in the weights.
    A = a.expand(2, 8).clone().requires_grad_()
    B = (a[:6] * torch.tensor([[1.0], [3.0]], dtype=D)).requires_grad_()
    f = lambda A, B: dot.sinkhorn_divergence(
        x.expand(2, 8, 2), y.expand(2, 6, 2), A, B, eps=0.5, rho=1.0, **kw
    )
    assert torch.autograd.gradcheck(f, (A, B), atol=1e-6)


def test_sinkhorn_divergence_options_it_cannot_take_are_named():
    # An unequal rho pair was reported as "symmetric needs rho_a equal to rho_b" (symmetric is set
    # inside), and symmetric=... as a TypeError about duplicated keyword arguments.
    x, y = _clouds()
    for rho in ((1.0, 2.0), (1.0, float("inf"))):
        with pytest.raises(
            divkit.Error, match=r"sinkhorn_divergence: rho must be one number or a pair of equal"
        ):
            dot.sinkhorn_divergence(x, y, eps=0.1, rho=rho)
    with pytest.raises(
        divkit.Error, match="sinkhorn_divergence: symmetric is set by sinkhorn_divergence"
    ):
        dot.sinkhorn_divergence(x, y, eps=0.1, symmetric=False)
    # An equal pair is the number.
    torch.testing.assert_close(
        dot.sinkhorn_divergence(x, y, eps=0.1, rho=(2.0, 2.0)),
        dot.sinkhorn_divergence(x, y, eps=0.1, rho=2.0),
    )


def test_sinkhorn_huge_cost_cache_budget_means_cache_everything():
    # cost_cache_mib=1e30 passed the check (finite, >= 0) and overflowed the core's int64 byte
    # count: a TypeError listing nanobind's signature.
    x, y = _clouds()
    big = dot.sinkhorn(x, y, eps=0.1, cost_cache_mib=1e30)
    ref = dot.sinkhorn(x, y, eps=0.1, cost_cache_mib=64.0)
    assert float(big.reg_cost) == float(ref.reg_cost)
