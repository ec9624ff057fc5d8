// The CUDA path of divkit::sinkhorn: batched log-domain Sinkhorn with the cost computed on the
// fly from the points (or held: a given cost matrix, or a cached one within cost_cache_bytes),
// the problem, options and results of the CPU solver (include/divkit/ot.h), the per-entry math
// of sinkhorn_scalar.h.
//
// Precision: everything in fp64 (points and costs converted once on the device, potentials, every
// sum), whatever the inputs' dtype, as the PyTorch fallback does. The CPU solver computes the
// costs and exps in the inputs' dtype with fp64 potentials and sums, so float64 inputs agree with
// it to rounding (~1e-12) and float32 inputs to float32 rounding. fp64 runs at half the fp32
// rate on an H100 and at 1/64 of it on consumer GPUs; fp32 costs would be the next step there.
//
// Structure (B problems iterate together, each frozen by a device flag once it has converged):
//   - a half-iteration is one block of kThreads threads per tile of kRows rows (grid: row tiles x
//     problems): each thread walks the columns j = t, t + kThreads, ..., computes the kRows costs
//     of its column (the column's coordinates read once for the kRows rows, from the transposed
//     points, coalesced), and keeps an online log-sum-exp per row in registers; the block then
//     combines the threads' (max, sum) pairs with fixed-order block reductions;
//   - one block per problem checks the marginal residual, averages (symmetric) and freezes
//     converged problems; the host reads the problems' active flags back every kSyncEvery
//     iterations (as the fallback), so up to kSyncEvery - 1 launches of frozen work follow the
//     last convergence (their blocks return at once);
//   - the final pass (plan rows, then plan columns when grad_y or grad_b is asked) sums the plan,
//     its cost and the gradient weights per row, writes the plan, and accumulates the point
//     gradient sum_j w_ij (x_i - y_j) chunk by chunk of kThreads columns through shared memory.
// Every sum has one order (no float atomics; integer atomics only for min / max and the first
// bad index), so two runs give the same bits. Input checks run on the device and are read back
// once (one synchronization) before the iterations, so the errors are the CPU's.
// options.sync = false (CUDA graph capture): nothing is read back and nothing is copied from the
// host: the eps schedule comes from sched_kernel, all max_iter iterations are launched (the
// frozen problems' blocks return at once: the same results), and results_kernel writes the
// per-problem results (NaN where the device checks flagged the inputs) to out.stats.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "core/check.h"
#include "core/cuda_common.cuh"
#include "ot/sinkhorn_cuda.h"
#include "ot/sinkhorn_scalar.h"

namespace divkit::detail {
namespace {

using namespace cuda_common;  // NOLINT(build/namespaces): the shared device helpers
namespace os = ot_scalar;

constexpr const char* kFn = "sinkhorn";
constexpr int kRows = 8;             // rows per block in the row kernels
constexpr int64_t kSyncEvery = 16;   // iterations between two reads of the active flags
constexpr int64_t kMaxStages = 200;  // eps-scaling stages at most (the CPU's bound)
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxBlocks1d = int64_t{1} << 16;  // grid-stride kernels
constexpr double kInf = std::numeric_limits<double>::infinity();

// bad[]: the first flat index of each kind of bad input (kNone: none).
enum BadSlot : int {
  kXNonFinite,
  kYNonFinite,
  kCostNonFinite,
  kANonFinite,
  kANegative,
  kBNonFinite,
  kBNegative,
  kSymPoints,
  kSymWeights,
  kBadSlots
};

// One side as the row kernels see it (sinkhorn.cc's OtSide): rows are this side's points, columns
// the other side's; the g update uses the same kernels with the sides swapped.
struct Side {
  int64_t nr = 0, nc = 0, d = 0;
  int p = 2;
  const double* X = nullptr;   // [B][nr][d] the rows' points
  const double* Y = nullptr;   // [B][nc][d] the columns' points
  const double* YT = nullptr;  // [B][d][nc] the same, transposed (coalesced column reads)
  const double* C = nullptr;   // [B][nr][nc] the cost when held, else nullptr (on the fly)
};

// The eps of problem b at iteration it: the schedule [B][cols], padded with eps.
__device__ inline double sched_eps(const double* sched, int64_t cols, int64_t b, int64_t it) {
  return sched[b * cols + (it < cols - 1 ? it : cols - 1)];
}

// The costs of the kRows rows ir[] against column j of problem b.
__device__ inline void tile_costs(const Side& s, int64_t b, const int64_t (&ir)[kRows], int64_t j,
                                  double (&c)[kRows]) {
  if (s.C != nullptr) {
    const double* C = s.C + b * s.nr * s.nc + j;
#pragma unroll
    for (int r = 0; r < kRows; ++r) c[r] = C[ir[r] * s.nc];
    return;
  }
  const int64_t d = s.d;
  const double* yt = s.YT + b * d * s.nc + j;
  const double* x = s.X + b * s.nr * d;
#pragma unroll
  for (int r = 0; r < kRows; ++r) c[r] = 0.0;
  for (int64_t k = 0; k < d; ++k) {
    const double yk = yt[k * s.nc];
#pragma unroll
    for (int r = 0; r < kRows; ++r) c[r] = os::cost_step(c[r], __ldg(x + ir[r] * d + k), yk);
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) c[r] = os::cost_finish(c[r], s.p);
}

__device__ inline void tile_rows(int64_t i0, int64_t nr, int64_t (&ir)[kRows]) {
#pragma unroll
  for (int r = 0; r < kRows; ++r) ir[r] = i0 + r < nr ? i0 + r : nr - 1;
}

// ---------------------------------------------------------------------------------------------
// Input conversion and checks.

struct In3 {
  const void* data = nullptr;
  DType dtype = DType::f64;
  int64_t s0 = 0, s1 = 0, s2 = 0;
};

__device__ inline void flag(unsigned long long* bad, int slot, int64_t index) {
  atomicMin(bad + slot, static_cast<unsigned long long>(index));
}

// Points [B][cnt][d] (any strides, f32 / f64) -> P [B][cnt][d] and PT [B][d][cnt] in fp64; the
// first non-finite value's flat index.
__global__ void __launch_bounds__(kThreads)
    points_kernel(In3 src, int64_t B, int64_t cnt, int64_t d, double* P, double* PT,
                  unsigned long long* bad, int slot) {
  const int64_t total = B * cnt * d;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = e / (cnt * d), i = (e / d) % cnt, k = e % d;
    const double v = load_f64(src.data, src.dtype, b * src.s0 + i * src.s1 + k * src.s2);
    if (!isfinite(v)) flag(bad, slot, e);
    P[e] = v;
    PT[(b * d + k) * cnt + i] = v;
  }
}

// (hi - lo)^2 of coordinate k = blockIdx.x of problem b = blockIdx.y over both clouds (exact:
// min and max do not round).
__global__ void __launch_bounds__(kThreads)
    box_kernel(const double* XT, const double* YT, int64_t n, int64_t m, int64_t d, int64_t b0,
               double* range2) {
  __shared__ double sh[kWarps];
  const int64_t k = blockIdx.x, b = b0 + blockIdx.y;
  double lo = kInf, hi = -kInf;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    const double v = XT[(b * d + k) * n + i];
    lo = fmin(lo, v);
    hi = fmax(hi, v);
  }
  for (int64_t j = threadIdx.x; j < m; j += kThreads) {
    const double v = YT[(b * d + k) * m + j];
    lo = fmin(lo, v);
    hi = fmax(hi, v);
  }
  lo = -block_reduce(-lo, MaxOpD{}, sh);
  hi = block_reduce(hi, MaxOpD{}, sh);
  if (threadIdx.x == 0) range2[b * d + k] = (hi - lo) * (hi - lo);
}

