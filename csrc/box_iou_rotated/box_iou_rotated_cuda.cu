#include "box_iou_rotated/box_iou_rotated.h"

#include <algorithm>

#include "common/cuda_utils.h"
#include "common/geometry.h"

namespace dbf_ext {
namespace {

using geometry::PreparedBox;

// Pairwise tile: 32 columns (boxes2) x kRowsPerBlock rows (boxes1). Boxes are prepared
// (validity, sin/cos, bounds) once per tile into shared memory, not once per pair; a warp
// writes 32 consecutive outputs of a row (coalesced).
constexpr int kTileCols = 32;
constexpr int kThreadRows = 8;
constexpr int kRowsPerBlock = 64;

template <typename T>
__global__ void pairwise_kernel(const T* __restrict__ boxes1, long long n, long long s1r,
                                long long s1c, const T* __restrict__ boxes2, long long m,
                                long long s2r, long long s2c, T* __restrict__ out, bool iof,
                                bool clockwise) {
  __shared__ PreparedBox<T> tile1[kRowsPerBlock];
  __shared__ PreparedBox<T> tile2[kTileCols];
  const long long col0 = static_cast<long long>(blockIdx.x) * kTileCols;
  const int tid = threadIdx.y * kTileCols + threadIdx.x;
  if (tid < kTileCols && col0 + tid < m) {
    tile2[tid] = geometry::load_box(boxes2, col0 + tid, s2r, s2c, clockwise);
  }
  const long long j = col0 + threadIdx.x;
  for (long long row0 = static_cast<long long>(blockIdx.y) * kRowsPerBlock; row0 < n;
       row0 += static_cast<long long>(gridDim.y) * kRowsPerBlock) {
    __syncthreads();  // tile1 of the previous iteration is no longer read
    if (tid < kRowsPerBlock && row0 + tid < n) {
      tile1[tid] = geometry::load_box(boxes1, row0 + tid, s1r, s1c, clockwise);
    }
    __syncthreads();
    if (j < m) {
      for (int r = threadIdx.y; r < kRowsPerBlock && row0 + r < n; r += kThreadRows) {
        out[(row0 + r) * m + j] = geometry::overlap_ratio(tile1[r], tile2[threadIdx.x], iof);
      }
    }
  }
}

template <typename T>
__global__ void aligned_kernel(const T* __restrict__ boxes1, long long s1r, long long s1c,
                               const T* __restrict__ boxes2, long long s2r, long long s2c,
                               long long n, T* __restrict__ out, bool iof, bool clockwise) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const PreparedBox<T> a = geometry::load_box(boxes1, i, s1r, s1c, clockwise);
    const PreparedBox<T> b = geometry::load_box(boxes2, i, s2r, s2c, clockwise);
    out[i] = geometry::overlap_ratio(a, b, iof);
  }
}

template <typename T>
void launch(const BoxIouRotatedArgs& args, cudaStream_t stream) {
  const auto& b1 = args.boxes1;
  const auto& b2 = args.boxes2;
  T* out = reinterpret_cast<T*>(args.out);
  if (args.aligned) {
    constexpr int threads = 256;
    const unsigned int blocks = std::min(blocks_for(b1.count, threads), 65536u);  // grid-stride
    aligned_kernel<T><<<blocks, threads, 0, stream>>>(b1.ptr<T>(), b1.row_stride, b1.col_stride,
                                                      b2.ptr<T>(), b2.row_stride, b2.col_stride,
                                                      b1.count, out, args.iof, args.clockwise);
    check_launch("box_iou_rotated aligned_kernel");
    return;
  }
  const dim3 block(kTileCols, kThreadRows);
  const unsigned int row_blocks = blocks_for(b1.count, kRowsPerBlock);
  const dim3 grid(blocks_for(b2.count, kTileCols), row_blocks < 65535u ? row_blocks : 65535u);
  pairwise_kernel<T><<<grid, block, 0, stream>>>(
      b1.ptr<T>(), b1.count, b1.row_stride, b1.col_stride, b2.ptr<T>(), b2.count, b2.row_stride,
      b2.col_stride, out, args.iof, args.clockwise);
  check_launch("box_iou_rotated pairwise_kernel");
}

}  // namespace

void box_iou_rotated_cuda(const BoxIouRotatedArgs& args, int device, std::uintptr_t stream) {
  if (args.boxes1.count == 0 || (!args.aligned && args.boxes2.count == 0)) return;
  const DeviceGuard guard(device);
  const cudaStream_t s = as_stream(stream);
  dispatch_float(args.dtype, [&](auto zero) { launch<decltype(zero)>(args, s); });
}

}  // namespace dbf_ext
