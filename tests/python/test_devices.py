"""Device checks and the choice of engine (divkit._device), without a GPU: mixed devices (the
"meta" device stands in for a second one), the backend argument, and which engine a call runs."""

from __future__ import annotations

import types

import pytest
import torch

import divkit
from conftest import logits
from divkit import _device
from divkit.backends import torch_ops

S = logits(3, 8, seed=0)
T = logits(3, 8, seed=1)
IDX = torch.tensor([[0, 1], [2, 3], [4, 5]])
LP = torch.log(torch.tensor([[0.5, 0.2]] * 3))


def meta(x):
    return x.to("meta")


@pytest.mark.parametrize(
    "call, names",
    [
        (lambda: divkit.divergence(S, meta(T)), ["teacher_logits", "meta", "student_logits"]),
        (lambda: divkit.divergence(meta(S), T), ["teacher_logits", "cpu", "meta"]),
        (
            lambda: divkit.divergence(S, T, labels=meta(torch.zeros(3, dtype=torch.long))),
            ["labels", "meta", "student_logits", "cpu"],
        ),
        (lambda: divkit.divergence(S, T, weights=meta(torch.ones(3))), ["weights", "meta"]),
        (lambda: divkit.divergence_and_grad(S, meta(T)), ["divergence_and_grad", "teacher_logits"]),
        (
            lambda: divkit.sparse_divergence(S, meta(IDX), LP),
            ["sparse_divergence", "teacher_indices", "meta"],
        ),
        (
            lambda: divkit.sparse_divergence(S, IDX, meta(LP)),
            ["sparse_divergence", "teacher_logprobs", "meta"],
        ),
        (lambda: divkit.topk_divergence(S, meta(T), 2), ["topk_divergence", "teacher_logits"]),
    ],
)
@pytest.mark.parametrize("backend", ["auto", "core", "torch"])
def test_mixed_devices_raise_naming_argument_and_devices(call, names, backend):
    with pytest.raises(divkit.Error) as info:
        call()
    msg = str(info.value)
    for name in names:
        assert name in msg, f"{name!r} not in {msg!r}"
    assert "on one device" in msg


def test_mixed_device_message():
    with pytest.raises(divkit.Error, match="^divergence: teacher_logits is on meta but "):
        divkit.divergence(S, meta(T))


@pytest.mark.parametrize("backend", ["auto", "core", "torch"])
def test_a_device_without_kernel_raises(backend):
    with pytest.raises(divkit.Error, match="divergence: no kernel for device meta"):
        divkit.divergence(meta(S), meta(T), backend=backend)


@pytest.mark.parametrize(
    "fn",
    [
        lambda b: divkit.divergence(S, T, backend=b),
        lambda b: divkit.divergence_and_grad(S, T, backend=b),
        lambda b: divkit.sparse_divergence(S, IDX, LP, backend=b),
        lambda b: divkit.topk_divergence(S, T, 2, backend=b),
        lambda b: divkit.nn.DivergenceLoss(backend=b),
    ],
)
def test_backend_argument_is_validated(fn):
    with pytest.raises(divkit.Error, match="unknown backend 'gpu' \\(valid: auto, core, torch\\)"):
        fn("gpu")
    with pytest.raises(TypeError, match="backend must be a str"):
        fn(1)


def test_auto_on_cpu_runs_the_core(monkeypatch):
    calls = []
    for name in ("divergence", "sparse_divergence", "topk_divergence"):
        real = getattr(torch_ops, name)

        def spy(*a, _real=real, _name=name, **kw):
            calls.append(_name)
            return _real(*a, **kw)

        monkeypatch.setattr(torch_ops, name, spy)
    s = S.clone().requires_grad_(True)
    for backend in ("auto", "core"):
        auto = divkit.divergence(s, T, "jsd", backend=backend)
        divkit.sparse_divergence(S, IDX, LP, backend=backend)
        divkit.topk_divergence(S, T, 2, backend=backend)
    assert calls == []
    core = divkit.divergence(s, T, "jsd", backend="core")
    assert torch.equal(auto, core)  # the same engine: the same bits
    divkit.divergence(s, T, "jsd", backend="torch")
    divkit.sparse_divergence(S, IDX, LP, backend="torch")
    divkit.topk_divergence(S, T, 2, backend="torch")
    assert calls == ["divergence", "sparse_divergence", "topk_divergence"]


