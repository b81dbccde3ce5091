// Expert parallelism on the CPU backend (DESIGN §5): the dispatch, expert and combine steps of ONE
// micro-batch on one rank, over a Communicator, in halves for both modes. The per-rank layer
// (layer/layer_rank_cpu.h) holds one EpMicroBatchCpu per micro-batch state; micro-batch A of
// every rank meets micro-batch A of the others (its own window, sequence number and exchanges).
//
// Normal mode (host collectives, like grouped ncclSend/ncclRecv):
//   dispatch_send  layout (which ranks each token visits, deduplicated) and pack; no waiting
//   dispatch_recv  count exchange + all_to_all_v + unpack: recv_x [N_recv, H], local ids/weights
//   experts        preprocess -> pre_reorder -> contiguous expert MLP
//   combine_send   post_reorder: one partial sum per received token over this rank's experts
//   combine_recv   row-count exchange + all_to_all_v; the source adds the partials in the
//                  canonical tree order (reduce_plan.h)
// Low-latency mode (one-sided writes into the peers' windows plus 64-bit flags, bounded waits):
//   dispatch_send  records into each owner's staging, then one flag per peer (also when empty)
//   dispatch_recv  wait for every peer's flag; expand into masked rows [E_loc, R·cap, H]
//   experts        masked expert MLP
//   combine_send   each row into its source's window, then one flag per peer
//   combine_recv   wait for the flags; y per token over its slots in the canonical order
// Only real tokens cross the wire in both modes. Fused shared slots (ids >= E) never travel:
// combine_recv returns the routed part only; the layer adds the shared part in its output step.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "epmoe/comm/communicator.h"
#include "epmoe/core/config.h"
#include "epmoe/core/tensor.h"
#include "epmoe/ep/ep_stats.h"
#include "epmoe/weights/moe_weights.h"

namespace epmoe {

// Bitwise reproducibility across rank counts holds when every rank's expert range is a node of
// the reduction tree (reduce_plan.h): true for every power-of-two R dividing E.
bool ep_ranks_are_tree_nodes(int num_routed, int num_ranks);

// An FP8 bank's block scales (MoeWeights::w13_scale / w2_scale), or an empty view for bf16|f32
// banks (whose scale tensors may be allocated with zero elements).
inline TensorView bank_scale(const MoeWeights& w, const Tensor& scale) {
  return w.fp8() ? scale.view() : TensorView{};
}

// "A", "B", ... for micro-batch index 0, 1, ...
const char* micro_batch_name(int index);

// One term of a token's sum: an expert's row times its weight, or a finished partial sum (a
// rank's experts in normal mode, or the routed part of a token) added as it is.
struct ReduceTerm {
  int key = -1;                // expert id in [0, E + fused shared); a partial: its first expert
  const float* row = nullptr;  // [H] f32
  float weight = 1.0f;         // ignored for a partial
  bool is_sum = false;
};
// y: [H] f32 = the terms added in the canonical order (reduce_plan.h: the routed tree, then the
// fused shared ids); zeros when there is none. n <= kMaxSlots. acc: scratch (resized here).
void reduce_terms_cpu(float* y, int64_t h, int num_routed, const ReduceTerm* terms, int n,
                      std::vector<float>& acc);

struct EpMicroBatchDesc {
  int index = 0;         // micro-batch 0 = A, 1 = B (names it in errors)
  int64_t capacity = 0;  // the most tokens this micro-batch brings on any rank (window and
                         // low-latency receive shapes); <= max_tokens_per_rank
  int threads = 1;       // CPU threads of the expert kernels
};

class EpMicroBatchCpu {
 public:
  // weights: the whole layer (this rank runs its experts' slices of the bank). Collective in
  // low-latency mode: every rank constructs micro-batch `index` at the same point (window).
  EpMicroBatchCpu(Communicator& comm, const MoeWeights& weights, const EpConfig& ep,
                  const EpMicroBatchDesc& desc);
  ~EpMicroBatchCpu();
  EpMicroBatchCpu(const EpMicroBatchCpu&) = delete;
  EpMicroBatchCpu& operator=(const EpMicroBatchCpu&) = delete;

  // The halves, in this order, once per forward. After an error the protocol is out of step
  // with the peers: build a new object (a new group) to go on.
  // x: [T, H] bf16|f32 with T <= capacity; topk_ids: [T, K'] i32 in [-1, E + fused shared);
  // topk_weights: [T, K'] f32. The views must stay valid until combine_recv returns.
  void dispatch_send(const TensorView& x, const TensorView& topk_ids,
                     const TensorView& topk_weights);
  void dispatch_recv();
  void experts();
  void combine_send();
  // routed: [T, H] f32, the routed experts' part of each token (canonical order); has_routed:
  // [T], 0 where the token has no routed slot (its row is zeros and adds nothing).
  void combine_recv(const TensorView& routed, std::vector<uint8_t>* has_routed);

