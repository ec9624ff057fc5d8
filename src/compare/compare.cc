// compare_rows (include/divkit/compare.h): argument checks, then the SIMD row kernel
// (compare_kernels.cc).
#include <cmath>
#include <string>

#include "compare/compare_job.h"
#include "core/check.h"
#include "core/element.h"
#include "divkit/compare.h"
#include "divkit/runtime.h"

namespace divkit {
namespace {

constexpr const char* kFn = "compare_rows";

detail::CompareSide side(const CompareInput& in, const char* name, int64_t& n, int64_t& v) {
  detail::CompareSide s;
  if (in.llamacpp.data != nullptr) {
    const LlamaCppRows& r = in.llamacpp;
    const int64_t nv = 2 * ((r.vocab + 1) / 2) + 4;
    if (r.rows < 0) check::fail(kFn, std::string(name) + " (llama.cpp rows) has rows < 0");
    if (r.vocab < 1) check::fail(kFn, std::string(name) + " (llama.cpp rows) has vocab < 1");
    const int64_t stride = r.row_stride == 0 ? nv : r.row_stride;
    int64_t span = 0;
    if (__builtin_mul_overflow(r.rows, stride, &span) || span > (int64_t{1} << 55))
      check::fail(kFn, std::string(name) + " (llama.cpp rows) spans rows x row_stride = " +
                           std::to_string(r.rows) + " x " + std::to_string(stride) +
                           " uint16 values: more than any address space");
    if (stride < nv)
      check::fail(kFn, std::string(name) + " (llama.cpp rows) has row_stride " +
                           std::to_string(stride) + " < " + std::to_string(nv) +
                           " (the row length for vocab " + std::to_string(r.vocab) + ")");
    s.q = r.data;
    s.q_stride = stride;
    n = r.rows;
    v = r.vocab;
    return s;
  }
  if (!in.logits.defined()) check::fail(kFn, std::string(name) + " is required");
  check::float_matrix(kFn, name, in.logits, false);
  s.view = in.logits;
  n = in.logits.shape[0];
  v = in.logits.shape[1];
  return s;
}

void output(const char* name, const TensorView& t, int64_t n, bool wanted) {
  if (!wanted) {
    if (t.defined())
      check::fail(kFn, std::string(name) + " is given without tokens (it needs token ids)");
    return;
  }
  if (!t.defined()) check::fail(kFn, std::string(name) + " is required");
  check::vector_of(kFn, name, t, n, {DType::f64});
}

}  // namespace

void compare_rows(const CompareInput& base, const CompareInput& test, const TensorView& tokens,
                  const CompareOptions& options, const CompareOutputs& out) {
  check::views(kFn, {{"base", base.logits},
                     {"test", test.logits},
                     {"tokens", tokens},
                     {"kl", out.kl},
                     {"js", out.js},
                     {"tvd", out.tvd},
                     {"delta_p", out.delta_p},
                     {"top1", out.top1},
                     {"nll", out.nll},
                     {"nll_base", out.nll_base},
                     {"delta_p_next", out.delta_p_next}});
  detail::CompareJob job;
  int64_t nb = 0, vb = 0, nt = 0, vt = 0;
  job.base = side(base, "base", nb, vb);
  job.test = side(test, "test", nt, vt);
  if (nb != nt || vb != vt)
    check::fail(kFn, "test has shape [" + std::to_string(nt) + ", " + std::to_string(vt) +
                         "], expected [" + std::to_string(nb) + ", " + std::to_string(vb) +
                         "] (the shape of base)");
  if (vb < 1) check::fail(kFn, "base has V = 0 (an empty vocabulary)");
  if (std::isnan(options.base_floor)) check::fail(kFn, "base_floor is NaN");
  if (options.num_threads < 0 || options.num_threads > max_num_threads())
    check::fail(kFn, "num_threads must be in [0, " + std::to_string(max_num_threads()) +
                         "] (0: get_num_threads()), got " + std::to_string(options.num_threads));
  job.base.logprobs = job.base.q != nullptr;
  job.base.floor = options.base_floor;
  job.n = nb;
  job.v = vb;
  const bool with_tokens = tokens.defined();
  if (with_tokens) {
    check::vector_of(kFn, "tokens", tokens, nb, {DType::i32, DType::i64});
    for (int64_t i = 0; i < nb; ++i) {
      const int64_t t = elem::index(tokens, i);
      if (t < 0 || t >= vb)
        check::fail(kFn, "tokens[" + std::to_string(i) + "] = " + std::to_string(t) +
                             " is out of range [0, " + std::to_string(vb) + ") (the vocabulary)");
    }
  }
  job.tokens = tokens;
  output("kl", out.kl, nb, true);
  output("js", out.js, nb, true);
  output("tvd", out.tvd, nb, true);
  output("delta_p", out.delta_p, nb, true);
  output("top1", out.top1, nb, true);
  output("nll", out.nll, nb, with_tokens);
  output("nll_base", out.nll_base, nb, with_tokens);
  output("delta_p_next", out.delta_p_next, nb, with_tokens);
  job.out = out;
  // A process forked after a parallel region cannot start libgomp's pool again (runtime.h).
  job.num_threads = forked_single_threaded()  ? 1
                    : options.num_threads > 0 ? options.num_threads
                                              : get_num_threads();
  if (nb == 0) return;

  detail::run_compare_rows(job);

  for (int s = 0; s < 2; ++s) {
    if (job.bad_row[s] < 0) continue;
    const std::string name = s == 0 ? "base" : "test";
    check::fail(kFn,
                name + " row " + std::to_string(job.bad_row[s]) +
                    (job.bad_is_empty[s] ? " holds no finite value (every entry is -inf)"
                                         : " holds NaN or +inf (logits must be finite or -inf)"));
  }
}

}  // namespace divkit
