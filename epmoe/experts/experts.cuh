// CUDA expert computation (DESIGN §3): SiLU-and-mul (bf16 or FP8 per-128 output; contiguous or
// masked layout) and the grouped GEMM on cuBLAS for both layouts. The CPU reference is
// experts_cpu.h.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "epmoe/core/tensor.h"

namespace epmoe::cuda {

// --- SiLU and mul -----------------------------------------------------------------------------
// out[r, i] = bf16(silu(g) · u) with g = in[r, i], u = in[r, I + i], computed in f32 as
// exact_silu_mul. I must be a multiple of 8.
//
// Contiguous layout: in: [M, 2I] bf16|f32; out: [M, I] bf16. Rows r >= *num_rows are neither
// read nor written (num_rows: device pointer, e.g. seg_indptr + E_loc; nullptr = all M rows).
void silu_and_mul(const TensorView& out, const TensorView& in, const int32_t* num_rows,
                  cudaStream_t stream);
// Masked layout: in: [E_loc, M_max, 2I]; out: [E_loc, M_max, I] bf16; count: [E_loc] i32 device;
// rows >= count[e] of expert e are neither read nor written.
void silu_and_mul_masked(const TensorView& out, const TensorView& in, const TensorView& count,
                         cudaStream_t stream);

// The same, quantising the f32 activation to FP8 e4m3 with one scale per 128 values
// (quantize_row_fp8's rule). out: [M, I] e4m3 (masked: [E_loc, M_max, I]); scales: [M, ceil(I/128)]
// f32 (masked: [E_loc, M_max, ceil(I/128)]).
void silu_and_mul_fp8(const TensorView& out, const TensorView& scales, const TensorView& in,
                      const int32_t* num_rows, cudaStream_t stream);
void silu_and_mul_fp8_masked(const TensorView& out, const TensorView& scales, const TensorView& in,
                             const TensorView& count, cudaStream_t stream);

// --- FP8 quantisation of bf16 rows ------------------------------------------------------------
// The input of the FP8 expert GEMMs: each row to e4m3 with one f32 scale per 128 values, by
// fp8.cuh's rule (the one the FP8 dispatch payload follows, so a row quantised here has the codes
// and scales an FP8 dispatch would have carried). K a multiple of 8.
// Contiguous: out [M, K] e4m3; scales [M, ceil(K/128)] f32; in [M, K] bf16; rows >= *num_rows are
// neither read nor written (nullptr = all M rows).
void quantize_rows_fp8(const TensorView& out, const TensorView& scales, const TensorView& in,
                       const int32_t* num_rows, cudaStream_t stream);
// Masked: out [E_loc, M_max, K]; scales [E_loc, M_max, ceil(K/128)]; in [E_loc, M_max, K] bf16;
// count [E_loc] i32 device; rows >= count[e] are neither read nor written.
void quantize_rows_fp8_masked(const TensorView& out, const TensorView& scales, const TensorView& in,
                              const TensorView& count, cudaStream_t stream);

// --- grouped GEMM on cuBLAS -------------------------------------------------------------------
// Per local expert e: out_e = in_e · W[bank_offset + e]ᵀ, f32 accumulation.
enum class GroupedGemmImpl {
  kAuto,       // kGrouped below kAutoPerExpertRows mean rows per non-empty expert, else kPerExpert
  kGrouped,    // one cublasGemmGroupedBatchedEx call (bf16 output)
  kPerExpert,  // one cublasGemmEx per non-empty expert (the baseline; any output dtype)
};
constexpr int64_t kAutoPerExpertRows = 32;

// Holds the cuBLAS handle and the host/device pointer arrays of the grouped calls; one per
// stream of work (not thread-safe). Needs a current CUDA device.
class GroupedGemmRunner {
 public:
  GroupedGemmRunner();
  ~GroupedGemmRunner();
  GroupedGemmRunner(const GroupedGemmRunner&) = delete;
  GroupedGemmRunner& operator=(const GroupedGemmRunner&) = delete;

  cublasHandle_t handle() const { return handle_; }
  // False once cuBLAS refused the grouped call (kGrouped then runs one call per expert).
  bool grouped_supported() const { return grouped_supported_; }

  // Copies n device ints (seg_indptr or count) to pinned host memory and waits for `stream`.
  // NOTES: the one host synchronisation of the cuBLAS path (cuBLAS takes per-group m on the host);
  // a dedicated grouped-GEMM kernel reads the counts on the device instead.
  const int32_t* fetch_counts(const int32_t* device_counts, int n, cudaStream_t stream);

  // Contiguous: rows [seg[e], seg[e+1]) of `in` go through expert bank_offset + e.
  // out: [N, Nout] bf16|f32; in: [N, K] bf16; w: [E_bank, Nout, K] bf16;
  // seg_indptr_host: host [E_loc + 1] (from fetch_counts), seg[E_loc] <= N.
  void contiguous(const TensorView& out, const TensorView& in, const TensorView& w,
                  const int32_t* seg_indptr_host, int num_local_experts, int bank_offset,
                  cudaStream_t stream, GroupedGemmImpl impl = GroupedGemmImpl::kAuto);

  // Masked: rows [0, count[e]) of in[e]; other rows are neither read nor written.
  // out: [E_loc, M_max, Nout] bf16|f32; in: [E_loc, M_max, K] bf16; count_host: host [E_loc].
  void masked(const TensorView& out, const TensorView& in, const TensorView& w,
              const int32_t* count_host, int bank_offset, cudaStream_t stream,
              GroupedGemmImpl impl = GroupedGemmImpl::kAuto);

 private:
  struct Problem {
    int64_t m;
    const void* a;  // rows of `in`
    void* c;        // rows of `out`
    const void* w;  // the expert's weight
  };
  void run(const std::vector<Problem>& problems, int64_t n_out, int64_t k, DType out_dtype,
           cudaStream_t stream, GroupedGemmImpl impl);

  cublasHandle_t handle_ = nullptr;
  int32_t* pinned_ = nullptr;  // fetch_counts buffer
  int pinned_capacity_ = 0;
  void** device_ptrs_ = nullptr;  // [3 * capacity] A, B, C arrays for the grouped call
  int ptr_capacity_ = 0;
  bool grouped_supported_ = true;
};

// Dense GEMM: out [M, N] (bf16|f32) = in [M, K] bf16 · w [N, K]ᵀ bf16 + beta · out.
void dense_gemm(const TensorView& out, const TensorView& in, const TensorView& w, float beta,
                cublasHandle_t handle, cudaStream_t stream);

}  // namespace epmoe::cuda
