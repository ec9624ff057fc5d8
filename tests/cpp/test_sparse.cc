// Sparse (top-k) and truncated teachers: sparse_divergence and topk_divergence against a plain
// fp64 reference written here (gather, renormalize or tail bucket, then the divergence of the
// bucket distributions by the fp64 reference of reference.h), gradients against central finite
// differences of that reference, properties (k = V, in place, threads), and every error path.
#include <algorithm>
#include <cmath>
#include <numeric>

#include "divkit/sparse.h"
#include "test_util.h"

namespace divkit_test {
namespace {

using divkit::SparseTail;
using K = DivergenceKind;

// ---- the problem: student logits, the teacher's top-k (indices, logprobs) ----

struct Sparse {
  int64_t n = 0, v = 0, k = 0;
  HostMatrix student;        // any dtype / stride
  std::vector<int64_t> idx;  // n * k
  std::vector<double> lp;    // n * k (values as stored in lp_dtype)
  DType idx_dtype = DType::i64, lp_dtype = DType::f32;
  std::vector<int64_t> labels;  // empty: none
  std::vector<double> weights;  // empty: none
  Reduction reduction = Reduction::mean;
  double num_items = 0.0;
};

// A teacher distribution over V (softmax of random logits related to the student's), of which
// the k largest entries are given as log-probabilities; entries of row 1 masked on request.
Sparse make_sparse(int64_t n, int64_t v, int64_t k, DType sdt, uint64_t seed, bool masked = false,
                   int64_t stride = -1, DType lp_dtype = DType::f32) {
  Sparse p;
  p.n = n, p.v = v, p.k = k, p.lp_dtype = lp_dtype;
  Logits l = random_logits(n, v, sdt, DType::f64, seed, 2.0, stride);
  p.student = l.student;
  for (int64_t i = 0; i < n; ++i) {
    std::vector<double> t(v);
    for (int64_t j = 0; j < v; ++j) t[j] = l.teacher.get(i, j);
    double m = *std::max_element(t.begin(), t.end()), z = 0.0;
    for (double x : t) z += std::exp(x - m);
    std::vector<int64_t> order(v);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return t[a] > t[b]; });
    // Not sorted by index: servers return the entries in rank order.
    for (int64_t b = 0; b < k; ++b) {
      p.idx.push_back(order[b]);
      p.lp.push_back(round_to(lp_dtype, t[order[b]] - m - std::log(z)));
    }
  }
  if (masked && n > 1) {
    // A top-k entry of probability 0 in both (p = q = 0: 0 log 0 = 0), and a masked tail entry.
    p.lp[1 * k + k - 1] = -kInf;
    p.student.set(1, p.idx[1 * k + k - 1], -kInf);
    for (int64_t j = 0; j < v; ++j) {  // and a tail entry
      if (std::find(p.idx.begin() + k, p.idx.begin() + 2 * k, j) == p.idx.begin() + 2 * k) {
        p.student.set(1, j, -kInf);
        break;
      }
    }
  }
  return p;
}

// fp64 reference of one row: the bucket distributions, then D(p, q) by divkit_ref with the
// log-probabilities as logits at T = 1 (softmax of normalized log-probabilities is themselves).
double ref_row(const double* s, int64_t v, const int64_t* idx, const double* lp, int64_t k,
               SparseTail tail, const divkit_ref::Params& prm) {
  const double T = prm.temperature;
  double m = -kInf;
  for (int64_t j = 0; j < v; ++j) m = std::max(m, s[j] / T);
  double z = 0.0;
  for (int64_t j = 0; j < v; ++j) z += std::exp(s[j] / T - m);
  const double lse = m + std::log(z);
  std::vector<double> lq(k), lpv(lp, lp + k);
  for (int64_t b = 0; b < k; ++b) lq[b] = s[idx[b]] / T - lse;
  auto logsumexp = [](const std::vector<double>& x) {
    double mx = -kInf;
    for (double a : x) mx = std::max(mx, a);
    if (mx == -kInf) return -kInf;
    double acc = 0.0;
    for (double a : x) acc += std::exp(a - mx);
    return mx + std::log(acc);
  };
  if (tail == SparseTail::renormalize || k == v) {
    const double lq_k = logsumexp(lq), lp_k = logsumexp(lpv);
    for (int64_t b = 0; b < k; ++b) lq[b] -= lq_k, lpv[b] -= lp_k;
  } else {
    double tail_q = 0.0;
    for (int64_t j = 0; j < v; ++j)
      if (std::find(idx, idx + k, j) == idx + k) tail_q += std::exp(s[j] / T - lse);
    const double mass = std::exp(logsumexp(lpv));
    double tail_p = 1.0 - mass;
    if (mass > 1.0) {
      for (int64_t b = 0; b < k; ++b) lpv[b] -= std::log(mass);
      tail_p = 0.0;
    }
    lq.push_back(std::log(tail_q));
    lpv.push_back(std::log(tail_p));
  }
  divkit_ref::Params p1 = prm;
  p1.temperature = 1.0;
  p1.scale_by_t_squared = false;
  return divkit_ref::row_value(lq.data(), lpv.data(), static_cast<int64_t>(lq.size()), p1);
}

