// The operand conversion of operand_kernels.h, compiled once per SIMD target (Highway) and
// dispatched at run time: the fused losses convert a bf16 weight block by block on every chunk,
// so the conversion is vectorized and threaded.
#include "fused_linear/operand_kernels.h"

#include <omp.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "core/element.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "fused_linear/operand_kernels.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep

#include "core/row_io-inl.h"
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace divkit {
namespace HWY_NAMESPACE {
namespace {

namespace hn = hwy::HWY_NAMESPACE;
using DF = hn::ScalableTag<float>;

// Below this many elements per call the rows run on the calling thread.
constexpr int64_t kMinParallelElements = 1 << 16;

// One contiguous row of T as fp32 into dst (null: only read); returns whether all are finite.
template <bool kCheck, typename T>
bool ContiguousRow(const T* HWY_RESTRICT src, int64_t cols, float* HWY_RESTRICT dst) {
  const DF df;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(df));
  const auto inf = hn::Set(df, std::numeric_limits<float>::infinity());
  auto bad = hn::Lt(inf, inf);
  int64_t j = 0;
  for (; j + lanes <= cols; j += lanes) {
    const hn::Vec<DF> x = LoadAsFloat(df, src + j);
    if constexpr (kCheck) bad = hn::Or(bad, NanOrInf(df, x));
    if (dst) hn::StoreU(x, df, dst + j);
  }
  bool ok = hn::AllFalse(df, bad);
  for (; j < cols; ++j) {
    const float x = ScalarToFloat(src[j]);
    ok &= std::isfinite(x);
    if (dst) dst[j] = x;
  }
  return ok;
}

bool Row(const detail::OperandRowsJob& job, int64_t r) {
  const int64_t row = job.row_ids ? job.row_ids[job.r0 + r] : job.r0 + r;
  float* dst = job.dst ? job.dst + r * job.ld_dst : nullptr;
  const int64_t off = row * job.ld;
  if (job.col_stride == 1) {
    const int64_t n = job.cols;
    switch (job.dtype) {
      case DType::f32: {
        const float* p = static_cast<const float*>(job.src) + off;
        return job.check ? ContiguousRow<true>(p, n, dst) : ContiguousRow<false>(p, n, dst);
      }
      case DType::bf16: {
        const auto* p = static_cast<const hwy::bfloat16_t*>(job.src) + off;
        return job.check ? ContiguousRow<true>(p, n, dst) : ContiguousRow<false>(p, n, dst);
      }
      case DType::f16: {
        const auto* p = static_cast<const hwy::float16_t*>(job.src) + off;
        return job.check ? ContiguousRow<true>(p, n, dst) : ContiguousRow<false>(p, n, dst);
      }
      default: break;  // fp64: the scalar path (narrowing, not the hot path)
    }
  }
  bool ok = true;
  for (int64_t j = 0; j < job.cols; ++j) {
    const float x = elem::load_f32(job.src, job.dtype, off + j * job.col_stride);
    ok &= std::isfinite(x);
    if (dst) dst[j] = x;
  }
  return ok;
}

}  // namespace

int64_t ConvertRowsF32(const detail::OperandRowsJob& job) {
  const bool parallel =
      job.num_threads > 1 && job.rows > 1 && job.rows * job.cols >= kMinParallelElements;
  int64_t first_bad = -1;
#pragma omp parallel num_threads(job.num_threads) if (parallel)
  {
    int64_t local_bad = -1;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < job.rows; ++r)
      if (!Row(job, r) && job.check && local_bad < 0) local_bad = r;
#pragma omp critical
    if (local_bad >= 0 && (first_bad < 0 || local_bad < first_bad)) first_bad = local_bad;
  }
  return first_bad;
}

}  // namespace HWY_NAMESPACE
}  // namespace divkit
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace divkit {
HWY_EXPORT(ConvertRowsF32);
int64_t detail::convert_rows_f32(const OperandRowsJob& job) {
  return HWY_DYNAMIC_DISPATCH(ConvertRowsF32)(job);
}
}  // namespace divkit
#endif  // HWY_ONCE
