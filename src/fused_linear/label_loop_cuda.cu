// The CUDA chunk loop of the label heads (fused_linear.h: cross-entropy, log-probs and their
// gradients): per chunk of tokens, the logits by the device GEMM (head_cuda.h), the row
// statistics and the logit gradient by the label-row kernel (label_cuda.cu), then the gradient
// GEMMs. The per-row coefficients of the gradient are computed on the device before the loop,
// the loss and the statistics' outputs after it, so the host reads nothing until the end: the
// checks (labels in range, finite weights and upstream gradients, finite logits) are device
// flags read once after the loop (check_finite), or not at all, leaving NaN where they failed.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "core/check.h"
#include "core/cuda_common.cuh"
#include "core/cuda_device.h"
#include "core/reduction.h"
#include "fused_linear/arguments.h"
#include "fused_linear/head_cuda.h"
#include "fused_linear/label_cuda.h"
#include "fused_linear/label_loop_cuda.h"

namespace divkit::detail {
namespace {

using namespace cuda_common;  // NOLINT(build/namespaces): the shared device helpers

constexpr int64_t kMaxBlocks = 4096;

// flags[]: the first token of each kind of bad input, in the order the CPU head reports them.
enum Flag : int { kBadGrad, kBadLabel, kBadWeight, kNonFinite, kFlags };

unsigned grid_for(int64_t n) {
  return static_cast<unsigned>(
      std::max<int64_t>(1, std::min((n + kThreads - 1) / kThreads, kMaxBlocks)));
}

// The per-token fp64 vectors of the call, [n] each (nullptr: not needed).
struct Rows {
  double *lse = nullptr, *zy = nullptr, *mean = nullptr, *ent = nullptr, *topk = nullptr,
         *sq = nullptr, *top1 = nullptr;
  double *a0 = nullptr, *a1 = nullptr, *b = nullptr, *c = nullptr, *e = nullptr;
};

struct Upstream {  // an fp32/fp64 [n] vector on the device
  const void* data = nullptr;
  DType dtype = DType::f32;
  int64_t stride = 0;
};

__device__ inline double upstream(const Upstream& u, int64_t i) {
  if (u.data == nullptr) return 0.0;
  return u.dtype == DType::f64
             ? static_cast<const double*>(u.data)[i * u.stride]
             : static_cast<double>(static_cast<const float*>(u.data)[i * u.stride]);
}

// The labels' range and the upstream gradients' values (every token, as the CPU checks them).
__global__ void __launch_bounds__(kThreads)
    check_kernel(RowReduce r, int64_t v, Upstream g, Upstream ge, unsigned long long* flags) {
  for (int64_t i = blockIdx.x * int64_t{kThreads} + threadIdx.x; i < r.n;
       i += int64_t{gridDim.x} * kThreads) {
    if (r.labels != nullptr) {
      const int64_t y = load_index(r.labels, r.labels_dtype, i * r.labels_stride);
      if (y != r.ignore_index && (y < 0 || y >= v))
        atomicMin(&flags[kBadLabel], static_cast<unsigned long long>(i));
    }
    if (!isfinite(upstream(g, i)) || !isfinite(upstream(ge, i)))
      atomicMin(&flags[kBadGrad], static_cast<unsigned long long>(i));
  }
}

// The gradient coefficients of label_rows per token. Cross-entropy, s = w_i / divisor:
// a0 = s, a1 = 2 s z_loss, b = -s (1 - eps), c = -s eps / V (the kernel's smooth_unmasked turns it
// into -s eps / V' over the V' unmasked entries); log-probs backward: a0 = -g,
// b = g, c = 0, e = -g_entropy.
__global__ void __launch_bounds__(kThreads)
    coef_kernel(RowReduce r, Rows w, bool backward, Upstream g, Upstream ge, double eps, double zl,
                int64_t v) {
  for (int64_t i = blockIdx.x * int64_t{kThreads} + threadIdx.x; i < r.n;
       i += int64_t{gridDim.x} * kThreads) {
    if (backward) {
      const double gi = upstream(g, i);
      w.a0[i] = -gi;
      w.b[i] = gi;
      w.c[i] = 0.0;
      if (w.e != nullptr) w.e[i] = -upstream(ge, i);
      continue;
    }
    const double s = row_weight(r, i) / *r.divisor;
    w.a0[i] = s;
    w.a1[i] = 2.0 * s * zl;
    w.b[i] = -s * (1.0 - eps);
    w.c[i] = -s * eps / static_cast<double>(v);
  }
}

struct StatOut {
  void* data = nullptr;
  DType dtype = DType::f32;
  int64_t stride = 0;
};

__device__ inline void put_stat(const StatOut& o, int64_t i, double x) {
  if (o.data == nullptr) return;
  const int64_t k = i * o.stride;
  switch (o.dtype) {
    case DType::f64: static_cast<double*>(o.data)[k] = x; break;
    case DType::f32: static_cast<float*>(o.data)[k] = static_cast<float>(x); break;
    case DType::i32: static_cast<int32_t*>(o.data)[k] = static_cast<int32_t>(x); break;
    case DType::i64: static_cast<int64_t*>(o.data)[k] = static_cast<int64_t>(x); break;
    default: break;
  }
}

struct Stats {
  StatOut logprobs, entropy, lse, topk_mass, log_sum_sq, is_top1;
};

// After the loop: the check of the row statistics (a NaN lse at a counted token: its logits were
// NaN, +inf or all -inf), the cross-entropy's per-token loss and the statistics' outputs.
__global__ void __launch_bounds__(kThreads)
    finish_rows_kernel(RowReduce r, Rows w, Stats st, bool ce, double eps, double zl,
                       unsigned long long* flags) {
  for (int64_t i = blockIdx.x * int64_t{kThreads} + threadIdx.x; i < r.n;
       i += int64_t{gridDim.x} * kThreads) {
    const bool on = row_active(r, i);
    const double lse = w.lse[i], zy = w.zy[i];
    if (on && isnan(lse)) atomicMin(&flags[kNonFinite], static_cast<unsigned long long>(i));
    if (ce) {
      const double mean = w.mean != nullptr ? w.mean[i] : 0.0;
      r.row_loss[i] = on ? (1.0 - eps) * (lse - zy) + eps * (lse - mean) + zl * lse * lse : 0.0;
    }
    put_stat(st.logprobs, i, zy - lse);  // 0 - 0 at an ignored token
    put_stat(st.lse, i, lse);
    if (w.ent != nullptr) put_stat(st.entropy, i, w.ent[i]);
    if (w.topk != nullptr) put_stat(st.topk_mass, i, w.topk[i]);
    if (w.sq != nullptr) put_stat(st.log_sum_sq, i, w.sq[i]);
    if (w.top1 != nullptr) put_stat(st.is_top1, i, w.top1[i]);
  }
}

StatOut stat_out(const TensorView& t) {
  if (!t.defined()) return {};
  return {t.data, t.dtype, t.strides[0]};
}

Upstream upstream_of(const TensorView& t) {
  if (!t.defined()) return {};
  return {t.data, t.dtype, t.strides[0]};
}

void check_vector(const char* fn, const char* name, const TensorView& t, int64_t n,
                  std::initializer_list<DType> dtypes) {
  if (t.defined()) check::vector_of(fn, name, cuda::shape_only(t), n, dtypes);
}

}  // namespace

void label_head_cuda(const LabelHeadCudaJob& job, int device) {
  const char* fn = job.fn;
  fused_cuda::check_head(fn, job.head, job.grads);
  const int64_t n = job.head.hidden.shape[0], v = job.head.weight.shape[0];
  check_vector(fn, "labels", job.labels, n, {DType::i64, DType::i32});
  const LabelStatsOutputs& st = job.stats;
  for (auto [t, name] : {std::pair{&st.logprobs, "logprobs"}, std::pair{&st.entropy, "entropy"},
                         std::pair{&st.lse, "lse"}, std::pair{&st.topk_mass, "topk_mass"},
                         std::pair{&st.log_sum_sq_probs, "log_sum_sq_probs"}})
    check_vector(fn, name, *t, n, {DType::f32, DType::f64});
  check_vector(fn, "is_top1", st.is_top1, n, {DType::f32, DType::f64, DType::i32, DType::i64});
  if (st.topk_mass.defined() && (st.topk < 1 || st.topk > v))
    check::fail(fn, "topk must be in [1, V = " + std::to_string(v) + "], got " +
                        std::to_string(st.topk));
  const bool ce = job.loss.defined();
  if (ce) {
    (void)reduce::divisor(fn, job.reduction, job.num_items_in_batch, n, n);  // the checks
    reduce::check_loss_output(fn, cuda::shape_only(job.loss), job.reduction, n);
    check_vector(fn, "weights", job.weights, n, {DType::f32, DType::f64});
  }
  check_vector(fn, "grad_logprobs", job.grad_logprobs, n, {DType::f32, DType::f64});
  check_vector(fn, "grad_entropy", job.grad_entropy, n, {DType::f32, DType::f64});

  cuda_common::DeviceGuard guard(fn, device);
  const auto s = reinterpret_cast<cudaStream_t>(job.stream);
  const bool want_grad =
      job.grads.hidden.defined() || job.grads.weight.defined() || job.grads.bias.defined();
  const bool want_ent = st.entropy.defined() || (job.backward && job.grad_entropy.defined());
  const bool want_mean = ce && job.label_smoothing > 0.0f;
  // The per-token vectors: lse and z_label always (the NaN check, log-probs), the rest as asked.
  const bool need[] = {true,
                       true,
                       want_mean,
                       want_ent,
                       st.topk_mass.defined(),
                       st.log_sum_sq_probs.defined(),
                       st.is_top1.defined(),
                       want_grad,
                       want_grad && !job.backward,
                       want_grad,
                       want_grad,
                       want_grad && job.backward && job.grad_entropy.defined(),
                       ce};
  constexpr int kVectors = sizeof(need) / sizeof(need[0]);
  const int64_t vec_bytes = (std::max<int64_t>(n, 1) * 8 + 255) / 256 * 256;
  const size_t bytes = static_cast<size_t>(kVectors * vec_bytes + 256 + 256);
  fused_cuda::DeviceBuffer ws(fn, static_cast<int64_t>(bytes), reinterpret_cast<CUstream_st*>(s));
  double* vecs[kVectors];
  for (int k = 0; k < kVectors; ++k)
    vecs[k] = need[k] ? reinterpret_cast<double*>(ws.get() + k * vec_bytes) : nullptr;
  Rows w{vecs[0], vecs[1], vecs[2], vecs[3], vecs[4],  vecs[5],
         vecs[6], vecs[7], vecs[8], vecs[9], vecs[10], vecs[11]};
  auto* flags = reinterpret_cast<unsigned long long*>(ws.get() + kVectors * vec_bytes);
  auto* divisor = reinterpret_cast<double*>(ws.get() + kVectors * vec_bytes + 256);

  DivergenceOptions reduce_options;
  reduce_options.labels = job.labels;
  reduce_options.ignore_index = job.ignore_index;
  reduce_options.weights = job.weights;
  reduce_options.reduction = job.reduction;
  reduce_options.num_items_in_batch = job.num_items_in_batch;
  RowReduce r;
  set_row_reduce(n, reduce_options, r);
  r.divisor = divisor;
  r.row_loss = vecs[kVectors - 1];
  r.bad = flags;
  r.bad_slots = kFlags;
  r.weights_bad_slot = kBadWeight;
  r.check_finite = job.check_finite;

  check_cuda(fn, cudaMemsetAsync(flags, 0xFF, kFlags * sizeof(unsigned long long), s),
             "cudaMemsetAsync");
  const Upstream g = upstream_of(job.grad_logprobs), ge = upstream_of(job.grad_entropy);
  if (n > 0) {
    DIVKIT_LAUNCH(check_kernel, grid_for(n), kThreads, 0, s)(r, v, g, ge, flags);
    check_cuda(fn, cudaGetLastError(), "the check kernel launch");
  }
  launch_prep(fn, r, s);  // the divisor and the weights' check
  const double eps = job.label_smoothing, zl = job.z_loss_scale;
  if (want_grad && n > 0) {
    DIVKIT_LAUNCH(coef_kernel, grid_for(n), kThreads, 0, s)(r, w, job.backward, g, ge, eps, zl, v);
    check_cuda(fn, cudaGetLastError(), "the coefficient kernel launch");
  }

  {
    const int64_t chunk = fused::choose_chunk(job.chunk_size, n, v);
    fused_cuda::DeviceHead head(fn, job.head, job.grads, chunk, reinterpret_cast<CUstream_st*>(s));
    for (int64_t r0 = 0; r0 < n; r0 += chunk) {
      const int64_t rows = std::min(chunk, n - r0);
      float* z = head.logits(r0, rows);
      LabelRowsArgs a;
      a.logits = TensorView::matrix(z, DType::f32, rows, v);
      a.logits.device = Device::cuda;
      a.logits.device_index = device;
      a.labels = fused::row_slice(job.labels, r0, rows);
      a.ignore_index = job.ignore_index;
      a.temperature = job.temperature;
      a.softcap = job.softcap;
      a.lse = fused_cuda::device_vector(w.lse, r0, rows, device);
      a.z_label = fused_cuda::device_vector(w.zy, r0, rows, device);
      a.mean_z = fused_cuda::device_vector(w.mean, r0, rows, device);
      a.entropy = fused_cuda::device_vector(w.ent, r0, rows, device);
      a.topk_mass = fused_cuda::device_vector(w.topk, r0, rows, device);
      a.topk = st.topk;
      a.log_sum_sq = fused_cuda::device_vector(w.sq, r0, rows, device);
      a.is_top1 = fused_cuda::device_vector(w.top1, r0, rows, device);
      a.coef_a0 = fused_cuda::device_vector(w.a0, r0, rows, device);
      a.coef_a1 = fused_cuda::device_vector(w.a1, r0, rows, device);
      a.coef_b = fused_cuda::device_vector(w.b, r0, rows, device);
      a.coef_c = fused_cuda::device_vector(w.c, r0, rows, device);
      a.coef_e = fused_cuda::device_vector(w.e, r0, rows, device);
      // Label smoothing spreads over the unmasked entries (c = -s eps / V becomes -s eps / V').
      a.smooth_unmasked = want_mean;
      a.first_token = r0;
      a.stream = job.stream;
      a.check_finite = false;  // read once, after the loop
      label_rows_cuda(fn, a, device);
      head.add_grad_chunk(r0, rows);
    }
    head.finish();
  }

  Stats so{stat_out(st.logprobs),  stat_out(st.entropy),          stat_out(st.lse),
           stat_out(st.topk_mass), stat_out(st.log_sum_sq_probs), stat_out(st.is_top1)};
  if (n > 0) {
    DIVKIT_LAUNCH(finish_rows_kernel, grid_for(n), kThreads, 0, s)(r, w, so, ce, eps, zl, flags);
    check_cuda(fn, cudaGetLastError(), "the finish kernel launch");
  }
  if (ce) launch_finish(fn, r, job.loss, s);
  if (!job.check_finite) return;
  unsigned long long bad[kFlags];
  check_cuda(fn, cudaMemcpyAsync(bad, flags, sizeof(bad), cudaMemcpyDeviceToHost, s),
             "cudaMemcpyAsync");
  check_cuda(fn, cudaStreamSynchronize(s), "cudaStreamSynchronize");
  if (bad[kBadGrad] != kNone)
    check::fail(fn, "grad_logprobs and grad_entropy must be finite (index " +
                        std::to_string(bad[kBadGrad]) + ")");
  if (bad[kBadLabel] != kNone)
    fused_cuda::fail_bad_label(fn, job.labels, static_cast<int64_t>(bad[kBadLabel]), v,
                               job.ignore_index);
  if (bad[kBadWeight] != kNone) fail_bad_weight(fn, r, bad[kBadWeight]);
  if (bad[kNonFinite] != kNone)
    check::fail(fn, "the logits of token " + std::to_string(bad[kNonFinite]) +
                        " (hidden @ weight^T + bias) are NaN, +inf or all -inf" +
                        (1.0f / job.temperature != 1.0f
                             ? ", or overflow float32 once divided by the temperature"
                             : ""));
}

}  // namespace divkit::detail
