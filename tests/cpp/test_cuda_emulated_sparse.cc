// The CUDA kernels of the token family besides divergence() run on the CPU by the CUDA emulator
// (DIVKIT_CUDA=EMULATE builds only; see src/core/cuda_emulator.h): sparse_divergence and
// topk_divergence (src/sparse/sparse_cuda.cu) and label_rows (src/fused_linear/label_cuda.cu),
// each through the public API with its views marked as CUDA, against the same call on the CPU.
// Each emulated call runs twice, forward and reverse thread/block order with other garbage in
// fresh device memory, and must give the same bits; errors must be the CPU's, word for word.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#include "core/cuda_emulator_control.h"
#include "cuda_emulated_util.h"
#include "divkit/fused_linear.h"
#include "divkit/sparse.h"
#include "test_util.h"

namespace divkit_test {
namespace {

using divkit::DivergenceOptions;
using divkit::SparseTail;
using K = DivergenceKind;

// ---- sparse_divergence and topk_divergence -----------------------------------------------------

struct SpCase {
  DivergenceSpec spec;
  bool topk = false;  // topk_divergence (teacher logits) instead of sparse_divergence
  SparseTail tail = SparseTail::bucket;
  int64_t n = 4, v = 37, k = 5;
  DType sdt = DType::f32;     // student logits
  DType tdt = DType::f32;     // teacher logits (topk)
  DType idx_dt = DType::i64;  // teacher indices (sparse)
  DType lp_dt = DType::f32;   // teacher log-probabilities (sparse)
  int64_t stride = -1;        // row stride of the logits (-1: v)
  bool masked = false;        // -inf entries in row 1 (a teacher entry of p = 0, a tail entry)
  bool ties = false;          // topk: the teacher's row 0 holds ties across the k-th value
  bool labels = false, weights = false;
  bool nan_weight = false;  // weights[2] = NaN
  bool transposed = false;  // indices and logprobs column-major (strides {1, n})
  DType labels_dt = DType::i64, weights_dt = DType::f32;
  int64_t vec_stride = 1;  // of labels and weights (the gaps hold garbage)
  Reduction reduction = Reduction::mean;
  double num_items = 0.0;
  bool grad = true, in_place = false;
  DType grad_dt = DType::f32;
  DType loss_dt = DType::f64;
  bool check_finite = true;
  uint64_t seed = 1;
};

// The inputs of one case: student [n, v], and the teacher as logits (topk) or as its top-k.
struct SpInput {
  HostMatrix student, teacher, idx, lp;
};

SpInput make_input(const SpCase& c) {
  SpInput in;
  Logits l =
      random_logits(c.n, c.v, c.sdt, c.topk ? c.tdt : DType::f64, c.seed, 2.0, c.stride, c.stride);
  in.student = l.student;
  if (c.topk) {
    in.teacher = l.teacher;
    if (c.ties && c.n > 0) {
      // Row 0: up to eight equal logits at the top, the k-th among them for k in [2, 8), in
      // several 256-entry sweeps of the selection when V > 256.
      for (int64_t j : {3, 10, 17, 24, 31, 257, 300, 511})
        if (j < c.v) in.teacher.set(0, j, 9.0);
    }
    if (c.ties && c.n > 2) {
      // Row 2: -0 and +0 at the top (equal: ties by index), the k-th among them for k < 5.
      for (int64_t j = 0; j < c.v; ++j) in.teacher.set(2, j, -1.0 - double(j % 5));
      for (int64_t j : {4, 6, 9, 13, 20}) in.teacher.set(2, j, j % 2 == 0 ? -0.0 : 0.0);
    }
    if (c.masked && c.n > 1) {
      for (int64_t j = 0; j < c.v; j += 3) in.teacher.set(1, j, -kInf);
      in.student.set(1, 1, -kInf);  // a masked student entry (p > 0 or outside the k)
    }
    return in;
  }
  in.idx = HostMatrix(c.n, c.k, c.idx_dt);
  in.lp = HostMatrix(c.n, c.k, c.lp_dt);
  for (int64_t i = 0; i < c.n; ++i) {
    std::vector<double> t(c.v);
    for (int64_t j = 0; j < c.v; ++j) t[j] = l.teacher.get(i, j);
    const double m = *std::max_element(t.begin(), t.end());
    double z = 0.0;
    for (double x : t) z += std::exp(x - m);
    std::vector<int64_t> order(c.v);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return t[a] > t[b]; });
    for (int64_t b = 0; b < c.k; ++b) {  // in rank order, as servers return them
      in.idx.set(i, b, static_cast<double>(order[b]));
      in.lp.set(i, b, t[order[b]] - m - std::log(z));
    }
  }
  if (c.masked && c.n > 1 && c.k > 1) {
    // A teacher entry of probability 0 where the student is -inf too (0 log 0 = 0), and a
    // masked tail entry.
    in.lp.set(1, c.k - 1, -kInf);
    in.student.set(1, static_cast<int64_t>(in.idx.get(1, c.k - 1)), -kInf);
    for (int64_t j = 0; j < c.v; ++j) {
      bool top = false;
      for (int64_t b = 0; b < c.k; ++b) top = top || in.idx.get(1, b) == double(j);
      if (!top) {
        in.student.set(1, j, -kInf);
        break;
      }
    }
  }
  return in;
}

struct SpRun {
  std::vector<double> loss;
  HostMatrix grad;
  std::string error;
};

