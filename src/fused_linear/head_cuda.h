// The device side of the fused heads' CUDA chunk loop (label_loop_cuda.cu): one chunk's logits
// z = hidden[chunk] W^T + b through the device GEMM (core/gemm_cuda.h) into an fp32 buffer, and
// the head's gradients from each chunk's logit gradient G written over that buffer:
//   grad_hidden[chunk] = G W,   grad_W += G^T hidden[chunk],   grad_b += column sums of G.
// Operands: hidden and weight share one dtype (float32, bfloat16 or float16), unit stride along
// H; the logits and every accumulation are float32 (grad_b float64, summed over the rows in
// order). For a bfloat16 / float16 head G is rounded to that dtype for the two gradient GEMMs (the
// tensor cores' operands), as Liger-Kernel and a bf16 autograd head do; a float16 G is first
// scaled by a power of two that puts its largest entry near 2^10 (a mean over many tokens gives
// entries ~1 / (N V), which float16 would flush to zero), read back once per chunk.
// Nothing on the device is read by the host otherwise; every kernel and GEMM is on `stream`, and
// the workspace is one cudaMallocAsync / cudaFreeAsync pair on it. Internal to src/fused_linear.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "divkit/fused_linear.h"

struct CUstream_st;

namespace divkit::fused_cuda {

// The checks of a head (and its gradient outputs) on CUDA: shapes, dtypes and layouts only
// (the host reads nothing of the device). A float64 head, hidden and weight of different dtypes,
// or a non-unit stride along H is an Error naming the argument (`prefix` + "hidden", ...).
void check_head(const char* fn, const LinearHead& head, const LinearHeadGrads& grads,
                const std::string& prefix = "");

// One stream-ordered device allocation: cudaMallocAsync here, cudaFreeAsync on the same stream
// at scope exit (the kernels enqueued before it finish first).
class DeviceBuffer {
 public:
  DeviceBuffer(const char* fn, int64_t bytes, CUstream_st* stream);
  ~DeviceBuffer();
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  char* get() const { return p_; }

 private:
  char* p_ = nullptr;
  CUstream_st* stream_;
};

// Views of the loops' device scratch, marked as on CUDA device `device`: rows [r0, r0 + rows)
// of an fp64 [n] vector (p == nullptr: an undefined view), and an fp32 [rows, v] chunk.
TensorView device_vector(double* p, int64_t r0, int64_t rows, int device);
TensorView device_matrix(float* p, int64_t rows, int64_t v, int device);

// The CPU heads' error for labels[i] out of [0, v) (the label copied back from the device).
[[noreturn]] void fail_bad_label(const char* fn, const TensorView& labels, int64_t i, int64_t v,
                                 int64_t ignore_index);

class DeviceHead {
 public:
  // chunk: the most rows per chunk. The workspace is allocated on `stream` here.
  DeviceHead(const char* fn, const LinearHead& head, const LinearHeadGrads& grads, int64_t chunk,
             CUstream_st* stream);
  DeviceHead(const DeviceHead&) = delete;
  DeviceHead& operator=(const DeviceHead&) = delete;

  int64_t v() const { return v_; }
  bool wants_grads() const {
    return grads_.hidden.defined() || grads_.weight.defined() || grads_.bias.defined();
  }
  // The logits of rows [r0, r0 + rows) into the chunk buffer [rows, V] (ld V), which is returned.
  float* logits(int64_t r0, int64_t rows);
  // After the row step has written dL/dz over the chunk buffer: the gradients of those rows.
  void add_grad_chunk(int64_t r0, int64_t rows);
  // Writes grad_weight and grad_bias (zeros when no chunk was added).
  void finish();

 private:
  const char* fn_;
  LinearHead head_;
  LinearHeadGrads grads_;
  CUstream_st* stream_;
  int64_t n_ = 0, v_ = 0, h_ = 0, chunk_ = 0;
  DType dt_ = DType::f32;             // the GEMM operands' dtype (the weight's)
  std::unique_ptr<DeviceBuffer> ws_;  // one allocation, carved below
  float* z_ = nullptr;                // [chunk, V] logits, then G
  void* g_low_ = nullptr;             // [chunk, V] G rounded to dt_ (bf16 / fp16 heads)
  float* dh_ = nullptr;               // [chunk, H] fp32 grad_hidden rows (unless written directly)
  float* dw_ = nullptr;  // [V, H] fp32 grad_weight accumulator (unless written directly)
  int64_t ldw_ = 0;
  double* db_ = nullptr;     // [V] grad_bias accumulator
  float* absmax_ = nullptr;  // [1] the chunk's largest |G| (float16 heads)
  bool dw_direct_ = false, dh_direct_ = false, first_ = true;
};

}  // namespace divkit::fused_cuda
