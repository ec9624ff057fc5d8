// divkit: sequence-level preference-optimization losses (the DPO family as TRL implements it,
// CPO / SimPO / AlphaPO, ORPO's odds ratio, KTO), batched, with their gradients with respect to
// the per-sequence log-probabilities.
//
// Notation, per pair i of a batch of B:
//   pc = log pi(y_w), pr = log pi(y_l)            (policy_chosen_logps, policy_rejected_logps)
//   rc = log pi_ref(y_w), rr = log pi_ref(y_l)    (ref_chosen_logps, ref_rejected_logps)
//   l_w = pc - rc, l_l = pr - rr                  (log-ratios; sums over completion tokens)
//   s(l): the f-DPO score (Wang et al. 2023, "Beyond Reverse KL"; TRL's f_divergence_type):
//     reverse_kl        s = l                    (standard DPO)
//     forward_kl        s = 1 - exp(-l)          (exponent clamped at 80)
//     js_divergence     s = log 2 + logsig(l)
//     alpha_divergence  s = (exp((a - 1) l) - 1) / (a - 1), a = f_alpha_divergence_coef, the
//                       exponent clamped at 80; |a - 1| < 1e-6 falls back to reverse_kl
//   D = s(l_w) - s(l_l), z = beta D, eps = label_smoothing, sigma = sigmoid, logsig = log sigma.
//
// Per-pair losses (TRL 1.16, trainer/dpo_trainer.py, DPOTrainer._compute_loss):
//   sigmoid       -(1 - eps) logsig(z) - eps logsig(-z)           (Rafailov et al. 2023; cDPO
//                 label smoothing, Mitchell 2023; TRL 1.16 ignores eps here, eps = 0 is TRL)
//   hinge         relu(1 - z)                                     (SLiC, Zhao et al. 2023)
//   ipo           (s(l_w)/n_w - s(l_l)/n_l - 1/(2 beta))^2 with n the completion lengths (1
//                 when none are given: the inputs are then taken as already averaged)
//                 (Azar et al. 2023)
//   exo_pair      sigma(z)(logsig(z) - log(1 - eps)) + sigma(-z)(logsig(-z) - log eps),
//                 0 < eps < 1 (Ji et al. 2024, EXO)
//   nca_pair      -logsig(beta l_w) - logsig(-beta l_w)/2 - logsig(-beta l_l)/2  (Chen 2024)
//   robust        (-(1 - eps) logsig(z) + eps logsig(-z)) / (1 - 2 eps), eps < 0.5 (rDPO,
//                 Chowdhury et al. 2024)
//   bco_pair      -logsig(beta l_w) - logsig(-beta l_l)             (Jung et al. 2024)
//   sppo_hard     (l_w - 1/(2 beta))^2 + (l_l + 1/(2 beta))^2       (Wu et al. 2024)
//   aot           x = pc - pr and y = rc - rr each sorted over the batch (ascending);
//                 loss_i = sigmoid-with-smoothing at beta (x_(i) - y_(i))  (Melnyk et al. 2024)
//   aot_unpaired  l_w and l_l each sorted over the batch; same loss on beta (l_w(i) - l_l(i))
//   apo_zero      1 - sigma(beta l_w) + sigma(beta l_l)             (D'Oosterlinck et al. 2024)
//   apo_down      sigma(beta l_w) + 1 - sigma(beta (l_w - l_l))
//   discopop      m = sigma(z / tau); -logsig(z)(1 - m) + exp(-z) m, tau = discopop_tau
//                 (Chan Lu et al. 2024); computed as exp(-z + logsig(z / tau)), finite for
//                 any z where TRL's fp32 form gives NaN
//   sigmoid_norm  the sigmoid loss on beta (s(l_w)/n_w - s(l_l)/n_l), lengths required (LN-DPO)
//   sft           -sum_j pc_j / sum_j n_w,j: the chosen completions' token-mean NLL over the
//                 batch, the same value for every pair (TRL's sft; combined with sigmoid it is
//                 MPO/RPO's DPO + NLL). Without chosen_lengths n_w = 1 (averaged inputs).
// f-DPO scores apply to sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust and discopop (as in
// TRL); sft ignores it; the other types use the plain log-ratios and reject
// f_divergence_type != reverse_kl.
// Several types combine: loss_i = sum_k weight_k loss_k,i. WPO (Zhou et al. 2024) multiplies
// each pair's loss by sample_weights[i] (w_w * w_l, no gradient). Rewards (as TRL logs them):
// chosen beta l_w, rejected beta l_l, never f-transformed or length-normalized.
//
// Numerics: inputs fp32 or fp64; arithmetic in fp64 with stable forms (log-sigmoid,
// softplus, log1mexp, clamped exponents); outputs fp32 or fp64. Results do not depend on the
// thread count (the loops are serial: B is small).
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

#include "divkit/tensor.h"

