// Hopper grouped GEMM family (sm_90a): per local expert e, out_e = in_e · W[bank_offset + e]ᵀ
// with f32 accumulation, for the contiguous and the masked layout (DESIGN §3), in bf16 and in
// FP8 e4m3 with DeepSeek's block scales. wgmma fed by TMA through a multi-stage shared-memory
// pipeline, producer/consumer warp specialisation, a persistent tile scheduler over (expert,
// m-block, n-block) — CUTLASS's sm90 ptr-array grouped kernels. The per-expert row counts are
// read ON THE DEVICE: a small kernel turns them into CUTLASS's per-group problem sizes and
// pointers (no host copy of the shapes), so every call can be captured in a CUDA graph and
// replayed with new counts.
//
// NOTES: row independence. The tile configuration (tile shape, stages, MMA instruction, K order)
// is a function of the dtype only, never of M or the counts; every output element is one f32
// accumulator fed by the same wgmma sequence over k = 0, BLOCK_K, 2·BLOCK_K, ... (FP8: each
// 128-wide K block accumulated apart and added to the running sum times a_scale(row, kb) ·
// w_scale(nb, kb), in the same order); no split-K, no stream-K, no atomics; the epilogue is a
// plain conversion. Rows of a tile beyond the expert's count are zero-filled by TMA and never
// stored. A row's bits therefore depend only on that row (and its scales) and the weights, never
// on how many rows share the call, where the row sits or which other experts have rows.
//
// Workspace: each call writes per-expert arguments and TMA descriptors into a Sm90GemmWorkspace
// (allocated once by the caller, outside any graph capture). Calls that may run concurrently
// (two streams, two micro-batches) need one workspace each; calls on one stream may share one.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "epmoe/core/tensor.h"

namespace epmoe::cuda {

// True when this build holds the sm90 kernels (CUDA + CUTLASS headers found at configure time)
// and the current device is an sm_90 GPU (false without a GPU). The functions below throw
// Error(kUnsupported) where it is false.
bool sm90_gemm_available() noexcept;

// Device scratch of the sm90 GEMMs for up to max_experts local experts on the device that is
// current at construction (one cudaMalloc, here; calls never allocate).
class Sm90GemmWorkspace {
 public:
  Sm90GemmWorkspace() = default;
  explicit Sm90GemmWorkspace(int max_experts);
  ~Sm90GemmWorkspace();
  Sm90GemmWorkspace(Sm90GemmWorkspace&& o) noexcept;
  Sm90GemmWorkspace& operator=(Sm90GemmWorkspace&& o) noexcept;
  Sm90GemmWorkspace(const Sm90GemmWorkspace&) = delete;
  Sm90GemmWorkspace& operator=(const Sm90GemmWorkspace&) = delete;

