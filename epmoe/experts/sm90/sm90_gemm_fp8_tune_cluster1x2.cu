// Explicit instantiation, bench-only (EPMOE_SM90_TUNING): sm90 grouped GEMM, FP8 in, bf16 out,
// 128 x 128 x 128 cooperative in 1 x 2 clusters (sm90_gemm_tune.cuh).
#include "epmoe/experts/sm90/sm90_gemm_run.cuh"
#include "epmoe/experts/sm90/sm90_gemm_tune.cuh"

namespace epmoe::cuda::sm90 {
template size_t workspace_bytes<Kernel::kFp8Bf16TuneCluster1x2>(int groups, int sm_count);
template void run<Kernel::kFp8Bf16TuneCluster1x2>(const Params& p, const Scratch& s,
                                                  cudaStream_t stream);
}  // namespace epmoe::cuda::sm90
