// The per-entry math of log-domain Sinkhorn in scalar fp64 form, __host__ __device__: what the
// CUDA kernels (sinkhorn_cuda.cu) compute per cost entry, per potential and per problem. The
// C++ tests (tests/cpp/test_cuda.cc, SinkhornScalar.*) run these functions on the host, in the
// CUDA kernels' order of steps, against the CPU solver (sinkhorn.cc / ot_kernels.cc), so the
// CPU tests cover what the GPU computes. The formulas are those of include/divkit/ot.h.
#pragma once

#include <math.h>

#include <cstdint>

#include "core/hd.h"

namespace divkit::ot_scalar {

// fill_h's value for a zero weight (sinkhorn.cc): very negative but finite, so that
// h - C / eps stays finite and its exp is 0 (log 0 = -inf would give inf - inf = NaN).
inline constexpr double kHugeNeg = -1e300;
// exp's argument range in fp64 (ExpAny in ot_kernels.cc): below, exp is 0; above, inf.
inline constexpr double kExpLo = -745.0;
inline constexpr double kExpHi = 709.0;

// h_j = log w_j + pot_j / eps (kHugeNeg for a zero weight, log w = -inf).
DIVKIT_HD inline double h_entry(double log_w, double pot, double eps) {
  return log_w > kHugeNeg ? log_w + pot / eps : kHugeNeg;
}

// The cost by direct differences: acc <- acc + (x_k - y_k)^2 per coordinate (one fused
// multiply-add), then |x - y|^p from the sum of squares.
DIVKIT_HD inline double cost_step(double acc, double xk, double yk) {
  const double t = xk - yk;
  return fma(t, t, acc);
}
DIVKIT_HD inline double cost_finish(double sum_sq, int p) { return p == 1 ? sqrt(sum_sq) : sum_sq; }

// z_ij = h_j - C_ij / eps, fused as the SIMD kernels' NegMulAdd(c, inv_eps, h).
DIVKIT_HD inline double z_entry(double h, double c, double inv_eps) { return fma(-c, inv_eps, h); }

// Online log-sum-exp of one thread's entries, in the order it sees them: (m, s) with
// LSE = m + log s. Start from m = -inf, s = 0. One exp per entry.
DIVKIT_HD inline void lse_push(double& m, double& s, double z) {
  if (z > m) {
    s = s * exp(m - z) + 1.0;  // m = -inf on the first entry: exp(-inf) = 0
    m = z;
  } else {
    s += exp(z - m);
  }
}
// A thread's sum rescaled to the block's maximum M (>= m); an empty thread (s = 0) gives 0.
DIVKIT_HD inline double lse_rescale(double m, double s, double M) {
  return s > 0.0 ? s * exp(m - M) : 0.0;
}

// tau = rho / (rho + eps) for an unbalanced side, 1 for a balanced one.
DIVKIT_HD inline double tau(bool balanced, double rho, double eps) {
  return balanced ? 1.0 : rho / (rho + eps);
}
// The potential from the row's log-sum-exp: f_i = -tau eps LSE_j(h_j - C_ij / eps).
DIVKIT_HD inline double potential(double lse, double tau_side, double eps) {
  return -tau_side * eps * lse;
}

// The row's term of the L1 marginal residual of the plan (f_old, g) once f_new = T(g) is known:
// its row sum is a_i exp((f_old_i - f_new_i) / eps).
DIVKIT_HD inline double residual_term(double a, double f_old, double f_new, double eps) {
  return a * fabs(expm1((f_old - f_new) / eps));
}

// The symmetric (self-transport) averaged update f <- (f + T(f)) / 2.
DIVKIT_HD inline double average(double f, double f_new) { return 0.5 * (f + f_new); }

// e_ij = P_ij / a_i = exp(f_i / eps + h_j - C_ij / eps), from z and hr = f_i / eps.
DIVKIT_HD inline double plan_entry(double z, double hr) {
  return exp(fmin(fmax(z + hr, kExpLo), kExpHi));
}
// The weight of an entry in the point gradient: dC/dx = 2 (x - y) for p = 2 (weight e; the
// factor 2 comes at the end), (x - y) / |x - y| for p = 1 (weight e / C, 0 at coincident
// points).
DIVKIT_HD inline double grad_weight(double e, double c, int p) {
  return p == 2 ? e : (c > 0.0 ? e / c : 0.0);
}
// grad x_i = coeff_i sum_j w_ij (x_i - y_j): coeff = 2 a_i for p = 2, a_i for p = 1.
DIVKIT_HD inline double grad_coeff(double a, int p) { return p == 2 ? 2.0 * a : a; }

// The dual objective's per-point term F: w pot (balanced) or -rho w (exp(-pot / rho) - 1),
// and its derivative in pot.
DIVKIT_HD inline double dual_term(double w, double pot, bool balanced, double rho) {
  return balanced ? w * pot : -rho * w * expm1(-pot / rho);
}
DIVKIT_HD inline double dual_grad(double pot, bool balanced, double rho) {
  return balanced ? pot : -rho * expm1(-pot / rho);
}

}  // namespace divkit::ot_scalar
