// The generic row kernel: one token (row) of student and teacher logits -> the divergence value
// and the gradients, for any divergence of divergences-inl.h. Compiled once per SIMD target
// (Highway foreach_target) and chosen at run time.
//
// Per row, with a per-thread row block of four fp32 buffers of V (padded to the vector width):
//   pass 1  read the logits (any dtype) once from memory into xs / xt (fp32), track the max
//           and any NaN/+inf, and exponentiate as they are read: es = exp((xs - max) / T), et
//           likewise (one exp per logit per distribution), summed in fp64 -> log-sum-exp. A
//           block of 16 vectors that raises the running max is exponentiated again from its
//           copy in L1, so no separate pass over memory finds the max;
//   pass 2  p, q, log p, log q from the buffers (no further exp), the divergence terms summed
//           in fp64 lanes; the student factor u overwrites et (xs where the teacher gradient is
//           asked), the teacher factor v overwrites xt. Where u = -p (forward KL,
//           cross-entropy) the gradient (q - p) / T * scale is written in this same sweep;
//   pass 3  otherwise, gradient = (u - q * sum u) / T * scale, written in the output dtype.
//           Where the block is larger than L2 (fp32 rows read from the inputs, below) and the
//           student gradient alone is asked, a row's pass 3 runs inside the next row's pass 2
//           (two blocks alternate): pass 3 waits on its stores to memory, pass 2 on arithmetic.
// Renyi, a log of a sum, has its own row routine (RenyiRow) working in log space.
// Only pass 1 and the gradient writes touch the caller's memory; the block stays in the core's
// L2/L3. Where the block is larger than L2 and both inputs are fp32 rows of whole vectors, pass 1
// does not copy the logits: the later passes read them from the input rows (in L3 by then), so
// that the block is es and et (plus u / v where the chain rule needs them), not four rows. Where
// the block and one more row fit in L2, pass 2 prefetches the next row's logits, so that the next
// pass 1 does not wait on memory; within a row, pass 1 itself asks for its logits 4 KiB ahead
// (the hardware prefetcher alone leaves it waiting). A fresh gradient buffer is marked for huge
// pages before the first write (see run_divergence_rows). Row sums are reduced in a fixed lane
// order, so results do not depend on the thread count.
#include <omp.h>
#if defined(__linux__)
#include <unistd.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "core/element.h"
#include "divergence/row_job.h"
#include "hwy/aligned_allocator.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "divergence/divergence_kernels.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep

#include "core/row_io-inl.h"
#include "core/simd_math-inl.h"
#include "divergence/divergences-inl.h"
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace divkit {
namespace HWY_NAMESPACE {
namespace {

namespace hn = hwy::HWY_NAMESPACE;
using detail::RowInput;
using detail::RowJob;
using detail::RowOutput;
using DF = hn::ScalableTag<float>;
using VF = hn::Vec<DF>;

// ---- pass 1: load one row of any dtype into an fp32 buffer, exponentiate -------------------

struct RowSoftmax {
  float max;        // max of the logits x (-inf if every entry is masked)
  double log_sum;   // log sum_j exp((x_j - max) / T)
  bool non_finite;  // a NaN or +inf in x
};

// Pass 1 asks for the logits this many bytes ahead of the block it loads: the hardware
// prefetcher alone leaves the loads waiting on memory (four blocks of fp32 logits ahead).
constexpr int64_t kPass1Ahead = 4096;

// Pass 1, per block of kRowSumBlock vectors: the logits x (as fp32) into
// x[0, V) (-inf in the padding [V, Vpad)), and e = exp((x - running max) / T). Each vector is
// exponentiated as it is loaded, against the running max before its block; a block that raises
// the max (the first one, and rarely more than a few others) is exponentiated again from its
// copy in L1 against the new max, so the values are those of a load-then-exponentiate per
// block. The max is subtracted before dividing by T so that the difference is exact: logits of
// 1e4 keep their precision at any temperature. A block exponentiated before the max rose
// further is rescaled at the end; the sum is rescaled as the max rises. The order of operations
// is fixed per row, so results do not depend on threads.
// With copy_x false (fp32 rows of whole vectors only: vpad == v), x is not written; the block
// exponentiated again reads the logits from src.
template <bool kUnitT, typename T>
RowSoftmax LoadSoftmaxRowTyped(const T* HWY_RESTRICT src, int64_t v, int64_t vpad, float inv_t,
                               float* HWY_RESTRICT x, float* HWY_RESTRICT e,
                               float* HWY_RESTRICT block_max, bool copy_x) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  const DF df;
  const float* xr = x;  // where the logits are read back from
  if constexpr (std::is_same_v<T, float>) {
    if (!copy_x) xr = src;
  }
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(df));
  const int64_t block_len = kRowSumBlock * lanes;
  // Whole vectors converted in registers (fp64 rows and the last partial vector: LoadRowBlock).
  const int64_t vfull = std::is_same_v<T, double> ? 0 : v / lanes * lanes;
  const VF scale = hn::Set(df, inv_t);
  const VF vinf = hn::Set(df, kInf);
  const double inv_t_d = inv_t;  // the same (rounded) 1/T as the vector code
  auto arg = [&](VF xj, VF vm) {
    return kUnitT ? hn::Sub(xj, vm) : hn::Mul(hn::Sub(xj, vm), scale);
  };
  float run_max = -kInf;
  double sum = 0.0;
  bool non_finite = false;
  int64_t block = 0;
  for (int64_t begin = 0; begin < vpad; begin += block_len, ++block) {
    const int64_t end = std::min(begin + block_len, vpad);
    const int64_t fused_end = std::min(end, vfull);
    const VF vm_old = hn::Set(df, run_max);
    VF vmax = hn::Set(df, -kInf);
    auto ok = hn::Eq(vmax, vmax);  // all true
    VF acc = hn::Zero(df);
    int64_t j = begin;
    if constexpr (!std::is_same_v<T, double>) {
      {
        // The lines kPass1Ahead bytes beyond this block's, up to the row's end.
        constexpr int64_t kElem = static_cast<int64_t>(sizeof(T));
        const char* row = reinterpret_cast<const char*>(src);
        const int64_t stop = std::min(end * kElem + kPass1Ahead, v * kElem);
        for (int64_t off = begin * kElem + kPass1Ahead; off < stop; off += 64)
          __builtin_prefetch(row + off, 0, 3);
      }
      for (; j < fused_end; j += lanes) {
        const VF xj = LoadAsFloat(df, src + j);
        ok = hn::And(ok, hn::Lt(xj, vinf));  // NaN and +inf compare false
        vmax = hn::Max(vmax, xj);
        if (copy_x) hn::Store(xj, df, x + j);
        const VF ej = SoftmaxExp(df, arg(xj, vm_old));  // garbage if the max rises: redone
        hn::Store(ej, df, e + j);
        acc = hn::Add(acc, ej);
      }
    }
    auto bad = hn::Not(ok);
    if (j < end) {
      LoadRowBlock(df, src, j, end, v, x, vmax, bad);
      for (int64_t k = j; k < end; k += lanes) {
        const VF ek = SoftmaxExp(df, arg(hn::Load(df, x + k), vm_old));
        hn::Store(ek, df, e + k);
        acc = hn::Add(acc, ek);
      }
    }
    non_finite |= !hn::AllFalse(df, bad);
    const float bmax = hn::GetLane(hn::MaxOfLanes(df, vmax));
    const bool redo = bmax > run_max;
    if (redo) {
      if (sum != 0.0) sum *= std::exp((static_cast<double>(run_max) - bmax) * inv_t_d);
      run_max = bmax;
    }
    block_max[block] = run_max;
    if (run_max == -kInf || non_finite) {  // nothing to exponentiate yet, or a bad row
      for (int64_t k = begin; k < end; k += lanes) hn::Store(hn::Zero(df), df, e + k);
      continue;
    }
    if (redo) {
      const VF vm = hn::Set(df, run_max);
      acc = hn::Zero(df);
      for (int64_t k = begin; k < end; k += lanes) {
        const VF ek = SoftmaxExp(df, arg(hn::LoadU(df, xr + k), vm));
        hn::Store(ek, df, e + k);
        acc = hn::Add(acc, ek);
      }
    }
    RowSum block_sum;
    block_sum.AddBlock(acc);
    sum += block_sum.total;
  }
  if (run_max != -kInf && !non_finite) {
    // Blocks exponentiated against an older (smaller) max: bring them to the final one.
    block = 0;
    for (int64_t begin = 0; begin < vpad; begin += block_len, ++block) {
      const float ref = block_max[block];
      if (ref == run_max) continue;
      const int64_t end = std::min(begin + block_len, vpad);
      const VF f =
          hn::Set(df, static_cast<float>(std::exp((static_cast<double>(ref) - run_max) * inv_t_d)));
      for (int64_t k = begin; k < end; k += lanes)
        hn::Store(hn::Mul(hn::Load(df, e + k), f), df, e + k);
    }
  }
  return {run_max, std::log(sum), non_finite};
}

RowSoftmax LoadSoftmaxRow(const RowInput& in, int64_t row, int64_t v, int64_t vpad, float inv_t,
                          float* HWY_RESTRICT x, float* HWY_RESTRICT e,
                          float* HWY_RESTRICT block_max, bool copy_x = true) {
  return VisitRow(in, row, [&](const auto* src) {
    return inv_t == 1.0f ? LoadSoftmaxRowTyped<true>(src, v, vpad, inv_t, x, e, block_max, copy_x)
                         : LoadSoftmaxRowTyped<false>(src, v, vpad, inv_t, x, e, block_max, copy_x);
  });
}

// ---- gradient rows in the output dtype -------------------------------------------------------

// Writes row `row` of `out` from grad_at(j), the fp32 gradient vector at columns [j, j+lanes).
// fp32 is stored directly; other dtypes go through the fp32 scratch row and are rounded to
// nearest even.
template <class GradAt>
HWY_INLINE void WriteGradRow(const RowOutput& out, int64_t row, int64_t v, const GradAt& grad_at,
                             float* HWY_RESTRICT scratch) {
  const DF df;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(df));
  if (out.dtype == DType::f32) {
    float* HWY_RESTRICT dst = static_cast<float*>(out.data) + row * out.row_stride;
    int64_t j = 0;
    if (reinterpret_cast<uintptr_t>(dst) % (lanes * sizeof(float)) == 0) {
      // Streaming stores: the gradient is not read again here, and they save the read-for-
      // ownership of every output line (a quarter of the memory traffic).
      for (; j + lanes <= v; j += lanes) hn::Stream(grad_at(j), df, dst + j);
    } else {
      for (; j + lanes <= v; j += lanes) hn::StoreU(grad_at(j), df, dst + j);
    }
    if (j < v) {
      hn::Store(grad_at(j), df, scratch);
      std::memcpy(dst + j, scratch, static_cast<size_t>(v - j) * sizeof(float));
    }
    return;
  }
  for (int64_t j = 0; j < v; j += lanes) hn::Store(grad_at(j), df, scratch + j);
  StoreRow(out, row, v, scratch);
}

