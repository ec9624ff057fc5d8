// Gaussian KDE (include/divkit/kde.h): log-density against a direct fp64 double sum (also far
// from the data, where a naive sum underflows), leave-one-out against its definition,
// determinism across thread counts, the bandwidth selector against a brute-force fine grid, bad
// input.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "divkit/divergence.h"
#include "divkit/kde.h"
#include "divkit/runtime.h"

namespace {

using divkit::DType;
using divkit::TensorView;

TensorView X(std::vector<double>& v, int64_t n) {
  return TensorView::matrix(v.data(), DType::f64, n, static_cast<int64_t>(v.size()) / n);
}
TensorView V(std::vector<double>& v) {
  return TensorView::vector(v.data(), DType::f64, static_cast<int64_t>(v.size()));
}

// log p_h(q) by the definition, with a max-shift (long double sums).
double ref_log_density(const std::vector<double>& x, const std::vector<double>& w, int64_t d,
                       const double* q, double h, int64_t skip) {
  const int64_t n = static_cast<int64_t>(x.size()) / d;
  std::vector<long double> t;
  long double wsum = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (i == skip) continue;
    long double r2 = 0;
    for (int64_t k = 0; k < d; ++k) r2 += (q[k] - x[i * d + k]) * (q[k] - x[i * d + k]);
    const long double wi = w.empty() ? 1.0L : w[i];
    wsum += wi;
    t.push_back(std::log(wi) - r2 / (2.0L * h * h));
  }
  long double mx = -INFINITY;
  for (auto v : t) mx = std::max(mx, v);
  long double s = 0;
  for (auto v : t) s += std::exp(v - mx);
  return static_cast<double>(mx + std::log(s) - std::log(wsum) -
                             0.5L * d * std::log(2.0L * M_PI * h * h));
}

std::vector<double> gauss(std::mt19937& g, size_t k, double scale) {
  std::normal_distribution<double> nd(0.0, scale);
  std::vector<double> v(k);
  for (auto& e : v) e = nd(g);
  return v;
}

template <typename F>
void expect_error(F&& f, const std::string& msg) {
  try {
    f();
    ADD_FAILURE() << "no error, expected: " << msg;
  } catch (const divkit::Error& e) {
    EXPECT_NE(std::string(e.what()).find(msg), std::string::npos) << e.what();
  }
}

TEST(Kde, LogDensityMatchesReference) {
  std::mt19937 g(3);
  const int64_t n = 57, m = 23, d = 3;
  auto x = gauss(g, n * d, 1.0), y = gauss(g, m * d, 2.0);
  y[0] = 40.0;  // far from every point: a plain sum of exp underflows to 0 there
  std::vector<double> w(n);
  std::uniform_real_distribution<double> u(0.1, 2.0);
  for (auto& e : w) e = u(g);
  w[5] = 0.0;
  for (double h : {0.05, 0.4, 3.0}) {
    for (bool weighted : {false, true}) {
      std::vector<double> out(m);
      std::vector<double> wv = weighted ? w : std::vector<double>{};
      divkit::kde_log_density(X(x, n), weighted ? V(w) : TensorView{}, X(y, m), h, V(out));
      double mean = 0;
      for (int64_t j = 0; j < m; ++j) {
        const double r = ref_log_density(x, wv, d, y.data() + j * d, h, -1);
        EXPECT_NEAR(out[j], r, 1e-10 * std::max(1.0, std::fabs(r))) << h << " " << j;
        mean += r / m;
      }
      const double ll =
          divkit::kde_log_likelihood(X(x, n), weighted ? V(w) : TensorView{}, X(y, m), h);
      EXPECT_NEAR(ll, mean, 1e-10 * std::max(1.0, std::fabs(mean)));
    }
  }
}

TEST(Kde, LeaveOneOutMatchesDefinition) {
  std::mt19937 g(4);
  const int64_t n = 40, d = 2;
  auto x = gauss(g, n * d, 1.0);
  std::vector<double> w(n, 1.0);
  w[3] = 4.0;
  for (double h : {0.1, 0.7}) {
    double mean = 0;
    for (int64_t j = 0; j < n; ++j) mean += ref_log_density(x, w, d, x.data() + j * d, h, j) / n;
    EXPECT_NEAR(divkit::kde_log_likelihood(X(x, n), V(w), TensorView{}, h), mean, 1e-10);
  }
}

