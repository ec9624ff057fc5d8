// The vocabulary-parallel mode of the fused heads and vocab_parallel_divergence (vocab_parallel.h,
// fused_linear.h): K simulated ranks run in threads, each on its (uneven) shard of the vocabulary,
// joined by an in-process all-reduce; every rank's loss, its shard's gradients and the whole
// hidden-state gradient must equal the unsharded call's.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <exception>
#include <functional>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "divkit/divergence.h"
#include "divkit/fused_linear.h"
#include "divkit/runtime.h"
#include "divkit/vocab_parallel.h"

namespace {

using divkit::CollectiveOp;
using divkit::DType;
using divkit::TensorView;

// An all-reduce over threads: each rank's buffer is kept, the last to arrive reduces them in rank
// order (so the result does not depend on the arrival order) and wakes the others.
class FakeGroup {
 public:
  explicit FakeGroup(int world) : world_(world), slots_(world) {}

  void all_reduce(int rank, double* data, int64_t count, CollectiveOp op) {
    std::unique_lock<std::mutex> lock(mutex_);
    slots_[rank].assign(data, data + count);
    const uint64_t generation = generation_;
    if (++arrived_ == world_) {
      result_ = slots_[0];
      for (int r = 1; r < world_; ++r) {
        if (slots_[r].size() != result_.size()) mismatch_ = true;
        for (size_t i = 0; i < std::min(result_.size(), slots_[r].size()); ++i)
          result_[i] = op == CollectiveOp::sum ? result_[i] + slots_[r][i]
                                               : std::max(result_[i], slots_[r][i]);
      }
      arrived_ = 0;
      ++generation_;
      wake_.notify_all();
    } else {
      wake_.wait(lock, [&] { return generation_ != generation; });
    }
    std::copy(result_.begin(), result_.begin() + std::min<int64_t>(count, result_.size()), data);
  }

  divkit::VocabShard shard(int rank) {
    divkit::VocabShard s;
    s.rank = rank;
    s.world = world_;
    s.all_reduce = [this, rank](double* d, int64_t n, CollectiveOp op) {
      all_reduce(rank, d, n, op);
    };
    return s;
  }

  bool mismatch() const { return mismatch_; }

