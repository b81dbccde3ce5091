#include <fmt/format.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>

#include "epmoe/comm/launch.h"
#include "epmoe/core/stats.h"
#include "epmoe/cuda/cuda_check.h"
#include "epmoe/cuda/device.h"
#include "epmoe/cuda/flags.cuh"
#include "epmoe/layer/layer_rank_cuda.h"
#include "epmoe/layer/run_layer_cuda.h"

namespace epmoe::cuda {

namespace {

// The attention stand-in: every block spins until `ns` have passed on the global timer, with a
// grid that fills every SM — a compute phase of a known length that leaves no SM idle.
__global__ void busy_kernel(int64_t ns) { spin_ns(ns); }

int sm_count(int device) {
  int n = 0;
  EPMOE_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  return n;
}

TensorView rows(const Tensor& t, int64_t first, int64_t n) {
  const int64_t w = t.shape()[1];
  return TensorView{static_cast<char*>(t.view().data) + size_t(first * w) * dtype_size(t.dtype()),
                    {n, w},
                    t.dtype(),
                    Device::kCpu};
}

struct Timer {
  cudaEvent_t a = nullptr, b = nullptr;
  Timer() {
    EPMOE_CUDA_CHECK(cudaEventCreate(&a));
    EPMOE_CUDA_CHECK(cudaEventCreate(&b));
  }
  ~Timer() {
    cudaEventDestroy(a);
    cudaEventDestroy(b);
  }
  double us() const {
    float ms = 0;
    EPMOE_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
    return double(ms) * 1e3;
  }
};

}  // namespace

CudaRunResult run_layer_cuda(const CudaRunSpec& sp) {
  EPMOE_CHECK(sp.weights && sp.x_all, kInvalidArgument, "run_layer_cuda: weights and x needed");
  EPMOE_CHECK(sp.iters >= 1 && sp.trace_iters >= 0, kInvalidArgument,
              "iterations must be >= 1 (traced >= 0), got {} and {}", sp.iters, sp.trace_iters);
  EPMOE_CHECK(!sp.strategies.empty(), kInvalidArgument, "no strategy to run");
  EPMOE_CHECK(int(sp.tokens.size()) == sp.ep.num_ranks, kInvalidArgument,
              "{} token counts for {} ranks", sp.tokens.size(), sp.ep.num_ranks);
  const MoeConfig& cfg = sp.weights->config;
  const int R = sp.ep.num_ranks, Kp = cfg.num_slots();
  const int64_t H = cfg.hidden, T = sp.x_all->shape()[0];
  const size_t NS = sp.strategies.size();
  CudaRunResult res;
  res.traffic.resize(size_t(R));
  res.strategies.resize(NS);
  for (size_t i = 0; i < NS; ++i) {
    StrategyResult& s = res.strategies[i];
    s.kind = sp.strategies[i];
    s.describe = make_strategy(s.kind, sp.ep.mode).describe();
    s.layer_us.assign(size_t(R), 0.0);
    s.trace.resize(size_t(R));
    s.op_us.resize(size_t(R));
    s.y = Tensor::zeros(DType::kF32, {T, H});
    s.ids = Tensor::zeros(DType::kI32, {T, Kp});
    s.w = Tensor::zeros(DType::kF32, {T, Kp});
  }
  res.row_end = T;
  std::vector<int64_t> first(size_t(R), 0);
  for (int r = 1; r < R; ++r) first[size_t(r)] = first[size_t(r - 1)] + sp.tokens[size_t(r - 1)];
  std::mutex mu;

  auto rank_body = [&](GpuTransport& t) {
    const int me = t.rank();
    const int64_t n = sp.tokens[size_t(me)], f = first[size_t(me)];
    MoeLayerRankCuda layer(t, *sp.weights, sp.ep, sp.options);
    if (sp.ids_all)
      layer.upload(rows(*sp.x_all, f, n), rows(*sp.ids_all, f, n), rows(*sp.weights_all, f, n));
    else
      layer.upload(rows(*sp.x_all, f, n));
    cudaStream_t cs = layer.compute_stream();
    const int sms = sm_count(t.device());
    const int64_t rank_tokens = std::max<int64_t>(1, n);
    // The micro-batch plan of the forward being issued (read by the attention stand-in).
    int layer_plan_mbs = 1;
    SplitRule layer_plan_split = SplitRule::kHalves;
    UserOps user;
    if (sp.attn_us > 0) {
      user.attn_core = [&, cs, sms, rank_tokens, n](int mb) {
        const TokenRange r = micro_batch_range(n, layer_plan_mbs, mb, layer_plan_split, me);
        const int64_t ns = int64_t(sp.attn_us * 1e3 * double(r.size()) / double(rank_tokens));
        if (ns > 0) busy_kernel<<<unsigned(sms * 2), 128, 0, cs>>>(ns);
      };
    }
    std::vector<Strategy> strategies;
    for (OverlapKind k : sp.strategies) strategies.push_back(make_strategy(k, sp.ep.mode, user));
    // Graphs: one per strategy, captured after the warm-up.
    std::vector<cudaGraphExec_t> exec(NS, nullptr);
    auto forward = [&](size_t i) {
      layer_plan_mbs = strategies[i].plan.num_micro_batches;
      layer_plan_split = strategies[i].plan.split;
      if (exec[i]) {
        EPMOE_CUDA_CHECK(cudaGraphLaunch(exec[i], cs));
        return;
      }
      execute(layer, strategies[i]);
    };
    Timer timer;
    std::vector<std::vector<double>> times(NS);
    for (size_t i = 0; i < NS; ++i) {  // warm-up (and, for graphs, the capture)
      t.barrier();
      forward(i);
      layer.check();
      if (sp.graph) {
        t.barrier();
        cudaGraph_t g = nullptr;
        EPMOE_CUDA_CHECK(cudaStreamBeginCapture(cs, cudaStreamCaptureModeThreadLocal));
        forward(i);
        EPMOE_CUDA_CHECK(cudaStreamEndCapture(cs, &g));
        EPMOE_CUDA_CHECK(cudaGraphInstantiate(&exec[i], g, 0));
        cudaGraphDestroy(g);
      }
    }
    for (int it = 0; it < sp.iters; ++it)
      for (size_t i = 0; i < NS; ++i) {
        t.barrier();
        EPMOE_CUDA_CHECK(cudaEventRecord(timer.a, cs));
        forward(i);
        EPMOE_CUDA_CHECK(cudaEventRecord(timer.b, cs));
        layer.check();
        times[i].push_back(timer.us());
        if (it == sp.iters - 1) {  // this strategy's output
          StrategyResult& s = res.strategies[i];
          if (n) {
            EPMOE_CUDA_CHECK(cudaMemcpy(s.y.as<float>() + f * H, layer.y().data, size_t(n * H) * 4,
                                        cudaMemcpyDeviceToHost));
            EPMOE_CUDA_CHECK(cudaMemcpy(s.ids.as<int32_t>() + f * Kp, layer.topk_ids().data,
                                        size_t(n * Kp) * 4, cudaMemcpyDeviceToHost));
            EPMOE_CUDA_CHECK(cudaMemcpy(s.w.as<float>() + f * Kp, layer.topk_weights().data,
                                        size_t(n * Kp) * 4, cudaMemcpyDeviceToHost));
          }
          if (i == 0) res.traffic[size_t(me)] = layer.last_traffic();
        }
      }
    // Traced forwards (not graphs: the trace's events are recorded op by op).
    std::vector<std::map<std::string, std::vector<double>>> per_op(NS);
    std::vector<std::vector<OpTiming>> last(NS);
    layer.set_tracing(sp.trace_iters > 0);
    for (int it = 0; it < sp.trace_iters; ++it)
      for (size_t i = 0; i < NS; ++i) {
        t.barrier();
        layer_plan_mbs = strategies[i].plan.num_micro_batches;
        layer_plan_split = strategies[i].plan.split;
        execute(layer, strategies[i]);
        last[i] = layer.last_trace();
        for (const OpTiming& o : last[i])
          per_op[i][o.name +
                    (strategies[i].plan.num_micro_batches > 1 ? (o.micro_batch ? "/B" : "/A") : "")]
              .push_back(o.end_us - o.start_us);
      }
    layer.set_tracing(false);
    for (auto e : exec)
      if (e) cudaGraphExecDestroy(e);
    std::lock_guard<std::mutex> lock(mu);
    if (layer.ll_over_host_api()) res.ll_host_ranks += 1;
    for (size_t i = 0; i < NS; ++i) {
      StrategyResult& s = res.strategies[i];
      s.layer_us[size_t(me)] = median(times[i]);
      s.trace[size_t(me)] = last[i];
      for (const auto& kv : per_op[i])
        s.op_us[size_t(me)].emplace_back(kv.first, median(kv.second));
    }
  };

  const LaunchInfo info = launch_ranks(sp.transport, R, rank_body);
  res.transport = info.transport;
  if (info.mpi) {
    res.row_begin = first[size_t(info.local_rank)];
    res.row_end = res.row_begin + sp.tokens[size_t(info.local_rank)];
  }
  return res;
}

std::string chrome_trace_json(const std::vector<std::vector<OpTiming>>& per_rank,
                              const std::string& label) {
  nlohmann::json ev = nlohmann::json::array();
  for (size_t r = 0; r < per_rank.size(); ++r) {
    ev.push_back({{"name", "process_name"},
                  {"ph", "M"},
                  {"pid", int(r)},
                  {"args", {{"name", fmt::format("rank {} ({})", r, label)}}}});
    for (int l = 0; l < 3; ++l)
      ev.push_back({{"name", "thread_name"},
                    {"ph", "M"},
                    {"pid", int(r)},
                    {"tid", l},
                    {"args", {{"name", std::string(op_lane_name(OpLane(l))) + " stream"}}}});
    for (const OpTiming& o : per_rank[r])
      ev.push_back({{"name", o.name + (o.micro_batch ? " B" : " A")},
                    {"cat", o.micro_batch ? "micro-batch B" : "micro-batch A"},
                    {"ph", "X"},
                    {"pid", int(r)},
                    {"tid", int(o.lane)},
                    {"ts", o.start_us},
                    {"dur", std::max(0.0, o.end_us - o.start_us)},
                    {"args", {{"micro_batch", o.micro_batch ? "B" : "A"}}}});
  }
  return nlohmann::json{{"traceEvents", ev}, {"displayTimeUnit", "ns"}}.dump();
}

}  // namespace epmoe::cuda
