// Bindings of the fused linear-head losses (include/divkit/fused_linear.h). Each takes its
// tensors (a head as a (hidden, weight, bias) tuple, gradient outputs likewise) and one
// FusedLinearOptions (fused_options.h).
#include <cmath>

#include <nanobind/stl/tuple.h>

#include "fused_options.h"

namespace nb = nanobind;

// The label losses' path switch (src/fused_linear/label_kernels.h; internal, not in include/).
namespace divkit::detail {
void set_label_one_sweep(bool on);
bool label_one_sweep();
}  // namespace divkit::detail

namespace divkit_py {

divkit::VocabShard FusedLinearOptions::shard() const {
  divkit::VocabShard s;
  if (all_reduce.is_none()) return s;
  s.rank = rank;
  s.world = world;
  const nb::handle fn = all_reduce;
  s.all_reduce = [fn](double* data, int64_t count, divkit::CollectiveOp op) {
    nb::gil_scoped_acquire gil;
    try {
      const size_t shape[1] = {static_cast<size_t>(count)};
      nb::ndarray<nb::numpy, double, nb::ndim<1>> buffer(data, 1, shape, nb::handle());
      // A view of the core's buffer, not a copy: the reduction is written in place.
      fn(nb::cast(buffer, nb::rv_policy::reference),
         op == divkit::CollectiveOp::max ? "max" : "sum");
    } catch (nb::python_error& e) {
      throw divkit::Error(std::string("vocabulary-parallel all_reduce failed: ") + e.what());
    }
  };
  return s;
}

namespace {

divkit::LinearHead head(const char* fn, const char* prefix, const HeadArrays& a) {
  const std::string p(prefix);
  divkit::LinearHead h;
  h.hidden = to_view(fn, (p + "hidden").c_str(), std::get<0>(a));
  h.weight = to_view(fn, (p + "weight").c_str(), std::get<1>(a));
  h.bias = optional_view(fn, (p + "bias").c_str(), std::get<2>(a));
  return h;
}

divkit::LinearHeadGrads grads(const char* fn, const char* prefix, const GradArrays& a) {
  const std::string p = std::string("grad_") + prefix;
  divkit::LinearHeadGrads g;
  g.hidden = optional_view(fn, (p + "hidden").c_str(), std::get<0>(a));
  g.weight = optional_view(fn, (p + "weight").c_str(), std::get<1>(a));
  g.bias = optional_view(fn, (p + "bias").c_str(), std::get<2>(a));
  return g;
}

divkit::DivergenceOptions divergence_options(const char* fn, const FusedLinearOptions& opt,
                                             const OptIn& labels, const OptIn& weights) {
  divkit::DivergenceOptions o;
  o.labels = optional_view(fn, "labels", labels);
  o.ignore_index = opt.ignore_index;
  o.weights = optional_view(fn, "weights", weights);
  o.reduction = divkit::parse_reduction(opt.reduction);
  o.num_items_in_batch = opt.num_items_in_batch;
  o.stream = static_cast<std::uintptr_t>(opt.stream);
  o.check_finite = opt.check_finite;
  return o;
}

divkit::FusedLinearOptions fused_options(const FusedLinearOptions& opt) {
  divkit::FusedLinearOptions f;
  f.chunk_size = opt.chunk_size;
  f.hard_weight = static_cast<float>(opt.hard_weight);
  f.soft_weight = static_cast<float>(opt.soft_weight);
  f.shard = opt.shard();
  return f;
}

void fused_linear_divergence(const HeadArrays& student, const HeadArrays& teacher,
                             const OptIn& labels, const OptIn& weights,
                             const OptIn& teacher_token_ids, const FusedLinearOptions& opt,
                             const AnyOutArray& loss, const GradArrays& student_grads,
                             const GradArrays& teacher_grads) {
  constexpr const char* fn = "fused_linear_divergence";
  const divkit::DivergenceSpec spec = opt.spec();
  const divkit::DivergenceOptions o = divergence_options(fn, opt, labels, weights);
  divkit::FusedLinearOptions f = fused_options(opt);
  f.teacher_token_ids = optional_view(fn, "teacher_token_ids", teacher_token_ids);
  const divkit::LinearHead s = head(fn, "student_", student);
  const divkit::LinearHead t = head(fn, "teacher_", teacher);
  const divkit::LinearHeadGrads gs = grads(fn, "student_", student_grads);
  const divkit::LinearHeadGrads gt = grads(fn, "teacher_", teacher_grads);
  const divkit::TensorView lv = to_view(fn, "loss", loss);
  nb::gil_scoped_release release;
  divkit::fused_linear_divergence(s, t, spec, o, f, lv, gs, gt);
}

// fused_linear_divergence with FusedLabelTerms: (student_logprobs, teacher_logprobs, hard_weights,
// kept_student, kept_teacher), each optional, and kept_filled.
using TermArrays = std::tuple<OptOut, OptOut, OptIn, OptOut, OptOut>;

void fused_linear_label_terms(const HeadArrays& student, const HeadArrays& teacher,
                              const OptIn& labels, const OptIn& weights,
                              const FusedLinearOptions& opt, const AnyOutArray& loss,
                              const GradArrays& student_grads, const TermArrays& terms,
                              bool kept_filled, bool accumulate_weight_grads) {
  constexpr const char* fn = "fused_linear_divergence";
  const divkit::DivergenceSpec spec = opt.spec();
  const divkit::DivergenceOptions o = divergence_options(fn, opt, labels, weights);
  divkit::FusedLinearOptions f = fused_options(opt);
  f.terms.student_logprobs = optional_view(fn, "student_logprobs", std::get<0>(terms));
  f.terms.teacher_logprobs = optional_view(fn, "teacher_logprobs", std::get<1>(terms));
  f.terms.hard_weights = optional_view(fn, "hard_weights", std::get<2>(terms));
  f.terms.kept_student = optional_view(fn, "kept_student", std::get<3>(terms));
  f.terms.kept_teacher = optional_view(fn, "kept_teacher", std::get<4>(terms));
  f.terms.kept_filled = kept_filled;
  f.terms.accumulate_weight_grads = accumulate_weight_grads;
  const divkit::LinearHead s = head(fn, "student_", student);
  const divkit::LinearHead t = head(fn, "teacher_", teacher);
  const divkit::LinearHeadGrads gs = grads(fn, "student_", student_grads);
  const divkit::TensorView lv = to_view(fn, "loss", loss);
  nb::gil_scoped_release release;
  divkit::fused_linear_divergence(s, t, spec, o, f, lv, gs, {});
}

void fused_linear_sparse_divergence(const HeadArrays& student, const AnyInArray& teacher_indices,
                                    const AnyInArray& teacher_logprobs, const OptIn& labels,
                                    const OptIn& weights, const FusedLinearOptions& opt,
                                    const AnyOutArray& loss, const GradArrays& student_grads) {
  constexpr const char* fn = "fused_linear_sparse_divergence";
  const divkit::DivergenceSpec spec = opt.spec();
  divkit::SparseOptions sp;
  sp.tail = divkit::parse_sparse_tail(opt.tail);
  const divkit::DivergenceOptions o = divergence_options(fn, opt, labels, weights);
  const divkit::FusedLinearOptions f = fused_options(opt);
  const divkit::LinearHead s = head(fn, "student_", student);
  const divkit::TensorView idx = to_view(fn, "teacher_indices", teacher_indices);
  const divkit::TensorView lp = to_view(fn, "teacher_logprobs", teacher_logprobs);
  const divkit::LinearHeadGrads gs = grads(fn, "student_", student_grads);
  const divkit::TensorView lv = to_view(fn, "loss", loss);
  nb::gil_scoped_release release;
  divkit::fused_linear_sparse_divergence(s, idx, lp, spec, sp, o, f, lv, gs);
}

// (logprobs, entropy, lse, topk_mass) outputs, each optional.
using StatsArrays = std::tuple<OptOut, OptOut, OptOut, OptOut>;

divkit::LabelStatsOutputs stats(const char* fn, const StatsArrays& a, int64_t topk) {
  divkit::LabelStatsOutputs st;
  st.logprobs = optional_view(fn, "logprobs", std::get<0>(a));
  st.entropy = optional_view(fn, "entropy", std::get<1>(a));
  st.lse = optional_view(fn, "lse", std::get<2>(a));
  st.topk_mass = optional_view(fn, "topk_mass", std::get<3>(a));
  st.topk = topk;
  return st;
}

void fused_linear_cross_entropy(const HeadArrays& hd, const AnyInArray& labels,
                                const OptIn& weights, const FusedLinearOptions& opt,
                                const AnyOutArray& loss, const GradArrays& head_grads,
                                const StatsArrays& stats_out) {
  constexpr const char* fn = "fused_linear_cross_entropy";
  divkit::CrossEntropySpec spec;
  spec.ignore_index = opt.ignore_index;
  spec.label_smoothing = static_cast<float>(opt.label_smoothing);
  spec.z_loss_scale = static_cast<float>(opt.z_loss_scale);
  spec.softcap = static_cast<float>(opt.softcap);
  spec.reduction = divkit::parse_reduction(opt.reduction);
  spec.num_items_in_batch = opt.num_items_in_batch;
  spec.chunk_size = opt.chunk_size;
  spec.weights = optional_view(fn, "weights", weights);
  spec.shard = opt.shard();
  spec.stream = static_cast<std::uintptr_t>(opt.stream);
  spec.check_finite = opt.check_finite;
  const divkit::LinearHead h = head(fn, "", hd);
  const divkit::TensorView lab = to_view(fn, "labels", labels);
  const divkit::TensorView lv = to_view(fn, "loss", loss);
  const divkit::LinearHeadGrads g = grads(fn, "", head_grads);
  const divkit::LabelStatsOutputs st = stats(fn, stats_out, opt.topk);
  nb::gil_scoped_release release;
  divkit::fused_linear_cross_entropy(h, lab, spec, lv, g, st);
}

divkit::LogprobsSpec logprobs_spec(const FusedLinearOptions& opt) {
  divkit::LogprobsSpec spec;
  spec.ignore_index = opt.ignore_index;
  spec.temperature = static_cast<float>(opt.temperature);
  spec.chunk_size = opt.chunk_size;
  spec.shard = opt.shard();
  spec.stream = static_cast<std::uintptr_t>(opt.stream);
  spec.check_finite = opt.check_finite;
  return spec;
}

// (log_sum_sq_probs, is_top1) outputs, each optional.
using MoreStatsArrays = std::tuple<OptOut, OptOut>;

void fused_linear_logprobs(const HeadArrays& hd, const AnyInArray& labels,
                           const FusedLinearOptions& opt, const StatsArrays& stats_out,
                           const std::optional<MoreStatsArrays>& more) {
  constexpr const char* fn = "fused_linear_logprobs";
  const divkit::LogprobsSpec spec = logprobs_spec(opt);
  const divkit::LinearHead h = head(fn, "", hd);
  const divkit::TensorView lab = to_view(fn, "labels", labels);
  divkit::LabelStatsOutputs st = stats(fn, stats_out, opt.topk);
  if (more) {
    st.log_sum_sq_probs = optional_view(fn, "log_sum_sq_probs", std::get<0>(*more));
    st.is_top1 = optional_view(fn, "is_top1", std::get<1>(*more));
  }
  nb::gil_scoped_release release;
  divkit::fused_linear_logprobs(h, lab, spec, st);
}

void fused_linear_logprobs_backward(const HeadArrays& hd, const AnyInArray& labels,
                                    const FusedLinearOptions& opt, const OptIn& grad_logprobs,
                                    const OptIn& grad_entropy, const GradArrays& head_grads) {
  constexpr const char* fn = "fused_linear_logprobs_backward";
  const divkit::LogprobsSpec spec = logprobs_spec(opt);
  const divkit::LinearHead h = head(fn, "", hd);
  const divkit::TensorView lab = to_view(fn, "labels", labels);
  const divkit::TensorView gl = optional_view(fn, "grad_logprobs", grad_logprobs);
  const divkit::TensorView ge = optional_view(fn, "grad_entropy", grad_entropy);
  const divkit::LinearHeadGrads g = grads(fn, "", head_grads);
  nb::gil_scoped_release release;
  divkit::fused_linear_logprobs_backward(h, lab, spec, gl, ge, g);
}

}  // namespace

void register_fused_linear(nb::module_& m) {
  using O = FusedLinearOptions;
  nb::class_<O>(m, "FusedLinearOptions",
                "Options of the fused linear-head and vocabulary-parallel calls (set by name).")
      .def(nb::init<>())
      .def_rw("kind", &O::kind)
      .def_rw("beta", &O::beta)
      .def_rw("alpha", &O::alpha)
      .def_rw("temperature", &O::temperature)
      .def_rw("scale_by_t_squared", &O::scale_by_t_squared)
      .def_rw("ignore_index", &O::ignore_index)
      .def_rw("reduction", &O::reduction)
      .def_rw("num_items_in_batch", &O::num_items_in_batch)
      .def_rw("chunk_size", &O::chunk_size)
      .def_rw("hard_weight", &O::hard_weight)
      .def_rw("soft_weight", &O::soft_weight)
      .def_rw("tail", &O::tail)
      .def_rw("label_smoothing", &O::label_smoothing)
      .def_rw("z_loss_scale", &O::z_loss_scale)
      .def_rw("softcap", &O::softcap)
      .def_rw("topk", &O::topk)
      .def_rw("rank", &O::rank)
      .def_rw("world", &O::world)
      .def_rw("all_reduce", &O::all_reduce)
      .def_rw("stream", &O::stream)
      .def_rw("check_finite", &O::check_finite);

  m.def("fused_linear_divergence", &fused_linear_divergence, nb::arg("student"), nb::arg("teacher"),
        nb::arg("labels").none(), nb::arg("weights").none(), nb::arg("teacher_token_ids").none(),
        nb::arg("options"), nb::arg("loss"), nb::arg("student_grads"), nb::arg("teacher_grads"),
        "Fused linear-head distillation (include/divkit/fused_linear.h). Heads and gradient "
        "outputs are (hidden, weight, bias) tuples.");
  m.def("fused_linear_label_terms", &fused_linear_label_terms, nb::arg("student"),
        nb::arg("teacher"), nb::arg("labels").none(), nb::arg("weights").none(), nb::arg("options"),
        nb::arg("loss"), nb::arg("student_grads"), nb::arg("terms"), nb::arg("kept_filled"),
        nb::arg("accumulate_weight_grads") = false,
        "fused_linear_divergence with the label terms of include/divkit/fused_linear.h's "
        "FusedLabelTerms: terms = (student_logprobs, teacher_logprobs, hard_weights, "
        "kept_student, kept_teacher), each optional.");
  m.def("fused_linear_sparse_divergence", &fused_linear_sparse_divergence, nb::arg("student"),
        nb::arg("teacher_indices"), nb::arg("teacher_logprobs"), nb::arg("labels").none(),
        nb::arg("weights").none(), nb::arg("options"), nb::arg("loss"), nb::arg("student_grads"));
  m.def("fused_linear_cross_entropy", &fused_linear_cross_entropy, nb::arg("head"),
        nb::arg("labels"), nb::arg("weights").none(), nb::arg("options"), nb::arg("loss"),
        nb::arg("grads"), nb::arg("stats"),
        "stats: (logprobs, entropy, lse, topk_mass) outputs, each optional (topk_mass with "
        "options.topk).");
  m.def("fused_linear_logprobs", &fused_linear_logprobs, nb::arg("head"), nb::arg("labels"),
        nb::arg("options"), nb::arg("stats"), nb::arg("more_stats").none() = nb::none(),
        "stats: (logprobs, entropy, lse, topk_mass); more_stats: (log_sum_sq_probs, is_top1); "
        "each output optional.");
  m.def("fused_linear_logprobs_backward", &fused_linear_logprobs_backward, nb::arg("head"),
        nb::arg("labels"), nb::arg("options"), nb::arg("grad_logprobs").none(),
        nb::arg("grad_entropy").none(), nb::arg("grads"));

  m.def("_set_label_one_sweep", &divkit::detail::set_label_one_sweep, nb::arg("on"),
        "Internal, for tests and benchmarks: whether the fused label losses write each row's "
        "gradient in the sweep of its statistics (True, the default) or in a pass of their own.");
  m.def("_label_one_sweep", &divkit::detail::label_one_sweep);

  register_vocab_parallel(m);
}

}  // namespace divkit_py
