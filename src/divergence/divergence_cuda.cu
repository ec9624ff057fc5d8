// The CUDA row kernels of the token-level divergences: the same definitions as the CPU
// (divergence_defs.h, through divergences_scalar.h), one thread block per row.
//
// Per row (block of kThreads threads, each owning the columns j = tid, tid + kThreads, ...):
//   sweep 1  read student and teacher logits (any float dtype) once, with 16-byte loads: per-
//            thread online max and sum of exp((x - max) / T) in fp64, NaN/+inf detection;
//            combined across the block in a fixed order -> log-sum-exp of both rows; where both
//            rows fit (use_row_cache), they are kept in shared memory as fp32 and the later
//            sweeps read them from there;
//   sweep 2  the divergence terms and the gradient factors u, v summed (fp64, fixed order);
//   sweep 3  the gradients (u - q sum u) / T * scale, recomputing u and v from the logits
//            (forward KL and cross-entropy need no sum u: sweeps 2 and 3 are one).
// Renyi (a log of a sum) sums its terms, then exp(log w - max log w), then writes gradients.
// No float atomics: every sum has one order, so two runs give the same bits. Bad rows are
// reported through integer atomicMin on device flags (order-free), read after the kernels.
// The reduction over rows (labels, weights, divisor, the loss) is core/cuda_common's RowReduce:
// one block, in a fixed order, in fp64.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <string>

#include "core/check.h"
#include "core/cuda_common.cuh"
#include "core/cuda_device.h"
#include "divergence/divergence_cuda.h"
#include "divergence/divergences_scalar.h"
#include "divergence/row_job.h"