// g_j = scale * (u_j - q_j * sum_u), q_j = e_j / Z: the softmax chain rule.
HWY_INLINE void WriteChainRuleGrad(const RowOutput& out, int64_t row, int64_t v,
                                   const float* HWY_RESTRICT u, const float* HWY_RESTRICT e,
                                   float inv_z, float sum_u, float scale,
                                   float* HWY_RESTRICT scratch) {
  const DF df;
  const VF vscale = hn::Set(df, scale);
  const VF vqsum = hn::Set(df, inv_z * sum_u);  // q_j * sum_u = e_j * (sum_u / Z)
  WriteGradRow(
      out, row, v,
      [&](int64_t j) {
        return hn::Mul(vscale, hn::NegMulAdd(hn::Load(df, e + j), vqsum, hn::Load(df, u + j)));
      },
      scratch);
}

// g_j = scale * (q_j - p_j), the chain rule when u = -p (sum u = -1).
HWY_INLINE void WriteMinusPGrad(const RowOutput& out, int64_t row, int64_t v,
                                const float* HWY_RESTRICT es, float inv_zs,
                                const float* HWY_RESTRICT et, float inv_zt, float scale,
                                float* HWY_RESTRICT scratch) {
  const DF df;
  const VF qs = hn::Set(df, scale * inv_zs), ps = hn::Set(df, scale * inv_zt);
  WriteGradRow(
      out, row, v,
      [&](int64_t j) {
        return hn::MulSub(hn::Load(df, es + j), qs, hn::Mul(hn::Load(df, et + j), ps));
      },
      scratch);
}

// One gradient row written a vector at a time by the sweep that computes it (the fused forward
// KL / cross-entropy sweep): fp32 rows are streamed (aligned) or stored directly, the last
// partial vector through `scratch`; other dtypes collect in the fp32 `scratch` row and are
// rounded by Finish(), exactly as WriteGradRow does.
class GradRowWriter {
 public:
  GradRowWriter(const RowOutput& out, int64_t row, int64_t v, float* HWY_RESTRICT scratch)
      : out_(out), row_(row), v_(v), scratch_(scratch) {
    const DF df;
    if (out.dtype == DType::f32) {
      dst_ = static_cast<float*>(out.data) + row * out.row_stride;
      mode_ = reinterpret_cast<uintptr_t>(dst_) % (hn::Lanes(df) * sizeof(float)) == 0
                  ? Mode::stream
                  : Mode::unaligned;
    }
  }
  HWY_INLINE void Put(int64_t j, VF g) {
    const DF df;
    const int64_t lanes = static_cast<int64_t>(hn::Lanes(df));
    if (mode_ == Mode::scratch) {
      hn::Store(g, df, scratch_ + j);
    } else if (HWY_UNLIKELY(j + lanes > v_)) {
      hn::Store(g, df, scratch_);
      if (j < v_) std::memcpy(dst_ + j, scratch_, static_cast<size_t>(v_ - j) * sizeof(float));
    } else if (mode_ == Mode::stream) {
      hn::Stream(g, df, dst_ + j);
    } else {
      hn::StoreU(g, df, dst_ + j);
    }
  }
  void Finish() {
    if (mode_ == Mode::scratch) StoreRow(out_, row_, v_, scratch_);
  }

 private:
  enum class Mode { scratch, stream, unaligned };
  const RowOutput& out_;
  int64_t row_, v_;
  float* HWY_RESTRICT scratch_;
  float* dst_ = nullptr;
  Mode mode_ = Mode::scratch;
};

struct RowBuffers {
  float* HWY_RESTRICT xs;        // student logits (fp32); overwritten by u with the teacher grad
  const float* HWY_RESTRICT es;  // exp((xs - max) / T)
  float* HWY_RESTRICT xt;        // teacher logits; overwritten by v when the teacher grad is asked
  float* HWY_RESTRICT et;        // exp((xt - max) / T); overwritten by u without the teacher grad
  int64_t vpad;
  // The next row's logits (null: none), asked for while pass 2 computes on this row's block.
  const char* next_s = nullptr;
  const char* next_t = nullptr;
  int64_t elem_bytes = 4;
  // The logits as the terms sweep reads them: xs / xt, or the fp32 input rows themselves where
  // pass 1 made no copy (in place, each vector is read before the gradient overwrites it).
  const float* ls = nullptr;
  const float* lt = nullptr;
  const float* LogitsS() const { return ls != nullptr ? ls : xs; }
  const float* LogitsT() const { return lt != nullptr ? lt : xt; }
  // Where the terms sweep leaves u. Without the teacher gradient, et is not read after that sweep,
  // and u overwrites it (each line while it is in L1 from its load): xs and xt then stay free,
  // for the second block of the deferred pass 3 (RunRows).
  float* URow(bool teacher) const { return teacher ? xs : et; }
};