  int max_experts() const { return max_experts_; }
  int device() const { return device_; }
  int sm_count() const { return sm_count_; }
  // The persistent kernels launch one CTA per SM they may use: all SMs by default; fewer leaves
  // SMs to kernels that run at the same time and wait on the GEMM (the single-batch-overlap
  // combine-send on its signals must have SMs of its own, or it can starve the GEMM it waits
  // for). n in [1, sm_count()]; the tile configuration, hence every output bit, is unchanged.
  void set_max_sms(int n);
  int max_sms() const { return max_sms_; }
  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
  int max_experts_ = 0, device_ = -1, sm_count_ = 0, max_sms_ = 0;
};

// --- bf16 --------------------------------------------------------------------------------------
// Contiguous: rows [seg_indptr[e], seg_indptr[e+1]) of `in` go through bank expert
// bank_offset + e; rows >= seg_indptr[E_loc] are neither read nor written.
// out: [N, Nout] bf16|f32; in: [N, K] bf16; w: [E_bank, Nout, K] bf16 (out features x in
// features, as in checkpoints); seg_indptr: [E_loc+1] i32 DEVICE (non-decreasing, values in
// [0, N]; the kernel clamps them to [0, N] and each segment's end to at least its begin).
// K and Nout: positive multiples of 8; E_loc <= ws.max_experts().
void sm90_grouped_gemm_contiguous(const TensorView& out, const TensorView& in, const TensorView& w,
                                  const TensorView& seg_indptr, int bank_offset,
                                  Sm90GemmWorkspace& ws, cudaStream_t stream);

// Masked: rows [0, count[e]) of in[e] go through bank expert bank_offset + e; rows >= count[e]
// are neither read nor written (count is clamped to [0, M_max] on the device).
// out: [E_loc, M_max, Nout] bf16|f32; in: [E_loc, M_max, K] bf16; w: [E_bank, Nout, K] bf16;
// count: [E_loc] i32 DEVICE.
void sm90_grouped_gemm_masked(const TensorView& out, const TensorView& in, const TensorView& w,
                              const TensorView& count, int bank_offset, Sm90GemmWorkspace& ws,
                              cudaStream_t stream);

// --- FP8 e4m3, block-scaled (DeepSeek-V3) ------------------------------------------------------
// out = (in ⊙ in_scale) · (w ⊙ w_scale)ᵀ where in_scale holds one f32 per row per 128 values of
// K (the per-128 rule of the dispatch and SiLU kernels: value = fp8 · scale) and w_scale one f32
// per 128 x 128 block of each expert's weight (checkpoints' `weight_scale_inv`). Accumulation
// in f32 per 128-wide K block, scaled and added in K order.
// K and Nout: positive multiples of 128.
// Contiguous: out [N, Nout] bf16|f32; in [N, K] f8e4m3; in_scale [N, K/128] f32;
// w [E_bank, Nout, K] f8e4m3; w_scale [E_bank, Nout/128, K/128] f32; seg_indptr [E_loc+1] i32.
void sm90_grouped_gemm_fp8_contiguous(const TensorView& out, const TensorView& in,
                                      const TensorView& in_scale, const TensorView& w,
                                      const TensorView& w_scale, const TensorView& seg_indptr,
                                      int bank_offset, Sm90GemmWorkspace& ws, cudaStream_t stream);
// Masked: out [E_loc, M_max, Nout] bf16|f32; in [E_loc, M_max, K] f8e4m3;
// in_scale [E_loc, M_max, K/128] f32; w, w_scale as above; count [E_loc] i32 DEVICE.
void sm90_grouped_gemm_fp8_masked(const TensorView& out, const TensorView& in,
                                  const TensorView& in_scale, const TensorView& w,
                                  const TensorView& w_scale, const TensorView& count,
                                  int bank_offset, Sm90GemmWorkspace& ws, cudaStream_t stream);

// The m-block height of the tile scheduler for a dtype (rows of one expert handled by one tile):
// 128 for bf16 and FP8. Fixed per dtype (see NOTES).
int sm90_gemm_block_m(DType in_dtype);

// --- per-tile completion signals (single-batch overlap, DESIGN §6) ------------------------------
// Entry e·nb + m of a signal array (nb = ceil(M_max / block_m)) covers rows [m·block_m,
// (m+1)·block_m) of local expert e. The kernel adds 1 with release semantics (gpu scope) after
// each n-block of those rows is stored and visible, so the entry equals `threshold` (the number of
// n-blocks) once all its rows are final; a reader loads it with acquire semantics. Entries of
// m-blocks without rows stay 0 (only blocks with m·block_m < count[e] are waited for).
struct Sm90SignalInfo {
  int block_m;    // rows per m-block (128)
  int threshold;  // ceil(Nout / block_n): block_n 256 for bf16, 128 for FP8
};
Sm90SignalInfo sm90_gemm_signal_info(DType in_dtype, int64_t n_out);

// Masked layout with signals, bf16 output: as sm90_grouped_gemm_masked / _fp8_masked, plus
// signal: [E_loc · ceil(M_max / block_m)] i32 DEVICE, zeroed by the caller before every call
// (e.g. cudaMemsetAsync on `stream`). The output bits are those of the calls without signals.
void sm90_grouped_gemm_masked_signal(const TensorView& out, const TensorView& signal,
                                     const TensorView& in, const TensorView& w,
                                     const TensorView& count, int bank_offset,
                                     Sm90GemmWorkspace& ws, cudaStream_t stream);
void sm90_grouped_gemm_fp8_masked_signal(const TensorView& out, const TensorView& signal,
                                         const TensorView& in, const TensorView& in_scale,
                                         const TensorView& w, const TensorView& w_scale,
                                         const TensorView& count, int bank_offset,
                                         Sm90GemmWorkspace& ws, cudaStream_t stream);

}  // namespace epmoe::cuda