namespace divkit::detail {
namespace {

constexpr const char* kFn = "divergence";
// Loads, stores, block reductions, the block size, the reduction over rows (RowReduce: labels,
// weights, the divisor, the flags, the loss), error checks and the device guard:
// core/cuda_common.cuh, shared with the sparse, label-row and Sinkhorn kernels.
using cuda_common::block_reduce;
using cuda_common::check_cuda;
using cuda_common::DeviceGuard;
using cuda_common::kNone;
using cuda_common::kThreads;
using cuda_common::kWarps;
using cuda_common::load;
using cuda_common::MaxOp;
using cuda_common::OrOp;
using cuda_common::RowReduce;
using cuda_common::store;
using cuda_common::SumOp;
// RowReduce::bad[]: first row with NaN/+inf student logits, student row without mass, the same
// for the teacher, first index of a non-finite weight.
enum BadSlot : int {
  kStudentNonFinite = 0,
  kStudentNoMass = 1,
  kTeacherNonFinite = 2,
  kTeacherNoMass = 3,
  kWeights = 4,
  kBadSlots = 5
};
// The dynamic shared memory a kernel may use without cudaFuncSetAttribute.
constexpr size_t kDefaultDynamicShared = 48 * 1024;

using scalar::Entry;
namespace hn = scalar_ops;

struct DevIn {
  const void* data = nullptr;
  DType dtype = DType::f32;
  int64_t row_stride = 0;
};
struct DevOut {
  void* data = nullptr;
  DType dtype = DType::f32;
  int64_t row_stride = 0;
};

struct Params {
  DevIn s, t;
  DevOut gs, gt;  // data == nullptr: not asked
  int64_t n = 0, v = 0;
  float temperature = 1.0f, inv_t = 1.0f;
  // Labels, weights, T^2, reduction, num_items_in_batch, the divisor, the row values, the flags
  // (kBadSlots of them) and check_finite (false: the host reads no flag; a bad call gets a NaN
  // loss).
  RowReduce r;
  bool check_only = false;
  bool skip_if_bad = false;  // in place: write nothing once a bad row was found
  // The student and teacher rows are kept in dynamic shared memory (as fp32, 8 V bytes) by
  // sweep 1, and the later sweeps read them from there instead of global memory.
  bool cache = false;
};

struct Shared {
  double d[kWarps];
  float f[kWarps];
  int i[kWarps];
};

struct RowSoftmax {
  float max;
  double log_sum;
  bool non_finite;
};

// 16-byte loads: the elements of one uint4 of dtype dt (4 fp32, 8 bf16/fp16, 2 fp64).
__device__ inline int elems_per_16(DType dt) {
  return dt == DType::f32 ? 4 : dt == DType::f64 ? 2 : 8;
}
__device__ inline int elem_bytes(DType dt) { return 16 / elems_per_16(dt); }

template <class Visit>
__device__ inline void visit_vec(const uint4& w, DType dt, int64_t j0, Visit visit) {
  switch (dt) {
    case DType::f32: {
      const float* f = reinterpret_cast<const float*>(&w);
      for (int e = 0; e < 4; ++e) visit(j0 + e, f[e]);
      break;
    }
    case DType::f64: {
      const double* f = reinterpret_cast<const double*>(&w);
      for (int e = 0; e < 2; ++e) visit(j0 + e, static_cast<float>(f[e]));
      break;
    }
    case DType::bf16: {
      const __nv_bfloat16* f = reinterpret_cast<const __nv_bfloat16*>(&w);
      for (int e = 0; e < 8; ++e) visit(j0 + e, __bfloat162float(f[e]));
      break;
    }
    default: {
      const __half* f = reinterpret_cast<const __half*>(&w);
      for (int e = 0; e < 8; ++e) visit(j0 + e, __half2float(f[e]));
      break;
    }
  }
}

// Every element of a row, read with 16-byte loads: the elements before the first 16-byte
// boundary and after the last one element by element, the rest one uint4 per thread and step.
// Which thread visits which element depends on the row's address modulo 16 only, so the same
// buffers give the same bits; each thread visits its elements in increasing order.
template <class Visit>
__device__ inline void for_row_vectorized(const DevIn& in, int64_t row, int64_t v, Visit visit) {
  const int es = elem_bytes(in.dtype), per = elems_per_16(in.dtype);
  const char* base = static_cast<const char*>(in.data) + row * in.row_stride * es;
  const auto addr = reinterpret_cast<uintptr_t>(base);
  int64_t head = addr % es != 0 ? v : static_cast<int64_t>((16 - addr % 16) % 16) / es;
  if (head > v) head = v;
  for (int64_t j = threadIdx.x; j < head; j += kThreads) visit(j, load(base, in.dtype, j));
  const int64_t nvec = (v - head) / per;
  const uint4* vec = reinterpret_cast<const uint4*>(base + head * es);
  for (int64_t c = threadIdx.x; c < nvec; c += kThreads)
    visit_vec(vec[c], in.dtype, head + c * per, visit);
  for (int64_t j = head + nvec * per + threadIdx.x; j < v; j += kThreads)
    visit(j, load(base, in.dtype, j));
}

// Sweep 1 for one input row: online max and sum of exp((x - max) / T), combined over the block;
// the row is copied to `cache` (fp32) where given.
__device__ RowSoftmax softmax_stats(const DevIn& in, int64_t row, int64_t v, float inv_t,
                                    Shared& sh, float* cache) {
  float m = -kInfinityF;
  double sum = 0.0;
  int bad = 0;
  for_row_vectorized(in, row, v, [&](int64_t j, float x) {
    if (cache != nullptr) cache[j] = x;
    if (x != x || x == kInfinityF) {
      bad = 1;
    } else if (x > m) {
      sum = (m == -kInfinityF ? 0.0 : sum * exp((static_cast<double>(m) - x) * inv_t)) + 1.0;
      m = x;
    } else if (x != -kInfinityF) {
      sum += static_cast<double>(expf((x - m) * inv_t));
    }
  });
  const int any_bad = block_reduce(bad, OrOp{}, sh.i);
  const float row_max = block_reduce(m, MaxOp{}, sh.f);
  const double mine =
      (m == -kInfinityF) ? 0.0 : sum * exp((static_cast<double>(m) - row_max) * inv_t);
  const double total = block_reduce(mine, SumOp{}, sh.d);
  return {row_max, log(total), any_bad != 0};
}

struct Norm {
  float max_s, max_t, log_sum_s, log_sum_t, inv_zs, inv_zt, inv_t, log_sum_diff;
  const float* cache;  // [2 V]: the student row, then the teacher row; nullptr: global memory
};

// p, q, their logs and log(p / q) at column j, as divergence_kernels.cc's LoadEntry.
// es and et receive the unnormalized exp((x - max) / T).
__device__ inline Entry<float> entry_at(const Params& p, const Norm& n, int64_t row, int64_t j,
                                        float* es = nullptr, float* et = nullptr) {
  const float xs =
      n.cache != nullptr ? n.cache[j] : load(p.s.data, p.s.dtype, row * p.s.row_stride + j);
  const float xt =
      n.cache != nullptr ? n.cache[p.v + j] : load(p.t.data, p.t.dtype, row * p.t.row_stride + j);
  const float cs = xs - n.max_s, ct = xt - n.max_t;
  Entry<float> e;
  const float exp_s = expf(cs * n.inv_t), exp_t = expf(ct * n.inv_t);
  if (es != nullptr) *es = exp_s;
  if (et != nullptr) *et = exp_t;
  e.q = exp_s * n.inv_zs;
  e.p = exp_t * n.inv_zt;
  e.lq = fmaf(cs, n.inv_t, -n.log_sum_s);
  e.lp = fmaf(ct, n.inv_t, -n.log_sum_t);
  e.lr = fmaf(ct - cs, n.inv_t, -n.log_sum_diff);
  return e;
}

__device__ inline void zero_row(const DevOut& out, int64_t row, int64_t v) {
  if (out.data == nullptr) return;
  for (int64_t j = threadIdx.x; j < v; j += kThreads)
    store(out.data, out.dtype, row * out.row_stride + j, 0.0f);
}

// log w of the Renyi sum, with PowerMean's masked-q conventions (divergence_kernels.cc).
__device__ inline float renyi_log_w(const scalar::Renyi& div, const Entry<float>& e) {
  const bool masked_q = e.lq == -kInfinityF;
  if (masked_q) return (div.alpha > 1.0f && e.p > 0.0f) ? kInfinityF : -kInfinityF;
  return fmaf(div.alpha, e.lr, e.lq);
}

template <class Div>
__device__ double sum_row(const Div& div, const Params& p, const Norm& n, int64_t row, double scale,
                          Shared& sh) {
  const hn::Lane d;
  const bool want_t = p.gt.data != nullptr;
  double g = 0.0, su = 0.0, sv = 0.0;
  for (int64_t j = threadIdx.x; j < p.v; j += kThreads) {
    const Entry<float> e = entry_at(p, n, row, j);
    float u;
    g += div.term(d, e, u);
    if constexpr (!Div::kStudentFactorIsMinusP) su += u;
    if (want_t) sv += div.teacher(d, e);
  }
  const double value = block_reduce(g, SumOp{}, sh.d);
  const double sum_u = Div::kStudentFactorIsMinusP ? -1.0 : block_reduce(su, SumOp{}, sh.d);
  const double sum_v = want_t ? block_reduce(sv, SumOp{}, sh.d) : 0.0;
  constexpr double kMax = 3.4028234663852886e38;  // FLT_MAX
  if (!(fabs(value) <= kMax) || (p.gs.data == nullptr && !want_t)) return value;
  if (!(fabs(sum_u) <= kMax) || !(fabs(sum_v) <= kMax)) return nan("");
  const float k = static_cast<float>(scale);
  const float qsum = n.inv_zs * static_cast<float>(sum_u);
  const float psum = n.inv_zt * static_cast<float>(sum_v);
  for (int64_t j = threadIdx.x; j < p.v; j += kThreads) {
    float es, et;
    const Entry<float> e = entry_at(p, n, row, j, &es, &et);
    float gs = 0.0f, gt = 0.0f;
    if (p.gs.data != nullptr) {
      if constexpr (Div::kStudentFactorIsMinusP) {
        gs = fmaf(es, k * n.inv_zs, -(et * (k * n.inv_zt)));
      } else {
        float u;
        (void)div.term(d, e, u);
        gs = k * fmaf(-es, qsum, u);
      }
    }
    if (want_t) gt = k * fmaf(-et, psum, div.teacher(d, e));
    // Both gradients are computed before either is stored: in place, the logits at j are read
    // first.
    if (p.gs.data != nullptr) store(p.gs.data, p.gs.dtype, row * p.gs.row_stride + j, gs);
    if (want_t) store(p.gt.data, p.gt.dtype, row * p.gt.row_stride + j, gt);
  }
  return value;
}

__device__ double renyi_row(const scalar::Renyi& div, const Params& p, const Norm& n, int64_t row,
                            double scale, Shared& sh) {
  const hn::Lane d;
  double s1 = 0.0;
  float amax = -kInfinityF;
  for (int64_t j = threadIdx.x; j < p.v; j += kThreads) {
    const Entry<float> e = entry_at(p, n, row, j);
    s1 += div.term(d, e);
    amax = fmaxf(amax, renyi_log_w(div, e));
  }
  const double sum_s1 = block_reduce(s1, SumOp{}, sh.d);
  const float row_amax = block_reduce(amax, MaxOp{}, sh.f);
  if (!(row_amax < kInfinityF) || row_amax == -kInfinityF) return kInfinityF;
  double w = 0.0;
  for (int64_t j = threadIdx.x; j < p.v; j += kThreads)
    w += expf(renyi_log_w(div, entry_at(p, n, row, j)) - row_amax);
  const double sum_w = block_reduce(w, SumOp{}, sh.d);
  const bool near_zero = fabs(sum_s1) < 0.5;
  const double log_rel = log(sum_w);
  const double log_sum_w = near_zero ? log1p(sum_s1) : row_amax + log_rel;
  const double value = log_sum_w / (static_cast<double>(div.alpha) - 1.0);
  const bool want_t = p.gt.data != nullptr;
  if (!(fabs(value) <= 3.4028234663852886e38) || (p.gs.data == nullptr && !want_t)) return value;
  const float vl = static_cast<float>(log_sum_w), vrel = static_cast<float>(log_rel);
  auto w_hat_minus = [&](const Entry<float>& e, float base, float c) {
    const float softmax = scalar::ExpOrInf(d, renyi_log_w(div, e) - row_amax - vrel) - base;
    if (!near_zero) return softmax;
    const float x = fmaf(c, e.lr, -vl);
    const bool stable = base > 0.0f && fabsf(x) < 60.0f;
    return stable ? base * scalar::Expm1OrInf(d, x) : softmax;
  };
  const float ks = static_cast<float>(-scale);
  const float kt = static_cast<float>(scale * div.alpha / (div.alpha - 1.0));
  for (int64_t j = threadIdx.x; j < p.v; j += kThreads) {
    const Entry<float> e = entry_at(p, n, row, j);
    const float gs = p.gs.data != nullptr ? ks * w_hat_minus(e, e.q, div.alpha) : 0.0f;
    const float gt = want_t ? kt * w_hat_minus(e, e.p, div.alpha - 1.0f) : 0.0f;
    if (p.gs.data != nullptr) store(p.gs.data, p.gs.dtype, row * p.gs.row_stride + j, gs);
    if (want_t) store(p.gt.data, p.gt.dtype, row * p.gt.row_stride + j, gt);
  }
  return value;
}

template <class Div>
__global__ void __launch_bounds__(kThreads) rows_kernel(Div div, Params p) {
  __shared__ Shared sh;
  DIVKIT_DYNAMIC_SHARED(float, row_cache);
  float* cache = p.cache ? row_cache : nullptr;
  const int64_t row = blockIdx.x;
  if (row >= p.n) return;
  if (p.skip_if_bad && cuda_common::any_bad(p.r)) return;
  if (!cuda_common::row_active(p.r, row)) {
    if (!p.check_only) {
      if (threadIdx.x == 0) p.r.row_loss[row] = 0.0;
      zero_row(p.gs, row, p.v);
      zero_row(p.gt, row, p.v);
    }
    return;
  }
  const RowSoftmax ls = softmax_stats(p.s, row, p.v, p.inv_t, sh, cache);
  const RowSoftmax lt =
      softmax_stats(p.t, row, p.v, p.inv_t, sh, cache != nullptr ? cache + p.v : nullptr);
  bool skip = false;
  if (threadIdx.x == 0) {
    const auto bad_row = static_cast<unsigned long long>(row);
    if (ls.non_finite) atomicMin(&p.r.bad[kStudentNonFinite], bad_row);
    else if (ls.max == -kInfinityF) atomicMin(&p.r.bad[kStudentNoMass], bad_row);
    if (lt.non_finite) atomicMin(&p.r.bad[kTeacherNonFinite], bad_row);
    else if (lt.max == -kInfinityF) atomicMin(&p.r.bad[kTeacherNoMass], bad_row);
  }
  skip = ls.non_finite || lt.non_finite || ls.max == -kInfinityF || lt.max == -kInfinityF;
  if (skip || p.check_only) return;
  Norm n;
  n.max_s = ls.max;
  n.max_t = lt.max;
  n.log_sum_s = static_cast<float>(ls.log_sum);
  n.log_sum_t = static_cast<float>(lt.log_sum);
  n.inv_zs = static_cast<float>(exp(-ls.log_sum));
  n.inv_zt = static_cast<float>(exp(-lt.log_sum));
  n.inv_t = p.inv_t;
  n.log_sum_diff = static_cast<float>(lt.log_sum - ls.log_sum);
  n.cache = cache;  // written by this block's sweep 1; the block reductions synchronized since
  const double scale = p.r.t2 * (cuda_common::row_weight(p.r, row) / *p.r.divisor) / p.temperature;
  double value;
  if constexpr (std::is_same_v<Div, scalar::Renyi>) value = renyi_row(div, p, n, row, scale, sh);
  else value = sum_row(div, p, n, row, scale, sh);
  // As on the CPU: an infinite (or beyond-fp32) row value gives loss +inf and no gradient.
  if (isnan(value) || !(fabs(value) <= 3.4028234663852886e38)) {
    value = static_cast<double>(kInfinityF);
    __syncthreads();  // every thread's stores of the row are done before they are zeroed
    zero_row(p.gs, row, p.v);
    zero_row(p.gt, row, p.v);
  }
  if (threadIdx.x == 0) p.r.row_loss[row] = value;
}

template <class Div>
void launch_rows(const Div& div, const Params& p, cudaStream_t stream) {
  if (p.n == 0) return;
  const size_t smem = p.cache ? static_cast<size_t>(2 * p.v) * sizeof(float) : 0;
  if (smem > kDefaultDynamicShared)
    check_cuda(kFn,
               cudaFuncSetAttribute(rows_kernel<Div>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(smem)),
               "cudaFuncSetAttribute");
  DIVKIT_LAUNCH(rows_kernel<Div>, static_cast<unsigned>(p.n), kThreads, smem, stream)(div, p);
  check_cuda(kFn, cudaGetLastError(), "the row kernel launch");
}

// Whether the two rows (fp32, 8 V bytes) are kept in shared memory: when they fit in
// DIVKIT_CUDA_ROW_CACHE_BYTES (default 48 KiB, the dynamic shared memory a block gets without
// opting in, so that several blocks still share an SM; 0 turns the cache off) and in what the
// device allows a block. The environment variable is there for the GPU benchmark to compare.
bool use_row_cache(int64_t v, int device) {
  int64_t budget = static_cast<int64_t>(kDefaultDynamicShared);
  if (const char* env = std::getenv("DIVKIT_CUDA_ROW_CACHE_BYTES")) budget = std::atoll(env);
  const int64_t bytes = 2 * v * static_cast<int64_t>(sizeof(float));
  if (bytes == 0 || bytes > budget) return false;
  int optin = 0;
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) !=
      cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return bytes + static_cast<int64_t>(sizeof(Shared)) <= optin;
}

void launch_rows_of(const DivergenceSpec& spec, const Params& p, cudaStream_t stream) {
  using K = DivergenceKind;
  switch (spec.kind) {
    case K::forward_kl: return launch_rows(scalar::ForwardKL(spec), p, stream);
    case K::reverse_kl: return launch_rows(scalar::ReverseKL(spec), p, stream);
    case K::jsd: return launch_rows(scalar::GeneralizedJSD(spec), p, stream);
    case K::skew_forward_kl: return launch_rows(scalar::SkewForwardKL(spec), p, stream);
    case K::skew_reverse_kl: return launch_rows(scalar::SkewReverseKL(spec), p, stream);
    case K::tvd: return launch_rows(scalar::TotalVariation(spec), p, stream);
    case K::hellinger: return launch_rows(scalar::Hellinger(spec), p, stream);
    case K::jeffreys: return launch_rows(scalar::Jeffreys(spec), p, stream);
    case K::chi2: return launch_rows(scalar::ChiSquared(spec), p, stream);
    case K::alpha_divergence: return launch_rows(scalar::AlphaDivergence(spec), p, stream);
    case K::renyi: return launch_rows(scalar::Renyi(spec), p, stream);
    case K::cross_entropy: return launch_rows(scalar::CrossEntropy(spec), p, stream);
  }
}

// A gradient output may be its input's own buffer (in place) but must not partly overlap it.
bool gradient_output(const char* name, const TensorView& grad, const char* input_name,
                     const TensorView& input) {
  check::float_matrix(kFn, name, cuda::shape_only(grad), /*is_output=*/true);
  if (grad.shape[0] != input.shape[0] || grad.shape[1] != input.shape[1])
    check::fail(kFn, std::string(name) + " must have the shape of " + input_name + " " +
                         check::shape_string(input) + ", got " + check::shape_string(grad));
  if (!check::ranges_overlap(grad, input)) return false;
  if (grad.data == input.data && grad.dtype == input.dtype &&
      (grad.shape[0] <= 1 || grad.strides[0] == input.strides[0]))
    return true;
  check::fail(kFn, std::string(name) + " overlaps " + input_name +
                       " without being the same buffer (same data, dtype and strides)");
}

}  // namespace

