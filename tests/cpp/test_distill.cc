// The distillation row kernels (include/divkit/distill.h) against plain fp64 references written
// here, gradients against central finite differences, thread independence, and error paths.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <random>
#include <vector>

#include "divkit/distill.h"
#include "divkit/runtime.h"

namespace {

using divkit::DType;
using divkit::TensorView;
using Vec = std::vector<double>;

constexpr int64_t kIgnore = -100;

Vec randn(int64_t n, uint64_t seed, double scale = 2.0) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> nd(0.0, scale);
  Vec x(static_cast<size_t>(n));
  for (double& a : x) a = nd(rng);
  return x;
}

TensorView mat(Vec& x, int64_t n, int64_t v) {
  return TensorView::matrix(x.data(), DType::f64, n, v);
}
TensorView vec(Vec& x) {
  return TensorView::vector(x.data(), DType::f64, static_cast<int64_t>(x.size()));
}
TensorView ivec(std::vector<int64_t>& x) {
  return TensorView::vector(x.data(), DType::i64, static_cast<int64_t>(x.size()));
}

Vec log_softmax(const double* x, int64_t v, double inv_t = 1.0, int64_t skip = -1) {
  double m = -INFINITY;
  for (int64_t j = 0; j < v; ++j)
    if (j != skip) m = std::max(m, x[j] * inv_t);
  double s = 0;
  for (int64_t j = 0; j < v; ++j)
    if (j != skip) s += std::exp(x[j] * inv_t - m);
  Vec out(static_cast<size_t>(v));
  for (int64_t j = 0; j < v; ++j) out[j] = x[j] * inv_t - m - std::log(s);
  return out;
}

// Central differences of f (sum of per-row losses weighted by coef) in x[k].
double fd(const std::function<double()>& f, double& xk, double h = 1e-6) {
  const double x0 = xk;
  xk = x0 + h;
  const double fp = f();
  xk = x0 - h;
  const double fm = f();
  xk = x0;
  return (fp - fm) / (2 * h);
}

TEST(Distill, RowEntropyFp32AndFp64) {
  const int64_t n = 5, v = 37;
  Vec x = randn(n * v, 1);
  std::vector<float> xf(x.begin(), x.end());
  Vec out(n), out32(n);
  divkit::row_entropy(mat(x, n, v), 1.5, vec(out));
  divkit::row_entropy(TensorView::matrix(xf.data(), DType::f32, n, v), 1.5, vec(out32));
  for (int64_t i = 0; i < n; ++i) {
    const Vec lp = log_softmax(&x[i * v], v, 1 / 1.5);
    double h = 0;
    for (double a : lp) h -= std::exp(a) * a;
    EXPECT_NEAR(out[i], h, 1e-12);
    EXPECT_NEAR(out32[i], h, 1e-5);
  }
}

TEST(Distill, NkdMatchesReferenceAndFiniteDifferences) {
  const int64_t n = 4, v = 9;
  const double tau = 1.7;
  Vec s = randn(n * v, 2), t = randn(n * v, 3);
  std::vector<int64_t> y = {3, kIgnore, 0, 8};
  Vec a = {0.7, 1.0, -0.4, 1.3}, b = {1.1, 0.5, 2.0, -0.6};
  auto run = [&](Vec* grad) {
    Vec to(n), no(n);
    TensorView g = grad ? mat(*grad, n, v) : TensorView{};
    divkit::nkd_rows(mat(s, n, v), mat(t, n, v), ivec(y), kIgnore, tau, vec(to), vec(no), vec(a),
                     vec(b), g);
    return std::make_pair(to, no);
  };
  auto [to, no] = run(nullptr);
  for (int64_t i = 0; i < n; ++i) {
    if (y[i] == kIgnore) {
      EXPECT_EQ(to[i], 0.0);
      EXPECT_EQ(no[i], 0.0);
      continue;
    }
    const Vec lp = log_softmax(&t[i * v], v), lq = log_softmax(&s[i * v], v);
    EXPECT_NEAR(to[i], -std::exp(lp[y[i]]) * lq[y[i]], 1e-12);
    const Vec lph = log_softmax(&t[i * v], v, 1 / tau, y[i]),
              lqh = log_softmax(&s[i * v], v, 1 / tau, y[i]);
    double ref = 0;
    for (int64_t j = 0; j < v; ++j)
      if (j != y[i]) ref -= std::exp(lph[j]) * lqh[j];
    EXPECT_NEAR(no[i], ref, 1e-12);
  }
  Vec grad(n * v);
  run(&grad);
  auto f = [&] {
    auto [t1, n1] = run(nullptr);
    double sum = 0;
    for (int64_t i = 0; i < n; ++i) sum += a[i] * t1[i] + b[i] * n1[i];
    return sum;
  };
  for (int64_t k = 0; k < n * v; ++k) EXPECT_NEAR(grad[k], fd(f, s[k]), 1e-7) << k;
}

