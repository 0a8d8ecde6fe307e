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

// Makes `device` current for this thread for the guard's lifetime and restores the caller's
// device after (torch's current device is the thread's current device: an op on cuda:1 must
// not leave cuda:1 current for the caller's next allocation).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    cuda_check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) cuda_check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() {
    int current = previous_;
    // A destructor must not throw: a failed restore is left for the next CUDA call to report.
    if (cudaGetDevice(&current) == cudaSuccess && current != previous_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

// The torch stream handle passed from Python as an integer.
inline cudaStream_t as_stream(std::uintptr_t stream) {
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
