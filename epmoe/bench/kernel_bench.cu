#include <cuda_bf16.h>
#include <fmt/format.h>

#include <algorithm>
#include <functional>
#include <random>

#include "epmoe/bench/bench_stream.cuh"
#include "epmoe/bench/kernel_bench.h"
#include "epmoe/core/config.h"
#include "epmoe/cuda/cuda_check.h"
#include "epmoe/cuda/device.h"
#include "epmoe/experts/experts.cuh"
#include "epmoe/permute/permute.cuh"
#include "epmoe/routing/gate.cuh"

namespace epmoe::cuda {

namespace {

// The benchmark's stream (flush buffer: 2x the L2 bytes) and the options' iteration counts.
class Bench {
 public:
  explicit Bench(const KernelBenchOptions& o)
      : opts_(o), bs_((require_device(), l2_flush_bytes())) {}
  cudaStream_t stream() const { return bs_.stream(); }
  GroupedGemmRunner& gemm() { return gemm_; }
  DeviceTensor random(DType dt, const Shape& s, float amp = 1.f) { return bs_.random(dt, s, amp); }
  // Median µs of fn over opts.iters runs (or `iters`), each after an L2 flush.
  double time_us(const std::function<void()>& fn, int iters = 0) {
    return bs_.median_us(fn, iters > 0 ? iters : opts_.iters, opts_.warmup);
  }

 private:
  static int64_t l2_flush_bytes() {
    EPMOE_CUDA_CHECK(cudaSetDevice(0));
    int l2 = 0;
    EPMOE_CUDA_CHECK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, 0));
    return 2 * int64_t(std::max(l2, 1 << 20));
  }
  KernelBenchOptions opts_;
  BenchStream bs_;
  GroupedGemmRunner gemm_;
};

struct Ceilings {
  double copy_gbps = 0, gemm_tflops = 0;
};

Ceilings measure_ceilings(Bench& b) {
  Ceilings c;
  const int64_t bytes = int64_t(1) << 30;
  DeviceTensor src = b.random(DType::kBF16, {bytes / 2}), dst(DType::kBF16, {bytes / 2});
  const double copy_us = b.time_us([&] {
    EPMOE_CUDA_CHECK(cudaMemcpyAsync(dst.view().data, src.view().data, size_t(bytes),
                                     cudaMemcpyDeviceToDevice, b.stream()));
  });
  c.copy_gbps = 2.0 * double(bytes) / (copy_us * 1e3);  // read + write
  const int64_t n = 8192;
  DeviceTensor a = b.random(DType::kBF16, {n, n}), w = b.random(DType::kBF16, {n, n});
  DeviceTensor o(DType::kBF16, {n, n});
  const double gemm_us = b.time_us(
      [&] { dense_gemm(o.view(), a.view(), w.view(), 0.f, b.gemm().handle(), b.stream()); }, 20);
  c.gemm_tflops = 2.0 * double(n) * n * n / (gemm_us * 1e6);
  return c;
}

struct Row {
  std::string kernel;
  int64_t tokens;
  std::string shape;
  double us;
  double rate;  // GB/s or TFLOP/s
  bool is_flops;
  double ceiling;  // same unit
  std::string baseline;
  double baseline_us = 0;
};

nlohmann::json row_json(const Row& r) {
  nlohmann::json j{{"kernel", r.kernel},
                   {"tokens", r.tokens},
                   {"shape", r.shape},
                   {"median_us", r.us},
                   {r.is_flops ? "tflops" : "gbps", r.rate},
                   {"ceiling", r.ceiling},
                   {"ratio", r.ceiling > 0 ? r.rate / r.ceiling : 0.0}};
  if (!r.baseline.empty()) {
    j["baseline"] = r.baseline;
    j["baseline_us"] = r.baseline_us;
    j["speedup"] = r.us > 0 ? r.baseline_us / r.us : 0.0;
  }
  return j;
}

