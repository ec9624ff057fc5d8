// Rows of logits in and out of the SIMD row kernels: a row of fp32, bf16, fp16 or fp64 converted
// to an fp32 buffer with its max and a NaN/+inf check, and an fp32 row written back in any float
// dtype (16-bit: rounded to nearest even). Per-target header (Highway's include-guard toggle).
#if defined(DIVKIT_ROW_IO_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef DIVKIT_ROW_IO_INL_H_
#undef DIVKIT_ROW_IO_INL_H_
#else
#define DIVKIT_ROW_IO_INL_H_
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "core/dtype.h"
#include "core/row_io.h"
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace divkit {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// One element as fp32 (16-bit floats widen exactly; fp64 rounds once).
template <typename T>
HWY_INLINE float ScalarToFloat(T x) {
  if constexpr (std::is_same_v<T, hwy::bfloat16_t> || std::is_same_v<T, hwy::float16_t>) {
    uint16_t bits;
    std::memcpy(&bits, &x, 2);
    return std::is_same_v<T, hwy::bfloat16_t> ? dtype::bf16_to_f32(bits) : dtype::f16_to_f32(bits);
  } else {
    return static_cast<float>(x);
  }
}

// One vector of fp32, bf16 or fp16 elements (unaligned) as fp32.
template <class DF, typename T>
HWY_INLINE hn::Vec<DF> LoadAsFloat(DF df, const T* HWY_RESTRICT p) {
  if constexpr (std::is_same_v<T, float>) {
    return hn::LoadU(df, p);
  } else {
    return hn::PromoteTo(df, hn::LoadU(hn::Rebind<T, DF>(), p));
  }
}

// Lanes holding NaN or +inf (a logit of -inf is a masked entry, allowed).
template <class DF>
HWY_INLINE auto NanOrPosInf(DF df, hn::Vec<DF> x) {
  return hn::Not(hn::Lt(x, hn::Set(df, std::numeric_limits<float>::infinity())));  // NaN: false
}
// Lanes holding NaN or +-inf.
template <class DF>
HWY_INLINE auto NanOrInf(DF df, hn::Vec<DF> x) {
  return hn::Not(hn::Lt(hn::Abs(x), hn::Set(df, std::numeric_limits<float>::infinity())));
}

// Calls f(src) with src = row `row` of `in` as const float*, hwy::bfloat16_t*, hwy::float16_t*
// or double*, and returns its result.
template <class F>
HWY_INLINE auto VisitRow(const detail::RowInput& in, int64_t row, F&& f) {
  const int64_t offset = row * in.row_stride;
  switch (in.dtype) {
    case DType::f32: return f(static_cast<const float*>(in.data) + offset);
    case DType::bf16: return f(static_cast<const hwy::bfloat16_t*>(in.data) + offset);
    case DType::f16: return f(static_cast<const hwy::float16_t*>(in.data) + offset);
    default: return f(static_cast<const double*>(in.data) + offset);
  }
}

// Columns [begin, end) of a row of v entries as fp32 into x[begin, end), -inf beyond v (the
// padding up to a whole vector): begin and end are multiples of the lane count. Folds the block
// into the running max `vmax` and the NaN/+inf mask `bad`. Whole vectors of fp32/bf16/fp16 are
// converted in registers; fp64 and the last partial vector one element at a time.
template <typename T, class DF, class M>
HWY_INLINE void LoadRowBlock(DF df, const T* HWY_RESTRICT src, int64_t begin, int64_t end,
                             int64_t v, float* HWY_RESTRICT x, hn::Vec<DF>& vmax, M& bad) {
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(df));
  const int64_t vfull = std::is_same_v<T, double> ? 0 : v / lanes * lanes;
  int64_t j = begin;
  if constexpr (!std::is_same_v<T, double>) {
    // Accumulates "finite or -inf" (one compare and an AND per vector; NaN compares false).
    const auto kInf = hn::Set(df, std::numeric_limits<float>::infinity());
    auto ok = hn::Not(bad);
    for (const int64_t vec_end = std::min(end, vfull); j < vec_end; j += lanes) {
      const auto xj = LoadAsFloat(df, src + j);
      ok = hn::And(ok, hn::Lt(xj, kInf));
      vmax = hn::Max(vmax, xj);
      hn::Store(xj, df, x + j);
    }
    bad = hn::Not(ok);
  }
  for (; j < end; j += lanes) {
    for (int64_t k = j; k < j + lanes; ++k)
      x[k] = k < v ? ScalarToFloat(src[k]) : -std::numeric_limits<float>::infinity();
    const auto xj = hn::Load(df, x + j);
    bad = hn::Or(bad, NanOrPosInf(df, xj));
    vmax = hn::Max(vmax, xj);
  }
}

