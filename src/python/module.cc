// divkit._C: the nanobind extension module.
//
// Tensors arrive through DLPack as untyped CPU ndarrays (torch tensors, numpy arrays, anything
// that implements __dlpack__ or the buffer protocol); no torch header is included, so one build
// works with any torch >= 2.1. Each array is described to the core as a divkit::TensorView
// (dtype, shape, strides in elements) and the core does the real argument checks; its
// divkit::Error becomes divkit._C.Error, a subclass of ValueError, with the message unchanged.
// The GIL is released while a kernel runs.
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "bindings.h"
#include "divkit/divergence.h"
#include "divkit/runtime.h"
#include "divkit/tensor.h"

namespace nb = nanobind;

NB_MODULE(_C, m) {
  m.doc() = "divkit's compiled core (nanobind). Use the divkit package, not this module.";

  // divkit::Error -> divkit._C.Error (a ValueError), message unchanged.
  nb::exception<divkit::Error>(m, "Error", PyExc_ValueError);

  m.def(
      "set_num_threads",
      [](int64_t n) {
        // Any Python int reaches the core's range check (a C int parameter would make a large
        // one a TypeError from nanobind instead).
        const int64_t clamped = std::clamp<int64_t>(n, INT32_MIN, INT32_MAX);
        if (clamped != n)
          throw divkit::Error("set_num_threads: n must be in [1, " +
                              std::to_string(divkit::max_num_threads()) + "], got " +
                              std::to_string(n));
        divkit::set_num_threads(static_cast<int>(n));
      },
      nb::arg("n"), "Threads used by the CPU kernels; results do not depend on it.");
  m.def("get_num_threads", &divkit::get_num_threads);
  m.def("max_num_threads", &divkit::max_num_threads,
        "The largest thread count set_num_threads accepts (8 x the processors).");
  m.def("forked_single_threaded", &divkit::forked_single_threaded,
        "Whether this process is a fork child that runs divkit's kernels on one thread.");
  m.def("available_simd_targets", &divkit::available_simd_targets,
        "SIMD targets compiled in and supported by this CPU, best first.");
  m.def("force_simd_target", &divkit::force_simd_target, nb::arg("name"),
        "Restrict dispatch to one SIMD target; '' restores the automatic choice.");
  m.def("active_simd_target", &divkit::active_simd_target);
  m.def("version", &divkit::version);
  m.def("cuda_built", &divkit::cuda_built, "Whether this build has the CUDA kernels.");
  m.def("cuda_device_count", &divkit::cuda_device_count,
        "CUDA devices the CUDA runtime sees (0 when not built, without a driver or a GPU).");
  m.def(
      "cuda_devices",
      [] {
        std::vector<std::string> names;
        for (int i = 0; i < divkit::cuda_device_count(); ++i)
          names.push_back(divkit::cuda_device_name(i));
        return names;
      },
      "The names of the CUDA devices the kernels see, by index.");
  m.def(
      "cuda_ops",
      [] {
        return std::vector<std::string>{"divergence", "sparse_divergence", "topk_divergence",
                                        "sinkhorn", "label_rows"};
      },
      "The _C functions that run CUDA tensors on the GPU in a CUDA build (the others take CPU "
      "tensors only).");

  // The families, one binding file each (declared in bindings.h).
  divkit_py::register_divergence(m);
  divkit_py::register_fused_linear(m);
  divkit_py::register_preference(m);
  divkit_py::register_rlhf(m);
  divkit_py::register_sparse(m);
  divkit_py::register_ot(m);
  divkit_py::register_distill(m);
  divkit_py::register_compare(m);
  divkit_py::register_host_cache(m);
  divkit_py::register_label_rows(m);
}
