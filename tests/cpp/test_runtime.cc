// Runtime settings: results identical bit for bit for any thread count, every SIMD target the
// machine has against the reference, names and small utilities.
#include <set>

#include "test_util.h"

namespace divkit_test {
namespace {

struct TwoRuns {
  KernelOut none, sum;
};

TwoRuns run_both(Logits& l, const DivergenceSpec& spec) {
  TwoRuns r;
  TestOptions none;
  none.reduction = Reduction::none;
  none.labels.assign(static_cast<size_t>(l.student.rows()), 1);
  none.labels[3] = -100;
  r.none =
      run_kernel(l.student, l.teacher, spec, none, GradRequest::of(), GradRequest::of(DType::bf16));
  TestOptions sum;
  sum.reduction = Reduction::sum;
  sum.weights.assign(static_cast<size_t>(l.student.rows()), 0.5);
  r.sum = run_kernel(l.student, l.teacher, spec, sum, GradRequest::of(DType::f16));
  return r;
}

void expect_same_bits(const TwoRuns& a, const TwoRuns& b, const std::string& what) {
  EXPECT_EQ(a.none.loss, b.none.loss) << what;
  EXPECT_EQ(a.sum.loss, b.sum.loss) << what;
  EXPECT_TRUE(a.none.grad_s.same_bits(b.none.grad_s)) << what;
  EXPECT_TRUE(a.none.grad_t.same_bits(b.none.grad_t)) << what;
  EXPECT_TRUE(a.sum.grad_s.same_bits(b.sum.grad_s)) << what;
}

TEST(Runtime, ResultsAreBitIdenticalForAnyThreadCount) {
  RuntimeGuard guard;
  for (const Variant& var : default_variants()) {
    SCOPED_TRACE(var.name);
    for (auto [n, v] : {std::pair<int64_t, int64_t>{301, 1000}, {7, 20000}}) {
      Logits l = random_logits(n, v, DType::bf16, DType::f32, 60 + n);
      divkit::set_num_threads(1);
      ASSERT_EQ(divkit::get_num_threads(), 1);
      const TwoRuns one = run_both(l, var.spec);
      divkit::set_num_threads(2);
      ASSERT_EQ(divkit::get_num_threads(), 2);
      const TwoRuns two = run_both(l, var.spec);
      divkit::set_num_threads(3);
      const TwoRuns three = run_both(l, var.spec);
      expect_same_bits(one, two, "1 vs 2 threads");
      expect_same_bits(one, three, "1 vs 3 threads");
    }
  }
}

TEST(Runtime, SetNumThreadsRejectsLessThanOne) {
  RuntimeGuard guard;
  expect_error([] { divkit::set_num_threads(0); }, {}, {}, "set_num_threads(0)");
  expect_error([] { divkit::set_num_threads(-3); }, {}, {}, "set_num_threads(-3)");
  EXPECT_GE(divkit::get_num_threads(), 1);
}

TEST(Runtime, EverySimdTargetMatchesTheReference) {
  RuntimeGuard guard;
  const std::vector<std::string> targets = divkit::available_simd_targets();
  ASSERT_FALSE(targets.empty());
  std::set<std::string> unique(targets.begin(), targets.end());
  EXPECT_EQ(unique.size(), targets.size()) << "duplicate target names";
  struct Shape {
    int64_t n, v;
  };
  const std::vector<Shape> shapes = {{3, 1}, {3, 7}, {5, 31}, {2, 4097}, {64, 33}, {1, 40000}};
  for (const std::string& target : targets) {
    SCOPED_TRACE("SIMD target " + target);
    divkit::force_simd_target(target);
    EXPECT_EQ(divkit::active_simd_target(), target);
    for (const Variant& var : all_variants()) {
      for (DType dt : {DType::f32, DType::bf16, DType::f16}) {
        for (const Shape& sh : shapes) {
          if (dt != DType::f32 && !var.main) continue;
          if (sh.v > 10000 && (!var.main || dt != DType::f32)) continue;
          const std::string what = var.name + " " + dtype_short(dt) + " N=" + std::to_string(sh.n) +
                                   " V=" + std::to_string(sh.v) + " on " + target;
          Logits l = random_logits(sh.n, sh.v, dt, dt, 70 + sh.v);
          if (sh.n > 2 && sh.v >= 3) {  // a few masked entries in row 2
            for (int64_t j = 0; j < sh.v; j += 3) {
              l.student.set(2, j, -kInf);
              l.teacher.set(2, j, -kInf);
            }
          }
          DivergenceSpec spec = var.spec;
          spec.temperature = 1.5f;
          TestOptions opt;
          opt.reduction = Reduction::none;
          const KernelOut got =
              run_kernel(l.student, l.teacher, spec, opt, GradRequest::of(), GradRequest::of());
          expect_matches_reference(got, run_reference(l.student, l.teacher, spec, opt), Tolerance{},
                                   what);
          if (::testing::Test::HasFailure()) return;
        }
      }
    }
  }
  divkit::force_simd_target("");
  EXPECT_EQ(divkit::active_simd_target(), targets.front())
      << "force_simd_target(\"\") restores the best target";
}

TEST(Runtime, VersionAndNames) {
  EXPECT_FALSE(divkit::version().empty());
  EXPECT_EQ(divkit::dtype_size(DType::f32), 4u);
  EXPECT_EQ(divkit::dtype_size(DType::bf16), 2u);
  EXPECT_EQ(divkit::dtype_size(DType::f16), 2u);
  EXPECT_EQ(divkit::dtype_size(DType::f64), 8u);
  EXPECT_EQ(divkit::dtype_size(DType::i32), 4u);
  EXPECT_EQ(divkit::dtype_size(DType::i64), 8u);
  EXPECT_STREQ(divkit::dtype_name(DType::f32), "float32");
  EXPECT_STREQ(divkit::dtype_name(DType::bf16), "bfloat16");
  EXPECT_STREQ(divkit::dtype_name(DType::f16), "float16");
  EXPECT_STREQ(divkit::dtype_name(DType::f64), "float64");
  EXPECT_STREQ(divkit::dtype_name(DType::i32), "int32");
  EXPECT_STREQ(divkit::dtype_name(DType::i64), "int64");
  const char* kinds[] = {"forward_kl",       "reverse_kl",      "jsd",
                         "skew_forward_kl",  "skew_reverse_kl", "tvd",
                         "hellinger",        "jeffreys",        "chi2",
                         "alpha_divergence", "renyi",           "cross_entropy"};
  for (int k = 0; k < divkit::kNumDivergenceKinds; ++k) {
    const auto kind = static_cast<DivergenceKind>(k);
    EXPECT_STREQ(divkit::divergence_kind_name(kind), kinds[k]);
    EXPECT_EQ(divkit::parse_divergence_kind(kinds[k]), kind);
  }
  const char* reds[] = {"none", "sum", "mean", "batchmean"};
  for (int r = 0; r < 4; ++r) {
    EXPECT_STREQ(divkit::reduction_name(static_cast<Reduction>(r)), reds[r]);
    EXPECT_EQ(divkit::parse_reduction(reds[r]), static_cast<Reduction>(r));
  }
}

}  // namespace
}  // namespace divkit_test
