// The work description handed from divergence.cc (argument checks, reductions) to the
// SIMD row kernels in divergence_kernels.cc. Everything here is already validated.
#pragma once

#include <cstdint>

#include "core/row_io.h"
#include "divkit/divergence.h"

namespace divkit::detail {

// Vocabulary-parallel (sharded) runs: the rows hold one rank's shard of the vocabulary, and the
// statistics are all-reduced between the phases (sharded_divergence_rows, through the group's
// VocabShard callback):
//   stats  out_stats[i] = {max_s, log_sum_s, max_t, log_sum_t} of the shard, where
//          log_sum = log sum_j exp((x_j - max) / T) (-inf, -inf for an all-masked shard row);
//   sums   with the global normalizers in_norm[i] = {max_s, log_sum_s, max_t, log_sum_t}:
//          out_sums[i] = {sum g, sum u, sum v} over the shard (Renyi: {S1, max log w,
//          sum exp(log w - max log w)});
//   grad   with in_norm and the global in_sums[i] = {sum g, sum u, sum v} (Renyi: {L = log sum
//          w, max log w, log_rel, near_zero}), the gradients of the shard's logits.
enum class ShardMode : int32_t { none, stats, sums, grad };

struct RowJob {
  RowInput student, teacher;
  int64_t n = 0, v = 0;
  DivergenceSpec spec;              // validated; jsd/alpha/renyi limits already resolved to a kind
  const uint8_t* active = nullptr;  // [n]: 0 for ignored rows
  const double* grad_scale = nullptr;  // [n]: d(reduced loss)/d(row loss) (weights, divisor)
  double* row_loss = nullptr;          // [n] out: the divergence of each row (0 for ignored rows)
  RowOutput grad_student, grad_teacher;
  bool check_only = false;  // only look for non-finite rows (before an in-place write)
  ShardMode shard = ShardMode::none;
  double* out_stats = nullptr;      // [n, 4]
  const double* in_norm = nullptr;  // [n, 4]
  double* out_sums = nullptr;       // [n, 4]
  const double* in_sums = nullptr;  // [n, 4]
  int num_threads = 1;
  // Out: first row with NaN/+inf (after dividing by T) or with every logit -inf (no_mass).
  BadRow bad_student, bad_teacher;
};

// jsd beta 0/1, alpha_divergence alpha 0/1, renyi alpha 1, skew alpha 0 -> their KL kind (the
// kernels implement the interior of each parameter range). Used by every family that runs the
// divergence definitions (divergence.cc, sparse.cc).
DivergenceSpec resolve_divergence_limits(DivergenceSpec spec);

// Runs the rows on the best SIMD target (Highway dynamic dispatch).
void run_divergence_rows(RowJob& job);

// student_logits and teacher_logits: float [N, V] matrices of one shape, with V >= 1 when
// need_vocab; else throws Error naming `fn` and the argument.
void check_logit_pair(const char* fn, const TensorView& student, const TensorView& teacher,
                      bool need_vocab = true);

// Throws Error when `bad` names a row: "<fn>: <name> contains NaN or +inf at row R<note>", or for
// a row without mass "<fn>: <name> row R<no_mass_what>; mark it with labels = ignore_index<note>".
void throw_bad_row(const char* fn, const char* name, const BadRow& bad,
                   const char* no_mass_what = " has every logit -inf (no distribution)",
                   const char* note = "");

}  // namespace divkit::detail
