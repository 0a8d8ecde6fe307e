#include "nms_rotated/nms_rotated.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/geometry.h"
#include "common/parallel.h"

namespace dbf_ext {
namespace {

using geometry::PreparedBox;

// Boxes and labels gathered in decreasing score order, boxes prepared once (sin/cos, bounds).
template <typename T>
struct ScoreOrderedBoxes {
  std::vector<PreparedBox<T>> boxes;
  std::vector<std::int64_t> labels;  // all 0 without labels
};

template <typename T>
ScoreOrderedBoxes<T> gather_in_score_order(const NmsRotatedArgs& args, int num_threads) {
  const std::int64_t n = args.boxes.count;
  const auto* order = reinterpret_cast<const std::int64_t*>(args.order);
  const auto* labels = reinterpret_cast<const std::int64_t*>(args.labels);
  const T* data = args.boxes.ptr<T>();
  ScoreOrderedBoxes<T> sorted;
  sorted.boxes.resize(static_cast<size_t>(n));
  sorted.labels.assign(static_cast<size_t>(n), 0);
  parallel_for(n, 4096, num_threads, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t i = begin; i < end; ++i) {
      sorted.boxes[i] = geometry::load_box(data, order[i], args.boxes.row_stride,
                                           args.boxes.col_stride, /*clockwise=*/true);
      if (labels != nullptr) sorted.labels[i] = labels[order[i]];
    }
  });
  return sorted;
}

// The kept boxes, found by position, so that a candidate is tested only against kept boxes
// whose bounding boxes can overlap its own.
//
// A hierarchy of uniform grids over the extent of the valid boxes: level l has square cells of
// side base * 2^l and holds the boxes whose bounding box fits in one cell, each filed once under
// the cell of its centre. If the bounding box of a box filed at level l overlaps a query's
// bounding box Q, its centre lies within half a cell of Q, so a query visits at each non-empty
// level only the cells within half a cell of Q: a handful at levels as coarse as Q, more at
// finer levels for a query much larger than the typical box. The base side is the median box
// size (a typical box fits one cell), made coarser when needed to bound the number of cells by
// O(N); the top level is a single cell and takes any box, however large. Positions are computed
// in double relative to the corner of the boxes' extent, so the grid works the same for boxes
// far from the origin.
//
// Every box's cell is known before the sweep, so each cell gets a contiguous run of slots sized
// for all the boxes that could be filed there; kept boxes are copied into their cell's run, and
// a query scans contiguous memory.
template <typename T>
class KeptBoxGrid {
 public:
  struct KeptBox {
    PreparedBox<T> box;
    std::int64_t label;
  };

  KeptBoxGrid(const ScoreOrderedBoxes<T>& sorted, int num_threads) : sorted_(sorted) {
    lay_out();
    if (levels_.empty()) return;  // no valid box: nothing will be filed or queried
    const auto n = static_cast<std::int64_t>(sorted.boxes.size());
    filing_cell_.assign(static_cast<size_t>(n), -1);
    parallel_for(n, 4096, num_threads, [&](std::int64_t begin, std::int64_t end) {
      for (std::int64_t i = begin; i < end; ++i) {
        if (sorted.boxes[i].valid) filing_cell_[i] = cell_of(sorted.boxes[i]);
      }
    });
    const Level& top = levels_.back();
    cell_start_.assign(static_cast<size_t>(top.first_cell + top.nx * top.ny + 1), 0);
    for (const std::int64_t cell : filing_cell_) {
      if (cell >= 0) ++cell_start_[cell + 1];
    }
    for (size_t c = 1; c < cell_start_.size(); ++c) cell_start_[c] += cell_start_[c - 1];
    cell_fill_.assign(cell_start_.size() - 1, 0);
    slots_.resize(static_cast<size_t>(cell_start_.back()));
  }

