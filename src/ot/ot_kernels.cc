// SIMD row kernels of the Sinkhorn solver, compiled once per SIMD target (Highway
// foreach_target) and chosen at run time.
//
// The unit of work is a block of kRows rows against all columns, walked in chunks of kChunk
// columns: the chunk's costs are computed on the fly (register-blocked: kRows rows x 2 vectors of
// columns, the y coordinates loaded once for the kRows rows), z = h_j - C_ij / eps is kept in an
// L1-resident chunk buffer, and the row's log-sum-exp is updated online at chunk granularity
// (one rescale per chunk and row). The other side's points are stored in column panels
// (ot_job.h) so that a tile reads contiguous memory, and the log-sum-exp pass walks the chunks
// with groups of row blocks (GroupBlocks) so that a chunk's points are reused from L2. Costs
// exist as an n x m matrix only when the driver caches
// them (small problems, sinkhorn.cc) or the caller gives them. Each row is computed
// by one thread in a fixed order, so results do not depend on the thread count.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "divkit/runtime.h"
#include "hwy/aligned_allocator.h"
#include "ot/ot_job.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "ot/ot_kernels.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep

#include "core/simd_math-inl.h"
#include "hwy/contrib/math/math-inl.h"
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace divkit {
namespace HWY_NAMESPACE {
namespace {

namespace hn = hwy::HWY_NAMESPACE;
using detail::OtCostMode;
using detail::OtPlanOut;
using detail::OtSide;

constexpr int kRows = 4;
constexpr int64_t kChunk = 512;  // multiple of kOtPad
static_assert(kChunk % detail::kOtPad == 0);

// Small half-iterations run on one thread: a parallel region's barrier costs more than the work
// on a loaded machine, where a waiting thread loses whole time slices. Rows are independent, so
// the result is the same either way. An entry of a stored cost costs about one exp (~8 FMAs in
// float32; the float64 exp is ~3x that, at half the lanes); one computed on the fly d + 4 more.
inline bool Parallel(const OtSide& s) {
  const int64_t exp_cost = s.f64 ? 24 : 8;
  return s.nr * s.ncpad * (s.mode == OtCostMode::matrix ? exp_cost : s.d + 4 + exp_cost) >=
         (int64_t{1} << 23);
}

// exp for arguments <= 0 (log-sum-exp after the max is subtracted).
template <class D, class V>
HWY_INLINE V ExpNonPos(D d, V x) {
  if constexpr (sizeof(hn::TFromD<D>) == 4) {
    return SoftmaxExp(d, x);
  } else {
    return hn::Exp(d, hn::Max(x, hn::Set(d, -745.0)));
  }
}

// exp for any argument, saturating at the type's largest finite exponent.
template <class D, class V>
HWY_INLINE V ExpAny(D d, V x) {
  using T = hn::TFromD<D>;
  const T hi = sizeof(T) == 4 ? T(88.0) : T(709.0);
  const T lo = sizeof(T) == 4 ? T(-103.0) : T(-745.0);
  return hn::Exp(d, hn::Min(hn::Max(x, hn::Set(d, lo)), hn::Set(d, hi)));
}

// Costs of rows ir[0..kRows) against columns [j, j + 2 L): c[r][u], u = column vector 0/1.
template <class D, class V, typename T>
HWY_INLINE void CostTile(D d, const OtSide& s, const int64_t* ir, int64_t j, V (&c)[kRows][2]) {
  const size_t L = hn::Lanes(d);
  HWY_DASSERT(detail::kOtPad % (2 * L) == 0);  // the tile lies in one panel
  if (s.mode == OtCostMode::matrix) {
    const T* C = static_cast<const T*>(s.C);
    for (int r = 0; r < kRows; ++r) {
      c[r][0] = hn::LoadU(d, C + ir[r] * s.ncpad + j);
      c[r][1] = hn::LoadU(d, C + ir[r] * s.ncpad + j + L);
    }
    return;
  }
  const T* X = static_cast<const T*>(s.X);
  const int64_t dim = s.d;
  // The tile's 2 L columns lie in one panel (2 L divides kOtPad): coordinate k at YT + k kOtPad.
  const T* YT = static_cast<const T*>(s.YT) + detail::PanelIndex(dim, 0, j);
  constexpr int64_t P = detail::kOtPad;
  for (int r = 0; r < kRows; ++r) c[r][0] = c[r][1] = hn::Zero(d);
  if (s.mode == OtCostMode::direct) {
    for (int64_t k = 0; k < dim; ++k) {
      const V y0 = hn::Load(d, YT + k * P);
      const V y1 = hn::Load(d, YT + k * P + L);
      for (int r = 0; r < kRows; ++r) {
        const V xv = hn::Set(d, X[ir[r] * dim + k]);
        const V d0 = hn::Sub(xv, y0), d1 = hn::Sub(xv, y1);
        c[r][0] = hn::MulAdd(d0, d0, c[r][0]);
        c[r][1] = hn::MulAdd(d1, d1, c[r][1]);
      }
    }
  } else {  // expanded: |x|^2 + |y|^2 - 2 x.y, one FMA per coordinate
    for (int64_t k = 0; k < dim; ++k) {
      const V y0 = hn::Load(d, YT + k * P);
      const V y1 = hn::Load(d, YT + k * P + L);
      for (int r = 0; r < kRows; ++r) {
        const V xv = hn::Set(d, X[ir[r] * dim + k]);
        c[r][0] = hn::MulAdd(xv, y0, c[r][0]);
        c[r][1] = hn::MulAdd(xv, y1, c[r][1]);
      }
    }
    const T* xn = static_cast<const T*>(s.xn);
    const T* yn = static_cast<const T*>(s.yn);
    const V yn0 = hn::Load(d, yn + j), yn1 = hn::Load(d, yn + j + L);
    const V m2 = hn::Set(d, T(-2));
    for (int r = 0; r < kRows; ++r) {
      const V xr = hn::Set(d, xn[ir[r]]);
      // max(., 0): rounding can make the expansion slightly negative for coincident points.
      c[r][0] = hn::Max(hn::MulAdd(m2, c[r][0], hn::Add(xr, yn0)), hn::Zero(d));
      c[r][1] = hn::Max(hn::MulAdd(m2, c[r][1], hn::Add(xr, yn1)), hn::Zero(d));
    }
  }
  if (s.p == 1) {
    for (int r = 0; r < kRows; ++r) {
      c[r][0] = hn::Sqrt(c[r][0]);
      c[r][1] = hn::Sqrt(c[r][1]);
    }
  }
}

// z[r][jj] = h_j - C_ij * inv_eps over one chunk (and C itself when cbuf is given); returns the
// per-row maxima of z in zmax.
template <class D, typename T>
HWY_INLINE void ChunkZ(D d, const OtSide& s, const int64_t* ir, int64_t j0, int64_t jn,
                       const T* HWY_RESTRICT h, T inv_eps, T* HWY_RESTRICT zbuf,
                       T* HWY_RESTRICT cbuf, T* zmax) {
  using V = hn::Vec<D>;
  const size_t L = hn::Lanes(d);
  const V ie = hn::Set(d, inv_eps);
  V mx[kRows];
  for (int r = 0; r < kRows; ++r) mx[r] = hn::Set(d, std::numeric_limits<T>::lowest());
  for (int64_t jj = 0; jj < jn; jj += 2 * static_cast<int64_t>(L)) {
    const int64_t j = j0 + jj;
    V c[kRows][2];
    CostTile<D, V, T>(d, s, ir, j, c);
    const V h0 = hn::Load(d, h + j), h1 = hn::Load(d, h + j + L);
    for (int r = 0; r < kRows; ++r) {
      const V z0 = hn::NegMulAdd(c[r][0], ie, h0);
      const V z1 = hn::NegMulAdd(c[r][1], ie, h1);
      hn::Store(z0, d, zbuf + r * kChunk + jj);
      hn::Store(z1, d, zbuf + r * kChunk + jj + L);
      if (cbuf) {
        hn::Store(c[r][0], d, cbuf + r * kChunk + jj);
        hn::Store(c[r][1], d, cbuf + r * kChunk + jj + L);
      }
      mx[r] = hn::Max(mx[r], hn::Max(z0, z1));
    }
  }
  for (int r = 0; r < kRows; ++r) zmax[r] = hn::GetLane(hn::MaxOfLanes(d, mx[r]));
}

// Row blocks that walk the column chunks together: each chunk's points (d x kChunk: 256 KiB in
// float64 at d = 64) are then brought into L2 once per group instead of once per block. Every
// row still sees the chunks in the same order, so the grouping changes no result. Up to 64
// blocks per group: larger groups no longer fit the chunk's reuse in L2.
inline int64_t GroupBlocks(int64_t nblocks) {
  const int64_t per_thread = nblocks / (4 * static_cast<int64_t>(get_num_threads()));
  return std::clamp<int64_t>(per_thread, 1, 64);
}

template <typename T>
void LseRowsT(const OtSide& s, const void* hv, double inv_eps_d, double* out) {
  const hn::ScalableTag<T> d;
  using V = hn::Vec<decltype(d)>;
  const size_t L = hn::Lanes(d);
  const T* h = static_cast<const T*>(hv);
  const T inv_eps = static_cast<T>(inv_eps_d);
  const int64_t nblocks = (s.nr + kRows - 1) / kRows;
  const int64_t group = GroupBlocks(nblocks);
  const int64_t ngroups = (nblocks + group - 1) / group;
#pragma omp parallel num_threads(get_num_threads()) if (Parallel(s))
  {
    auto zbuf = hwy::AllocateAligned<T>(kRows * kChunk);
    std::vector<double> M(static_cast<size_t>(group * kRows)), S(M.size());
#pragma omp for schedule(static)
    for (int64_t grp = 0; grp < ngroups; ++grp) {
      const int64_t b0 = grp * group, b1 = std::min(b0 + group, nblocks);
      std::fill(M.begin(), M.end(), -std::numeric_limits<double>::infinity());
      std::fill(S.begin(), S.end(), 0.0);
      for (int64_t j0 = 0; j0 < s.ncpad; j0 += kChunk) {
        const int64_t jn = std::min(kChunk, s.ncpad - j0);
        for (int64_t blk = b0; blk < b1; ++blk) {
          int64_t ir[kRows];
          const int64_t i0 = blk * kRows;
          for (int r = 0; r < kRows; ++r) ir[r] = std::min<int64_t>(i0 + r, s.nr - 1);
          T zmax[kRows];
          ChunkZ(d, s, ir, j0, jn, h, inv_eps, zbuf.get(), static_cast<T*>(nullptr), zmax);
          double* Mb = M.data() + (blk - b0) * kRows;
          double* Sb = S.data() + (blk - b0) * kRows;
          for (int r = 0; r < kRows; ++r) {
            const double cm = static_cast<double>(zmax[r]);
            if (cm > Mb[r]) {
              Sb[r] *= std::exp(Mb[r] - cm);
              Mb[r] = cm;
            }
            const V mv = hn::Set(d, static_cast<T>(Mb[r]));
            V acc = hn::Zero(d);
            const T* z = zbuf.get() + r * kChunk;
            for (int64_t jj = 0; jj < jn; jj += static_cast<int64_t>(L))
              acc = hn::Add(acc, ExpNonPos(d, hn::Sub(hn::Load(d, z + jj), mv)));
            Sb[r] += static_cast<double>(hn::GetLane(hn::SumOfLanes(d, acc)));
          }
        }
      }
      for (int64_t i = b0 * kRows; i < std::min(b1 * kRows, s.nr); ++i)
        out[i] = M[static_cast<size_t>(i - b0 * kRows)] +
                 std::log(S[static_cast<size_t>(i - b0 * kRows)]);
    }
  }
}

template <typename T>
void PlanRowsT(const OtSide& s, const void* hv, double inv_eps_d, const OtPlanOut& o) {
  const hn::ScalableTag<T> d;
  using V = hn::Vec<decltype(d)>;
  const size_t L = hn::Lanes(d);
  const T* h = static_cast<const T*>(hv);
  const T* YT = static_cast<const T*>(s.YT);
  const T inv_eps = static_cast<T>(inv_eps_d);
  const int64_t nblocks = (s.nr + kRows - 1) / kRows;
  const bool grad = o.bary != nullptr && s.YT != nullptr;  // points given (cached or not)
  const int64_t dim = s.d;
#pragma omp parallel num_threads(get_num_threads()) if (Parallel(s))
  {
    auto zbuf = hwy::AllocateAligned<T>(kRows * kChunk);
    auto cbuf = hwy::AllocateAligned<T>(kRows * kChunk);
    std::vector<double> bary(grad ? static_cast<size_t>(kRows * dim) : 0u);
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      int64_t ir[kRows];
      const int64_t i0 = blk * kRows;
      for (int r = 0; r < kRows; ++r) ir[r] = std::min<int64_t>(i0 + r, s.nr - 1);
      double S[kRows] = {}, Cs[kRows] = {}, W[kRows] = {};
      std::fill(bary.begin(), bary.end(), 0.0);
      for (int64_t j0 = 0; j0 < s.ncpad; j0 += kChunk) {
        const int64_t jn = std::min(kChunk, s.ncpad - j0);
        T zmax[kRows];
        ChunkZ(d, s, ir, j0, jn, h, inv_eps, zbuf.get(), cbuf.get(), zmax);
        for (int r = 0; r < kRows; ++r) {
          if (i0 + r >= s.nr) break;
          const V hr = hn::Set(d, static_cast<T>(o.hr[ir[r]]));
          T* z = zbuf.get() + r * kChunk;  // becomes e, then w
          const T* c = cbuf.get() + r * kChunk;
          V se = hn::Zero(d), sc = hn::Zero(d), sw = hn::Zero(d);
          for (int64_t jj = 0; jj < jn; jj += static_cast<int64_t>(L)) {
            const V e = ExpAny(d, hn::Add(hn::Load(d, z + jj), hr));
            const V cv = hn::Load(d, c + jj);
            se = hn::Add(se, e);
            sc = hn::MulAdd(e, cv, sc);
            V w = e;
            if (s.p == 1) {  // dC/dx = (x - y) / |x - y|; 0 at coincident points
              const auto pos = hn::Gt(cv, hn::Zero(d));
              w = hn::IfThenElseZero(pos, hn::Div(e, hn::IfThenElse(pos, cv, hn::Set(d, T(1)))));
            }
            sw = hn::Add(sw, w);
            hn::Store(w, d, z + jj);
          }
          S[r] += static_cast<double>(hn::GetLane(hn::SumOfLanes(d, se)));
          Cs[r] += static_cast<double>(hn::GetLane(hn::SumOfLanes(d, sc)));
          W[r] += static_cast<double>(hn::GetLane(hn::SumOfLanes(d, sw)));
          if (grad) {
            for (int64_t k = 0; k < dim; ++k) {
              V acc = hn::Zero(d);
              for (int64_t jj = 0; jj < jn; jj += static_cast<int64_t>(L))
                acc = hn::MulAdd(hn::Load(d, z + jj),
                                 hn::Load(d, YT + detail::PanelIndex(dim, k, j0 + jj)), acc);
              bary[r * dim + k] += static_cast<double>(hn::GetLane(hn::SumOfLanes(d, acc)));
            }
          }
          if (o.plan) {
            // P_ij = a_i e_ij, in fp64 from h and the cost (the buffer now holds w).
            const double ai = o.arow[ir[r]];
            const T* hz = h + j0;
            const int64_t jend = std::min(jn, s.nc - j0);
            for (int64_t jj = 0; jj < jend; ++jj) {
              const double e = std::exp(static_cast<double>(hz[jj]) -
                                        static_cast<double>(c[jj]) * inv_eps_d + o.hr[ir[r]]);
              const int64_t idx = ir[r] * o.plan_stride + j0 + jj;
              if (o.plan_f64) static_cast<double*>(o.plan)[idx] = ai * e;
              else static_cast<float*>(o.plan)[idx] = static_cast<float>(ai * e);
            }
          }
        }
      }
      for (int r = 0; r < kRows && i0 + r < s.nr; ++r) {
        o.s[i0 + r] = S[r];
        o.c[i0 + r] = Cs[r];
        if (o.wsum) o.wsum[i0 + r] = W[r];
        if (grad)
          for (int64_t k = 0; k < dim; ++k) o.bary[(i0 + r) * dim + k] = bary[r * dim + k];
      }
    }
  }
}

// C[i][j] for all rows, columns padded to ncpad, by the same register-blocked tiles as the
// on-the-fly path (so the cached and the recomputed costs are bitwise equal).
template <typename T>
void CostRowsT(const OtSide& s, T* HWY_RESTRICT C) {
  const hn::ScalableTag<T> d;
  using V = hn::Vec<decltype(d)>;
  const size_t L = hn::Lanes(d);
  const int64_t nblocks = (s.nr + kRows - 1) / kRows;
#pragma omp parallel for num_threads(get_num_threads()) schedule(static) if (Parallel(s))
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    int64_t ir[kRows];
    const int64_t i0 = blk * kRows;
    for (int r = 0; r < kRows; ++r) ir[r] = std::min<int64_t>(i0 + r, s.nr - 1);
    for (int64_t j = 0; j < s.ncpad; j += 2 * static_cast<int64_t>(L)) {
      V c[kRows][2];
      CostTile<decltype(d), V, T>(d, s, ir, j, c);
      for (int r = 0; r < kRows && i0 + r < s.nr; ++r) {
        hn::Store(c[r][0], d, C + (i0 + r) * s.ncpad + j);
        hn::Store(c[r][1], d, C + (i0 + r) * s.ncpad + j + L);
      }
    }
  }
}

template <typename T>
void KernelRowsT(const OtSide& s, const double* hr, const void* hv, double inv_eps_d, T* K) {
  const hn::ScalableTag<T> d;
  using V = hn::Vec<decltype(d)>;
  const size_t L = hn::Lanes(d);
  const T* C = static_cast<const T*>(s.C);
  const T* h = static_cast<const T*>(hv);
  const V ie = hn::Set(d, static_cast<T>(inv_eps_d));
#pragma omp parallel for num_threads(get_num_threads()) schedule(static) if (Parallel(s))
  for (int64_t i = 0; i < s.nr; ++i) {
    const V hri = hn::Set(d, static_cast<T>(hr[i]));
    const T* Ci = C + i * s.ncpad;
    T* Ki = K + i * s.ncpad;
    for (int64_t j = 0; j < s.ncpad; j += static_cast<int64_t>(L))
      hn::Store(ExpAny(d, hn::Add(hn::NegMulAdd(hn::Load(d, Ci + j), ie, hn::Load(d, h + j)), hri)),
                d, Ki + j);
  }
}

template <typename T>
void MatvecRowsT(const OtSide& s, const T* K, const T* w, double* out) {
  const hn::ScalableTag<T> d;
  using V = hn::Vec<decltype(d)>;
  const size_t L = hn::Lanes(d);
  // One FMA an entry, memory-bound: worth a second thread only for large rows x columns.
#pragma omp parallel for num_threads(get_num_threads()) \
    schedule(static) if (s.nr * s.ncpad >= (int64_t{1} << 19))
  for (int64_t i = 0; i < s.nr; ++i) {
    const T* Ki = K + i * s.ncpad;
    double sum = 0.0;
    for (int64_t j0 = 0; j0 < s.ncpad; j0 += kChunk) {  // fp64 between chunks, as the LSE
      const int64_t j1 = std::min(j0 + kChunk, s.ncpad);
      V acc = hn::Zero(d);
      for (int64_t j = j0; j < j1; j += static_cast<int64_t>(L))
        acc = hn::MulAdd(hn::Load(d, Ki + j), hn::Load(d, w + j), acc);
      sum += static_cast<double>(hn::GetLane(hn::SumOfLanes(d, acc)));
    }
    out[i] = sum;
  }
}

}  // namespace

