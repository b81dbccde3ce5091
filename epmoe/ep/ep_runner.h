// Runs one MoE layer under expert parallelism on the CPU backend: R ranks as threads, each with
// its own tokens, and gathers outputs, stage times and traffic. Used by the CLI and the tests.
#pragma once

#include <vector>

#include "epmoe/ep/ep_cpu.h"

namespace epmoe {

struct EpRunResult {
  std::vector<Tensor> y;                    // per rank: [T_r, H] f32 (last iteration)
  std::vector<EpStageTimes> median_times;   // per rank, median over iterations
  std::vector<EpTraffic> traffic;           // per rank, last iteration
};

// xs: per-rank inputs [T_r, H] bf16|f32 (T_r may be 0). ep.max_tokens_per_rank == 0 means
// "the largest T_r". threads_per_rank: CPU threads of each rank's kernels.
EpRunResult run_ep_cpu(const MoeWeights& weights, EpConfig ep, const std::vector<TensorView>& xs,
                       int iters = 1, int threads_per_rank = 1);

// Splits x [T, H] into per-rank row ranges of the given sizes (which must sum to T).
std::vector<TensorView> split_rows(const TensorView& x, const std::vector<int64_t>& sizes);

}  // namespace epmoe
