// The label heads' CUDA chunk loop (src/fused_linear/label_loop_cuda.cu, head_cuda.cu) run on the
// CPU by the CUDA emulator and its cuBLAS (DIVKIT_CUDA=EMULATE builds only): the public
// fused_linear_cross_entropy / fused_linear_logprobs / fused_linear_logprobs_backward with every
// view marked CUDA, against the same call on the CPU head. Each emulated call runs twice, the
// second time in reverse thread and block order with another garbage byte in fresh device memory,
// and must give the same bits. Tolerances: float32 heads agree to float32 rounding (other GEMM
// and sum orders); bfloat16 / float16 heads' gradients carry the rounding of the logit gradient
// to the head's dtype for the gradient GEMMs (head_cuda.h), which the CPU head does not do.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "core/cuda_emulator_control.h"
#include "cuda_emulated_util.h"
#include "divkit/divergence.h"
#include "divkit/fused_linear.h"
#include "divkit/sparse.h"
#include "test_util.h"

namespace divkit_test {
namespace {

using divkit::CrossEntropySpec;
using divkit::LabelStatsOutputs;
using divkit::LinearHead;
using divkit::LinearHeadGrads;
using divkit::LogprobsSpec;

struct HeadCase {
  int64_t n = 7, v = 29, h = 11;
  DType dtype = DType::f32;      // hidden and weight
  DType out_dtype = DType::f32;  // gradient and statistics outputs
  int64_t chunk = 3;
  bool bias = true, masked = false;  // masked: bias[2] = -inf
  bool ignore = true;                // labels[1] = ignore_index
  bool weights = false;
  float eps = 0.0f, zl = 0.0f, softcap = 0.0f, temperature = 1.0f;
  Reduction reduction = Reduction::mean;
  double num_items = 0.0;
  int64_t topk = 3;
  int64_t row_stride_pad = 0;  // extra elements per row of hidden and weight
};

std::string describe(const HeadCase& c) {
  return std::string("dtype ") + divkit::dtype_name(c.dtype) + " out " +
         divkit::dtype_name(c.out_dtype) + " n " + std::to_string(c.n) + " v " +
         std::to_string(c.v) + " chunk " + std::to_string(c.chunk) + " eps " +
         std::to_string(c.eps) + " zl " + std::to_string(c.zl) + " cap " +
         std::to_string(c.softcap) + " T " + std::to_string(c.temperature) + " reduction " +
         std::to_string(static_cast<int>(c.reduction)) + (c.masked ? " masked" : "") +
         (c.weights ? " weights" : "");
}

struct Inputs {
  HostMatrix hidden, weight;
  std::vector<float> bias, token_weights;
  std::vector<int64_t> labels;
  std::vector<double> grad_lp, grad_ent;
};

Inputs make_inputs(const HeadCase& c, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  Inputs in;
  in.hidden = HostMatrix(c.n, c.h, c.dtype, c.h + c.row_stride_pad);
  in.weight = HostMatrix(c.v, c.h, c.dtype, c.h + c.row_stride_pad);
  for (int64_t i = 0; i < c.n; ++i)
    for (int64_t j = 0; j < c.h; ++j) in.hidden.set(i, j, nd(rng));
  for (int64_t i = 0; i < c.v; ++i)
    for (int64_t j = 0; j < c.h; ++j) in.weight.set(i, j, 0.5 * nd(rng));
  for (int64_t j = 0; j < c.v; ++j) in.bias.push_back(static_cast<float>(0.3 * nd(rng)));
  if (c.masked) in.bias[2] = -std::numeric_limits<float>::infinity();
  std::uniform_int_distribution<int64_t> lab(0, c.v - 1);
  for (int64_t i = 0; i < c.n; ++i) {
    int64_t y = lab(rng);
    if (c.masked && y == 2) y = 3;
    in.labels.push_back(y);
  }
  if (c.ignore && c.n > 1) in.labels[1] = -100;
  for (int64_t i = 0; i < c.n; ++i) {
    in.token_weights.push_back(static_cast<float>(0.5 + (i % 3) * 0.25));
    in.grad_lp.push_back(nd(rng));
    in.grad_ent.push_back(0.5 * nd(rng));
  }
  return in;
}

// Every output of one call, as doubles.
struct HeadRun {
  std::vector<double> loss, gh, gw, gb, logprobs, entropy, lse, topk, sq, top1;
};

// An [n] output buffer of `dtype` (f32, f64, i32 or i64) with its view, read back as doubles.
class OutVec {
 public:
  OutVec(int64_t n, DType dtype)
      : n_(n), dtype_(dtype), bytes_(size_t(std::max<int64_t>(n, 1)) * 8, 0xEE) {}
  TensorView view(bool cuda) { return placed(TensorView::vector(bytes_.data(), dtype_, n_), cuda); }
  std::vector<double> values() const {
    std::vector<double> out(n_);
    for (int64_t i = 0; i < n_; ++i) {
      const uint8_t* p = bytes_.data() + i * divkit::dtype_size(dtype_);
      switch (dtype_) {
        case DType::f32: out[i] = *reinterpret_cast<const float*>(p); break;
        case DType::f64: out[i] = *reinterpret_cast<const double*>(p); break;
        case DType::i32: out[i] = *reinterpret_cast<const int32_t*>(p); break;
        default: out[i] = static_cast<double>(*reinterpret_cast<const int64_t*>(p)); break;
      }
    }
    return out;
  }

