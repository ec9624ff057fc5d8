// divkit_bench: the C++-level view of the token-level divergence kernels.
//
// For each kind x V x dtype x mode x thread count it times divkit::divergence on N x V logits
// and reports the bytes the kernel must move at least (read student, read teacher, write the
// gradient) as bytes_per_second, its fraction of a STREAM-style triad (a = b + s*c) measured in
// the same process with the same thread count (counter of_triad), and the time per vocabulary
// entry (ns/entry, all threads together: wall time / (N V)); GB/s is bytes_per_second in 1e9.
//
// Modes:  loss     the loss only (reads s and t)
//         grad     loss and student gradient into a separate buffer (reads s, t; writes grad)
//         inplace  loss and student gradient written into the student logits (as Liger does);
//                  the same bytes, plus the check pass the core runs before writing in place.
//
// Own flags (parsed before Google Benchmark's):
//   --n=4096             rows (tokens)
//   --kinds=forward_kl,reverse_kl,jsd   or --kinds=all
//   --vocab=32000,128256
//   --dtypes=f32,bf16
//   --threads=1,2        (default: 1 and divkit::get_num_threads())
//   --simd=AVX3          force a Highway target (default: the best this CPU has)
//   --triad_mib=3072     total size of the three triad arrays
// Example:
//   divkit_bench --kinds=forward_kl --benchmark_filter=grad --benchmark_repetitions=5
#include <benchmark/benchmark.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "divkit/divkit.h"

namespace {

using divkit::DType;

struct Config {
  int64_t n = 4096;
  std::vector<std::string> kinds = {"forward_kl", "reverse_kl", "jsd"};
  std::vector<int64_t> vocab = {32000, 128256};
  std::vector<std::string> dtypes = {"f32", "bf16"};
  std::vector<int> threads;
  std::string simd;
  int64_t triad_mib = 3072;
};
Config g_cfg;

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ','))
    if (!item.empty()) out.push_back(item);
  return out;
}

// ---- aligned buffers ------------------------------------------------------------------------

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
using Buffer = std::unique_ptr<char, FreeDeleter>;

Buffer allocate(size_t bytes) {
  const size_t rounded = (bytes + 4095) / 4096 * 4096;
  void* p = std::aligned_alloc(4096, rounded);
  if (p == nullptr) {
    std::fprintf(stderr, "divkit_bench: cannot allocate %zu bytes\n", bytes);
    std::exit(1);
  }
  return Buffer(static_cast<char*>(p));
}

// ---- deterministic logits -------------------------------------------------------------------

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Approximately standard normal (Irwin-Hall with four uniforms), cheap and deterministic.
float normal_at(uint64_t seed, uint64_t i) {
  const uint64_t h = splitmix64(seed * 0x100000001B3ull ^ i);
  float sum = 0.0f;
  for (int k = 0; k < 4; ++k) sum += static_cast<float>((h >> (16 * k)) & 0xFFFF) / 65536.0f;
  return (sum - 2.0f) * 1.7320508f;  // variance of the sum of 4 U(0,1) is 1/3
}

uint16_t to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// Student logits s ~ 3 z1 and teacher t = s + 1.5 z2: a realistic spread over a large
// vocabulary, with teacher and student close but not equal.
// t == nullptr: refill the student only.
void fill_logits(void* s, void* t, DType dtype, int64_t n, int64_t v) {
  const int64_t total = n * v;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < total; ++i) {
    const float xs = 3.0f * normal_at(1, static_cast<uint64_t>(i));
    const float xt = xs + 1.5f * normal_at(2, static_cast<uint64_t>(i));
    if (dtype == DType::f32) {
      static_cast<float*>(s)[i] = xs;
      if (t) static_cast<float*>(t)[i] = xt;
    } else {
      static_cast<uint16_t*>(s)[i] = to_bf16(xs);
      if (t) static_cast<uint16_t*>(t)[i] = to_bf16(xt);
    }
  }
}

