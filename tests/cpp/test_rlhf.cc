// RLHF utilities and the sample-based preference losses (include/divkit/rlhf.h): values against
// fp64 references written out here from the formulas (and objectives.md's k1-k3 values),
// gradients against central finite differences of the kernels' own fp64 values, fp32 outputs,
// and bad input.
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "divkit/rlhf.h"
#include "test_util.h"

namespace divkit_test {
namespace {

TensorView v1(std::vector<double>& v) {
  return TensorView::vector(v.data(), DType::f64, static_cast<int64_t>(v.size()));
}
TensorView m2(std::vector<double>& v, int64_t r, int64_t c) {
  return TensorView::matrix(v.data(), DType::f64, r, c);
}
std::vector<double> randn(size_t n, uint32_t seed, double scale = 1.0) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> d(0.0, scale);
  std::vector<double> v(n);
  for (auto& x : v) x = d(gen);
  return v;
}

// Central finite difference of sum(f(x)) with respect to x[i].
template <typename F>
double fd(std::vector<double>& x, size_t i, F f, double h = 1e-6) {
  const double x0 = x[i];
  x[i] = x0 + h;
  const double up = f();
  x[i] = x0 - h;
  const double dn = f();
  x[i] = x0;
  return (up - dn) / (2 * h);
}

TEST(RlhfKl, ReferenceValuesAndGradients) {
  // objectives.md: log pi = -1, log pi_ref = -1.5 -> k1 0.5, k2 0.125, k3 0.106531
  const std::pair<const char*, double> want[] = {
      {"k1", 0.5}, {"k2", 0.125}, {"low_var_kl", 0.1065306597}, {"abs", 0.5}};
  for (auto [name, value] : want) {
    std::vector<double> lp{-1.0}, ref{-1.5}, out(1);
    divkit::kl_estimator(v1(lp), v1(ref), divkit::parse_kl_estimator(name), false, v1(out));
    EXPECT_NEAR(out[0], value, 1e-9) << name;
  }
  std::vector<double> lp = randn(9, 1), ref = randn(9, 2), out(9), go = randn(9, 3), glp(9),
                      gref(9);
  for (auto k : {divkit::KlEstimator::k1, divkit::KlEstimator::k2, divkit::KlEstimator::k3,
                 divkit::KlEstimator::abs}) {
    divkit::kl_estimator(v1(lp), v1(ref), k, false, v1(out), v1(go), v1(glp), v1(gref));
    auto f = [&] {
      std::vector<double> o(9);
      divkit::kl_estimator(v1(lp), v1(ref), k, false, v1(o));
      double s = 0;
      for (int i = 0; i < 9; ++i) s += go[i] * o[i];
      return s;
    };
    for (size_t i = 0; i < 9; ++i) {
      EXPECT_NEAR(glp[i], fd(lp, i, f), 1e-6) << static_cast<int>(k) << " " << i;
      EXPECT_NEAR(gref[i], fd(ref, i, f), 1e-6) << static_cast<int>(k) << " " << i;
    }
  }
}

TEST(RlhfKl, VerlClampsAndNoCancellation) {
  std::vector<double> lp{0.0, 0.0, 0.0, 0.0}, ref{30.0, -30.0, 1e-9, 2.0}, out(4), g(4), gr(4);
  divkit::kl_estimator(v1(lp), v1(ref), divkit::KlEstimator::k3, true, v1(out), {}, v1(g), v1(gr));
  EXPECT_EQ(out[0], 10.0);
  EXPECT_EQ(out[1], 10.0);  // r = -20: e^-20 + 19 > 10
  EXPECT_NEAR(out[2], 0.5e-18, 1e-24);
  EXPECT_NEAR(out[3], std::exp(2.0) - 3.0, 1e-12);
  EXPECT_EQ(g[0], 0.0);  // clamps active: no gradient
  EXPECT_EQ(g[1], 0.0);
  EXPECT_NEAR(gr[3], std::expm1(2.0), 1e-12);
  // fp32 output
  std::vector<float> of(4);
  divkit::kl_estimator(v1(lp), v1(ref), divkit::KlEstimator::k3, false,
                       TensorView::vector(of.data(), DType::f32, 4));
  EXPECT_FLOAT_EQ(of[3], static_cast<float>(std::exp(2.0) - 3.0));
}

TEST(RlhfEnsemble, ValuesAndGradients) {
  const int64_t n = 4, e = 5;
  std::vector<double> r = randn(n * e, 4), out(n), go = randn(n, 5), g(n * e);
  r[7] = r[6] = -5.0;  // a tie at the minimum of row 1: the first one gets the gradient
  for (auto m :
       {divkit::EnsembleMethod::mean, divkit::EnsembleMethod::wco, divkit::EnsembleMethod::uwo}) {
    divkit::ensemble_rewards(m2(r, n, e), m, 0.7, v1(out), v1(go), m2(g, n, e));
    for (int64_t i = 0; i < n; ++i) {
      double mean = 0, mn = 1e300, var = 0;
      for (int64_t j = 0; j < e; ++j) mean += r[i * e + j] / e, mn = std::min(mn, r[i * e + j]);
      for (int64_t j = 0; j < e; ++j) var += (r[i * e + j] - mean) * (r[i * e + j] - mean) / e;
      const double want = m == divkit::EnsembleMethod::mean  ? mean
                          : m == divkit::EnsembleMethod::wco ? mn
                                                             : mean - 0.7 * var;
      EXPECT_NEAR(out[i], want, 1e-12);
    }
    if (m == divkit::EnsembleMethod::wco) {
      EXPECT_EQ(g[6], go[1]);
      EXPECT_EQ(g[7], 0.0);
      continue;  // not differentiable at the tie
    }
    auto f = [&] {
      std::vector<double> o(n);
      divkit::ensemble_rewards(m2(r, n, e), m, 0.7, v1(o));
      double s = 0;
      for (int64_t i = 0; i < n; ++i) s += go[i] * o[i];
      return s;
    };
    for (size_t i = 0; i < r.size(); ++i) EXPECT_NEAR(g[i], fd(r, i, f), 1e-6);
  }
}

TEST(RlhfInfAlign, CalibrationTransformBestOfN) {
  std::vector<double> ref{0, 1, 2, 3, 5, 5, 5, 5}, r{1.5, -1, 3, 5, 4, 6}, c(6);
  divkit::calibrate_reward(m2(r, 2, 3), m2(ref, 2, 4), m2(c, 2, 3));
  const double want[] = {0.5, 0.0, 1.0, 1.0, 0.0, 1.0};
  for (int i = 0; i < 6; ++i) EXPECT_EQ(c[i], want[i]) << i;
  // against the O(N M) count on random data with ties
  std::vector<double> rr = randn(3 * 50, 6), x = randn(3 * 20, 7), cc(60);
  for (auto& v : rr) v = std::round(v * 4) / 4;
  for (auto& v : x) v = std::round(v * 4) / 4;
  divkit::calibrate_reward(m2(x, 3, 20), m2(rr, 3, 50), m2(cc, 3, 20));
  for (int b = 0; b < 3; ++b)
    for (int j = 0; j < 20; ++j) {
      int cnt = 0;
      for (int m = 0; m < 50; ++m) cnt += rr[b * 50 + m] <= x[b * 20 + j];
      EXPECT_EQ(cc[b * 20 + j], cnt / 50.0);
    }
  std::vector<double> u{0.0, 0.25, 1.0}, phi(3), gu(3), go{1.0, 2.0, -1.0};
  divkit::infalign_transform(v1(u), -3.0, v1(phi), v1(go), v1(gu));
  for (int i = 0; i < 3; ++i) {
    EXPECT_NEAR(phi[i], std::exp(-3.0 * u[i]), 1e-15);
    EXPECT_NEAR(gu[i], go[i] * -3.0 * std::exp(-3.0 * u[i]), 1e-14);
  }
  std::vector<double> rw{0.1, 0.7, 0.3, 2.0, 1.0, 2.0}, best(2);
  std::vector<int64_t> idx(2);
  divkit::best_of_n(m2(rw, 2, 3), TensorView::vector(idx.data(), DType::i64, 2), v1(best));
  EXPECT_EQ(idx[0], 1);
  EXPECT_EQ(idx[1], 0);  // first maximum on ties
  EXPECT_EQ(best[1], 2.0);
}

TEST(RlhfD2O, ValuesAndGradients) {
  const int64_t b = 3, k = 4;
  std::vector<double> ps = randn(b * k, 8, 3), rs = randn(b * k, 9, 3), pl = randn(b, 10, 3),
                      rl = randn(b, 11, 3);
  std::vector<double> loss(b), pos(b), neg(b), go = randn(b, 12), gps(b * k), grs(b * k), gpl(b),
                                               grl(b);
  divkit::D2OGrads g{v1(go), m2(gps, b, k), m2(grs, b, k), v1(gpl), v1(grl)};
  divkit::d2o_loss(m2(ps, b, k), m2(rs, b, k), v1(pl), v1(rl), 0.3, 0.2, v1(loss), v1(pos), v1(neg),
                   g);
  for (int64_t i = 0; i < b; ++i) {
    double s = 0;
    for (int64_t j = 0; j < k; ++j) s += ps[i * k + j] - rs[i * k + j];
    const double z = 0.3 / k * s - 0.2 * (pl[i] - rl[i]);
    EXPECT_NEAR(loss[i], std::log1p(std::exp(-z)), 1e-12);
    EXPECT_NEAR(pos[i], 0.3 / k * s, 1e-12);
  }
  auto f = [&] {
    std::vector<double> o(b);
    divkit::d2o_loss(m2(ps, b, k), m2(rs, b, k), v1(pl), v1(rl), 0.3, 0.2, v1(o), {}, {});
    double s = 0;
    for (int64_t i = 0; i < b; ++i) s += go[i] * o[i];
    return s;
  };
  for (size_t i = 0; i < ps.size(); ++i) {
    EXPECT_NEAR(gps[i], fd(ps, i, f), 1e-7);
    EXPECT_NEAR(grs[i], fd(rs, i, f), 1e-7);
  }
  for (size_t i = 0; i < pl.size(); ++i) {
    EXPECT_NEAR(gpl[i], fd(pl, i, f), 1e-7);
    EXPECT_NEAR(grl[i], fd(rl, i, f), 1e-7);
  }
  // a huge margin stays finite: -logsig(-1000) = 1000
  std::vector<double> big{1e4}, zero{0.0};
  std::vector<double> o1(1);
  divkit::d2o_loss(m2(zero, 1, 1), m2(zero, 1, 1), v1(big), v1(zero), 1.0, 0.1, v1(o1), {}, {});
  EXPECT_NEAR(o1[0], 1000.0, 1e-9);
}

TEST(RlhfHyPO, LeaveOneOutGradient) {
  const int64_t b = 2, k = 4;
  std::vector<double> ps = randn(b * k, 13), rs = randn(b * k, 14), kl(b), go{0.5, -2.0}, g(b * k);
  divkit::hypo_online_kl(m2(ps, b, k), m2(rs, b, k), v1(kl), v1(go), m2(g, b, k));
  for (int64_t i = 0; i < b; ++i) {
    double s = 0;
    for (int64_t j = 0; j < k; ++j) s += ps[i * k + j] - rs[i * k + j];
    EXPECT_NEAR(kl[i], s / k, 1e-14);
    for (int64_t j = 0; j < k; ++j) {
      const double r = ps[i * k + j] - rs[i * k + j];
      EXPECT_NEAR(g[i * k + j], go[i] * (r - (s - r) / (k - 1)) / k, 1e-14);
    }
  }
  double total = 0;  // the leave-one-out baseline: the gradient of each prompt sums to 0 x const
  for (int64_t j = 0; j < k; ++j) total += g[j];
  EXPECT_NEAR(total, 0.0, 1e-12);
}

TEST(RlhfSuperHF, SelectionValueAndGradient) {
  const int64_t b = 2, n = 4, top = 2;
  std::vector<double> lp = randn(b * n, 15), rw{0.1, 0.9, 0.5, 0.9, 2.0, -1.0, 3.0, 2.0},
                      kl = randn(b * n, 16), len{1, 2, 3, 4, 5, 6, 7, 8}, loss(1), gl(b * n),
                      gk(b * n), go{1.5};
  std::vector<int64_t> idx(b * top);
  const auto I = TensorView::matrix(idx.data(), DType::i64, b, top);
  divkit::superhf_loss(m2(lp, b, n), m2(rw, b, n), m2(kl, b, n), m2(len, b, n), 0.35, top, v1(loss),
                       I, v1(go), m2(gl, b, n), m2(gk, b, n));
  EXPECT_EQ(idx[0], 1);  // 0.9 at 1 and 3: the lower index first
  EXPECT_EQ(idx[1], 3);
  EXPECT_EQ(idx[2], 2);
  EXPECT_EQ(idx[3], 0);  // 2.0 at 0 and 3
  const int keep[] = {1, 3, 6, 4};
  double nll = 0, k = 0;
  for (int j : keep) nll += -lp[j] / len[j], k += kl[j];
  EXPECT_NEAR(loss[0], nll / 4 + 0.35 * k / 4, 1e-14);
  auto f = [&] {
    std::vector<double> o(1);
    std::vector<int64_t> ii(b * top);
    divkit::superhf_loss(m2(lp, b, n), m2(rw, b, n), m2(kl, b, n), m2(len, b, n), 0.35, top, v1(o),
                         TensorView::matrix(ii.data(), DType::i64, b, top));
    return 1.5 * o[0];
  };
  for (size_t i = 0; i < lp.size(); ++i) {
    EXPECT_NEAR(gl[i], fd(lp, i, f), 1e-8);
    EXPECT_NEAR(gk[i], fd(kl, i, f), 1e-8);
  }
}

TEST(RlhfErrors, BadInputNamesTheArgument) {
  std::vector<double> a(4), b3(3), o(4), m(6), two(2);
  std::vector<int64_t> idx(2);
  auto throws = [](auto fn, const std::string& what) {
    try {
      fn();
      ADD_FAILURE() << "no error, expected: " << what;
    } catch (const divkit::Error& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
  };
  throws([&] { divkit::parse_kl_estimator("k4"); }, "kl_estimator: unknown kind 'k4'");
  throws([&] { divkit::parse_ensemble_method("max"); }, "ensemble_rewards: unknown method 'max'");
  throws([&] { divkit::kl_estimator(v1(a), v1(b3), divkit::KlEstimator::k1, false, v1(o)); },
         "ref_logprobs must have shape [4]");
  throws([&] { divkit::d2o_loss(m2(m, 2, 3), m2(m, 2, 3), v1(b3), v1(b3), 0.1, 0.1, v1(o)); },
         "d2o_loss: policy_rejected_logps must have shape [2]");
  throws([&] { divkit::d2o_loss(m2(m, 2, 3), m2(m, 2, 3), v1(two), v1(two), 0.0, 0.1, v1(two)); },
         "d2o_loss: beta must be");
  throws([&] { divkit::hypo_online_kl(m2(m, 6, 1), m2(m, 6, 1), v1(o)); }, "k >= 2");
  throws([&] { divkit::calibrate_reward(m2(m, 3, 2), m2(a, 2, 2), m2(m, 3, 2)); },
         "batch sizes disagree");
  std::vector<double> nan{0.0, NAN};
  throws([&] { divkit::best_of_n(m2(nan, 1, 2), TensorView::vector(idx.data(), DType::i64, 1)); },
         "rewards has a NaN");
  throws(
      [&] {
        divkit::superhf_loss(m2(m, 2, 3), m2(m, 2, 3), m2(m, 2, 3), {}, 0.1, 4, v1(o),
                             TensorView::matrix(idx.data(), DType::i64, 2, 1));
      },
      "top_k must be in [1, 3]");
  throws([&] { divkit::infalign_transform(v1(a), NAN, v1(o)); }, "t must be finite");
}

}  // namespace
}  // namespace divkit_test
