// The Highway operations that divergence_defs.h uses, for one float lane: the scalar form of the
// divergence definitions, compiled for the CUDA kernels (__host__ __device__) and on the host by
// the tests that check it against the SIMD kernels. A mask is a bool; MulAdd and friends are
// fused (fmaf), as on the FMA-capable SIMD targets.
#pragma once

#include <math.h>

#include "core/hd.h"

namespace divkit::scalar_ops {

struct Lane {};  // the descriptor "d" of the Highway calls

DIVKIT_HD inline float Zero(Lane) { return 0.0f; }
DIVKIT_HD inline float Set(Lane, float x) { return x; }
DIVKIT_HD inline float Add(float a, float b) { return a + b; }
DIVKIT_HD inline float Sub(float a, float b) { return a - b; }
DIVKIT_HD inline float Mul(float a, float b) { return a * b; }
DIVKIT_HD inline float Div(float a, float b) { return a / b; }
DIVKIT_HD inline float Neg(float a) { return -a; }
DIVKIT_HD inline float Abs(float a) { return fabsf(a); }
DIVKIT_HD inline float Sqrt(float a) { return sqrtf(a); }
// x86's min/max semantics (the second operand where either is NaN), as Highway on x86.
DIVKIT_HD inline float Min(float a, float b) { return a < b ? a : b; }
DIVKIT_HD inline float Max(float a, float b) { return a > b ? a : b; }
DIVKIT_HD inline float MulAdd(float a, float b, float c) { return fmaf(a, b, c); }
DIVKIT_HD inline float NegMulAdd(float a, float b, float c) { return fmaf(-a, b, c); }
DIVKIT_HD inline float MulSub(float a, float b, float c) { return fmaf(a, b, -c); }
DIVKIT_HD inline bool Eq(float a, float b) { return a == b; }
DIVKIT_HD inline bool Lt(float a, float b) { return a < b; }
DIVKIT_HD inline bool Le(float a, float b) { return a <= b; }
DIVKIT_HD inline bool Gt(float a, float b) { return a > b; }
DIVKIT_HD inline bool Ge(float a, float b) { return a >= b; }
DIVKIT_HD inline bool And(bool a, bool b) { return a && b; }
DIVKIT_HD inline bool Or(bool a, bool b) { return a || b; }
DIVKIT_HD inline bool AllFalse(Lane, bool m) { return !m; }
DIVKIT_HD inline bool AllTrue(Lane, bool m) { return m; }
DIVKIT_HD inline float IfThenElse(bool m, float a, float b) { return m ? a : b; }
DIVKIT_HD inline float IfThenElseZero(bool m, float a) { return m ? a : 0.0f; }
DIVKIT_HD inline float IfThenZeroElse(bool m, float b) { return m ? 0.0f : b; }
DIVKIT_HD inline float Exp(Lane, float x) { return expf(x); }
DIVKIT_HD inline float Expm1(Lane, float x) { return expm1f(x); }
DIVKIT_HD inline float Log(Lane, float x) { return logf(x); }
DIVKIT_HD inline float LogNormal(Lane, float x) { return logf(x); }
DIVKIT_HD inline float Log1p(Lane, float x) { return log1pf(x); }

// jsd's mixture log from expm1 and log1p (GeneralizedJSD::NearFormApplies), relatively accurate
// near p = q, for the CUDA kernels and the host tests: two library functions per entry in place
// of one, beside the 12 bytes of memory traffic each entry costs (not yet timed on a GPU).
inline constexpr bool kJsdMixtureFromExpm1 = true;

// skew KL's log(a + (1 - a) e^x) for |x| < 8 from the per-alpha table of
// divergence_defs.h's TimesLogRatioToMixture: interval i = floor(2 x + 16) of width 1/2, the
// local variable s in [-1, 1), x times a polynomial of degree kMixLogDegree in s whose coefficient
// k is t[32 k + i]. (Only the SIMD CPU kernels build tables; this form keeps the definition
// compilable and checkable in scalar code.)
constexpr int kMixLogDegree = 5;
DIVKIT_HD inline float MixLogTable(Lane, float x, const float* t) {
  const float tt = fmaf(x, 2.0f, 16.0f);
  const float fl = floorf(tt);
  const int i = static_cast<int>(fl);
  const float s = fmaf(tt - fl, 2.0f, -1.0f);
  float p = t[32 * kMixLogDegree + i];
  for (int k = kMixLogDegree - 1; k >= 0; --k) p = fmaf(p, s, t[32 * k + i]);
  return x * p;
}

// The alpha divergence's and Renyi's polynomial f of a power-mean table (divergences-inl.h's
// BuildPowerTable, layout t[(f (kPowDegree + 1) + m) kPowIntervals + i]): interval
// i = k + kPowIntervals / 2 of width 1 / kPowScale centered at k / kPowScale,
// k = round(kPowScale x), at s = kPowScale x - k. (Only the SIMD CPU kernels build tables; this
// form keeps the definitions compilable and checkable in scalar code.)
constexpr int kPowDegree = 5;
constexpr int kPowIntervals = 16;
constexpr float kPowScale = 2.0f;
// k = round(kPowScale x), the interval's (as a float).
DIVKIT_HD inline float PowTableK(Lane, float x) { return rintf(kPowScale * x); }
DIVKIT_HD inline float PowTable(Lane, float x, const float* t, int f) {
  const float k = rintf(kPowScale * x);
  const int i = static_cast<int>(k) + kPowIntervals / 2;
  const float s = fmaf(x, kPowScale, -k);
  const float* tf = t + kPowIntervals * (kPowDegree + 1) * f;
  float p = tf[kPowIntervals * kPowDegree + i];
  for (int m = kPowDegree - 1; m >= 0; --m) p = fmaf(p, s, tf[kPowIntervals * m + i]);
  return p;
}

}  // namespace divkit::scalar_ops
