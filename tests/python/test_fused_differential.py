"""Fused linear-head losses against their peers on the cases a differential hunt turned up: the
two routes (the C++ core and the PyTorch chunk loop, ``backend="torch"``, which serves every
device without divkit kernels) must reject the same bad arguments with a divkit.Error that names
the public function and the argument, and the documented Liger equivalence must hold with
ignored tokens."""

from __future__ import annotations

import re

import pytest
import torch

import divkit

ROUTES = ["core", "torch"]


def _head(n=6, v=11, h=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) / h**0.5
    bias = 0.3 * torch.randn(v, generator=g)
    labels = torch.randint(0, v, (n,), generator=g)
    idx = torch.stack([torch.randperm(v, generator=g)[:3] for _ in range(n)])
    lp = torch.log_softmax(torch.randn(n, v, generator=g), -1).gather(1, idx)
    return hidden, weight, bias, labels, idx, lp


_KEEP = object()


def _call(fn, backend, *, weight=None, bias=_KEEP, **kw):
    """One call of the public function ``fn`` on the small head, with the weight and bias
    replaced by those given (bias=None: no bias)."""
    h, w, b, y, idx, lp = _head()
    w = w if weight is None else weight
    b = b if bias is _KEEP else bias
    if fn == "fused_linear_cross_entropy":
        return divkit.fused_linear_cross_entropy(h, w, y, b, backend=backend, **kw)
    if fn == "fused_linear_logprobs":
        return divkit.fused_linear_logprobs(h, w, y, b, backend=backend, **kw)
    if fn == "fused_linear_divergence":
        return divkit.fused_linear_divergence(
            h, w, h, w, student_bias=b, labels=y, backend=backend, **kw
        )
    return divkit.fused_linear_sparse_divergence(
        h, w, idx, lp, student_bias=b, labels=y, backend=backend, **kw
    )


FUNCTIONS = [
    "fused_linear_cross_entropy",
    "fused_linear_logprobs",
    "fused_linear_divergence",
    "fused_linear_sparse_divergence",
]
# The names of the head's arguments in each function.
HEAD_NAMES = {
    "fused_linear_cross_entropy": ("hidden", "weight", "bias"),
    "fused_linear_logprobs": ("hidden", "weight", "bias"),
    "fused_linear_divergence": ("student_hidden", "student_weight", "student_bias"),
    "fused_linear_sparse_divergence": ("student_hidden", "student_weight", "student_bias"),
}


@pytest.mark.parametrize("backend", ROUTES)
@pytest.mark.parametrize("fn", FUNCTIONS)
def test_head_shapes_raise_naming_function_and_argument_on_both_routes(fn, backend):
    # The PyTorch route let torch's RuntimeError escape (a bias of the wrong length), or blamed
    # the labels for a transposed weight or an empty vocabulary.
    hn, wn, bn = HEAD_NAMES[fn]
    h, w, b, *_ = _head()
    with pytest.raises(divkit.Error, match=rf"^{fn}: {bn} must have shape \[11\], got \[12\]"):
        _call(fn, backend, bias=torch.randn(12))
    with pytest.raises(
        divkit.Error, match=rf"^{fn}: {hn} \[6, 4\] and {wn} \[4, 11\] disagree on the hidden size"
    ):
        _call(fn, backend, weight=w.T.contiguous(), bias=None)
    with pytest.raises(divkit.Error, match=rf"^{fn}: {wn} has V = 0 rows"):
        _call(fn, backend, weight=w[:0], bias=b[:0])


