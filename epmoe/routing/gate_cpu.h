// CPU reference of the router: gate GEMM and expert selection (DESIGN §2), the ground truth the
// fused CUDA gate is compared with bitwise (ids) and to 1e-6 (weights).
#pragma once

#include "epmoe/core/config.h"
#include "epmoe/core/tensor.h"

namespace epmoe {

// logits: [T, E] f32 = x · weightᵀ, f32 accumulation.
// x: [T, H] bf16|f32; weight: [E, H] bf16|f32.
void gate_gemm_cpu(const TensorView& logits, const TensorView& x, const TensorView& weight,
                   int threads = 0);

// topk_ids: [T, K'] i32, topk_weights: [T, K'] f32 with K' = config.num_slots().
// logits: [T, E] f32; bias: [E] f32 e_score_correction_bias, or an empty view (no data or no
// elements).
// Slots 0..K-1 hold the routed experts by descending choice score (ties: lower index first);
// slots K..K'-1 the fused shared experts E+j. Throws Error(kNumeric) naming the token and expert
// of the first NaN logit.
// NOTES: softmax is monotone, so softmax selection ranks the logits themselves; the weights are
// the softmax probabilities. Sigmoid uses exact_sigmoidf so the CUDA gate agrees bit for bit.
void select_experts_cpu(const TensorView& topk_ids, const TensorView& topk_weights,
                        const TensorView& logits, const TensorView& bias, const MoeConfig& config,
                        int threads = 0);

// The argument checks of expert selection, shared by the CPU reference and the CUDA gate
// (typed errors naming the tensor): validates the config and the shapes and dtypes above, and
// that a bias comes only with sigmoid scoring. Returns T; *bias_ptr = the bias, or nullptr.
int64_t check_selection_args(const TensorView& topk_ids, const TensorView& topk_weights,
                             const TensorView& logits, const TensorView& bias,
                             const MoeConfig& config, const float** bias_ptr);

}  // namespace epmoe
