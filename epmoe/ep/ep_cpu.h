// Expert parallelism on the CPU backend (DESIGN §5): one EpRankCpu per rank, talking through a
// Communicator. Normal mode: deduplicated dispatch over all_to_all_v, contiguous receive, partial
// sums back. Low-latency mode: one-sided writes into peers' windows, masked receive buffers,
// send and receive halves callable separately. Only real tokens are sent in both modes.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "epmoe/comm/communicator.h"
#include "epmoe/core/config.h"
#include "epmoe/core/tensor.h"
#include "epmoe/weights/moe_weights.h"

namespace epmoe {

// Stage wall times of one forward on one rank, milliseconds.
struct EpStageTimes {
  double gate = 0, dispatch = 0, experts = 0, combine = 0, shared = 0, total = 0;
};

// What one forward sent to other ranks (self traffic excluded), as the transport counted it.
struct EpTraffic {
  int64_t dispatch_tokens = 0;  // token copies sent (one per (token, remote rank) pair)
  int64_t dispatch_bytes = 0;   // their bytes (row + ids + weights), count exchange excluded
  int64_t combine_bytes = 0;    // partial sums (normal) or expert rows (low-latency) sent back
};

// Bitwise reproducibility across rank counts holds when every rank's expert range is a node of
// the reduction tree (reduce_plan.h): true for every power-of-two R dividing E.
bool ep_ranks_are_tree_nodes(int num_routed, int num_ranks);

class EpRankCpu {
 public:
  // weights: the whole layer (ranks read their experts' slices and the shared replica).
  // threads: CPU threads for this rank's kernels.
  EpRankCpu(Communicator& comm, const MoeWeights& weights, const EpConfig& ep, int threads = 1);
  ~EpRankCpu();

  // The layer on this rank's tokens: gate, dispatch, experts, combine, shared expert.
  // x: [T_r, H] bf16|f32 with T_r <= max_tokens_per_rank. Returns y: [T_r, H] f32.
  Tensor forward(const TensorView& x, EpStageTimes* times = nullptr);
  // The same after the gate, for a routing the caller made (engines with their own router,
  // tests with -1 ids). topk_ids: [T_r, K'] i32 in [-1, E + fused shared); topk_weights: f32.
  Tensor forward(const TensorView& x, const TensorView& topk_ids, const TensorView& topk_weights,
                 EpStageTimes* times = nullptr);

  // ---- normal mode (collective calls) ----
  // x: [T_r, H]; topk_ids: [T_r, K'] i32 in [-1, E + fused shared); topk_weights: [T_r, K'] f32.
  void normal_dispatch(const TensorView& x, const TensorView& topk_ids,
                       const TensorView& topk_weights);
  void normal_experts();
  // y: [T_r, H] f32 = routed (and fused shared) part of the layer for this rank's tokens.
  void normal_combine(const TensorView& y);

  // ---- low-latency mode: each half may be called separately ----
  void ll_dispatch_send(const TensorView& x, const TensorView& topk_ids,
                        const TensorView& topk_weights);
  void ll_dispatch_recv();
  void ll_experts();
  void ll_combine_send();
  void ll_combine_recv(const TensorView& y);

  // Shared expert outputs for this rank's tokens (fused slices or the unfused MLP); forward()
  // runs it between the dispatch halves, where it overlaps communication on a GPU.
  void compute_shared(const TensorView& x);

  // ---- receiver-side results of the last dispatch ----
  // normal: recv_x [N_recv, H] (x's dtype), recv_topk_ids [N_recv, K'] local ids or -1,
  //         recv_topk_weights [N_recv, K'] f32, recv_expert_counts [E_loc] i32.
  // low-latency: recv_x [E_loc, R·T_max, H], recv_count [E_loc] i32,
  //         recv_src [E_loc, R·T_max, 3] i32 = (source rank, source token, slot k).
  const Tensor& recv_x() const;
  const Tensor& recv_topk_ids() const;
  const Tensor& recv_topk_weights() const;
  const Tensor& recv_expert_counts() const;
  const Tensor& recv_count() const;
  const Tensor& recv_src() const;

  Communicator& comm() { return comm_; }
  const EpTraffic& last_traffic() const;

 private:
  struct Impl;
  Communicator& comm_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace epmoe
