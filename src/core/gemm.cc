#include "core/gemm.h"

#include <cblas.h>

#include <climits>

#include "divkit/tensor.h"

extern "C" void openblas_set_num_threads(int num_threads);

namespace divkit::gemm {
namespace {

// CBLAS takes int dimensions: a chunk of rows is small, but V * H or a leading dimension may
// not be, so every value is checked (a silent wrap-around would read the wrong memory).
int to_int(int64_t x) {
  if (x < 0 || x > INT_MAX)
    throw Error("gemm: dimension " + std::to_string(x) + " exceeds the BLAS int range");
  return static_cast<int>(x);
}

}  // namespace

void abt(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b,
         int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, to_int(m), to_int(n), to_int(k), alpha, a,
              to_int(lda), b, to_int(ldb), beta, c, to_int(ldc));
}

void abt(int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda,
         const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, to_int(m), to_int(n), to_int(k), alpha, a,
              to_int(lda), b, to_int(ldb), beta, c, to_int(ldc));
}

void ab(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b,
        int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, to_int(m), to_int(n), to_int(k), alpha, a,
              to_int(lda), b, to_int(ldb), beta, c, to_int(ldc));
}

void atb(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b,
         int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, to_int(m), to_int(n), to_int(k), alpha, a,
              to_int(lda), b, to_int(ldb), beta, c, to_int(ldc));
}

void set_blas_threads(int n) { openblas_set_num_threads(n > 0 ? n : 1); }

}  // namespace divkit::gemm