void divergence_cuda(const TensorView& student, const TensorView& teacher,
                     const DivergenceSpec& spec, const DivergenceOptions& options,
                     const DivergenceOutputs& outputs, bool scratch_inputs) {
  validate_spec(spec);
  check_logit_pair(kFn, cuda::shape_only(student), cuda::shape_only(teacher));
  const int64_t n = student.shape[0], v = student.shape[1];
  Params p;
  // Checks labels, weights, the reduction and the loss output (shapes and dtypes) first.
  cuda_common::fill_row_reduce(kFn, n, options, outputs.loss, p.r);
  const DivergenceSpec s = resolve_divergence_limits(spec);
  p.s = {student.data, student.dtype, student.strides[0]};
  p.t = {teacher.data, teacher.dtype, teacher.strides[0]};
  p.n = n;
  p.v = v;
  bool in_place = false;
  if (outputs.grad_student.defined()) {
    in_place |= gradient_output("grad_student", outputs.grad_student, "student_logits", student);
    if (check::ranges_overlap(outputs.grad_student, teacher))
      check::fail(kFn, "grad_student overlaps teacher_logits");
    p.gs = {outputs.grad_student.data, outputs.grad_student.dtype, outputs.grad_student.strides[0]};
  }
  if (outputs.grad_teacher.defined()) {
    in_place |= gradient_output("grad_teacher", outputs.grad_teacher, "teacher_logits", teacher);
    if (check::ranges_overlap(outputs.grad_teacher, student))
      check::fail(kFn, "grad_teacher overlaps student_logits");
    if (outputs.grad_student.defined() &&
        check::ranges_overlap(outputs.grad_teacher, outputs.grad_student))
      check::fail(kFn, "grad_teacher overlaps grad_student");
    p.gt = {outputs.grad_teacher.data, outputs.grad_teacher.dtype, outputs.grad_teacher.strides[0]};
  }
  p.temperature = s.temperature;
  p.inv_t = 1.0f / s.temperature;
  p.r.t2 = s.scale_by_t_squared ? double(s.temperature) * s.temperature : 1.0;
  p.r.bad_slots = kBadSlots;
  p.r.weights_bad_slot = kWeights;
  p.r.check_finite = options.check_finite;

  DeviceGuard guard(kFn, student.device_index);
  p.cache = use_row_cache(v, student.device_index);
  const auto stream = reinterpret_cast<cudaStream_t>(options.stream);
  // Workspace: the divisor, the bad-row flags, the row values.
  const size_t bytes = sizeof(double) + kBadSlots * sizeof(unsigned long long) +
                       static_cast<size_t>(n) * sizeof(double);
  void* ws = nullptr;
  check_cuda(kFn, cudaMallocAsync(&ws, bytes, stream), "cudaMallocAsync");
  p.r.divisor = static_cast<double*>(ws);
  p.r.bad = reinterpret_cast<unsigned long long*>(p.r.divisor + 1);
  p.r.row_loss = reinterpret_cast<double*>(p.r.bad + kBadSlots);
  unsigned long long bad[kBadSlots];
  try {
    check_cuda(kFn, cudaMemsetAsync(p.r.bad, 0xFF, kBadSlots * sizeof(unsigned long long), stream),
               "cudaMemsetAsync");
    check_cuda(kFn,
               cudaMemsetAsync(p.r.row_loss, 0, static_cast<size_t>(n) * sizeof(double), stream),
               "cudaMemsetAsync");
    cuda_common::launch_prep(kFn, p.r, stream);
    auto launch = [&](bool check_only, bool skip_if_bad) {
      Params q = p;
      q.check_only = check_only;
      q.skip_if_bad = skip_if_bad;
      launch_rows_of(s, q, stream);
    };
    // check_finite off: nothing read back, nothing waited for (CUDA graph capture).
    cuda_common::run_rows(kFn, p.r, outputs.loss, in_place && !scratch_inputs, launch, ws, bad,
                          stream);
  } catch (...) {
    if (ws != nullptr) cudaFreeAsync(ws, stream);
    throw;
  }
  if (!options.check_finite) return;
  if (bad[kWeights] != kNone) cuda_common::fail_bad_weight(kFn, p.r, bad[kWeights]);
  auto report = [&](const char* name, unsigned long long nan_row, unsigned long long mass_row) {
    BadRow b;
    if (nan_row != kNone) b.row = static_cast<int64_t>(nan_row);
    else if (mass_row != kNone) b = {static_cast<int64_t>(mass_row), true};
    throw_bad_row(kFn, name, b);
  };
  report("student_logits", bad[kStudentNonFinite], bad[kStudentNoMass]);
  report("teacher_logits", bad[kTeacherNonFinite], bad[kTeacherNoMass]);
}

}  // namespace divkit::detail