  // Files box `position` (in score order; a valid box) as kept.
  void insert(std::int64_t position) {
    const std::int64_t cell = filing_cell_[position];
    slots_[cell_start_[cell] + cell_fill_[cell]++] =
        KeptBox{sorted_.boxes[position], sorted_.labels[position]};
    ++levels_[level_of_cell(cell)].count;
  }

  // Calls is_suppressor(kept_box) for the kept boxes near `box` until one returns true;
  // returns whether one did. Every kept box whose bounding box overlaps box's (as
  // geometry::bounding_boxes_overlap decides, rounding included) is among those visited.
  template <typename F>
  bool any_near(const PreparedBox<T>& box, const F& is_suppressor) const {
    // bounding_boxes_overlap accepts |dx| <= ex_a + ex_b evaluated in T: the exact |dx| can
    // exceed the sum by ~3 ulps of it; the margin in cells covers rounding of the double
    // arithmetic here.
    constexpr double relative_slack = 1 + 4 * geometry::NumericTraits<T>::epsilon;
    constexpr double cell_slack = 1e-6;
    const double ux = box.cx - origin_x_, uy = box.cy - origin_y_;
    for (const Level& level : levels_) {
      if (level.count == 0) continue;
      const double reach_x = (0.5 * level.cell + box.extent_x) * relative_slack;
      const double reach_y = (0.5 * level.cell + box.extent_y) * relative_slack;
      const std::int64_t x0 = clamped_floor((ux - reach_x) * level.inv_cell - cell_slack, level.nx);
      const std::int64_t x1 = clamped_floor((ux + reach_x) * level.inv_cell + cell_slack, level.nx);
      const std::int64_t y0 = clamped_floor((uy - reach_y) * level.inv_cell - cell_slack, level.ny);
      const std::int64_t y1 = clamped_floor((uy + reach_y) * level.inv_cell + cell_slack, level.ny);
      for (std::int64_t iy = y0; iy <= y1; ++iy) {
        for (std::int64_t cell = level.first_cell + iy * level.nx + x0,
                          last = level.first_cell + iy * level.nx + x1;
             cell <= last; ++cell) {
          const KeptBox* kept = slots_.data() + cell_start_[cell];
          for (const KeptBox* end = kept + cell_fill_[cell]; kept != end; ++kept) {
            if (is_suppressor(*kept)) return true;
          }
        }
      }
    }
    return false;
  }

 private:
  struct Level {
    double cell;      // side of a cell; boxes filed here have bounding-box sides <= cell
    double inv_cell;  // 1 / cell, the same value for filing and querying
    std::int64_t nx, ny;
    std::int64_t first_cell;  // global index of this level's first cell
    std::int64_t count;       // kept boxes filed at this level
  };

  static double cells_along(double span, double cell) {
    return std::max(1.0, std::ceil(span / cell));
  }

  // floor(t) clamped to [0, cells - 1]; monotone in t, so clamping never loses a neighbour.
  static std::int64_t clamped_floor(double t, std::int64_t cells) {
    if (!(t > 0)) return 0;
    if (t >= static_cast<double>(cells - 1)) return cells - 1;
    return static_cast<std::int64_t>(t);
  }

