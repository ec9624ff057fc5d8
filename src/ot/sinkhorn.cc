// Sinkhorn driver: argument checks, working buffers, the iteration loop (epsilon scaling,
// stopping on the marginal residual), and the final pass (costs, marginals, gradients, plan).
// The n x m work lives in ot_kernels.cc.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <memory>
#include <new>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "core/check.h"
#include "core/cuda_device.h"
#include "core/element.h"
#include "core/gemm.h"
#include "divkit/ot.h"
#include "divkit/runtime.h"
#include "hwy/aligned_allocator.h"
#include "ot/ot_job.h"
#include "ot/sinkhorn_cuda.h"

namespace divkit {
namespace {

constexpr const char* kFn = "sinkhorn";
using check::fail;
using check::shape_string;

bool is_f32_or_f64(DType d) { return d == DType::f32 || d == DType::f64; }

// The element offset of [i0, i1, i2] in a view of up to 3 dimensions (the indices past ndim are
// ignored).
int64_t offset(const TensorView& t, int64_t i0, int64_t i1 = 0, int64_t i2 = 0) {
  int64_t off = i0 * t.strides[0];
  if (t.ndim > 1) off += i1 * t.strides[1];
  if (t.ndim > 2) off += i2 * t.strides[2];
  return off;
}
double at(const TensorView& t, int64_t i0, int64_t i1 = 0, int64_t i2 = 0) {
  return elem::load(t.data, t.dtype, offset(t, i0, i1, i2));
}
double* at_out(const TensorView& t, int64_t i0, int64_t i1 = 0, int64_t i2 = 0) {
  return static_cast<double*>(t.data) + offset(t, i0, i1, i2);
}

std::string idx(int64_t b, int64_t i) {
  // Appended piece by piece: GCC 12's -Wrestrict misfires on "[" + std::to_string(b).
  std::string s(1, '[');
  s += std::to_string(b);
  s += ", ";
  s += std::to_string(i);
  s += ']';
  return s;
}

void check_view(const char* name, const TensorView& t, int ndim, const int64_t* shape,
                bool f64_only) {
  const std::string arg(name);
  // The device: sinkhorn() has checked that every view is on one (CPU or one CUDA device).
  bool ok = t.ndim == ndim;
  for (int i = 0; ok && i < ndim; ++i) ok = shape[i] < 0 || t.shape[i] == shape[i];
  if (!ok) {
    std::string want = "[";
    for (int i = 0; i < ndim; ++i)
      want += (i ? ", " : "") + (shape[i] < 0 ? std::string("*") : std::to_string(shape[i]));
    fail(kFn, arg + " must have shape " + want + "], got " + shape_string(t));
  }
  if (f64_only ? t.dtype != DType::f64 : !is_f32_or_f64(t.dtype))
    fail(kFn, arg + (f64_only ? " must be float64" : " must be float32 or float64") + ", got " +
                  dtype_name(t.dtype));
  if (t.numel() > 0 && t.data == nullptr) fail(kFn, arg + " has a null data pointer");
}

constexpr int64_t kStatsCols = 6;  // SinkhornOutputs::stats

void check_options(const SinkhornOptions& o) {
  if (!(std::isfinite(o.eps) && o.eps > 0))
    fail(kFn, "eps must be finite and > 0, got " + std::to_string(o.eps));
  if (o.p != 1 && o.p != 2) fail(kFn, "p must be 1 or 2, got " + std::to_string(o.p));
  if (!(o.tol >= 0)) fail(kFn, "tol must be >= 0, got " + std::to_string(o.tol));
  if (o.max_iter < 1) fail(kFn, "max_iter must be >= 1, got " + std::to_string(o.max_iter));
  if (o.check_every < 1)
    fail(kFn, "check_every must be >= 1, got " + std::to_string(o.check_every));
  if (!(o.eps_scaling == 0.0 || (o.eps_scaling > 0.0 && o.eps_scaling < 1.0)))
    fail(kFn, "eps_scaling must be 0 (off) or in (0, 1), got " + std::to_string(o.eps_scaling));
  if (!(o.rho_a > 0))
    fail(kFn, "rho_a must be > 0 (+inf: balanced), got " + std::to_string(o.rho_a));
  if (!(o.rho_b > 0))
    fail(kFn, "rho_b must be > 0 (+inf: balanced), got " + std::to_string(o.rho_b));
  if (o.cost_cache_bytes < 0)
    fail(kFn, "cost_cache_bytes must be >= 0, got " + std::to_string(o.cost_cache_bytes));
}

// Weights of problem b (uniform when not given), checked.
std::vector<double> load_weights(const char* name, const TensorView& w, int64_t b, int64_t n) {
  std::vector<double> v(static_cast<size_t>(n), 1.0 / static_cast<double>(n));
  if (!w.defined()) return v;
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double x = at(w, b, i);
    if (!std::isfinite(x)) fail(kFn, std::string(name) + " has a non-finite value at " + idx(b, i));
    if (x < 0)
      fail(kFn,
           std::string(name) + " has a negative weight " + std::to_string(x) + " at " + idx(b, i));
    v[static_cast<size_t>(i)] = x;
    sum += x;
  }
  if (!(sum > 0)) fail(kFn, std::string(name) + " sums to 0 in problem " + std::to_string(b));
  return v;
}

int64_t padded(int64_t n) { return (n + detail::kOtPad - 1) / detail::kOtPad * detail::kOtPad; }

template <typename T>
using Buf = hwy::AlignedFreeUniquePtr<T[]>;

template <typename T>
Buf<T> zeros(int64_t n) {
  auto p = hwy::AllocateAligned<T>(static_cast<size_t>(std::max<int64_t>(n, 1)));
  std::fill(p.get(), p.get() + std::max<int64_t>(n, 1), T(0));
  return p;
}

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
template <typename T>
using HugeBuf = std::unique_ptr<T[], FreeDeleter>;

// A cost matrix (given or cached), written once per call: 2 MiB-aligned and, on Linux, backed by
// transparent huge pages where the kernel allows it (madvise mode), as NumPy does for its large
// arrays. With 4 KiB pages the first-touch faults alone cost more than all the Sinkhorn iterations
// of a small problem.
template <typename T>
HugeBuf<T> alloc_huge(int64_t count) {
  constexpr size_t k2M = size_t{2} << 20;
  const size_t bytes =
      (static_cast<size_t>(std::max<int64_t>(count, 1)) * sizeof(T) + k2M - 1) / k2M * k2M;
  void* p = nullptr;
  if (posix_memalign(&p, k2M, bytes) != 0) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
  madvise(p, bytes, MADV_HUGEPAGE);  // advisory: a refusal only costs speed
#endif
  return HugeBuf<T>(static_cast<T*>(p));
}

// Both sides of one problem in the working precision T.
template <typename T>
struct Geometry {
  int64_t n = 0, m = 0, d = 0, npad = 0, mpad = 0;
  Buf<T> X, XT, Y, YT, xn, yn;
  HugeBuf<T> C, CT;           // the cost [n][mpad] and its transpose [m][npad] (given, or cached)
  detail::OtSide rows, cols;  // rows: x against y; cols: y against x
  double scale = 0.0;         // D^p (points) or max C (matrix): the start of eps scaling
};

template <typename T>
void load_points(const TensorView& src, const char* name, int64_t b, int64_t n, int64_t d,
                 const std::vector<double>& center, Buf<T>& rowmajor, Buf<T>& transposed,
                 int64_t npad) {
  rowmajor = zeros<T>(n * d);
  transposed = zeros<T>(d * npad);  // panels (ot_job.h)
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < d; ++k) {
      const T v = static_cast<T>(at(src, b, i, k) - center[static_cast<size_t>(k)]);
      rowmajor[i * d + k] = v;
      transposed[detail::PanelIndex(d, k, i)] = v;
    }
}

