"""divkit's CUDA label-row kernel (``_C.label_rows``, src/fused_linear/label_cuda.cu) against the
CPU row kernels (``_C.label_rows`` on CPU tensors) for every option; two runs bitwise equal; the
error paths and check_finite=False; CUDA graph capture; and the fused cross-entropy / log-probs
heads on CUDA, whose PyTorch chunk loop takes the kernel as its row step, against the CPU head.

Runs under pytest or tests/gpu/mini_pytest.py (no fixtures, no ids)."""

import pytest
import torch

import divkit
from divkit import _C, _device
from divkit.backends import torch_ops

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not _device.has_cuda_kernel("label_rows"),
    reason="no CUDA device, or a build without the CUDA label-row kernel",
)

STATS = ("lse", "z_label", "mean_z", "entropy", "topk_mass", "log_sum_sq", "is_top1")


def _rows(n, v, seed=0, ties=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=g) * 3
    if ties:
        x = torch.round(x * 4) / 4  # repeated values: ties in the top-k and the max
    labels = torch.randint(0, v, (n,), generator=g)
    if n > 2 and v > 1:
        x[1, 0] = x[1, -1] = 20.0  # the label tied with an earlier maximum: not top-1
        labels[1] = v - 1
    if n > 3:
        labels[3] = -100
    return x, labels


def _call(x, labels, device, temperature, softcap, topk, grad, e_coef, **kw):
    """(stats..., gradient or None) of _C.label_rows on `device`."""
    n = x.shape[0]
    z = x.to(device).clone()
    out = {k: torch.full((n,), -7.0, dtype=torch.float64, device=device) for k in STATS}
    if not topk:
        out.pop("topk_mass")
    coef = {}
    if grad:
        g = torch.Generator().manual_seed(3)
        s = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
        coef = dict(coef_a0=s, coef_a1=0.02 * s, coef_b=-0.9 * s, coef_c=-0.1 * s / x.shape[1])
        if e_coef:
            coef["coef_e"] = -0.3 * s
        coef = {k: t.to(device) for k, t in coef.items()}
    stream = torch.cuda.current_stream().cuda_stream if device == "cuda" else 0
    _C.label_rows(
        z,
        labels.to(device),
        **out,
        **coef,
        temperature=temperature,
        softcap=softcap,
        topk=topk,
        stream=stream,
        **kw,
    )
    res = {k: t.cpu() for k, t in out.items()}
    res["grad"] = z.cpu() if grad else None
    return res


def _close(got, want, rtol, what):
    if want is None:
        assert got is None, what
        return
    inf = torch.isinf(want)
    assert torch.equal(torch.isinf(got), inf), what
    assert torch.equal(got[inf], want[inf]), what
    a, b = got[~inf].double(), want[~inf].double()
    if b.numel() == 0:
        return
    scale = max(b.abs().max().item(), 1e-6)
    err = (a - b).abs().max().item()
    assert err <= rtol * scale, f"{what}: error {err:.3g}, scale {scale:.3g}"


CASES = [
    # v, temperature, softcap, topk, e_coef
    (1, 1.0, 0.0, 1, False),
    (37, 0.7, 0.0, 5, True),
    (37, 1.0, 4.0, 37, False),
    (4099, 1.3, 30.0, 20, True),
    (128256, 1.0, 0.0, 50, True),
]


@pytest.mark.parametrize("v,temperature,softcap,topk,e_coef", CASES)
def test_label_rows_cuda_matches_cpu(v, temperature, softcap, topk, e_coef):
    x, labels = _rows(6 if v < 100000 else 4, v, seed=v)
    for grad in (False, True):
        cpu = _call(x, labels, "cpu", temperature, softcap, topk, grad, e_coef)
        dev = _call(x, labels, "cuda", temperature, softcap, topk, grad, e_coef)
        for k in cpu:
            _close(dev[k], cpu[k], 2e-5 if k == "grad" else 1e-5, f"{k} (grad={grad})")
        assert torch.equal(dev["is_top1"], cpu["is_top1"])
        if v > 1:
            assert dev["is_top1"][1] == 0.0
        # Ignored rows: 0 statistics and a 0 gradient row.
        for k in STATS:
            if k in dev:
                assert dev[k][3] == 0.0, k
        if grad:
            assert torch.all(dev["grad"][3] == 0)


