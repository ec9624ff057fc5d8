// The fused heads' argument side: the checks of heads and gradient outputs, the chunk size, the
// labels, and the rows of gradient outputs. Element access is core/element.h's and the reduction
// rule (token weights, divisor, loss output) core/reduction.h's. Internal to src/fused_linear.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/element.h"
#include "core/reduction.h"
#include "divkit/fused_linear.h"

namespace divkit::fused {

// Row `row` of the matrix `out` = src[0, cols), rounded to out's dtype.
void store_row(const TensorView& out, int64_t row, const float* src, int64_t cols);

// Rows [r0, r0 + rows) of t, as a view.
TensorView row_slice(const TensorView& t, int64_t r0, int64_t rows);

// hidden [N, H], weight [V, H], optional finite bias [V]; n_expected >= 0: N must equal it.
void check_head(const char* fn, const char* prefix, const LinearHead& h, int64_t n_expected);
// Each given gradient output has its input's shape and a float dtype.
void check_grads(const char* fn, const char* prefix, const LinearHead& h, const LinearHeadGrads& g);

// Tokens per chunk: `requested`, or 0 to choose it from V; at most N.
int64_t choose_chunk(int64_t requested, int64_t n, int64_t v);

// Labels as int64 with -1 for ignored tokens; when `need_range`, a label outside [0, v) that is
// not ignore_index is an error naming it.
std::vector<int64_t> read_labels(const char* fn, const TensorView& labels, int64_t n,
                                 int64_t ignore_index, int64_t v, bool need_range);

// Rethrows a row kernel's error with the fused function's name and the global token index.
[[noreturn]] void rethrow_chunk(const char* fn, const Error& e, int64_t r0);

}  // namespace divkit::fused
