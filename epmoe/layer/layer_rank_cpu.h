// The CPU reference of one expert-parallel rank's MoE layer as operations on micro-batches
// (DESIGN §6, §8): the MoeLayerRank of the CPU backend. A single-rank run is R = 1 of the same
// object (a 1-rank ThreadGroup); the executor (overlap/executor.h) decides the order.
//
//   MoeLayerRankCpu layer(comm, weights, ep, threads);   // collective (low-latency windows)
//   layer.set_input(x);                                  // or set_input(x, ids, weights)
//   execute(layer, make_strategy(OverlapKind::kTbo, ep.mode));
//   const Tensor& y = layer.output();                    // [T_r, H] f32
//
// Every operation runs on the calling thread, in the order the executor issues it (the CPU
// backend has one lane; ForwardPlan::concurrent and shared_lane change nothing here).
#pragma once

#include <array>
#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "epmoe/comm/communicator.h"
#include "epmoe/ep/ep_cpu.h"
#include "epmoe/layer/layer_rank.h"
#include "epmoe/weights/moe_weights.h"

namespace epmoe {

class MoeLayerRankCpu final : public MoeLayerRank {
 public:
  // weights: the whole layer, held (not copied) for the layer's lifetime: the router, this
  // rank's slice of the expert bank and the shared expert replica. ep.max_tokens_per_rank is
  // T_max (fixed receive shapes). threads: CPU threads of this rank's kernels (0 = every core).
  // Collective: every rank of `comm` constructs its layer at the same point.
  MoeLayerRankCpu(Communicator& comm, const MoeWeights& weights, const EpConfig& ep,
                  int threads = 1);
  ~MoeLayerRankCpu() override;

  // ---- input and output of the next forward ----
  // x: [T_r, H] bf16|f32 with T_r <= T_max (0 allowed); it must stay valid until end_forward.
  // The gate and select_experts operations compute the routing.
  void set_input(const TensorView& x);
  // The same with a routing made by the caller (an engine's own router, tests with -1 ids):
  // gate does nothing and select_experts takes these rows. topk_ids: [T_r, K'] i32 in
  // [-1, E + fused shared); topk_weights: [T_r, K'] f32 (both copied).
  void set_input(const TensorView& x, const TensorView& topk_ids, const TensorView& topk_weights);
  // After end_forward: y [T_r, H] f32 (each micro-batch's output operation writes its rows).
  const Tensor& output() const;
  // After end_forward: the routing the forward used, [T_r, K'] i32 / f32.
  const Tensor& topk_ids() const { return topk_ids_; }
  const Tensor& topk_weights() const { return topk_weights_; }
  // What the last forward sent to other ranks, both micro-batches together.
  EpTraffic last_traffic() const;
  // The dispatch/combine state of micro-batch mb (receive layouts, for tests).
  const EpMicroBatchCpu& micro_batch(int mb) const;
  // The token rows [begin, end) of micro-batch mb in the current forward.
  TokenRange rows(int mb) const;

  // ---- MoeLayerRank ----
  int rank() const override { return rank_; }
  int num_ranks() const override { return ep_.num_ranks; }
  const MoeConfig& config() const override { return cfg_; }
  const EpConfig& ep() const override { return ep_; }
  int max_micro_batches() const override { return kMicroBatches; }
  void begin_forward(const ForwardPlan& plan) override;
  // Errors carry the context: "rank 1, micro-batch B, dispatch_recv: <what went wrong>".
  void run(LayerOp op, int mb) override;
  void run_user(const std::string& name, int mb, const std::function<void(int)>& fn) override;
  void end_forward() override;
  void set_tracing(bool on) override { tracing_ = on; }
  std::vector<OpTiming> last_trace() override { return trace_; }

 private:
  static constexpr int kMicroBatches = 2;
  using Clock = std::chrono::steady_clock;

  // What one micro-batch owns for one forward; its EP state (window, sequence number, receive
  // buffers) lives as long as the layer.
  struct MicroBatch {
    std::unique_ptr<EpMicroBatchCpu> ep;
    TokenRange rows;
    TensorView x, ids, w;             // rows of the rank's x / routing: [T_mb, H], [T_mb, K'] x2
    Tensor logits;                    // [T_mb, E] f32
    Tensor routed;                    // [T_mb, H] f32: combine_recv's routed part
    std::vector<uint8_t> has_routed;  // [T_mb]
    Tensor shared;                    // unfused: [T_mb, H] f32; fused: [T_mb, n_shared, H] f32
    uint32_t done = 0;                // bit per LayerOp that ran this forward
  };

  void check_input(const TensorView& x) const;
  void run_op(LayerOp op, MicroBatch& m);
  void gate(MicroBatch& m);
  void select_experts(MicroBatch& m);
  void shared_experts(MicroBatch& m);
  void output(MicroBatch& m);
  void record(const std::string& name, int mb, Clock::time_point t0);

  Communicator& comm_;
  const MoeWeights& weights_;
  MoeConfig cfg_;
  EpConfig ep_;
  int threads_;
  int rank_ = 0;

  TensorView x_;  // [T_r, H]
  bool given_routing_ = false;
  Tensor topk_ids_, topk_weights_;  // [T_r, K']
  Tensor y_;                        // [T_r, H] f32
  std::array<MicroBatch, kMicroBatches> mbs_;
  int num_mb_ = 0;         // micro-batches of the current forward; 0 = none open
  bool complete_ = false;  // the last forward ended with every output written

  bool tracing_ = false;
  Clock::time_point t_begin_;
  std::vector<OpTiming> trace_;
};

}  // namespace epmoe
