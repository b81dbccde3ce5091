// The whole MoE layer on one GPU (all experts local): the CUDA counterpart of moe_forward_cpu.
// Numerics: x bf16, gate logits f32, gate_up GEMM output bf16, activation bf16, down output
// bf16, post_reorder in f32 (canonical tree), y f32; the unfused shared expert is a cuBLAS MLP
// over all tokens added into y (a fused one runs as extra experts of the bank).
#pragma once

#include <memory>

#include "epmoe/core/tensor.h"
#include "epmoe/layer/moe_layer_cpu.h"
#include "epmoe/weights/moe_weights.h"

namespace epmoe::cuda {

// Medians over the timed iterations, in µs (CUDA events). dispatch = preprocess + pre_reorder,
// experts = count read-back + gate_up GEMM + SiLU + down GEMM, combine = post_reorder,
// shared = the unfused shared expert (and the output scaling); total = the whole forward.
struct CudaStageTimes {
  double gate_us, dispatch_us, experts_us, combine_us, shared_us, total_us;
};

class CudaMoeLayer {
 public:
  // Uploads the host weights (f32 expert banks are rounded to bf16; an f32 router stays f32).
  // Throws Error(kUnsupported) when no GPU is present, Error(kInvalidArgument) for bad weights.
  explicit CudaMoeLayer(const MoeWeights& w, int device = 0);
  ~CudaMoeLayer();
  CudaMoeLayer(const CudaMoeLayer&) = delete;
  CudaMoeLayer& operator=(const CudaMoeLayer&) = delete;

  // x_host: [T, H] bf16 (f32 is rounded to bf16). Returns host y [T, H] f32, topk_ids [T, K'] i32,
  // topk_weights [T, K'] f32.
  LayerResult forward(const TensorView& x_host);
  // Runs the forward `iters` times after a warm-up and returns the per-stage medians.
  CudaStageTimes time_forward(const TensorView& x_host, int iters);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace epmoe::cuda