 private:
  int world_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::vector<std::vector<double>> slots_;
  std::vector<double> result_;
  int arrived_ = 0;
  uint64_t generation_ = 0;
  bool mismatch_ = false;
};

// Runs body(rank) on `world` threads; rethrows the first failure.
void run_ranks(int world, const std::function<void(int)>& body) {
  std::vector<std::thread> threads;
  std::vector<std::exception_ptr> errors(world);
  for (int r = 0; r < world; ++r)
    threads.emplace_back([&, r] {
      try {
        body(r);
      } catch (...) {
        errors[r] = std::current_exception();
      }
    });
  for (auto& t : threads) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

std::vector<float> random_vector(int64_t n, float scale, std::mt19937& rng) {
  std::normal_distribution<float> g(0.0f, scale);
  std::vector<float> x(static_cast<size_t>(n));
  for (auto& v : x) v = g(rng);
  return x;
}

void expect_close(const std::vector<float>& got, const float* want, int64_t n, double tol,
                  const std::string& what) {
  double scale = 1e-3, err = 0.0;
  for (int64_t i = 0; i < n; ++i) scale = std::max(scale, std::abs(static_cast<double>(want[i])));
  for (int64_t i = 0; i < n; ++i)
    err = std::max(err, std::abs(static_cast<double>(got[i]) - want[i]));
  EXPECT_LE(err, tol * scale) << what;
}

struct Problem {
  static constexpr int64_t n = 13, v = 29, hs = 6, ht = 9;
  std::vector<int64_t> bounds = {0, 10, 11, 29};  // uneven shards, one of a single row
  std::vector<float> sh, sw, sb, th, tw, tb;
  std::vector<int64_t> labels;

  Problem() {
    std::mt19937 rng(7);
    sh = random_vector(n * hs, 1.0f, rng);
    th = random_vector(n * ht, 1.0f, rng);
    sw = random_vector(v * hs, 0.5f, rng);
    tw = random_vector(v * ht, 0.7f, rng);
    sb = random_vector(v, 0.3f, rng);
    tb = random_vector(v, 0.3f, rng);
    labels.resize(n);
    for (int64_t i = 0; i < n; ++i) labels[i] = (i * 7 + 3) % v;
    labels[4] = -100;
  }
  int world() const { return static_cast<int>(bounds.size()) - 1; }
  int64_t lo(int r) const { return bounds[r]; }
  int64_t rows(int r) const { return bounds[r + 1] - bounds[r]; }
};

TensorView mat(std::vector<float>& x, int64_t rows, int64_t cols, int64_t r0 = 0) {
  return TensorView::matrix(x.data() + r0 * cols, DType::f32, rows, cols);
}
TensorView vec(std::vector<float>& x, int64_t n, int64_t j0 = 0) {
  return TensorView::vector(x.data() + j0, DType::f32, n);
}

class VocabParallelFused : public ::testing::Test {
 protected:
  void SetUp() override {
    threads_ = divkit::get_num_threads();
    divkit::set_num_threads(1);
  }
  void TearDown() override { divkit::set_num_threads(threads_); }
  int threads_ = 1;
};

TEST_F(VocabParallelFused, DistillationMatchesTheUnshardedHead) {
  Problem p;
  const int64_t n = p.n, v = p.v, hs = p.hs, ht = p.ht;
  for (auto [kind, alpha] : {std::pair{divkit::DivergenceKind::jsd, 0.1f},
                             std::pair{divkit::DivergenceKind::renyi, 2.0f},
                             std::pair{divkit::DivergenceKind::reverse_kl, 0.1f}}) {
    divkit::DivergenceSpec spec;
    spec.kind = kind;
    spec.alpha = alpha;
    spec.beta = 0.3f;
    spec.temperature = 1.5f;
    spec.scale_by_t_squared = true;
    divkit::DivergenceOptions o;
    o.labels = TensorView::vector(p.labels.data(), DType::i64, n);
    divkit::FusedLinearOptions f;
    f.hard_weight = 0.3f;
    f.soft_weight = 0.7f;
    f.chunk_size = 5;

    float loss_ref = 0.0f;
    std::vector<float> gsh(n * hs), gsw(v * hs), gsb(v), gth(n * ht), gtw(v * ht), gtb(v);
    divkit::fused_linear_divergence({mat(p.sh, n, hs), mat(p.sw, v, hs), vec(p.sb, v)},
                                    {mat(p.th, n, ht), mat(p.tw, v, ht), vec(p.tb, v)}, spec, o, f,
                                    TensorView::vector(&loss_ref, DType::f32, 1),
                                    {mat(gsh, n, hs), mat(gsw, v, hs), vec(gsb, v)},
                                    {mat(gth, n, ht), mat(gtw, v, ht), vec(gtb, v)});

    FakeGroup group(p.world());
    run_ranks(p.world(), [&](int r) {
      const int64_t lo = p.lo(r), vr = p.rows(r);
      divkit::FusedLinearOptions fr = f;
      fr.shard = group.shard(r);
      float loss = 0.0f;
      std::vector<float> ash(n * hs), asw(vr * hs), asb(vr), ath(n * ht), atw(vr * ht), atb(vr);
      divkit::fused_linear_divergence({mat(p.sh, n, hs), mat(p.sw, vr, hs, lo), vec(p.sb, vr, lo)},
                                      {mat(p.th, n, ht), mat(p.tw, vr, ht, lo), vec(p.tb, vr, lo)},
                                      spec, o, fr, TensorView::vector(&loss, DType::f32, 1),
                                      {mat(ash, n, hs), mat(asw, vr, hs), vec(asb, vr)},
                                      {mat(ath, n, ht), mat(atw, vr, ht), vec(atb, vr)});
      const std::string what =
          std::string(divkit::divergence_kind_name(kind)) + " rank " + std::to_string(r);
      EXPECT_NEAR(loss, loss_ref, 1e-5 * std::max(1.0f, std::abs(loss_ref))) << what;
      expect_close(ash, gsh.data(), n * hs, 3e-5, what + " grad student_hidden");
      expect_close(asw, gsw.data() + lo * hs, vr * hs, 3e-5, what + " grad student_weight");
      expect_close(asb, gsb.data() + lo, vr, 3e-5, what + " grad student_bias");
      expect_close(ath, gth.data(), n * ht, 3e-5, what + " grad teacher_hidden");
      expect_close(atw, gtw.data() + lo * ht, vr * ht, 3e-5, what + " grad teacher_weight");
      expect_close(atb, gtb.data() + lo, vr, 3e-5, what + " grad teacher_bias");
    });
    EXPECT_FALSE(group.mismatch());
  }
}

TEST_F(VocabParallelFused, CrossEntropyAndLogprobsMatchTheUnshardedHead) {
  Problem p;
  const int64_t n = p.n, v = p.v, h = p.hs;
  const TensorView labels = TensorView::vector(p.labels.data(), DType::i64, n);
  divkit::CrossEntropySpec ce;
  ce.label_smoothing = 0.1f;
  ce.z_loss_scale = 1e-3f;
  ce.softcap = 3.0f;
  ce.chunk_size = 4;
  float loss_ref = 0.0f;
  std::vector<float> gh(n * h), gw(v * h), gb(v);
  divkit::fused_linear_cross_entropy({mat(p.sh, n, h), mat(p.sw, v, h), vec(p.sb, v)}, labels, ce,
                                     TensorView::vector(&loss_ref, DType::f32, 1),
                                     {mat(gh, n, h), mat(gw, v, h), vec(gb, v)});
  divkit::LogprobsSpec lp;
  lp.temperature = 0.9f;
  lp.chunk_size = 6;
  std::vector<float> logp_ref(n), ent_ref(n), mass_ref(n);
  divkit::LabelStatsOutputs st_ref;
  st_ref.logprobs = vec(logp_ref, n);
  st_ref.entropy = vec(ent_ref, n);
  st_ref.topk_mass = vec(mass_ref, n);
  st_ref.topk = 4;
  divkit::fused_linear_logprobs({mat(p.sh, n, h), mat(p.sw, v, h), vec(p.sb, v)}, labels, lp,
                                st_ref);
  std::vector<double> up(n), ue(n);
  for (int64_t i = 0; i < n; ++i) up[i] = -1.0 + 0.15 * i, ue[i] = 1.0 + 0.05 * i;
  std::vector<float> bh(n * h), bw(v * h);
  divkit::fused_linear_logprobs_backward({mat(p.sh, n, h), mat(p.sw, v, h), vec(p.sb, v)}, labels,
                                         lp, TensorView::vector(up.data(), DType::f64, n),
                                         TensorView::vector(ue.data(), DType::f64, n),
                                         {mat(bh, n, h), mat(bw, v, h), {}});

  FakeGroup group(p.world());
  run_ranks(p.world(), [&](int r) {
    const int64_t lo = p.lo(r), vr = p.rows(r);
    const divkit::LinearHead head{mat(p.sh, n, h), mat(p.sw, vr, h, lo), vec(p.sb, vr, lo)};
    const std::string what = "rank " + std::to_string(r);
    divkit::CrossEntropySpec cr = ce;
    cr.shard = group.shard(r);
    float loss = 0.0f;
    std::vector<float> ah(n * h), aw(vr * h), ab(vr);
    divkit::fused_linear_cross_entropy(head, labels, cr, TensorView::vector(&loss, DType::f32, 1),
                                       {mat(ah, n, h), mat(aw, vr, h), vec(ab, vr)});
    EXPECT_NEAR(loss, loss_ref, 1e-5 * std::max(1.0f, std::abs(loss_ref))) << what;
    expect_close(ah, gh.data(), n * h, 3e-5, what + " ce grad hidden");
    expect_close(aw, gw.data() + lo * h, vr * h, 3e-5, what + " ce grad weight");
    expect_close(ab, gb.data() + lo, vr, 3e-5, what + " ce grad bias");

    divkit::LogprobsSpec lr = lp;
    lr.shard = group.shard(r);
    std::vector<float> logp(n), ent(n), mass(n);
    divkit::LabelStatsOutputs st;
    st.logprobs = vec(logp, n);
    st.entropy = vec(ent, n);
    st.topk_mass = vec(mass, n);
    st.topk = 4;
    divkit::fused_linear_logprobs(head, labels, lr, st);
    expect_close(logp, logp_ref.data(), n, 2e-5, what + " logprobs");
    expect_close(ent, ent_ref.data(), n, 2e-5, what + " entropy");
    expect_close(mass, mass_ref.data(), n, 2e-5, what + " topk_mass");
    std::vector<float> ch(n * h), cw(vr * h);
    divkit::fused_linear_logprobs_backward(head, labels, lr,
                                           TensorView::vector(up.data(), DType::f64, n),
                                           TensorView::vector(ue.data(), DType::f64, n),
                                           {mat(ch, n, h), mat(cw, vr, h), {}});
    expect_close(ch, bh.data(), n * h, 3e-5, what + " logprobs grad hidden");
    expect_close(cw, bw.data() + lo * h, vr * h, 3e-5, what + " logprobs grad weight");
  });
  EXPECT_FALSE(group.mismatch());
}

TEST_F(VocabParallelFused, TokenLevelDivergenceMatchesTheUnshardedOne) {
  Problem p;
  const int64_t n = p.n, v = p.v;
  std::mt19937 rng(11);
  std::vector<float> s = random_vector(n * v, 2.0f, rng), t = random_vector(n * v, 2.0f, rng);
  std::vector<double> w(n);
  for (int64_t i = 0; i < n; ++i) w[i] = 0.5 + 0.1 * i;
  divkit::DivergenceSpec spec;
  spec.kind = divkit::DivergenceKind::jsd;
  spec.beta = 0.4f;
  spec.temperature = 1.3f;
  divkit::DivergenceOptions o;
  o.labels = TensorView::vector(p.labels.data(), DType::i64, n);
  o.weights = TensorView::vector(w.data(), DType::f64, n);
  float loss_ref = 0.0f;
  std::vector<float> gs(n * v), gt(n * v);
  divkit::DivergenceOutputs out;
  out.loss = TensorView::vector(&loss_ref, DType::f32, 1);
  out.grad_student = mat(gs, n, v);
  out.grad_teacher = mat(gt, n, v);
  divkit::divergence(mat(s, n, v), mat(t, n, v), spec, o, out);

  FakeGroup group(p.world());
  run_ranks(p.world(), [&](int r) {
    const int64_t lo = p.lo(r), vr = p.rows(r);
    std::vector<float> sr(n * vr), tr(n * vr), as(n * vr), at(n * vr), ws(n * vr), wt(n * vr);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < vr; ++j) {
        sr[i * vr + j] = s[i * v + lo + j];
        tr[i * vr + j] = t[i * v + lo + j];
        ws[i * vr + j] = gs[i * v + lo + j];
        wt[i * vr + j] = gt[i * v + lo + j];
      }
    float loss = 0.0f;
    divkit::DivergenceOutputs o_r;
    o_r.loss = TensorView::vector(&loss, DType::f32, 1);
    o_r.grad_student = mat(as, n, vr);
    o_r.grad_teacher = mat(at, n, vr);
    divkit::vocab_parallel_divergence(mat(sr, n, vr), mat(tr, n, vr), spec, o, o_r, group.shard(r));
    const std::string what = "rank " + std::to_string(r);
    EXPECT_NEAR(loss, loss_ref, 1e-5 * std::max(1.0f, std::abs(loss_ref))) << what;
    expect_close(as, ws.data(), n * vr, 1e-5, what + " grad student");
    expect_close(at, wt.data(), n * vr, 1e-5, what + " grad teacher");
  });
}

TEST_F(VocabParallelFused, AnErrorOnOneRankIsRaisedOnEveryRank) {
  Problem p;
  const int64_t n = p.n, h = p.hs;
  p.sw[12 * h + 2] = NAN;  // a row of rank 2's shard
  const TensorView labels = TensorView::vector(p.labels.data(), DType::i64, n);
  FakeGroup group(p.world());
  std::vector<std::string> messages(p.world());
  run_ranks(p.world(), [&](int r) {
    divkit::CrossEntropySpec ce;
    ce.shard = group.shard(r);
    float loss = 0.0f;
    try {
      divkit::fused_linear_cross_entropy({mat(p.sh, n, h), mat(p.sw, p.rows(r), h, p.lo(r)), {}},
                                         labels, ce, TensorView::vector(&loss, DType::f32, 1));
    } catch (const divkit::Error& e) {
      messages[r] = e.what();
    }
  });
  EXPECT_NE(messages[2].find("weight contains NaN or inf at row 1"), std::string::npos)
      << messages[2];
  for (int r = 0; r < 2; ++r)
    EXPECT_NE(messages[r].find("other rank"), std::string::npos) << messages[r];
}

}  // namespace

