// CPU reference of token permutation (DESIGN §4, seed 003): preprocess, pre_reorder,
// post_reorder. The CUDA kernels in permute.cu are compared with these bitwise (layouts) and by
// relative L2 (sums).
#pragma once

#include <cstdint>

#include "epmoe/core/tensor.h"

namespace epmoe {

// Stable sort of the (t, k) pairs by expert.
// seg_indptr: [E_loc + 1] i32, rows of local expert e are [seg_indptr[e], seg_indptr[e+1]).
// src2dst: [T, K'] i32, the pair's row in the sorted buffer; -1 when topk_ids[t,k] is -1 or
//          outside [expert_start, expert_end) (such pairs get no row).
// topk_ids: [T, K'] i32.
void preprocess_cpu(const TensorView& seg_indptr, const TensorView& src2dst,
                    const TensorView& topk_ids, int expert_start, int expert_end);

// sorted[src2dst[t,k]] = x[t].
// sorted: [N, H] bf16|f32; x: [T, H] bf16|f32; src2dst: [T, K'] i32 (rows < N).
void pre_reorder_cpu(const TensorView& sorted, const TensorView& x, const TensorView& src2dst);

// Per-128 FP8 quantisation of one row, the rule every backend uses:
// amax = max(|v| over the block, 1e-4); scale = amax / 448; q = e4m3(v / scale).
// q: [H] e4m3; scales: [ceil(H/128)] f32 (dequantise: q * scale).
void quantize_row_fp8(fp8e4m3* q, float* scales, const float* v, int64_t h);
constexpr int64_t kFp8Block = 128;

// As pre_reorder_cpu, quantising to FP8: sorted: [N, H] e4m3, scales: [N, ceil(H/128)] f32.
void pre_reorder_fp8_cpu(const TensorView& sorted, const TensorView& scales, const TensorView& x,
                         const TensorView& src2dst);

// out[t] = canonical sum over valid slots of w[t,k] · down_out[src2dst[t,k]] (reduce_plan.h),
// f32 accumulation, written once; a token with no valid slot gets zeros.
// out: [T, H] f32|bf16; down_out: [N, H] f32|bf16; src2dst, topk_ids: [T, K'] i32;
// topk_weights: [T, K'] f32. topk_ids + id_offset are global expert ids (the reduction tree is
// over [0, num_routed)); ids are only read where src2dst >= 0.
void post_reorder_cpu(const TensorView& out, const TensorView& down_out, const TensorView& src2dst,
                      const TensorView& topk_ids, const TensorView& topk_weights, int num_routed,
                      int id_offset = 0, int threads = 0);

}  // namespace epmoe
