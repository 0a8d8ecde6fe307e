#include "nms_rotated/nms_rotated.h"

#include <algorithm>

#include "common/cuda_utils.h"
#include "common/geometry.h"

namespace dbf_ext {
namespace {

using geometry::PreparedBox;
using MaskWord = unsigned long long;

constexpr int kBlockBoxes = static_cast<int>(kNmsBlockBoxes);
constexpr int kGatherThreads = 512;
// The removed-bits vector of the gather kernel lives in shared memory up to this many words
// (N <= 327,680 boxes), in global memory (L2-resident) beyond.
constexpr long long kMaxSharedRemovedWords = 5120;
// Row blocks per chunk are bounded by the grid's y dimension (two row blocks per grid row).
constexpr long long kMaxChunkRowBlocks = 2LL * 65535;

// Boxes are visited in score order: "row" i is the i-th highest-scored box. Row i's mask bit j
// (j > i) says that box i, if kept, suppresses box j. Only the upper triangle of 64 x 64 tiles
// is computed and stored, row block by row block: row block rb (rows 64 rb .. 64 rb + 63) has
// words rb .. row_blocks - 1 for each of its rows. A chunk of row blocks [first, end) is stored
// from offset 0 of the scratch buffer.
struct MaskLayout {
  long long row_blocks;
  long long first_row_block;  // of the chunk

