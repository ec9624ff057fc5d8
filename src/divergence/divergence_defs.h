// The per-entry definitions of the token-level divergences: the one place each is written.
// No include guard: included inside a namespace that provides `hn` (Highway's ops, or the scalar
// ops of scalar_ops.h with the same names) and the macro DIVKIT_INLINE, by divergences-inl.h (the
// SIMD CPU kernels, once per target) and by divergences_scalar.h (the CUDA kernels and the host
// tests of the scalar form). See divergences-inl.h for the contract of each struct.
// NOLINT(build/header_guard)

template <class V>
struct Entry {
  V p, q, lp, lq;
  // log p - log q, computed as (t - s) / T - (lse_t - lse_s): its error is that of the logit
  // difference, not of the (larger) log-probabilities. Used wherever the ratio p / q matters.
  V lr;
};

// x * y with the convention 0 * (anything) = 0 (0 log 0 = 0 and masked entries).
template <class D, class V>
DIVKIT_INLINE V XTimes(D d, V x, V y) {
  return hn::IfThenZeroElse(hn::Eq(x, hn::Zero(d)), hn::Mul(x, y));
}
// x * (a - b), same convention.
template <class D, class V>
DIVKIT_INLINE V XLogRatio(D d, V x, V a, V b) {
  return XTimes(d, x, hn::Sub(a, b));
}

// Base of the divergences whose row value is the plain sum of their terms (all but Renyi).
struct SumFinish {
  // True when u = -p exactly (so sum u = -1): the kernel then skips storing u and writes the
  // student gradient as (q - p) / T directly (forward KL and cross-entropy).
  static constexpr bool kStudentFactorIsMinusP = false;
};

// KL(p || q) = sum p (lp - lq).  u = -p,  v = p (lp - lq) + p.
struct ForwardKL : SumFinish {
  static constexpr bool kStudentFactorIsMinusP = true;
  DIVKIT_HD explicit ForwardKL(const DivergenceSpec&) {}
  template <class D, class V>
  DIVKIT_INLINE V term(D d, const Entry<V>& e, V& u) const {
    u = hn::Neg(e.p);
    return XTimes(d, e.p, e.lr);
  }
  template <class D, class V>
  DIVKIT_INLINE V teacher(D d, const Entry<V>& e) const {
    return hn::Add(XTimes(d, e.p, e.lr), e.p);
  }
};

// KL(q || p) = sum q (lq - lp).  u = q (lq - lp) + q,  v = -q.
struct ReverseKL : SumFinish {
  DIVKIT_HD explicit ReverseKL(const DivergenceSpec&) {}
  template <class D, class V>
  DIVKIT_INLINE V term(D d, const Entry<V>& e, V& u) const {
    const V g = XTimes(d, e.q, hn::Neg(e.lr));
    u = hn::Add(g, e.q);
    return g;
  }
  template <class D, class V>
  DIVKIT_INLINE V teacher(D /*d*/, const Entry<V>& e) const {
    return hn::Neg(e.q);
  }
};

