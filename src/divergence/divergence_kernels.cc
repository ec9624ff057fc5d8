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

struct RowSoftmax {
  float max;         // max of x = logits / T (-inf if every entry is masked)
  double log_sum;    // log sum_j exp(x_j - max)
  bool non_finite;   // a NaN or +inf in x
};

// Passes 1 and 2, fused per block of kRowSumBlock vectors so that the block is exponentiated
// while it is in L1: x = src / T into x[0, V) (-inf in the padding [V, Vpad)), and
// e = exp(x - running max). A block exponentiated before the max rose is rescaled at the end
// (rarely more than a few blocks); the sum is rescaled as the max rises. The order of
// operations is fixed per row, so results do not depend on threads.
template <typename T>
RowSoftmax LoadSoftmaxRowTyped(const T* HWY_RESTRICT src, int64_t v, int64_t vpad, float inv_t,
                               float* HWY_RESTRICT x, float* HWY_RESTRICT e,
                               float* HWY_RESTRICT block_max) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  const DF df;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(df));
  const int64_t block_len = kRowSumBlock * lanes;
  // Entries [0, vfull) load as whole vectors; the rest is converted one by one.
  const int64_t vfull = std::is_same_v<T, double> ? 0 : v / lanes * lanes;
  const VF scale = hn::Set(df, inv_t);
  const VF inf = hn::Set(df, kInf);
  float run_max = -kInf;
  double sum = 0.0;
  bool non_finite = false;
  int64_t block = 0;
  for (int64_t begin = 0; begin < vpad; begin += block_len, ++block) {
    const int64_t end = std::min(begin + block_len, vpad);
    const int64_t vec_end = std::min(end, vfull);
    VF vmax = hn::Set(df, -kInf);
    auto bad = hn::Lt(inf, inf);  // all false
    int64_t j = begin;
    if constexpr (!std::is_same_v<T, double>) {
      for (; j < vec_end; j += lanes) {
        const VF xj = hn::Mul(LoadAsFloat(df, src + j), scale);
        bad = hn::Or(bad, hn::Not(hn::Lt(xj, inf)));  // NaN compares false
        vmax = hn::Max(vmax, xj);
        hn::Store(xj, df, x + j);
      }
    }
    for (; j < end; j += lanes) {  // fp64 input, or the last partial vector: padded with -inf
      for (int64_t k = j; k < j + lanes; ++k) x[k] = k < v ? ScalarToFloat(src[k]) * inv_t : -kInf;
      const VF xj = hn::Load(df, x + j);
      bad = hn::Or(bad, hn::Not(hn::Lt(xj, inf)));
      vmax = hn::Max(vmax, xj);
    }
    non_finite |= !hn::AllFalse(df, bad);
    const float bmax = hn::GetLane(hn::MaxOfLanes(df, vmax));
    if (bmax > run_max) {
      if (sum != 0.0) sum *= std::exp(static_cast<double>(run_max) - bmax);
      run_max = bmax;
    }
    block_max[block] = run_max;
    if (run_max == -kInf || non_finite) {  // nothing to exponentiate yet, or a bad row
      for (j = begin; j < end; j += lanes) hn::Store(hn::Zero(df), df, e + j);
      continue;
    }
    const VF vm = hn::Set(df, run_max);
    VF acc = hn::Zero(df);
    for (j = begin; j < end; j += lanes) {
      const VF ej = SoftmaxExp(df, hn::Sub(hn::Load(df, x + j), vm));
      hn::Store(ej, df, e + j);
      acc = hn::Add(acc, ej);
    }
    RowSum block_sum;
    block_sum.AddBlock(acc);
    sum += block_sum.total;
  }
  if (run_max != -kInf && !non_finite) {
    // Blocks exponentiated against an older (smaller) max: bring them to the final one.
    block = 0;
    for (int64_t begin = 0; begin < vpad; begin += block_len, ++block) {
      const float ref = block_max[block];
      if (ref == run_max) continue;
      const int64_t end = std::min(begin + block_len, vpad);
      const VF f = hn::Set(df, static_cast<float>(std::exp(static_cast<double>(ref) - run_max)));
      for (int64_t j = begin; j < end; j += lanes) hn::Store(hn::Mul(hn::Load(df, e + j), f), df, e + j);
    }
  }
  return {run_max, std::log(sum), non_finite};
}

struct RowScan {
  bool non_finite;  // a NaN or +inf in src / T
  bool all_masked;  // every entry -inf
};

