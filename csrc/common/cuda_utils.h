// Error and launch helpers for the CUDA kernels (included from .cu files only).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace dbf_ext {

// Turns a CUDA runtime error into a C++ exception, which pybind11 raises as RuntimeError.
inline void cuda_check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("dbf_ext CUDA error in ") + what + ": " +
                             cudaGetErrorName(status) + " (" + cudaGetErrorString(status) + ")");
  }
}

// Makes `device` current for this thread; the stream handle comes from torch.
inline cudaStream_t use_device_and_stream(int device, std::uintptr_t stream) {
  cuda_check(cudaSetDevice(device), "cudaSetDevice");
  return reinterpret_cast<cudaStream_t>(stream);
}

// Checks that the preceding kernel launch was accepted (bad configuration, no kernel image for
// this GPU, ...). Asynchronous faults surface at the next synchronising call.
inline void check_launch(const char* kernel_name) { cuda_check(cudaGetLastError(), kernel_name); }

inline unsigned int blocks_for(std::int64_t n, int threads_per_block) {
  const std::int64_t blocks = (n + threads_per_block - 1) / threads_per_block;
  if (blocks > 0x7fffffff) throw std::length_error("dbf_ext: problem too large for one CUDA grid");
  return static_cast<unsigned int>(blocks < 1 ? 1 : blocks);
}

}  // namespace dbf_ext
