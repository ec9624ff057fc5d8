r"""``divkit compare``: per-token divergence statistics between two models' logits.

The evaluation that llama.cpp's KL-divergence mode does for a quantized model against its full
precision original: both models score the same N token positions, their logits (or log-probs)
are saved as ``[N, V]`` arrays (``[..., V]`` is flattened), and for every token ``i``, with
``p = softmax(base_i)`` (the reference, e.g. full precision) and ``q = softmax(test_i)`` (e.g.
quantized)::

    KL   = KL(p || q) = sum_j p_j (log p_j - log q_j)         (divkit kind "forward_kl",
                                                                teacher = base, student = test)
    JS   = 0.5 KL(p || m) + 0.5 KL(q || m),  m = (p + q) / 2  (kind "jsd", beta = 0.5; in
                                                                [0, log 2])
    TVD  = 0.5 sum_j |p_j - q_j|                              (kind "tvd"; in [0, 1])
    top1 = [argmax_j base_ij == argmax_j test_ij]
    dp   = q_k - p_k,  k = argmax_j base_ij                   (the change in the probability of
                                                                the base model's top token)

The per-token values of KL, JS and TVD come from divkit's C++ kernels (:func:`divkit.divergence`
with ``reduction="none"``; fp32 arithmetic with fp64 row sums). Log-probs work as inputs too:
softmax is invariant to a per-row shift, so ``softmax(log p) = p``; ``-inf`` entries are masked
tokens with probability 0.

Files: ``.npy`` (read with ``numpy.load(mmap_mode="r")``) and ``.safetensors`` (the header is
parsed here: 8-byte little-endian header length, a JSON header, then the data, which is
memory-mapped; F32, F16, BF16 and F64; ``tensor`` picks one when the file holds several), so
the ``safetensors`` package is not needed. Both files are read in blocks of rows through memory
maps, so files larger than memory work; only the per-token results (a few floats per token) are
kept. The two files may have different float dtypes (e.g. fp32 base, bf16 test).

Problems with the files (missing, truncated, malformed, unsupported dtype, shapes that do not
match, NaN or +inf values) raise :class:`CompareError` (a ``ValueError``) naming the file.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

__all__ = [
    "CompareError",
    "LogitsFile",
    "open_logits",
    "token_metrics",
    "summarize",
    "compare_files",
    "format_text",
    "PERCENTILES",
]

#: Percentiles reported for every per-token statistic (besides mean, min and max).
PERCENTILES: Sequence[float] = (1.0, 5.0, 10.0, 50.0, 90.0, 95.0, 99.0, 99.9)

#: Bytes of logits per file read at once when ``block_rows`` is not given.
DEFAULT_BLOCK_BYTES = 64 << 20

_SAFETENSORS_DTYPES = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # raw bits, viewed as torch.bfloat16 per block
    "F64": np.dtype("<f8"),
}
_NPY_MAGIC = b"\x93NUMPY"
# A safetensors header larger than this is not a header (the format's own limit is 100 MB).
_MAX_HEADER = 100_000_000


class CompareError(ValueError):
    """A problem with an input file (or the arguments) of :func:`compare_files`; the message
    names the file."""


@dataclass
class LogitsFile:
    """A ``[N, V]`` array of logits or log-probs in a file, read in row blocks.

    ``array`` is a read-only memory map of shape ``[N, V]``; ``dtype`` is ``"float32"``,
    ``"float16"``, ``"bfloat16"`` or ``"float64"``.
    """

    path: str
    array: np.ndarray
    dtype: str
    tensor: Optional[str] = None  # the tensor's name in a .safetensors file

    @property
    def shape(self):
        return tuple(self.array.shape)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` as a contiguous CPU tensor of the file's dtype (a copy: the
        memory map's pages can be dropped again)."""
        block = np.array(
            self.array[start:stop], dtype=self.array.dtype.newbyteorder("="), order="C", copy=True
        )
        t = torch.from_numpy(block)
        return t.view(torch.bfloat16) if self.dtype == "bfloat16" else t