// The reduced loss (or per-token losses for reduction none) of the reference.
std::vector<double> ref_loss(const Sparse& p, const std::vector<double>& s, SparseTail tail,
                             const divkit_ref::Params& prm) {
  std::vector<double> rows(p.n, 0.0);
  double total = 0.0;
  int64_t count = 0;
  const double t2 = prm.scale_by_t_squared ? prm.temperature * prm.temperature : 1.0;
  for (int64_t i = 0; i < p.n; ++i) {
    if (!p.labels.empty() && p.labels[i] == -100) continue;
    ++count;
    const double w = p.weights.empty() ? 1.0 : p.weights[i];
    if (w == 0.0) continue;
    rows[i] = w * t2 * ref_row(&s[i * p.v], p.v, &p.idx[i * p.k], &p.lp[i * p.k], p.k, tail, prm);
    total += rows[i];
  }
  if (p.reduction == Reduction::none) return rows;
  double div = 1.0;
  if (p.num_items > 0) div = p.num_items;
  else if (p.reduction == Reduction::mean) div = count > 0 ? double(count) : 1.0;
  else if (p.reduction == Reduction::batchmean) div = double(p.n);
  return {total / div};
}

// Central differences of the reference's total loss w.r.t. every finite student logit (0 at
// masked ones, where the gradient is 0).
std::vector<double> ref_grad(const Sparse& p, SparseTail tail, const divkit_ref::Params& prm) {
  std::vector<double> s = p.student.values(), g(s.size(), 0.0);
  auto total = [&](const std::vector<double>& x) {
    const std::vector<double> l = ref_loss(p, x, tail, prm);
    return std::accumulate(l.begin(), l.end(), 0.0);
  };
  for (size_t j = 0; j < s.size(); ++j) {
    if (!std::isfinite(s[j])) continue;
    const double x0 = s[j], h = 1e-5 * std::max(1.0, std::fabs(x0));
    s[j] = x0 + h;
    const double up = total(s);
    s[j] = x0 - h;
    const double dn = total(s);
    s[j] = x0;
    g[j] = (up - dn) / (2 * h);
  }
  return g;
}

struct Out {
  std::vector<double> loss;
  HostMatrix grad;
};

// Calls divkit::sparse_divergence (grad: none, or of `gdt`; in_place: into the student buffer).
Out run_sparse(Sparse& p, const DivergenceSpec& spec, SparseTail tail, bool grad = true,
               DType gdt = DType::f32, bool in_place = false) {
  HostMatrix idx(p.n, p.k, p.idx_dtype), lp(p.n, p.k, p.lp_dtype);
  for (int64_t i = 0; i < p.n; ++i)
    for (int64_t b = 0; b < p.k; ++b) {
      idx.set(i, b, static_cast<double>(p.idx[i * p.k + b]));
      lp.set(i, b, p.lp[i * p.k + b]);
    }
  HostMatrix labels, weights;
  divkit::DivergenceOptions o;
  if (!p.labels.empty()) {
    labels = HostMatrix(1, p.n, DType::i64);
    for (int64_t i = 0; i < p.n; ++i) labels.set(0, i, double(p.labels[i]));
    o.labels = TensorView::vector(labels.view().data, DType::i64, p.n);
  }
  if (!p.weights.empty()) {
    weights = HostMatrix(1, p.n, DType::f64);
    for (int64_t i = 0; i < p.n; ++i) weights.set(0, i, p.weights[i]);
    o.weights = TensorView::vector(weights.view().data, DType::f64, p.n);
  }
  o.reduction = p.reduction;
  o.num_items_in_batch = p.num_items;
  Out out;
  out.loss.assign(p.reduction == Reduction::none ? p.n : 1, 0.0);
  divkit::SparseOutputs so;
  so.loss = TensorView::vector(out.loss.data(), DType::f64, int64_t(out.loss.size()));
  if (grad && in_place) so.grad_student = p.student.view();
  if (grad && !in_place) {
    out.grad = HostMatrix(p.n, p.v, gdt);
    so.grad_student = out.grad.view();
  }
  divkit::SparseOptions sp;
  sp.tail = tail;
  divkit::sparse_divergence(p.student.view(), idx.view(), lp.view(), spec, sp, o, so);
  if (grad && in_place) out.grad = p.student;
  return out;
}

