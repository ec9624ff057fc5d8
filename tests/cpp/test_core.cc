// The shared core helpers: element access, scalar math, the reduction rule, the overlap check,
// and the umbrella header (it must compile with every family's header together).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "core/check.h"
#include "core/element.h"
#include "core/reduction.h"
#include "core/scalar_math.h"
#include "divkit/divkit.h"

namespace {

using divkit::DType;
using divkit::Error;
using divkit::Reduction;
using divkit::TensorView;
constexpr double kInf = std::numeric_limits<double>::infinity();

TEST(CoreElement, LoadAndStoreEveryDtype) {
  float f[2] = {};
  double d[2] = {};
  uint16_t h[2] = {};
  int32_t i32[2] = {};
  int64_t i64[2] = {};
  namespace elem = divkit::elem;
  elem::store(f, DType::f32, 1, 0.1);
  EXPECT_EQ(elem::load(f, DType::f32, 1), double(0.1f));
  elem::store(d, DType::f64, 1, 0.1);
  EXPECT_EQ(elem::load(d, DType::f64, 1), 0.1);
  elem::store(h, DType::bf16, 1, 1.0 + 1.0 / 256.0);  // a tie: rounds to even (1.0)
  EXPECT_EQ(elem::load(h, DType::bf16, 1), 1.0);
  elem::store(h, DType::f16, 0, 65504.0);
  EXPECT_EQ(elem::load(h, DType::f16, 0), 65504.0);
  elem::store(i32, DType::i32, 1, -7.0);
  EXPECT_EQ(elem::load_index(i32, DType::i32, 1), -7);
  elem::store(i64, DType::i64, 0, 3.0);
  EXPECT_EQ(elem::load_index(i64, DType::i64, 0), 3);
  // An fp64 value beyond fp32's range is infinite once read as fp32.
  d[0] = 1e300;
  EXPECT_EQ(elem::load_f32(d, DType::f64, 0), std::numeric_limits<float>::infinity());
}

TEST(CoreElement, StridedViewsAndOptionalOutputs) {
  std::vector<double> buf = {0, 1, 2, 3, 4, 5};
  TensorView m = TensorView::matrix(buf.data(), DType::f64, 2, 2, 3);
  EXPECT_EQ(divkit::elem::get(m, 1, 1), 4.0);
  m.strides[1] = 2;
  EXPECT_EQ(divkit::elem::get(m, 1, 1), 5.0);
  TensorView v = TensorView::vector(buf.data(), DType::f64, 3);
  v.strides[0] = 2;
  divkit::elem::set(v, 2, -1.0);
  EXPECT_EQ(buf[4], -1.0);
  divkit::elem::put(TensorView{}, 0, 1.0);  // not given: nothing is written
}

TEST(CoreScalarMath, StableForms) {
  namespace math = divkit::math;
  EXPECT_EQ(math::sigmoid(0.0), 0.5);
  EXPECT_EQ(math::sigmoid(-800.0), 0.0);
  EXPECT_EQ(math::sigmoid(800.0), 1.0);
  EXPECT_NEAR(math::log_sigmoid(-800.0), -800.0, 1e-12);
  EXPECT_NEAR(math::log_sigmoid(2.0), std::log(1.0 / (1.0 + std::exp(-2.0))), 1e-15);
  EXPECT_EQ(math::log1mexp(-kInf), 0.0);
  EXPECT_NEAR(math::log1mexp(-1e-10), std::log(1e-10), 1e-9);
  EXPECT_NEAR(math::log1mexp(-2.0), std::log1p(-std::exp(-2.0)), 1e-15);
  EXPECT_EQ(math::xlogy(0.0, -kInf), 0.0);
  EXPECT_EQ(math::xlogy(2.0, 0.5), 1.0);
}

TEST(CoreReduction, DivisorRule) {
  namespace reduce = divkit::reduce;
  const char* fn = "f";
  EXPECT_EQ(reduce::divisor(fn, Reduction::sum, 0.0, 3, 5), 1.0);
  EXPECT_EQ(reduce::divisor(fn, Reduction::none, 0.0, 3, 5), 1.0);
  EXPECT_EQ(reduce::divisor(fn, Reduction::mean, 0.0, 3, 5), 3.0);
  EXPECT_EQ(reduce::divisor(fn, Reduction::mean, 0.0, 0, 5), 1.0);  // every token ignored
  EXPECT_EQ(reduce::divisor(fn, Reduction::batchmean, 0.0, 3, 5), 5.0);
  EXPECT_EQ(reduce::divisor(fn, Reduction::batchmean, 0.0, 0, 0), 1.0);
  for (Reduction r : {Reduction::sum, Reduction::mean, Reduction::batchmean})
    EXPECT_EQ(reduce::divisor(fn, r, 7.0, 3, 5), 7.0);
  EXPECT_THROW(reduce::divisor(fn, Reduction::none, 7.0, 3, 5), Error);
  EXPECT_THROW(reduce::divisor(fn, Reduction::sum, -1.0, 3, 5), Error);
  EXPECT_THROW(reduce::divisor(fn, Reduction::sum, kInf, 3, 5), Error);
  EXPECT_THROW(reduce::divisor(fn, static_cast<Reduction>(9), 0.0, 3, 5), Error);
}

TEST(CoreReduction, PlanAndStore) {
  std::vector<int64_t> labels = {1, -100, 2, 3};
  std::vector<float> weights = {1.0f, 5.0f, 0.0f, 2.0f};
  divkit::DivergenceOptions o;
  o.labels = TensorView::vector(labels.data(), DType::i64, 4);
  o.weights = TensorView::vector(weights.data(), DType::f32, 4);
  o.reduction = Reduction::mean;
  double loss = 0.0;
  const TensorView lv = TensorView::vector(&loss, DType::f64, 1);
  const divkit::reduce::Plan p = divkit::reduce::plan("f", 4, o, lv);
  EXPECT_EQ(p.count, 3);
  EXPECT_EQ(p.divisor, 3.0);
  EXPECT_EQ(p.grad_scale[3], 2.0 / 3.0);
  const std::vector<double> row = {1.0, 100.0, kInf, 4.0};  // ignored and zero-weight rows drop out
  divkit::reduce::store_loss(p, row.data(), 2.0, lv);
  EXPECT_EQ(loss, (1.0 * 1.0 + 4.0 * 2.0) * 2.0 / 3.0);

  o.reduction = Reduction::none;
  std::vector<float> per(4, -1.0f);
  const TensorView pv = TensorView::vector(per.data(), DType::f32, 4);
  divkit::reduce::store_loss(divkit::reduce::plan("f", 4, o, pv), row.data(), 1.0, pv);
  EXPECT_EQ(per, (std::vector<float>{1.0f, 0.0f, 0.0f, 8.0f}));

  weights[1] = std::nanf("");
  try {
    divkit::reduce::plan("f", 4, o, pv);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()), "f: weights must be finite, got nan at index 1");
  }
}

