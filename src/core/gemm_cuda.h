// The device GEMM of the fused linear heads' CUDA path: core/gemm.h's three shapes on device
// memory, through cuBLAS (cublasGemmEx) loaded at run time with dlopen, so that divkit keeps
// needing only the NVIDIA driver: a Python process gets the libcublas that torch's CUDA wheels
// install (already loaded by torch), a C++ program the one on its library path.
//
// Row-major with leading dimensions in elements, as core/gemm.h. A and B share one dtype
// (float32, bfloat16 or float16); C is float32; products are accumulated in float32
// (CUBLAS_COMPUTE_32F, no TF32: the handles keep cuBLAS's default math mode). beta = 0 does not
// read C (NaN or garbage there stays out). The call is enqueued on `stream` (nullptr: the legacy
// default stream) and not waited for. Each thread keeps one cuBLAS handle per device, made on the
// first call on that device; the caller sets the current device (a DeviceGuard).
//
// Errors (divkit::Error, the message starting with `fn`, the public function that calls): a bad
// dtype pair, a size or leading dimension out of cuBLAS's int range or too small, a libcublas that
// cannot be loaded, a cuBLAS call that fails.
//
// In DIVKIT_CUDA=EMULATE builds nothing is dlopened: the CUDA emulator provides the same entry
// points on the CPU (core/cublas_emulator.cc), under the same library names.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "divkit/tensor.h"

struct CUstream_st;  // cudaStream_t is CUstream_st*; no CUDA header needed by the callers

namespace divkit::gemm_cuda {

// C[m, n] = alpha * A[m, k] * B[n, k]^T + beta * C     (logits = hidden @ weight^T)
void abt(const char* fn, int64_t m, int64_t n, int64_t k, float alpha, const void* a, DType a_dtype,
         int64_t lda, const void* b, DType b_dtype, int64_t ldb, float beta, float* c, int64_t ldc,
         CUstream_st* stream);
// C[m, n] = alpha * A[m, k] * B[k, n] + beta * C       (grad_hidden = grad_logits @ weight)
void ab(const char* fn, int64_t m, int64_t n, int64_t k, float alpha, const void* a, DType a_dtype,
        int64_t lda, const void* b, DType b_dtype, int64_t ldb, float beta, float* c, int64_t ldc,
        CUstream_st* stream);
// C[m, n] = alpha * A[k, m]^T * B[k, n] + beta * C     (grad_weight += grad_logits^T @ hidden)
void atb(const char* fn, int64_t m, int64_t n, int64_t k, float alpha, const void* a, DType a_dtype,
         int64_t lda, const void* b, DType b_dtype, int64_t ldb, float beta, float* c, int64_t ldc,
         CUstream_st* stream);

// The library names tried, in order, each first as already loaded (RTLD_NOLOAD) and then loaded.
std::vector<std::string> default_library_names();

// For tests: the names to try instead of the default ones (empty: the defaults again). Forgets
// the loaded library and the handles made through it, so that the next call loads again. Not
// while other threads call the GEMM.
void set_library_names_for_testing(const std::vector<std::string>& names);

}  // namespace divkit::gemm_cuda
