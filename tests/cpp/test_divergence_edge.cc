// Layouts, outputs and options: non-contiguous rows, in-place gradients, low-precision gradient
// outputs, the teacher gradient, ignored tokens, weights, reductions, num_items_in_batch, the T^2
// factor, large logits, -inf masks and infinite divergences.
#include <cmath>
#include <sstream>

#include "test_util.h"

namespace divkit_test {
namespace {

const std::vector<DType> kFloatDTypes = {DType::f32, DType::bf16, DType::f16, DType::f64};

// ---- layouts ---------------------------------------------------------------------------------

TEST(DivergenceLayout, NonContiguousRows) {
  for (const Variant& var : default_variants()) {
    for (DType dt : {DType::f32, DType::bf16}) {
      for (int64_t v : {int64_t{7}, int64_t{33}, int64_t{1000}}) {
        const int64_t n = 5;
        std::ostringstream what;
        what << var.name << " " << dtype_short(dt) << " V=" << v;
        SCOPED_TRACE(what.str());
        Logits l = random_logits(n, v, dt, DType::f32, 11 + v, 2.0, v + 5, v + 3);
        DivergenceSpec spec = var.spec;
        spec.temperature = 1.3f;
        TestOptions opt;
        opt.reduction = Reduction::none;
        const KernelOut got =
            run_kernel(l.student, l.teacher, spec, opt, GradRequest::of(DType::f32, v + 7),
                       GradRequest::of(DType::f32, v + 2));
        expect_matches_reference(got, run_reference(l.student, l.teacher, spec, opt), Tolerance{},
                                 what.str());
        EXPECT_TRUE(l.student.padding_intact());
        EXPECT_TRUE(l.teacher.padding_intact());
      }
    }
  }
}

TEST(DivergenceLayout, InPlaceGradientEqualsOutOfPlaceBitForBit) {
  for (const Variant& var : default_variants()) {
    for (DType dt : kFloatDTypes) {
      for (int64_t stride_pad : {int64_t{0}, int64_t{3}}) {
        const int64_t n = 9, v = 37;
        std::ostringstream what;
        what << var.name << " " << dtype_short(dt) << " stride pad " << stride_pad;
        SCOPED_TRACE(what.str());
        Logits l = random_logits(n, v, dt, DType::bf16, 100 + stride_pad, 2.0, v + stride_pad);
        TestOptions opt;
        opt.reduction = Reduction::mean;
        opt.labels = {1, -100, 3, 4, -100, 6, 7, 8, 9};
        opt.weights = {1.0, 2.0, 0.5, 1.5, 1.0, 0.25, 1.0, 3.0, 1.0};
        l.student.fill_row(1, kNaN);  // ignored rows may hold anything
        l.student.fill_row(4, 1e30);
        DivergenceSpec spec = var.spec;
        spec.temperature = 1.7f;

        HostMatrix s_copy = l.student;
        const KernelOut out_of_place =
            run_kernel(s_copy, l.teacher, spec, opt, GradRequest::of(dt, v + stride_pad),
                       GradRequest::of());
        EXPECT_TRUE(s_copy.same_bits(l.student)) << "out-of-place call modified the student";
        HostMatrix s_inplace = l.student;
        const KernelOut in_place = run_kernel(s_inplace, l.teacher, spec, opt, GradRequest::none(),
                                              GradRequest::of(), true);
        EXPECT_TRUE(in_place.grad_s.same_bits(out_of_place.grad_s))
            << "in-place gradient differs from the out-of-place gradient";
        EXPECT_TRUE(in_place.grad_t.same_bits(out_of_place.grad_t));
        ASSERT_EQ(in_place.loss.size(), 1u);
        EXPECT_EQ(in_place.loss[0], out_of_place.loss[0]);
        EXPECT_TRUE(in_place.grad_s.padding_intact());
        for (int64_t j = 0; j < v; ++j) {
          EXPECT_EQ(in_place.grad_s.get(1, j), 0.0) << "ignored row 1 of an in-place gradient";
          EXPECT_EQ(in_place.grad_s.get(4, j), 0.0) << "ignored row 4 of an in-place gradient";
        }
        // and both against the reference
        const auto want = run_reference(l.student, l.teacher, spec, opt);
        compare_grad(out_of_place.grad_s, want.grad_s, want.scale_s, output_tolerance(dt),
                     what.str());
      }
    }
  }
}

// A large row in place: the kernel must have read the whole row before writing into it.
TEST(DivergenceLayout, InPlaceLargeRows) {
  for (const Variant& var : default_variants()) {
    SCOPED_TRACE(var.name);
    const int64_t n = 2, v = 32000;
    Logits l = random_logits(n, v, DType::f32, DType::f32, 5);
    TestOptions opt;
    opt.reduction = Reduction::sum;
    HostMatrix s = l.student;
    const KernelOut in_place =
        run_kernel(s, l.teacher, var.spec, opt, GradRequest::none(), GradRequest::none(), true);
    expect_matches_reference(in_place, run_reference(l.student, l.teacher, var.spec, opt),
                             Tolerance{}, var.name + " in place");
  }
}

// fp32 rows whose row block exceeds L2 (V = 262144: 4 MB of block, more than any L2 here): the
// terms sweep reads the logits from the input rows instead of the block's copies. Against the
// reference; in place (the gradient overwrites the rows being read) and with the teacher gradient
// too, the same bits as the student gradient alone out of place; with row strides.
TEST(DivergenceLayout, LargeFp32RowsReadFromTheInputs) {
  for (const Variant& var : default_variants()) {
    SCOPED_TRACE(var.name);
    const int64_t n = 3, v = 262144;
    Logits l = random_logits(n, v, DType::f32, DType::f32, 77, 2.0, v + 16, v + 48);
    TestOptions opt;
    opt.reduction = Reduction::none;
    DivergenceSpec spec = var.spec;
    spec.temperature = 1.3f;
    HostMatrix s_copy = l.student;
    const KernelOut alone = run_kernel(s_copy, l.teacher, spec, opt, GradRequest::of());
    expect_matches_reference(alone, run_reference(l.student, l.teacher, spec, opt), Tolerance{},
                             var.name + " large rows");
    EXPECT_TRUE(s_copy.same_bits(l.student)) << "out-of-place call modified the student";
    HostMatrix s_inplace = l.student;
    const KernelOut in_place =
        run_kernel(s_inplace, l.teacher, spec, opt, GradRequest::none(), GradRequest::none(), true);
    EXPECT_TRUE(in_place.grad_s.same_bits(alone.grad_s)) << "in place differs";
    EXPECT_EQ(in_place.loss, alone.loss);
    if (var.spec.kind == DivergenceKind::renyi) continue;  // another route for the student alone
    HostMatrix s_both = l.student;
    const KernelOut both =
        run_kernel(s_both, l.teacher, spec, opt, GradRequest::of(), GradRequest::of());
    EXPECT_TRUE(both.grad_s.same_bits(alone.grad_s)) << "with the teacher gradient";
  }
}

// Large fp32 rows with the student gradient alone: a chain-rule kind writes each row's gradient
// during the next row's terms sweep (the deferred pass 3), so a thread's rows interleave. With an
// ignored row, a row of infinite divergence for the kinds that have one (masked student entries
// where the teacher has mass), a nearly disjoint row (Renyi's uncached route) and a last row of
// every thread's share between them: the same bits as with the teacher gradient (no deferral;
// Renyi: as with one thread) for 1, 2 and 3 threads, and against the reference.
TEST(DivergenceLayout, LargeFp32RowsDeferredGradientBetweenSkippedRows) {
  RuntimeGuard guard;
  for (const Variant& var : default_variants()) {
    SCOPED_TRACE(var.name);
    // Renyi takes another route for the student gradient alone: not compared to `both`.
    const bool renyi = var.spec.kind == DivergenceKind::renyi;
    const int64_t n = 7, v = 262144;
    Logits l = random_logits(n, v, DType::f32, DType::f32, 91, 2.0, v, v);
    for (int64_t j = 0; j < v; j += 3) l.student.set(3, j, -kInf);
    for (int64_t j = 0; j < v; ++j) {  // row 4 nearly disjoint: Renyi's uncached route
      if (j < v / 2) l.student.set(4, j, l.student.get(4, j) + 30.0);
      else l.teacher.set(4, j, l.teacher.get(4, j) + 30.0);
    }
    TestOptions opt;
    opt.reduction = Reduction::none;
    opt.labels.assign(static_cast<size_t>(n), 0);
    opt.labels[1] = -100;
    opt.labels[5] = -100;
    const DivergenceSpec spec = var.spec;
    HostMatrix s_both = l.student;
    divkit::set_num_threads(2);
    const KernelOut both =
        run_kernel(s_both, l.teacher, spec, opt, GradRequest::of(), GradRequest::of());
    HostMatrix one_thread;
    for (int threads : {1, 2, 3}) {
      divkit::set_num_threads(threads);
      HostMatrix s_alone = l.student;
      const KernelOut alone = run_kernel(s_alone, l.teacher, spec, opt, GradRequest::of());
      if (renyi) {
        if (threads == 1) one_thread = alone.grad_s;
        else EXPECT_TRUE(alone.grad_s.same_bits(one_thread)) << threads << " threads";
      } else {
        EXPECT_TRUE(alone.grad_s.same_bits(both.grad_s)) << threads << " threads";
      }
      for (int64_t i = 0; i < n; ++i) {
        if (std::isinf(both.loss[i])) EXPECT_EQ(alone.loss[i], both.loss[i]) << "row " << i;
        else
          EXPECT_NEAR(alone.loss[i], both.loss[i], 1e-6 * std::fabs(both.loss[i])) << "row " << i;
      }
      if (threads == 1)
        expect_matches_reference(alone, run_reference(l.student, l.teacher, spec, opt), Tolerance{},
                                 var.name + " deferred");
    }
  }
}

// The student gradient alone and with the teacher gradient come from different instantiations
// of the terms sweep (the second also computes the teacher factor): they must give the student
// gradient the same bits, out of place and in place (where the gradient overwrites the rows
// being read), with V not a multiple of the vector width, a row stride and a large V. (The loss
// is compared to 1e-6: the alpha divergence's terms may round differently in the last bit in
// the two instantiations.) Renyi takes another route for the student gradient alone.
TEST(DivergenceLayout, StudentGradientSameBitsWithOrWithoutTeacherGradient) {
  for (const Variant& var : default_variants()) {
    if (var.spec.kind == DivergenceKind::renyi) continue;
    for (DType dt : {DType::f32, DType::bf16, DType::f16}) {
      for (int64_t v : {int64_t{37}, int64_t{1000}, int64_t{70001}}) {
        const int64_t n = v > 1000 ? 3 : 7;
        std::ostringstream what;
        what << var.name << " " << dtype_short(dt) << " V=" << v;
        SCOPED_TRACE(what.str());
        Logits l = random_logits(n, v, dt, dt, 300 + v, 2.0, v + 3, v + 5);
        TestOptions opt;
        opt.reduction = Reduction::none;
        opt.labels.assign(static_cast<size_t>(n), 0);
        opt.labels[1] = -100;
        l.student.fill_row(1, kNaN);  // ignored rows may hold anything
        DivergenceSpec spec = var.spec;
        spec.temperature = 1.7f;

        HostMatrix s_both = l.student;
        const KernelOut both =
            run_kernel(s_both, l.teacher, spec, opt, GradRequest::of(dt, v + 1), GradRequest::of());
        HostMatrix s_alone = l.student;
        const KernelOut alone = run_kernel(s_alone, l.teacher, spec, opt,
                                           GradRequest::of(dt, v + 1), GradRequest::none());
        EXPECT_TRUE(s_alone.same_bits(l.student)) << "out-of-place call modified the student";
        HostMatrix s_inplace = l.student;
        const KernelOut in_place = run_kernel(s_inplace, l.teacher, spec, opt, GradRequest::none(),
                                              GradRequest::none(), true);
        EXPECT_TRUE(alone.grad_s.same_bits(both.grad_s)) << "differs with the teacher gradient";
        EXPECT_TRUE(in_place.grad_s.same_bits(both.grad_s)) << "in place differs";
        ASSERT_EQ(alone.loss.size(), static_cast<size_t>(n));
        for (int64_t i = 0; i < n; ++i) {
          EXPECT_NEAR(alone.loss[i], both.loss[i], 1e-6 * std::fabs(both.loss[i])) << "row " << i;
          EXPECT_EQ(in_place.loss[i], alone.loss[i]) << "row " << i;
        }
        for (int64_t j = 0; j < v; ++j)
          ASSERT_EQ(in_place.grad_s.get(1, j), 0.0) << "ignored row 1 of an in-place gradient";
        const auto want = run_reference(l.student, l.teacher, spec, opt);
        compare_grad(in_place.grad_s, want.grad_s, want.scale_s, output_tolerance(dt), what.str());
      }
    }
  }
}

TEST(DivergenceOutputs, LowPrecisionGradientDtypes) {
  for (const Variant& var : default_variants()) {
    for (DType gdt : {DType::bf16, DType::f16, DType::f64}) {
      const int64_t n = 4, v = 257;
      std::ostringstream what;
      what << var.name << " grad dtype " << dtype_short(gdt);
      SCOPED_TRACE(what.str());
      Logits l = random_logits(n, v, DType::f32, DType::f32, 21);
      TestOptions opt;
      opt.reduction = Reduction::sum;
      const KernelOut low = run_kernel(l.student, l.teacher, var.spec, opt, GradRequest::of(gdt),
                                       GradRequest::of(gdt));
      const KernelOut f32 =
          run_kernel(l.student, l.teacher, var.spec, opt, GradRequest::of(), GradRequest::of());
      expect_matches_reference(low, run_reference(l.student, l.teacher, var.spec, opt),
                               output_tolerance(gdt), what.str());
      // The low-precision gradient is the fp32 gradient rounded: within one rounding of it.
      const Tolerance round_tol{0.0, 0.0, output_tolerance(gdt).out_rel,
                                output_tolerance(gdt).out_abs};
      const std::vector<double> zeros(static_cast<size_t>(n * v), 0.0);
      compare_grad(low.grad_s, f32.grad_s.values(), zeros, round_tol,
                   what.str() + " vs fp32 grad_student");
      compare_grad(low.grad_t, f32.grad_t.values(), zeros, round_tol,
                   what.str() + " vs fp32 grad_teacher");
    }
  }
}

TEST(DivergenceOutputs, TeacherGradientAloneAndWithStudent) {
  for (const Variant& var : all_variants()) {
    SCOPED_TRACE(var.name);
    Logits l = random_logits(6, 101, DType::bf16, DType::f16, 31);
    TestOptions opt;
    opt.reduction = Reduction::batchmean;
    DivergenceSpec spec = var.spec;
    spec.temperature = 0.8f;
    const auto want = run_reference(l.student, l.teacher, spec, opt);
    const KernelOut only_t =
        run_kernel(l.student, l.teacher, spec, opt, GradRequest::none(), GradRequest::of());
    expect_matches_reference(only_t, want, Tolerance{}, var.name + " teacher only");
    const KernelOut both =
        run_kernel(l.student, l.teacher, spec, opt, GradRequest::of(), GradRequest::of());
    expect_matches_reference(both, want, Tolerance{}, var.name + " both");
    const KernelOut only_s =
        run_kernel(l.student, l.teacher, spec, opt, GradRequest::of(), GradRequest::none());
    expect_matches_reference(only_s, want, Tolerance{}, var.name + " student only");
  }
}

TEST(DivergenceOutputs, LossViewShapesForReducedLoss) {
  // A reduced loss may be written into a [1] view or a [1, 1] view.
  Logits l = random_logits(3, 17, DType::f32, DType::f32, 3);
  divkit::DivergenceSpec spec;
  divkit::DivergenceOptions o;
  o.reduction = Reduction::sum;
  float loss2d = NAN;
  divkit::DivergenceOutputs out;
  out.loss = TensorView::matrix(&loss2d, DType::f32, 1, 1);
  divkit::divergence(l.student.view(), l.teacher.view(), spec, o, out);
  TestOptions opt;
  opt.reduction = Reduction::sum;
  const auto want = run_reference(l.student, l.teacher, spec, opt, false);
  compare_values({loss2d}, want.loss, want.loss_scale, Tolerance{}, "[1,1] loss view");
}

TEST(DivergenceOutputs, ConvenienceF32MatchesGeneralEntryPoint) {
  for (const Variant& var : default_variants()) {
    SCOPED_TRACE(var.name);
    const int64_t n = 5, v = 40;
    Logits l = random_logits(n, v, DType::f32, DType::f32, 8);
    std::vector<float> s(n * v), t(n * v), g(n * v, NAN);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < v; ++j) {
        s[i * v + j] = static_cast<float>(l.student.get(i, j));
        t[i * v + j] = static_cast<float>(l.teacher.get(i, j));
      }
    const float loss =
        divkit::divergence_f32(s.data(), t.data(), n, v, var.spec, Reduction::mean, g.data());
    TestOptions opt;
    opt.reduction = Reduction::mean;
    const KernelOut got = run_kernel(l.student, l.teacher, var.spec, opt, GradRequest::of());
    EXPECT_EQ(loss, static_cast<float>(got.loss[0]));
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < v; ++j)
        ASSERT_EQ(g[i * v + j], static_cast<float>(got.grad_s.get(i, j)));
    // without a gradient pointer
    const float loss2 = divkit::divergence_f32(s.data(), t.data(), n, v, var.spec, Reduction::sum);
    opt.reduction = Reduction::sum;
    const auto want = run_reference(l.student, l.teacher, var.spec, opt, false);
    compare_values({loss2}, want.loss, want.loss_scale, Tolerance{}, "divergence_f32 sum");
  }
}

