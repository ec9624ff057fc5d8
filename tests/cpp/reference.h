// A deliberately simple fp64 reference of the token-level divergences in divkit/divergence.h.
//
// It is written from the formulas in the public header, not from the kernel: log-softmax in
// double, one closed-form term per vocabulary entry, the 0 log 0 = 0 conventions decided from
// the log-probabilities (an entry is masked when its log-probability is -inf), and the limits
// (jsd beta = 0 / 1, alpha_divergence alpha = 1 / 0, renyi alpha = 1, skew alpha = 0) taken as
// the exact divergences they tend to. Gradients use the chain rule through the softmax in
// double; tests/cpp/test_gradcheck.cc checks them against central finite differences.
#pragma once

#include <cstdint>
#include <vector>

#include "divkit/divergence.h"

namespace divkit_ref {

struct Params {
  divkit::DivergenceKind kind = divkit::DivergenceKind::forward_kl;
  double beta = 0.5;
  double alpha = 0.1;
  double temperature = 1.0;
  bool scale_by_t_squared = false;
};

// The parameters exactly as the kernel sees them (the float values, widened).
Params params_from_spec(const divkit::DivergenceSpec& spec);

// One row (token): D(p, q) with p = softmax(t / T), q = softmax(s / T), no reduction, no
// weights, no T^2 factor.
struct RowResult {
  double value = 0.0;          // may be +inf
  std::vector<double> grad_s;  // dD/ds_j (zeros when value is +inf)
  std::vector<double> grad_t;  // dD/dt_j (zeros when value is +inf)
  // Error scales used by the tests' tolerances: how much the value (resp. each gradient entry)
  // moves when every log-probability lp_j, lq_j moves by (1 + |lp_j| + |lq_j|) (plus |logits| / T
  // when T != 1), times the conditioning of the kind's formula. An fp32 kernel, whose
  // log-probabilities are right to a few ulps of their size, is expected within ~1e-6 * scale.
  double value_scale = 0.0;
  std::vector<double> scale_s;
  std::vector<double> scale_t;
};

RowResult row(const double* s, const double* t, int64_t v, const Params& params,
              bool want_grads = true);
double row_value(const double* s, const double* t, int64_t v, const Params& params);

// The whole call: labels / ignore_index, weights, reduction, num_items_in_batch, T^2 factor.
struct Options {
  std::vector<int64_t> labels;  // empty: no labels
  int64_t ignore_index = -100;
  std::vector<double> weights;  // empty: no weights
  divkit::Reduction reduction = divkit::Reduction::mean;
  double num_items_in_batch = 0.0;
};

struct Result {
  std::vector<double> loss;        // N values for reduction none, else 1
  std::vector<double> loss_scale;  // same shape, error scale (see RowResult)
  std::vector<double> grad_s;      // N * V, row-major contiguous
  std::vector<double> grad_t;
  std::vector<double> scale_s;
  std::vector<double> scale_t;
};

// s, t: N * V contiguous values (rows of ignored tokens are not read).
Result divergence(const std::vector<double>& s, const std::vector<double>& t, int64_t n, int64_t v,
                  const Params& params, const Options& options, bool want_grads = true);

// The reduced (or summed, for reduction none) loss only; used by finite differences.
double total_loss(const std::vector<double>& s, const std::vector<double>& t, int64_t n, int64_t v,
                  const Params& params, const Options& options);

}  // namespace divkit_ref