TEST(Distill, OfaMatchesReferenceAndFiniteDifferences) {
  const int64_t n = 3, v = 7;
  const double eps = 1.6, temp = 1.3;
  Vec s = randn(n * v, 4), t = randn(n * v, 5);
  std::vector<int64_t> y = {1, 6, 2};
  Vec c = {1.0, -0.5, 2.0};
  auto run = [&](Vec* grad) {
    Vec out(n);
    divkit::ofa_rows(mat(s, n, v), mat(t, n, v), ivec(y), kIgnore, eps, temp, vec(out),
                     grad ? vec(c) : TensorView{}, grad ? mat(*grad, n, v) : TensorView{});
    return out;
  };
  const Vec out = run(nullptr);
  for (int64_t i = 0; i < n; ++i) {
    const Vec lp = log_softmax(&t[i * v], v, 1 / temp), lq = log_softmax(&s[i * v], v, 1 / temp);
    double ref = 0;
    for (int64_t j = 0; j < v; ++j) {
      const double e = j == y[i];
      ref -= (std::pow(std::exp(lp[j]) + e, eps) - e) * lq[j];
    }
    EXPECT_NEAR(out[i], ref, 1e-11);
  }
  Vec grad(n * v);
  run(&grad);
  auto f = [&] {
    const Vec o = run(nullptr);
    return c[0] * o[0] + c[1] * o[1] + c[2] * o[2];
  };
  for (int64_t k = 0; k < n * v; ++k) EXPECT_NEAR(grad[k], fd(f, s[k]), 1e-7) << k;
}

TEST(Distill, ClippedKlSoftMaskGradientsInBoundsAndStudent) {
  const int64_t n = 3, v = 11;
  Vec s = randn(n * v, 6), t = randn(n * v, 7);
  Vec lo = {0.01, 0.02, 0.005}, hi = {0.3, 0.5, 0.2};
  Vec c = {1.0, 0.5, -1.5};
  const double sharp = 0.4, temp = 1.1;
  auto run = [&](Vec* gs, Vec* gl, Vec* gh) {
    Vec out(n);
    const bool g = gs != nullptr;
    divkit::clipped_kl_rows(mat(s, n, v), mat(t, n, v), vec(lo), vec(hi), temp, sharp, TensorView{},
                            kIgnore, vec(out), g ? vec(c) : TensorView{},
                            g ? mat(*gs, n, v) : TensorView{}, g ? vec(*gl) : TensorView{},
                            g ? vec(*gh) : TensorView{});
    return out;
  };
  const Vec out = run(nullptr, nullptr, nullptr);
  for (int64_t i = 0; i < n; ++i) {
    const Vec lp = log_softmax(&t[i * v], v, 1 / temp), lq = log_softmax(&s[i * v], v, 1 / temp);
    Vec w(v);
    double A = 0, B = 0;
    for (int64_t j = 0; j < v; ++j) {
      w[j] = 1 / (1 + std::exp(-(lp[j] - std::log(lo[i])) / sharp)) /
             (1 + std::exp(-(std::log(hi[i]) - lp[j]) / sharp));
      A += w[j] * std::exp(lp[j]);
      B += w[j] * std::exp(lq[j]);
    }
    double kl = 0;
    for (int64_t j = 0; j < v; ++j) {
      const double pt = w[j] * std::exp(lp[j]) / A, qt = w[j] * std::exp(lq[j]) / B;
      kl += pt * (std::log(pt) - std::log(qt));
    }
    EXPECT_NEAR(out[i], kl, 1e-12);
  }
  Vec gs(n * v), gl(n), gh(n);
  run(&gs, &gl, &gh);
  auto f = [&] {
    const Vec o = run(nullptr, nullptr, nullptr);
    return c[0] * o[0] + c[1] * o[1] + c[2] * o[2];
  };
  for (int64_t k = 0; k < n * v; ++k) EXPECT_NEAR(gs[k], fd(f, s[k]), 1e-7) << k;
  for (int64_t i = 0; i < n; ++i) {
    EXPECT_NEAR(gl[i], fd(f, lo[i], 1e-8), 1e-5 * std::max(1.0, std::abs(gl[i])));
    EXPECT_NEAR(gh[i], fd(f, hi[i], 1e-8), 1e-5 * std::max(1.0, std::abs(gh[i])));
  }
}