@pytest.mark.parametrize("backend", ROUTES)
@pytest.mark.parametrize(
    "fn,opts,arg",
    [
        ("fused_linear_cross_entropy", {"reduction": "avg"}, "reduction"),
        ("fused_linear_sparse_divergence", {"reduction": "avg"}, "reduction"),
        ("fused_linear_divergence", {"reduction": "avg"}, "reduction"),
        ("fused_linear_sparse_divergence", {"kind": "nope"}, "kind"),
        ("fused_linear_divergence", {"kind": "nope"}, "kind"),
        ("fused_linear_sparse_divergence", {"tail": "x"}, "tail"),
        ("fused_linear_cross_entropy", {"label_smoothing": 1.5}, "label_smoothing"),
        ("fused_linear_cross_entropy", {"label_smoothing": -0.1}, "label_smoothing"),
        ("fused_linear_cross_entropy", {"label_smoothing": float("inf")}, "label_smoothing"),
        ("fused_linear_cross_entropy", {"lse_square_scale": -1.0}, "lse_square_scale"),
        ("fused_linear_cross_entropy", {"lse_square_scale": float("inf")}, "lse_square_scale"),
        ("fused_linear_cross_entropy", {"softcap": float("inf")}, "softcap"),
        ("fused_linear_logprobs", {"topk": 12}, "topk"),
    ],
)
def test_bad_options_raise_naming_function_and_argument_on_both_routes(fn, opts, arg, backend):
    # The core's shared checks named "divergence" / "sparse_divergence" and its own option name
    # z_loss_scale; the PyTorch route accepted the out-of-range values (a NaN or negative loss).
    with pytest.raises(divkit.Error, match=rf"^{fn}: (unknown )?{arg}\b"):
        _call(fn, backend, **opts)


def test_liger_jsd_equivalence_in_the_module_docstring_holds_with_ignored_tokens():
    # FusedLinearDistillationLoss's docstring names the options that replace Liger's
    # LigerFusedLinearJSDLoss; Liger (0.8.5, installed) masks ignored tokens in both terms and
    # divides by the count of the others, so the documented reduction must give its loss.
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    doc = divkit.nn.FusedLinearDistillationLoss.__doc__
    m = re.search(r'FusedLinearDistillationLoss\("jsd",[^`]*reduction="(\w+)"\)', doc)
    assert m, "the docstring names the reduction that replaces Liger's loss"
    reduction = m.group(1)
    g = torch.Generator().manual_seed(3)
    n, v, hs, ht = 20, 23, 8, 12
    sh, th = torch.randn(n, hs, generator=g), torch.randn(n, ht, generator=g)
    sw, tw = torch.randn(v, hs, generator=g) / 3, torch.randn(v, ht, generator=g) / 3
    y = torch.randint(0, v, (n,), generator=g)
    y[::3] = -100
    a = [x.clone().requires_grad_(True) for x in (sh, sw)]
    want = liger.LigerFusedLinearJSDLoss(
        weight_hard_loss=0.5, weight_soft_loss=0.5, beta=0.3, compiled=False, chunk_size=8
    )(a[0], a[1], th, tw, y)
    want.backward()
    b = [x.clone().requires_grad_(True) for x in (sh, sw)]
    got = divkit.nn.FusedLinearDistillationLoss(
        "jsd", beta=0.3, hard_weight=0.5, soft_weight=0.5, reduction=reduction
    )(b[0], b[1], th, tw, y)
    got.backward()
    assert abs(got.item() - want.item()) <= 2e-5 * (1 + abs(want.item()))
    for x, r in zip(b, a):
        assert (x.grad - r.grad).abs().max().item() <= 2e-5 * (r.grad.abs().max().item() + 1e-6)


@pytest.mark.parametrize("shape", [(1, 11), (11, 1)])
def test_teacher_token_ids_must_be_one_dimensional(shape):
    # A [1, V] or [V, 1] mapping was flattened silently; the docstring says [V].
    h, w, _, y, *_ = _head()
    tw = torch.randn(14, 4)
    ids = torch.arange(11).reshape(shape)
    with pytest.raises(divkit.Error, match=r"^fused_linear_divergence: teacher_token_ids must"):
        divkit.fused_linear_divergence(h, w, h, tw, teacher_token_ids=ids, labels=y)
    got = divkit.fused_linear_divergence(h, w, h, tw, teacher_token_ids=ids.reshape(-1), labels=y)
    assert torch.isfinite(got)


@pytest.mark.parametrize(
    "fn,opts",
    [
        ("fused_linear_divergence", {"scale_by_t_squared": "no"}),
        ("fused_linear_sparse_divergence", {"scale_by_t_squared": 0}),
        ("fused_linear_cross_entropy", {"return_stats": "no"}),
    ],
)
def test_flags_must_be_bools(fn, opts):
    # bool(x) made the string "no" True; the modules and divergence() check the type.
    (arg,) = opts
    with pytest.raises(TypeError, match=rf"^{fn}: {arg} must be a bool"):
        _call(fn, "core", **opts)
    with pytest.raises(divkit.Error, match=rf"^{fn}: {arg} must be a bool"):
        _call(fn, "torch", **opts)