// Prefetches the next row's logits for columns [begin, end) into L2.
HWY_INLINE void PrefetchNext(const RowBuffers& b, int64_t begin, int64_t end) {
  constexpr int64_t kLine = 64;
  for (int64_t off = begin * b.elem_bytes; off < end * b.elem_bytes; off += kLine) {
    __builtin_prefetch(b.next_s + off, 0, 1);
    __builtin_prefetch(b.next_t + off, 0, 1);
  }
}

// log q = (x_s - max_s) / T - log_sum_s: subtracting the max first keeps the log-probabilities
// exact to an ulp of themselves, not of the largest logit (logits of 1e4 stay accurate).
struct Normalizers {
  VF max_s, max_t, log_sum_s, log_sum_t, inv_zs, inv_zt, inv_t;
  VF log_sum_diff;  // log_sum_t - log_sum_s, rounded once
};

// p, q, their logs and log(p / q) at columns [j, j + lanes) of the row buffers.
// xs / xt may be the input rows (unaligned; in place, the gradient's destination).
HWY_INLINE Entry<VF> LoadEntry(const float* xs, const float* HWY_RESTRICT es, const float* xt,
                               const float* HWY_RESTRICT et, const Normalizers& n, int64_t j) {
  const DF df;
  Entry<VF> e;
  e.q = hn::Mul(hn::Load(df, es + j), n.inv_zs);
  e.p = hn::Mul(hn::Load(df, et + j), n.inv_zt);
  // Centered logits are exact (the max is close); their difference is exact or rounded once.
  const VF cs = hn::Sub(hn::LoadU(df, xs + j), n.max_s);
  const VF ct = hn::Sub(hn::LoadU(df, xt + j), n.max_t);
  e.lq = hn::MulSub(cs, n.inv_t, n.log_sum_s);
  e.lp = hn::MulSub(ct, n.inv_t, n.log_sum_t);
  e.lr = hn::MulSub(hn::Sub(ct, cs), n.inv_t, n.log_sum_diff);
  return e;
}

// A row's chain-rule student gradient, scale * (u - es * (inv_z * sum_u)), left for the next
// row's terms sweep to write (see RunRows: the deferred pass 3).
struct PendingGrad {
  int64_t row = -1;  // -1: none
  const float* u = nullptr;
  const float* es = nullptr;
  float inv_z = 0.0f, sum_u = 0.0f, scale = 0.0f;
};

// Columns [begin, end) of a pending gradient: the values of WriteChainRuleGrad.
HWY_INLINE void WritePendingBlock(const PendingGrad& p, GradRowWriter& out, int64_t begin,
                                  int64_t end) {
  const DF df;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(df));
  const VF pscale = hn::Set(df, p.scale);
  const VF pqsum = hn::Set(df, p.inv_z * p.sum_u);
  for (int64_t k = begin; k < end; k += lanes)
    out.Put(k,
            hn::Mul(pscale, hn::NegMulAdd(hn::Load(df, p.es + k), pqsum, hn::Load(df, p.u + k))));
}

// pass 2: the divergence terms and the gradient factors u (and v), summed per row. With
// `fused` (only when u = -p and no teacher gradient), the student gradient scale * (q - p) is
// written in the same sweep (no pass 3): its values do not depend on the row sums.
// With `prev` (and its writer), the previous row's pending gradient is written block by block
// in the same sweep: the same values as WriteChainRuleGrad's.
template <bool kTeacher, class Div>
HWY_INLINE void SumTerms(const Div& div_arg, const RowBuffers& b, const Normalizers& n,
                         RowSum& sum_g, RowSum& sum_u, RowSum& sum_v,
                         GradRowWriter* fused = nullptr, float fused_scale = 0.0f,
                         const PendingGrad* prev = nullptr, GradRowWriter* prev_out = nullptr) {
  const DF df;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(df));
  const int64_t block_len = kRowSumBlock * lanes;
  // u overwrites et (URow; xs with the teacher gradient): its stores and et's loads go through
  // the same restrict pointer, so that the compiler still knows they alias nothing else.
  float* HWY_RESTRICT xs = b.xs;
  float* HWY_RESTRICT et_rw = b.et;
  float* ur = kTeacher ? xs : et_rw;
  float* HWY_RESTRICT xt = b.xt;
  const float* HWY_RESTRICT es = b.es;
  const float* et = et_rw;
  const float* ls = b.LogitsS();
  const float* lt = b.LogitsT();
  // Local copies keep the constants in registers: the stores of u and v could otherwise alias
  // the divergence's parameters, which would then be loaded again for every vector.
  const Normalizers nl = n;
  const Div div = div_arg;
  if constexpr (Div::kStudentFactorIsMinusP && !kTeacher) {
    if (fused != nullptr) {
      // The same products as WriteMinusPGrad, so the gradient's bits do not depend on the path.
      const VF qs = hn::Set(df, fused_scale * hn::GetLane(nl.inv_zs));
      const VF ps = hn::Set(df, fused_scale * hn::GetLane(nl.inv_zt));
      for (int64_t begin = 0; begin < b.vpad; begin += block_len) {
        const int64_t end = std::min(begin + block_len, b.vpad);
        if (b.next_s != nullptr) PrefetchNext(b, begin, end);
        VF acc_g = hn::Zero(df);
        for (int64_t j = begin; j < end; j += lanes) {
          const Entry<VF> e = LoadEntry(ls, es, lt, et, nl, j);
          VF u;
          acc_g = hn::Add(acc_g, div.term(df, e, u));
          fused->Put(j, hn::MulSub(hn::Load(df, es + j), qs, hn::Mul(hn::Load(df, et + j), ps)));
        }
        sum_g.AddBlock(acc_g);
      }
      fused->Finish();
      return;
    }
  }
  for (int64_t begin = 0; begin < b.vpad; begin += block_len) {
    const int64_t end = std::min(begin + block_len, b.vpad);
    if (b.next_s != nullptr) PrefetchNext(b, begin, end);
    VF acc_g = hn::Zero(df), acc_u = hn::Zero(df), acc_v = hn::Zero(df);
    auto add = [&](int64_t j, VF g, VF u, const Entry<VF>& e) {
      acc_g = hn::Add(acc_g, g);
      if constexpr (!Div::kStudentFactorIsMinusP) {
        acc_u = hn::Add(acc_u, u);
        hn::Store(u, df, ur + j);
      }
      if constexpr (kTeacher) {
        const VF v = div.teacher(df, e);
        acc_v = hn::Add(acc_v, v);
        hn::Store(v, df, xt + j);
      }
    };
    int64_t j = begin;
    // Two vectors per step, so that two independent term chains (exp, log) are issued side by
    // side (on the AVX2 machine this was measured neither faster nor slower; a target with fewer
    // scheduler entries may gain). The sums are added in column order, as one vector per step
    // would.
    for (; j + lanes < end; j += 2 * lanes) {
      const Entry<VF> e0 = LoadEntry(ls, es, lt, et, nl, j);
      const Entry<VF> e1 = LoadEntry(ls, es, lt, et, nl, j + lanes);
      VF u0, u1;
      const VF g0 = div.term(df, e0, u0);
      const VF g1 = div.term(df, e1, u1);
      add(j, g0, u0, e0);
      add(j + lanes, g1, u1, e1);
    }
    if (j < end) {
      const Entry<VF> e = LoadEntry(ls, es, lt, et, nl, j);
      VF u;
      const VF g = div.term(df, e, u);
      add(j, g, u, e);
    }
    if (prev != nullptr) WritePendingBlock(*prev, *prev_out, begin, end);
    sum_g.AddBlock(acc_g);
    if constexpr (!Div::kStudentFactorIsMinusP) sum_u.AddBlock(acc_u);
    if constexpr (kTeacher) sum_v.AddBlock(acc_v);
  }
  if (prev != nullptr) prev_out->Finish();
}

