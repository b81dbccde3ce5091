// Explicit instantiation, bench-only (EPMOE_SM90_TUNING): sm90 grouped GEMM, FP8 in, bf16 out,
// 64 x 128 x 128 ping-pong (sm90_gemm_tune.cuh).
#include "epmoe/experts/sm90/sm90_gemm_run.cuh"
#include "epmoe/experts/sm90/sm90_gemm_tune.cuh"

namespace epmoe::cuda::sm90 {
template size_t workspace_bytes<Kernel::kFp8Bf16TunePingpong>(int groups, int sm_count);
template void run<Kernel::kFp8Bf16TunePingpong>(const Params& p, const Scratch& s,
                                                cudaStream_t stream);
}  // namespace epmoe::cuda::sm90
