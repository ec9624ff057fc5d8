// The generic row kernel: one token (row) of student and teacher logits -> the divergence value
// and the gradients, for any divergence of divergences-inl.h. Compiled once per SIMD target
// (Highway foreach_target) and chosen at run time.
//
// Per row, with a per-thread row block of four fp32 buffers of V (padded to the vector width):
//   pass 1  read the logits (any dtype) once from memory, divide by T, keep them in xs / xt,
//           track the max and any NaN/+inf;
//   pass 2  es = exp(xs - max), et likewise, summed in fp64 lanes -> log-sum-exp;
//   pass 3  p, q, log p, log q from the buffers (no further exp), the divergence terms summed
//           in fp64 lanes; the student factor u overwrites xs, the teacher factor v overwrites xt;
//   pass 4  gradient = slope * (u - q * sum u) / T * scale, written in the output dtype.
// Only pass 1 and pass 4 touch the caller's memory; the block stays in the core's L2/L3. Row
// sums are reduced in a fixed lane order, so results do not depend on the thread count.
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>

#include "core/dtype.h"
#include "divergence/row_job.h"
#include "hwy/aligned_allocator.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "divergence/divergence_kernels.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep

#include "divergence/divergences-inl.h"
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace divkit {
namespace HWY_NAMESPACE {
namespace {

namespace hn = hwy::HWY_NAMESPACE;
using detail::RowInput;
using detail::RowJob;
using detail::RowOutput;
using DF = hn::ScalableTag<float>;
using VF = hn::Vec<DF>;

// Sum of fp32 vectors accumulated in fp64 lanes (V up to 128k+ terms per row: fp32 lane sums
// would lose ~1e-5 relative), reduced in a fixed order.
#if HWY_TARGET == HWY_SCALAR
struct SumF64 {  // one lane: a plain double
  double total = 0.0;
  HWY_INLINE void Add(VF x) { total += hn::GetLane(x); }
  HWY_INLINE double Total() const { return total; }
};
#else
struct SumF64 {
  using DH = hn::Half<DF>;
  using DD = hn::Rebind<double, DH>;
  hn::Vec<DD> lo, hi;
  SumF64() : lo(hn::Zero(DD())), hi(hn::Zero(DD())) {}
  HWY_INLINE void Add(VF x) {
    const DH dh;
    lo = hn::Add(lo, hn::PromoteTo(DD(), hn::LowerHalf(dh, x)));
    hi = hn::Add(hi, hn::PromoteTo(DD(), hn::UpperHalf(dh, x)));
  }
  HWY_INLINE double Total() const {
    const DD dd;
    return hn::GetLane(hn::SumOfLanes(dd, hn::Add(lo, hi)));
  }
};
#endif

// ---- pass 1: load one row of any dtype into an fp32 buffer, scaled by 1/T ------------------

template <typename T>
HWY_INLINE float ScalarToFloat(T x) {
  if constexpr (std::is_same_v<T, hwy::bfloat16_t> || std::is_same_v<T, hwy::float16_t>) {
    uint16_t bits;
    std::memcpy(&bits, &x, 2);
    return std::is_same_v<T, hwy::bfloat16_t> ? dtype::bf16_to_f32(bits) : dtype::f16_to_f32(bits);
  } else {
    return static_cast<float>(x);
  }
}

template <typename T>
HWY_INLINE VF LoadAsFloat(DF df, const T* HWY_RESTRICT p) {
  if constexpr (std::is_same_v<T, float>) {
    return hn::LoadU(df, p);
  } else {
    return hn::PromoteTo(df, hn::LoadU(hn::Rebind<T, DF>(), p));
  }
}

struct LoadResult {
  float max;
  bool non_finite;  // NaN or +inf after scaling
};

// Writes x = src / T into dst[0, V) and -inf into the padding [V, Vpad).
template <typename T>
LoadResult LoadRowTyped(const T* HWY_RESTRICT src, int64_t v, int64_t vpad, float inv_t,
                        float* HWY_RESTRICT dst) {
  const DF df;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(df));
  const VF scale = hn::Set(df, inv_t);
  const VF inf = hn::Set(df, std::numeric_limits<float>::infinity());
  VF vmax = hn::Set(df, -std::numeric_limits<float>::infinity());
  auto bad = hn::Lt(inf, inf);  // all false
  int64_t j = 0;
  if constexpr (!std::is_same_v<T, double>) {
    for (; j + lanes <= v; j += lanes) {
      const VF x = hn::Mul(LoadAsFloat(df, src + j), scale);
      bad = hn::Or(bad, hn::Not(hn::Lt(x, inf)));  // NaN compares false
      vmax = hn::Max(vmax, x);
      hn::Store(x, df, dst + j);
    }
  }
  float smax = hn::GetLane(hn::MaxOfLanes(df, vmax));
  bool sbad = !hn::AllFalse(df, bad);
  for (; j < v; ++j) {
    const float x = ScalarToFloat(src[j]) * inv_t;
    sbad |= !(x < std::numeric_limits<float>::infinity());
    smax = std::max(smax, x);
    dst[j] = x;
  }
  for (; j < vpad; ++j) dst[j] = -std::numeric_limits<float>::infinity();
  return {smax, sbad};
}

LoadResult LoadRow(const RowInput& in, int64_t row, int64_t v, int64_t vpad, float inv_t,
                   float* HWY_RESTRICT dst) {
  switch (in.dtype) {
    case DType::f32:
      return LoadRowTyped(static_cast<const float*>(in.data) + row * in.row_stride, v, vpad,
                          inv_t, dst);
    case DType::bf16:
      return LoadRowTyped(static_cast<const hwy::bfloat16_t*>(in.data) + row * in.row_stride, v,
                          vpad, inv_t, dst);
    case DType::f16:
      return LoadRowTyped(static_cast<const hwy::float16_t*>(in.data) + row * in.row_stride, v,
                          vpad, inv_t, dst);
    default:
      return LoadRowTyped(static_cast<const double*>(in.data) + row * in.row_stride, v, vpad,
                          inv_t, dst);
  }
}

// ---- pass 2: e = exp(x - max) in place of nothing (own buffer); returns log sum e ------------

HWY_INLINE double ExpAndLogSum(const float* HWY_RESTRICT x, float max, int64_t vpad,
                               float* HWY_RESTRICT e) {
  const DF df;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(df));
  const VF vmax = hn::Set(df, max);
  SumF64 sum;
  for (int64_t j = 0; j < vpad; j += lanes) {
    const VF ej = hn::Exp(df, hn::Sub(hn::Load(df, x + j), vmax));
    hn::Store(ej, df, e + j);
    sum.Add(ej);
  }
  return std::log(sum.Total());
}

// ---- pass 4: write a gradient row in the output dtype ---------------------------------------

// g_j = scale * (u_j - q_j * sum_u), q_j = e_j / Z.  fp32 is stored directly; other dtypes are
// rounded to nearest even from fp32.
void WriteGradRow(const RowOutput& out, int64_t row, int64_t v, const float* HWY_RESTRICT u,
                  const float* HWY_RESTRICT e, float inv_z, float sum_u, float scale,
                  float* HWY_RESTRICT scratch) {
  const DF df;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(df));
  const VF vscale = hn::Set(df, scale);
  const VF vqsum = hn::Set(df, inv_z * sum_u);  // q_j * sum_u = e_j * (sum_u / Z)
  auto grad_at = [&](int64_t j) {
    return hn::Mul(vscale, hn::NegMulAdd(hn::Load(df, e + j), vqsum, hn::Load(df, u + j)));
  };
  if (out.dtype == DType::f32) {
    float* HWY_RESTRICT dst = static_cast<float*>(out.data) + row * out.row_stride;
    int64_t j = 0;
    for (; j + lanes <= v; j += lanes) hn::StoreU(grad_at(j), df, dst + j);
    if (j < v) {
      hn::Store(grad_at(j), df, scratch);
      std::memcpy(dst + j, scratch, static_cast<size_t>(v - j) * sizeof(float));
    }
    return;
  }
  // Low-precision or fp64 output: compute the fp32 row into scratch, then convert.
  for (int64_t j = 0; j < v; j += lanes) hn::Store(grad_at(j), df, scratch + j);
  char* base = static_cast<char*>(out.data) + row * out.row_stride * dtype_size(out.dtype);
  switch (out.dtype) {
    case DType::bf16: {
      auto* dst = reinterpret_cast<uint16_t*>(base);
      for (int64_t j = 0; j < v; ++j) dst[j] = dtype::f32_to_bf16(scratch[j]);
      break;
    }
    case DType::f16: {
      auto* dst = reinterpret_cast<uint16_t*>(base);
      for (int64_t j = 0; j < v; ++j) dst[j] = dtype::f32_to_f16(scratch[j]);
      break;
    }
    default: {
      auto* dst = reinterpret_cast<double*>(base);
      for (int64_t j = 0; j < v; ++j) dst[j] = scratch[j];
      break;
    }
  }
}

