// Gaussian KDE log-density, held-out / leave-one-out log-likelihood and the KL-optimal bandwidth
// (see include/divkit/kde.h). fp64 throughout; O((n + m) d) memory; OpenMP over query points,
// each reduced in data order and the per-point values summed in point order (deterministic).
#include "divkit/kde.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "core/check.h"
#include "core/element.h"
#include "divkit/runtime.h"

namespace divkit {
namespace {

using check::fail;
using check::shape_string;

constexpr double kLog2Pi = 1.8378770664093454835606594728112;

struct Points {
  int64_t n = 0, d = 0;
  std::vector<double> p;  // [n][d]
};

Points load_points(const char* fn, const char* name, const TensorView& x) {
  const std::string arg(name);
  if (x.device != Device::cpu) fail(fn, arg + " must be on the CPU");
  if (x.ndim != 2) fail(fn, arg + " must be 2-D [n, d], got shape " + shape_string(x));
  if (x.dtype != DType::f32 && x.dtype != DType::f64)
    fail(fn, arg + " must be float32 or float64, got " + dtype_name(x.dtype));
  if (x.shape[0] < 1) fail(fn, arg + " must have at least one point");
  if (x.shape[1] < 1) fail(fn, arg + " must have at least one coordinate");
  Points c;
  c.n = x.shape[0];
  c.d = x.shape[1];
  c.p.resize(static_cast<size_t>(c.n * c.d));
  for (int64_t i = 0; i < c.n; ++i)
    for (int64_t k = 0; k < c.d; ++k) {
      const double v = elem::get(x, i, k);
      if (!std::isfinite(v))
        fail(fn, arg + " has a non-finite value (NaN or inf) at [" + std::to_string(i) + ", " +
                     std::to_string(k) + "]");
      c.p[static_cast<size_t>(i * c.d + k)] = v;
    }
  return c;
}

// log w_i (-inf for w_i = 0), or log 1 when w is not given.
std::vector<double> load_log_weights(const char* fn, const TensorView& w, int64_t n) {
  std::vector<double> lw(static_cast<size_t>(n), 0.0);
  if (!w.defined()) return lw;
  if (w.device != Device::cpu) fail(fn, "w must be on the CPU");
  if (w.ndim != 1 || w.shape[0] != n)
    fail(fn, "w must have shape [" + std::to_string(n) + "], got " + shape_string(w));
  if (w.dtype != DType::f32 && w.dtype != DType::f64)
    fail(fn, std::string("w must be float32 or float64, got ") + dtype_name(w.dtype));
  double s = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double v = elem::get(w, i);
    if (!std::isfinite(v) || v < 0)
      fail(fn, "w must be finite and >= 0, got " + std::to_string(v) + " at [" + std::to_string(i) +
                   "]");
    lw[static_cast<size_t>(i)] = std::log(v);
    s += v;
  }
  if (!(s > 0)) fail(fn, "w sums to 0");
  return lw;
}

void check_bandwidth(const char* fn, double h) {
  if (!(std::isfinite(h) && h > 0))
    fail(fn, "bandwidth must be finite and > 0, got " + std::to_string(h));
}

// Streaming log-sum-exp: one pass, the running maximum rescales the running sum.
struct Lse {
  double m = -std::numeric_limits<double>::infinity(), s = 0;
  void add(double t) {
    if (t == -std::numeric_limits<double>::infinity()) return;
    if (t > m) {
      s = s * std::exp(m - t) + 1.0;
      m = t;
    } else {
      s += std::exp(t - m);
    }
  }
  double value() const {
    return s > 0 ? m + std::log(s) : -std::numeric_limits<double>::infinity();
  }
};

struct Kde {
  const Points& x;
  const std::vector<double>& lw;

