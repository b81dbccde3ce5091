// Internal, bench-only: the FP8 tile-configuration candidates of the sm90 grouped GEMM
// (sm90_gemm_tune.cuh), built with -DEPMOE_SM90_TUNING=ON so that CI's compile time does not grow.
// `epmoe bench --kernel gemm` times them beside the production FP8 kernel on the same inputs; no
// library code calls them.
#pragma once

#include <cuda_runtime.h>

#include "epmoe/core/tensor.h"
#include "epmoe/experts/sm90/sm90_grouped_gemm.cuh"

namespace epmoe::cuda {

// Candidates in this build: 0 without EPMOE_SM90_TUNING or without the sm90 kernels.
int sm90_fp8_tune_variants() noexcept;

// A short name for tables and JSON ("n256", "pingpong", "cluster2"); variant in
// [0, sm90_fp8_tune_variants()).
const char* sm90_fp8_tune_name(int variant);

// sm90_grouped_gemm_fp8_contiguous through candidate `variant`, bf16 output only; same operands,
// same checks. Throws Error(kUnsupported) for a variant this build does not hold.
void sm90_fp8_contiguous_variant(int variant, const TensorView& out, const TensorView& in,
                                 const TensorView& in_scale, const TensorView& w,
                                 const TensorView& w_scale, const TensorView& seg_indptr,
                                 int bank_offset, Sm90GemmWorkspace& ws, cudaStream_t stream);

}  // namespace epmoe::cuda
