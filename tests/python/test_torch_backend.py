"""The PyTorch fallback (backend="torch", divkit.backends.torch_ops) against the C++ core, on CPU
tensors: the same results to the tolerances of test_values.py, for every kind, dtype, reduction,
labels and weights, both gradients, and any chunking of the rows."""

from __future__ import annotations

import pytest
import torch

import divkit
from conftest import CASES, KIND_CASES, case_id, logits, max_err
from divkit import _device
from divkit.backends import torch_ops
from divkit.functional import _parse_options

# As test_values.py: values within 1e-5 relative, gradients within 1e-5 of the largest entry.
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-5
# A gradient stored in bf16/fp16 may round the other way at an entry: one unit of the output
# dtype's precision, relative to the largest entry.
OUT_EPS = {torch.float32: 0.0, torch.float64: 0.0, torch.bfloat16: 2**-8, torch.float16: 2**-11}


def assert_loss_close(got, want):
    got, want = got.double(), want.double()
    assert got.shape == want.shape
    both_inf = torch.isinf(got) & torch.isinf(want) & (got.sign() == want.sign())
    tol = LOSS_RTOL * want.abs() + 1e-7
    ok = both_inf | ((got - want).abs() <= tol)
    assert ok.all(), f"got {got}, want {want}"


def assert_grad_close(got, want, dtype=torch.float32):
    assert got.shape == want.shape and got.dtype == want.dtype
    scale = max(want.double().abs().max().item(), 1e-6)
    err = max_err(got, want)
    tol = (GRAD_RTOL + OUT_EPS[want.dtype]) * scale + 1e-8
    assert err <= tol, f"max abs error {err:.3g} (largest entry {scale:.3g})"


def both(fn, s, t, *, grad_teacher=False, grad_output=None, **kw):
    """(loss, grad_s, grad_t) of fn under backend core and torch, through autograd."""
    out = []
    for backend in ("core", "torch"):
        ss = s.detach().clone().requires_grad_(True)
        tt = t.detach().clone().requires_grad_(grad_teacher)
        loss = fn(ss, tt, backend=backend, **kw)
        go = torch.ones_like(loss) if grad_output is None else grad_output.to(loss.dtype)
        loss.backward(go)
        out.append((loss.detach(), ss.grad, tt.grad))
    return out


def compare(core, fb):
    assert_loss_close(fb[0], core[0])
    for g_fb, g_core in zip(fb[1:], core[1:]):
        if g_core is None:
            assert g_fb is None
        else:
            assert_grad_close(g_fb, g_core)


def masked_pair(n, v, dtype, seed=0):
    s = logits(n, v, seed=seed, scale=3.0).to(dtype)
    t = logits(n, v, seed=seed + 1, scale=3.0).to(dtype)
    s[0, 1] = float("-inf")  # masked in the student only (infinite for some kinds)
    s[1, 2] = t[1, 2] = float("-inf")  # masked in both
    t[2, 3] = float("-inf")  # masked in the teacher only
    return s, t


# ---------------------------------------------------------------------------------------------
# Token divergences.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_kind_and_dtype(case, dtype):
    kind, params = case
    s, t = masked_pair(7, 37, dtype)
    core, fb = both(
        divkit.divergence, s, t, kind=kind, grad_teacher=True, temperature=1.7, **params
    )
    compare(core, fb)


@pytest.mark.parametrize("case", KIND_CASES, ids=case_id)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
def test_reductions_labels_weights(case, reduction):
    kind, params = case
    s, t = logits(3, 5, 41, seed=3), logits(3, 5, 41, seed=4)
    labels = torch.tensor([[0, -100, 2, 3, -100], [1, 1, -100, 1, 1], [-100] * 5])
    weights = torch.rand(3, 5, generator=torch.Generator().manual_seed(5)) + 0.5
    weights[0, 3] = 0.0
    s[0, 1] = float("nan")  # an ignored token's logits are not read
    go = (
        torch.rand(3, 5, generator=torch.Generator().manual_seed(6))
        if reduction == "none"
        else None
    )
    core, fb = both(
        divkit.divergence,
        s,
        t,
        kind=kind,
        grad_teacher=True,
        labels=labels,
        weights=weights,
        reduction=reduction,
        grad_output=go,
        **params,
    )
    compare(core, fb)


