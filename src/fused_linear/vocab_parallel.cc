// The vocabulary-parallel mode of the fused heads, and vocab_parallel_divergence
// (vocab_parallel.h).
#include "fused_linear/vocab_parallel.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "core/check.h"
#include "fused_linear/arguments.h"
#include "fused_linear/label_kernels.h"

namespace divkit {
namespace fused {

using check::fail;

namespace {
constexpr double kInf = std::numeric_limits<double>::infinity();
}  // namespace

ShardGroup::ShardGroup(const char* fn, const VocabShard& shard, int64_t v_local,
                       const std::function<void()>& local_checks, std::vector<uint8_t> flags)
    : global_v_(v_local), max_v_(v_local) {
  if (!shard.active()) {
    local_checks();
    return;
  }
  if (shard.world < 1 || shard.rank < 0 || shard.rank >= shard.world)
    fail(fn, "the vocabulary shard's rank " + std::to_string(shard.rank) +
                 " is not in [0, world = " + std::to_string(shard.world) + ")");
  std::string error;
  try {
    local_checks();
  } catch (const Error& e) {
    error = e.what();
  }
  all_reduce_ = &shard.all_reduce;
  rank_ = shard.rank;
  world_ = shard.world;
  const size_t nf = flags.size();
  std::vector<double> layout(static_cast<size_t>(world_) + 1 + nf, 0.0);
  layout[rank_] = static_cast<double>(v_local);
  layout[world_] = error.empty() ? 0.0 : 1.0;
  for (size_t k = 0; k < nf; ++k) layout[world_ + 1 + k] = flags[k] ? 1.0 : 0.0;
  sum(layout.data(), static_cast<int64_t>(layout.size()));
  if (layout[world_] > 0.0) {
    if (!error.empty()) throw Error(error);
    fail(fn, "the arguments were rejected on " +
                 std::to_string(static_cast<int64_t>(layout[world_])) +
                 " other rank(s) of the vocabulary-parallel group (see their error)");
  }
  for (size_t k = 0; k < nf; ++k) {
    const double count = layout[world_ + 1 + k];
    if (count != 0.0 && count != static_cast<double>(world_))
      fail(fn,
           "the ranks of the vocabulary-parallel group disagree on which outputs are asked for "
           "(every rank must ask for the same gradients and statistics)");
  }
  offset_ = global_v_ = max_v_ = 0;
  for (int r = 0; r < world_; ++r) {
    const int64_t vr = static_cast<int64_t>(layout[r]);
    if (r < rank_) offset_ += vr;
    global_v_ += vr;
    max_v_ = std::max(max_v_, vr);
  }
}

void ShardGroup::agree(const char* fn, const std::string& error) const {
  if (!on()) {
    if (!error.empty()) throw Error(error);
    return;
  }
  double failed = error.empty() ? 0.0 : 1.0;
  sum(&failed, 1);
  if (failed == 0.0) return;
  if (!error.empty()) throw Error(error);
  fail(fn, "the arguments were rejected on " + std::to_string(static_cast<int64_t>(failed)) +
               " other rank(s) of the vocabulary-parallel group (see their error)");
}

void ShardGroup::sum(double* data, int64_t count) const {
  if (count > 0) (*all_reduce_)(data, count, CollectiveOp::sum);
}

void ShardGroup::max(double* data, int64_t count) const {
  if (count > 0) (*all_reduce_)(data, count, CollectiveOp::max);
}

void ShardGroup::gather(const double* mine, int64_t count, std::vector<double>& out) const {
  out.assign(static_cast<size_t>(world_ * count), 0.0);
  std::copy(mine, mine + count, out.begin() + rank_ * count);
  sum(out.data(), world_ * count);
}

void sharded_divergence_rows(const char* fn, const ShardGroup& group, const TensorView& student,
                             const TensorView& teacher, const DivergenceSpec& spec,
                             const std::vector<uint8_t>& active, const double* row_weight,
                             double* row_loss, const TensorView& grad_student,
                             const TensorView& grad_teacher) {
  const int64_t n = student.shape[0];
  // The phases skip rows by label: -1 marks the inactive ones.
  std::vector<int64_t> lab(static_cast<size_t>(n));
  for (int64_t r = 0; r < n; ++r) lab[r] = active[r] ? 0 : -1;
  const TensorView labels = TensorView::vector(lab.data(), DType::i64, n);
  auto rows4 = [n](std::vector<double>& b) {
    return TensorView::matrix(b.data(), DType::f64, n, 4);
  };

  // 1. Per shard {max_s, log_sum_s, max_t, log_sum_t}, combined into the global normalizers:
  // max over ranks, then log sum_r exp((max_r - max) / T + log_sum_r).
  std::vector<double> stats(static_cast<size_t>(4 * n)), norm(static_cast<size_t>(4 * n), 0.0);
  // The first pass over this rank's logits finds NaN / +inf in them: agreed on before the first
  // collective of the phases, so that no rank waits for one that threw.
  std::string error;
  try {
    try {
      divergence_shard_stats(student, teacher, spec, labels, -1, rows4(stats));
    } catch (const Error& e) {
      check::rethrow_as(fn, "divergence_shard_stats", e);
    }
  } catch (const Error& e) {
    error = e.what();
  }
  group.agree(fn, error);
  std::vector<double> gmax(static_cast<size_t>(2 * n)), gsum(static_cast<size_t>(2 * n));
  for (int64_t r = 0; r < n; ++r)
    for (int k = 0; k < 2; ++k) gmax[2 * r + k] = stats[4 * r + 2 * k];
  group.max(gmax.data(), 2 * n);
  const double inv_t = 1.0 / static_cast<double>(spec.temperature);
  for (int64_t r = 0; r < n; ++r)
    for (int k = 0; k < 2; ++k) {
      const double m = stats[4 * r + 2 * k], ls = stats[4 * r + 2 * k + 1], g = gmax[2 * r + k];
      gsum[2 * r + k] = std::isfinite(m) && std::isfinite(g) ? std::exp((m - g) * inv_t + ls) : 0.0;
    }
  group.sum(gsum.data(), 2 * n);
  for (int64_t r = 0; r < n; ++r) {
    if (!active[r]) continue;
    for (int k = 0; k < 2; ++k) {
      const double g = gmax[2 * r + k], s = gsum[2 * r + k];
      if (!std::isfinite(g) || !(s > 0.0))
        fail(fn, std::string("the ") + (k == 0 ? "student" : "teacher") + " logits of row " +
                     std::to_string(r) +
                     " are -inf on every rank (no distribution); mark the row "
                     "with labels = ignore_index");
      norm[4 * r + 2 * k] = g;
      norm[4 * r + 2 * k + 1] = std::log(s);
    }
  }

  // 2. The shard's partial sums under the global normalizers, combined: summed, and for Renyi
  // its (max log w, sum exp(log w - max)) pair combined as a log-sum-exp.
  std::vector<double> sums(static_cast<size_t>(4 * n)), values(static_cast<size_t>(n));
  divergence_shard_sums(student, teacher, spec, labels, -1, rows4(norm), rows4(sums));
  const bool renyi = spec.kind == DivergenceKind::renyi && spec.alpha != 1.0f;
  if (!renyi) {
    group.sum(sums.data(), 4 * n);
    for (int64_t r = 0; r < n; ++r)
      values[r] =
          std::isfinite(sums[4 * r + 1]) && std::isfinite(sums[4 * r + 2]) ? sums[4 * r] : kInf;
  } else {
    std::vector<double> amax(static_cast<size_t>(n)), part(static_cast<size_t>(2 * n));
    for (int64_t r = 0; r < n; ++r) amax[r] = sums[4 * r + 1];
    group.max(amax.data(), n);
    for (int64_t r = 0; r < n; ++r) {
      const double m = sums[4 * r + 1];
      part[2 * r] = sums[4 * r];
      part[2 * r + 1] = std::isfinite(m) && std::isfinite(amax[r])
                            ? sums[4 * r + 2] * std::exp(m - amax[r])
                            : 0.0;
    }
    group.sum(part.data(), 2 * n);
    for (int64_t r = 0; r < n; ++r) {
      const double s1 = part[2 * r], log_rel = std::log(part[2 * r + 1]);
      const bool near = std::abs(s1) < 0.5;
      const double big_l = near ? std::log1p(s1) : amax[r] + log_rel;
      values[r] = std::isfinite(amax[r]) ? big_l / (static_cast<double>(spec.alpha) - 1.0) : kInf;
      sums[4 * r] = big_l;
      sums[4 * r + 1] = amax[r];
      sums[4 * r + 2] = log_rel;
      sums[4 * r + 3] = near ? 1.0 : 0.0;
    }
  }
  const double t2 =
      spec.scale_by_t_squared ? static_cast<double>(spec.temperature) * spec.temperature : 1.0;
  for (int64_t r = 0; r < n; ++r) {
    if (!active[r]) {
      values[r] = 0.0;
      continue;
    }
    // Beyond the fp32 range the unsharded kernel reports +inf.
    if (!(std::abs(values[r]) <= std::numeric_limits<float>::max())) values[r] = kInf;
    if (row_weight[r] != 0.0) row_loss[r] += row_weight[r] * values[r] * t2;
  }

  // 3. The shard's gradients (rows with an infinite value get none).
  if (!grad_student.defined() && !grad_teacher.defined()) return;
  std::vector<double> scale(static_cast<size_t>(n));
  for (int64_t r = 0; r < n; ++r)
    scale[r] = active[r] && std::isfinite(values[r]) ? row_weight[r] : 0.0;
  divergence_shard_grad(student, teacher, spec, labels, -1, rows4(norm), rows4(sums),
                        TensorView::vector(scale.data(), DType::f64, n), grad_student,
                        grad_teacher);
}

void sharded_label_forward(const char* fn, const ShardGroup& group, float* z, int64_t rows,
                           int64_t v, const int64_t* labels, float inv_t, float softcap,
                           int64_t first_token, const ShardedLabelStats& out, int threads) {
  detail::LabelForwardJob f;
  f.z = z;
  f.ldz = v;
  f.rows = rows;
  f.v = v;
  f.labels = labels;
  f.inv_t = inv_t;
  f.softcap = softcap;
  f.num_threads = threads;
  // 1. The global max of each row (+inf from any rank marks NaN or +inf logits).
  std::vector<double> m(static_cast<size_t>(rows));
  f.shard_max = m.data();
  detail::label_rows_forward(f);
  group.max(m.data(), rows);
  for (int64_t r = 0; r < rows; ++r)
    if (labels[r] >= 0 && !std::isfinite(m[r]))
      fail(fn, "the logits of token " + std::to_string(first_token + r) +
                   " (hidden @ weight^T + bias) are NaN, +inf or all -inf");
  // 2. The shard's sums under it, and the label's logit from the rank that holds it.
  // [4 rows partials | rows counts of unmasked entries], summed over the group in one call.
  std::vector<double> part(static_cast<size_t>(5 * rows)), topk_z;
  f.shard_max = nullptr;
  f.shift = m.data();
  f.partials = part.data();
  f.unmasked = out.unmasked != nullptr ? part.data() + 4 * rows : nullptr;
  if (out.topk_mass != nullptr) {
    topk_z.resize(static_cast<size_t>(rows * out.topk));
    f.topk_z = topk_z.data();
    f.topk = out.topk;
  }
  detail::label_rows_forward(f);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t local = labels[r] - group.offset();
    part[4 * r + 3] = labels[r] >= 0 && local >= 0 && local < v ? z[r * v + local] : 0.0;
  }
  group.sum(part.data(), (out.unmasked != nullptr ? 5 : 4) * rows);
  for (int64_t r = 0; r < rows; ++r) {
    const bool on = labels[r] >= 0;
    const double s = part[4 * r], log_s = on ? std::log(s) : 0.0;
    if (out.lse) out.lse[r] = on ? m[r] + log_s : 0.0;
    if (out.z_label) out.z_label[r] = on ? part[4 * r + 3] : 0.0;
    const double count =
        out.unmasked != nullptr ? part[4 * rows + r] : static_cast<double>(group.global_v());
    if (out.unmasked) out.unmasked[r] = on ? count : 0.0;
    if (out.mean_z) out.mean_z[r] = on ? part[4 * r + 2] / count : 0.0;
    // H = -sum p log p = log S - sum e c / S with c = z - max.
    if (out.entropy) out.entropy[r] = on ? log_s - part[4 * r + 1] / s : 0.0;
  }
  if (out.topk_mass == nullptr) return;
  // 3. The k largest logits of the row over every shard.
  std::vector<double> all, cand;
  group.gather(topk_z.data(), rows * out.topk, all);
  const int64_t world = static_cast<int64_t>(all.size()) / std::max<int64_t>(rows * out.topk, 1);
  for (int64_t r = 0; r < rows; ++r) {
    out.topk_mass[r] = 0.0;
    if (labels[r] < 0) continue;
    cand.clear();
    for (int64_t w = 0; w < world; ++w) {
      const double* c = all.data() + (w * rows + r) * out.topk;
      cand.insert(cand.end(), c, c + out.topk);
    }
    const int64_t k = std::min<int64_t>(out.topk, static_cast<int64_t>(cand.size()));
    std::nth_element(cand.begin(), cand.begin() + (k - 1), cand.end(), std::greater<double>());
    const double lse = out.lse ? out.lse[r] : 0.0;
    double mass = 0.0;
    for (int64_t j = 0; j < k; ++j) mass += std::exp(cand[j] - lse);
    out.topk_mass[r] = std::min(mass, 1.0);
  }
}

void local_labels(const ShardGroup& group, const int64_t* labels, int64_t rows, int64_t v,
                  std::vector<int64_t>& local, std::vector<uint8_t>& in_shard) {
  local.resize(static_cast<size_t>(rows));
  in_shard.resize(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t c = labels[r] - group.offset();
    in_shard[r] = labels[r] >= 0 && c >= 0 && c < v;
    local[r] = labels[r] < 0 ? -1 : (in_shard[r] ? c : 0);
  }
}

}  // namespace fused

