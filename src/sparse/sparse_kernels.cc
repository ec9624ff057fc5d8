// Row kernels of the sparse and truncated teachers: one token (row) of student logits and its
// teacher's k entries -> the divergence over the k (renormalize) or k + 1 (bucket) entries and
// the gradient w.r.t. every student logit. Compiled once per SIMD target (Highway
// foreach_target) and chosen at run time. The divergences themselves are the structs of
// divergence/divergences-inl.h, applied to the bucket vectors.
//
// Per row, with a per-thread row block:
//   1. the student row (any dtype) into the fp32 buffer x, with its max and a NaN/+inf check;
//   2. the teacher's k entries: given (indices, logprobs) or the top-k of the teacher's logits
//      (topk_divergence, a heap over the row: larger logit first, then lower index);
//   3. bucket: the k student logits are gathered and masked to -inf in x, then
//      e = exp((x - max) / T) over the row gives the tail sum Z_tail directly (no cancellation
//      in 1 - sum q_b), and Z = Z_tail + sum_b exp((x_b - max) / T);
//      renormalize: only the k gathered logits, normalized among themselves;
//   4. p, q, log p, log q, log(p / q) per bucket in fp64 (k is small), rounded to fp32 vectors,
//      and the struct's terms g_b and student factors u_b = q_b dg/dq_b, summed in fp64 in
//      bucket order;
//   5. the gradient by the chain rule through the softmax, U = sum_b u_b:
//        dL/ds_{i_b} = (u_b - q_b U) / T                           (the k entries)
//        dL/ds_j     = e_j (u_tail / Z_tail - U / Z) / T            (tail entries, bucket only)
//      and 0 outside the k entries in renormalize mode.
// Row sums use a fixed order, so results do not depend on the thread count.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "core/element.h"
#include "core/scalar_math.h"
#include "hwy/aligned_allocator.h"
#include "sparse/sparse_job.h"

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "sparse/sparse_kernels.cc"
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
using detail::RowOutput;
using detail::SparseJob;
using DF = hn::ScalableTag<float>;
using VF = hn::Vec<DF>;

constexpr float kInfF = std::numeric_limits<float>::infinity();
constexpr double kInf = std::numeric_limits<double>::infinity();

