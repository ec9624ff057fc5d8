// divkit: a caching allocator for large host (CPU) buffers, such as the [N, V] logit gradients.
//
// A fresh multi-gigabyte buffer costs a page fault and the zeroing of a page for every 4 KiB (or
// 2 MiB with huge pages) at its first write, which at V = 128k costs more than the divergence
// kernel that fills it. A training loop asks for the same size every step, so the allocator
// keeps a released block mapped and hands it to the next request that fits: no fault and no
// zeroing on reuse (a reused block holds stale data, like any uninitialized buffer).
//
// - Blocks are private anonymous mappings (mmap), 2 MiB-aligned from 4 MiB on. They are not
//   advised onto transparent huge pages unless DIVKIT_HUGE_PAGES=always is in the environment: a
//   block's first write is paid once, and was measured faster with 4 KiB pages where free 2 MiB
//   pages are scarce (memory pressure, some virtual machines); reuse is as fast either way.
// - A block is handed out to one owner at a time: it returns to the free list only when its
//   owner releases it (host_cache_release, from any thread), never while it is referenced.
// - A request is served by the smallest free block of at least its size and at most twice it;
//   otherwise a new block is mapped.
// - The free blocks kept are bounded: host_cache_limit() bytes (default: a quarter of the
//   physical memory or of the cgroup's memory limit, whichever is smaller; the environment
//   variable DIVKIT_HOST_CACHE_LIMIT, e.g. "4G" or "0", sets it at start). When a release
//   would exceed the limit, the least recently released blocks are unmapped first. A limit of 0
//   keeps nothing: every release unmaps.
// - fork(): free blocks are not inherited by a child (they are marked MADV_DONTFORK, so the
//   parent's reuse does not copy pages the child shares); blocks in use are inherited as any
//   memory is, and the child's cache starts with them as its only blocks.
#pragma once

#include <cstddef>
#include <cstdint>

namespace divkit {

// A block handed out by host_cache_acquire: `bytes` >= the size asked for (rounded up to whole
// pages; to 2 MiB from 4 MiB on).
struct HostBlock {
  void* data = nullptr;
  size_t bytes = 0;
};

struct HostCacheStats {
  int64_t limit_bytes = 0;   // the bound on cached free bytes (host_cache_limit())
  int64_t cached_bytes = 0;  // free blocks kept mapped for reuse
  int64_t cached_blocks = 0;
  int64_t in_use_bytes = 0;  // blocks handed out and not yet released
  int64_t in_use_blocks = 0;
  int64_t hits = 0;             // requests served by a cached block
  int64_t misses = 0;           // requests that mapped a new block
  int64_t unmapped_blocks = 0;  // blocks given back to the system (limit, host_cache_empty)
  int64_t unmapped_bytes = 0;
};

// A block of at least `bytes` bytes (bytes >= 1), cached or newly mapped; its contents are
// unspecified. Throws std::bad_alloc when the system refuses the mapping even after the free
// blocks were unmapped, Error when DIVKIT_HOST_CACHE_LIMIT cannot be read, or bytes is 0.
HostBlock host_cache_acquire(size_t bytes);
// Returns the block whose data pointer is `data` to the cache (or unmaps it, see the limit); any
// thread may call it. Returns false, doing nothing, for a pointer that is not a block in use.
bool host_cache_release(void* data) noexcept;
// The bound on the bytes of free blocks kept mapped.
int64_t host_cache_limit();
// Sets the bound (bytes >= 0; 0 turns caching off) and unmaps free blocks beyond it. Throws
// Error naming `bytes` for a negative value.
void set_host_cache_limit(int64_t bytes);
// Unmaps every free block; returns the bytes given back. Blocks in use are not touched.
int64_t host_cache_empty();
// Counters and sizes, for tests and monitoring.
HostCacheStats host_cache_stats();

// An owned block (move-only): acquired on construction, released on destruction.
class HostBuffer {
 public:
  HostBuffer() = default;
  explicit HostBuffer(size_t bytes) : block_(host_cache_acquire(bytes)) {}
  HostBuffer(HostBuffer&& o) noexcept : block_(o.block_) { o.block_ = {}; }
  HostBuffer& operator=(HostBuffer&& o) noexcept {
    if (this != &o) {
      reset();
      block_ = o.block_;
      o.block_ = {};
    }
    return *this;
  }
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;
  ~HostBuffer() { reset(); }

  void* data() const { return block_.data; }
  size_t size() const { return block_.bytes; }
  // Gives up ownership: the caller releases the block with host_cache_release.
  HostBlock release() {
    HostBlock b = block_;
    block_ = {};
    return b;
  }
  void reset() {
    if (block_.data != nullptr) host_cache_release(block_.data);
    block_ = {};
  }

 private:
  HostBlock block_;
};

}  // namespace divkit
