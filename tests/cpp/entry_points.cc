#include "entry_points.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>

#include "core/dtype.h"

namespace divkit_test {
namespace {

using divkit::DType;
using divkit::TensorView;
using V = std::vector<TensorView>;
constexpr DType f32 = DType::f32, f64 = DType::f64, i64 = DType::i64;

// Shapes of the small problems: N tokens, V vocabulary, H hidden, K top-k entries.
constexpr int64_t N = 4, W = 7, H = 5, K = 3;

Slot in(const std::string& name, std::vector<int64_t> shape, Fill fill = Fill::normal,
        DType dt = f32, double lo = 0.0, double hi = 0.0) {
  return Slot{name, dt, std::move(shape), fill, lo, hi, false};
}
Slot out(const std::string& name, std::vector<int64_t> shape, DType dt = f32) {
  return Slot{name, dt, std::move(shape), Fill::zero, 0.0, 0.0, true};
}
Slot labels(const std::string& name = "labels", int64_t n = N, int64_t v = W) {
  return in(name, {n}, Fill::integers, i64, 0, static_cast<double>(v - 1));
}
Slot absent(const std::string& name) { return Slot{name, f32, {}, Fill::zero, 0, 0, false}; }

divkit::DivergenceSpec spec_of(uint32_t option) {
  divkit::DivergenceSpec s;
  s.kind = static_cast<divkit::DivergenceKind>(option % divkit::kNumDivergenceKinds);
  s.alpha = 0.5f;
  s.temperature = (option / 16) % 2 ? 2.0f : 1.0f;
  if (option % 97 == 1) s.temperature = -1.0f;  // an Error that must name the function called
  return s;
}
// Option 0: reduction none with an [N] loss; others may be mean (then the [N] loss is an Error).
divkit::Reduction reduction_of(uint32_t option) {
  return static_cast<divkit::Reduction>((option / 32) % 4);
}

// Options with bit 8 set run the vocabulary-parallel path as a group of one rank (its
// all-reduce is the identity), so that the sharded checks and loops see the random views too.
divkit::VocabShard shard_of(uint32_t option) {
  divkit::VocabShard s;
  if ((option / 256) % 2) s.all_reduce = [](double*, int64_t, divkit::CollectiveOp) {};
  return s;
}

std::vector<Slot> head_slots(const std::string& p, bool grads) {
  std::vector<Slot> s = {in(p + "hidden", {N, H}), in(p + "weight", {W, H}), in(p + "bias", {W})};
  if (grads) {
    s.push_back(out("grad_" + p + "hidden", {N, H}));
    s.push_back(out("grad_" + p + "weight", {W, H}));
    s.push_back(out("grad_" + p + "bias", {W}));
  }
  return s;
}
divkit::LinearHead head_at(const V& v, size_t i) { return {v[i], v[i + 1], v[i + 2]}; }
divkit::LinearHeadGrads grads_at(const V& v, size_t i) { return {v[i], v[i + 1], v[i + 2]}; }
std::vector<Slot> cat(std::vector<Slot> a, const std::vector<Slot>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

std::vector<Slot> preference_slots() {
  return {in("policy_chosen_logps", {N}, Fill::negative, f32, -30, -1),
          in("policy_rejected_logps", {N}, Fill::negative, f32, -30, -1),
          in("ref_chosen_logps", {N}, Fill::negative, f32, -30, -1),
          in("ref_rejected_logps", {N}, Fill::negative, f32, -30, -1),
          in("chosen_lengths", {N}, Fill::integers, i64, 1, 20),
          in("rejected_lengths", {N}, Fill::integers, i64, 1, 20),
          in("policy_weights", {N}, Fill::uniform, f32, 0.1, 1),
          out("losses", {N}),
          out("chosen_rewards", {N}),
          out("rejected_rewards", {N}),
          in("grad_losses", {N}, Fill::uniform, f32, 0.5, 1.5),
          out("grad_policy_chosen", {N}),
          out("grad_policy_rejected", {N}),
          out("grad_ref_chosen", {N}),
          out("grad_ref_rejected", {N})};
}
divkit::PreferenceInputs pref_in(const V& v) { return {v[0], v[1], v[2], v[3], v[4], v[5], v[6]}; }
divkit::PreferenceOutputs pref_out(const V& v) {
  return {v[7], v[8], v[9], v[10], v[11], v[12], v[13], v[14]};
}

std::vector<EntryPoint> build() {
  std::vector<EntryPoint> e;
  const std::vector<Slot> pair = {in("student_logits", {N, W}), in("teacher_logits", {N, W})};

  // ---- divergence.h, vocab_parallel.h ----
  auto divergence_slots =
      cat(pair, {labels(), in("weights", {N}, Fill::uniform, f32, 0.1, 2), out("loss", {N}),
                 out("grad_student", {N, W}), out("grad_teacher", {N, W})});
  auto divergence_io = [](const V& v, uint32_t o) {
    divkit::DivergenceOptions opt;
    opt.labels = v[2];
    opt.weights = v[3];
    opt.reduction = reduction_of(o);
    return opt;
  };
  e.push_back(
      {"divergence", divergence_slots, [=](const V& v, uint32_t o) {
         divkit::divergence(v[0], v[1], spec_of(o), divergence_io(v, o), {v[4], v[5], v[6]});
       }});
  e.push_back({"vocab_parallel_divergence", divergence_slots, [=](const V& v, uint32_t o) {
                 divkit::vocab_parallel_divergence(v[0], v[1], spec_of(o), divergence_io(v, o),
                                                   {v[4], v[5], v[6]}, shard_of(o));
               }});
  e.push_back({"divergence_shard_stats", cat(pair, {labels(), out("stats", {N, 4}, f64)}),
               [](const V& v, uint32_t o) {
                 divkit::divergence_shard_stats(v[0], v[1], spec_of(o), v[2], -100, v[3]);
               }});
  // Random normalizers are not those of the logits: the sums may be anything.
  e.push_back({"divergence_shard_sums",
               cat(pair, {labels(), in("norm", {N, 4}, Fill::uniform, f64, 0.5, 2),
                          out("sums", {N, 4}, f64)}),
               [](const V& v, uint32_t o) {
                 divkit::divergence_shard_sums(v[0], v[1], spec_of(o), v[2], -100, v[3], v[4]);
               },
               false});
  e.push_back({"divergence_shard_grad",
               cat(pair, {labels(), in("norm", {N, 4}, Fill::uniform, f64, 0.5, 2),
                          in("sums", {N, 4}, Fill::uniform, f64, 0.5, 2),
                          in("grad_scale", {N}, Fill::uniform, f64, 0.1, 1),
                          out("grad_student", {N, W}), out("grad_teacher", {N, W})}),
               [](const V& v, uint32_t o) {
                 divkit::divergence_shard_grad(v[0], v[1], spec_of(o), v[2], -100, v[3], v[4], v[5],
                                               v[6], v[7]);
               },
               false});

  // ---- sparse.h ----
  e.push_back({"sparse_divergence",
               {in("student_logits", {N, W}), in("teacher_indices", {N, K}, Fill::column, i64),
                in("teacher_logprobs", {N, K}, Fill::negative, f32, -3, -1.2), labels(),
                in("weights", {N}, Fill::uniform, f32, 0.1, 2), out("loss", {N}),
                out("grad_student", {N, W})},
               [](const V& v, uint32_t o) {
                 divkit::DivergenceOptions opt;
                 opt.labels = v[3];
                 opt.weights = v[4];
                 opt.reduction = reduction_of(o);
                 divkit::SparseOptions sp;
                 sp.tail =
                     (o / 8) % 2 ? divkit::SparseTail::renormalize : divkit::SparseTail::bucket;
                 divkit::sparse_divergence(v[0], v[1], v[2], spec_of(o), sp, opt, {v[5], v[6]});
               }});
  e.push_back(
      {"topk_divergence",
       cat(pair, {labels(), in("weights", {N}, Fill::uniform, f32, 0.1, 2), out("loss", {N}),
                  out("grad_student", {N, W})}),
       [](const V& v, uint32_t o) {
         divkit::DivergenceOptions opt;
         opt.labels = v[2];
         opt.weights = v[3];
         opt.reduction = reduction_of(o);
         divkit::topk_divergence(v[0], v[1], 1 + (o / 8) % W, spec_of(o), opt, {v[4], v[5]});
       }});

  // ---- fused_linear.h ----
  // Twice: with a teacher_token_ids map, and sharded (one rank), where a map is not supported.
  for (const bool sharded : {false, true}) {
    e.push_back({"fused_linear_divergence",
                 cat(cat(head_slots("student_", true), head_slots("teacher_", true)),
                     {labels(), in("weights", {N}, Fill::uniform, f32, 0.1, 2),
                      sharded ? absent("teacher_token_ids")
                              : in("teacher_token_ids", {W}, Fill::column, i64),
                      out("loss", {N})}),
                 [sharded](const V& v, uint32_t o) {
                   divkit::DivergenceOptions opt;
                   opt.labels = v[12];
                   opt.weights = v[13];
                   opt.reduction = reduction_of(o);
                   divkit::FusedLinearOptions fused;
                   fused.teacher_token_ids = v[14];
                   fused.chunk_size = 1 + (o / 8) % 4;
                   fused.hard_weight = (o / 128) % 2 ? 0.5f : 0.0f;
                   fused.shard = shard_of(sharded ? 256 : 0);
                   divkit::fused_linear_divergence(head_at(v, 0), head_at(v, 6), spec_of(o), opt,
                                                   fused, v[15], grads_at(v, 3), grads_at(v, 9));
                 }});
  }
  e.push_back({"fused_linear_sparse_divergence",
               cat(head_slots("student_", true),
                   {in("teacher_indices", {N, K}, Fill::column, i64),
                    in("teacher_logprobs", {N, K}, Fill::negative, f32, -3, -1.2), labels(),
                    in("weights", {N}, Fill::uniform, f32, 0.1, 2), absent("teacher_token_ids"),
                    out("loss", {N})}),
               [](const V& v, uint32_t o) {
                 divkit::DivergenceOptions opt;
                 opt.labels = v[8];
                 opt.weights = v[9];
                 opt.reduction = reduction_of(o);
                 divkit::FusedLinearOptions fused;
                 fused.teacher_token_ids = v[10];
                 fused.chunk_size = 1 + (o / 8) % 4;
                 divkit::fused_linear_sparse_divergence(head_at(v, 0), v[6], v[7], spec_of(o), {},
                                                        opt, fused, v[11], grads_at(v, 3));
               }});
  const std::vector<Slot> stats = {out("logprobs", {N}), out("entropy", {N}), out("lse", {N}),
                                   out("topk_mass", {N})};
  auto stats_at = [](const V& v, size_t i) {
    return divkit::LabelStatsOutputs{v[i], v[i + 1], v[i + 2], v[i + 3], 2, {}, {}};
  };
  e.push_back(
      {"fused_linear_cross_entropy",
       cat(cat(head_slots("", true),
               {labels(), in("weights", {N}, Fill::uniform, f32, 0.1, 2), out("loss", {N})}),
           stats),
       [=](const V& v, uint32_t o) {
         divkit::CrossEntropySpec s;
         s.weights = v[7];
         s.reduction = reduction_of(o);
         s.chunk_size = 1 + (o / 8) % 4;
         s.label_smoothing = (o / 128) % 2 ? 0.1f : 0.0f;
         s.shard = shard_of(o);
         divkit::fused_linear_cross_entropy(head_at(v, 0), v[6], s, v[8], grads_at(v, 3),
                                            stats_at(v, 9));
       }});
  e.push_back({"fused_linear_logprobs", cat(cat(head_slots("", false), {labels()}), stats),
               [=](const V& v, uint32_t o) {
                 divkit::LogprobsSpec s;
                 s.chunk_size = 1 + (o / 8) % 4;
                 s.shard = shard_of(o);
                 divkit::fused_linear_logprobs(head_at(v, 0), v[3], s, stats_at(v, 4));
               }});
  e.push_back(
      {"fused_linear_logprobs_backward",
       cat(head_slots("", true), {labels(), in("grad_logprobs", {N}, Fill::uniform, f32, -1, 1),
                                  in("grad_entropy", {N}, Fill::uniform, f32, -1, 1)}),
       [](const V& v, uint32_t o) {
         divkit::LogprobsSpec s;
         s.chunk_size = 1 + (o / 8) % 4;
         s.shard = shard_of(o);
         divkit::fused_linear_logprobs_backward(head_at(v, 0), v[6], s, v[7], v[8], grads_at(v, 3));
       }});
  e.push_back(
      {"label_rows",
       {out("logits", {N, W}), labels(), out("lse", {N}, f64), out("z_label", {N}, f64),
        out("entropy", {N}, f64), out("topk_mass", {N}, f64),
        in("coef_a0", {N}, Fill::uniform, f64, -1, 1),
        in("coef_a1", {N}, Fill::uniform, f64, -1, 1), in("coef_b", {N}, Fill::uniform, f64, -1, 1),
        in("coef_c", {N}, Fill::uniform, f64, -1, 1), in("coef_e", {N}, Fill::uniform, f64, -1, 1)},
       [](const V& v, uint32_t o) {
         divkit::LabelRowsArgs a;
         a.logits = v[0];
         a.labels = v[1];
         a.lse = v[2];
         a.z_label = v[3];
         a.entropy = v[4];
         a.topk_mass = v[5];
         a.topk = 1 + o % 3;
         a.coef_a0 = v[6];
         a.coef_a1 = v[7];
         a.coef_b = v[8];
         a.coef_c = v[9];
         a.coef_e = v[10];
         a.temperature = (o / 16) % 2 ? 2.0f : 1.0f;
         a.softcap = (o / 32) % 2 ? 5.0f : 0.0f;
         divkit::label_rows("label_rows", a);
       }});

  // ---- distill.h ----
  e.push_back({"row_entropy", {in("logits", {N, W}), out("out", {N})}, [](const V& v, uint32_t) {
                 divkit::row_entropy(v[0], 1.5, v[1]);
               }});
  e.push_back({"nkd",
               cat(pair, {labels(), out("target_out", {N}), out("nontarget_out", {N}),
                          in("target_coef", {N}, Fill::uniform, f32, 0.5, 1),
                          in("nontarget_coef", {N}, Fill::uniform, f32, 0.5, 1),
                          out("grad_student", {N, W})}),
               [](const V& v, uint32_t) {
                 divkit::nkd_rows(v[0], v[1], v[2], -100, 1.0, v[3], v[4], v[5], v[6], v[7]);
               }});
  e.push_back({"ofa_loss",
               cat(pair, {labels(), out("out", {N}), in("coef", {N}, Fill::uniform, f32, 0.5, 1),
                          out("grad_student", {N, W})}),
               [](const V& v, uint32_t) {
                 divkit::ofa_rows(v[0], v[1], v[2], -100, 1.5, 1.0, v[3], v[4], v[5]);
               }});
  e.push_back({"dac_kl_loss",
               cat(pair, {in("lower", {N}, Fill::uniform, f32, 0.01, 0.05),
                          in("upper", {N}, Fill::uniform, f32, 0.3, 0.9), labels(), out("out", {N}),
                          in("coef", {N}, Fill::uniform, f32, 0.5, 1), out("grad_student", {N, W}),
                          out("grad_lower", {N}), out("grad_upper", {N})}),
               [](const V& v, uint32_t o) {
                 divkit::clipped_kl_rows(v[0], v[1], v[2], v[3], 1.0, o % 2 ? 0.0 : 0.1, v[4], -100,
                                         v[5], v[6], v[7], v[8], v[9]);
               }});
  e.push_back({"mass_bounds",
               {in("teacher_logits", {N, W}), out("lower", {N}), out("upper", {N})},
               [](const V& v, uint32_t) { divkit::mass_bounds(v[0], 1.0, 0.0, 0.9, v[1], v[2]); }});
  e.push_back({"sorted_probs",
               {in("teacher_logits", {N, W}), out("out", {N, K})},
               [](const V& v, uint32_t) { divkit::sorted_probs(v[0], 1.0, v[1]); }});
  e.push_back(
      {"swing_loss",
       cat(pair, {in("temperatures", {N}, Fill::uniform, f32, 0.5, 2), labels(), out("out", {N}),
                  in("coef", {N}, Fill::uniform, f32, 0.5, 1), out("grad_student", {N, W})}),
       [](const V& v, uint32_t o) {
         divkit::tempered_kl_rows(v[0], v[1], v[2], 0.1, o, v[3], -100, v[4], v[5], v[6]);
       }});
  e.push_back({"swing_noise", {out("out", {N, W})}, [](const V& v, uint32_t o) {
                 divkit::swing_noise(o, v[0]);
               }});
  e.push_back({"uscd",
               {in("standard_logits", {N, W}), in("lame_logits", {N, W}), out("out", {N, W}),
                out("uncertainty", {N}), out("applied", {N})},
               [](const V& v, uint32_t o) {
                 divkit::selective_contrast(v[0], v[1], 0.7, o % 2 ? 0.005 : 10.0, 2.0 / 3.0, v[2],
                                            v[3], v[4]);
               }});

  // ---- preference.h ----
  e.push_back(
      {"preference_loss", preference_slots(), [](const V& v, uint32_t o) {
         divkit::PreferenceSpec s;
         s.terms = {
             {static_cast<divkit::PreferenceLossType>(o % divkit::kNumPreferenceLossTypes), 1.0}};
         s.label_smoothing = (o / 16) % 2 ? 0.2 : 0.0;
         divkit::preference_loss(pref_in(v), s, pref_out(v));
       }});
  e.push_back({"cpo_loss", preference_slots(), [](const V& v, uint32_t o) {
                 divkit::CpoSpec s;
                 s.loss_type = static_cast<divkit::CpoLossType>(o % 4);
                 divkit::cpo_loss(pref_in(v), s, pref_out(v));
               }});
  e.push_back(
      {"odds_ratio_loss", cat(preference_slots(), {out("log_odds", {N})}),
       [](const V& v, uint32_t) { divkit::odds_ratio_loss(pref_in(v), 0.1, pref_out(v), v[15]); }});
  auto kto_slots = preference_slots();  // KTOTrainer's names for the reference inputs
  kto_slots[2].name = "reference_chosen_logps";
  kto_slots[3].name = "reference_rejected_logps";
  kto_slots[7].shape = {2 * N};   // losses: chosen then rejected
  kto_slots[10].shape = {2 * N};  // grad_losses
  e.push_back({"kto_loss",
               cat(kto_slots,
                   {in("policy_KL_logps", {N}, Fill::negative, f32, -30, -1),
                    in("reference_KL_logps", {N}, Fill::negative, f32, -30, -1), out("kl", {1})}),
               [](const V& v, uint32_t o) {
                 divkit::KtoSpec s;
                 s.apo_zero_unpaired = o % 2;
                 divkit::kto_loss(pref_in(v), {v[15], v[16], v[17]}, s, pref_out(v));
               }});

  // ---- rlhf.h ----
  e.push_back({"kl_estimator",
               {in("logprobs", {6}, Fill::negative, f32, -5, -0.1),
                in("ref_logprobs", {6}, Fill::negative, f32, -5, -0.1), out("out", {6}),
                in("grad_out", {6}, Fill::uniform, f32, 0.5, 1), out("grad_logprobs", {6}),
                out("grad_ref", {6})},
               [](const V& v, uint32_t o) {
                 divkit::kl_estimator(v[0], v[1], static_cast<divkit::KlEstimator>(o % 4),
                                      o / 4 % 2, v[2], v[3], v[4], v[5]);
               }});
  e.push_back({"ensemble_rewards",
               {in("rewards", {N, K}), out("out", {N}),
                in("grad_out", {N}, Fill::uniform, f32, 0.5, 1), out("grad_rewards", {N, K})},
               [](const V& v, uint32_t o) {
                 divkit::ensemble_rewards(v[0], static_cast<divkit::EnsembleMethod>(o % 3), 0.5,
                                          v[1], v[2], v[3]);
               }});
  e.push_back({"calibrate_reward",
               {in("rewards", {2, 4}), in("ref_rewards", {2, 5}), out("out", {2, 4})},
               [](const V& v, uint32_t) { divkit::calibrate_reward(v[0], v[1], v[2]); }});
  e.push_back({"infalign_transform",
               {in("calibrated", {6}, Fill::uniform, f32, 0, 1), out("out", {6}),
                in("grad_out", {6}, Fill::uniform, f32, 0.5, 1), out("grad_calibrated", {6})},
               [](const V& v, uint32_t o) {
                 divkit::infalign_transform(v[0], o % 2 ? -3.0 : 2.0, v[1], v[2], v[3]);
               }});
  e.push_back({"best_of_n",
               {in("rewards", {3, 4}), out("indices", {3}, i64), out("best", {3})},
               [](const V& v, uint32_t) { divkit::best_of_n(v[0], v[1], v[2]); }});
  e.push_back({"d2o_loss",
               {in("policy_sample_logps", {3, 2}, Fill::negative, f32, -20, -1),
                in("ref_sample_logps", {3, 2}, Fill::negative, f32, -20, -1),
                in("policy_rejected_logps", {3}, Fill::negative, f32, -20, -1),
                in("ref_rejected_logps", {3}, Fill::negative, f32, -20, -1), out("losses", {3}),
                out("sample_rewards", {3}), out("rejected_rewards", {3}),
                in("grad_out", {3}, Fill::uniform, f32, 0.5, 1), out("grad_policy_samples", {3, 2}),
                out("grad_ref_samples", {3, 2}), out("grad_policy_rejected", {3}),
                out("grad_ref_rejected", {3})},
               [](const V& v, uint32_t) {
                 divkit::d2o_loss(v[0], v[1], v[2], v[3], 0.1, 0.1, v[4], v[5], v[6],
                                  {v[7], v[8], v[9], v[10], v[11]});
               }});
  e.push_back(
      {"hypo_online_kl",
       {in("policy_sample_logps", {3, 2}, Fill::negative, f32, -20, -1),
        in("ref_sample_logps", {3, 2}, Fill::negative, f32, -20, -1), out("kl", {3}),
        in("grad_out", {3}, Fill::uniform, f32, 0.5, 1), out("grad_policy_samples", {3, 2})},
       [](const V& v, uint32_t) { divkit::hypo_online_kl(v[0], v[1], v[2], v[3], v[4]); }});
  e.push_back({"superhf_loss",
               {in("policy_logps", {2, 4}, Fill::negative, f32, -20, -1), in("rewards", {2, 4}),
                in("kl", {2, 4}, Fill::uniform, f32, 0, 1),
                in("lengths", {2, 4}, Fill::integers, i64, 1, 9), out("loss", {1}),
                out("indices", {2, 2}, i64), in("grad_out", {1}, Fill::uniform, f32, 0.5, 1),
                out("grad_policy_logps", {2, 4}), out("grad_kl", {2, 4})},
               [](const V& v, uint32_t) {
                 divkit::superhf_loss(v[0], v[1], v[2], v[3], 0.1, 2, v[4], v[5], v[6], v[7], v[8]);
               }});

  // ---- ot.h, kde.h ----
  e.push_back(
      {"sinkhorn",
       {in("x", {1, 4, 2}), in("y", {1, 5, 2}), absent("cost"),
        in("a", {1, 4}, Fill::constant, f32, 0.25), in("b", {1, 5}, Fill::constant, f32, 0.2),
        out("f", {1, 4}, f64), out("g", {1, 5}, f64), out("plan", {1, 4, 5}, f64),
        out("grad_x", {1, 4, 2}, f64), out("grad_y", {1, 5, 2}, f64), out("grad_a", {1, 4}, f64),
        out("grad_b", {1, 5}, f64)},
       [](const V& v, uint32_t o) {
         divkit::SinkhornOptions opt;
         opt.eps = 0.5;
         opt.max_iter = 30;
         opt.p = 1 + o % 2;
         opt.cost_cache_bytes = (o / 2) % 2 ? 0 : int64_t{1} << 20;
         if ((o / 4) % 2) opt.rho_a = opt.rho_b = 1.0;
         divkit::sinkhorn({v[0], v[1], v[2], v[3], v[4]}, opt,
                          {v[5], v[6], v[7], v[8], v[9], v[10], v[11], {}});
       }});
  e.push_back({"sparse_ot",
               {in("a", {4}, Fill::constant, f32, 0.25), in("b", {5}, Fill::constant, f32, 0.2),
                in("cost", {4, 5}, Fill::uniform, f32, 0, 2), out("alpha", {4}, f64),
                out("grad_b", {5}, f64)},
               [](const V& v, uint32_t o) {
                 divkit::SparseOtOptions opt;
                 opt.gamma = 1.0;
                 opt.k = o % 3;
                 opt.max_iter = 30;
                 divkit::sparse_ot(v[0], v[1], v[2], opt, v[3], v[4]);
               }});
  const std::vector<Slot> clouds = {in("x", {4, 2}),
                                    in("y", {5, 2}),
                                    in("a", {4}, Fill::uniform, f32, 0.1, 1),
                                    in("b", {5}, Fill::uniform, f32, 0.1, 1),
                                    out("grad_x", {4, 2}, f64),
                                    out("grad_y", {5, 2}, f64)};
  e.push_back({"mmd", clouds, [](const V& v, uint32_t o) {
                 divkit::mmd2(v[0], v[1], v[2], v[3], static_cast<divkit::SampleKernel>(o % 2), 1.0,
                              v[4], v[5]);
               }});
  e.push_back({"cs_divergence", clouds, [](const V& v, uint32_t) {
                 divkit::cs_divergence(v[0], v[1], v[2], v[3], 1.0, v[4], v[5]);
               }});
  const std::vector<Slot> kde = {in("x", {5, 2}), in("w", {5}, Fill::uniform, f32, 0.1, 1),
                                 in("y", {3, 2})};
  e.push_back({"kde_log_density", cat(kde, {out("out", {3}, f64)}),
               [](const V& v, uint32_t) { divkit::kde_log_density(v[0], v[1], v[2], 0.7, v[3]); }});
  e.push_back({"kde_log_likelihood", kde,
               [](const V& v, uint32_t) { divkit::kde_log_likelihood(v[0], v[1], v[2], 0.7); }});
  e.push_back({"kde_select_bandwidth", kde, [](const V& v, uint32_t) {
                 divkit::KdeBandwidthOptions opt;
                 opt.grid = 4;
                 opt.max_iter = 8;
                 divkit::kde_select_bandwidth(v[0], v[1], v[2], opt);
               }});
  // ---- compare.h ----
  const std::vector<Slot> rows = {in("base", {N, W}), in("test", {N, W})};
  const std::vector<Slot> cmp_stats = {out("kl", {N}, f64), out("js", {N}, f64),
                                       out("tvd", {N}, f64), out("delta_p", {N}, f64),
                                       out("top1", {N}, f64)};
  auto compare_in = [](const TensorView& t) {
    divkit::CompareInput c;
    c.logits = t;
    return c;
  };
  e.push_back({"compare_rows", cat(rows, cmp_stats), [compare_in](const V& v, uint32_t) {
                 divkit::CompareOutputs o{v[2], v[3], v[4], v[5], v[6], {}, {}, {}};
                 divkit::compare_rows(compare_in(v[0]), compare_in(v[1]), TensorView{}, {}, o);
               }});
  e.push_back({"compare_rows",
               cat(cat(rows, {labels("tokens")}),
                   cat(cmp_stats, {out("nll", {N}, f64), out("nll_base", {N}, f64),
                                   out("delta_p_next", {N}, f64)})),
               [compare_in](const V& v, uint32_t) {
                 divkit::CompareOutputs o{v[3], v[4], v[5], v[6], v[7], v[8], v[9], v[10]};
                 divkit::compare_rows(compare_in(v[0]), compare_in(v[1]), v[2], {}, o);
               }});
  return e;
}

void store(void* base, DType dt, int64_t i, double x) {
  switch (dt) {
    case DType::f32: static_cast<float*>(base)[i] = static_cast<float>(x); break;
    case DType::f64: static_cast<double*>(base)[i] = x; break;
    case DType::bf16:
      static_cast<uint16_t*>(base)[i] = divkit::dtype::f32_to_bf16(static_cast<float>(x));
      break;
    case DType::f16:
      static_cast<uint16_t*>(base)[i] = divkit::dtype::f32_to_f16(static_cast<float>(x));
      break;
    case DType::i32: static_cast<int32_t*>(base)[i] = static_cast<int32_t>(x); break;
    case DType::i64: static_cast<int64_t*>(base)[i] = static_cast<int64_t>(x); break;
  }
}

}  // namespace

const std::vector<EntryPoint>& entry_points() {
  static const std::vector<EntryPoint> table = build();
  return table;
}

EntryBuffers::EntryBuffers(const EntryPoint& e, uint64_t seed, int64_t slack) {
  for (const Slot& s : e.slots) {
    int64_t numel = 1;
    for (int64_t d : s.shape) numel *= d;
    const int64_t elems = numel * slack + 64;
    bytes.push_back(elems * 8);
    mem.emplace_back(new uint64_t[static_cast<size_t>(elems)]);
    TensorView v;
    if (!s.shape.empty()) {
      v.data = mem.back().get();
      v.dtype = s.dtype;
      v.ndim = static_cast<int32_t>(s.shape.size());
      int64_t stride = 1;
      for (int d = v.ndim - 1; d >= 0; --d) {
        v.shape[d] = s.shape[static_cast<size_t>(d)];
        v.strides[d] = stride;
        stride *= v.shape[d];
      }
    }
    baseline.push_back(v);
  }
  refill(e, seed);
}

void EntryBuffers::refill(const EntryPoint& e, uint64_t seed) {
  std::mt19937_64 rng(seed);
  for (size_t k = 0; k < e.slots.size(); ++k) {
    const Slot& s = e.slots[k];
    const int64_t n = bytes[k] / static_cast<int64_t>(divkit::dtype_size(s.dtype));
    const int64_t cols = s.shape.empty() ? 1 : s.shape.back();
    std::normal_distribution<double> normal(0.0, 2.0);
    std::uniform_real_distribution<double> uni(std::min(s.lo, s.hi), std::max(s.lo, s.hi));
    for (int64_t i = 0; i < n; ++i) {
      double x = 0.0;
      switch (s.fill) {
        case Fill::normal: x = normal(rng); break;
        case Fill::negative:
        case Fill::uniform: x = uni(rng); break;
        case Fill::constant: x = s.lo; break;
        case Fill::column: x = static_cast<double>(i % cols); break;
        case Fill::integers: x = std::floor(uni(rng) + 0.5); break;
        case Fill::zero: x = 0.0; break;
      }
      store(mem[k].get(), s.dtype, i, x);
    }
  }
}

}  // namespace divkit_test