// One set of inputs kept across benchmarks (they run grouped by V and dtype): regenerating
// 2 x 2 GB of logits for every benchmark would dominate the run.
struct Inputs {
  int64_t n = 0, v = 0;
  DType dtype = DType::f32;
  bool student_clobbered = false;  // an in-place run wrote gradients into the student
  Buffer s, t, grad;
};
std::unique_ptr<Inputs> g_inputs;

Inputs& get_inputs(int64_t n, int64_t v, DType dtype) {
  if (g_inputs && g_inputs->n == n && g_inputs->v == v && g_inputs->dtype == dtype) {
    if (g_inputs->student_clobbered) {
      fill_logits(g_inputs->s.get(), nullptr, dtype, n, v);
      g_inputs->student_clobbered = false;
    }
    return *g_inputs;
  }
  g_inputs.reset();  // free before allocating the next set
  auto in = std::make_unique<Inputs>();
  in->n = n;
  in->v = v;
  in->dtype = dtype;
  const size_t bytes = static_cast<size_t>(n * v) * divkit::dtype_size(dtype);
  in->s = allocate(bytes);
  in->t = allocate(bytes);
  in->grad = allocate(bytes);
  fill_logits(in->s.get(), in->t.get(), dtype, n, v);
  std::memset(in->grad.get(), 0, bytes);  // fault the pages in outside the timed region
  g_inputs = std::move(in);
  return *g_inputs;
}

// ---- STREAM triad ---------------------------------------------------------------------------

struct Triad {
  int64_t n = 0;
  Buffer a, b, c;
};
std::unique_ptr<Triad> g_triad;

Triad& get_triad() {
  const int64_t n = g_cfg.triad_mib * (int64_t{1} << 20) / 3 / static_cast<int64_t>(sizeof(double));
  if (g_triad && g_triad->n == n) return *g_triad;
  auto tr = std::make_unique<Triad>();
  tr->n = n;
  tr->a = allocate(static_cast<size_t>(n) * sizeof(double));
  tr->b = allocate(static_cast<size_t>(n) * sizeof(double));
  tr->c = allocate(static_cast<size_t>(n) * sizeof(double));
  double* a = reinterpret_cast<double*>(tr->a.get());
  double* b = reinterpret_cast<double*>(tr->b.get());
  double* c = reinterpret_cast<double*>(tr->c.get());
  // First touch with the schedule the triad uses, so pages sit near the threads that use them.
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    a[i] = 0.0;
    b[i] = 1.0;
    c[i] = 2.0;
  }
  g_triad = std::move(tr);
  return *g_triad;
}

void run_triad(Triad& tr, int threads) {
  double* __restrict__ a = reinterpret_cast<double*>(tr.a.get());
  const double* b = reinterpret_cast<const double*>(tr.b.get());
  const double* c = reinterpret_cast<const double*>(tr.c.get());
  const double scalar = 3.0;
  const int64_t n = tr.n;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t i = 0; i < n; ++i) a[i] = b[i] + scalar * c[i];
}

int64_t triad_bytes(const Triad& tr) { return 3 * tr.n * static_cast<int64_t>(sizeof(double)); }

// Best of `reps` runs, in bytes per second (three arrays of traffic, as STREAM counts it).
double measure_triad(int threads, int reps = 7) {
  Triad& tr = get_triad();
  run_triad(tr, threads);  // warm up
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    run_triad(tr, threads);
    const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::min(best, sec);
  }
  return static_cast<double>(triad_bytes(tr)) / best;
}

std::vector<std::pair<int, double>> g_triad_bps;  // threads -> bytes/s

double triad_for(int threads) {
  for (const auto& [t, bps] : g_triad_bps)
    if (t == threads) return bps;
  return 0.0;
}

