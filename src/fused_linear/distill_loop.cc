// The fused distillation losses (fused_linear.h): the chunk loop of student GEMM -> soft term
// (divergence(), or its vocabulary-parallel phases) -> hard-label CE -> gradient GEMMs.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "core/check.h"
#include "core/cuda_device.h"
#include "divkit/fused_linear.h"
#include "divkit/runtime.h"
#include "divkit/sparse.h"
#include "fused_linear/arguments.h"
#include "fused_linear/distill_loop_cuda.h"
#include "fused_linear/head_grads.h"
#include "fused_linear/label_kernels.h"
#include "fused_linear/vocab_parallel.h"
#include "fused_linear/weight_blocks.h"

namespace divkit {

using check::fail;
using namespace fused;

namespace {

// The rows K of a keep buffer of FusedLabelTerms ([K, V] fp32 contiguous, K <= n), 0 if absent.
int64_t kept_rows(const char* fn, const char* name, const TensorView& t, int64_t n, int64_t v) {
  if (!t.defined()) return 0;
  if (t.dtype != DType::f32 || t.ndim != 2 || t.shape[1] != v || t.shape[0] > n ||
      t.strides[1] != 1 || t.strides[0] != v)
    fail(fn, std::string(name) + " must be a contiguous fp32 [K <= N, V = " + std::to_string(v) +
                 "] array, got " + check::shape_string(t));
  return t.shape[0];
}

// The logits of rows [r0, r0 + rows): from the keep buffer when it holds them and was filled,
// else by the GEMM (`compute(dst)`), copied into the keep buffer when it should hold them.
// Returns where they are: `buf`, or, when the call only reads them (`read_only`: no gradient is
// written over them), the keep buffer itself, which spares the copies in and out of `buf`.
template <class Compute>
float* kept_or_computed(const TensorView& kept, int64_t k, bool filled, int64_t r0, int64_t rows,
                        int64_t v, float* buf, bool read_only, Compute&& compute) {
  const bool inside = k > 0 && r0 + rows <= k;
  float* keep = inside ? static_cast<float*>(kept.data) + r0 * v : nullptr;
  const size_t bytes = static_cast<size_t>(rows * v) * sizeof(float);
  if (keep && read_only) {
    if (!filled) compute(keep);
    return keep;
  }
  if (keep && filled) {
    std::memcpy(buf, keep, bytes);
    return buf;
  }
  compute(buf);
  if (keep) std::memcpy(keep, buf, bytes);
  return buf;
}

// A [chunk, V] fp32 buffer of the chunk loop, left uninitialized (every chunk writes the rows it
// reads): a std::vector would zero hundreds of MiB per call only to overwrite them. Not from the
// host cache: its free blocks stay resident after the call and would add to the peak memory of
// whatever runs next (the caller's backward), which the fused heads exist to keep low.
class ChunkBuffer {
 public:
  void allocate(int64_t floats) {
    p_.reset(new float[static_cast<size_t>(std::max<int64_t>(floats, 1))]);
  }
  float* data() const { return p_.get(); }
  bool empty() const { return p_ == nullptr; }
  void free() { p_.reset(); }

