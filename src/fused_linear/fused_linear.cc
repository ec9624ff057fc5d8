// Fused linear-head losses: the chunk loop (GEMM -> row kernels -> GEMMs), argument checks,
// operand conversion and reductions. The row kernels are divergence() (divergence.h) for the
// distillation loss and label_kernels.cc for the label losses.
#include "divkit/fused_linear.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <limits>
#include <string>
#include <vector>

#include <omp.h>

#include "core/check.h"
#include "core/dtype.h"
#include "core/gemm.h"
#include "divkit/runtime.h"
#include "divkit/sparse.h"
#include "fused_linear/label_kernels.h"
#include "fused_linear/operand_kernels.h"

namespace divkit {
namespace {

using check::fail;

// ---- element access of any float dtype ----------------------------------------------------

float load_float(const void* base, DType dt, int64_t idx) {
  switch (dt) {
    case DType::f32: return static_cast<const float*>(base)[idx];
    case DType::f64: return static_cast<float>(static_cast<const double*>(base)[idx]);
    case DType::bf16: return dtype::bf16_to_f32(static_cast<const uint16_t*>(base)[idx]);
    case DType::f16: return dtype::f16_to_f32(static_cast<const uint16_t*>(base)[idx]);
    default: return 0.0f;
  }
}

void store_float(void* base, DType dt, int64_t idx, double x) {
  switch (dt) {
    case DType::f32: static_cast<float*>(base)[idx] = static_cast<float>(x); break;
    case DType::f64: static_cast<double*>(base)[idx] = x; break;
    case DType::bf16: static_cast<uint16_t*>(base)[idx] = dtype::f32_to_bf16(static_cast<float>(x)); break;
    case DType::f16: static_cast<uint16_t*>(base)[idx] = dtype::f32_to_f16(static_cast<float>(x)); break;
    default: break;
  }
}

// Row `row` of the matrix `out` = src[0, cols), rounded to out's dtype; the dtype switch is per
// row so that the loops vectorize (a bf16 weight gradient is 262M elements at 128256 x 2048).
void store_row(const TensorView& out, int64_t row, const float* src, int64_t cols) {
  const int64_t off = row * out.strides[0], cs = cols <= 1 ? 1 : out.strides[1];
  if (cs != 1) {
    for (int64_t j = 0; j < cols; ++j) store_float(out.data, out.dtype, off + j * cs, src[j]);
    return;
  }
  switch (out.dtype) {
    case DType::f32: std::memcpy(static_cast<float*>(out.data) + off, src, cols * sizeof(float)); break;
    case DType::f64: {
      double* d = static_cast<double*>(out.data) + off;
      for (int64_t j = 0; j < cols; ++j) d[j] = src[j];
      break;
    }
    case DType::bf16: {
      uint16_t* d = static_cast<uint16_t*>(out.data) + off;
      for (int64_t j = 0; j < cols; ++j) d[j] = dtype::f32_to_bf16(src[j]);
      break;
    }
    case DType::f16: {
      uint16_t* d = static_cast<uint16_t*>(out.data) + off;
      for (int64_t j = 0; j < cols; ++j) d[j] = dtype::f32_to_f16(src[j]);
      break;
    }
    default: break;
  }
}

int64_t load_index(const TensorView& t, int64_t i) {
  const int64_t off = i * t.strides[0];
  return t.dtype == DType::i64 ? static_cast<const int64_t*>(t.data)[off]
                               : static_cast<const int32_t*>(t.data)[off];
}

// ---- operands ------------------------------------------------------------------------------

// An fp32 row-major view [rows, cols] with leading dimension ld: the caller's memory when it
// already is fp32 with unit column stride, otherwise an owned converted copy.
struct F32Matrix {
  const float* data = nullptr;
  int64_t ld = 0;
  std::vector<float> owned;
};

bool is_direct_f32(const TensorView& t) {
  return t.dtype == DType::f32 && (t.shape[1] <= 1 || t.strides[1] == 1) && t.strides[0] >= t.shape[1];
}

// The conversion job of rows [r0, r0 + rows) of the matrix t, gathered through row_ids when
// given (no destination yet: a check only), on `threads` OpenMP threads (1 inside a parallel
// region: the pieces of a weight).
detail::OperandRowsJob rows_job(const TensorView& t, const std::vector<int64_t>* row_ids, int64_t r0,
                                int64_t rows, int threads) {
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
    fail(fn, std::string(name) + " contains NaN or inf at row " +
                 std::to_string(job.row_ids ? job.row_ids[job.r0 + bad] : job.r0 + bad));
}

// Rows [r0, r0 + rows) of t (optionally gathered through row_ids) as fp32: a view of the caller's
// memory when it is fp32 with unit column stride, else a converted copy; checked for NaN and inf.
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

// ---- GEMMs split between threads -------------------------------------------------------------
//
// Every GEMM of the chunk loop is cut into pieces whose shapes depend on V and H only, never on
// the thread count; each piece is one single-threaded BLAS call, and the OpenMP threads share the
// pieces out. Two reasons: the results do not depend on the thread count (a multi-threaded BLAS
// call does not promise that, nor do calls of other shapes: the same GEMM cut by columns in two
// gives other low bits), and a 16-bit weight is converted by each thread for its own pieces, so
// one thread's conversion (memory-bound) overlaps another's GEMM. Converting on one thread between
// multi-threaded GEMMs left the other cores idle, 0.2 s per pass over a 128256 x 2048 bf16 weight
// on 2 cores (a pass's GEMM being 2.5 s at 512 tokens); an OpenMP conversion between them made
// the GEMMs 1.5-2x slower (OpenMP's workers spin-wait beside OpenBLAS's).

// Rows of the weight per piece: about 8 MiB of fp32 (1024 rows at H = 2048), at least 64.
int64_t piece_rows(int64_t v, int64_t h) {
  constexpr int64_t kPieceFloats = int64_t{2} << 20;
  return std::min(std::max<int64_t>(kPieceFloats / std::max<int64_t>(h, 1), 64), std::max<int64_t>(v, 1));
}

// Runs body(t, p) for every piece p in [0, count) on up to `threads` OpenMP threads, thread t
// taking the contiguous range [t * count / T, (t + 1) * count / T) in order, with the BLAS
// single-threaded; an exception in a thread is rethrown here, once all have stopped.
template <class Body>
void for_pieces(int threads, int64_t count, Body&& body) {
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, count)));
  gemm::set_blas_threads(1);
  std::string error;
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const int t = omp_get_thread_num();
    try {
      for (int64_t p = t * count / nt; p < (t + 1) * count / nt; ++p) body(t, p);
    } catch (const std::exception& e) {
#pragma omp critical
      if (error.empty()) error = e.what();
    }
  }
  if (!error.empty()) throw Error(error);
}

