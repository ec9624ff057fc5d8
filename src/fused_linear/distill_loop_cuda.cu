// The CUDA chunk loop of fused_linear_divergence and fused_linear_sparse_divergence
// (fused_linear.h): per chunk of tokens, the heads' logits by the device GEMM (head_cuda.h), the
// soft term by divkit's CUDA divergence kernel (divergence_cuda.cu: per-token losses, the
// student's and teacher's logit gradients written over the chunks) or sparse kernel
// (sparse_cuda.cu: the teacher's top-k pairs), the optional hard-label cross-entropy (T = 1) by
// the label-row kernel (label_cuda.cu), then each head's gradient GEMMs. The per-token weights of
// both terms are computed on the device before the loop, the loss after it.
//
// Checks: the soft term's (NaN / +inf logits, rows without mass, non-finite weights) are read by
// the divergence kernel after each chunk when options.check_finite is on (one synchronization per
// chunk), with the CPU loop's message; the labels' range and the hard term's logits are device
// flags read once at the end. check_finite = false reads nothing: a bad input gives a NaN loss.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <string>

#include "core/check.h"
#include "core/cuda_common.cuh"
#include "core/cuda_device.h"
#include "core/reduction.h"
#include "divergence/divergence_cuda.h"
#include "fused_linear/arguments.h"
#include "fused_linear/distill_loop_cuda.h"
#include "fused_linear/head_cuda.h"
#include "fused_linear/label_cuda.h"
#include "sparse/sparse_cuda.h"

