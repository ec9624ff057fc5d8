// The CUDA path of divkit::divergence (divergence_cuda.cu), built with DIVKIT_CUDA: every view
// on one CUDA device (divergence.cc has checked that), kernels on options.stream.
#pragma once

#include "divkit/divergence.h"

namespace divkit::detail {

void divergence_cuda(const TensorView& student, const TensorView& teacher,
                     const DivergenceSpec& spec, const DivergenceOptions& options,
                     const DivergenceOutputs& outputs);

}  // namespace divkit::detail