void expect_close(const std::vector<double>& got, const std::vector<double>& want, double rtol,
                  double atol, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const bool ok = (std::isinf(want[i]) && got[i] == want[i]) ||
                    std::fabs(got[i] - want[i]) <= atol + rtol * std::fabs(want[i]);
    if (!ok && ++bad <= 3)
      ADD_FAILURE() << what << " [" << i << "]: got " << got[i] << ", want " << want[i];
  }
}

double max_abs(const std::vector<double>& x) {
  double m = 0.0;
  for (double a : x) m = std::max(m, std::fabs(a));
  return m;
}

// ---- against the reference ----

TEST(Sparse, MatchesReferenceEveryKindBothTails) {
  for (const Variant& var : all_variants()) {
    for (SparseTail tail : {SparseTail::renormalize, SparseTail::bucket}) {
      SCOPED_TRACE(var.name + (tail == SparseTail::bucket ? " bucket" : " renormalize"));
      Sparse p = make_sparse(4, 13, 5, DType::f32, 7, /*masked=*/true, /*stride=*/16);
      p.labels = {0, 1, -100, 3};
      p.weights = {1.0, 0.5, 1.0, 2.0};
      DivergenceSpec spec = var.spec;
      spec.temperature = 1.5f;
      spec.scale_by_t_squared = true;
      const divkit_ref::Params prm = divkit_ref::params_from_spec(spec);
      const std::vector<double> want = ref_loss(p, p.student.values(), tail, prm);
      const std::vector<double> gwant = ref_grad(p, tail, prm);
      Out got = run_sparse(p, spec, tail);
      expect_close(got.loss, want, 2e-5, 1e-6, "loss");
      expect_close(got.grad.values(), gwant, 0.0, 2e-5 * std::max(1.0, max_abs(gwant)), "grad");
      EXPECT_TRUE(got.grad.padding_intact());
      p.reduction = Reduction::none;
      expect_close(run_sparse(p, spec, tail, false).loss,
                   ref_loss(p, p.student.values(), tail, prm), 2e-5, 1e-6, "loss none");
    }
  }
}

TEST(Sparse, EverySimdTarget) {
  RuntimeGuard guard;
  for (const std::string& target : divkit::available_simd_targets()) {
    divkit::force_simd_target(target);
    for (const Variant& var : default_variants()) {
      SCOPED_TRACE(target + " " + var.name);
      Sparse p = make_sparse(3, 21, 6, DType::bf16, 8);  // V, k not multiples of the width
      const divkit_ref::Params prm = divkit_ref::params_from_spec(var.spec);
      Out o = run_sparse(p, var.spec, SparseTail::bucket);
      expect_close(o.loss, ref_loss(p, p.student.values(), SparseTail::bucket, prm), 2e-5, 1e-6,
                   "loss");
      const std::vector<double> g = ref_grad(p, SparseTail::bucket, prm);
      expect_close(o.grad.values(), g, 0.0, 2e-5 * std::max(1.0, max_abs(g)), "grad");
    }
  }
}