@pytest.mark.parametrize("backend", ROUTES)
@pytest.mark.parametrize("temperature", [1e-38, 1e-40])
def test_logprobs_temperature_that_overflows_the_logits_raises(backend, temperature):
    # logits / T beyond float32 made the row's max +inf and its log-probs and entropy NaN,
    # silently, on the core's route; the PyTorch route raises. Both name the temperature.
    h, w, _, y, *_ = _head()
    h = 10 * h  # logits of a few units: beyond 3.4e38 once divided by 1e-38
    with pytest.raises(divkit.Error, match=r"^fused_linear_logprobs: .*temperature"):
        divkit.fused_linear_logprobs(
            h, w, y, temperature=temperature, return_entropy=True, backend=backend
        )
    # A small temperature whose scaled logits fit: the log-probs are (z_y - max z) / T.
    t = 1e-30
    got = divkit.fused_linear_logprobs(h, w, y, temperature=t, backend=backend)
    z = (h.double() @ w.double().T).float().double()
    want = (z.gather(1, y[:, None])[:, 0] - z.amax(-1)) / t
    assert torch.isfinite(got).all()
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=0)


@pytest.mark.parametrize("backend", ROUTES)
@pytest.mark.parametrize("fn", ["fused_linear_divergence", "fused_linear_sparse_divergence"])
def test_num_items_with_reduction_none_raises_on_both_routes(fn, backend):
    # The core's route dropped num_items_in_batch silently for per-token losses (undivided
    # losses); the PyTorch route, fused_linear_cross_entropy and divergence() raise.
    with pytest.raises(divkit.Error, match=rf"^{fn}: num_items_in_batch .* reduction 'none'"):
        _call(fn, backend, reduction="none", num_items_in_batch=5.0)


@pytest.mark.parametrize("backend", ROUTES)
@pytest.mark.parametrize("fn", FUNCTIONS)
def test_nan_in_an_ignored_row_or_unused_weight_raises_on_both_routes(fn, backend):
    # The PyTorch route skipped ignored tokens' rows: a finite loss came back with NaN weight
    # (and hidden) gradients (0 * NaN in the GEMMs). The core raises, naming the row.
    hn, wn, _ = HEAD_NAMES[fn]
    h, w, b, y, idx, lp = _head()
    y = y.clone()
    y[0] = -100
    bad_h = h.clone()
    bad_h[0, 1] = float("nan")
    bad_w = w.clone()
    bad_w[2, 0] = float("inf")
    for name, hh, ww in ((hn, bad_h, w), (wn, h, bad_w)):
        xs = [hh.clone().requires_grad_(True), ww.clone().requires_grad_(True)]
        row = 0 if name == hn else 2
        with pytest.raises(divkit.Error, match=rf"^{fn}: {name} contains NaN or inf at row {row}"):
            if fn == "fused_linear_cross_entropy":
                divkit.fused_linear_cross_entropy(*xs, y, b, backend=backend).backward()
            elif fn == "fused_linear_logprobs":
                divkit.fused_linear_logprobs(*xs, y, b, backend=backend).sum().backward()
            elif fn == "fused_linear_divergence":
                divkit.fused_linear_divergence(*xs, h, w, labels=y, backend=backend).backward()
            else:
                divkit.fused_linear_sparse_divergence(
                    *xs, idx, lp, labels=y, backend=backend
                ).backward()


def test_sparse_teacher_logprobs_requiring_grad_raise_only_in_grad_mode():
    # As sparse_divergence: a teacher that requires grad raises while grad mode is on (no
    # gradient reaches it) and gives the loss under no_grad (an evaluation loop); the fused head
    # raised under no_grad too.
    h, w, b, y, idx, lp = _head()
    lpg = lp.clone().requires_grad_(True)
    with pytest.raises(
        divkit.Error, match=r"^fused_linear_sparse_divergence: teacher_logprobs requires grad"
    ):
        divkit.fused_linear_sparse_divergence(h, w, idx, lpg, labels=y)
    with torch.no_grad():
        got = divkit.fused_linear_sparse_divergence(h, w, idx, lpg, labels=y)
        want = divkit.sparse_divergence(h @ w.T, idx, lpg, labels=y)
    assert torch.equal(got, divkit.fused_linear_sparse_divergence(h, w, idx, lp, labels=y))
    assert abs(got.item() - want.item()) <= 2e-6 * (1 + abs(want.item()))
