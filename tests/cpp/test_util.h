// Shared helpers of the divkit C++ tests: host buffers of any dtype with any row stride, the
// conversions to and from bf16 / fp16 (written here, independently of the library's), a
// runner that calls divkit::divergence, and comparisons against the fp64 reference.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "divkit/divkit.h"
#include "reference.h"

namespace divkit_test {

using divkit::DivergenceKind;
using divkit::DivergenceSpec;
using divkit::DType;
using divkit::Reduction;
using divkit::TensorView;

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// ---- dtype conversions (round to nearest even) ----
uint16_t float_to_bf16(float f);
float bf16_to_float(uint16_t h);
uint16_t double_to_f16(double d);
double f16_to_double(uint16_t h);
// The value x becomes once stored in `dtype` (a float dtype).
double round_to(DType dtype, double x);
bool is_float_dtype(DType dtype);

// ---- host matrices ----
// rows x cols elements of `dtype`, `stride` elements between row starts. The bytes between the
// end of a row and the start of the next are filled with 0xFF (a NaN in every float dtype), so
// a kernel that reads them produces NaN, and a kernel that writes them is caught by
// padding_intact().
class HostMatrix {
 public:
  HostMatrix() = default;
  HostMatrix(int64_t rows, int64_t cols, DType dtype, int64_t stride = -1);

  int64_t rows() const { return rows_; }
  int64_t cols() const { return cols_; }
  int64_t stride() const { return stride_; }
  DType dtype() const { return dtype_; }
  bool empty() const { return rows_ == 0 && cols_ == 0; }

  double get(int64_t i, int64_t j) const;
  void set(int64_t i, int64_t j, double x);  // rounds to the dtype
  void fill(double x);
  void fill_row(int64_t i, double x);
  TensorView view();
  // The values as doubles, rows * cols contiguous.
  std::vector<double> values() const;
  // Raw bytes, for bit-for-bit comparisons (the whole buffer, padding included).
  const std::vector<uint8_t>& bytes() const { return bytes_; }
  bool padding_intact() const;
  bool same_bits(const HostMatrix& other) const;  // same values bit for bit (ignores padding)

 private:
  uint8_t* at(int64_t i, int64_t j);
  const uint8_t* at(int64_t i, int64_t j) const;

  int64_t rows_ = 0, cols_ = 0, stride_ = 0;
  DType dtype_ = DType::f32;
  size_t esize_ = 4;
  std::vector<uint8_t> bytes_;
};

// ---- random logits ----
// Student ~ N(0, sigma^2); teacher = 0.7 * student + N(0, (1.5 sigma / 2)^2): related but
// different distributions, as in distillation.
struct Logits {
  HostMatrix student, teacher;
};
Logits random_logits(int64_t n, int64_t v, DType sdt, DType tdt, uint64_t seed, double sigma = 2.0,
                     int64_t s_stride = -1, int64_t t_stride = -1);

// ---- calling the kernel ----
struct TestOptions {
  std::vector<int64_t> labels;  // empty: not given
  DType labels_dtype = DType::i64;
  int64_t ignore_index = -100;
  std::vector<double> weights;  // empty: not given
  DType weights_dtype = DType::f32;
  Reduction reduction = Reduction::mean;
  double num_items_in_batch = 0.0;
};

struct GradRequest {
  bool want = false;
  DType dtype = DType::f32;
  int64_t stride = -1;
  static GradRequest none() { return {}; }
  static GradRequest of(DType dt = DType::f32, int64_t stride = -1) { return {true, dt, stride}; }
};

struct KernelOut {
  std::vector<double> loss;  // N (reduction none) or 1
  HostMatrix grad_s;         // empty when not requested; a copy of the student in place mode
  HostMatrix grad_t;
};

// Calls divkit::divergence. In in-place mode the student gradient is written into `student`
// (grad_student view == student view); the result's grad_s is then a copy of it.
KernelOut run_kernel(HostMatrix& student, HostMatrix& teacher, const DivergenceSpec& spec,
                     const TestOptions& opt, GradRequest gs = GradRequest::none(),
                     GradRequest gt = GradRequest::none(), bool in_place = false);

// The reference for the same inputs (the values stored in the matrices, i.e. after rounding to
// their dtypes) and options (weights rounded to their dtype).
divkit_ref::Result run_reference(const HostMatrix& student, const HostMatrix& teacher,
                                 const DivergenceSpec& spec, const TestOptions& opt,
                                 bool want_grads = true);
divkit_ref::Options ref_options(const TestOptions& opt);

// ---- comparisons ----
struct Tolerance {
  double rtol = 1e-5;    // relative to the reference value
  double afac = 1e-6;    // times the reference's error scale (see reference.h)
  double out_rel = 0.0;  // extra relative term for a low-precision output dtype
  // Extra absolute term. fp32 underflow: a product of two probabilities below ~1e-38 is lost,
  // so entries smaller than ~1e-19 may be off by their own size (fp16: its subnormal spacing).
  double out_abs = 1e-18;
};
Tolerance output_tolerance(DType out_dtype);

// Number of mismatches (reported through ADD_FAILURE, the first few in detail).
int64_t compare_values(const std::vector<double>& got, const std::vector<double>& want,
                       const std::vector<double>& scale, const Tolerance& tol,
                       const std::string& what);
int64_t compare_grad(const HostMatrix& got, const std::vector<double>& want,
                     const std::vector<double>& scale, const Tolerance& tol,
                     const std::string& what);
// Checks loss and whichever gradients were requested.
void expect_matches_reference(const KernelOut& got, const divkit_ref::Result& want,
                              const Tolerance& tol, const std::string& what);

// ---- the table of divergence variants ----
struct Variant {
  std::string name;  // test name, e.g. "jsd_b0p5"
  DivergenceSpec spec;
  bool main = true;  // run on the large shapes too
};
std::vector<Variant> all_variants();      // every kind with its interesting parameters
std::vector<Variant> default_variants();  // the 12 kinds with default parameters
DivergenceSpec make_spec(DivergenceKind kind, double param = kNaN, double temperature = 1.0);

std::string spec_string(const DivergenceSpec& spec);
std::string dtype_short(DType dt);

// Runs fn and checks that it throws divkit::Error whose message contains every one of
// `needles` (and at least one of `any_of` when that is not empty).
void expect_error(const std::function<void()>& fn, const std::vector<std::string>& needles,
                  const std::vector<std::string>& any_of = {}, const std::string& what = "");

// Restores the thread count and the SIMD target at scope exit.
class RuntimeGuard {
 public:
  RuntimeGuard();
  ~RuntimeGuard();

 private:
  int threads_;
};

}  // namespace divkit_test
