// The CUDA Sinkhorn solver (src/ot/sinkhorn_cuda.cu) run on the CPU by the CUDA emulator
// (DIVKIT_CUDA=EMULATE builds only; see src/core/cuda_emulator.h): divkit::sinkhorn with its
// views marked as CUDA against the same call on the CPU solver. float64 inputs agree with the CPU
// to rounding and take the same number of iterations; float32 inputs to float32 rounding (the CPU
// computes costs and exps in float32, the CUDA path in float64). Each emulated call runs twice,
// the second time with the threads and blocks in reverse order and another garbage byte in fresh
// device memory: the two must give the same bits. Between emulated calls, bitwise: a held cost
// against the one computed on the fly, a batch against its problems run alone, sync = false
// against sync = true. Bad input: the CPU's errors (sync = true), NaN results and converged = 0
// (sync = false). Sizes stay small: the emulator runs every thread of every block as a fiber.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <iterator>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "core/cuda_emulator_control.h"
#include "cuda_emulated_util.h"
#include "divkit/ot.h"

namespace {

using divkit::Device;
using divkit::DType;
using divkit::SinkhornInputs;
using divkit::SinkhornOptions;
using divkit::SinkhornOutputs;
using divkit::SinkhornStats;
using divkit::TensorView;
using divkit_test::EmulatorOrder;

constexpr double kInf = std::numeric_limits<double>::infinity();

// A host buffer of float32 or float64 values.
class Buffer {
 public:
  Buffer() = default;
  Buffer(size_t count, DType dt, double fill = 0.0) : dt_(dt) {
    if (dt == DType::f32) f_.assign(count, static_cast<float>(fill));
    else d_.assign(count, fill);
  }
  explicit Buffer(const std::vector<double>& v, DType dt) : Buffer(v.size(), dt) {
    for (size_t i = 0; i < v.size(); ++i) set(i, v[i]);
  }
  void set(size_t i, double v) {
    if (dt_ == DType::f32) f_[i] = static_cast<float>(v);
    else d_[i] = v;
  }
  double get(size_t i) const { return dt_ == DType::f32 ? f_[i] : d_[i]; }
  size_t size() const { return dt_ == DType::f32 ? f_.size() : d_.size(); }
  bool empty() const { return size() == 0; }
  void* data() { return dt_ == DType::f32 ? static_cast<void*>(f_.data()) : d_.data(); }
  DType dtype() const { return dt_; }
  std::vector<double> values() const {
    std::vector<double> v(size());
    for (size_t i = 0; i < v.size(); ++i) v[i] = get(i);
    return v;
  }
  bool same_bits(const Buffer& o) const {
    if (dt_ != o.dt_ || size() != o.size()) return false;
    return dt_ == DType::f32 ? std::memcmp(f_.data(), o.f_.data(), f_.size() * sizeof(float)) == 0
                             : std::memcmp(d_.data(), o.d_.data(), d_.size() * sizeof(double)) == 0;
  }

 private:
  DType dt_ = DType::f64;
  std::vector<float> f_;
  std::vector<double> d_;
};

// A [d0, d1, d2] (or [d0, d1] with d2 = 0) view of buf whose rows (the last dimension) are
// `row` elements apart (>= d2, or >= d1 for 2-D).
TensorView view_of(Buffer& buf, int64_t d0, int64_t d1, int64_t d2, int64_t row, bool cuda) {
  TensorView v;
  v.data = buf.data();
  v.dtype = buf.dtype();
  if (d2 > 0) {
    v.ndim = 3;
    v.shape[0] = d0;
    v.shape[1] = d1;
    v.shape[2] = d2;
    v.strides[2] = 1;
    v.strides[1] = row;
    v.strides[0] = d1 * row;
  } else {
    v.ndim = 2;
    v.shape[0] = d0;
    v.shape[1] = d1;
    v.strides[1] = 1;
    v.strides[0] = row;
  }
  if (cuda) {
    v.device = Device::cuda;
    v.device_index = 0;
  }
  return v;
}

std::vector<double> randn(size_t n, unsigned seed, double scale = 1.0, double shift = 0.0) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> dist(0.0, scale);
  std::vector<double> v(n);
  for (auto& x : v) x = dist(gen) + shift;
  return v;
}
// B rows of cnt positive weights, each row summing to `mass`.
std::vector<double> rand_weights(int64_t B, int64_t cnt, unsigned seed, double mass = 1.0) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<double> dist(0.2, 1.0);
  std::vector<double> v(static_cast<size_t>(B * cnt));
  for (int64_t b = 0; b < B; ++b) {
    double s = 0;
    for (int64_t i = 0; i < cnt; ++i) s += (v[static_cast<size_t>(b * cnt + i)] = dist(gen));
    for (int64_t i = 0; i < cnt; ++i) v[static_cast<size_t>(b * cnt + i)] *= mass / s;
  }
  return v;
}

