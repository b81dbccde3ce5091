// Deterministic grouped GEMM on tensor cores (DESIGN §3, §5 "Determinism"): per local expert e,
// out_e = in_e · W[bank_offset + e]ᵀ with f32 accumulation, for the contiguous and the masked
// layout. The per-expert row counts are read ON THE DEVICE: no host synchronisation, so both
// calls can be captured in a CUDA graph and replayed with new counts.
//
// NOTES: row independence. One kernel configuration (tile shape, K-loop order, MMA instruction)
// serves every M; each output element is one f32 accumulator fed by the same sequence of
// m16n8k16 MMAs over k = 0, 16, 32, ... — no split-K, no atomics, no shape-dependent algorithm.
// A row's result therefore depends only on that row and the weights, never on how many rows
// share the call, where the row sits or what the other rows hold (bitwise). The cuBLAS runner in
// experts.cuh gives no such promise and needs the counts on the host.
#pragma once

#include <cuda_runtime.h>

#include "epmoe/core/tensor.h"

namespace epmoe::cuda {

// Contiguous: rows [seg_indptr[e], seg_indptr[e+1]) of `in` go through bank expert
// bank_offset + e; rows >= seg_indptr[E_loc] are neither read nor written.
// out: [N, Nout] bf16|f32; in: [N, K] bf16; w: [E_bank, Nout, K] bf16 (out features x in
// features, as in checkpoints); seg_indptr: [E_loc+1] i32 DEVICE (non-decreasing, values in
// [0, N]; rows past N are ignored on the device). K and Nout: positive multiples of 8.
// Shapes, dtypes, devices and 16-byte alignment are checked on the host (Error kInvalidArgument
// or kUnsupported naming the tensor); the counts are only ever read by the kernel.
void grouped_gemm_contiguous(const TensorView& out, const TensorView& in, const TensorView& w,
                             const TensorView& seg_indptr, int bank_offset, cudaStream_t stream);

// Masked: rows [0, count[e]) of in[e] go through bank expert bank_offset + e; rows >= count[e]
// are neither read nor written (count is clamped to [0, M_max] on the device).
// out: [E_loc, M_max, Nout] bf16|f32; in: [E_loc, M_max, K] bf16; w: [E_bank, Nout, K] bf16;
// count: [E_loc] i32 DEVICE.
void grouped_gemm_masked(const TensorView& out, const TensorView& in, const TensorView& w,
                         const TensorView& count, int bank_offset, cudaStream_t stream);

}  // namespace epmoe::cuda
