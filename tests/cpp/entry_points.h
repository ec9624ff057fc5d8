// Every public C++ entry point that takes TensorViews, as a table: its arguments (named as its
// error messages name them) with a small valid shape, dtype and fill each, and a call that passes
// them in. The hardening tests break one argument at a time; the fuzz test draws random
// mutations of them.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "divkit/divkit.h"

namespace divkit_test {

enum class Fill {
  normal,    // N(0, 2^2): logits, points, rewards
  negative,  // uniform in [lo, hi] with hi < 0: log-probabilities
  uniform,   // uniform in [lo, hi]
  constant,  // lo
  column,    // the column index (distinct per row: top-k indices, token-id maps)
  integers,  // integers uniform in [lo, hi]
  zero,      // outputs
};

struct Slot {
  std::string name;
  divkit::DType dtype = divkit::DType::f32;
  std::vector<int64_t> shape;  // empty: not given
  Fill fill = Fill::normal;
  double lo = 0.0, hi = 0.0;
  bool output = false;  // written by the call: scanned for NaN after a successful call
};

struct EntryPoint {
  std::string fn;  // the name every error message of the call starts with
  std::vector<Slot> slots;
  // Calls the entry point with the views in slot order; `option` picks among valid settings
  // (divergence kind, reduction, loss type, ...); option 0 is the baseline's.
  std::function<void(const std::vector<divkit::TensorView>&, uint32_t option)> call;
  bool outputs_without_nan = true;  // false where random inputs may legitimately give NaN
};

const std::vector<EntryPoint>& entry_points();

// Buffers for one entry point's slots: each slot gets its own allocation, `slack` times the
// baseline's elements (plus a margin), filled per the slot's Fill over the whole allocation.
struct EntryBuffers {
  std::vector<std::unique_ptr<uint64_t[]>> mem;
  std::vector<int64_t> bytes;                // size of each allocation
  std::vector<divkit::TensorView> baseline;  // contiguous views at the start of each buffer
  EntryBuffers(const EntryPoint& e, uint64_t seed, int64_t slack = 4);
  void refill(const EntryPoint& e, uint64_t seed);
};

}  // namespace divkit_test
