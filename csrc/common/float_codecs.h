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

// ---- narrow floats: float16 (IEEE binary16) and float8 e4m3fn ----
//
// Both are sign / exponent / mantissa formats rounded from float32 the same way; they differ in
// their widths and in what the top exponent means (binary16: inf / NaN; e4m3fn: ordinary
// values, with S.1111.111 as NaN, and saturation instead of overflow to infinity).
template <int kExponentBits, int kMantissaBits, bool kIeeeSpecials>
struct NarrowFloat {
  static constexpr int kBits = 1 + kExponentBits + kMantissaBits;
  static constexpr std::uint32_t kBias = (1u << (kExponentBits - 1)) - 1u;
  static constexpr std::uint32_t kShift = 23u - kMantissaBits;  // float32 mantissa bits dropped
  static constexpr std::uint32_t kMaxFiniteCode =
      kIeeeSpecials ? ((1u << kExponentBits) - 2u) << kMantissaBits | ((1u << kMantissaBits) - 1u)
                    : (1u << (kBits - 1)) - 2u;
  static constexpr std::uint32_t kNanCode =
      kIeeeSpecials ? (((1u << kExponentBits) - 1u) << kMantissaBits) | (1u << (kMantissaBits - 1))
                    : (1u << (kBits - 1)) - 1u;
  // float32 bits of the smallest normal value, 2^(1 - bias).
  static constexpr std::uint32_t kMinNormalBits = (127u + 1u - kBias) << 23;
  // float32 bits from which values round past the largest finite one: its value plus half a
  // unit in its last place.
  static constexpr std::uint32_t kOverflowBits =
      ((kMaxFiniteCode >> kMantissaBits) + 127u - kBias) << 23 |
      (kMaxFiniteCode & ((1u << kMantissaBits) - 1u)) << kShift | (1u << (kShift - 1u));

  static DBF_HOST_DEVICE std::uint32_t encode(float f) {
    const std::uint32_t u = float_bits(f);
    const std::uint32_t sign = (u >> 31) << (kBits - 1);
    const std::uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | kNanCode;
    if (a >= kOverflowBits) {  // infinity (binary16) or saturation (e4m3fn)
      return sign | (kIeeeSpecials ? (kMaxFiniteCode + 1u) : kMaxFiniteCode);
    }
    if (a < kMinNormalBits) {
      // Subnormal: in units of the smallest subnormal, 2^(1 - bias - mantissa bits), the value
      // is the 24-bit mantissa shifted right by `drop`, rounded to nearest even. A result of
      // 2^mantissa bits is the smallest normal, which has the same encoding.
      const std::uint32_t drop = 151u - kBias - kMantissaBits - (a >> 23);
      if (drop > 24u) return sign;  // below half the smallest subnormal
      return sign | shift_right_rounded((a & 0x7fffffu) | 0x800000u, drop);
    }
    // Normal: round the mantissa (ties to even); a carry moves into the exponent, which is
    // the correct result. Then rebias the exponent.
    const std::uint32_t rounded = a + ((1u << (kShift - 1u)) - 1u) + ((a >> kShift) & 1u);
    return sign | ((rounded >> kShift) - ((127u - kBias) << kMantissaBits));
  }

  static DBF_HOST_DEVICE float decode(std::uint32_t code) {
    const std::uint32_t sign = ((code >> (kBits - 1)) & 1u) << 31;
    const std::uint32_t exponent = (code >> kMantissaBits) & ((1u << kExponentBits) - 1u);
    const std::uint32_t mantissa = code & ((1u << kMantissaBits) - 1u);
    if (kIeeeSpecials && exponent == (1u << kExponentBits) - 1u) {
      // Infinity when the mantissa is 0; otherwise one of the 2 * (2^mantissa bits - 1) NaN
      // codes, whose payload moves into the float32 mantissa with the quiet bit set (what
      // torch's and the hardware's conversions give for every NaN code).
      return bits_float(sign | 0x7f800000u |
                        (mantissa == 0u ? 0u : 0x400000u | (mantissa << kShift)));
    }
    if ((code & ((1u << (kBits - 1)) - 1u)) == kNanCode) return bits_float(sign | 0x7fc00000u);
    if (exponent == 0) {  // subnormal or zero: mantissa * 2^(1 - bias - mantissa bits), exact
      const float unit = bits_float((128u - kBias - kMantissaBits) << 23);
      return bits_float(sign | float_bits(static_cast<float>(mantissa) * unit));
    }
    return bits_float(sign | ((exponent + 127u - kBias) << 23) | (mantissa << kShift));
  }
};

using Half = NarrowFloat<5, 10, true>;
using Float8E4M3 = NarrowFloat<4, 3, false>;

DBF_HOST_DEVICE std::uint16_t float_to_half(float f) {
  return static_cast<std::uint16_t>(Half::encode(f));
}
DBF_HOST_DEVICE float half_to_float(std::uint16_t h) { return Half::decode(h); }
DBF_HOST_DEVICE std::uint8_t float_to_float8_e4m3(float f) {
  return static_cast<std::uint8_t>(Float8E4M3::encode(f));
}
DBF_HOST_DEVICE float float8_e4m3_to_float(std::uint8_t b) { return Float8E4M3::decode(b); }

constexpr float kFloat8E4M3Max = 448.0f;

}  // namespace codecs
}  // namespace dbf_ext