// scale[b] = D^p from the coordinates' squared ranges, summed in coordinate order (the CPU's).
__global__ void scale_kernel(const double* range2, int64_t B, int64_t d, int p, double* scale) {
  for (int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; b < B;
       b += int64_t(gridDim.x) * blockDim.x) {
    double s = 0.0;
    for (int64_t k = 0; k < d; ++k) s += range2[b * d + k];
    scale[b] = p == 2 ? s : sqrt(s);
  }
}

// A given cost [B][n][m] (any strides) -> C [B][n][m] in fp64; the first non-finite value; the
// largest |C| of each problem, reduced in the block (exact) and merged with an integer atomicMax
// on the bits of a non-negative double (which order as the values).
__global__ void __launch_bounds__(kThreads)
    cost_in_kernel(In3 src, int64_t n, int64_t m, int64_t b0, double* C,
                   unsigned long long* cmax_bits, unsigned long long* bad) {
  __shared__ double sh[kWarps];
  const int64_t b = b0 + blockIdx.y, nm = n * m;
  double mx = 0.0;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < nm;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = e / m, j = e % m;
    const double v = load_f64(src.data, src.dtype, b * src.s0 + i * src.s1 + j * src.s2);
    if (isfinite(v)) mx = fmax(mx, fabs(v));
    else flag(bad, kCostNonFinite, b * nm + e);
    C[b * nm + e] = v;
  }
  mx = block_reduce(mx, MaxOpD{}, sh);
  if (threadIdx.x == 0)
    atomicMax(cmax_bits + b, static_cast<unsigned long long>(__double_as_longlong(mx)));
}

__global__ void bits_to_double_kernel(const unsigned long long* bits, int64_t B, double* out) {
  for (int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; b < B;
       b += int64_t(gridDim.x) * blockDim.x)
    out[b] = __longlong_as_double(static_cast<long long>(bits[b]));
}

// CT [B][m][n] from C [B][n][m].
__global__ void __launch_bounds__(kThreads)
    transpose_kernel(const double* C, int64_t B, int64_t n, int64_t m, double* CT) {
  const int64_t total = B * n * m;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = e / (n * m), j = (e / n) % m, i = e % n;
    CT[e] = C[(b * n + i) * m + j];
  }
}

// The cost of the rows of s against all columns, held: C [B][nr][nc], by the on-the-fly tiles
// (so the held and the recomputed costs are bitwise equal).
__global__ void __launch_bounds__(kThreads) cost_kernel(Side s, int64_t b0, double* C) {
  const int64_t b = b0 + blockIdx.y, i0 = int64_t(blockIdx.x) * kRows;
  int64_t ir[kRows];
  tile_rows(i0, s.nr, ir);
  for (int64_t j = threadIdx.x; j < s.nc; j += kThreads) {
    double c[kRows];
    tile_costs(s, b, ir, j, c);
#pragma unroll
    for (int r = 0; r < kRows; ++r)
      if (i0 + r < s.nr) C[(b * s.nr + i0 + r) * s.nc + j] = c[r];
  }
}

// Weights of problem b = blockIdx.x (uniform 1 / cnt when not given): W, log W (-inf for 0), the
// total in a fixed order; the first non-finite and the first negative weight.
__global__ void __launch_bounds__(kThreads)
    weights_kernel(In3 src, int64_t cnt, double* W, double* LW, double* sum,
                   unsigned long long* bad, int nonfinite_slot, int negative_slot) {
  __shared__ double sh[kWarps];
  const int64_t b = blockIdx.x;
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < cnt; i += kThreads) {
    const double v = src.data == nullptr ? 1.0 / static_cast<double>(cnt)
                                         : load_f64(src.data, src.dtype, b * src.s0 + i * src.s1);
    if (!isfinite(v)) flag(bad, nonfinite_slot, b * cnt + i);
    else if (v < 0) flag(bad, negative_slot, b * cnt + i);
    W[b * cnt + i] = v;
    LW[b * cnt + i] = v > 0 ? log(v) : -kInf;
    s += v;
  }
  s = block_reduce(s, SumOp{}, sh);
  if (threadIdx.x == 0) sum[b] = s;
}

// Symmetric problems: the first index where y differs from x, and where b differs from a.
__global__ void __launch_bounds__(kThreads)
    equal_kernel(const double* u, const double* v, int64_t total, unsigned long long* bad,
                 int slot) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x)
    if (u[e] != v[e]) flag(bad, slot, e);
}

// ---------------------------------------------------------------------------------------------
// The iterations.

struct State {
  int* active = nullptr;  // [B] still iterating
  int* run_g = nullptr;   // [B] this iteration's g update runs (active before the check)
  int* conv = nullptr;    // [B]
  int64_t* n_iter = nullptr;
  int64_t* n_stage = nullptr;  // [B] eps-scaling stages
  double* err = nullptr;       // [B] the last residual checked
};

__global__ void init_kernel(State st, int64_t B) {
  for (int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; b < B;
       b += int64_t(gridDim.x) * blockDim.x) {
    st.active[b] = 1;
    st.run_g[b] = 0;
    st.conv[b] = 0;
    st.n_iter[b] = 0;
    st.err[b] = kInf;
  }
}

// h [B][cnt] = log w + pot / eps for the problems whose flag in run is set (run == nullptr: all).
__global__ void __launch_bounds__(kThreads)
    h_kernel(int64_t B, int64_t cnt, const double* LW, const double* pot, const double* sched,
             int64_t scols, int64_t it, const int* run, double* h) {
  const int64_t total = B * cnt;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = e / cnt;
    if (run != nullptr && !run[b]) continue;
    h[e] = os::h_entry(LW[e], pot[e], sched_eps(sched, scols, b, it));
  }
}

struct LseArgs {
  Side s;
  const double* h = nullptr;  // [B][nc]
  const double* sched = nullptr;
  int64_t scols = 1, it = 0;
  const int* run = nullptr;  // [B]
  bool balanced = true;
  double rho = kInf;
  double* out = nullptr;  // [B][nr] the new potential
  int64_t b0 = 0;
};

