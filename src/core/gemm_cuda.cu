// The device GEMM over cuBLAS loaded at run time (see gemm_cuda.h). Host code only.
#include "core/gemm_cuda.h"

#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#ifdef DIVKIT_CUDA_EMULATOR
#include "core/cuda_emulator_control.h"
#else
#include <dlfcn.h>
#endif

namespace divkit::gemm_cuda {
namespace {

// The few cuBLAS declarations used here, with the values of cublas_api.h and library_types.h
// (the development machines' toolkit has no cuBLAS headers). Enums are passed as int, their
// underlying type in the C ABI.
using Handle = void*;  // cublasHandle_t
using Status = int;    // cublasStatus_t
constexpr Status kSuccess = 0;
constexpr int kOpN = 0;           // CUBLAS_OP_N
constexpr int kOpT = 1;           // CUBLAS_OP_T
constexpr int kR32F = 0;          // CUDA_R_32F
constexpr int kR16F = 2;          // CUDA_R_16F
constexpr int kR16BF = 14;        // CUDA_R_16BF
constexpr int kCompute32F = 68;   // CUBLAS_COMPUTE_32F
constexpr int kGemmDefault = -1;  // CUBLAS_GEMM_DEFAULT

using CreateFn = Status (*)(Handle*);
using DestroyFn = Status (*)(Handle);
using SetStreamFn = Status (*)(Handle, cudaStream_t);
using GemmExFn = Status (*)(Handle, int transa, int transb, int m, int n, int k, const void* alpha,
                            const void* a, int a_type, int lda, const void* b, int b_type, int ldb,
                            const void* beta, void* c, int c_type, int ldc, int compute_type,
                            int algo);
using StatusStringFn = const char* (*)(Status);

struct Api {
  CreateFn create = nullptr;
  DestroyFn destroy = nullptr;
  SetStreamFn set_stream = nullptr;
  GemmExFn gemm_ex = nullptr;
  StatusStringFn status_string = nullptr;  // cuBLAS >= 11.4; absent: our own names
};

// dlopen / dlsym, or the emulator's library in EMULATE builds (which must not dlopen).
void* open_library(const std::string& name, bool noload) {
#ifdef DIVKIT_CUDA_EMULATOR
  return cuda_emu::cublas_open(name.c_str(), noload);
#else
  return dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL | (noload ? RTLD_NOLOAD : 0));
#endif
}

void* find_symbol(void* lib, const char* name) {
#ifdef DIVKIT_CUDA_EMULATOR
  return cuda_emu::cublas_symbol(lib, name);
#else
  return dlsym(lib, name);
#endif
}

std::string last_open_error() {
#ifdef DIVKIT_CUDA_EMULATOR
  return "not a library the CUDA emulator provides";
#else
  const char* e = dlerror();
  return e != nullptr ? e : "unknown error";
#endif
}

// The process-wide state: the loaded library (or why it could not be loaded) and the handles of
// exited threads, kept for reuse. Never destroyed: nothing calls into cuBLAS while the process
// tears down (the CUDA runtime may be gone by then), as PyTorch's handle pool does.
struct State {
  std::mutex mutex;
  std::vector<std::string> names = default_library_names();
  bool tried = false;
  Api api;
  std::string failure;      // why loading failed, without the caller's name
  uint64_t generation = 0;  // bumped when the library is forgotten (tests)
  std::vector<std::pair<int, Handle>> free_handles;  // (device, handle) of exited threads
};

State& state() {
  static State* s = new State;
  return *s;
}

const char* status_name(Status s) {
  switch (s) {
    case 0: return "CUBLAS_STATUS_SUCCESS";
    case 1: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case 3: return "CUBLAS_STATUS_ALLOC_FAILED";
    case 7: return "CUBLAS_STATUS_INVALID_VALUE";
    case 8: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case 11: return "CUBLAS_STATUS_MAPPING_ERROR";
    case 13: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case 14: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case 15: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case 16: return "CUBLAS_STATUS_LICENSE_ERROR";
    default: return "unknown cuBLAS status";
  }
}

// Loads the library on the first call (under the state's lock). Returns nullptr and leaves the
// reason in s.failure when it cannot.
const Api* load_locked(State& s) {
  if (s.tried) return s.failure.empty() ? &s.api : nullptr;
  s.tried = true;
  std::string tried, last_error;
  void* lib = nullptr;
  std::string found;
  // First a library the process already has (torch's), then a fresh load, name by name.
  for (bool noload : {true, false}) {
    for (const std::string& name : s.names) {
      lib = open_library(name, noload);
      if (lib != nullptr) {
        found = name;
        break;
      }
      if (!noload) {
        last_error = last_open_error();
        tried += (tried.empty() ? "" : ", ") + name;
      }
    }
    if (lib != nullptr) break;
  }
  if (lib == nullptr) {
    s.failure = "cannot load cuBLAS (tried " + tried + "; last error: " + last_error +
                "); it comes with PyTorch's CUDA wheels and the nvidia-cublas wheel, or put "
                "libcublas.so on LD_LIBRARY_PATH";
    return nullptr;
  }
  Api api;
  const char* missing = nullptr;
  auto need = [&](auto& fn_ptr, const char* name) {
    void* p = find_symbol(lib, name);
    if (p == nullptr && missing == nullptr) missing = name;
    fn_ptr = reinterpret_cast<std::remove_reference_t<decltype(fn_ptr)>>(p);
  };
  need(api.create, "cublasCreate_v2");
  need(api.destroy, "cublasDestroy_v2");
  need(api.set_stream, "cublasSetStream_v2");
  need(api.gemm_ex, "cublasGemmEx");
  api.status_string = reinterpret_cast<StatusStringFn>(find_symbol(lib, "cublasGetStatusString"));
  if (missing != nullptr) {
    s.failure = found + " has no " + missing + " (cuBLAS 11 or later is needed)";
    return nullptr;
  }
  s.api = api;
  return &s.api;
}

std::string status_text(const Api& api, Status st) {
  std::string name = api.status_string != nullptr ? api.status_string(st) : status_name(st);
  return name + " (" + std::to_string(st) + ")";
}

void check_status(const char* fn, const Api& api, Status st, const char* what) {
  if (st != kSuccess)
    throw Error(std::string(fn) + ": cuBLAS error in " + what + ": " + status_text(api, st));
}

// This thread's handles, one per device. Returned to the state's pool when the thread exits.
struct ThreadHandles {
  uint64_t generation = 0;
  DestroyFn destroy = nullptr;  // of the library the handles come from
  std::vector<std::pair<int, Handle>> handles;

