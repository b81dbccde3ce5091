#include "epmoe/layer/layer_rank.h"

#include "epmoe/core/error.h"

namespace epmoe {

const char* layer_op_name(LayerOp op) {
  switch (op) {
    case LayerOp::kGate:
      return "gate";
    case LayerOp::kSelectExperts:
      return "select_experts";
    case LayerOp::kDispatchSend:
      return "dispatch_send";
    case LayerOp::kDispatchRecv:
      return "dispatch_recv";
    case LayerOp::kExperts:
      return "experts";
    case LayerOp::kCombineSend:
      return "combine_send";
    case LayerOp::kCombineRecv:
      return "combine_recv";
    case LayerOp::kSharedExperts:
      return "shared_experts";
    case LayerOp::kOutput:
      return "output";
  }
  return "?";
}

bool layer_op_is_comm(LayerOp op) {
  return op == LayerOp::kDispatchSend || op == LayerOp::kDispatchRecv ||
         op == LayerOp::kCombineSend || op == LayerOp::kCombineRecv;
}

const char* op_lane_name(OpLane lane) {
  switch (lane) {
    case OpLane::kCompute:
      return "compute";
    case OpLane::kComm:
      return "comm";
    case OpLane::kShared:
      return "shared";
  }
  return "?";
}

TokenRange micro_batch_range(int64_t tokens, int num_micro_batches, int mb, SplitRule rule,
                             int rank) {
  EPMOE_CHECK(tokens >= 0, kInvalidArgument, "negative token count {}", tokens);
  EPMOE_CHECK(num_micro_batches == 1 || num_micro_batches == 2, kInvalidArgument,
              "{} micro-batches (1 or 2 supported)", num_micro_batches);
  EPMOE_CHECK(mb >= 0 && mb < num_micro_batches, kInvalidArgument, "micro-batch {} of {}", mb,
              num_micro_batches);
  if (num_micro_batches == 1) return {0, tokens};
  // A takes the odd token, except on odd ranks in prefill (balanced summed over ranks).
  const bool a_takes_odd = rule == SplitRule::kHalves || rank % 2 == 0;
  const int64_t a = a_takes_odd ? (tokens + 1) / 2 : tokens / 2;
  return mb == 0 ? TokenRange{0, a} : TokenRange{a, tokens};
}

}  // namespace epmoe
