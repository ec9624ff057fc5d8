// divkit._C bindings of the token-level divergences (include/divkit/divergence.h): divergence,
// validate_spec, kinds, reductions, and DivergenceArgs, the scalar arguments as one object
// (shared with sparse.cc).
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "bindings.h"
#include "divkit/divergence.h"

namespace divkit_py {
namespace {

template <typename In, typename Out>
void divergence_impl(const In& student, const In& teacher, const Out& loss,
                     const std::optional<Out>& grad_student, const std::optional<Out>& grad_teacher,
                     const std::optional<In>& labels, const std::optional<In>& weights,
                     const DivergenceArgs& args) {
  constexpr const char* fn = "divergence";
  const divkit::DivergenceSpec spec = args.spec();
  const divkit::DivergenceOptions options = args.options(fn, labels, weights);

  divkit::DivergenceOutputs outputs;
  outputs.loss = to_view(fn, "loss", loss);
  outputs.grad_student = optional_view(fn, "grad_student", grad_student);
  outputs.grad_teacher = optional_view(fn, "grad_teacher", grad_teacher);

  const divkit::TensorView s = to_view(fn, "student", student);
  const divkit::TensorView t = to_view(fn, "teacher", teacher);

  nb::gil_scoped_release release;
  divkit::divergence(s, t, spec, options, outputs);
}

// The DivergenceArgs form: tensors on the CPU or on one CUDA device (args.stream).
void divergence(const AnyInArray& student, const AnyInArray& teacher, const AnyOutArray& loss,
                const std::optional<AnyOutArray>& grad_student,
                const std::optional<AnyOutArray>& grad_teacher,
                const std::optional<AnyInArray>& labels, const std::optional<AnyInArray>& weights,
                const DivergenceArgs& args) {
  divergence_impl(student, teacher, loss, grad_student, grad_teacher, labels, weights, args);
}

// The positional form (every scalar its own parameter), kept for callers of the old signature.
void divergence_positional(const InArray& student, const InArray& teacher, const OutArray& loss,
                           const std::optional<OutArray>& grad_student,
                           const std::optional<OutArray>& grad_teacher, const std::string& kind,
                           double beta, double alpha, double temperature, bool scale_by_t_squared,
                           const std::optional<InArray>& labels, int64_t ignore_index,
                           const std::optional<InArray>& weights, const std::string& reduction,
                           double num_items_in_batch) {
  divergence_impl(student, teacher, loss, grad_student, grad_teacher, labels, weights,
                  DivergenceArgs{kind, beta, alpha, temperature, scale_by_t_squared, ignore_index,
                                 reduction, num_items_in_batch});
}

// Errors name `fn`, the public function that took the arguments (parse errors included).
void validate_spec(const std::string& kind, double beta, double alpha, double temperature,
                   bool scale_by_t_squared, const std::string& fn) {
  divkit::validate_spec(make_spec(kind, beta, alpha, temperature, scale_by_t_squared, fn.c_str()),
                        fn.c_str());
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

void register_divergence(nb::module_& m) {
  nb::class_<DivergenceArgs>(m, "DivergenceArgs",
                             "The scalar arguments of a token-level divergence call.")
      .def(
          "__init__",
          [](DivergenceArgs* self, std::string kind, double beta, double alpha, double temperature,
             bool scale_by_t_squared, int64_t ignore_index, std::string reduction,
             double num_items_in_batch, uint64_t stream, bool check_finite) {
            new (self) DivergenceArgs{std::move(kind),
                                      beta,
                                      alpha,
                                      temperature,
                                      scale_by_t_squared,
                                      ignore_index,
                                      std::move(reduction),
                                      num_items_in_batch,
                                      stream,
                                      check_finite};
          },
          nb::kw_only(), nb::arg("kind") = "forward_kl", nb::arg("beta") = 0.5,
          nb::arg("alpha") = 0.1, nb::arg("temperature") = 1.0,
          nb::arg("scale_by_t_squared") = false, nb::arg("ignore_index") = -100,
          nb::arg("reduction") = "mean", nb::arg("num_items_in_batch") = 0.0, nb::arg("stream") = 0,
          nb::arg("check_finite") = true)
      .def_rw("kind", &DivergenceArgs::kind)
      .def_rw("beta", &DivergenceArgs::beta)
      .def_rw("alpha", &DivergenceArgs::alpha)
      .def_rw("temperature", &DivergenceArgs::temperature)
      .def_rw("scale_by_t_squared", &DivergenceArgs::scale_by_t_squared)
      .def_rw("ignore_index", &DivergenceArgs::ignore_index)
      .def_rw("reduction", &DivergenceArgs::reduction)
      .def_rw("num_items_in_batch", &DivergenceArgs::num_items_in_batch)
      .def_rw("stream", &DivergenceArgs::stream)
      .def_rw("check_finite", &DivergenceArgs::check_finite);

  m.def("divergence", &divergence, nb::arg("student"), nb::arg("teacher"), nb::arg("loss"),
        nb::arg("grad_student").none(), nb::arg("grad_teacher").none(), nb::arg("labels").none(),
        nb::arg("weights").none(), nb::arg("args"),
        "Token-level divergence and its gradients (see include/divkit/divergence.h). Writes "
        "the fp32 loss into `loss` and, where given, the gradients of the reduced loss into "
        "grad_student / grad_teacher.");
  m.def("divergence", &divergence_positional, nb::arg("student"), nb::arg("teacher"),
        nb::arg("loss"), nb::arg("grad_student").none(), nb::arg("grad_teacher").none(),
        nb::arg("kind"), nb::arg("beta"), nb::arg("alpha"), nb::arg("temperature"),
        nb::arg("scale_by_t_squared"), nb::arg("labels").none(), nb::arg("ignore_index"),
        nb::arg("weights").none(), nb::arg("reduction"), nb::arg("num_items_in_batch"),
        "The same with every scalar given positionally (num_items_in_batch <= 0: not given).");
  m.def("validate_spec", &validate_spec, nb::arg("kind"), nb::arg("beta"), nb::arg("alpha"),
        nb::arg("temperature"), nb::arg("scale_by_t_squared"), nb::arg("fn") = "divergence",
        "Checks a kind and its parameters; raises Error naming fn and the bad one.");
  m.def("kinds", &kinds, "Names of the divergence kinds, in the core's order.");
  m.def("reductions", &reductions, "Names of the reductions.");
}

}  // namespace divkit_py
