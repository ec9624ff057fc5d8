// The device GEMM (src/core/gemm_cuda.cu) over the CUDA emulator's cuBLAS (DIVKIT_CUDA=EMULATE
// builds only; src/core/cublas_emulator.cc): the layer's row-major to column-major mapping, its
// transposes, leading dimensions, beta, dtypes, stream and handles, and its errors. Each shape
// against an fp64 reference computed from the same rounded operands, with a tolerance that also
// holds for a GPU's float32 accumulation. The emulator's "device memory" is host memory, so the
// operands are host buffers.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "core/cuda_emulator_control.h"
#include "core/gemm_cuda.h"
#include "test_util.h"

namespace {

using divkit::DType;
namespace gc = divkit::gemm_cuda;
namespace emu = divkit::cuda_emu;

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
// A value the layer must never read (operand padding) or write (C padding).
constexpr float kPad = 1.0e30f;

enum class Shape { abt, ab, atb };

const char* shape_name(Shape s) { return s == Shape::abt ? "abt" : s == Shape::ab ? "ab" : "atb"; }

// A row-major matrix [rows, ld] of one dtype, padding columns [cols, ld) set to kPad.
class Matrix {
 public:
  Matrix(int64_t rows, int64_t cols, int64_t ld, DType dt)
      : rows_(rows), cols_(cols), ld_(ld), dt_(dt), bits_(size_t(std::max<int64_t>(rows * ld, 1))),
        f_(bits_.size()) {
    for (int64_t i = 0; i < rows * ld; ++i) put(i, kPad);
  }
  void set(int64_t r, int64_t c, double v) { put(r * ld_ + c, v); }
  // The stored (rounded) value.
  double get(int64_t r, int64_t c) const {
    const int64_t i = r * ld_ + c;
    switch (dt_) {
      case DType::bf16: return divkit_test::bf16_to_float(bits_[i]);
      case DType::f16: return divkit_test::f16_to_double(bits_[i]);
      default: return f_[i];
    }
  }
  const void* data() const {
    return dt_ == DType::f32 ? static_cast<const void*>(f_.data()) : bits_.data();
  }
  int64_t ld() const { return ld_; }

 private:
  void put(int64_t i, double v) {
    switch (dt_) {
      case DType::bf16: bits_[i] = divkit_test::float_to_bf16(static_cast<float>(v)); break;
      case DType::f16: bits_[i] = divkit_test::double_to_f16(v); break;
      default: f_[i] = static_cast<float>(v); break;
    }
  }
  int64_t rows_, cols_, ld_;
  DType dt_;
  std::vector<uint16_t> bits_;
  std::vector<float> f_;
};

struct Case {
  Shape shape;
  DType dtype;
  int64_t m, n, k;
  int64_t pad;  // extra elements per row in A, B and C
  float alpha, beta;
};

void call(const char* fn, Shape s, int64_t m, int64_t n, int64_t k, float alpha, const Matrix& a,
          const Matrix& b, DType dt, float beta, float* c, int64_t ldc, CUstream_st* stream) {
  switch (s) {
    case Shape::abt:
      gc::abt(fn, m, n, k, alpha, a.data(), dt, a.ld(), b.data(), dt, b.ld(), beta, c, ldc, stream);
      break;
    case Shape::ab:
      gc::ab(fn, m, n, k, alpha, a.data(), dt, a.ld(), b.data(), dt, b.ld(), beta, c, ldc, stream);
      break;
    case Shape::atb:
      gc::atb(fn, m, n, k, alpha, a.data(), dt, a.ld(), b.data(), dt, b.ld(), beta, c, ldc, stream);
      break;
  }
}

void run_case(const Case& t, uint32_t seed) {
  SCOPED_TRACE(std::string(shape_name(t.shape)) + " " + divkit::dtype_name(t.dtype) +
               " m=" + std::to_string(t.m) + " n=" + std::to_string(t.n) +
               " k=" + std::to_string(t.k) + " pad=" + std::to_string(t.pad) +
               " alpha=" + std::to_string(t.alpha) + " beta=" + std::to_string(t.beta));
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> u(-2.0, 2.0);
  const int64_t m = t.m, n = t.n, k = t.k;
  // Stored shapes: A [m, k] (abt, ab) or [k, m] (atb); B [n, k] (abt) or [k, n] (ab, atb).
  const int64_t ar = t.shape == Shape::atb ? k : m, ac = t.shape == Shape::atb ? m : k;
  const int64_t br = t.shape == Shape::abt ? n : k, bc = t.shape == Shape::abt ? k : n;
  // cuBLAS asks for leading dimensions >= 1 even for k = 0.
  Matrix a(ar, ac, std::max<int64_t>(ac, 1) + t.pad, t.dtype);
  Matrix b(br, bc, std::max<int64_t>(bc, 1) + t.pad, t.dtype);
  for (int64_t r = 0; r < ar; ++r)
    for (int64_t c = 0; c < ac; ++c) a.set(r, c, u(rng));
  for (int64_t r = 0; r < br; ++r)
    for (int64_t c = 0; c < bc; ++c) b.set(r, c, u(rng));
  const int64_t ldc = n + t.pad;
  std::vector<float> c(size_t(std::max<int64_t>(m * ldc, 1)), kPad);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j)
      c[i * ldc + j] = t.beta == 0.0f ? static_cast<float>(kNaN) : static_cast<float>(u(rng));
  const std::vector<float> c0 = c;