@pytest.mark.parametrize("num_items", [None, 7, 2.5])
@pytest.mark.parametrize("scale_t2", [False, True])
def test_num_items_and_temperature_scaling(num_items, scale_t2):
    s, t = logits(9, 50, seed=7), logits(9, 50, seed=8)
    labels = torch.tensor([0, 1, -100, 3, 4, -100, 6, 7, 8])
    core, fb = both(
        divkit.divergence,
        s,
        t,
        kind="jsd",
        beta=0.3,
        grad_teacher=True,
        labels=labels,
        reduction="mean" if num_items is None else "sum",
        num_items_in_batch=num_items,
        temperature=2.5,
        scale_by_t_squared=scale_t2,
    )
    compare(core, fb)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "renyi"])
def test_fp64_inputs_and_mixed_dtypes(kind):
    s = logits(5, 33, seed=9, dtype=torch.float64)
    t = logits(5, 33, seed=10, dtype=torch.bfloat16)
    core, fb = both(divkit.divergence, s, t, kind=kind, alpha=0.7, grad_teacher=True)
    compare(core, fb)


def test_grad_dtype_and_divergence_and_grad():
    s, t = logits(6, 40, seed=11, dtype=torch.bfloat16), logits(6, 40, seed=12)
    out = [
        divkit.divergence_and_grad(
            s, t, "hellinger", grad_teacher=True, grad_dtype=torch.float32, backend=b
        )
        for b in ("core", "torch")
    ]
    compare(out[0], out[1])
    assert out[1][1].dtype == torch.float32 and out[1][2].dtype == torch.float32


def test_inplace_grad():
    s, t = logits(8, 30, seed=13), logits(8, 30, seed=14)
    want = divkit.divergence_and_grad(s, t, "reverse_kl")[1]
    x = s.clone().requires_grad_(True)
    loss = divkit.divergence(x, t, "reverse_kl", inplace_grad=True, backend="torch")
    assert_grad_close(x.detach(), want)  # the forward call wrote the gradient into x
    loss.backward()
    assert_grad_close(x.grad, want)
    # divergence_and_grad returns a view of the logits
    y = s.clone()
    g = divkit.divergence_and_grad(y, t, "reverse_kl", inplace_grad=True, backend="torch")[1]
    assert g.data_ptr() == y.data_ptr()
    assert_grad_close(y, want)


def test_inplace_bad_row_found_before_writing():
    s, t = logits(6, 20, seed=15), logits(6, 20, seed=16)
    t[5, 0] = float("nan")
    x = s.clone()
    with pytest.raises(divkit.Error, match="teacher_logits contains NaN or \\+inf at row 5"):
        divkit.divergence_and_grad(x, t, inplace_grad=True, backend="torch")
    assert torch.equal(x, s)


@pytest.mark.parametrize("chunk", [1, 3, 5, 8, 100])
def test_chunking_gives_the_same_results(chunk):
    n, v = 8, 300
    s, t = logits(n, v, seed=17), logits(n, v, seed=18)
    labels = torch.tensor([0, -100, 2, 3, 4, -100, 6, 7])
    cfg = _parse_options("divergence", "jsd", 0.4, 0.1, 1.3, -100, "sum", None, False, False, None)
    full = [torch.empty(n, v), torch.empty(n, v)]
    loss_full = torch_ops.divergence(s, t, labels, None, cfg, *full, chunk_size=n)
    part = [torch.empty(n, v), torch.empty(n, v)]
    loss = torch_ops.divergence(s, t, labels, None, cfg, *part, chunk_size=chunk)
    torch.testing.assert_close(loss, loss_full, rtol=1e-6, atol=0)
    for a, b in zip(part, full):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_default_chunk_bounds_the_temporaries(monkeypatch):
    """With a budget of 2 rows per chunk, no chunk the fallback computes has more rows."""
    seen = []
    real = torch_ops._Entries.__init__

    def spy(self, zs, zt):
        seen.append(zs.shape[0])
        real(self, zs, zt)

    monkeypatch.setattr(torch_ops._Entries, "__init__", spy)
    monkeypatch.setattr(torch_ops, "DEFAULT_CHUNK_ENTRIES", 2 * 64)
    s, t = logits(7, 64, seed=19), logits(7, 64, seed=20)
    core = divkit.divergence(s, t, "tvd", backend="core")
    fb = divkit.divergence(s, t, "tvd", backend="torch")
    assert seen == [2, 2, 2, 1]
    assert_loss_close(fb, core)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda s, t: s.__setitem__((1, 4), float("nan")), "student_logits contains NaN .* row 1"),
        (lambda s, t: t.__setitem__((2, 0), float("inf")), "teacher_logits contains NaN .* row 2"),
        (lambda s, t: s.__setitem__(2, float("-inf")), "student_logits row 2 has every logit"),
    ],
)
def test_bad_rows_raise_as_the_core(mutate, match):
    s, t = logits(3, 9, seed=21), logits(3, 9, seed=22)
    mutate(s, t)
    msgs = []
    for backend in ("core", "torch"):
        with pytest.raises(divkit.Error, match=match) as info:
            divkit.divergence(s, t, backend=backend)
        msgs.append(str(info.value))
    assert msgs[0] == msgs[1]


