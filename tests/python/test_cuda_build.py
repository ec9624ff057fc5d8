"""The CUDA build's Python surface that is testable without a GPU: the build and device
queries, the `stream` field of DivergenceArgs, and `divkit info`."""

import json

import torch

import divkit
from divkit import _C
from divkit.cli import main


def test_cuda_queries():
    assert isinstance(_C.cuda_built(), bool)
    count = _C.cuda_device_count()
    assert isinstance(count, int) and count >= 0
    if not _C.cuda_built():
        assert count == 0
    assert len(_C.cuda_devices()) == count
    assert "divergence" in _C.cuda_ops()
    assert "label_rows" in _C.cuda_ops()  # the label heads' row step (_C.label_rows)


def test_stream_field_is_ignored_for_cpu_tensors():
    s, t = torch.randn(3, 11), torch.randn(3, 11)
    out = []
    for stream in (0, 12345):
        args = _C.DivergenceArgs(kind="jsd", stream=stream)
        assert args.stream == stream
        loss, gs = torch.zeros(1), torch.empty(3, 11)
        _C.divergence(s, t, loss, gs, None, None, None, args)
        out.append((loss, gs))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
    assert _C.DivergenceArgs().stream == 0


def test_info_reports_cuda(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cuda_built"] == _C.cuda_built()
    assert info["cuda_devices"] == (list(_C.cuda_devices()) if _C.cuda_built() else [])
    assert main(["info"]) == 0
    assert "cuda kernels:" in capsys.readouterr().out
    assert divkit.Error is _C.Error