// Generalized JSD (0 < beta < 1; the ends are ForwardKL/ReverseKL):
// m = beta p + (1-beta) q,  g = beta p (lp - lm) + (1-beta) q (lq - lm).
// dg/dq = (1-beta)(lq - lm) (the 1/m terms cancel), so u and v are the two halves of g.
//
// With `table` (the SIMD CPU kernels on AVX-512: BuildMixLogTable for a = 1 - beta), vectors whose
// every |lr| < 8 (the common case) take F = log(m / q) = log((1 - beta) + beta e^lr) from the
// table's polynomials instead of a log of m: then lq - lm = -F and lp - lm = lr - F. One table
// evaluation costs about half the log, and F = lr (F / lr) keeps its relative accuracy near p = q,
// where lp - lm and lq - lm were differences of two logs near log q.
struct GeneralizedJSD : SumFinish {
  float beta;
  const float* table = nullptr;  // MixLogTable's coefficients for 1 - beta (SIMD CPU kernels only)
  DIVKIT_HD explicit GeneralizedJSD(const DivergenceSpec& s) : beta(s.beta) {}
  template <class D, class V>
  DIVKIT_INLINE bool TableApplies(D d, const Entry<V>& e) const {
    return table != nullptr && hn::AllTrue(d, hn::Lt(hn::Abs(e.lr), hn::Set(d, 8.0f)));
  }
  template <class D, class V>
  DIVKIT_INLINE V LogMixture(D d, const Entry<V>& e) const {
    const V b = hn::Set(d, beta), one_minus_b = hn::Set(d, 1.0f - beta);
    return hn::Log(d, hn::MulAdd(b, e.p, hn::Mul(one_minus_b, e.q)));
  }
  // F = log(m / q) = log1p(beta expm1(lr)) where every |lr| < 8 (no table): relatively accurate
  // near p = q, as the table's, for an expm1 and a log1p in place of one log.
  template <class D, class V>
  DIVKIT_INLINE bool NearFormApplies(D d, const Entry<V>& e) const {
    return hn::kJsdMixtureFromExpm1 && hn::AllTrue(d, hn::Lt(hn::Abs(e.lr), hn::Set(d, 8.0f)));
  }
  template <class D, class V>
  DIVKIT_INLINE V MixtureLogNear(D d, const Entry<V>& e) const {
    return hn::Log1p(d, hn::Mul(hn::Set(d, beta), hn::Expm1(d, e.lr)));
  }
  template <class D, class V>
  DIVKIT_INLINE V term(D d, const Entry<V>& e, V& u) const {
    // F = log(m / q): lq - lm = -F, lp - lm = lr - F. p and q are positive and finite in every
    // lane where |lr| < 8.
    if (TableApplies(d, e) || NearFormApplies(d, e)) {
      const V f = TableApplies(d, e) ? hn::MixLogTable(d, e.lr, table) : MixtureLogNear(d, e);
      u = hn::Mul(hn::Set(d, beta - 1.0f), hn::Mul(e.q, f));
      return hn::MulAdd(hn::Mul(hn::Set(d, beta), e.p), hn::Sub(e.lr, f), u);
    }
    // Vectors where every p and q exceeds 2^-125 (almost all): m is then a normal float and every
    // log finite, so the log skips its subnormal check and the products their 0 log 0 selects
    // (which would not change a value there).
    if (hn::AllTrue(d, hn::Gt(hn::Min(e.p, e.q), hn::Set(d, 2.3509887e-38f)))) {
      const V b = hn::Set(d, beta), one_minus_b = hn::Set(d, 1.0f - beta);
      const V lm = hn::LogNormal(d, hn::MulAdd(b, e.p, hn::Mul(one_minus_b, e.q)));
      u = hn::Mul(one_minus_b, hn::Mul(e.q, hn::Sub(e.lq, lm)));
      return hn::MulAdd(b, hn::Mul(e.p, hn::Sub(e.lp, lm)), u);
    }
    const V lm = LogMixture(d, e);
    u = hn::Mul(hn::Set(d, 1.0f - beta), XLogRatio(d, e.q, e.lq, lm));
    return hn::MulAdd(hn::Set(d, beta), XLogRatio(d, e.p, e.lp, lm), u);
  }
  template <class D, class V>
  DIVKIT_INLINE V teacher(D d, const Entry<V>& e) const {
    if (TableApplies(d, e))
      return hn::Mul(hn::Mul(hn::Set(d, beta), e.p),
                     hn::Sub(e.lr, hn::MixLogTable(d, e.lr, table)));
    if (NearFormApplies(d, e))
      return hn::Mul(hn::Mul(hn::Set(d, beta), e.p), hn::Sub(e.lr, MixtureLogNear(d, e)));
    return hn::Mul(hn::Set(d, beta), XLogRatio(d, e.p, e.lp, LogMixture(d, e)));
  }
};

// p q / m with 0 where m = 0 (both probabilities 0): m is raised to the smallest normal float
// (the same bits wherever m is normal; where it is subnormal the result, below 1e-37, is a little
// smaller), which costs less than a compare and two selects around the division.
template <class D, class V>
DIVKIT_INLINE V ProductOverMixture(D d, V p, V q, V m) {
  return hn::Div(hn::Mul(p, q), hn::Max(m, hn::Set(d, 1.17549435e-38f)));
}

// log(b / m) = -log1p((1 - a) expm1(x)) for the mixture m = a b + (1 - a) o, from
// x = log(o / b) in [-87, 88] (below -87 expm1 rounds to -1 anyway).
template <class D, class V>
DIVKIT_INLINE V LogRatioToMixtureNear(D d, V x, float a) {
  return hn::Neg(hn::Log1p(d, hn::Mul(hn::Set(d, 1.0f - a), hn::Expm1(d, x))));
}

