// The CUDA emulator's scheduler and runtime (see cuda_emulator.h): thread blocks as cooperative
// fibers, the CUDA runtime calls divkit makes, on host memory.
#include "core/cuda_emulator.h"

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "core/cuda_emulator_control.h"

#if defined(__SANITIZE_ADDRESS__)
extern "C" void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom,
                                               size_t size);
extern "C" void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old,
                                                size_t* size_old);
#define DIVKIT_EMU_ASAN 1
#else
#define DIVKIT_EMU_ASAN 0
#endif

// The bounds of the section that holds every kernel's static __shared__ variables (the linker
// defines them; weak: a program without such a variable has no section).
extern "C" char __start_divkit_emu_shared[] __attribute__((weak));
extern "C" char __stop_divkit_emu_shared[] __attribute__((weak));

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

#if defined(__x86_64__)
// Saves the callee-saved registers and the SSE / x87 control words on the current stack, stores
// the stack pointer in *save_sp and resumes the stack load_sp saved. swapcontext does the same
// plus a signal-mask system call per switch, which dominated the emulator's time.
extern "C" void divkit_emu_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .p2align 4
  .type divkit_emu_switch,@function
divkit_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size divkit_emu_switch,.-divkit_emu_switch
)");
#endif

namespace divkit::cuda_emu {
namespace {

#if defined(__x86_64__)
struct Context {
  void* sp = nullptr;
};

// A fresh stack whose first switch "returns" into entry (which must never return).
void make_context(Context& c, char* stack, size_t size, void (*entry)()) {
  auto top = reinterpret_cast<uintptr_t>(stack + size) & ~uintptr_t{15};
  auto* sp = reinterpret_cast<uint64_t*>(top);
  *--sp = 0;  // entry starts as if called: its return-address slot, rsp = 8 mod 16
  *--sp = reinterpret_cast<uint64_t>(entry);
  for (int r = 0; r < 6; ++r) *--sp = 0;  // rbp, rbx, r12-r15
  uint32_t mxcsr = 0;
  uint16_t fpucw = 0;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  *--sp = static_cast<uint64_t>(mxcsr) | (static_cast<uint64_t>(fpucw) << 32);
  c.sp = sp;
}

void switch_context(Context& from, Context& to) { divkit_emu_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};

void make_context(Context& c, char* stack, size_t size, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}

void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

// Sanitizer builds use much larger frames.
constexpr size_t kStackBytes = DIVKIT_EMU_ASAN ? (1u << 20) : (256u << 10);
constexpr size_t kDefaultSharedBytes = 48u << 10;
constexpr size_t kOptinSharedBytes = 227u << 10;
constexpr int kMaxThreads = 1024;

enum class State { runnable, barrier, warp, done };

struct Fiber {
  Context ctx;
  char* stack = nullptr;
  State state = State::done;
  uint3 tid{};
  int lane = 0;
  WarpOp op = WarpOp::shfl_xor;
  unsigned mask = 0;
  int arg = 0;
  int width = 32;
  uint64_t bits = 0;
  uint64_t result = 0;
  void* fake_stack = nullptr;
};

struct Block {
  std::vector<Fiber> fibers;
  int count = 0;
  Context scheduler;
  Fiber* current = nullptr;
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
  const void* sched_bottom = nullptr;
  size_t sched_size = 0;
};

thread_local Block* t_block = nullptr;

struct Settings {
  bool reverse = false;
  unsigned char poison = 0xff;
  unsigned max_grid_x = 0;  // 0: no limit
};

std::mutex g_launch_mutex;  // __shared__ memory is static: one launch at a time per process
Settings g_settings;
long long g_launches = 0;
std::atomic<long long> g_allocated{0};  // device bytes allocated (allocated_bytes)
std::vector<char> g_dynamic_shared;
std::map<const void*, size_t> g_max_dynamic_shared;
// Fiber stacks, kept across launches (allocated uninitialized: only the pages used are touched).
std::vector<std::unique_ptr<char[]>> g_stacks;
thread_local cudaError_t t_last_error = cudaSuccess;
int g_device = 0;

[[noreturn]] void kernel_bug(const std::string& what) {
  std::fprintf(stderr, "divkit CUDA emulator: kernel bug in block (%u, %u, %u): %s\n", blockIdx.x,
               blockIdx.y, blockIdx.z, what.c_str());
  std::abort();
}

[[noreturn]] void fiber_entry() {
  Block* b = t_block;
#if DIVKIT_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &b->sched_bottom, &b->sched_size);
#endif
  b->body(b->ctx);
  Fiber& f = *b->current;
  f.state = State::done;
#if DIVKIT_EMU_ASAN
  // This fiber's stack is done with (nullptr: no fake stack to keep).
  __sanitizer_start_switch_fiber(nullptr, b->sched_bottom, b->sched_size);
#endif
  switch_context(f.ctx, b->scheduler);
  std::abort();  // a finished fiber is never resumed
}

// Scheduler -> fiber f until it blocks or returns.
void resume(Block& b, Fiber& f) {
  b.current = &f;
  threadIdx = f.tid;
#if DIVKIT_EMU_ASAN
  void* save = nullptr;
  __sanitizer_start_switch_fiber(&save, f.stack, kStackBytes);
#endif
  switch_context(b.scheduler, f.ctx);
#if DIVKIT_EMU_ASAN
  __sanitizer_finish_switch_fiber(save, nullptr, nullptr);
#endif
}

// Fiber -> scheduler, with the fiber's state already set.
void yield_to_scheduler() {
  Block& b = *t_block;
  Fiber& f = *b.current;
#if DIVKIT_EMU_ASAN
  __sanitizer_start_switch_fiber(&f.fake_stack, b.sched_bottom, b.sched_size);
#endif
  switch_context(f.ctx, b.scheduler);
#if DIVKIT_EMU_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, &b.sched_bottom, &b.sched_size);
#endif
  threadIdx = f.tid;
}

const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::shfl_xor: return "__shfl_xor_sync";
    case WarpOp::shfl_down: return "__shfl_down_sync";
    case WarpOp::shfl_idx: return "__shfl_sync";
    case WarpOp::ballot: return "__ballot_sync";
  }
  return "?";
}