def test_parameter_errors_match_the_core():
    s, t = logits(3, 9, seed=23), logits(3, 9, seed=24)
    for kw in ({"kind": "jsd", "beta": 1.5}, {"num_items_in_batch": 3, "reduction": "none"}):
        msgs = []
        for backend in ("core", "torch"):
            with pytest.raises(divkit.Error) as info:
                divkit.divergence(s, t, backend=backend, **kw)
            msgs.append(str(info.value))
        assert msgs[0] == msgs[1]


def test_module_takes_backend():
    s, t = logits(4, 20, seed=25), logits(4, 20, seed=26)
    core = divkit.nn.DivergenceLoss("chi2")(s, t)
    fb = divkit.nn.DivergenceLoss("chi2", backend="torch")(s, t)
    assert_loss_close(fb, core)


# ---------------------------------------------------------------------------------------------
# Sparse and top-k teachers.
# ---------------------------------------------------------------------------------------------


def sparse_teacher(n, v, k, seed):
    lp = torch.log_softmax(logits(n, v, seed=seed, scale=3.0), -1)
    top = lp.topk(k, -1)
    return top.indices, top.values.float()


def both_student(fn, s, *args, **kw):
    out = []
    for backend in ("core", "torch"):
        ss = s.detach().clone().requires_grad_(True)
        loss = fn(ss, *args, backend=backend, **kw)
        loss.backward(torch.ones_like(loss))
        out.append((loss.detach(), ss.grad))
    return out


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sparse_divergence(case, tail, dtype):
    kind, params = case
    s = logits(6, 31, seed=27, scale=3.0).to(dtype)
    s[1, 3] = float("-inf")
    idx, lp = sparse_teacher(6, 31, 5, seed=28)
    core, fb = both_student(
        divkit.sparse_divergence, s, idx, lp, kind, tail=tail, temperature=1.4, **params
    )
    compare(core, fb)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_topk_divergence(case, dtype):
    kind, params = case
    s = logits(6, 31, seed=29, scale=3.0).to(dtype)
    t = logits(6, 31, seed=30, scale=3.0).to(dtype)
    t[0, :4] = 1.0  # ties at the selection boundary: the lower index wins
    core, fb = both_student(divkit.topk_divergence, s, t, 3, kind, temperature=0.8, **params)
    compare(core, fb)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
def test_sparse_reductions_labels_weights(reduction):
    s = logits(2, 4, 40, seed=31)
    idx, lp = sparse_teacher(8, 40, 6, seed=32)
    idx, lp = idx.reshape(2, 4, 6), lp.reshape(2, 4, 6)
    labels = torch.tensor([[0, -100, 1, 1], [-100, 2, 2, 2]])
    weights = torch.rand(2, 4, generator=torch.Generator().manual_seed(33))
    idx[0, 1] = 99  # an ignored token's teacher is not read
    for tail in ("bucket", "renormalize"):
        core, fb = both_student(
            divkit.sparse_divergence,
            s,
            idx,
            lp,
            "reverse_kl",
            tail=tail,
            labels=labels,
            weights=weights,
            reduction=reduction,
        )
        compare(core, fb)
        core, fb = both_student(
            divkit.topk_divergence,
            s,
            s.flip(-1),
            7,
            "jsd",
            labels=labels,
            weights=weights,
            reduction=reduction,
        )
        compare(core, fb)