// Rows of the divergences whose value is sum_j g(p_j, q_j) (all but Renyi): pass 2 then the
// chain-rule gradient. Returns the row value, or NaN when the gradient would overflow fp32.
// With `next` (student gradient only, chain rule): the previous row's pending gradient `prev`
// is written during this row's terms sweep, and this row's is left in `next` instead of pass 3
// (row unset where the caller zeroes the gradient).
template <class Div>
double SumRow(const Div& div, const RowBuffers& b, const Normalizers& n, int64_t v,
              const RowOutput* grad_s, const RowOutput* grad_t, int64_t row, double scale,
              float* HWY_RESTRICT scratch, const PendingGrad* prev = nullptr,
              PendingGrad* next = nullptr) {
  RowSum sum_g, sum_u, sum_v;
  if constexpr (Div::kStudentFactorIsMinusP) {
    if (grad_s != nullptr && grad_t == nullptr) {
      // One sweep: terms and gradient. A row whose value turns out non-finite has its gradient
      // zeroed by the caller, as on the two-sweep path.
      GradRowWriter w(*grad_s, row, v, scratch);
      SumTerms<false>(div, b, n, sum_g, sum_u, sum_v, &w, static_cast<float>(scale));
      return sum_g.total;
    }
  }
  if (grad_t != nullptr) {
    SumTerms<true>(div, b, n, sum_g, sum_u, sum_v);
  } else if (prev != nullptr && prev->row >= 0) {
    GradRowWriter w(*grad_s, prev->row, v, scratch);
    SumTerms<false>(div, b, n, sum_g, sum_u, sum_v, nullptr, 0.0f, prev, &w);
  } else {
    SumTerms<false>(div, b, n, sum_g, sum_u, sum_v);
  }
  const double value = sum_g.total;
  constexpr double kMax = std::numeric_limits<float>::max();
  if (!(std::fabs(value) <= kMax) || (grad_s == nullptr && grad_t == nullptr)) return value;
  if (!(std::fabs(sum_u.total) <= kMax) || !(std::fabs(sum_v.total) <= kMax))
    return std::numeric_limits<double>::quiet_NaN();
  const float k = static_cast<float>(scale);
  const float inv_zs = hn::GetLane(n.inv_zs), inv_zt = hn::GetLane(n.inv_zt);
  if constexpr (!Div::kStudentFactorIsMinusP) {
    if (next != nullptr) {
      *next = {row, b.URow(false), b.es, inv_zs, static_cast<float>(sum_u.total), k};
      return value;
    }
  }
  if (grad_s != nullptr) {
    if constexpr (Div::kStudentFactorIsMinusP)
      WriteMinusPGrad(*grad_s, row, v, b.es, inv_zs, b.et, inv_zt, k, scratch);
    else
      WriteChainRuleGrad(*grad_s, row, v, b.URow(grad_t != nullptr), b.es, inv_zs,
                         static_cast<float>(sum_u.total), k, scratch);
  }
  if (grad_t != nullptr)
    WriteChainRuleGrad(*grad_t, row, v, b.xt, b.et, inv_zt, static_cast<float>(sum_v.total), k,
                       scratch);
  return value;
}

// Renyi rows, in log space: D = L / (alpha - 1) with L = log sum_j w_j, w_j = exp(a_j),
// a_j = lq_j + alpha lr_j, so that sums far below or above fp32's range stay finite. Near
// D = 0, L = log1p(S) with the cancellation-free S = sum (w - mix) of the Renyi struct. The
// gradients use the normalized w^_j = exp(a_j - L) <= 1:
//   dD/ds_j = -(w^_j - q_j) / T,   dD/dt_j = alpha / (alpha - 1) (w^_j - p_j) / T,
// with w^ - q = q expm1(alpha lr - L) and w^ - p = p expm1((alpha - 1) lr - L) where those
// arguments are moderate (exact when w^ is close to q or p). Returns the row value.
// Pass 1 of a Renyi row: S1 = sum (w - mix) (the cancellation-free sum used near D = 0), the
// max of log w, and sum exp(log w - max). Over a vocabulary shard these are partial values.
struct RenyiSums {
  double s1, amax, sum_w;
};

HWY_INLINE VF RenyiLogW(const Renyi& div, const Entry<VF>& e) {
  const DF df;
  constexpr float kInf = std::numeric_limits<float>::infinity();
  const VF neg_inf = hn::Set(df, -kInf);
  // log w, with the masked-q conventions of PowerMean (+inf if p > 0 and alpha > 1, else -inf).
  const auto masked_q = hn::Eq(e.lq, neg_inf);
  const VF at_masked = div.alpha > 1.0f
                           ? hn::IfThenElse(hn::Gt(e.p, hn::Zero(df)), hn::Set(df, kInf), neg_inf)
                           : neg_inf;
  return hn::IfThenElse(masked_q, at_masked,
                        hn::MulAdd(hn::Set(df, div.alpha), hn::IfThenZeroElse(masked_q, e.lr),
                                   e.lq));
}

// With `one_pass`, the first sweep also sums exp(log w) against a shift of 0, which is kept
// when the max of log w lies in [-kUnshifted, kUnshifted] (no overflow, no loss to underflow
// that matters: the row's sum is then at least exp(-kUnshifted)); amax is then returned as 0,
// the shift the gradient uses. Otherwise, and over a vocabulary shard, a second sweep sums
// exp(log w - max).
constexpr float kUnshifted = 60.0f;

RenyiSums RenyiRowSums(const Renyi& div, const RowBuffers& b, const Normalizers& n,
                       bool one_pass = false) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  const DF df;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(df));
  const int64_t block_len = kRowSumBlock * lanes;
  RowSum sum_s1, sum_w0;
  VF vmax = hn::Set(df, -kInf);
  const VF cap = hn::Set(df, kUnshifted);
  for (int64_t begin = 0; begin < b.vpad; begin += block_len) {
    const int64_t end = std::min(begin + block_len, b.vpad);
    if (b.next_s != nullptr) PrefetchNext(b, begin, end);
    VF acc = hn::Zero(df), acc_w = hn::Zero(df);
    for (int64_t j = begin; j < end; j += lanes) {
      const Entry<VF> e = LoadEntry(b.LogitsS(), b.es, b.LogitsT(), b.et, n, j);
      acc = hn::Add(acc, div.term(df, e));
      const VF logw = RenyiLogW(div, e);
      vmax = hn::Max(vmax, logw);
      // Capped so that SoftmaxExp stays in its range; a row whose max passes the cap is
      // summed again below.
      if (one_pass) acc_w = hn::Add(acc_w, SoftmaxExp(df, hn::Min(logw, cap)));
    }
    sum_s1.AddBlock(acc);
    if (one_pass) sum_w0.AddBlock(acc_w);
  }
  const float amax = hn::GetLane(hn::MaxOfLanes(df, vmax));
  if (!(amax < kInf) || amax == -kInf) return {sum_s1.total, amax, 0.0};
  if (one_pass && amax >= -kUnshifted && amax <= kUnshifted)
    return {sum_s1.total, 0.0, sum_w0.total};
  RowSum sum_w;
  const VF vamax = hn::Set(df, amax);
  for (int64_t begin = 0; begin < b.vpad; begin += block_len) {
    const int64_t end = std::min(begin + block_len, b.vpad);
    VF acc = hn::Zero(df);
    for (int64_t j = begin; j < end; j += lanes)
      acc = hn::Add(acc, SoftmaxExp(df, hn::Sub(RenyiLogW(div, LoadEntry(b.LogitsS(), b.es,
                                                                         b.LogitsT(), b.et, n, j)),
                                                vamax)));
    sum_w.AddBlock(acc);
  }
  return {sum_s1.total, amax, sum_w.total};
}

// The first sweep of a Renyi row: u = w - q per entry (exactly as in the alpha divergence's
// student factor), kept in `wq` when kStore (the student gradient then needs no transcendental
// function: RenyiRowGradCached), and w summed as q + u instead of a separate exp of log w.
// Every row takes this sweep first, whichever gradients are asked for, so that its value has the
// same bits in every mode. Returns S1 (the same bits as RenyiRowSums's) and the unshifted sum of
// w; the caller uses them only when that sum lies in [kCachedMin, e^kCachedRange], and otherwise
// takes RenyiRowSums and RenyiRowGrad, whose sums are shifted by the max of log w (rows with an
// infinite w, like a masked student entry at alpha > 1, end there). Where w << q, q + u cancels:
// that w keeps an absolute error of a few ulp of q, so the sum of w carries at most a few ulp of
// sum q = 1. Relative to a sum >= kCachedMin that is below 1e-6 (and the row is then not near
// D = 0, so |L| >= log 2); a smaller sum (alpha < 1 and D > log 8 / (1 - alpha)) takes the
// shifted sums, where each w is an exp of its own log. Above, e^kCachedRange: no overflow.
struct RenyiCachedSums {
  double s1, sum_w;
};
constexpr double kCachedRange = 50.0;
constexpr double kCachedMin = 0.125;
constexpr double kLn2 = 0.69314718055994530942;

