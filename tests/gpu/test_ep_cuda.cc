// The GPU layer (MoeLayerRankCuda) driven by the executor over the loopback transport (R virtual
// ranks on one GPU, the same kernels as over NCCL): output bitwise equal to the 1-rank output
// over >= 100 random routings (skew, empty ranks, -1 ids), both modes, bf16 and FP8 dispatch;
// every overlap strategy bitwise equal to `none`; the three transfer paths bitwise the same;
// layouts; only real tokens on the wire; the TBO decode layer captured in one CUDA graph and
// replayed; silent peers (also on micro-batch B only) time out naming them; golden files split
// across ranks. Multi-GPU variants over NCCL skip with fewer than 2 GPUs.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <set>
#include <thread>

#include "epmoe/comm/gpu_transport.h"
#include "epmoe/core/env.h"
#include "epmoe/cuda/cuda_check.h"
#include "epmoe/cuda/device.h"
#include "epmoe/ep/ep_cuda.h"
#include "epmoe/experts/sm90/sm90_grouped_gemm.cuh"
#include "epmoe/layer/layer_rank_cuda.h"
#include "epmoe/layer/moe_layer_cpu.h"
#include "epmoe/overlap/executor.h"
#include "epmoe/weights/moe_weights.h"
#include "epmoe/weights/safetensors.h"
#include "tests/gpu/test_common.h"
#ifdef EPMOE_WITH_NCCL
#include "epmoe/comm/nccl_transport.h"
#define EPMOE_TEST_NCCL 1
#endif