// Completes the warp exchange that every lane of warp w waits at; false if none waits there.
bool resolve_warp(Block& b, int w) {
  const int first = w * 32, last = std::min(first + 32, b.count);
  Fiber* leader = nullptr;
  for (int i = first; i < last; ++i)
    if (b.fibers[i].state == State::warp) {
      leader = &b.fibers[i];
      break;
    }
  if (leader == nullptr) return false;
  for (int i = first; i < last; ++i) {
    const Fiber& f = b.fibers[i];
    const bool in_mask = (leader->mask >> f.lane) & 1u;
    if (!in_mask) continue;
    if (f.state != State::warp)
      kernel_bug(std::string(op_name(leader->op)) + " with mask " + std::to_string(leader->mask) +
                 " in warp " + std::to_string(w) + ": lane " + std::to_string(f.lane) +
                 (f.state == State::done ? " has exited" : " waits at __syncthreads"));
    if (f.op != leader->op || f.mask != leader->mask || f.width != leader->width ||
        ((f.op == WarpOp::shfl_xor || f.op == WarpOp::shfl_down) && f.arg != leader->arg))
      kernel_bug(std::string("lanes of warp ") + std::to_string(w) +
                 " disagree on a warp exchange (" + op_name(f.op) + " / " + op_name(leader->op) +
                 ")");
  }
  for (int i = first; i < last; ++i) {
    Fiber& f = b.fibers[i];
    if (!((leader->mask >> f.lane) & 1u)) continue;
    const int seg = f.lane - f.lane % f.width;  // the lane's segment of `width` lanes
    int src = f.lane;
    switch (f.op) {
      case WarpOp::shfl_xor: src = seg + ((f.lane - seg) ^ f.arg) % f.width; break;
      case WarpOp::shfl_down:
        src = (f.lane - seg) + f.arg < f.width ? f.lane + f.arg : f.lane;
        break;
      case WarpOp::shfl_idx: src = seg + ((f.arg % f.width) + f.width) % f.width; break;
      case WarpOp::ballot: break;
    }
    if (f.op == WarpOp::ballot) {
      uint64_t ballot = 0;
      for (int j = first; j < last; ++j)
        if (((leader->mask >> b.fibers[j].lane) & 1u) && b.fibers[j].bits != 0)
          ballot |= 1ull << b.fibers[j].lane;
      f.result = ballot;
    } else {
      const int k = first + src;
      if (k >= last || !((leader->mask >> (src)) & 1u))
        kernel_bug(std::string(op_name(f.op)) + ": lane " + std::to_string(f.lane) +
                   " reads lane " + std::to_string(src) + ", outside the mask or the block");
      f.result = b.fibers[k].bits;
    }
  }
  for (int i = first; i < last; ++i)
    if ((leader->mask >> b.fibers[i].lane) & 1u) b.fibers[i].state = State::runnable;
  return true;
}