SpRun run_sp(const SpCase& c, const SpInput& in, bool cuda) {
  SpRun r;
  HostMatrix s = in.student, t = in.teacher, idx = in.idx, lp = in.lp;
  const int64_t st = c.vec_stride, len = std::max<int64_t>(c.n * st, 1);
  HostMatrix labels(1, len, c.labels_dt), weights(1, len, c.weights_dt);
  labels.fill(-100.0);  // a gap read as a label ignores a row
  weights.fill(kNaN);
  auto strided = [&](void* data, DType dt) {
    TensorView t = TensorView::vector(data, dt, c.n);
    t.strides[0] = st;
    return placed(t, cuda);
  };
  DivergenceOptions o;
  if (c.labels) {
    for (int64_t i = 0; i < c.n; ++i) labels.set(0, i * st, i % 3 == 1 ? -100.0 : double(i));
    o.labels = strided(labels.view().data, c.labels_dt);
  }
  if (c.weights) {
    for (int64_t i = 0; i < c.n; ++i) weights.set(0, i * st, 0.25 + 0.5 * double(i % 4));
    if (c.nan_weight) weights.set(0, 2 * st, kNaN);
    o.weights = strided(weights.view().data, c.weights_dt);
  }
  o.reduction = c.reduction;
  o.num_items_in_batch = c.num_items;
  o.check_finite = c.check_finite;
  const int64_t nl = c.reduction == Reduction::none ? c.n : 1;
  HostMatrix loss(1, nl, c.loss_dt);
  divkit::SparseOutputs out;
  out.loss = placed(TensorView::vector(loss.view().data, c.loss_dt, nl), cuda);
  if (c.in_place) {
    out.grad_student = placed(s.view(), cuda);
  } else if (c.grad) {
    r.grad = HostMatrix(c.n, c.v, c.grad_dt);
    out.grad_student = placed(r.grad.view(), cuda);
  }
  auto nk_view = [&](HostMatrix& m, HostMatrix& storage) {
    if (!c.transposed) return placed(m.view(), cuda);
    storage = HostMatrix(c.k, c.n, m.dtype());
    for (int64_t i = 0; i < c.n; ++i)
      for (int64_t b = 0; b < c.k; ++b) storage.set(b, i, m.get(i, b));
    TensorView t = storage.view();
    std::swap(t.shape[0], t.shape[1]);
    std::swap(t.strides[0], t.strides[1]);
    return placed(t, cuda);
  };
  HostMatrix idx_t, lp_t;
  try {
    if (c.topk) {
      divkit::topk_divergence(placed(s.view(), cuda), placed(t.view(), cuda), c.k, c.spec, o, out);
    } else {
      divkit::SparseOptions sp;
      sp.tail = c.tail;
      divkit::sparse_divergence(placed(s.view(), cuda), nk_view(idx, idx_t), nk_view(lp, lp_t),
                                c.spec, sp, o, out);
    }
  } catch (const divkit::Error& e) {
    r.error = e.what();
  }
  if (c.in_place) r.grad = s;
  r.loss = loss.values();
  return r;
}

std::string describe(const SpCase& c) {
  std::string d = std::string(c.topk ? "topk " : "sparse ") + spec_string(c.spec) +
                  (c.topk ? "" : std::string(" tail=") + divkit::sparse_tail_name(c.tail)) +
                  " n=" + std::to_string(c.n) + " v=" + std::to_string(c.v) +
                  " k=" + std::to_string(c.k) + " s=" + dtype_short(c.sdt);
  if (c.topk) d += " t=" + dtype_short(c.tdt);
  else d += " idx=" + dtype_short(c.idx_dt) + " lp=" + dtype_short(c.lp_dt);
  if (c.stride >= 0) d += " stride=" + std::to_string(c.stride);
  if (c.transposed) d += " transposed";
  return d + (c.masked ? " masked" : "") + (c.ties ? " ties" : "") + (c.labels ? " labels" : "") +
         (c.weights ? " weights" : "") + " reduction=" + divkit::reduction_name(c.reduction) +
         (c.num_items > 0 ? " num_items" : "") + (c.in_place ? " in-place" : "") +
         (c.grad ? " grad " + dtype_short(c.grad_dt) : "");
}

// CPU, emulated forward, emulated reverse. Returns the CPU run.
SpRun check_sparse(const SpCase& c, const SpInput& in) {
  const std::string what = describe(c);
  const SpRun cpu = run_sp(c, in, false);
  const long long launches = divkit::cuda_emu::launch_count();
  SpRun emu, rev;
  {
    EmulatorOrder order(false);
    emu = run_sp(c, in, true);
  }
  EXPECT_GT(divkit::cuda_emu::launch_count(), launches) << what << ": no kernel ran";
  {
    EmulatorOrder order(true);
    rev = run_sp(c, in, true);
  }
  EXPECT_EQ(emu.error, cpu.error) << what;
  EXPECT_EQ(rev.error, cpu.error) << what;
  expect_same_values(emu.loss, rev.loss, what + " loss (forward vs reverse order)");
  if (!emu.grad.empty()) {
    EXPECT_TRUE(emu.grad.same_bits(rev.grad)) << what << ": gradient (forward vs reverse order)";
    EXPECT_TRUE(emu.grad.padding_intact()) << what;
  }
  if (!cpu.error.empty()) return cpu;
  expect_close(emu.loss, cpu.loss, 2e-5, what + " loss");
  if (!cpu.grad.empty()) {
    const bool low = c.grad_dt == DType::bf16 || c.grad_dt == DType::f16;
    expect_close(emu.grad.values(), cpu.grad.values(), low ? 1e-2 : 2e-5, what + " grad");
  }
  return cpu;
}

void check_sparse(const SpCase& c) { check_sparse(c, make_input(c)); }

TEST(CudaEmulatedSparse, EveryKindBothTailsMatchesTheCpu) {
  for (const Variant& var : all_variants())
    for (SparseTail tail : {SparseTail::renormalize, SparseTail::bucket}) {
      SpCase c;
      c.spec = var.spec;
      c.spec.temperature = 1.5f;
      c.spec.scale_by_t_squared = true;
      c.tail = tail;
      c.n = 4;
      c.v = 37;
      c.k = 5;
      c.masked = true;
      c.labels = true;
      c.weights = true;
      check_sparse(c);
    }
}