void BM_Triad(benchmark::State& state) {
  const int threads = static_cast<int>(state.range(0));
  Triad& tr = get_triad();
  run_triad(tr, threads);
  const auto t0 = std::chrono::steady_clock::now();
  for (auto _ : state) {
    run_triad(tr, threads);
    benchmark::ClobberMemory();
  }
  const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  state.counters["GB/s"] = static_cast<double>(state.iterations()) * triad_bytes(tr) / sec / 1e9;
  state.SetBytesProcessed(state.iterations() * triad_bytes(tr));
  state.counters["array_MiB"] = static_cast<double>(tr.n * sizeof(double)) / (1 << 20);
}

// ---- the divergence benchmark ---------------------------------------------------------------

enum class Mode { loss, grad, inplace };
const char* mode_name(Mode m) {
  return m == Mode::loss ? "loss" : m == Mode::grad ? "grad" : "inplace";
}

void BM_Divergence(benchmark::State& state, divkit::DivergenceKind kind, int64_t v, DType dtype,
                   Mode mode, int threads) {
  const int64_t n = g_cfg.n;
  Inputs& in = get_inputs(n, v, dtype);
  divkit::set_num_threads(threads);

  divkit::DivergenceSpec spec;
  spec.kind = kind;
  spec.beta = 0.5f;  // jsd: the symmetric JSD, as TRL's default
  divkit::DivergenceOptions options;
  options.reduction = divkit::Reduction::batchmean;
  float loss = 0.0f;
  divkit::DivergenceOutputs out;
  out.loss = divkit::TensorView::vector(&loss, DType::f32, 1);
  const auto s = divkit::TensorView::matrix(in.s.get(), dtype, n, v);
  const auto t = divkit::TensorView::matrix(in.t.get(), dtype, n, v);
  if (mode == Mode::grad) out.grad_student = divkit::TensorView::matrix(in.grad.get(), dtype, n, v);
  if (mode == Mode::inplace) {
    out.grad_student = s;
    in.student_clobbered = true;  // later iterations read gradients: same work, other numbers
  }

  divkit::divergence(s, t, spec, options, out);  // warm up (page faults, thread pool)
  // Our own wall clock around the loop gives plain (not per-second) counters below.
  const auto t0 = std::chrono::steady_clock::now();
  for (auto _ : state) {
    divkit::divergence(s, t, spec, options, out);
    benchmark::DoNotOptimize(loss);
  }
  const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const double iters = static_cast<double>(state.iterations());
  const int64_t elem = static_cast<int64_t>(divkit::dtype_size(dtype));
  const double bytes = static_cast<double>((mode == Mode::loss ? 2 : 3) * n * v * elem);
  state.SetBytesProcessed(state.iterations() * static_cast<int64_t>(bytes));
  const double gbps = bytes * iters / sec / 1e9;
  state.counters["GB/s"] = gbps;
  const double triad = triad_for(threads);
  if (triad > 0) state.counters["of_triad"] = gbps * 1e9 / triad;
  state.counters["ns/entry"] = sec / iters / static_cast<double>(n * v) * 1e9;
  state.SetLabel(divkit::active_simd_target());
}

bool take_flag(const char* arg, const char* name, std::string& value) {
  const size_t len = std::strlen(name);
  if (std::strncmp(arg, name, len) == 0 && arg[len] == '=') {
    value = arg + len + 1;
    return true;
  }
  return false;
}

}  // namespace