// Routing of T random tokens through the fused gate: ids [T, K'] and weights on the device.
struct Routing {
  DeviceTensor logits, ids, weights, bias;
};
Routing make_routing(Bench& b, const MoeConfig& c, int64_t T) {
  Routing r;
  r.logits = b.random(DType::kF32, {T, c.n_routed_experts}, 4.f);
  r.ids = DeviceTensor(DType::kI32, {T, c.num_slots()});
  r.weights = DeviceTensor(DType::kF32, {T, c.num_slots()});
  // NOTES: a small bias: a large one (vs the spread of the top sigmoid scores) sends most
  // tokens to the few experts it favours, and decode then reads only their weights.
  if (c.scoring == Scoring::kSigmoid) r.bias = b.random(DType::kF32, {c.n_routed_experts}, 0.002f);
  select_experts(r.ids.view(), r.weights.view(), r.logits.view(),
                 r.bias.numel() ? r.bias.view() : TensorView{}, c, b.stream());
  EPMOE_CUDA_CHECK(cudaStreamSynchronize(b.stream()));
  return r;
}

struct Layout {
  DeviceTensor seg, s2d, ws;
  std::vector<int32_t> seg_host;
  int64_t rows = 0;
};
Layout make_layout(Bench& b, const Routing& r, int bank) {
  Layout l;
  const int64_t T = r.ids.shape()[0], Kp = r.ids.shape()[1];
  l.seg = DeviceTensor(DType::kI32, {bank + 1});
  l.s2d = DeviceTensor(DType::kI32, {T, Kp});
  l.ws = DeviceTensor(DType::kI32, {int64_t(preprocess_workspace_bytes(T * Kp, bank) / 4) + 1});
  preprocess(l.seg.view(), l.s2d.view(), r.ids.view(), 0, bank, l.ws.view().data, b.stream());
  EPMOE_CUDA_CHECK(cudaStreamSynchronize(b.stream()));  // to_host copies on the legacy stream
  Tensor h = l.seg.to_host();
  l.seg_host.assign(h.as<int32_t>(), h.as<int32_t>() + bank + 1);
  l.rows = l.seg_host[bank];
  return l;
}

void bench_gate(Bench& b, const MoeConfig& c, int64_t T, const Ceilings& ce,
                std::vector<Row>& rows) {
  const int64_t H = c.hidden, E = c.n_routed_experts, Kp = c.num_slots();
  DeviceTensor x = b.random(DType::kBF16, {T, H}), w = b.random(DType::kBF16, {E, H}, 0.05f);
  DeviceTensor logits(DType::kF32, {T, E});
  const double gemm_us = b.time_us(
      [&] { gate_gemm(logits.view(), x.view(), w.view(), b.gemm().handle(), b.stream()); });
  rows.push_back({"gate_gemm", T, fmt::format("[{},{}]x[{},{}]^T", T, H, E, H), gemm_us,
                  2.0 * T * H * E / (gemm_us * 1e6), true, ce.gemm_tflops});
  Routing r = make_routing(b, c, T);
  const TensorView bias = r.bias.numel() ? r.bias.view() : TensorView{};
  const double fused_us = b.time_us([&] {
    select_experts(r.ids.view(), r.weights.view(), r.logits.view(), bias, c, b.stream());
  });
  DeviceTensor ws(DType::kI32, {int64_t(unfused_gate_workspace_bytes(T, c) / 4) + 1});
  const UnfusedGateWorkspace uw = carve_unfused_gate_workspace(ws.view().data, T, c);
  const double unfused_us = b.time_us([&] {
    select_experts_unfused(r.ids.view(), r.weights.view(), r.logits.view(), bias, c, uw,
                           b.stream());
  });
  const double bytes = double(T) * E * 4 + double(T) * Kp * 8 + E * 4;
  Row row{"fused_gate",
          T,
          fmt::format("E={} G={}/{} K'={}", E, c.topk_group, c.n_group, Kp),
          fused_us,
          bytes / (fused_us * 1e3),
          false,
          ce.copy_gbps,
          "unfused (5 kernels)",
          unfused_us};
  rows.push_back(row);
}

