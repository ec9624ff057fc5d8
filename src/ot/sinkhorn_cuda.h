// The CUDA path of divkit::sinkhorn (sinkhorn_cuda.cu), built with DIVKIT_CUDA: every view on
// one CUDA device (sinkhorn.cc has checked that and the shapes, dtypes and options), kernels on
// options.stream.
#pragma once

#include <cstdint>
#include <vector>

#include "divkit/ot.h"

namespace divkit::detail {

// B problems of n x m points in d dimensions (d = 0 for a cost matrix).
std::vector<SinkhornStats> sinkhorn_cuda(const SinkhornInputs& in, const SinkhornOptions& opt,
                                         const SinkhornOutputs& out, int64_t B, int64_t n,
                                         int64_t m, int64_t d, int device);

}  // namespace divkit::detail
