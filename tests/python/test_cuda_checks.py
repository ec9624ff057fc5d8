"""divkit.cuda_checks.deferred_checks: the flag it sets, how it reaches the core's options on CUDA
routes only, and that CPU calls keep their checks whatever the flag (GPU behaviour: tests/gpu)."""

import pytest
import torch

import divkit
from divkit import _C, _device
from divkit.cuda_checks import check_finite, deferred_checks


def test_flag_is_scoped_and_restored():
    assert check_finite()
    with deferred_checks():
        assert not check_finite()
        with deferred_checks():
            assert not check_finite()
        assert not check_finite()
    assert check_finite()
    with pytest.raises(RuntimeError):
        with deferred_checks():
            raise RuntimeError("boom")
    assert check_finite()


def test_reaches_cuda_routes_only():
    cuda_route = _device.Route("core", torch.device("cuda:0"), 1234)
    cpu_route = _device.Route("core", torch.device("cpu"))
    with deferred_checks():
        args = cuda_route.core_args(_C.DivergenceArgs())
        assert args.stream == 1234 and args.check_finite is False
        assert cpu_route.core_args(_C.DivergenceArgs()).check_finite is True
    assert cuda_route.core_args(_C.DivergenceArgs()).check_finite is True


def test_cpu_calls_always_check():
    s = torch.randn(3, 10)
    t = torch.randn(3, 10)
    s[1, 2] = float("nan")
    with deferred_checks():
        with pytest.raises(divkit.Error, match="student_logits contains NaN"):
            divkit.divergence(s, t)
    loss = torch.zeros(1)
    args = _C.DivergenceArgs(check_finite=False)
    with pytest.raises(_C.Error, match="student_logits contains NaN"):
        _C.divergence(s, t, loss, None, None, None, None, args)
    idx = torch.tensor([[0, 1], [2, 3], [4, 5]])
    lp = torch.log(torch.full((3, 2), 0.25))
    with pytest.raises(_C.Error, match="student_logits contains NaN"):
        _C.sparse_divergence(s, idx, lp, loss, None, None, None, "bucket", args)
