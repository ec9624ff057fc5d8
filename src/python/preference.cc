// divkit._C bindings of the preference family (include/divkit/preference.h).
#include <string>
#include <vector>

#include "bindings.h"
#include "divkit/preference.h"

namespace divkit_py {
namespace {

using OptIn = std::optional<InArray>;
using OptOut = std::optional<OutArray>;

divkit::PreferenceOutputs outputs(const char* fn, const OutArray& losses,
                                  const OptOut& chosen_rewards, const OptOut& rejected_rewards,
                                  const OptIn& grad_losses, const OptOut& g_pc, const OptOut& g_pr,
                                  const OptOut& g_rc, const OptOut& g_rr) {
  divkit::PreferenceOutputs out;
  out.losses = to_view(fn, "losses", losses);
  out.chosen_rewards = optional_view(fn, "chosen_rewards", chosen_rewards);
  out.rejected_rewards = optional_view(fn, "rejected_rewards", rejected_rewards);
  out.grad_losses = optional_view(fn, "grad_losses", grad_losses);
  out.grad_policy_chosen = optional_view(fn, "grad_policy_chosen", g_pc);
  out.grad_policy_rejected = optional_view(fn, "grad_policy_rejected", g_pr);
  out.grad_ref_chosen = optional_view(fn, "grad_ref_chosen", g_rc);
  out.grad_ref_rejected = optional_view(fn, "grad_ref_rejected", g_rr);
  return out;
}

// The scalar arguments of preference_loss, as one object (divkit._C.PreferenceArgs).
struct PreferenceArgs {
  std::vector<std::string> loss_types;
  std::vector<double> loss_weights;
  double beta = 0.1;
  double label_smoothing = 0.0;
  std::string f_divergence_type = "reverse_kl";
  double f_alpha_divergence_coef = 0.5;
  double discopop_tau = 0.05;
};

// The scalar arguments of cpo_loss (divkit._C.CpoArgs).
struct CpoArgs {
  std::string loss_type = "sigmoid";
  double beta = 0.1;
  double label_smoothing = 0.0;
  double simpo_gamma = 0.5;
  double alpha = 0.0;
};

void preference_loss(const InArray& pc, const InArray& pr, const InArray& rc, const InArray& rr,
                     const PreferenceArgs& args, const OptIn& chosen_lengths,
                     const OptIn& rejected_lengths, const OptIn& sample_weights,
                     const OutArray& losses, const OptOut& chosen_rewards,
                     const OptOut& rejected_rewards, const OptIn& grad_losses, const OptOut& g_pc,
                     const OptOut& g_pr, const OptOut& g_rc, const OptOut& g_rr) {
  constexpr const char* fn = "preference_loss";
  divkit::PreferenceSpec spec;
  const auto& loss_types = args.loss_types;
  const auto& loss_weights = args.loss_weights;
  if (loss_weights.size() != loss_types.size())
    fail(std::string(fn) + ": loss_weights has " + std::to_string(loss_weights.size()) +
         " entries for " + std::to_string(loss_types.size()) + " loss types");
  spec.terms.clear();
  for (size_t k = 0; k < loss_types.size(); ++k)
    spec.terms.push_back({divkit::parse_preference_loss_type(loss_types[k]), loss_weights[k]});
  spec.beta = args.beta;
  spec.label_smoothing = args.label_smoothing;
  spec.f_divergence_type = divkit::parse_f_divergence_type(args.f_divergence_type);
  spec.f_alpha_divergence_coef = args.f_alpha_divergence_coef;
  spec.discopop_tau = args.discopop_tau;
  divkit::PreferenceInputs in;
  in.policy_chosen_logps = to_view(fn, "policy_chosen_logps", pc);
  in.policy_rejected_logps = to_view(fn, "policy_rejected_logps", pr);
  in.ref_chosen_logps = to_view(fn, "ref_chosen_logps", rc);
  in.ref_rejected_logps = to_view(fn, "ref_rejected_logps", rr);
  in.chosen_lengths = optional_view(fn, "chosen_lengths", chosen_lengths);
  in.rejected_lengths = optional_view(fn, "rejected_lengths", rejected_lengths);
  in.sample_weights = optional_view(fn, "policy_weights", sample_weights);
  const auto out =
      outputs(fn, losses, chosen_rewards, rejected_rewards, grad_losses, g_pc, g_pr, g_rc, g_rr);
  nb::gil_scoped_release release;
  divkit::preference_loss(in, spec, out);
}

void cpo_loss(const InArray& pc, const InArray& pr, const CpoArgs& args, const OutArray& losses,
              const OptOut& chosen_rewards, const OptOut& rejected_rewards,
              const OptIn& grad_losses, const OptOut& g_pc, const OptOut& g_pr) {
  constexpr const char* fn = "cpo_loss";
  divkit::CpoSpec spec;
  spec.loss_type = divkit::parse_cpo_loss_type(args.loss_type);
  spec.beta = args.beta;
  spec.label_smoothing = args.label_smoothing;
  spec.simpo_gamma = args.simpo_gamma;
  spec.alpha = args.alpha;
  divkit::PreferenceInputs in;
  in.policy_chosen_logps = to_view(fn, "policy_chosen_logps", pc);
  in.policy_rejected_logps = to_view(fn, "policy_rejected_logps", pr);
  const auto out =
      outputs(fn, losses, chosen_rewards, rejected_rewards, grad_losses, g_pc, g_pr, {}, {});
  nb::gil_scoped_release release;
  divkit::cpo_loss(in, spec, out);
}

void odds_ratio_loss(const InArray& pc, const InArray& pr, double beta, const OutArray& losses,
                     const OptOut& chosen_rewards, const OptOut& rejected_rewards,
                     const OptOut& log_odds, const OptIn& grad_losses, const OptOut& g_pc,
                     const OptOut& g_pr) {
  constexpr const char* fn = "odds_ratio_loss";
  divkit::PreferenceInputs in;
  in.policy_chosen_logps = to_view(fn, "policy_chosen_logps", pc);
  in.policy_rejected_logps = to_view(fn, "policy_rejected_logps", pr);
  const auto out =
      outputs(fn, losses, chosen_rewards, rejected_rewards, grad_losses, g_pc, g_pr, {}, {});
  const auto lo = optional_view(fn, "log_odds", log_odds);
  nb::gil_scoped_release release;
  divkit::odds_ratio_loss(in, beta, out, lo);
}

void kto_loss(const InArray& pc, const InArray& pr, const OptIn& pkl, const InArray& rc,
              const InArray& rr, const OptIn& rkl, const std::string& loss_type, double beta,
              double desirable_weight, double undesirable_weight, const OutArray& losses,
              const OptOut& chosen_rewards, const OptOut& rejected_rewards, const OptOut& kl,
              const OptIn& grad_losses, const OptOut& g_pc, const OptOut& g_pr) {
  constexpr const char* fn = "kto_loss";
  divkit::KtoSpec spec;
  if (loss_type == "apo_zero_unpaired") spec.apo_zero_unpaired = true;
  else if (loss_type != "kto")
    fail(std::string(fn) + ": unknown loss_type '" + loss_type +
         "' (valid: kto, apo_zero_unpaired)");
  spec.beta = beta;
  spec.desirable_weight = desirable_weight;
  spec.undesirable_weight = undesirable_weight;
  divkit::PreferenceInputs in;
  in.policy_chosen_logps = to_view(fn, "policy_chosen_logps", pc);
  in.policy_rejected_logps = to_view(fn, "policy_rejected_logps", pr);
  in.ref_chosen_logps = to_view(fn, "reference_chosen_logps", rc);
  in.ref_rejected_logps = to_view(fn, "reference_rejected_logps", rr);
  divkit::KtoKL k;
  k.policy_KL_logps = optional_view(fn, "policy_KL_logps", pkl);
  k.ref_KL_logps = optional_view(fn, "reference_KL_logps", rkl);
  k.kl = optional_view(fn, "kl", kl);
  const auto out =
      outputs(fn, losses, chosen_rewards, rejected_rewards, grad_losses, g_pc, g_pr, {}, {});
  nb::gil_scoped_release release;
  divkit::kto_loss(in, k, spec, out);
}

std::vector<std::string> preference_loss_types() {
  std::vector<std::string> names;
  for (int i = 0; i < divkit::kNumPreferenceLossTypes; ++i)
    names.emplace_back(
        divkit::preference_loss_type_name(static_cast<divkit::PreferenceLossType>(i)));
  return names;
}

}  // namespace

void register_preference(nb::module_& m) {
  nb::class_<PreferenceArgs>(m, "PreferenceArgs", "The scalar arguments of preference_loss().")
      .def(
          "__init__",
          [](PreferenceArgs* self, std::vector<std::string> loss_types,
             std::vector<double> loss_weights, double beta, double label_smoothing,
             std::string f_divergence_type, double f_alpha_divergence_coef, double discopop_tau) {
            new (self) PreferenceArgs{
                std::move(loss_types),        std::move(loss_weights), beta,        label_smoothing,
                std::move(f_divergence_type), f_alpha_divergence_coef, discopop_tau};
          },
          nb::kw_only(), nb::arg("loss_types"), nb::arg("loss_weights"), nb::arg("beta"),
          nb::arg("label_smoothing"), nb::arg("f_divergence_type"),
          nb::arg("f_alpha_divergence_coef"), nb::arg("discopop_tau"));
  m.def("preference_loss", &preference_loss, nb::arg("policy_chosen_logps"),
        nb::arg("policy_rejected_logps"), nb::arg("ref_chosen_logps"),
        nb::arg("ref_rejected_logps"), nb::arg("args"), nb::arg("chosen_lengths").none(),
        nb::arg("rejected_lengths").none(), nb::arg("policy_weights").none(), nb::arg("losses"),
        nb::arg("chosen_rewards").none(), nb::arg("rejected_rewards").none(),
        nb::arg("grad_losses").none(), nb::arg("grad_policy_chosen").none(),
        nb::arg("grad_policy_rejected").none(), nb::arg("grad_ref_chosen").none(),
        nb::arg("grad_ref_rejected").none(),
        "The DPO family (include/divkit/preference.h): per-pair losses, rewards and, where given, "
        "the gradients of sum(grad_losses * losses).");
  nb::class_<CpoArgs>(m, "CpoArgs", "The scalar arguments of cpo_loss().")
      .def(
          "__init__",
          [](CpoArgs* self, std::string loss_type, double beta, double label_smoothing,
             double simpo_gamma, double alpha) {
            new (self) CpoArgs{std::move(loss_type), beta, label_smoothing, simpo_gamma, alpha};
          },
          nb::kw_only(), nb::arg("loss_type"), nb::arg("beta"), nb::arg("label_smoothing"),
          nb::arg("simpo_gamma"), nb::arg("alpha"));
  m.def("cpo_loss", &cpo_loss, nb::arg("policy_chosen_logps"), nb::arg("policy_rejected_logps"),
        nb::arg("args"), nb::arg("losses"), nb::arg("chosen_rewards").none(),
        nb::arg("rejected_rewards").none(), nb::arg("grad_losses").none(),
        nb::arg("grad_policy_chosen").none(), nb::arg("grad_policy_rejected").none());
  m.def("odds_ratio_loss", &odds_ratio_loss, nb::arg("policy_chosen_logps"),
        nb::arg("policy_rejected_logps"), nb::arg("beta"), nb::arg("losses"),
        nb::arg("chosen_rewards").none(), nb::arg("rejected_rewards").none(),
        nb::arg("log_odds").none(), nb::arg("grad_losses").none(),
        nb::arg("grad_policy_chosen").none(), nb::arg("grad_policy_rejected").none());
  m.def("kto_loss", &kto_loss, nb::arg("policy_chosen_logps"), nb::arg("policy_rejected_logps"),
        nb::arg("policy_KL_logps").none(), nb::arg("reference_chosen_logps"),
        nb::arg("reference_rejected_logps"), nb::arg("reference_KL_logps").none(),
        nb::arg("loss_type"), nb::arg("beta"), nb::arg("desirable_weight"),
        nb::arg("undesirable_weight"), nb::arg("losses"), nb::arg("chosen_rewards").none(),
        nb::arg("rejected_rewards").none(), nb::arg("kl").none(), nb::arg("grad_losses").none(),
        nb::arg("grad_policy_chosen").none(), nb::arg("grad_policy_rejected").none());
  m.def("preference_loss_types", &preference_loss_types,
        "Names of the DPO loss types, in the core's order.");
}

}  // namespace divkit_py
