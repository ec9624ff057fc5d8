// divkit: token-level divergences between a teacher and a student distribution over a
// vocabulary, with their gradients, in one fused pass per row.
//
// For student logits s[N, V] and teacher logits t[N, V] and a temperature T:
//   q = softmax(s / T)   (student)          p = softmax(t / T)   (teacher)
// Each kind below is a divergence D(p, q) computed per row (token) i:
//
//   forward_kl        KL(p || q) = sum_j p_j (log p_j - log q_j)
//   reverse_kl        KL(q || p) = sum_j q_j (log q_j - log p_j)
//   jsd (beta)        generalized JSD as TRL's generalized_jsd_loss and Liger's JSD:
//                     m = beta p + (1 - beta) q,  beta KL(p || m) + (1 - beta) KL(q || m);
//                     beta = 0 is forward_kl and beta = 1 is reverse_kl exactly (TRL's special
//                     cases); beta in [0, 1]. (Agarwal et al. 2024, GKD)
//   skew_forward_kl   KL(p || alpha p + (1 - alpha) q), alpha in [0, 1] (DistiLLM, Ko et al.
//     (alpha)         2024); alpha = 0 is forward_kl. The true KL: DistiLLM's code drops the
//                     teacher entropy, a constant.
//   skew_reverse_kl   KL(q || (1 - alpha) p + alpha q), alpha in [0, 1] (DistiLLM); alpha = 0
//     (alpha)         is reverse_kl.
//   tvd               0.5 sum_j |p_j - q_j|            (total variation, in [0, 1])
//   hellinger         sum_j (sqrt p_j - sqrt q_j)^2     (squared Hellinger WITHOUT the 1/2
//                     factor, the f-divergence of f(u) = (sqrt u - 1)^2; in [0, 2])
//   jeffreys          KL(p || q) + KL(q || p)          (symmetric KL; D2O's regularizer)
//   chi2              Pearson chi^2(p || q) = sum_j (p_j - q_j)^2 / q_j
//   alpha_divergence  Amari: (1 - sum_j p_j^alpha q_j^(1-alpha)) / (alpha (1 - alpha)),
//     (alpha)         any finite alpha; alpha = 1 is forward_kl and alpha = 0 is reverse_kl
//                     (the limits). Summed as sum_j [alpha p + (1-alpha) q - p^a q^(1-a)] /
//                     (alpha (1 - alpha)), whose terms are all >= 0.
//   renyi (alpha)     Renyi divergence of order alpha > 0: log(sum_j p_j^alpha q_j^(1-alpha)) /
//                     (alpha - 1); alpha = 1 is forward_kl (the limit). Computed in log space:
//                     finite wherever the true value is, even when the sum under/overflows.
//   cross_entropy     -sum_j p_j log q_j               (soft-label cross-entropy H(p, q))
//
// Conventions (PyTorch, TRL, Liger):
//   * 0 log 0 = 0; a -inf logit is a masked entry with probability 0; a divergence that is
//     mathematically infinite (q_j = 0 where p_j > 0 for forward_kl, ...), or whose value or
//     gradient exceeds fp32's range, gives +inf for that token, and that token then
//     contributes no gradient.
//   * labels[i] == ignore_index marks token i as ignored: loss 0, gradient 0, not counted by
//     "mean"; its logits are not read (padding may hold anything).
//   * reduction: none (loss[i] per token), sum, mean (sum / number of non-ignored tokens),
//     batchmean (sum / N); num_items_in_batch > 0 makes the loss sum / num_items_in_batch
//     whatever the (non-none) reduction (gradient accumulation as Hugging Face trainers pass
//     it, and as TRL's losses do); with reduction none it is an error.
//   * weights[i] multiplies token i's loss and gradient (the "mean" divisor is still the count
//     of non-ignored tokens, not the sum of the weights).
//   * scale_by_t_squared multiplies loss and gradients by T^2 (Hinton et al.'s convention),
//     off by default as in TRL.
//
// Numerics: inputs fp32, bf16, fp16 or fp64 in any combination for student and teacher;
// arithmetic in fp32 with row sums accumulated in fp64 lanes, combined in a fixed order, so
// results are identical bit for bit for any thread count. The row (token) is the unit of work.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "divkit/tensor.h"

