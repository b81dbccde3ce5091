// Expert parallelism on the CPU backend (DESIGN §5), one micro-batch's protocol
// (EpMicroBatchCpu): receive layouts of both modes, only real tokens on the wire, the halves
// called one by one, bounded waits, bad input, the canonical sum split in two. (Whole layers
// under every strategy and rank count: test_overlap.cc.)
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <set>

#include "epmoe/comm/thread_comm.h"
#include "epmoe/ep/ep_cpu.h"
#include "epmoe/layer/layer_rank_cpu.h"
#include "epmoe/layer/layer_runner_cpu.h"
#include "epmoe/layer/moe_layer_cpu.h"
#include "epmoe/permute/reduce_plan.h"
#include "tests/ep_test_util.h"
#include "tests/test_util.h"

namespace epmoe {
namespace {

using testing::fresh_seed;
using testing::random_routing;
using testing::small_config;

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
    EpMicroBatchCpu rank(comm, wts, ep, EpMicroBatchDesc{.index = 0, .capacity = 64});
    rank.dispatch_send(
        TensorView{x.as<bf16>() + t0 * cfg.hidden, {n, cfg.hidden}, DType::kBF16, Device::kCpu},
        TensorView{ids.as<int32_t>() + t0 * Kp, {n, Kp}, DType::kI32, Device::kCpu},
        TensorView{w.as<float>() + t0 * Kp, {n, Kp}, DType::kF32, Device::kCpu});
    EXPECT_EQ(rank.traffic().dispatch_bytes, 0);  // the send half packs; nothing moved yet
    rank.dispatch_recv();
    // Expected: walk all tokens in global (= source rank, token) order.
    int64_t row = 0, copies = 0;
    std::vector<int32_t> counts(size_t(E_loc), 0);
    for (int64_t t = 0; t < 34; ++t) {
      bool mine = false;
      int src = 0;
      for (int64_t acc = tokens[0]; t >= acc; acc += tokens[size_t(++src)]) {
      }
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
                            x.as<bf16>() + t * cfg.hidden, size_t(cfg.hidden) * 2),
                0)
          << "rank " << r << " row " << row;
      for (int k = 0; k < Kp; ++k) {
        const int id = ids.as<int32_t>()[t * Kp + k];
        const int expect =
            (id >= 0 && id < cfg.n_routed_experts && id / E_loc == r) ? id % E_loc : -1;
        ASSERT_EQ(rank.recv_topk_ids().as<int32_t>()[row * Kp + k], expect);
      }
      ++row;
    }
    ASSERT_EQ(rank.recv_x().shape()[0], row);
    for (int e = 0; e < E_loc; ++e)
      EXPECT_EQ(rank.recv_expert_counts().as<int32_t>()[e], counts[size_t(e)]);
    // Only real tokens: copies sent == distinct remote destinations of this rank's tokens, and the
    // bytes are exactly those copies (row + src + ids + weights), never padding.
    const EpTraffic& tr = rank.traffic();
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
    EpMicroBatchCpu rank(comm, wts, ep, EpMicroBatchDesc{.index = 1, .capacity = t_max});
    TensorView xr{x.as<bf16>() + t0 * cfg.hidden, {n, cfg.hidden}, DType::kBF16, Device::kCpu};
    rank.dispatch_send(xr,
                       TensorView{ids.as<int32_t>() + t0 * Kp, {n, Kp}, DType::kI32, Device::kCpu},
                       TensorView{w.as<float>() + t0 * Kp, {n, Kp}, DType::kF32, Device::kCpu});
    rank.dispatch_recv();
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
                              x.as<bf16>() + t * cfg.hidden, size_t(cfg.hidden) * 2),
                  0);
      }
    for (int e = 0; e < E_loc; ++e)
      EXPECT_EQ(rank.recv_count().as<int32_t>()[e], expect_count[size_t(e)]);
    rank.experts();
    rank.combine_send();
    Tensor y(DType::kF32, {n, cfg.hidden});
    std::vector<uint8_t> has_routed;
    rank.combine_recv(y, &has_routed);
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
      EpMicroBatchCpu rank(comm, wts, ep, EpMicroBatchDesc{.index = 0, .capacity = 4});
      if (comm.rank() == 1) return;  // never sends
      rank.dispatch_send(x, ids, w);
      rank.dispatch_recv();
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
      EpMicroBatchCpu rank(comm, wts, ep_n, EpMicroBatchDesc{.index = 1, .capacity = 4});
      if (comm.rank() == 1) return;
      rank.dispatch_send(x, ids, w);  // packs without waiting for the silent peer
      rank.dispatch_recv();
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
        MoeLayerRankCpu layer(comm, wts, ep);
        layer.set_input(x, i, w);
        execute(layer, make_strategy(OverlapKind::kTbo, ep.mode));
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

// The layer adds fused shared slots after combine_recv's routed sum (the shared expert may run
// after it): that must group exactly as one canonical sum over every slot does.
TEST(ExpertParallel, SharedTermsAfterTheRoutedSumMatchOneSum) {
  std::mt19937_64 rng(fresh_seed());
  const int E = 32, H = 8;
  std::normal_distribution<float> d(0.f, 1.f);
  std::vector<float> acc;
  for (int trial = 0; trial < 2000; ++trial) {
    const int n_routed = int(rng() % 7), n_shared = int(rng() % 3);
    std::vector<std::vector<float>> rows(size_t(n_routed + n_shared), std::vector<float>(H));
    for (auto& r : rows)
      for (float& v : r) v = d(rng);
    std::vector<ReduceTerm> all, routed, shared;
    for (int i = 0; i < n_routed + n_shared; ++i) {
      const bool is_shared = i >= n_routed;
      const int key = is_shared ? E + int(rng() % 2) : (rng() % 8 == 0 ? -1 : int(rng() % E));
      const ReduceTerm t{key, rows[size_t(i)].data(), d(rng), false};
      all.push_back(t);
      (is_shared ? shared : routed).push_back(t);
    }
    std::vector<float> one(H), part(H), two(H);
    reduce_terms_cpu(one.data(), H, E, all.data(), int(all.size()), acc);
    reduce_terms_cpu(part.data(), H, E, routed.data(), int(routed.size()), acc);
    std::vector<ReduceTerm> rest;
    bool any_routed = false;
    for (const auto& t : routed) any_routed |= t.key >= 0;
    if (any_routed) rest.push_back(ReduceTerm{0, part.data(), 1.f, true});
    rest.insert(rest.end(), shared.begin(), shared.end());
    reduce_terms_cpu(two.data(), H, E, rest.data(), int(rest.size()), acc);
    ASSERT_EQ(std::memcmp(one.data(), two.data(), sizeof(float) * H), 0) << "trial " << trial;
  }
}

TEST(ExpertParallel, RankRangesAlongTheTree) {
  EXPECT_TRUE(ep_ranks_are_tree_nodes(256, 8));
  EXPECT_TRUE(ep_ranks_are_tree_nodes(48, 16));
  EXPECT_FALSE(ep_ranks_are_tree_nodes(48, 3));
  EXPECT_TRUE(ep_ranks_are_tree_nodes(160, 32));
}

}  // namespace
}  // namespace epmoe
