// The body of one sm90 grouped-GEMM instantiation: the per-expert argument writer (device counts
// -> CUTLASS's per-group problem sizes, pointers, strides and scale layouts) and the CUTLASS
// launch. Included only by the explicit-instantiation units sm90_gemm_<in>_<out>.cu.
#pragma once

#include <cstdint>
#include <cutlass/util/packed_stride.hpp>

#include "epmoe/core/error.h"
#include "epmoe/cuda/cuda_check.h"
#include "epmoe/experts/sm90/sm90_gemm_config.cuh"

namespace epmoe::cuda::sm90 {

// Per-expert argument arrays of one call, carved from the front of the scratch; CUTLASS's own
// workspace (TMA descriptors per SM, scheduler state) follows.
template <class Cfg>
struct GroupArrays {
  using Gemm = typename Cfg::Gemm;
  using Shape = typename ProblemShape::UnderlyingProblemShape;
  using ElementA = typename Cfg::ElementA;
  using ElementB = typename Cfg::ElementB;
  using ElementD = typename Cfg::ElementD;
  using StrideA = typename Gemm::GemmKernel::InternalStrideA;
  using StrideB = typename Gemm::GemmKernel::InternalStrideB;
  using StrideD = typename Gemm::GemmKernel::InternalStrideD;
  using LayoutSFA = typename Cfg::LayoutSFA;
  using LayoutSFB = typename Cfg::LayoutSFB;

  Shape* shapes;          // [G] (M_e, Nout, K)
  const ElementA** a;     // [G] first row of expert e's activations
  const ElementB** b;     // [G] expert bank_offset + e's weight [Nout, K]
  ElementD** d;           // [G] first output row of expert e
  StrideA* stride_a;      // [G]
  StrideB* stride_b;      // [G]
  StrideD* stride_d;      // [G]
  const float** sfa;      // [G] FP8: first row of expert e's activation scales
  const float** sfb;      // [G] FP8: expert's weight scales [Nout/128, K/128]
  LayoutSFA* layout_sfa;  // [G]
  LayoutSFB* layout_sfb;  // [G]
  void* cutlass_ws;       // CUTLASS's workspace
  size_t arrays_bytes;    // bytes before cutlass_ws

  static size_t align(size_t x) { return (x + 255) & ~size_t(255); }