// Fills G.C [n][mpad] and its transpose G.CT [m][npad] and switches both sides to matrix mode.
// Expanded mode (p = 2, d > 8): C = |x|^2 + |y|^2 - 2 X Y^T by one GEMM, clamped at 0 as the
// on-the-fly tiles do (the expansion cancels for near-coincident points; the clouds are
// centered, which keeps the norms small). Otherwise (small d, or p = 1 where the square root
// would magnify that cancellation) the on-the-fly tiles themselves, so the values are bitwise
// those of the uncached path. Padded columns hold finite values; their h makes them vanish.
template <typename T>
void cache_cost(Geometry<T>& g) {
  const int64_t n = g.n, m = g.m, np = g.npad, mp = g.mpad;
  g.C = alloc_huge<T>(n * mp);
  g.CT = alloc_huge<T>(m * np);
  T* const C = g.C.get();
  T* const CT = g.CT.get();
  const bool gemm_path = g.rows.mode == detail::OtCostMode::expanded;
  if (!gemm_path) detail::ot_cost_rows(g.rows, C);
  // Fixed blocks of rows, each a single-threaded GEMM (so the values do not depend on the
  // thread count, which a multi-threaded BLAS call does not promise), then one pass that
  // finishes the expansion (+ |x_i|^2 + |y_j|^2, clamp) and writes the block's part of the
  // transpose, so that both sides read the same values. Padded columns hold 0.
  constexpr int64_t kB = 64;
  const int64_t nblocks = (n + kB - 1) / kB;
  const T* xn = g.xn.get();
  const T* yn = g.yn.get();
  if (gemm_path) gemm::set_blas_threads(1);
#pragma omp parallel for num_threads(get_num_threads()) \
    schedule(static) if (n * m * (gemm_path ? g.d : 1) >= (int64_t{1} << 22))
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    const int64_t i0 = blk * kB, i1 = std::min(i0 + kB, n);
    if (gemm_path) {
      gemm::abt(i1 - i0, m, g.d, T(-2), g.X.get() + i0 * g.d, g.d, g.Y.get(), g.d, T(0),
                C + i0 * mp, mp);
      for (int64_t i = i0; i < i1; ++i) {
        T* row = C + i * mp;
        const T xi = xn[i];
        for (int64_t j = 0; j < m; ++j) row[j] = std::max(row[j] + (xi + yn[j]), T(0));
      }
    }
    for (int64_t i = i0; i < i1; ++i) std::fill(C + i * mp + m, C + (i + 1) * mp, T(0));
    constexpr int64_t kT = 16;
    for (int64_t j0 = 0; j0 < m; j0 += kT)
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t j = j0; j < std::min(j0 + kT, m); ++j) CT[j * np + i] = C[i * mp + j];
  }
  for (int64_t j = 0; j < m; ++j) std::fill(CT + j * np + n, CT + (j + 1) * np, T(0));
  g.rows.mode = g.cols.mode = detail::OtCostMode::matrix;
  g.rows.C = C;
  g.cols.C = CT;
}