TEST(Sparse, GradientSpreadsOverTheTailOnlyInBucketMode) {
  Sparse p = make_sparse(3, 17, 4, DType::f32, 11);
  for (SparseTail tail : {SparseTail::renormalize, SparseTail::bucket}) {
    Out o = run_sparse(p, make_spec(K::forward_kl), tail);
    for (int64_t i = 0; i < p.n; ++i)
      for (int64_t j = 0; j < p.v; ++j) {
        const bool top =
            std::find(&p.idx[i * p.k], &p.idx[i * p.k] + p.k, j) != &p.idx[i * p.k] + p.k;
        if (top || tail == SparseTail::bucket) EXPECT_NE(o.grad.get(i, j), 0.0) << i << "," << j;
        else EXPECT_EQ(o.grad.get(i, j), 0.0) << i << "," << j;
      }
  }
}

TEST(Sparse, InfiniteRowGivesInfAndNoGradient) {
  // forward KL with the student -inf at a teacher entry of probability > 0: +inf for that
  // token, gradient 0 in its row, the other rows unaffected.
  Sparse p = make_sparse(2, 10, 3, DType::f32, 12);
  p.student.set(0, p.idx[0], -kInf);
  p.reduction = Reduction::none;
  for (SparseTail tail : {SparseTail::renormalize, SparseTail::bucket}) {
    Out o = run_sparse(p, make_spec(K::forward_kl), tail);
    EXPECT_EQ(o.loss[0], kInf);
    EXPECT_TRUE(std::isfinite(o.loss[1]));
    for (int64_t j = 0; j < 10; ++j) EXPECT_EQ(o.grad.get(0, j), 0.0);
    EXPECT_GT(std::fabs(o.grad.get(1, p.idx[3])), 0.0);
  }
}

TEST(Sparse, LowPrecisionInputsAndOutputs) {
  for (DType sdt : {DType::bf16, DType::f16, DType::f64}) {
    for (DType lpdt : {DType::bf16, DType::f64}) {
      SCOPED_TRACE(dtype_short(sdt) + " logprobs " + dtype_short(lpdt));
      Sparse p = make_sparse(3, 20, 6, sdt, 13, false, -1, lpdt);
      p.idx_dtype = DType::i32;
      const DivergenceSpec spec = make_spec(K::jsd, 0.5, 0.8);
      const divkit_ref::Params prm = divkit_ref::params_from_spec(spec);
      Out o = run_sparse(p, spec, SparseTail::bucket, true, DType::bf16);
      expect_close(o.loss, ref_loss(p, p.student.values(), SparseTail::bucket, prm), 2e-5, 1e-6,
                   "loss");
      const std::vector<double> g = ref_grad(p, SparseTail::bucket, prm);
      // bf16 output: 2^-9 relative rounding.
      std::vector<double> got = o.grad.values();
      for (size_t j = 0; j < g.size(); ++j)
        EXPECT_NEAR(got[j], g[j], 4e-3 * std::fabs(g[j]) + 1e-6) << j;
    }
  }
}

TEST(Sparse, KEqualsOneAndKEqualsV) {
  // k = 1 renormalized: both distributions are a point mass, every divergence is 0.
  Sparse p1 = make_sparse(3, 9, 1, DType::f32, 21);
  for (const Variant& var : default_variants()) {
    Out o = run_sparse(p1, var.spec, SparseTail::renormalize);
    EXPECT_NEAR(o.loss[0], 0.0, 1e-6) << var.name;
    EXPECT_LT(max_abs(o.grad.values()), 1e-6) << var.name;
  }
  // k = V: bucket is renormalize, and both are divergence() with the teacher's log-probs as
  // teacher logits.
  Sparse p = make_sparse(3, 9, 9, DType::f32, 22);
  HostMatrix t(3, 9, DType::f32);
  for (int64_t i = 0; i < 3; ++i)
    for (int64_t b = 0; b < 9; ++b) t.set(i, p.idx[i * 9 + b], p.lp[i * 9 + b]);
  for (const Variant& var : default_variants()) {
    SCOPED_TRACE(var.name);
    DivergenceSpec spec = var.spec;
    spec.temperature = 1.0f;
    Out b = run_sparse(p, spec, SparseTail::bucket);
    Out r = run_sparse(p, spec, SparseTail::renormalize);
    EXPECT_EQ(b.loss[0], r.loss[0]);
    EXPECT_TRUE(b.grad.same_bits(r.grad));
    HostMatrix s = p.student;
    KernelOut d = run_kernel(s, t, spec, TestOptions{}, GradRequest::of());
    EXPECT_NEAR(b.loss[0], d.loss[0], 2e-5 * std::fabs(d.loss[0]) + 1e-6);
    expect_close(b.grad.values(), d.grad_s.values(), 0.0, 2e-6, "grad vs divergence()");
  }
}

