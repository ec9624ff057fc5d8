// Row kernels of the distillation methods (include/divkit/distill.h for the formulas).
//
// These losses are used at classification / vocabulary sizes where a plain fp64 loop per row is
// fast enough next to the model; each row is loaded once into an fp64 buffer (the row is the
// unit of work, OpenMP spreads rows with a static schedule, so results do not depend on the
// thread count).
#include "divkit/distill.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "core/check.h"
#include "core/element.h"
#include "core/scalar_math.h"
#include "divkit/runtime.h"

namespace divkit {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// ---- argument checks ---------------------------------------------------------------------
void matrix_in(const char* fn, const char* name, const TensorView& t) {
  if (!t.defined()) check::fail(fn, std::string(name) + " is required");
  check::float_matrix(fn, name, t, false);
}

void same_shape(const char* fn, const char* name, const TensorView& t, const TensorView& ref,
                const char* ref_name) {
  if (t.shape[0] != ref.shape[0] || t.shape[1] != ref.shape[1])
    check::fail(fn, std::string(name) + " has shape " + check::shape_string(t) + ", expected " +
                        check::shape_string(ref) + " (the shape of " + ref_name + ")");
}

void matrix_out(const char* fn, const char* name, const TensorView& t, const TensorView& ref,
                const char* ref_name) {
  check::float_matrix(fn, name, t, true);
  same_shape(fn, name, t, ref, ref_name);
}

// The [N, V] logits of a student and a teacher, of one shape.
void logit_pair(const char* fn, const TensorView& student, const TensorView& teacher) {
  matrix_in(fn, "student_logits", student);
  matrix_in(fn, "teacher_logits", teacher);
  same_shape(fn, "teacher_logits", teacher, student, "student_logits");
}

void real_vec(const char* fn, const char* name, const TensorView& t, int64_t n) {
  check::vector_of(fn, name, t, n, {DType::f32, DType::f64});
}

void positive(const char* fn, const char* name, double x) {
  if (!(std::isfinite(x) && x > 0))
    check::fail(fn, std::string(name) + " must be finite and > 0, got " + std::to_string(x));
}

// Optional labels; `required` methods need the target class of every non-ignored row. Labels
// that only mark ignored rows are range-checked too: a label that is neither ignore_index nor a
// class means the labels and the logits disagree (as divkit.divergence's check).
void check_labels(const char* fn, const TensorView& labels, int64_t n, int64_t v, int64_t ignore,
                  bool required) {
  if (!labels.defined()) {
    if (required) check::fail(fn, "labels is required");
    return;
  }
  check::vector_of(fn, "labels", labels, n, {DType::i32, DType::i64});
  for (int64_t i = 0; i < n; ++i) {
    const int64_t y = elem::index(labels, i);
    if (y != ignore && (y < 0 || y >= v))
      check::fail(fn, "labels[" + std::to_string(i) + "] = " + std::to_string(y) +
                          " is out of range [0, " + std::to_string(v) +
                          ") (and is not "
                          "ignore_index = " +
                          std::to_string(ignore) + ")");
  }
}

bool ignored(const TensorView& labels, int64_t ignore, int64_t i) {
  return labels.defined() && elem::index(labels, i) == ignore;
}

// Output `out` [N] and, with a gradient, `coef` [N].
void check_out_coef(const char* fn, const TensorView& out, const TensorView& coef,
                    const TensorView& grad, int64_t n, const char* out_name = "out",
                    const char* coef_name = "coef") {
  real_vec(fn, out_name, out, n);
  if (grad.defined()) {
    if (!coef.defined())
      check::fail(fn, std::string(coef_name) + " is required when a gradient is asked");
    real_vec(fn, coef_name, coef, n);
  }
}

// Scans the non-ignored rows for NaN / +inf before anything is computed.
void check_finite(const char* fn, const char* name, const TensorView& x, const TensorView& labels,
                  int64_t ignore) {
  const int64_t n = x.shape[0], v = x.shape[1];
  for (int64_t i = 0; i < n; ++i) {
    if (ignored(labels, ignore, i)) continue;
    bool any = false;
    for (int64_t j = 0; j < v; ++j) {
      const double a = elem::get(x, i, j);
      if (std::isnan(a) || a == kInf)
        check::fail(fn, std::string(name) + " has a non-finite value (" +
                            (std::isnan(a) ? "nan" : "+inf") + ") in row " + std::to_string(i));
      any |= a > -kInf;
    }
    if (!any && v > 0)
      check::fail(fn, std::string(name) + " row " + std::to_string(i) +
                          " is all -inf (no probability mass)");
  }
}

void check_finite_pair(const char* fn, const TensorView& student, const TensorView& teacher,
                       const TensorView& labels, int64_t ignore) {
  check_finite(fn, "student_logits", student, labels, ignore);
  check_finite(fn, "teacher_logits", teacher, labels, ignore);
}

// Zeros row i of an optional [N, V] gradient.
void zero_grad_row(const TensorView& grad, int64_t i) {
  if (grad.defined())
    for (int64_t j = 0; j < grad.shape[1]; ++j) elem::set(grad, i, j, 0.0);
}

// Loads row i / T into buf and returns log-sum-exp (log_softmax = buf - lse).
double load_row(const TensorView& x, int64_t i, double inv_t, std::vector<double>& buf) {
  const int64_t v = x.shape[1];
  buf.resize(static_cast<size_t>(v));
  double m = -kInf;
  for (int64_t j = 0; j < v; ++j) {
    buf[j] = elem::get(x, i, j) * inv_t;
    m = std::max(m, buf[j]);
  }
  double s = 0.0;
  for (int64_t j = 0; j < v; ++j) s += std::exp(buf[j] - m);
  return m + std::log(s);
}

template <typename F>
void for_rows(int64_t n, F&& f) {
#pragma omp parallel num_threads(get_num_threads()) if (n > 16)
  {
    std::vector<double> a, b, c;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) f(i, a, b, c);
  }
}

