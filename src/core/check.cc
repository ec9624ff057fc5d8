#include "core/check.h"

#include <cstdio>
#include <limits>
#include <utility>

namespace divkit::check {

std::string shape_string(const TensorView& t) {
  std::string s = "[";
  const int ndim = t.ndim < 0 ? 0 : t.ndim > TensorView::kMaxDims ? TensorView::kMaxDims : t.ndim;
  for (int i = 0; i < ndim; ++i) {
    if (i) s += ", ";
    s += std::to_string(t.shape[i]);
  }
  return s + "]";
}

void rethrow_as(const char* fn, const char* inner, const Error& e) {
  const std::string msg = e.what(), prefix = std::string(inner) + ": ";
  if (msg.compare(0, prefix.size(), prefix) != 0) throw e;
  throw Error(std::string(fn) + ": " + msg.substr(prefix.size()));
}

std::string fmt(double x) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%g", x);
  return buf;
}

namespace {

bool known_dtype(DType d) {
  switch (d) {
    case DType::f32:
    case DType::bf16:
    case DType::f16:
    case DType::f64:
    case DType::i32:
    case DType::i64: return true;
  }
  return false;
}

}  // namespace

void view(const char* fn, const char* name, const TensorView& t) {
  if (t.ndim == 0) return;  // not given
  // The message is only built on failure: this runs on every view of every call.
  const auto bad = [&](const std::string& what) { fail(fn, std::string(name) + what); };
  if (t.ndim < 0 || t.ndim > TensorView::kMaxDims)
    bad(" has ndim = " + std::to_string(t.ndim) + "; a TensorView has 1 to " +
        std::to_string(TensorView::kMaxDims) + " dimensions (0: not given)");
  if (!known_dtype(t.dtype))
    bad(" has an unknown dtype code " + std::to_string(static_cast<int>(t.dtype)));
  if (t.device != Device::cpu && t.device != Device::cuda)
    bad(" has an unknown device code " + std::to_string(static_cast<int>(t.device)));
  if (t.device == Device::cuda && t.device_index < 0)
    bad(" has a negative CUDA device index " + std::to_string(t.device_index));
  int64_t numel = 1;
  for (int i = 0; i < t.ndim; ++i) {
    if (t.shape[i] < 0)
      bad(" has a negative extent " + std::to_string(t.shape[i]) + " in dimension " +
          std::to_string(i) + " (shape " + shape_string(t) + ")");
  }
  for (int i = 0; i < t.ndim; ++i)
    if (t.shape[i] == 0) return;  // empty: nothing is read or written
  for (int i = 0; i < t.ndim; ++i) {
    if (__builtin_mul_overflow(numel, t.shape[i], &numel))
      bad(" shape " + shape_string(t) + " has more elements than int64 can count");
  }
  const int64_t elem = static_cast<int64_t>(dtype_size(t.dtype));
  // Last element's offset in elements; only dimensions of extent > 1 contribute.
  int64_t last = 0;
  bool overflow = false;
  for (int i = 0; i < t.ndim; ++i) {
    if (t.shape[i] <= 1) continue;
    if (t.strides[i] < 0)
      bad(" has a negative stride " + std::to_string(t.strides[i]) + " in dimension " +
          std::to_string(i) + "; divkit takes non-negative strides only");
    int64_t reach = 0;
    overflow |= __builtin_mul_overflow(t.shape[i] - 1, t.strides[i], &reach);
    overflow |= __builtin_add_overflow(last, reach, &last);
  }
  int64_t bytes = 0;
  overflow |= __builtin_add_overflow(last, int64_t{1}, &bytes);
  overflow |= __builtin_mul_overflow(bytes, elem, &bytes);
  if (overflow || bytes > kMaxSpanBytes) {
    std::string strides = "[";
    for (int i = 0; i < t.ndim; ++i) strides += (i ? ", " : "") + std::to_string(t.strides[i]);
    bad(" with shape " + shape_string(t) + " and strides " + strides +
        "] spans more than 2^56 bytes (its offsets overflow or exceed any address space)");
  }
  if (t.data == nullptr) bad(" has a null data pointer for " + std::to_string(numel) + " elements");
  const auto addr = reinterpret_cast<uintptr_t>(t.data);
  if (addr % static_cast<uintptr_t>(elem) != 0)
    bad(" data pointer is not aligned to its " + std::to_string(elem) + "-byte " +
        dtype_name(t.dtype) + " elements");
  if (addr > std::numeric_limits<uintptr_t>::max() - static_cast<uintptr_t>(bytes))
    bad(" spans past the end of the address space");
}

void views(const char* fn, std::initializer_list<Arg> args) {
  for (const Arg& a : args) view(fn, a.name, a.view);
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
