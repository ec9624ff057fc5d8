// divkit: row kernels of the distillation methods from the literature whose arithmetic runs over
// the vocabulary (or class) dimension. Everything per sample or per class is done by
// the callers (the python/divkit/distill/ package); here are only the [N, V] loops.
//
// Common conventions:
//   * student / teacher / standard / lame: [N, V] logits, float32, bfloat16, float16 or float64,
//     unit column stride, any row stride (0 = one row broadcast). -inf is a masked entry
//     (probability 0); NaN or +inf in a non-ignored row is an Error naming the argument and row.
//   * labels: optional int32 / int64 [N]; labels[i] == ignore_index marks row i as ignored (loss
//     0, gradient 0, logits not read). Where a method needs the target class, labels are
//     required and must lie in [0, V).
//   * Per-row outputs `out` are float32 or float64 [N]. Gradients are optional [N, V] views of
//     any float dtype; when one is given, `coef` ([N], float32 or float64) is required and the
//     gradient written is that of sum_i coef[i] * out[i] (coef is the upstream gradient of the
//     per-row losses; autograd's backward passes it).
//   * Arithmetic in fp64 per entry, rows independent (OpenMP over rows): results are identical
//     for any thread count.
// Every function throws divkit::Error whose message starts with the function name and names the
// argument.
#pragma once

#include <cstdint>

#include "divkit/tensor.h"

