// The one pybind11 module, dbf_ext._C. It takes plain integers (data pointers, sizes, strides,
// dtype codes, device index, stream handle): validation, allocation and dispatch belong to the
// Python layer (dbf_ext/ops). The GIL is released while kernels run.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "box_iou_rotated/box_iou_rotated.h"
#include "common/device_info.h"
#include "common/types.h"

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

  auto make_args = [](const BoxArrayView& b1, const BoxArrayView& b2, int dtype,
                      std::uintptr_t out, bool aligned, bool iof, bool clockwise) {
    return dbf_ext::BoxIouRotatedArgs{b1,      b2,  dbf_ext::dtype_from_code(dtype), out,
                                      aligned, iof, clockwise};
  };
  m.def(
      "box_iou_rotated_cpu",
      [make_args](const BoxArrayView& b1, const BoxArrayView& b2, int dtype, std::uintptr_t out,
                  bool aligned, bool iof, bool clockwise, int num_threads) {
        const auto args = make_args(b1, b2, dtype, out, aligned, iof, clockwise);
        py::gil_scoped_release release;
        dbf_ext::box_iou_rotated_cpu(args, num_threads);
      },
      py::arg("boxes1"), py::arg("boxes2"), py::arg("dtype"), py::arg("out"),
      py::arg("aligned"), py::arg("iof"), py::arg("clockwise"), py::arg("num_threads"));
#if defined(DBF_EXT_WITH_CUDA)
  m.def(
      "box_iou_rotated_cuda",
      [make_args](const BoxArrayView& b1, const BoxArrayView& b2, int dtype, std::uintptr_t out,
                  bool aligned, bool iof, bool clockwise, int device, std::uintptr_t stream) {
        const auto args = make_args(b1, b2, dtype, out, aligned, iof, clockwise);
        py::gil_scoped_release release;
        dbf_ext::box_iou_rotated_cuda(args, device, stream);
      },
      py::arg("boxes1"), py::arg("boxes2"), py::arg("dtype"), py::arg("out"),
      py::arg("aligned"), py::arg("iof"), py::arg("clockwise"), py::arg("device"),
      py::arg("stream"));
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "dbf_ext compiled kernels (raw-pointer interface; use dbf_ext.ops)";
  m.def("build_info", &build_info);
  m.def("cuda_status", &cuda_status);
  bind_box_iou_rotated(m);
}