void bench_permute(Bench& b, const MoeConfig& c, int64_t T, const Ceilings& ce,
                   std::vector<Row>& rows) {
  const int64_t H = c.hidden, Kp = c.num_slots();
  const int bank = c.n_routed_experts + c.fused_shared();
  Routing r = make_routing(b, c, T);
  Layout l = make_layout(b, r, bank);
  const double pre_us = b.time_us([&] {
    preprocess(l.seg.view(), l.s2d.view(), r.ids.view(), 0, bank, l.ws.view().data, b.stream());
  });
  rows.push_back({"preprocess", T, fmt::format("[{},{}] ids -> {} experts", T, Kp, bank), pre_us,
                  (8.0 * T * Kp + 4.0 * (bank + 1)) / (pre_us * 1e3), false, ce.copy_gbps});
  DeviceTensor x = b.random(DType::kBF16, {T, H});
  DeviceTensor sorted(DType::kBF16, {T * Kp, H});
  const double re_us =
      b.time_us([&] { pre_reorder(sorted.view(), x.view(), l.s2d.view(), b.stream()); });
  const double re_bytes = 2.0 * T * H + 2.0 * l.rows * H + 4.0 * T * Kp;
  rows.push_back({"pre_reorder", T, fmt::format("H={} K'={} rows={}", H, Kp, l.rows), re_us,
                  re_bytes / (re_us * 1e3), false, ce.copy_gbps});
  DeviceTensor q(DType::kF8E4M3, {T * Kp, H}), sc(DType::kF32, {T * Kp, (H + 127) / 128});
  const double q_us =
      b.time_us([&] { pre_reorder_fp8(q.view(), sc.view(), x.view(), l.s2d.view(), b.stream()); });
  const double q_bytes = 2.0 * T * H + l.rows * (H + 4.0 * ((H + 127) / 128)) + 4.0 * T * Kp;
  rows.push_back({"pre_reorder_fp8", T, fmt::format("H={} K'={} rows={}", H, Kp, l.rows), q_us,
                  q_bytes / (q_us * 1e3), false, ce.copy_gbps});
}

void bench_post(Bench& b, const MoeConfig& c, int64_t T, const Ceilings& ce,
                std::vector<Row>& rows) {
  const int64_t H = c.hidden, Kp = c.num_slots();
  const int bank = c.n_routed_experts + c.fused_shared();
  Routing r = make_routing(b, c, T);
  Layout l = make_layout(b, r, bank);
  DeviceTensor down = b.random(DType::kBF16, {std::max<int64_t>(l.rows, 1), H});
  DeviceTensor out(DType::kBF16, {T, H});
  const double us = b.time_us([&] {
    post_reorder(out.view(), down.view(), l.s2d.view(), r.ids.view(), r.weights.view(),
                 c.n_routed_experts, 0, b.stream());
  });
  const double bytes = 2.0 * l.rows * H + 2.0 * T * H + 12.0 * T * Kp;
  rows.push_back({"post_reorder", T, fmt::format("H={} K'={} rows={} bf16->bf16", H, Kp, l.rows),
                  us, bytes / (us * 1e3), false, ce.copy_gbps});
}

void bench_silu(Bench& b, const MoeConfig& c, int64_t T, const Ceilings& ce,
                std::vector<Row>& rows) {
  const int64_t I = c.moe_intermediate, M = T * c.num_slots();
  DeviceTensor in = b.random(DType::kBF16, {M, 2 * I}, 3.f);
  DeviceTensor out(DType::kBF16, {M, I});
  const double us = b.time_us([&] { silu_and_mul(out.view(), in.view(), nullptr, b.stream()); });
  rows.push_back({"silu_and_mul", T, fmt::format("[{},{}] -> bf16", M, 2 * I), us,
                  6.0 * M * I / (us * 1e3), false, ce.copy_gbps});
  DeviceTensor q(DType::kF8E4M3, {M, I}), sc(DType::kF32, {M, (I + 127) / 128});
  const double qus =
      b.time_us([&] { silu_and_mul_fp8(q.view(), sc.view(), in.view(), nullptr, b.stream()); });
  rows.push_back({"silu_and_mul_fp8", T, fmt::format("[{},{}] -> fp8", M, 2 * I), qus,
                  (5.0 * M * I + 4.0 * M * ((I + 127) / 128)) / (qus * 1e3), false, ce.copy_gbps});
}