// Counter-based standard normal (splitmix64 of (seed, counter) -> Box-Muller).
uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

double normal_at(uint64_t seed, uint64_t counter) {
  const uint64_t a = splitmix64(seed ^ splitmix64(2 * counter));
  const uint64_t b = splitmix64(seed ^ splitmix64(2 * counter + 1));
  const double u1 = (static_cast<double>(a >> 11) + 0.5) * 0x1.0p-53;  // (0, 1)
  const double u2 = static_cast<double>(b >> 11) * 0x1.0p-53;
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
void row_entropy(const TensorView& logits, double temperature, const TensorView& out) {
  constexpr const char* fn = "row_entropy";
  check::views(fn, {{"logits", logits}, {"out", out}});
  matrix_in(fn, "logits", logits);
  positive(fn, "temperature", temperature);
  const int64_t n = logits.shape[0];
  real_vec(fn, "out", out, n);
  check_finite(fn, "logits", logits, TensorView{}, 0);
  const double inv_t = 1.0 / temperature;
  for_rows(n, [&](int64_t i, std::vector<double>& x, std::vector<double>&, std::vector<double>&) {
    const double lse = load_row(logits, i, inv_t, x);
    double h = 0.0;
    for (double xj : x) {
      const double lp = xj - lse;
      h -= math::xlogy(std::exp(lp), lp);
    }
    elem::set(out, i, h);
  });
}

// ---------------------------------------------------------------------------------------------
void nkd_rows(const TensorView& student, const TensorView& teacher, const TensorView& labels,
              int64_t ignore_index, double tau, const TensorView& target_out,
              const TensorView& nontarget_out, const TensorView& target_coef,
              const TensorView& nontarget_coef, const TensorView& grad_student) {
  constexpr const char* fn = "nkd";
  check::views(fn, {{"student_logits", student},
                    {"teacher_logits", teacher},
                    {"labels", labels},
                    {"target_out", target_out},
                    {"nontarget_out", nontarget_out},
                    {"target_coef", target_coef},
                    {"nontarget_coef", nontarget_coef},
                    {"grad_student", grad_student}});
  logit_pair(fn, student, teacher);
  positive(fn, "temperature", tau);
  const int64_t n = student.shape[0], v = student.shape[1];
  check_labels(fn, labels, n, v, ignore_index, true);
  real_vec(fn, "target_out", target_out, n);
  real_vec(fn, "nontarget_out", nontarget_out, n);
  if (grad_student.defined()) {
    matrix_out(fn, "grad_student", grad_student, student, "student_logits");
    if (!target_coef.defined() || !nontarget_coef.defined())
      check::fail(fn, "target_coef and nontarget_coef are required when a gradient is asked");
    real_vec(fn, "target_coef", target_coef, n);
    real_vec(fn, "nontarget_coef", nontarget_coef, n);
  }
  check_finite_pair(fn, student, teacher, labels, ignore_index);
  const double inv_tau = 1.0 / tau;
  for_rows(n,
           [&](int64_t i, std::vector<double>& s, std::vector<double>& t, std::vector<double>& g) {
             if (ignored(labels, ignore_index, i)) {
               elem::set(target_out, i, 0.0);
               elem::set(nontarget_out, i, 0.0);
               zero_grad_row(grad_student, i);
               return;
             }
             const int64_t y = elem::index(labels, i);
             // Target term at T = 1.
             const double lse_s1 = load_row(student, i, 1.0, s);
             const double lse_t1 = load_row(teacher, i, 1.0, t);
             const double p_y = std::exp(t[y] - lse_t1);
             const double lq_y = s[y] - lse_s1;
             const double target = p_y == 0.0 ? 0.0 : -p_y * lq_y;
             const bool grad = grad_student.defined();
             const double a = grad ? elem::get(target_coef, i) : 0.0;
             const double b = grad ? elem::get(nontarget_coef, i) : 0.0;
             if (grad) {
               g.assign(static_cast<size_t>(v), 0.0);
               if (p_y != 0.0)
                 for (int64_t j = 0; j < v; ++j)
                   g[j] = a * p_y * (std::exp(s[j] - lse_s1) - (j == y));
             }
             // Non-target term at tau: log-sum-exp over j != y.
             double ms = -kInf, mt = -kInf;
             for (int64_t j = 0; j < v; ++j) {
               if (j == y) continue;
               s[j] *= inv_tau;
               t[j] *= inv_tau;
               ms = std::max(ms, s[j]);
               mt = std::max(mt, t[j]);
             }
             double nontarget = 0.0;
             if (v > 1 && mt > -kInf) {
               double ss = 0.0, st = 0.0;
               for (int64_t j = 0; j < v; ++j) {
                 if (j == y) continue;
                 ss += std::exp(s[j] - ms);
                 st += std::exp(t[j] - mt);
               }
               const double lse_s = ms + std::log(ss), lse_t = mt + std::log(st);
               for (int64_t j = 0; j < v; ++j) {
                 if (j == y) continue;
                 const double ph = std::exp(t[j] - lse_t);
                 const double lqh = s[j] - lse_s;
                 nontarget -= math::xlogy(ph, lqh);
                 if (grad) g[j] += b * (std::exp(lqh) - ph) * inv_tau;
               }
             }
             elem::set(target_out, i, target);
             elem::set(nontarget_out, i, nontarget);
             if (grad)
               for (int64_t j = 0; j < v; ++j) elem::set(grad_student, i, j, g[j]);
           });
}

// ---------------------------------------------------------------------------------------------
void ofa_rows(const TensorView& student, const TensorView& teacher, const TensorView& labels,
              int64_t ignore_index, double eps, double temperature, const TensorView& out,
              const TensorView& coef, const TensorView& grad_student) {
  constexpr const char* fn = "ofa_loss";
  check::views(fn, {{"student_logits", student},
                    {"teacher_logits", teacher},
                    {"labels", labels},
                    {"out", out},
                    {"coef", coef},
                    {"grad_student", grad_student}});
  logit_pair(fn, student, teacher);
  positive(fn, "eps", eps);
  positive(fn, "temperature", temperature);
  const int64_t n = student.shape[0], v = student.shape[1];
  check_labels(fn, labels, n, v, ignore_index, true);
  check_out_coef(fn, out, coef, grad_student, n);
  if (grad_student.defined())
    matrix_out(fn, "grad_student", grad_student, student, "student_logits");
  check_finite_pair(fn, student, teacher, labels, ignore_index);
  const double inv_t = 1.0 / temperature;
  for_rows(n,
           [&](int64_t i, std::vector<double>& s, std::vector<double>& t, std::vector<double>& w) {
             if (ignored(labels, ignore_index, i)) {
               elem::set(out, i, 0.0);
               zero_grad_row(grad_student, i);
               return;
             }
             const int64_t y = elem::index(labels, i);
             const double lse_s = load_row(student, i, inv_t, s);
             const double lse_t = load_row(teacher, i, inv_t, t);
             w.resize(static_cast<size_t>(v));
             double loss = 0.0, wsum = 0.0;
             for (int64_t j = 0; j < v; ++j) {
               const double p = std::exp(t[j] - lse_t);
               // (p + e)^eps - e; for the target, expm1(eps log1p(p)) keeps accuracy when p is
               // tiny.
               w[j] = j == y ? std::expm1(eps * std::log1p(p)) : std::pow(p, eps);
               wsum += w[j];
               loss -= math::xlogy(w[j], s[j] - lse_s);
             }
             elem::set(out, i, loss);
             if (grad_student.defined()) {
               const double c = elem::get(coef, i);
               for (int64_t j = 0; j < v; ++j)
                 elem::set(grad_student, i, j, c * (std::exp(s[j] - lse_s) * wsum - w[j]) * inv_t);
             }
           });
}

// ---------------------------------------------------------------------------------------------
void clipped_kl_rows(const TensorView& student, const TensorView& teacher, const TensorView& lower,
                     const TensorView& upper, double temperature, double sharpness,
                     const TensorView& labels, int64_t ignore_index, const TensorView& out,
                     const TensorView& coef, const TensorView& grad_student,
                     const TensorView& grad_lower, const TensorView& grad_upper) {
  constexpr const char* fn = "dac_kl_loss";
  check::views(fn, {{"student_logits", student},
                    {"teacher_logits", teacher},
                    {"lower", lower},
                    {"upper", upper},
                    {"labels", labels},
                    {"out", out},
                    {"coef", coef},
                    {"grad_student", grad_student},
                    {"grad_lower", grad_lower},
                    {"grad_upper", grad_upper}});
  logit_pair(fn, student, teacher);
  positive(fn, "temperature", temperature);
  if (!(std::isfinite(sharpness) && sharpness >= 0))
    check::fail(fn, "sharpness must be finite and >= 0 (0: hard mask), got " +
                        std::to_string(sharpness));
  const int64_t n = student.shape[0], v = student.shape[1];
  check_labels(fn, labels, n, v, ignore_index, false);
  if (!lower.defined() || !upper.defined()) check::fail(fn, "lower and upper are required");
  real_vec(fn, "lower", lower, n);
  real_vec(fn, "upper", upper, n);
  const bool any_grad = grad_student.defined() || grad_lower.defined() || grad_upper.defined();
  real_vec(fn, "out", out, n);
  if (any_grad) {
    if (!coef.defined()) check::fail(fn, "coef is required when a gradient is asked");
    real_vec(fn, "coef", coef, n);
  }
  if (grad_student.defined())
    matrix_out(fn, "grad_student", grad_student, student, "student_logits");
  if (grad_lower.defined()) real_vec(fn, "grad_lower", grad_lower, n);
  if (grad_upper.defined()) real_vec(fn, "grad_upper", grad_upper, n);
  for (int64_t i = 0; i < n; ++i) {
    if (ignored(labels, ignore_index, i)) continue;
    const double lo = elem::get(lower, i), hi = elem::get(upper, i);
    if (!(std::isfinite(lo) && std::isfinite(hi) && lo > 0 && lo < hi))
      check::fail(fn, "row " + std::to_string(i) +
                          ": the bounds must satisfy 0 < lower < upper "
                          "(finite), got lower = " +
                          std::to_string(lo) + ", upper = " + std::to_string(hi));
  }
  check_finite_pair(fn, student, teacher, labels, ignore_index);
  const double inv_t = 1.0 / temperature;
  const bool soft = sharpness > 0;
  for_rows(n, [&](int64_t i, std::vector<double>& s, std::vector<double>& t,
                  std::vector<double>& w) {
    auto no_gradient = [&](double value) {  // the row's loss is `value`, its gradients 0
      elem::set(out, i, value);
      zero_grad_row(grad_student, i);
      elem::put(grad_lower, i, 0.0);
      elem::put(grad_upper, i, 0.0);
    };
    if (ignored(labels, ignore_index, i)) return no_gradient(0.0);
    const double lse_s = load_row(student, i, inv_t, s);
    const double lse_t = load_row(teacher, i, inv_t, t);
    const double lo = elem::get(lower, i), hi = elem::get(upper, i);
    const double llo = std::log(lo), lhi = std::log(hi);
    w.resize(static_cast<size_t>(v));
    // sum w p, sum w p (lp - lq), and the largest log q inside the region: the student may put
    // almost none of its mass there (log q below -745, where q is 0 in double), and the loss is
    // then large but finite, so sum w q is summed relative to that log q (log_b below).
    double a = 0.0, k = 0.0, lq_max = -kInf;
    for (int64_t j = 0; j < v; ++j) {
      const double lp = t[j] - lse_t, lq = s[j] - lse_s;
      if (lp == -kInf) {
        w[j] = 0.0;
        continue;
      }
      const double p = std::exp(lp);
      // The hard mask compares probabilities computed exactly as mass_bounds does, so that its
      // bounds keep their own boundary tokens.
      w[j] = soft ? math::sigmoid((lp - llo) / sharpness) * math::sigmoid((lhi - lp) / sharpness)
                  : (p >= lo && p <= hi ? 1.0 : 0.0);
      a += w[j] * p;
      if (w[j] > 0 && p > 0) k += w[j] * p * (lp - lq);
      if (w[j] > 0) lq_max = std::max(lq_max, lq);
    }
    if (a == 0.0) return no_gradient(0.0);
    if (lq_max == -kInf) return no_gradient(kInf);  // no student mass in the region
    double b_rel = 0.0;                             // sum w q / e^lq_max
    for (int64_t j = 0; j < v; ++j)
      if (w[j] > 0) b_rel += w[j] * std::exp(s[j] - lse_s - lq_max);
    const double log_b = lq_max + std::log(b_rel);
    k /= a;
    elem::set(out, i, k - std::log(a) + log_b);
    if (!any_grad) return;
    const double c = elem::get(coef, i);
    double glo = 0.0, ghi = 0.0;
    for (int64_t j = 0; j < v; ++j) {
      const double lp = t[j] - lse_t, lq = s[j] - lse_s;
      const double p = std::exp(lp);
      // w q / b <= 1, from logs: q / b alone overflows outside the region where log_b is far
      // below the student's max.
      const double wq_b = w[j] > 0 ? std::exp(std::log(w[j]) + lq - log_b) : 0.0;
      if (grad_student.defined()) elem::set(grad_student, i, j, c * (wq_b - w[j] * p / a) * inv_t);
      if (soft && w[j] > 0) {
        // w_j dL/dw_j, then the chain rule through the two sigmoids of the soft mask.
        const double w_dl_dw = (p > 0 ? w[j] * p * (lp - lq - k - 1.0) / a : 0.0) + wq_b;
        const double s_lo = math::sigmoid((lp - llo) / sharpness);
        const double s_hi = math::sigmoid((lhi - lp) / sharpness);
        glo -= w_dl_dw * (1.0 - s_lo) / (sharpness * lo);
        ghi += w_dl_dw * (1.0 - s_hi) / (sharpness * hi);
      }
    }
    elem::put(grad_lower, i, c * glo);
    elem::put(grad_upper, i, c * ghi);
  });
}

void mass_bounds(const TensorView& teacher, double temperature, double mass_lo, double mass_hi,
                 const TensorView& lower, const TensorView& upper) {
  constexpr const char* fn = "mass_bounds";
  check::views(fn, {{"teacher_logits", teacher}, {"lower", lower}, {"upper", upper}});
  matrix_in(fn, "teacher_logits", teacher);
  positive(fn, "temperature", temperature);
  if (!(mass_lo >= 0 && mass_lo < mass_hi && mass_hi <= 1))
    check::fail(fn, "mass_lo and mass_hi must satisfy 0 <= mass_lo < mass_hi <= 1, got " +
                        std::to_string(mass_lo) + " and " + std::to_string(mass_hi));
  const int64_t n = teacher.shape[0], v = teacher.shape[1];
  if (v == 0) check::fail(fn, "teacher_logits has V = 0");
  real_vec(fn, "lower", lower, n);
  real_vec(fn, "upper", upper, n);
  check_finite(fn, "teacher_logits", teacher, TensorView{}, 0);
  const double inv_t = 1.0 / temperature;
  for_rows(n, [&](int64_t i, std::vector<double>& t, std::vector<double>&, std::vector<double>&) {
    const double lse = load_row(teacher, i, inv_t, t);
    for (double& x : t) x = std::exp(x - lse);
    std::sort(t.begin(), t.end(), std::greater<double>());
    double before = 0.0, hi = -1.0, lo = -1.0;
    for (int64_t k = 0; k < v; ++k) {
      if (before >= mass_lo && before < mass_hi && t[k] > 0) {
        if (hi < 0) hi = t[k];
        lo = t[k];
      }
      before += t[k];
    }
    if (hi < 0) hi = lo = t[0];  // rounding left nothing in [mass_lo, mass_hi): the top token
    // float32 bounds are rounded outward (lower down, upper up): rounded to nearest, they could
    // land inside the kept probabilities, and clipped_kl_rows, which compares the float64
    // probabilities with them, would drop the boundary tokens (the top one among them).
    if (lower.dtype == DType::f32) {
      const float f = static_cast<float>(lo);
      elem::set(lower, i, f > lo ? std::nextafter(f, 0.0f) : f);
    } else {
      elem::set(lower, i, lo);
    }
    if (upper.dtype == DType::f32) {
      const float f = static_cast<float>(hi);
      elem::set(upper, i, f < hi ? std::nextafter(f, std::numeric_limits<float>::infinity()) : f);
    } else {
      elem::set(upper, i, hi);
    }
  });
}

void sorted_probs(const TensorView& teacher, double temperature, const TensorView& out) {
  constexpr const char* fn = "sorted_probs";
  check::views(fn, {{"teacher_logits", teacher}, {"out", out}});
  matrix_in(fn, "teacher_logits", teacher);
  positive(fn, "temperature", temperature);
  const int64_t n = teacher.shape[0], v = teacher.shape[1];
  check::float_matrix(fn, "out", out, true);
  if (out.shape[0] != n)
    check::fail(fn,
                "out has " + std::to_string(out.shape[0]) + " rows, expected " + std::to_string(n));
  if (out.dtype != DType::f32 && out.dtype != DType::f64)
    check::fail(fn, std::string("out must be float32 or float64, got ") + dtype_name(out.dtype));
  const int64_t k = out.shape[1];
  check_finite(fn, "teacher_logits", teacher, TensorView{}, 0);
  const double inv_t = 1.0 / temperature;
  for_rows(n, [&](int64_t i, std::vector<double>& t, std::vector<double>&, std::vector<double>&) {
    const double lse = load_row(teacher, i, inv_t, t);
    for (double& x : t) x = std::exp(x - lse);
    const int64_t m = std::min(k, v);
    std::partial_sort(t.begin(), t.begin() + m, t.end(), std::greater<double>());
    for (int64_t j = 0; j < k; ++j) elem::set(out, i, j, j < m ? t[j] : 0.0);
  });
}

// ---------------------------------------------------------------------------------------------
void tempered_kl_rows(const TensorView& student, const TensorView& teacher,
                      const TensorView& temperatures, double noise_std, uint64_t seed,
                      const TensorView& labels, int64_t ignore_index, const TensorView& out,
                      const TensorView& coef, const TensorView& grad_student) {
  constexpr const char* fn = "swing_loss";
  check::views(fn, {{"student_logits", student},
                    {"teacher_logits", teacher},
                    {"temperatures", temperatures},
                    {"labels", labels},
                    {"out", out},
                    {"coef", coef},
                    {"grad_student", grad_student}});
  logit_pair(fn, student, teacher);
  if (!(std::isfinite(noise_std) && noise_std >= 0))
    check::fail(fn, "noise_std must be finite and >= 0, got " + std::to_string(noise_std));
  const int64_t n = student.shape[0], v = student.shape[1];
  check_labels(fn, labels, n, v, ignore_index, false);
  if (!temperatures.defined()) check::fail(fn, "temperatures is required");
  real_vec(fn, "temperatures", temperatures, n);
  check_out_coef(fn, out, coef, grad_student, n);
  if (grad_student.defined())
    matrix_out(fn, "grad_student", grad_student, student, "student_logits");
  for (int64_t i = 0; i < n; ++i) {
    if (ignored(labels, ignore_index, i)) continue;
    const double ti = elem::get(temperatures, i);
    if (!(std::isfinite(ti) && ti > 0))
      check::fail(fn, "temperatures[" + std::to_string(i) + "] must be finite and > 0, got " +
                          std::to_string(ti));
  }
  check_finite_pair(fn, student, teacher, labels, ignore_index);
  for_rows(n, [&](int64_t i, std::vector<double>& s, std::vector<double>& t, std::vector<double>&) {
    if (ignored(labels, ignore_index, i)) {
      elem::set(out, i, 0.0);
      zero_grad_row(grad_student, i);
      return;
    }
    const double inv_t = 1.0 / elem::get(temperatures, i);
    const double lse_s = load_row(student, i, inv_t, s);
    t.resize(static_cast<size_t>(v));
    double m = -kInf;
    for (int64_t j = 0; j < v; ++j) {
      t[j] = elem::get(teacher, i, j) * inv_t;
      if (noise_std > 0 && t[j] > -kInf)
        t[j] += noise_std * normal_at(seed, static_cast<uint64_t>(i * v + j));
      m = std::max(m, t[j]);
    }
    double se = 0.0;
    for (int64_t j = 0; j < v; ++j) se += std::exp(t[j] - m);
    const double lse_t = m + std::log(se);
    double loss = 0.0;
    for (int64_t j = 0; j < v; ++j) {
      const double lp = t[j] - lse_t;
      const double p = std::exp(lp);
      if (p > 0) loss += p * (lp - (s[j] - lse_s));
    }
    elem::set(out, i, loss);
    if (grad_student.defined()) {
      const double c = elem::get(coef, i);
      for (int64_t j = 0; j < v; ++j)
        elem::set(grad_student, i, j,
                  c * (std::exp(s[j] - lse_s) - std::exp(t[j] - lse_t)) * inv_t);
    }
  });
}

void swing_noise(uint64_t seed, const TensorView& out) {
  constexpr const char* fn = "swing_noise";
  check::views(fn, {{"out", out}});
  check::float_matrix(fn, "out", out, true);
  const int64_t n = out.shape[0], v = out.shape[1];
  for_rows(n, [&](int64_t i, std::vector<double>&, std::vector<double>&, std::vector<double>&) {
    for (int64_t j = 0; j < v; ++j)
      elem::set(out, i, j, normal_at(seed, static_cast<uint64_t>(i * v + j)));
  });
}

// ---------------------------------------------------------------------------------------------
void selective_contrast(const TensorView& standard, const TensorView& lame, double lame_weight,
                        double std_threshold, double filter_ratio, const TensorView& out,
                        const TensorView& uncertainty, const TensorView& applied) {
  constexpr const char* fn = "uscd";
  check::views(fn, {{"standard_logits", standard},
                    {"lame_logits", lame},
                    {"out", out},
                    {"uncertainty", uncertainty},
                    {"applied", applied}});
  matrix_in(fn, "standard_logits", standard);
  matrix_in(fn, "lame_logits", lame);
  same_shape(fn, "lame_logits", lame, standard, "standard_logits");
  if (!(std::isfinite(lame_weight) && lame_weight >= 0))
    check::fail(fn, "lame_weight must be finite and >= 0, got " + std::to_string(lame_weight));
  if (std::isnan(std_threshold)) check::fail(fn, "std_threshold must not be nan");
  if (!(std::isfinite(filter_ratio) && filter_ratio >= 0))
    check::fail(fn, "filter_ratio must be finite and >= 0, got " + std::to_string(filter_ratio));
  const int64_t n = standard.shape[0], v = standard.shape[1];
  matrix_out(fn, "out", out, standard, "standard_logits");
  real_vec(fn, "uncertainty", uncertainty, n);
  if (applied.defined())
    check::vector_of(fn, "applied", applied, n, {DType::f32, DType::f64, DType::i32, DType::i64});
  check_finite(fn, "standard_logits", standard, TensorView{}, 0);
  check_finite(fn, "lame_logits", lame, TensorView{}, 0);
  for_rows(n, [&](int64_t i, std::vector<double>& s, std::vector<double>& l,
                  std::vector<double>& p) {
    const double lse_s = load_row(standard, i, 1.0, s);
    p.resize(static_cast<size_t>(v));
    double mean = 0.0;
    for (int64_t j = 0; j < v; ++j) mean += (p[j] = std::exp(s[j] - lse_s));
    mean /= static_cast<double>(v);
    double ss = 0.0;  // the sample standard deviation (n - 1), as torch.std in the official code
    for (double pj : p) ss += (pj - mean) * (pj - mean);
    const double sd = v > 1 ? std::sqrt(ss / static_cast<double>(v - 1)) : 0.0;
    elem::set(uncertainty, i, sd);
    // A flat (uncertain) distribution has a small standard deviation.
    const bool apply = !(sd > std_threshold);
    if (applied.defined()) elem::set(applied, i, apply ? 1.0 : 0.0);
    if (!apply) {
      for (int64_t j = 0; j < v; ++j) elem::set(out, i, j, s[j] - lse_s);
      return;
    }
    const double lse_l = load_row(lame, i, 1.0, l);
    const double cut = filter_ratio * mean;
    for (int64_t j = 0; j < v; ++j) {
      const double lp = s[j] - lse_s, ll = l[j] - lse_l;
      double o = -kInf;
      if (lp > -kInf && p[j] >= cut) {
        // log(p - w p_lame) = lp + log1p(-w exp(ll - lp)); a non-positive difference is -inf.
        const double r = lame_weight * std::exp(ll - lp);
        if (r < 1.0) o = lp + std::log1p(-r);
      }
      elem::set(out, i, j, o);
    }
  });
}

}  // namespace divkit
