// Shared helpers of divkit._C's binding files: DLPack arrays -> divkit::TensorView.
//
// Each family has one binding file (module.cc: divergences and runtime; fused_linear.cc,
// preference.cc, ot.cc, ...) with a register_<family>(nb::module_&) function that module.cc
// calls. Tensors arrive through DLPack as untyped CPU ndarrays; the core does the real argument
// checks and its divkit::Error becomes divkit._C.Error (a ValueError). Release the GIL around
// kernel calls.
#pragma once

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
#include "divkit/tensor.h"

namespace divkit_py {

namespace nb = nanobind;

// Inputs are read only (numpy arrays with writeable=False are accepted); outputs are written.
using InArray = nb::ndarray<nb::ro, nb::device::cpu>;
using OutArray = nb::ndarray<nb::device::cpu>;
// The arrays of the functions that also run on CUDA devices (divergence, sparse, sinkhorn,
// label_rows): any device; to_view records it and the core dispatches on it (or raises Error
// naming the argument).
using AnyInArray = nb::ndarray<nb::ro>;
using AnyOutArray = nb::ndarray<>;

[[noreturn]] inline void fail(const std::string& msg) { throw divkit::Error(msg); }

inline divkit::DType to_dtype(const char* fn, const char* name, nb::dlpack::dtype dt) {
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
    fail(std::string(fn) + ": " + name + " has " + std::to_string(ndim) + " dimensions, at most " +
         std::to_string(divkit::TensorView::kMaxDims) + " are supported");
  }
  v.data = const_cast<void*>(static_cast<const void*>(a.data()));
  v.dtype = to_dtype(fn, name, a.dtype());
  const int32_t device_type = a.device_type();
  if (device_type == nb::device::cpu::value) {
    v.device = divkit::Device::cpu;
  } else if (device_type == nb::device::cuda::value) {
    v.device = divkit::Device::cuda;
    v.device_index = a.device_id();
  } else {
    fail(std::string(fn) + ": " + name + " is on DLPack device type " +
         std::to_string(device_type) + "; divkit's kernels run on the CPU and on CUDA devices");
  }
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
divkit::TensorView optional_view(const char* fn, const char* name, const std::optional<Array>& a) {
  return a ? to_view(fn, name, *a) : divkit::TensorView{};
}

// jsd's beta = 0 and beta = 1 are TRL's special cases (forward / reverse KL), while the
// divergence tends to 0 as beta approaches them: a beta that is not exactly 0 or 1 must not
// become one by rounding to float (nor an out-of-range beta become valid).
inline float beta_to_float(double beta) {
  float f = static_cast<float>(beta);
  if (f == 0.0f && beta != 0.0) f = std::nextafter(0.0f, beta > 0.0 ? 1.0f : -1.0f);
  if (f == 1.0f && beta != 1.0) f = std::nextafter(1.0f, beta < 1.0 ? 0.0f : 2.0f);
  return f;
}

// A DivergenceSpec from the Python-level arguments (kind parsed, beta rounded as above).
inline divkit::DivergenceSpec make_spec(const std::string& kind, double beta, double alpha,
                                        double temperature, bool scale_by_t_squared,
                                        const char* fn = "divergence") {
  divkit::DivergenceSpec spec;
  spec.kind = divkit::parse_divergence_kind(kind, fn);
  spec.beta = beta_to_float(beta);
  spec.alpha = static_cast<float>(alpha);
  spec.temperature = static_cast<float>(temperature);
  spec.scale_by_t_squared = scale_by_t_squared;
  return spec;
}

// The scalar arguments of a token-level divergence call (divergence, sparse_divergence,
// topk_divergence), passed from Python as one object, divkit._C.DivergenceArgs, instead of
// eight positional parameters. num_items_in_batch <= 0 means not given.
struct DivergenceArgs {
  std::string kind = "forward_kl";
  double beta = 0.5;
  double alpha = 0.1;
  double temperature = 1.0;
  bool scale_by_t_squared = false;
  int64_t ignore_index = -100;
  std::string reduction = "mean";
  double num_items_in_batch = 0.0;
  // A cudaStream_t as an integer (torch.cuda.current_stream(device).cuda_stream) for CUDA
  // tensors; 0 is the default stream. Ignored for CPU tensors.
  uint64_t stream = 0;
  // CUDA tensors only: false skips the host read of the input checks' device flags (no stream
  // synchronization: CUDA graph capture); a bad input then gives a NaN loss instead of an error.
  bool check_finite = true;

  divkit::DivergenceSpec spec() const {
    return make_spec(kind, beta, alpha, temperature, scale_by_t_squared);
  }
  // The reduction options, with the optional per-token labels and weights.
  template <typename Array>
  divkit::DivergenceOptions options(const char* fn, const std::optional<Array>& labels,
                                    const std::optional<Array>& weights) const {
    divkit::DivergenceOptions o;
    o.labels = optional_view(fn, "labels", labels);
    o.ignore_index = ignore_index;
    o.weights = optional_view(fn, "weights", weights);
    o.reduction = divkit::parse_reduction(reduction);
    o.num_items_in_batch = num_items_in_batch;
    o.stream = static_cast<std::uintptr_t>(stream);
    o.check_finite = check_finite;
    return o;
  }
};

// One registration function per family's binding file; module.cc calls each.
void register_divergence(nb::module_& m);  // divergence.cc (also binds DivergenceArgs)
void register_fused_linear(nb::module_& m);
void register_preference(nb::module_& m);
void register_rlhf(nb::module_& m);  // rlhf.cc
// (none yet besides module.cc's own divergence bindings)
void register_sparse(nb::module_& m);  // sparse.cc
void register_ot(nb::module_& m);
void register_distill(nb::module_& m);     // distill.cc
void register_compare(nb::module_& m);     // compare.cc
void register_host_cache(nb::module_& m);  // host_cache.cc
void register_label_rows(nb::module_& m);  // label_rows.cc

}  // namespace divkit_py
