// divkit_bench_label_rows: the row kernels of the fused head's label losses (cross-entropy,
// selective log-softmax; src/fused_linear/label_kernels.h) over chunks of fp32 logits as the
// chunk loop gives them (label_loop.cc: C = min(1024, 64 Mi / V) rows of V), with the gradient
// taken in the sweep of the row statistics ("one sweep", LabelForwardJob::coef) against a
// gradient pass of its own over the chunk after the statistics ("two passes", label_rows_grad),
// paired in one run: the two alternate within every repetition; medians and their ratio. No GEMMs:
// the fused head's GEMMs cost the same on both paths (bench/bench_label_head.py times whole calls).
//
//   divkit_bench_label_rows [--n=4096] [--vocab=32000,128256] [--threads=2] [--reps=5]
//                           [--configs=plain,softcap,topk,entropy] [--topk=20]
//
// Configurations (the coefficients label_loop.cc gives each row):
//   plain    cross-entropy, mean reduction;
//   softcap  cross-entropy with softcap 30 and label smoothing 0.1;
//   topk     cross-entropy with the top-k mass output (k = --topk);
//   entropy  fused_linear_logprobs_backward at temperature 0.7 with grad_logprobs 1 and
//            grad_entropy 0.1 (the entropy term of the gradient).
// Logits N(0, 2^2), every eighth token ignored. Each chunk is refilled from a source block before
// its kernels run (not timed), as the logits GEMM writes it in the chunk loop. Wall time (the
// kernels use --threads OpenMP threads); the load average is printed before and after.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "divkit/runtime.h"
#include "fused_linear/label_kernels.h"

namespace {

using divkit::detail::LabelForwardJob;
using divkit::detail::LabelGradJob;

std::vector<int64_t> parse_list(const std::string& s) {
  std::vector<int64_t> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) out.push_back(std::stoll(item));
  return out;
}

std::vector<std::string> parse_names(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) out.push_back(item);
  return out;
}

std::string load_average() {
  std::ifstream f("/proc/loadavg");
  std::string a, b, c;
  f >> a >> b >> c;
  return a + " " + b + " " + c;
}

struct Config {
  std::string name;
  float inv_t = 1.0f, softcap = 0.0f;
  double eps = 0.0;      // label smoothing
  bool entropy = false;  // the entropy term (logprobs backward)
  int64_t topk = 0;      // top-k mass output
};

// The per-row coefficients of label_loop.cc for row r (ignored rows: not called).
struct Coefs {
  const Config* cfg;
  int64_t v;
  double scale;  // 1 / (number of tokens) for the mean reduction
  void get(double lse, double& a, double& b, double& c, double& e) const {
    (void)lse;
    if (cfg->entropy) {  // grad_logprobs 1, grad_entropy 0.1
      a = -1.0, b = 1.0, c = 0.0, e = -0.1;
      return;
    }
    a = scale;
    b = -scale * (1.0 - cfg->eps);
    c = -scale * cfg->eps / static_cast<double>(v);
    e = 0.0;
  }
};

struct Buffers {
  std::vector<double> lse, zy, mean, ent, topk, a, b, c, e;
  explicit Buffers(int64_t rows)
      : lse(rows), zy(rows), mean(rows), ent(rows), topk(rows), a(rows), b(rows), c(rows), e(rows) {
  }
};

LabelForwardJob forward_job(const Config& cfg, float* z, int64_t rows, int64_t v,
                            const int64_t* labels, Buffers& buf, int threads) {
  LabelForwardJob f;
  f.z = z;
  f.ldz = v;
  f.rows = rows;
  f.v = v;
  f.labels = labels;
  f.inv_t = cfg.inv_t;
  f.softcap = cfg.softcap;
  f.lse = buf.lse.data();
  f.z_label = buf.zy.data();
  f.mean_z = cfg.eps > 0.0 ? buf.mean.data() : nullptr;
  f.entropy = cfg.entropy ? buf.ent.data() : nullptr;
  f.topk_mass = cfg.topk > 0 ? buf.topk.data() : nullptr;
  f.topk = cfg.topk;
  f.num_threads = threads;
  return f;
}

