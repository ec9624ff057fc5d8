// RLHF utilities and the sample-based preference losses: see include/divkit/rlhf.h.
//
// Serial fp64 loops over small batches (rewards, sequence log-probs): deterministic, no threads.
#include "divkit/rlhf.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "core/check.h"
#include "core/element.h"
#include "core/scalar_math.h"

namespace divkit {
namespace {

using math::kMaxExp;
using math::log_sigmoid;
using math::sigmoid;

double upstream(const TensorView& g, int64_t i) { return g.defined() ? elem::get(g, i) : 1.0; }

// ---- argument checks ------------------------------------------------------------------------
void vec(const char* fn, const char* name, const TensorView& t, int64_t n, bool optional = false) {
  if (optional && !t.defined()) return;
  if (!t.defined()) check::fail(fn, std::string(name) + " is required");
  check::vector_of(fn, name, t, n, {DType::f32, DType::f64});
}
int64_t length_of(const char* fn, const char* name, const TensorView& t) {
  if (!t.defined()) check::fail(fn, std::string(name) + " is required");
  if (t.ndim != 1)
    check::fail(fn, std::string(name) + " must be 1-D [N], got shape " + check::shape_string(t));
  return t.shape[0];
}
void mat(const char* fn, const char* name, const TensorView& t, int64_t rows, int64_t cols,
         bool optional = false, bool int64 = false) {
  if (optional && !t.defined()) return;
  const std::string arg(name);
  if (!t.defined()) check::fail(fn, arg + " is required");
  if (t.device != Device::cpu) check::fail(fn, arg + " must be on the CPU");
  if (t.ndim != 2 || t.shape[0] != rows || t.shape[1] != cols)
    check::fail(fn, arg + " must have shape [" + std::to_string(rows) + ", " +
                        std::to_string(cols) + "], got " + check::shape_string(t));
  if (int64 ? t.dtype != DType::i64 : (t.dtype != DType::f32 && t.dtype != DType::f64))
    check::fail(fn, arg + (int64 ? " must be int64" : " must be float32 or float64") + ", got " +
                        dtype_name(t.dtype));
  if (rows * cols > 0 && t.data == nullptr) check::fail(fn, arg + " has a null data pointer");
}
void shape2(const char* fn, const char* name, const TensorView& t, int64_t& rows, int64_t& cols,
            bool nonempty) {
  if (!t.defined()) check::fail(fn, std::string(name) + " is required");
  if (t.ndim != 2)
    check::fail(fn, std::string(name) + " must be 2-D, got shape " + check::shape_string(t));
  rows = t.shape[0];
  cols = t.shape[1];
  if (nonempty && (rows == 0 || cols == 0))
    check::fail(fn, std::string(name) + " is empty, got shape " + check::shape_string(t));
  mat(fn, name, t, rows, cols);
}
void finite_param(const char* fn, const char* name, double x) {
  if (!std::isfinite(x))
    check::fail(fn, std::string(name) + " must be finite, got " + std::to_string(x));
}
void finite_values2(const char* fn, const char* name, const TensorView& t) {
  for (int64_t i = 0; i < t.shape[0]; ++i)
    for (int64_t j = 0; j < t.shape[1]; ++j)
      if (!std::isfinite(elem::get(t, i, j)))
        check::fail(fn, std::string(name) + " must be finite, got " +
                            std::to_string(elem::get(t, i, j)) + " at [" + std::to_string(i) +
                            ", " + std::to_string(j) + "]");
}
void finite_values1(const char* fn, const char* name, const TensorView& t) {
  for (int64_t i = 0; i < t.shape[0]; ++i)
    if (!std::isfinite(elem::get(t, i)))
      check::fail(fn, std::string(name) + " must be finite, got " +
                          std::to_string(elem::get(t, i)) + " at index " + std::to_string(i));
}

}  // namespace

KlEstimator parse_kl_estimator(std::string_view name) {
  if (name == "k1" || name == "kl") return KlEstimator::k1;
  if (name == "k2" || name == "mse") return KlEstimator::k2;
  if (name == "k3" || name == "low_var_kl") return KlEstimator::k3;
  if (name == "abs") return KlEstimator::abs;
  throw Error("kl_estimator: unknown kind '" + std::string(name) +
              "' (valid: k1, k2, k3, abs, kl, mse, low_var_kl)");
}

void kl_estimator(const TensorView& logprobs, const TensorView& ref_logprobs, KlEstimator kind,
                  bool clamp, const TensorView& out, const TensorView& grad_out,
                  const TensorView& grad_logprobs, const TensorView& grad_ref) {
  constexpr const char* fn = "kl_estimator";
  check::views(fn, {{"logprobs", logprobs},
                    {"ref_logprobs", ref_logprobs},
                    {"out", out},
                    {"grad_out", grad_out},
                    {"grad_logprobs", grad_logprobs},
                    {"grad_ref", grad_ref}});
  const int64_t n = length_of(fn, "logprobs", logprobs);
  vec(fn, "logprobs", logprobs, n);
  vec(fn, "ref_logprobs", ref_logprobs, n);
  vec(fn, "out", out, n);
  vec(fn, "grad_out", grad_out, n, true);
  vec(fn, "grad_logprobs", grad_logprobs, n, true);
  vec(fn, "grad_ref", grad_ref, n, true);
  for (int64_t i = 0; i < n; ++i) {
    double r = elem::get(ref_logprobs, i) - elem::get(logprobs, i);
    double v = 0, dr = 0;  // value and d value / d r
    switch (kind) {
      case KlEstimator::k1:
        v = -r;
        dr = -1;
        break;
      case KlEstimator::k2:
        v = 0.5 * r * r;
        dr = r;
        break;
      case KlEstimator::abs:
        v = std::abs(r);
        dr = r > 0 ? 1.0 : (r < 0 ? -1.0 : 0.0);
        break;
      case KlEstimator::k3: {
        bool active = false;
        if (clamp && (r < -20.0 || r > 20.0)) {
          r = std::clamp(r, -20.0, 20.0);
          active = true;
        }
        // expm1(r) - r: no cancellation near r = 0.
        v = std::expm1(r) - r;
        dr = active ? 0.0 : std::expm1(r);
        if (clamp && (v < -10.0 || v > 10.0)) {
          v = std::clamp(v, -10.0, 10.0);
          dr = 0.0;
        }
        break;
      }
    }
    elem::put(out, i, v);
    const double g = upstream(grad_out, i) * dr;
    elem::put(grad_logprobs, i, -g);
    elem::put(grad_ref, i, g);
  }
}

EnsembleMethod parse_ensemble_method(std::string_view name) {
  if (name == "mean") return EnsembleMethod::mean;
  if (name == "wco") return EnsembleMethod::wco;
  if (name == "uwo") return EnsembleMethod::uwo;
  throw Error("ensemble_rewards: unknown method '" + std::string(name) +
              "' (valid: mean, wco, uwo)");
}

void ensemble_rewards(const TensorView& rewards, EnsembleMethod method, double uwo_lambda,
                      const TensorView& out, const TensorView& grad_out,
                      const TensorView& grad_rewards) {
  constexpr const char* fn = "ensemble_rewards";
  check::views(
      fn,
      {{"rewards", rewards}, {"out", out}, {"grad_out", grad_out}, {"grad_rewards", grad_rewards}});
  int64_t n = 0, e = 0;
  shape2(fn, "rewards", rewards, n, e, false);
  if (e == 0) check::fail(fn, "rewards has an empty ensemble dimension");
  finite_param(fn, "uwo_lambda", uwo_lambda);
  vec(fn, "out", out, n);
  vec(fn, "grad_out", grad_out, n, true);
  mat(fn, "grad_rewards", grad_rewards, n, e, true);
  for (int64_t i = 0; i < n; ++i) {
    const double g = upstream(grad_out, i);
    double mean = 0;
    for (int64_t j = 0; j < e; ++j) mean += elem::get(rewards, i, j);
    mean /= static_cast<double>(e);
    if (method == EnsembleMethod::mean) {
      elem::put(out, i, mean);
      for (int64_t j = 0; j < e; ++j) elem::put(grad_rewards, i, j, g / static_cast<double>(e));
    } else if (method == EnsembleMethod::wco) {
      int64_t k = 0;
      for (int64_t j = 1; j < e; ++j)
        if (elem::get(rewards, i, j) < elem::get(rewards, i, k)) k = j;
      elem::put(out, i, elem::get(rewards, i, k));
      for (int64_t j = 0; j < e; ++j) elem::put(grad_rewards, i, j, j == k ? g : 0.0);
    } else {
      double var = 0;  // two passes: no cancellation of E[R^2] - E[R]^2
      for (int64_t j = 0; j < e; ++j) {
        const double d = elem::get(rewards, i, j) - mean;
        var += d * d;
      }
      var /= static_cast<double>(e);
      elem::put(out, i, mean - uwo_lambda * var);
      for (int64_t j = 0; j < e; ++j)
        elem::put(grad_rewards, i, j,
                  g * (1.0 - 2.0 * uwo_lambda * (elem::get(rewards, i, j) - mean)) /
                      static_cast<double>(e));
    }
  }
}

void calibrate_reward(const TensorView& rewards, const TensorView& ref_rewards,
                      const TensorView& out) {
  constexpr const char* fn = "calibrate_reward";
  check::views(fn, {{"rewards", rewards}, {"ref_rewards", ref_rewards}, {"out", out}});
  int64_t b = 0, m = 0, b2 = 0, nn = 0;
  shape2(fn, "ref_rewards", ref_rewards, b, m, false);
  if (m == 0) check::fail(fn, "ref_rewards must have M >= 1 reference samples per prompt");
  shape2(fn, "rewards", rewards, b2, nn, false);
  if (b2 != b)
    check::fail(fn, "rewards has " + std::to_string(b2) + " rows, ref_rewards " +
                        std::to_string(b) + "; batch sizes disagree");
  mat(fn, "out", out, b, nn);
  std::vector<double> sorted(static_cast<size_t>(m));
  for (int64_t i = 0; i < b; ++i) {
    for (int64_t j = 0; j < m; ++j) {
      sorted[j] = elem::get(ref_rewards, i, j);
      if (std::isnan(sorted[j]))
        check::fail(fn, "ref_rewards has a NaN in row " + std::to_string(i));
    }
    std::sort(sorted.begin(), sorted.end());
    for (int64_t j = 0; j < nn; ++j) {
      const double r = elem::get(rewards, i, j);
      // #{ref <= r}; a NaN reward compares false with everything: 0.
      const auto cnt = std::upper_bound(sorted.begin(), sorted.end(), r) - sorted.begin();
      elem::put(out, i, j, std::isnan(r) ? 0.0 : static_cast<double>(cnt) / static_cast<double>(m));
    }
  }
}

void infalign_transform(const TensorView& calibrated, double t, const TensorView& out,
                        const TensorView& grad_out, const TensorView& grad_calibrated) {
  constexpr const char* fn = "infalign_transform";
  check::views(fn, {{"calibrated", calibrated},
                    {"out", out},
                    {"grad_out", grad_out},
                    {"grad_calibrated", grad_calibrated}});
  finite_param(fn, "t", t);
  const int64_t n = length_of(fn, "calibrated", calibrated);
  vec(fn, "calibrated", calibrated, n);
  vec(fn, "out", out, n);
  vec(fn, "grad_out", grad_out, n, true);
  vec(fn, "grad_calibrated", grad_calibrated, n, true);
  for (int64_t i = 0; i < n; ++i) {
    const double x = t * elem::get(calibrated, i);
    const bool capped = x > kMaxExp;
    const double v = std::exp(capped ? kMaxExp : x);
    elem::put(out, i, v);
    elem::put(grad_calibrated, i, capped ? 0.0 : upstream(grad_out, i) * t * v);
  }
}

void best_of_n(const TensorView& rewards, const TensorView& indices, const TensorView& best) {
  constexpr const char* fn = "best_of_n";
  check::views(fn, {{"rewards", rewards}, {"indices", indices}, {"best", best}});
  int64_t b = 0, n = 0;
  shape2(fn, "rewards", rewards, b, n, false);
  if (n == 0) check::fail(fn, "rewards must be [B, N] with N >= 1");
  check::vector_of(fn, "indices", indices, b, {DType::i64});
  vec(fn, "best", best, b, true);
  for (int64_t i = 0; i < b; ++i) {
    int64_t k = 0;
    for (int64_t j = 0; j < n; ++j) {
      const double r = elem::get(rewards, i, j);
      if (std::isnan(r))
        check::fail(fn,
                    "rewards has a NaN at [" + std::to_string(i) + ", " + std::to_string(j) + "]");
      if (r > elem::get(rewards, i, k)) k = j;  // strict: the first maximum wins ties
    }
    reinterpret_cast<int64_t*>(indices.data)[i * indices.strides[0]] = k;
    elem::put(best, i, elem::get(rewards, i, k));
  }
}

void d2o_loss(const TensorView& ps, const TensorView& rs, const TensorView& pl,
              const TensorView& rl, double beta, double alpha, const TensorView& losses,
              const TensorView& sample_rewards, const TensorView& rejected_rewards,
              const D2OGrads& g) {
  constexpr const char* fn = "d2o_loss";
  check::views(fn, {{"policy_sample_logps", ps},
                    {"ref_sample_logps", rs},
                    {"policy_rejected_logps", pl},
                    {"ref_rejected_logps", rl},
                    {"losses", losses},
                    {"sample_rewards", sample_rewards},
                    {"rejected_rewards", rejected_rewards},
                    {"grad_out", g.grad_out},
                    {"grad_policy_samples", g.grad_policy_samples},
                    {"grad_ref_samples", g.grad_ref_samples},
                    {"grad_policy_rejected", g.grad_policy_rejected},
                    {"grad_ref_rejected", g.grad_ref_rejected}});
  int64_t b = 0, k = 0;
  shape2(fn, "policy_sample_logps", ps, b, k, true);
  mat(fn, "ref_sample_logps", rs, b, k);
  vec(fn, "policy_rejected_logps", pl, b);
  vec(fn, "ref_rejected_logps", rl, b);
  if (!(beta > 0) || !std::isfinite(beta))
    check::fail(fn, "beta must be a finite number > 0, got " + std::to_string(beta));
  finite_param(fn, "alpha", alpha);
  finite_values2(fn, "policy_sample_logps", ps);
  finite_values2(fn, "ref_sample_logps", rs);
  finite_values1(fn, "policy_rejected_logps", pl);
  finite_values1(fn, "ref_rejected_logps", rl);
  vec(fn, "losses", losses, b);
  vec(fn, "sample_rewards", sample_rewards, b, true);
  vec(fn, "rejected_rewards", rejected_rewards, b, true);
  vec(fn, "grad_out", g.grad_out, b, true);
  mat(fn, "grad_policy_samples", g.grad_policy_samples, b, k, true);
  mat(fn, "grad_ref_samples", g.grad_ref_samples, b, k, true);
  vec(fn, "grad_policy_rejected", g.grad_policy_rejected, b, true);
  vec(fn, "grad_ref_rejected", g.grad_ref_rejected, b, true);
  const double c = beta / static_cast<double>(k);
  for (int64_t i = 0; i < b; ++i) {
    double s = 0;
    for (int64_t j = 0; j < k; ++j) s += elem::get(ps, i, j) - elem::get(rs, i, j);
    const double pos = c * s, neg = alpha * (elem::get(pl, i) - elem::get(rl, i)), z = pos - neg;
    elem::put(losses, i, -log_sigmoid(z));
    elem::put(sample_rewards, i, pos);
    elem::put(rejected_rewards, i, neg);
    const double dz = -upstream(g.grad_out, i) * sigmoid(-z);  // d(-logsig z)/dz = -sigma(-z)
    for (int64_t j = 0; j < k; ++j) {
      elem::put(g.grad_policy_samples, i, j, dz * c);
      elem::put(g.grad_ref_samples, i, j, -dz * c);
    }
    elem::put(g.grad_policy_rejected, i, -dz * alpha);
    elem::put(g.grad_ref_rejected, i, dz * alpha);
  }
}

void hypo_online_kl(const TensorView& ps, const TensorView& rs, const TensorView& kl,
                    const TensorView& grad_out, const TensorView& grad_ps) {
  constexpr const char* fn = "hypo_online_kl";
  check::views(fn, {{"policy_sample_logps", ps},
                    {"ref_sample_logps", rs},
                    {"kl", kl},
                    {"grad_out", grad_out},
                    {"grad_policy_samples", grad_ps}});
  int64_t b = 0, k = 0;
  shape2(fn, "policy_sample_logps", ps, b, k, true);
  if (k < 2)
    check::fail(
        fn,
        "policy_sample_logps needs k >= 2 samples per prompt for the leave-one-out baseline, got " +
            std::to_string(k));
  mat(fn, "ref_sample_logps", rs, b, k);
  vec(fn, "kl", kl, b);
  vec(fn, "grad_out", grad_out, b, true);
  mat(fn, "grad_policy_samples", grad_ps, b, k, true);
  std::vector<double> r(static_cast<size_t>(k));
  for (int64_t i = 0; i < b; ++i) {
    double s = 0;
    for (int64_t j = 0; j < k; ++j) s += (r[j] = elem::get(ps, i, j) - elem::get(rs, i, j));
    elem::put(kl, i, s / static_cast<double>(k));
    if (!grad_ps.defined()) continue;
    const double g = upstream(grad_out, i) / static_cast<double>(k);
    for (int64_t j = 0; j < k; ++j)
      elem::put(grad_ps, i, j, g * (r[j] - (s - r[j]) / static_cast<double>(k - 1)));
  }
}

void superhf_loss(const TensorView& logps, const TensorView& rewards, const TensorView& kl,
                  const TensorView& lengths, double kl_coef, int64_t top_k, const TensorView& loss,
                  const TensorView& indices, const TensorView& grad_out,
                  const TensorView& grad_logps, const TensorView& grad_kl) {
  constexpr const char* fn = "superhf_loss";
  check::views(fn, {{"policy_logps", logps},
                    {"rewards", rewards},
                    {"kl", kl},
                    {"lengths", lengths},
                    {"loss", loss},
                    {"indices", indices},
                    {"grad_out", grad_out},
                    {"grad_policy_logps", grad_logps},
                    {"grad_kl", grad_kl}});
  int64_t b = 0, n = 0;
  shape2(fn, "policy_logps", logps, b, n, true);
  mat(fn, "rewards", rewards, b, n);
  mat(fn, "kl", kl, b, n);
  if (lengths.defined()) {
    if (lengths.ndim != 2 || lengths.shape[0] != b || lengths.shape[1] != n)
      check::fail(fn, "lengths must have shape [" + std::to_string(b) + ", " + std::to_string(n) +
                          "], got " + check::shape_string(lengths));
    for (int64_t i = 0; i < b; ++i)
      for (int64_t j = 0; j < n; ++j)
        if (!(elem::get(lengths, i, j) > 0))
          check::fail(fn, "lengths must be > 0, got " + std::to_string(elem::get(lengths, i, j)));
  }
  if (top_k < 1 || top_k > n)
    check::fail(fn,
                "top_k must be in [1, " + std::to_string(n) + "], got " + std::to_string(top_k));
  finite_param(fn, "kl_coef", kl_coef);
  for (int64_t i = 0; i < b; ++i)
    for (int64_t j = 0; j < n; ++j)
      if (std::isnan(elem::get(rewards, i, j)))
        check::fail(fn, "rewards has a NaN in row " + std::to_string(i));
  vec(fn, "loss", loss, 1);
  mat(fn, "indices", indices, b, top_k, false, true);
  vec(fn, "grad_out", grad_out, 1, true);
  mat(fn, "grad_policy_logps", grad_logps, b, n, true);
  mat(fn, "grad_kl", grad_kl, b, n, true);
  const double inv = 1.0 / static_cast<double>(b * top_k);
  const double g = upstream(grad_out, 0);
  double nll = 0, klsum = 0;
  std::vector<int64_t> order(static_cast<size_t>(n));
  for (int64_t i = 0; i < b; ++i) {
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) {
      return elem::get(rewards, i, x) > elem::get(rewards, i, y);
    });
    for (int64_t j = 0; j < n; ++j) {
      elem::put(grad_logps, i, j, 0.0);
      elem::put(grad_kl, i, j, 0.0);
    }
    for (int64_t q = 0; q < top_k; ++q) {
      const int64_t j = order[q];
      reinterpret_cast<int64_t*>(indices.data)[i * indices.strides[0] + q * indices.strides[1]] = j;
      const double len = lengths.defined() ? elem::get(lengths, i, j) : 1.0;
      nll += -elem::get(logps, i, j) / len;
      klsum += elem::get(kl, i, j);
      elem::put(grad_logps, i, j, -g * inv / len);
      elem::put(grad_kl, i, j, g * inv * kl_coef);
    }
  }
  elem::put(loss, 0, nll * inv + kl_coef * klsum * inv);
}

}  // namespace divkit
