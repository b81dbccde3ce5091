// FP8 e4m3 with DeepSeek's block scales, on the host: value = fp8 · scale, where `scale` is the
// checkpoints' `weight_scale_inv` (one f32 per 128 x 128 block of a weight) or the per-128 rule of
// activations (one f32 per row per 128 values). Quantisation: scale = amax / 448 of the block (1
// for an all-zero block), q = e4m3(v / scale) rounded to nearest even, saturating.
// Dequantisation is exact in f32: fp8 -> f32 (exact), times the f32 scale (one rounding), as
// transformers does for FP8 checkpoints.
#pragma once

#include <cstdint>

#include "epmoe/core/tensor.h"

namespace epmoe {

constexpr int64_t kFp8BlockSize = 128;

struct Fp8Tensor {
  Tensor q;      // f8e4m3, the shape of the source
  Tensor scale;  // f32; see the functions for its shape
};

// w: [N, K] or [E, N, K] bf16|f32 -> q of the same shape, scale [ceil(N/128), ceil(K/128)] or
// [E, ceil(N/128), ceil(K/128)] (one per 128 x 128 block of each matrix).
Fp8Tensor quantize_fp8_block128(const TensorView& w);
// Exact inverse map: q [.., N, K] f8e4m3 with scale [.., ceil(N/128), ceil(K/128)] f32 -> f32.
Tensor dequantize_fp8_block128(const TensorView& q, const TensorView& scale);

// x: [..., K] bf16|f32 -> q of the same shape, scale [..., ceil(K/128)] (one per row per 128).
Fp8Tensor quantize_fp8_rows128(const TensorView& x);
// Exact inverse map: q [..., K] f8e4m3 with scale [..., ceil(K/128)] f32 -> f32.
Tensor dequantize_fp8_rows128(const TensorView& q, const TensorView& scale);

}  // namespace epmoe