// One chunk through the label kernels, one sweep or two passes.
void run_chunk(const Config& cfg, const Coefs& coefs, float* z, int64_t rows, int64_t v,
               const int64_t* labels, Buffers& buf, int threads, bool one_sweep) {
  LabelForwardJob f = forward_job(cfg, z, rows, v, labels, buf, threads);
  if (one_sweep) {
    f.coef_ctx = const_cast<Coefs*>(&coefs);
    f.coef = [](void* p, int64_t, double lse, double* a, double* b, double* c, double* e) {
      static_cast<const Coefs*>(p)->get(lse, *a, *b, *c, *e);
    };
    f.coef_entropy = cfg.entropy;
    divkit::detail::label_rows_forward(f);
    return;
  }
  divkit::detail::label_rows_forward(f);
  for (int64_t r = 0; r < rows; ++r) {
    buf.a[r] = buf.b[r] = buf.c[r] = buf.e[r] = 0.0;
    if (labels[r] >= 0) coefs.get(buf.lse[r], buf.a[r], buf.b[r], buf.c[r], buf.e[r]);
  }
  LabelGradJob g;
  g.z = z;
  g.ldz = v;
  g.rows = rows;
  g.v = v;
  g.labels = labels;
  g.inv_t = cfg.inv_t;
  g.softcap = cfg.softcap;
  g.lse = buf.lse.data();
  g.entropy = buf.ent.data();
  g.a = buf.a.data();
  g.b = buf.b.data();
  g.c = buf.c.data();
  g.e = cfg.entropy ? buf.e.data() : nullptr;
  g.num_threads = threads;
  divkit::detail::label_rows_grad(g);
}

double median(std::vector<double> x) {
  std::sort(x.begin(), x.end());
  return x[x.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  int64_t n = 4096, reps = 5, topk = 20;
  int threads = 2;
  std::vector<int64_t> vocab = {32000, 128256};
  std::vector<std::string> names = {"plain", "softcap", "topk", "entropy"};
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&](const char* key) -> const char* {
      const size_t len = std::strlen(key);
      return arg.compare(0, len, key) == 0 ? arg.c_str() + len : nullptr;
    };
    if (const char* s = value("--n=")) n = std::stoll(s);
    else if (const char* s = value("--vocab=")) vocab = parse_list(s);
    else if (const char* s = value("--threads=")) threads = std::stoi(s);
    else if (const char* s = value("--reps=")) reps = std::stoll(s);
    else if (const char* s = value("--topk=")) topk = std::stoll(s);
    else if (const char* s = value("--configs=")) names = parse_names(s);
    else {
      std::fprintf(stderr, "unknown argument %s\n", arg.c_str());
      return 2;
    }
  }
  divkit::set_num_threads(threads);
  std::printf(
      "divkit_bench_label_rows: N=%lld fp32, %d thread(s), SIMD %s, %lld reps; load "
      "average before: %s\n",
      static_cast<long long>(n), threads, divkit::active_simd_target().c_str(),
      static_cast<long long>(reps), load_average().c_str());
  std::printf("%-8s %7s %5s %11s %11s %8s\n", "config", "V", "C", "1 sweep s", "2 passes s",
              "2p / 1s");
  for (const int64_t v : vocab) {
    const int64_t chunk = std::min<int64_t>(
        n, std::clamp<int64_t>((int64_t{64} << 20) / std::max<int64_t>(v, 1), 32, 1024));
    std::vector<float> src(static_cast<size_t>(chunk * v)), z(src.size());
    std::mt19937 rng(7);
    std::normal_distribution<float> g(0.0f, 2.0f);
    for (float& x : src) x = g(rng);
    std::vector<int64_t> labels(static_cast<size_t>(n));
    std::uniform_int_distribution<int64_t> pick(0, v - 1);
    for (int64_t i = 0; i < n; ++i) labels[i] = i % 8 == 0 ? -100 : pick(rng);
    Buffers buf(chunk);
    for (const std::string& name : names) {
      Config cfg;
      cfg.name = name;
      if (name == "softcap") cfg.softcap = 30.0f, cfg.eps = 0.1;
      else if (name == "topk") cfg.topk = std::min(topk, v);
      else if (name == "entropy") cfg.entropy = true, cfg.inv_t = 1.0f / 0.7f;
      else if (name != "plain") {
        std::fprintf(stderr, "unknown config %s\n", name.c_str());
        return 2;
      }
      const Coefs coefs{&cfg, v, 1.0 / static_cast<double>(n - n / 8)};
      std::vector<double> secs[2];
      for (int64_t rep = 0; rep <= reps; ++rep) {  // rep 0: warm-up
        for (int k = 0; k < 2; ++k) {
          const bool one = (rep + k) % 2 == 0;  // alternate which path goes first
          double total = 0.0;
          for (int64_t r0 = 0; r0 < n; r0 += chunk) {
            const int64_t rows = std::min(chunk, n - r0);
            std::memcpy(z.data(), src.data(), static_cast<size_t>(rows * v) * sizeof(float));
            const auto t0 = std::chrono::steady_clock::now();
            run_chunk(cfg, coefs, z.data(), rows, v, labels.data() + r0, buf, threads, one);
            total += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
          }
          if (rep > 0) secs[one ? 0 : 1].push_back(total);
        }
      }
      const double s1 = median(secs[0]), s2 = median(secs[1]);
      std::printf("%-8s %7lld %5lld %11.4f %11.4f %7.2fx\n", name.c_str(),
                  static_cast<long long>(v), static_cast<long long>(chunk), s1, s2, s2 / s1);
      std::fflush(stdout);
    }
  }
  std::printf("load average after: %s\n", load_average().c_str());
  return 0;
}
