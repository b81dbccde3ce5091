// Expert parallelism on GPUs (DESIGN §5), one micro-batch: dispatch and combine of one rank's
// micro-batch over a GpuTransport (nccl or loopback), as the send and receive halves the overlap
// schedules call separately. A micro-batch owns its receive buffers, its low-latency window and
// its sequence number, so micro-batch A of every rank meets micro-batch A of the others.
//
// Low-latency mode: fixed shapes; between load/store-reachable peers no host synchronisation,
// CUDA-graph capturable, bounded device waits; between nodes the host-API fallback (LlTransfer).
// Normal mode: dispatch_send lays out and packs without waiting for peers; dispatch_recv learns
// the receive sizes (one host synchronisation) and exchanges through the transport's host API;
// combine returns f32 partial sums reduced at the source in the canonical order.
//
// Every call takes the stream it runs on: the transport's stream for halves that move data
// between ranks, any stream for the local halves (dispatch_send_is_local). The kernels launch
// at most `comm_blocks` blocks each, so the other micro-batch's GEMMs keep the rest of the GPU.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "epmoe/comm/gpu_transport.h"
#include "epmoe/core/config.h"
#include "epmoe/core/tensor.h"

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
  bool fp8_dispatch = false;  // FP8 e4m3 payload with one f32 scale per 128 values
  int64_t timeout_ms = -1;    // device waits; -1 = EPMOE_TIMEOUT_MS
  LlTransfer ll_transfer = LlTransfer::kAuto;
  // Blocks each communication kernel may use (DeepEP's num_sms); 0 = as many as the work has.
  int comm_blocks = 24;
  // The layer's expert GEMMs (routed and shared) in FP8 e4m3 with DeepSeek's block scales
  // (MoeLayerRankCuda, `--weights fp8`). With fp8_dispatch in low-latency mode the received FP8
  // payload is then kept as it came (recv_x_fp8) instead of being widened to bf16.
  bool fp8_experts = false;
};

// The down GEMM's per-tile completion signals a signalled combine-send waits on
// (sm90_gemm_signal_info): entry e·nb + m covers rows [m·block_m, (m+1)·block_m) of local expert
// e, nb = ceil(R·T_max / block_m); it reaches `threshold` when those rows are stored.
struct CombineSignals {
  const int32_t* signal = nullptr;  // device [E_loc · nb] i32, zeroed before the GEMM
  int block_m = 0, threshold = 0;
};

// Traffic of the last dispatch/combine to other ranks (self excluded), bytes as they crossed.
struct EpCudaTraffic {
  int64_t dispatch_tokens = 0, dispatch_bytes = 0, combine_bytes = 0;
};

// What dispatch_send reads: this micro-batch's tokens and routing (device, fixed shapes).
struct EpTokens {
  const void* x = nullptr;              // [T_max, H] bf16
  const int32_t* topk_ids = nullptr;    // [T_max, K'] i32, -1 = unrouted
  const float* topk_weights = nullptr;  // [T_max, K'] f32
  const int32_t* num_tokens = nullptr;  // device i32, T <= T_max
};

class EpMicroBatchCuda {
 public:
  // name: "A" / "B" in messages. cfg/ep validated by the caller (the layer).
  EpMicroBatchCuda(GpuTransport& transport, const MoeConfig& cfg, const EpConfig& ep,
                   const EpCudaOptions& options, std::string name);
  ~EpMicroBatchCuda();
  EpMicroBatchCuda(const EpMicroBatchCuda&) = delete;
  EpMicroBatchCuda& operator=(const EpMicroBatchCuda&) = delete;

  const std::string& name() const;
  // Blocks each communication kernel of the next calls may use (0 = as many as the work has);
  // starts at EpCudaOptions::comm_blocks.
  void set_comm_blocks(int blocks);
  // Whether dispatch_send (combine_recv) only does local work here — layout and packing (the
  // reduction) — while the transfers happen in dispatch_recv and combine_send: normal mode and
  // low-latency over the host API. Such halves may run on any stream (the layer's compute
  // stream); the others move data between ranks and run on the transport's stream.
  bool dispatch_send_is_local() const;
  bool combine_recv_is_local() const;
  // Low-latency mode over the host API (LlTransfer::kHostApi, or kAuto with unreachable peers).
  bool ll_over_host_api() const;

  // ---- the four halves (enqueue on `s`; normal-mode and host-API receive halves sync once) ----
  void dispatch_send(const EpTokens& in, cudaStream_t s);
  void dispatch_recv(cudaStream_t s);
  // Expert side. Low-latency: expert_out = the masked [E_loc, R·T_max, H] bf16 down-GEMM output.
  // Normal: expert_out = partial sums [N_recv, H] f32 per received token (normal_partials()).
  // signals (low-latency by load/store only, can_signal_combine()): the call may be enqueued as
  // soon as the down GEMM that writes expert_out is, on another stream; it sends each block of
  // rows when its signal says the rows are final (single-batch overlap, seed 001).
  void combine_send(cudaStream_t s, const CombineSignals* signals = nullptr);
  // Whether combine_send can wait on GEMM signals: low-latency by load/store. The GEMM must be
  // enqueued before the combine-send (checking tools that run kernels one at a time in launch
  // order then finish it first).
  bool can_signal_combine() const;
  // Normal mode sends nothing in combine_send: its partial sums travel at the start of the
  // receive half, combine_transfer (on the transport's stream), then combine_recv reduces them
  // (any stream, after the transfer). This keeps a micro-batch's combine from sitting between
  // the other micro-batch's dispatch and its GEMMs on the one communicator.
  bool combine_transfers_in_recv() const;
  void combine_transfer(cudaStream_t s);
  // y_routed: [T_max, H] f32 (rows < T), the routed (and fused shared) part in the canonical
  // order; fused_shared: [T_max, n_shared, H] f32 or nullptr.
  void combine_recv(float* y_routed, const float* fused_shared, cudaStream_t s);

  // ---- receive side of the last dispatch ----
  // Low-latency: recv_x [E_loc, R·T_max, H] bf16, recv_count [E_loc] i32 (device),
  // recv_src [E_loc, R·T_max, 3] i32 (source rank, source token, slot); expert_out has recv_x's
  // shape and is what combine_send returns.
  TensorView recv_x() const;  // empty when the FP8 payload is kept (recv_x_fp8)
  // FP8 payload kept (options fp8_dispatch + fp8_experts, low-latency): [E_loc, R·T_max, H]
  // e4m3 codes and [E_loc, R·T_max, H/128] f32 scales, else empty views.
  TensorView recv_x_fp8() const;
  TensorView recv_x_scale() const;
  TensorView recv_count() const;
  TensorView recv_src() const;
  TensorView ll_expert_out() const;
  // Normal: N_recv (host), recv_x [N_recv, H] bf16, recv_ids [N_recv, K'] i32 local ids or -1,
  // recv_w [N_recv, K'] f32; the experts write normal_partials() [N_recv, H] f32.
  int64_t normal_num_recv() const;
  TensorView normal_recv_x() const;
  TensorView normal_recv_ids() const;
  TensorView normal_recv_weights() const;
  TensorView normal_partials();

  // Throws Error(kTimeout) naming the micro-batch, rank, peer, expected and observed values if a
  // device wait ran out, Error(kInvalidArgument) if an expert overflowed its receive rows.
  // Reads the device error record (synchronises `s`).
  void check(cudaStream_t s);
  // The last call's traffic (synchronises `s`).
  EpCudaTraffic last_traffic(cudaStream_t s);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace epmoe::cuda
