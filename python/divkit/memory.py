"""The host cache: divkit's caching allocator for the large CPU buffers it returns.

The [N, V] student gradient of :func:`divkit.divergence` (and of ``divergence_and_grad``,
``sparse_divergence``, ``topk_divergence``, and the teacher's when it is asked) is a fresh buffer
every call unless ``grad_out=`` or ``inplace_grad=True`` is given. A fresh multi-gigabyte buffer
costs a page fault and the zeroing of every page at its first write, more than the kernel that
fills it. divkit therefore takes these buffers from a cache of mapped blocks (C++:
``divkit/host_cache.h``): when the tensor holding a block is freed, the block goes back to the
cache instead of to the system, and the next call of a fitting size gets it with its pages
already in place. A block is never handed out while a tensor still holds it.

- What is cached: CPU buffers of at least :data:`MIN_BYTES`; smaller ones and other devices use
  ``torch.empty`` as before.
- Fit: the smallest free block of at least the size asked and at most twice it.
- Bound: the free blocks kept total at most :func:`cache_limit` bytes (default: a quarter of
  the physical memory or of the cgroup's limit, whichever is smaller; the environment variable
  ``DIVKIT_HOST_CACHE_LIMIT``, e.g. ``4G`` or ``0``, sets it at start); the least recently
  freed are unmapped first. A limit of 0 turns the cache off: divkit then allocates with
  ``torch.empty`` (with the kernels' huge-page advice, see ``DIVKIT_HUGE_PAGES`` in the guide).
- Page size: the cache's blocks are not advised onto transparent huge pages (their first write
  is paid once per block, and was measured faster with 4 KiB pages where free huge pages are
  scarce); ``DIVKIT_HUGE_PAGES=always`` advises them too.
- :func:`empty_cache` unmaps the free blocks; :func:`cache_stats` reports sizes and counters.
- ``os.fork``: a child does not inherit the free blocks (its cache starts empty); tensors it
  inherited stay readable and return their blocks to the child's own cache.

This module needs neither torch nor numpy to import.
"""

from __future__ import annotations

from typing import Dict

from . import _C

__all__ = ["MIN_BYTES", "cache_limit", "cache_stats", "empty_cache", "set_cache_limit"]

#: Buffers smaller than this many bytes are not taken from the cache (torch's allocator reuses
#: small blocks itself).
MIN_BYTES = 1 << 20

_DTYPES = {"float32", "float64", "float16", "bfloat16"}


def set_cache_limit(nbytes: int) -> None:
    """Sets the bound on the bytes of free blocks the host cache keeps, and unmaps the least
    recently freed blocks beyond it; 0 turns the cache off (fresh ``torch.empty`` buffers).

    nbytes must be an int >= 0 (raises :class:`divkit.Error` naming ``nbytes`` otherwise).
    """
    from . import _validate

    v = _validate.integer("set_cache_limit", "nbytes", nbytes, min=0)
    _C.set_host_cache_limit(v)


def cache_limit() -> int:
    """The bound on the bytes of free blocks the host cache keeps (0: the cache is off)."""
    return _C.host_cache_limit()


def empty_cache() -> int:
    """Unmaps every free block of the host cache and returns the bytes given back to the system.
    Blocks held by live tensors are not touched."""
    return _C.host_cache_empty()


def cache_stats() -> Dict[str, int]:
    """The host cache's sizes and counters: ``limit_bytes``, ``cached_bytes`` and
    ``cached_blocks`` (free blocks kept), ``in_use_bytes`` and ``in_use_blocks`` (held by
    tensors), ``hits`` and ``misses`` (requests served by a cached block, or by a new one),
    ``unmapped_blocks`` and ``unmapped_bytes`` (given back to the system)."""
    return dict(_C.host_cache_stats())


def _empty(shape, dtype, device):
    """An uninitialized tensor for an output divkit fills completely: from the host cache when
    it is a CPU tensor of at least MIN_BYTES and the cache is on, else ``torch.empty``."""
    import torch

    numel = 1
    for d in shape:
        numel *= d
    name = str(dtype).rpartition(".")[2]
    if (
        torch.device(device).type == "cpu"
        and name in _DTYPES
        and numel * dtype.itemsize >= MIN_BYTES
        and _C.host_cache_limit() > 0
    ):
        return torch.from_dlpack(_C.host_cache_tensor(list(shape), name))
    return torch.empty(shape, dtype=dtype, device=device)
