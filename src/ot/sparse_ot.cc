// Quadratically regularized and sparsity-constrained OT by its semi-dual (include/divkit/ot.h):
// argument checks, the per-column k-sparse simplex projections (one evaluation of V and its
// gradient), and L-BFGS with a strong-Wolfe line search.
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "core/check.h"
#include "core/element.h"
#include "divkit/ot.h"
#include "divkit/runtime.h"

namespace divkit {
namespace {

constexpr const char* kFn = "sparse_ot";
using check::fail;
using check::shape_string;

std::vector<double> load_weights(const char* name, const TensorView& w, int64_t n) {
  const std::string arg(name);
  if (!w.defined()) fail(kFn, arg + " is required");
  check::vector_of(kFn, name, w, n, {DType::f32, DType::f64});
  std::vector<double> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    const double x = elem::get(w, i);
    if (!std::isfinite(x))
      fail(kFn, arg + " has a non-finite value at [" + std::to_string(i) + "]");
    if (x < 0)
      fail(kFn,
           arg + " has a negative weight " + std::to_string(x) + " at [" + std::to_string(i) + "]");
    v[static_cast<size_t>(i)] = x;
  }
  return v;
}

// The semi-dual at one alpha: F = -V (minimized), its gradient P 1 - a, and each column's
// support (rows and t values) for the plan.
struct Evaluation {
  double F = 0.0;
  std::vector<double> grad;                // [n]
  std::vector<std::vector<int64_t>> rows;  // [m] support of t_j
  std::vector<std::vector<double>> t;      // [m] t_j on its support
  std::vector<double> phi;                 // [m] phi_j
};

class SemiDual {
 public:
  SemiDual(std::vector<double> a, std::vector<double> b, std::vector<double> ct, int64_t n,
           int64_t m, double gamma, int64_t k)
      : a_(std::move(a)), b_(std::move(b)), ct_(std::move(ct)), n_(n), m_(m), gamma_(gamma),
        k_(k == 0 ? n : std::min(k, n)) {}

  void evaluate(const std::vector<double>& alpha, Evaluation& e) const {
    e.rows.resize(static_cast<size_t>(m_));
    e.t.resize(static_cast<size_t>(m_));
    e.phi.assign(static_cast<size_t>(m_), 0.0);
#pragma omp parallel num_threads(get_num_threads()) if (n_ * m_ >= (int64_t{1} << 16))
    {
      std::vector<double> z(static_cast<size_t>(n_));
      std::vector<int64_t> cand;
#pragma omp for schedule(static)
      for (int64_t j = 0; j < m_; ++j) column(alpha, j, z, cand, e);
    }
    // Fixed-order sums: the same result for any thread count.
    double F = 0.0;
    for (int64_t i = 0; i < n_; ++i)
      F -= alpha[static_cast<size_t>(i)] * a_[static_cast<size_t>(i)];
    e.grad.assign(static_cast<size_t>(n_), 0.0);
    for (int64_t i = 0; i < n_; ++i) e.grad[static_cast<size_t>(i)] = -a_[static_cast<size_t>(i)];
    for (int64_t j = 0; j < m_; ++j) {
      const size_t uj = static_cast<size_t>(j);
      F += b_[uj] * e.phi[uj];
      for (size_t q = 0; q < e.rows[uj].size(); ++q)
        e.grad[static_cast<size_t>(e.rows[uj][q])] += b_[uj] * e.t[uj][q];
    }
    e.F = F;
  }

  double b(int64_t j) const { return b_[static_cast<size_t>(j)]; }
  double cost(int64_t i, int64_t j) const { return ct_[static_cast<size_t>(j * n_ + i)]; }
  double gamma() const { return gamma_; }

