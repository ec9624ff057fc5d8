// The power-mean table of the alpha divergence and Renyi (divergences-inl.h's BuildPowerTable)
// against long double. The SIMD kernels evaluate it with permutes; the scalar PowTable here
// takes the same coefficients in the same order.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "divergence/divergences-inl.h"
#include "divergence/scalar_ops.h"
#include "test_util.h"

namespace divkit_test {
namespace {
// The power-mean table of the alpha divergence and Renyi (BuildPowerTable, evaluated as the
// kernels do, here through the scalar PowTable): each of its three quantities, mix - w, w - q
// and w - p for q = 1, p = e^x, against long double over the table's whole range and down to
// |x| = 1e-15 (where the expm1 form c expm1(x) - expm1(c x) loses every digit of mix - w; below,
// mix - w ~ x^2 leaves fp32's normal range).
TEST(PowerTable, QuantitiesRelativelyAccurateOverItsRange) {
  namespace hn = divkit::HWY_NAMESPACE;
  namespace so = divkit::scalar_ops;
  const long double eps = std::ldexp(1.0L, -23);
  std::vector<float> xs;
  const float range = hn::defs::kPowTableRange;
  for (int i = 0; i <= 20000; ++i) xs.push_back(-range + 2 * range * (i + 0.5f) / 20001.0f);
  for (float m = 1e-15f; m < 1.0f; m *= 3.7f) xs.push_back(m), xs.push_back(-m);
  for (double alpha : {-1.0, -0.5, 0.1, 0.3, 0.7, 0.9, 1.5, 2.0}) {
    std::vector<float> table(3 * so::kPowIntervals * (so::kPowDegree + 1));
    hn::BuildPowerTable(alpha, 1.0, 1.0, 1.0, so::kPowIntervals, table.data());
    const long double c = alpha;
    double worst[3] = {0, 0, 0};
    for (const float x : xs) {
      const long double lx = x;
      // (mix - w, w - q, w - p) for q = 1: by their series near 0, closed forms beyond.
      long double ref[3];
      if (std::fabs(x) < 0.5f) {
        long double b = 0, e1 = 0, e = 0, term = 1, ck = 1;
        for (int k = 1; k < 40; ++k) {
          term *= lx / k;
          ck *= c;
          b += (c - ck) * term, e1 += ck * term, e += term;
        }
        ref[0] = b, ref[1] = e1, ref[2] = e1 - e;
      } else {
        ref[0] = c * std::expm1(lx) - std::expm1(c * lx);
        ref[1] = std::expm1(c * lx);
        ref[2] = std::exp(c * lx) - std::exp(lx);
      }
      const float got[3] = {x * x * so::PowTable(so::Lane{}, x, table.data(), 0),
                            x * so::PowTable(so::Lane{}, x, table.data(), 1),
                            x * so::PowTable(so::Lane{}, x, table.data(), 2)};
      for (int f = 0; f < 3; ++f)
        worst[f] = std::max(worst[f], double(std::fabs(got[f] - ref[f]) / std::fabs(ref[f]) / eps));
    }
    for (int f = 0; f < 3; ++f)
      EXPECT_LT(worst[f], 8.0) << "alpha " << alpha << " quantity " << f << ": " << worst[f]
                               << " ulp";
  }
}

// The kernel picks the table per call from a sample row (divergence_kernels.cc's PowerTablePays):
// rows of narrow log-ratios take it, wide ones take MixMinusPowerMean's loop. Both against the
// fp64 reference, for the alpha divergence and Renyi on either side of 1/2.
TEST(PowerTable, NarrowAndWideLogRatiosMatchTheReference) {
  for (const double noise : {0.3, 3.0}) {  // 0.3: every vector in range; 3: few are
    for (const auto& [kind, alpha] : {std::pair{divkit::DivergenceKind::alpha_divergence, 0.3},
                                      std::pair{divkit::DivergenceKind::alpha_divergence, 0.7},
                                      std::pair{divkit::DivergenceKind::renyi, 0.3},
                                      std::pair{divkit::DivergenceKind::renyi, 2.0}}) {
      const int64_t n = 5, v = 777;
      std::mt19937 rng(11);
      std::normal_distribution<double> nd(0.0, 1.0);
      HostMatrix s(n, v, DType::f32), t(n, v, DType::f32);
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < v; ++j) {
          const double x = 2.0 * nd(rng);
          s.set(i, j, x);
          t.set(i, j, x + noise * nd(rng));
        }
      DivergenceSpec spec;
      spec.kind = kind;
      spec.alpha = static_cast<float>(alpha);
      const std::string what = std::string(divkit::divergence_kind_name(kind)) + " alpha " +
                               std::to_string(alpha) + " noise " + std::to_string(noise);
      TestOptions opt;
      opt.reduction = Reduction::none;
      const KernelOut got = run_kernel(s, t, spec, opt, GradRequest::of(), GradRequest::of());
      expect_matches_reference(got, run_reference(s, t, spec, opt), Tolerance{}, what);
    }
  }
}

}  // namespace
}  // namespace divkit_test
