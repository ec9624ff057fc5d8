#include "divkit/runtime.h"

#include <omp.h>
#include <pthread.h>

#include <algorithm>
#include <atomic>

#include "divkit/tensor.h"
#include "hwy/targets.h"

namespace divkit {
namespace {

constexpr int kThreadsPerProcessor = 8;

std::atomic<int> g_num_threads{0};  // 0: OpenMP's default
// Set once a kernel may have run a parallel region of more than one thread (libgomp then has a
// pool of threads that a fork child does not inherit).
std::atomic<bool> g_pool_may_exist{false};
std::atomic<bool> g_fork_child{false};

// pthread_atfork child handler: runs in the child, on the thread that called fork(), before
// fork() returns there. Only async-signal-safe work (two atomic stores).
void after_fork_in_child() {
  if (g_pool_may_exist.load(std::memory_order_relaxed))
    g_fork_child.store(true, std::memory_order_relaxed);
}

// Registered when the library is loaded, before any kernel can run.
[[maybe_unused]] const int g_atfork_registered =
    pthread_atfork(nullptr, nullptr, &after_fork_in_child);

}  // namespace

int max_num_threads() { return kThreadsPerProcessor * std::max(1, omp_get_num_procs()); }

bool forked_single_threaded() { return g_fork_child.load(std::memory_order_relaxed); }

void set_num_threads(int n) {
  const int hi = max_num_threads();
  if (n < 1 || n > hi)
    throw Error("set_num_threads: n must be in [1, " + std::to_string(hi) + "] (" +
                std::to_string(kThreadsPerProcessor) + " x the " +
                std::to_string(omp_get_num_procs()) + " processors), got " + std::to_string(n));
  if (n > 1 && forked_single_threaded())
    throw Error("set_num_threads: n = " + std::to_string(n) +
                " in a process forked after divkit ran threads: OpenMP cannot restart its "
                "thread pool in a fork child, so divkit runs on one thread here (start workers "
                "with the 'spawn' or 'forkserver' method to use threads in them)");
  g_num_threads.store(n);
}

int get_num_threads() {
  if (forked_single_threaded()) return 1;
  const int n = g_num_threads.load();
  const int threads = n > 0 ? n : std::min(omp_get_max_threads(), max_num_threads());
  if (threads > 1 && !g_pool_may_exist.load(std::memory_order_relaxed))
    g_pool_may_exist.store(true, std::memory_order_relaxed);
  return threads;
}

std::vector<std::string> available_simd_targets() {
  std::vector<std::string> names;
  for (int64_t t : hwy::SupportedAndGeneratedTargets()) names.emplace_back(hwy::TargetName(t));
  return names;
}

void force_simd_target(const std::string& name) {
  if (name.empty()) {
    hwy::SetSupportedTargetsForTest(0);  // 0 restores the CPU's own set
    return;
  }
  hwy::SetSupportedTargetsForTest(0);
  for (int64_t t : hwy::SupportedAndGeneratedTargets()) {
    if (name == hwy::TargetName(t)) {
      hwy::SetSupportedTargetsForTest(t);
      return;
    }
  }
  std::string all;
  for (const auto& n : available_simd_targets()) all += (all.empty() ? "" : ", ") + n;
  throw Error("force_simd_target: name '" + name + "' is not available here; available: " + all);
}

std::string active_simd_target() {
  const auto targets = hwy::SupportedAndGeneratedTargets();
  return targets.empty() ? std::string("none") : std::string(hwy::TargetName(targets.front()));
}

std::string version() { return DIVKIT_VERSION; }

}  // namespace divkit
