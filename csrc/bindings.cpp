// The one pybind11 module, dbf_ext._C. It takes plain integers (data pointers, sizes, strides,
// dtype codes, device index, stream handle): validation, allocation and dispatch belong to the
// Python layer (dbf_ext/ops). The GIL is released while kernels run.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>

#include "assign/assign.h"
#include "box_iou_rotated/box_iou_rotated.h"
#include "common/device_info.h"
#include "common/types.h"
#include "feature_cache/feature_cache.h"
#include "mask_to_obb/mask_to_obb.h"
#include "nms_rotated/nms_rotated.h"
#include "roi_align_rotated/roi_align_rotated.h"

namespace py = pybind11;
using dbf_ext::BoxArrayView;

namespace {

#ifndef DBF_EXT_CUDA_ARCHS
#define DBF_EXT_CUDA_ARCHS ""
#endif
#ifndef DBF_EXT_CUDA_COMPILER_VERSION
#define DBF_EXT_CUDA_COMPILER_VERSION ""
#endif

py::dict build_info() {
  py::dict info;
#if defined(DBF_EXT_WITH_CUDA)
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  info["cuda_architectures"] = std::string(DBF_EXT_CUDA_ARCHS);
  info["cuda_compiler_version"] = std::string(DBF_EXT_CUDA_COMPILER_VERSION);
  info["cxx_compiler"] = std::string(__VERSION__);
  return info;
}

py::dict cuda_status() {
  py::dict status;
#if defined(DBF_EXT_WITH_CUDA)
  const dbf_ext::CudaRuntimeStatus s = dbf_ext::cuda_runtime_status();
  status["device_count"] = s.device_count;
  status["driver_version"] = s.driver_version;
  status["runtime_version"] = s.runtime_version;
  status["error"] = s.error;
#else
  status["device_count"] = 0;
  status["driver_version"] = 0;
  status["runtime_version"] = 0;
  status["error"] = std::string("dbf_ext was built without CUDA kernels");
#endif
  return status;
}

BoxArrayView box_view(std::uintptr_t data, std::int64_t count, std::int64_t row_stride,
                      std::int64_t col_stride) {
  return BoxArrayView{data, count, row_stride, col_stride};
}

void bind_box_iou_rotated(py::module_& m) {
  py::class_<BoxArrayView>(m, "BoxArrayView")
      .def(py::init(&box_view), py::arg("data"), py::arg("count"), py::arg("row_stride"),
           py::arg("col_stride"));

  auto make_args = [](const BoxArrayView& b1, const BoxArrayView& b2, int dtype, std::uintptr_t out,
                      bool aligned, bool iof, bool clockwise) {
    return dbf_ext::BoxIouRotatedArgs{b1,  b2,       dbf_ext::dtype_from_code(dtype), out, aligned,
                                      iof, clockwise};
  };
  m.def(
      "box_iou_rotated_cpu",
      [make_args](const BoxArrayView& b1, const BoxArrayView& b2, int dtype, std::uintptr_t out,
                  bool aligned, bool iof, bool clockwise, int num_threads) {
        const auto args = make_args(b1, b2, dtype, out, aligned, iof, clockwise);
        py::gil_scoped_release release;
        dbf_ext::box_iou_rotated_cpu(args, num_threads);
      },
      py::arg("boxes1"), py::arg("boxes2"), py::arg("dtype"), py::arg("out"), py::arg("aligned"),
      py::arg("iof"), py::arg("clockwise"), py::arg("num_threads"));
#if defined(DBF_EXT_WITH_CUDA)
  m.def(
      "box_iou_rotated_cuda",
      [make_args](const BoxArrayView& b1, const BoxArrayView& b2, int dtype, std::uintptr_t out,
                  bool aligned, bool iof, bool clockwise, int device, std::uintptr_t stream) {
        const auto args = make_args(b1, b2, dtype, out, aligned, iof, clockwise);
        py::gil_scoped_release release;
        dbf_ext::box_iou_rotated_cuda(args, device, stream);
      },
      py::arg("boxes1"), py::arg("boxes2"), py::arg("dtype"), py::arg("out"), py::arg("aligned"),
      py::arg("iof"), py::arg("clockwise"), py::arg("device"), py::arg("stream"));
#endif
}

void bind_nms_rotated(py::module_& m) {
  auto make_args = [](const BoxArrayView& boxes, int dtype, std::uintptr_t order,
                      std::uintptr_t labels, double iou_threshold, std::uintptr_t keep) {
    return dbf_ext::NmsRotatedArgs{
        boxes, dbf_ext::dtype_from_code(dtype), order, labels, iou_threshold, keep};
  };
  m.def(
      "nms_rotated_cpu",
      [make_args](const BoxArrayView& boxes, int dtype, std::uintptr_t order, std::uintptr_t labels,
                  double iou_threshold, std::uintptr_t keep, int num_threads) {
        const auto args = make_args(boxes, dtype, order, labels, iou_threshold, keep);
        py::gil_scoped_release release;
        return dbf_ext::nms_rotated_cpu(args, num_threads);
      },
      py::arg("boxes"), py::arg("dtype"), py::arg("order"), py::arg("labels"),
      py::arg("iou_threshold"), py::arg("keep"), py::arg("num_threads"));
#if defined(DBF_EXT_WITH_CUDA)
  m.def(
      "nms_rotated_cuda",
      [make_args](const BoxArrayView& boxes, int dtype, std::uintptr_t order, std::uintptr_t labels,
                  double iou_threshold, std::uintptr_t keep, std::uintptr_t mask,
                  std::int64_t mask_words, std::uintptr_t removed, std::uintptr_t keep_count,
                  int device, std::uintptr_t stream) {
        const auto args = make_args(boxes, dtype, order, labels, iou_threshold, keep);
        const dbf_ext::NmsRotatedCudaScratch scratch{mask, mask_words, removed, keep_count};
        py::gil_scoped_release release;
        dbf_ext::nms_rotated_cuda(args, scratch, device, stream);
      },
      py::arg("boxes"), py::arg("dtype"), py::arg("order"), py::arg("labels"),
      py::arg("iou_threshold"), py::arg("keep"), py::arg("mask"), py::arg("mask_words"),
      py::arg("removed"), py::arg("keep_count"), py::arg("device"), py::arg("stream"));
#endif
}

// Levels arrive as tuples (data, C, H, W, stride_n, stride_c, stride_h, stride_w, slab_offset,
// scale_offset), built by dbf_ext/cache/layout.py.
using LevelTuple =
    std::tuple<std::uintptr_t, std::int64_t, std::int64_t, std::int64_t, std::int64_t, std::int64_t,
               std::int64_t, std::int64_t, std::int64_t, std::int64_t>;

dbf_ext::FeatureCacheArgs feature_cache_args(const std::vector<LevelTuple>& levels, int map_dtype,
                                             int storage_dtype, std::int64_t batch,
                                             std::uintptr_t slab_addresses) {
  dbf_ext::FeatureCacheArgs args;
  for (const auto& t : levels) {
    args.levels.push_back(dbf_ext::FeatureLevelDesc{
        std::get<0>(t), std::get<1>(t), std::get<2>(t), std::get<3>(t), std::get<4>(t),
        std::get<5>(t), std::get<6>(t), std::get<7>(t), std::get<8>(t), std::get<9>(t)});
  }
  args.map_dtype = dbf_ext::dtype_from_code(map_dtype);
  args.storage_dtype = dbf_ext::dtype_from_code(storage_dtype);
  args.batch = batch;
  args.slab_addresses = slab_addresses;
  return args;
}

template <void (*Kernel)(const dbf_ext::FeatureCacheArgs&, int)>
void bind_feature_cache_cpu(py::module_& m, const char* name) {
  m.def(
      name,
      [](const std::vector<LevelTuple>& levels, int map_dtype, int storage_dtype,
         std::int64_t batch, std::uintptr_t slab_addresses, int num_threads) {
        const auto args =
            feature_cache_args(levels, map_dtype, storage_dtype, batch, slab_addresses);
        py::gil_scoped_release release;
        Kernel(args, num_threads);
      },
      py::arg("levels"), py::arg("map_dtype"), py::arg("storage_dtype"), py::arg("batch"),
      py::arg("slab_addresses"), py::arg("num_threads"));
}

#if defined(DBF_EXT_WITH_CUDA)
template <void (*Kernel)(const dbf_ext::FeatureCacheArgs&, int, std::uintptr_t)>
void bind_feature_cache_cuda(py::module_& m, const char* name) {
  m.def(
      name,
      [](const std::vector<LevelTuple>& levels, int map_dtype, int storage_dtype,
         std::int64_t batch, std::uintptr_t slab_addresses, int device, std::uintptr_t stream) {
        const auto args =
            feature_cache_args(levels, map_dtype, storage_dtype, batch, slab_addresses);
        py::gil_scoped_release release;
        Kernel(args, device, stream);
      },
      py::arg("levels"), py::arg("map_dtype"), py::arg("storage_dtype"), py::arg("batch"),
      py::arg("slab_addresses"), py::arg("device"), py::arg("stream"));
}
#endif

void bind_feature_cache(py::module_& m) {
  bind_feature_cache_cpu<dbf_ext::pack_features_cpu>(m, "pack_features_cpu");
  bind_feature_cache_cpu<dbf_ext::unpack_features_cpu>(m, "unpack_features_cpu");
#if defined(DBF_EXT_WITH_CUDA)
  bind_feature_cache_cuda<dbf_ext::pack_features_cuda>(m, "pack_features_cuda");
  bind_feature_cache_cuda<dbf_ext::unpack_features_cuda>(m, "unpack_features_cuda");
#endif
}

void bind_assign(py::module_& m) {
  using dbf_ext::MaxIouAssignArgs;
  using dbf_ext::MaxIouAssignOptions;
  // neg_iou_thr, a std::pair, converts from and to a Python (lo, hi) tuple (pybind11/stl.h).
  py::class_<MaxIouAssignOptions>(m, "MaxIouAssignOptions")
      .def(py::init<>())
      .def_readwrite("pos_iou_thr", &MaxIouAssignOptions::pos_iou_thr)
      .def_readwrite("neg_iou_thr", &MaxIouAssignOptions::neg_iou_thr)
      .def_readwrite("min_pos_iou", &MaxIouAssignOptions::min_pos_iou)
      .def_readwrite("gt_max_assign_all", &MaxIouAssignOptions::gt_max_assign_all)
      .def_readwrite("match_low_quality", &MaxIouAssignOptions::match_low_quality)
      .def_readwrite("ignore_iof_thr", &MaxIouAssignOptions::ignore_iof_thr)
      .def_readwrite("ignore_wrt_candidates", &MaxIouAssignOptions::ignore_wrt_candidates);
  py::class_<MaxIouAssignArgs>(m, "MaxIouAssignArgs")
      .def(py::init<>())
      .def_readwrite("box_kind", &MaxIouAssignArgs::box_kind)
      .def_readwrite("dtype", &MaxIouAssignArgs::dtype)
      .def_readwrite("num_images", &MaxIouAssignArgs::num_images)
      .def_readwrite("boxes", &MaxIouAssignArgs::boxes)
      .def_readwrite("gts", &MaxIouAssignArgs::gts)
      .def_readwrite("ignore", &MaxIouAssignArgs::ignore)
      .def_readwrite("box_offsets", &MaxIouAssignArgs::box_offsets)
      .def_readwrite("gt_offsets", &MaxIouAssignArgs::gt_offsets)
      .def_readwrite("ignore_offsets", &MaxIouAssignArgs::ignore_offsets)
      .def_readwrite("max_boxes_per_image", &MaxIouAssignArgs::max_boxes_per_image)
      .def_readwrite("max_gts_per_image", &MaxIouAssignArgs::max_gts_per_image)
      .def_readwrite("gt_labels", &MaxIouAssignArgs::gt_labels)
      .def_readwrite("options", &MaxIouAssignArgs::options)
      .def_readwrite("gt_inds", &MaxIouAssignArgs::gt_inds)
      .def_readwrite("max_overlaps", &MaxIouAssignArgs::max_overlaps)
      .def_readwrite("labels", &MaxIouAssignArgs::labels)
      .def_readwrite("topk", &MaxIouAssignArgs::topk)
      .def_readwrite("kth_largest", &MaxIouAssignArgs::kth_largest)
      .def_readwrite("gt_max", &MaxIouAssignArgs::gt_max)
      .def_readwrite("gt_argmax_box", &MaxIouAssignArgs::gt_argmax_box)
      .def_readwrite("image_first_live", &MaxIouAssignArgs::image_first_live);
  m.def(
      "max_iou_assign_cpu",
      [](const MaxIouAssignArgs& args, int num_threads) {
        py::gil_scoped_release release;
        dbf_ext::max_iou_assign_cpu(args, num_threads);
      },
      py::arg("args"), py::arg("num_threads"));
#if defined(DBF_EXT_WITH_CUDA)
  m.def(
      "max_iou_assign_cuda",
      [](const MaxIouAssignArgs& args, int device, std::uintptr_t stream) {
        py::gil_scoped_release release;
        dbf_ext::max_iou_assign_cuda(args, device, stream);
      },
      py::arg("args"), py::arg("device"), py::arg("stream"));
#endif
}

void bind_mask_to_obb(py::module_& m) {
  m.def("mask_to_obb_hull_capacity", &dbf_ext::mask_obb::hull_capacity, py::arg("height"),
        "Hull vertices (the CUDA scratch's rows) per mask of this height.");
  auto make_args = [](std::uintptr_t masks, std::int64_t count, std::int64_t height,
                      std::int64_t width, int dtype, std::uintptr_t out) {
    return dbf_ext::MaskToObbArgs{masks, count, height, width, dbf_ext::dtype_from_code(dtype),
                                  out};
  };
  m.def(
      "mask_to_obb_cpu",
      [make_args](std::uintptr_t masks, std::int64_t count, std::int64_t height, std::int64_t width,
                  int dtype, std::uintptr_t out, int num_threads) {
        const auto args = make_args(masks, count, height, width, dtype, out);
        py::gil_scoped_release release;
        dbf_ext::mask_to_obb_cpu(args, num_threads);
      },
      py::arg("masks"), py::arg("count"), py::arg("height"), py::arg("width"), py::arg("dtype"),
      py::arg("out"), py::arg("num_threads"));
#if defined(DBF_EXT_WITH_CUDA)
  m.def(
      "mask_to_obb_cuda",
      [make_args](std::uintptr_t masks, std::int64_t count, std::int64_t height, std::int64_t width,
                  int dtype, std::uintptr_t out, std::uintptr_t row_extents, std::uintptr_t hull,
                  int device, std::uintptr_t stream) {
        const auto args = make_args(masks, count, height, width, dtype, out);
        const dbf_ext::MaskToObbCudaScratch scratch{row_extents, hull};
        py::gil_scoped_release release;
        dbf_ext::mask_to_obb_cuda(args, scratch, device, stream);
      },
      py::arg("masks"), py::arg("count"), py::arg("height"), py::arg("width"), py::arg("dtype"),
      py::arg("out"), py::arg("row_extents"), py::arg("hull"), py::arg("device"),
      py::arg("stream"));
#endif
}

void bind_roi_align_rotated(py::module_& m) {
  using dbf_ext::RoiAlignRotatedBackwardArgs;
  using dbf_ext::RoiAlignRotatedForwardArgs;
  using dbf_ext::RoiAlignRotatedGeometry;
  py::class_<RoiAlignRotatedGeometry>(m, "RoiAlignRotatedGeometry")
      .def(py::init<>())
      .def_readwrite("rois", &RoiAlignRotatedGeometry::rois)
      .def_readwrite("num_rois", &RoiAlignRotatedGeometry::num_rois)
      .def_readwrite("batch", &RoiAlignRotatedGeometry::batch)
      .def_readwrite("channels", &RoiAlignRotatedGeometry::channels)
      .def_readwrite("height", &RoiAlignRotatedGeometry::height)
      .def_readwrite("width", &RoiAlignRotatedGeometry::width)
      .def_readwrite("pooled_height", &RoiAlignRotatedGeometry::pooled_height)
      .def_readwrite("pooled_width", &RoiAlignRotatedGeometry::pooled_width)
      .def_readwrite("spatial_scale", &RoiAlignRotatedGeometry::spatial_scale)
      .def_readwrite("sampling_ratio", &RoiAlignRotatedGeometry::sampling_ratio)
      .def_readwrite("aligned", &RoiAlignRotatedGeometry::aligned)
      .def_readwrite("clockwise", &RoiAlignRotatedGeometry::clockwise);

  // strides: the features' (n, c, h, w) strides in elements.
  auto forward_args = [](const RoiAlignRotatedGeometry& geometry, std::uintptr_t features,
                         int features_dtype, const std::array<std::int64_t, 4>& strides,
                         std::uintptr_t output) {
    return RoiAlignRotatedForwardArgs{
        geometry,   features,   dbf_ext::dtype_from_code(features_dtype),
        strides[0], strides[1], strides[2],
        strides[3], output};
  };
  auto backward_args = [](const RoiAlignRotatedGeometry& geometry, int dtype,
                          std::uintptr_t grad_output, std::uintptr_t grad_features) {
    return RoiAlignRotatedBackwardArgs{geometry, dbf_ext::dtype_from_code(dtype), grad_output,
                                       grad_features};
  };
  m.def(
      "roi_align_rotated_forward_cpu",
      [forward_args](const RoiAlignRotatedGeometry& geometry, std::uintptr_t features,
                     int features_dtype, const std::array<std::int64_t, 4>& strides,
                     std::uintptr_t output, int num_threads) {
        const auto args = forward_args(geometry, features, features_dtype, strides, output);
        py::gil_scoped_release release;
        dbf_ext::roi_align_rotated_forward_cpu(args, num_threads);
      },
      py::arg("geometry"), py::arg("features"), py::arg("features_dtype"), py::arg("strides"),
      py::arg("output"), py::arg("num_threads"));
  m.def(
      "roi_align_rotated_backward_cpu",
      [backward_args](const RoiAlignRotatedGeometry& geometry, int dtype,
                      std::uintptr_t grad_output, std::uintptr_t grad_features, int num_threads) {
        const auto args = backward_args(geometry, dtype, grad_output, grad_features);
        py::gil_scoped_release release;
        dbf_ext::roi_align_rotated_backward_cpu(args, num_threads);
      },
      py::arg("geometry"), py::arg("dtype"), py::arg("grad_output"), py::arg("grad_features"),
      py::arg("num_threads"));
#if defined(DBF_EXT_WITH_CUDA)
  m.def(
      "roi_align_rotated_forward_cuda",
      [forward_args](const RoiAlignRotatedGeometry& geometry, std::uintptr_t features,
                     int features_dtype, const std::array<std::int64_t, 4>& strides,
                     std::uintptr_t output, int device, std::uintptr_t stream) {
        const auto args = forward_args(geometry, features, features_dtype, strides, output);
        py::gil_scoped_release release;
        dbf_ext::roi_align_rotated_forward_cuda(args, device, stream);
      },
      py::arg("geometry"), py::arg("features"), py::arg("features_dtype"), py::arg("strides"),
      py::arg("output"), py::arg("device"), py::arg("stream"));
  m.def(
      "roi_align_rotated_backward_cuda",
      [backward_args](const RoiAlignRotatedGeometry& geometry, int dtype,
                      std::uintptr_t grad_output, std::uintptr_t grad_features, bool deterministic,
                      int device, std::uintptr_t stream) {
        const auto args = backward_args(geometry, dtype, grad_output, grad_features);
        py::gil_scoped_release release;
        dbf_ext::roi_align_rotated_backward_cuda(args, deterministic, device, stream);
      },
      py::arg("geometry"), py::arg("dtype"), py::arg("grad_output"), py::arg("grad_features"),
      py::arg("deterministic"), py::arg("device"), py::arg("stream"));
#endif
}

}  // namespace

