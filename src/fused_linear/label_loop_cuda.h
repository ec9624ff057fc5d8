// The CUDA chunk loop of the label heads (label_loop_cuda.cu), built with DIVKIT_CUDA: every view
// on one CUDA device; label_loop.cc has checked the scalar options and dispatches here.
#pragma once

#include <cstdint>

#include "divkit/fused_linear.h"

namespace divkit::detail {

// One call of fused_linear_cross_entropy (loss defined), fused_linear_logprobs, or
// fused_linear_logprobs_backward (backward).
struct LabelHeadCudaJob {
  const char* fn = nullptr;
  LinearHead head;
  LinearHeadGrads grads;
  TensorView labels;
  int64_t ignore_index = -100;
  float temperature = 1.0f, softcap = 0.0f;
  int64_t chunk_size = 0;
  std::uintptr_t stream = 0;
  bool check_finite = true;
  LabelStatsOutputs stats;
  // Cross-entropy: the loss output, its options, and the gradient of the reduced loss.
  TensorView loss, weights;
  float label_smoothing = 0.0f, z_loss_scale = 0.0f;
  Reduction reduction = Reduction::mean;
  double num_items_in_batch = 0.0;
  // The log-probs backward: the upstream gradients ([N] fp32/fp64, each optional).
  bool backward = false;
  TensorView grad_logprobs, grad_entropy;
};

void label_head_cuda(const LabelHeadCudaJob& job, int device);

}  // namespace divkit::detail
