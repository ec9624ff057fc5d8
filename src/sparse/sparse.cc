// Sparse (top-k) and truncated teachers: argument checks, the reduction (core/reduction.h), and
// the hand-off to the SIMD row kernels (sparse_kernels.cc). The divergences are those of
// src/divergence/divergences-inl.h.
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "core/check.h"
#include "core/cuda_device.h"
#include "core/element.h"
#include "core/reduction.h"
#include "divkit/runtime.h"
#include "divkit/sparse.h"
#include "sparse/sparse_job.h"
#if DIVKIT_HAS_CUDA
#include "sparse/sparse_cuda.h"
#endif

namespace divkit {
namespace {

constexpr const char* kSparseFn = "sparse_divergence";
constexpr const char* kTopkFn = "topk_divergence";
// Log-probabilities are <= 0; servers round, so a little above 0 is accepted (and clamped by
// the renormalization or the tail's clamp at 0).
constexpr double kLogprobTolerance = 1e-3;
// In bucket mode the k probabilities may sum to at most 1 + this (rounding), else error.
constexpr double kMassTolerance = 1e-2;

void throw_if_bad(const char* fn, const detail::SparseJob& job, bool renormalized) {
  detail::throw_bad_row(fn, "student_logits", job.bad_student,
                        renormalized ? " is -inf at every teacher index (no student probability to "
                                       "renormalize)"
                                     : " has every logit -inf (no distribution)");
  detail::throw_bad_row(fn, "teacher_logits", job.bad_teacher);
}

// Runs the job (a probe first when the gradient is written in place), then reduces.
void run(const char* fn, detail::SparseJob& job, bool in_place, const reduce::Plan& plan,
         const DivergenceSpec& spec, const TensorView& loss) {
  const bool renormalized =
      job.teacher.data != nullptr || job.tail == SparseTail::renormalize || job.k == job.v;
  if (in_place) {
    detail::SparseJob probe = job;
    probe.check_only = true;
    probe.grad_student = {};
    detail::run_sparse_rows(probe);
    throw_if_bad(fn, probe, renormalized);
  }
  std::vector<double> row_loss(static_cast<size_t>(job.n), 0.0);
  job.grad_scale = plan.grad_scale.data();
  job.row_loss = row_loss.data();
  detail::run_sparse_rows(job);
  throw_if_bad(fn, job, renormalized);
  const double t2 = spec.scale_by_t_squared ? double(spec.temperature) * spec.temperature : 1.0;
  reduce::store_loss(plan, row_loss.data(), t2, loss);
}

detail::SparseInput sparse_input(const TensorView& t) {
  return {t.data, t.dtype, t.strides[0], t.ndim > 1 ? t.strides[1] : 1};
}

// [N, k] tensor of the given dtypes on the CPU.
void check_nk(const char* fn, const char* name, const TensorView& t, int64_t n,
              std::initializer_list<DType> dtypes) {
  const std::string arg(name);
  if (t.device != Device::cpu) check::fail(fn, arg + " must be on the CPU");
  if (t.ndim != 2)
    check::fail(fn, arg + " must be 2-D [N, k], got shape " + check::shape_string(t));
  if (t.shape[0] != n)
    check::fail(fn, arg + " has " + std::to_string(t.shape[0]) +
                        " rows, but student_logits has N = " + std::to_string(n) + " (shape " +
                        check::shape_string(t) + ")");
  check::dtype_in(fn, name, t, dtypes);
  if (t.numel() > 0 && t.data == nullptr) check::fail(fn, arg + " has a null data pointer");
}

}  // namespace

namespace detail {

// grad_student: [N, V] float output, the student buffer itself (in place) or disjoint from it
// and from the other inputs. Returns true when in place.
bool check_sparse_grad_output(
    const char* fn, const TensorView& grad, const TensorView& student,
    std::initializer_list<std::pair<const char*, const TensorView*>> others) {
  check::float_matrix(fn, "grad_student", grad, /*is_output=*/true);
  if (grad.shape[0] != student.shape[0] || grad.shape[1] != student.shape[1])
    check::fail(fn, "grad_student must have the shape of student_logits " +
                        check::shape_string(student) + ", got " + check::shape_string(grad));
  for (const auto& [name, t] : others)
    if (t->defined() && t->ndim == 2 && check::ranges_overlap(grad, *t))
      check::fail(fn, std::string("grad_student overlaps ") + name);
  if (!check::ranges_overlap(grad, student)) return false;
  if (grad.data == student.data && grad.dtype == student.dtype &&
      (grad.shape[0] <= 1 || grad.strides[0] == student.strides[0]))
    return true;
  check::fail(fn,
              "grad_student overlaps student_logits without being the same buffer (same "
              "data, dtype and strides)");
}

void check_sparse_teacher(const char* fn, const SparseInput& indices, const SparseInput& logprobs,
                          int64_t n, int64_t v, int64_t k, SparseTail tail, const uint8_t* active) {
  std::vector<int64_t> seen(static_cast<size_t>(v), -1);  // last row that used each index
  const bool renormalized = tail == SparseTail::renormalize || k == v;
  for (int64_t i = 0; i < n; ++i) {
    if (active != nullptr && !active[i]) continue;
    const std::string row = " at row " + std::to_string(i);
    double m = -std::numeric_limits<double>::infinity();
    for (int64_t b = 0; b < k; ++b) {
      const int64_t j = elem::load_index(indices.data, indices.dtype, indices.offset(i, b));
      if (j < 0 || j >= v)
        check::fail(fn, "teacher_indices holds " + std::to_string(j) + row + ", column " +
                            std::to_string(b) + ", outside the vocabulary [0, " +
                            std::to_string(v) + ")");
      if (seen[j] == i)
        check::fail(fn, "teacher_indices repeats index " + std::to_string(j) + row +
                            " (each of a row's k entries must be a distinct token)");
      seen[j] = i;
      const double lp = elem::load(logprobs.data, logprobs.dtype, logprobs.offset(i, b));
      if (std::isnan(lp) || lp > kLogprobTolerance)
        check::fail(fn, "teacher_logprobs must be log-probabilities (<= 0, or -inf), got " +
                            check::fmt(lp) + row + ", column " + std::to_string(b) +
                            (lp > 0 ? " (logits instead of log-probabilities?)" : ""));
      m = std::max(m, lp);
    }
    if (m == -std::numeric_limits<double>::infinity()) {
      if (renormalized)
        check::fail(fn,
                    "teacher_logprobs are all -inf" + row +
                        ": nothing to renormalize (use "
                        "tail='bucket' with k < V, or mark the row with labels = ignore_index)");
      continue;
    }
    if (tail == SparseTail::bucket) {
      double acc = 0.0;
      for (int64_t b = 0; b < k; ++b) {
        acc += std::exp(elem::load(logprobs.data, logprobs.dtype, logprobs.offset(i, b)) - m);
      }
      const double mass = std::exp(m) * acc;
      if (mass > 1.0 + kMassTolerance)
        check::fail(fn, "teacher_logprobs" + row + " have probabilities summing to " +
                            check::fmt(mass) +
                            " > 1; tail='bucket' needs log-probabilities of one distribution (pass "
                            "tail='renormalize' for unnormalized scores)");
    }
  }
}

}  // namespace detail

const char* sparse_tail_name(SparseTail tail) {
  switch (tail) {
    case SparseTail::renormalize: return "renormalize";
    case SparseTail::bucket: return "bucket";
  }
  return "unknown";
}

SparseTail parse_sparse_tail(std::string_view name) {
  if (name == "renormalize") return SparseTail::renormalize;
  if (name == "bucket") return SparseTail::bucket;
  throw Error(std::string(kSparseFn) + ": tail '" + std::string(name) +
              "' is unknown; valid tails: renormalize, bucket");
}

void sparse_divergence(const TensorView& student, const TensorView& teacher_indices,
                       const TensorView& teacher_logprobs, const DivergenceSpec& spec,
                       const SparseOptions& sparse, const DivergenceOptions& options,
                       const SparseOutputs& outputs) {
  constexpr const char* fn = kSparseFn;
  check::views(fn, {{"student_logits", student},
                    {"teacher_indices", teacher_indices},
                    {"teacher_logprobs", teacher_logprobs},
                    {"labels", options.labels},
                    {"weights", options.weights},
                    {"loss", outputs.loss},
                    {"grad_student", outputs.grad_student}});
  const cuda::Placement where = cuda::placement(fn, {{"student_logits", &student},
                                                     {"teacher_indices", &teacher_indices},
                                                     {"teacher_logprobs", &teacher_logprobs},
                                                     {"labels", &options.labels},
                                                     {"weights", &options.weights},
                                                     {"loss", &outputs.loss},
                                                     {"grad_student", &outputs.grad_student}});
  if (where.device == Device::cuda) {
#if DIVKIT_HAS_CUDA
    return detail::sparse_divergence_cuda(student, teacher_indices, teacher_logprobs, spec, sparse,
                                          options, outputs);
#else
    cuda::not_built(fn);
#endif
  }
  check::divergence_spec(fn, spec);
  if (sparse.tail != SparseTail::renormalize && sparse.tail != SparseTail::bucket)
    check::fail(fn, "tail code " + std::to_string(static_cast<int>(sparse.tail)) + " is unknown");
  check::float_matrix(fn, "student_logits", student);
  const int64_t n = student.shape[0], v = student.shape[1];
  if (v == 0) check::fail(fn, "student_logits has V = 0 (an empty vocabulary)");
  check_nk(fn, "teacher_indices", teacher_indices, n, {DType::i64, DType::i32});
  check_nk(fn, "teacher_logprobs", teacher_logprobs, n, {DType::f32, DType::f64, DType::bf16});
  const int64_t k = teacher_indices.shape[1];
  if (teacher_logprobs.shape[1] != k)
    check::fail(fn, "teacher_logprobs " + check::shape_string(teacher_logprobs) +
                        " and teacher_indices " + check::shape_string(teacher_indices) +
                        " must have the same shape");
  if (k < 1) check::fail(fn, "teacher_indices has k = 0 entries per row; k must be >= 1");
  if (k > v)
    check::fail(fn, "teacher_indices has k = " + std::to_string(k) +
                        " entries per row, more than "
                        "the vocabulary V = " +
                        std::to_string(v));

  const reduce::Plan plan = reduce::plan(fn, n, options, outputs.loss);
  detail::SparseJob job;
  job.spec = detail::resolve_divergence_limits(spec);
  job.tail = sparse.tail;
  job.student = detail::row_input(student);
  job.n = n;
  job.v = v;
  job.k = k;
  job.indices = sparse_input(teacher_indices);
  job.logprobs = sparse_input(teacher_logprobs);
  job.active = plan.active.data();
  job.num_threads = get_num_threads();
  bool in_place = false;
  if (outputs.grad_student.defined()) {
    in_place = detail::check_sparse_grad_output(fn, outputs.grad_student, student,
                                                {{"teacher_indices", &teacher_indices},
                                                 {"teacher_logprobs", &teacher_logprobs}});
    job.grad_student = detail::row_output(outputs.grad_student);
  }
  detail::check_sparse_teacher(fn, job.indices, job.logprobs, n, v, k, sparse.tail, job.active);
  run(fn, job, in_place, plan, spec, outputs.loss);
}

void topk_divergence(const TensorView& student, const TensorView& teacher, int64_t k,
                     const DivergenceSpec& spec, const DivergenceOptions& options,
                     const SparseOutputs& outputs) {
  constexpr const char* fn = kTopkFn;
  check::views(fn, {{"student_logits", student},
                    {"teacher_logits", teacher},
                    {"labels", options.labels},
                    {"weights", options.weights},
                    {"loss", outputs.loss},
                    {"grad_student", outputs.grad_student}});
  const cuda::Placement where = cuda::placement(fn, {{"student_logits", &student},
                                                     {"teacher_logits", &teacher},
                                                     {"labels", &options.labels},
                                                     {"weights", &options.weights},
                                                     {"loss", &outputs.loss},
                                                     {"grad_student", &outputs.grad_student}});
  if (where.device == Device::cuda) {
#if DIVKIT_HAS_CUDA
    return detail::topk_divergence_cuda(student, teacher, k, spec, options, outputs);
#else
    cuda::not_built(fn);
#endif
  }
  check::divergence_spec(fn, spec);
  detail::check_logit_pair(fn, student, teacher);
  const int64_t n = student.shape[0], v = student.shape[1];
  if (k < 1 || k > v)
    check::fail(fn, "k must be in [1, V = " + std::to_string(v) + "], got " + std::to_string(k));

  const reduce::Plan plan = reduce::plan(fn, n, options, outputs.loss);
  detail::SparseJob job;
  job.spec = detail::resolve_divergence_limits(spec);
  job.tail = SparseTail::renormalize;
  job.student = detail::row_input(student);
  job.teacher = detail::row_input(teacher);
  job.n = n;
  job.v = v;
  job.k = k;
  job.active = plan.active.data();
  job.num_threads = get_num_threads();
  bool in_place = false;
  if (outputs.grad_student.defined()) {
    in_place = detail::check_sparse_grad_output(fn, outputs.grad_student, student,
                                                {{"teacher_logits", &teacher}});
    job.grad_student = detail::row_output(outputs.grad_student);
  }
  run(fn, job, in_place, plan, spec, outputs.loss);
}

}  // namespace divkit