// out_i = -tau eps LSE_j(h_j - C_ij / eps) for the kRows rows of this block.
__global__ void __launch_bounds__(kThreads) lse_kernel(LseArgs a) {
  __shared__ double sh[kWarps];
  const int64_t b = a.b0 + blockIdx.y;
  if (!a.run[b]) return;  // the whole block: before any barrier
  const Side& s = a.s;
  const int64_t i0 = int64_t(blockIdx.x) * kRows;
  int64_t ir[kRows];
  tile_rows(i0, s.nr, ir);
  const double eps = sched_eps(a.sched, a.scols, b, a.it), inv_eps = 1.0 / eps;
  double mx[kRows], sm[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    mx[r] = -kInf;
    sm[r] = 0.0;
  }
  const double* h = a.h + b * s.nc;
  for (int64_t j = threadIdx.x; j < s.nc; j += kThreads) {
    double c[kRows];
    tile_costs(s, b, ir, j, c);
    const double hj = h[j];
#pragma unroll
    for (int r = 0; r < kRows; ++r) os::lse_push(mx[r], sm[r], os::z_entry(hj, c[r], inv_eps));
  }
  const double t = os::tau(a.balanced, a.rho, eps);
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const double M = block_reduce(mx[r], MaxOpD{}, sh);
    const double S = block_reduce(os::lse_rescale(mx[r], sm[r], M), SumOp{}, sh);
    if (threadIdx.x == 0 && i0 + r < s.nr)
      a.out[b * s.nr + i0 + r] = os::potential(M + log(S), t, eps);
  }
}

struct StepArgs {
  int64_t n = 0;
  const double* a = nullptr;  // [B][n]
  double *f = nullptr, *g = nullptr;
  const double* fnew = nullptr;
  State st;
  int64_t it = 0, check_every = 1;
  double eps = 0.0, tol = 0.0;
  bool sym = false;
};

