// divkit: building blocks of vocabulary-parallel (sharded) divergences.
//
// When the vocabulary is split over ranks (a tensor-parallel lm_head: rank r holds the logit
// columns [offset_r, offset_r + V_r)), a divergence of softmax distributions needs, per row, the
// global log-sum-exp of both logits and the global sums of the divergence's terms. These three
// calls compute one rank's share; the caller combines them across ranks between
// the calls (the fused loops and vocab_parallel_divergence do it through a VocabShard callback):
//
//   1. divergence_shard_stats  -> stats[i] = {max_s, log_sum_s, max_t, log_sum_t} of the shard,
//      log_sum = log sum_j exp((x_j - max) / T) over the shard's columns (-inf, -inf when the
//      shard's row is all -inf). Combine: max = max_r max_r, log_sum = log sum_r
//      exp((max_r - max) / T + log_sum_r).
//   2. divergence_shard_sums   -> sums[i] under the global norm[i] (same layout as stats):
//      {sum g, sum u, sum v, 0} over the shard (see divergences-inl.h: g the terms, u / v the
//      student / teacher factors). Combine by summing; the row value is sum g.
//      Renyi: {S1, max log w, sum exp(log w - max log w), 0}; combine S1 by summing and the
//      other two as a log-sum-exp; L = log1p(S1) if |S1| < 0.5 else max + log sum; D = L / (a-1).
//   3. divergence_shard_grad   -> the gradients of the shard's logits, given norm, the combined
//      sums[i] = {sum g, sum u, sum v, 0} (Renyi: {L, max log w, log sum, near_zero ? 1 : 0}) and
//      grad_scale[i] = d loss / d D_i (weights, reduction divisor; 0 for rows to skip). The
//      T^2 factor (scale_by_t_squared) and the 1/T of the chain rule are applied inside.
//
// Rows with labels[i] == ignore_index are skipped (their outputs are 0). Arrays are fp64 [N, 4]
// (stats, norm, sums) and [N] (grad_scale); logits as in divergence(). Thread count does not
// change results.
//
// The vocabulary-parallel mode of the fused heads (fused_linear.h) and vocab_parallel_divergence
// below run these phases themselves and combine them through a VocabShard's all-reduce.
#pragma once

#include <cstdint>
#include <functional>

#include "divkit/divergence.h"
#include "divkit/tensor.h"

namespace divkit {

enum class CollectiveOp { sum, max };

// An in-place all-reduce of `count` doubles over the ranks of the group. Every rank makes the
// same calls in the same order (the sizes depend on the token count and the options only, never
// on a rank's shard), as torch.distributed's collectives require. An exception it throws
// propagates out of the call that made it.
using AllReduce = std::function<void(double* data, int64_t count, CollectiveOp op)>;

// This rank's place in a vocabulary-parallel group: rank r of `world` holds a contiguous block of
// the vocabulary, the blocks in rank order (sizes may differ; the offsets and the global V are
// agreed on with one all-reduce at the start of each call). Without all_reduce the head is not
// sharded.
struct VocabShard {
  int rank = 0;
  int world = 1;
  AllReduce all_reduce;
  bool active() const { return static_cast<bool>(all_reduce); }
};

// divergence() (divergence.h) over logits sharded by vocabulary: student and teacher [N, V_r] are
// this rank's columns; every rank passes the same labels, weights and options and gets the loss
// of the unsharded call, and the gradients of its own columns (fp32 outputs or any float dtype).
void vocab_parallel_divergence(const TensorView& student, const TensorView& teacher,
                               const DivergenceSpec& spec, const DivergenceOptions& options,
                               const DivergenceOutputs& outputs, const VocabShard& shard);

void divergence_shard_stats(const TensorView& student, const TensorView& teacher,
                            const DivergenceSpec& spec, const TensorView& labels,
                            int64_t ignore_index, const TensorView& stats);

void divergence_shard_sums(const TensorView& student, const TensorView& teacher,
                           const DivergenceSpec& spec, const TensorView& labels,
                           int64_t ignore_index, const TensorView& norm, const TensorView& sums);

void divergence_shard_grad(const TensorView& student, const TensorView& teacher,
                           const DivergenceSpec& spec, const TensorView& labels,
                           int64_t ignore_index, const TensorView& norm, const TensorView& sums,
                           const TensorView& grad_scale, const TensorView& grad_student,
                           const TensorView& grad_teacher);

}  // namespace divkit
