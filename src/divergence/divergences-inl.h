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
// Highway's log without its subnormal rescaling where every lane is normal (jsd's mixture: the
// subnormal, zero and masked lanes are rare, and take the full version).
template <class D, class V>
HWY_INLINE V Log(D d, V x) {
  if (HWY_UNLIKELY(!hwy::HWY_NAMESPACE::AllTrue(
          d, hwy::HWY_NAMESPACE::Ge(x, hwy::HWY_NAMESPACE::Set(d, 1.17549435e-38f)))))
    return hwy::HWY_NAMESPACE::Log(d, x);
  return hwy::HWY_NAMESPACE::impl::Log<D, V, /*kAllowSubnormals=*/false>(d, x);
}
template <class D, class V>
HWY_INLINE V Expm1(D d, V x) {
  return Expm1OrInfFast(d, x);
}
// log1p(y) for y > -1 as log(u) + c / u, u = 1 + y rounded and c = y - (u - 1) its rounding
// error (exact for |y| < 2; beyond, c / u is below an ulp of the result anyway): the relative
// accuracy of log1p near y = 0 for the cost of one log, where Highway's Log1p takes two
// divisions. The correction is tiny, so a reciprocal estimate serves for 1 / u.
template <class D, class V>
HWY_INLINE V Log1p(D d, V y) {
  namespace hh = hwy::HWY_NAMESPACE;
  const V one = hh::Set(d, 1.0f);
  const V u = hh::Add(one, y);
  const V c = hh::Sub(y, hh::Sub(u, one));
  return hh::MulAdd(c, hh::ApproximateReciprocal(u), div_ops::Log(d, u));
}
}  // namespace div_ops

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
using defs::TotalVariation;
using defs::VisitDivergence;

}  // namespace HWY_NAMESPACE
}  // namespace divkit
HWY_AFTER_NAMESPACE();

#endif  // DIVKIT_DIVERGENCES_INL_H_
