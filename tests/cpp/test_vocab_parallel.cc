// Vocabulary-parallel building blocks (vocab_parallel.h): the vocabulary split into uneven
// shards, the three phases run per shard and combined here exactly as divkit.distributed
// combines them across ranks; values and gradients must equal the unsharded divergence().
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "divkit/divergence.h"
#include "divkit/vocab_parallel.h"
#include "test_util.h"

namespace {

using divkit::DType;
using divkit::TensorView;

struct Shard {
  int64_t lo, hi;
  std::vector<float> s, t;  // [n, hi - lo]
};

double log_sum_exp_combine(const std::vector<double>& m, const std::vector<double>& ls,
                           double inv_t, double& gmax) {
  gmax = -INFINITY;
  for (double x : m) gmax = std::max(gmax, x);
  double sum = 0.0;
  for (size_t r = 0; r < m.size(); ++r)
    if (std::isfinite(m[r])) sum += std::exp((m[r] - gmax) * inv_t + ls[r]);
  return std::log(sum);
}

class VocabParallel : public ::testing::TestWithParam<divkit_test::Variant> {};

TEST_P(VocabParallel, ShardsCombineToTheUnshardedDivergence) {
  const divkit::DivergenceSpec spec = [] {
    divkit::DivergenceSpec s = GetParam().spec;
    s.temperature = 1.3f;
    return s;
  }();
  const int64_t n = 9, v = 50;
  const std::vector<int64_t> bounds = {0, 17, 18, 50};  // uneven; a 1-column shard
  std::mt19937 rng(3);
  std::normal_distribution<float> g(0.0f, 2.0f);
  std::vector<float> s(n * v), t(n * v);
  for (auto& x : s) x = g(rng);
  for (auto& x : t) x = g(rng);
  t[2 * v + 20] = -INFINITY;  // a masked teacher entry

  // Unsharded: per-row values and gradients of sum_i w_i D_i.
  std::vector<double> w(n), loss(n);
  for (int64_t i = 0; i < n; ++i) w[i] = 0.5 + 0.1 * i;
  std::vector<float> gs_ref(n * v), gt_ref(n * v);
  divkit::DivergenceOptions o;
  o.reduction = divkit::Reduction::none;
  o.weights = TensorView::vector(w.data(), DType::f64, n);
  divkit::DivergenceOutputs out;
  out.loss = TensorView::vector(loss.data(), DType::f64, n);
  out.grad_student = TensorView::matrix(gs_ref.data(), DType::f32, n, v);
  out.grad_teacher = TensorView::matrix(gt_ref.data(), DType::f32, n, v);
  divkit::divergence(TensorView::matrix(s.data(), DType::f32, n, v),
                     TensorView::matrix(t.data(), DType::f32, n, v), spec, o, out);

  const size_t world = bounds.size() - 1;
  std::vector<Shard> shards(world);
  for (size_t r = 0; r < world; ++r) {
    Shard& sh = shards[r];
    sh.lo = bounds[r], sh.hi = bounds[r + 1];
    const int64_t vr = sh.hi - sh.lo;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = sh.lo; j < sh.hi; ++j) {
        sh.s.push_back(s[i * v + j]);
        sh.t.push_back(t[i * v + j]);
      }
    (void)vr;
  }
  auto view = [&](std::vector<float>& x, const Shard& sh) {
    return TensorView::matrix(x.data(), DType::f32, n, sh.hi - sh.lo);
  };
  // Phase 1 and the combination of the normalizers.
  std::vector<std::vector<double>> stats(world, std::vector<double>(4 * n));
  for (size_t r = 0; r < world; ++r)
    divkit::divergence_shard_stats(view(shards[r].s, shards[r]), view(shards[r].t, shards[r]), spec,
                                   {}, -100, TensorView::matrix(stats[r].data(), DType::f64, n, 4));
  const double inv_t = 1.0 / spec.temperature;
  std::vector<double> norm(4 * n);
  for (int64_t i = 0; i < n; ++i)
    for (int c : {0, 2}) {
      std::vector<double> m(world), ls(world);
      for (size_t r = 0; r < world; ++r)
        m[r] = stats[r][4 * i + c], ls[r] = stats[r][4 * i + c + 1];
      double gmax;
      norm[4 * i + c + 1] = log_sum_exp_combine(m, ls, inv_t, gmax);
      norm[4 * i + c] = gmax;
    }
  // Phase 2 and the combination of the sums.
  const TensorView nv = TensorView::matrix(norm.data(), DType::f64, n, 4);
  std::vector<std::vector<double>> part(world, std::vector<double>(4 * n));
  for (size_t r = 0; r < world; ++r)
    divkit::divergence_shard_sums(view(shards[r].s, shards[r]), view(shards[r].t, shards[r]), spec,
                                  {}, -100, nv,
                                  TensorView::matrix(part[r].data(), DType::f64, n, 4));
  const bool renyi = spec.kind == divkit::DivergenceKind::renyi && spec.alpha != 1.0f;
  std::vector<double> sums(4 * n, 0.0), value(n);
  for (int64_t i = 0; i < n; ++i) {
    if (renyi) {
      double s1 = 0.0;
      std::vector<double> am(world), lsw(world);
      for (size_t r = 0; r < world; ++r)
        s1 += part[r][4 * i], am[r] = part[r][4 * i + 1], lsw[r] = std::log(part[r][4 * i + 2]);
      double amax;
      const double log_rel = log_sum_exp_combine(am, lsw, 1.0, amax);
      const bool near = std::fabs(s1) < 0.5;
      const double big_l = near ? std::log1p(s1) : amax + log_rel;
      value[i] = big_l / (double(spec.alpha) - 1.0);
      sums[4 * i] = big_l, sums[4 * i + 1] = amax, sums[4 * i + 2] = log_rel,
               sums[4 * i + 3] = near;
    } else {
      for (size_t r = 0; r < world; ++r)
        for (int c = 0; c < 3; ++c) sums[4 * i + c] += part[r][4 * i + c];
      value[i] = sums[4 * i];
    }
    const double t2 = spec.scale_by_t_squared ? double(spec.temperature) * spec.temperature : 1.0;
    if (std::isinf(loss[i])) {  // e.g. reverse KL against the masked teacher entry
      EXPECT_TRUE(std::isinf(value[i]) || !std::isfinite(sums[4 * i + 1])) << "row " << i;
      continue;
    }
    EXPECT_NEAR(value[i] * w[i] * t2, loss[i], 2e-5 * (1.0 + std::fabs(loss[i]))) << "row " << i;
  }
  // An infinite row gets no gradient (as divergence() does): its grad_scale is 0.
  std::vector<double> scale(w);
  for (int64_t i = 0; i < n; ++i)
    if (std::isinf(loss[i])) scale[i] = 0.0;
  // Phase 3: the shards' gradients.
  const TensorView sv = TensorView::matrix(sums.data(), DType::f64, n, 4);
  for (size_t r = 0; r < world; ++r) {
    Shard& sh = shards[r];
    const int64_t vr = sh.hi - sh.lo;
    std::vector<float> gs(n * vr), gt(n * vr);
    divkit::divergence_shard_grad(view(sh.s, sh), view(sh.t, sh), spec, {}, -100, nv, sv,
                                  TensorView::vector(scale.data(), DType::f64, n),
                                  TensorView::matrix(gs.data(), DType::f32, n, vr),
                                  TensorView::matrix(gt.data(), DType::f32, n, vr));
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < vr; ++j) {
        const float ws = gs_ref[i * v + sh.lo + j], wt = gt_ref[i * v + sh.lo + j];
        ASSERT_NEAR(gs[i * vr + j], ws, 2e-6 + 2e-5 * std::fabs(ws))
            << "student " << i << "," << sh.lo + j;
        ASSERT_NEAR(gt[i * vr + j], wt, 2e-6 + 2e-5 * std::fabs(wt))
            << "teacher " << i << "," << sh.lo + j;
      }
  }
}