namespace epmoe::cuda {
namespace {

using testing::fresh_seed;

MoeConfig small_config(int n_shared, bool fuse) {
  return MoeConfig{.hidden = 256,
                   .moe_intermediate = 128,
                   .n_routed_experts = 32,
                   .top_k = 4,
                   .n_group = 4,
                   .topk_group = 2,
                   .n_shared_experts = n_shared,
                   .routed_scaling_factor = 2.5f,
                   .norm_topk_prob = true,
                   .scoring = Scoring::kSigmoid,
                   .fuse_shared = fuse};
}

struct Routing {
  Tensor x, ids, w;
  std::vector<int64_t> tokens;  // per rank
  int64_t total = 0;
};

// tokens: per-rank counts; empty = random in [0, t_max] with one empty rank.
Routing make_routing(const MoeConfig& c, int R, int64_t t_max, std::mt19937_64& rng,
                     bool skew_all = false, std::vector<int64_t> tokens = {}) {
  Routing r;
  r.tokens = tokens;
  if (r.tokens.empty()) {
    r.tokens.resize(size_t(R));
    for (auto& t : r.tokens) t = int64_t(rng() % uint64_t(t_max + 1));
    if (R > 1) r.tokens[rng() % uint64_t(R)] = 0;
  }
  for (auto t : r.tokens) r.total += t;
  const int Kp = c.num_slots();
  r.x = testing::random_tensor(DType::kBF16, {r.total, c.hidden}, rng);
  r.ids = Tensor(DType::kI32, {r.total, Kp});
  r.w = Tensor(DType::kF32, {r.total, Kp});
  std::uniform_real_distribution<float> wd(0.05f, 1.f);
  for (int64_t t = 0; t < r.total; ++t) {
    std::set<int> used;
    for (int k = 0; k < c.top_k; ++k) {
      int id = skew_all ? (k == 0 ? 7 : -1) : int(rng() % uint64_t(c.n_routed_experts));
      if (!skew_all && rng() % 9 == 0) id = -1;
      if (!skew_all && rng() % 4 == 0) id = 3;  // a hot expert
      if (id >= 0 && used.count(id)) id = -1;
      if (id >= 0) used.insert(id);
      r.ids.as<int32_t>()[t * Kp + k] = id;
      r.w.as<float>()[t * Kp + k] = wd(rng);
    }
    for (int j = 0; j < c.fused_shared(); ++j) {
      r.ids.as<int32_t>()[t * Kp + c.top_k + j] = c.n_routed_experts + j;
      r.w.as<float>()[t * Kp + c.top_k + j] = 1.f;
    }
  }
  return r;
}

TensorView rows(const Tensor& t, int64_t first, int64_t n) {
  const int64_t w = t.shape()[1];
  return TensorView{static_cast<char*>(t.view().data) + size_t(first * w) * dtype_size(t.dtype()),
                    {n, w},
                    t.dtype(),
                    Device::kCpu};
}

// One forward of the layer under a strategy: the executor owns the order.
void forward(MoeLayerRank& layer, OverlapKind kind = OverlapKind::kNone) {
  execute(layer, make_strategy(kind, layer.ep().mode));
}

// Runs the layer on R loopback ranks; returns y gathered [total, H] f32.
// one_rank: run all of r's tokens on a single rank instead of r.tokens' split.
// signalled: set to whether rank 0's combine-send waited on the down GEMM's signals.
Tensor run_loopback_ep(const MoeWeights& wts, int R, EpMode mode, int64_t t_max, const Routing& r,
                       const EpCudaOptions& opt = {}, bool one_rank = false,
                       OverlapKind kind = OverlapKind::kNone, bool* signalled = nullptr) {
  const int64_t H = wts.config.hidden;
  Tensor y(DType::kF32, {r.total, H});
  const std::vector<int64_t> tokens = one_rank ? std::vector<int64_t>{r.total} : r.tokens;
  if (one_rank) {
    R = 1;
    t_max = std::max<int64_t>(1, r.total);
  }
  std::vector<int64_t> first(tokens.size(), 0);
  for (size_t i = 1; i < tokens.size(); ++i) first[i] = first[i - 1] + tokens[i - 1];
  run_loopback(R, 0, [&](GpuTransport& t) {
    const size_t me = size_t(t.rank());
    MoeLayerRankCuda rank(
        t, wts, EpConfig{.num_ranks = R, .mode = mode, .max_tokens_per_rank = t_max}, opt);
    const int64_t n = tokens[me];
    rank.upload(rows(r.x, first[me], n), rows(r.ids, first[me], n), rows(r.w, first[me], n));
    for (int iter = 0; iter < 2; ++iter) forward(rank, kind);  // buffers and flags reused
    rank.check();
    if (signalled && me == 0) *signalled = rank.combine_was_signalled(0);
    if (n) {
      EPMOE_CUDA_CHECK(cudaMemcpy(y.as<float>() + first[me] * H, rank.y().data, size_t(n * H) * 4,
                                  cudaMemcpyDeviceToHost));
    }
  });
  return y;
}

TEST(GpuExpertParallel, LoopbackBitwiseEqualToOneRankOver100Routings) {
  EPMOE_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  int routings = 0;
  struct Variant {
    int n_shared;
    bool fuse, fp8;
  };
  const Variant variants[] = {{1, false, false}, {2, true, false}, {1, true, true}};
  for (const Variant& v : variants) {
    const MoeConfig cfg = small_config(v.n_shared, v.fuse);
    const MoeWeights wts = random_moe_weights(cfg, rng());
    for (int R : {2, 4, 8}) {
      for (EpMode mode : {EpMode::kNormal, EpMode::kLowLatency}) {
        const int trials = testing::quick() ? 1 : 3;
        for (int trial = 0; trial < trials; ++trial, ++routings) {
          SCOPED_TRACE(fmt::format("R {} mode {} shared {} fuse {} fp8 {} trial {}", R,
                                   ep_mode_name(mode), v.n_shared, v.fuse, v.fp8, trial));
          const Routing r = make_routing(cfg, R, 24, rng, trial == 2);
          const EpCudaOptions opt{.fp8_dispatch = v.fp8};
          const Tensor ep = run_loopback_ep(wts, R, mode, 24, r, opt);
          const Tensor one = run_loopback_ep(wts, 1, mode, 1, r, opt, true);
          ASSERT_TRUE(testing::bitwise_equal(ep, one, "EP vs 1-rank output"));
          // Against the CPU reference (f32 throughout): bf16 activations / FP8 payload.
          if (r.total > 0) {
            const Tensor ref = moe_experts_cpu(wts, r.x, r.ids, r.w, 0);
            const double err = testing::rel_l2(ep, ref);
            EXPECT_LT(err, v.fp8 ? 6e-2 : 2e-2);
          }
        }
      }
    }
  }
  // The remaining routings: more R=8 low-latency bf16 cases to pass 100 in all.
  const MoeConfig cfg = small_config(1, true);
  const MoeWeights wts = random_moe_weights(cfg, rng());
  while (routings < (testing::quick() ? 20 : 100)) {
    const int R = 1 << (routings % 4);  // 1, 2, 4, 8
    const EpMode mode = routings % 2 ? EpMode::kLowLatency : EpMode::kNormal;
    const Routing r = make_routing(cfg, R, 16, rng);
    const Tensor ep = run_loopback_ep(wts, R, mode, 16, r);
    const Tensor one = run_loopback_ep(wts, 1, mode, 1, r, {}, true);
    ASSERT_TRUE(testing::bitwise_equal(ep, one, fmt::format("routing {} R {}", routings, R)));
    ++routings;
  }
}

TEST(GpuExpertParallel, LowLatencyLayoutAndOnlyRealTokens) {
  EPMOE_REQUIRE_GPU();
  std::mt19937_64 rng(fresh_seed());
  const MoeConfig cfg = small_config(0, false);
  const MoeWeights wts = random_moe_weights(cfg, rng());
  const int R = 4, E_loc = 8, Kp = cfg.num_slots();
  const int64_t t_max = 16, m_max = R * t_max;
  const Routing r = make_routing(cfg, R, t_max, rng, false, {3, 0, 16, 9});
  ASSERT_EQ(r.total, 28);
  std::mutex mu;
  for (LlTransfer how : {LlTransfer::kDevice, LlTransfer::kHostApi})
    run_loopback(R, 0, [&](GpuTransport& t) {
      SCOPED_TRACE(fmt::format("transfers: {}", ll_transfer_name(how)));
      const int me = t.rank();
      int64_t first = 0;
      for (int i = 0; i < me; ++i) first += r.tokens[size_t(i)];
      const int64_t n = r.tokens[size_t(me)];
      MoeLayerRankCuda rank(
          t, wts,
          EpConfig{.num_ranks = R, .mode = EpMode::kLowLatency, .max_tokens_per_rank = t_max},
          EpCudaOptions{.ll_transfer = how});
      EXPECT_EQ(rank.ll_over_host_api(), how == LlTransfer::kHostApi);
      rank.upload(rows(r.x, first, n), rows(r.ids, first, n), rows(r.w, first, n));
      forward(rank);
      rank.check();
      // The receive side of the forward's (only) micro-batch.
      const EpMicroBatchCuda& mb = rank.ep_micro_batch(0);
      Tensor cnt(DType::kI32, {E_loc}), src(DType::kI32, {E_loc, m_max, 3});
      Tensor rx(DType::kBF16, {E_loc, m_max, cfg.hidden});
      EPMOE_CUDA_CHECK(
          cudaMemcpy(cnt.view().data, mb.recv_count().data, cnt.nbytes(), cudaMemcpyDeviceToHost));
      EPMOE_CUDA_CHECK(
          cudaMemcpy(src.view().data, mb.recv_src().data, src.nbytes(), cudaMemcpyDeviceToHost));
      EPMOE_CUDA_CHECK(
          cudaMemcpy(rx.view().data, mb.recv_x().data, rx.nbytes(), cudaMemcpyDeviceToHost));
      std::vector<int32_t> expect(size_t(E_loc), 0);
      int64_t copies = 0, g = 0, returned = 0;  // returned: rows this rank sends back to others
      for (int s = 0; s < R; ++s)
        for (int64_t i = 0; i < r.tokens[size_t(s)]; ++i, ++g) {
          std::set<int> dests;
          for (int k = 0; k < Kp; ++k) {
            const int id = r.ids.as<int32_t>()[g * Kp + k];
            if (id < 0) continue;
            dests.insert(id / E_loc);
            if (id / E_loc != me) continue;
            returned += s != me;
            const int e = id % E_loc;
            const int64_t row = expect[size_t(e)]++;
            const int32_t* sv = src.as<int32_t>() + (e * m_max + row) * 3;
            std::lock_guard<std::mutex> lock(mu);
            ASSERT_EQ(sv[0], s);
            ASSERT_EQ(sv[1], i);
            ASSERT_EQ(sv[2], k);
            ASSERT_EQ(std::memcmp(rx.as<bf16>() + (e * m_max + row) * cfg.hidden,
                                  r.x.as<bf16>() + g * cfg.hidden, size_t(cfg.hidden) * 2),
                      0);
          }
          if (s == me) copies += int64_t(dests.size()) - int64_t(dests.count(me));
        }
      for (int e = 0; e < E_loc; ++e) {
        std::lock_guard<std::mutex> lock(mu);
        EXPECT_EQ(cnt.as<int32_t>()[e], expect[size_t(e)]) << "rank " << me << " expert " << e;
      }
      const EpCudaTraffic tr = rank.last_traffic();
      std::lock_guard<std::mutex> lock(mu);
      EXPECT_EQ(tr.dispatch_tokens, copies) << "rank " << me;
      EXPECT_EQ(tr.dispatch_bytes, copies * int64_t((cfg.hidden * 2 + 4 + 8 * Kp + 15) / 16 * 16))
          << "rank " << me;
      if (n == 0) {
        EXPECT_EQ(tr.dispatch_bytes, 0);
      }
      // The way back: each row once, bf16; the host-API path adds a 16-byte header per row.
      const int64_t row_bytes = cfg.hidden * 2 + (how == LlTransfer::kHostApi ? 16 : 0);
      EXPECT_EQ(tr.combine_bytes, returned * row_bytes) << "rank " << me;
    });
}

// Low-latency mode over the host API (the path between nodes), on loopback ranks: the same
// output as one rank, bitwise, over random routings with skew, empty ranks and -1 ids.
TEST(GpuExpertParallel, LowLatencyOverHostApiBitwiseEqualToOneRank) {
  EPMOE_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const MoeConfig cfg = small_config(1, true);
  const MoeWeights wts = random_moe_weights(cfg, rng());
  for (bool fp8 : {false, true}) {
    const EpCudaOptions opt{.fp8_dispatch = fp8, .ll_transfer = LlTransfer::kHostApi};
    for (int R : {1, 2, 4, 8}) {
      for (int trial = 0; trial < (testing::quick() ? 2 : 5); ++trial) {
        SCOPED_TRACE(fmt::format("R {} fp8 {} trial {}", R, fp8, trial));
        const Routing r = make_routing(cfg, R, 20, rng, trial == 1);
        const Tensor ep = run_loopback_ep(wts, R, EpMode::kLowLatency, 20, r, opt);
        const Tensor one = run_loopback_ep(wts, 1, EpMode::kLowLatency, 1, r,
                                           EpCudaOptions{.fp8_dispatch = fp8}, true);
        ASSERT_TRUE(testing::bitwise_equal(ep, one, "host-API EP vs 1-rank output"));
      }
    }
  }
}

// The host-API path learns sizes on the host: capturing it in a CUDA graph is refused with an
// error that says why, before anything is enqueued; eager calls work afterwards.
TEST(GpuExpertParallel, LowLatencyOverHostApiRefusesGraphCapture) {
  EPMOE_REQUIRE_GPU();
  std::mt19937_64 rng(fresh_seed());
  const MoeConfig cfg = small_config(0, false);
  const MoeWeights wts = random_moe_weights(cfg, rng());
  const Routing r = make_routing(cfg, 2, 8, rng, false, {5, 8});
  const Tensor one = run_loopback_ep(wts, 1, EpMode::kLowLatency, 1, r, {}, true);
  Tensor y(DType::kF32, {r.total, cfg.hidden});
  std::mutex mu;
  run_loopback(2, 0, [&](GpuTransport& t) {
    const int me = t.rank();
    const int64_t first = me ? r.tokens[0] : 0, n = r.tokens[size_t(me)];
    MoeLayerRankCuda rank(
        t, wts, EpConfig{.num_ranks = 2, .mode = EpMode::kLowLatency, .max_tokens_per_rank = 8},
        EpCudaOptions{.ll_transfer = LlTransfer::kHostApi});
    rank.upload(rows(r.x, first, n), rows(r.ids, first, n), rows(r.w, first, n));
    EPMOE_CUDA_CHECK(
        cudaStreamBeginCapture(rank.compute_stream(), cudaStreamCaptureModeThreadLocal));
    std::string what;
    try {
      forward(rank);
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::kUnsupported);
      what = e.what();
    }
    cudaGraph_t graph = nullptr;
    EPMOE_CUDA_CHECK(cudaStreamEndCapture(rank.compute_stream(), &graph));
    if (graph) cudaGraphDestroy(graph);
    {
      std::lock_guard<std::mutex> lock(mu);
      EXPECT_NE(what.find("CUDA graph"), std::string::npos) << "rank " << me << ": " << what;
    }
    forward(rank);
    rank.check();
    if (n)
      EPMOE_CUDA_CHECK(cudaMemcpy(y.as<float>() + first * cfg.hidden, rank.y().data,
                                  size_t(n * cfg.hidden) * 4, cudaMemcpyDeviceToHost));
  });
  EXPECT_TRUE(testing::bitwise_equal(y, one, "eager after the refused capture"));
}

// Low-latency receive buffers hold each token once per expert: a token naming one expert twice
// is refused at upload with the token, the expert and both slots.
TEST(GpuExpertParallel, LowLatencyRefusesTheSameExpertTwiceInAToken) {
  EPMOE_REQUIRE_GPU();
  std::mt19937_64 rng(fresh_seed());
  const MoeConfig cfg = small_config(0, false);
  const MoeWeights wts = random_moe_weights(cfg, rng());
  Routing r = make_routing(cfg, 1, 4, rng, false, {4});
  r.ids.as<int32_t>()[2 * cfg.num_slots() + 0] = 5;
  r.ids.as<int32_t>()[2 * cfg.num_slots() + 3] = 5;
  run_loopback(1, 0, [&](GpuTransport& t) {
    MoeLayerRankCuda rank(
        t, wts, EpConfig{.num_ranks = 1, .mode = EpMode::kLowLatency, .max_tokens_per_rank = 4});
    try {
      rank.upload(r.x, r.ids, r.w);
      ADD_FAILURE() << "a repeated expert id was accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::kInvalidArgument);
      EXPECT_NE(std::string(e.what()).find("token 2 names expert 5 twice (slots 0 and 3)"),
                std::string::npos)
          << e.what();
    }
  });
}

// compute-sanitizer runs kernels one at a time; gpu-check then sets EPMOE_SERIAL_HALVES=1 so that
// every send half finishes before any rank waits. Tests that need a rank to wait while its peer
// runs (a replayed graph holds both halves; a silent peer) cannot run that way.
#define EPMOE_SKIP_IF_SERIAL_HALVES()                                                 \
  do {                                                                                \
    if (env_int("SERIAL_HALVES", 0))                                                  \
      GTEST_SKIP() << "EPMOE_SERIAL_HALVES=1: needs concurrent kernels across ranks"; \
  } while (0)

// The whole TBO decode layer (both micro-batches, every operation, three streams) captured in
// ONE CUDA graph and replayed with new tokens, routings and token counts: bitwise the eager
// `none` output.
TEST(GpuExpertParallel, TboDecodeLayerInOneGraphReplaysNewRoutings) {
  EPMOE_REQUIRE_GPU();
  EPMOE_SKIP_IF_SERIAL_HALVES();
  std::mt19937_64 rng(fresh_seed());
  const MoeConfig cfg = small_config(1, true);
  const MoeWeights wts = random_moe_weights(cfg, rng());
  const int R = 4;
  const int64_t t_max = 12;
  std::vector<Routing> cases;
  for (int i = 0; i < 4; ++i) cases.push_back(make_routing(cfg, R, t_max, rng, i == 3));
  std::vector<Tensor> eager;
  for (const auto& c : cases)
    eager.push_back(run_loopback_ep(wts, R, EpMode::kLowLatency, t_max, c));
  std::vector<Tensor> out(cases.size());
  for (size_t i = 0; i < cases.size(); ++i)
    out[i] = Tensor(DType::kF32, {cases[i].total, cfg.hidden});
  run_loopback(R, 0, [&](GpuTransport& t) {
    const int me = t.rank();
    MoeLayerRankCuda rank(
        t, wts,
        EpConfig{.num_ranks = R, .mode = EpMode::kLowLatency, .max_tokens_per_rank = t_max});
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    rank.upload(rows(cases[0].x, 0, 0), rows(cases[0].ids, 0, 0), rows(cases[0].w, 0, 0));
    cudaStream_t cs = rank.compute_stream();
    EPMOE_CUDA_CHECK(cudaStreamBeginCapture(cs, cudaStreamCaptureModeThreadLocal));
    forward(rank, OverlapKind::kTbo);
    EPMOE_CUDA_CHECK(cudaStreamEndCapture(cs, &graph));
    EPMOE_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    t.barrier();
    for (size_t i = 0; i < cases.size(); ++i) {
      const Routing& c = cases[i];
      int64_t first = 0;
      for (int j = 0; j < me; ++j) first += c.tokens[size_t(j)];
      const int64_t n = c.tokens[size_t(me)];
      rank.upload(rows(c.x, first, n), rows(c.ids, first, n), rows(c.w, first, n));
      EPMOE_CUDA_CHECK(cudaGraphLaunch(exec, cs));
      rank.check();
      if (n)
        EPMOE_CUDA_CHECK(cudaMemcpy(out[i].as<float>() + first * cfg.hidden, rank.y().data,
                                    size_t(n * cfg.hidden) * 4, cudaMemcpyDeviceToHost));
    }
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
  });
  for (size_t i = 0; i < cases.size(); ++i)
    EXPECT_TRUE(testing::bitwise_equal(out[i], eager[i], fmt::format("replay {}", i)));
}

TEST(GpuExpertParallel, SilentPeerTimesOutNamingIt) {
  EPMOE_REQUIRE_GPU();
  EPMOE_SKIP_IF_SERIAL_HALVES();
  std::mt19937_64 rng(fresh_seed());
  const MoeConfig cfg = small_config(0, false);
  const MoeWeights wts = random_moe_weights(cfg, rng());
  const Routing r = make_routing(cfg, 1, 8, rng);
  const auto start = std::chrono::steady_clock::now();
  try {
    run_loopback(2, 0, [&](GpuTransport& t) {
      MoeLayerRankCuda rank(
          t, wts, EpConfig{.num_ranks = 2, .mode = EpMode::kLowLatency, .max_tokens_per_rank = 8},
          EpCudaOptions{.timeout_ms = 500});
      t.barrier();
      if (t.rank() == 1) return;  // never sends
      rank.upload(r.x, r.ids, r.w);
      forward(rank);
      rank.check();
    });
    FAIL() << "a silent peer went unnoticed";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kTimeout) << e.what();
    EXPECT_NE(std::string(e.what()).find("peer 1"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("expected"), std::string::npos) << e.what();
  }
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(10));
}

