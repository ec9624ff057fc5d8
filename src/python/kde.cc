// divkit._C bindings of the Gaussian KDE and its KL-optimal bandwidth (include/divkit/kde.h).
// Registered from register_ot (the KDE is part of divkit.ot's sample-based tools).
#include <optional>
#include <tuple>
#include <vector>

#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include "bindings.h"
#include "divkit/kde.h"

namespace divkit_py {
namespace {

void kde_log_density(const InArray& x, const std::optional<InArray>& w, const InArray& y,
                     double bandwidth, const OutArray& out) {
  constexpr const char* fn = "kde_log_density";
  const divkit::TensorView xv = to_view(fn, "x", x), wv = optional_view(fn, "w", w),
                           yv = to_view(fn, "y", y), ov = to_view(fn, "out", out);
  nb::gil_scoped_release release;
  divkit::kde_log_density(xv, wv, yv, bandwidth, ov);
}

double kde_log_likelihood(const InArray& x, const std::optional<InArray>& w,
                          const std::optional<InArray>& y, double bandwidth) {
  constexpr const char* fn = "kde_log_likelihood";
  const divkit::TensorView xv = to_view(fn, "x", x), wv = optional_view(fn, "w", w),
                           yv = optional_view(fn, "y", y);
  nb::gil_scoped_release release;
  return divkit::kde_log_likelihood(xv, wv, yv, bandwidth);
}

std::tuple<double, double, int64_t, std::vector<double>, std::vector<double>> kde_select_bandwidth(
    const InArray& x, const std::optional<InArray>& w, const std::optional<InArray>& y,
    double h_min, double h_max, int32_t grid, double tol, int32_t max_iter) {
  constexpr const char* fn = "kde_select_bandwidth";
  const divkit::TensorView xv = to_view(fn, "x", x), wv = optional_view(fn, "w", w),
                           yv = optional_view(fn, "y", y);
  divkit::KdeBandwidthOptions opt;
  opt.h_min = h_min;
  opt.h_max = h_max;
  opt.grid = grid;
  opt.tol = tol;
  opt.max_iter = max_iter;
  divkit::KdeBandwidthResult r;
  {
    nb::gil_scoped_release release;
    r = divkit::kde_select_bandwidth(xv, wv, yv, opt);
  }
  return {r.bandwidth, r.log_likelihood, r.n_evals, r.grid_bandwidths, r.grid_log_likelihoods};
}

}  // namespace

void register_kde(nb::module_& m) {
  m.def("kde_log_density", &kde_log_density, nb::arg("x"), nb::arg("w").none(), nb::arg("y"),
        nb::arg("bandwidth"), nb::arg("out"),
        "Gaussian KDE log-density of y under the estimator of x (include/divkit/kde.h); writes "
        "out [m] float64.");
  m.def("kde_log_likelihood", &kde_log_likelihood, nb::arg("x"), nb::arg("w").none(),
        nb::arg("y").none(), nb::arg("bandwidth"),
        "Mean held-out (y given) or leave-one-out (y None) log-likelihood of a Gaussian KDE.");
  m.def("kde_select_bandwidth", &kde_select_bandwidth, nb::arg("x"), nb::arg("w").none(),
        nb::arg("y").none(), nb::arg("h_min"), nb::arg("h_max"), nb::arg("grid"), nb::arg("tol"),
        nb::arg("max_iter"),
        "KL-optimal KDE bandwidth (grid + golden-section over log h); returns (bandwidth, "
        "log_likelihood, n_evals, grid_bandwidths, grid_log_likelihoods).");
}

}  // namespace divkit_py