template <bool kStore>
RenyiCachedSums RenyiRowSumsCached(const Renyi& div, const RowBuffers& b, const Normalizers& n,
                                   float* HWY_RESTRICT wq, const PendingGrad* prev = nullptr,
                                   GradRowWriter* prev_out = nullptr) {
  const DF df;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(df));
  const int64_t block_len = kRowSumBlock * lanes;
  RowSum sum_s1, sum_w;
  // Local copies, as in SumTerms: the stores of u could otherwise alias the constants.
  const Normalizers nl = n;
  const Renyi dl = div;
  const float* ls = b.LogitsS();
  const float* lt = b.LogitsT();
  for (int64_t begin = 0; begin < b.vpad; begin += block_len) {
    const int64_t end = std::min(begin + block_len, b.vpad);
    if (b.next_s != nullptr) PrefetchNext(b, begin, end);
    VF acc = hn::Zero(df), acc_w = hn::Zero(df);
    auto add = [&](int64_t j, VF g, VF u, VF q) {
      acc = hn::Add(acc, g);
      if constexpr (kStore) hn::Store(u, df, wq + j);
      acc_w = hn::Add(acc_w, hn::Add(q, u));
    };
    int64_t j = begin;
    // Two vectors per step, as SumTerms (two independent term chains side by side); the sums
    // are added in column order, as one vector per step would.
    for (; j + lanes < end; j += 2 * lanes) {
      const Entry<VF> e0 = LoadEntry(ls, b.es, lt, b.et, nl, j);
      const Entry<VF> e1 = LoadEntry(ls, b.es, lt, b.et, nl, j + lanes);
      VF u0, u1;  // w - q
      const VF g0 = dl.TermAndFactor(df, e0, u0);
      const VF g1 = dl.TermAndFactor(df, e1, u1);
      add(j, g0, u0, e0.q);
      add(j + lanes, g1, u1, e1.q);
    }
    if (j < end) {
      const Entry<VF> e = LoadEntry(ls, b.es, lt, b.et, nl, j);
      VF u;
      const VF g = dl.TermAndFactor(df, e, u);
      add(j, g, u, e.q);
    }
    if (prev != nullptr) WritePendingBlock(*prev, *prev_out, begin, end);
    sum_s1.AddBlock(acc);
    sum_w.AddBlock(acc_w);
  }
  if (prev != nullptr) prev_out->Finish();
  return {sum_s1.total, sum_w.total};
}

// The student gradient of a Renyi row from the cached u = w - q: w^ - q = e^-L (u - q expm1(L)),
// the softmax chain rule with sum u = expm1(L) (exact when w^ is close to q: no cancellation
// beyond that of u, whose error is a few ulp of itself).
void RenyiRowGradCached(const RowOutput& grad_s, int64_t v, const float* HWY_RESTRICT wq,
                        const float* HWY_RESTRICT es, float inv_zs, int64_t row, double scale,
                        double log_sum_w, float* HWY_RESTRICT scratch) {
  WriteChainRuleGrad(grad_s, row, v, wq, es, inv_zs, static_cast<float>(std::expm1(log_sum_w)),
                     static_cast<float>(-scale * std::exp(-log_sum_w)), scratch);
}

// The gradients of a Renyi row from L = log sum w, the max of log w, log_rel = log sum exp(log w
// - max) and whether D is near 0 (the row's whole-vocabulary values).
void RenyiRowGrad(const Renyi& div, const RowBuffers& b, const Normalizers& n, int64_t v,
                  const RowOutput* grad_s, const RowOutput* grad_t, int64_t row, double scale,
                  double log_sum_w, float amax, double log_rel, bool near_zero,
                  float* HWY_RESTRICT scratch) {
  const DF df;
  const float alpha = div.alpha;
  // w^ - base, base = q (c = alpha) or p (c = alpha - 1). Near D = 0: base expm1(c lr - L),
  // exact when w^ is close to base. Otherwise the softmax of the same log w that L summed,
  // exp((log w - amax) - log_rel), so that the w^ stay consistent with their normalization.
  const VF vl = hn::Set(df, static_cast<float>(log_sum_w));
  const VF vrel = hn::Set(df, static_cast<float>(log_rel));
  const VF vamax = hn::Set(df, amax);
  auto w_hat_minus = [&](const Entry<VF>& e, VF base, float c) {
    auto softmax = [&] {
      return hn::Sub(ExpOrInfFast(df, hn::Sub(hn::Sub(RenyiLogW(div, e), vamax), vrel)), base);
    };
    if (!near_zero) return softmax();
    const VF x = hn::MulSub(hn::Set(df, c), e.lr, vl);
    const auto stable = hn::And(hn::Gt(base, hn::Zero(df)), hn::Lt(hn::Abs(x), hn::Set(df, 60.0f)));
    const VF via_expm1 = hn::Mul(base, Expm1OrInfFast(df, hn::IfThenElseZero(stable, x)));
    if (hn::AllTrue(df, stable)) return via_expm1;  // the exp only for vectors that need it
    return hn::IfThenElse(stable, via_expm1, softmax());
  };
  if (grad_s != nullptr) {
    const VF k = hn::Set(df, static_cast<float>(-scale));
    WriteGradRow(
        *grad_s, row, v,
        [&](int64_t j) {
          const Entry<VF> e = LoadEntry(b.LogitsS(), b.es, b.LogitsT(), b.et, n, j);
          return hn::Mul(k, w_hat_minus(e, e.q, alpha));
        },
        scratch);
  }
  if (grad_t != nullptr) {
    const VF k = hn::Set(df, static_cast<float>(scale * alpha / (alpha - 1.0)));
    WriteGradRow(
        *grad_t, row, v,
        [&](int64_t j) {
          const Entry<VF> e = LoadEntry(b.LogitsS(), b.es, b.LogitsT(), b.et, n, j);
          return hn::Mul(k, w_hat_minus(e, e.p, alpha - 1.0f));
        },
        scratch);
  }
}

