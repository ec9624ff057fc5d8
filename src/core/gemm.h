// The small GEMM interface of the fused linear-head kernels, implemented over CBLAS (OpenBLAS).
// Everything is fp32, row-major, with leading dimensions in elements: the fused kernels convert
// bf16/fp16 operands to fp32 per chunk so that logits are never rounded to low precision. A GPU
// backend will put its own implementation behind the same three calls.
#pragma once

#include <cstdint>

namespace divkit::gemm {

// C[m, n] = alpha * A[m, k] * B[n, k]^T + beta * C     (logits = hidden @ weight^T)
void abt(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b,
         int64_t ldb, float beta, float* c, int64_t ldc);
// The same in fp64 (the OT cost matrix of float64 point clouds).
void abt(int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda,
         const double* b, int64_t ldb, double beta, double* c, int64_t ldc);
// C[m, n] = alpha * A[m, k] * B[k, n] + beta * C       (grad_hidden = grad_logits @ weight)
void ab(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b,
        int64_t ldb, float beta, float* c, int64_t ldc);
// C[m, n] = alpha * A[k, m]^T * B[k, n] + beta * C     (grad_weight += grad_logits^T @ hidden)
void atb(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b,
         int64_t ldb, float beta, float* c, int64_t ldc);

// Threads of the BLAS library. The callers set 1 and call the BLAS from their own OpenMP threads,
// one call per piece of fixed shape, so that results do not depend on the thread count.
void set_blas_threads(int n);

}  // namespace divkit::gemm
