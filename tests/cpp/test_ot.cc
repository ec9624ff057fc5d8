// Entropic OT (include/divkit/ot.h): Sinkhorn against a dense fp64 reference written here,
// gradients against finite differences, batching, determinism, non-convergence reporting, bad
// input; MMD and the Cauchy-Schwarz divergence against direct double sums; sparse OT against its
// KKT conditions, strong duality and finite differences.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "divkit/ot.h"
#include "divkit/runtime.h"

namespace {

using divkit::DType;
using divkit::SinkhornInputs;
using divkit::SinkhornOptions;
using divkit::SinkhornOutputs;
using divkit::SinkhornStats;
using divkit::TensorView;

TensorView view3(void* p, DType dt, int64_t b, int64_t n, int64_t d) {
  TensorView v;
  v.data = p;
  v.dtype = dt;
  v.ndim = 3;
  v.shape[0] = b;
  v.shape[1] = n;
  v.shape[2] = d;
  v.strides[2] = 1;
  v.strides[1] = d;
  v.strides[0] = n * d;
  return v;
}
TensorView view2(void* p, DType dt, int64_t b, int64_t n) {
  return TensorView::matrix(p, dt, b, n);
}

std::vector<double> randn(size_t n, unsigned seed, double scale = 1.0) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> dist(0.0, scale);
  std::vector<double> v(n);
  for (auto& x : v) x = dist(gen);
  return v;
}
std::vector<double> rand_weights(size_t n, unsigned seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<double> dist(0.2, 1.0);
  std::vector<double> v(n);
  double s = 0;
  for (auto& x : v) s += (x = dist(gen));
  for (auto& x : v) x /= s;
  return v;
}

double lse(const std::vector<double>& z) {
  double m = -INFINITY;
  for (double v : z) m = std::max(m, v);
  double s = 0;
  for (double v : z) s += std::exp(v - m);
  return m + std::log(s);
}

// Dense fp64 log-domain Sinkhorn, deliberately plain.
struct Ref {
  std::vector<double> f, g, P;
  double tc = 0, dual = 0;
};
Ref reference(const std::vector<double>& C, const std::vector<double>& a,
              const std::vector<double>& b, double eps, double rho, int iters) {
  const size_t n = a.size(), m = b.size();
  Ref r;
  r.f.assign(n, 0);
  r.g.assign(m, 0);
  const double tau = std::isinf(rho) ? 1.0 : rho / (rho + eps);
  std::vector<double> z;
  for (int it = 0; it < iters; ++it) {
    for (size_t i = 0; i < n; ++i) {
      z.assign(m, 0);
      for (size_t j = 0; j < m; ++j) z[j] = std::log(b[j]) + (r.g[j] - C[i * m + j]) / eps;
      r.f[i] = -tau * eps * lse(z);
    }
    for (size_t j = 0; j < m; ++j) {
      z.assign(n, 0);
      for (size_t i = 0; i < n; ++i) z[i] = std::log(a[i]) + (r.f[i] - C[i * m + j]) / eps;
      r.g[j] = -tau * eps * lse(z);
    }
  }
  r.P.assign(n * m, 0);
  double mass = 0;
  for (size_t i = 0; i < n; ++i)
    for (size_t j = 0; j < m; ++j) {
      const double p = a[i] * b[j] * std::exp((r.f[i] + r.g[j] - C[i * m + j]) / eps);
      r.P[i * m + j] = p;
      r.tc += p * C[i * m + j];
      mass += p;
    }
  auto F = [&](const std::vector<double>& w, const std::vector<double>& pot) {
    double v = 0;
    for (size_t i = 0; i < w.size(); ++i)
      v += std::isinf(rho) ? w[i] * pot[i] : -rho * w[i] * std::expm1(-pot[i] / rho);
    return v;
  };
  r.dual = F(a, r.f) + F(b, r.g) - eps * (mass - 1.0);
  return r;
}

std::vector<double> cost_matrix(const std::vector<double>& x, const std::vector<double>& y,
                                size_t n, size_t m, size_t d, int p) {
  std::vector<double> C(n * m);
  for (size_t i = 0; i < n; ++i)
    for (size_t j = 0; j < m; ++j) {
      double s = 0;
      for (size_t k = 0; k < d; ++k)
        s += (x[i * d + k] - y[j * d + k]) * (x[i * d + k] - y[j * d + k]);
      C[i * m + j] = p == 2 ? s : std::sqrt(s);
    }
  return C;
}

// One problem (B = 1) solved by divkit in fp64 or fp32.
struct Solved {
  std::vector<double> f, g, plan, gx, gy, ga, gb;
  SinkhornStats st;
};
Solved run_points(std::vector<double> x, std::vector<double> y, std::vector<double> a,
                  std::vector<double> b, size_t d, const SinkhornOptions& opt, bool f32 = false,
                  bool grads = false) {
  const int64_t n = static_cast<int64_t>(a.size()), m = static_cast<int64_t>(b.size());
  std::vector<float> xf(x.begin(), x.end()), yf(y.begin(), y.end());
  Solved r;
  r.f.resize(a.size());
  r.g.resize(b.size());
  r.plan.resize(a.size() * b.size());
  SinkhornInputs in;
  const DType dt = f32 ? DType::f32 : DType::f64;
  in.x = view3(f32 ? static_cast<void*>(xf.data()) : x.data(), dt, 1, n, static_cast<int64_t>(d));
  in.y = view3(f32 ? static_cast<void*>(yf.data()) : y.data(), dt, 1, m, static_cast<int64_t>(d));
  in.a = view2(a.data(), DType::f64, 1, n);
  in.b = view2(b.data(), DType::f64, 1, m);
  SinkhornOutputs out;
  out.f = view2(r.f.data(), DType::f64, 1, n);
  out.g = view2(r.g.data(), DType::f64, 1, m);
  out.plan = view3(r.plan.data(), DType::f64, 1, n, m);
  if (grads) {
    r.gx.resize(x.size());
    r.gy.resize(y.size());
    r.ga.resize(a.size());
    r.gb.resize(b.size());
    out.grad_x = view3(r.gx.data(), DType::f64, 1, n, static_cast<int64_t>(d));
    out.grad_y = view3(r.gy.data(), DType::f64, 1, m, static_cast<int64_t>(d));
    out.grad_a = view2(r.ga.data(), DType::f64, 1, n);
    out.grad_b = view2(r.gb.data(), DType::f64, 1, m);
  }
  r.st = divkit::sinkhorn(in, opt, out).at(0);
  return r;
}