  // Carves the arrays for `groups` experts from `base` (nullptr: only measures).
  static GroupArrays carve(void* base, int groups) {
    GroupArrays g{};
    size_t off = 0;
    auto* b0 = static_cast<char*>(base);
    auto take = [&](auto*& ptr, size_t elem) {
      using P = std::remove_reference_t<decltype(ptr)>;
      ptr = base ? reinterpret_cast<P>(b0 + off) : nullptr;
      off += align(elem * size_t(groups));
    };
    take(g.shapes, sizeof(Shape));
    take(g.a, sizeof(void*));
    take(g.b, sizeof(void*));
    take(g.d, sizeof(void*));
    take(g.stride_a, sizeof(StrideA));
    take(g.stride_b, sizeof(StrideB));
    take(g.stride_d, sizeof(StrideD));
    if constexpr (Cfg::kScaled) {
      take(g.sfa, sizeof(void*));
      take(g.sfb, sizeof(void*));
      take(g.layout_sfa, sizeof(LayoutSFA));
      take(g.layout_sfb, sizeof(LayoutSFB));
    }
    g.arrays_bytes = off;
    g.cutlass_ws = base ? b0 + off : nullptr;
    return g;
  }
};

// One thread per local expert: its rows from the device counts, then its CUTLASS arguments.
// Counts are clamped (contiguous: begin to [0, N], end to [begin, N]; masked: to [0, M_max]) so
// a corrupt count gives wrong rows, never an access outside in/out.
template <class Cfg>
__global__ void write_group_args(const Params p, const GroupArrays<Cfg> g) {
  using G = GroupArrays<Cfg>;
  const int e = int(blockIdx.x * blockDim.x + threadIdx.x);
  if (e >= p.e_loc) return;
  int64_t row0, m;
  if (p.masked) {
    row0 = int64_t(e) * p.rows;
    m = min(int64_t(max(p.counts[e], 0)), p.rows);
  } else {
    row0 = min(int64_t(max(p.counts[e], 0)), p.rows);
    m = min(max(int64_t(p.counts[e + 1]), row0), p.rows) - row0;
  }
  const int64_t expert = int64_t(p.bank_offset) + e;
  const int M = int(m), N = p.n_out, K = p.k;
  g.shapes[e] = typename G::Shape(M, N, K);
  g.a[e] = static_cast<const typename G::ElementA*>(p.in) + row0 * K;
  g.b[e] = static_cast<const typename G::ElementB*>(p.w) + expert * N * K;
  g.d[e] = static_cast<typename G::ElementD*>(p.out) + row0 * N;
  g.stride_a[e] =
      cutlass::make_cute_packed_stride(typename G::StrideA{}, cute::make_shape(M, K, 1));
  g.stride_b[e] =
      cutlass::make_cute_packed_stride(typename G::StrideB{}, cute::make_shape(N, K, 1));
  g.stride_d[e] =
      cutlass::make_cute_packed_stride(typename G::StrideD{}, cute::make_shape(M, N, 1));
  if constexpr (Cfg::kScaled) {
    const int64_t kb = K / Cfg::kScaleBlock, nb = N / Cfg::kScaleBlock;
    g.sfa[e] = p.in_scale + row0 * kb;
    g.sfb[e] = p.w_scale + expert * nb * kb;
    g.layout_sfa[e] = Cfg::ScaleConfig::tile_atom_to_shape_SFA(cute::make_shape(M, N, K, 1));
    g.layout_sfb[e] = Cfg::ScaleConfig::tile_atom_to_shape_SFB(cute::make_shape(M, N, K, 1));
  }
}

template <class Cfg>
typename Cfg::Gemm::Arguments make_arguments(const Params& p, const GroupArrays<Cfg>& g,
                                             int sm_count) {
  using Gemm = typename Cfg::Gemm;
  cutlass::KernelHardwareInfo hw{};
  hw.device_id = 0;  // unused when sm_count is given
  hw.sm_count = sm_count;
  typename Gemm::Arguments args{};
  args.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
  // NOTES: no host problem shapes: the scheduler reads the device shapes, so the grid is one
  // persistent CTA per SM whatever the counts.
  args.problem_shape = {p.e_loc, g.shapes, nullptr};
  if constexpr (Cfg::kScaled) {
    args.mainloop = {g.a, g.stride_a, g.b, g.stride_b, g.sfa, g.layout_sfa, g.sfb, g.layout_sfb};
  } else {
    args.mainloop = {g.a, g.stride_a, g.b, g.stride_b};
  }
  args.epilogue.ptr_C = nullptr;
  args.epilogue.dC = nullptr;
  args.epilogue.ptr_D = g.d;
  args.epilogue.dD = g.stride_d;
  if constexpr (Cfg::kSignal) {
    args.epilogue.signal = p.signal;
    args.epilogue.blocks_per_group = p.signal_blocks;
  }
  auto& fusion = args.epilogue.thread;
  fusion.alpha = 1.0f;
  fusion.beta = 0.0f;
  fusion.alpha_ptr = nullptr;
  fusion.beta_ptr = nullptr;
  fusion.alpha_ptr_array = nullptr;
  fusion.beta_ptr_array = nullptr;
  args.hw_info = hw;
  return args;
}

template <Kernel K>
size_t workspace_bytes(int groups, int sm_count) {
  using Cfg = typename ConfigOf<K>::type;
  const GroupArrays<Cfg> g = GroupArrays<Cfg>::carve(nullptr, groups);
  Params p{};
  p.e_loc = groups;
  const auto args = make_arguments<Cfg>(p, g, sm_count);
  return g.arrays_bytes + Cfg::Gemm::get_workspace_size(args) + 256;
}

inline const char* status_name(cutlass::Status s) { return cutlassGetStatusString(s); }

template <Kernel K>
void run(const Params& p, const Scratch& s, cudaStream_t stream) {
  using Cfg = typename ConfigOf<K>::type;
  using Gemm = typename Cfg::Gemm;
  const GroupArrays<Cfg> g = GroupArrays<Cfg>::carve(s.data, p.e_loc);
  const int threads = 128;
  write_group_args<Cfg><<<(p.e_loc + threads - 1) / threads, threads, 0, stream>>>(p, g);
  EPMOE_CUDA_CHECK_LAUNCH("write_group_args");

  const auto args = make_arguments<Cfg>(p, g, s.sm_count);
  const size_t need = g.arrays_bytes + Gemm::get_workspace_size(args);
  EPMOE_CHECK(need <= s.bytes, kInternal,
              "sm90 grouped GEMM: workspace holds {} bytes, the call needs {} ({} experts)",
              s.bytes, need, p.e_loc);
  Gemm gemm;
  cutlass::Status st = gemm.can_implement(args);
  EPMOE_CHECK(st == cutlass::Status::kSuccess, kUnsupported,
              "sm90 grouped GEMM: CUTLASS cannot run Nout = {}, K = {}: {}", p.n_out, p.k,
              status_name(st));
  st = gemm.initialize(args, g.cutlass_ws, stream);
  EPMOE_CHECK(st == cutlass::Status::kSuccess, kCuda,
              "sm90 grouped GEMM: CUTLASS initialize failed: {}", status_name(st));
  st = gemm.run(stream);
  EPMOE_CHECK(st == cutlass::Status::kSuccess, kCuda, "sm90 grouped GEMM: launch failed: {} ({})",
              status_name(st), cudaGetErrorString(cudaGetLastError()));
}

}  // namespace epmoe::cuda::sm90
