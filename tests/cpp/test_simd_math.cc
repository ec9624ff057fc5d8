// simd_math-inl.h's SoftmaxExp on every SIMD target this build compiles and this CPU runs (the
// kernels dispatch to the best one; AVX-512 takes the table form): against long double over the
// softmax's range, and its edges exactly.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "test_simd_math.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
// (foreach_target.h includes this file again once per target, so it comes first.)
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "core/simd_math-inl.h"
#include "hwy/highway.h"
#include "hwy/targets.h"

HWY_BEFORE_NAMESPACE();
namespace divkit_test {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;
void SoftmaxExpRow(const float* in, float* out, size_t n) {  // n a multiple of 16
  const hn::ScalableTag<float> d;
  for (size_t i = 0; i < n; i += hn::Lanes(d))
    hn::StoreU(divkit::HWY_NAMESPACE::SoftmaxExp(d, hn::LoadU(d, in + i)), d, out + i);
}
}  // namespace HWY_NAMESPACE
}  // namespace divkit_test
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace divkit_test {
HWY_EXPORT(SoftmaxExpRow);
namespace {

// SoftmaxExp of xs on each target: calls check(target name, results).
template <class Check>
void ForEachTarget(std::vector<float> xs, const Check& check) {
  const size_t n = xs.size();
  xs.resize((n + 15) / 16 * 16, 0.0f);
  std::vector<float> out(xs.size());
  for (const int64_t target : hwy::SupportedAndGeneratedTargets()) {
    hwy::SetSupportedTargetsForTest(target);
    HWY_DYNAMIC_DISPATCH(SoftmaxExpRow)(xs.data(), out.data(), xs.size());
    check(std::string(hwy::TargetName(target)), std::vector<float>(out.begin(), out.begin() + n));
  }
  hwy::SetSupportedTargetsForTest(0);
}

// Within 1.5 ulp wherever the result is a normal float (x >= -87.3), and down to arguments of
// 1e-30 (e^x ~ 1 - |x|).
TEST(SimdMath, SoftmaxExpWithinAnUlpAndAHalf) {
  std::vector<float> xs;
  for (int i = 0; i < 400000; ++i) xs.push_back(-87.3f * (static_cast<float>(i) + 0.5f) / 4e5f);
  for (float m = 1e-30f; m < 1.0f; m *= 1.7f) xs.push_back(-m);
  ForEachTarget(xs, [&](const std::string& target, const std::vector<float>& got) {
    double worst = 0.0;
    float worst_x = 0.0f;
    for (size_t i = 0; i < xs.size(); ++i) {
      const long double want = std::exp(static_cast<long double>(xs[i]));
      const double ulp = std::ldexp(1.0, std::ilogb(static_cast<double>(want)) - 23);
      const double err = std::fabs(static_cast<double>(got[i] - want)) / ulp;
      if (err > worst) worst = err, worst_x = xs[i];
    }
    EXPECT_LT(worst, 1.5) << target << ": at x = " << worst_x;
  });
}

// exp(0) = 1 exactly (a row's max entry), exp(-inf) = 0 exactly (masked entries), 0 at and below
// the clamp, and nothing negative or above the smallest normal float between it and -87.3.
TEST(SimdMath, SoftmaxExpEdges) {
  const float inf = std::numeric_limits<float>::infinity();
  ForEachTarget({0.0f, -0.0f, -inf, -88.0f, -100.0f, -1e30f, -87.5f},
                [&](const std::string& target, const std::vector<float>& got) {
                  EXPECT_EQ(got[0], 1.0f) << target;
                  EXPECT_EQ(got[1], 1.0f) << target;
                  for (int i = 2; i < 6; ++i) EXPECT_EQ(got[i], 0.0f) << target << " " << i;
                  EXPECT_GE(got[6], 0.0f) << target;
                  EXPECT_LE(got[6], 1.2e-38f) << target;
                });
}

}  // namespace
}  // namespace divkit_test
#endif  // HWY_ONCE