void ZeroRow(const RowOutput& out, int64_t row, int64_t v) {
  if (out.data == nullptr) return;
  const size_t es = dtype_size(out.dtype);
  std::memset(static_cast<char*>(out.data) + row * out.row_stride * es, 0,
              static_cast<size_t>(v) * es);
}

void RecordBad(std::atomic<int64_t>& slot, int64_t row) {
  int64_t cur = slot.load();
  while ((cur < 0 || row < cur) && !slot.compare_exchange_weak(cur, row)) {
  }
}

template <class Div>
void RunRows(RowJob& job, const Div& div) {
  const DF df;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(df));
  const int64_t n = job.n, v = job.v;
  const int64_t vpad = (v + lanes - 1) / lanes * lanes;
  const float temperature = job.spec.temperature;
  const float inv_t = 1.0f / temperature;
  const bool want_s = job.grad_student.data != nullptr;
  const bool want_t = job.grad_teacher.data != nullptr;
  const double t2 = job.spec.scale_by_t_squared ? double(temperature) * temperature : 1.0;

  std::atomic<int64_t> bad_s{-1}, bad_t{-1}, masked_s{-1}, masked_t{-1};

#pragma omp parallel num_threads(job.num_threads)
  {
    // The row block: xs, es, xt, et (and a scratch row for non-fp32 gradient output).
    const int64_t nbuf = (want_s || want_t) ? 5 : 4;
    hwy::AlignedFreeUniquePtr<float[]> block = hwy::AllocateAligned<float>(nbuf * vpad);
    float* xs = block.get();
    float* es = xs + vpad;
    float* xt = es + vpad;
    float* et = xt + vpad;
    float* scratch = nbuf == 5 ? et + vpad : nullptr;

#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      if (job.active != nullptr && !job.active[i]) {
        if (!job.check_only) {
          job.row_loss[i] = 0.0;
          ZeroRow(job.grad_student, i, v);
          ZeroRow(job.grad_teacher, i, v);
        }
        continue;
      }
      const LoadResult ls = LoadRow(job.student, i, v, vpad, inv_t, xs);
      const LoadResult lt = LoadRow(job.teacher, i, v, vpad, inv_t, xt);
      bool skip = false;
      if (ls.non_finite) RecordBad(bad_s, i), skip = true;
      if (lt.non_finite) RecordBad(bad_t, i), skip = true;
      if (!ls.non_finite && ls.max == -std::numeric_limits<float>::infinity())
        RecordBad(masked_s, i), skip = true;
      if (!lt.non_finite && lt.max == -std::numeric_limits<float>::infinity())
        RecordBad(masked_t, i), skip = true;
      if (skip || job.check_only) continue;

      const double lse_s = ls.max + ExpAndLogSum(xs, ls.max, vpad, es);
      const double lse_t = lt.max + ExpAndLogSum(xt, lt.max, vpad, et);
      const float inv_zs = static_cast<float>(std::exp(ls.max - lse_s));  // 1 / sum es
      const float inv_zt = static_cast<float>(std::exp(lt.max - lse_t));
      const VF vlse_s = hn::Set(df, static_cast<float>(lse_s));
      const VF vlse_t = hn::Set(df, static_cast<float>(lse_t));
      const VF vinv_zs = hn::Set(df, inv_zs), vinv_zt = hn::Set(df, inv_zt);

      // pass 3
      SumF64 sum_g, sum_u, sum_v;
      for (int64_t j = 0; j < vpad; j += lanes) {
        Entry<VF> e;
        e.q = hn::Mul(hn::Load(df, es + j), vinv_zs);
        e.p = hn::Mul(hn::Load(df, et + j), vinv_zt);
        e.lq = hn::Sub(hn::Load(df, xs + j), vlse_s);
        e.lp = hn::Sub(hn::Load(df, xt + j), vlse_t);
        VF u;
        sum_g.Add(div.term(df, e, u));
        if (want_s) {
          sum_u.Add(u);
          hn::Store(u, df, xs + j);
        }
        if (want_t) {
          const VF vt = div.teacher(df, e);
          sum_v.Add(vt);
          hn::Store(vt, df, xt + j);
        }
      }
      const double s = sum_g.Total();
      const double value = div.finish(s);
      job.row_loss[i] = value;
      if (!want_s && !want_t) continue;
      // A token whose divergence is infinite (or NaN from an infinite teacher factor) gets no
      // gradient: its loss is +inf and the direction is undefined.
      if (!std::isfinite(value)) {
        ZeroRow(job.grad_student, i, v);
        ZeroRow(job.grad_teacher, i, v);
        continue;
      }
      const double common = div.slope(s) * t2 * job.grad_scale[i] / temperature;
      if (want_s)
        WriteGradRow(job.grad_student, i, v, xs, es, inv_zs, static_cast<float>(sum_u.Total()),
                     static_cast<float>(common), scratch);
      if (want_t)
        WriteGradRow(job.grad_teacher, i, v, xt, et, inv_zt, static_cast<float>(sum_v.Total()),
                     static_cast<float>(common), scratch);
    }
  }
  job.bad_student_row = bad_s.load();
  job.bad_teacher_row = bad_t.load();
  if (job.bad_student_row < 0 && masked_s.load() >= 0) {
    job.bad_student_row = masked_s.load();
    job.bad_student_all_masked = true;
  }
  if (job.bad_teacher_row < 0 && masked_t.load() >= 0) {
    job.bad_teacher_row = masked_t.load();
    job.bad_teacher_all_masked = true;
  }
}

}  // namespace

void RunDivergenceRows(detail::RowJob& job) {
  VisitDivergence(job.spec, [&](const auto& div) { RunRows(job, div); });
}

}  // namespace HWY_NAMESPACE
}  // namespace divkit
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace divkit {
HWY_EXPORT(RunDivergenceRows);
void detail::run_divergence_rows(RowJob& job) { HWY_DYNAMIC_DISPATCH(RunDivergenceRows)(job); }
}  // namespace divkit
#endif
