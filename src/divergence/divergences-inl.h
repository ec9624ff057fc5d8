// The one place where each token-level divergence is defined.
//
// A divergence is a small struct giving, per vocabulary entry j, from the teacher p_j, the
// student q_j and their logs (lp = log p_j, lq = log q_j, -inf for masked entries):
//   term(e, u)   the entry's contribution g(p_j, q_j) to the row sum S, and in u the student
//                factor u_j = q_j * dg/dq_j (finite where the row value is finite);
//   teacher(e)   the teacher factor v_j = p_j * dg/dp_j (for the teacher gradient);
// The row value is the sum of the terms (Renyi, a log of a sum, has its own row routine). The
// generic row kernel (divergence_kernels.cc) turns u and v into gradients with the chain rule
// through the softmax: dL/ds_j = (u_j - q_j sum_i u_i) / T, likewise for t.
//
// Every term must be exactly 0 where p_j = q_j = 0 (masked or padding entries) and must not
// produce NaN from 0 * log 0: that is what the IfThenZeroElse guards are for.
//
// Per-target header (Highway's include-guard toggle): compiled once per SIMD target.
#if defined(DIVKIT_DIVERGENCES_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef DIVKIT_DIVERGENCES_INL_H_
#undef DIVKIT_DIVERGENCES_INL_H_
#else
#define DIVKIT_DIVERGENCES_INL_H_
#endif

#include <cmath>
#include <limits>