def test_label_rows_cuda_low_precision_logits():
    # bf16 / fp16 logits are read in their dtype and computed in fp32: the CPU's fp32 row of the
    # same values; the gradient is stored in the logits' dtype.
    x, labels = _rows(5, 3001, seed=5, ties=False)
    for dtype in (torch.bfloat16, torch.float16):
        xl = x.to(dtype)
        cpu = _call(xl.float(), labels, "cpu", 1.0, 0.0, 8, True, True)
        dev = _call(xl, labels, "cuda", 1.0, 0.0, 8, True, True)
        for k in STATS:
            _close(dev[k], cpu[k], 1e-5, k)
        assert dev["grad"].dtype == dtype
        _close(dev["grad"].float(), cpu["grad"], 1e-2, "grad")


def test_label_rows_cuda_two_runs_same_bits():
    x, labels = _rows(64, 50000, seed=9)
    a = _call(x, labels, "cuda", 1.1, 0.0, 16, True, True)
    b = _call(x, labels, "cuda", 1.1, 0.0, 16, True, True)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_label_rows_cuda_errors_and_deferred_checks():
    x, labels = _rows(6, 333, seed=2)
    x[4, 17] = float("nan")
    with pytest.raises(_C.Error, match="the logits of token 14 "):
        _call(x, labels, "cuda", 1.0, 0.0, 0, True, False, first_token=10, fn="fused_ce")
    bad = labels.clone()
    bad[2] = 333
    with pytest.raises(_C.Error, match=r"labels\[2\] = 333 is out of range \[0, 333\)"):
        _call(x[:4], bad[:4], "cuda", 1.0, 0.0, 0, False, False)
    # check_finite=False: no error; the bad row's statistics and gradient are NaN, the others
    # are as with the check.
    quiet = _call(x, labels, "cuda", 1.0, 0.0, 0, True, False, check_finite=False)
    assert torch.isnan(quiet["lse"][4]) and torch.isnan(quiet["grad"][4]).all()
    x[4, 17] = 0.0
    ok = _call(x, labels, "cuda", 1.0, 0.0, 0, True, False)
    for k in ok:
        assert torch.equal(quiet[k][:4], ok[k][:4]), k


def test_label_rows_cuda_graph_capture():
    n, v = 8, 2000
    x, labels = _rows(n, v, seed=4)
    z, y = x.cuda(), labels.cuda()
    lse = torch.zeros(n, dtype=torch.float64, device="cuda")
    s = torch.ones(n, dtype=torch.float64, device="cuda")
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())

    def run():
        _C.label_rows(
            z,
            y,
            lse=lse,
            coef_a0=s,
            coef_b=-s,
            coef_c=0 * s,
            stream=stream.cuda_stream,
            check_finite=False,
        )

    with torch.cuda.stream(stream):
        run()  # warm-up
        z.copy_(x.cuda())
        with torch.cuda.graph(graph, stream=stream):
            run()
    torch.cuda.current_stream().wait_stream(stream)
    z.copy_(x.cuda())
    graph.replay()
    torch.cuda.synchronize()
    ref = _call(x, labels, "cpu", 1.0, 0.0, 0, False, False)
    _close(lse.cpu(), ref["lse"], 1e-6, "lse")


def _label_row_calls():
    calls = []
    real = torch_ops._label_rows

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    torch_ops._label_rows = counted
    return calls, lambda: setattr(torch_ops, "_label_rows", real)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("softcap", [None, 15.0])
def test_fused_cross_entropy_cuda_rows_match_cpu(reduction, softcap):
    g = torch.Generator().manual_seed(6)
    n, h, v = 45, 64, 4099
    xs = [torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) / h**0.5]
    labels = torch.arange(n) * 11 % v  # multiples of 11: never a masked entry
    labels[3] = -100
    outs = []
    calls, undo = _label_row_calls()
    try:
        for device in ("cpu", "cuda"):
            hd, w = (x.to(device).requires_grad_() for x in xs)
            loss, lp, ent = divkit.fused_linear_cross_entropy(
                hd,
                w,
                labels.to(device),
                reduction=reduction,
                label_smoothing=0.1,
                lse_square_scale=1e-3,
                softcap=softcap,
                chunk_size=16,
                return_stats=True,
            )
            loss.sum().backward()
            outs.append([x.detach().cpu() for x in (loss, lp, ent, hd.grad, w.grad)])
    finally:
        undo()
    assert calls, "the CUDA label-row kernel was not used"
    for a, b, name in zip(outs[1], outs[0], ("loss", "logprobs", "entropy", "grad_h", "grad_w")):
        _close(a, b, 2e-5, name)


def _smooth_call(x, labels, device, softcap, smooth):
    cnt = torch.full((x.shape[0],), -7.0, dtype=torch.float64, device=device)
    r = _call(x, labels, device, 0.9, softcap, 8, True, True, smooth_unmasked=smooth, unmasked=cnt)
    r["unmasked"] = cnt.cpu()
    return r


