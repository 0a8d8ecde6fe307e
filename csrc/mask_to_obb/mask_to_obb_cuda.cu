#include <cstdint>

#include "common/cuda_utils.h"
#include "mask_to_obb/mask_to_obb.h"

namespace dbf_ext {
namespace {

// One block per mask (grid-stride over masks): each warp scans rows, its lanes striding over
// the columns and combining first/last set columns by integer shuffles (exact, order-free);
// thread 0 builds the hull; every thread then tries a share of the hull's edges and the block
// keeps the least area, ties to the lowest edge index: the CPU loop's choice.
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ std::int32_t warp_min(std::int32_t v) {
  for (int offset = 16; offset > 0; offset /= 2)
    v = min(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

__device__ std::int32_t warp_max(std::int32_t v) {
  for (int offset = 16; offset > 0; offset /= 2)
    v = max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

template <typename T>
__global__ void mask_to_obb_kernel(const std::uint8_t* __restrict__ masks, long long count,
                                   long long height, long long width,
                                   std::int32_t* __restrict__ row_extents,
                                   std::int32_t* __restrict__ hulls, T* __restrict__ out) {
  __shared__ std::int64_t hull_size;
  __shared__ std::int64_t edges[kThreads];
  __shared__ double areas[kThreads];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const std::int64_t capacity = mask_obb::hull_capacity(height);
  for (long long i = blockIdx.x; i < count; i += gridDim.x) {
    const std::uint8_t* mask = masks + i * height * width;
    std::int32_t* extents = row_extents + i * 2 * height;
    std::int32_t* hull = hulls + i * 2 * capacity;
    for (long long y = warp; y < height; y += kWarps) {
      const std::uint8_t* row = mask + y * width;
      std::int32_t first = INT32_MAX;
      std::int32_t last = -1;
      for (long long x = lane; x < width; x += 32) {
        if (row[x] != 0) {
          first = min(first, static_cast<std::int32_t>(x));
          last = static_cast<std::int32_t>(x);
        }
      }
      first = warp_min(first);
      last = warp_max(last);
      if (lane == 0) {
        extents[2 * y] = last < 0 ? 0 : first;
        extents[2 * y + 1] = last + 1;  // 0 for an empty row
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) hull_size = mask_obb::hull_from_row_extents(extents, height, hull);
    __syncthreads();
    const std::int64_t size = hull_size;
    if (size == 0) {
      if (threadIdx.x == 0) mask_obb::write_empty(out + 5 * i);
      __syncthreads();  // hull_size is rewritten by the next mask
      continue;
    }
    std::int64_t edge = -1;
    double area = 0.0;
    mask_obb::least_area_edge(hull, size, threadIdx.x, kThreads, &edge, &area);
    edges[threadIdx.x] = edge;
    areas[threadIdx.x] = area;
    __syncthreads();
    if (threadIdx.x == 0) {
      std::int64_t best_edge = edges[0];
      double best_area = areas[0];
      for (int t = 1; t < kThreads && edges[t] >= 0; ++t) {
        if (areas[t] < best_area || (areas[t] == best_area && edges[t] < best_edge)) {
          best_edge = edges[t];
          best_area = areas[t];
        }
      }
      mask_obb::write_box(hull, size, best_edge, out + 5 * i);
    }
    __syncthreads();  // edges, areas and hull_size are rewritten by the next mask
  }
}

template <typename T>
void launch(const MaskToObbArgs& args, const MaskToObbCudaScratch& scratch, cudaStream_t stream) {
  const unsigned int mask_blocks = blocks_for(args.count, 1);
  const unsigned int blocks = mask_blocks < 65536u ? mask_blocks : 65536u;  // grid-stride
  mask_to_obb_kernel<T><<<blocks, kThreads, 0, stream>>>(
      reinterpret_cast<const std::uint8_t*>(args.masks), args.count, args.height, args.width,
      reinterpret_cast<std::int32_t*>(scratch.row_extents),
      reinterpret_cast<std::int32_t*>(scratch.hull), reinterpret_cast<T*>(args.out));
  check_launch("mask_to_obb_kernel");
}

}  // namespace

void mask_to_obb_cuda(const MaskToObbArgs& args, const MaskToObbCudaScratch& scratch, int device,
                      std::uintptr_t stream) {
  if (args.count == 0) return;
  const DeviceGuard guard(device);
  const cudaStream_t s = as_stream(stream);
  dispatch_float(args.dtype, [&](auto zero) { launch<decltype(zero)>(args, scratch, s); });
}

}  // namespace dbf_ext