// A weight [V, H] (rows optionally gathered through row_ids) read as fp32 pieces: the caller's
// memory when it is fp32 with unit column stride, otherwise converted piece by piece, on every
// use, into a buffer of about 8 MiB per thread. A bf16 weight thus never has a full fp32 copy
// (1 GB at V = 128256, H = 2048). The whole weight is checked for NaN and inf once, at
// construction.
class WeightBlocks {
 public:
  WeightBlocks(const char* fn, const char* name, const TensorView& w, int64_t v,
               const std::vector<int64_t>* row_ids, int threads)
      : w_(w), row_ids_(row_ids), v_(v), h_(w.shape[1]), threads_(std::max(threads, 1)),
        block_rows_(piece_rows(v, w.shape[1])) {
    direct_ = row_ids == nullptr && is_direct_f32(w);
    convert_checked(fn, name, rows_job(w, row_ids, 0, v, threads_));  // no destination: the check only
    if (!direct_) buffers_.resize(static_cast<size_t>(threads_));
  }

  int threads() const { return threads_; }

  // Calls f(j0, rows, data, ld) with rows [j0, j0 + rows) of the weight as fp32, the calls
  // covering [0, V) once, concurrently, each to make single-threaded BLAS calls.
  template <class F>
  void for_each_rows(F&& f) {
    for_pieces(threads_, (v_ + block_rows_ - 1) / block_rows_, [&](int t, int64_t p) {
      const int64_t j0 = p * block_rows_, rows = std::min(block_rows_, v_ - j0);
      f(j0, rows, piece(t, j0, rows), direct_ ? w_.strides[0] : h_);
    });
  }

  // dst[m, H] = g[m, V] @ W (grad_hidden = grad_logits @ weight). The vocabulary is summed in
  // fixed groups of kPiecesPerGroup pieces: each group's product is taken by one thread into its
  // own [m, H] buffer (the first group straight into dst), and the groups are added into dst in
  // order; so the result is the same whatever the thread count, and every GEMM has the full
  // width H (cut into column panels instead, every call would repack g; that measured slower).
  void times_weight(const float* g, int64_t ldg, int64_t m, float* dst, int64_t ldd) {
    const int64_t pieces = (v_ + block_rows_ - 1) / block_rows_;
    const int64_t groups = (pieces + kPiecesPerGroup - 1) / kPiecesPerGroup;
    const int nt = static_cast<int>(std::min<int64_t>(threads_, groups));
    partials_.resize(static_cast<size_t>(nt));
    gemm::set_blas_threads(1);
    std::string error;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
      const int t = omp_get_thread_num();
#pragma omp for ordered schedule(static, 1)
      for (int64_t s = 0; s < groups; ++s) {
        float* acc = dst;
        int64_t lda = ldd;
        bool ok = true;
        try {
          if (s > 0) {
            partials_[t].resize(static_cast<size_t>(m * h_));
            acc = partials_[t].data();
            lda = h_;
          }
          for (int64_t p = s * kPiecesPerGroup; p < std::min(pieces, (s + 1) * kPiecesPerGroup); ++p) {
            const int64_t j0 = p * block_rows_, rows = std::min(block_rows_, v_ - j0);
            gemm::ab(m, h_, rows, 1.0f, g + j0, ldg, piece(t, j0, rows), direct_ ? w_.strides[0] : h_,
                     p == s * kPiecesPerGroup ? 0.0f : 1.0f, acc, lda);
          }
        } catch (const std::exception& e) {
          ok = false;
#pragma omp critical
          if (error.empty()) error = e.what();
        }
#pragma omp ordered
        if (s > 0 && ok)
          for (int64_t r = 0; r < m; ++r) {
            float* d = dst + r * ldd;
            const float* a = acc + r * lda;
            for (int64_t j = 0; j < h_; ++j) d[j] += a[j];
          }
      }
    }
    if (!error.empty()) throw Error(error);
  }

  // Frees the per-thread buffers (they are rebuilt on the next use).
  void release() {
    std::vector<std::vector<float>>().swap(buffers_);
    buffers_.resize(static_cast<size_t>(direct_ ? 0 : threads_));
    std::vector<std::vector<float>>().swap(partials_);
  }

 private:
  // Pieces of the vocabulary summed by one thread before its sum is added to grad_hidden: one
  // addition of an [m, H] buffer per 8 pieces (8192 rows at H = 2048).
  static constexpr int64_t kPiecesPerGroup = 8;

  // Rows [j0, j0 + rows) as fp32: a pointer into the weight when it is used in place, else
  // converted into thread t's buffer (leading dimension H).
  const float* piece(int t, int64_t j0, int64_t rows) {
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

  const TensorView& w_;
  const std::vector<int64_t>* row_ids_;
  int64_t v_, h_;
  int threads_;
  int64_t block_rows_;
  bool direct_ = false;
  std::vector<std::vector<float>> buffers_;   // per thread: a converted piece
  std::vector<std::vector<float>> partials_;  // per thread: a group's part of grad_hidden
};

