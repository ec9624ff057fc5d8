#include "core/check.h"

#include <cstdio>
#include <utility>

namespace divkit::check {

std::string shape_string(const TensorView& t) {
  std::string s = "[";
  for (int i = 0; i < t.ndim; ++i) {
    if (i) s += ", ";
    s += std::to_string(t.shape[i]);
  }
  return s + "]";
}

std::string fmt(double x) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%g", x);
  return buf;
}

bool ranges_overlap(const TensorView& a, const TensorView& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  auto span = [](const TensorView& t) {
    const char* lo = static_cast<const char*>(t.data);
    // One past the last element: the column stride counts (an [N, k] input may be transposed).
    int64_t last = (t.shape[0] - 1) * t.strides[0] + 1;
    if (t.ndim > 1) last += (t.shape[1] - 1) * t.strides[1];
    return std::pair<const char*, const char*>(lo, lo + last * dtype_size(t.dtype));
  };
  const auto [a0, a1] = span(a);
  const auto [b0, b1] = span(b);
  return a0 < b1 && b0 < a1;
}

void float_matrix(const char* fn, const char* name, const TensorView& t, bool is_output) {
  const std::string arg(name);
  if (t.device != Device::cpu) fail(fn, arg + " must be on the CPU");
  if (t.ndim != 2) fail(fn, arg + " must be 2-D [N, V], got shape " + shape_string(t));
  if (!is_float(t.dtype))
    fail(fn, arg + " must be float32, bfloat16, float16 or float64, got " + dtype_name(t.dtype));
  if (t.shape[0] < 0 || t.shape[1] < 0) fail(fn, arg + " has a negative dimension");
  if (t.shape[1] > 1 && t.strides[1] != 1)
    fail(fn, arg + " must have unit stride along the vocabulary (last) dimension, got stride " +
                 std::to_string(t.strides[1]));
  if (t.shape[0] > 1 && t.strides[0] < t.shape[1] && (is_output || t.strides[0] != 0))
    fail(fn, arg + " rows overlap: row stride " + std::to_string(t.strides[0]) +
                 " < V = " + std::to_string(t.shape[1]) +
                 (is_output ? "" : " (only 0, a broadcast row, is allowed)"));
  if (t.numel() > 0 && t.data == nullptr) fail(fn, arg + " has a null data pointer");
}

void vector_of(const char* fn, const char* name, const TensorView& t, int64_t n,
               std::initializer_list<DType> dtypes) {
  const std::string arg(name);
  if (t.device != Device::cpu) fail(fn, arg + " must be on the CPU");
  if (t.ndim != 1 || t.shape[0] != n)
    fail(fn, arg + " must have shape [" + std::to_string(n) + "], got " + shape_string(t));
  dtype_in(fn, name, t, dtypes);
  if (n > 0 && t.data == nullptr) fail(fn, arg + " has a null data pointer");
}

void dtype_in(const char* fn, const char* name, const TensorView& t,
              std::initializer_list<DType> dtypes) {
  bool ok = false;
  std::string allowed;
  for (DType d : dtypes) {
    ok |= d == t.dtype;
    allowed += (allowed.empty() ? "" : " or ") + std::string(dtype_name(d));
  }
  if (!ok) fail(fn, std::string(name) + " must be " + allowed + ", got " + dtype_name(t.dtype));
}

}  // namespace divkit::check
