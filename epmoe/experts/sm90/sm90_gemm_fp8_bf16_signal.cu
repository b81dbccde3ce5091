// Explicit instantiation: sm90 grouped GEMM, FP8 in, bf16 out, per-tile completion signals.
#include "epmoe/experts/sm90/sm90_gemm_run.cuh"

namespace epmoe::cuda::sm90 {
template size_t workspace_bytes<Kernel::kFp8Bf16Signal>(int groups, int sm_count);
template void run<Kernel::kFp8Bf16Signal>(const Params& p, const Scratch& s, cudaStream_t stream);
}  // namespace epmoe::cuda::sm90
