#pragma once

// Marks inline math that both the CPU kernels and the CUDA kernels compile.
#if defined(__CUDACC__)
#define PYCONVEXT_HOST_DEVICE __host__ __device__
#else
#define PYCONVEXT_HOST_DEVICE
#endif
