// The CUDA side that can be checked without a GPU: device placement and the errors of the
// dispatch, and the scalar form of the divergence definitions (divergences_scalar.h, what the
// CUDA row kernels compute per entry) against the SIMD CPU kernels.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "divergence/divergences_scalar.h"
#include "divkit/divergence.h"
#include "divkit/ot.h"
#include "divkit/sparse.h"
#include "divkit/tensor.h"
#include "ot/sinkhorn_scalar.h"
#include "sparse/sparse_scalar.h"

namespace divkit {
namespace {

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

struct Fixture {
  std::vector<float> s, t, loss, grad;
  DivergenceOutputs out;
  Fixture() : s(6, 0.5f), t(6, 0.25f), loss(1), grad(6) {
    out.loss = TensorView::vector(loss.data(), DType::f32, 1);
  }
  TensorView student() { return TensorView::matrix(s.data(), DType::f32, 2, 3); }
  TensorView teacher() { return TensorView::matrix(t.data(), DType::f32, 2, 3); }
};

TensorView on_cuda(TensorView v, int index = 0) {
  v.device = Device::cuda;
  v.device_index = index;
  return v;
}

TEST(CudaDispatch, MixedDevicesNameTheArguments) {
  Fixture f;
  const std::string msg =
      error_of([&] { divergence(f.student(), on_cuda(f.teacher()), DivergenceSpec{}, {}, f.out); });
  EXPECT_NE(msg.find("divergence: teacher_logits is on cuda:0 but student_logits is on cpu"),
            std::string::npos)
      << msg;
  DivergenceOutputs out = f.out;
  out.loss = on_cuda(out.loss, 1);
  const std::string msg2 = error_of(
      [&] { divergence(on_cuda(f.student()), on_cuda(f.teacher()), DivergenceSpec{}, {}, out); });
  EXPECT_NE(msg2.find("loss is on cuda:1 but student_logits is on cuda:0"), std::string::npos)
      << msg2;
}

TEST(CudaDispatch, CudaViewsWithoutCuda) {
  if (cuda_built()) GTEST_SKIP() << "this build has the CUDA kernels";
  EXPECT_EQ(cuda_device_count(), 0);
  Fixture f;
  DivergenceOutputs out = f.out;
  out.loss = on_cuda(out.loss);
  const std::string msg = error_of(
      [&] { divergence(on_cuda(f.student()), on_cuda(f.teacher()), DivergenceSpec{}, {}, out); });
  EXPECT_EQ(msg, "divergence: divkit was built without CUDA");
}

TEST(CudaDispatch, CudaArgumentChecksRunBeforeAnyDeviceCall) {
  if (!cuda_built()) GTEST_SKIP() << "built without CUDA";
  // Bad shapes are reported from the host-side checks, without touching the (fake) pointers.
  Fixture f;
  DivergenceOutputs out = f.out;
  out.loss = on_cuda(out.loss);
  const TensorView wide = on_cuda(TensorView::matrix(f.t.data(), DType::f32, 3, 2));
  const std::string msg =
      error_of([&] { divergence(on_cuda(f.student()), wide, DivergenceSpec{}, {}, out); });
  EXPECT_NE(msg.find("must have the same shape"), std::string::npos) << msg;
  DivergenceSpec bad;
  bad.temperature = -1.0f;
  const std::string msg2 =
      error_of([&] { divergence(on_cuda(f.student()), on_cuda(f.teacher()), bad, {}, out); });
  EXPECT_NE(msg2.find("temperature"), std::string::npos) << msg2;
}

TEST(CudaDispatch, NoDeviceIsAnErrorNotACrash) {
  if (!cuda_built() || cuda_device_count() > 0) GTEST_SKIP() << "needs a CUDA build without GPU";
  Fixture f;
  DivergenceOutputs out = f.out;
  out.loss = on_cuda(out.loss);
  const std::string msg = error_of(
      [&] { divergence(on_cuda(f.student()), on_cuda(f.teacher()), DivergenceSpec{}, {}, out); });
  EXPECT_NE(msg.find("divergence: CUDA error"), std::string::npos) << msg;
}

TEST(CudaDispatch, SparseAndTopkDispatchOnTheDevice) {
  // Mixed devices name the arguments; CUDA views reach the CUDA path (an error without a GPU or
  // without CUDA, never a read of the fake device pointers on the host).
  Fixture f;
  std::vector<int64_t> idx = {0, 1, 2, 0};
  std::vector<float> lp = {-1.0f, -2.0f, -1.0f, -3.0f};
  const TensorView i = on_cuda(TensorView::matrix(idx.data(), DType::i64, 2, 2));
  const TensorView l = on_cuda(TensorView::matrix(lp.data(), DType::f32, 2, 2));
  SparseOutputs out;
  out.loss = f.out.loss;
  const std::string mixed =
      error_of([&] { sparse_divergence(on_cuda(f.student()), i, l, {}, {}, {}, out); });
  EXPECT_NE(mixed.find("sparse_divergence: loss is on cpu but student_logits is on cuda:0"),
            std::string::npos)
      << mixed;
  out.loss = on_cuda(out.loss);
  const std::string sparse_msg =
      error_of([&] { sparse_divergence(on_cuda(f.student()), i, l, {}, {}, {}, out); });
  const std::string topk_msg = error_of(
      [&] { topk_divergence(on_cuda(f.student()), on_cuda(f.teacher()), 2, {}, {}, out); });
  if (!cuda_built()) {
    EXPECT_EQ(sparse_msg, "sparse_divergence: divkit was built without CUDA");
    EXPECT_EQ(topk_msg, "topk_divergence: divkit was built without CUDA");
  } else if (cuda_device_count() == 0) {
    EXPECT_NE(sparse_msg.find("sparse_divergence: CUDA error"), std::string::npos) << sparse_msg;
    EXPECT_NE(topk_msg.find("topk_divergence: CUDA error"), std::string::npos) << topk_msg;
  }
  if (cuda_built()) {  // host-side argument checks come first
    const std::string msg = error_of(
        [&] { topk_divergence(on_cuda(f.student()), on_cuda(f.teacher()), 4, {}, {}, out); });
    EXPECT_NE(msg.find("topk_divergence: k must be in [1, V = 3], got 4"), std::string::npos)
        << msg;
  }
}

// ---- the scalar definitions against the SIMD kernels ---------------------------------------

struct ScalarRow {
  double value = 0.0;
  std::vector<float> gs, gt;
};

template <class Div>
ScalarRow scalar_sum_row(const Div& div, const float* s, const float* t, int v, float temp) {
  const scalar_ops::Lane d;
  const float inv_t = 1.0f / temp;
  auto lse = [&](const float* x, float& mx) {
    mx = -kInfinityF;
    for (int j = 0; j < v; ++j) mx = std::max(mx, x[j]);
    double sum = 0.0;
    for (int j = 0; j < v; ++j) sum += std::exp(double(x[j] - mx) * inv_t);
    return std::log(sum);
  };
  float ms, mt;
  const double ls = lse(s, ms), lt = lse(t, mt);
  const float lss = float(ls), lts = float(lt), diff = float(lt - ls);
  const float izs = float(std::exp(-ls)), izt = float(std::exp(-lt));
  std::vector<scalar::Entry<float>> es(v);
  for (int j = 0; j < v; ++j) {
    const float cs = s[j] - ms, ct = t[j] - mt;
    es[j].q = expf(cs * inv_t) * izs;
    es[j].p = expf(ct * inv_t) * izt;
    es[j].lq = fmaf(cs, inv_t, -lss);
    es[j].lp = fmaf(ct, inv_t, -lts);
    es[j].lr = fmaf(ct - cs, inv_t, -diff);
  }
  ScalarRow r;
  if constexpr (std::is_same_v<Div, scalar::Renyi>) {
    double sw = 0.0;
    for (int j = 0; j < v; ++j) sw += std::exp(double(div.alpha) * es[j].lr + es[j].lq);
    r.value = std::log(sw) / (double(div.alpha) - 1.0);
    return r;
  } else {
    double g = 0.0, su = 0.0, sv = 0.0;
    std::vector<float> u(v), w(v);
    for (int j = 0; j < v; ++j) {
      g += div.term(d, es[j], u[j]);
      w[j] = div.teacher(d, es[j]);
      su += u[j];
      sv += w[j];
    }
    r.value = g;
    r.gs.resize(v);
    r.gt.resize(v);
    for (int j = 0; j < v; ++j) {
      r.gs[j] = float((u[j] - es[j].q * su) / temp);
      r.gt[j] = float((w[j] - es[j].p * sv) / temp);
    }
    return r;
  }
}

ScalarRow scalar_row(const DivergenceSpec& spec, const float* s, const float* t, int v) {
  using K = DivergenceKind;
  const float T = spec.temperature;
  switch (spec.kind) {
    case K::forward_kl: return scalar_sum_row(scalar::ForwardKL(spec), s, t, v, T);
    case K::reverse_kl: return scalar_sum_row(scalar::ReverseKL(spec), s, t, v, T);
    case K::jsd: return scalar_sum_row(scalar::GeneralizedJSD(spec), s, t, v, T);
    case K::skew_forward_kl: return scalar_sum_row(scalar::SkewForwardKL(spec), s, t, v, T);
    case K::skew_reverse_kl: return scalar_sum_row(scalar::SkewReverseKL(spec), s, t, v, T);
    case K::tvd: return scalar_sum_row(scalar::TotalVariation(spec), s, t, v, T);
    case K::hellinger: return scalar_sum_row(scalar::Hellinger(spec), s, t, v, T);
    case K::jeffreys: return scalar_sum_row(scalar::Jeffreys(spec), s, t, v, T);
    case K::chi2: return scalar_sum_row(scalar::ChiSquared(spec), s, t, v, T);
    case K::alpha_divergence: return scalar_sum_row(scalar::AlphaDivergence(spec), s, t, v, T);
    case K::renyi: return scalar_sum_row(scalar::Renyi(spec), s, t, v, T);
    case K::cross_entropy: return scalar_sum_row(scalar::CrossEntropy(spec), s, t, v, T);
  }
  return {};
}

TEST(ScalarDefinitions, MatchTheSimdKernelsForEveryKind) {
  const int n = 5, v = 777;
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::vector<float> s(n * v), t(n * v);
  for (auto& x : s) x = normal(rng);
  for (auto& x : t) x = normal(rng);
  for (int k = 0; k < kNumDivergenceKinds; ++k) {
    DivergenceSpec spec;
    spec.kind = static_cast<DivergenceKind>(k);
    spec.beta = 0.3f;
    spec.alpha = spec.kind == DivergenceKind::alpha_divergence ? 0.7f
                 : spec.kind == DivergenceKind::renyi          ? 1.6f
                                                               : 0.2f;
    spec.temperature = 1.5f;
    std::vector<float> loss(n), gs(n * v), gt(n * v);
    DivergenceOptions options;
    options.reduction = Reduction::none;
    DivergenceOutputs out;
    out.loss = TensorView::vector(loss.data(), DType::f32, n);
    out.grad_student = TensorView::matrix(gs.data(), DType::f32, n, v);
    out.grad_teacher = TensorView::matrix(gt.data(), DType::f32, n, v);
    divergence(TensorView::matrix(s.data(), DType::f32, n, v),
               TensorView::matrix(t.data(), DType::f32, n, v), spec, options, out);
    for (int i = 0; i < n; ++i) {
      const ScalarRow r = scalar_row(spec, s.data() + i * v, t.data() + i * v, v);
      const std::string what =
          std::string(divergence_kind_name(spec.kind)) + " row " + std::to_string(i);
      EXPECT_NEAR(r.value, loss[i], 2e-5 * std::fabs(r.value) + 1e-6) << what;
      if (r.gs.empty()) continue;
      double gmax = 0.0;
      for (int j = 0; j < v; ++j) gmax = std::max(gmax, double(std::fabs(gs[i * v + j])));
      for (int j = 0; j < v; ++j) {
        ASSERT_NEAR(r.gs[j], gs[i * v + j], 1e-4 * gmax + 1e-7) << what << " student col " << j;
        ASSERT_NEAR(r.gt[j], gt[i * v + j], 1e-4 * gmax + 1e-7) << what << " teacher col " << j;
      }
    }
  }
}

// ---- the sparse / top-k row of the CUDA kernel (sparse_cuda.cu), run on the host ------------

namespace ss = sparse_scalar;

// The top-k selection of sparse_cuda.cu's select_topk, serially: the radix passes on
// order_key with radix_pick, then the keys above the threshold and the lowest-index ties.
std::vector<int64_t> radix_topk(const float* x, int64_t v, int64_t k) {
  uint32_t prefix = 0, mask = 0;
  int64_t remaining = k;
  for (int shift = 24; shift >= 0; shift -= 8) {
    uint32_t hist[256] = {};
    for (int64_t j = 0; j < v; ++j) {
      const uint32_t key = ss::order_key(x[j]);
      if ((key & mask) == prefix) ++hist[(key >> shift) & 255u];
    }
    prefix |= ss::radix_pick(hist, remaining) << shift;
    mask |= 255u << shift;
  }
  std::vector<int64_t> idx;
  int64_t taken_eq = 0;
  for (int64_t j = 0; j < v; ++j) {
    const uint32_t key = ss::order_key(x[j]);
    if (key > prefix || (key == prefix && taken_eq++ < remaining)) idx.push_back(j);
  }
  return idx;
}

struct SparseRow {
  double value = 0.0;
  std::vector<float> grad;  // [v]
};

// One row as sparse_cuda.cu's run_row computes it (grad_scale 1), serially in bucket order.
template <class Div>
SparseRow sparse_row(const Div& div, const float* s, int64_t v, std::vector<int64_t> idx,
                     std::vector<double> lp, bool has_tail, double temperature) {
  const int64_t k = static_cast<int64_t>(idx.size());
  const float inv_t = 1.0f / static_cast<float>(temperature);
  float smax = -kInfinityF;
  for (int64_t j = 0; j < v; ++j) smax = std::max(smax, s[j]);
  std::vector<float> xk(k);
  std::vector<char> member(v, 0);
  double mp = -ss::kInfD;
  for (int64_t b = 0; b < k; ++b) {
    xk[b] = s[idx[b]];
    member[idx[b]] = 1;
    mp = std::max(mp, lp[b]);
  }
  double lse_p = -ss::kInfD;
  if (mp > -ss::kInfD) {
    double acc = 0.0;
    for (int64_t b = 0; b < k; ++b) acc += std::exp(lp[b] - mp);
    lse_p = mp + std::log(acc);
  }
  double z_tail = 0.0;
  float ref = smax;
  if (has_tail) {
    for (int64_t j = 0; j < v; ++j)
      if (!member[j]) z_tail += ss::tail_exp(s[j], smax, inv_t);
  } else {
    ref = *std::max_element(xk.begin(), xk.end());
  }
  std::vector<double> lq(k + 1), q(k + 1), u(k + 1);
  lp.resize(k + 1);
  double zt = 0.0;
  for (int64_t b = 0; b < k; ++b) {
    lq[b] = (static_cast<double>(xk[b]) - ref) / temperature;
    zt += std::exp(lq[b]);
  }
  const double z = zt + z_tail, log_z = std::log(z);
  for (int64_t b = 0; b < k; ++b) {
    lq[b] -= log_z;
    q[b] = std::exp(lq[b]);
    lp[b] = ss::teacher_lp(lp[b], lse_p, has_tail);
  }
  const int64_t nb = has_tail ? k + 1 : k;
  if (has_tail) {
    lq[k] = ss::student_tail_lq(z_tail, log_z);
    q[k] = z_tail / z;
    lp[k] = ss::teacher_tail_lp(lse_p);
  }
  SparseRow r;
  double sum_u = 0.0;
  if constexpr (std::is_same_v<Div, scalar::Renyi>) {
    double s1 = 0.0, amax = -ss::kInfD, w = 0.0;
    for (int64_t b = 0; b < nb; ++b) {
      s1 += ss::renyi_bucket_term(div, lp[b], lq[b], q[b]);
      lp[b] = ss::renyi_log_w(div.alpha, lp[b], lq[b]);
      amax = std::max(amax, lp[b]);
    }
    for (int64_t b = 0; b < nb; ++b) w += std::exp(lp[b] - amax);
    const double log_sum_w = ss::renyi_log_sum_w(s1, amax, w);
    r.value = log_sum_w / (double(div.alpha) - 1.0);
    for (int64_t b = 0; b < nb; ++b) {
      u[b] = -std::exp(lp[b] - log_sum_w);
      sum_u += u[b];
    }
  } else {
    double g = 0.0;
    for (int64_t b = 0; b < nb; ++b) {
      float ub;
      g += ss::bucket_term(div, lp[b], lq[b], q[b], ub);
      u[b] = ub;
      sum_u += ub;
    }
    r.value = ss::finish_sum(g, sum_u);
  }
  // As the kernel: an infinite (or beyond-fp32) row value gives loss +inf and no gradient.
  if (!(std::fabs(r.value) <= ss::kFltMax)) {
    r.value = ss::kInfD;
    r.grad.assign(v, 0.0f);
    return r;
  }
  const double scale = 1.0 / temperature;
  const float c = has_tail ? ss::tail_factor(scale, u[k], z_tail, sum_u, z) : 0.0f;
  r.grad.assign(v, 0.0f);
  for (int64_t j = 0; j < v; ++j)
    if (has_tail && !member[j]) r.grad[j] = ss::tail_exp(s[j], smax, inv_t) * c;
  for (int64_t b = 0; b < k; ++b) r.grad[idx[b]] = ss::top_grad(scale, u[b], q[b], sum_u);
  return r;
}

SparseRow sparse_row_of(const DivergenceSpec& spec, const float* s, int64_t v,
                        std::vector<int64_t> idx, std::vector<double> lp, bool has_tail) {
  using K = DivergenceKind;
  const double T = spec.temperature;
  auto run = [&](const auto& div) { return sparse_row(div, s, v, idx, lp, has_tail, T); };
  switch (spec.kind) {
    case K::forward_kl: return run(scalar::ForwardKL(spec));
    case K::reverse_kl: return run(scalar::ReverseKL(spec));
    case K::jsd: return run(scalar::GeneralizedJSD(spec));
    case K::skew_forward_kl: return run(scalar::SkewForwardKL(spec));
    case K::skew_reverse_kl: return run(scalar::SkewReverseKL(spec));
    case K::tvd: return run(scalar::TotalVariation(spec));
    case K::hellinger: return run(scalar::Hellinger(spec));
    case K::jeffreys: return run(scalar::Jeffreys(spec));
    case K::chi2: return run(scalar::ChiSquared(spec));
    case K::alpha_divergence: return run(scalar::AlphaDivergence(spec));
    case K::renyi: return run(scalar::Renyi(spec));
    case K::cross_entropy: return run(scalar::CrossEntropy(spec));
  }
  return {};
}

DivergenceSpec spec_of(int kind) {
  DivergenceSpec spec;
  spec.kind = static_cast<DivergenceKind>(kind);
  spec.beta = 0.3f;
  spec.alpha = spec.kind == DivergenceKind::alpha_divergence ? 0.7f
               : spec.kind == DivergenceKind::renyi          ? 1.6f
                                                             : 0.2f;
  spec.temperature = 1.5f;
  return spec;
}

void expect_rows(const SparseRow& r, const float* loss, const float* grad, int64_t v,
                 const std::string& what) {
  if (std::isinf(r.value)) EXPECT_EQ(r.value, *loss) << what;
  else EXPECT_NEAR(r.value, *loss, 2e-5 * std::fabs(r.value) + 1e-6) << what;
  double gmax = 0.0;
  for (int64_t j = 0; j < v; ++j) gmax = std::max(gmax, double(std::fabs(grad[j])));
  for (int64_t j = 0; j < v; ++j)
    ASSERT_NEAR(r.grad[j], grad[j], 1e-4 * gmax + 1e-7) << what << " col " << j;
}

TEST(SparseScalar, MatchesTheSimdKernelsForEveryKindAndTail) {
  const int64_t n = 4, v = 333, k = 9;
  std::mt19937 rng(11);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::vector<float> s(n * v);
  for (auto& x : s) x = normal(rng);
  std::vector<int64_t> idx(n * k);
  std::vector<double> lp(n * k);
  for (int64_t i = 0; i < n; ++i) {
    std::vector<int64_t> perm(v);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    // Teacher log-probabilities of a distribution over the vocabulary: the top k of a softmax.
    std::vector<double> logits(v);
    double mx = -1e300, acc = 0.0;
    for (auto& x : logits) mx = std::max(mx, x = 1.5 * normal(rng));
    for (double x : logits) acc += std::exp(x - mx);
    double acc_k = 0.0;  // the k entries' share of the mass
    for (int64_t b = 0; b < k; ++b) acc_k += std::exp(logits[perm[b]] - mx);
    for (int64_t b = 0; b < k; ++b) {
      idx[i * k + b] = perm[b];
      // Row 3: the k probabilities sum to exp(0.005) > 1 (server rounding): bucket mode scales
      // them to 1 and gives the tail nothing.
      lp[i * k + b] = i == 3 ? logits[perm[b]] - mx - std::log(acc_k) + 0.005
                             : logits[perm[b]] - mx - std::log(acc);
    }
    if (i == 2) lp[i * k + 4] = -ss::kInfD;  // a teacher entry of probability 0
  }
  for (int kind = 0; kind < kNumDivergenceKinds; ++kind) {
    const DivergenceSpec spec = spec_of(kind);
    for (SparseTail tail : {SparseTail::renormalize, SparseTail::bucket}) {
      const int64_t rows = n;
      std::vector<float> loss(rows), grad(rows * v);
      DivergenceOptions options;
      options.reduction = Reduction::none;
      SparseOutputs out;
      out.loss = TensorView::vector(loss.data(), DType::f32, rows);
      out.grad_student = TensorView::matrix(grad.data(), DType::f32, rows, v);
      SparseOptions so;
      so.tail = tail;
      sparse_divergence(TensorView::matrix(s.data(), DType::f32, rows, v),
                        TensorView::matrix(idx.data(), DType::i64, rows, k),
                        TensorView::matrix(lp.data(), DType::f64, rows, k), spec, so, options, out);
      for (int64_t i = 0; i < rows; ++i) {
        const SparseRow r = sparse_row_of(spec, s.data() + i * v, v,
                                          {idx.begin() + i * k, idx.begin() + (i + 1) * k},
                                          {lp.begin() + i * k, lp.begin() + (i + 1) * k},
                                          tail == SparseTail::bucket);
        expect_rows(r, &loss[i], grad.data() + i * v, v,
                    std::string(divergence_kind_name(spec.kind)) + " " + sparse_tail_name(tail) +
                        " row " + std::to_string(i));
      }
    }
  }
}

TEST(SparseScalar, RadixSelectIsTheCpuSelection) {
  // Ties (repeated values, +0 and -0, -inf entries) go to the lowest index, as the CPU heap.
  std::mt19937 rng(5);
  std::uniform_int_distribution<int> small(-3, 3);
  const int64_t v = 200;
  for (int trial = 0; trial < 20; ++trial) {
    std::vector<float> x(v);
    for (auto& e : x) e = 0.5f * static_cast<float>(small(rng));
    x[7] = -0.0f;
    x[11] = -kInfinityF;
    x[12] = -kInfinityF;
    for (int64_t k : {int64_t{1}, int64_t{5}, int64_t{37}, int64_t{199}, v}) {
      std::vector<int64_t> order(v);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(),
                       [&](int64_t a, int64_t b) { return x[a] > x[b]; });
      std::vector<int64_t> want(order.begin(), order.begin() + k);
      std::sort(want.begin(), want.end());
      EXPECT_EQ(radix_topk(x.data(), v, k), want) << "trial " << trial << " k " << k;
    }
  }
}

TEST(SparseScalar, TopkRowMatchesTheSimdKernelForEveryKind) {
  const int64_t n = 3, v = 501, k = 17;
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::vector<float> s(n * v), t(n * v);
  for (auto& x : s) x = normal(rng);
  for (auto& x : t) x = std::round(4.0f * normal(rng)) / 4.0f;  // ties in the selection
  for (int kind = 0; kind < kNumDivergenceKinds; ++kind) {
    const DivergenceSpec spec = spec_of(kind);
    std::vector<float> loss(n), grad(n * v);
    DivergenceOptions options;
    options.reduction = Reduction::none;
    SparseOutputs out;
    out.loss = TensorView::vector(loss.data(), DType::f32, n);
    out.grad_student = TensorView::matrix(grad.data(), DType::f32, n, v);
    topk_divergence(TensorView::matrix(s.data(), DType::f32, n, v),
                    TensorView::matrix(t.data(), DType::f32, n, v), k, spec, options, out);
    for (int64_t i = 0; i < n; ++i) {
      const float* ti = t.data() + i * v;
      const std::vector<int64_t> idx = radix_topk(ti, v, k);
      const float tmax = *std::max_element(ti, ti + v);
      std::vector<double> lp(k);
      for (int64_t b = 0; b < k; ++b)
        lp[b] = (static_cast<double>(ti[idx[b]]) - tmax) / spec.temperature;
      const SparseRow r = sparse_row_of(spec, s.data() + i * v, v, idx, lp, false);
      expect_rows(r, &loss[i], grad.data() + i * v, v,
                  std::string(divergence_kind_name(spec.kind)) + " topk row " + std::to_string(i));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Sinkhorn: the CUDA solver's steps (sinkhorn_cuda.cu) on the host with the per-entry math of
// ot/sinkhorn_scalar.h, in the kernels' order (each of kThreads threads keeps an online
// log-sum-exp of the columns j = t, t + kThreads, ...; the block combines the threads in order),
// against the CPU solver in float64.

namespace os = ot_scalar;
constexpr int kSkThreads = 256;  // cuda_common::kThreads

TensorView sk_view3(void* p, DType dt, int64_t b, int64_t n, int64_t d) {
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

// B problems: points x [B][n][d], y [B][m][d] (d > 0) or a cost [B][n][m] (d = 0); weights.
struct SkProblem {
  int64_t B = 1, n = 0, m = 0, d = 0;
  std::vector<double> x, y, cost, a, b;
};
struct SkResult {
  std::vector<double> f, g, plan, gx, gy, ga, gb;
  std::vector<SinkhornStats> st;
};

// The cost of row i of one side against column j (the CUDA tiles: direct differences).
double sk_cost(const SkProblem& P, int64_t b, bool rows_side, int64_t i, int64_t j, int p) {
  if (P.d == 0)
    return rows_side ? P.cost[(b * P.n + i) * P.m + j] : P.cost[(b * P.n + j) * P.m + i];
  const double* xi = rows_side ? &P.x[(b * P.n + i) * P.d] : &P.y[(b * P.m + i) * P.d];
  const double* yj = rows_side ? &P.y[(b * P.m + j) * P.d] : &P.x[(b * P.n + j) * P.d];
  double acc = 0.0;
  for (int64_t k = 0; k < P.d; ++k) acc = os::cost_step(acc, xi[k], yj[k]);
  return os::cost_finish(acc, p);
}

// LSE_j (h_j - C_ij / eps) as lse_kernel computes it.
double sk_lse(const SkProblem& P, int64_t b, bool rows_side, int64_t i, int64_t nc,
              const std::vector<double>& h, double inv_eps, int p) {
  double mx[kSkThreads], sm[kSkThreads];
  for (int t = 0; t < kSkThreads; ++t) {
    mx[t] = -INFINITY;
    sm[t] = 0.0;
    for (int64_t j = t; j < nc; j += kSkThreads)
      os::lse_push(mx[t], sm[t], os::z_entry(h[j], sk_cost(P, b, rows_side, i, j, p), inv_eps));
  }
  double M = mx[0];
  for (int t = 1; t < kSkThreads; ++t) M = std::max(M, mx[t]);
  double S = 0.0;
  for (int t = 0; t < kSkThreads; ++t) S += os::lse_rescale(mx[t], sm[t], M);
  return M + std::log(S);
}

SkResult sk_scalar(const SkProblem& P, const SinkhornOptions& opt) {
  const int64_t n = P.n, m = P.m, d = P.d;
  const bool bal_a = std::isinf(opt.rho_a), bal_b = std::isinf(opt.rho_b), sym = opt.symmetric;
  SkResult R;
  R.f.resize(P.B * n);
  R.g.resize(P.B * m);
  R.plan.resize(P.B * n * m);
  R.gx.resize(P.B * n * d);
  R.gy.resize(P.B * m * d);
  R.ga.resize(P.B * n);
  R.gb.resize(P.B * m);
  for (int64_t b = 0; b < P.B; ++b) {
    std::vector<double> a(P.a.begin() + b * n, P.a.begin() + (b + 1) * n);
    std::vector<double> w(P.b.begin() + b * m, P.b.begin() + (b + 1) * m);
    std::vector<double> la(n), lb(m);
    double ma = 0.0, mb = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      la[i] = a[i] > 0 ? std::log(a[i]) : -INFINITY;
      ma += a[i];
    }
    for (int64_t j = 0; j < m; ++j) {
      lb[j] = w[j] > 0 ? std::log(w[j]) : -INFINITY;
      mb += w[j];
    }
    double scale = 0.0;
    if (d > 0) {
      for (int64_t k = 0; k < d; ++k) {
        double lo = INFINITY, hi = -INFINITY;
        for (int64_t i = 0; i < n; ++i) {
          lo = std::min(lo, P.x[(b * n + i) * d + k]);
          hi = std::max(hi, P.x[(b * n + i) * d + k]);
        }
        for (int64_t j = 0; j < m; ++j) {
          lo = std::min(lo, P.y[(b * m + j) * d + k]);
          hi = std::max(hi, P.y[(b * m + j) * d + k]);
        }
        scale += (hi - lo) * (hi - lo);
      }
      if (opt.p == 1) scale = std::sqrt(scale);
    } else {
      for (int64_t e = 0; e < n * m; ++e) scale = std::max(scale, std::abs(P.cost[b * n * m + e]));
    }
    std::vector<double> stages;
    if (opt.eps_scaling > 0)
      for (double e = scale; e > opt.eps && stages.size() < 200; e *= opt.eps_scaling)
        stages.push_back(e);
    const int64_t nst = static_cast<int64_t>(stages.size());
    std::vector<double> f(n, 0.0), g(m, 0.0), fnew(n), hm(m), hn(n);
    SinkhornStats st;
    double err = INFINITY;
    for (int64_t it = 0; it < opt.max_iter; ++it) {
      const double e = it < nst ? stages[it] : opt.eps;
      for (int64_t j = 0; j < m; ++j) hm[j] = os::h_entry(lb[j], g[j], e);
      const double ta = os::tau(bal_a, opt.rho_a, e);
      for (int64_t i = 0; i < n; ++i)
        fnew[i] = os::potential(sk_lse(P, b, true, i, m, hm, 1.0 / e, opt.p), ta, e);
      const int64_t k = it - nst;
      const bool check = (sym ? k >= 0 : k >= 1) && k % opt.check_every == 0;
      bool done = false;
      if (check) {
        double res = 0.0;
        for (int64_t i = 0; i < n; ++i) res += os::residual_term(a[i], f[i], fnew[i], opt.eps);
        err = res;
        done = res <= opt.tol;
      }
      if (sym) {
        if (!done) {
          for (int64_t i = 0; i < n; ++i) f[i] = g[i] = os::average(f[i], fnew[i]);
          ++st.n_iter;
        }
      } else {
        f = fnew;
        ++st.n_iter;
        for (int64_t i = 0; i < n; ++i) hn[i] = os::h_entry(la[i], f[i], e);
        const double tb = os::tau(bal_b, opt.rho_b, e);
        for (int64_t j = 0; j < m; ++j)
          g[j] = os::potential(sk_lse(P, b, false, j, n, hn, 1.0 / e, opt.p), tb, e);
      }
      if (done) {
        st.converged = true;
        break;
      }
    }
    // The final pass (plan_kernel on both sides, then finish_kernel).
    const double eps = opt.eps, inv_eps = 1.0 / eps;
    auto pass = [&](bool rows_side, const std::vector<double>& pot, const std::vector<double>& wr,
                    const std::vector<double>& lw_o, const std::vector<double>& pot_o,
                    std::vector<double>& S, double* G, double* plan, double& tc) {
      const int64_t nr = rows_side ? n : m, nc = rows_side ? m : n;
      std::vector<double> h(nc);
      for (int64_t j = 0; j < nc; ++j) h[j] = os::h_entry(lw_o[j], pot_o[j], eps);
      S.assign(nr, 0.0);
      tc = 0.0;
      for (int64_t i = 0; i < nr; ++i) {
        const double hr = pot[i] / eps;
        double se = 0.0, sc = 0.0;
        for (int64_t j = 0; j < nc; ++j) {
          const double c = sk_cost(P, b, rows_side, i, j, opt.p);
          const double e = os::plan_entry(os::z_entry(h[j], c, inv_eps), hr);
          se += e;
          sc = std::fma(e, c, sc);
          if (plan) plan[i * nc + j] = wr[i] * e;
          const double wv = os::grad_weight(e, c, opt.p);
          for (int64_t k = 0; k < d; ++k) {
            const double xk = rows_side ? P.x[(b * n + i) * d + k] : P.y[(b * m + i) * d + k];
            const double yk = rows_side ? P.y[(b * m + j) * d + k] : P.x[(b * n + j) * d + k];
            G[i * d + k] += wv * (xk - yk);
          }
        }
        for (int64_t k = 0; k < d; ++k) G[i * d + k] *= os::grad_coeff(wr[i], opt.p);
        S[i] = se;
        tc += wr[i] * sc;
      }
    };
    std::vector<double> Sr, Sc;
    double tc = 0.0, tc_cols = 0.0;
    pass(true, f, a, lb, g, Sr, R.gx.data() + b * n * d, R.plan.data() + b * n * m, tc);
    pass(false, g, w, la, f, Sc, R.gy.data() + b * m * d, nullptr, tc_cols);
    double mass = 0.0, rerr = 0.0, Fa = 0.0, Fb = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      mass += a[i] * Sr[i];
      rerr += std::abs(a[i] * Sr[i] - a[i]);
      Fa += os::dual_term(a[i], f[i], bal_a, opt.rho_a);
      R.f[b * n + i] = f[i];
      R.ga[b * n + i] = os::dual_grad(f[i], bal_a, opt.rho_a) - eps * (Sr[i] - mb);
    }
    for (int64_t j = 0; j < m; ++j) {
      Fb += os::dual_term(w[j], g[j], bal_b, opt.rho_b);
      R.g[b * m + j] = g[j];
      R.gb[b * m + j] = os::dual_grad(g[j], bal_b, opt.rho_b) - eps * (Sc[j] - ma);
    }
    st.transport_cost = tc;
    st.mass = mass;
    if (!std::isfinite(err) && !st.converged) err = INFINITY;
    st.marginal_error = (bal_a && bal_b) ? rerr : err;
    if (bal_a && bal_b && !st.converged && opt.tol > 0 && rerr <= opt.tol) st.converged = true;
    st.reg_cost = Fa + Fb - eps * (mass - ma * mb);
    R.st.push_back(st);
  }
  return R;
}

// The CPU solver on the same problem, float64, every output asked for.
SkResult sk_cpu(SkProblem P, const SinkhornOptions& opt) {
  const int64_t B = P.B, n = P.n, m = P.m, d = P.d;
  SkResult R;
  R.f.resize(B * n);
  R.g.resize(B * m);
  R.plan.resize(B * n * m);
  R.ga.resize(B * n);
  R.gb.resize(B * m);
  SinkhornInputs in;
  SinkhornOutputs out;
  if (d > 0) {
    in.x = sk_view3(P.x.data(), DType::f64, B, n, d);
    in.y = sk_view3(P.y.data(), DType::f64, B, m, d);
    R.gx.resize(B * n * d);
    R.gy.resize(B * m * d);
    out.grad_x = sk_view3(R.gx.data(), DType::f64, B, n, d);
    out.grad_y = sk_view3(R.gy.data(), DType::f64, B, m, d);
  } else {
    in.cost = sk_view3(P.cost.data(), DType::f64, B, n, m);
  }
  in.a = TensorView::matrix(P.a.data(), DType::f64, B, n);
  in.b = TensorView::matrix(P.b.data(), DType::f64, B, m);
  out.f = TensorView::matrix(R.f.data(), DType::f64, B, n);
  out.g = TensorView::matrix(R.g.data(), DType::f64, B, m);
  out.plan = sk_view3(R.plan.data(), DType::f64, B, n, m);
  out.grad_a = TensorView::matrix(R.ga.data(), DType::f64, B, n);
  out.grad_b = TensorView::matrix(R.gb.data(), DType::f64, B, m);
  R.st = sinkhorn(in, opt, out);
  return R;
}

double sk_rel(const std::vector<double>& u, const std::vector<double>& v) {
  double e = 0.0, s = 0.0;
  for (size_t i = 0; i < u.size(); ++i) {
    e = std::max(e, std::abs(u[i] - v[i]));
    s = std::max(s, std::abs(v[i]));
  }
  return e / std::max(s, 1e-300);
}

SkProblem sk_points(int64_t B, int64_t n, int64_t m, int64_t d, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::uniform_real_distribution<double> unif(0.2, 1.0);
  SkProblem P;
  P.B = B;
  P.n = n;
  P.m = m;
  P.d = d;
  P.x.resize(B * n * d);
  P.y.resize(B * m * d);
  for (auto& v : P.x) v = normal(rng);
  for (auto& v : P.y) v = normal(rng) + 0.5;
  P.a.resize(B * n);
  P.b.resize(B * m);
  for (int64_t b = 0; b < B; ++b) {
    double sa = 0.0, sb = 0.0;
    for (int64_t i = 0; i < n; ++i) sa += P.a[b * n + i] = unif(rng);
    for (int64_t j = 0; j < m; ++j) sb += P.b[b * m + j] = unif(rng);
    for (int64_t i = 0; i < n; ++i) P.a[b * n + i] /= sa;
    for (int64_t j = 0; j < m; ++j) P.b[b * m + j] /= sb;
  }
  return P;
}

void sk_expect_close(const SkProblem& P, const SinkhornOptions& opt, double tol,
                     const std::string& what) {
  const SkResult s = sk_scalar(P, opt);
  const SkResult c = sk_cpu(P, opt);
  ASSERT_EQ(s.st.size(), c.st.size());
  for (size_t b = 0; b < c.st.size(); ++b) {
    const SinkhornStats &u = s.st[b], &v = c.st[b];
    const std::string at = what + " problem " + std::to_string(b);
    EXPECT_NEAR(u.reg_cost, v.reg_cost, tol * std::max(1.0, std::abs(v.reg_cost))) << at;
    EXPECT_NEAR(u.transport_cost, v.transport_cost, tol * std::max(1.0, std::abs(v.transport_cost)))
        << at;
    EXPECT_NEAR(u.mass, v.mass, tol * std::max(1.0, std::abs(v.mass))) << at;
    EXPECT_EQ(u.converged, v.converged) << at;
    EXPECT_EQ(u.n_iter, v.n_iter) << at;
    EXPECT_NEAR(u.marginal_error, v.marginal_error, std::max(tol, 1e-3 * v.marginal_error)) << at;
  }
  EXPECT_LE(sk_rel(s.f, c.f), tol) << what << " f";
  EXPECT_LE(sk_rel(s.g, c.g), tol) << what << " g";
  EXPECT_LE(sk_rel(s.plan, c.plan), tol) << what << " plan";
  EXPECT_LE(sk_rel(s.ga, c.ga), tol) << what << " grad a";
  EXPECT_LE(sk_rel(s.gb, c.gb), tol) << what << " grad b";
  if (P.d > 0) {
    EXPECT_LE(sk_rel(s.gx, c.gx), tol) << what << " grad x";
    EXPECT_LE(sk_rel(s.gy, c.gy), tol) << what << " grad y";
  }
}

SinkhornOptions sk_options(double eps) {
  SinkhornOptions o;
  o.eps = eps;
  o.tol = 1e-9;
  o.max_iter = 3000;
  o.cost_cache_bytes = 0;  // the CPU's log-domain iterations (no kernel domain)
  return o;
}

TEST(SinkhornScalar, PointsMatchTheCpuSolver) {
  // m > kThreads: several columns per thread; d = 12 > 8: the CPU's expanded cost.
  for (int p : {1, 2})
    for (int64_t d : {3, 12}) {
      SinkhornOptions o = sk_options(0.4);
      o.p = p;
      sk_expect_close(sk_points(1, 37, 300, d, 7 + p), o, 1e-9,
                      "p " + std::to_string(p) + " d " + std::to_string(d));
    }
}

TEST(SinkhornScalar, BatchScalingCheckEveryAndZeroWeights) {
  SkProblem P = sk_points(3, 41, 29, 2, 11);
  P.b[5] = 0.0;  // a zero weight: h = kHugeNeg, its column of the plan is 0
  double s = 0.0;
  for (int64_t j = 0; j < P.m; ++j) s += P.b[j];
  for (int64_t j = 0; j < P.m; ++j) P.b[j] /= s;
  SinkhornOptions o = sk_options(0.05);
  o.eps_scaling = 0.5;
  o.check_every = 3;
  sk_expect_close(P, o, 1e-9, "batch");
  o.max_iter = 7;  // stops unconverged inside or right after the stages
  sk_expect_close(P, o, 1e-9, "unconverged");
}

TEST(SinkhornScalar, UnbalancedAndSymmetric) {
  SkProblem P = sk_points(2, 50, 33, 3, 13);
  for (auto& v : P.b) v *= 1.7;  // unequal masses: unbalanced only
  SinkhornOptions o = sk_options(0.3);
  o.rho_a = 1.0;
  o.rho_b = 2.5;
  sk_expect_close(P, o, 1e-9, "unbalanced");
  SkProblem S = sk_points(2, 45, 45, 3, 17);
  S.y = S.x;
  S.b = S.a;
  SinkhornOptions os = sk_options(0.1);
  os.symmetric = true;
  sk_expect_close(S, os, 1e-9, "symmetric");
}

TEST(SinkhornScalar, GivenCostMatchesTheCpuSolver) {
  SkProblem P = sk_points(2, 30, 270, 0, 19);
  std::mt19937 rng(23);
  std::uniform_real_distribution<double> unif(0.0, 2.0);
  P.cost.resize(P.B * P.n * P.m);
  for (auto& v : P.cost) v = unif(rng);
  sk_expect_close(P, sk_options(0.2), 1e-9, "cost");
}

TEST(SinkhornScalar, OnlineLogSumExpIsExactForExtremeEntries) {
  // An entry far below the running max, the first entry, and an empty thread.
  double m = -INFINITY, s = 0.0;
  os::lse_push(m, s, -1e300);
  os::lse_push(m, s, 3.0);
  os::lse_push(m, s, 3.0 - std::log(2.0));
  EXPECT_DOUBLE_EQ(m + std::log(s), 3.0 + std::log(1.5));
  EXPECT_EQ(os::lse_rescale(-INFINITY, 0.0, 3.0), 0.0);
  EXPECT_EQ(os::h_entry(-INFINITY, 1.0, 0.1), os::kHugeNeg);
  EXPECT_EQ(os::grad_weight(0.5, 0.0, 1), 0.0);  // p = 1 at coincident points
  // The CPU's clamp at -745 (ExpAny): the smallest denormal, not 0.
  EXPECT_LE(os::plan_entry(-1e300, 0.0), 5e-324);
  EXPECT_EQ(os::plan_entry(1e300, 0.0), std::exp(709.0));
}

TEST(CudaDispatch, SinkhornDispatchesOnTheDevice) {
  std::vector<double> x(8, 0.0), y(6, 1.0), f(4), g(3);
  SinkhornInputs in;
  in.x = sk_view3(x.data(), DType::f64, 1, 4, 2);
  in.y = sk_view3(y.data(), DType::f64, 1, 3, 2);
  SinkhornOutputs out;
  out.f = TensorView::matrix(f.data(), DType::f64, 1, 4);
  out.g = TensorView::matrix(g.data(), DType::f64, 1, 3);
  SinkhornOptions o;
  o.eps = 0.1;
  SinkhornInputs mixed = in;
  mixed.y = on_cuda(in.y);
  const std::string msg = error_of([&] { sinkhorn(mixed, o, out); });
  EXPECT_NE(msg.find("sinkhorn: y is on cuda:0 but x is on cpu"), std::string::npos) << msg;
  SinkhornInputs dev = in;
  dev.x = on_cuda(in.x);
  dev.y = on_cuda(in.y);
  SinkhornOutputs dout = out;
  dout.f = on_cuda(out.f);
  dout.g = on_cuda(out.g);
  // Shapes are checked on the host before any device call (a build without CUDA says so
  // first).
  SinkhornOutputs bad = dout;
  bad.g = on_cuda(TensorView::matrix(g.data(), DType::f64, 1, 2));
  const std::string msg2 = error_of([&] { sinkhorn(dev, o, bad); });
  const char* want2 = cuda_built() ? "sinkhorn: g must have shape [1, 3]"
                                   : "sinkhorn: divkit was built without CUDA";
  EXPECT_NE(msg2.find(want2), std::string::npos) << msg2;
  const std::string msg3 = error_of([&] { sinkhorn(dev, o, dout); });
  if (!cuda_built()) {
    EXPECT_EQ(msg3, "sinkhorn: divkit was built without CUDA");
  } else if (cuda_device_count() == 0) {
    EXPECT_NE(msg3.find("sinkhorn: CUDA error"), std::string::npos) << msg3;
  }
}

}  // namespace
}  // namespace divkit
