#include "fused_linear/weight_blocks.h"

#include <algorithm>
#include <string>

#include "core/check.h"
#include "core/gemm.h"
#include "core/gemm_pieces.h"
#include "divkit/runtime.h"
#include "fused_linear/arguments.h"
#include "fused_linear/operand_kernels.h"

namespace divkit::fused {
namespace {

// The conversion job of rows [r0, r0 + rows) of the matrix t, gathered through row_ids when
// given (no destination yet: a check only), on `threads` OpenMP threads (1 inside a parallel
// region: the pieces of a weight).
detail::OperandRowsJob rows_job(const TensorView& t, const std::vector<int64_t>* row_ids,
                                int64_t r0, int64_t rows, int threads) {
  detail::OperandRowsJob job;
  job.src = t.data;
  job.dtype = t.dtype;
  job.ld = t.strides[0];
  job.col_stride = t.shape[1] <= 1 ? 1 : t.strides[1];
  job.row_ids = row_ids ? row_ids->data() : nullptr;
  job.r0 = r0;
  job.rows = rows;
  job.cols = t.shape[1];
  job.num_threads = threads;
  return job;
}

// Runs the job and names `name` and the first row (of t) holding NaN or inf.
void convert_checked(const char* fn, const char* name, const detail::OperandRowsJob& job) {
  const int64_t bad = detail::convert_rows_f32(job);
  if (bad >= 0)
    check::fail(fn, std::string(name) + " contains NaN or inf at row " +
                        std::to_string(job.row_ids ? job.row_ids[job.r0 + bad] : job.r0 + bad));
}

}  // namespace

bool is_direct_f32(const TensorView& t) {
  return t.dtype == DType::f32 && (t.shape[1] <= 1 || t.strides[1] == 1) &&
         t.strides[0] >= t.shape[1];
}

void to_f32_rows(const char* fn, const char* name, const TensorView& t, int64_t r0, int64_t rows,
                 const std::vector<int64_t>* row_ids, F32Matrix& out) {
  detail::OperandRowsJob job = rows_job(t, row_ids, r0, rows, get_num_threads());
  if (row_ids == nullptr && is_direct_f32(t)) {
    out.data = static_cast<const float*>(t.data) + r0 * t.strides[0];
    out.ld = t.strides[0];
  } else {
    out.owned.resize(static_cast<size_t>(rows * job.cols));
    job.dst = out.owned.data();
    job.ld_dst = job.cols;
    out.data = out.owned.data();
    out.ld = job.cols;
  }
  convert_checked(fn, name, job);
}

void check_finite_rows(const char* fn, const char* name, const TensorView& t, int64_t v,
                       const std::vector<int64_t>* row_ids, int threads) {
  convert_checked(fn, name, rows_job(t, row_ids, 0, v, std::max(threads, 1)));  // no destination
}

WeightBlocks::WeightBlocks(const char* fn, const char* name, const TensorView& w, int64_t v,
                           const std::vector<int64_t>* row_ids, int threads, bool check)
    : w_(w), row_ids_(row_ids), v_(v), h_(w.shape[1]), threads_(std::max(threads, 1)),
      block_rows_(gemm::piece_rows(v, w.shape[1])) {
  direct_ = row_ids == nullptr && is_direct_f32(w);
  if (check) check_finite_rows(fn, name, w, v, row_ids, threads_);
  if (!direct_) buffers_.resize(static_cast<size_t>(threads_));
}

void WeightBlocks::for_each_rows(
    const std::function<void(int64_t j0, int64_t rows, const float* data, int64_t ld)>& f) {
  gemm::for_pieces(threads_, (v_ + block_rows_ - 1) / block_rows_, [&](int t, int64_t p) {
    const int64_t j0 = p * block_rows_, rows = std::min(block_rows_, v_ - j0);
    f(j0, rows, piece(t, j0, rows), direct_ ? w_.strides[0] : h_);
  });
}

void WeightBlocks::times_weight(const float* g, int64_t ldg, int64_t m, float* dst, int64_t ldd) {
  const int64_t pieces = (v_ + block_rows_ - 1) / block_rows_;
  const int64_t groups = (pieces + kPiecesPerGroup - 1) / kPiecesPerGroup;
  gemm::sum_groups_in_order(
      threads_, groups, m, h_, dst, ldd, [&](int t, int64_t s, float* acc, int64_t lda) {
        for (int64_t p = s * kPiecesPerGroup; p < std::min(pieces, (s + 1) * kPiecesPerGroup);
             ++p) {
          const int64_t j0 = p * block_rows_, rows = std::min(block_rows_, v_ - j0);
          gemm::ab(m, h_, rows, 1.0f, g + j0, ldg, piece(t, j0, rows), direct_ ? w_.strides[0] : h_,
                   p == s * kPiecesPerGroup ? 0.0f : 1.0f, acc, lda);
        }
      });
}

void WeightBlocks::release() {
  std::vector<std::vector<float>>().swap(buffers_);
  buffers_.resize(static_cast<size_t>(direct_ ? 0 : threads_));
}

const float* WeightBlocks::piece(int t, int64_t j0, int64_t rows) {
  if (direct_) return static_cast<const float*>(w_.data) + j0 * w_.strides[0];
  std::vector<float>& buffer = buffers_[t];
  buffer.resize(static_cast<size_t>(block_rows_ * h_));
  detail::OperandRowsJob job = rows_job(w_, row_ids_, j0, rows, 1);
  job.dst = buffer.data();
  job.ld_dst = h_;
  job.check = false;  // checked once, at construction
  detail::convert_rows_f32(job);
  return buffer.data();
}

void chunk_logits(const F32Matrix& h, int64_t rows, WeightBlocks& w, int64_t v, int64_t hidden,
                  const std::vector<float>& bias, float* out) {
  w.for_each_rows([&](int64_t j0, int64_t nb, const float* wb, int64_t ldw) {
    gemm::abt(rows, nb, hidden, 1.0f, h.data, h.ld, wb, ldw, 0.0f, out + j0, v);
  });
  if (!bias.empty())
    for (int64_t r = 0; r < rows; ++r) {
      float* row = out + r * v;
      for (int64_t j = 0; j < v; ++j) row[j] += bias[j];
    }
}

std::vector<float> bias_f32(const TensorView& b, const std::vector<int64_t>* row_ids, int64_t v) {
  std::vector<float> out;
  if (!b.defined()) return out;
  out.resize(static_cast<size_t>(v));
  for (int64_t j = 0; j < v; ++j)
    out[j] = elem::load_f32(b.data, b.dtype, (row_ids ? (*row_ids)[j] : j) * b.strides[0]);
  return out;
}

}  // namespace divkit::fused