// A peaked student whose exps outside the teacher's k entries all underflow relative to its max
// (its tail mass ~e^-120 and ~e^-120 T): the tail is summed again relative to its own max, so a
// divergence that is finite (a teacher tail of 1e-11 or 1e-7) is finite, as on the CPU.
TEST(CudaEmulatedSparse, TailBeyondTheStudentMaxsUnderflow) {
  for (const DivergenceKind kind : {DivergenceKind::forward_kl, DivergenceKind::cross_entropy,
                                    DivergenceKind::jeffreys, DivergenceKind::chi2}) {
    SpCase c;
    c.spec = make_spec(kind);
    c.spec.temperature = 0.5f;
    c.n = 2, c.v = 5, c.k = 1;
    c.reduction = Reduction::none;
    SpInput in;
    in.student = HostMatrix(2, 5, DType::f32);
    const double rows[2][5] = {{-46.7, -29.7, 31.2, -30.5, -31.6}, {0.0, 61.0, 1.0, -2.0, 0.5}};
    for (int64_t i = 0; i < 2; ++i)
      for (int64_t j = 0; j < 5; ++j) in.student.set(i, j, rows[i][j]);
    in.idx = HostMatrix(2, 1, DType::i64);
    in.lp = HostMatrix(2, 1, DType::f32);
    in.idx.set(0, 0, 2.0), in.idx.set(1, 0, 1.0);
    in.lp.set(0, 0, -1e-11), in.lp.set(1, 0, -1e-7);
    const SpRun cpu = check_sparse(c, in);
    for (const double x : cpu.loss) EXPECT_TRUE(std::isfinite(x)) << describe(c);
  }
}

TEST(CudaEmulatedSparse, DtypesStridesAndLargeRows) {
  // Rows not 16-byte aligned (V = 515, stride 517), every input dtype; V = 7000 with k = 40
  // (rows of several sweeps per thread, a bitmap of 219 words).
  for (DType sdt : {DType::f32, DType::bf16, DType::f16})
    for (DType lp_dt : {DType::f32, DType::f64, DType::bf16})
      for (DType idx_dt : {DType::i64, DType::i32}) {
        SpCase c;
        c.spec = make_spec(K::jsd, 0.5, 0.8);
        c.n = 2;
        c.v = 515;
        c.stride = 517;
        c.k = 7;
        c.sdt = sdt;
        c.lp_dt = lp_dt;
        c.idx_dt = idx_dt;
        c.grad_dt = sdt;
        c.tail = idx_dt == DType::i32 ? SparseTail::renormalize : SparseTail::bucket;
        c.transposed = lp_dt == DType::f64;
        check_sparse(c);
      }
  for (SparseTail tail : {SparseTail::renormalize, SparseTail::bucket}) {
    SpCase c;
    c.spec = make_spec(K::forward_kl);
    c.tail = tail;
    c.n = 2;
    c.v = 7000;
    c.k = 40;
    check_sparse(c);
    c.v = 515;  // more buckets than threads
    c.k = 300;
    c.masked = true;
    check_sparse(c);
  }
}

TEST(CudaEmulatedSparse, ReductionsAndOptions) {
  for (const DivergenceSpec& spec : {make_spec(K::forward_kl), make_spec(K::renyi, 2.0)})
    for (SparseTail tail : {SparseTail::renormalize, SparseTail::bucket}) {
      for (Reduction red :
           {Reduction::none, Reduction::sum, Reduction::mean, Reduction::batchmean}) {
        SpCase c;
        c.spec = spec;
        c.tail = tail;
        c.n = 5;
        c.v = 64;
        c.k = 6;
        c.labels = true;
        c.weights = red != Reduction::none;
        c.labels_dt = red == Reduction::mean ? DType::i32 : DType::i64;
        c.vec_stride = red == Reduction::none ? 1 : 2;
        c.weights_dt = red == Reduction::batchmean ? DType::f64 : DType::f32;
        c.reduction = red;
        c.loss_dt = red == Reduction::sum ? DType::f32 : DType::f64;
        check_sparse(c);
      }
      SpCase c;
      c.spec = spec;
      c.spec.temperature = 2.0f;
      c.spec.scale_by_t_squared = true;
      c.tail = tail;
      c.v = 50;
      c.num_items = 7.0;
      c.reduction = Reduction::sum;
      check_sparse(c);
      c.grad = false;
      check_sparse(c);
      // Every row ignored: loss 0 (mean over no tokens), gradient 0.
      c.grad = true;
      c.labels = true;
      c.n = 1;
      c.reduction = Reduction::mean;
      c.num_items = 0.0;
      SpInput in = make_input(c);
      check_sparse(c, in);
    }
}

TEST(CudaEmulatedSparse, KEqualsOneAndKEqualsV) {
  for (const DivergenceSpec& spec : {make_spec(K::forward_kl), make_spec(K::tvd)})
    for (SparseTail tail : {SparseTail::renormalize, SparseTail::bucket})
      for (int64_t k : {1, 29}) {
        SpCase c;
        c.spec = spec;
        c.tail = tail;
        c.v = 29;
        c.k = k;
        c.masked = k > 1;
        c.reduction = Reduction::none;
        check_sparse(c);
      }
}

TEST(CudaEmulatedSparse, InPlace) {
  for (SparseTail tail : {SparseTail::renormalize, SparseTail::bucket})
    for (DType dt : {DType::f32, DType::bf16, DType::f16}) {
      SpCase c;
      c.spec = make_spec(K::reverse_kl, kNaN, 2.0);
      c.tail = tail;
      c.n = 5;
      c.v = 33;
      c.stride = 40;
      c.k = 7;
      c.sdt = dt;
      c.grad_dt = dt;
      c.masked = true;
      c.in_place = true;
      c.labels = true;
      check_sparse(c);
    }
}

TEST(CudaEmulatedTopk, EveryKindMatchesTheCpu) {
  for (const Variant& var : all_variants()) {
    SpCase c;
    c.topk = true;
    c.spec = var.spec;
    c.spec.temperature = 0.7f;
    c.n = 3;
    c.v = 45;
    c.k = 6;
    c.tdt = DType::bf16;  // rounded logits: ties in the teacher
    c.labels = true;
    c.weights = true;
    check_sparse(c);
  }
}

