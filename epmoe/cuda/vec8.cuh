// Eight bf16 values moved as one 16-byte vector, widened to f32: the inner step of the
// row-streaming kernels (permutation, SiLU, expert-parallel records and reductions).
#pragma once

#include <cuda_bf16.h>

namespace epmoe::cuda {

__device__ __forceinline__ void bf16x8_to_f32(float* f, const uint4& v) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 q = __bfloat1622float2(h[i]);
    f[2 * i] = q.x;
    f[2 * i + 1] = q.y;
  }
}

}  // namespace epmoe::cuda