// The k largest entries of x[0, v) (larger value first, then lower index: a strict total order,
// so ties are broken deterministically), returned in idx sorted by index.
void SelectTopK(const float* HWY_RESTRICT x, int64_t v, int64_t k,
                std::vector<std::pair<float, int64_t>>& heap, int64_t* idx) {
  // better(a, b): a ranks before b. With it as the heap's "less", the top is the worst kept.
  auto better = [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  heap.clear();
  for (int64_t j = 0; j < k; ++j) heap.emplace_back(x[j], j);
  std::make_heap(heap.begin(), heap.end(), better);
  for (int64_t j = k; j < v; ++j) {
    // A later index never wins a tie against a kept entry: strictly greater only.
    if (!(x[j] > heap.front().first)) continue;
    std::pop_heap(heap.begin(), heap.end(), better);
    heap.back() = {x[j], j};
    std::push_heap(heap.begin(), heap.end(), better);
  }
  for (int64_t b = 0; b < k; ++b) idx[b] = heap[b].second;
  std::sort(idx, idx + k);
}

// Per-thread scratch.
struct Scratch {
  hwy::AlignedFreeUniquePtr<float[]> rows;     // x, e, xt: 3 * vpad
  hwy::AlignedFreeUniquePtr<float[]> buckets;  // p, q, lp, lq, lr, g, u: 7 * kpad
  std::vector<double> lpd, lqd, qd;            // per bucket, fp64
  std::vector<int64_t> idx;
  std::vector<float> xk;
  std::vector<std::pair<float, int64_t>> heap;
};

// The divergence over nb buckets given in fp64; fills u (the student factors, fp64) and returns
// the row value (+inf where it is infinite or beyond fp32's range; NaN when the gradient would
// overflow fp32).
template <class Div>
double BucketDivergence(const Div& div, int64_t nb, int64_t kpad, Scratch& s, double* u_out,
                        double& sum_u) {
  const DF df;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(df));
  float* P = s.buckets.get();
  float* Q = P + kpad;
  float* LP = Q + kpad;
  float* LQ = LP + kpad;
  float* LR = LQ + kpad;
  float* G = LR + kpad;
  float* U = G + kpad;
  for (int64_t b = 0; b < kpad; ++b) {
    if (b < nb) {
      P[b] = static_cast<float>(std::exp(s.lpd[b]));
      Q[b] = static_cast<float>(s.qd[b]);
      LP[b] = static_cast<float>(s.lpd[b]);
      LQ[b] = static_cast<float>(s.lqd[b]);
      LR[b] = static_cast<float>(s.lpd[b] - s.lqd[b]);  // NaN where both are -inf, as divergence()
    } else {  // padding: masked in both, the structs give exactly 0
      P[b] = Q[b] = 0.0f;
      LP[b] = LQ[b] = -kInfF;
      LR[b] = std::numeric_limits<float>::quiet_NaN();
    }
  }
  constexpr double kMax = std::numeric_limits<float>::max();
  if constexpr (std::is_same_v<Div, Renyi>) {
    // log(sum_b p_b^alpha q_b^(1-alpha)) / (alpha - 1) in log space, as divergence()'s RenyiRow;
    // near D = 0 the log of the sum is log1p(S) with the struct's cancellation-free
    // S = sum_b (w_b - alpha p_b - (1 - alpha) q_b). u_b = -w_b / sum w.
    const double alpha = div.alpha;
    std::vector<double>& logw = s.lpd;  // reused in place: lp is not needed afterwards
    double amax = -kInf;
    for (int64_t b = 0; b < nb; ++b) {
      double lw;
      if (s.lqd[b] == -kInf) lw = (alpha > 1.0 && s.lpd[b] > -kInf) ? kInf : -kInf;
      else lw = s.lqd[b] + alpha * (s.lpd[b] - s.lqd[b]);
      logw[b] = lw;
      amax = std::max(amax, lw);
    }
    if (!(amax < kInf) || amax == -kInf) return kInf;
    double s1 = 0.0;
    for (int64_t b = 0; b < kpad; b += lanes) {
      Entry<VF> e{hn::Load(df, P + b), hn::Load(df, Q + b), hn::Load(df, LP + b),
                  hn::Load(df, LQ + b), hn::Load(df, LR + b)};
      hn::Store(div.term(df, e), df, G + b);
    }
    for (int64_t b = 0; b < nb; ++b) s1 += G[b];
    double sum_w = 0.0;
    for (int64_t b = 0; b < nb; ++b) sum_w += std::exp(logw[b] - amax);
    const double log_sum_w = std::fabs(s1) < 0.5 ? std::log1p(s1) : amax + std::log(sum_w);
    const double value = log_sum_w / (alpha - 1.0);
    if (!(std::fabs(value) <= kMax)) return kInf;
    sum_u = 0.0;
    for (int64_t b = 0; b < nb; ++b) {
      u_out[b] = -std::exp(logw[b] - log_sum_w);
      sum_u += u_out[b];
    }
    return value;
  } else {
    for (int64_t b = 0; b < kpad; b += lanes) {
      Entry<VF> e{hn::Load(df, P + b), hn::Load(df, Q + b), hn::Load(df, LP + b),
                  hn::Load(df, LQ + b), hn::Load(df, LR + b)};
      VF u;
      hn::Store(div.term(df, e, u), df, G + b);
      hn::Store(u, df, U + b);
    }
    double value = 0.0;
    sum_u = 0.0;
    for (int64_t b = 0; b < nb; ++b) {
      value += G[b];
      u_out[b] = U[b];
      sum_u += U[b];
    }
    if (!(std::fabs(value) <= kMax)) return kInf;
    if (!(std::fabs(sum_u) <= kMax)) return std::numeric_limits<double>::quiet_NaN();
    return value;
  }
}

// Below this many logits per call (rows x V) the kernel stays single-threaded.
constexpr int64_t kMinParallelEntries = 1 << 16;

template <class Div>
void RunRows(SparseJob& job, const Div& div) {
  const DF df;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(df));
  const int64_t n = job.n, v = job.v, k = job.k;
  const int64_t vpad = (v + lanes - 1) / lanes * lanes;
  const int64_t kpad = (k + 1 + lanes - 1) / lanes * lanes;
  const double temperature = job.spec.temperature;
  const float inv_t = 1.0f / job.spec.temperature;
  const bool topk = job.teacher.data != nullptr;
  // The tail bucket exists only when there is a tail: with k = V bucket is renormalize.
  const bool has_tail = !topk && job.tail == SparseTail::bucket && k < v;
  const bool want_grad = job.grad_student.data != nullptr && !job.check_only;
  const double t2 = job.spec.scale_by_t_squared ? temperature * temperature : 1.0;

  BadRowSlots bad_s, bad_t;
  const bool parallel = job.num_threads > 1 && n > 1 && n * vpad >= kMinParallelEntries;