// b log(b / m) for the mixture m = a b + (1 - a) o, from lr = log(b / o):
//   -b log1p((1 - a) expm1(-lr)),
// exactly 0 where b = o, finite (-log a) where o = 0, and lr - log(1 - a) where o >> b (there
// expm1 would overflow; the dropped a b is below e^-80 of m); 0 where b = 0 (masked). Needs
// 0 < a <= 1; log_1ma is log(1 - a) rounded to float (computed once per call by the struct: a
// library call inside the entry loop would cost more than the rest of the term). Vectors without
// a lane of the o >> b branch (almost all) skip its selects: for a >= 1e-6, log(b / m) is then
// finite in every lane (1 + (1 - a) expm1 >= a, less the rounding of 1 - a), so b = 0 needs no
// select either. (Below, 1 - a rounds to 1 and log(b / m) can be +inf, e.g. where b = o = 0.)
//
// With `table` (the SIMD CPU kernels on AVX-512: BuildMixLogTable in divergences-inl.h), vectors
// whose every |lr| < 8 (the common case) take log(m / b) = F(x) = log(a + (1 - a) e^x), x = -lr,
// from the per-alpha piecewise polynomials of the table instead of the expm1 and log1p: F is
// analytic in the strip |Im x| < pi whatever alpha, so F(x) / x (smooth, 1 - a at 0) is fitted per
// interval of width 1/2 to a few ulp (relative: F = x (F / x) keeps F's relative accuracy near x =
// 0).
template <class D, class V>
DIVKIT_INLINE V TimesLogRatioToMixture(D d, V b, V lr, float a, float log_1ma,
                                       const float* table = nullptr) {
  // a = 1: m = b, so b log(b / m) = 0; the o >> b branch below would give lr - log(0) = +inf.
  if (a == 1.0f) return hn::Zero(d);
  const auto far = hn::Lt(lr, hn::Set(d, -80.0f));
  const V x = hn::Max(hn::Neg(lr), hn::Set(d, -87.0f));  // NaN (b = o = 0) -> -87 as well
  if (table != nullptr && hn::AllTrue(d, hn::Lt(hn::Abs(lr), hn::Set(d, 8.0f))))
    return hn::Neg(hn::Mul(b, hn::MixLogTable(d, x, table)));
  if (a >= 1e-6f && hn::AllFalse(d, far)) return hn::Mul(b, LogRatioToMixtureNear(d, x, a));
  const V near = LogRatioToMixtureNear(d, hn::Min(x, hn::Set(d, 80.0f)), a);
  return XTimes(d, b, hn::IfThenElse(far, hn::Sub(lr, hn::Set(d, log_1ma)), near));
}

// DistiLLM skew KL: KL(p || m), m = alpha p + (1-alpha) q  (alpha = 0 is forward_kl).
// g = p log(p / m);  u = -(1-alpha) p q / m,  v = g + (1-alpha) p q / m.
struct SkewForwardKL : SumFinish {
  float alpha, log_1ma;          // log(1 - alpha)
  const float* table = nullptr;  // MixLogTable's coefficients for alpha (SIMD CPU kernels only)
  DIVKIT_HD explicit SkewForwardKL(const DivergenceSpec& s)
      : alpha(s.alpha), log_1ma(static_cast<float>(log1p_f64(-static_cast<double>(s.alpha)))) {}
  template <class D, class V>
  DIVKIT_INLINE V Mixture(D d, const Entry<V>& e) const {
    return hn::MulAdd(hn::Set(d, alpha), e.p, hn::Mul(hn::Set(d, 1.0f - alpha), e.q));
  }
  template <class D, class V>
  DIVKIT_INLINE V term(D d, const Entry<V>& e, V& u) const {
    u = hn::Mul(hn::Set(d, alpha - 1.0f), ProductOverMixture(d, e.p, e.q, Mixture(d, e)));
    return TimesLogRatioToMixture(d, e.p, e.lr, alpha, log_1ma, table);
  }
  template <class D, class V>
  DIVKIT_INLINE V teacher(D d, const Entry<V>& e) const {
    return hn::MulAdd(hn::Set(d, 1.0f - alpha), ProductOverMixture(d, e.p, e.q, Mixture(d, e)),
                      TimesLogRatioToMixture(d, e.p, e.lr, alpha, log_1ma, table));
  }
};

