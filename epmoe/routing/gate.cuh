// CUDA router (DESIGN §2, seed 004): gate GEMM on cuBLAS and the fused expert selection, plus the
// same selection as separate simple kernels (the unfused baseline the benchmark compares with).
// The CPU reference is gate_cpu.h: ids bitwise equal (same tie rules), weights within 1e-6.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "epmoe/core/config.h"
#include "epmoe/core/tensor.h"

namespace epmoe::cuda {

// logits: [T, E] f32 = x · weightᵀ, f32 accumulation (cuBLAS, no TF32).
// x: [T, H] bf16|f32; weight: [E, H], same dtype as x. All device tensors.
void gate_gemm(const TensorView& logits, const TensorView& x, const TensorView& weight,
               cublasHandle_t handle, cudaStream_t stream);

// The fused gate: scoring (sigmoid + bias, or softmax) + group selection + top-k + weights +
// renormalisation + rsf + shared-expert slots, one warp per token, one launch.
// topk_ids: [T, K'] i32, topk_weights: [T, K'] f32 (K' = config.num_slots()).
// logits: [T, E] f32; bias: [E] f32 e_score_correction_bias, or an empty view (TensorView{} or
// numel() == 0) for none.
// E <= 512, any n_group dividing E. Slot order, ties and weights as select_experts_cpu.
// NOTES: NaN logits are not detected on the device (the CPU reference throws); ids stay in
// [0, E) whatever the input.
void select_experts(const TensorView& topk_ids, const TensorView& topk_weights,
                    const TensorView& logits, const TensorView& bias, const MoeConfig& config,
                    cudaStream_t stream);

// Scratch for select_experts_unfused: [T, 2E + G] f32 and [T, G] i32 (scores, choices,
// group scores, kept-group flags).
struct UnfusedGateWorkspace {
  float* scores = nullptr;        // [T, E]
  float* choice = nullptr;        // [T, E]
  float* group_score = nullptr;   // [T, G]
  int32_t* group_kept = nullptr;  // [T, G]
};
size_t unfused_gate_workspace_bytes(int64_t tokens, const MoeConfig& config);
UnfusedGateWorkspace carve_unfused_gate_workspace(void* base, int64_t tokens,
                                                  const MoeConfig& config);

// Baseline: the same math as five simple kernels (score, group score, group select, top-k,
// weights); same outputs as select_experts.
void select_experts_unfused(const TensorView& topk_ids, const TensorView& topk_weights,
                            const TensorView& logits, const TensorView& bias,
                            const MoeConfig& config, const UnfusedGateWorkspace& ws,
                            cudaStream_t stream);

}  // namespace epmoe::cuda
