// The CUDA kernels run on the CPU by the CUDA emulator (DIVKIT_CUDA=EMULATE builds only; see
// src/core/cuda_emulator.h): every call through the public API with its views marked as CUDA,
// against the same call on the CPU kernels. Each emulated call runs twice, the second time with
// the threads and blocks in reverse order and another garbage byte in fresh device memory: the
// two must give the same bits (a missing barrier, a read of memory nothing wrote or an order-
// dependent reduction would not). What this does not check: anything the emulator does not model
// (see its header); the GPU check runs the same kernels on a GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/cuda_emulator_control.h"
#include "cuda_emulated_util.h"
#include "divkit/divergence.h"
#include "divkit/fused_linear.h"
#include "divkit/ot.h"
#include "divkit/sparse.h"
#include "jsd_reference.h"
#include "test_util.h"

namespace divkit_test {
namespace {

using divkit::Device;
using divkit::DivergenceOptions;
using divkit::DivergenceOutputs;

// ---- token divergences ---------------------------------------------------------------------

struct DivCase {
  DivergenceSpec spec;
  int64_t n = 6, v = 37;
  DType dtype = DType::f32;
  int64_t stride = -1;  // row stride of both inputs (-1: v)
  bool labels = false, weights = false;
  bool nan_weight = false;  // weights[1] = +inf
  Reduction reduction = Reduction::mean;
  double num_items = 0.0;
  bool grad_s = true, grad_t = false, in_place = false;
  DType grad_dtype = DType::f32;
  DType loss_dtype = DType::f32;
  uint64_t seed = 1;
};

struct DivRun {
  std::vector<double> loss;
  HostMatrix gs, gt;
  std::string error;
};

DivRun run_divergence(const DivCase& c, const Logits& in, bool cuda) {
  DivRun r;
  HostMatrix s = in.student, t = in.teacher;
  std::vector<int64_t> labels;
  std::vector<float> weights;
  DivergenceOptions o;
  if (c.labels) {
    for (int64_t i = 0; i < c.n; ++i) labels.push_back(i % 3 == 1 ? -100 : i);
    o.labels = placed(TensorView::vector(labels.data(), DType::i64, c.n), cuda);
  }
  if (c.weights) {
    for (int64_t i = 0; i < c.n; ++i) weights.push_back(0.25f + 0.5f * static_cast<float>(i % 4));
    if (c.nan_weight) weights[1] = INFINITY;
    o.weights = placed(TensorView::vector(weights.data(), DType::f32, c.n), cuda);
  }
  o.reduction = c.reduction;
  o.num_items_in_batch = c.num_items;
  const int64_t nl = c.reduction == Reduction::none ? c.n : 1;
  HostMatrix loss(1, nl, c.loss_dtype);
  DivergenceOutputs out;
  out.loss = placed(TensorView::vector(loss.view().data, c.loss_dtype, nl), cuda);
  if (c.in_place) {
    out.grad_student = placed(s.view(), cuda);
  } else if (c.grad_s) {
    r.gs = HostMatrix(c.n, c.v, c.grad_dtype);
    out.grad_student = placed(r.gs.view(), cuda);
  }
  if (c.grad_t) {
    r.gt = HostMatrix(c.n, c.v, c.grad_dtype);
    out.grad_teacher = placed(r.gt.view(), cuda);
  }
  try {
    divkit::divergence(placed(s.view(), cuda), placed(t.view(), cuda), c.spec, o, out);
  } catch (const divkit::Error& e) {
    r.error = e.what();
  }
  if (c.in_place) r.gs = s;
  r.loss = loss.values();
  return r;
}

std::string describe(const DivCase& c) {
  return spec_string(c.spec) + " n=" + std::to_string(c.n) + " v=" + std::to_string(c.v) + " " +
         dtype_short(c.dtype) + (c.labels ? " labels" : "") + (c.weights ? " weights" : "") +
         " reduction=" + divkit::reduction_name(c.reduction) + (c.in_place ? " in-place" : "") +
         (c.grad_t ? " grad_t" : "") + " grad " + dtype_short(c.grad_dtype);
}

void expect_same_bits(const DivRun& a, const DivRun& b, const std::string& what) {
  EXPECT_EQ(a.error, b.error) << what;
  ASSERT_EQ(a.loss.size(), b.loss.size());
  for (size_t i = 0; i < a.loss.size(); ++i)
    EXPECT_TRUE(a.loss[i] == b.loss[i] || (std::isnan(a.loss[i]) && std::isnan(b.loss[i])))
        << what << ": loss[" << i << "] " << a.loss[i] << " vs " << b.loss[i];
  if (!a.gs.empty()) {
    EXPECT_TRUE(a.gs.same_bits(b.gs)) << what << ": student gradient";
  }
  if (!a.gt.empty()) {
    EXPECT_TRUE(a.gt.same_bits(b.gt)) << what << ": teacher gradient";
  }
}

void check_divergence(const DivCase& c) {
  const std::string what = describe(c);
  const Logits in = random_logits(c.n, c.v, c.dtype, c.dtype, c.seed, 2.0, c.stride, c.stride);
  const DivRun cpu = run_divergence(c, in, false);
  DivRun emu;
  const long long launches = divkit::cuda_emu::launch_count();
  {
    EmulatorOrder order(false);
    emu = run_divergence(c, in, true);
  }
  EXPECT_GT(divkit::cuda_emu::launch_count(), launches) << what << ": no kernel ran";
  DivRun rev;
  {
    EmulatorOrder order(true);
    rev = run_divergence(c, in, true);
  }
  ASSERT_EQ(cpu.error, "") << what;
  ASSERT_EQ(emu.error, "") << what;
  expect_same_bits(emu, rev, what + " (forward vs reverse order)");
  const double tol = c.grad_dtype == DType::f32 ? 2e-5 : 1e-2;
  expect_close(emu.loss, cpu.loss, 2e-5, what + " loss");
  if (!cpu.gs.empty()) expect_close(emu.gs.values(), cpu.gs.values(), tol, what + " grad_s");
  if (!cpu.gt.empty()) expect_close(emu.gt.values(), cpu.gt.values(), tol, what + " grad_t");
  if (!emu.gs.empty()) {
    EXPECT_TRUE(emu.gs.padding_intact()) << what;
  }
}

TEST(CudaEmulated, DivergenceEveryKindMatchesTheCpu) {
  // V = 37 (one partial 16-byte vector), 1001 (rows not 16-byte aligned) and 7000 (beyond the
  // shared-memory row cache).
  for (const Variant& var : all_variants())
    for (int64_t v : {37, 1001, 7000}) {
      DivCase c;
      c.spec = var.spec;
      c.v = v;
      c.n = v > 5000 ? 3 : 6;
      c.grad_t = true;
      check_divergence(c);
    }
}

// jsd near p = q, where each entry's two halves cancel to beta (1 - beta) q x^2 / 2: the CUDA
// kernel's log of the mixture from expm1 and log1p keeps the row value relatively accurate (the
// log of m alone left 1e0-1e2 relative error at noise 1e-3), as the AVX-512 table does on the CPU.
TEST(CudaEmulated, JsdValueRelativelyAccurateNearEqualDistributions) {
  for (const double beta : {0.1, 0.5, 0.9}) {
    for (const auto& [noise, bound] :
         {std::pair{1e-3, 2e-3}, std::pair{1e-2, 2e-4}, std::pair{0.3, 1e-5}}) {
      JsdRows r = make_jsd_rows(4, 4096, noise, 5);
      const DivergenceSpec spec = make_spec(divkit::DivergenceKind::jsd, beta);
      std::vector<float> loss(4);
      DivergenceOptions o;
      o.reduction = Reduction::none;
      DivergenceOutputs out;
      out.loss = placed(TensorView::vector(loss.data(), DType::f32, 4), true);
      EmulatorOrder order(false);
      divkit::divergence(placed(r.s.view(), true), placed(r.t.view(), true), spec, o, out);
      for (int64_t i = 0; i < 4; ++i) {
        const long double want = jsd_row(r.s, r.t, i, static_cast<float>(beta));
        EXPECT_LT(std::fabs((loss[i] - want) / want), bound)
            << "beta " << beta << " noise " << noise << " row " << i << ": " << loss[i]
            << " against " << static_cast<double>(want);
      }
    }
  }
}

TEST(CudaEmulated, DivergenceOptionsMatchTheCpu) {
  for (const Variant& var : default_variants()) {
    for (Reduction red : {Reduction::none, Reduction::sum, Reduction::mean, Reduction::batchmean}) {
      DivCase c;
      c.spec = var.spec;
      c.v = 257;
      c.labels = true;
      c.weights = red != Reduction::none;
      c.reduction = red;
      c.loss_dtype = red == Reduction::none ? DType::f32 : DType::f64;
      check_divergence(c);
    }
    DivCase c;
    c.spec = var.spec;
    c.v = 300;
    c.num_items = 7.0;
    c.reduction = Reduction::sum;
    c.spec.temperature = 2.0f;
    c.spec.scale_by_t_squared = true;
    check_divergence(c);
  }
}

TEST(CudaEmulated, DivergenceDtypesStridesAndInPlace) {
  for (const Variant& var : default_variants())
    for (DType dt : {DType::bf16, DType::f16, DType::f64}) {
      DivCase c;
      c.spec = var.spec;
      c.v = 515;
      c.dtype = dt;
      c.stride = 520;
      c.grad_dtype = dt == DType::f64 ? DType::f32 : dt;
      check_divergence(c);
      c.in_place = true;
      c.grad_dtype = dt;
      c.stride = -1;
      if (dt != DType::f64) check_divergence(c);
    }
}

TEST(CudaEmulated, DivergenceBadInputNamesTheTokenAsTheCpu) {
  DivCase c;
  c.v = 64;
  Logits in = random_logits(c.n, c.v, c.dtype, c.dtype, 3);
  in.teacher.set(4, 10, std::nan(""));
  const DivRun cpu = run_divergence(c, in, false);
  DivRun emu;
  {
    EmulatorOrder order(false);
    emu = run_divergence(c, in, true);
  }
  ASSERT_NE(cpu.error, "");
  EXPECT_EQ(emu.error, cpu.error);
  {
    // A non-finite weight: the CPU's message, with the value.
    DivCase w = c;
    w.weights = true;
    w.nan_weight = true;
    const Logits good = random_logits(c.n, c.v, c.dtype, c.dtype, 3);
    const DivRun wcpu = run_divergence(w, good, false);
    EmulatorOrder order(false);
    EXPECT_EQ(run_divergence(w, good, true).error, wcpu.error);
    EXPECT_NE(wcpu.error.find("got inf at index 1"), std::string::npos) << wcpu.error;
  }
  // In place, the logits stay untouched when a row is bad.
  c.in_place = true;
  DivRun emu_in;
  {
    EmulatorOrder order(false);
    emu_in = run_divergence(c, in, true);
  }
  EXPECT_EQ(emu_in.error, cpu.error);
  EXPECT_TRUE(emu_in.gs.same_bits(in.student));
}

}  // namespace
}  // namespace divkit_test
