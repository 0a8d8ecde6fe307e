// CUDA MaxIoU assignment: the whole batch in one launch per step, no overlap matrix.
//
// Blocks take kBlock consecutive boxes of one image (grid.y walks the images); the image's gts
// pass through shared memory in tiles of kBlock, prepared once per tile. Steps:
//   mark_ignored   (ignore boxes given)  max iof over the ignore boxes -> max_overlaps = -1 / 0
//   first_pass     max overlap and lowest maximising gt per box, threshold assignment, labels;
//                  per-gt maxima by warp max + shared atomicMax + one global atomicMax per tile
//                  (bit patterns of non-negative floats order like the values); first
//                  non-ignored box per image
//   match_all      (low-quality, gt_max_assign_all) recomputes overlaps, bit-identical, and
//                  takes the last gt whose maximum the box reaches
//   first_maximiser + scatter + decode  (low-quality, one box per gt) lowest box index reaching
//                  each gt's maximum (atomicMin, = torch.argmax's first occurrence); each gt then
//                  claims it with atomicMax of an encoding above every threshold result and
//                  ordered by gt, so the last gt wins as in the sequential loop; decode restores
//                  the indices
//   kth_largest    (statistic requested) per-image radix select of max_overlaps
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "assign/assign.h"
#include "assign/assign_common.h"
#include "common/cuda_utils.h"

