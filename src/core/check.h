// Argument checks shared by the families. Every message starts with "<function>: <argument>" so
// the user sees which argument is wrong.
#pragma once

#include <initializer_list>
#include <string>

#include "divkit/tensor.h"

namespace divkit {
struct DivergenceSpec;
}

namespace divkit::check {

[[noreturn]] inline void fail(const char* fn, const std::string& what) {
  throw Error(std::string(fn) + ": " + what);
}

// "[2, 3]"; at most kMaxDims entries are read whatever ndim says.
std::string shape_string(const TensorView& t);

// Rethrows an Error of a public function `inner` that `fn` delegates to as an Error of `fn`
// (its leading "<inner>: " becomes "<fn>: "), so that the message names the function called.
[[noreturn]] void rethrow_as(const char* fn, const char* inner, const Error& e);

// validate_spec with messages that start with `fn` (defined in src/divergence/divergence.cc).
void divergence_spec(const char* fn, const DivergenceSpec& spec);

// The structural check every public function runs on each of its views before reading their
// shape or data (the C++ API takes raw views, so nothing else guarantees them):
//   ndim in [0, kMaxDims] (0: "not given", nothing else is looked at), a known dtype and device,
//   extents >= 0, the element count and the byte span (sum of (extent - 1) * stride over the
//   dimensions of extent > 1, plus one element) computed without int64 overflow and at most
//   kMaxSpanBytes, the span not wrapping the address space, strides >= 0 along dimensions of
//   extent > 1 (the stride of an extent-1 dimension is never used: frameworks export arbitrary
//   values there), a data pointer that is non-null and aligned to the element size whenever
//   the view has elements.
// The memory described must still belong to the caller: a view cannot carry its buffer's size.
void view(const char* fn, const char* name, const TensorView& t);

struct Arg {
  const char* name;
  const TensorView& view;
};
// view() for each argument, in order.
void views(const char* fn, std::initializer_list<Arg> args);

// 2^56 bytes: no user-space buffer of any current 64-bit platform (x86-64 with 5-level paging
// included) extends this far, and offsets up to twice this size still fit in int64.
inline constexpr int64_t kMaxSpanBytes = int64_t{1} << 56;

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
