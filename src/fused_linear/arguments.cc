#include "fused_linear/arguments.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>

#include "core/check.h"
#include "core/dtype.h"

namespace divkit::fused {

using check::fail;

// The dtype switch is per row so that the loops vectorize (a bf16 weight gradient is 262M elements
// at 128256 x 2048).
void store_row(const TensorView& out, int64_t row, const float* src, int64_t cols) {
  const int64_t off = row * out.strides[0], cs = cols <= 1 ? 1 : out.strides[1];
  if (cs != 1) {
    for (int64_t j = 0; j < cols; ++j) elem::store(out.data, out.dtype, off + j * cs, src[j]);
    return;
  }
  switch (out.dtype) {
    case DType::f32:
      std::memcpy(static_cast<float*>(out.data) + off, src, cols * sizeof(float));
      break;
    case DType::f64: {
      double* d = static_cast<double*>(out.data) + off;
      for (int64_t j = 0; j < cols; ++j) d[j] = src[j];
      break;
    }
    case DType::bf16: {
      uint16_t* d = static_cast<uint16_t*>(out.data) + off;
      for (int64_t j = 0; j < cols; ++j) d[j] = dtype::f32_to_bf16(src[j]);
      break;
    }
    case DType::f16: {
      uint16_t* d = static_cast<uint16_t*>(out.data) + off;
      for (int64_t j = 0; j < cols; ++j) d[j] = dtype::f32_to_f16(src[j]);
      break;
    }
    default: break;
  }
}

TensorView row_slice(const TensorView& t, int64_t r0, int64_t rows) {
  TensorView s = t;
  if (!t.defined()) return s;
  s.shape[0] = rows;
  s.data =
      static_cast<char*>(t.data) + r0 * t.strides[0] * static_cast<int64_t>(dtype_size(t.dtype));
  return s;
}

void check_head(const char* fn, const char* prefix, const LinearHead& h, int64_t n_expected) {
  const std::string p(prefix);
  const std::string hn = p + "hidden", wn = p + "weight", bn = p + "bias";
  if (!h.hidden.defined()) fail(fn, hn + " is required");
  if (!h.weight.defined()) fail(fn, wn + " is required");
  check::float_matrix(fn, hn.c_str(), h.hidden);
  check::float_matrix(fn, wn.c_str(), h.weight);
  if (h.hidden.shape[0] > 1 && h.hidden.strides[0] == 0)
    fail(fn, hn + " must not be a broadcast (row stride 0)");
  if (h.weight.shape[0] > 1 && h.weight.strides[0] == 0)
    fail(fn, wn + " must not be a broadcast (row stride 0)");
  if (h.hidden.shape[1] != h.weight.shape[1])
    fail(fn, hn + " " + check::shape_string(h.hidden) + " and " + wn + " " +
                 check::shape_string(h.weight) + " disagree on the hidden size H");
  if (h.weight.shape[0] == 0) fail(fn, wn + " has V = 0 rows (an empty vocabulary)");
  if (n_expected >= 0 && h.hidden.shape[0] != n_expected)
    fail(fn, hn + " has " + std::to_string(h.hidden.shape[0]) + " tokens, expected " +
                 std::to_string(n_expected) + " (as student_hidden)");
  if (h.bias.defined()) {
    check::vector_of(fn, bn.c_str(), h.bias, h.weight.shape[0],
                     {DType::f32, DType::f64, DType::bf16, DType::f16});
    // A -inf entry masks that vocabulary row (padded entries): its logit is -inf, a masked
    // entry of probability 0 as anywhere else in divkit; the rows whose logits end up all -inf
    // are refused by the chunk loops. NaN and +inf have no such meaning.
    for (int64_t j = 0; j < h.weight.shape[0]; ++j) {
      const float b = elem::load_f32(h.bias.data, h.bias.dtype, j * h.bias.strides[0]);
      if (std::isnan(b) || b == std::numeric_limits<float>::infinity())
        fail(fn, bn + " contains NaN or +inf at index " + std::to_string(j) +
                     " (-inf is allowed: it masks that vocabulary entry)");
    }
  }
}

void check_grads(const char* fn, const char* prefix, const LinearHead& h,
                 const LinearHeadGrads& g) {
  const std::string p(prefix);
  auto same_shape = [&](const TensorView& out, const TensorView& in, const std::string& name) {
    if (!out.defined()) return;
    if (out.device != Device::cpu) fail(fn, name + " must be on the CPU");
    if (!check::is_float(out.dtype))
      fail(fn, name + " must be a float tensor, got " + dtype_name(out.dtype));
    if (out.ndim != in.ndim)
      fail(fn, name + " must have shape " + check::shape_string(in) + ", got " +
                   check::shape_string(out));
    for (int d = 0; d < in.ndim; ++d)
      if (out.shape[d] != in.shape[d])
        fail(fn, name + " must have shape " + check::shape_string(in) + ", got " +
                     check::shape_string(out));
    if (out.numel() > 0 && out.data == nullptr) fail(fn, name + " has a null data pointer");
    if (out.ndim == 2) check::float_matrix(fn, name.c_str(), out, /*is_output=*/true);
  };
  same_shape(g.hidden, h.hidden, "grad_" + p + "hidden");
  same_shape(g.weight, h.weight, "grad_" + p + "weight");
  if (g.bias.defined() && !h.bias.defined())
    fail(fn, "grad_" + p + "bias is given but " + p + "bias is not");
  same_shape(g.bias, h.bias, "grad_" + p + "bias");
}

int64_t choose_chunk(int64_t requested, int64_t n, int64_t v) {
  if (requested < 0)
    throw Error("fused linear: chunk_size must be >= 0 (0 chooses it), got " +
                std::to_string(requested));
  int64_t c = requested;
  if (c == 0) {
    // About 256 MiB of fp32 logits per buffer, at most 1024 tokens. The weight gradient is
    // accumulated over the chunks with a GEMM of depth C that reads and writes all of dW (V x H):
    // small chunks make that traffic dominate; beyond ~1024 tokens nothing more is gained
    // (docs/benchmarks.md).
    constexpr int64_t kTargetFloats = int64_t{64} << 20;
    c = std::clamp<int64_t>(kTargetFloats / std::max<int64_t>(v, 1), 32, 1024);
  }
  return std::max<int64_t>(1, std::min(c, std::max<int64_t>(n, 1)));
}

std::vector<int64_t> read_labels(const char* fn, const TensorView& labels, int64_t n,
                                 int64_t ignore_index, int64_t v, bool need_range) {
  std::vector<int64_t> out(static_cast<size_t>(n), 0);
  if (!labels.defined()) return out;
  check::vector_of(fn, "labels", labels, n, {DType::i64, DType::i32});
  for (int64_t i = 0; i < n; ++i) {
    const int64_t y = elem::index(labels, i);
    if (y == ignore_index) {
      out[i] = -1;
    } else if (need_range && (y < 0 || y >= v)) {
      fail(fn, "labels[" + std::to_string(i) + "] = " + std::to_string(y) +
                   " is out of range [0, " + std::to_string(v) + ") and is not ignore_index (" +
                   std::to_string(ignore_index) + ")");
    } else {
      out[i] = need_range ? y : 0;
    }
  }
  return out;
}

[[noreturn]] void rethrow_chunk(const char* fn, const Error& e, int64_t r0) {
  throw Error(std::string(fn) + ": in the chunk of tokens starting at " + std::to_string(r0) +
              " (logits = hidden @ weight^T + bias): " + e.what());
}

}  // namespace divkit::fused