// Sets an environment variable for one scope (the host-side waits read EPMOE_TIMEOUT_MS).
struct ScopedEnv {
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old, had_ = true;
    setenv(name, value, 1);
    env_reload();
  }
  ~ScopedEnv() {
    had_ ? setenv(name_, old_.c_str(), 1) : unsetenv(name_);
    env_reload();
  }
  const char* name_;
  std::string old_;
  bool had_ = false;
};

// Over the host API a silent peer is noticed at the size exchange, a host-side wait bounded by
// EPMOE_TIMEOUT_MS that names the rank that never came.
TEST(GpuExpertParallel, SilentPeerOverHostApiTimesOutNamingIt) {
  EPMOE_REQUIRE_GPU();
  std::mt19937_64 rng(fresh_seed());
  const MoeConfig cfg = small_config(0, false);
  const MoeWeights wts = random_moe_weights(cfg, rng());
  const Routing r = make_routing(cfg, 1, 8, rng);
  ScopedEnv budget("EPMOE_TIMEOUT_MS", "1500");
  const auto start = std::chrono::steady_clock::now();
  std::atomic<bool> done{false};
  try {
    run_loopback(2, 0, [&](GpuTransport& t) {
      MoeLayerRankCuda rank(
          t, wts, EpConfig{.num_ranks = 2, .mode = EpMode::kLowLatency, .max_tokens_per_rank = 8},
          EpCudaOptions{.ll_transfer = LlTransfer::kHostApi});
      if (t.rank() == 1) {  // set up, then silent until rank 0 gave up
        while (!done && std::chrono::steady_clock::now() - start < std::chrono::seconds(20))
          std::this_thread::sleep_for(std::chrono::milliseconds(10));
        return;
      }
      try {
        rank.upload(r.x, r.ids, r.w);
        forward(rank);
        rank.check();
      } catch (...) {
        done = true;
        throw;
      }
      done = true;
    });
    FAIL() << "a silent peer went unnoticed";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kTimeout) << e.what();
    EXPECT_NE(std::string(e.what()).find("ranks 1 never arrived"), std::string::npos) << e.what();
  }
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(15));
}

