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

// Eight values read through the read-only cache (data no other kernel writes meanwhile), as f32.
__device__ __forceinline__ void ldg8(float* f, const __nv_bfloat16* p) {
  bf16x8_to_f32(f, __ldg(reinterpret_cast<const uint4*>(p)));
}
__device__ __forceinline__ void ldg8(float* f, const float* p) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(p));
  const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
  f[0] = a.x;
  f[1] = a.y;
  f[2] = a.z;
  f[3] = a.w;
  f[4] = b.x;
  f[5] = b.y;
  f[6] = b.z;
  f[7] = b.w;
}

}  // namespace epmoe::cuda