TEST(CudaEmulatedTopk, DtypesTiesMaskedAndK) {
  for (DType tdt : {DType::f32, DType::bf16, DType::f16, DType::f64})
    for (DType sdt : {DType::f32, DType::bf16, DType::f16}) {
      SpCase c;
      c.topk = true;
      c.spec = make_spec(K::jsd, 0.3, 1.2);
      c.n = 3;
      c.v = 515;
      c.stride = 517;
      c.k = 3;
      c.sdt = sdt;
      c.tdt = tdt;
      c.grad_dt = sdt;
      c.ties = true;
      c.masked = true;
      check_sparse(c);
    }
  // k = 1, ties across the k-th value, k = V (masked entries selected too), above 256 entries
  // per row (several radix and collection sweeps).
  for (int64_t k : {1, 2, 4, 6, 7, 300, 400, 515}) {
    SpCase c;
    c.topk = true;
    c.spec = make_spec(K::forward_kl);
    c.n = 3;
    c.v = 515;
    c.k = k;
    c.ties = true;
    c.masked = k != 300;  // k = 400: the k-th is -inf in row 1
    c.reduction = Reduction::none;
    check_sparse(c);
  }
  SpCase c;
  c.topk = true;
  c.spec = make_spec(K::reverse_kl);
  c.n = 4;
  c.v = 33;
  c.k = 5;
  c.ties = true;
  c.in_place = true;
  c.sdt = DType::bf16;
  c.grad_dt = DType::bf16;
  c.labels = true;
  check_sparse(c);
}

// A bad input: the CPU's error, word for word, and in place the student logits untouched.
void check_bad(SpCase c, const SpInput& in, const std::string& needle) {
  const SpRun cpu = check_sparse(c, in);
  EXPECT_NE(cpu.error.find(needle), std::string::npos) << describe(c) << ": " << cpu.error;
  c.in_place = true;
  c.grad_dt = c.sdt;
  SpRun emu;
  {
    EmulatorOrder order(false);
    emu = run_sp(c, in, true);
  }
  EXPECT_EQ(emu.error, cpu.error) << describe(c);
  EXPECT_TRUE(emu.grad.same_bits(in.student)) << describe(c) << ": logits written";
}

TEST(CudaEmulatedSparse, BadInputGivesTheCpuError) {
  SpCase c;
  c.n = 4;
  c.v = 40;
  c.k = 4;
  c.labels = true;  // row 1 is ignored: its bad values are not read
  auto base = [&] { return make_input(c); };
  {
    SpInput in = base();
    in.idx.set(2, 3, in.idx.get(2, 0));
    check_bad(c, in, "repeats");
  }
  {
    SpInput in = base();
    in.idx.set(3, 1, 40);
    check_bad(c, in, "outside the vocabulary");
  }
  {
    SpInput in = base();
    in.idx.set(2, 0, -1);
    check_bad(c, in, "outside the vocabulary");
  }
  {
    SpInput in = base();
    in.lp.set(3, 2, 0.5);
    check_bad(c, in, "logits instead of log-probabilities");
  }
  {
    SpInput in = base();
    in.lp.set(2, 2, kNaN);
    check_bad(c, in, "nan");
  }
  {
    SpInput in = base();
    for (int64_t b = 0; b < c.k; ++b) in.lp.set(3, b, std::log(0.5));
    check_bad(c, in, "summing to");
  }
  {
    SpInput in = base();  // ignored row 1: nothing of it is read
    in.idx.set(1, 0, 99);
    in.lp.set(1, 0, kNaN);
    in.student.set(1, 0, kNaN);
    check_sparse(c, in);
  }
  {
    SpInput in = base();
    in.student.set(3, 7, kNaN);
    check_bad(c, in, "student_logits");
    in.student.set(3, 7, 0.0);
    in.student.set(2, 7, kInf);
    check_bad(c, in, "student_logits");
  }
  {
    SpInput in = base();  // bucket: a student row all -inf
    in.student.fill_row(2, -kInf);
    check_bad(c, in, "every logit -inf");
  }
  SpCase r = c;
  r.tail = SparseTail::renormalize;
  {
    SpInput in = base();
    for (int64_t b = 0; b < c.k; ++b) in.lp.set(2, b, -kInf);
    check_bad(r, in, "all -inf");
    check_sparse(c, in);  // fine in bucket mode
  }
  {
    SpInput in = base();  // renormalize: the student -inf at every teacher index
    for (int64_t b = 0; b < c.k; ++b)
      in.student.set(3, static_cast<int64_t>(in.idx.get(3, b)), -kInf);
    check_bad(r, in, "every teacher index");
    check_sparse(c, in);  // fine in bucket mode
  }
  {
    SpCase t = c;  // column-major teacher: the message reads the row back through its strides
    t.transposed = true;
    SpInput in = base();
    in.lp.set(2, 3, -kInf);
    in.lp.set(2, 1, 0.25);
    check_bad(t, in, "got 0.25 at row 2, column 1");
    in = base();
    in.idx.set(3, 3, 40);
    check_bad(t, in, "holds 40 at row 3, column 3");
  }
  {
    SpCase w = c;  // a non-finite weight
    w.weights = true;
    w.nan_weight = true;
    w.vec_stride = 3;  // the value is read back through the stride
    w.weights_dt = DType::f64;
    check_bad(w, base(), "weights must be finite, got nan at index 2");
    w.vec_stride = 1;
    w.weights_dt = DType::f32;
    SpInput in = base();  // and a bad teacher row: the weights are reported first, as on the CPU
    in.lp.set(3, 0, 0.5);
    check_bad(w, in, "weights");
  }
}

TEST(CudaEmulatedTopk, BadInputGivesTheCpuError) {
  SpCase c;
  c.topk = true;
  c.n = 3;
  c.v = 40;
  c.k = 4;
  {
    SpInput in = make_input(c);
    in.teacher.set(1, 4, kNaN);
    check_bad(c, in, "teacher_logits");
  }
  {
    SpInput in = make_input(c);
    in.teacher.fill_row(2, -kInf);
    check_bad(c, in, "teacher_logits");
  }
  {
    SpInput in = make_input(c);
    in.student.set(2, 3, kInf);
    check_bad(c, in, "student_logits");
  }
  {
    SpInput in = make_input(c);  // the student -inf at every selected index
    in.student.fill_row(1, -kInf);
    check_bad(c, in, "student_logits");
  }
}