void check_head(const char* fn, const char* prefix, const LinearHead& h, int64_t n_expected) {
  const std::string p(prefix);
  const std::string hn = p + "hidden", wn = p + "weight", bn = p + "bias";
  if (!h.hidden.defined()) fail(fn, hn + " is required");
  if (!h.weight.defined()) fail(fn, wn + " is required");
  check::float_matrix(fn, hn.c_str(), h.hidden);
  check::float_matrix(fn, wn.c_str(), h.weight);
  if (h.hidden.shape[0] > 1 && h.hidden.strides[0] == 0) fail(fn, hn + " must not be a broadcast (row stride 0)");
  if (h.weight.shape[0] > 1 && h.weight.strides[0] == 0) fail(fn, wn + " must not be a broadcast (row stride 0)");
  if (h.hidden.shape[1] != h.weight.shape[1])
    fail(fn, hn + " " + check::shape_string(h.hidden) + " and " + wn + " " +
                 check::shape_string(h.weight) + " disagree on the hidden size H");
  if (h.weight.shape[0] == 0) fail(fn, wn + " has V = 0 rows (an empty vocabulary)");
  if (n_expected >= 0 && h.hidden.shape[0] != n_expected)
    fail(fn, hn + " has " + std::to_string(h.hidden.shape[0]) + " tokens, expected " +
                 std::to_string(n_expected) + " (as student_hidden)");
  if (h.bias.defined()) {
    check::vector_of(fn, bn.c_str(), h.bias, h.weight.shape[0],
                     {DType::f32, DType::f64, DType::bf16, DType::f16});
    for (int64_t j = 0; j < h.weight.shape[0]; ++j)
      if (!std::isfinite(load_float(h.bias.data, h.bias.dtype, j * h.bias.strides[0])))
        fail(fn, bn + " contains NaN or inf at index " + std::to_string(j));
  }
}

void check_grads(const char* fn, const char* prefix, const LinearHead& h, const LinearHeadGrads& g) {
  const std::string p(prefix);
  auto same_shape = [&](const TensorView& out, const TensorView& in, const std::string& name) {
    if (!out.defined()) return;
    if (out.device != Device::cpu) fail(fn, name + " must be on the CPU");
    if (!check::is_float(out.dtype)) fail(fn, name + " must be a float tensor, got " + dtype_name(out.dtype));
    if (out.ndim != in.ndim) fail(fn, name + " must have shape " + check::shape_string(in) + ", got " + check::shape_string(out));
    for (int d = 0; d < in.ndim; ++d)
      if (out.shape[d] != in.shape[d])
        fail(fn, name + " must have shape " + check::shape_string(in) + ", got " + check::shape_string(out));
    if (out.numel() > 0 && out.data == nullptr) fail(fn, name + " has a null data pointer");
    if (out.ndim == 2) check::float_matrix(fn, name.c_str(), out, /*is_output=*/true);
  };
  same_shape(g.hidden, h.hidden, "grad_" + p + "hidden");
  same_shape(g.weight, h.weight, "grad_" + p + "weight");
  if (g.bias.defined() && !h.bias.defined()) fail(fn, "grad_" + p + "bias is given but " + p + "bias is not");
  same_shape(g.bias, h.bias, "grad_" + p + "bias");
}

int64_t choose_chunk(int64_t requested, int64_t n, int64_t v) {
  if (requested < 0) throw Error("fused linear: chunk_size must be >= 0 (0 chooses it), got " + std::to_string(requested));
  int64_t c = requested;
  if (c == 0) {
    // About 256 MiB of fp32 logits per buffer, at most 1024 tokens. The weight gradient is
    // accumulated over the chunks with a GEMM of depth C that reads and writes all of dW (V x H):
    // small chunks make that traffic dominate (at V = 128256, H = 2048, N = 4096: 87-92 s at
    // C = 130, 68 s at C = 523, the GEMM floor 70 s); beyond ~1024 tokens nothing is gained
    // (V = 32000: 31 s at C = 1024, 34 s at 524 and at 2048).
    constexpr int64_t kTargetFloats = int64_t{64} << 20;
    c = std::clamp<int64_t>(kTargetFloats / std::max<int64_t>(v, 1), 32, 1024);
  }
  return std::max<int64_t>(1, std::min(c, std::max<int64_t>(n, 1)));
}

// Reduction bookkeeping shared by the losses: the divisor of the summed loss.
double reduction_divisor(const char* fn, Reduction red, double num_items, int64_t count, int64_t n) {
  if (std::isnan(num_items) || num_items < 0.0 || std::isinf(num_items))
    fail(fn, "num_items_in_batch must be finite and > 0, got " + std::to_string(num_items));
  if (red != Reduction::none && red != Reduction::sum && red != Reduction::mean && red != Reduction::batchmean)
    fail(fn, "reduction code " + std::to_string(static_cast<int>(red)) + " is unknown");
  if (num_items > 0.0) {
    if (red == Reduction::none)
      fail(fn, "num_items_in_batch divides a reduced loss; it cannot be used with reduction 'none'");
    return num_items;
  }
  if (red == Reduction::mean) return count > 0 ? double(count) : 1.0;
  if (red == Reduction::batchmean) return n > 0 ? double(n) : 1.0;
  return 1.0;
}

void check_loss_output(const char* fn, const TensorView& loss, Reduction red, int64_t n) {
  if (!loss.defined()) fail(fn, "loss output is required");
  if (red == Reduction::none) {
    check::vector_of(fn, "loss", loss, n, {DType::f32, DType::f64});
  } else {
    if (loss.dtype != DType::f32 && loss.dtype != DType::f64)
      fail(fn, std::string("loss must be float32 or float64, got ") + dtype_name(loss.dtype));
    if (loss.numel() != 1 || loss.data == nullptr)
      fail(fn, "loss must hold one element for reduction '" + std::string(reduction_name(red)) +
                   "', got shape " + check::shape_string(loss));
  }
}

void store_vector(const TensorView& t, int64_t i, double x) {
  store_float(t.data, t.dtype, i * (t.ndim ? t.strides[0] : 0), x);
}

// Labels as int64 with -1 for ignored tokens; when `need_range`, a label outside [0, v) that is
// not ignore_index is an error naming it.
std::vector<int64_t> read_labels(const char* fn, const TensorView& labels, int64_t n,
                                 int64_t ignore_index, int64_t v, bool need_range) {
  std::vector<int64_t> out(static_cast<size_t>(n), 0);
  if (!labels.defined()) return out;
  check::vector_of(fn, "labels", labels, n, {DType::i64, DType::i32});
  for (int64_t i = 0; i < n; ++i) {
    const int64_t y = load_index(labels, i);
    if (y == ignore_index) {
      out[i] = -1;
    } else if (need_range && (y < 0 || y >= v)) {
      fail(fn, "labels[" + std::to_string(i) + "] = " + std::to_string(y) + " is out of range [0, " +
                   std::to_string(v) + ") and is not ignore_index (" + std::to_string(ignore_index) + ")");
    } else {
      out[i] = need_range ? y : 0;
    }
  }
  return out;
}

