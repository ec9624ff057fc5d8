// Argument checks shared by the families. Every message starts with "<function>: <argument>" so
// the user sees which argument is wrong.
#pragma once

#include <string>

#include "divkit/tensor.h"

namespace divkit::check {

[[noreturn]] inline void fail(const char* fn, const std::string& what) {
  throw Error(std::string(fn) + ": " + what);
}

std::string shape_string(const TensorView& t);

// A number for an error message, as printf's %g ("-1", "0.5", "inf", "nan").
std::string fmt(double x);

inline bool is_float(DType d) {
  return d == DType::f32 || d == DType::bf16 || d == DType::f16 || d == DType::f64;
}

// [rows, cols] float matrix on the CPU with unit column stride. Outputs need a row stride >= cols;
// inputs may also repeat one row (row stride 0, a broadcast).
void float_matrix(const char* fn, const char* name, const TensorView& t, bool is_output = false);
// 1-D tensor of `n` elements of one of the given dtypes (any stride).
void vector_of(const char* fn, const char* name, const TensorView& t, int64_t n,
               std::initializer_list<DType> dtypes);
// t.dtype is one of `dtypes`, else "<fn>: <name> must be float32 or float64, got int32".
void dtype_in(const char* fn, const char* name, const TensorView& t,
              std::initializer_list<DType> dtypes);

// Whether the memory spans of two 2-D views (non-negative strides, any column stride) intersect.
// Empty views overlap nothing.
bool ranges_overlap(const TensorView& a, const TensorView& b);

}  // namespace divkit::check
