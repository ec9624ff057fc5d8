// Device placement of a call's tensors: every public function that has a CUDA path asks which
// device its arguments are on before it reads any of them.
#pragma once

#include <initializer_list>
#include <string>
#include <utility>

#include "divkit/tensor.h"

namespace divkit::cuda {

struct Placement {
  Device device = Device::cpu;
  int32_t index = 0;
};

using NamedView = std::pair<const char*, const TensorView*>;

// The device of the call: that of every given (defined) view. Throws Error naming `fn`, the
// first argument that differs and both devices ("cpu", "cuda:1") when they are not all on one.
Placement placement(const char* fn, std::initializer_list<NamedView> views);

// check::view of every given view (its layout, dtype and device codes), then placement(): for a
// dispatch that runs before the family's own checks, so that a malformed view is named as such.
Placement checked_placement(const char* fn, std::initializer_list<NamedView> views);

// "cpu" or "cuda:<index>".
std::string device_string(const TensorView& t);

// The view marked as a CPU view, for the argument checks that look only at shapes, dtypes and
// strides (check::float_matrix and friends reject other devices before reading anything).
inline TensorView shape_only(TensorView t) {
  t.device = Device::cpu;
  return t;
}

// Throws Error "<fn>: divkit was built without CUDA".
[[noreturn]] void not_built(const char* fn);

}  // namespace divkit::cuda
