// The GEMM piece scheduler of the fused linear-head kernels (gemm.h's calls, shared out over
// OpenMP threads).
//
// Every GEMM of the fused chunk loop is cut into pieces whose shapes depend on the operands' sizes
// (V and H) only, never on the thread count; each piece is one single-threaded BLAS call, and the
// OpenMP threads share the pieces out. Two reasons: the results do not depend on the thread count
// (a multi-threaded BLAS call does not promise that, nor do calls of other shapes: the same GEMM
// cut by columns in two gives other low bits), and a 16-bit weight is converted by each thread for
// its own pieces, so one thread's conversion (memory-bound) overlaps another's GEMM. Converting on
// one thread between multi-threaded GEMMs left the other cores idle; an OpenMP conversion between
// them slowed the GEMMs down (OpenMP's workers spin-wait beside OpenBLAS's).
#pragma once

#include <cstdint>
#include <functional>

namespace divkit::gemm {

// Rows of a [v, h] weight per piece: about 8 MiB of fp32 (1024 rows at h = 2048), at least 64.
int64_t piece_rows(int64_t v, int64_t h);

// Runs body(t, p) for every piece p in [0, count) on up to `threads` OpenMP threads (t: the
// thread running it), each thread taking the next piece not yet taken, with the BLAS
// single-threaded; an exception in a thread is rethrown (as divkit::Error) once all have stopped.
void for_pieces(int threads, int64_t count, const std::function<void(int t, int64_t p)>& body);

// Sums a product over `groups` groups in a fixed order, whatever the thread count: group s is
// computed by one thread with product(t, s, acc, ld), which writes (not adds) its [m, n] part
// into acc (leading dimension ld): dst itself for group 0, a buffer of thread t otherwise; the
// groups s > 0 are then added into dst in order of s. So the result is bitwise the same for any
// thread count.
void sum_groups_in_order(
    int threads, int64_t groups, int64_t m, int64_t n, float* dst, int64_t ldd,
    const std::function<void(int t, int64_t s, float* acc, int64_t ld)>& product);

}  // namespace divkit::gemm
