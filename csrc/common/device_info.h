#pragma once
#include <string>

namespace dbf_ext {

struct CudaRuntimeStatus {
  int device_count = 0;
  int driver_version = 0;   // e.g. 13000 for 13.0; 0 when no driver
  int runtime_version = 0;  // of the runtime linked into this module
  std::string error;        // why no device is usable, when the query failed
};

#if defined(DBF_EXT_WITH_CUDA)
CudaRuntimeStatus cuda_runtime_status();
#endif

}  // namespace dbf_ext
