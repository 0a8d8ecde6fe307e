// Conversions between float32 and the compact floating formats, bit-exact and shared by the
// CPU and CUDA kernels (host+device inline functions, integer arithmetic only, so both builds
// give the same bits).
//
// * bfloat16 and float16: round to nearest, ties to even; identical to torch's `tensor.to()`
//   (NaN becomes the canonical quiet NaN, overflow becomes infinity).
// * float8 e4m3 ("fn": no infinities, largest finite 448, NaN = S.1111.111): round to nearest,
//   ties to even, saturating to +-448 (a feature map never turns into NaN through scaling).
#pragma once

#include <cstdint>
#include <cstring>

#include "common/macros.h"

namespace dbf_ext {
namespace codecs {

DBF_HOST_DEVICE std::uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

DBF_HOST_DEVICE float bits_float(std::uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// value >> drop, rounded to nearest with ties to even (1 <= drop <= 31).
DBF_HOST_DEVICE std::uint32_t shift_right_rounded(std::uint32_t value, std::uint32_t drop) {
  const std::uint32_t kept = value >> drop;
  const std::uint32_t rest = value & ((1u << drop) - 1u);
  const std::uint32_t half = 1u << (drop - 1u);
  return kept + ((rest > half || (rest == half && (kept & 1u))) ? 1u : 0u);
}

// ---- bfloat16 (upper half of a float32) ----

DBF_HOST_DEVICE std::uint16_t float_to_bfloat16(float f) {
  const std::uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  const std::uint32_t rounding_bias = 0x7fffu + ((u >> 16) & 1u);
  return static_cast<std::uint16_t>((u + rounding_bias) >> 16);
}

DBF_HOST_DEVICE float bfloat16_to_float(std::uint16_t h) {
  return bits_float(static_cast<std::uint32_t>(h) << 16);
}

// ---- float16 (IEEE binary16) ----

DBF_HOST_DEVICE std::uint16_t float_to_half(float f) {
  const std::uint32_t u = float_bits(f);
  const std::uint16_t sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
  const std::uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00;        // NaN
  if (a >= 0x477ff000u) return sign | 0x7c00;       // >= 65520 rounds to infinity
  if (a < 0x38800000u) {                            // below 2^-14: half subnormal
    // In units of the smallest subnormal (2^-24) the value is mantissa >> drop, mantissa with
    // its implicit bit; round that shift to nearest, ties to even. A result of 1024 is the
    // smallest normal, which has the same encoding.
    const std::uint32_t drop = 126u - (a >> 23);  // >= 14 in this branch
    if (drop > 24u) return sign;                   // below half the smallest subnormal
    return sign | static_cast<std::uint16_t>(shift_right_rounded((a & 0x7fffffu) | 0x800000u, drop));
  }
  // Normal: round the 23-bit mantissa to 10 bits (ties to even); a carry moves into the
  // exponent, which is the correct result. Rebias the exponent from 127 to 15.
  const std::uint32_t rounded = a + 0xfffu + ((a >> 13) & 1u);
  return sign | static_cast<std::uint16_t>((rounded >> 13) - ((127u - 15u) << 10));
}

DBF_HOST_DEVICE float half_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exponent = (h >> 10) & 0x1fu;
  const std::uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1fu) return bits_float(sign | 0x7f800000u | (mantissa << 13));  // inf/NaN
  if (exponent == 0) {
    // Subnormal (or zero): mantissa * 2^-24, exact in float32.
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-08f;
    return bits_float(sign | float_bits(magnitude));
  }
  return bits_float(sign | ((exponent + (127u - 15u)) << 23) | (mantissa << 13));
}

// ---- float8 e4m3fn ----

constexpr float kFloat8E4M3Max = 448.0f;

DBF_HOST_DEVICE std::uint8_t float_to_float8_e4m3(float f) {
  const std::uint32_t u = float_bits(f);
  const std::uint8_t sign = static_cast<std::uint8_t>((u >> 24) & 0x80u);
  const std::uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7f;  // NaN
  if (a >= 0x43e00000u) return sign | 0x7e; // >= 448 (and inf): saturate to 448
  if (a < 0x3c800000u) {                    // below 2^-6: e4m3 subnormal, units of 2^-9
    const std::uint32_t drop = 141u - (a >> 23);  // >= 21 in this branch
    if (drop > 24u) return sign;                   // below half the smallest subnormal
    // A result of 8 is the smallest normal, which has the same encoding.
    return sign | static_cast<std::uint8_t>(shift_right_rounded((a & 0x7fffffu) | 0x800000u, drop));
  }
  // Normal: round the mantissa to 3 bits (ties to even), rebias the exponent 127 -> 7.
  const std::uint32_t rounded = a + 0x7ffffu + ((a >> 20) & 1u);
  return sign | static_cast<std::uint8_t>((rounded >> 20) - ((127u - 7u) << 3));
}

DBF_HOST_DEVICE float float8_e4m3_to_float(std::uint8_t b) {
  const std::uint32_t sign = static_cast<std::uint32_t>(b & 0x80u) << 24;
  const std::uint32_t exponent = (b >> 3) & 0xfu;
  const std::uint32_t mantissa = b & 0x7u;
  if (exponent == 0xfu && mantissa == 0x7u) return bits_float(sign | 0x7fc00000u);  // NaN
  if (exponent == 0) {
    const float magnitude = static_cast<float>(mantissa) * 0.001953125f;  // 2^-9
    return bits_float(sign | float_bits(magnitude));
  }
  return bits_float(sign | ((exponent + (127u - 7u)) << 23) | (mantissa << 20));
}

}  // namespace codecs
}  // namespace dbf_ext
