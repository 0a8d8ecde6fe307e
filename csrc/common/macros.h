// Portability macros shared by the CPU (g++) and CUDA (nvcc) builds.
#pragma once

#if defined(__CUDACC__)
#define DBF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DBF_HOST_DEVICE inline
#endif
