// Expert kernels (SiLU-and-mul) and the cuBLAS grouped GEMM.
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <algorithm>

#include "epmoe/core/exact_math.h"
#include "epmoe/cuda/cuda_check.h"
#include "epmoe/cuda/fp8.cuh"
#include "epmoe/cuda/nvtx.h"
#include "epmoe/cuda/vec8.cuh"
#include "epmoe/experts/experts.cuh"

namespace epmoe::cuda {

namespace {

constexpr int kSiluWarps = 8;

// Which rows exist: contiguous (r < *num_rows) or masked (r % m_max < count[r / m_max]).
struct RowFilter {
  const int32_t* num_rows;  // contiguous; nullptr = every row
  const int32_t* count;     // masked; nullptr = contiguous
  int64_t m_max;
  __device__ __forceinline__ int64_t limit() const {
    return (count == nullptr && num_rows != nullptr) ? int64_t(*num_rows) : INT64_MAX;
  }
  __device__ __forceinline__ bool ok(int64_t r, int64_t lim) const {
    if (count != nullptr) return r % m_max < int64_t(count[r / m_max]);
    return r < lim;
  }
};

// One warp per row (grid-stride over rows); lane handles 8 columns per step.
// FP8: 16 lanes form one block of 128 values; the trip count is uniform so shuffles are safe.
template <typename In, bool kFp8>
__global__ void __launch_bounds__(kSiluWarps * 32)
    silu_and_mul_kernel(void* __restrict__ out, float* __restrict__ scales,
                        const In* __restrict__ in, int64_t rows, int64_t inter, RowFilter filter) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * kSiluWarps;
  const int64_t lim = filter.limit();
  const int64_t vecs = inter / 8, nb = (inter + 127) / 128;
  for (int64_t r = int64_t(blockIdx.x) * kSiluWarps + (threadIdx.x >> 5); r < rows; r += warps) {
    if (!filter.ok(r, lim)) continue;  // warp-uniform
    const In* g_row = in + r * 2 * inter;
    const In* u_row = g_row + inter;
    for (int64_t base = 0; base < vecs; base += 32) {
      const int64_t v = base + lane;
      const bool valid = v < vecs;
      float a[8];
      if (valid) {
        float g[8], u[8];
        ldg8(g, g_row + v * 8);
        ldg8(u, u_row + v * 8);
#pragma unroll
        for (int i = 0; i < 8; ++i) a[i] = exact_silu_mul(g[i], u[i]);
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) a[i] = 0.f;
      }
      if constexpr (kFp8) {
        float scale;
        const uint2 packed = quantize8_fp8_group128(a, &scale);
        if (valid) {
          reinterpret_cast<uint2*>(out)[r * vecs + v] = packed;
          if ((lane & 15) == 0) scales[r * nb + v / 16] = scale;
        }
      } else if (valid) {
        uint4 o;
        __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&o);
#pragma unroll
        for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(a[2 * i], a[2 * i + 1]);
        reinterpret_cast<uint4*>(out)[r * vecs + v] = o;
      }
    }
  }
}

// One warp per row, as silu_and_mul_kernel: 16 lanes hold one group of 128 values.
__global__ void __launch_bounds__(kSiluWarps * 32)
    quantize_rows_kernel(uint8_t* __restrict__ out, float* __restrict__ scales,
                         const __nv_bfloat16* __restrict__ in, int64_t rows, int64_t k,
                         RowFilter filter) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * kSiluWarps;
  const int64_t lim = filter.limit();
  const int64_t vecs = k / 8, nb = (k + 127) / 128;
  for (int64_t r = int64_t(blockIdx.x) * kSiluWarps + (threadIdx.x >> 5); r < rows; r += warps) {
    if (!filter.ok(r, lim)) continue;  // warp-uniform
    for (int64_t base = 0; base < vecs; base += 32) {
      const int64_t v = base + lane;
      const bool valid = v < vecs;
      float a[8];
      if (valid) {
        ldg8(a, in + r * k + v * 8);
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) a[i] = 0.f;
      }
      float scale;
      const uint2 packed = quantize8_fp8_group128(a, &scale);
      if (valid) {
        reinterpret_cast<uint2*>(out)[r * vecs + v] = packed;
        if ((lane & 15) == 0) scales[r * nb + v / 16] = scale;
      }
    }
  }
}

