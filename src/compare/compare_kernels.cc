// The row kernel of compare_rows (include/divkit/compare.h for the formulas), in float64
// vectors, compiled once per SIMD target (Highway foreach_target) and chosen at run time.
//
// Per row, each side (base, test) with a per-thread buffer e of V doubles:
//   pass 1  read the row (any dtype, or llama.cpp's uint16 rows) block by block into an L1
//           block of doubles; track NaN/+inf and the running max m; e = exp(x - m) with the
//           max known so far, summed (the sum rescaled when the max rises; the block's max is
//           kept so that pass 2 rescales its e with one scalar exp per block). A llama.cpp
//           base needs no sum: its rows are log-probs already.
//   pass 2  read the row again: log p = (x - m) - log s, p = e * exp(m_block - m) / s (or, for a
//           llama.cpp base, log p = x and p = exp(x), 0 at or below the floor); the KL, JS and
//           TVD terms summed in float64 lanes; the first index of each side's max (argmax).
//   then    the entries at the base top token and the token ids, as scalars.
// So each row is read from the caller's memory twice and costs two vector exps and one vector
// log per entry. Rows are independent and spread over threads (dynamic schedule); a row's
// arithmetic does not depend on the thread, so results do not depend on the thread count.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "compare/compare_job.h"
#include "core/dtype.h"
#include "core/element.h"
#include "hwy/aligned_allocator.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "compare/compare_kernels.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep

#include "hwy/contrib/math/math-inl.h"
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace divkit {
namespace HWY_NAMESPACE {
namespace {

namespace hn = hwy::HWY_NAMESPACE;
using detail::CompareJob;
using detail::CompareSide;
using DD = hn::ScalableTag<double>;
using VD = hn::Vec<DD>;

constexpr double kInf = std::numeric_limits<double>::infinity();
// Entries per block: a block of doubles per side stays in L1 between its loads and its math.
constexpr int64_t kBlock = 512;

// Entries [j0, j0 + count) of row i as doubles into dst, padded with -inf up to `padded`.
void LoadBlock(const CompareSide& s, int64_t i, int64_t j0, int64_t count, int64_t padded,
               double* HWY_RESTRICT dst) {
  if (s.q != nullptr) {
    // llama.cpp: float32 scale and min_log_prob, then the quantized values; decoded in float32
    // (multiply, then add: this file is compiled without FMA contraction) as llama.cpp does.
    const uint16_t* row = s.q + i * s.q_stride;
    float scale, lo;
    std::memcpy(&scale, row, 4);
    std::memcpy(&lo, row + 2, 4);
    const uint16_t* u = row + 4 + j0;
    for (int64_t j = 0; j < count; ++j) {
      float f = static_cast<float>(u[j]) * scale;
      f = f + lo;
      dst[j] = f;
    }
  } else {
    const TensorView& t = s.view;
    const char* base = static_cast<const char*>(t.data);
    const int64_t off = i * t.strides[0] + j0;
    switch (t.dtype) {
      case DType::f32: {
        const float* x = reinterpret_cast<const float*>(base) + off;
        for (int64_t j = 0; j < count; ++j) dst[j] = x[j];
        break;
      }
      case DType::f64: {
        const double* x = reinterpret_cast<const double*>(base) + off;
        for (int64_t j = 0; j < count; ++j) dst[j] = x[j];
        break;
      }
      case DType::f16: {
        const uint16_t* x = reinterpret_cast<const uint16_t*>(base) + off;
        for (int64_t j = 0; j < count; ++j) dst[j] = dtype::f16_to_f32(x[j]);
        break;
      }
      default: {  // bf16 (the checks admit float dtypes only)
        const uint16_t* x = reinterpret_cast<const uint16_t*>(base) + off;
        for (int64_t j = 0; j < count; ++j) dst[j] = dtype::bf16_to_f32(x[j]);
        break;
      }
    }
  }
  for (int64_t j = count; j < padded; ++j) dst[j] = -kInf;
}

// Lanes added in a fixed order (the result depends on the SIMD target only).
double Total(VD v) {
  const DD d;
  alignas(64) double lanes[hn::MaxLanes(d)];
  hn::Store(v, d, lanes);
  double s = 0.0;
  for (size_t k = 0; k < hn::Lanes(d); ++k) s += lanes[k];
  return s;
}

// One side's pass-1 results.
struct SideStats {
  double max = -kInf;  // of the row's entries (-inf: every entry masked)
  double log_sum = 0;  // log sum_j exp(x_j - max); 0 for log-prob rows
  double sum = 1;      // sum_j exp(x_j - max)
  bool bad = false;    // a NaN or +inf
};

// Thread-local buffers.
struct RowBuffers {
  hwy::AlignedFreeUniquePtr<double[]> xb, xt, eb, et;
  std::vector<double> mb, mt;  // each block's running max when it was exponentiated
  explicit RowBuffers(int64_t v) {
    const int64_t blocks = (v + kBlock - 1) / kBlock;
    xb = hwy::AllocateAligned<double>(kBlock);
    xt = hwy::AllocateAligned<double>(kBlock);
    eb = hwy::AllocateAligned<double>(blocks * kBlock);
    et = hwy::AllocateAligned<double>(blocks * kBlock);
    mb.resize(blocks);
    mt.resize(blocks);
  }
};

// Pass 1 of one side of row i.
SideStats Pass1(const CompareSide& s, int64_t i, int64_t v, double* HWY_RESTRICT x,
                double* HWY_RESTRICT e, double* HWY_RESTRICT block_max) {
  const DD d;
  const size_t L = hn::Lanes(d);
  const VD inf = hn::Set(d, kInf);
  SideStats st;
  st.sum = 0.0;
  auto bad = hn::Lt(inf, inf);  // all false
  for (int64_t j0 = 0, k = 0; j0 < v; j0 += kBlock, ++k) {
    const int64_t count = std::min(kBlock, v - j0);
    const int64_t padded = (count + L - 1) / L * L;
    LoadBlock(s, i, j0, count, padded, x);
    VD vmax = hn::Set(d, -kInf);
    for (int64_t j = 0; j < padded; j += L) {
      const VD xv = hn::Load(d, x + j);
      bad = hn::Or(bad, hn::Not(hn::Lt(xv, inf)));
      vmax = hn::Max(vmax, xv);
    }
    const double bm = hn::GetLane(hn::MaxOfLanes(d, vmax));
    if (s.logprobs) {
      st.max = std::max(st.max, bm);
      continue;
    }
    if (bm > st.max) {
      if (st.max > -kInf) st.sum *= std::exp(st.max - bm);
      st.max = bm;
    }
    block_max[k] = st.max;
    double* HWY_RESTRICT ek = e + j0;
    if (st.max == -kInf) {
      for (int64_t j = 0; j < padded; ++j) ek[j] = 0.0;
      continue;
    }
    const VD m = hn::Set(d, st.max);
    VD acc = hn::Zero(d);
    for (int64_t j = 0; j < padded; j += L) {
      const VD ev = hn::Exp(d, hn::Sub(hn::Load(d, x + j), m));
      hn::Store(ev, d, ek + j);
      acc = hn::Add(acc, ev);
    }
    st.sum += Total(acc);
  }
  st.bad = !hn::AllFalse(d, bad);
  if (!s.logprobs) st.log_sum = std::log(st.sum);
  return st;
}

// log p of entry j of row i (a scalar read).
double LogProbAt(const CompareSide& s, const SideStats& st, int64_t i, int64_t j) {
  double x;
  LoadBlock(s, i, j, 1, 1, &x);
  return s.logprobs ? x : (x - st.max) - st.log_sum;
}

struct RowResult {
  double kl = 0, js = 0, tvd = 0;
  int64_t top_b = -1, top_t = -1;
};

// Pass 2 of row i, both sides.
RowResult Pass2(const CompareJob& job, int64_t i, const SideStats& sb, const SideStats& stt,
                RowBuffers& buf) {
  const DD d;
  const size_t L = hn::Lanes(d);
  const int64_t v = job.v;
  const VD zero = hn::Zero(d), half = hn::Set(d, 0.5);
  const VD mb = hn::Set(d, sb.max), mt = hn::Set(d, stt.max);
  const VD lsb = hn::Set(d, sb.log_sum), lst = hn::Set(d, stt.log_sum);
  const VD floor = hn::Set(d, job.base.floor);
  const bool base_lp = job.base.logprobs;
  VD kl = zero, js = zero, tvd = zero;
  RowResult r;
  for (int64_t j0 = 0, k = 0; j0 < v; j0 += kBlock, ++k) {
    const int64_t count = std::min(kBlock, v - j0);
    const int64_t padded = (count + L - 1) / L * L;
    double* HWY_RESTRICT xb = buf.xb.get();
    double* HWY_RESTRICT xt = buf.xt.get();
    LoadBlock(job.base, i, j0, count, padded, xb);
    LoadBlock(job.test, i, j0, count, padded, xt);
    // p = e * exp(m_block - m) / s; the factor is 1 / s once the row's max has been seen.
    const VD fb = hn::Set(d, base_lp ? 0.0 : std::exp(buf.mb[k] - sb.max) / sb.sum);
    const VD ft = hn::Set(d, std::exp(buf.mt[k] - stt.max) / stt.sum);
    const double* HWY_RESTRICT eb = buf.eb.get() + j0;
    const double* HWY_RESTRICT et = buf.et.get() + j0;
    for (int64_t j = 0; j < padded; j += L) {
      const VD xbv = hn::Load(d, xb + j), xtv = hn::Load(d, xt + j);
      if (r.top_b < 0) {
        const intptr_t at = hn::FindFirstTrue(d, hn::Eq(xbv, mb));
        if (at >= 0) r.top_b = j0 + j + at;
      }
      if (r.top_t < 0) {
        const intptr_t at = hn::FindFirstTrue(d, hn::Eq(xtv, mt));
        if (at >= 0) r.top_t = j0 + j + at;
      }
      VD lb, p;
      if (base_lp) {
        lb = xbv;
        p = hn::IfThenZeroElse(hn::Le(xbv, floor), hn::Exp(d, xbv));
      } else {
        lb = hn::Sub(hn::Sub(xbv, mb), lsb);
        p = hn::Mul(hn::Load(d, eb + j), fb);
      }
      const VD lt = hn::Sub(hn::Sub(xtv, mt), lst);
      const VD q = hn::Mul(hn::Load(d, et + j), ft);
      const auto pm = hn::Gt(p, zero), qm = hn::Gt(q, zero);
      kl = hn::Add(kl, hn::IfThenElseZero(pm, hn::Mul(p, hn::Sub(lb, lt))));
      tvd = hn::Add(tvd, hn::Abs(hn::Sub(p, q)));
      // log m is garbage where p = q = 0; both terms are masked there.
      const VD logm = hn::Log(d, hn::Mul(hn::Add(p, q), half));
      js = hn::Add(js, hn::IfThenElseZero(pm, hn::Mul(p, hn::Sub(lb, logm))));
      js = hn::Add(js, hn::IfThenElseZero(qm, hn::Mul(q, hn::Sub(lt, logm))));
    }
  }
  r.kl = Total(kl);
  r.js = 0.5 * Total(js);
  r.tvd = 0.5 * Total(tvd);
  return r;
}

}  // namespace

void RunCompareRows(CompareJob& job) {
  const int64_t n = job.n, v = job.v;
  const bool tokens = job.tokens.defined();
  int64_t first_bad[2] = {n, n};
  bool empty_at_first[2] = {false, false};
  const bool parallel = job.num_threads > 1 && n > 1;
#pragma omp parallel num_threads(job.num_threads) if (parallel)
  {
    RowBuffers buf(v);
    int64_t my_bad[2] = {n, n};
    bool my_empty[2] = {false, false};
    // Dynamic: a row is a millisecond of work, and on a shared machine a thread that is
    // descheduled would otherwise hold the others at the end of the call.
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < n; ++i) {
      const SideStats sb = Pass1(job.base, i, v, buf.xb.get(), buf.eb.get(), buf.mb.data());
      const SideStats st = Pass1(job.test, i, v, buf.xt.get(), buf.et.get(), buf.mt.data());
      bool skip = false;
      const SideStats* sides[2] = {&sb, &st};
      for (int s = 0; s < 2; ++s) {
        const bool empty = !sides[s]->bad && sides[s]->max == -kInf;
        if ((sides[s]->bad || empty) && i < my_bad[s]) {
          my_bad[s] = i;
          my_empty[s] = empty;
        }
        skip |= sides[s]->bad || empty;
      }
      if (skip) continue;
      const RowResult r = Pass2(job, i, sb, st, buf);
      const double lbk = LogProbAt(job.base, sb, i, r.top_b);
      const double ltk = LogProbAt(job.test, st, i, r.top_b);
      elem::set(job.out.kl, i, r.kl);
      elem::set(job.out.js, i, r.js);
      elem::set(job.out.tvd, i, r.tvd);
      elem::set(job.out.delta_p, i, std::exp(ltk) - std::exp(lbk));
      elem::set(job.out.top1, i, r.top_b == r.top_t ? 1.0 : 0.0);
      if (tokens) {
        const int64_t t = elem::index(job.tokens, i);
        const double lbt = LogProbAt(job.base, sb, i, t);
        const double ltt = LogProbAt(job.test, st, i, t);
        elem::set(job.out.nll, i, -ltt);
        elem::set(job.out.nll_base, i, -lbt);
        elem::set(job.out.delta_p_next, i, std::exp(ltt) - std::exp(lbt));
      }
    }
#pragma omp critical(divkit_compare_bad_rows)
    for (int s = 0; s < 2; ++s) {
      if (my_bad[s] < first_bad[s]) {
        first_bad[s] = my_bad[s];
        empty_at_first[s] = my_empty[s];
      }
    }
  }
  for (int s = 0; s < 2; ++s) {
    if (first_bad[s] < n) {
      job.bad_row[s] = first_bad[s];
      job.bad_is_empty[s] = empty_at_first[s];
    }
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace divkit
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace divkit {
HWY_EXPORT(RunCompareRows);
void detail::run_compare_rows(CompareJob& job) { HWY_DYNAMIC_DISPATCH(RunCompareRows)(job); }
}  // namespace divkit
#endif