def _flatten(path: str, arr: np.ndarray, what: str) -> np.ndarray:
    if arr.ndim < 2:
        raise CompareError(
            f"{path}: {what} has shape {tuple(arr.shape)}; expected [N, V] "
            f"(or [..., V]) logits or log-probs"
        )
    if arr.size == 0:
        raise CompareError(f"{path}: {what} is empty (shape {tuple(arr.shape)})")
    if arr.ndim > 2:
        n = int(np.prod(arr.shape[:-1]))
        arr = arr.reshape(n, arr.shape[-1])  # a view for C-ordered data; checked below
    return arr


def _open_npy(path: str) -> LogitsFile:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError, struct.error, SyntaxError) as e:
        # numpy reports a truncated data region as "mmap length is greater than file size"
        # and a damaged header as a ValueError about its format.
        size = os.path.getsize(path)
        raise CompareError(
            f"{path}: not a readable .npy file ({size} bytes; truncated or malformed: {e})"
        ) from None
    if not isinstance(arr, np.ndarray):
        raise CompareError(
            f"{path}: holds no single array (a .npz archive?); save one [N, V] "
            f"array with numpy.save"
        )
    kinds = {
        np.dtype(np.float32): "float32",
        np.dtype(np.float16): "float16",
        np.dtype(np.float64): "float64",
    }
    name = kinds.get(arr.dtype.newbyteorder("="))
    if name is None:
        raise CompareError(
            f"{path}: dtype {arr.dtype} is not supported; expected float32, "
            f"float16 or float64 (bfloat16 through .safetensors)"
        )
    return LogitsFile(path, _flatten(path, arr, "the array"), name)


def _open_safetensors(path: str, tensor: Optional[str]) -> LogitsFile:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CompareError(
                f"{path}: truncated .safetensors file ({size} bytes; the "
                f"8-byte header length is missing)"
            )
        (hlen,) = struct.unpack("<Q", head)
        if hlen > _MAX_HEADER:
            raise CompareError(
                f"{path}: malformed .safetensors file (header length {hlen} "
                f"bytes is not plausible; not a safetensors file?)"
            )
        if 8 + hlen > size:
            raise CompareError(
                f"{path}: truncated .safetensors file (the header needs "
                f"{hlen} bytes, the file has {size - 8} after the length)"
            )
        raw = f.read(hlen)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CompareError(f"{path}: malformed .safetensors header (not JSON: {e})") from None
    if not isinstance(header, dict):
        raise CompareError(f"{path}: malformed .safetensors header (a JSON object expected)")
    names = sorted(k for k in header if k != "__metadata__")
    if not names:
        raise CompareError(f"{path}: the .safetensors file holds no tensor")
    if tensor is None:
        if len(names) > 1:
            raise CompareError(
                f"{path}: holds {len(names)} tensors ({', '.join(names[:10])}"
                f"{', ...' if len(names) > 10 else ''}); choose one with "
                f"--tensor NAME"
            )
        tensor = names[0]
    elif tensor not in names:
        raise CompareError(
            f"{path}: no tensor named {tensor!r}; it holds "
            f"{', '.join(names[:10])}{', ...' if len(names) > 10 else ''}"
        )
    info = header[tensor]
    try:
        dtype_name = info["dtype"]
        shape = [int(d) for d in info["shape"]]
        begin, end = (int(x) for x in info["data_offsets"])
    except (TypeError, KeyError, ValueError) as e:
        raise CompareError(
            f"{path}: malformed .safetensors entry for tensor {tensor!r} "
            f"(needs dtype, shape and data_offsets: {e!r})"
        ) from None
    if dtype_name not in _SAFETENSORS_DTYPES:
        raise CompareError(
            f"{path}: tensor {tensor!r} has dtype {dtype_name}; expected F32, F16, BF16 or F64"
        )
    np_dtype = _SAFETENSORS_DTYPES[dtype_name]
    if any(d < 0 for d in shape):
        raise CompareError(f"{path}: tensor {tensor!r} has a negative dimension {shape}")
    count = int(np.prod(shape)) if shape else 1
    if not (0 <= begin <= end) or end - begin != count * np_dtype.itemsize:
        raise CompareError(
            f"{path}: malformed .safetensors entry for tensor {tensor!r}: "
            f"data_offsets [{begin}, {end}] do not hold shape {shape} of "
            f"{dtype_name} ({count * np_dtype.itemsize} bytes)"
        )
    data_size = size - 8 - hlen
    if end > data_size:
        raise CompareError(
            f"{path}: truncated .safetensors file (tensor {tensor!r} ends at "
            f"byte {end} of the data region, which has {data_size} bytes)"
        )
    if len(shape) < 2 or count == 0:
        raise CompareError(
            f"{path}: tensor {tensor!r} has shape {tuple(shape)}; expected "
            f"[N, V] (or [..., V]) logits or log-probs, not empty"
        )
    arr = np.memmap(path, dtype=np_dtype, mode="r", offset=8 + hlen + begin, shape=tuple(shape))
    name = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}[dtype_name]
    return LogitsFile(path, _flatten(path, arr, f"tensor {tensor!r}"), name, tensor)


