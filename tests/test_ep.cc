// Expert parallelism on the CPU backend (DESIGN §5): EP output == single-rank output bitwise for
// R in {1, 2, 4, 8} x both modes x uneven tokens (empty ranks, -1 ids); layouts; only real
// tokens on the wire; bounded waits; bad input.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <set>

#include "epmoe/comm/thread_comm.h"
#include "epmoe/ep/ep_runner.h"
#include "epmoe/layer/moe_layer_cpu.h"
#include "epmoe/routing/gate_cpu.h"
#include "tests/test_util.h"

namespace epmoe {
namespace {

using testing::fresh_seed;

MoeConfig small_config(int n_shared, bool fuse, bool scale_on_output = false) {
  return MoeConfig{.hidden = 72, .moe_intermediate = 24, .n_routed_experts = 32, .top_k = 4,
                   .n_group = 4, .topk_group = 2, .n_shared_experts = n_shared,
                   .routed_scaling_factor = 2.5f, .norm_topk_prob = true,
                   .scoring = Scoring::kSigmoid, .fuse_shared = fuse,
                   .scale_on_output = scale_on_output};
}

// Random routing with -1 ids, duplicates across tokens and a skewed expert.
void random_routing(const MoeConfig& c, int64_t T, std::mt19937_64& rng, Tensor* ids, Tensor* w) {
  const int Kp = c.num_slots();
  *ids = Tensor(DType::kI32, {T, Kp});
  *w = Tensor(DType::kF32, {T, Kp});
  std::uniform_real_distribution<float> wd(0.05f, 1.f);
  for (int64_t t = 0; t < T; ++t) {
    std::set<int> used;
    for (int k = 0; k < c.top_k; ++k) {
      int id;
      const int kind = int(rng() % 10);
      if (kind == 0) id = -1;
      else if (kind < 3) id = 5;  // hot expert
      else id = int(rng() % uint64_t(c.n_routed_experts));
      if (id >= 0 && used.count(id)) id = -1;
      if (id >= 0) used.insert(id);
      ids->as<int32_t>()[t * Kp + k] = id;
      w->as<float>()[t * Kp + k] = wd(rng);
    }
    for (int j = 0; j < c.fused_shared(); ++j) {
      ids->as<int32_t>()[t * Kp + c.top_k + j] = c.n_routed_experts + j;
      w->as<float>()[t * Kp + c.top_k + j] = 1.f;
    }
  }
}

std::vector<int64_t> uneven_tokens(int R, int64_t t_max, std::mt19937_64& rng) {
  std::vector<int64_t> t(static_cast<size_t>(R));
  for (auto& v : t) v = int64_t(rng() % uint64_t(t_max + 1));
  if (R > 1) t[rng() % uint64_t(R)] = 0;  // a rank without tokens
  t[0] = std::max<int64_t>(t[0], 1);
  return t;
}

// Runs the EP layer with explicit routing on R thread ranks and gathers y.
Tensor run_ep(const MoeWeights& wts, const EpConfig& ep, const Tensor& x, const Tensor& ids,
              const Tensor& w, const std::vector<int64_t>& tokens) {
  const int64_t H = wts.config.hidden, Kp = wts.config.num_slots();
  Tensor y(DType::kF32, {x.shape()[0], H});
  std::vector<int64_t> first(tokens.size(), 0);
  for (size_t r = 1; r < tokens.size(); ++r) first[r] = first[r - 1] + tokens[r - 1];
  ThreadGroup group(ep.num_ranks);
  group.run([&](Communicator& comm) {
    const size_t r = size_t(comm.rank());
    EpRankCpu rank(comm, wts, ep, 1);
    const int64_t t0 = first[r], n = tokens[r];
    TensorView xr{x.as<bf16>() + t0 * H, {n, H}, DType::kBF16, Device::kCpu};
    TensorView ir{ids.as<int32_t>() + t0 * Kp, {n, Kp}, DType::kI32, Device::kCpu};
    TensorView wr{w.as<float>() + t0 * Kp, {n, Kp}, DType::kF32, Device::kCpu};
    for (int iter = 0; iter < 2; ++iter) {  // twice: buffers and flags are reused
      Tensor yr = rank.forward(xr, ir, wr);
      std::memcpy(y.as<float>() + t0 * H, yr.view().data, yr.nbytes());
    }
  });
  return y;
}

TEST(ExpertParallel, BitwiseEqualToSingleRankAcrossRanksAndModes) {
  const uint64_t seed = fresh_seed();
  std::mt19937_64 rng(seed);
  struct Variant { int n_shared; bool fuse, scale; };
  for (Variant v : {Variant{1, false, false}, Variant{2, true, false}, Variant{1, true, true},
                    Variant{0, false, false}}) {
    const MoeConfig cfg = small_config(v.n_shared, v.fuse, v.scale);
    const MoeWeights wts = random_moe_weights(cfg, rng());
    for (int R : {1, 2, 4, 8}) {
      for (EpMode mode : {EpMode::kNormal, EpMode::kLowLatency}) {
        SCOPED_TRACE(fmt::format("seed {} R {} mode {} shared {} fuse {} scale {}", seed, R,
                                 ep_mode_name(mode), v.n_shared, v.fuse, v.scale));
        const int64_t t_max = 24;
        const std::vector<int64_t> tokens = uneven_tokens(R, t_max, rng);
        int64_t T = 0;
        for (auto t : tokens) T += t;
        Tensor x = testing::random_tensor(DType::kBF16, {T, cfg.hidden}, rng);
        Tensor ids, w;
        random_routing(cfg, T, rng, &ids, &w);
        const Tensor ref = moe_experts_cpu(wts, x, ids, w, 1);
        const EpConfig ep{.num_ranks = R, .mode = mode, .max_tokens_per_rank = t_max};
        const Tensor y = run_ep(wts, ep, x, ids, w, tokens);
        const int64_t bad = testing::first_mismatch(y, ref);
        ASSERT_EQ(bad, -1) << "first mismatch at token " << bad / cfg.hidden << ", column "
                           << bad % cfg.hidden;
      }
    }
  }
}

TEST(ExpertParallel, PresetWithGateMatchesSingleRank) {
  const MoeWeights wts = random_moe_weights(find_preset("deepseek-v3-tiny").config, fresh_seed());
  std::mt19937_64 rng(fresh_seed());
  const std::vector<int64_t> tokens = {30, 0, 17, 64, 1, 0, 9, 40};
  Tensor x = testing::random_tensor(DType::kBF16, {161, 256}, rng);
  const LayerResult ref = moe_forward_cpu(wts, x);
  for (EpMode mode : {EpMode::kNormal, EpMode::kLowLatency}) {
    const EpRunResult res = run_ep_cpu(wts, EpConfig{.num_ranks = 8, .mode = mode},
                                       split_rows(x, tokens), 1, 1);
    int64_t row = 0;
    for (int r = 0; r < 8; ++r) {
      TensorView ref_r{ref.y.as<float>() + row * 256, {tokens[size_t(r)], 256}, DType::kF32,
                       Device::kCpu};
      ASSERT_EQ(testing::first_mismatch(res.y[size_t(r)], ref_r), -1) << "rank " << r;
      row += tokens[size_t(r)];
    }
  }
}

// Normal-mode dispatch layout: every rank receives exactly the tokens routed to it, once each,
// in (source rank, token) order, with the ids of its own experts.
TEST(ExpertParallel, NormalDispatchLayoutAndOnlyRealTokens) {
  const MoeConfig cfg = small_config(1, true);
  const MoeWeights wts = random_moe_weights(cfg, 3);
  std::mt19937_64 rng(fresh_seed());
  const int R = 4, E_loc = 8, Kp = cfg.num_slots();
  const std::vector<int64_t> tokens = {3, 0, 11, 20};
  Tensor x = testing::random_tensor(DType::kBF16, {34, cfg.hidden}, rng);
  Tensor ids, w;
  random_routing(cfg, 34, rng, &ids, &w);
  const EpConfig ep{.num_ranks = R, .mode = EpMode::kNormal, .max_tokens_per_rank = 64};
  ThreadGroup group(R);
  group.run([&](Communicator& comm) {
    const int r = comm.rank();
    int64_t t0 = 0;
    for (int i = 0; i < r; ++i) t0 += tokens[size_t(i)];
    const int64_t n = tokens[size_t(r)];
    EpRankCpu rank(comm, wts, ep);
    rank.normal_dispatch(
        TensorView{x.as<bf16>() + t0 * cfg.hidden, {n, cfg.hidden}, DType::kBF16, Device::kCpu},
        TensorView{ids.as<int32_t>() + t0 * Kp, {n, Kp}, DType::kI32, Device::kCpu},
        TensorView{w.as<float>() + t0 * Kp, {n, Kp}, DType::kF32, Device::kCpu});
    // Expected: walk all tokens in global (= source rank, token) order.
    int64_t row = 0, copies = 0;
    std::vector<int32_t> counts(size_t(E_loc), 0);
    for (int64_t t = 0; t < 34; ++t) {
      bool mine = false;
      int src = 0;
      for (int64_t acc = tokens[0]; t >= acc; acc += tokens[size_t(++src)]) {}
      std::set<int> dests;
      for (int k = 0; k < Kp; ++k) {
        const int id = ids.as<int32_t>()[t * Kp + k];
        if (id < 0 || id >= cfg.n_routed_experts) continue;
        dests.insert(id / E_loc);
        if (id / E_loc == r) {
          mine = true;
          ++counts[size_t(id % E_loc)];
        }
      }
      if (src == r) copies += int64_t(dests.size()) - int64_t(dests.count(r));
      if (!mine) continue;
      ASSERT_EQ(std::memcmp(rank.recv_x().as<bf16>() + row * cfg.hidden,
                            x.as<bf16>() + t * cfg.hidden, size_t(cfg.hidden) * 2), 0)
          << "rank " << r << " row " << row;
      for (int k = 0; k < Kp; ++k) {
        const int id = ids.as<int32_t>()[t * Kp + k];
        const int expect = (id >= 0 && id < cfg.n_routed_experts && id / E_loc == r) ? id % E_loc : -1;
        ASSERT_EQ(rank.recv_topk_ids().as<int32_t>()[row * Kp + k], expect);
      }
      ++row;
    }
    ASSERT_EQ(rank.recv_x().shape()[0], row);
    for (int e = 0; e < E_loc; ++e) EXPECT_EQ(rank.recv_expert_counts().as<int32_t>()[e], counts[size_t(e)]);
    // Only real tokens: copies sent == distinct remote destinations of this rank's tokens, and the
    // bytes are exactly those copies (row + src + ids + weights), never padding.
    const EpTraffic& tr = rank.last_traffic();
    EXPECT_EQ(tr.dispatch_tokens, copies);
    const int64_t record = (cfg.hidden * 2 + 4 + 8 * Kp + 7) / 8 * 8;
    EXPECT_EQ(tr.dispatch_bytes, copies * record);
    if (n == 0) {
      EXPECT_EQ(tr.dispatch_bytes, 0);
    }
  });
}

// Low-latency receive layout: masked [E_loc, R*T_max, H] rows in (source rank, token, slot)
// order, recv_count and recv_src exact; the halves called one by one.
TEST(ExpertParallel, LowLatencyLayoutAndHalves) {
  const MoeConfig cfg = small_config(0, false);
  const MoeWeights wts = random_moe_weights(cfg, 5);
  std::mt19937_64 rng(fresh_seed());
  const int R = 2, E_loc = 16, Kp = cfg.num_slots();
  const int64_t t_max = 16;
  const std::vector<int64_t> tokens = {3, 16};
  Tensor x = testing::random_tensor(DType::kBF16, {19, cfg.hidden}, rng);
  Tensor ids, w;
  random_routing(cfg, 19, rng, &ids, &w);
  const Tensor ref = moe_experts_cpu(wts, x, ids, w, 1);
  const EpConfig ep{.num_ranks = R, .mode = EpMode::kLowLatency, .max_tokens_per_rank = t_max};
  ThreadGroup group(R);
  group.run([&](Communicator& comm) {
    const int r = comm.rank();
    const int64_t t0 = r == 0 ? 0 : 3, n = tokens[size_t(r)];
    EpRankCpu rank(comm, wts, ep);
    TensorView xr{x.as<bf16>() + t0 * cfg.hidden, {n, cfg.hidden}, DType::kBF16, Device::kCpu};
    rank.ll_dispatch_send(xr, TensorView{ids.as<int32_t>() + t0 * Kp, {n, Kp}, DType::kI32, Device::kCpu},
                          TensorView{w.as<float>() + t0 * Kp, {n, Kp}, DType::kF32, Device::kCpu});
    rank.ll_dispatch_recv();
    ASSERT_EQ(rank.recv_x().shape(), Shape({E_loc, R * t_max, cfg.hidden}));
    std::vector<int32_t> expect_count(size_t(E_loc), 0);
    for (int64_t t = 0; t < 19; ++t)
      for (int k = 0; k < Kp; ++k) {
        const int id = ids.as<int32_t>()[t * Kp + k];
        if (id < 0 || id / E_loc != r) continue;
        const int e = id % E_loc;
        const int64_t row = expect_count[size_t(e)]++;
        const int32_t* src = rank.recv_src().as<int32_t>() + (e * R * t_max + row) * 3;
        const int src_rank = t < 3 ? 0 : 1;
        ASSERT_EQ(src[0], src_rank);
        ASSERT_EQ(src[1], t - (src_rank ? 3 : 0));
        ASSERT_EQ(src[2], k);
        ASSERT_EQ(std::memcmp(rank.recv_x().as<bf16>() + (e * R * t_max + row) * cfg.hidden,
                              x.as<bf16>() + t * cfg.hidden, size_t(cfg.hidden) * 2), 0);
      }
    for (int e = 0; e < E_loc; ++e) EXPECT_EQ(rank.recv_count().as<int32_t>()[e], expect_count[size_t(e)]);
    rank.ll_experts();
    rank.ll_combine_send();
    Tensor y(DType::kF32, {n, cfg.hidden});
    rank.ll_combine_recv(y);
    TensorView ref_r{ref.as<float>() + t0 * cfg.hidden, {n, cfg.hidden}, DType::kF32, Device::kCpu};
    EXPECT_EQ(testing::first_mismatch(y, ref_r), -1);
  });
}

TEST(ExpertParallel, SilentPeerTimesOutNamingIt) {
  const MoeConfig cfg = small_config(0, false);
  const MoeWeights wts = random_moe_weights(cfg, 9);
  std::mt19937_64 rng(fresh_seed());
  Tensor x = testing::random_tensor(DType::kBF16, {4, cfg.hidden}, rng);
  Tensor ids, w;
  random_routing(cfg, 4, rng, &ids, &w);
  const EpConfig ep{.num_ranks = 4, .mode = EpMode::kLowLatency, .max_tokens_per_rank = 4};
  ThreadGroup group(4);
  const auto start = std::chrono::steady_clock::now();
  try {
    group.run([&](Communicator& comm) {
      comm.set_wait_timeout_ms(300);
      EpRankCpu rank(comm, wts, ep);
      if (comm.rank() == 1) return;  // never sends
      rank.ll_dispatch_send(x, ids, w);
      rank.ll_dispatch_recv();
    });
    FAIL() << "a silent peer went unnoticed";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kTimeout);
    EXPECT_NE(std::string(e.what()).find("peer 1"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("expected"), std::string::npos) << e.what();
  }
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));

