// The CPU reference's only matrix kernel: out = in · Wᵀ with f32 accumulation, written so that
// each output row depends on its own input row and W alone, never on how many rows share the
// call or where the row sits. That is what makes expert-parallel results bitwise equal to the
// single-rank ones (a BLAS library promises no such thing: its blocking and small-matrix paths
// change with M).
#pragma once

#include <cstdint>

#include "epmoe/core/tensor.h"

namespace epmoe {

// out: [M, N] f32 (row stride ldo); in: [M, K] f32 (row stride ldi); w: [N, K] bf16|f32.
// NOTES: per element, 16 interleaved partial sums over k, folded pairwise in a fixed order;
// built with -ffp-contract=off so vector and scalar code paths round identically.
void linear_rows_cpu(float* out, int64_t ldo, const float* in, int64_t ldi, int64_t m,
                     const TensorView& w);

// The same with an FP8 weight: w: [N, K] f8e4m3, w_scale: [ceil(N/128), ceil(K/128)] f32 (value =
// fp8 · scale). Each weight is dequantised exactly (fp8 -> f32, one f32 multiply) before the same
// loop, so the result is bitwise that of the f32 weight dequantize_fp8_block128 gives.
// bf16|f32 weights ignore w_scale.
void linear_rows_cpu(float* out, int64_t ldo, const float* in, int64_t ldi, int64_t m,
                     const TensorView& w, const TensorView& w_scale);

}  // namespace epmoe
