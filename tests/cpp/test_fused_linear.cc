// Fused linear-head losses against the materialized computation in fp64: logits = h W^T + b in
// double, then the fp64 divergence reference (reference.h) or a plain fp64 cross-entropy, then
// the head's gradients by the chain rule (G W, G^T h, column sums of G).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "divkit/fused_linear.h"
#include "divkit/runtime.h"
#include "fused_linear/label_kernels.h"
#include "reference.h"
#include "test_util.h"

namespace {

using divkit::DivergenceKind;
using divkit::DType;
using divkit::Reduction;
using divkit::TensorView;

struct Head {
  int64_t n, v, h;
  std::vector<double> hidden, weight, bias;  // bias empty: none
  std::vector<float> hidden32, weight32, bias32;

  Head(int64_t n_, int64_t v_, int64_t h_, bool with_bias, uint32_t seed, double scale = 1.0)
      : n(n_), v(v_), h(h_) {
    std::mt19937 rng(seed);
    std::normal_distribution<double> g(0.0, 1.0);
    // fp32-representable values, so that fp32 and fp64 see the same inputs.
    auto fill = [&](std::vector<double>& d, std::vector<float>& f, int64_t count, double sd) {
      d.resize(count);
      f.resize(count);
      for (int64_t i = 0; i < count; ++i) d[i] = f[i] = static_cast<float>(sd * g(rng));
    };
    fill(hidden, hidden32, n * h, 1.0);
    fill(weight, weight32, v * h, scale / std::sqrt(double(h)));
    if (with_bias) fill(bias, bias32, v, 0.5);
  }
  divkit::LinearHead view() {
    divkit::LinearHead lh;
    lh.hidden = TensorView::matrix(hidden32.data(), DType::f32, n, h);
    lh.weight = TensorView::matrix(weight32.data(), DType::f32, v, h);
    if (!bias32.empty()) lh.bias = TensorView::vector(bias32.data(), DType::f32, v);
    return lh;
  }
  std::vector<double> logits(const std::vector<int64_t>* ids = nullptr) const {
    const int64_t vv = ids ? static_cast<int64_t>(ids->size()) : v;
    std::vector<double> z(n * vv);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < vv; ++j) {
        const int64_t row = ids ? (*ids)[j] : j;
        double s = bias.empty() ? 0.0 : bias[row];
        for (int64_t k = 0; k < h; ++k) s += hidden[i * h + k] * weight[row * h + k];
        z[i * vv + j] = s;
      }
    return z;
  }
  // Head gradients from G = dL/dlogits [n, vv] (rows mapped through ids).
  void grads(const std::vector<double>& gz, const std::vector<int64_t>* ids,
             std::vector<double>& dh, std::vector<double>& dw, std::vector<double>& db) const {
    const int64_t vv = ids ? static_cast<int64_t>(ids->size()) : v;
    dh.assign(n * h, 0.0);
    dw.assign(v * h, 0.0);
    db.assign(v, 0.0);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < vv; ++j) {
        const double gij = gz[i * vv + j];
        if (gij == 0.0) continue;
        const int64_t row = ids ? (*ids)[j] : j;
        for (int64_t k = 0; k < h; ++k) {
          dh[i * h + k] += gij * weight[row * h + k];
          dw[row * h + k] += gij * hidden[i * h + k];
        }
        db[row] += gij;
      }
  }
};

void expect_close(const std::vector<float>& got, const std::vector<double>& want, double tol,
                  const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  double scale = 0.0;
  for (double w : want) scale = std::max(scale, std::fabs(w));
  for (size_t i = 0; i < got.size(); ++i)
    ASSERT_NEAR(got[i], want[i], tol * (scale + 1e-3)) << what << " at " << i;
}

struct Case {
  DivergenceKind kind;
  double param;
  double temperature;
  Reduction reduction;
  int64_t chunk;
  bool bias;
  int64_t hs, ht;
  double hard_weight;
  bool teacher_grads;
};

class FusedLinearDivergence : public ::testing::TestWithParam<Case> {};

TEST_P(FusedLinearDivergence, MatchesMaterializedFp64) {
  const Case c = GetParam();
  const int64_t n = 37, v = 53;
  Head s(n, v, c.hs, c.bias, 1), t(n, v, c.ht, c.bias, 2, 2.0);
  std::vector<int64_t> labels(n);
  for (int64_t i = 0; i < n; ++i) labels[i] = i % 5 == 3 ? -100 : (i * 7) % v;
  const divkit::DivergenceSpec spec = divkit_test::make_spec(c.kind, c.param, c.temperature);

  // fp64 materialized reference.
  divkit_ref::Options ro;
  ro.labels = labels;
  ro.reduction = c.reduction;
  const std::vector<double> zs = s.logits(), zt = t.logits();
  const double soft_w = 0.7;
  divkit_ref::Result ref =
      divkit_ref::divergence(zs, zt, n, v, divkit_ref::params_from_spec(spec), ro);
  int64_t count = 0;
  for (int64_t y : labels) count += y != -100;
  const double divisor = c.reduction == Reduction::mean        ? double(count)
                         : c.reduction == Reduction::batchmean ? double(n)
                                                               : 1.0;
  std::vector<double> loss_ref(ref.loss.size());
  for (size_t i = 0; i < loss_ref.size(); ++i) loss_ref[i] = soft_w * ref.loss[i];
  std::vector<double> gs(n * v), gt(n * v);
  for (int64_t k = 0; k < n * v; ++k) {
    gs[k] = soft_w * ref.grad_s[k];
    gt[k] = soft_w * ref.grad_t[k];
  }
  if (c.hard_weight != 0.0) {
    for (int64_t i = 0; i < n; ++i) {
      if (labels[i] == -100) continue;
      double m = -INFINITY;
      for (int64_t j = 0; j < v; ++j) m = std::max(m, zs[i * v + j]);
      double se = 0.0;
      for (int64_t j = 0; j < v; ++j) se += std::exp(zs[i * v + j] - m);
      const double lse = m + std::log(se);
      const double ce = c.hard_weight * (lse - zs[i * v + labels[i]]) / divisor;
      if (c.reduction == Reduction::none) loss_ref[i] += ce;
      else loss_ref[0] += ce;
      for (int64_t j = 0; j < v; ++j)
        gs[i * v + j] +=
            c.hard_weight / divisor * (std::exp(zs[i * v + j] - lse) - (j == labels[i]));
    }
  }
  std::vector<double> dhs, dws, dbs, dht, dwt, dbt;
  s.grads(gs, nullptr, dhs, dws, dbs);
  t.grads(gt, nullptr, dht, dwt, dbt);

  // Fused.
  std::vector<float> loss(c.reduction == Reduction::none ? n : 1);
  std::vector<float> g_hs(n * c.hs), g_ws(v * c.hs), g_bs(v), g_ht(n * c.ht), g_wt(v * c.ht),
      g_bt(v);
  divkit::LinearHeadGrads sg, tg;
  sg.hidden = TensorView::matrix(g_hs.data(), DType::f32, n, c.hs);
  sg.weight = TensorView::matrix(g_ws.data(), DType::f32, v, c.hs);
  if (c.bias) sg.bias = TensorView::vector(g_bs.data(), DType::f32, v);
  if (c.teacher_grads) {
    tg.hidden = TensorView::matrix(g_ht.data(), DType::f32, n, c.ht);
    tg.weight = TensorView::matrix(g_wt.data(), DType::f32, v, c.ht);
    if (c.bias) tg.bias = TensorView::vector(g_bt.data(), DType::f32, v);
  }
  divkit::DivergenceOptions o;
  o.labels = TensorView::vector(labels.data(), DType::i64, n);
  o.reduction = c.reduction;
  divkit::FusedLinearOptions f;
  f.chunk_size = c.chunk;
  f.soft_weight = static_cast<float>(soft_w);
  f.hard_weight = static_cast<float>(c.hard_weight);
  divkit::fused_linear_divergence(s.view(), t.view(), spec, o, f,
                                  TensorView::vector(loss.data(), DType::f32, loss.size()), sg, tg);

  const double tol = 2e-5;
  expect_close(loss, loss_ref, tol, "loss");
  expect_close(g_hs, dhs, tol, "grad_student_hidden");
  expect_close(g_ws, dws, tol, "grad_student_weight");
  if (c.bias) expect_close(g_bs, dbs, tol, "grad_student_bias");
  if (c.teacher_grads) {
    expect_close(g_ht, dht, tol, "grad_teacher_hidden");
    expect_close(g_wt, dwt, tol, "grad_teacher_weight");
    if (c.bias) expect_close(g_bt, dbt, tol, "grad_teacher_bias");
  }
}

using K = DivergenceKind;
const double kNaN = std::nan("");
INSTANTIATE_TEST_SUITE_P(
    Kinds, FusedLinearDivergence,
    ::testing::Values(
        Case{K::forward_kl, kNaN, 1.0, Reduction::mean, 8, true, 24, 24, 0.0, false},
        Case{K::forward_kl, kNaN, 2.0, Reduction::sum, 37, false, 24, 40, 0.5, false},
        Case{K::reverse_kl, kNaN, 1.0, Reduction::batchmean, 5, true, 16, 33, 0.0, true},
        Case{K::jsd, 0.3, 1.5, Reduction::mean, 10, true, 24, 24, 0.25, true},
        Case{K::skew_forward_kl, 0.1, 1.0, Reduction::none, 16, false, 24, 24, 0.0, false},
        Case{K::skew_reverse_kl, 0.2, 1.0, Reduction::mean, 3, true, 8, 24, 0.0, true},
        Case{K::tvd, kNaN, 1.0, Reduction::none, 7, true, 24, 24, 1.0, false},
        Case{K::hellinger, kNaN, 1.0, Reduction::mean, 64, false, 24, 24, 0.0, true},
        Case{K::jeffreys, kNaN, 1.0, Reduction::sum, 11, true, 24, 24, 0.0, false},
        Case{K::chi2, kNaN, 1.0, Reduction::mean, 9, true, 24, 24, 0.0, true},
        Case{K::alpha_divergence, 0.5, 1.0, Reduction::mean, 12, true, 24, 24, 0.0, false},
        Case{K::renyi, 2.0, 1.0, Reduction::mean, 6, false, 24, 24, 0.0, true},
        Case{K::cross_entropy, kNaN, 1.0, Reduction::mean, 0, true, 24, 24, 0.0, false}));