template <typename T>
Geometry<T> make_geometry(const SinkhornInputs& in, int64_t b, int p, int64_t cache_bytes) {
  Geometry<T> g;
  const bool points = in.x.defined();
  if (points) {
    g.n = in.x.shape[1];
    g.m = in.y.shape[1];
    g.d = in.x.shape[2];
  } else {
    g.n = in.cost.shape[1];
    g.m = in.cost.shape[2];
  }
  g.npad = padded(g.n);
  g.mpad = padded(g.m);
  for (auto* s : {&g.rows, &g.cols}) {
    s->p = p;
    s->d = g.d;
    s->f64 = std::is_same_v<T, double>;
  }
  g.rows.nr = g.cols.nc = g.n;
  g.rows.nc = g.cols.nr = g.m;
  g.rows.ncpad = g.mpad;
  g.cols.ncpad = g.npad;
  if (points) {
    // Non-finite points first (an error names the first bad one); then center both clouds on
    // their joint mean (costs are translation invariant, and the |x|^2 + |y|^2 - 2 x.y
    // expansion loses less to cancellation near the origin); the bounding box gives D.
    std::vector<double> center(static_cast<size_t>(g.d), 0.0), lo(center.size(), INFINITY),
        hi(center.size(), -INFINITY);
    for (auto [t, name, cnt] : {std::tuple{&in.x, "x", g.n}, std::tuple{&in.y, "y", g.m}})
      for (int64_t i = 0; i < cnt; ++i)
        for (int64_t k = 0; k < g.d; ++k) {
          const double v = at(*t, b, i, k);
          if (!std::isfinite(v))
            fail(kFn, std::string(name) + " has a non-finite value (NaN or inf) at [" +
                          std::to_string(b) + ", " + std::to_string(i) + ", " + std::to_string(k) +
                          "]");
          center[static_cast<size_t>(k)] += v;
          lo[static_cast<size_t>(k)] = std::min(lo[static_cast<size_t>(k)], v);
          hi[static_cast<size_t>(k)] = std::max(hi[static_cast<size_t>(k)], v);
        }
    double diam2 = 0.0;
    for (int64_t k = 0; k < g.d; ++k) {
      center[static_cast<size_t>(k)] /= static_cast<double>(g.n + g.m);
      const double r = hi[static_cast<size_t>(k)] - lo[static_cast<size_t>(k)];
      diam2 += r * r;
    }
    g.scale = p == 2 ? diam2 : std::sqrt(diam2);
    load_points(in.x, "x", b, g.n, g.d, center, g.X, g.XT, g.npad);
    load_points(in.y, "y", b, g.m, g.d, center, g.Y, g.YT, g.mpad);
    // Direct differences are cheap and exact for small d; the expansion halves the work
    // (one FMA per coordinate) where the cost computation dominates.
    const auto mode =
        (p == 2 && g.d > 8) ? detail::OtCostMode::expanded : detail::OtCostMode::direct;
    if (mode == detail::OtCostMode::expanded) {
      g.xn = zeros<T>(g.npad);
      g.yn = zeros<T>(g.mpad);
      for (int64_t i = 0; i < g.n; ++i) {
        T s = 0;
        for (int64_t k = 0; k < g.d; ++k) s += g.X[i * g.d + k] * g.X[i * g.d + k];
        g.xn[i] = s;
      }
      for (int64_t j = 0; j < g.m; ++j) {
        T s = 0;
        for (int64_t k = 0; k < g.d; ++k) s += g.Y[j * g.d + k] * g.Y[j * g.d + k];
        g.yn[j] = s;
      }
    }
    g.rows.mode = g.cols.mode = mode;
    g.rows.X = g.X.get();
    g.rows.YT = g.YT.get();
    g.rows.xn = g.xn.get();
    g.rows.yn = g.yn.get();
    g.cols.X = g.Y.get();
    g.cols.YT = g.XT.get();
    g.cols.xn = g.yn.get();
    g.cols.yn = g.xn.get();
    // Small problems: compute the cost once and read it back every half-iteration (at large d
    // a load instead of O(d) work per entry). The points stay for the gradients.
    const int64_t bytes = (g.n * g.mpad + g.m * g.npad) * static_cast<int64_t>(sizeof(T));
    if (bytes <= cache_bytes) cache_cost(g);
  } else {
    g.C = alloc_huge<T>(g.n * g.mpad);
    g.CT = alloc_huge<T>(g.m * g.npad);
    std::fill(g.C.get(), g.C.get() + g.n * g.mpad, T(0));  // the padding
    std::fill(g.CT.get(), g.CT.get() + g.m * g.npad, T(0));
    double cmax = 0.0;
    for (int64_t i = 0; i < g.n; ++i)
      for (int64_t j = 0; j < g.m; ++j) {
        const double v = at(in.cost, b, i, j);
        if (!std::isfinite(v))
          fail(kFn, "cost has a non-finite value at [" + std::to_string(b) + ", " +
                        std::to_string(i) + ", " + std::to_string(j) + "]");
        cmax = std::max(cmax, std::abs(v));
        g.C[i * g.mpad + j] = static_cast<T>(v);
        g.CT[j * g.npad + i] = static_cast<T>(v);
      }
    g.scale = cmax;
    g.rows.mode = g.cols.mode = detail::OtCostMode::matrix;
    g.rows.C = g.C.get();
    g.cols.C = g.CT.get();
  }
  return g;
}