// Three blocks for eight rows: each block takes rows of several kinds in turn (a masked row, an
// ignored one, the rest), reusing its slot of the workspace and its bitmap.
TEST(CudaEmulatedSparse, SeveralRowsPerBlock) {
  EmulatorMaxGrid grid(3);
  for (SparseTail tail : {SparseTail::renormalize, SparseTail::bucket})
    for (bool in_place : {false, true}) {
      SpCase c;
      c.spec = make_spec(K::jsd, 0.5);
      c.tail = tail;
      c.n = 8;
      c.v = 300;
      c.k = 9;
      c.masked = true;
      c.labels = true;
      c.in_place = in_place;
      check_sparse(c);
      c.topk = true;
      c.ties = true;
      check_sparse(c);
    }
  SpCase c;  // a bad late row, in place: nothing written
  c.n = 8;
  c.v = 100;
  SpInput in = make_input(c);
  in.student.set(7, 3, kNaN);
  check_bad(c, in, "student_logits");
  in = make_input(c);
  in.idx.set(6, 1, in.idx.get(6, 2));
  check_bad(c, in, "repeats");
}

// check_finite off: no error, no host read; a call that would have raised gets a NaN loss
// (every element for reduction none).
TEST(CudaEmulatedSparse, CheckFiniteOffGivesANaNLoss) {
  for (int bad = 0; bad < 4; ++bad)
    for (Reduction red : {Reduction::none, Reduction::mean}) {
      SpCase c;
      c.topk = bad == 3;
      c.n = 4;
      c.v = 40;
      c.k = 4;
      c.reduction = red;
      c.check_finite = false;
      c.weights = bad == 2;
      c.nan_weight = bad == 2;
      SpInput in = make_input(c);
      if (bad == 0) in.student.set(2, 5, kNaN);
      if (bad == 1) in.idx.set(3, 0, in.idx.get(3, 1));
      if (bad == 3) in.teacher.fill_row(1, -kInf);
      for (bool in_place : {false, true}) {
        c.in_place = in_place;
        SpRun emu;
        {
          EmulatorOrder order(false);
          emu = run_sp(c, in, true);
        }
        EXPECT_EQ(emu.error, "") << describe(c);
        for (double l : emu.loss) EXPECT_TRUE(std::isnan(l)) << describe(c) << " bad " << bad;
      }
    }
}

TEST(CudaEmulatedSparse, NoRows) {
  for (bool topk : {false, true})
    for (Reduction red : {Reduction::none, Reduction::mean}) {
      SpCase c;
      c.topk = topk;
      c.n = 0;
      c.reduction = red;
      check_sparse(c);
    }
}

// ---- label_rows
// ----------------------------------------------------------------------------------

struct LrCase {
  int64_t n = 6, v = 53, stride = -1;
  DType dtype = DType::f32;  // of the emulated call's logits (the CPU call takes them as fp32)
  DType labels_dt = DType::i64;
  float temperature = 1.0f, softcap = 0.0f;
  int64_t topk = 3;
  bool grad = true, a1 = true, e = true;
  bool check_finite = true;
  int64_t vec_stride = 1;  // of labels, statistics and coefficients (the gaps hold garbage)
  bool smooth = false;     // smooth_unmasked: mean_z and c over the unmasked entries
  bool count = false;      // the `unmasked` output
  bool masked = true;      // -inf entries in rows 0, 5 and 6 (false: none anywhere)
  uint64_t seed = 5;
};

struct LrInput {
  std::vector<double> x;  // n * v values, representable in the case's dtype
  std::vector<int64_t> labels;
};

// Random logits rounded to the case's dtype, with -inf entries, a label tied with an earlier
// maximum (not top-1), a label that is the first maximum (top-1), an ignored row, and (n > 6) a
// row whose only unmasked entry is its label.
LrInput make_lr(const LrCase& c) {
  LrInput in;
  HostMatrix m = random_logits(c.n, c.v, c.dtype, c.dtype, c.seed, 2.0).student;
  in.x = m.values();
  for (int64_t i = 0; i < c.n; ++i) in.labels.push_back((i * 7 + 3) % c.v);
  auto at = [&](int64_t i, int64_t j) -> double& { return in.x[i * c.v + j]; };
  if (c.n > 0 && c.masked) at(0, 5) = -kInf;
  if (c.n > 1) {  // label 9 ties the max at 2 (earlier): not top-1
    at(1, 2) = 12.0;
    at(1, 9) = 12.0;
    in.labels[1] = 9;
  }
  if (c.n > 2) {  // label 2 is the first of two maxima: top-1
    at(2, 2) = 12.0;
    at(2, 9) = 12.0;
    in.labels[2] = 2;
  }
  if (c.n > 3) {  // softcap 5 saturates both to the same z: a tie only with softcap
    at(3, 1) = 80.0;
    at(3, in.labels[3]) = 90.0;
  }
  if (c.n > 4) in.labels[4] = -100;
  if (c.n > 5) {
    if (c.masked)
      for (int64_t j = 0; j < c.v; j += 2) at(5, j) = -kInf;
    in.labels[5] = 1;
  }
  if (c.n > 6 && c.masked) {
    for (int64_t j = 0; j < c.v; ++j)
      if (j != in.labels[6]) at(6, j) = -kInf;
  }
  return in;
}

struct LrRun {
  std::vector<double> lse, zy, mean, ent, mass, lsq, top1, unmasked;
  std::vector<double> grad;  // the logits after the call, n * v
  std::string error;
};

