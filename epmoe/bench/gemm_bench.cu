#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <random>
#include <string>

#include "epmoe/bench/bench_stream.cuh"
#include "epmoe/bench/gemm_bench.cuh"
#include "epmoe/cuda/cuda_check.h"
#include "epmoe/cuda/device.h"
#include "epmoe/experts/experts.cuh"
#include "epmoe/experts/grouped_gemm.cuh"
#include "epmoe/experts/sm90/sm90_gemm_tune.h"
#include "epmoe/experts/sm90/sm90_grouped_gemm.cuh"

namespace epmoe::cuda {

namespace {

constexpr int64_t kHidden = 7168, kInter = 2048, kExperts = 256, kTopK = 8;
constexpr int64_t kFlushBytes = int64_t(256) << 20;  // written before every timed run
constexpr int64_t kDense = 8192;                     // the dense ceilings: kDense³ GEMMs
constexpr int64_t kScaleBlock = 128;

// Rows per local expert [0, e_loc) when `tokens` tokens each pick kTopK distinct experts of
// kExperts uniformly at random.
std::vector<int32_t> route_counts(int64_t tokens, int e_loc, std::mt19937_64& rng) {
  std::vector<int32_t> counts(size_t(e_loc), 0);
  std::vector<int> ids(kExperts);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int i = 0; i < kExperts; ++i) ids[size_t(i)] = i;
    for (int j = 0; j < kTopK; ++j) {  // partial Fisher-Yates: kTopK distinct experts
      std::uniform_int_distribution<int> d(j, int(kExperts) - 1);
      std::swap(ids[size_t(j)], ids[size_t(d(rng))]);
      if (ids[size_t(j)] < e_loc) ++counts[size_t(ids[size_t(j)])];
    }
  }
  return counts;
}

