"""GPU tests: run by scripts/gpu_check.sh on a machine with a CUDA device; skipped elsewhere."""

import pytest


def _cuda_ready() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device"
    from divkit import _C

    if not _C.cuda_built():
        return "divkit was built without CUDA"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _cuda_ready()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        item.add_marker(skip)
