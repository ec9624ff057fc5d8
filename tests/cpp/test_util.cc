#include "test_util.h"

#include <cmath>
#include <sstream>

namespace divkit_test {

// ---------------------------------------------------------------------------------------------
// dtype conversions

uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);  // NaN
  const uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>((u + rounding) >> 16);
}

float bf16_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t double_to_f16(double d) {
  const uint16_t sign = std::signbit(d) ? 0x8000 : 0;
  if (std::isnan(d)) return 0x7e00;
  const double a = std::fabs(d);
  if (a >= 65520.0) return sign | 0x7c00;  // rounds to +-inf (65504 is the largest finite)
  if (a < std::ldexp(1.0, -14)) {
    // subnormal: multiples of 2^-24; 1024 * 2^-24 is the smallest normal, encoded 0x0400.
    const double m = std::nearbyint(a * std::ldexp(1.0, 24));
    return sign | static_cast<uint16_t>(m);
  }
  int e2;
  std::frexp(a, &e2);  // a = f 2^e2, f in [0.5, 1)
  int e = e2 - 1;      // a = (1 + m/1024) 2^e
  double m = std::nearbyint((std::ldexp(a, -e) - 1.0) * 1024.0);
  if (m >= 1024.0) {
    m = 0.0;
    ++e;
  }
  return sign | static_cast<uint16_t>(((e + 15) << 10) | static_cast<int>(m));
}

double f16_to_double(uint16_t h) {
  const double sign = (h & 0x8000) ? -1.0 : 1.0;
  const int e = (h >> 10) & 0x1f;
  const int m = h & 0x3ff;
  if (e == 0) return sign * std::ldexp(static_cast<double>(m), -24);
  if (e == 31) return m ? kNaN : sign * kInf;
  return sign * std::ldexp(static_cast<double>(1024 + m), e - 25);
}

bool is_float_dtype(DType dtype) {
  return dtype == DType::f32 || dtype == DType::bf16 || dtype == DType::f16 || dtype == DType::f64;
}

double round_to(DType dtype, double x) {
  switch (dtype) {
    case DType::f32: return static_cast<float>(x);
    case DType::bf16: return bf16_to_float(float_to_bf16(static_cast<float>(x)));
    case DType::f16: return f16_to_double(double_to_f16(x));
    case DType::f64: return x;
    case DType::i32:
    case DType::i64: return std::nearbyint(x);
  }
  return x;
}

static size_t esize_of(DType dt) {
  switch (dt) {
    case DType::f32:
    case DType::i32: return 4;
    case DType::bf16:
    case DType::f16: return 2;
    case DType::f64:
    case DType::i64: return 8;
  }
  return 4;
}

// ---------------------------------------------------------------------------------------------
// HostMatrix

HostMatrix::HostMatrix(int64_t rows, int64_t cols, DType dtype, int64_t stride)
    : rows_(rows), cols_(cols), stride_(stride < 0 ? cols : stride), dtype_(dtype),
      esize_(esize_of(dtype)) {
  const int64_t n_elems = rows_ == 0 ? 0 : (rows_ - 1) * stride_ + cols_;
  // Round up to 8 bytes and keep at least one element so that data() is never null.
  const size_t n_bytes =
      std::max<size_t>(8, (static_cast<size_t>(n_elems) * esize_ + 7) & ~size_t{7});
  bytes_.assign(n_bytes, 0xFF);
  for (int64_t i = 0; i < rows_; ++i) std::memset(at(i, 0), 0, static_cast<size_t>(cols_) * esize_);
}

uint8_t* HostMatrix::at(int64_t i, int64_t j) {
  return bytes_.data() + static_cast<size_t>(i * stride_ + j) * esize_;
}
const uint8_t* HostMatrix::at(int64_t i, int64_t j) const {
  return bytes_.data() + static_cast<size_t>(i * stride_ + j) * esize_;
}

