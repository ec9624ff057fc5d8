// The CUDA row kernels of the sparse and truncated teachers (sparse_divergence, topk_divergence):
// the steps of sparse_kernels.cc, one thread block per row, with the per-bucket math and the
// gradient entries of sparse_scalar.h (the divergence definitions of divergence_defs.h in scalar
// form), so the CPU tests cover what is computed per bucket.
//
// Per row (block of kThreads threads; blocks walk the rows with a grid stride, each block with
// its own slot of the workspace for the row's k buckets and a bitmap of the teacher's indices):
//   1. the student row: max and NaN/+inf check (block reductions in a fixed order);
//   2. the teacher's k entries: given (indices, logprobs; checked beforehand by check_kernel), or
//      the top-k of the teacher logits by a radix select on order-preserving keys (four 8-bit
//      histogram passes with integer atomics in shared memory, then one pass that collects the
//      entries above the threshold and the lowest-index ties in index order: the selection is
//      the CPU's, larger logit first, then lower index, and comes out sorted by index);
//   3. bucket: Z_tail summed directly over the entries outside the bitmap; renormalize: the k
//      gathered logits only;
//   4. the buckets and the divergence over them, one thread per bucket, sums in a fixed order;
//   5. the gradient: the tail entries (or zeros), then the k teacher entries.
// Every sum has one order, so two runs give the same bits; bad rows are reported through integer
// atomicMin on device flags (order-free), read after the kernels unless check_finite is off.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "core/check.h"
#include "core/cuda_common.cuh"
#include "core/cuda_device.h"
#include "divergence/row_job.h"
#include "sparse/radix_select.cuh"
#include "sparse/sparse_cuda.h"
#include "sparse/sparse_job.h"
#include "sparse/sparse_scalar.h"

