// Scalar fp64 functions in their stable forms, for the families that compute per sequence or per
// element in fp64 (preference, RLHF, distillation, the sparse teacher's tail bucket).
#pragma once

#include <cmath>
#include <limits>

namespace divkit::math {

// Exponent cap: exp(80) = 5.5e34 stays finite once rounded to fp32 (TRL's clamp).
inline constexpr double kMaxExp = 80.0;

// 1 / (1 + e^-x), without overflow for either sign of x.
inline double sigmoid(double x) {
  if (x >= 0) return 1.0 / (1.0 + std::exp(-x));
  const double e = std::exp(x);
  return e / (1.0 + e);
}

// log sigmoid(x) = -softplus(-x), accurate for large |x|.
inline double log_sigmoid(double x) {
  return x >= 0 ? -std::log1p(std::exp(-x)) : x - std::log1p(std::exp(x));
}

// log(1 - e^x) for x <= 0 (Maechler's log1mexp); 0 at x = -inf.
inline double log1mexp(double x) {
  if (x == -std::numeric_limits<double>::infinity()) return 0.0;
  return x > -M_LN2 ? std::log(-std::expm1(x)) : std::log1p(-std::exp(x));
}

// a * log_b with the convention 0 log 0 = 0 (a >= 0; log_b may be -inf where a = 0).
inline double xlogy(double a, double log_b) { return a == 0.0 ? 0.0 : a * log_b; }

}  // namespace divkit::math
