// CPU reference of the expert computation (DESIGN §3): expert(x) = down · (silu(gate·x) ⊙ up·x),
// f32 throughout, for the contiguous (normal mode) and masked (low-latency) layouts.
#pragma once

#include <cstdint>

#include "epmoe/core/tensor.h"

namespace epmoe {

// out: [M, I] f32; in: [M, 2I] f32 (gate half then up half). out = silu(g) * u.
void silu_and_mul_cpu(const TensorView& out, const TensorView& in);

// A view of expert `e` of a bank tensor [E_bank, a, b] as [a, b].
TensorView bank_slice(const TensorView& bank, int64_t e);

// One MLP over rows: out: [M, H] f32; in: [M, H] bf16|f32; w13: [2I, H]; w2: [H, I].
// FP8 weights (f8e4m3) need their block scales (MoeWeights' layout): w13_scale
// [2·ceil(I/128), ceil(H/128)] f32 (gate blocks, then up blocks), w2_scale
// [ceil(H/128), ceil(I/128)] f32; they are dequantised exactly in f32 (linear_rows_cpu).
void mlp_rows_cpu(float* out, const TensorView& in, int64_t row_begin, int64_t rows,
                  const TensorView& w13, const TensorView& w2, const TensorView& w13_scale = {},
                  const TensorView& w2_scale = {});

// Contiguous layout: rows [seg_indptr[e], seg_indptr[e+1]) go through bank expert
// bank_offset + e. out: [N, H] f32; in: [N, H] bf16|f32; seg_indptr: [E_loc+1] i32;
// w13: [E_bank, 2I, H]; w2: [E_bank, H, I]; FP8 banks with w13_scale [E_bank, 2·ceil(I/128),
// ceil(H/128)] and w2_scale [E_bank, ceil(H/128), ceil(I/128)] f32 (MoeWeights' fields).
void experts_contiguous_cpu(const TensorView& out, const TensorView& in,
                            const TensorView& seg_indptr, const TensorView& w13,
                            const TensorView& w2, int bank_offset, int threads = 0,
                            const TensorView& w13_scale = {}, const TensorView& w2_scale = {});

// Masked layout: rows [0, count[e]) of in[e] go through bank expert bank_offset + e; rows beyond
// count are neither read nor written. out: [E_loc, M_max, H] f32; in: [E_loc, M_max, H] bf16|f32;
// count: [E_loc] i32.
void experts_masked_cpu(const TensorView& out, const TensorView& in, const TensorView& count,
                        const TensorView& w13, const TensorView& w2, int bank_offset,
                        int threads = 0, const TensorView& w13_scale = {},
                        const TensorView& w2_scale = {});

}  // namespace epmoe
