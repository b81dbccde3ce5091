// CUDA token permutation (DESIGN §4, seed 003): preprocess, pre_reorder (bf16 or FP8 per-128),
// post_reorder (canonical reduction tree of reduce_plan.h, f32 accumulation). The CPU reference is
// permute_cpu.h: layouts bitwise, sums by relative L2 (bitwise in practice: same f32 ops).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "epmoe/core/tensor.h"

namespace epmoe::cuda {

// Most local experts preprocess handles (one block scans the per-expert totals).
constexpr int kMaxPreprocessExperts = 1024;

// Scratch of preprocess: per-block per-expert counts.
size_t preprocess_workspace_bytes(int64_t num_pairs, int num_local_experts);

// Stable sort of the (t, k) pairs by expert, on the device, no host synchronisation.
// seg_indptr: [E_loc + 1] i32 (E_loc = expert_end - expert_start <= kMaxPreprocessExperts);
// src2dst: [T, K'] i32, -1 for ids that are -1 or outside [expert_start, expert_end);
// topk_ids: [T, K'] i32; workspace: preprocess_workspace_bytes(T·K', E_loc) bytes of device memory.
void preprocess(const TensorView& seg_indptr, const TensorView& src2dst, const TensorView& topk_ids,
                int expert_start, int expert_end, void* workspace, cudaStream_t stream);

// sorted[src2dst[t,k]] = x[t], 16-byte accesses.
// sorted: [N, H] bf16; x: [T, H] bf16; src2dst: [T, K'] i32. H must be a multiple of 8.
// NOTES: rows >= N in src2dst are skipped (the device cannot throw; preprocess never makes them).
void pre_reorder(const TensorView& sorted, const TensorView& x, const TensorView& src2dst,
                 cudaStream_t stream);

// As pre_reorder, quantising each row to FP8 e4m3 with one f32 scale per 128 values
// (quantize_row_fp8's rule: amax = max(|v|, 1e-4), scale = amax / 448, q = e4m3(v / scale)).
// sorted: [N, H] e4m3; scales: [N, ceil(H/128)] f32; x: [T, H] bf16; src2dst: [T, K'] i32.
void pre_reorder_fp8(const TensorView& sorted, const TensorView& scales, const TensorView& x,
                     const TensorView& src2dst, cudaStream_t stream);

// out[t] = Σ over valid slots of w[t,k] · down_out[src2dst[t,k]], added in the canonical order of
// plan_reduce (leaf = w·row in f32, then the plan's merges in f32), written once; a token with no
// valid slot gets zeros. Any H (16-byte path when H % 8 == 0, scalar otherwise).
// out: [T, H] f32|bf16; down_out: [N, H] bf16|f32; src2dst, topk_ids: [T, K'] i32 (K' <= 32);
// topk_weights: [T, K'] f32; topk_ids + id_offset are global ids, the tree spans [0, num_routed).
void post_reorder(const TensorView& out, const TensorView& down_out, const TensorView& src2dst,
                  const TensorView& topk_ids, const TensorView& topk_weights, int num_routed,
                  int id_offset, cudaStream_t stream);

}  // namespace epmoe::cuda
