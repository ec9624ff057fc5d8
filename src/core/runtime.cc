#include "divkit/runtime.h"

#include <omp.h>

#include <atomic>

#include "divkit/tensor.h"
#include "hwy/targets.h"

namespace divkit {
namespace {
std::atomic<int> g_num_threads{0};  // 0: OpenMP's default
}

void set_num_threads(int n) {
  if (n < 1) throw Error("set_num_threads: n must be >= 1, got " + std::to_string(n));
  g_num_threads.store(n);
}

int get_num_threads() {
  const int n = g_num_threads.load();
  return n > 0 ? n : omp_get_max_threads();
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
