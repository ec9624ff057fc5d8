// The CUDA label-row kernel of divkit::label_rows (fused_linear.h): the row statistics of the
// label heads (cross-entropy, log-probs) and their gradient on one chunk of logits, the steps of
// label_kernels.cc with the per-entry and per-row math of label_scalar.h, so the CPU tests cover
// what is computed per entry.
//
// One thread block (kThreads threads) per row; blocks walk the rows with a grid stride. Per
// active row, with z = softcap(x) / T recomputed from the raw logits in every sweep (the logits
// are only written by the gradient sweep, so a forward-only call leaves them as they were):
//   1. max of z and the NaN/+inf check of x (block reductions in a fixed order);
//   2. S = sum exp(z - m), and as asked sum exp(z - m)(z - m), sum z, sum exp(z - m)^2, whether
//      an entry before the label holds the max, the number V' of unmasked entries (z > -inf; sum z
//      then over them) (fp64 per thread, then one block reduction each);
//   3. top-k mass (when asked): a radix select of the k-th largest z (four 8-bit histogram
//      passes over order-preserving keys, integer atomics in shared memory), then the sum of
//      exp(z - lse) over the entries above it plus the ties it takes;
//   4. the gradient (when the coefficients are given), written over the row, each entry by the
//      thread that read it; the label's one-hot term is added by the thread that owns the label.
// Every sum has one order, so two runs give the same bits. Bad rows are reported through integer
// atomicMin on a device flag (order-free), read after the kernel unless check_finite is off; such
// a row's statistics and gradient are NaN.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "core/check.h"
#include "core/cuda_common.cuh"
#include "core/cuda_device.h"
#include "fused_linear/label_cuda.h"
#include "fused_linear/label_scalar.h"
#include "sparse/radix_select.cuh"
#include "sparse/sparse_scalar.h"

