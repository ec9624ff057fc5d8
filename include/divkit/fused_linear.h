// divkit: fused linear-head losses. From hidden states to loss and gradients in chunks of
// tokens, never materializing the [N x V] logits.
//
// A linear head maps hidden states h[N, H] to logits z = h W^T + b with W[V, H] and b[V]. For
// each chunk of C tokens the kernels compute the chunk's logits with a GEMM into an fp32 buffer
// [C, V], the loss terms and d loss / d z of the chunk in that buffer (the token-level kernels of
// divergence.h and the label kernels below), then the gradients with two more GEMMs:
//   grad_h[chunk] = G W,   grad_W += G^T h[chunk],   grad_b += column sums of G.
// Peak extra memory: O(C x V) for the chunk buffers, plus an fp32 accumulator for grad_W when
// the requested output is not a contiguous fp32 array (bf16: 1 GB at V = 128256, H = 2048);
// independent of N. A weight that is not fp32 is never copied whole: it is converted to fp32
// one piece of about 8 MiB of rows at a time (one buffer per thread), inside each GEMM that reads
// it. The chunk size is chosen from V (about 256 MiB of fp32 logits per chunk buffer), or set by
// the caller.
//
// Numerics: hidden states and weights may be fp32, bf16, fp16 or fp64; they are converted to
// fp32 (exactly, for bf16 and fp16) and multiplied and accumulated in fp32 (CBLAS sgemm): logits
// are never rounded to a low-precision dtype. Loss and row statistics as in divergence.h (fp32
// arithmetic, fp64 row sums). The GEMMs come from OpenBLAS, cut into pieces whose shapes depend on
// V and H only, each a single-threaded call, and the vocabulary is summed in a fixed order: results
// are bitwise the same for any thread count (set_num_threads) and any weight dtype given the same
// widened values.
//
// On CUDA (every view of the call on one CUDA device; builds with CUDA): fused_linear_divergence,
// fused_linear_sparse_divergence, fused_linear_cross_entropy, fused_linear_logprobs and
// fused_linear_logprobs_backward run the same
// chunk loop on the device (src/fused_linear/*_loop_cuda.cu; not yet run on a GPU, only on the CPU
// through the CUDA emulator): logits by cuBLAS (cublasGemmEx, loaded at run time; fp32
// accumulation, fp32 logits), divkit's CUDA row kernels on each chunk (the divergence or sparse
// kernel for the soft term, the label-row kernel for the labels' terms), the gradient GEMMs with
// the logit gradient rounded to the head's dtype for a bf16 / fp16 head (as Liger-Kernel and a bf16
// autograd head). Hidden and weight must share one dtype among fp32, bf16, fp16 (no fp64), unit
// stride along H. Everything runs on the spec's (DivergenceOptions') `stream`; the workspace is
// cudaMallocAsync / cudaFreeAsync pairs on it: per head the chunk buffer [C, V] fp32 (plus [C, V]
// in the head's dtype for the gradient), an fp32 [V, H] accumulator unless grad_weight is a
// contiguous fp32 array, and a few fp64 [N] vectors. Checks: device flags read once after the
// loop, plus, for fused_linear_divergence, the divergence kernel's after each chunk (one
// synchronization each); none with check_finite = false (NaN outputs instead of an Error). A
// float16 head reads its logit gradient's largest entry back once per chunk (the scale of the
// gradient GEMMs). Not on CUDA in the core (Error): vocabulary-parallel shards, teacher_token_ids,
// FusedLabelTerms; the Python package runs them on CUDA tensors in its PyTorch chunk loop.
//
// Conventions: labels [N] int32/int64 with ignore_index (default -100) marking ignored tokens;
// reductions none | sum | mean (over non-ignored tokens) | batchmean (over N), and
// num_items_in_batch, exactly as in divergence.h. Gradients are those of the returned loss (for
// reduction none: of the sum of the per-token losses). Gradient outputs are optional, written
// (not accumulated), in any float dtype.
#pragma once

#include <cstdint>

#include "divkit/divergence.h"
#include "divkit/sparse.h"
#include "divkit/tensor.h"
#include "divkit/vocab_parallel.h"

