// The device side of the fused heads' CUDA chunk loop (head_cuda.h): the logits GEMM and bias,
// the gradient GEMMs and the conversions around them.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "core/check.h"
#include "core/cuda_common.cuh"
#include "core/cuda_device.h"
#include "core/gemm_cuda.h"
#include "fused_linear/head_cuda.h"

namespace divkit::fused_cuda {
namespace {

using namespace cuda_common;  // NOLINT(build/namespaces): the shared device helpers

constexpr int64_t kMaxBlocks = 4096;

unsigned grid_for(int64_t units) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(units, kMaxBlocks)));
}

// z[r, j] += b[j] (fp32, as the CPU head adds it; a -inf entry keeps the logit -inf).
__global__ void __launch_bounds__(kThreads)
    add_bias_kernel(float* z, int64_t rows, int64_t v, const void* b, DType bdt, int64_t bs) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x)
    for (int64_t j = threadIdx.x; j < v; j += kThreads) z[r * v + j] += load(b, bdt, j * bs);
}

// dst[r, j] = scale * src[r, j] (0 without src), each element rounded once to dst's dtype.
__global__ void __launch_bounds__(kThreads)
    convert_kernel(const void* src, DType sdt, int64_t lds, int64_t rows, int64_t cols, void* dst,
                   DType ddt, int64_t ldd, int64_t cs, float scale) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x)
    for (int64_t j = threadIdx.x; j < cols; j += kThreads)
      store(dst, ddt, r * ldd + j * cs,
            src != nullptr ? load(src, sdt, r * lds + j) * scale : 0.0f);
}

// *out = max(*out, max |x|) over [rows, v]; the max of non-negative floats is their max as
// integers, so the order of the atomics does not matter.
__global__ void __launch_bounds__(kThreads)
    absmax_kernel(const float* x, int64_t rows, int64_t v, float* out) {
  __shared__ float sh[kWarps];
  float m = 0.0f;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x)
    for (int64_t j = threadIdx.x; j < v; j += kThreads) m = fmaxf(m, fabsf(x[r * v + j]));
  m = block_reduce(m, MaxOp{}, sh);
  if (threadIdx.x == 0) atomicMax(reinterpret_cast<unsigned*>(out), __float_as_uint(m));
}

// db[j] += sum_r g[r, j], the rows in order (fp64).
__global__ void __launch_bounds__(kThreads)
    bias_grad_kernel(const float* g, int64_t rows, int64_t v, double* db, bool first) {
  for (int64_t j = blockIdx.x * int64_t{kThreads} + threadIdx.x; j < v;
       j += int64_t{gridDim.x} * kThreads) {
    double s = first ? 0.0 : db[j];
    for (int64_t r = 0; r < rows; ++r) s += g[r * v + j];
    db[j] = s;
  }
}

// out[j] = db[j] (0 without db) in out's dtype.
__global__ void __launch_bounds__(kThreads)
    store_vector_kernel(const double* db, int64_t v, void* out, DType dt, int64_t stride) {
  for (int64_t j = blockIdx.x * int64_t{kThreads} + threadIdx.x; j < v;
       j += int64_t{gridDim.x} * kThreads) {
    const double x = db != nullptr ? db[j] : 0.0;
    if (dt == DType::f64) static_cast<double*>(out)[j * stride] = x;
    else store(out, dt, j * stride, static_cast<float>(x));
  }
}

bool unit_cols(const TensorView& t) { return t.shape[1] <= 1 || t.strides[1] == 1; }

// The leading dimension of a row-major matrix for the GEMM: a single row may have any row stride.
int64_t ld_of(const TensorView& t) {
  return t.shape[0] <= 1 ? std::max<int64_t>(t.strides[0], t.shape[1]) : t.strides[0];
}

// An fp32 matrix the GEMM can write directly: unit column stride, rows apart by at least H.
bool direct_f32(const TensorView& t) {
  return t.defined() && t.dtype == DType::f32 && unit_cols(t) && ld_of(t) >= t.shape[1];
}

const char* at(const char* base, int64_t elems, DType dt) {
  return base + elems * static_cast<int64_t>(dtype_size(dt));
}

}  // namespace

DeviceBuffer::DeviceBuffer(const char* fn, int64_t bytes, CUstream_st* stream) : stream_(stream) {
  check_cuda(fn,
             cudaMallocAsync(reinterpret_cast<void**>(&p_), static_cast<size_t>(bytes),
                             reinterpret_cast<cudaStream_t>(stream)),
             "cudaMallocAsync");
}

