// Bad input: each error path throws divkit::Error whose message names the argument (and the
// first bad row for non-finite logits); in in-place mode an error leaves the student unchanged.
#include <cmath>

#include "test_util.h"

namespace divkit_test {
namespace {

// A small valid problem whose pieces a test breaks one at a time.
struct Problem {
  int64_t n = 8, v = 7;
  Logits l;
  std::vector<float> loss;
  divkit::DivergenceSpec spec;
  divkit::DivergenceOptions opt;
  divkit::DivergenceOutputs out;
  HostMatrix grad_s, grad_t;

  explicit Problem(Reduction r = Reduction::mean, DType dt = DType::f32)
      : l(random_logits(8, 7, dt, dt, 90)), grad_s(8, 7, DType::f32), grad_t(8, 7, DType::f32) {
    opt.reduction = r;
    loss.assign(r == Reduction::none ? static_cast<size_t>(n) : 1u, 0.0f);
    out.loss = TensorView::vector(loss.data(), DType::f32, static_cast<int64_t>(loss.size()));
  }
  void call() { divkit::divergence(l.student.view(), l.teacher.view(), spec, opt, out); }
  std::function<void()> fn() {
    return [this] { call(); };
  }
};

TEST(Errors, ValidProblemDoesNotThrow) {
  Problem p;
  EXPECT_NO_THROW(p.call());
  p.out.grad_student = p.grad_s.view();
  p.out.grad_teacher = p.grad_t.view();
  EXPECT_NO_THROW(p.call());
}

TEST(Errors, ShapeMismatch) {
  {
    Problem p;
    HostMatrix t(8, 6, DType::f32);
    t.fill(0.0);
    expect_error([&] { divkit::divergence(p.l.student.view(), t.view(), p.spec, p.opt, p.out); },
                 {}, {"teacher"}, "teacher with V = 6 for a student with V = 7");
  }
  {
    Problem p;
    HostMatrix t(5, 7, DType::f32);
    t.fill(0.0);
    expect_error([&] { divkit::divergence(p.l.student.view(), t.view(), p.spec, p.opt, p.out); },
                 {}, {"teacher"}, "teacher with N = 5 for a student with N = 8");
  }
  {
    Problem p;
    TensorView s = p.l.student.view();
    s.ndim = 1;
    s.shape[0] = 56;
    expect_error([&] { divkit::divergence(s, p.l.teacher.view(), p.spec, p.opt, p.out); },
                 {"student"}, {}, "1-D student");
  }
  {
    Problem p;
    TensorView s = p.l.student.view();
    s.strides[1] = 2;
    s.shape[1] = 3;
    TensorView t = p.l.teacher.view();
    t.shape[1] = 3;
    expect_error([&] { divkit::divergence(s, t, p.spec, p.opt, p.out); }, {"student"}, {},
                 "student with a column stride of 2");
  }
  {
    Problem p;
    HostMatrix g(8, 6, DType::f32);
    p.out.grad_student = g.view();
    expect_error(p.fn(), {"grad_student"}, {}, "grad_student of the wrong shape");
  }
  {
    Problem p;
    HostMatrix g(7, 7, DType::f32);
    p.out.grad_teacher = g.view();
    expect_error(p.fn(), {"grad_teacher"}, {}, "grad_teacher of the wrong shape");
  }
  {
    Problem p;
    HostMatrix g(8, 7, DType::i32);
    p.out.grad_student = g.view();
    expect_error(p.fn(), {"grad_student"}, {}, "grad_student of an integer dtype");
  }
}

TEST(Errors, EmptyVocabulary) {
  HostMatrix s(4, 0, DType::f32), t(4, 0, DType::f32);
  float loss = 0;
  divkit::DivergenceOptions opt;
  divkit::DivergenceOutputs out;
  out.loss = TensorView::vector(&loss, DType::f32, 1);
  expect_error([&] { divkit::divergence(s.view(), t.view(), divkit::DivergenceSpec{}, opt, out); },
               {}, {"student", "teacher", "V", "vocab"}, "V = 0");
}

TEST(Errors, UnsupportedInputDtype) {
  Problem p;
  HostMatrix s(8, 7, DType::i32);
  expect_error([&] { divkit::divergence(s.view(), p.l.teacher.view(), p.spec, p.opt, p.out); },
               {"student"}, {}, "int32 student");
  HostMatrix t(8, 7, DType::i64);
  expect_error([&] { divkit::divergence(p.l.student.view(), t.view(), p.spec, p.opt, p.out); },
               {"teacher"}, {}, "int64 teacher");
  TensorView cuda = p.l.student.view();
  cuda.device = divkit::Device::cuda;
  expect_error([&] { divkit::divergence(cuda, p.l.teacher.view(), p.spec, p.opt, p.out); },
               {"student"}, {}, "student on a CUDA device");
}

TEST(Errors, UnknownNames) {
  expect_error([] { divkit::parse_divergence_kind("kl_forward"); },
               {"kind", "kl_forward", "forward_kl", "renyi"}, {}, "unknown kind");
  expect_error([] { divkit::parse_divergence_kind(""); }, {"kind"}, {}, "empty kind");
  expect_error([] { divkit::parse_reduction("average"); }, {"reduction", "average", "batchmean"},
               {}, "unknown reduction");
}

TEST(Errors, ParametersOutOfRange) {
  using K = DivergenceKind;
  struct Bad {
    K kind;
    const char* field;
    double value;
  };
  const double nan = kNaN, inf = kInf;
  const std::vector<Bad> bad = {
      {K::forward_kl, "temperature", 0.0},
      {K::forward_kl, "temperature", -1.0},
      {K::jsd, "temperature", nan},
      {K::renyi, "temperature", -inf},
      {K::jsd, "beta", -0.1},
      {K::jsd, "beta", 1.5},
      {K::jsd, "beta", nan},
      {K::skew_forward_kl, "alpha", -0.1},
      {K::skew_forward_kl, "alpha", 1.01},
      {K::skew_reverse_kl, "alpha", 2.0},
      {K::skew_reverse_kl, "alpha", nan},
      {K::renyi, "alpha", 0.0},
      {K::renyi, "alpha", -1.0},
      {K::renyi, "alpha", nan},
      {K::alpha_divergence, "alpha", nan},
      {K::alpha_divergence, "alpha", inf},
      {K::alpha_divergence, "alpha", -inf},
  };
  for (const Bad& b : bad) {
    DivergenceSpec spec = make_spec(b.kind);
    if (std::string(b.field) == "temperature") spec.temperature = static_cast<float>(b.value);
    else if (std::string(b.field) == "beta") spec.beta = static_cast<float>(b.value);
    else spec.alpha = static_cast<float>(b.value);
    const std::string what = spec_string(spec);
    expect_error([&] { divkit::validate_spec(spec); }, {b.field}, {}, "validate_spec " + what);
    Problem p;
    p.spec = spec;
    expect_error(p.fn(), {b.field}, {}, "divergence " + what);
  }
  // in range: no error (alpha_divergence accepts any finite alpha)
  for (double a : {-3.0, 0.0, 0.5, 1.0, 4.0})
    EXPECT_NO_THROW(divkit::validate_spec(make_spec(K::alpha_divergence, a)));
  for (double a : {0.0, 0.5, 1.0}) {
    EXPECT_NO_THROW(divkit::validate_spec(make_spec(K::skew_forward_kl, a)));
    EXPECT_NO_THROW(divkit::validate_spec(make_spec(K::jsd, a)));
  }
  for (double a : {1e-3, 1.0, 5.0}) EXPECT_NO_THROW(divkit::validate_spec(make_spec(K::renyi, a)));
}

TEST(Errors, NonFiniteLogitsNameTheFirstBadRow) {
  for (DType dt : {DType::f32, DType::bf16, DType::f16, DType::f64}) {
    for (double bad : {kNaN, kInf}) {
      for (int which = 0; which < 2; ++which) {
        const std::string arg = which == 0 ? "student" : "teacher";
        const std::string what =
            arg + " " + dtype_short(dt) + " " + std::to_string(bad) + " in rows 5 and 7";
        Problem p(Reduction::mean, dt);
        HostMatrix& m = which == 0 ? p.l.student : p.l.teacher;
        m.set(5, 3, bad);
        m.set(7, 0, bad);
        expect_error(p.fn(), {arg, "5"}, {}, what);
        // with gradients requested too
        p.out.grad_student = p.grad_s.view();
        p.out.grad_teacher = p.grad_t.view();
        expect_error(p.fn(), {arg, "5"}, {}, what + " (with gradients)");
      }
    }
  }
}

// Rows of several blocks of whole vectors (pass 1 works per block of 16 vectors and checks the
// logits as it exponentiates them; the V = 7 rows above take its partial-vector path instead):
// one NaN or +inf anywhere is found, also after a prefix of -inf entries and in a block's first
// and last vectors, with a gradient buffer, in place, and in place with deferred checks (where
// pass 1's check is the only one), at T = 1 and 2.
TEST(Errors, NonFiniteLogitsFoundAnywhereInLongRows) {
  constexpr int64_t kN = 3, kV = 3 * 256 + 21;
  const int64_t positions[] = {0, 15, 255, 256, 300, 511, 767, 768, kV - 1};
  for (DType dt : {DType::f32, DType::bf16}) {
    for (double bad : {kNaN, kInf}) {
      for (int which = 0; which < 2; ++which) {
        for (bool masked_prefix : {false, true}) {
          for (int64_t pos : positions) {
            for (int mode = 0; mode < 3; ++mode) {  // buffer, in place, in place deferred
              const std::string arg = which == 0 ? "student" : "teacher";
              const std::string what = arg + " " + dtype_short(dt) + " " + std::to_string(bad) +
                                       " at column " + std::to_string(pos) +
                                       (masked_prefix ? " after -inf" : "") + " mode " +
                                       std::to_string(mode);
              Logits l = random_logits(kN, kV, dt, dt, 91);
              HostMatrix& m = which == 0 ? l.student : l.teacher;
              if (masked_prefix)
                for (int64_t j = 0; j < 600; ++j) m.set(1, j, -kInf);
              m.set(1, pos, bad);
              std::vector<float> loss(1);
              HostMatrix grad(kN, kV, dt);
              divkit::DivergenceSpec spec;
              spec.temperature = pos % 2 == 0 ? 1.0f : 2.0f;
              divkit::DivergenceOptions opt;
              opt.check_finite = mode != 2;
              divkit::DivergenceOutputs out;
              out.loss = TensorView::vector(loss.data(), DType::f32, 1);
              out.grad_student = mode == 0 ? grad.view() : l.student.view();
              expect_error(
                  [&] { divkit::divergence(l.student.view(), l.teacher.view(), spec, opt, out); },
                  {arg, "1"}, {}, what);
            }
          }
        }
      }
    }
  }
}

TEST(Errors, NonFiniteLogitsInIgnoredRowsAreNotRead) {
  Problem p;
  std::vector<int64_t> labels = {0, 1, 2, 3, 4, -100, 6, -100};
  p.opt.labels = TensorView::vector(labels.data(), DType::i64, 8);
  p.l.student.set(5, 2, kNaN);
  p.l.teacher.set(7, 1, kInf);
  p.l.student.fill_row(7, -kInf);
  p.out.grad_student = p.grad_s.view();
  EXPECT_NO_THROW(p.call());
  EXPECT_TRUE(std::isfinite(p.loss[0]));
}

TEST(Errors, RowAllNegInfIsAnError) {
  for (int which = 0; which < 2; ++which) {
    const std::string arg = which == 0 ? "student" : "teacher";
    Problem p;
    (which == 0 ? p.l.student : p.l.teacher).fill_row(6, -kInf);
    expect_error(p.fn(), {arg, "6"}, {}, arg + " row 6 all -inf");
    // ignored: fine
    std::vector<int32_t> labels = {0, 0, 0, 0, 0, 0, -100, 0};
    p.opt.labels = TensorView::vector(labels.data(), DType::i32, 8);
    EXPECT_NO_THROW(p.call()) << arg << " row 6 all -inf but ignored";
  }
}

TEST(Errors, WrongLabelsAndWeights) {
  {
    Problem p;
    std::vector<float> labels(8, 0.0f);
    p.opt.labels = TensorView::vector(labels.data(), DType::f32, 8);
    expect_error(p.fn(), {"labels"}, {}, "float labels");
  }
  {
    Problem p;
    std::vector<int64_t> labels(7, 0);
    p.opt.labels = TensorView::vector(labels.data(), DType::i64, 7);
    expect_error(p.fn(), {"labels"}, {}, "labels of length 7 for N = 8");
  }
  {
    Problem p;
    std::vector<int32_t> w(8, 1);
    p.opt.weights = TensorView::vector(w.data(), DType::i32, 8);
    expect_error(p.fn(), {"weights"}, {}, "int32 weights");
  }
  {
    Problem p;
    std::vector<uint16_t> w(8, 0x3f80);
    p.opt.weights = TensorView::vector(w.data(), DType::bf16, 8);
    expect_error(p.fn(), {"weights"}, {}, "bf16 weights");
  }
  {
    Problem p;
    std::vector<float> w(9, 1.0f);
    p.opt.weights = TensorView::vector(w.data(), DType::f32, 9);
    expect_error(p.fn(), {"weights"}, {}, "weights of length 9 for N = 8");
  }
}

TEST(Errors, WrongLossShape) {
  {
    Problem p(Reduction::none);
    float one = 0;
    p.out.loss = TensorView::vector(&one, DType::f32, 1);
    expect_error(p.fn(), {"loss"}, {}, "reduction none with a [1] loss");
  }
  {
    Problem p(Reduction::mean);
    std::vector<float> l8(8);
    p.out.loss = TensorView::vector(l8.data(), DType::f32, 8);
    expect_error(p.fn(), {"loss"}, {}, "reduction mean with an [8] loss");
  }
  {
    Problem p(Reduction::sum);
    int32_t k = 0;
    p.out.loss = TensorView::vector(&k, DType::i32, 1);
    expect_error(p.fn(), {"loss"}, {}, "int32 loss");
  }
}

TEST(Errors, InPlaceErrorLeavesStudentUnchanged) {
  for (DType dt : {DType::f32, DType::bf16}) {
    SCOPED_TRACE(dtype_short(dt));
    auto check = [&](const std::function<void(Problem&)>& breakit, const std::string& what) {
      Problem p(Reduction::mean, dt);
      breakit(p);
      p.out.grad_student = p.l.student.view();
      const std::vector<uint8_t> before = p.l.student.bytes();
      EXPECT_THROW(p.call(), divkit::Error) << what;
      EXPECT_EQ(p.l.student.bytes(), before) << what << ": the student buffer was modified";
    };
    check([](Problem& p) { p.l.student.set(7, 6, kNaN); }, "NaN in the student's last row");
    check([](Problem& p) { p.l.student.set(6, 0, kInf); }, "+inf in the student's row 6");
    check([](Problem& p) { p.l.teacher.set(7, 2, kNaN); }, "NaN in the teacher's last row");
    check([](Problem& p) { p.l.teacher.fill_row(7, -kInf); }, "teacher's last row all -inf");
    check([](Problem& p) { p.l.student.fill_row(7, -kInf); }, "student's last row all -inf");
    check([](Problem& p) { p.spec.temperature = -1.0f; }, "negative temperature");
    check(
        [](Problem& p) {
          p.spec.kind = DivergenceKind::jsd;
          p.spec.beta = 2.0f;
        },
        "beta = 2");
  }
}

// check_finite off in place: each row is checked as it is read, so a bad row still throws (and
// says that other rows changed), its own row is left as it was, and every other row holds the
// gradient that a call without the bad row gives it (reduction sum: no row's scale depends on
// the others).
TEST(Errors, InPlaceDeferredCheckWritesTheGoodRows) {
  for (DType dt : {DType::f32, DType::bf16}) {
    for (bool bad_teacher : {false, true}) {
      SCOPED_TRACE(dtype_short(dt) + (bad_teacher ? " bad teacher row" : " bad student row"));
      constexpr int64_t kBad = 5;
      Problem want(Reduction::sum, dt);
      std::vector<int64_t> labels(8, 0);
      labels[kBad] = -100;
      want.opt.labels = TensorView::vector(labels.data(), DType::i64, 8);
      HostMatrix grad_want(8, 7, dt);
      want.out.grad_student = grad_want.view();
      want.call();

      Problem p(Reduction::sum, dt);
      (bad_teacher ? p.l.teacher : p.l.student).set(kBad, 3, kNaN);
      const HostMatrix before = p.l.student;
      p.out.grad_student = p.l.student.view();
      p.opt.check_finite = false;
      expect_error(p.fn(),
                   {bad_teacher ? "teacher_logits" : "student_logits", "row 5", "check_finite"});
      for (int64_t i = 0; i < 8; ++i) {
        for (int64_t j = 0; j < 7; ++j) {
          const double got = p.l.student.get(i, j);
          const double expected = i == kBad ? before.get(i, j) : grad_want.get(i, j);
          if (std::isnan(expected)) EXPECT_TRUE(std::isnan(got)) << i << ", " << j;
          else EXPECT_EQ(got, expected) << "row " << i << ", column " << j;
        }
      }
    }
  }
}

}  // namespace
}  // namespace divkit_test