void launch_quantize(const TensorView& out, const TensorView& scales, const TensorView& in,
                     bool masked, RowFilter filter, cudaStream_t stream) {
  const int rank = masked ? 3 : 2;
  EPMOE_CHECK(in.shape.rank == rank && in.dtype == DType::kBF16, kInvalidArgument,
              "quantize_rows_fp8: input must be {} bf16, got {} {}",
              masked ? "[E_loc, M_max, K]" : "[M, K]", in.shape.str(), dtype_name(in.dtype));
  const int64_t k = in.shape[rank - 1];
  EPMOE_CHECK(k % 8 == 0, kUnsupported, "quantize_rows_fp8: K = {} must be a multiple of 8", k);
  out.expect("quantize_rows_fp8 output", DType::kF8E4M3, in.shape);
  Shape ss = in.shape;
  ss.dims[rank - 1] = (k + 127) / 128;
  scales.expect("quantize_rows_fp8 scales", DType::kF32, ss);
  const int64_t rows = masked ? in.shape[0] * in.shape[1] : in.shape[0];
  if (rows == 0) return;
  int sms = 0, dev = 0;
  EPMOE_CUDA_CHECK(cudaGetDevice(&dev));
  EPMOE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  const unsigned grid =
      unsigned(std::min<int64_t>((rows + kSiluWarps - 1) / kSiluWarps, int64_t(sms) * 16));
  quantize_rows_kernel<<<grid, kSiluWarps * 32, 0, stream>>>(
      static_cast<uint8_t*>(out.data), scales.as<float>(),
      static_cast<const __nv_bfloat16*>(in.data), rows, k, filter);
  EPMOE_CUDA_CHECK_LAUNCH("quantize_rows_kernel");
}

// Shapes: in [rows, 2I] (or [E, M_max, 2I]); returns rows and I after checking.
void check_silu(const TensorView& out, const TensorView* scales, const TensorView& in, bool masked,
                bool fp8, int64_t* rows, int64_t* inter) {
  const NvtxRange nvtx("experts.check_silu");
  const int rank = masked ? 3 : 2;
  EPMOE_CHECK(in.shape.rank == rank && in.shape[rank - 1] % 2 == 0, kInvalidArgument,
              "silu_and_mul: input must be {} with an even last dim, got {}",
              masked ? "[E_loc, M_max, 2I]" : "[M, 2I]", in.shape.str());
  EPMOE_CHECK(in.dtype == DType::kBF16 || in.dtype == DType::kF32, kInvalidArgument,
              "silu_and_mul: input must be bf16 or f32, got {}", dtype_name(in.dtype));
  const int64_t I = in.shape[rank - 1] / 2;
  EPMOE_CHECK(I % 8 == 0, kUnsupported, "silu_and_mul: I = {} must be a multiple of 8", I);
  Shape os = in.shape;
  os.dims[rank - 1] = I;
  out.expect("silu output", fp8 ? DType::kF8E4M3 : DType::kBF16, os);
  if (fp8) {
    Shape ss = in.shape;
    ss.dims[rank - 1] = (I + 127) / 128;
    scales->expect("silu scales", DType::kF32, ss);
  }
  *rows = masked ? in.shape[0] * in.shape[1] : in.shape[0];
  *inter = I;
}