  ~ThreadHandles() {
    if (handles.empty()) return;
    State& s = state();
    std::lock_guard<std::mutex> lock(s.mutex);
    if (generation == s.generation)
      s.free_handles.insert(s.free_handles.end(), handles.begin(), handles.end());
  }
};

thread_local ThreadHandles t_handles;

// The library's entry points and this thread's handle on the current device, bound to `stream`.
std::pair<const Api*, Handle> handle_for(const char* fn, cudaStream_t stream) {
  State& s = state();
  const Api* api = nullptr;
  {
    // The library first: without it, that is the error to report (a machine without a GPU
    // too).
    std::lock_guard<std::mutex> lock(s.mutex);
    api = load_locked(s);
    if (api == nullptr) throw Error(std::string(fn) + ": " + s.failure);
  }
  int device = 0;
  const cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess)
    throw Error(std::string(fn) + ": CUDA error in cudaGetDevice: " + cudaGetErrorString(err));
  Handle handle = nullptr;
  {
    std::lock_guard<std::mutex> lock(s.mutex);
    if (t_handles.generation != s.generation) {
      // Handles of a forgotten library (tests): destroyed through the library they came from.
      for (auto& dh : t_handles.handles) (void)t_handles.destroy(dh.second);
      t_handles.handles.clear();
      t_handles.generation = s.generation;
    }
    t_handles.destroy = api->destroy;
    for (auto& dh : t_handles.handles)
      if (dh.first == device) handle = dh.second;
    // Else one an exited thread left on this device.
    for (size_t i = 0; handle == nullptr && i < s.free_handles.size(); ++i) {
      if (s.free_handles[i].first != device) continue;
      handle = s.free_handles[i].second;
      s.free_handles.erase(s.free_handles.begin() + static_cast<std::ptrdiff_t>(i));
      t_handles.handles.emplace_back(device, handle);
    }
  }
  if (handle == nullptr) {
    check_status(fn, *api, api->create(&handle), "cublasCreate_v2");
    t_handles.handles.emplace_back(device, handle);
  }
  check_status(fn, *api, api->set_stream(handle, stream), "cublasSetStream_v2");
  return {api, handle};
}

int data_type(const char* fn, DType a_dtype, DType b_dtype) {
  if (a_dtype == b_dtype) {
    switch (a_dtype) {
      case DType::f32: return kR32F;
      case DType::bf16: return kR16BF;
      case DType::f16: return kR16F;
      default: break;
    }
  }
  throw Error(std::string(fn) +
              ": the GEMM operands must share one dtype of float32, bfloat16 or float16, got " +
              dtype_name(a_dtype) + " and " + dtype_name(b_dtype));
}

