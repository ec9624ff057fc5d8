// divkit._C binding of divkit::label_rows (include/divkit/fused_linear.h): the label heads' row
// step on one chunk of logits, for the PyTorch chunk loop of divkit.backends.torch_ops (CUDA
// tensors on a CUDA build; CPU tensors run the CPU row kernels).
#include <cstdint>
#include <optional>
#include <string>

#include "bindings.h"
#include "divkit/fused_linear.h"

namespace divkit_py {
namespace {

using OptOut = std::optional<AnyOutArray>;
using OptIn = std::optional<AnyInArray>;

void label_rows(const AnyOutArray& logits, const AnyInArray& labels, const OptOut& lse,
                const OptOut& z_label, const OptOut& mean_z, const OptOut& entropy,
                const OptOut& topk_mass, const OptOut& log_sum_sq, const OptOut& is_top1,
                const OptOut& unmasked, const OptIn& coef_a0, const OptIn& coef_a1,
                const OptIn& coef_b, const OptIn& coef_c, const OptIn& coef_e, int64_t ignore_index,
                double temperature, double softcap, int64_t topk, bool smooth_unmasked,
                int64_t first_token, uint64_t stream, bool check_finite, const std::string& fn) {
  const char* f = fn.c_str();
  divkit::LabelRowsArgs a;
  a.logits = to_view(f, "logits", logits);
  a.labels = to_view(f, "labels", labels);
  a.lse = optional_view(f, "lse", lse);
  a.z_label = optional_view(f, "z_label", z_label);
  a.mean_z = optional_view(f, "mean_z", mean_z);
  a.entropy = optional_view(f, "entropy", entropy);
  a.topk_mass = optional_view(f, "topk_mass", topk_mass);
  a.log_sum_sq = optional_view(f, "log_sum_sq", log_sum_sq);
  a.is_top1 = optional_view(f, "is_top1", is_top1);
  a.unmasked = optional_view(f, "unmasked", unmasked);
  a.coef_a0 = optional_view(f, "coef_a0", coef_a0);
  a.coef_a1 = optional_view(f, "coef_a1", coef_a1);
  a.coef_b = optional_view(f, "coef_b", coef_b);
  a.coef_c = optional_view(f, "coef_c", coef_c);
  a.coef_e = optional_view(f, "coef_e", coef_e);
  a.ignore_index = ignore_index;
  a.temperature = static_cast<float>(temperature);
  a.softcap = static_cast<float>(softcap);
  a.topk = topk;
  a.smooth_unmasked = smooth_unmasked;
  a.first_token = first_token;
  a.stream = static_cast<std::uintptr_t>(stream);
  a.check_finite = check_finite;
  nb::gil_scoped_release release;
  divkit::label_rows(f, a);
}

}  // namespace

void register_label_rows(nb::module_& m) {
  m.def("label_rows", &label_rows, nb::arg("logits"), nb::arg("labels"),
        nb::arg("lse").none() = nb::none(), nb::arg("z_label").none() = nb::none(),
        nb::arg("mean_z").none() = nb::none(), nb::arg("entropy").none() = nb::none(),
        nb::arg("topk_mass").none() = nb::none(), nb::arg("log_sum_sq").none() = nb::none(),
        nb::arg("is_top1").none() = nb::none(), nb::arg("unmasked").none() = nb::none(),
        nb::arg("coef_a0").none() = nb::none(), nb::arg("coef_a1").none() = nb::none(),
        nb::arg("coef_b").none() = nb::none(), nb::arg("coef_c").none() = nb::none(),
        nb::arg("coef_e").none() = nb::none(), nb::arg("ignore_index") = -100,
        nb::arg("temperature") = 1.0, nb::arg("softcap") = 0.0, nb::arg("topk") = 0,
        nb::arg("smooth_unmasked") = false, nb::arg("first_token") = 0, nb::arg("stream") = 0,
        nb::arg("check_finite") = true, nb::arg("fn") = "label_rows",
        "The label heads' row step on one chunk of logits [rows, V] (see "
        "include/divkit/fused_linear.h, label_rows): per-row statistics (fp64 [rows] outputs, "
        "each optional) and, with coef_a0 / coef_b / coef_c (coef_a1, coef_e optional), the "
        "gradient written over the logits. unmasked: the number V' of entries > -inf per row; "
        "smooth_unmasked: mean_z over the unmasked entries and the c term only at them, c V / V' "
        "each (label smoothing over the unmasked entries). CUDA tensors run the CUDA kernel on "
        "`stream`.");
}

}  // namespace divkit_py
