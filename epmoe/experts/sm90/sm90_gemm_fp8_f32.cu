// Explicit instantiation: sm90 grouped GEMM, FP8 in, f32 out (one CUTLASS kernel per unit keeps
// rebuilds and compile memory small).
#include "epmoe/experts/sm90/sm90_gemm_run.cuh"

namespace epmoe::cuda::sm90 {
template size_t workspace_bytes<Kernel::kFp8F32>(int groups, int sm_count);
template void run<Kernel::kFp8F32>(const Params& p, const Scratch& s, cudaStream_t stream);
}  // namespace epmoe::cuda::sm90