  auto aop = [&](int64_t i, int64_t l) {
    return t.shape == Shape::atb ? a.get(l, i) : a.get(i, l);
  };
  auto bop = [&](int64_t l, int64_t j) {
    return t.shape == Shape::abt ? b.get(j, l) : b.get(l, j);
  };

  int tag = 0;
  auto* stream = reinterpret_cast<CUstream_st*>(&tag);  // only passed through to the handle
  const long long before = emu::cublas_gemm_count();
  call("test_gemm", t.shape, m, n, k, t.alpha, a, b, t.dtype, t.beta, c.data(), ldc, stream);
  EXPECT_EQ(emu::cublas_gemm_count(), before + 1);
  EXPECT_EQ(emu::cublas_last_stream(), static_cast<void*>(stream));

  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < ldc; ++j) {
      const float got = c[i * ldc + j];
      if (j >= n) {
        EXPECT_EQ(got, kPad) << "C padding written at " << i << "," << j;
        continue;
      }
      double sum = 0.0, mag = 0.0;
      for (int64_t l = 0; l < k; ++l) {
        sum += aop(i, l) * bop(l, j);
        mag += std::fabs(aop(i, l) * bop(l, j));
      }
      const double old = t.beta == 0.0f ? 0.0 : double(c0[i * ldc + j]);
      const double want = double(t.alpha) * sum + double(t.beta) * old;
      // float32 accumulation over k terms and the final alpha / beta step.
      const double tol = 2.0 * double(k + 2) * std::ldexp(1.0, -24) *
                             (std::fabs(t.alpha) * mag + std::fabs(t.beta * old)) +
                         1e-30;
      ASSERT_TRUE(std::isfinite(got)) << "at " << i << "," << j;
      EXPECT_NEAR(got, want, tol) << "at " << i << "," << j;
    }
  }
}

TEST(CudaEmulatedGemm, ShapesDtypesSizesLeadingDimensionsBeta) {
  gc::set_library_names_for_testing({});
  uint32_t seed = 1;
  for (Shape s : {Shape::abt, Shape::ab, Shape::atb})
    for (DType dt : {DType::f32, DType::bf16, DType::f16})
      for (auto [m, n, k] : std::vector<std::array<int64_t, 3>>{
               {5, 7, 3}, {7, 5, 11}, {1, 1, 1}, {1, 9, 4}, {6, 1, 2}, {3, 4, 1}, {4, 3, 0}})
        for (int64_t pad : {0, 3})
          for (auto [alpha, beta] :
               std::vector<std::array<float, 2>>{{1.0f, 0.0f}, {1.0f, 1.0f}, {-0.75f, 0.5f}})
            run_case({s, dt, m, n, k, pad, alpha, beta}, seed++);
}