// Relative L2 between the first `rows` rows of two bf16 [*, cols] device buffers (a sanity
// check that the timed kernels compute the same thing).
double sample_rel_l2(const void* a, const void* b, int64_t rows, int64_t cols) {
  if (rows <= 0) return 0.0;
  const Shape s{rows, cols};
  Tensor ha(DType::kBF16, s), hb(DType::kBF16, s);
  EPMOE_CUDA_CHECK(cudaMemcpy(ha.view().data, a, ha.nbytes(), cudaMemcpyDeviceToHost));
  EPMOE_CUDA_CHECK(cudaMemcpy(hb.view().data, b, hb.nbytes(), cudaMemcpyDeviceToHost));
  double num = 0, den = 0;
  for (int64_t i = 0; i < rows * cols; ++i) {
    const double x = bf16_to_f32(ha.as<bf16>()[i]), y = bf16_to_f32(hb.as<bf16>()[i]);
    num += (x - y) * (x - y);
    den += y * y;
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

struct Gemm {
  const char* name;
  int64_t n_out, k;
};

// Bitwise differences between two bf16 buffers over their valid rows: masked layout
// (a, b: [groups, rows, n_out], count: [groups] i32 DEVICE, rows >= count[g] skipped) or, with
// count == nullptr, every row of [rows, n_out] (groups = 1).
__global__ void count_diff_kernel(const uint16_t* a, const uint16_t* b, int64_t rows, int64_t n_out,
                                  int64_t total, const int32_t* count, unsigned long long* diff) {
  unsigned long long local = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    if (count != nullptr) {
      const int64_t row = i / n_out;
      if (row % rows >= count[row / rows]) continue;
    }
    local += a[i] != b[i];
  }
  if (local) atomicAdd(diff, local);
}

int64_t count_diff(const void* a, const void* b, int64_t groups, int64_t rows, int64_t n_out,
                   const int32_t* count, cudaStream_t stream) {
  const int64_t total = groups * rows * n_out;
  if (total == 0) return 0;
  DeviceTensor d(DType::kI64, {1});
  EPMOE_CUDA_CHECK(cudaMemsetAsync(d.view().data, 0, d.nbytes(), stream));
  count_diff_kernel<<<1024, 256, 0, stream>>>(
      static_cast<const uint16_t*>(a), static_cast<const uint16_t*>(b), rows, n_out, total, count,
      static_cast<unsigned long long*>(d.view().data));
  EPMOE_CUDA_CHECK_LAUNCH("count_diff_kernel");
  EPMOE_CUDA_CHECK(cudaStreamSynchronize(stream));
  return d.to_host().as<int64_t>()[0];
}

// Entries of a signal array [E_loc · nb] left by the last signalled call that differ from the
// contract (sm90_grouped_gemm.cuh): `threshold` for m-blocks holding rows, 0 for the others.
int64_t bad_signal_entries(const DeviceTensor& signal, const std::vector<int32_t>& count,
                           int64_t nb, const Sm90SignalInfo& info) {
  const Tensor h = signal.to_host();
  int64_t bad = 0;
  for (size_t e = 0; e < count.size(); ++e)
    for (int64_t m = 0; m < nb; ++m) {
      const int32_t want = m * info.block_m < count[e] ? info.threshold : 0;
      bad += h.as<int32_t>()[int64_t(e) * nb + m] != want;
    }
  return bad;
}

__device__ __forceinline__ uint64_t hash64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
__device__ __forceinline__ float unit(uint64_t seed, int64_t i) {  // uniform in [-1, 1)
  return float(hash64(seed + uint64_t(i) * 0x9e3779b97f4a7c15ull) >> 40) * 0x1p-23f - 1.f;
}
// FP8 e4m3 values uniform in [-2, 2) (never NaN).
__global__ void fill_fp8_kernel(__nv_fp8_e4m3* p, int64_t n, uint64_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    p[i] = __nv_fp8_e4m3(2.f * unit(seed, i));
}
// Block scales in [lo, 2·lo).
__global__ void fill_scale_kernel(float* p, int64_t n, float lo, uint64_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    p[i] = lo * (1.5f + 0.5f * unit(seed, i));
}

DeviceTensor random_fp8(const Shape& s, std::mt19937_64& rng) {
  DeviceTensor t(DType::kF8E4M3, s);
  if (t.numel() > 0) {
    fill_fp8_kernel<<<1024, 256>>>(static_cast<__nv_fp8_e4m3*>(t.view().data), t.numel(), rng());
    EPMOE_CUDA_CHECK_LAUNCH("fill_fp8_kernel");
    EPMOE_CUDA_CHECK(cudaDeviceSynchronize());
  }
  return t;
}
DeviceTensor random_scales(const Shape& s, float lo, std::mt19937_64& rng) {
  DeviceTensor t(DType::kF32, s);
  if (t.numel() > 0) {
    fill_scale_kernel<<<256, 256>>>(t.as<float>(), t.numel(), lo, rng());
    EPMOE_CUDA_CHECK_LAUNCH("fill_scale_kernel");
    EPMOE_CUDA_CHECK(cudaDeviceSynchronize());
  }
  return t;
}

// Same-run ceilings: dense cuBLAS bf16 and cuBLASLt FP8 (e4m3 x e4m3 -> bf16, f32 accumulation)
// GEMMs of kDense³, and device-to-device copy bandwidth (read + write bytes).
struct Ceilings {
  double dense_bf16_tflops = 0, dense_fp8_tflops = 0, copy_gbps = 0;
};

Ceilings measure_ceilings(BenchStream& bs, cublasHandle_t handle,
                          const std::function<double(const std::function<void()>&)>& median_us,
                          std::mt19937_64& rng) {
  Ceilings c;
  const double flops = 2.0 * double(kDense) * double(kDense) * double(kDense);
  const cudaStream_t stream = bs.stream();
  {
    DeviceTensor a = bs.random(DType::kBF16, {kDense, kDense}),
                 b = bs.random(DType::kBF16, {kDense, kDense}), d(DType::kBF16, {kDense, kDense});
    c.dense_bf16_tflops =
        flops /
        (median_us([&] { dense_gemm(d.view(), a.view(), b.view(), 0.f, handle, stream); }) * 1e6);
  }
  {
    // D [M, N] row-major = column-major N x M; A = the weight [N, K] (op T), B = in [M, K].
    DeviceTensor a = random_fp8({kDense, kDense}, rng), b = random_fp8({kDense, kDense}, rng),
                 d(DType::kBF16, {kDense, kDense}), ws(DType::kI32, {int64_t(32) << 18});
    cublasLtHandle_t lt = nullptr;
    EPMOE_CUBLAS_CHECK(cublasLtCreate(&lt));
    cublasLtMatmulDesc_t op = nullptr;
    cublasLtMatrixLayout_t la = nullptr, lb = nullptr, ld = nullptr;
    cublasLtMatmulPreference_t pref = nullptr;
    EPMOE_CUBLAS_CHECK(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    EPMOE_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
    EPMOE_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
    EPMOE_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&la, CUDA_R_8F_E4M3, kDense, kDense, kDense));
    EPMOE_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&lb, CUDA_R_8F_E4M3, kDense, kDense, kDense));
    EPMOE_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&ld, CUDA_R_16BF, kDense, kDense, kDense));
    EPMOE_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    const size_t ws_bytes = ws.nbytes();
    EPMOE_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
        pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_bytes, sizeof(ws_bytes)));
    cublasLtMatmulHeuristicResult_t heur{};
    int found = 0;
    EPMOE_CUBLAS_CHECK(
        cublasLtMatmulAlgoGetHeuristic(lt, op, la, lb, ld, ld, pref, 1, &heur, &found));
    if (found > 0) {
      const float alpha = 1.f, beta = 0.f;
      const double us = median_us([&] {
        EPMOE_CUBLAS_CHECK(cublasLtMatmul(lt, op, &alpha, a.view().data, la, b.view().data, lb,
                                          &beta, d.view().data, ld, d.view().data, ld, &heur.algo,
                                          ws.view().data, ws_bytes, stream));
      });
      c.dense_fp8_tflops = flops / (us * 1e6);
    }
    cublasLtMatmulPreferenceDestroy(pref);
    cublasLtMatrixLayoutDestroy(ld);
    cublasLtMatrixLayoutDestroy(lb);
    cublasLtMatrixLayoutDestroy(la);
    cublasLtMatmulDescDestroy(op);
    cublasLtDestroy(lt);
  }
  {
    const int64_t bytes = int64_t(1) << 30;
    DeviceTensor src(DType::kI32, {bytes / 4}), dst(DType::kI32, {bytes / 4});
    src.fill_bytes(1);
    const double us = median_us([&] {
      EPMOE_CUDA_CHECK(cudaMemcpyAsync(dst.view().data, src.view().data, size_t(bytes),
                                       cudaMemcpyDeviceToDevice, stream));
    });
    c.copy_gbps = 2.0 * double(bytes) / (us * 1e3);
  }
  return c;
}

