#include "tools/run_cuda_ep.h"

#include <algorithm>
#include <cstring>
#include <mutex>

#include <fmt/format.h>

#include "epmoe/comm/gpu_transport.h"
#ifdef EPMOE_WITH_NCCL
#include "epmoe/comm/nccl_transport.h"
#endif
#include "epmoe/core/stats.h"
#include "epmoe/cuda/cuda_check.h"
#include "epmoe/cuda/device.h"
#include "epmoe/ep/ep_cuda.h"

namespace epmoe::cli {

CudaEpResult run_cuda_ep(const MoeWeights& weights, const EpConfig& ep,
                         const std::vector<int64_t>& tokens, const Tensor& x_all,
                         const std::string& transport_opt, bool fp8,
                         const std::string& ll_transfer, int iters) {
  const cuda::EpCudaOptions options{.fp8_dispatch = fp8,
                                    .ll_transfer = cuda::parse_ll_transfer(ll_transfer)};
  cuda::require_device();
  const MoeConfig& cfg = weights.config;
  const int R = ep.num_ranks, Kp = cfg.num_slots();
  const int64_t H = cfg.hidden, T = x_all.shape()[0];
  CudaEpResult res;
  res.y = Tensor::zeros(DType::kF32, {T, H});
  res.ids = Tensor::zeros(DType::kI32, {T, Kp});
  res.w = Tensor::zeros(DType::kF32, {T, Kp});
  res.times.resize(size_t(R));
  res.traffic.resize(size_t(R));
  res.row_end = T;
  std::vector<int64_t> first(size_t(R), 0);
  for (int r = 1; r < R; ++r) first[size_t(r)] = first[size_t(r - 1)] + tokens[size_t(r - 1)];
  std::mutex mu;

  auto rank_body = [&](cuda::GpuTransport& t) {
    const int me = t.rank();
    const int64_t n = tokens[size_t(me)], f = first[size_t(me)];
    cuda::EpRankCuda rank(t, weights, ep, options);
    const size_t xrow = size_t(H) * 2;
    rank.upload(TensorView{static_cast<char*>(x_all.view().data) + size_t(f) * xrow, {n, H},
                           DType::kBF16, Device::kCpu});
    cudaStream_t s = t.stream();
    cudaEvent_t ev[7];
    for (auto& e : ev) EPMOE_CUDA_CHECK(cudaEventCreate(&e));
    std::vector<double> st[6];
    const bool ll = ep.mode == EpMode::kLowLatency;
    for (int it = 0; it < iters + 1; ++it) {  // the first iteration warms up
      t.barrier();
      EPMOE_CUDA_CHECK(cudaEventRecord(ev[0], s));
      rank.route();
      EPMOE_CUDA_CHECK(cudaEventRecord(ev[1], s));
      if (ll) rank.ll_dispatch_send();
      else rank.normal_dispatch();
      EPMOE_CUDA_CHECK(cudaEventRecord(ev[2], s));
      rank.shared_experts();
      EPMOE_CUDA_CHECK(cudaEventRecord(ev[3], s));
      if (ll) {
        rank.ll_dispatch_recv();
        rank.ll_experts();
      } else {
        rank.normal_experts();
      }
      EPMOE_CUDA_CHECK(cudaEventRecord(ev[4], s));
      if (ll) {
        rank.ll_combine_send();
        rank.ll_combine_recv();
      } else {
        rank.normal_combine();
      }
      EPMOE_CUDA_CHECK(cudaEventRecord(ev[5], s));
      rank.finish_layer();
      EPMOE_CUDA_CHECK(cudaEventRecord(ev[6], s));
      rank.check();
      if (it == 0) continue;
      auto ms = [&](int a, int b) {
        float v;
        EPMOE_CUDA_CHECK(cudaEventElapsedTime(&v, ev[a], ev[b]));
        return double(v);
      };
      st[0].push_back(ms(0, 1));  // gate
      st[1].push_back(ms(1, 2));  // dispatch (send; low-latency receive is timed with experts)
      st[2].push_back(ms(2, 3) + ms(5, 6));  // shared
      st[3].push_back(ms(3, 4));  // experts (+ low-latency dispatch receive)
      st[4].push_back(ms(4, 5));  // combine
      st[5].push_back(ms(0, 6));  // total
    }
    for (auto& e : ev) cudaEventDestroy(e);
    const cuda::EpCudaTraffic tr = rank.last_traffic();
    std::lock_guard<std::mutex> lock(mu);
    if (rank.ll_over_host_api()) res.ll_host_ranks += 1;
    res.times[size_t(me)] = EpStageTimes{median(st[0]), median(st[1]), median(st[3]),
                                         median(st[4]), median(st[2]), median(st[5])};
    res.traffic[size_t(me)] = EpTraffic{tr.dispatch_tokens, tr.dispatch_bytes, tr.combine_bytes};
    if (n) {
      EPMOE_CUDA_CHECK(cudaMemcpy(res.y.as<float>() + f * H, rank.y().data, size_t(n * H) * 4,
                                  cudaMemcpyDeviceToHost));
      EPMOE_CUDA_CHECK(cudaMemcpy(res.ids.as<int32_t>() + f * Kp, rank.topk_ids().data,
                                  size_t(n * Kp) * 4, cudaMemcpyDeviceToHost));
      EPMOE_CUDA_CHECK(cudaMemcpy(res.w.as<float>() + f * Kp, rank.topk_weights().data,
                                  size_t(n * Kp) * 4, cudaMemcpyDeviceToHost));
    }
  };

  std::string transport = transport_opt;
#ifdef EPMOE_WITH_NCCL
  if (cuda::launched_by_mpi()) {
    auto t = cuda::make_nccl_transport_mpi();
    EPMOE_CHECK(t->size() == R, kInvalidConfig, "mpirun started {} processes for --ranks {}",
                t->size(), R);
    res.transport = "nccl (mpirun, one process per GPU)";
    res.row_begin = first[size_t(t->rank())];
    res.row_end = res.row_begin + tokens[size_t(t->rank())];
    rank_body(*t);
    return res;
  }
  const bool have_nccl = true;
#else
  const bool have_nccl = false;
#endif
  if (transport == "auto") transport = have_nccl && cuda::device_count() >= R ? "nccl" : "loopback";
  if (transport == "loopback") {
    res.transport = fmt::format("loopback ({} virtual ranks on GPU 0)", R);
    cuda::run_loopback(R, 0, rank_body);
  } else if (transport == "nccl") {
    EPMOE_CHECK(cuda::device_count() >= R, kUnsupported,
                "--transport nccl needs one GPU per rank: {} ranks, {} GPU(s) (use --transport "
                "loopback to run the ranks on one GPU)", R, cuda::device_count());
#ifdef EPMOE_WITH_NCCL
    res.transport = fmt::format("nccl ({} GPUs, a thread each)", R);
    cuda::run_nccl_threads(R, rank_body);
#else
    EPMOE_FAIL(kUnsupported, "this epmoe was built without NCCL (--transport loopback works)");
#endif
  } else {
    EPMOE_FAIL(kInvalidArgument, "--transport must be auto, nccl or loopback, got '{}'", transport);
  }
  return res;
}

}  // namespace epmoe::cli