TEST(Sparse, TeacherMassAboveOneWithinToleranceIsScaled) {
  // Rounded server logprobs whose probabilities sum to 1.004: scaled to 1, tail 0, which is
  // the renormalized divergence.
  Sparse p = make_sparse(2, 12, 12, DType::f32, 31);
  p.v = 12;
  Sparse q = p;
  HostMatrix wide(2, 13, DType::f32);  // V = 13: one tail entry, so bucket mode has a tail
  for (int64_t i = 0; i < 2; ++i) {
    for (int64_t j = 0; j < 12; ++j) wide.set(i, j, p.student.get(i, j));
    wide.set(i, 12, -1.0);
  }
  q.student = wide;
  q.v = 13;
  for (double& x : q.lp) x = std::log(std::exp(x) * 1.004);
  Out b = run_sparse(q, make_spec(K::forward_kl), SparseTail::bucket);
  Out r = run_sparse(q, make_spec(K::forward_kl), SparseTail::renormalize);
  const std::vector<double> want = ref_loss(q, q.student.values(), SparseTail::bucket,
                                            divkit_ref::params_from_spec(make_spec(K::forward_kl)));
  EXPECT_NEAR(b.loss[0], want[0], 2e-5 * want[0] + 1e-6);
  // The bucket loss includes the student's tail mass term (p_tail = 0): forward KL over k + 1
  // buckets with p_tail = 0 equals the renormalized one minus log(1 - q_tail).
  EXPECT_GT(b.loss[0], r.loss[0]);
}

TEST(Sparse, InPlaceEqualsOutOfPlace) {
  for (SparseTail tail : {SparseTail::renormalize, SparseTail::bucket}) {
    for (DType dt : {DType::f32, DType::bf16}) {
      Sparse p = make_sparse(5, 33, 7, dt, 41, true, 40);
      Sparse q = p;
      const DivergenceSpec spec = make_spec(K::reverse_kl, kNaN, 2.0);
      Out a = run_sparse(p, spec, tail, true, dt);
      Out b = run_sparse(q, spec, tail, true, dt, /*in_place=*/true);
      EXPECT_EQ(a.loss[0], b.loss[0]);
      EXPECT_TRUE(a.grad.same_bits(b.grad));
      EXPECT_TRUE(q.student.padding_intact());
    }
  }
}

TEST(Sparse, IdenticalForAnyThreadCount) {
  RuntimeGuard guard;
  Sparse p = make_sparse(64, 1500, 20, DType::f32, 51);  // above the parallel threshold
  for (SparseTail tail : {SparseTail::renormalize, SparseTail::bucket}) {
    divkit::set_num_threads(1);
    Out a = run_sparse(p, make_spec(K::jsd, 0.3), tail);
    divkit::set_num_threads(3);
    Out b = run_sparse(p, make_spec(K::jsd, 0.3), tail);
    EXPECT_EQ(a.loss[0], b.loss[0]);
    EXPECT_TRUE(a.grad.same_bits(b.grad));
  }
}

TEST(Sparse, LargeVocabularyBucketTailIsAccurate) {
  // V = 128256 and a teacher whose top-k holds nearly all its mass: the tail terms are small
  // and must come out of the direct tail sum, not 1 - sum q.
  Sparse p = make_sparse(2, 128256, 8, DType::f32, 61);
  for (int64_t i = 0; i < 2; ++i)  // the student's top-k hold all but ~1e-8 of its mass
    for (int64_t b = 0; b < 8; ++b)
      p.student.set(i, p.idx[i * 8 + b], p.student.get(i, p.idx[i * 8 + b]) + 30.0);
  const DivergenceSpec spec = make_spec(K::forward_kl);
  const divkit_ref::Params prm = divkit_ref::params_from_spec(spec);
  Out o = run_sparse(p, spec, SparseTail::bucket, false);
  const std::vector<double> want = ref_loss(p, p.student.values(), SparseTail::bucket, prm);
  EXPECT_NEAR(o.loss[0], want[0], 2e-5 * want[0]);
}