TEST(GpuExpertParallel, GoldenFilesSplitAcrossRanks) {
  EPMOE_REQUIRE_GPU();
  const char* env = std::getenv("EPMOE_GOLDEN_DIR");
  const std::string dir = env ? env : std::string(EPMOE_SOURCE_DIR) + "/../shared/golden";
  for (const char* name :
       {"dsv3_small_grouped", "dsv3_routing_256e", "ungrouped_2shared_noscale"}) {
    const std::string path = dir + "/" + name + ".safetensors";
    if (!std::filesystem::exists(path)) GTEST_SKIP() << "golden file not found: " << path;
    SafetensorsFile f(path);
    MoeConfig cfg = config_from_safetensors_metadata(f);
    cfg.fuse_shared = true;
    const MoeWeights wts = load_moe_weights(f, cfg);
    const Tensor x = to_dtype(f.tensor("input"), DType::kBF16);
    const Tensor expected = to_f32(f.tensor("output"));
    const Tensor exp_ids = to_dtype(f.tensor("topk_ids"), DType::kI32);
    const int64_t T = x.shape()[0];
    for (int R : {2, 8}) {
      for (EpMode mode : {EpMode::kNormal, EpMode::kLowLatency}) {
        SCOPED_TRACE(fmt::format("{} R {} {}", name, R, ep_mode_name(mode)));
        std::vector<int64_t> tokens(size_t(R), 0);
        tokens[0] = T / 3;
        tokens[size_t(R - 1)] = T - T / 3;
        const int64_t t_max = T - T / 3;
        Tensor y(DType::kF32, {T, cfg.hidden});
        Tensor ids(DType::kI32, {T, cfg.num_slots()});
        run_loopback(R, 0, [&](GpuTransport& t) {
          const size_t me = size_t(t.rank());
          int64_t first = 0;
          for (size_t j = 0; j < me; ++j) first += tokens[j];
          const int64_t n = tokens[me];
          MoeLayerRankCuda rank(
              t, wts, EpConfig{.num_ranks = R, .mode = mode, .max_tokens_per_rank = t_max});
          rank.upload(rows(x, first, n));
          forward(rank);
          rank.check();
          if (n) {
            EPMOE_CUDA_CHECK(cudaMemcpy(y.as<float>() + first * cfg.hidden, rank.y().data,
                                        size_t(n * cfg.hidden) * 4, cudaMemcpyDeviceToHost));
            EPMOE_CUDA_CHECK(cudaMemcpy(ids.as<int32_t>() + first * cfg.num_slots(),
                                        rank.topk_ids().data, size_t(n * cfg.num_slots()) * 4,
                                        cudaMemcpyDeviceToHost));
          }
        });
        EXPECT_LT(testing::rel_l2(y, expected), 2e-2);
        int64_t bad = 0;
        for (int64_t t = 0; t < T; ++t) {
          std::vector<int> a(ids.as<int32_t>() + t * cfg.num_slots(),
                             ids.as<int32_t>() + t * cfg.num_slots() + cfg.top_k);
          std::vector<int> b(exp_ids.as<int32_t>() + t * cfg.top_k,
                             exp_ids.as<int32_t>() + (t + 1) * cfg.top_k);
          std::sort(a.begin(), a.end());
          std::sort(b.begin(), b.end());
          bad += a != b;
        }
        EXPECT_EQ(bad, 0);
      }
    }
  }
}