int main(int argc, char** argv) {
  // Our flags first; the rest go to Google Benchmark.
  std::vector<char*> rest = {argv[0]};
  for (int i = 1; i < argc; ++i) {
    std::string val;
    if (take_flag(argv[i], "--n", val)) g_cfg.n = std::stoll(val);
    else if (take_flag(argv[i], "--kinds", val)) {
      if (val == "all") {
        g_cfg.kinds.clear();
        for (int k = 0; k < divkit::kNumDivergenceKinds; ++k)
          g_cfg.kinds.emplace_back(
              divkit::divergence_kind_name(static_cast<divkit::DivergenceKind>(k)));
      } else {
        g_cfg.kinds = split(val);
      }
    } else if (take_flag(argv[i], "--vocab", val)) {
      g_cfg.vocab.clear();
      for (const auto& x : split(val)) g_cfg.vocab.push_back(std::stoll(x));
    } else if (take_flag(argv[i], "--dtypes", val)) g_cfg.dtypes = split(val);
    else if (take_flag(argv[i], "--threads", val)) {
      g_cfg.threads.clear();
      for (const auto& x : split(val)) g_cfg.threads.push_back(std::stoi(x));
    } else if (take_flag(argv[i], "--simd", val)) g_cfg.simd = val;
    else if (take_flag(argv[i], "--triad_mib", val)) g_cfg.triad_mib = std::stoll(val);
    else rest.push_back(argv[i]);
  }
  if (g_cfg.threads.empty()) {
    const int max_threads = divkit::get_num_threads();
    g_cfg.threads = {1};
    if (max_threads > 1) g_cfg.threads.push_back(max_threads);
  }
  std::vector<divkit::DivergenceKind> kinds;
  std::vector<DType> dtypes;
  try {
    if (!g_cfg.simd.empty()) divkit::force_simd_target(g_cfg.simd);
    for (const auto& k : g_cfg.kinds) kinds.push_back(divkit::parse_divergence_kind(k));
  } catch (const divkit::Error& e) {
    std::fprintf(stderr, "divkit_bench: %s\n", e.what());
    return 2;
  }
  for (const auto& d : g_cfg.dtypes) {
    if (d == "f32") dtypes.push_back(DType::f32);
    else if (d == "bf16") dtypes.push_back(DType::bf16);
    else {
      std::fprintf(stderr, "divkit_bench: --dtypes takes f32 and/or bf16, got '%s'\n", d.c_str());
      return 2;
    }
  }

  int bargc = static_cast<int>(rest.size());
  benchmark::Initialize(&bargc, rest.data());
  if (benchmark::ReportUnrecognizedArguments(bargc, rest.data())) return 1;

  // The bandwidth reference, measured once per thread count before the divergences run.
  std::string targets;
  for (const auto& t : divkit::available_simd_targets())
    targets += (targets.empty() ? "" : " ") + t;
  benchmark::AddCustomContext("divkit_version", divkit::version());
  benchmark::AddCustomContext("simd_target", divkit::active_simd_target());
  benchmark::AddCustomContext("simd_available", targets);
  benchmark::AddCustomContext("N", std::to_string(g_cfg.n));
  for (int th : g_cfg.threads) {
    const double bps = measure_triad(th);
    g_triad_bps.emplace_back(th, bps);
    char buf[64];
    std::snprintf(buf, sizeof(buf), "%.2f GB/s (best of 7, %lld MiB)", bps / 1e9,
                  static_cast<long long>(g_cfg.triad_mib));
    benchmark::AddCustomContext("triad_threads_" + std::to_string(th), buf);
  }

  for (int th : g_cfg.threads)
    benchmark::RegisterBenchmark(("BM_Triad/threads:" + std::to_string(th)).c_str(), BM_Triad)
        ->Arg(th)
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
  // Grouped by (V, dtype) so that one set of inputs serves every kind; in-place runs last in
  // each group because they overwrite the student logits (regenerated afterwards).
  for (int64_t v : g_cfg.vocab)
    for (DType dt : dtypes)
      for (Mode mode : {Mode::loss, Mode::grad, Mode::inplace})
        for (auto kind : kinds)
          for (int th : g_cfg.threads) {
            const std::string name =
                std::string("BM_Divergence/") + divkit::divergence_kind_name(kind) +
                "/V:" + std::to_string(v) + "/" + (dt == DType::f32 ? "f32" : "bf16") + "/" +
                mode_name(mode) + "/threads:" + std::to_string(th);
            benchmark::RegisterBenchmark(name.c_str(), BM_Divergence, kind, v, dt, mode, th)
                ->UseRealTime()
                ->Unit(benchmark::kMillisecond);
          }

  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  g_inputs.reset();
  g_triad.reset();
  return 0;
}