// ---- topk_divergence ----

// The reference: the teacher's top-k by (value desc, index asc), the teacher's log-probs over
// them at T (renormalized by ref_row), then the renormalized sparse reference.
Sparse topk_as_sparse(const HostMatrix& s, const HostMatrix& t, int64_t k, double T) {
  Sparse p;
  p.n = s.rows(), p.v = s.cols(), p.k = k, p.student = s;
  for (int64_t i = 0; i < p.n; ++i) {
    std::vector<int64_t> order(p.v);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return t.get(i, a) > t.get(i, b); });
    for (int64_t b = 0; b < k; ++b) {
      p.idx.push_back(order[b]);
      p.lp.push_back(t.get(i, order[b]) / T);
    }
  }
  return p;
}

Out run_topk(HostMatrix& s, HostMatrix& t, int64_t k, const DivergenceSpec& spec,
             Reduction red = Reduction::mean) {
  Out out;
  out.loss.assign(red == Reduction::none ? s.rows() : 1, 0.0);
  out.grad = HostMatrix(s.rows(), s.cols(), DType::f32);
  divkit::DivergenceOptions o;
  o.reduction = red;
  divkit::SparseOutputs so;
  so.loss = TensorView::vector(out.loss.data(), DType::f64, int64_t(out.loss.size()));
  so.grad_student = out.grad.view();
  divkit::topk_divergence(s.view(), t.view(), k, spec, o, so);
  return out;
}

TEST(Topk, MatchesReferenceEveryKind) {
  for (const Variant& var : all_variants()) {
    SCOPED_TRACE(var.name);
    Logits l = random_logits(3, 15, DType::f32, DType::bf16, 71);
    DivergenceSpec spec = var.spec;
    spec.temperature = 0.7f;
    Sparse p = topk_as_sparse(l.student, l.teacher, 6, spec.temperature);
    const divkit_ref::Params prm = divkit_ref::params_from_spec(spec);
    Out o = run_topk(l.student, l.teacher, 6, spec);
    expect_close(o.loss, ref_loss(p, p.student.values(), SparseTail::renormalize, prm), 2e-5, 1e-6,
                 "loss");
    const std::vector<double> g = ref_grad(p, SparseTail::renormalize, prm);
    expect_close(o.grad.values(), g, 0.0, 2e-5 * std::max(1.0, max_abs(g)), "grad");
  }
}

TEST(Topk, TiesGoToTheLowestIndex) {
  // Teacher row with four equal logits at 1, 3, 5, 7 and k = 2: the selection is {1, 3}; the
  // student's gradient is 0 everywhere else.
  HostMatrix s(1, 9, DType::f32), t(1, 9, DType::f32);
  for (int64_t j = 0; j < 9; ++j) {
    s.set(0, j, 0.1 * j);
    t.set(0, j, j % 2 == 1 ? 2.0 : -1.0);
  }
  Out o = run_topk(s, t, 2, make_spec(K::forward_kl));
  for (int64_t j = 0; j < 9; ++j) {
    if (j == 1 || j == 3) EXPECT_NE(o.grad.get(0, j), 0.0) << j;
    else EXPECT_EQ(o.grad.get(0, j), 0.0) << j;
  }
  // p = (1/2, 1/2), q = softmax(0.1, 0.3): forward KL in closed form.
  const double q1 = 1.0 / (1.0 + std::exp(0.2)), q3 = 1.0 - q1;
  EXPECT_NEAR(o.loss[0], 0.5 * std::log(0.5 / q1) + 0.5 * std::log(0.5 / q3), 1e-6);
}

TEST(Topk, KEqualsVIsTheFullDivergence) {
  Logits l = random_logits(4, 11, DType::f32, DType::f32, 81);
  for (const Variant& var : default_variants()) {
    DivergenceSpec spec = var.spec;
    spec.temperature = 1.3f;
    Out o = run_topk(l.student, l.teacher, 11, spec, Reduction::none);
    HostMatrix s = l.student;
    TestOptions opt;
    opt.reduction = Reduction::none;
    KernelOut d = run_kernel(s, l.teacher, spec, opt, GradRequest::of());
    expect_close(o.loss, d.loss, 2e-5, 1e-6, var.name + " loss");
    expect_close(o.grad.values(), d.grad_s.values(), 0.0, 2e-6, var.name + " grad");
  }
}

