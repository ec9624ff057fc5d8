// The fused heads' matrix operands as fp32: hidden-state rows per chunk, and a weight read piece
// by piece inside each GEMM (WeightBlocks), with the logits GEMM of a chunk. Internal to
// src/fused_linear.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "divkit/tensor.h"

namespace divkit::fused {

// An fp32 row-major view [rows, cols] with leading dimension ld: the caller's memory when it
// already is fp32 with unit column stride, otherwise an owned converted copy.
struct F32Matrix {
  const float* data = nullptr;
  int64_t ld = 0;
  std::vector<float> owned;
};

// fp32 with unit column stride and non-overlapping rows: usable in place by the GEMMs.
bool is_direct_f32(const TensorView& t);

// Rows [r0, r0 + rows) of t (optionally gathered through row_ids) as fp32: a view of the caller's
// memory when it is fp32 with unit column stride, else a converted copy; checked for NaN and inf
// (the error names `name` and the row).
void to_f32_rows(const char* fn, const char* name, const TensorView& t, int64_t r0, int64_t rows,
                 const std::vector<int64_t>* row_ids, F32Matrix& out);

// Checks rows [0, v) of the matrix t (through row_ids when given) for NaN and inf.
void check_finite_rows(const char* fn, const char* name, const TensorView& t, int64_t v,
                       const std::vector<int64_t>* row_ids, int threads);

// A weight [V, H] (rows optionally gathered through row_ids) read as fp32 pieces: the caller's
// memory when it is fp32 with unit column stride, otherwise converted piece by piece, on every
// use, into a buffer of about 8 MiB per thread. A bf16 weight thus never has a full fp32 copy
// (1 GB at V = 128256, H = 2048). The whole weight is checked for NaN and inf once, at
// construction (unless `check` is false: the caller did it).
class WeightBlocks {
 public:
  WeightBlocks(const char* fn, const char* name, const TensorView& w, int64_t v,
               const std::vector<int64_t>* row_ids, int threads, bool check = true);

  int threads() const { return threads_; }

  // Calls f(j0, rows, data, ld) with rows [j0, j0 + rows) of the weight as fp32, the calls
  // covering [0, V) once, concurrently, each to make single-threaded BLAS calls.
  void for_each_rows(
      const std::function<void(int64_t j0, int64_t rows, const float* data, int64_t ld)>& f);

  // dst[m, H] = g[m, V] @ W (grad_hidden = grad_logits @ weight). The vocabulary is summed in
  // fixed groups of kPiecesPerGroup pieces, added in order (gemm::sum_groups_in_order): the
  // result is the same whatever the thread count, and every GEMM has the full width H (cut into
  // column panels instead, every call would repack g, which measured slower).
  void times_weight(const float* g, int64_t ldg, int64_t m, float* dst, int64_t ldd);

  // Frees the per-thread buffers (they are rebuilt on the next use).
  void release();

 private:
  // Pieces of the vocabulary summed by one thread before its sum is added to grad_hidden: one
  // addition of an [m, H] buffer per 4 pieces (4096 rows at H = 2048). Enough groups that a
  // thread slowed down by other work hands the remaining groups to the others.
  static constexpr int64_t kPiecesPerGroup = 4;

  // Rows [j0, j0 + rows) as fp32: a pointer into the weight when it is used in place, else
  // converted into thread t's buffer (leading dimension H).
  const float* piece(int t, int64_t j0, int64_t rows);

  const TensorView& w_;
  const std::vector<int64_t>* row_ids_;
  int64_t v_, h_;
  int threads_;
  int64_t block_rows_;
  bool direct_ = false;
  std::vector<std::vector<float>> buffers_;  // per thread: a converted piece
};

// logits[rows, v] = h W^T + b, one block of the weight's rows at a time.
void chunk_logits(const F32Matrix& h, int64_t rows, WeightBlocks& w, int64_t v, int64_t hidden,
                  const std::vector<float>& bias, float* out);

// The bias as fp32 (rows gathered through row_ids when given); empty when not given.
std::vector<float> bias_f32(const TensorView& b, const std::vector<int64_t>* row_ids, int64_t v);

}  // namespace divkit::fused