def _is_npy(path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(_NPY_MAGIC)) == _NPY_MAGIC
    except OSError:
        return False  # open_logits reports it


def open_logits(path: str, tensor: Optional[str] = None) -> LogitsFile:
    """Opens a ``.npy`` or ``.safetensors`` file of ``[N, V]`` (or ``[..., V]``) logits or
    log-probs as a memory map. The format is recognized by the file's first bytes (a ``.npy``
    file starts with ``\\x93NUMPY``), so the extension does not matter. ``tensor`` names the
    tensor of a ``.safetensors`` file (required when it holds several); it is an error for a
    ``.npy`` file. Raises :class:`CompareError` naming the file and the problem."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CompareError(f"{path}: no such file")
    if os.path.isdir(path):
        raise CompareError(f"{path}: is a directory, not a .npy or .safetensors file")
    try:
        with open(path, "rb") as f:
            magic = f.read(len(_NPY_MAGIC))
    except OSError as e:
        raise CompareError(f"{path}: cannot be read ({e.strerror})") from None
    if magic == _NPY_MAGIC:
        if tensor is not None:
            raise CompareError(
                f"{path}: --tensor {tensor!r} given, but a .npy file holds one unnamed array"
            )
        return _open_npy(path)
    if path.endswith(".npy"):
        raise CompareError(
            f"{path}: not a .npy file (it does not start with the NumPy magic "
            f"string; truncated or malformed)"
        )
    return _open_safetensors(path, tensor)


def _check_finite_rows(name: str, f: LogitsFile, x: torch.Tensor, start: int) -> None:
    bad = torch.isnan(x) | (x == math.inf)
    rows = bad.any(dim=1).nonzero().flatten()
    if rows.numel():
        raise CompareError(
            f"{f.path}: {name} row {start + int(rows[0])} holds NaN or +inf "
            f"({rows.numel()} such rows in rows {start}..{start + x.shape[0] - 1})"
            f"; logits and log-probs must be finite or -inf"
        )


def token_metrics(base: torch.Tensor, test: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Per-token statistics of one block of rows (``[n, V]`` logits or log-probs of any float
    dtype): ``kl`` = KL(base || test), ``js`` (beta 0.5), ``tvd`` (divkit's kernels,
    float32), ``top1`` (bool: same argmax), ``delta_p`` = q_k - p_k at the base model's top
    token k (float64)."""
    import divkit

    kl = divkit.divergence(test, base, "forward_kl", reduction="none")
    js = divkit.divergence(test, base, "jsd", beta=0.5, reduction="none")
    tvd = divkit.divergence(test, base, "tvd", reduction="none")
    b32, t32 = base.float(), test.float()
    top_b = b32.argmax(dim=1)
    top_t = t32.argmax(dim=1)
    idx = top_b.unsqueeze(1)
    # log p_k = z_k - logsumexp(z), computed in fp64 from the fp32 values (one column each).
    lp = b32.gather(1, idx).squeeze(1).double() - torch.logsumexp(b32, dim=1).double()
    lq = t32.gather(1, idx).squeeze(1).double() - torch.logsumexp(t32, dim=1).double()
    return {"kl": kl, "js": js, "tvd": tvd, "top1": top_b == top_t, "delta_p": lq.exp() - lp.exp()}