// Every overlap strategy gives bitwise the sequential output and the 1-rank output: none, tbo
// and sbo x both modes x R in {1, 2, 4, 8} x uneven tokens with empty and 1-token ranks, -1 ids
// and a hot expert.
TEST(GpuOverlap, StrategiesBitwiseEqualToNoneAndOneRank) {
  EPMOE_REQUIRE_GPU();
  EPMOE_SKIP_IF_SERIAL_HALVES();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (bool fuse : {false, true}) {
    const MoeConfig cfg = small_config(1, fuse);
    const MoeWeights wts = random_moe_weights(cfg, rng());
    for (EpMode mode : {EpMode::kNormal, EpMode::kLowLatency})
      for (int R : {1, 2, 4, 8}) {
        std::vector<int64_t> tokens(static_cast<size_t>(R));
        for (auto& t : tokens) t = int64_t(rng() % 13);
        if (R > 1) tokens[1] = 0, tokens[size_t(R - 1)] = 1;  // an empty and a 1-token rank
        const Routing r = make_routing(cfg, R, 12, rng, false, tokens);
        const Tensor one = run_loopback_ep(wts, 1, mode, 1, r, {}, true);
        const Tensor none = run_loopback_ep(wts, R, mode, 12, r);
        ASSERT_TRUE(testing::bitwise_equal(none, one, "none vs 1 rank"));
        for (OverlapKind k : {OverlapKind::kTbo, OverlapKind::kSbo}) {
          SCOPED_TRACE(
              fmt::format("{} {} R {} fuse {}", overlap_name(k), ep_mode_name(mode), R, fuse));
          const Tensor y = run_loopback_ep(wts, R, mode, 12, r, {}, false, k);
          ASSERT_TRUE(testing::bitwise_equal(y, none, "overlap vs none"));
        }
      }
  }
}

bool sm90_here() { return sm90_gemm_available() && env_int("SM90_GEMM", 1) != 0; }

// Single-batch overlap, second half (seed 001): in low-latency mode by load/store the
// combine-send starts with the down GEMM and sends each block of rows when the GEMM signals it.
// Bitwise equal to none, bf16 and FP8 experts, R 1/2/4, a hot expert with several m-blocks.
TEST(GpuOverlap, SboSignalledCombineBitwiseEqualToNone) {
  EPMOE_REQUIRE_GPU();
  if (!sm90_here()) GTEST_SKIP() << "the signals come from the sm90 GEMM";
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (bool fp8 : {false, true}) {
    const MoeConfig cfg = small_config(1, true);
    const MoeWeights wts = random_moe_weights(cfg, rng());
    for (int R : testing::quick() ? std::vector<int>{1, 2} : std::vector<int>{1, 2, 4}) {
      SCOPED_TRACE(fmt::format("R {} fp8 {}", R, fp8));
      std::vector<int64_t> tokens(static_cast<size_t>(R));
      for (auto& t : tokens) t = 220 + int64_t(rng() % 101);
      if (R > 1) tokens[1] = 0;
      // One slot in four names expert 3: ~0.7 of 220+ tokens give it more than 128 rows, so
      // several of its m-blocks are waited for.
      const Routing r = make_routing(cfg, R, 320, rng, false, tokens);
      const EpCudaOptions opt{.fp8_experts = fp8};
      const Tensor none = run_loopback_ep(wts, R, EpMode::kLowLatency, 320, r, opt);
      bool signalled = false;
      const Tensor sbo = run_loopback_ep(wts, R, EpMode::kLowLatency, 320, r, opt, false,
                                         OverlapKind::kSbo, &signalled);
      EXPECT_TRUE(signalled) << "sbo's combine-send did not wait on the GEMM's signals";
      ASSERT_TRUE(testing::bitwise_equal(sbo, none, "sbo (signalled combine) vs none"));
    }
  }
}

// A down GEMM that never signals: the signalled combine-send gives up after the budget and the
// error names the local expert, the m-block, the threshold and the value it saw; the peers'
// flags are not raised.
TEST(GpuOverlap, SignalledCombineTimesOutNamingExpertAndBlock) {
  EPMOE_REQUIRE_GPU();
  std::mt19937_64 rng(fresh_seed());
  const MoeConfig cfg = small_config(0, false);
  const MoeWeights wts = random_moe_weights(cfg, rng());
  const Routing r = make_routing(cfg, 1, 12, rng, false, {12});
  const auto start = std::chrono::steady_clock::now();
  run_loopback(1, 0, [&](GpuTransport& t) {
    MoeLayerRankCuda rank(
        t, wts, EpConfig{.num_ranks = 1, .mode = EpMode::kLowLatency, .max_tokens_per_rank = 12},
        EpCudaOptions{.timeout_ms = 300});
    rank.upload(r.x, r.ids, r.w);
    forward(rank);
    rank.check();
    EpMicroBatchCuda& mb = rank.ep_micro_batch(0);
    DeviceTensor never(DType::kI32, {cfg.n_routed_experts});  // E_loc x 1 m-block, all zero
    never.fill_bytes(0);
    const CombineSignals sig{never.as<int32_t>(), 128, 3};
    mb.combine_send(t.stream(), &sig);
    try {
      mb.check(t.stream());
      FAIL() << "a GEMM that never signalled went unnoticed";
    } catch (const Error& e) {
      const std::string m = e.what();
      EXPECT_EQ(e.kind(), ErrorKind::kTimeout) << m;
      EXPECT_NE(m.find("signal of local expert"), std::string::npos) << m;
      EXPECT_NE(m.find("m-block 0"), std::string::npos) << m;
      EXPECT_NE(m.find("expected 3, observed 0"), std::string::npos) << m;
    }
  });
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(10));
}

