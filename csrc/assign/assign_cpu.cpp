// CPU MaxIoU assignment. Each box tests only the gts near it (a uniform grid over the gts of its
// image), so the work follows the number of overlapping pairs rather than boxes x gts, and the
// extra memory is O(boxes + gts): no overlap matrix, no per-box scratch beyond the outputs.
//
// Overlaps that are never computed are known: 0 for a box with no nearby gt, -1 for an ignored
// box. That is what lets the per-gt maxima, the per-gt first maximising box and the low-quality
// matches be derived from the tested pairs alone (see the comments at each step).
#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <optional>
#include <vector>

#include "assign/assign.h"
#include "assign/assign_common.h"
#include "common/parallel.h"

namespace dbf_ext {
namespace {

using assign::Bounds;
using assign::Thresholds;

// A uniform grid over a set of boxes' bounds; each box is listed in every cell its bounds touch.
// A query visits the cells under its own bounds and reports each box whose bounds intersect it
// exactly once: in the cell that holds the lower corner of the two bounds' intersection.
template <typename T>
class BoxGrid {
 public:
  struct Item {
    Bounds<T> bounds;
    std::int64_t index;
  };

  BoxGrid() = default;

  explicit BoxGrid(const std::vector<Item>& items) {
    if (items.empty()) return;
    // The grid spans the finite coordinates; infinite bounds fall into the border cells.
    double lo_x = kInf, hi_x = -kInf, lo_y = kInf, hi_y = -kInf;
    double extent_sum = 0.0;
    std::int64_t finite_count = 0;
    for (const Item& e : items) {
      const double x0 = e.bounds.x0, y0 = e.bounds.y0, x1 = e.bounds.x1, y1 = e.bounds.y1;
      if (std::isfinite(x0)) lo_x = std::min(lo_x, x0);
      if (std::isfinite(x1)) hi_x = std::max(hi_x, x1);
      if (std::isfinite(y0)) lo_y = std::min(lo_y, y0);
      if (std::isfinite(y1)) hi_y = std::max(hi_y, y1);
      const double extent = std::max(x1 - x0, y1 - y0);
      if (std::isfinite(extent)) {
        extent_sum += extent;
        ++finite_count;
      }
    }
    origin_x_ = lo_x <= hi_x ? lo_x : 0.0;
    origin_y_ = lo_y <= hi_y ? lo_y : 0.0;
    const double width = lo_x <= hi_x ? hi_x - lo_x : 0.0;
    const double height = lo_y <= hi_y ? hi_y - lo_y : 0.0;
    // Cells about as large as the boxes (each box in a few cells) and about one box per cell.
    const auto n = static_cast<double>(items.size());
    const double mean_extent = finite_count > 0 ? extent_sum / finite_count : 0.0;
    const double cell = std::max(std::sqrt(width * height / n), mean_extent);
    cols_ = cells_along(width, cell, 4 * n);
    rows_ = cells_along(height, cell, std::max(1.0, 4 * n / cols_));
    inv_x_ = width > 0 ? cols_ / width : 0.0;
    inv_y_ = height > 0 ? rows_ / height : 0.0;
    if (!std::isfinite(inv_x_)) inv_x_ = 0.0;
    if (!std::isfinite(inv_y_)) inv_y_ = 0.0;

    cell_start_.assign(static_cast<size_t>(cols_) * rows_ + 1, 0);
    for (const Item& e : items) {
      for_each_cell(e.bounds, [&](std::int64_t cell_index) { ++cell_start_[cell_index + 1]; });
    }
    for (size_t c = 1; c < cell_start_.size(); ++c) cell_start_[c] += cell_start_[c - 1];
    entries_.resize(static_cast<size_t>(cell_start_.back()));
    std::vector<std::int64_t> fill(cell_start_.begin(), cell_start_.end() - 1);
    for (const Item& e : items) {
      const Entry entry{e.bounds, e.index, column(e.bounds.x0), row(e.bounds.y0)};
      for_each_cell(e.bounds,
                    [&](std::int64_t cell_index) { entries_[fill[cell_index]++] = entry; });
    }
  }

