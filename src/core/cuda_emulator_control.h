// The CUDA emulator's settings, for the tests that run the CUDA kernels on the CPU
// (DIVKIT_CUDA=EMULATE builds only; see cuda_emulator.h).
#pragma once

#include <string>
#include <vector>

namespace divkit::cuda_emu {

// Runs the threads of each block, and the blocks of each grid, in reverse order. A kernel whose
// results depend on the order (a missing __syncthreads, a read of shared memory another thread
// has not written yet) gives other bits than in forward order.
void set_reverse_order(bool reverse);

// The byte that fresh device memory and dynamic shared memory are filled with. A kernel that
// reads memory nothing wrote gives results that depend on it.
void set_poison_byte(unsigned char byte);

// Runs at most `max_x` blocks along x (0: no limit): a launch of a larger grid runs as the first
// max_x blocks, with gridDim.x = max_x. Only for kernels whose blocks walk their work with a
// grid stride (for (row = blockIdx.x; row < n; row += gridDim.x)): it makes them take several
// rows per block, with the per-block workspace reused between rows, without the thousands of
// rows a grid of the real size would need. A kernel that needs every block of its grid gives
// wrong results under it.
void set_max_grid_x(unsigned max_x);

// The number of kernel launches run so far in this process (tests check that a call took the
// CUDA path).
long long launch_count();

// The bytes of device memory allocated so far in this process (cudaMalloc / cudaMallocAsync,
// each rounded up to 256; frees not subtracted): tests compare what two calls allocate.
long long allocated_bytes();

}  // namespace divkit::cuda_emu

// ---- the emulated cuBLAS (core/cublas_emulator.cc) ---------------------------------------------
// The entry points core/gemm_cuda.cu loads (cublasCreate_v2, cublasDestroy_v2, cublasSetStream_v2,
// cublasGemmEx, cublasGetStatusString), as host functions that check their arguments as cuBLAS
// documents them and compute on host memory in fp64.

namespace divkit::cuda_emu {

// The "library" under one of cuBLAS's names (libcublas.so.13, libcublas.so.12, libcublas.so),
// nullptr for any other name. gemm_cuda.cu calls these instead of dlopen / dlsym.
void* cublas_open(const char* name, bool noload);
void* cublas_symbol(void* lib, const char* name);

// Every cublas_open call so far, as "noload:<name>" or "load:<name>" (cleared by the call).
std::vector<std::string> take_cublas_open_log();
// Whether the emulated library counts as already loaded in the process (as torch's is in a
// Python process): if not, an RTLD_NOLOAD open finds nothing. Default true.
void set_cublas_preloaded(bool preloaded);

// The stream of the last cublasGemmEx (the stream set on its handle), as void*.
void* cublas_last_stream();
// The number of cublasGemmEx calls so far, and of handles made.
long long cublas_gemm_count();
long long cublas_handle_count();
// The next cublasGemmEx returns `status` without computing (once), as a failing cuBLAS would.
void set_cublas_next_status(int status);
// Whether the library has cublasGetStatusString (cuBLAS before 11.4 has not).
void set_cublas_has_status_string(bool present);

}  // namespace divkit::cuda_emu