  // log p_h(q) with point `skip` left out (skip < 0: none); log_norm: log of the weights' total
  // (without that point) plus the Gaussian's log normalizer.
  double log_density(const double* q, double inv2h2, double log_norm, int64_t skip) const {
    Lse acc;
    const int64_t d = x.d;
    for (int64_t i = 0; i < x.n; ++i) {
      if (i == skip) continue;
      const double* xi = x.p.data() + i * d;
      double r2 = 0;
      for (int64_t k = 0; k < d; ++k) r2 += (q[k] - xi[k]) * (q[k] - xi[k]);
      acc.add(lw[static_cast<size_t>(i)] - r2 * inv2h2);
    }
    return acc.value() - log_norm;
  }
};

double log_total(const std::vector<double>& lw, int64_t skip) {
  Lse acc;
  for (size_t i = 0; i < lw.size(); ++i)
    if (static_cast<int64_t>(i) != skip) acc.add(lw[i]);
  return acc.value();
}

// Per-point log-densities of the queries (held-out) or of the data (leave-one-out).
void log_densities(const Points& x, const std::vector<double>& lw, const Points* y, double h,
                   std::vector<double>& out) {
  const double inv2h2 = 1.0 / (2.0 * h * h);
  const double log_gauss = 0.5 * static_cast<double>(x.d) * (kLog2Pi + 2.0 * std::log(h));
  const double lwt = log_total(lw, -1);
  const Kde kde{x, lw};
  const int64_t m = y ? y->n : x.n;
  out.assign(static_cast<size_t>(m), 0.0);
  // Leave-one-out normalizers: log(W - w_j), computed stably from the log weights.
  std::vector<double> loo_norm;
  if (!y) {
    loo_norm.resize(static_cast<size_t>(m));
    for (int64_t j = 0; j < m; ++j) {
      const double wj = std::exp(lw[static_cast<size_t>(j)] - lwt);  // w_j / W
      loo_norm[static_cast<size_t>(j)] =
          wj < 1.0 ? lwt + std::log1p(-wj) : -std::numeric_limits<double>::infinity();
    }
  }
#pragma omp parallel for schedule(static) num_threads(get_num_threads())
  for (int64_t j = 0; j < m; ++j) {
    if (y) {
      out[static_cast<size_t>(j)] =
          kde.log_density(y->p.data() + j * x.d, inv2h2, lwt + log_gauss, -1);
    } else {
      const double ln = loo_norm[static_cast<size_t>(j)];
      // NaN marks a point with no other mass: skipped by the likelihood.
      out[static_cast<size_t>(j)] =
          std::isfinite(ln) ? kde.log_density(x.p.data() + j * x.d, inv2h2, ln + log_gauss, j)
                            : std::numeric_limits<double>::quiet_NaN();
    }
  }
}

double mean_log_likelihood(const Points& x, const std::vector<double>& lw, const Points* y,
                           double h, std::vector<double>& buf) {
  log_densities(x, lw, y, h, buf);
  double s = 0;
  int64_t k = 0;
  for (double v : buf) {
    if (std::isnan(v)) continue;
    s += v;
    ++k;
  }
  return k > 0 ? s / static_cast<double>(k) : -std::numeric_limits<double>::infinity();
}

struct Inputs {
  Points x;
  std::vector<double> lw;
  Points y;
  bool held_out = false;
};

Inputs load_inputs(const char* fn, const TensorView& x, const TensorView& w, const TensorView& y) {
  Inputs in;
  in.x = load_points(fn, "x", x);
  in.lw = load_log_weights(fn, w, in.x.n);
  if (y.defined()) {
    in.y = load_points(fn, "y", y);
    if (in.y.d != in.x.d)
      fail(fn, "y must have x's dimension d = " + std::to_string(in.x.d) + ", got " +
                   std::to_string(in.y.d));
    in.held_out = true;
  } else {
    int64_t pos = 0;
    for (double v : in.lw) pos += std::isfinite(v) ? 1 : 0;
    if (in.x.n < 2 || pos < 2)
      fail(fn, "leave-one-out (y not given) needs at least 2 points of x with weight > 0");
  }
  return in;
}

}  // namespace

void kde_log_density(const TensorView& x, const TensorView& w, const TensorView& y,
                     double bandwidth, const TensorView& out) {
  constexpr const char* fn = "kde_log_density";
  check::views(fn, {{"x", x}, {"w", w}, {"y", y}, {"out", out}});
  check_bandwidth(fn, bandwidth);
  if (!y.defined()) fail(fn, "y is required");
  const Inputs in = load_inputs(fn, x, w, y);
  if (out.ndim != 1 || out.shape[0] != in.y.n || out.dtype != DType::f64 ||
      out.device != Device::cpu)
    fail(fn, "out must be a float64 CPU tensor of shape [" + std::to_string(in.y.n) + "], got " +
                 dtype_name(out.dtype) + " " + shape_string(out));
  std::vector<double> v;
  log_densities(in.x, in.lw, &in.y, bandwidth, v);
  for (int64_t j = 0; j < in.y.n; ++j)
    static_cast<double*>(out.data)[j * out.strides[0]] = v[static_cast<size_t>(j)];
}

double kde_log_likelihood(const TensorView& x, const TensorView& w, const TensorView& y,
                          double bandwidth) {
  constexpr const char* fn = "kde_log_likelihood";
  check::views(fn, {{"x", x}, {"w", w}, {"y", y}});
  check_bandwidth(fn, bandwidth);
  const Inputs in = load_inputs(fn, x, w, y);
  std::vector<double> buf;
  return mean_log_likelihood(in.x, in.lw, in.held_out ? &in.y : nullptr, bandwidth, buf);
}

