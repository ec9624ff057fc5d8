// The preference family: see include/divkit/preference.h for the formulas.
//
// Each loss is written as a function of a few scalars with its partial derivatives, in fp64
// with stable forms; the batch loops are serial (B is the number of pairs, small), so results
// do not depend on the thread count.
#include "divkit/preference.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>

#include "core/check.h"
#include "core/element.h"
#include "core/scalar_math.h"

namespace divkit {
namespace {

using elem::get;
using elem::put;
using math::kMaxExp;
using math::log1mexp;
using math::log_sigmoid;
using math::sigmoid;

// check::view on every view of a call, before any is read (`ref` names the reference inputs:
// "ref" as in TRL's DPOTrainer, "reference" as in its KTOTrainer).
void check_views(const char* fn, const PreferenceInputs& in, const PreferenceOutputs& out,
                 bool reference = false) {
  check::views(
      fn, {{"policy_chosen_logps", in.policy_chosen_logps},
           {"policy_rejected_logps", in.policy_rejected_logps},
           {reference ? "reference_chosen_logps" : "ref_chosen_logps", in.ref_chosen_logps},
           {reference ? "reference_rejected_logps" : "ref_rejected_logps", in.ref_rejected_logps},
           {"chosen_lengths", in.chosen_lengths},
           {"rejected_lengths", in.rejected_lengths},
           {"policy_weights", in.sample_weights},
           {"losses", out.losses},
           {"chosen_rewards", out.chosen_rewards},
           {"rejected_rewards", out.rejected_rewards},
           {"grad_losses", out.grad_losses},
           {"grad_policy_chosen", out.grad_policy_chosen},
           {"grad_policy_rejected", out.grad_policy_rejected},
           {"grad_ref_chosen", out.grad_ref_chosen},
           {"grad_ref_rejected", out.grad_ref_rejected}});
}

int64_t batch_of(const char* fn, const char* name, const TensorView& t) {
  if (!t.defined()) check::fail(fn, std::string(name) + " is required");
  if (t.ndim != 1)
    check::fail(fn, std::string(name) + " must be 1-D [B], got shape " + check::shape_string(t));
  return t.shape[0];
}
void logps_vector(const char* fn, const char* name, const TensorView& t, int64_t b) {
  check::vector_of(fn, name, t, b, {DType::f32, DType::f64});
  for (int64_t i = 0; i < b; ++i)
    if (!std::isfinite(get(t, i)))
      check::fail(fn, std::string(name) + " must be finite, got " + std::to_string(get(t, i)) +
                          " at index " + std::to_string(i));
}
void optional_out(const char* fn, const char* name, const TensorView& t, int64_t b) {
  if (t.defined()) check::vector_of(fn, name, t, b, {DType::f32, DType::f64});
}
void lengths_vector(const char* fn, const char* name, const TensorView& t, int64_t b) {
  if (!t.defined()) return;
  check::vector_of(fn, name, t, b, {DType::i32, DType::i64, DType::f32, DType::f64});
  for (int64_t i = 0; i < b; ++i) {
    const double n = get(t, i);
    if (!(n > 0) || !std::isfinite(n))
      check::fail(fn, std::string(name) + " must be > 0, got " + std::to_string(n) + " at index " +
                          std::to_string(i));
    // Token counts: a tiny length (a subnormal one passes "> 0") overflows s / n.
    if (n < 1)
      check::fail(fn, std::string(name) + " must be >= 1 (token counts), got " + check::fmt(n) +
                          " at index " + std::to_string(i));
  }
}
void check_beta(const char* fn, double beta) {
  if (!(beta > 0) || !std::isfinite(beta))
    check::fail(fn, "beta must be a finite number > 0, got " + std::to_string(beta));
}

// The arguments of the reference-free pair losses (CPO/SimPO, ORPO): the policy's log-probs of B
// >= 1 pairs, the outputs (and ORPO's log_odds); returns B.
int64_t check_policy_pairs(const char* fn, const PreferenceInputs& in, const PreferenceOutputs& out,
                           const TensorView* log_odds = nullptr) {
  const int64_t b = batch_of(fn, "policy_chosen_logps", in.policy_chosen_logps);
  if (b == 0) check::fail(fn, "policy_chosen_logps is empty: the batch needs at least one pair");
  logps_vector(fn, "policy_chosen_logps", in.policy_chosen_logps, b);
  logps_vector(fn, "policy_rejected_logps", in.policy_rejected_logps, b);
  check::vector_of(fn, "losses", out.losses, b, {DType::f32, DType::f64});
  optional_out(fn, "chosen_rewards", out.chosen_rewards, b);
  optional_out(fn, "rejected_rewards", out.rejected_rewards, b);
  if (log_odds != nullptr) optional_out(fn, "log_odds", *log_odds, b);
  if (out.grad_losses.defined()) logps_vector(fn, "grad_losses", out.grad_losses, b);
  optional_out(fn, "grad_policy_chosen", out.grad_policy_chosen, b);
  optional_out(fn, "grad_policy_rejected", out.grad_policy_rejected, b);
  return b;
}

// ---- f-DPO scores: s(l) and s'(l) ------------------------------------------------------
struct Score {
  double s, ds;
};
Score f_score(FDivergenceType f, double a, double l) {
  switch (f) {
    case FDivergenceType::reverse_kl: return {l, 1.0};
    case FDivergenceType::forward_kl: {
      const double e = -l;  // s = 1 - exp(-l), exponent clamped (zero derivative beyond)
      if (e > kMaxExp) return {1.0 - std::exp(kMaxExp), 0.0};
      const double x = std::exp(e);
      return {1.0 - x, x};
    }
    case FDivergenceType::js_divergence: return {M_LN2 + log_sigmoid(l), sigmoid(-l)};
    case FDivergenceType::alpha_divergence: {
      if (std::abs(a - 1.0) < 1e-6) return {l, 1.0};
      const double t = (a - 1.0) * l;
      if (t > kMaxExp) return {std::expm1(kMaxExp) / (a - 1.0), 0.0};
      return {std::expm1(t) / (a - 1.0), std::exp(t)};
    }
  }
  return {l, 1.0};
}

// Types that accept f_divergence_type != reverse_kl (TRL's set): those with an f-DPO score,
// and sft, which has no score and ignores it.
bool accepts_f_divergence(PreferenceLossType t) {
  using T = PreferenceLossType;
  return t == T::sigmoid || t == T::sigmoid_norm || t == T::hinge || t == T::ipo ||
         t == T::exo_pair || t == T::robust || t == T::discopop || t == T::sft;
}

// Label-smoothed sigmoid loss of z and its derivative. 1 - sigma(z) is written sigma(-z)
// throughout: relatively accurate where it is small (a saturated pair), where 1 - sigma(z)
// would keep only the absolute error of sigma(z) (0 beyond z = 37).
struct Val {
  double v, d;
};
Val smoothed_sigmoid(double z, double eps) {
  return {-(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z),
          eps * sigmoid(z) - (1 - eps) * sigmoid(-z)};
}
// sigma'(x) = sigma(x) sigma(-x).
double sigmoid_prime(double x) { return sigmoid(x) * sigmoid(-x); }

constexpr const char* kLossTypeNames[] = {"sigmoid",  "hinge",        "ipo",      "exo_pair",
                                          "nca_pair", "robust",       "bco_pair", "sppo_hard",
                                          "aot",      "aot_unpaired", "apo_zero", "apo_down",
                                          "discopop", "sigmoid_norm", "sft"};
constexpr const char* kFNames[] = {"reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"};

}  // namespace

const char* preference_loss_type_name(PreferenceLossType type) {
  return kLossTypeNames[static_cast<int>(type)];
}
PreferenceLossType parse_preference_loss_type(std::string_view name) {
  std::string all;
  for (int i = 0; i < kNumPreferenceLossTypes; ++i) {
    if (name == kLossTypeNames[i]) return static_cast<PreferenceLossType>(i);
    all += (i ? ", " : "") + std::string(kLossTypeNames[i]);
  }
  check::fail("preference_loss",
              "unknown loss_type '" + std::string(name) + "' (valid: " + all + ")");
}
const char* f_divergence_type_name(FDivergenceType type) { return kFNames[static_cast<int>(type)]; }
FDivergenceType parse_f_divergence_type(std::string_view name) {
  for (int i = 0; i < 4; ++i)
    if (name == kFNames[i]) return static_cast<FDivergenceType>(i);
  check::fail("preference_loss",
              "unknown f_divergence_type '" + std::string(name) +
                  "' (valid: reverse_kl, forward_kl, js_divergence, alpha_divergence)");
}

void validate_preference_spec(const PreferenceSpec& spec) {
  constexpr const char* fn = "preference_loss";
  check_beta(fn, spec.beta);
  if (spec.terms.empty()) check::fail(fn, "loss_type must name at least one loss type");
  const double eps = spec.label_smoothing;
  if (!(eps >= 0.0 && eps <= 0.5))
    check::fail(fn, "label_smoothing must be in [0, 0.5], got " + std::to_string(eps));
  for (const auto& term : spec.terms) {
    if (!std::isfinite(term.weight))
      check::fail(fn, "loss_weights must be finite, got " + std::to_string(term.weight));
    const std::string name = preference_loss_type_name(term.type);
    if (term.type == PreferenceLossType::robust && !(eps < 0.5))
      check::fail(fn,
                  "label_smoothing must be < 0.5 for loss_type robust, got " + std::to_string(eps));
    if (term.type == PreferenceLossType::exo_pair && !(eps > 0.0))
      check::fail(fn,
                  "label_smoothing must be > 0 for loss_type exo_pair (log eps; the EXO paper uses "
                  "1e-3), got " +
                      std::to_string(eps));
    if (spec.f_divergence_type != FDivergenceType::reverse_kl && !accepts_f_divergence(term.type))
      check::fail(
          fn, std::string("f_divergence_type ") + f_divergence_type_name(spec.f_divergence_type) +
                  " is not defined for loss_type " + name +
                  " (only sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, discopop, sft)");
  }
  if (!std::isfinite(spec.f_alpha_divergence_coef))
    check::fail(fn, "f_alpha_divergence_coef must be finite");
  if (!(spec.discopop_tau > 0) || !std::isfinite(spec.discopop_tau))
    check::fail(fn, "discopop_tau must be > 0, got " + std::to_string(spec.discopop_tau));
}

void preference_loss(const PreferenceInputs& in, const PreferenceSpec& spec,
                     const PreferenceOutputs& out) {
  constexpr const char* fn = "preference_loss";
  check_views(fn, in, out);
  validate_preference_spec(spec);
  const int64_t b = batch_of(fn, "policy_chosen_logps", in.policy_chosen_logps);
  if (b == 0) check::fail(fn, "policy_chosen_logps is empty: the batch needs at least one pair");
  logps_vector(fn, "policy_chosen_logps", in.policy_chosen_logps, b);
  logps_vector(fn, "policy_rejected_logps", in.policy_rejected_logps, b);
  logps_vector(fn, "ref_chosen_logps", in.ref_chosen_logps, b);
  logps_vector(fn, "ref_rejected_logps", in.ref_rejected_logps, b);
  lengths_vector(fn, "chosen_lengths", in.chosen_lengths, b);
  lengths_vector(fn, "rejected_lengths", in.rejected_lengths, b);
  if (in.sample_weights.defined()) logps_vector(fn, "policy_weights", in.sample_weights, b);
  check::vector_of(fn, "losses", out.losses, b, {DType::f32, DType::f64});
  optional_out(fn, "chosen_rewards", out.chosen_rewards, b);
  optional_out(fn, "rejected_rewards", out.rejected_rewards, b);
  if (out.grad_losses.defined()) logps_vector(fn, "grad_losses", out.grad_losses, b);
  optional_out(fn, "grad_policy_chosen", out.grad_policy_chosen, b);
  optional_out(fn, "grad_policy_rejected", out.grad_policy_rejected, b);
  optional_out(fn, "grad_ref_chosen", out.grad_ref_chosen, b);
  optional_out(fn, "grad_ref_rejected", out.grad_ref_rejected, b);
  for (const auto& t : spec.terms)
    if (t.type == PreferenceLossType::sigmoid_norm &&
        !(in.chosen_lengths.defined() && in.rejected_lengths.defined()))
      check::fail(fn, "loss_type sigmoid_norm needs chosen_lengths and rejected_lengths");

  const double beta = spec.beta, eps = spec.label_smoothing;
  std::vector<double> pc(b), pr(b), rc(b), rr(b), nw(b, 1.0), nl(b, 1.0), sw(b, 1.0), g(b, 1.0);
  for (int64_t i = 0; i < b; ++i) {
    pc[i] = get(in.policy_chosen_logps, i);
    pr[i] = get(in.policy_rejected_logps, i);
    rc[i] = get(in.ref_chosen_logps, i);
    rr[i] = get(in.ref_rejected_logps, i);
    if (in.chosen_lengths.defined()) nw[i] = get(in.chosen_lengths, i);
    if (in.rejected_lengths.defined()) nl[i] = get(in.rejected_lengths, i);
    if (in.sample_weights.defined()) sw[i] = get(in.sample_weights, i);
    if (out.grad_losses.defined()) g[i] = get(out.grad_losses, i);
  }
  // Accumulated per pair: the loss and dL/dl_w, dL/dl_l (l = log-ratio). aot's partials are
  // kept on the policy and reference log-ratio differences x = pc - pr, y = rc - rr.
  // sft's partials are on the policy's chosen log-probs alone (dpc).
  std::vector<double> loss(b, 0.0), dlw(b, 0.0), dll(b, 0.0), dx(b, 0.0), dy(b, 0.0), dpc(b, 0.0);

  for (const auto& term : spec.terms) {
    const double w = term.weight;
    using T = PreferenceLossType;
    if (term.type == T::sft) {
      // The chosen completions' token-mean NLL over the whole batch, -sum_j pc_j / sum_j n_w,j,
      // given to every pair (TRL expands its scalar the same way), so d/dpc_j is shared.
      double sum_logps = 0, sum_lengths = 0, sum_g = 0;
      for (int64_t i = 0; i < b; ++i) sum_logps += pc[i], sum_lengths += nw[i];
      const double v = -sum_logps / sum_lengths;
      for (int64_t i = 0; i < b; ++i) loss[i] += w * sw[i] * v, sum_g += w * sw[i] * g[i];
      for (int64_t i = 0; i < b; ++i) dpc[i] -= sum_g / sum_lengths;
      continue;
    }
    if (term.type == T::aot || term.type == T::aot_unpaired) {
      // Sorted over the batch: loss at rank k pairs the k-th smallest of u with that of v.
      std::vector<double> u(b), v(b);
      for (int64_t i = 0; i < b; ++i) {
        if (term.type == T::aot) u[i] = pc[i] - pr[i], v[i] = rc[i] - rr[i];
        else u[i] = pc[i] - rc[i], v[i] = pr[i] - rr[i];
      }
      std::vector<int64_t> pu(b), pv(b);
      std::iota(pu.begin(), pu.end(), 0);
      std::iota(pv.begin(), pv.end(), 0);
      std::stable_sort(pu.begin(), pu.end(), [&](int64_t a, int64_t c) { return u[a] < u[c]; });
      std::stable_sort(pv.begin(), pv.end(), [&](int64_t a, int64_t c) { return v[a] < v[c]; });
      for (int64_t k = 0; k < b; ++k) {
        const Val s = smoothed_sigmoid(beta * (u[pu[k]] - v[pv[k]]), eps);
        loss[k] += w * sw[k] * s.v;
        const double d = w * sw[k] * g[k] * s.d * beta;
        if (term.type == T::aot) dx[pu[k]] += d, dy[pv[k]] -= d;
        else dlw[pu[k]] += d, dll[pv[k]] -= d;
      }
      continue;
    }
    for (int64_t i = 0; i < b; ++i) {
      const double lw = pc[i] - rc[i], ll = pr[i] - rr[i];
      const Score fw = f_score(spec.f_divergence_type, spec.f_alpha_divergence_coef, lw);
      const Score fl = f_score(spec.f_divergence_type, spec.f_alpha_divergence_coef, ll);
      const double z = beta * (fw.s - fl.s);
      double v = 0, gw = 0, gl = 0;                // loss and its partials in l_w, l_l
      auto via_z = [&](double value, double dz) {  // a loss of z = beta (s(l_w) - s(l_l))
        v = value;
        gw = dz * beta * fw.ds;
        gl = -dz * beta * fl.ds;
      };
      switch (term.type) {
        case T::sigmoid: {
          const Val s = smoothed_sigmoid(z, eps);
          via_z(s.v, s.d);
          break;
        }
        case T::hinge: via_z(std::max(0.0, 1.0 - z), z < 1.0 ? -1.0 : 0.0); break;
        case T::ipo:
        case T::sigmoid_norm: {
          const double dn = fw.s / nw[i] - fl.s / nl[i];
          double dd;
          if (term.type == T::ipo) {
            const double e = dn - 1.0 / (2.0 * beta);
            v = e * e;
            dd = 2.0 * e;
          } else {
            const Val s = smoothed_sigmoid(beta * dn, eps);
            v = s.v;
            dd = s.d * beta;
          }
          gw = dd * fw.ds / nw[i];
          gl = -dd * fl.ds / nl[i];
          break;
        }
        case T::exo_pair: {
          const double q = sigmoid(z), qm = sigmoid(-z);
          const double lpw = std::log1p(-eps), lpl = std::log(eps);
          // d/dz = q (1 - q) (log q - log(1 - q) - log(1 - eps) + log eps) = q (1 - q)(z - lpw +
          // lpl)
          via_z(q * (log_sigmoid(z) - lpw) + qm * (log_sigmoid(-z) - lpl),
                q * qm * (z - lpw + lpl));
          break;
        }
        case T::robust: {
          const double c = 1.0 / (1.0 - 2.0 * eps);
          via_z(c * (-(1 - eps) * log_sigmoid(z) + eps * log_sigmoid(-z)),
                c * (-(1 - eps) * sigmoid(-z) - eps * sigmoid(z)));
          break;
        }
        case T::discopop: {
          const double tau = spec.discopop_tau, m = sigmoid(z / tau), m1 = sigmoid(-z / tau);
          const double a = -log_sigmoid(z);
          // exp(-z) m and exp(-z) m' in log space: finite wherever the products are.
          const double em = std::exp(std::min(-z + log_sigmoid(z / tau), 700.0));
          const double edm =
              std::exp(std::min(-z + log_sigmoid(z / tau) + log_sigmoid(-z / tau), 700.0)) / tau;
          const double dm = m * m1 / tau;
          via_z(a * m1 + em, -sigmoid(-z) * m1 - a * dm - em + edm);
          break;
        }
        case T::nca_pair: {
          const double x = beta * lw, y = beta * ll;
          v = -log_sigmoid(x) - 0.5 * log_sigmoid(-x) - 0.5 * log_sigmoid(-y);
          gw = beta * (-sigmoid(-x) + 0.5 * sigmoid(x));
          gl = beta * 0.5 * sigmoid(y);
          break;
        }
        case T::bco_pair: {
          const double x = beta * lw, y = beta * ll;
          v = -log_sigmoid(x) - log_sigmoid(-y);
          gw = -beta * sigmoid(-x);
          gl = beta * sigmoid(y);
          break;
        }
        case T::sppo_hard: {
          const double a = lw - 0.5 / beta, c = ll + 0.5 / beta;
          v = a * a + c * c;
          gw = 2 * a;
          gl = 2 * c;
          break;
        }
        case T::apo_zero: {
          v = sigmoid(-beta * lw) + sigmoid(beta * ll);  // 1 - sigma(beta l_w) + sigma(beta l_l)
          gw = -beta * sigmoid_prime(beta * lw);
          gl = beta * sigmoid_prime(beta * ll);
          break;
        }
        case T::apo_down: {
          const double d = beta * (lw - ll);
          v = sigmoid(beta * lw) + sigmoid(-d);  // sigma(beta l_w) + 1 - sigma(d)
          gw = beta * sigmoid_prime(beta * lw) - beta * sigmoid_prime(d);
          gl = beta * sigmoid_prime(d);
          break;
        }
        default: break;
      }
      loss[i] += w * sw[i] * v;
      dlw[i] += w * sw[i] * g[i] * gw;
      dll[i] += w * sw[i] * g[i] * gl;
    }
  }
  for (int64_t i = 0; i < b; ++i) {
    put(out.losses, i, loss[i]);
    put(out.chosen_rewards, i, beta * (pc[i] - rc[i]));
    put(out.rejected_rewards, i, beta * (pr[i] - rr[i]));
    put(out.grad_policy_chosen, i, dlw[i] + dx[i] + dpc[i]);
    put(out.grad_policy_rejected, i, dll[i] - dx[i]);
    put(out.grad_ref_chosen, i, -dlw[i] + dy[i]);
    put(out.grad_ref_rejected, i, -dll[i] - dy[i]);
  }
}

CpoLossType parse_cpo_loss_type(std::string_view name) {
  if (name == "sigmoid") return CpoLossType::sigmoid;
  if (name == "hinge") return CpoLossType::hinge;
  if (name == "ipo") return CpoLossType::ipo;
  if (name == "simpo") return CpoLossType::simpo;
  check::fail("cpo_loss",
              "unknown loss_type '" + std::string(name) + "' (valid: sigmoid, hinge, ipo, simpo)");
}

void cpo_loss(const PreferenceInputs& in, const CpoSpec& spec, const PreferenceOutputs& out) {
  constexpr const char* fn = "cpo_loss";
  check_views(fn, in, out);
  check_beta(fn, spec.beta);
  const double eps = spec.label_smoothing;
  if (!(eps >= 0.0 && eps <= 0.5))
    check::fail(fn, "label_smoothing must be in [0, 0.5], got " + std::to_string(eps));
  if (!std::isfinite(spec.alpha)) check::fail(fn, "alpha must be finite");
  if (!std::isfinite(spec.simpo_gamma)) check::fail(fn, "simpo_gamma must be finite");
  const int64_t b = check_policy_pairs(fn, in, out);
  const double beta = spec.beta, a = spec.alpha;
  // AlphaPO reward r(p) = (1 - p^-alpha) / alpha = -expm1(-alpha logp) / alpha, r' = exp(-alpha
  // logp).
  auto reward = [&](double lp) -> Score {
    if (a == 0.0) return {lp, 1.0};
    const double e = -a * lp;
    if (e > kMaxExp) return {-std::expm1(kMaxExp) / a, 0.0};
    return {-std::expm1(e) / a, std::exp(e)};
  };
  for (int64_t i = 0; i < b; ++i) {
    const Score rw = reward(get(in.policy_chosen_logps, i)),
                rl = reward(get(in.policy_rejected_logps, i));
    const double g = out.grad_losses.defined() ? get(out.grad_losses, i) : 1.0;
    double x = rw.s - rl.s, v = 0, dx = 0;
    switch (spec.loss_type) {
      case CpoLossType::simpo: x -= spec.simpo_gamma / beta; [[fallthrough]];
      case CpoLossType::sigmoid: {
        const Val s = smoothed_sigmoid(beta * x, eps);
        v = s.v, dx = s.d * beta;
        break;
      }
      case CpoLossType::hinge:
        v = std::max(0.0, 1 - beta * x), dx = beta * x < 1 ? -beta : 0.0;
        break;
      case CpoLossType::ipo: {
        const double e = x - 1.0 / (2 * beta);
        v = e * e, dx = 2 * e;
        break;
      }
    }
    put(out.losses, i, v);
    put(out.chosen_rewards, i, beta * rw.s);
    put(out.rejected_rewards, i, beta * rl.s);
    put(out.grad_policy_chosen, i, g * dx * rw.ds);
    put(out.grad_policy_rejected, i, -g * dx * rl.ds);
  }
}

void odds_ratio_loss(const PreferenceInputs& in, double beta, const PreferenceOutputs& out,
                     const TensorView& log_odds) {
  constexpr const char* fn = "odds_ratio_loss";
  check_views(fn, in, out);
  check::view(fn, "log_odds", log_odds);
  check_beta(fn, beta);
  const int64_t b = check_policy_pairs(fn, in, out, &log_odds);
  for (int64_t i = 0; i < b; ++i) {
    const double pw = get(in.policy_chosen_logps, i), pl = get(in.policy_rejected_logps, i);
    if (!(pw < 0))
      check::fail(fn, "policy_chosen_logps must be < 0 (a probability below 1), got " +
                          std::to_string(pw) + " at index " + std::to_string(i));
    if (!(pl < 0))
      check::fail(fn, "policy_rejected_logps must be < 0 (a probability below 1), got " +
                          std::to_string(pl) + " at index " + std::to_string(i));
    const double lo = (pw - pl) - (log1mexp(pw) - log1mexp(pl));
    const double g = out.grad_losses.defined() ? get(out.grad_losses, i) : 1.0;
    const double d = g * beta * sigmoid(-lo);
    put(out.losses, i, beta * log_sigmoid(lo));
    put(out.chosen_rewards, i, beta * pw);
    put(out.rejected_rewards, i, beta * pl);
    put(log_odds, i, lo);
    // d log_odds / d p = 1 / (1 - e^p) = -1 / expm1(p)
    put(out.grad_policy_chosen, i, d * (-1.0 / std::expm1(pw)));
    put(out.grad_policy_rejected, i, -d * (-1.0 / std::expm1(pl)));
  }
}

void kto_loss(const PreferenceInputs& in, const KtoKL& kl, const KtoSpec& spec,
              const PreferenceOutputs& out) {
  constexpr const char* fn = "kto_loss";
  check_views(fn, in, out, /*reference=*/true);
  check::views(fn, {{"policy_KL_logps", kl.policy_KL_logps},
                    {"reference_KL_logps", kl.ref_KL_logps},
                    {"kl", kl.kl}});
  check_beta(fn, spec.beta);
  if (!(spec.desirable_weight >= 0) || !std::isfinite(spec.desirable_weight))
    check::fail(fn, "desirable_weight must be a finite number >= 0");
  if (!(spec.undesirable_weight >= 0) || !std::isfinite(spec.undesirable_weight))
    check::fail(fn, "undesirable_weight must be a finite number >= 0");
  const int64_t bc = batch_of(fn, "policy_chosen_logps", in.policy_chosen_logps);
  const int64_t br = batch_of(fn, "policy_rejected_logps", in.policy_rejected_logps);
  if (bc + br == 0) check::fail(fn, "policy_chosen_logps and policy_rejected_logps are both empty");
  logps_vector(fn, "policy_chosen_logps", in.policy_chosen_logps, bc);
  logps_vector(fn, "policy_rejected_logps", in.policy_rejected_logps, br);
  logps_vector(fn, "reference_chosen_logps", in.ref_chosen_logps, bc);
  logps_vector(fn, "reference_rejected_logps", in.ref_rejected_logps, br);
  double z0 = 0.0;
  if (kl.policy_KL_logps.defined() != kl.ref_KL_logps.defined())
    check::fail(fn, "policy_KL_logps and reference_KL_logps must be given together");
  if (kl.policy_KL_logps.defined() && !spec.apo_zero_unpaired) {
    const int64_t bk = batch_of(fn, "policy_KL_logps", kl.policy_KL_logps);
    logps_vector(fn, "policy_KL_logps", kl.policy_KL_logps, bk);
    logps_vector(fn, "reference_KL_logps", kl.ref_KL_logps, bk);
    double s = 0;
    for (int64_t j = 0; j < bk; ++j) s += get(kl.policy_KL_logps, j) - get(kl.ref_KL_logps, j);
    z0 = bk > 0 ? std::max(0.0, s / static_cast<double>(bk)) : 0.0;
  }
  if (kl.kl.defined()) check::vector_of(fn, "kl", kl.kl, 1, {DType::f32, DType::f64});
  check::vector_of(fn, "losses", out.losses, bc + br, {DType::f32, DType::f64});
  optional_out(fn, "chosen_rewards", out.chosen_rewards, bc);
  optional_out(fn, "rejected_rewards", out.rejected_rewards, br);
  if (out.grad_losses.defined()) logps_vector(fn, "grad_losses", out.grad_losses, bc + br);
  optional_out(fn, "grad_policy_chosen", out.grad_policy_chosen, bc);
  optional_out(fn, "grad_policy_rejected", out.grad_policy_rejected, br);
  optional_out(fn, "grad_ref_chosen", out.grad_ref_chosen, bc);
  optional_out(fn, "grad_ref_rejected", out.grad_ref_rejected, br);
  const double beta = spec.beta;
  put(kl.kl, 0, z0);
  for (int64_t i = 0; i < bc; ++i) {
    const double l = get(in.policy_chosen_logps, i) - get(in.ref_chosen_logps, i);
    const double g = out.grad_losses.defined() ? get(out.grad_losses, i) : 1.0;
    const double x = beta * (l - z0);  // z0 = 0 for apo_zero_unpaired: same form
    const double d = -g * spec.desirable_weight * beta * sigmoid_prime(x);
    put(out.losses, i, spec.desirable_weight * sigmoid(-x));  // 1 - sigma(x)
    put(out.chosen_rewards, i, beta * l);
    put(out.grad_policy_chosen, i, d);
    put(out.grad_ref_chosen, i, -d);
  }
  for (int64_t i = 0; i < br; ++i) {
    const double l = get(in.policy_rejected_logps, i) - get(in.ref_rejected_logps, i);
    const double g = out.grad_losses.defined() ? get(out.grad_losses, bc + i) : 1.0;
    // kto: 1 - sigma(beta (z0 - l)) = sigma(beta (l - z0)); apo_zero_unpaired: sigma(beta l).
    const double x = beta * (l - z0);
    const double d = g * spec.undesirable_weight * beta * sigmoid_prime(x);
    put(out.losses, bc + i, spec.undesirable_weight * sigmoid(x));
    put(out.rejected_rewards, i, beta * l);
    put(out.grad_policy_rejected, i, d);
    put(out.grad_ref_rejected, i, -d);
  }
}

}  // namespace divkit