// DistiLLM skew reverse KL: KL(q || m), m = (1-alpha) p + alpha q  (alpha = 0 is reverse_kl).
// g = q log(q / m);  u = g + (1-alpha) p q / m,  v = -(1-alpha) p q / m.
struct SkewReverseKL : SumFinish {
  float alpha, log_1ma;          // log(1 - alpha)
  const float* table = nullptr;  // MixLogTable's coefficients for alpha (SIMD CPU kernels only)
  DIVKIT_HD explicit SkewReverseKL(const DivergenceSpec& s)
      : alpha(s.alpha), log_1ma(static_cast<float>(log1p_f64(-static_cast<double>(s.alpha)))) {}
  template <class D, class V>
  DIVKIT_INLINE V Mixture(D d, const Entry<V>& e) const {
    return hn::MulAdd(hn::Set(d, 1.0f - alpha), e.p, hn::Mul(hn::Set(d, alpha), e.q));
  }
  template <class D, class V>
  DIVKIT_INLINE V term(D d, const Entry<V>& e, V& u) const {
    const V g = TimesLogRatioToMixture(d, e.q, hn::Neg(e.lr), alpha, log_1ma, table);
    u = hn::MulAdd(hn::Set(d, 1.0f - alpha), ProductOverMixture(d, e.p, e.q, Mixture(d, e)), g);
    return g;
  }
  template <class D, class V>
  DIVKIT_INLINE V teacher(D d, const Entry<V>& e) const {
    return hn::Mul(hn::Set(d, alpha - 1.0f), ProductOverMixture(d, e.p, e.q, Mixture(d, e)));
  }
};

// 0.5 |p - q|.  u = -0.5 q sign(p - q),  v = 0.5 p sign(p - q)  (sign(0) = 0, as torch.abs).
struct TotalVariation : SumFinish {
  DIVKIT_HD explicit TotalVariation(const DivergenceSpec&) {}
  template <class D, class V>
  DIVKIT_INLINE V HalfSign(D d, const Entry<V>& e) const {
    const V half = hn::Set(d, 0.5f);
    return hn::IfThenElse(hn::Gt(e.p, e.q), half,
                          hn::IfThenElse(hn::Lt(e.p, e.q), hn::Neg(half), hn::Zero(d)));
  }
  template <class D, class V>
  DIVKIT_INLINE V term(D d, const Entry<V>& e, V& u) const {
    u = hn::Neg(hn::Mul(e.q, HalfSign(d, e)));
    return hn::Mul(hn::Set(d, 0.5f), hn::Abs(hn::Sub(e.p, e.q)));
  }
  template <class D, class V>
  DIVKIT_INLINE V teacher(D d, const Entry<V>& e) const {
    return hn::Mul(e.p, HalfSign(d, e));
  }
};

// Squared Hellinger without the 1/2: (sqrt p - sqrt q)^2.  u = q - sqrt(pq),  v = p - sqrt(pq).
struct Hellinger : SumFinish {
  DIVKIT_HD explicit Hellinger(const DivergenceSpec&) {}
  template <class D, class V>
  DIVKIT_INLINE V term(D /*d*/, const Entry<V>& e, V& u) const {
    const V sp = hn::Sqrt(e.p), sq = hn::Sqrt(e.q);
    u = hn::NegMulAdd(sp, sq, e.q);
    const V diff = hn::Sub(sp, sq);
    return hn::Mul(diff, diff);
  }
  template <class D, class V>
  DIVKIT_INLINE V teacher(D /*d*/, const Entry<V>& e) const {
    return hn::NegMulAdd(hn::Sqrt(e.p), hn::Sqrt(e.q), e.p);
  }
};

// Jeffreys: (p - q)(lp - lq).  u = -q (lp - lq) - p + q,  v = p (lp - lq) + p - q.
struct Jeffreys : SumFinish {
  DIVKIT_HD explicit Jeffreys(const DivergenceSpec&) {}
  template <class D, class V>
  DIVKIT_INLINE V term(D d, const Entry<V>& e, V& u) const {
    const V fwd = XTimes(d, e.p, e.lr), rev = XTimes(d, e.q, hn::Neg(e.lr));
    u = hn::Add(rev, hn::Sub(e.q, e.p));
    return hn::Add(fwd, rev);
  }
  template <class D, class V>
  DIVKIT_INLINE V teacher(D d, const Entry<V>& e) const {
    return hn::Add(XTimes(d, e.p, e.lr), hn::Sub(e.p, e.q));
  }
};