struct Row {
  std::string gemm, layout;
  int e_loc = 0;
  int64_t tokens = 0, rows = 0, n_out = 0, k = 0;
  double det_us = 0, sm90_bf16_us = 0, sm90_fp8_us = 0, grouped_us = 0;
  double bytes_bf16 = 0, bytes_fp8 = 0;  // weights of experts with rows + activations + output
  double check = 0;
  // Masked rows: the same calls with per-tile completion signals, their output elements that
  // differ bitwise from the plain calls' (valid rows) and the wrong final signal entries (both
  // dtypes); -1 = not measured.
  double sig_bf16_us = 0, sig_fp8_us = 0;
  int64_t sig_bf16_diff = -1, sig_fp8_diff = -1, sig_bad_entries = -1;
  // Contiguous rows: the bench-only FP8 candidates (sm90_gemm_tune.h) on sm90_fp8_us's inputs.
  struct Variant {
    std::string name, error;  // error: why the candidate did not run (us = 0)
    double us = 0;
    int64_t diff = -1;  // output elements differing bitwise from the production FP8 kernel's
    double rel_l2 = 0;  // vs the production FP8 output, sampled rows
  };
  std::vector<Variant> variants;
  double flops() const { return 2.0 * double(rows) * double(n_out) * double(k); }
  double tflops(double us) const { return us > 0 ? flops() / (us * 1e6) : 0.0; }
};

