// Per-tile completion signals for the sm90 grouped GEMM (DESIGN §6, single-batch overlap): an
// epilogue that is CUTLASS's ptr-array TMA epilogue plus one step after each output tile.
//
// After the tile (m-block m, n-block n) of group (local expert) e is stored, the thread that
// issued its TMA stores waits for them to complete (cp.async.bulk.wait_group 0, not the .read
// form: the writes themselves, not only the shared-memory reads), orders the async-proxy writes
// before its generic-proxy operations (fence.proxy.async.global), and adds 1 with release
// semantics at gpu scope to signal[e · blocks_per_group + m]. An entry therefore reaches the
// number of N-tiles exactly when every tile of its rows is in global memory, visible to a reader
// that loads the entry with acquire semantics. m-blocks without rows are never touched (0).
//
// NOTES: the wait costs the storing warpgroup the overlap of its last TMA stores with the next
// tile's main loop (once per tile); the tile configuration and the output bits are those of the
// kernel without signals.
#pragma once

#include <cutlass/cutlass.h>

#include <cstdint>
#include <cute/tensor.hpp>

namespace epmoe::cuda::sm90 {

template <class Base>
class SignalEpilogue : public Base {
 public:
  struct Arguments : Base::Arguments {
    int32_t* signal = nullptr;  // [E_loc · blocks_per_group] i32, zeroed by the caller
    int blocks_per_group = 0;   // ceil(M_max / block_m)
  };
  struct Params : Base::Params {
    int32_t* signal = nullptr;
    int blocks_per_group = 0;
  };

  template <class ProblemShape>
  static Params to_underlying_arguments(ProblemShape const& problem_shape, Arguments const& args,
                                        void* workspace) {
    Params p;
    static_cast<typename Base::Params&>(p) =
        Base::to_underlying_arguments(problem_shape, args, workspace);
    p.signal = args.signal;
    p.blocks_per_group = args.blocks_per_group;
    return p;
  }

  CUTLASS_HOST_DEVICE
  SignalEpilogue(Params const& params, typename Base::TensorStorage& shared_tensors)
      : Base(params, shared_tensors),
        signal_(params.signal),
        blocks_per_group_(params.blocks_per_group) {}

  template <class LoadPipeline, class LoadPipelineState, class StorePipeline,
            class StorePipelineState, class ProblemShapeMNKL, class TileShapeMNK,
            class TileCoordMNKL, class AccEngine, class AccLayout, class TiledMma, class TensorMapD>
  CUTLASS_DEVICE auto store(LoadPipeline load_pipeline, LoadPipelineState load_pipe_consumer_state,
                            StorePipeline store_pipeline,
                            StorePipelineState store_pipe_producer_state,
                            ProblemShapeMNKL problem_shape_mnkl, TileShapeMNK tile_shape_MNK,
                            TileCoordMNKL tile_coord_mnkl,
                            cute::Tensor<AccEngine, AccLayout> accumulators, TiledMma tiled_mma,
                            int thread_idx, typename Base::TensorStorage& shared_tensors,
                            TensorMapD const& store_tensormap, int subtile_idx = -1) {
    auto next = Base::store(load_pipeline, load_pipe_consumer_state, store_pipeline,
                            store_pipe_producer_state, problem_shape_mnkl, tile_shape_MNK,
                            tile_coord_mnkl, accumulators, tiled_mma, thread_idx, shared_tensors,
                            store_tensormap, subtile_idx);
    // The base epilogue issues every TMA store of the tile from one lane of the first consumer
    // warp; each lane of that warp waits for its own bulk groups (none but that lane's), then
    // lane 0 publishes.
    if (signal_ != nullptr && thread_idx / 32 == 0) {
      asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
      asm volatile("fence.proxy.async.global;\n" ::: "memory");
      __syncwarp();
      if (thread_idx == 0) {
        const int64_t m = int64_t(cute::get<0>(tile_coord_mnkl));
        const int64_t e = int64_t(cute::get<3>(tile_coord_mnkl));
        int32_t* p = signal_ + e * blocks_per_group_ + m;
        asm volatile("red.release.gpu.global.add.s32 [%0], %1;\n" ::"l"(p), "r"(1) : "memory");
      }
    }
    return next;
  }

 private:
  int32_t* signal_;
  int blocks_per_group_;
};

}  // namespace epmoe::cuda::sm90
