// Mathematical properties the kernel must have, checked on the kernel alone (no reference):
// D(p, p) = 0, non-negativity, symmetries, the documented limits and relations between kinds,
// invariance to a constant shift of a row, bounds.
#include <cmath>

#include "test_util.h"

namespace divkit_test {
namespace {

using K = DivergenceKind;

// Per-token losses (reduction none) of the kernel for fp32 inputs.
std::vector<double> losses(HostMatrix& s, HostMatrix& t, const DivergenceSpec& spec) {
  TestOptions opt;
  opt.reduction = Reduction::none;
  return run_kernel(s, t, spec, opt).loss;
}

void expect_close(const std::vector<double>& a, const std::vector<double>& b, double rtol,
                  double atol, const std::string& what) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i)
    EXPECT_NEAR(a[i], b[i], rtol * std::max(std::fabs(a[i]), std::fabs(b[i])) + atol)
        << what << " row " << i;
}

TEST(Properties, SameDistributionGivesZeroAndZeroGradient) {
  for (const Variant& var : all_variants()) {
    for (int64_t v : {int64_t{1}, int64_t{31}, int64_t{4097}}) {
      SCOPED_TRACE(var.name + " V=" + std::to_string(v));
      Logits l = random_logits(4, v, DType::f32, DType::f32, 50);
      HostMatrix t = l.student;  // identical logits, so p == q exactly
      TestOptions opt;
      opt.reduction = Reduction::none;
      DivergenceSpec spec = var.spec;
      spec.temperature = 1.5f;
      const KernelOut got =
          run_kernel(l.student, t, spec, opt, GradRequest::of(), GradRequest::of());
      const auto want = run_reference(l.student, t, spec, opt);
      for (int64_t i = 0; i < 4; ++i) {
        // 0 to within the fp32 accuracy of the value (the reference's error scale); H(p, p) = H(p)
        const double want_loss = var.spec.kind == K::cross_entropy ? want.loss[i] : 0.0;
        EXPECT_NEAR(got.loss[i], want_loss, 1e-5 * want.loss_scale[i]) << "row " << i;
        for (int64_t j = 0; j < v; ++j)
          ASSERT_NEAR(got.grad_s.get(i, j), 0.0, 1e-5 * want.scale_s[i * v + j] + 1e-18)
              << "row " << i << " entry " << j;
      }
    }
  }
}

TEST(Properties, NonNegative) {
  for (const Variant& var : all_variants()) {
    for (double sigma : {0.01, 0.5, 3.0, 8.0}) {
      SCOPED_TRACE(var.name + " sigma " + std::to_string(sigma));
      Logits l = random_logits(50, 97, DType::f32, DType::f32, 51, sigma);
      // rows 0..9: teacher a tiny perturbation of the student
      for (int64_t i = 0; i < 10; ++i)
        for (int64_t j = 0; j < 97; ++j)
          l.teacher.set(i, j, l.student.get(i, j) + 1e-4 * ((j * 13 + i) % 7 - 3));
      // >= 0 up to the fp32 accuracy of the value (near-identical rows have values ~1e-9)
      TestOptions opt;
      opt.reduction = Reduction::none;
      const auto want = run_reference(l.student, l.teacher, var.spec, opt, false);
      const auto got = losses(l.student, l.teacher, var.spec);
      for (size_t i = 0; i < got.size(); ++i)
        EXPECT_GE(got[i], -1e-5 * want.loss_scale[i]) << "row " << i;
    }
  }
}

TEST(Properties, Symmetries) {
  Logits l = random_logits(20, 257, DType::f32, DType::f32, 52);
  HostMatrix& s = l.student;
  HostMatrix& t = l.teacher;
  auto d = [&](HostMatrix& a, HostMatrix& b, K kind, double param = kNaN) {
    return losses(a, b, make_spec(kind, param, 1.3));
  };
  expect_close(d(s, t, K::jsd, 0.5), d(t, s, K::jsd, 0.5), 1e-5, 1e-6, "jsd(0.5) symmetric");
  expect_close(d(s, t, K::tvd), d(t, s, K::tvd), 1e-5, 1e-6, "tvd symmetric");
  expect_close(d(s, t, K::hellinger), d(t, s, K::hellinger), 1e-5, 1e-6, "hellinger symmetric");
  expect_close(d(s, t, K::jeffreys), d(t, s, K::jeffreys), 1e-5, 1e-6, "jeffreys symmetric");
  expect_close(d(s, t, K::forward_kl), d(t, s, K::reverse_kl), 1e-5, 1e-6,
               "KL(p||q) = reverse with roles swapped");
  expect_close(d(s, t, K::jsd, 0.2), d(t, s, K::jsd, 0.8), 1e-5, 1e-6,
               "jsd(beta) = jsd(1-beta) swapped");
  expect_close(d(s, t, K::skew_forward_kl, 0.3), d(t, s, K::skew_reverse_kl, 0.3), 1e-5, 1e-6,
               "skew forward = skew reverse swapped");
  expect_close(d(s, t, K::alpha_divergence, 0.3), d(t, s, K::alpha_divergence, 0.7), 1e-5, 1e-6,
               "alpha(a) = alpha(1-a) swapped");
  // Renyi: (1 - a) D_a(p || q) = a D_(1-a)(q || p)
  auto r1 = d(s, t, K::renyi, 0.3), r2 = d(t, s, K::renyi, 0.7);
  for (auto& x : r1) x *= 0.7;
  for (auto& x : r2) x *= 0.3;
  expect_close(r1, r2, 1e-5, 1e-6, "renyi skew symmetry");
}

