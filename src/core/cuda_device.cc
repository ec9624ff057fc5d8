#include "core/cuda_device.h"

#include <string>

#include "core/check.h"

namespace divkit {

const char* device_name(Device device) {
  switch (device) {
    case Device::cpu: return "cpu";
    case Device::cuda: return "cuda";
  }
  return "unknown";
}

#if !DIVKIT_HAS_CUDA
// The CUDA build defines these in cuda_runtime.cu.
bool cuda_built() { return false; }
int cuda_device_count() { return 0; }
std::string cuda_device_name(int) { return {}; }
#endif

namespace cuda {

std::string device_string(const TensorView& t) {
  if (t.device == Device::cpu) return "cpu";
  return std::string(device_name(t.device)) + ":" + std::to_string(t.device_index);
}

Placement placement(const char* fn, std::initializer_list<NamedView> views) {
  const NamedView* first = nullptr;
  for (const NamedView& nv : views) {
    const TensorView& t = *nv.second;
    if (!t.defined()) continue;
    if (first == nullptr) {
      first = &nv;
      continue;
    }
    const TensorView& f = *first->second;
    if (t.device != f.device || (t.device != Device::cpu && t.device_index != f.device_index))
      throw Error(std::string(fn) + ": " + nv.first + " is on " + device_string(t) + " but " +
                  first->first + " is on " + device_string(f) +
                  "; every tensor of a call must be on one device");
  }
  if (first == nullptr) return {};
  return {first->second->device, first->second->device_index};
}

Placement checked_placement(const char* fn, std::initializer_list<NamedView> views) {
  for (const NamedView& nv : views) check::view(fn, nv.first, *nv.second);
  return placement(fn, views);
}

void not_built(const char* fn) { throw Error(std::string(fn) + ": divkit was built without CUDA"); }

}  // namespace cuda
}  // namespace divkit