 private:
  // t_j = projection of z = (alpha - C_:j) / (gamma b_j) onto {t >= 0, sum t = 1, |t|_0 <= k}:
  // the k largest z (ties: the lower row) projected onto the simplex. Only z_i > max z - 1
  // can be positive (the threshold is at least max z - 1, as the largest t is at most 1), so
  // only those are candidates. A column with b_j = 0 has no mass; its phi_j (used by dV/db) is
  // the limit max_i (alpha_i - C_ij), its t the unit vector at that maximum.
  void column(const std::vector<double>& alpha, int64_t j, std::vector<double>& z,
              std::vector<int64_t>& cand, Evaluation& e) const {
    const size_t uj = static_cast<size_t>(j);
    const double* c = ct_.data() + j * n_;
    auto& rows = e.rows[uj];
    auto& t = e.t[uj];
    rows.clear();
    t.clear();
    const double bj = b_[uj];
    if (bj == 0.0) {
      int64_t best = 0;
      double bx = -std::numeric_limits<double>::infinity();
      for (int64_t i = 0; i < n_; ++i) {
        const double x = alpha[static_cast<size_t>(i)] - c[i];
        if (x > bx) bx = x, best = i;
      }
      e.phi[uj] = bx;
      rows.push_back(best);
      t.push_back(1.0);
      return;
    }
    const double scale = gamma_ * bj, inv_scale = 1.0 / scale;
    double zmax = -std::numeric_limits<double>::infinity();
    for (int64_t i = 0; i < n_; ++i) {
      z[static_cast<size_t>(i)] = (alpha[static_cast<size_t>(i)] - c[i]) * inv_scale;
      zmax = std::max(zmax, z[static_cast<size_t>(i)]);
    }
    cand.clear();
    for (int64_t i = 0; i < n_; ++i)
      if (z[static_cast<size_t>(i)] > zmax - 1.0) cand.push_back(i);
    if (static_cast<int64_t>(cand.size()) > k_) {
      auto before = [&z](int64_t p, int64_t q) {  // ties: the lower row first
        const double zp = z[static_cast<size_t>(p)], zq = z[static_cast<size_t>(q)];
        return zp > zq || (zp == zq && p < q);
      };
      std::nth_element(cand.begin(), cand.begin() + (k_ - 1), cand.end(), before);
      cand.resize(static_cast<size_t>(k_));
    }
    // Simplex threshold by Michelot's algorithm (1986), O(|cand|) a pass and no sort: theta =
    // (sum of the set - 1) / |set| rises as entries <= theta leave the set, and the set that
    // stops changing is the support {z > theta}. A large gamma b_j leaves hundreds of
    // candidates per column, where sorting them cost most of the time.
    double sum = 0.0;
    for (int64_t i : cand) sum += z[static_cast<size_t>(i)];
    double theta = (sum - 1.0) / static_cast<double>(cand.size());
    for (;;) {
      size_t kept = 0;
      double s2 = 0.0;
      for (int64_t i : cand)
        if (z[static_cast<size_t>(i)] > theta) cand[kept++] = i, s2 += z[static_cast<size_t>(i)];
      if (kept == cand.size()) break;
      cand.resize(kept);
      theta = (s2 - 1.0) / static_cast<double>(kept);
    }
    sum = 0.0;
    for (int64_t i : cand) {
      const double ti = z[static_cast<size_t>(i)] - theta;
      rows.push_back(i);
      t.push_back(ti);
      sum += ti;
    }
    // z - theta loses the low bits of large z (a small gamma b_j): rescale so that the column
    // sums to b_j to rounding, as the plan's exact columns promise.
    double phi = 0.0;
    for (size_t q = 0; q < t.size(); ++q) {
      t[q] /= sum;
      phi += t[q] * scale * z[static_cast<size_t>(rows[q])] - 0.5 * scale * t[q] * t[q];
    }
    e.phi[uj] = phi;
  }

  std::vector<double> a_, b_, ct_;  // ct_ [m][n]: the cost, transposed, float64
  int64_t n_, m_;
  double gamma_;
  int64_t k_;
};

double dot(const std::vector<double>& u, const std::vector<double>& v) {
  double s = 0.0;
  for (size_t i = 0; i < u.size(); ++i) s += u[i] * v[i];
  return s;
}

double l1(const std::vector<double>& u) {
  double s = 0.0;
  for (double x : u) s += std::abs(x);
  return s;
}

// Strong-Wolfe line search along d from x (Nocedal & Wright, Algorithms 3.5 and 3.6, with a
// safeguarded quadratic interpolation in the zoom). On success `trial` holds the accepted point
// and its evaluation; returns false when no acceptable step was found.
struct LineSearch {
  static constexpr double c1 = 1e-4, c2 = 0.9;
  const SemiDual& f;
  const std::vector<double>& x;
  const Evaluation& at0;
  const std::vector<double>& d;
  std::vector<double>& xt;
  Evaluation& trial;
  int64_t evals = 0;