// FusedLabelTerms (the token-level preference losses): both heads' label log-probs beside the
// per-token forward KL in one pass, then the gradient of sum_i u_i log q(y_i) + w_i KL_i through
// per-token hard weights (-u) and token weights (w), with logits kept by the first call.
TEST(FusedLinearDivergence, LabelTermsPerTokenWeightsAndKeptLogits) {
  const int64_t n = 37, v = 53, hs = 24, ht = 16, chunk = 5, kept = 15;
  Head s(n, v, hs, true, 11), t(n, v, ht, true, 12, 2.0);
  std::vector<int64_t> labels(n);
  std::vector<double> u(n), w(n), minus_u(n);
  for (int64_t i = 0; i < n; ++i) {
    labels[i] = i % 6 == 2 ? -100 : (i * 11) % v;
    u[i] = std::sin(0.7 * i + 0.3);
    w[i] = std::cos(1.3 * i);
    minus_u[i] = -u[i];
  }
  // fp64: log-softmax rows, label log-probs, KL(p_t || q_s), and the gradient u (1[y] - q) +
  // w (q - p).
  const std::vector<double> zs = s.logits(), zt = t.logits();
  std::vector<double> lp_s(n, 0.0), lp_t(n, 0.0), kl(n, 0.0), gz(n * v, 0.0);
  for (int64_t i = 0; i < n; ++i) {
    if (labels[i] < 0) continue;
    auto lse_of = [&](const std::vector<double>& z) {
      double m = -INFINITY, se = 0.0;
      for (int64_t j = 0; j < v; ++j) m = std::max(m, z[i * v + j]);
      for (int64_t j = 0; j < v; ++j) se += std::exp(z[i * v + j] - m);
      return m + std::log(se);
    };
    const double ls = lse_of(zs), lt = lse_of(zt);
    lp_s[i] = zs[i * v + labels[i]] - ls;
    lp_t[i] = zt[i * v + labels[i]] - lt;
    for (int64_t j = 0; j < v; ++j) {
      const double lq = zs[i * v + j] - ls, lpt = zt[i * v + j] - lt;
      const double q = std::exp(lq), p = std::exp(lpt);
      kl[i] += p * (lpt - lq);
      gz[i * v + j] = u[i] * ((j == labels[i]) - q) + w[i] * (q - p);
    }
  }
  std::vector<double> dh, dw, db;
  s.grads(gz, nullptr, dh, dw, db);

  const divkit::DivergenceSpec spec = divkit_test::make_spec(K::forward_kl, std::nan(""), 1.0);
  std::vector<float> keep_s(kept * v), keep_t(kept * v);
  std::vector<float> loss(n), lps(n), lpt(n);
  divkit::DivergenceOptions o;
  o.labels = TensorView::vector(labels.data(), DType::i64, n);
  o.reduction = Reduction::none;
  divkit::FusedLinearOptions f;
  f.chunk_size = chunk;
  f.terms.student_logprobs = TensorView::vector(lps.data(), DType::f32, n);
  f.terms.teacher_logprobs = TensorView::vector(lpt.data(), DType::f32, n);
  f.terms.kept_student = TensorView::matrix(keep_s.data(), DType::f32, kept, v);
  f.terms.kept_teacher = TensorView::matrix(keep_t.data(), DType::f32, kept, v);
  divkit::fused_linear_divergence(s.view(), t.view(), spec, o, f,
                                  TensorView::vector(loss.data(), DType::f32, n));
  expect_close(loss, kl, 1e-5, "kl");
  expect_close(lps, lp_s, 1e-5, "student_logprobs");
  expect_close(lpt, lp_t, 1e-5, "teacher_logprobs");

  // The backward: reduction sum with weights w (soft) and hard weights -u; kept or recomputed.
  std::vector<std::vector<float>> results;
  for (bool use_kept : {true, false}) {
    std::vector<float> one(1), g_h(n * hs), g_w(v * hs), g_b(v);
    divkit::LinearHeadGrads sg;
    sg.hidden = TensorView::matrix(g_h.data(), DType::f32, n, hs);
    sg.weight = TensorView::matrix(g_w.data(), DType::f32, v, hs);
    sg.bias = TensorView::vector(g_b.data(), DType::f32, v);
    divkit::DivergenceOptions ob = o;
    ob.reduction = Reduction::sum;
    ob.weights = TensorView::vector(w.data(), DType::f64, n);
    divkit::FusedLinearOptions fb;
    fb.chunk_size = chunk;
    fb.terms.hard_weights = TensorView::vector(minus_u.data(), DType::f64, n);
    if (use_kept) {
      fb.terms.kept_student = f.terms.kept_student;
      fb.terms.kept_teacher = f.terms.kept_teacher;
      fb.terms.kept_filled = true;
    }
    divkit::fused_linear_divergence(s.view(), t.view(), spec, ob, fb,
                                    TensorView::vector(one.data(), DType::f32, 1), sg);
    expect_close(g_h, dh, 2e-5, "grad_hidden");
    expect_close(g_w, dw, 2e-5, "grad_weight");
    expect_close(g_b, db, 2e-5, "grad_bias");
    g_h.insert(g_h.end(), g_w.begin(), g_w.end());
    g_h.insert(g_h.end(), g_b.begin(), g_b.end());
    results.push_back(g_h);
  }
  EXPECT_EQ(results[0], results[1]) << "kept logits must give the recomputed bits";

  // Label log-probs beside the soft term's gradient, without a hard term: the log-probs are those
  // of the logits, not of the gradient written over them.
  // gz = u (1[y] - q) + w (q - p): the soft part is gz - u (1[y] - q).
  std::vector<double> gsoft(n * v, 0.0);
  for (int64_t i = 0; i < n; ++i) {
    if (labels[i] < 0) continue;
    double ls = -INFINITY, se = 0.0;
    for (int64_t j = 0; j < v; ++j) ls = std::max(ls, zs[i * v + j]);
    for (int64_t j = 0; j < v; ++j) se += std::exp(zs[i * v + j] - ls);
    ls += std::log(se);
    for (int64_t j = 0; j < v; ++j) {
      const double q = std::exp(zs[i * v + j] - ls);
      gsoft[i * v + j] = gz[i * v + j] - u[i] * ((j == labels[i]) - q);
    }
  }
  std::vector<double> sdh, sdw, sdb;
  s.grads(gsoft, nullptr, sdh, sdw, sdb);
  std::vector<float> one(1), lps2(n), g_h(n * hs), g_w(v * hs), g_b(v);
  divkit::LinearHeadGrads sg{TensorView::matrix(g_h.data(), DType::f32, n, hs),
                             TensorView::matrix(g_w.data(), DType::f32, v, hs),
                             TensorView::vector(g_b.data(), DType::f32, v)};
  divkit::DivergenceOptions ob = o;
  ob.reduction = Reduction::sum;
  ob.weights = TensorView::vector(w.data(), DType::f64, n);
  divkit::FusedLinearOptions fs;
  fs.chunk_size = chunk;
  fs.terms.student_logprobs = TensorView::vector(lps2.data(), DType::f32, n);
  divkit::fused_linear_divergence(s.view(), t.view(), spec, ob, fs,
                                  TensorView::vector(one.data(), DType::f32, 1), sg);
  EXPECT_EQ(lps2, lps) << "student_logprobs with the soft gradient";
  expect_close(g_h, sdh, 2e-5, "soft grad_hidden");
  expect_close(g_w, sdw, 2e-5, "soft grad_weight");
  expect_close(g_b, sdb, 2e-5, "soft grad_bias");
}

TEST(FusedLinearDivergence, TeacherTokenIdsMapAndTruncate) {
  const int64_t n = 19, vs = 31, vt = 45, h = 16;
  Head s(n, vs, h, true, 3), t(n, vt, h, true, 4);
  std::vector<int64_t> ids(vs);
  for (int64_t j = 0; j < vs; ++j) ids[j] = (j * 7 + 3) % vt;  // a permutation-like mapping
  for (bool truncate : {false, true}) {
    if (truncate) std::iota(ids.begin(), ids.end(), 0);
    const std::vector<double> zs = s.logits(), zt = t.logits(&ids);
    divkit_ref::Options ro;
    const auto spec = divkit_test::make_spec(K::forward_kl);
    const auto ref = divkit_ref::divergence(zs, zt, n, vs, divkit_ref::params_from_spec(spec), ro);
    std::vector<double> dh, dw, db;
    t.grads(ref.grad_t, &ids, dh, dw, db);
    float loss = 0.0f;
    std::vector<float> g_wt(vt * h), g_bt(vt);
    divkit::LinearHeadGrads tg;
    tg.weight = TensorView::matrix(g_wt.data(), DType::f32, vt, h);
    tg.bias = TensorView::vector(g_bt.data(), DType::f32, vt);
    divkit::FusedLinearOptions f;
    f.teacher_token_ids = TensorView::vector(ids.data(), DType::i64, vs);
    f.chunk_size = 4;
    divkit::fused_linear_divergence(s.view(), t.view(), spec, {}, f,
                                    TensorView::vector(&loss, DType::f32, 1), {}, tg);
    EXPECT_NEAR(loss, ref.loss[0], 1e-5 * (1 + ref.loss[0]));
    expect_close(g_wt, dw, 2e-5, "grad_teacher_weight (scattered)");
    expect_close(g_bt, db, 2e-5, "grad_teacher_bias (scattered)");
  }
}