  // Calls fn(index) once for every listed box whose bounds intersect `query`.
  template <typename F>
  void for_each_candidate(const Bounds<T>& query, F&& fn) const {
    if (cols_ == 0) return;
    const int c0 = column(query.x0), c1 = column(query.x1);
    const int r0 = row(query.y0), r1 = row(query.y1);
    for (int r = r0; r <= r1; ++r) {
      for (int c = c0; c <= c1; ++c) {
        const std::int64_t cell_index = static_cast<std::int64_t>(r) * cols_ + c;
        for (std::int64_t k = cell_start_[cell_index]; k < cell_start_[cell_index + 1]; ++k) {
          const Entry& e = entries_[k];
          const Bounds<T>& b = e.bounds;
          // Non-short-circuit &: one hard-to-predict branch instead of four.
          const bool intersect =
              (query.x0 <= b.x1) & (b.x0 <= query.x1) & (query.y0 <= b.y1) & (b.y0 <= query.y1);
          // The lower corner's cell, column(max(x)) = max(column(x)) as column is monotonic.
          const bool corner_here =
              (std::max(c0, e.first_column) == c) & (std::max(r0, e.first_row) == r);
          if (intersect & corner_here) fn(e.index);
        }
      }
    }
  }

 private:
  static constexpr double kInf = std::numeric_limits<double>::infinity();

  static int cells_along(double length, double cell, double cap) {
    if (!(length > 0) || !(cell > 0) || !std::isfinite(length / cell)) return 1;
    return static_cast<int>(std::max(1.0, std::min(std::ceil(length / cell), cap)));
  }

  // Monotonic in the coordinate (so the lower-corner rule is consistent), clamped to the grid.
  static int cell_of(T coordinate, double origin, double inverse_size, int cells) {
    const double t = (static_cast<double>(coordinate) - origin) * inverse_size;
    if (!(t >= 0)) return 0;
    return t >= cells ? cells - 1 : static_cast<int>(t);
  }
  int column(T x) const { return cell_of(x, origin_x_, inv_x_, cols_); }
  int row(T y) const { return cell_of(y, origin_y_, inv_y_, rows_); }

  template <typename F>
  void for_each_cell(const Bounds<T>& b, F&& fn) const {
    for (int r = row(b.y0), r1 = row(b.y1); r <= r1; ++r) {
      for (int c = column(b.x0), c1 = column(b.x1); c <= c1; ++c) {
        fn(static_cast<std::int64_t>(r) * cols_ + c);
      }
    }
  }

  struct Entry {
    Bounds<T> bounds;
    std::int64_t index;
    int first_column, first_row;  // cell of the lower corner of the bounds
  };

  double origin_x_ = 0.0, origin_y_ = 0.0, inv_x_ = 0.0, inv_y_ = 0.0;
  int cols_ = 0, rows_ = 0;
  std::vector<std::int64_t> cell_start_;
  std::vector<Entry> entries_;
};

// Boxes of every image, loaded once, with a grid per image over those that can overlap anything.
template <typename Kind>
struct IndexedBoxes {
  using T = typename Kind::Scalar;
  std::vector<typename Kind::Box> boxes;
  std::vector<BoxGrid<T>> grids;