TEST(Properties, LimitsAndRelations) {
  Logits l = random_logits(20, 300, DType::f32, DType::f32, 53);
  HostMatrix& s = l.student;
  HostMatrix& t = l.teacher;
  auto d = [&](K kind, double param = kNaN) { return losses(s, t, make_spec(kind, param, 1.1)); };
  const auto fwd = d(K::forward_kl), rev = d(K::reverse_kl);
  // exact limits
  expect_close(d(K::jsd, 0.0), fwd, 1e-6, 1e-7, "jsd beta=0 is forward_kl");
  expect_close(d(K::jsd, 1.0), rev, 1e-6, 1e-7, "jsd beta=1 is reverse_kl");
  expect_close(d(K::alpha_divergence, 1.0), fwd, 1e-5, 1e-6,
               "alpha_divergence alpha=1 is forward_kl");
  expect_close(d(K::alpha_divergence, 0.0), rev, 1e-5, 1e-6,
               "alpha_divergence alpha=0 is reverse_kl");
  expect_close(d(K::renyi, 1.0), fwd, 1e-5, 1e-6, "renyi alpha=1 is forward_kl");
  expect_close(d(K::skew_forward_kl, 0.0), fwd, 1e-5, 1e-6,
               "skew_forward_kl alpha=0 is forward_kl");
  expect_close(d(K::skew_reverse_kl, 0.0), rev, 1e-5, 1e-6,
               "skew_reverse_kl alpha=0 is reverse_kl");
  for (double x : d(K::skew_forward_kl, 1.0))
    EXPECT_NEAR(x, 0.0, 1e-6) << "skew_forward_kl alpha=1 is 0";
  for (double x : d(K::skew_reverse_kl, 1.0))
    EXPECT_NEAR(x, 0.0, 1e-6) << "skew_reverse_kl alpha=1 is 0";
  // near the limits (the difference is O(distance to the limit))
  expect_close(d(K::alpha_divergence, 1e-3), rev, 1e-2, 1e-4,
               "alpha_divergence alpha=1e-3 ~ reverse_kl");
  expect_close(d(K::alpha_divergence, 1 - 1e-3), fwd, 1e-2, 1e-4,
               "alpha_divergence alpha=1-1e-3 ~ forward_kl");
  expect_close(d(K::renyi, 1 + 1e-3), fwd, 1e-2, 1e-4, "renyi alpha=1+1e-3 ~ forward_kl");
  expect_close(d(K::renyi, 1 - 1e-3), fwd, 1e-2, 1e-4, "renyi alpha=1-1e-3 ~ forward_kl");
  expect_close(d(K::jsd, 1e-4), std::vector<double>(fwd.size(), 0.0), 0.0, 1e-3,
               "jsd beta->0 tends to 0 (the beta=0 case is special)");
  // relations between kinds
  const auto hel = d(K::hellinger);
  auto two_hel = hel;
  for (auto& x : two_hel) x *= 2;
  expect_close(d(K::alpha_divergence, 0.5), two_hel, 1e-5, 1e-6,
               "alpha_divergence(0.5) = 2 hellinger");
  auto ren_half = hel;
  for (auto& x : ren_half) x = -2.0 * std::log(1.0 - x / 2.0);
  expect_close(d(K::renyi, 0.5), ren_half, 1e-5, 1e-6, "renyi(0.5) = -2 log(1 - hellinger / 2)");
  auto fr = fwd;
  for (size_t i = 0; i < fr.size(); ++i) fr[i] += rev[i];
  expect_close(d(K::jeffreys), fr, 1e-5, 1e-6, "jeffreys = forward + reverse");
  // cross-entropy = forward_kl + H(p), with H(p) = cross-entropy of the teacher with itself
  HostMatrix t2 = t;
  const auto ent = losses(t2, t, make_spec(K::cross_entropy, kNaN, 1.1));
  auto fe = fwd;
  for (size_t i = 0; i < fe.size(); ++i) fe[i] += ent[i];
  expect_close(d(K::cross_entropy), fe, 1e-5, 1e-5, "cross_entropy = forward_kl + H(p)");
  // chi2 = alpha_divergence(2) * 2 (Amari alpha=2: (sum p^2/q - 1) / 2)
  auto chi = d(K::chi2);
  for (auto& x : chi) x /= 2;
  expect_close(d(K::alpha_divergence, 2.0), chi, 1e-5, 1e-6, "alpha_divergence(2) = chi2 / 2");
  // bounds
  for (double x : d(K::tvd)) EXPECT_LE(x, 1.0 + 1e-6);
  for (double x : hel) EXPECT_LE(x, 2.0 + 1e-6);
  const double b = 0.3, hb = -b * std::log(b) - (1 - b) * std::log(1 - b);
  for (double x : d(K::jsd, b)) EXPECT_LE(x, hb + 1e-6);
  // Pinsker: tvd <= sqrt(KL / 2)
  const auto tv = d(K::tvd);
  for (size_t i = 0; i < tv.size(); ++i) EXPECT_LE(tv[i], std::sqrt(fwd[i] / 2) + 1e-6);
}