nlohmann::json row_json(const Row& r, const Ceilings& c) {
  const double rb = r.bytes_bf16 / (c.copy_gbps * 1e3), rf = r.bytes_fp8 / (c.copy_gbps * 1e3);
  auto pct = [](double part, double whole) {
    return whole > 0 && part > 0 ? 100.0 * part / whole : 0.0;
  };
  return {{"gemm", r.gemm},
          {"layout", r.layout},
          {"e_loc", r.e_loc},
          {"tokens", r.tokens},
          {"rows", r.rows},
          {"n_out", r.n_out},
          {"k", r.k},
          {"det_us", r.det_us},
          {"det_tflops", r.tflops(r.det_us)},
          {"sm90_bf16_us", r.sm90_bf16_us},
          {"sm90_bf16_tflops", r.tflops(r.sm90_bf16_us)},
          {"sm90_fp8_us", r.sm90_fp8_us},
          {"sm90_fp8_tflops", r.tflops(r.sm90_fp8_us)},
          {"cublas_grouped_us", r.grouped_us},
          {"cublas_grouped_tflops", r.tflops(r.grouped_us)},
          {"sm90_bf16_pct_dense", pct(r.tflops(r.sm90_bf16_us), c.dense_bf16_tflops)},
          {"sm90_fp8_pct_dense", pct(r.tflops(r.sm90_fp8_us), c.dense_fp8_tflops)},
          {"roofline_bf16_us", rb},
          {"roofline_fp8_us", rf},
          {"sm90_bf16_pct_roofline", r.sm90_bf16_us > 0 ? 100.0 * rb / r.sm90_bf16_us : 0.0},
          {"sm90_fp8_pct_roofline", r.sm90_fp8_us > 0 ? 100.0 * rf / r.sm90_fp8_us : 0.0},
          {"fp8_speedup_vs_bf16", r.sm90_fp8_us > 0 ? r.sm90_bf16_us / r.sm90_fp8_us : 0.0},
          {"check_rel_l2", r.check}};
}

double overhead_pct(double us, double base_us) {
  return us > 0 && base_us > 0 ? 100.0 * (us / base_us - 1.0) : 0.0;
}

// The signal and candidate fields of a row (only those it measured).
void add_extra_json(nlohmann::json& j, const Row& r) {
  if (r.sig_bf16_diff >= 0) {
    j["sig_bf16_us"] = r.sig_bf16_us;
    j["sig_fp8_us"] = r.sig_fp8_us;
    j["sig_bf16_overhead_pct"] = overhead_pct(r.sig_bf16_us, r.sm90_bf16_us);
    j["sig_fp8_overhead_pct"] = overhead_pct(r.sig_fp8_us, r.sm90_fp8_us);
    j["sig_bf16_diff_elems"] = r.sig_bf16_diff;
    j["sig_fp8_diff_elems"] = r.sig_fp8_diff;
    j["sig_bad_entries"] = r.sig_bad_entries;
  }
  if (r.variants.empty()) return;
  nlohmann::json vs = nlohmann::json::array();
  for (const Row::Variant& v : r.variants)
    vs.push_back({{"name", v.name},
                  {"us", v.us},
                  {"tflops", r.tflops(v.us)},
                  {"speedup_vs_fp8", v.us > 0 ? r.sm90_fp8_us / v.us : 0.0},
                  {"speedup_vs_bf16", v.us > 0 ? r.sm90_bf16_us / v.us : 0.0},
                  {"diff_elems", v.diff},
                  {"bitwise_equal", v.diff == 0},
                  {"rel_l2_vs_fp8", v.rel_l2},
                  {"error", v.error}});
  j["fp8_variants"] = vs;
}

}  // namespace