// FP8 experts (--weights fp8): every strategy, rank count and low-latency dispatch payload gives
// bitwise the 1-rank FP8 output (a token is quantised per 128 values by one rule whether the
// dispatch carried it as FP8 or bf16), within 8e-2 (rel L2) of the bf16 layer (measured
// 5.9-6.4e-2: weights and activations quantised) and not equal to it; I = 64 (not a multiple of
// 128) runs on zero-padded weights.
TEST(GpuOverlap, Fp8ExpertsBitwiseAcrossRanksStrategiesAndPayloads) {
  EPMOE_REQUIRE_GPU();
  if (!sm90_here()) GTEST_SKIP() << "FP8 experts run on the sm90 GEMM";
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (int variant : {0, 1}) {
    MoeConfig cfg = small_config(1, variant == 0);
    if (variant == 1) cfg.hidden = 128, cfg.moe_intermediate = 64;
    const MoeWeights wts = random_moe_weights(cfg, rng());
    const EpCudaOptions f8{.fp8_experts = true};
    for (EpMode mode : {EpMode::kNormal, EpMode::kLowLatency})
      for (int R : testing::quick() ? std::vector<int>{1, 2} : std::vector<int>{1, 2, 4}) {
        SCOPED_TRACE(fmt::format("H {} I {} {} R {}", cfg.hidden, cfg.moe_intermediate,
                                 ep_mode_name(mode), R));
        std::vector<int64_t> tokens(static_cast<size_t>(R));
        for (auto& t : tokens) t = int64_t(rng() % 13);
        tokens[0] = std::max<int64_t>(tokens[0], 5);
        if (R > 1) tokens[1] = 0, tokens[size_t(R - 1)] = 1;
        const Routing r = make_routing(cfg, R, 12, rng, false, tokens);
        const Tensor one = run_loopback_ep(wts, 1, mode, 1, r, f8, true);
        const Tensor bf = run_loopback_ep(wts, 1, mode, 1, r, {}, true);
        const double err = testing::rel_l2(one, bf);
        EXPECT_LT(err, 8e-2) << "FP8 vs bf16 experts";
        EXPECT_GT(err, 0.0) << "the FP8 run gave the bf16 bits";
        for (OverlapKind k : {OverlapKind::kNone, OverlapKind::kTbo, OverlapKind::kSbo}) {
          const Tensor y = run_loopback_ep(wts, R, mode, 12, r, f8, false, k);
          ASSERT_TRUE(testing::bitwise_equal(y, one, fmt::format("{} vs 1 rank", overlap_name(k))));
        }
        if (mode == EpMode::kLowLatency) {
          const Tensor y = run_loopback_ep(
              wts, R, mode, 12, r, EpCudaOptions{.fp8_dispatch = true, .fp8_experts = true});
          ASSERT_TRUE(testing::bitwise_equal(y, one, "FP8 payload kept vs 1 rank"));
        }
      }
  }
}

// Normal mode, low-latency by load/store and low-latency over the host API: bitwise the same
// output for the same tokens (and the gate run on the GPU, no routing given).
TEST(GpuOverlap, ThreeTransferPathsGiveTheSameOutput) {
  EPMOE_REQUIRE_GPU();
  std::mt19937_64 rng(fresh_seed());
  const MoeConfig cfg = small_config(1, false);
  const MoeWeights wts = random_moe_weights(cfg, rng());
  const int R = 4;
  const Routing r = make_routing(cfg, R, 16, rng, false, {16, 0, 7, 1});
  const Tensor normal = run_loopback_ep(wts, R, EpMode::kNormal, 16, r);
  const Tensor device = run_loopback_ep(wts, R, EpMode::kLowLatency, 16, r,
                                        EpCudaOptions{.ll_transfer = LlTransfer::kDevice});
  const Tensor host =
      run_loopback_ep(wts, R, EpMode::kLowLatency, 16, r,
                      EpCudaOptions{.ll_transfer = LlTransfer::kHostApi}, false, OverlapKind::kTbo);
  EXPECT_TRUE(testing::bitwise_equal(device, normal, "low-latency load/store vs normal"));
  EXPECT_TRUE(testing::bitwise_equal(host, normal, "low-latency host API (tbo) vs normal"));
}

// --ranks 1 is the same class whatever the transport: loopback and NCCL with one rank give
// bitwise the same output (the gate included).
TEST(GpuOverlap, OneRankSameOutputOverLoopbackAndNccl) {
  EPMOE_REQUIRE_GPU();
#ifndef EPMOE_TEST_NCCL
  GTEST_SKIP() << "built without NCCL";
#else
  std::mt19937_64 rng(fresh_seed());
  const MoeConfig cfg = small_config(1, false);
  const MoeWeights wts = random_moe_weights(cfg, rng());
  const Tensor x = testing::random_tensor(DType::kBF16, {37, cfg.hidden}, rng);
  Tensor y[2] = {Tensor(DType::kF32, {37, cfg.hidden}), Tensor(DType::kF32, {37, cfg.hidden})};
  for (int way = 0; way < 2; ++way) {
    auto body = [&](GpuTransport& t) {
      MoeLayerRankCuda rank(
          t, wts, EpConfig{.num_ranks = 1, .mode = EpMode::kLowLatency, .max_tokens_per_rank = 40});
      rank.upload(x);
      forward(rank);
      rank.check();
      EPMOE_CUDA_CHECK(
          cudaMemcpy(y[way].view().data, rank.y().data, y[way].nbytes(), cudaMemcpyDeviceToHost));
    };
    if (way == 0)
      run_loopback(1, 0, body);
    else
      run_nccl_threads(1, body);
  }
  EXPECT_TRUE(testing::bitwise_equal(y[0], y[1], "loopback vs nccl, one rank"));
#endif
}

// A layer that forwards every call to another; subclasses change run() to inject faults.
class ForwardingLayer : public MoeLayerRank {
 public:
  explicit ForwardingLayer(MoeLayerRank& inner) : in_(inner) {}
  int rank() const override { return in_.rank(); }
  int num_ranks() const override { return in_.num_ranks(); }
  const MoeConfig& config() const override { return in_.config(); }
  const EpConfig& ep() const override { return in_.ep(); }
  int max_micro_batches() const override { return in_.max_micro_batches(); }
  void begin_forward(const ForwardPlan& p) override { in_.begin_forward(p); }
  void run(LayerOp op, int mb) override { in_.run(op, mb); }
  void run_user(const std::string& n, int mb, const std::function<void(int)>& fn) override {
    in_.run_user(n, mb, fn);
  }
  void end_forward() override { in_.end_forward(); }
  void set_tracing(bool on) override { in_.set_tracing(on); }
  std::vector<OpTiming> last_trace() override { return in_.last_trace(); }

 protected:
  MoeLayerRank& in_;
};