def test_sparse_mass_above_one_is_scaled_and_k_equals_v():
    s = logits(3, 6, seed=34)
    lp = torch.log_softmax(logits(3, 6, seed=35), -1)
    idx = torch.arange(6).expand(3, 6)
    core, fb = both_student(divkit.sparse_divergence, s, idx, lp, "forward_kl")
    compare(core, fb)  # k = V: bucket is renormalize
    # Probabilities summing to 1.005 (server rounding): scaled to 1, no tail.
    over = torch.tensor([0.5, 0.3, 0.2, 0.005]).log().expand(3, 4)
    for kind in ("tvd", "reverse_kl"):
        core, fb = both_student(divkit.sparse_divergence, s, idx[:, :4], over, kind)
        compare(core, fb)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda i, lp: i.__setitem__((1, 0), 40), "outside the vocabulary"),
        (lambda i, lp: i.__setitem__((1, 0), int(i[1, 1])), "repeats index"),
        (lambda i, lp: lp.__setitem__((2, 1), 0.5), "logits instead of log-probabilities"),
        (lambda i, lp: lp.__setitem__((0, 0), float("nan")), "log-probabilities"),
        (lambda i, lp: lp.__setitem__(0, 0.0), "summing to"),
    ],
)
def test_sparse_teacher_errors_as_the_core(mutate, match):
    s = logits(3, 20, seed=36)
    idx, lp = sparse_teacher(3, 20, 4, seed=37)
    mutate(idx, lp)
    msgs = []
    for backend in ("core", "torch"):
        with pytest.raises(divkit.Error, match=match) as info:
            divkit.sparse_divergence(s, idx, lp, backend=backend)
        msgs.append(str(info.value))
    assert msgs[0] == msgs[1]


# ---------------------------------------------------------------------------------------------
# The fused linear head.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", KIND_CASES, ids=case_id)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("hard_weight", [0.0, 0.5])
def test_fused_linear_divergence(case, reduction, hard_weight):
    kind, params = case
    n, hs, ht, v = 11, 8, 6, 37
    base = [
        logits(n, hs, seed=40, scale=1.0),
        logits(v, hs, seed=41, scale=0.5),
        logits(n, ht, seed=42, scale=1.0),
        logits(v, ht, seed=43, scale=0.5),
        logits(v, seed=44, scale=0.5),
        logits(v, seed=45, scale=0.5),
    ]
    labels = torch.arange(n) * 3 % v
    labels[4] = -100
    weights = torch.rand(n, generator=torch.Generator().manual_seed(46)) + 0.5
    out = []
    for backend in ("core", "torch"):
        xs = [x.clone().requires_grad_(True) for x in base]
        loss = divkit.fused_linear_divergence(
            xs[0],
            xs[1],
            xs[2],
            xs[3],
            kind,
            student_bias=xs[4],
            teacher_bias=xs[5],
            labels=labels,
            weights=weights,
            hard_weight=hard_weight,
            reduction=reduction,
            chunk_size=4,  # chunks of 4, 4 and 3 tokens
            temperature=1.5,
            backend=backend,
            **params,
        )
        go = torch.rand(loss.shape, generator=torch.Generator().manual_seed(47))
        loss.backward(go)
        out.append((loss.detach(), *[x.grad for x in xs]))
    compare(out[0], out[1])


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"label_smoothing": 0.1},
        {"lse_square_scale": 1e-2},
        {"softcap": 3.0},
        {"label_smoothing": 0.2, "softcap": 2.0, "lse_square_scale": 0.1},
    ],
)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_cross_entropy(options, reduction, dtype):
    n, h, v = 13, 8, 37
    base = [
        logits(n, h, seed=50, scale=1.0).to(dtype),
        logits(v, h, seed=51, scale=1.0).to(dtype),
        logits(v, seed=52, scale=1.0).to(dtype),
    ]
    labels = torch.arange(n) * 5 % v
    labels[3] = -100
    out = []
    for backend in ("core", "torch"):
        xs = [x.clone().requires_grad_(True) for x in base]
        loss, logprobs, entropy = divkit.fused_linear_cross_entropy(
            xs[0],
            xs[1],
            labels,
            xs[2],
            reduction=reduction,
            num_items_in_batch=5 if reduction == "sum" else None,
            chunk_size=4,
            return_stats=True,
            backend=backend,
            **options,
        )
        go = torch.rand(loss.shape, generator=torch.Generator().manual_seed(53))
        loss.backward(go)
        out.append((loss.detach(), *[x.grad for x in xs]))
        out[-1] = out[-1] + (logprobs, entropy)
    core, fb = out
    compare(core[:4], fb[:4])
    for a, b in zip(fb[4:], core[4:]):
        assert_loss_close(a, b)


