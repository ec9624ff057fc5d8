// divkit._C bindings of the distillation row kernels (include/divkit/distill.h).
#include <cstdint>
#include <optional>

#include "bindings.h"
#include "divkit/distill.h"

namespace divkit_py {
namespace {

using OptIn = std::optional<InArray>;
using OptOut = std::optional<OutArray>;

void row_entropy(const InArray& logits, double temperature, const OutArray& out) {
  constexpr const char* fn = "row_entropy";
  const auto x = to_view(fn, "logits", logits);
  const auto o = to_view(fn, "out", out);
  nb::gil_scoped_release release;
  divkit::row_entropy(x, temperature, o);
}

void nkd_rows(const InArray& student, const InArray& teacher, const InArray& labels,
              int64_t ignore_index, double tau, const OutArray& target_out,
              const OutArray& nontarget_out, const OptIn& target_coef, const OptIn& nontarget_coef,
              const OptOut& grad_student) {
  constexpr const char* fn = "nkd";
  const auto s = to_view(fn, "student_logits", student);
  const auto t = to_view(fn, "teacher_logits", teacher);
  const auto y = to_view(fn, "labels", labels);
  const auto to = to_view(fn, "target_out", target_out);
  const auto no = to_view(fn, "nontarget_out", nontarget_out);
  const auto tc = optional_view(fn, "target_coef", target_coef);
  const auto nc = optional_view(fn, "nontarget_coef", nontarget_coef);
  const auto g = optional_view(fn, "grad_student", grad_student);
  nb::gil_scoped_release release;
  divkit::nkd_rows(s, t, y, ignore_index, tau, to, no, tc, nc, g);
}

void ofa_rows(const InArray& student, const InArray& teacher, const InArray& labels,
              int64_t ignore_index, double eps, double temperature, const OutArray& out,
              const OptIn& coef, const OptOut& grad_student) {
  constexpr const char* fn = "ofa_loss";
  const auto s = to_view(fn, "student_logits", student);
  const auto t = to_view(fn, "teacher_logits", teacher);
  const auto y = to_view(fn, "labels", labels);
  const auto o = to_view(fn, "out", out);
  const auto c = optional_view(fn, "coef", coef);
  const auto g = optional_view(fn, "grad_student", grad_student);
  nb::gil_scoped_release release;
  divkit::ofa_rows(s, t, y, ignore_index, eps, temperature, o, c, g);
}

void clipped_kl_rows(const InArray& student, const InArray& teacher, const InArray& lower,
                     const InArray& upper, double temperature, double sharpness,
                     const OptIn& labels, int64_t ignore_index, const OutArray& out,
                     const OptIn& coef, const OptOut& grad_student, const OptOut& grad_lower,
                     const OptOut& grad_upper) {
  constexpr const char* fn = "dac_kl_loss";
  const auto s = to_view(fn, "student_logits", student);
  const auto t = to_view(fn, "teacher_logits", teacher);
  const auto lo = to_view(fn, "lower", lower);
  const auto hi = to_view(fn, "upper", upper);
  const auto y = optional_view(fn, "labels", labels);
  const auto o = to_view(fn, "out", out);
  const auto c = optional_view(fn, "coef", coef);
  const auto g = optional_view(fn, "grad_student", grad_student);
  const auto gl = optional_view(fn, "grad_lower", grad_lower);
  const auto gu = optional_view(fn, "grad_upper", grad_upper);
  nb::gil_scoped_release release;
  divkit::clipped_kl_rows(s, t, lo, hi, temperature, sharpness, y, ignore_index, o, c, g, gl, gu);
}

void mass_bounds(const InArray& teacher, double temperature, double mass_lo, double mass_hi,
                 const OutArray& lower, const OutArray& upper) {
  constexpr const char* fn = "mass_bounds";
  const auto t = to_view(fn, "teacher_logits", teacher);
  const auto lo = to_view(fn, "lower", lower);
  const auto hi = to_view(fn, "upper", upper);
  nb::gil_scoped_release release;
  divkit::mass_bounds(t, temperature, mass_lo, mass_hi, lo, hi);
}

void sorted_probs(const InArray& teacher, double temperature, const OutArray& out) {
  constexpr const char* fn = "sorted_probs";
  const auto t = to_view(fn, "teacher_logits", teacher);
  const auto o = to_view(fn, "out", out);
  nb::gil_scoped_release release;
  divkit::sorted_probs(t, temperature, o);
}

void tempered_kl_rows(const InArray& student, const InArray& teacher, const InArray& temperatures,
                      double noise_std, uint64_t seed, const OptIn& labels, int64_t ignore_index,
                      const OutArray& out, const OptIn& coef, const OptOut& grad_student) {
  constexpr const char* fn = "swing_loss";
  const auto s = to_view(fn, "student_logits", student);
  const auto t = to_view(fn, "teacher_logits", teacher);
  const auto temps = to_view(fn, "temperatures", temperatures);
  const auto y = optional_view(fn, "labels", labels);
  const auto o = to_view(fn, "out", out);
  const auto c = optional_view(fn, "coef", coef);
  const auto g = optional_view(fn, "grad_student", grad_student);
  nb::gil_scoped_release release;
  divkit::tempered_kl_rows(s, t, temps, noise_std, seed, y, ignore_index, o, c, g);
}

void swing_noise(uint64_t seed, const OutArray& out) {
  const auto o = to_view("swing_noise", "out", out);
  nb::gil_scoped_release release;
  divkit::swing_noise(seed, o);
}

void selective_contrast(const InArray& standard, const InArray& lame, double lame_weight,
                        double std_threshold, double filter_ratio, const OutArray& out,
                        const OutArray& uncertainty, const OptOut& applied) {
  constexpr const char* fn = "uscd";
  const auto s = to_view(fn, "standard_logits", standard);
  const auto l = to_view(fn, "lame_logits", lame);
  const auto o = to_view(fn, "out", out);
  const auto u = to_view(fn, "uncertainty", uncertainty);
  const auto a = optional_view(fn, "applied", applied);
  nb::gil_scoped_release release;
  divkit::selective_contrast(s, l, lame_weight, std_threshold, filter_ratio, o, u, a);
}

}  // namespace

void register_distill(nb::module_& m) {
  m.def("row_entropy", &row_entropy, nb::arg("logits"), nb::arg("temperature"), nb::arg("out"),
        "Per-row entropy of softmax(logits / T) (include/divkit/distill.h).");
  m.def("nkd_rows", &nkd_rows, nb::arg("student"), nb::arg("teacher"), nb::arg("labels"),
        nb::arg("ignore_index"), nb::arg("tau"), nb::arg("target_out"), nb::arg("nontarget_out"),
        nb::arg("target_coef").none(), nb::arg("nontarget_coef").none(),
        nb::arg("grad_student").none(), "NKD target and normalized non-target terms per row.");
  m.def("ofa_rows", &ofa_rows, nb::arg("student"), nb::arg("teacher"), nb::arg("labels"),
        nb::arg("ignore_index"), nb::arg("eps"), nb::arg("temperature"), nb::arg("out"),
        nb::arg("coef").none(), nb::arg("grad_student").none(),
        "OFA-KD adaptive target enhancement loss per row.");
  m.def("clipped_kl_rows", &clipped_kl_rows, nb::arg("student"), nb::arg("teacher"),
        nb::arg("lower"), nb::arg("upper"), nb::arg("temperature"), nb::arg("sharpness"),
        nb::arg("labels").none(), nb::arg("ignore_index"), nb::arg("out"), nb::arg("coef").none(),
        nb::arg("grad_student").none(), nb::arg("grad_lower").none(), nb::arg("grad_upper").none(),
        "DAC-KL-style clipped forward KL per row.");
  m.def("mass_bounds", &mass_bounds, nb::arg("teacher"), nb::arg("temperature"), nb::arg("mass_lo"),
        nb::arg("mass_hi"), nb::arg("lower"), nb::arg("upper"),
        "Probability bounds of the teacher's [mass_lo, mass_hi) cumulative-mass region.");
  m.def("sorted_probs", &sorted_probs, nb::arg("teacher"), nb::arg("temperature"), nb::arg("out"),
        "The k largest teacher probabilities per row, decreasing.");
  m.def("tempered_kl_rows", &tempered_kl_rows, nb::arg("student"), nb::arg("teacher"),
        nb::arg("temperatures"), nb::arg("noise_std"), nb::arg("seed"), nb::arg("labels").none(),
        nb::arg("ignore_index"), nb::arg("out"), nb::arg("coef").none(),
        nb::arg("grad_student").none(), "Swing distillation: per-row temperature KL with noise.");
  m.def("swing_noise", &swing_noise, nb::arg("seed"), nb::arg("out"),
        "The standard normal noise tempered_kl_rows uses with this seed.");
  m.def("selective_contrast", &selective_contrast, nb::arg("standard"), nb::arg("lame"),
        nb::arg("lame_weight"), nb::arg("std_threshold"), nb::arg("filter_ratio"), nb::arg("out"),
        nb::arg("uncertainty"), nb::arg("applied").none(),
        "USCD selective contrastive decoding step.");
}

}  // namespace divkit_py
