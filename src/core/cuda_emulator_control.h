// The CUDA emulator's settings, for the tests that run the CUDA kernels on the CPU
// (DIVKIT_CUDA=EMULATE builds only; see cuda_emulator.h).
#pragma once

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

}  // namespace divkit::cuda_emu
