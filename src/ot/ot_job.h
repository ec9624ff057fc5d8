// Internal interface between the OT drivers (sinkhorn.cc, sample_divergences.cc) and the SIMD
// kernels (ot_kernels.cc).
#pragma once

#include <cstdint>

namespace divkit::detail {

// One side of a problem as the row kernels see it: rows are this side's points, columns the
// other side's (the g update uses the same kernels with the sides swapped). Buffers are in the
// working precision T (float or double), columns padded to ncpad (a multiple of kOtPad) with
// zero coordinates and a very negative h, so that padded columns contribute exp(-huge) = 0.
inline constexpr int64_t kOtPad = 64;

// The other side's points are stored transposed in panels of kOtPad columns, [ncpad / kOtPad][d]
// [kOtPad]: a register tile (at most kOtPad columns) then reads its d coordinates from one
// contiguous d x kOtPad block (16 KiB for float32 at d = 64) instead of d rows ncpad apart,
// which the hardware prefetcher follows and L1 holds.
inline int64_t PanelIndex(int64_t d, int64_t k, int64_t j) {
  return (j / kOtPad) * d * kOtPad + k * kOtPad + j % kOtPad;
}

enum class OtCostMode : int { direct = 0, expanded = 1, matrix = 2 };

struct OtSide {
  int64_t nr = 0, nc = 0, ncpad = 0, d = 0;
  int p = 2;
  OtCostMode mode = OtCostMode::direct;
  bool f64 = false;
  const void* X = nullptr;   // [nr][d] row-major (points)
  const void* YT = nullptr;  // points, transposed in panels: see PanelIndex
  const void* xn = nullptr;  // [nr] |x_i|^2 (expanded mode)
  const void* yn = nullptr;  // [ncpad] |y_j|^2 (expanded mode)
  const void* C = nullptr;   // [nr][ncpad] (matrix mode: a given or a cached cost; points may
                             // still be set for the gradients)
};

// Final pass over the plan rows: e_ij = exp(hr_i + h_j - C_ij / eps) = P_ij / a_i.
struct OtPlanOut {
  const double* hr = nullptr;    // [nr] f_i / eps
  const double* arow = nullptr;  // [nr] a_i (plan scale)
  double* s = nullptr;           // [nr] sum_j e_ij
  double* c = nullptr;           // [nr] sum_j e_ij C_ij
  double* wsum = nullptr;        // [nr] sum_j w_ij (optional; w = e for p = 2, e / C for p = 1)
  double* bary = nullptr;        // [nr][d] sum_j w_ij y_j (optional, with wsum)
  void* plan = nullptr;          // optional: P_ij = a_i e_ij, rows of nc entries
  bool plan_f64 = true;
  int64_t plan_stride = 0;  // elements between plan rows
};

// out[i] = LSE_j (h_j - C_ij * inv_eps), h in T, padded.
void ot_lse_rows(const OtSide& side, const void* h, double inv_eps, double* out);
// C[i * ncpad + j] = the cost of row i and column j (points modes), padded columns included.
void ot_cost_rows(const OtSide& side, void* C);
void ot_plan_rows(const OtSide& side, const void* h, double inv_eps, const OtPlanOut& out);
// Kernel-domain iterations on a stored cost (matrix mode): K[i * ncpad + j] = exp(hr_i + h_j -
// C_ij * inv_eps) (padded columns: 0), and out[i] = sum_j K_ij w_j (w in T, padded with 0).
void ot_kernel_rows(const OtSide& side, const double* hr, const void* h, double inv_eps, void* K);
void ot_matvec_rows(const OtSide& side, const void* K, const void* w, double* out);

}  // namespace divkit::detail
