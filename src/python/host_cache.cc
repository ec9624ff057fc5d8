// The host cache (divkit/host_cache.h) for Python: host_cache_tensor hands a cached block to torch
// (or any DLPack consumer) as a DLPack capsule; the consumer's deleter, called by whichever
// thread frees the last reference (with or without the GIL), returns the block to the cache.
#include <Python.h>

#include <cstdint>
#include <new>
#include <string>
#include <vector>

#include "bindings.h"
#include "divkit/host_cache.h"

namespace divkit_py {
namespace {

// DLPack's DLManagedTensor (the unversioned ABI: the capsule name "dltensor").
struct ManagedTensor {
  nb::dlpack::dltensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(ManagedTensor*);
};

struct Owner {
  ManagedTensor managed{};
  std::vector<int64_t> shape, strides;
};

void delete_owner(ManagedTensor* m) {
  auto* owner = static_cast<Owner*>(m->manager_ctx);
  divkit::host_cache_release(m->dl_tensor.data);
  delete owner;
}

// A capsule that was never consumed still owns its tensor ("used_dltensor" once consumed).
void capsule_destructor(PyObject* capsule) {
  if (PyCapsule_IsValid(capsule, "dltensor")) {
    auto* m = static_cast<ManagedTensor*>(PyCapsule_GetPointer(capsule, "dltensor"));
    if (m != nullptr && m->deleter != nullptr) m->deleter(m);
  } else {
    PyErr_Clear();
  }
}

nb::dlpack::dtype parse_dtype(const std::string& name, size_t& size) {
  nb::dlpack::dtype dt;
  dt.lanes = 1;
  using nb::dlpack::dtype_code;
  if (name == "float32") {
    dt.code = static_cast<uint8_t>(dtype_code::Float), dt.bits = 32;
  } else if (name == "float64") {
    dt.code = static_cast<uint8_t>(dtype_code::Float), dt.bits = 64;
  } else if (name == "float16") {
    dt.code = static_cast<uint8_t>(dtype_code::Float), dt.bits = 16;
  } else if (name == "bfloat16") {
    dt.code = static_cast<uint8_t>(dtype_code::Bfloat), dt.bits = 16;
  } else {
    fail("host_cache_tensor: dtype must be float32, float64, float16 or bfloat16, got '" + name +
         "'");
  }
  size = dt.bits / 8;
  return dt;
}

nb::object host_cache_tensor(const std::vector<int64_t>& shape, const std::string& dtype) {
  size_t elem = 0;
  const nb::dlpack::dtype dt = parse_dtype(dtype, elem);
  if (shape.empty() || shape.size() > static_cast<size_t>(divkit::TensorView::kMaxDims))
    fail("host_cache_tensor: shape must have 1 to " + std::to_string(divkit::TensorView::kMaxDims) +
         " dimensions");
  size_t bytes = elem;
  for (int64_t d : shape) {
    if (d <= 0) fail("host_cache_tensor: every extent of shape must be positive");
    if (bytes > (size_t{1} << 62) / static_cast<size_t>(d)) throw std::bad_alloc();
    bytes *= static_cast<size_t>(d);
  }
  auto* owner = new Owner;
  owner->shape = shape;
  owner->strides.assign(shape.size(), 1);
  for (size_t i = shape.size() - 1; i > 0; --i)
    owner->strides[i - 1] = owner->strides[i] * shape[i];
  divkit::HostBlock block;
  try {
    block = divkit::host_cache_acquire(bytes);
  } catch (...) {
    delete owner;
    throw;
  }
  ManagedTensor& m = owner->managed;
  m.dl_tensor.data = block.data;
  m.dl_tensor.device = {nb::device::cpu::value, 0};
  m.dl_tensor.ndim = static_cast<int32_t>(shape.size());
  m.dl_tensor.dtype = dt;
  m.dl_tensor.shape = owner->shape.data();
  m.dl_tensor.strides = owner->strides.data();
  m.dl_tensor.byte_offset = 0;
  m.manager_ctx = owner;
  m.deleter = &delete_owner;
  PyObject* capsule = PyCapsule_New(&m, "dltensor", &capsule_destructor);
  if (capsule == nullptr) {
    delete_owner(&m);
    throw nb::python_error();
  }
  return nb::steal(capsule);
}

}  // namespace

void register_host_cache(nb::module_& m) {
  m.def("host_cache_tensor", &host_cache_tensor, nb::arg("shape"), nb::arg("dtype"),
        "A C-contiguous CPU array from the host cache, as a DLPack capsule (torch.from_dlpack); "
        "its block returns to the cache when the consumer frees it.");
  m.def("host_cache_limit", &divkit::host_cache_limit,
        "The bound on the bytes of free blocks the host cache keeps.");
  m.def("set_host_cache_limit", &divkit::set_host_cache_limit, nb::arg("bytes"),
        "Sets the bound (0 turns caching off) and unmaps free blocks beyond it.");
  m.def("host_cache_empty", &divkit::host_cache_empty,
        "Unmaps every free block of the host cache; returns the bytes given back.");
  m.def(
      "host_cache_stats",
      [] {
        const divkit::HostCacheStats s = divkit::host_cache_stats();
        nb::dict d;
        d["limit_bytes"] = s.limit_bytes;
        d["cached_bytes"] = s.cached_bytes;
        d["cached_blocks"] = s.cached_blocks;
        d["in_use_bytes"] = s.in_use_bytes;
        d["in_use_blocks"] = s.in_use_blocks;
        d["hits"] = s.hits;
        d["misses"] = s.misses;
        d["unmapped_blocks"] = s.unmapped_blocks;
        d["unmapped_bytes"] = s.unmapped_bytes;
        return d;
      },
      "The host cache's sizes and counters.");
}

}  // namespace divkit_py