double HostMatrix::get(int64_t i, int64_t j) const {
  const uint8_t* p = at(i, j);
  switch (dtype_) {
    case DType::f32: {
      float f;
      std::memcpy(&f, p, 4);
      return f;
    }
    case DType::bf16: {
      uint16_t h;
      std::memcpy(&h, p, 2);
      return bf16_to_float(h);
    }
    case DType::f16: {
      uint16_t h;
      std::memcpy(&h, p, 2);
      return f16_to_double(h);
    }
    case DType::f64: {
      double d;
      std::memcpy(&d, p, 8);
      return d;
    }
    case DType::i32: {
      int32_t k;
      std::memcpy(&k, p, 4);
      return k;
    }
    case DType::i64: {
      int64_t k;
      std::memcpy(&k, p, 8);
      return static_cast<double>(k);
    }
  }
  return kNaN;
}

void HostMatrix::set(int64_t i, int64_t j, double x) {
  uint8_t* p = at(i, j);
  switch (dtype_) {
    case DType::f32: {
      const float f = static_cast<float>(x);
      std::memcpy(p, &f, 4);
      return;
    }
    case DType::bf16: {
      const uint16_t h = float_to_bf16(static_cast<float>(x));
      std::memcpy(p, &h, 2);
      return;
    }
    case DType::f16: {
      const uint16_t h = double_to_f16(x);
      std::memcpy(p, &h, 2);
      return;
    }
    case DType::f64: std::memcpy(p, &x, 8); return;
    case DType::i32: {
      const int32_t k = static_cast<int32_t>(std::llround(x));
      std::memcpy(p, &k, 4);
      return;
    }
    case DType::i64: {
      const int64_t k = std::llround(x);
      std::memcpy(p, &k, 8);
      return;
    }
  }
}

void HostMatrix::fill(double x) {
  for (int64_t i = 0; i < rows_; ++i) fill_row(i, x);
}
void HostMatrix::fill_row(int64_t i, double x) {
  for (int64_t j = 0; j < cols_; ++j) set(i, j, x);
}

TensorView HostMatrix::view() {
  return TensorView::matrix(bytes_.data(), dtype_, rows_, cols_, stride_);
}

std::vector<double> HostMatrix::values() const {
  std::vector<double> out(static_cast<size_t>(rows_ * cols_));
  for (int64_t i = 0; i < rows_; ++i)
    for (int64_t j = 0; j < cols_; ++j) out[static_cast<size_t>(i * cols_ + j)] = get(i, j);
  return out;
}

bool HostMatrix::padding_intact() const {
  for (int64_t i = 0; i < rows_; ++i) {
    const size_t row_end = static_cast<size_t>(i * stride_ + cols_) * esize_;
    const size_t next =
        i + 1 < rows_ ? static_cast<size_t>((i + 1) * stride_) * esize_ : bytes_.size();
    for (size_t b = row_end; b < next; ++b)
      if (bytes_[b] != 0xFF) return false;
  }
  return true;
}

bool HostMatrix::same_bits(const HostMatrix& o) const {
  if (rows_ != o.rows_ || cols_ != o.cols_ || dtype_ != o.dtype_) return false;
  for (int64_t i = 0; i < rows_; ++i)
    if (std::memcmp(at(i, 0), o.at(i, 0), static_cast<size_t>(cols_) * esize_) != 0) return false;
  return true;
}

// ---------------------------------------------------------------------------------------------
// random logits

Logits random_logits(int64_t n, int64_t v, DType sdt, DType tdt, uint64_t seed, double sigma,
                     int64_t s_stride, int64_t t_stride) {
  Logits l{HostMatrix(n, v, sdt, s_stride), HostMatrix(n, v, tdt, t_stride)};
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < v; ++j) {
      const double s = sigma * nd(rng);
      const double t = 0.7 * s + 0.75 * sigma * nd(rng);
      l.student.set(i, j, s);
      l.teacher.set(i, j, t);
    }
  }
  return l;
}