namespace divkit {

enum class PreferenceLossType : int32_t {
  sigmoid,
  hinge,
  ipo,
  exo_pair,
  nca_pair,
  robust,
  bco_pair,
  sppo_hard,
  aot,
  aot_unpaired,
  apo_zero,
  apo_down,
  discopop,
  sigmoid_norm,
  sft,
};
inline constexpr int kNumPreferenceLossTypes = 15;
const char* preference_loss_type_name(PreferenceLossType type);
// Throws Error naming `loss_type` and listing the valid names.
PreferenceLossType parse_preference_loss_type(std::string_view name);

enum class FDivergenceType : int32_t { reverse_kl, forward_kl, js_divergence, alpha_divergence };
const char* f_divergence_type_name(FDivergenceType type);
FDivergenceType parse_f_divergence_type(std::string_view name);

struct PreferenceTerm {
  PreferenceLossType type = PreferenceLossType::sigmoid;
  double weight = 1.0;
};

struct PreferenceSpec {
  std::vector<PreferenceTerm> terms{PreferenceTerm{}};
  double beta = 0.1;             // > 0
  double label_smoothing = 0.0;  // in [0, 0.5]; robust: < 0.5; exo_pair: in (0, 1)
  FDivergenceType f_divergence_type = FDivergenceType::reverse_kl;
  double f_alpha_divergence_coef = 0.5;
  double discopop_tau = 0.05;  // > 0
};

// Throws Error naming the parameter that is out of range.
void validate_preference_spec(const PreferenceSpec& spec);

// All [B] vectors of any stride. Log-probs fp32 or fp64 (finite); lengths int32, int64, fp32
// or fp64, >= 1 (token counts); sample_weights fp32 or fp64, finite.
struct PreferenceInputs {
  TensorView policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps;
  TensorView chosen_lengths, rejected_lengths;  // optional (required by sigmoid_norm)
  TensorView sample_weights;                    // optional (WPO)
};

// Outputs [B] fp32 or fp64, optional except `losses`. Gradients are those of
// sum_i grad_losses[i] * losses[i] (grad_losses optional, ones when not given).
struct PreferenceOutputs {
  TensorView losses, chosen_rewards, rejected_rewards;
  TensorView grad_losses;  // an input: the upstream gradient
  TensorView grad_policy_chosen, grad_policy_rejected, grad_ref_chosen, grad_ref_rejected;
};

// The DPO family. Throws Error (naming the argument) on batch sizes that disagree, B = 0,
// non-finite log-probs, lengths < 1, missing lengths for sigmoid_norm, bad parameters.
void preference_loss(const PreferenceInputs& in, const PreferenceSpec& spec,
                     const PreferenceOutputs& out);

// CPO / SimPO / AlphaPO (TRL experimental/cpo, CPOTrainer.cpo_loss), reference-free:
//   r = logp, or r = (1 - exp(-alpha logp)) / alpha when alpha != 0 (AlphaPO, Gupta et al.
//   2025, exponent clamped at 80); x = r_w - r_l;
//   sigmoid  -(1 - eps) logsig(beta x) - eps logsig(-beta x)       (CPO, Xu et al. 2024)
//   hinge    relu(1 - beta x);   ipo  (x - 1/(2 beta))^2
//   simpo    the sigmoid form on beta (x - gamma / beta)            (SimPO, Meng et al. 2024;
//            the caller passes average log-probs, as TRL does for simpo and ipo)
// Rewards beta r_w, beta r_l. CPO's NLL term is the caller's (TRL adds cpo_alpha * NLL).
enum class CpoLossType : int32_t { sigmoid, hinge, ipo, simpo };
CpoLossType parse_cpo_loss_type(std::string_view name);
struct CpoSpec {
  CpoLossType loss_type = CpoLossType::sigmoid;
  double beta = 0.1, label_smoothing = 0.0, simpo_gamma = 0.5, alpha = 0.0;
};
// Uses in.policy_chosen_logps / policy_rejected_logps and out.losses, rewards, grad_losses,
// grad_policy_chosen / grad_policy_rejected.
void cpo_loss(const PreferenceInputs& in, const CpoSpec& spec, const PreferenceOutputs& out);

// ORPO's odds-ratio term (Hong et al. 2024; TRL experimental/orpo, odds_ratio_loss), from
// average log-probs p_w, p_l < 0:
//   log_odds = (p_w - p_l) - (log1mexp(p_w) - log1mexp(p_l)),  log1mexp(x) = log(1 - e^x)
//   losses = beta logsig(log_odds)  (TRL's sign: the trainer's loss is NLL - mean(losses))
// log_odds (optional output [B]) is written too. Rewards beta p_w, beta p_l.
void odds_ratio_loss(const PreferenceInputs& in, double beta, const PreferenceOutputs& out,
                     const TensorView& log_odds = TensorView{});

// KTO (Ethayarajh et al. 2024; TRL trainer/kto_trainer.py). Unpaired: chosen [Bc] and rejected
// [Br] (either may be empty) use the policy_/ref_ chosen / rejected fields; the KL reference
// point z0 = max(0, mean_j(policy_KL_logps_j - ref_KL_logps_j)) over mismatched completions
// [Bk] (no gradient; z0 = 0 when Bk = 0 or loss_type apo_zero_unpaired).
//   kto                desirable w_d (1 - sigma(beta (l_w - z0))), undesirable
//                      w_u (1 - sigma(beta (z0 - l_l)))
//   apo_zero_unpaired  w_d (1 - sigma(beta l_w)),  w_u sigma(beta l_l)
// losses: [Bc + Br] (chosen first, as TRL concatenates them); grad_losses likewise.
// Rewards beta l_w [Bc], beta l_l [Br]; kl (optional 1-element output): z0.
struct KtoSpec {
  bool apo_zero_unpaired = false;
  double beta = 0.1, desirable_weight = 1.0, undesirable_weight = 1.0;
};
struct KtoKL {
  TensorView policy_KL_logps, ref_KL_logps;  // optional [Bk]
  TensorView kl;                             // optional output, 1 element
};
void kto_loss(const PreferenceInputs& in, const KtoKL& kl, const KtoSpec& spec,
              const PreferenceOutputs& out);

}  // namespace divkit
