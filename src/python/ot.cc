// divkit._C bindings of the OT family (include/divkit/ot.h): Sinkhorn, sparse OT, MMD, CS
// divergence.
#include <cmath>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <nanobind/stl/tuple.h>

#include "bindings.h"
#include "divkit/ot.h"

namespace divkit_py {

void register_kde(nb::module_& m);  // kde.cc

namespace {

using Stats = std::tuple<double, double, double, int64_t, double, bool>;

std::vector<Stats> sinkhorn(
    const std::optional<AnyInArray>& x, const std::optional<AnyInArray>& y,
    const std::optional<AnyInArray>& cost, const std::optional<AnyInArray>& a,
    const std::optional<AnyInArray>& b, const AnyOutArray& f, const AnyOutArray& g,
    const std::optional<AnyOutArray>& plan, const std::optional<AnyOutArray>& grad_x,
    const std::optional<AnyOutArray>& grad_y, const std::optional<AnyOutArray>& grad_a,
    const std::optional<AnyOutArray>& grad_b, const divkit::SinkhornOptions& opt,
    const std::optional<AnyOutArray>& stats) {
  constexpr const char* fn = "sinkhorn";
  divkit::SinkhornInputs in;
  in.x = optional_view(fn, "x", x);
  in.y = optional_view(fn, "y", y);
  in.cost = optional_view(fn, "cost", cost);
  in.a = optional_view(fn, "a", a);
  in.b = optional_view(fn, "b", b);
  divkit::SinkhornOutputs out;
  out.f = to_view(fn, "f", f);
  out.g = to_view(fn, "g", g);
  out.plan = optional_view(fn, "plan", plan);
  out.grad_x = optional_view(fn, "grad_x", grad_x);
  out.grad_y = optional_view(fn, "grad_y", grad_y);
  out.grad_a = optional_view(fn, "grad_a", grad_a);
  out.grad_b = optional_view(fn, "grad_b", grad_b);
  out.stats = optional_view(fn, "stats", stats);
  std::vector<divkit::SinkhornStats> st;
  {
    nb::gil_scoped_release release;
    st = divkit::sinkhorn(in, opt, out);
  }
  std::vector<Stats> res;
  for (const auto& s : st)
    res.emplace_back(s.transport_cost, s.reg_cost, s.mass, s.n_iter, s.marginal_error, s.converged);
  return res;
}

double sample_divergence(const std::string& which, const InArray& x, const InArray& y,
                         const std::optional<InArray>& a, const std::optional<InArray>& b,
                         const std::string& kernel, double sigma,
                         const std::optional<OutArray>& grad_x,
                         const std::optional<OutArray>& grad_y) {
  const char* fn = which == "cs" ? "cs_divergence" : "mmd";
  const divkit::TensorView xv = to_view(fn, "x", x), yv = to_view(fn, "y", y);
  const divkit::TensorView av = optional_view(fn, "a", a), bv = optional_view(fn, "b", b);
  const divkit::TensorView gx = optional_view(fn, "grad_x", grad_x),
                           gy = optional_view(fn, "grad_y", grad_y);
  divkit::SampleKernel k;
  if (kernel == "gaussian") k = divkit::SampleKernel::gaussian;
  else if (kernel == "energy") k = divkit::SampleKernel::energy;
  else fail(std::string(fn) + ": kernel must be 'gaussian' or 'energy', got '" + kernel + "'");
  if (which == "cs" && k != divkit::SampleKernel::gaussian)
    fail("cs_divergence: kernel must be 'gaussian', got '" + kernel + "'");
  nb::gil_scoped_release release;
  return which == "cs" ? divkit::cs_divergence(xv, yv, av, bv, sigma, gx, gy)
                       : divkit::mmd2(xv, yv, av, bv, k, sigma, gx, gy);
}

// A vector handed to numpy without a copy: the capsule owns it.
template <typename T>
nb::ndarray<nb::numpy, T, nb::ndim<1>> to_numpy(std::vector<T>&& v) {
  auto* heap = new std::vector<T>(std::move(v));
  nb::capsule owner(heap, [](void* p) noexcept { delete static_cast<std::vector<T>*>(p); });
  return nb::ndarray<nb::numpy, T, nb::ndim<1>>(heap->data(), {heap->size()}, owner);
}

auto sparse_ot(const InArray& a, const InArray& b, const InArray& cost, const OutArray& alpha,
               const std::optional<OutArray>& grad_b, double gamma, int64_t k, double tol,
               int64_t max_iter) {
  constexpr const char* fn = "sparse_ot";
  const divkit::TensorView av = to_view(fn, "a", a), bv = to_view(fn, "b", b),
                           cv = to_view(fn, "cost", cost), alv = to_view(fn, "alpha", alpha),
                           gbv = optional_view(fn, "grad_b", grad_b);
  divkit::SparseOtOptions opt;
  opt.gamma = gamma;
  opt.k = k;
  opt.tol = tol;
  opt.max_iter = max_iter;
  divkit::SparseOtResult r;
  {
    nb::gil_scoped_release release;
    r = divkit::sparse_ot(av, bv, cv, opt, alv, gbv);
  }
  return std::make_tuple(to_numpy(std::move(r.row)), to_numpy(std::move(r.col)),
                         to_numpy(std::move(r.value)), r.transport_cost, r.reg_cost, r.n_iter,
                         r.marginal_error, r.converged);
}

}  // namespace

void register_ot(nb::module_& m) {
  // The solver's options as one object (divkit::SinkhornOptions, include/divkit/ot.h).
  nb::class_<divkit::SinkhornOptions>(m, "SinkhornOptions", "Options of sinkhorn().")
      .def(
          "__init__",
          [](divkit::SinkhornOptions* self, double eps, int p, double tol, int64_t max_iter,
             int64_t check_every, double eps_scaling, double rho_a, double rho_b,
             int64_t cost_cache_bytes, bool symmetric, bool sync) {
            new (self) divkit::SinkhornOptions();
            self->eps = eps;
            self->p = p;
            self->tol = tol;
            self->max_iter = max_iter;
            self->check_every = check_every;
            self->eps_scaling = eps_scaling;
            self->rho_a = rho_a;
            self->rho_b = rho_b;
            self->cost_cache_bytes = cost_cache_bytes;
            self->symmetric = symmetric;
            self->sync = sync;
          },
          nb::kw_only(), nb::arg("eps"), nb::arg("p"), nb::arg("tol"), nb::arg("max_iter"),
          nb::arg("check_every"), nb::arg("eps_scaling"), nb::arg("rho_a"), nb::arg("rho_b"),
          nb::arg("cost_cache_bytes"), nb::arg("symmetric"), nb::arg("sync") = true)
      .def_rw("eps", &divkit::SinkhornOptions::eps)
      .def_rw("p", &divkit::SinkhornOptions::p)
      .def_rw("tol", &divkit::SinkhornOptions::tol)
      .def_rw("max_iter", &divkit::SinkhornOptions::max_iter)
      .def_rw("check_every", &divkit::SinkhornOptions::check_every)
      .def_rw("eps_scaling", &divkit::SinkhornOptions::eps_scaling)
      .def_rw("rho_a", &divkit::SinkhornOptions::rho_a)
      .def_rw("rho_b", &divkit::SinkhornOptions::rho_b)
      .def_rw("cost_cache_bytes", &divkit::SinkhornOptions::cost_cache_bytes)
      .def_rw("symmetric", &divkit::SinkhornOptions::symmetric)
      .def_rw("sync", &divkit::SinkhornOptions::sync,
              "CUDA tensors: false runs max_iter iterations with no host read (CUDA graph "
              "capture); the results go to the stats output.")
      .def_rw("stream", &divkit::SinkhornOptions::stream,
              "CUDA tensors: the cudaStream_t to run on, as an integer (0: the default stream).");
  m.def("sinkhorn", &sinkhorn, nb::arg("x").none(), nb::arg("y").none(), nb::arg("cost").none(),
        nb::arg("a").none(), nb::arg("b").none(), nb::arg("f"), nb::arg("g"),
        nb::arg("plan").none(), nb::arg("grad_x").none(), nb::arg("grad_y").none(),
        nb::arg("grad_a").none(), nb::arg("grad_b").none(), nb::arg("options"),
        nb::arg("stats").none() = nb::none(),
        "Batched log-domain Sinkhorn (include/divkit/ot.h) on CPU tensors, or CUDA tensors "
        "(one device, options.stream) in a CUDA build. Writes f, g and the optional outputs "
        "(stats: float64 [B, 6], the per-problem results on the device; required when "
        "options.sync is false); returns per problem (transport_cost, reg_cost, mass, n_iter, "
        "marginal_error, converged), an empty list for CUDA tensors with options.sync false.");
  m.def("sparse_ot", &sparse_ot, nb::arg("a"), nb::arg("b"), nb::arg("cost"), nb::arg("alpha"),
        nb::arg("grad_b").none(), nb::arg("gamma"), nb::arg("k"), nb::arg("tol"),
        nb::arg("max_iter"),
        "Quadratically regularized / sparsity-constrained OT by its semi-dual "
        "(include/divkit/ot.h). Writes alpha (and grad_b); returns (row, col, value, "
        "transport_cost, reg_cost, n_iter, marginal_error, converged), the plan in COO form.");
  m.def("sample_divergence", &sample_divergence, nb::arg("which"), nb::arg("x"), nb::arg("y"),
        nb::arg("a").none(), nb::arg("b").none(), nb::arg("kernel"), nb::arg("sigma"),
        nb::arg("grad_x").none(), nb::arg("grad_y").none(),
        "which = 'mmd' (squared MMD) or 'cs' (Cauchy-Schwarz divergence); writes the "
        "gradients where given.");
  register_kde(m);
}

}  // namespace divkit_py