  double phi(double s) {
    for (size_t i = 0; i < x.size(); ++i) xt[i] = x[i] + s * d[i];
    f.evaluate(xt, trial);
    ++evals;
    return trial.F;
  }
  double dphi() const { return dot(trial.grad, d); }

  // Near the optimum F's decrease falls below its rounding (F ~ 1, decrease ~ |g|^2), and the
  // sufficient-decrease test fails on noise: also accept Hager and Zhang's approximate Wolfe
  // conditions, which test the slope and allow F to rise by its rounding error.
  bool approx_wolfe(double fs, double gs, double f0, double g0) const {
    return fs <= f0 + 1e-12 * std::abs(f0) && gs >= c2 * g0 && gs <= (1.0 - 2.0 * c1) * -g0;
  }

  bool run(double s) {
    const double f0 = at0.F, g0 = dot(at0.grad, d);
    double s_prev = 0.0, f_prev = f0, g_prev = g0;
    for (int it = 0; it < 40; ++it) {
      const double fs = phi(s);
      if (!std::isfinite(fs)) return false;
      const double gs = dphi();
      if (approx_wolfe(fs, gs, f0, g0)) return true;
      if (fs > f0 + c1 * s * g0 || (it > 0 && fs >= f_prev))
        return zoom(s_prev, f_prev, g_prev, s, fs, f0, g0);
      if (std::abs(gs) <= -c2 * g0) return true;
      if (gs >= 0) return zoom(s, fs, gs, s_prev, f_prev, f0, g0);
      s_prev = s, f_prev = fs, g_prev = gs;
      s *= 2.0;
    }
    return false;
  }

  // lo satisfies sufficient decrease with the lowest value so far; the minimizer lies between
  // lo and hi.
  bool zoom(double lo, double flo, double glo, double hi, double fhi, double f0, double g0) {
    for (int it = 0; it < 40; ++it) {
      const double w = hi - lo;
      // Minimizer of the quadratic through (lo, flo, glo) and (hi, fhi), kept inside the
      // middle 80% of the interval; bisection when the fit has no minimum.
      const double den = 2.0 * (fhi - flo - glo * w);
      double s = den > 0 ? lo - glo * w * w / den : lo + 0.5 * w;
      const double a = std::min(lo, hi) + 0.1 * std::abs(w),
                   b = std::max(lo, hi) - 0.1 * std::abs(w);
      if (!(s >= a && s <= b)) s = lo + 0.5 * w;
      const double fs = phi(s);
      const double gs = dphi();
      if (approx_wolfe(fs, gs, f0, g0)) return true;
      if (fs > f0 + c1 * s * g0 || fs >= flo) {
        hi = s, fhi = fs;
      } else {
        if (std::abs(gs) <= -c2 * g0) return true;
        if (gs * w >= 0) hi = lo, fhi = flo;
        lo = s, flo = fs, glo = gs;
      }
      if (std::abs(hi - lo) <= 1e-16 * std::max(1.0, std::abs(lo))) break;
    }
    // No strong-Wolfe point, but lo decreased F: take it if it is not the start.
    if (lo > 0.0) {
      phi(lo);
      return true;
    }
    return false;
  }
};

}  // namespace