// ---------------------------------------------------------------------------------------------
// kernel runner

KernelOut run_kernel(HostMatrix& student, HostMatrix& teacher, const DivergenceSpec& spec,
                     const TestOptions& opt, GradRequest gs, GradRequest gt, bool in_place) {
  const int64_t n = student.rows(), v = student.cols();
  divkit::DivergenceOptions o;
  HostMatrix labels, weights;
  if (!opt.labels.empty()) {
    labels = HostMatrix(1, static_cast<int64_t>(opt.labels.size()), opt.labels_dtype);
    for (size_t i = 0; i < opt.labels.size(); ++i)
      labels.set(0, static_cast<int64_t>(i), static_cast<double>(opt.labels[i]));
    TensorView lv = labels.view();
    o.labels = TensorView::vector(lv.data, lv.dtype, labels.cols());
  }
  if (!opt.weights.empty()) {
    weights = HostMatrix(1, static_cast<int64_t>(opt.weights.size()), opt.weights_dtype);
    for (size_t i = 0; i < opt.weights.size(); ++i)
      weights.set(0, static_cast<int64_t>(i), opt.weights[i]);
    TensorView wv = weights.view();
    o.weights = TensorView::vector(wv.data, wv.dtype, weights.cols());
  }
  o.ignore_index = opt.ignore_index;
  o.reduction = opt.reduction;
  o.num_items_in_batch = opt.num_items_in_batch;

  const int64_t loss_n = opt.reduction == Reduction::none ? n : 1;
  std::vector<float> loss(static_cast<size_t>(loss_n), std::numeric_limits<float>::quiet_NaN());
  divkit::DivergenceOutputs out;
  out.loss = TensorView::vector(loss.data(), DType::f32, loss_n);

  KernelOut res;
  if (in_place) {
    out.grad_student = student.view();
  } else if (gs.want) {
    res.grad_s = HostMatrix(n, v, gs.dtype, gs.stride);
    out.grad_student = res.grad_s.view();
  }
  if (gt.want) {
    res.grad_t = HostMatrix(n, v, gt.dtype, gt.stride);
    out.grad_teacher = res.grad_t.view();
  }
  divkit::divergence(student.view(), teacher.view(), spec, o, out);
  if (in_place) res.grad_s = student;
  res.loss.assign(loss.begin(), loss.end());
  return res;
}

divkit_ref::Options ref_options(const TestOptions& opt) {
  divkit_ref::Options r;
  r.labels = opt.labels;
  r.ignore_index = opt.ignore_index;
  for (double w : opt.weights) r.weights.push_back(round_to(opt.weights_dtype, w));
  r.reduction = opt.reduction;
  r.num_items_in_batch = opt.num_items_in_batch;
  return r;
}

divkit_ref::Result run_reference(const HostMatrix& student, const HostMatrix& teacher,
                                 const DivergenceSpec& spec, const TestOptions& opt,
                                 bool want_grads) {
  return divkit_ref::divergence(student.values(), teacher.values(), student.rows(), student.cols(),
                                divkit_ref::params_from_spec(spec), ref_options(opt), want_grads);
}

// ---------------------------------------------------------------------------------------------
// comparisons

Tolerance output_tolerance(DType out_dtype) {
  Tolerance t;
  if (out_dtype == DType::bf16) t.out_rel = std::ldexp(1.0, -8);
  if (out_dtype == DType::f16) {
    t.out_rel = std::ldexp(1.0, -11);
    t.out_abs = std::ldexp(1.0, -24);
  }
  return t;
}

static bool close(double got, double want, double scale, const Tolerance& tol, double* allowed) {
  *allowed = 0.0;
  if (std::isnan(want)) return std::isnan(got);
  if (std::isinf(want)) return got == want;
  if (!std::isfinite(got)) return false;
  *allowed = (tol.rtol + tol.out_rel) * std::fabs(want) + tol.afac * scale + tol.out_abs;
  return std::fabs(got - want) <= *allowed;
}