void launch_silu(const TensorView& out, float* scales, const TensorView& in, int64_t rows,
                 int64_t inter, RowFilter filter, bool fp8, cudaStream_t stream) {
  const NvtxRange nvtx("experts.launch_silu");
  if (rows == 0) return;
  (void)cudaGetLastError();  // NOTES: drop a stale error of an earlier, already-reported call
  int sms = 0, dev = 0;
  EPMOE_CUDA_CHECK(cudaGetDevice(&dev));
  EPMOE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  const unsigned grid =
      unsigned(std::min<int64_t>((rows + kSiluWarps - 1) / kSiluWarps, int64_t(sms) * 16));
  const unsigned block = kSiluWarps * 32;
  if (in.dtype == DType::kBF16) {
    const auto* p = static_cast<const __nv_bfloat16*>(in.data);
    if (fp8)
      silu_and_mul_kernel<__nv_bfloat16, true>
          <<<grid, block, 0, stream>>>(out.data, scales, p, rows, inter, filter);
    else
      silu_and_mul_kernel<__nv_bfloat16, false>
          <<<grid, block, 0, stream>>>(out.data, scales, p, rows, inter, filter);
  } else {
    const auto* p = static_cast<const float*>(in.data);
    if (fp8)
      silu_and_mul_kernel<float, true>
          <<<grid, block, 0, stream>>>(out.data, scales, p, rows, inter, filter);
    else
      silu_and_mul_kernel<float, false>
          <<<grid, block, 0, stream>>>(out.data, scales, p, rows, inter, filter);
  }
  EPMOE_CUDA_CHECK_LAUNCH("silu_and_mul_kernel");
}

void check_count(const TensorView& count, const TensorView& in) {
  const NvtxRange nvtx("experts.check_count");
  count.expect("count", DType::kI32, {in.shape[0]});
}

cudaDataType_t cuda_type(DType t) { return t == DType::kBF16 ? CUDA_R_16BF : CUDA_R_32F; }

}  // namespace

void silu_and_mul(const TensorView& out, const TensorView& in, const int32_t* num_rows,
                  cudaStream_t stream) {
  const NvtxRange nvtx("experts.silu_and_mul");
  int64_t rows = 0, inter = 0;
  check_silu(out, nullptr, in, false, false, &rows, &inter);
  launch_silu(out, nullptr, in, rows, inter, RowFilter{num_rows, nullptr, 1}, false, stream);
}

void silu_and_mul_masked(const TensorView& out, const TensorView& in, const TensorView& count,
                         cudaStream_t stream) {
  const NvtxRange nvtx("experts.silu_and_mul_masked");
  int64_t rows = 0, inter = 0;
  check_silu(out, nullptr, in, true, false, &rows, &inter);
  check_count(count, in);
  launch_silu(out, nullptr, in, rows, inter,
              RowFilter{nullptr, count.as<int32_t>(), std::max<int64_t>(1, in.shape[1])}, false,
              stream);
}

void silu_and_mul_fp8(const TensorView& out, const TensorView& scales, const TensorView& in,
                      const int32_t* num_rows, cudaStream_t stream) {
  const NvtxRange nvtx("experts.silu_and_mul_fp8");
  int64_t rows = 0, inter = 0;
  check_silu(out, &scales, in, false, true, &rows, &inter);
  launch_silu(out, scales.as<float>(), in, rows, inter, RowFilter{num_rows, nullptr, 1}, true,
              stream);
}

void silu_and_mul_fp8_masked(const TensorView& out, const TensorView& scales, const TensorView& in,
                             const TensorView& count, cudaStream_t stream) {
  const NvtxRange nvtx("experts.silu_and_mul_fp8_masked");
  int64_t rows = 0, inter = 0;
  check_silu(out, &scales, in, true, true, &rows, &inter);
  check_count(count, in);
  launch_silu(out, scales.as<float>(), in, rows, inter,
              RowFilter{nullptr, count.as<int32_t>(), std::max<int64_t>(1, in.shape[1])}, true,
              stream);
}

void quantize_rows_fp8(const TensorView& out, const TensorView& scales, const TensorView& in,
                       const int32_t* num_rows, cudaStream_t stream) {
  const NvtxRange nvtx("experts.quantize_rows_fp8");
  launch_quantize(out, scales, in, false, RowFilter{num_rows, nullptr, 1}, stream);
}

