"""Where an op runs: the one place that decides it, per call, from the tensors' device.

* Every tensor argument of a call must be on one device; otherwise :class:`divkit.Error`
  names the public function, the argument and both devices.
* ``backend="auto"`` (the default): CPU tensors go to the C++ core; CUDA tensors go to the core
  when it was built with CUDA and the op has a CUDA kernel (``_C.cuda_ops()``), on PyTorch's
  current stream of that device (``DivergenceArgs.stream``, an integer: nanobind's DLPack
  import does not synchronize); the fused heads on such a build run the PyTorch chunk loop
  (torch GEMMs) with divkit's CUDA row kernel as its row step (``Route.rows == "core"``, see
  :data:`CORE_ROWS`; with ``process_group`` the loop's vocabulary-parallel mode, whose rows
  are PyTorch ops between torch.distributed all-reduces); anything
  else (MPS, XPU, a build without CUDA, an op without a CUDA kernel) goes to the PyTorch
  fallback (:mod:`divkit.backends.torch_ops`) when the op has one, and raises
  ``"<fn>: no kernel for device <d>"`` when it has none (never a silent copy to the host).
* ``backend="core"``: the C++ core or an error; ``backend="torch"``: the fallback on any device.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence, Tuple

import torch

from . import _C, cuda_checks
from . import _validate as check

__all__ = ["BACKENDS", "Route", "backend", "common_device", "route"]

#: Values of the ``backend`` keyword.
BACKENDS: Tuple[str, ...] = ("auto", "core", "torch")

#: Ops whose C++ core may have a CUDA kernel; a CUDA build says which it has (``_C.cuda_ops()``).
CUDA_OPS = frozenset(
    {"divergence", "sparse_divergence", "topk_divergence", "sinkhorn", "label_rows"}
)
#: Ops with a PyTorch fallback (divkit.backends.torch_ops).
TORCH_OPS = frozenset(
    {
        "divergence",
        "sparse_divergence",
        "topk_divergence",
        "fused_linear_divergence",
        "fused_linear_cross_entropy",
        "fused_linear_logprobs",
        "fused_linear_sparse_divergence",
        "fused_linear_label_terms",  # TDPO / SparsePO's one pass (preference/_token_head.py)
        "vocab_parallel_divergence",
        "sinkhorn",  # divkit.backends.torch_ot, like the three below
        "sparse_ot",
        "mmd",
        "cs_divergence",
    }
)
#: The fused heads whose PyTorch chunk loop (GEMMs in torch) can call divkit's CUDA row kernel
#: for each chunk's logits: op -> the row kernel it needs.
CORE_ROWS = {
    "fused_linear_divergence": "divergence",
    "fused_linear_sparse_divergence": "sparse_divergence",
    # The label heads' rows: _C.label_rows (statistics and gradient of each chunk's logits).
    "fused_linear_cross_entropy": "label_rows",
    "fused_linear_logprobs": "label_rows",
    # TDPO / SparsePO's one pass: each chunk's KL(pi_ref || pi) rows by the divergence kernel.
    "fused_linear_label_terms": "divergence",
}


class Route(NamedTuple):
    """Where one call runs: ``engine`` is "core" or "torch"; ``stream`` is the CUDA stream handed
    to the core (None off CUDA); ``rows`` is the row step of the fused heads' PyTorch chunk loop
    (engine "torch"): "torch" (PyTorch ops) or "core" (divkit's row kernel on each chunk's
    logits, the CUDA path of a head that has no CUDA chunk loop of its own)."""

    engine: str
    device: torch.device
    stream: Optional[int] = None
    rows: str = "torch"

    @property
    def core(self) -> bool:
        return self.engine == "core"

    def core_args(self, args: Any) -> Any:
        """The core's options object (``_C.DivergenceArgs``) with the stream set on CUDA;
        unchanged on the CPU, so that the CPU call is exactly what it was."""
        if self.stream is not None:
            args.stream = self.stream
            args.check_finite = cuda_checks.check_finite()
        return args


def cuda_built() -> bool:
    """Whether the extension has CUDA kernels (False for builds that predate the question)."""
    return bool(getattr(_C, "cuda_built", lambda: False)())


def has_cuda_kernel(op: str) -> bool:
    """Whether the CUDA build has a kernel for op (``_C.cuda_ops()``; a build that does not
    list them is taken at its contract, :data:`CUDA_OPS`)."""
    ops = getattr(_C, "cuda_ops", None)
    return op in (CUDA_OPS if ops is None else frozenset(ops()))


def backend(fn: str, x: Any) -> str:
    """The ``backend`` keyword: one of :data:`BACKENDS`."""
    return check.string(fn, "backend", x, choices=BACKENDS)


def common_device(fn: str, tensors: Sequence[Tuple[str, Any]]) -> Optional[torch.device]:
    """The device of the (name, tensor) pairs (non-tensors and None are skipped); raises when
    two of them differ, naming both."""
    first: Optional[Tuple[str, torch.device]] = None
    for name, x in tensors:
        if not isinstance(x, torch.Tensor):
            continue
        if first is None:
            first = (name, x.device)
        elif x.device != first[1]:
            check.fail(
                fn,
                f"{name} is on {x.device} but {first[0]} is on {first[1]}; every tensor "
                f"argument must be on one device (the CPU or one accelerator)",
            )
    return None if first is None else first[1]


def _cuda_stream(dev: torch.device) -> Optional[int]:
    """PyTorch's current stream of ``dev``; None where this torch has no CUDA (fake CUDA tensors
    being traced on a CPU-only torch: the op routes again, with a stream, when it runs)."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.current_stream(dev).cuda_stream


def route(fn: str, op: str, backend_name: str, tensors: Sequence[Tuple[str, Any]]) -> Route:
    """Checks that the tensors share a device and picks the engine of op ``op`` (the core's
    name of the public function ``fn``) for them under ``backend_name``."""
    backend(fn, backend_name)
    dev = common_device(fn, tensors) or torch.device("cpu")
    if backend_name == "torch" and dev.type != "meta":
        if op not in TORCH_OPS:
            check.fail(fn, f"backend='torch' is not available for {fn} (no PyTorch fallback)")
        return Route("torch", dev)
    if dev.type == "cpu":
        return Route("core", dev)
    if dev.type == "cuda" and cuda_built() and has_cuda_kernel(op):
        return Route("core", dev, _cuda_stream(dev))
    row_op = CORE_ROWS.get(op)
    if (
        backend_name == "auto"
        and dev.type == "cuda"
        and row_op
        and cuda_built()
        and has_cuda_kernel(row_op)
    ):
        return Route("torch", dev, _cuda_stream(dev), rows="core")
    # meta tensors hold no values: nothing can compute on them.
    if backend_name == "core" or op not in TORCH_OPS or dev.type == "meta":
        check.fail(fn, f"no kernel for device {dev}")
    return Route("torch", dev)
