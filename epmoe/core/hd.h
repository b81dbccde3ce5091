// EPMOE_HD marks small functions shared verbatim by the CPU reference and the CUDA kernels,
// so both sides take the same decisions bit for bit (routing scores, reduction plans).
#pragma once

#if defined(__CUDACC__)
#define EPMOE_HD __host__ __device__ __forceinline__
#else
#define EPMOE_HD inline
#endif
