"""The fused heads on CUDA tensors (torch GEMMs + divkit's CUDA row kernel in the PyTorch chunk
loop, or the loop's PyTorch rows on a build without CUDA) against the C++ CPU fused head on the
same inputs; two runs bitwise equal; the peak memory holds no [tokens x V] tensor.

Runs under pytest or tests/gpu/mini_pytest.py (no fixtures, no ids)."""

import pytest
import torch

import divkit
from divkit import _C, _device
from divkit.backends import torch_ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

KIND_PARAMS = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.3}),
    ("alpha_divergence", {"alpha": 0.7}),
    ("renyi", {"alpha": 1.6}),
    ("tvd", {}),
]


def _inputs(n, h, v, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(n, h, generator=g).to(dtype),
        (torch.randn(v, h, generator=g) / h**0.5).to(dtype),
        torch.randn(n, h, generator=g).to(dtype),
        (torch.randn(v, h, generator=g) / h**0.5).to(dtype),
    ]


def _distill(xs, kind, params, labels, device, grad_teacher=False, **kw):
    ts = [x.to(device).requires_grad_(i < 2 or grad_teacher) for i, x in enumerate(xs)]
    loss = divkit.fused_linear_divergence(
        *ts, kind, labels=None if labels is None else labels.to(device), **params, **kw
    )
    loss.sum().backward() if loss.dim() else loss.backward()
    return [loss.detach().cpu()] + [t.grad.cpu() if t.grad is not None else None for t in ts]


def _close(got, want, rtol):
    for a, b in zip(got, want):
        if b is None:
            assert a is None
            continue
        scale = max(b.double().abs().max().item(), 1e-6)
        err = (a.double() - b.double()).abs().max().item()
        assert err <= rtol * scale, f"error {err:.3g}, scale {scale:.3g}"


def _row_calls():
    """Counts the CUDA row-kernel calls of the fused loop (CoreRows)."""
    calls = []
    real = torch_ops.CoreRows.divergence

    def counted(self, *a, **k):
        calls.append(1)
        return real(self, *a, **k)

    torch_ops.CoreRows.divergence = counted
    return calls, lambda: setattr(torch_ops.CoreRows, "divergence", real)