// ---- ignored tokens, weights, reductions -----------------------------------------------------

struct OptCase {
  std::string name;
  TestOptions opt;
  bool t2 = false;
};

std::vector<OptCase> option_cases(int64_t n) {
  std::vector<int64_t> labels(n);
  std::vector<double> weights(n);
  for (int64_t i = 0; i < n; ++i) {
    labels[i] = (i % 3 == 1) ? -100 : i;
    weights[i] = 0.25 + 0.5 * static_cast<double>(i % 4);
  }
  std::vector<OptCase> cases;
  for (Reduction r : {Reduction::none, Reduction::sum, Reduction::mean, Reduction::batchmean}) {
    const std::string rn = divkit::reduction_name(r);
    TestOptions o;
    o.reduction = r;
    cases.push_back({rn, o});
    o.labels = labels;
    cases.push_back({rn + "_labels_i64", o});
    o.labels_dtype = DType::i32;
    cases.push_back({rn + "_labels_i32", o});
    o.weights = weights;
    cases.push_back({rn + "_labels_weights_f32", o});
    o.weights_dtype = DType::f64;
    cases.push_back({rn + "_labels_weights_f64", o, true});
    if (r == Reduction::mean || r == Reduction::batchmean) {
      o.num_items_in_batch = 37.0;
      cases.push_back({rn + "_num_items", o});
    }
  }
  TestOptions custom;
  custom.reduction = Reduction::mean;
  custom.ignore_index = 7;
  custom.labels = labels;  // -100 is an ordinary label here; label 7 is ignored
  custom.labels[2] = 7;
  custom.labels[5] = 7;
  cases.push_back({"custom_ignore_index", custom});
  return cases;
}

