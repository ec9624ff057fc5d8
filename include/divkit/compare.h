// divkit: the per-token statistics of `divkit compare` (python/divkit/tools/compare.py), the
// comparison of two models' logits over the same N token positions, as llama.cpp's
// `llama-perplexity --kl-divergence` reports it.
//
// For each row i, with p = softmax(base_i) (the reference model) and q = softmax(test_i):
//   kl[i]           = KL(p || q) = sum_j p_j (log p_j - log q_j)     (terms with p_j = 0 skipped)
//   js[i]           = 0.5 sum_j p_j (log p_j - log m_j) + 0.5 sum_j q_j (log q_j - log m_j),
//                     m = (p + q) / 2                                  (Jensen-Shannon, in nats)
//   tvd[i]          = 0.5 sum_j |p_j - q_j|
//   delta_p[i]      = q_k - p_k at the base model's top token k = argmax_j base_ij
//   top1[i]         = 1 if argmax_j base_ij == argmax_j test_ij else 0 (the first maximum)
// and with token ids t (the token row i predicts):
//   nll[i]          = -log q_t,   nll_base[i] = -log p_t,   delta_p_next[i] = q_t - p_t
//
// Inputs: base and test are [N, V] logits (any shift: each row is normalized) of dtype float32,
// bfloat16, float16 or float64 (they may differ), unit column stride, any row stride. -inf is a
// masked entry (probability 0); a row with NaN or +inf, or with every entry -inf, is an Error
// naming the argument and the row. A llama.cpp `--kl-divergence-base` file's rows (uint16
// quantized log-probs, LlamaCppRows) may stand for the base: those are log-probs, used without
// normalization, and entries at or below CompareOptions::base_floor count as probability 0.
// tokens: optional int32 / int64 [N] in [0, V). Outputs: float64 [N] views (any stride);
// nll, nll_base and delta_p_next are required with tokens and not allowed without.
//
// Arithmetic in float64 (log-sum-exp with the running max, sums in a fixed order per row); rows
// are independent and spread over get_num_threads() threads, so results do not depend on the
// thread count. Each row is read from the caller's memory twice.
#pragma once

#include <cstdint>
#include <limits>

#include "divkit/tensor.h"

namespace divkit {

struct CompareOptions {
  // Base entries whose log-prob is at or below this count as probability 0 (llama.cpp's KL
  // skips the base's terms at or below -16 nats). Used with LlamaCppRows only.
  double base_floor = -std::numeric_limits<double>::infinity();
  // Threads; 0 = get_num_threads().
  int num_threads = 0;
};

// Per-row results, float64 [N] each (top1 as 0.0 / 1.0).
struct CompareOutputs {
  TensorView kl, js, tvd, delta_p, top1;
  TensorView nll, nll_base, delta_p_next;  // with tokens only
};

// Rows of llama.cpp's `--kl-divergence-base` file (llama.cpp tools/perplexity): each row is
// nv = 2 * ((vocab + 1) / 2) + 4 uint16, a float32 scale and a float32 min_log_prob (the first
// 4 uint16, little-endian) and then vocab quantized values u; the log-prob is
// scale * u + min_log_prob, computed in float32 (multiply, then add) as llama.cpp decodes it.
struct LlamaCppRows {
  const uint16_t* data = nullptr;
  int64_t rows = 0;
  int64_t vocab = 0;
  int64_t row_stride = 0;  // uint16 elements between row starts; 0 means nv
};

// One side of the comparison: [N, V] logits, or (when llamacpp.data is set) a llama.cpp file's
// rows. As the base, a llama.cpp file's rows are log-probs used as they are (not normalized
// again) with the entries at or below options.base_floor counted as probability 0; as the
// test, they are normalized like logits.
struct CompareInput {
  TensorView logits;
  LlamaCppRows llamacpp;
};

// KL, JS, TVD, delta_p and top1 (with tokens also nll, nll_base, delta_p_next) of every row,
// as defined above, into `out`. Throws Error ("compare_rows: <argument> ...") on bad
// input: shapes that differ, an unsupported dtype, non-finite rows, token ids out of range,
// outputs of the wrong shape or dtype, base_floor NaN, num_threads outside [0, max_num_threads()].
void compare_rows(const CompareInput& base, const CompareInput& test, const TensorView& tokens,
                  const CompareOptions& options, const CompareOutputs& out);

// compare_rows with [N, V] logits on both sides.
inline void compare_rows(const TensorView& base, const TensorView& test, const TensorView& tokens,
                         const CompareOptions& options, const CompareOutputs& out) {
  compare_rows(CompareInput{base, {}}, CompareInput{test, {}}, tokens, options, out);
}

}  // namespace divkit
