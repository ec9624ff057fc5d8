// The fused heads' argument side: element access of any float dtype, the checks of heads and
// gradient outputs, the chunk size, the reduction divisor and the reading of labels and per-token
// weights. Internal to src/fused_linear.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "divkit/fused_linear.h"

namespace divkit::fused {

float load_float(const void* base, DType dt, int64_t idx);
void store_float(void* base, DType dt, int64_t idx, double x);
// Row `row` of the matrix `out` = src[0, cols), rounded to out's dtype.
void store_row(const TensorView& out, int64_t row, const float* src, int64_t cols);
int64_t load_index(const TensorView& t, int64_t i);
// Element i of a vector (any float dtype).
void store_vector(const TensorView& t, int64_t i, double x);

// Rows [r0, r0 + rows) of t, as a view.
TensorView row_slice(const TensorView& t, int64_t r0, int64_t rows);

// hidden [N, H], weight [V, H], optional finite bias [V]; n_expected >= 0: N must equal it.
void check_head(const char* fn, const char* prefix, const LinearHead& h, int64_t n_expected);
// Each given gradient output has its input's shape and a float dtype.
void check_grads(const char* fn, const char* prefix, const LinearHead& h, const LinearHeadGrads& g);

// Tokens per chunk: `requested`, or 0 to choose it from V; at most N.
int64_t choose_chunk(int64_t requested, int64_t n, int64_t v);
// The divisor of the summed loss.
double reduction_divisor(const char* fn, Reduction red, double num_items, int64_t count, int64_t n);
void check_loss_output(const char* fn, const TensorView& loss, Reduction red, int64_t n);

// Labels as int64 with -1 for ignored tokens; when `need_range`, a label outside [0, v) that is
// not ignore_index is an error naming it.
std::vector<int64_t> read_labels(const char* fn, const TensorView& labels, int64_t n,
                                 int64_t ignore_index, int64_t v, bool need_range);
// Per-token weights (fp32/fp64 [n], finite), 1 when not given.
std::vector<double> read_token_weights(const char* fn, const TensorView& weights, int64_t n);

// Rethrows a row kernel's error with the fused function's name and the global token index.
[[noreturn]] void rethrow_chunk(const char* fn, const Error& e, int64_t r0);

}  // namespace divkit::fused