TEST(CudaEmulatedGemm, KZeroScalesCAndBetaZeroIgnoresNaN) {
  gc::set_library_names_for_testing({});
  const Matrix a(3, 0, 1, DType::f32), b(2, 0, 1, DType::f32);
  std::vector<float> c = {1.0f, -2.0f, 3.0f, 4.0f, 5.0f, 6.0f};
  gc::abt("test_gemm", 3, 2, 0, 1.0f, a.data(), DType::f32, 1, b.data(), DType::f32, 1, 0.5f,
          c.data(), 2, nullptr);
  EXPECT_EQ(c, (std::vector<float>{0.5f, -1.0f, 1.5f, 2.0f, 2.5f, 3.0f}));
  std::fill(c.begin(), c.end(), static_cast<float>(kNaN));
  gc::abt("test_gemm", 3, 2, 0, 1.0f, a.data(), DType::f32, 1, b.data(), DType::f32, 1, 0.0f,
          c.data(), 2, nullptr);
  EXPECT_EQ(c, std::vector<float>(6, 0.0f));
}

TEST(CudaEmulatedGemm, EmptyOutputCallsNothing) {
  gc::set_library_names_for_testing({});
  const Matrix a(1, 4, 4, DType::f32), b(1, 4, 4, DType::f32);
  float c = kPad;
  const long long before = emu::cublas_gemm_count();
  gc::abt("test_gemm", 0, 1, 4, 1.0f, a.data(), DType::f32, 4, b.data(), DType::f32, 4, 0.0f, &c, 1,
          nullptr);
  gc::ab("test_gemm", 1, 0, 1, 1.0f, a.data(), DType::f32, 4, b.data(), DType::f32, 1, 0.0f, &c, 1,
         nullptr);
  EXPECT_EQ(emu::cublas_gemm_count(), before);
  EXPECT_EQ(c, kPad);
}

void expect_error(const std::function<void()>& f, const std::vector<std::string>& parts) {
  try {
    f();
    ADD_FAILURE() << "no error";
  } catch (const divkit::Error& e) {
    for (const std::string& p : parts)
      EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << e.what() << " lacks " << p;
  }
}

TEST(CudaEmulatedGemm, BadArguments) {
  gc::set_library_names_for_testing({});
  const Matrix a(2, 3, 3, DType::f32), b(2, 3, 3, DType::f32);
  std::vector<float> c(4);
  const long long before = emu::cublas_gemm_count();
  expect_error(
      [&] {
        gc::abt("my_fn", 2, 2, 3, 1.0f, a.data(), DType::f32, 3, b.data(), DType::bf16, 3, 0.0f,
                c.data(), 2, nullptr);
      },
      {"my_fn: ", "float32 and bfloat16"});
  expect_error(
      [&] {
        gc::ab("my_fn", 2, 2, 3, 1.0f, a.data(), DType::f64, 3, b.data(), DType::f64, 2, 0.0f,
               c.data(), 2, nullptr);
      },
      {"my_fn: ", "float64 and float64"});
  expect_error(
      [&] {
        gc::abt("my_fn", 2, 2, 3, 1.0f, a.data(), DType::f32, 2, b.data(), DType::f32, 3, 0.0f,
                c.data(), 2, nullptr);
      },
      {"my_fn: ", "lda must be >= 3, got 2"});
  expect_error(
      [&] {
        gc::atb("my_fn", 2, 2, 3, 1.0f, a.data(), DType::f32, 2, b.data(), DType::f32, 2, 0.0f,
                c.data(), 1, nullptr);
      },
      {"my_fn: ", "ldc must be >= 2, got 1"});
  expect_error(
      [&] {
        gc::ab("my_fn", -1, 2, 3, 1.0f, a.data(), DType::f32, 3, b.data(), DType::f32, 2, 0.0f,
               c.data(), 2, nullptr);
      },
      {"my_fn: ", "m must be in [0, 2^31 - 1], got -1"});
  expect_error(
      [&] {
        gc::ab("my_fn", 2, 2, int64_t(1) << 31, 1.0f, a.data(), DType::f32, int64_t(1) << 31,
               b.data(), DType::f32, 2, 0.0f, c.data(), 2, nullptr);
      },
      {"my_fn: ", "k must be in [0, 2^31 - 1]"});
  EXPECT_EQ(emu::cublas_gemm_count(), before);
}

