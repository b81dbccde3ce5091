// The single-rank CPU reference of a whole MoE layer (DESIGN §1): the ground truth for the
// golden files, for the CUDA layer, and for every expert-parallel run. It is R = 1 of the
// expert-parallel CPU layer (layer_rank_cpu.h) run by the executor with the `none` strategy:
// one pipeline, one order (overlap/executor.cc).
#pragma once

#include "epmoe/core/tensor.h"
#include "epmoe/weights/moe_weights.h"

namespace epmoe {

struct LayerResult {
  Tensor y;             // [T, H] f32
  Tensor topk_ids;      // [T, K'] i32
  Tensor topk_weights;  // [T, K'] f32
};

// x: [T, H] bf16|f32. The gate routes; routed experts (and fused shared experts) are summed in
// the canonical order; the unfused shared MLP added after; the output scaled by rsf when the
// config says scale_on_output. threads: CPU threads (0 = every core).
LayerResult moe_forward_cpu(const MoeWeights& weights, const TensorView& x, int threads = 0);

// The layer for a given routing (tests use it with hand-made ids, -1 included).
// topk_ids: [T, K'] i32 in [-1, E + fused shared); topk_weights: [T, K'] f32. Returns y [T, H]
// f32, including the unfused shared expert and the scale on output.
Tensor moe_experts_cpu(const MoeWeights& weights, const TensorView& x, const TensorView& topk_ids,
                       const TensorView& topk_weights, int threads = 0);

// The shared expert alone on rows (a building block of the shared_experts operation):
// out: [T, H] f32 += shared MLP(x) (unfused layout); x: [T, H] bf16|f32.
void add_shared_expert_cpu(const TensorView& out, const MoeWeights& weights, const TensorView& x,
                           int threads = 0);

}  // namespace epmoe