// One call's inputs: points (x [B, n, d], y [B, m, d]) or a cost [B, n, m], in dtype; weights
// (empty: uniform) in wdtype; `pad` extra elements at the end of every input and output row
// (strided views).
struct Problem {
  int64_t B = 1, n = 0, m = 0, d = 2;
  DType dtype = DType::f64, wdtype = DType::f64;
  std::vector<double> x, y, cost, a, b;
  int64_t pad = 0;
};

struct Want {
  bool plan = true;
  DType plan_dtype = DType::f64;
  bool grads = true;  // grad_x, grad_y (points), grad_a, grad_b, as the flags below say
  bool gx = true, gy = true, ga = true, gb = true;
  bool stats = false;  // the [B, 6] stats output
};

struct Result {
  std::vector<SinkhornStats> st;
  Buffer f, g, plan, gx, gy, ga, gb, stats;
  std::string error;
};

// Fills the padded buffer of a [rows, cols] (rows = B n etc.) input with v, pad left at `fill`.
Buffer padded_input(const std::vector<double>& v, int64_t rows, int64_t cols, int64_t pad,
                    DType dt) {
  Buffer buf(static_cast<size_t>(rows * (cols + pad)), dt, 1e30);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      buf.set(static_cast<size_t>(r * (cols + pad) + c), v[static_cast<size_t>(r * cols + c)]);
  return buf;
}

// Output buffers start at this value: the padding must keep it.
constexpr double kUntouched = -12345.0;

Result run(const Problem& pb, const SinkhornOptions& opt, const Want& w, bool cuda) {
  const int64_t B = pb.B, n = pb.n, m = pb.m, d = pb.d, pad = pb.pad;
  const bool points = pb.cost.empty();
  Buffer x, y, c, a, b;
  SinkhornInputs in;
  if (points) {
    x = padded_input(pb.x, B * n, d, pad, pb.dtype);
    y = padded_input(pb.y, B * m, d, pad, pb.dtype);
    in.x = view_of(x, B, n, d, d + pad, cuda);
    in.y = view_of(y, B, m, d, d + pad, cuda);
  } else {
    c = padded_input(pb.cost, B * n, m, pad, pb.dtype);
    in.cost = view_of(c, B, n, m, m + pad, cuda);
  }
  if (!pb.a.empty()) {
    a = padded_input(pb.a, B, n, pad, pb.wdtype);
    in.a = view_of(a, B, n, 0, n + pad, cuda);
  }
  if (!pb.b.empty()) {
    b = padded_input(pb.b, B, m, pad, pb.wdtype);
    in.b = view_of(b, B, m, 0, m + pad, cuda);
  }
  Result r;
  auto out2 = [&](Buffer& buf, int64_t cnt) {
    buf = Buffer(static_cast<size_t>(B * (cnt + pad)), DType::f64, kUntouched);
    return view_of(buf, B, cnt, 0, cnt + pad, cuda);
  };
  auto out3 = [&](Buffer& buf, int64_t cnt, int64_t cols, DType dt) {
    buf = Buffer(static_cast<size_t>(B * cnt * (cols + pad)), dt, kUntouched);
    return view_of(buf, B, cnt, cols, cols + pad, cuda);
  };
  SinkhornOutputs out;
  out.f = out2(r.f, n);
  out.g = out2(r.g, m);
  if (w.plan) out.plan = out3(r.plan, n, m, w.plan_dtype);
  if (w.grads) {
    if (points && w.gx) out.grad_x = out3(r.gx, n, d, DType::f64);
    if (points && w.gy) out.grad_y = out3(r.gy, m, d, DType::f64);
    if (w.ga) out.grad_a = out2(r.ga, n);
    if (w.gb) out.grad_b = out2(r.gb, m);
  }
  if (w.stats || !opt.sync) {
    r.stats = Buffer(static_cast<size_t>(B * 6), DType::f64, kUntouched);
    out.stats = view_of(r.stats, B, 6, 0, 6, cuda);
  }
  try {
    r.st = divkit::sinkhorn(in, opt, out);
  } catch (const divkit::Error& e) {
    r.error = e.what();
  }
  return r;
}

bool same_stats(const SinkhornStats& u, const SinkhornStats& v) {
  auto eq = [](double p, double q) {
    return std::memcmp(&p, &q, sizeof p) == 0 || (std::isnan(p) && std::isnan(q));
  };
  return eq(u.transport_cost, v.transport_cost) && eq(u.reg_cost, v.reg_cost) &&
         eq(u.mass, v.mass) && u.n_iter == v.n_iter && eq(u.marginal_error, v.marginal_error) &&
         u.converged == v.converged;
}

std::string stats_string(const SinkhornStats& s) {
  return "tc " + std::to_string(s.transport_cost) + " reg " + std::to_string(s.reg_cost) +
         " mass " + std::to_string(s.mass) + " it " + std::to_string(s.n_iter) + " err " +
         std::to_string(s.marginal_error) + " conv " + std::to_string(s.converged);
}