def test_numpy_inputs_stay_on_the_core():
    loss = divkit.divergence(S.numpy(), T.numpy())
    assert float(loss) == pytest.approx(float(divkit.divergence(S, T)), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# The routing rule itself, with a stand-in CUDA device (no GPU is needed to check the choice).
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def fake_cuda(monkeypatch):
    """Makes every call look like one on cuda:1 whose current stream is 1234."""
    monkeypatch.setattr(_device, "common_device", lambda fn, tensors: torch.device("cuda", 1))
    streams = []

    def current_stream(dev):
        streams.append(dev)
        return types.SimpleNamespace(cuda_stream=1234)

    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return streams


def test_cuda_build_routes_to_the_core_on_the_current_stream(fake_cuda, monkeypatch):
    monkeypatch.setattr(divkit._C, "cuda_built", lambda: True, raising=False)
    monkeypatch.setattr(divkit._C, "cuda_ops", lambda: ["divergence"], raising=False)
    r = _device.route("divergence", "divergence", "auto", ())
    assert r == _device.Route("core", torch.device("cuda", 1), 1234)
    args = types.SimpleNamespace(kind="forward_kl")
    assert r.core_args(args).stream == 1234
    assert fake_cuda == [torch.device("cuda", 1)]
    assert _device.route("divergence", "divergence", "torch", ()).engine == "torch"
    # An op the CUDA build has no kernel for: the fallback (auto) or an error (core).
    r = _device.route("sparse_divergence", "sparse_divergence", "auto", ())
    assert r == _device.Route("torch", torch.device("cuda", 1))
    with pytest.raises(divkit.Error, match="^topk_divergence: no kernel for device cuda:1$"):
        _device.route("topk_divergence", "topk_divergence", "core", ())
    # The fused heads: the PyTorch chunk loop with the CUDA row kernel as its row step.
    r = _device.route("fused_linear_divergence", "fused_linear_divergence", "auto", ())
    assert r == _device.Route("torch", torch.device("cuda", 1), 1234, rows="core")
    r = _device.route("fused_linear_divergence", "fused_linear_divergence", "torch", ())
    assert r.rows == "torch"
    # A build that does not list its kernels is taken at the contract's list.
    monkeypatch.delattr(divkit._C, "cuda_ops", raising=False)
    assert _device.route("topk_divergence", "topk_divergence", "auto", ()).core


def test_sinkhorn_routes_to_its_cuda_kernel_when_the_build_has_it(fake_cuda, monkeypatch):
    monkeypatch.setattr(divkit._C, "cuda_built", lambda: True, raising=False)
    monkeypatch.setattr(divkit._C, "cuda_ops", lambda: ["divergence", "sinkhorn"], raising=False)
    r = _device.route("sinkhorn", "sinkhorn", "auto", ())
    assert r == _device.Route("core", torch.device("cuda", 1), 1234)
    assert _device.route("sinkhorn", "sinkhorn", "torch", ()).engine == "torch"
    # A CUDA build without the kernel (an older one): the fallback, or an error for "core".
    monkeypatch.setattr(divkit._C, "cuda_ops", lambda: ["divergence"], raising=False)
    assert _device.route("sinkhorn", "sinkhorn", "auto", ()) == _device.Route(
        "torch", torch.device("cuda", 1)
    )
    with pytest.raises(divkit.Error, match="^sinkhorn: no kernel for device cuda:1$"):
        _device.route("sinkhorn", "sinkhorn", "core", ())
    # The other OT solvers have no CUDA kernel: the fallback.
    for op in ("sparse_ot", "mmd", "cs_divergence"):
        assert _device.route(op, op, "auto", ()).engine == "torch"


def test_cuda_without_kernels_falls_back(fake_cuda, monkeypatch):
    monkeypatch.setattr(divkit._C, "cuda_built", lambda: False, raising=False)
    r = _device.route("divergence", "divergence", "auto", ())
    assert r.engine == "torch" and r.stream is None
    with pytest.raises(divkit.Error, match="^divergence: no kernel for device cuda:1$"):
        _device.route("divergence", "divergence", "core", ())
    assert _device.route("fused_linear_divergence", "fused_linear_divergence", "auto", ()) == (
        _device.Route("torch", torch.device("cuda", 1))
    )
    for op in ("sinkhorn", "sparse_ot", "mmd", "cs_divergence"):
        assert _device.route(op, op, "auto", ()).engine == "torch"
    # An op without a fallback: an error, not a copy to the host.
    with pytest.raises(divkit.Error, match="^kde_bandwidth: no kernel for device cuda:1"):
        _device.route("kde_bandwidth", "kde_bandwidth", "auto", ())


def test_cpu_route_passes_no_stream():
    r = _device.route("divergence", "divergence", "auto", (("student_logits", S),))
    assert r == _device.Route("core", torch.device("cpu"), None)
    args = types.SimpleNamespace()
    assert r.core_args(args) is args and not hasattr(args, "stream")