void OtLseRows(const OtSide& s, const void* h, double inv_eps, double* out) {
  if (s.f64) LseRowsT<double>(s, h, inv_eps, out);
  else LseRowsT<float>(s, h, inv_eps, out);
}
void OtCostRows(const OtSide& s, void* C) {
  if (s.f64) CostRowsT<double>(s, static_cast<double*>(C));
  else CostRowsT<float>(s, static_cast<float*>(C));
}
void OtPlanRows(const OtSide& s, const void* h, double inv_eps, const OtPlanOut& o) {
  if (s.f64) PlanRowsT<double>(s, h, inv_eps, o);
  else PlanRowsT<float>(s, h, inv_eps, o);
}

void OtKernelRows(const OtSide& s, const double* hr, const void* h, double inv_eps, void* K) {
  if (s.f64) KernelRowsT<double>(s, hr, h, inv_eps, static_cast<double*>(K));
  else KernelRowsT<float>(s, hr, h, inv_eps, static_cast<float*>(K));
}
void OtMatvecRows(const OtSide& s, const void* K, const void* w, double* out) {
  if (s.f64)
    MatvecRowsT<double>(s, static_cast<const double*>(K), static_cast<const double*>(w), out);
  else MatvecRowsT<float>(s, static_cast<const float*>(K), static_cast<const float*>(w), out);
}

}  // namespace HWY_NAMESPACE
}  // namespace divkit
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace divkit {
HWY_EXPORT(OtLseRows);
HWY_EXPORT(OtPlanRows);
HWY_EXPORT(OtCostRows);
HWY_EXPORT(OtKernelRows);
HWY_EXPORT(OtMatvecRows);
void detail::ot_lse_rows(const OtSide& s, const void* h, double inv_eps, double* out) {
  HWY_DYNAMIC_DISPATCH(OtLseRows)(s, h, inv_eps, out);
}
void detail::ot_cost_rows(const OtSide& s, void* C) { HWY_DYNAMIC_DISPATCH(OtCostRows)(s, C); }
void detail::ot_plan_rows(const OtSide& s, const void* h, double inv_eps, const OtPlanOut& o) {
  HWY_DYNAMIC_DISPATCH(OtPlanRows)(s, h, inv_eps, o);
}
void detail::ot_kernel_rows(const OtSide& s, const double* hr, const void* h, double inv_eps,
                            void* K) {
  HWY_DYNAMIC_DISPATCH(OtKernelRows)(s, hr, h, inv_eps, K);
}
void detail::ot_matvec_rows(const OtSide& s, const void* K, const void* w, double* out) {
  HWY_DYNAMIC_DISPATCH(OtMatvecRows)(s, K, w, out);
}
}  // namespace divkit
#endif
