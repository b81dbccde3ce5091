// The MoE layer of one rank on a GPU (DESIGN §8): the CUDA MoeLayerRank. One object per rank
// holds the model (router, this rank's expert bank, the shared expert) once, and two micro-batch
// states (token buffers, routing, the EP dispatch/combine state with its own window and sequence
// number, per-op events). A single-GPU layer is R = 1 of this class over a one-rank transport.
//
// Lanes: compute (a stream of the layer's own), communication (the transport's stream, kernels
// with at most EpCudaOptions::comm_blocks blocks) and shared (the shared expert under SBO).
// Operations order themselves by events on their data dependencies when the plan is
// concurrent, and by issue order otherwise; never by device-wide synchronisation. Everything but
// the host-API paths (normal mode, low-latency over the host API) is capturable in one CUDA graph
// and replayable with new tokens and token counts (the count lives on the device).
//
// Numerics: x bf16; gate logits f32 from epmoe's deterministic GEMM (row-independent); gate_up
// and down outputs bf16; the canonical-tree reduction in f32; y f32. Every kernel computes a
// token's result from that token alone, so the output is bitwise the same for any split into
// micro-batches, any rank count (powers of two dividing E) and every overlap strategy.
#pragma once

#include <memory>

#include "epmoe/comm/gpu_transport.h"
#include "epmoe/ep/ep_cuda.h"
#include "epmoe/layer/layer_rank.h"
#include "epmoe/weights/moe_weights.h"

namespace epmoe::cuda {

class MoeLayerRankCuda final : public MoeLayerRank {
 public:
  // weights: the whole layer in host memory; this rank uploads its experts, the shared expert
  // and the router. Collective over the transport (windows, a closing barrier).
  MoeLayerRankCuda(GpuTransport& transport, const MoeWeights& weights, const EpConfig& ep,
                   const EpCudaOptions& options = {});
  ~MoeLayerRankCuda() override;
  MoeLayerRankCuda(const MoeLayerRankCuda&) = delete;
  MoeLayerRankCuda& operator=(const MoeLayerRankCuda&) = delete;

  // ---- MoeLayerRank ----
  int rank() const override;
  int num_ranks() const override;
  const MoeConfig& config() const override;
  const EpConfig& ep() const override;
  int max_micro_batches() const override { return 2; }
  void begin_forward(const ForwardPlan& plan) override;
  void run(LayerOp op, int mb) override;
  void run_user(const std::string& name, int mb, const std::function<void(int)>& fn) override;
  void end_forward() override;
  void set_tracing(bool on) override;
  std::vector<OpTiming> last_trace() override;

  // ---- this rank's tokens (device buffers of fixed shape; rows < num_tokens are live) ----
  // Copies host tokens in (x_host: [T, H] bf16, T <= T_max), and a routing when given
  // (ids_host: [T, K'] i32 in [-1, E + fused shared), weights_host: [T, K'] f32): then gate and
  // select_experts keep it instead of computing one. Synchronises.
  void upload(const TensorView& x_host, const TensorView& ids_host = {},
              const TensorView& weights_host = {});
  TensorView x() const;         // [T_max, H] bf16
  int32_t* num_tokens() const;  // device i32: writing it (e.g. in a graph's input) is allowed
  // After a forward: y [T_max, H] f32 and the routing used, topk_ids [T_max, K'] i32,
  // topk_weights [T_max, K'] f32 (rows < num_tokens).
  TensorView y() const;
  TensorView topk_ids() const;
  TensorView topk_weights() const;
  // The stream user operations and inputs run on; a forward is done when it drains.
  cudaStream_t compute_stream() const;

  // Waits (bounded) for every lane; throws Error(kTimeout) naming the rank, micro-batch, peer,
  // expected and observed values when a device wait ran out.
  void check();
  // Traffic of the last forward summed over its micro-batches (synchronises).
  EpCudaTraffic last_traffic();
  bool ll_over_host_api() const;
  // The dispatch/combine state of micro-batch mb (receive layouts, for tests).
  EpMicroBatchCuda& ep_micro_batch(int mb);
  // Whether micro-batch mb's combine-send of the last forward waited on the down GEMM's per-tile
  // signals (ForwardPlan::signalled_combine took effect), rather than on the whole GEMM.
  bool combine_was_signalled(int mb) const;
  // The expert GEMMs run in FP8 (EpCudaOptions::fp8_experts).
  bool fp8_experts() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace epmoe::cuda