// Pearson chi^2(p || q) = (p - q)^2 / q.  With r = p^2 / q = p exp(lr):
// u = q - r,  v = 2 r - 2 p.  The term is q expm1(lr)^2 where p <= 1.5 q (no cancellation
// when p ~ q) and r - 2 p + q elsewhere (r stays exact when q underflows but p^2/q does not).
// One expm1 per entry serves both: r = p (1 + expm1(lr)), whose absolute error stays below an
// ulp of p (enough for u, v and, where p > 1.5 q, the term).
struct ChiSquared : SumFinish {
  DIVKIT_HD explicit ChiSquared(const DivergenceSpec&) {}
  template <class D, class V>
  DIVKIT_INLINE V Expm1Ratio(D d, const Entry<V>& e) const {
    return Expm1OrInf(d, e.lr);
  }
  // p exp(lr); exp(lp + lr) where p underflowed to 0 or exp(lr) alone would overflow (rare:
  // computed only when a vector has such a lane).
  template <class D, class V>
  DIVKIT_INLINE V Ratio(D d, const Entry<V>& e, V em1) const {
    const auto direct = hn::Or(hn::Gt(e.lr, hn::Set(d, 80.0f)), hn::Eq(e.p, hn::Zero(d)));
    V r = hn::MulAdd(e.p, em1, e.p);
    if (!hn::AllFalse(d, direct)) r = hn::IfThenElse(direct, ExpOrInf(d, hn::Add(e.lp, e.lr)), r);
    return hn::IfThenZeroElse(hn::Eq(e.lp, hn::Set(d, -kInfinityF)), r);
  }
  template <class D, class V>
  DIVKIT_INLINE V term(D d, const Entry<V>& e, V& u) const {
    const V em1 = Expm1Ratio(d, e);
    const V r = Ratio(d, e, em1);
    u = hn::Sub(e.q, r);
    const auto near =
        hn::And(hn::Le(e.p, hn::Mul(hn::Set(d, 1.5f), e.q)), hn::Gt(e.q, hn::Zero(d)));
    const V small = hn::Mul(e.q, hn::Mul(em1, em1));
    const V large = hn::Add(hn::NegMulAdd(hn::Set(d, 2.0f), e.p, r), e.q);
    return hn::IfThenElse(near, small, large);
  }
  template <class D, class V>
  DIVKIT_INLINE V teacher(D d, const Entry<V>& e) const {
    return hn::Mul(hn::Set(d, 2.0f), hn::Sub(Ratio(d, e, Expm1Ratio(d, e)), e.p));
  }
};

// w = p^alpha q^(1-alpha) = q exp(alpha lr), or exp(lq + alpha lr) where q underflowed to 0
// or exp(alpha lr) alone would overflow. Where q is masked (lq = -inf): +inf if p > 0 and
// alpha > 1, else 0.
template <class D, class V>
DIVKIT_INLINE V PowerMean(D d, const Entry<V>& e, float alpha) {
  const V zero = hn::Zero(d);
  const V x = hn::Mul(hn::Set(d, alpha), e.lr);
  const auto direct = hn::Or(hn::Gt(x, hn::Set(d, 80.0f)), hn::Eq(e.q, zero));
  const auto masked_q = hn::Eq(e.lq, hn::Set(d, -kInfinityF));
  const V ex =
      ExpOrInf(d, hn::IfThenElse(direct, hn::Add(e.lq, hn::IfThenZeroElse(masked_q, x)), x));
  const V w = hn::IfThenElse(direct, ex, hn::Mul(e.q, ex));
  const V at_masked_q =
      alpha > 1.0f ? hn::IfThenElseZero(hn::Gt(e.p, zero), hn::Set(d, kInfinityF)) : zero;
  return hn::IfThenElse(masked_q, at_masked_q, w);
}