  // Normal mode: a rank that skips the collective is named by the barrier.
  const EpConfig ep_n{.num_ranks = 2, .mode = EpMode::kNormal, .max_tokens_per_rank = 4};
  ThreadGroup g2(2);
  try {
    g2.run([&](Communicator& comm) {
      comm.set_wait_timeout_ms(300);
      EpRankCpu rank(comm, wts, ep_n);
      if (comm.rank() == 1) return;
      rank.normal_dispatch(x, ids, w);
    });
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kTimeout);
    EXPECT_NE(std::string(e.what()).find("missing 1"), std::string::npos) << e.what();
  }
}

TEST(ExpertParallel, BadInputIsRejected) {
  const MoeConfig cfg = small_config(0, false);
  const MoeWeights wts = random_moe_weights(cfg, 11);
  std::mt19937_64 rng(fresh_seed());
  Tensor x = testing::random_tensor(DType::kBF16, {9, cfg.hidden}, rng);
  Tensor ids, w;
  random_routing(cfg, 9, rng, &ids, &w);
  auto expect_error = [&](const EpConfig& ep, const Tensor& i, const char* needle) {
    ThreadGroup g(ep.num_ranks);
    try {
      g.run([&](Communicator& comm) {
        comm.set_wait_timeout_ms(500);
        EpRankCpu rank(comm, wts, ep);
        rank.forward(x, i, w);
      });
      ADD_FAILURE() << "accepted; expected an error with '" << needle << "'";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_error(EpConfig{.num_ranks = 2, .mode = EpMode::kNormal, .max_tokens_per_rank = 8}, ids,
               "brings 9 tokens, more than max_tokens_per_rank = 8");
  Tensor bad = to_dtype(ids, DType::kI32);
  bad.as<int32_t>()[6] = 40;
  expect_error(EpConfig{.num_ranks = 1, .mode = EpMode::kLowLatency, .max_tokens_per_rank = 16},
               bad, "topk_ids[1, 2] = 40 is outside [-1, 32)");
  EXPECT_THROW(
      (EpConfig{.num_ranks = 3, .mode = EpMode::kNormal, .max_tokens_per_rank = 4}.validate(cfg)),
      Error);
}

TEST(ExpertParallel, RankRangesAlongTheTree) {
  EXPECT_TRUE(ep_ranks_are_tree_nodes(256, 8));
  EXPECT_TRUE(ep_ranks_are_tree_nodes(48, 16));
  EXPECT_FALSE(ep_ranks_are_tree_nodes(48, 3));
  EXPECT_TRUE(ep_ranks_are_tree_nodes(160, 32));
}

}  // namespace
}  // namespace epmoe