int64_t compare_values(const std::vector<double>& got, const std::vector<double>& want,
                       const std::vector<double>& scale, const Tolerance& tol,
                       const std::string& what) {
  if (got.size() != want.size()) {
    ADD_FAILURE() << what << ": size " << got.size() << " != " << want.size();
    return 1;
  }
  int64_t bad = 0;
  for (size_t k = 0; k < got.size(); ++k) {
    double allowed;
    if (!close(got[k], want[k], scale.empty() ? 0.0 : scale[k], tol, &allowed)) {
      if (bad < 5)
        ADD_FAILURE() << what << "[" << k << "]: got " << got[k] << ", want " << want[k]
                      << " (diff " << std::fabs(got[k] - want[k]) << ", allowed " << allowed << ")";
      ++bad;
    }
  }
  if (bad > 5) ADD_FAILURE() << what << ": " << bad << " mismatches in all";
  return bad;
}

int64_t compare_grad(const HostMatrix& got, const std::vector<double>& want,
                     const std::vector<double>& scale, const Tolerance& tol,
                     const std::string& what) {
  const int64_t v = got.cols();
  int64_t bad = 0;
  for (int64_t i = 0; i < got.rows(); ++i) {
    for (int64_t j = 0; j < v; ++j) {
      const size_t k = static_cast<size_t>(i * v + j);
      const double g = got.get(i, j);
      double allowed;
      if (!close(g, want[k], scale[k], tol, &allowed)) {
        if (bad < 5)
          ADD_FAILURE() << what << "[" << i << ", " << j << "]: got " << g << ", want " << want[k]
                        << " (diff " << std::fabs(g - want[k]) << ", allowed " << allowed << ")";
        ++bad;
      }
    }
  }
  if (bad > 5) ADD_FAILURE() << what << ": " << bad << " mismatches in all";
  if (!got.padding_intact()) {
    ADD_FAILURE() << what << ": the kernel wrote between rows (row stride " << got.stride() << ")";
    ++bad;
  }
  return bad;
}

void expect_matches_reference(const KernelOut& got, const divkit_ref::Result& want,
                              const Tolerance& tol, const std::string& what) {
  Tolerance loss_tol = tol;
  loss_tol.out_rel = 0.0;  // the loss is always fp32
  loss_tol.out_abs = 1e-18;
  compare_values(got.loss, want.loss, want.loss_scale, loss_tol, what + " loss");
  if (!got.grad_s.empty())
    compare_grad(got.grad_s, want.grad_s, want.scale_s, tol, what + " grad_student");
  if (!got.grad_t.empty())
    compare_grad(got.grad_t, want.grad_t, want.scale_t, tol, what + " grad_teacher");
}

// ---------------------------------------------------------------------------------------------
// variants

DivergenceSpec make_spec(DivergenceKind kind, double param, double temperature) {
  DivergenceSpec s;
  s.kind = kind;
  s.temperature = static_cast<float>(temperature);
  if (!std::isnan(param)) {
    if (kind == DivergenceKind::jsd) s.beta = static_cast<float>(param);
    else s.alpha = static_cast<float>(param);
  }
  return s;
}

std::vector<Variant> default_variants() {
  std::vector<Variant> out;
  for (int k = 0; k < divkit::kNumDivergenceKinds; ++k) {
    const auto kind = static_cast<DivergenceKind>(k);
    out.push_back({divkit::divergence_kind_name(kind), make_spec(kind), true});
  }
  return out;
}