// Fills the static shared memory of every kernel with the poison byte. Byte stores outside
// AddressSanitizer's view: the section holds its redzones between the variables, which only
// the shadow memory marks, so writing them is harmless but a checked memset would report it.
__attribute__((no_sanitize_address)) void poison_static_shared(unsigned char byte) {
  if (__start_divkit_emu_shared == nullptr) return;
  volatile char* p = __start_divkit_emu_shared;
  for (; p < __stop_divkit_emu_shared; ++p) *p = static_cast<char>(byte);
}

void run_block(Block& b) {
  for (int i = 0; i < b.count; ++i) {
    Fiber& f = b.fibers[i];
    f.state = State::runnable;
    f.lane = i % 32;
    f.tid = uint3{static_cast<unsigned>(i % blockDim.x),
                  static_cast<unsigned>(i / blockDim.x % blockDim.y),
                  static_cast<unsigned>(i / (blockDim.x * blockDim.y))};
    make_context(f.ctx, f.stack, kStackBytes, fiber_entry);
  }
  const int warps = (b.count + 31) / 32;
  for (;;) {
    for (int k = 0; k < b.count; ++k) {
      Fiber& f = b.fibers[g_settings.reverse ? b.count - 1 - k : k];
      if (f.state == State::runnable) resume(b, f);
    }
    bool released = false;
    for (int w = 0; w < warps; ++w) released = resolve_warp(b, w) || released;
    if (released) continue;
    int done = 0, at_barrier = 0;
    for (int i = 0; i < b.count; ++i) {
      done += b.fibers[i].state == State::done;
      at_barrier += b.fibers[i].state == State::barrier;
    }
    if (done == b.count) return;
    if (done > 0)
      kernel_bug("__syncthreads reached by " + std::to_string(at_barrier) + " threads while " +
                 std::to_string(done) + " have exited");
    for (Fiber& f : b.fibers) f.state = State::runnable;
  }
}

}  // namespace

uint64_t warp_exchange(WarpOp op, unsigned mask, uint64_t bits, int arg, int width) {
  Block* b = t_block;
  if (b == nullptr) {
    std::fprintf(stderr, "divkit CUDA emulator: %s outside a kernel\n", op_name(op));
    std::abort();
  }
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0)
    kernel_bug(std::string(op_name(op)) + ": width must be a power of 2 up to 32");
  Fiber& f = *b->current;
  f.state = State::warp;
  f.op = op;
  f.mask = mask;
  f.arg = arg;
  f.width = width;
  f.bits = bits;
  yield_to_scheduler();
  return f.result;
}

void* dynamic_shared() { return g_dynamic_shared.data(); }