TEST(DivergenceOptions, ReductionsLabelsWeights) {
  const int64_t n = 12, v = 29;
  for (const Variant& var : default_variants()) {
    for (const OptCase& oc : option_cases(n)) {
      const std::string what = var.name + " " + oc.name;
      SCOPED_TRACE(what);
      Logits l = random_logits(n, v, DType::f32, DType::bf16, 77);
      for (int64_t i = 0; i < n; ++i)
        if (!oc.opt.labels.empty() && oc.opt.labels[i] == oc.opt.ignore_index)
          l.student.fill_row(i, kNaN);
      DivergenceSpec spec = var.spec;
      spec.temperature = 2.0f;
      spec.scale_by_t_squared = oc.t2;
      const KernelOut got =
          run_kernel(l.student, l.teacher, spec, oc.opt, GradRequest::of(), GradRequest::of());
      expect_matches_reference(got, run_reference(l.student, l.teacher, spec, oc.opt), Tolerance{},
                               what);
      // ignored tokens: loss 0 (reduction none) and zero gradients
      for (int64_t i = 0; i < n; ++i) {
        if (oc.opt.labels.empty() || oc.opt.labels[i] != oc.opt.ignore_index) continue;
        if (oc.opt.reduction == Reduction::none) {
          EXPECT_EQ(got.loss[i], 0.0) << "ignored row " << i;
        }
        for (int64_t j = 0; j < v; ++j) {
          ASSERT_EQ(got.grad_s.get(i, j), 0.0) << "ignored row " << i;
          ASSERT_EQ(got.grad_t.get(i, j), 0.0) << "ignored row " << i;
        }
      }
    }
  }
}

