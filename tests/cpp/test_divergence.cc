// The table-driven harness: every divergence variant x input dtype pair x shape against the fp64
// reference computed from the same (rounded) inputs. Per-token losses (reduction none) and both
// gradients (fp32) are compared, then the forward-only path (no gradient views) with reduction
// mean.
#include <sstream>
#include <tuple>

#include "test_util.h"

namespace divkit_test {
namespace {

struct DTypePair {
  DType s, t;
};

struct Shape {
  int64_t n, v;
  double temperature;
  int large;  // 0: always; 1: main variants with one input dtype (V = 32000);
              // 2: main variants with fp32 or bf16 inputs (V = 128256)
};

// Big V with small N, N = 1000 with small V: the whole table stays within seconds.
const std::vector<Shape>& shapes() {
  static const std::vector<Shape> s = {
      {1, 1, 1.0, 0},    {3, 1, 1.0, 0},     {3, 7, 1.0, 0},
      {1000, 7, 1.0, 0}, {3, 31, 2.0, 0},    {100, 31, 1.0, 0},
      {3, 4097, 0.5, 0}, {1, 32000, 1.0, 1}, {1, 128256, 1.0, 2},
  };
  return s;
}

bool run_shape(const Shape& sh, const Variant& var, const DTypePair& dts) {
  if (sh.large == 0) return true;
  if (!var.main || dts.s != dts.t) return false;
  if (sh.large == 1) return dts.s != DType::f64;
  return dts.s == DType::f32 || dts.s == DType::bf16;
}

using TableParam = std::tuple<Variant, DTypePair>;

class DivergenceTable : public ::testing::TestWithParam<TableParam> {};

TEST_P(DivergenceTable, MatchesReference) {
  const auto& [variant, dts] = GetParam();
  uint64_t seed = std::hash<std::string>{}(variant.name) ^ (static_cast<uint64_t>(dts.s) << 8) ^
                  (static_cast<uint64_t>(dts.t) << 16);
  for (const Shape& sh : shapes()) {
    if (!run_shape(sh, variant, dts)) continue;
    DivergenceSpec spec = variant.spec;
    spec.temperature = static_cast<float>(sh.temperature);
    std::ostringstream what;
    what << spec_string(spec) << " s=" << dtype_short(dts.s) << " t=" << dtype_short(dts.t)
         << " N=" << sh.n << " V=" << sh.v;
    SCOPED_TRACE(what.str());
    Logits l = random_logits(sh.n, sh.v, dts.s, dts.t, seed++);

    TestOptions opt;
    opt.reduction = Reduction::none;
    const KernelOut got =
        run_kernel(l.student, l.teacher, spec, opt, GradRequest::of(), GradRequest::of());
    const divkit_ref::Result want = run_reference(l.student, l.teacher, spec, opt);
    expect_matches_reference(got, want, Tolerance{}, what.str());

    TestOptions mean_opt;
    mean_opt.reduction = Reduction::mean;
    const KernelOut fwd = run_kernel(l.student, l.teacher, spec, mean_opt);
    const divkit_ref::Result want_mean = run_reference(l.student, l.teacher, spec, mean_opt, false);
    compare_values(fwd.loss, want_mean.loss, want_mean.loss_scale, Tolerance{},
                   what.str() + " forward-only mean loss");
    if (::testing::Test::HasFailure()) return;  // one failing shape is enough to read
  }
}

std::vector<DTypePair> dtype_pairs() {
  return {{DType::f32, DType::f32}, {DType::bf16, DType::bf16}, {DType::f16, DType::f16},
          {DType::f64, DType::f64}, {DType::bf16, DType::f32},  {DType::f32, DType::f16},
          {DType::f64, DType::bf16}};
}

std::string table_name(const ::testing::TestParamInfo<TableParam>& info) {
  const auto& [variant, dts] = info.param;
  return variant.name + "_" + dtype_short(dts.s) + "_" + dtype_short(dts.t);
}

INSTANTIATE_TEST_SUITE_P(AllKinds, DivergenceTable,
                         ::testing::Combine(::testing::ValuesIn(all_variants()),
                                            ::testing::ValuesIn(dtype_pairs())),
                         table_name);

// The table must cover every kind of the public enum.
TEST(DivergenceTableCoverage, EveryKindIsInTheTable) {
  std::vector<bool> seen(divkit::kNumDivergenceKinds, false);
  for (const Variant& v : all_variants()) seen[static_cast<int>(v.spec.kind)] = true;
  for (int k = 0; k < divkit::kNumDivergenceKinds; ++k)
    EXPECT_TRUE(seen[k]) << divkit::divergence_kind_name(static_cast<DivergenceKind>(k));
}

}  // namespace
}  // namespace divkit_test
