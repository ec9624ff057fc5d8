// divkit::label_rows (fused_linear.h): the label heads' row step on one chunk of logits. The
// argument checks, the CPU path (the CPU row kernels of label_kernels.h, as the fused heads call
// them) and the dispatch to the CUDA kernel (label_cuda.cu) by the tensors' device.
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "core/check.h"
#include "core/cuda_device.h"
#include "core/element.h"
#include "divkit/fused_linear.h"
#include "divkit/runtime.h"
#include "fused_linear/label_cuda.h"
#include "fused_linear/label_kernels.h"
#include "fused_linear/label_scalar.h"

namespace divkit {

namespace detail {

void check_label_rows(const char* fn, const LabelRowsArgs& a) {
  check::views(fn, {{"logits", a.logits},
                    {"labels", a.labels},
                    {"lse", a.lse},
                    {"z_label", a.z_label},
                    {"mean_z", a.mean_z},
                    {"entropy", a.entropy},
                    {"topk_mass", a.topk_mass},
                    {"log_sum_sq", a.log_sum_sq},
                    {"is_top1", a.is_top1},
                    {"unmasked", a.unmasked},
                    {"coef_a0", a.coef_a0},
                    {"coef_a1", a.coef_a1},
                    {"coef_b", a.coef_b},
                    {"coef_c", a.coef_c},
                    {"coef_e", a.coef_e}});
  if (!a.logits.defined()) check::fail(fn, "logits are required");
  check::float_matrix(fn, "logits", cuda::shape_only(a.logits), /*is_output=*/true);
  const int64_t rows = a.logits.shape[0], v = a.logits.shape[1];
  if (v == 0) check::fail(fn, "logits has V = 0 (an empty vocabulary)");
  if (!a.labels.defined()) check::fail(fn, "labels are required");
  check::vector_of(fn, "labels", cuda::shape_only(a.labels), rows, {DType::i64, DType::i32});
  for (auto [t, name] :
       {std::pair{&a.lse, "lse"}, std::pair{&a.z_label, "z_label"}, std::pair{&a.mean_z, "mean_z"},
        std::pair{&a.entropy, "entropy"}, std::pair{&a.topk_mass, "topk_mass"},
        std::pair{&a.log_sum_sq, "log_sum_sq"}, std::pair{&a.is_top1, "is_top1"},
        std::pair{&a.unmasked, "unmasked"}, std::pair{&a.coef_a0, "coef_a0"},
        std::pair{&a.coef_a1, "coef_a1"}, std::pair{&a.coef_b, "coef_b"},
        std::pair{&a.coef_c, "coef_c"}, std::pair{&a.coef_e, "coef_e"}})
    if (t->defined()) check::vector_of(fn, name, cuda::shape_only(*t), rows, {DType::f64});
  const bool grad = a.coef_a0.defined();
  if (grad != a.coef_b.defined() || grad != a.coef_c.defined())
    check::fail(fn, "coef_a0, coef_b and coef_c are given together (the gradient) or not at all");
  if (!grad && (a.coef_a1.defined() || a.coef_e.defined()))
    check::fail(fn, "coef_a1 and coef_e need coef_a0, coef_b and coef_c (the gradient)");
  if (a.topk_mass.defined() && (a.topk < 1 || a.topk > v))
    check::fail(fn, "topk must be in [1, V = " + std::to_string(v) + "], got " +
                        std::to_string(a.topk));
  if (!(a.temperature > 0.0f) || !std::isfinite(a.temperature))
    check::fail(fn, "temperature must be finite and > 0, got " + check::fmt(a.temperature));
  if (!(a.softcap >= 0.0f) || !std::isfinite(a.softcap))
    check::fail(fn,
                "softcap must be finite and >= 0 (0 disables it), got " + check::fmt(a.softcap));
}

namespace {

void label_rows_cpu(const char* fn, const LabelRowsArgs& a) {
  check::dtype_in(fn, "logits", a.logits, {DType::f32});
  const int64_t rows = a.logits.shape[0], v = a.logits.shape[1];
  std::vector<int64_t> labels(static_cast<size_t>(rows));
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t y = elem::index(a.labels, i);
    if (y == a.ignore_index) {
      labels[i] = -1;
      continue;
    }
    if (y < 0 || y >= v)
      check::fail(fn, "labels[" + std::to_string(a.first_token + i) + "] = " + std::to_string(y) +
                          " is out of range [0, " + std::to_string(v) +
                          ") and is not ignore_index (" + std::to_string(a.ignore_index) + ")");
    labels[i] = y;
  }
  const bool grad = a.coef_a0.defined();
  const bool want_entropy = a.entropy.defined() || a.coef_e.defined();
  auto buf = [&](bool on) { return std::vector<double>(on ? static_cast<size_t>(rows) : 0); };
  // The kernels count the unmasked entries where given `unmasked`, and then take mean_z over them.
  const bool count = a.smooth_unmasked || a.unmasked.defined();
  std::vector<double> lse = buf(true), zy = buf(a.z_label.defined()),
                      mean = buf(a.mean_z.defined()), ent = buf(want_entropy),
                      topk = buf(a.topk_mass.defined()), sq = buf(a.log_sum_sq.defined()),
                      top1 = buf(a.is_top1.defined()), cnt = buf(count);
  auto ptr = [](std::vector<double>& x) { return x.empty() ? nullptr : x.data(); };
  detail::LabelForwardJob f;
  f.z = static_cast<float*>(a.logits.data);
  f.ldz = a.logits.strides[0];
  f.rows = rows;
  f.v = v;
  f.labels = labels.data();
  f.inv_t = 1.0f / a.temperature;
  f.softcap = a.softcap;
  f.lse = lse.data();
  f.z_label = ptr(zy);
  f.mean_z = ptr(mean);
  f.entropy = ptr(ent);
  f.topk_mass = ptr(topk);
  f.topk = a.topk;
  f.log_sum_sq = ptr(sq);
  f.is_top1 = ptr(top1);
  f.unmasked = ptr(cnt);
  f.num_threads = get_num_threads();
  detail::label_rows_forward(f);
  if (f.bad_row >= 0)
    check::fail(fn, "the logits of token " + std::to_string(a.first_token + f.bad_row) +
                        " (hidden @ weight^T + bias) are NaN, +inf or all -inf" +
                        (f.inv_t != 1.0f ? ", or overflow float32 once divided by the temperature"
                                         : ""));
  // The count without smooth_unmasked: mean_z over every entry, -inf where one is masked (the
  // kernel's mean over the V' = V entries of a row without one already has the plain mean's bits).
  if (count && !a.smooth_unmasked && !mean.empty())
    for (int64_t i = 0; i < rows; ++i)
      if (labels[i] >= 0 && cnt[i] < static_cast<double>(v))
        mean[i] = -static_cast<double>(std::numeric_limits<float>::infinity());
  for (auto [out, x] :
       {std::pair{&a.lse, &lse}, std::pair{&a.z_label, &zy}, std::pair{&a.mean_z, &mean},
        std::pair{&a.entropy, &ent}, std::pair{&a.topk_mass, &topk}, std::pair{&a.log_sum_sq, &sq},
        std::pair{&a.is_top1, &top1}, std::pair{&a.unmasked, &cnt}})
    if (out->defined())
      for (int64_t i = 0; i < rows; ++i) elem::set(*out, i, (*x)[i]);
  if (!grad) return;
  std::vector<double> ca(rows, 0.0), cb(rows, 0.0), cc(rows, 0.0), ce(rows, 0.0);
  for (int64_t i = 0; i < rows; ++i) {
    if (labels[i] < 0) continue;
    const double a1 = a.coef_a1.defined() ? elem::get(a.coef_a1, i) : 0.0;
    ca[i] = elem::get(a.coef_a0, i) + a1 * lse[i];
    cb[i] = elem::get(a.coef_b, i);
    cc[i] = elem::get(a.coef_c, i);
    if (a.smooth_unmasked) cc[i] = label_scalar::smooth_c(cc[i], v, static_cast<int64_t>(cnt[i]));
    if (a.coef_e.defined()) ce[i] = elem::get(a.coef_e, i);
  }
  detail::LabelGradJob g;
  g.z = f.z;
  g.ldz = f.ldz;
  g.rows = rows;
  g.v = v;
  g.labels = labels.data();
  g.inv_t = f.inv_t;
  g.softcap = a.softcap;
  g.lse = lse.data();
  g.entropy = ptr(ent);
  g.a = ca.data();
  g.b = cb.data();
  g.c = cc.data();
  g.e = a.coef_e.defined() ? ce.data() : nullptr;
  g.c_unmasked = a.smooth_unmasked;
  g.num_threads = f.num_threads;
  detail::label_rows_grad(g);
}

}  // namespace
}  // namespace detail

void label_rows(const char* fn, const LabelRowsArgs& args) {
  detail::check_label_rows(fn, args);
  const cuda::Placement where = cuda::placement(fn, {{"logits", &args.logits},
                                                     {"labels", &args.labels},
                                                     {"lse", &args.lse},
                                                     {"z_label", &args.z_label},
                                                     {"mean_z", &args.mean_z},
                                                     {"entropy", &args.entropy},
                                                     {"topk_mass", &args.topk_mass},
                                                     {"log_sum_sq", &args.log_sum_sq},
                                                     {"is_top1", &args.is_top1},
                                                     {"unmasked", &args.unmasked},
                                                     {"coef_a0", &args.coef_a0},
                                                     {"coef_a1", &args.coef_a1},
                                                     {"coef_b", &args.coef_b},
                                                     {"coef_c", &args.coef_c},
                                                     {"coef_e", &args.coef_e}});
  if (where.device == Device::cuda) {
#if DIVKIT_HAS_CUDA
    return detail::label_rows_cuda(fn, args, where.index);
#else
    cuda::not_built(fn);
#endif
  }
  detail::label_rows_cpu(fn, args);
}

}  // namespace divkit