// Every output of two runs bit for bit (NaN equal to NaN in the stats).
void expect_same_bits(const Result& u, const Result& v, const std::string& what) {
  EXPECT_EQ(u.error, v.error) << what;
  ASSERT_EQ(u.st.size(), v.st.size()) << what;
  for (size_t b = 0; b < u.st.size(); ++b)
    EXPECT_TRUE(same_stats(u.st[b], v.st[b]))
        << what << ": stats of problem " << b << ": " << stats_string(u.st[b]) << " vs "
        << stats_string(v.st[b]);
  const std::pair<const Buffer*, const Buffer*> pairs[] = {
      {&u.f, &v.f},   {&u.g, &v.g},   {&u.plan, &v.plan}, {&u.gx, &v.gx},
      {&u.gy, &v.gy}, {&u.ga, &v.ga}, {&u.gb, &v.gb},     {&u.stats, &v.stats}};
  const char* names[] = {"f", "g", "plan", "grad_x", "grad_y", "grad_a", "grad_b", "stats"};
  for (size_t k = 0; k < std::size(pairs); ++k) {
    const Buffer& p = *pairs[k].first;
    const Buffer& q = *pairs[k].second;
    if (p.empty() && q.empty()) continue;
    if (k == 7) {  // stats may hold NaN
      bool same = p.size() == q.size();
      for (size_t i = 0; same && i < p.size(); ++i)
        same = (std::isnan(p.get(i)) && std::isnan(q.get(i))) || p.get(i) == q.get(i);
      EXPECT_TRUE(same) << what << ": " << names[k];
    } else {
      EXPECT_TRUE(p.same_bits(q)) << what << ": " << names[k];
    }
  }
}

// got against want within rtol times the largest |want| (padding entries, == kUntouched in
// want, must be kUntouched in got too).
void expect_close(const Buffer& got, const Buffer& want, double rtol, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  double scale = 0.0;
  for (size_t i = 0; i < want.size(); ++i)
    if (want.get(i) != kUntouched) scale = std::max(scale, std::abs(want.get(i)));
  int64_t bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double g = got.get(i), w = want.get(i);
    const bool ok = w == kUntouched ? g == kUntouched : std::abs(g - w) <= rtol * scale + 1e-300;
    if (!ok && ++bad <= 3)
      ADD_FAILURE() << what << ": [" << i << "] emulated " << g << " cpu " << w << " (scale "
                    << scale << ")";
  }
  EXPECT_EQ(bad, 0) << what;
}

struct Tol {
  double rel = 1e-9;       // outputs, relative to their largest magnitude
  bool same_iters = true;  // n_iter and converged equal
};

// The emulated call (both orders, bitwise equal; the CUDA path ran) against the CPU's. Returns
// the emulated result.
Result check(const Problem& pb, const SinkhornOptions& opt, const Want& w, const Tol& tol,
             const std::string& what) {
  SinkhornOptions cpu_opt = opt;
  cpu_opt.sync = true;
  Want cpu_w = w;
  cpu_w.stats = true;
  const Result cpu = run(pb, cpu_opt, cpu_w, false);
  Result emu;
  const long long launches = divkit::cuda_emu::launch_count();
  {
    EmulatorOrder order(false);
    emu = run(pb, opt, w, true);
  }
  EXPECT_GT(divkit::cuda_emu::launch_count(), launches) << what << ": no kernel ran";
  Result rev;
  {
    EmulatorOrder order(true);
    rev = run(pb, opt, w, true);
  }
  expect_same_bits(emu, rev, what + " (forward vs reverse order)");
  EXPECT_EQ(cpu.error, "") << what;
  EXPECT_EQ(emu.error, "") << what;
  if (!cpu.error.empty() || !emu.error.empty()) return emu;
  // The per-problem results: the returned vector (sync) or the stats output (sync = false).
  std::vector<SinkhornStats> est = emu.st;
  if (!opt.sync) {
    EXPECT_TRUE(emu.st.empty()) << what;
    est.resize(static_cast<size_t>(pb.B));
    for (int64_t b = 0; b < pb.B; ++b) {
      auto o = [&](int k) { return emu.stats.get(static_cast<size_t>(b * 6 + k)); };
      SinkhornStats& s = est[static_cast<size_t>(b)];
      s.transport_cost = o(0);
      s.reg_cost = o(1);
      s.mass = o(2);
      s.n_iter = static_cast<int64_t>(o(3));
      s.marginal_error = o(4);
      s.converged = o(5) != 0.0;
    }
  } else if (w.stats) {
    for (int64_t b = 0; b < pb.B; ++b) {
      const SinkhornStats& s = emu.st[static_cast<size_t>(b)];
      const double row[6] = {s.transport_cost, s.reg_cost,       s.mass,
                             double(s.n_iter), s.marginal_error, s.converged ? 1.0 : 0.0};
      for (int k = 0; k < 6; ++k)
        EXPECT_EQ(emu.stats.get(static_cast<size_t>(b * 6 + k)), row[k])
            << what << ": stats output [" << b << ", " << k << "]";
    }
  }
  EXPECT_EQ(est.size(), cpu.st.size()) << what;
  for (size_t b = 0; b < std::min(est.size(), cpu.st.size()); ++b) {
    const SinkhornStats &e = est[b], &c = cpu.st[b];
    const std::string wb = what + " problem " + std::to_string(b) + ": emulated " +
                           stats_string(e) + " cpu " + stats_string(c);
    if (tol.same_iters) {
      EXPECT_EQ(e.n_iter, c.n_iter) << wb;
      EXPECT_EQ(e.converged, c.converged) << wb;
    }
    const double r = tol.rel;
    EXPECT_NEAR(e.transport_cost, c.transport_cost, r * std::abs(c.transport_cost) + 1e-300) << wb;
    EXPECT_NEAR(e.mass, c.mass, r * std::abs(c.mass)) << wb;
    // The dual objective cancels: relative to its terms' scale (the potentials' times the mass).
    EXPECT_NEAR(e.reg_cost, c.reg_cost, r * (std::abs(c.reg_cost) + c.transport_cost) + 1e-300)
        << wb;
    if (tol.same_iters && c.converged) {
      EXPECT_LE(e.marginal_error, std::max(opt.tol, 2 * c.marginal_error)) << wb;
    }
  }
  expect_close(emu.f, cpu.f, tol.rel, what + " f");
  expect_close(emu.g, cpu.g, tol.rel, what + " g");
  if (w.plan) expect_close(emu.plan, cpu.plan, tol.rel, what + " plan");
  if (w.grads) {
    if (!emu.gx.empty()) expect_close(emu.gx, cpu.gx, tol.rel, what + " grad_x");
    if (!emu.gy.empty()) expect_close(emu.gy, cpu.gy, tol.rel, what + " grad_y");
    if (!emu.ga.empty()) expect_close(emu.ga, cpu.ga, tol.rel, what + " grad_a");
    if (!emu.gb.empty()) expect_close(emu.gb, cpu.gb, tol.rel, what + " grad_b");
  }
  return emu;
}