  IndexedBoxes(const BoxArrayView& view, const std::int64_t* offsets, std::int64_t num_images,
               int num_threads)
      : boxes(static_cast<size_t>(view.count)), grids(static_cast<size_t>(num_images)) {
    const T* data = view.ptr<T>();
    parallel_for(view.count, 4096, num_threads, [&](std::int64_t begin, std::int64_t end) {
      for (std::int64_t i = begin; i < end; ++i) {
        boxes[i] = Kind::load(data, i, view.row_stride, view.col_stride);
      }
    });
    parallel_for(num_images, 1, num_threads, [&](std::int64_t begin, std::int64_t end) {
      std::vector<typename BoxGrid<T>::Item> items;
      for (std::int64_t img = begin; img < end; ++img) {
        items.clear();
        for (std::int64_t i = offsets[img]; i < offsets[img + 1]; ++i) {
          if (Kind::can_overlap(boxes[i])) {
            items.push_back({Kind::bounds(boxes[i]), i - offsets[img]});
          }
        }
        grids[img] = BoxGrid<T>(items);
      }
    });
  }
};

// A run of consecutive boxes of one image, processed by one task. Chunks keep their own per-gt
// maxima, reduced afterwards in chunk order: deterministic, and no atomics on floats.
struct Chunk {
  std::int64_t image;
  std::int64_t begin, end;      // box range, local to the image
  std::int64_t partial_offset;  // of this chunk's per-gt maxima in the partial arrays
  std::int64_t first_live;      // lowest non-ignored box of the chunk (end when none)
};

template <typename Kind>
class CpuAssigner {
  using T = typename Kind::Scalar;
  using Box = typename Kind::Box;

 public:
  CpuAssigner(const MaxIouAssignArgs& args, int num_threads)
      : a_(args),
        threads_(num_threads),
        thr_(Thresholds<T>::from(args.options)),
        box_offsets_(reinterpret_cast<const std::int64_t*>(args.box_offsets)),
        gt_offsets_(reinterpret_cast<const std::int64_t*>(args.gt_offsets)),
        gt_inds_(reinterpret_cast<std::int64_t*>(args.gt_inds)),
        max_overlaps_(reinterpret_cast<T*>(args.max_overlaps)),
        gts_(args.gts, gt_offsets_, args.num_images, num_threads) {
    if (args.ignore_offsets != 0) {
      ignore_.emplace(args.ignore, reinterpret_cast<const std::int64_t*>(args.ignore_offsets),
                      args.num_images, num_threads);
    }
  }

  void run() {
    const bool track_gt_max = a_.options.match_low_quality;
    make_chunks(track_gt_max);
    parallel_for(static_cast<std::int64_t>(chunks_.size()), 1, threads_,
                 [&](std::int64_t begin, std::int64_t end) {
                   for (std::int64_t c = begin; c < end; ++c) first_pass(chunks_[c], track_gt_max);
                 });
    if (a_.topk != 0) write_kth_largest();
    if (a_.options.match_low_quality) {
      reduce_gt_maxima();
      if (!a_.options.gt_max_assign_all) scatter_low_quality_argmax();
    }
    const bool match_all = a_.options.match_low_quality && a_.options.gt_max_assign_all;
    if (match_all || a_.labels != 0) {
      parallel_for(static_cast<std::int64_t>(chunks_.size()), 1, threads_,
                   [&](std::int64_t begin, std::int64_t end) {
                     for (std::int64_t c = begin; c < end; ++c) second_pass(chunks_[c], match_all);
                   });
    }
  }

 private:
  std::int64_t num_boxes(std::int64_t img) const {
    return box_offsets_[img + 1] - box_offsets_[img];
  }
  std::int64_t num_gts(std::int64_t img) const { return gt_offsets_[img + 1] - gt_offsets_[img]; }

  Box load_box(std::int64_t global_index) const {
    return Kind::load(a_.boxes.template ptr<T>(), global_index, a_.boxes.row_stride,
                      a_.boxes.col_stride);
  }