 private:
  int64_t n_;
  DType dtype_;
  std::vector<uint8_t> bytes_;
};

enum class Op { cross_entropy, logprobs, logprobs_backward };

HeadRun run_head(Op op, const HeadCase& c, Inputs& in, bool cuda, bool check_finite = true) {
  LinearHead head;
  head.hidden = placed(in.hidden.view(), cuda);
  head.weight = placed(in.weight.view(), cuda);
  if (c.bias) head.bias = placed(TensorView::vector(in.bias.data(), DType::f32, c.v), cuda);
  const TensorView labels = placed(TensorView::vector(in.labels.data(), DType::i64, c.n), cuda);
  const bool grads_wanted = op != Op::logprobs;
  HostMatrix gh(c.n, c.h, c.out_dtype), gw(c.v, c.h, c.out_dtype);
  OutVec gb(c.v, c.out_dtype == DType::f64 ? DType::f64 : DType::f32);
  LinearHeadGrads grads;
  if (grads_wanted) {
    gh.fill(7.0);
    gw.fill(7.0);
    grads.hidden = placed(gh.view(), cuda);
    grads.weight = placed(gw.view(), cuda);
    if (c.bias) grads.bias = gb.view(cuda);
  }
  const DType sd = c.out_dtype == DType::f64 ? DType::f64 : DType::f32;
  OutVec lp(c.n, sd), ent(c.n, sd), lse(c.n, sd), topk(c.n, sd), sq(c.n, sd),
      top1(c.n, c.out_dtype == DType::f64 ? DType::i64 : DType::i32);
  LabelStatsOutputs stats;
  if (op != Op::logprobs_backward) {
    stats.logprobs = lp.view(cuda);
    stats.entropy = ent.view(cuda);
    stats.lse = lse.view(cuda);
    stats.topk_mass = topk.view(cuda);
    stats.topk = c.topk;
    stats.log_sum_sq_probs = sq.view(cuda);
    stats.is_top1 = top1.view(cuda);
  }
  const int64_t loss_n = c.reduction == Reduction::none ? c.n : 1;
  OutVec loss(loss_n, DType::f64);
  if (op == Op::cross_entropy) {
    CrossEntropySpec s;
    s.label_smoothing = c.eps;
    s.z_loss_scale = c.zl;
    s.softcap = c.softcap;
    s.reduction = c.reduction;
    s.num_items_in_batch = c.num_items;
    s.chunk_size = c.chunk;
    s.check_finite = check_finite;
    if (c.weights)
      s.weights = placed(TensorView::vector(in.token_weights.data(), DType::f32, c.n), cuda);
    TensorView lv = loss.view(cuda);
    if (c.reduction != Reduction::none)
      lv = placed(TensorView::vector(lv.data, DType::f64, 1), cuda);
    divkit::fused_linear_cross_entropy(head, labels, s, lv, grads, stats);
  } else {
    LogprobsSpec s;
    s.temperature = c.temperature;
    s.chunk_size = c.chunk;
    s.check_finite = check_finite;
    if (op == Op::logprobs) {
      divkit::fused_linear_logprobs(head, labels, s, stats);
    } else {
      divkit::fused_linear_logprobs_backward(
          head, labels, s, placed(TensorView::vector(in.grad_lp.data(), DType::f64, c.n), cuda),
          placed(TensorView::vector(in.grad_ent.data(), DType::f64, c.n), cuda), grads);
    }
  }
  HeadRun r;
  if (op == Op::cross_entropy) r.loss = loss.values();
  if (grads_wanted) {
    r.gh = gh.values();
    r.gw = gw.values();
    if (c.bias) r.gb = gb.values();
  }
  if (op != Op::logprobs_backward) {
    r.logprobs = lp.values();
    r.entropy = ent.values();
    r.lse = lse.values();
    r.topk = topk.values();
    r.sq = sq.values();
    r.top1 = top1.values();
  }
  return r;
}

void compare(const HeadRun& got, const HeadRun& want, double rtol_stats, double rtol_grad,
             const std::string& what) {
  expect_close(got.loss, want.loss, rtol_stats, what + " loss");
  expect_close(got.logprobs, want.logprobs, rtol_stats, what + " logprobs");
  expect_close(got.entropy, want.entropy, rtol_stats, what + " entropy");
  expect_close(got.lse, want.lse, rtol_stats, what + " lse");
  expect_close(got.topk, want.topk, rtol_stats, what + " topk_mass");
  expect_close(got.sq, want.sq, rtol_stats, what + " log_sum_sq_probs");
  expect_same_values(got.top1, want.top1, what + " is_top1");
  expect_close(got.gh, want.gh, rtol_grad, what + " grad_hidden");
  expect_close(got.gw, want.gw, rtol_grad, what + " grad_weight");
  expect_close(got.gb, want.gb, rtol_grad, what + " grad_bias");
}

void same_bits(const HeadRun& a, const HeadRun& b, const std::string& what) {
  for (auto [x, y, name] : {std::tuple{&a.loss, &b.loss, "loss"},
                            {&a.gh, &b.gh, "grad_hidden"},
                            {&a.gw, &b.gw, "grad_weight"},
                            {&a.gb, &b.gb, "grad_bias"},
                            {&a.logprobs, &b.logprobs, "logprobs"},
                            {&a.entropy, &b.entropy, "entropy"},
                            {&a.lse, &b.lse, "lse"},
                            {&a.topk, &b.topk, "topk"},
                            {&a.sq, &b.sq, "sq"},
                            {&a.top1, &b.top1, "top1"}})
    expect_same_values(*x, *y, what + " reverse order " + name);
}

void check_head(Op op, const HeadCase& c, uint32_t seed = 1) {
  const std::string what = describe(c);
  Inputs in = make_inputs(c, seed);
  const HeadRun cpu = run_head(op, c, in, false);
  const long long launches = divkit::cuda_emu::launch_count();
  HeadRun fwd, rev;
  {
    EmulatorOrder order(false);
    fwd = run_head(op, c, in, true);
  }
  EXPECT_GT(divkit::cuda_emu::launch_count(), launches) << what << ": no kernel ran";
  {
    EmulatorOrder order(true);
    rev = run_head(op, c, in, true);
  }
  same_bits(fwd, rev, what);
  const bool low = c.dtype != DType::f32;
  // Statistics: float32 logits from GEMMs of another order. Gradients of low-precision heads:
  // G rounded to the head's dtype (relative 2^-8 for bf16, 2^-11 for fp16, per entry).
  const double rtol_stats = 2e-5;
  const double rtol_grad = !low ? 2e-5 : c.dtype == DType::bf16 ? 2e-2 : 4e-3;
  const double out_tol = c.out_dtype == DType::bf16 ? 1e-2 : c.out_dtype == DType::f16 ? 2e-3 : 0.0;
  compare(fwd, cpu, rtol_stats, std::max(rtol_grad, out_tol), what);
}

TEST(CudaEmulatedFusedHead, CrossEntropyMatchesTheCpu) {
  HeadCase c;
  check_head(Op::cross_entropy, c);
  for (Reduction r : {Reduction::none, Reduction::sum, Reduction::batchmean}) {
    c.reduction = r;
    check_head(Op::cross_entropy, c);
  }
  c = HeadCase{};
  c.eps = 0.1f;
  c.zl = 1e-3f;
  c.weights = true;
  check_head(Op::cross_entropy, c);
  c.softcap = 5.0f;
  c.num_items = 4.5;
  check_head(Op::cross_entropy, c);
  c = HeadCase{};
  c.masked = true;  // a -inf bias entry without smoothing
  c.softcap = 3.0f;
  check_head(Op::cross_entropy, c);
  c.eps = 0.2f;  // smoothing over the unmasked entries, as the CPU head
  check_head(Op::cross_entropy, c);
  c = HeadCase{};
  c.bias = false;
  c.chunk = 0;  // the chosen chunk: one chunk here
  c.ignore = false;
  check_head(Op::cross_entropy, c);
  c.chunk = 1;
  c.n = 3;
  check_head(Op::cross_entropy, c);
}

TEST(CudaEmulatedFusedHead, CrossEntropyDtypesAndLayouts) {
  for (DType dt : {DType::f32, DType::bf16, DType::f16}) {
    for (DType out : {DType::f32, DType::bf16, DType::f64}) {
      HeadCase c;
      c.dtype = dt;
      c.out_dtype = out;
      c.n = 9;
      c.v = 40;
      c.h = 16;
      c.chunk = 4;
      c.row_stride_pad = dt == DType::f32 ? 3 : 0;
      check_head(Op::cross_entropy, c, 7);
    }
  }
}

TEST(CudaEmulatedFusedHead, LogprobsAndBackwardMatchTheCpu) {
  for (float t : {1.0f, 0.7f}) {
    for (DType dt : {DType::f32, DType::bf16}) {
      HeadCase c;
      c.temperature = t;
      c.dtype = dt;
      check_head(Op::logprobs, c, 3);
      check_head(Op::logprobs_backward, c, 3);
    }
  }
}

TEST(CudaEmulatedFusedHead, NoTokensGivesZeroGradients) {
  HeadCase c;
  c.n = 0;
  c.reduction = Reduction::sum;
  check_head(Op::cross_entropy, c);
  c.n = 4;
  Inputs in = make_inputs(c, 5);
  for (int64_t& y : in.labels) y = -100;  // every token ignored
  HeadRun cuda = run_head(Op::cross_entropy, c, in, true);
  HeadRun cpu = run_head(Op::cross_entropy, c, in, false);
  compare(cuda, cpu, 0.0, 0.0, "all ignored");
  for (double g : cuda.gw) EXPECT_EQ(g, 0.0);
}

// The error of a bad input is the CPU head's, after the whole call (one read at the end).
TEST(CudaEmulatedFusedHead, BadInputRaisesTheCpuError) {
  HeadCase c;
  c.weights = true;
  auto error_of = [&](Op op, Inputs& in, bool cuda) {
    try {
      run_head(op, c, in, cuda);
    } catch (const divkit::Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  auto expect_same_error = [&](Op op, Inputs& in, const std::string& needle) {
    const std::string cpu = error_of(op, in, false), gpu = error_of(op, in, true);
    EXPECT_EQ(gpu, cpu);
    EXPECT_NE(cpu.find(needle), std::string::npos) << cpu;
  };
  Inputs in = make_inputs(c, 11);
  in.labels[4] = c.v;
  expect_same_error(Op::cross_entropy, in, "labels[4] = 29 is out of range");
  in = make_inputs(c, 11);
  in.token_weights[5] = std::numeric_limits<float>::infinity();
  expect_same_error(Op::cross_entropy, in, "weights must be finite");
  in = make_inputs(c, 11);
  in.grad_lp[3] = std::nan("");
  expect_same_error(Op::logprobs_backward, in, "grad_logprobs and grad_entropy must be finite");
  in = make_inputs(c, 11);
  in.hidden.set(5, 2, std::numeric_limits<double>::infinity());
  const std::string gpu = error_of(Op::cross_entropy, in, true);
  EXPECT_NE(gpu.find("fused_linear_cross_entropy: the logits of token 5"), std::string::npos)
      << gpu;
  // A temperature so small that the logits overflow fp32 once divided by it (the row's max +inf,
  // its sums inf - inf): raised as the CPU does, not NaN log-probs.
  {
    HeadCase tiny = c;
    tiny.temperature = 1e-38f;
    Inputs tin = make_inputs(tiny, 11);
    const std::string cpu_t = [&] {
      try {
        run_head(Op::logprobs, tiny, tin, false);
      } catch (const divkit::Error& e) {
        return std::string(e.what());
      }
      return std::string("no error");
    }();
    std::string gpu_t = "no error";
    try {
      run_head(Op::logprobs, tiny, tin, true);
    } catch (const divkit::Error& e) {
      gpu_t = e.what();
    }
    EXPECT_EQ(gpu_t, cpu_t);
    EXPECT_NE(cpu_t.find("overflow float32 once divided by the temperature"), std::string::npos)
        << cpu_t;
  }
  // Without the check nothing raises, and the bad token shows as NaN.
  HeadRun r = run_head(Op::cross_entropy, c, in, true, /*check_finite=*/false);
  EXPECT_TRUE(std::isnan(r.loss[0]));
  EXPECT_TRUE(std::isnan(r.lse[5]));
  EXPECT_FALSE(std::isnan(r.lse[4]));
}

TEST(CudaEmulatedFusedHead, ArgumentsTheCudaLoopRefuses) {
  HeadCase c;
  Inputs in = make_inputs(c, 2);
  HostMatrix w64(c.v, c.h, DType::f64), h64(c.n, c.h, DType::f64);
  std::vector<double> loss(1);
  auto call = [&](const LinearHead& head, const CrossEntropySpec& s) {
    try {
      divkit::fused_linear_cross_entropy(
          head, placed(TensorView::vector(in.labels.data(), DType::i64, c.n), true), s,
          placed(TensorView::vector(loss.data(), DType::f64, 1), true));
    } catch (const divkit::Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  LinearHead head{placed(in.hidden.view(), true), placed(w64.view(), true), {}};
  EXPECT_NE(call(head, {}).find("weight is float64"), std::string::npos);
  head.weight = placed(in.weight.view(), true);
  head.hidden = placed(h64.view(), true);
  EXPECT_NE(call(head, {}).find("hidden (float64) and weight (float32) must have one dtype"),
            std::string::npos);
  head.hidden = in.hidden.view();  // on the CPU
  EXPECT_NE(call(head, {}).find("is on cuda:0 but hidden is on cpu"), std::string::npos)
      << call(head, {});
  head.hidden = placed(in.hidden.view(), true);
  CrossEntropySpec s;
  s.shard.all_reduce = [](double*, int64_t, divkit::CollectiveOp) {};
  EXPECT_NE(call(head, s).find("vocabulary-parallel shard is not supported on CUDA"),
            std::string::npos);
  s = {};
  s.label_smoothing = 1.0f;
  EXPECT_NE(call(head, s).find("label_smoothing must be in [0, 1)"), std::string::npos);
}

// ---- fused_linear_divergence -------------------------------------------------------------

struct DistillCase {
  DivergenceSpec spec;
  int64_t n = 7, v = 29, hs = 11, ht = 13;
  DType dtype = DType::f32;
  int64_t chunk = 3;
  bool bias = true, labels = true, weights = false, teacher_grads = true;
  float hard_weight = 0.0f, soft_weight = 1.0f;
  Reduction reduction = Reduction::mean;
};

std::string describe(const DistillCase& c) {
  return std::string(divkit::divergence_kind_name(c.spec.kind)) + " " +
         divkit::dtype_name(c.dtype) + " T " + std::to_string(c.spec.temperature) + " hard " +
         std::to_string(c.hard_weight) + " soft " + std::to_string(c.soft_weight) + " reduction " +
         std::to_string(static_cast<int>(c.reduction)) + " chunk " + std::to_string(c.chunk) +
         (c.weights ? " weights" : "");
}

struct DistillInputs {
  HostMatrix sh, sw, th, tw;
  std::vector<float> sb, tb, token_weights;
  std::vector<int64_t> labels;
};

DistillInputs make_distill_inputs(const DistillCase& c, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  DistillInputs in;
  auto fill = [&](HostMatrix& m, int64_t rows, int64_t cols, double scale) {
    m = HostMatrix(rows, cols, c.dtype);
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) m.set(i, j, scale * nd(rng));
  };
  fill(in.sh, c.n, c.hs, 1.0);
  fill(in.sw, c.v, c.hs, 0.5);
  fill(in.th, c.n, c.ht, 1.0);
  fill(in.tw, c.v, c.ht, 0.5);
  for (int64_t j = 0; j < c.v; ++j) {
    in.sb.push_back(static_cast<float>(0.3 * nd(rng)));
    in.tb.push_back(static_cast<float>(0.3 * nd(rng)));
  }
  std::uniform_int_distribution<int64_t> lab(0, c.v - 1);
  for (int64_t i = 0; i < c.n; ++i) {
    in.labels.push_back(lab(rng));
    in.token_weights.push_back(static_cast<float>(0.5 + (i % 4) * 0.25));
  }
  if (c.n > 2) in.labels[2] = -100;
  return in;
}

struct DistillRun {
  std::vector<double> loss, sgh, sgw, sgb, tgh, tgw, tgb;
};

DistillRun run_distill(const DistillCase& c, DistillInputs& in, bool cuda,
                       bool check_finite = true) {
  LinearHead s{placed(in.sh.view(), cuda), placed(in.sw.view(), cuda), {}};
  LinearHead t{placed(in.th.view(), cuda), placed(in.tw.view(), cuda), {}};
  if (c.bias) {
    s.bias = placed(TensorView::vector(in.sb.data(), DType::f32, c.v), cuda);
    t.bias = placed(TensorView::vector(in.tb.data(), DType::f32, c.v), cuda);
  }
  HostMatrix sgh(c.n, c.hs, DType::f32), sgw(c.v, c.hs, DType::f32), tgh(c.n, c.ht, DType::f32),
      tgw(c.v, c.ht, DType::f32);
  OutVec sgb(c.v, DType::f32), tgb(c.v, DType::f32);
  LinearHeadGrads sg{placed(sgh.view(), cuda), placed(sgw.view(), cuda),
                     c.bias ? sgb.view(cuda) : TensorView{}};
  LinearHeadGrads tg;
  if (c.teacher_grads)
    tg = {placed(tgh.view(), cuda), placed(tgw.view(), cuda),
          c.bias ? tgb.view(cuda) : TensorView{}};
  divkit::DivergenceOptions o;
  if (c.labels) o.labels = placed(TensorView::vector(in.labels.data(), DType::i64, c.n), cuda);
  if (c.weights)
    o.weights = placed(TensorView::vector(in.token_weights.data(), DType::f32, c.n), cuda);
  o.reduction = c.reduction;
  o.check_finite = check_finite;
  divkit::FusedLinearOptions f;
  f.chunk_size = c.chunk;
  f.hard_weight = c.hard_weight;
  f.soft_weight = c.soft_weight;
  OutVec loss(c.reduction == Reduction::none ? c.n : 1, DType::f64);
  divkit::fused_linear_divergence(s, t, c.spec, o, f, loss.view(cuda), sg, tg);
  DistillRun r;
  r.loss = loss.values();
  r.sgh = sgh.values();
  r.sgw = sgw.values();
  if (c.bias) r.sgb = sgb.values();
  if (c.teacher_grads) {
    r.tgh = tgh.values();
    r.tgw = tgw.values();
    if (c.bias) r.tgb = tgb.values();
  }
  return r;
}

void check_distill(const DistillCase& c, uint32_t seed = 1) {
  const std::string what = describe(c);
  DistillInputs in = make_distill_inputs(c, seed);
  const DistillRun cpu = run_distill(c, in, false);
  const long long launches = divkit::cuda_emu::launch_count();
  DistillRun fwd, rev;
  {
    EmulatorOrder order(false);
    fwd = run_distill(c, in, true);
  }
  EXPECT_GT(divkit::cuda_emu::launch_count(), launches) << what << ": no kernel ran";
  {
    EmulatorOrder order(true);
    rev = run_distill(c, in, true);
  }
  for (auto [a, b, name] : {std::tuple{&fwd.loss, &rev.loss, "loss"},
                            {&fwd.sgh, &rev.sgh, "grad_student_hidden"},
                            {&fwd.sgw, &rev.sgw, "grad_student_weight"},
                            {&fwd.sgb, &rev.sgb, "grad_student_bias"},
                            {&fwd.tgh, &rev.tgh, "grad_teacher_hidden"},
                            {&fwd.tgw, &rev.tgw, "grad_teacher_weight"},
                            {&fwd.tgb, &rev.tgb, "grad_teacher_bias"}})
    expect_same_values(*a, *b, what + " reverse order " + name);
  const double rtol = c.dtype == DType::f32 ? 2e-5 : c.dtype == DType::bf16 ? 2e-2 : 4e-3;
  expect_close(fwd.loss, cpu.loss, 2e-5, what + " loss");
  for (auto [a, b, name] : {std::tuple{&fwd.sgh, &cpu.sgh, "grad_student_hidden"},
                            {&fwd.sgw, &cpu.sgw, "grad_student_weight"},
                            {&fwd.sgb, &cpu.sgb, "grad_student_bias"},
                            {&fwd.tgh, &cpu.tgh, "grad_teacher_hidden"},
                            {&fwd.tgw, &cpu.tgw, "grad_teacher_weight"},
                            {&fwd.tgb, &cpu.tgb, "grad_teacher_bias"}})
    expect_close(*a, *b, rtol, what + " " + name);
}

// Without the soft term the teacher's logits are never computed: the device memory that grows
// with the chunk is the student's [chunk, V] logits alone (the teacher's head allocated a chunk
// of its own before).
TEST(CudaEmulatedFusedHead, DistillWithoutTheSoftTermAllocatesNoTeacherChunk) {
  DistillCase c;
  c.n = 64;
  c.v = 512;
  c.teacher_grads = false;
  c.hard_weight = 1.0f;
  c.soft_weight = 0.0f;
  DistillInputs in = make_distill_inputs(c, 3);
  auto bytes = [&](int64_t chunk) {
    c.chunk = chunk;
    const long long before = divkit::cuda_emu::allocated_bytes();
    run_distill(c, in, true);
    return divkit::cuda_emu::allocated_bytes() - before;
  };
  // What 63 more rows per chunk allocate: one [63, V] fp32 buffer is 63 V 4 bytes.
  const long long per_chunk = bytes(64) - bytes(1);
  const long long one_buffer = 63 * c.v * 4;
  EXPECT_GT(per_chunk, one_buffer / 2);
  EXPECT_LT(per_chunk, one_buffer * 3 / 2) << "a [chunk, V] buffer beside the student's";
  check_distill(c);  // and the values: zero teacher gradients, the hard term's loss
}

TEST(CudaEmulatedFusedHead, DistillEveryKindMatchesTheCpu) {
  for (int k = 0; k < divkit::kNumDivergenceKinds; ++k) {
    DistillCase c;
    c.spec.kind = static_cast<DivergenceKind>(k);
    c.spec.alpha = 0.7f;
    c.spec.beta = 0.3f;
    check_distill(c);
  }
}

TEST(CudaEmulatedFusedHead, DistillOptionsMatchTheCpu) {
  DistillCase c;
  c.spec.kind = DivergenceKind::jsd;
  c.spec.temperature = 2.0f;
  c.spec.scale_by_t_squared = true;
  c.weights = true;
  for (Reduction r : {Reduction::none, Reduction::sum, Reduction::mean, Reduction::batchmean}) {
    c.reduction = r;
    check_distill(c);
  }
  c.reduction = Reduction::mean;
  c.hard_weight = 0.4f;  // the hard term beside the soft one
  check_distill(c);
  c.soft_weight = 0.0f;  // the hard term alone: zero teacher gradients
  check_distill(c);
  c.hard_weight = 0.0f;  // neither: zero loss and gradients
  check_distill(c);
  c = DistillCase{};
  c.labels = false;
  c.bias = false;
  c.teacher_grads = false;
  c.chunk = 0;
  check_distill(c);
  for (DType dt : {DType::bf16, DType::f16}) {
    c = DistillCase{};
    c.dtype = dt;
    c.hard_weight = 0.5f;
    c.n = 9;
    c.hs = c.ht = 16;
    check_distill(c, 4);
  }
}

TEST(CudaEmulatedFusedHead, DistillBadInputRaisesTheCpuError) {
  DistillCase c;
  c.hard_weight = 0.5f;
  c.weights = true;
  auto error_of = [&](DistillInputs& in, bool cuda) {
    try {
      run_distill(c, in, cuda);
    } catch (const divkit::Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  DistillInputs in = make_distill_inputs(c, 9);
  in.labels[4] = c.v + 3;
  EXPECT_EQ(error_of(in, true), error_of(in, false));
  EXPECT_NE(error_of(in, true).find("labels[4] = 32 is out of range"), std::string::npos);
  in = make_distill_inputs(c, 9);
  in.token_weights[3] = std::nanf("");
  EXPECT_EQ(error_of(in, true), error_of(in, false));
  in = make_distill_inputs(c, 9);
  in.th.set(5, 1, std::numeric_limits<double>::infinity());
  // The CPU checks the hidden states as it converts them; CUDA sees the logits they make (row 2
  // of the chunk that starts at token 3).
  const std::string gpu = error_of(in, true);
  EXPECT_NE(error_of(in, false).find("teacher_hidden contains NaN or inf at row 5"),
            std::string::npos);
  EXPECT_NE(gpu.find("fused_linear_divergence: in the chunk of tokens starting at 3"),
            std::string::npos)
      << gpu;
  EXPECT_NE(gpu.find("teacher_logits contains NaN or +inf at row 2"), std::string::npos) << gpu;
  DistillRun r = run_distill(c, in, true, /*check_finite=*/false);
  EXPECT_TRUE(std::isnan(r.loss[0]));
  // What the core's CUDA loop refuses.
  c.soft_weight = 1.0f;
  in = make_distill_inputs(c, 9);
  LinearHead s{placed(in.sh.view(), true), placed(in.sw.view(), true), {}};
  LinearHead t{placed(in.th.view(), true), placed(in.tw.view(), true), {}};
  std::vector<double> loss(1);
  divkit::FusedLinearOptions f;
  std::vector<int64_t> ids(c.v);
  f.teacher_token_ids = placed(TensorView::vector(ids.data(), DType::i64, c.v), true);
  try {
    divkit::fused_linear_divergence(s, t, c.spec, {}, f,
                                    placed(TensorView::vector(loss.data(), DType::f64, 1), true));
    ADD_FAILURE() << "teacher_token_ids on CUDA did not raise";
  } catch (const divkit::Error& e) {
    EXPECT_NE(std::string(e.what()).find("no CUDA loop in the core"), std::string::npos)
        << e.what();
  }
}

// ---- fused_linear_sparse_divergence -------------------------------------------------------

// The sparse teacher: the k largest entries of a random teacher distribution per token, as
// (index, log-prob) pairs in a shuffled order.
struct SparseTeacher {
  std::vector<int64_t> idx;
  std::vector<double> lp;
  int64_t k = 0;
};

SparseTeacher make_sparse_teacher(int64_t n, int64_t v, int64_t k, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> nd(0.0, 2.0);
  SparseTeacher t;
  t.k = k;
  for (int64_t i = 0; i < n; ++i) {
    std::vector<double> z(v);
    for (double& x : z) x = nd(rng);
    double m = *std::max_element(z.begin(), z.end()), s = 0.0;
    for (double x : z) s += std::exp(x - m);
    const double lse = m + std::log(s);
    std::vector<int64_t> order(v);
    for (int64_t j = 0; j < v; ++j) order[j] = j;
    std::partial_sort(order.begin(), order.begin() + k, order.end(),
                      [&](int64_t a, int64_t b) { return z[a] > z[b]; });
    std::shuffle(order.begin(), order.begin() + k, rng);
    for (int64_t j = 0; j < k; ++j) {
      t.idx.push_back(order[j]);
      t.lp.push_back(z[order[j]] - lse);
    }
  }
  return t;
}

DistillRun run_sparse(const DistillCase& c, DistillInputs& in, SparseTeacher& t,
                      divkit::SparseTail tail, bool cuda) {
  LinearHead s{placed(in.sh.view(), cuda), placed(in.sw.view(), cuda), {}};
  if (c.bias) s.bias = placed(TensorView::vector(in.sb.data(), DType::f32, c.v), cuda);
  HostMatrix sgh(c.n, c.hs, DType::f32), sgw(c.v, c.hs, DType::f32);
  OutVec sgb(c.v, DType::f32);
  LinearHeadGrads sg{placed(sgh.view(), cuda), placed(sgw.view(), cuda),
                     c.bias ? sgb.view(cuda) : TensorView{}};
  divkit::DivergenceOptions o;
  if (c.labels) o.labels = placed(TensorView::vector(in.labels.data(), DType::i64, c.n), cuda);
  if (c.weights)
    o.weights = placed(TensorView::vector(in.token_weights.data(), DType::f32, c.n), cuda);
  o.reduction = c.reduction;
  divkit::FusedLinearOptions f;
  f.chunk_size = c.chunk;
  f.hard_weight = c.hard_weight;
  f.soft_weight = c.soft_weight;
  divkit::SparseOptions so;
  so.tail = tail;
  OutVec loss(c.reduction == Reduction::none ? c.n : 1, DType::f64);
  divkit::fused_linear_sparse_divergence(
      s, placed(TensorView::matrix(t.idx.data(), DType::i64, c.n, t.k), cuda),
      placed(TensorView::matrix(t.lp.data(), DType::f64, c.n, t.k), cuda), c.spec, so, o, f,
      loss.view(cuda), sg);
  DistillRun r;
  r.loss = loss.values();
  r.sgh = sgh.values();
  r.sgw = sgw.values();
  if (c.bias) r.sgb = sgb.values();
  return r;
}

TEST(CudaEmulatedFusedHead, SparseTeacherMatchesTheCpu) {
  for (int k = 0; k < divkit::kNumDivergenceKinds; k += 3) {
    for (divkit::SparseTail tail : {divkit::SparseTail::bucket, divkit::SparseTail::renormalize}) {
      DistillCase c;
      c.spec.kind = static_cast<DivergenceKind>(k);
      c.spec.alpha = 0.7f;
      c.spec.beta = 0.3f;
      c.hard_weight = k % 2 ? 0.3f : 0.0f;
      c.weights = k % 2 == 0;
      const std::string what =
          describe(c) + (tail == divkit::SparseTail::bucket ? " bucket" : " renormalize");
      DistillInputs in = make_distill_inputs(c, 21);
      SparseTeacher t = make_sparse_teacher(c.n, c.v, 5, 22);
      const DistillRun cpu = run_sparse(c, in, t, tail, false);
      const long long launches = divkit::cuda_emu::launch_count();
      DistillRun fwd, rev;
      {
        EmulatorOrder order(false);
        fwd = run_sparse(c, in, t, tail, true);
      }
      EXPECT_GT(divkit::cuda_emu::launch_count(), launches) << what;
      {
        EmulatorOrder order(true);
        rev = run_sparse(c, in, t, tail, true);
      }
      expect_same_values(fwd.loss, rev.loss, what + " reverse order loss");
      expect_same_values(fwd.sgw, rev.sgw, what + " reverse order grad_student_weight");
      expect_close(fwd.loss, cpu.loss, 2e-5, what + " loss");
      expect_close(fwd.sgh, cpu.sgh, 2e-5, what + " grad_student_hidden");
      expect_close(fwd.sgw, cpu.sgw, 2e-5, what + " grad_student_weight");
      expect_close(fwd.sgb, cpu.sgb, 2e-5, what + " grad_student_bias");
    }
  }
  // A bad teacher row: the CPU's message, naming the chunk and the row in it.
  DistillCase c;
  DistillInputs in = make_distill_inputs(c, 21);
  SparseTeacher t = make_sparse_teacher(c.n, c.v, 5, 22);
  t.idx[4 * 5 + 1] = t.idx[4 * 5];  // a repeated index at token 4
  auto error_of = [&](bool cuda) {
    try {
      run_sparse(c, in, t, divkit::SparseTail::bucket, cuda);
    } catch (const divkit::Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  const std::string cpu = error_of(false);
  EXPECT_EQ(error_of(true), cpu);
  EXPECT_NE(cpu.find("in the chunk of tokens starting at 3"), std::string::npos) << cpu;
}

}  // namespace
}  // namespace divkit_test