// Per-token weights (fp32/fp64 [n], finite), 1 when not given.
std::vector<double> read_token_weights(const char* fn, const TensorView& weights, int64_t n) {
  std::vector<double> w(static_cast<size_t>(n), 1.0);
  if (!weights.defined()) return w;
  check::vector_of(fn, "weights", weights, n, {DType::f32, DType::f64});
  for (int64_t i = 0; i < n; ++i) {
    const int64_t off = i * weights.strides[0];
    w[i] = weights.dtype == DType::f64 ? static_cast<const double*>(weights.data)[off]
                                       : static_cast<const float*>(weights.data)[off];
    if (!std::isfinite(w[i]))
      fail(fn, "weights must be finite, got a non-finite value at index " + std::to_string(i));
  }
  return w;
}

// ---- the gradient side of a head -----------------------------------------------------------

// Accumulates the gradients of one head over the chunks: grad_hidden rows per chunk, grad_weight
// and grad_bias summed over chunks (fp32 GEMM accumulation into the output when it is a
// contiguous fp32 array, else into an owned fp32 buffer converted at the end; bias sums in fp64).
class HeadGradAccumulator {
 public:
  // v: rows of `weight` (the student's vocabulary; row_ids maps them to head.weight's rows).
  HeadGradAccumulator(const LinearHead& head, const LinearHeadGrads& grads, WeightBlocks* weight,
                      int64_t v, const std::vector<int64_t>* row_ids)
      : head_(head), grads_(grads), weight_(weight), row_ids_(row_ids), v_(v) {
    h_ = head.weight.shape[1];
    if (grads.weight.defined()) {
      if (row_ids == nullptr && is_direct_f32(grads.weight)) {
        dw_ = static_cast<float*>(grads.weight.data);
        ldw_ = grads.weight.strides[0];
      } else {
        dw_owned_.assign(static_cast<size_t>(v_ * h_), 0.0f);
        dw_ = dw_owned_.data();
        ldw_ = h_;
      }
    }
    if (grads.bias.defined()) db_.assign(static_cast<size_t>(v_), 0.0);
  }

  bool wanted() const { return grads_.hidden.defined() || grads_.weight.defined() || grads_.bias.defined(); }

  // g: d loss / d logits of rows [r0, r0 + rows) ([rows, v], ld = ldg); h: their hidden rows.
  void add_chunk(const float* g, int64_t ldg, int64_t r0, int64_t rows, const F32Matrix& h,
                 std::vector<float>& scratch) {
    if (grads_.hidden.defined()) {
      const TensorView& out = grads_.hidden;
      const bool direct = is_direct_f32(out);
      float* dst = direct ? static_cast<float*>(out.data) + r0 * out.strides[0] : nullptr;
      const int64_t ldd = direct ? out.strides[0] : h_;
      if (!direct) {
        scratch.resize(static_cast<size_t>(rows * h_));
        dst = scratch.data();
      }
      weight_->times_weight(g, ldg, rows, dst, ldd);
      if (!direct)
        for (int64_t r = 0; r < rows; ++r) store_row(out, r0 + r, scratch.data() + r * h_, h_);
    }
    if (dw_ != nullptr) {
      // grad_weight += g^T h, in pieces of vocabulary rows.
      const int64_t pr = piece_rows(v_, h_);
      for_pieces(weight_->threads(), (v_ + pr - 1) / pr, [&](int, int64_t p) {
        const int64_t j0 = p * pr, nr = std::min(pr, v_ - j0);
        gemm::atb(nr, h_, rows, 1.0f, g + j0, ldg, h.data, h.ld, first_ ? 0.0f : 1.0f, dw_ + j0 * ldw_, ldw_);
      });
    }
    if (!db_.empty()) {
      for (int64_t r = 0; r < rows; ++r) {
        const float* row = g + r * ldg;
        for (int64_t j = 0; j < v_; ++j) db_[j] += row[j];
      }
    }
    first_ = false;
  }

  // Writes grad_weight / grad_bias and, when no chunk was added (no tokens, or a teacher without
  // a soft term), zeros for every output; scatter-adds through row_ids for a mapped vocabulary.
  void finish() {
    const int64_t v_full = head_.weight.shape[0];
    if (first_ && grads_.hidden.defined()) {
      const TensorView& out = grads_.hidden;
      for (int64_t r = 0; r < out.shape[0]; ++r)
        for (int64_t j = 0; j < out.shape[1]; ++j)
          store_float(out.data, out.dtype, r * out.strides[0] + j * out.strides[1], 0.0);
    }
    if (grads_.weight.defined()) {
      const TensorView& out = grads_.weight;
      if (first_ && dw_owned_.empty())  // no chunk ran (N = 0): the output still gets zeros
        for (int64_t r = 0; r < v_; ++r) std::fill(dw_ + r * ldw_, dw_ + r * ldw_ + h_, 0.0f);
      if (!dw_owned_.empty()) {
        if (row_ids_ != nullptr) {
          std::vector<float> full(static_cast<size_t>(v_full * h_), 0.0f);
          for (int64_t r = 0; r < v_; ++r) {
            float* dst = full.data() + (*row_ids_)[r] * h_;
            const float* src = dw_owned_.data() + r * h_;
            for (int64_t j = 0; j < h_; ++j) dst[j] += src[j];
          }
          dw_owned_.swap(full);
        }
        // 262M elements at 128256 x 2048: rows in parallel.
#pragma omp parallel for num_threads(get_num_threads()) schedule(static) if (v_full * h_ >= (int64_t{1} << 20))
        for (int64_t r = 0; r < v_full; ++r) store_row(out, r, dw_owned_.data() + r * h_, h_);
      }
    }
    if (grads_.bias.defined()) {
      std::vector<double> full(static_cast<size_t>(v_full), 0.0);
      for (int64_t r = 0; r < v_; ++r) full[row_ids_ ? (*row_ids_)[r] : r] += db_[r];
      for (int64_t j = 0; j < v_full; ++j) store_vector(grads_.bias, j, full[j]);
    }
  }

 private:
  const LinearHead& head_;
  const LinearHeadGrads& grads_;
  WeightBlocks* weight_;
  const std::vector<int64_t>* row_ids_;
  int64_t v_ = 0, h_ = 0;
  float* dw_ = nullptr;
  int64_t ldw_ = 0;
  std::vector<float> dw_owned_;
  std::vector<double> db_;
  bool first_ = true;
};