double max_abs_diff(const std::vector<double>& u, const std::vector<double>& v) {
  double e = 0;
  for (size_t i = 0; i < u.size(); ++i) e = std::max(e, std::abs(u[i] - v[i]));
  return e;
}

struct Case {
  size_t n, m, d;
  int p;
  double eps, rho;
};

class SinkhornVsReference : public ::testing::TestWithParam<Case> {};

TEST_P(SinkhornVsReference, PlanPotentialsCosts) {
  const Case c = GetParam();
  const auto x = randn(c.n * c.d, 1), y = randn(c.m * c.d, 2, 1.3);
  const auto a = rand_weights(c.n, 3), b = rand_weights(c.m, 4);
  const Ref ref = reference(cost_matrix(x, y, c.n, c.m, c.d, c.p), a, b, c.eps, c.rho, 3000);
  SinkhornOptions opt;
  opt.eps = c.eps;
  opt.p = c.p;
  opt.tol = 1e-12;
  opt.max_iter = 5000;
  opt.rho_a = opt.rho_b = c.rho;
  // Both cost paths: cached (the default budget holds these sizes) and on the fly.
  for (int64_t cache : {int64_t{64} << 20, int64_t{0}}) {
    opt.cost_cache_bytes = cache;
    opt.tol = 1e-12;
    SCOPED_TRACE("cost_cache_bytes " + std::to_string(cache));
    const Solved r = run_points(x, y, a, b, c.d, opt);
    EXPECT_TRUE(r.st.converged);
    EXPECT_LE(r.st.marginal_error, 1e-9);
    // Balanced potentials are defined up to f + k, g - k: compare f + g pairs through the plan
    // and the shifted potentials.
    const double k = std::isinf(c.rho) ? r.f[0] - ref.f[0] : 0.0;
    std::vector<double> fs(r.f), gs(r.g);
    for (auto& v : fs) v -= k;
    for (auto& v : gs) v += k;
    EXPECT_LT(max_abs_diff(fs, ref.f), 1e-8);
    EXPECT_LT(max_abs_diff(gs, ref.g), 1e-8);
    EXPECT_LT(max_abs_diff(r.plan, ref.P), 1e-10);
    EXPECT_NEAR(r.st.transport_cost, ref.tc, 1e-9 * std::max(1.0, ref.tc));
    EXPECT_NEAR(r.st.reg_cost, ref.dual, 1e-9 * std::max(1.0, std::abs(ref.dual)));

    // fp32 kernels: same solution to fp32 accuracy.
    opt.tol = 1e-6;
    const Solved r32 = run_points(x, y, a, b, c.d, opt, /*f32=*/true);
    EXPECT_NEAR(r32.st.reg_cost, ref.dual, 2e-4 * std::max(1.0, std::abs(ref.dual)));
    EXPECT_NEAR(r32.st.transport_cost, ref.tc, 2e-4 * std::max(1.0, ref.tc));
  }
}

