// The vocabulary-parallel mode of the fused chunk loop: the group's collectives (ShardGroup) and
// the per-chunk combination of the shards' row statistics between the phases, for the
// divergences (vocab_parallel.h's three phases) and for the label losses (label_kernels.h's shard
// passes). Internal to src/fused_linear.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "divkit/divergence.h"
#include "divkit/tensor.h"
#include "divkit/vocab_parallel.h"

namespace divkit::fused {

// One call's view of its vocabulary-parallel group; a default-constructed one (or one made from an
// inactive VocabShard) is the unsharded head: offset 0 and global V = local V.
class ShardGroup {
 public:
  // Runs local_checks (the checks whose outcome may differ between ranks: the shard's weights and
  // biases, the outputs), then agrees on the layout with one all-reduce of sums: every rank's V_r,
  // the number of ranks whose checks failed, and each of `flags` (the options that decide which
  // collectives a call makes, such as a hidden-state gradient being asked for), which must be the
  // same on every rank. On a failure or a disagreement every rank throws (the failing ones their
  // own message), so that no rank is left waiting in a later collective.
  ShardGroup(const char* fn, const VocabShard& shard, int64_t v_local,
             const std::function<void()>& local_checks, std::vector<uint8_t> flags = {});
  ShardGroup(int64_t v_local) : global_v_(v_local), max_v_(v_local) {}

  bool on() const { return all_reduce_ != nullptr; }
  int64_t offset() const { return offset_; }
  int64_t global_v() const { return global_v_; }
  // The largest V_r: the chunk size is chosen from it, so that every rank makes the same calls.
  int64_t max_v() const { return max_v_; }

  // After a step whose outcome may differ between ranks: one all-reduce of the number of ranks
  // whose `error` is not empty; if any, every rank throws (its own message, or one naming `fn`
  // that points to the others), as the constructor does for the local checks.
  void agree(const char* fn, const std::string& error) const;

  void sum(double* data, int64_t count) const;
  void max(double* data, int64_t count) const;
  // out[world * count]: rank r's `count` values at r * count (an all-reduce sum of zeros
  // elsewhere, exact).
  void gather(const double* mine, int64_t count, std::vector<double>& out) const;

 private:
  const AllReduce* all_reduce_ = nullptr;
  int rank_ = 0, world_ = 1;
  int64_t offset_ = 0, global_v_ = 0, max_v_ = 0;
};

// The divergence of `spec` over rows of sharded logits (this rank's columns of student and
// teacher, [rows, V_r], any float dtype): stats -> combine -> sums -> combine, then, when a
// gradient is wanted, the shard's gradients. active[r] == 0 marks a skipped row (value 0).
// row_weight[r] = d loss / d D_r; each row adds row_weight[r] * T^2 (scale_by_t_squared) * D_r
// to row_loss[r] (nothing where row_weight[r] == 0; +inf where D_r is infinite). Gradients: the
// shard's d loss / d logits into grad_student / grad_teacher (optional, must not overlap the
// logits), rows with an infinite D_r given 0.
void sharded_divergence_rows(const char* fn, const ShardGroup& group, const TensorView& student,
                             const TensorView& teacher, const DivergenceSpec& spec,
                             const std::vector<uint8_t>& active, const double* row_weight,
                             double* row_loss, const TensorView& grad_student,
                             const TensorView& grad_teacher);

// The row statistics of the label losses over sharded logits, z = softcap(x) / T transformed in
// place in z ([rows, V_r], leading dimension V_r). labels: global ids, < 0 for ignored rows.
// Outputs [rows] (0 at ignored rows): lse, z_label, and when given mean_z (over the global V),
// entropy, topk_mass (of the k largest p over every shard). Throws (on every rank alike) for a
// row whose logits are NaN, +inf or all -inf on every rank.
struct ShardedLabelStats {
  // unmasked: when given (with mean_z), the number V' of unmasked entries (z > -inf) over every
  // shard, and mean_z is over them.
  double* unmasked = nullptr;
  double *lse = nullptr, *z_label = nullptr, *mean_z = nullptr, *entropy = nullptr,
         *topk_mass = nullptr;
  int64_t topk = 0;
};
void sharded_label_forward(const char* fn, const ShardGroup& group, float* z, int64_t rows,
                           int64_t v, const int64_t* labels, float inv_t, float softcap,
                           int64_t first_token, const ShardedLabelStats& out, int threads);

// Global labels to the shard's columns for label_kernels.h's gradient pass: -1 for ignored rows,
// the column for a label in the shard, 0 (with in_shard[r] = 0) for a label elsewhere, whose
// one-hot term must then be zero.
void local_labels(const ShardGroup& group, const int64_t* labels, int64_t rows, int64_t v,
                  std::vector<int64_t>& local, std::vector<uint8_t>& in_shard);

}  // namespace divkit::fused