namespace dbf_ext {
namespace {

using assign::Thresholds;

constexpr int kBlock = 256;
constexpr unsigned int kFullMask = 0xffffffffu;
constexpr unsigned int kMaxGridY = 65535u;

// Non-negative floats as unsigned integers of the same order (atomicMax / warp max on the bits).
template <typename T>
struct FloatBits;
template <>
struct FloatBits<float> {
  using type = unsigned int;
  static __device__ type of(float v) { return __float_as_uint(v); }
  static __device__ float value(type bits) { return __uint_as_float(bits); }
};
template <>
struct FloatBits<double> {
  using type = unsigned long long;
  static __device__ type of(double v) { return static_cast<type>(__double_as_longlong(v)); }
  static __device__ double value(type bits) {
    return __longlong_as_double(static_cast<long long>(bits));
  }
};

__device__ unsigned int warp_max(unsigned int v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return __reduce_max_sync(kFullMask, v);
#else
  for (int offset = 16; offset > 0; offset >>= 1) v = max(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
#endif
}

__device__ unsigned long long warp_max(unsigned long long v) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    const unsigned long long other = __shfl_xor_sync(kFullMask, v, offset);
    v = other > v ? other : v;
  }
  return v;
}

// Every value in [-1, 1] (any float) as an unsigned key of the same order, for radix select.
template <typename T>
struct OrderedKey;
template <>
struct OrderedKey<float> {
  using type = unsigned int;
  static constexpr int kBits = 32;
  static __device__ type of(float v) {
    const type b = __float_as_uint(v);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  }
  static __device__ float value(type key) {
    return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
  }
};
template <>
struct OrderedKey<double> {
  using type = unsigned long long;
  static constexpr int kBits = 64;
  static __device__ type of(double v) {
    const type b = static_cast<type>(__double_as_longlong(v));
    return (b >> 63) ? ~b : (b | (1ull << 63));
  }
  static __device__ double value(type key) {
    const type b = (key >> 63) ? (key & ~(1ull << 63)) : ~key;
    return __longlong_as_double(static_cast<long long>(b));
  }
};

// The arguments as typed device pointers.
template <typename T>
struct Problem {
  const T* boxes;
  long long box_row_stride, box_col_stride;
  const T* gts;
  long long gt_row_stride, gt_col_stride;
  const T* ignore;
  long long ignore_row_stride, ignore_col_stride;
  const long long* box_offsets;
  const long long* gt_offsets;
  const long long* ignore_offsets;  // null: no box is ignored
  long long num_images;
  const long long* gt_labels;  // null: no labels
  Thresholds<T> thr;
  bool ignore_wrt_candidates;
  long long* gt_inds;
  T* max_overlaps;
  long long* labels;  // null: no labels
  typename FloatBits<T>::type* gt_max_bits;
  long long* gt_argmax_box;
  long long* image_first_live;
};

template <typename T>
Problem<T> make_problem(const MaxIouAssignArgs& a) {
  using Offsets = const long long*;
  Problem<T> p;
  p.boxes = a.boxes.ptr<T>();
  p.box_row_stride = a.boxes.row_stride;
  p.box_col_stride = a.boxes.col_stride;
  p.gts = a.gts.ptr<T>();
  p.gt_row_stride = a.gts.row_stride;
  p.gt_col_stride = a.gts.col_stride;
  p.ignore = a.ignore.ptr<T>();
  p.ignore_row_stride = a.ignore.row_stride;
  p.ignore_col_stride = a.ignore.col_stride;
  p.box_offsets = reinterpret_cast<Offsets>(a.box_offsets);
  p.gt_offsets = reinterpret_cast<Offsets>(a.gt_offsets);
  p.ignore_offsets = reinterpret_cast<Offsets>(a.ignore_offsets);
  p.num_images = a.num_images;
  p.gt_labels = reinterpret_cast<const long long*>(a.gt_labels);
  p.thr = Thresholds<T>::from(a.options);
  p.ignore_wrt_candidates = a.options.ignore_wrt_candidates;
  p.gt_inds = reinterpret_cast<long long*>(a.gt_inds);
  p.max_overlaps = reinterpret_cast<T*>(a.max_overlaps);
  p.labels = reinterpret_cast<long long*>(a.labels);
  p.gt_max_bits = reinterpret_cast<typename FloatBits<T>::type*>(a.gt_max);
  p.gt_argmax_box = reinterpret_cast<long long*>(a.gt_argmax_box);
  p.image_first_live = reinterpret_cast<long long*>(a.image_first_live);
  return p;
}

// One image's slices of the packed arrays.
struct ImageSlice {
  long long box_begin, num_boxes, gt_begin, num_gts;
};

template <typename T>
__device__ ImageSlice image_slice(const Problem<T>& p, long long img) {
  return ImageSlice{p.box_offsets[img], p.box_offsets[img + 1] - p.box_offsets[img],
                    p.gt_offsets[img], p.gt_offsets[img + 1] - p.gt_offsets[img]};
}

template <typename T>
__device__ long long label_of(const Problem<T>& p, const ImageSlice& s, long long gt_index) {
  return gt_index > 0 ? p.gt_labels[s.gt_begin + gt_index - 1] : -1;
}

template <typename T>
__device__ T gt_max_value(const Problem<T>& p, const ImageSlice& s, long long gt, bool any_live) {
  // gts of an image whose boxes are all ignored overlap every box by -1.
  return any_live ? FloatBits<T>::value(p.gt_max_bits[s.gt_begin + gt])
                  : assign::ignored_overlap<T>();
}

// Loops of the box-parallel kernels (uniform across a block, so __syncthreads inside is safe).
#define FOR_EACH_IMAGE(img) for (long long img = blockIdx.y; img < p.num_images; img += gridDim.y)
#define FOR_EACH_BOX_TILE(tile, count) \
  for (long long tile = blockIdx.x; tile * kBlock < (count); tile += gridDim.x)

template <typename Kind>
__global__ void __launch_bounds__(kBlock)
    mark_ignored_kernel(const Problem<typename Kind::Scalar> p) {
  using T = typename Kind::Scalar;
  using Box = typename Kind::Box;
  __shared__ Box tile_boxes[kBlock];
  FOR_EACH_IMAGE(img) {
    const ImageSlice s = image_slice(p, img);
    const long long ignore_begin = p.ignore_offsets[img];
    const long long num_ignore = p.ignore_offsets[img + 1] - ignore_begin;
    FOR_EACH_BOX_TILE(tile, s.num_boxes) {
      const long long n = tile * kBlock + threadIdx.x;
      const bool active = n < s.num_boxes;
      Box box{};
      if (active) box = Kind::load(p.boxes, s.box_begin + n, p.box_row_stride, p.box_col_stride);
      T max_iof = T(0);
      for (long long k0 = 0; k0 < num_ignore; k0 += kBlock) {
        __syncthreads();
        if (k0 + threadIdx.x < num_ignore) {
          tile_boxes[threadIdx.x] = Kind::load(p.ignore, ignore_begin + k0 + threadIdx.x,
                                               p.ignore_row_stride, p.ignore_col_stride);
        }
        __syncthreads();
        const int count = static_cast<int>(min(static_cast<long long>(kBlock), num_ignore - k0));
        if (active) {
          for (int j = 0; j < count; ++j) {
            const T iof = p.ignore_wrt_candidates ? Kind::overlap(box, tile_boxes[j], true)
                                                  : Kind::overlap(tile_boxes[j], box, true);
            max_iof = max_iof < iof ? iof : max_iof;
          }
        }
      }
      if (active) {
        p.max_overlaps[s.box_begin + n] =
            max_iof > p.thr.ignore_iof ? assign::ignored_overlap<T>() : T(0);
      }
    }
  }
}

template <typename Kind>
__global__ void __launch_bounds__(kBlock)
    first_pass_kernel(const Problem<typename Kind::Scalar> p, bool has_ignore, bool track_gt_max) {
  using T = typename Kind::Scalar;
  using Box = typename Kind::Box;
  using Bits = typename FloatBits<T>::type;
  __shared__ Box tile_gts[kBlock];
  __shared__ Bits tile_max[kBlock];
  const int lane = threadIdx.x & 31;
  FOR_EACH_IMAGE(img) {
    const ImageSlice s = image_slice(p, img);
    FOR_EACH_BOX_TILE(tile, s.num_boxes) {
      const long long n = tile * kBlock + threadIdx.x;
      const long long i = s.box_begin + n;
      const bool active = n < s.num_boxes;
      const bool ignored = active && s.num_gts > 0 && has_ignore && p.max_overlaps[i] < T(0);
      const bool live = active && s.num_gts > 0 && !ignored;
      Box box{};
      if (live) box = Kind::load(p.boxes, i, p.box_row_stride, p.box_col_stride);
      const unsigned int live_lanes = __ballot_sync(kFullMask, live);
      if (lane == 0 && live_lanes != 0) {
        atomicMin(&p.image_first_live[img], n + __ffs(live_lanes) - 1);
      }
      // Overlaps are >= 0, so (0, gt 0) is the maximum until beaten; the strict comparison
      // keeps the lowest maximising gt.
      T best = T(0);
      long long best_gt = 0;
      for (long long g0 = 0; g0 < s.num_gts; g0 += kBlock) {
        __syncthreads();
        if (g0 + threadIdx.x < s.num_gts) {
          tile_gts[threadIdx.x] =
              Kind::load(p.gts, s.gt_begin + g0 + threadIdx.x, p.gt_row_stride, p.gt_col_stride);
        }
        tile_max[threadIdx.x] = 0;
        __syncthreads();
        const int count = static_cast<int>(min(static_cast<long long>(kBlock), s.num_gts - g0));
        for (int j = 0; j < count; ++j) {
          const T v = live ? Kind::overlap(tile_gts[j], box, false) : T(0);
          if (v > best) {
            best = v;
            best_gt = g0 + j;
          }
          if (track_gt_max && __any_sync(kFullMask, v > T(0))) {
            const Bits warp_best = warp_max(FloatBits<T>::of(v));
            if (lane == 0) atomicMax(&tile_max[j], warp_best);
          }
        }
        __syncthreads();
        if (track_gt_max && threadIdx.x < count && tile_max[threadIdx.x] != 0) {
          atomicMax(&p.gt_max_bits[s.gt_begin + g0 + threadIdx.x], tile_max[threadIdx.x]);
        }
      }
      if (active) {
        // mmdetection: without gts every box is negative with max overlap 0.
        const T mo = s.num_gts == 0 ? T(0) : ignored ? assign::ignored_overlap<T>() : best;
        const long long gt_index =
            s.num_gts == 0 ? 0 : assign::threshold_assignment(mo, ignored ? 0 : best_gt, p.thr);
        p.max_overlaps[i] = mo;
        p.gt_inds[i] = gt_index;
        if (p.labels != nullptr) p.labels[i] = label_of(p, s, gt_index);
      }
    }
  }
}

// Low-quality matches, gt_max_assign_all: box n goes to the last gt g with
// overlap(g, n) == gt_max[g] >= min_pos_iou. A gt whose maximum equals the box's untested
// overlap (0, or -1 for an ignored box) matches without a test; any other match needs
// mo >= gt_max[g] > 0, the only pairs recomputed.
template <typename Kind>
__global__ void __launch_bounds__(kBlock) match_all_kernel(const Problem<typename Kind::Scalar> p) {
  using T = typename Kind::Scalar;
  using Box = typename Kind::Box;
  __shared__ Box tile_gts[kBlock];
  __shared__ T tile_gt_max[kBlock];
  FOR_EACH_IMAGE(img) {
    const ImageSlice s = image_slice(p, img);
    if (s.num_gts == 0) continue;  // uniform across the block
    const bool any_live = p.image_first_live[img] < s.num_boxes;
    FOR_EACH_BOX_TILE(tile, s.num_boxes) {
      const long long n = tile * kBlock + threadIdx.x;
      const long long i = s.box_begin + n;
      const bool active = n < s.num_boxes;
      const T mo = active ? p.max_overlaps[i] : assign::ignored_overlap<T>();
      const bool ignored = mo < T(0);
      const T untested = ignored ? assign::ignored_overlap<T>() : T(0);
      const bool query = active && !ignored && mo > T(0) && mo >= p.thr.min_pos;
      Box box{};
      if (query) box = Kind::load(p.boxes, i, p.box_row_stride, p.box_col_stride);
      long long match = -1;
      for (long long g0 = 0; g0 < s.num_gts; g0 += kBlock) {
        __syncthreads();
        if (g0 + threadIdx.x < s.num_gts) {
          tile_gts[threadIdx.x] =
              Kind::load(p.gts, s.gt_begin + g0 + threadIdx.x, p.gt_row_stride, p.gt_col_stride);
          tile_gt_max[threadIdx.x] = gt_max_value(p, s, g0 + threadIdx.x, any_live);
        }
        __syncthreads();
        const int count = static_cast<int>(min(static_cast<long long>(kBlock), s.num_gts - g0));
        if (active) {
          for (int j = 0; j < count; ++j) {
            const T gm = tile_gt_max[j];
            if (gm == untested) {
              if (untested >= p.thr.min_pos) match = g0 + j;
            } else if (query && gm > T(0) && gm >= p.thr.min_pos && gm <= mo &&
                       Kind::overlap(tile_gts[j], box, false) == gm) {
              match = g0 + j;
            }
          }
        }
      }
      if (active && match >= 0) {
        p.gt_inds[i] = match + 1;
        if (p.labels != nullptr) p.labels[i] = label_of(p, s, match + 1);
      }
    }
  }
}

// Low-quality matches, one box per gt: the lowest box index n with overlap(g, n) == gt_max[g],
// for gts with gt_max[g] > 0 (the others are settled in scatter_low_quality_kernel).
template <typename Kind>
__global__ void __launch_bounds__(kBlock)
    first_maximiser_kernel(const Problem<typename Kind::Scalar> p) {
  using T = typename Kind::Scalar;
  using Box = typename Kind::Box;
  __shared__ Box tile_gts[kBlock];
  __shared__ T tile_gt_max[kBlock];
  FOR_EACH_IMAGE(img) {
    const ImageSlice s = image_slice(p, img);
    if (s.num_gts == 0) continue;  // uniform across the block
    FOR_EACH_BOX_TILE(tile, s.num_boxes) {
      const long long n = tile * kBlock + threadIdx.x;
      const long long i = s.box_begin + n;
      const T mo = n < s.num_boxes ? p.max_overlaps[i] : T(0);
      const bool query = mo > T(0) && mo >= p.thr.min_pos;
      Box box{};
      if (query) box = Kind::load(p.boxes, i, p.box_row_stride, p.box_col_stride);
      for (long long g0 = 0; g0 < s.num_gts; g0 += kBlock) {
        __syncthreads();
        if (g0 + threadIdx.x < s.num_gts) {
          tile_gts[threadIdx.x] =
              Kind::load(p.gts, s.gt_begin + g0 + threadIdx.x, p.gt_row_stride, p.gt_col_stride);
          tile_gt_max[threadIdx.x] =
              FloatBits<T>::value(p.gt_max_bits[s.gt_begin + g0 + threadIdx.x]);
        }
        __syncthreads();
        const int count = static_cast<int>(min(static_cast<long long>(kBlock), s.num_gts - g0));
        if (query) {
          for (int j = 0; j < count; ++j) {
            const T gm = tile_gt_max[j];
            if (gm > T(0) && gm >= p.thr.min_pos && gm <= mo &&
                Kind::overlap(tile_gts[j], box, false) == gm) {
              atomicMin(&p.gt_argmax_box[s.gt_begin + g0 + j], n);
            }
          }
        }
      }
    }
  }
}

// Above every threshold result (<= num_gts) and ordered by gt: atomicMax keeps the last gt.
__device__ long long encode_low_quality(long long gt, long long num_gts) {
  return num_gts + 1 + gt;
}

// Each gt with gt_max >= min_pos_iou claims its first maximising box: the one found above when
// gt_max > 0; the first non-ignored box when gt_max == 0 (every such box overlaps it by 0); box 0
// when every box is ignored (all overlaps -1).
template <typename T>
__global__ void scatter_low_quality_kernel(const Problem<T> p) {
  FOR_EACH_IMAGE(img) {
    const ImageSlice s = image_slice(p, img);
    if (s.num_boxes == 0) continue;
    const long long first_live = p.image_first_live[img];
    const bool any_live = first_live < s.num_boxes;
    for (long long g = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; g < s.num_gts;
         g += static_cast<long long>(gridDim.x) * blockDim.x) {
      const T gm = gt_max_value(p, s, g, any_live);
      if (!(gm >= p.thr.min_pos)) continue;
      const long long n = gm > T(0) ? p.gt_argmax_box[s.gt_begin + g] : any_live ? first_live : 0;
      atomicMax(&p.gt_inds[s.box_begin + n], encode_low_quality(g, s.num_gts));
    }
  }
}

template <typename T>
__global__ void decode_low_quality_kernel(const Problem<T> p) {
  FOR_EACH_IMAGE(img) {
    const ImageSlice s = image_slice(p, img);
    if (s.num_gts == 0) continue;
    FOR_EACH_BOX_TILE(tile, s.num_boxes) {
      const long long n = tile * kBlock + threadIdx.x;
      if (n >= s.num_boxes) continue;
      const long long i = s.box_begin + n;
      const long long encoded = p.gt_inds[i];
      if (encoded > s.num_gts) {
        const long long gt_index = encoded - s.num_gts;  // = gt + 1
        p.gt_inds[i] = gt_index;
        if (p.labels != nullptr) p.labels[i] = label_of(p, s, gt_index);
      }
    }
  }
}

// The k-th largest max overlap of each image (one block per image): radix select, 8 bits per
// round from the most significant, on keys ordered like the values.
template <typename T>
__global__ void __launch_bounds__(kBlock)
    kth_largest_kernel(const T* __restrict__ max_overlaps,
                       const long long* __restrict__ box_offsets,
                       const long long* __restrict__ topk, long long num_images,
                       T* __restrict__ out) {
  using Key = typename OrderedKey<T>::type;
  __shared__ unsigned int histogram[256];
  __shared__ Key prefix, prefix_mask;
  __shared__ long long remaining;
  for (long long img = blockIdx.x; img < num_images; img += gridDim.x) {
    const long long begin = box_offsets[img];
    const long long count = box_offsets[img + 1] - begin;
    const long long k = topk[img];
    if (k < 1 || k > count) {  // uniform across the block
      if (threadIdx.x == 0) out[img] = T(NAN);
      continue;
    }
    __syncthreads();  // the previous image's shared values are read
    if (threadIdx.x == 0) {
      prefix = 0;
      prefix_mask = 0;
      remaining = k;
    }
    for (int shift = OrderedKey<T>::kBits - 8; shift >= 0; shift -= 8) {
      __syncthreads();
      histogram[threadIdx.x] = 0;  // kBlock == 256 bins
      __syncthreads();
      const Key want = prefix, mask = prefix_mask;
      for (long long n = threadIdx.x; n < count; n += kBlock) {
        const Key key = OrderedKey<T>::of(max_overlaps[begin + n]);
        if ((key & mask) == want) atomicAdd(&histogram[(key >> shift) & 0xff], 1u);
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        int digit = 255;
        long long left = remaining;
        while (histogram[digit] < left) left -= histogram[digit--];
        remaining = left;
        prefix = want | (static_cast<Key>(digit) << shift);
        prefix_mask = mask | (static_cast<Key>(0xff) << shift);
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) out[img] = OrderedKey<T>::value(prefix);
  }
}

#undef FOR_EACH_BOX_TILE
#undef FOR_EACH_IMAGE

template <typename Kind>
void launch(const MaxIouAssignArgs& args, cudaStream_t stream) {
  using T = typename Kind::Scalar;
  const Problem<T> p = make_problem<T>(args);
  const unsigned int image_blocks =
      static_cast<unsigned int>(args.num_images < kMaxGridY ? args.num_images : kMaxGridY);
  const dim3 box_grid(blocks_for(args.max_boxes_per_image, kBlock), image_blocks);
  const bool has_ignore = args.ignore_offsets != 0;
  const bool match_low_quality = args.options.match_low_quality;
  if (has_ignore) {
    mark_ignored_kernel<Kind><<<box_grid, kBlock, 0, stream>>>(p);
    check_launch("max_iou_assign mark_ignored_kernel");
  }
  first_pass_kernel<Kind><<<box_grid, kBlock, 0, stream>>>(p, has_ignore, match_low_quality);
  check_launch("max_iou_assign first_pass_kernel");
  if (match_low_quality && args.options.gt_max_assign_all) {
    match_all_kernel<Kind><<<box_grid, kBlock, 0, stream>>>(p);
    check_launch("max_iou_assign match_all_kernel");
  } else if (match_low_quality) {
    first_maximiser_kernel<Kind><<<box_grid, kBlock, 0, stream>>>(p);
    check_launch("max_iou_assign first_maximiser_kernel");
    const dim3 gt_grid(blocks_for(args.max_gts_per_image, kBlock), image_blocks);
    scatter_low_quality_kernel<T><<<gt_grid, kBlock, 0, stream>>>(p);
    check_launch("max_iou_assign scatter_low_quality_kernel");
    decode_low_quality_kernel<T><<<box_grid, kBlock, 0, stream>>>(p);
    check_launch("max_iou_assign decode_low_quality_kernel");
  }
  if (args.topk != 0) {
    const unsigned int blocks = std::min(blocks_for(args.num_images, 1), kMaxGridY);
    kth_largest_kernel<T><<<blocks, kBlock, 0, stream>>>(
        p.max_overlaps, p.box_offsets, reinterpret_cast<const long long*>(args.topk),
        args.num_images, reinterpret_cast<T*>(args.kth_largest));
    check_launch("max_iou_assign kth_largest_kernel");
  }
}

}  // namespace

void max_iou_assign_cuda(const MaxIouAssignArgs& args, int device, std::uintptr_t stream) {
  if (args.num_images == 0) return;
  const DeviceGuard guard(device);
  const cudaStream_t s = as_stream(stream);
  assign::dispatch_box_kind(args.box_kind, args.dtype,
                            [&](auto kind) { launch<decltype(kind)>(args, s); });
}

}  // namespace dbf_ext