// alpha p + (1-alpha) q - p^alpha q^(1-alpha) (>= 0 for alpha in [0, 1]) without cancellation
// near alpha = 0 or 1 or near p = q. With the base b = q and c = alpha when alpha <= 1/2, or
// b = p and c = 1 - alpha otherwise (the two are mirror images), and d = log(other / b):
//   mix - w = b [c expm1(d) - expm1(c d)],
// whose error is a few ulp of the term whatever alpha. Where b = 0 or |d| >= 60 (a masked
// entry, or expm1 near overflow) the direct difference is used; mix and w differ a lot there.
// At alpha = 1/2 the bracket is computed as expm1(d / 2)^2 / 2 (the same value, without the
// cancellation). Also gives w - b = b expm1(c d), the same bits as PowerMeanMinusBase(e, alpha, b
// is p), from the expm1 already computed; the exp of the direct form is computed only for vectors
// that need it. With the w_minus_q argument, also w - q: w - b where b = q; where b = p (alpha >
// 1/2, c < 1/2, and d = log(q / p)), from the same two expm1: p (expm1(c d) - expm1(d)), whose
// two terms never cancel more than 5-fold where q > w / 2 (near p = q it is ~ p (c - 1) d, as
// accurate as q expm1(alpha log(p / q))), and (p + p expm1(c d)) - q elsewhere (then q <= w / 2,
// no cancellation): no third transcendental function. Likewise w - p with the w_minus_p
// argument (the teacher factor): w - b where b = p; where b = q, q (expm1(c d) - expm1(d)) where
// p > w / 2 and (q + q expm1(c d)) - p elsewhere, and at alpha = 1/2 -w expm1(d / 2) (exact,
// no cancellation anywhere).
template <class D, class V>
DIVKIT_INLINE V MixMinusPowerMean(D d, const Entry<V>& e, float alpha, V& w_minus_base,
                                  V* w_minus_q = nullptr, V* w_minus_p = nullptr);

template <class D, class V>
DIVKIT_INLINE V MixMinusPowerMean(D d, const Entry<V>& e, float alpha) {
  V unused;
  return MixMinusPowerMean(d, e, alpha, unused);
}

// w - b for w = b exp(c (l_other - l_b)), i.e. w = p^alpha q^(1-alpha) with b = q, c = alpha
// or b = p, c = 1 - alpha: b expm1(c (l_other - l_b)), accurate when w is close to b (alpha
// near a limit, or p near q). Where b = 0 or w >> b, PowerMean(e) - b.
template <class D, class V>
DIVKIT_INLINE V PowerMeanMinusBase(D d, const Entry<V>& e, float alpha, bool base_is_p) {
  const V b = base_is_p ? e.p : e.q;
  const V c = hn::Set(d, base_is_p ? 1.0f - alpha : alpha);
  const V diff = base_is_p ? hn::Neg(e.lr) : e.lr;  // log(other / b)
  const auto zero_base = hn::Eq(b, hn::Zero(d));
  // c diff, with masked lanes (inf, NaN) zeroed and clamped below: expm1(-104) = -1.
  const V x = hn::Max(hn::Mul(c, hn::IfThenZeroElse(zero_base, diff)), hn::Set(d, -104.0f));
  const auto direct = hn::Or(zero_base, hn::Gt(x, hn::Set(d, 80.0f)));  // w >> b: no cancellation
  return hn::IfThenElse(direct, hn::Sub(PowerMean(d, e, alpha), b),
                        hn::Mul(b, Expm1OrInf(d, hn::IfThenZeroElse(direct, x))));
}