// An emulated call alone (forward order).
Result emulated(const Problem& pb, const SinkhornOptions& opt, const Want& w) {
  EmulatorOrder order(false);
  return run(pb, opt, w, true);
}

Problem points_problem(int64_t B, int64_t n, int64_t m, int64_t d, unsigned seed,
                       bool weights = true) {
  Problem pb;
  pb.B = B;
  pb.n = n;
  pb.m = m;
  pb.d = d;
  pb.x = randn(static_cast<size_t>(B * n * d), seed);
  pb.y = randn(static_cast<size_t>(B * m * d), seed + 1, 1.3, 0.4);
  if (weights) {
    pb.a = rand_weights(B, n, seed + 2);
    pb.b = rand_weights(B, m, seed + 3);
  }
  return pb;
}

// Problem b of a batch, alone.
Problem slice(const Problem& pb, int64_t b) {
  Problem one = pb;
  one.B = 1;
  auto part = [&](const std::vector<double>& v, int64_t per) {
    if (v.empty()) return v;
    return std::vector<double>(v.begin() + b * per, v.begin() + (b + 1) * per);
  };
  one.x = part(pb.x, pb.n * pb.d);
  one.y = part(pb.y, pb.m * pb.d);
  one.cost = part(pb.cost, pb.n * pb.m);
  one.a = part(pb.a, pb.n);
  one.b = part(pb.b, pb.m);
  return one;
}

std::string describe(const Problem& pb, const SinkhornOptions& o) {
  std::string s = "B " + std::to_string(pb.B) + " n " + std::to_string(pb.n) + " m " +
                  std::to_string(pb.m) +
                  (pb.cost.empty() ? " d " + std::to_string(pb.d) : " cost") +
                  (pb.dtype == DType::f32 ? " f32" : " f64") + " p " + std::to_string(o.p) +
                  " eps " + std::to_string(o.eps);
  if (!std::isinf(o.rho_a)) s += " rho_a " + std::to_string(o.rho_a);
  if (!std::isinf(o.rho_b)) s += " rho_b " + std::to_string(o.rho_b);
  if (o.eps_scaling > 0) s += " scaling " + std::to_string(o.eps_scaling);
  if (o.cost_cache_bytes == 0) s += " on the fly";
  if (o.symmetric) s += " symmetric";
  if (!o.sync) s += " sync false";
  return s;
}

// ---- against the CPU solver ------------------------------------------------------------------