LrRun run_lr(const LrCase& c, const LrInput& in, bool cuda) {
  LrRun r;
  const DType dt = cuda ? c.dtype : DType::f32;
  const int64_t n = c.n;
  HostMatrix x(n, c.v, dt, c.stride);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < c.v; ++j) x.set(i, j, in.x[i * c.v + j]);
  const int64_t st = c.vec_stride, len = std::max<int64_t>(n * st, 1);
  HostMatrix labels(1, len, c.labels_dt);
  labels.fill(-7.0);  // out of range where a gap is read as a label
  for (int64_t i = 0; i < n; ++i) labels.set(0, i * st, static_cast<double>(in.labels[i]));
  for (auto* v : {&r.lse, &r.zy, &r.mean, &r.ent, &r.mass, &r.lsq, &r.top1, &r.unmasked})
    v->assign(len, -7.0);
  std::vector<double> a0(len, kNaN), a1(len, kNaN), b(len, kNaN), cc(len, kNaN), e(len, kNaN);
  for (int64_t i = 0; i < n; ++i) {
    a0[i * st] = 0.5 + 0.1 * static_cast<double>(i);
    a1[i * st] = 0.01;
    b[i * st] = -0.5;
    cc[i * st] = -0.001 * static_cast<double>(i + 1);
    e[i * st] = 0.2 - 0.05 * static_cast<double>(i);
  }
  auto strided = [&](void* data, DType dt) {
    TensorView t = TensorView::vector(data, dt, n);
    t.strides[0] = st;
    return placed(t, cuda);
  };
  auto vec = [&](std::vector<double>& v) { return strided(v.data(), DType::f64); };
  divkit::LabelRowsArgs a;
  a.logits = placed(x.view(), cuda);
  a.labels = strided(labels.view().data, c.labels_dt);
  a.temperature = c.temperature;
  a.softcap = c.softcap;
  a.lse = vec(r.lse);
  a.z_label = vec(r.zy);
  a.mean_z = vec(r.mean);
  a.entropy = vec(r.ent);
  a.log_sum_sq = vec(r.lsq);
  a.is_top1 = vec(r.top1);
  if (c.count) a.unmasked = vec(r.unmasked);
  a.smooth_unmasked = c.smooth;
  if (c.topk > 0) {
    a.topk_mass = vec(r.mass);
    a.topk = c.topk;
  }
  if (c.grad) {
    a.coef_a0 = vec(a0);
    a.coef_b = vec(b);
    a.coef_c = vec(cc);
    if (c.a1) a.coef_a1 = vec(a1);
    if (c.e) a.coef_e = vec(e);
  }
  a.first_token = 100;
  a.check_finite = c.check_finite;
  try {
    divkit::label_rows("fused_linear_logprobs", a);
  } catch (const divkit::Error& err) {
    r.error = err.what();
  }
  for (auto* v : {&r.lse, &r.zy, &r.mean, &r.ent, &r.mass, &r.lsq, &r.top1, &r.unmasked}) {
    for (int64_t i = 0; i < n; ++i) {
      if (i * st + 1 < len && st > 1) {
        EXPECT_EQ((*v)[i * st + 1], -7.0) << "a gap of a strided output was written";
      }
      (*v)[i] = (*v)[i * st];
    }
    v->resize(n);
  }
  r.grad = x.values();
  EXPECT_TRUE(x.padding_intact());
  return r;
}

std::string describe(const LrCase& c) {
  return "label_rows n=" + std::to_string(c.n) + " v=" + std::to_string(c.v) + " " +
         dtype_short(c.dtype) + " labels " + dtype_short(c.labels_dt) +
         " T=" + std::to_string(c.temperature) + " softcap=" + std::to_string(c.softcap) +
         " topk=" + std::to_string(c.topk) + (c.grad ? " grad" : "") + (c.a1 ? " a1" : "") +
         (c.e ? " e" : "") + (c.stride >= 0 ? " stride=" + std::to_string(c.stride) : "") +
         (c.smooth ? " smooth_unmasked" : "") + (c.count ? " unmasked" : "") +
         (c.masked ? "" : " nothing masked");
}

LrRun check_label_rows(const LrCase& c, const LrInput& in) {
  const std::string what = describe(c);
  const LrRun cpu = run_lr(c, in, false);
  const long long launches = divkit::cuda_emu::launch_count();
  LrRun emu, rev;
  {
    EmulatorOrder order(false);
    emu = run_lr(c, in, true);
  }
  EXPECT_GT(divkit::cuda_emu::launch_count(), launches) << what << ": no kernel ran";
  {
    EmulatorOrder order(true);
    rev = run_lr(c, in, true);
  }
  EXPECT_EQ(emu.error, cpu.error) << what;
  EXPECT_EQ(rev.error, cpu.error) << what;
  const std::vector<std::pair<const char*, std::vector<double> LrRun::*>> stats = {
      {"lse", &LrRun::lse},      {"z_label", &LrRun::zy},        {"mean_z", &LrRun::mean},
      {"entropy", &LrRun::ent},  {"topk_mass", &LrRun::mass},    {"log_sum_sq", &LrRun::lsq},
      {"is_top1", &LrRun::top1}, {"unmasked", &LrRun::unmasked}, {"gradient", &LrRun::grad}};
  for (const auto& [name, m] : stats)
    expect_same_values(emu.*m, rev.*m, what + " " + name + " (forward vs reverse order)");
  if (!cpu.error.empty()) return emu;
  const bool low = c.dtype == DType::bf16 || c.dtype == DType::f16;
  for (const auto& [name, m] : stats) {
    if (m == &LrRun::mass && c.topk == 0) continue;
    if (m == &LrRun::grad && !c.grad) continue;  // the CPU leaves z there, CUDA the logits
    if (m == &LrRun::unmasked && !c.count) continue;
    expect_close(emu.*m, cpu.*m, m == &LrRun::grad && low ? 1e-2 : 1e-5, what + " " + name);
  }
  return emu;
}