// Drops one operation of one micro-batch: a peer that never sends micro-batch B's dispatch.
class DropOne final : public ForwardingLayer {
 public:
  DropOne(MoeLayerRank& inner, LayerOp op, int mb) : ForwardingLayer(inner), op_(op), mb_(mb) {}
  void run(LayerOp op, int mb) override {
    if (op == op_ && mb == mb_) return;
    in_.run(op, mb);
  }

 private:
  LayerOp op_;
  int mb_;
};

TEST(GpuOverlap, PeerSilentOnMicroBatchBTimesOutNamingIt) {
  EPMOE_REQUIRE_GPU();
  EPMOE_SKIP_IF_SERIAL_HALVES();
  std::mt19937_64 rng(fresh_seed());
  const MoeConfig cfg = small_config(0, false);
  const MoeWeights wts = random_moe_weights(cfg, rng());
  const Routing r = make_routing(cfg, 2, 8, rng, false, {8, 8});
  const auto start = std::chrono::steady_clock::now();
  try {
    run_loopback(2, 0, [&](GpuTransport& t) {
      MoeLayerRankCuda rank(
          t, wts, EpConfig{.num_ranks = 2, .mode = EpMode::kLowLatency, .max_tokens_per_rank = 8},
          EpCudaOptions{.timeout_ms = 500});
      const int64_t first = t.rank() ? 8 : 0;
      rank.upload(rows(r.x, first, 8), rows(r.ids, first, 8), rows(r.w, first, 8));
      if (t.rank() == 1) {
        // Rank 1 itself waits for its own missing send and fails too; rank 0's error is the one
        // checked below, so rank 1 keeps its errors to itself (run_loopback rethrows the first).
        try {
          DropOne silent(rank, LayerOp::kDispatchSend, 1);
          forward(silent, OverlapKind::kTbo);
          rank.check();
        } catch (const Error&) {
        }
        return;
      }
      forward(rank, OverlapKind::kTbo);
      rank.check();
    });
    FAIL() << "a peer silent on micro-batch B went unnoticed";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kTimeout) << e.what();
    const std::string w = e.what();
    EXPECT_NE(w.find("micro-batch B"), std::string::npos) << w;
    EXPECT_NE(w.find("rank 0"), std::string::npos) << w;
    EXPECT_NE(w.find("peer 1"), std::string::npos) << w;
  }
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(10));
}

// A rank that fails (throws) at one operation of micro-batch A: the rest of its forward never
// happens.
class FailAt final : public ForwardingLayer {
 public:
  FailAt(MoeLayerRank& inner, LayerOp op) : ForwardingLayer(inner), op_(op) {}
  void run(LayerOp op, int mb) override {
    EPMOE_CHECK(!(op == op_ && mb == 0), kInvalidArgument, "rank {}: injected failure at {}",
                in_.rank(), layer_op_name(op));
    in_.run(op, mb);
  }

 private:
  LayerOp op_;
};

// Issue 10: one rank fails in the middle of a layer (after its dispatch, before its combine), in
// each mode and transfer path; the other rank reports a bounded error naming it, and nothing is
// freed under a peer (compute-sanitizer memcheck runs this test).
TEST(GpuFaults, RankFailingMidLayerIsNamedByItsPeer) {
  EPMOE_REQUIRE_GPU();
  EPMOE_SKIP_IF_SERIAL_HALVES();
  std::mt19937_64 rng(fresh_seed());
  const MoeConfig cfg = small_config(1, false);
  const MoeWeights wts = random_moe_weights(cfg, rng());
  const Routing r = make_routing(cfg, 2, 8, rng, false, {8, 6});
  ScopedEnv budget("EPMOE_TIMEOUT_MS", "1500");
  struct Case {
    EpMode mode;
    LlTransfer how;
  };
  for (Case c :
       {Case{EpMode::kNormal, LlTransfer::kAuto}, Case{EpMode::kLowLatency, LlTransfer::kDevice},
        Case{EpMode::kLowLatency, LlTransfer::kHostApi}}) {
    SCOPED_TRACE(fmt::format("{} {}", ep_mode_name(c.mode), ll_transfer_name(c.how)));
    const auto start = std::chrono::steady_clock::now();
    std::string rank0_error;
    std::mutex mu;
    try {
      run_loopback(2, 0, [&](GpuTransport& t) {
        MoeLayerRankCuda rank(t, wts,
                              EpConfig{.num_ranks = 2, .mode = c.mode, .max_tokens_per_rank = 8},
                              EpCudaOptions{.timeout_ms = 1000, .ll_transfer = c.how});
        const int64_t first = t.rank() ? 8 : 0, n = r.tokens[size_t(t.rank())];
        rank.upload(rows(r.x, first, n), rows(r.ids, first, n), rows(r.w, first, n));
        t.barrier();
        if (t.rank() == 1) {
          FailAt failing(rank, LayerOp::kCombineSend);
          forward(failing);
          return;
        }
        try {
          forward(rank);
          rank.check();
        } catch (const Error& e) {
          std::lock_guard<std::mutex> lock(mu);
          rank0_error = e.what();
          throw;
        }
      });
      FAIL() << "the failure of rank 1 went unnoticed";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("injected failure"), std::string::npos) << e.what();
    }
    std::lock_guard<std::mutex> lock(mu);
    EXPECT_NE(rank0_error.find("1"), std::string::npos) << "rank 0 said: " << rank0_error;
    EXPECT_TRUE(rank0_error.find("peer 1") != std::string::npos ||
                rank0_error.find("rank 1") != std::string::npos ||
                rank0_error.find("ranks 1") != std::string::npos ||
                rank0_error.find("[1]") != std::string::npos)
        << "rank 0 said: " << rank0_error;
    EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(10));
  }
}