// num_items_in_batch with reduction sum: the header says it replaces the divisor; the reference
// divides the sum by it (Hugging Face's convention for gradient accumulation).
TEST(DivergenceOptions, NumItemsInBatchWithSum) {
  Logits l = random_logits(6, 50, DType::f32, DType::f32, 9);
  TestOptions opt;
  opt.reduction = Reduction::sum;
  opt.num_items_in_batch = 4.0;
  const DivergenceSpec spec = make_spec(DivergenceKind::forward_kl);
  const KernelOut got = run_kernel(l.student, l.teacher, spec, opt, GradRequest::of());
  expect_matches_reference(got, run_reference(l.student, l.teacher, spec, opt), Tolerance{},
                           "sum / num_items_in_batch");
}

TEST(DivergenceOptions, ScaleByTSquared) {
  for (const Variant& var : default_variants()) {
    SCOPED_TRACE(var.name);
    Logits l = random_logits(4, 64, DType::f32, DType::f32, 12);
    TestOptions opt;
    opt.reduction = Reduction::mean;
    DivergenceSpec spec = var.spec;
    spec.temperature = 3.0f;
    spec.scale_by_t_squared = true;
    const KernelOut scaled =
        run_kernel(l.student, l.teacher, spec, opt, GradRequest::of(), GradRequest::of());
    expect_matches_reference(scaled, run_reference(l.student, l.teacher, spec, opt), Tolerance{},
                             var.name);
    spec.scale_by_t_squared = false;
    const KernelOut plain = run_kernel(l.student, l.teacher, spec, opt, GradRequest::of());
    EXPECT_NEAR(scaled.loss[0], 9.0 * plain.loss[0], 1e-6 * std::fabs(9.0 * plain.loss[0]) + 1e-7);
  }
}