TEST(FusedLinearDivergence, Bf16InputsAreConvertedNotRounded) {
  // bf16 hidden and weight: the result must equal the fp32 computation on the same (widened)
  // values, i.e. the logits are not rounded to bf16.
  const int64_t n = 21, v = 40, h = 32;
  Head s(n, v, h, false, 5), t(n, v, h, false, 6);
  auto to_bf16 = [](std::vector<float>& f) {
    std::vector<uint16_t> b(f.size());
    for (size_t i = 0; i < f.size(); ++i) {
      uint32_t bits;
      std::memcpy(&bits, &f[i], 4);
      b[i] = static_cast<uint16_t>(bits >> 16);  // truncate: exact in both representations
      bits = static_cast<uint32_t>(b[i]) << 16;
      std::memcpy(&f[i], &bits, 4);
    }
    return b;
  };
  std::vector<uint16_t> hs = to_bf16(s.hidden32), ws = to_bf16(s.weight32),
                        ht = to_bf16(t.hidden32), wt = to_bf16(t.weight32);
  const auto spec = divkit_test::make_spec(K::jsd, 0.5);
  float want = 0.0f, got = 0.0f;
  std::vector<float> dh_want(n * h), dh_got(n * h);
  divkit::LinearHeadGrads g1, g2;
  g1.hidden = TensorView::matrix(dh_want.data(), DType::f32, n, h);
  g2.hidden = TensorView::matrix(dh_got.data(), DType::f32, n, h);
  divkit::fused_linear_divergence(s.view(), t.view(), spec, {}, {},
                                  TensorView::vector(&want, DType::f32, 1), g1);
  divkit::LinearHead sb, tb;
  sb.hidden = TensorView::matrix(hs.data(), DType::bf16, n, h);
  sb.weight = TensorView::matrix(ws.data(), DType::bf16, v, h);
  tb.hidden = TensorView::matrix(ht.data(), DType::bf16, n, h);
  tb.weight = TensorView::matrix(wt.data(), DType::bf16, v, h);
  divkit::fused_linear_divergence(sb, tb, spec, {}, {}, TensorView::vector(&got, DType::f32, 1),
                                  g2);
  EXPECT_EQ(got, want);
  EXPECT_EQ(dh_got, dh_want);
}

// The GEMMs are cut into pieces of fixed shape (8 MiB of weight rows: 8192 rows at H = 256)
// shared out over the threads, and grad_hidden adds the vocabulary in groups of 8 pieces in
// order. V = 140000 makes 18 pieces, 3 groups: threads take alternate groups. Every output must
// be bitwise the same at 1, 2 and 3 threads, and the same for a bf16 weight (converted piece by
// piece) as for the fp32 weight holding its widened values (used in place).
TEST(FusedLinearDivergence, ThreadCountAndWeightDtypeDoNotChangeTheBits) {
  const int64_t n = 3, v = 140000, h = 256;
  std::mt19937 rng(21);
  std::uniform_real_distribution<float> u(-0.1f,
                                          0.1f);  // cheaper than Head's normals at 36M values
  std::vector<float> hs(n * h), ht(n * h), ws(v * h), wt(v * h);
  for (std::vector<float>* x : {&hs, &ht, &ws, &wt})
    for (float& e : *x) e = u(rng) * (x == &hs || x == &ht ? 10.0f : 1.0f);
  std::vector<uint16_t> ws16(v * h);
  for (int64_t i = 0; i < v * h; ++i) {
    ws16[i] = divkit_test::float_to_bf16(ws[i]);
    ws[i] = divkit_test::bf16_to_float(ws16[i]);
  }
  const auto spec = divkit_test::make_spec(K::jsd, 0.5);
  struct Result {
    float loss = 0.0f;
    std::vector<float> hs, ws, ht;
  };
  auto run = [&](int threads, bool bf16_weight) {
    divkit::set_num_threads(threads);
    Result r;
    r.hs.assign(n * h, 0.0f);
    r.ws.assign(v * h, 0.0f);
    r.ht.assign(n * h, 0.0f);
    divkit::LinearHead sv, tv;
    sv.hidden = TensorView::matrix(hs.data(), DType::f32, n, h);
    sv.weight = bf16_weight ? TensorView::matrix(ws16.data(), DType::bf16, v, h)
                            : TensorView::matrix(ws.data(), DType::f32, v, h);
    tv.hidden = TensorView::matrix(ht.data(), DType::f32, n, h);
    tv.weight = TensorView::matrix(wt.data(), DType::f32, v, h);
    divkit::LinearHeadGrads sg, tg;
    sg.hidden = TensorView::matrix(r.hs.data(), DType::f32, n, h);
    sg.weight = TensorView::matrix(r.ws.data(), DType::f32, v, h);
    tg.hidden = TensorView::matrix(r.ht.data(), DType::f32, n, h);
    divkit::fused_linear_divergence(sv, tv, spec, {}, {},
                                    TensorView::vector(&r.loss, DType::f32, 1), sg, tg);
    return r;
  };
  const int old_threads = divkit::get_num_threads();
  const Result base = run(1, true);
  double norm = 0.0;
  for (float x : base.hs) norm += std::fabs(x);
  EXPECT_GT(norm, 0.0) << "grad_student_hidden is all zeros: nothing was compared";
  for (auto [threads, bf16_weight] :
       {std::pair{2, true}, std::pair{3, true}, std::pair{1, false}, std::pair{2, false}}) {
    const Result r = run(threads, bf16_weight);
    const std::string at =
        std::to_string(threads) + " thread(s), " + (bf16_weight ? "bf16" : "fp32") + " weight";
    EXPECT_EQ(r.loss, base.loss) << at;
    EXPECT_TRUE(r.hs == base.hs) << at << ": grad_student_hidden";
    EXPECT_TRUE(r.ws == base.ws) << at << ": grad_student_weight";
    EXPECT_TRUE(r.ht == base.ht) << at << ": grad_teacher_hidden";
  }
  divkit::set_num_threads(old_threads);
}

// 16-bit weights are converted block by block of vocabulary rows (about 8 MiB of fp32 each: 512
// rows at H = 4096), never as one fp32 copy. With V spanning three blocks, a mapped teacher
// (gathered rows) and teacher gradients, everything must still match fp64 on the widened values.
TEST(FusedLinearDivergence, SixteenBitWeightsAcrossConversionBlocks) {
  const int64_t n = 7, vs = 1300, vt = 1400, h = 4096;
  for (DType dt : {DType::bf16, DType::f16}) {
    Head s(n, vs, h, true, 11), t(n, vt, h, false, 12, 2.0);
    auto narrow = [dt](std::vector<double>& d, std::vector<float>& f) {  // round, then widen back
      std::vector<uint16_t> b(f.size());
      for (size_t i = 0; i < f.size(); ++i) {
        using namespace divkit_test;
        b[i] = dt == DType::bf16 ? float_to_bf16(f[i]) : double_to_f16(f[i]);
        d[i] = f[i] =
            dt == DType::bf16 ? bf16_to_float(b[i]) : static_cast<float>(f16_to_double(b[i]));
      }
      return b;
    };
    std::vector<uint16_t> hs = narrow(s.hidden, s.hidden32), ws = narrow(s.weight, s.weight32),
                          ht = narrow(t.hidden, t.hidden32), wt = narrow(t.weight, t.weight32);
    std::vector<int64_t> ids(vs);
    for (int64_t j = 0; j < vs; ++j) ids[j] = (j * 11 + 5) % vt;
    const auto spec = divkit_test::make_spec(K::jsd, 0.3);
    const auto ref =
        divkit_ref::divergence(s.logits(), t.logits(&ids), n, vs,
                               divkit_ref::params_from_spec(spec), divkit_ref::Options{});
    std::vector<double> dhs, dws, dbs, dht, dwt, dbt;
    s.grads(ref.grad_s, nullptr, dhs, dws, dbs);
    t.grads(ref.grad_t, &ids, dht, dwt, dbt);

    divkit::LinearHead sv, tv;
    sv.hidden = TensorView::matrix(hs.data(), dt, n, h);
    sv.weight = TensorView::matrix(ws.data(), dt, vs, h);
    sv.bias = TensorView::vector(s.bias32.data(), DType::f32, vs);
    tv.hidden = TensorView::matrix(ht.data(), dt, n, h);
    tv.weight = TensorView::matrix(wt.data(), dt, vt, h);
    std::vector<float> g_hs(n * h), g_ws(vs * h), g_bs(vs), g_ht(n * h), g_wt(vt * h);
    divkit::LinearHeadGrads sg, tg;
    sg.hidden = TensorView::matrix(g_hs.data(), DType::f32, n, h);
    sg.weight = TensorView::matrix(g_ws.data(), DType::f32, vs, h);
    sg.bias = TensorView::vector(g_bs.data(), DType::f32, vs);
    tg.hidden = TensorView::matrix(g_ht.data(), DType::f32, n, h);
    tg.weight = TensorView::matrix(g_wt.data(), DType::f32, vt, h);
    divkit::FusedLinearOptions f;
    f.teacher_token_ids = TensorView::vector(ids.data(), DType::i64, vs);
    f.chunk_size = 3;
    float loss = 0.0f;
    divkit::fused_linear_divergence(sv, tv, spec, {}, f, TensorView::vector(&loss, DType::f32, 1),
                                    sg, tg);
    const std::string d = divkit::dtype_name(dt);
    EXPECT_NEAR(loss, ref.loss[0], 1e-5 * (1 + ref.loss[0])) << d;
    expect_close(g_hs, dhs, 2e-5, d + " grad_student_hidden");
    expect_close(g_ws, dws, 2e-5, d + " grad_student_weight");
    expect_close(g_bs, dbs, 2e-5, d + " grad_student_bias");
    expect_close(g_ht, dht, 2e-5, d + " grad_teacher_hidden");
    expect_close(g_wt, dwt, 2e-5, d + " grad_teacher_weight (scattered)");

    // A non-finite weight in the last block is found before anything is written.
    const uint16_t inf_bits = dt == DType::bf16 ? 0x7F80 : 0x7C00;
    ws[(vs - 2) * h + 17] = inf_bits;
    std::fill(g_hs.begin(), g_hs.end(), 7.0f);
    divkit_test::expect_error(
        [&] {
          divkit::fused_linear_divergence(sv, tv, spec, {}, f,
                                          TensorView::vector(&loss, DType::f32, 1), sg, tg);
        },
        {"student_weight", "NaN or inf", "row " + std::to_string(vs - 2)});
    EXPECT_EQ(g_hs[0], 7.0f) << d << ": an output was written before the error";
  }
}

