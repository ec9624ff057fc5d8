// The CUDA path of divkit::sparse_divergence and divkit::topk_divergence (sparse_cuda.cu), built
// with DIVKIT_CUDA: every view on one CUDA device (sparse.cc has checked that), kernels on
// options.stream.
#pragma once

#include "divkit/sparse.h"

namespace divkit::detail {

// scratch_inputs: the student logits are the caller's scratch (the fused head's chunk), so a
// gradient written over them needs no check-only pass first.
void sparse_divergence_cuda(const TensorView& student, const TensorView& teacher_indices,
                            const TensorView& teacher_logprobs, const DivergenceSpec& spec,
                            const SparseOptions& sparse, const DivergenceOptions& options,
                            const SparseOutputs& outputs, bool scratch_inputs = false);

void topk_divergence_cuda(const TensorView& student, const TensorView& teacher, int64_t k,
                          const DivergenceSpec& spec, const DivergenceOptions& options,
                          const SparseOutputs& outputs);

}  // namespace divkit::detail
