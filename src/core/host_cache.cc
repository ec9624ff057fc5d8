// The host cache (include/divkit/host_cache.h): one process-wide free list of mapped blocks and a
// table of the blocks in use, behind one mutex. A new block is mapped outside the lock; the
// madvise calls that mark a block as inherited or not by fork run under it, so that a fork (whose
// prepare handler takes the lock) never sees a block in one list with the other list's marking.
#include "divkit/host_cache.h"

#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <mutex>
#include <new>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "divkit/tensor.h"
#include "row_io.h"

namespace divkit {
namespace {

constexpr size_t kPage = 4096;
constexpr size_t kHuge = size_t{2} << 20;
// From this size on a block is 2 MiB-aligned and a multiple of 2 MiB, so that every one of its
// pages can be a huge page (the advice's own threshold, row_io.h).
constexpr size_t kHugeFrom = size_t{4} << 20;
constexpr const char* kLimitEnv = "DIVKIT_HOST_CACHE_LIMIT";

size_t round_up(size_t x, size_t to) { return (x + to - 1) / to * to; }

size_t block_size(size_t bytes) {
  return bytes >= kHugeFrom ? round_up(bytes, kHuge) : round_up(bytes, kPage);
}

// Inheritance by fork: a free block is not inherited (MADV_DONTFORK), so that the parent's reuse
// after a fork does not copy pages a child (a data-loader worker, say) still shares; a block in
// use is inherited like any memory, since the child may read the tensor that holds it.
void mark_inherited(void* p, size_t bytes, bool inherited) {
#if defined(MADV_DONTFORK) && defined(MADV_DOFORK)
  madvise(p, bytes, inherited ? MADV_DOFORK : MADV_DONTFORK);
#else
  (void)p, (void)bytes, (void)inherited;
#endif
}

// A new private anonymous mapping of `bytes` (a block_size), 2 MiB-aligned when it is large
// (so that a system whose THP mode is "always", or DIVKIT_HUGE_PAGES=always, can back all of it
// with huge pages): the mapping is made 2 MiB longer and the unaligned ends are unmapped.
void* map_block(size_t bytes) {
  const bool align = bytes >= kHugeFrom;
  const size_t len = bytes + (align ? kHuge : 0);
  void* raw = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  if (!align) return raw;
  const uintptr_t r = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t a = (r + kHuge - 1) & ~(uintptr_t{kHuge} - 1);
  if (a > r) munmap(raw, a - r);
  const uintptr_t end = r + len;
  if (end > a + bytes) munmap(reinterpret_cast<void*>(a + bytes), end - (a + bytes));
  void* p = reinterpret_cast<void*>(a);
  // Not in use yet, so advise_huge_pages does not skip it; see huge_pages_mode for the policy.
  if (detail::huge_pages_mode() == detail::HugePages::always) detail::advise_huge_pages(p, bytes);
  return p;
}

// "4G", "512MiB", "1048576", "0": a byte count with an optional binary suffix.
int64_t parse_bytes(const std::string& text) {
  size_t i = 0;
  while (i < text.size() && std::isspace(static_cast<unsigned char>(text[i]))) ++i;
  const size_t digits_from = i;
  uint64_t value = 0;
  bool overflow = false;
  for (; i < text.size() && std::isdigit(static_cast<unsigned char>(text[i])); ++i) {
    const uint64_t d = static_cast<uint64_t>(text[i] - '0');
    if (value > (uint64_t{INT64_MAX} - d) / 10) overflow = true;
    value = value * 10 + d;
  }
  std::string suffix;
  for (; i < text.size(); ++i) {
    if (std::isspace(static_cast<unsigned char>(text[i]))) continue;
    suffix += static_cast<char>(std::toupper(static_cast<unsigned char>(text[i])));
  }
  int shift = -1;
  if (suffix.empty() || suffix == "B") shift = 0;
  for (auto [letter, s] : {std::pair{'K', 10}, {'M', 20}, {'G', 30}, {'T', 40}}) {
    const std::string l(1, letter);
    if (suffix == l || suffix == l + "B" || suffix == l + "IB") shift = s;
  }
  if (i == digits_from || digits_from == text.size() || shift < 0 || overflow ||
      value > (uint64_t{INT64_MAX} >> shift))
    throw Error(std::string(kLimitEnv) +
                ": expected a byte count such as 4G, 512M or 0 (binary multiples), got '" + text +
                "'");
  return static_cast<int64_t>(value << shift);
}

// A quarter of the physical memory, or of the cgroup (v2 or v1) memory limit when that is
// smaller: room for a step's gradients without holding a large share of a container's memory.
int64_t default_limit() {
  int64_t total = static_cast<int64_t>(sysconf(_SC_PHYS_PAGES)) * sysconf(_SC_PAGESIZE);
  for (const char* path :
       {"/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"}) {
    std::ifstream f(path);
    std::string s;
    if (f >> s && !s.empty() && std::isdigit(static_cast<unsigned char>(s[0]))) {
      const int64_t v = std::strtoll(s.c_str(), nullptr, 10);
      if (v > 0 && (total <= 0 || v < total)) total = v;
    }
  }
  return total > 0 ? total / 4 : int64_t{1} << 30;
}

struct FreeBlock {
  void* data;
  size_t bytes;
  uint64_t released_at;  // a counter: the least recent is unmapped first
};

struct Cache {
  std::mutex mu;
  bool limit_set = false;
  int64_t limit = 0;
  std::vector<FreeBlock> free_blocks;
  std::unordered_map<void*, size_t> in_use;
  uint64_t clock = 0;
  HostCacheStats stats;  // the counters; the sizes are recomputed by host_cache_stats