  // Chunks of at least as many boxes as the image has gts: the per-chunk maxima then add up to
  // O(boxes + gts) memory whatever the thread count.
  void make_chunks(bool track_gt_max) {
    const std::int64_t total = box_offsets_[a_.num_images];
    const std::int64_t tasks = 8 * static_cast<std::int64_t>(std::max(threads_, 1));
    const std::int64_t balanced = (total + tasks - 1) / tasks;
    std::int64_t partial_size = 0;
    image_chunk_begin_.assign(static_cast<size_t>(a_.num_images) + 1, 0);
    for (std::int64_t img = 0; img < a_.num_images; ++img) {
      image_chunk_begin_[img] = static_cast<std::int64_t>(chunks_.size());
      const std::int64_t n = num_boxes(img), g = num_gts(img);
      const std::int64_t length = std::max({kMinChunk, g, balanced});
      for (std::int64_t begin = 0; begin < n; begin += length) {
        const std::int64_t end = std::min(n, begin + length);
        chunks_.push_back(Chunk{img, begin, end, partial_size, /*first_live=*/end});
        if (track_gt_max) partial_size += g;
      }
    }
    image_chunk_begin_[a_.num_images] = static_cast<std::int64_t>(chunks_.size());
    partial_max_.assign(static_cast<size_t>(partial_size), T(0));
    if (track_gt_max && !a_.options.gt_max_assign_all) {
      partial_argmax_.assign(static_cast<size_t>(partial_size), 0);
    }
  }

  bool is_ignored(const Box& box, std::int64_t img) const {
    if (!ignore_ || !Kind::can_overlap(box)) return false;
    const IndexedBoxes<Kind>& ignore = *ignore_;
    const Box* image_ignore =
        ignore.boxes.data() + reinterpret_cast<const std::int64_t*>(a_.ignore_offsets)[img];
    T max_iof = T(0);
    ignore.grids[img].for_each_candidate(Kind::bounds(box), [&](std::int64_t k) {
      const T iof = a_.options.ignore_wrt_candidates ? Kind::overlap(box, image_ignore[k], true)
                                                     : Kind::overlap(image_ignore[k], box, true);
      max_iof = std::max(max_iof, iof);
    });
    return max_iof > thr_.ignore_iof;
  }

  // Max overlap and lowest maximising gt of every box, the threshold assignment, and this
  // chunk's per-gt maxima (positive values; the rest are settled in reduce_gt_maxima).
  void first_pass(Chunk& chunk, bool track_gt_max) {
    const std::int64_t img = chunk.image, g_count = num_gts(img);
    const std::int64_t box_begin = box_offsets_[img];
    const Box* gts = gts_.boxes.data() + gt_offsets_[img];
    T* chunk_max = partial_max_.data() + chunk.partial_offset;
    std::int64_t* chunk_argmax =
        partial_argmax_.empty() ? nullptr : partial_argmax_.data() + chunk.partial_offset;
    for (std::int64_t n = chunk.begin; n < chunk.end; ++n) {
      const std::int64_t i = box_begin + n;
      if (g_count == 0) {  // mmdetection: every box negative, max overlap 0
        max_overlaps_[i] = T(0);
        gt_inds_[i] = 0;
        continue;
      }
      const Box box = load_box(i);
      if (is_ignored(box, img)) {
        max_overlaps_[i] = assign::ignored_overlap<T>();
        gt_inds_[i] = assign::threshold_assignment(assign::ignored_overlap<T>(), 0, thr_);
        continue;
      }
      chunk.first_live = std::min(chunk.first_live, n);
      // Untested gts overlap this box by 0, so (0, gt 0) is the maximum until a pair beats it.
      T best = T(0);
      std::int64_t best_gt = 0;
      if (Kind::can_overlap(box)) {
        gts_.grids[img].for_each_candidate(Kind::bounds(box), [&](std::int64_t g) {
          const T v = Kind::overlap(gts[g], box, false);
          if (v > best || (v == best && g < best_gt)) {
            best = v;
            best_gt = g;
          }
          if (track_gt_max && v > chunk_max[g]) {  // boxes ascend: keeps the first maximiser
            chunk_max[g] = v;
            if (chunk_argmax != nullptr) chunk_argmax[g] = n;
          }
        });
      }
      max_overlaps_[i] = best;
      gt_inds_[i] = assign::threshold_assignment(best, best_gt, thr_);
    }
  }

