// Grouped-GEMM benchmark (DESIGN §7): the Hopper kernels (experts/sm90/, bf16 and FP8
// block-scaled) against the deterministic mma.sync kernel (grouped_gemm.cuh) and cuBLAS grouped
// (GroupedGemmRunner kGrouped, experts.cuh) at DeepSeek-V3 expert shapes (H = 7168, I = 2048;
// gate_up: Nout = 4096, K = 7168; down: Nout = 7168, K = 2048), E_loc = 256 (all experts local),
// 32 (EP8) and 8 (EP32), top-8 uniformly random routing. Median µs of CUDA-event timed runs after
// warm-up, a 256 MB buffer written before each run (L2 flush), random data. Same-run ceilings:
// dense cuBLAS bf16 and cuBLASLt FP8 GEMMs of 8192³, and device-to-device copy bandwidth (the
// roofline of a decode GEMM: the bytes it must move / copy bandwidth).
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <vector>

namespace epmoe::cuda {

// tokens: tokens per rank (T). Under EP every rank brings T tokens, so the rank holding
// experts [0, E_loc) receives the rows of R·T tokens (R = 256 / E_loc). Contiguous layout for
// every T; the masked layout too for T <= 512 (decode), with M_max = R·T.
// Prints a table to stdout and returns {"device", "iters", "warmup", "notes", "ceilings":
// {"dense_bf16_tflops", "dense_fp8_tflops", "copy_gbps"}, "rows": [{"gemm", "layout", "e_loc",
// "tokens", "rows", "n_out", "k", "det_us", "sm90_bf16_us", "sm90_fp8_us", "cublas_grouped_us",
// "*_tflops", "sm90_bf16_pct_dense", "sm90_fp8_pct_dense", "sm90_bf16_pct_roofline",
// "sm90_fp8_pct_roofline", "roofline_bf16_us", "roofline_fp8_us", "check_rel_l2"}]}; sm90
// columns are 0 in a build without the sm90 kernels. Masked rows with the sm90 kernels add the
// signalled calls (sm90_grouped_gemm_*masked_signal, the signal memset inside the timed run):
// "sig_bf16_us", "sig_fp8_us", "sig_*_overhead_pct" (vs the plain call), "sig_*_diff_elems"
// (valid output elements differing bitwise from the plain call) and "sig_bad_entries" (final
// signal entries off the contract); a second table prints them. Contiguous rows of a build with
// -DEPMOE_SM90_TUNING=ON add "fp8_variants": [{"name", "us", "tflops", "speedup_vs_fp8",
// "speedup_vs_bf16", "diff_elems", "bitwise_equal", "rel_l2_vs_fp8", "error"}], the bench-only FP8
// candidates (sm90_gemm_tune.h) on the production FP8 call's inputs, printed in a third table.
// Throws Error(kUnsupported) without a GPU, Error(kInvalidArgument) for iters < 1, warmup < 0 or
// a token count < 1.
nlohmann::json run_grouped_gemm_bench(const std::vector<int64_t>& tokens, int iters, int warmup);

}  // namespace epmoe::cuda