namespace divkit::detail {
namespace {

using namespace cuda_common;  // NOLINT(build/namespaces): the shared device helpers

constexpr int64_t kMaxBlocks = 4096;

enum Flag : int { kBadLabel, kBadWeight, kNonFinite, kFlags };

unsigned grid_for(int64_t n) {
  return static_cast<unsigned>(
      std::max<int64_t>(1, std::min((n + kThreads - 1) / kThreads, kMaxBlocks)));
}

// The per-token fp64 vectors of the call, [n] each (nullptr: not needed).
struct Rows {
  double* soft_w = nullptr;     // soft_weight w_i / divisor, 0 at ignored tokens
  double* soft_loss = nullptr;  // the soft term's per-token loss (weighted)
  double* hard_w = nullptr;     // hard_weight w_i / divisor, 0 at ignored tokens
  double* minus_hard_w = nullptr;
  double* zero = nullptr;
  double* lse = nullptr;
  double* zy = nullptr;
};

// The labels' range (when the hard term reads them) and the per-token weights of both terms.
__global__ void __launch_bounds__(kThreads)
    weights_kernel(RowReduce r, Rows w, int64_t v, double soft_weight, double hard_weight,
                   bool check_range, unsigned long long* flags) {
  for (int64_t i = blockIdx.x * int64_t{kThreads} + threadIdx.x; i < r.n;
       i += int64_t{gridDim.x} * kThreads) {
    const bool on = row_active(r, i);
    if (check_range && on) {
      const int64_t y = load_index(r.labels, r.labels_dtype, i * r.labels_stride);
      if (y < 0 || y >= v) atomicMin(&flags[kBadLabel], static_cast<unsigned long long>(i));
    }
    const double s = on ? row_weight(r, i) / *r.divisor : 0.0;
    if (w.soft_w != nullptr) w.soft_w[i] = soft_weight * s;
    if (w.hard_w != nullptr) {
      w.hard_w[i] = hard_weight * s;
      w.minus_hard_w[i] = -(hard_weight * s);
      w.zero[i] = 0.0;
    }
  }
}

// z += g over [rows, v] (the soft term's gradient added to the hard term's).
__global__ void __launch_bounds__(kThreads) add_kernel(float* z, const float* g, int64_t count) {
  for (int64_t i = blockIdx.x * int64_t{kThreads} + threadIdx.x; i < count;
       i += int64_t{gridDim.x} * kThreads)
    z[i] += g[i];
}

// The loss: per token (soft loss + hard_w (lse - z_y)), written for reduction none, else summed
// in a fixed order (one block). The hard term's check: a NaN lse at a counted token.
__global__ void __launch_bounds__(kThreads)
    loss_kernel(RowReduce r, Rows w, bool none, void* loss, DType loss_dtype, int64_t loss_stride,
                unsigned long long* flags) {
  __shared__ double sh[kWarps];
  auto put = [&](int64_t i, double x) {
    if (loss_dtype == DType::f64) static_cast<double*>(loss)[i * loss_stride] = x;
    else static_cast<float*>(loss)[i * loss_stride] = static_cast<float>(x);
  };
  double total = 0.0;
  for (int64_t i = threadIdx.x; i < r.n; i += kThreads) {
    const bool on = row_active(r, i);
    double l = w.soft_loss != nullptr ? w.soft_loss[i] : 0.0;
    if (w.hard_w != nullptr && on) {
      if (isnan(w.lse[i])) atomicMin(&flags[kNonFinite], static_cast<unsigned long long>(i));
      l += w.hard_w[i] * (w.lse[i] - w.zy[i]);
    }
    if (none) put(i, l);
    else total += l;
  }
  if (none) return;
  total = block_reduce(total, SumOp{}, sh);
  if (threadIdx.x == 0) put(0, total);
}

// After loss_kernel: without the host's check, a failed check shows as a NaN loss.
__global__ void poison_kernel(const unsigned long long* flags, int64_t count, void* loss,
                              DType loss_dtype, int64_t loss_stride) {
  bool bad = false;
  for (int k = 0; k < kFlags; ++k) bad |= flags[k] != kNone;
  if (!bad) return;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) {
    if (loss_dtype == DType::f64) static_cast<double*>(loss)[i * loss_stride] = nan("");
    else static_cast<float*>(loss)[i * loss_stride] = nanf("");
  }
}

// One chunk's soft term: given the student logits zs [rows, v] of rows [r0, r0 + rows), the
// tokens' weights and per-token loss outputs (fp64 device vectors of the chunk), writes the
// weighted soft losses and, when grad_out is not null, the soft gradient there (may be zs).
using SoftChunk = std::function<void(int64_t r0, int64_t rows, float* zs, float* grad_out,
                                     const TensorView& weights, const TensorView& row_loss)>;

// The checks every distillation head shares (after its own): options, weights of the two
// terms, and what the CUDA loop does not take; returns the reduction's fields (its divisor, flags
// and flag slots are the loop's).
RowReduce check_distill(const char* fn, int64_t n, const DivergenceOptions& options,
                        const FusedLinearOptions& fused, const TensorView& loss) {
  const FusedLabelTerms& terms = fused.terms;
  if (terms.student_logprobs.defined() || terms.teacher_logprobs.defined() ||
      terms.hard_weights.defined() || terms.kept_student.defined() ||
      terms.kept_teacher.defined() || terms.accumulate_weight_grads)
    check::fail(fn,
                "the label terms (log-probs, per-token hard weights, kept logits, accumulated "
                "weight gradients) have no CUDA loop in the core");
  if (!std::isfinite(fused.hard_weight) || !std::isfinite(fused.soft_weight))
    check::fail(fn, "hard_weight and soft_weight must be finite");
  if (fused.hard_weight != 0.0f && !options.labels.defined())
    check::fail(fn, "hard_weight != 0 needs labels");
  RowReduce r;
  fill_row_reduce(fn, n, options, loss, r);  // labels, weights, reduction, the loss output
  return r;
}

// The chunk loop shared by the distillation heads (the caller has set the device): the student's
// logits, `soft` for the soft term, the hard term, the student's gradient GEMMs, the loss and the
// final checks. `after_loop` runs once the student's chunks are done (the teacher head's finish).
void distill_chunks_cuda(const char* fn, const LinearHead& student,
                         const LinearHeadGrads& student_grads, const DivergenceOptions& options,
                         const FusedLinearOptions& fused, const TensorView& loss, int device,
                         RowReduce r, const SoftChunk& soft_chunk,
                         const std::function<void()>& after_loop) {
  const int64_t n = student.hidden.shape[0], v = student.weight.shape[0];
  const auto s = reinterpret_cast<cudaStream_t>(options.stream);
  const bool hard = fused.hard_weight != 0.0f, soft = fused.soft_weight != 0.0f;
  const bool want_s = student_grads.hidden.defined() || student_grads.weight.defined() ||
                      student_grads.bias.defined();
  const int64_t chunk = fused::choose_chunk(fused.chunk_size, n, v);
  // The per-token vectors, the flags and the divisor; the soft gradient beside the student's
  // logits when the hard term still needs them.
  const int64_t vec = (std::max<int64_t>(n, 1) * 8 + 255) / 256 * 256;
  const bool gsoft = soft && hard && want_s;
  const int64_t gsoft_bytes = gsoft ? (chunk * v * 4 + 255) / 256 * 256 : 0;
  fused_cuda::DeviceBuffer ws(fn, 7 * vec + 512 + gsoft_bytes, reinterpret_cast<CUstream_st*>(s));
  char* p = ws.get();
  auto take = [&](bool on) {
    double* q = on ? reinterpret_cast<double*>(p) : nullptr;
    p += vec;
    return q;
  };
  Rows w;
  w.soft_w = take(soft);
  w.soft_loss = take(soft);
  w.hard_w = take(hard);
  w.minus_hard_w = take(hard);
  w.zero = take(hard);
  w.lse = take(hard);
  w.zy = take(hard);
  auto* flags = reinterpret_cast<unsigned long long*>(p);
  auto* divisor = reinterpret_cast<double*>(p + 256);
  float* const g_soft = gsoft ? reinterpret_cast<float*>(p + 512) : nullptr;

  r.divisor = divisor;
  r.bad = flags;
  r.bad_slots = kFlags;
  r.weights_bad_slot = kBadWeight;
  r.check_finite = options.check_finite;
  check_cuda(fn, cudaMemsetAsync(flags, 0xFF, kFlags * sizeof(unsigned long long), s),
             "cudaMemsetAsync");
  launch_prep(fn, r, s);  // the divisor and the weights' check
  if (n > 0) {
    DIVKIT_LAUNCH(weights_kernel, grid_for(n), kThreads, 0, s)
    (r, w, v, fused.soft_weight, fused.hard_weight, hard, flags);
    check_cuda(fn, cudaGetLastError(), "the weights kernel launch");
  }
  if (options.check_finite && options.weights.defined()) {
    // A bad weight raises before the soft term's chunks (as on the CPU, which reads them first).
    unsigned long long bad_w = kNone;
    check_cuda(
        fn, cudaMemcpyAsync(&bad_w, flags + kBadWeight, sizeof(bad_w), cudaMemcpyDeviceToHost, s),
        "cudaMemcpyAsync");
    check_cuda(fn, cudaStreamSynchronize(s), "cudaStreamSynchronize");
    if (bad_w != kNone) fail_bad_weight(fn, r, bad_w);
  }

  {
    fused_cuda::DeviceHead hs(fn, student, student_grads, chunk, reinterpret_cast<CUstream_st*>(s));
    for (int64_t r0 = 0; r0 < n; r0 += chunk) {
      const int64_t rows = std::min(chunk, n - r0);
      float* zs = hs.logits(r0, rows);
      if (soft) {
        try {
          soft_chunk(r0, rows, zs, want_s ? (gsoft ? g_soft : zs) : nullptr,
                     fused_cuda::device_vector(w.soft_w, r0, rows, device),
                     fused_cuda::device_vector(w.soft_loss, r0, rows, device));
        } catch (const Error& e) {
          fused::rethrow_chunk(fn, e, r0);
        }
      }
      if (hard) {
        LabelRowsArgs a;
        a.logits = fused_cuda::device_matrix(zs, rows, v, device);
        a.labels = fused::row_slice(options.labels, r0, rows);
        a.ignore_index = options.ignore_index;
        a.lse = fused_cuda::device_vector(w.lse, r0, rows, device);
        a.z_label = fused_cuda::device_vector(w.zy, r0, rows, device);
        if (want_s) {
          a.coef_a0 = fused_cuda::device_vector(w.hard_w, r0, rows, device);
          a.coef_b = fused_cuda::device_vector(w.minus_hard_w, r0, rows, device);
          a.coef_c = fused_cuda::device_vector(w.zero, r0, rows, device);
        }
        a.first_token = r0;
        a.stream = options.stream;
        a.check_finite = false;  // the flags are read at the end
        label_rows_cuda(fn, a, device);
        if (gsoft) {
          DIVKIT_LAUNCH(add_kernel, grid_for(rows * v), kThreads, 0, s)(zs, g_soft, rows * v);
          check_cuda(fn, cudaGetLastError(), "the add kernel launch");
        }
      } else if (!soft && want_s) {
        check_cuda(fn, cudaMemsetAsync(zs, 0, static_cast<size_t>(rows * v) * sizeof(float), s),
                   "cudaMemsetAsync");
      }
      hs.add_grad_chunk(r0, rows);
    }
    after_loop();
    hs.finish();
  }
  const bool none = options.reduction == Reduction::none;
  DIVKIT_LAUNCH(loss_kernel, 1, kThreads, 0, s)
  (r, w, none, loss.data, loss.dtype, loss.ndim ? loss.strides[0] : 0, flags);
  check_cuda(fn, cudaGetLastError(), "the loss kernel launch");
  if (!options.check_finite) {
    DIVKIT_LAUNCH(poison_kernel, 1, kThreads, 0, s)
    (flags, none ? n : 1, loss.data, loss.dtype, loss.ndim ? loss.strides[0] : 0);
    check_cuda(fn, cudaGetLastError(), "the poison kernel launch");
    return;
  }
  unsigned long long bad[kFlags];
  check_cuda(fn, cudaMemcpyAsync(bad, flags, sizeof(bad), cudaMemcpyDeviceToHost, s),
             "cudaMemcpyAsync");
  check_cuda(fn, cudaStreamSynchronize(s), "cudaStreamSynchronize");
  if (bad[kBadLabel] != kNone)
    fused_cuda::fail_bad_label(fn, options.labels, static_cast<int64_t>(bad[kBadLabel]), v,
                               options.ignore_index);
  if (bad[kNonFinite] != kNone)
    check::fail(fn, "the student logits of token " + std::to_string(bad[kNonFinite]) +
                        " are NaN, +inf or all -inf");
}

DivergenceOptions chunk_options(const DivergenceOptions& options, int64_t r0, int64_t rows,
                                const TensorView& weights) {
  DivergenceOptions o;
  o.reduction = Reduction::none;
  o.weights = weights;
  o.labels = fused::row_slice(options.labels, r0, rows);
  o.ignore_index = options.ignore_index;
  o.stream = options.stream;
  o.check_finite = options.check_finite;
  return o;
}

}  // namespace