// logits[rows, v] = h W^T + b, one block of the weight's rows at a time.
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
    out[j] = load_float(b.data, b.dtype, (row_ids ? (*row_ids)[j] : j) * b.strides[0]);
  return out;
}

// Rethrows a row kernel's error with the fused function's name and the global token index.
[[noreturn]] void rethrow_chunk(const char* fn, const Error& e, int64_t r0) {
  throw Error(std::string(fn) + ": in the chunk of tokens starting at " + std::to_string(r0) +
              " (logits = hidden @ weight^T + bias): " + e.what());
}

}  // namespace

// ---- distillation ---------------------------------------------------------------------------

namespace {

// One chunk's soft (teacher) term, called by distill_chunks: given the student logits of rows
// [r0, r0 + rows) in `ls` ([rows, v]) and the per-row weights soft_weight * w_i / divisor (0 for
// ignored rows), adds each row's weighted soft loss to row_loss and, when grad_out is not null,
// writes the soft term's d loss / d logits there ([rows, v], may alias ls). `teacher` is a
// [chunk, v] buffer for the teacher's logits (empty when distill_chunks was told none is needed).
using SoftTerm = void(int64_t r0, int64_t rows, float* ls, float* grad_out, const double* row_weight,
                      double* row_loss, float* teacher);

// The chunk loop shared by the distillation losses: student GEMM, the soft term, the optional
// hard-label CE (T = 1) and the student's gradient GEMMs. `after_loop` runs once the chunk
// buffers are freed, before the student's gradients are written out: the caller finishes its own
// (teacher) gradients there, so that no fp32 weight gradient shares the peak with the chunks.
template <class Soft, class AfterLoop>
void distill_chunks(const char* fn, const LinearHead& student, int64_t v,
                    const DivergenceOptions& options, const FusedLinearOptions& fused,
                    const TensorView& loss, const LinearHeadGrads& student_grads,
                    bool teacher_buffer, Soft&& soft, AfterLoop&& after_loop) {
  const int64_t n = student.hidden.shape[0], hs = student.weight.shape[1];
  if (!std::isfinite(fused.hard_weight) || !std::isfinite(fused.soft_weight))
    fail(fn, "hard_weight and soft_weight must be finite");
  const bool hard = fused.hard_weight != 0.0f, soft_on = fused.soft_weight != 0.0f;
  if (hard && !options.labels.defined()) fail(fn, "hard_weight != 0 needs labels");
  const std::vector<int64_t> labels =
      read_labels(fn, options.labels, n, options.ignore_index, v, /*need_range=*/hard);
  const std::vector<double> token_weight = read_token_weights(fn, options.weights, n);
  int64_t count = 0;
  for (int64_t y : labels) count += y >= 0;
  const double divisor = reduction_divisor(fn, options.reduction, options.num_items_in_batch, count, n);
  check_loss_output(fn, loss, options.reduction, n);

  const int threads = get_num_threads();
  WeightBlocks ws(fn, "student_weight", student.weight, v, nullptr, threads);
  const std::vector<float> bs = bias_f32(student.bias, nullptr, v);
  HeadGradAccumulator acc_s(student, student_grads, &ws, v, nullptr);
  const bool want_s = acc_s.wanted();

  const int64_t chunk = choose_chunk(fused.chunk_size, n, v);
  std::vector<float> ls(static_cast<size_t>(chunk * v));
  std::vector<float> gsoft;  // the soft term's gradient, when the hard term still needs ls
  if (hard && soft_on && want_s) gsoft.resize(static_cast<size_t>(chunk * v));
  std::vector<float> lt;  // the teacher's logits
  if (teacher_buffer && soft_on) lt.resize(static_cast<size_t>(chunk * v));
  std::vector<double> row_loss(static_cast<size_t>(chunk)), row_weight(static_cast<size_t>(chunk));
  std::vector<double> lse(static_cast<size_t>(chunk)), zy(static_cast<size_t>(chunk));
  std::vector<double> ca(static_cast<size_t>(chunk)), cb(static_cast<size_t>(chunk)),
      cc(static_cast<size_t>(chunk), 0.0);
  std::vector<float> scratch;
  F32Matrix hs_c;
  double total = 0.0;

  for (int64_t r0 = 0; r0 < n; r0 += chunk) {
    const int64_t rows = std::min(chunk, n - r0);
    to_f32_rows(fn, "student_hidden", student.hidden, r0, rows, nullptr, hs_c);
    chunk_logits(hs_c, rows, ws, v, hs, bs, ls.data());
    std::fill(row_loss.begin(), row_loss.end(), 0.0);
    if (soft_on) {
      for (int64_t r = 0; r < rows; ++r)
        row_weight[r] = labels[r0 + r] < 0 ? 0.0 : fused.soft_weight * token_weight[r0 + r] / divisor;
      float* grad_out = want_s ? (gsoft.empty() ? ls.data() : gsoft.data()) : nullptr;
      try {
        soft(r0, rows, ls.data(), grad_out, row_weight.data(), row_loss.data(), lt.data());
      } catch (const Error& e) {
        rethrow_chunk(fn, e, r0);
      }
    }
    if (hard) {
      // Plain CE of the student logits (T = 1): lse - z_y; its gradient hw (p - 1[y]) is
      // written over ls plus the soft term's gradient.
      detail::LabelForwardJob f;
      f.z = ls.data();
      f.ldz = v;
      f.rows = rows;
      f.v = v;
      f.labels = labels.data() + r0;
      f.lse = lse.data();
      f.z_label = zy.data();
      f.num_threads = threads;
      detail::label_rows_forward(f);
      if (f.bad_row >= 0)
        fail(fn, "the student logits of token " + std::to_string(r0 + f.bad_row) + " are NaN, +inf or all -inf");
      for (int64_t r = 0; r < rows; ++r) {
        const double hw = labels[r0 + r] < 0 ? 0.0 : fused.hard_weight * token_weight[r0 + r] / divisor;
        if (labels[r0 + r] >= 0) row_loss[r] += hw * (lse[r] - zy[r]);
        ca[r] = hw;
        cb[r] = -hw;
      }
      if (want_s) {
        detail::LabelGradJob g;
        g.z = ls.data();
        g.ldz = v;
        g.rows = rows;
        g.v = v;
        g.labels = labels.data() + r0;
        g.lse = lse.data();
        g.a = ca.data();
        g.b = cb.data();
        g.c = cc.data();
        g.add = gsoft.empty() ? nullptr : gsoft.data();
        g.ldadd = v;
        g.num_threads = threads;
        detail::label_rows_grad(g);
      }
    } else if (want_s && !soft_on) {
      std::fill(ls.begin(), ls.begin() + rows * v, 0.0f);
    }
    for (int64_t r = 0; r < rows; ++r) {
      if (options.reduction == Reduction::none) store_vector(loss, r0 + r, row_loss[r]);
      else total += row_loss[r];
    }
    if (want_s) acc_s.add_chunk(ls.data(), v, r0, rows, hs_c, scratch);
  }
  if (options.reduction != Reduction::none) store_vector(loss, 0, total);
  for (std::vector<float>* b : {&ls, &gsoft, &lt, &scratch}) std::vector<float>().swap(*b);
  ws.release();
  after_loop();
  acc_s.finish();
}

// Labels as a chunk's view (rows [r0, r0 + rows)).
TensorView row_slice(const TensorView& t, int64_t r0, int64_t rows) {
  TensorView s = t;
  if (!t.defined()) return s;
  s.shape[0] = rows;
  s.data = static_cast<char*>(t.data) + r0 * t.strides[0] * static_cast<int64_t>(dtype_size(t.dtype));
  return s;
}

}  // namespace