// Points: p = 1 and 2, balanced and unbalanced (on one side or both), the cost held and on the
// fly, every output, float64 (to rounding, the same iterations) and float32 (to float32
// rounding).
TEST(CudaEmulatedOt, PointsMatchTheCpu) {
  for (int p : {2, 1})
    for (double rho : {kInf, 0.7})
      for (bool held : {true, false}) {
        Problem pb = points_problem(1, 19, 13, 3, 10 + p);
        SinkhornOptions o;
        o.p = p;
        o.eps = p == 2 ? 2.0 : 0.5;
        o.rho_a = rho;
        o.rho_b = held ? rho : kInf;  // one side unbalanced on the fly
        if (!std::isinf(o.rho_a) && std::isinf(o.rho_b)) {
          // An unbalanced problem needs no equal masses.
          for (auto& v : pb.a) v *= 1.7;
        }
        o.tol = 1e-8;
        o.max_iter = 300;
        o.cost_cache_bytes = held ? int64_t{64} << 20 : 0;
        pb.pad = held ? 0 : 2;  // strided inputs and outputs
        // Some calls ask for a part of the gradients (the final pass over the columns runs
        // for grad_y or grad_b alone).
        Want w;
        w.gy = p == 2;
        w.gb = rho == kInf;
        w.ga = held;
        check(pb, o, w, Tol{}, describe(pb, o));
      }
}

TEST(CudaEmulatedOt, Float32InputsMatchTheCpuToFloat32Rounding) {
  for (int p : {2, 1}) {
    Problem pb = points_problem(1, 17, 23, 4, 20 + p);
    pb.dtype = DType::f32;
    pb.wdtype = DType::f32;
    SinkhornOptions o;
    o.p = p;
    o.eps = 0.5;
    o.tol = 1e-4;
    o.max_iter = 200;
    Want w;
    w.plan_dtype = DType::f32;
    Tol t;
    t.rel = 2e-5;
    t.same_iters = false;
    const Result e = check(pb, o, w, t, describe(pb, o));
    ASSERT_EQ(e.st.size(), 1u);
    EXPECT_TRUE(e.st[0].converged);
  }
}

// A given cost matrix (float64 and float32, strided), with eps scaling from its largest entry.
TEST(CudaEmulatedOt, CostMatrixMatchesTheCpu) {
  for (DType dt : {DType::f64, DType::f32})
    for (double scaling : {0.0, 0.6}) {
      Problem pb;
      pb.B = 2;
      pb.n = 14;
      pb.m = 11;
      pb.dtype = pb.wdtype = dt;
      // Some negative entries: eps scaling starts from the largest |C|.
      pb.cost = randn(static_cast<size_t>(pb.B * pb.n * pb.m), 31, 0.6, 0.8);
      pb.a = rand_weights(pb.B, pb.n, 32);
      pb.b = rand_weights(pb.B, pb.m, 33);
      pb.pad = 3;
      SinkhornOptions o;
      o.eps = 0.3;
      o.eps_scaling = scaling;
      o.tol = dt == DType::f32 ? 1e-5 : 1e-8;
      o.max_iter = 400;
      Want w;
      w.stats = true;
      Tol t;
      if (dt == DType::f32) {
        t.rel = 1e-4;
        t.same_iters = false;
      }
      check(pb, o, w, t, describe(pb, o) + (scaling > 0 ? " scaling" : ""));
    }
}

// Epsilon scaling with points and zero weights; more columns than a block has threads (the final
// pass's gradient chunks, strided loops over the columns); many coordinates; one point.
TEST(CudaEmulatedOt, EpsScalingZeroWeightsAndEdgeShapes) {
  {
    Problem pb = points_problem(1, 21, 16, 2, 40);
    pb.a[3] = 0.0;  // zero weights: log 0 = -inf must give no NaN
    pb.b[0] = 0.0;
    double sa = 0, sb = 0;
    for (double v : pb.a) sa += v;
    for (double v : pb.b) sb += v;
    for (auto& v : pb.b) v *= sa / sb;
    SinkhornOptions o;
    o.eps = 1.0;
    o.eps_scaling = 0.5;
    o.tol = 1e-8;
    o.max_iter = 200;
    o.check_every = 3;
    check(pb, o, Want{}, Tol{}, describe(pb, o) + " zero weights check_every 3");
  }
  {
    // m = 300 > 256 threads: two column chunks; a few iterations, not converged.
    Problem pb = points_problem(1, 9, 300, 2, 41, false);
    SinkhornOptions o;
    o.eps = 0.2;
    o.tol = 1e-12;
    o.max_iter = 4;
    const Result e = check(pb, o, Want{}, Tol{}, describe(pb, o));
    ASSERT_EQ(e.st.size(), 1u);
    EXPECT_FALSE(e.st[0].converged);
    EXPECT_EQ(e.st[0].n_iter, 4);
  }
  {
    // d = 40: the CPU's cached cost by the |x|^2 + |y|^2 - 2 x.y expansion (d > 8), the CUDA
    // path's by direct differences; more coordinates than a final-pass block has threads per row.
    Problem pb = points_problem(1, 9, 10, 40, 42);
    SinkhornOptions o;
    o.eps = 20.0;
    o.tol = 1e-8;
    o.max_iter = 100;
    check(pb, o, Want{}, Tol{}, describe(pb, o));
  }
  {
    // One point on each side.
    Problem pb = points_problem(1, 1, 1, 1, 43);
    SinkhornOptions o;
    o.eps = 0.5;
    o.max_iter = 10;
    const Result e = check(pb, o, Want{}, Tol{}, describe(pb, o));
    ASSERT_EQ(e.st.size(), 1u);
    EXPECT_TRUE(e.st[0].converged);
  }
}

