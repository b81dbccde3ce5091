// `epmoe run`: one MoE layer forward under expert parallelism, timed and optionally checked.
#pragma once

#include <cstdint>
#include <string>

namespace epmoe::cli {

struct RunOptions {
  std::string preset = "deepseek-v3-tiny";
  std::string golden;  // safetensors layer file; overrides preset
  int ranks = 4;
  std::string tokens;                // "N" (each rank) or "a,b,c" (per rank); empty: uneven default
  int64_t max_tokens = 0;            // T_max; 0 = largest T_r
  std::string mode = "normal";       // normal | low-latency
  std::string backend = "cpu";       // cpu | cuda
  std::string transport = "auto";    // cuda EP: auto | nccl | loopback
  bool fp8_dispatch = false;         // cuda EP: FP8 dispatch payload
  std::string weights = "bf16";      // cuda: expert GEMMs in bf16 | fp8 (block-scaled)
  std::string ll_transfer = "auto";  // cuda EP, low-latency: auto | device | host
  std::string overlap = "none";      // none | tbo | sbo | auto (overlap/executor.h)
  int iters = 3;
  bool check = true;
  bool fuse_shared = false;
  bool scale_on_output = false;
  int threads = 0;  // CPU threads in all (0 = all cores)
  uint64_t seed = 1;
  std::string json;  // write results here
};

// The most ranks `epmoe run` accepts (checked before any per-rank work).
constexpr int kMaxRanks = 4096;

// Opens `path` for writing at once (created if missing, not truncated), so a bad --json path is
// an error before the run, not after it. Refuses directories and FIFOs (a write would block).
void open_json_output(const std::string& path);

// Returns the process exit code: 0 = ran (and PASS when checked), 1 = check FAILED.
// Throws epmoe::Error for bad input.
int run_command(const RunOptions& opts);

// `epmoe bench`: kernel benchmarks on the GPU (see docs/benchmarks/).
struct BenchOptions {
  std::string kernel =
      "all";  // gate|permute|post_reorder|silu|grouped_gemm|all|gemm|dispatch|combine
  std::string preset = "deepseek-v3";
  std::string tokens;  // comma list; default per kernel
  int iters = 20;
  int warmup = 5;
  int ranks = 8;  // dispatch/combine
  std::string transport = "loopback";
  std::string mode = "low-latency";
  bool fp8 = false;
  std::string ll_transfer = "auto";
  // --kernel layer
  std::string weights = "bf16";  // bf16 | fp8 expert GEMMs
  std::string overlap = "all";   // none | tbo | sbo | all (comma list allowed)
  double attn_us = 0;            // attention stand-in per layer at the full batch
  int experts_per_rank = 0;      // > 0: the large-EP slice
  bool graph = false;
  int comm_blocks = 24;
  std::string trace;  // Chrome trace file
  std::string json;
};
int bench_command(const BenchOptions& opts);

}  // namespace epmoe::cli