// The cached cost (GEMM expansion at d > 8, the on-the-fly tiles otherwise) and the on-the-fly
// path solve the same problem: same iterations, results equal to rounding, in fp32 and fp64,
// with gradients; at d = 64 where the cache matters most.
TEST(OtSinkhorn, CachedCostEqualsOnTheFly) {
  for (size_t d : {3, 64}) {
    for (int p : {1, 2}) {
      for (bool f32 : {false, true}) {
        const size_t n = 150, m = 97;
        const auto x = randn(n * d, 31), y = randn(m * d, 32, 1.1);
        const auto a = rand_weights(n, 33), b = rand_weights(m, 34);
        SinkhornOptions opt;
        opt.p = p;
        opt.eps = p == 2 ? 0.05 * 2.0 * static_cast<double>(d) : 0.1 * std::sqrt(2.0 * d);
        opt.tol = f32 ? 1e-5 : 1e-10;
        opt.max_iter = 5000;
        const Solved cached = run_points(x, y, a, b, d, opt, f32, true);
        opt.cost_cache_bytes = 0;
        const Solved fly = run_points(x, y, a, b, d, opt, f32, true);
        SCOPED_TRACE("d " + std::to_string(d) + " p " + std::to_string(p) +
                     (f32 ? " f32" : " f64"));
        EXPECT_TRUE(cached.st.converged);
        const double rel = f32 ? 2e-5 : 1e-11;
        EXPECT_NEAR(cached.st.reg_cost, fly.st.reg_cost, rel * std::abs(fly.st.reg_cost));
        EXPECT_NEAR(cached.st.transport_cost, fly.st.transport_cost,
                    rel * std::abs(fly.st.transport_cost));
        if (!f32) {
          EXPECT_EQ(cached.st.n_iter, fly.st.n_iter);
        }
        EXPECT_LT(max_abs_diff(cached.plan, fly.plan), (f32 ? 1e-6 : 1e-14));
        double gmax = 0;
        for (double v : fly.gx) gmax = std::max(gmax, std::abs(v));
        EXPECT_LT(max_abs_diff(cached.gx, fly.gx), (f32 ? 1e-3 : 1e-9) * gmax);
        EXPECT_LT(max_abs_diff(cached.gy, fly.gy), (f32 ? 1e-3 : 1e-9) * gmax);
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Ot, SinkhornVsReference,
    ::testing::Values(Case{7, 5, 3, 2, 0.5, INFINITY}, Case{70, 131, 2, 2, 0.2, INFINITY},
                      Case{33, 29, 12, 2, 2.0, INFINITY},  // expanded cost (d > 8)
                      Case{40, 65, 3, 1, 0.1, INFINITY}, Case{20, 17, 4, 2, 0.3, 1.0},
                      Case{1, 1, 1, 2, 0.1, INFINITY}, Case{130, 3, 20, 1, 0.5, 2.0}));

void expect_error(const std::function<void()>& fn, const std::string& needle);

// Self-transport with the averaged symmetric update: the same solution (potentials, plan,
// costs, gradients) as the plain alternating solver, in fewer passes at small eps.
// A stored cost with room for K and its transpose runs the balanced iterations in the kernel
// domain with absorption (sinkhorn.cc, KernelIterations); with room for the cost alone, in the
// log domain. Same iterates to rounding: same iteration count, potentials, plan and gradients,
// also at a small eps where the potentials move by many eps (many absorptions) and with eps
// scaling.
TEST(OtSinkhorn, KernelDomainIterationsEqualLogDomain) {
  const size_t n = 150, m = 130, d = 3;
  const auto x = randn(n * d, 70), y = randn(m * d, 71, 1.4);
  const auto a = rand_weights(n, 72), b = rand_weights(m, 73);
  const int64_t pad_n = (n + 63) / 64 * 64, pad_m = (m + 63) / 64 * 64;
  for (bool f32 : {false, true}) {
    const int64_t pair = (n * pad_m + m * pad_n) * (f32 ? 4 : 8);
    for (double eps : {0.5, 0.02}) {
      for (double scaling : {0.0, 0.8}) {
        SinkhornOptions opt;
        opt.eps = eps;
        opt.eps_scaling = scaling;
        opt.tol = f32 ? 1e-5 : 1e-10;
        opt.max_iter = 20000;
        opt.cost_cache_bytes = pair;  // the cost fits, K does not: log domain
        const Solved logd = run_points(x, y, a, b, d, opt, f32, true);
        opt.cost_cache_bytes = 2 * pair;  // kernel domain
        const Solved kern = run_points(x, y, a, b, d, opt, f32, true);
        SCOPED_TRACE(std::string(f32 ? "f32" : "f64") + " eps " + std::to_string(eps) +
                     " scaling " + std::to_string(scaling));
        ASSERT_TRUE(logd.st.converged);
        ASSERT_TRUE(kern.st.converged);
        if (!f32) {
          EXPECT_EQ(kern.st.n_iter, logd.st.n_iter);
        }
        const double tol = f32 ? 2e-4 : 1e-10;
        EXPECT_LT(max_abs_diff(kern.f, logd.f), tol * (1 + eps));
        EXPECT_LT(max_abs_diff(kern.g, logd.g), tol * (1 + eps));
        EXPECT_LT(max_abs_diff(kern.plan, logd.plan), f32 ? 1e-6 : 1e-13);
        EXPECT_LT(max_abs_diff(kern.gx, logd.gx), f32 ? 1e-3 : 1e-9);
        EXPECT_NEAR(kern.st.reg_cost, logd.st.reg_cost, f32 ? 1e-5 : 1e-11);
        // The reported error is recomputed from the final potentials: float32 rounding of
        // that pass may put it slightly above the iteration's own residual.
        EXPECT_LE(kern.st.marginal_error, (f32 ? 1.5 : 1.0) * opt.tol);
      }
    }
  }
}

TEST(OtSinkhorn, SymmetricSelfTransportEqualsPlainSolver) {
  const size_t n = 60, d = 2;
  const auto x = randn(n * d, 41);
  const auto a = rand_weights(n, 42);
  for (double rho : {double(INFINITY), 1.5}) {
    SinkhornOptions opt;
    opt.eps = 0.3;
    opt.tol = 1e-10;
    opt.max_iter = 200000;
    opt.rho_a = opt.rho_b = rho;
    const Solved plain = run_points(x, x, a, a, d, opt, false, true);
    opt.symmetric = true;
    const Solved sym = run_points(x, x, a, a, d, opt, false, true);
    SCOPED_TRACE("rho " + std::to_string(rho));
    EXPECT_TRUE(plain.st.converged);
    EXPECT_TRUE(sym.st.converged);
    EXPECT_EQ(sym.f, sym.g);
    EXPECT_NEAR(sym.st.reg_cost, plain.st.reg_cost, 1e-8 * std::abs(plain.st.reg_cost) + 1e-12);
    EXPECT_NEAR(sym.st.transport_cost, plain.st.transport_cost, 1e-7 * plain.st.transport_cost);
    EXPECT_LT(max_abs_diff(sym.plan, plain.plan), 1e-9);
    EXPECT_LT(max_abs_diff(sym.gx, plain.gx), 1e-7);
    EXPECT_EQ(sym.gx, sym.gy);
    EXPECT_LE(sym.st.marginal_error, 1e-10);
    // One symmetric iteration is one pass, a plain one two (27 vs 69380 passes balanced, 27 vs
    // 124 unbalanced when written).
    EXPECT_LT(sym.st.n_iter, plain.st.n_iter * 2 / 4) << sym.st.n_iter << " vs " << plain.st.n_iter;
  }
  SinkhornOptions opt;
  opt.eps = 0.1;
  opt.symmetric = true;
  auto y = x;
  y[3] += 1e-3;
  expect_error([&] { run_points(x, y, a, a, d, opt); }, "symmetric needs y equal to x");
  expect_error([&] { run_points(x, x, a, rand_weights(n, 43), d, opt); },
               "symmetric needs b equal to a");
}

TEST(OtSinkhorn, CostMatrixEqualsPoints) {
  const size_t n = 23, m = 31, d = 3;
  const auto x = randn(n * d, 5), y = randn(m * d, 6);
  auto a = rand_weights(n, 7), b = rand_weights(m, 8);
  auto C = cost_matrix(x, y, n, m, d, 2);
  SinkhornOptions opt;
  opt.eps = 0.3;
  opt.tol = 1e-11;
  const Solved rp = run_points(x, y, a, b, d, opt);
  std::vector<double> f(n), g(m);
  SinkhornInputs in;
  in.cost = view3(C.data(), DType::f64, 1, n, m);
  in.a = view2(a.data(), DType::f64, 1, n);
  in.b = view2(b.data(), DType::f64, 1, m);
  SinkhornOutputs out;
  out.f = view2(f.data(), DType::f64, 1, n);
  out.g = view2(g.data(), DType::f64, 1, m);
  const auto st = divkit::sinkhorn(in, opt, out).at(0);
  EXPECT_LT(max_abs_diff(f, rp.f), 1e-9);
  EXPECT_LT(max_abs_diff(g, rp.g), 1e-9);
  EXPECT_NEAR(st.reg_cost, rp.st.reg_cost, 1e-10);
  EXPECT_EQ(st.n_iter, rp.st.n_iter);
}

TEST(OtSinkhorn, BatchEqualsSeparateProblems) {
  const size_t B = 3, n = 17, m = 9, d = 2;
  const auto x = randn(B * n * d, 9), y = randn(B * m * d, 10);
  SinkhornOptions opt;
  opt.eps = 0.2;
  opt.tol = 1e-10;
  std::vector<double> f(B * n), g(B * m);
  SinkhornInputs in;
  in.x = view3(const_cast<double*>(x.data()), DType::f64, B, n, d);
  in.y = view3(const_cast<double*>(y.data()), DType::f64, B, m, d);
  SinkhornOutputs out;
  out.f = view2(f.data(), DType::f64, B, n);
  out.g = view2(g.data(), DType::f64, B, m);
  const auto st = divkit::sinkhorn(in, opt, out);
  ASSERT_EQ(st.size(), B);
  for (size_t bi = 0; bi < B; ++bi) {
    std::vector<double> xb(x.begin() + bi * n * d, x.begin() + (bi + 1) * n * d);
    std::vector<double> yb(y.begin() + bi * m * d, y.begin() + (bi + 1) * m * d);
    const Solved r = run_points(xb, yb, std::vector<double>(n, 1.0 / n),
                                std::vector<double>(m, 1.0 / m), d, opt);
    EXPECT_EQ(r.st.reg_cost, st[bi].reg_cost);
    for (size_t i = 0; i < n; ++i) EXPECT_EQ(r.f[i], f[bi * n + i]);
  }
}

// d reg_cost / d(x, y, a, b) against central differences of reg_cost (a and b moved along a
// zero-sum direction, which keeps the problem balanced).
TEST(OtSinkhorn, GradientsMatchFiniteDifferences) {
  for (int p : {1, 2}) {
    for (double rho : {double(INFINITY), 0.7}) {
      const size_t n = 6, m = 5, d = 3;
      auto x = randn(n * d, 11), y = randn(m * d, 12);
      auto a = rand_weights(n, 13), b = rand_weights(m, 14);
      SinkhornOptions opt;
      opt.eps = 0.4;
      opt.p = p;
      opt.tol = 1e-14;
      opt.max_iter = 20000;
      opt.rho_a = opt.rho_b = rho;
      const Solved r = run_points(x, y, a, b, d, opt, false, true);
      auto val = [&](const std::vector<double>& xx, const std::vector<double>& yy,
                     const std::vector<double>& aa, const std::vector<double>& bb) {
        return run_points(xx, yy, aa, bb, d, opt).st.reg_cost;
      };
      const double h = 1e-5;
      for (size_t t = 0; t < x.size(); t += 4) {
        auto xp = x, xm = x;
        xp[t] += h;
        xm[t] -= h;
        EXPECT_NEAR(r.gx[t], (val(xp, y, a, b) - val(xm, y, a, b)) / (2 * h), 1e-6)
            << "p " << p << " rho " << rho << " x " << t;
      }
      for (size_t t = 0; t < y.size(); t += 4) {
        auto yp = y, ym = y;
        yp[t] += h;
        ym[t] -= h;
        EXPECT_NEAR(r.gy[t], (val(x, yp, a, b) - val(x, ym, a, b)) / (2 * h), 1e-6)
            << "p " << p << " rho " << rho << " y " << t;
      }
      // Direction e_0 - e_1 (zero sum) for a and b.
      auto ap = a, am = a, bp = b, bm = b;
      ap[0] += h, ap[1] -= h, am[0] -= h, am[1] += h;
      bp[2] += h, bp[0] -= h, bm[2] -= h, bm[0] += h;
      EXPECT_NEAR(r.ga[0] - r.ga[1], (val(x, y, ap, b) - val(x, y, am, b)) / (2 * h), 1e-6);
      EXPECT_NEAR(r.gb[2] - r.gb[0], (val(x, y, a, bp) - val(x, y, a, bm)) / (2 * h), 1e-6);
      if (!std::isinf(rho)) {  // unbalanced: every direction is allowed
        auto a1 = a, a2 = a;
        a1[3] += h;
        a2[3] -= h;
        EXPECT_NEAR(r.ga[3], (val(x, y, a1, b) - val(x, y, a2, b)) / (2 * h), 1e-6);
      }
    }
  }
}

TEST(OtSinkhorn, DeterministicAcrossThreadCounts) {
  const size_t n = 301, m = 257, d = 16;
  const auto x = randn(n * d, 15), y = randn(m * d, 16);
  SinkhornOptions opt;
  opt.eps = 1.0;
  opt.tol = 1e-6;
  for (int64_t cache : {int64_t{64} << 20, int64_t{0}}) {
    opt.cost_cache_bytes = cache;
    const int saved = divkit::get_num_threads();
    divkit::set_num_threads(1);
    const Solved r1 = run_points(x, y, std::vector<double>(n, 1.0 / n),
                                 std::vector<double>(m, 1.0 / m), d, opt, true, true);
    divkit::set_num_threads(3);
    const Solved r3 = run_points(x, y, std::vector<double>(n, 1.0 / n),
                                 std::vector<double>(m, 1.0 / m), d, opt, true, true);
    divkit::set_num_threads(saved);
    EXPECT_EQ(r1.f, r3.f);
    EXPECT_EQ(r1.gx, r3.gx);
    EXPECT_EQ(r1.st.reg_cost, r3.st.reg_cost);
    EXPECT_EQ(r1.st.n_iter, r3.st.n_iter);
  }
}

// SinkhornOutputs::stats (the device results of sync = false on CUDA): on the CPU it holds the
// returned stats, sync = false changes nothing else, and without stats sync = false throws.
TEST(OtSinkhorn, StatsOutputHoldsTheReturnedStats) {
  const size_t B = 3, n = 11, m = 7, d = 2;
  const auto x = randn(B * n * d, 31), y = randn(B * m * d, 32);
  SinkhornOptions opt;
  opt.eps = 0.3;
  opt.tol = 1e-9;
  opt.max_iter = 60;  // some problems stop unconverged
  SinkhornInputs in;
  in.x = view3(const_cast<double*>(x.data()), DType::f64, B, n, d);
  in.y = view3(const_cast<double*>(y.data()), DType::f64, B, m, d);
  std::vector<double> f(B * n), g(B * m), f2(B * n), g2(B * m), stats(B * 6, -1.0);
  SinkhornOutputs out;
  out.f = view2(f.data(), DType::f64, B, n);
  out.g = view2(g.data(), DType::f64, B, m);
  const auto ref = divkit::sinkhorn(in, opt, out);
  SinkhornOutputs out2;
  out2.f = view2(f2.data(), DType::f64, B, n);
  out2.g = view2(g2.data(), DType::f64, B, m);
  SinkhornOptions nosync = opt;
  nosync.sync = false;
  expect_error([&] { divkit::sinkhorn(in, nosync, out2); },
               "sinkhorn: stats must be given when sync is false");
  out2.stats = view2(stats.data(), DType::f64, B, 6);
  const auto st = divkit::sinkhorn(in, nosync, out2);
  ASSERT_EQ(st.size(), B);
  EXPECT_EQ(f2, f);
  EXPECT_EQ(g2, g);
  for (size_t b = 0; b < B; ++b) {
    const double* o = stats.data() + b * 6;
    EXPECT_EQ(o[0], ref[b].transport_cost);
    EXPECT_EQ(o[1], ref[b].reg_cost);
    EXPECT_EQ(o[2], ref[b].mass);
    EXPECT_EQ(o[3], double(ref[b].n_iter));
    EXPECT_EQ(o[4], ref[b].marginal_error);
    EXPECT_EQ(o[5], ref[b].converged ? 1.0 : 0.0);
    EXPECT_EQ(st[b].reg_cost, ref[b].reg_cost);
  }
  std::vector<double> small(B * 5);
  out2.stats = view2(small.data(), DType::f64, B, 5);
  expect_error([&] { divkit::sinkhorn(in, opt, out2); }, "stats must have shape [3, 6]");
}

TEST(OtSinkhorn, NonConvergenceIsReported) {
  const size_t n = 40, m = 40, d = 2;
  const auto x = randn(n * d, 17), y = randn(m * d, 18);
  SinkhornOptions opt;
  opt.eps = 0.01;
  opt.tol = 1e-12;
  opt.max_iter = 3;
  const Solved r =
      run_points(x, y, std::vector<double>(n, 1.0 / n), std::vector<double>(m, 1.0 / m), d, opt);
  EXPECT_FALSE(r.st.converged);
  EXPECT_EQ(r.st.n_iter, 3);
  EXPECT_GT(r.st.marginal_error, 1e-6);
}

TEST(OtSinkhorn, EpsScalingReachesTheSameSolutionInFewerIterations) {
  const size_t n = 100, m = 80, d = 2;
  const auto x = randn(n * d, 19), y = randn(m * d, 20);
  const std::vector<double> a(n, 1.0 / n), b(m, 1.0 / m);
  SinkhornOptions opt;
  opt.eps = 0.01;
  opt.tol = 1e-8;
  opt.max_iter = 100000;
  const Solved plain = run_points(x, y, a, b, d, opt);
  opt.eps_scaling = 0.7;
  const Solved scaled = run_points(x, y, a, b, d, opt);
  EXPECT_TRUE(plain.st.converged);
  EXPECT_TRUE(scaled.st.converged);
  EXPECT_LT(scaled.st.n_iter, plain.st.n_iter);
  EXPECT_NEAR(scaled.st.reg_cost, plain.st.reg_cost, 1e-6);
  EXPECT_LT(max_abs_diff(scaled.plan, plain.plan), 1e-6);
}

void expect_error(const std::function<void()>& fn, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "no error; expected one naming \"" << needle << "\"";
  } catch (const divkit::Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos)
        << "message \"" << e.what() << "\" does not contain \"" << needle << "\"";
  }
}

TEST(OtSinkhorn, BadInputRaisesNamingTheArgument) {
  const size_t n = 4, m = 3, d = 2;
  auto x = randn(n * d, 21), y = randn(m * d, 22);
  auto a = rand_weights(n, 23), b = rand_weights(m, 24);
  SinkhornOptions opt;
  opt.eps = 0.1;
  auto call = [&](SinkhornOptions o) { run_points(x, y, a, b, d, o); };
  EXPECT_NO_THROW(call(opt));
  for (double e : {0.0, -1.0, double(NAN), double(INFINITY)}) {
    SinkhornOptions o = opt;
    o.eps = e;
    expect_error([&] { call(o); }, "sinkhorn: eps must be finite and > 0");
  }
  SinkhornOptions o = opt;
  o.p = 3;
  expect_error([&] { call(o); }, "p must be 1 or 2");
  o = opt;
  o.max_iter = 0;
  expect_error([&] { call(o); }, "max_iter");
  o = opt;
  o.eps_scaling = 1.5;
  expect_error([&] { call(o); }, "eps_scaling");
  o = opt;
  o.rho_a = -1;
  expect_error([&] { call(o); }, "rho_a");
  o = opt;
  o.cost_cache_bytes = -1;
  expect_error([&] { call(o); }, "cost_cache_bytes must be >= 0");
  a[1] = -a[1];
  expect_error([&] { call(opt); }, "a has a negative weight");
  a[1] = -a[1];
  b[0] *= 2;  // masses differ
  expect_error([&] { call(opt); }, "equal total mass");
  o = opt;
  o.rho_a = o.rho_b = 1.0;  // fine when unbalanced
  EXPECT_NO_THROW(call(o));
  b[0] /= 2;
  x[3] = NAN;
  expect_error([&] { call(opt); }, "x has a non-finite value (NaN or inf) at [0, 1, 1]");
  x[3] = 0;
  y[5] = INFINITY;
  expect_error([&] { call(opt); }, "y has a non-finite value");
  y[5] = 0;
  // Shape mismatch: y with another d.
  std::vector<double> f(n), g(m);
  SinkhornInputs in;
  in.x = view3(x.data(), DType::f64, 1, n, d);
  in.y = view3(y.data(), DType::f64, 1, 1, 3);
  SinkhornOutputs out;
  out.f = view2(f.data(), DType::f64, 1, n);
  out.g = view2(g.data(), DType::f64, 1, m);
  expect_error([&] { divkit::sinkhorn(in, opt, out); }, "y must have shape [1, *, 2]");
  in.y = view3(y.data(), DType::f64, 1, m, d);
  in.a = view2(a.data(), DType::f64, 1, n - 1);
  expect_error([&] { divkit::sinkhorn(in, opt, out); }, "a must have shape [1, 4]");
  in.a = {};
  std::vector<float> yf(y.begin(), y.end());
  in.y = view3(yf.data(), DType::f32, 1, m, d);
  expect_error([&] { divkit::sinkhorn(in, opt, out); }, "y must have x's dtype");
}

// ---- MMD and Cauchy-Schwarz ----

double ksum(const std::vector<double>& u, const std::vector<double>& wu,
            const std::vector<double>& v, const std::vector<double>& wv, size_t d, bool gauss,
            double sigma) {
  double s = 0;
  for (size_t i = 0; i < wu.size(); ++i)
    for (size_t j = 0; j < wv.size(); ++j) {
      double r2 = 0;
      for (size_t k = 0; k < d; ++k)
        r2 += (u[i * d + k] - v[j * d + k]) * (u[i * d + k] - v[j * d + k]);
      s += wu[i] * wv[j] * (gauss ? std::exp(-r2 / (2 * sigma * sigma)) : -std::sqrt(r2));
    }
  return s;
}

TEST(OtSampleDivergences, ValuesAndGradients) {
  const size_t n = 9, m = 7, d = 3;
  auto x = randn(n * d, 25), y = randn(m * d, 26, 1.5);
  auto a = rand_weights(n, 27), b = rand_weights(m, 28);
  const double sigma = 0.9;
  std::vector<double> gx(n * d), gy(m * d);
  auto X = [&](std::vector<double>& v, size_t cnt) {
    return TensorView::matrix(v.data(), DType::f64, cnt, d);
  };
  auto A = [&](std::vector<double>& w) {
    return TensorView::vector(w.data(), DType::f64, w.size());
  };
  for (int which = 0; which < 3; ++which) {  // mmd gaussian, mmd energy, cs
    auto value = [&](std::vector<double>& xx, std::vector<double>& yy, bool grad) {
      TensorView gxv = grad ? X(gx, n) : TensorView{}, gyv = grad ? X(gy, m) : TensorView{};
      if (which == 2) return divkit::cs_divergence(X(xx, n), X(yy, m), A(a), A(b), sigma, gxv, gyv);
      return divkit::mmd2(X(xx, n), X(yy, m), A(a), A(b),
                          which == 0 ? divkit::SampleKernel::gaussian
                                     : divkit::SampleKernel::energy,
                          sigma, gxv, gyv);
    };
    const bool g = which != 1;
    const double xx = ksum(x, a, x, a, d, g, sigma), yy = ksum(y, b, y, b, d, g, sigma),
                 xy = ksum(x, a, y, b, d, g, sigma);
    const double expect =
        which == 2 ? std::log(xx) + std::log(yy) - 2 * std::log(xy) : xx + yy - 2 * xy;
    const double v = value(x, y, true);
    EXPECT_NEAR(v, expect, 1e-12) << which;
    EXPECT_GT(v, 0.0);
    // Identical samples with identical weights: 0.
    const double same = which == 2
                            ? divkit::cs_divergence(X(x, n), X(x, n), A(a), A(a), sigma, {}, {})
                            : divkit::mmd2(X(x, n), X(x, n), A(a), A(a),
                                           which == 0 ? divkit::SampleKernel::gaussian
                                                      : divkit::SampleKernel::energy,
                                           sigma, {}, {});
    EXPECT_NEAR(same, 0.0, 1e-12);
    const double h = 1e-6;
    for (size_t t = 0; t < n * d; t += 2) {
      auto xp = x, xm = x;
      xp[t] += h;
      xm[t] -= h;
      EXPECT_NEAR(gx[t], (value(xp, y, false) - value(xm, y, false)) / (2 * h), 1e-6) << which;
    }
    value(x, y, true);
    for (size_t t = 0; t < m * d; t += 2) {
      auto yp = y, ym = y;
      yp[t] += h;
      ym[t] -= h;
      EXPECT_NEAR(gy[t], (value(x, yp, false) - value(x, ym, false)) / (2 * h), 1e-6) << which;
    }
  }
  std::vector<double> z = x;
  expect_error(
      [&] {
        divkit::mmd2(X(z, n), X(y, m), A(a), A(b), divkit::SampleKernel::gaussian, 0.0, {}, {});
      },
      "mmd: sigma must be finite and > 0");
  z[0] = NAN;
  expect_error([&] { divkit::cs_divergence(X(z, n), X(y, m), A(a), A(b), 1.0, {}, {}); },
               "cs_divergence: x has a non-finite value");
  auto bneg = b;
  bneg[0] = -0.1;
  expect_error(
      [&] {
        divkit::mmd2(X(x, n), X(y, m), A(a), A(bneg), divkit::SampleKernel::energy, 1.0, {}, {});
      },
      "mmd: b must be finite and >= 0");
}

// ---- Quadratically regularized / sparsity-constrained OT ----

struct SparseSolved {
  divkit::SparseOtResult r;
  std::vector<double> alpha, grad_b, P;  // P dense [n][m]
};

SparseSolved run_sparse(std::vector<double> a, std::vector<double> b, std::vector<double> C,
                        size_t n, size_t m, const divkit::SparseOtOptions& opt) {
  SparseSolved s;
  s.alpha.assign(n, NAN);
  s.grad_b.assign(m, NAN);
  s.r = divkit::sparse_ot(TensorView::vector(a.data(), DType::f64, n),
                          TensorView::vector(b.data(), DType::f64, m),
                          TensorView::matrix(C.data(), DType::f64, n, m), opt,
                          TensorView::vector(s.alpha.data(), DType::f64, n),
                          TensorView::vector(s.grad_b.data(), DType::f64, m));
  s.P.assign(n * m, 0.0);
  for (size_t e = 0; e < s.r.value.size(); ++e) s.P[s.r.row[e] * m + s.r.col[e]] = s.r.value[e];
  return s;
}

std::vector<double> sq_dist(const std::vector<double>& x, const std::vector<double>& y, size_t n,
                            size_t m, size_t d) {
  std::vector<double> C(n * m);
  for (size_t i = 0; i < n; ++i)
    for (size_t j = 0; j < m; ++j) {
      double s = 0;
      for (size_t k = 0; k < d; ++k)
        s += (x[i * d + k] - y[j * d + k]) * (x[i * d + k] - y[j * d + k]);
      C[i * m + j] = s;
    }
  return C;
}

// Without the sparsity constraint the problem is a strictly convex QP, so its KKT conditions
// characterize the unique optimum: P >= 0, the marginals, and potentials alpha, beta with
// C_ij + gamma P_ij - alpha_i - beta_j = 0 where P_ij > 0 and >= 0 elsewhere. Strong duality:
// reg_cost (the semi-dual) equals the primal objective.
TEST(OtSparse, QuadraticOtSatisfiesKktAndStrongDuality) {
  const size_t n = 37, m = 29, d = 3;
  const auto C = sq_dist(randn(n * d, 40), randn(m * d, 41, 1.3), n, m, d);
  const auto a = rand_weights(n, 42), b = rand_weights(m, 43);
  for (double gamma : {1.0, 0.05}) {
    divkit::SparseOtOptions opt;
    opt.gamma = gamma;
    opt.tol = 1e-10;
    opt.max_iter = 5000;
    const SparseSolved s = run_sparse(a, b, C, n, m, opt);
    ASSERT_TRUE(s.r.converged) << "gamma " << gamma << " err " << s.r.marginal_error;
    EXPECT_LE(s.r.marginal_error, 1e-10);
    double primal = 0, tc = 0;
    for (size_t j = 0; j < m; ++j) {
      double col = 0, beta = NAN;
      for (size_t i = 0; i < n; ++i) {
        const double p = s.P[i * m + j];
        EXPECT_GE(p, 0.0);
        col += p;
        primal += p * C[i * m + j] + 0.5 * gamma * p * p;
        tc += p * C[i * m + j];
        if (p > 0) beta = C[i * m + j] + gamma * p - s.alpha[i];  // alpha_i + beta_j = C + gamma P
      }
      EXPECT_NEAR(col, b[j], 1e-15);
      ASSERT_TRUE(std::isfinite(beta));
      for (size_t i = 0; i < n; ++i) {
        const double slack = C[i * m + j] + gamma * s.P[i * m + j] - s.alpha[i] - beta;
        if (s.P[i * m + j] > 0) EXPECT_NEAR(slack, 0.0, 1e-9);
        else EXPECT_GE(slack, -1e-9);
      }
    }
    for (size_t i = 0; i < n; ++i) {
      double row = 0;
      for (size_t j = 0; j < m; ++j) row += s.P[i * m + j];
      EXPECT_NEAR(row, a[i], 1e-10);
    }
    EXPECT_NEAR(s.r.reg_cost, primal, 1e-9 * std::abs(primal) + 1e-10);
    EXPECT_NEAR(s.r.transport_cost, tc, 1e-12 * tc);
    // A smaller gamma gives a sparser plan; even gamma = 1 leaves most entries zero here.
    EXPECT_LT(s.r.value.size(), n * m / 2);
  }
}

TEST(OtSparse, SparsityConstraintBoundsEachColumn) {
  const size_t n = 30, m = 25, d = 2;
  const auto C = sq_dist(randn(n * d, 44), randn(m * d, 45), n, m, d);
  const auto a = rand_weights(n, 46), b = rand_weights(m, 47);
  divkit::SparseOtOptions opt;
  opt.gamma = 10.0;  // dense without the constraint
  opt.tol = 1e-8;
  opt.max_iter = 5000;
  const SparseSolved dense = run_sparse(a, b, C, n, m, opt);
  ASSERT_TRUE(dense.r.converged);
  size_t max_col = 0;
  for (size_t j = 0; j < m; ++j) {
    size_t nz = 0;
    for (size_t i = 0; i < n; ++i) nz += dense.P[i * m + j] > 0;
    max_col = std::max(max_col, nz);
  }
  ASSERT_GT(max_col, 3u);
  // k = 5 binds: the unconstrained plan has more non-zeros in some columns. The semi-dual with
  // the constraint is a relaxation (Liu et al. 2023): max V_k >= max V (phi_j^k <= phi_j), strictly
  // when the constraint binds. Its plan need not meet the row marginals, and then the solver
  // must report it, not claim convergence.
  opt.k = 5;
  const SparseSolved s = run_sparse(a, b, C, n, m, opt);
  EXPECT_GT(s.r.reg_cost, dense.r.reg_cost + 1e-6);
  EXPECT_EQ(s.r.converged, s.r.marginal_error <= opt.tol);
  EXPECT_LT(s.r.n_iter, opt.max_iter);  // stops when V stalls
  // k = 1 sends each column to one row: with these generic weights no such plan has P 1 = a,
  // and the solver must say so rather than claim convergence.
  opt.k = 1;
  const SparseSolved one = run_sparse(a, b, C, n, m, opt);
  EXPECT_FALSE(one.r.converged);
  EXPECT_GT(one.r.marginal_error, 1e-3);
  for (const SparseSolved* r : {&s, &one})
    for (size_t j = 0; j < m; ++j) {
      size_t nz = 0;
      double col = 0;
      for (size_t i = 0; i < n; ++i) nz += r->P[i * m + j] > 0, col += r->P[i * m + j];
      EXPECT_LE(nz, r == &s ? 5u : 1u);
      EXPECT_NEAR(col, b[j], 1e-15);
    }
  // k >= n is no constraint at all.
  opt.k = static_cast<int64_t>(n);
  const SparseSolved same = run_sparse(a, b, C, n, m, opt);
  EXPECT_EQ(same.P, dense.P);
  EXPECT_EQ(same.alpha, dense.alpha);
}

TEST(OtSparse, PlanIsRowMajorAndDeterministicAcrossThreadCounts) {
  const size_t n = 300, m = 280, d = 4;
  const auto C = sq_dist(randn(n * d, 48), randn(m * d, 49), n, m, d);
  const auto a = rand_weights(n, 50), b = rand_weights(m, 51);
  divkit::SparseOtOptions opt;
  opt.gamma = 0.5;
  opt.k = 4;
  opt.tol = 1e-7;
  const int saved = divkit::get_num_threads();
  divkit::set_num_threads(1);
  const SparseSolved r1 = run_sparse(a, b, C, n, m, opt);
  divkit::set_num_threads(3);
  const SparseSolved r3 = run_sparse(a, b, C, n, m, opt);
  divkit::set_num_threads(saved);
  EXPECT_EQ(r1.r.value, r3.r.value);
  EXPECT_EQ(r1.alpha, r3.alpha);
  EXPECT_EQ(r1.r.n_iter, r3.r.n_iter);
  for (size_t e = 1; e < r1.r.row.size(); ++e)
    EXPECT_TRUE(r1.r.row[e - 1] < r1.r.row[e] ||
                (r1.r.row[e - 1] == r1.r.row[e] && r1.r.col[e - 1] < r1.r.col[e]));
}

// reg_cost V: dV/dC_ij = P_ij, and dV/db_j (from the core) along b_j += h, b_j' -= h, which
// keeps the masses equal.
TEST(OtSparse, GradientsMatchFiniteDifferences) {
  const size_t n = 12, m = 10, d = 2;
  auto C = sq_dist(randn(n * d, 52), randn(m * d, 53), n, m, d);
  auto a = rand_weights(n, 54), b = rand_weights(m, 55);
  divkit::SparseOtOptions opt;
  opt.gamma = 0.7;
  opt.tol = 1e-13;
  opt.max_iter = 5000;
  const SparseSolved s = run_sparse(a, b, C, n, m, opt);
  ASSERT_TRUE(s.r.converged);
  const double h = 1e-6;
  for (auto [i, j] : {std::pair<size_t, size_t>{0, 0}, {3, 7}, {11, 9}, {5, 2}}) {
    auto Cp = C, Cm = C;
    Cp[i * m + j] += h;
    Cm[i * m + j] -= h;
    const double fd =
        (run_sparse(a, b, Cp, n, m, opt).r.reg_cost - run_sparse(a, b, Cm, n, m, opt).r.reg_cost) /
        (2 * h);
    EXPECT_NEAR(fd, s.P[i * m + j], 1e-6) << "C[" << i << ", " << j << "]";
  }
  for (auto [j, j2] : {std::pair<size_t, size_t>{0, 1}, {4, 8}}) {
    auto bp = b, bm = b;
    bp[j] += h, bp[j2] -= h;
    bm[j] -= h, bm[j2] += h;
    const double fd =
        (run_sparse(a, bp, C, n, m, opt).r.reg_cost - run_sparse(a, bm, C, n, m, opt).r.reg_cost) /
        (2 * h);
    EXPECT_NEAR(fd, s.grad_b[j] - s.grad_b[j2], 1e-6) << "b[" << j << "] - b[" << j2 << "]";
  }
}

TEST(OtSparse, Float32InputsEqualTheirFloat64Values) {
  const size_t n = 20, m = 15;
  std::vector<float> Cf(n * m), af(n), bf(m);
  const auto r = randn(n * m, 56);
  for (size_t e = 0; e < n * m; ++e) Cf[e] = static_cast<float>(r[e] * r[e]);
  for (size_t i = 0; i < n; ++i) af[i] = 1.0f / 20;
  for (size_t j = 0; j < m; ++j) bf[j] = j < 5 ? 0.1f : 0.05f;
  std::vector<double> C(Cf.begin(), Cf.end()), a(af.begin(), af.end()), b(bf.begin(), bf.end());
  divkit::SparseOtOptions opt;
  opt.gamma = 0.3;
  opt.tol = 1e-9;
  const SparseSolved ref = run_sparse(a, b, C, n, m, opt);
  std::vector<double> alpha(n);
  const auto got = divkit::sparse_ot(TensorView::vector(af.data(), DType::f32, n),
                                     TensorView::vector(bf.data(), DType::f32, m),
                                     TensorView::matrix(Cf.data(), DType::f32, n, m), opt,
                                     TensorView::vector(alpha.data(), DType::f64, n), {});
  EXPECT_EQ(got.value, ref.r.value);
  EXPECT_EQ(alpha, ref.alpha);
}

// A mass mismatch the check accepts (float32 rounding of the weights) used to be a marginal error
// that no alpha removes: with a smaller tol, L-BFGS drove alpha to -1e13 and reg_cost to 1e6.
TEST(OtSparse, MassMismatchWithinTheCheckStillConverges) {
  const size_t n = 6, m = 5, d = 2;
  const auto C = sq_dist(randn(n * d, 60), randn(m * d, 61), n, m, d);
  const auto a = rand_weights(n, 62), b = rand_weights(m, 63);
  divkit::SparseOtOptions opt;
  opt.gamma = 0.1;
  opt.tol = 1e-9;
  const SparseSolved ref = run_sparse(a, b, C, n, m, opt);
  ASSERT_TRUE(ref.r.converged);
  std::vector<double> b2 = b;
  for (double& v : b2) v *= 1 + 3e-7;
  const SparseSolved s = run_sparse(a, b2, C, n, m, opt);
  EXPECT_TRUE(s.r.converged) << "err " << s.r.marginal_error;
  EXPECT_NEAR(s.r.reg_cost, ref.r.reg_cost, 1e-9);
  for (size_t i = 0; i < n; ++i) EXPECT_NEAR(s.alpha[i], ref.alpha[i], 1e-6);
}

TEST(OtSparse, NonConvergenceIsReported) {
  const size_t n = 50, m = 50, d = 2;
  const auto C = sq_dist(randn(n * d, 57), randn(m * d, 58), n, m, d);
  divkit::SparseOtOptions opt;
  opt.gamma = 0.01;
  opt.tol = 1e-14;
  opt.max_iter = 2;
  const SparseSolved s =
      run_sparse(std::vector<double>(n, 1.0 / n), std::vector<double>(m, 1.0 / m), C, n, m, opt);
  EXPECT_FALSE(s.r.converged);
  EXPECT_LE(s.r.n_iter, 2);
  EXPECT_GT(s.r.marginal_error, 1e-14);
}

TEST(OtSparse, BadInputRaisesNamingTheArgument) {
  const size_t n = 4, m = 3;
  auto C = randn(n * m, 59);
  auto a = rand_weights(n, 60), b = rand_weights(m, 61);
  divkit::SparseOtOptions opt;
  opt.gamma = 1.0;
  auto call = [&](const divkit::SparseOtOptions& o) { run_sparse(a, b, C, n, m, o); };
  EXPECT_NO_THROW(call(opt));
  for (double g : {0.0, -1.0, double(NAN), double(INFINITY)}) {
    auto o = opt;
    o.gamma = g;
    expect_error([&] { call(o); }, "sparse_ot: gamma must be finite and > 0");
  }
  auto o = opt;
  o.k = -1;
  expect_error([&] { call(o); }, "sparse_ot: k must be >= 1");
  o = opt;
  o.tol = -1;
  expect_error([&] { call(o); }, "sparse_ot: tol must be >= 0");
  o = opt;
  o.max_iter = 0;
  expect_error([&] { call(o); }, "sparse_ot: max_iter must be >= 1");
  std::vector<double> alpha(n);
  expect_error(
      [&] {
        divkit::sparse_ot(TensorView::vector(a.data(), DType::f64, n),
                          TensorView::vector(b.data(), DType::f64, 2),
                          TensorView::matrix(C.data(), DType::f64, n, m), opt,
                          TensorView::vector(alpha.data(), DType::f64, n), {});
      },
      "sparse_ot: b must have shape [3]");
  expect_error(
      [&] {
        divkit::sparse_ot(TensorView::vector(a.data(), DType::f64, n),
                          TensorView::vector(b.data(), DType::f64, m),
                          TensorView::matrix(C.data(), DType::f64, n, m), opt, {}, {});
      },
      "sparse_ot: alpha is required");
  auto an = a;
  an[1] = -0.1;
  expect_error([&] { run_sparse(an, b, C, n, m, opt); }, "sparse_ot: a has a negative weight");
  auto bh = b;
  bh[0] += 0.5;
  expect_error([&] { run_sparse(a, bh, C, n, m, opt); },
               "sparse_ot: a and b must have equal total mass");
  auto Cn = C;
  Cn[5] = NAN;
  expect_error([&] { run_sparse(a, b, Cn, n, m, opt); },
               "sparse_ot: cost has a non-finite value at [1, 2]");
  // Nothing is written on error: alpha keeps its values.
  std::vector<double> keep(n, 7.0);
  try {
    divkit::sparse_ot(TensorView::vector(a.data(), DType::f64, n),
                      TensorView::vector(bh.data(), DType::f64, m),
                      TensorView::matrix(C.data(), DType::f64, n, m), opt,
                      TensorView::vector(keep.data(), DType::f64, n), {});
  } catch (const divkit::Error&) {
  }
  EXPECT_EQ(keep, std::vector<double>(n, 7.0));
}

}  // namespace
