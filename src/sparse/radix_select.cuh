// The block-wide radix select of the k-th largest value of a row, shared by the CUDA kernels
// that need a row's top k (sparse_cuda.cu: topk_divergence's teacher; label_cuda.cu: the top-k
// mass). The key and digit steps are sparse_scalar.h's (order_key, radix_pick), tested on the
// host against the CPU's selection.
#pragma once

#include <cstdint>

#include "sparse/sparse_scalar.h"

namespace divkit::radix_select {

// Shared memory of one selection (in the caller's __shared__ struct).
struct RadixShared {
  uint32_t hist[256];
  uint32_t digit;
  long long remaining;
};

struct RadixKth {
  uint32_t key;       // order_key of the k-th largest value
  int64_t remaining;  // how many entries equal to it are among the k largest (>= 1)
};

// The k-th largest of key(j), j in [0, n) (key(j) = sparse_scalar::order_key of the value),
// for 1 <= k <= n: four 8-bit histogram passes over the keys (integer atomics in shared
// memory), every thread of the block calling it. Reads the row four times.
template <int kThreads, class Key>
__device__ RadixKth block_radix_kth(int64_t n, int64_t k, Key key, RadixShared& sh) {
  uint32_t prefix = 0, mask = 0;
  int64_t remaining = k;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += kThreads) sh.hist[b] = 0u;
    __syncthreads();
    for (int64_t j = threadIdx.x; j < n; j += kThreads) {
      const uint32_t kj = key(j);
      if ((kj & mask) == prefix) atomicAdd(&sh.hist[(kj >> shift) & 255u], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int64_t rem = remaining;
      sh.digit = sparse_scalar::radix_pick(sh.hist, rem);
      sh.remaining = rem;
    }
    __syncthreads();
    prefix |= sh.digit << shift;
    mask |= 255u << shift;
    remaining = sh.remaining;
    __syncthreads();  // sh.hist, sh.digit and sh.remaining are rewritten by the next pass
  }
  return {prefix, remaining};
}

}  // namespace divkit::radix_select
