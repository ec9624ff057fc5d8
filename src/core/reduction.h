// The one reduction rule of the losses reduced over tokens (divergence, sparse, the fused head):
//   a token counts unless labels[i] == ignore_index; weights[i] (default 1) scales its loss;
//   reduction none   -> loss[i] = weight_i * row_loss_i (0 for ignored tokens),
//             sum    -> sum_i weight_i * row_loss_i,
//             mean   -> that sum / (number of counted tokens, at least 1),
//             batchmean -> that sum / (N, at least 1);
//   num_items_in_batch > 0 replaces the divisor of sum, mean and batchmean (gradient
//   accumulation, as Hugging Face trainers pass it) and is an error with none.
// The gradient of the reduced loss with respect to a row's loss is weight_i / divisor.
#pragma once

#include <cstdint>
#include <vector>

#include "divkit/divergence.h"

namespace divkit::reduce {

// The counted tokens: 1 where labels[i] != ignore_index (all when labels is not given). Checks
// labels as an int32/int64 vector of n.
std::vector<uint8_t> active_rows(const char* fn, const TensorView& labels, int64_t ignore_index,
                                 int64_t n);
// The per-token weights (1 when not given). Checks weights as a finite fp32/fp64 vector of n.
std::vector<double> token_weights(const char* fn, const TensorView& weights, int64_t n);
// Checks reduction and num_items_in_batch; returns the divisor of the summed loss.
double divisor(const char* fn, Reduction reduction, double num_items_in_batch, int64_t count,
               int64_t n);
// Checks the loss output: fp32/fp64, [n] for none, one element otherwise.
void check_loss_output(const char* fn, const TensorView& loss, Reduction reduction, int64_t n);

struct Plan {
  Reduction reduction = Reduction::mean;
  std::vector<uint8_t> active;     // [n]
  std::vector<double> weight;      // [n]
  std::vector<double> grad_scale;  // [n]: weight[i] / divisor
  int64_t count = 0;               // counted tokens
  double divisor = 1.0;
};

// All of the above for n tokens and the loss output, in the order labels, weights, reduction,
// num_items_in_batch, loss.
Plan plan(const char* fn, int64_t n, const DivergenceOptions& options, const TensorView& loss);

// Writes the loss from the rows' unweighted losses, times `scale` (T^2 or 1): per token for none
// (row_loss * weight * scale; 0 for ignored or zero-weight tokens), else the sum in row order
// (the same bits for any thread count) * scale / divisor.
void store_loss(const Plan& plan, const double* row_loss, double scale, const TensorView& loss);

}  // namespace divkit::reduce
