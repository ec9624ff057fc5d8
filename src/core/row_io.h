// A row-major matrix of any float dtype as the row kernels read and write it (row_io-inl.h).
// The views were validated by the caller: unit column stride, any row stride.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "divkit/tensor.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace divkit::detail {

struct RowInput {
  const void* data;
  DType dtype;
  int64_t row_stride;  // elements
};

struct RowOutput {
  void* data = nullptr;  // null: not requested
  DType dtype = DType::f32;
  int64_t row_stride = 0;
};

inline RowInput row_input(const TensorView& t) { return {t.data, t.dtype, t.strides[0]}; }
// Not requested ({}) when the view is not given.
inline RowOutput row_output(const TensorView& t) {
  return t.defined() ? RowOutput{t.data, t.dtype, t.strides[0]} : RowOutput{};
}

// Whether p points into a block of the host cache (host_cache.cc).
bool in_host_cache(const void* p) noexcept;

// The transparent-huge-page policy, from DIVKIT_HUGE_PAGES (read once):
// - "0": no advice (with the kernel's THP defrag mode "madvise", a fault in an advised region may
//   compact memory first, which can stall on a machine short of free 2 MiB blocks);
// - unset or any other value: advice on the fresh buffers the kernels write (a caller's buffer,
//   torch.empty's), not on the host cache's blocks: a cached block is faulted in once and then
//   reused, and its first write was measured faster with 4 KiB pages where huge pages are
//   scarce, and as fast once reused;
// - "always": the host cache's blocks are advised too (when they are mapped).
enum class HugePages { off, fresh_buffers, always };
inline HugePages huge_pages_mode() {
  static const HugePages mode = [] {
    const char* env = std::getenv("DIVKIT_HUGE_PAGES");
    if (env != nullptr && std::strcmp(env, "0") == 0) return HugePages::off;
    if (env != nullptr && std::strcmp(env, "always") == 0) return HugePages::always;
    return HugePages::fresh_buffers;
  }();
  return mode;
}

// Asks for transparent huge pages (Linux, where the kernel's mode is "madvise") on the whole
// 4 KiB pages inside [p, p + bytes): a fresh output buffer (torch.empty maps untouched pages)
// is then faulted in 2 MiB at a time by the kernel's first write instead of 4 KiB at a time,
// which otherwise costs more than the kernel's arithmetic. Advisory: pages already touched keep
// their size, and a refusal only costs speed. Small buffers are left alone, and so is everything
// the policy above excludes.
inline void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kPage = 4096;
  const HugePages mode = huge_pages_mode();
  if (p == nullptr || bytes < (size_t{4} << 20) || mode == HugePages::off) return;
  if (mode != HugePages::always && in_host_cache(p)) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + kPage - 1) & ~(kPage - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kPage - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)p, (void)bytes;
#endif
}

// The first row (in row order, whatever the thread schedule) at which an input cannot be used.
struct BadRow {
  int64_t row = -1;      // -1: none
  bool no_mass = false;  // every entry -inf (no distribution) rather than a NaN or +inf
};

}  // namespace divkit::detail