// ---- errors ----

struct Bad {
  Sparse p = make_sparse(3, 8, 3, DType::f32, 91);
  HostMatrix idx{3, 3, DType::i64}, lp{3, 3, DType::f32};
  std::vector<double> loss = {0.0};
  divkit::DivergenceSpec spec;
  divkit::SparseOptions sp;
  divkit::DivergenceOptions opt;
  divkit::SparseOutputs out;
  Bad() {
    for (int64_t i = 0; i < 3; ++i)
      for (int64_t b = 0; b < 3; ++b) {
        idx.set(i, b, double(p.idx[i * 3 + b]));
        lp.set(i, b, p.lp[i * 3 + b]);
      }
    out.loss = TensorView::vector(loss.data(), DType::f64, 1);
  }
  std::function<void()> fn() {
    return [this] {
      divkit::sparse_divergence(p.student.view(), idx.view(), lp.view(), spec, sp, opt, out);
    };
  }
};

TEST(SparseErrors, ValidDoesNotThrow) {
  Bad b;
  EXPECT_NO_THROW(b.fn()());
}

TEST(SparseErrors, IndicesAndLogprobs) {
  {
    Bad b;
    b.idx.set(1, 2, b.idx.get(1, 0));
    expect_error(b.fn(), {"teacher_indices", "repeats", "row 1"});
  }
  {
    Bad b;
    b.idx.set(2, 0, 8);
    expect_error(b.fn(), {"teacher_indices", "8", "row 2", "[0, 8)"});
  }
  {
    Bad b;
    b.idx.set(0, 1, -1);
    expect_error(b.fn(), {"teacher_indices", "-1", "row 0"});
  }
  {
    Bad b;
    b.lp.set(1, 1, 0.5);
    expect_error(b.fn(), {"teacher_logprobs", "row 1", "0.5"});
  }
  {
    Bad b;
    b.lp.set(0, 0, kNaN);
    expect_error(b.fn(), {"teacher_logprobs", "nan", "row 0"});
  }
  {
    Bad b;  // -inf is a probability 0: allowed
    b.lp.set(0, 0, -kInf);
    EXPECT_NO_THROW(b.fn()());
  }
  {
    Bad b;  // all -inf: fine in bucket mode (the tail holds everything), an error renormalized
    for (int64_t j = 0; j < 3; ++j) b.lp.set(2, j, -kInf);
    EXPECT_NO_THROW(b.fn()());
    b.sp.tail = SparseTail::renormalize;
    expect_error(b.fn(), {"teacher_logprobs", "all -inf", "row 2"});
  }
  {
    Bad b;  // probabilities summing to 1.5 in bucket mode
    for (int64_t j = 0; j < 3; ++j) b.lp.set(0, j, std::log(0.5));
    expect_error(b.fn(), {"teacher_logprobs", "row 0", "summing to 1.5"});
    b.sp.tail = SparseTail::renormalize;
    EXPECT_NO_THROW(b.fn()());
  }
  {
    Bad b;  // ignored rows are not read
    b.idx.set(1, 0, 99);
    b.lp.set(1, 0, kNaN);
    b.p.student.set(1, 0, kNaN);
    HostMatrix labels(1, 3, DType::i64);
    labels.set(0, 0, 0), labels.set(0, 1, -100), labels.set(0, 2, 1);
    b.opt.labels = TensorView::vector(labels.view().data, DType::i64, 3);
    EXPECT_NO_THROW(b.fn()());
  }
}