  // gt_max[g] = max over the image's boxes of overlap(g, box). Every non-ignored box overlaps
  // every gt by at least 0, and ignored boxes by exactly -1, so the maximum is the largest tested
  // value if positive, else 0 when some box is not ignored, else -1. The first box reaching it is
  // correspondingly the first tested maximiser, the first non-ignored box, or box 0.
  void reduce_gt_maxima() {
    gt_max_.assign(static_cast<size_t>(gt_offsets_[a_.num_images]), T(0));
    if (!a_.options.gt_max_assign_all) gt_argmax_box_.assign(gt_max_.size(), 0);
    parallel_for(a_.num_images, 1, threads_, [&](std::int64_t begin, std::int64_t end) {
      for (std::int64_t img = begin; img < end; ++img) {
        const std::int64_t g0 = gt_offsets_[img], g_count = num_gts(img);
        std::int64_t first_live = num_boxes(img);
        for (std::int64_t c = image_chunk_begin_[img]; c < image_chunk_begin_[img + 1]; ++c) {
          first_live = std::min(first_live, chunks_[c].first_live);
        }
        const bool any_live = first_live < num_boxes(img);
        for (std::int64_t g = 0; g < g_count; ++g) {
          gt_max_[g0 + g] = any_live ? T(0) : assign::ignored_overlap<T>();
          if (!gt_argmax_box_.empty()) gt_argmax_box_[g0 + g] = any_live ? first_live : 0;
        }
        for (std::int64_t c = image_chunk_begin_[img]; c < image_chunk_begin_[img + 1]; ++c) {
          const T* chunk_max = partial_max_.data() + chunks_[c].partial_offset;
          for (std::int64_t g = 0; g < g_count; ++g) {
            // Only positive partial maxima are measured (0 means none); chunks ascend, so the
            // strict comparison keeps the first maximiser.
            if (chunk_max[g] > T(0) && chunk_max[g] > gt_max_[g0 + g]) {
              gt_max_[g0 + g] = chunk_max[g];
              if (!gt_argmax_box_.empty()) {
                gt_argmax_box_[g0 + g] = partial_argmax_[chunks_[c].partial_offset + g];
              }
            }
          }
        }
      }
    });
  }

  // gt_max_assign_all = false: each gt in order claims its first maximising box; a later gt
  // overwrites an earlier one. G writes per image, done exactly as the sequential loop.
  void scatter_low_quality_argmax() {
    parallel_for(a_.num_images, 1, threads_, [&](std::int64_t begin, std::int64_t end) {
      for (std::int64_t img = begin; img < end; ++img) {
        if (num_boxes(img) == 0) continue;
        const std::int64_t g0 = gt_offsets_[img];
        for (std::int64_t g = 0; g < num_gts(img); ++g) {
          if (gt_max_[g0 + g] >= thr_.min_pos) {
            gt_inds_[box_offsets_[img] + gt_argmax_box_[g0 + g]] = g + 1;
          }
        }
      }
    });
  }

  // The last gt g with gt_max[g] == value >= min_pos_iou, or -1.
  std::int64_t last_gt_with_max(std::int64_t img, T value) const {
    if (!(value >= thr_.min_pos)) return -1;
    const std::int64_t g0 = gt_offsets_[img];
    for (std::int64_t g = num_gts(img) - 1; g >= 0; --g) {
      if (gt_max_[g0 + g] == value) return g;
    }
    return -1;
  }

