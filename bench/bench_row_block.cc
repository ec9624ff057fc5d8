// divkit_bench_row_block: CPU time per logit of the token-divergence row kernel over the
// vocabulary size, to see where the per-thread row block leaves the core's L2. No Google
// Benchmark: one thread's CPU time (CLOCK_THREAD_CPUTIME_ID, so that other processes loading the
// machine distort it less than wall time), median of --calls calls per point. With --threads > 1
// the process's CPU time (every thread) is reported instead.
//
//   divkit_bench_row_block [--n=16 | --entries=131334144] [--vocab=32000,64000,128256,256000]
//                          [--kinds=forward_kl,reverse_kl,jsd] [--dtype=f32|bf16]
//                          [--mode=grad|inplace|loss] [--calls=21] [--threads=1]
//
// --n rows at every V, or --entries / V rows (the same bytes at every V). Few rows keep the
// inputs in the last-level cache from call to call (only the row block's place in L2 then shows);
// --entries=131334144 (1024 rows of 128256, 512 MiB per fp32 input) reads them from memory, as a
// training step does.
// Inputs: student logits N(0, 2), teacher = student + N(0, 0.5); batchmean; grad: the student
// gradient into a separate pre-faulted buffer; inplace: into the student logits, which are
// restored from a copy (outside the timed region) before each call.
#include <time.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "divkit/divergence.h"
#include "divkit/runtime.h"
#include "divkit/tensor.h"

namespace {

int g_threads = 1;

double cpu_seconds() {
  timespec ts;
  clock_gettime(g_threads > 1 ? CLOCK_PROCESS_CPUTIME_ID : CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  size_t pos = 0;
  while (pos <= s.size()) {
    const size_t comma = s.find(',', pos);
    out.push_back(s.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos));
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  return out;
}

bool take_flag(const char* arg, const char* name, std::string& value) {
  const size_t len = std::strlen(name);
  if (std::strncmp(arg, name, len) == 0 && arg[len] == '=') {
    value = arg + len + 1;
    return true;
  }
  return false;
}

uint16_t to_bf16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

}  // namespace

int main(int argc, char** argv) {
  int64_t n = 16, entries = 0;
  int calls = 21;
  std::vector<std::string> vocab = {"32000", "64000", "128256", "256000"};
  std::vector<std::string> kinds = {"forward_kl", "reverse_kl", "jsd"};
  std::string dtype_name = "f32", mode = "grad";
  for (int i = 1; i < argc; ++i) {
    std::string val;
    if (take_flag(argv[i], "--n", val)) n = std::stoll(val);
    else if (take_flag(argv[i], "--entries", val)) entries = std::stoll(val);
    else if (take_flag(argv[i], "--calls", val)) calls = std::stoi(val);
    else if (take_flag(argv[i], "--vocab", val)) vocab = split(val);
    else if (take_flag(argv[i], "--kinds", val)) kinds = split(val);
    else if (take_flag(argv[i], "--dtype", val)) dtype_name = val;
    else if (take_flag(argv[i], "--mode", val)) mode = val;
    else if (take_flag(argv[i], "--threads", val)) g_threads = std::stoi(val);
    else {
      std::fprintf(stderr, "divkit_bench_row_block: unknown argument '%s'\n", argv[i]);
      return 2;
    }
  }
  if (dtype_name != "f32" && dtype_name != "bf16") {
    std::fprintf(stderr, "divkit_bench_row_block: --dtype takes f32 or bf16\n");
    return 2;
  }
  if (mode != "grad" && mode != "inplace" && mode != "loss") {
    std::fprintf(stderr, "divkit_bench_row_block: --mode takes grad, inplace or loss\n");
    return 2;
  }
  const divkit::DType dtype = dtype_name == "f32" ? divkit::DType::f32 : divkit::DType::bf16;
  const size_t es = dtype == divkit::DType::f32 ? 4 : 2;
  divkit::set_num_threads(g_threads);
  if (entries > 0) std::printf("# n=entries/V entries=%lld", static_cast<long long>(entries));
  else std::printf("# n=%lld", static_cast<long long>(n));
  std::printf(" dtype=%s mode=%s calls=%d threads=%d; CPU ns per logit (median)\n",
              dtype_name.c_str(), mode.c_str(), calls, g_threads);
  std::printf("%-12s %8s %6s %10s\n", "kind", "V", "N", "ns/logit");
  for (const std::string& vs : vocab) {
    const int64_t v = std::stoll(vs);
    if (entries > 0) n = std::max<int64_t>(1, entries / v);
    const size_t count = static_cast<size_t>(n * v);
    std::mt19937_64 rng(1234);
    std::normal_distribution<float> d_s(0.0f, 2.0f), d_noise(0.0f, 0.5f);
    std::vector<float> s32(count), t32(count);
    for (size_t k = 0; k < count; ++k) {
      s32[k] = d_s(rng);
      t32[k] = s32[k] + d_noise(rng);
    }
    std::vector<char> s(count * es), t(count * es), s_pristine, grad(count * es, 1);
    if (dtype == divkit::DType::f32) {
      std::memcpy(s.data(), s32.data(), count * 4);
      std::memcpy(t.data(), t32.data(), count * 4);
    } else {
      for (size_t k = 0; k < count; ++k) {
        const uint16_t bs = to_bf16(s32[k]), bt = to_bf16(t32[k]);
        std::memcpy(s.data() + 2 * k, &bs, 2);
        std::memcpy(t.data() + 2 * k, &bt, 2);
      }
    }
    s_pristine = s;
    const auto sv = divkit::TensorView::matrix(s.data(), dtype, n, v);
    const auto tv = divkit::TensorView::matrix(t.data(), dtype, n, v);
    for (const std::string& kind : kinds) {
      divkit::DivergenceSpec spec;
      spec.kind = divkit::parse_divergence_kind(kind);
      spec.beta = 0.5f;
      spec.alpha = 0.5f;
      divkit::DivergenceOptions options;
      options.reduction = divkit::Reduction::batchmean;
      float loss = 0.0f;
      divkit::DivergenceOutputs out;
      out.loss = divkit::TensorView::vector(&loss, divkit::DType::f32, 1);
      if (mode == "grad") out.grad_student = divkit::TensorView::matrix(grad.data(), dtype, n, v);
      if (mode == "inplace") out.grad_student = sv;
      std::vector<double> ns;
      for (int c = 0; c <= calls; ++c) {  // call 0 warms up
        if (mode == "inplace") std::memcpy(s.data(), s_pristine.data(), s.size());
        const double t0 = cpu_seconds();
        divkit::divergence(sv, tv, spec, options, out);
        const double sec = cpu_seconds() - t0;
        if (c > 0) ns.push_back(sec / static_cast<double>(count) * 1e9);
      }
      std::sort(ns.begin(), ns.end());
      std::printf("%-12s %8lld %6lld %10.3f   (loss %.6g)\n", kind.c_str(),
                  static_cast<long long>(v), static_cast<long long>(n), ns[ns.size() / 2],
                  static_cast<double>(loss));
      std::fflush(stdout);
    }
  }
  return 0;
}
