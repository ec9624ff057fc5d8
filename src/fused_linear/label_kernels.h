// Row kernels of the label losses (cross-entropy, selective log-softmax) over an fp32 block of
// logits [rows, V] owned by the fused driver. Arguments are already validated.
#pragma once

#include <cstdint>

namespace divkit::detail {

// Forward: per row, z = softcap(x) / T (written back in place when softcap > 0 or T != 1), then
// the row statistics. Output arrays may be null (not wanted).
struct LabelForwardJob {
  float* z = nullptr;
  int64_t ldz = 0, rows = 0, v = 0;
  const int64_t* labels = nullptr;  // [rows]; < 0: ignored (row skipped, stats 0)
  float inv_t = 1.0f, softcap = 0.0f;
  double* lse = nullptr;      // logsumexp_j z_j
  double* z_label = nullptr;  // z_y
  double* mean_z = nullptr;   // mean_j z_j (label smoothing; see `unmasked`)
  // [rows] the number V' of unmasked entries (z > -inf) of each row. When given, mean_z is the
  // mean over them (sum z / V', finite with masked entries; the same bits as over every entry
  // when none is masked), and the fused gradient's c goes to them only (0 at masked entries):
  // label smoothing over the entries that are in the vocabulary.
  double* unmasked = nullptr;
  double* entropy = nullptr;    // -sum p log p
  double* topk_mass = nullptr;  // sum of the topk largest p
  int64_t topk = 0;
  double* log_sum_sq = nullptr;  // log sum p^2, from the exps of the sums (no extra exp)
  double* is_top1 = nullptr;     // 1 where the label is the first maximal z, else 0
  int num_threads = 1;
  int64_t bad_row = -1;  // out: first row with NaN/+inf (or every entry -inf)

  // The gradient in the same sweep (unsharded rows): when `coef` is given, each row becomes, right
  // after its statistics (the row still in cache), dL/dx_j = dL/dz_j * dz/dx_j + add_j with
  //   dL/dz_j = a p_j + b 1[j = y] + c + e p_j (z_j - lse + H),  dz/dx as in LabelGradJob,
  // p_j = exp(z_j - max) / S: one exp per logit for statistics and gradient, one read and one
  // write of the row from memory. Without softcap and entropy term the exps are kept over z and
  // scaled in place; with softcap (dz/dx needs z) or `coef_entropy` (the term needs z and H) they
  // are kept in a row buffer of the thread (V floats, beside the row in L2) and z stays until the
  // gradient sweep reads both. The top-k selection reads z before the exps are written.
  // coef(ctx, row, lse, &a, &b, &c, &e) gives the row's coefficients from its lse (e is read only
  // with coef_entropy); it runs on the worker threads. Ignored rows become add (or 0). z_label,
  // lse, mean_z, entropy and topk_mass are still written.
  void (*coef)(void* ctx, int64_t row, double lse, double* a, double* b, double* c,
               double* e) = nullptr;
  void* coef_ctx = nullptr;
  bool coef_entropy = false;   // coef may give e != 0: the sweep takes H and keeps z
  const float* add = nullptr;  // optional [rows, V] block added to the gradient
  int64_t ldadd = 0;

  // Vocabulary-parallel passes, over one rank's shard of each row (the driver combines the ranks'
  // values between them; ignored rows are skipped, their outputs -inf / 0):
  //  1. shard_max given: z = softcap(x) / T in place and shard_max[i] = the shard's max of z
  //     (-inf when every entry is -inf; +inf marks a row holding NaN or +inf). Nothing else.
  //  2. shift given (the global max of each row; z already transformed): partials[4 i + k] =
  //     {sum exp(z - shift), sum exp(z - shift) (z - shift), sum z} for k = 0, 1, 2 (k = 3 is left
  //     to the driver; with `unmasked`, sum z over the shard's unmasked entries and unmasked[i]
  //     their number), and, when topk_z is given, topk_z[i * topk, + topk) = the shard's topk
  //     largest z (any order, -inf where the shard has fewer entries).
  double* shard_max = nullptr;
  const double* shift = nullptr;
  double* partials = nullptr;
  double* topk_z = nullptr;
};
void label_rows_forward(LabelForwardJob& job);

// Backward, in place: z (the transformed logits of the forward) becomes dL/dx, x the raw
// logits: with p_j = exp(z_j - lse),
//   dL/dz_j = a p_j + b 1[j = y] + c + e p_j (z_j - lse + H),
//   dL/dx_j = dL/dz_j * dz/dx_j + add_j,   dz/dx = (1 - (T z / softcap)^2) / T  (1/T without
// softcap). a, b, c, e are per row; ignored rows are zeroed (plus add).
struct LabelGradJob {
  float* z = nullptr;
  int64_t ldz = 0, rows = 0, v = 0;
  const int64_t* labels = nullptr;
  float inv_t = 1.0f, softcap = 0.0f;
  const double* lse = nullptr;
  const double* entropy = nullptr;                                      // needed when e != 0
  const double *a = nullptr, *b = nullptr, *c = nullptr, *e = nullptr;  // e may be null
  bool c_unmasked = false;     // c only at unmasked entries (z > -inf), 0 at masked ones
  const float* add = nullptr;  // optional [rows, V] block added to the gradient
  int64_t ldadd = 0;
  int num_threads = 1;
};
void label_rows_grad(const LabelGradJob& job);

// Whether the fused label losses (label_loop.cc) take each row's gradient in the sweep of its
// statistics (LabelForwardJob::coef, the default) or in a pass of its own over the chunk
// (label_rows_grad) after the forward; both give the same gradient to fp32 rounding. For tests and
// benchmarks that compare the two; process-wide.
void set_label_one_sweep(bool on);
bool label_one_sweep();

}  // namespace divkit::detail
