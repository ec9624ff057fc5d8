// divkit: entropic optimal transport between weighted point clouds or histograms.
//
// Problem (Cuturi 2013; log-domain form as in Peyre & Cuturi, "Computational Optimal Transport",
// 2019, and in OTT-JAX / GeomLoss). Given weights a[n] >= 0, b[m] >= 0 and a cost C[n, m],
//
//   OT_eps(a, b) = min_P <P, C> + eps KL(P || a (x) b)
//                  + rho_a KL(P 1 || a) + rho_b KL(P^T 1 || b)        (unbalanced terms)
//
// with the marginal constraints P 1 = a, P^T 1 = b instead of the two KL penalties in the
// balanced problem (rho = +inf). The cost between points is
//
//   C_ij = |x_i - y_j|^p,  p in {1, 2},   |.| the Euclidean norm
//
// i.e. p = 2 is the SQUARED distance, as POT's ot.dist and OTT's SqEuclidean (GeomLoss's "p=2"
// uses |x - y|^2 / 2: divide our eps and costs by 2 to compare).
//
// Dual potentials f[n], g[m] give the plan P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps) and are
// found by log-domain Sinkhorn iterations (alternating, stable log-sum-exp):
//
//   f_i <- -tau_a eps LSE_j( log b_j + (g_j - C_ij) / eps ),   tau_a = rho_a / (rho_a + eps)
//   g_j <- -tau_b eps LSE_i( log a_i + (f_i - C_ij) / eps ),   tau_b = rho_b / (rho_b + eps)
//
// (tau = 1 for the balanced problem). For point clouds C_ij is computed on the fly in blocks of
// rows x columns: memory is O((n + m) d) per problem, never n x m unless the plan is requested,
// except for small problems, where the cost and its transpose are computed once and cached
// when 2 n m sizeof(T) <= cost_cache_bytes (default 64 MiB: n = m <= ~2900 in float32, ~2000
// in float64), computed by one GEMM as |x|^2 + |y|^2 - 2 x.y clamped at 0 for p = 2 and d > 8
// (as the on-the-fly path expands it; results agree to rounding), else by the on-the-fly tiles
// (bitwise equal). cost_cache_bytes = 0 always computes on the fly. A balanced problem whose
// stored cost (given or cached) leaves room in cost_cache_bytes for the kernel K = exp((f0 + g0
// - C) / eps) and its transpose iterates in the kernel domain with absorption (Schmitzer 2019:
// one multiply-add an entry instead of one exp; f0, g0 reset to the current potentials when
// they drift by more than 15 eps in float32, 50 eps in float64); the iterates agree with the
// log-domain ones to rounding, and the first iteration at eps and eps scaling stay in the log
// domain.
//
// Stopping: after each f update, the L1 marginal residual of the previous plan
//   err = sum_i | a_i exp((f_old_i - f_new_i) / eps) - a_i |
// (for the balanced problem exactly || P 1 - a ||_1 of the plan (f_old, g), whose columns are
// exact) is compared with `tol` every `check_every` iterations. The iterations stop at
// err <= tol or after max_iter iterations; not reaching tol is reported (converged = false),
// never hidden.
//
// Epsilon scaling (optional): eps_k = max(D^p * s^k, eps) where D is the diameter of the
// bounding box of both clouds (or D^p := max C for a cost matrix) and s = eps_scaling in (0, 1);
// one iteration per eps_k > eps, then iterations at eps until tol (as GeomLoss's annealing).
//
// Results per problem: f, g, transport_cost = <P, C>, reg_cost = the dual objective
//   D(f, g) = F_a(f) + F_b(g) - eps (sum_ij P_ij - |a| |b|),
//   F_a(f) = <a, f> (balanced)  or  -rho_a <a, exp(-f / rho_a) - 1> (unbalanced),
// which equals OT_eps(a, b) at the optimum (a lower bound before it), n_iter, marginal_error
// (balanced: || P 1 - a ||_1 of the returned f, g, whose columns are exact after the final g
// update; unbalanced: the last residual err above), converged, and the plan on request.
//
// Gradients of reg_cost (envelope theorem: f, g are optimal, so no differentiation through the
// iterations): d/dx_i = sum_j P_ij dC_ij/dx_i, d/dy_j = sum_i P_ij dC_ij/dy_j,
// d/da_i = F_a'(f)_i - eps (sum_j b_j exp((f_i + g_j - C_ij)/eps) - |b|), likewise for b, and
// d/dC = P. For the balanced problem the a-gradient is f_i up to a constant (exactly f_i - eps
// (1 - |b|) at convergence), only meaningful along directions that keep sum a fixed.
//
// dtypes: points and cost float32 or float64 (the kernels compute in that precision, with the
// potentials and all sums in float64); weights float32 or float64; outputs float64 (the plan
// float32 or float64).
//
// CUDA: when the views are on a CUDA device (all on one; outputs too), the problems run on the
// GPU (src/ot/sinkhorn_cuda.cu) on SinkhornOptions::stream, with the same problem, options and
// results, in float64 throughout whatever the inputs' dtype, log-domain updates only (no
// kernel-domain iterations), the cost held (given, or cached when the cost and its transpose for
// the whole batch take at most cost_cache_bytes in float64) or computed on the fly. The B
// problems iterate together; float64 inputs agree with the CPU to rounding, float32 inputs to
// float32 rounding. Not yet run on a GPU (docs/gpu.md).
#pragma once

