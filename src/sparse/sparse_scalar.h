// The per-bucket math of the sparse and truncated teachers (sparse_kernels.cc's steps 4 and 5)
// in scalar form, __host__ __device__: the CUDA row kernels (sparse_cuda.cu) compute every bucket
// and every gradient entry through these functions, and the host test
// SparseScalar.MatchesTheSimdKernels (tests/cpp/test_cuda.cc) runs them on the CPU against the
// SIMD kernels, so the CPU tests cover what the GPU computes. The divergence terms are those of
// divergence_defs.h (through divergences_scalar.h), applied to the buckets rounded to fp32 exactly
// as the SIMD kernel rounds them.
//
// Also the top-k selection of topk_divergence as the GPU does it (a radix select on order-
// preserving 32-bit keys): the key and the digit choice are here, so that the host test can run
// the same selection against the CPU kernel's heap.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <limits>

#include "core/hd.h"
#include "divergence/divergences_scalar.h"

namespace divkit::sparse_scalar {

inline constexpr double kInfD = std::numeric_limits<double>::infinity();
inline constexpr double kFltMax = 3.4028234663852886e38;  // FLT_MAX
// Log-probabilities are <= 0; servers round, so a little above 0 is accepted (sparse.cc).
inline constexpr double kLogprobTolerance = 1e-3;
// In bucket mode the k probabilities may sum to at most 1 + this (sparse.cc).
inline constexpr double kMassTolerance = 1e-2;

// log(1 - e^x) for x <= 0 (Maechler's log1mexp, as math::log1mexp); 0 at x = -inf.
DIVKIT_HD inline double log1mexp(double x) {
  if (x == -kInfD) return 0.0;
  return x > -0.6931471805599453 ? ::log(-::expm1(x)) : ::log1p(-::exp(x));
}

// The bucket as the SIMD kernel rounds it to fp32 lanes: p = exp(lp), q, lp, lq and
// lr = lp - lq (NaN where both are -inf, as divergence()).
DIVKIT_HD inline scalar::Entry<float> bucket_entry(double lp, double lq, double q) {
  scalar::Entry<float> e;
  e.p = static_cast<float>(::exp(lp));
  e.q = static_cast<float>(q);
  e.lp = static_cast<float>(lp);
  e.lq = static_cast<float>(lq);
  e.lr = static_cast<float>(lp - lq);
  return e;
}

// The divergence term g_b and the student factor u_b = q_b dg/dq_b of one bucket (not Renyi).
template <class Div>
DIVKIT_HD inline float bucket_term(const Div& div, double lp, double lq, double q, float& u) {
  return div.term(scalar_ops::Lane{}, bucket_entry(lp, lq, q), u);
}

// Renyi: the summand of S = sum_b (w_b - alpha p_b - (1 - alpha) q_b) (log1p(S) near D = 0).
DIVKIT_HD inline float renyi_bucket_term(const scalar::Renyi& div, double lp, double lq, double q) {
  return div.term(scalar_ops::Lane{}, bucket_entry(lp, lq, q));
}

// Renyi: log w_b = log(p_b^alpha q_b^(1 - alpha)), with the masked-q conventions of divergence().
DIVKIT_HD inline double renyi_log_w(double alpha, double lp, double lq) {
  if (lq == -kInfD) return (alpha > 1.0 && lp > -kInfD) ? kInfD : -kInfD;
  return lq + alpha * (lp - lq);
}

// Renyi: log(sum_b w_b), from S (near D = 0) or the log-sum-exp of log w.
DIVKIT_HD inline double renyi_log_sum_w(double s1, double amax, double sum_w) {
  return ::fabs(s1) < 0.5 ? ::log1p(s1) : amax + ::log(sum_w);
}

// The row value of a summed divergence: +inf where it is infinite or beyond fp32's range, NaN
// when the gradient would overflow fp32 (the row then gets loss +inf and no gradient).
DIVKIT_HD inline double finish_sum(double value, double sum_u) {
  if (!(::fabs(value) <= kFltMax)) return kInfD;
  if (!(::fabs(sum_u) <= kFltMax)) return ::nan("");
  return value;
}

// The teacher's log-probability of bucket b < k once lse_p = log sum_b p_b is known: renormalized
// (no tail), or as given in bucket mode unless the k sum beyond 1 (rounding: scaled to 1).
DIVKIT_HD inline double teacher_lp(double lp, double lse_p, bool has_tail) {
  if (!has_tail || lse_p > 0.0) return lp - lse_p;
  return lp;
}
// The teacher's tail bucket: log(1 - sum_b p_b), or -inf when the k sum reaches 1.
DIVKIT_HD inline double teacher_tail_lp(double lse_p) {
  return lse_p > 0.0 ? -kInfD : log1mexp(lse_p);
}
// The student's tail bucket: log q_tail and q_tail from Z_tail and Z.
DIVKIT_HD inline double student_tail_lq(double z_tail, double log_z) {
  return z_tail > 0.0 ? ::log(z_tail) - log_z : -kInfD;
}

// dL/ds at a teacher index: (u_b - q_b U) * scale, scale = T^2-factor * grad_scale / T.
DIVKIT_HD inline float top_grad(double scale, double u, double q, double sum_u) {
  return static_cast<float>(scale * (u - q * sum_u));
}
// The tail entries' factor: dL/ds_j = e_j * c, e_j = exp((s_j - max) / T) (fp32).
DIVKIT_HD inline float tail_factor(double scale, double u_tail, double z_tail, double sum_u,
                                   double z) {
  return static_cast<float>(z_tail > 0.0 ? scale * (u_tail / z_tail - sum_u / z) : 0.0);
}
// e_j of a tail entry, in fp32 as the SIMD kernel computes it.
DIVKIT_HD inline float tail_exp(float x, float max, float inv_t) {
  return ::expf((x - max) * inv_t);
}

// Top-k selection: a 32-bit key whose unsigned order is the float order (-0 counted as +0, so
// that equal values tie as they do in the CPU heap). NaN never reaches it (rejected before).
DIVKIT_HD inline uint32_t order_key(float x) {
  if (x == 0.0f) x = 0.0f;
  uint32_t bits;
  memcpy(&bits, &x, sizeof(bits));
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// One radix pass: hist[d] counts the candidates whose current 8-bit digit is d; the `remaining`-th
// largest candidate has the returned digit, and `remaining` becomes its rank within that digit.
DIVKIT_HD inline uint32_t radix_pick(const uint32_t* hist, int64_t& remaining) {
  for (int d = 255; d > 0; --d) {
    if (remaining <= static_cast<int64_t>(hist[d])) return static_cast<uint32_t>(d);
    remaining -= hist[d];
  }
  return 0;
}

}  // namespace divkit::sparse_scalar
