// The CUDA chunk loop of fused_linear_divergence and fused_linear_sparse_divergence
// (distill_loop_cuda.cu), built with DIVKIT_CUDA: every view on one CUDA device; distill_loop.cc
// dispatches here.
#pragma once

#include "divkit/fused_linear.h"

namespace divkit::detail {

void distill_head_cuda(const LinearHead& student, const LinearHead& teacher,
                       const DivergenceSpec& spec, const DivergenceOptions& options,
                       const FusedLinearOptions& fused, const TensorView& loss,
                       const LinearHeadGrads& student_grads, const LinearHeadGrads& teacher_grads,
                       int device);

void sparse_distill_head_cuda(const LinearHead& student, const TensorView& teacher_indices,
                              const TensorView& teacher_logprobs, const DivergenceSpec& spec,
                              const SparseOptions& sparse, const DivergenceOptions& options,
                              const FusedLinearOptions& fused, const TensorView& loss,
                              const LinearHeadGrads& student_grads, int device);

}  // namespace divkit::detail
