#include "core/gemm_pieces.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <string>
#include <vector>

#include "core/gemm.h"
#include "divkit/tensor.h"

namespace divkit::gemm {

int64_t piece_rows(int64_t v, int64_t h) {
  constexpr int64_t kPieceFloats = int64_t{2} << 20;
  return std::min(std::max<int64_t>(kPieceFloats / std::max<int64_t>(h, 1), 64),
                  std::max<int64_t>(v, 1));
}

void for_pieces(int threads, int64_t count, const std::function<void(int t, int64_t p)>& body) {
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, count)));
  set_blas_threads(1);
  std::string error;
  // Pieces are taken in order by whichever thread is free: on a shared machine one thread often
  // gets less of its core than another, and a fixed split then leaves the others spinning at the
  // barrier. A piece is the same single-threaded call whichever thread runs it, so the results do
  // not depend on the schedule.
  std::atomic<int64_t> next{0};
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const int t = omp_get_thread_num();
    try {
      for (int64_t p = next.fetch_add(1); p < count; p = next.fetch_add(1)) body(t, p);
    } catch (const std::exception& e) {
      next.store(count);  // the others stop after their current piece
#pragma omp critical
      if (error.empty()) error = e.what();
    }
  }
  if (!error.empty()) throw Error(error);
}

void sum_groups_in_order(
    int threads, int64_t groups, int64_t m, int64_t n, float* dst, int64_t ldd,
    const std::function<void(int t, int64_t s, float* acc, int64_t ld)>& product) {
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, groups)));
  std::vector<std::vector<float>> partials(static_cast<size_t>(nt));  // per thread: a group's part
  set_blas_threads(1);
  std::string error;
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const int t = omp_get_thread_num();
    // Dynamic: a group goes to the first free thread (see for_pieces); the ordered additions keep
    // the sum's order fixed whatever thread computed each group.
#pragma omp for ordered schedule(dynamic, 1)
    for (int64_t s = 0; s < groups; ++s) {
      float* acc = dst;
      int64_t lda = ldd;
      bool ok = true;
      try {
        if (s > 0) {
          partials[t].resize(static_cast<size_t>(m * n));
          acc = partials[t].data();
          lda = n;
        }
        product(t, s, acc, lda);
      } catch (const std::exception& e) {
        ok = false;
#pragma omp critical
        if (error.empty()) error = e.what();
      }
#pragma omp ordered
      if (s > 0 && ok)
        for (int64_t r = 0; r < m; ++r) {
          float* d = dst + r * ldd;
          const float* a = acc + r * lda;
          for (int64_t j = 0; j < n; ++j) d[j] += a[j];
        }
    }
  }
  if (!error.empty()) throw Error(error);
}

}  // namespace divkit::gemm
