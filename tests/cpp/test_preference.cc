// The preference family: values against the hand-derived reference table of
// shared/reference/objectives.md, gradients against central finite differences of the kernel's
// own fp64 losses, properties (label smoothing symmetry, aot permutation), and bad input.
#include <cmath>
#include <string>
#include <vector>

#include "test_util.h"

namespace divkit_test {
namespace {

using divkit::PreferenceLossType;
using divkit::PreferenceSpec;

struct Batch {
  std::vector<double> pc, pr, rc, rr, nw, nl;
  int64_t n() const { return static_cast<int64_t>(pc.size()); }
};

TensorView vec(std::vector<double>& v) {
  return TensorView::vector(v.data(), DType::f64, static_cast<int64_t>(v.size()));
}

std::vector<double> losses_of(Batch& b, const PreferenceSpec& spec,
                              std::vector<double>* grads = nullptr,
                              std::vector<double>* chosen_rewards = nullptr) {
  const int64_t n = b.n();
  divkit::PreferenceInputs in;
  in.policy_chosen_logps = vec(b.pc);
  in.policy_rejected_logps = vec(b.pr);
  in.ref_chosen_logps = vec(b.rc);
  in.ref_rejected_logps = vec(b.rr);
  if (!b.nw.empty()) in.chosen_lengths = vec(b.nw), in.rejected_lengths = vec(b.nl);
  std::vector<double> loss(n), cr(n), rr(n);
  std::vector<double> g(4 * n);
  divkit::PreferenceOutputs out;
  out.losses = vec(loss);
  out.chosen_rewards = vec(cr);
  out.rejected_rewards = vec(rr);
  if (grads) {
    out.grad_policy_chosen = TensorView::vector(g.data(), DType::f64, n);
    out.grad_policy_rejected = TensorView::vector(g.data() + n, DType::f64, n);
    out.grad_ref_chosen = TensorView::vector(g.data() + 2 * n, DType::f64, n);
    out.grad_ref_rejected = TensorView::vector(g.data() + 3 * n, DType::f64, n);
  }
  divkit::preference_loss(in, spec, out);
  if (grads) *grads = g;
  if (chosen_rewards) *chosen_rewards = cr;
  return loss;
}

PreferenceSpec spec_of(PreferenceLossType t, double eps = 0.0) {
  PreferenceSpec s;
  s.terms = {{t, 1.0}};
  s.label_smoothing = eps;
  return s;
}

// logpi_w = -10, logpi_l = -12, ref_w = ref_l = -11, beta = 0.1 (objectives.md).
TEST(Preference, ReferenceValues) {
  using T = PreferenceLossType;
  struct Row {
    T type;
    double eps;
    double value;
  };
  const std::vector<Row> rows = {{T::sigmoid, 0.0, 0.598139},  {T::sigmoid, 0.1, 0.618139},
                                 {T::robust, 0.1, 0.573139},   {T::hinge, 0.0, 0.8},
                                 {T::ipo, 0.0, 9.0},           {T::nca_pair, 0.0, 1.338793},
                                 {T::bco_pair, 0.0, 1.288793}, {T::sppo_hard, 0.0, 32.0},
                                 {T::apo_zero, 0.0, 0.950042}, {T::apo_down, 0.0, 0.975145}};
  for (const auto& r : rows) {
    Batch b{{-10}, {-12}, {-11}, {-11}, {}, {}};
    std::vector<double> cr;
    const auto l = losses_of(b, spec_of(r.type, r.eps), nullptr, &cr);
    EXPECT_NEAR(l[0], r.value, 1e-6)
        << divkit::preference_loss_type_name(r.type) << " eps " << r.eps;
    EXPECT_NEAR(cr[0], 0.1, 1e-12);
  }
  Batch b{{-10}, {-12}, {-11}, {-11}, {}, {}};
  auto s = spec_of(T::sigmoid);
  s.f_divergence_type = divkit::FDivergenceType::js_divergence;
  EXPECT_NEAR(losses_of(b, s)[0], 0.644397, 1e-6);
}

Batch random_batch(int64_t n, uint32_t seed, double scale = 3.0) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> nd(0.0, scale);
  std::uniform_int_distribution<int> len(1, 20);
  Batch b;
  for (int64_t i = 0; i < n; ++i) {
    b.pc.push_back(-20 + nd(rng));
    b.pr.push_back(-20 + nd(rng));
    b.rc.push_back(-20 + nd(rng));
    b.rr.push_back(-20 + nd(rng));
    b.nw.push_back(len(rng));
    b.nl.push_back(len(rng));
  }
  return b;
}

// Every type (and each f-divergence where it applies): the analytic gradient of sum(losses)
// against central differences of the kernel's fp64 losses.
TEST(Preference, GradientsMatchFiniteDifferences) {
  const char* fs[] = {"reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"};
  for (int t = 0; t < divkit::kNumPreferenceLossTypes; ++t) {
    for (const char* fname : fs) {
      PreferenceSpec spec = spec_of(static_cast<PreferenceLossType>(t), 0.1);
      spec.f_divergence_type = divkit::parse_f_divergence_type(fname);
      spec.f_alpha_divergence_coef = 0.7;
      try {
        divkit::validate_preference_spec(spec);
      } catch (const divkit::Error&) {
        continue;  // f-divergence not defined for this type
      }
      Batch b = random_batch(5, 7 + t, 0.5);  // small log-ratios: away from hinge's kink
      if (spec.terms[0].type == PreferenceLossType::hinge) spec.beta = 0.01;
      std::vector<double> g;
      losses_of(b, spec, &g);
      std::vector<double>* fields[] = {&b.pc, &b.pr, &b.rc, &b.rr};
      for (int f = 0; f < 4; ++f)
        for (int64_t i = 0; i < b.n(); ++i) {
          const double h = 1e-5, x0 = (*fields[f])[i];
          (*fields[f])[i] = x0 + h;
          double up = 0, dn = 0;
          for (double v : losses_of(b, spec)) up += v;
          (*fields[f])[i] = x0 - h;
          for (double v : losses_of(b, spec)) dn += v;
          (*fields[f])[i] = x0;
          EXPECT_NEAR(g[f * b.n() + i], (up - dn) / (2 * h),
                      1e-6 * (1 + std::abs(g[f * b.n() + i])))
              << divkit::preference_loss_type_name(spec.terms[0].type) << " " << fname << " field "
              << f << " i " << i;
        }
    }
  }
}

TEST(Preference, CombinedTypesAreWeightedSums) {
  Batch b = random_batch(6, 3);
  PreferenceSpec s;
  s.terms = {{PreferenceLossType::sigmoid, 0.7},
             {PreferenceLossType::bco_pair, 0.3},
             {PreferenceLossType::aot, 2.0}};
  const auto both = losses_of(b, s);
  const auto a = losses_of(b, spec_of(PreferenceLossType::sigmoid));
  const auto c = losses_of(b, spec_of(PreferenceLossType::bco_pair));
  const auto d = losses_of(b, spec_of(PreferenceLossType::aot));
  for (int64_t i = 0; i < b.n(); ++i)
    EXPECT_NEAR(both[i], 0.7 * a[i] + 0.3 * c[i] + 2.0 * d[i], 1e-12);
}

// sft: the batch's token-mean NLL of the chosen completions, the same for every pair.
TEST(Preference, SftIsTheBatchTokenMeanNll) {
  Batch b = random_batch(4, 5);
  const auto l = losses_of(b, spec_of(PreferenceLossType::sft));
  double sum_logps = 0, sum_lengths = 0;
  for (int64_t i = 0; i < b.n(); ++i) sum_logps += b.pc[i], sum_lengths += b.nw[i];
  for (double v : l) EXPECT_NEAR(v, -sum_logps / sum_lengths, 1e-12);
}

// aot's loss is a function of the two sorted batches: permuting the pairs leaves it unchanged.
TEST(Preference, AotIsPermutationInvariant) {
  Batch b = random_batch(7, 11);
  const auto l0 = losses_of(b, spec_of(PreferenceLossType::aot, 0.05));
  Batch p = b;
  std::reverse(p.pc.begin(), p.pc.end());
  std::reverse(p.pr.begin(), p.pr.end());
  std::reverse(p.rc.begin(), p.rc.end());
  std::reverse(p.rr.begin(), p.rr.end());
  const auto l1 = losses_of(p, spec_of(PreferenceLossType::aot, 0.05));
  for (int64_t i = 0; i < b.n(); ++i) EXPECT_NEAR(l0[i], l1[i], 1e-12);
}

// Large margins: finite losses, and the sigmoid loss tends to 0 (right) or to -z (wrong way).
TEST(Preference, LargeMarginsStayFinite) {
  for (int t = 0; t < divkit::kNumPreferenceLossTypes; ++t) {
    Batch b{{0.0, -5000.0}, {-5000.0, 0.0}, {-1.0, -1.0}, {-1.0, -1.0}, {3, 3}, {4, 4}};
    std::vector<double> g;
    const auto l = losses_of(b, spec_of(static_cast<PreferenceLossType>(t), 0.1), &g);
    for (double v : l)
      EXPECT_TRUE(std::isfinite(v))
          << divkit::preference_loss_type_name(static_cast<PreferenceLossType>(t));
    for (double v : g)
      EXPECT_TRUE(std::isfinite(v))
          << divkit::preference_loss_type_name(static_cast<PreferenceLossType>(t));
  }
  Batch b{{0.0}, {-5000.0}, {-1.0}, {-1.0}, {}, {}};
  EXPECT_NEAR(losses_of(b, spec_of(PreferenceLossType::sigmoid))[0], 0.0, 1e-12);
  Batch w{{-5000.0}, {0.0}, {-1.0}, {-1.0}, {}, {}};
  EXPECT_NEAR(losses_of(w, spec_of(PreferenceLossType::sigmoid))[0], 0.1 * 5000.0, 1e-9);
}

// Pairs far on the right side: losses and gradients of order e^-z are representable in fp64 and
// must keep their relative accuracy (written with 1 - sigma(z), they kept only sigma's absolute
// error: 0 beyond z = 37).
TEST(Preference, SaturatedPairsKeepRelativeAccuracy) {
  const double beta = 0.5;
  auto sig = [](double x) { return 1 / (1 + std::exp(-x)); };
  auto dsig = [&](double x) { return sig(x) * sig(-x); };
  auto spec = [&](PreferenceLossType t) {
    PreferenceSpec p = spec_of(t);
    p.beta = beta;
    return p;
  };
  for (double z : {20.0, 45.0, 120.0, 600.0}) {
    const double l = z / beta, s = sig(-z), ds = dsig(z);
    std::vector<double> g;
    // sigmoid: l_w = l, l_l = 0; d(-logsig(beta D))/dl_w = -beta sigma(-z)
    Batch b{{l}, {0.0}, {0.0}, {0.0}, {}, {}};
    losses_of(b, spec(PreferenceLossType::sigmoid), &g);
    EXPECT_NEAR(g[0], -beta * s, 1e-12 * beta * s) << z;
    // apo_zero: l_w = l, l_l = -l: 1 - sigma(z) + sigma(-z) = 2 sigma(-z)
    Batch zero{{l}, {-l}, {0.0}, {0.0}, {}, {}};
    const double vz = losses_of(zero, spec(PreferenceLossType::apo_zero), &g)[0];
    EXPECT_NEAR(vz, 2 * s, 1e-12 * s) << z;
    EXPECT_NEAR(g[0], -beta * ds, 1e-12 * beta * ds) << z;
    EXPECT_NEAR(g[1], beta * ds, 1e-12 * beta * ds) << z;
    // apo_down: l_w = -l, l_l = -3 l: sigma(-z) + 1 - sigma(2 z) = sigma(-z) + sigma(-2 z)
    Batch down{{-l}, {-3 * l}, {0.0}, {0.0}, {}, {}};
    const double vd = losses_of(down, spec(PreferenceLossType::apo_down), &g)[0];
    EXPECT_NEAR(vd, s + sig(-2 * z), 1e-12 * s) << z;
    EXPECT_NEAR(g[1], beta * dsig(2 * z), 1e-12 * beta * dsig(2 * z)) << z;
  }
}

TEST(Preference, CpoOrpoKtoValues) {
  std::vector<double> pc{-0.7, -1.3}, pr{-1.1, -0.4};
  divkit::PreferenceInputs in;
  in.policy_chosen_logps = vec(pc);
  in.policy_rejected_logps = vec(pr);
  std::vector<double> loss(2), gc(2), gr(2), lo(2);
  divkit::PreferenceOutputs out;
  out.losses = vec(loss);
  out.grad_policy_chosen = vec(gc);
  out.grad_policy_rejected = vec(gr);
  // SimPO: -logsig(beta (x - gamma / beta)) with beta 2, gamma 0.5
  divkit::CpoSpec s;
  s.loss_type = divkit::CpoLossType::simpo;
  s.beta = 2.0;
  divkit::cpo_loss(in, s, out);
  for (int i = 0; i < 2; ++i) {
    const double z = 2.0 * (pc[i] - pr[i]) - 0.5;
    EXPECT_NEAR(loss[i], std::log1p(std::exp(-z)), 1e-12);
    EXPECT_NEAR(gc[i], -2.0 / (1 + std::exp(z)), 1e-12);
  }
  // ORPO: log odds from the definition log(p / (1 - p))
  divkit::odds_ratio_loss(in, 0.1, out, vec(lo));
  for (int i = 0; i < 2; ++i) {
    const double a = std::exp(pc[i]), c = std::exp(pr[i]);
    const double ref = std::log(a / (1 - a)) - std::log(c / (1 - c));
    EXPECT_NEAR(lo[i], ref, 1e-12);
    EXPECT_NEAR(loss[i], 0.1 * -std::log1p(std::exp(-ref)), 1e-12);
  }
  // KTO: z0 = max(0, mean(policy_KL - ref_KL)) = 0.5
  std::vector<double> rc{-1.0}, rr{-1.0, -1.0}, pkl{-1.0, -2.0}, rkl{-2.0, -2.0}, kl(1), c1{-0.5};
  std::vector<double> kloss(3);
  in.policy_chosen_logps = vec(c1);
  in.ref_chosen_logps = vec(rc);
  in.ref_rejected_logps = vec(rr);
  divkit::KtoKL k{vec(pkl), vec(rkl), vec(kl)};
  divkit::PreferenceOutputs ko;
  ko.losses = vec(kloss);
  divkit::kto_loss(in, k, divkit::KtoSpec{}, ko);
  EXPECT_NEAR(kl[0], 0.5, 1e-15);
  auto sig = [](double x) { return 1 / (1 + std::exp(-x)); };
  EXPECT_NEAR(kloss[0], 1 - sig(0.1 * (0.5 - 0.5)), 1e-12);
  EXPECT_NEAR(kloss[1], 1 - sig(0.1 * (0.5 - (-1.1 + 1.0))), 1e-12);
  EXPECT_NEAR(kloss[2], 1 - sig(0.1 * (0.5 - (-0.4 + 1.0))), 1e-12);
}

TEST(PreferenceErrors, BadInput) {
  Batch b = random_batch(3, 1);
  using T = PreferenceLossType;
  {
    Batch c = b;
    c.pr.pop_back();
    expect_error([&] { losses_of(c, spec_of(T::sigmoid)); }, {"policy_rejected_logps", "[3]"});
  }
  {
    Batch c = b;
    c.nw[1] = 0;
    expect_error([&] { losses_of(c, spec_of(T::sigmoid_norm)); }, {"chosen_lengths", "> 0"});
  }
  {
    Batch c = b;
    c.nw.clear(), c.nl.clear();
    expect_error([&] { losses_of(c, spec_of(T::sigmoid_norm)); }, {"chosen_lengths"});
  }
  {
    Batch c = b;
    c.pc[0] = NAN;
    expect_error([&] { losses_of(c, spec_of(T::sigmoid)); }, {"policy_chosen_logps", "finite"});
  }
  {
    Batch c{{}, {}, {}, {}, {}, {}};
    expect_error([&] { losses_of(c, spec_of(T::sigmoid)); }, {"empty"});
  }
  auto s = spec_of(T::sigmoid);
  s.beta = 0;
  expect_error([&] { losses_of(b, s); }, {"beta"});
  s = spec_of(T::sigmoid, 0.6);
  expect_error([&] { losses_of(b, s); }, {"label_smoothing"});
  s = spec_of(T::robust, 0.5);
  expect_error([&] { losses_of(b, s); }, {"label_smoothing", "robust"});
  s = spec_of(T::exo_pair, 0.0);
  expect_error([&] { losses_of(b, s); }, {"label_smoothing", "exo_pair"});
  s = spec_of(T::bco_pair);
  s.f_divergence_type = divkit::FDivergenceType::forward_kl;
  expect_error([&] { losses_of(b, s); }, {"f_divergence_type", "bco_pair"});
  expect_error([] { divkit::parse_preference_loss_type("dpo"); }, {"loss_type", "dpo", "sigmoid"});
  expect_error([] { divkit::parse_f_divergence_type("kl"); }, {"f_divergence_type"});
  // ORPO needs probabilities below 1.
  std::vector<double> zero{0.0}, neg{-1.0}, loss(1);
  divkit::PreferenceInputs in;
  in.policy_chosen_logps = vec(zero);
  in.policy_rejected_logps = vec(neg);
  divkit::PreferenceOutputs out;
  out.losses = vec(loss);
  expect_error([&] { divkit::odds_ratio_loss(in, 0.1, out); }, {"policy_chosen_logps", "< 0"});
}

}  // namespace
}  // namespace divkit_test