#ifdef EPMOE_TEST_NCCL
// Two GPUs over NCCL, a thread per GPU: bitwise equal to the 1-rank output, normal mode and
// low-latency mode both ways (auto: load/store where NCCL maps the peer, else the host API; and
// the host API forced). Under NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 (NCCL's network path) the
// same test checks the fallback that runs between nodes. EPMOE_TEST_NCCL_RANKS (default 2) runs
// it on more GPUs.
TEST(GpuExpertParallelNccl, TwoGpusBitwiseEqualToOneRankEveryStrategy) {
  EPMOE_REQUIRE_GPU();
  const int R = int(env_int("TEST_NCCL_RANKS", 2));
  if (device_count() < R) GTEST_SKIP() << "needs " << R << " GPUs, found " << device_count();
  std::mt19937_64 rng(fresh_seed());
  const MoeConfig cfg = small_config(1, true);
  const MoeWeights wts = random_moe_weights(cfg, rng());
  int host_api_runs = 0, load_store_runs = 0;
  for (int trial = 0; trial < (testing::quick() ? 6 : 100); ++trial) {
    const EpMode mode = trial % 2 ? EpMode::kLowLatency : EpMode::kNormal;
    const LlTransfer how = trial % 4 == 3 ? LlTransfer::kHostApi : LlTransfer::kAuto;
    const OverlapKind kind = OverlapKind(trial % 3);  // none, tbo, sbo
    const bool fp8 = sm90_here() && trial % 5 < 2;    // FP8 experts, both modes
    const Routing r = make_routing(cfg, R, 24, rng, trial % 10 == 9);
    Tensor y(DType::kF32, {r.total, cfg.hidden});
    std::atomic<int> host_ranks{0};
    bool reachable = true;
    run_nccl_threads(R, [&](GpuTransport& t) {
      const size_t me = size_t(t.rank());
      if (me == 0) reachable = t.peers_reachable();
      int64_t first = 0;
      for (size_t j = 0; j < me; ++j) first += r.tokens[j];
      const int64_t n = r.tokens[me];
      MoeLayerRankCuda rank(t, wts,
                            EpConfig{.num_ranks = R, .mode = mode, .max_tokens_per_rank = 24},
                            EpCudaOptions{.ll_transfer = how, .fp8_experts = fp8});
      host_ranks += rank.ll_over_host_api();
      rank.upload(rows(r.x, first, n), rows(r.ids, first, n), rows(r.w, first, n));
      forward(rank, kind);
      rank.check();
      if (n)
        EPMOE_CUDA_CHECK(cudaMemcpy(y.as<float>() + first * cfg.hidden, rank.y().data,
                                    size_t(n * cfg.hidden) * 4, cudaMemcpyDeviceToHost));
    });
    if (mode == EpMode::kLowLatency) {
      const bool expect_host = how == LlTransfer::kHostApi || !reachable;
      EXPECT_EQ(host_ranks.load(), expect_host ? R : 0) << "trial " << trial;
      (expect_host ? host_api_runs : load_store_runs) += 1;
    }
    const Tensor one = run_loopback_ep(wts, 1, mode, 1, r, EpCudaOptions{.fp8_experts = fp8}, true);
    ASSERT_TRUE(testing::bitwise_equal(
        y, one,
        fmt::format("trial {} {} ({} transfers, overlap {}{})", trial, ep_mode_name(mode),
                    ll_transfer_name(how), overlap_name(kind), fp8 ? ", FP8 experts" : "")));
  }
  std::printf("%d ranks, low-latency runs: %d over the host API, %d by load/store\n", R,
              host_api_runs, load_store_runs);
  EXPECT_GT(host_api_runs, 0);
}

// The dead-peer fault test over NCCL: GPU 1 joins the setup but never sends; GPU 0 reports a
// timeout naming it within the budget instead of hanging.
TEST(GpuExpertParallelNccl, SilentPeerTimesOutNamingIt) {
  EPMOE_REQUIRE_GPU();
  if (device_count() < 2) GTEST_SKIP() << "needs 2 GPUs, found " << device_count();
  std::mt19937_64 rng(fresh_seed());
  const MoeConfig cfg = small_config(0, false);
  const MoeWeights wts = random_moe_weights(cfg, rng());
  const Routing r = make_routing(cfg, 1, 8, rng);
  ScopedEnv budget("EPMOE_TIMEOUT_MS", "1500");  // the host-side waits (host-API path)
  const auto start = std::chrono::steady_clock::now();
  std::atomic<bool> done{false}, over_host_api{false};
  try {
    run_nccl_threads(2, [&](GpuTransport& t) {
      MoeLayerRankCuda rank(
          t, wts, EpConfig{.num_ranks = 2, .mode = EpMode::kLowLatency, .max_tokens_per_rank = 8},
          EpCudaOptions{.timeout_ms = 1000});
      if (rank.ll_over_host_api()) over_host_api = true;
      if (t.rank() == 1) {  // alive, its memory mapped, but it never sends
        while (!done && std::chrono::steady_clock::now() - start < std::chrono::seconds(20))
          std::this_thread::sleep_for(std::chrono::milliseconds(10));
        return;
      }
      try {  // load/store: check() reports the device wait; host API: the size exchange throws
        rank.upload(r.x, r.ids, r.w);
        forward(rank);
        rank.check();
      } catch (...) {
        done = true;
        throw;
      }
      done = true;
    });
    FAIL() << "a silent peer went unnoticed";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kTimeout) << e.what();
    // Load/store: the device wait names the peer; host API: the size exchange names the rank
    // that never entered it.
    const char* naming = over_host_api ? "ranks [1] never entered it" : "peer 1";
    EXPECT_NE(std::string(e.what()).find(naming), std::string::npos) << e.what();
  }
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(30));
}
// Issue 10 over NCCL: rank 1 fails mid-layer (it throws before its combine); rank 0 gets a
// bounded error naming it instead of a hang (the failing rank aborts its communicator).
TEST(GpuFaultsNccl, RankFailingMidLayerIsNamedByItsPeer) {
  EPMOE_REQUIRE_GPU();
  if (device_count() < 2) GTEST_SKIP() << "needs 2 GPUs, found " << device_count();
  std::mt19937_64 rng(fresh_seed());
  const MoeConfig cfg = small_config(1, false);
  const MoeWeights wts = random_moe_weights(cfg, rng());
  const Routing r = make_routing(cfg, 2, 8, rng, false, {8, 6});
  ScopedEnv budget("EPMOE_TIMEOUT_MS", "1500");
  for (EpMode mode : {EpMode::kNormal, EpMode::kLowLatency}) {
    SCOPED_TRACE(ep_mode_name(mode));
    const auto start = std::chrono::steady_clock::now();
    std::string rank0_error;
    std::mutex mu;
    try {
      run_nccl_threads(2, [&](GpuTransport& t) {
        MoeLayerRankCuda rank(t, wts,
                              EpConfig{.num_ranks = 2, .mode = mode, .max_tokens_per_rank = 8},
                              EpCudaOptions{.timeout_ms = 1000});
        const int64_t first = t.rank() ? 8 : 0, n = r.tokens[size_t(t.rank())];
        rank.upload(rows(r.x, first, n), rows(r.ids, first, n), rows(r.w, first, n));
        t.barrier();
        if (t.rank() == 1) {
          FailAt failing(rank, LayerOp::kCombineSend);
          forward(failing);
          return;
        }
        try {
          forward(rank);
          rank.check();
        } catch (const Error& e) {
          std::lock_guard<std::mutex> lock(mu);
          rank0_error = e.what();
          throw;
        }
      });
      FAIL() << "the failure of rank 1 went unnoticed";
    } catch (const Error& e) {
      SUCCEED() << e.what();
    }
    std::lock_guard<std::mutex> lock(mu);
    EXPECT_FALSE(rank0_error.empty()) << "rank 0 finished without noticing rank 1's failure";
    EXPECT_NE(rank0_error.find("1"), std::string::npos) << "rank 0 said: " << rank0_error;
    EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(20));
  }
}
#endif

}  // namespace
}  // namespace epmoe::cuda