TEST(CudaEmulatedGemm, LibraryThatCannotBeLoaded) {
  const Matrix a(1, 1, 1, DType::f32), b(1, 1, 1, DType::f32);
  float c = 0.0f;
  auto run = [&] {
    gc::abt("my_fn", 1, 1, 1, 1.0f, a.data(), DType::f32, 1, b.data(), DType::f32, 1, 0.0f, &c, 1,
            nullptr);
  };
  using Log = std::vector<std::string>;
  gc::set_library_names_for_testing({"libdivkit-no-such-cublas.so.99"});
  (void)emu::take_cublas_open_log();
  expect_error(run, {"my_fn: cannot load cuBLAS", "libdivkit-no-such-cublas.so.99"});
  EXPECT_EQ(emu::take_cublas_open_log(),
            (Log{"noload:libdivkit-no-such-cublas.so.99", "load:libdivkit-no-such-cublas.so.99"}));
  expect_error(run, {"my_fn: cannot load cuBLAS"});  // the failure is remembered, still named
  EXPECT_TRUE(emu::take_cublas_open_log().empty());
  // The names are tried in order: a missing one, then one that loads.
  gc::set_library_names_for_testing({"libdivkit-no-such-cublas.so.99", "libcublas.so.12"});
  EXPECT_NO_THROW(run());
  EXPECT_EQ(emu::take_cublas_open_log(),
            (Log{"noload:libdivkit-no-such-cublas.so.99", "noload:libcublas.so.12"}));
  // A process without libcublas loaded yet: every name as already loaded first, then loads.
  emu::set_cublas_preloaded(false);
  gc::set_library_names_for_testing({});
  EXPECT_NO_THROW(run());
  emu::set_cublas_preloaded(true);
  EXPECT_EQ(emu::take_cublas_open_log(), (Log{"noload:libcublas.so.13", "noload:libcublas.so.12",
                                              "noload:libcublas.so", "load:libcublas.so.13"}));
  // Torch's library already in the process: found without a load.
  gc::set_library_names_for_testing({});
  EXPECT_NO_THROW(run());
  EXPECT_EQ(emu::take_cublas_open_log(), (Log{"noload:libcublas.so.13"}));
  EXPECT_EQ(gc::default_library_names(),
            (Log{"libcublas.so.13", "libcublas.so.12", "libcublas.so"}));
}

TEST(CudaEmulatedGemm, FailingCallNamesFunctionAndStatus) {
  gc::set_library_names_for_testing({});
  const Matrix a(1, 1, 1, DType::f32), b(1, 1, 1, DType::f32);
  float c = 0.0f;
  auto run = [&] {
    gc::atb("my_fn", 1, 1, 1, 1.0f, a.data(), DType::f32, 1, b.data(), DType::f32, 1, 0.0f, &c, 1,
            nullptr);
  };
  emu::set_cublas_next_status(13);
  expect_error(run, {"my_fn: cuBLAS error in cublasGemmEx: CUBLAS_STATUS_EXECUTION_FAILED (13)"});
  // Without cublasGetStatusString (cuBLAS < 11.4): the layer's own names.
  emu::set_cublas_has_status_string(false);
  gc::set_library_names_for_testing({});
  emu::set_cublas_next_status(16);
  expect_error(run, {"my_fn: cuBLAS error in cublasGemmEx: CUBLAS_STATUS_LICENSE_ERROR (16)"});
  emu::set_cublas_has_status_string(true);
  gc::set_library_names_for_testing({});
  EXPECT_NO_THROW(run());
}

TEST(CudaEmulatedGemm, OneHandlePerThreadReusedAfterExit) {
  gc::set_library_names_for_testing({});
  const Matrix a(1, 1, 1, DType::f32), b(1, 1, 1, DType::f32);
  auto run = [&] {
    float c = 0.0f;
    gc::ab("my_fn", 1, 1, 1, 1.0f, a.data(), DType::f32, 1, b.data(), DType::f32, 1, 0.0f, &c, 1,
           nullptr);
  };
  const long long h0 = emu::cublas_handle_count();
  run();
  run();
  EXPECT_EQ(emu::cublas_handle_count(), h0 + 1);  // one for this thread, made once
  std::thread([&] { run(); }).join();
  EXPECT_EQ(emu::cublas_handle_count(), h0 + 2);  // its own
  std::thread([&] { run(); }).join();
  EXPECT_EQ(emu::cublas_handle_count(), h0 + 2);  // the exited thread's, reused
  run();
  EXPECT_EQ(emu::cublas_handle_count(), h0 + 2);
}

}  // namespace
