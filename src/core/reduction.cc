#include "core/reduction.h"

#include <cmath>
#include <string>

#include "core/check.h"
#include "core/element.h"

namespace divkit::reduce {

std::vector<uint8_t> active_rows(const char* fn, const TensorView& labels, int64_t ignore_index,
                                 int64_t n) {
  std::vector<uint8_t> active(static_cast<size_t>(n), 1);
  if (!labels.defined()) return active;
  check::vector_of(fn, "labels", labels, n, {DType::i64, DType::i32});
  for (int64_t i = 0; i < n; ++i) active[i] = elem::index(labels, i) != ignore_index;
  return active;
}

std::vector<double> token_weights(const char* fn, const TensorView& weights, int64_t n) {
  std::vector<double> w(static_cast<size_t>(n), 1.0);
  if (!weights.defined()) return w;
  check::vector_of(fn, "weights", weights, n, {DType::f32, DType::f64});
  for (int64_t i = 0; i < n; ++i) {
    w[i] = elem::get(weights, i);
    if (!std::isfinite(w[i]))
      check::fail(fn, "weights must be finite, got " + check::fmt(w[i]) + " at index " +
                          std::to_string(i));
  }
  return w;
}

double divisor(const char* fn, Reduction red, double num_items, int64_t count, int64_t n) {
  if (red != Reduction::none && red != Reduction::sum && red != Reduction::mean &&
      red != Reduction::batchmean)
    check::fail(fn, "reduction code " + std::to_string(static_cast<int>(red)) + " is unknown");
  if (std::isnan(num_items) || num_items < 0.0 || std::isinf(num_items))
    check::fail(fn, "num_items_in_batch must be finite and > 0, got " + check::fmt(num_items));
  if (num_items > 0.0) {
    if (red == Reduction::none)
      check::fail(fn,
                  "num_items_in_batch divides a reduced loss; it cannot be used with "
                  "reduction 'none'");
    return num_items;
  }
  if (red == Reduction::mean) return count > 0 ? double(count) : 1.0;
  if (red == Reduction::batchmean) return n > 0 ? double(n) : 1.0;
  return 1.0;
}

void check_loss_output(const char* fn, const TensorView& loss, Reduction red, int64_t n) {
  if (!loss.defined()) check::fail(fn, "loss output is required");
  if (loss.dtype != DType::f32 && loss.dtype != DType::f64)
    check::fail(fn, std::string("loss must be float32 or float64, got ") + dtype_name(loss.dtype));
  if (red == Reduction::none) check::vector_of(fn, "loss", loss, n, {DType::f32, DType::f64});
  else if (loss.numel() != 1 || loss.data == nullptr)
    check::fail(fn, "loss must hold one element for reduction '" +
                        std::string(reduction_name(red)) + "', got shape " +
                        check::shape_string(loss));
}

Plan plan(const char* fn, int64_t n, const DivergenceOptions& options, const TensorView& loss) {
  Plan p;
  p.reduction = options.reduction;
  p.active = active_rows(fn, options.labels, options.ignore_index, n);
  p.weight = token_weights(fn, options.weights, n);
  for (uint8_t a : p.active) p.count += a;
  p.divisor = divisor(fn, options.reduction, options.num_items_in_batch, p.count, n);
  check_loss_output(fn, loss, options.reduction, n);
  p.grad_scale.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) p.grad_scale[i] = p.weight[i] / p.divisor;
  return p;
}

void store_loss(const Plan& p, const double* row_loss, double scale, const TensorView& loss) {
  // A one-element loss may be a 0-d view: its index 0 needs no stride.
  auto store = [&](int64_t i, double x) {
    elem::store(loss.data, loss.dtype, i * (loss.ndim ? loss.strides[0] : 0), x);
  };
  const int64_t n = static_cast<int64_t>(p.active.size());
  if (p.reduction == Reduction::none) {
    for (int64_t i = 0; i < n; ++i)
      store(i, p.active[i] && p.weight[i] != 0.0 ? row_loss[i] * p.weight[i] * scale : 0.0);
    return;
  }
  double total = 0.0;  // fixed order: identical for any thread count
  for (int64_t i = 0; i < n; ++i)
    if (p.active[i] && p.weight[i] != 0.0) total += row_loss[i] * p.weight[i];
  store(0, total * scale / p.divisor);
}

}  // namespace divkit::reduce