void bench_grouped(Bench& b, const MoeConfig& c, int64_t T, const Ceilings& ce,
                   std::vector<Row>& rows) {
  const int bank = c.n_routed_experts + c.fused_shared();
  Routing r = make_routing(b, c, T);
  Layout l = make_layout(b, r, bank);
  const int64_t N = l.rows, H = c.hidden, I = c.moe_intermediate;
  int busy = 0;  // experts with at least one row
  for (int e = 0; e < bank; ++e) busy += l.seg_host[e + 1] > l.seg_host[e];
  struct Gemm {
    const char* name;
    int64_t n_out, k;
  };
  for (const Gemm g : {Gemm{"grouped_gemm_gate_up", 2 * I, H}, Gemm{"grouped_gemm_down", H, I}}) {
    DeviceTensor w = b.random(DType::kBF16, {bank, g.n_out, g.k}, 0.05f);
    DeviceTensor in = b.random(DType::kBF16, {std::max<int64_t>(N, 1), g.k});
    DeviceTensor out(DType::kBF16, {std::max<int64_t>(N, 1), g.n_out});
    TensorView inv{in.view().data, {N, g.k}, DType::kBF16, Device::kCuda};
    TensorView outv{out.view().data, {N, g.n_out}, DType::kBF16, Device::kCuda};
    auto timed = [&](GroupedGemmImpl impl) {
      return b.time_us([&] {
        b.gemm().contiguous(outv, inv, w.view(), l.seg_host.data(), bank, 0, b.stream(), impl);
      });
    };
    const double auto_us = timed(GroupedGemmImpl::kAuto);
    const double api_us = timed(GroupedGemmImpl::kGrouped);
    const double base_us = timed(GroupedGemmImpl::kPerExpert);
    // Same-shape dense GEMM: all N rows through one expert's weight (the rate cuBLAS reaches).
    TensorView w0{w.view().data, {g.n_out, g.k}, DType::kBF16, Device::kCuda};
    const double dense_us =
        b.time_us([&] { dense_gemm(outv, inv, w0, 0.f, b.gemm().handle(), b.stream()); });
    const double flops = 2.0 * N * g.n_out * g.k, dense_tflops = flops / (dense_us * 1e6);
    const std::string shape =
        fmt::format("rows={} N={} K={} experts with rows={}/{}{}", N, g.n_out, g.k, busy, bank,
                    b.gemm().grouped_supported() ? "" : " (grouped API unsupported)");
    rows.push_back({g.name, T, shape + " [auto]", auto_us, flops / (auto_us * 1e6), true,
                    dense_tflops, "cuBLAS per expert", base_us});
    rows.push_back({std::string(g.name) + "_api", T, shape + " [cublasGemmGroupedBatchedEx]",
                    api_us, flops / (api_us * 1e6), true, dense_tflops, "cuBLAS per expert",
                    base_us});
    // Weight bytes actually read at this size: every expert with rows reads its whole matrix.
    const double wbytes = 2.0 * busy * g.n_out * g.k;
    rows.back().shape += fmt::format(" weights {:.0f} GB/s", wbytes / (api_us * 1e3));
  }
  // Masked layout at decode sizes (M_max = the largest count rounded up to 64).
  if (T <= 512) {
    std::vector<int32_t> count(bank);
    int32_t mmax = 1;
    for (int e = 0; e < bank; ++e) {
      count[e] = l.seg_host[e + 1] - l.seg_host[e];
      mmax = std::max(mmax, count[e]);
    }
    const int64_t m_max = (mmax + 63) / 64 * 64;
    DeviceTensor w = b.random(DType::kBF16, {bank, 2 * I, H}, 0.05f);
    DeviceTensor in = b.random(DType::kBF16, {bank, m_max, H});
    DeviceTensor out(DType::kBF16, {bank, m_max, 2 * I});
    const double us = b.time_us(
        [&] { b.gemm().masked(out.view(), in.view(), w.view(), count.data(), 0, b.stream()); });
    const double flops = 2.0 * N * 2 * I * H;
    // Decode is weight-bound: the ceiling is reading every expert's weights once.
    const double wbytes = 2.0 * busy * 2 * I * H;
    rows.push_back({"grouped_gemm_masked_gate_up", T,
                    fmt::format("E={} M_max={} N={} K={} ({:.0f} GB/s of weights)", bank, m_max,
                                2 * I, H, wbytes / (us * 1e3)),
                    us, flops / (us * 1e6), true, ce.gemm_tflops});
  }
}

}  // namespace