// Renyi rows, in log space: D = L / (alpha - 1) with L = log sum_j w_j, w_j = exp(a_j),
// a_j = lq_j + alpha lr_j, so that sums far below or above fp32's range stay finite. Near
// D = 0, L = log1p(S) with the cancellation-free S = sum (w - mix) of the Renyi struct. The
// gradients use the normalized w^_j = exp(a_j - L) <= 1:
//   dD/ds_j = -(w^_j - q_j) / T,   dD/dt_j = alpha / (alpha - 1) (w^_j - p_j) / T,
// with w^ - q = q expm1(alpha lr - L) and w^ - p = p expm1((alpha - 1) lr - L) where those
// arguments are moderate (exact when w^ is close to q or p). Returns the row value.
double RenyiRow(const Renyi& div, const RowBuffers& b, const Normalizers& n, int64_t v,
                const RowOutput* grad_s, const RowOutput* grad_t, int64_t row, double scale,
                float* HWY_RESTRICT scratch, float* HWY_RESTRICT wq,
                const PendingGrad* prev = nullptr, PendingGrad* next = nullptr) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  // u = w - q is kept only for the student gradient alone (RenyiRowGradCached); the sums, and
  // so the value, are the same in every mode.
  const bool cache = grad_s != nullptr && grad_t == nullptr;
  // With `next` (the student gradient alone, as SumRow's): the previous row's pending gradient is
  // written during the first sweep, and this row's cached one is left in `next`.
  RenyiCachedSums c;
  if (cache && prev != nullptr && prev->row >= 0) {
    GradRowWriter w(*grad_s, prev->row, v, scratch);
    c = RenyiRowSumsCached<true>(div, b, n, wq, prev, &w);
  } else {
    c = cache ? RenyiRowSumsCached<true>(div, b, n, wq)
              : RenyiRowSumsCached<false>(div, b, n, nullptr);
  }
  if (c.sum_w >= kCachedMin && c.sum_w <= std::exp(kCachedRange)) {
    const bool near_zero = std::fabs(c.s1) < 0.5;
    const double log_sum_w = near_zero ? std::log1p(c.s1) : std::log(c.sum_w);
    const double value = log_sum_w / (static_cast<double>(div.alpha) - 1.0);
    if (!(std::fabs(value) <= std::numeric_limits<float>::max()) ||
        (grad_s == nullptr && grad_t == nullptr))
      return value;
    // e^-L (u - q expm1(L)) carries u's and q's rounding times e^-L: kept where e^-L <= 2.
    // Beyond (alpha < 1 and D > log 2 / (1 - alpha)), and for the teacher gradient, w^ - q (and
    // w^ - p) with w^ = exp(log w - L), each w^ relatively accurate (no second sweep: the
    // unshifted sum is the normalizer).
    if (cache && log_sum_w >= -kLn2 && next != nullptr)
      *next = {row,
               wq,
               b.es,
               hn::GetLane(n.inv_zs),
               static_cast<float>(std::expm1(log_sum_w)),
               static_cast<float>(-scale * std::exp(-log_sum_w))};
    else if (cache && log_sum_w >= -kLn2)
      RenyiRowGradCached(*grad_s, v, wq, b.es, hn::GetLane(n.inv_zs), row, scale, log_sum_w,
                         scratch);
    else
      RenyiRowGrad(div, b, n, v, grad_s, grad_t, row, scale, log_sum_w, /*amax=*/0.0f,
                   /*log_rel=*/std::log(c.sum_w), near_zero, scratch);
    return value;
  }
  const RenyiSums sums = RenyiRowSums(div, b, n, /*one_pass=*/true);
  const float amax = static_cast<float>(sums.amax);  // the shift of sum_w
  if (!(amax < kInf) || amax == -kInf) return std::numeric_limits<double>::infinity();
  const bool near_zero = std::fabs(sums.s1) < 0.5;  // sum w in (0.5, 1.5): D is small
  const double log_rel = std::log(sums.sum_w);
  const double log_sum_w = near_zero ? std::log1p(sums.s1) : amax + log_rel;
  const double value = log_sum_w / (static_cast<double>(div.alpha) - 1.0);
  if (!(std::fabs(value) <= std::numeric_limits<float>::max()) ||
      (grad_s == nullptr && grad_t == nullptr))
    return value;
  RenyiRowGrad(div, b, n, v, grad_s, grad_t, row, scale, log_sum_w, amax, log_rel, near_zero,
               scratch);
  return value;
}

// The per-core L2 as the system reports it (512 KiB, a small one, if it does not say).
size_t l2_cache_bytes() {
  static const size_t bytes = [] {
#if defined(__linux__) && defined(_SC_LEVEL2_CACHE_SIZE)
    const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
    if (l2 > 0) return static_cast<size_t>(l2);
#endif
    return size_t{512} << 10;
  }();
  return bytes;
}

// Below this many logits per call (student rows x V) the kernel stays single-threaded.
constexpr int64_t kMinParallelEntries = 1 << 16;

// One row of a vocabulary-sharded run (see row_job.h): the shard's statistics, partial sums,
// or gradients under the global normalizers.
template <class Div>
void ShardRow(RowJob& job, const Div& div, int64_t i, const RowSoftmax& ls, const RowSoftmax& lt,
              const RowBuffers& buf, float* HWY_RESTRICT scratch) {
  const DF df;
  if (job.shard == detail::ShardMode::stats) {
    double* o = job.out_stats + 4 * i;
    o[0] = ls.max, o[1] = ls.log_sum, o[2] = lt.max, o[3] = lt.log_sum;
    return;
  }
  const float inv_t = 1.0f / job.spec.temperature;
  const double* g = job.in_norm + 4 * i;
  // es / et were exponentiated against the shard's max; rescale them to the global max and
  // normalizer: q = es * exp((max_local - max_global) / T - log_sum_global).
  auto inv_z = [&](float local_max, double gmax, double glog_sum) {
    if (local_max == -std::numeric_limits<float>::infinity()) return 0.0f;
    return static_cast<float>(std::exp((double(local_max) - gmax) * inv_t - glog_sum));
  };
  const Normalizers norm{hn::Set(df, static_cast<float>(g[0])),
                         hn::Set(df, static_cast<float>(g[2])),
                         hn::Set(df, static_cast<float>(g[1])),
                         hn::Set(df, static_cast<float>(g[3])),
                         hn::Set(df, inv_z(ls.max, g[0], g[1])),
                         hn::Set(df, inv_z(lt.max, g[2], g[3])),
                         hn::Set(df, inv_t),
                         hn::Set(df, static_cast<float>(g[3] - g[1]))};
  const double t2 =
      job.spec.scale_by_t_squared ? double(job.spec.temperature) * job.spec.temperature : 1.0;
  const double scale =
      job.shard == detail::ShardMode::grad ? t2 * job.grad_scale[i] / job.spec.temperature : 0.0;
  const RowOutput* gs = job.grad_student.data ? &job.grad_student : nullptr;
  const RowOutput* gt = job.grad_teacher.data ? &job.grad_teacher : nullptr;
  if constexpr (std::is_same_v<Div, Renyi>) {
    if (job.shard == detail::ShardMode::sums) {
      const RenyiSums r = RenyiRowSums(div, buf, norm);
      double* o = job.out_sums + 4 * i;
      o[0] = r.s1, o[1] = r.amax, o[2] = r.sum_w, o[3] = 0.0;
    } else {
      const double* in = job.in_sums + 4 * i;
      RenyiRowGrad(div, buf, norm, job.v, gs, gt, i, scale, in[0], static_cast<float>(in[1]), in[2],
                   in[3] != 0.0, scratch);
    }
  } else {
    RowSum sum_g, sum_u, sum_v;
    const bool teacher = job.shard == detail::ShardMode::sums || gt != nullptr;
    if (teacher) SumTerms<true>(div, buf, norm, sum_g, sum_u, sum_v);
    else SumTerms<false>(div, buf, norm, sum_g, sum_u, sum_v);
    if (job.shard == detail::ShardMode::sums) {
      double* o = job.out_sums + 4 * i;
      o[0] = sum_g.total, o[1] = sum_u.total, o[2] = sum_v.total, o[3] = 0.0;
      return;
    }
    const double* in = job.in_sums + 4 * i;
    const float k = static_cast<float>(scale);
    const float izs = hn::GetLane(norm.inv_zs), izt = hn::GetLane(norm.inv_zt);
    if (gs != nullptr) {
      if constexpr (Div::kStudentFactorIsMinusP)
        WriteMinusPGrad(*gs, i, job.v, buf.es, izs, buf.et, izt, k, scratch);
      else
        WriteChainRuleGrad(*gs, i, job.v, buf.URow(teacher), buf.es, izs, static_cast<float>(in[1]),
                           k, scratch);
    }
    if (gt != nullptr)
      WriteChainRuleGrad(*gt, i, job.v, buf.xt, buf.et, izt, static_cast<float>(in[2]), k, scratch);
  }
}

