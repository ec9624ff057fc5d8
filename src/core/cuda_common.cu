// The host side and the row-reduction kernels of cuda_common.cuh.
#include <cmath>
#include <string>

#include "core/check.h"
#include "core/cuda_common.cuh"
#include "core/cuda_device.h"
#include "core/reduction.h"

namespace divkit::cuda_common {
namespace {

__global__ void __launch_bounds__(kThreads) prep_kernel(RowReduce r) {
  __shared__ double sh[kWarps];
  double count = 0.0;
  for (int64_t i = threadIdx.x; i < r.n; i += kThreads) {
    count += row_active(r, i) ? 1.0 : 0.0;
    if (r.weights != nullptr && !isfinite(row_weight(r, i)))
      atomicMin(&r.bad[r.weights_bad_slot], static_cast<unsigned long long>(i));
  }
  const double total = block_reduce(count, SumOp{}, sh);  // exact: integers below 2^53
  if (threadIdx.x != 0) return;
  double divisor = 1.0;
  if (r.num_items > 0.0) divisor = r.num_items;
  else if (r.reduction == static_cast<int>(Reduction::mean)) divisor = total > 0 ? total : 1.0;
  else if (r.reduction == static_cast<int>(Reduction::batchmean))
    divisor = r.n > 0 ? static_cast<double>(r.n) : 1.0;
  *r.divisor = divisor;
}

__global__ void __launch_bounds__(kThreads)
    finish_kernel(RowReduce r, void* loss, DType loss_dtype, int64_t loss_stride) {
  __shared__ double sh[kWarps];
  auto put = [&](int64_t i, double x) {
    if (loss_dtype == DType::f64) static_cast<double*>(loss)[i * loss_stride] = x;
    else static_cast<float*>(loss)[i * loss_stride] = static_cast<float>(x);
  };
  // Without the host's check, the flags show in the loss instead: NaN everywhere.
  const bool poisoned = !r.check_finite && any_bad(r);
  if (r.reduction == static_cast<int>(Reduction::none)) {
    for (int64_t i = threadIdx.x; i < r.n; i += kThreads) {
      const double w = row_weight(r, i);
      put(i, poisoned ? nan("") : (row_active(r, i) && w != 0.0 ? r.row_loss[i] * w * r.t2 : 0.0));
    }
    return;
  }
  double total = 0.0;
  for (int64_t i = threadIdx.x; i < r.n; i += kThreads) {
    const double w = row_weight(r, i);
    if (row_active(r, i) && w != 0.0) total += r.row_loss[i] * w;
  }
  total = block_reduce(total, SumOp{}, sh);
  if (threadIdx.x == 0) put(0, poisoned ? nan("") : total * r.t2 / *r.divisor);
}

}  // namespace

void check_cuda(const char* fn, cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw Error(std::string(fn) + ": CUDA error in " + what + ": " + cudaGetErrorString(err));
}

void fail_bad_weight(const char* fn, const RowReduce& r, unsigned long long index) {
  const int64_t i = static_cast<int64_t>(index);
  const size_t es = r.weights_dtype == DType::f64 ? sizeof(double) : sizeof(float);
  double w64 = 0.0;
  float w32 = 0.0f;
  void* dst = r.weights_dtype == DType::f64 ? static_cast<void*>(&w64) : static_cast<void*>(&w32);
  check_cuda(fn,
             cudaMemcpy(dst,
                        static_cast<const char*>(r.weights) + i * r.weights_stride * int64_t(es),
                        es, cudaMemcpyDeviceToHost),
             "cudaMemcpy");
  const double w = r.weights_dtype == DType::f64 ? w64 : static_cast<double>(w32);
  check::fail(fn,
              "weights must be finite, got " + check::fmt(w) + " at index " + std::to_string(i));
}

void launch_prep(const char* fn, const RowReduce& r, cudaStream_t stream) {
  DIVKIT_LAUNCH(prep_kernel, 1, kThreads, 0, stream)(r);
  check_cuda(fn, cudaGetLastError(), "the prep kernel launch");
}

void launch_finish(const char* fn, const RowReduce& r, const TensorView& loss,
                   cudaStream_t stream) {
  DIVKIT_LAUNCH(finish_kernel, 1, kThreads, 0, stream)
  (r, loss.data, loss.dtype, loss.ndim ? loss.strides[0] : 0);
  check_cuda(fn, cudaGetLastError(), "the finish kernel launch");
}

void set_row_reduce(int64_t n, const DivergenceOptions& options, RowReduce& r) {
  r.n = n;
  if (options.labels.defined()) {
    r.labels = options.labels.data;
    r.labels_dtype = options.labels.dtype;
    r.labels_stride = options.labels.strides[0];
  }
  r.ignore_index = options.ignore_index;
  if (options.weights.defined()) {
    r.weights = options.weights.data;
    r.weights_dtype = options.weights.dtype;
    r.weights_stride = options.weights.strides[0];
  }
  r.reduction = static_cast<int>(options.reduction);
  r.num_items = options.num_items_in_batch;
}

void fill_row_reduce(const char* fn, int64_t n, const DivergenceOptions& options,
                     const TensorView& loss, RowReduce& r) {
  if (options.labels.defined())
    check::vector_of(fn, "labels", cuda::shape_only(options.labels), n, {DType::i64, DType::i32});
  if (options.weights.defined())
    check::vector_of(fn, "weights", cuda::shape_only(options.weights), n, {DType::f32, DType::f64});
  (void)reduce::divisor(fn, options.reduction, options.num_items_in_batch, n, n);  // checks
  reduce::check_loss_output(fn, cuda::shape_only(loss), options.reduction, n);
  set_row_reduce(n, options, r);
}

DeviceGuard::DeviceGuard(const char* fn, int device) {
  check_cuda(fn, cudaGetDevice(&previous_), "cudaGetDevice");
  if (device != previous_) check_cuda(fn, cudaSetDevice(device), "cudaSetDevice");
}
DeviceGuard::~DeviceGuard() { cudaSetDevice(previous_); }

}  // namespace divkit::cuda_common