void vocab_parallel_divergence(const TensorView& student, const TensorView& teacher,
                               const DivergenceSpec& spec, const DivergenceOptions& options,
                               const DivergenceOutputs& outputs, const VocabShard& shard) {
  constexpr const char* fn = "vocab_parallel_divergence";
  if (!shard.active()) {
    check::views(fn, {{"student_logits", student},
                      {"teacher_logits", teacher},
                      {"labels", options.labels},
                      {"weights", options.weights},
                      {"loss", outputs.loss},
                      {"grad_student", outputs.grad_student},
                      {"grad_teacher", outputs.grad_teacher}});
    try {
      divergence(student, teacher, spec, options, outputs);
    } catch (const Error& e) {
      check::rethrow_as(fn, "divergence", e);
    }
    return;
  }
  check::divergence_spec(fn, spec);
  // Every check whose outcome may differ between ranks runs inside the group's agreement, so
  // that a rank with bad views raises on every rank instead of leaving the others waiting.
  const int64_t v = student.ndim == 2 ? student.shape[1] : 0;
  const fused::ShardGroup group(
      fn, shard, v,
      [&] {
        check::views(fn, {{"student_logits", student},
                          {"teacher_logits", teacher},
                          {"labels", options.labels},
                          {"weights", options.weights},
                          {"loss", outputs.loss},
                          {"grad_student", outputs.grad_student},
                          {"grad_teacher", outputs.grad_teacher}});
        check::float_matrix(fn, "student_logits", student);
        check::float_matrix(fn, "teacher_logits", teacher);
        const int64_t n = student.shape[0];
        if (teacher.shape[0] != n || teacher.shape[1] != v)
          check::fail(fn, "student_logits " + check::shape_string(student) +
                              " and teacher_logits " + check::shape_string(teacher) +
                              " must have the same shape");
        // The gradient outputs are only read by the last phase, after collectives have started:
        // checked here so that a bad one raises on every rank.
        for (const auto& [g, name] : {std::pair{&outputs.grad_student, "grad_student"},
                                      std::pair{&outputs.grad_teacher, "grad_teacher"}}) {
          if (!g->defined()) continue;
          check::float_matrix(fn, name, *g, /*is_output=*/true);
          if (g->shape[0] != n || g->shape[1] != v)
            check::fail(fn, std::string(name) + " must have the shape of the logits " +
                                check::shape_string(student) + ", got " + check::shape_string(*g));
          if (check::ranges_overlap(*g, student) || check::ranges_overlap(*g, teacher))
            check::fail(fn, std::string(name) + " must not overlap the logits");
        }
        if (outputs.grad_student.defined() && outputs.grad_teacher.defined() &&
            check::ranges_overlap(outputs.grad_student, outputs.grad_teacher))
          check::fail(fn, "grad_teacher overlaps grad_student");
      },
      {outputs.grad_student.defined(), outputs.grad_teacher.defined()});
  const int64_t n = student.shape[0];
  const std::vector<int64_t> labels =
      fused::read_labels(fn, options.labels, n, options.ignore_index, group.global_v(), true);
  const std::vector<double> weights = reduce::token_weights(fn, options.weights, n);
  std::vector<uint8_t> active(static_cast<size_t>(n));
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) count += active[i] = labels[i] >= 0;
  const double divisor =
      reduce::divisor(fn, options.reduction, options.num_items_in_batch, count, n);
  reduce::check_loss_output(fn, outputs.loss, options.reduction, n);
  std::vector<double> row_weight(static_cast<size_t>(n)), row_loss(static_cast<size_t>(n), 0.0);
  for (int64_t i = 0; i < n; ++i) row_weight[i] = weights[i] / divisor;
  fused::sharded_divergence_rows(fn, group, student, teacher, spec, active, row_weight.data(),
                                 row_loss.data(), outputs.grad_student, outputs.grad_teacher);
  if (options.reduction == Reduction::none) {
    for (int64_t i = 0; i < n; ++i) elem::set(outputs.loss, i, row_loss[i]);
  } else {
    double total = 0.0;
    for (double x : row_loss) total += x;
    elem::set(outputs.loss, 0, total);
  }
}

}  // namespace divkit
