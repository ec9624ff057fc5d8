// divkit._C: the nanobind extension module.
//
// Tensors arrive through DLPack as untyped CPU ndarrays (torch tensors, numpy arrays, anything
// that implements __dlpack__ or the buffer protocol); no torch header is included, so one build
// works with any torch >= 2.1. Each array is described to the core as a divkit::TensorView
// (dtype, shape, strides in elements) and the core does the real argument checks; its
// divkit::Error becomes divkit._C.Error, a subclass of ValueError, with the message unchanged.
// The GIL is released while a kernel runs.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>

#include "divkit/divergence.h"
#include "divkit/runtime.h"
#include "divkit/tensor.h"

namespace nb = nanobind;

namespace {

// Inputs are read only (numpy arrays with writeable=False are accepted); outputs are written.
using InArray = nb::ndarray<nb::ro, nb::device::cpu>;
using OutArray = nb::ndarray<nb::device::cpu>;

[[noreturn]] void fail(const std::string& msg) { throw divkit::Error(msg); }

divkit::DType to_dtype(const char* fn, const char* name, nb::dlpack::dtype dt) {
  using nb::dlpack::dtype_code;
  const auto code = static_cast<dtype_code>(dt.code);
  if (dt.lanes == 1) {
    if (code == dtype_code::Float && dt.bits == 32) return divkit::DType::f32;
    if (code == dtype_code::Float && dt.bits == 64) return divkit::DType::f64;
    if (code == dtype_code::Float && dt.bits == 16) return divkit::DType::f16;
    if (code == dtype_code::Bfloat && dt.bits == 16) return divkit::DType::bf16;
    if (code == dtype_code::Int && dt.bits == 32) return divkit::DType::i32;
    if (code == dtype_code::Int && dt.bits == 64) return divkit::DType::i64;
  }
  std::string kind;
  switch (code) {
    case dtype_code::Int: kind = "int"; break;
    case dtype_code::UInt: kind = "uint"; break;
    case dtype_code::Float: kind = "float"; break;
    case dtype_code::Bfloat: kind = "bfloat"; break;
    case dtype_code::Complex: kind = "complex"; break;
    case dtype_code::Bool: kind = "bool"; break;
    default: kind = "dlpack-code-" + std::to_string(static_cast<int>(dt.code)) + "-"; break;
  }
  if (code != dtype_code::Bool) kind += std::to_string(static_cast<int>(dt.bits));
  if (dt.lanes != 1) kind += "x" + std::to_string(static_cast<int>(dt.lanes));
  fail(std::string(fn) + ": " + name + " has unsupported dtype " + kind +
       " (supported: float32, bfloat16, float16, float64, int32, int64)");
}

// Describes an ndarray to the core. A 0-d array becomes a 1-element 1-D view (an ndim-0 view
// means "not given" to the core). Strides are in elements, as in DLPack.
template <typename Array>
divkit::TensorView to_view(const char* fn, const char* name, const Array& a) {
  divkit::TensorView v;
  const size_t ndim = a.ndim();
  if (ndim > static_cast<size_t>(divkit::TensorView::kMaxDims)) {
    fail(std::string(fn) + ": " + name + " has " + std::to_string(ndim) +
         " dimensions, at most " + std::to_string(divkit::TensorView::kMaxDims) +
         " are supported");
  }
  v.data = const_cast<void*>(static_cast<const void*>(a.data()));
  v.dtype = to_dtype(fn, name, a.dtype());
  v.device = divkit::Device::cpu;
  if (ndim == 0) {
    v.ndim = 1;
    v.shape[0] = 1;
    v.strides[0] = 1;
    return v;
  }
  v.ndim = static_cast<int32_t>(ndim);
  const int64_t* strides = a.stride_ptr();
  int64_t contiguous = 1;
  for (int i = static_cast<int>(ndim) - 1; i >= 0; --i) {
    v.shape[i] = static_cast<int64_t>(a.shape(static_cast<size_t>(i)));
    v.strides[i] = strides ? strides[i] : contiguous;
    contiguous *= v.shape[i];
  }
  // The stride of a dimension of size 1 is meaningless (frameworks export arbitrary values);
  // make the innermost one unit so that [N, 1] views pass the unit-column-stride check.
  if (v.shape[ndim - 1] == 1) v.strides[ndim - 1] = 1;
  // Likewise every stride of an empty array (numpy exports zeros): use contiguous ones.
  if (v.numel() == 0) {
    int64_t c = 1;
    for (int i = static_cast<int>(ndim) - 1; i >= 0; --i) {
      v.strides[i] = c;
      c *= v.shape[i] > 0 ? v.shape[i] : 1;
    }
  }
  return v;
}

template <typename Array>
divkit::TensorView optional_view(const char* fn, const char* name,
                                 const std::optional<Array>& a) {
  return a ? to_view(fn, name, *a) : divkit::TensorView{};
}

// jsd's beta = 0 and beta = 1 are TRL's special cases (forward / reverse KL), while the
// divergence tends to 0 as beta approaches them: a beta that is not exactly 0 or 1 must not
// become one by rounding to float (nor an out-of-range beta become valid).
float beta_to_float(double beta) {
  float f = static_cast<float>(beta);
  if (f == 0.0f && beta != 0.0) f = std::nextafter(0.0f, beta > 0.0 ? 1.0f : -1.0f);
  if (f == 1.0f && beta != 1.0) f = std::nextafter(1.0f, beta < 1.0 ? 0.0f : 2.0f);
  return f;
}

void divergence(const InArray& student, const InArray& teacher, const OutArray& loss,
                const std::optional<OutArray>& grad_student,
                const std::optional<OutArray>& grad_teacher, const std::string& kind, double beta,
                double alpha, double temperature, bool scale_by_t_squared,
                const std::optional<InArray>& labels, int64_t ignore_index,
                const std::optional<InArray>& weights, const std::string& reduction,
                double num_items_in_batch) {
  constexpr const char* fn = "divergence";
  divkit::DivergenceSpec spec;
  spec.kind = divkit::parse_divergence_kind(kind);
  spec.beta = beta_to_float(beta);
  spec.alpha = static_cast<float>(alpha);
  spec.temperature = static_cast<float>(temperature);
  spec.scale_by_t_squared = scale_by_t_squared;

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
  divkit::DivergenceSpec spec;
  spec.kind = divkit::parse_divergence_kind(kind);
  spec.beta = beta_to_float(beta);
  spec.alpha = static_cast<float>(alpha);
  spec.temperature = static_cast<float>(temperature);
  spec.scale_by_t_squared = scale_by_t_squared;
  divkit::validate_spec(spec);
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
}
