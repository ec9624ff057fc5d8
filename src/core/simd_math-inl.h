// SIMD helpers shared by the kernels: a softmax exp and fp64-accurate row sums.
// Per-target header (Highway's include-guard toggle).
#if defined(DIVKIT_SIMD_MATH_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef DIVKIT_SIMD_MATH_INL_H_
#undef DIVKIT_SIMD_MATH_INL_H_
#else
#define DIVKIT_SIMD_MATH_INL_H_
#endif

#include <limits>

#include "hwy/contrib/math/math-inl.h"
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace divkit {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// exp(x) for softmax arguments x = logit - max <= 0 (and -inf for masked entries), ~1 ulp.
// Cheaper than hn::Exp: the rounding to the nearest integer n and the 2^n scale come from one
// "magic number" FMA (n + 127 lands in the low mantissa bits of t). Arguments are clamped at
// -88, where n + 127 = 0: the 2^n built from those bits is then +0, so exp(-inf) and
// everything below about exp(-87.7) is exactly 0 without a compare and blend (results between
// that and exp(-87.3), the smallest normal float, are subnormal); they cannot move a row sum
// >= 1. Not for x > 88 (overflow is not handled): use hn::Exp there.
template <class D, class V>
HWY_INLINE V SoftmaxExp(D d, V x) {
  const hn::RebindToSigned<D> di;
  const V kMagic = hn::Set(d, 12582912.0f + 127.0f);  // 1.5 * 2^23 + exponent bias
  x = hn::Max(x, hn::Set(d, -88.0f));
  const V t = hn::MulAdd(x, hn::Set(d, 1.44269504088896341f), kMagic);
  const V nf = hn::Sub(t, kMagic);                           // n = round(x / ln 2), exactly
  V r = hn::MulAdd(nf, hn::Set(d, -0.693145751953125f), x);  // Cody-Waite: ln 2 in two parts
  r = hn::MulAdd(nf, hn::Set(d, -1.428606765330187045e-6f), r);
  // exp(r) - 1 - r on |r| <= ln2/2, the minimax coefficients Highway uses.
  V poly = hn::MulAdd(hn::Set(d, 0.000198527617612853646278381f), r,
                      hn::Set(d, 0.00139304355252534151077271f));
  poly = hn::MulAdd(poly, r, hn::Set(d, 0.00833336077630519866943359f));
  poly = hn::MulAdd(poly, r, hn::Set(d, 0.0416664853692054748535156f));
  poly = hn::MulAdd(poly, r, hn::Set(d, 0.166666671633720397949219f));
  poly = hn::MulAdd(poly, r, hn::Set(d, 0.5f));
  const V er = hn::Add(hn::MulAdd(poly, hn::Mul(r, r), r), hn::Set(d, 1.0f));
  const V scale = hn::BitCast(d, hn::ShiftLeft<23>(hn::BitCast(di, t)));  // 2^n (+0: n = -127)
  return hn::Mul(er, scale);
}

#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3
// SoftmaxExp on 16-lane vectors: x = (k / 16) ln2 + r with k = round(16 x / ln2), |r| <= ln2 / 32,
// so exp(x) = 2^(k >> 4) * 2^((k & 15) / 16) * e^r, the middle factor from a 16-entry table (one
// vpermps) and e^r - 1 from a cubic (its dropped r^4 / 24 is below 1e-8): two fewer FMAs than the
// degree-6 polynomial on |r| <= ln2 / 2, within ~1 ulp (the table's rounding, the FMA's). k + 127 *
// 16 sits in the low mantissa bits of one magic-number FMA: its low 4 bits index the table, the
// rest is the exponent n + 127 of 2^n, +0 at the clamp (x = -88), as above.
HWY_INLINE hn::Vec512<float> SoftmaxExp(hn::Simd<float, 16, 0> d, hn::Vec512<float> x) {
  alignas(64) static constexpr float kExp2Sixteenths[16] = {1.0f,
                                                            1.0442737340927124f,
                                                            1.0905077457427979f,
                                                            1.1387885808944702f,
                                                            1.1892070770263672f,
                                                            1.2418577671051025f,
                                                            1.2968395948410034f,
                                                            1.3542555570602417f,
                                                            1.4142135381698608f,
                                                            1.4768261909484863f,
                                                            1.5422108173370361f,
                                                            1.610490322113037f,
                                                            1.6817928552627563f,
                                                            1.7562521696090698f,
                                                            1.8340080976486206f,
                                                            1.9152065515518188f};
  const hn::RebindToSigned<decltype(d)> di;
  const hn::Vec512<float> kMagic = hn::Set(d, 12582912.0f + 16.0f * 127.0f);
  x = hn::Max(x, hn::Set(d, -88.0f));
  const hn::Vec512<float> t = hn::MulAdd(x, hn::Set(d, 23.083120346069336f), kMagic);
  const hn::Vec512<float> kf = hn::Sub(t, kMagic);  // k, exactly
  hn::Vec512<float> r = hn::MulAdd(kf, hn::Set(d, -0.043321698904037476f), x);
  r = hn::MulAdd(kf, hn::Set(d, 1.1904088825787085e-10f), r);
  const hn::Vec512<float> a = hn::MulAdd(r, hn::Set(d, 0.16666666666666666f), hn::Set(d, 0.5f));
  const hn::Vec512<float> em1 = hn::MulAdd(hn::Mul(r, r), a, r);  // e^r - 1
  const auto bits = hn::BitCast(di, t);
  const hn::Vec512<float> frac{_mm512_permutexvar_ps(bits.raw, _mm512_load_ps(kExp2Sixteenths))};
  const hn::Vec512<float> scale = hn::BitCast(d, hn::ShiftLeft<23>(hn::ShiftRight<4>(bits)));
  return hn::Mul(hn::MulAdd(frac, em1, frac), scale);
}
#endif

// hn::Exp / hn::Expm1 for any argument: +inf above fp32's range (Highway's versions return
// wrong finite values beyond x ~ 104), NaN stays NaN.
template <class D, class V>
HWY_INLINE V ExpOrInf(D d, V x) {
  const V kMax = hn::Set(d, 88.72283935546875f);  // log(FLT_MAX)
  return hn::IfThenElse(hn::Gt(x, kMax), hn::Set(d, std::numeric_limits<float>::infinity()),
                        hn::Exp(d, hn::Min(x, kMax)));
}
template <class D, class V>
HWY_INLINE V Expm1OrInf(D d, V x) {
  const V kMax = hn::Set(d, 88.72283935546875f);
  return hn::IfThenElse(hn::Gt(x, kMax), hn::Set(d, std::numeric_limits<float>::infinity()),
                        hn::Expm1(d, hn::Min(x, kMax)));
}

// exp and expm1 for the divergence terms (divergences-inl.h), about as accurate as Highway's
// (a few ulp) at half the cost: the rounding and 2^n of SoftmaxExp's magic-number FMA instead of
// Highway's conversions and two-step scaling. Each handles the common range in straight-line
// code and checks once per vector for lanes outside it (overflow, NaN, and for exp the
// subnormal range), which then take Highway's version for the whole vector (rare, so the branch
// is predicted). (Highway's Log, with its division, measured faster than a division-free
// Cephes-style polynomial here, so the logs stay Highway's.)

// exp(r) - 1 for |r| <= ln2/2 (and a little beyond): the polynomial of SoftmaxExp, evaluated in
// Estrin's order (a shorter dependency chain than Horner's: the terms that use these are long
// chains, and latency is what limits them).
template <class D, class V>
HWY_INLINE V Expm1Reduced(D d, V r) {
  const V r2 = hn::Mul(r, r);
  const V a = hn::MulAdd(hn::Set(d, 0.166666671633720397949219f), r, hn::Set(d, 0.5f));
  const V b = hn::MulAdd(hn::Set(d, 0.00833336077630519866943359f), r,
                         hn::Set(d, 0.0416664853692054748535156f));
  const V c = hn::MulAdd(hn::Set(d, 0.000198527617612853646278381f), r,
                         hn::Set(d, 0.00139304355252534151077271f));
  const V poly = hn::MulAdd(hn::Mul(r2, r2), c, hn::MulAdd(r2, b, a));
  return hn::MulAdd(poly, r2, r);
}

// x = n ln2 + r with n = round(x / ln2): returns r and, in scale, 2^n (valid for n in
// [-126, 127], i.e. x in [-87.3, 88.0]; the rounding and 2^n come from one magic-number FMA, as
// in SoftmaxExp).
template <class D, class V>
HWY_INLINE V ReduceExpArg(D d, V x, V& scale) {
  const hn::RebindToSigned<D> di;
  const V kMagic = hn::Set(d, 12582912.0f + 127.0f);
  const V t = hn::MulAdd(x, hn::Set(d, 1.44269504088896341f), kMagic);
  const V nf = hn::Sub(t, kMagic);
  V r = hn::MulAdd(nf, hn::Set(d, -0.693145751953125f), x);
  r = hn::MulAdd(nf, hn::Set(d, -1.428606765330187045e-6f), r);
  scale = hn::BitCast(d, hn::ShiftLeft<23>(hn::BitCast(di, t)));
  return r;
}

// ExpOrInf (+inf above log(FLT_MAX)) without Highway's conversions and two-step scaling.
template <class D, class V>
HWY_INLINE V ExpOrInfFast(D d, V x) {
  const auto common = hn::And(hn::Ge(x, hn::Set(d, -87.0f)), hn::Le(x, hn::Set(d, 88.0f)));
  if (HWY_UNLIKELY(!hn::AllTrue(d, common))) return ExpOrInf(d, x);
  V scale;
  const V er = Expm1Reduced(d, ReduceExpArg(d, x, scale));
  return hn::MulAdd(er, scale, scale);
}

// Expm1OrInf: 2^n expm1(r) + (2^n - 1), one rounding; exactly the polynomial where n = 0 (|x| <
// ln2/2), so small arguments keep their relative accuracy. Below -87 the result rounds to -1.
template <class D, class V>
HWY_INLINE V Expm1OrInfFast(D d, V x) {
  if (HWY_UNLIKELY(!hn::AllTrue(d, hn::Le(x, hn::Set(d, 88.0f))))) return Expm1OrInf(d, x);
  V scale;
  const V er = Expm1Reduced(d, ReduceExpArg(d, hn::Max(x, hn::Set(d, -87.0f)), scale));
  return hn::MulAdd(er, scale, hn::Sub(scale, hn::Set(d, 1.0f)));
}

// Expm1OrInfFast for arguments known to lie in [-87, 87] (the same bits there), without its range
// check: for terms whose arguments are bounded by construction.
template <class D, class V>
HWY_INLINE V Expm1Bounded(D d, V x) {
  V scale;
  const V er = Expm1Reduced(d, ReduceExpArg(d, x, scale));
  return hn::MulAdd(er, scale, hn::Sub(scale, hn::Set(d, 1.0f)));
}

using SumDF = hn::ScalableTag<float>;

// Row sums with fp64 accuracy at nearly fp32 cost: a loop accumulates fp32 lanes over one block
// of at most kRowSumBlock vectors (kernels loop over rows in such blocks) (error ~ sqrt(16) ulp of
// the block), then adds the block to an fp64 total in a fixed lane order, so the result does not
// depend on threads.
inline constexpr int64_t kRowSumBlock = 16;

struct RowSum {
  double total = 0.0;
  HWY_INLINE void AddBlock(hn::Vec<SumDF> block) {
    [[maybe_unused]] const SumDF df;  // unused by the scalar target
#if HWY_TARGET == HWY_SCALAR
    total += static_cast<double>(hn::GetLane(block));
#else
    // The two halves widened to fp64 and added in vectors, then Highway's fixed-order lane
    // sum: a handful of instructions per block instead of a serial chain of scalar adds.
    const hn::Half<SumDF> dh;
    const hn::Repartition<double, SumDF> dd;
    const auto both = hn::Add(hn::PromoteTo(dd, hn::LowerHalf(dh, block)),
                              hn::PromoteTo(dd, hn::UpperHalf(dh, block)));
    total += hn::GetLane(hn::SumOfLanes(dd, both));
    (void)df;
#endif
  }
};

}  // namespace HWY_NAMESPACE
}  // namespace divkit
HWY_AFTER_NAMESPACE();

#endif  // DIVKIT_SIMD_MATH_INL_H_