// h_j = log w_j + pot_j / eps in T, padded; zero weights and padding get a huge negative value
// (not -inf, so that h - C / eps stays finite and exp gives 0).
template <typename T>
void fill_h(T* h, const std::vector<double>& logw, const std::vector<double>& pot, double eps,
            int64_t npad) {
  const T huge = std::is_same_v<T, float> ? T(-1e30) : T(-1e300);
  const int64_t n = static_cast<int64_t>(logw.size());
  for (int64_t j = 0; j < n; ++j) {
    const double lw = logw[static_cast<size_t>(j)];
    h[j] = std::isfinite(lw) ? static_cast<T>(lw + pot[static_cast<size_t>(j)] / eps) : huge;
  }
  for (int64_t j = n; j < npad; ++j) h[j] = huge;
}

std::vector<double> logs(const std::vector<double>& w) {
  std::vector<double> l(w.size());
  for (size_t i = 0; i < w.size(); ++i) l[i] = w[i] > 0 ? std::log(w[i]) : -INFINITY;
  return l;
}

// Balanced iterations on a stored cost (given, or cached) in the kernel domain, with absorption
// (Schmitzer, "Stabilized sparse scaling algorithms for entropy regularized transport
// problems", 2019; POT's sinkhorn_stabilized): with potentials f0, g0 absorbed into
//   K_ij = b_j exp((f0_i + g0_j - C_ij) / eps)      (K^T likewise with a_i),
// the log-domain update f_i = -eps LSE_j(log b_j + (g_j - C_ij) / eps) is exactly
//   f_i = f0_i - eps log sum_j K_ij w_j,   w_j = exp((g_j - g0_j) / eps),
// one multiply-add an entry instead of one exp. f0, g0 are reset to the current potentials
// (K recomputed from fill_h's h: one exp an entry) whenever (f - f0) / eps or (g - g0) / eps
// leaves [-kAbsorb, kAbsorb], which keeps w and K well scaled; right after a log-domain
// update every row of K sums to 1. A zero or non-finite sum (K underflowing) absorbs and
// retries once, then returns false and the caller's log-domain update takes over. Needs K and
// its transpose next to the cost: used when both pairs fit in cost_cache_bytes. The results
// agree with the log-domain iterations to rounding.
template <typename T>
class KernelIterations {
 public:
  KernelIterations(Geometry<T>& G, const std::vector<double>& log_a,
                   const std::vector<double>& log_b, double eps, bool balanced, int64_t cache_bytes)
      : G_(G), la_(log_a), lb_(log_b), eps_(eps) {
    const int64_t pair = (G.n * G.mpad + G.m * G.npad) * static_cast<int64_t>(sizeof(T));
    on_ = balanced && G.rows.mode == detail::OtCostMode::matrix && 2 * pair <= cache_bytes;
    if (!on_) return;
    K_ = alloc_huge<T>(G.n * G.mpad);
    KT_ = alloc_huge<T>(G.m * G.npad);
    w_ = zeros<T>(std::max(G.mpad, G.npad));
    h_ = zeros<T>(std::max(G.mpad, G.npad));
    s_.resize(static_cast<size_t>(std::max(G.n, G.m)));
    hr_.resize(s_.size());
  }

  // fout = T(g) and g = T(f), as the log-domain updates; false: not done (the caller updates
  // in the log domain).
  bool update_f(const std::vector<double>& f, const std::vector<double>& g,
                std::vector<double>& fout) {
    return update(G_.rows, K_.get(), g, g0_, f0_, G_.mpad, f, g, fout);
  }
  bool update_g(const std::vector<double>& f, std::vector<double>& g) {
    return update(G_.cols, KT_.get(), f, f0_, g0_, G_.npad, f, g, g);
  }

 private:
  static constexpr double kAbsorb = std::is_same_v<T, float> ? 15.0 : 50.0;