void distill_head_cuda(const LinearHead& student, const LinearHead& teacher,
                       const DivergenceSpec& spec, const DivergenceOptions& options,
                       const FusedLinearOptions& fused, const TensorView& loss,
                       const LinearHeadGrads& student_grads, const LinearHeadGrads& teacher_grads,
                       int device) {
  constexpr const char* fn = "fused_linear_divergence";
  check::divergence_spec(fn, spec);
  fused_cuda::check_head(fn, student, student_grads, "student_");
  fused_cuda::check_head(fn, teacher, teacher_grads, "teacher_");
  const int64_t n = student.hidden.shape[0], v = student.weight.shape[0];
  if (teacher.hidden.shape[0] != n)
    check::fail(fn, "teacher_hidden has " + std::to_string(teacher.hidden.shape[0]) +
                        " tokens, expected " + std::to_string(n) + " (as student_hidden)");
  if (fused.teacher_token_ids.defined())
    check::fail(fn, "teacher_token_ids has no CUDA loop in the core");
  if (teacher.weight.shape[0] != v)
    check::fail(fn, "student_weight has V = " + std::to_string(v) + " rows and teacher_weight " +
                        std::to_string(teacher.weight.shape[0]) +
                        ": the vocabularies differ (teacher_token_ids has no CUDA loop in the "
                        "core)");
  const RowReduce r = check_distill(fn, n, options, fused, loss);
  DeviceGuard guard(fn, device);
  const bool want_t =
      fused.soft_weight != 0.0f && (teacher_grads.hidden.defined() ||
                                    teacher_grads.weight.defined() || teacher_grads.bias.defined());
  // Without the soft term the teacher's gradients are zeros (finish() with no chunk added), and
  // its logits are never computed: a one-row buffer then, not a chunk's.
  const int64_t teacher_chunk =
      fused.soft_weight != 0.0f ? fused::choose_chunk(fused.chunk_size, n, v) : 1;
  fused_cuda::DeviceHead ht(fn, teacher, teacher_grads, teacher_chunk,
                            reinterpret_cast<CUstream_st*>(options.stream));
  distill_chunks_cuda(
      fn, student, student_grads, options, fused, loss, device, r,
      [&](int64_t r0, int64_t rows, float* zs, float* grad_out, const TensorView& weights,
          const TensorView& row_loss) {
        float* zt = ht.logits(r0, rows);
        DivergenceOutputs out;
        out.loss = row_loss;
        if (grad_out != nullptr)
          out.grad_student = fused_cuda::device_matrix(grad_out, rows, v, device);
        if (want_t) out.grad_teacher = fused_cuda::device_matrix(zt, rows, v, device);
        divergence_cuda(fused_cuda::device_matrix(zs, rows, v, device),
                        fused_cuda::device_matrix(zt, rows, v, device), spec,
                        chunk_options(options, r0, rows, weights), out,
                        /*scratch_inputs=*/true);
        if (want_t) ht.add_grad_chunk(r0, rows);
      },
      [&] { ht.finish(); });
}