TEST(SparseErrors, ShapesAndDtypes) {
  {
    Bad b;
    b.idx = HostMatrix(2, 3, DType::i64);
    b.idx.fill(0);
    expect_error(b.fn(), {"teacher_indices", "rows"});
  }
  {
    Bad b;
    b.lp = HostMatrix(3, 2, DType::f32);
    b.lp.fill(-1);
    expect_error(b.fn(), {"teacher_logprobs", "same shape"});
  }
  {
    Bad b;
    b.idx = HostMatrix(3, 3, DType::f32);
    b.idx.fill(0);
    expect_error(b.fn(), {"teacher_indices", "int64 or int32"});
  }
  {
    Bad b;
    b.lp = HostMatrix(3, 3, DType::f16);
    b.lp.fill(-1);
    expect_error(b.fn(), {"teacher_logprobs", "float16"});
  }
  {
    Bad b;
    b.idx = HostMatrix(3, 0, DType::i64);
    b.lp = HostMatrix(3, 0, DType::f32);
    expect_error(b.fn(), {"k = 0"});
  }
  {
    Bad b;  // k > V
    b.idx = HostMatrix(3, 9, DType::i64);
    b.lp = HostMatrix(3, 9, DType::f32);
    for (int64_t i = 0; i < 3; ++i)
      for (int64_t j = 0; j < 9; ++j) b.idx.set(i, j, j), b.lp.set(i, j, -3.0);
    expect_error(b.fn(), {"k = 9", "V = 8"});
  }
  {
    Bad b;
    b.sp.tail = static_cast<SparseTail>(7);
    expect_error(b.fn(), {"tail"});
  }
  {
    Bad b;
    b.spec.temperature = 0.0f;
    expect_error(b.fn(), {"temperature"});
  }
  {
    Bad b;
    std::vector<double> l2(2);
    b.out.loss = TensorView::vector(l2.data(), DType::f64, 2);
    expect_error(b.fn(), {"loss", "one element"});
  }
  {
    Bad b;
    HostMatrix g(3, 7, DType::f32);
    b.out.grad_student = g.view();
    expect_error(b.fn(), {"grad_student", "shape"});
  }
  EXPECT_THROW(divkit::parse_sparse_tail("drop"), divkit::Error);
  EXPECT_EQ(divkit::parse_sparse_tail("bucket"), SparseTail::bucket);
}

TEST(SparseErrors, StudentRowsAndInPlaceLeavesInputUntouched) {
  {
    Bad b;
    b.p.student.set(2, 5, kNaN);
    expect_error(b.fn(), {"student_logits", "NaN", "row 2"});
  }
  {
    Bad b;  // renormalize: -inf at every teacher index
    for (int64_t j = 0; j < 3; ++j) b.p.student.set(1, b.p.idx[3 + j], -kInf);
    b.sp.tail = SparseTail::renormalize;
    expect_error(b.fn(), {"student_logits", "row 1", "every teacher index"});
    b.sp.tail = SparseTail::bucket;  // bucket: the tail holds the student's mass, fine
    EXPECT_NO_THROW(b.fn()());
  }
  {
    Bad b;  // in place with a bad late row: nothing written
    b.p.student.set(2, 0, kInf);
    const HostMatrix before = b.p.student;
    b.out.grad_student = b.p.student.view();
    expect_error(b.fn(), {"student_logits", "row 2"});
    EXPECT_TRUE(b.p.student.same_bits(before));
  }
}

TEST(TopkErrors, Arguments) {
  Logits l = random_logits(3, 8, DType::f32, DType::f32, 95);
  std::vector<double> loss = {0.0};
  divkit::SparseOutputs out;
  out.loss = TensorView::vector(loss.data(), DType::f64, 1);
  auto call = [&](HostMatrix& s, HostMatrix& t, int64_t k) {
    return [&, k] { divkit::topk_divergence(s.view(), t.view(), k, {}, {}, out); };
  };
  HostMatrix s = l.student, t = l.teacher;
  EXPECT_NO_THROW(call(s, t, 3)());
  expect_error(call(s, t, 0), {"k", "[1, V = 8]", "0"});
  expect_error(call(s, t, 9), {"k", "[1, V = 8]", "9"});
  HostMatrix t2(3, 7, DType::f32);
  t2.fill(0);
  expect_error(call(s, t2, 3), {"teacher_logits", "same shape"});
  t.set(1, 4, kNaN);
  expect_error(call(s, t, 3), {"teacher_logits", "row 1"});
  t = l.teacher;
  t.fill_row(2, -kInf);
  expect_error(call(s, t, 3), {"teacher_logits", "row 2", "-inf"});
}

}  // namespace
}  // namespace divkit_test