namespace divkit::detail {
namespace {

using namespace cuda_common;  // NOLINT(build/namespaces): the shared device helpers
namespace ls = label_scalar;
namespace ss = sparse_scalar;

constexpr float kInfF = kInfinityF;

// Enough blocks to fill an H100 several times over (8 resident blocks of 256 threads on each of
// 132 SMs); the grid-stride loop covers larger chunks.
constexpr int64_t kMaxBlocks = 4096;

// bad[]: the first row whose active label is outside [0, V), the first row with NaN/+inf logits
// or every z -inf.
enum BadSlot : int { kBadLabel, kNonFinite, kBadSlots };

// An fp64 [rows] vector on the device; data == nullptr: not given.
struct Vec {
  double* data = nullptr;
  int64_t stride = 0;
};

struct Params {
  void* x = nullptr;  // the logits [n, v] (and the gradient written over them)
  DType dtype = DType::f32;
  int64_t ld = 0, n = 0, v = 0;
  const void* labels = nullptr;
  DType labels_dtype = DType::i64;
  int64_t labels_stride = 1;
  int64_t ignore_index = -100;
  ls::Transform tr;
  float softcap = 0.0f;
  Vec lse, z_label, mean_z, entropy, topk_mass, log_sum_sq, is_top1, unmasked;
  int64_t topk = 0;
  Vec a0, a1, b, c, e;  // gradient coefficients (read only)
  bool grad = false;
  bool smooth_unmasked = false;  // mean_z and c over the unmasked entries
  unsigned long long* bad = nullptr;
};

struct Shared {
  double d[kWarps];
  float f[kWarps];
  int i[kWarps];
  radix_select::RadixShared radix;
};

__device__ inline void put(const Vec& out, int64_t row, double x) {
  if (out.data != nullptr) out.data[row * out.stride] = x;
}
__device__ inline double get(const Vec& in, int64_t row) {
  return in.data != nullptr ? in.data[row * in.stride] : 0.0;
}

__device__ inline float z_at(const Params& p, int64_t row, int64_t j) {
  return ls::transform(p.tr, load(p.x, p.dtype, row * p.ld + j));
}

__device__ inline void flag(const Params& p, int slot, int64_t row) {
  if (threadIdx.x == 0) atomicMin(&p.bad[slot], static_cast<unsigned long long>(row));
}

// Every statistic of the row set to `value` (0 at an ignored row, NaN at a bad one) and, when the
// gradient is asked, every entry of its row to `g`.
__device__ void fill_row(const Params& p, int64_t row, double value, float g) {
  if (threadIdx.x == 0) {
    put(p.lse, row, value);
    put(p.z_label, row, value);
    put(p.mean_z, row, value);
    put(p.entropy, row, value);
    put(p.topk_mass, row, value);
    put(p.log_sum_sq, row, value);
    put(p.is_top1, row, value);
    put(p.unmasked, row, value);
  }
  if (!p.grad) return;
  for (int64_t j = threadIdx.x; j < p.v; j += kThreads) store(p.x, p.dtype, row * p.ld + j, g);
}

// Step 3: the sum of the topk largest p of the row (larger z first; ties count once each).
__device__ double row_topk_mass(const Params& p, int64_t row, double lse, Shared& sh) {
  const auto kth = radix_select::block_radix_kth<kThreads>(
      p.v, p.topk, [&](int64_t j) { return ss::order_key(z_at(p, row, j)); }, sh.radix);
  const uint32_t prefix = kth.key;
  const int64_t remaining = kth.remaining;
  // prefix is the key of the k-th largest z: the entries above it, and `remaining` equal ones.
  double acc = 0.0;
  for (int64_t j = threadIdx.x; j < p.v; j += kThreads) {
    const float z = z_at(p, row, j);
    if (ss::order_key(z) > prefix) acc += ls::topk_term(z, lse);
  }
  const double above = block_reduce(acc, SumOp{}, sh.d);
  return ls::topk_mass(above, remaining, ls::key_value(prefix), lse);
}

__global__ void __launch_bounds__(kThreads) rows_kernel(Params p) {
  __shared__ Shared sh;
  const bool want_ent = p.entropy.data != nullptr || p.e.data != nullptr;
  const bool want_mean = p.mean_z.data != nullptr, want_sq = p.log_sum_sq.data != nullptr;
  const bool want_top1 = p.is_top1.data != nullptr;
  // The count of unmasked entries, for the output or for smoothing over them.
  const bool want_count = p.unmasked.data != nullptr || p.smooth_unmasked;
  for (int64_t row = blockIdx.x; row < p.n; row += gridDim.x) {
    // Every thread reads the label: the branches below are uniform over the block.
    const int64_t y = load_index(p.labels, p.labels_dtype, row * p.labels_stride);
    if (y == p.ignore_index) {
      fill_row(p, row, 0.0, 0.0f);
      continue;
    }
    if (y < 0 || y >= p.v) {
      flag(p, kBadLabel, row);
      fill_row(p, row, nan(""), nanf(""));
      continue;
    }
    // 1. The max of z and the check of x.
    float m = -kInfF;
    int bad = 0;
    for (int64_t j = threadIdx.x; j < p.v; j += kThreads) {
      const float x = load(p.x, p.dtype, row * p.ld + j);
      if (ls::bad_logit(x)) bad = 1;
      m = fmaxf(m, ls::transform(p.tr, x));
    }
    const int any_bad = block_reduce(bad, OrOp{}, sh.i);
    m = block_reduce(m, MaxOp{}, sh.f);
    // m = +inf from finite logits: x / T overflowed fp32 (a tiny temperature); the row's sums
    // would be NaN (inf - inf), so the row is reported instead, as on the CPU.
    if (any_bad != 0 || m == -kInfF || m == kInfF) {
      flag(p, kNonFinite, row);
      fill_row(p, row, nan(""), nanf(""));
      continue;
    }
    // 2. The sums under m.
    const float zy = z_at(p, row, y);
    // cnt: whole numbers, exact in fp64 in any order.
    double s = 0.0, sec = 0.0, sz = 0.0, ssq = 0.0, cnt = 0.0;
    int earlier = 0;
    for (int64_t j = threadIdx.x; j < p.v; j += kThreads) {
      const float z = z_at(p, row, j);
      const float ex = ls::softmax_exp(z, m);
      s += ex;
      if (want_ent) sec += ls::entropy_term(ex, z, m);
      if (want_count) {
        // sum z over the unmasked entries: with none masked, the same terms in the same order.
        const bool on = ls::is_unmasked(z);
        if (on) cnt += 1.0;
        if (want_mean && on) sz += z;
      } else if (want_mean) {
        sz += z;
      }
      if (want_sq) ssq += static_cast<double>(ex) * ex;
      if (want_top1 && j < y && z == m) earlier = 1;
    }
    // The reductions also order every read of the row above before the gradient's writes.
    const double sum_e = block_reduce(s, SumOp{}, sh.d);
    const double sum_ec = want_ent ? block_reduce(sec, SumOp{}, sh.d) : 0.0;
    const double sum_z = want_mean ? block_reduce(sz, SumOp{}, sh.d) : 0.0;
    const double sum_sq = want_sq ? block_reduce(ssq, SumOp{}, sh.d) : 0.0;
    const int any_earlier = want_top1 ? block_reduce(earlier, OrOp{}, sh.i) : 0;
    const int64_t n_unmasked =
        want_count ? static_cast<int64_t>(block_reduce(cnt, SumOp{}, sh.d)) : p.v;
    const double lse = ls::row_lse(m, sum_e);
    const double h = want_ent ? ls::row_entropy(sum_e, sum_ec) : 0.0;
    // 3. The top-k mass (block-wide: every thread takes part).
    const double mass = p.topk_mass.data != nullptr ? row_topk_mass(p, row, lse, sh) : 0.0;
    if (threadIdx.x == 0) {
      put(p.lse, row, lse);
      put(p.z_label, row, zy);
      if (want_mean)
        put(p.mean_z, row,
            want_count ? ls::row_mean_unmasked(sum_z, n_unmasked, p.v, p.smooth_unmasked)
                       : ls::row_mean(sum_z, p.v));
      if (want_count) put(p.unmasked, row, static_cast<double>(n_unmasked));
      put(p.entropy, row, h);
      put(p.topk_mass, row, mass);
      if (want_sq) put(p.log_sum_sq, row, ls::row_log_sum_sq(sum_e, sum_sq));
      put(p.is_top1, row, zy == m && any_earlier == 0 ? 1.0 : 0.0);
    }
    if (!p.grad) continue;
    // 4. The gradient over the row, in place: entry j is read and written by one thread, after
    // the block's last read of the row (the reductions above).
    const double c =
        p.smooth_unmasked ? ls::smooth_c(get(p.c, row), p.v, n_unmasked) : get(p.c, row);
    const ls::GradRow g =
        ls::make_grad_row(lse, ls::coef_a(get(p.a0, row), get(p.a1, row), lse), c, get(p.e, row), h,
                          p.tr.inv_t, p.softcap, p.smooth_unmasked);
    const float label = ls::label_term(g, get(p.b, row), zy);
    for (int64_t j = threadIdx.x; j < p.v; j += kThreads) {
      float d = ls::grad_entry(g, z_at(p, row, j));
      if (j == y) d += label;
      store(p.x, p.dtype, row * p.ld + j, d);
    }
  }
}

Vec vec(const TensorView& t) {
  if (!t.defined()) return {};
  return {static_cast<double*>(t.data), t.strides[0]};
}

}  // namespace

void label_rows_cuda(const char* fn, const LabelRowsArgs& a, int device) {
  check::dtype_in(fn, "logits", cuda::shape_only(a.logits),
                  {DType::f32, DType::bf16, DType::f16, DType::f64});
  Params p;
  p.x = a.logits.data;
  p.dtype = a.logits.dtype;
  p.ld = a.logits.strides[0];
  p.n = a.logits.shape[0];
  p.v = a.logits.shape[1];
  p.labels = a.labels.data;
  p.labels_dtype = a.labels.dtype;
  p.labels_stride = a.labels.strides[0];
  p.ignore_index = a.ignore_index;
  p.tr = ls::make_transform(1.0f / a.temperature, a.softcap);
  p.softcap = a.softcap;
  p.lse = vec(a.lse);
  p.z_label = vec(a.z_label);
  p.mean_z = vec(a.mean_z);
  p.entropy = vec(a.entropy);
  p.topk_mass = vec(a.topk_mass);
  p.log_sum_sq = vec(a.log_sum_sq);
  p.is_top1 = vec(a.is_top1);
  p.unmasked = vec(a.unmasked);
  p.topk = a.topk;
  p.a0 = vec(a.coef_a0);
  p.a1 = vec(a.coef_a1);
  p.b = vec(a.coef_b);
  p.c = vec(a.coef_c);
  p.e = vec(a.coef_e);
  p.grad = a.coef_a0.defined();
  p.smooth_unmasked = a.smooth_unmasked;
  if (p.n == 0) return;

  DeviceGuard guard(fn, device);
  const auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  constexpr size_t kFlagBytes = kBadSlots * sizeof(unsigned long long);
  check_cuda(fn, cudaMallocAsync(reinterpret_cast<void**>(&p.bad), kFlagBytes, stream),
             "cudaMallocAsync");
  unsigned long long bad[kBadSlots];
  int64_t label = 0;
  try {
    check_cuda(fn, cudaMemsetAsync(p.bad, 0xFF, kFlagBytes, stream), "cudaMemsetAsync");
    const unsigned grid = static_cast<unsigned>(std::min(p.n, kMaxBlocks));
    DIVKIT_LAUNCH(rows_kernel, grid, kThreads, 0, stream)(p);
    check_cuda(fn, cudaGetLastError(), "the label row kernel launch");
    if (a.check_finite)
      check_cuda(fn, cudaMemcpyAsync(bad, p.bad, kFlagBytes, cudaMemcpyDeviceToHost, stream),
                 "cudaMemcpyAsync");
    check_cuda(fn, cudaFreeAsync(p.bad, stream), "cudaFreeAsync");
    p.bad = nullptr;
    if (a.check_finite) {
      check_cuda(fn, cudaStreamSynchronize(stream), "cudaStreamSynchronize");
      if (bad[kBadLabel] != kNone) {
        // The bad label itself, for the message (this call raises anyway).
        const size_t es = dtype_size(p.labels_dtype);
        const char* src = static_cast<const char*>(p.labels) +
                          static_cast<int64_t>(bad[kBadLabel]) * p.labels_stride * int64_t(es);
        int32_t y32 = 0;
        void* dst =
            p.labels_dtype == DType::i32 ? static_cast<void*>(&y32) : static_cast<void*>(&label);
        check_cuda(fn, cudaMemcpyAsync(dst, src, es, cudaMemcpyDeviceToHost, stream),
                   "cudaMemcpyAsync");
        check_cuda(fn, cudaStreamSynchronize(stream), "cudaStreamSynchronize");
        if (p.labels_dtype == DType::i32) label = y32;
      }
    }
  } catch (...) {
    if (p.bad != nullptr) cudaFreeAsync(p.bad, stream);
    throw;
  }
  if (!a.check_finite) return;
  if (bad[kBadLabel] != kNone)
    check::fail(fn,
                "labels[" + std::to_string(a.first_token + static_cast<int64_t>(bad[kBadLabel])) +
                    "] = " + std::to_string(label) + " is out of range [0, " + std::to_string(p.v) +
                    ") and is not ignore_index (" + std::to_string(a.ignore_index) + ")");
  if (bad[kNonFinite] != kNone)
    check::fail(fn, "the logits of token " +
                        std::to_string(a.first_token + static_cast<int64_t>(bad[kNonFinite])) +
                        " (hidden @ weight^T + bias) are NaN, +inf or all -inf" +
                        (1.0f / a.temperature != 1.0f
                             ? ", or overflow float32 once divided by the temperature"
                             : ""));
}

}  // namespace divkit::detail