// Self-transport: the averaged update, balanced and unbalanced, with eps scaling.
TEST(CudaEmulatedOt, SymmetricMatchesTheCpu) {
  for (auto [p, rho] : {std::pair{2, kInf}, std::pair{2, 1.5}, std::pair{1, kInf}}) {
    Problem pb = points_problem(2, 18, 18, 2, 50);
    pb.y = pb.x;
    pb.b = pb.a;
    SinkhornOptions o;
    o.p = p;  // p = 1: zero costs on the diagonal (a zero gradient weight)
    o.eps = 0.1;
    o.rho_a = o.rho_b = rho;
    o.symmetric = true;
    o.eps_scaling = 0.5;
    o.tol = 1e-10;
    o.max_iter = 300;
    const Result e = check(pb, o, Want{}, Tol{}, describe(pb, o));
    EXPECT_TRUE(e.f.same_bits(e.g));
    EXPECT_TRUE(e.gx.same_bits(e.gy));
  }
}

// float64 points with float32 weights and a float32 plan; an eps schedule longer than max_iter
// (the iterations end inside it: the final pass at eps from the potentials of a larger eps).
TEST(CudaEmulatedOt, MixedDtypesAndScheduleLongerThanMaxIter) {
  for (bool sym : {false, true}) {
    Problem pb = points_problem(1, 10, 10, 3, 100);
    pb.wdtype = DType::f32;
    if (sym) {
      pb.y = pb.x;
      pb.b = pb.a;
    }
    SinkhornOptions o;
    o.eps = 1.0;
    o.eps_scaling = 0.5;
    o.symmetric = sym;
    o.max_iter = 4;
    Want w;
    w.plan_dtype = DType::f32;
    Tol t;
    t.rel = 1e-7;  // the plan in float32
    const Result e = check(pb, o, w, t, describe(pb, o));
    ASSERT_EQ(e.st.size(), 1u);
    EXPECT_FALSE(e.st[0].converged);
    EXPECT_EQ(e.st[0].n_iter, 4);
  }
}

// ---- between emulated calls, bitwise ---------------------------------------------------------

TEST(CudaEmulatedOt, HeldCostEqualsOnTheFlyBitwise) {
  for (int p : {2, 1}) {
    Problem pb = points_problem(2, 12, 10, 5, 60 + p);
    SinkhornOptions o;
    o.p = p;
    o.eps = p == 2 ? 3.0 : 0.8;
    o.tol = 1e-8;
    o.max_iter = 200;
    const Result held = emulated(pb, o, Want{});
    o.cost_cache_bytes = 0;
    const Result fly = emulated(pb, o, Want{});
    expect_same_bits(held, fly, describe(pb, o) + " held vs on the fly");
    // The budget is for the whole batch: one byte short of it computes on the fly too.
    o.cost_cache_bytes = 2 * pb.B * pb.n * pb.m * 8 - 1;
    const Result under = emulated(pb, o, Want{});
    expect_same_bits(under, fly, describe(pb, o) + " budget one byte short");
  }
}

// A batch whose problems converge at different iterations (the early ones frozen while the
// others go on, past the host's read of the flags every 16 iterations) against each problem
// alone; unbalanced on one side, with eps scaling (per-problem schedules of different lengths).
TEST(CudaEmulatedOt, BatchEqualsProblemsAloneBitwise) {
  {
    const int64_t B = 3, n = 11, m = 9, d = 2;
    Problem pb = points_problem(B, n, m, d, 70);
    // Problem 1 much more spread out: a longer eps schedule and more iterations.
    for (int64_t i = n * d; i < 2 * n * d; ++i) pb.x[static_cast<size_t>(i)] *= 2.0;
    SinkhornOptions o;
    o.eps = 0.8;
    o.rho_b = 2.0;
    o.eps_scaling = 0.5;
    o.tol = 1e-8;
    o.max_iter = 300;
    Want w;
    w.stats = true;
    const Result batch = check(pb, o, w, Tol{}, describe(pb, o) + " batch");
    ASSERT_EQ(batch.st.size(), size_t(B));
    EXPECT_NE(batch.st[0].n_iter, batch.st[1].n_iter);
    for (int64_t b = 0; b < B; ++b) {
      const Result alone = emulated(slice(pb, b), o, w);
      const std::string what = describe(pb, o) + " problem " + std::to_string(b);
      ASSERT_EQ(alone.st.size(), 1u);
      EXPECT_TRUE(same_stats(alone.st[0], batch.st[static_cast<size_t>(b)]))
          << what << ": " << stats_string(alone.st[0]) << " vs "
          << stats_string(batch.st[static_cast<size_t>(b)]);
      auto part = [&](const Buffer& buf, int64_t per) {
        std::vector<double> v(static_cast<size_t>(per));
        for (int64_t i = 0; i < per; ++i) v[static_cast<size_t>(i)] = buf.get(b * per + i);
        return v;
      };
      EXPECT_EQ(part(batch.f, n), alone.f.values()) << what;
      EXPECT_EQ(part(batch.g, m), alone.g.values()) << what;
      EXPECT_EQ(part(batch.plan, n * m), alone.plan.values()) << what;
      EXPECT_EQ(part(batch.gx, n * d), alone.gx.values()) << what;
      EXPECT_EQ(part(batch.gy, m * d), alone.gy.values()) << what;
      EXPECT_EQ(part(batch.ga, n), alone.ga.values()) << what;
      EXPECT_EQ(part(batch.gb, m), alone.gb.values()) << what;
    }
  }
}