INSTANTIATE_TEST_SUITE_P(Kinds, VocabParallel, ::testing::ValuesIn(divkit_test::all_variants()),
                         [](const auto& info) { return info.param.name; });

TEST(VocabParallelErrors, NameTheArgument) {
  std::vector<float> s(12, 0.0f), t(12, 0.0f);
  std::vector<double> small(4);
  const auto spec = divkit_test::make_spec(divkit::DivergenceKind::forward_kl);
  divkit_test::expect_error(
      [&] {
        divkit::divergence_shard_stats(TensorView::matrix(s.data(), DType::f32, 3, 4),
                                       TensorView::matrix(t.data(), DType::f32, 3, 4), spec, {},
                                       -100, TensorView::matrix(small.data(), DType::f64, 1, 4));
      },
      {"divergence_shard_stats", "stats", "[3, 4]"});
  s[5] = NAN;
  std::vector<double> st(12);
  divkit_test::expect_error(
      [&] {
        divkit::divergence_shard_stats(TensorView::matrix(s.data(), DType::f32, 3, 4),
                                       TensorView::matrix(t.data(), DType::f32, 3, 4), spec, {},
                                       -100, TensorView::matrix(st.data(), DType::f64, 3, 4));
      },
      {"student_logits", "NaN", "row 1"});
}

}  // namespace
