// The work description handed from sparse.cc (argument checks, reductions) to the SIMD row
// kernels of sparse_kernels.cc. Everything here is already validated.
//
// For the fused linear head: a chunk of student logits [rows x V] (any row stride, e.g. the
// chunk's GEMM output) is one job; point `student` at the chunk, `indices` / `logprobs` at the
// chunk's first row, `active` / `grad_scale` / `row_loss` at the chunk's slice, and
// `grad_student` at the chunk itself to get the gradient in place (each row is read before it
// is written). Validate the whole teacher once with check_sparse_teacher() before the first
// chunk, so that no error can occur after gradients have been written.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <utility>

#include "divergence/row_job.h"
#include "divkit/sparse.h"

namespace divkit::detail {

// A strided [n, k] input (indices or logprobs); strides in elements.
struct SparseInput {
  const void* data = nullptr;
  DType dtype = DType::f32;
  int64_t row_stride = 0, col_stride = 1;
  int64_t offset(int64_t row, int64_t col) const { return row * row_stride + col * col_stride; }
};

struct SparseJob {
  RowInput student{};  // [n, v] logits
  int64_t n = 0, v = 0, k = 0;
  DivergenceSpec spec;  // validated, limits resolved (resolve_divergence_limits)
  SparseTail tail = SparseTail::bucket;
  // The teacher: either given (indices + logprobs, sparse_divergence) or full logits whose
  // top-k is selected per row (teacher.data != nullptr, topk_divergence; tail = renormalize).
  SparseInput indices, logprobs;
  RowInput teacher{nullptr, DType::f32, 0};
  const uint8_t* active = nullptr;     // [n]: 0 for ignored rows (null: all active)
  const double* grad_scale = nullptr;  // [n]: d(reduced loss)/d(row loss)
  double* row_loss = nullptr;          // [n] out (0 for ignored rows, +inf for infinite ones)
  RowOutput grad_student;              // data null: not requested
  bool check_only = false;             // only look for bad student / teacher rows
  int num_threads = 1;
  // Out: first row whose student logits hold NaN/+inf, or give no distribution (all -inf, or
  // -inf at every selected index in renormalize mode); -1 if none. Likewise the teacher logits
  // of topk_divergence.
  BadRow bad_student, bad_teacher;
};

// Runs the rows on the best SIMD target (Highway dynamic dispatch).
void run_sparse_rows(SparseJob& job);

// Checks the given teacher of the active rows (index range, duplicates, logprob values and, in
// bucket mode, their total mass); throws Error naming `fn`, the argument and the first bad row.
void check_sparse_teacher(const char* fn, const SparseInput& indices, const SparseInput& logprobs,
                          int64_t n, int64_t v, int64_t k, SparseTail tail, const uint8_t* active);

// grad_student: [N, V] float output, the student buffer itself (in place) or disjoint from it
// and from the other inputs; throws Error naming `fn` otherwise. Returns true when in place. The
// CUDA entry points pass cuda::shape_only(grad) (the checks read shapes, strides and addresses).
bool check_sparse_grad_output(
    const char* fn, const TensorView& grad, const TensorView& student,
    std::initializer_list<std::pair<const char*, const TensorView*>> others);

}  // namespace divkit::detail
