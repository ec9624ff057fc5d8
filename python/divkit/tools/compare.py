r"""``divkit compare``: per-token divergence statistics between two models' logits, and
llama.cpp's KL-divergence report (``llama-perplexity --kl-divergence``) computed from them.

Both models score the same N token positions; their logits (or log-probs) are saved as ``[N, V]``
arrays (``[..., V]`` is flattened). For every token ``i``, with ``p = softmax(base_i)`` (the
reference, e.g. full precision) and ``q = softmax(test_i)`` (e.g. quantized)::

    KL      = KL(p || q) = sum_j p_j (log p_j - log q_j)
    JS      = 0.5 KL(p || m) + 0.5 KL(q || m),  m = (p + q) / 2      (in [0, log 2])
    TVD     = 0.5 sum_j |p_j - q_j|                                  (in [0, 1])
    top1    = [argmax_j base_ij == argmax_j test_ij]                 (llama.cpp's "same top p")
    dp top  = q_k - p_k,  k = argmax_j base_ij     (result key "delta_p": the base top token)

With the ids of the tokens that actually follow (``tokens``: ``t_i`` is the token row ``i``
predicts; from ``--tokens`` or from a llama.cpp base file), also llama.cpp's figures::

    nll_test = -log q_t,  nll_base = -log p_t,  PPL = exp(mean nll)
    dp next  = q_t - p_t                        (result key "delta_p_next"; llama.cpp's "Δp")

Standard errors ("se", printed as "±") are llama.cpp's: for a mean of n values with sums ``S1``
and ``S2`` (of the squares), ``se = sqrt((S2/n - (S1/n)^2) / (n - 1))`` (0 when n <= 10 or the
variance is not positive); RMS Δp's is ``0.5 / rms * se(dp^2)``; same-top's is
``sqrt(f (1 - f) / (n - 1))``; the PPL block propagates them as llama.cpp does (``exp`` for the
PPLs and the ratio, the covariance of the two nll's, ``Cor = cov / (se_test se_base)``).

Files: ``.npy`` (memory-mapped), ``.safetensors`` (header parsed here; F32, F16, BF16, F64;
``tensor`` picks one of several) and llama.cpp's ``--kl-divergence-base`` file (recognized by its
``_logits_`` magic; see :func:`open_llamacpp_logits`). The two files may differ in format and
dtype. The per-token values come from divkit's C++ core (``divkit._C.compare_rows``,
include/divkit/compare.h: float64, the memory maps read without a copy, rows over threads), or
from the numpy float64 functions below (``engine="numpy"``: the reference the core is tested
against to 1e-12, and the fallback when the compiled extension lacks the kernel). torch is not
imported.

Memory: the files are read in blocks of rows (about ``CORE_BLOCK_BYTES`` of fp32 logits per
file for the core, which reads the memory maps in place and keeps a row buffer of 2 V float64
per thread; ``DEFAULT_BLOCK_BYTES`` for numpy, which computes each block in float64 with a
handful of temporaries of its size), and the rows read are dropped from the resident set, so
the working set is a few blocks whatever N and V are. The
per-token values (a few float64 per token) are written to a memory-mapped temporary file; the
means, standard errors and per-chunk figures are sums over it in fixed pieces (so they do not
depend on the block size), and the percentiles are exact: each column is sorted in place in
the temporary file and read at the interpolated ranks (numpy's "linear" rule). Nothing of size
N x V is ever held in memory.

Problems with the files (missing, truncated, malformed, unsupported dtype, shapes that do not
match, NaN or +inf values) raise :class:`CompareError` (a ``ValueError``) naming the file.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import stat
import struct
import tempfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Deque, Dict, List, Optional, Sequence

import numpy as np

__all__ = [
    "CompareError",
    "LogitsFile",
    "open_logits",
    "open_llamacpp_logits",
    "token_metrics",
    "summarize",
    "compare_files",
    "format_text",
    "PERCENTILES",
    "LLAMACPP_MAGIC",
]

#: Percentiles reported for every per-token statistic (besides mean, min, median and max):
#: llama.cpp's set (its 99.9/99/95/90/75/25/10/5/1/0.1) and the median as ``p50``.
PERCENTILES: Sequence[float] = (0.1, 1.0, 5.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.9)

#: Bytes of fp32 logits per file read at once when ``block_rows`` is not given (the block is
#: computed in float64 with a handful of temporaries of its size).
DEFAULT_BLOCK_BYTES = 4 << 20

#: The same for the C++ kernel (``engine="core"``), which reads the memory maps without a copy:
#: larger blocks keep its threads busy.
CORE_BLOCK_BYTES = 16 << 20

#: The first 8 bytes of llama.cpp's ``--kl-divergence-base`` file.
LLAMACPP_MAGIC = b"_logits_"
#: llama.cpp's KL sums skip the base's terms with log-prob at or below this (nats).
LLAMACPP_KL_FLOOR = -16.0

# Elements per piece of the per-token columns when summing them (fixed: the sums do not depend
# on the block size).
_PIECE = 1 << 20

_SAFETENSORS_DTYPES = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # raw bits, widened to float32 per block
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

    ``array`` is a read-only memory map (``[N, V]``; for a llama.cpp file the raw ``[N, nv]``
    uint16 rows); ``dtype`` is ``"float32"``, ``"float16"``, ``"bfloat16"``, ``"float64"`` or
    ``"llama.cpp-uint16"``. A llama.cpp file also has ``targets`` (the id of the token each
    row predicts), ``chunk_rows`` (rows per llama.cpp chunk), ``n_ctx`` and ``kl_floor``.
    """

    path: str
    array: np.ndarray
    dtype: str
    tensor: Optional[str] = None  # the tensor's name in a .safetensors file
    format: str = "npy"
    vocab: Optional[int] = None
    targets: Optional[np.ndarray] = None
    chunk_rows: Optional[int] = None
    n_ctx: Optional[int] = None
    kl_floor: Optional[float] = None

    @property
    def shape(self):
        return (int(self.array.shape[0]), int(self.vocab or self.array.shape[1]))

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as a float64 ``[n, V]`` array (a copy: the memory map's pages
        can be dropped again). A llama.cpp file gives its stored log-probs, decoded in float32
        as llama.cpp decodes them."""
        raw = np.asarray(self.array[start:stop])
        if self.format == "llama.cpp":
            v = self.shape[1]
            head = np.ascontiguousarray(raw[:, :4]).view("<f4")  # scale, min log-prob
            lp = raw[:, 4 : 4 + v].astype(np.float32)
            lp *= head[:, :1]
            lp += head[:, 1:2]
            return lp.astype(np.float64)
        if self.dtype == "bfloat16":
            return (raw.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        return raw.astype(np.float64)

    def core_rows(self, start: int, stop: int):
        """Rows ``start:stop`` as the C++ kernel reads them, with their format: the memory
        map's own rows (no copy) in native byte order and unit column stride; ``"bfloat16"``
        and ``"llama.cpp"`` rows stay uint16 (the kernel decodes them)."""
        raw = self.array[start:stop]
        if not raw.flags.aligned:
            # A file may put its data at any byte offset; the core reads whole elements.
            raw = np.require(raw, requirements="A")
        if self.format == "llama.cpp":
            return raw, "llama.cpp"
        if not raw.dtype.isnative:
            raw = raw.astype(raw.dtype.newbyteorder("="))
        if raw.strides[-1] != raw.dtype.itemsize:
            raw = np.ascontiguousarray(raw)
        return raw, ("bfloat16" if self.dtype == "bfloat16" else "float")

    def release(self, start: int, stop: int) -> None:
        """Drops rows ``start:stop`` of the memory map from the process's resident set (they
        were read; the page cache keeps them for the kernel to reclaim), so that the resident
        memory stays bounded over a file larger than memory. Best effort."""
        mm, off = getattr(self.array, "_mmap", None), getattr(self.array, "offset", None)
        if mm is None or off is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        try:
            row = self.array.strides[0]
            delta = off % mmap.ALLOCATIONGRANULARITY  # where the data starts in the mapping
            lo, hi = delta + start * row, delta + stop * row
            lo -= lo % mmap.PAGESIZE
            mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
        except (ValueError, OSError, AttributeError):
            pass


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
    return LogitsFile(path, _flatten(path, arr, "the array"), name, format="npy")


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
    except RecursionError:
        raise CompareError(
            f"{path}: malformed .safetensors header (JSON nested too deeply)"
        ) from None
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
        shape = list(info["shape"])
        if not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise ValueError(f"shape {info['shape']!r} is not a list of integers")
        begin, end = (int(x) for x in info["data_offsets"])
    except (TypeError, KeyError, ValueError) as e:
        raise CompareError(
            f"{path}: malformed .safetensors entry for tensor {tensor!r} "
            f"(needs dtype, shape and data_offsets: {e!r})"
        ) from None
    if not isinstance(dtype_name, str) or dtype_name not in _SAFETENSORS_DTYPES:
        raise CompareError(
            f"{path}: tensor {tensor!r} has dtype {dtype_name}; expected F32, F16, BF16 or F64"
        )
    np_dtype = _SAFETENSORS_DTYPES[dtype_name]
    if any(d < 0 for d in shape):
        raise CompareError(f"{path}: tensor {tensor!r} has a negative dimension {shape}")
    count = math.prod(shape)  # Python ints: a shape whose size overflows int64 stays exact
    if count * np_dtype.itemsize > size:
        raise CompareError(
            f"{path}: malformed .safetensors entry for tensor {tensor!r}: shape {shape} of "
            f"{dtype_name} needs {count * np_dtype.itemsize} bytes, more than the file's {size}"
        )
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
    return LogitsFile(
        path, _flatten(path, arr, f"tensor {tensor!r}"), name, tensor, format="safetensors"
    )


def _is_npy(path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(_NPY_MAGIC)) == _NPY_MAGIC
    except OSError:
        return False  # open_logits reports it


def open_llamacpp_logits(path: str) -> LogitsFile:
    """Opens llama.cpp's ``--kl-divergence-base`` file (written by ``llama-perplexity
    --kl-divergence-base FILE``) as a memory map.

    Layout (little-endian): the 8 bytes ``_logits_``; ``n_ctx`` (uint32), ``n_vocab`` (int32),
    ``n_chunk`` (int32); the ``n_chunk * n_ctx`` evaluated token ids (int32); then, per chunk,
    one row for each of the positions ``n_ctx/2 .. n_ctx-2`` (``n_ctx - 1 - n_ctx/2`` rows; the
    row of position ``j`` predicts the chunk's token ``j + 1``). A row is ``nv = 2 *
    ((n_vocab + 1) / 2) + 4`` uint16: a float32 ``scale`` and a float32 ``min_log_prob`` (4
    uint16), then ``n_vocab`` quantized values ``u`` (padded to an even count); the log-prob is
    ``scale * u + min_log_prob`` (float32). llama.cpp keeps the top 16 nats of each row
    (``u = 0`` below) and its KL sums skip the base's terms with log-prob <= -16, as divkit
    does with such a base file.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    if size < 20:
        raise CompareError(
            f"{path}: truncated llama.cpp logits file ({size} bytes; the 20-byte header "
            f"(magic, n_ctx, n_vocab, n_chunk) is incomplete)"
        )
    with open(path, "rb") as f:
        head = f.read(20)
    if head[:8] != LLAMACPP_MAGIC:
        raise CompareError(f"{path}: not a llama.cpp logits file (no _logits_ magic)")
    n_ctx, n_vocab, n_chunk = struct.unpack("<Iii", head[8:20])
    first = n_ctx // 2
    per_chunk = n_ctx - 1 - first
    if per_chunk < 1 or n_vocab < 1 or n_chunk < 1:
        raise CompareError(
            f"{path}: malformed llama.cpp logits file (n_ctx {n_ctx}, n_vocab {n_vocab}, "
            f"n_chunk {n_chunk}: needs n_ctx >= 3, n_vocab >= 1, n_chunk >= 1)"
        )
    nv = 2 * ((n_vocab + 1) // 2) + 4
    tok_bytes = 4 * n_ctx * n_chunk
    data_bytes = 2 * nv * per_chunk * n_chunk
    want = 20 + tok_bytes + data_bytes
    if size != want:
        raise CompareError(
            f"{path}: {'truncated' if size < want else 'malformed'} llama.cpp logits file "
            f"({size} bytes; n_ctx {n_ctx}, n_vocab {n_vocab} and n_chunk {n_chunk} need "
            f"{want})"
        )
    tokens = np.memmap(path, dtype="<i4", mode="r", offset=20, shape=(n_chunk, n_ctx))
    # Row j of a chunk (position first + j) predicts the chunk's token first + j + 1.
    targets = np.ascontiguousarray(tokens[:, first + 1 :]).reshape(-1).astype(np.int64)
    if targets.size and (targets.min() < 0 or targets.max() >= n_vocab):
        raise CompareError(
            f"{path}: malformed llama.cpp logits file (token ids outside [0, {n_vocab}))"
        )
    arr = np.memmap(
        path, dtype="<u2", mode="r", offset=20 + tok_bytes, shape=(n_chunk * per_chunk, nv)
    )
    return LogitsFile(
        path,
        arr,
        "llama.cpp-uint16",
        format="llama.cpp",
        vocab=n_vocab,
        targets=targets,
        chunk_rows=per_chunk,
        n_ctx=n_ctx,
        kl_floor=LLAMACPP_KL_FLOOR,
    )


def open_logits(path: str, tensor: Optional[str] = None) -> LogitsFile:
    """Opens a ``.npy`` or ``.safetensors`` file of ``[N, V]`` (or ``[..., V]``) logits or
    log-probs, or a llama.cpp ``--kl-divergence-base`` file, as a memory map. The format is
    recognized by the file's first bytes (a ``.npy`` file starts with ``\\x93NUMPY``, a
    llama.cpp file with ``_logits_``), so the extension does not matter. ``tensor`` names the
    tensor of a ``.safetensors`` file (required when it holds several); it is an error for the
    other formats. Raises :class:`CompareError` naming the file and the problem."""
    path = os.fspath(path)
    _check_regular(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(len(LLAMACPP_MAGIC))
    except OSError as e:
        raise CompareError(f"{path}: cannot be read ({e.strerror})") from None
    if magic.startswith(_NPY_MAGIC):
        if tensor is not None:
            raise CompareError(
                f"{path}: --tensor {tensor!r} given, but a .npy file holds one unnamed array"
            )
        return _open_npy(path)
    if magic == LLAMACPP_MAGIC:
        if tensor is not None:
            raise CompareError(
                f"{path}: --tensor {tensor!r} given, but a llama.cpp logits file holds one array"
            )
        return open_llamacpp_logits(path)
    if path.endswith(".npy"):
        raise CompareError(
            f"{path}: not a .npy file (it does not start with the NumPy magic "
            f"string; truncated or malformed)"
        )
    return _open_safetensors(path, tensor)


def _check_rows(name: str, f: LogitsFile, x: np.ndarray, start: int) -> None:
    """Raises for rows holding NaN or +inf, or no finite value at all."""
    bad = np.isnan(x) | (x == math.inf)
    rows = np.flatnonzero(bad.any(axis=1))
    if rows.size:
        raise CompareError(
            f"{f.path}: {name} row {start + int(rows[0])} holds NaN or +inf "
            f"({rows.size} such rows in rows {start}..{start + x.shape[0] - 1})"
            f"; logits and log-probs must be finite or -inf"
        )
    rows = np.flatnonzero(~np.isfinite(x).any(axis=1))
    if rows.size:
        raise CompareError(
            f"{f.path}: {name} row {start + int(rows[0])} holds no finite value (every token "
            f"masked with -inf)"
        )


def _log_softmax(x: np.ndarray, floor: Optional[float]):
    """(log-probs, probs, argmax) of a float64 block, ``x`` overwritten by the log-probs.
    Without ``floor`` the rows are logits (any shift): they are normalized. With it they are
    llama.cpp's stored log-probs, used as they are; probabilities at or below ``exp(floor)``
    count as 0 (llama.cpp's KL skips those terms)."""
    top = x.argmax(axis=1)
    if floor is not None:
        p = np.exp(x)
        p[x <= floor] = 0.0
        return x, p, top
    x -= x[np.arange(x.shape[0]), top][:, None]
    p = np.exp(x)
    s = p.sum(axis=1, keepdims=True)
    p /= s
    x -= np.log(s)
    return x, p, top


def _masked_dot_sum(p: np.ndarray, d: np.ndarray) -> np.ndarray:
    """sum_j p_j d_j per row, in place in ``d``, with 0 where p_j == 0 (d may be -inf/NaN)."""
    with np.errstate(invalid="ignore"):
        d *= p
    d[p == 0] = 0.0
    return d.sum(axis=1)


def _block_metrics(lb, pb, top_b, lt, pt, top_t, targets) -> Dict[str, np.ndarray]:
    r = np.arange(lb.shape[0])
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {}
        # delta_p at the base top token, from the log values (exact for a floored base too).
        out["delta_p"] = np.exp(lt[r, top_b]) - np.exp(lb[r, top_b])
        out["top1"] = (top_b == top_t).astype(np.float64)
        if targets is not None:
            out["nll"] = -lt[r, targets]
            out["nll_base"] = -lb[r, targets]
            out["delta_p_next"] = np.exp(-out["nll"]) - np.exp(-out["nll_base"])
        d = np.subtract(lb, lt)
        out["kl"] = _masked_dot_sum(pb, d)
        np.subtract(pb, pt, out=d)
        np.abs(d, out=d)
        out["tvd"] = 0.5 * d.sum(axis=1)
        np.add(pb, pt, out=d)
        d *= 0.5
        np.log(d, out=d)  # log m
        a = np.subtract(lb, d)
        js = _masked_dot_sum(pb, a)
        np.subtract(lt, d, out=a)
        out["js"] = 0.5 * (js + _masked_dot_sum(pt, a))
    return out


def token_metrics(base, test, tokens=None, base_floor: Optional[float] = None):
    """Per-token statistics of one block of rows (``[n, V]`` float arrays of logits or
    log-probs): ``kl`` = KL(base || test), ``js`` (beta 0.5), ``tvd``, ``top1`` (1.0 where the
    argmaxes agree), ``delta_p`` = q_k - p_k at the base model's top token k; with ``tokens``
    (the id each row predicts) also ``nll`` (test), ``nll_base`` and ``delta_p_next`` = q_t -
    p_t (llama.cpp's Δp). float64 throughout. ``base_floor``: the base rows are stored
    log-probs (a llama.cpp file), used unnormalized with the terms at or below the floor
    skipped."""
    lb = np.array(base, dtype=np.float64)
    lt = np.array(test, dtype=np.float64)
    lb, pb, top_b = _log_softmax(lb, base_floor)
    lt, pt, top_t = _log_softmax(lt, None)
    t = None if tokens is None else np.asarray(tokens, dtype=np.int64)
    return _block_metrics(lb, pb, top_b, lt, pt, top_t, t)


# ---------------------------------------------------------------------------------------------
# Statistics of the per-token columns
# ---------------------------------------------------------------------------------------------


def _sums(v: np.ndarray, start: int = 0, stop: Optional[int] = None, powers=(1, 2)):
    """Sums of ``v[start:stop] ** k`` for each k in ``powers``, over fixed pieces."""
    stop = len(v) if stop is None else stop
    acc = [0.0] * len(powers)
    for i in range(start, stop, _PIECE):
        x = np.asarray(v[i : min(stop, i + _PIECE)], dtype=np.float64)
        sq = x * x if any(k >= 2 for k in powers) else None
        for j, k in enumerate(powers):
            acc[j] += float((x if k == 1 else sq if k == 2 else sq * sq).sum())
    return acc


def _cross(a: np.ndarray, b: np.ndarray, start: int, stop: int) -> float:
    """sum a_i b_i over ``start:stop``, in fixed pieces."""
    acc = 0.0
    for i in range(start, stop, _PIECE):
        j = min(stop, i + _PIECE)
        acc += float((np.asarray(a[i:j]) * np.asarray(b[i:j])).sum())
    return acc


def _mean_se(s1: float, s2: float, n: int):
    """llama.cpp's mean and its standard error from the sums of the values and squares."""
    if n < 1:
        return 0.0, 0.0
    f = s1 / n
    var = s2 / n - f * f
    return f, (math.sqrt(var / (n - 1)) if var > 0 and n > 10 else 0.0)


def _cov(sa: float, sb: float, sab: float, n: int) -> float:
    """llama.cpp's covariance of two means (0 below 10 values)."""
    if n < 10:
        return 0.0
    return (sab / n - (sa / n) * (sb / n)) / (n - 1)


def _percentile_sorted(s: np.ndarray, q: float) -> float:
    """numpy's "linear" percentile of a sorted array (exact: reads two elements)."""
    n = len(s)
    pos = q / 100.0 * (n - 1)
    lo = min(int(math.floor(pos)), n - 1)
    hi = min(lo + 1, n - 1)
    a, b = float(s[lo]), float(s[hi])
    t = pos - lo
    return a + t * (b - a) if t < 0.5 else b - (b - a) * (1 - t)


def summarize(values: np.ndarray, percentiles: Sequence[float] = PERCENTILES) -> Dict[str, float]:
    """Mean and its standard error ``se`` (llama.cpp's), standard deviation, min, max, median
    and the given percentiles (numpy's linear interpolation) of a 1-D array (in float64);
    keys ``"mean"``, ``"se"``, ``"std"``, ``"min"``, ``"max"``, ``"median"`` and ``"p<q>"``
    (``"p99.9"``)."""
    v = np.array(values, dtype=np.float64).reshape(-1)  # a copy: sorted in place
    return _summary_inplace(v, percentiles)


def _rms(s2: float, s4: float, n: int):
    """RMS and llama.cpp's standard error of it from the sums of squares and fourth powers."""
    ms, ms_se = _mean_se(s2, s4, n)
    rms = math.sqrt(ms)
    return rms, (0.5 / rms * ms_se if rms > 0 else 0.0)


def _same_top(count: float, n: int):
    f = count / n
    return f, (math.sqrt(f * (1 - f) / (n - 1)) if n > 1 else 0.0)


def _ppl_block(nll, nllb, nll2, nllb2, cross, n) -> Dict[str, Optional[float]]:
    """llama.cpp's perplexity statistics from the sums of nll (test), nll_base, their squares
    and their product."""
    lq, lq_se = _mean_se(nll, nll2, n)
    lb, lb_se = _mean_se(nllb, nllb2, n)
    cov = _cov(nll, nllb, cross, n)
    ppl, ppl_b = math.exp(lq), math.exp(lb)
    ratio = lq - lb
    ratio_se = math.sqrt(max(lq_se * lq_se + lb_se * lb_se - 2.0 * cov, 0.0))
    ppl_se, ppl_b_se = ppl * lq_se, ppl_b * lb_se
    diff_se2 = ppl_se * ppl_se + ppl_b_se * ppl_b_se - 2.0 * ppl * ppl_b * cov
    return {
        "ppl_test": ppl,
        "ppl_test_se": ppl_se,
        "ppl_base": ppl_b,
        "ppl_base_se": ppl_b_se,
        "ln_ppl_test": lq,
        "ln_ppl_test_se": lq_se,
        "ln_ppl_base": lb,
        "ln_ppl_base_se": lb_se,
        "cov_ln_ppl": cov,
        "cor_ln_ppl": cov / (lq_se * lb_se) if lq_se > 0 and lb_se > 0 else None,
        "ln_ppl_ratio": ratio,
        "ln_ppl_ratio_se": ratio_se,
        "ppl_ratio": math.exp(ratio),
        "ppl_ratio_se": math.exp(ratio) * ratio_se,
        "ppl_diff": ppl - ppl_b,
        "ppl_diff_se": math.sqrt(max(diff_se2, 0.0)),
    }


def _block_rows(v: int, block_rows: Optional[int], core: bool = False) -> int:
    if block_rows is None:
        return max(1, (CORE_BLOCK_BYTES if core else DEFAULT_BLOCK_BYTES) // (4 * v))
    if isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 1:
        raise CompareError(f"block_rows must be an int >= 1, got {block_rows!r}")
    return block_rows


def _load_tokens(path, n: int, v: int) -> np.ndarray:
    path = os.fspath(path)
    _check_regular(path, " (--tokens)")
    try:
        ids = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError, struct.error, SyntaxError) as e:
        raise CompareError(f"{path}: not a readable .npy file of token ids ({e})") from None
    if not isinstance(ids, np.ndarray) or ids.dtype.kind not in "iu":
        raise CompareError(
            f"{path}: token ids must be a .npy array of integers, got "
            f"{getattr(ids, 'dtype', type(ids).__name__)}"
        )
    ids = ids.reshape(-1)
    if ids.size != n:
        raise CompareError(
            f"{path}: holds {ids.size} token ids; expected {n}, one per row (the id of the "
            f"token each row predicts)"
        )
    ids = np.asarray(ids, dtype=np.int64)
    if ids.min() < 0 or ids.max() >= v:
        raise CompareError(f"{path}: token ids outside [0, {v}) (the vocabulary)")
    return ids


def _progress(total: int, enabled: bool):
    """A tqdm bar on stderr when asked for and tqdm is installed (an optional extra)."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="tok", unit_scale=True, desc="divkit compare", leave=False)


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
    tokens=None,
    chunk_size: Optional[int] = None,
    threads: Optional[int] = None,
    engine: Optional[str] = None,
):
    """Per-token divergence statistics of ``test`` against ``base`` (paths of ``.npy``,
    ``.safetensors`` or llama.cpp ``--kl-divergence-base`` files; see the module's docstring
    for the formulas, directions and standard errors).

    The files are streamed in blocks of ``block_rows`` rows (default: ``DEFAULT_BLOCK_BYTES``
    of fp32 logits per file). ``tensor`` names the tensor in the ``.safetensors`` file(s)
    (ignored for another format; an error when neither file is ``.safetensors``);
    ``base_tensor`` / ``test_tensor`` name it in one file only. ``progress`` shows a tqdm
    progress bar on stderr when tqdm is installed. ``tokens``: a ``.npy`` file (or an array)
    of the N token ids the rows predict (a llama.cpp file brings its own). ``chunk_size``: rows
    per chunk of the per-chunk table (default: llama.cpp's chunks with a llama.cpp file, no
    table otherwise). ``engine``: ``"core"`` computes the per-token values in divkit's C++ core
    (:func:`divkit._C.compare_rows`, include/divkit/compare.h: float64, the rows read from the
    memory maps without a copy, spread over threads; the default), ``"numpy"`` in numpy
    float64 (the reference the core is tested against; the default only when the compiled
    extension lacks the kernel). ``threads``: the core's threads (default: divkit's thread
    count), or numpy's blocks computed at once (default: up to 4, the CPU count); the values
    do not depend on it nor on ``block_rows`` (default: ``CORE_BLOCK_BYTES`` of fp32 logits
    per file for the core).

    Returns a JSON-serializable dict: ``base``, ``test`` (paths), ``tokens`` (N), ``vocab``
    (V), ``base_dtype``, ``test_dtype``, ``base_format``, ``test_format``, ``block_rows``;
    ``kl``, ``js``, ``tvd`` and ``delta_p`` (the base top token's Δp), each a
    :func:`summarize` dict (``delta_p`` also has ``rms`` and ``rms_se``); ``top1_agreement``
    and ``top1_agreement_se`` (llama.cpp's "same top p"); with token ids also
    ``delta_p_next`` (llama.cpp's Δp, on the actual next token; with ``rms`` and ``rms_se``),
    ``nll`` and ``nll_base`` summaries and ``perplexity`` (llama.cpp's PPL block); with chunks
    ``chunk_size`` and ``chunks`` (per chunk: its rows and mean KL, and llama.cpp's running
    figures up to its end). With ``return_values=True``, returns ``(result, values)``:
    ``values`` holds the per-token numpy arrays (float64; ``top1`` bool).
    """
    res, values = _compare(
        base,
        test,
        tensor,
        base_tensor,
        test_tensor,
        block_rows,
        progress,
        tokens,
        chunk_size,
        return_values,
        threads,
        engine,
    )
    return (res, values) if return_values else res


_COLUMNS = ("kl", "js", "tvd", "delta_p", "top1")
_TOKEN_COLUMNS = ("nll", "nll_base", "delta_p_next")


def _check_regular(path: str, what: str = "") -> None:
    """A regular file, or CompareError: opening a FIFO or a device would block or stream."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CompareError(f"{path}: no such file{what}") from None
    except OSError as e:
        raise CompareError(f"{path}: cannot be read ({e.strerror}){what}") from None
    if stat.S_ISDIR(st.st_mode):
        raise CompareError(f"{path}: is a directory, not a .npy or .safetensors file{what}")
    if not stat.S_ISREG(st.st_mode):
        raise CompareError(f"{path}: not a regular file (a FIFO, socket or device){what}")


def _open_pair(base, test, tensor, base_tensor, test_tensor):
    # The shared ``tensor`` applies to the .safetensors files (the others hold one array).
    def is_st(path):
        if not os.path.isfile(path):
            return True  # open_logits reports it
        try:
            with open(path, "rb") as f:
                m = f.read(len(LLAMACPP_MAGIC))
        except OSError:
            return True  # open_logits reports it
        return not (m.startswith(_NPY_MAGIC) or m == LLAMACPP_MAGIC)

    st = [is_st(base), is_st(test)]
    if tensor is not None and not any(st):
        raise CompareError(
            f"{os.fspath(base)}, {os.fspath(test)}: --tensor {tensor!r} given, "
            f"but neither file is a .safetensors file"
        )
    fb = open_logits(base, base_tensor if base_tensor is not None else (tensor if st[0] else None))
    ft = open_logits(test, test_tensor if test_tensor is not None else (tensor if st[1] else None))
    if fb.shape != ft.shape:
        raise CompareError(
            f"shape mismatch: {fb.path} holds {list(fb.shape)} and {ft.path} "
            f"holds {list(ft.shape)} (as [N, V]); both models must score the "
            f"same tokens over the same vocabulary"
        )
    return fb, ft


def _targets(fb: LogitsFile, ft: LogitsFile, tokens, n: int, v: int):
    own = [f for f in (fb, ft) if f.targets is not None]
    if tokens is not None and own:
        raise CompareError(
            f"{own[0].path}: a llama.cpp logits file holds its token ids; --tokens is not needed"
        )
    if len(own) == 2 and (fb.n_ctx != ft.n_ctx or not np.array_equal(fb.targets, ft.targets)):
        raise CompareError(
            f"{fb.path}, {ft.path}: the two llama.cpp files scored different tokens "
            f"(n_ctx {fb.n_ctx} and {ft.n_ctx})"
        )
    if own:
        return own[0].targets
    if tokens is None:
        return None
    if isinstance(tokens, np.ndarray):
        ids = tokens.reshape(-1).astype(np.int64)
        if ids.size != n or ids.min() < 0 or ids.max() >= v:
            raise CompareError(f"tokens: expected {n} ids in [0, {v})")
        return ids
    return _load_tokens(tokens, n, v)


def _core_kernel():
    """divkit._C.compare_rows, or None when the compiled extension is missing or predates it."""
    try:
        from .. import _C
    except ImportError:
        return None
    return getattr(_C, "compare_rows", None)


def _engine(engine: Optional[str]):
    """The C++ kernel for ``engine`` "core" (or None, the default, when it exists), else None
    (numpy)."""
    if engine not in (None, "core", "numpy"):
        raise CompareError(f"engine must be 'core' or 'numpy', got {engine!r}")
    if engine == "numpy":
        return None
    kernel = _core_kernel()
    if kernel is None and engine == "core":
        raise CompareError("engine 'core': divkit's compiled extension has no compare_rows")
    return kernel


def _threads(threads: Optional[int], core: bool = False) -> int:
    if threads is None:
        return 0 if core else max(1, min(4, os.cpu_count() or 1))
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise CompareError(f"threads must be an int >= 1, got {threads!r}")
    return threads


def _compare(
    base,
    test,
    tensor,
    base_tensor,
    test_tensor,
    block_rows,
    progress,
    tokens,
    chunk_size,
    keep,
    threads=None,
    engine=None,
):
    kernel = _engine(engine)
    fb, ft = _open_pair(base, test, tensor, base_tensor, test_tensor)
    n, v = fb.shape
    rows = _block_rows(v, block_rows, kernel is not None)
    targets = _targets(fb, ft, tokens, n, v)
    if chunk_size is None:
        chunk_size = fb.chunk_rows or ft.chunk_rows
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise CompareError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    cols = _COLUMNS + (_TOKEN_COLUMNS if targets is not None else ())
    ci = {k: i for i, k in enumerate(cols)}

    # The per-token columns live in a temporary file (memory-mapped): a few floats per token.
    workers = _threads(threads, kernel is not None)
    tmp = tempfile.TemporaryFile(prefix="divkit-compare-")
    try:
        store = np.memmap(tmp, dtype=np.float64, mode="w+", shape=(len(cols), n))

        def block(start: int, stop: int) -> int:
            xb, xt = fb.rows(start, stop), ft.rows(start, stop)
            for name, f, x in (("base", fb, xb), ("test", ft, xt)):
                if f.format != "llama.cpp" and not np.all(np.isfinite(x.max(axis=1))):
                    _check_rows(name, f, x, start)
            lb, pb, top_b = _log_softmax(xb, fb.kl_floor)
            lt, pt, top_t = _log_softmax(xt, None)
            t = None if targets is None else targets[start:stop]
            m = _block_metrics(lb, pb, top_b, lt, pt, top_t, t)
            for k, val in m.items():
                store[ci[k], start:stop] = val
            fb.release(start, stop)
            ft.release(start, stop)
            return stop - start

        floor = -math.inf if fb.kl_floor is None else float(fb.kl_floor)
        core_threads = workers

        def block_core(start: int, stop: int) -> int:
            xb, fmt_b = fb.core_rows(start, stop)
            xt, fmt_t = ft.core_rows(start, stop)
            out = {k: store[ci[k], start:stop] for k in cols}
            try:
                kernel(
                    xb,
                    xt,
                    None if targets is None else targets[start:stop],
                    base_format=fmt_b,
                    test_format=fmt_t,
                    vocab=v,
                    base_floor=floor,
                    num_threads=core_threads,
                    **out,
                )
            except ValueError as e:
                # A bad row: numpy's check names the file and the row; anything else as is.
                for name, f in (("base", fb), ("test", ft)):
                    if f.format != "llama.cpp":
                        _check_rows(name, f, f.rows(start, stop), start)
                raise CompareError(f"{fb.path}, {ft.path}: {e}") from None
            fb.release(start, stop)
            ft.release(start, stop)
            return stop - start

        if kernel is not None:
            block, workers = block_core, 1  # the kernel spreads a block's rows over threads

        # Blocks are independent (one row's values do not depend on the others), so threads
        # (numpy releases the GIL in its loops) give the same values as one.
        bar = _progress(n, progress)
        spans = [(s, min(n, s + rows)) for s in range(0, n, rows)]
        try:
            if workers == 1:
                for s, e in spans:
                    done = block(s, e)
                    if bar is not None:
                        bar.update(done)
            else:
                with ThreadPoolExecutor(workers) as pool:
                    pending: Deque = deque()
                    try:
                        for s, e in spans:
                            pending.append(pool.submit(block, s, e))
                            while len(pending) > 2 * workers or (pending and s + rows >= n):
                                done = pending.popleft().result()  # in order: first bad row
                                if bar is not None:
                                    bar.update(done)
                    finally:
                        for f in pending:
                            f.cancel()
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
            "base_format": fb.format,
            "test_format": ft.format,
            "block_rows": rows,
        }
        if fb.tensor is not None:
            result["base_tensor"] = fb.tensor
        if ft.tensor is not None:
            result["test_tensor"] = ft.tensor
        col = {k: store[ci[k]] for k in cols}
        top_count = _sums(col["top1"], powers=(1,))[0]
        result["top1_agreement"], result["top1_agreement_se"] = _same_top(top_count, n)
        dp2, dp4 = _sums(col["delta_p"], powers=(2, 4))
        rms_top = _rms(dp2, dp4, n)
        if targets is not None:
            a1, a2 = _sums(col["nll"])
            b1, b2 = _sums(col["nll_base"])
            cross = _cross(col["nll"], col["nll_base"], 0, n)
            result["perplexity"] = _ppl_block(a1, b1, a2, b2, cross, n)
            n2, n4 = _sums(col["delta_p_next"], powers=(2, 4))
            rms_next = _rms(n2, n4, n)
        if chunk_size is not None:
            result["chunk_size"] = chunk_size
            # The chunks' RMS Δp: llama.cpp's (next token) given ids, else the top-token one.
            result["chunks_delta_p"] = "delta_p_next" if targets is not None else "delta_p"
            result["chunks"] = _chunks(col, n, chunk_size, targets is not None)
        values = None
        if keep:
            values = {k: np.array(col[k]) for k in cols}
            values["top1"] = values["top1"].astype(bool)
        # Percentiles: each column sorted in place in the temporary file (after the sums).
        for k in cols:
            if k != "top1":
                result[k] = _summary_inplace(col[k])
        result["delta_p"]["rms"], result["delta_p"]["rms_se"] = rms_top
        if targets is not None:
            result["delta_p_next"]["rms"], result["delta_p_next"]["rms_se"] = rms_next
        del col
        return result, values
    finally:
        tmp.close()


def _summary_inplace(c: np.ndarray, percentiles: Sequence[float] = PERCENTILES) -> Dict[str, float]:
    """Moments of a column, then its exact percentiles after sorting it in place."""
    n = len(c)
    s1, s2 = _sums(c)
    mean, se = _mean_se(s1, s2, n)
    dev = 0.0
    for i in range(0, n, _PIECE):
        with np.errstate(invalid="ignore"):  # an infinite KL: inf - inf
            x = np.asarray(c[i : i + _PIECE], dtype=np.float64) - mean
        dev += float((x * x).sum())
    c.sort()
    out = {
        "mean": mean,
        "se": se,
        "std": math.sqrt(dev / n),
        "min": float(c[0]),
        "max": float(c[n - 1]),
        "median": (float(c[n // 2]) if n % 2 else 0.5 * (float(c[n // 2 - 1]) + float(c[n // 2]))),
    }
    for q in percentiles:
        out[f"p{q:g}"] = _percentile_sorted(c, q)
    return out


def _chunks(col, n: int, size: int, with_tokens: bool) -> List[Dict[str, Any]]:
    """Per chunk: its rows, its own mean KL, and llama.cpp's running figures (all rows up to
    the chunk's end), as its per-chunk table prints them."""
    out = []
    run = dict(n=0, kl=0.0, kl2=0.0, top=0.0, dp2=0.0, dp4=0.0, a=0.0, a2=0.0, b=0.0, b2=0.0)
    run["ab"] = 0.0
    for c, start in enumerate(range(0, n, size)):
        stop = min(n, start + size)
        m = stop - start
        kl1, kl2 = _sums(col["kl"], start, stop)
        run["n"] += m
        run["kl"] += kl1
        run["kl2"] += kl2
        run["top"] += _sums(col["top1"], start, stop, powers=(1,))[0]
        dpcol = col["delta_p_next"] if with_tokens else col["delta_p"]
        d2, d4 = _sums(dpcol, start, stop, powers=(2, 4))
        run["dp2"] += d2
        run["dp4"] += d4
        k = run["n"]
        kl_mean, kl_se = _mean_se(run["kl"], run["kl2"], k)
        own_mean, own_se = _mean_se(kl1, kl2, m)
        rms, rms_se = _rms(run["dp2"], run["dp4"], k)
        top, top_se = _same_top(run["top"], k)
        entry: Dict[str, Any] = {
            "chunk": c + 1,
            "start": start,
            "rows": m,
            "kl_chunk": own_mean,
            "kl_chunk_se": own_se,
            "kl": kl_mean,
            "kl_se": kl_se,
            "rms_dp": rms,
            "rms_dp_se": rms_se,
            "same_top": top,
            "same_top_se": top_se,
        }
        if with_tokens:
            a1, a2 = _sums(col["nll"], start, stop)
            b1, b2 = _sums(col["nll_base"], start, stop)
            run["a"] += a1
            run["a2"] += a2
            run["b"] += b1
            run["b2"] += b2
            run["ab"] += _cross(col["nll"], col["nll_base"], start, stop)
            p = _ppl_block(run["a"], run["b"], run["a2"], run["b2"], run["ab"], k)
            entry["ppl_test"], entry["ppl_test_se"] = p["ppl_test"], p["ppl_test_se"]
            entry["ln_ppl_ratio"] = p["ln_ppl_ratio"]
            entry["ln_ppl_ratio_se"] = p["ln_ppl_ratio_se"]
        out.append(entry)
    return out


def _pm(x: Optional[float], se: Optional[float], fmt: str = ".6f", scale: float = 1.0) -> str:
    if x is None:
        return "n/a"
    return f"{scale * x:{fmt}} ± {scale * (se or 0.0):{fmt}}"


def format_text(result: Dict[str, Any]) -> str:
    """A plain-text report of a :func:`compare_files` result: the statistics tables, then
    llama.cpp's report (its figures and "±" standard errors), then the per-chunk table."""
    L: List[str] = []
    name = lambda p, t: p + (f" [{t}]" if t else "")  # noqa: E731
    L.append(f"base: {name(result['base'], result.get('base_tensor'))} ({result['base_dtype']})")
    L.append(f"test: {name(result['test'], result.get('test_tensor'))} ({result['test_dtype']})")
    L.append(f"tokens: {result['tokens']}, vocabulary: {result['vocab']}")
    L.append(f"top-1 agreement: {100 * result['top1_agreement']:.3f}%")
    L.append("")
    labels = {"kl": "KL", "js": "JS", "tvd": "TVD", "delta_p": "dp top", "delta_p_next": "dp next"}
    keys = [k for k in labels if k in result]
    order = ["mean", "se", "std", "min", "median", "max"]
    L.append(f"{'':<9}" + "".join(f"{k:>12}" for k in order))
    for k in keys:
        L.append(f"{labels[k]:<9}" + "".join(f"{result[k][c]:>12.4g}" for c in order))
    L.append("")
    pct = [f"p{q:g}" for q in PERCENTILES]
    L.append(f"{'':<9}" + "".join(f"{k:>11}" for k in pct))
    for k in keys:
        L.append(f"{labels[k]:<9}" + "".join(f"{result[k][c]:>11.4g}" for c in pct))
    L.append("")
    L.append(
        f"KL = KL(base || test), JS = Jensen-Shannon (beta 0.5), TVD = total variation, "
        f"per token (nats); dp top = p_test - p_base of the base model's top token "
        f"(RMS {result['delta_p']['rms']:.4g})."
    )
    if "delta_p_next" in result:
        L.append("dp next = p_test - p_base of the actual next token (llama.cpp's Δp).")
    L.append("se = standard error of the mean (llama.cpp's; shown as ± below).")
    L.append("")
    ppl = result.get("perplexity")
    if ppl is not None:
        L.append("====== Perplexity statistics ======")
        cor = ppl["cor_ln_ppl"]
        L.append(f"Mean PPL(Q)                   : {_pm(ppl['ppl_test'], ppl['ppl_test_se'])}")
        L.append(f"Mean PPL(base)                : {_pm(ppl['ppl_base'], ppl['ppl_base_se'])}")
        L.append(
            "Cor(ln(PPL(Q)), ln(PPL(base))): " + ("n/a" if cor is None else f"{100 * cor:6.2f}%")
        )
        L.append(
            f"Mean ln(PPL(Q)/PPL(base))     : {_pm(ppl['ln_ppl_ratio'], ppl['ln_ppl_ratio_se'])}"
        )
        L.append(f"Mean PPL(Q)/PPL(base)         : {_pm(ppl['ppl_ratio'], ppl['ppl_ratio_se'])}")
        L.append(f"Mean PPL(Q)-PPL(base)         : {_pm(ppl['ppl_diff'], ppl['ppl_diff_se'])}")
        L.append("")
    kl = result["kl"]
    L.append("====== KL divergence statistics ======")
    L.append(f"Mean    KLD: {_pm(kl['mean'], kl['se'], '10.6f')}")
    rows = [("Maximum", "max"), ("99.9%  ", "p99.9"), ("99.0%  ", "p99"), ("95.0%  ", "p95")]
    rows += [("90.0%  ", "p90"), ("75.0%  ", "p75"), ("Median ", "median"), ("25.0%  ", "p25")]
    rows += [("10.0%  ", "p10"), (" 5.0%  ", "p5"), (" 1.0%  ", "p1"), (" 0.1%  ", "p0.1")]
    rows += [("Minimum", "min")]
    for label, key in rows:
        L.append(f"{label} KLD: {kl[key]:10.6f}")
    L.append("")
    L.append("====== Token probability statistics ======")
    for k, what in (("delta_p_next", "Δp"), ("delta_p", "Δp top")):
        if k not in result:
            continue
        d = result[k]
        L.append(f"Mean    {what}: {_pm(d['mean'], d['se'], '6.3f', 100.0)} %")
        for label, key in rows:
            L.append(f"{label} {what}: {100 * d[key]:6.3f}%")
        L.append(f"RMS {what}    : {_pm(d['rms'], d['rms_se'], '6.3f', 100.0)} %")
    f, se = result["top1_agreement"], result["top1_agreement_se"]
    L.append(f"Same top p: {_pm(f, se, '6.3f', 100.0)} %")
    L.append(
        "(Δp: on the actual next token, as llama.cpp; Δp top: on the base model's top token.)"
        if "delta_p_next" in result
        else "(Δp top: on the base model's top token; token ids (--tokens) give llama.cpp's Δp "
        "on the actual next token and the perplexity block.)"
    )
    chunks = result.get("chunks")
    if chunks:
        L.append("")
        dp = "Δp RMS" if "delta_p_next" in result else "Δp top RMS"
        head = f"{'chunk':>5} {'rows':>7}"
        if "delta_p_next" in result:
            head += f" {'PPL(Q)':>21} {'ln(PPL(Q)/PPL(base))':>25}"
        head += f" {'KL divergence':>25} {dp:>19} {'Same top p':>19} {'KLD (chunk)':>12}"
        L.append(f"per chunk of {result['chunk_size']} rows (running figures up to its end):")
        L.append(head)
        for c in chunks:
            line = f"{c['chunk']:>5} {c['rows']:>7}"
            if "ppl_test" in c:
                line += f" {_pm(c['ppl_test'], c['ppl_test_se'], '9.4f'):>21}"
                line += f" {_pm(c['ln_ppl_ratio'], c['ln_ppl_ratio_se'], '10.5f'):>25}"
            line += f" {_pm(c['kl'], c['kl_se'], '10.5f'):>25}"
            line += f" {_pm(c['rms_dp'], c['rms_dp_se'], '6.3f', 100.0) + ' %':>19}"
            line += f" {_pm(c['same_top'], c['same_top_se'], '6.3f', 100.0) + ' %':>19}"
            line += f" {c['kl_chunk']:>12.5f}"
            L.append(line)
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
            tokens=getattr(args, "tokens", None),
            chunk_size=getattr(args, "chunk_size", None),
            threads=getattr(args, "threads", None),
            engine=getattr(args, "engine", None),
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
        description="Per-token divergence statistics of TEST against BASE and llama.cpp's "
        "KL-divergence report (llama-perplexity --kl-divergence): KL(base || test) with "
        "its standard error and percentiles, JS, TVD, same top p, Δp (on the actual next "
        "token, given token ids; and on the base top token), the perplexity block and a "
        "per-chunk table. Inputs: .npy or .safetensors files of [N, V] logits or log-probs, "
        "or llama.cpp's --kl-divergence-base file (which holds the token ids), streamed "
        "through memory maps. Exit code 2 on a bad file.",
    )
    p.add_argument("base", help="reference logits/log-probs (.npy, .safetensors, llama.cpp)")
    p.add_argument("test", help="logits/log-probs to compare (same shape)")
    p.add_argument(
        "--tensor",
        metavar="NAME",
        help="tensor name in the .safetensors file(s) (needed when one holds several)",
    )
    p.add_argument("--base-tensor", metavar="NAME", help="tensor name in BASE only")
    p.add_argument("--test-tensor", metavar="NAME", help="tensor name in TEST only")
    p.add_argument(
        "--tokens",
        metavar="FILE",
        help=".npy of N integer token ids, the token each row predicts (gives the "
        "perplexity block and Δp on the actual next token)",
    )
    p.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        metavar="N",
        help="rows per chunk of the per-chunk table (default: llama.cpp's chunks for a "
        "llama.cpp file, no table otherwise)",
    )
    p.add_argument(
        "--block-rows",
        type=int,
        default=None,
        metavar="N",
        help="rows read per block (default: 16 MiB of fp32 logits per file; numpy: 4 MiB)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="threads of the C++ core (default: divkit's thread count), or with --engine numpy "
        "blocks computed at once (default: up to 4); the results do not depend on it",
    )
    p.add_argument(
        "--engine",
        choices=("core", "numpy"),
        default=None,
        help="where the per-token values are computed: divkit's C++ core (default) or numpy "
        "float64 (the reference the core is tested against; about 10x slower)",
    )
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_cli)