DeviceBuffer::~DeviceBuffer() { cudaFreeAsync(p_, reinterpret_cast<cudaStream_t>(stream_)); }

TensorView device_vector(double* p, int64_t r0, int64_t rows, int device) {
  if (p == nullptr) return {};
  TensorView t = TensorView::vector(p + r0, DType::f64, rows);
  t.device = Device::cuda;
  t.device_index = device;
  return t;
}

TensorView device_matrix(float* p, int64_t rows, int64_t v, int device) {
  TensorView t = TensorView::matrix(p, DType::f32, rows, v);
  t.device = Device::cuda;
  t.device_index = device;
  return t;
}

void fail_bad_label(const char* fn, const TensorView& labels, int64_t i, int64_t v,
                    int64_t ignore_index) {
  const size_t es = dtype_size(labels.dtype);
  int64_t y = 0;
  int32_t y32 = 0;
  void* dst = es == 4 ? static_cast<void*>(&y32) : static_cast<void*>(&y);
  check_cuda(fn,
             cudaMemcpy(dst,
                        static_cast<const char*>(labels.data) +
                            i * labels.strides[0] * static_cast<int64_t>(es),
                        es, cudaMemcpyDeviceToHost),
             "cudaMemcpy");
  if (es == 4) y = y32;
  check::fail(fn, "labels[" + std::to_string(i) + "] = " + std::to_string(y) +
                      " is out of range [0, " + std::to_string(v) + ") and is not ignore_index (" +
                      std::to_string(ignore_index) + ")");
}

void check_head(const char* fn, const LinearHead& head, const LinearHeadGrads& grads,
                const std::string& prefix) {
  const std::string hn = prefix + "hidden", wn = prefix + "weight", bn = prefix + "bias";
  auto need = [&](const TensorView& t, const std::string& name) {
    if (!t.defined()) check::fail(fn, name + " is required");
    check::float_matrix(fn, name.c_str(), cuda::shape_only(t));
  };
  need(head.hidden, hn);
  need(head.weight, wn);
  const TensorView& h = head.hidden;
  const TensorView& w = head.weight;
  if (h.shape[1] != w.shape[1])
    check::fail(fn, hn + " " + check::shape_string(h) + " and " + wn + " " +
                        check::shape_string(w) + " disagree on the hidden size H");
  if (w.shape[0] == 0) check::fail(fn, wn + " has V = 0 rows (an empty vocabulary)");
  if (w.dtype == DType::f64)
    check::fail(fn, wn + " is float64, which has no CUDA GEMM in divkit's core (float32, bfloat16 "
                         "or float16 on CUDA)");
  if (h.dtype != w.dtype)
    check::fail(fn, hn + " (" + dtype_name(h.dtype) + ") and " + wn + " (" + dtype_name(w.dtype) +
                        ") must have one dtype on CUDA (the operands of the GEMMs)");
  for (auto [t, name] : {std::pair{&h, &hn}, std::pair{&w, &wn}}) {
    if (!unit_cols(*t)) check::fail(fn, *name + " must have unit stride along H");
    if (ld_of(*t) < t->shape[1])
      check::fail(fn, *name + " has overlapping rows (row stride " + std::to_string(t->strides[0]) +
                          " < H = " + std::to_string(t->shape[1]) +
                          "), which the CUDA GEMMs cannot read");
  }
  if (head.bias.defined())
    check::vector_of(fn, bn.c_str(), cuda::shape_only(head.bias), w.shape[0],
                     {DType::f32, DType::f64, DType::bf16, DType::f16});
  auto out = [&](const TensorView& g, const TensorView& in, const std::string& name) {
    if (!g.defined()) return;
    if (!check::is_float(g.dtype))
      check::fail(fn, name + " must be a float tensor, got " + dtype_name(g.dtype));
    bool same = g.ndim == in.ndim;
    for (int d = 0; same && d < in.ndim; ++d) same = g.shape[d] == in.shape[d];
    if (!same)
      check::fail(fn, name + " must have shape " + check::shape_string(in) + ", got " +
                          check::shape_string(g));
    if (g.ndim == 2) check::float_matrix(fn, name.c_str(), cuda::shape_only(g), true);
  };
  out(grads.hidden, h, "grad_" + hn);
  out(grads.weight, w, "grad_" + wn);
  if (grads.bias.defined() && !head.bias.defined())
    check::fail(fn, "grad_" + bn + " is given but " + bn + " is not");
  out(grads.bias, head.bias, "grad_" + bn);
}