// One block per problem, after the f update: the residual check (every check_every iterations
// at eps), then f <- fnew (or the symmetric average, g = f), the iteration count and the flags.
__global__ void __launch_bounds__(kThreads) step_kernel(StepArgs p) {
  __shared__ double sh[kWarps];
  const int64_t b = blockIdx.x, n = p.n;
  const int active = p.st.active[b];
  const int64_t k = p.it - p.st.n_stage[b];  // iterations at eps so far (< 0 in the stages)
  __syncthreads();  // every thread has read the flags before thread 0 rewrites them
  if (!active) {
    if (threadIdx.x == 0) p.st.run_g[b] = 0;
    return;
  }
  // Meaningful once g came from an f at eps (k >= 1); symmetric: g = f throughout (k >= 0).
  const bool check = (p.sym ? k >= 0 : k >= 1) && k % p.check_every == 0;
  double* f = p.f + b * n;
  double* g = p.g + b * n;
  const double* fn = p.fnew + b * n;
  bool done = false;
  if (check) {
    const double* w = p.a + b * n;
    double e = 0.0;
    for (int64_t i = threadIdx.x; i < n; i += kThreads)
      e += os::residual_term(w[i], f[i], fn[i], p.eps);
    e = block_reduce(e, SumOp{}, sh);
    done = e <= p.tol;
    if (threadIdx.x == 0) p.st.err[b] = e;
  }
  // Each thread rewrites only the entries it read.
  if (p.sym) {
    if (!done)
      for (int64_t i = threadIdx.x; i < n; i += kThreads) f[i] = g[i] = os::average(f[i], fn[i]);
  } else {
    for (int64_t i = threadIdx.x; i < n; i += kThreads) f[i] = fn[i];
  }
  if (threadIdx.x == 0) {
    if (!(p.sym && done)) p.st.n_iter[b] += 1;  // symmetric: a converged f is kept, not averaged
    p.st.run_g[b] = p.sym ? 0 : 1;
    if (done) {
      p.st.conv[b] = 1;
      p.st.active[b] = 0;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The final pass.

struct PlanArgs {
  Side s;
  const double* h = nullptr;    // [B][nc] at eps
  const double* pot = nullptr;  // [B][nr] this side's potential
  const double* w = nullptr;    // [B][nr] this side's weights (the plan's row scale)
  double eps = 0.0;
  double *S = nullptr, *Cs = nullptr, *Wsum = nullptr;  // [B][nr]
  double* G = nullptr;   // [B][nr][d] sum_j w_ij (x_i - y_j), zeroed before; nullptr: not asked
  void* plan = nullptr;  // [B][nr][nc] (rows side only)
  bool plan_f64 = true;
  int64_t ps0 = 0, ps1 = 0;
  int64_t b0 = 0;
};

__global__ void __launch_bounds__(kThreads) plan_kernel(PlanArgs a) {
  __shared__ double sh[kWarps];
  __shared__ double wsh[kRows][kThreads];  // the chunk's gradient weights (16 KiB)
  const Side& s = a.s;
  const int64_t b = a.b0 + blockIdx.y, i0 = int64_t(blockIdx.x) * kRows, d = s.d;
  int64_t ir[kRows];
  tile_rows(i0, s.nr, ir);
  const double inv_eps = 1.0 / a.eps;
  double hr[kRows], ar[kRows], se[kRows], sc[kRows], sw[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    hr[r] = a.pot[b * s.nr + ir[r]] / a.eps;
    ar[r] = a.w[b * s.nr + ir[r]];
    se[r] = sc[r] = sw[r] = 0.0;
  }
  const double* h = a.h + b * s.nc;
  const bool grad = a.G != nullptr;
  for (int64_t j0 = 0; j0 < s.nc; j0 += kThreads) {
    const int64_t j = j0 + threadIdx.x;
    if (j < s.nc) {
      double c[kRows];
      tile_costs(s, b, ir, j, c);
      const double hj = h[j];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const double e = os::plan_entry(os::z_entry(hj, c[r], inv_eps), hr[r]);
        const double wv = os::grad_weight(e, c[r], s.p);
        se[r] += e;
        sc[r] = fma(e, c[r], sc[r]);
        sw[r] += wv;
        if (grad) wsh[r][threadIdx.x] = wv;
        if (a.plan != nullptr && i0 + r < s.nr) {
          const int64_t at = b * a.ps0 + (i0 + r) * a.ps1 + j;
          if (a.plan_f64) static_cast<double*>(a.plan)[at] = ar[r] * e;
          else static_cast<float*>(a.plan)[at] = static_cast<float>(ar[r] * e);
        }
      }
    }
    if (grad) {
      __syncthreads();  // the chunk's weights are in wsh
      const int64_t jn = s.nc - j0 < kThreads ? s.nc - j0 : kThreads;
      // (row, coordinate) pairs over the threads: each pair always has the same thread, which
      // adds its chunks in order.
      for (int64_t q = threadIdx.x; q < kRows * d; q += kThreads) {
        const int r = static_cast<int>(q / d);
        const int64_t k = q % d;
        if (i0 + r >= s.nr) continue;
        const double xk = s.X[(b * s.nr + i0 + r) * d + k];
        const double* y = s.Y + (b * s.nc + j0) * d + k;
        double acc = 0.0;
        for (int64_t jj = 0; jj < jn; ++jj) acc = fma(wsh[r][jj], xk - y[jj * d], acc);
        a.G[(b * s.nr + i0 + r) * d + k] += acc;
      }
      __syncthreads();  // before the next chunk overwrites wsh
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const double S = block_reduce(se[r], SumOp{}, sh);
    const double Cs = block_reduce(sc[r], SumOp{}, sh);
    const double W = block_reduce(sw[r], SumOp{}, sh);
    if (threadIdx.x == 0 && i0 + r < s.nr) {
      a.S[b * s.nr + i0 + r] = S;
      a.Cs[b * s.nr + i0 + r] = Cs;
      a.Wsum[b * s.nr + i0 + r] = W;
    }
  }
}

struct Out2 {
  double* p = nullptr;
  int64_t s0 = 0, s1 = 0;
};
struct Out3 {
  double* p = nullptr;
  int64_t s0 = 0, s1 = 0, s2 = 0;
};

constexpr int kStats = 8;  // tc, mass, rerr, F_a, F_b, n_iter, err, converged

struct FinishArgs {
  int64_t n = 0, m = 0;
  const double *a = nullptr, *bw = nullptr, *f = nullptr, *g = nullptr;
  const double *Sr = nullptr, *Cr = nullptr, *Sc = nullptr;  // Sc: nullptr unless grad_b
  const double *ma = nullptr, *mb = nullptr;
  double eps = 0.0, rho_a = kInf, rho_b = kInf;
  bool bal_a = true, bal_b = true;
  Out2 f_out, g_out, ga, gb;
  State st;
  double* stats = nullptr;  // [B][kStats]
};

// One block per problem: the per-problem sums in a fixed order, f, g, grad a, grad b.
__global__ void __launch_bounds__(kThreads) finish_kernel(FinishArgs p) {
  __shared__ double sh[kWarps];
  const int64_t b = blockIdx.x, n = p.n, m = p.m;
  const double* a = p.a + b * n;
  const double* f = p.f + b * n;
  const double* Sr = p.Sr + b * n;
  double tc = 0.0, mass = 0.0, rerr = 0.0, Fa = 0.0, Fb = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    tc += a[i] * p.Cr[b * n + i];
    mass += a[i] * Sr[i];
    rerr += fabs(a[i] * Sr[i] - a[i]);
    Fa += os::dual_term(a[i], f[i], p.bal_a, p.rho_a);
    p.f_out.p[b * p.f_out.s0 + i * p.f_out.s1] = f[i];
    if (p.ga.p != nullptr)
      p.ga.p[b * p.ga.s0 + i * p.ga.s1] =
          os::dual_grad(f[i], p.bal_a, p.rho_a) - p.eps * (Sr[i] - p.mb[b]);
  }
  const double* bw = p.bw + b * m;
  const double* g = p.g + b * m;
  for (int64_t j = threadIdx.x; j < m; j += kThreads) {
    Fb += os::dual_term(bw[j], g[j], p.bal_b, p.rho_b);
    p.g_out.p[b * p.g_out.s0 + j * p.g_out.s1] = g[j];
    if (p.gb.p != nullptr)
      p.gb.p[b * p.gb.s0 + j * p.gb.s1] =
          os::dual_grad(g[j], p.bal_b, p.rho_b) - p.eps * (p.Sc[b * m + j] - p.ma[b]);
  }
  tc = block_reduce(tc, SumOp{}, sh);
  mass = block_reduce(mass, SumOp{}, sh);
  rerr = block_reduce(rerr, SumOp{}, sh);
  Fa = block_reduce(Fa, SumOp{}, sh);
  Fb = block_reduce(Fb, SumOp{}, sh);
  if (threadIdx.x == 0) {
    double* o = p.stats + b * kStats;
    o[0] = tc;
    o[1] = mass;
    o[2] = rerr;
    o[3] = Fa;
    o[4] = Fb;
    o[5] = static_cast<double>(p.st.n_iter[b]);
    o[6] = p.st.err[b];
    o[7] = p.st.conv[b] ? 1.0 : 0.0;
  }
}

// grad [B][cnt][d] = coeff(w_i) G_i (the point gradient from its accumulated sum).
__global__ void __launch_bounds__(kThreads) grad_kernel(const double* G, const double* W, int64_t B,
                                                        int64_t cnt, int64_t d, int p, Out3 out) {
  const int64_t total = B * cnt * d;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = e / (cnt * d), i = (e / d) % cnt, k = e % d;
    out.p[b * out.s0 + i * out.s1 + k * out.s2] = os::grad_coeff(W[b * cnt + i], p) * G[e];
  }
}

// sync = false: the eps schedule of each problem from its scale (the host loop of the sync path,
// the same multiplications in the same order), padded with eps to scols columns.
__global__ void sched_kernel(const double* scale, int64_t B, double eps, double s, int64_t scols,
                             double* sched, int64_t* n_stage) {
  for (int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; b < B;
       b += int64_t(gridDim.x) * blockDim.x) {
    int64_t cnt = 0;
    if (s > 0)
      for (double e = scale[b]; e > eps && cnt < kMaxStages; e *= s) sched[b * scols + cnt++] = e;
    n_stage[b] = cnt;
    for (int64_t k = cnt; k < scols; ++k) sched[b * scols + k] = eps;
  }
}

struct ResultArgs {
  int64_t B = 0;
  const double* stats = nullptr;  // [B][kStats] from finish_kernel
  const unsigned long long* bad = nullptr;
  const double *ma = nullptr, *mb = nullptr;
  double eps = 0.0, tol = 0.0;
  bool bal = true;  // balanced on both sides
  Out2 out;         // [B][6]: transport_cost, reg_cost, mass, n_iter, marginal_error, converged
};

// SinkhornOutputs::stats on the device: the host's finishing step of the sync path (the same
// operations, rounded one by one: no contraction into fused multiply-adds, as on the host), and
// NaN results where the inputs would have thrown (sync = false reads no flags).
__global__ void results_kernel(ResultArgs p) {
  for (int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; b < p.B;
       b += int64_t(gridDim.x) * blockDim.x) {
    const double* o = p.stats + b * kStats;
    bool conv = o[7] != 0.0;
    double err = o[6];
    if (!isfinite(err) && !conv) err = kInf;
    const double rerr = o[2];
    double merr = p.bal ? rerr : err;
    if (p.bal && !conv && p.tol > 0 && rerr <= p.tol) conv = true;
    const double sa = p.ma[b], sb = p.mb[b];
    double tc = o[0], mass = o[1];
    double reg =
        __dsub_rn(__dadd_rn(o[3], o[4]), __dmul_rn(p.eps, __dsub_rn(mass, __dmul_rn(sa, sb))));
    bool bad = !(sa > 0) || !(sb > 0) || (p.bal && fabs(sa - sb) > 1e-6 * fmax(sa, sb));
    for (int k = 0; k < kBadSlots; ++k) bad = bad || p.bad[k] != kNone;
    if (bad) {
      tc = reg = mass = merr = nan("");
      conv = false;
    }
    const double row[6] = {tc, reg, mass, o[5], merr, conv ? 1.0 : 0.0};
    for (int k = 0; k < 6; ++k) p.out.p[b * p.out.s0 + k * p.out.s1] = row[k];
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

unsigned blocks_for(int64_t total) {
  const int64_t b = (total + kThreads - 1) / kThreads;
  return static_cast<unsigned>(std::clamp<int64_t>(b, 1, kMaxBlocks1d));
}

// Launches f(b0, nb) for the problems in chunks of at most kMaxGridY (the grid's y limit).
template <class F>
void over_problems(int64_t B, F&& f) {
  for (int64_t b0 = 0; b0 < B; b0 += kMaxGridY)
    f(b0, static_cast<unsigned>(std::min(B - b0, kMaxGridY)));
}

In3 in3(const TensorView& t) {
  In3 r;
  if (!t.defined()) return r;
  r.data = t.data;
  r.dtype = t.dtype;
  r.s0 = t.strides[0];
  r.s1 = t.ndim > 1 ? t.strides[1] : 0;
  r.s2 = t.ndim > 2 ? t.strides[2] : 0;
  return r;
}
Out2 out2(const TensorView& t) {
  if (!t.defined()) return {};
  return {static_cast<double*>(t.data), t.strides[0], t.strides[1]};
}
Out3 out3(const TensorView& t) {
  if (!t.defined()) return {};
  return {static_cast<double*>(t.data), t.strides[0], t.strides[1], t.strides[2]};
}

// One stream-ordered allocation carved into 256-byte aligned pieces; freed on the way out.
class Workspace {
 public:
  explicit Workspace(cudaStream_t stream) : stream_(stream) {}
  ~Workspace() {
    if (base_ != nullptr) cudaFreeAsync(base_, stream_);
  }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  // First pass: reserve(count) returns the offset; then allocate(); then at<T>(offset).
  template <class T>
  int64_t reserve(int64_t count) {
    const int64_t off = bytes_;
    bytes_ += (std::max<int64_t>(count, 1) * int64_t(sizeof(T)) + 255) / 256 * 256;
    return off;
  }
  void allocate() {
    check_cuda(kFn, cudaMallocAsync(&base_, static_cast<size_t>(bytes_), stream_),
               "cudaMallocAsync");
  }
  template <class T>
  T* at(int64_t off) const {
    return reinterpret_cast<T*>(static_cast<char*>(base_) + off);
  }

 private:
  cudaStream_t stream_;
  void* base_ = nullptr;
  int64_t bytes_ = 0;
};

void launched(const char* what) { check_cuda(kFn, cudaGetLastError(), what); }

std::string idx2(int64_t b, int64_t i) {
  std::string s(1, '[');
  s += std::to_string(b);
  s += ", ";
  s += std::to_string(i);
  s += ']';
  return s;
}
std::string idx3(int64_t b, int64_t i, int64_t k) {
  std::string s = idx2(b, i);
  s.pop_back();
  s += ", ";
  s += std::to_string(k);
  s += ']';
  return s;
}

}  // namespace

std::vector<SinkhornStats> sinkhorn_cuda(const SinkhornInputs& in, const SinkhornOptions& opt,
                                         const SinkhornOutputs& out, int64_t B, int64_t n,
                                         int64_t m, int64_t d, int device) {
  using check::fail;
  const bool points = in.x.defined();
  const bool sym = opt.symmetric;
  if (sym && (!points || n != m))
    fail(kFn, "symmetric needs points with y equal to x (a self-transport problem)");
  if (B == 0) return {};
  DeviceGuard guard(kFn, device);
  const auto stream = reinterpret_cast<cudaStream_t>(opt.stream);
  const bool bal_a = std::isinf(opt.rho_a), bal_b = std::isinf(opt.rho_b);
  const bool want_gx = points && out.grad_x.defined();
  const bool want_gy = points && out.grad_y.defined();
  const bool want_gb = out.grad_b.defined();
  // Held cost: a given one always; points when the cost and its transpose for the whole batch
  // fit in cost_cache_bytes (fp64).
  const bool held = !points || 2.0 * double(B) * double(n) * double(m) * 8.0 <=
                                   static_cast<double>(opt.cost_cache_bytes);

  Workspace ws(stream);
  const int64_t o_bad = ws.reserve<unsigned long long>(kBadSlots + 3 * B);  // + ma, mb, scale
  const int64_t o_X = points ? ws.reserve<double>(B * n * d) : 0;
  const int64_t o_XT = points ? ws.reserve<double>(B * n * d) : 0;
  const int64_t o_Y = points ? ws.reserve<double>(B * m * d) : 0;
  const int64_t o_YT = points ? ws.reserve<double>(B * m * d) : 0;
  const int64_t o_r2 = points ? ws.reserve<double>(B * d) : 0;
  const int64_t o_C = held ? ws.reserve<double>(B * n * m) : 0;
  const int64_t o_CT = held ? ws.reserve<double>(B * n * m) : 0;
  const int64_t o_cmax = ws.reserve<unsigned long long>(B);
  int64_t o_n[8], o_m[7];  // [B][n]: a, la, f, fnew, hn, Sr, Cr, Wr; [B][m]: b, lb, g, hm, Sc,
                           // Cc, Wc
  for (auto& o : o_n) o = ws.reserve<double>(B * n);
  for (auto& o : o_m) o = ws.reserve<double>(B * m);
  const int64_t o_Gx = want_gx ? ws.reserve<double>(B * n * d) : 0;
  const int64_t o_Gy = want_gy ? ws.reserve<double>(B * m * d) : 0;
  const int64_t o_state_i = ws.reserve<int>(3 * B);
  const int64_t o_state_l = ws.reserve<int64_t>(2 * B);
  const int64_t o_err = ws.reserve<double>(B);
  const int64_t o_stats = ws.reserve<double>(B * kStats);
  ws.allocate();

  auto* bad = ws.at<unsigned long long>(o_bad);
  auto* ma = reinterpret_cast<double*>(bad + kBadSlots);
  double* mb = ma + B;
  double* scale = mb + B;
  double *A = ws.at<double>(o_n[0]), *LA = ws.at<double>(o_n[1]), *f = ws.at<double>(o_n[2]),
         *fnew = ws.at<double>(o_n[3]), *hn = ws.at<double>(o_n[4]), *Sr = ws.at<double>(o_n[5]),
         *Cr = ws.at<double>(o_n[6]), *Wr = ws.at<double>(o_n[7]);
  double *Bw = ws.at<double>(o_m[0]), *LB = ws.at<double>(o_m[1]), *g = ws.at<double>(o_m[2]),
         *hm = ws.at<double>(o_m[3]), *Sc = ws.at<double>(o_m[4]), *Cc = ws.at<double>(o_m[5]),
         *Wc = ws.at<double>(o_m[6]);
  State st;
  st.active = ws.at<int>(o_state_i);
  st.run_g = st.active + B;
  st.conv = st.active + 2 * B;
  st.n_iter = ws.at<int64_t>(o_state_l);
  st.n_stage = st.n_iter + B;
  st.err = ws.at<double>(o_err);

  Side rows, cols;
  rows.nr = cols.nc = n;
  rows.nc = cols.nr = m;
  rows.d = cols.d = d;
  rows.p = cols.p = opt.p;

  // 1. Inputs to fp64 on the device, checked; the masses and the scale of eps scaling.
  check_cuda(kFn, cudaMemsetAsync(bad, 0xFF, kBadSlots * sizeof(unsigned long long), stream),
             "cudaMemsetAsync");
  if (points) {
    double *X = ws.at<double>(o_X), *XT = ws.at<double>(o_XT), *Y = ws.at<double>(o_Y),
           *YT = ws.at<double>(o_YT), *r2 = ws.at<double>(o_r2);
    DIVKIT_LAUNCH(points_kernel, blocks_for(B * n * d), kThreads, 0, stream)
    (in3(in.x), B, n, d, X, XT, bad, kXNonFinite);
    launched("the points kernel launch");
    DIVKIT_LAUNCH(points_kernel, blocks_for(B * m * d), kThreads, 0, stream)
    (in3(in.y), B, m, d, Y, YT, bad, kYNonFinite);
    launched("the points kernel launch");
    over_problems(B, [&](int64_t b0, unsigned nb) {
      DIVKIT_LAUNCH(box_kernel, dim3(static_cast<unsigned>(d), nb), kThreads, 0, stream)
      (XT, YT, n, m, d, b0, r2);
    });
    launched("the bounding box kernel launch");
    DIVKIT_LAUNCH(scale_kernel, blocks_for(B), kThreads, 0, stream)(r2, B, d, opt.p, scale);
    launched("the scale kernel launch");
    if (sym) {
      DIVKIT_LAUNCH(equal_kernel, blocks_for(B * n * d), kThreads, 0, stream)
      (X, Y, B * n * d, bad, kSymPoints);
      launched("the symmetry check launch");
    }
    rows.X = cols.Y = X;
    rows.Y = cols.X = Y;
    rows.YT = YT;
    cols.YT = XT;
    if (held) {
      double *C = ws.at<double>(o_C), *CT = ws.at<double>(o_CT);
      const unsigned tiles_n = static_cast<unsigned>((n + kRows - 1) / kRows);
      const unsigned tiles_m = static_cast<unsigned>((m + kRows - 1) / kRows);
      over_problems(B, [&](int64_t b0, unsigned nb) {
        DIVKIT_LAUNCH(cost_kernel, dim3(tiles_n, nb), kThreads, 0, stream)(rows, b0, C);
        DIVKIT_LAUNCH(cost_kernel, dim3(tiles_m, nb), kThreads, 0, stream)(cols, b0, CT);
      });
      launched("the cost kernel launch");
      rows.C = C;
      cols.C = CT;
    }
  } else {
    double *C = ws.at<double>(o_C), *CT = ws.at<double>(o_CT);
    auto* cmax = ws.at<unsigned long long>(o_cmax);
    check_cuda(kFn, cudaMemsetAsync(cmax, 0, B * sizeof(unsigned long long), stream),
               "cudaMemsetAsync");
    const unsigned per =
        static_cast<unsigned>(std::clamp<int64_t>((n * m + kThreads - 1) / kThreads, 1, 1024));
    over_problems(B, [&](int64_t b0, unsigned nb) {
      DIVKIT_LAUNCH(cost_in_kernel, dim3(per, nb), kThreads, 0, stream)
      (in3(in.cost), n, m, b0, C, cmax, bad);
    });
    launched("the cost conversion launch");
    DIVKIT_LAUNCH(transpose_kernel, blocks_for(B * n * m), kThreads, 0, stream)(C, B, n, m, CT);
    launched("the transpose kernel launch");
    DIVKIT_LAUNCH(bits_to_double_kernel, blocks_for(B), kThreads, 0, stream)(cmax, B, scale);
    launched("the scale kernel launch");
    rows.C = C;
    cols.C = CT;
  }
  DIVKIT_LAUNCH(weights_kernel, static_cast<unsigned>(B), kThreads, 0, stream)
  (in3(in.a), n, A, LA, ma, bad, kANonFinite, kANegative);
  DIVKIT_LAUNCH(weights_kernel, static_cast<unsigned>(B), kThreads, 0, stream)
  (in3(in.b), m, Bw, LB, mb, bad, kBNonFinite, kBNegative);
  launched("the weights kernel launch");
  if (sym) {
    DIVKIT_LAUNCH(equal_kernel, blocks_for(B * n), kThreads, 0, stream)
    (A, Bw, B * n, bad, kSymWeights);
    launched("the symmetry check launch");
  }
  const double eps = opt.eps;
  std::vector<double> h_ma(static_cast<size_t>(B)), h_mb(h_ma.size());  // the masses (sync)
  // The eps schedule [B][scols]: a second allocation, its size known only after the read back
  // (sync). Freed on every way out (the guard).
  Workspace ws2(stream);
  double* d_sched = nullptr;
  int64_t scols = 1;
  if (opt.sync) {
    std::vector<unsigned long long> head(static_cast<size_t>(kBadSlots + 3 * B));
    check_cuda(kFn,
               cudaMemcpyAsync(head.data(), bad, head.size() * sizeof(unsigned long long),
                               cudaMemcpyDeviceToHost, stream),
               "cudaMemcpyAsync");
    check_cuda(kFn, cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    std::vector<double> h_scale(h_ma.size());
    const size_t bytes_b = h_ma.size() * sizeof(double);
    std::memcpy(h_ma.data(), head.data() + kBadSlots, bytes_b);
    std::memcpy(h_mb.data(), head.data() + kBadSlots + B, bytes_b);
    std::memcpy(h_scale.data(), head.data() + kBadSlots + 2 * B, bytes_b);

    // 2. The errors, in the CPU's words.
    auto first = [&](int slot) { return static_cast<int64_t>(head[static_cast<size_t>(slot)]); };
    auto is_bad = [&](int slot) { return head[static_cast<size_t>(slot)] != kNone; };
    auto read_one = [&](const double* dev, int64_t at) {
      double v = 0.0;
      check_cuda(kFn, cudaMemcpy(&v, dev + at, sizeof(double), cudaMemcpyDeviceToHost),
                 "cudaMemcpy");
      return v;
    };
    // The CPU checks problem by problem and stops at the first error: in each problem x, y (or
    // the cost), a (its elements in order, non-finite or negative), sum a, b, sum b, the masses,
    // the symmetry. Each kind's first index above is in the first problem that has it, so the
    // CPU's error is the kind with the smallest (problem, rank) (the message built only then).
    int64_t err_problem = B;
    int err_rank = 0;
    std::function<std::string()> err_message;
    auto consider = [&](int64_t problem, int rank, std::function<std::string()> message) {
      if (problem < err_problem || (problem == err_problem && rank < err_rank)) {
        err_problem = problem;
        err_rank = rank;
        err_message = std::move(message);
      }
    };
    for (auto [slot, name, cnt, rank] :
         {std::tuple{kXNonFinite, "x", n, 0}, std::tuple{kYNonFinite, "y", m, 1}})
      if (is_bad(slot)) {
        // Plain copies: lambdas capture no structured bindings before C++20.
        const int64_t e = first(slot), c = cnt;
        const std::string nm = name;
        consider(e / (c * d), rank, [=] {
          return nm + " has a non-finite value (NaN or inf) at " +
                 idx3(e / (c * d), (e / d) % c, e % d);
        });
      }
    if (is_bad(kCostNonFinite)) {
      const int64_t e = first(kCostNonFinite);
      consider(e / (n * m), 0, [=] {
        return "cost has a non-finite value at " + idx3(e / (n * m), (e / m) % n, e % m);
      });
    }
    for (auto [nf, neg, name, cnt, W, rank] :
         {std::tuple{kANonFinite, kANegative, "a", n, A, 2},
          std::tuple{kBNonFinite, kBNegative, "b", m, Bw, 4}}) {
      // The weights' first bad element, non-finite or negative (flat indices order the
      // problems, then the elements).
      const int64_t c = cnt;
      const std::string nm = name;
      if (is_bad(nf) && (!is_bad(neg) || first(nf) < first(neg))) {
        const int64_t e = first(nf);
        consider(e / c, rank,
                 [=] { return nm + " has a non-finite value at " + idx2(e / c, e % c); });
      } else if (is_bad(neg)) {
        const int64_t e = first(neg);
        const double* w = W;
        consider(e / c, rank, [=] {
          return nm + " has a negative weight " + std::to_string(read_one(w, e)) + " at " +
                 idx2(e / c, e % c);
        });
      }
    }
    for (int64_t b = 0; b < B; ++b) {
      if (!(h_ma[static_cast<size_t>(b)] > 0))
        consider(b, 3, [=] { return "a sums to 0 in problem " + std::to_string(b); });
      if (!(h_mb[static_cast<size_t>(b)] > 0))
        consider(b, 5, [=] { return "b sums to 0 in problem " + std::to_string(b); });
    }
    if (bal_a && bal_b)
      for (int64_t b = 0; b < B; ++b) {
        const double sa = h_ma[static_cast<size_t>(b)], sb = h_mb[static_cast<size_t>(b)];
        if (std::abs(sa - sb) > 1e-6 * std::max(sa, sb))
          consider(b, 6, [=] {
            return "a and b must have equal total mass for a balanced problem (or give rho for "
                   "an unbalanced one), got sum a = " +
                   std::to_string(sa) + ", sum b = " + std::to_string(sb) + " in problem " +
                   std::to_string(b);
          });
      }
    if (is_bad(kSymPoints)) {
      const int64_t e = first(kSymPoints);
      consider(e / (n * d), 7, [=] {
        return "symmetric needs y equal to x, they differ at " +
               idx3(e / (n * d), (e / d) % n, e % d);
      });
    }
    if (is_bad(kSymWeights)) {
      const int64_t b = first(kSymWeights) / n;
      consider(b, 8,
               [=] { return "symmetric needs b equal to a (problem " + std::to_string(b) + ")"; });
    }
    if (sym && opt.rho_a != opt.rho_b)
      consider(0, 9, [] { return std::string("symmetric needs rho_a equal to rho_b"); });
    if (err_message) fail(kFn, err_message());

    // 3. The eps schedule of each problem (the CPU's loop), padded with eps: [B][cols].
    std::vector<std::vector<double>> stages(static_cast<size_t>(B));
    int64_t n_st = 0;
    if (opt.eps_scaling > 0)
      for (int64_t b = 0; b < B; ++b) {
        auto& s = stages[static_cast<size_t>(b)];
        for (double e = h_scale[static_cast<size_t>(b)];
             e > eps && static_cast<int64_t>(s.size()) < kMaxStages; e *= opt.eps_scaling)
          s.push_back(e);
        n_st = std::max<int64_t>(n_st, static_cast<int64_t>(s.size()));
      }
    scols = n_st + 1;
    std::vector<double> sched(static_cast<size_t>(B * scols), eps);
    std::vector<int64_t> n_stage(static_cast<size_t>(B));
    for (int64_t b = 0; b < B; ++b) {
      const auto& s = stages[static_cast<size_t>(b)];
      std::copy(s.begin(), s.end(), sched.begin() + b * scols);
      n_stage[static_cast<size_t>(b)] = static_cast<int64_t>(s.size());
    }
    const int64_t o_sched = ws2.reserve<double>(B * scols);
    ws2.allocate();
    d_sched = ws2.at<double>(o_sched);
    check_cuda(kFn,
               cudaMemcpyAsync(d_sched, sched.data(), sched.size() * sizeof(double),
                               cudaMemcpyHostToDevice, stream),
               "cudaMemcpyAsync");
    check_cuda(kFn,
               cudaMemcpyAsync(st.n_stage, n_stage.data(), n_stage.size() * sizeof(int64_t),
                               cudaMemcpyHostToDevice, stream),
               "cudaMemcpyAsync");
  } else {
    if (sym && opt.rho_a != opt.rho_b) fail(kFn, "symmetric needs rho_a equal to rho_b");
    // No host read: every problem's schedule from its scale, on the device, padded to the
    // longest possible one. The input checks stay on the device (results_kernel reads them).
    scols = opt.eps_scaling > 0 ? kMaxStages + 1 : 1;
    const int64_t o_sched = ws2.reserve<double>(B * scols);
    ws2.allocate();
    d_sched = ws2.at<double>(o_sched);
    DIVKIT_LAUNCH(sched_kernel, blocks_for(B), kThreads, 0, stream)
    (scale, B, eps, opt.eps_scaling, scols, d_sched, st.n_stage);
    launched("the schedule kernel launch");
  }
  DIVKIT_LAUNCH(init_kernel, blocks_for(B), kThreads, 0, stream)(st, B);
  launched("the init kernel launch");
  check_cuda(kFn, cudaMemsetAsync(f, 0, B * n * sizeof(double), stream), "cudaMemsetAsync");
  check_cuda(kFn, cudaMemsetAsync(g, 0, B * m * sizeof(double), stream), "cudaMemsetAsync");

  // 4. The iterations.
  const unsigned tiles_n = static_cast<unsigned>((n + kRows - 1) / kRows);
  const unsigned tiles_m = static_cast<unsigned>((m + kRows - 1) / kRows);
  auto fill_h = [&](int64_t cnt, const double* LW, const double* pot, int64_t it, const int* run,
                    double* h) {
    DIVKIT_LAUNCH(h_kernel, blocks_for(B * cnt), kThreads, 0, stream)
    (B, cnt, LW, pot, d_sched, scols, it, run, h);
    launched("the h kernel launch");
  };
  // One side of a half-iteration or of the final pass: the rows (f, from g over the columns)
  // or the columns (g, from f over the rows).
  enum class Half { rows, cols };
  struct HalfSide {
    const Side* s;
    unsigned tiles;
    int64_t other_cnt;       // the other side's point count (h's length)
    const double* other_lw;  // the other side's log weights
    const double* w;         // this side's weights
    double* h;               // [B][other_cnt] scratch for h
    bool balanced;
    double rho;
    double *S, *Cs, *Wsum;  // the final pass's row sums
  };
  auto side = [&](Half hf) {
    return hf == Half::rows ? HalfSide{&rows, tiles_n, m, LB, A, hm, bal_a, opt.rho_a, Sr, Cr, Wr}
                            : HalfSide{&cols, tiles_m, n, LA, Bw, hn, bal_b, opt.rho_b, Sc, Cc, Wc};
  };
  // The log-sum-exp update of one side for the problems whose flag in run is set: h from the
  // other side's potential other_pot, then pot_out_i = -tau eps LSE_j(h_j - C_ij / eps).
  auto lse_update = [&](Half hf, const double* other_pot, int64_t it, const int* run,
                        double* pot_out) {
    const HalfSide hs = side(hf);
    fill_h(hs.other_cnt, hs.other_lw, other_pot, it, run, hs.h);
    LseArgs la;
    la.s = *hs.s;
    la.h = hs.h;
    la.sched = d_sched;
    la.scols = scols;
    la.it = it;
    la.run = run;
    la.balanced = hs.balanced;
    la.rho = hs.rho;
    la.out = pot_out;
    over_problems(B, [&](int64_t b0, unsigned nb) {
      la.b0 = b0;
      DIVKIT_LAUNCH(lse_kernel, dim3(hs.tiles, nb), kThreads, 0, stream)(la);
    });
    launched("the log-sum-exp kernel launch");
  };
  StepArgs sp;
  sp.n = n;
  sp.a = A;
  sp.f = f;
  sp.g = g;
  sp.fnew = fnew;
  sp.st = st;
  sp.check_every = opt.check_every;
  sp.eps = eps;
  sp.tol = opt.tol;
  sp.sym = sym;
  std::vector<int> active(static_cast<size_t>(B));
  for (int64_t it = 0; it < opt.max_iter; ++it) {
    // f update from g (symmetric: g = f, b = a), on the rows.
    lse_update(Half::rows, g, it, st.active, fnew);
    sp.it = it;
    DIVKIT_LAUNCH(step_kernel, static_cast<unsigned>(B), kThreads, 0, stream)(sp);
    launched("the step kernel launch");
    if (!sym) lse_update(Half::cols, f, it, st.run_g, g);
    if (opt.sync && (it + 1) % kSyncEvery == 0 && it + 1 < opt.max_iter) {
      check_cuda(kFn,
                 cudaMemcpyAsync(active.data(), st.active, active.size() * sizeof(int),
                                 cudaMemcpyDeviceToHost, stream),
                 "cudaMemcpyAsync");
      check_cuda(kFn, cudaStreamSynchronize(stream), "cudaStreamSynchronize");
      if (std::none_of(active.begin(), active.end(), [](int v) { return v != 0; })) break;
    }
  }

  // 5. The final pass at eps: the plan's rows (and columns for grad y / grad b), the sums.
  constexpr int64_t kAtEps = std::numeric_limits<int64_t>::max();  // the schedule's last column
  double* Gx = want_gx ? ws.at<double>(o_Gx) : nullptr;
  double* Gy = want_gy ? ws.at<double>(o_Gy) : nullptr;
  if (Gx != nullptr)
    check_cuda(kFn, cudaMemsetAsync(Gx, 0, B * n * d * sizeof(double), stream), "cudaMemsetAsync");
  if (Gy != nullptr)
    check_cuda(kFn, cudaMemsetAsync(Gy, 0, B * m * d * sizeof(double), stream), "cudaMemsetAsync");
  // The final pass over one side: its plan row sums (and the plan itself for the rows, the
  // point gradient sums G when asked), from this side's potential pot and the other's.
  auto plan_pass = [&](Half hf, const double* pot, const double* other_pot, double* G) {
    const HalfSide hs = side(hf);
    fill_h(hs.other_cnt, hs.other_lw, other_pot, kAtEps, nullptr, hs.h);
    PlanArgs pa;
    pa.s = *hs.s;
    pa.h = hs.h;
    pa.pot = pot;
    pa.w = hs.w;
    pa.eps = eps;
    pa.S = hs.S;
    pa.Cs = hs.Cs;
    pa.Wsum = hs.Wsum;
    pa.G = G;
    if (hf == Half::rows && out.plan.defined()) {
      pa.plan = out.plan.data;
      pa.plan_f64 = out.plan.dtype == DType::f64;
      pa.ps0 = out.plan.strides[0];
      pa.ps1 = out.plan.strides[1];
    }
    over_problems(B, [&](int64_t b0, unsigned nb) {
      pa.b0 = b0;
      DIVKIT_LAUNCH(plan_kernel, dim3(hs.tiles, nb), kThreads, 0, stream)(pa);
    });
    launched("the plan kernel launch");
  };
  plan_pass(Half::rows, f, g, Gx);
  if (want_gy || want_gb) plan_pass(Half::cols, g, f, Gy);
  FinishArgs fa;
  fa.n = n;
  fa.m = m;
  fa.a = A;
  fa.bw = Bw;
  fa.f = f;
  fa.g = g;
  fa.Sr = Sr;
  fa.Cr = Cr;
  fa.Sc = want_gb ? Sc : nullptr;
  fa.ma = ma;
  fa.mb = mb;
  fa.eps = eps;
  fa.rho_a = opt.rho_a;
  fa.rho_b = opt.rho_b;
  fa.bal_a = bal_a;
  fa.bal_b = bal_b;
  fa.f_out = out2(out.f);
  fa.g_out = out2(out.g);
  fa.ga = out2(out.grad_a);
  fa.gb = out2(out.grad_b);
  fa.st = st;
  fa.stats = ws.at<double>(o_stats);
  DIVKIT_LAUNCH(finish_kernel, static_cast<unsigned>(B), kThreads, 0, stream)(fa);
  launched("the finish kernel launch");
  if (want_gx) {
    DIVKIT_LAUNCH(grad_kernel, blocks_for(B * n * d), kThreads, 0, stream)
    (Gx, A, B, n, d, opt.p, out3(out.grad_x));
    launched("the gradient kernel launch");
  }
  if (want_gy) {
    DIVKIT_LAUNCH(grad_kernel, blocks_for(B * m * d), kThreads, 0, stream)
    (Gy, Bw, B, m, d, opt.p, out3(out.grad_y));
    launched("the gradient kernel launch");
  }
  if (out.stats.defined()) {
    ResultArgs ra;
    ra.B = B;
    ra.stats = fa.stats;
    ra.bad = bad;
    ra.ma = ma;
    ra.mb = mb;
    ra.eps = eps;
    ra.tol = opt.tol;
    ra.bal = bal_a && bal_b;
    ra.out = out2(out.stats);
    DIVKIT_LAUNCH(results_kernel, blocks_for(B), kThreads, 0, stream)(ra);
    launched("the results kernel launch");
  }
  if (!opt.sync) return {};
  std::vector<double> stats(static_cast<size_t>(B * kStats));
  check_cuda(kFn,
             cudaMemcpyAsync(stats.data(), fa.stats, stats.size() * sizeof(double),
                             cudaMemcpyDeviceToHost, stream),
             "cudaMemcpyAsync");
  check_cuda(kFn, cudaStreamSynchronize(stream), "cudaStreamSynchronize");

  // 6. The results, as the CPU's solve_one finishes them.
  std::vector<SinkhornStats> res(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    const double* o = stats.data() + b * kStats;
    SinkhornStats& r = res[static_cast<size_t>(b)];
    r.transport_cost = o[0];
    r.mass = o[1];
    r.n_iter = static_cast<int64_t>(o[5]);
    r.converged = o[7] != 0.0;
    double err = o[6];
    if (!std::isfinite(err) && !r.converged) err = kInf;
    const double rerr = o[2];
    r.marginal_error = (bal_a && bal_b) ? rerr : err;
    if (bal_a && bal_b && !r.converged && opt.tol > 0 && rerr <= opt.tol) r.converged = true;
    r.reg_cost =
        o[3] + o[4] - eps * (r.mass - h_ma[static_cast<size_t>(b)] * h_mb[static_cast<size_t>(b)]);
  }
  return res;
}

}  // namespace divkit::detail