  // ---- receiver side of the last dispatch ----
  // normal: recv_x [N_recv, H] (x's dtype), recv_topk_ids [N_recv, K'] local ids or -1,
  //         recv_topk_weights [N_recv, K'] f32, recv_expert_counts [E_loc] i32.
  // low-latency: recv_x [E_loc, R·capacity, H], recv_count [E_loc] i32,
  //         recv_src [E_loc, R·capacity, 3] i32 = (source rank, source token, slot k).
  const Tensor& recv_x() const;
  const Tensor& recv_topk_ids() const { return n_.recv_ids; }
  const Tensor& recv_topk_weights() const { return n_.recv_w; }
  const Tensor& recv_expert_counts() const { return n_.recv_counts; }
  const Tensor& recv_count() const { return ll_.count; }
  const Tensor& recv_src() const { return ll_.src; }

  int index() const { return desc_.index; }
  int64_t capacity() const { return desc_.capacity; }
  // What the last forward of this micro-batch sent (zero until its dispatch_send).
  const EpTraffic& traffic() const { return traffic_; }

 private:
  enum class Phase : uint8_t { kIdle, kDispatchSent, kDispatched, kExpertsDone, kCombineSent };
  void expect_phase(Phase want, const char* op) const;

  // One token as it crosses the wire: payload (the row, x's dtype) | src token | K' local ids |
  // K' weights. Only the destination's routed slots carry an id; the others are -1.
  struct Record {
    size_t payload = 0, src_off = 0, ids_off = 0, w_off = 0, bytes = 0;
    Record() = default;
    Record(int64_t h, DType dt, int kp);
  };
  int owner(int id) const { return id >= 0 && id < E_ ? id / E_loc_ : -1; }
  void write_record(char* dst, int64_t t, int dest) const;

  // normal mode (ep_cpu_normal.cc)
  void normal_dispatch_send();
  void normal_dispatch_recv();
  void normal_experts();
  void normal_combine_send();
  void normal_combine_recv(const TensorView& routed, std::vector<uint8_t>* has_routed);
  // Exchanges one value per peer, tagged with the step, micro-batch and forward; a peer at
  // another step (the ranks run different operation lists) is an error naming both.
  std::vector<uint64_t> exchange_counts(int step, const std::vector<uint64_t>& to_peer);

  // low-latency mode (ep_cpu_ll.cc)
  void ll_create_window();
  void ll_dispatch_send();
  void ll_dispatch_recv();
  void ll_experts();
  void ll_combine_send();
  void ll_combine_recv(const TensorView& routed, std::vector<uint8_t>* has_routed);
  uint64_t* ll_flags(int peer, size_t off);

  Communicator& comm_;
  const MoeWeights& weights_;
  MoeConfig cfg_;
  EpConfig ep_;
  EpMicroBatchDesc desc_;
  int R_ = 1, rank_ = 0, E_ = 0, E_loc_ = 0, Kp_ = 0;
  int64_t H_ = 0;
  Phase phase_ = Phase::kIdle;
  uint64_t seq_ = 0;  // forwards of this micro-batch (both modes)

  // Source side of the current forward.
  TensorView x_, ids_, w_;  // [T, H], [T, K'] i32, [T, K'] f32
  int64_t T_ = 0;
  Record rec_;
  EpTraffic traffic_;

  struct Normal {
    std::vector<uint8_t> visits;  // [T, R]: token t goes to rank r (deduplicated)
    std::vector<uint64_t> send_tokens, recv_tokens;  // [R]
    std::vector<char> send_buf;                      // records, per destination in token order
    Tensor recv_x, recv_ids, recv_w, recv_counts;
    Tensor src2dst, down, partial;  // [N_recv, K'] i32, [rows, H] f32, [N_recv, H] f32
  } n_;

  struct LowLatency {
    // Window: [dispatch flags R][combine flags R][staging R × capacity records]
    //         [combine rows capacity × K' × H f32].
    std::unique_ptr<Window> window;
    size_t disp_flags_off = 0, comb_flags_off = 0, staging_off = 0, combine_off = 0;
    size_t slot_bytes = 0;           // staging stride per token (room for an f32 payload)
    Tensor recv_x, count, src, out;  // [E_loc, R·cap, H], [E_loc], [E_loc, R·cap, 3], f32 rows
  } ll_;
};

}  // namespace epmoe