DeviceHead::DeviceHead(const char* fn, const LinearHead& head, const LinearHeadGrads& grads,
                       int64_t chunk, CUstream_st* stream)
    : fn_(fn), head_(head), grads_(grads), stream_(stream) {
  n_ = head.hidden.shape[0];
  v_ = head.weight.shape[0];
  h_ = head.weight.shape[1];
  chunk_ = std::max<int64_t>(1, std::min(chunk, n_));
  dt_ = head.weight.dtype;
  const bool low = dt_ != DType::f32;
  dh_direct_ = direct_f32(grads.hidden);
  dw_direct_ = direct_f32(grads.weight);
  const int64_t es = static_cast<int64_t>(dtype_size(dt_));
  // Sizes in bytes, each rounded up to 256 so that every piece stays aligned.
  auto up = [](int64_t b) { return (b + 255) / 256 * 256; };
  const int64_t b_z = up(chunk_ * v_ * 4);
  const int64_t b_low = wants_grads() && low ? up(chunk_ * v_ * es) : 0;
  const int64_t b_dh = grads.hidden.defined() && !dh_direct_ ? up(chunk_ * h_ * 4) : 0;
  const int64_t b_dw = grads.weight.defined() && !dw_direct_ ? up(v_ * h_ * 4) : 0;
  const int64_t b_db = grads.bias.defined() ? up(v_ * 8) : 0;
  const int64_t b_max = dt_ == DType::f16 && wants_grads() ? 256 : 0;
  const int64_t total = b_z + b_low + b_dh + b_dw + b_db + b_max;
  ws_ = std::make_unique<DeviceBuffer>(fn_, total, stream_);
  char* p = ws_->get();
  auto take = [&](int64_t bytes) {
    char* q = bytes > 0 ? p : nullptr;
    p += bytes;
    return q;
  };
  z_ = reinterpret_cast<float*>(take(b_z));
  g_low_ = take(b_low);
  dh_ = reinterpret_cast<float*>(take(b_dh));
  dw_ = reinterpret_cast<float*>(take(b_dw));
  db_ = reinterpret_cast<double*>(take(b_db));
  absmax_ = reinterpret_cast<float*>(take(b_max));
  if (dw_direct_) dw_ = static_cast<float*>(grads.weight.data);
  ldw_ = dw_direct_ ? ld_of(grads.weight) : h_;
}

float* DeviceHead::logits(int64_t r0, int64_t rows) {
  const auto s = reinterpret_cast<cudaStream_t>(stream_);
  const TensorView& hd = head_.hidden;
  const void* a = at(static_cast<const char*>(hd.data), r0 * hd.strides[0], dt_);
  const TensorView& w = head_.weight;
  gemm_cuda::abt(fn_, rows, v_, h_, 1.0f, a, dt_, ld_of(hd), w.data, dt_, ld_of(w), 0.0f, z_, v_,
                 stream_);
  if (head_.bias.defined()) {
    DIVKIT_LAUNCH(add_bias_kernel, grid_for(rows), kThreads, 0, s)
    (z_, rows, v_, head_.bias.data, head_.bias.dtype, head_.bias.strides[0]);
    check_cuda(fn_, cudaGetLastError(), "the bias kernel launch");
  }
  return z_;
}

