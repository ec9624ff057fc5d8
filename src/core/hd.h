// DIVKIT_HD marks the functions that the CUDA kernels share with the CPU code
// (__host__ __device__ under nvcc, nothing for the host compiler), and the few helpers they need.
#pragma once

#include <math.h>

#include <limits>

#if defined(__CUDACC__)
#define DIVKIT_HD __host__ __device__
#else
#define DIVKIT_HD
#endif

namespace divkit {

inline constexpr float kInfinityF = std::numeric_limits<float>::infinity();

// log1p in double: ::log1p is the C library's on the host and CUDA's on the device.
DIVKIT_HD inline double log1p_f64(double x) { return ::log1p(x); }

}  // namespace divkit
