// The per-entry and per-row math of the label-loss row kernels (label_kernels.h) in scalar form,
// __host__ __device__: the CUDA label-row kernel (label_cuda.cu) computes every entry and every
// row statistic through these functions, the CPU kernel (label_kernels.cc) finishes its rows with
// the same row functions, and the host tests LabelScalar.* (tests/cpp/test_cuda.cc) run them on
// the CPU, in the GPU kernel's order of steps, against label_rows_forward / label_rows_grad, so
// the CPU tests cover what the GPU computes.
//
// Per row, with z_j = softcap(x_j) / T (softcap(x) = c tanh(x / c), or x when c = 0), m = max z,
// e_j = exp(z_j - m) (fp32), S = sum e_j (fp64):
//   lse = m + log S,  H = log S - sum e_j (z_j - m) / S,  log sum p^2 = log sum e_j^2 - 2 log S,
// and the gradient over the raw logits x (label_kernels.h's LabelGradJob):
//   dL/dz_j = a p_j + b 1[j = y] + c + e p_j (z_j - lse + H),  p_j = exp(z_j - lse) (fp32),
//   dL/dx_j = dL/dz_j (1 - (T z_j / c)^2) / T  (1 / T without softcap).
// A masked entry (x = -inf) stays masked under softcap: softcap(-inf) = -inf, not -c (its
// probability is 0 as without softcap), and its chain-rule factor is 0 (the limit of
// 1 - tanh^2), not 1 - inf^2.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "core/hd.h"