namespace divkit::detail {
namespace {

using namespace cuda_common;  // NOLINT(build/namespaces): the shared device helpers
namespace ss = sparse_scalar;

constexpr const char* kSparseFn = "sparse_divergence";
constexpr const char* kTopkFn = "topk_divergence";
constexpr float kInfF = kInfinityF;
constexpr double kInf = ss::kInfD;

// bad[]: first row with NaN/+inf student logits, student row without mass (all -inf, or -inf at
// every teacher index when renormalized), the same two for the teacher logits (topk), first row
// whose given teacher is invalid (indices, logprobs), first index of a non-finite weight.
enum BadSlot : int {
  kStudentNonFinite,
  kStudentNoMass,
  kTeacherNonFinite,
  kTeacherNoMass,
  kTeacherGiven,
  kWeights,
  kBadSlots
};

// The most blocks (row slots of the workspace) a call uses, and the workspace it may take:
// about twice what an H100 keeps resident (8 blocks of 256 threads on each of 132 SMs), so
// the grid-stride loop balances rows of unequal cost, while the slots (mostly the V / 8 bytes
// of the bitmap: 16 KB at V = 128256) stay near 32 MB.
constexpr int64_t kMaxBlocks = 2048;
constexpr int64_t kWorkspaceBudget = int64_t{256} << 20;

struct In {
  const void* data = nullptr;
  DType dtype = DType::f32;
  int64_t row_stride = 0, col_stride = 1;
};
struct Out {
  void* data = nullptr;
  DType dtype = DType::f32;
  int64_t row_stride = 0;
};

struct Params {
  In s, t;     // student logits; teacher logits (topk only)
  In idx, lp;  // given teacher [n, k] (sparse only)
  Out gs;      // data == nullptr: not asked
  int64_t n = 0, v = 0, k = 0;
  bool topk = false;
  bool has_tail = false;      // bucket mode with k < V
  bool renormalized = false;  // tail renormalize, topk, or k = V
  bool bucket = false;        // tail == bucket (the mass check of the given teacher)
  double temperature = 1.0;
  float inv_t = 1.0f;
  RowReduce r;
  // Workspace, one slot per block: [slots][k] indices, [slots][k + 1] fp64 buckets, [slots][k]
  // gathered student logits, [slots][words] bitmap of the teacher indices (kept all-zero between
  // rows).
  int64_t* w_idx = nullptr;
  double *w_lp = nullptr, *w_lq = nullptr, *w_q = nullptr, *w_u = nullptr;
  float* w_xk = nullptr;
  uint32_t* w_bits = nullptr;
  int64_t words = 0;
  bool check_only = false;
  bool skip_if_bad = false;  // in place: write nothing once a bad row was found
};

struct Shared {
  double d[kWarps];
  float f[kWarps];
  int i[kWarps];
  radix_select::RadixShared radix;
};

__device__ inline void flag(const Params& p, int slot, int64_t row) {
  if (threadIdx.x == 0) atomicMin(&p.r.bad[slot], static_cast<unsigned long long>(row));
}

__device__ inline float load_s(const Params& p, int64_t row, int64_t j) {
  return load(p.s.data, p.s.dtype, row * p.s.row_stride + j);
}
__device__ inline float load_t(const Params& p, int64_t row, int64_t j) {
  return load(p.t.data, p.t.dtype, row * p.t.row_stride + j);
}

__device__ inline void zero_row(const Out& out, int64_t row, int64_t v) {
  if (out.data == nullptr) return;
  for (int64_t j = threadIdx.x; j < v; j += kThreads)
    store(out.data, out.dtype, row * out.row_stride + j, 0.0f);
}

struct RowMax {
  float max;
  bool non_finite;
};

// Max of a logit row and whether it holds NaN/+inf, over the block.
template <class Load>
__device__ RowMax row_max(int64_t v, Load load_at, Shared& sh) {
  float m = -kInfF;
  int bad = 0;
  for (int64_t j = threadIdx.x; j < v; j += kThreads) {
    const float x = load_at(j);
    if (x != x || x == kInfF) bad = 1;
    else m = fmaxf(m, x);
  }
  const int any = block_reduce(bad, OrOp{}, sh.i);
  return {block_reduce(m, MaxOp{}, sh.f), any != 0};
}

// The k largest teacher logits of the row (larger first, then lower index), their indices
// written to out[0, k) in increasing order.
__device__ void select_topk(const Params& p, int64_t row, int64_t* out, Shared& sh) {
  const auto kth = radix_select::block_radix_kth<kThreads>(
      p.v, p.k, [&](int64_t j) { return ss::order_key(load_t(p, row, j)); }, sh.radix);
  const uint32_t prefix = kth.key;
  const int64_t remaining = kth.remaining;
  // prefix is the k-th largest key: take every key above it and the first `remaining` equal
  // ones in index order.
  int64_t taken_eq = 0, count = 0;
  for (int64_t base = 0; base < p.v; base += kThreads) {
    const int64_t j = base + threadIdx.x;
    const uint32_t key = j < p.v ? ss::order_key(load_t(p, row, j)) : 0u;
    const bool gt = j < p.v && key > prefix, eq = j < p.v && key == prefix;
    int eq_total = 0, sel_total = 0;
    const int eq_rank = block_exclusive_count(eq, eq_total, sh.i);
    const bool sel = gt || (eq && taken_eq + eq_rank < remaining);
    const int pos = block_exclusive_count(sel, sel_total, sh.i);
    if (sel) out[count + pos] = j;
    const int64_t left = remaining - taken_eq;
    taken_eq += eq_total < left ? eq_total : left;
    count += sel_total;
  }
  __syncthreads();
}

// The given teacher of every active row: index range, repeats, logprob values, the all -inf row
// (renormalized) and the total mass (bucket); the first bad row goes to bad[kTeacherGiven] (the
// host then finds the message with check_sparse_teacher on that row).
__global__ void __launch_bounds__(kThreads) check_kernel(Params p) {
  __shared__ Shared sh;
  uint32_t* bits = p.w_bits + blockIdx.x * p.words;
  for (int64_t row = blockIdx.x; row < p.n; row += gridDim.x) {
    if (!row_active(p.r, row)) continue;
    int bad = 0;
    double m = -kInf;
    for (int64_t b = threadIdx.x; b < p.k; b += kThreads) {
      const int64_t j =
          load_index(p.idx.data, p.idx.dtype, row * p.idx.row_stride + b * p.idx.col_stride);
      if (j < 0 || j >= p.v) {
        bad = 1;
      } else {
        const uint32_t bit = 1u << (j & 31);
        if (atomicOr(&bits[j >> 5], bit) & bit) bad = 1;
      }
      const double lp =
          load_f64(p.lp.data, p.lp.dtype, row * p.lp.row_stride + b * p.lp.col_stride);
      if (lp != lp || lp > ss::kLogprobTolerance) bad = 1;
      else m = fmax(m, lp);
    }
    const int any = block_reduce(bad, OrOp{}, sh.i);  // synchronizes: every bit is set
    for (int64_t b = threadIdx.x; b < p.k; b += kThreads) {
      const int64_t j =
          load_index(p.idx.data, p.idx.dtype, row * p.idx.row_stride + b * p.idx.col_stride);
      if (j >= 0 && j < p.v) bits[j >> 5] = 0u;
    }
    const double row_m = block_reduce(m, MaxOpD{}, sh.d);  // synchronizes: the bits are clear
    bool row_bad = any != 0;
    if (!row_bad && row_m == -kInf) {
      row_bad = p.renormalized;
    } else if (!row_bad && p.bucket) {
      double acc = 0.0;
      for (int64_t b = threadIdx.x; b < p.k; b += kThreads)
        acc += exp(load_f64(p.lp.data, p.lp.dtype, row * p.lp.row_stride + b * p.lp.col_stride) -
                   row_m);
      const double mass = exp(row_m) * block_reduce(acc, SumOp{}, sh.d);
      row_bad = mass > 1.0 + ss::kMassTolerance;
    }
    if (row_bad) flag(p, kTeacherGiven, row);
  }
}

// Step 4: the divergence over the nb buckets of the slot; fills w_u and sum_u. Returns the row
// value (+inf where infinite or beyond fp32, NaN when the gradient would overflow).
template <class Div>
__device__ double bucket_divergence(const Div& div, const Params& p, int64_t nb, int64_t slot,
                                    double& sum_u, Shared& sh) {
  double* lp = p.w_lp + slot;
  const double* lq = p.w_lq + slot;
  const double* q = p.w_q + slot;
  double* u = p.w_u + slot;
  if constexpr (std::is_same_v<Div, scalar::Renyi>) {
    const double alpha = div.alpha;
    double s1 = 0.0, amax = -kInf;
    for (int64_t b = threadIdx.x; b < nb; b += kThreads) {
      s1 += ss::renyi_bucket_term(div, lp[b], lq[b], q[b]);
      lp[b] = ss::renyi_log_w(alpha, lp[b], lq[b]);  // log w, in place (lp is not needed after)
      amax = fmax(amax, lp[b]);
    }
    const double sum_s1 = block_reduce(s1, SumOp{}, sh.d);
    const double row_amax = block_reduce(amax, MaxOpD{}, sh.d);
    if (!(row_amax < kInf) || row_amax == -kInf) return kInf;
    double w = 0.0;
    for (int64_t b = threadIdx.x; b < nb; b += kThreads) w += exp(lp[b] - row_amax);
    const double log_sum_w = ss::renyi_log_sum_w(sum_s1, row_amax, block_reduce(w, SumOp{}, sh.d));
    const double value = log_sum_w / (alpha - 1.0);
    if (!(fabs(value) <= ss::kFltMax)) return kInf;
    double su = 0.0;
    for (int64_t b = threadIdx.x; b < nb; b += kThreads) {
      u[b] = -exp(lp[b] - log_sum_w);
      su += u[b];
    }
    sum_u = block_reduce(su, SumOp{}, sh.d);
    return value;
  } else {
    double g = 0.0, su = 0.0;
    for (int64_t b = threadIdx.x; b < nb; b += kThreads) {
      float ub;
      g += ss::bucket_term(div, lp[b], lq[b], q[b], ub);
      u[b] = ub;
      su += ub;
    }
    const double value = block_reduce(g, SumOp{}, sh.d);
    sum_u = block_reduce(su, SumOp{}, sh.d);
    return ss::finish_sum(value, sum_u);
  }
}

// One active row. Returns whether the row's bits were set (the caller clears them).
template <class Div>
__device__ bool run_row(const Div& div, const Params& p, int64_t row, Shared& sh) {
  const int64_t k = p.k, v = p.v;
  const int64_t slot_k = blockIdx.x * k, slot_b = blockIdx.x * (k + 1);
  int64_t* idx = p.w_idx + slot_k;
  float* xk = p.w_xk + slot_k;
  double* lp = p.w_lp + slot_b;
  double* lq = p.w_lq + slot_b;
  double* q = p.w_q + slot_b;
  uint32_t* bits = p.w_bits + blockIdx.x * p.words;

  // 1. The student row.
  const RowMax ls = row_max(
      v, [&](int64_t j) { return load_s(p, row, j); }, sh);
  if (ls.non_finite) {
    flag(p, kStudentNonFinite, row);
    return false;
  }
  if (ls.max == -kInfF) {
    flag(p, kStudentNoMass, row);
    return false;
  }
  // 2. The teacher's k entries (log-probabilities up to a constant when renormalized).
  if (p.topk) {
    const RowMax lt = row_max(
        v, [&](int64_t j) { return load_t(p, row, j); }, sh);
    if (lt.non_finite) {
      flag(p, kTeacherNonFinite, row);
      return false;
    }
    if (lt.max == -kInfF) {
      flag(p, kTeacherNoMass, row);
      return false;
    }
    select_topk(p, row, idx, sh);
    for (int64_t b = threadIdx.x; b < k; b += kThreads)
      lp[b] = (static_cast<double>(load_t(p, row, idx[b])) - lt.max) / p.temperature;
  } else {
    for (int64_t b = threadIdx.x; b < k; b += kThreads) {
      idx[b] = load_index(p.idx.data, p.idx.dtype, row * p.idx.row_stride + b * p.idx.col_stride);
      lp[b] = load_f64(p.lp.data, p.lp.dtype, row * p.lp.row_stride + b * p.lp.col_stride);
    }
  }
  // Each bucket b is handled by the thread b % kThreads from here on (no sync needed between
  // its own steps); the block reductions synchronize before anything is shared.
  double mp = -kInf;
  for (int64_t b = threadIdx.x; b < k; b += kThreads) {
    xk[b] = load_s(p, row, idx[b]);
    mp = fmax(mp, lp[b]);
  }
  double lse_p = -kInf;  // log sum_b p_b
  {
    const double m = block_reduce(mp, MaxOpD{}, sh.d);
    double acc = 0.0;
    for (int64_t b = threadIdx.x; b < k; b += kThreads) acc += m > -kInf ? exp(lp[b] - m) : 0.0;
    const double total = block_reduce(acc, SumOp{}, sh.d);
    if (m > -kInf) lse_p = m + log(total);
  }
  // 3. The student's normalizer.
  double z_tail = 0.0;
  float ref;
  // The tail's exps are relative to tail_ref, exp((tail_ref - ref) / T) = exp(tail_shift) times
  // those relative to ref (tail_ref = ref unless they underflowed, below), as on the CPU.
  float tail_ref = ls.max;
  double tail_shift = 0.0;
  if (p.has_tail) {
    for (int64_t b = threadIdx.x; b < k; b += kThreads)
      atomicOr(&bits[idx[b] >> 5], 1u << (idx[b] & 31));
    __syncthreads();
    auto sum_tail = [&](float max) {
      double acc = 0.0;
      for (int64_t j = threadIdx.x; j < v; j += kThreads)
        if (!(bits[j >> 5] & (1u << (j & 31))))
          acc += ss::tail_exp(load_s(p, row, j), max, p.inv_t);
      return block_reduce(acc, SumOp{}, sh.d);
    };
    z_tail = sum_tail(ls.max);
    ref = ls.max;
    if (z_tail == 0.0) {
      // Every tail exp underflowed (the k entries hold all but e^-87 T of the student's mass):
      // summed again relative to the tail's own max, the tail bucket keeps its log-probability,
      // and a divergence that is finite (a teacher tail > 0) stays finite.
      float m = -kInfF;
      for (int64_t j = threadIdx.x; j < v; j += kThreads)
        if (!(bits[j >> 5] & (1u << (j & 31)))) m = fmaxf(m, load_s(p, row, j));
      const float tail_max = block_reduce(m, MaxOp{}, sh.f);
      if (tail_max > -kInfF) {
        z_tail = sum_tail(tail_max);
        tail_ref = tail_max;
        tail_shift = (static_cast<double>(tail_max) - ref) / p.temperature;
      }
    }
  } else {
    float m = -kInfF;
    for (int64_t b = threadIdx.x; b < k; b += kThreads) m = fmaxf(m, xk[b]);
    ref = block_reduce(m, MaxOp{}, sh.f);
    if (ref == -kInfF) {  // no student mass on the k
      flag(p, kStudentNoMass, row);
      return false;
    }
  }
  if (p.check_only) return p.has_tail;

  // 4. The buckets.
  double zt = 0.0;
  for (int64_t b = threadIdx.x; b < k; b += kThreads) {
    lq[b] = (static_cast<double>(xk[b]) - ref) / p.temperature;  // -inf for masked
    zt += exp(lq[b]);
  }
  const double z =
      block_reduce(zt, SumOp{}, sh.d) + (tail_shift == 0.0 ? z_tail : z_tail * exp(tail_shift));
  const double log_z = log(z);
  for (int64_t b = threadIdx.x; b < k; b += kThreads) {
    lq[b] -= log_z;
    q[b] = exp(lq[b]);
    lp[b] = ss::teacher_lp(lp[b], lse_p, p.has_tail);
  }
  int64_t nb = k;
  if (p.has_tail) {
    nb = k + 1;
    if (threadIdx.x == 0) {
      lq[k] = tail_shift + ss::student_tail_lq(z_tail, log_z);
      q[k] = tail_shift == 0.0 ? z_tail / z : exp(lq[k]);
      lp[k] = ss::teacher_tail_lp(lse_p);
    }
  }
  __syncthreads();
  double sum_u = 0.0;
  const double value = bucket_divergence(div, p, nb, slot_b, sum_u, sh);
  // As on the CPU: an infinite (or beyond-fp32) row value gives loss +inf and no gradient.
  if (!(fabs(value) <= ss::kFltMax)) {
    if (threadIdx.x == 0) p.r.row_loss[row] = kInf;
    zero_row(p.gs, row, v);
    return p.has_tail;
  }
  if (threadIdx.x == 0) p.r.row_loss[row] = value;
  if (p.gs.data == nullptr) return p.has_tail;

  // 5. The gradient: tail entries (zeros when renormalized), then the k teacher entries.
  const double scale = p.r.t2 * (row_weight(p.r, row) / *p.r.divisor) / p.temperature;
  const double* u = p.w_u + slot_b;
  const float c =
      p.has_tail ? ss::tail_factor(scale, u[k], z_tail, sum_u * exp(tail_shift), z) : 0.0f;
  for (int64_t j = threadIdx.x; j < v; j += kThreads) {
    float g = 0.0f;
    if (p.has_tail && !(bits[j >> 5] & (1u << (j & 31))))
      g = ss::tail_exp(load_s(p, row, j), tail_ref, p.inv_t) * c;
    store(p.gs.data, p.gs.dtype, row * p.gs.row_stride + j, g);
  }
  __syncthreads();  // the sweep's stores land before the k entries overwrite theirs
  for (int64_t b = threadIdx.x; b < k; b += kThreads)
    store(p.gs.data, p.gs.dtype, row * p.gs.row_stride + idx[b],
          ss::top_grad(scale, u[b], q[b], sum_u));
  return p.has_tail;
}

template <class Div>
__global__ void __launch_bounds__(kThreads) rows_kernel(Div div, Params p) {
  __shared__ Shared sh;
  if (p.r.bad[kTeacherGiven] != kNone || p.r.bad[kWeights] != kNone) return;
  if (p.skip_if_bad && any_bad(p.r)) return;
  for (int64_t row = blockIdx.x; row < p.n; row += gridDim.x) {
    if (!row_active(p.r, row)) {
      if (!p.check_only) {
        if (threadIdx.x == 0) p.r.row_loss[row] = 0.0;
        zero_row(p.gs, row, p.v);
      }
      continue;
    }
    if (run_row(div, p, row, sh)) {
      // Clear the bitmap for the next row (after every thread's last read of it).
      __syncthreads();
      const int64_t* idx = p.w_idx + blockIdx.x * p.k;
      uint32_t* bits = p.w_bits + blockIdx.x * p.words;
      for (int64_t b = threadIdx.x; b < p.k; b += kThreads) bits[idx[b] >> 5] = 0u;
    }
    __syncthreads();  // the slot is rewritten by the next row
  }
}

template <class Div>
void launch_rows(const char* fn, const Div& div, const Params& p, unsigned blocks,
                 cudaStream_t stream) {
  if (p.n == 0) return;
  DIVKIT_LAUNCH(rows_kernel<Div>, blocks, kThreads, 0, stream)(div, p);
  check_cuda(fn, cudaGetLastError(), "the row kernel launch");
}

void launch_rows_of(const char* fn, const DivergenceSpec& spec, const Params& p, unsigned blocks,
                    cudaStream_t stream) {
  using K = DivergenceKind;
  switch (spec.kind) {
    case K::forward_kl: return launch_rows(fn, scalar::ForwardKL(spec), p, blocks, stream);
    case K::reverse_kl: return launch_rows(fn, scalar::ReverseKL(spec), p, blocks, stream);
    case K::jsd: return launch_rows(fn, scalar::GeneralizedJSD(spec), p, blocks, stream);
    case K::skew_forward_kl: return launch_rows(fn, scalar::SkewForwardKL(spec), p, blocks, stream);
    case K::skew_reverse_kl: return launch_rows(fn, scalar::SkewReverseKL(spec), p, blocks, stream);
    case K::tvd: return launch_rows(fn, scalar::TotalVariation(spec), p, blocks, stream);
    case K::hellinger: return launch_rows(fn, scalar::Hellinger(spec), p, blocks, stream);
    case K::jeffreys: return launch_rows(fn, scalar::Jeffreys(spec), p, blocks, stream);
    case K::chi2: return launch_rows(fn, scalar::ChiSquared(spec), p, blocks, stream);
    case K::alpha_divergence:
      return launch_rows(fn, scalar::AlphaDivergence(spec), p, blocks, stream);
    case K::renyi: return launch_rows(fn, scalar::Renyi(spec), p, blocks, stream);
    case K::cross_entropy: return launch_rows(fn, scalar::CrossEntropy(spec), p, blocks, stream);
  }
}

// [N, k] tensor of the given dtypes (on the device: shapes and dtypes only).
void check_nk(const char* fn, const char* name, const TensorView& t, int64_t n,
              std::initializer_list<DType> dtypes) {
  const std::string arg(name);
  if (t.ndim != 2)
    check::fail(fn, arg + " must be 2-D [N, k], got shape " + check::shape_string(t));
  if (t.shape[0] != n)
    check::fail(fn, arg + " has " + std::to_string(t.shape[0]) +
                        " rows, but student_logits has N = " + std::to_string(n) + " (shape " +
                        check::shape_string(t) + ")");
  check::dtype_in(fn, name, cuda::shape_only(t), dtypes);
  if (t.numel() > 0 && t.data == nullptr) check::fail(fn, arg + " has a null data pointer");
}

In input(const TensorView& t) {
  return {t.data, t.dtype, t.strides[0], t.ndim > 1 ? t.strides[1] : 1};
}

// Copies row `row` of an [n, k] device input to the host (for the error message of a bad
// teacher row); returns the host buffer as a SparseInput with row stride 0.
SparseInput host_row(const char* fn, const In& in, int64_t row, int64_t k,
                     std::vector<unsigned char>& buf) {
  const size_t es = dtype_size(in.dtype);
  buf.assign(static_cast<size_t>(k) * es, 0);
  const char* src = static_cast<const char*>(in.data) + row * in.row_stride * int64_t(es);
  check_cuda(fn,
             cudaMemcpy2D(buf.data(), es, src, static_cast<size_t>(in.col_stride) * es, es,
                          static_cast<size_t>(k), cudaMemcpyDeviceToHost),
             "cudaMemcpy2D");
  return {buf.data(), in.dtype, 0, 1};
}

// Runs the kernels on options.stream and reads the flags back (unless check_finite is off).
void run(const char* fn, Params p, bool in_place, const DivergenceSpec& spec,
         const DivergenceOptions& options, const TensorView& loss, int device) {
  const DivergenceSpec s = resolve_divergence_limits(spec);
  p.temperature = s.temperature;
  p.inv_t = 1.0f / s.temperature;
  p.r.t2 = s.scale_by_t_squared ? double(s.temperature) * s.temperature : 1.0;
  p.r.bad_slots = kBadSlots;
  p.r.weights_bad_slot = kWeights;
  p.r.check_finite = options.check_finite;

  DeviceGuard guard(fn, device);
  const auto stream = reinterpret_cast<cudaStream_t>(options.stream);
  const int64_t k = p.k, n = p.n;
  p.words = (p.v + 31) / 32;
  auto up = [](int64_t bytes) { return (bytes + 255) / 256 * 256; };
  const int64_t per_slot = 8 * k + 4 * 8 * (k + 1) + 4 * k + 4 * p.words;
  const int64_t blocks = std::max<int64_t>(1, std::min({std::max<int64_t>(n, 1), kMaxBlocks,
                                                        kWorkspaceBudget / per_slot}));
  const int64_t head = up(sizeof(double) + kBadSlots * sizeof(unsigned long long));
  const int64_t rows_bytes = up(n * int64_t(sizeof(double)));
  const int64_t idx_bytes = up(blocks * k * 8), b_bytes = up(blocks * (k + 1) * 8);
  const int64_t xk_bytes = up(blocks * k * 4), bits_bytes = up(blocks * p.words * 4);
  const int64_t bytes = head + rows_bytes + idx_bytes + 4 * b_bytes + xk_bytes + bits_bytes;
  char* ws = nullptr;
  check_cuda(fn, cudaMallocAsync(reinterpret_cast<void**>(&ws), static_cast<size_t>(bytes), stream),
             "cudaMallocAsync");
  p.r.divisor = reinterpret_cast<double*>(ws);
  p.r.bad = reinterpret_cast<unsigned long long*>(p.r.divisor + 1);
  char* at = ws + head;
  p.r.row_loss = reinterpret_cast<double*>(at);
  at += rows_bytes;
  p.w_idx = reinterpret_cast<int64_t*>(at);
  at += idx_bytes;
  p.w_lp = reinterpret_cast<double*>(at);
  p.w_lq = reinterpret_cast<double*>(at + b_bytes);
  p.w_q = reinterpret_cast<double*>(at + 2 * b_bytes);
  p.w_u = reinterpret_cast<double*>(at + 3 * b_bytes);
  at += 4 * b_bytes;
  p.w_xk = reinterpret_cast<float*>(at);
  at += xk_bytes;
  p.w_bits = reinterpret_cast<uint32_t*>(at);
  unsigned long long bad[kBadSlots];
  try {
    check_cuda(fn, cudaMemsetAsync(p.r.bad, 0xFF, kBadSlots * sizeof(unsigned long long), stream),
               "cudaMemsetAsync");
    check_cuda(fn, cudaMemsetAsync(p.r.row_loss, 0, static_cast<size_t>(rows_bytes), stream),
               "cudaMemsetAsync");
    check_cuda(fn, cudaMemsetAsync(p.w_bits, 0, static_cast<size_t>(bits_bytes), stream),
               "cudaMemsetAsync");
    launch_prep(fn, p.r, stream);
    const unsigned grid = static_cast<unsigned>(blocks);
    if (!p.topk && n > 0) {
      DIVKIT_LAUNCH(check_kernel, grid, kThreads, 0, stream)(p);
      check_cuda(fn, cudaGetLastError(), "the teacher check kernel launch");
    }
    auto launch = [&](bool check_only, bool skip_if_bad) {
      Params q = p;
      q.check_only = check_only;
      q.skip_if_bad = skip_if_bad;
      launch_rows_of(fn, s, q, grid, stream);
    };
    run_rows(fn, p.r, loss, in_place, launch, ws, bad, stream);
  } catch (...) {
    if (ws != nullptr) cudaFreeAsync(ws, stream);
    throw;
  }
  if (!options.check_finite) return;
  // In the CPU's order: the weights (reduce::plan) before the given teacher.
  if (bad[kWeights] != kNone) fail_bad_weight(fn, p.r, bad[kWeights]);
  if (bad[kTeacherGiven] != kNone) {
    // The device found the row; the host check of that one row gives the exact message.
    const int64_t row = static_cast<int64_t>(bad[kTeacherGiven]);
    std::vector<unsigned char> ibuf, lbuf;
    const SparseInput hi = host_row(fn, p.idx, row, k, ibuf);
    const SparseInput hl = host_row(fn, p.lp, row, k, lbuf);
    std::vector<uint8_t> active(static_cast<size_t>(row + 1), 0);
    active[static_cast<size_t>(row)] = 1;
    check_sparse_teacher(fn, hi, hl, row + 1, p.v, k,
                         p.bucket ? SparseTail::bucket : SparseTail::renormalize, active.data());
    check::fail(fn, "teacher_indices / teacher_logprobs are invalid at row " + std::to_string(row));
  }
  auto report = [&](const char* name, unsigned long long nan_row, unsigned long long mass_row,
                    const char* no_mass_what) {
    BadRow b;
    if (nan_row != kNone) b.row = static_cast<int64_t>(nan_row);
    else if (mass_row != kNone) b = {static_cast<int64_t>(mass_row), true};
    throw_bad_row(fn, name, b, no_mass_what);
  };
  report("student_logits", bad[kStudentNonFinite], bad[kStudentNoMass],
         p.renormalized ? " is -inf at every teacher index (no student probability to "
                          "renormalize)"
                        : " has every logit -inf (no distribution)");
  report("teacher_logits", bad[kTeacherNonFinite], bad[kTeacherNoMass],
         " has every logit -inf (no distribution)");
}

}  // namespace

void sparse_divergence_cuda(const TensorView& student, const TensorView& teacher_indices,
                            const TensorView& teacher_logprobs, const DivergenceSpec& spec,
                            const SparseOptions& sparse, const DivergenceOptions& options,
                            const SparseOutputs& outputs, bool scratch_inputs) {
  constexpr const char* fn = kSparseFn;
  check::divergence_spec(fn, spec);
  if (sparse.tail != SparseTail::renormalize && sparse.tail != SparseTail::bucket)
    check::fail(fn, "tail code " + std::to_string(static_cast<int>(sparse.tail)) + " is unknown");
  check::float_matrix(fn, "student_logits", cuda::shape_only(student));
  const int64_t n = student.shape[0], v = student.shape[1];
  if (v == 0) check::fail(fn, "student_logits has V = 0 (an empty vocabulary)");
  check_nk(fn, "teacher_indices", teacher_indices, n, {DType::i64, DType::i32});
  check_nk(fn, "teacher_logprobs", teacher_logprobs, n, {DType::f32, DType::f64, DType::bf16});
  const int64_t k = teacher_indices.shape[1];
  if (teacher_logprobs.shape[1] != k)
    check::fail(fn, "teacher_logprobs " + check::shape_string(teacher_logprobs) +
                        " and teacher_indices " + check::shape_string(teacher_indices) +
                        " must have the same shape");
  if (k < 1) check::fail(fn, "teacher_indices has k = 0 entries per row; k must be >= 1");
  if (k > v)
    check::fail(fn, "teacher_indices has k = " + std::to_string(k) +
                        " entries per row, more than the vocabulary V = " + std::to_string(v));
  Params p;
  fill_row_reduce(fn, n, options, outputs.loss, p.r);
  p.s = input(student);
  p.idx = input(teacher_indices);
  p.lp = input(teacher_logprobs);
  p.n = n;
  p.v = v;
  p.k = k;
  p.bucket = sparse.tail == SparseTail::bucket;
  p.has_tail = p.bucket && k < v;
  p.renormalized = !p.has_tail;
  bool in_place = false;
  if (outputs.grad_student.defined()) {
    in_place = check_sparse_grad_output(fn, cuda::shape_only(outputs.grad_student), student,
                                        {{"teacher_indices", &teacher_indices},
                                         {"teacher_logprobs", &teacher_logprobs}});
    p.gs = {outputs.grad_student.data, outputs.grad_student.dtype, outputs.grad_student.strides[0]};
  }
  run(fn, p, in_place && !scratch_inputs, spec, options, outputs.loss, student.device_index);
}

void topk_divergence_cuda(const TensorView& student, const TensorView& teacher, int64_t k,
                          const DivergenceSpec& spec, const DivergenceOptions& options,
                          const SparseOutputs& outputs) {
  constexpr const char* fn = kTopkFn;
  check::divergence_spec(fn, spec);
  check_logit_pair(fn, cuda::shape_only(student), cuda::shape_only(teacher));
  const int64_t n = student.shape[0], v = student.shape[1];
  if (k < 1 || k > v)
    check::fail(fn, "k must be in [1, V = " + std::to_string(v) + "], got " + std::to_string(k));
  Params p;
  fill_row_reduce(fn, n, options, outputs.loss, p.r);
  p.s = input(student);
  p.t = input(teacher);
  p.n = n;
  p.v = v;
  p.k = k;
  p.topk = true;
  p.renormalized = true;
  bool in_place = false;
  if (outputs.grad_student.defined()) {
    in_place = check_sparse_grad_output(fn, cuda::shape_only(outputs.grad_student), student,
                                        {{"teacher_logits", &teacher}});
    p.gs = {outputs.grad_student.data, outputs.grad_student.dtype, outputs.grad_student.strides[0]};
  }
  run(fn, p, in_place, spec, options, outputs.loss, student.device_index);
}

}  // namespace divkit::detail