#include "core/hd.h"
#include "core/simd_math-inl.h"
#include "divergence/scalar_ops.h"
#include "divkit/divergence.h"
#include "hwy/contrib/math/math-inl.h"
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace divkit {
namespace HWY_NAMESPACE {

// Highway's operations as the definitions see them (`hn::` there), with simd_math-inl.h's
// cheaper expm1 in place of Highway's: qualified lookup finds it before the using-directive's
// names. (ExpOrInf / Expm1OrInf are replaced in `defs` below.)
namespace div_ops {
using namespace hwy::HWY_NAMESPACE;  // NOLINT(build/namespaces)
// Highway's log for normal x only (jsd's mixture where every p and q is normal): without its
// subnormal rescaling, the same bits.
template <class D, class V>
HWY_INLINE V LogNormal(D d, V x) {
  return hwy::HWY_NAMESPACE::impl::Log<D, V, /*kAllowSubnormals=*/false>(d, x);
}
// Highway's log without its subnormal rescaling where every lane is normal (jsd's mixture: the
// subnormal, zero and masked lanes are rare, and take the full version).
template <class D, class V>
HWY_INLINE V Log(D d, V x) {
  if (HWY_UNLIKELY(!hwy::HWY_NAMESPACE::AllTrue(
          d, hwy::HWY_NAMESPACE::Ge(x, hwy::HWY_NAMESPACE::Set(d, 1.17549435e-38f)))))
    return hwy::HWY_NAMESPACE::Log(d, x);
  return LogNormal(d, x);
}
// expm1 for x in [-87, 88] only (its one caller, skew KL's LogRatioToMixtureNear, clamps): the
// bits of Expm1OrInfFast there, without its range check and clamp.
template <class D, class V>
HWY_INLINE V Expm1(D d, V x) {
  V scale;
  const V er = Expm1Reduced(d, ReduceExpArg(d, x, scale));
  return hwy::HWY_NAMESPACE::MulAdd(
      er, scale, hwy::HWY_NAMESPACE::Sub(scale, hwy::HWY_NAMESPACE::Set(d, 1.0f)));
}
// log1p(y) for y > -1: Highway's log (musl's algorithm) of u = 1 + y, whose reduction
// u = 2^k w, w in [sqrt(2)/2, sqrt(2)), works on f = w - 1; where k = 0 (y in about
// [-0.29, 0.41]) f is y itself, exact, instead of u - 1 (which carries the rounding of u): the
// relative accuracy of log1p near y = 0 for the cost of one log, where Highway's Log1p takes two
// divisions. Elsewhere |log u| > 0.34, and u's rounding stays below an ulp of the result. Vectors
// with a lane where u is not a normal float (rare) take log(u) + c / u, c = y - (u - 1).
template <class D, class V>
HWY_INLINE V Log1p(D d, V y) {
  namespace hh = hwy::HWY_NAMESPACE;
  const V one = hh::Set(d, 1.0f);
  const V u = hh::Add(one, y);
  if (HWY_UNLIKELY(!hh::AllTrue(d, hh::Ge(u, hh::Set(d, 1.17549435e-38f))))) {
    const V c = hh::Sub(y, hh::Sub(u, one));
    return hh::MulAdd(c, hh::ApproximateReciprocal(u), hh::Log(d, u));
  }
  const hh::RebindToSigned<D> di;
  const auto magic = hh::Set(di, 0x3F3504F3);  // the bits of sqrt(2) / 2
  const auto bits = hh::Add(hh::BitCast(di, u), hh::Sub(hh::Set(di, 0x3F800000), magic));
  const auto k_int = hh::Sub(hh::ShiftRight<23>(bits), hh::Set(di, 0x7F));
  const V k = hh::ConvertTo(d, k_int);
  const V w = hh::BitCast(d, hh::Add(hh::And(bits, hh::Set(di, 0x7FFFFF)), magic));
  const V f = hh::IfThenElse(hh::RebindMask(d, hh::Eq(k_int, hh::Zero(di))), y, hh::Sub(w, one));
  const V z = hh::Div(f, hh::Add(f, hh::Set(d, 2.0f)));
  const V z2 = hh::Mul(z, z), z4 = hh::Mul(z2, z2);
  const V poly = hh::MulAdd(
      hh::MulAdd(hh::Set(d, 0.28498786688f), z4, hh::Set(d, 0.66666662693f)), z2,
      hh::Mul(hh::MulAdd(hh::Set(d, 0.24279078841f), z4, hh::Set(d, 0.40000972152f)), z4));
  return hh::MulSub(
      k, hh::Set(d, 0.69313812256f),
      hh::Sub(hh::MulSub(z, hh::Sub(f, poly), hh::Mul(k, hh::Set(d, 9.0580006145e-6f))), f));
}
// log(a + (1 - a) e^x) for |x| < 8 from a table of BuildMixLogTable (see scalar_ops.h's
// MixLogTable for the layout): the coefficients of the lanes' intervals come from two-register
// permutes (32 intervals), then one Horner chain. AVX-512 only (elsewhere no table is built, and
// this generic form with gathers is never called).
constexpr int kMixLogDegree = 5;
// The power-mean table's polynomials (BuildPowerTable): degree kPowDegree on kPowIntervals
// intervals of width 1 / kPowScale.
using scalar_ops::kPowDegree;
using scalar_ops::kPowIntervals;
using scalar_ops::kPowScale;
// k = round(kPowScale x) of PowTable's interval, as a float (Renyi's far intervals): the
// magic-number add of PowTable.
template <class D, class V>
HWY_INLINE V PowTableK(D d, V x) {
  namespace hh = hwy::HWY_NAMESPACE;
  const V magic = hh::Set(d, 12582912.0f + kPowIntervals / 2);
  return hh::Sub(hh::MulAdd(x, hh::Set(d, kPowScale), magic), magic);
}
// jsd's mixture log from the table (AVX-512) or from the log of m: the expm1 / log1p form of the
// CUDA kernels (scalar_ops.h) is not taken here, where it would cost the targets without the
// table a log1p and an expm1 per entry in place of one log (not measured).
inline constexpr bool kJsdMixtureFromExpm1 = false;
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3
inline constexpr bool kHaveMixLogTable = true;
template <class D, class V>
HWY_INLINE V MixLogTable(D d, V x, const float* t) {
  namespace hh = hwy::HWY_NAMESPACE;
  const V tt = hh::MulAdd(x, hh::Set(d, 2.0f), hh::Set(d, 16.0f));
  const V fl = hh::Floor(tt);
  const V s = hh::MulSub(hh::Sub(tt, fl), hh::Set(d, 2.0f), hh::Set(d, 1.0f));
  const __m512i idx = _mm512_cvttps_epi32(fl.raw);
  auto coef = [&](int k) {
    return V{
        _mm512_permutex2var_ps(_mm512_loadu_ps(t + 32 * k), idx, _mm512_loadu_ps(t + 32 * k + 16))};
  };
  V p = coef(kMixLogDegree);
  for (int k = kMixLogDegree - 1; k >= 0; --k) p = hh::MulAdd(p, s, coef(k));
  return hh::Mul(x, p);
}
// A polynomial of the power-mean table (BuildPowerTable): function f's polynomial on the
// lanes' intervals, at s = kPowScale x - k, k = round(kPowScale x) (|x| < kPowTableRange). The
// rounding comes from a magic-number add whose low mantissa bits are then
// (k + kPowIntervals / 2) mod kPowIntervals, the index of a one- or two-register permute; s is
// exact. Not multiplied by x (the callers' factor).
template <class D, class V>
HWY_INLINE V PowTable(D d, V x, const float* t, int f) {
  namespace hh = hwy::HWY_NAMESPACE;
  const V magic = hh::Set(d, 12582912.0f + kPowIntervals / 2);  // 1.5 * 2^23 + the offset
  const V tt = hh::MulAdd(x, hh::Set(d, kPowScale), magic);
  const V s = hh::MulSub(x, hh::Set(d, kPowScale), hh::Sub(tt, magic));
  const __m512i idx = _mm512_castps_si512(tt.raw);
  const float* tf = t + kPowIntervals * (kPowDegree + 1) * f;
  auto coef = [&](int k) {
    if constexpr (kPowIntervals == 16)
      return V{_mm512_permutexvar_ps(idx, _mm512_load_ps(tf + 16 * k))};
    else
      return V{_mm512_permutex2var_ps(_mm512_load_ps(tf + 32 * k), idx,
                                      _mm512_load_ps(tf + 32 * k + 16))};
  };
  V p = coef(kPowDegree);
  for (int k = kPowDegree - 1; k >= 0; --k) p = hh::MulAdd(p, s, coef(k));
  return p;
}
#else
inline constexpr bool kHaveMixLogTable = false;
template <class D, class V>
HWY_INLINE V MixLogTable(D d, V x, const float* t) {
  namespace hh = hwy::HWY_NAMESPACE;
  const V tt = hh::MulAdd(x, hh::Set(d, 2.0f), hh::Set(d, 16.0f));
  const V fl = hh::Floor(tt);
  const V s = hh::MulSub(hh::Sub(tt, fl), hh::Set(d, 2.0f), hh::Set(d, 1.0f));
  const hh::RebindToSigned<D> di;
  const auto idx = hh::ConvertTo(di, fl);
  V p = hh::GatherIndex(d, t + 32 * kMixLogDegree, idx);
  for (int k = kMixLogDegree - 1; k >= 0; --k)
    p = hh::MulAdd(p, s, hh::GatherIndex(d, t + 32 * k, idx));
  return hh::Mul(x, p);
}
template <class D, class V>
HWY_INLINE V PowTable(D d, V x, const float* t, int f) {
  namespace hh = hwy::HWY_NAMESPACE;
  const hh::RebindToSigned<D> di;
  const V magic = hh::Set(d, 12582912.0f + kPowIntervals / 2);
  const V tt = hh::MulAdd(x, hh::Set(d, kPowScale), magic);
  const V s = hh::MulSub(x, hh::Set(d, kPowScale), hh::Sub(tt, magic));
  const auto idx = hh::And(hh::BitCast(di, tt), hh::Set(di, kPowIntervals - 1));
  const float* tf = t + kPowIntervals * (kPowDegree + 1) * f;
  V p = hh::GatherIndex(d, tf + kPowIntervals * kPowDegree, idx);
  for (int k = kPowDegree - 1; k >= 0; --k)
    p = hh::MulAdd(p, s, hh::GatherIndex(d, tf + kPowIntervals * k, idx));
  return p;
}
#endif
}  // namespace div_ops

// The table of MixLogTable for skew KL's alpha a (32 x (kMixLogDegree + 1) floats): on each
// interval [-8 + i / 2, -8 + (i + 1) / 2), H(x) = log1p((1 - a) expm1(x)) / x (H(0) = 1 - a)
// interpolated in double at the Chebyshev nodes and written as a polynomial in the interval's
// s in [-1, 1]. H is analytic in the strip |Im x| < pi for every a, so degree 5 on intervals of
// half-width 1/4 is within a few ulp of F (measured on a grid of 160000 points and down to
// |x| = 1e-30: at most 3.5 ulp relative for alpha from 1e-6 to 1 - 1e-6, the same as degree 6;
// degree 4 reaches 5-7 ulp at alpha >= 0.9; the expm1 / log1p form: 3.6-6.8 ulp at alpha
// 0.1-0.9, more toward the ends).
inline void BuildMixLogTable(double a, float* out) {
  constexpr int kN = div_ops::kMixLogDegree + 1;
  constexpr double kPi = 3.14159265358979323846;
  auto h = [a](double x) { return x == 0.0 ? 1.0 - a : std::log1p((1.0 - a) * std::expm1(x)) / x; };
  double cheb_to_mono[kN][kN] = {};  // T_k(s) = sum_m cheb_to_mono[k][m] s^m
  cheb_to_mono[0][0] = 1.0;
  cheb_to_mono[1][1] = 1.0;
  for (int k = 2; k < kN; ++k)
    for (int m = 0; m < kN; ++m)
      cheb_to_mono[k][m] =
          (m > 0 ? 2.0 * cheb_to_mono[k - 1][m - 1] : 0.0) - cheb_to_mono[k - 2][m];
  for (int i = 0; i < 32; ++i) {
    const double center = -8.0 + 0.25 + 0.5 * i;
    double values[kN], cheb[kN];
    for (int j = 0; j < kN; ++j) values[j] = h(center + 0.25 * std::cos(kPi * (j + 0.5) / kN));
    for (int k = 0; k < kN; ++k) {
      double sum = 0.0;
      for (int j = 0; j < kN; ++j) sum += values[j] * std::cos(k * kPi * (j + 0.5) / kN);
      cheb[k] = (k == 0 ? 1.0 : 2.0) * sum / kN;
    }
    for (int m = 0; m < kN; ++m) {
      double c = 0.0;
      for (int k = 0; k < kN; ++k) c += cheb[k] * cheb_to_mono[k][m];
      out[32 * m + i] = static_cast<float>(c);
    }
  }
}

// The table of PowTable for the alpha divergence and Renyi at order alpha, for
// divergence_defs.h's PowerTableApplies: with x = log(p / q) and c = alpha, the quantities of an
// entry are q x^2 F1(x) = mix - w, q x F0(x) = w - q and q x F2(x) = w - p, where
//   F0(x) = expm1(c x) / x,   F1(x) = (c expm1(x) - expm1(c x)) / x^2,   F2(x) = (e^(c x) - e^x) /
//   x
// are entire functions with no zero on the real line for c != 0, 1 (F1 has the sign of c (1 - c),
// F0 of c, F2 of c - 1), so polynomials fit them to a few ulp relative, and the products keep the
// relative accuracy of the three quantities near x = 0 (p = q), where MixMinusPowerMean's bracket
// c expm1(x) - expm1(c x) cancels (which is why it mirrors alpha > 1/2 to base p; the table needs
// no mirror). The table holds kg F1, ku F0 and kv F2, the callers' constant factors folded in.
// Each is interpolated in double at the Chebyshev nodes of the kPowIntervals intervals of width
// 1 / kPowScale centered at k / kPowScale, and written as a polynomial of degree kPowDegree in
// s = kPowScale x - k in [-1/2, 1/2]. The intervals k <= -far_k of the w - q polynomial hold w - p
// instead (Renyi's table: Renyi::TermAndFactor adds p - q there; the alpha divergence's passes a
// far_k beyond the table).
inline void BuildPowerTable(double alpha, double kg, double ku, double kv, int far_k, float* out) {
  constexpr int kN = div_ops::kPowDegree + 1;
  constexpr double kPi = 3.14159265358979323846;
  const double c = alpha;
  // The three functions: their Taylor series where |x| <= 1 (|c| <= 2: 40 terms, below 1e-30),
  // the closed forms beyond (no cancellation worth a digit there).
  auto eval = [c](double x, double f[3]) {
    if (std::fabs(x) <= 1.0) {
      f[0] = c, f[1] = 0.0, f[2] = c - 1.0;  // the k = 1 terms
      double ck = c, term = 1.0;             // c^k, x^(k-2) / k!
      for (int k = 2; k <= 40; ++k) {
        term /= k;
        ck *= c;
        f[1] += (c - ck) * term;
        f[0] += ck * term * x;
        f[2] += (ck - 1.0) * term * x;
        term *= x;
      }
      return;
    }
    f[0] = std::expm1(c * x) / x;
    f[1] = (c * std::expm1(x) - std::expm1(c * x)) / (x * x);
    f[2] = (std::exp(c * x) - std::exp(x)) / x;
  };
  const double k_of[3] = {kg, ku, kv};
  int fn_of[3] = {1, 0, 2};
  double cheb_to_mono[kN][kN] = {};  // T_k(u) = sum_m cheb_to_mono[k][m] u^m
  cheb_to_mono[0][0] = 1.0;
  cheb_to_mono[1][1] = 1.0;
  for (int k = 2; k < kN; ++k)
    for (int m = 0; m < kN; ++m)
      cheb_to_mono[k][m] =
          (m > 0 ? 2.0 * cheb_to_mono[k - 1][m - 1] : 0.0) - cheb_to_mono[k - 2][m];
  constexpr int kI = div_ops::kPowIntervals;
  const double width = 1.0 / div_ops::kPowScale;
  for (int i = 0; i < kI; ++i) {
    const double center = width * (i - kI / 2);
    fn_of[1] = i - kI / 2 <= -far_k ? 2 : 0;  // Renyi's far intervals: w - p in place of w - q
    double values[3][kN];
    for (int j = 0; j < kN; ++j) {
      // u in [-1, 1] is 2 s, so x = center + u width / 2.
      double f[3];
      eval(center + 0.5 * width * std::cos(kPi * (j + 0.5) / kN), f);
      for (int t = 0; t < 3; ++t) values[t][j] = k_of[t] * f[fn_of[t]];
    }
    for (int t = 0; t < 3; ++t) {
      double cheb[kN];
      for (int k = 0; k < kN; ++k) {
        double sum = 0.0;
        for (int j = 0; j < kN; ++j) sum += values[t][j] * std::cos(k * kPi * (j + 0.5) / kN);
        cheb[k] = (k == 0 ? 1.0 : 2.0) * sum / kN;
      }
      double pow2 = 1.0;  // u^m = 2^m s^m
      for (int m = 0; m < kN; ++m, pow2 *= 2.0) {
        double coef = 0.0;
        for (int k = 0; k < kN; ++k) coef += cheb[k] * cheb_to_mono[k][m];
        out[(t * kN + m) * kI + i] = static_cast<float>(coef * pow2);
      }
    }
  }
}

namespace defs {
namespace hn = div_ops;
template <class D, class V>
HWY_INLINE V ExpOrInf(D d, V x) {
  return ExpOrInfFast(d, x);
}
template <class D, class V>
HWY_INLINE V Expm1OrInf(D d, V x) {
  return Expm1OrInfFast(d, x);
}
// expm1 of an argument in [-87, 87] (no range check; the same bits as Expm1OrInf there).
template <class D, class V>
HWY_INLINE V Expm1Moderate(D d, V x) {
  return Expm1Bounded(d, x);
}

#define DIVKIT_INLINE HWY_INLINE
#include "divergence/divergence_defs.h"  // IWYU pragma: export
#undef DIVKIT_INLINE
}  // namespace defs

// The alpha divergence with its power-mean table (see PowerTableApplies), the row kernels' type
// where RunDivergenceRows builds one: the constants kg = 1 / (alpha (1 - alpha)),
// ku = -1 / alpha, kv = -1 / (1 - alpha) give g, u and v directly; vectors out of the table's
// range take AlphaDivergence's MixMinusPowerMean. A type of its own (not a member of
// AlphaDivergence, as Renyi's table is) so that the loop of alpha = 1/2, which takes no table,
// carries no table branch: measured, the branch alone made that kind ~8% slower.
struct AlphaDivergenceTable : defs::AlphaDivergence {
  const float* table;
  AlphaDivergenceTable(const defs::AlphaDivergence& base, const float* t)
      : defs::AlphaDivergence(base), table(t) {}
  template <class D, class V>
  HWY_INLINE V term(D d, const defs::Entry<V>& e, V& u) const {
    if (defs::PowerTableApplies(d, e.lr)) {
      const V qx = hn::Mul(e.q, e.lr);
      u = hn::Mul(qx, div_ops::PowTable(d, e.lr, table, 1));
      return hn::Mul(hn::Mul(qx, e.lr), div_ops::PowTable(d, e.lr, table, 0));
    }
    return defs::AlphaDivergence::term(d, e, u);
  }
  template <class D, class V>
  HWY_INLINE V teacher(D d, const defs::Entry<V>& e) const {
    if (defs::PowerTableApplies(d, e.lr))
      return hn::Mul(hn::Mul(e.q, e.lr), div_ops::PowTable(d, e.lr, table, 2));
    return defs::AlphaDivergence::teacher(d, e);
  }
};

// What the row kernels use by name.
using defs::AlphaDivergence;
using defs::ChiSquared;
using defs::CrossEntropy;
using defs::Entry;
using defs::ForwardKL;
using defs::GeneralizedJSD;
using defs::Hellinger;
using defs::Jeffreys;
using defs::Renyi;
using defs::ReverseKL;
using defs::SkewForwardKL;
using defs::SkewReverseKL;
using defs::SumFinish;
using defs::TotalVariation;
using defs::VisitDivergence;

}  // namespace HWY_NAMESPACE
}  // namespace divkit
HWY_AFTER_NAMESPACE();

#endif  // DIVKIT_DIVERGENCES_INL_H_