// ---- cross-entropy and log-probs ------------------------------------------------------------

struct CeRef {
  std::vector<double> loss, logp, ent, lse, gz;
};

CeRef ce_reference(const std::vector<double>& x, int64_t n, int64_t v,
                   const std::vector<int64_t>& labels, double eps, double zl, double cap,
                   double temperature, Reduction red) {
  CeRef r;
  r.gz.assign(n * v, 0.0);
  int64_t count = 0;
  for (int64_t y : labels) count += y != -100;
  const double div = red == Reduction::mean        ? double(count)
                     : red == Reduction::batchmean ? double(n)
                                                   : 1.0;
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    std::vector<double> z(v), dzdx(v);
    for (int64_t j = 0; j < v; ++j) {
      const double xx = x[i * v + j];
      const double zc = cap > 0 ? cap * std::tanh(xx / cap) : xx;
      dzdx[j] = (cap > 0 ? 1.0 - std::pow(std::tanh(xx / cap), 2) : 1.0) / temperature;
      z[j] = zc / temperature;
    }
    if (labels[i] == -100) {
      r.loss.push_back(0.0), r.logp.push_back(0.0), r.ent.push_back(0.0), r.lse.push_back(0.0);
      continue;
    }
    const double m = *std::max_element(z.begin(), z.end());
    double se = 0.0, mean = 0.0;
    for (double zj : z) se += std::exp(zj - m), mean += zj / v;
    const double lse = m + std::log(se);
    double ent = 0.0;
    for (double zj : z) ent -= std::exp(zj - lse) * (zj - lse);
    const int64_t y = labels[i];
    const double l = (1 - eps) * (lse - z[y]) + eps * (lse - mean) + zl * lse * lse;
    r.loss.push_back(l);
    total += l;
    r.logp.push_back(z[y] - lse);
    r.ent.push_back(ent);
    r.lse.push_back(lse);
    for (int64_t j = 0; j < v; ++j) {
      const double p = std::exp(z[j] - lse);
      r.gz[i * v + j] = (p * (1 + 2 * zl * lse) - (1 - eps) * (j == y) - eps / v) / div * dzdx[j];
    }
  }
  if (red != Reduction::none) r.loss = {total / div};
  return r;
}

struct CeCase {
  double eps, zl, cap;
  Reduction red;
  int64_t chunk;
  bool bias;
};
class FusedLinearCrossEntropy : public ::testing::TestWithParam<CeCase> {};

TEST_P(FusedLinearCrossEntropy, MatchesMaterializedFp64) {
  const CeCase c = GetParam();
  const int64_t n = 29, v = 67, h = 20;
  Head hd(n, v, h, c.bias, 7, 3.0);
  std::vector<int64_t> labels(n);
  for (int64_t i = 0; i < n; ++i) labels[i] = i % 4 == 1 ? -100 : (i * 13) % v;
  const CeRef ref = ce_reference(hd.logits(), n, v, labels, c.eps, c.zl, c.cap, 1.0, c.red);
  std::vector<double> dh, dw, db;
  hd.grads(ref.gz, nullptr, dh, dw, db);
  divkit::CrossEntropySpec spec;
  spec.label_smoothing = static_cast<float>(c.eps);
  spec.z_loss_scale = static_cast<float>(c.zl);
  spec.softcap = static_cast<float>(c.cap);
  spec.reduction = c.red;
  spec.chunk_size = c.chunk;
  std::vector<float> loss(c.red == Reduction::none ? n : 1), g_h(n * h), g_w(v * h), g_b(v),
      logp(n), ent(n);
  divkit::LinearHeadGrads g;
  g.hidden = TensorView::matrix(g_h.data(), DType::f32, n, h);
  g.weight = TensorView::matrix(g_w.data(), DType::f32, v, h);
  if (c.bias) g.bias = TensorView::vector(g_b.data(), DType::f32, v);
  divkit::LabelStatsOutputs st;
  st.logprobs = TensorView::vector(logp.data(), DType::f32, n);
  st.entropy = TensorView::vector(ent.data(), DType::f32, n);
  divkit::fused_linear_cross_entropy(hd.view(), TensorView::vector(labels.data(), DType::i64, n),
                                     spec, TensorView::vector(loss.data(), DType::f32, loss.size()),
                                     g, st);
  expect_close(loss, ref.loss, 2e-5, "loss");
  expect_close(logp, ref.logp, 2e-5, "logprobs");
  expect_close(ent, ref.ent, 2e-5, "entropy");
  expect_close(g_h, dh, 2e-5, "grad_hidden");
  expect_close(g_w, dw, 2e-5, "grad_weight");
  if (c.bias) expect_close(g_b, db, 2e-5, "grad_bias");
}

INSTANTIATE_TEST_SUITE_P(Options, FusedLinearCrossEntropy,
                         ::testing::Values(CeCase{0.0, 0.0, 0.0, Reduction::mean, 8, true},
                                           CeCase{0.1, 0.0, 0.0, Reduction::sum, 5, false},
                                           CeCase{0.0, 1e-3, 0.0, Reduction::none, 29, true},
                                           CeCase{0.2, 1e-4, 4.0, Reduction::batchmean, 0, true},
                                           CeCase{0.0, 0.0, 2.5, Reduction::mean, 3, false}));

TEST(FusedLinearLogprobs, ForwardAndBackwardMatchFp64) {
  const int64_t n = 23, v = 41, h = 12;
  const double temperature = 0.7;
  Head hd(n, v, h, true, 9, 2.0);
  std::vector<int64_t> labels(n);
  for (int64_t i = 0; i < n; ++i) labels[i] = i % 6 == 2 ? -100 : (i * 5) % v;
  {  // Every fourth token's label is its argmax (the top-1 flag both ways).
    const std::vector<double> z = hd.logits();
    for (int64_t i = 0; i < n; i += 4)
      labels[i] =
          std::max_element(z.begin() + i * v, z.begin() + (i + 1) * v) - (z.begin() + i * v);
  }
  const CeRef ref = ce_reference(hd.logits(), n, v, labels, 0, 0, 0, temperature, Reduction::none);
  // Upstream gradients g (log-probs) and e (entropy): dL/dz = g (1[y] - p) - e p (log p + H).
  std::vector<double> g(n), e(n);
  for (int64_t i = 0; i < n; ++i) g[i] = 0.3 + 0.1 * i, e[i] = 0.05 * (i % 3) - 0.04;
  const std::vector<double> x = hd.logits();
  std::vector<double> gz(n * v, 0.0);
  for (int64_t i = 0; i < n; ++i) {
    if (labels[i] == -100) continue;
    for (int64_t j = 0; j < v; ++j) {
      const double lp = x[i * v + j] / temperature - ref.lse[i];
      const double p = std::exp(lp);
      gz[i * v + j] = (g[i] * ((j == labels[i]) - p) - e[i] * p * (lp + ref.ent[i])) / temperature;
    }
  }
  std::vector<double> dh, dw, db;
  hd.grads(gz, nullptr, dh, dw, db);

  std::vector<float> logp(n), ent(n), lse(n), topk(n);
  std::vector<double> sq(n);
  std::vector<int32_t> top1(n, 7);
  divkit::LabelStatsOutputs st;
  st.logprobs = TensorView::vector(logp.data(), DType::f32, n);
  st.entropy = TensorView::vector(ent.data(), DType::f32, n);
  st.lse = TensorView::vector(lse.data(), DType::f32, n);
  st.topk_mass = TensorView::vector(topk.data(), DType::f32, n);
  st.topk = 3;
  st.log_sum_sq_probs = TensorView::vector(sq.data(), DType::f64, n);
  st.is_top1 = TensorView::vector(top1.data(), DType::i32, n);
  divkit::LogprobsSpec spec;
  spec.temperature = static_cast<float>(temperature);
  spec.chunk_size = 6;
  const TensorView lab = TensorView::vector(labels.data(), DType::i64, n);
  divkit::fused_linear_logprobs(hd.view(), lab, spec, st);
  expect_close(logp, ref.logp, 2e-5, "logprobs");
  expect_close(ent, ref.ent, 2e-5, "entropy");
  expect_close(lse, ref.lse, 2e-5, "lse");
  for (int64_t i = 0; i < n; ++i) {
    if (labels[i] == -100) {
      EXPECT_EQ(topk[i], 0.0f);
      continue;
    }
    std::vector<double> p(v);
    for (int64_t j = 0; j < v; ++j) p[j] = std::exp(x[i * v + j] / temperature - ref.lse[i]);
    // log sum p^2 and the top-1 flag (random logits: no ties) against fp64.
    double sum_sq = 0.0;
    for (double pj : p) sum_sq += pj * pj;
    EXPECT_NEAR(sq[i], std::log(sum_sq), 2e-5 * std::max(1.0, std::abs(std::log(sum_sq))));
    const int64_t arg =
        std::max_element(x.begin() + i * v, x.begin() + (i + 1) * v) - (x.begin() + i * v);
    EXPECT_EQ(top1[i], arg == labels[i] ? 1 : 0) << i;
    std::sort(p.rbegin(), p.rend());
    EXPECT_NEAR(topk[i], p[0] + p[1] + p[2], 1e-5);
  }
  for (int64_t i = 0; i < n; ++i) {
    if (labels[i] != -100) continue;
    EXPECT_EQ(sq[i], 0.0);
    EXPECT_EQ(top1[i], 0);
  }
  int top1_count = 0;
  for (int32_t t : top1) top1_count += t;
  EXPECT_GT(top1_count, 0);  // the flag is exercised both ways
  EXPECT_LT(top1_count, n);
  std::vector<float> g_h(n * h), g_w(v * h), g_b(v);
  divkit::LinearHeadGrads gr;
  gr.hidden = TensorView::matrix(g_h.data(), DType::f32, n, h);
  gr.weight = TensorView::matrix(g_w.data(), DType::f32, v, h);
  gr.bias = TensorView::vector(g_b.data(), DType::f32, v);
  divkit::fused_linear_logprobs_backward(hd.view(), lab, spec,
                                         TensorView::vector(g.data(), DType::f64, n),
                                         TensorView::vector(e.data(), DType::f64, n), gr);
  expect_close(g_h, dh, 2e-5, "grad_hidden");
  expect_close(g_w, dw, 2e-5, "grad_weight");
  expect_close(g_b, db, 2e-5, "grad_bias");
}

