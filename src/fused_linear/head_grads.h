// The gradient side of a fused head. Internal to src/fused_linear.
#pragma once

#include <cstdint>
#include <vector>

#include "divkit/fused_linear.h"
#include "fused_linear/vocab_parallel.h"
#include "fused_linear/weight_blocks.h"

namespace divkit::fused {

// Accumulates the gradients of one head over the chunks: grad_hidden rows per chunk, grad_weight
// and grad_bias summed over chunks (fp32 GEMM accumulation into the output when it is a
// contiguous fp32 array, else into an owned fp32 buffer converted at the end; bias sums in fp64).
class HeadGradAccumulator {
 public:
  // v: rows of `weight` (the student's vocabulary; row_ids maps them to head.weight's rows).
  // group: a vocabulary-parallel group (null or off: not sharded); each chunk's grad_hidden rows
  // are summed over it, since every rank's shard of the vocabulary contributes to them.
  HeadGradAccumulator(const LinearHead& head, const LinearHeadGrads& grads, WeightBlocks* weight,
                      int64_t v, const std::vector<int64_t>* row_ids,
                      const ShardGroup* group = nullptr);

  // Add grad_weight and grad_bias to the outputs' values instead of writing them (grad_weight
  // must then be a contiguous fp32 array; grad_hidden is still written).
  void set_accumulate(bool on) { accumulate_ = on; }

  bool wanted() const {
    return grads_.hidden.defined() || grads_.weight.defined() || grads_.bias.defined();
  }

  // g: d loss / d logits of rows [r0, r0 + rows) ([rows, v], ld = ldg); h: their hidden rows.
  void add_chunk(const float* g, int64_t ldg, int64_t r0, int64_t rows, const F32Matrix& h,
                 std::vector<float>& scratch);

  // Writes grad_weight / grad_bias and, when no chunk was added (no tokens, or a teacher without
  // a soft term), zeros for every output; scatter-adds through row_ids for a mapped vocabulary.
  void finish();

 private:
  const LinearHead& head_;
  const LinearHeadGrads& grads_;
  WeightBlocks* weight_;
  const std::vector<int64_t>* row_ids_;
  const ShardGroup* group_;
  int64_t v_ = 0, h_ = 0;
  float* dw_ = nullptr;
  int64_t ldw_ = 0;
  std::vector<float> dw_owned_;
  std::vector<double> db_;
  std::vector<double> reduce_buffer_;  // a chunk's grad_hidden in fp64, for the group's sum
  bool first_ = true;
  bool accumulate_ = false;
};

}  // namespace divkit::fused
