// divkit: the batched arithmetic of the RLHF utilities and of the sample-based preference losses
// (D2O, HyPO's online KL term, SuperHF), with the gradients of the losses.
//
// All views are CPU tensors of float32 or float64 (indices int64), 1-D [N] or 2-D [B, K] of any
// strides. Arithmetic is in fp64 with stable forms (log-sigmoid, expm1, clamped exponents);
// outputs are written in their own dtype (fp32 or fp64). The loops are serial, so results do not
// depend on the thread count. Bad input throws divkit::Error naming the function and argument.
//
// Gradient convention: a loss kernel takes an optional upstream gradient `grad_out` (ones when
// not given) and writes the gradient of sum_i grad_out[i] * out[i] into each grad_* view given.
#pragma once

#include <cstdint>
#include <string_view>

#include "divkit/tensor.h"

namespace divkit {

// ---- per-token KL estimators (Schulman 2020, "Approximating KL divergence"; verl's kl_penalty)
// From the log-probs of sampled tokens y ~ pi, r = ref_logprobs - logprobs (= log pi_ref(y) -
// log pi(y)); each estimates KL(pi || pi_ref):
//   k1   -r                    (verl "kl"; unbiased, high variance)
//   k2   r^2 / 2               (verl "mse"; biased, low variance)
//   k3   exp(r) - r - 1        (verl "low_var_kl"; unbiased, >= 0), computed as expm1(r) - r
//   abs  |r|
// clamp (verl, k3 only): r clamped to [-20, 20] and k3 to [-10, 10]; as torch.clamp, the
// gradient is zero where a clamp is active (subgradient 0 of |r| at r = 0, as torch.abs).
enum class KlEstimator : int32_t { k1, k2, k3, abs };
// Accepts k1, k2, k3, abs and verl's aliases kl, mse, low_var_kl; throws Error naming `kind`.
KlEstimator parse_kl_estimator(std::string_view name);

// logprobs, ref_logprobs, out [N]; grad_out [N] optional; grad_logprobs, grad_ref [N] optional.
void kl_estimator(const TensorView& logprobs, const TensorView& ref_logprobs, KlEstimator kind,
                  bool clamp, const TensorView& out, const TensorView& grad_out = {},
                  const TensorView& grad_logprobs = {}, const TensorView& grad_ref = {});

// ---- reward-model ensembles (Coste et al. 2023, eqs. 3-5) -------------------------------------
// rewards [N, E] (E ensemble members per row) -> out [N]:
//   mean  (1/E) sum_e R_e
//   wco   min_e R_e (worst case; the gradient goes to the first minimum)
//   uwo   mean - lambda * (1/E) sum_e (R_e - mean)^2 (uncertainty-weighted, population variance)
enum class EnsembleMethod : int32_t { mean, wco, uwo };
EnsembleMethod parse_ensemble_method(std::string_view name);
void ensemble_rewards(const TensorView& rewards, EnsembleMethod method, double uwo_lambda,
                      const TensorView& out, const TensorView& grad_out = {},
                      const TensorView& grad_rewards = {});

// ---- InfAlign (Balashankar et al. 2024) ---------------------------------------------------------
// Calibrated reward: the empirical CDF of the reference policy's rewards,
//   out[b, n] = (1/M) #{m : ref_rewards[b, m] <= rewards[b, n]}   in [0, 1],
// rewards [B, N], ref_rewards [B, M] (M >= 1, no NaN), out [B, N]. O((N + M) log M) per row.
void calibrate_reward(const TensorView& rewards, const TensorView& ref_rewards,
                      const TensorView& out);
// The transform phi(u) = exp(t u) of a calibrated reward u (t > 0: best-of-N; t < 0: best-of-N
// jailbreaking), elementwise on [N], with d phi / du = t phi. Exponent clamped at 80.
void infalign_transform(const TensorView& calibrated, double t, const TensorView& out,
                        const TensorView& grad_out = {}, const TensorView& grad_calibrated = {});

// ---- best-of-N: rewards [B, N] (N >= 1) -> indices [B] (int64, first maximum; NaN rejected)
// and best [B] (optional).
void best_of_n(const TensorView& rewards, const TensorView& indices, const TensorView& best = {});

// ---- D2O (Duan et al. 2024, "Negating Negatives"; the paper's equation, no official code) ----
//   pos = (beta / K) sum_k (ps[b, k] - rs[b, k]),   neg = alpha (pl[b] - rl[b]),
//   loss = -logsig(pos - neg)
// ps, rs [B, K] (K self-generated samples under pi and pi_ref-), pl, rl [B] (the human negative
// under pi and pi_ref+); losses, pos, neg [B]; grads of ps, rs [B, K] and pl, rl [B].
struct D2OGrads {
  TensorView grad_out, grad_policy_samples, grad_ref_samples, grad_policy_rejected,
      grad_ref_rejected;
};
void d2o_loss(const TensorView& policy_sample_logps, const TensorView& ref_sample_logps,
              const TensorView& policy_rejected_logps, const TensorView& ref_rejected_logps,
              double beta, double alpha, const TensorView& losses,
              const TensorView& sample_rewards = {}, const TensorView& rejected_rewards = {},
              const D2OGrads& grads = {});

// ---- HyPO's online KL term (Song et al. 2024) --------------------------------------------------
// k >= 2 samples y_j ~ pi per prompt, r_j = ps[b, j] - rs[b, j]: kl[b] = (1/k) sum_j r_j (the
// Monte-Carlo estimate of KL(pi || pi_ref)); its REINFORCE gradient with the leave-one-out
// baseline, d/d ps[b, j] = grad_out[b] (r_j - (1/(k-1)) sum_{i != j} r_i) / k (the reference
// gets none: the samples are not reparameterized).
void hypo_online_kl(const TensorView& policy_sample_logps, const TensorView& ref_sample_logps,
                    const TensorView& kl, const TensorView& grad_out = {},
                    const TensorView& grad_policy_samples = {});

// ---- SuperHF (Mukobi et al. 2023) ---------------------------------------------------------------
// For each prompt keep the top_k of N completions by reward (descending, lower index first on
// ties; NaN rewards rejected) and
//   loss = mean_kept(-logps / lengths) + kl_coef * mean_kept(kl)
// logps, rewards, kl [B, N]; lengths [B, N] optional (> 0, default 1); loss [1]; indices
// [B, top_k] int64; grads of logps and kl [B, N] (zero outside the kept ones), scaled by
// grad_out[0] when given.
void superhf_loss(const TensorView& logps, const TensorView& rewards, const TensorView& kl,
                  const TensorView& lengths, double kl_coef, int64_t top_k, const TensorView& loss,
                  const TensorView& indices, const TensorView& grad_out = {},
                  const TensorView& grad_logps = {}, const TensorView& grad_kl = {});

}  // namespace divkit