std::vector<Variant> all_variants() {
  using K = DivergenceKind;
  return {
      {"forward_kl", make_spec(K::forward_kl), true},
      {"reverse_kl", make_spec(K::reverse_kl), true},
      {"jsd_b0p5", make_spec(K::jsd, 0.5), true},
      {"jsd_b0p1", make_spec(K::jsd, 0.1), true},
      {"jsd_b0p9", make_spec(K::jsd, 0.9), false},
      {"jsd_b0", make_spec(K::jsd, 0.0), false},
      {"jsd_b1", make_spec(K::jsd, 1.0), false},
      {"skew_forward_kl_a0p1", make_spec(K::skew_forward_kl, 0.1), true},
      {"skew_forward_kl_a0p5", make_spec(K::skew_forward_kl, 0.5), false},
      {"skew_forward_kl_a0", make_spec(K::skew_forward_kl, 0.0), false},
      {"skew_forward_kl_a1", make_spec(K::skew_forward_kl, 1.0), false},
      {"skew_reverse_kl_a0p1", make_spec(K::skew_reverse_kl, 0.1), true},
      {"skew_reverse_kl_a0p5", make_spec(K::skew_reverse_kl, 0.5), false},
      {"skew_reverse_kl_a0", make_spec(K::skew_reverse_kl, 0.0), false},
      {"tvd", make_spec(K::tvd), true},
      {"hellinger", make_spec(K::hellinger), true},
      {"jeffreys", make_spec(K::jeffreys), true},
      {"chi2", make_spec(K::chi2), true},
      {"alpha_divergence_a0p5", make_spec(K::alpha_divergence, 0.5), true},
      {"alpha_divergence_a2", make_spec(K::alpha_divergence, 2.0), true},
      {"alpha_divergence_a0p1", make_spec(K::alpha_divergence, 0.1), false},
      {"alpha_divergence_am0p5", make_spec(K::alpha_divergence, -0.5), false},
      {"alpha_divergence_a1", make_spec(K::alpha_divergence, 1.0), false},
      {"alpha_divergence_a0", make_spec(K::alpha_divergence, 0.0), false},
      {"renyi_a0p5", make_spec(K::renyi, 0.5), true},
      {"renyi_a2", make_spec(K::renyi, 2.0), true},
      {"renyi_a1", make_spec(K::renyi, 1.0), false},
      {"renyi_a0p1", make_spec(K::renyi, 0.1), false},
      {"cross_entropy", make_spec(K::cross_entropy), true},
  };
}

std::string spec_string(const DivergenceSpec& s) {
  std::ostringstream os;
  os << divkit::divergence_kind_name(s.kind) << "(beta=" << s.beta << ", alpha=" << s.alpha
     << ", T=" << s.temperature << (s.scale_by_t_squared ? ", T^2" : "") << ")";
  return os.str();
}

std::string dtype_short(DType dt) {
  switch (dt) {
    case DType::f32: return "f32";
    case DType::bf16: return "bf16";
    case DType::f16: return "f16";
    case DType::f64: return "f64";
    case DType::i32: return "i32";
    case DType::i64: return "i64";
  }
  return "?";
}

void expect_error(const std::function<void()>& fn, const std::vector<std::string>& needles,
                  const std::vector<std::string>& any_of, const std::string& what) {
  try {
    fn();
  } catch (const divkit::Error& e) {
    const std::string msg = e.what();
    for (const auto& n : needles)
      EXPECT_NE(msg.find(n), std::string::npos)
          << what << ": the message \"" << msg << "\" does not name \"" << n << "\"";
    if (!any_of.empty()) {
      bool found = false;
      for (const auto& n : any_of) found = found || msg.find(n) != std::string::npos;
      EXPECT_TRUE(found) << what << ": the message \"" << msg
                         << "\" names none of the expected words";
    }
    return;
  } catch (const std::exception& e) {
    ADD_FAILURE() << what << ": threw a std::exception that is not divkit::Error: " << e.what();
    return;
  } catch (...) {
    ADD_FAILURE() << what << ": threw something that is not divkit::Error";
    return;
  }
  ADD_FAILURE() << what << ": did not throw";
}

RuntimeGuard::RuntimeGuard() : threads_(divkit::get_num_threads()) {}
RuntimeGuard::~RuntimeGuard() {
  divkit::set_num_threads(threads_);
  divkit::force_simd_target("");
}

}  // namespace divkit_test