// sync = false (no host read: all max_iter iterations launched, the converged problems frozen
// on the device, the eps schedule computed there, the results in the stats output) gives the
// bits of sync = true, for a batch with converged and unconverged problems.
TEST(CudaEmulatedOt, SyncFalseEqualsSyncBitwise) {
  for (double scaling : {0.0, 0.5}) {
    Problem pb = points_problem(2, 10, 12, 2, 80);
    for (int64_t i = 0; i < pb.n * pb.d; ++i) pb.x[static_cast<size_t>(i)] *= 3.0;
    SinkhornOptions o;
    o.eps = 0.4;
    o.eps_scaling = scaling;
    o.tol = 1e-4;
    o.max_iter = 40;  // problem 0 stops unconverged
    Want w;
    w.stats = true;
    const Result sync = emulated(pb, o, w);
    o.sync = false;
    const Result nosync = check(pb, o, w, Tol{}, describe(pb, o));
    ASSERT_EQ(sync.st.size(), 2u);
    EXPECT_FALSE(sync.st[0].converged);
    EXPECT_TRUE(sync.st[1].converged);
    Result s = sync;
    s.st.clear();
    expect_same_bits(s, nosync, describe(pb, o) + " sync false vs true");
  }
}

// sync = false for a symmetric batch and for an unbalanced one with a given cost.
TEST(CudaEmulatedOt, SyncFalseSymmetricAndCostEqualSync) {
  for (bool sym : {true, false}) {
    Problem pb = points_problem(2, 9, 9, 2, 85);
    if (sym) {
      pb.y = pb.x;
      pb.b = pb.a;
    } else {
      pb.cost = randn(static_cast<size_t>(pb.B * pb.n * pb.m), 86, 0.5, 1.0);
      for (auto& v : pb.a) v *= 1.5;
    }
    SinkhornOptions o;
    o.eps = 0.3;
    o.symmetric = sym;
    o.rho_a = o.rho_b = sym ? kInf : 0.8;
    o.eps_scaling = 0.5;
    o.tol = 1e-8;
    o.max_iter = 40;
    Want w;
    w.stats = true;
    const Result sync = emulated(pb, o, w);
    o.sync = false;
    const Result nosync = check(pb, o, w, Tol{}, describe(pb, o));
    Result s = sync;
    s.st.clear();
    expect_same_bits(s, nosync, describe(pb, o) + " sync false vs true");
  }
}

// ---- bad input -------------------------------------------------------------------------------

std::string error_of(const Problem& pb, const SinkhornOptions& o, bool cuda) {
  if (!cuda) return run(pb, o, Want{}, false).error;
  return emulated(pb, o, Want{}).error;
}

