#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <random>
#include <vector>

#include "epmoe/bench/ep_bench.h"
#include "epmoe/comm/gpu_transport.h"
#include "epmoe/comm/launch.h"
#include "epmoe/core/stats.h"
#include "epmoe/cuda/cuda_check.h"
#include "epmoe/cuda/device.h"
#include "epmoe/ep/ep_cuda.h"
#include "epmoe/layer/run_layer_cuda.h"
#include "epmoe/weights/moe_weights.h"

namespace epmoe::cuda {

namespace {

// Bytes per second of one large cudaMemcpyPeerAsync from src_dev to dst_dev (each byte counted
// once); the median of 6 timed copies after 2 untimed ones. Same device: a plain device copy.
double copy_gbps(int dst_dev, int src_dev) {
  const size_t bytes = size_t(1) << 30;
  EPMOE_CUDA_CHECK(cudaSetDevice(dst_dev));
  DeviceTensor dst(DType::kI32, {int64_t(bytes / 4)});
  EPMOE_CUDA_CHECK(cudaSetDevice(src_dev));
  DeviceTensor src(DType::kI32, {int64_t(bytes / 4)});
  src.fill_bytes(0x3c);
  if (dst_dev != src_dev) {
    int can = 0;
    EPMOE_CUDA_CHECK(cudaDeviceCanAccessPeer(&can, src_dev, dst_dev));
    if (can) cudaDeviceEnablePeerAccess(dst_dev, 0), cudaGetLastError();  // already enabled: fine
  }
  cudaEvent_t e0, e1;
  EPMOE_CUDA_CHECK(cudaEventCreate(&e0));
  EPMOE_CUDA_CHECK(cudaEventCreate(&e1));
  std::vector<double> ms;
  for (int i = 0; i < 8; ++i) {
    EPMOE_CUDA_CHECK(cudaEventRecord(e0));
    EPMOE_CUDA_CHECK(
        cudaMemcpyPeerAsync(dst.view().data, dst_dev, src.view().data, src_dev, bytes));
    EPMOE_CUDA_CHECK(cudaEventRecord(e1));
    EPMOE_CUDA_CHECK(cudaEventSynchronize(e1));
    float t;
    EPMOE_CUDA_CHECK(cudaEventElapsedTime(&t, e0, e1));
    if (i >= 2) ms.push_back(t);
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  EPMOE_CUDA_CHECK(cudaSetDevice(0));
  return double(bytes) / (median(ms) * 1e-3) / 1e9;
}

}  // namespace

nlohmann::json run_ep_bench(const EpBenchOptions& o) {
  require_device();
  MoeConfig cfg = find_preset(o.preset).config;
  cfg.fuse_shared = false;  // the benchmark times dispatch/combine; shared experts stay local
  const EpMode mode = parse_ep_mode(o.mode);
  const EpConfig ep{.num_ranks = o.ranks, .mode = mode, .max_tokens_per_rank = o.tokens};
  ep.validate(cfg);
  EPMOE_CHECK(o.iters >= 1 && o.tokens >= 1, kInvalidArgument, "need iters >= 1 and tokens >= 1");
  const MoeWeights wts = random_moe_weights(cfg, o.seed);
  const int R = o.ranks, Kp = cfg.num_slots();
  const int64_t H = cfg.hidden, T = o.tokens;

  const double d2d_gbps = copy_gbps(0, 0);
  // GPU 0 -> GPU 1 over NVLink/PCIe: the ceiling of the nccl transport.
  const double peer_gbps = o.transport == "nccl" && device_count() >= 2 ? copy_gbps(1, 0) : 0;

  // The layer through the executor (`none`: dispatch, experts and combine one after the other),
  // traced: dispatch = dispatch_send + dispatch_recv, combine = combine_send + combine_recv.
  std::mt19937_64 rng(o.seed * 131);
  Tensor x(DType::kBF16, {T * R, H});
  std::normal_distribution<float> nd(0.f, 1.f);
  for (int64_t i = 0; i < x.numel(); ++i) x.as<bf16>()[i] = f32_to_bf16(nd(rng));
  CudaRunSpec sp;
  sp.weights = &wts;
  sp.ep = ep;
  sp.tokens.assign(size_t(R), T);
  sp.x_all = &x;
  sp.transport = o.transport;
  sp.options =
      EpCudaOptions{.fp8_dispatch = o.fp8, .ll_transfer = parse_ll_transfer(o.ll_transfer)};
  sp.iters = std::max(1, o.warmup);
  sp.trace_iters = o.iters;
  const CudaRunResult run = run_layer_cuda(sp);
  const bool ll_host = run.ll_host_ranks > 0;
  std::vector<double> disp_r(static_cast<size_t>(R)), comb_r(static_cast<size_t>(R));
  for (int r = 0; r < R; ++r)
    for (const auto& kv : run.strategies[0].op_us[size_t(r)]) {
      if (kv.first.rfind("dispatch", 0) == 0) disp_r[size_t(r)] += kv.second;
      if (kv.first.rfind("combine", 0) == 0) comb_r[size_t(r)] += kv.second;
    }
  // (token, expert) pairs of every rank's tokens: DESIGN §7 / DeepEP accounting.
  int64_t total_pairs = 0, total_wd = 0, total_wc = 0;
  const Tensor& ids = run.strategies[0].ids;
  for (int64_t i = 0; i < ids.numel(); ++i)
    total_pairs += ids.as<int32_t>()[i] >= 0 && ids.as<int32_t>()[i] < cfg.n_routed_experts;
  for (const EpCudaTraffic& tr : run.traffic)
    total_wd += tr.dispatch_bytes, total_wc += tr.combine_bytes;

  // Baseline: a plain all-to-all through the transport's host API of the same dispatch bytes,
  // split evenly over the peers.
  std::vector<double> a2a_r(static_cast<size_t>(R));
  std::mutex mu;
  launch_ranks(o.transport, R, [&](GpuTransport& t) {
    const int me = t.rank();
    const size_t per_peer =
        size_t(std::max<int64_t>(16, total_wd / std::max(1, R * (R - 1))) / 16 * 16);
    DeviceTensor sbuf(DType::kI32, {int64_t(per_peer * size_t(R) / 4 + 1)}),
        rbuf(sbuf.dtype(), sbuf.shape());
    sbuf.fill_bytes(0x11);
    std::vector<size_t> bytes(static_cast<size_t>(R), per_peer), offs(static_cast<size_t>(R));
    for (int q = 0; q < R; ++q) offs[size_t(q)] = size_t(q) * per_peer;
    bytes[size_t(me)] = 0;
    cudaStream_t s = t.stream();
    cudaEvent_t ev[2];
    for (auto& e : ev) EPMOE_CUDA_CHECK(cudaEventCreate(&e));
    std::vector<double> us;
    for (int it = 0; it < o.warmup + o.iters; ++it) {
      t.barrier();
      EPMOE_CUDA_CHECK(cudaEventRecord(ev[0], s));
      t.all_to_all_v(sbuf.view().data, bytes.data(), offs.data(), rbuf.view().data, bytes.data(),
                     offs.data());
      EPMOE_CUDA_CHECK(cudaEventRecord(ev[1], s));
      t.synchronize("all-to-all baseline");
      float ms;
      EPMOE_CUDA_CHECK(cudaEventElapsedTime(&ms, ev[0], ev[1]));
      if (it >= o.warmup) us.push_back(double(ms) * 1e3);
    }
    for (auto& e : ev) cudaEventDestroy(e);
    std::lock_guard<std::mutex> lock(mu);
    a2a_r[size_t(me)] = median(us);
  });

  // The slowest rank's median sets each time.
  const double disp_us = *std::max_element(disp_r.begin(), disp_r.end());
  const double comb_us = *std::max_element(comb_r.begin(), comb_r.end());
  const double a2a_us = *std::max_element(a2a_r.begin(), a2a_r.end());
  const double disp_bytes_per_pair =
      o.fp8 ? double(H) + double((H + 127) / 128) * 4 : double(H) * 2;
  const double disp_bytes = double(total_pairs) * disp_bytes_per_pair;
  const double comb_bytes = double(total_pairs) * double(H) * 2;
  // Per-rank algorithmic bandwidth (DeepEP style) and the aggregate over ranks.
  const double disp_gbps = disp_bytes / R / (disp_us * 1e-6) / 1e9;
  const double comb_gbps = comb_bytes / R / (comb_us * 1e-6) / 1e9;
  const double agg_disp = disp_bytes / (disp_us * 1e-6) / 1e9;
  const double agg_comb = comb_bytes / (comb_us * 1e-6) / 1e9;
  const double a2a_gbps = double(total_wd) / (a2a_us * 1e-6) / 1e9;
  const double ceiling = o.transport == "nccl" && peer_gbps > 0 ? peer_gbps : d2d_gbps;

  nlohmann::json out;
  out["device"] = device_description(0);
  out["gpus"] = device_count();
  out["transport"] = o.transport;
  out["ranks"] = R;
  out["mode"] = ep_mode_name(mode);
  out["tokens_per_rank"] = T;
  out["fp8_dispatch"] = o.fp8;
  if (mode == EpMode::kLowLatency) out["ll_transfer"] = ll_host ? "host" : "device";
  out["d2d_copy_GBps"] = d2d_gbps;
  out["peer_copy_GBps"] = peer_gbps;
  out["pairs_total"] = total_pairs;
  out["rows"] = {{{"kernel", "dispatch"},
                  {"us", disp_us},
                  {"bytes_deepep", disp_bytes},
                  {"wire_bytes", total_wd},
                  {"GBps_per_rank", disp_gbps},
                  {"GBps_aggregate", agg_disp}},
                 {{"kernel", "combine"},
                  {"us", comb_us},
                  {"bytes_deepep", comb_bytes},
                  {"wire_bytes", total_wc},
                  {"GBps_per_rank", comb_gbps},
                  {"GBps_aggregate", agg_comb}},
                 {{"kernel", "all_to_all baseline"},
                  {"us", a2a_us},
                  {"wire_bytes", total_wd},
                  {"GBps_aggregate", a2a_gbps}}};
  fmt::print("device: {} | transport {} | {} ranks | {}{} | {} tokens/rank | dispatch {}\n",
             device_description(0), o.transport, R, ep_mode_name(mode),
             mode != EpMode::kLowLatency ? ""
             : ll_host                   ? " (host API)"
                                         : " (load/store)",
             T, o.fp8 ? "fp8" : "bf16");
  fmt::print("ceilings: device copy {:.0f} GB/s{}\n", d2d_gbps,
             peer_gbps > 0 ? fmt::format(", peer copy {:.0f} GB/s", peer_gbps) : std::string());
  fmt::print("{:<22} {:>10} {:>14} {:>14} {:>16} {:>10}\n", "kernel", "median us", "GB/s per rank",
             "GB/s aggregate", "wire MB (dedup)", "ratio");
  fmt::print("{:<22} {:>10.1f} {:>14.1f} {:>14.1f} {:>16.2f} {:>10.2f}\n", "dispatch", disp_us,
             disp_gbps, agg_disp, total_wd / 1e6, agg_disp / ceiling);
  fmt::print("{:<22} {:>10.1f} {:>14.1f} {:>14.1f} {:>16.2f} {:>10.2f}\n", "combine", comb_us,
             comb_gbps, agg_comb, total_wc / 1e6, agg_comb / ceiling);
  fmt::print("{:<22} {:>10.1f} {:>14} {:>14.1f} {:>16.2f} {:>10.2f}\n", "all-to-all (same bytes)",
             a2a_us, "-", a2a_gbps, total_wd / 1e6, a2a_gbps / ceiling);
  fmt::print("ratio = aggregate GB/s / {} GB/s\n",
             o.transport == "nccl" && peer_gbps > 0 ? "peer copy" : "device copy");
  out["ceiling_GBps"] = ceiling;
  return out;
}

}  // namespace epmoe::cuda
