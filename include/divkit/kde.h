// divkit: Gaussian kernel density estimation and its KL-optimal bandwidth.
//
// Estimator. Given data x[n, d] with weights w[n] >= 0 (uniform when not given) and an isotropic
// bandwidth h > 0,
//
//   p_h(y) = (1 / W) sum_i w_i N(y; x_i, h^2 I),   W = sum_i w_i
//   log p_h(y) = LSE_i( log w_i - |y - x_i|^2 / (2 h^2) ) - log W - (d / 2) log(2 pi h^2)
//
// computed in float64 by a streaming log-sum-exp over the data for each query point: memory
// O((n + m) d), never n x m; OpenMP over query points, each summed in data order, so the result
// does not depend on the thread count. (scipy.stats.gaussian_kde uses the kernel covariance
// factor^2 Cov(x): whiten x and y by Cov(x)^(-1/2) and subtract log |det Cov(x)^(1/2)| to
// compare.)
//
// KL-optimal bandwidth. For y_j drawn from the true density rho,
//
//   L(h) = (1/m) sum_j log p_h(y_j) -> E_rho[log p_h] = -KL(rho || p_h) - H(rho),
//
// so maximizing the held-out log-likelihood minimizes KL(rho || p_h), the criterion of "Kernel
// Density Estimators in Large Dimensions" (which finds the KL-optimal h, for log n / d fixed,
// below the bandwidth where the CLT regime of the estimator ends). With
// no held-out set, the leave-one-out likelihood of the data (each x_j scored by the estimator of
// the other points, weights renormalized) is used instead.
//
// The selector evaluates L on a grid of `grid` values of log h evenly spaced in
// [log h_min, log h_max] (h_min <= 0 or h_max <= 0: 1e-3 s and 10 s, s the root of the mean
// per-coordinate weighted variance of x, 1 if that is 0), then refines the best grid point by
// golden-section search on its two neighbouring intervals until the bracket in log h is shorter
// than `tol`. L is not guaranteed unimodal; the grid guards against the nearest local maximum.
#pragma once

#include <cstdint>
#include <vector>

#include "divkit/tensor.h"

namespace divkit {

// out[m] (float64): log p_h(y_j) for query points y[m, d]. x, y float32 or float64, finite;
// w optional [n], finite, >= 0, positive sum.
void kde_log_density(const TensorView& x, const TensorView& w, const TensorView& y,
                     double bandwidth, const TensorView& out);

// Mean held-out log-likelihood (1/m) sum_j log p_h(y_j); y not given (default view): the
// leave-one-out log-likelihood of x (needs n >= 2; points whose other weights sum to 0 are
// skipped). -inf when some point has zero density in float64.
double kde_log_likelihood(const TensorView& x, const TensorView& w, const TensorView& y,
                          double bandwidth);

struct KdeBandwidthOptions {
  double h_min = 0;   // <= 0: 1e-3 s (see above)
  double h_max = 0;   // <= 0: 10 s
  int32_t grid = 24;  // >= 3 grid points in log h
  double tol = 1e-4;  // golden-section bracket length in log h
  int32_t max_iter = 100;
};

struct KdeBandwidthResult {
  double bandwidth = 0;
  double log_likelihood = 0;  // L at the returned bandwidth
  int64_t n_evals = 0;        // evaluations of L
  std::vector<double> grid_bandwidths, grid_log_likelihoods;
};

// The bandwidth maximizing the held-out (y given) or leave-one-out (y not given)
// log-likelihood, i.e. minimizing KL(rho || p_h) up to the entropy of rho.
KdeBandwidthResult kde_select_bandwidth(const TensorView& x, const TensorView& w,
                                        const TensorView& y, const KdeBandwidthOptions& opt);

}  // namespace divkit