// The span of a view reaches its last element through the column stride too: a transposed
// [N, k] input overlaps memory beyond (N - 1) * row_stride + k elements.
TEST(CoreCheck, RangesOverlapCountsTheColumnStride) {
  std::vector<float> buf(64);
  TensorView t = TensorView::matrix(buf.data(), DType::f32, 4, 2, 1);  // [4, 2], strides [1, 4]
  t.strides[1] = 4;                                                    // elements 0..7
  const TensorView after = TensorView::matrix(buf.data() + 6, DType::f32, 1, 8);
  EXPECT_TRUE(divkit::check::ranges_overlap(t, after));
  const TensorView beyond = TensorView::matrix(buf.data() + 8, DType::f32, 1, 8);
  EXPECT_FALSE(divkit::check::ranges_overlap(t, beyond));
  EXPECT_FALSE(
      divkit::check::ranges_overlap(TensorView::matrix(buf.data(), DType::f32, 0, 8), after));
}

// Through the public API: a gradient output overlapping a transposed teacher_logprobs is refused
// (before anything is written).
TEST(CoreCheck, SparseGradOverlappingTransposedLogprobsIsAnError) {
  const int64_t n = 4, v = 8, k = 2;
  std::vector<float> student(n * v, 0.0f), buf(64, -1.0f), loss(1);
  std::vector<int64_t> idx = {0, 1, 0, 1, 0, 1, 0, 1};
  TensorView lp = TensorView::matrix(buf.data(), DType::f32, n, k, 1);
  lp.strides[1] = n;  // elements 0..7 of buf
  divkit::DivergenceSpec spec;
  divkit::SparseOutputs out;
  out.loss = TensorView::vector(loss.data(), DType::f32, 1);
  out.grad_student = TensorView::matrix(buf.data() + 6, DType::f32, n, v);
  try {
    divkit::sparse_divergence(TensorView::matrix(student.data(), DType::f32, n, v),
                              TensorView::matrix(idx.data(), DType::i64, n, k), lp, spec,
                              divkit::SparseOptions{}, divkit::DivergenceOptions{}, out);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("grad_student overlaps teacher_logprobs"),
              std::string::npos)
        << e.what();
  }
}

}  // namespace