void check_ties(const divkit::LinearHead& head, const TensorView& lab,
                const std::vector<float>& hidden, const std::vector<float>& weight,
                const std::vector<int64_t>& labels, const std::vector<float>& want) {
  const int64_t n = static_cast<int64_t>(hidden.size()), v = static_cast<int64_t>(weight.size());
  for (const float temperature : {1.0f, 0.6f}) {
    std::vector<float> top1(n, -1.0f), sq(n, -1.0f);
    divkit::LabelStatsOutputs st;
    st.is_top1 = TensorView::vector(top1.data(), DType::f32, n);
    st.log_sum_sq_probs = TensorView::vector(sq.data(), DType::f32, n);
    divkit::LogprobsSpec spec;
    spec.temperature = temperature;
    spec.chunk_size = 3;
    divkit::fused_linear_logprobs(head, lab, spec, st);
    for (int64_t i = 0; i < n; ++i) {
      EXPECT_EQ(top1[i], want[i]) << i << " T=" << temperature;
      double m = -1e300, s1 = 0.0, s2 = 0.0;
      for (int64_t j = 0; j < v; ++j) m = std::max(m, double(hidden[i]) * weight[j] / temperature);
      for (int64_t j = 0; j < v; ++j) {
        const double e = std::exp(double(hidden[i]) * weight[j] / temperature - m);
        s1 += e;
        s2 += e * e;
      }
      EXPECT_NEAR(sq[i], labels[i] < 0 ? 0.0 : std::log(s2) - 2.0 * std::log(s1), 1e-5) << i;
    }
  }
  std::vector<float> top1(n, -1.0f), loss(1), gh(n), gw(v);
  divkit::LabelStatsOutputs st;
  st.is_top1 = TensorView::vector(top1.data(), DType::f32, n);
  divkit::fused_linear_cross_entropy(head, lab, {}, TensorView::vector(loss.data(), DType::f32, 1),
                                     {TensorView::matrix(gh.data(), DType::f32, n, 1),
                                      TensorView::matrix(gw.data(), DType::f32, v, 1),
                                      {}},
                                     st);
  for (int64_t i = 0; i < n; ++i) EXPECT_EQ(top1[i], want[i]) << i;
}

// The top-1 flag's tie rule: the label must be the first maximal index (torch.argmax, TRL's fused
// head). Exact ties from integer logits z_ij = hidden_i * weight_j (H = 1), the maxima in the
// vector part and in the scalar tail of a row; through fused_linear_logprobs (with a temperature)
// and through fused_linear_cross_entropy with gradients (the sweep that overwrites the row with its
// exps), with log sum p^2 checked on the same rows against fp64.
TEST(FusedLinearLogprobs, TopOneTiesGoToTheFirstMaximum) {
  const int64_t v = 37, n = 7;
  std::vector<float> hidden(n), weight(v);
  for (int64_t j = 0; j < v; ++j) weight[j] = static_cast<float>((j * 7) % 5);  // max 4
  weight[3] = weight[20] = weight[36] = 9.0f;  // three tied maxima: 3 is the first
  for (int64_t i = 0; i < n; ++i) hidden[i] = static_cast<float>(1 + i % 3);
  std::vector<int64_t> labels = {3, 20, 36, 5, -100, 3, 9};
  const std::vector<float> want = {1, 0, 0, 0, 0, 1, 0};
  const divkit::LinearHead head{TensorView::matrix(hidden.data(), DType::f32, n, 1),
                                TensorView::matrix(weight.data(), DType::f32, v, 1),
                                {}};
  const TensorView lab = TensorView::vector(labels.data(), DType::i64, n);
  divkit_test::RuntimeGuard guard;
  for (const std::string& target : divkit::available_simd_targets()) {
    divkit::force_simd_target(target);
    SCOPED_TRACE(target);
    check_ties(head, lab, hidden, weight, labels, want);
  }
}

// The top-k mass over rows with many exact ties (integer logits z_ij = hidden_i * weight_j, H = 1)
// and k up to V: the candidates' threshold search must keep every tied value that belongs to the
// k largest. Against fp64 (sorted probabilities), with and without gradients in the call.
TEST(FusedLinearLogprobs, TopkMassWithTiesMatchesFp64) {
  const int64_t v = 45, n = 5;
  std::vector<float> hidden = {1.0f, 2.0f, 0.5f, 3.0f, 0.25f}, weight(v);
  for (int64_t j = 0; j < v; ++j) weight[j] = static_cast<float>((j * 7) % 6);  // ties of 8 each
  weight[11] = weight[40] = 9.0f;
  std::vector<int64_t> labels = {3, 11, 40, -100, 7};
  const divkit::LinearHead head{TensorView::matrix(hidden.data(), DType::f32, n, 1),
                                TensorView::matrix(weight.data(), DType::f32, v, 1),
                                {}};
  const TensorView lab = TensorView::vector(labels.data(), DType::i64, n);
  for (const int64_t k : {int64_t{1}, int64_t{2}, int64_t{3}, int64_t{9}, int64_t{20}, v - 1, v}) {
    for (const bool with_grads : {false, true}) {
      std::vector<float> mass(n, -1.0f), loss(1), gh(n), gw(v);
      divkit::LabelStatsOutputs st;
      st.topk_mass = TensorView::vector(mass.data(), DType::f32, n);
      st.topk = k;
      if (with_grads)
        divkit::fused_linear_cross_entropy(head, lab, {},
                                           TensorView::vector(loss.data(), DType::f32, 1),
                                           {TensorView::matrix(gh.data(), DType::f32, n, 1),
                                            TensorView::matrix(gw.data(), DType::f32, v, 1),
                                            {}},
                                           st);
      else divkit::fused_linear_logprobs(head, lab, {}, st);
      for (int64_t i = 0; i < n; ++i) {
        if (labels[i] < 0) {
          EXPECT_EQ(mass[i], 0.0f);
          continue;
        }
        std::vector<double> p(v);
        double s = 0.0;
        for (int64_t j = 0; j < v; ++j) s += p[j] = std::exp(double(hidden[i]) * weight[j]);
        std::sort(p.rbegin(), p.rend());
        const double want = std::accumulate(p.begin(), p.begin() + k, 0.0) / s;
        EXPECT_NEAR(mass[i], want, 1e-6) << "k = " << k << " row " << i << " grads " << with_grads;
      }
    }
  }
}

// ---- one-sweep gradients of the label losses -------------------------------------------------
// With hidden = I [n, n] and weight = X^T [v, n], the logits are X exactly and grad_weight is
// dL/dlogits transposed exactly (every GEMM sum has one non-zero product), so the row gradient
// itself is compared: the one-sweep path against fp64 and against the two-pass path
// (detail::set_label_one_sweep(false)), with softcap, label smoothing, z-loss, top-k mass,
// temperature and the entropy term, on every SIMD target and for 1 and 3 threads.

struct IdentityHead {
  int64_t n, v;
  std::vector<float> hidden, weight;  // I [n, n], X^T [v, n]
  std::vector<double> x;              // X [n, v]
  IdentityHead(int64_t n_, int64_t v_, uint32_t seed, double sd) : n(n_), v(v_) {
    std::mt19937 rng(seed);
    std::normal_distribution<double> g(0.0, sd);
    hidden.assign(n * n, 0.0f);
    for (int64_t i = 0; i < n; ++i) hidden[i * n + i] = 1.0f;
    weight.resize(v * n);
    x.resize(n * v);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < v; ++j) x[i * v + j] = weight[j * n + i] = static_cast<float>(g(rng));
  }
  divkit::LinearHead view() {
    return {TensorView::matrix(hidden.data(), DType::f32, n, n),
            TensorView::matrix(weight.data(), DType::f32, v, n),
            {}};
  }
};

// One call's outputs: G = dL/dlogits [n, v] (from grad_weight), the loss or log-probs, the top-k
// mass.
struct LabelRun {
  std::vector<float> g, out, topk;
};

