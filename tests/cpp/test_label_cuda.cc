// The label-row kernel of divkit::label_rows: the CUDA kernel's steps (label_cuda.cu), run on
// the host with the scalar math it shares (label_scalar.h), against the CPU row kernels
// (label_rows_forward / label_rows_grad of label_kernels.h) for every option, so the CPU tests
// cover what the GPU computes; the CPU path of label_rows against the same kernels; the argument
// checks and the dispatch of CUDA views.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "divkit/fused_linear.h"
#include "divkit/runtime.h"
#include "fused_linear/label_kernels.h"
#include "fused_linear/label_scalar.h"
#include "sparse/sparse_scalar.h"

namespace divkit {
namespace {

namespace ls = label_scalar;
namespace ss = sparse_scalar;

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int kThreads = 256;  // cuda_common::kThreads: the kernel's per-thread partial sums

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

struct Stats {
  double lse = 0, zy = 0, mean = 0, ent = 0, mass = 0, lsq = 0, top1 = 0, unmasked = 0;
  bool bad = false;
};

struct Coef {
  double a0 = 0, a1 = 0, b = 0, c = 0, e = 0;
};

// One row as rows_kernel computes it (label_cuda.cu): z recomputed from x in every sweep, the
// sums as per-thread fp64 partials (entry j on thread j % 256) added in thread order, the top-k
// mass from the radix select, the gradient over x. smooth: smooth_unmasked (the count of the
// unmasked entries, mean_z and c over them).
Stats gpu_row(std::vector<float>& x, int64_t y, float temperature, float softcap, int64_t topk,
              const Coef* coef, bool smooth = false) {
  const int64_t v = static_cast<int64_t>(x.size());
  const ls::Transform tr = ls::make_transform(1.0f / temperature, softcap);
  Stats st;
  // 1.
  float m = -kInf;
  for (int64_t j = 0; j < v; ++j) {
    if (ls::bad_logit(x[j])) st.bad = true;
    m = std::fmax(m, ls::transform(tr, x[j]));
  }
  if (st.bad || m == -kInf) {
    st.bad = true;
    return st;
  }
  // 2.
  const float zy = ls::transform(tr, x[y]);
  std::vector<double> s(kThreads), sec(kThreads), sz(kThreads), ssq(kThreads), cnt(kThreads);
  bool earlier = false;
  for (int64_t j = 0; j < v; ++j) {
    const float z = ls::transform(tr, x[j]);
    const float ex = ls::softmax_exp(z, m);
    const int t = static_cast<int>(j % kThreads);
    s[t] += ex;
    sec[t] += ls::entropy_term(ex, z, m);
    if (!smooth) {
      sz[t] += z;
    } else if (ls::is_unmasked(z)) {
      sz[t] += z;
      cnt[t] += 1.0;
    }
    ssq[t] += static_cast<double>(ex) * ex;
    if (j < y && z == m) earlier = true;
  }
  double sum_e = 0, sum_ec = 0, sum_z = 0, sum_sq = 0, n_unmasked = 0;
  for (int t = 0; t < kThreads; ++t) {
    n_unmasked += cnt[t];
    sum_e += s[t];
    sum_ec += sec[t];
    sum_z += sz[t];
    sum_sq += ssq[t];
  }
  st.lse = ls::row_lse(m, sum_e);
  st.zy = zy;
  const int64_t vp = static_cast<int64_t>(n_unmasked);
  st.mean = smooth ? ls::row_mean_unmasked(sum_z, vp, v, true) : ls::row_mean(sum_z, v);
  st.unmasked = n_unmasked;
  st.ent = ls::row_entropy(sum_e, sum_ec);
  st.lsq = ls::row_log_sum_sq(sum_e, sum_sq);
  st.top1 = zy == m && !earlier ? 1.0 : 0.0;
  // 3.
  if (topk > 0) {
    uint32_t prefix = 0, mask = 0;
    int64_t remaining = topk;
    for (int shift = 24; shift >= 0; shift -= 8) {
      uint32_t hist[256] = {};
      for (int64_t j = 0; j < v; ++j) {
        const uint32_t key = ss::order_key(ls::transform(tr, x[j]));
        if ((key & mask) == prefix) ++hist[(key >> shift) & 255u];
      }
      prefix |= ss::radix_pick(hist, remaining) << shift;
      mask |= 255u << shift;
    }
    double above = 0;
    for (int64_t j = 0; j < v; ++j) {
      const float z = ls::transform(tr, x[j]);
      if (ss::order_key(z) > prefix) above += ls::topk_term(z, st.lse);
    }
    st.mass = ls::topk_mass(above, remaining, ls::key_value(prefix), st.lse);
  }
  // 4.
  if (coef != nullptr) {
    const double c = smooth ? ls::smooth_c(coef->c, v, vp) : coef->c;
    const ls::GradRow g = ls::make_grad_row(st.lse, ls::coef_a(coef->a0, coef->a1, st.lse), c,
                                            coef->e, st.ent, tr.inv_t, softcap, smooth);
    const float label = ls::label_term(g, coef->b, zy);
    for (int64_t j = 0; j < v; ++j) {
      float d = ls::grad_entry(g, ls::transform(tr, x[j]));
      if (j == y) d += label;
      x[j] = d;
    }
  }
  return st;
}

void expect_close(double got, double want, double tol, const std::string& what) {
  if (std::isinf(want) || std::isinf(got)) {
    EXPECT_EQ(got, want) << what;
    return;
  }
  EXPECT_LE(std::fabs(got - want), tol * (1.0 + std::fabs(want)))
      << what << ": " << got << " vs " << want;
}

struct Case {
  int64_t v;
  float temperature, softcap;
  int64_t topk;
  bool entropy_coef, z_loss;
};

// Rows: random logits, a label tied with an earlier maximum, a label that is the first maximum,
// masked (-inf) entries, an ignored row.
std::vector<float> make_rows(int64_t n, int64_t v, std::vector<int64_t>& labels, bool masked,
                             uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::uniform_int_distribution<int64_t> pick(0, v - 1);
  std::vector<float> x(static_cast<size_t>(n * v));
  for (auto& e : x) e = std::round(8.0f * normal(rng)) / 8.0f;  // repeated values: ties
  labels.assign(static_cast<size_t>(n), 0);
  for (int64_t i = 0; i < n; ++i) labels[i] = pick(rng);
  float* r1 = x.data() + 1 * v;  // the label tied with an earlier maximum
  const float big = 9.0f;
  r1[0] = big;
  r1[v - 1] = big;
  labels[1] = v - 1;
  float* r2 = x.data() + 2 * v;  // the label is the first maximum, tied later
  r2[0] = big;
  r2[v - 1] = big;
  labels[2] = 0;
  if (masked)
    for (int64_t j = 1; j < v; j += 3) x[3 * v + j] = -kInf;
  labels[4] = -1;  // ignored
  return x;
}

TEST(LabelScalar, GpuStepsMatchTheCpuRowKernels) {
  const Case cases[] = {
      {1, 1.0f, 0.0f, 1, false, false},       {7, 1.0f, 0.0f, 3, false, true},
      {37, 0.7f, 0.0f, 5, true, false},       {37, 1.0f, 4.0f, 37, false, true},
      {300, 1.3f, 6.0f, 20, true, true},      {1000, 1.0f, 0.0f, 1, true, true},
      {1031, 2.0f, 30.0f, 100, false, false},
  };
  uint32_t seed = 11;
  for (const Case& cs : cases) {
    const int64_t n = 6, v = cs.v;
    std::vector<int64_t> labels;
    // Masked entries with and without softcap (softcap keeps them at -inf).
    std::vector<float> x = make_rows(n, v, labels, /*masked=*/true, seed++);
    if (v == 1)
      for (auto& y : labels) y = y < 0 ? -1 : 0;
    const std::string where = "V=" + std::to_string(v) + " T=" + std::to_string(cs.temperature) +
                              " cap=" + std::to_string(cs.softcap);
    // The CPU: statistics, then the gradient from the per-row coefficients.
    std::vector<float> z = x;
    std::vector<double> lse(n), zy(n), mean(n), ent(n), mass(n), lsq(n), top1(n);
    detail::LabelForwardJob f;
    f.z = z.data();
    f.ldz = v;
    f.rows = n;
    f.v = v;
    f.labels = labels.data();
    f.inv_t = 1.0f / cs.temperature;
    f.softcap = cs.softcap;
    f.lse = lse.data();
    f.z_label = zy.data();
    f.mean_z = mean.data();
    f.entropy = ent.data();
    f.topk_mass = mass.data();
    f.topk = cs.topk;
    f.log_sum_sq = lsq.data();
    f.is_top1 = top1.data();
    f.num_threads = 2;
    detail::label_rows_forward(f);
    ASSERT_EQ(f.bad_row, -1) << where;
    std::vector<Coef> coef(n);
    std::vector<double> ca(n), cb(n), cc(n), ce(n);
    for (int64_t i = 0; i < n; ++i) {
      const double s = 0.25 + 0.125 * static_cast<double>(i);
      coef[i] = {s, cs.z_loss ? 2.0 * 1e-2 * s : 0.0, -0.9 * s, -0.1 * s / static_cast<double>(v),
                 cs.entropy_coef ? -0.3 * s : 0.0};
      ca[i] = coef[i].a0 + coef[i].a1 * lse[i];
      cb[i] = coef[i].b;
      cc[i] = coef[i].c;
      ce[i] = coef[i].e;
    }
    detail::LabelGradJob g;
    g.z = z.data();
    g.ldz = v;
    g.rows = n;
    g.v = v;
    g.labels = labels.data();
    g.inv_t = f.inv_t;
    g.softcap = cs.softcap;
    g.lse = lse.data();
    g.entropy = ent.data();
    g.a = ca.data();
    g.b = cb.data();
    g.c = cc.data();
    g.e = cs.entropy_coef ? ce.data() : nullptr;
    g.num_threads = 2;
    detail::label_rows_grad(g);
    for (int64_t i = 0; i < n; ++i) {
      if (labels[i] < 0) continue;
      const std::string row = where + " row " + std::to_string(i);
      std::vector<float> xr(x.begin() + i * v, x.begin() + (i + 1) * v);
      const Stats st = gpu_row(xr, labels[i], cs.temperature, cs.softcap, cs.topk, &coef[i]);
      ASSERT_FALSE(st.bad) << row;
      expect_close(st.lse, lse[i], 2e-6, row + " lse");
      expect_close(st.zy, zy[i], 2e-6, row + " z_label");
      expect_close(st.mean, mean[i], 2e-6, row + " mean_z");
      expect_close(st.ent, ent[i], 1e-5, row + " entropy");
      expect_close(st.mass, mass[i], 2e-6, row + " topk_mass");
      expect_close(st.lsq, lsq[i], 1e-5, row + " log_sum_sq");
      EXPECT_EQ(st.top1, top1[i]) << row << " is_top1";
      float gmax = 0.0f;
      for (int64_t j = 0; j < v; ++j) gmax = std::max(gmax, std::fabs(z[i * v + j]));
      for (int64_t j = 0; j < v; ++j)
        ASSERT_LE(std::fabs(xr[j] - z[i * v + j]), 2e-5f * gmax + 1e-30f)
            << row << " gradient entry " << j << ": " << xr[j] << " vs " << z[i * v + j];
    }
    // The rows built to test the first-max rule.
    if (v > 1) {
      EXPECT_EQ(top1[1], 0.0) << where;
      EXPECT_EQ(top1[2], 1.0) << where;
    }
  }
}

TEST(LabelScalar, BadRowsAsTheCpuFindsThem) {
  const int64_t v = 9;
  for (const float softcap : {0.0f, 3.0f}) {
    for (const float bad : {std::nanf(""), kInf}) {
      std::vector<float> x(v, 0.5f);
      x[4] = bad;
      EXPECT_TRUE(gpu_row(x, 1, 1.0f, softcap, 0, nullptr).bad);
      std::vector<int64_t> labels = {1};
      detail::LabelForwardJob f;
      f.z = x.data();
      f.ldz = v;
      f.rows = 1;
      f.v = v;
      f.labels = labels.data();
      f.softcap = softcap;
      detail::label_rows_forward(f);
      EXPECT_EQ(f.bad_row, 0);
    }
    // Every entry -inf: no distribution, with or without softcap (softcap(-inf) = -inf).
    std::vector<float> x(v, -kInf);
    EXPECT_TRUE(gpu_row(x, 2, 1.0f, softcap, 0, nullptr).bad);
    std::vector<int64_t> labels = {2};
    detail::LabelForwardJob f;
    f.z = x.data();
    f.ldz = v;
    f.rows = 1;
    f.v = v;
    f.labels = labels.data();
    f.softcap = softcap;
    detail::label_rows_forward(f);
    EXPECT_EQ(f.bad_row, 0) << "softcap " << softcap;
  }
}

// Softcap keeps a masked entry (x = -inf, a -inf bias) masked: z = softcap(-inf) / T = -inf,
// probability 0, and a chain-rule factor of 0 (not -inf or NaN), in the scalar math the GPU
// uses and in the CPU kernels (vector part and scalar tail), against an fp64 reference that
// drops the masked entries.
TEST(LabelScalar, SoftcapKeepsMaskedEntriesMasked) {
  const float cap = 2.5f, temperature = 0.8f;
  const ls::Transform tr = ls::make_transform(1.0f / temperature, cap);
  EXPECT_EQ(ls::transform(tr, -kInf), -kInf);
  EXPECT_EQ(ls::transform(tr, -1e30f), -cap / temperature);  // finite logits are capped
  const ls::GradRow gr = ls::make_grad_row(0.5, 0.7, -0.01, 0.3, 1.2, tr.inv_t, cap);
  EXPECT_EQ(ls::cap_factor(gr, -kInf), 0.0f);
  EXPECT_EQ(ls::grad_entry(gr, -kInf), 0.0f);
  EXPECT_EQ(ls::label_term(gr, -0.9, -kInf), 0.0f);
  for (const int64_t v : {5, 37, 1031}) {  // tails only, vectors and tail, many vectors
    const int64_t n = 3;
    std::mt19937 rng(static_cast<uint32_t>(v));
    std::normal_distribution<float> normal(0.0f, 3.0f);
    std::vector<float> x(static_cast<size_t>(n * v));
    for (auto& e : x) e = normal(rng);
    std::vector<int64_t> labels = {0, 1, 2};
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 3 + i; j < v; j += 2) x[i * v + j] = -kInf;
    std::vector<float> z = x;
    std::vector<double> lse(n), zy(n), mean(n), ent(n), mass(n), lsq(n), top1(n);
    detail::LabelForwardJob f;
    f.z = z.data();
    f.ldz = v;
    f.rows = n;
    f.v = v;
    f.labels = labels.data();
    f.inv_t = tr.inv_t;
    f.softcap = cap;
    f.lse = lse.data();
    f.z_label = zy.data();
    f.entropy = ent.data();
    f.topk_mass = mass.data();
    f.topk = v;  // every entry: the mass of the masked ones is 0
    f.log_sum_sq = lsq.data();
    detail::label_rows_forward(f);
    ASSERT_EQ(f.bad_row, -1) << v;
    std::vector<double> ca(n, 0.6), cb(n, -0.9), cc(n, -0.02), ce(n, 0.25);
    detail::LabelGradJob g;
    g.z = z.data();
    g.ldz = v;
    g.rows = n;
    g.v = v;
    g.labels = labels.data();
    g.inv_t = tr.inv_t;
    g.softcap = cap;
    g.lse = lse.data();
    g.entropy = ent.data();
    g.a = ca.data();
    g.b = cb.data();
    g.c = cc.data();
    g.e = ce.data();
    detail::label_rows_grad(g);
    for (int64_t i = 0; i < n; ++i) {
      const std::string row = "V=" + std::to_string(v) + " row " + std::to_string(i);
      // fp64 reference over the unmasked entries only.
      std::vector<double> zd;
      std::vector<int64_t> idx;
      for (int64_t j = 0; j < v; ++j) {
        const float xj = x[i * v + j];
        if (xj == -kInf) continue;
        zd.push_back(cap * std::tanh(static_cast<double>(xj) / cap) / temperature);
        idx.push_back(j);
      }
      double m = -INFINITY, s = 0.0, s2 = 0.0, pz = 0.0;
      for (double t : zd) m = std::max(m, t);
      for (double t : zd) s += std::exp(t - m);
      const double ref_lse = m + std::log(s);
      for (double t : zd) {
        const double p = std::exp(t - ref_lse);
        s2 += p * p;
        pz += p * (t - ref_lse);
      }
      expect_close(lse[i], ref_lse, 2e-6, row + " lse");
      expect_close(ent[i], -pz, 1e-5, row + " entropy");
      expect_close(mass[i], 1.0, 2e-6, row + " topk_mass");
      expect_close(lsq[i], std::log(s2), 1e-5, row + " log_sum_sq");
      // dL/dx_j = (a p_j + b 1[j = y] + c + e p_j (log p_j + H)) (1 - tanh^2) / T, 0 at masked.
      size_t k = 0;
      for (int64_t j = 0; j < v; ++j) {
        const float got = z[i * v + j];
        if (x[i * v + j] == -kInf) {
          EXPECT_EQ(got, 0.0f) << row << " masked entry " << j;
          continue;
        }
        const double t = zd[k++], p = std::exp(t - ref_lse), lp = t - ref_lse;
        double d = ca[i] * p + cc[i] + ce[i] * p * (lp - pz);
        if (j == labels[i]) d += cb[i];
        const double th = std::tanh(static_cast<double>(x[i * v + j]) / cap);
        d *= (1.0 - th * th) / temperature;
        ASSERT_LE(std::fabs(got - d), 2e-5 * (1.0 + std::fabs(d))) << row << " entry " << j;
      }
      // The GPU's steps give the same statistics and gradient, 0 at masked entries.
      std::vector<float> xr(x.begin() + i * v, x.begin() + (i + 1) * v);
      const Coef coef{ca[i], 0.0, cb[i], cc[i], ce[i]};
      const Stats st = gpu_row(xr, labels[i], temperature, cap, v, &coef);
      ASSERT_FALSE(st.bad) << row;
      expect_close(st.lse, ref_lse, 2e-6, row + " GPU steps lse");
      expect_close(st.mass, 1.0, 2e-6, row + " GPU steps topk_mass");
      for (int64_t j = 0; j < v; ++j) {
        ASSERT_TRUE(std::isfinite(xr[j])) << row << " GPU steps entry " << j;
        if (x[i * v + j] == -kInf) {
          EXPECT_EQ(xr[j], 0.0f) << row << " GPU steps entry " << j;
        }
      }
    }
  }
}

TEST(LabelScalar, TopkKeyRoundTrip) {
  for (const float z : {-kInf, -3.5f, -0.0f, 0.0f, 1e-30f, 2.25f, 1e30f}) {
    const float back = ls::key_value(ss::order_key(z));
    EXPECT_EQ(back, z == 0.0f ? 0.0f : z);
  }
}

// The public label_rows on CPU tensors: the CPU kernels, with the coefficient form a0 + a1 lse.
TEST(LabelRows, CpuPathMatchesTheRowKernels) {
  const int64_t n = 6, v = 53;
  std::vector<int64_t> labels;
  std::vector<float> x = make_rows(n, v, labels, true, 5);
  labels[4] = -100;
  std::vector<float> logits = x;
  std::vector<double> lse(n), ent(n), mass(n), a0(n), a1(n), b(n), c(n), e(n);
  for (int64_t i = 0; i < n; ++i) {
    a0[i] = 0.5;
    a1[i] = 0.01;
    b[i] = -0.5;
    c[i] = -0.001;
    e[i] = 0.2;
  }
  LabelRowsArgs a;
  a.logits = TensorView::matrix(logits.data(), DType::f32, n, v);
  a.labels = TensorView::vector(labels.data(), DType::i64, n);
  a.temperature = 0.8f;
  a.lse = TensorView::vector(lse.data(), DType::f64, n);
  a.entropy = TensorView::vector(ent.data(), DType::f64, n);
  a.topk_mass = TensorView::vector(mass.data(), DType::f64, n);
  a.topk = 4;
  a.coef_a0 = TensorView::vector(a0.data(), DType::f64, n);
  a.coef_a1 = TensorView::vector(a1.data(), DType::f64, n);
  a.coef_b = TensorView::vector(b.data(), DType::f64, n);
  a.coef_c = TensorView::vector(c.data(), DType::f64, n);
  a.coef_e = TensorView::vector(e.data(), DType::f64, n);
  label_rows("fused_linear_logprobs", a);
  for (int64_t i = 0; i < n; ++i) {
    const std::string row = "row " + std::to_string(i);
    std::vector<float> xr(x.begin() + i * v, x.begin() + (i + 1) * v);
    if (labels[i] == -100) {
      EXPECT_EQ(lse[i], 0.0) << row;
      for (int64_t j = 0; j < v; ++j) EXPECT_EQ(logits[i * v + j], 0.0f) << row;
      continue;
    }
    const Coef cf{a0[i], a1[i], b[i], c[i], e[i]};
    const Stats st = gpu_row(xr, labels[i], 0.8f, 0.0f, 4, &cf);
    expect_close(lse[i], st.lse, 2e-6, row + " lse");
    expect_close(ent[i], st.ent, 1e-5, row + " entropy");
    expect_close(mass[i], st.mass, 2e-6, row + " topk_mass");
    float gmax = 0.0f;
    for (int64_t j = 0; j < v; ++j) gmax = std::max(gmax, std::fabs(xr[j]));
    for (int64_t j = 0; j < v; ++j)
      EXPECT_LE(std::fabs(logits[i * v + j] - xr[j]), 2e-5f * gmax) << row << " entry " << j;
  }
}

// smooth_unmasked on the CPU path: the GPU's steps give the same statistics and gradient, and an
// fp64 reference over the unmasked entries U (V' = |U|) holds: mean_z = sum_U z / V', the c term
// c V / V' on U and 0 at masked entries (softcap and the entropy term on), rows with no masked
// entry, half masked, and all but the label masked.
TEST(LabelRows, SmoothingOverUnmaskedEntries) {
  for (const int64_t v : {5, 37, 1031})
    for (const float cap : {0.0f, 4.0f}) {
      const int64_t n = 5;
      const float t = 0.9f;
      std::mt19937 rng(static_cast<uint32_t>(v + 7));
      std::normal_distribution<float> normal(0.0f, 2.0f);
      std::vector<float> x(static_cast<size_t>(n * v));
      for (auto& e : x) e = normal(rng);
      std::vector<int64_t> labels = {0, 1, v - 1, 2 % v, -100};
      for (int64_t j = 1; j < v; j += 2) x[1 * v + j - 1] = -kInf;  // row 1: half (label odd)
      x[0 * v + v - 1] = -kInf;                                     // row 0: the last one
      for (int64_t j = 0; j < v; ++j)
        if (j != labels[2]) x[2 * v + j] = -kInf;  // row 2: only the label
      // row 3: none masked
      std::vector<double> lse(n), mean(n), ent(n), cnt(n, -1.0), a0(n), b(n), c(n), e(n);
      for (int64_t i = 0; i < n; ++i) {
        a0[i] = 0.4 + 0.1 * static_cast<double>(i);
        b[i] = -0.8;
        c[i] = -0.2 / static_cast<double>(v);  // eps = 0.2 over V, s = 1
        e[i] = 0.15;
      }
      std::vector<float> z = x;
      LabelRowsArgs a;
      a.logits = TensorView::matrix(z.data(), DType::f32, n, v);
      a.labels = TensorView::vector(labels.data(), DType::i64, n);
      a.temperature = t;
      a.softcap = cap;
      a.lse = TensorView::vector(lse.data(), DType::f64, n);
      a.mean_z = TensorView::vector(mean.data(), DType::f64, n);
      a.entropy = TensorView::vector(ent.data(), DType::f64, n);
      a.unmasked = TensorView::vector(cnt.data(), DType::f64, n);
      a.coef_a0 = TensorView::vector(a0.data(), DType::f64, n);
      a.coef_b = TensorView::vector(b.data(), DType::f64, n);
      a.coef_c = TensorView::vector(c.data(), DType::f64, n);
      a.coef_e = TensorView::vector(e.data(), DType::f64, n);
      a.smooth_unmasked = true;
      label_rows("fused_linear_cross_entropy", a);
      EXPECT_EQ(cnt[4], 0.0);
      for (int64_t i = 0; i < 4; ++i) {
        const std::string row =
            "V=" + std::to_string(v) + " cap=" + std::to_string(cap) + " row " + std::to_string(i);
        std::vector<float> xr(x.begin() + i * v, x.begin() + (i + 1) * v);
        const Coef cf{a0[i], 0.0, b[i], c[i], e[i]};
        const Stats st = gpu_row(xr, labels[i], t, cap, 0, &cf, /*smooth=*/true);
        EXPECT_EQ(st.unmasked, cnt[i]) << row;
        expect_close(st.lse, lse[i], 2e-6, row + " lse");
        expect_close(st.mean, mean[i], 2e-6, row + " mean_z");
        // fp64 over U.
        std::vector<double> zd(static_cast<size_t>(v), -INFINITY);
        double m = -INFINITY, sum = 0.0, vp = 0.0;
        for (int64_t j = 0; j < v; ++j) {
          const double xj = x[i * v + j];
          if (xj == -kInf) continue;
          zd[j] = (cap > 0.0f ? cap * std::tanh(xj / cap) : xj) / t;
          m = std::max(m, zd[j]);
          sum += zd[j];
          vp += 1.0;
        }
        EXPECT_EQ(cnt[i], vp) << row;
        expect_close(mean[i], sum / vp, 2e-6, row + " mean_z vs fp64");
        double s = 0.0, pz = 0.0;
        for (int64_t j = 0; j < v; ++j) s += std::exp(zd[j] - m);
        const double ref_lse = m + std::log(s);
        for (int64_t j = 0; j < v; ++j)
          if (zd[j] > -INFINITY) pz += std::exp(zd[j] - ref_lse) * (zd[j] - ref_lse);
        float gmax = 0.0f;
        for (int64_t j = 0; j < v; ++j) gmax = std::max(gmax, std::fabs(z[i * v + j]));
        for (int64_t j = 0; j < v; ++j) {
          const float got = z[i * v + j];
          EXPECT_LE(std::fabs(got - xr[j]), 2e-5f * gmax + 1e-30f) << row << " GPU steps " << j;
          if (zd[j] == -INFINITY) {
            EXPECT_EQ(got, 0.0f) << row << " masked entry " << j;
            continue;
          }
          const double p = std::exp(zd[j] - ref_lse), lp = zd[j] - ref_lse;
          double d = a0[i] * p + c[i] * static_cast<double>(v) / vp + e[i] * p * (lp - pz);
          if (j == labels[i]) d += b[i];
          const double th = cap > 0.0f ? std::tanh(x[i * v + j] / cap) : 0.0;
          d *= (1.0 - th * th) / t;
          EXPECT_LE(std::fabs(got - d), 2e-5 * (1.0 + std::fabs(d))) << row << " entry " << j;
        }
      }
      // Row 3 has no masked entry: the same bits as without smooth_unmasked.
      std::vector<float> z_off = x;
      std::vector<double> mean_off(n);
      a.logits = TensorView::matrix(z_off.data(), DType::f32, n, v);
      a.mean_z = TensorView::vector(mean_off.data(), DType::f64, n);
      a.unmasked = {};
      a.smooth_unmasked = false;
      label_rows("fused_linear_cross_entropy", a);
      EXPECT_EQ(std::memcmp(&mean_off[3], &mean[3], sizeof(double)), 0) << v;
      EXPECT_EQ(std::memcmp(z_off.data() + 3 * v, z.data() + 3 * v, v * sizeof(float)), 0) << v;
      EXPECT_EQ(mean_off[0], -kInf);  // over every entry, the masked one included
    }
}

TEST(LabelRows, BadInputNamesTheArgumentAndTheToken) {
  const int64_t n = 3, v = 4;
  std::vector<float> x(n * v, 0.0f);
  std::vector<int64_t> labels = {0, 1, 2};
  std::vector<double> out(n);
  auto args = [&] {
    LabelRowsArgs a;
    a.logits = TensorView::matrix(x.data(), DType::f32, n, v);
    a.labels = TensorView::vector(labels.data(), DType::i64, n);
    a.first_token = 10;
    return a;
  };
  const char* fn = "fused_linear_cross_entropy";
  x[1 * v + 2] = std::nanf("");
  EXPECT_EQ(error_of([&] { label_rows(fn, args()); }),
            "fused_linear_cross_entropy: the logits of token 11 (hidden @ weight^T + bias) are "
            "NaN, +inf or all -inf");
  x[1 * v + 2] = 0.0f;
  labels[2] = 4;
  EXPECT_EQ(error_of([&] { label_rows(fn, args()); }),
            "fused_linear_cross_entropy: labels[12] = 4 is out of range [0, 4) and is not "
            "ignore_index (-100)");
  labels[2] = 2;
  LabelRowsArgs a = args();
  a.lse = TensorView::vector(out.data(), DType::f64, n - 1);
  EXPECT_NE(error_of([&] { label_rows(fn, a); }).find("lse must have shape [3]"),
            std::string::npos);
  a = args();
  a.coef_a0 = TensorView::vector(out.data(), DType::f64, n);
  EXPECT_NE(error_of([&] { label_rows(fn, a); }).find("coef_a0, coef_b and coef_c"),
            std::string::npos);
  a = args();
  a.topk_mass = TensorView::vector(out.data(), DType::f64, n);
  a.topk = 5;
  EXPECT_NE(error_of([&] { label_rows(fn, a); }).find("topk must be in [1, V = 4], got 5"),
            std::string::npos);
  a = args();
  a.unmasked = TensorView::vector(out.data(), DType::f64, n - 1);
  a.smooth_unmasked = true;
  EXPECT_EQ(error_of([&] { label_rows(fn, a); }),
            "fused_linear_cross_entropy: unmasked must have shape [3], got [2]");
  std::vector<float> out32(n);
  a.unmasked = TensorView::vector(out32.data(), DType::f32, n);
  EXPECT_EQ(error_of([&] { label_rows(fn, a); }),
            "fused_linear_cross_entropy: unmasked must be float64, got float32");
  a = args();
  a.temperature = 0.0f;
  EXPECT_NE(error_of([&] { label_rows(fn, a); }).find("temperature must be finite and > 0"),
            std::string::npos);
  a = args();
  std::vector<double> x64(n * v);
  a.logits = TensorView::matrix(x64.data(), DType::f64, n, v);
  EXPECT_NE(error_of([&] { label_rows(fn, a); }).find("logits must be float32"), std::string::npos);
}

TEST(LabelRows, CudaViewsReachTheCudaPath) {
  const int64_t n = 2, v = 3;
  std::vector<float> x(n * v, 0.0f);
  std::vector<int64_t> labels = {0, 1};
  auto on_cuda = [](TensorView t) {
    t.device = Device::cuda;
    t.device_index = 0;
    return t;
  };
  LabelRowsArgs a;
  a.logits = on_cuda(TensorView::matrix(x.data(), DType::f32, n, v));
  a.labels = TensorView::vector(labels.data(), DType::i64, n);
  const std::string mixed = error_of([&] { label_rows("label_rows", a); });
  EXPECT_NE(mixed.find("label_rows: labels is on cpu but logits is on cuda:0"), std::string::npos)
      << mixed;
  a.labels = on_cuda(a.labels);
  // Host-side argument checks come first, without a read of the (fake) device pointers.
  a.topk = 9;
  std::vector<double> mass(n);
  a.topk_mass = on_cuda(TensorView::vector(mass.data(), DType::f64, n));
  const std::string checked = error_of([&] { label_rows("label_rows", a); });
  EXPECT_NE(checked.find("topk must be in [1, V = 3], got 9"), std::string::npos) << checked;
  a.topk_mass = {};
  const std::string msg = error_of([&] { label_rows("label_rows", a); });
  if (!cuda_built()) {
    EXPECT_EQ(msg, "label_rows: divkit was built without CUDA");
  } else if (cuda_device_count() == 0) {
    EXPECT_NE(msg.find("label_rows: CUDA error"), std::string::npos) << msg;
  }
}

}  // namespace
}  // namespace divkit