template <class D, class V>
DIVKIT_INLINE V MixMinusPowerMean(D d, const Entry<V>& e, float alpha, V& w_minus_base,
                                  V* w_minus_q, V* w_minus_p) {
  const bool mirror = alpha > 0.5f;
  const V b = mirror ? e.p : e.q;
  const V c = hn::Set(d, mirror ? 1.0f - alpha : alpha);
  const V diff = mirror ? hn::Neg(e.lr) : e.lr;  // log(other / b)
  const auto stable = hn::And(hn::Gt(b, hn::Zero(d)), hn::Lt(hn::Abs(diff), hn::Set(d, 60.0f)));
  const V dd = hn::IfThenElseZero(stable, diff);  // masked lanes (inf, NaN) stay finite
  // |dd| < 60, so expm1(dd) and, where |c| <= 1, expm1(c dd) need no range check.
  const float cf = mirror ? 1.0f - alpha : alpha;
  const V em1_cd =
      cf >= -1.0f && cf <= 1.0f ? Expm1Moderate(d, hn::Mul(c, dd)) : Expm1OrInf(d, hn::Mul(c, dd));
  // c = 1/2 (alpha = 1/2, Hellinger's order): expm1(d) = e (e + 2) with e = expm1(d / 2), so
  // the bracket is e^2 / 2 exactly: one expm1 instead of two, and no cancellation.
  const bool half = (mirror ? 1.0f - alpha : alpha) == 0.5f;
  const V em1_d = half ? em1_cd : Expm1Moderate(d, dd);  // mirror: c != 1/2, so not half
  const V bracket =
      half ? hn::Mul(hn::Set(d, 0.5f), hn::Mul(em1_cd, em1_cd)) : hn::MulSub(c, em1_d, em1_cd);
  const V via_expm1 = hn::Mul(b, bracket);
  w_minus_base = hn::Mul(b, em1_cd);
  if (w_minus_q != nullptr) {
    if (mirror) {
      const V w = hn::MulAdd(e.p, em1_cd, e.p);
      const V far = hn::Sub(w, e.q);
      const V near = hn::Mul(e.p, hn::Sub(em1_cd, em1_d));
      *w_minus_q = hn::IfThenElse(hn::Le(hn::Add(e.q, e.q), w), far, near);
    } else {
      *w_minus_q = w_minus_base;
    }
  }
  if (w_minus_p != nullptr) {
    if (mirror) {
      *w_minus_p = w_minus_base;
    } else {
      const V w = hn::MulAdd(e.q, em1_cd, e.q);
      if (half) {
        *w_minus_p = hn::Neg(hn::Mul(w, em1_cd));
      } else {
        const V far = hn::Sub(w, e.p);
        const V near = hn::Mul(e.q, hn::Sub(em1_cd, em1_d));
        *w_minus_p = hn::IfThenElse(hn::Le(hn::Add(e.p, e.p), w), far, near);
      }
    }
  }
  if (hn::AllTrue(d, stable)) return via_expm1;
  w_minus_base = hn::IfThenElse(stable, w_minus_base, PowerMeanMinusBase(d, e, alpha, mirror));
  if (w_minus_q != nullptr)
    *w_minus_q = mirror ? hn::IfThenElse(stable, *w_minus_q, PowerMeanMinusBase(d, e, alpha, false))
                        : w_minus_base;
  if (w_minus_p != nullptr)
    *w_minus_p = mirror ? w_minus_base
                        : hn::IfThenElse(stable, *w_minus_p, PowerMeanMinusBase(d, e, alpha, true));
  const V mix = hn::MulAdd(hn::Set(d, alpha), e.p, hn::Mul(hn::Set(d, 1.0f - alpha), e.q));
  return hn::IfThenElse(stable, via_expm1, hn::Sub(mix, PowerMean(d, e, alpha)));
}

// |x| below which the power-mean table applies (its intervals reach
// [-(kPowIntervals + 1) / 2, (kPowIntervals - 1) / 2) / kPowScale).
constexpr float kPowTableRange = (hn::kPowIntervals - 1) / (2.0f * hn::kPowScale);

// The alpha divergence's and Renyi's quantities from a power-mean table (divergences-inl.h's
// BuildPowerTable, built by the SIMD CPU kernels; the scalar form has none) for vectors whose
// every x = log(p / q) has |x| < kPowTableRange (masked and infinite x fail the test). With the
// table's constants kg, ku, kv, a lane's
//   kg (mix - w) = q x^2 T0(x),   ku (w - q) = q x T1(x),   kv (w - p) = q x T2(x):
// a permute per coefficient and one Horner chain per quantity instead of two expm1 per entry,
// and each quantity relatively accurate to a few ulp near x = 0 (p = q), where the bracket
// c expm1(x) - expm1(c x) of MixMinusPowerMean cancels. Lanes where q underflowed to 0 (p is then
// as small) give 0. Other vectors take MixMinusPowerMean.
template <class D, class V>
DIVKIT_INLINE bool PowerTableApplies(D d, V x) {
  return hn::AllTrue(d, hn::Lt(hn::Abs(x), hn::Set(d, kPowTableRange)));
}

// Amari alpha-divergence (alpha not 0 or 1; those are the KL limits):
// g = [alpha p + (1-alpha) q - w] / (alpha (1-alpha)), each term >= 0 (for any alpha).
// u = (q - w) / alpha,  v = (p - w) / (1 - alpha).
struct AlphaDivergence : SumFinish {
  float alpha;
  DIVKIT_HD explicit AlphaDivergence(const DivergenceSpec& s) : alpha(s.alpha) {}
  template <class D, class V>
  DIVKIT_INLINE V term(D d, const Entry<V>& e, V& u) const {
    V w_minus_base, w_minus_q;
    const V g = MixMinusPowerMean(d, e, alpha, w_minus_base, &w_minus_q);
    u = hn::Mul(w_minus_q, hn::Set(d, -1.0f / alpha));
    return hn::Mul(g, hn::Set(d, 1.0f / (alpha * (1.0f - alpha))));
  }
  // The same MixMinusPowerMean as term()'s (the compiler shares the two in the kernel's
  // loop), so that w - p costs no third expm1.
  template <class D, class V>
  DIVKIT_INLINE V teacher(D d, const Entry<V>& e) const {
    V w_minus_base, w_minus_q, w_minus_p;
    MixMinusPowerMean(d, e, alpha, w_minus_base, &w_minus_q, &w_minus_p);
    return hn::Mul(w_minus_p, hn::Set(d, -1.0f / (1.0f - alpha)));
  }
};