  // Reads the limit from the environment on first use (under mu).
  void ensure_limit() {
    if (limit_set) return;
    const char* env = std::getenv(kLimitEnv);
    limit = env != nullptr ? parse_bytes(env) : default_limit();
    limit_set = true;
  }

  int64_t cached_bytes() const {
    int64_t s = 0;
    for (const FreeBlock& b : free_blocks) s += static_cast<int64_t>(b.bytes);
    return s;
  }

  // Unmaps free blocks, least recently released first, until at most `keep` bytes remain. Under
  // the lock (no allocation, so that release stays noexcept); eviction is rare.
  void evict_to(int64_t keep) {
    int64_t cached = cached_bytes();
    std::sort(free_blocks.begin(), free_blocks.end(),
              [](const FreeBlock& a, const FreeBlock& b) { return a.released_at < b.released_at; });
    size_t n = 0;
    for (; n < free_blocks.size() && cached > keep; ++n) {
      const FreeBlock& b = free_blocks[n];
      munmap(b.data, b.bytes);
      cached -= static_cast<int64_t>(b.bytes);
      stats.unmapped_blocks += 1;
      stats.unmapped_bytes += static_cast<int64_t>(b.bytes);
    }
    free_blocks.erase(free_blocks.begin(), free_blocks.begin() + static_cast<ptrdiff_t>(n));
  }
};

Cache& cache();

// fork(): the prepare handler takes the lock so that no other thread holds it at the fork; the
// child, the only thread of its process, forgets the free blocks (not mapped there, see
// mark_inherited) and keeps the blocks in use (mapped, owned by the tensors it inherited).
void before_fork() { cache().mu.lock(); }
void after_fork_in_parent() { cache().mu.unlock(); }
void after_fork_in_child() {
  Cache& c = cache();
  c.free_blocks.clear();
  c.mu.unlock();
}

Cache& cache() {
  static Cache* c = [] {
    // Never destroyed: a tensor freed during interpreter shutdown may still release its block.
    auto* made = new Cache;
    pthread_atfork(&before_fork, &after_fork_in_parent, &after_fork_in_child);
    return made;
  }();
  return *c;
}

}  // namespace

HostBlock host_cache_acquire(size_t bytes) {
  if (bytes == 0) throw Error("host_cache_acquire: bytes must be at least 1, got 0");
  if (bytes > (size_t{1} << 62)) throw std::bad_alloc();
  const size_t want = block_size(bytes);
  Cache& c = cache();
  {
    std::lock_guard<std::mutex> lock(c.mu);
    c.ensure_limit();
    // The smallest free block that fits without wasting more than its half; among equals the
    // most recently released (its pages are the likeliest to be in the caches).
    ptrdiff_t best = -1;
    for (size_t i = 0; i < c.free_blocks.size(); ++i) {
      const FreeBlock& b = c.free_blocks[i];
      if (b.bytes < want || b.bytes / 2 > want) continue;
      if (best < 0 || b.bytes < c.free_blocks[best].bytes ||
          (b.bytes == c.free_blocks[best].bytes && b.released_at > c.free_blocks[best].released_at))
        best = static_cast<ptrdiff_t>(i);
    }
    if (best >= 0) {
      const FreeBlock b = c.free_blocks[best];
      c.in_use.emplace(b.data, b.bytes);  // first: if it throws, the block stays free
      c.free_blocks.erase(c.free_blocks.begin() + best);
      mark_inherited(b.data, b.bytes, true);
      c.stats.hits += 1;
      return {b.data, b.bytes};
    }
  }
  void* p = map_block(want);
  if (p == nullptr) {
    // Out of address space or refused by the overcommit policy: give the free blocks back and
    // try once more.
    host_cache_empty();
    p = map_block(want);
    if (p == nullptr) throw std::bad_alloc();
  }
  std::lock_guard<std::mutex> lock(c.mu);
  try {
    c.in_use.emplace(p, want);
  } catch (...) {
    munmap(p, want);
    throw;
  }
  c.stats.misses += 1;
  return {p, want};
}

bool host_cache_release(void* data) noexcept {
  if (data == nullptr) return false;
  Cache& c = cache();
  size_t bytes = 0;
  {
    std::lock_guard<std::mutex> lock(c.mu);
    auto it = c.in_use.find(data);
    if (it == c.in_use.end()) return false;
    bytes = it->second;
    c.in_use.erase(it);
    // A limit that cannot be read keeps nothing (acquire reports the error).
    int64_t limit = 0;
    try {
      c.ensure_limit();
      limit = c.limit;
    } catch (...) {
    }
    bool cached = false;
    if (static_cast<int64_t>(bytes) <= limit) {
      try {
        c.free_blocks.push_back({data, bytes, ++c.clock});
        cached = true;
      } catch (...) {
      }
    }
    if (cached) {
      mark_inherited(data, bytes, false);
      c.evict_to(limit);
      return true;
    }
    c.stats.unmapped_blocks += 1;
    c.stats.unmapped_bytes += static_cast<int64_t>(bytes);
  }
  munmap(data, bytes);
  return true;
}

int64_t host_cache_limit() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  c.ensure_limit();
  return c.limit;
}