TEST(DivergenceOptions, AllTokensIgnored) {
  const int64_t n = 4, v = 19;
  for (const Variant& var : default_variants()) {
    for (Reduction r : {Reduction::none, Reduction::sum, Reduction::mean, Reduction::batchmean}) {
      const std::string what = var.name + " " + divkit::reduction_name(r);
      SCOPED_TRACE(what);
      Logits l = random_logits(n, v, DType::f32, DType::f32, 1);
      l.student.fill_row(0, kNaN);
      l.teacher.fill_row(1, kNaN);
      l.student.fill_row(2, -kInf);
      l.teacher.fill_row(3, -kInf);
      TestOptions opt;
      opt.reduction = r;
      opt.labels = {-100, -100, -100, -100};
      for (bool in_place : {false, true}) {
        HostMatrix s = l.student;
        const KernelOut got = run_kernel(s, l.teacher, var.spec, opt,
                                         in_place ? GradRequest::none() : GradRequest::of(),
                                         GradRequest::of(), in_place);
        for (double x : got.loss) EXPECT_EQ(x, 0.0) << "all tokens ignored: loss must be 0";
        for (int64_t i = 0; i < n; ++i)
          for (int64_t j = 0; j < v; ++j) {
            ASSERT_EQ(got.grad_s.get(i, j), 0.0);
            ASSERT_EQ(got.grad_t.get(i, j), 0.0);
          }
      }
    }
  }
}