def summarize(values: np.ndarray, percentiles: Sequence[float] = PERCENTILES) -> Dict[str, float]:
    """Mean (in fp64), standard deviation, min, max and the given percentiles (numpy's linear
    interpolation) of a 1-D array; keys ``"mean"``, ``"std"``, ``"min"``, ``"max"``,
    ``"median"`` and ``"p<q>"`` (``"p99.9"``)."""
    v = np.asarray(values, dtype=np.float64)
    out = {
        "mean": float(v.mean()),
        "std": float(v.std()),
        "min": float(v.min()),
        "max": float(v.max()),
        "median": float(np.median(v)),
    }
    for q, x in zip(percentiles, np.percentile(v, list(percentiles))):
        out[f"p{q:g}"] = float(x)
    return out


def _block_rows(v: int, block_rows: Optional[int]) -> int:
    if block_rows is None:
        return max(1, DEFAULT_BLOCK_BYTES // (4 * v))
    if isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 1:
        raise CompareError(f"block_rows must be an int >= 1, got {block_rows!r}")
    return block_rows


def compare_files(
    base,
    test,
    *,
    tensor: Optional[str] = None,
    base_tensor: Optional[str] = None,
    test_tensor: Optional[str] = None,
    block_rows: Optional[int] = None,
    progress: bool = False,
    return_values: bool = False,
):
    """Per-token divergence statistics of ``test`` against ``base`` (paths of ``.npy`` or
    ``.safetensors`` files of ``[N, V]`` logits or log-probs; see the module's docstring for
    the formulas and directions).

    The files are streamed in blocks of ``block_rows`` rows (default: 64 MiB of fp32 logits
    per file). ``tensor`` names the tensor in the ``.safetensors`` file(s) (ignored for a
    ``.npy`` file; an error when both are ``.npy``); ``base_tensor`` / ``test_tensor`` name it in
    one file only. ``progress`` shows a tqdm progress bar on stderr.

    Returns a JSON-serializable dict: ``base``, ``test`` (paths), ``tokens`` (N), ``vocab``
    (V), ``base_dtype``, ``test_dtype``, ``block_rows``, ``kl``, ``js``, ``tvd`` and
    ``delta_p`` (each a :func:`summarize` dict; ``delta_p`` also has ``rms``) and
    ``top1_agreement`` (the fraction of tokens whose argmax agrees). With
    ``return_values=True``, returns ``(result, values)``: ``values`` holds the per-token numpy
    arrays ``kl``, ``js``, ``tvd`` (float32), ``top1`` (bool) and ``delta_p`` (float64).
    """
    res, values = _compare(base, test, tensor, base_tensor, test_tensor, block_rows, progress)
    return (res, values) if return_values else res


def _compare(base, test, tensor, base_tensor, test_tensor, block_rows, progress):
    import divkit

    # The shared ``tensor`` applies to the .safetensors files (a .npy file has one array).
    npy = [_is_npy(base), _is_npy(test)]
    if tensor is not None and all(npy):
        raise CompareError(
            f"{os.fspath(base)}, {os.fspath(test)}: --tensor {tensor!r} given, "
            f"but neither file is a .safetensors file"
        )
    fb = open_logits(base, base_tensor if base_tensor is not None else (None if npy[0] else tensor))
    ft = open_logits(test, test_tensor if test_tensor is not None else (None if npy[1] else tensor))
    if fb.shape != ft.shape:
        raise CompareError(
            f"shape mismatch: {fb.path} holds {list(fb.shape)} and {ft.path} "
            f"holds {list(ft.shape)} (as [N, V]); both models must score the "
            f"same tokens over the same vocabulary"
        )
    n, v = fb.shape
    rows = _block_rows(v, block_rows)
    out = {k: np.empty(n, dtype=np.float32) for k in ("kl", "js", "tvd")}
    out["delta_p"] = np.empty(n, dtype=np.float64)
    out["top1"] = np.empty(n, dtype=bool)

    bar = None
    if progress:
        from . import require

        bar = require("tqdm").tqdm(
            total=n, unit="tok", unit_scale=True, desc="divkit compare", leave=False
        )
    try:
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            xb, xt = fb.rows(start, stop), ft.rows(start, stop)
            try:
                m = token_metrics(xb, xt)
            except divkit.Error:
                # The kernels reject NaN / +inf logits; find the file and the row.
                _check_finite_rows("base", fb, xb, start)
                _check_finite_rows("test", ft, xt, start)
                raise
            for k, val in m.items():
                out[k][start:stop] = val.numpy()
            if bar is not None:
                bar.update(stop - start)
    finally:
        if bar is not None:
            bar.close()

    result: Dict[str, Any] = {
        "base": fb.path,
        "test": ft.path,
        "tokens": n,
        "vocab": v,
        "base_dtype": fb.dtype,
        "test_dtype": ft.dtype,
        "block_rows": rows,
    }
    if fb.tensor is not None:
        result["base_tensor"] = fb.tensor
    if ft.tensor is not None:
        result["test_tensor"] = ft.tensor
    for k in ("kl", "js", "tvd", "delta_p"):
        result[k] = summarize(out[k])
    result["delta_p"]["rms"] = float(np.sqrt(np.mean(out["delta_p"] ** 2)))
    result["top1_agreement"] = float(out["top1"].mean())
    return result, out


def format_text(result: Dict[str, Any]) -> str:
    """A plain-text report of a :func:`compare_files` result."""
    L: List[str] = []
    name = lambda p, t: p + (f" [{t}]" if t else "")  # noqa: E731
    L.append(f"base: {name(result['base'], result.get('base_tensor'))} ({result['base_dtype']})")
    L.append(f"test: {name(result['test'], result.get('test_tensor'))} ({result['test_dtype']})")
    L.append(f"tokens: {result['tokens']}, vocabulary: {result['vocab']}")
    L.append(f"top-1 agreement: {100 * result['top1_agreement']:.3f}%")
    L.append("")
    keys = ["mean", "std", "min"] + [f"p{q:g}" for q in PERCENTILES if q != 50] + ["median", "max"]
    order = ["mean", "std", "min", "p1", "p5", "p10", "median", "p90", "p95", "p99", "p99.9", "max"]
    order = [k for k in order if k in keys]
    header = f"{'':<9}" + "".join(f"{k:>12}" for k in order)
    L.append(header)
    labels = {"kl": "KL", "js": "JS", "tvd": "TVD", "delta_p": "dp top"}
    for k in ("kl", "js", "tvd", "delta_p"):
        s = result[k]
        L.append(f"{labels[k]:<9}" + "".join(f"{s[c]:>12.4g}" for c in order))
    L.append("")
    L.append(
        f"KL = KL(base || test), JS = Jensen-Shannon (beta 0.5), TVD = total variation, "
        f"per token (nats); dp top = p_test - p_base of the base model's top token "
        f"(RMS {result['delta_p']['rms']:.4g})."
    )
    return "\n".join(L)


def run_cli(args) -> int:
    """The ``divkit compare`` subcommand (see :mod:`divkit.cli`)."""
    import sys

    try:
        result = compare_files(
            args.base,
            args.test,
            tensor=args.tensor,
            base_tensor=args.base_tensor,
            test_tensor=args.test_tensor,
            block_rows=args.block_rows,
            progress=not args.no_progress,
        )
    except CompareError as e:
        print(f"divkit compare: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_text(result))
    return 0


def add_parser(sub) -> None:
    """Registers ``compare`` on an argparse subparsers object."""
    p = sub.add_parser(
        "compare",
        help="per-token KL/JS/TVD statistics between two models' logits",
        description="Per-token divergence statistics of TEST against BASE (llama.cpp's "
        "KL-divergence evaluation): KL(base || test), JS, TVD, top-1 agreement and "
        "the change of the base top token's probability. Inputs: .npy or "
        ".safetensors files of [N, V] logits or log-probs, streamed through memory "
        "maps. Exit code 2 on a bad file.",
    )
    p.add_argument("base", help="reference logits/log-probs (.npy or .safetensors)")
    p.add_argument("test", help="logits/log-probs to compare (same shape)")
    p.add_argument(
        "--tensor",
        metavar="NAME",
        help="tensor name in the .safetensors file(s) (needed when one holds several)",
    )
    p.add_argument("--base-tensor", metavar="NAME", help="tensor name in BASE only")
    p.add_argument("--test-tensor", metavar="NAME", help="tensor name in TEST only")
    p.add_argument(
        "--block-rows",
        type=int,
        default=None,
        metavar="N",
        help="rows read per block (default: 64 MiB of fp32 logits)",
    )
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_cli)
