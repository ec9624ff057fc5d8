// The host cache (divkit/host_cache.h): reuse of a released block, no reuse of a held one, the
// fit rule, the bound on cached bytes, empty, errors, many threads releasing each other's
// blocks, and fork. The cache is process-wide: each test sets its own limit and empties the
// cache when it ends.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "core/row_io.h"
#include "divkit/divkit.h"

namespace divkit_test {
namespace {

constexpr size_t kMiB = size_t{1} << 20;

// Sets a limit for one test and restores the previous one (emptying the cache) afterwards.
struct CacheGuard {
  int64_t saved = divkit::host_cache_limit();
  explicit CacheGuard(int64_t limit) {
    divkit::host_cache_empty();
    divkit::set_host_cache_limit(limit);
  }
  ~CacheGuard() {
    divkit::host_cache_empty();
    divkit::set_host_cache_limit(saved);
  }
};

// Writes `tag` into the first word of every page of the block, and reads it back.
void stamp(const divkit::HostBlock& b, uint64_t tag) {
  for (size_t off = 0; off + sizeof(tag) <= b.bytes; off += 4096)
    std::memcpy(static_cast<char*>(b.data) + off, &tag, sizeof(tag));
}
bool stamped(const divkit::HostBlock& b, uint64_t tag) {
  for (size_t off = 0; off + sizeof(tag) <= b.bytes; off += 4096) {
    uint64_t got;
    std::memcpy(&got, static_cast<const char*>(b.data) + off, sizeof(got));
    if (got != tag) return false;
  }
  return true;
}

TEST(HostCache, ReleasedBlockIsReusedAtTheSameAddressWithItsPages) {
  CacheGuard guard(int64_t{64} << 20);
  const auto before = divkit::host_cache_stats();
  divkit::HostBlock a = divkit::host_cache_acquire(10 * kMiB + 123);
  ASSERT_NE(a.data, nullptr);
  EXPECT_EQ(a.bytes, 12 * kMiB);  // whole 2 MiB pages from 4 MiB on
  EXPECT_EQ(reinterpret_cast<uintptr_t>(a.data) % (2 * kMiB), 0u);
  stamp(a, 0xabc);
  EXPECT_TRUE(divkit::host_cache_release(a.data));
  auto s = divkit::host_cache_stats();
  EXPECT_EQ(s.cached_blocks, 1);
  EXPECT_EQ(s.cached_bytes, static_cast<int64_t>(a.bytes));
  EXPECT_EQ(s.in_use_blocks, before.in_use_blocks);

  divkit::HostBlock b = divkit::host_cache_acquire(10 * kMiB);
  EXPECT_EQ(b.data, a.data);
  EXPECT_EQ(b.bytes, a.bytes);
  EXPECT_TRUE(stamped(b, 0xabc));  // not zeroed, not remapped: the same pages
  s = divkit::host_cache_stats();
  EXPECT_EQ(s.hits, before.hits + 1);
  EXPECT_EQ(s.misses, before.misses + 1);
  EXPECT_EQ(s.cached_blocks, 0);
  EXPECT_EQ(s.in_use_blocks, before.in_use_blocks + 1);
  divkit::host_cache_release(b.data);
}

TEST(HostCache, HeldBlockIsNeverHandedOut) {
  CacheGuard guard(int64_t{64} << 20);
  divkit::HostBlock a = divkit::host_cache_acquire(8 * kMiB);
  stamp(a, 1);
  divkit::HostBlock b = divkit::host_cache_acquire(8 * kMiB);
  EXPECT_NE(a.data, b.data);
  const auto lo = [](const divkit::HostBlock& x) { return reinterpret_cast<uintptr_t>(x.data); };
  EXPECT_TRUE(lo(a) + a.bytes <= lo(b) || lo(b) + b.bytes <= lo(a));  // disjoint
  stamp(b, 2);
  EXPECT_TRUE(stamped(a, 1));
  divkit::host_cache_release(b.data);
  divkit::HostBlock c = divkit::host_cache_acquire(8 * kMiB);
  EXPECT_EQ(c.data, b.data);  // the released one, not the held one
  EXPECT_TRUE(stamped(a, 1));
  divkit::host_cache_release(a.data);
  divkit::host_cache_release(c.data);
}

TEST(HostCache, ReleaseOfAnUnknownPointerDoesNothing) {
  CacheGuard guard(int64_t{64} << 20);
  int x = 0;
  EXPECT_FALSE(divkit::host_cache_release(&x));
  EXPECT_FALSE(divkit::host_cache_release(nullptr));
  divkit::HostBlock a = divkit::host_cache_acquire(kMiB);
  EXPECT_TRUE(divkit::host_cache_release(a.data));
  EXPECT_FALSE(divkit::host_cache_release(a.data));  // a second release is refused
  EXPECT_EQ(divkit::host_cache_stats().cached_blocks, 1);
}

TEST(HostCache, FitIsAtLeastTheSizeAndAtMostTwice) {
  CacheGuard guard(int64_t{256} << 20);
  divkit::HostBlock a = divkit::host_cache_acquire(20 * kMiB);
  divkit::host_cache_release(a.data);
  divkit::HostBlock big = divkit::host_cache_acquire(22 * kMiB);  // larger: a new block
  EXPECT_NE(big.data, a.data);
  divkit::HostBlock small = divkit::host_cache_acquire(8 * kMiB);  // 20 > 2 x 8: a new block
  EXPECT_NE(small.data, a.data);
  divkit::HostBlock fits = divkit::host_cache_acquire(10 * kMiB);  // 20 <= 2 x 10: reused
  EXPECT_EQ(fits.data, a.data);
  EXPECT_EQ(fits.bytes, a.bytes);
  for (void* p : {big.data, small.data, fits.data}) divkit::host_cache_release(p);
  // The smallest fitting block is preferred: 22 MiB and 20 MiB are free, 16 MiB is asked.
  divkit::HostBlock d = divkit::host_cache_acquire(16 * kMiB);
  EXPECT_EQ(d.data, a.data);
  divkit::host_cache_release(d.data);
}

TEST(HostCache, LimitBoundsTheCachedBytes) {
  CacheGuard guard(int64_t{16} << 20);
  const auto before = divkit::host_cache_stats();
  std::vector<divkit::HostBlock> blocks;
  for (int i = 0; i < 3; ++i) blocks.push_back(divkit::host_cache_acquire(8 * kMiB));
  for (const auto& b : blocks) divkit::host_cache_release(b.data);
  auto s = divkit::host_cache_stats();
  EXPECT_EQ(s.cached_blocks, 2);
  EXPECT_EQ(s.cached_bytes, int64_t{16} << 20);
  EXPECT_EQ(s.unmapped_blocks, before.unmapped_blocks + 1);
  // The least recently released was unmapped: the next two requests get the other two.
  divkit::HostBlock x = divkit::host_cache_acquire(8 * kMiB);
  divkit::HostBlock y = divkit::host_cache_acquire(8 * kMiB);
  EXPECT_TRUE((x.data == blocks[1].data && y.data == blocks[2].data) ||
              (x.data == blocks[2].data && y.data == blocks[1].data));
  divkit::host_cache_release(x.data);
  divkit::host_cache_release(y.data);

  // A block larger than the limit is unmapped at release.
  divkit::HostBlock huge = divkit::host_cache_acquire(32 * kMiB);
  divkit::host_cache_release(huge.data);
  s = divkit::host_cache_stats();
  EXPECT_LE(s.cached_bytes, int64_t{16} << 20);
  EXPECT_EQ(s.unmapped_blocks, before.unmapped_blocks + 2);

  // Lowering the limit unmaps down to it; 0 keeps nothing.
  divkit::set_host_cache_limit(int64_t{8} << 20);
  EXPECT_EQ(divkit::host_cache_stats().cached_bytes, int64_t{8} << 20);
  divkit::set_host_cache_limit(0);
  EXPECT_EQ(divkit::host_cache_stats().cached_bytes, 0);
  divkit::HostBlock z = divkit::host_cache_acquire(kMiB);
  divkit::host_cache_release(z.data);
  EXPECT_EQ(divkit::host_cache_stats().cached_blocks, 0);
}

TEST(HostCache, EmptyUnmapsTheFreeBlocksOnly) {
  CacheGuard guard(int64_t{64} << 20);
  divkit::HostBlock held = divkit::host_cache_acquire(6 * kMiB);
  stamp(held, 7);
  divkit::HostBlock a = divkit::host_cache_acquire(8 * kMiB);
  divkit::HostBlock b = divkit::host_cache_acquire(kMiB);
  const int64_t freed = static_cast<int64_t>(a.bytes + b.bytes);
  divkit::host_cache_release(a.data);
  divkit::host_cache_release(b.data);
  const auto before = divkit::host_cache_stats();
  EXPECT_EQ(before.cached_bytes, freed);
  EXPECT_EQ(divkit::host_cache_empty(), freed);
  const auto after = divkit::host_cache_stats();
  EXPECT_EQ(after.cached_bytes, 0);
  EXPECT_EQ(after.cached_blocks, 0);
  EXPECT_EQ(after.unmapped_bytes, before.unmapped_bytes + freed);
  EXPECT_EQ(after.in_use_blocks, before.in_use_blocks);
  EXPECT_TRUE(stamped(held, 7));
  EXPECT_EQ(divkit::host_cache_empty(), 0);
  divkit::host_cache_release(held.data);
}

// The kernels' huge-page advice skips the cache's blocks (row_io.h): it asks whether a pointer
// is inside a block in use.
TEST(HostCache, InHostCacheKnowsTheBlocksInUse) {
  CacheGuard guard(int64_t{64} << 20);
  divkit::HostBlock a = divkit::host_cache_acquire(6 * kMiB);
  char* p = static_cast<char*>(a.data);
  EXPECT_TRUE(divkit::detail::in_host_cache(p));
  EXPECT_TRUE(divkit::detail::in_host_cache(p + a.bytes - 1));
  EXPECT_FALSE(divkit::detail::in_host_cache(p + a.bytes));
  int x = 0;
  EXPECT_FALSE(divkit::detail::in_host_cache(&x));
  divkit::host_cache_release(a.data);
  EXPECT_FALSE(divkit::detail::in_host_cache(p));  // free: not a buffer anyone writes
}

TEST(HostCache, BadArgumentsThrowErrorNamingThem) {
  CacheGuard guard(int64_t{64} << 20);
  try {
    divkit::set_host_cache_limit(-1);
    ADD_FAILURE() << "accepted -1";
  } catch (const divkit::Error& e) {
    EXPECT_EQ(std::string(e.what()).rfind("set_host_cache_limit: bytes must be >= 0", 0), 0u)
        << e.what();
  }
  EXPECT_EQ(divkit::host_cache_limit(), int64_t{64} << 20);  // unchanged
  try {
    divkit::host_cache_acquire(0);
    ADD_FAILURE() << "accepted 0 bytes";
  } catch (const divkit::Error& e) {
    EXPECT_EQ(std::string(e.what()).rfind("host_cache_acquire: bytes must be at least 1", 0), 0u)
        << e.what();
  }
}

TEST(HostCache, HostBufferOwnsItsBlock) {
  CacheGuard guard(int64_t{64} << 20);
  void* p = nullptr;
  {
    divkit::HostBuffer a(5 * kMiB);
    p = a.data();
    EXPECT_GE(a.size(), 5 * kMiB);
    divkit::HostBuffer b = std::move(a);
    EXPECT_EQ(a.data(), nullptr);
    EXPECT_EQ(b.data(), p);
    EXPECT_EQ(divkit::host_cache_stats().cached_blocks, 0);
  }
  EXPECT_EQ(divkit::host_cache_stats().cached_blocks, 1);
  divkit::HostBuffer c(5 * kMiB);
  EXPECT_EQ(c.data(), p);
}

// Threads acquire blocks of a few sizes, check that no other thread writes into a block they
// hold, and hand half of them to another thread to release (a tensor may be freed anywhere).
TEST(HostCache, ManyThreadsAcquireAndReleaseConcurrently) {
  CacheGuard guard(int64_t{48} << 20);
  const auto before = divkit::host_cache_stats();
  constexpr int kThreads = 8, kIters = 150;
  std::mutex handoff_mu;
  std::vector<void*> handoff;
  std::atomic<int> corrupt{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kIters; ++i) {
        const size_t sizes[] = {kMiB, 5 * kMiB, 6 * kMiB, 9 * kMiB};
        divkit::HostBlock b = divkit::host_cache_acquire(sizes[(t + i) % 4]);
        const uint64_t tag = (uint64_t(t) << 32) | uint64_t(i);
        stamp(b, tag);
        std::this_thread::yield();
        if (!stamped(b, tag)) corrupt.fetch_add(1);
        void* to_release = b.data;
        if (i % 2 == 0) {
          std::lock_guard<std::mutex> lock(handoff_mu);
          handoff.push_back(b.data);
          to_release = handoff.size() > 1 ? handoff.front() : nullptr;
          if (to_release != nullptr) handoff.erase(handoff.begin());
        }
        if (to_release != nullptr && !divkit::host_cache_release(to_release)) corrupt.fetch_add(1);
      }
    });
  }
  for (auto& th : threads) th.join();
  for (void* p : handoff) EXPECT_TRUE(divkit::host_cache_release(p));
  EXPECT_EQ(corrupt.load(), 0);
  const auto s = divkit::host_cache_stats();
  EXPECT_EQ(s.in_use_blocks, before.in_use_blocks);
  EXPECT_EQ(s.hits + s.misses - before.hits - before.misses, kThreads * kIters);
  EXPECT_GT(s.hits, before.hits);
  EXPECT_LE(s.cached_bytes, int64_t{48} << 20);
}