TEST(Distill, MassBoundsAndSortedProbs) {
  const int64_t n = 2, v = 6;
  Vec t = {3, 1, 2, 0, -1, 0.5, 0, 0, 0, 0, 0, 0};
  Vec lo(n), hi(n);
  divkit::mass_bounds(mat(t, n, v), 1.0, 0.0, 0.9, vec(lo), vec(hi));
  Vec p = log_softmax(t.data(), v);
  for (double& a : p) a = std::exp(a);
  Vec sorted = p;
  std::sort(sorted.rbegin(), sorted.rend());
  double before = 0;
  double want_lo = 0;
  for (double a : sorted) {
    if (before < 0.9) want_lo = a;
    before += a;
  }
  EXPECT_DOUBLE_EQ(hi[0], sorted[0]);
  EXPECT_DOUBLE_EQ(lo[0], want_lo);
  EXPECT_NEAR(lo[1], 1.0 / 6, 1e-15);  // uniform row: every token kept
  Vec top(n * 8);
  divkit::sorted_probs(mat(t, n, v), 1.0, TensorView::matrix(top.data(), DType::f64, n, 8));
  for (int64_t j = 0; j < 6; ++j) EXPECT_DOUBLE_EQ(top[j], sorted[j]);
  EXPECT_EQ(top[6], 0.0);
  EXPECT_EQ(top[7], 0.0);
}

TEST(Distill, TemperedKlNoiseReferenceAndThreads) {
  const int64_t n = 40, v = 33;
  Vec s = randn(n * v, 8), t = randn(n * v, 9);
  Vec temps(n);
  for (int64_t i = 0; i < n; ++i) temps[i] = 1.0 + 0.1 * i;
  Vec noise(n * v);
  divkit::swing_noise(42, mat(noise, n, v));
  double mean = 0, var = 0;
  for (double e : noise) mean += e / (n * v);
  for (double e : noise) var += (e - mean) * (e - mean) / (n * v);
  EXPECT_LT(std::abs(mean), 0.1);
  EXPECT_NEAR(var, 1.0, 0.15);
  Vec out1(n), out2(n);
  const int old = divkit::get_num_threads();
  divkit::set_num_threads(1);
  divkit::tempered_kl_rows(mat(s, n, v), mat(t, n, v), vec(temps), 0.25, 42, TensorView{}, kIgnore,
                           vec(out1), TensorView{}, TensorView{});
  divkit::set_num_threads(2);
  divkit::tempered_kl_rows(mat(s, n, v), mat(t, n, v), vec(temps), 0.25, 42, TensorView{}, kIgnore,
                           vec(out2), TensorView{}, TensorView{});
  divkit::set_num_threads(old);
  for (int64_t i = 0; i < n; ++i) {
    EXPECT_EQ(out1[i], out2[i]);
    Vec tn(v);
    for (int64_t j = 0; j < v; ++j) tn[j] = t[i * v + j] / temps[i] + 0.25 * noise[i * v + j];
    const Vec lp = log_softmax(tn.data(), v), lq = log_softmax(&s[i * v], v, 1 / temps[i]);
    double kl = 0;
    for (int64_t j = 0; j < v; ++j) kl += std::exp(lp[j]) * (lp[j] - lq[j]);
    EXPECT_NEAR(out1[i], kl, 1e-12);
  }
}