// The checks of LoadSoftmaxRow without its stores or exps: the probe before an in-place write.
template <typename T>
RowScan ScanRowTyped(const T* HWY_RESTRICT src, int64_t v, float inv_t) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  const DF df;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(df));
  const VF scale = hn::Set(df, inv_t), inf = hn::Set(df, kInf);
  VF vmax = hn::Set(df, -kInf);
  auto bad = hn::Lt(inf, inf);
  int64_t j = 0;
  if constexpr (!std::is_same_v<T, double>) {
    for (; j + lanes <= v; j += lanes) {
      const VF xj = hn::Mul(LoadAsFloat(df, src + j), scale);
      bad = hn::Or(bad, hn::Not(hn::Lt(xj, inf)));
      vmax = hn::Max(vmax, xj);
    }
  }
  bool non_finite = !hn::AllFalse(df, bad);
  float max = hn::GetLane(hn::MaxOfLanes(df, vmax));
  for (; j < v; ++j) {
    const float xj = ScalarToFloat(src[j]) * inv_t;
    non_finite |= !(xj < kInf);
    max = std::max(max, xj);
  }
  return {non_finite, max == -kInf};
}

RowScan ScanRow(const RowInput& in, int64_t row, int64_t v, float inv_t) {
  const int64_t offset = row * in.row_stride;
  switch (in.dtype) {
    case DType::f32: return ScanRowTyped(static_cast<const float*>(in.data) + offset, v, inv_t);
    case DType::bf16:
      return ScanRowTyped(static_cast<const hwy::bfloat16_t*>(in.data) + offset, v, inv_t);
    case DType::f16:
      return ScanRowTyped(static_cast<const hwy::float16_t*>(in.data) + offset, v, inv_t);
    default: return ScanRowTyped(static_cast<const double*>(in.data) + offset, v, inv_t);
  }
}

RowSoftmax LoadSoftmaxRow(const RowInput& in, int64_t row, int64_t v, int64_t vpad, float inv_t,
                          float* HWY_RESTRICT x, float* HWY_RESTRICT e,
                          float* HWY_RESTRICT block_max) {
  const int64_t offset = row * in.row_stride;
  switch (in.dtype) {
    case DType::f32:
      return LoadSoftmaxRowTyped(static_cast<const float*>(in.data) + offset, v, vpad, inv_t, x,
                                 e, block_max);
    case DType::bf16:
      return LoadSoftmaxRowTyped(static_cast<const hwy::bfloat16_t*>(in.data) + offset, v, vpad,
                                 inv_t, x, e, block_max);
    case DType::f16:
      return LoadSoftmaxRowTyped(static_cast<const hwy::float16_t*>(in.data) + offset, v, vpad,
                                 inv_t, x, e, block_max);
    default:
      return LoadSoftmaxRowTyped(static_cast<const double*>(in.data) + offset, v, vpad, inv_t, x,
                                 e, block_max);
  }
}

// ---- pass 4: write a gradient row in the output dtype ---------------------------------------

