"""A -inf bias entry masks that vocabulary entry in the fused linear heads (padded vocabulary
rows): its logit is -inf, a masked entry of probability 0, on both routes (the C++ core and the
PyTorch chunk loop that CUDA tensors and backend="torch" take), with logit soft-capping too
(softcap(-inf) = -inf). Both routes give the same losses, statistics and gradients (checked on
CPU tensors, and against float64 autograd references that drop the masked entries); NaN / +inf
bias entries (named by argument and index) and rows whose logits are all -inf raise on both."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import divkit

NEG = float("-inf")
MASKED = (3, 7, 12)


def _data(n=9, h=8, v=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g)
    w = torch.randn(v, h, generator=g)
    b = torch.randn(v, generator=g)
    b[list(MASKED)] = NEG
    lab = torch.randint(0, v, (n,), generator=g)
    for m in MASKED:
        lab[lab == m] = 0
    lab[2] = -100
    return x, w, b, lab


def _grads(fn, backend, *xs):
    xs = [x.clone().requires_grad_(True) for x in xs]
    out = fn(backend, *xs)
    outs = out if isinstance(out, tuple) else (out,)
    up = sum(
        (o.double() * (k + 1) * 0.3).sum() for k, o in enumerate(outs) if o.is_floating_point()
    )
    up.backward()
    return [o.detach() for o in outs], [x.grad for x in xs]


def _close(a, b, tol, what):
    assert a.shape == b.shape, what
    assert torch.equal(torch.isfinite(a), torch.isfinite(b)), what
    f = torch.isfinite(b)
    if f.any():
        err = (a[f].double() - b[f].double()).abs().max().item()
        scale = b[f].double().abs().max().item() + 1e-6
        assert err <= tol * scale, f"{what}: {err:.3g} > {tol:g} * {scale:.3g}"


def _both(fn, *xs):
    got = {be: _grads(fn, be, *xs) for be in ("core", "torch")}
    (oc, gc), (ot, gt) = got["core"], got["torch"]
    for k, (a, b) in enumerate(zip(ot, oc)):
        _close(a.float(), b.float(), 2e-5, f"output {k}")
    for k, (a, b) in enumerate(zip(gt, gc)):
        assert torch.isfinite(b).all(), f"core gradient {k} not finite"
        _close(a, b, 3e-5, f"gradient {k}")
    return got["core"]


@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"return_stats": True},
        {"lse_square_scale": 1e-2, "reduction": "none"},
        {"softcap": 4.0},
        {"reduction": "sum", "chunk_size": 4},
    ],
)
def test_cross_entropy_masked_bias_same_on_both_routes(opts):
    x, w, b, lab = _data()

    def f(be, x, w, b):
        return divkit.fused_linear_cross_entropy(x, w, lab, bias=b, backend=be, **opts)

    outs, grads = _both(f, x, w, b)
    assert torch.isfinite(outs[0]).all()
    # The masked entries take no gradient: their probability is 0 (softcap keeps them at -inf,
    # where the derivative of tanh is 0).
    assert torch.equal(grads[2][list(MASKED)], torch.zeros(len(MASKED)))
    if not opts:
        # float64 reference: PyTorch's cross-entropy of the masked logits.
        xd, wd, bd = (t.double().requires_grad_(True) for t in (x, w, b))
        ref = F.cross_entropy(xd @ wd.T + bd, lab)
        (0.3 * ref).backward()  # the upstream weight _grads gives output 0
        _close(outs[0].double(), ref.detach().reshape(outs[0].shape), 1e-5, "loss vs fp64")
        for k, (g, r) in enumerate(zip(grads, (xd.grad, wd.grad, bd.grad))):
            _close(g.double(), r, 1e-5, f"gradient {k} vs fp64")
    if opts.get("return_stats"):
        # The entropy skips the masked entries (0 log 0 = 0) on both routes.
        z = (x.double() @ w.double().T + b.double()).log_softmax(-1)
        ent = -(z.exp() * torch.where(torch.isinf(z), 0.0, z)).sum(-1)
        ent[lab == -100] = 0.0
        _close(outs[2].double(), ent, 1e-5, "entropy vs fp64")


def test_logprobs_masked_bias_same_on_both_routes():
    x, w, b, lab = _data(seed=1)

    def f(be, x, w, b):
        r = divkit.fused_linear_logprobs(
            x,
            w,
            lab,
            bias=b,
            temperature=0.7,
            return_entropy=True,
            topk=3,
            return_log_sum_sq_probs=True,
            return_is_top1=True,
            backend=be,
        )
        return tuple(r)

    outs, grads = _both(f, x, w, b)
    lp = (x.double() @ w.double().T + b.double()).div(0.7).log_softmax(-1)
    want = lp.gather(-1, lab.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    want[lab == -100] = 0.0
    _close(outs[0].double(), want, 1e-5, "logprobs vs fp64")
    assert torch.equal(grads[2][list(MASKED)], torch.zeros(len(MASKED)))


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_divergence_masked_bias_same_on_both_routes(kind):
    x, w, b, lab = _data(seed=2)
    g = torch.Generator().manual_seed(5)
    tx, tw, tb = torch.randn(9, 6, generator=g), torch.randn(13, 6, generator=g), b.clone()
    tb[~torch.isinf(b)] = torch.randn(13 - len(MASKED), generator=g)

    def f(be, x, w, b, tx, tw, tb):
        return divkit.fused_linear_divergence(
            x,
            w,
            tx,
            tw,
            kind,
            student_bias=b,
            teacher_bias=tb,
            labels=lab,
            hard_weight=0.4,
            temperature=1.5,
            backend=be,
        )

    outs, grads = _both(f, x, w, b, tx, tw, tb)
    assert torch.isfinite(outs[0]).all()
    assert torch.equal(grads[2][list(MASKED)], torch.zeros(len(MASKED)))


def test_sparse_divergence_masked_bias_same_on_both_routes():
    x, w, b, lab = _data(seed=3)
    g = torch.Generator().manual_seed(4)
    idx = torch.stack([torch.randperm(10, generator=g)[:4] for _ in range(x.shape[0])])
    idx = torch.where(idx == 3, 11, torch.where(idx == 7, 10, idx))  # no masked entry
    lp = torch.log_softmax(torch.randn(x.shape[0], 4, generator=g), -1) - 0.05

    def f(be, x, w, b):
        return divkit.fused_linear_sparse_divergence(
            x, w, idx, lp, student_bias=b, labels=lab, backend=be
        )

    outs, _ = _both(f, x, w, b)
    assert torch.isfinite(outs[0]).all()


def _raises_on_both(call, *patterns):
    for be in ("core", "torch"):
        with pytest.raises(divkit.Error) as e:
            call(be)
        for p in patterns:
            assert p in str(e.value), (be, str(e.value))


def _kept(b, lab):
    """The unmasked vocabulary entries (bool [V]) and the labels renumbered among them."""
    keep = ~torch.isinf(b)
    new = torch.cumsum(keep.long(), 0) - 1
    return keep, torch.where(lab >= 0, new[lab.clamp(min=0)], lab)


def _ce_reference(x, w, b, lab, cap, zsq=0.0, reduction="mean", stats=False, eps=0.0):
    """float64 autograd reference of the (softcapped when cap) cross-entropy on the unmasked
    entries only (the masked rows of weight and bias take no part, so their gradient is 0; label
    smoothing eps spreads over the V' unmasked entries): (outputs, gradients of x, w, b) with the
    loss's upstream weight in _grads."""
    keep, kl = _kept(b, lab)
    xd, wd, bd = (t.double().requires_grad_(True) for t in (x, w, b))
    z = xd @ wd[keep].T + bd[keep]
    if cap:
        z = cap * torch.tanh(z / cap)
    lse = torch.logsumexp(z, -1)
    act = kl >= 0
    zy = z.gather(-1, kl.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    zero = torch.zeros_like(lse)
    smooth = (1.0 - eps) * (lse - zy) + eps * (lse - z.mean(-1))
    row = torch.where(act, smooth + zsq * lse**2, zero)
    loss = row if reduction == "none" else row.sum().reshape(1)
    if reduction == "mean":
        loss = loss / act.sum()
    outs = (loss,)
    if stats:
        lp = z.log_softmax(-1)
        ent = -(lp.exp() * lp).sum(-1)
        outs += (torch.where(act, zy - lse, zero), torch.where(act, ent, zero))
    (0.3 * outs[0]).sum().backward()  # the statistics are not differentiable
    return [o.detach() for o in outs], [xd.grad, wd.grad, bd.grad]


@pytest.mark.parametrize(
    "opts",
    [
        {"softcap": 4.0},
        {"softcap": 1.5, "return_stats": True},
        {"softcap": 8.0, "lse_square_scale": 1e-2, "reduction": "none"},
        {"softcap": 2.0, "reduction": "sum", "chunk_size": 4, "return_stats": True},
    ],
)
def test_cross_entropy_softcap_keeps_masked_entries_masked(opts):
    x, w, b, lab = _data(seed=6)
    x = x * 3  # logits of a few units: the cap bends them

    def f(be, x, w, b):
        return divkit.fused_linear_cross_entropy(x, w, lab, bias=b, backend=be, **opts)

    outs, grads = _both(f, x, w, b)  # the routes agree, and the core's gradients are finite
    want, want_g = _ce_reference(
        x,
        w,
        b,
        lab,
        opts["softcap"],
        zsq=opts.get("lse_square_scale", 0.0),
        reduction=opts.get("reduction", "mean"),
        stats=opts.get("return_stats", False),
    )
    for k, (o, r) in enumerate(zip(outs, want)):
        _close(o.double(), r.reshape(o.shape), 1e-5, f"output {k} vs fp64")
    for k, (g, r) in enumerate(zip(grads, want_g)):
        _close(g.double(), r, 1e-5, f"gradient {k} vs fp64")
    # Exactly zero for the masked entries' bias and weight rows (the factor of tanh at -inf).
    assert torch.equal(grads[2][list(MASKED)], torch.zeros(len(MASKED)))
    assert torch.equal(grads[1][list(MASKED)], torch.zeros(len(MASKED), x.shape[1]))


@pytest.mark.parametrize(
    "opts",
    [
        {"label_smoothing": 0.1},
        {"label_smoothing": 0.2, "softcap": 4.0},
        {"label_smoothing": 0.1, "return_stats": True, "reduction": "sum"},
        {"label_smoothing": 0.3, "softcap": 2.0, "lse_square_scale": 1e-2, "reduction": "none"},
        {"label_smoothing": 0.05, "chunk_size": 4, "return_stats": True},
        {"label_smoothing": 0.1, "softcap": 8.0, "reduction": "sum", "chunk_size": 2},
    ],
)
def test_cross_entropy_label_smoothing_spreads_over_unmasked_entries(opts):
    # Label smoothing with masked entries: the target eps / V' on each of the V' unmasked
    # entries and 0 on the masked ones (not in the vocabulary), so the loss is finite (PyTorch's
    # cross-entropy over every entry gives +inf) and the masked rows of the weight and the bias
    # take exactly no gradient. Both routes, against float64 on the unmasked entries only.
    x, w, b, lab = _data(seed=11)  # lab[2] is ignore_index
    x = x * 2

    def f(be, x, w, b):
        return divkit.fused_linear_cross_entropy(x, w, lab, bias=b, backend=be, **opts)

    outs, grads = _both(f, x, w, b)
    assert torch.isfinite(outs[0]).all()
    want, want_g = _ce_reference(
        x,
        w,
        b,
        lab,
        opts.get("softcap"),
        zsq=opts.get("lse_square_scale", 0.0),
        reduction=opts.get("reduction", "mean"),
        stats=opts.get("return_stats", False),
        eps=opts["label_smoothing"],
    )
    for k, (o, r) in enumerate(zip(outs, want)):
        _close(o.double(), r.reshape(o.shape), 1e-5, f"output {k} vs fp64")
    for k, (g, r) in enumerate(zip(grads, want_g)):
        _close(g.double(), r, 1e-5, f"gradient {k} vs fp64")
    assert torch.equal(grads[2][list(MASKED)], torch.zeros(len(MASKED)))
    assert torch.equal(grads[1][list(MASKED)], torch.zeros(len(MASKED), x.shape[1]))


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_cross_entropy_label_smoothing_masked_on_the_core_rows_route(monkeypatch, softcap):
    # The PyTorch chunk loop with divkit's row kernel as its row step (what CUDA tensors take on
    # a CUDA build), here on CPU tensors: label smoothing with masked entries runs in the kernel
    # (smooth_unmasked: spread over the unmasked entries), and matches the C++ core.
    from divkit import _device
    from divkit.backends import torch_ops

    real = _device.route
    rows = []
    kernel = []
    real_rows = torch_ops._label_rows

    def spy(*a, **k):
        kernel.append(k["smooth_unmasked"])
        return real_rows(*a, **k)

    monkeypatch.setattr(torch_ops, "_label_rows", spy)

    def route(fn, op, backend_name, tensors):
        r = real(fn, op, backend_name, tensors)
        if backend_name == "torch" and op in _device.CORE_ROWS:
            rows.append(op)
            return r._replace(rows="core")
        return r

    monkeypatch.setattr(_device, "route", route)
    x, w, b, lab = _data(seed=12)
    opts = {"label_smoothing": 0.15, "softcap": softcap, "return_stats": True}

    def f(be, x, w, b):
        return divkit.fused_linear_cross_entropy(x, w, lab, bias=b, backend=be, **opts)

    outs, grads = _both(f, x, w, b)
    assert rows, "the core-rows route was not taken"
    assert kernel and all(kernel), "label smoothing with masked entries left the kernel's rows"
    want, want_g = _ce_reference(x, w, b, lab, softcap, stats=True, eps=0.15)
    for k, (o, r) in enumerate(zip(outs, want)):
        _close(o.double(), r.reshape(o.shape), 1e-5, f"output {k} vs fp64")
    for k, (g, r) in enumerate(zip(grads, want_g)):
        _close(g.double(), r, 1e-5, f"gradient {k} vs fp64")


def test_label_rows_softcap_keeps_masked_entries_masked():
    # The label heads' row kernel itself (the row step of the PyTorch route on CUDA tensors, and
    # of the core's loops): every statistic and the gradient of a softcapped row with masked
    # entries, against float64 on the unmasked entries.
    from divkit import _C

    g = torch.Generator().manual_seed(8)
    n, v, cap, t = 6, 37, 2.5, 0.8
    x = torch.randn(n, v, generator=g) * 4
    x[:, 3::4] = NEG
    lab = torch.tensor([0, 1, 2, 5, 6, -100])
    stats = {k: torch.zeros(n, dtype=torch.float64) for k in ("lse", "z_label", "entropy")}
    more = {k: torch.zeros(n, dtype=torch.float64) for k in ("topk_mass", "log_sum_sq", "is_top1")}
    coef = {
        "coef_a0": torch.full((n,), 0.6, dtype=torch.float64),
        "coef_b": torch.full((n,), -0.9, dtype=torch.float64),
        "coef_c": torch.full((n,), -0.02, dtype=torch.float64),
    }
    z = x.clone()
    _C.label_rows(z, lab, **stats, **more, **coef, temperature=t, softcap=cap, topk=v)
    keep = ~torch.isinf(x[0])
    zd = (cap * torch.tanh(x[:, keep].double() / cap) / t).requires_grad_(True)
    lp = zd.log_softmax(-1)
    new = torch.cumsum(keep.long(), 0) - 1
    act = lab >= 0
    y = new[lab.clamp(min=0)]
    p = lp.exp()
    for k, want in (
        ("lse", torch.logsumexp(zd, -1)),
        ("z_label", zd.gather(-1, y.unsqueeze(-1)).squeeze(-1)),
        ("entropy", -(p * lp).sum(-1)),
    ):
        _close(stats[k][act], want.detach()[act], 1e-6, k)
    _close(more["topk_mass"][act], torch.ones(int(act.sum()), dtype=torch.float64), 1e-6, "mass")
    _close(more["log_sum_sq"][act], (p * p).sum(-1).log().detach()[act], 1e-5, "log_sum_sq")
    top1 = (zd.argmax(-1) == y).double()
    assert torch.equal(more["is_top1"][act], top1[act])
    # dL/dz = a p + b 1[y] + c per active row, through z = softcap(x) / T.
    xd = x[:, keep].double().requires_grad_(True)
    zz = cap * torch.tanh(xd / cap) / t
    pp = zz.softmax(-1).detach()
    dz = 0.6 * pp - 0.02 - 0.9 * torch.nn.functional.one_hot(y, int(keep.sum())).double()
    zz.backward(torch.where(act.unsqueeze(-1), dz, 0.0))
    assert torch.isfinite(z).all()
    assert torch.equal(z[:, ~keep], torch.zeros(n, int((~keep).sum())))
    _close(z[:, keep].double(), xd.grad, 2e-5, "gradient")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_nan_or_posinf_bias_raises_on_both_routes(bad, softcap):
    # Both routes name the public function, the bias argument and the index (not the logits of
    # a token, which the bad entry spoils).
    x, w, b, lab = _data()
    b[5] = bad
    msg = "bias contains NaN or +inf at index 5"
    _raises_on_both(
        lambda be: divkit.fused_linear_cross_entropy(
            x, w, lab, bias=b, softcap=softcap, backend=be
        ),
        "fused_linear_cross_entropy: " + msg,
    )
    _raises_on_both(
        lambda be: divkit.fused_linear_logprobs(x, w, lab, bias=b, backend=be),
        "fused_linear_logprobs: " + msg,
    )
    _, _, ok, _ = _data()
    for who, sb, tb in (("student", b, ok), ("teacher", ok, b)):
        _raises_on_both(
            lambda be: divkit.fused_linear_divergence(
                x, w, x, w, student_bias=sb, teacher_bias=tb, labels=lab, backend=be
            ),
            f"fused_linear_divergence: {who}_" + msg,
        )
    g = torch.Generator().manual_seed(4)
    idx = torch.stack([torch.randperm(10, generator=g)[:4] for _ in range(x.shape[0])])
    lp = torch.log_softmax(torch.randn(x.shape[0], 4, generator=g), -1) - 0.05
    _raises_on_both(
        lambda be: divkit.fused_linear_sparse_divergence(
            x, w, idx, lp, student_bias=b, labels=lab, backend=be
        ),
        "fused_linear_sparse_divergence: student_" + msg,
    )


def test_all_masked_rows_raise_on_both_routes():
    x, w, b, lab = _data()
    full = torch.full_like(b, NEG)
    _raises_on_both(
        lambda be: divkit.fused_linear_cross_entropy(x, w, lab, bias=full, backend=be),
        "fused_linear_cross_entropy",
        "all -inf",
    )
    _raises_on_both(
        lambda be: divkit.fused_linear_logprobs(x, w, lab, bias=full, backend=be),
        "fused_linear_logprobs",
        "all -inf",
    )
    for who, sb, tb in (("student", full, b), ("teacher", b, full)):
        _raises_on_both(
            lambda be: divkit.fused_linear_divergence(
                x, w, x, w, student_bias=sb, teacher_bias=tb, labels=lab, backend=be
            ),
            "fused_linear_divergence",
            f"{who}_logits row 0 has every logit -inf",
        )
