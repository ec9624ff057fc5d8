// Fuzz over the TensorView entry points: from a fixed seed, thousands of random mutations of the
// baselines of entry_points.cc (ndim, extents, strides, dtype, device, null / misaligned /
// offset data, optional arguments dropped, transposes, broadcasts) combined with random options.
// Each call must either succeed (its outputs then hold no NaN) or throw divkit::Error whose
// message starts with the function's name; a view this file's own model (computed in 128-bit
// arithmetic) finds structurally invalid must be rejected. Run under ASan/UBSan in CI (the
// build-asan tree), where any out-of-bounds access or overflow fails the test.
//
// Views are kept inside their buffers unless they are invalid by the model: a valid view past
// its buffer is not something the library can detect (a view does not carry its buffer's size).
// DIVKIT_FUZZ_DRAWS overrides the number of draws; DIVKIT_FUZZ_SEED the seed.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "core/check.h"
#include "core/element.h"
#include "divkit/divkit.h"
#include "entry_points.h"

namespace divkit_test {
namespace {

using divkit::DType;
using divkit::TensorView;
using i128 = __int128;

constexpr int64_t kI64Max = std::numeric_limits<int64_t>::max();

int64_t env_int(const char* name, int64_t fallback) {
  const char* s = std::getenv(name);
  return s && *s ? std::strtoll(s, nullptr, 10) : fallback;
}

bool known_dtype(DType d) { return static_cast<int>(d) >= 0 && static_cast<int>(d) <= 5; }

struct Model {
  bool invalid = false;      // structurally invalid: must be rejected
  i128 numel = 0;            // elements (when valid)
  i128 first = 0, last = 0;  // byte offsets from data of the first and one past the last byte
};

// The rules of check::view, written again independently in 128-bit arithmetic.
Model model(const TensorView& t) {
  Model m;
  if (t.ndim == 0) return m;
  if (t.ndim < 0 || t.ndim > TensorView::kMaxDims || !known_dtype(t.dtype) ||
      (t.device != divkit::Device::cpu && t.device != divkit::Device::cuda)) {
    m.invalid = true;
    return m;
  }
  m.numel = 1;
  for (int d = 0; d < t.ndim; ++d) {
    if (t.shape[d] < 0) {
      m.invalid = true;
      return m;
    }
    // Saturated far beyond int64 (a later zero extent still makes it 0).
    m.numel = std::min(m.numel, i128{1} << 64) * t.shape[d];
  }
  if (m.numel == 0) return m;
  if (m.numel > kI64Max) {
    m.invalid = true;
    return m;
  }
  const int64_t es = static_cast<int64_t>(divkit::dtype_size(t.dtype));
  i128 reach = 0;
  for (int d = 0; d < t.ndim; ++d) {
    if (t.shape[d] <= 1) continue;
    if (t.strides[d] < 0) {
      m.invalid = true;
      return m;
    }
    reach += std::min(i128{t.shape[d] - 1} * t.strides[d], i128{1} << 100);  // saturated
  }
  m.last = (reach + 1) * es;
  if (m.last > divkit::check::kMaxSpanBytes || t.data == nullptr ||
      reinterpret_cast<uintptr_t>(t.data) % static_cast<uintptr_t>(es) != 0)
    m.invalid = true;
  return m;
}

int64_t pick(std::mt19937_64& rng, std::initializer_list<int64_t> xs) {
  return *(xs.begin() + rng() % xs.size());
}

// x clamped to int64 (the mutations scale values that may already be huge).
int64_t sat(i128 x) {
  return static_cast<int64_t>(std::clamp<i128>(x, std::numeric_limits<int64_t>::min(), kI64Max));
}

void mutate(std::mt19937_64& rng, TensorView& t, void* buffer) {
  const int nd = t.ndim >= 1 && t.ndim <= TensorView::kMaxDims ? t.ndim : 1;
  const int d = static_cast<int>(rng() % nd);
  const int64_t s = t.shape[d], st = t.strides[d];
  switch (rng() % 10) {
    case 0: {
      const int64_t nd2 = pick(rng, {-1, 0, 9, 100, t.ndim - 1, t.ndim + 1, t.ndim + 1});
      for (int64_t k = std::max(t.ndim, 0); k < nd2 && k < TensorView::kMaxDims; ++k) {
        t.shape[k] = 1;
        t.strides[k] = 1;
      }
      t.ndim = static_cast<int32_t>(nd2);
      break;
    }
    case 1:
      t.shape[d] = pick(rng, {0, 1, 2, sat(i128{s} - 1), sat(i128{s} + 1), sat(i128{s} * 2), -1, -7,
                              int64_t{1} << 31, int64_t{1} << 40, int64_t{1} << 62, kI64Max});
      break;
    case 2:
      t.strides[d] = pick(rng, {0, 1, sat(i128{st} + 1), sat(i128{st} * 2), sat(i128{st} * 3), -1,
                                sat(-i128{st}), int64_t{1} << 31, int64_t{1} << 40,
                                int64_t{1} << 55, int64_t{1} << 62, kI64Max});
      break;
    case 3: t.dtype = static_cast<DType>(pick(rng, {0, 1, 2, 3, 4, 5, 9, -1})); break;
    case 4: {
      char* base = static_cast<char*>(t.data ? t.data : buffer);
      t.data = pick(rng, {0, 1, 2}) == 0
                   ? nullptr
                   : static_cast<void*>(base + pick(rng, {1, 2, 4, 8, 16, 24, 64}));
      break;
    }
    case 5:
      // A CUDA view of host memory would be handed to the GPU in a CUDA build.
      if (!divkit::cuda_built()) t.device = static_cast<divkit::Device>(pick(rng, {1, 5}));
      break;
    case 6: t.ndim = 0; break;
    case 7:
      if (t.ndim >= 2) std::swap(t.strides[0], t.strides[1]);
      break;
    case 8: t.strides[d] = 0; break;
    case 9:
      t.shape[d] =
          s > 0 ? 1 + static_cast<int64_t>(rng() % static_cast<uint64_t>(sat(i128{s} * 2))) : 1;
      break;
  }
}

// NaN in an output view that a successful call wrote.
bool has_nan(const TensorView& t) {
  if (!t.defined() || t.numel() == 0 || t.ndim > 3) return false;
  if (t.dtype == DType::i32 || t.dtype == DType::i64) return false;
  int64_t idx[3] = {0, 0, 0};
  const int64_t n0 = t.shape[0], n1 = t.ndim > 1 ? t.shape[1] : 1, n2 = t.ndim > 2 ? t.shape[2] : 1;
  for (idx[0] = 0; idx[0] < n0; ++idx[0])
    for (idx[1] = 0; idx[1] < n1; ++idx[1])
      for (idx[2] = 0; idx[2] < n2; ++idx[2]) {
        int64_t off = 0;
        for (int d = 0; d < t.ndim; ++d) off += idx[d] * t.strides[d];
        if (std::isnan(divkit::elem::load(t.data, t.dtype, off))) return true;
      }
  return false;
}

// The views of a draw, for a failure's message.
std::string describe(const EntryPoint& e, const EntryBuffers& buf,
                     const std::vector<TensorView>& v) {
  std::string s;
  for (size_t k = 0; k < v.size(); ++k) {
    const TensorView& t = v[k];
    s += "\n  " + e.slots[k].name + ": ndim " + std::to_string(t.ndim) + " dtype " +
         std::to_string(static_cast<int>(t.dtype)) + " device " +
         std::to_string(static_cast<int>(t.device));
    if (t.ndim < 1 || t.ndim > TensorView::kMaxDims) continue;
    s += " shape [";
    for (int d = 0; d < t.ndim; ++d) s += (d ? ", " : "") + std::to_string(t.shape[d]);
    s += "] strides [";
    for (int d = 0; d < t.ndim; ++d) s += (d ? ", " : "") + std::to_string(t.strides[d]);
    s += "] offset " + (t.data ? std::to_string(static_cast<const char*>(t.data) -
                                                reinterpret_cast<const char*>(buf.mem[k].get()))
                               : std::string("null"));
  }
  return s;
}

TEST(FuzzViews, RandomViewsAreRejectedOrComputed) {
  const int64_t draws = env_int("DIVKIT_FUZZ_DRAWS", 20000);
  const uint64_t seed = static_cast<uint64_t>(env_int("DIVKIT_FUZZ_SEED", 20261207));
  std::mt19937_64 rng(seed);
  const auto& table = entry_points();
  std::vector<EntryBuffers> buffers;
  for (size_t i = 0; i < table.size(); ++i) buffers.emplace_back(table[i], 100 + i);

  int64_t ran = 0, rejected = 0, invalid = 0, skipped = 0, failures = 0;
  for (int64_t draw = 0; draw < draws && failures < 20; ++draw) {
    const size_t which = rng() % table.size();
    const EntryPoint& e = table[which];
    EntryBuffers& buf = buffers[which];
    std::vector<TensorView> views = buf.baseline;
    const int nmut = 1 + static_cast<int>(rng() % 3);
    for (int k = 0; k < nmut; ++k) {
      const size_t slot = rng() % views.size();
      if (!buf.baseline[slot].defined()) continue;
      mutate(rng, views[slot], buf.mem[slot].get());
    }
    bool expect_invalid = false, outside = false;
    i128 elements = 0;
    for (size_t k = 0; k < views.size(); ++k) {
      const Model m = model(views[k]);
      expect_invalid |= m.invalid;
      if (m.invalid || !views[k].defined()) continue;
      // An empty view counts its largest extent: [2^40, 0] is valid and means 2^40 rows.
      for (int d = 0; d < views[k].ndim; ++d)
        elements = std::max<i128>(elements, views[k].shape[d]);
      if (m.numel == 0) continue;
      elements += m.numel;
      const i128 start =
          static_cast<const char*>(views[k].data) - reinterpret_cast<const char*>(buf.mem[k].get());
      outside |= start < 0 || start + m.last > buf.bytes[k];
    }
    // A valid view past its buffer cannot be detected; a huge broadcast (stride 0) or empty view
    // is valid but makes per-row work and allocations of its extent.
    if (!expect_invalid && (outside || elements > (1 << 16))) {
      ++skipped;
      continue;
    }
    for (size_t k = 0; k < views.size(); ++k)
      if (e.slots[k].output) std::memset(buf.mem[k].get(), 0, static_cast<size_t>(buf.bytes[k]));
    const uint32_t option = static_cast<uint32_t>(rng());
    const std::string where =
        e.fn + " (draw " + std::to_string(draw) + ", option " + std::to_string(option) + ")";
    try {
      e.call(views, option);
      ++ran;
      if (expect_invalid) {
        ++failures;
        ADD_FAILURE() << where << ": accepted a structurally invalid view"
                      << describe(e, buf, views);
      } else if (e.outputs_without_nan) {
        for (size_t k = 0; k < views.size(); ++k)
          if (e.slots[k].output && has_nan(views[k])) {
            ++failures;
            ADD_FAILURE() << where << ": NaN in output " << e.slots[k].name
                          << describe(e, buf, views);
          }
      }
    } catch (const divkit::Error& ex) {
      ++rejected;
      invalid += expect_invalid;
      if (std::string(ex.what()).rfind(e.fn + ": ", 0) != 0) {
        ++failures;
        ADD_FAILURE() << where
                      << ": message does not start with the function's name: " << ex.what();
      }
    } catch (const std::exception& ex) {
      ++failures;
      ADD_FAILURE() << where << ": not a divkit::Error: " << ex.what();
    }
  }
  std::printf(
      "[fuzz] %lld draws: %lld computed, %lld rejected (%lld structurally invalid), %lld "
      "skipped\n",
      static_cast<long long>(draws), static_cast<long long>(ran), static_cast<long long>(rejected),
      static_cast<long long>(invalid), static_cast<long long>(skipped));
  // The draws reach the kernels, not only the checks.
  EXPECT_GT(ran, draws / 20);
  EXPECT_GT(invalid, draws / 10);
}

}  // namespace
}  // namespace divkit_test
