// The generalized JSD of rows in long double, and rows near p = q: for the tests of jsd's log of
// the mixture on the CPU (test_mix_log_table.cc) and in the CUDA kernels (the emulator's).
#pragma once

#include <cmath>
#include <random>

#include "test_util.h"

namespace divkit_test {

// The generalized JSD of one row in long double: log-softmax of the fp32 inputs, then per entry
// beta p (x - F) - (1 - beta) q F with F = log(m / q) = log1p(beta expm1(x)), which keeps the
// relative accuracy of terms ~ x^2 (the direct p log(p / m) + q log(q / m) does not).
inline long double jsd_row(const HostMatrix& s, const HostMatrix& t, int64_t i, long double beta) {
  const int64_t v = s.cols();
  auto lse = [&](const HostMatrix& m) {
    long double mx = -INFINITY, sum = 0;
    for (int64_t j = 0; j < v; ++j) mx = std::max(mx, static_cast<long double>(m.get(i, j)));
    for (int64_t j = 0; j < v; ++j) sum += std::exp(static_cast<long double>(m.get(i, j)) - mx);
    return mx + std::log(sum);
  };
  const long double ls = lse(s), lt = lse(t);
  long double total = 0;
  for (int64_t j = 0; j < v; ++j) {
    const long double lq = s.get(i, j) - ls, lp = t.get(i, j) - lt, x = lp - lq;
    const long double f = std::log1p(beta * std::expm1(x));
    total += beta * std::exp(lp) * (x - f) - (1 - beta) * std::exp(lq) * f;
  }
  return total;
}

struct JsdRows {
  HostMatrix s, t;
};
inline JsdRows make_jsd_rows(int64_t n, int64_t v, double noise, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  JsdRows r{HostMatrix(n, v, DType::f32), HostMatrix(n, v, DType::f32)};
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < v; ++j) {
      const double x = 2.0 * nd(rng);
      r.s.set(i, j, x);
      r.t.set(i, j, x + noise * nd(rng));
    }
  return r;
}

}  // namespace divkit_test
