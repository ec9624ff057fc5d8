// The structural checks of TensorViews (check::view) at every public entry point: each entry
// point of entry_points.cc is called with its valid baseline (which must succeed), then with one
// argument broken at a time (ndim 9, a shape whose element count overflows int64, a stride whose
// byte span overflows, negative extents and strides, null and misaligned data, unknown dtype and
// device codes); each must throw divkit::Error whose message starts with the function's name and
// the argument's.
#include <gtest/gtest.h>

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "core/check.h"
#include "divkit/divkit.h"
#include "entry_points.h"

namespace divkit_test {
namespace {

using divkit::DType;
using divkit::TensorView;

constexpr int64_t kI64Max = std::numeric_limits<int64_t>::max();

// A dimension of extent > 1 (its stride is used), or -1.
int used_dim(const TensorView& t) {
  for (int d = 0; d < t.ndim; ++d)
    if (t.shape[d] > 1) return d;
  return -1;
}

struct Corruption {
  const char* what;
  // Returns false when it does not apply to this view.
  bool (*apply)(TensorView&);
};

const Corruption kCorruptions[] = {
    {"ndim 9",
     [](TensorView& t) {
       t.ndim = 9;
       return true;
     }},
    {"ndim -1",
     [](TensorView& t) {
       t.ndim = -1;
       return true;
     }},
    {"huge extent (element count or span overflows)",
     [](TensorView& t) {
       t.shape[0] = kI64Max / 2 + 1;
       if (t.ndim > 1) t.shape[1] = 8;  // the element count overflows int64
       return true;
     }},
    {"huge stride (span overflows int64)",
     [](TensorView& t) {
       const int d = used_dim(t);
       if (d < 0) return false;
       t.strides[d] = int64_t{1} << 62;
       return true;
     }},
    {"large stride (span beyond 2^56 bytes, no overflow)",
     [](TensorView& t) {
       const int d = used_dim(t);
       if (d < 0) return false;
       t.strides[d] = int64_t{1} << 55;
       return true;
     }},
    {"INT64_MAX stride",
     [](TensorView& t) {
       const int d = used_dim(t);
       if (d < 0) return false;
       t.strides[d] = kI64Max;
       return true;
     }},
    {"negative extent",
     [](TensorView& t) {
       t.shape[0] = -3;
       return true;
     }},
    {"negative stride",
     [](TensorView& t) {
       const int d = used_dim(t);
       if (d < 0) return false;
       t.strides[d] = -1;
       return true;
     }},
    {"null data",
     [](TensorView& t) {
       t.data = nullptr;
       return true;
     }},
    {"misaligned data",
     [](TensorView& t) {
       t.data = static_cast<char*>(t.data) + 1;
       return true;
     }},
    {"unknown dtype",
     [](TensorView& t) {
       t.dtype = static_cast<DType>(42);
       return true;
     }},
    {"unknown device",
     [](TensorView& t) {
       t.device = static_cast<divkit::Device>(7);
       return true;
     }},
};

bool starts_with(const std::string& s, const std::string& prefix) {
  return s.compare(0, prefix.size(), prefix) == 0;
}

TEST(Hardening, EveryEntryPointAcceptsItsBaseline) {
  for (const EntryPoint& e : entry_points()) {
    EntryBuffers buf(e, 1);
    try {
      e.call(buf.baseline, 0);
    } catch (const std::exception& ex) {
      ADD_FAILURE() << e.fn << ": the baseline call threw: " << ex.what();
    }
  }
}

TEST(Hardening, EveryArgumentOfEveryEntryPointIsChecked) {
  int checked = 0;
  for (const EntryPoint& e : entry_points()) {
    EntryBuffers buf(e, 2);
    for (size_t k = 0; k < e.slots.size(); ++k) {
      if (!buf.baseline[k].defined()) continue;
      for (const Corruption& c : kCorruptions) {
        std::vector<TensorView> views = buf.baseline;
        if (!c.apply(views[k])) continue;
        const std::string want = e.fn + ": " + e.slots[k].name + " ";
        SCOPED_TRACE(e.fn + " " + e.slots[k].name + ": " + c.what);
        try {
          e.call(views, 0);
          ADD_FAILURE() << "accepted";
        } catch (const divkit::Error& ex) {
          EXPECT_TRUE(starts_with(ex.what(), want)) << ex.what() << "\n  expected: " << want;
        } catch (const std::exception& ex) {
          ADD_FAILURE() << "not a divkit::Error: " << ex.what();
        }
        ++checked;
      }
    }
  }
  EXPECT_GT(checked, 1000);
}

// A view whose element count or span overflows, before any access.
TEST(Hardening, TensorViewNumelThrowsOnOverflow) {
  float x = 0.0f;
  TensorView t = TensorView::matrix(&x, DType::f32, int64_t{1} << 40, int64_t{1} << 40, 0);
  EXPECT_THROW(t.numel(), divkit::Error);
  t.ndim = 9;
  EXPECT_THROW(t.numel(), divkit::Error);
  t.ndim = 2;
  t.shape[0] = 0;  // an empty view has no elements whatever the other extents
  EXPECT_EQ(t.numel(), 0);
  t.shape[0] = -2;
  t.shape[1] = 3;
  EXPECT_THROW(t.numel(), divkit::Error);
}

TEST(Hardening, CheckViewAcceptsWhatFrameworksExport) {
  float x[16] = {};
  // Extent-1 dimensions: any stride (never used); a broadcast row (stride 0) of many rows.
  TensorView t = TensorView::matrix(x, DType::f32, 1, 4, kI64Max);
  EXPECT_NO_THROW(divkit::check::view("f", "t", t));
  t.strides[0] = -5;
  EXPECT_NO_THROW(divkit::check::view("f", "t", t));
  t = TensorView::matrix(x, DType::f32, int64_t{1} << 40, 4, 0);
  EXPECT_NO_THROW(divkit::check::view("f", "t", t));
  // Empty views: null data, any strides.
  t = TensorView::matrix(nullptr, DType::f32, 0, 4, -1);
  t.strides[0] = kI64Max;
  EXPECT_NO_THROW(divkit::check::view("f", "t", t));
  // Not given.
  EXPECT_NO_THROW(divkit::check::view("f", "t", TensorView{}));
  // The largest span allowed, and one element more.
  t = TensorView::vector(x, DType::f32, divkit::check::kMaxSpanBytes / 4);
  EXPECT_NO_THROW(divkit::check::view("f", "t", t));
  t.shape[0] += 1;
  EXPECT_THROW(divkit::check::view("f", "t", t), divkit::Error);
}

// divergence_f32 takes raw pointers and sizes: bad sizes are Errors, not reads.
TEST(Hardening, DivergenceF32RejectsBadSizes) {
  std::vector<float> s(8, 0.0f), t(8, 0.0f);
  const divkit::DivergenceSpec spec;
  for (auto [n, v] : {std::pair<int64_t, int64_t>{-1, 4},
                      {2, -4},
                      {kI64Max, 2},
                      {2, kI64Max},
                      {int64_t{1} << 40, int64_t{1} << 40}}) {
    SCOPED_TRACE(std::to_string(n) + " x " + std::to_string(v));
    try {
      divkit::divergence_f32(s.data(), t.data(), n, v, spec, divkit::Reduction::mean, nullptr);
      ADD_FAILURE() << "accepted";
    } catch (const divkit::Error& e) {
      EXPECT_TRUE(starts_with(e.what(), "divergence: ")) << e.what();
    }
  }
  EXPECT_THROW(divkit::divergence_f32(nullptr, t.data(), 2, 4, spec, divkit::Reduction::mean,
                                      nullptr),
               divkit::Error);
}

}  // namespace
}  // namespace divkit_test
