// Gradients against central finite differences, in double:
//  * the reference's analytic gradient against finite differences of the reference value
//    (checks the reference itself);
//  * the kernel's gradients (student and teacher) against finite differences of the reference
//    value at the kernel's own (fp32-rounded) inputs;
//  * the kernel's gradient against finite differences of the kernel's own loss, with fp64
//    inputs and a step large enough for its fp32 arithmetic (no reference involved).
#include <cmath>

#include "test_util.h"

namespace divkit_test {
namespace {

using K = DivergenceKind;

struct FdCase {
  TestOptions opt;
  double temperature;
  bool t2;
};

std::vector<FdCase> fd_cases() {
  TestOptions mean_w;
  mean_w.reduction = Reduction::mean;
  mean_w.labels = {0, -100, 2};
  mean_w.weights = {1.5, 1.0, 0.5};
  TestOptions none;
  none.reduction = Reduction::none;
  return {{mean_w, 1.5, true}, {none, 0.7, false}};
}

// Central differences of the reference's total loss wrt every student (which=0) or teacher
// (which=1) logit.
std::vector<double> fd_gradient(const std::vector<double>& s, const std::vector<double>& t,
                                int64_t n, int64_t v, const divkit_ref::Params& prm,
                                const divkit_ref::Options& opt, int which, double h) {
  std::vector<double> g(s.size());
  std::vector<double> x = which == 0 ? s : t;
  for (size_t k = 0; k < x.size(); ++k) {
    const double x0 = x[k];
    x[k] = x0 + h;
    const double up = which == 0 ? divkit_ref::total_loss(x, t, n, v, prm, opt)
                                 : divkit_ref::total_loss(s, x, n, v, prm, opt);
    x[k] = x0 - h;
    const double dn = which == 0 ? divkit_ref::total_loss(x, t, n, v, prm, opt)
                                 : divkit_ref::total_loss(s, x, n, v, prm, opt);
    x[k] = x0;
    g[k] = (up - dn) / (2 * h);
  }
  return g;
}

TEST(GradCheck, ReferenceGradientMatchesFiniteDifferences) {
  const int64_t n = 3, v = 7;
  for (const Variant& var : all_variants()) {
    for (const FdCase& fc : fd_cases()) {
      SCOPED_TRACE(var.name);
      Logits l = random_logits(n, v, DType::f64, DType::f64, 41);
      // one entry masked in both distributions of row 2: the gradient there is 0
      l.student.set(2, 3, -kInf);
      l.teacher.set(2, 3, -kInf);
      DivergenceSpec spec = var.spec;
      spec.temperature = static_cast<float>(fc.temperature);
      spec.scale_by_t_squared = fc.t2;
      const auto prm = divkit_ref::params_from_spec(spec);
      const auto ropt = ref_options(fc.opt);
      const auto s = l.student.values(), t = l.teacher.values();
      const auto r = divkit_ref::divergence(s, t, n, v, prm, ropt);
      for (int which = 0; which < 2; ++which) {
        const auto fd = fd_gradient(s, t, n, v, prm, ropt, which, 1e-5);
        const auto& an = which == 0 ? r.grad_s : r.grad_t;
        for (size_t k = 0; k < fd.size(); ++k) {
          if (std::isinf(s[k])) {
            EXPECT_EQ(an[k], 0.0);
            continue;
          }
          EXPECT_NEAR(an[k], fd[k], 1e-7 * (1.0 + std::fabs(fd[k])))
              << (which ? "teacher" : "student") << " entry " << k;
        }
      }
    }
  }
}

TEST(GradCheck, KernelGradientMatchesFiniteDifferencesOfReference) {
  const int64_t n = 3, v = 11;
  for (const Variant& var : all_variants()) {
    for (const FdCase& fc : fd_cases()) {
      SCOPED_TRACE(var.name + " reduction " + divkit::reduction_name(fc.opt.reduction));
      Logits l = random_logits(n, v, DType::f32, DType::f32, 43);
      DivergenceSpec spec = var.spec;
      spec.temperature = static_cast<float>(fc.temperature);
      spec.scale_by_t_squared = fc.t2;
      const KernelOut got = run_kernel(l.student, l.teacher, spec, fc.opt,
                                       GradRequest::of(DType::f64), GradRequest::of(DType::f64));
      const auto prm = divkit_ref::params_from_spec(spec);
      const auto ropt = ref_options(fc.opt);
      const auto s = l.student.values(), t = l.teacher.values();
      const auto r = divkit_ref::divergence(s, t, n, v, prm, ropt);
      for (int which = 0; which < 2; ++which) {
        const auto fd = fd_gradient(s, t, n, v, prm, ropt, which, 1e-5);
        const HostMatrix& kg = which == 0 ? got.grad_s : got.grad_t;
        const auto& scale = which == 0 ? r.scale_s : r.scale_t;
        compare_grad(kg, fd, scale, Tolerance{1e-5, 1e-5},
                     var.name + (which ? " teacher" : " student") + " vs FD");
      }
    }
  }
}

TEST(GradCheck, KernelGradientMatchesFiniteDifferencesOfKernel) {
  const int64_t n = 2, v = 9;
  const double h = 1e-2;
  for (const Variant& var : all_variants()) {
    // tvd is not differentiable where p_j = q_j; a step of 1e-2 crosses such points (its
    // gradient is checked against the reference's finite differences above, with a step of 1e-5).
    if (var.spec.kind == K::tvd) continue;
    SCOPED_TRACE(var.name);
    Logits l = random_logits(n, v, DType::f64, DType::f64, 47, 1.0);
    DivergenceSpec spec = var.spec;
    spec.temperature = 1.25f;
    TestOptions opt;
    opt.reduction = Reduction::sum;
    const KernelOut got = run_kernel(l.student, l.teacher, spec, opt, GradRequest::of(DType::f64),
                                     GradRequest::of(DType::f64));
    double gmax = 0.0;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < v; ++j)
        gmax = std::max({gmax, std::fabs(got.grad_s.get(i, j)), std::fabs(got.grad_t.get(i, j))});
    for (int which = 0; which < 2; ++which) {
      HostMatrix& x = which == 0 ? l.student : l.teacher;
      const HostMatrix& g = which == 0 ? got.grad_s : got.grad_t;
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t j = 0; j < v; ++j) {
          const double x0 = x.get(i, j);
          x.set(i, j, x0 + h);
          const double up = run_kernel(l.student, l.teacher, spec, opt).loss[0];
          x.set(i, j, x0 - h);
          const double dn = run_kernel(l.student, l.teacher, spec, opt).loss[0];
          x.set(i, j, x0);
          const double fd = (up - dn) / (2 * h);
          EXPECT_NEAR(g.get(i, j), fd, 2e-3 * (std::fabs(fd) + gmax) + 5e-5)
              << (which ? "teacher" : "student") << " [" << i << ", " << j << "]";
        }
      }
    }
  }
}

}  // namespace
}  // namespace divkit_test
