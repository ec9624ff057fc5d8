// The one place where each token-level divergence is defined.
//
// A divergence is a small struct giving, per vocabulary entry j, from the teacher p_j, the
// student q_j and their logs (lp = log p_j, lq = log q_j, -inf for masked entries):
//   term(e, u)   the entry's contribution g(p_j, q_j) to the row sum S, and in u the student
//                factor u_j = q_j * dg/dq_j (finite where the row value is finite);
//   teacher(e)   the teacher factor v_j = p_j * dg/dp_j (for the teacher gradient);
// and the row finish: value = finish(S) (a plain sum for all but Renyi), slope = dvalue/dS.
// The generic row kernel (divergence_kernels.cc) turns u and v into gradients with the chain
// rule through the softmax: dL/ds_j = slope * (u_j - q_j sum_i u_i) / T, likewise for t.
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

#include "divkit/divergence.h"
#include "hwy/contrib/math/math-inl.h"
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace divkit {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

template <class V>
struct Entry {
  V p, q, lp, lq;
};

// x * (a - b) with the convention 0 * (anything) = 0 (0 log 0 = 0 and masked entries).
template <class D, class V>
HWY_INLINE V XLogRatio(D d, V x, V a, V b) {
  return hn::IfThenZeroElse(hn::Eq(x, hn::Zero(d)), hn::Mul(x, hn::Sub(a, b)));
}

// Divergences whose row value is the plain sum S of their terms.
struct SumFinish {
  // True when u = -p exactly (so sum u = -1): the kernel then skips storing u and writes the
  // student gradient as (q - p) / T directly (forward KL and cross-entropy).
  static constexpr bool kStudentFactorIsMinusP = false;
  double finish(double s) const { return s; }
  double slope(double /*s*/) const { return 1.0; }
};

// KL(p || q) = sum p (lp - lq).  u = -p,  v = p (lp - lq) + p.
struct ForwardKL : SumFinish {
  static constexpr bool kStudentFactorIsMinusP = true;
  explicit ForwardKL(const DivergenceSpec&) {}
  template <class D, class V>
  HWY_INLINE V term(D d, const Entry<V>& e, V& u) const {
    u = hn::Neg(e.p);
    return XLogRatio(d, e.p, e.lp, e.lq);
  }
  template <class D, class V>
  HWY_INLINE V teacher(D d, const Entry<V>& e) const {
    return hn::Add(XLogRatio(d, e.p, e.lp, e.lq), e.p);
  }
};

// KL(q || p) = sum q (lq - lp).  u = q (lq - lp) + q,  v = -q.
struct ReverseKL : SumFinish {
  explicit ReverseKL(const DivergenceSpec&) {}
  template <class D, class V>
  HWY_INLINE V term(D d, const Entry<V>& e, V& u) const {
    const V g = XLogRatio(d, e.q, e.lq, e.lp);
    u = hn::Add(g, e.q);
    return g;
  }
  template <class D, class V>
  HWY_INLINE V teacher(D d, const Entry<V>& e) const {
    return hn::Neg(e.q);
  }
};

// Generalized JSD (0 < beta < 1; the ends are ForwardKL/ReverseKL):
// m = beta p + (1-beta) q,  g = beta p (lp - lm) + (1-beta) q (lq - lm).
// dg/dq = (1-beta)(lq - lm) (the 1/m terms cancel), so u and v are the two halves of g.
struct GeneralizedJSD : SumFinish {
  float beta;
  explicit GeneralizedJSD(const DivergenceSpec& s) : beta(s.beta) {}
  template <class D, class V>
  HWY_INLINE V LogMixture(D d, const Entry<V>& e) const {
    const V b = hn::Set(d, beta), one_minus_b = hn::Set(d, 1.0f - beta);
    return hn::Log(d, hn::MulAdd(b, e.p, hn::Mul(one_minus_b, e.q)));
  }
  template <class D, class V>
  HWY_INLINE V term(D d, const Entry<V>& e, V& u) const {
    const V lm = LogMixture(d, e);
    u = hn::Mul(hn::Set(d, 1.0f - beta), XLogRatio(d, e.q, e.lq, lm));
    return hn::MulAdd(hn::Set(d, beta), XLogRatio(d, e.p, e.lp, lm), u);
  }
  template <class D, class V>
  HWY_INLINE V teacher(D d, const Entry<V>& e) const {
    return hn::Mul(hn::Set(d, beta), XLogRatio(d, e.p, e.lp, LogMixture(d, e)));
  }
};

// p q / m with 0 where m = 0 (both probabilities 0).
template <class D, class V>
HWY_INLINE V ProductOverMixture(D d, V p, V q, V m) {
  const auto zero = hn::Eq(m, hn::Zero(d));
  return hn::IfThenZeroElse(zero, hn::Div(hn::Mul(p, q), hn::IfThenElse(zero, hn::Set(d, 1.0f), m)));
}

// DistiLLM skew KL: KL(p || m), m = alpha p + (1-alpha) q.
// u = -(1-alpha) p q / m,  v = p (lp - lm) + (1-alpha) p q / m.
struct SkewForwardKL : SumFinish {
  float alpha;
  explicit SkewForwardKL(const DivergenceSpec& s) : alpha(s.alpha) {}
  template <class D, class V>
  HWY_INLINE V Mixture(D d, const Entry<V>& e) const {
    return hn::MulAdd(hn::Set(d, alpha), e.p, hn::Mul(hn::Set(d, 1.0f - alpha), e.q));
  }
  template <class D, class V>
  HWY_INLINE V term(D d, const Entry<V>& e, V& u) const {
    const V m = Mixture(d, e);
    u = hn::Mul(hn::Set(d, alpha - 1.0f), ProductOverMixture(d, e.p, e.q, m));
    return XLogRatio(d, e.p, e.lp, hn::Log(d, m));
  }
  template <class D, class V>
  HWY_INLINE V teacher(D d, const Entry<V>& e) const {
    const V m = Mixture(d, e);
    return hn::MulAdd(hn::Set(d, 1.0f - alpha), ProductOverMixture(d, e.p, e.q, m),
                      XLogRatio(d, e.p, e.lp, hn::Log(d, m)));
  }
};

// DistiLLM skew reverse KL: KL(q || m), m = (1-alpha) p + alpha q.
// u = q (lq - lm) + (1-alpha) p q / m,  v = -(1-alpha) p q / m.
struct SkewReverseKL : SumFinish {
  float alpha;
  explicit SkewReverseKL(const DivergenceSpec& s) : alpha(s.alpha) {}
  template <class D, class V>
  HWY_INLINE V Mixture(D d, const Entry<V>& e) const {
    return hn::MulAdd(hn::Set(d, 1.0f - alpha), e.p, hn::Mul(hn::Set(d, alpha), e.q));
  }
  template <class D, class V>
  HWY_INLINE V term(D d, const Entry<V>& e, V& u) const {
    const V m = Mixture(d, e);
    const V g = XLogRatio(d, e.q, e.lq, hn::Log(d, m));
    u = hn::MulAdd(hn::Set(d, 1.0f - alpha), ProductOverMixture(d, e.p, e.q, m), g);
    return g;
  }
  template <class D, class V>
  HWY_INLINE V teacher(D d, const Entry<V>& e) const {
    return hn::Mul(hn::Set(d, alpha - 1.0f), ProductOverMixture(d, e.p, e.q, Mixture(d, e)));
  }
};

// 0.5 |p - q|.  u = -0.5 q sign(p - q),  v = 0.5 p sign(p - q)  (sign(0) = 0, as torch.abs).
struct TotalVariation : SumFinish {
  explicit TotalVariation(const DivergenceSpec&) {}
  template <class D, class V>
  HWY_INLINE V HalfSign(D d, const Entry<V>& e) const {
    const V half = hn::Set(d, 0.5f);
    return hn::IfThenElse(hn::Gt(e.p, e.q), half,
                          hn::IfThenElse(hn::Lt(e.p, e.q), hn::Neg(half), hn::Zero(d)));
  }
  template <class D, class V>
  HWY_INLINE V term(D d, const Entry<V>& e, V& u) const {
    u = hn::Neg(hn::Mul(e.q, HalfSign(d, e)));
    return hn::Mul(hn::Set(d, 0.5f), hn::Abs(hn::Sub(e.p, e.q)));
  }
  template <class D, class V>
  HWY_INLINE V teacher(D d, const Entry<V>& e) const {
    return hn::Mul(e.p, HalfSign(d, e));
  }
};

// Squared Hellinger without the 1/2: (sqrt p - sqrt q)^2.  u = q - sqrt(pq),  v = p - sqrt(pq).
struct Hellinger : SumFinish {
  explicit Hellinger(const DivergenceSpec&) {}
  template <class D, class V>
  HWY_INLINE V term(D d, const Entry<V>& e, V& u) const {
    const V sp = hn::Sqrt(e.p), sq = hn::Sqrt(e.q);
    u = hn::NegMulAdd(sp, sq, e.q);
    const V diff = hn::Sub(sp, sq);
    return hn::Mul(diff, diff);
  }
  template <class D, class V>
  HWY_INLINE V teacher(D d, const Entry<V>& e) const {
    return hn::NegMulAdd(hn::Sqrt(e.p), hn::Sqrt(e.q), e.p);
  }
};

// Jeffreys: (p - q)(lp - lq).  u = -q (lp - lq) - p + q,  v = p (lp - lq) + p - q.
struct Jeffreys : SumFinish {
  explicit Jeffreys(const DivergenceSpec&) {}
  template <class D, class V>
  HWY_INLINE V term(D d, const Entry<V>& e, V& u) const {
    const V fwd = XLogRatio(d, e.p, e.lp, e.lq), rev = XLogRatio(d, e.q, e.lq, e.lp);
    u = hn::Add(rev, hn::Sub(e.q, e.p));
    return hn::Add(fwd, rev);
  }
  template <class D, class V>
  HWY_INLINE V teacher(D d, const Entry<V>& e) const {
    return hn::Add(XLogRatio(d, e.p, e.lp, e.lq), hn::Sub(e.p, e.q));
  }
};

// Pearson chi^2(p || q) = (p - q)^2 / q.  With r = p^2 / q = exp(2 lp - lq):
// u = q - r,  v = 2 r - 2 p.  The term is q expm1(lp - lq)^2 where p <= 1.5 q (no cancellation
// when p ~ q) and r - 2 p + q elsewhere (r stays exact when q underflows but p^2/q does not).
struct ChiSquared : SumFinish {
  explicit ChiSquared(const DivergenceSpec&) {}
  template <class D, class V>
  HWY_INLINE V Ratio(D d, const Entry<V>& e) const {
    const V two_lp = hn::Add(e.lp, e.lp);
    return hn::IfThenZeroElse(hn::Eq(e.p, hn::Zero(d)), hn::Exp(d, hn::Sub(two_lp, e.lq)));
  }
  template <class D, class V>
  HWY_INLINE V term(D d, const Entry<V>& e, V& u) const {
    const V r = Ratio(d, e);
    u = hn::Sub(e.q, r);
    const auto near = hn::And(hn::Le(e.p, hn::Mul(hn::Set(d, 1.5f), e.q)),
                              hn::Gt(e.q, hn::Zero(d)));
    const V em1 = hn::Expm1(d, hn::IfThenElseZero(near, hn::Sub(e.lp, e.lq)));
    const V small = hn::Mul(e.q, hn::Mul(em1, em1));
    const V large = hn::Add(hn::NegMulAdd(hn::Set(d, 2.0f), e.p, r), e.q);
    return hn::IfThenElse(near, small, large);
  }
  template <class D, class V>
  HWY_INLINE V teacher(D d, const Entry<V>& e) const {
    return hn::Mul(hn::Set(d, 2.0f), hn::Sub(Ratio(d, e), e.p));
  }
};

// w = p^alpha q^(1-alpha), 0 where p = q = 0. The exponent is lq + alpha (lp - lq), exactly
// lq where p = q; alpha lp + (1-alpha) lq where q is masked (lq = -inf) to get the infinities
// right (0 for alpha in (0, 1), +inf for alpha > 1).
template <class D, class V>
HWY_INLINE V PowerMean(D d, const Entry<V>& e, float alpha) {
  const V zero = hn::Zero(d);
  const auto both_zero = hn::And(hn::Eq(e.p, zero), hn::Eq(e.q, zero));
  const V a = hn::Set(d, alpha);
  const V x = hn::IfThenElse(hn::Eq(e.lq, hn::Set(d, -std::numeric_limits<float>::infinity())),
                             hn::MulAdd(a, e.lp, hn::Mul(hn::Set(d, 1.0f - alpha), e.lq)),
                             hn::MulAdd(a, hn::Sub(e.lp, e.lq), e.lq));
  return hn::IfThenZeroElse(both_zero, hn::Exp(d, hn::IfThenZeroElse(both_zero, x)));
}

// alpha p + (1-alpha) q - p^alpha q^(1-alpha) (>= 0 for alpha in [0, 1]) without cancellation
// near alpha = 0 or 1 or near p = q. With the base b = q and c = alpha when alpha <= 1/2, or
// b = p and c = 1 - alpha otherwise (the two are mirror images), and d = log(other / b):
//   mix - w = b [c expm1(d) - expm1(c d)],
// whose error is a few ulp of the term whatever alpha. Where b = 0 or |d| >= 60 (a masked
// entry, or expm1 near overflow) the direct difference is used; mix and w differ a lot there.
template <class D, class V>
HWY_INLINE V MixMinusPowerMean(D d, const Entry<V>& e, float alpha) {
  const bool mirror = alpha > 0.5f;
  const V b = mirror ? e.p : e.q;
  const V lb = mirror ? e.lp : e.lq, lo = mirror ? e.lq : e.lp;
  const V c = hn::Set(d, mirror ? 1.0f - alpha : alpha);
  const V diff = hn::Sub(lo, lb);
  const auto stable = hn::And(hn::Gt(b, hn::Zero(d)), hn::Lt(hn::Abs(diff), hn::Set(d, 60.0f)));
  const V dd = hn::IfThenElseZero(stable, diff);  // masked lanes (inf, NaN) stay finite
  const V via_expm1 = hn::Mul(b, hn::MulSub(c, hn::Expm1(d, dd), hn::Expm1(d, hn::Mul(c, dd))));
  const V mix = hn::MulAdd(hn::Set(d, alpha), e.p, hn::Mul(hn::Set(d, 1.0f - alpha), e.q));
  return hn::IfThenElse(stable, via_expm1, hn::Sub(mix, PowerMean(d, e, alpha)));
}

// w - b for w = b exp(c (l_other - l_b)), i.e. w = p^alpha q^(1-alpha) with b = q, c = alpha
// or b = p, c = 1 - alpha: b expm1(c (l_other - l_b)), accurate when w is close to b (alpha
// near a limit, or p near q). Where b = 0 it is w itself.
template <class D, class V>
HWY_INLINE V PowerMeanMinusBase(D d, const Entry<V>& e, float alpha, bool base_is_p) {
  const V b = base_is_p ? e.p : e.q;
  const V lb = base_is_p ? e.lp : e.lq, lo = base_is_p ? e.lq : e.lp;
  const V c = hn::Set(d, base_is_p ? 1.0f - alpha : alpha);
  const auto zero_base = hn::Eq(b, hn::Zero(d));
  // Clamped: expm1 sees no infinities (89 still overflows to +inf, -104 gives -1).
  const V x = hn::Min(hn::Max(hn::Mul(c, hn::IfThenZeroElse(zero_base, hn::Sub(lo, lb))),
                              hn::Set(d, -104.0f)),
                      hn::Set(d, 89.0f));
  return hn::IfThenElse(zero_base, PowerMean(d, e, alpha), hn::Mul(b, hn::Expm1(d, x)));
}

// Amari alpha-divergence (alpha not 0 or 1; those are the KL limits):
// g = [alpha p + (1-alpha) q - w] / (alpha (1-alpha)), each term >= 0 (for any alpha).
// u = (q - w) / alpha,  v = (p - w) / (1 - alpha).
struct AlphaDivergence : SumFinish {
  float alpha;
  explicit AlphaDivergence(const DivergenceSpec& s) : alpha(s.alpha) {}
  template <class D, class V>
  HWY_INLINE V term(D d, const Entry<V>& e, V& u) const {
    u = hn::Mul(PowerMeanMinusBase(d, e, alpha, false), hn::Set(d, -1.0f / alpha));
    return hn::Mul(MixMinusPowerMean(d, e, alpha), hn::Set(d, 1.0f / (alpha * (1.0f - alpha))));
  }
  template <class D, class V>
  HWY_INLINE V teacher(D d, const Entry<V>& e) const {
    return hn::Mul(PowerMeanMinusBase(d, e, alpha, true), hn::Set(d, -1.0f / (1.0f - alpha)));
  }
};

// Renyi of order alpha (alpha > 0, not 1): log(sum w) / (alpha - 1).  Summed as
// S = sum [w - alpha p - (1-alpha) q] (= sum w - 1, without the cancellation near p = q or near
// alpha = 1) and finished as log1p(S) / (alpha - 1).  u = (1-alpha)(w - q),
// v = alpha (w - p): multiples of q (or p) drop out of the softmax chain rule, and w - q is
// exact where the naive (1-alpha) w - q sum_i w_i would cancel.
struct Renyi {
  static constexpr bool kStudentFactorIsMinusP = false;
  float alpha;
  explicit Renyi(const DivergenceSpec& s) : alpha(s.alpha) {}
  double finish(double s) const { return std::log1p(s) / (static_cast<double>(alpha) - 1.0); }
  double slope(double s) const { return 1.0 / ((static_cast<double>(alpha) - 1.0) * (1.0 + s)); }
  template <class D, class V>
  HWY_INLINE V term(D d, const Entry<V>& e, V& u) const {
    u = hn::Mul(hn::Set(d, 1.0f - alpha), PowerMeanMinusBase(d, e, alpha, false));
    return hn::Neg(MixMinusPowerMean(d, e, alpha));
  }
  template <class D, class V>
  HWY_INLINE V teacher(D d, const Entry<V>& e) const {
    return hn::Mul(hn::Set(d, alpha), PowerMeanMinusBase(d, e, alpha, true));
  }
};

// Soft-label cross-entropy H(p, q) = -sum p lq.  u = -p,  v = -p lq.
struct CrossEntropy : SumFinish {
  static constexpr bool kStudentFactorIsMinusP = true;
  explicit CrossEntropy(const DivergenceSpec&) {}
  template <class D, class V>
  HWY_INLINE V term(D d, const Entry<V>& e, V& u) const {
    u = hn::Neg(e.p);
    return XLogRatio(d, e.p, hn::Zero(d), e.lq);
  }
  template <class D, class V>
  HWY_INLINE V teacher(D d, const Entry<V>& e) const {
    return XLogRatio(d, e.p, hn::Zero(d), e.lq);
  }
};

// Calls fn(Divergence{spec}) with the struct of spec.kind. Limits (jsd beta 0/1, alpha
// divergence alpha 0/1, renyi alpha 1) are resolved to their KL kind before this point.
template <class Fn>
HWY_INLINE void VisitDivergence(const DivergenceSpec& spec, Fn&& fn) {
  switch (spec.kind) {
    case DivergenceKind::forward_kl: return fn(ForwardKL(spec));
    case DivergenceKind::reverse_kl: return fn(ReverseKL(spec));
    case DivergenceKind::jsd: return fn(GeneralizedJSD(spec));
    case DivergenceKind::skew_forward_kl: return fn(SkewForwardKL(spec));
    case DivergenceKind::skew_reverse_kl: return fn(SkewReverseKL(spec));
    case DivergenceKind::tvd: return fn(TotalVariation(spec));
    case DivergenceKind::hellinger: return fn(Hellinger(spec));
    case DivergenceKind::jeffreys: return fn(Jeffreys(spec));
    case DivergenceKind::chi2: return fn(ChiSquared(spec));
    case DivergenceKind::alpha_divergence: return fn(AlphaDivergence(spec));
    case DivergenceKind::renyi: return fn(Renyi(spec));
    case DivergenceKind::cross_entropy: return fn(CrossEntropy(spec));
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace divkit
HWY_AFTER_NAMESPACE();

#endif  // DIVKIT_DIVERGENCES_INL_H_