// Writes row `row` of `out` from grad_at(j), the fp32 gradient vector at columns [j, j+lanes).
// fp32 is stored directly; other dtypes go through the fp32 scratch row and are rounded to
// nearest even.
template <class GradAt>
HWY_INLINE void WriteGradRow(const RowOutput& out, int64_t row, int64_t v, const GradAt& grad_at,
                             float* HWY_RESTRICT scratch) {
  const DF df;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(df));
  if (out.dtype == DType::f32) {
    float* HWY_RESTRICT dst = static_cast<float*>(out.data) + row * out.row_stride;
    int64_t j = 0;
    if (reinterpret_cast<uintptr_t>(dst) % (lanes * sizeof(float)) == 0) {
      // Streaming stores: the gradient is not read again here, and they save the read-for-
      // ownership of every output line (a quarter of the memory traffic).
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

// g_j = scale * (u_j - q_j * sum_u), q_j = e_j / Z: the softmax chain rule.
HWY_INLINE void WriteChainRuleGrad(const RowOutput& out, int64_t row, int64_t v,
                                   const float* HWY_RESTRICT u, const float* HWY_RESTRICT e,
                                   float inv_z, float sum_u, float scale,
                                   float* HWY_RESTRICT scratch) {
  const DF df;
  const VF vscale = hn::Set(df, scale);
  const VF vqsum = hn::Set(df, inv_z * sum_u);  // q_j * sum_u = e_j * (sum_u / Z)
  WriteGradRow(out, row, v, [&](int64_t j) {
    return hn::Mul(vscale, hn::NegMulAdd(hn::Load(df, e + j), vqsum, hn::Load(df, u + j)));
  }, scratch);
}

// g_j = scale * (q_j - p_j), the chain rule when u = -p (sum u = -1).
HWY_INLINE void WriteMinusPGrad(const RowOutput& out, int64_t row, int64_t v,
                                const float* HWY_RESTRICT es, float inv_zs,
                                const float* HWY_RESTRICT et, float inv_zt, float scale,
                                float* HWY_RESTRICT scratch) {
  const DF df;
  const VF qs = hn::Set(df, scale * inv_zs), ps = hn::Set(df, scale * inv_zt);
  WriteGradRow(out, row, v, [&](int64_t j) {
    return hn::MulSub(hn::Load(df, es + j), qs, hn::Mul(hn::Load(df, et + j), ps));
  }, scratch);
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
  const int64_t block_len = kRowSumBlock * lanes;
  float* HWY_RESTRICT xs = b.xs;
  float* HWY_RESTRICT xt = b.xt;
  const float* HWY_RESTRICT es = b.es;
  const float* HWY_RESTRICT et = b.et;
  const VF lse_s = n.lse_s, lse_t = n.lse_t, inv_zs = n.inv_zs, inv_zt = n.inv_zt;
  for (int64_t begin = 0; begin < b.vpad; begin += block_len) {
    const int64_t end = std::min(begin + block_len, b.vpad);
    VF acc_g = hn::Zero(df), acc_u = hn::Zero(df), acc_v = hn::Zero(df);
    for (int64_t j = begin; j < end; j += lanes) {
      Entry<VF> e;
      e.q = hn::Mul(hn::Load(df, es + j), inv_zs);
      e.p = hn::Mul(hn::Load(df, et + j), inv_zt);
      e.lq = hn::Sub(hn::Load(df, xs + j), lse_s);
      e.lp = hn::Sub(hn::Load(df, xt + j), lse_t);
      VF u;
      acc_g = hn::Add(acc_g, div.term(df, e, u));
      if constexpr (!Div::kStudentFactorIsMinusP) {
        acc_u = hn::Add(acc_u, u);
        hn::Store(u, df, xs + j);
      }
      if constexpr (kTeacher) {
        const VF v = div.teacher(df, e);
        acc_v = hn::Add(acc_v, v);
        hn::Store(v, df, xt + j);
      }
    }
    sum_g.AddBlock(acc_g);
    if constexpr (!Div::kStudentFactorIsMinusP) sum_u.AddBlock(acc_u);
    if constexpr (kTeacher) sum_v.AddBlock(acc_v);
  }
}

// Below this many logits per call (student rows x V) the kernel stays single-threaded.
constexpr int64_t kMinParallelEntries = 1 << 16;

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

  // Small problems run on the calling thread: waking a team costs more than the work.
  const bool parallel = job.num_threads > 1 && n > 1 && n * vpad >= kMinParallelEntries;
#pragma omp parallel num_threads(job.num_threads) if (parallel)
  {
    // The row block: xs, es, xt, et (and a scratch row for non-fp32 gradient output).
    const int64_t nbuf = (want_s || want_t) ? 5 : 4;
    const int64_t nblocks = vpad / (kRowSumBlock * lanes) + 1;
    hwy::AlignedFreeUniquePtr<float[]> block =
        hwy::AllocateAligned<float>(static_cast<size_t>(nbuf * vpad + nblocks));
    float* xs = block.get();
    float* es = xs + vpad;
    float* xt = es + vpad;
    float* et = xt + vpad;
    float* scratch = nbuf == 5 ? et + vpad : nullptr;
    float* block_max = xs + nbuf * vpad;

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
      if (job.check_only) {
        const RowScan cs = ScanRow(job.student, i, v, inv_t);
        const RowScan ct = ScanRow(job.teacher, i, v, inv_t);
        if (cs.non_finite) RecordBad(bad_s, i);
        else if (cs.all_masked) RecordBad(masked_s, i);
        if (ct.non_finite) RecordBad(bad_t, i);
        else if (ct.all_masked) RecordBad(masked_t, i);
        continue;
      }
      const RowSoftmax ls = LoadSoftmaxRow(job.student, i, v, vpad, inv_t, xs, es, block_max);
      const RowSoftmax lt = LoadSoftmaxRow(job.teacher, i, v, vpad, inv_t, xt, et, block_max);
      bool skip = false;
      if (ls.non_finite) RecordBad(bad_s, i), skip = true;
      if (lt.non_finite) RecordBad(bad_t, i), skip = true;
      if (!ls.non_finite && ls.max == -std::numeric_limits<float>::infinity())
        RecordBad(masked_s, i), skip = true;
      if (!lt.non_finite && lt.max == -std::numeric_limits<float>::infinity())
        RecordBad(masked_t, i), skip = true;
      if (skip) continue;

      const double lse_s = ls.max + ls.log_sum;
      const double lse_t = lt.max + lt.log_sum;
      const float inv_zs = static_cast<float>(std::exp(-ls.log_sum));  // 1 / sum es
      const float inv_zt = static_cast<float>(std::exp(-lt.log_sum));
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
      if (want_s) {
        if constexpr (Div::kStudentFactorIsMinusP)
          WriteMinusPGrad(job.grad_student, i, v, es, inv_zs, et, inv_zt,
                          static_cast<float>(common), scratch);
        else
          WriteChainRuleGrad(job.grad_student, i, v, xs, es, inv_zs,
                             static_cast<float>(sum_u.total), static_cast<float>(common), scratch);
      }
      if (want_t)
        WriteChainRuleGrad(job.grad_teacher, i, v, xt, et, inv_zt, static_cast<float>(sum_v.total),
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