  // Low-quality matches with gt_max_assign_all (the last gt g with overlap(g, box) == gt_max[g]
  // >= min_pos_iou wins, as in the sequential loop), then labels.
  void second_pass(const Chunk& chunk, bool match_all) {
    const std::int64_t img = chunk.image, g_count = num_gts(img);
    const std::int64_t box_begin = box_offsets_[img], g0 = gt_offsets_[img];
    const std::int64_t* gt_labels = reinterpret_cast<const std::int64_t*>(a_.gt_labels);
    std::int64_t* labels = reinterpret_cast<std::int64_t*>(a_.labels);
    // A gt whose maximum equals the box's untested overlap (0, or -1 when ignored) matches it
    // without a test: such a gt overlaps no box by more than that.
    std::int64_t last_zero_gt = -1, last_ignored_gt = -1;
    if (match_all && g_count > 0) {
      last_zero_gt = last_gt_with_max(img, T(0));
      last_ignored_gt = last_gt_with_max(img, assign::ignored_overlap<T>());
    }
    const Box* gts = gts_.boxes.data() + g0;
    const T* gt_max = gt_max_.data() + g0;
    for (std::int64_t n = chunk.begin; n < chunk.end; ++n) {
      const std::int64_t i = box_begin + n;
      if (match_all && g_count > 0) {
        const T mo = max_overlaps_[i];
        const bool ignored = mo < T(0);
        std::int64_t match = ignored ? last_ignored_gt : last_zero_gt;
        // overlap(g, box) == gt_max[g] > 0 needs mo >= gt_max[g] >= min_pos_iou.
        if (!ignored && mo > T(0) && mo >= thr_.min_pos) {
          const Box box = load_box(i);
          gts_.grids[img].for_each_candidate(Kind::bounds(box), [&](std::int64_t g) {
            const T gm = gt_max[g];
            if (g > match && gm > T(0) && gm >= thr_.min_pos && gm <= mo &&
                Kind::overlap(gts[g], box, false) == gm) {
              match = g;
            }
          });
        }
        if (match >= 0) gt_inds_[i] = match + 1;
      }
      if (labels != nullptr) {
        const std::int64_t k = gt_inds_[i];
        labels[i] = k > 0 ? gt_labels[g0 + k - 1] : -1;
      }
    }
  }

  void write_kth_largest() {
    const std::int64_t* topk = reinterpret_cast<const std::int64_t*>(a_.topk);
    T* out = reinterpret_cast<T*>(a_.kth_largest);
    parallel_for(a_.num_images, 1, threads_, [&](std::int64_t begin, std::int64_t end) {
      std::vector<T> values;
      for (std::int64_t img = begin; img < end; ++img) {
        const std::int64_t n = num_boxes(img), k = topk[img];
        if (k < 1 || k > n) {
          out[img] = std::numeric_limits<T>::quiet_NaN();
          continue;
        }
        const T* mo = max_overlaps_ + box_offsets_[img];
        values.assign(mo, mo + n);
        std::nth_element(values.begin(), values.begin() + (k - 1), values.end(), std::greater<T>());
        out[img] = values[k - 1];
      }
    });
  }

  static constexpr std::int64_t kMinChunk = 1024;

  const MaxIouAssignArgs& a_;
  const int threads_;
  const Thresholds<T> thr_;
  const std::int64_t* box_offsets_;
  const std::int64_t* gt_offsets_;
  std::int64_t* gt_inds_;
  T* max_overlaps_;
  IndexedBoxes<Kind> gts_;
  std::optional<IndexedBoxes<Kind>> ignore_;  // the ignore boxes, when a box can be ignored

  std::vector<Chunk> chunks_;
  std::vector<std::int64_t> image_chunk_begin_;
  std::vector<T> partial_max_;
  std::vector<std::int64_t> partial_argmax_;
  std::vector<T> gt_max_;
  std::vector<std::int64_t> gt_argmax_box_;
};

}  // namespace

void max_iou_assign_cpu(const MaxIouAssignArgs& args, int num_threads) {
  assign::dispatch_box_kind(args.box_kind, args.dtype, [&](auto kind) {
    CpuAssigner<decltype(kind)>(args, num_threads).run();
  });
}

}  // namespace dbf_ext