// vocab_parallel_divergence: a rank whose shard has a NaN logit, or whose gradient output is
// malformed, raises on every rank (the others name the failure elsewhere) instead of leaving them
// waiting in a collective.
TEST_F(VocabParallelFused, TokenLevelDivergenceErrorOnOneRankIsRaisedOnEveryRank) {
  Problem p;
  const int64_t n = p.n;
  for (const int bad_case : {0, 1, 2}) {
    FakeGroup group(p.world());
    std::vector<std::string> messages(p.world());
    run_ranks(p.world(), [&](int r) {
      const int64_t vr = p.rows(r);
      std::vector<float> s(n * vr, 0.5f), t(n * vr, 0.25f), g(n * vr);
      if (r == 1 && bad_case == 0) s[0] = NAN;                // rank 1 (one column): row 0
      if (r == 2 && bad_case == 1) t[3 * vr + 2] = INFINITY;  // row 3
      float loss = 0.0f;
      divkit::DivergenceOutputs out;
      out.loss = TensorView::vector(&loss, DType::f32, 1);
      out.grad_student = mat(g, n, vr);
      if (r == 0 && bad_case == 2) out.grad_student.shape[0] = n - 1;
      try {
        divkit::vocab_parallel_divergence(mat(s, n, vr), mat(t, n, vr), {}, {}, out,
                                          group.shard(r));
      } catch (const divkit::Error& e) {
        messages[r] = e.what();
      }
    });
    const int bad_rank = bad_case == 0 ? 1 : bad_case == 1 ? 2 : 0;
    const char* want = bad_case == 0   ? "vocab_parallel_divergence: student_logits contains NaN"
                       : bad_case == 1 ? "vocab_parallel_divergence: teacher_logits contains NaN"
                                       : "vocab_parallel_divergence: grad_student must have the "
                                         "shape of the logits";
    for (int r = 0; r < p.world(); ++r)
      EXPECT_EQ(messages[r].rfind(r == bad_rank ? want
                                                : "vocab_parallel_divergence: the "
                                                  "arguments were rejected on 1 other",
                                  0),
                0u)
          << "case " << bad_case << ", rank " << r << ": " << messages[r];
  }
}