KdeBandwidthResult kde_select_bandwidth(const TensorView& x, const TensorView& w,
                                        const TensorView& y, const KdeBandwidthOptions& opt) {
  constexpr const char* fn = "kde_select_bandwidth";
  check::views(fn, {{"x", x}, {"w", w}, {"y", y}});
  if (opt.grid < 3) fail(fn, "grid must be >= 3, got " + std::to_string(opt.grid));
  if (!(std::isfinite(opt.tol) && opt.tol > 0))
    fail(fn, "tol must be finite and > 0, got " + std::to_string(opt.tol));
  if (opt.max_iter < 0) fail(fn, "max_iter must be >= 0, got " + std::to_string(opt.max_iter));
  if (!std::isfinite(opt.h_min) || !std::isfinite(opt.h_max))
    fail(fn, "h_min and h_max must be finite");
  const Inputs in = load_inputs(fn, x, w, y);

  double h_min = opt.h_min, h_max = opt.h_max;
  if (h_min <= 0 || h_max <= 0) {
    // s: root of the mean per-coordinate weighted variance of x.
    const double lwt = log_total(in.lw, -1);
    double var = 0;
    for (int64_t k = 0; k < in.x.d; ++k) {
      double mu = 0, m2 = 0;
      for (int64_t i = 0; i < in.x.n; ++i) {
        const double p = std::exp(in.lw[static_cast<size_t>(i)] - lwt);
        const double v = in.x.p[static_cast<size_t>(i * in.x.d + k)];
        mu += p * v;
        m2 += p * v * v;
      }
      var += std::max(m2 - mu * mu, 0.0);
    }
    double s = std::sqrt(var / static_cast<double>(in.x.d));
    if (!(s > 0)) s = 1.0;
    if (h_min <= 0) h_min = 1e-3 * s;
    if (h_max <= 0) h_max = 10.0 * s;
  }
  if (!(h_max > h_min))
    fail(fn, "h_max must be > h_min, got h_min = " + std::to_string(h_min) +
                 ", h_max = " + std::to_string(h_max));

  KdeBandwidthResult res;
  std::vector<double> buf;
  const Points* yq = in.held_out ? &in.y : nullptr;
  auto L = [&](double log_h) {
    ++res.n_evals;
    const double v = mean_log_likelihood(in.x, in.lw, yq, std::exp(log_h), buf);
    return std::isnan(v) ? -std::numeric_limits<double>::infinity() : v;
  };
  const double a0 = std::log(h_min), b0 = std::log(h_max);
  const int32_t G = opt.grid;
  std::vector<double> t(static_cast<size_t>(G)), f(static_cast<size_t>(G));
  int32_t best = 0;
  for (int32_t g = 0; g < G; ++g) {
    t[static_cast<size_t>(g)] = a0 + (b0 - a0) * g / (G - 1);
    f[static_cast<size_t>(g)] = L(t[static_cast<size_t>(g)]);
    if (f[static_cast<size_t>(g)] > f[static_cast<size_t>(best)]) best = g;
    res.grid_bandwidths.push_back(std::exp(t[static_cast<size_t>(g)]));
    res.grid_log_likelihoods.push_back(f[static_cast<size_t>(g)]);
  }
  // Golden-section on [t[best - 1], t[best + 1]] (clamped to the grid's ends).
  double lo = t[static_cast<size_t>(std::max(best - 1, 0))];
  double hi = t[static_cast<size_t>(std::min(best + 1, G - 1))];
  double best_t = t[static_cast<size_t>(best)], best_f = f[static_cast<size_t>(best)];
  const double r = 0.5 * (std::sqrt(5.0) - 1.0);
  double c = hi - r * (hi - lo), d = lo + r * (hi - lo);
  double fc = L(c), fd = L(d);
  for (int32_t it = 0; it < opt.max_iter && hi - lo > opt.tol; ++it) {
    if (fc >= fd) {
      hi = d;
      d = c;
      fd = fc;
      c = hi - r * (hi - lo);
      fc = L(c);
    } else {
      lo = c;
      c = d;
      fc = fd;
      d = lo + r * (hi - lo);
      fd = L(d);
    }
  }
  if (fc > best_f) best_t = c, best_f = fc;
  if (fd > best_f) best_t = d, best_f = fd;
  res.bandwidth = std::exp(best_t);
  res.log_likelihood = best_f;
  return res;
}

}  // namespace divkit