  // out_r = p0_r - eps log sum_c K_rc exp((q_c - q0_c) / eps), q the other side's potential.
  bool update(const detail::OtSide& side, const T* K, const std::vector<double>& q,
              const std::vector<double>& q0, const std::vector<double>& p0, int64_t ncpad,
              const std::vector<double>& f, const std::vector<double>& g,
              std::vector<double>& out) {
    if (!on_) return false;
    if (!absorbed_ || drifted(f, f0_) || drifted(g, g0_)) absorb(f, g);
    for (int attempt = 0; attempt < 2; ++attempt) {
      const int64_t nc = static_cast<int64_t>(q.size());
      T* w = w_.get();
      for (int64_t c = 0; c < nc; ++c)
        w[c] = static_cast<T>(
            std::exp((q[static_cast<size_t>(c)] - q0[static_cast<size_t>(c)]) / eps_));
      std::fill(w + nc, w + ncpad, T(0));
      detail::ot_matvec_rows(side, K, w, s_.data());
      // All rows or none: out may be g itself, which a retry's absorb reads.
      bool ok = true;
      for (int64_t r = 0; r < side.nr; ++r)
        ok &= s_[static_cast<size_t>(r)] > 0 && std::isfinite(s_[static_cast<size_t>(r)]);
      if (ok) {
        for (int64_t r = 0; r < side.nr; ++r)
          out[static_cast<size_t>(r)] =
              p0[static_cast<size_t>(r)] - eps_ * std::log(s_[static_cast<size_t>(r)]);
        return true;
      }
      absorb(f, g);
    }
    on_ = false;
    return false;
  }

  bool drifted(const std::vector<double>& p, const std::vector<double>& p0) const {
    for (size_t i = 0; i < p.size(); ++i)
      if (!(std::abs(p[i] - p0[i]) <= kAbsorb * eps_)) return true;
    return false;
  }

  void absorb(const std::vector<double>& f, const std::vector<double>& g) {
    f0_ = f;
    g0_ = g;
    absorbed_ = true;
    for (size_t i = 0; i < f.size(); ++i) hr_[i] = f[i] / eps_;
    fill_h(h_.get(), lb_, g, eps_, G_.mpad);
    detail::ot_kernel_rows(G_.rows, hr_.data(), h_.get(), 1.0 / eps_, K_.get());
    for (size_t j = 0; j < g.size(); ++j) hr_[j] = g[j] / eps_;
    fill_h(h_.get(), la_, f, eps_, G_.npad);
    detail::ot_kernel_rows(G_.cols, hr_.data(), h_.get(), 1.0 / eps_, KT_.get());
  }

  Geometry<T>& G_;
  const std::vector<double>& la_;
  const std::vector<double>& lb_;
  double eps_;
  bool on_ = false, absorbed_ = false;
  HugeBuf<T> K_, KT_;
  Buf<T> w_, h_;
  std::vector<double> s_, hr_, f0_, g0_;
};

