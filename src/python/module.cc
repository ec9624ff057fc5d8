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
#include "divkit/vocab_parallel.h"

namespace nb = nanobind;

namespace {

using namespace divkit_py;

// Vocabulary-parallel building blocks (vocab_parallel.h); phase: "stats", "sums" or "grad".
void divergence_shard(const std::string& phase, const InArray& student, const InArray& teacher,
                      const std::string& kind, double beta, double alpha, double temperature,
                      bool scale_by_t_squared, const std::optional<InArray>& labels,
                      int64_t ignore_index, const std::optional<InArray>& norm,
                      const std::optional<InArray>& sums_in, const std::optional<OutArray>& out,
                      const std::optional<InArray>& grad_scale,
                      const std::optional<OutArray>& grad_student,
                      const std::optional<OutArray>& grad_teacher) {
  const char* fn = "divergence_shard";
  const divkit::DivergenceSpec spec = make_spec(kind, beta, alpha, temperature, scale_by_t_squared);
  const divkit::TensorView s = to_view(fn, "student", student), t = to_view(fn, "teacher", teacher);
  const divkit::TensorView lab = optional_view(fn, "labels", labels);
  const divkit::TensorView nv = optional_view(fn, "norm", norm);
  const divkit::TensorView si = optional_view(fn, "sums", sums_in);
  const divkit::TensorView ov = optional_view(fn, "out", out);
  const divkit::TensorView gsc = optional_view(fn, "grad_scale", grad_scale);
  const divkit::TensorView gs = optional_view(fn, "grad_student", grad_student);
  const divkit::TensorView gt = optional_view(fn, "grad_teacher", grad_teacher);
  nb::gil_scoped_release release;
  if (phase == "stats") divkit::divergence_shard_stats(s, t, spec, lab, ignore_index, ov);
  else if (phase == "sums") divkit::divergence_shard_sums(s, t, spec, lab, ignore_index, nv, ov);
  else if (phase == "grad")
    divkit::divergence_shard_grad(s, t, spec, lab, ignore_index, nv, si, gsc, gs, gt);
  else throw divkit::Error("divergence_shard: phase must be stats, sums or grad, got '" + phase + "'");
}

}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "divkit's compiled core (nanobind). Use the divkit package, not this module.";

  // divkit::Error -> divkit._C.Error (a ValueError), message unchanged.
  nb::exception<divkit::Error>(m, "Error", PyExc_ValueError);

  m.def("divergence_shard", &divergence_shard, nb::arg("phase"), nb::arg("student"),
        nb::arg("teacher"), nb::arg("kind"), nb::arg("beta"), nb::arg("alpha"),
        nb::arg("temperature"), nb::arg("scale_by_t_squared"), nb::arg("labels").none(),
        nb::arg("ignore_index"), nb::arg("norm").none(), nb::arg("sums").none(),
        nb::arg("out").none(), nb::arg("grad_scale").none(), nb::arg("grad_student").none(),
        nb::arg("grad_teacher").none(),
        "Vocabulary-parallel divergence phases (include/divkit/vocab_parallel.h).");

  m.def("set_num_threads", &divkit::set_num_threads, nb::arg("n"),
        "Threads used by the CPU kernels; results do not depend on it.");
  m.def("get_num_threads", &divkit::get_num_threads);
  m.def("available_simd_targets", &divkit::available_simd_targets,
        "SIMD targets compiled in and supported by this CPU, best first.");
  m.def("force_simd_target", &divkit::force_simd_target, nb::arg("name"),
        "Restrict dispatch to one SIMD target; '' restores the automatic choice.");
  m.def("active_simd_target", &divkit::active_simd_target);
  m.def("version", &divkit::version);

  // The families, one binding file each (declared in bindings.h).
  divkit_py::register_divergence(m);
  divkit_py::register_fused_linear(m);
  divkit_py::register_preference(m);
  divkit_py::register_rlhf(m);
  divkit_py::register_sparse(m);
  divkit_py::register_ot(m);
  divkit_py::register_distill(m);
}