// Renyi of order alpha (alpha > 0, not 1): log(sum_j w_j) / (alpha - 1). Its row is a log of
// a sum, computed in log space by the kernel's RenyiRow (divergence_kernels.cc), which also
// writes the gradients. The term here is the summand of S = sum (w - alpha p - (1-alpha) q)
// = sum w - 1, used as log1p(S) near D = 0 where log(sum w) would cancel.
struct Renyi {
  float alpha;
  // The power-mean table (SIMD CPU kernels; see PowerTableApplies), with the constants kg = -1
  // and ku = 1: w - mix and w - q; at alpha > 1/2 its w - q polynomials are those of w - p on
  // the intervals k <= -kFarK (see TermAndFactor).
  const float* table = nullptr;
  // The first interval whose end is below -log 2 (p < q / 2 there): x <= -0.875 or -0.75.
  static constexpr int kFarK = hn::kPowScale == 4.0f ? 4 : 2;
  DIVKIT_HD explicit Renyi(const DivergenceSpec& s) : alpha(s.alpha) {}
  template <class D, class V>
  DIVKIT_INLINE V term(D d, const Entry<V>& e) const {
    V u;
    return TermAndFactor(d, e, u);
  }
  // The term and, in u, w - q (the student factor of the kernel's cached sweep, RenyiRowSumsCached:
  // its sum of w is that of q + u). At alpha > 1/2, where p is well below q, u is
  // (w - p) + (p - q) instead: its one rounding of ~q is unbiased, so the errors of the w << q
  // that q + u recovers do not add up over the row as those of the expm1 or table forms do (they
  // are kept near p = q, where p - q would carry p's and q's rounding). "Well below": p <= q / 2
  // on the direct path; on the table's, x = log(p / q) in the intervals k <= -kFarK, which hold
  // w - p (at alpha < 1/2 the table holds w - q there too, and p - q is not added).
  template <class D, class V>
  DIVKIT_INLINE V TermAndFactor(D d, const Entry<V>& e, V& u) const {
    if (table != nullptr && PowerTableApplies(d, e.lr)) {
      const V qx = hn::Mul(e.q, e.lr);
      u = hn::Mul(qx, hn::PowTable(d, e.lr, table, 1));
      if (alpha > 0.5f) {
        const auto far = hn::Le(hn::PowTableK(d, e.lr), hn::Set(d, -static_cast<float>(kFarK)));
        u = hn::Add(u, hn::IfThenElseZero(far, hn::Sub(e.p, e.q)));
      }
      return hn::Mul(hn::Mul(qx, e.lr), hn::PowTable(d, e.lr, table, 0));
    }
    V w_minus_base;  // w - b: w - p where alpha > 1/2
    const V g = hn::Neg(MixMinusPowerMean(d, e, alpha, w_minus_base, &u));
    if (alpha > 0.5f)
      u = hn::IfThenElse(hn::Le(hn::Add(e.p, e.p), e.q), hn::Add(w_minus_base, hn::Sub(e.p, e.q)),
                         u);
    return g;
  }
};

// Soft-label cross-entropy H(p, q) = -sum p lq.  u = -p,  v = -p lq.
struct CrossEntropy : SumFinish {
  static constexpr bool kStudentFactorIsMinusP = true;
  DIVKIT_HD explicit CrossEntropy(const DivergenceSpec&) {}
  template <class D, class V>
  DIVKIT_INLINE V term(D d, const Entry<V>& e, V& u) const {
    u = hn::Neg(e.p);
    return XLogRatio(d, e.p, hn::Zero(d), e.lq);
  }
  template <class D, class V>
  DIVKIT_INLINE V teacher(D d, const Entry<V>& e) const {
    return XLogRatio(d, e.p, hn::Zero(d), e.lq);
  }
};

// Calls fn(Divergence{spec}) with the struct of spec.kind. Limits (jsd beta 0/1, alpha
// divergence alpha 0/1, renyi alpha 1) are resolved to their KL kind before this point.
template <class Fn>
DIVKIT_INLINE void VisitDivergence(const DivergenceSpec& spec, Fn&& fn) {
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
