// Internal to the sm90 GEMM family: what the host launchers (sm90_grouped_gemm.cu, no CUTLASS
// headers) hand to the kernel translation units (sm90_gemm_*.cu, one per instantiation).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace epmoe::cuda::sm90 {

// The instantiated kernels: input dtype x output dtype (x per-tile completion signals). Tile
// configs: sm90_gemm_config.cuh. The kFp8Bf16Tune* kernels are bench-only FP8 candidates, built
// with -DEPMOE_SM90_TUNING=ON (configs: sm90_gemm_tune.cuh; launcher: sm90_gemm_tune.h).
enum class Kernel {
  kBf16Bf16,
  kBf16F32,
  kFp8Bf16,
  kFp8F32,
  kBf16Bf16Signal,
  kFp8Bf16Signal,
  kFp8Bf16TunePingpong,
  kFp8Bf16TuneCluster2x1,
  kFp8Bf16TuneCluster1x2,
};

// Tile sizes (the configs static_assert them): m-blocks of kBlockM rows for every dtype; n-blocks
// of kBf16BlockN (bf16) or kFp8BlockN (FP8) output features.
constexpr int kBlockM = 128;
constexpr int kBf16BlockN = 256;
constexpr int kFp8BlockN = 128;

// Everything one grouped call reads; both layouts.
struct Params {
  void* out;              // contiguous [N, Nout]; masked [E_loc, M_max, Nout] (bf16|f32)
  const void* in;         // contiguous [N, K];    masked [E_loc, M_max, K]    (bf16|f8e4m3)
  const void* w;          // [E_bank, Nout, K]                                 (bf16|f8e4m3)
  const float* in_scale;  // FP8 only: contiguous [N, K/128]; masked [E_loc, M_max, K/128]
  const float* w_scale;   // FP8 only: [E_bank, Nout/128, K/128]
  const int32_t* counts;  // contiguous: seg_indptr [E_loc+1]; masked: count [E_loc] (DEVICE)
  bool masked;
  int64_t rows;  // contiguous: N; masked: M_max
  int n_out, k, e_loc, bank_offset;
  int32_t* signal;    // signal kernels: [E_loc · signal_blocks] i32 (DEVICE), else nullptr
  int signal_blocks;  // ceil(M_max / kBlockM)
};

// Device scratch handed to a kernel TU: `bytes` at `data` (16-byte aligned).
struct Scratch {
  void* data;
  size_t bytes;
  int sm_count;  // persistent CTAs to launch (<= the SMs the workspace was sized for)
};

// Bytes a kernel needs in the scratch for `groups` experts on a device with sm_count SMs.
template <Kernel K>
size_t workspace_bytes(int groups, int sm_count);
// Writes the per-expert arguments from p.counts on the device, then runs the grouped GEMM; both
// on `stream`, no host synchronisation. Throws Error(kCuda|kInternal) on CUTLASS failures.
template <Kernel K>
void run(const Params& p, const Scratch& s, cudaStream_t stream);

}  // namespace epmoe::cuda::sm90
