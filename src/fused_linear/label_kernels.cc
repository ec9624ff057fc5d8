// Label-loss row kernels (see label_kernels.h), compiled once per SIMD target (Highway) and
// dispatched at run time. Row sums in fp64 blocks, in a fixed order: results do not depend on
// the thread count.
#include "fused_linear/label_kernels.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "fused_linear/label_kernels.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep

#include "core/simd_math-inl.h"
#include "fused_linear/label_scalar.h"
#include "hwy/contrib/math/math-inl.h"
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace divkit {
namespace HWY_NAMESPACE {
namespace {

namespace hn = hwy::HWY_NAMESPACE;
using DF = hn::ScalableTag<float>;
using VF = hn::Vec<DF>;
constexpr float kInf = std::numeric_limits<float>::infinity();

// Below this many logits per call the rows run on the calling thread.
constexpr int64_t kMinParallelEntries = 1 << 16;

// The vector part of a row is [0, vfull); the tail [vfull, v) is scalar.
struct RowSpan {
  int64_t lanes, vfull;
};
HWY_INLINE RowSpan Span(int64_t v) {
  const DF df;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(df));
  return {lanes, v / lanes * lanes};
}

// z = softcap(x) / T in place; returns the max and whether a NaN/+inf appeared. softcap(-inf) =
// -inf: a masked entry stays masked (tanh would give -softcap). When `masked` is given, it is
// set when the row has a masked entry (x = -inf).
HWY_INLINE float TransformAndMax(float* HWY_RESTRICT z, int64_t v, float inv_t, float softcap,
                                 bool& bad, bool* masked = nullptr) {
  const DF df;
  const RowSpan sp = Span(v);
  const bool transform = softcap > 0.0f || inv_t != 1.0f;
  const VF vinv_t = hn::Set(df, inv_t), vcap = hn::Set(df, softcap),
           vinv_cap = hn::Set(df, softcap > 0.0f ? 1.0f / softcap : 0.0f), inf = hn::Set(df, kInf),
           neg_inf = hn::Set(df, -kInf);
  VF vmax = hn::Set(df, -kInf);
  auto vbad = hn::Lt(inf, inf), vmasked = vbad;
  for (int64_t j = 0; j < sp.vfull; j += sp.lanes) {
    VF x = hn::LoadU(df, z + j);
    vbad = hn::Or(vbad, hn::Not(hn::Lt(x, inf)));
    if (masked) vmasked = hn::Or(vmasked, hn::Eq(x, neg_inf));
    if (transform) {
      if (softcap > 0.0f)
        x = hn::IfThenElse(hn::Eq(x, neg_inf), x,
                           hn::Mul(vcap, hn::Tanh(df, hn::Mul(x, vinv_cap))));
      x = hn::Mul(x, vinv_t);
      hn::StoreU(x, df, z + j);
    }
    vmax = hn::Max(vmax, x);
  }
  float m = hn::GetLane(hn::MaxOfLanes(df, vmax));
  bad = !hn::AllFalse(df, vbad);
  if (masked) *masked = !hn::AllFalse(df, vmasked);
  for (int64_t j = sp.vfull; j < v; ++j) {
    float x = z[j];
    if (!(x < kInf)) bad = true;
    if (masked && x == -kInf) *masked = true;
    if (transform) {
      if (softcap > 0.0f && x != -kInf) x = softcap * std::tanh(x / softcap);
      x *= inv_t;
      z[j] = x;
    }
    m = std::max(m, x);
  }
  return m;
}

// The sums of a row of z under a shift m: S = sum exp(z - m), sum exp(z - m) (z - m) (when
// want_ec; 0 * log 0 = 0 for masked entries), sum z (when want_z) and sum exp(z - m)^2 (when
// want_sq: the same exps squared); fp64 block sums in a fixed order. With unmasked_z, sum z is
// over the unmasked entries (z > -inf) and `unmasked` counts them (label smoothing spreads over
// them; the count is taken with or without want_z); without, sum z is over every entry.
struct RowSums {
  double e = 0.0, ec = 0.0, z = 0.0, sq = 0.0;
  int64_t unmasked = 0;
};
// When `keep` is given, exp(z - m) is stored there (it may be z itself).
HWY_INLINE RowSums SumRow(const float* z, int64_t v, float m, bool want_ec, bool want_z,
                          float* keep = nullptr, bool want_sq = false, bool unmasked_z = false) {
  const DF df;
  const RowSpan sp = Span(v);
  const VF vm = hn::Set(df, m);
  RowSum sum_e, sum_ez, sum_z, sum_sq;
  int64_t n_masked = 0;
  const VF neg_inf = hn::Set(df, -kInf);
  const int64_t block = kRowSumBlock * sp.lanes;
  for (int64_t begin = 0; begin < sp.vfull; begin += block) {
    const int64_t end = std::min(begin + block, sp.vfull);
    VF acc_e = hn::Zero(df), acc_ez = hn::Zero(df), acc_z = hn::Zero(df), acc_sq = hn::Zero(df);
    for (int64_t j = begin; j < end; j += sp.lanes) {
      const VF x = hn::LoadU(df, z + j);
      const VF c = hn::Sub(x, vm);
      const VF e = SoftmaxExp(df, c);
      if (keep) hn::StoreU(e, df, keep + j);
      acc_e = hn::Add(acc_e, e);
      // e * c with 0 where e = 0 (c = -inf for masked entries).
      if (want_ec)
        acc_ez = hn::Add(acc_ez, hn::IfThenZeroElse(hn::Eq(e, hn::Zero(df)), hn::Mul(e, c)));
      if (unmasked_z) {
        // A masked entry adds 0, the others themselves (a row without one: the same sum). The
        // count is taken without want_z too (label_rows's `unmasked` output alone).
        const auto is_masked = hn::Eq(x, neg_inf);
        n_masked += static_cast<int64_t>(hn::CountTrue(df, is_masked));
        if (want_z) acc_z = hn::Add(acc_z, hn::IfThenZeroElse(is_masked, x));
      } else if (want_z) {
        acc_z = hn::Add(acc_z, x);
      }
      if (want_sq) acc_sq = hn::MulAdd(e, e, acc_sq);
    }
    sum_e.AddBlock(acc_e);
    if (want_ec) sum_ez.AddBlock(acc_ez);
    if (want_z) sum_z.AddBlock(acc_z);
    if (want_sq) sum_sq.AddBlock(acc_sq);
  }
  RowSums out{sum_e.total, sum_ez.total, sum_z.total, sum_sq.total, 0};
  for (int64_t j = sp.vfull; j < v; ++j) {
    const double c = static_cast<double>(z[j]) - m;
    const double e = std::exp(c);
    out.e += e;
    if (e != 0.0) out.ec += e * c;
    if (!unmasked_z) out.z += z[j];
    else if (z[j] != -kInf) out.z += z[j];
    else ++n_masked;
    out.sq += e * e;
    if (keep) keep[j] = static_cast<float>(e);
  }
  out.unmasked = v - n_masked;
  return out;
}

// Whether y is the first index holding the row's max m (torch.argmax's tie rule).
HWY_INLINE bool IsFirstMax(const float* HWY_RESTRICT z, int64_t y, float m) {
  if (!(z[y] == m)) return false;
  const DF df;
  const RowSpan sp = Span(y);
  const VF vm = hn::Set(df, m);
  for (int64_t j = 0; j < sp.vfull; j += sp.lanes)
    if (!hn::AllFalse(df, hn::Eq(hn::LoadU(df, z + j), vm))) return false;
  for (int64_t j = sp.vfull; j < y; ++j)
    if (z[j] == m) return false;
  return true;
}

// counts[g] = the number of entries of z that are >= ts[g], for G thresholds in one pass over the
// row (one load per vector for all of them).
template <int G>
void CountAtLeast(const float* HWY_RESTRICT z, int64_t v, const float* ts, int64_t* counts) {
  const DF df;
  const RowSpan sp = Span(v);
  VF vt[G];
  int64_t c[G];
  for (int g = 0; g < G; ++g) {
    vt[g] = hn::Set(df, ts[g]);
    c[g] = 0;
  }
  for (int64_t j = 0; j < sp.vfull; j += sp.lanes) {
    const VF x = hn::LoadU(df, z + j);
    for (int g = 0; g < G; ++g) c[g] += static_cast<int64_t>(hn::CountTrue(df, hn::Ge(x, vt[g])));
  }
  for (int g = 0; g < G; ++g) {
    for (int64_t j = sp.vfull; j < v; ++j) c[g] += z[j] >= ts[g];
    counts[g] = c[g];
  }
}

// The k largest entries of a row of z (m >= every entry, finite) into out[0, k), in no particular
// order: the same multiset as std::nth_element over the whole row, at a fraction of its cost. Once
// at least k entries are >= t, the k largest are among them. t is the first of m - d,
// d = 1/2, 1, 2, 4, ..., 2^127 (then -inf: every entry) with at least k entries >= t; only those
// candidates are copied and partially sorted. The counts are monotone in d, so the first such d
// is found with several thresholds per pass over the row (one load per vector for all of
// them) instead of one pass per d: the same t as trying each d in turn, hence the same
// candidates in the same order. When that t leaves many more candidates than k, a refinement
// pass raises it inside its last doubling step (same k largest, fewer to sort; their order, and
// so the last bits of a sum over them, may differ). m_is_max: m is an entry of the row (its
// max), so that for k = 1 the answer is m itself, without a pass.
void TopK(const float* HWY_RESTRICT z, int64_t v, int64_t k, float m, bool m_is_max,
          std::vector<float>& out) {
  if (k == 1 && m_is_max) {
    out.assign(1, m);
    return;
  }
  float t = -kInf;
  int64_t count = v;
  if (k < v) {
    // The thresholds, as the one-d-at-a-time search computes them.
    float td[129];
    int nd = 0;
    for (float d = 0.5f; d < kInf; d *= 2.0f) td[nd++] = m - d;
    // Invariant: fewer than k entries are >= td[i] for i < lo; at least k (count_hi of them)
    // are >= td[hi] (hi = nd: -inf, every entry).
    int lo = 0, hi = nd;
    int64_t count_hi = v;
    for (int pass = 0; lo < hi; ++pass) {
      // Consecutive d's first, in groups of 1, 1, 1, 2, 4, 8 (d = 1/2 to 2^15, the range of
      // real logits: the first three passes are the one-d search's, the next ones count several
      // d's where it took one pass each), then 8 spread over what is left (k above the number
      // of finite entries, or a huge spread: at most 9 passes where one-d took up to 129).
      constexpr int kMax = 8;
      static constexpr int kConsecutive[] = {1, 1, 1, 2, 4, 8};
      constexpr int kPasses = static_cast<int>(sizeof(kConsecutive) / sizeof(int));
      const int span = hi - lo;
      int idx[kMax];
      int g = 0;
      int width = kMax;
      if (pass < kPasses) {
        width = kConsecutive[pass];
        for (; g < width && g < span; ++g) idx[g] = lo + g;
      } else {
        // want indices spread over [lo, hi), increasing and distinct (span >= want; span < 9
        // gives lo, lo + 1, ..., hi - 1).
        const int want = std::min(kMax, span);
        for (; g < want; ++g) idx[g] = lo + (g + 1) * span / (want + 1);
      }
      float ts[kMax] = {};
      int64_t c[kMax] = {};
      for (int q = 0; q < g; ++q) ts[q] = td[idx[q]];
      for (int q = g; q < width; ++q) ts[q] = ts[g - 1];  // padding: repeats the last threshold
      if (width == 1) CountAtLeast<1>(z, v, ts, c);
      else if (width == 2) CountAtLeast<2>(z, v, ts, c);
      else if (width == 4) CountAtLeast<4>(z, v, ts, c);
      else CountAtLeast<8>(z, v, ts, c);
      // The first counted threshold with k entries closes the interval from above; the one
      // before it (or the last, if none has) from below.
      int q = 0;
      while (q < g && c[q] < k) ++q;
      if (q < g) {
        hi = idx[q];
        count_hi = c[q];
      }
      if (q > 0) lo = idx[q - 1] + 1;
    }
    if (hi < nd) {
      t = td[hi];
      count = count_hi;
      // The doubling overshoots: up to all of [td[hi], td[hi - 1]) are candidates, where the
      // copy and nth_element cost far more than a count. When they are many, one more pass
      // counts 7 thresholds evenly spaced inside that interval and keeps the first with k
      // entries: the same k largest, from fewer candidates.
      if (hi > 0 && count > 4 * k + v / 16) {
        constexpr int kSteps = 8;
        const float a = td[hi - 1], step = (td[hi - 1] - td[hi]) / kSteps;
        float ts[kSteps] = {};
        int64_t c[kSteps] = {};
        for (int q = 0; q < kSteps - 1; ++q) ts[q] = a - static_cast<float>(q + 1) * step;
        ts[kSteps - 1] = t;
        CountAtLeast<kSteps>(z, v, ts, c);
        for (int q = 0; q < kSteps; ++q)
          if (c[q] >= k && ts[q] >= t) {
            t = ts[q];
            count = c[q];
            break;
          }
      }
    }
  }
  // Candidates are few: a vector test skips the vectors without one. (No CompressStore: AVX-512's
  // compress to memory is microcoded and slow on AMD Zen 4.)
  const DF df;
  const RowSpan sp = Span(v);
  out.resize(static_cast<size_t>(count));
  const VF vt = hn::Set(df, t);
  size_t w = 0;
  for (int64_t j = 0; j < sp.vfull; j += sp.lanes) {
    if (hn::AllFalse(df, hn::Ge(hn::LoadU(df, z + j), vt))) continue;
    for (int64_t l = j; l < j + sp.lanes; ++l)
      if (z[l] >= t) out[w++] = z[l];
  }
  for (int64_t j = sp.vfull; j < v; ++j)
    if (z[j] >= t) out[w++] = z[j];
  std::nth_element(out.begin(), out.begin() + (k - 1), out.end(), std::greater<float>());
}

// The fused gradient of LabelForwardJob::coef over a row that holds e = exp(z - m), S = sum e.
void FusedGradRow(const detail::LabelForwardJob& job, int64_t i, float* HWY_RESTRICT z, double se,
                  double lse) {
  const DF df;
  const int64_t v = job.v;
  const RowSpan sp = Span(v);
  const float* HWY_RESTRICT add = job.add ? job.add + i * job.ldadd : nullptr;
  double a = 0.0, b = 0.0, c = 0.0, e = 0.0;
  job.coef(job.coef_ctx, i, lse, &a, &b, &c, &e);
  // (a p + c) / T with p = e / S.
  const float as = static_cast<float>(a / se) * job.inv_t, cs = static_cast<float>(c) * job.inv_t;
  const VF vas = hn::Set(df, as), vcs = hn::Set(df, cs);
  for (int64_t j = 0; j < sp.vfull; j += sp.lanes) {
    VF g = hn::MulAdd(vas, hn::LoadU(df, z + j), vcs);
    if (add) g = hn::Add(g, hn::LoadU(df, add + j));
    hn::StoreU(g, df, z + j);
  }
  for (int64_t j = sp.vfull; j < v; ++j) {
    float g = as * z[j] + cs;
    if (add) g += add[j];
    z[j] = g;
  }
  z[job.labels[i]] += static_cast<float>(b) * job.inv_t;
}

// dz/dx without the 1 / T under softcap, from z and vtc = T / softcap: 1 - (T z / softcap)^2 =
// 1 - tanh(x / softcap)^2, and 0 at a masked entry (z = -inf: r * r would be inf and turn its
// gradient into -inf or NaN), as label_scalar::cap_factor_of.
HWY_INLINE VF CapFactor(VF z, VF vtc) {
  const DF df;
  const VF r = hn::Mul(z, vtc);
  return hn::IfThenZeroElse(hn::Eq(z, hn::Set(df, -kInf)), hn::NegMulAdd(r, r, hn::Set(df, 1.0f)));
}

// The fused gradient of LabelForwardJob::coef when it needs z (softcap, entropy term): z holds the
// transformed logits, ex = exp(z - m) with S = sum ex, h the row's entropy. The same expressions
// as GradRow with p = ex / S in place of exp(z - lse).
void FusedGradRowKeepZ(const detail::LabelForwardJob& job, int64_t i, float* HWY_RESTRICT z,
                       const float* HWY_RESTRICT ex, double se, double lse, double h) {
  const DF df;
  const int64_t v = job.v;
  const RowSpan sp = Span(v);
  const float* HWY_RESTRICT add = job.add ? job.add + i * job.ldadd : nullptr;
  double a = 0.0, b = 0.0, c = 0.0, ee = 0.0;
  job.coef(job.coef_ctx, i, lse, &a, &b, &c, &ee);
  const float e = job.coef_entropy ? static_cast<float>(ee) : 0.0f;
  const bool cap = job.softcap > 0.0f;
  const float t_over_cap = cap ? (1.0f / job.inv_t) / job.softcap : 0.0f;
  const float inv_s = static_cast<float>(1.0 / se), flse = static_cast<float>(lse),
              fh = static_cast<float>(h), fa = static_cast<float>(a), fc = static_cast<float>(c);
  const VF vinv_s = hn::Set(df, inv_s), vlse = hn::Set(df, flse), va = hn::Set(df, fa),
           vc = hn::Set(df, fc), ve = hn::Set(df, e), vh = hn::Set(df, fh),
           vinv_t = hn::Set(df, job.inv_t), vtc = hn::Set(df, t_over_cap);
  const int64_t y = job.labels[i];
  const float y_z = z[y];
  // With `unmasked` (label smoothing over the unmasked entries) c skips the masked ones.
  const bool c_unmasked = job.unmasked != nullptr;
  const VF neg_inf = hn::Set(df, -kInf);
  for (int64_t j = 0; j < sp.vfull; j += sp.lanes) {
    const VF zj = hn::LoadU(df, z + j);
    const VF p = hn::Mul(hn::LoadU(df, ex + j), vinv_s);
    VF g = hn::MulAdd(va, p, c_unmasked ? hn::IfThenZeroElse(hn::Eq(zj, neg_inf), vc) : vc);
    // 0 where p = 0 (z - lse = -inf for masked entries).
    if (e != 0.0f)
      g = hn::MulAdd(hn::Mul(ve, p),
                     hn::IfThenZeroElse(hn::Eq(p, hn::Zero(df)), hn::Add(hn::Sub(zj, vlse), vh)),
                     g);
    if (cap) g = hn::Mul(g, CapFactor(zj, vtc));
    g = hn::Mul(g, vinv_t);
    if (add) g = hn::Add(g, hn::LoadU(df, add + j));
    hn::StoreU(g, df, z + j);
  }
  for (int64_t j = sp.vfull; j < v; ++j) {
    const float p = ex[j] * inv_s;
    float g = fa * p + fc;
    // p = 0 at a masked entry: 0 without c (kept apart from the expression above, whose
    // contraction to an fma would otherwise change).
    if (c_unmasked && z[j] == -kInf) g = 0.0f;
    if (e != 0.0f && p != 0.0f) g += e * p * ((z[j] - flse) + fh);
    if (cap) g *= label_scalar::cap_factor_of(z[j], t_over_cap);
    g *= job.inv_t;
    if (add) g += add[j];
    z[j] = g;
  }
  // The one-hot part: b at the label, with the label's own chain-rule factor.
  float dz = static_cast<float>(b);
  if (cap) dz *= label_scalar::cap_factor_of(y_z, t_over_cap);
  z[y] += dz * job.inv_t;
}

void ForwardRow(const detail::LabelForwardJob& job, int64_t i, std::vector<float>& scratch,
                std::vector<float>& ex, bool& bad) {
  float* HWY_RESTRICT z = job.z + i * job.ldz;
  const int64_t v = job.v;
  // A row with masked entries whose c goes to the unmasked ones only keeps z for the gradient.
  const bool fuse = job.coef != nullptr;
  bool masked = false;
  const float m = TransformAndMax(z, v, job.inv_t, job.softcap, bad,
                                  fuse && job.unmasked != nullptr ? &masked : nullptr);
  // m = +inf from finite logits: x / T overflowed fp32 (a tiny temperature); the row's sums would
  // be NaN (inf - inf), so the row is reported instead.
  if (bad || m == -kInf || m == kInf) {
    bad = true;
    return;
  }
  const bool keep_z = fuse && (job.softcap > 0.0f || job.coef_entropy || masked);
  const bool want_ent = job.entropy != nullptr || (fuse && job.coef_entropy);
  const int64_t y = job.labels[i];
  if (job.z_label) job.z_label[i] = z[y];
  // Before the fused sweep overwrites z with its exps.
  if (job.is_top1) job.is_top1[i] = IsFirstMax(z, y, m) ? 1.0 : 0.0;
  // The top-k values of z, selected while z is in cache and before the exps are written; their
  // mass once lse is known. No gradient flows through the mass.
  const int64_t k = job.topk_mass ? std::min(job.topk, v) : 0;
  if (k > 0) TopK(z, v, k, m, /*m_is_max=*/true, scratch);
  float* keep = nullptr;
  if (keep_z) {
    ex.resize(static_cast<size_t>(v));
    keep = ex.data();
  } else if (fuse) {
    keep = z;
  }
  const RowSums sums = SumRow(z, v, m, want_ent, job.mean_z != nullptr, keep,
                              job.log_sum_sq != nullptr, job.unmasked != nullptr);
  // The row's statistics from its sums: label_scalar.h, which the CUDA kernel uses too.
  const double se = sums.e;
  const double lse = label_scalar::row_lse(m, se);
  // H = -sum p log p = log S - sum e c / S with c = z - m.
  const double ent = want_ent ? label_scalar::row_entropy(se, sums.ec) : 0.0;
  if (job.lse) job.lse[i] = lse;
  if (job.unmasked) job.unmasked[i] = static_cast<double>(sums.unmasked);
  if (job.mean_z) job.mean_z[i] = label_scalar::row_mean(sums.z, job.unmasked ? sums.unmasked : v);
  if (job.entropy) job.entropy[i] = ent;
  if (job.log_sum_sq) job.log_sum_sq[i] = label_scalar::row_log_sum_sq(se, sums.sq);
  if (k > 0) {
    double mass = 0.0;
    for (int64_t j = 0; j < k; ++j) mass += label_scalar::topk_term(scratch[j], lse);
    job.topk_mass[i] = label_scalar::topk_finish(mass);
  }
  if (keep_z) FusedGradRowKeepZ(job, i, z, ex.data(), se, lse, ent);
  else if (fuse) FusedGradRow(job, i, z, se, lse);
}

// The vocabulary-parallel passes of LabelForwardJob (see label_kernels.h).
void ShardRow(const detail::LabelForwardJob& job, int64_t i, std::vector<float>& scratch) {
  float* HWY_RESTRICT z = job.z + i * job.ldz;
  const int64_t v = job.v;
  if (job.shard_max != nullptr) {
    bool bad = false;
    const float m = TransformAndMax(z, v, job.inv_t, job.softcap, bad);
    job.shard_max[i] = bad ? static_cast<double>(kInf) : static_cast<double>(m);
    return;
  }
  const RowSums sums = SumRow(z, v, static_cast<float>(job.shift[i]), true, true, nullptr, false,
                              job.unmasked != nullptr);
  double* part = job.partials + 4 * i;
  part[0] = sums.e;
  part[1] = sums.ec;
  part[2] = sums.z;
  if (job.unmasked) job.unmasked[i] = static_cast<double>(sums.unmasked);
  if (job.topk_z != nullptr) {
    const int64_t k = std::min(job.topk, v);
    // The global max bounds the shard's entries from above: TopK's thresholds start below it.
    const float m = static_cast<float>(job.shift[i]);
    if (std::isfinite(m)) {
      TopK(z, v, k, m, /*m_is_max=*/false, scratch);
    } else {
      scratch.assign(z, z + v);
      std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(),
                       std::greater<float>());
    }
    double* out = job.topk_z + i * job.topk;
    for (int64_t j = 0; j < job.topk; ++j) out[j] = j < k ? scratch[j] : -static_cast<double>(kInf);
  }
}

void GradRow(const detail::LabelGradJob& job, int64_t i) {
  const DF df;
  float* HWY_RESTRICT z = job.z + i * job.ldz;
  const float* HWY_RESTRICT add = job.add ? job.add + i * job.ldadd : nullptr;
  const int64_t v = job.v;
  const RowSpan sp = Span(v);
  if (job.labels[i] < 0) {
    for (int64_t j = 0; j < v; ++j) z[j] = add ? add[j] : 0.0f;
    return;
  }
  const float lse = static_cast<float>(job.lse[i]);
  const float a = static_cast<float>(job.a[i]), c = static_cast<float>(job.c[i]);
  const float e = job.e ? static_cast<float>(job.e[i]) : 0.0f;
  const float h = e != 0.0f ? static_cast<float>(job.entropy[i]) : 0.0f;
  const bool cap = job.softcap > 0.0f;
  const float t_over_cap = cap ? (1.0f / job.inv_t) / job.softcap : 0.0f;
  const VF vlse = hn::Set(df, lse), va = hn::Set(df, a), vc = hn::Set(df, c), ve = hn::Set(df, e),
           vh = hn::Set(df, h), vinv_t = hn::Set(df, job.inv_t), vtc = hn::Set(df, t_over_cap),
           neg_inf = hn::Set(df, -kInf);
  const bool c_unmasked = job.c_unmasked;
  const float y_z = z[job.labels[i]];
  auto chain = [&](VF zj, VF g) {  // dL/dz -> dL/dx
    if (cap) g = hn::Mul(g, CapFactor(zj, vtc));
    return hn::Mul(g, vinv_t);
  };
  for (int64_t j = 0; j < sp.vfull; j += sp.lanes) {
    const VF zj = hn::LoadU(df, z + j);
    const VF lp = hn::Sub(zj, vlse);
    const VF p = SoftmaxExp(df, lp);
    VF g = hn::MulAdd(va, p, c_unmasked ? hn::IfThenZeroElse(hn::Eq(zj, neg_inf), vc) : vc);
    if (e != 0.0f)
      g = hn::MulAdd(hn::Mul(ve, p), hn::IfThenZeroElse(hn::Eq(p, hn::Zero(df)), hn::Add(lp, vh)),
                     g);
    g = chain(zj, g);
    if (add) g = hn::Add(g, hn::LoadU(df, add + j));
    hn::StoreU(g, df, z + j);
  }
  for (int64_t j = sp.vfull; j < v; ++j) {
    const float lp = z[j] - lse;
    const float p = std::exp(lp);
    float g = a * p + c;
    if (c_unmasked && z[j] == -kInf) g = 0.0f;  // p = 0: no c at a masked entry
    if (e != 0.0f && p != 0.0f) g += e * p * (lp + h);
    if (cap) g *= label_scalar::cap_factor_of(z[j], t_over_cap);
    g *= job.inv_t;
    if (add) g += add[j];
    z[j] = g;
  }
  // The one-hot part: b at the label (its chain-rule factor from the label's own logit).
  float dz = static_cast<float>(job.b[i]);
  if (cap) dz *= label_scalar::cap_factor_of(y_z, t_over_cap);
  z[job.labels[i]] += dz * job.inv_t;
}

}  // namespace