// Runs `child` in a fork child under a watchdog; returns its exit status (-signal if killed).
template <typename F>
int in_fork_child(F child) {
  const pid_t pid = fork();
  if (pid == 0) {
    alarm(60);
    int code = 100;
    try {
      code = child();
    } catch (...) {
      code = 101;
    }
    _exit(code);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
}

// A child does not inherit the free blocks (its cache starts without them) but can read and
// release the blocks in use that it inherited; the parent's cache is unchanged by the child.
TEST(HostCache, ForkChildStartsWithoutTheFreeBlocks) {
  CacheGuard guard(int64_t{64} << 20);
  divkit::HostBlock held = divkit::host_cache_acquire(8 * kMiB);
  stamp(held, 42);
  divkit::HostBlock freed = divkit::host_cache_acquire(6 * kMiB);
  divkit::host_cache_release(freed.data);
  const auto parent = divkit::host_cache_stats();
  ASSERT_EQ(parent.cached_blocks, 1);

  // A thread that keeps acquiring and releasing while the fork happens: the child must not
  // find the cache's lock held.
  std::atomic<bool> stop{false};
  std::thread busy([&] {
    while (!stop.load()) divkit::host_cache_release(divkit::host_cache_acquire(kMiB).data);
  });
  const int status = in_fork_child([&] {
    const auto s = divkit::host_cache_stats();
    if (s.cached_blocks != 0 || s.cached_bytes != 0) return 10;
    if (!stamped(held, 42)) return 11;
    divkit::HostBlock fresh = divkit::host_cache_acquire(6 * kMiB);  // must not be `freed`
    stamp(fresh, 5);
    if (!stamped(held, 42)) return 12;
    if (!divkit::host_cache_release(held.data)) return 13;  // inherited block, now the child's
    divkit::HostBlock again = divkit::host_cache_acquire(8 * kMiB);
    if (again.data != held.data || !stamped(again, 42)) return 14;
    divkit::host_cache_release(again.data);
    divkit::host_cache_release(fresh.data);
    return 0;
  });
  stop = true;
  busy.join();
  EXPECT_EQ(status, 0);
  EXPECT_TRUE(stamped(held, 42));
  divkit::HostBlock again = divkit::host_cache_acquire(6 * kMiB);
  EXPECT_EQ(again.data, freed.data);  // the parent's free block is still its own
  divkit::host_cache_release(again.data);
  divkit::host_cache_release(held.data);
}

}  // namespace
}  // namespace divkit_test