  // Words stored for row blocks 0 .. k - 1 of a full triangle, divided by 64.
  DBF_HOST_DEVICE long long triangle(long long k) const { return k * row_blocks - k * (k - 1) / 2; }
  DBF_HOST_DEVICE long long chunk_words(long long end_row_block) const {
    return kBlockBoxes * (triangle(end_row_block) - triangle(first_row_block));
  }
  DBF_HOST_DEVICE long long word_index(long long row, long long word) const {
    const long long rb = row / kBlockBoxes;
    return chunk_words(rb) + (row % kBlockBoxes) * (row_blocks - rb) + (word - rb);
  }
};

DBF_HOST_DEVICE MaskWord present_bits(long long count_in_block) {
  return count_in_block >= kBlockBoxes ? ~0ULL : (1ULL << count_in_block) - 1;
}

// One block per 64 x 64 tile (row block rb, column block cb >= rb). The grid folds the triangle
// of a chunk of R row blocks into a rectangle: grid row k holds the tiles of row blocks k and
// R - 1 - k, so no block is launched below the diagonal. Rows and columns already removed by
// earlier chunks are skipped: removed rows are never read back, removed columns cannot be
// removed again.
template <typename T>
__global__ void __launch_bounds__(kBlockBoxes)
    suppression_mask_kernel(const T* __restrict__ boxes, long long row_stride, long long col_stride,
                            const long long* __restrict__ order,
                            const long long* __restrict__ labels, long long n, double iou_threshold,
                            MaskLayout layout, long long chunk_row_blocks,
                            const MaskWord* __restrict__ removed, MaskWord* __restrict__ mask) {
  const long long k = blockIdx.y;
  const long long first_tiles = layout.row_blocks - (layout.first_row_block + k);
  long long rb, cb;
  if (blockIdx.x < first_tiles) {
    rb = layout.first_row_block + k;
    cb = rb + blockIdx.x;
  } else {
    const long long k_paired = chunk_row_blocks - 1 - k;
    if (k_paired == k) return;  // middle row block of an odd chunk: no partner
    rb = layout.first_row_block + k_paired;
    cb = rb + (blockIdx.x - first_tiles);
  }
  const long long row0 = rb * kBlockBoxes, col0 = cb * kBlockBoxes;
  const MaskWord removed_rows = removed[rb];
  const MaskWord rows_present = present_bits(n - row0);
  if ((removed_rows & rows_present) == rows_present) return;
  const MaskWord removed_cols = removed[cb];
  const int cols_here = static_cast<int>(min(static_cast<long long>(kBlockBoxes), n - col0));

  __shared__ PreparedBox<T> col_boxes[kBlockBoxes];
  __shared__ long long col_labels[kBlockBoxes];
  const int t = threadIdx.x;
  if (t < cols_here) {
    const long long index = order[col0 + t];
    col_boxes[t] = geometry::load_box(boxes, index, row_stride, col_stride, true);
    col_labels[t] = labels != nullptr ? labels[index] : 0;
  }
  __syncthreads();

  const long long row = row0 + t;
  if (row >= n || ((removed_rows >> t) & 1ULL)) return;
  const long long index = order[row];
  const PreparedBox<T> box = geometry::load_box(boxes, index, row_stride, col_stride, true);
  const long long label = labels != nullptr ? labels[index] : 0;
  MaskWord bits = 0;
  for (int c = (cb == rb) ? t + 1 : 0; c < cols_here; ++c) {
    if (((removed_cols >> c) & 1ULL) || col_labels[c] != label) continue;
    if (suppresses(box, col_boxes[c], iou_threshold)) bits |= 1ULL << c;
  }
  mask[layout.word_index(row, cb)] = bits;
}

// Walks the row blocks of a chunk in score order on one block and appends the kept boxes to
// `keep`. removed_global (one bit per box) and keep_count carry the state from chunk to chunk.
// Per row block: the 64 diagonal words are loaded in parallel, one thread resolves the
// dependencies inside the block (visiting only rows still standing), then all threads OR the
// kept rows' words into the removed bits of the later columns.
__global__ void __launch_bounds__(kGatherThreads)
    gather_kept_kernel(const MaskWord* __restrict__ mask, MaskLayout layout,
                       long long end_row_block, long long n, const long long* __restrict__ order,
                       MaskWord* removed_global, bool removed_in_shared,
                       long long* __restrict__ keep, long long* keep_count) {
  extern __shared__ MaskWord shared_removed[];
  __shared__ MaskWord diagonal[kBlockBoxes];
  __shared__ MaskWord kept_rows;
  const long long row_blocks = layout.row_blocks;
  const long long first = layout.first_row_block;
  const int t = threadIdx.x;
  MaskWord* removed = removed_in_shared ? shared_removed : removed_global;
  if (removed_in_shared) {
    for (long long w = first + t; w < row_blocks; w += blockDim.x) {
      shared_removed[w] = removed_global[w];
    }
  }
  long long count = 0;
  if (t == 0) count = *keep_count;
  __syncthreads();

  for (long long rb = first; rb < end_row_block; ++rb) {
    const long long row0 = rb * kBlockBoxes;
    const MaskWord standing = ~removed[rb] & present_bits(n - row0);
    if (standing == 0) continue;  // uniform across the block
    if (t < kBlockBoxes && ((standing >> t) & 1ULL)) {
      diagonal[t] = mask[layout.word_index(row0 + t, rb)];
    }
    __syncthreads();
    if (t == 0) {
      MaskWord removed_here = ~standing;
      MaskWord kept = 0;
      for (MaskWord open = standing; open != 0;) {
        const int b = __ffsll(static_cast<long long>(open)) - 1;
        kept |= 1ULL << b;
        keep[count++] = order[row0 + b];
        removed_here |= diagonal[b];
        open = ~removed_here & ~((2ULL << b) - 1);  // rows after b still standing
      }
      kept_rows = kept;
    }
    __syncthreads();
    const MaskWord kept = kept_rows;
    for (long long w = rb + 1 + t; w < row_blocks; w += blockDim.x) {
      MaskWord bits = removed[w];
      for (MaskWord rest = kept; rest != 0; rest &= rest - 1) {
        const int b = __ffsll(static_cast<long long>(rest)) - 1;
        bits |= mask[layout.word_index(row0 + b, w)];
      }
      removed[w] = bits;
    }
    __syncthreads();  // removed[] and diagonal[] are read again by the next row block
  }

  if (t == 0) *keep_count = count;
  if (removed_in_shared) {
    for (long long w = end_row_block + t; w < row_blocks; w += blockDim.x) {
      removed_global[w] = shared_removed[w];
    }
  }
}

template <typename T>
void launch(const NmsRotatedArgs& args, const NmsRotatedCudaScratch& scratch, cudaStream_t stream) {
  const long long n = args.boxes.count;
  const long long row_blocks = (n + kBlockBoxes - 1) / kBlockBoxes;
  if (scratch.mask_words < kBlockBoxes * row_blocks) {
    throw std::invalid_argument("nms_rotated_cuda: the mask scratch cannot hold one row block");
  }
  const auto* order = reinterpret_cast<const long long*>(args.order);
  const auto* labels = reinterpret_cast<const long long*>(args.labels);
  auto* mask = reinterpret_cast<MaskWord*>(scratch.mask);
  auto* removed = reinterpret_cast<MaskWord*>(scratch.removed);
  const bool removed_in_shared = row_blocks <= kMaxSharedRemovedWords;
  const size_t shared_bytes = removed_in_shared ? row_blocks * sizeof(MaskWord) : 0;

  for (long long first = 0; first < row_blocks;) {
    const MaskLayout layout{row_blocks, first};
    // As many row blocks as the scratch holds.
    long long end = first + 1;
    while (end < row_blocks && end - first < kMaxChunkRowBlocks &&
           layout.chunk_words(end + 1) <= scratch.mask_words) {
      ++end;
    }
    const long long chunk_row_blocks = end - first;
    const long long grid_x = 2 * (row_blocks - first) - chunk_row_blocks + 1;
    const dim3 grid(static_cast<unsigned int>(grid_x),
                    static_cast<unsigned int>((chunk_row_blocks + 1) / 2));
    suppression_mask_kernel<T><<<grid, kBlockBoxes, 0, stream>>>(
        args.boxes.ptr<T>(), args.boxes.row_stride, args.boxes.col_stride, order, labels, n,
        args.iou_threshold, layout, chunk_row_blocks, removed, mask);
    check_launch("nms_rotated suppression_mask_kernel");
    gather_kept_kernel<<<1, kGatherThreads, shared_bytes, stream>>>(
        mask, layout, end, n, order, removed, removed_in_shared,
        reinterpret_cast<long long*>(args.keep), reinterpret_cast<long long*>(scratch.keep_count));
    check_launch("nms_rotated gather_kept_kernel");
    first = end;
  }
}

}  // namespace

void nms_rotated_cuda(const NmsRotatedArgs& args, const NmsRotatedCudaScratch& scratch, int device,
                      std::uintptr_t stream) {
  if (args.boxes.count == 0) return;
  const DeviceGuard guard(device);
  const cudaStream_t s = as_stream(stream);
  dispatch_float(args.dtype, [&](auto zero) { launch<decltype(zero)>(args, scratch, s); });
}

}  // namespace dbf_ext