TEST(Kde, DeterministicAcrossThreads) {
  std::mt19937 g(5);
  const int64_t n = 300, m = 200, d = 4;
  auto x = gauss(g, n * d, 1.0), y = gauss(g, m * d, 1.0);
  std::vector<double> a(m), b(m);
  const int saved = divkit::get_num_threads();
  divkit::set_num_threads(1);
  divkit::kde_log_density(X(x, n), {}, X(y, m), 0.3, V(a));
  const double l1 = divkit::kde_log_likelihood(X(x, n), {}, {}, 0.3);
  divkit::set_num_threads(2);
  divkit::kde_log_density(X(x, n), {}, X(y, m), 0.3, V(b));
  const double l2 = divkit::kde_log_likelihood(X(x, n), {}, {}, 0.3);
  divkit::set_num_threads(saved);
  EXPECT_EQ(a, b);
  EXPECT_EQ(l1, l2);
}

TEST(Kde, BandwidthSelectorMatchesBruteForce) {
  std::mt19937 g(6);
  const int64_t n = 200, m = 150, d = 2;
  auto x = gauss(g, n * d, 1.0), y = gauss(g, m * d, 1.0);
  for (bool held_out : {true, false}) {
    const TensorView yv = held_out ? X(y, m) : TensorView{};
    divkit::KdeBandwidthOptions opt;
    opt.tol = 1e-6;
    const auto r = divkit::kde_select_bandwidth(X(x, n), {}, yv, opt);
    // Brute force: 801 values of log h over [log 0.01, log 10] (spacing 0.0086).
    double best_h = 0, best_l = -INFINITY;
    for (int k = 0; k <= 800; ++k) {
      const double h = std::exp(std::log(0.01) + (std::log(10.0) - std::log(0.01)) * k / 800.0);
      const double l = divkit::kde_log_likelihood(X(x, n), {}, yv, h);
      if (l > best_l) best_l = l, best_h = h;
    }
    EXPECT_GE(r.log_likelihood, best_l - 1e-9) << held_out;
    EXPECT_NEAR(std::log(r.bandwidth), std::log(best_h), 1e-2) << held_out;
    EXPECT_EQ(r.grid_bandwidths.size(), 24u);
    EXPECT_NEAR(r.log_likelihood, divkit::kde_log_likelihood(X(x, n), {}, yv, r.bandwidth), 1e-12);
  }
}

TEST(Kde, BadInput) {
  std::vector<double> x = {0, 1, 2, 3}, y = {0, 1}, out(1), w = {1, -1};
  expect_error([&] { divkit::kde_log_density(X(x, 2), {}, X(y, 1), 0.0, V(out)); },
               "kde_log_density: bandwidth must be finite and > 0");
  expect_error([&] { divkit::kde_log_likelihood(X(x, 2), V(w), {}, 1.0); },
               "kde_log_likelihood: w must be finite and >= 0");
  std::vector<double> y3 = {0, 1, 2};
  expect_error([&] { divkit::kde_log_likelihood(X(x, 2), {}, X(y3, 1), 1.0); },
               "kde_log_likelihood: y must have x's dimension d = 2, got 3");
  std::vector<double> one = {0, 1};
  expect_error([&] { divkit::kde_log_likelihood(X(one, 1), {}, {}, 1.0); },
               "kde_log_likelihood: leave-one-out (y not given) needs at least 2 points");
  divkit::KdeBandwidthOptions opt;
  opt.grid = 2;
  expect_error([&] { divkit::kde_select_bandwidth(X(x, 2), {}, {}, opt); },
               "kde_select_bandwidth: grid must be >= 3");
  x[1] = NAN;
  expect_error([&] { divkit::kde_log_likelihood(X(x, 2), {}, {}, 1.0); },
               "kde_log_likelihood: x has a non-finite value");
}

}  // namespace