void quantize_rows_fp8_masked(const TensorView& out, const TensorView& scales, const TensorView& in,
                              const TensorView& count, cudaStream_t stream) {
  const NvtxRange nvtx("experts.quantize_rows_fp8_masked");
  if (in.shape.rank == 3) check_count(count, in);
  launch_quantize(out, scales, in, true,
                  RowFilter{nullptr, count.as<int32_t>(),
                            std::max<int64_t>(1, in.shape.rank == 3 ? in.shape[1] : 1)},
                  stream);
}

// --- grouped GEMM ------------------------------------------------------------------------------

GroupedGemmRunner::GroupedGemmRunner() { EPMOE_CUBLAS_CHECK(cublasCreate(&handle_)); }

GroupedGemmRunner::~GroupedGemmRunner() {
  if (handle_) cublasDestroy(handle_);
  if (pinned_) cudaFreeHost(pinned_);
  if (device_ptrs_) cudaFree(device_ptrs_);
}

const int32_t* GroupedGemmRunner::fetch_counts(const int32_t* device_counts, int n,
                                               cudaStream_t stream) {
  if (n > pinned_capacity_) {
    if (pinned_) EPMOE_CUDA_CHECK(cudaFreeHost(pinned_));
    pinned_ = nullptr;
    EPMOE_CUDA_CHECK(cudaMallocHost(&pinned_, size_t(n) * 4));
    pinned_capacity_ = n;
  }
  if (n > 0)
    EPMOE_CUDA_CHECK(
        cudaMemcpyAsync(pinned_, device_counts, size_t(n) * 4, cudaMemcpyDeviceToHost, stream));
  EPMOE_CUDA_CHECK(cudaStreamSynchronize(stream));
  return pinned_;
}

void GroupedGemmRunner::run(const std::vector<Problem>& problems, int64_t n_out, int64_t k,
                            DType out_dtype, cudaStream_t stream, GroupedGemmImpl impl) {
  if (problems.empty()) return;
  EPMOE_CUBLAS_CHECK(cublasSetStream(handle_, stream));
  const float alpha = 1.f, beta = 0.f;
  const cudaDataType_t ct = cuda_type(out_dtype);
  // Row-major out_e[m, n_out] = in_e[m, k] · W_e[n_out, k]ᵀ: column-major (W_e)ᵀ(op T) · in_eᵀ.
  if (impl == GroupedGemmImpl::kAuto) {
    // Measured on H100 (cuBLAS 13.0): the grouped API wins at decode (few rows per expert),
    // one call per expert wins clearly from ~100 rows per expert (prefill).
    int64_t rows = 0;
    for (const Problem& p : problems) rows += p.m;
    impl = rows / int64_t(problems.size()) >= kAutoPerExpertRows ? GroupedGemmImpl::kPerExpert
                                                                 : GroupedGemmImpl::kGrouped;
  }
  if (impl == GroupedGemmImpl::kPerExpert || out_dtype != DType::kBF16 || !grouped_supported_) {
    for (const Problem& p : problems)
      EPMOE_CUBLAS_CHECK(cublasGemmEx(handle_, CUBLAS_OP_T, CUBLAS_OP_N, int(n_out), int(p.m),
                                      int(k), &alpha, p.w, CUDA_R_16BF, int(k), p.a, CUDA_R_16BF,
                                      int(k), &beta, p.c, ct, int(n_out), CUBLAS_COMPUTE_32F,
                                      CUBLAS_GEMM_DEFAULT));
    return;
  }
  const int g = int(problems.size());
  if (g > ptr_capacity_) {
    if (device_ptrs_) EPMOE_CUDA_CHECK(cudaFree(device_ptrs_));
    device_ptrs_ = nullptr;
    EPMOE_CUDA_CHECK(cudaMalloc(&device_ptrs_, size_t(3) * g * sizeof(void*)));
    ptr_capacity_ = g;
  }
  std::vector<const void*> ptrs(size_t(3) * g);
  std::vector<int> m(g), n(g, int(n_out)), kk(g, int(k)), lda(g, int(k)), ldb(g, int(k)),
      ldc(g, int(n_out)), size(g, 1);
  std::vector<float> alphas(g, 1.f), betas(g, 0.f);
  std::vector<cublasOperation_t> ta(g, CUBLAS_OP_T), tb(g, CUBLAS_OP_N);
  for (int i = 0; i < g; ++i) {
    m[i] = int(problems[i].m);
    ptrs[i] = problems[i].w;
    ptrs[g + i] = problems[i].a;
    ptrs[2 * g + i] = problems[i].c;
  }
  // NOTES: a pageable source: the copy has consumed `ptrs` when cudaMemcpyAsync returns; the
  // device array is reused in stream order by the next call.
  EPMOE_CUDA_CHECK(cudaMemcpyAsync(device_ptrs_, ptrs.data(), ptrs.size() * sizeof(void*),
                                   cudaMemcpyHostToDevice, stream));
  const void* const* a = const_cast<const void* const*>(device_ptrs_);
  void* const* c = device_ptrs_ + 2 * g;
  const cublasStatus_t st = cublasGemmGroupedBatchedEx(
      handle_, ta.data(), tb.data(), n.data(), m.data(), kk.data(), alphas.data(), a, CUDA_R_16BF,
      lda.data(), a + g, CUDA_R_16BF, ldb.data(), betas.data(), c, ct, ldc.data(), g, size.data(),
      CUBLAS_COMPUTE_32F);
  if (st == CUBLAS_STATUS_NOT_SUPPORTED || st == CUBLAS_STATUS_ARCH_MISMATCH) {
    // NOTES: this cuBLAS lacks the bf16 grouped path: fall back to one call per expert, once
    // and for all (grouped_supported() tells the benchmark).
    grouped_supported_ = false;
    run(problems, n_out, k, out_dtype, stream, GroupedGemmImpl::kPerExpert);
    return;
  }
  EPMOE_CUBLAS_CHECK(st);
}