// The codes and sizes that Python must agree with, exported from their single definitions.
void bind_constants(py::module_& m) {
  py::dict dtype_codes;
  dtype_codes["float32"] = static_cast<int>(dbf_ext::DType::Float32);
  dtype_codes["float64"] = static_cast<int>(dbf_ext::DType::Float64);
  dtype_codes["float16"] = static_cast<int>(dbf_ext::DType::Float16);
  dtype_codes["bfloat16"] = static_cast<int>(dbf_ext::DType::BFloat16);
  dtype_codes["float8_e4m3fn"] = static_cast<int>(dbf_ext::DType::Float8E4M3);
  m.attr("DTYPE_CODES") = dtype_codes;
  py::dict box_kind_codes;
  box_kind_codes["hbb"] = static_cast<int>(dbf_ext::BoxKind::Horizontal);
  box_kind_codes["obb"] = static_cast<int>(dbf_ext::BoxKind::Rotated);
  m.attr("BOX_KIND_CODES") = box_kind_codes;
  m.attr("MASK_TO_OBB_MAX_SIDE") = dbf_ext::mask_obb::kMaxSide;
#if defined(DBF_EXT_WITH_CUDA)
  m.attr("NMS_BLOCK_BOXES") = dbf_ext::kNmsBlockBoxes;
#endif
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "dbf_ext compiled kernels (raw-pointer interface; use dbf_ext.ops)";
  m.def("build_info", &build_info);
  m.def("cuda_status", &cuda_status);
  bind_constants(m);
  bind_box_iou_rotated(m);
  bind_assign(m);
  bind_nms_rotated(m);
  bind_feature_cache(m);
  bind_mask_to_obb(m);
  bind_roi_align_rotated(m);
}