void LabelRowsForward(detail::LabelForwardJob& job) {
  const bool parallel =
      job.num_threads > 1 && job.rows > 1 && job.rows * job.v >= kMinParallelEntries;
  int64_t bad_row = -1;
  const bool shard = job.shard_max != nullptr || job.shift != nullptr;
#pragma omp parallel num_threads(job.num_threads) if (parallel)
  {
    std::vector<float> scratch, ex;
    int64_t local_bad = -1;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < job.rows; ++i) {
      if (shard) {
        if (job.labels[i] >= 0) {
          ShardRow(job, i, scratch);
        } else if (job.shard_max != nullptr) {
          job.shard_max[i] = -static_cast<double>(kInf);
        } else {
          std::fill(job.partials + 4 * i, job.partials + 4 * i + 4, 0.0);
          if (job.unmasked != nullptr) job.unmasked[i] = 0.0;
          if (job.topk_z != nullptr)
            std::fill(job.topk_z + i * job.topk, job.topk_z + (i + 1) * job.topk,
                      -static_cast<double>(kInf));
        }
        continue;
      }
      if (job.labels[i] < 0) {
        for (double* out : {job.lse, job.z_label, job.mean_z, job.entropy, job.topk_mass,
                            job.log_sum_sq, job.is_top1, job.unmasked})
          if (out) out[i] = 0.0;
        if (job.coef != nullptr) {
          float* z = job.z + i * job.ldz;
          for (int64_t j = 0; j < job.v; ++j) z[j] = job.add ? job.add[i * job.ldadd + j] : 0.0f;
        }
        continue;
      }
      bool bad = false;
      ForwardRow(job, i, scratch, ex, bad);
      if (bad && local_bad < 0) local_bad = i;
    }
#pragma omp critical
    if (local_bad >= 0 && (bad_row < 0 || local_bad < bad_row)) bad_row = local_bad;
  }
  job.bad_row = bad_row;
}

void LabelRowsGrad(const detail::LabelGradJob& job) {
  const bool parallel =
      job.num_threads > 1 && job.rows > 1 && job.rows * job.v >= kMinParallelEntries;
#pragma omp parallel for num_threads(job.num_threads) schedule(static) if (parallel)
  for (int64_t i = 0; i < job.rows; ++i) GradRow(job, i);
}

}  // namespace HWY_NAMESPACE
}  // namespace divkit
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace divkit {
HWY_EXPORT(LabelRowsForward);
HWY_EXPORT(LabelRowsGrad);
void detail::label_rows_forward(LabelForwardJob& job) {
  HWY_DYNAMIC_DISPATCH(LabelRowsForward)(job);
}
void detail::label_rows_grad(const LabelGradJob& job) { HWY_DYNAMIC_DISPATCH(LabelRowsGrad)(job); }
}  // namespace divkit
#endif  // HWY_ONCE
