// Grouped-GEMM benchmark (DESIGN §7): the deterministic device-count kernel (grouped_gemm.cuh)
// against the cuBLAS GroupedGemmRunner (kGrouped and kPerExpert, experts.cuh) at DeepSeek-V3
// expert shapes (H = 7168, I = 2048; gate_up: Nout = 4096, K = 7168; down: Nout = 7168,
// K = 2048), E_loc = 256 (all experts local) and E_loc = 32 (EP8), top-8 uniformly random
// routing. Median µs of CUDA-event timed runs after warm-up, a 256 MB buffer written before each
// run (L2 flush), random bf16 data; TFLOP/s and the ratio to a dense cuBLAS bf16 GEMM of the same
// FLOPs measured in the same run.
#pragma once

#include <cstdint>
#include <vector>

#include <nlohmann/json.hpp>

namespace epmoe::cuda {

// tokens: tokens per rank (T). Under EP8 every rank brings T tokens, so the rank holding
// experts [0, 32) receives the rows of R·T = 8T tokens; E_loc = 256 routes T tokens. Either way
// an expert gets about T·8/256 rows. Contiguous layout for every T; the masked layout too for
// T <= 512 (decode), with M_max = R·T (each routed token at most once per expert).
// Prints a table to stdout and returns {"device", "iters", "warmup", "notes", "rows": [{"gemm",
// "layout", "e_loc", "tokens", "rows", "n_out", "k", "ours_us", "ours_tflops",
// "cublas_grouped_us", "cublas_per_expert_us", "dense_us", "dense_tflops", "ratio_to_dense",
// "speedup_vs_cublas_grouped", "speedup_vs_cublas_per_expert", "weight_gbps",
// "check_rel_l2"}]}. Throws Error(kUnsupported) without a GPU, Error(kInvalidArgument) for
// iters < 1, warmup < 0 or a token count < 1.
nlohmann::json run_grouped_gemm_bench(const std::vector<int64_t>& tokens, int iters, int warmup);

}  // namespace epmoe::cuda