@pytest.mark.parametrize("kind,params", KIND_PARAMS)
@pytest.mark.parametrize("hard_weight", [0.0, 0.5])
def test_fused_divergence_fp32_matches_cpu(kind, params, hard_weight):
    xs = _inputs(37, 64, 3001, torch.float32, seed=1)
    labels = torch.arange(37) * 7 % 3001
    labels[5] = -100
    kw = dict(hard_weight=hard_weight, chunk_size=16, temperature=1.3, grad_teacher=True)
    cpu = _distill(xs, kind, params, labels, "cpu", **kw)
    calls, undo = _row_calls()
    try:
        dev = _distill(xs, kind, params, labels, "cuda", **kw)
    finally:
        undo()
    if _C.cuda_built() and _device.has_cuda_kernel("divergence"):
        assert calls, "the CUDA row kernel was not used"
    _close(dev, cpu, 2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_divergence_low_precision_matches_cpu(dtype):
    xs = _inputs(64, 128, 5003, dtype, seed=2)
    cpu = _distill(xs, "jsd", {"beta": 0.5}, None, "cpu", chunk_size=32)
    dev = _distill(xs, "jsd", {"beta": 0.5}, None, "cuda", chunk_size=32)
    assert dev[1].dtype == dtype
    # The loss from fp32 logits (exact bf16 products, fp32 sums); the gradient GEMMs take the
    # logit gradient rounded to the input dtype: bf16-level agreement.
    assert abs(dev[0].item() - cpu[0].item()) <= 1e-4 * abs(cpu[0].item()) + 1e-6
    _close(dev[1:], cpu[1:], 2e-2)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_cross_entropy_and_logprobs_match_cpu(reduction):
    xs = _inputs(45, 64, 4099, torch.float32, seed=3)[:2]
    labels = torch.arange(45) * 11 % 4099
    labels[3] = -100
    outs = []
    for device in ("cpu", "cuda"):
        h, w = (x.to(device).requires_grad_() for x in xs)
        loss = divkit.fused_linear_cross_entropy(
            h, w, labels.to(device), reduction=reduction, label_smoothing=0.1, chunk_size=16
        )
        lp = divkit.fused_linear_logprobs(h, w, labels.to(device), chunk_size=16)
        (loss.sum() + lp.sum()).backward()
        outs.append([loss.detach().cpu(), lp.detach().cpu(), h.grad.cpu(), w.grad.cpu()])
    _close(outs[1], outs[0], 2e-5)


def test_fused_two_runs_same_bits():
    xs = _inputs(96, 128, 8191, torch.bfloat16, seed=4)
    a = _distill(xs, "jsd", {}, None, "cuda", chunk_size=40)
    b = _distill(xs, "jsd", {}, None, "cuda", chunk_size=40)
    for x, y in zip(a, b):
        if x is not None:
            assert torch.equal(x.view(torch.uint8), y.view(torch.uint8))


def test_fused_peak_memory_holds_no_logits():
    # N x V fp32 logits would be 2 GiB; the loop holds a few temporaries of chunk x V (the
    # PyTorch row step, on a build without CUDA, about 15 of them) and the fp32 accumulator of
    # the weight gradient.
    n, h, v, chunk = 16384, 256, 32768, 128
    xs = [x.cuda() for x in _inputs(n, h, v, torch.bfloat16, seed=5)]
    sh = xs[0].requires_grad_()
    sw = xs[1].requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = divkit.fused_linear_divergence(sh, sw, xs[2], xs[3], "jsd", chunk_size=chunk)
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    chunk_bytes = chunk * v * 4
    assert extra <= 24 * chunk_bytes + 3 * v * h * 4, f"extra peak {extra / 2**20:.0f} MiB"
    assert extra < n * v * 4 / 4


def test_fused_errors_name_the_function():
    xs = _inputs(8, 16, 99, torch.float32, seed=6)
    xs[3][4, 2] = float("nan")
    with pytest.raises(divkit.Error, match="^fused_linear_divergence: "):
        divkit.fused_linear_divergence(*[x.cuda() for x in xs])
    with pytest.raises(divkit.Error, match="is on cpu but"):
        divkit.fused_linear_divergence(xs[0].cuda(), *xs[1:])


def _one_rank_group(backend):
    """A process group of this process alone (NCCL for CUDA tensors), in a hash store: the
    vocabulary-parallel path's collectives on the GPU, with the whole vocabulary as the shard."""
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.group.WORLD, False
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.group.WORLD, True


def _vocab_parallel_against_cpu(device, pg_backend, dtype, tol):
    import torch.distributed as dist

    group, made = _one_rank_group(pg_backend)
    # bf16 / fp16 on CUDA: fp32 logits from the same products summed in another order.
    loss_tol = 2e-5 if dtype == torch.float32 else 1e-4
    try:
        xs = _inputs(41, 64, 2053, dtype, seed=7)
        labels = torch.arange(41) * 13 % 2053
        labels[4] = -100
        for kind, params in (("forward_kl", {}), ("jsd", {"beta": 0.3}), ("renyi", {"alpha": 1.6})):
            kw = dict(hard_weight=0.4, chunk_size=16, temperature=1.2, grad_teacher=True)
            cpu = _distill(xs, kind, params, labels, "cpu", **kw)
            dev = _distill(xs, kind, params, labels, device, process_group=group, **kw)
            _close(dev[:1], cpu[:1], loss_tol)
            _close(dev[1:], cpu[1:], tol)
        h, w = xs[0], xs[1]
        outs = []
        for d, g in (("cpu", None), (device, group)):
            hd, wd = (x.to(d).requires_grad_() for x in (h, w))
            loss = divkit.fused_linear_cross_entropy(
                hd, wd, labels.to(d), label_smoothing=0.1, chunk_size=16, process_group=g
            )
            res = divkit.fused_linear_logprobs(
                hd, wd, labels.to(d), return_entropy=True, topk=5, chunk_size=16, process_group=g
            )
            (loss + res.logprobs.sum() + res.entropy.sum()).backward()
            outs.append(
                [loss.detach().cpu(), res.logprobs.cpu(), res.entropy.cpu(), res.topk_mass.cpu()]
                + [hd.grad.cpu(), wd.grad.cpu()]
            )
        _close(outs[1][:4], outs[0][:4], loss_tol)
        _close(outs[1][4:], outs[0][4:], tol)
        # The token-level divergence of logits already sharded (here: the whole vocabulary).
        from divkit.distributed import vocab_parallel_divergence

        g = torch.Generator().manual_seed(9)
        s, t = (torch.randn(37, 2053, generator=g).to(dtype) * 3 for _ in range(2))
        for kind in ("forward_kl", "jsd", "renyi"):
            outs = []
            for d, f in (("cpu", divkit.divergence), (device, vocab_parallel_divergence)):
                sd, td = (x.to(d).requires_grad_() for x in (s, t))
                kw = {} if f is divkit.divergence else {"process_group": group}
                loss = f(sd, td, kind, labels=labels[:37].to(d), temperature=1.3, **kw)
                loss.backward()
                outs.append([loss.detach().cpu(), sd.grad.cpu(), td.grad.cpu()])
            _close(outs[1][:1], outs[0][:1], loss_tol)
            _close(outs[1][1:], outs[0][1:], tol)
    finally:
        if made:
            dist.destroy_process_group()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
def test_vocab_parallel_cuda_nccl(dtype, tol):
    """process_group= on CUDA tensors (the PyTorch chunk loop's vocabulary-parallel phases, NCCL
    all-reduces on the GPU) against the unsharded CPU head; one rank, so every collective runs
    and the shard is the whole vocabulary."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_nccl_available():
        pytest.skip("this torch has no NCCL")
    _vocab_parallel_against_cpu("cuda", "nccl", dtype, tol)


def _pair(dtype, seed=8, bsz=3, t=24, h=64, hr=48, v=3001):
    g = torch.Generator().manual_seed(seed)
    pol = [
        torch.randn(bsz, t, h, generator=g).to(dtype),
        torch.randn(bsz, t, h, generator=g).to(dtype),
        (torch.randn(v, h, generator=g) / h**0.5).to(dtype),
    ]
    ref = [
        torch.randn(bsz, t, hr, generator=g).to(dtype),
        torch.randn(bsz, t, hr, generator=g).to(dtype),
        (torch.randn(v, hr, generator=g) / hr**0.5).to(dtype),
    ]
    cl, rl = torch.randint(0, v, (bsz, t), generator=g), torch.randint(0, v, (bsz, t), generator=g)
    cl[:, :5] = -100
    rl[1, :9] = -100
    return pol, ref, cl, rl


def _tdpo(fn, pol, ref, cl, rl, device, keep_bytes):
    xs = [x.to(device).requires_grad_() for x in pol]
    rs = [x.to(device) for x in ref]
    out = fn(
        xs[0],
        xs[1],
        xs[2],
        cl.to(device),
        rl.to(device),
        ref_chosen_hidden=rs[0],
        ref_rejected_hidden=rs[1],
        ref_weight=rs[2],
        chunk_size=16,
        keep_bytes=keep_bytes,
    )
    (out[0] * torch.tensor([1.0, 0.5, 2.0], device=device)).sum().backward()
    return [o.detach().cpu() for o in out] + [x.grad.cpu() for x in xs]


@pytest.mark.parametrize("fn_name", ["tdpo_loss_fused", "sparsepo_loss_fused"])
@pytest.mark.parametrize("keep_bytes", [None, 0])
def test_tdpo_fused_cuda(fn_name, keep_bytes):
    """The one pass of the token-level preference losses from two heads on CUDA tensors
    (torch_ops.fused_linear_label_terms) against the C++ engine on the CPU."""
    fn = getattr(divkit, fn_name)
    calls = []
    real = torch_ops.fused_linear_label_terms

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    kl_rows = []
    real_div = torch_ops.CoreRows.divergence

    def counted_div(self, *a, **k):
        kl_rows.append(a[0].device.type)
        return real_div(self, *a, **k)

    pol, ref, cl, rl = _pair(torch.float32)
    cpu = _tdpo(fn, pol, ref, cl, rl, "cpu", keep_bytes)
    torch_ops.fused_linear_label_terms = counted
    torch_ops.CoreRows.divergence = counted_div
    try:
        dev = _tdpo(fn, pol, ref, cl, rl, "cuda", keep_bytes)
    finally:
        torch_ops.fused_linear_label_terms = real
        torch_ops.CoreRows.divergence = real_div
    assert calls, "the PyTorch label-terms pass did not run on CUDA"
    # fp32 on a build with the CUDA divergence kernel: the KL rows of every chunk went to it.
    if "divergence" in _C.cuda_ops():
        assert kl_rows and set(kl_rows) == {"cuda"}, kl_rows
    _close(dev, cpu, 3e-5)
    pol, ref, cl, rl = _pair(torch.bfloat16)
    cpu = _tdpo(fn, pol, ref, cl, rl, "cpu", keep_bytes)
    dev = _tdpo(fn, pol, ref, cl, rl, "cuda", keep_bytes)
    _close(dev[:3], cpu[:3], 1e-3)
    _close(dev[3:], cpu[3:], 2e-2)
