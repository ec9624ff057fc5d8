// The validated work of compare_rows (include/divkit/compare.h), handed from compare.cc's checks
// to the SIMD row kernel in compare_kernels.cc.
#pragma once

#include <cstdint>

#include "divkit/compare.h"
#include "divkit/tensor.h"

namespace divkit::detail {

// One side's rows: a float view, or llama.cpp's quantized log-prob rows.
struct CompareSide {
  TensorView view;              // when q == nullptr
  const uint16_t* q = nullptr;  // llama.cpp rows (LlamaCppRows::data)
  int64_t q_stride = 0;         // uint16 elements between rows
  bool logprobs = false;        // used as log-probs (not normalized), floored at `floor`
  double floor = 0.0;
};

struct CompareJob {
  CompareSide base, test;
  int64_t n = 0, v = 0;
  TensorView tokens;  // optional
  CompareOutputs out;
  int num_threads = 1;
  // Set by the kernel: the first row (-1: none) holding NaN / +inf, or no finite value, per side.
  int64_t bad_row[2] = {-1, -1};
  bool bad_is_empty[2] = {false, false};  // the bad row has no finite value (every entry -inf)
};

void run_compare_rows(CompareJob& job);

}  // namespace divkit::detail
