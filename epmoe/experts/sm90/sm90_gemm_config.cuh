// Tile configurations of the sm90 grouped GEMMs (CUTLASS 3.x/4.x collective builders). One
// configuration per (input dtype, output dtype): it may depend on N, K and the dtype, never on M
// or the counts (sm90_grouped_gemm.cuh, NOTES on row independence).
//
// A: activations [M_e, K] row-major (K contiguous); B: the expert's weight [Nout, K] (K
// contiguous, CUTLASS's column-major K x Nout); D: [M_e, Nout] row-major; no C operand
// (D = accumulator, converted with round-to-nearest-even).
#pragma once

#include <cutlass/cutlass.h>
#include <cutlass/gemm/device/gemm_universal_adapter.h>

#include <cute/tensor.hpp>
#include <cutlass/detail/blockwise_scale_layout.hpp>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/dispatch_policy.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>

#include "epmoe/experts/sm90/sm90_gemm_params.h"
#include "epmoe/experts/sm90/sm90_signal_epilogue.cuh"

namespace epmoe::cuda::sm90 {

using ProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;  // (M, N, K)

template <class ElementD, class TileShape, class ClusterShape, class EpilogueSchedule>
using EpilogueOf = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, float, float,                  //
    void, cutlass::layout::RowMajor*, 128 / cutlass::sizeof_bits<ElementD>::value,  // no C
    ElementD, cutlass::layout::RowMajor*, 128 / cutlass::sizeof_bits<ElementD>::value,
    EpilogueSchedule,
    cutlass::epilogue::fusion::LinearCombination<ElementD, float, void, float>>::CollectiveOp;

// bf16 x bf16 -> Out. 128 x 256 x 64 tiles, two consumer warpgroups (cooperative, 64 x 256
// each), one producer warp issuing TMA, as many stages as shared memory holds.
template <class Out>
struct Bf16Config {
  using ElementA = cutlass::bfloat16_t;
  using ElementB = cutlass::bfloat16_t;
  using ElementD = Out;
  using TileShape = cute::Shape<cute::Int<kBlockM>, cute::Int<kBf16BlockN>, cute::_64>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  using KernelSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
  using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
  static constexpr bool kScaled = false;
  static constexpr bool kSignal = false;
  static constexpr int kBlockM = cute::size<0>(TileShape{});

  using Epilogue = EpilogueOf<ElementD, TileShape, ClusterShape, EpilogueSchedule>;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,  //
      ElementA, cutlass::layout::RowMajor*, 8,              // A: [M, K]
      ElementB, cutlass::layout::ColumnMajor*, 8,           // B: [Nout, K]
      float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename Epilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;
  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;
  // Placeholders so the argument writer is one template for both families.
  using LayoutSFA = int;
  using LayoutSFB = int;
};

// FP8 e4m3 x e4m3 -> Out with block scales: A per (row, 128 of K), B per (128 of N, 128 of K),
// both K-major in memory (as DeepSeek's activations and `weight_scale_inv` are laid out).
// Production: 128 x 128 x 128 tiles, no cluster, cooperative: one K block per pipeline stage,
// scales promoted every K block. The other parameters serve the bench-only tile candidates
// (sm90_gemm_tune.cuh), which keep the K step of 128 and so every output bit.
template <class Out,
          class Tile = cute::Shape<cute::Int<kBlockM>, cute::Int<kFp8BlockN>, cute::_128>,
          class Cluster = cute::Shape<cute::_1, cute::_1, cute::_1>,
          class Schedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperativeFP8Blockwise,
          class EpiSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative>
struct Fp8BlockConfig {
  using ElementA = cutlass::float_e4m3_t;
  using ElementB = cutlass::float_e4m3_t;
  using ElementD = Out;
  using TileShape = Tile;
  using ClusterShape = Cluster;
  using KernelSchedule = Schedule;
  using EpilogueSchedule = EpiSchedule;
  static constexpr bool kScaled = true;
  static constexpr bool kSignal = false;
  static constexpr int kBlockM = cute::size<0>(TileShape{});
  static constexpr int kScaleBlock = 128;  // K (both operands) and N (weights)
  using ScaleConfig =
      cutlass::detail::Sm90BlockwiseScaleConfig<1, kScaleBlock, kScaleBlock, cute::GMMA::Major::K,
                                                cute::GMMA::Major::K>;
  using LayoutSFA = decltype(ScaleConfig::deduce_layoutSFA());
  using LayoutSFB = decltype(ScaleConfig::deduce_layoutSFB());

  using Epilogue = EpilogueOf<ElementD, TileShape, ClusterShape, EpilogueSchedule>;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,                   //
      ElementA, cute::tuple<cutlass::layout::RowMajor*, LayoutSFA*>, 16,     // A: [M, K]
      ElementB, cute::tuple<cutlass::layout::ColumnMajor*, LayoutSFB*>, 16,  // B: [Nout, K]
      float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename Epilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;
  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;
};

// The same kernel with per-tile completion signals (sm90_signal_epilogue.cuh): same tiles, same
// main loop (its stage count was sized for the base epilogue, whose shared storage this one
// shares), same output bits.
template <class Cfg>
struct WithSignals : Cfg {
  static constexpr bool kSignal = true;
  using Epilogue = SignalEpilogue<typename Cfg::Epilogue>;
  using GemmKernel =
      cutlass::gemm::kernel::GemmUniversal<ProblemShape, typename Cfg::Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;
};

template <Kernel K>
struct ConfigOf;
template <>
struct ConfigOf<Kernel::kBf16Bf16> {
  using type = Bf16Config<cutlass::bfloat16_t>;
};
template <>
struct ConfigOf<Kernel::kBf16F32> {
  using type = Bf16Config<float>;
};
template <>
struct ConfigOf<Kernel::kFp8Bf16> {
  using type = Fp8BlockConfig<cutlass::bfloat16_t>;
};
template <>
struct ConfigOf<Kernel::kFp8F32> {
  using type = Fp8BlockConfig<float>;
};
template <>
struct ConfigOf<Kernel::kBf16Bf16Signal> {
  using type = WithSignals<Bf16Config<cutlass::bfloat16_t>>;
};
template <>
struct ConfigOf<Kernel::kFp8Bf16Signal> {
  using type = WithSignals<Fp8BlockConfig<cutlass::bfloat16_t>>;
};

}  // namespace epmoe::cuda::sm90
