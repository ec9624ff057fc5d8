// divkit: framework-free tensor views and the library's error type.
//
// The core never sees a framework tensor: callers (the Python module, a C++ user) describe their
// buffers with a TensorView. Shapes and strides are in elements, as in PyTorch and DLPack.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace divkit {

// Thrown for every invalid argument. The message names the argument (and, for non-finite
// logits, the first bad row), e.g. "divergence: temperature must be > 0, got -1".
class Error : public std::invalid_argument {
 public:
  explicit Error(const std::string& what) : std::invalid_argument(what) {}
};

enum class DType : int32_t { f32 = 0, bf16 = 1, f16 = 2, f64 = 3, i32 = 4, i64 = 5 };

// Size of one element in bytes.
size_t dtype_size(DType dtype);
// "float32", "bfloat16", "float16", "float64", "int32", "int64".
const char* dtype_name(DType dtype);

enum class Device : int32_t { cpu = 0, cuda = 1 };
// "cpu" or "cuda".
const char* device_name(Device device);

// Whether this build has the CUDA kernels (DIVKIT_CUDA), and how many CUDA devices the CUDA
// runtime sees (0 when not built, without a driver or without a GPU).
bool cuda_built();
int cuda_device_count();
// The name of CUDA device `index` ("NVIDIA H100 80GB HBM3"), "" when it cannot be queried.
std::string cuda_device_name(int index);

// A non-owning view of a strided tensor of up to kMaxDims dimensions. Every public function
// checks its views before it reads them: ndim in [0, kMaxDims], extents >= 0, element count and
// byte span without int64 overflow, strides >= 0 along dimensions of extent > 1, non-null data
// aligned to the element size when there are elements; it throws Error naming the argument
// otherwise. The memory the view describes must belong to the caller (a view cannot carry its
// buffer's size, so a stride that stays in range but runs past the buffer is not detected).
struct TensorView {
  static constexpr int kMaxDims = 8;

  void* data = nullptr;
  DType dtype = DType::f32;
  Device device = Device::cpu;
  int32_t ndim = 0;
  int64_t shape[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};  // in elements
  int32_t device_index = 0;        // the CUDA device ordinal (0 for cpu)

  // An optional argument is "not given" when its view is default-constructed (ndim == 0).
  bool defined() const { return ndim > 0; }
  // The product of the extents. Throws Error for ndim outside [0, kMaxDims], a negative
  // extent, or a count beyond int64 (every public function checks its views first, with a
  // message naming the argument).
  int64_t numel() const {
    if (ndim < 0 || ndim > kMaxDims)
      throw Error("TensorView::numel: ndim = " + std::to_string(ndim) + " is outside [0, " +
                  std::to_string(kMaxDims) + "]");
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i)
      if (shape[i] == 0) return 0;
    for (int i = 0; i < ndim; ++i) {
      if (shape[i] < 0)
        throw Error("TensorView::numel: negative extent " + std::to_string(shape[i]));
      if (n > INT64_MAX / shape[i])
        throw Error("TensorView::numel: more elements than int64 can count");
      n *= shape[i];
    }
    return n;
  }

  // Contiguous row-major 1-D and 2-D views, the common case for C++ callers.
  static TensorView vector(void* data, DType dtype, int64_t n) {
    TensorView v;
    v.data = data;
    v.dtype = dtype;
    v.ndim = 1;
    v.shape[0] = n;
    v.strides[0] = 1;
    return v;
  }
  // rows x cols with `row_stride` elements between row starts (default: cols).
  static TensorView matrix(void* data, DType dtype, int64_t rows, int64_t cols,
                           int64_t row_stride = -1) {
    TensorView v;
    v.data = data;
    v.dtype = dtype;
    v.ndim = 2;
    v.shape[0] = rows;
    v.shape[1] = cols;
    v.strides[0] = row_stride < 0 ? cols : row_stride;
    v.strides[1] = 1;
    return v;
  }
};

}  // namespace divkit
