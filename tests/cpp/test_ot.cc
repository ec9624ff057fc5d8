// Entropic OT (include/divkit/ot.h): Sinkhorn against a dense fp64 reference written here,
// gradients against finite differences, batching, determinism, non-convergence reporting, bad
// input; MMD and the Cauchy-Schwarz divergence against direct double sums.
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
      for (size_t k = 0; k < d; ++k) s += (x[i * d + k] - y[j * d + k]) * (x[i * d + k] - y[j * d + k]);
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
        SCOPED_TRACE("d " + std::to_string(d) + " p " + std::to_string(p) + (f32 ? " f32" : " f64"));
        EXPECT_TRUE(cached.st.converged);
        const double rel = f32 ? 2e-5 : 1e-11;
        EXPECT_NEAR(cached.st.reg_cost, fly.st.reg_cost, rel * std::abs(fly.st.reg_cost));
        EXPECT_NEAR(cached.st.transport_cost, fly.st.transport_cost,
                    rel * std::abs(fly.st.transport_cost));
        if (!f32) EXPECT_EQ(cached.st.n_iter, fly.st.n_iter);
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
  const Solved r1 = run_points(x, y, std::vector<double>(n, 1.0 / n), std::vector<double>(m, 1.0 / m), d, opt, true, true);
  divkit::set_num_threads(3);
  const Solved r3 = run_points(x, y, std::vector<double>(n, 1.0 / n), std::vector<double>(m, 1.0 / m), d, opt, true, true);
  divkit::set_num_threads(saved);
  EXPECT_EQ(r1.f, r3.f);
  EXPECT_EQ(r1.gx, r3.gx);
  EXPECT_EQ(r1.st.reg_cost, r3.st.reg_cost);
  EXPECT_EQ(r1.st.n_iter, r3.st.n_iter);
  }
}

TEST(OtSinkhorn, NonConvergenceIsReported) {
  const size_t n = 40, m = 40, d = 2;
  const auto x = randn(n * d, 17), y = randn(m * d, 18);
  SinkhornOptions opt;
  opt.eps = 0.01;
  opt.tol = 1e-12;
  opt.max_iter = 3;
  const Solved r = run_points(x, y, std::vector<double>(n, 1.0 / n), std::vector<double>(m, 1.0 / m), d, opt);
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

double ksum(const std::vector<double>& u, const std::vector<double>& wu, const std::vector<double>& v,
            const std::vector<double>& wv, size_t d, bool gauss, double sigma) {
  double s = 0;
  for (size_t i = 0; i < wu.size(); ++i)
    for (size_t j = 0; j < wv.size(); ++j) {
      double r2 = 0;
      for (size_t k = 0; k < d; ++k) r2 += (u[i * d + k] - v[j * d + k]) * (u[i * d + k] - v[j * d + k]);
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
  auto X = [&](std::vector<double>& v, size_t cnt) { return TensorView::matrix(v.data(), DType::f64, cnt, d); };
  auto A = [&](std::vector<double>& w) { return TensorView::vector(w.data(), DType::f64, w.size()); };
  for (int which = 0; which < 3; ++which) {  // mmd gaussian, mmd energy, cs
    auto value = [&](std::vector<double>& xx, std::vector<double>& yy, bool grad) {
      TensorView gxv = grad ? X(gx, n) : TensorView{}, gyv = grad ? X(gy, m) : TensorView{};
      if (which == 2) return divkit::cs_divergence(X(xx, n), X(yy, m), A(a), A(b), sigma, gxv, gyv);
      return divkit::mmd2(X(xx, n), X(yy, m), A(a), A(b),
                          which == 0 ? divkit::SampleKernel::gaussian : divkit::SampleKernel::energy,
                          sigma, gxv, gyv);
    };
    const bool g = which != 1;
    const double xx = ksum(x, a, x, a, d, g, sigma), yy = ksum(y, b, y, b, d, g, sigma),
                 xy = ksum(x, a, y, b, d, g, sigma);
    const double expect = which == 2 ? std::log(xx) + std::log(yy) - 2 * std::log(xy) : xx + yy - 2 * xy;
    const double v = value(x, y, true);
    EXPECT_NEAR(v, expect, 1e-12) << which;
    EXPECT_GT(v, 0.0);
    // Identical samples with identical weights: 0.
    const double same = which == 2 ? divkit::cs_divergence(X(x, n), X(x, n), A(a), A(a), sigma, {}, {})
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
  expect_error([&] { divkit::mmd2(X(z, n), X(y, m), A(a), A(b), divkit::SampleKernel::gaussian, 0.0, {}, {}); },
               "mmd: sigma must be finite and > 0");
  z[0] = NAN;
  expect_error([&] { divkit::cs_divergence(X(z, n), X(y, m), A(a), A(b), 1.0, {}, {}); },
               "cs_divergence: x has a non-finite value");
  auto bneg = b;
  bneg[0] = -0.1;
  expect_error([&] { divkit::mmd2(X(x, n), X(y, m), A(a), A(bneg), divkit::SampleKernel::energy, 1.0, {}, {}); },
               "mmd: b must be finite and >= 0");
}

}  // namespace