void fused_linear_divergence(const LinearHead& student, const LinearHead& teacher,
                             const DivergenceSpec& spec, const DivergenceOptions& options,
                             const FusedLinearOptions& fused, const TensorView& loss,
                             const LinearHeadGrads& student_grads, const LinearHeadGrads& teacher_grads) {
  constexpr const char* fn = "fused_linear_divergence";
  validate_spec(spec);
  check_head(fn, "student_", student, -1);
  const int64_t n = student.hidden.shape[0];
  check_head(fn, "teacher_", teacher, n);
  check_grads(fn, "student_", student, student_grads);
  check_grads(fn, "teacher_", teacher, teacher_grads);
  const int64_t v = student.weight.shape[0], ht = teacher.weight.shape[1];
  const int64_t vt = teacher.weight.shape[0];

  // The teacher's vocabulary as seen by the student.
  std::vector<int64_t> token_ids;
  const bool mapped = fused.teacher_token_ids.defined();
  if (mapped) {
    check::vector_of(fn, "teacher_token_ids", fused.teacher_token_ids, v, {DType::i64, DType::i32});
    token_ids.resize(static_cast<size_t>(v));
    for (int64_t j = 0; j < v; ++j) {
      token_ids[j] = load_index(fused.teacher_token_ids, j);
      if (token_ids[j] < 0 || token_ids[j] >= vt)
        fail(fn, "teacher_token_ids[" + std::to_string(j) + "] = " + std::to_string(token_ids[j]) +
                     " is out of the teacher's vocabulary [0, " + std::to_string(vt) + ")");
    }
  } else if (vt != v) {
    fail(fn, "student_weight has V = " + std::to_string(v) + " rows and teacher_weight " +
                 std::to_string(vt) + ": the vocabularies differ; pass teacher_token_ids (a mapping, "
                 "or 0..V_student-1 to truncate the teacher's)");
  }
  WeightBlocks wt(fn, "teacher_weight", teacher.weight, v, mapped ? &token_ids : nullptr,
                  get_num_threads());
  F32Matrix ht_c;
  const std::vector<float> bt = bias_f32(teacher.bias, mapped ? &token_ids : nullptr, v);
  HeadGradAccumulator acc_t(teacher, teacher_grads, &wt, v, mapped ? &token_ids : nullptr);
  const bool want_t = acc_t.wanted();
  std::vector<float> scratch;

  distill_chunks(fn, student, v, options, fused, loss, student_grads, /*teacher_buffer=*/true,
                 [&](int64_t r0, int64_t rows, float* ls, float* grad_out, const double* row_weight,
                     double* row_loss, float* lt) {
    to_f32_rows(fn, "teacher_hidden", teacher.hidden, r0, rows, nullptr, ht_c);
    chunk_logits(ht_c, rows, wt, v, ht, bt, lt);
    DivergenceOptions o;
    o.reduction = Reduction::none;
    o.weights = TensorView::vector(const_cast<double*>(row_weight), DType::f64, rows);
    o.labels = row_slice(options.labels, r0, rows);
    o.ignore_index = options.ignore_index;
    DivergenceOutputs out;
    out.loss = TensorView::vector(row_loss, DType::f64, rows);
    if (grad_out) out.grad_student = TensorView::matrix(grad_out, DType::f32, rows, v);
    const TensorView ltv = TensorView::matrix(lt, DType::f32, rows, v);
    if (want_t) out.grad_teacher = ltv;
    divergence(TensorView::matrix(ls, DType::f32, rows, v), ltv, spec, o, out);
    if (want_t) acc_t.add_chunk(lt, v, r0, rows, ht_c, scratch);
  }, [&] {
    std::vector<float>().swap(scratch);
    wt.release();
    acc_t.finish();
  });
}

