// FP8 e4m3 with one f32 scale per 128 values (DESIGN §3; the dispatch payload, FP8 pre_reorder
// and the SiLU output all follow it; the host twin is quantize_fp8_rows128 in weights/fp8_block.h):
// amax = max(|v|, 1e-4) over the 128 values, scale = amax / 448, q = e4m3(v / scale) rounded to
// nearest even and saturating.
#pragma once

#include <cuda_fp8.h>

#include <cstdint>

namespace epmoe::cuda {

// A 128-value group is held by 16 consecutive lanes (lanes 0-15 or 16-31), 8 values each. Every
// lane of the warp must call this together (it shuffles within each 16-lane half). Lanes that
// hold padding pass zeros. Returns this lane's 8 codes packed little-endian; *scale = the
// group's scale.
__device__ __forceinline__ uint2 quantize8_fp8_group128(const float (&v)[8], float* scale) {
  float amax = 1e-4f;
#pragma unroll
  for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(v[i]));
#pragma unroll
  for (int o = 8; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  const float s = amax / 448.0f;
  uint32_t lo = 0, hi = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    lo |= uint32_t(__nv_cvt_float_to_fp8(v[i] / s, __NV_SATFINITE, __NV_E4M3)) << (8 * i);
    hi |= uint32_t(__nv_cvt_float_to_fp8(v[i + 4] / s, __NV_SATFINITE, __NV_E4M3)) << (8 * i);
  }
  *scale = s;
  return make_uint2(lo, hi);
}

}  // namespace epmoe::cuda
