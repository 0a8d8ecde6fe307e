#include "feature_cache/feature_cache.h"

#include <algorithm>

#include "common/parallel.h"

namespace dbf_ext {
namespace {

// One (sample, channel) row of a level: H x W values between the map and the slab.
struct Row {
  const FeatureLevelDesc* level;
  std::int64_t sample, channel;

  std::int64_t map_index(std::int64_t y, std::int64_t x) const {
    return sample * level->stride_n + channel * level->stride_c + y * level->stride_h +
           x * level->stride_w;
  }
};

template <typename Fn>
void for_each_row(const FeatureCacheArgs& args, int num_threads, const Fn& fn) {
  for (const FeatureLevelDesc& level : args.levels) {
    const std::int64_t rows = args.batch * level.channels;
    const std::int64_t plane = std::max<std::int64_t>(1, level.height * level.width);
    parallel_for(rows, std::max<std::int64_t>(1, 32768 / plane), num_threads,
                 [&](std::int64_t begin, std::int64_t end) {
                   for (std::int64_t r = begin; r < end; ++r) {
                     fn(Row{&level, r / level.channels, r % level.channels});
                   }
                 });
  }
}

char* slab_of(const FeatureCacheArgs& args, std::int64_t sample) {
  return reinterpret_cast<char*>(
      reinterpret_cast<const std::int64_t*>(args.slab_addresses)[sample]);
}

template <typename Map, typename Store>
void pack(const FeatureCacheArgs& args, int num_threads) {
  for_each_row(args, num_threads, [&](const Row& row) {
    const FeatureLevelDesc& level = *row.level;
    const auto* src = reinterpret_cast<const typename Map::bits*>(level.data);
    char* slab = slab_of(args, row.sample);
    auto* dst = channel_values<Store>(slab, level, row.channel);
    float scale = 1.0f;
    if (Store::scaled) {
      float amax = 0.0f;
      for (std::int64_t y = 0; y < level.height; ++y)
        for (std::int64_t x = 0; x < level.width; ++x)
          amax = std::max(amax, magnitude_or_zero(Map::decode(src[row.map_index(y, x)])));
      scale = float8_channel_scale(amax);
      *channel_scale(slab, level, row.channel) = scale;
    }
    for (std::int64_t y = 0; y < level.height; ++y)
      for (std::int64_t x = 0; x < level.width; ++x)
        dst[y * level.width + x] = pack_value<Map, Store>(src[row.map_index(y, x)], scale);
  });
}

template <typename Map, typename Store>
void unpack(const FeatureCacheArgs& args, int num_threads) {
  for_each_row(args, num_threads, [&](const Row& row) {
    const FeatureLevelDesc& level = *row.level;
    auto* out = reinterpret_cast<typename Map::bits*>(level.data);
    const char* slab = slab_of(args, row.sample);
    const auto* src = channel_values<Store>(slab, level, row.channel);
    const float scale = Store::scaled ? *channel_scale(slab, level, row.channel) : 1.0f;
    for (std::int64_t y = 0; y < level.height; ++y)
      for (std::int64_t x = 0; x < level.width; ++x)
        out[row.map_index(y, x)] = unpack_value<Map, Store>(src[y * level.width + x], scale);
  });
}

}  // namespace

void pack_features_cpu(const FeatureCacheArgs& args, int num_threads) {
  formats::dispatch(args.map_dtype, [&](auto map) {
    formats::dispatch(args.storage_dtype,
                      [&](auto store) { pack<decltype(map), decltype(store)>(args, num_threads); });
  });
}

void unpack_features_cpu(const FeatureCacheArgs& args, int num_threads) {
  formats::dispatch(args.map_dtype, [&](auto map) {
    formats::dispatch(args.storage_dtype, [&](auto store) {
      unpack<decltype(map), decltype(store)>(args, num_threads);
    });
  });
}

}  // namespace dbf_ext
