// Helpers of the tests that run the CUDA kernels on the CPU by the CUDA emulator
// (DIVKIT_CUDA=EMULATE builds only; see src/core/cuda_emulator.h).
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "core/cuda_emulator_control.h"
#include "test_util.h"

namespace divkit_test {

// The view marked as on CUDA device 0 (its memory stays host memory: the emulator's device).
inline TensorView placed(TensorView v, bool cuda) {
  if (cuda && v.defined()) {
    v.device = divkit::Device::cuda;
    v.device_index = 0;
  }
  return v;
}

// Both emulated orders, restored to forward at scope exit: reverse order runs the threads and
// blocks backwards and fills fresh device memory with another garbage byte.
class EmulatorOrder {
 public:
  explicit EmulatorOrder(bool reverse) {
    divkit::cuda_emu::set_reverse_order(reverse);
    divkit::cuda_emu::set_poison_byte(reverse ? 0xa5 : 0xff);
  }
  ~EmulatorOrder() {
    divkit::cuda_emu::set_reverse_order(false);
    divkit::cuda_emu::set_poison_byte(0xff);
  }
  EmulatorOrder(const EmulatorOrder&) = delete;
  EmulatorOrder& operator=(const EmulatorOrder&) = delete;
};

// At most `max_x` blocks per grid (cuda_emulator_control.h: the grid-stride loops then take
// several rows per block), restored at scope exit.
class EmulatorMaxGrid {
 public:
  explicit EmulatorMaxGrid(unsigned max_x) { divkit::cuda_emu::set_max_grid_x(max_x); }
  ~EmulatorMaxGrid() { divkit::cuda_emu::set_max_grid_x(0); }
  EmulatorMaxGrid(const EmulatorMaxGrid&) = delete;
  EmulatorMaxGrid& operator=(const EmulatorMaxGrid&) = delete;
};

// Values of two runs agree within a tolerance relative to the largest magnitude (the CUDA math
// library's exp/log and the CPU's differ by a few ulp, and the sums are taken in other orders);
// NaN where the other is NaN, and infinities equal.
inline void expect_close(const std::vector<double>& got, const std::vector<double>& want,
                         double rtol, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  double scale = 0.0;
  for (double w : want)
    if (std::isfinite(w)) scale = std::max(scale, std::abs(w));
  int64_t bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const bool same_class = std::isnan(got[i]) == std::isnan(want[i]);
    const double err = std::abs(got[i] - want[i]);
    if (!same_class || (std::isfinite(want[i]) && err > rtol * (scale + 1e-30) + 1e-30) ||
        (std::isinf(want[i]) && got[i] != want[i])) {
      if (++bad <= 3)
        ADD_FAILURE() << what << ": [" << i << "] emulated " << got[i] << " cpu " << want[i]
                      << " (scale " << scale << ")";
    }
  }
  EXPECT_EQ(bad, 0) << what;
}

// The same values bit for bit (NaN equal to NaN).
inline void expect_same_values(const std::vector<double>& a, const std::vector<double>& b,
                               const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (size_t i = 0; i < a.size(); ++i)
    EXPECT_TRUE(a[i] == b[i] || (std::isnan(a[i]) && std::isnan(b[i])))
        << what << "[" << i << "]: " << a[i] << " vs " << b[i];
}

}  // namespace divkit_test
