// divkit: divergences against sparse (top-k) and truncated teachers.
//
// 1. sparse_divergence: the teacher is given by its top-k log-probabilities per token, as
//    inference servers return them (vLLM / OpenAI-style `top_logprobs`): indices [N, k] into
//    the vocabulary and logprobs [N, k]. The student is the full logits s [N, V]. The remaining
//    teacher mass is handled by `SparseOptions::tail`:
//
//    renormalize  p_b = exp(lp_b) / sum_c exp(lp_c)        (b = 1..k, the teacher's entries)
//                 q_b = softmax(s / T)[i_b] / sum_c softmax(s / T)[i_c]
//                 D(p, q) over the k entries. The loss ignores the student's mass outside the
//                 k indices: the gradient is 0 there.
//    bucket       k + 1 buckets, the k entries plus the tail (everything else):
//                 p_b = exp(lp_b),  p_tail = 1 - sum_b p_b = -expm1(logsumexp(lp)) (>= 0)
//                 q_b = softmax(s / T)[i_b],  q_tail = sum_{j not in i} softmax(s / T)_j
//                 (summed directly over the tail entries: no cancellation in 1 - sum q_b)
//                 D(p, q) over the k + 1 buckets. The tail bucket's derivative spreads over the
//                 non-top-k logits through the softmax: every student logit gets a gradient.
//                 When k = V the tail is empty and bucket is renormalize (the teacher's
//                 remaining mass can only be rounding). When the k probabilities sum to more
//                 than 1 (rounding of the server's values; at most 1 + 1e-2 is accepted) they
//                 are scaled to sum 1 and the tail is 0.
//    Bucketing the tail is the "top-k + rest" estimator used when distilling from API logprobs
//    (as proposed for Liger-Kernel and Unsloth); renormalizing is OstQuant's KL-Top applied to
//    given log-probabilities.
//
//    Temperature: T divides the student logits only. The teacher log-probabilities are taken
//    as given: a server reports them for the distribution it computed (its temperature, or the
//    raw one: vLLM's `logprobs_mode` chooses raw or processed values), and the tail mass
//    1 - sum p_b is only meaningful for that distribution. To temper the teacher with tail =
//    renormalize, pass logprobs / T_teacher: renormalization makes that exactly softmax(t /
//    T_teacher) over the k entries.
//
// 2. topk_divergence: truncation of full teacher logits t [N, V] (OstQuant's KL-Top, Hu et al.
//    2025): per row, the k indices of the teacher's largest logits; p = softmax(t / T) and
//    q = softmax(s / T) restricted to them and renormalized; D(p, q) over the k entries. The
//    gradient w.r.t. the student logits is 0 outside the k indices. Ties in the selection go to
//    the lowest index (the order is: larger logit first, then lower index), so the selection
//    and the result are deterministic.
//
// Every kind of divergence.h applies (forward_kl = KL(p_teacher || q_student), reverse_kl =
// KL(q_student || p_teacher), jsd, skew_*, tvd, hellinger, jeffreys, chi2, alpha_divergence,
// renyi, cross_entropy) with its parameters, written once in src/divergence/divergences-inl.h.
// DivergenceOptions (labels / ignore_index, weights, reduction, num_items_in_batch) and
// scale_by_t_squared mean exactly what they mean for divergence(); an ignored row's student
// logits, indices and logprobs are not read.
//
// Dtypes: student logits fp32/bf16/f16/f64 (any row stride, unit column stride); indices
// int32/int64; logprobs fp32/f64/bf16; teacher logits (topk) fp32/bf16/f16/f64. Arithmetic:
// the student row's log-sum-exp in fp32 lanes summed in fp64, the per-bucket quantities in
// fp64, the divergence terms in fp32 (the structs of divergence()), row sums in fp64 in a fixed
// order: results are identical for any thread count.
//
// Errors (divkit::Error naming the argument): mismatched shapes, k < 1, k > V, indices out of
// [0, V) or repeated within a row, logprobs NaN or > 1e-3 (log-probabilities are <= 0; -inf is
// a probability 0 and is allowed), in bucket mode logprobs whose probabilities sum beyond
// 1 + 1e-2, a renormalize row whose logprobs are all -inf, NaN/+inf student logits, a student
// row whose logits are all -inf (bucket) or -inf at every teacher index (renormalize/topk).
// The teacher gets no gradient (its log-probabilities come from elsewhere).
#pragma once

#include <cstdint>
#include <string_view>

#include "divkit/divergence.h"
#include "divkit/tensor.h"

namespace divkit {

enum class SparseTail : int32_t { renormalize, bucket };
// "renormalize" / "bucket"; parse throws Error naming `tail`.
const char* sparse_tail_name(SparseTail tail);
SparseTail parse_sparse_tail(std::string_view name);

struct SparseOptions {
  SparseTail tail = SparseTail::bucket;
};

// Outputs, allocated by the caller (as DivergenceOutputs, without a teacher gradient):
//   loss          fp32 or fp64; [N] for reduction none, one element otherwise.
//   grad_student  optional [N, V] of any float dtype, unit column stride, any row stride; may be
//                 the student logits buffer itself (same data, dtype and strides): the gradient
//                 is then written in place (every input is checked before anything is written).
struct SparseOutputs {
  TensorView loss;
  TensorView grad_student;
};

// student [N, V]; teacher_indices [N, k] int32/int64; teacher_logprobs [N, k] fp32/f64/bf16
// (any strides for the two [N, k] tensors). See the top of this file.
void sparse_divergence(const TensorView& student, const TensorView& teacher_indices,
                       const TensorView& teacher_logprobs, const DivergenceSpec& spec,
                       const SparseOptions& sparse, const DivergenceOptions& options,
                       const SparseOutputs& outputs);

// student, teacher [N, V] logits; 1 <= k <= V. See the top of this file.
void topk_divergence(const TensorView& student, const TensorView& teacher, int64_t k,
                     const DivergenceSpec& spec, const DivergenceOptions& options,
                     const SparseOutputs& outputs);

}  // namespace divkit