TEST(Properties, ShiftInvarianceAndGradientRowsSumToZero) {
  for (const Variant& var : all_variants()) {
    SCOPED_TRACE(var.name);
    Logits l = random_logits(6, 129, DType::f32, DType::f32, 54);
    TestOptions opt;
    opt.reduction = Reduction::none;
    const KernelOut a =
        run_kernel(l.student, l.teacher, var.spec, opt, GradRequest::of(), GradRequest::of());
    HostMatrix s2 = l.student, t2 = l.teacher;
    for (int64_t i = 0; i < 6; ++i)
      for (int64_t j = 0; j < 129; ++j) {
        s2.set(i, j, l.student.get(i, j) + 4.0 * i - 8.0);  // exact in fp32
        t2.set(i, j, l.teacher.get(i, j) - 2.0 * i + 16.0);
      }
    const KernelOut b = run_kernel(s2, t2, var.spec, opt, GradRequest::of(), GradRequest::of());
    const auto ref = run_reference(l.student, l.teacher, var.spec, opt);
    compare_values(b.loss, a.loss, ref.loss_scale, Tolerance{}, "shifted");
    for (int64_t i = 0; i < 6; ++i) {
      double sum_s = 0, sum_t = 0, abs_s = 0, abs_t = 0;
      for (int64_t j = 0; j < 129; ++j) {
        sum_s += a.grad_s.get(i, j);
        sum_t += a.grad_t.get(i, j);
        abs_s += std::fabs(a.grad_s.get(i, j));
        abs_t += std::fabs(a.grad_t.get(i, j));
      }
      EXPECT_NEAR(sum_s, 0.0, 1e-5 * abs_s + 1e-7) << "student gradient row " << i;
      EXPECT_NEAR(sum_t, 0.0, 1e-5 * abs_t + 1e-7) << "teacher gradient row " << i;
    }
  }
}

TEST(Properties, TemperatureIsADivisionOfTheLogits) {
  // D_T(s, t) = D_1(s / T, t / T) with T = 2 (a division by 2 is exact in fp32).
  for (const Variant& var : default_variants()) {
    SCOPED_TRACE(var.name);
    Logits l = random_logits(5, 77, DType::f32, DType::f32, 55);
    HostMatrix s2 = l.student, t2 = l.teacher;
    for (int64_t i = 0; i < 5; ++i)
      for (int64_t j = 0; j < 77; ++j) {
        s2.set(i, j, l.student.get(i, j) / 2);
        t2.set(i, j, l.teacher.get(i, j) / 2);
      }
    DivergenceSpec spec = var.spec;
    spec.temperature = 2.0f;
    TestOptions opt;
    opt.reduction = Reduction::none;
    const KernelOut a = run_kernel(l.student, l.teacher, spec, opt, GradRequest::of());
    spec.temperature = 1.0f;
    const KernelOut b = run_kernel(s2, t2, spec, opt, GradRequest::of());
    const auto ref = run_reference(s2, t2, spec, opt);
    compare_values(a.loss, b.loss, ref.loss_scale, Tolerance{}, "loss");
    for (int64_t i = 0; i < 5; ++i)
      for (int64_t j = 0; j < 77; ++j)
        EXPECT_NEAR(a.grad_s.get(i, j), b.grad_s.get(i, j) / 2,
                    1e-5 * ref.scale_s[i * 77 + j] + 1e-9);
  }
}

}  // namespace
}  // namespace divkit_test