TEST(CudaEmulatedLabelRows, EveryStatisticAndOptionMatchesTheCpu) {
  for (DType dt : {DType::f32, DType::bf16, DType::f16, DType::f64}) {
    LrCase c;
    c.dtype = dt;
    check_label_rows(c, make_lr(c));
  }
  for (float t : {1.0f, 0.7f})
    for (float cap : {0.0f, 5.0f})
      for (int64_t topk : {0, 1, 4, 53}) {
        LrCase c;
        c.temperature = t;
        c.softcap = cap;
        c.topk = topk;
        c.grad = topk != 4;
        c.e = topk != 1;
        c.a1 = topk != 53;
        c.labels_dt = topk == 1 ? DType::i32 : DType::i64;
        c.stride = topk == 0 ? 60 : -1;
        c.vec_stride = topk == 4 ? 3 : 1;
        check_label_rows(c, make_lr(c));
      }
  {
    EmulatorMaxGrid grid(3);  // several rows per block
    LrCase c;
    c.n = 8;
    c.topk = 2;
    check_label_rows(c, make_lr(c));
  }
  // Long rows (several sweeps per thread, ties across the k-th value).
  LrCase c;
  c.n = 3;
  c.v = 3001;
  c.stride = 3003;
  c.topk = 300;
  c.dtype = DType::bf16;
  check_label_rows(c, make_lr(c));
}

TEST(CudaEmulatedLabelRows, BadRowsAsTheCpu) {
  LrCase c;
  c.dtype = DType::bf16;
  const LrInput good = make_lr(c);
  {
    // Finite logits that overflow fp32 once divided by a tiny temperature (the row's max +inf):
    // reported as the CPU reports them, not NaN statistics.
    LrCase tiny = c;
    tiny.temperature = 1e-38f;
    const LrRun emu = check_label_rows(tiny, good);
    EXPECT_NE(emu.error.find("overflow float32 once divided by the temperature"), std::string::npos)
        << emu.error;
  }
  {
    LrInput in = good;
    in.x[3 * c.v + 8] = kNaN;
    const LrRun emu = check_label_rows(c, in);
    EXPECT_NE(emu.error.find("token 103"), std::string::npos) << emu.error;
    in.x[3 * c.v + 8] = 0.0;
    in.x[3 * c.v + 1] = -kInf;  // a masked entry: fine; +inf in row 1 is the error
    in.x[1 * c.v + 0] = kInf;
    EXPECT_NE(check_label_rows(c, in).error.find("token 101"), std::string::npos);
  }
  {
    LrInput in = good;
    for (int64_t j = 0; j < c.v; ++j) in.x[2 * c.v + j] = -kInf;
    in.x[5 * c.v + 1] = kInf;
    const LrRun emu = check_label_rows(c, in);
    EXPECT_NE(emu.error.find("token 102"), std::string::npos) << emu.error;
  }
  {
    LrInput in = good;
    in.labels[3] = c.v;
    const LrRun emu = check_label_rows(c, in);
    EXPECT_NE(emu.error.find("labels[103] = 53"), std::string::npos) << emu.error;
    in.labels[3] = -1;
    c.labels_dt = DType::i32;
    c.vec_stride = 2;
    const LrRun emu32 = check_label_rows(c, in);
    EXPECT_NE(emu32.error.find("labels[103] = -1"), std::string::npos) << emu32.error;
  }
  {
    // check_finite off: no error; the bad row's statistics and gradient are NaN, the others are
    // the valid call's.
    LrInput in = good;
    in.x[3 * c.v + 8] = kNaN;
    in.labels[0] = -3;
    LrCase off = c;
    off.check_finite = false;
    off.labels_dt = DType::i64;
    off.vec_stride = 1;
    LrRun emu;
    {
      EmulatorOrder order(false);
      emu = run_lr(off, in, true);
    }
    LrRun ok;
    {
      EmulatorOrder order(false);
      ok = run_lr(off, good, true);
    }
    EXPECT_EQ(emu.error, "");
    for (int64_t i = 0; i < c.n; ++i) {
      const bool bad = i == 3 || i == 0;
      EXPECT_EQ(std::isnan(emu.lse[i]), bad) << i;
      EXPECT_EQ(std::isnan(emu.mass[i]), bad) << i;
      if (!bad) {
        EXPECT_EQ(emu.lse[i], ok.lse[i]) << i;
      }
      for (int64_t j = 0; j < c.v; ++j) {
        const double g = emu.grad[i * c.v + j];
        EXPECT_TRUE(bad ? std::isnan(g) : g == ok.grad[i * c.v + j]) << i << " " << j;
      }
    }
  }
}

// Label smoothing over the unmasked entries (smooth_unmasked) and the `unmasked` count: every
// dtype, temperature, softcap, strides, several rows per block and long rows, the count without
// smoothing too (mean_z -inf where an entry is masked), against the CPU path. Row 6 keeps only
// its label unmasked (V' = 1), row 5 half of its entries, row 0 all but one.
TEST(CudaEmulatedLabelRows, SmoothingOverUnmaskedEntriesMatchesTheCpu) {
  for (DType dt : {DType::f32, DType::bf16, DType::f16, DType::f64})
    for (bool smooth : {true, false}) {
      LrCase c;
      c.n = 7;
      c.dtype = dt;
      c.smooth = smooth;
      c.count = true;
      const LrRun emu = check_label_rows(c, make_lr(c));
      EXPECT_EQ(emu.unmasked[0], 52.0) << dtype_short(dt);
      EXPECT_EQ(emu.unmasked[4], 0.0) << dtype_short(dt);  // ignored
      EXPECT_EQ(emu.unmasked[5], 26.0) << dtype_short(dt);
      EXPECT_EQ(emu.unmasked[6], 1.0) << dtype_short(dt);
      EXPECT_EQ(std::isinf(emu.mean[6]), !smooth) << dtype_short(dt);
    }
  for (float t : {1.0f, 0.7f})
    for (float cap : {0.0f, 5.0f}) {
      LrCase c;
      c.n = 7;
      c.temperature = t;
      c.softcap = cap;
      c.smooth = true;
      c.count = cap == 0.0f;
      c.e = t == 1.0f;
      c.labels_dt = cap == 0.0f ? DType::i32 : DType::i64;
      c.vec_stride = t == 1.0f ? 1 : 3;
      c.stride = cap == 0.0f ? 60 : -1;
      check_label_rows(c, make_lr(c));
    }
  {
    LrCase c;  // the statistic alone (the kernel counts without the output)
    c.n = 7;
    c.smooth = true;
    c.grad = false;
    check_label_rows(c, make_lr(c));
  }
  {
    EmulatorMaxGrid grid(3);  // several rows per block
    LrCase c;
    c.n = 9;
    c.smooth = true;
    c.count = true;
    check_label_rows(c, make_lr(c));
  }
  LrCase c;  // long rows: several entries per thread
  c.n = 7;
  c.v = 3001;
  c.stride = 3003;
  c.topk = 300;
  c.dtype = DType::bf16;
  c.smooth = true;
  c.count = true;
  check_label_rows(c, make_lr(c));
}

