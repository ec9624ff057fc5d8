// divkit._C bindings of the RLHF utilities and sample-based preference losses
// (include/divkit/rlhf.h). The Python wrappers (python/divkit/rlhf.py and the
// divkit.preference package) pass
// contiguous CPU fp32/fp64 tensors and allocate the outputs.
#include <cstdint>
#include <string>

#include "bindings.h"
#include "divkit/rlhf.h"

namespace divkit_py {
namespace {

using OptIn = std::optional<InArray>;
using OptOut = std::optional<OutArray>;

void kl_estimator(const InArray& lp, const InArray& ref, const std::string& kind, bool clamp,
                  const OutArray& out, const OptIn& grad_out, const OptOut& g_lp,
                  const OptOut& g_ref) {
  constexpr const char* fn = "kl_estimator";
  const auto k = divkit::parse_kl_estimator(kind);
  const auto a = to_view(fn, "logprobs", lp), b = to_view(fn, "ref_logprobs", ref),
             o = to_view(fn, "out", out);
  const auto go = optional_view(fn, "grad_out", grad_out),
             gl = optional_view(fn, "grad_logprobs", g_lp),
             gr = optional_view(fn, "grad_ref", g_ref);
  nb::gil_scoped_release release;
  divkit::kl_estimator(a, b, k, clamp, o, go, gl, gr);
}

void ensemble_rewards(const InArray& rewards, const std::string& method, double lam,
                      const OutArray& out, const OptIn& grad_out, const OptOut& grad_rewards) {
  constexpr const char* fn = "ensemble_rewards";
  const auto m = divkit::parse_ensemble_method(method);
  const auto r = to_view(fn, "rewards", rewards), o = to_view(fn, "out", out);
  const auto go = optional_view(fn, "grad_out", grad_out),
             gr = optional_view(fn, "grad_rewards", grad_rewards);
  nb::gil_scoped_release release;
  divkit::ensemble_rewards(r, m, lam, o, go, gr);
}

void calibrate_reward(const InArray& rewards, const InArray& ref_rewards, const OutArray& out) {
  constexpr const char* fn = "calibrate_reward";
  const auto r = to_view(fn, "rewards", rewards), rr = to_view(fn, "ref_rewards", ref_rewards),
             o = to_view(fn, "out", out);
  nb::gil_scoped_release release;
  divkit::calibrate_reward(r, rr, o);
}

void infalign_transform(const InArray& u, double t, const OutArray& out, const OptIn& grad_out,
                        const OptOut& g_u) {
  constexpr const char* fn = "infalign_transform";
  const auto a = to_view(fn, "calibrated", u), o = to_view(fn, "out", out);
  const auto go = optional_view(fn, "grad_out", grad_out),
             gu = optional_view(fn, "grad_calibrated", g_u);
  nb::gil_scoped_release release;
  divkit::infalign_transform(a, t, o, go, gu);
}

void best_of_n(const InArray& rewards, const OutArray& indices, const OptOut& best) {
  constexpr const char* fn = "best_of_n";
  const auto r = to_view(fn, "rewards", rewards), i = to_view(fn, "indices", indices),
             b = optional_view(fn, "best", best);
  nb::gil_scoped_release release;
  divkit::best_of_n(r, i, b);
}

void d2o_loss(const InArray& ps, const InArray& rs, const InArray& pl, const InArray& rl,
              double beta, double alpha, const OutArray& losses, const OptOut& sample_rewards,
              const OptOut& rejected_rewards, const OptIn& grad_out, const OptOut& g_ps,
              const OptOut& g_rs, const OptOut& g_pl, const OptOut& g_rl) {
  constexpr const char* fn = "d2o_loss";
  divkit::D2OGrads g;
  g.grad_out = optional_view(fn, "grad_out", grad_out);
  g.grad_policy_samples = optional_view(fn, "grad_policy_samples", g_ps);
  g.grad_ref_samples = optional_view(fn, "grad_ref_samples", g_rs);
  g.grad_policy_rejected = optional_view(fn, "grad_policy_rejected", g_pl);
  g.grad_ref_rejected = optional_view(fn, "grad_ref_rejected", g_rl);
  const auto a = to_view(fn, "policy_sample_logps", ps), b = to_view(fn, "ref_sample_logps", rs),
             c = to_view(fn, "policy_rejected_logps", pl),
             d = to_view(fn, "ref_rejected_logps", rl), o = to_view(fn, "losses", losses),
             sr = optional_view(fn, "sample_rewards", sample_rewards),
             rr = optional_view(fn, "rejected_rewards", rejected_rewards);
  nb::gil_scoped_release release;
  divkit::d2o_loss(a, b, c, d, beta, alpha, o, sr, rr, g);
}

void hypo_online_kl(const InArray& ps, const InArray& rs, const OutArray& kl, const OptIn& grad_out,
                    const OptOut& g_ps) {
  constexpr const char* fn = "hypo_online_kl";
  const auto a = to_view(fn, "policy_sample_logps", ps), b = to_view(fn, "ref_sample_logps", rs),
             o = to_view(fn, "kl", kl), go = optional_view(fn, "grad_out", grad_out),
             g = optional_view(fn, "grad_policy_samples", g_ps);
  nb::gil_scoped_release release;
  divkit::hypo_online_kl(a, b, o, go, g);
}

void superhf_loss(const InArray& lp, const InArray& rewards, const InArray& kl,
                  const OptIn& lengths, double kl_coef, int64_t top_k, const OutArray& loss,
                  const OutArray& indices, const OptIn& grad_out, const OptOut& g_lp,
                  const OptOut& g_kl) {
  constexpr const char* fn = "superhf_loss";
  const auto a = to_view(fn, "policy_logps", lp), r = to_view(fn, "rewards", rewards),
             k = to_view(fn, "kl", kl), n = optional_view(fn, "lengths", lengths),
             l = to_view(fn, "loss", loss), i = to_view(fn, "indices", indices),
             go = optional_view(fn, "grad_out", grad_out),
             gl = optional_view(fn, "grad_policy_logps", g_lp),
             gk = optional_view(fn, "grad_kl", g_kl);
  nb::gil_scoped_release release;
  divkit::superhf_loss(a, r, k, n, kl_coef, top_k, l, i, go, gl, gk);
}

}  // namespace

void register_rlhf(nb::module_& m) {
  m.def("kl_estimator", &kl_estimator, nb::arg("logprobs"), nb::arg("ref_logprobs"),
        nb::arg("kind"), nb::arg("clamp"), nb::arg("out"), nb::arg("grad_out").none(),
        nb::arg("grad_logprobs").none(), nb::arg("grad_ref").none(),
        "Per-token KL estimators k1, k2, k3, abs (include/divkit/rlhf.h).");
  m.def("ensemble_rewards", &ensemble_rewards, nb::arg("rewards"), nb::arg("method"),
        nb::arg("uwo_lambda"), nb::arg("out"), nb::arg("grad_out").none(),
        nb::arg("grad_rewards").none());
  m.def("calibrate_reward", &calibrate_reward, nb::arg("rewards"), nb::arg("ref_rewards"),
        nb::arg("out"));
  m.def("infalign_transform", &infalign_transform, nb::arg("calibrated"), nb::arg("t"),
        nb::arg("out"), nb::arg("grad_out").none(), nb::arg("grad_calibrated").none());
  m.def("best_of_n", &best_of_n, nb::arg("rewards"), nb::arg("indices"), nb::arg("best").none());
  m.def("d2o_loss", &d2o_loss, nb::arg("policy_sample_logps"), nb::arg("ref_sample_logps"),
        nb::arg("policy_rejected_logps"), nb::arg("ref_rejected_logps"), nb::arg("beta"),
        nb::arg("alpha"), nb::arg("losses"), nb::arg("sample_rewards").none(),
        nb::arg("rejected_rewards").none(), nb::arg("grad_out").none(),
        nb::arg("grad_policy_samples").none(), nb::arg("grad_ref_samples").none(),
        nb::arg("grad_policy_rejected").none(), nb::arg("grad_ref_rejected").none());
  m.def("hypo_online_kl", &hypo_online_kl, nb::arg("policy_sample_logps"),
        nb::arg("ref_sample_logps"), nb::arg("kl"), nb::arg("grad_out").none(),
        nb::arg("grad_policy_samples").none());
  m.def("superhf_loss", &superhf_loss, nb::arg("policy_logps"), nb::arg("rewards"), nb::arg("kl"),
        nb::arg("lengths").none(), nb::arg("kl_coef"), nb::arg("top_k"), nb::arg("loss"),
        nb::arg("indices"), nb::arg("grad_out").none(), nb::arg("grad_policy_logps").none(),
        nb::arg("grad_kl").none());
}

}  // namespace divkit_py
