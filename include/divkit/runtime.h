// divkit: runtime settings shared by every family: thread count and SIMD target selection.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace divkit {

// Threads used by the CPU kernels (OpenMP over rows). Defaults to the OpenMP default, at most
// max_num_threads(). Results do not depend on it: every row is computed by one thread and row
// results are combined in a fixed order. n < 1 or n > max_num_threads() throws Error.
//
// Fork: OpenMP (libgomp) cannot restart its thread pool in a child made by fork() once the parent
// ran a parallel region; the child's next multi-threaded region would wait forever. A fork handler
// therefore makes such a child run every kernel on its calling thread: get_num_threads() returns 1
// there and set_num_threads(n > 1) throws Error. A child whose parent never asked for more than
// one thread keeps the usual setting. Processes started by spawn / exec are not affected.
void set_num_threads(int n);
int get_num_threads();
// 8 x the number of processors OpenMP sees (at least 8): more threads than that only cost
// memory and start-up time, and a count beyond what the system can create aborts the process.
int max_num_threads();
// Whether this process is a fork child running single-threaded for the reason above.
bool forked_single_threaded();

// SIMD targets (Highway runtime dispatch). Names as Highway prints them ("AVX3", "AVX2",
// "SSE4", "EMU128", ...). available_simd_targets() lists those compiled in and supported by
// this CPU, best first; force_simd_target(name) restricts dispatch to one of them (for tests
// and benchmarks), force_simd_target("") restores the automatic choice.
std::vector<std::string> available_simd_targets();
void force_simd_target(const std::string& name);
std::string active_simd_target();

std::string version();

}  // namespace divkit