void fused_linear_sparse_divergence(const LinearHead& student, const TensorView& teacher_indices,
                                    const TensorView& teacher_logprobs, const DivergenceSpec& spec,
                                    const SparseOptions& sparse, const DivergenceOptions& options,
                                    const FusedLinearOptions& fused, const TensorView& loss,
                                    const LinearHeadGrads& student_grads) {
  constexpr const char* fn = "fused_linear_sparse_divergence";
  validate_spec(spec);
  check_head(fn, "student_", student, -1);
  check_grads(fn, "student_", student, student_grads);
  if (fused.teacher_token_ids.defined()) fail(fn, "teacher_token_ids is not used with a sparse teacher (its indices are the student's token ids)");
  const int64_t n = student.hidden.shape[0], v = student.weight.shape[0];
  if (!teacher_indices.defined() || !teacher_logprobs.defined())
    fail(fn, "teacher_indices and teacher_logprobs are required");
  if (teacher_indices.ndim != 2 || teacher_indices.shape[0] != n)
    fail(fn, "teacher_indices must be [N = " + std::to_string(n) + ", k], got " + check::shape_string(teacher_indices));
  if (teacher_logprobs.ndim != 2 || teacher_logprobs.shape[0] != n)
    fail(fn, "teacher_logprobs must be [N = " + std::to_string(n) + ", k], got " + check::shape_string(teacher_logprobs));
  // The teacher rows are checked chunk by chunk by sparse_divergence (an error names the chunk's
  // first token and the row within it); the outputs are only complete after the last chunk.
  distill_chunks(fn, student, v, options, fused, loss, student_grads, /*teacher_buffer=*/false,
                 [&](int64_t r0, int64_t rows, float* ls, float* grad_out, const double* row_weight,
                     double* row_loss, float*) {
    DivergenceOptions o;
    o.reduction = Reduction::none;
    o.weights = TensorView::vector(const_cast<double*>(row_weight), DType::f64, rows);
    o.labels = row_slice(options.labels, r0, rows);
    o.ignore_index = options.ignore_index;
    SparseOutputs out;
    out.loss = TensorView::vector(row_loss, DType::f64, rows);
    if (grad_out) out.grad_student = TensorView::matrix(grad_out, DType::f32, rows, v);
    sparse_divergence(TensorView::matrix(ls, DType::f32, rows, v),
                      row_slice(teacher_indices, r0, rows), row_slice(teacher_logprobs, r0, rows),
                      spec, sparse, o, out);
  }, [] {});
}

// ---- label losses -----------------------------------------------------------------------

namespace {

struct LabelRun {
  const char* fn;
  const LinearHead& head;
  std::vector<int64_t> labels;
  float inv_t = 1.0f, softcap = 0.0f;
  int64_t chunk = 0;
};

// The chunk loop of the label losses: logits, forward statistics, then (when `coef` is given)
// the gradient coefficients of each row and the gradient GEMMs.
template <class OnStats, class Coef>
void run_label_head(const LabelRun& run, const LabelStatsOutputs& stats, bool want_entropy,
                    bool want_mean, const LinearHeadGrads& grads, OnStats&& on_stats, Coef&& coef) {
  const LinearHead& head = run.head;
  const int64_t n = head.hidden.shape[0], v = head.weight.shape[0], h = head.weight.shape[1];
  const int threads = get_num_threads();
  WeightBlocks w(run.fn, "weight", head.weight, v, nullptr, threads);
  F32Matrix hc;
  const std::vector<float> b = bias_f32(head.bias, nullptr, v);
  HeadGradAccumulator acc(head, grads, &w, v, nullptr);
  const bool want_grad = acc.wanted();
  const int64_t chunk = choose_chunk(run.chunk, n, v);
  std::vector<float> z(static_cast<size_t>(chunk * v)), scratch;
  std::vector<double> lse(chunk), zy(chunk), mean(chunk), ent(chunk), topk(chunk);
  std::vector<double> ca(chunk), cb(chunk), cc(chunk), ce(chunk);
  for (int64_t r0 = 0; r0 < n; r0 += chunk) {
    const int64_t rows = std::min(chunk, n - r0);
    to_f32_rows(run.fn, "hidden", head.hidden, r0, rows, nullptr, hc);
    chunk_logits(hc, rows, w, v, h, b, z.data());
    detail::LabelForwardJob f;
    f.z = z.data();
    f.ldz = v;
    f.rows = rows;
    f.v = v;
    f.labels = run.labels.data() + r0;
    f.inv_t = run.inv_t;
    f.softcap = run.softcap;
    f.lse = lse.data();
    f.z_label = zy.data();
    f.mean_z = want_mean ? mean.data() : nullptr;
    f.entropy = want_entropy ? ent.data() : nullptr;
    f.topk_mass = stats.topk_mass.defined() ? topk.data() : nullptr;
    f.topk = stats.topk;
    f.num_threads = threads;
    detail::label_rows_forward(f);
    if (f.bad_row >= 0)
      fail(run.fn, "the logits of token " + std::to_string(r0 + f.bad_row) +
                       " (hidden @ weight^T + bias) are NaN, +inf or all -inf");
    for (int64_t r = 0; r < rows; ++r) {
      const bool on = run.labels[r0 + r] >= 0;
      const int64_t i = r0 + r;
      if (stats.logprobs.defined()) store_vector(stats.logprobs, i, on ? zy[r] - lse[r] : 0.0);
      if (stats.entropy.defined()) store_vector(stats.entropy, i, on ? ent[r] : 0.0);
      if (stats.lse.defined()) store_vector(stats.lse, i, on ? lse[r] : 0.0);
      if (stats.topk_mass.defined()) store_vector(stats.topk_mass, i, on ? topk[r] : 0.0);
      if (on) on_stats(i, lse[r], zy[r], mean[r]);
    }
    if (!want_grad) continue;
    for (int64_t r = 0; r < rows; ++r) {
      ca[r] = cb[r] = cc[r] = ce[r] = 0.0;
      if (run.labels[r0 + r] >= 0) coef(r0 + r, lse[r], ca[r], cb[r], cc[r], ce[r]);
    }
    detail::LabelGradJob g;
    g.z = z.data();
    g.ldz = v;
    g.rows = rows;
    g.v = v;
    g.labels = run.labels.data() + r0;
    g.inv_t = run.inv_t;
    g.softcap = run.softcap;
    g.lse = lse.data();
    g.entropy = ent.data();
    g.a = ca.data();
    g.b = cb.data();
    g.c = cc.data();
    g.e = want_entropy ? ce.data() : nullptr;
    g.num_threads = threads;
    detail::label_rows_grad(g);
    acc.add_chunk(z.data(), v, r0, rows, hc, scratch);
  }
  for (std::vector<float>* b : {&z, &scratch}) std::vector<float>().swap(*b);
  w.release();
  acc.finish();
}

void check_stats(const char* fn, const LabelStatsOutputs& stats, int64_t n, int64_t v) {
  for (auto [t, name] : {std::pair{&stats.logprobs, "logprobs"}, std::pair{&stats.entropy, "entropy"},
                         std::pair{&stats.lse, "lse"}, std::pair{&stats.topk_mass, "topk_mass"}})
    if (t->defined()) check::vector_of(fn, name, *t, n, {DType::f32, DType::f64});
  if (stats.topk_mass.defined() && (stats.topk < 1 || stats.topk > v))
    fail(fn, "topk must be in [1, V = " + std::to_string(v) + "], got " + std::to_string(stats.topk));
}

}  // namespace

