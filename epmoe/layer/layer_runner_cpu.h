// Runs the CPU layer under expert parallelism: R ranks as threads, each with its own tokens and a
// MoeLayerRankCpu, one strategy through the executor. Gathers outputs, routings, per-operation
// medians and traffic. The front ends (CLI, tests) and the single-rank reference call it.
#pragma once

#include <string>
#include <vector>

#include "epmoe/ep/ep_stats.h"
#include "epmoe/layer/layer_rank.h"
#include "epmoe/overlap/executor.h"
#include "epmoe/weights/moe_weights.h"

namespace epmoe {

// One rank's tokens.
struct RankInput {
  TensorView x;             // [T_r, H] bf16|f32; T_r may be 0
  TensorView topk_ids;      // [T_r, K'] i32 in [-1, E + fused shared), or empty: the gate routes
  TensorView topk_weights;  // [T_r, K'] f32, with topk_ids
};

struct LayerRunOptions {
  OverlapKind overlap = OverlapKind::kNone;
  UserOps user;                  // attention stand-ins around the MoE (may be empty)
  int iters = 1;                 // forwards; timings are medians over them, outputs from the last
  int threads_per_rank = 1;      // CPU threads of each rank's kernels (0 = every core)
  int64_t wait_timeout_ms = -1;  // every bounded wait; -1: EPMOE_TIMEOUT_MS
};

struct LayerRunResult {
  std::string strategy;              // Strategy::describe()
  std::vector<Tensor> y;             // per rank: [T_r, H] f32
  std::vector<Tensor> topk_ids;      // per rank: [T_r, K'] i32, the routing used
  std::vector<Tensor> topk_weights;  // per rank: [T_r, K'] f32
  // Per-operation medians: op_names[i] (the layer's operations in LayerOp order, then user
  // operations) and op_us[r][i], µs of rank r summed over its micro-batches.
  std::vector<std::string> op_names;
  std::vector<std::vector<double>> op_us;
  std::vector<double> total_us;    // per rank: median forward wall time
  std::vector<EpTraffic> traffic;  // per rank, last forward, both micro-batches
};

// ep.max_tokens_per_rank == 0 means "the largest T_r". inputs: one per rank.
LayerRunResult run_layer_cpu(const MoeWeights& weights, EpConfig ep,
                             const std::vector<RankInput>& inputs, const LayerRunOptions& opts);

// Splits x [T, H] into per-rank row ranges of the given sizes (which must sum to T).
std::vector<TensorView> split_rows(const TensorView& x, const std::vector<int64_t>& sizes);

}  // namespace epmoe
