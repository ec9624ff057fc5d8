// divkit: runtime settings shared by every family: thread count and SIMD target selection.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace divkit {

// Threads used by the CPU kernels (OpenMP over rows). Defaults to the OpenMP default.
// Results do not depend on it: every row is computed by one thread and row results are
// combined in a fixed order. n < 1 throws Error.
void set_num_threads(int n);
int get_num_threads();

// SIMD targets (Highway runtime dispatch). Names as Highway prints them ("AVX3", "AVX2",
// "SSE4", "EMU128", ...). available_simd_targets() lists those compiled in and supported by
// this CPU, best first; force_simd_target(name) restricts dispatch to one of them (for tests
// and benchmarks), force_simd_target("") restores the automatic choice.
std::vector<std::string> available_simd_targets();
void force_simd_target(const std::string& name);
std::string active_simd_target();

std::string version();

}  // namespace divkit
