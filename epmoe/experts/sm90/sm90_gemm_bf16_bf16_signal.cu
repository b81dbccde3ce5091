// Explicit instantiation: sm90 grouped GEMM, bf16 in, bf16 out, per-tile completion signals.
#include "epmoe/experts/sm90/sm90_gemm_run.cuh"

namespace epmoe::cuda::sm90 {
template size_t workspace_bytes<Kernel::kBf16Bf16Signal>(int groups, int sm_count);
template void run<Kernel::kBf16Bf16Signal>(const Params& p, const Scratch& s, cudaStream_t stream);
}  // namespace epmoe::cuda::sm90