struct RowLoad {
  float max;        // -inf when every entry is -inf
  bool non_finite;  // a NaN or +inf
};

// Row `row` of `in` (v entries) as fp32 into x[0, v), -inf in the padding [v, vpad).
HWY_INLINE RowLoad LoadRow(const detail::RowInput& in, int64_t row, int64_t v, int64_t vpad,
                           float* HWY_RESTRICT x) {
  return VisitRow(in, row, [&](const auto* src) {
    const hn::ScalableTag<float> df;
    auto vmax = hn::Set(df, -std::numeric_limits<float>::infinity());
    auto bad = hn::Lt(vmax, vmax);  // all false
    LoadRowBlock(df, src, 0, vpad, v, x, vmax, bad);
    return RowLoad{hn::GetLane(hn::MaxOfLanes(df, vmax)), !hn::AllFalse(df, bad)};
  });
}

struct RowScan {
  bool non_finite;  // a NaN or +inf
  bool all_masked;  // every entry -inf
};

// The checks of LoadRow without its stores: the probe before a gradient is written in place.
HWY_INLINE RowScan ScanRow(const detail::RowInput& in, int64_t row, int64_t v) {
  return VisitRow(in, row, [&](const auto* src) {
    using T = std::remove_cv_t<std::remove_pointer_t<decltype(src)>>;
    constexpr float kInf = std::numeric_limits<float>::infinity();
    const hn::ScalableTag<float> df;
    const int64_t lanes = static_cast<int64_t>(hn::Lanes(df));
    auto vmax = hn::Set(df, -kInf);
    auto bad = hn::Lt(vmax, vmax);  // all false
    int64_t j = 0;
    if constexpr (!std::is_same_v<T, double>) {
      for (; j + lanes <= v; j += lanes) {
        const auto xj = LoadAsFloat(df, src + j);
        bad = hn::Or(bad, NanOrPosInf(df, xj));
        vmax = hn::Max(vmax, xj);
      }
    }
    bool non_finite = !hn::AllFalse(df, bad);
    float max = hn::GetLane(hn::MaxOfLanes(df, vmax));
    for (; j < v; ++j) {
      const float xj = ScalarToFloat(src[j]);
      non_finite |= !(xj < kInf);
      max = std::max(max, xj);
    }
    return RowScan{non_finite, max == -kInf};
  });
}

// x[0, v) (fp32) into row `row` of `out`, rounded to nearest even for the 16-bit dtypes.
HWY_INLINE void StoreRow(const detail::RowOutput& out, int64_t row, int64_t v,
                         const float* HWY_RESTRICT x) {
  char* base = static_cast<char*>(out.data) + row * out.row_stride * dtype_size(out.dtype);
  switch (out.dtype) {
    case DType::f32: std::memcpy(base, x, static_cast<size_t>(v) * sizeof(float)); break;
    case DType::bf16: {
      auto* dst = reinterpret_cast<uint16_t*>(base);
      for (int64_t j = 0; j < v; ++j) dst[j] = dtype::f32_to_bf16(x[j]);
      break;
    }
    case DType::f16: {
      auto* dst = reinterpret_cast<uint16_t*>(base);
      for (int64_t j = 0; j < v; ++j) dst[j] = dtype::f32_to_f16(x[j]);
      break;
    }
    default: {
      auto* dst = reinterpret_cast<double*>(base);
      for (int64_t j = 0; j < v; ++j) dst[j] = x[j];
      break;
    }
  }
}

// Zeros row `row` of `out` (nothing when the output is not requested).
HWY_INLINE void ZeroRow(const detail::RowOutput& out, int64_t row, int64_t v) {
  if (out.data == nullptr) return;
  const size_t es = dtype_size(out.dtype);
  std::memset(static_cast<char*>(out.data) + row * out.row_stride * es, 0,
              static_cast<size_t>(v) * es);
}

// The first bad row of one input, recorded from any thread: a row with NaN or +inf takes
// precedence over a row without probability mass.
class BadRowSlots {
 public:
  void NonFinite(int64_t row) { Record(non_finite_, row); }
  void NoMass(int64_t row) { Record(no_mass_, row); }
  detail::BadRow Get() const {
    if (non_finite_.load() >= 0) return {non_finite_.load(), false};
    if (no_mass_.load() >= 0) return {no_mass_.load(), true};
    return {};
  }

 private:
  static void Record(std::atomic<int64_t>& slot, int64_t row) {  // slot = min(slot, row)
    int64_t cur = slot.load();
    while ((cur < 0 || row < cur) && !slot.compare_exchange_weak(cur, row)) {
    }
  }
  std::atomic<int64_t> non_finite_{-1}, no_mass_{-1};
};

}  // namespace HWY_NAMESPACE
}  // namespace divkit
HWY_AFTER_NAMESPACE();

#endif  // DIVKIT_ROW_IO_INL_H_
