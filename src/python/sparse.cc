// divkit._C bindings of the sparse and truncated teachers (include/divkit/sparse.h):
// sparse_divergence (top-k teacher log-probabilities) and topk_divergence (KL-Top truncation).
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>

#include "bindings.h"
#include "divkit/sparse.h"

namespace divkit_py {
namespace {

void sparse_divergence(const AnyInArray& student, const AnyInArray& indices,
                       const AnyInArray& logprobs, const AnyOutArray& loss,
                       const std::optional<AnyOutArray>& grad_student,
                       const std::optional<AnyInArray>& labels,
                       const std::optional<AnyInArray>& weights, const std::string& tail,
                       const DivergenceArgs& args) {
  constexpr const char* fn = "sparse_divergence";
  const divkit::DivergenceSpec spec = args.spec();
  divkit::SparseOptions sparse;
  sparse.tail = divkit::parse_sparse_tail(tail);
  const divkit::DivergenceOptions options = args.options(fn, labels, weights);
  divkit::SparseOutputs outputs;
  outputs.loss = to_view(fn, "loss", loss);
  outputs.grad_student = optional_view(fn, "grad_student", grad_student);
  const divkit::TensorView s = to_view(fn, "student_logits", student);
  const divkit::TensorView i = to_view(fn, "teacher_indices", indices);
  const divkit::TensorView l = to_view(fn, "teacher_logprobs", logprobs);
  nb::gil_scoped_release release;
  divkit::sparse_divergence(s, i, l, spec, sparse, options, outputs);
}

void topk_divergence(const AnyInArray& student, const AnyInArray& teacher, int64_t k,
                     const AnyOutArray& loss, const std::optional<AnyOutArray>& grad_student,
                     const std::optional<AnyInArray>& labels,
                     const std::optional<AnyInArray>& weights, const DivergenceArgs& args) {
  constexpr const char* fn = "topk_divergence";
  const divkit::DivergenceSpec spec = args.spec();
  const divkit::DivergenceOptions options = args.options(fn, labels, weights);
  divkit::SparseOutputs outputs;
  outputs.loss = to_view(fn, "loss", loss);
  outputs.grad_student = optional_view(fn, "grad_student", grad_student);
  const divkit::TensorView s = to_view(fn, "student_logits", student);
  const divkit::TensorView t = to_view(fn, "teacher_logits", teacher);
  nb::gil_scoped_release release;
  divkit::topk_divergence(s, t, k, spec, options, outputs);
}

}  // namespace

void register_sparse(nb::module_& m) {
  m.def("sparse_divergence", &sparse_divergence, nb::arg("student"), nb::arg("indices"),
        nb::arg("logprobs"), nb::arg("loss"), nb::arg("grad_student").none(),
        nb::arg("labels").none(), nb::arg("weights").none(), nb::arg("tail"), nb::arg("args"),
        "Divergence against a top-k teacher (indices, logprobs) (see include/divkit/sparse.h). "
        "Writes the loss and, where given, the student gradient of the reduced loss.");
  m.def("topk_divergence", &topk_divergence, nb::arg("student"), nb::arg("teacher"), nb::arg("k"),
        nb::arg("loss"), nb::arg("grad_student").none(), nb::arg("labels").none(),
        nb::arg("weights").none(), nb::arg("args"),
        "Divergence over the teacher's top-k entries, both renormalized (KL-Top; see "
        "include/divkit/sparse.h).");
}

}  // namespace divkit_py