  void lay_out() {
    std::vector<double> sizes;
    double min_x = 0, max_x = 0, min_y = 0, max_y = 0;
    for (const auto& b : sorted_.boxes) {
      if (!b.valid) continue;
      const double ex = b.extent_x, ey = b.extent_y;
      if (sizes.empty()) {
        min_x = max_x = b.cx;
        min_y = max_y = b.cy;
      }
      min_x = std::min(min_x, b.cx - ex);
      max_x = std::max(max_x, b.cx + ex);
      min_y = std::min(min_y, b.cy - ey);
      max_y = std::max(max_y, b.cy + ey);
      sizes.push_back(2 * std::max(ex, ey));
    }
    if (sizes.empty()) return;
    origin_x_ = min_x;
    origin_y_ = min_y;
    const double span_x = max_x - min_x, span_y = max_y - min_y;
    auto median = sizes.begin() + sizes.size() / 2;
    std::nth_element(sizes.begin(), median, sizes.end());
    double base = *median;
    if (!(std::isfinite(span_x) && std::isfinite(span_y) && std::isfinite(base) && base > 0)) {
      levels_.push_back(Level{1.0, 1.0, 1, 1, 0, 0});  // one cell for everything
      return;
    }
    const double max_cells = 2.0 * static_cast<double>(sizes.size()) + 64.0;
    for (double cells = cells_along(span_x, base) * cells_along(span_y, base); cells > max_cells;
         cells = cells_along(span_x, base) * cells_along(span_y, base)) {
      base *= std::max(1.25, std::sqrt(cells / max_cells));
    }
    std::int64_t first_cell = 0;
    for (double cell = base;; cell *= 2) {
      const auto nx = static_cast<std::int64_t>(cells_along(span_x, cell));
      const auto ny = static_cast<std::int64_t>(cells_along(span_y, cell));
      levels_.push_back(Level{cell, 1.0 / cell, nx, ny, first_cell, 0});
      first_cell += nx * ny;
      if (nx == 1 && ny == 1) break;
    }
  }

  std::int64_t cell_of(const PreparedBox<T>& box) const {
    const double size = 2 * std::max<double>(box.extent_x, box.extent_y);
    size_t l = 0;
    while (l + 1 < levels_.size() && size > levels_[l].cell) ++l;
    const Level& level = levels_[l];
    const std::int64_t ix = clamped_floor((box.cx - origin_x_) * level.inv_cell, level.nx);
    const std::int64_t iy = clamped_floor((box.cy - origin_y_) * level.inv_cell, level.ny);
    return level.first_cell + iy * level.nx + ix;
  }

  size_t level_of_cell(std::int64_t cell) const {
    size_t l = 0;
    while (l + 1 < levels_.size() && cell >= levels_[l + 1].first_cell) ++l;
    return l;
  }

  const ScoreOrderedBoxes<T>& sorted_;
  double origin_x_ = 0, origin_y_ = 0;
  std::vector<Level> levels_;
  std::vector<std::int64_t> filing_cell_;  // per box in score order, -1 for invalid boxes
  std::vector<std::int64_t> cell_start_;   // per cell + 1: first slot (prefix sums)
  std::vector<std::int64_t> cell_fill_;    // per cell: slots taken by kept boxes
  std::vector<KeptBox> slots_;
};

// Greedy NMS is sequential by nature (whether a box is kept depends on every earlier decision);
// the grid makes each decision cost a few exact IoU tests instead of one per kept box.
template <typename T>
std::int64_t run(const NmsRotatedArgs& args, int num_threads) {
  const ScoreOrderedBoxes<T> sorted = gather_in_score_order<T>(args, num_threads);
  const auto* order = reinterpret_cast<const std::int64_t*>(args.order);
  auto* keep = reinterpret_cast<std::int64_t*>(args.keep);
  const double threshold = args.iou_threshold;
  KeptBoxGrid<T> kept(sorted, num_threads);
  std::int64_t count = 0;
  for (std::int64_t i = 0; i < args.boxes.count; ++i) {
    const PreparedBox<T>& box = sorted.boxes[i];
    if (box.valid) {
      const std::int64_t label = sorted.labels[i];
      const bool suppressed = kept.any_near(box, [&](const typename KeptBoxGrid<T>::KeptBox& k) {
        return k.label == label && suppresses(k.box, box, threshold);
      });
      if (suppressed) continue;
      kept.insert(i);
    }
    keep[count++] = order[i];
  }
  return count;
}

}  // namespace

std::int64_t nms_rotated_cpu(const NmsRotatedArgs& args, int num_threads) {
  return dispatch_float(args.dtype,
                        [&](auto zero) { return run<decltype(zero)>(args, num_threads); });
}

}  // namespace dbf_ext