namespace {
void check_bank(const TensorView& w, int64_t k, const char* what) {
  const NvtxRange nvtx("experts.check_bank");
  EPMOE_CHECK(w.shape.rank == 3 && w.dtype == DType::kBF16 && w.shape[2] == k, kInvalidArgument,
              "grouped GEMM: weight bank {} {} must be [E_bank, N, K={}] bf16", what, w.shape.str(),
              k);
}
}  // namespace

void GroupedGemmRunner::contiguous(const TensorView& out, const TensorView& in, const TensorView& w,
                                   const int32_t* seg, int e_loc, int bank_offset,
                                   cudaStream_t stream, GroupedGemmImpl impl) {
  EPMOE_CHECK(in.shape.rank == 2 && in.dtype == DType::kBF16, kInvalidArgument,
              "grouped GEMM: input must be [N, K] bf16, got {} {}", in.shape.str(),
              dtype_name(in.dtype));
  const int64_t N = in.shape[0], K = in.shape[1];
  check_bank(w, K, "w");
  const int64_t n_out = w.shape[1];
  EPMOE_CHECK(
      out.shape == Shape({N, n_out}) && (out.dtype == DType::kBF16 || out.dtype == DType::kF32),
      kInvalidArgument, "grouped GEMM: output must be [{}, {}] bf16|f32, got {} {}", N, n_out,
      out.shape.str(), dtype_name(out.dtype));
  EPMOE_CHECK(bank_offset >= 0 && bank_offset + e_loc <= w.shape[0], kInvalidArgument,
              "grouped GEMM: local experts [{}, {}) exceed the bank of {}", bank_offset,
              bank_offset + e_loc, w.shape[0]);
  EPMOE_CHECK(seg[0] == 0 && seg[e_loc] <= N, kInvalidArgument,
              "grouped GEMM: seg_indptr spans [{}, {}) but the buffer has {} rows", seg[0],
              seg[e_loc], N);
  const size_t ob = dtype_size(out.dtype), wb = size_t(n_out) * K * 2;
  std::vector<Problem> problems;
  for (int e = 0; e < e_loc; ++e) {
    const int64_t m = seg[e + 1] - seg[e];
    EPMOE_CHECK(m >= 0, kInvalidArgument, "grouped GEMM: seg_indptr decreases at expert {}", e);
    if (m == 0) continue;
    problems.push_back({m, static_cast<const char*>(in.data) + size_t(seg[e]) * K * 2,
                        static_cast<char*>(out.data) + size_t(seg[e]) * n_out * ob,
                        static_cast<const char*>(w.data) + size_t(bank_offset + e) * wb});
  }
  run(problems, n_out, K, out.dtype, stream, impl);
}

