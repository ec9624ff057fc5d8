// compare_rows (include/divkit/compare.h) against a plain reference in long double: every
// statistic per row, every input dtype, strided rows, -inf entries, rows whose max rises block
// after block, llama.cpp's quantized rows, token ids, thread independence, and the error paths.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "test_util.h"

namespace {

using divkit::CompareInput;
using divkit::CompareOptions;
using divkit::CompareOutputs;
using divkit::DType;
using divkit::LlamaCppRows;
using divkit::TensorView;
using divkit_test::expect_error;
using divkit_test::HostMatrix;
using divkit_test::kInf;

using LD = long double;

struct Row {
  double kl, js, tvd, dp, top1, nll, nll_base, dpn;
};

// One side of a row as log-probs and probabilities: normalized logits, or (floor given)
// log-probs used as they are with p = 0 at or below the floor.
void side(const std::vector<double>& x, bool logprobs, double floor, std::vector<LD>& l,
          std::vector<LD>& p, int64_t& top) {
  const size_t v = x.size();
  top = std::max_element(x.begin(), x.end()) - x.begin();  // the first maximum
  l.assign(v, 0);
  p.assign(v, 0);
  if (logprobs) {
    for (size_t j = 0; j < v; ++j) {
      l[j] = x[j];
      p[j] = x[j] <= floor ? 0.0L : std::exp(static_cast<LD>(x[j]));
    }
    return;
  }
  LD s = 0;
  for (size_t j = 0; j < v; ++j) s += std::exp(static_cast<LD>(x[j]) - x[top]);
  for (size_t j = 0; j < v; ++j) {
    l[j] = static_cast<LD>(x[j]) - x[top] - std::log(s);
    p[j] = std::exp(l[j]);
  }
}

Row reference(const std::vector<double>& xb, const std::vector<double>& xt, int64_t token,
              bool base_logprobs = false, double floor = -kInf) {
  std::vector<LD> lb, pb, lt, pt;
  int64_t tb, tt;
  side(xb, base_logprobs, floor, lb, pb, tb);
  side(xt, false, 0, lt, pt, tt);
  LD kl = 0, js = 0, tvd = 0;
  for (size_t j = 0; j < xb.size(); ++j) {
    const LD m = 0.5L * (pb[j] + pt[j]);
    if (pb[j] > 0) kl += pb[j] * (lb[j] - lt[j]);
    if (pb[j] > 0) js += pb[j] * (lb[j] - std::log(m));
    if (pt[j] > 0) js += pt[j] * (lt[j] - std::log(m));
    tvd += std::fabs(pb[j] - pt[j]);
  }
  Row r;
  r.kl = static_cast<double>(kl);
  r.js = static_cast<double>(0.5L * js);
  r.tvd = static_cast<double>(0.5L * tvd);
  r.dp = static_cast<double>(std::exp(lt[tb]) - std::exp(lb[tb]));
  r.top1 = tb == tt ? 1.0 : 0.0;
  if (token >= 0) {
    r.nll = static_cast<double>(-lt[token]);
    r.nll_base = static_cast<double>(-lb[token]);
    r.dpn = static_cast<double>(std::exp(lt[token]) - std::exp(lb[token]));
  }
  return r;
}

struct Outs {
  std::vector<double> kl, js, tvd, dp, top1, nll, nll_base, dpn;
  explicit Outs(int64_t n) : kl(n), js(n), tvd(n), dp(n), top1(n), nll(n), nll_base(n), dpn(n) {}
  CompareOutputs views(bool tokens) {
    auto vec = [](std::vector<double>& v) {
      return TensorView::vector(v.data(), DType::f64, static_cast<int64_t>(v.size()));
    };
    CompareOutputs o;
    o.kl = vec(kl);
    o.js = vec(js);
    o.tvd = vec(tvd);
    o.delta_p = vec(dp);
    o.top1 = vec(top1);
    if (tokens) {
      o.nll = vec(nll);
      o.nll_base = vec(nll_base);
      o.delta_p_next = vec(dpn);
    }
    return o;
  }
};

// |got - want| <= rtol |want| + atol, and infinities equal.
void expect_close(double got, double want, const std::string& what, double rtol = 1e-12,
                  double atol = 1e-15) {
  if (std::isinf(want)) {
    EXPECT_EQ(got, want) << what;
    return;
  }
  EXPECT_LE(std::fabs(got - want), rtol * std::fabs(want) + atol)
      << what << ": got " << got << ", want " << want;
}

void expect_rows(Outs& o, int64_t i, const Row& r, bool tokens, const std::string& what) {
  const std::string at = what + " row " + std::to_string(i);
  expect_close(o.kl[i], r.kl, at + " kl");
  expect_close(o.js[i], r.js, at + " js");
  expect_close(o.tvd[i], r.tvd, at + " tvd");
  expect_close(o.dp[i], r.dp, at + " delta_p");
  EXPECT_EQ(o.top1[i], r.top1) << at << " top1";
  if (tokens) {
    expect_close(o.nll[i], r.nll, at + " nll");
    expect_close(o.nll_base[i], r.nll_base, at + " nll_base");
    expect_close(o.dpn[i], r.dpn, at + " delta_p_next");
  }
}

std::vector<double> row_of(const HostMatrix& m, int64_t i) {
  std::vector<double> x(m.cols());
  for (int64_t j = 0; j < m.cols(); ++j) x[j] = m.get(i, j);
  return x;
}

// Base ~ N(0, 2^2), test = base + N(0, 0.5^2): a quantized model's logits next to the original.
void fill_pair(HostMatrix& b, HostMatrix& t, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> big(0.0, 2.0), small(0.0, 0.5);
  for (int64_t i = 0; i < b.rows(); ++i)
    for (int64_t j = 0; j < b.cols(); ++j) {
      const double x = big(rng);
      b.set(i, j, x);
      t.set(i, j, x + small(rng));
    }
}

void run_and_check(HostMatrix& b, HostMatrix& t, bool with_tokens, const std::string& what,
                   int threads = 0) {
  const int64_t n = b.rows(), v = b.cols();
  std::vector<int64_t> tok(n);
  for (int64_t i = 0; i < n; ++i) tok[i] = (i * 7919) % v;
  Outs o(n);
  CompareOptions opt;
  opt.num_threads = threads;
  const TensorView tv = with_tokens ? TensorView::vector(tok.data(), DType::i64, n) : TensorView{};
  divkit::compare_rows(b.view(), t.view(), tv, opt, o.views(with_tokens));
  for (int64_t i = 0; i < n; ++i)
    expect_rows(o, i, reference(row_of(b, i), row_of(t, i), with_tokens ? tok[i] : -1), with_tokens,
                what);
}

TEST(Compare, MatchesReferenceOverShapesAndDtypes) {
  const DType dts[] = {DType::f32, DType::f64, DType::f16, DType::bf16};
  for (int64_t v : {1, 3, 4, 511, 512, 513, 1031, 4099}) {
    for (DType bd : dts) {
      const DType td = bd == DType::f32 ? DType::f16 : DType::f32;  // mixed dtypes too
      HostMatrix b(5, v, bd), t(5, v, td, v + 3);                   // strided test rows
      fill_pair(b, t, static_cast<uint64_t>(v) * 31 + static_cast<int>(bd));
      for (bool tokens : {false, true})
        run_and_check(b, t, tokens,
                      "V=" + std::to_string(v) + " " + divkit_test::dtype_short(bd) +
                          (tokens ? " tokens" : ""));
    }
  }
}

TEST(Compare, LargeVocabulary) {
  HostMatrix b(3, 152064, DType::f32), t(3, 152064, DType::f32);
  fill_pair(b, t, 7);
  run_and_check(b, t, true, "V=152064");
}

TEST(Compare, MaxRisingInEveryBlock) {
  // Ascending logits: the running max rises in every block of the kernel, so every block's
  // exponentials are rescaled in pass 2.
  const int64_t v = 5000;
  HostMatrix b(2, v, DType::f32), t(2, v, DType::f32);
  for (int64_t j = 0; j < v; ++j) {
    b.set(0, j, 0.01 * j);
    t.set(0, j, 0.011 * j - 3.0);
    b.set(1, j, -0.02 * j);  // descending: the max is in the first block
    t.set(1, j, 0.002 * j);
  }
  run_and_check(b, t, true, "rising max");
}

TEST(Compare, MaskedEntries) {
  const int64_t v = 700;
  HostMatrix b(4, v, DType::f32), t(4, v, DType::f32);
  fill_pair(b, t, 11);
  for (int64_t j = 0; j < v; j += 3) b.set(0, j, -kInf);  // base masks a third
  for (int64_t j = 1; j < v; j += 5) t.set(1, j, -kInf);  // test masks some: KL = +inf
  for (int64_t j = 0; j < v; ++j)                         // both mask all but a few
    if (j % 97) {
      b.set(2, j, -kInf);
      t.set(2, j, -kInf);
    }
  for (int64_t j = 0; j < v - 1; ++j) b.set(3, j, -kInf);  // one entry left
  run_and_check(b, t, true, "masked");
  Outs o(4);
  divkit::compare_rows(b.view(), t.view(), TensorView{}, CompareOptions{}, o.views(false));
  EXPECT_EQ(o.kl[1], kInf);
  EXPECT_TRUE(std::isfinite(o.js[1]) && std::isfinite(o.tvd[1]));
}

TEST(Compare, TiesTakeTheFirstMaximum) {
  HostMatrix b(1, 9, DType::f32), t(1, 9, DType::f32);
  for (int64_t j = 0; j < 9; ++j) {
    b.set(0, j, j == 2 || j == 6 ? 1.0 : 0.0);
    t.set(0, j, j == 6 || j == 2 ? 1.0 : 0.0);
  }
  Outs o(1);
  divkit::compare_rows(b.view(), t.view(), TensorView{}, CompareOptions{}, o.views(false));
  EXPECT_EQ(o.top1[0], 1.0);
  t.set(0, 2, 0.5);
  divkit::compare_rows(b.view(), t.view(), TensorView{}, CompareOptions{}, o.views(false));
  EXPECT_EQ(o.top1[0], 0.0);
}

// llama.cpp rows: scale and min as float32, then the quantized values, padded to an even count.
struct LlamaRows {
  int64_t n, v, nv;
  std::vector<uint16_t> data;
  LlamaRows(int64_t rows, int64_t vocab, uint64_t seed)
      : n(rows), v(vocab), nv(2 * ((vocab + 1) / 2) + 4), data(rows * nv) {
    std::mt19937_64 rng(seed);
    std::uniform_int_distribution<int> u(0, 65535);
    for (int64_t i = 0; i < n; ++i) {
      const float scale = 16.0f / 65535.0f * (1.0f + 0.01f * i), lo = -16.5f - 0.1f * i;
      std::memcpy(&data[i * nv], &scale, 4);
      std::memcpy(&data[i * nv + 2], &lo, 4);
      for (int64_t j = 0; j < v; ++j) data[i * nv + 4 + j] = j % 4 ? u(rng) : 0;
    }
  }
  std::vector<double> row(int64_t i) const {
    float scale, lo;
    std::memcpy(&scale, &data[i * nv], 4);
    std::memcpy(&lo, &data[i * nv + 2], 4);
    std::vector<double> x(v);
    for (int64_t j = 0; j < v; ++j) {
      volatile float f = static_cast<float>(data[i * nv + 4 + j]) * scale;  // no FMA
      x[j] = static_cast<float>(f + lo);
    }
    return x;
  }
  LlamaCppRows rows() const {
    LlamaCppRows r;
    r.data = data.data();
    r.rows = n;
    r.vocab = v;
    return r;
  }
};

TEST(Compare, LlamaCppBase) {
  for (int64_t v : {5, 1000, 1001}) {
    LlamaRows base(4, v, 3);
    HostMatrix t(4, v, DType::f32);
    std::mt19937_64 rng(5);
    std::normal_distribution<double> noise(0.0, 0.3);
    for (int64_t i = 0; i < 4; ++i) {
      const std::vector<double> x = base.row(i);
      for (int64_t j = 0; j < v; ++j) t.set(i, j, x[j] + noise(rng));
    }
    std::vector<int64_t> tok(4);
    for (int64_t i = 0; i < 4; ++i) tok[i] = (3 * i + 1) % v;
    Outs o(4);
    CompareOptions opt;
    opt.base_floor = -16.0;
    divkit::compare_rows(CompareInput{{}, base.rows()}, CompareInput{t.view(), {}},
                         TensorView::vector(tok.data(), DType::i64, 4), opt, o.views(true));
    for (int64_t i = 0; i < 4; ++i)
      expect_rows(o, i, reference(base.row(i), row_of(t, i), tok[i], true, -16.0), true,
                  "llama.cpp base V=" + std::to_string(v));
    // The same rows as the test: normalized like logits.
    HostMatrix b(4, v, DType::f64);
    for (int64_t i = 0; i < 4; ++i)
      for (int64_t j = 0; j < v; ++j) b.set(i, j, base.row(i)[j]);
    divkit::compare_rows(CompareInput{t.view(), {}}, CompareInput{{}, base.rows()},
                         TensorView::vector(tok.data(), DType::i64, 4), CompareOptions{},
                         o.views(true));
    for (int64_t i = 0; i < 4; ++i)
      expect_rows(o, i, reference(row_of(t, i), base.row(i), tok[i]), true,
                  "llama.cpp test V=" + std::to_string(v));
  }
}

TEST(Compare, ThreadCountDoesNotChangeBits) {
  divkit_test::RuntimeGuard guard;
  HostMatrix b(37, 3001, DType::f32), t(37, 3001, DType::bf16);
  fill_pair(b, t, 19);
  Outs one(37), two(37);
  CompareOptions opt;
  opt.num_threads = 1;
  divkit::compare_rows(b.view(), t.view(), TensorView{}, opt, one.views(false));
  opt.num_threads = 3;
  divkit::compare_rows(b.view(), t.view(), TensorView{}, opt, two.views(false));
  EXPECT_EQ(0, std::memcmp(one.kl.data(), two.kl.data(), 37 * 8));
  EXPECT_EQ(0, std::memcmp(one.js.data(), two.js.data(), 37 * 8));
  EXPECT_EQ(0, std::memcmp(one.tvd.data(), two.tvd.data(), 37 * 8));
}

TEST(Compare, Errors) {
  HostMatrix b(3, 10, DType::f32), t(3, 10, DType::f32);
  fill_pair(b, t, 1);
  Outs o(3);
  auto call = [&](const TensorView& bv, const TensorView& tv, const TensorView& tok,
                  CompareOutputs out, CompareOptions opt = {}) {
    return [=] { divkit::compare_rows(bv, tv, tok, opt, out); };
  };
  const CompareOutputs ok = o.views(false);
  HostMatrix bad = b;
  bad.set(2, 4, std::nan(""));
  expect_error(call(bad.view(), t.view(), {}, ok), {"compare_rows", "base row 2", "NaN"});
  bad = t;
  bad.set(1, 0, kInf);
  expect_error(call(b.view(), bad.view(), {}, ok), {"compare_rows", "test row 1", "+inf"});
  bad.fill_row(1, -kInf);
  expect_error(call(b.view(), bad.view(), {}, ok), {"test row 1", "no finite value"});
  HostMatrix other(3, 11, DType::f32);
  expect_error(call(b.view(), other.view(), {}, ok), {"compare_rows", "test has shape"});
  std::vector<int64_t> tok = {0, 10, 1};
  Outs o2(3);
  expect_error(call(b.view(), t.view(), TensorView::vector(tok.data(), DType::i64, 3),
                    o2.views(true)),
               {"compare_rows", "tokens[1] = 10", "out of range"});
  tok[1] = 2;
  expect_error(call(b.view(), t.view(), TensorView::vector(tok.data(), DType::i64, 3), ok),
               {"compare_rows", "nll is required"});
  expect_error(call(b.view(), t.view(), {}, o2.views(true)),
               {"compare_rows", "nll is given without tokens"});
  CompareOutputs wrong = ok;
  std::vector<float> f(3);
  wrong.js = TensorView::vector(f.data(), DType::f32, 3);
  expect_error(call(b.view(), t.view(), {}, wrong), {"compare_rows", "js must be float64"});
  wrong = ok;
  wrong.tvd = TensorView{};
  expect_error(call(b.view(), t.view(), {}, wrong), {"compare_rows", "tvd is required"});
  CompareOptions opt;
  opt.num_threads = -1;
  expect_error(call(b.view(), t.view(), {}, ok, opt), {"compare_rows", "num_threads"});
  opt = {};
  opt.base_floor = std::nan("");
  expect_error(call(b.view(), t.view(), {}, ok, opt), {"compare_rows", "base_floor"});
  std::vector<int32_t> ints(30);
  expect_error(call(TensorView::matrix(ints.data(), DType::i32, 3, 10), t.view(), {}, ok),
               {"compare_rows", "base must be float32"});
  LlamaRows lr(3, 10, 1);
  LlamaCppRows r = lr.rows();
  r.row_stride = 5;
  expect_error(
      [&] {
        divkit::compare_rows(CompareInput{{}, r}, CompareInput{t.view(), {}}, {}, {}, ok);
      },
      {"compare_rows", "base (llama.cpp rows) has row_stride 5"});
}

}  // namespace