void set_host_cache_limit(int64_t bytes) {
  if (bytes < 0)
    throw Error("set_host_cache_limit: bytes must be >= 0 (0 turns caching off), got " +
                std::to_string(bytes));
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  c.limit = bytes;
  c.limit_set = true;
  c.evict_to(bytes);
}

int64_t host_cache_empty() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  const int64_t before = c.cached_bytes();
  c.evict_to(0);
  return before;
}

bool detail::in_host_cache(const void* p) noexcept {
  const auto q = reinterpret_cast<uintptr_t>(p);
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  for (const auto& [data, bytes] : c.in_use) {  // a handful of blocks
    const auto lo = reinterpret_cast<uintptr_t>(data);
    if (q >= lo && q < lo + bytes) return true;
  }
  return false;
}

HostCacheStats host_cache_stats() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  c.ensure_limit();
  HostCacheStats s = c.stats;
  s.limit_bytes = c.limit;
  s.cached_bytes = c.cached_bytes();
  s.cached_blocks = static_cast<int64_t>(c.free_blocks.size());
  s.in_use_blocks = static_cast<int64_t>(c.in_use.size());
  s.in_use_bytes = 0;
  for (const auto& [p, n] : c.in_use) s.in_use_bytes += static_cast<int64_t>(n);
  return s;
}

}  // namespace divkit
