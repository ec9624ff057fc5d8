// Binding of the vocabulary-parallel divergence (include/divkit/vocab_parallel.h); the fused
// heads' vocabulary-parallel mode goes through their own bindings (FusedLinearOptions' shard).
#include "fused_options.h"

namespace nb = nanobind;

namespace divkit_py {
namespace {

void vocab_parallel_divergence(const InArray& student, const InArray& teacher, const OptIn& labels,
                               const OptIn& weights, const FusedLinearOptions& opt,
                               const OutArray& loss, const OptOut& grad_student,
                               const OptOut& grad_teacher) {
  constexpr const char* fn = "vocab_parallel_divergence";
  const divkit::DivergenceSpec spec = opt.spec();
  divkit::DivergenceOptions o;
  o.labels = optional_view(fn, "labels", labels);
  o.ignore_index = opt.ignore_index;
  o.weights = optional_view(fn, "weights", weights);
  o.reduction = divkit::parse_reduction(opt.reduction);
  o.num_items_in_batch = opt.num_items_in_batch;
  divkit::DivergenceOutputs out;
  out.loss = to_view(fn, "loss", loss);
  out.grad_student = optional_view(fn, "grad_student", grad_student);
  out.grad_teacher = optional_view(fn, "grad_teacher", grad_teacher);
  const divkit::TensorView s = to_view(fn, "student_logits", student);
  const divkit::TensorView t = to_view(fn, "teacher_logits", teacher);
  const divkit::VocabShard shard = opt.shard();
  nb::gil_scoped_release release;
  divkit::vocab_parallel_divergence(s, t, spec, o, out, shard);
}

}  // namespace

void register_vocab_parallel(nb::module_& m) {
  m.def("vocab_parallel_divergence", &vocab_parallel_divergence, nb::arg("student"),
        nb::arg("teacher"), nb::arg("labels").none(), nb::arg("weights").none(), nb::arg("options"),
        nb::arg("loss"), nb::arg("grad_student").none(), nb::arg("grad_teacher").none(),
        "divergence() over logits sharded by vocabulary (include/divkit/vocab_parallel.h); the "
        "options' all_reduce combines the ranks' statistics.");
}

}  // namespace divkit_py
