// A row-major matrix of any float dtype as the row kernels read and write it (row_io-inl.h).
// The views were validated by the caller: unit column stride, any row stride.
#pragma once

#include <cstdint>

#include "divkit/tensor.h"

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

// The first row (in row order, whatever the thread schedule) at which an input cannot be used.
struct BadRow {
  int64_t row = -1;      // -1: none
  bool no_mass = false;  // every entry -inf (no distribution) rather than a NaN or +inf
};

}  // namespace divkit::detail
