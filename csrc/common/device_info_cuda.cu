// Build and runtime facts about CUDA, queried through this module's own (static) runtime.
#include "common/device_info.h"

#include <cuda_runtime.h>

namespace dbf_ext {

CudaRuntimeStatus cuda_runtime_status() {
  CudaRuntimeStatus status;
  // The versions first: they are known even when the driver is too old for this runtime,
  // which is when they are needed to explain the failure.
  int driver = 0;
  if (cudaDriverGetVersion(&driver) == cudaSuccess) status.driver_version = driver;
  int runtime = 0;
  if (cudaRuntimeGetVersion(&runtime) == cudaSuccess) status.runtime_version = runtime;
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error of a failed driver lookup
    status.error = std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
    return status;
  }
  status.device_count = count;
  return status;
}

}  // namespace dbf_ext
