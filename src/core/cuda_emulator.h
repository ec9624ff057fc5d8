// The CUDA emulator: divkit's CUDA sources (src/**/*.cu) compiled by the host C++ compiler and
// run on the CPU, so that the kernels' logic (indexing, block reductions, barriers, warp
// exchanges, the host code around the launches) is executed and tested on machines without a
// GPU, under AddressSanitizer too (DIVKIT_CUDA=EMULATE; the build force-includes this header in
// every .cu source, before anything else).
//
// What it models: each thread block runs its threads as cooperative fibers on the calling OS
// thread; __syncthreads() and the warp exchanges (__shfl_*_sync, __ballot_sync) are scheduling
// points, so a kernel that reads shared memory before the barrier that orders it gives results
// that depend on the threads' order. Blocks run one after the other. "Device" memory is host
// memory from malloc, filled with a poison pattern on allocation; shared memory (static and
// dynamic) is filled with it before each block. Launch limits (threads per
// block, grid y/z, dynamic shared memory without the opt-in attribute) fail as on a GPU.
// What it does not model: concurrency between blocks or within a warp (the memory model, races
// between blocks, float-atomic order), the device's math library (expf, logf differ from the
// GPU's by a few ulp) and performance. It checks a kernel's logic, not that it runs on a GPU.
//
// Checks that abort with a message (they are bugs in a kernel, never bad input): a barrier
// reached by some threads of a block while others exited or wait at another exchange; a warp
// exchange whose lanes disagree on the operation or mask or that a lane of the mask skipped.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// The execution-space keywords mean nothing to the host compiler.
#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __host__
#define __host__
#undef __forceinline__
#define __forceinline__ inline __attribute__((always_inline))
#undef __launch_bounds__
#define __launch_bounds__(...)
// One instance per kernel function shared by the fibers of the block that runs (blocks run one
// after the other, so they may share it too). All of them live in one section, which the
// scheduler fills with the poison byte before each block: a block starts with garbage in its
// static shared memory as on the device, so a read before the first write shows.
#undef __shared__
#define __shared__ static __attribute__((section("divkit_emu_shared")))

extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;

namespace divkit::cuda_emu {

enum class WarpOp : int { shfl_xor, shfl_down, shfl_idx, ballot };

// Blocks the calling fiber until every lane of `mask` in its warp has made the same call; returns
// this lane's result (the value bits of the lane it reads, or the ballot).
uint64_t warp_exchange(WarpOp op, unsigned mask, uint64_t bits, int arg, int width);

// The dynamic shared memory of the running launch.
void* dynamic_shared();

struct LaunchConfig {
  dim3 grid;
  dim3 block;
  size_t shared_bytes = 0;
  const void* kernel = nullptr;
};

// Runs body(ctx) once per thread of every block of the grid. Returns the launch's error
// (invalid configuration, too much shared memory) without running anything.
cudaError_t run_grid(const LaunchConfig& config, void (*body)(void*), void* ctx);

template <class... P>
struct Launcher {
  void (*kernel)(P...);
  LaunchConfig config;

  // The arguments are converted to the kernel's parameter types once, as a launch copies them;
  // every thread gets its own copy.
  template <class... A>
  void operator()(A&&... args) const {
    static_assert(sizeof...(A) == sizeof...(P), "wrong number of kernel arguments");
    std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    struct Ctx {
      void (*kernel)(P...);
      std::tuple<std::decay_t<P>...>* params;
    } ctx{kernel, &params};
    run_grid(
        config,
        [](void* p) {
          auto* c = static_cast<Ctx*>(p);
          std::tuple<std::decay_t<P>...> copy = *c->params;
          std::apply(c->kernel, copy);
        },
        &ctx);
  }
};

template <class... P>
Launcher<P...> launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t shared_bytes,
                      cudaStream_t) {
  return {kernel, {grid, block, shared_bytes, reinterpret_cast<const void*>(kernel)}};
}

template <class T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>);
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}

template <class T>
T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

}  // namespace divkit::cuda_emu

#define DIVKIT_LAUNCH(kernel, grid, block, shared_bytes, stream) \
  ::divkit::cuda_emu::launch(kernel, grid, block, shared_bytes, stream)
#define DIVKIT_DYNAMIC_SHARED(type, name) \
  type* name = static_cast<type*>(::divkit::cuda_emu::dynamic_shared())

void __syncthreads();

// Device code calls these unqualified (CUDA declares them globally).
using std::isfinite;
using std::isinf;
using std::isnan;

// cuda_runtime.h's typed overload exists only for nvcc.
template <class... P>
cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}

template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  using namespace divkit::cuda_emu;
  return from_bits<T>(warp_exchange(WarpOp::shfl_xor, mask, to_bits(v), lane_mask, width));
}
template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  using namespace divkit::cuda_emu;
  return from_bits<T>(
      warp_exchange(WarpOp::shfl_down, mask, to_bits(v), static_cast<int>(delta), width));
}
template <class T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  using namespace divkit::cuda_emu;
  return from_bits<T>(warp_exchange(WarpOp::shfl_idx, mask, to_bits(v), src_lane, width));
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  using namespace divkit::cuda_emu;
  return static_cast<unsigned>(warp_exchange(WarpOp::ballot, mask, predicate != 0, 0, 32));
}

// Atomics: the fibers of a launch run one at a time, so a read-modify-write is atomic.
template <class T, class U>
T atomicAdd(T* p, U v) {
  const T old = *p;
  *p = static_cast<T>(old + static_cast<T>(v));
  return old;
}
template <class T, class U>
T atomicMin(T* p, U v) {
  const T old = *p;
  if (static_cast<T>(v) < old) *p = static_cast<T>(v);
  return old;
}
template <class T, class U>
T atomicMax(T* p, U v) {
  const T old = *p;
  if (static_cast<T>(v) > old) *p = static_cast<T>(v);
  return old;
}
template <class T, class U>
T atomicOr(T* p, U v) {
  const T old = *p;
  *p = static_cast<T>(old | static_cast<T>(v));
  return old;
}
template <class T, class U>
T atomicExch(T* p, U v) {
  const T old = *p;
  *p = static_cast<T>(v);
  return old;
}

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline long long __double_as_longlong(double x) {
  return divkit::cuda_emu::from_bits<long long>(divkit::cuda_emu::to_bits(x));
}
inline double __longlong_as_double(long long x) {
  return divkit::cuda_emu::from_bits<double>(divkit::cuda_emu::to_bits(x));
}
inline unsigned __float_as_uint(float x) {
  return divkit::cuda_emu::from_bits<unsigned>(divkit::cuda_emu::to_bits(x));
}
inline float __uint_as_float(unsigned x) {
  return divkit::cuda_emu::from_bits<float>(divkit::cuda_emu::to_bits(x));
}
// Rounded operations: the emulated sources build with -ffp-contract=off, so these are single
// IEEE operations as on the device.
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
template <class T>
T __ldg(const T* p) {
  return *p;
}
