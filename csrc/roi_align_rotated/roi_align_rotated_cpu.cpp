#include <algorithm>
#include <type_traits>
#include <vector>

#include "common/element_formats.h"
#include "common/parallel.h"
#include "roi_align_rotated/roi_align_rotated.h"

namespace dbf_ext {
namespace {

using roi_align::BilinearTap;
using roi_align::RoiFrame;

// The contributing samples of one RoI, bin by bin: the costly geometry is done once per RoI,
// then every channel's plane is read or written at the same taps, in for_each_tap's order.
template <typename T>
struct RoiTaps {
  std::vector<BilinearTap<T>> taps;
  std::vector<std::int64_t> bin_end;  // the taps of bin b are [bin_end[b - 1], bin_end[b])

  void collect(const RoiFrame<T>& f, const RoiAlignRotatedGeometry& g, std::int64_t stride_h,
               std::int64_t stride_w) {
    const std::int64_t bins = g.pooled_height * g.pooled_width;
    taps.clear();
    bin_end.assign(static_cast<size_t>(bins), 0);
    roi_align::for_each_tap(
        f, g, stride_h, stride_w, [&](std::int64_t ph, std::int64_t pw, const BilinearTap<T>& tap) {
          taps.push_back(tap);
          bin_end[ph * g.pooled_width + pw] = static_cast<std::int64_t>(taps.size());
        });
    // A bin without a contributing sample ends where the previous one did.
    for (std::int64_t b = 1; b < bins; ++b) bin_end[b] = std::max(bin_end[b], bin_end[b - 1]);
  }
};

// Channels are handled kChannelBlock at a time: their sums are independent chains of additions
// the processor overlaps (one channel alone waits on each addition). Each value's arithmetic is
// the same whatever the blocking.
constexpr std::int64_t kChannelBlock = 4;

// Calls block_fn(std::integral_constant<int, n>, first channel) over [begin, end) in blocks of
// kChannelBlock channels, then single channels.
template <typename BlockFn>
void for_channel_blocks(std::int64_t begin, std::int64_t end, const BlockFn& block_fn) {
  std::int64_t c = begin;
  for (; c + kChannelBlock <= end; c += kChannelBlock) {
    block_fn(std::integral_constant<int, kChannelBlock>{}, c);
  }
  for (; c < end; ++c) block_fn(std::integral_constant<int, 1>{}, c);
}

// The bins of channels [0, N) of one RoI: planes and outputs of channel j at plane + j *
// plane_stride and out + j * bins.
template <int N, typename Format, typename T>
void pool_channels(const RoiTaps<T>& roi_taps, const typename Format::bits* plane,
                   std::int64_t plane_stride, T* out, std::int64_t bins, T count) {
  std::int64_t t = 0;
  for (std::int64_t b = 0; b < bins; ++b) {
    T sum[N] = {};
    for (; t < roi_taps.bin_end[b]; ++t) {
      const BilinearTap<T>& tap = roi_taps.taps[t];
      for (int j = 0; j < N; ++j) {
        sum[j] += roi_align::interpolate<Format>(plane + j * plane_stride, tap);
      }
    }
    for (int j = 0; j < N; ++j) out[j * bins + b] = sum[j] / count;
  }
}

// Threads take whole RoIs.
template <typename Format>
void forward(const RoiAlignRotatedForwardArgs& args, int num_threads) {
  using T = decltype(Format::decode(typename Format::bits{}));
  const RoiAlignRotatedGeometry& g = args.geometry;
  const T* rois = reinterpret_cast<const T*>(g.rois);
  const auto* features = reinterpret_cast<const typename Format::bits*>(args.features);
  T* output = reinterpret_cast<T*>(args.output);
  const std::int64_t bins = g.pooled_height * g.pooled_width;
  parallel_for(g.num_rois, 1, num_threads, [&](std::int64_t begin, std::int64_t end) {
    RoiTaps<T> roi_taps;
    for (std::int64_t k = begin; k < end; ++k) {
      const RoiFrame<T> f = roi_align::load_roi(rois, k, g);
      roi_taps.collect(f, g, args.stride_h, args.stride_w);
      for_channel_blocks(0, g.channels, [&](auto block, std::int64_t c) {
        pool_channels<decltype(block)::value, Format>(
            roi_taps, features + f.batch_index * args.stride_n + c * args.stride_c, args.stride_c,
            output + (k * g.channels + c) * bins, bins, f.count);
      });
    }
  });
}

// Adds one RoI's share to channels [0, N): gradient rows of channel j at grad_row + j * bins,
// planes at plane + j * plane_size.
template <int N, typename T>
void spread_channels(const RoiTaps<T>& roi_taps, const T* grad_row, T* plane,
                     std::int64_t plane_size, std::int64_t bins, T count) {
  std::int64_t t = 0;
  for (std::int64_t b = 0; b < bins; ++b) {
    T share[N];
    for (int j = 0; j < N; ++j) share[j] = grad_row[j * bins + b] / count;
    for (; t < roi_taps.bin_end[b]; ++t) {
      const BilinearTap<T>& tap = roi_taps.taps[t];
      for (int j = 0; j < N; ++j) {
        for (int i = 0; i < 4; ++i)
          plane[j * plane_size + tap.offset[i]] += share[j] * tap.weight[i];
      }
    }
  }
}

// Threads take disjoint ranges of channels (no two write the same value); within a range the
// RoIs are visited in order, so each value's additions come in one order whatever the split.
template <typename T>
void backward(const RoiAlignRotatedBackwardArgs& args, int num_threads) {
  const RoiAlignRotatedGeometry& g = args.geometry;
  const T* rois = reinterpret_cast<const T*>(g.rois);
  const T* grad_output = reinterpret_cast<const T*>(args.grad_output);
  T* grad_features = reinterpret_cast<T*>(args.grad_features);
  const std::int64_t bins = g.pooled_height * g.pooled_width;
  const std::int64_t plane_size = g.height * g.width;
  const std::int64_t threads = std::max(num_threads, 1);
  // One range per thread: each range repeats every RoI's geometry, and the work per channel is
  // uniform, so the fewest ranges balance best.
  const std::int64_t grain = (g.channels + threads - 1) / threads;
  parallel_for(g.channels, grain, num_threads, [&](std::int64_t begin, std::int64_t end) {
    RoiTaps<T> roi_taps;
    for (std::int64_t k = 0; k < g.num_rois; ++k) {
      const RoiFrame<T> f = roi_align::load_roi(rois, k, g);
      roi_taps.collect(f, g, g.width, 1);
      if (roi_taps.taps.empty()) continue;
      for_channel_blocks(begin, end, [&](auto block, std::int64_t c) {
        spread_channels<decltype(block)::value>(
            roi_taps, grad_output + (k * g.channels + c) * bins,
            grad_features + (f.batch_index * g.channels + c) * plane_size, plane_size, bins,
            f.count);
      });
    }
  });
}

}  // namespace

void roi_align_rotated_forward_cpu(const RoiAlignRotatedForwardArgs& args, int num_threads) {
  formats::dispatch_tensor_float(
      args.features_dtype, [&](auto format) { forward<decltype(format)>(args, num_threads); });
}

void roi_align_rotated_backward_cpu(const RoiAlignRotatedBackwardArgs& args, int num_threads) {
  dispatch_float(args.dtype, [&](auto zero) { backward<decltype(zero)>(args, num_threads); });
}

}  // namespace dbf_ext
