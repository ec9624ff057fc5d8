// The work description handed from divergence.cc (argument checks, reductions) to the
// SIMD row kernels in divergence_kernels.cc. Everything here is already validated.
#pragma once

#include <cstdint>

#include "divkit/divergence.h"

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

struct RowJob {
  RowInput student, teacher;
  int64_t n = 0, v = 0;
  DivergenceSpec spec;          // validated; jsd/alpha/renyi limits already resolved to a kind
  const uint8_t* active = nullptr;   // [n]: 0 for ignored rows
  const double* grad_scale = nullptr;  // [n]: d(reduced loss)/d(row loss) (weights, divisor)
  double* row_loss = nullptr;   // [n] out: the divergence of each row (0 for ignored rows)
  RowOutput grad_student, grad_teacher;
  bool check_only = false;      // only look for non-finite rows (before an in-place write)
  int num_threads = 1;
  // Out: first row with NaN/+inf (after dividing by T) or with every logit -inf; -1 if none.
  int64_t bad_student_row = -1, bad_teacher_row = -1;
  bool bad_student_all_masked = false, bad_teacher_all_masked = false;
};

// Runs the rows on the best SIMD target (Highway dynamic dispatch).
void run_divergence_rows(RowJob& job);

}  // namespace divkit::detail
