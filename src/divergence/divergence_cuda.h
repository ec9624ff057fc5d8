// The CUDA path of divkit::divergence (divergence_cuda.cu), built with DIVKIT_CUDA: every view
// on one CUDA device (divergence.cc has checked that), kernels on options.stream.
#pragma once

#include "divkit/divergence.h"

namespace divkit::detail {

// scratch_inputs: the logits are the caller's own scratch buffers (the fused heads' chunks), so a
// gradient written over them needs no check-only pass first (which keeps a caller's logits intact
// when a bad row raises).
void divergence_cuda(const TensorView& student, const TensorView& teacher,
                     const DivergenceSpec& spec, const DivergenceOptions& options,
                     const DivergenceOutputs& outputs, bool scratch_inputs = false);

}  // namespace divkit::detail