void DeviceHead::add_grad_chunk(int64_t r0, int64_t rows) {
  if (!wants_grads()) return;
  const auto s = reinterpret_cast<cudaStream_t>(stream_);
  // The gradient GEMMs' first operand: G itself (fp32 head) or G rounded to the head's dtype.
  const void* g = z_;
  float unscale = 1.0f;
  if (g_low_ != nullptr) {
    float scale = 1.0f;
    if (dt_ == DType::f16) {
      float m = 0.0f;
      check_cuda(fn_, cudaMemsetAsync(absmax_, 0, sizeof(float), s), "cudaMemsetAsync");
      DIVKIT_LAUNCH(absmax_kernel, grid_for(rows), kThreads, 0, s)(z_, rows, v_, absmax_);
      check_cuda(fn_, cudaGetLastError(), "the max kernel launch");
      check_cuda(fn_, cudaMemcpyAsync(&m, absmax_, sizeof(float), cudaMemcpyDeviceToHost, s),
                 "cudaMemcpyAsync");
      check_cuda(fn_, cudaStreamSynchronize(s), "cudaStreamSynchronize");
      if (m > 0.0f && std::isfinite(m)) {
        scale = std::ldexp(1.0f, 10 - std::ilogb(m));
        unscale = 1.0f / scale;  // exact: a power of two
      }
    }
    DIVKIT_LAUNCH(convert_kernel, grid_for(rows), kThreads, 0, s)
    (z_, DType::f32, v_, rows, v_, g_low_, dt_, v_, 1, scale);
    check_cuda(fn_, cudaGetLastError(), "the conversion kernel launch");
    g = g_low_;
  }
  if (grads_.hidden.defined()) {
    const TensorView& out = grads_.hidden;
    float* c = dh_direct_
                   ? reinterpret_cast<float*>(const_cast<char*>(
                         at(static_cast<const char*>(out.data), r0 * out.strides[0], DType::f32)))
                   : dh_;
    const int64_t ldc = dh_direct_ ? ld_of(out) : h_;
    const TensorView& w = head_.weight;
    gemm_cuda::ab(fn_, rows, h_, v_, unscale, g, dt_, v_, w.data, dt_, ld_of(w), 0.0f, c, ldc,
                  stream_);
    if (!dh_direct_) {
      DIVKIT_LAUNCH(convert_kernel, grid_for(rows), kThreads, 0, s)
      (dh_, DType::f32, h_, rows, h_,
       const_cast<char*>(at(static_cast<const char*>(out.data), r0 * out.strides[0], out.dtype)),
       out.dtype, out.strides[0], h_ <= 1 ? 1 : out.strides[1], 1.0f);
      check_cuda(fn_, cudaGetLastError(), "the conversion kernel launch");
    }
  }
  if (grads_.weight.defined()) {
    const TensorView& hd = head_.hidden;
    const void* hrow = at(static_cast<const char*>(hd.data), r0 * hd.strides[0], dt_);
    const int64_t ldh = ld_of(hd);
    gemm_cuda::atb(fn_, v_, h_, rows, unscale, g, dt_, v_, hrow, dt_, ldh, first_ ? 0.0f : 1.0f,
                   dw_, ldw_, stream_);
  }
  if (grads_.bias.defined()) {
    DIVKIT_LAUNCH(bias_grad_kernel, grid_for((v_ + kThreads - 1) / kThreads), kThreads, 0, s)
    (z_, rows, v_, db_, first_);
    check_cuda(fn_, cudaGetLastError(), "the bias gradient kernel launch");
  }
  first_ = false;
}

void DeviceHead::finish() {
  const auto s = reinterpret_cast<cudaStream_t>(stream_);
  if (first_ && grads_.hidden.defined() && n_ > 0) {  // no chunk ran: zeros
    const TensorView& out = grads_.hidden;
    DIVKIT_LAUNCH(convert_kernel, grid_for(n_), kThreads, 0, s)
    (nullptr, DType::f32, 0, n_, h_, out.data, out.dtype, out.strides[0],
     h_ <= 1 ? 1 : out.strides[1], 1.0f);
    check_cuda(fn_, cudaGetLastError(), "the conversion kernel launch");
  }
  if (grads_.weight.defined() && (first_ || !dw_direct_)) {
    const TensorView& out = grads_.weight;
    DIVKIT_LAUNCH(convert_kernel, grid_for(v_), kThreads, 0, s)
    (first_ ? nullptr : dw_, DType::f32, ldw_, v_, h_, out.data, out.dtype, out.strides[0],
     h_ <= 1 ? 1 : out.strides[1], 1.0f);
    check_cuda(fn_, cudaGetLastError(), "the conversion kernel launch");
  }
  if (grads_.bias.defined()) {
    const TensorView& out = grads_.bias;
    DIVKIT_LAUNCH(store_vector_kernel, grid_for((v_ + kThreads - 1) / kThreads), kThreads, 0, s)
    (first_ ? nullptr : db_, v_, out.data, out.dtype, out.strides[0]);
    check_cuda(fn_, cudaGetLastError(), "the bias gradient kernel launch");
  }
}

}  // namespace divkit::fused_cuda