namespace divkit {

// One linear head: logits = hidden @ weight^T + bias. A -inf bias entry masks that vocabulary
// entry (padded vocabularies): probability 0, gradient 0, as a -inf logit anywhere in divkit,
// with softcap too (softcap(-inf) = -inf, not -c); NaN or +inf bias entries, and counted rows
// whose logits are all -inf, are errors. The PyTorch chunk loop (CUDA tensors,
// backend="torch") behaves the same.
struct LinearHead {
  TensorView hidden;  // [N, H], float, unit stride along H
  TensorView weight;  // [V, H], float, unit stride along H
  TensorView bias;    // [V], float, optional
};

// The gradients of one head; each optional, each the shape of its input.
struct LinearHeadGrads {
  TensorView hidden;
  TensorView weight;
  TensorView bias;
};

// Extras of fused_linear_divergence for the token-level preference losses (TDPO, SparsePO), which
// need the label log-probabilities of both heads beside the per-token divergence: all are computed
// from the same chunk of logits in the same pass, and the backward can keep chunks instead of
// recomputing them. Each field optional; not supported with a vocabulary-parallel shard.
struct FusedLabelTerms {
  // [N] fp32/fp64 outputs: log softmax(z)[label] of the student's (teacher's) logits at
  // temperature 1, 0 at ignored tokens (needs labels in [0, V) where not ignored). The teacher's
  // needs the soft term (soft_weight != 0).
  TensorView student_logprobs;
  TensorView teacher_logprobs;
  // [N] fp32/fp64: token i's weight of the hard term, replacing hard_weight * weights[i] /
  // divisor (the hard term is then on even when hard_weight is 0). The soft term keeps
  // soft_weight * weights[i] / divisor: the two terms get independent per-token weights, as the
  // backward of two per-token outputs needs (d/dz log p(y) = -d/dz CE).
  TensorView hard_weights;
  // The keep budget: [K, V] fp32 contiguous buffers (K <= N; either may be absent). With
  // kept_filled false the call copies the student's (teacher's) logits of every chunk lying
  // inside tokens [0, K) there; with kept_filled true it reads them from there instead of
  // recomputing them with a GEMM (the backward of a forward that filled them, same inputs and
  // chunk_size). K x V x 4 bytes per head is the memory kept between the two calls.
  TensorView kept_student;
  TensorView kept_teacher;
  bool kept_filled = false;
  // Add the student's weight and bias gradients to the outputs' values instead of writing them
  // (grad_weight must be a contiguous fp32 array): one accumulator over several calls.
  bool accumulate_weight_grads = false;
};

struct FusedLinearOptions {
  // Tokens per chunk; 0 chooses it (about 256 MiB of fp32 logits per [C, V] buffer, 32 to 1024
  // tokens, at most N).
  int64_t chunk_size = 0;
  // loss = hard_weight * CE(student, labels) + soft_weight * divergence, as TRL's GKD / Liger's
  // distillation losses combine them. The hard term is the plain cross-entropy of the student's
  // logits at temperature 1 against labels (needs labels), reduced like the divergence.
  float hard_weight = 0.0f;
  float soft_weight = 1.0f;
  // A student vocabulary smaller than the teacher's: teacher_token_ids[j] (int32/int64, [V_s])
  // is the teacher's row for student token j, and the teacher distribution is the softmax of
  // the teacher logits at those rows only (renormalized over the shared tokens). Truncation to
  // the first V_s tokens is teacher_token_ids = 0..V_s-1. Without it the vocabularies must be
  // equal: nothing is ever padded with logit 0 (that would put mass on tokens that do not exist).
  TensorView teacher_token_ids;
  // Vocabulary-parallel mode (vocab_parallel.h): the weights and biases are this rank's shard of
  // the vocabulary; hidden states, labels (global token ids) and options are the same on every
  // rank. Every rank gets the loss of the unsharded head, the gradients of its shard and the whole
  // hidden-state gradient (all-reduced). teacher_token_ids is not supported with it (shard the
  // teacher's vocabulary like the student's), nor is the sparse teacher.
  VocabShard shard;
  // Label log-probs, per-token hard weights and kept logits (fused_linear_divergence only).
  FusedLabelTerms terms;
};

// Knowledge distillation from hidden states: any divergence of divergence.h between
// p = softmax(z_teacher / T) and q = softmax(z_student / T), z = h W^T + b per model, with all
// of divergence()'s options (temperature, ignore_index via options.labels, weights, reductions,
// num_items_in_batch), plus the optional hard-label term of FusedLinearOptions. The student and
// teacher hidden sizes may differ; the token counts must agree.
//   loss: [1] (reductions other than none) or [N] (none), fp32 or fp64.
//   student_grads: d loss / d (student hidden, weight, bias), each optional.
//   teacher_grads: d loss / d (teacher hidden, weight, bias), each optional (online
//     distillation; the teacher must then be differentiable, e.g. with the hard term it is not
//     involved).
// Throws Error naming the argument for shape/dtype mismatches, labels out of [0, V) that are not
// ignore_index (when hard_weight != 0), non-finite hidden states or weights, and token ids out
// of the teacher's range.
void fused_linear_divergence(const LinearHead& student, const LinearHead& teacher,
                             const DivergenceSpec& spec, const DivergenceOptions& options,
                             const FusedLinearOptions& fused, const TensorView& loss,
                             const LinearHeadGrads& student_grads = {},
                             const LinearHeadGrads& teacher_grads = {});

// Distillation from a sparse (top-k) teacher, fused with the student's head: the student logits
// z = h W^T + b per chunk, then sparse_divergence (sparse.h: the teacher's k (index, log-prob)
// pairs per token, tail renormalized or kept as one bucket) with all its options, plus the
// optional hard-label term of FusedLinearOptions (teacher_token_ids does not apply).
// teacher_indices [N, k] int32/int64, teacher_logprobs [N, k] fp32/fp64/bf16.
void fused_linear_sparse_divergence(const LinearHead& student, const TensorView& teacher_indices,
                                    const TensorView& teacher_logprobs, const DivergenceSpec& spec,
                                    const SparseOptions& sparse, const DivergenceOptions& options,
                                    const FusedLinearOptions& fused, const TensorView& loss,
                                    const LinearHeadGrads& student_grads = {});

// Cross-entropy against hard labels, as torch.nn.functional.cross_entropy with the options of
// Liger's fused linear cross-entropy. With z = softcap(h W^T + b) (softcap c > 0:
// z = c tanh(x / c), Gemma 2's logit soft-capping, with -inf kept -inf so that a masked entry
// stays masked; 0 disables it), lse = logsumexp(z):
//   loss_i = (1 - eps) (lse - z_y) + eps (lse - mean_j z_j) + z_loss_scale * lse^2
// (label smoothing eps in [0, 1) as PyTorch: the uniform target's share is eps; z-loss as
// PaLM). With masked entries (a -inf bias entry: z = -inf) the smoothing spreads over the V'
// unmasked entries of the row: mean_j runs over them, the target is eps / V' on each and 0 on a
// masked one (whose weight row and bias take a gradient of exactly 0), so the loss is finite;
// V' = V without one. Ignored tokens contribute 0 and are not counted by mean.
struct CrossEntropySpec {
  int64_t ignore_index = -100;
  float label_smoothing = 0.0f;
  float z_loss_scale = 0.0f;
  float softcap = 0.0f;
  Reduction reduction = Reduction::mean;
  double num_items_in_batch = 0.0;
  int64_t chunk_size = 0;  // as FusedLinearOptions::chunk_size
  TensorView weights;      // optional [N] fp32/fp64: multiplies token i's loss and gradient
  VocabShard shard;        // as FusedLinearOptions::shard
  // CUDA views (every view of the call on one CUDA device: "On CUDA" at the top of this file):
  // the stream its kernels and GEMMs run on (cudaStream_t as an integer; 0 is the default stream)
  // and whether it reads its checks back at the end (one synchronization); check_finite = false
  // reads nothing, for CUDA graph capture: a bad input then gives NaN outputs instead of an Error.
  std::uintptr_t stream = 0;
  bool check_finite = true;
};

// Per-token outputs besides the loss; each optional, [N] fp32 or fp64, 0 at ignored tokens.
// Computed only when given; none has a gradient except through logprobs and entropy as stated.
struct LabelStatsOutputs {
  TensorView logprobs;   // log p(label) = z_y - lse (of the softcapped, tempered logits)
  TensorView entropy;    // -sum_j p_j log p_j
  TensorView lse;        // logsumexp_j z_j
  TensorView topk_mass;  // sum of the k largest p_j (needs topk >= 1)
  int64_t topk = 0;
  // log sum_j p_j^2 = logsumexp(2 z) - 2 lse (the WPO weight's alignment term, Zhou et al. 2024),
  // from the exps the row statistics already take.
  TensorView log_sum_sq_probs;
  // 1 where the label is the argmax of z, else 0 (also fp32/fp64/int32/int64). Ties go to the
  // first maximal index, as torch.argmax and TRL's fused head: a label tied with an earlier
  // token's logit is not top-1. Not supported with a vocabulary-parallel shard (nor
  // log_sum_sq_probs).
  TensorView is_top1;
};

void fused_linear_cross_entropy(const LinearHead& head, const TensorView& labels,
                                const CrossEntropySpec& spec, const TensorView& loss,
                                const LinearHeadGrads& grads = {},
                                const LabelStatsOutputs& stats = {});

// Selective log-softmax: per-token log p(label) of softmax(z / T), z = h W^T + b, without
// materializing the logits (what DPO, GRPO and PPO need of the policy), and optionally the
// per-token entropy, logsumexp, top-k probability mass, log sum p^2 and top-1 flag
// (LabelStatsOutputs). Ignored tokens give 0.
// The backward recomputes each chunk's logits and row statistics (nothing of size V is kept
// between the calls): given dL/dlogprobs g [N] and optionally dL/dentropy e [N] (fp32/fp64), it
// writes dL/d(hidden, weight, bias) with
//   dL/dz_j = (g (1[j = y] - p_j) - e p_j (log p_j + H)) / T.
struct LogprobsSpec {
  int64_t ignore_index = -100;
  float temperature = 1.0f;
  int64_t chunk_size = 0;
  VocabShard
      shard;  // as FusedLinearOptions::shard  // as CrossEntropySpec::stream and ::check_finite
  std::uintptr_t stream = 0;
  bool check_finite = true;
};

void fused_linear_logprobs(const LinearHead& head, const TensorView& labels,
                           const LogprobsSpec& spec, const LabelStatsOutputs& stats);

void fused_linear_logprobs_backward(const LinearHead& head, const TensorView& labels,
                                    const LogprobsSpec& spec, const TensorView& grad_logprobs,
                                    const TensorView& grad_entropy, const LinearHeadGrads& grads);

// The row step of the label heads on one chunk of logits already computed: what the chunk loop of
// divkit.backends.torch_ops (torch GEMMs around it) calls for each chunk of CUDA tensors; CPU
// tensors run the same CPU row kernels as the fused heads above (fp32 logits only). Per row i
// with labels[i] != ignore_index, with z = softcap(x) / T (softcap(x) = c tanh(x / c), and -inf
// at a masked entry x = -inf, whose dz/dx is 0; none when c = 0) and p = softmax(z):
//   statistics, each optional, fp64 [rows], 0 at ignored rows: lse = logsumexp_j z_j, z_label =
//   z_y, mean_z = mean_j z_j, entropy = -sum_j p_j log p_j, topk_mass = the sum of the topk
//   largest p_j, log_sum_sq = log sum_j p_j^2, is_top1 = 1 where y is the first maximal z;
//   gradient, when coef_a0, coef_b and coef_c are given (fp64 [rows]; coef_a1 and coef_e
//   optional): x is overwritten with dL/dx_j = dL/dz_j dz_j/dx_j,
//     dL/dz_j = a p_j + b 1[j = y] + c + e p_j (log p_j + H),  a = a0 + a1 lse,
//   (cross-entropy: a0 = s, a1 = 2 s z_loss, b = -s (1 - eps), c = -s eps / V; log-probs:
//   a0 = -g, b = g, e = -g_entropy), and ignored rows become 0. Without the coefficients the
//   logits are read only on CUDA (on the CPU they are left as z).
// Masked entries and label smoothing: unmasked (optional, fp64 [rows], 0 at ignored rows) is the
// number V' of entries with z > -inf. By default mean_z and c are over every entry, masked ones
// included (a masked entry gets c, and mean_z is -inf where an entry is masked). With
// smooth_unmasked, label smoothing spreads over the V' unmasked entries, as the fused
// cross-entropy does: mean_z = sum_{z_j > -inf} z_j / V', and the c term goes to the unmasked
// entries only, each getting c V / V' (0 at a masked one). c stays the per-entry coefficient of a
// row without masked entries (-s eps / V), so the caller passes the same coefficients either way
// and each row's c terms still sum to c V; an unmasked entry gets -s eps / V'. A row without a
// masked entry gives the same bits with or without smooth_unmasked (V / V' = 1 exactly).
// NaN or +inf logits, or a row with every z -inf: Error "<the token first_token + row> ... are
// NaN, +inf or all -inf"; a label outside [0, V) that is not ignore_index: Error. On CUDA the
// kernel runs on `stream`, and the check reads a device flag after it (one stream
// synchronization); check_finite = false skips that read (CUDA graph capture), and a bad row then
// gets NaN statistics and a NaN gradient row instead of an error. On CUDA the check is read after
// the kernel, so with the coefficients every row's gradient has been written over the logits when
// the error is raised (the CPU raises first, the logits untouched); the chunk loops pass their own
// chunk buffer.
struct LabelRowsArgs {
  TensorView
      logits;  // [rows, V] float32/bfloat16/float16/float64 (CPU: float32), unit column stride
  TensorView labels;  // [rows] int32/int64
  int64_t ignore_index = -100;
  float temperature = 1.0f;
  float softcap = 0.0f;
  TensorView lse, z_label, mean_z, entropy, topk_mass, log_sum_sq, is_top1;
  TensorView unmasked;  // V' per row (see above)
  int64_t topk = 0;
  TensorView coef_a0, coef_a1, coef_b, coef_c, coef_e;
  bool smooth_unmasked = false;  // mean_z and c over the unmasked entries (see above)
  int64_t first_token = 0;       // the token index of row 0, for the error messages
  std::uintptr_t stream = 0;
  bool check_finite = true;
};

void label_rows(const char* fn, const LabelRowsArgs& args);

}  // namespace divkit
