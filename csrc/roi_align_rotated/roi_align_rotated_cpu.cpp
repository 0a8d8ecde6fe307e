#include <algorithm>
#include <vector>

#include "common/element_formats.h"
#include "common/parallel.h"
#include "roi_align_rotated/roi_align_rotated.h"

namespace dbf_ext {
namespace {

using roi_align::BilinearTap;
using roi_align::RoiFrame;

// Threads take whole RoIs. A RoI's taps (the costly geometry) are computed once, then every
// channel reads its plane at them.
template <typename Format>
void forward(const RoiAlignRotatedForwardArgs& args, int num_threads) {
  using T = decltype(Format::decode(typename Format::bits{}));
  const RoiAlignRotatedGeometry& g = args.geometry;
  const T* rois = reinterpret_cast<const T*>(g.rois);
  const auto* features = reinterpret_cast<const typename Format::bits*>(args.features);
  T* output = reinterpret_cast<T*>(args.output);
  const std::int64_t bins = g.pooled_height * g.pooled_width;
  parallel_for(g.num_rois, 1, num_threads, [&](std::int64_t begin, std::int64_t end) {
    std::vector<BilinearTap<T>> taps;
    std::vector<std::int64_t> bin_end(static_cast<size_t>(bins));  // taps of bin b end here
    for (std::int64_t k = begin; k < end; ++k) {
      const RoiFrame<T> f = roi_align::load_roi(rois, k, g);
      taps.clear();
      std::fill(bin_end.begin(), bin_end.end(), 0);
      roi_align::for_each_tap(f, g, args.stride_h, args.stride_w,
                              [&](std::int64_t ph, std::int64_t pw, const BilinearTap<T>& tap) {
                                taps.push_back(tap);
                                bin_end[ph * g.pooled_width + pw] =
                                    static_cast<std::int64_t>(taps.size());
                              });
      // Bins without a contributing sample end where the previous one did.
      for (std::int64_t b = 1; b < bins; ++b) bin_end[b] = std::max(bin_end[b], bin_end[b - 1]);
      for (std::int64_t c = 0; c < g.channels; ++c) {
        const auto* plane = features + f.batch_index * args.stride_n + c * args.stride_c;
        T* out = output + (k * g.channels + c) * bins;
        std::int64_t t = 0;
        for (std::int64_t b = 0; b < bins; ++b) {
          T sum = T(0);
          for (; t < bin_end[b]; ++t) sum += roi_align::interpolate<Format>(plane, taps[t]);
          out[b] = sum / f.count;
        }
      }
    }
  });
}

template <typename T>
void backward(const RoiAlignRotatedBackwardArgs& args, int num_threads) {
  const std::int64_t channels = args.geometry.channels;
  const std::int64_t threads = std::max(num_threads, 1);
  // One chunk of channels per thread: each chunk repeats the geometry of every RoI, so fewer,
  // larger chunks are cheaper; the per-channel work is uniform, so they balance.
  const std::int64_t grain = (channels + threads - 1) / threads;
  parallel_for(channels, grain, num_threads, [&](std::int64_t begin, std::int64_t end) {
    roi_align::accumulate_channel_gradients<T>(args, begin, end);
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