 private:
  std::unique_ptr<float[]> p_;
};

// The label statistics (lse, z_y) of an unsharded chunk of logits at temperature 1. With
// per-row coefficients a, b (a hard term's hw, -hw), the rows become the gradient
// a p + b 1[y] + add in the same sweep (label_kernels.h).
void label_stats(const char* fn, const char* what, float* z, int64_t rows, int64_t v,
                 const int64_t* labels, int64_t r0, double* lse, double* zy,
                 const double* a = nullptr, const double* b = nullptr, const float* add = nullptr) {
  struct Coefs {
    const double *a, *b;
  } coefs{a, b};
  detail::LabelForwardJob f;
  if (a != nullptr) {
    f.coef_ctx = &coefs;
    f.coef = [](void* p, int64_t r, double, double* ca, double* cb, double* cc, double*) {
      const Coefs& k = *static_cast<const Coefs*>(p);
      *ca = k.a[r];
      *cb = k.b[r];
      *cc = 0.0;
    };
    f.add = add;
    f.ldadd = v;
  }
  f.z = z;
  f.ldz = v;
  f.rows = rows;
  f.v = v;
  f.labels = labels;
  f.lse = lse;
  f.z_label = zy;
  f.num_threads = get_num_threads();
  detail::label_rows_forward(f);
  if (f.bad_row >= 0)
    fail(fn, std::string("the ") + what + " logits of token " + std::to_string(r0 + f.bad_row) +
                 " are NaN, +inf or all -inf");
}

// One chunk's soft (teacher) term, called by distill_chunks: given the student logits of rows
// [r0, r0 + rows) in `ls` ([rows, v]) and the per-row weights soft_weight * w_i / divisor (0 for
// ignored rows), adds each row's weighted soft loss to row_loss and, when grad_out is not null,
// writes the soft term's d loss / d logits there ([rows, v], may alias ls). `teacher` is a
// [chunk, v] buffer for the teacher's logits (empty when distill_chunks was told none is needed).
using SoftTerm = void(int64_t r0, int64_t rows, float* ls, float* grad_out,
                      const double* row_weight, double* row_loss, float* teacher);

// The chunk loop shared by the distillation losses: student GEMM, the soft term, the optional
// hard-label CE (T = 1) and the student's gradient GEMMs. `after_loop` runs once the chunk
// buffers are freed, before the student's gradients are written out: the caller finishes its own
// (teacher) gradients there, so that no fp32 weight gradient shares the peak with the chunks.
// With a vocabulary-parallel group, v is the shard's and every row statistic is combined over the
// group (the soft term does so itself).
template <class Soft, class AfterLoop>
void distill_chunks(const char* fn, const ShardGroup& group, const LinearHead& student, int64_t v,
                    const DivergenceOptions& options, const FusedLinearOptions& fused,
                    const TensorView& loss, const LinearHeadGrads& student_grads,
                    bool teacher_buffer, Soft&& soft, AfterLoop&& after_loop) {
  const int64_t n = student.hidden.shape[0], hs = student.weight.shape[1];
  if (!std::isfinite(fused.hard_weight) || !std::isfinite(fused.soft_weight))
    fail(fn, "hard_weight and soft_weight must be finite");
  const FusedLabelTerms& terms = fused.terms;
  const bool per_token_hard = terms.hard_weights.defined();
  const bool hard = fused.hard_weight != 0.0f || per_token_hard;
  const bool soft_on = fused.soft_weight != 0.0f;
  // The student's label statistics: for the hard term, or as an output.
  const bool stats_s = hard || terms.student_logprobs.defined();
  if (group.on() &&
      (per_token_hard || terms.student_logprobs.defined() || terms.teacher_logprobs.defined() ||
       terms.kept_student.defined() || terms.kept_teacher.defined()))
    fail(fn,
         "label log-probs, per-token hard weights and kept logits are not supported with a "
         "vocabulary-parallel shard");
  if (stats_s && !options.labels.defined())
    fail(fn, fused.hard_weight != 0.0f ? "hard_weight != 0 needs labels"
                                       : "hard_weights and student_logprobs need labels");
  const std::vector<int64_t> labels =
      read_labels(fn, options.labels, n, options.ignore_index, group.global_v(),
                  /*need_range=*/stats_s || terms.teacher_logprobs.defined());
  std::vector<double> hard_w;
  if (per_token_hard) {
    check::vector_of(fn, "hard_weights", terms.hard_weights, n, {DType::f32, DType::f64});
    hard_w.resize(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      hard_w[i] = elem::get(terms.hard_weights, i);
      if (!std::isfinite(hard_w[i]))
        fail(fn, "hard_weights must be finite, got " + check::fmt(hard_w[i]) + " at index " +
                     std::to_string(i));
    }
  }
  if (terms.student_logprobs.defined())
    check::vector_of(fn, "student_logprobs", terms.student_logprobs, n, {DType::f32, DType::f64});
  const int64_t kept_s = kept_rows(fn, "kept_student", terms.kept_student, n, v);
  const std::vector<double> token_weight = reduce::token_weights(fn, options.weights, n);
  int64_t count = 0;
  for (int64_t y : labels) count += y >= 0;
  const double divisor =
      reduce::divisor(fn, options.reduction, options.num_items_in_batch, count, n);
  reduce::check_loss_output(fn, loss, options.reduction, n);

  const int threads = get_num_threads();
  const bool sharded = group.on();
  // A shard's weight was checked by the caller, before the group agreed that every rank's was.
  WeightBlocks ws(fn, "student_weight", student.weight, v, nullptr, threads, /*check=*/!sharded);
  const std::vector<float> bs = bias_f32(student.bias, nullptr, v);
  HeadGradAccumulator acc_s(student, student_grads, &ws, v, nullptr, &group);
  const bool want_s = acc_s.wanted();
  if (fused.terms.accumulate_weight_grads) {
    if (group.on()) fail(fn, "accumulate_weight_grads is not supported with a shard");
    if (student_grads.weight.defined() && !is_direct_f32(student_grads.weight))
      fail(fn, "accumulate_weight_grads needs grad_student_weight as a contiguous fp32 array");
    acc_s.set_accumulate(true);
  }

  // Every rank of a group chooses the same chunk size (from the largest shard).
  const int64_t chunk = choose_chunk(fused.chunk_size, n, group.max_v());
  ChunkBuffer ls;
  ls.allocate(chunk * v);
  // The soft term's gradient, when the hard term still needs ls (and always for a shard: its
  // gradient phase writes beside the logits, not over them).
  ChunkBuffer gsoft;
  if (soft_on && want_s && (hard || sharded)) gsoft.allocate(chunk * v);
  std::vector<int64_t> local;  // a shard's labels as its columns
  std::vector<uint8_t> in_shard;
  ChunkBuffer lt;  // the teacher's logits
  if (teacher_buffer && soft_on) lt.allocate(chunk * v);
  std::vector<double> row_loss(static_cast<size_t>(chunk)), row_weight(static_cast<size_t>(chunk));
  std::vector<double> lse(static_cast<size_t>(chunk)), zy(static_cast<size_t>(chunk));
  std::vector<double> ca(static_cast<size_t>(chunk)), cb(static_cast<size_t>(chunk)),
      cc(static_cast<size_t>(chunk), 0.0);
  std::vector<float> scratch;
  F32Matrix hs_c;
  double total = 0.0;

  for (int64_t r0 = 0; r0 < n; r0 += chunk) {
    const int64_t rows = std::min(chunk, n - r0);
    to_f32_rows(fn, "student_hidden", student.hidden, r0, rows, nullptr, hs_c);
    float* const lsp = kept_or_computed(terms.kept_student, kept_s, terms.kept_filled, r0, rows, v,
                                        ls.data(), !want_s, [&](float* dst) {
                                          chunk_logits(hs_c, rows, ws, v, hs, bs, dst);
                                        });
    std::fill(row_loss.begin(), row_loss.end(), 0.0);
    // Without the hard term the student's statistics only read the logits: taken before the soft
    // term writes its gradient over them.
    const bool stats_first = stats_s && !hard;
    if (stats_first) {
      label_stats(fn, "student", lsp, rows, v, labels.data() + r0, r0, lse.data(), zy.data());
      for (int64_t r = 0; r < rows; ++r)
        elem::set(terms.student_logprobs, r0 + r, labels[r0 + r] < 0 ? 0.0 : zy[r] - lse[r]);
    }
    if (soft_on) {
      for (int64_t r = 0; r < rows; ++r)
        row_weight[r] =
            labels[r0 + r] < 0 ? 0.0 : fused.soft_weight * token_weight[r0 + r] / divisor;
      float* grad_out = want_s ? (gsoft.empty() ? lsp : gsoft.data()) : nullptr;
      try {
        soft(r0, rows, lsp, grad_out, row_weight.data(), row_loss.data(), lt.data());
      } catch (const Error& e) {
        rethrow_chunk(fn, e, r0);
      }
    }
    // Plain CE of the student logits (T = 1): lse - z_y; its gradient hw (p - 1[y]) is
    // written over ls plus the soft term's gradient (unsharded: in the statistics' sweep).
    const bool fuse_hard = hard && want_s && !sharded;
    auto hard_weight_of = [&](int64_t r) {
      return labels[r0 + r] < 0 ? 0.0
             : per_token_hard   ? hard_w[r0 + r]
                                : fused.hard_weight * token_weight[r0 + r] / divisor;
    };
    if (fuse_hard)
      for (int64_t r = 0; r < rows; ++r) {
        ca[r] = hard_weight_of(r);
        cb[r] = -ca[r];
      }
    if (stats_s && !stats_first) {
      if (sharded) {
        ShardedLabelStats st;
        st.lse = lse.data();
        st.z_label = zy.data();
        sharded_label_forward(fn, group, lsp, rows, v, labels.data() + r0, 1.0f, 0.0f, r0, st,
                              threads);
        local_labels(group, labels.data() + r0, rows, v, local, in_shard);
      } else {
        label_stats(fn, "student", lsp, rows, v, labels.data() + r0, r0, lse.data(), zy.data(),
                    fuse_hard ? ca.data() : nullptr, cb.data(),
                    gsoft.empty() ? nullptr : gsoft.data());
      }
      if (terms.student_logprobs.defined())
        for (int64_t r = 0; r < rows; ++r)
          elem::set(terms.student_logprobs, r0 + r, labels[r0 + r] < 0 ? 0.0 : zy[r] - lse[r]);
    }
    if (hard) {
      for (int64_t r = 0; r < rows; ++r) {
        const double hw = hard_weight_of(r);
        if (labels[r0 + r] >= 0) row_loss[r] += hw * (lse[r] - zy[r]);
        ca[r] = hw;
        cb[r] = sharded && !in_shard[r] ? 0.0 : -hw;  // the one-hot term is the label's rank's
      }
      if (want_s && !fuse_hard) {
        detail::LabelGradJob g;
        g.z = lsp;
        g.ldz = v;
        g.rows = rows;
        g.v = v;
        g.labels = sharded ? local.data() : labels.data() + r0;
        g.lse = lse.data();
        g.a = ca.data();
        g.b = cb.data();
        g.c = cc.data();
        g.add = gsoft.empty() ? nullptr : gsoft.data();
        g.ldadd = v;
        g.num_threads = threads;
        detail::label_rows_grad(g);
      }
    } else if (want_s && !soft_on) {
      std::fill(lsp, lsp + rows * v, 0.0f);
    }
    for (int64_t r = 0; r < rows; ++r) {
      if (options.reduction == Reduction::none) elem::set(loss, r0 + r, row_loss[r]);
      else total += row_loss[r];
    }
    // Without the hard term a shard's soft gradient is in gsoft.
    if (want_s)
      acc_s.add_chunk(sharded && soft_on && !hard ? gsoft.data() : lsp, v, r0, rows, hs_c, scratch);
  }
  if (options.reduction != Reduction::none) elem::set(loss, 0, total);
  for (ChunkBuffer* b : {&ls, &gsoft, &lt}) b->free();
  std::vector<float>().swap(scratch);
  ws.release();
  after_loop();
  acc_s.finish();
}

}  // namespace

void fused_linear_divergence(const LinearHead& student, const LinearHead& teacher,
                             const DivergenceSpec& spec, const DivergenceOptions& options,
                             const FusedLinearOptions& fused, const TensorView& loss,
                             const LinearHeadGrads& student_grads,
                             const LinearHeadGrads& teacher_grads) {
  constexpr const char* fn = "fused_linear_divergence";
  const cuda::Placement where =
      cuda::checked_placement(fn, {{"student_hidden", &student.hidden},
                                   {"student_weight", &student.weight},
                                   {"student_bias", &student.bias},
                                   {"grad_student_hidden", &student_grads.hidden},
                                   {"grad_student_weight", &student_grads.weight},
                                   {"grad_student_bias", &student_grads.bias},
                                   {"teacher_hidden", &teacher.hidden},
                                   {"teacher_weight", &teacher.weight},
                                   {"teacher_bias", &teacher.bias},
                                   {"grad_teacher_hidden", &teacher_grads.hidden},
                                   {"grad_teacher_weight", &teacher_grads.weight},
                                   {"grad_teacher_bias", &teacher_grads.bias},
                                   {"labels", &options.labels},
                                   {"weights", &options.weights},
                                   {"teacher_token_ids", &fused.teacher_token_ids},
                                   {"loss", &loss}});
  if (where.device == Device::cuda) {
#if DIVKIT_HAS_CUDA
    if (fused.shard.active())
      fail(fn,
           "a vocabulary-parallel shard is not supported on CUDA views by the C++ core (the "
           "Python package's process_group= path runs it on CUDA tensors)");
    return detail::distill_head_cuda(student, teacher, spec, options, fused, loss, student_grads,
                                     teacher_grads, where.index);
#else
    cuda::not_built(fn);
#endif
  }
  check::divergence_spec(fn, spec);
  const int64_t v =
      student.weight.defined() && student.weight.ndim == 2 ? student.weight.shape[0] : 0;
  const bool sharded = fused.shard.active();
  std::vector<int64_t> token_ids;  // the teacher's vocabulary as seen by the student
  const bool mapped = fused.teacher_token_ids.defined();
  // The checks whose outcome may differ between the ranks of a group (the shards) run before the
  // group agrees on the layout.
  const ShardGroup group(
      fn, fused.shard, v,
      [&] {
        check::views(fn, {{"student_hidden", student.hidden},
                          {"student_weight", student.weight},
                          {"student_bias", student.bias},
                          {"grad_student_hidden", student_grads.hidden},
                          {"grad_student_weight", student_grads.weight},
                          {"grad_student_bias", student_grads.bias},
                          {"teacher_hidden", teacher.hidden},
                          {"teacher_weight", teacher.weight},
                          {"teacher_bias", teacher.bias},
                          {"grad_teacher_hidden", teacher_grads.hidden},
                          {"grad_teacher_weight", teacher_grads.weight},
                          {"grad_teacher_bias", teacher_grads.bias},
                          {"labels", options.labels},
                          {"weights", options.weights},
                          {"teacher_token_ids", fused.teacher_token_ids},
                          {"loss", loss}});
        check_head(fn, "student_", student, -1);
        check_head(fn, "teacher_", teacher, student.hidden.shape[0]);
        check_grads(fn, "student_", student, student_grads);
        check_grads(fn, "teacher_", teacher, teacher_grads);
        const int64_t vt = teacher.weight.shape[0];
        if (mapped && sharded)
          fail(fn,
               "teacher_token_ids is not supported with a vocabulary-parallel shard (shard the "
               "teacher's vocabulary like the student's)");
        if (mapped) {
          check::vector_of(fn, "teacher_token_ids", fused.teacher_token_ids, v,
                           {DType::i64, DType::i32});
          token_ids.resize(static_cast<size_t>(v));
          for (int64_t j = 0; j < v; ++j) {
            token_ids[j] = elem::index(fused.teacher_token_ids, j);
            if (token_ids[j] < 0 || token_ids[j] >= vt)
              fail(fn, "teacher_token_ids[" + std::to_string(j) +
                           "] = " + std::to_string(token_ids[j]) +
                           " is out of the teacher's vocabulary [0, " + std::to_string(vt) + ")");
          }
        } else if (vt != v && sharded) {
          fail(fn, "student_weight has " + std::to_string(v) +
                       " rows on this rank and teacher_weight " + std::to_string(vt) +
                       ": the vocabulary shards must match");
        } else if (vt != v) {
          fail(fn, "student_weight has V = " + std::to_string(v) + " rows and teacher_weight " +
                       std::to_string(vt) +
                       ": the vocabularies differ; pass teacher_token_ids (a mapping, "
                       "or 0..V_student-1 to truncate the teacher's)");
        }
        if (sharded) {
          check_finite_rows(fn, "student_weight", student.weight, v, nullptr, get_num_threads());
          check_finite_rows(fn, "teacher_weight", teacher.weight, v, nullptr, get_num_threads());
        }
      },
      {student_grads.hidden.defined(), teacher_grads.hidden.defined()});
  const int64_t ht = teacher.weight.shape[1];
  WeightBlocks wt(fn, "teacher_weight", teacher.weight, v, mapped ? &token_ids : nullptr,
                  get_num_threads(), /*check=*/!sharded);
  F32Matrix ht_c;
  const std::vector<float> bt = bias_f32(teacher.bias, mapped ? &token_ids : nullptr, v);
  HeadGradAccumulator acc_t(teacher, teacher_grads, &wt, v, mapped ? &token_ids : nullptr, &group);
  const bool want_t = acc_t.wanted();
  std::vector<float> scratch, grad_t;  // grad_t: a shard's teacher gradient (beside its logits)
  const FusedLabelTerms& terms = fused.terms;
  const int64_t n = student.hidden.shape[0];
  const int64_t kept_t = sharded ? 0 : kept_rows(fn, "kept_teacher", terms.kept_teacher, n, v);
  const bool teacher_lp = terms.teacher_logprobs.defined() && !sharded;
  std::vector<int64_t> t_labels;
  std::vector<double> t_lse, t_zy;
  if (teacher_lp) {
    if (fused.soft_weight == 0.0f) fail(fn, "teacher_logprobs needs soft_weight != 0");
    check::vector_of(fn, "teacher_logprobs", terms.teacher_logprobs, n, {DType::f32, DType::f64});
    if (!options.labels.defined()) fail(fn, "teacher_logprobs needs labels");
    t_labels = read_labels(fn, options.labels, n, options.ignore_index, v, true);
  }

  distill_chunks(
      fn, group, student, v, options, fused, loss, student_grads, /*teacher_buffer=*/true,
      [&](int64_t r0, int64_t rows, float* ls, float* grad_out, const double* row_weight,
          double* row_loss, float* lt) {
        to_f32_rows(fn, "teacher_hidden", teacher.hidden, r0, rows, nullptr, ht_c);
        lt = kept_or_computed(terms.kept_teacher, kept_t, terms.kept_filled, r0, rows, v, lt,
                              !want_t,
                              [&](float* dst) { chunk_logits(ht_c, rows, wt, v, ht, bt, dst); });
        if (teacher_lp) {
          // Before divergence(), which may write the teacher's gradient over lt.
          t_lse.resize(static_cast<size_t>(rows));
          t_zy.resize(static_cast<size_t>(rows));
          label_stats(fn, "teacher", lt, rows, v, t_labels.data() + r0, r0, t_lse.data(),
                      t_zy.data());
          for (int64_t r = 0; r < rows; ++r)
            elem::set(terms.teacher_logprobs, r0 + r,
                      t_labels[r0 + r] < 0 ? 0.0 : t_zy[r] - t_lse[r]);
        }
        const TensorView lsv = TensorView::matrix(ls, DType::f32, rows, v);
        const TensorView ltv = TensorView::matrix(lt, DType::f32, rows, v);
        const TensorView gsv =
            grad_out ? TensorView::matrix(grad_out, DType::f32, rows, v) : TensorView{};
        if (sharded) {
          const std::vector<int64_t> lab = read_labels(fn, row_slice(options.labels, r0, rows),
                                                       rows, options.ignore_index, 0, false);
          std::vector<uint8_t> active(static_cast<size_t>(rows));
          for (int64_t r = 0; r < rows; ++r) active[r] = lab[r] >= 0;
          if (want_t) grad_t.resize(static_cast<size_t>(rows * v));
          const TensorView gtv =
              want_t ? TensorView::matrix(grad_t.data(), DType::f32, rows, v) : TensorView{};
          sharded_divergence_rows(fn, group, lsv, ltv, spec, active, row_weight, row_loss, gsv,
                                  gtv);
          if (want_t) acc_t.add_chunk(grad_t.data(), v, r0, rows, ht_c, scratch);
          return;
        }
        DivergenceOptions o;
        o.reduction = Reduction::none;
        o.weights = TensorView::vector(const_cast<double*>(row_weight), DType::f64, rows);
        o.labels = row_slice(options.labels, r0, rows);
        o.ignore_index = options.ignore_index;
        DivergenceOutputs out;
        out.loss = TensorView::vector(row_loss, DType::f64, rows);
        out.grad_student = gsv;
        if (want_t) out.grad_teacher = ltv;
        divergence(lsv, ltv, spec, o, out);
        if (want_t) acc_t.add_chunk(lt, v, r0, rows, ht_c, scratch);
      },
      [&] {
        std::vector<float>().swap(scratch);
        std::vector<float>().swap(grad_t);
        wt.release();
        acc_t.finish();
      });
}

void fused_linear_sparse_divergence(const LinearHead& student, const TensorView& teacher_indices,
                                    const TensorView& teacher_logprobs, const DivergenceSpec& spec,
                                    const SparseOptions& sparse, const DivergenceOptions& options,
                                    const FusedLinearOptions& fused, const TensorView& loss,
                                    const LinearHeadGrads& student_grads) {
  constexpr const char* fn = "fused_linear_sparse_divergence";
  const cuda::Placement where =
      cuda::checked_placement(fn, {{"student_hidden", &student.hidden},
                                   {"student_weight", &student.weight},
                                   {"student_bias", &student.bias},
                                   {"grad_student_hidden", &student_grads.hidden},
                                   {"grad_student_weight", &student_grads.weight},
                                   {"grad_student_bias", &student_grads.bias},
                                   {"teacher_indices", &teacher_indices},
                                   {"teacher_logprobs", &teacher_logprobs},
                                   {"labels", &options.labels},
                                   {"weights", &options.weights},
                                   {"teacher_token_ids", &fused.teacher_token_ids},
                                   {"loss", &loss}});
  if (where.device == Device::cuda) {
#if DIVKIT_HAS_CUDA
    if (fused.shard.active())
      fail(fn, "a vocabulary-parallel shard is not supported with a sparse teacher");
    return detail::sparse_distill_head_cuda(student, teacher_indices, teacher_logprobs, spec,
                                            sparse, options, fused, loss, student_grads,
                                            where.index);
#else
    cuda::not_built(fn);
#endif
  }
  check::views(fn, {{"student_hidden", student.hidden},
                    {"student_weight", student.weight},
                    {"student_bias", student.bias},
                    {"grad_student_hidden", student_grads.hidden},
                    {"grad_student_weight", student_grads.weight},
                    {"grad_student_bias", student_grads.bias},
                    {"teacher_indices", teacher_indices},
                    {"teacher_logprobs", teacher_logprobs},
                    {"labels", options.labels},
                    {"weights", options.weights},
                    {"teacher_token_ids", fused.teacher_token_ids},
                    {"loss", loss}});
  check::divergence_spec(fn, spec);
  check_head(fn, "student_", student, -1);
  check_grads(fn, "student_", student, student_grads);
  if (fused.teacher_token_ids.defined())
    fail(fn,
         "teacher_token_ids is not used with a sparse teacher (its indices are the student's token "
         "ids)");
  if (fused.shard.active())
    fail(fn, "a vocabulary-parallel shard is not supported with a sparse teacher");
  const int64_t n = student.hidden.shape[0], v = student.weight.shape[0];
  if (!teacher_indices.defined() || !teacher_logprobs.defined())
    fail(fn, "teacher_indices and teacher_logprobs are required");
  if (teacher_indices.ndim != 2 || teacher_indices.shape[0] != n)
    fail(fn, "teacher_indices must be [N = " + std::to_string(n) + ", k], got " +
                 check::shape_string(teacher_indices));
  if (teacher_logprobs.ndim != 2 || teacher_logprobs.shape[0] != n)
    fail(fn, "teacher_logprobs must be [N = " + std::to_string(n) + ", k], got " +
                 check::shape_string(teacher_logprobs));
  // The teacher rows are checked chunk by chunk by sparse_divergence (an error names the chunk's
  // first token and the row within it); the outputs are only complete after the last chunk.
  distill_chunks(
      fn, ShardGroup(v), student, v, options, fused, loss, student_grads, /*teacher_buffer=*/false,
      [&](int64_t r0, int64_t rows, float* ls, float* grad_out, const double* row_weight,
          double* row_loss, float*) {
        DivergenceOptions o;
        o.reduction = Reduction::none;
        o.weights = TensorView::vector(const_cast<double*>(row_weight), DType::f64, rows);
        o.labels = row_slice(options.labels, r0, rows);
        o.ignore_index = options.ignore_index;
        SparseOutputs out;
        out.loss = TensorView::vector(row_loss, DType::f64, rows);
        if (grad_out) out.grad_student = TensorView::matrix(grad_out, DType::f32, rows, v);
        sparse_divergence(TensorView::matrix(ls, DType::f32, rows, v),
                          row_slice(teacher_indices, r0, rows),
                          row_slice(teacher_logprobs, r0, rows), spec, sparse, o, out);
      },
      [] {});
}
}  // namespace divkit
