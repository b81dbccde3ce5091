// Runs the layer on GPU ranks through the executor: the library side of `epmoe run --backend
// cuda` and `epmoe bench --kernel layer`. Launch (mpirun, a thread per GPU over NCCL, or
// loopback) is chosen by comm/launch.h; the order of the layer by the strategies
// (overlap/executor.h). Several strategies run on the same layer objects, interleaved per
// iteration, so their times and outputs come from one run.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "epmoe/core/config.h"
#include "epmoe/core/tensor.h"
#include "epmoe/ep/ep_cuda.h"
#include "epmoe/layer/layer_rank.h"
#include "epmoe/overlap/executor.h"
#include "epmoe/weights/moe_weights.h"

namespace epmoe::cuda {

struct CudaRunSpec {
  const MoeWeights* weights = nullptr;
  EpConfig ep;                      // T_max > 0
  std::vector<int64_t> tokens;      // per rank
  const Tensor* x_all = nullptr;    // [Σ tokens, H] bf16, rank r's rows after rank r-1's
  const Tensor* ids_all = nullptr;  // optional routing [Σ tokens, K'] i32 (+ weights f32)
  const Tensor* weights_all = nullptr;
  std::string transport = "auto";  // auto | nccl | loopback
  EpCudaOptions options;
  std::vector<OverlapKind> strategies = {OverlapKind::kNone};
  int iters = 3;        // timed forwards per strategy (after one warm-up)
  int trace_iters = 0;  // traced forwards per strategy (per-op breakdown)
  bool graph = false;   // capture each strategy's forward once, replay it
  // Attention stand-in (benchmarks): a kernel occupying every SM for attn_us · T_mb / T_rank µs
  // per micro-batch, as attn_core; 0 = none.
  double attn_us = 0;
};

struct StrategyResult {
  OverlapKind kind = OverlapKind::kNone;
  std::string describe;
  std::vector<double> layer_us;              // per rank: median forward time
  std::vector<std::vector<OpTiming>> trace;  // per rank: the last traced forward
  std::vector<std::vector<std::pair<std::string, double>>>
      op_us;         // per rank: median µs per "op/mb"
  Tensor y, ids, w;  // gathered [Σ tokens, ...] (this process's rows)
};

struct CudaRunResult {
  std::string transport;
  int ll_host_ranks = 0;
  int64_t row_begin = 0, row_end = 0;  // rows this process computed (mpirun: its rank's)
  std::vector<EpCudaTraffic> traffic;  // per rank, of the first strategy's last forward
  std::vector<StrategyResult> strategies;
};

CudaRunResult run_layer_cuda(const CudaRunSpec& spec);

// Chrome/Perfetto trace (ui.perfetto.dev) of traced forwards: a process per rank, a track per
// stream, a slice per operation and micro-batch.
std::string chrome_trace_json(const std::vector<std::vector<OpTiming>>& per_rank,
                              const std::string& label);

}  // namespace epmoe::cuda
