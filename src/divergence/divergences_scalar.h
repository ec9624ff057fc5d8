// The divergence definitions of divergence_defs.h for one float lane (divkit::scalar), shared by
// the CUDA row kernels and the host tests: the same formulas as the SIMD CPU kernels, with the
// math library's expf/logf/expm1f/log1pf in place of Highway's (so results agree to a few ulp,
// not bit for bit).
#pragma once

#include "core/hd.h"
#include "divergence/scalar_ops.h"
#include "divkit/divergence.h"

namespace divkit::scalar {

namespace hn = divkit::scalar_ops;

// simd_math-inl.h's exp and expm1 that give +inf above log(FLT_MAX) instead of NaN.
template <class D>
DIVKIT_HD inline float ExpOrInf(D d, float x) {
  const float kMax = 88.72283935546875f;  // log(FLT_MAX)
  return x > kMax ? kInfinityF : hn::Exp(d, hn::Min(x, kMax));
}
template <class D>
DIVKIT_HD inline float Expm1OrInf(D d, float x) {
  const float kMax = 88.72283935546875f;
  return x > kMax ? kInfinityF : hn::Expm1(d, hn::Min(x, kMax));
}
// expm1 of an argument in [-87, 87].
template <class D>
DIVKIT_HD inline float Expm1Moderate(D d, float x) {
  return hn::Expm1(d, x);
}

#define DIVKIT_INLINE DIVKIT_HD inline
#include "divergence/divergence_defs.h"  // IWYU pragma: export
#undef DIVKIT_INLINE

}  // namespace divkit::scalar