def test_label_rows_cuda_smooth_unmasked_matches_cpu():
    # Label smoothing over the unmasked entries (smooth_unmasked) and the unmasked count, with
    # -inf columns and a row whose only unmasked entry is its label, against the CPU path; with
    # no masked entry, the same bits as smoothing over every entry.
    x, labels = _rows(6, 4099, seed=11)
    clean = x.clone()
    x[:, 5::7] = float("-inf")
    x[4] = float("-inf")
    x[4, labels[4]] = 1.0
    for softcap in (0.0, 15.0):
        for smooth in (True, False):
            cpu = _smooth_call(x, labels, "cpu", softcap, smooth)
            dev = _smooth_call(x, labels, "cuda", softcap, smooth)
            for k in cpu:
                _close(dev[k], cpu[k], 2e-5 if k == "grad" else 1e-5, f"{k} smooth={smooth}")
            assert dev["unmasked"][4] == 1.0 and dev["unmasked"][3] == 0.0
            assert torch.isinf(dev["mean_z"][0]) != smooth
        on = _smooth_call(clean, labels, "cuda", softcap, True)
        off = _call(clean, labels, "cuda", 0.9, softcap, 8, True, True)
        for k in off:
            assert torch.equal(on[k], off[k]), k


@pytest.mark.parametrize("deferred", [False, True])
def test_fused_cross_entropy_cuda_masked_smoothing(deferred):
    # Label smoothing with -inf bias entries runs in the kernel (no PyTorch rows, no bias read,
    # inside deferred_checks too) and matches the CPU head, which spreads it over the unmasked
    # entries.
    import contextlib

    from divkit import cuda_checks

    g = torch.Generator().manual_seed(8)
    n, h, v = 45, 64, 4099
    xs = [
        torch.randn(n, h, generator=g),
        torch.randn(v, h, generator=g) / h**0.5,
        torch.randn(v, generator=g),
    ]
    xs[2][7::11] = float("-inf")
    labels = torch.arange(n) * 11 % v  # multiples of 11: never a masked entry
    labels[3] = -100
    outs = []
    calls, undo = _label_row_calls()
    try:
        for device in ("cpu", "cuda"):
            hd, w, b = (x.to(device).requires_grad_() for x in xs)
            ctx = deferred and device == "cuda"
            with cuda_checks.deferred_checks() if ctx else contextlib.nullcontext():
                loss, lp, ent = divkit.fused_linear_cross_entropy(
                    hd,
                    w,
                    labels.to(device),
                    bias=b,
                    label_smoothing=0.1,
                    softcap=15.0,
                    chunk_size=16,
                    return_stats=True,
                )
            loss.sum().backward()
            outs.append([x.detach().cpu() for x in (loss, lp, ent, hd.grad, w.grad, b.grad)])
    finally:
        undo()
    assert len(calls) == 3, "every chunk takes the CUDA label-row kernel"
    assert torch.isfinite(outs[1][0]).all()
    names = ("loss", "logprobs", "entropy", "grad_h", "grad_w", "grad_b")
    for a, b, name in zip(outs[1], outs[0], names):
        _close(a, b, 2e-5, name)


def test_fused_logprobs_cuda_rows_match_cpu():
    g = torch.Generator().manual_seed(7)
    n, h, v = 40, 64, 3001
    xs = [torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) / h**0.5]
    labels = torch.arange(n) * 13 % v
    labels[5] = -100
    outs = []
    calls, undo = _label_row_calls()
    try:
        for device in ("cpu", "cuda"):
            hd, w = (x.to(device).requires_grad_() for x in xs)
            r = divkit.fused_linear_logprobs(
                hd,
                w,
                labels.to(device),
                temperature=0.8,
                return_entropy=True,
                topk=10,
                chunk_size=16,
                return_log_sum_sq_probs=True,
                return_is_top1=True,
            )
            (r.logprobs.sum() + 0.5 * r.entropy.sum()).backward()
            got = [r.logprobs, r.entropy, r.topk_mass, r.log_sum_sq_probs, r.is_top1]
            outs.append([x.detach().cpu() for x in got] + [hd.grad.cpu(), w.grad.cpu()])
    finally:
        undo()
    assert len(calls) >= 2, "the CUDA label-row kernel was not used in forward and backward"
    assert torch.equal(outs[1][4], outs[0][4])
    for i, name in enumerate(("logprobs", "entropy", "topk_mass", "log_sum_sq", "", "gh", "gw")):
        if name:
            _close(outs[1][i], outs[0][i], 2e-5, name)
