// The MoE layer of one expert-parallel rank as operations on micro-batches (DESIGN §6, §8).
//
// One MoeLayerRank per rank and backend (CPU reference, CUDA) holds what lives as long as the
// model — router, this rank's expert bank, the shared replicas, the transport — and a pool of
// micro-batch states (token buffers, routing, receive buffers and windows, sequence numbers,
// events). A single-GPU or single-thread run is R = 1 of the same object.
//
// The layer does not know the order of its operations: the executor (epmoe/overlap/) runs a
// strategy's operation list over one or two micro-batches and calls run() for each operation.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "epmoe/core/config.h"

namespace epmoe {

// The operations of DESIGN §6 on one micro-batch. Each enqueues its work and returns (the CPU
// backend runs it on the calling thread). Both EP modes implement every one; a mode may make a
// half trivial (normal mode learns its receive sizes in dispatch_recv), never absent.
enum class LayerOp : uint8_t {
  kGate,           // router GEMM: logits [T_mb, E] f32
  kSelectExperts,  // fused grouped top-k: topk_ids [T_mb, K'] i32, topk_weights [T_mb, K'] f32
  kDispatchSend,   // issue this micro-batch's token transfers; never waits for peers
  kDispatchRecv,   // wait (bounded) for every peer's tokens; the receive layout
  kExperts,        // gate_up GEMM -> SiLU(g)*u -> down GEMM on the received rows
  kCombineSend,    // issue the expert outputs' transfers back to their source ranks
  kCombineRecv,    // wait (bounded) for them; y_routed per token in the canonical order
  kSharedExperts,  // the (unfused) shared expert / fused shared slices on own tokens
  kOutput,         // y = routed + shared (x rsf with scale-on-output) into the rank's rows
};
constexpr int kNumLayerOps = 9;
const char* layer_op_name(LayerOp op);  // "gate", "select_experts", "dispatch_send", ...
bool layer_op_is_comm(LayerOp op);      // dispatch_*/combine_*

// How a rank's tokens are cut into micro-batches A and B.
//   kHalves:   decode. A = the first ceil(T/2) tokens, B = the rest (B may be empty).
//   kBalanced: prefill. Halves, with the odd token given to A on even ranks and to B on odd
//              ranks, so that both micro-batches carry about the same tokens summed over ranks.
enum class SplitRule : uint8_t { kHalves, kBalanced };
// Tokens of micro-batch mb (0 = A, 1 = B) for a rank with `tokens` tokens; [begin, end) rows.
struct TokenRange {
  int64_t begin = 0, end = 0;
  int64_t size() const { return end - begin; }
};
TokenRange micro_batch_range(int64_t tokens, int num_micro_batches, int mb, SplitRule rule,
                             int rank);

// What the executor asks of the next forward.
struct ForwardPlan {
  int num_micro_batches = 1;  // 1 or 2
  SplitRule split = SplitRule::kHalves;
  // false: every operation runs in issue order on one lane (the sequential baseline).
  // true (GPU): communication on its own stream with a bounded number of SMs, compute on the
  // compute stream, ordered by data-dependency events only.
  bool concurrent = false;
  // With `concurrent`: the shared expert on a third stream of its own (single-batch overlap).
  bool shared_lane = false;
  // With `concurrent`: combine_send starts with the down GEMM and sends each block of rows as
  // the GEMM signals it done (single-batch overlap, second half; GPU low-latency by load/store
  // with the sm90 GEMM — elsewhere combine_send waits for the experts as usual).
  bool signalled_combine = false;
};

// Where an operation ran (GPU streams; the CPU backend reports kCompute).
enum class OpLane : uint8_t { kCompute, kComm, kShared };
const char* op_lane_name(OpLane lane);

// One operation of the last forward, for traces and per-op breakdowns. Times in µs from the
// forward's start (GPU: CUDA events on the op's stream; CPU: wall clock).
struct OpTiming {
  std::string name;  // layer_op_name() or the user operation's name
  int micro_batch = 0;
  OpLane lane = OpLane::kCompute;
  double start_us = 0, end_us = 0;
};

class MoeLayerRank {
 public:
  virtual ~MoeLayerRank() = default;
  virtual int rank() const = 0;
  virtual int num_ranks() const = 0;
  virtual const MoeConfig& config() const = 0;
  virtual const EpConfig& ep() const = 0;
  // Micro-batch states this layer holds (>= 2: TBO needs two).
  virtual int max_micro_batches() const = 0;

  // Splits the rank's current tokens (set by the backend's own input call) into
  // plan.num_micro_batches states and prepares them. Every rank of the group calls it with the
  // same plan.
  virtual void begin_forward(const ForwardPlan& plan) = 0;
  // Enqueues one operation of micro-batch mb (0 = A, 1 = B).
  virtual void run(LayerOp op, int mb) = 0;
  // A user-supplied operation (attention, or a benchmark's stand-in) on micro-batch mb, on the
  // compute lane (GPU: the stream is compute_stream()); timed like the layer's own.
  virtual void run_user(const std::string& name, int mb, const std::function<void(int)>& fn) = 0;
  // Joins every lane (GPU: the compute stream waits for the others); the forward is complete
  // once the compute lane has drained.
  virtual void end_forward() = 0;

  // Per-op timings of the last forward (GPU: synchronises). Empty unless tracing is on.
  virtual void set_tracing(bool on) = 0;
  virtual std::vector<OpTiming> last_trace() = 0;
};

}  // namespace epmoe