#pragma omp parallel num_threads(job.num_threads) if (parallel)
  {
    Scratch s;
    s.rows = hwy::AllocateAligned<float>(static_cast<size_t>(3 * vpad));
    s.buckets = hwy::AllocateAligned<float>(static_cast<size_t>(7 * kpad));
    s.lpd.resize(k + 1);
    s.lqd.resize(k + 1);
    s.qd.resize(k + 1);
    s.idx.resize(k);
    s.xk.resize(k);
    std::vector<double> u(k + 1);
    float* x = s.rows.get();
    float* e = x + vpad;
    float* xt = e + vpad;

#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      if (job.active != nullptr && !job.active[i]) {
        if (!job.check_only) {
          job.row_loss[i] = 0.0;
          ZeroRow(job.grad_student, i, v);
        }
        continue;
      }
      const RowLoad ls = LoadRow(job.student, i, v, vpad, x);
      if (ls.non_finite) {
        bad_s.NonFinite(i);
        continue;
      }
      if (ls.max == -kInfF) {
        bad_s.NoMass(i);
        continue;
      }

      // The teacher's k entries: log-probabilities (up to a constant when renormalized).
      if (topk) {
        const RowLoad lt = LoadRow(job.teacher, i, v, vpad, xt);
        if (lt.non_finite) {
          bad_t.NonFinite(i);
          continue;
        }
        if (lt.max == -kInfF) {
          bad_t.NoMass(i);
          continue;
        }
        SelectTopK(xt, v, k, s.heap, s.idx.data());
        for (int64_t b = 0; b < k; ++b)
          s.lpd[b] = (static_cast<double>(xt[s.idx[b]]) - lt.max) / temperature;
      } else {
        for (int64_t b = 0; b < k; ++b) {
          s.idx[b] =
              elem::load_index(job.indices.data, job.indices.dtype, job.indices.offset(i, b));
          s.lpd[b] = elem::load(job.logprobs.data, job.logprobs.dtype, job.logprobs.offset(i, b));
        }
      }
      for (int64_t b = 0; b < k; ++b) s.xk[b] = x[s.idx[b]];

      double lse_p = -kInf;  // log sum_b p_b
      {
        double m = -kInf;
        for (int64_t b = 0; b < k; ++b) m = std::max(m, s.lpd[b]);
        if (m > -kInf) {
          double acc = 0.0;
          for (int64_t b = 0; b < k; ++b) acc += std::exp(s.lpd[b] - m);
          lse_p = m + std::log(acc);
        }
      }

      double z = 0.0, z_tail = 0.0, log_z = 0.0, ref = 0.0;
      // The tail's exps are relative to exp(ref / T) times exp(tail_shift) (0 unless they
      // underflowed relative to the row's max, see below).
      double tail_shift = 0.0;
      if (has_tail) {
        // Mask the k entries, then sum the tail directly.
        for (int64_t b = 0; b < k; ++b) x[s.idx[b]] = -kInfF;
        ref = ls.max;
        const VF scale = hn::Set(df, inv_t);
        const int64_t block_len = kRowSumBlock * lanes;
        auto sum_tail = [&](float max) {
          const VF vm = hn::Set(df, max);
          RowSum tail_sum;
          for (int64_t begin = 0; begin < vpad; begin += block_len) {
            const int64_t end = std::min(begin + block_len, vpad);
            VF acc = hn::Zero(df);
            for (int64_t j = begin; j < end; j += lanes) {
              const VF ej = SoftmaxExp(df, hn::Mul(hn::Sub(hn::Load(df, x + j), vm), scale));
              if (want_grad) hn::Store(ej, df, e + j);
              acc = hn::Add(acc, ej);
            }
            tail_sum.AddBlock(acc);
          }
          return tail_sum.total;
        };
        z_tail = sum_tail(ls.max);
        if (z_tail == 0.0) {
          // Every tail exp underflowed (the k entries hold all but e^-87 T of the student's
          // mass): summed again relative to the tail's own max, the tail bucket keeps its
          // log-probability, and a divergence that is finite (a teacher tail > 0) stays finite.
          float tail_max = -kInfF;
          for (int64_t j = 0; j < v; ++j) tail_max = std::max(tail_max, x[j]);
          if (tail_max > -kInfF) {
            z_tail = sum_tail(tail_max);
            tail_shift = (static_cast<double>(tail_max) - ref) / temperature;
          }
        }
      } else {
        float m = -kInfF;
        for (int64_t b = 0; b < k; ++b) m = std::max(m, s.xk[b]);
        if (m == -kInfF) {
          bad_s.NoMass(i);
          continue;
        }  // no student mass on the k
        ref = m;
      }
      if (job.check_only) continue;

      double z_top = 0.0;
      for (int64_t b = 0; b < k; ++b) {
        s.lqd[b] = (static_cast<double>(s.xk[b]) - ref) / temperature;  // -inf for masked
        z_top += std::exp(s.lqd[b]);
      }
      z = z_top + (tail_shift == 0.0 ? z_tail : z_tail * std::exp(tail_shift));
      log_z = std::log(z);
      for (int64_t b = 0; b < k; ++b) {
        s.lqd[b] -= log_z;
        s.qd[b] = std::exp(s.lqd[b]);
      }
      int64_t nb = k;
      if (has_tail) {
        nb = k + 1;
        s.lqd[k] = z_tail > 0.0 ? tail_shift + std::log(z_tail) - log_z : -kInf;
        s.qd[k] = tail_shift == 0.0 ? z_tail / z : std::exp(s.lqd[k]);
        if (lse_p > 0.0) {  // the k sum beyond 1 (rounding): scale them to 1, no tail
          for (int64_t b = 0; b < k; ++b) s.lpd[b] -= lse_p;
          s.lpd[k] = -kInf;
        } else {
          s.lpd[k] = math::log1mexp(lse_p);
        }
      } else {
        for (int64_t b = 0; b < k; ++b) s.lpd[b] -= lse_p;
      }

      double sum_u = 0.0;
      const double value = BucketDivergence(div, nb, kpad, s, u.data(), sum_u);
      // A token whose divergence (or gradient) is infinite or beyond fp32's range gets loss
      // +inf and no gradient, as in divergence().
      if (!(std::fabs(value) <= std::numeric_limits<float>::max())) {
        job.row_loss[i] = kInf;
        ZeroRow(job.grad_student, i, v);
        continue;
      }
      job.row_loss[i] = value;
      if (!want_grad) continue;

      const double scale = t2 * job.grad_scale[i] / temperature;
      // An fp32 output row is written directly (one pass from the cached exps to memory);
      // other dtypes go through e and StoreRow's conversion.
      const detail::RowOutput& go = job.grad_student;
      float* dst = go.dtype == DType::f32 ? static_cast<float*>(go.data) + i * go.row_stride : e;
      if (has_tail) {
        // Tail entries: e_j (u_tail / Z_tail - U / Z); the k entries are 0 in e (masked).
        const double c =
            z_tail > 0.0 ? scale * (u[k] / z_tail - sum_u * std::exp(tail_shift) / z) : 0.0;
        const VF vc = hn::Set(df, static_cast<float>(c));
        const int64_t vfull = v / lanes * lanes;
        for (int64_t j = 0; j < vfull; j += lanes)
          hn::StoreU(hn::Mul(hn::Load(df, e + j), vc), df, dst + j);
        for (int64_t j = vfull; j < v; ++j) dst[j] = e[j] * static_cast<float>(c);
      } else {
        std::memset(dst, 0, static_cast<size_t>(v) * sizeof(float));
      }
      for (int64_t b = 0; b < k; ++b)
        dst[s.idx[b]] = static_cast<float>(scale * (u[b] - s.qd[b] * sum_u));
      if (dst == e) StoreRow(go, i, v, e);
    }
  }
  job.bad_student = bad_s.Get();
  job.bad_teacher = bad_t.Get();
}

}  // namespace

void RunSparseRows(detail::SparseJob& job) {
  VisitDivergence(job.spec, [&](const auto& div) { RunRows(job, div); });
}

}  // namespace HWY_NAMESPACE
}  // namespace divkit
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace divkit {
HWY_EXPORT(RunSparseRows);
void detail::run_sparse_rows(SparseJob& job) {
  // A fresh [N, V] student gradient (not the logits themselves): huge pages for its first write.
  const detail::RowOutput& g = job.grad_student;
  if (!job.check_only && job.n > 0 && g.data != nullptr && g.data != job.student.data &&
      g.data != job.teacher.data)
    detail::advise_huge_pages(g.data, static_cast<size_t>((job.n - 1) * g.row_stride + job.v) *
                                          dtype_size(g.dtype));
  HWY_DYNAMIC_DISPATCH(RunSparseRows)(job);
}
}  // namespace divkit
#endif
