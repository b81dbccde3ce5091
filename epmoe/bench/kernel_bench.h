// Kernel micro-benchmarks of the single-GPU CUDA backend (DESIGN §7): median µs over CUDA-event
// timed runs after warm-up, L2 flushed before each run, random data; GB/s or TFLOP/s with the
// ratio to a ceiling measured in the same run (device-to-device copy bandwidth, cuBLAS dense bf16
// GEMM rate), and the baselines (unfused gate, one cuBLAS call per expert).
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace epmoe::cuda {

struct KernelBenchOptions {
  std::string kernel;  // gate | permute | post_reorder | silu | grouped_gemm | all
  std::string preset = "deepseek-v3";
  std::vector<int64_t> tokens = {128, 4096, 16384};
  int iters = 50;
  int warmup = 10;
};

// Runs the benchmark, prints a readable table to stdout and returns every row:
// {"device", "preset", "ceilings": {"copy_gbps", "gemm_tflops"}, "rows": [{"kernel", "tokens",
// "shape", "median_us", "gbps" | "tflops", "ceiling", "ratio", "baseline", "baseline_us",
// "speedup"}]}. Throws Error(kUnsupported) without a GPU, Error(kInvalidArgument) for an unknown
// kernel name.
nlohmann::json run_kernel_bench(const KernelBenchOptions& opts);

}  // namespace epmoe::cuda