template <typename T>
SinkhornStats solve_one(const SinkhornInputs& in, const SinkhornOptions& opt,
                        const SinkhornOutputs& out, int64_t b) {
  Geometry<T> G = make_geometry<T>(in, b, opt.p, opt.cost_cache_bytes);
  const int64_t n = G.n, m = G.m;
  const std::vector<double> a = load_weights("a", in.a, b, n);
  const std::vector<double> bw = load_weights("b", in.b, b, m);
  double ma = 0, mb = 0;
  for (double v : a) ma += v;
  for (double v : bw) mb += v;
  const bool bal_a = std::isinf(opt.rho_a), bal_b = std::isinf(opt.rho_b);
  if (bal_a && bal_b && std::abs(ma - mb) > 1e-6 * std::max(ma, mb))
    fail(kFn,
         "a and b must have equal total mass for a balanced problem (or give rho for an "
         "unbalanced one), got sum a = " +
             std::to_string(ma) + ", sum b = " + std::to_string(mb) + " in problem " +
             std::to_string(b));
  const std::vector<double> la = logs(a), lb = logs(bw);
  const bool sym = opt.symmetric;
  if (sym) {
    if (!in.x.defined() || n != m)
      fail(kFn, "symmetric needs points with y equal to x (a self-transport problem)");
    for (int64_t i = 0; i < n; ++i)
      for (int64_t k = 0; k < G.d; ++k)
        if (at(in.x, b, i, k) != at(in.y, b, i, k))
          fail(kFn, "symmetric needs y equal to x, they differ at [" + std::to_string(b) + ", " +
                        std::to_string(i) + ", " + std::to_string(k) + "]");
    if (a != bw) fail(kFn, "symmetric needs b equal to a (problem " + std::to_string(b) + ")");
    if (opt.rho_a != opt.rho_b) fail(kFn, "symmetric needs rho_a equal to rho_b");
  }

  std::vector<double> f(static_cast<size_t>(n), 0.0), g(static_cast<size_t>(m), 0.0);
  std::vector<double> lse(static_cast<size_t>(std::max(n, m)));
  Buf<T> hm = zeros<T>(G.mpad), hn = zeros<T>(G.npad);

  auto update_f = [&](double e, std::vector<double>& fout) {
    fill_h(hm.get(), lb, g, e, G.mpad);
    detail::ot_lse_rows(G.rows, hm.get(), 1.0 / e, lse.data());
    const double tau = bal_a ? 1.0 : opt.rho_a / (opt.rho_a + e);
    for (int64_t i = 0; i < n; ++i)
      fout[static_cast<size_t>(i)] = -tau * e * lse[static_cast<size_t>(i)];
  };
  auto update_g = [&](double e) {
    fill_h(hn.get(), la, f, e, G.npad);
    detail::ot_lse_rows(G.cols, hn.get(), 1.0 / e, lse.data());
    const double tau = bal_b ? 1.0 : opt.rho_b / (opt.rho_b + e);
    for (int64_t j = 0; j < m; ++j)
      g[static_cast<size_t>(j)] = -tau * e * lse[static_cast<size_t>(j)];
  };

  const double eps = opt.eps;
  std::vector<double> stages;
  if (opt.eps_scaling > 0)
    for (double e = G.scale; e > eps && stages.size() < 200; e *= opt.eps_scaling)
      stages.push_back(e);

  SinkhornStats st;
  int64_t it = 0;
  std::vector<double> fnew(static_cast<size_t>(n));
  double err = INFINITY;
  // L1 residual of the rows of the plan (f, g) once fnew = T(g) is known: its row sums are
  // a_i exp((f_i - fnew_i) / eps).
  auto row_residual = [&] {
    double e = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      const auto u = static_cast<size_t>(i);
      e += a[u] * std::abs(std::expm1((f[u] - fnew[u]) / eps));
    }
    return e;
  };
  if (sym) {
    // Self-transport OT(a, a): the optimal potentials satisfy f = g = T(f). Plain alternating
    // updates oscillate around it and converge slowly at small eps; the averaged update
    // f <- (f + T(f)) / 2 (Feydy et al. 2019, GeomLoss; OTT's symmetric self-transport) does
    // not. One iteration is one pass over the points (half the cost of a plain iteration).
    auto average = [&] {
      for (int64_t i = 0; i < n; ++i) {
        const auto u = static_cast<size_t>(i);
        f[u] = g[u] = 0.5 * (f[u] + fnew[u]);
      }
    };
    for (double e : stages) {
      if (it >= opt.max_iter) break;
      update_f(e, fnew);  // T(f), with g == f
      average();
      ++it;
    }
    for (int64_t k = 0; it < opt.max_iter; ++k, ++it) {
      update_f(eps, fnew);
      if (k % opt.check_every == 0) {
        err = row_residual();
        if (err <= opt.tol) {  // keep f, whose residual this is
          st.converged = true;
          break;
        }
      }
      average();
    }
  } else {
    for (double e : stages) {
      if (it >= opt.max_iter) break;
      update_f(e, f);
      update_g(e);
      ++it;
    }
    KernelIterations<T> kernel(G, la, lb, eps, bal_a && bal_b, opt.cost_cache_bytes);
    for (int64_t k = 0; it < opt.max_iter; ++k) {
      // The first iteration at eps in the log domain: its potentials scale the kernel.
      if (k == 0 || !kernel.update_f(f, g, fnew)) update_f(eps, fnew);
      // The residual of the plan (f_old, g), whose columns are exact, is only meaningful once g
      // came from an f at this eps (k >= 1).
      const bool check = k >= 1 && k % opt.check_every == 0;
      if (check) err = row_residual();
      f.swap(fnew);
      if (k == 0 || !kernel.update_g(f, g)) update_g(eps);
      ++it;
      if (check && err <= opt.tol) {
        st.converged = true;
        break;
      }
    }
  }
  if (!std::isfinite(err) && !st.converged) err = INFINITY;
  st.n_iter = it;

  // Final pass over the rows: <P, C>, the mass, the row marginals, grad x, the plan.
  const bool want_gx = out.grad_x.defined() && in.x.defined();
  // A pass of the plan over the rows of `side` (potential pot, weights w) against the other
  // side (log weights lw_o, potential pot_o, h buffer h_o of npad_o): per row the sum s and the
  // cost c of the plan, and for a point gradient the weighted sums wsum and barycenters bary.
  struct PlanRows {
    std::vector<double> s, c, wsum, bary;
  };
  auto plan_rows = [&](const detail::OtSide& side, const std::vector<double>& pot,
                       const std::vector<double>& w, T* h_o, const std::vector<double>& lw_o,
                       const std::vector<double>& pot_o, int64_t npad_o, bool want_grad,
                       detail::OtPlanOut po) {
    const size_t cnt = pot.size();
    PlanRows r;
    r.s.resize(cnt);
    r.c.resize(cnt);
    if (want_grad) {
      r.wsum.resize(cnt);
      r.bary.resize(cnt * static_cast<size_t>(G.d));
    }
    std::vector<double> hr(cnt);
    for (size_t i = 0; i < cnt; ++i) hr[i] = pot[i] / eps;
    fill_h(h_o, lw_o, pot_o, eps, npad_o);
    po.hr = hr.data();
    po.arow = w.data();
    po.s = r.s.data();
    po.c = r.c.data();
    if (want_grad) {
      po.wsum = r.wsum.data();
      po.bary = r.bary.data();
    }
    detail::ot_plan_rows(side, h_o, 1.0 / eps, po);
    return r;
  };
  detail::OtPlanOut po;
  if (out.plan.defined()) {
    po.plan_f64 = out.plan.dtype == DType::f64;
    po.plan_stride = out.plan.strides[1];
    po.plan = static_cast<char*>(out.plan.data) +
              b * out.plan.strides[0] * static_cast<int64_t>(dtype_size(out.plan.dtype));
  }
  const PlanRows pr = plan_rows(G.rows, f, a, hm.get(), lb, g, G.mpad, want_gx, po);
  const std::vector<double>& s = pr.s;
  const std::vector<double>& c = pr.c;
  double tc = 0, mass = 0, rerr = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double ai = a[static_cast<size_t>(i)];
    tc += ai * c[static_cast<size_t>(i)];
    mass += ai * s[static_cast<size_t>(i)];
    rerr += std::abs(ai * s[static_cast<size_t>(i)] - ai);
  }
  st.transport_cost = tc;
  st.mass = mass;
  st.marginal_error = (bal_a && bal_b) ? rerr : err;
  if (bal_a && bal_b && !st.converged && opt.tol > 0 && rerr <= opt.tol) st.converged = true;

  auto F = [](const std::vector<double>& w, const std::vector<double>& pot, double rho) {
    double v = 0;
    for (size_t i = 0; i < w.size(); ++i)
      v += std::isinf(rho) ? w[i] * pot[i] : -rho * w[i] * std::expm1(-pot[i] / rho);
    return v;
  };
  st.reg_cost = F(a, f, opt.rho_a) + F(bw, g, opt.rho_b) - eps * (mass - ma * mb);

  for (int64_t i = 0; i < n; ++i) *at_out(out.f, b, i) = f[static_cast<size_t>(i)];
  for (int64_t j = 0; j < m; ++j) *at_out(out.g, b, j) = g[static_cast<size_t>(j)];
  auto dF = [](double pot, double rho) {
    return std::isinf(rho) ? pot : -rho * std::expm1(-pot / rho);
  };
  if (out.grad_a.defined())
    for (int64_t i = 0; i < n; ++i)
      *at_out(out.grad_a, b, i) =
          dF(f[static_cast<size_t>(i)], opt.rho_a) - eps * (s[static_cast<size_t>(i)] - mb);
  const int64_t d = G.d;
  auto write_grad = [&](const TensorView& gv, const std::vector<double>& w,
                        const std::vector<double>& ss, const std::vector<double>& ws,
                        const std::vector<double>& by, const T* Xc, int64_t cnt) {
    for (int64_t i = 0; i < cnt; ++i)
      for (int64_t k = 0; k < d; ++k) {
        const double xi = static_cast<double>(Xc[i * d + k]);
        const double v =
            opt.p == 2 ? 2.0 * w[static_cast<size_t>(i)] *
                             (xi * ss[static_cast<size_t>(i)] - by[static_cast<size_t>(i * d + k)])
                       : w[static_cast<size_t>(i)] *
                             (xi * ws[static_cast<size_t>(i)] - by[static_cast<size_t>(i * d + k)]);
        *at_out(gv, b, i, k) = v;
      }
  };
  if (want_gx) write_grad(out.grad_x, a, s, pr.wsum, pr.bary, G.X.get(), n);

  const bool want_gy = out.grad_y.defined() && in.x.defined();
  if (want_gy || out.grad_b.defined()) {
    const PlanRows pc = plan_rows(G.cols, g, bw, hn.get(), la, f, G.npad, want_gy, {});
    if (out.grad_b.defined())
      for (int64_t j = 0; j < m; ++j)
        *at_out(out.grad_b, b, j) =
            dF(g[static_cast<size_t>(j)], opt.rho_b) - eps * (pc.s[static_cast<size_t>(j)] - ma);
    if (want_gy) write_grad(out.grad_y, bw, pc.s, pc.wsum, pc.bary, G.Y.get(), m);
  }
  return st;
}

}  // namespace

