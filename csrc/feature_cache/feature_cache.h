// Pack / unpack of backbone feature maps into per-sample storage slabs (the feature cache's
// kernels). Layout and semantics: dbf_ext/cache/layout.py, which computes the offsets passed
// here; this file only moves and converts values.
//
// A sample's slab holds, for each level l, its C_l x H_l x W_l values in the storage format
// (contiguous, channel-major) at byte `slab_offset`, and, for float8 storage, one float32
// scale per channel at byte `scale_offset`: value = decoded float8 * scale, with
// scale = max|x| / 448 over the channel's H x W values (1 for an all-zero channel).
#pragma once
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common/element_formats.h"
#include "common/float_codecs.h"
#include "common/macros.h"
#include "common/types.h"

namespace dbf_ext {

struct FeatureLevelDesc {
  std::uintptr_t data;  // pack: the (N, C, H, W) input map; unpack: the output map
  std::int64_t channels, height, width;
  std::int64_t stride_n, stride_c, stride_h, stride_w;  // in elements
  std::int64_t slab_offset;   // bytes from a slab's start to this level's values
  std::int64_t scale_offset;  // bytes from a slab's start to its float32 scales (float8 only)
};

struct FeatureCacheArgs {
  std::vector<FeatureLevelDesc> levels;
  DType map_dtype;      // float32, float16 or bfloat16
  DType storage_dtype;  // float32, float16, bfloat16 or float8 e4m3
  std::int64_t batch;
  // Address of an int64 array with one slab start address per sample (host memory for the CPU
  // kernels, device memory for CUDA): slabs need not be contiguous with each other.
  std::uintptr_t slab_addresses;
};

void pack_features_cpu(const FeatureCacheArgs& args, int num_threads);
void unpack_features_cpu(const FeatureCacheArgs& args, int num_threads);
#if defined(DBF_EXT_WITH_CUDA)
void pack_features_cuda(const FeatureCacheArgs& args, int device, std::uintptr_t stream);
void unpack_features_cuda(const FeatureCacheArgs& args, int device, std::uintptr_t stream);
#endif

// The scale of a float8 channel whose largest magnitude is `amax`: maps amax to 448, the
// largest finite float8 e4m3 value. Non-finite or zero amax keeps scale 1 (zeros stay zeros,
// non-finite values saturate or stay NaN). Below amax = 448 * 2^-149 (about 6e-43) the quotient
// would round to 0 and every value would unpack as 0 / 0 = NaN, so the scale is at least the
// smallest float32 subnormal: the values of such a channel keep their order of magnitude (the
// encoder saturates what exceeds 448 after the inexact division).
DBF_HOST_DEVICE float float8_channel_scale(float amax) {
  const bool usable = amax > 0.0f && amax <= 3.4028234663852886e38f;
  if (!usable) return 1.0f;
  const float scale = amax / codecs::kFloat8E4M3Max;
  const float smallest_subnormal = codecs::bits_float(1u);
  return scale < smallest_subnormal ? smallest_subnormal : scale;
}

// One value of a map into the store and back. Plain IEEE division and multiplication: nvcc's
// defaults (-prec-div=true, no fast math) round them exactly like the CPU build.
template <typename Map, typename Store>
DBF_HOST_DEVICE typename Store::bits pack_value(typename Map::bits value, float scale) {
  const float x = Map::decode(value);
  return Store::encode(Store::scaled ? x / scale : x);
}

template <typename Map, typename Store>
DBF_HOST_DEVICE typename Map::bits unpack_value(typename Store::bits stored, float scale) {
  const float x = Store::decode(stored);
  return Map::encode(Store::scaled ? x * scale : x);
}

// Where one channel of a level lies in a sample's slab: its stored values, and (float8) its
// scale. `Byte` is char or const char, and the constness carries over.
template <typename Store, typename Byte>
DBF_HOST_DEVICE auto* channel_values(Byte* slab, const FeatureLevelDesc& level,
                                     std::int64_t channel) {
  using Bits = std::conditional_t<std::is_const<Byte>::value, const typename Store::bits,
                                  typename Store::bits>;
  return reinterpret_cast<Bits*>(slab + level.slab_offset) + channel * level.height * level.width;
}

template <typename Byte>
DBF_HOST_DEVICE auto* channel_scale(Byte* slab, const FeatureLevelDesc& level,
                                    std::int64_t channel) {
  using Scale = std::conditional_t<std::is_const<Byte>::value, const float, float>;
  return reinterpret_cast<Scale*>(slab + level.scale_offset) + channel;
}

// |x| ignoring NaN, for the channel maximum.
DBF_HOST_DEVICE float magnitude_or_zero(float x) {
  const float m = x < 0.0f ? -x : x;
  return m == m ? m : 0.0f;
}

}  // namespace dbf_ext
