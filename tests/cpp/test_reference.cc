// The test helpers themselves: the fp64 reference against hand-derived values, its conventions
// and limits, and the bf16 / fp16 conversions. (Its gradients are checked against finite
// differences in test_gradcheck.cc.)
#include <cmath>

#include "test_util.h"

namespace divkit_test {
namespace {

using K = DivergenceKind;

double ref_value(K kind, double param, const std::vector<double>& s, const std::vector<double>& t) {
  divkit_ref::Params prm;
  prm.kind = kind;
  if (!std::isnan(param)) {
    prm.alpha = param;
    prm.beta = param;
  }
  return divkit_ref::row_value(s.data(), t.data(), static_cast<int64_t>(s.size()), prm);
}

TEST(Reference, HandDerivedTwoEntryValues) {
  // student q = [0.1, 0.9], teacher p = [0.9, 0.1]
  const std::vector<double> s = {std::log(0.1), std::log(0.9)};
  const std::vector<double> t = {std::log(0.9), std::log(0.1)};
  const double ln9 = std::log(9.0);
  const double chi2 = 0.64 / 0.1 + 0.64 / 0.9;
  const double skew = 0.9 * std::log(0.9 / 0.18) + 0.1 * std::log(0.1 / 0.82);
  struct Case {
    K kind;
    double param, want;
  };
  const std::vector<Case> cases = {
      {K::forward_kl, kNaN, 0.8 * ln9},
      {K::reverse_kl, kNaN, 0.8 * ln9},
      {K::jsd, 0.5, 0.9 * std::log(1.8) + 0.1 * std::log(0.2)},
      {K::jsd, 0.0, 0.8 * ln9},
      {K::jsd, 1.0, 0.8 * ln9},
      {K::skew_forward_kl, 0.1, skew},
      {K::skew_reverse_kl, 0.1, skew},
      {K::tvd, kNaN, 0.8},
      {K::hellinger, kNaN, 0.8},
      {K::jeffreys, kNaN, 1.6 * ln9},
      {K::chi2, kNaN, chi2},
      {K::alpha_divergence, 0.5, 1.6},
      {K::alpha_divergence, 2.0, chi2 / 2},
      {K::alpha_divergence, 1.0, 0.8 * ln9},
      {K::alpha_divergence, 0.0, 0.8 * ln9},
      {K::renyi, 0.5, -2.0 * std::log(0.6)},
      {K::renyi, 2.0, std::log(0.81 / 0.1 + 0.01 / 0.9)},
      {K::renyi, 1.0, 0.8 * ln9},
      {K::cross_entropy, kNaN, -(0.9 * std::log(0.1) + 0.1 * std::log(0.9))},
  };
  for (const Case& c : cases)
    EXPECT_NEAR(ref_value(c.kind, c.param, s, t), c.want, 1e-12)
        << divkit::divergence_kind_name(c.kind) << " " << c.param;
  EXPECT_NEAR(0.8 * ln9, 1.757780, 1e-6);  // objectives.md's reference value
}

TEST(Reference, NearTheLimits) {
  Logits l = random_logits(1, 50, DType::f64, DType::f64, 1);
  const auto s = l.student.values(), t = l.teacher.values();
  const double fwd = ref_value(K::forward_kl, kNaN, s, t),
               rev = ref_value(K::reverse_kl, kNaN, s, t);
  EXPECT_NEAR(ref_value(K::alpha_divergence, 1 - 1e-7, s, t), fwd, 1e-5 * fwd);
  EXPECT_NEAR(ref_value(K::alpha_divergence, 1 + 1e-7, s, t), fwd, 1e-5 * fwd);
  EXPECT_NEAR(ref_value(K::alpha_divergence, 1e-7, s, t), rev, 1e-5 * rev);
  EXPECT_NEAR(ref_value(K::alpha_divergence, -1e-7, s, t), rev, 1e-5 * rev);
  EXPECT_NEAR(ref_value(K::renyi, 1 + 1e-7, s, t), fwd, 1e-5 * fwd);
  EXPECT_NEAR(ref_value(K::renyi, 1 - 1e-7, s, t), fwd, 1e-5 * fwd);
  EXPECT_NEAR(ref_value(K::skew_forward_kl, 1e-9, s, t), fwd, 1e-5 * fwd);
  EXPECT_NEAR(ref_value(K::skew_reverse_kl, 1e-9, s, t), rev, 1e-5 * rev);
  EXPECT_NEAR(ref_value(K::jsd, 1e-9, s, t), 0.0, 1e-6);
}

TEST(Reference, MaskConventions) {
  const double ninf = -kInf;
  // both masked at entry 1: as if the entry did not exist
  const std::vector<double> s3 = {0.3, ninf, -1.0}, t3 = {1.0, ninf, 0.2};
  const std::vector<double> s2 = {0.3, -1.0}, t2 = {1.0, 0.2};
  for (const Variant& var : all_variants()) {
    const auto prm = divkit_ref::params_from_spec(var.spec);
    EXPECT_NEAR(divkit_ref::row_value(s3.data(), t3.data(), 3, prm),
                divkit_ref::row_value(s2.data(), t2.data(), 2, prm), 1e-14)
        << var.name;
  }
  // student masked where the teacher is not: forward KL infinite, reverse KL finite
  const std::vector<double> s = {0.0, ninf}, t = {0.0, 0.0};
  EXPECT_EQ(ref_value(K::forward_kl, kNaN, s, t), kInf);
  EXPECT_NEAR(ref_value(K::reverse_kl, kNaN, s, t), std::log(2.0), 1e-15);
  EXPECT_EQ(ref_value(K::chi2, kNaN, s, t), kInf);
  EXPECT_EQ(ref_value(K::renyi, 2.0, s, t), kInf);
  EXPECT_NEAR(ref_value(K::renyi, 0.5, s, t), -2 * std::log(std::sqrt(0.5)), 1e-15);
  EXPECT_EQ(ref_value(K::alpha_divergence, 1.5, s, t), kInf);
  EXPECT_NEAR(ref_value(K::tvd, kNaN, s, t), 0.5, 1e-15);
  // disjoint supports: Renyi of order < 1 is infinite
  const std::vector<double> a = {0.0, ninf}, b = {ninf, 0.0};
  EXPECT_EQ(ref_value(K::renyi, 0.5, a, b), kInf);
  EXPECT_NEAR(ref_value(K::hellinger, kNaN, a, b), 2.0, 1e-15);
  EXPECT_NEAR(ref_value(K::jsd, 0.5, a, b), std::log(2.0), 1e-15);
  // infinite value: zero gradients
  divkit_ref::Params prm;
  prm.kind = K::forward_kl;
  const auto r = divkit_ref::row(s.data(), t.data(), 2, prm);
  EXPECT_EQ(r.grad_s, std::vector<double>(2, 0.0));
  EXPECT_EQ(r.grad_t, std::vector<double>(2, 0.0));
}

TEST(Reference, Reductions) {
  const std::vector<double> s = {std::log(0.1), std::log(0.9), 0.0, 0.0, 1.0, 2.0};
  const std::vector<double> t = {std::log(0.9), std::log(0.1), 5.0, -5.0, 2.0, 1.0};
  divkit_ref::Params prm;
  prm.kind = K::forward_kl;
  prm.temperature = 2.0;
  prm.scale_by_t_squared = true;
  const double d0 = divkit_ref::row_value(&s[0], &t[0], 2, prm);
  const double d2 = divkit_ref::row_value(&s[4], &t[4], 2, prm);
  divkit_ref::Options o;
  o.labels = {1, -100, 3};
  o.weights = {2.0, 1.0, 0.5};
  o.reduction = Reduction::mean;
  EXPECT_NEAR(divkit_ref::total_loss(s, t, 3, 2, prm, o), 4.0 * (2 * d0 + 0.5 * d2) / 2, 1e-14);
  o.reduction = Reduction::batchmean;
  EXPECT_NEAR(divkit_ref::total_loss(s, t, 3, 2, prm, o), 4.0 * (2 * d0 + 0.5 * d2) / 3, 1e-14);
  o.num_items_in_batch = 10;
  EXPECT_NEAR(divkit_ref::total_loss(s, t, 3, 2, prm, o), 4.0 * (2 * d0 + 0.5 * d2) / 10, 1e-14);
  o.reduction = Reduction::none;
  const auto r = divkit_ref::divergence(s, t, 3, 2, prm, o);
  EXPECT_NEAR(r.loss[0], 4.0 * 2 * d0, 1e-14);
  EXPECT_EQ(r.loss[1], 0.0);
  EXPECT_NEAR(r.loss[2], 4.0 * 0.5 * d2, 1e-14);
  o.labels = {-100, -100, -100};
  o.reduction = Reduction::mean;
  o.num_items_in_batch = 0;
  EXPECT_EQ(divkit_ref::total_loss(s, t, 3, 2, prm, o), 0.0);
}

TEST(Conversions, Float16) {
  EXPECT_EQ(double_to_f16(1.0), 0x3c00);
  EXPECT_EQ(double_to_f16(-2.0), 0xc000);
  EXPECT_EQ(double_to_f16(65504.0), 0x7bff);
  EXPECT_EQ(double_to_f16(65519.0), 0x7bff);
  EXPECT_EQ(double_to_f16(65520.0), 0x7c00);
  EXPECT_EQ(double_to_f16(-kInf), 0xfc00);
  EXPECT_EQ(double_to_f16(std::ldexp(1.0, -24)), 0x0001);
  EXPECT_EQ(double_to_f16(std::ldexp(1.0, -14)), 0x0400);
  EXPECT_EQ(double_to_f16(std::ldexp(1023.0, -24)), 0x03ff);
  EXPECT_EQ(double_to_f16(0.1), 0x2e66);
  EXPECT_EQ(double_to_f16(1.0 + std::ldexp(1.0, -11)), 0x3c00);      // tie to even
  EXPECT_EQ(double_to_f16(1.0 + 3 * std::ldexp(1.0, -11)), 0x3c02);  // tie to even
  EXPECT_TRUE(std::isnan(f16_to_double(double_to_f16(kNaN))));
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const double d = f16_to_double(static_cast<uint16_t>(h));
    if (std::isnan(d)) continue;
    ASSERT_EQ(double_to_f16(d), h) << std::hex << h;
  }
}

TEST(Conversions, BFloat16) {
  EXPECT_EQ(float_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(float_to_bf16(1.0f + std::ldexp(1.0f, -8)), 0x3f80);      // tie to even
  EXPECT_EQ(float_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82);  // tie to even
  EXPECT_EQ(float_to_bf16(-std::numeric_limits<float>::infinity()), 0xff80);
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(NAN))));
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float f = bf16_to_float(static_cast<uint16_t>(h));
    if (std::isnan(f)) continue;
    ASSERT_EQ(float_to_bf16(f), h) << std::hex << h;
  }
}

}  // namespace
}  // namespace divkit_test