void sparse_distill_head_cuda(const LinearHead& student, const TensorView& teacher_indices,
                              const TensorView& teacher_logprobs, const DivergenceSpec& spec,
                              const SparseOptions& sparse, const DivergenceOptions& options,
                              const FusedLinearOptions& fused, const TensorView& loss,
                              const LinearHeadGrads& student_grads, int device) {
  constexpr const char* fn = "fused_linear_sparse_divergence";
  check::divergence_spec(fn, spec);
  fused_cuda::check_head(fn, student, student_grads, "student_");
  const int64_t n = student.hidden.shape[0], v = student.weight.shape[0];
  if (fused.teacher_token_ids.defined())
    check::fail(fn,
                "teacher_token_ids is not used with a sparse teacher (its indices are the "
                "student's token ids)");
  if (!teacher_indices.defined() || !teacher_logprobs.defined())
    check::fail(fn, "teacher_indices and teacher_logprobs are required");
  if (teacher_indices.ndim != 2 || teacher_indices.shape[0] != n)
    check::fail(fn, "teacher_indices must be [N = " + std::to_string(n) + ", k], got " +
                        check::shape_string(teacher_indices));
  if (teacher_logprobs.ndim != 2 || teacher_logprobs.shape[0] != n)
    check::fail(fn, "teacher_logprobs must be [N = " + std::to_string(n) + ", k], got " +
                        check::shape_string(teacher_logprobs));
  const RowReduce r = check_distill(fn, n, options, fused, loss);
  DeviceGuard guard(fn, device);
  // The teacher rows are checked chunk by chunk by the sparse kernel (an error names the chunk's
  // first token and the row within it), as on the CPU.
  distill_chunks_cuda(
      fn, student, student_grads, options, fused, loss, device, r,
      [&](int64_t r0, int64_t rows, float* zs, float* grad_out, const TensorView& weights,
          const TensorView& row_loss) {
        SparseOutputs out;
        out.loss = row_loss;
        if (grad_out != nullptr)
          out.grad_student = fused_cuda::device_matrix(grad_out, rows, v, device);
        sparse_divergence_cuda(fused_cuda::device_matrix(zs, rows, v, device),
                               fused::row_slice(teacher_indices, r0, rows),
                               fused::row_slice(teacher_logprobs, r0, rows), spec, sparse,
                               chunk_options(options, r0, rows, weights), out,
                               /*scratch_inputs=*/true);
      },
      [] {});
}

}  // namespace divkit::detail