template <class Div>
void RunRows(RowJob& job, const Div& div) {
  const DF df;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(df));
  const int64_t n = job.n, v = job.v;
  const int64_t vpad = (v + lanes - 1) / lanes * lanes;
  const float temperature = job.spec.temperature;
  const float inv_t = 1.0f / temperature;
  const bool want_s = job.grad_student.data != nullptr;
  const bool want_t = job.grad_teacher.data != nullptr;
  const double t2 = job.spec.scale_by_t_squared ? double(temperature) * temperature : 1.0;

  BadRowSlots bad_s, bad_t;
  // Pass 1 waits on memory and the later passes on arithmetic over the block; asking for the
  // next row's logits during pass 2 (Renyi: its first sweep) overlaps the two, where the block and
  // that row fit in 3/4 of L2 (beyond, the prefetched lines evict the block and it costs more than
  // it saves). Renyi's block with its fifth row (the cached w - q), measured: within the whole L2
  // the prefetch still gains (V = 32000, 1 MiB L2: 0.87-0.89x its CPU time without).
  const size_t es_bytes = dtype_size(job.student.dtype);
  const bool prefetch =
      job.shard == detail::ShardMode::none && !job.check_only &&
      job.student.dtype == job.teacher.dtype && es_bytes <= 4 &&
      static_cast<size_t>(vpad) *
              ((std::is_same_v<Div, Renyi> && want_s && !want_t ? 5 : 4) * sizeof(float) +
               2 * es_bytes) <=
          (std::is_same_v<Div, Renyi> ? l2_cache_bytes() : l2_cache_bytes() / 4 * 3);

  // Where the row block (xs, es, xt, et) is larger than L2, the later passes would read it back
  // from L3 anyway: fp32 inputs of whole vectors are then not copied into xs / xt, and the terms
  // sweep reads the logits from the input rows (also in L3), which saves pass 1 two stores per
  // vector and the block's write-back. (The shard routines read xs / xt: not there. Renyi with
  // the teacher gradient reads the student logits after the student gradient is written, which
  // may be in place: not there either.)
  const bool read_inputs =
      !(std::is_same_v<Div, Renyi> && want_t) && job.shard == detail::ShardMode::none &&
      !job.check_only && job.student.dtype == DType::f32 && job.teacher.dtype == DType::f32 &&
      v == vpad && static_cast<size_t>(vpad) * 4 * sizeof(float) > l2_cache_bytes();

  // The deferred pass 3: where the logits are read from the inputs (the block is larger than L2)
  // and the student gradient alone is asked of a chain-rule kind, a row's pass 3 (reading u and
  // es from L3, streaming the gradient to memory: bound by the stores) is run inside the next
  // row's terms sweep (bound by the arithmetic), so that the two overlap as forward KL's fused
  // sweep does. Two blocks of (es, et) alternate, the second in xs / xt (free in this mode: u
  // overwrites et). The same values in the same rows: only the time of the writes moves.
  // Renyi likewise with its cached w - q (RenyiRowGradCached), the second block in two more rows.
  bool defer = false;
  if constexpr (std::is_base_of_v<SumFinish, Div>)
    defer = !Div::kStudentFactorIsMinusP && read_inputs && want_s && !want_t;
  else if constexpr (std::is_same_v<Div, Renyi>) defer = read_inputs && want_s && !want_t;

  // Small problems run on the calling thread: waking a team costs more than the work.
  const bool parallel = job.num_threads > 1 && n > 1 && n * vpad >= kMinParallelEntries;
#pragma omp parallel num_threads(job.num_threads) if (parallel)
  {
    // The row block: xs, es, xt, et (and a scratch row for non-fp32 gradient output).
    // Renyi with the student gradient only: its cached w - q, in xs where the logits are read
    // from the inputs (xs is free then), else in one more row.
    const bool renyi_row = std::is_same_v<Div, Renyi> && want_s && !want_t && !read_inputs;
    const int64_t nbuf = (want_s || want_t) ? 5 : 4;
    const int64_t nblocks = vpad / (kRowSumBlock * lanes) + 1;
    const bool renyi_defer = std::is_same_v<Div, Renyi> && defer;
    const int64_t nextra = renyi_row ? 1 : renyi_defer ? 2 : 0;
    hwy::AlignedFreeUniquePtr<float[]> block =
        hwy::AllocateAligned<float>(static_cast<size_t>((nbuf + nextra) * vpad + nblocks));
    float* xs = block.get();
    float* es = xs + vpad;
    float* xt = es + vpad;
    float* et = xt + vpad;
    float* scratch = nbuf >= 5 ? et + vpad : nullptr;
    float* wq = renyi_row ? xs + nbuf * vpad : xs;
    float* block_max = xs + (nbuf + nextra) * vpad;
    // The deferred pass 3's second block: es, et (and Renyi's w - q) of every other row.
    float* es_alt = renyi_defer ? xs + nbuf * vpad : xs;
    float* et_alt = renyi_defer ? es_alt + vpad : xt;
    float* wq_alt = xt;
    PendingGrad pending;  // this thread's row whose gradient is still to be written (defer)

#pragma omp for schedule(static) nowait
    for (int64_t i = 0; i < n; ++i) {
      if (job.active != nullptr && !job.active[i]) {
        if (!job.check_only) {
          job.row_loss[i] = 0.0;
          ZeroRow(job.grad_student, i, v);
          ZeroRow(job.grad_teacher, i, v);
        }
        continue;
      }
      if (job.check_only) {
        const RowScan cs = ScanRow(job.student, i, v);
        const RowScan ct = ScanRow(job.teacher, i, v);
        if (cs.non_finite) bad_s.NonFinite(i);
        else if (cs.all_masked) bad_s.NoMass(i);
        if (ct.non_finite) bad_t.NonFinite(i);
        else if (ct.all_masked) bad_t.NoMass(i);
        continue;
      }
      // With a row pending in (es, et), this row takes the other block.
      const bool alt = pending.row >= 0 && pending.es == es;
      float* esi = alt ? es_alt : es;
      float* eti = alt ? et_alt : et;
      const RowSoftmax ls =
          LoadSoftmaxRow(job.student, i, v, vpad, inv_t, xs, esi, block_max, !read_inputs);
      const RowSoftmax lt =
          LoadSoftmaxRow(job.teacher, i, v, vpad, inv_t, xt, eti, block_max, !read_inputs);
      if (job.shard != detail::ShardMode::none) {
        if (ls.non_finite) bad_s.NonFinite(i);
        if (lt.non_finite) bad_t.NonFinite(i);
        if (ls.non_finite || lt.non_finite) continue;
        ShardRow(job, div, i, ls, lt, {xs, es, xt, et, vpad}, scratch);
        continue;
      }
      bool skip = false;
      if (ls.non_finite) bad_s.NonFinite(i), skip = true;
      if (lt.non_finite) bad_t.NonFinite(i), skip = true;
      if (!ls.non_finite && ls.max == -std::numeric_limits<float>::infinity())
        bad_s.NoMass(i), skip = true;
      if (!lt.non_finite && lt.max == -std::numeric_limits<float>::infinity())
        bad_t.NoMass(i), skip = true;
      if (skip) continue;

      const float inv_zs = static_cast<float>(std::exp(-ls.log_sum));  // 1 / sum es
      const float inv_zt = static_cast<float>(std::exp(-lt.log_sum));
      RowBuffers buf{xs, esi, xt, eti, vpad};
      if (read_inputs) {
        buf.ls = static_cast<const float*>(job.student.data) + i * job.student.row_stride;
        buf.lt = static_cast<const float*>(job.teacher.data) + i * job.teacher.row_stride;
      }
      if (prefetch && i + 1 < n) {
        buf.next_s = static_cast<const char*>(job.student.data) +
                     (i + 1) * job.student.row_stride * static_cast<int64_t>(es_bytes);
        buf.next_t = static_cast<const char*>(job.teacher.data) +
                     (i + 1) * job.teacher.row_stride * static_cast<int64_t>(es_bytes);
        buf.elem_bytes = static_cast<int64_t>(es_bytes);
      }
      const Normalizers norm{hn::Set(df, ls.max),
                             hn::Set(df, lt.max),
                             hn::Set(df, static_cast<float>(ls.log_sum)),
                             hn::Set(df, static_cast<float>(lt.log_sum)),
                             hn::Set(df, inv_zs),
                             hn::Set(df, inv_zt),
                             hn::Set(df, inv_t),
                             hn::Set(df, static_cast<float>(lt.log_sum - ls.log_sum))};
      // d(reduced loss)/d(row value) / T.
      const double scale = t2 * job.grad_scale[i] / temperature;
      const RowOutput* gs = want_s ? &job.grad_student : nullptr;
      const RowOutput* gt = want_t ? &job.grad_teacher : nullptr;
      double value;
      if constexpr (std::is_same_v<Div, Renyi>) {
        if (defer) {
          PendingGrad next;
          value = RenyiRow(div, buf, norm, v, gs, gt, i, scale, scratch, alt ? wq_alt : wq,
                           &pending, &next);
          pending = next;  // the previous one was written by the first sweep
        } else {
          value = RenyiRow(div, buf, norm, v, gs, gt, i, scale, scratch, wq);
        }
      } else if (defer) {
        PendingGrad next;
        value = SumRow(div, buf, norm, v, gs, gt, i, scale, scratch, &pending, &next);
        pending = next;  // the previous one was written by the terms sweep
      } else {
        value = SumRow(div, buf, norm, v, gs, gt, i, scale, scratch);
      }
      // A token whose divergence (or gradient) is infinite or beyond fp32's range gets loss +inf
      // and no gradient: the direction is undefined.
      if (std::isnan(value) || !(std::fabs(value) <= std::numeric_limits<float>::max())) {
        job.row_loss[i] = std::numeric_limits<double>::infinity();
        ZeroRow(job.grad_student, i, v);
        ZeroRow(job.grad_teacher, i, v);
      } else {
        job.row_loss[i] = value;
      }
    }
    if (pending.row >= 0)
      WriteChainRuleGrad(job.grad_student, pending.row, v, pending.u, pending.es, pending.inv_z,
                         pending.sum_u, pending.scale, scratch);
  }
  job.bad_student = bad_s.Get();
  job.bad_teacher = bad_t.Get();
}