SparseOtResult sparse_ot(const TensorView& a, const TensorView& b, const TensorView& cost,
                         const SparseOtOptions& opt, const TensorView& alpha_out,
                         const TensorView& grad_b) {
  check::views(kFn, {{"a", a}, {"b", b}, {"cost", cost}, {"alpha", alpha_out}, {"grad_b", grad_b}});
  if (!cost.defined()) fail(kFn, "cost is required");
  if (cost.device != Device::cpu) fail(kFn, "cost must be on the CPU");
  if (cost.ndim != 2) fail(kFn, "cost must be 2-D [n, m], got shape " + shape_string(cost));
  if (cost.dtype != DType::f32 && cost.dtype != DType::f64)
    fail(kFn, std::string("cost must be float32 or float64, got ") + dtype_name(cost.dtype));
  const int64_t n = cost.shape[0], m = cost.shape[1];
  if (n < 1 || m < 1) fail(kFn, "cost must be non-empty, got shape " + shape_string(cost));
  if (!(std::isfinite(opt.gamma) && opt.gamma > 0))
    fail(kFn, "gamma must be finite and > 0, got " + std::to_string(opt.gamma));
  if (opt.k < 0)
    fail(kFn, "k must be >= 1 (non-zeros per column) or 0 (no constraint), got " +
                  std::to_string(opt.k));
  if (!(opt.tol >= 0)) fail(kFn, "tol must be >= 0, got " + std::to_string(opt.tol));
  if (opt.max_iter < 1) fail(kFn, "max_iter must be >= 1, got " + std::to_string(opt.max_iter));
  std::vector<double> av = load_weights("a", a, n), bv = load_weights("b", b, m);
  double sa = 0.0, sb = 0.0;
  for (double x : av) sa += x;
  for (double x : bv) sb += x;
  if (!(sa > 0)) fail(kFn, "a sums to 0");
  if (!(sb > 0)) fail(kFn, "b sums to 0");
  if (std::abs(sa - sb) > 1e-6 * std::max(sa, sb))
    fail(kFn, "a and b must have equal total mass, got " + std::to_string(sa) + " and " +
                  std::to_string(sb));
  // The semi-dual's gradient sums to sum a - sum b (the columns are met exactly), so a mismatch
  // within the tolerance above (float32 rounding of the weights) is a marginal error that no
  // alpha can bring below a smaller tol: L-BFGS then drives alpha along the constant direction
  // without bound. b is scaled to a's total, a change of at most the tolerance.
  for (double& x : bv) x *= sa / sb;
  if (!alpha_out.defined()) fail(kFn, "alpha is required");
  check::vector_of(kFn, "alpha", alpha_out, n, {DType::f64});
  if (grad_b.defined()) check::vector_of(kFn, "grad_b", grad_b, m, {DType::f64});
  std::vector<double> ct(static_cast<size_t>(n * m));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < m; ++j) {
      const double v = elem::get(cost, i, j);
      if (!std::isfinite(v))
        fail(kFn, "cost has a non-finite value at [" + std::to_string(i) + ", " +
                      std::to_string(j) + "]");
      ct[static_cast<size_t>(j * n + i)] = v;
    }
  const SemiDual f(std::move(av), std::move(bv), std::move(ct), n, m, opt.gamma, opt.k);

  // L-BFGS on F = -V (Nocedal & Wright, Algorithm 7.4/7.5).
  constexpr size_t kHistory = 20;
  std::vector<double> x(static_cast<size_t>(n), 0.0), xt(x.size()), d(x.size()), q(x.size());
  Evaluation cur, trial;
  f.evaluate(x, cur);
  std::vector<std::vector<double>> S, Y;
  std::vector<double> rho;
  SparseOtResult res;
  double err = l1(cur.grad);
  bool restarted = false;
  // With k >= 1 the semi-dual is nonsmooth where a column's top-k set changes, and when the
  // constraint binds its maximizer's plan (one element of the subdifferential) need not meet
  // the row marginals at all: the marginal error then stalls above tol. Stop when V has not
  // risen by more than its rounding over kStall iterations.
  constexpr int64_t kStall = 50;
  std::vector<double> history{cur.F};
  while (err > opt.tol && res.n_iter < opt.max_iter) {
    if (static_cast<int64_t>(history.size()) > kStall &&
        history[history.size() - 1 - kStall] - cur.F <= 1e-14 * std::max(1.0, std::abs(cur.F)))
      break;
    // d = -H g by the two-loop recursion; the first step (no history) is -gamma g, the
    // Newton step when each row has one non-zero (dP_ij / d alpha_i = 1 / gamma).
    q = cur.grad;
    std::vector<double> al(S.size());
    for (size_t h = S.size(); h-- > 0;) {
      al[h] = rho[h] * dot(S[h], q);
      for (size_t i = 0; i < q.size(); ++i) q[i] -= al[h] * Y[h][i];
    }
    const double h0 = S.empty() ? opt.gamma : dot(S.back(), Y.back()) / dot(Y.back(), Y.back());
    for (double& v : q) v *= h0;
    for (size_t h = 0; h < S.size(); ++h) {
      const double be = rho[h] * dot(Y[h], q);
      for (size_t i = 0; i < q.size(); ++i) q[i] += S[h][i] * (al[h] - be);
    }
    for (size_t i = 0; i < d.size(); ++i) d[i] = -q[i];
    if (!(dot(d, cur.grad) < 0)) {  // not a descent direction: steepest descent
      S.clear(), Y.clear(), rho.clear();
      for (size_t i = 0; i < d.size(); ++i) d[i] = -opt.gamma * cur.grad[i];
    }
    LineSearch ls{f, x, cur, d, xt, trial};
    ++res.n_iter;
    if (!ls.run(1.0)) {
      // A stale curvature history stalls the search at the semi-dual's kinks: drop it once
      // and go on; a second failure in a row means no further progress is possible.
      if (restarted || S.empty()) break;
      restarted = true;
      S.clear(), Y.clear(), rho.clear();
      continue;
    }
    restarted = false;
    std::vector<double> s(x.size()), y(x.size());
    for (size_t i = 0; i < x.size(); ++i) s[i] = xt[i] - x[i], y[i] = trial.grad[i] - cur.grad[i];
    const double sy = dot(s, y);
    if (sy > 1e-12 * std::sqrt(dot(s, s) * dot(y, y))) {
      if (S.size() == kHistory) S.erase(S.begin()), Y.erase(Y.begin()), rho.erase(rho.begin());
      S.push_back(std::move(s));
      Y.push_back(std::move(y));
      rho.push_back(1.0 / sy);
    }
    std::swap(x, xt);
    std::swap(cur, trial);
    err = l1(cur.grad);
    history.push_back(cur.F);
  }
  res.marginal_error = err;
  res.converged = err <= opt.tol;
  res.reg_cost = -cur.F;

  // The plan in row-major order (counting sort of the column supports by row).
  std::vector<int64_t> count(static_cast<size_t>(n) + 1, 0);
  for (int64_t j = 0; j < m; ++j)
    if (f.b(j) > 0)
      for (int64_t i : cur.rows[static_cast<size_t>(j)]) ++count[static_cast<size_t>(i) + 1];
  for (int64_t i = 0; i < n; ++i)
    count[static_cast<size_t>(i) + 1] += count[static_cast<size_t>(i)];
  const size_t nnz = static_cast<size_t>(count[static_cast<size_t>(n)]);
  res.row.resize(nnz);
  res.col.resize(nnz);
  res.value.resize(nnz);
  for (int64_t j = 0; j < m; ++j) {
    if (!(f.b(j) > 0)) continue;
    const auto& rows = cur.rows[static_cast<size_t>(j)];
    const auto& t = cur.t[static_cast<size_t>(j)];
    for (size_t q2 = 0; q2 < rows.size(); ++q2) {
      const size_t at = static_cast<size_t>(count[static_cast<size_t>(rows[q2])]++);
      res.row[at] = rows[q2];
      res.col[at] = j;
      res.value[at] = f.b(j) * t[q2];
    }
  }
  for (size_t e = 0; e < nnz; ++e)
    res.transport_cost += res.value[e] * f.cost(res.row[e], res.col[e]);

  double* ao = static_cast<double*>(alpha_out.data);
  for (int64_t i = 0; i < n; ++i) ao[i * alpha_out.strides[0]] = x[static_cast<size_t>(i)];
  if (grad_b.defined()) {
    double* gb = static_cast<double*>(grad_b.data);
    for (int64_t j = 0; j < m; ++j) {
      // d(b_j phi_j)/db_j = phi_j + b_j dphi_j/db_j = phi_j - (gamma b_j / 2) |t_j|^2.
      const auto& t = cur.t[static_cast<size_t>(j)];
      double tt = 0.0;
      for (double v : t) tt += v * v;
      gb[j * grad_b.strides[0]] =
          -(cur.phi[static_cast<size_t>(j)] - 0.5 * opt.gamma * f.b(j) * tt);
    }
  }
  return res;
}

}  // namespace divkit