TEST(CudaEmulatedOt, BadInputGivesTheCpuErrors) {
  const Problem good = points_problem(2, 5, 4, 2, 90);
  SinkhornOptions o;
  o.eps = 0.3;
  o.max_iter = 5;
  struct Bad {
    std::string name;
    std::function<void(Problem&, SinkhornOptions&)> edit;
  };
  const std::vector<Bad> cases = {
      {"x NaN", [](Problem& p, SinkhornOptions&) { p.x[13] = NAN; }},
      {"y inf", [](Problem& p, SinkhornOptions&) { p.y[9] = -INFINITY; }},
      {"a negative", [](Problem& p, SinkhornOptions&) { p.a[6] = -0.25; }},
      {"a NaN", [](Problem& p, SinkhornOptions&) { p.a[7] = NAN; }},
      {"b inf", [](Problem& p, SinkhornOptions&) { p.b[5] = INFINITY; }},
      {"b negative", [](Problem& p, SinkhornOptions&) { p.b[2] = -1.0; }},
      {"a zero",
       [](Problem& p, SinkhornOptions& o) {
         for (int i = 5; i < 10; ++i) p.a[static_cast<size_t>(i)] = 0.0;
         o.rho_a = o.rho_b = 1.0;
       }},
      {"masses", [](Problem& p, SinkhornOptions&) { p.b[6] *= 2.0; }},
      {"symmetric y",
       [](Problem& p, SinkhornOptions& o) {
         p.m = p.n;
         p.y = p.x;
         p.y[15] += 1e-9;
         p.b = p.a;
         o.symmetric = true;
       }},
      {"symmetric b",
       [](Problem& p, SinkhornOptions& o) {
         p.m = p.n;
         p.y = p.x;
         p.b = p.a;
         std::swap(p.b[6], p.b[7]);
         o.symmetric = true;
       }},
      {"symmetric n != m",
       [](Problem& p, SinkhornOptions& o) {
         p.b = {};
         o.symmetric = true;
       }},
      // Several bad values: the CPU checks problem by problem, each in the order x, y, a (its
      // elements in order, non-finite or negative), sum a, b, sum b, masses, symmetry.
      {"a negative, then a NaN",
       [](Problem& p, SinkhornOptions&) {
         p.a[1] = -0.25;
         p.a[3] = NAN;
       }},
      {"b negative in problem 0, x NaN in problem 1",
       [](Problem& p, SinkhornOptions&) {
         p.b[1] = -1.0;
         p.x[13] = NAN;
       }},
      {"a zero in problem 0, y NaN in problem 1",
       [](Problem& p, SinkhornOptions& o) {
         for (int i = 0; i < 5; ++i) p.a[static_cast<size_t>(i)] = 0.0;
         p.y[11] = NAN;
         o.rho_a = o.rho_b = 1.0;
       }},
      {"masses in problem 0, a negative in problem 1",
       [](Problem& p, SinkhornOptions&) {
         p.b[0] *= 2.0;
         p.a[8] = -1.0;
       }},
      {"symmetric rho",
       [](Problem& p, SinkhornOptions& o) {
         p.m = p.n;
         p.y = p.x;
         p.b = p.a;
         o.symmetric = true;
         o.rho_a = 1.0;
         o.rho_b = 2.0;
       }},
  };
  for (const Bad& c : cases) {
    Problem p = good;
    SinkhornOptions oo = o;
    c.edit(p, oo);
    const std::string cpu = error_of(p, oo, false), emu = error_of(p, oo, true);
    EXPECT_NE(cpu, "") << c.name;
    EXPECT_EQ(emu, cpu) << c.name;
  }
  // A non-finite cost.
  Problem pc;
  pc.B = 2;
  pc.n = 3;
  pc.m = 4;
  pc.cost = randn(24, 91);
  pc.cost[17] = NAN;
  const std::string cpu = error_of(pc, o, false), emu = error_of(pc, o, true);
  EXPECT_NE(cpu, "");
  EXPECT_EQ(emu, cpu);
}

// sync = false cannot throw for bad values: NaN results and converged = 0, for every problem
// (a bad value) or the problem alone (a zero total weight, unequal masses).
TEST(CudaEmulatedOt, BadInputWithoutSyncGivesNaNStats) {
  const Problem good = points_problem(2, 5, 4, 2, 92);
  SinkhornOptions o;
  o.eps = 0.3;
  o.max_iter = 5;
  o.sync = false;
  auto stats = [&](const Problem& p, const SinkhornOptions& oo) {
    Result r = emulated(p, oo, Want{});
    EXPECT_EQ(r.error, "");
    EXPECT_TRUE(r.st.empty());
    return r.stats;
  };
  // A bad problem's row: NaN but n_iter, converged 0; a good one's: the problem's row when it
  // runs alone.
  auto expect_row = [&](const Problem& p, const SinkhornOptions& oo, const Buffer& s, int64_t b,
                        bool bad, const std::string& what) {
    const std::string wb = what + " problem " + std::to_string(b);
    if (bad) {
      for (int k : {0, 1, 2, 4})
        EXPECT_TRUE(std::isnan(s.get(static_cast<size_t>(b * 6 + k)))) << wb << " column " << k;
      EXPECT_EQ(s.get(static_cast<size_t>(b * 6 + 5)), 0.0) << wb;
      return;
    }
    const Buffer alone = stats(slice(p, b), oo);
    for (int k = 0; k < 6; ++k)
      EXPECT_EQ(s.get(static_cast<size_t>(b * 6 + k)), alone.get(static_cast<size_t>(k)))
          << wb << " column " << k;
  };
  {
    Problem p = good;
    p.x[13] = NAN;
    const Buffer s = stats(p, o);
    expect_row(p, o, s, 0, true, "x NaN");
    expect_row(p, o, s, 1, true, "x NaN");
  }
  {
    Problem p = good;
    p.a[1] = -0.5;
    const Buffer s = stats(p, o);
    expect_row(p, o, s, 0, true, "a negative");
    expect_row(p, o, s, 1, true, "a negative");
  }
  {
    Problem p = good;
    p.b[5] *= 3.0;  // problem 1's masses differ
    const Buffer s = stats(p, o);
    expect_row(p, o, s, 0, false, "masses");
    expect_row(p, o, s, 1, true, "masses");
  }
  {
    Problem p = good;
    for (int i = 0; i < 5; ++i) p.a[static_cast<size_t>(i)] = 0.0;  // problem 0's a sums to 0
    SinkhornOptions oo = o;
    oo.rho_a = oo.rho_b = 1.0;
    const Buffer s = stats(p, oo);
    expect_row(p, oo, s, 0, true, "a zero");
    expect_row(p, oo, s, 1, false, "a zero");
  }
}

}  // namespace