void fused_linear_cross_entropy(const LinearHead& head, const TensorView& labels,
                                const CrossEntropySpec& spec, const TensorView& loss,
                                const LinearHeadGrads& grads, const LabelStatsOutputs& stats) {
  constexpr const char* fn = "fused_linear_cross_entropy";
  check_head(fn, "", head, -1);
  check_grads(fn, "", head, grads);
  const int64_t n = head.hidden.shape[0], v = head.weight.shape[0];
  if (!labels.defined()) fail(fn, "labels are required");
  const float eps = spec.label_smoothing;
  if (!(eps >= 0.0f && eps < 1.0f)) fail(fn, "label_smoothing must be in [0, 1), got " + std::to_string(eps));
  if (!(spec.z_loss_scale >= 0.0f) || !std::isfinite(spec.z_loss_scale))
    fail(fn, "z_loss_scale must be finite and >= 0, got " + std::to_string(spec.z_loss_scale));
  if (!(spec.softcap >= 0.0f) || !std::isfinite(spec.softcap))
    fail(fn, "softcap must be finite and >= 0 (0 disables it), got " + std::to_string(spec.softcap));
  check_stats(fn, stats, n, v);
  LabelRun run{fn, head, read_labels(fn, labels, n, spec.ignore_index, v, true), 1.0f, spec.softcap,
               spec.chunk_size};
  int64_t count = 0;
  for (int64_t y : run.labels) count += y >= 0;
  const double divisor = reduction_divisor(fn, spec.reduction, spec.num_items_in_batch, count, n);
  check_loss_output(fn, loss, spec.reduction, n);
  const std::vector<double> tw = read_token_weights(fn, spec.weights, n);
  if (spec.reduction == Reduction::none)
    for (int64_t i = 0; i < n; ++i) store_vector(loss, i, 0.0);
  const double zl = spec.z_loss_scale;
  double total = 0.0;
  run_label_head(run, stats, stats.entropy.defined(), eps > 0.0f, grads,
                 [&](int64_t i, double lse, double zy, double mean) {
                   const double l = tw[i] * ((1.0 - eps) * (lse - zy) + eps * (lse - mean) + zl * lse * lse);
                   if (spec.reduction == Reduction::none) store_vector(loss, i, l);
                   else total += l;
                 },
                 [&](int64_t i, double lse, double& a, double& b, double& c, double&) {
                   const double s = tw[i] / divisor;
                   a = s * (1.0 + 2.0 * zl * lse);
                   b = -s * (1.0 - eps);
                   c = -s * eps / static_cast<double>(v);
                 });
  if (spec.reduction != Reduction::none) store_vector(loss, 0, total / divisor);
}

void fused_linear_logprobs(const LinearHead& head, const TensorView& labels, const LogprobsSpec& spec,
                           const LabelStatsOutputs& stats) {
  constexpr const char* fn = "fused_linear_logprobs";
  check_head(fn, "", head, -1);
  const int64_t n = head.hidden.shape[0], v = head.weight.shape[0];
  if (!labels.defined()) fail(fn, "labels are required");
  if (!(spec.temperature > 0.0f) || !std::isfinite(spec.temperature))
    fail(fn, "temperature must be finite and > 0, got " + std::to_string(spec.temperature));
  check_stats(fn, stats, n, v);
  LabelRun run{fn, head, read_labels(fn, labels, n, spec.ignore_index, v, true), 1.0f / spec.temperature,
               0.0f, spec.chunk_size};
  run_label_head(run, stats, stats.entropy.defined(), false, {}, [](int64_t, double, double, double) {},
                 [](int64_t, double, double&, double&, double&, double&) {});
}

void fused_linear_logprobs_backward(const LinearHead& head, const TensorView& labels,
                                    const LogprobsSpec& spec, const TensorView& grad_logprobs,
                                    const TensorView& grad_entropy, const LinearHeadGrads& grads) {
  constexpr const char* fn = "fused_linear_logprobs_backward";
  check_head(fn, "", head, -1);
  check_grads(fn, "", head, grads);
  const int64_t n = head.hidden.shape[0], v = head.weight.shape[0];
  if (!labels.defined()) fail(fn, "labels are required");
  if (!(spec.temperature > 0.0f) || !std::isfinite(spec.temperature))
    fail(fn, "temperature must be finite and > 0, got " + std::to_string(spec.temperature));
  std::vector<double> g(static_cast<size_t>(n), 0.0), e;
  if (grad_logprobs.defined()) {
    check::vector_of(fn, "grad_logprobs", grad_logprobs, n, {DType::f32, DType::f64});
    for (int64_t i = 0; i < n; ++i) g[i] = grad_logprobs.dtype == DType::f64
        ? static_cast<const double*>(grad_logprobs.data)[i * grad_logprobs.strides[0]]
        : load_float(grad_logprobs.data, DType::f32, i * grad_logprobs.strides[0]);
  }
  if (grad_entropy.defined()) {
    check::vector_of(fn, "grad_entropy", grad_entropy, n, {DType::f32, DType::f64});
    e.resize(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) e[i] = grad_entropy.dtype == DType::f64
        ? static_cast<const double*>(grad_entropy.data)[i * grad_entropy.strides[0]]
        : load_float(grad_entropy.data, DType::f32, i * grad_entropy.strides[0]);
  }
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(g[i]) || (!e.empty() && !std::isfinite(e[i])))
      fail(fn, "grad_logprobs and grad_entropy must be finite (index " + std::to_string(i) + ")");
  LabelRun run{fn, head, read_labels(fn, labels, n, spec.ignore_index, v, true), 1.0f / spec.temperature,
               0.0f, spec.chunk_size};
  run_label_head(run, {}, !e.empty(), false, grads, [](int64_t, double, double, double) {},
                 [&](int64_t i, double, double& a, double& b, double& c, double& ee) {
                   a = -g[i];
                   b = g[i];
                   c = 0.0;
                   ee = e.empty() ? 0.0 : -e[i];
                 });
}

}  // namespace divkit