// Cross-entropy with gradients in the forward call.
LabelRun ce_run(IdentityHead& hd, std::vector<int64_t>& labels,
                const divkit::CrossEntropySpec& spec, int64_t topk) {
  const int64_t n = hd.n, v = hd.v;
  LabelRun r;
  std::vector<float> gh(n * n), gw(v * n);
  r.out.assign(spec.reduction == Reduction::none ? n : 1, 0.0f);
  r.topk.assign(n, -1.0f);
  divkit::LabelStatsOutputs st;
  if (topk > 0) {
    st.topk_mass = TensorView::vector(r.topk.data(), DType::f32, n);
    st.topk = topk;
  }
  divkit::fused_linear_cross_entropy(hd.view(), TensorView::vector(labels.data(), DType::i64, n),
                                     spec,
                                     TensorView::vector(r.out.data(), DType::f32, r.out.size()),
                                     {TensorView::matrix(gh.data(), DType::f32, n, n),
                                      TensorView::matrix(gw.data(), DType::f32, v, n),
                                      {}},
                                     st);
  r.g.resize(n * v);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < v; ++j) r.g[i * v + j] = gw[j * n + i];
  return r;
}

// Selective log-softmax backward with upstream gradients g (log-probs) and e (entropy).
LabelRun logprobs_run(IdentityHead& hd, std::vector<int64_t>& labels, double temperature,
                      std::vector<double>& g, std::vector<double>& e) {
  const int64_t n = hd.n, v = hd.v;
  LabelRun r;
  std::vector<float> gh(n * n), gw(v * n);
  divkit::LogprobsSpec spec;
  spec.temperature = static_cast<float>(temperature);
  spec.chunk_size = 3;
  divkit::fused_linear_logprobs_backward(hd.view(),
                                         TensorView::vector(labels.data(), DType::i64, n), spec,
                                         TensorView::vector(g.data(), DType::f64, n),
                                         TensorView::vector(e.data(), DType::f64, n),
                                         {TensorView::matrix(gh.data(), DType::f32, n, n),
                                          TensorView::matrix(gw.data(), DType::f32, v, n),
                                          {}});
  r.g.resize(n * v);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < v; ++j) r.g[i * v + j] = gw[j * n + i];
  return r;
}

// Row by row: |got - want| <= rel |want| + abs_of_row * max_j |want_j| (fp32 rounding of p and of
// the chain-rule factor; the row's largest entry sets the absolute floor).
void expect_rows_close(const std::vector<float>& got, const std::vector<double>& want, int64_t n,
                       int64_t v, double rel, double abs_of_row, const std::string& what) {
  for (int64_t i = 0; i < n; ++i) {
    double scale = 0.0;
    for (int64_t j = 0; j < v; ++j) scale = std::max(scale, std::fabs(want[i * v + j]));
    scale = std::max(scale, 1e-6);  // a row of zeros (V = 1) is compared to 1e-12
    for (int64_t j = 0; j < v; ++j) {
      const double w = want[i * v + j];
      ASSERT_NEAR(got[i * v + j], w, rel * std::fabs(w) + abs_of_row * scale)
          << what << " row " << i << " entry " << j;
    }
  }
}

std::vector<double> widen(const std::vector<float>& f) { return {f.begin(), f.end()}; }

struct OneSweepCeCase {
  int64_t n, v;
  double eps, zl, cap;
  int64_t topk;
  Reduction red;
};
class LabelOneSweepCrossEntropy : public ::testing::TestWithParam<OneSweepCeCase> {};

