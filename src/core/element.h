// One element of a TensorView of any dtype, read as double or written from double: the scalar
// access of the families whose loops are serial or per element (preference, RLHF, distillation,
// OT, the fused head's small vectors). Strides are in elements; nothing here checks bounds or
// dtypes (the callers validated the views).
#pragma once

#include <cmath>
#include <cstdint>

#include "core/dtype.h"
#include "divkit/tensor.h"

namespace divkit::elem {

// Element `off` of a buffer of dtype `dt`, exactly as double (16-bit floats widen exactly,
// int64 converts); NaN for a dtype it does not know.
inline double load(const void* data, DType dt, int64_t off) {
  switch (dt) {
    case DType::f32: return static_cast<const float*>(data)[off];
    case DType::f64: return static_cast<const double*>(data)[off];
    case DType::bf16: return dtype::bf16_to_f32(static_cast<const uint16_t*>(data)[off]);
    case DType::f16: return dtype::f16_to_f32(static_cast<const uint16_t*>(data)[off]);
    case DType::i32: return static_cast<const int32_t*>(data)[off];
    case DType::i64: return static_cast<double>(static_cast<const int64_t*>(data)[off]);
  }
  return NAN;
}

// As load, rounded once to fp32 (an fp64 value beyond fp32's range becomes inf).
inline float load_f32(const void* data, DType dt, int64_t off) {
  return static_cast<float>(load(data, dt, off));
}

// Writes x at element `off`: fp32 and the 16-bit floats through one rounding to fp32, then
// (16-bit) to nearest even; integers by truncation.
inline void store(void* data, DType dt, int64_t off, double x) {
  switch (dt) {
    case DType::f32: static_cast<float*>(data)[off] = static_cast<float>(x); break;
    case DType::f64: static_cast<double*>(data)[off] = x; break;
    case DType::bf16:
      static_cast<uint16_t*>(data)[off] = dtype::f32_to_bf16(static_cast<float>(x));
      break;
    case DType::f16:
      static_cast<uint16_t*>(data)[off] = dtype::f32_to_f16(static_cast<float>(x));
      break;
    case DType::i32: static_cast<int32_t*>(data)[off] = static_cast<int32_t>(x); break;
    case DType::i64: static_cast<int64_t*>(data)[off] = static_cast<int64_t>(x); break;
  }
}

// t[i] of a 1-D view and t[i, j] of a 2-D view, by strides.
inline double get(const TensorView& t, int64_t i) {
  return load(t.data, t.dtype, i * t.strides[0]);
}
inline double get(const TensorView& t, int64_t i, int64_t j) {
  return load(t.data, t.dtype, i * t.strides[0] + j * t.strides[1]);
}
inline void set(const TensorView& t, int64_t i, double x) {
  store(t.data, t.dtype, i * t.strides[0], x);
}
inline void set(const TensorView& t, int64_t i, int64_t j, double x) {
  store(t.data, t.dtype, i * t.strides[0] + j * t.strides[1], x);
}
// set() for an optional output: nothing when the view is not given.
inline void put(const TensorView& t, int64_t i, double x) {
  if (t.defined()) set(t, i, x);
}
inline void put(const TensorView& t, int64_t i, int64_t j, double x) {
  if (t.defined()) set(t, i, j, x);
}

// Element `off` of an int32 or int64 buffer (labels, indices), exactly.
inline int64_t load_index(const void* data, DType dt, int64_t off) {
  return dt == DType::i32 ? static_cast<const int32_t*>(data)[off]
                          : static_cast<const int64_t*>(data)[off];
}
// t[i] of a 1-D int32 or int64 view.
inline int64_t index(const TensorView& t, int64_t i) {
  return load_index(t.data, t.dtype, i * t.strides[0]);
}

}  // namespace divkit::elem