#include <cstdint>
#include <limits>
#include <vector>

#include "divkit/tensor.h"

namespace divkit {

struct SinkhornOptions {
  double eps = 0.0;          // > 0, absolute (in cost units)
  int p = 2;                 // cost exponent for point clouds: 1 or 2
  double tol = 1e-6;         // >= 0, on the L1 marginal residual
  int64_t max_iter = 1000;   // >= 1
  int64_t check_every = 1;   // >= 1
  double eps_scaling = 0.0;  // 0: off; otherwise the factor s in (0, 1)
  double rho_a = std::numeric_limits<double>::infinity();  // > 0; +inf: balanced on a's side
  double rho_b = std::numeric_limits<double>::infinity();
  // Point clouds: cache the n x m cost (and its transpose) when they take at most this many
  // bytes (padded to multiples of 64 columns); >= 0, 0: always compute on the fly.
  int64_t cost_cache_bytes = int64_t{64} << 20;
  // Self-transport OT(a, a) (requires y == x, b == a, rho_a == rho_b): g = f throughout and the
  // averaged update f <- (f + T(f)) / 2 of Feydy et al. (2019), which converges in far fewer
  // iterations at small eps than alternating updates; each iteration is one pass over the
  // points. The outputs are those of the general solver (g = f, grad_y = grad_x, ...).
  bool symmetric = false;
  // CUDA inputs (every view on one CUDA device): the cudaStream_t the kernels run on, as an
  // integer (0: the default stream). With sync = true the call synchronizes with the stream to
  // read the input checks once and the convergence flags every 16 iterations, and returns when
  // the results are written. Ignored for CPU inputs.
  std::uintptr_t stream = 0;
  // CUDA inputs. false: no host read, no synchronization and no host-to-device copy (the call
  // can be captured in a CUDA graph): a fixed schedule of max_iter iterations (up to 2 max_iter
  // log-sum-exp launches, whatever the convergence; a problem that has converged is frozen by
  // its device flag, its blocks return at once, so every output equals the sync = true one),
  // the eps-scaling schedule computed on the device, and the per-problem results written to
  // SinkhornOutputs::stats (required) instead of the returned vector, which is then empty.
  // Bad input cannot throw there: the input checks run on the device, and a call whose inputs
  // would have thrown gets NaN in transport_cost, reg_cost, mass and marginal_error and
  // converged = 0 (every problem for bad values, the problem alone for a zero total weight or
  // unequal masses); f, g, the plan and the gradients then mean nothing. The kernels' scratch
  // memory is one cudaMallocAsync / cudaFreeAsync pair on the stream (memory nodes of the graph
  // under capture). CPU inputs: the solver has nothing to read back, the results are the same
  // as with true (stats is required there too, and filled).
  bool sync = true;
};

// Inputs of a batch of B independent problems. Either points (x [B, n, d], y [B, m, d]) or a
// cost matrix (cost [B, n, m]); weights a [B, n], b [B, m] optional (uniform 1/n, 1/m).
struct SinkhornInputs {
  TensorView x, y;
  TensorView cost;
  TensorView a, b;
};

// Outputs: f [B, n] and g [B, m] float64 required; the others optional (defined() == false:
// not computed). grad_x [B, n, d], grad_y [B, m, d], grad_a [B, n], grad_b [B, m] float64 are
// the gradients of reg_cost; plan [B, n, m] float32 or float64.
struct SinkhornOutputs {
  TensorView f, g;
  TensorView plan;
  TensorView grad_x, grad_y, grad_a, grad_b;
  // Optional float64 [B, 6] (required when SinkhornOptions::sync is false): per problem the
  // SinkhornStats fields transport_cost, reg_cost, mass, n_iter, marginal_error, converged (1 or
  // 0), in that column order, written on the views' device.
  TensorView stats;
};

struct SinkhornStats {
  double transport_cost = 0.0;  // <P, C>
  double reg_cost = 0.0;        // dual objective D(f, g) (see above)
  double mass = 0.0;            // sum_ij P_ij
  int64_t n_iter = 0;
  double marginal_error = 0.0;
  bool converged = false;
};

// Solves B problems; throws divkit::Error naming the argument for bad input: eps <= 0 or not
// finite, p not in {1, 2}, tol < 0, max_iter < 1, check_every < 1, eps_scaling outside
// {0} U (0, 1), rho <= 0, cost_cache_bytes < 0, symmetric with y != x or b != a, shape or dtype
// mismatches, non-finite points or costs, negative or non-finite weights, a zero total weight, and
// (balanced) unequal masses |sum a - sum b| > 1e-6 max(sum a, sum b).
std::vector<SinkhornStats> sinkhorn(const SinkhornInputs& in, const SinkhornOptions& opt,
                                    const SinkhornOutputs& out);

// Quadratically regularized and sparsity-constrained OT between histograms a[n], b[m] with a
// cost C[n, m] (Blondel, Seguy and Rolet, "Smooth and Sparse Optimal Transport", 2018; Liu,
// Puigcerver and Blondel, "Sparsity-Constrained Optimal Transport", 2023):
//
//   min_P <P, C> + (gamma / 2) ||P||_F^2   s.t.  P 1 = a, P^T 1 = b, P >= 0,
//                                                and with k >= 1: at most k non-zeros per column.
//
// Solved through the semi-dual (the column constraints eliminated, P_:j = b_j t_j):
//
//   V(alpha) = <alpha, a> - sum_j b_j phi_j(alpha),
//   phi_j(alpha) = max_{t in Delta_k} <t, alpha - C_:j> - (gamma b_j / 2) |t|^2,
//
// whose inner maximizer is the Euclidean projection of (alpha - C_:j) / (gamma b_j) onto the
// k-sparse simplex: the k largest entries projected onto the simplex (Kyrillidis et al. 2013).
// V is concave and piecewise quadratic with gradient a - P 1; it is maximized by L-BFGS (history
// 20, strong-Wolfe line search, the history dropped when a step fails) from alpha = 0, in
// float64, until ||P 1 - a||_1 <= tol, max_iter iterations, or V stalls (no rise beyond rounding
// in 50 iterations). The same problem as POT's ot.smooth.smooth_ot_semi_dual (reg_type 'l2', or
// 'sparsity_constrained' with max_nz = k).
//
// With k >= 1 the semi-dual is a convex relaxation of the (nonconvex) constrained problem, and
// nonsmooth where a column's top-k set changes. Where the constraint binds, the plan read off
// its maximizer need not meet the row marginals (k = 1 with generic weights cannot: each column
// goes to one row); the solver then stops when V stalls and reports converged = false with the
// marginal error reached, never a plan that claims to be feasible.
//
// Results: the plan in COO form (row-major order, only non-zeros; columns sum exactly to b),
// transport_cost <P, C>, reg_cost = V(alpha) (which equals <P, C> + gamma/2 ||P||^2 at the
// optimum when k = 0; with k >= 1 the semi-dual is a relaxation, see Liu et al. 2023), n_iter,
// marginal_error ||P 1 - a||_1, converged. alpha [n] (float64, required) receives the
// potential; grad_b [m] (float64, optional) dV/db_j = -(<t_j, alpha - C_:j> - gamma b_j |t_j|^2).
// By Danskin's theorem the other gradients need no output: dV/dC = P, and dV/da = alpha
// (meaningful only along directions that keep sum a fixed).
//
// Inputs float32 or float64 with any strides; computed in float64; O(n m) memory (a float64
// transpose of the cost). Each column is handled by one thread and every sum runs in a fixed
// order, so results do not depend on the thread count. Throws divkit::Error naming the argument
// for: shapes, dtypes, gamma <= 0 or not finite, k < 0, tol < 0, max_iter < 1, non-finite
// costs or weights, negative weights, a zero total weight, and |sum a - sum b| > 1e-6 max(sum a,
// sum b). A smaller mismatch (float32 rounding of the weights) is removed by scaling b to a's
// total: the plan's columns sum to b sum a / sum b.
struct SparseOtOptions {
  double gamma = 0.0;      // > 0, in cost units (the plan scales as 1 / gamma)
  int64_t k = 0;           // 0: no sparsity constraint; else at most k non-zeros per column
  double tol = 1e-6;       // >= 0, on ||P 1 - a||_1
  int64_t max_iter = 500;  // >= 1, L-BFGS iterations
};

struct SparseOtResult {
  std::vector<int64_t> row, col;  // the plan's non-zeros, row-major order
  std::vector<double> value;
  double transport_cost = 0.0;
  double reg_cost = 0.0;
  int64_t n_iter = 0;
  double marginal_error = 0.0;
  bool converged = false;
};

// Solves one problem: a [n], b [m], cost [n, m] (float32 or float64, any strides); writes the
// potential to alpha [n] (float64, required) and dV/db to grad_b [m] (float64, optional);
// throws divkit::Error naming the argument for bad input (see above).
SparseOtResult sparse_ot(const TensorView& a, const TensorView& b, const TensorView& cost,
                         const SparseOtOptions& opt, const TensorView& alpha,
                         const TensorView& grad_b);

// Maximum mean discrepancy and Cauchy-Schwarz divergence between weighted samples x [n, d]
// (weights a) and y [m, d] (weights b), with a kernel k:
//   gaussian  k(u, v) = exp(-|u - v|^2 / (2 sigma^2))
//   energy    k(u, v) = -|u - v|            (MMD^2 = the energy distance)
// MMD^2 = a'Kxx a + b'Kyy b - 2 a'Kxy b (biased V-statistic, Gretton et al. 2012);
// CS(x, y) = -log( (a'Kxy b)^2 / (a'Kxx a  b'Kyy b) ) (Cauchy-Schwarz divergence, Principe 2000;
// as used by CS-IB, Yu et al. 2024), gaussian kernel only, >= 0, 0 iff the densities' kernel
// embeddings are proportional. Both computed in float64 from float32/float64 points, O(n + m)
// memory; grad_x [n, d], grad_y [m, d] (float64, optional) are the gradients of the returned
// value.
enum class SampleKernel : int32_t { gaussian = 0, energy = 1 };
double mmd2(const TensorView& x, const TensorView& y, const TensorView& a, const TensorView& b,
            SampleKernel kernel, double sigma, const TensorView& grad_x, const TensorView& grad_y);
double cs_divergence(const TensorView& x, const TensorView& y, const TensorView& a,
                     const TensorView& b, double sigma, const TensorView& grad_x,
                     const TensorView& grad_y);

}  // namespace divkit
