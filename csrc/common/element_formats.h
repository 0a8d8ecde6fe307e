// The element formats of the tensors the kernels read and write, each with its bit type and
// exact conversions to and from its compute type (float32; float64 for Float64), shared by the
// CPU and CUDA kernels. `scaled` formats store values divided by a per-channel scale (the
// feature cache's float8 store).
#pragma once
#include <cstdint>
#include <stdexcept>

#include "common/float_codecs.h"
#include "common/macros.h"
#include "common/types.h"

namespace dbf_ext {
namespace formats {

struct Float32 {
  static constexpr bool scaled = false;
  using bits = float;
  static DBF_HOST_DEVICE float decode(float v) { return v; }
  static DBF_HOST_DEVICE float encode(float f) { return f; }
};
struct Float64 {
  static constexpr bool scaled = false;
  using bits = double;
  static DBF_HOST_DEVICE double decode(double v) { return v; }
  static DBF_HOST_DEVICE double encode(double f) { return f; }
};
struct BFloat16 {
  static constexpr bool scaled = false;
  using bits = std::uint16_t;
  static DBF_HOST_DEVICE float decode(bits v) { return codecs::bfloat16_to_float(v); }
  static DBF_HOST_DEVICE bits encode(float f) { return codecs::float_to_bfloat16(f); }
};
struct Float16 {
  static constexpr bool scaled = false;
  using bits = std::uint16_t;
  static DBF_HOST_DEVICE float decode(bits v) { return codecs::half_to_float(v); }
  static DBF_HOST_DEVICE bits encode(float f) { return codecs::float_to_half(f); }
};
struct Float8E4M3 {
  static constexpr bool scaled = true;
  using bits = std::uint8_t;
  static DBF_HOST_DEVICE float decode(bits v) { return codecs::float8_e4m3_to_float(v); }
  static DBF_HOST_DEVICE bits encode(float f) { return codecs::float_to_float8_e4m3(f); }
};

// The formats computed in float32: float32 itself and the narrower ones (feature maps and the
// feature cache's stores).
template <typename F>
auto dispatch(DType dtype, F&& fn) {
  switch (dtype) {
    case DType::Float32:
      return fn(Float32{});
    case DType::BFloat16:
      return fn(BFloat16{});
    case DType::Float16:
      return fn(Float16{});
    case DType::Float8E4M3:
      return fn(Float8E4M3{});
    default:
      break;
  }
  throw std::invalid_argument("dbf_ext._C: unsupported dtype for a float32-computed format");
}

// The floating dtypes of torch tensors the operators accept: float32, float64, float16, bfloat16.
template <typename F>
auto dispatch_tensor_float(DType dtype, F&& fn) {
  switch (dtype) {
    case DType::Float32:
      return fn(Float32{});
    case DType::Float64:
      return fn(Float64{});
    case DType::BFloat16:
      return fn(BFloat16{});
    case DType::Float16:
      return fn(Float16{});
    default:
      break;
  }
  throw std::invalid_argument("dbf_ext._C: unsupported tensor dtype");
}

}  // namespace formats
}  // namespace dbf_ext
