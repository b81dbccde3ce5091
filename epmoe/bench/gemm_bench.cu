#include "epmoe/bench/gemm_bench.cuh"

#include <algorithm>
#include <cmath>
#include <functional>
#include <random>
#include <string>

#include <cuda_bf16.h>
#include <fmt/format.h>

#include "epmoe/bench/bench_stream.cuh"
#include "epmoe/cuda/cuda_check.h"
#include "epmoe/cuda/device.h"
#include "epmoe/experts/experts.cuh"
#include "epmoe/experts/grouped_gemm.cuh"

namespace epmoe::cuda {

namespace {

constexpr int64_t kHidden = 7168, kInter = 2048, kExperts = 256, kTopK = 8;
constexpr int64_t kFlushBytes = int64_t(256) << 20;  // written before every timed run

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

struct Row {
  std::string gemm, layout;
  int e_loc = 0;
  int64_t tokens = 0, rows = 0, n_out = 0, k = 0;
  double ours_us = 0, grouped_us = 0, per_expert_us = 0, dense_us = 0;
  double weight_bytes = 0, check = 0;
  double flops() const { return 2.0 * double(rows) * double(n_out) * double(k); }
  double tflops(double us) const { return us > 0 ? flops() / (us * 1e6) : 0.0; }
};

nlohmann::json row_json(const Row& r) {
  const double ours = r.tflops(r.ours_us), dense = r.tflops(r.dense_us);
  return {{"gemm", r.gemm},
          {"layout", r.layout},
          {"e_loc", r.e_loc},
          {"tokens", r.tokens},
          {"rows", r.rows},
          {"n_out", r.n_out},
          {"k", r.k},
          {"ours_us", r.ours_us},
          {"ours_tflops", ours},
          {"cublas_grouped_us", r.grouped_us},
          {"cublas_per_expert_us", r.per_expert_us},
          {"dense_us", r.dense_us},
          {"dense_tflops", dense},
          {"ratio_to_dense", dense > 0 ? ours / dense : 0.0},
          {"speedup_vs_cublas_grouped", r.ours_us > 0 ? r.grouped_us / r.ours_us : 0.0},
          {"speedup_vs_cublas_per_expert", r.ours_us > 0 ? r.per_expert_us / r.ours_us : 0.0},
          {"weight_gbps", r.ours_us > 0 ? r.weight_bytes / (r.ours_us * 1e3) : 0.0},
          {"check_rel_l2", r.check}};
}

}  // namespace

nlohmann::json run_grouped_gemm_bench(const std::vector<int64_t>& tokens, int iters, int warmup) {
  EPMOE_CHECK(iters >= 1 && warmup >= 0, kInvalidArgument,
              "grouped GEMM bench: iters must be >= 1 and warmup >= 0, got {} / {}", iters,
              warmup);
  for (int64_t t : tokens)
    EPMOE_CHECK(t >= 1, kInvalidArgument, "grouped GEMM bench: token counts must be >= 1, got {}",
                t);
  require_device();
  int dev = 0;
  EPMOE_CUDA_CHECK(cudaGetDevice(&dev));
  BenchStream bs(kFlushBytes);
  const cudaStream_t stream = bs.stream();
  auto median_us = [&](const std::function<void()>& fn) { return bs.median_us(fn, iters, warmup); };
  GroupedGemmRunner cublas;
  std::random_device rd;
  std::mt19937_64 rng((uint64_t(rd()) << 32) | rd());
  std::vector<Row> rows;

  for (const int e_loc : {256, 32}) {
    const int64_t ranks = kExperts / e_loc;
    // Routing per T, shared by both GEMMs.
    std::vector<std::vector<int32_t>> counts;
    for (int64_t T : tokens) counts.push_back(route_counts(ranks * T, e_loc, rng));
    for (const Gemm g : {Gemm{"gate_up", 2 * kInter, kHidden}, Gemm{"down", kHidden, kInter}}) {
      DeviceTensor w = bs.random(DType::kBF16, {e_loc, g.n_out, g.k}, 0.05f);
      const TensorView w0{w.view().data, {g.n_out, g.k}, DType::kBF16, Device::kCuda};
      for (size_t ti = 0; ti < tokens.size(); ++ti) {
        const int64_t T = tokens[ti];
        const std::vector<int32_t>& cnt = counts[ti];
        std::vector<int32_t> seg(size_t(e_loc) + 1, 0);
        double wbytes = 0;
        for (int e = 0; e < e_loc; ++e) {
          seg[size_t(e) + 1] = seg[size_t(e)] + cnt[size_t(e)];
          if (cnt[size_t(e)] > 0) wbytes += 2.0 * double(g.n_out) * double(g.k);
        }
        const int64_t N = seg.back();
        Tensor seg_host(DType::kI32, {e_loc + 1});
        std::copy(seg.begin(), seg.end(), seg_host.as<int32_t>());
        DeviceTensor dseg = DeviceTensor::from_host(seg_host);
        DeviceTensor in = bs.random(DType::kBF16, {N, g.k}, 1.f);
        DeviceTensor out(DType::kBF16, {N, g.n_out}), out_ref(DType::kBF16, {N, g.n_out});

        Row r{g.name, "contiguous", e_loc, T, N, g.n_out, g.k};
        r.weight_bytes = wbytes;
        r.ours_us = median_us([&] {
          grouped_gemm_contiguous(out.view(), in.view(), w.view(), dseg.view(), 0, stream);
        });
        // NOTES: the cuBLAS runs get the counts already on the host: the host synchronisation
        // they need in a real layer (GroupedGemmRunner::fetch_counts) is not timed.
        r.grouped_us = median_us([&] {
          cublas.contiguous(out_ref.view(), in.view(), w.view(), seg.data(), e_loc, 0, stream,
                            GroupedGemmImpl::kGrouped);
        });
        r.per_expert_us = median_us([&] {
          cublas.contiguous(out_ref.view(), in.view(), w.view(), seg.data(), e_loc, 0, stream,
                            GroupedGemmImpl::kPerExpert);
        });
        EPMOE_CUDA_CHECK(cudaStreamSynchronize(stream));
        r.check = sample_rel_l2(out.view().data, out_ref.view().data, std::min<int64_t>(N, 512),
                                g.n_out);
        // Same FLOPs as one dense GEMM: all N rows through one expert's weight.
        r.dense_us = median_us(
            [&] { dense_gemm(out_ref.view(), in.view(), w0, 0.f, cublas.handle(), stream); });
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
        m.ours_us = median_us([&] {
          grouped_gemm_masked(mout.view(), m_in.view(), w.view(), dcount.view(), 0, stream);
        });
        m.grouped_us = median_us([&] {
          cublas.masked(mout_ref.view(), m_in.view(), w.view(), cnt.data(), 0, stream,
                        GroupedGemmImpl::kGrouped);
        });
        m.per_expert_us = median_us([&] {
          cublas.masked(mout_ref.view(), m_in.view(), w.view(), cnt.data(), 0, stream,
                        GroupedGemmImpl::kPerExpert);
        });
        EPMOE_CUDA_CHECK(cudaStreamSynchronize(stream));
        // Expert 0's valid rows (rows past count hold stale data in both buffers).
        m.check = sample_rel_l2(mout.view().data, mout_ref.view().data,
                                std::min<int64_t>(cnt[0], 512), g.n_out);
        rows.push_back(m);
      }
    }
  }

  const std::string dev_name = device_description(dev);
  fmt::print("device: {}\ngrouped GEMM, DeepSeek-V3 experts (H={}, I={}), top-{} random routing; "
             "median of {} runs after {} warm-up, 256 MB L2 flush\n",
             dev_name, kHidden, kInter, kTopK, iters, warmup);
  fmt::print("{:<8} {:<10} {:>5} {:>6} {:>7} {:>10} {:>8} {:>11} {:>11} {:>8} {:>7} {:>8} "
             "{:>9}\n",
             "gemm", "layout", "E_loc", "T", "rows", "ours_us", "TFLOP/s", "cublas_grp",
             "cublas_per", "dense%", "xgrp", "xper", "wGB/s");
  nlohmann::json j{{"device", dev_name},
                   {"iters", iters},
                   {"warmup", warmup},
                   {"notes", "cuBLAS times exclude the host fetch of the counts; dense = one "
                             "cuBLAS bf16 GEMM [rows, K] x [Nout, K]^T of the same FLOPs"}};
  j["rows"] = nlohmann::json::array();
  for (const Row& r : rows) {
    const nlohmann::json rj = row_json(r);
    fmt::print("{:<8} {:<10} {:>5} {:>6} {:>7} {:>10.1f} {:>8.1f} {:>11.1f} {:>11.1f} {:>7.0f}% "
               "{:>6.2f}x {:>7.2f}x {:>9.0f}\n",
               r.gemm, r.layout, r.e_loc, r.tokens, r.rows, r.ours_us, r.tflops(r.ours_us),
               r.grouped_us, r.per_expert_us, 100.0 * rj["ratio_to_dense"].get<double>(),
               rj["speedup_vs_cublas_grouped"].get<double>(),
               rj["speedup_vs_cublas_per_expert"].get<double>(), rj["weight_gbps"].get<double>());
    j["rows"].push_back(rj);
  }
  return j;
}

}  // namespace epmoe::cuda