TEST(Distill, SelectiveContrastMatchesOfficialRule) {
  // Row 0 is sharp (large standard deviation of p: confident, log p returned); row 1 is flat
  // (small deviation: log(p - w p_lame) on the tokens with p >= ratio mean(p), -inf elsewhere).
  const int64_t n = 2, v = 5;
  const double w = 0.5, thr = 0.1, ratio = 0.95;
  Vec s = {10, 0, 0, 0, 0, 0.1, 0.2, 0.0, -0.4, 0.3};
  Vec l = randn(n * v, 10);
  Vec out(n * v), unc(n), applied(n);
  divkit::selective_contrast(mat(s, n, v), mat(l, n, v), w, thr, ratio, mat(out, n, v), vec(unc),
                             vec(applied));
  for (int64_t i = 0; i < n; ++i) {
    const Vec lp = log_softmax(&s[i * v], v), ll = log_softmax(&l[i * v], v);
    double sd = 0;
    for (int64_t j = 0; j < v; ++j) sd += (std::exp(lp[j]) - 1.0 / v) * (std::exp(lp[j]) - 1.0 / v);
    sd = std::sqrt(sd / (v - 1));
    EXPECT_NEAR(unc[i], sd, 1e-14);
    EXPECT_EQ(applied[i], i == 0 ? 0.0 : 1.0);
    int kept = 0;
    for (int64_t j = 0; j < v; ++j) {
      const double p = std::exp(lp[j]), d = p - w * std::exp(ll[j]);
      if (i == 0) {
        EXPECT_NEAR(out[j], lp[j], 1e-12);
      } else if (p >= ratio / v && d > 0) {
        EXPECT_NEAR(out[v + j], std::log(d), 1e-12);
        ++kept;
      } else {
        EXPECT_EQ(out[v + j], -std::numeric_limits<double>::infinity());
      }
    }
    if (i == 1) {
      EXPECT_GT(kept, 0);
      EXPECT_LT(kept, v);  // the filter removed the token with logit -0.4
    }
  }
}

TEST(Distill, Errors) {
  const int64_t n = 2, v = 4;
  Vec s = randn(n * v, 11), t = randn(n * v, 12), o1(n), o2(n);
  std::vector<int64_t> bad = {0, 4};
  auto expect_error = [](const std::function<void()>& f, const std::string& what) {
    try {
      f();
      FAIL() << "no error, expected: " << what;
    } catch (const divkit::Error& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
  };
  expect_error(
      [&] {
        divkit::nkd_rows(mat(s, n, v), mat(t, n, v), ivec(bad), kIgnore, 1.0, vec(o1), vec(o2),
                         TensorView{}, TensorView{}, TensorView{});
      },
      "nkd: labels[1] = 4 is out of range [0, 4)");
  std::vector<int64_t> y = {0, 1};
  Vec g(n * v);
  expect_error(
      [&] {
        divkit::ofa_rows(mat(s, n, v), mat(t, n, v), ivec(y), kIgnore, 1.0, 1.0, vec(o1),
                         TensorView{}, mat(g, n, v));
      },
      "ofa_loss: coef is required");
  Vec nan_s = s;
  nan_s[v + 2] = NAN;
  expect_error(
      [&] {
        divkit::ofa_rows(mat(nan_s, n, v), mat(t, n, v), ivec(y), kIgnore, 1.0, 1.0, vec(o1),
                         TensorView{}, TensorView{});
      },
      "student_logits has a non-finite value (nan) in row 1");
  Vec lo = {0.1, 0.5}, hi = {0.2, 0.4};
  expect_error(
      [&] {
        divkit::clipped_kl_rows(mat(s, n, v), mat(t, n, v), vec(lo), vec(hi), 1.0, 0.0,
                                TensorView{}, kIgnore, vec(o1), TensorView{}, TensorView{},
                                TensorView{}, TensorView{});
      },
      "dac_kl_loss: row 1: the bounds must satisfy 0 < lower < upper");
  Vec temps = {1.0, 0.0};
  expect_error(
      [&] {
        divkit::tempered_kl_rows(mat(s, n, v), mat(t, n, v), vec(temps), 0.0, 0, TensorView{},
                                 kIgnore, vec(o1), TensorView{}, TensorView{});
      },
      "swing_loss: temperatures[1] must be finite and > 0");
  Vec t3 = randn(n * 3, 13);
  Vec out(n * v);
  expect_error(
      [&] {
        divkit::selective_contrast(mat(s, n, v), mat(t3, n, 3), 0.5, 0.1, 0.1, mat(out, n, v),
                                   vec(o1), TensorView{});
      },
      "uscd: lame_logits has shape [2, 3], expected [2, 4]");
  expect_error(
      [&] {
        divkit::selective_contrast(mat(s, n, v), mat(s, n, v), -0.5, 0.1, 0.1, mat(out, n, v),
                                   vec(o1), TensorView{});
      },
      "uscd: lame_weight must be finite and >= 0");
  expect_error([&] { divkit::row_entropy(mat(s, n, v), 0.0, vec(o1)); },
               "row_entropy: temperature must be finite and > 0");
}

}  // namespace