TEST(DivergenceOptions, ZeroWeightRowContributesNothing) {
  Logits l = random_logits(3, 23, DType::f32, DType::f32, 2);
  TestOptions opt;
  opt.reduction = Reduction::mean;
  opt.weights = {1.0, 0.0, 2.0};
  for (const Variant& var : default_variants()) {
    const KernelOut got =
        run_kernel(l.student, l.teacher, var.spec, opt, GradRequest::of(), GradRequest::of());
    expect_matches_reference(got, run_reference(l.student, l.teacher, var.spec, opt), Tolerance{},
                             var.name);
    for (int64_t j = 0; j < 23; ++j) ASSERT_EQ(got.grad_s.get(1, j), 0.0) << var.name;
  }
}

// ---- large logits, masks, infinite divergences -----------------------------------------------

TEST(DivergenceExtremes, LogitsOfPlusMinus1e4) {
  for (const Variant& var : all_variants()) {
    for (DType dt : {DType::f32, DType::bf16}) {
      for (int64_t v : {int64_t{31}, int64_t{4097}}) {
        const int64_t n = v > 100 ? 2 : 6;
        const std::string what = var.name + " " + dtype_short(dt) + " V=" + std::to_string(v);
        SCOPED_TRACE(what);
        Logits l(random_logits(n, v, dt, dt, 3));
        std::mt19937_64 rng(v);
        std::uniform_real_distribution<double> u(-1e4, 1e4);
        for (int64_t i = 0; i < n; ++i)
          for (int64_t j = 0; j < v; ++j) {
            // Row 0: extreme +-1e4 only; other rows: uniform in [-1e4, 1e4]; odd rows share
            // the teacher's argmax with the student so that some divergences stay finite.
            const double s = i == 0 ? ((j % 3) ? -1e4 : 1e4) : u(rng);
            const double t =
                i == 0 ? ((j % 2) ? -1e4 : 1e4) : (i % 2 ? s + 0.001 * u(rng) : u(rng));
            l.student.set(i, j, s);
            l.teacher.set(i, j, t);
          }
        TestOptions opt;
        opt.reduction = Reduction::none;
        const KernelOut got =
            run_kernel(l.student, l.teacher, var.spec, opt, GradRequest::of(), GradRequest::of());
        const auto want = run_reference(l.student, l.teacher, var.spec, opt);
        expect_matches_reference(got, want, Tolerance{}, what);
        for (int64_t i = 0; i < n; ++i) {
          EXPECT_FALSE(std::isnan(got.loss[i])) << "row " << i;
          EXPECT_GE(got.loss[i], -1e-6) << "row " << i;
        }
      }
    }
  }
}

// A constant added to every logit changes nothing mathematically; an fp32 kernel that takes
// log p = x - lse with lse rounded to fp32 loses ~ulp(|x|) of absolute accuracy in every log
// probability (5e-4 at |x| = 1e4), while (x - max) - log(sum) keeps it.
TEST(DivergenceExtremes, LargeLogitOffsetKeepsAccuracy) {
  for (const Variant& var : default_variants()) {
    for (double offset : {30.0, 100.0, 1000.0, 10000.0}) {
      const std::string what = var.name + " offset " + std::to_string(offset);
      SCOPED_TRACE(what);
      Logits l = random_logits(4, 300, DType::f32, DType::f32, 19);
      for (int64_t i = 0; i < 4; ++i)
        for (int64_t j = 0; j < 300; ++j) {
          l.student.set(i, j, l.student.get(i, j) + offset);
          l.teacher.set(i, j, i == 3 ? l.student.get(i, j) : l.teacher.get(i, j) - offset);
        }
      TestOptions opt;
      opt.reduction = Reduction::none;
      const KernelOut got =
          run_kernel(l.student, l.teacher, var.spec, opt, GradRequest::of(), GradRequest::of());
      expect_matches_reference(got, run_reference(l.student, l.teacher, var.spec, opt), Tolerance{},
                               what);
    }
  }
}

// Renyi's student gradient w^ - q at every distance between p and q: rows near p = q, and rows
// so far apart that L = log sum w is far from 0 (alpha < 1: L << 0, where a form scaled by
// e^-L would amplify the rounding of q; alpha > 1: L >> 0), with the student gradient alone
// (the kernel's cached path) and with the teacher's.
TEST(DivergenceExtremes, RenyiGradientAtEveryDistance) {
  for (double alpha : {0.3, 0.5, 0.8, 2.0}) {
    for (double sigma : {0.05, 2.0, 6.0}) {
      for (bool teacher : {false, true}) {
        const std::string what = "renyi alpha " + std::to_string(alpha) + " sigma " +
                                 std::to_string(sigma) + (teacher ? " with teacher" : "");
        SCOPED_TRACE(what);
        Logits l = random_logits(3, 777, DType::f32, DType::f32, 23, sigma);
        TestOptions opt;
        opt.reduction = Reduction::none;
        const DivergenceSpec spec = make_spec(DivergenceKind::renyi, alpha);
        const KernelOut got = run_kernel(l.student, l.teacher, spec, opt, GradRequest::of(),
                                         teacher ? GradRequest::of() : GradRequest::none());
        expect_matches_reference(got, run_reference(l.student, l.teacher, spec, opt), Tolerance{},
                                 what);
      }
    }
  }
}

