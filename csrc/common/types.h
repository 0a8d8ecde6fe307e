// Plain descriptions of the tensors that cross the Python/C++ boundary. The compiled module
// never sees a torch::Tensor: Python passes data pointers, sizes and strides (in elements).
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

namespace dbf_ext {

// Scalar type codes, exported to Python as _C.DTYPE_CODES.
enum class DType : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3, Float8E4M3 = 4 };

inline DType dtype_from_code(int code) {
  if (code < 0 || code > static_cast<int>(DType::Float8E4M3)) {
    throw std::invalid_argument("dbf_ext._C: unsupported dtype code " + std::to_string(code));
  }
  return static_cast<DType>(code);
}

// A (count, 5) array of rotated boxes, possibly strided.
struct BoxArrayView {
  std::uintptr_t data;
  std::int64_t count;
  std::int64_t row_stride;
  std::int64_t col_stride;

  template <typename T>
  const T* ptr() const {
    return reinterpret_cast<const T*>(data);
  }
};

// Dispatches a functor templated on the compute type.
template <typename F>
auto dispatch_float(DType dtype, F&& fn) {
  switch (dtype) {
    case DType::Float32:
      return fn(float{});
    case DType::Float64:
      return fn(double{});
    default:
      break;
  }
  throw std::invalid_argument("dbf_ext._C: unsupported dtype");
}

}  // namespace dbf_ext