namespace divkit::label_scalar {

// The transform of a raw logit: z = softcap(x) / T, in fp32, as the SIMD kernel computes it
// (x times 1 / c inside the tanh). inv_cap = 1 / c (0 without softcap).
struct Transform {
  float inv_t = 1.0f, softcap = 0.0f, inv_cap = 0.0f;
};
DIVKIT_HD inline Transform make_transform(float inv_t, float softcap) {
  Transform t;
  t.inv_t = inv_t;
  t.softcap = softcap;
  t.inv_cap = softcap > 0.0f ? 1.0f / softcap : 0.0f;
  return t;
}
DIVKIT_HD inline float transform(const Transform& t, float x) {
  if (t.softcap > 0.0f && x != -kInfinityF) x = t.softcap * ::tanhf(x * t.inv_cap);
  return x * t.inv_t;
}

// A raw logit that makes its row invalid (NaN or +inf; -inf is a masked entry).
DIVKIT_HD inline bool bad_logit(float x) { return !(x < kInfinityF); }

// The softmax numerator of an entry under the row's max, in fp32.
DIVKIT_HD inline float softmax_exp(float z, float m) { return ::expf(z - m); }
// e (z - m) with 0 where e = 0 (0 log 0 = 0: z - m is -inf at a masked entry).
DIVKIT_HD inline float entropy_term(float e, float z, float m) {
  return e == 0.0f ? 0.0f : e * (z - m);
}

// The row statistics from the row's sums (fp64): S = sum e, sum e (z - m), sum e^2.
DIVKIT_HD inline double row_lse(float m, double s) { return static_cast<double>(m) + ::log(s); }
DIVKIT_HD inline double row_entropy(double s, double sum_ec) { return ::log(s) - sum_ec / s; }
// log sum p^2 = log sum e^2 - 2 log S (the max's term is 1, so the sum is >= 1).
DIVKIT_HD inline double row_log_sum_sq(double s, double sum_sq) {
  return ::log(sum_sq) - 2.0 * ::log(s);
}
DIVKIT_HD inline double row_mean(double sum_z, int64_t v) { return sum_z / static_cast<double>(v); }

// Label smoothing over the unmasked entries (LabelRowsArgs::smooth_unmasked). An entry is
// unmasked when z > -inf (a -inf logit is not in the vocabulary).
DIVKIT_HD inline bool is_unmasked(float z) { return z != -kInfinityF; }
// The mean of z from the sum over the unmasked entries and their number V': over them
// (over_unmasked), or over every entry (-inf when one is masked, as the plain sum gives; the same
// bits as the plain sum when none is, since the sums then add the same terms in the same order).
DIVKIT_HD inline double row_mean_unmasked(double sum_unmasked, int64_t unmasked, int64_t v,
                                          bool over_unmasked) {
  if (over_unmasked) return row_mean(sum_unmasked, unmasked);
  return unmasked < v ? -static_cast<double>(kInfinityF) : row_mean(sum_unmasked, v);
}
// The c of each unmasked entry: the caller's c (that of a row without masked entries, -s eps / V)
// times V / V', so that the row's c terms still add up to c V. V' = V: c times 1.0 exactly, the
// same bits.
DIVKIT_HD inline double smooth_c(double c, int64_t v, int64_t unmasked) {
  return c * (static_cast<double>(v) / static_cast<double>(unmasked));
}
// A term of the top-k mass (an entry among the k largest), and the mass (at most 1).
DIVKIT_HD inline double topk_term(float z, double lse) {
  return ::exp(static_cast<double>(z) - lse);
}
DIVKIT_HD inline double topk_finish(double mass) { return mass < 1.0 ? mass : 1.0; }

// Top-k: the k-th largest z from its order key (the inverse of sparse_scalar::order_key, whose
// radix select the GPU runs: -0 comes back as +0), and the mass from the sum of the terms above
// it and the number of entries equal to it that are among the k.
DIVKIT_HD inline float key_value(uint32_t key) {
  const uint32_t bits = (key & 0x80000000u) ? (key & 0x7fffffffu) : ~key;
  float x;
  memcpy(&x, &bits, sizeof(x));
  return x;
}
DIVKIT_HD inline double topk_mass(double above, int64_t ties, float z_kth, double lse) {
  return topk_finish(above + static_cast<double>(ties) * topk_term(z_kth, lse));
}

// A row's gradient coefficients of the cross-entropy form a = a0 + a1 lse (z-loss: a1 = 2 s zl),
// computed from the row's lse where the kernel knows it.
DIVKIT_HD inline double coef_a(double a0, double a1, double lse) { return a0 + a1 * lse; }

// The per-row constants of the gradient sweep, rounded to fp32 as label_kernels.cc's GradRow
// rounds them.
// c_unmasked: c goes to the unmasked entries only (0 at a masked entry, whose p is 0 too).
struct GradRow {
  float lse = 0.0f, a = 0.0f, c = 0.0f, e = 0.0f, h = 0.0f, inv_t = 1.0f, t_over_cap = 0.0f;
  bool cap = false, c_unmasked = false;
};
DIVKIT_HD inline GradRow make_grad_row(double lse, double a, double c, double e, double entropy,
                                       float inv_t, float softcap, bool c_unmasked = false) {
  GradRow g;
  g.c_unmasked = c_unmasked;
  g.lse = static_cast<float>(lse);
  g.a = static_cast<float>(a);
  g.c = static_cast<float>(c);
  g.e = static_cast<float>(e);
  g.h = g.e != 0.0f ? static_cast<float>(entropy) : 0.0f;
  g.inv_t = inv_t;
  g.cap = softcap > 0.0f;
  g.t_over_cap = g.cap ? (1.0f / inv_t) / softcap : 0.0f;
  return g;
}
// dz/dx without the 1 / T under softcap: 1 - (T z / c)^2 = 1 - tanh(x / c)^2, with
// t_over_cap = T / c; 0 at a masked entry (z = -inf), where tanh' is 0 but r * r is inf.
DIVKIT_HD inline float cap_factor_of(float z, float t_over_cap) {
  if (z == -kInfinityF) return 0.0f;
  const float r = z * t_over_cap;
  return 1.0f - r * r;
}
DIVKIT_HD inline float cap_factor(const GradRow& g, float z) {
  return cap_factor_of(z, g.t_over_cap);
}
// dL/dx_j of an entry from its transformed logit z (without the label's one-hot term).
DIVKIT_HD inline float grad_entry(const GradRow& g, float z) {
  const float lp = z - g.lse;
  const float p = ::expf(lp);
  float d = g.a * p + g.c;
  // p = 0 at a masked entry: 0 without c (as label_kernels.cc's scalar tail).
  if (g.c_unmasked && !is_unmasked(z)) d = 0.0f;
  if (g.e != 0.0f && p != 0.0f) d += g.e * p * (lp + g.h);
  if (g.cap) d *= cap_factor(g, z);
  return d * g.inv_t;
}
// The label's one-hot term b, added to its entry's grad_entry (chain-rule factor from the label's
// own logit).
DIVKIT_HD inline float label_term(const GradRow& g, double b, float z_label) {
  float d = static_cast<float>(b);
  if (g.cap) d *= cap_factor(g, z_label);
  return d * g.inv_t;
}

}  // namespace divkit::label_scalar
