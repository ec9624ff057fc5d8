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

}  // namespace divkit::detail
