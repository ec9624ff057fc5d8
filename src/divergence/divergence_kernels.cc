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

#include "core/simd_math-inl.h"
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

// ---- pass 2: e = exp(x - max) into its own buffer; returns log sum e ------------

HWY_INLINE double ExpAndLogSum(const float* HWY_RESTRICT x, float max, int64_t vpad,
                               float* HWY_RESTRICT e) {
  const DF df;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(df));
  const VF vmax = hn::Set(df, max);
  RowSum sum;
  ForEachSumBlock(vpad, [&](int64_t begin, int64_t end) {
    VF acc = hn::Zero(df);
    for (int64_t j = begin; j < end; j += lanes) {
      const VF ej = SoftmaxExp(df, hn::Sub(hn::Load(df, x + j), vmax));
      hn::Store(ej, df, e + j);
      acc = hn::Add(acc, ej);
    }
    sum.AddBlock(acc);
  });
  return std::log(sum.total);
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
    if (reinterpret_cast<uintptr_t>(dst) % (lanes * sizeof(float)) == 0) {
      // Streaming stores: the gradient is not read again here, and they save the read-for-
      // ownership of every output line (a third of the memory traffic).
      for (; j + lanes <= v; j += lanes) hn::Stream(grad_at(j), df, dst + j);
    } else {
      for (; j + lanes <= v; j += lanes) hn::StoreU(grad_at(j), df, dst + j);
    }
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

struct RowBuffers {
  float* HWY_RESTRICT xs;  // student logits / T; overwritten by u
  const float* HWY_RESTRICT es;  // exp(xs - max)
  float* HWY_RESTRICT xt;  // teacher logits / T; overwritten by v when kTeacher
  const float* HWY_RESTRICT et;
  int64_t vpad;
};
struct Normalizers {
  VF lse_s, lse_t, inv_zs, inv_zt;
};

// pass 3: the divergence terms and the gradient factors u (and v), summed per row.
template <bool kTeacher, class Div>
HWY_INLINE void SumTerms(const Div& div, const RowBuffers& b, const Normalizers& n, RowSum& sum_g,
                         RowSum& sum_u, RowSum& sum_v) {
  const DF df;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(df));
  float* HWY_RESTRICT xs = b.xs;
  float* HWY_RESTRICT xt = b.xt;
  const float* HWY_RESTRICT es = b.es;
  const float* HWY_RESTRICT et = b.et;
  const VF lse_s = n.lse_s, lse_t = n.lse_t, inv_zs = n.inv_zs, inv_zt = n.inv_zt;
  ForEachSumBlock(b.vpad, [&](int64_t begin, int64_t end) {
    VF acc_g = hn::Zero(df), acc_u = hn::Zero(df), acc_v = hn::Zero(df);
    for (int64_t j = begin; j < end; j += lanes) {
      Entry<VF> e;
      e.q = hn::Mul(hn::Load(df, es + j), inv_zs);
      e.p = hn::Mul(hn::Load(df, et + j), inv_zt);
      e.lq = hn::Sub(hn::Load(df, xs + j), lse_s);
      e.lp = hn::Sub(hn::Load(df, xt + j), lse_t);
      VF u;
      acc_g = hn::Add(acc_g, div.term(df, e, u));
      acc_u = hn::Add(acc_u, u);
      hn::Store(u, df, xs + j);
      if constexpr (kTeacher) {
        const VF v = div.teacher(df, e);
        acc_v = hn::Add(acc_v, v);
        hn::Store(v, df, xt + j);
      }
    }
    sum_g.AddBlock(acc_g);
    sum_u.AddBlock(acc_u);
    if constexpr (kTeacher) sum_v.AddBlock(acc_v);
  });
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
      RowSum sum_g, sum_u, sum_v;
      const RowBuffers buf{xs, es, xt, et, vpad};
      const Normalizers norm{vlse_s, vlse_t, vinv_zs, vinv_zt};
      if (want_t)
        SumTerms<true>(div, buf, norm, sum_g, sum_u, sum_v);
      else
        SumTerms<false>(div, buf, norm, sum_g, sum_u, sum_v);
      const double s = sum_g.total;
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
        WriteGradRow(job.grad_student, i, v, xs, es, inv_zs, static_cast<float>(sum_u.total),
                     static_cast<float>(common), scratch);
      if (want_t)
        WriteGradRow(job.grad_teacher, i, v, xt, et, inv_zt, static_cast<float>(sum_v.total),
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
