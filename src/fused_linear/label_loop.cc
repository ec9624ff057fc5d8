// The fused label losses (fused_linear.h): cross-entropy and selective log-softmax, the chunk
// loop of logits GEMM -> row statistics (label_kernels.h, combined over a vocabulary-parallel
// group when sharded) -> gradient coefficients -> gradient GEMMs.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "core/check.h"
#include "core/cuda_device.h"
#include "divkit/fused_linear.h"
#include "divkit/runtime.h"
#include "fused_linear/arguments.h"
#include "fused_linear/head_grads.h"
#include "fused_linear/label_kernels.h"
#include "fused_linear/label_loop_cuda.h"
#include "fused_linear/vocab_parallel.h"
#include "fused_linear/weight_blocks.h"

namespace divkit {

using check::fail;
using namespace fused;

namespace {

std::atomic<bool> g_one_sweep{true};

struct LabelRun {
  const char* fn;
  const ShardGroup& group;  // vocabulary-parallel (or not: off)
  const LinearHead& head;
  std::vector<int64_t> labels;
  float inv_t = 1.0f, softcap = 0.0f;
  int64_t chunk = 0;
};

// The chunk loop of the label losses: logits, forward statistics, then (when `coef` is given)
// the gradient coefficients of each row and the gradient GEMMs. `entropy_coef`: coef sets the
// entropy term's coefficient (the gradient then needs the row's entropy). Unsharded, each row's
// gradient is written in the sweep that takes its statistics (LabelForwardJob::coef), softcap,
// top-k mass and entropy term included; sharded rows (whose sums need the group) and
// detail::set_label_one_sweep(false) take a gradient pass of their own (label_rows_grad).
// `want_mean` (label smoothing): on_stats's mean is over the unmasked entries (z > -inf) of the
// row, coef gets their number V' (0 without want_mean), and c goes to those entries only.
template <class OnStats, class Coef>
void run_label_head(const LabelRun& run, const LabelStatsOutputs& stats, bool want_entropy,
                    bool want_mean, const LinearHeadGrads& grads, OnStats&& on_stats, Coef&& coef,
                    bool entropy_coef = false) {
  const LinearHead& head = run.head;
  const int64_t n = head.hidden.shape[0], v = head.weight.shape[0], h = head.weight.shape[1];
  const int threads = get_num_threads();
  const bool sharded = run.group.on();
  // A shard's weight was checked before the group agreed that every rank's was.
  WeightBlocks w(run.fn, "weight", head.weight, v, nullptr, threads, /*check=*/!sharded);
  F32Matrix hc;
  const std::vector<float> b = bias_f32(head.bias, nullptr, v);
  HeadGradAccumulator acc(head, grads, &w, v, nullptr, &run.group);
  const bool want_grad = acc.wanted();
  const bool fused_grad = want_grad && !sharded && detail::label_one_sweep();
  struct CoefCtx {
    std::remove_reference_t<Coef>* coef;
    int64_t r0;
    const double* unmasked;  // [chunk rows], written by the forward before its coef call
  } coef_ctx{&coef, 0, nullptr};
  // Every rank of a group chooses the same chunk size (from the largest shard).
  const int64_t chunk = choose_chunk(run.chunk, n, run.group.max_v());
  std::vector<int64_t> local;  // a shard's labels as its columns
  std::vector<uint8_t> in_shard;
  std::vector<float> z(static_cast<size_t>(chunk * v)), scratch;
  std::vector<double> lse(chunk), zy(chunk), mean(chunk), ent(chunk), topk(chunk), sq, top1,
      cnt(want_mean ? chunk : 0, 0.0);
  double* const cnt_ptr = want_mean ? cnt.data() : nullptr;
  if (stats.log_sum_sq_probs.defined()) sq.resize(chunk);
  if (stats.is_top1.defined()) top1.resize(chunk);
  std::vector<double> ca(chunk), cb(chunk), cc(chunk), ce(chunk);
  for (int64_t r0 = 0; r0 < n; r0 += chunk) {
    const int64_t rows = std::min(chunk, n - r0);
    to_f32_rows(run.fn, "hidden", head.hidden, r0, rows, nullptr, hc);
    chunk_logits(hc, rows, w, v, h, b, z.data());
    if (sharded) {
      ShardedLabelStats st;
      st.lse = lse.data();
      st.z_label = zy.data();
      st.mean_z = want_mean ? mean.data() : nullptr;
      st.unmasked = cnt_ptr;
      st.entropy = want_entropy ? ent.data() : nullptr;
      st.topk_mass = stats.topk_mass.defined() ? topk.data() : nullptr;
      st.topk = stats.topk;
      sharded_label_forward(run.fn, run.group, z.data(), rows, v, run.labels.data() + r0, run.inv_t,
                            run.softcap, r0, st, threads);
      local_labels(run.group, run.labels.data() + r0, rows, v, local, in_shard);
    } else {
      detail::LabelForwardJob f;
      f.z = z.data();
      f.ldz = v;
      f.rows = rows;
      f.v = v;
      f.labels = run.labels.data() + r0;
      f.inv_t = run.inv_t;
      f.softcap = run.softcap;
      f.lse = lse.data();
      f.z_label = zy.data();
      f.mean_z = want_mean ? mean.data() : nullptr;
      f.unmasked = cnt_ptr;
      f.entropy = want_entropy ? ent.data() : nullptr;
      f.topk_mass = stats.topk_mass.defined() ? topk.data() : nullptr;
      f.topk = stats.topk;
      f.log_sum_sq = sq.empty() ? nullptr : sq.data();
      f.is_top1 = top1.empty() ? nullptr : top1.data();
      f.num_threads = threads;
      if (fused_grad) {
        coef_ctx.r0 = r0;
        coef_ctx.unmasked = cnt_ptr;
        f.coef_ctx = &coef_ctx;
        f.coef = [](void* p, int64_t r, double lse, double* a, double* b, double* c, double* e) {
          const CoefCtx& cx = *static_cast<const CoefCtx*>(p);
          *a = *b = *c = *e = 0.0;
          (*cx.coef)(cx.r0 + r, lse, cx.unmasked ? cx.unmasked[r] : 0.0, *a, *b, *c, *e);
        };
        f.coef_entropy = entropy_coef;
      }
      detail::label_rows_forward(f);
      if (f.bad_row >= 0)
        fail(run.fn,
             "the logits of token " + std::to_string(r0 + f.bad_row) +
                 " (hidden @ weight^T + bias) are NaN, +inf or all -inf" +
                 (run.inv_t != 1.0f ? ", or overflow float32 once divided by the temperature"
                                    : ""));
    }
    for (int64_t r = 0; r < rows; ++r) {
      const bool on = run.labels[r0 + r] >= 0;
      const int64_t i = r0 + r;
      if (stats.logprobs.defined()) elem::set(stats.logprobs, i, on ? zy[r] - lse[r] : 0.0);
      if (stats.entropy.defined()) elem::set(stats.entropy, i, on ? ent[r] : 0.0);
      if (stats.lse.defined()) elem::set(stats.lse, i, on ? lse[r] : 0.0);
      if (stats.topk_mass.defined()) elem::set(stats.topk_mass, i, on ? topk[r] : 0.0);
      if (!sq.empty()) elem::set(stats.log_sum_sq_probs, i, on ? sq[r] : 0.0);
      if (!top1.empty()) elem::set(stats.is_top1, i, on ? top1[r] : 0.0);
      if (on) on_stats(i, lse[r], zy[r], mean[r]);
    }
    if (!want_grad) continue;
    if (fused_grad) {
      acc.add_chunk(z.data(), v, r0, rows, hc, scratch);
      continue;
    }
    for (int64_t r = 0; r < rows; ++r) {
      ca[r] = cb[r] = cc[r] = ce[r] = 0.0;
      if (run.labels[r0 + r] >= 0)
        coef(r0 + r, lse[r], want_mean ? cnt[r] : 0.0, ca[r], cb[r], cc[r], ce[r]);
      if (sharded && !in_shard[r]) cb[r] = 0.0;  // the one-hot term is the label's rank's
    }
    detail::LabelGradJob g;
    g.z = z.data();
    g.ldz = v;
    g.rows = rows;
    g.v = v;
    g.labels = sharded ? local.data() : run.labels.data() + r0;
    g.inv_t = run.inv_t;
    g.softcap = run.softcap;
    g.lse = lse.data();
    g.entropy = ent.data();
    g.a = ca.data();
    g.b = cb.data();
    g.c = cc.data();
    g.e = want_entropy ? ce.data() : nullptr;
    g.c_unmasked = want_mean;
    g.num_threads = threads;
    detail::label_rows_grad(g);
    acc.add_chunk(z.data(), v, r0, rows, hc, scratch);
  }
  for (std::vector<float>* b : {&z, &scratch}) std::vector<float>().swap(*b);
  w.release();
  acc.finish();
}

int64_t rows_of(const TensorView& w) { return w.defined() && w.ndim == 2 ? w.shape[0] : 0; }

// A shard's weight is checked for NaN and inf before its group agrees that every rank's passed.
void check_shard_weight(const char* fn, const VocabShard& shard, const LinearHead& head) {
  if (shard.active())
    check_finite_rows(fn, "weight", head.weight, head.weight.shape[0], nullptr, get_num_threads());
}

void check_stats(const char* fn, const LabelStatsOutputs& stats, int64_t n, int64_t v,
                 bool sharded) {
  for (auto [t, name] :
       {std::pair{&stats.logprobs, "logprobs"}, std::pair{&stats.entropy, "entropy"},
        std::pair{&stats.lse, "lse"}, std::pair{&stats.topk_mass, "topk_mass"},
        std::pair{&stats.log_sum_sq_probs, "log_sum_sq_probs"}})
    if (t->defined()) check::vector_of(fn, name, *t, n, {DType::f32, DType::f64});
  if (stats.is_top1.defined())
    check::vector_of(fn, "is_top1", stats.is_top1, n,
                     {DType::f32, DType::f64, DType::i32, DType::i64});
  if (sharded && (stats.log_sum_sq_probs.defined() || stats.is_top1.defined()))
    fail(fn, "log_sum_sq_probs and is_top1 are not supported with a vocabulary-parallel shard");
  if (stats.topk_mass.defined() && (stats.topk < 1 || stats.topk > v))
    fail(fn,
         "topk must be in [1, V = " + std::to_string(v) + "], got " + std::to_string(stats.topk));
}

void check_ce_options(const char* fn, const CrossEntropySpec& spec) {
  const float eps = spec.label_smoothing;
  if (!(eps >= 0.0f && eps < 1.0f))
    fail(fn, "label_smoothing must be in [0, 1), got " + std::to_string(eps));
  if (!(spec.z_loss_scale >= 0.0f) || !std::isfinite(spec.z_loss_scale))
    fail(fn, "z_loss_scale must be finite and >= 0, got " + std::to_string(spec.z_loss_scale));
  if (!(spec.softcap >= 0.0f) || !std::isfinite(spec.softcap))
    fail(fn,
         "softcap must be finite and >= 0 (0 disables it), got " + std::to_string(spec.softcap));
}

void check_temperature(const char* fn, float t) {
  if (!(t > 0.0f) || !std::isfinite(t))
    fail(fn, "temperature must be finite and > 0, got " + std::to_string(t));
}

// A call whose views are on CUDA: the CUDA chunk loop (label_loop_cuda.cu), or an Error where it
// does not apply (vocabulary-parallel shards, a build without CUDA).
bool on_cuda(const char* fn, const cuda::Placement& where, const VocabShard& shard) {
  if (where.device != Device::cuda) return false;
#if DIVKIT_HAS_CUDA
  if (shard.active())
    fail(fn,
         "a vocabulary-parallel shard is not supported on CUDA views by the C++ core (the "
         "Python package's process_group= path runs it on CUDA tensors)");
  return true;
#else
  (void)shard;
  cuda::not_built(fn);
#endif
}

// The fields every label head's CUDA job shares.
detail::LabelHeadCudaJob cuda_job(const char* fn, const LinearHead& head, const TensorView& labels,
                                  int64_t ignore_index, int64_t chunk_size, std::uintptr_t stream,
                                  bool check_finite) {
  detail::LabelHeadCudaJob job;
  job.fn = fn;
  job.head = head;
  job.labels = labels;
  job.ignore_index = ignore_index;
  job.chunk_size = chunk_size;
  job.stream = stream;
  job.check_finite = check_finite;
  return job;
}

void run_cuda(detail::LabelHeadCudaJob job, const cuda::Placement& where) {
#if DIVKIT_HAS_CUDA
  if (!job.labels.defined()) fail(job.fn, "labels are required");
  detail::label_head_cuda(job, where.index);
#else
  (void)job;
  (void)where;
#endif
}

}  // namespace

void detail::set_label_one_sweep(bool on) { g_one_sweep.store(on); }
bool detail::label_one_sweep() { return g_one_sweep.load(); }

void fused_linear_cross_entropy(const LinearHead& head, const TensorView& labels,
                                const CrossEntropySpec& spec, const TensorView& loss,
                                const LinearHeadGrads& grads, const LabelStatsOutputs& stats) {
  constexpr const char* fn = "fused_linear_cross_entropy";
  const cuda::Placement where =
      cuda::checked_placement(fn, {{"hidden", &head.hidden},
                                   {"weight", &head.weight},
                                   {"bias", &head.bias},
                                   {"grad_hidden", &grads.hidden},
                                   {"grad_weight", &grads.weight},
                                   {"grad_bias", &grads.bias},
                                   {"labels", &labels},
                                   {"weights", &spec.weights},
                                   {"loss", &loss},
                                   {"logprobs", &stats.logprobs},
                                   {"entropy", &stats.entropy},
                                   {"lse", &stats.lse},
                                   {"topk_mass", &stats.topk_mass},
                                   {"log_sum_sq_probs", &stats.log_sum_sq_probs},
                                   {"is_top1", &stats.is_top1}});
  if (on_cuda(fn, where, spec.shard)) {
    check_ce_options(fn, spec);
    detail::LabelHeadCudaJob job = cuda_job(fn, head, labels, spec.ignore_index, spec.chunk_size,
                                            spec.stream, spec.check_finite);
    job.grads = grads;
    job.softcap = spec.softcap;
    job.stats = stats;
    if (!loss.defined()) fail(fn, "loss is required");
    job.loss = loss;
    job.weights = spec.weights;
    job.label_smoothing = spec.label_smoothing;
    job.z_loss_scale = spec.z_loss_scale;
    job.reduction = spec.reduction;
    job.num_items_in_batch = spec.num_items_in_batch;
    return run_cuda(job, where);
  }
  const ShardGroup group(fn, spec.shard, rows_of(head.weight),
                         [&] {
                           check::views(fn, {{"hidden", head.hidden},
                                             {"weight", head.weight},
                                             {"bias", head.bias},
                                             {"grad_hidden", grads.hidden},
                                             {"grad_weight", grads.weight},
                                             {"grad_bias", grads.bias},
                                             {"labels", labels},
                                             {"weights", spec.weights},
                                             {"loss", loss},
                                             {"logprobs", stats.logprobs},
                                             {"entropy", stats.entropy},
                                             {"lse", stats.lse},
                                             {"topk_mass", stats.topk_mass},
                                             {"log_sum_sq_probs", stats.log_sum_sq_probs},
                                             {"is_top1", stats.is_top1}});
                           check_head(fn, "", head, -1);
                           check_grads(fn, "", head, grads);
                           check_shard_weight(fn, spec.shard, head);
                         },
                         {grads.hidden.defined(), stats.topk_mass.defined()});
  const int64_t n = head.hidden.shape[0], v = group.global_v();
  if (!labels.defined()) fail(fn, "labels are required");
  check_ce_options(fn, spec);
  const float eps = spec.label_smoothing;
  check_stats(fn, stats, n, v, group.on());
  LabelRun run{
      fn,   group,        head,           read_labels(fn, labels, n, spec.ignore_index, v, true),
      1.0f, spec.softcap, spec.chunk_size};
  int64_t count = 0;
  for (int64_t y : run.labels) count += y >= 0;
  const double divisor = reduce::divisor(fn, spec.reduction, spec.num_items_in_batch, count, n);
  reduce::check_loss_output(fn, loss, spec.reduction, n);
  const std::vector<double> tw = reduce::token_weights(fn, spec.weights, n);
  if (spec.reduction == Reduction::none)
    for (int64_t i = 0; i < n; ++i) elem::set(loss, i, 0.0);
  const double zl = spec.z_loss_scale;
  double total = 0.0;
  run_label_head(
      run, stats, stats.entropy.defined(), eps > 0.0f, grads,
      [&](int64_t i, double lse, double zy, double mean) {
        const double l = tw[i] * ((1.0 - eps) * (lse - zy) + eps * (lse - mean) + zl * lse * lse);
        if (spec.reduction == Reduction::none) elem::set(loss, i, l);
        else total += l;
      },
      // Label smoothing spreads eps over the V' unmasked entries of the row (V' = V without a
      // masked entry): target eps / V' there, 0 at a masked entry (-inf logit, not in the
      // vocabulary), so its loss stays finite.
      [&](int64_t i, double lse, double unmasked, double& a, double& b, double& c, double&) {
        const double s = tw[i] / divisor;
        a = s * (1.0 + 2.0 * zl * lse);
        b = -s * (1.0 - eps);
        // unmasked is 0 without label smoothing (then c = -0 s / V as before).
        c = -s * eps / (unmasked > 0.0 ? unmasked : static_cast<double>(v));
      });
  if (spec.reduction != Reduction::none) elem::set(loss, 0, total / divisor);
}

void fused_linear_logprobs(const LinearHead& head, const TensorView& labels,
                           const LogprobsSpec& spec, const LabelStatsOutputs& stats) {
  constexpr const char* fn = "fused_linear_logprobs";
  const cuda::Placement where =
      cuda::checked_placement(fn, {{"hidden", &head.hidden},
                                   {"weight", &head.weight},
                                   {"bias", &head.bias},
                                   {"labels", &labels},
                                   {"logprobs", &stats.logprobs},
                                   {"entropy", &stats.entropy},
                                   {"lse", &stats.lse},
                                   {"topk_mass", &stats.topk_mass},
                                   {"log_sum_sq_probs", &stats.log_sum_sq_probs},
                                   {"is_top1", &stats.is_top1}});
  if (on_cuda(fn, where, spec.shard)) {
    check_temperature(fn, spec.temperature);
    detail::LabelHeadCudaJob job = cuda_job(fn, head, labels, spec.ignore_index, spec.chunk_size,
                                            spec.stream, spec.check_finite);
    job.temperature = spec.temperature;
    job.stats = stats;
    return run_cuda(job, where);
  }
  const ShardGroup group(fn, spec.shard, rows_of(head.weight),
                         [&] {
                           check::views(fn, {{"hidden", head.hidden},
                                             {"weight", head.weight},
                                             {"bias", head.bias},
                                             {"labels", labels},
                                             {"logprobs", stats.logprobs},
                                             {"entropy", stats.entropy},
                                             {"lse", stats.lse},
                                             {"topk_mass", stats.topk_mass},
                                             {"log_sum_sq_probs", stats.log_sum_sq_probs},
                                             {"is_top1", stats.is_top1}});
                           check_head(fn, "", head, -1);
                           check_shard_weight(fn, spec.shard, head);
                         },
                         {stats.topk_mass.defined()});
  const int64_t n = head.hidden.shape[0], v = group.global_v();
  if (!labels.defined()) fail(fn, "labels are required");
  check_temperature(fn, spec.temperature);
  check_stats(fn, stats, n, v, group.on());
  LabelRun run{fn,
               group,
               head,
               read_labels(fn, labels, n, spec.ignore_index, v, true),
               1.0f / spec.temperature,
               0.0f,
               spec.chunk_size};
  run_label_head(
      run, stats, stats.entropy.defined(), false, {}, [](int64_t, double, double, double) {},
      [](int64_t, double, double, double&, double&, double&, double&) {});
}

void fused_linear_logprobs_backward(const LinearHead& head, const TensorView& labels,
                                    const LogprobsSpec& spec, const TensorView& grad_logprobs,
                                    const TensorView& grad_entropy, const LinearHeadGrads& grads) {
  constexpr const char* fn = "fused_linear_logprobs_backward";
  const cuda::Placement where = cuda::checked_placement(fn, {{"hidden", &head.hidden},
                                                             {"weight", &head.weight},
                                                             {"bias", &head.bias},
                                                             {"grad_hidden", &grads.hidden},
                                                             {"grad_weight", &grads.weight},
                                                             {"grad_bias", &grads.bias},
                                                             {"labels", &labels},
                                                             {"grad_logprobs", &grad_logprobs},
                                                             {"grad_entropy", &grad_entropy}});
  if (on_cuda(fn, where, spec.shard)) {
    check_temperature(fn, spec.temperature);
    detail::LabelHeadCudaJob job = cuda_job(fn, head, labels, spec.ignore_index, spec.chunk_size,
                                            spec.stream, spec.check_finite);
    job.grads = grads;
    job.temperature = spec.temperature;
    job.backward = true;
    job.grad_logprobs = grad_logprobs;
    job.grad_entropy = grad_entropy;
    return run_cuda(job, where);
  }
  const ShardGroup group(fn, spec.shard, rows_of(head.weight),
                         [&] {
                           check::views(fn, {{"hidden", head.hidden},
                                             {"weight", head.weight},
                                             {"bias", head.bias},
                                             {"grad_hidden", grads.hidden},
                                             {"grad_weight", grads.weight},
                                             {"grad_bias", grads.bias},
                                             {"labels", labels},
                                             {"grad_logprobs", grad_logprobs},
                                             {"grad_entropy", grad_entropy}});
                           check_head(fn, "", head, -1);
                           check_grads(fn, "", head, grads);
                           check_shard_weight(fn, spec.shard, head);
                         },
                         {grads.hidden.defined()});
  const int64_t n = head.hidden.shape[0], v = group.global_v();
  if (!labels.defined()) fail(fn, "labels are required");
  check_temperature(fn, spec.temperature);
  std::vector<double> g(static_cast<size_t>(n), 0.0), e;
  if (grad_logprobs.defined()) {
    check::vector_of(fn, "grad_logprobs", grad_logprobs, n, {DType::f32, DType::f64});
    for (int64_t i = 0; i < n; ++i)
      g[i] = grad_logprobs.dtype == DType::f64
                 ? static_cast<const double*>(grad_logprobs.data)[i * grad_logprobs.strides[0]]
                 : elem::load_f32(grad_logprobs.data, DType::f32, i * grad_logprobs.strides[0]);
  }
  if (grad_entropy.defined()) {
    check::vector_of(fn, "grad_entropy", grad_entropy, n, {DType::f32, DType::f64});
    e.resize(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i)
      e[i] = grad_entropy.dtype == DType::f64
                 ? static_cast<const double*>(grad_entropy.data)[i * grad_entropy.strides[0]]
                 : elem::load_f32(grad_entropy.data, DType::f32, i * grad_entropy.strides[0]);
  }
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(g[i]) || (!e.empty() && !std::isfinite(e[i])))
      fail(fn, "grad_logprobs and grad_entropy must be finite (index " + std::to_string(i) + ")");
  LabelRun run{fn,
               group,
               head,
               read_labels(fn, labels, n, spec.ignore_index, v, true),
               1.0f / spec.temperature,
               0.0f,
               spec.chunk_size};
  run_label_head(
      run, {}, !e.empty(), false, grads, [](int64_t, double, double, double) {},
      [&](int64_t i, double, double, double& a, double& b, double& c, double& ee) {
        a = -g[i];
        b = g[i];
        c = 0.0;
        ee = e.empty() ? 0.0 : -e[i];
      },
      /*entropy_coef=*/!e.empty());
}

}  // namespace divkit
