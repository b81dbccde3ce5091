// `epmoe bench --kernel layer`: the whole MoE layer per rank under each overlap strategy (none,
// tbo, sbo), timed in one run on the same layer objects, with an attention stand-in of
// configurable cost, the per-op breakdown, the speedup against `none` and the share of
// communication time hidden; optionally a Chrome/Perfetto trace.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace epmoe::cuda {

struct LayerBenchOptions {
  std::string preset = "deepseek-v3";
  // > 0: the large-EP slice: the preset's expert sizes with ranks · experts_per_rank routed
  // experts (few local experts per rank, as at EP32-EP72).
  int experts_per_rank = 0;
  int ranks = 2;
  std::string transport = "auto";       // auto | nccl | loopback
  std::string mode = "low-latency";     // low-latency (decode) | normal (prefill)
  std::vector<int64_t> tokens = {128};  // per rank
  std::vector<std::string> overlap = {"none", "tbo", "sbo"};
  // Attention stand-in per layer at the rank's full batch, µs; < 0: as long as the sequential
  // MoE layer measured first ("about the MoE's own cost").
  double attn_us = 0;
  bool graph = false;  // capture each strategy once, replay
  int comm_blocks = 24;
  bool fp8 = false;          // FP8 dispatch payload
  bool fp8_experts = false;  // FP8 expert GEMMs (weights quantised at load)
  int iters = 20;
  int trace_iters = 5;
  std::string trace_file;  // Chrome trace of the first overlapped strategy
  uint64_t seed = 1;
};

nlohmann::json run_layer_bench(const LayerBenchOptions& opts);

}  // namespace epmoe::cuda