TEST_P(LabelOneSweepCrossEntropy, MatchesFp64AndTheTwoPassPath) {
  const OneSweepCeCase c = GetParam();
  IdentityHead hd(c.n, c.v, 31, 3.0);
  std::vector<int64_t> labels(c.n);
  for (int64_t i = 0; i < c.n; ++i) labels[i] = i % 5 == 3 ? -100 : (i * 17 + 2) % c.v;
  const CeRef ref = ce_reference(hd.x, c.n, c.v, labels, c.eps, c.zl, c.cap, 1.0, c.red);
  divkit::CrossEntropySpec spec;
  spec.label_smoothing = static_cast<float>(c.eps);
  spec.z_loss_scale = static_cast<float>(c.zl);
  spec.softcap = static_cast<float>(c.cap);
  spec.reduction = c.red;
  spec.chunk_size = 4;
  divkit_test::RuntimeGuard guard;
  for (const std::string& target : divkit::available_simd_targets()) {
    divkit::force_simd_target(target);
    SCOPED_TRACE(target);
    divkit::set_num_threads(1);
    divkit::detail::set_label_one_sweep(false);
    const LabelRun two = ce_run(hd, labels, spec, c.topk);
    divkit::detail::set_label_one_sweep(true);
    const LabelRun one = ce_run(hd, labels, spec, c.topk);
    divkit::set_num_threads(3);
    const LabelRun one3 = ce_run(hd, labels, spec, c.topk);
    EXPECT_TRUE(one3.g == one.g) << "the thread count changed the bits";
    EXPECT_TRUE(one3.out == one.out && one3.topk == one.topk);
    expect_rows_close(one.g, ref.gz, c.n, c.v, 1e-5, 1e-6, "one sweep vs fp64");
    expect_rows_close(two.g, ref.gz, c.n, c.v, 1e-5, 1e-6, "two passes vs fp64");
    expect_rows_close(one.g, widen(two.g), c.n, c.v, 4e-6, 2e-7, "one sweep vs two passes");
    // The statistics are taken by the same code either way: the same bits.
    EXPECT_TRUE(one.out == two.out) << "loss";
    EXPECT_TRUE(one.topk == two.topk) << "topk_mass";
    expect_close(one.out, ref.loss, 2e-5, "loss");
    if (c.topk == 0) continue;
    for (int64_t i = 0; i < c.n; ++i) {
      if (labels[i] < 0) {
        EXPECT_EQ(one.topk[i], 0.0f);
        continue;
      }
      std::vector<double> p(c.v);
      for (int64_t j = 0; j < c.v; ++j) {
        const double xx = hd.x[i * c.v + j];
        p[j] = std::exp((c.cap > 0 ? c.cap * std::tanh(xx / c.cap) : xx) - ref.lse[i]);
      }
      std::sort(p.rbegin(), p.rend());
      const double mass = std::accumulate(p.begin(), p.begin() + c.topk, 0.0);
      EXPECT_NEAR(one.topk[i], mass, 1e-5 * mass) << "topk_mass row " << i;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Options, LabelOneSweepCrossEntropy,
    ::testing::Values(OneSweepCeCase{13, 67, 0.0, 0.0, 4.0, 0, Reduction::mean},
                      OneSweepCeCase{13, 67, 0.1, 1e-4, 4.0, 5, Reduction::sum},
                      OneSweepCeCase{9, 1031, 0.2, 0.0, 2.5, 0, Reduction::none},
                      OneSweepCeCase{9, 1031, 0.05, 1e-3, 0.0, 7, Reduction::mean},
                      OneSweepCeCase{11, 20011, 0.1, 0.0, 30.0, 3, Reduction::batchmean},
                      OneSweepCeCase{11, 20011, 0.0, 0.0, 0.0, 1, Reduction::mean},
                      OneSweepCeCase{6, 1, 0.1, 0.0, 3.0, 1, Reduction::mean}));

TEST(LabelOneSweepLogprobs, EntropyTermMatchesFp64AndTheTwoPassPath) {
  for (const auto& [n, v, temperature] :
       {std::tuple<int64_t, int64_t, double>{13, 67, 0.7}, {9, 1031, 1.0}, {11, 20011, 1.6}}) {
    SCOPED_TRACE("V = " + std::to_string(v));
    IdentityHead hd(n, v, 5 + static_cast<uint32_t>(v), 2.5);
    std::vector<int64_t> labels(n);
    for (int64_t i = 0; i < n; ++i) labels[i] = i % 4 == 1 ? -100 : (i * 29 + 1) % v;
    // Upstream gradients: the entropy's 0 on some rows, both signs.
    std::vector<double> g(n), e(n);
    for (int64_t i = 0; i < n; ++i) g[i] = 0.2 + 0.1 * i, e[i] = i % 3 == 0 ? 0.0 : 0.3 - 0.07 * i;
    const CeRef ref = ce_reference(hd.x, n, v, labels, 0, 0, 0, temperature, Reduction::none);
    // dL/dx_j = (g (1[y] - p_j) - e p_j (log p_j + H)) / T.
    std::vector<double> gz(n * v, 0.0);
    for (int64_t i = 0; i < n; ++i) {
      if (labels[i] < 0) continue;
      for (int64_t j = 0; j < v; ++j) {
        const double lp = hd.x[i * v + j] / temperature - ref.lse[i];
        const double p = std::exp(lp);
        gz[i * v + j] =
            (g[i] * ((j == labels[i]) - p) - e[i] * p * (lp + ref.ent[i])) / temperature;
      }
    }
    divkit_test::RuntimeGuard guard;
    for (const std::string& target : divkit::available_simd_targets()) {
      divkit::force_simd_target(target);
      SCOPED_TRACE(target);
      divkit::set_num_threads(1);
      divkit::detail::set_label_one_sweep(false);
      const LabelRun two = logprobs_run(hd, labels, temperature, g, e);
      divkit::detail::set_label_one_sweep(true);
      const LabelRun one = logprobs_run(hd, labels, temperature, g, e);
      divkit::set_num_threads(3);
      const LabelRun one3 = logprobs_run(hd, labels, temperature, g, e);
      EXPECT_TRUE(one3.g == one.g) << "the thread count changed the bits";
      expect_rows_close(one.g, gz, n, v, 1e-5, 1e-6, "one sweep vs fp64");
      expect_rows_close(two.g, gz, n, v, 1e-5, 1e-6, "two passes vs fp64");
      expect_rows_close(one.g, widen(two.g), n, v, 4e-6, 2e-7, "one sweep vs two passes");
    }
  }
}

// ---- bad input -----------------------------------------------------------------------------

TEST(FusedLinearErrors, NameTheArgument) {
  using divkit_test::expect_error;
  const int64_t n = 5, v = 7, h = 4;
  Head s(n, v, h, false, 1), t(n, v, h, false, 2);
  std::vector<int64_t> labels = {1, 2, -100, 3, 4};
  float loss = 0.0f;
  const TensorView lv = TensorView::vector(&loss, DType::f32, 1);
  const auto spec = divkit_test::make_spec(K::forward_kl);
  divkit::DivergenceOptions o;
  o.labels = TensorView::vector(labels.data(), DType::i64, n);

  divkit::LinearHead bad = s.view();
  bad.weight = TensorView::matrix(s.weight32.data(), DType::f32, v - 1, h + 1);
  expect_error([&] { divkit::fused_linear_divergence(bad, t.view(), spec, o, {}, lv); },
               {"fused_linear_divergence", "student_hidden", "student_weight", "hidden size"});
  Head t_short(n - 1, v, h, false, 3);
  expect_error([&] { divkit::fused_linear_divergence(s.view(), t_short.view(), spec, o, {}, lv); },
               {"teacher_hidden", "tokens"});
  Head t_big(n, v + 3, h, false, 3);
  expect_error([&] { divkit::fused_linear_divergence(s.view(), t_big.view(), spec, o, {}, lv); },
               {"vocabularies differ", "teacher_token_ids"});
  std::vector<int64_t> ids(v, 0);
  ids[3] = v + 3;
  divkit::FusedLinearOptions f;
  f.teacher_token_ids = TensorView::vector(ids.data(), DType::i64, v);
  expect_error([&] { divkit::fused_linear_divergence(s.view(), t_big.view(), spec, o, f, lv); },
               {"teacher_token_ids[3]", "out of the teacher's vocabulary"});
  divkit::FusedLinearOptions hard;
  hard.hard_weight = 1.0f;
  std::vector<int64_t> bad_labels = {1, 2, -100, 7, 4};
  divkit::DivergenceOptions ob = o;
  ob.labels = TensorView::vector(bad_labels.data(), DType::i64, n);
  expect_error([&] { divkit::fused_linear_divergence(s.view(), t.view(), spec, ob, hard, lv); },
               {"labels[3] = 7", "out of range"});
  expect_error([&] { divkit::fused_linear_divergence(s.view(), t.view(), spec, {}, hard, lv); },
               {"hard_weight", "needs labels"});
  divkit::FusedLinearOptions neg;
  neg.chunk_size = -2;
  expect_error([&] { divkit::fused_linear_divergence(s.view(), t.view(), spec, o, neg, lv); },
               {"chunk_size"});
  s.hidden32[2 * h + 1] = NAN;
  expect_error([&] { divkit::fused_linear_divergence(s.view(), t.view(), spec, o, {}, lv); },
               {"student_hidden", "NaN", "row 2"});
  s.hidden32[2 * h + 1] = 0.0f;
  t.weight32[4 * h] = INFINITY;
  expect_error([&] { divkit::fused_linear_divergence(s.view(), t.view(), spec, o, {}, lv); },
               {"teacher_weight", "row 4"});
  t.weight32[4 * h] = 0.0f;
  std::vector<float> wrong(v * (h + 1));
  divkit::LinearHeadGrads g;
  g.weight = TensorView::matrix(wrong.data(), DType::f32, v, h + 1);
  expect_error([&] { divkit::fused_linear_divergence(s.view(), t.view(), spec, o, {}, lv, g); },
               {"grad_student_weight", "shape"});

  // Label losses.
  const TensorView lab = TensorView::vector(bad_labels.data(), DType::i64, n);
  expect_error([&] { divkit::fused_linear_cross_entropy(s.view(), lab, {}, lv); },
               {"fused_linear_cross_entropy", "labels[3] = 7"});
  divkit::CrossEntropySpec ce;
  ce.label_smoothing = 1.0f;
  const TensorView good = TensorView::vector(labels.data(), DType::i64, n);
  expect_error([&] { divkit::fused_linear_cross_entropy(s.view(), good, ce, lv); },
               {"label_smoothing"});
  ce = {};
  ce.softcap = -1.0f;
  expect_error([&] { divkit::fused_linear_cross_entropy(s.view(), good, ce, lv); }, {"softcap"});
  std::vector<float> tk(n);
  divkit::LabelStatsOutputs st;
  st.topk_mass = TensorView::vector(tk.data(), DType::f32, n);
  st.topk = v + 1;
  expect_error([&] { divkit::fused_linear_logprobs(s.view(), good, {}, st); },
               {"fused_linear_logprobs", "topk"});
  divkit::LogprobsSpec lp;
  lp.temperature = 0.0f;
  expect_error([&] { divkit::fused_linear_logprobs(s.view(), good, lp, {}); }, {"temperature"});
  std::vector<uint16_t> half(n);
  std::vector<float> short_out(n - 1);
  divkit::LabelStatsOutputs more;
  more.is_top1 = TensorView::vector(half.data(), DType::bf16, n);
  expect_error([&] { divkit::fused_linear_logprobs(s.view(), good, {}, more); },
               {"fused_linear_logprobs", "is_top1"});
  more = {};
  more.log_sum_sq_probs = TensorView::vector(short_out.data(), DType::f32, n - 1);
  expect_error([&] { divkit::fused_linear_logprobs(s.view(), good, {}, more); },
               {"fused_linear_logprobs", "log_sum_sq_probs"});
  // Not with a vocabulary-parallel shard (a one-rank group here).
  std::vector<float> sq(n);
  more = {};
  more.log_sum_sq_probs = TensorView::vector(sq.data(), DType::f32, n);
  divkit::LogprobsSpec sharded;
  sharded.shard.all_reduce = [](double*, int64_t, divkit::CollectiveOp) {};
  expect_error([&] { divkit::fused_linear_logprobs(s.view(), good, sharded, more); },
               {"fused_linear_logprobs", "vocabulary-parallel"});
}

// A -inf bias entry masks that vocabulary entry: the cross-entropy, its statistics and the
// hidden-state gradient equal those of the head without the masked rows (labels remapped); the
// masked rows take zero weight and bias gradients. Label smoothing spreads over the unmasked
// entries (eps / V' each, V' = the unmasked count, as the head without the masked rows), in the
// one-sweep gradient and in the gradient pass of its own. NaN / +inf bias entries, and a bias that
// masks every entry (every counted row all -inf), name the argument.
TEST(FusedLinearCrossEntropy, MinusInfBiasMasksTheEntry) {
  using divkit_test::expect_error;
  const int64_t n = 6, v = 11, h = 5;
  const std::vector<int64_t> masked = {2, 7, 10};
  std::mt19937 rng(7);
  std::normal_distribution<float> g(0.0f, 1.0f);
  std::vector<float> hidden(n * h), weight(v * h), bias(v);
  for (float& x : hidden) x = g(rng);
  for (float& x : weight) x = g(rng);
  for (float& x : bias) x = g(rng);
  for (int64_t j : masked) bias[j] = -INFINITY;
  std::vector<int64_t> labels = {0, 3, -100, 9, 5, 1}, keep_of(v, -1);
  std::vector<float> w_kept, b_kept;
  for (int64_t j = 0, r = 0; j < v; ++j) {
    if (std::find(masked.begin(), masked.end(), j) != masked.end()) continue;
    keep_of[j] = r++;
    w_kept.insert(w_kept.end(), weight.begin() + j * h, weight.begin() + (j + 1) * h);
    b_kept.push_back(bias[j]);
  }
  std::vector<int64_t> labels_kept(n);
  for (int64_t i = 0; i < n; ++i) labels_kept[i] = labels[i] < 0 ? labels[i] : keep_of[labels[i]];
  const int64_t vk = static_cast<int64_t>(b_kept.size());
  struct Out {
    float loss = 0.0f;
    std::vector<float> gh, gw, gb, ent;
  };
  auto run = [&](std::vector<float>& w, std::vector<float>& b, std::vector<int64_t>& lab,
                 int64_t vv, float softcap = 0.0f, float eps = 0.0f) {
    Out o;
    o.gh.resize(n * h);
    o.gw.resize(vv * h);
    o.gb.resize(vv);
    o.ent.resize(n);
    const divkit::LinearHead head{TensorView::matrix(hidden.data(), DType::f32, n, h),
                                  TensorView::matrix(w.data(), DType::f32, vv, h),
                                  TensorView::vector(b.data(), DType::f32, vv)};
    divkit::LabelStatsOutputs st;
    st.entropy = TensorView::vector(o.ent.data(), DType::f32, n);
    divkit::CrossEntropySpec spec;
    spec.z_loss_scale = 0.01f;
    spec.softcap = softcap;
    spec.label_smoothing = eps;
    divkit::fused_linear_cross_entropy(head, TensorView::vector(lab.data(), DType::i64, n), spec,
                                       TensorView::vector(&o.loss, DType::f32, 1),
                                       {TensorView::matrix(o.gh.data(), DType::f32, n, h),
                                        TensorView::matrix(o.gw.data(), DType::f32, vv, h),
                                        TensorView::vector(o.gb.data(), DType::f32, vv)},
                                       st);
    return o;
  };
  // With softcap too: softcap(-inf) = -inf keeps the entry masked (not at logit -softcap).
  for (const auto& [cap, eps, one_sweep] :
       {std::tuple{0.0f, 0.0f, true}, std::tuple{1.5f, 0.0f, true}, std::tuple{0.0f, 0.1f, true},
        std::tuple{1.5f, 0.2f, true}, std::tuple{0.0f, 0.1f, false},
        std::tuple{1.5f, 0.2f, false}}) {
    SCOPED_TRACE(::testing::Message() << "eps " << eps << " one_sweep " << one_sweep);
    divkit::detail::set_label_one_sweep(one_sweep);
    const Out full = run(weight, bias, labels, v, cap, eps);
    const Out kept = run(w_kept, b_kept, labels_kept, vk, cap, eps);
    divkit::detail::set_label_one_sweep(true);
    ASSERT_TRUE(std::isfinite(full.loss)) << cap;
    EXPECT_NEAR(full.loss, kept.loss, 1e-6 * std::abs(kept.loss)) << cap;
    for (int64_t i = 0; i < n * h; ++i) EXPECT_NEAR(full.gh[i], kept.gh[i], 1e-6) << cap << i;
    for (int64_t i = 0; i < n; ++i) EXPECT_NEAR(full.ent[i], kept.ent[i], 1e-6) << cap << i;
    for (int64_t j = 0; j < v; ++j) {
      const int64_t r = keep_of[j];
      // Exactly 0 for a masked entry's bias and weight row.
      if (r < 0) {
        EXPECT_EQ(full.gb[j], 0.0f) << cap << j;
      }
      EXPECT_NEAR(full.gb[j], r < 0 ? 0.0f : kept.gb[r], 1e-6) << cap << j;
      for (int64_t c = 0; c < h; ++c)
        EXPECT_NEAR(full.gw[j * h + c], r < 0 ? 0.0f : kept.gw[r * h + c], 1e-6) << cap << j;
    }
  }
  for (const float bad : {NAN, INFINITY}) {
    std::vector<float> b2 = bias;
    b2[4] = bad;
    expect_error([&] { run(weight, b2, labels, v); },
                 {"fused_linear_cross_entropy", "bias contains NaN or +inf at index 4"});
  }
  std::vector<float> all(v, -INFINITY);
  expect_error([&] { run(weight, all, labels, v); },
               {"fused_linear_cross_entropy", "token 0", "all -inf"});
}

// The row kernels' count of unmasked entries (LabelForwardJob::unmasked, label smoothing over
// them): rows with different numbers of -inf logits (none, a few in the vector part and the
// tail, all but one), with and without softcap, for every SIMD target. mean_z is the fp64 mean
// over the finite z; the gradient's c goes to the unmasked entries only (exactly 0 at masked
// ones) in the one-sweep gradient (coef) and in label_rows_grad with c_unmasked; both match
// fp64 dL/dx = (a p + b 1[y] + c 1[unmasked]) dz/dx. The shard pass counts the same V'.
TEST(LabelKernels, UnmaskedCountForLabelSmoothing) {
  const int64_t rows = 5, v = 37;
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::vector<float> x(rows * v);
  for (float& t : x) t = normal(rng);
  for (int64_t j = 0; j < v; ++j) {
    if (j % 7 == 2) x[1 * v + j] = -INFINITY;          // a few, vector part and tail
    if (j != 5) x[2 * v + j] = -INFINITY;              // all but one
    if (j >= 30 && j != 33) x[3 * v + j] = -INFINITY;  // the tail only
  }
  const std::vector<int64_t> labels = {4, 0, 5, 33, -1};
  constexpr double ka = 0.7, kb = -0.6, kc_total = -0.3;  // c = kc_total / V'
  divkit_test::RuntimeGuard guard;
  for (const std::string& target : divkit::available_simd_targets()) {
    divkit::force_simd_target(target);
    for (const float cap : {0.0f, 3.0f}) {
      for (const int mode : {0, 1, 2}) {  // fused sweep, forward + label_rows_grad, shard pass
        SCOPED_TRACE(::testing::Message() << target << " cap " << cap << " mode " << mode);
        std::vector<float> z = x;
        std::vector<double> lse(rows), mean(rows), cnt(rows, -1.0), part(4 * rows);
        divkit::detail::LabelForwardJob f;
        f.z = z.data();
        f.ldz = v;
        f.rows = rows;
        f.v = v;
        f.labels = labels.data();
        f.softcap = cap;
        f.unmasked = cnt.data();
        std::vector<double> shift(rows);
        if (mode == 2) {
          f.shard_max = shift.data();
          divkit::detail::label_rows_forward(f);
          f.shard_max = nullptr;
          f.shift = shift.data();
          f.partials = part.data();
        } else {
          f.lse = lse.data();
          f.mean_z = mean.data();
        }
        struct Ctx {
          const double* cnt;
        } ctx{cnt.data()};
        if (mode == 0) {
          f.coef_ctx = &ctx;
          f.coef = [](void* p, int64_t r, double, double* a, double* b, double* c, double* e) {
            *a = ka;
            *b = kb;
            *c = kc_total / static_cast<const Ctx*>(p)->cnt[r];
            *e = 0.0;
          };
        }
        divkit::detail::label_rows_forward(f);
        ASSERT_EQ(f.bad_row, -1);
        std::vector<double> ca(rows, ka), cb(rows, kb), cc(rows);
        for (int64_t i = 0; i < rows; ++i) cc[i] = labels[i] < 0 ? 0.0 : kc_total / cnt[i];
        if (mode == 1) {
          divkit::detail::LabelGradJob g;
          g.z = z.data();
          g.ldz = v;
          g.rows = rows;
          g.v = v;
          g.labels = labels.data();
          g.softcap = cap;
          g.lse = lse.data();
          g.a = ca.data();
          g.b = cb.data();
          g.c = cc.data();
          g.c_unmasked = true;
          divkit::detail::label_rows_grad(g);
        }
        for (int64_t i = 0; i < rows; ++i) {
          if (labels[i] < 0) {
            EXPECT_EQ(cnt[i], 0.0);
            continue;
          }
          std::vector<double> zd(v), dzdx(v, 0.0);
          double n_fin = 0, sum = 0, m = -INFINITY;
          for (int64_t j = 0; j < v; ++j) {
            const double t = x[i * v + j];
            zd[j] = std::isinf(t) ? t : (cap > 0 ? cap * std::tanh(t / cap) : t);
            if (!std::isinf(t)) n_fin += 1, sum += zd[j], m = std::max(m, zd[j]);
            if (!std::isinf(t)) dzdx[j] = cap > 0 ? 1.0 - std::pow(std::tanh(t / cap), 2) : 1.0;
          }
          EXPECT_EQ(cnt[i], n_fin) << i;
          if (mode == 2) {
            EXPECT_NEAR(part[4 * i + 2], sum, 1e-5 * (1 + std::abs(sum))) << i;
            continue;
          }
          EXPECT_NEAR(mean[i], sum / n_fin, 1e-6 * (1 + std::abs(sum / n_fin))) << i;
          double se = 0;
          for (int64_t j = 0; j < v; ++j) se += std::exp(zd[j] - m);
          const double l = m + std::log(se);
          for (int64_t j = 0; j < v; ++j) {
            const float got = z[i * v + j];
            if (std::isinf(x[i * v + j])) {
              EXPECT_EQ(got, 0.0f) << i << " " << j;
              continue;
            }
            const double want =
                (ka * std::exp(zd[j] - l) + kb * (j == labels[i]) + kc_total / n_fin) * dzdx[j];
            EXPECT_NEAR(got, want, 2e-6) << i << " " << j;
          }
        }
      }
    }
  }
}

// The top-k selection itself (the threshold search of label_kernels.cc), through the
// vocabulary-parallel pass that returns the k largest z of each row: for every k from 1 to V + 1,
// rows with many exact ties, spreads from 1e-3 to 1e30 (the search's late thresholds), -inf
// entries (fewer finite entries than k) and a shift equal to or above the row's max, the values
// returned are exactly the k largest (as a multiset), on every SIMD target.
TEST(LabelRows, TopkSelectionIsExactForEveryK) {
  const int64_t v = 203, rows = 8;
  std::mt19937 rng(11);
  std::uniform_int_distribution<int> ints(-5, 5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(rows * v);
  for (int64_t j = 0; j < v; ++j) {
    const float r = static_cast<float>(ints(rng));
    x[0 * v + j] = r;
    x[1 * v + j] = r * 1e-3f;
    x[2 * v + j] = normal(rng) * 1e4f;
    x[3 * v + j] = static_cast<float>(ints(rng)) * 1e30f;
    x[4 * v + j] = j % 5 == 1 ? -INFINITY : r;
    x[5 * v + j] = j % 2 ? -INFINITY : static_cast<float>(ints(rng)) * 1e20f;
    x[6 * v + j] = 2.5f;
    x[7 * v + j] = j == 100 ? 1.0f : -INFINITY;
  }
  std::vector<int64_t> labels(rows, 0);
  divkit_test::RuntimeGuard guard;
  for (const std::string& target : divkit::available_simd_targets()) {
    divkit::force_simd_target(target);
    for (const double above : {0.0, 3.0}) {
      std::vector<double> shift(rows);
      for (int64_t i = 0; i < rows; ++i)
        shift[i] = *std::max_element(x.begin() + i * v, x.begin() + (i + 1) * v) + above;
      for (int64_t k = 1; k <= v + 1; ++k) {
        std::vector<float> z = x;
        std::vector<double> partials(4 * rows), top(rows * k);
        divkit::detail::LabelForwardJob job;
        job.z = z.data();
        job.ldz = v;
        job.rows = rows;
        job.v = v;
        job.labels = labels.data();
        job.shift = shift.data();
        job.partials = partials.data();
        job.topk_z = top.data();
        job.topk = k;
        divkit::detail::label_rows_forward(job);
        for (int64_t i = 0; i < rows; ++i) {
          std::vector<double> want(x.begin() + i * v, x.begin() + (i + 1) * v);
          std::sort(want.rbegin(), want.rend());
          want.resize(static_cast<size_t>(k), -INFINITY);
          std::vector<double> got(top.begin() + i * k, top.begin() + (i + 1) * k);
          std::sort(got.rbegin(), got.rend());
          ASSERT_EQ(got, want) << target << " row " << i << " k " << k << " above " << above;
        }
      }
    }
  }
}

}  // namespace
