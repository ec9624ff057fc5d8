// The CUDA emulator's cuBLAS (DIVKIT_CUDA=EMULATE builds only): the entry points that
// core/gemm_cuda.cu loads, as host functions on host memory, so that the GEMM layer's logic (the
// row-major to column-major swap, the transposes, leading dimensions, beta, dtypes, the stream
// bound to the handle) runs in the tests. Arguments are checked as the cuBLAS documentation
// states for cublasGemmEx; products are summed in fp64 and rounded once to float32 (a GPU sums
// in float32: the tests' tolerance allows for that).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "core/cuda_emulator_control.h"

namespace divkit::cuda_emu {
namespace {

constexpr int kSuccess = 0, kNotInitialized = 1, kInvalidValue = 7, kNotSupported = 15;

struct EmuHandle {
  cudaStream_t stream = nullptr;
};

std::mutex g_mutex;
std::set<EmuHandle*> g_handles;
std::atomic<void*> g_last_stream{nullptr};
std::atomic<long long> g_gemm_count{0};
std::atomic<long long> g_handle_count{0};
std::atomic<int> g_next_status{kSuccess};
std::atomic<bool> g_has_status_string{true};
std::atomic<bool> g_preloaded{true};
std::vector<std::string> g_open_log;  // under g_mutex
char g_library;                       // its address is the library's "handle"

bool valid(void* h) {
  std::lock_guard<std::mutex> lock(g_mutex);
  return g_handles.count(static_cast<EmuHandle*>(h)) != 0;
}

int create(void** out) {
  if (out == nullptr) return kInvalidValue;
  auto* h = new EmuHandle;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    g_handles.insert(h);
  }
  ++g_handle_count;
  *out = h;
  return kSuccess;
}

int destroy(void* h) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_handles.find(static_cast<EmuHandle*>(h));
  if (it == g_handles.end()) return kNotInitialized;
  delete *it;
  g_handles.erase(it);
  return kSuccess;
}

int set_stream(void* h, cudaStream_t stream) {
  if (!valid(h)) return kNotInitialized;
  static_cast<EmuHandle*>(h)->stream = stream;
  return kSuccess;
}

double load(const void* p, int type, int64_t i) {
  switch (type) {
    case 0: return static_cast<const float*>(p)[i];
    case 2: return __half2float(static_cast<const __half*>(p)[i]);
    default: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  }
}

int gemm_ex(void* h, int transa, int transb, int m, int n, int k, const void* alpha_p,
            const void* a, int a_type, int lda, const void* b, int b_type, int ldb,
            const void* beta_p, void* c, int c_type, int ldc, int compute_type, int algo) {
  if (!valid(h)) return kNotInitialized;
  const int status = g_next_status.exchange(kSuccess);
  if (status != kSuccess) return status;
  if ((transa != 0 && transa != 1) || (transb != 0 && transb != 1) || m < 0 || n < 0 || k < 0)
    return kInvalidValue;
  if (lda < std::max(1, transa == 0 ? m : k) || ldb < std::max(1, transb == 0 ? k : n) ||
      ldc < std::max(1, m))
    return kInvalidValue;
  const bool type_ok = a_type == 0 || a_type == 2 || a_type == 14;
  if (!type_ok || b_type != a_type || c_type != 0 || compute_type != 68 || algo != -1)
    return kNotSupported;
  if (alpha_p == nullptr || beta_p == nullptr) return kInvalidValue;
  const float alpha = *static_cast<const float*>(alpha_p);
  const float beta = *static_cast<const float*>(beta_p);
  g_last_stream = static_cast<EmuHandle*>(h)->stream;
  ++g_gemm_count;
  float* cf = static_cast<float*>(c);
  for (int j = 0; j < n; ++j) {
    for (int i = 0; i < m; ++i) {
      double acc = 0.0;
      for (int l = 0; l < k; ++l) {
        const int64_t ai = transa == 0 ? i + int64_t(l) * lda : l + int64_t(i) * lda;
        const int64_t bi = transb == 0 ? l + int64_t(j) * ldb : j + int64_t(l) * ldb;
        acc += load(a, a_type, ai) * load(b, b_type, bi);
      }
      float& out = cf[i + int64_t(j) * ldc];
      // beta = 0: C is not read, as cuBLAS documents.
      const double old = beta == 0.0f ? 0.0 : double(beta) * double(out);
      out = static_cast<float>(double(alpha) * acc + old);
    }
  }
  return kSuccess;
}

const char* status_string(int s) {
  switch (s) {
    case 0: return "CUBLAS_STATUS_SUCCESS";
    case 1: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case 7: return "CUBLAS_STATUS_INVALID_VALUE";
    case 13: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case 15: return "CUBLAS_STATUS_NOT_SUPPORTED";
    default: return "CUBLAS_STATUS_UNKNOWN (emulated)";
  }
}

}  // namespace

void* cublas_open(const char* name, bool noload) {
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    g_open_log.push_back(std::string(noload ? "noload:" : "load:") + name);
  }
  if (noload && !g_preloaded) return nullptr;
  for (const char* n : {"libcublas.so.13", "libcublas.so.12", "libcublas.so"})
    if (std::strcmp(name, n) == 0) return &g_library;
  return nullptr;
}

void* cublas_symbol(void* lib, const char* name) {
  if (lib != &g_library) return nullptr;
  if (std::strcmp(name, "cublasCreate_v2") == 0) return reinterpret_cast<void*>(&create);
  if (std::strcmp(name, "cublasDestroy_v2") == 0) return reinterpret_cast<void*>(&destroy);
  if (std::strcmp(name, "cublasSetStream_v2") == 0) return reinterpret_cast<void*>(&set_stream);
  if (std::strcmp(name, "cublasGemmEx") == 0) return reinterpret_cast<void*>(&gemm_ex);
  if (std::strcmp(name, "cublasGetStatusString") == 0 && g_has_status_string)
    return reinterpret_cast<void*>(&status_string);
  return nullptr;
}

std::vector<std::string> take_cublas_open_log() {
  std::lock_guard<std::mutex> lock(g_mutex);
  std::vector<std::string> log;
  log.swap(g_open_log);
  return log;
}
void set_cublas_preloaded(bool preloaded) { g_preloaded = preloaded; }
void* cublas_last_stream() { return g_last_stream; }
long long cublas_gemm_count() { return g_gemm_count; }
long long cublas_handle_count() { return g_handle_count; }
void set_cublas_next_status(int status) { g_next_status = status; }
void set_cublas_has_status_string(bool present) { g_has_status_string = present; }

}  // namespace divkit::cuda_emu
