// MMD and Cauchy-Schwarz divergence between weighted samples (see include/divkit/ot.h).
// fp64 throughout; O(n + m) memory (kernel values are summed, never stored); OpenMP over rows
// with per-row sums reduced in row order, so results do not depend on the thread count.
#include <cmath>
#include <string>
#include <vector>

#include "core/check.h"
#include "core/element.h"
#include "divkit/ot.h"
#include "divkit/runtime.h"

namespace divkit {
namespace {

using check::fail;
using check::shape_string;

struct Cloud {
  int64_t n = 0, d = 0;
  std::vector<double> p;  // [n][d]
  std::vector<double> w;  // [n]
};

Cloud load(const char* fn, const char* name, const char* wname, const TensorView& x,
           const TensorView& w) {
  const std::string arg(name);
  if (x.device != Device::cpu) fail(fn, arg + " must be on the CPU");
  if (x.ndim != 2) fail(fn, arg + " must be 2-D [n, d], got shape " + shape_string(x));
  if (x.dtype != DType::f32 && x.dtype != DType::f64)
    fail(fn, arg + " must be float32 or float64, got " + dtype_name(x.dtype));
  if (x.shape[0] < 1) fail(fn, arg + " must have at least one point");
  if (x.shape[1] < 1) fail(fn, arg + " must have at least one coordinate");
  Cloud c;
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
  c.w.assign(static_cast<size_t>(c.n), 1.0 / static_cast<double>(c.n));
  if (w.defined()) {
    const std::string wa(wname);
    if (w.ndim != 1 || w.shape[0] != c.n)
      fail(fn, wa + " must have shape [" + std::to_string(c.n) + "], got " + shape_string(w));
    if (w.dtype != DType::f32 && w.dtype != DType::f64)
      fail(fn, wa + " must be float32 or float64, got " + dtype_name(w.dtype));
    double s = 0;
    for (int64_t i = 0; i < c.n; ++i) {
      const double v = elem::get(w, i);
      if (!std::isfinite(v) || v < 0)
        fail(fn, wa + " must be finite and >= 0, got " + std::to_string(v) + " at [" +
                     std::to_string(i) + "]");
      c.w[static_cast<size_t>(i)] = v;
      s += v;
    }
    if (!(s > 0)) fail(fn, wa + " sums to 0");
  }
  return c;
}

void check_grad(const char* fn, const char* name, const TensorView& g, int64_t n, int64_t d) {
  if (!g.defined()) return;
  if (g.ndim != 2 || g.shape[0] != n || g.shape[1] != d || g.dtype != DType::f64)
    fail(fn, std::string(name) + " must be float64 of shape [" + std::to_string(n) + ", " +
                 std::to_string(d) + "], got " + dtype_name(g.dtype) + " " + shape_string(g));
}

// S = sum_ij wp_i wq_j k(p_i, q_j); grad (optional, [np][d]) = wp_i sum_j wq_j d/dp_i k(p_i, q_j).
double pair_sums(const Cloud& P, const Cloud& Q, SampleKernel kernel, double sigma,
                 std::vector<double>* grad) {
  const int64_t d = P.d;
  std::vector<double> row(static_cast<size_t>(P.n));
  if (grad) grad->assign(static_cast<size_t>(P.n * d), 0.0);
  const double inv2s2 = 1.0 / (2.0 * sigma * sigma);
#pragma omp parallel for schedule(static) num_threads(get_num_threads())
  for (int64_t i = 0; i < P.n; ++i) {
    const double* pi = P.p.data() + i * d;
    double s = 0;
    std::vector<double> gi(grad ? static_cast<size_t>(d) : 0u, 0.0);
    for (int64_t j = 0; j < Q.n; ++j) {
      const double* qj = Q.p.data() + j * d;
      double r2 = 0;
      for (int64_t k = 0; k < d; ++k) r2 += (pi[k] - qj[k]) * (pi[k] - qj[k]);
      const double wj = Q.w[static_cast<size_t>(j)];
      double kv, coef;  // d/dp k = coef * (p - q)
      if (kernel == SampleKernel::gaussian) {
        kv = std::exp(-r2 * inv2s2);
        coef = -2.0 * inv2s2 * kv;
      } else {
        const double r = std::sqrt(r2);
        kv = -r;
        coef = r > 0 ? -1.0 / r : 0.0;
      }
      s += wj * kv;
      if (grad)
        for (int64_t k = 0; k < d; ++k) gi[static_cast<size_t>(k)] += wj * coef * (pi[k] - qj[k]);
    }
    row[static_cast<size_t>(i)] = P.w[static_cast<size_t>(i)] * s;
    if (grad)
      for (int64_t k = 0; k < d; ++k)
        (*grad)[static_cast<size_t>(i * d + k)] =
            P.w[static_cast<size_t>(i)] * gi[static_cast<size_t>(k)];
  }
  double total = 0;
  for (double v : row) total += v;
  return total;
}

void write(const TensorView& g, const std::vector<double>& v) {
  for (int64_t i = 0; i < g.shape[0]; ++i)
    for (int64_t k = 0; k < g.shape[1]; ++k)
      static_cast<double*>(g.data)[i * g.strides[0] + k * g.strides[1]] =
          v[static_cast<size_t>(i * g.shape[1] + k)];
}

struct Sums {
  double xx, yy, xy;
  std::vector<double> gxx, gyy, gxy, gyx;
};

Sums all_sums(const char* fn, const Cloud& X, const Cloud& Y, SampleKernel kernel, double sigma,
              bool gx, bool gy) {
  if (X.d != Y.d)
    fail(fn,
         "y must have x's dimension d = " + std::to_string(X.d) + ", got " + std::to_string(Y.d));
  Sums s;
  s.xx = pair_sums(X, X, kernel, sigma, gx ? &s.gxx : nullptr);
  s.yy = pair_sums(Y, Y, kernel, sigma, gy ? &s.gyy : nullptr);
  s.xy = pair_sums(X, Y, kernel, sigma, gx ? &s.gxy : nullptr);
  if (gy) pair_sums(Y, X, kernel, sigma, &s.gyx);
  return s;
}

void check_sigma(const char* fn, double sigma) {
  if (!(std::isfinite(sigma) && sigma > 0))
    fail(fn, "sigma must be finite and > 0, got " + std::to_string(sigma));
}

}  // namespace

double mmd2(const TensorView& x, const TensorView& y, const TensorView& a, const TensorView& b,
            SampleKernel kernel, double sigma, const TensorView& grad_x, const TensorView& grad_y) {
  constexpr const char* fn = "mmd";
  check::views(fn,
               {{"x", x}, {"y", y}, {"a", a}, {"b", b}, {"grad_x", grad_x}, {"grad_y", grad_y}});
  if (kernel != SampleKernel::gaussian && kernel != SampleKernel::energy)
    fail(fn, "kernel must be gaussian or energy");
  if (kernel == SampleKernel::gaussian) check_sigma(fn, sigma);
  const Cloud X = load(fn, "x", "a", x, a), Y = load(fn, "y", "b", y, b);
  check_grad(fn, "grad_x", grad_x, X.n, X.d);
  check_grad(fn, "grad_y", grad_y, Y.n, Y.d);
  const Sums s = all_sums(fn, X, Y, kernel, sigma, grad_x.defined(), grad_y.defined());
  // d/dx of a'Kxx a = 2 * (row gradient), by symmetry of k.
  if (grad_x.defined()) {
    std::vector<double> g(s.gxx.size());
    for (size_t i = 0; i < g.size(); ++i) g[i] = 2.0 * s.gxx[i] - 2.0 * s.gxy[i];
    write(grad_x, g);
  }
  if (grad_y.defined()) {
    std::vector<double> g(s.gyy.size());
    for (size_t i = 0; i < g.size(); ++i) g[i] = 2.0 * s.gyy[i] - 2.0 * s.gyx[i];
    write(grad_y, g);
  }
  return s.xx + s.yy - 2.0 * s.xy;
}

double cs_divergence(const TensorView& x, const TensorView& y, const TensorView& a,
                     const TensorView& b, double sigma, const TensorView& grad_x,
                     const TensorView& grad_y) {
  constexpr const char* fn = "cs_divergence";
  check::views(fn,
               {{"x", x}, {"y", y}, {"a", a}, {"b", b}, {"grad_x", grad_x}, {"grad_y", grad_y}});
  check_sigma(fn, sigma);
  const Cloud X = load(fn, "x", "a", x, a), Y = load(fn, "y", "b", y, b);
  check_grad(fn, "grad_x", grad_x, X.n, X.d);
  check_grad(fn, "grad_y", grad_y, Y.n, Y.d);
  const Sums s =
      all_sums(fn, X, Y, SampleKernel::gaussian, sigma, grad_x.defined(), grad_y.defined());
  // Gaussian kernel sums are > 0; the cross term underflows to 0 only for clouds many sigma
  // apart, where the divergence is +inf.
  if (!(s.xy > 0)) return INFINITY;
  if (grad_x.defined()) {
    std::vector<double> g(s.gxx.size());
    for (size_t i = 0; i < g.size(); ++i) g[i] = 2.0 * s.gxx[i] / s.xx - 2.0 * s.gxy[i] / s.xy;
    write(grad_x, g);
  }
  if (grad_y.defined()) {
    std::vector<double> g(s.gyy.size());
    for (size_t i = 0; i < g.size(); ++i) g[i] = 2.0 * s.gyy[i] / s.yy - 2.0 * s.gyx[i] / s.xy;
    write(grad_y, g);
  }
  return std::log(s.xx) + std::log(s.yy) - 2.0 * std::log(s.xy);
}

}  // namespace divkit