// exp of a large argument must overflow to +inf (and the divergence be +inf), never wrap to a
// wrong finite or negative value; Renyi's value log(sum) / (alpha - 1) is finite and moderate
// even when its sum overflows fp32.
TEST(DivergenceExtremes, HugeRatiosOverflowToInfinityOrStayFinite) {
  using K = DivergenceKind;
  for (double gap : {80.0, 100.0, 200.0, 1000.0, 5000.0}) {
    for (const Variant& var : {Variant{"chi2", make_spec(K::chi2)},
                               Variant{"alpha2", make_spec(K::alpha_divergence, 2.0)},
                               Variant{"alpha-0.5", make_spec(K::alpha_divergence, -0.5)},
                               Variant{"renyi2", make_spec(K::renyi, 2.0)},
                               Variant{"renyi0.5", make_spec(K::renyi, 0.5)}}) {
      const std::string what = var.name + " gap " + std::to_string(gap);
      SCOPED_TRACE(what);
      HostMatrix s(1, 2, DType::f32), t(1, 2, DType::f32);
      s.set(0, 0, 0.0), s.set(0, 1, -gap);
      t.set(0, 0, -gap), t.set(0, 1, 0.0);
      TestOptions opt;
      opt.reduction = Reduction::sum;
      const KernelOut got = run_kernel(s, t, var.spec, opt, GradRequest::of(), GradRequest::of());
      const auto want = run_reference(s, t, var.spec, opt);
      EXPECT_GE(got.loss[0], 0.0);
      expect_matches_reference(got, want, Tolerance{}, what);
    }
  }
}

// A row whose fp64 sum is finite but beyond the fp32 range: its fp32 loss is +inf, so it must
// get the zero gradient of an infinite divergence, not inf / NaN.
TEST(DivergenceExtremes, RowOverflowingFp32GetsZeroGradient) {
  for (double gap : {89.0, 90.0, 90.5, 91.0, 92.0}) {
    SCOPED_TRACE("gap " + std::to_string(gap));
    HostMatrix s(1, 5, DType::f32), t(1, 5, DType::f32);
    for (int64_t j = 0; j < 5; ++j) {
      s.set(0, j, j == 0 ? 0.0 : -gap);
      t.set(0, j, j == 0 ? -gap : 0.0);
    }
    TestOptions opt;
    opt.reduction = Reduction::sum;
    const DivergenceSpec spec = make_spec(DivergenceKind::chi2);
    const KernelOut got = run_kernel(s, t, spec, opt, GradRequest::of(), GradRequest::of());
    for (int64_t j = 0; j < 5; ++j) {
      EXPECT_TRUE(std::isfinite(got.grad_s.get(0, j))) << "entry " << j << " loss " << got.loss[0];
      EXPECT_TRUE(std::isfinite(got.grad_t.get(0, j))) << "entry " << j << " loss " << got.loss[0];
      if (std::isinf(got.loss[0])) {
        EXPECT_EQ(got.grad_s.get(0, j), 0.0) << "entry " << j;
        EXPECT_EQ(got.grad_t.get(0, j), 0.0) << "entry " << j;
      }
    }
  }
}

// skew KL with alpha = 0 is KL itself, +inf where the mixture has a zero the other side lacks.
TEST(DivergenceExtremes, SkewKlAtAlphaZeroIsInfiniteWhereKlIs) {
  HostMatrix s(1, 2, DType::f32), t(1, 2, DType::f32);
  s.set(0, 0, 0.0), s.set(0, 1, -kInf);
  t.set(0, 0, 0.0), t.set(0, 1, 0.0);
  TestOptions opt;
  opt.reduction = Reduction::sum;
  EXPECT_EQ(run_kernel(s, t, make_spec(DivergenceKind::forward_kl), opt).loss[0], kInf);
  EXPECT_EQ(run_kernel(s, t, make_spec(DivergenceKind::skew_forward_kl, 0.0), opt).loss[0], kInf)
      << "skew_forward_kl(alpha=0) = KL(p || q) with q_1 = 0 < p_1";
  EXPECT_EQ(run_kernel(t, s, make_spec(DivergenceKind::skew_reverse_kl, 0.0), opt).loss[0], kInf)
      << "skew_reverse_kl(alpha=0) = KL(q || p) with p_1 = 0 < q_1";
}

