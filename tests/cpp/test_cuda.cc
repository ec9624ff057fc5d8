// The CUDA side that can be checked without a GPU: device placement and the errors of the
// dispatch, and the scalar form of the divergence definitions (divergences_scalar.h, what the
// CUDA row kernels compute per entry) against the SIMD CPU kernels.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "divergence/divergences_scalar.h"
#include "divkit/divergence.h"
#include "divkit/tensor.h"

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

}  // namespace
}  // namespace divkit