namespace divkit {

// Shannon entropy of softmax(logits / T) per row, in nats: H_i = -sum_j p_ij log p_ij.
// (BD-KD's entropy gap.)
void row_entropy(const TensorView& logits, double temperature, const TensorView& out);

// NKD, normalized knowledge distillation (Yang et al., "From Knowledge Distillation to
// Self-Knowledge Distillation: A Unified Approach with Normalized Loss and Customized Soft
// Labels", ICCV 2023; code yzd-v/cls_KD nkd.py). With y = labels[i]:
//   target_out[i]    = -p_y log q_y,     p = softmax(t), q = softmax(s)  (T = 1, as nkd.py)
//   nontarget_out[i] = -sum_{j != y} p^_j log q^_j,  p^ = softmax over j != y of t / tau,
//                      q^ likewise of s / tau  (the non-target distributions renormalized)
// (the caller multiplies the non-target term by gamma tau^2). Teacher gradients are not
// computed (the teacher is detached in NKD). grad_student receives the gradient of
// sum_i target_coef[i] target_out[i] + nontarget_coef[i] nontarget_out[i].
// USKD passes the log of its customized soft labels as `teacher`.
void nkd_rows(const TensorView& student, const TensorView& teacher, const TensorView& labels,
              int64_t ignore_index, double tau, const TensorView& target_out,
              const TensorView& nontarget_out, const TensorView& target_coef,
              const TensorView& nontarget_coef, const TensorView& grad_student);

// OFA-KD's adaptive target enhancement (Hao et al., "One-for-All: Bridge the Gap Between
// Heterogeneous Architectures in Knowledge Distillation", NeurIPS 2023; code Hao840/OFAKD
// ofa_loss): with p = softmax(t / T), q = softmax(s / T), e the one-hot label,
//   w_j = (p_j + e_j)^eps - e_j,    out[i] = -sum_j w_j log q_j.
// eps = 1 is the soft cross-entropy H(p, q); eps > 1 raises the target's weight relative to the
// rest when the teacher is confident. eps > 0.
void ofa_rows(const TensorView& student, const TensorView& teacher, const TensorView& labels,
              int64_t ignore_index, double eps, double temperature, const TensorView& out,
              const TensorView& coef, const TensorView& grad_student);

// DAC-KL-style distribution-adaptive clipping (Liu et al., "Multi-Granularity Semantic Revision
// for Large Language Model Distillation", 2024). The exact equations are not public (not
// verified); divkit's reading: per row a teacher high-density region [lower_i, upper_i] in
// probability space, a mask w_j in [0, 1] over the vocabulary,
//   hard (sharpness = 0):  w_j = 1[lower <= p_j <= upper]
//   soft (sharpness > 0):  w_j = sigma((log p_j - log lower) / sharpness) *
//                                sigma((log upper - log p_j) / sharpness)
// and the forward KL between the teacher and the student renormalized over the mask:
//   p~ = w p / sum(w p),  q~ = w q / sum(w q),  out[i] = KL(p~ || q~) (teacher || student),
// p = softmax(t / T), q = softmax(s / T). A row whose region holds no teacher mass gives 0.
// grad_student: coef * (q~ - p~) / T. grad_lower / grad_upper (optional [N], fp32/fp64, soft mask
// only; zero for the hard mask): the gradient with respect to the bounds, so that a module that
// predicts them can learn. 0 < lower < upper is required for non-ignored rows.
void clipped_kl_rows(const TensorView& student, const TensorView& teacher, const TensorView& lower,
                     const TensorView& upper, double temperature, double sharpness,
                     const TensorView& labels, int64_t ignore_index, const TensorView& out,
                     const TensorView& coef, const TensorView& grad_student,
                     const TensorView& grad_lower, const TensorView& grad_upper);

// Quantile bounds for clipped_kl_rows: sort p = softmax(t / T) in decreasing order; token k (in
// that order) is in the region when the mass before it, c_k = sum_{m < k} p_(m), satisfies
// mass_lo <= c_k < mass_hi. upper[i] = the largest kept probability, lower[i] = the smallest
// (so mass_lo = 0, mass_hi = 0.9 is a nucleus of 90% of the teacher mass). 0 <= mass_lo <
// mass_hi <= 1. With ties at the lower bound, clipped_kl_rows' hard mask keeps all tied tokens.
// float32 outputs are rounded outward (lower down, upper up), so that the mask keeps them too.
void mass_bounds(const TensorView& teacher, double temperature, double mass_lo, double mass_hi,
                 const TensorView& lower, const TensorView& upper);

// The k largest probabilities of softmax(t / T) per row, in decreasing order, into out [N, k]
// (fp32/fp64); zero-padded when k > V. (Input features of DAC-KL's bound module.)
void sorted_probs(const TensorView& teacher, double temperature, const TensorView& out);

// Swing distillation (Li et al., "Swing Distillation: A Privacy-Preserving Knowledge
// Distillation Framework", 2022): forward KL with a per-row temperature and noise on the soft
// targets. The paper's noise mechanism is not public (not verified); divkit adds seeded
// Gaussian noise to the tempered teacher logits, which keeps the soft target a distribution:
//   p = softmax(t / T_i + noise_std * eps_ij),  q = softmax(s / T_i),
//   out[i] = KL(p || q) (teacher || student),  grad_student = coef * (q - p) / T_i,
// eps_ij = swing_noise(seed)[i, j], a standard normal from a counter-based generator (the same
// for any thread count and row stride). temperatures: [N] fp32/fp64, finite and > 0.
void tempered_kl_rows(const TensorView& student, const TensorView& teacher,
                      const TensorView& temperatures, double noise_std, uint64_t seed,
                      const TensorView& labels, int64_t ignore_index, const TensorView& out,
                      const TensorView& coef, const TensorView& grad_student);

// The standard normal noise eps_ij that tempered_kl_rows uses with `seed`, into out [N, V] fp32
// or fp64 (for tests and for users who want to inspect it).
void swing_noise(uint64_t seed, const TensorView& out);

// USCD selective contrastive decoding step (Wang et al., "USCD: Improving Code Generation of
// LLMs by Uncertainty-Aware Selective Contrastive Decoding", 2024), as its official code
// computes it (alphadl/CodeGen-USCD, bigcode_eval/contrast.py, EnsembleLogitsProcessor with the
// standard prompt in row 0 and the lame prompt in row 1). Per row, with p = softmax(standard),
// p_l = softmax(lame) and the uncertainty u_i = std(p) (the sample standard deviation over the
// V entries, n - 1 in the denominator, as torch.std; a flat, uncertain distribution has a small
// u):
//   u_i >  std_threshold: out = log p (the standard log-probabilities, no contrast)
//   u_i <= std_threshold: out_j = log(p_j - lame_weight p_l_j)  where p_j >= filter_ratio mean(p)
//                                                             and the difference is > 0,
//                         -inf elsewhere.
// The official run uses source weights (1.0, -0.7), mean_num 0.005 and filter_num 0.666667,
// i.e. lame_weight 0.7, std_threshold 0.005, filter_ratio 2/3. A row can be all -inf when the
// lame prompt outweighs every kept token (as in the official code). out: [N, V] any float dtype;
// uncertainty: [N] fp32/fp64; applied: optional [N] (1 / 0, fp32/fp64/int32/int64).
// lame_weight >= 0, filter_ratio >= 0.
void selective_contrast(const TensorView& standard, const TensorView& lame, double lame_weight,
                        double std_threshold, double filter_ratio, const TensorView& out,
                        const TensorView& uncertainty, const TensorView& applied);

}  // namespace divkit
