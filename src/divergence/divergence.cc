// Token-level divergences: argument checks, the reduction (core/reduction.h), and the hand-off to
// the SIMD row kernels (divergence_kernels.cc). The formulas live in divergences-inl.h.
#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include "core/check.h"
#include "core/cuda_device.h"
#include "core/element.h"
#include "core/reduction.h"
#include "divergence/divergence_cuda.h"
#include "divergence/row_job.h"
#include "divkit/divergence.h"
#include "divkit/runtime.h"
#include "divkit/vocab_parallel.h"

namespace divkit {
namespace {

constexpr const char* kFn = "divergence";

constexpr const char* kKindNames[kNumDivergenceKinds] = {
    "forward_kl", "reverse_kl", "jsd",  "skew_forward_kl",  "skew_reverse_kl", "tvd",
    "hellinger",  "jeffreys",   "chi2", "alpha_divergence", "renyi",           "cross_entropy",
};

// A gradient output may be its input's own buffer (in place) but must not partly overlap it.
bool check_gradient_output(const char* name, const TensorView& grad, const char* input_name,
                           const TensorView& input) {
  check::float_matrix(kFn, name, grad, /*is_output=*/true);
  if (grad.shape[0] != input.shape[0] || grad.shape[1] != input.shape[1])
    check::fail(kFn, std::string(name) + " must have the shape of " + input_name + " " +
                         check::shape_string(input) + ", got " + check::shape_string(grad));
  if (!check::ranges_overlap(grad, input)) return false;
  if (grad.data == input.data && grad.dtype == input.dtype &&
      (grad.shape[0] <= 1 || grad.strides[0] == input.strides[0]))
    return true;
  check::fail(kFn, std::string(name) + " overlaps " + input_name +
                       " without being the same buffer (same data, dtype and strides)");
}

}  // namespace

const char* divergence_kind_name(DivergenceKind kind) {
  const int k = static_cast<int>(kind);
  return (k >= 0 && k < kNumDivergenceKinds) ? kKindNames[k] : "unknown";
}

DivergenceKind parse_divergence_kind(std::string_view name, const char* fn) {
  std::string all;
  for (int k = 0; k < kNumDivergenceKinds; ++k) {
    if (name == kKindNames[k]) return static_cast<DivergenceKind>(k);
    all += (k ? ", " : "") + std::string(kKindNames[k]);
  }
  throw Error(std::string(fn) + ": kind '" + std::string(name) +
              "' is unknown; valid kinds: " + all);
}

const char* reduction_name(Reduction r) {
  switch (r) {
    case Reduction::none: return "none";
    case Reduction::sum: return "sum";
    case Reduction::mean: return "mean";
    case Reduction::batchmean: return "batchmean";
  }
  return "unknown";
}

Reduction parse_reduction(std::string_view name) {
  for (Reduction r : {Reduction::none, Reduction::sum, Reduction::mean, Reduction::batchmean})
    if (name == reduction_name(r)) return r;
  throw Error(std::string(kFn) + ": reduction '" + std::string(name) +
              "' is unknown; valid reductions: none, sum, mean, batchmean");
}

void validate_spec(const DivergenceSpec& s, const char* fn) {
  using K = DivergenceKind;
  const int k = static_cast<int>(s.kind);
  if (k < 0 || k >= kNumDivergenceKinds)
    check::fail(fn, "kind code " + std::to_string(k) + " is unknown");
  const std::string kind = divergence_kind_name(s.kind);
  if (!(s.temperature > 0.0f) || !std::isfinite(s.temperature))
    check::fail(fn, "temperature must be finite and > 0, got " + check::fmt(s.temperature));
  if (s.kind == K::jsd && !(s.beta >= 0.0f && s.beta <= 1.0f))
    check::fail(fn, "beta must be in [0, 1] for jsd, got " + check::fmt(s.beta));
  if ((s.kind == K::skew_forward_kl || s.kind == K::skew_reverse_kl) &&
      !(s.alpha >= 0.0f && s.alpha <= 1.0f))
    check::fail(fn, "alpha must be in [0, 1] for " + kind + ", got " + check::fmt(s.alpha));
  if (s.kind == K::alpha_divergence && !std::isfinite(s.alpha))
    check::fail(fn, "alpha must be finite for alpha_divergence, got " + check::fmt(s.alpha));
  if (s.kind == K::renyi && !(s.alpha > 0.0f && std::isfinite(s.alpha)))
    check::fail(fn, "alpha must be finite and > 0 for renyi, got " + check::fmt(s.alpha));
}

void check::divergence_spec(const char* fn, const DivergenceSpec& spec) { validate_spec(spec, fn); }

void divergence(const TensorView& student, const TensorView& teacher, const DivergenceSpec& spec,
                const DivergenceOptions& options, const DivergenceOutputs& outputs) {
  check::views(kFn, {{"student_logits", student},
                     {"teacher_logits", teacher},
                     {"labels", options.labels},
                     {"weights", options.weights},
                     {"loss", outputs.loss},
                     {"grad_student", outputs.grad_student},
                     {"grad_teacher", outputs.grad_teacher}});
  const cuda::Placement where = cuda::placement(kFn, {{"student_logits", &student},
                                                      {"teacher_logits", &teacher},
                                                      {"labels", &options.labels},
                                                      {"weights", &options.weights},
                                                      {"loss", &outputs.loss},
                                                      {"grad_student", &outputs.grad_student},
                                                      {"grad_teacher", &outputs.grad_teacher}});
  if (where.device == Device::cuda) {
#if DIVKIT_HAS_CUDA
    return detail::divergence_cuda(student, teacher, spec, options, outputs);
#else
    cuda::not_built(kFn);
#endif
  }
  validate_spec(spec);
  detail::check_logit_pair(kFn, student, teacher);
  const int64_t n = student.shape[0], v = student.shape[1];

  const reduce::Plan plan = reduce::plan(kFn, n, options, outputs.loss);

  detail::RowJob job;
  job.spec = detail::resolve_divergence_limits(spec);
  job.student = detail::row_input(student);
  job.teacher = detail::row_input(teacher);
  job.n = n;
  job.v = v;
  job.active = plan.active.data();
  job.num_threads = get_num_threads();
  bool in_place = false;
  if (outputs.grad_student.defined()) {
    in_place |=
        check_gradient_output("grad_student", outputs.grad_student, "student_logits", student);
    if (check::ranges_overlap(outputs.grad_student, teacher))
      check::fail(kFn, "grad_student overlaps teacher_logits");
    job.grad_student = detail::row_output(outputs.grad_student);
  }
  if (outputs.grad_teacher.defined()) {
    in_place |=
        check_gradient_output("grad_teacher", outputs.grad_teacher, "teacher_logits", teacher);
    if (check::ranges_overlap(outputs.grad_teacher, student))
      check::fail(kFn, "grad_teacher overlaps student_logits");
    if (outputs.grad_student.defined() &&
        check::ranges_overlap(outputs.grad_teacher, outputs.grad_student))
      check::fail(kFn, "grad_teacher overlaps grad_student");
    job.grad_teacher = detail::row_output(outputs.grad_teacher);
  }

  // In place, a bad row found midway would leave other rows overwritten: by default every row
  // is checked first (a read of both inputs). With check_finite off, each row is checked as the
  // kernel reads it (it writes no gradient into a bad row), and the error says what changed.
  const bool probe_first = in_place && options.check_finite;
  const char* note = in_place && !probe_first
                         ? " (in place with check_finite off: the other rows of the gradient's "
                           "input may already hold their gradient)"
                         : "";
  auto throw_if_bad = [&](const detail::RowJob& j) {
    constexpr const char* kNoMass = " has every logit -inf (no distribution)";
    detail::throw_bad_row(kFn, "student_logits", j.bad_student, kNoMass, note);
    detail::throw_bad_row(kFn, "teacher_logits", j.bad_teacher, kNoMass, note);
  };

  if (probe_first) {
    detail::RowJob probe = job;
    probe.check_only = true;
    probe.grad_student = {};
    probe.grad_teacher = {};
    detail::run_divergence_rows(probe);
    throw_if_bad(probe);
  }

  std::vector<double> row_loss(static_cast<size_t>(n), 0.0);
  job.grad_scale = plan.grad_scale.data();
  job.row_loss = row_loss.data();
  detail::run_divergence_rows(job);
  throw_if_bad(job);
  const double t2 = spec.scale_by_t_squared ? double(spec.temperature) * spec.temperature : 1.0;
  reduce::store_loss(plan, row_loss.data(), t2, outputs.loss);
}

float divergence_f32(const float* student, const float* teacher, int64_t n, int64_t v,
                     const DivergenceSpec& spec, Reduction reduction, float* grad_student) {
  float loss_buf = 0.0f;
  DivergenceOptions options;
  options.reduction = reduction == Reduction::none ? Reduction::sum : reduction;
  DivergenceOutputs out;
  out.loss = TensorView::vector(&loss_buf, DType::f32, 1);
  if (grad_student) out.grad_student = TensorView::matrix(grad_student, DType::f32, n, v);
  divergence(TensorView::matrix(const_cast<float*>(student), DType::f32, n, v),
             TensorView::matrix(const_cast<float*>(teacher), DType::f32, n, v), spec, options, out);
  return loss_buf;
}

// ---- vocabulary-parallel building blocks (vocab_parallel.h) ---------------------------------

namespace {

struct ShardSetup {
  detail::RowJob job;
  std::vector<uint8_t> active;
  std::vector<double> row_loss;
};

void check_f64_rows(const char* fn, const char* name, const TensorView& t, int64_t n,
                    int64_t cols) {
  if (!t.defined()) check::fail(fn, std::string(name) + " is required");
  if (t.dtype != DType::f64 || t.ndim != 2 || t.shape[0] != n || t.shape[1] != cols ||
      (cols > 1 && t.strides[1] != 1) || (n > 1 && t.strides[0] != cols))
    check::fail(fn, std::string(name) + " must be a contiguous float64 [" + std::to_string(n) +
                        ", " + std::to_string(cols) + "] array, got " + dtype_name(t.dtype) + " " +
                        check::shape_string(t));
}

void shard_setup(const char* fn, const TensorView& student, const TensorView& teacher,
                 const DivergenceSpec& spec, const TensorView& labels, int64_t ignore_index,
                 ShardSetup& s) {
  check::divergence_spec(fn, spec);
  detail::check_logit_pair(fn, student, teacher, /*need_vocab=*/false);  // a shard may be empty
  const int64_t n = student.shape[0];
  s.active = reduce::active_rows(fn, labels, ignore_index, n);
  s.row_loss.assign(static_cast<size_t>(n), 0.0);
  s.job.spec = detail::resolve_divergence_limits(spec);
  s.job.student = detail::row_input(student);
  s.job.teacher = detail::row_input(teacher);
  s.job.n = n;
  s.job.v = student.shape[1];
  s.job.active = s.active.data();
  s.job.row_loss = s.row_loss.data();
  s.job.num_threads = get_num_threads();
}

void shard_run(const char* fn, detail::RowJob& job) {
  detail::run_divergence_rows(job);  // sharded rows report NaN/+inf only
  detail::throw_bad_row(fn, "student_logits", job.bad_student);
  detail::throw_bad_row(fn, "teacher_logits", job.bad_teacher);
}

}  // namespace

void divergence_shard_stats(const TensorView& student, const TensorView& teacher,
                            const DivergenceSpec& spec, const TensorView& labels,
                            int64_t ignore_index, const TensorView& stats) {
  constexpr const char* fn = "divergence_shard_stats";
  check::views(fn, {{"student_logits", student},
                    {"teacher_logits", teacher},
                    {"labels", labels},
                    {"stats", stats}});
  ShardSetup s;
  shard_setup(fn, student, teacher, spec, labels, ignore_index, s);
  check_f64_rows(fn, "stats", stats, s.job.n, 4);
  double* out = static_cast<double*>(stats.data);
  std::fill(out, out + 4 * s.job.n, 0.0);
  s.job.shard = detail::ShardMode::stats;
  s.job.out_stats = out;
  shard_run(fn, s.job);
}

void divergence_shard_sums(const TensorView& student, const TensorView& teacher,
                           const DivergenceSpec& spec, const TensorView& labels,
                           int64_t ignore_index, const TensorView& norm, const TensorView& sums) {
  constexpr const char* fn = "divergence_shard_sums";
  check::views(fn, {{"student_logits", student},
                    {"teacher_logits", teacher},
                    {"labels", labels},
                    {"norm", norm},
                    {"sums", sums}});
  ShardSetup s;
  shard_setup(fn, student, teacher, spec, labels, ignore_index, s);
  check_f64_rows(fn, "norm", norm, s.job.n, 4);
  check_f64_rows(fn, "sums", sums, s.job.n, 4);
  double* out = static_cast<double*>(sums.data);
  std::fill(out, out + 4 * s.job.n, 0.0);
  s.job.shard = detail::ShardMode::sums;
  s.job.in_norm = static_cast<const double*>(norm.data);
  s.job.out_sums = out;
  shard_run(fn, s.job);
}

void divergence_shard_grad(const TensorView& student, const TensorView& teacher,
                           const DivergenceSpec& spec, const TensorView& labels,
                           int64_t ignore_index, const TensorView& norm, const TensorView& sums,
                           const TensorView& grad_scale, const TensorView& grad_student,
                           const TensorView& grad_teacher) {
  constexpr const char* fn = "divergence_shard_grad";
  check::views(fn, {{"student_logits", student},
                    {"teacher_logits", teacher},
                    {"labels", labels},
                    {"norm", norm},
                    {"sums", sums},
                    {"grad_scale", grad_scale},
                    {"grad_student", grad_student},
                    {"grad_teacher", grad_teacher}});
  ShardSetup s;
  shard_setup(fn, student, teacher, spec, labels, ignore_index, s);
  check_f64_rows(fn, "norm", norm, s.job.n, 4);
  check_f64_rows(fn, "sums", sums, s.job.n, 4);
  check::vector_of(fn, "grad_scale", grad_scale, s.job.n, {DType::f64});
  std::vector<double> scale(static_cast<size_t>(s.job.n));
  for (int64_t i = 0; i < s.job.n; ++i) {
    scale[i] = elem::get(grad_scale, i);
    if (!std::isfinite(scale[i]))
      check::fail(fn, "grad_scale must be finite (index " + std::to_string(i) + ")");
    if (scale[i] == 0.0) s.active[i] = 0;  // skipped: its gradient rows are zeroed
  }
  for (const auto& [g, x, name] : {std::tuple{&grad_student, &student, "grad_student"},
                                   std::tuple{&grad_teacher, &teacher, "grad_teacher"}}) {
    if (!g->defined()) continue;
    check::float_matrix(fn, name, *g, /*is_output=*/true);
    if (g->shape[0] != x->shape[0] || g->shape[1] != x->shape[1])
      check::fail(fn, std::string(name) + " must have the shape of the logits " +
                          check::shape_string(*x));
    if (check::ranges_overlap(*g, student) || check::ranges_overlap(*g, teacher))
      check::fail(fn, std::string(name) + " must not overlap the logits");
  }
  s.job.shard = detail::ShardMode::grad;
  s.job.in_norm = static_cast<const double*>(norm.data);
  s.job.in_sums = static_cast<const double*>(sums.data);
  s.job.grad_scale = scale.data();
  s.job.grad_student = detail::row_output(grad_student);
  s.job.grad_teacher = detail::row_output(grad_teacher);
  shard_run(fn, s.job);
}

void detail::check_logit_pair(const char* fn, const TensorView& student, const TensorView& teacher,
                              bool need_vocab) {
  check::float_matrix(fn, "student_logits", student);
  check::float_matrix(fn, "teacher_logits", teacher);
  if (student.shape[0] != teacher.shape[0] || student.shape[1] != teacher.shape[1])
    check::fail(fn, "student_logits " + check::shape_string(student) + " and teacher_logits " +
                        check::shape_string(teacher) + " must have the same shape");
  if (need_vocab && student.shape[1] == 0)
    check::fail(fn, "student_logits has V = 0 (an empty vocabulary)");
}

void detail::throw_bad_row(const char* fn, const char* name, const BadRow& bad,
                           const char* no_mass_what, const char* note) {
  if (bad.row < 0) return;
  const std::string row = std::to_string(bad.row);
  if (bad.no_mass)
    check::fail(fn, std::string(name) + " row " + row + no_mass_what +
                        "; mark it with labels = ignore_index" + note);
  check::fail(fn, std::string(name) + " contains NaN or +inf at row " + row + note);
}

// The kernels implement jsd for 0 < beta < 1, alpha_divergence for alpha not in {0, 1}, renyi
// for alpha != 1 and the skew KLs for alpha > 0; the end points are KL exactly.
DivergenceSpec detail::resolve_divergence_limits(DivergenceSpec s) {
  using K = DivergenceKind;
  if (s.kind == K::jsd && s.beta == 0.0f) s.kind = K::forward_kl;
  if (s.kind == K::jsd && s.beta == 1.0f) s.kind = K::reverse_kl;
  if (s.kind == K::alpha_divergence && s.alpha == 1.0f) s.kind = K::forward_kl;
  if (s.kind == K::alpha_divergence && s.alpha == 0.0f) s.kind = K::reverse_kl;
  if (s.kind == K::renyi && s.alpha == 1.0f) s.kind = K::forward_kl;
  if (s.kind == K::skew_forward_kl && s.alpha == 0.0f) s.kind = K::forward_kl;
  if (s.kind == K::skew_reverse_kl && s.alpha == 0.0f) s.kind = K::reverse_kl;
  return s;
}

}  // namespace divkit
