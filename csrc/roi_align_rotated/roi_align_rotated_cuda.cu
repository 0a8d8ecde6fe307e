#include <algorithm>

#include "common/cuda_utils.h"
#include "common/element_formats.h"
#include "roi_align_rotated/roi_align_rotated.h"

namespace dbf_ext {
namespace {

using roi_align::BilinearTap;
using roi_align::RoiFrame;

constexpr int kThreads = 256;
// Grid-stride loops: at most this many blocks per launch.
constexpr unsigned int kMaxBlocks = 65536u;

__host__ __device__ std::int64_t output_count(const RoiAlignRotatedGeometry& g) {
  return g.num_rois * g.channels * g.pooled_height * g.pooled_width;
}

// The (roi, channel, ph, pw) coordinates of output value `index` (pw fastest).
struct OutputIndex {
  std::int64_t roi, channel, ph, pw;
  __device__ OutputIndex(std::int64_t index, const RoiAlignRotatedGeometry& g)
      : roi(index / (g.pooled_width * g.pooled_height * g.channels)),
        channel(index / (g.pooled_width * g.pooled_height) % g.channels),
        ph(index / g.pooled_width % g.pooled_height),
        pw(index % g.pooled_width) {}
};

// One thread per output value: the average of its bin's samples, read from its channel's plane.
template <typename Format, typename T>
__global__ void forward_kernel(RoiAlignRotatedForwardArgs args) {
  const RoiAlignRotatedGeometry& g = args.geometry;
  const T* rois = reinterpret_cast<const T*>(g.rois);
  const auto* features = reinterpret_cast<const typename Format::bits*>(args.features);
  T* output = reinterpret_cast<T*>(args.output);
  const std::int64_t total = output_count(g);
  for (std::int64_t index = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
       index < total; index += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const OutputIndex at(index, g);
    const RoiFrame<T> f = roi_align::load_roi(rois, at.roi, g);
    const auto* plane = features + f.batch_index * args.stride_n + at.channel * args.stride_c;
    T sum = T(0);
    roi_align::for_each_bin_tap(
        f, g, at.ph, at.pw, args.stride_h, args.stride_w,
        [&](const BilinearTap<T>& tap) { sum += roi_align::interpolate<Format>(plane, tap); });
    output[index] = sum / f.count;
  }
}

// One thread per output value, adding its share to the map with atomics (order varies).
template <typename T>
__global__ void backward_atomic_kernel(RoiAlignRotatedBackwardArgs args) {
  const RoiAlignRotatedGeometry& g = args.geometry;
  const T* rois = reinterpret_cast<const T*>(g.rois);
  const T* grad_output = reinterpret_cast<const T*>(args.grad_output);
  T* grad_features = reinterpret_cast<T*>(args.grad_features);
  const std::int64_t total = output_count(g);
  for (std::int64_t index = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
       index < total; index += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const OutputIndex at(index, g);
    const RoiFrame<T> f = roi_align::load_roi(rois, at.roi, g);
    if (!f.samples) continue;
    const T share = grad_output[index] / f.count;
    T* plane = grad_features + (f.batch_index * g.channels + at.channel) * g.height * g.width;
    roi_align::for_each_bin_tap(f, g, at.ph, at.pw, g.width, std::int64_t{1},
                                [&](const BilinearTap<T>& tap) {
                                  for (int i = 0; i < 4; ++i) {
                                    atomicAdd(plane + tap.offset[i], share * tap.weight[i]);
                                  }
                                });
  }
}

// One thread per channel, adding the samples of every RoI in the CPU pass's order: no two
// threads write the same value and each value's additions come in one fixed order.
template <typename T>
__global__ void backward_deterministic_kernel(RoiAlignRotatedBackwardArgs args) {
  const RoiAlignRotatedGeometry& g = args.geometry;
  const T* rois = reinterpret_cast<const T*>(g.rois);
  const T* grad_output = reinterpret_cast<const T*>(args.grad_output);
  T* grad_features = reinterpret_cast<T*>(args.grad_features);
  const std::int64_t bins = g.pooled_height * g.pooled_width;
  for (std::int64_t c = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
       c < g.channels; c += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    for (std::int64_t k = 0; k < g.num_rois; ++k) {
      const RoiFrame<T> f = roi_align::load_roi(rois, k, g);
      const T* grad_row = grad_output + (k * g.channels + c) * bins;
      T* plane = grad_features + (f.batch_index * g.channels + c) * g.height * g.width;
      roi_align::for_each_tap(f, g, g.width, std::int64_t{1},
                              [&](std::int64_t ph, std::int64_t pw, const BilinearTap<T>& tap) {
                                const T share = grad_row[ph * g.pooled_width + pw] / f.count;
                                for (int i = 0; i < 4; ++i)
                                  plane[tap.offset[i]] += share * tap.weight[i];
                              });
    }
  }
}

// Threads per block of the deterministic kernel: few channels, so small blocks spread them
// over more multiprocessors.
constexpr int kDeterministicThreads = 32;

unsigned int grid_blocks(std::int64_t n, int threads) {
  return std::min(blocks_for(n, threads), kMaxBlocks);
}

}  // namespace

void roi_align_rotated_forward_cuda(const RoiAlignRotatedForwardArgs& args, int device,
                                    std::uintptr_t stream) {
  const std::int64_t total = output_count(args.geometry);
  if (total == 0) return;
  const DeviceGuard guard(device);
  const cudaStream_t s = as_stream(stream);
  const unsigned int blocks = grid_blocks(total, kThreads);
  formats::dispatch_tensor_float(args.features_dtype, [&](auto format) {
    using Format = decltype(format);
    using T = decltype(Format::decode(typename Format::bits{}));
    forward_kernel<Format, T><<<blocks, kThreads, 0, s>>>(args);
    check_launch("roi_align_rotated forward_kernel");
  });
}

void roi_align_rotated_backward_cuda(const RoiAlignRotatedBackwardArgs& args, bool deterministic,
                                     int device, std::uintptr_t stream) {
  const std::int64_t total = output_count(args.geometry);
  if (total == 0) return;
  const DeviceGuard guard(device);
  const cudaStream_t s = as_stream(stream);
  dispatch_float(args.dtype, [&](auto zero) {
    using T = decltype(zero);
    if (deterministic) {
      const unsigned int blocks = grid_blocks(args.geometry.channels, kDeterministicThreads);
      backward_deterministic_kernel<T><<<blocks, kDeterministicThreads, 0, s>>>(args);
      check_launch("roi_align_rotated backward_deterministic_kernel");
    } else {
      const unsigned int blocks = grid_blocks(total, kThreads);
      backward_atomic_kernel<T><<<blocks, kThreads, 0, s>>>(args);
      check_launch("roi_align_rotated backward_atomic_kernel");
    }
  });
}

}  // namespace dbf_ext
