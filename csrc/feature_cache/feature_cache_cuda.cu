#include "feature_cache/feature_cache.h"

#include "common/cuda_utils.h"

namespace dbf_ext {
namespace {

constexpr int kThreads = 256;

// One block per (sample, channel) row of a level; threads stride over the H x W plane, so
// consecutive threads touch consecutive values (coalesced for contiguous maps).
struct RowCoords {
  std::int64_t sample, channel;
  __device__ explicit RowCoords(const FeatureLevelDesc& level)
      : sample(blockIdx.x / level.channels), channel(blockIdx.x % level.channels) {}
};

__device__ std::int64_t map_index(const FeatureLevelDesc& level, const RowCoords& row,
                                  std::int64_t i) {
  const std::int64_t y = i / level.width, x = i % level.width;
  return row.sample * level.stride_n + row.channel * level.stride_c + y * level.stride_h +
         x * level.stride_w;
}

__device__ char* slab_of(const std::int64_t* slab_addresses, std::int64_t sample) {
  return reinterpret_cast<char*>(slab_addresses[sample]);
}

// Largest |x| of the row, reduced over the block.
template <typename Map>
__device__ float row_amax(const FeatureLevelDesc& level, const RowCoords& row,
                          const typename Map::bits* src) {
  __shared__ float warp_max[kThreads / 32];
  const std::int64_t plane = level.height * level.width;
  float amax = 0.0f;
  for (std::int64_t i = threadIdx.x; i < plane; i += blockDim.x) {
    amax = fmaxf(amax, magnitude_or_zero(Map::decode(src[map_index(level, row, i)])));
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    amax = fmaxf(amax, __shfl_down_sync(0xffffffffu, amax, offset));
  }
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = amax;
  __syncthreads();
  if (threadIdx.x < 32) {
    amax = threadIdx.x < blockDim.x / 32 ? warp_max[threadIdx.x] : 0.0f;
    for (int offset = 16; offset > 0; offset /= 2) {
      amax = fmaxf(amax, __shfl_down_sync(0xffffffffu, amax, offset));
    }
    if (threadIdx.x == 0) warp_max[0] = amax;
  }
  __syncthreads();
  return warp_max[0];
}

template <typename Map, typename Store>
__global__ void pack_kernel(FeatureLevelDesc level, const std::int64_t* slab_addresses) {
  const RowCoords row(level);
  const auto* src = reinterpret_cast<const typename Map::bits*>(level.data);
  char* slab = slab_of(slab_addresses, row.sample);
  const std::int64_t plane = level.height * level.width;
  auto* dst = channel_values<Store>(slab, level, row.channel);
  float scale = 1.0f;
  if (Store::scaled) {
    scale = float8_channel_scale(row_amax<Map>(level, row, src));
    if (threadIdx.x == 0) *channel_scale(slab, level, row.channel) = scale;
  }
  for (std::int64_t i = threadIdx.x; i < plane; i += blockDim.x) {
    dst[i] = pack_value<Map, Store>(src[map_index(level, row, i)], scale);
  }
}

template <typename Map, typename Store>
__global__ void unpack_kernel(FeatureLevelDesc level, const std::int64_t* slab_addresses) {
  const RowCoords row(level);
  auto* out = reinterpret_cast<typename Map::bits*>(level.data);
  const char* slab = slab_of(slab_addresses, row.sample);
  const std::int64_t plane = level.height * level.width;
  const auto* src = channel_values<Store>(slab, level, row.channel);
  const float scale = Store::scaled ? *channel_scale(slab, level, row.channel) : 1.0f;
  for (std::int64_t i = threadIdx.x; i < plane; i += blockDim.x) {
    out[map_index(level, row, i)] = unpack_value<Map, Store>(src[i], scale);
  }
}

template <bool kPack>
void launch_all(const FeatureCacheArgs& args, int device, std::uintptr_t stream_handle) {
  if (args.batch == 0) return;
  const DeviceGuard guard(device);
  const cudaStream_t stream = as_stream(stream_handle);
  const auto* addresses = reinterpret_cast<const std::int64_t*>(args.slab_addresses);
  formats::dispatch(args.map_dtype, [&](auto map) {
    formats::dispatch(args.storage_dtype, [&](auto store) {
      using Map = decltype(map);
      using Store = decltype(store);
      for (const FeatureLevelDesc& level : args.levels) {
        const unsigned int rows = blocks_for(args.batch * level.channels, 1);
        if (args.batch * level.channels == 0) continue;
        if (kPack) {
          pack_kernel<Map, Store><<<rows, kThreads, 0, stream>>>(level, addresses);
          check_launch("feature_cache pack_kernel");
        } else {
          unpack_kernel<Map, Store><<<rows, kThreads, 0, stream>>>(level, addresses);
          check_launch("feature_cache unpack_kernel");
        }
      }
    });
  });
}

}  // namespace

void pack_features_cuda(const FeatureCacheArgs& args, int device, std::uintptr_t stream) {
  launch_all<true>(args, device, stream);
}

void unpack_features_cuda(const FeatureCacheArgs& args, int device, std::uintptr_t stream) {
  launch_all<false>(args, device, stream);
}

}  // namespace dbf_ext