// The emulated kernel's smoothing against an fp64 reference over the unmasked entries U of each
// row (V' = |U|): mean_z = sum_U z / V', and dL/dz_j = a p_j + b 1[j = y] + c V / V' on U, 0
// elsewhere, so the c terms of a row add up to c V as without masked entries.
TEST(CudaEmulatedLabelRows, SmoothingOverUnmaskedEntriesAgainstFp64) {
  LrCase c;
  c.n = 7;
  c.topk = 0;
  c.a1 = false;
  c.e = false;
  c.smooth = true;
  c.count = true;
  const LrInput in = make_lr(c);
  LrRun emu;
  {
    EmulatorOrder order(false);
    emu = run_lr(c, in, true);
  }
  const LrRun cpu = run_lr(c, in, false);
  ASSERT_EQ(emu.error, "");
  ASSERT_EQ(cpu.error, "");
  const int64_t v = c.v;
  for (int64_t i = 0; i < c.n; ++i) {
    const std::string row = "row " + std::to_string(i);
    if (in.labels[i] == -100) {
      EXPECT_EQ(emu.unmasked[i], 0.0) << row;
      EXPECT_EQ(emu.mean[i], 0.0) << row;
      for (int64_t j = 0; j < v; ++j) EXPECT_EQ(emu.grad[i * v + j], 0.0) << row;
      continue;
    }
    const double* x = in.x.data() + i * v;
    double m = -kInf, cnt = 0.0, sum = 0.0;
    for (int64_t j = 0; j < v; ++j)
      if (x[j] != -kInf) {
        m = std::max(m, x[j]);
        cnt += 1.0;
        sum += x[j];
      }
    double s = 0.0;
    for (int64_t j = 0; j < v; ++j) s += std::exp(x[j] - m);
    const double lse = m + std::log(s);
    EXPECT_EQ(emu.unmasked[i], cnt) << row;
    EXPECT_NEAR(emu.mean[i], sum / cnt, 1e-6 * (1.0 + std::fabs(sum / cnt))) << row;
    EXPECT_NEAR(emu.lse[i], lse, 1e-6 * (1.0 + std::fabs(lse))) << row;
    const double a0 = 0.5 + 0.1 * static_cast<double>(i), b = -0.5;
    const double cc = -0.001 * static_cast<double>(i + 1), share = cc * v / cnt;
    double c_total = 0.0;
    for (int64_t j = 0; j < v; ++j) {
      const double p = std::exp(x[j] - lse);
      double want = 0.0;
      if (x[j] != -kInf) want = a0 * p + share + (j == in.labels[i] ? b : 0.0);
      for (const LrRun* r : {static_cast<const LrRun*>(&emu), &cpu}) {
        const double got = r->grad[i * v + j];
        if (x[j] == -kInf) EXPECT_EQ(got, 0.0) << row << " masked entry " << j;
        else EXPECT_NEAR(got, want, 2e-6) << row << " entry " << j << (r == &cpu ? " cpu" : "");
      }
      c_total += emu.grad[i * v + j] - a0 * p - (j == in.labels[i] ? b : 0.0);
    }
    EXPECT_NEAR(c_total, cc * v, 1e-5) << row << ": the c terms add up to c V";
  }
}

// Without a masked entry, smoothing over the unmasked entries is smoothing over every entry: the
// same bits, on the emulated kernel and on the CPU, with softcap and the entropy term.
TEST(CudaEmulatedLabelRows, SmoothingWithoutMaskedEntriesGivesTheSameBits) {
  auto same_bits = [](const std::vector<double>& a, const std::vector<double>& b,
                      const std::string& what) {
    ASSERT_EQ(a.size(), b.size()) << what;
    for (size_t i = 0; i < a.size(); ++i)
      ASSERT_EQ(std::memcmp(&a[i], &b[i], sizeof(double)), 0)
          << what << "[" << i << "]: " << a[i] << " vs " << b[i];
  };
  for (DType dt : {DType::f32, DType::bf16})
    for (float cap : {0.0f, 5.0f}) {
      LrCase off;
      off.n = 7;
      off.dtype = dt;
      off.softcap = cap;
      off.temperature = 0.7f;
      off.masked = false;
      LrCase on = off;
      on.smooth = true;
      on.count = true;
      const LrInput in = make_lr(off);
      const std::string what = describe(on);
      for (bool cuda : {true, false}) {
        LrRun r_off, r_on;
        {
          EmulatorOrder order(false);
          r_off = run_lr(off, in, cuda);
          r_on = run_lr(on, in, cuda);
        }
        const std::string where = what + (cuda ? " emulated" : " cpu");
        ASSERT_EQ(r_on.error, "") << where;
        same_bits(r_on.lse, r_off.lse, where + " lse");
        same_bits(r_on.mean, r_off.mean, where + " mean_z");
        same_bits(r_on.ent, r_off.ent, where + " entropy");
        same_bits(r_on.grad, r_off.grad, where + " gradient");
        for (int64_t i = 0; i < on.n; ++i)
          EXPECT_EQ(r_on.unmasked[i], i == 4 ? 0.0 : static_cast<double>(on.v)) << where << i;
      }
    }
}

}  // namespace
}  // namespace divkit_test
