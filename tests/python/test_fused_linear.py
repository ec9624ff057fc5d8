"""Fused linear-head losses against the materialized computation: full logits in float64, then the
float64 reference divergence (divkit_reference) or torch's own cross_entropy / log_softmax, with
autograd for the gradients of hidden states, weights and biases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import divkit
import divkit_reference as ref
from conftest import KIND_CASES, case_id


def _head(n, v, h, *, seed, bias=True, scale=1.0, dtype=torch.float32, lead=None):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    if lead is not None:
        hidden = hidden.reshape(*lead, h)
    weight = (torch.randn(v, h, generator=g) * scale / h**0.5).to(dtype)
    b = (0.5 * torch.randn(v, generator=g)).to(dtype) if bias else None
    return hidden, weight, b


def _labels(n, v, *, seed=0, ignore_every=5):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, v, (n,), generator=g)
    y[::ignore_every] = -100
    return y


def _leaf64(*xs):
    return [None if x is None else x.detach().double().requires_grad_(True) for x in xs]


def _logits(h, w, b):
    z = h.reshape(-1, h.shape[-1]) @ w.T
    return z if b is None else z + b


def _grads(loss, xs):
    xs = [x for x in xs if x is not None]
    return torch.autograd.grad(loss, xs)


def _close(got, want, tol):
    scale = want.abs().max().item() + 1e-3
    err = (got.double() - want).abs().max().item()
    assert err <= tol * scale, f"max error {err:.3g} > {tol:g} * {scale:.3g}"


@pytest.mark.parametrize("case", KIND_CASES, ids=case_id)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_divergence_matches_materialized(case, reduction):
    kind, params = case
    n, v, hs, ht = 37, 61, 24, 40
    sh, sw, sb = _head(n, v, hs, seed=1)
    th, tw, tb = _head(n, v, ht, seed=2, scale=2.0)
    labels = _labels(n, v)
    leaves = [x.clone().requires_grad_(True) for x in (sh, sw, sb)]
    out = divkit.fused_linear_divergence(
        leaves[0],
        leaves[1],
        th,
        tw,
        kind,
        student_bias=leaves[2],
        teacher_bias=tb,
        labels=labels,
        chunk_size=8,
        reduction=reduction,
        temperature=1.5,
        **params,
    )
    r = _leaf64(sh, sw, sb)
    want = ref.loss(
        _logits(*r),
        _logits(th.double(), tw.double(), tb.double()),
        kind,
        labels=labels,
        reduction=reduction,
        temperature=1.5,
        **params,
    )
    upstream = torch.linspace(-1, 2, n) if reduction == "none" else torch.tensor(1.7)
    _close(out.detach(), want.detach(), 2e-5)
    (out * upstream).sum().backward()
    for got, exp in zip((x.grad for x in leaves), _grads((want * upstream.double()).sum(), r)):
        _close(got, exp, 3e-5)


def test_hard_and_soft_terms_teacher_grads_and_lead_dims():
    # loss = hard_weight * CE + soft_weight * JSD; gradients reach the teacher too (online KD).
    b, t, v, hs, ht = 3, 11, 47, 16, 20
    sh, sw, sb = _head(b * t, v, hs, seed=3, lead=(b, t))
    th, tw, tb = _head(b * t, v, ht, seed=4, lead=(b, t))
    labels = _labels(b * t, v, seed=1).reshape(b, t)
    xs = [x.clone().requires_grad_(True) for x in (sh, sw, sb, th, tw, tb)]
    out = divkit.fused_linear_divergence(
        xs[0],
        xs[1],
        xs[3],
        xs[4],
        "jsd",
        beta=0.3,
        student_bias=xs[2],
        teacher_bias=xs[5],
        labels=labels,
        hard_weight=0.4,
        soft_weight=0.6,
        chunk_size=5,
    )
    r = _leaf64(sh, sw, sb, th, tw, tb)
    zs, zt = _logits(*r[:3]), _logits(*r[3:])
    flat = labels.reshape(-1)
    want = 0.6 * ref.loss(zs, zt, "jsd", beta=0.3, labels=flat) + 0.4 * F.cross_entropy(zs, flat)
    _close(out.detach(), want.detach(), 2e-5)
    out.backward()
    for got, exp in zip((x.grad for x in xs), _grads(want, r)):
        _close(got, exp, 3e-5)


def test_teacher_token_ids_truncate_and_map():
    n, vs, vt, h = 13, 29, 40, 12
    sh, sw, _ = _head(n, vs, h, seed=5, bias=False)
    th, tw, tb = _head(n, vt, h, seed=6)
    for ids in (
        torch.arange(vs),
        torch.randperm(vt, generator=torch.Generator().manual_seed(0))[:vs],
    ):
        out = divkit.fused_linear_divergence(
            sh, sw, th, tw, "reverse_kl", teacher_bias=tb, teacher_token_ids=ids
        )
        zt = (th.double() @ tw.double().T + tb.double())[:, ids]
        want = ref.loss(sh.double() @ sw.double().T, zt, "reverse_kl")
        _close(out, want, 2e-5)
    with pytest.raises(divkit.Error, match="vocabularies differ"):
        divkit.fused_linear_divergence(sh, sw, th, tw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_computed_in_fp32(dtype):
    # bf16/fp16 weights and hidden states: the result equals the fp32 computation on the same
    # (widened) values, so logits are never rounded to the low-precision dtype.
    n, v, h = 21, 50, 32
    sh, sw, _ = _head(n, v, h, seed=7, bias=False, dtype=dtype)
    th, tw, _ = _head(n, v, h, seed=8, bias=False, dtype=dtype)
    x = sh.clone().requires_grad_(True)
    low = divkit.fused_linear_divergence(x, sw, th, tw, "forward_kl")
    low.backward()
    y = sh.float().requires_grad_(True)
    full = divkit.fused_linear_divergence(y, sw.float(), th.float(), tw.float(), "forward_kl")
    full.backward()
    assert low.item() == full.item()
    assert x.grad.dtype == dtype
    assert torch.equal(x.grad, y.grad.to(dtype))


@pytest.mark.parametrize("n", [1, 1023])
def test_chunking_does_not_change_the_result(n):
    v, h = 123, 31
    sh, sw, sb = _head(n, v, h, seed=9)
    th, tw, tb = _head(n, v, h, seed=10)
    results = []
    for chunk in (None, 1, 7, 1000, 5000):
        w = sw.clone().requires_grad_(True)
        loss = divkit.fused_linear_divergence(
            sh, w, th, tw, "tvd", student_bias=sb, teacher_bias=tb, chunk_size=chunk
        )
        loss.backward()
        results.append((loss.item(), w.grad))
    for loss, g in results[1:]:
        assert abs(loss - results[0][0]) <= 1e-6 * (1 + abs(results[0][0]))
        _close(g, results[0][1].double(), 1e-5)


# ---- cross-entropy ---------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"label_smoothing": 0.1},
        {"lse_square_scale": 1e-3},
        {"softcap": 3.0, "label_smoothing": 0.05},
    ],
    ids=["plain", "smoothing", "zloss", "softcap"],
)
def test_cross_entropy_matches_torch(reduction, opts):
    n, v, h = 41, 73, 20
    hid, w, b = _head(n, v, h, seed=11, scale=3.0)
    labels = _labels(n, v, seed=2, ignore_every=4)
    xs = [x.clone().requires_grad_(True) for x in (hid, w, b)]
    out = divkit.fused_linear_cross_entropy(
        xs[0], xs[1], labels, xs[2], reduction=reduction, chunk_size=6, **opts
    )
    r = _leaf64(hid, w, b)
    z = _logits(*r)
    if "softcap" in opts:
        z = opts["softcap"] * torch.tanh(z / opts["softcap"])
    want = F.cross_entropy(
        z, labels, reduction=reduction, label_smoothing=opts.get("label_smoothing", 0.0)
    )
    if "lse_square_scale" in opts:
        lse2 = torch.logsumexp(z, -1) ** 2 * (labels != -100)
        extra = opts["lse_square_scale"] * lse2
        want = want + (
            extra
            if reduction == "none"
            else extra.sum() / ((labels != -100).sum() if reduction == "mean" else 1)
        )
    _close(out.detach(), want.detach(), 2e-5)
    upstream = torch.linspace(-1, 2, n) if reduction == "none" else torch.tensor(0.5)
    (out * upstream).sum().backward()
    for got, exp in zip((x.grad for x in xs), _grads((want * upstream.double()).sum(), r)):
        _close(got, exp, 3e-5)


def test_cross_entropy_stats_and_num_items():
    n, v, h = 30, 57, 16
    hid, w, b = _head(n, v, h, seed=12)
    labels = _labels(n, v, seed=3)
    loss, logprobs, entropy = divkit.fused_linear_cross_entropy(
        hid, w, labels, b, num_items_in_batch=100, return_stats=True
    )
    z = _logits(hid.double(), w.double(), b.double())
    lp = F.log_softmax(z, -1)
    mask = labels != -100
    _close(loss, F.cross_entropy(z, labels, reduction="sum") / 100, 2e-5)
    want_lp = torch.where(mask, lp.gather(-1, labels.clamp(min=0)[:, None])[:, 0], 0.0)
    _close(logprobs, want_lp, 2e-5)
    _close(entropy, torch.where(mask, -(lp.exp() * lp).sum(-1), 0.0), 2e-5)


# ---- log-probs -------------------------------------------------------------------------------


def test_logprobs_entropy_topk_and_backward():
    b, t, v, h = 2, 9, 83, 24
    hid, w, bias = _head(b * t, v, h, seed=13, lead=(b, t), scale=2.0)
    labels = _labels(b * t, v, seed=4, ignore_every=6).reshape(b, t)
    xs = [x.clone().requires_grad_(True) for x in (hid, w, bias)]
    res = divkit.fused_linear_logprobs(
        xs[0], xs[1], labels, xs[2], temperature=0.8, return_entropy=True, topk=5, chunk_size=4
    )
    r = _leaf64(hid, w, bias)
    lp = F.log_softmax(_logits(*r) / 0.8, -1)
    flat = labels.reshape(-1)
    mask = flat != -100
    want_lp = torch.where(mask, lp.gather(-1, flat.clamp(min=0)[:, None])[:, 0], 0.0)
    want_ent = torch.where(mask, -(lp.exp() * lp).sum(-1), 0.0)
    want_topk = torch.where(mask, lp.exp().topk(5, -1).values.sum(-1), 0.0)
    assert res.logprobs.shape == (b, t)
    _close(res.logprobs.reshape(-1), want_lp.detach(), 2e-5)
    _close(res.entropy.reshape(-1), want_ent.detach(), 2e-5)
    _close(res.topk_mass.reshape(-1), want_topk.detach(), 2e-5)
    gl, ge = torch.randn(b, t), torch.randn(b, t)
    ((res.logprobs * gl).sum() + (res.entropy * ge).sum()).backward()
    want = (want_lp * gl.reshape(-1).double()).sum() + (want_ent * ge.reshape(-1).double()).sum()
    for got, exp in zip((x.grad for x in xs), _grads(want, r)):
        _close(got, exp, 3e-5)


def test_logprobs_gradcheck_float64():
    n, v, h = 6, 11, 5
    hid, w, b = _head(n, v, h, seed=14, dtype=torch.float64)
    labels = _labels(n, v, seed=5, ignore_every=4)
    f = lambda hh, ww, bb: divkit.fused_linear_logprobs(hh, ww, labels, bb, chunk_size=4)
    # fp32 arithmetic inside: finite differences with a large step and matching tolerance.
    assert torch.autograd.gradcheck(
        f, [x.requires_grad_(True) for x in (hid, w, b)], eps=1e-3, atol=2e-3, rtol=2e-3
    )


# ---- one-sweep gradients ----------------------------------------------------------------------
# With hidden = I and weight = X^T the logits are X and weight.grad is dL/dX transposed, exactly:
# the row gradient of the label losses is compared with float64 autograd, for the one-sweep path
# (the default) and the two-pass path (_C._set_label_one_sweep(False)), which must also agree
# with each other to fp32 rounding.


@pytest.fixture
def label_paths():
    from divkit import _C

    def run(f):
        out = {}
        for one in (True, False):
            _C._set_label_one_sweep(one)
            try:
                out[one] = f()
            finally:
                _C._set_label_one_sweep(True)
        return out[True], out[False]

    return run


def _identity_head(n, v, *, seed, sd):
    g = torch.Generator().manual_seed(seed)
    x = (sd * torch.randn(n, v, generator=g)).float()
    return torch.eye(n), x.T.contiguous(), x.double()


def _rows_close(got, want, rel, floor):
    bound = rel * want.abs() + floor * want.abs().amax(-1, keepdim=True)
    err = (got.double() - want).abs()
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3g}"


@pytest.mark.parametrize(
    "opts",
    [
        {"softcap": 4.0},
        {"softcap": 2.5, "label_smoothing": 0.1, "lse_square_scale": 1e-3},
        {"softcap": 30.0, "label_smoothing": 0.05},
    ],
    ids=["softcap", "softcap-smoothing-zloss", "softcap30"],
)
@pytest.mark.parametrize("v", [67, 4099])
def test_cross_entropy_softcap_one_sweep_matches_float64(label_paths, opts, v):
    n = 10
    eye, wt, x64 = _identity_head(n, v, seed=v, sd=3.0)
    labels = _labels(n, v, seed=7, ignore_every=4)

    def grad():
        w = wt.clone().requires_grad_(True)
        loss = divkit.fused_linear_cross_entropy(eye, w, labels, chunk_size=3, **opts)
        loss.backward()
        return loss.detach(), w.grad.T

    (l1, g1), (l2, g2) = label_paths(grad)
    x = x64.clone().requires_grad_(True)
    z = opts["softcap"] * torch.tanh(x / opts["softcap"])
    want = F.cross_entropy(z, labels, label_smoothing=opts.get("label_smoothing", 0.0))
    if "lse_square_scale" in opts:
        mask = labels != -100
        want = want + opts["lse_square_scale"] * (torch.logsumexp(z, -1) ** 2)[mask].mean()
    (gx,) = torch.autograd.grad(want, x)
    assert torch.equal(l1, l2)  # the statistics are the same code either way
    _close(l1, want.detach(), 2e-5)
    _rows_close(g1, gx, 1e-5, 1e-6)
    _rows_close(g2, gx, 1e-5, 1e-6)
    _rows_close(g1, g2.double(), 4e-6, 2e-7)


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.6])
@pytest.mark.parametrize("v", [67, 4099])
def test_logprobs_entropy_term_one_sweep_matches_float64(label_paths, temperature, v):
    n = 10
    eye, wt, x64 = _identity_head(n, v, seed=v + 1, sd=2.5)
    labels = _labels(n, v, seed=8, ignore_every=4)
    g = torch.Generator().manual_seed(9)
    gl, ge = torch.randn(n, generator=g), torch.randn(n, generator=g)
    ge[::3] = 0.0

    def grad():
        w = wt.clone().requires_grad_(True)
        res = divkit.fused_linear_logprobs(
            eye, w, labels, temperature=temperature, return_entropy=True, chunk_size=3
        )
        ((res.logprobs * gl).sum() + (res.entropy * ge).sum()).backward()
        return w.grad.T

    g1, g2 = label_paths(grad)
    x = x64.clone().requires_grad_(True)
    lp = F.log_softmax(x / temperature, -1)
    mask = labels != -100
    want_lp = torch.where(mask, lp.gather(-1, labels.clamp(min=0)[:, None])[:, 0], 0.0)
    want_ent = torch.where(mask, -(lp.exp() * lp).sum(-1), 0.0)
    (gx,) = torch.autograd.grad((want_lp * gl).sum() + (want_ent * ge).sum(), x)
    _rows_close(g1, gx, 1e-5, 1e-6)
    _rows_close(g2, gx, 1e-5, 1e-6)
    _rows_close(g1, g2.double(), 4e-6, 2e-7)


# ---- bad input -------------------------------------------------------------------------------


def test_errors_name_the_argument():
    n, v, h = 5, 9, 4
    hid, w, b = _head(n, v, h, seed=15)
    labels = torch.tensor([0, 1, -100, 3, 4])
    with pytest.raises(divkit.Error, match="student_hidden .* student_weight .*hidden size"):
        divkit.fused_linear_divergence(hid, w[:, :3], hid, w)
    with pytest.raises(ValueError, match="token dimensions must agree"):
        divkit.fused_linear_divergence(hid, w, hid[:4], w)
    with pytest.raises(divkit.Error, match=r"labels\[3\] = 9 is out of range"):
        divkit.fused_linear_cross_entropy(hid, w, torch.tensor([0, 1, -100, 9, 4]))
    with pytest.raises(divkit.Error, match=r"labels\[1\] = -5"):
        divkit.fused_linear_logprobs(hid, w, torch.tensor([0, -5, 1, 2, 3]))
    with pytest.raises(divkit.Error, match="hard_weight != 0 needs labels"):
        divkit.fused_linear_divergence(hid, w, hid, w, hard_weight=1.0)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        divkit.fused_linear_cross_entropy(hid, w, labels, chunk_size=0)
    with pytest.raises(ValueError, match="topk must be >= 1"):
        divkit.fused_linear_logprobs(hid, w, labels, topk=0)
    with pytest.raises(divkit.Error, match="topk must be in"):
        divkit.fused_linear_logprobs(hid, w, labels, topk=v + 1)
    with pytest.raises(divkit.Error, match="label_smoothing"):
        divkit.fused_linear_cross_entropy(hid, w, labels, label_smoothing=1.5)
    with pytest.raises(TypeError, match="labels must have an integer dtype"):
        divkit.fused_linear_cross_entropy(hid, w, labels.float())
    with pytest.raises(ValueError, match="labels has shape"):
        divkit.fused_linear_cross_entropy(hid, w, labels[:3])
    bad = hid.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(divkit.Error, match="hidden contains NaN or inf at row 3"):
        divkit.fused_linear_cross_entropy(bad, w, labels)
    with pytest.raises(divkit.Error, match="kind"):
        divkit.fused_linear_divergence(hid, w, hid, w, "nope")


@pytest.mark.parametrize("sparse", [False, True])
def test_weights_that_require_grad_raise(sparse):
    # No gradient flows to the token weights: weights that require one raise, as divergence's
    # do, instead of being detached silently; detached (or under no_grad) they give the loss.
    n, v, h, k = 6, 11, 4, 3
    sh, sw, _ = _head(n, v, h, seed=40)
    th, tw, _ = _head(n, v, h, seed=41)
    idx = torch.stack(
        [torch.randperm(v, generator=torch.Generator().manual_seed(i))[:k] for i in range(n)]
    )
    lp = torch.log_softmax(torch.randn(n, v), -1).gather(1, idx)
    w = torch.rand(n, requires_grad=True)

    def call(weights):
        if sparse:
            return divkit.fused_linear_sparse_divergence(sh, sw, idx, lp, weights=weights)
        return divkit.fused_linear_divergence(sh, sw, th, tw, weights=weights)

    fn = "fused_linear_sparse_divergence" if sparse else "fused_linear_divergence"
    with pytest.raises(divkit.Error, match=rf"{fn}: weights requires grad.*weights.detach\(\)"):
        call(w)
    with torch.no_grad():
        under_no_grad = call(w)
    torch.testing.assert_close(under_no_grad, call(w.detach()), rtol=0, atol=0)


def test_modules_call_the_functions():
    n, v, h = 17, 29, 8
    sh, sw, sb = _head(n, v, h, seed=20)
    th, tw, tb = _head(n, v, h, seed=21)
    labels = _labels(n, v, seed=6)
    m = divkit.nn.FusedLinearDistillationLoss("jsd", beta=0.2, hard_weight=0.5, chunk_size=4)
    assert "beta=0.2" in repr(m)
    want = divkit.fused_linear_divergence(
        sh, sw, th, tw, "jsd", beta=0.2, hard_weight=0.5, labels=labels, student_bias=sb
    )
    assert m(sh, sw, th, tw, labels, student_bias=sb).item() == pytest.approx(want.item(), rel=1e-6)
    ce = divkit.nn.FusedLinearCrossEntropyLoss(label_smoothing=0.1)
    want = F.cross_entropy(
        _logits(sh.double(), sw.double(), sb.double()), labels, label_smoothing=0.1
    )
    assert ce(sw, sh, labels, sb).item() == pytest.approx(want.item(), rel=2e-5)
    with pytest.raises(TypeError, match="unexpected option"):
        divkit.nn.FusedLinearDistillationLoss("jsd", betta=0.2)
    with pytest.raises(divkit.Error, match="beta"):
        divkit.nn.FusedLinearDistillationLoss("jsd", beta=2.0)


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize(
    "kind,params", [("forward_kl", {}), ("jsd", {"beta": 0.4}), ("reverse_kl", {})]
)
def test_sparse_teacher_fused_matches_materialized(tail, kind, params):
    # The fused path must equal divkit.sparse_divergence on the materialized student logits
    # (itself checked against a float64 torch reference in test_sparse.py), plus the CE term.
    n, v, h, k = 23, 71, 16, 6
    sh, sw, sb = _head(n, v, h, seed=30, scale=2.0)
    g = torch.Generator().manual_seed(31)
    idx = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    lp = torch.log_softmax(torch.randn(n, v, generator=g) * 2, -1).gather(1, idx)
    labels = _labels(n, v, seed=7)
    for reduction in ("mean", "none"):
        a = [x.clone().requires_grad_(True) for x in (sh, sw, sb)]
        out = divkit.fused_linear_sparse_divergence(
            a[0],
            a[1],
            idx,
            lp,
            kind,
            tail=tail,
            student_bias=a[2],
            labels=labels,
            hard_weight=0.3,
            soft_weight=0.7,
            chunk_size=5,
            temperature=1.3,
            reduction=reduction,
            **params,
        )
        b = [x.clone().requires_grad_(True) for x in (sh, sw, sb)]
        z = b[0] @ b[1].T + b[2]
        want = 0.7 * divkit.sparse_divergence(
            z,
            idx,
            lp,
            kind,
            tail=tail,
            labels=labels,
            temperature=1.3,
            reduction=reduction,
            **params,
        )
        want = want + 0.3 * F.cross_entropy(z, labels, reduction=reduction)
        _close(out.detach(), want.detach().double(), 2e-5)
        up = torch.linspace(-1, 1, n) if reduction == "none" else torch.tensor(1.0)
        (out * up).sum().backward()
        (want * up).sum().backward()
        for x, r in zip(a, b):
            _close(x.grad, r.grad.double(), 3e-5)
    with pytest.raises(ValueError, match="teacher_indices has shape"):
        divkit.fused_linear_sparse_divergence(sh, sw, idx[:3], lp)
    bad = idx.clone()
    bad[4, 2] = v + 1
    with pytest.raises(divkit.Error, match="teacher_indices"):
        divkit.fused_linear_sparse_divergence(sh, sw, bad, lp, chunk_size=4)


def test_sparse_teacher_fused_checks_and_converts_like_sparse_divergence():
    # Token weights are checked against the tokens' shape (a [3, 2] tensor for [2, 3] tokens is
    # not silently reshaped); int16 indices and float16 log-probabilities are converted, as
    # sparse_divergence does, and give its values.
    v, h, k = 19, 6, 4
    sh, sw, _ = _head(6, v, h, seed=40)
    sh = sh.reshape(2, 3, h)
    g = torch.Generator().manual_seed(41)
    idx = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(6)]).reshape(2, 3, k)
    lp = torch.log_softmax(torch.randn(2, 3, v, generator=g), -1).gather(-1, idx)
    fls = divkit.fused_linear_sparse_divergence
    with pytest.raises(ValueError, match=r"fused_linear_sparse_divergence: weights has shape"):
        fls(sh, sw, idx, lp, weights=torch.ones(3, 2))
    with pytest.raises(TypeError, match="weights must have a floating dtype"):
        fls(sh, sw, idx, lp, weights=torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="weights must be a torch.Tensor"):
        fls(sh, sw, idx, lp, weights=[1.0] * 6)
    with pytest.raises(TypeError, match="teacher_indices must have an integer dtype"):
        fls(sh, sw, idx.float(), lp)
    with pytest.raises(TypeError, match="teacher_logprobs must have a floating dtype"):
        fls(sh, sw, idx, idx)
    lp16 = lp.half()
    got = fls(sh, sw, idx.short(), lp16, reduction="none")
    want = divkit.sparse_divergence(sh @ sw.T, idx, lp16.float(), reduction="none")
    _close(got, want.double(), 2e-5)


@pytest.mark.parametrize("n,h,v", [(64, 2048, 128256), (4096, 31, 32000)])
def test_issue_sizes_match_materialized(n, h, v):
    # The sizes the fused path is used at (H = 2048, V = 128256; N = 4096), against the float64
    # materialized computation (kept to one of the three large at a time so the test stays fast).
    sh, sw, sb = _head(n, v, h, seed=40)
    th, tw, _ = _head(n, v, h, seed=41, scale=2.0, bias=False)
    labels = _labels(n, v, seed=8, ignore_every=9)
    a = [x.clone().requires_grad_(True) for x in (sh, sw, sb)]
    out = divkit.fused_linear_divergence(
        a[0], a[1], th, tw, "forward_kl", student_bias=a[2], labels=labels, hard_weight=0.5
    )
    out.backward()
    r = _leaf64(sh, sw, sb)
    z = _logits(*r)
    want = ref.loss(z, th.double() @ tw.double().T, "forward_kl", labels=labels)
    want = want + 0.5 * F.cross_entropy(z, labels)
    _close(out.detach(), want.detach(), 2e-5)
    for got, exp in zip((x.grad for x in a), _grads(want, r)):
        _close(got, exp, 5e-5)