void GroupedGemmRunner::masked(const TensorView& out, const TensorView& in, const TensorView& w,
                               const int32_t* count, int bank_offset, cudaStream_t stream,
                               GroupedGemmImpl impl) {
  EPMOE_CHECK(in.shape.rank == 3 && in.dtype == DType::kBF16, kInvalidArgument,
              "masked grouped GEMM: input must be [E_loc, M_max, K] bf16, got {} {}",
              in.shape.str(), dtype_name(in.dtype));
  const int64_t e_loc = in.shape[0], m_max = in.shape[1], K = in.shape[2];
  check_bank(w, K, "w");
  const int64_t n_out = w.shape[1];
  EPMOE_CHECK(out.shape == Shape({e_loc, m_max, n_out}) &&
                  (out.dtype == DType::kBF16 || out.dtype == DType::kF32),
              kInvalidArgument, "masked grouped GEMM: output must be [{}, {}, {}], got {} {}",
              e_loc, m_max, n_out, out.shape.str(), dtype_name(out.dtype));
  EPMOE_CHECK(bank_offset >= 0 && bank_offset + e_loc <= w.shape[0], kInvalidArgument,
              "masked grouped GEMM: local experts [{}, {}) exceed the bank of {}", bank_offset,
              bank_offset + e_loc, w.shape[0]);
  const size_t ob = dtype_size(out.dtype), wb = size_t(n_out) * K * 2;
  std::vector<Problem> problems;
  for (int64_t e = 0; e < e_loc; ++e) {
    EPMOE_CHECK(count[e] >= 0 && count[e] <= m_max, kInvalidArgument,
                "masked grouped GEMM: count[{}] = {} is outside [0, {}]", e, count[e], m_max);
    if (count[e] == 0) continue;
    problems.push_back({count[e], static_cast<const char*>(in.data) + size_t(e * m_max) * K * 2,
                        static_cast<char*>(out.data) + size_t(e * m_max) * n_out * ob,
                        static_cast<const char*>(w.data) + size_t(bank_offset + e) * wb});
  }
  run(problems, n_out, K, out.dtype, stream, impl);
}

void dense_gemm(const TensorView& out, const TensorView& in, const TensorView& w, float beta,
                cublasHandle_t handle, cudaStream_t stream) {
  const NvtxRange nvtx("experts.dense_gemm");
  EPMOE_CHECK(in.shape.rank == 2 && w.shape.rank == 2 && in.shape[1] == w.shape[1] &&
                  in.dtype == DType::kBF16 && w.dtype == DType::kBF16,
              kInvalidArgument, "dense GEMM: in {} {} and w {} {} must be bf16 [M,K], [N,K]",
              in.shape.str(), dtype_name(in.dtype), w.shape.str(), dtype_name(w.dtype));
  const int64_t M = in.shape[0], K = in.shape[1], N = w.shape[0];
  EPMOE_CHECK(out.shape == Shape({M, N}) && (out.dtype == DType::kBF16 || out.dtype == DType::kF32),
              kInvalidArgument, "dense GEMM: output must be [{}, {}] bf16|f32, got {} {}", M, N,
              out.shape.str(), dtype_name(out.dtype));
  if (M == 0) return;
  const float alpha = 1.f;
  EPMOE_CUBLAS_CHECK(cublasSetStream(handle, stream));
  EPMOE_CUBLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, int(N), int(M), int(K), &alpha,
                                  w.data, CUDA_R_16BF, int(K), in.data, CUDA_R_16BF, int(K), &beta,
                                  out.data, cuda_type(out.dtype), int(N), CUBLAS_COMPUTE_32F,
                                  CUBLAS_GEMM_DEFAULT));
}

}  // namespace epmoe::cuda