namespace divkit {

enum class DivergenceKind : int32_t {
  forward_kl,
  reverse_kl,
  jsd,
  skew_forward_kl,
  skew_reverse_kl,
  tvd,
  hellinger,
  jeffreys,
  chi2,
  alpha_divergence,
  renyi,
  cross_entropy,
};
inline constexpr int kNumDivergenceKinds = 12;

// "forward_kl", ...; parse throws Error naming `kind` and listing the valid names (its message
// starts with `fn`, the public function that took the name).
const char* divergence_kind_name(DivergenceKind kind);
DivergenceKind parse_divergence_kind(std::string_view name, const char* fn = "divergence");

enum class Reduction : int32_t { none, sum, mean, batchmean };
const char* reduction_name(Reduction reduction);
Reduction parse_reduction(std::string_view name);

// What to compute: the kind and its parameters.
struct DivergenceSpec {
  DivergenceKind kind = DivergenceKind::forward_kl;
  float beta = 0.5f;   // jsd
  float alpha = 0.1f;  // skew_*_kl, alpha_divergence, renyi
  float temperature = 1.0f;
  bool scale_by_t_squared = false;
};

// Throws Error when a parameter is out of range for the kind (names `fn` and the parameter).
void validate_spec(const DivergenceSpec& spec, const char* fn = "divergence");

struct DivergenceOptions {
  TensorView labels;  // optional, int32 or int64 [N]; only compared with ignore_index
  int64_t ignore_index = -100;
  TensorView weights;  // optional, fp32 or fp64 [N]
  Reduction reduction = Reduction::mean;
  double num_items_in_batch = 0.0;  // > 0: divisor of the summed loss
  // CUDA views only: the cudaStream_t (as an integer) the kernels run on, in order with the
  // caller's other work on it; 0 is the default stream.
  std::uintptr_t stream = 0;
  // CUDA views only. true: at the end of the call the host reads the device flags of the input
  // checks (one stream synchronization) and throws Error for NaN/+inf logits, rows without mass
  // or non-finite weights. false: no host read or synchronization (the call can be captured in
  // a CUDA graph); a call whose inputs would have raised gets a NaN loss (every element for
  // reduction none) and gradients that mean nothing, for the caller to check later on the
  // device (torch.isfinite(loss)). CPU calls always check and throw; on the CPU the flag only
  // changes when an in-place call (grad_student = the student logits) checks: true, every row
  // before anything is written (an extra pass that reads both inputs: 20 bytes moved per logit
  // instead of 12); false, each row as the kernel reads it, so that a bad row still throws but
  // the other rows of the student logits may already hold their gradient.
  bool check_finite = true;
};

// Outputs, allocated by the caller.
//   loss:          fp32 or fp64; [N] for reduction none, one element (shape [1], or any 1-element
//                  view with ndim >= 1) otherwise.
//   grad_student:  optional [N, V] of any float dtype, unit column stride, any row stride. It
//                  may be the student logits buffer itself (same data, dtype and strides): the
//                  gradient is then written in place, each row after it has been read, and the
//                  only extra memory is one row block per thread. In that case the inputs are
//                  checked for non-finite values before anything is written (unless
//                  options.check_finite is false: see there).
//   grad_teacher:  optional [N, V], the gradient with respect to the teacher logits.
// The gradients are those of the reduced loss (with an upstream gradient of 1).
struct DivergenceOutputs {
  TensorView loss;
  TensorView grad_student;
  TensorView grad_teacher;
};

// Computes the loss and, where their views are given, the gradients.
// student, teacher: [N, V] logits, fp32/bf16/fp16/fp64, unit column stride, any row stride.
// Throws Error (naming the argument) on shape or dtype mismatch, V = 0, non-finite (NaN or
// +inf) logits in a non-ignored row, a non-ignored row whose logits are all -inf, and
// out-of-range parameters.
void divergence(const TensorView& student, const TensorView& teacher, const DivergenceSpec& spec,
                const DivergenceOptions& options, const DivergenceOutputs& outputs);

// Convenience for C++ users: contiguous fp32 [n, v] inputs; returns the reduced loss (reduction
// none is taken as sum) and writes the student gradient into grad_student when it is not null.
float divergence_f32(const float* student, const float* teacher, int64_t n, int64_t v,
                     const DivergenceSpec& spec, Reduction reduction = Reduction::mean,
                     float* grad_student = nullptr);

}  // namespace divkit
