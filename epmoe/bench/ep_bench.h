// `epmoe bench --kernel dispatch|combine`: expert-parallel communication on GPUs, over loopback
// (R virtual ranks on one GPU) or NCCL (one GPU per rank, a thread each), with the same-run
// ceilings: device-to-device copy bandwidth, the peer copy bandwidth (>= 2 GPUs) and a plain
// all-to-all of the same bytes through the transport's host API.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>

namespace epmoe::cuda {

struct EpBenchOptions {
  std::string preset = "deepseek-v3";
  int ranks = 8;
  std::string transport = "loopback";  // loopback | nccl
  std::string mode = "low-latency";    // low-latency | normal
  int64_t tokens = 128;                // per rank
  bool fp8 = false;                    // FP8 dispatch payload
  std::string ll_transfer = "auto";    // low-latency: auto | device | host
  int iters = 20;
  int warmup = 5;
  uint64_t seed = 1;
};

// Prints a table and returns {device, ceilings, rows: [...]} (µs, bytes, GB/s, ratios).
nlohmann::json run_ep_bench(const EpBenchOptions& opts);

}  // namespace epmoe::cuda