// Whether the alpha divergence's and Renyi's power-mean table pays for this call. A vector with
// a lane outside the table's range (|log(p / q)| >= kPowTableRange) takes MixMinusPowerMean inside
// the table's loop, which is slower than the loop without the table; rows whose log-ratios are
// wide (a student far from its teacher, or logits shifted apart) run faster without it. Sampled on
// the first counted row: the table is taken when at least half of its 16-entry groups are in range.
// The choice depends on the inputs only, not on the threads.
bool PowerTablePays(const RowJob& job) {
  int64_t r = 0;
  if (job.active != nullptr)
    while (r < job.n && job.active[r] == 0) ++r;
  if (r >= job.n || job.v == 0 || job.check_only) return false;
  const int64_t v = job.v;
  const float inv_t = 1.0f / job.spec.temperature;
  auto at = [&](const RowInput& in, int64_t j) {
    return elem::load_f32(in.data, in.dtype, r * in.row_stride + j) * inv_t;
  };
  auto log_softmax_shift = [&](const RowInput& in) {  // the row's lse, NaN without one
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < v; ++j) m = std::max(m, at(in, j));
    if (!std::isfinite(m)) return std::numeric_limits<double>::quiet_NaN();
    double sum = 0.0;
    for (int64_t j = 0; j < v; ++j) sum += std::exp(at(in, j) - m);
    return m + std::log(sum);
  };
  const double ls = log_softmax_shift(job.student), lt = log_softmax_shift(job.teacher);
  if (!std::isfinite(ls) || !std::isfinite(lt)) return false;
  constexpr int64_t kGroup = 16;
  int64_t groups = 0, in_range = 0;
  for (int64_t j0 = 0; j0 < v; j0 += kGroup, ++groups) {
    bool all = true;
    for (int64_t j = j0; j < std::min(v, j0 + kGroup) && all; ++j)
      all = std::abs((at(job.teacher, j) - lt) - (at(job.student, j) - ls)) < defs::kPowTableRange;
    in_range += all ? 1 : 0;
  }
  return 2 * in_range >= groups;
}

}  // namespace

void RunDivergenceRows(detail::RowJob& job) {
  VisitDivergence(job.spec, [&](const auto& div) {
    using Div = std::decay_t<decltype(div)>;
    if constexpr (div_ops::kHaveMixLogTable &&
                  (std::is_same_v<Div, SkewForwardKL> || std::is_same_v<Div, SkewReverseKL> ||
                   std::is_same_v<Div, GeneralizedJSD>)) {
      // skew KL's and jsd's log of the mixture from per-parameter polynomials
      // (TimesLogRatioToMixture, GeneralizedJSD::term). The table depends on the parameter alone:
      // the calling thread keeps the last one, so that a training loop fits it once (the row
      // workers only read it while this call runs).
      struct MixLogCache {
        float param = std::numeric_limits<float>::quiet_NaN();  // no table yet
        alignas(64) float table[32 * (div_ops::kMixLogDegree + 1)];
      };
      static thread_local MixLogCache cache;
      float param;
      if constexpr (std::is_same_v<Div, GeneralizedJSD>) param = div.beta;
      else param = div.alpha;
      if (!(cache.param == param)) {
        // jsd's F = log(m / q) is the mixture log of a = 1 - beta (m = (1 - beta) q + beta p).
        BuildMixLogTable(std::is_same_v<Div, GeneralizedJSD> ? 1.0 - static_cast<double>(param)
                                                             : static_cast<double>(param),
                         cache.table);
        cache.param = param;
      }
      Div with_table = div;
      with_table.table = cache.table;
      RunRows(job, with_table);
    } else if constexpr (div_ops::kHaveMixLogTable &&
                         (std::is_same_v<Div, AlphaDivergence> || std::is_same_v<Div, Renyi>)) {
      // The alpha divergence's and Renyi's power-mean quantities from per-alpha polynomials
      // (PowerTableApplies) for alpha in [-1, 2], where the table's degree holds its accuracy,
      // except alpha = 1/2, whose one expm1 per entry (MixMinusPowerMean) measured cheaper than
      // the table. Cached per thread as skew KL's.
      const float a = div.alpha;
      if (a == 0.5f || !(a >= -1.0f && a <= 2.0f) || !PowerTablePays(job)) return RunRows(job, div);
      constexpr bool kAlpha = std::is_same_v<Div, AlphaDivergence>;
      struct PowCache {
        float alpha = std::numeric_limits<float>::quiet_NaN();  // no table yet
        alignas(64) float table[3 * div_ops::kPowIntervals * (div_ops::kPowDegree + 1)];
      };
      static thread_local PowCache cache;
      if (!(cache.alpha == a)) {
        const double ad = a;
        if (kAlpha)
          BuildPowerTable(ad, 1.0 / (ad * (1.0 - ad)), -1.0 / ad, -1.0 / (1.0 - ad),
                          div_ops::kPowIntervals, cache.table);
        else
          BuildPowerTable(ad, -1.0, 1.0, 1.0, a > 0.5f ? Renyi::kFarK : div_ops::kPowIntervals,
                          cache.table);
        cache.alpha = a;
      }
      if constexpr (kAlpha) {
        RunRows(job, AlphaDivergenceTable(div, cache.table));
      } else {
        Div with_table = div;
        with_table.table = cache.table;
        RunRows(job, with_table);
      }
    } else {
      RunRows(job, div);
    }
  });
}

}  // namespace HWY_NAMESPACE
}  // namespace divkit
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace divkit {
HWY_EXPORT(RunDivergenceRows);
namespace {
// A gradient buffer that is not one of the inputs (fresh from the caller's allocator, untouched):
// huge pages for its first write.
void advise_output(const detail::RowOutput& out, const detail::RowJob& job) {
  if (out.data == nullptr || out.data == job.student.data || out.data == job.teacher.data) return;
  const size_t es = dtype_size(out.dtype);
  detail::advise_huge_pages(out.data,
                            static_cast<size_t>((job.n - 1) * out.row_stride + job.v) * es);
}
}  // namespace

void detail::run_divergence_rows(RowJob& job) {
  if (!job.check_only && job.n > 0) {
    advise_output(job.grad_student, job);
    advise_output(job.grad_teacher, job);
  }
  HWY_DYNAMIC_DISPATCH(RunDivergenceRows)(job);
}
}  // namespace divkit
#endif
