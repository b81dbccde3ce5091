// Bench-only FP8 tile configurations (-DEPMOE_SM90_TUNING=ON): candidates measured against the
// production Fp8BlockConfig by `epmoe bench --kernel gemm` before one of them may replace it.
// Each one is the production config (same operands, same scale layout Sm90BlockwiseScaleConfig<1,
// 128, 128, K, K>, same epilogue, bf16 output) with another tile, cluster or schedule; like every
// sm90 config it depends on the dtype only, never on M or the counts. Included only by the
// explicit-instantiation units sm90_gemm_fp8_tune_*.cu, after sm90_gemm_run.cuh.
//
// NOTES: what CUTLASS 4.2's ptr-array FP8 blockwise main loop
// (sm90_mma_array_tma_gmma_ss_warpspecialized_fp8_blockwise_scaling.hpp) accepts: tile M a
// multiple of the M scale granularity (1) and tile N of the N one (128), tile K a multiple of the
// K one (128) with one promotion per 128-wide K block; schedules
// KernelPtrArrayTmaWarpSpecialized{Cooperative,Pingpong}FP8Blockwise; any cluster shape (TMA
// multicast of B along cluster M, of A along cluster N). Every candidate keeps tile K = 128, so
// each output element sees the same wgmma K order and the same per-block promotion as production.
#pragma once

#include "epmoe/experts/sm90/sm90_gemm_config.cuh"

namespace epmoe::cuda::sm90 {

// The production FP8 config with another tile, cluster or schedule (bf16 output).
template <class Tile, class Cluster, class Schedule, class EpiSchedule>
struct Fp8TuneConfig : Fp8BlockConfig<cutlass::bfloat16_t, Tile, Cluster, Schedule, EpiSchedule> {
  static_assert(cute::size<2>(Tile{}) == 128,
                "one 128-wide K block per stage keeps production's K order and promotion points");
};

// NOTES: not a candidate: 128 x 256 x 128 (cooperative) does not compile with this scale layout:
// two 128-wide N scale blocks per tile with per-row A scales fail CUTLASS 4.2's
// GmmaFP8Accumulation::scale_core static_assert "Accumulator and scaleB must have same shape."
// (fp8_accumulation.hpp:120).

// 64 x 128 x 128, ping-pong: two consumer warpgroups on two different tiles, one's epilogue and
// scale promotion hidden behind the other's wgmma (DeepGEMM's argument for overlapping the f32
// promotion with the MMAs); m-blocks of 64 rows.
template <>
struct ConfigOf<Kernel::kFp8Bf16TunePingpong> {
  using type = Fp8TuneConfig<cute::Shape<cute::_64, cute::_128, cute::_128>,
                             cute::Shape<cute::_1, cute::_1, cute::_1>,
                             cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpongFP8Blockwise,
                             cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong>;
};

// Production tiles in 2 x 1 clusters: the two CTAs of a cluster take neighbouring m-blocks of the
// same n-block and receive the weight tile by one TMA multicast (half the B traffic from L2).
template <>
struct ConfigOf<Kernel::kFp8Bf16TuneCluster2x1> {
  using type = Fp8TuneConfig<cute::Shape<cute::_128, cute::_128, cute::_128>,
                             cute::Shape<cute::_2, cute::_1, cute::_1>,
                             cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperativeFP8Blockwise,
                             cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative>;
};

// Production tiles in 1 x 2 clusters: neighbouring n-blocks of one m-block share the activation
// tile (A multicast: one activation load feeds two n-blocks).
template <>
struct ConfigOf<Kernel::kFp8Bf16TuneCluster1x2> {
  using type = Fp8TuneConfig<cute::Shape<cute::_128, cute::_128, cute::_128>,
                             cute::Shape<cute::_1, cute::_2, cute::_1>,
                             cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperativeFP8Blockwise,
                             cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative>;
};

}  // namespace epmoe::cuda::sm90