@pytest.mark.parametrize("return_entropy", [False, True])
@pytest.mark.parametrize("topk", [None, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_logprobs(return_entropy, topk, dtype):
    n, h, v = 13, 8, 37
    base = [
        logits(n, h, seed=54, scale=1.0).to(dtype),
        logits(v, h, seed=55, scale=1.0).to(dtype),
        logits(v, seed=56, scale=1.0).to(dtype),
    ]
    labels = torch.arange(n) * 7 % v
    labels[3] = -100
    g1 = torch.rand(n, generator=torch.Generator().manual_seed(57))
    g2 = torch.rand(n, generator=torch.Generator().manual_seed(58))
    out = []
    for backend in ("core", "torch"):
        xs = [x.clone().requires_grad_(True) for x in base]
        res = divkit.fused_linear_logprobs(
            xs[0],
            xs[1],
            labels,
            xs[2],
            temperature=1.7,
            return_entropy=return_entropy,
            topk=topk,
            chunk_size=4,
            backend=backend,
        )
        res = (res,) if isinstance(res, torch.Tensor) else tuple(r for r in res if r is not None)
        total = (res[0] * g1).sum() + ((res[1] * g2).sum() if return_entropy else 0.0)
        total.backward()
        out.append((res, [x.grad for x in xs]))
    for a, b in zip(out[1][0], out[0][0]):
        assert_loss_close(a.detach(), b.detach())
    for a, b in zip(out[1][1], out[0][1]):
        assert_grad_close(a, b)


@pytest.mark.parametrize("case", KIND_CASES, ids=case_id)
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_linear_sparse_divergence(case, tail, reduction):
    kind, params = case
    n, h, v = 13, 8, 37
    base = [
        logits(n, h, seed=60, scale=1.0),
        logits(v, h, seed=61, scale=1.0),
        logits(v, seed=62, scale=1.0),
    ]
    idx, lp = sparse_teacher(n, v, 5, seed=63)
    labels = torch.arange(n) * 3 % v
    labels[3] = -100
    weights = torch.rand(n, generator=torch.Generator().manual_seed(64)) + 0.5
    out = []
    for backend in ("core", "torch"):
        xs = [x.clone().requires_grad_(True) for x in base]
        loss = divkit.fused_linear_sparse_divergence(
            xs[0],
            xs[1],
            idx,
            lp,
            kind,
            tail=tail,
            student_bias=xs[2],
            labels=labels,
            weights=weights,
            hard_weight=0.5,
            reduction=reduction,
            chunk_size=4,
            temperature=1.5,
            backend=backend,
            **params,
        )
        go = torch.rand(loss.shape, generator=torch.Generator().manual_seed(65))
        loss.backward(go)
        out.append((loss.detach(), *[x.grad for x in xs]))
    compare(out[0], out[1])


def test_ops_without_fallback_refuse_backend_torch():
    with pytest.raises(divkit.Error, match="^kde_bandwidth: backend='torch' is not available"):
        _device.route("kde_bandwidth", "kde_bandwidth", "torch", ())


def test_jsd_where_the_student_probability_is_the_smallest_subnormal():
    # p = 0 (masked) and q = e^-103 (the smallest fp32 subnormal): the mixture b p + (1 - b) q
    # rounds to 0 in linear space; jsd (at most log 2) must stay finite and equal the core's.
    s = torch.tensor([[0.0, -103.2, 0.0], [3.0, -102.9, -50.0]])
    t = torch.tensor([[0.0, float("-inf"), 2.0], [0.0, -200.0, 1.0]])
    got, want = [], []
    for backend, out in (("torch", got), ("core", want)):
        x, y = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
        loss = divkit.divergence(x, y, "jsd", beta=0.5, reduction="none", backend=backend)
        loss.sum().backward()
        out += [loss.detach(), x.grad, y.grad]
    assert bool(torch.isfinite(got[0]).all())
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
