// Conversion of the fused kernels' matrix operands (hidden states, weights) to fp32, row by row,
// with the finiteness check. bf16 and fp16 widen exactly to fp32, so a GEMM on the converted rows
// equals an fp32 GEMM of the inputs: nothing is rounded to low precision.
#pragma once

#include <cstdint>

#include "divkit/tensor.h"

namespace divkit::detail {

// Rows of a float matrix of any DType: element [r, j] is src[row * ld + j * col_stride] with
// row = row_ids[r0 + r] when row_ids is given, else r0 + r (element strides, not bytes).
struct OperandRowsJob {
  const void* src = nullptr;
  DType dtype = DType::f32;
  int64_t ld = 0, col_stride = 1;
  const int64_t* row_ids = nullptr;
  int64_t r0 = 0, rows = 0, cols = 0;
  float* dst = nullptr;  // [rows, cols], leading dimension ld_dst; null: only check
  int64_t ld_dst = 0;
  bool check = true;  // false: convert only (rows already checked), returns -1
  int num_threads = 1;
};

// Writes the rows as fp32 into dst (when given) and returns the first r in [0, rows) whose row
// holds a NaN or an infinity, or -1. fp64 values beyond the fp32 range count as infinite.
int64_t convert_rows_f32(const OperandRowsJob& job);

}  // namespace divkit::detail
