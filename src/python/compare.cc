// divkit._C binding of compare_rows (include/divkit/compare.h), the per-token statistics of
// `divkit compare`. numpy arrays come in directly (memory-mapped files included): no torch.
#include <cmath>
#include <limits>
#include <optional>
#include <string>

#include "bindings.h"
#include "divkit/compare.h"

namespace divkit_py {
namespace {

constexpr const char* kFn = "compare_rows";

bool is_u16(const InArray& a) {
  const auto dt = a.dtype();
  return dt.code == static_cast<uint8_t>(nb::dlpack::dtype_code::UInt) && dt.bits == 16 &&
         dt.lanes == 1;
}

// One side: `format` "float" (the array's own dtype), "bfloat16" (uint16 bits of bfloat16
// values, as numpy holds them) or "llama.cpp" (the uint16 rows of a --kl-divergence-base file,
// [N, nv], with `vocab` tokens per row).
divkit::CompareInput side(const char* name, const InArray& a, const std::string& format,
                          int64_t vocab) {
  divkit::CompareInput in;
  if (format == "float") {
    in.logits = to_view(kFn, name, a);
    return in;
  }
  if (format != "bfloat16" && format != "llama.cpp")
    fail(std::string(kFn) + ": " + name + "_format must be 'float', 'bfloat16' or 'llama.cpp', " +
         "got '" + format + "'");
  if (!is_u16(a))
    fail(std::string(kFn) + ": " + name + " must be a uint16 array with " + name + "_format '" +
         format + "'");
  if (a.ndim() != 2)
    fail(std::string(kFn) + ": " + name + " must be 2-D, got " + std::to_string(a.ndim()) +
         " dimensions");
  const int64_t* strides = a.stride_ptr();
  const int64_t cols = static_cast<int64_t>(a.shape(1));
  if (cols > 1 && strides && strides[1] != 1)
    fail(std::string(kFn) + ": " + name + " must have unit stride along its last dimension");
  const int64_t row_stride = strides ? strides[0] : cols;
  if (format == "bfloat16") {
    in.logits = divkit::TensorView::matrix(const_cast<void*>(a.data()), divkit::DType::bf16,
                                           static_cast<int64_t>(a.shape(0)), cols, row_stride);
    return in;
  }
  const int64_t nv = 2 * ((vocab + 1) / 2) + 4;
  if (vocab < 1 || cols != nv)
    fail(std::string(kFn) + ": " + name + " has rows of " + std::to_string(cols) +
         " uint16, expected " + std::to_string(nv) + " for a llama.cpp file of vocab " +
         std::to_string(vocab));
  in.llamacpp.data = static_cast<const uint16_t*>(a.data());
  in.llamacpp.rows = static_cast<int64_t>(a.shape(0));
  in.llamacpp.vocab = vocab;
  in.llamacpp.row_stride = a.shape(0) > 1 ? row_stride : nv;
  return in;
}

void compare_rows(const InArray& base, const InArray& test, const std::optional<InArray>& tokens,
                  const OutArray& kl, const OutArray& js, const OutArray& tvd,
                  const OutArray& delta_p, const OutArray& top1, const std::optional<OutArray>& nll,
                  const std::optional<OutArray>& nll_base,
                  const std::optional<OutArray>& delta_p_next, const std::string& base_format,
                  const std::string& test_format, int64_t vocab, double base_floor,
                  int num_threads) {
  divkit::CompareInput b = side("base", base, base_format, vocab);
  divkit::CompareInput t = side("test", test, test_format, vocab);
  const divkit::TensorView tv = optional_view(kFn, "tokens", tokens);
  divkit::CompareOutputs out;
  out.kl = to_view(kFn, "kl", kl);
  out.js = to_view(kFn, "js", js);
  out.tvd = to_view(kFn, "tvd", tvd);
  out.delta_p = to_view(kFn, "delta_p", delta_p);
  out.top1 = to_view(kFn, "top1", top1);
  out.nll = optional_view(kFn, "nll", nll);
  out.nll_base = optional_view(kFn, "nll_base", nll_base);
  out.delta_p_next = optional_view(kFn, "delta_p_next", delta_p_next);
  divkit::CompareOptions opt;
  opt.base_floor = base_floor;
  opt.num_threads = num_threads;
  nb::gil_scoped_release release;
  divkit::compare_rows(b, t, tv, opt, out);
}

}  // namespace

void register_compare(nb::module_& m) {
  m.def("compare_rows", &compare_rows, nb::arg("base"), nb::arg("test"), nb::arg("tokens").none(),
        nb::arg("kl"), nb::arg("js"), nb::arg("tvd"), nb::arg("delta_p"), nb::arg("top1"),
        nb::arg("nll").none() = nb::none(), nb::arg("nll_base").none() = nb::none(),
        nb::arg("delta_p_next").none() = nb::none(), nb::arg("base_format") = "float",
        nb::arg("test_format") = "float", nb::arg("vocab") = 0,
        nb::arg("base_floor") = -std::numeric_limits<double>::infinity(),
        nb::arg("num_threads") = 0,
        "divkit compare's per-row statistics (include/divkit/compare.h): writes kl, js, tvd, "
        "delta_p, top1 (and with tokens nll, nll_base, delta_p_next), float64 [N] each. "
        "base_format / test_format: 'float', 'bfloat16' (uint16 bits) or 'llama.cpp' (uint16 "
        "rows of a --kl-divergence-base file with `vocab` tokens).");
}

}  // namespace divkit_py