nlohmann::json run_grouped_gemm_bench(const std::vector<int64_t>& tokens, int iters, int warmup) {
  EPMOE_CHECK(iters >= 1 && warmup >= 0, kInvalidArgument,
              "grouped GEMM bench: iters must be >= 1 and warmup >= 0, got {} / {}", iters, warmup);
  for (int64_t t : tokens)
    EPMOE_CHECK(t >= 1, kInvalidArgument, "grouped GEMM bench: token counts must be >= 1, got {}",
                t);
  require_device();
  int dev = 0, major = 0;
  EPMOE_CUDA_CHECK(cudaGetDevice(&dev));
  EPMOE_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  const bool sm90 = sm90_gemm_available() && major == 9;
  BenchStream bs(kFlushBytes);
  const cudaStream_t stream = bs.stream();
  auto median_us = [&](const std::function<void()>& fn) { return bs.median_us(fn, iters, warmup); };
  GroupedGemmRunner cublas;
  std::random_device rd;
  std::mt19937_64 rng((uint64_t(rd()) << 32) | rd());
  const Ceilings ceil = measure_ceilings(bs, cublas.handle(), median_us, rng);
  Sm90GemmWorkspace ws;
  if (sm90) ws = Sm90GemmWorkspace(int(kExperts));
  std::vector<Row> rows;

  for (const int e_loc : {256, 32, 8}) {
    const int64_t ranks = kExperts / e_loc;
    // Routing per T, shared by both GEMMs.
    std::vector<std::vector<int32_t>> counts;
    for (int64_t T : tokens) counts.push_back(route_counts(ranks * T, e_loc, rng));
    for (const Gemm g : {Gemm{"gate_up", 2 * kInter, kHidden}, Gemm{"down", kHidden, kInter}}) {
      DeviceTensor w = bs.random(DType::kBF16, {e_loc, g.n_out, g.k}, 0.05f);
      DeviceTensor w8, w8_scale;
      if (sm90) {
        w8 = random_fp8({e_loc, g.n_out, g.k}, rng);
        w8_scale = random_scales({e_loc, g.n_out / kScaleBlock, g.k / kScaleBlock}, 0.01f, rng);
      }
      for (size_t ti = 0; ti < tokens.size(); ++ti) {
        const int64_t T = tokens[ti];
        const std::vector<int32_t>& cnt = counts[ti];
        std::vector<int32_t> seg(size_t(e_loc) + 1, 0);
        int64_t used_experts = 0;
        for (int e = 0; e < e_loc; ++e) {
          seg[size_t(e) + 1] = seg[size_t(e)] + cnt[size_t(e)];
          used_experts += cnt[size_t(e)] > 0;
        }
        const int64_t N = seg.back();
        const double wel = double(g.n_out) * double(g.k) * double(used_experts);
        const double kb = double(g.k / kScaleBlock);
        Row r{g.name, "contiguous", e_loc, T, N, g.n_out, g.k};
        r.bytes_bf16 = 2.0 * wel + 2.0 * double(N) * double(g.k + g.n_out);
        r.bytes_fp8 = wel * (1.0 + 4.0 / (kScaleBlock * kScaleBlock)) +
                      double(N) * (double(g.k) + 4.0 * kb + 2.0 * double(g.n_out));
        Tensor seg_host(DType::kI32, {e_loc + 1});
        std::copy(seg.begin(), seg.end(), seg_host.as<int32_t>());
        DeviceTensor dseg = DeviceTensor::from_host(seg_host);
        DeviceTensor in = bs.random(DType::kBF16, {N, g.k}, 1.f);
        DeviceTensor out(DType::kBF16, {N, g.n_out}), out_ref(DType::kBF16, {N, g.n_out});
        r.det_us = median_us([&] {
          grouped_gemm_contiguous(out_ref.view(), in.view(), w.view(), dseg.view(), 0, stream);
        });
        // NOTES: the cuBLAS run gets the counts already on the host: the host synchronisation
        // it needs in a real layer (GroupedGemmRunner::fetch_counts) is not timed.
        r.grouped_us = median_us([&] {
          cublas.contiguous(out.view(), in.view(), w.view(), seg.data(), e_loc, 0, stream,
                            GroupedGemmImpl::kGrouped);
        });
        if (sm90) {
          r.sm90_bf16_us = median_us([&] {
            sm90_grouped_gemm_contiguous(out.view(), in.view(), w.view(), dseg.view(), 0, ws,
                                         stream);
          });
          DeviceTensor in8 = random_fp8({N, g.k}, rng);
          DeviceTensor in8_scale = random_scales({N, g.k / kScaleBlock}, 0.01f, rng);
          DeviceTensor out8(DType::kBF16, {N, g.n_out});
          r.sm90_fp8_us = median_us([&] {
            sm90_grouped_gemm_fp8_contiguous(out8.view(), in8.view(), in8_scale.view(), w8.view(),
                                             w8_scale.view(), dseg.view(), 0, ws, stream);
          });
          // The FP8 candidates on the same inputs, each checked against the production output
          // (poisoned first, so unwritten elements count as differences).
          DeviceTensor outv;
          if (sm90_fp8_tune_variants() > 0) outv = DeviceTensor(DType::kBF16, {N, g.n_out});
          for (int v = 0; v < sm90_fp8_tune_variants(); ++v) {
            Row::Variant rv;
            rv.name = sm90_fp8_tune_name(v);
            try {
              EPMOE_CUDA_CHECK(cudaMemsetAsync(outv.view().data, 0xff, outv.nbytes(), stream));
              rv.us = median_us([&] {
                sm90_fp8_contiguous_variant(v, outv.view(), in8.view(), in8_scale.view(), w8.view(),
                                            w8_scale.view(), dseg.view(), 0, ws, stream);
              });
              rv.diff =
                  count_diff(outv.view().data, out8.view().data, 1, N, g.n_out, nullptr, stream);
              rv.rel_l2 = sample_rel_l2(outv.view().data, out8.view().data,
                                        std::min<int64_t>(N, 512), g.n_out);
            } catch (const Error& e) {  // a candidate CUTLASS refuses is a result, not the end
              rv.error = e.what();
              rv.us = 0;
            }
            r.variants.push_back(rv);
          }
        }
        EPMOE_CUDA_CHECK(cudaStreamSynchronize(stream));
        // sm90 bf16 (or cuBLAS without it) against the deterministic kernel.
        r.check =
            sample_rel_l2(out.view().data, out_ref.view().data, std::min<int64_t>(N, 512), g.n_out);
        rows.push_back(r);

        if (T > 512) continue;
        // Masked (low-latency) layout: [E_loc, M_max, K] with M_max = R·T.
        const int64_t m_max = ranks * T;
        DeviceTensor m_in = bs.random(DType::kBF16, {e_loc, m_max, g.k}, 1.f);
        DeviceTensor mout(DType::kBF16, {e_loc, m_max, g.n_out}),
            mout_ref(DType::kBF16, {e_loc, m_max, g.n_out});
        DeviceTensor dcount = DeviceTensor::from_host([&] {
          Tensor c(DType::kI32, {e_loc});
          std::copy(cnt.begin(), cnt.end(), c.as<int32_t>());
          return c;
        }());
        Row m = r;
        m.layout = "masked";
        m.variants.clear();  // the candidates run on the contiguous layout only
        m.det_us = median_us([&] {
          grouped_gemm_masked(mout_ref.view(), m_in.view(), w.view(), dcount.view(), 0, stream);
        });
        m.grouped_us = median_us([&] {
          cublas.masked(mout.view(), m_in.view(), w.view(), cnt.data(), 0, stream,
                        GroupedGemmImpl::kGrouped);
        });
        if (sm90) {
          m.sm90_bf16_us = median_us([&] {
            sm90_grouped_gemm_masked(mout.view(), m_in.view(), w.view(), dcount.view(), 0, ws,
                                     stream);
          });
          DeviceTensor m_in8 = random_fp8({e_loc, m_max, g.k}, rng);
          DeviceTensor m_in8_scale = random_scales({e_loc, m_max, g.k / kScaleBlock}, 0.01f, rng);
          DeviceTensor mout8(DType::kBF16, {e_loc, m_max, g.n_out});
          m.sm90_fp8_us = median_us([&] {
            sm90_grouped_gemm_fp8_masked(mout8.view(), m_in8.view(), m_in8_scale.view(), w8.view(),
                                         w8_scale.view(), dcount.view(), 0, ws, stream);
          });
          // The same calls with per-tile completion signals. NOTES: the memset is timed: a caller
          // must zero the signals before every call, so it is part of what signals cost.
          const int64_t nb =
              (m_max + sm90_gemm_block_m(DType::kBF16) - 1) / sm90_gemm_block_m(DType::kBF16);
          DeviceTensor sig(DType::kI32, {e_loc * nb}), mout_sig(DType::kBF16, mout.shape());
          const int32_t* dcnt = dcount.as<int32_t>();
          EPMOE_CUDA_CHECK(cudaMemsetAsync(mout_sig.view().data, 0xff, mout_sig.nbytes(), stream));
          m.sig_bf16_us = median_us([&] {
            EPMOE_CUDA_CHECK(cudaMemsetAsync(sig.view().data, 0, sig.nbytes(), stream));
            sm90_grouped_gemm_masked_signal(mout_sig.view(), sig.view(), m_in.view(), w.view(),
                                            dcount.view(), 0, ws, stream);
          });
          m.sig_bf16_diff = count_diff(mout_sig.view().data, mout.view().data, e_loc, m_max,
                                       g.n_out, dcnt, stream);
          m.sig_bad_entries =
              bad_signal_entries(sig, cnt, nb, sm90_gemm_signal_info(DType::kBF16, g.n_out));
          EPMOE_CUDA_CHECK(cudaMemsetAsync(mout_sig.view().data, 0xff, mout_sig.nbytes(), stream));
          m.sig_fp8_us = median_us([&] {
            EPMOE_CUDA_CHECK(cudaMemsetAsync(sig.view().data, 0, sig.nbytes(), stream));
            sm90_grouped_gemm_fp8_masked_signal(mout_sig.view(), sig.view(), m_in8.view(),
                                                m_in8_scale.view(), w8.view(), w8_scale.view(),
                                                dcount.view(), 0, ws, stream);
          });
          m.sig_fp8_diff = count_diff(mout_sig.view().data, mout8.view().data, e_loc, m_max,
                                      g.n_out, dcnt, stream);
          m.sig_bad_entries +=
              bad_signal_entries(sig, cnt, nb, sm90_gemm_signal_info(DType::kF8E4M3, g.n_out));
        }
        EPMOE_CUDA_CHECK(cudaStreamSynchronize(stream));
        // Expert 0's valid rows (rows past count hold stale data in both buffers).
        m.check = sample_rel_l2(mout.view().data, mout_ref.view().data,
                                std::min<int64_t>(cnt[0], 512), g.n_out);
        rows.push_back(m);
      }
    }
  }

  const std::string dev_name = device_description(dev);
  fmt::print(
      "device: {}\ngrouped GEMM, DeepSeek-V3 experts (H={}, I={}), top-{} random routing; "
      "median of {} runs after {} warm-up, 256 MB L2 flush\n"
      "ceilings (same run): dense bf16 {:.0f} TFLOP/s, dense FP8 {:.0f} TFLOP/s ({}^3), "
      "copy {:.0f} GB/s{}\n",
      dev_name, kHidden, kInter, kTopK, iters, warmup, ceil.dense_bf16_tflops,
      ceil.dense_fp8_tflops, kDense, ceil.copy_gbps,
      sm90 ? "" : "; no sm90 kernels in this build/device");
  fmt::print(
      "{:<8} {:<10} {:>5} {:>6} {:>7} | {:>8} {:>6} | {:>8} {:>6} {:>5} {:>5} | {:>8} {:>6} "
      "{:>5} {:>5} | {:>8} {:>6} | {:>7}\n",
      "gemm", "layout", "E_loc", "T", "rows", "det_us", "TF/s", "bf16_us", "TF/s", "%dns", "%roof",
      "fp8_us", "TF/s", "%dns", "%roof", "cublas", "TF/s", "rel_l2");
  nlohmann::json j{{"device", dev_name},
                   {"iters", iters},
                   {"warmup", warmup},
                   {"notes",
                    "det = deterministic mma.sync kernel; bf16/fp8 = sm90 kernels; cuBLAS "
                    "grouped times exclude the host fetch of the counts; %dns = share of "
                    "the dense ceiling of the same dtype; %roof = (bytes moved / copy "
                    "bandwidth) / time; rel_l2 = sm90 bf16 vs det on sampled rows"},
                   {"ceilings",
                    {{"dense_bf16_tflops", ceil.dense_bf16_tflops},
                     {"dense_fp8_tflops", ceil.dense_fp8_tflops},
                     {"copy_gbps", ceil.copy_gbps},
                     {"dense_size", kDense}}}};
  j["rows"] = nlohmann::json::array();
  for (const Row& r : rows) {
    nlohmann::json rj = row_json(r, ceil);
    add_extra_json(rj, r);
    fmt::print(
        "{:<8} {:<10} {:>5} {:>6} {:>7} | {:>8.1f} {:>6.0f} | {:>8.1f} {:>6.0f} {:>5.0f} "
        "{:>5.0f} | {:>8.1f} {:>6.0f} {:>5.0f} {:>5.0f} | {:>8.1f} {:>6.0f} | {:>7.1e}\n",
        r.gemm, r.layout, r.e_loc, r.tokens, r.rows, r.det_us, r.tflops(r.det_us), r.sm90_bf16_us,
        r.tflops(r.sm90_bf16_us), rj["sm90_bf16_pct_dense"].get<double>(),
        rj["sm90_bf16_pct_roofline"].get<double>(), r.sm90_fp8_us, r.tflops(r.sm90_fp8_us),
        rj["sm90_fp8_pct_dense"].get<double>(), rj["sm90_fp8_pct_roofline"].get<double>(),
        r.grouped_us, r.tflops(r.grouped_us), r.check);
    j["rows"].push_back(rj);
  }

  if (sm90) {
    fmt::print(
        "\nsignals (masked rows): the sm90 calls with per-tile completion signals, the signal "
        "array zeroed\n(cudaMemsetAsync) inside every timed run; ovh% = vs the plain call; diff = "
        "output elements differing\nbitwise from the plain call (valid rows), bf16 + fp8; bad = "
        "wrong final signal entries\n");
    fmt::print("{:<8} {:>5} {:>6} {:>7} | {:>8} {:>8} {:>6} | {:>8} {:>8} {:>6} | {:>6} {:>4}\n",
               "gemm", "E_loc", "T", "rows", "bf16_us", "sig_us", "ovh%", "fp8_us", "sig_us",
               "ovh%", "diff", "bad");
    int64_t sig_wrong = 0;
    for (const Row& r : rows) {
      if (r.sig_bf16_diff < 0) continue;
      fmt::print(
          "{:<8} {:>5} {:>6} {:>7} | {:>8.1f} {:>8.1f} {:>6.1f} | {:>8.1f} {:>8.1f} {:>6.1f} | "
          "{:>6} {:>4}\n",
          r.gemm, r.e_loc, r.tokens, r.rows, r.sm90_bf16_us, r.sig_bf16_us,
          overhead_pct(r.sig_bf16_us, r.sm90_bf16_us), r.sm90_fp8_us, r.sig_fp8_us,
          overhead_pct(r.sig_fp8_us, r.sm90_fp8_us), r.sig_bf16_diff + r.sig_fp8_diff,
          r.sig_bad_entries);
      sig_wrong += r.sig_bf16_diff + r.sig_fp8_diff + r.sig_bad_entries;
    }
    if (sig_wrong > 0)
      fmt::print(
          "SIGNALS MISMATCH: {} output elements or signal entries differ from the contract\n",
          sig_wrong);
  }

  if (sm90 && sm90_fp8_tune_variants() > 0) {
    fmt::print(
        "\nFP8 candidates (EPMOE_SM90_TUNING, contiguous rows, the production FP8 call's "
        "inputs): x_fp8 / x_bf16 = speedup\nvs the production FP8 / sm90 bf16 kernels; diff = "
        "output elements differing bitwise from production FP8\n");
    fmt::print("{:<8} {:>5} {:>6} {:>7} {:<10} | {:>8} {:>6} {:>6} {:>6} | {:>9} {:>7}\n", "gemm",
               "E_loc", "T", "rows", "variant", "us", "TF/s", "x_fp8", "x_bf16", "diff", "rel_l2");
    for (const Row& r : rows) {
      if (r.variants.empty()) continue;
      fmt::print(
          "{:<8} {:>5} {:>6} {:>7} {:<10} | {:>8.1f} {:>6.0f} {:>6.2f} {:>6.2f} | {:>9} {:>7}\n",
          r.gemm, r.e_loc, r.tokens, r.rows, "production", r.sm90_fp8_us, r.tflops(r.sm90_fp8_us),
          1.0, r.sm90_fp8_us > 0 ? r.sm90_bf16_us / r.sm90_fp8_us : 0.0, 0, "-");
      for (const Row::Variant& v : r.variants) {
        if (!v.error.empty()) {
          fmt::print("{:<8} {:>5} {:>6} {:>7} {:<10} | failed: {}\n", r.gemm, r.e_loc, r.tokens,
                     r.rows, v.name, v.error);
          continue;
        }
        fmt::print(
            "{:<8} {:>5} {:>6} {:>7} {:<10} | {:>8.1f} {:>6.0f} {:>6.2f} {:>6.2f} | {:>9} "
            "{:>7.1e}\n",
            r.gemm, r.e_loc, r.tokens, r.rows, v.name, v.us, r.tflops(v.us), r.sm90_fp8_us / v.us,
            r.sm90_bf16_us / v.us, v.diff, v.rel_l2);
      }
    }
  }
  return j;
}

}  // namespace epmoe::cuda
