// Expert parallelism on GPUs (DESIGN §5): one EpRankCuda per rank, over a GpuTransport (nccl or
// loopback). Low-latency mode: fixed shapes, send and receive halves as separate calls; between
// load/store-reachable peers no host synchronisation, CUDA-graph capturable, bounded device
// waits; between nodes the host-API fallback (LlTransfer below). Normal mode: deduplicated
// dispatch through the transport's host API (it synchronises to learn receive sizes), local
// permutation + grouped GEMM, partial sums back, reduced at the source in the canonical order.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "epmoe/comm/gpu_transport.h"
#include "epmoe/core/config.h"
#include "epmoe/core/tensor.h"
#include "epmoe/weights/moe_weights.h"

namespace epmoe::cuda {

// How low-latency mode moves tokens between ranks.
//   kDevice:  the kernels store into the peers' windows and raise flags (load/store reachable
//             peers: one node over NVLink/PCIe). No host synchronisation; CUDA-graph capturable.
//   kHostApi: records are packed locally and exchanged with the transport's host API (grouped
//             ncclSend/ncclRecv): works between nodes. The per-peer sizes are learned on the
//             host, so each dispatch synchronises once and the path cannot be captured in a
//             CUDA graph. Same receive layout, same bytes on the wire, bitwise the same output.
//   kAuto:    kDevice when every peer is reachable, else kHostApi.
enum class LlTransfer { kAuto, kDevice, kHostApi };
const char* ll_transfer_name(LlTransfer t);  // "auto" | "device" | "host"
// Throws Error(kInvalidArgument) naming the accepted values.
LlTransfer parse_ll_transfer(const std::string& s);

struct EpCudaOptions {
  bool fp8_dispatch = false;   // FP8 e4m3 payload with one f32 scale per 128 values
  int64_t timeout_ms = -1;     // device waits; -1 = EPMOE_TIMEOUT_MS
  LlTransfer ll_transfer = LlTransfer::kAuto;
};

// Traffic of the last layer call to other ranks (self excluded), bytes as they crossed.
struct EpCudaTraffic {
  int64_t dispatch_tokens = 0, dispatch_bytes = 0, combine_bytes = 0;
};

class EpRankCuda {
 public:
  // weights: host weights of the whole layer; this rank uploads its experts and the shared ones.
  EpRankCuda(GpuTransport& transport, const MoeWeights& weights, const EpConfig& ep,
             const EpCudaOptions& options = {});
  ~EpRankCuda();

  // ---- inputs (device buffers of fixed shape; rows < num_tokens are live) ----
  TensorView x() const;             // [T_max, H] bf16
  TensorView topk_ids() const;      // [T_max, K'] i32
  TensorView topk_weights() const;  // [T_max, K'] f32
  int32_t* num_tokens() const;      // device i32
  // Copies host tokens (and a routing, when given) into the buffers, on the rank's stream.
  void upload(const TensorView& x_host, const TensorView& ids_host = {},
              const TensorView& weights_host = {});
  // Runs the gate (cuBLAS GEMM + fused gate kernel) on the live tokens into topk_ids/weights.
  void route();

  // ---- low-latency halves (enqueue only; capturable) ----
  void ll_dispatch_send();
  void ll_dispatch_recv();
  void ll_experts();
  void ll_combine_send();
  void ll_combine_recv();
  // ---- normal mode (synchronises once to size the receive buffers) ----
  void normal_dispatch();
  void normal_experts();
  void normal_combine();
  // Shared expert(s) on this rank's tokens; the layer calls it between the dispatch halves.
  void shared_experts();
  // The layer after the gate on the current buffers: y = routed (+ shared) (· rsf if asked).
  void forward_routed();
  // The last step of forward_routed, for callers that run the stages one by one: adds the
  // unfused shared expert and applies the scale on output.
  void finish_layer();

  // Output: [T_max, H] f32 (rows < num_tokens).
  TensorView y() const;
  // Receive side of the last dispatch. Low-latency: recv_x [E_loc, R·T_max, H] bf16,
  // recv_count [E_loc] i32, recv_src [E_loc, R·T_max, 3] i32. Normal: recv_x [N_recv, H] bf16.
  TensorView recv_x() const;
  TensorView recv_count() const;
  TensorView recv_src() const;

  // Synchronises the stream; throws Error(kTimeout) with rank, peer, expected and observed
  // values if a device wait ran out, Error(kCuda) for other failures.
  void check();
  // Reads the last call's traffic (synchronises).
  EpCudaTraffic last_traffic();

  GpuTransport& transport() { return t_; }
  // Low-latency mode: whether this rank moves tokens through the host API (LlTransfer::kHostApi,
  // or kAuto with unreachable peers). False in normal mode.
  bool ll_over_host_api() const;
  const EpConfig& ep() const;

 private:
  struct Impl;
  GpuTransport& t_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace epmoe::cuda