cudaError_t run_grid(const LaunchConfig& config, void (*body)(void*), void* ctx) {
  dim3 g = config.grid;
  const dim3 bl = config.block;
  const long long threads = static_cast<long long>(bl.x) * bl.y * bl.z;
  cudaError_t err = cudaSuccess;
  if (threads <= 0 || threads > kMaxThreads || bl.z > 64 || g.x == 0 || g.y == 0 || g.z == 0 ||
      g.y > 65535 || g.z > 65535 || g.x > 2147483647u)
    err = cudaErrorInvalidConfiguration;
  size_t limit = kDefaultSharedBytes;
  {
    auto it = g_max_dynamic_shared.find(config.kernel);
    if (it != g_max_dynamic_shared.end()) limit = std::max(limit, it->second);
  }
  if (err == cudaSuccess && config.shared_bytes > limit) err = cudaErrorInvalidValue;
  if (err != cudaSuccess) {
    t_last_error = err;
    return err;
  }
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  ++g_launches;
  if (g_settings.max_grid_x != 0 && g.x > g_settings.max_grid_x) g.x = g_settings.max_grid_x;
  // Dynamic shared memory starts as garbage, as on the device.
  g_dynamic_shared.assign(std::max<size_t>(config.shared_bytes, 16),
                          static_cast<char>(g_settings.poison));
  Block block;
  block.count = static_cast<int>(threads);
  block.fibers.resize(block.count);
  while (g_stacks.size() < block.fibers.size()) g_stacks.emplace_back(new char[kStackBytes]);
  for (size_t i = 0; i < block.fibers.size(); ++i) block.fibers[i].stack = g_stacks[i].get();
  block.body = body;
  block.ctx = ctx;
  Block* saved = t_block;
  t_block = &block;
  blockDim = bl;
  gridDim = g;
  const unsigned long long total = static_cast<unsigned long long>(g.x) * g.y * g.z;
  for (unsigned long long k = 0; k < total; ++k) {
    const unsigned long long id = g_settings.reverse ? total - 1 - k : k;
    blockIdx = uint3{static_cast<unsigned>(id % g.x), static_cast<unsigned>(id / g.x % g.y),
                     static_cast<unsigned>(id / (static_cast<unsigned long long>(g.x) * g.y))};
    poison_static_shared(g_settings.poison);
    // Dynamic shared memory too: each block starts with garbage.
    std::fill(g_dynamic_shared.begin(), g_dynamic_shared.end(),
              static_cast<char>(g_settings.poison));
    run_block(block);
  }
  t_block = saved;
  return cudaSuccess;
}

}  // namespace divkit::cuda_emu

void __syncthreads() {
  using namespace divkit::cuda_emu;
  if (t_block == nullptr) {
    std::fprintf(stderr, "divkit CUDA emulator: __syncthreads outside a kernel\n");
    std::abort();
  }
  t_block->current->state = State::barrier;
  yield_to_scheduler();
}

namespace divkit::cuda_emu {

void set_reverse_order(bool reverse) { g_settings.reverse = reverse; }
void set_poison_byte(unsigned char byte) { g_settings.poison = byte; }
void set_max_grid_x(unsigned max_x) { g_settings.max_grid_x = max_x; }
long long launch_count() {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  return g_launches;
}
long long allocated_bytes() { return g_allocated.load(); }

}  // namespace divkit::cuda_emu

// ---- the CUDA runtime calls divkit makes, on host memory --------------------------------------

namespace {

cudaError_t fail(cudaError_t err) {
  divkit::cuda_emu::t_last_error = err;
  return err;
}

}  // namespace