int to_int(const char* fn, const char* what, int64_t v) {
  if (v < 0 || v > INT_MAX)
    throw Error(std::string(fn) + ": GEMM " + what + " must be in [0, 2^31 - 1], got " +
                std::to_string(v));
  return static_cast<int>(v);
}

// ld must hold a row of `row` elements (and be >= 1, as cuBLAS asks).
int leading(const char* fn, const char* what, int64_t ld, int64_t row) {
  const int64_t need = row > 1 ? row : 1;
  if (ld < need)
    throw Error(std::string(fn) + ": GEMM " + what + " must be >= " + std::to_string(need) +
                ", got " + std::to_string(ld));
  return to_int(fn, what, ld);
}

// Row-major C[m, n] is column-major C^T[n, m] with the same leading dimension: C^T = op(B') *
// op(A'), where A' and B' are the row-major A and B read as column-major (their transposes).
// a_row / b_row: the row lengths of A and B as stored.
void gemm(const char* fn, bool a_transposed, bool b_transposed, int64_t m, int64_t n, int64_t k,
          float alpha, const void* a, DType a_dtype, int64_t lda, int64_t a_row, const void* b,
          DType b_dtype, int64_t ldb, int64_t b_row, float beta, float* c, int64_t ldc,
          CUstream_st* stream) {
  const int type = data_type(fn, a_dtype, b_dtype);
  const int im = to_int(fn, "m", m), in = to_int(fn, "n", n), ik = to_int(fn, "k", k);
  const int ia = leading(fn, "lda", lda, a_row), ib = leading(fn, "ldb", ldb, b_row);
  const int ic = leading(fn, "ldc", ldc, n);
  if (m == 0 || n == 0) return;  // nothing to write
  auto [api, handle] = handle_for(fn, stream);
  // Column-major: the first operand is B' (n x k as op(B')), the second A' (k x m as op(A')).
  // B stored [n, k] (abt) is B' = B^T [k, n]: transposed back; stored [k, n] (ab, atb) it is
  // already [n, k]. A stored [m, k] (abt, ab) is A' = [k, m]; stored [k, m] (atb) it needs T.
  const int op_b = b_transposed ? kOpT : kOpN;
  const int op_a = a_transposed ? kOpT : kOpN;
  check_status(fn, *api,
               api->gemm_ex(handle, op_b, op_a, in, im, ik, &alpha, b, type, ib, a, type, ia, &beta,
                            c, kR32F, ic, kCompute32F, kGemmDefault),
               "cublasGemmEx");
}

}  // namespace

std::vector<std::string> default_library_names() {
  return {"libcublas.so.13", "libcublas.so.12", "libcublas.so"};
}

void set_library_names_for_testing(const std::vector<std::string>& names) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  // The pooled handles belong to the library being forgotten (never unloaded, so its destroy
  // stays callable).
  if (s.tried && s.failure.empty())
    for (auto& dh : s.free_handles) (void)s.api.destroy(dh.second);
  s.free_handles.clear();
  s.names = names.empty() ? default_library_names() : names;
  s.tried = false;
  s.api = Api{};
  s.failure.clear();
  ++s.generation;
}

void abt(const char* fn, int64_t m, int64_t n, int64_t k, float alpha, const void* a, DType a_dtype,
         int64_t lda, const void* b, DType b_dtype, int64_t ldb, float beta, float* c, int64_t ldc,
         CUstream_st* stream) {
  gemm(fn, false, true, m, n, k, alpha, a, a_dtype, lda, k, b, b_dtype, ldb, k, beta, c, ldc,
       stream);
}

void ab(const char* fn, int64_t m, int64_t n, int64_t k, float alpha, const void* a, DType a_dtype,
        int64_t lda, const void* b, DType b_dtype, int64_t ldb, float beta, float* c, int64_t ldc,
        CUstream_st* stream) {
  gemm(fn, false, false, m, n, k, alpha, a, a_dtype, lda, k, b, b_dtype, ldb, n, beta, c, ldc,
       stream);
}

void atb(const char* fn, int64_t m, int64_t n, int64_t k, float alpha, const void* a, DType a_dtype,
         int64_t lda, const void* b, DType b_dtype, int64_t ldb, float beta, float* c, int64_t ldc,
         CUstream_st* stream) {
  gemm(fn, true, false, m, n, k, alpha, a, a_dtype, lda, m, b, b_dtype, ldb, n, beta, c, ldc,
       stream);
}

}  // namespace divkit::gemm_cuda
