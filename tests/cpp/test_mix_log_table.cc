// jsd's log of the mixture from the mix-log table (divergence_defs.h's GeneralizedJSD with
// BuildMixLogTable for 1 - beta, AVX-512 kernels) and the log of m elsewhere: the row values
// against long double near p = q, where each entry's two halves cancel to
// beta (1 - beta) q x^2 / 2 (x = log(p / q)), and rows whose log-ratios leave the table's range.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "hwy/targets.h"
#include "jsd_reference.h"
#include "test_util.h"

namespace divkit_test {
namespace {

// Near p = q the value is ~ beta (1 - beta) E[x^2] / 2 while each half is ~ |x|: the difference of
// two logs near log q (the form before the table) left 1e0-1e2 relative error at noise 1e-3 to
// 1e-4. The bound per noise is what fp32 logits allow: x itself carries an ulp of the log-probs,
// so the relative error grows as 1 / noise. The table exists on the AVX-512 targets only (the
// other SIMD targets take the log of m, accurate to the contract's error scale but not relatively
// near p = q; the CUDA kernels take log1p(beta expm1(x)): CudaEmulated.JsdValue...).
TEST(JsdMixture, ValueRelativelyAccurateNearEqualDistributions) {
  if ((hwy::SupportedTargets() & HWY_AVX3) == 0) GTEST_SKIP() << "no AVX-512: no mix-log table";
  for (const double beta : {0.1, 0.5, 0.9}) {
    for (const auto& [noise, bound] :
         {std::pair{1e-3, 2e-3}, std::pair{1e-2, 2e-4}, std::pair{0.3, 1e-5}}) {
      JsdRows r = make_jsd_rows(4, 4096, noise, 5);
      DivergenceSpec spec = make_spec(divkit::DivergenceKind::jsd, beta);
      TestOptions opt;
      opt.reduction = Reduction::none;
      const KernelOut got = run_kernel(r.s, r.t, spec, opt, GradRequest::of(), GradRequest::of());
      for (int64_t i = 0; i < 4; ++i) {
        const long double want = jsd_row(r.s, r.t, i, static_cast<float>(beta));
        EXPECT_LT(std::fabs((got.loss[i] - want) / want), bound)
            << "beta " << beta << " noise " << noise << " row " << i << ": " << got.loss[i]
            << " against " << static_cast<double>(want);
      }
    }
  }
}

// Rows with every log-ratio inside the table's |x| < 8, rows with a few beyond it and rows with
// most beyond it (the vectors there take the log of m), with both gradients, against the fp64
// reference; and a masked (-inf) column, whose vectors also leave the table.
TEST(JsdMixture, NarrowAndWideLogRatiosMatchTheReference) {
  for (const double noise : {1.0, 2.5, 8.0}) {
    for (const double beta : {0.2, 0.5, 0.8}) {
      JsdRows r = make_jsd_rows(5, 1000, noise, 13);
      for (int64_t i = 0; i < 5; i += 2) r.s.set(i, 7, -INFINITY), r.t.set(i, 7, -INFINITY);
      DivergenceSpec spec = make_spec(divkit::DivergenceKind::jsd, beta);
      TestOptions opt;
      opt.reduction = Reduction::none;
      const KernelOut got = run_kernel(r.s, r.t, spec, opt, GradRequest::of(), GradRequest::of());
      expect_matches_reference(got, run_reference(r.s, r.t, spec, opt), Tolerance{},
                               "jsd beta " + std::to_string(beta) + " noise " +
                                   std::to_string(noise));
    }
  }
}

}  // namespace
}  // namespace divkit_test