extern "C" {

cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
  *device = divkit::cuda_emu::g_device;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  if (device != 0) return fail(cudaErrorInvalidDevice);
  divkit::cuda_emu::g_device = device;
  return cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
  if (device != 0) return fail(cudaErrorInvalidDevice);
  std::memset(prop, 0, sizeof(*prop));
  std::snprintf(prop->name, sizeof(prop->name), "divkit CUDA emulator (CPU)");
  prop->multiProcessorCount = 4;
  prop->sharedMemPerBlock = divkit::cuda_emu::kDefaultSharedBytes;
  prop->sharedMemPerBlockOptin = divkit::cuda_emu::kOptinSharedBytes;
  prop->maxThreadsPerBlock = divkit::cuda_emu::kMaxThreads;
  prop->warpSize = 32;
  prop->major = 9;
  prop->minor = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return fail(cudaErrorInvalidDevice);
  switch (attr) {
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = static_cast<int>(divkit::cuda_emu::kOptinSharedBytes);
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock:
      *value = static_cast<int>(divkit::cuda_emu::kDefaultSharedBytes);
      return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = 4; return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock: *value = divkit::cuda_emu::kMaxThreads; return cudaSuccess;
    case cudaDevAttrWarpSize: *value = 32; return cudaSuccess;
    default: return fail(cudaErrorInvalidValue);
  }
}

cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return fail(cudaErrorInvalidValue);
  if (value < 0 || static_cast<size_t>(value) > divkit::cuda_emu::kOptinSharedBytes)
    return fail(cudaErrorInvalidValue);
  divkit::cuda_emu::g_max_dynamic_shared[func] = static_cast<size_t>(value);
  return cudaSuccess;
}

cudaError_t cudaGetLastError(void) {
  const cudaError_t err = divkit::cuda_emu::t_last_error;
  divkit::cuda_emu::t_last_error = cudaSuccess;
  return err;
}

cudaError_t cudaPeekAtLastError(void) { return divkit::cuda_emu::t_last_error; }

const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorMemoryAllocation: return "out of memory";
    default: return "unknown error (emulator)";
  }
}

cudaError_t cudaMallocAsync(void** ptr, size_t size, cudaStream_t) {
  // 256-byte aligned as cudaMalloc's; filled with the poison byte (device memory starts as
  // garbage: a kernel that reads what nothing wrote gives results that depend on the byte).
  const size_t bytes = (std::max<size_t>(size, 1) + 255) / 256 * 256;
  void* p = std::aligned_alloc(256, bytes);
  if (p == nullptr) return fail(cudaErrorMemoryAllocation);
  std::memset(p, divkit::cuda_emu::g_settings.poison, bytes);
  divkit::cuda_emu::g_allocated += static_cast<long long>(bytes);
  *ptr = p;
  return cudaSuccess;
}

cudaError_t cudaMalloc(void** ptr, size_t size) { return cudaMallocAsync(ptr, size, nullptr); }

cudaError_t cudaFreeAsync(void* ptr, cudaStream_t) {
  std::free(ptr);
  return cudaSuccess;
}

cudaError_t cudaFree(void* ptr) { return cudaFreeAsync(ptr, nullptr); }

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t count, cudaMemcpyKind,
                            cudaStream_t) {
  if (count > 0) std::memmove(dst, src, count);
  return cudaSuccess;
}

cudaError_t cudaMemcpy(void* dst, const void* src, size_t count, cudaMemcpyKind kind) {
  return cudaMemcpyAsync(dst, src, count, kind, nullptr);
}

cudaError_t cudaMemcpy2D(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width,
                         size_t height, cudaMemcpyKind) {
  if (width > dpitch || width > spitch) return fail(cudaErrorInvalidValue);
  for (size_t r = 0; r < height; ++r)
    std::memmove(static_cast<char*>(dst) + r * dpitch, static_cast<const char*>(src) + r * spitch,
                 width);
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t) {
  if (count > 0) std::memset(ptr, value, count);
  return cudaSuccess;
}

cudaError_t cudaMemset(void* ptr, int value, size_t count) {
  return cudaMemsetAsync(ptr, value, count, nullptr);
}

cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }

}  // extern "C"
