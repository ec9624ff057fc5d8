// divkit._C: the nanobind extension module.
//
// Tensors arrive through DLPack as untyped CPU ndarrays (torch tensors, numpy arrays, anything
// that implements __dlpack__ or the buffer protocol); no torch header is included, so one build
// works with any torch >= 2.1. Each array is described to the core as a divkit::TensorView
// (dtype, shape, strides in elements) and the core does the real argument checks; its
// divkit::Error becomes divkit._C.Error, a subclass of ValueError, with the message unchanged.
// The GIL is released while a kernel runs.
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>

#include "bindings.h"
#include "divkit/divergence.h"
#include "divkit/runtime.h"
#include "divkit/tensor.h"

namespace nb = nanobind;

namespace {

using namespace divkit_py;

void divergence(const InArray& student, const InArray& teacher, const OutArray& loss,
                const std::optional<OutArray>& grad_student,
                const std::optional<OutArray>& grad_teacher, const std::string& kind, double beta,
                double alpha, double temperature, bool scale_by_t_squared,
                const std::optional<InArray>& labels, int64_t ignore_index,
                const std::optional<InArray>& weights, const std::string& reduction,
                double num_items_in_batch) {
  constexpr const char* fn = "divergence";
  const divkit::DivergenceSpec spec = make_spec(kind, beta, alpha, temperature, scale_by_t_squared);

  divkit::DivergenceOptions options;
  options.labels = optional_view(fn, "labels", labels);
  options.ignore_index = ignore_index;
  options.weights = optional_view(fn, "weights", weights);
  options.reduction = divkit::parse_reduction(reduction);
  options.num_items_in_batch = num_items_in_batch;

  divkit::DivergenceOutputs outputs;
  outputs.loss = to_view(fn, "loss", loss);
  outputs.grad_student = optional_view(fn, "grad_student", grad_student);
  outputs.grad_teacher = optional_view(fn, "grad_teacher", grad_teacher);

  const divkit::TensorView s = to_view(fn, "student", student);
  const divkit::TensorView t = to_view(fn, "teacher", teacher);

  nb::gil_scoped_release release;
  divkit::divergence(s, t, spec, options, outputs);
}

void validate_spec(const std::string& kind, double beta, double alpha, double temperature,
                   bool scale_by_t_squared) {
  divkit::validate_spec(make_spec(kind, beta, alpha, temperature, scale_by_t_squared));
}

std::vector<std::string> kinds() {
  std::vector<std::string> names;
  for (int i = 0; i < divkit::kNumDivergenceKinds; ++i)
    names.emplace_back(divkit::divergence_kind_name(static_cast<divkit::DivergenceKind>(i)));
  return names;
}

std::vector<std::string> reductions() {
  std::vector<std::string> names;
  for (auto r : {divkit::Reduction::none, divkit::Reduction::sum, divkit::Reduction::mean,
                 divkit::Reduction::batchmean})
    names.emplace_back(divkit::reduction_name(r));
  return names;
}

}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "divkit's compiled core (nanobind). Use the divkit package, not this module.";

  // divkit::Error -> divkit._C.Error (a ValueError), message unchanged.
  nb::exception<divkit::Error>(m, "Error", PyExc_ValueError);

  m.def("divergence", &divergence, nb::arg("student"), nb::arg("teacher"), nb::arg("loss"),
        nb::arg("grad_student").none(), nb::arg("grad_teacher").none(), nb::arg("kind"),
        nb::arg("beta"), nb::arg("alpha"), nb::arg("temperature"),
        nb::arg("scale_by_t_squared"), nb::arg("labels").none(), nb::arg("ignore_index"),
        nb::arg("weights").none(), nb::arg("reduction"), nb::arg("num_items_in_batch"),
        "Token-level divergence and its gradients (see include/divkit/divergence.h). Writes "
        "the fp32 loss into `loss` and, where given, the gradients of the reduced loss into "
        "grad_student / grad_teacher. num_items_in_batch <= 0 means not given.");
  m.def("validate_spec", &validate_spec, nb::arg("kind"), nb::arg("beta"), nb::arg("alpha"),
        nb::arg("temperature"), nb::arg("scale_by_t_squared"),
        "Checks a kind and its parameters; raises Error naming the bad one.");
  m.def("kinds", &kinds, "Names of the divergence kinds, in the core's order.");
  m.def("reductions", &reductions, "Names of the reductions.");

  m.def("set_num_threads", &divkit::set_num_threads, nb::arg("n"),
        "Threads used by the CPU kernels; results do not depend on it.");
  m.def("get_num_threads", &divkit::get_num_threads);
  m.def("available_simd_targets", &divkit::available_simd_targets,
        "SIMD targets compiled in and supported by this CPU, best first.");
  m.def("force_simd_target", &divkit::force_simd_target, nb::arg("name"),
        "Restrict dispatch to one SIMD target; '' restores the automatic choice.");
  m.def("active_simd_target", &divkit::active_simd_target);
  m.def("version", &divkit::version);

  // The other families, one binding file each (declared in bindings.h).
  divkit_py::register_fused_linear(m);
  divkit_py::register_preference(m);
  divkit_py::register_rlhf(m);
  divkit_py::register_sparse(m);
  divkit_py::register_ot(m);
  divkit_py::register_distill(m);
}