nlohmann::json run_kernel_bench(const KernelBenchOptions& opts) {
  static const char* kKernels[] = {"gate", "permute",      "post_reorder",
                                   "silu", "grouped_gemm", "all"};
  bool known = false;
  for (const char* k : kKernels) known |= opts.kernel == k;
  EPMOE_CHECK(known, kInvalidArgument,
              "unknown kernel '{}' (known: gate, permute, post_reorder, silu, grouped_gemm, all)",
              opts.kernel);
  EPMOE_CHECK(opts.iters >= 1 && opts.warmup >= 0, kInvalidArgument,
              "iters must be >= 1 and warmup >= 0, got {} / {}", opts.iters, opts.warmup);
  for (int64_t t : opts.tokens)
    EPMOE_CHECK(t >= 1, kInvalidArgument, "token counts must be >= 1, got {}", t);
  const MoeConfig cfg = find_preset(opts.preset).config;
  Bench b(opts);
  const Ceilings ce = measure_ceilings(b);
  std::vector<Row> rows;
  auto want = [&](const char* k) { return opts.kernel == "all" || opts.kernel == k; };
  for (int64_t T : opts.tokens) {
    if (want("gate")) bench_gate(b, cfg, T, ce, rows);
    if (want("permute")) bench_permute(b, cfg, T, ce, rows);
    if (want("post_reorder")) bench_post(b, cfg, T, ce, rows);
    if (want("silu")) bench_silu(b, cfg, T, ce, rows);
    if (want("grouped_gemm")) bench_grouped(b, cfg, T, ce, rows);
  }
  const std::string dev = device_description(0);
  fmt::print(
      "device: {}\npreset: {} ({})\nceilings: copy {:.0f} GB/s (read+write), cuBLAS bf16 "
      "GEMM {:.0f} TFLOP/s (8192^3)\n",
      dev, opts.preset, cfg.summary(), ce.copy_gbps, ce.gemm_tflops);
  fmt::print("{:<28} {:>6} {:>10} {:>14} {:>7}  {:<26} {}\n", "kernel", "T", "median_us", "rate",
             "ratio", "baseline", "shape");
  nlohmann::json j{{"device", dev},
                   {"preset", opts.preset},
                   {"iters", opts.iters},
                   {"warmup", opts.warmup},
                   {"ceilings", {{"copy_gbps", ce.copy_gbps}, {"gemm_tflops", ce.gemm_tflops}}}};
  j["rows"] = nlohmann::json::array();
  for (const Row& r : rows) {
    const std::string rate = fmt::format("{:.1f} {}", r.rate, r.is_flops ? "TFLOP/s" : "GB/s");
    const std::string base =
        r.baseline.empty() ? std::string("-")
                           : fmt::format("{:.1f}us ({:.2f}x)", r.baseline_us, r.baseline_us / r.us);
    fmt::print("{:<28} {:>6} {:>10.2f} {:>14} {:>6.0f}%  {:<26} {}\n", r.kernel, r.tokens, r.us,
               rate, r.ceiling > 0 ? 100.0 * r.rate / r.ceiling : 0.0, base, r.shape);
    j["rows"].push_back(row_json(r));
  }
  return j;
}

}  // namespace epmoe::cuda