enum class MaskMode { common, student_only, teacher_only, disjoint };

TEST(DivergenceExtremes, NegInfMasksAndInfiniteDivergences) {
  const int64_t n = 6, v = 41;
  for (const Variant& var : all_variants()) {
    for (MaskMode mode :
         {MaskMode::common, MaskMode::student_only, MaskMode::teacher_only, MaskMode::disjoint}) {
      for (DType dt : {DType::f32, DType::f16}) {
        const std::string what = var.name + " mask mode " + std::to_string(static_cast<int>(mode)) +
                                 " " + dtype_short(dt);
        SCOPED_TRACE(what);
        Logits l = random_logits(n, v, dt, dt, 17);
        // Rows 0 and 3 unmasked; rows 1, 2, 4, 5 masked in various amounts.
        for (int64_t i : {1, 2, 4, 5}) {
          for (int64_t j = 0; j < v; ++j) {
            const bool masked = (j * 7 + i) % (i + 1) == 0;  // row-dependent pattern
            switch (mode) {
              case MaskMode::common:
                if (masked) {
                  l.student.set(i, j, -kInf);
                  l.teacher.set(i, j, -kInf);
                }
                break;
              case MaskMode::student_only:
                if (masked) l.student.set(i, j, -kInf);
                break;
              case MaskMode::teacher_only:
                if (masked) l.teacher.set(i, j, -kInf);
                break;
              case MaskMode::disjoint:
                if (j < v / 2) l.student.set(i, j, -kInf);
                else l.teacher.set(i, j, -kInf);
                break;
            }
          }
        }
        TestOptions opt;
        opt.reduction = Reduction::none;
        const KernelOut got =
            run_kernel(l.student, l.teacher, var.spec, opt, GradRequest::of(), GradRequest::of());
        const auto want = run_reference(l.student, l.teacher, var.spec, opt);
        expect_matches_reference(got, want, Tolerance{}, what);
        for (int64_t i = 0; i < n; ++i) {
          EXPECT_FALSE(std::isnan(got.loss[i])) << "row " << i;
          if (std::isinf(want.loss[i])) {
            EXPECT_EQ(got.loss[i], kInf) << "row " << i << ": an infinite divergence is +inf";
            for (int64_t j = 0; j < v; ++j) {
              ASSERT_EQ(got.grad_s.get(i, j), 0.0) << "row " << i << " of an infinite divergence";
              ASSERT_EQ(got.grad_t.get(i, j), 0.0) << "row " << i << " of an infinite divergence";
            }
          }
        }
        // A reduced loss with an infinite row is +inf (never NaN) and the other rows keep their
        // gradient.
        TestOptions sum_opt;
        sum_opt.reduction = Reduction::mean;
        const KernelOut red =
            run_kernel(l.student, l.teacher, var.spec, sum_opt, GradRequest::of());
        expect_matches_reference(red, run_reference(l.student, l.teacher, var.spec, sum_opt),
                                 Tolerance{}, what + " mean");
      }
    }
  }
}

TEST(DivergenceExtremes, SingleUnmaskedEntry) {
  // Rows where only one entry is finite: p or q is one-hot.
  const int64_t v = 9;
  for (const Variant& var : all_variants()) {
    SCOPED_TRACE(var.name);
    Logits l = random_logits(3, v, DType::f32, DType::f32, 4);
    for (int64_t j = 0; j < v; ++j) {
      if (j != 4)
        l.student.set(0, j, -kInf), l.teacher.set(0, j, -kInf);  // both one-hot, same entry
      if (j != 2) l.teacher.set(1, j, -kInf);                    // teacher one-hot
      if (j != 6) l.student.set(2, j, -kInf);                    // student one-hot
    }
    TestOptions opt;
    opt.reduction = Reduction::none;
    const KernelOut got =
        run_kernel(l.student, l.teacher, var.spec, opt, GradRequest::of(), GradRequest::of());
    expect_matches_reference(got, run_reference(l.student, l.teacher, var.spec, opt), Tolerance{},
                             var.name);
  }
}

TEST(DivergenceExtremes, TemperatureVariants) {
  for (const Variant& var : default_variants()) {
    for (double temp : {0.25, 0.5, 2.0, 3.0, 10.0}) {
      const std::string what = var.name + " T=" + std::to_string(temp);
      SCOPED_TRACE(what);
      Logits l = random_logits(5, 300, DType::f32, DType::f32, 6);
      DivergenceSpec spec = var.spec;
      spec.temperature = static_cast<float>(temp);
      TestOptions opt;
      opt.reduction = Reduction::none;
      const KernelOut got =
          run_kernel(l.student, l.teacher, spec, opt, GradRequest::of(), GradRequest::of());
      expect_matches_reference(got, run_reference(l.student, l.teacher, spec, opt), Tolerance{},
                               what);
    }
  }
}

}  // namespace
}  // namespace divkit_test
