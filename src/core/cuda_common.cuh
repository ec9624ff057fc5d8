// Device helpers shared by the CUDA row kernels (src/**/*.cu): element loads and stores of every
// float dtype, fixed-order block reductions, the reduction over rows (core/reduction.h's rule on
// the device), error checks and a device guard. Blocks are kThreads threads.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "divkit/divergence.h"
#include "divkit/tensor.h"

// kernel<<<grid, block, shared_bytes, stream>>>(args): a macro so that the CUDA emulator
// (core/cuda_emulator.h, which defines its own) can run the same launches on the CPU.
#ifndef DIVKIT_LAUNCH
#define DIVKIT_LAUNCH(kernel, grid, block, shared_bytes, stream) \
  kernel<<<grid, block, shared_bytes, stream>>>
#define DIVKIT_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif

namespace divkit::cuda_common {

inline constexpr int kThreads = 256;
inline constexpr int kWarps = kThreads / 32;
inline constexpr unsigned long long kNone = ~0ull;

__device__ inline float load(const void* base, DType dt, int64_t i) {
  switch (dt) {
    case DType::f32: return static_cast<const float*>(base)[i];
    case DType::bf16: return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
    case DType::f16: return __half2float(static_cast<const __half*>(base)[i]);
    case DType::f64: return static_cast<float>(static_cast<const double*>(base)[i]);
    default: return 0.0f;
  }
}

// fp64 load (a log-probability given in fp64 keeps its precision, as elem::load on the CPU).
__device__ inline double load_f64(const void* base, DType dt, int64_t i) {
  if (dt == DType::f64) return static_cast<const double*>(base)[i];
  return static_cast<double>(load(base, dt, i));
}

__device__ inline int64_t load_index(const void* base, DType dt, int64_t i) {
  return dt == DType::i32 ? static_cast<int64_t>(static_cast<const int32_t*>(base)[i])
                          : static_cast<const int64_t*>(base)[i];
}

__device__ inline void store(void* base, DType dt, int64_t i, float x) {
  switch (dt) {
    case DType::f32: static_cast<float*>(base)[i] = x; break;
    case DType::bf16: static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(x); break;
    case DType::f16: static_cast<__half*>(base)[i] = __float2half_rn(x); break;
    case DType::f64: static_cast<double*>(base)[i] = x; break;
    default: break;
  }
}

struct SumOp {
  __device__ double operator()(double a, double b) const { return a + b; }
};
struct MaxOp {
  __device__ float operator()(float a, float b) const { return a > b ? a : b; }
};
struct MaxOpD {
  __device__ double operator()(double a, double b) const { return a > b ? a : b; }
};
struct OrOp {
  __device__ int operator()(int a, int b) const { return a | b; }
};

// Block-wide reduction in a fixed order: a butterfly within each warp (every lane ends with the
// same bits: a + b == b + a), then the warps' results in warp order. Every thread gets the
// result. smem holds kWarps values.
template <class T, class Op>
__device__ T block_reduce(T x, Op op, T* smem) {
  for (int o = 16; o > 0; o >>= 1) x = op(x, __shfl_xor_sync(0xffffffffu, x, o));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // smem may still be read by a previous reduction
  if (lane == 0) smem[warp] = x;
  __syncthreads();
  T r = smem[0];
  for (int w = 1; w < kWarps; ++w) r = op(r, smem[w]);
  return r;
}

// For each thread, the number of threads before it (in thread order) whose flag is set; `total`
// gets the block's count. smem holds kWarps ints.
__device__ inline int block_exclusive_count(bool flag, int& total, int* smem) {
  const unsigned ballot = __ballot_sync(0xffffffffu, flag);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int rank = __popc(ballot & ((1u << lane) - 1u));
  __syncthreads();
  if (lane == 0) smem[warp] = __popc(ballot);
  __syncthreads();
  int before = 0, sum = 0;
  for (int w = 0; w < kWarps; ++w) {
    if (w < warp) before += smem[w];
    sum += smem[w];
  }
  total = sum;
  return before + rank;
}

// The reduction over rows (core/reduction.h): labels / ignore_index, weights, reduction,
// num_items_in_batch, on the device.
struct RowReduce {
  int64_t n = 0;
  const void* labels = nullptr;
  DType labels_dtype = DType::i64;
  int64_t labels_stride = 1;
  int64_t ignore_index = -100;
  const void* weights = nullptr;
  DType weights_dtype = DType::f32;
  int64_t weights_stride = 1;
  double t2 = 1.0;  // T^2 when scale_by_t_squared, else 1
  int reduction = 0;
  double num_items = 0.0;
  double* divisor = nullptr;   // [1], written by prep_kernel
  double* row_loss = nullptr;  // [n]
  unsigned long long* bad = nullptr;
  int bad_slots = 0;         // bad[0, bad_slots): first bad row (or index) of each kind
  int weights_bad_slot = 0;  // the slot of a non-finite weight
  bool check_finite = true;  // false: the host reads nothing; a bad call gives a NaN loss
};

__device__ inline bool row_active(const RowReduce& r, int64_t i) {
  if (r.labels == nullptr) return true;
  return load_index(r.labels, r.labels_dtype, i * r.labels_stride) != r.ignore_index;
}

__device__ inline double row_weight(const RowReduce& r, int64_t i) {
  if (r.weights == nullptr) return 1.0;
  const int64_t k = i * r.weights_stride;
  return r.weights_dtype == DType::f64
             ? static_cast<const double*>(r.weights)[k]
             : static_cast<double>(static_cast<const float*>(r.weights)[k]);
}

__device__ inline bool any_bad(const RowReduce& r) {
  for (int k = 0; k < r.bad_slots; ++k)
    if (r.bad[k] != kNone) return true;
  return false;
}

// The divisor of the reduced loss from the labels on the device, and the finite check of the
// weights (one block: the count is an integer sum, order-free), on `stream`.
void launch_prep(const char* fn, const RowReduce& r, cudaStream_t stream);
// The loss from the rows' values: per token for none, else the weighted sum over rows in fp64
// in a fixed order. With check_finite off, a call with a bad input gets a NaN loss.
void launch_finish(const char* fn, const RowReduce& r, const TensorView& loss, cudaStream_t stream);

// Throws Error "<fn>: CUDA error in <what>: <message>".
void check_cuda(const char* fn, cudaError_t err, const char* what);

// Throws the CPU's error for the non-finite weight at `index` (core/reduction.h's message, with
// the value copied back from the device).
[[noreturn]] void fail_bad_weight(const char* fn, const RowReduce& r, unsigned long long index);

// Sets r's labels, weights, reduction and num_items_in_batch from the options (no checks).
void set_row_reduce(int64_t n, const DivergenceOptions& options, RowReduce& r);

// Fills r from the options (labels, weights, reduction, num_items_in_batch) after checking them
// as shapes and dtypes (the data stays on the device) and the loss output.
void fill_row_reduce(const char* fn, int64_t n, const DivergenceOptions& options,
                     const TensorView& loss, RowReduce& r);

// The end of a row-kernel call on `stream`, after the prep kernel: in place, a check-only pass
// over every row first (a bad row found midway would leave earlier rows overwritten), after which
// the row kernel writes nothing once a bad row was found; then the row kernel and the finish
// kernel; with r.check_finite, the r.bad_slots flags copied to bad_host and waited for (off:
// nothing read back, nothing waited for, so the call can be captured in a CUDA graph). The
// workspace ws is freed (stream-ordered) and set to nullptr. launch_rows(check_only,
// skip_if_bad) launches the row kernel.
template <class LaunchRows, class Ptr>
void run_rows(const char* fn, const RowReduce& r, const TensorView& loss, bool in_place,
              LaunchRows launch_rows, Ptr*& ws, unsigned long long* bad_host, cudaStream_t stream) {
  if (in_place) launch_rows(/*check_only=*/true, /*skip_if_bad=*/false);
  launch_rows(/*check_only=*/false, /*skip_if_bad=*/in_place);
  launch_finish(fn, r, loss, stream);
  if (r.check_finite)
    check_cuda(fn,
               cudaMemcpyAsync(bad_host, r.bad, r.bad_slots * sizeof(unsigned long long),
                               cudaMemcpyDeviceToHost, stream),
               "cudaMemcpyAsync");
  check_cuda(fn, cudaFreeAsync(ws, stream), "cudaFreeAsync");
  ws = nullptr;
  if (r.check_finite) check_cuda(fn, cudaStreamSynchronize(stream), "cudaStreamSynchronize");
}

// Restores the caller's current device on the way out.
class DeviceGuard {
 public:
  DeviceGuard(const char* fn, int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace divkit::cuda_common