std::vector<SinkhornStats> sinkhorn(const SinkhornInputs& in, const SinkhornOptions& opt,
                                    const SinkhornOutputs& out) {
  check::views(kFn, {{"x", in.x},
                     {"y", in.y},
                     {"cost", in.cost},
                     {"a", in.a},
                     {"b", in.b},
                     {"f", out.f},
                     {"g", out.g},
                     {"plan", out.plan},
                     {"grad_x", out.grad_x},
                     {"grad_y", out.grad_y},
                     {"grad_a", out.grad_a},
                     {"grad_b", out.grad_b},
                     {"stats", out.stats}});
  const cuda::Placement where = cuda::placement(kFn, {{"x", &in.x},
                                                      {"y", &in.y},
                                                      {"cost", &in.cost},
                                                      {"a", &in.a},
                                                      {"b", &in.b},
                                                      {"f", &out.f},
                                                      {"g", &out.g},
                                                      {"plan", &out.plan},
                                                      {"grad_x", &out.grad_x},
                                                      {"grad_y", &out.grad_y},
                                                      {"grad_a", &out.grad_a},
                                                      {"grad_b", &out.grad_b},
                                                      {"stats", &out.stats}});
#if !DIVKIT_HAS_CUDA
  if (where.device == Device::cuda) cuda::not_built(kFn);
#endif
  check_options(opt);
  const bool points = in.x.defined() || in.y.defined();
  int64_t B = 0, n = 0, m = 0, d = 0;
  DType wdt = DType::f32;
  if (points) {
    if (in.cost.defined()) fail(kFn, "give either points (x, y) or cost, not both");
    if (!in.x.defined()) fail(kFn, "x must be given with y");
    if (!in.y.defined()) fail(kFn, "y must be given with x");
    const int64_t sx[3] = {-1, -1, -1};
    check_view("x", in.x, 3, sx, false);
    B = in.x.shape[0];
    n = in.x.shape[1];
    d = in.x.shape[2];
    const int64_t sy[3] = {B, -1, d};
    check_view("y", in.y, 3, sy, false);
    m = in.y.shape[1];
    if (in.y.dtype != in.x.dtype)
      fail(kFn, std::string("y must have x's dtype ") + dtype_name(in.x.dtype) + ", got " +
                    dtype_name(in.y.dtype));
    if (d < 1) fail(kFn, "x and y must have at least one coordinate (d >= 1), got d = 0");
    wdt = in.x.dtype;
  } else {
    if (!in.cost.defined()) fail(kFn, "give points (x, y) or a cost matrix (cost)");
    const int64_t sc[3] = {-1, -1, -1};
    check_view("cost", in.cost, 3, sc, false);
    B = in.cost.shape[0];
    n = in.cost.shape[1];
    m = in.cost.shape[2];
    wdt = in.cost.dtype;
  }
  if (n < 1)
    fail(kFn, std::string(points ? "x" : "cost") + " must have at least one point (n >= 1)");
  if (m < 1)
    fail(kFn, std::string(points ? "y" : "cost") + " must have at least one point (m >= 1)");
  const int64_t sa[2] = {B, n}, sb[2] = {B, m};
  if (in.a.defined()) check_view("a", in.a, 2, sa, false);
  if (in.b.defined()) check_view("b", in.b, 2, sb, false);
  check_view("f", out.f, 2, sa, true);
  check_view("g", out.g, 2, sb, true);
  if (out.grad_a.defined()) check_view("grad_a", out.grad_a, 2, sa, true);
  if (out.grad_b.defined()) check_view("grad_b", out.grad_b, 2, sb, true);
  if (out.grad_x.defined()) {
    if (!points) fail(kFn, "grad_x needs points (x, y), not a cost matrix");
    const int64_t s3[3] = {B, n, d};
    check_view("grad_x", out.grad_x, 3, s3, true);
  }
  if (out.grad_y.defined()) {
    if (!points) fail(kFn, "grad_y needs points (x, y), not a cost matrix");
    const int64_t s3[3] = {B, m, d};
    check_view("grad_y", out.grad_y, 3, s3, true);
  }
  if (out.plan.defined()) {
    const int64_t s3[3] = {B, n, m};
    check_view("plan", out.plan, 3, s3, false);
    if (m > 1 && out.plan.strides[2] != 1)
      fail(kFn, "plan must have unit stride along its last dimension");
  }
  if (out.stats.defined()) {
    const int64_t s2[2] = {B, kStatsCols};
    check_view("stats", out.stats, 2, s2, true);
  } else if (!opt.sync) {
    fail(kFn, "stats must be given when sync is false (the results stay on the device)");
  }
#if DIVKIT_HAS_CUDA
  if (where.device == Device::cuda)
    return detail::sinkhorn_cuda(in, opt, out, B, n, m, points ? d : 0, where.index);
#endif
  std::vector<SinkhornStats> stats;
  stats.reserve(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b)
    stats.push_back(wdt == DType::f64 ? solve_one<double>(in, opt, out, b)
                                      : solve_one<float>(in, opt, out, b));
  if (out.stats.defined()) {
    auto* o = static_cast<double*>(out.stats.data);
    const int64_t s0 = out.stats.strides[0], s1 = out.stats.strides[1];
    for (int64_t b = 0; b < B; ++b) {
      const SinkhornStats& r = stats[static_cast<size_t>(b)];
      const double row[kStatsCols] = {r.transport_cost, r.reg_cost,       r.mass,
                                      double(r.n_iter), r.marginal_error, r.converged ? 1.0 : 0.0};
      for (int64_t k = 0; k < kStatsCols; ++k) o[b * s0 + k * s1] = row[k];
    }
  }
  return stats;
}

}  // namespace divkit
