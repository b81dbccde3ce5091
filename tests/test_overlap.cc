// Overlap on the CPU reference (DESIGN §6, §8): the executor's stage order for d = 0, 1, 2; the
// micro-batch split; every strategy bitwise equal to `none` and to one rank across modes and
// rank counts; operations refused out of order; a peer that skips micro-batch B named in a
// bounded error.
#include <gtest/gtest.h>

#include <chrono>
#include <string>
#include <vector>

#include "epmoe/comm/thread_comm.h"
#include "epmoe/layer/layer_rank_cpu.h"
#include "epmoe/layer/layer_runner_cpu.h"
#include "epmoe/layer/moe_layer_cpu.h"
#include "epmoe/overlap/executor.h"
#include "tests/ep_test_util.h"
#include "tests/test_util.h"

namespace epmoe {
namespace {

using testing::fresh_seed;

constexpr OverlapKind kAllKinds[] = {OverlapKind::kNone, OverlapKind::kTbo, OverlapKind::kSbo};
constexpr EpMode kAllModes[] = {EpMode::kNormal, EpMode::kLowLatency};

// ---------------------------------------------------------------------------------------------
// micro_batch_range

TEST(MicroBatchRange, CoversTheTokensInTwoContiguousHalves) {
  for (SplitRule rule : {SplitRule::kHalves, SplitRule::kBalanced})
    for (int rank = 0; rank < 4; ++rank)
      for (int64_t T = 0; T <= 9; ++T) {
        SCOPED_TRACE(::testing::Message()
                     << "T " << T << " rank " << rank << " rule " << int(rule));
        const TokenRange one = micro_batch_range(T, 1, 0, rule, rank);
        EXPECT_EQ(one.begin, 0);
        EXPECT_EQ(one.end, T);
        const TokenRange a = micro_batch_range(T, 2, 0, rule, rank);
        const TokenRange b = micro_batch_range(T, 2, 1, rule, rank);
        EXPECT_EQ(a.begin, 0);
        EXPECT_EQ(a.end, b.begin);
        EXPECT_EQ(b.end, T);
        // Decode: A takes the odd token; prefill: A on even ranks, B on odd ranks.
        const bool a_odd = rule == SplitRule::kHalves || rank % 2 == 0;
        EXPECT_EQ(a.size(), a_odd ? (T + 1) / 2 : T / 2);
      }
  // The awkward counts spelled out.
  EXPECT_EQ(micro_batch_range(0, 2, 0, SplitRule::kHalves, 0).size(), 0);
  EXPECT_EQ(micro_batch_range(0, 2, 1, SplitRule::kBalanced, 1).size(), 0);
  EXPECT_EQ(micro_batch_range(1, 2, 0, SplitRule::kHalves, 1).size(), 1);  // B empty
  EXPECT_EQ(micro_batch_range(1, 2, 1, SplitRule::kHalves, 1).size(), 0);
  EXPECT_EQ(micro_batch_range(1, 2, 0, SplitRule::kBalanced, 1).size(), 0);  // A empty
  EXPECT_EQ(micro_batch_range(1, 2, 1, SplitRule::kBalanced, 1).size(), 1);
  EXPECT_EQ(micro_batch_range(7, 2, 0, SplitRule::kHalves, 0).size(), 4);
  EXPECT_EQ(micro_batch_range(7, 2, 1, SplitRule::kBalanced, 3).size(), 4);
}

TEST(MicroBatchRange, BalancedSplitEvensOddCountsAcrossRanks) {
  const std::vector<int64_t> tokens = {7, 3, 1, 9, 5, 11};  // all odd
  int64_t a = 0, b = 0, ha = 0, hb = 0;
  for (int r = 0; r < int(tokens.size()); ++r) {
    a += micro_batch_range(tokens[size_t(r)], 2, 0, SplitRule::kBalanced, r).size();
    b += micro_batch_range(tokens[size_t(r)], 2, 1, SplitRule::kBalanced, r).size();
    ha += micro_batch_range(tokens[size_t(r)], 2, 0, SplitRule::kHalves, r).size();
    hb += micro_batch_range(tokens[size_t(r)], 2, 1, SplitRule::kHalves, r).size();
  }
  EXPECT_EQ(a, b);
  EXPECT_EQ(ha - hb, 6);  // halves hand every odd token to A
}

TEST(MicroBatchRange, RefusesBadArguments) {
  EXPECT_THROW(micro_batch_range(-1, 2, 0, SplitRule::kHalves, 0), Error);
  EXPECT_THROW(micro_batch_range(4, 3, 0, SplitRule::kHalves, 0), Error);
  EXPECT_THROW(micro_batch_range(4, 2, 2, SplitRule::kHalves, 0), Error);
  EXPECT_THROW(micro_batch_range(4, 1, 1, SplitRule::kHalves, 0), Error);
}

// ---------------------------------------------------------------------------------------------
// The executor's stage order (DESIGN §6), recorded from a fake layer.

// Records every call the executor makes.
class RecordingLayer final : public MoeLayerRank {
 public:
  int rank() const override { return 0; }
  int num_ranks() const override { return 1; }
  const MoeConfig& config() const override { return cfg_; }
  const EpConfig& ep() const override { return ep_; }
  int max_micro_batches() const override { return 2; }
  void begin_forward(const ForwardPlan& plan) override {
    calls.push_back("begin/" + std::to_string(plan.num_micro_batches));
  }
  void run(LayerOp op, int mb) override { calls.push_back(tag(mb) + layer_op_name(op)); }
  void run_user(const std::string& name, int mb, const std::function<void(int)>& fn) override {
    calls.push_back(tag(mb) + name);
    fn(mb);
  }
  void end_forward() override { calls.push_back("end"); }
  void set_tracing(bool) override {}
  std::vector<OpTiming> last_trace() override { return {}; }

  static std::string tag(int mb) { return mb == 0 ? "A:" : "B:"; }
  std::vector<std::string> calls;

 private:
  MoeConfig cfg_;
  EpConfig ep_;
};

UserOps all_user_ops() {
  auto nop = [](int) {};
  return UserOps{nop, nop, nop, nop};
}

// The stages of a list as DESIGN §6 writes them, and the order the executor must visit them in:
// (micro-batch, stage index) pairs, flattened to "A:op" names between begin and end.
std::vector<std::string> expected_calls(const std::vector<std::vector<std::string>>& stages,
                                        const std::vector<std::pair<int, int>>& order, int nmb) {
  std::vector<std::string> out = {"begin/" + std::to_string(nmb)};
  for (const auto& [mb, st] : order)
    for (const std::string& op : stages[size_t(st)]) out.push_back(RecordingLayer::tag(mb) + op);
  out.push_back("end");
  return out;
}

// The seed-000 decode list (d = 2, combine_recv a stage of its own).
const std::vector<std::vector<std::string>> kDecodeStages = {
    {"attn_prepare"},
    {"attn_core", "mlp_prepare", "gate", "select_experts"},
    {"dispatch_send", "shared_experts"},
    {"dispatch_recv", "experts", "combine_send"},
    {"combine_recv"},
    {"output", "layer_postprocess"}};

std::vector<std::string> record(const Strategy& s) {
  RecordingLayer layer;
  execute(layer, s);
  // issue_order() is the same order without the begin/end calls.
  std::vector<std::string> issued = {"begin/" + std::to_string(s.plan.num_micro_batches)};
  for (const auto& [mb, name] : issue_order(s)) issued.push_back(RecordingLayer::tag(mb) + name);
  issued.push_back("end");
  EXPECT_EQ(layer.calls, issued);
  return layer.calls;
}

TEST(Executor, TboDecodeDeltaTwo) {
  const Strategy s = make_strategy(OverlapKind::kTbo, EpMode::kLowLatency, all_user_ops());
  EXPECT_EQ(s.delta, 2);
  // A runs 2 stages alone; then A, B alternate; then B runs its last 2 alone.
  const std::vector<std::pair<int, int>> order = {{0, 0}, {0, 1}, {0, 2}, {1, 0}, {0, 3}, {1, 1},
                                                  {0, 4}, {1, 2}, {0, 5}, {1, 3}, {1, 4}, {1, 5}};
  EXPECT_EQ(record(s), expected_calls(kDecodeStages, order, 2));
}

TEST(Executor, DeltaOne) {
  Strategy s = make_strategy(OverlapKind::kTbo, EpMode::kLowLatency, all_user_ops());
  s.delta = 1;
  const std::vector<std::pair<int, int>> order = {{0, 0}, {0, 1}, {1, 0}, {0, 2}, {1, 1}, {0, 3},
                                                  {1, 2}, {0, 4}, {1, 3}, {0, 5}, {1, 4}, {1, 5}};
  EXPECT_EQ(record(s), expected_calls(kDecodeStages, order, 2));
}

TEST(Executor, TboPrefillDeltaZero) {
  const Strategy s = make_strategy(OverlapKind::kTbo, EpMode::kNormal, all_user_ops());
  EXPECT_EQ(s.delta, 0);
  EXPECT_EQ(s.plan.split, SplitRule::kBalanced);
  const std::vector<std::vector<std::string>> stages = {
      {"attn_prepare", "attn_core", "mlp_prepare", "gate", "select_experts", "dispatch_send"},
      {"dispatch_recv", "experts", "combine_send"},
      {"shared_experts", "combine_recv", "output", "layer_postprocess"}};
  const std::vector<std::pair<int, int>> order = {{0, 0}, {1, 0}, {0, 1}, {1, 1}, {0, 2}, {1, 2}};
  EXPECT_EQ(record(s), expected_calls(stages, order, 2));
}

TEST(Executor, SingleBatchListsRunInOrder) {
  for (EpMode mode : kAllModes) {
    const Strategy none = make_strategy(OverlapKind::kNone, mode, all_user_ops());
    const Strategy sbo = make_strategy(OverlapKind::kSbo, mode, all_user_ops());
    std::vector<std::string> want_none = {"begin/1",       "A:attn_prepare", "A:attn_core",
                                          "A:mlp_prepare", "A:gate",         "A:select_experts"};
    std::vector<std::string> want_sbo = want_none;
    for (const char* op : {"shared_experts", "dispatch_send", "dispatch_recv", "experts",
                           "combine_send", "combine_recv", "output", "layer_postprocess"})
      want_none.push_back(std::string("A:") + op);
    // SBO (seed 001): the shared expert between the dispatch halves.
    for (const char* op : {"dispatch_send", "shared_experts", "dispatch_recv", "experts",
                           "combine_send", "combine_recv", "output", "layer_postprocess"})
      want_sbo.push_back(std::string("A:") + op);
    want_none.push_back("end");
    want_sbo.push_back("end");
    EXPECT_EQ(record(none), want_none);
    EXPECT_EQ(record(sbo), want_sbo);
  }
}

TEST(Executor, UserOpsAreOptionalAndDescribed) {
  const Strategy s = make_strategy(OverlapKind::kTbo, EpMode::kLowLatency);
  const auto stages = stages_of(s);
  ASSERT_EQ(stages.size(), 6u);
  EXPECT_TRUE(stages[0].empty());  // attention absent: the stage stays, empty
  EXPECT_NE(s.describe().find("tbo (d = 2)"), std::string::npos) << s.describe();
  EXPECT_THROW(parse_overlap("fast"), Error);
  EXPECT_EQ(parse_overlap("sbo"), OverlapKind::kSbo);
}

// ---------------------------------------------------------------------------------------------
// The real layer: its recorded trace is the executor's issue order.

TEST(Overlap, CpuLayerTraceIsTheIssueOrder) {
  const MoeConfig cfg = testing::small_config(1, true);
  const MoeWeights wts = random_moe_weights(cfg, fresh_seed());
  std::mt19937_64 rng(fresh_seed());
  const std::vector<int64_t> tokens = {5, 0};
  Tensor x = testing::random_tensor(DType::kBF16, {5, cfg.hidden}, rng);
  for (EpMode mode : kAllModes)
    for (OverlapKind kind : kAllKinds) {
      SCOPED_TRACE(fmt::format("{} {}", overlap_name(kind), ep_mode_name(mode)));
      const Strategy s = make_strategy(kind, mode, all_user_ops());
      const EpConfig ep{.num_ranks = 2, .mode = mode, .max_tokens_per_rank = 5};
      ThreadGroup group(2);
      group.run([&](Communicator& comm) {
        MoeLayerRankCpu layer(comm, wts, ep);
        const auto xs = split_rows(x, tokens);
        layer.set_input(xs[size_t(comm.rank())]);
        layer.set_tracing(true);
        execute(layer, s);
        const std::vector<OpTiming> trace = layer.last_trace();
        const auto order = issue_order(s);
        ASSERT_EQ(trace.size(), order.size());
        double last_end = 0;
        for (size_t i = 0; i < order.size(); ++i) {
          EXPECT_EQ(trace[i].micro_batch, order[i].first) << i;
          EXPECT_EQ(trace[i].name, order[i].second) << i;
          EXPECT_LE(trace[i].start_us, trace[i].end_us);
          EXPECT_LE(last_end, trace[i].start_us);  // one lane: no two operations at once
          last_end = trace[i].end_us;
        }
      });
    }
}

// ---------------------------------------------------------------------------------------------
// Bitwise: every strategy == none == one rank.

struct Variant {
  int n_shared;
  bool fuse, scale;
  DType x_dtype;
};

TEST(Overlap, EveryStrategyBitwiseEqualToNoneAndOneRank) {
  const uint64_t seed = fresh_seed();
  std::mt19937_64 rng(seed);
  for (Variant v : {Variant{1, false, false, DType::kBF16}, Variant{2, true, false, DType::kBF16},
                    Variant{1, true, true, DType::kF32}, Variant{0, false, false, DType::kBF16}}) {
    const MoeConfig cfg = testing::small_config(v.n_shared, v.fuse, v.scale);
    const MoeWeights wts = random_moe_weights(cfg, rng());
    for (int R : {1, 2, 4, 8}) {
      const int64_t t_max = 13;
      const std::vector<int64_t> tokens = testing::uneven_tokens(R, t_max, rng);
      int64_t T = 0;
      for (auto t : tokens) T += t;
      Tensor x = testing::random_tensor(v.x_dtype, {T, cfg.hidden}, rng);
      Tensor ids, w;
      testing::random_routing(cfg, T, rng, &ids, &w);
      const Tensor one_rank = moe_experts_cpu(wts, x, ids, w, 1);
      const auto inputs = testing::rank_inputs(x, &ids, &w, tokens);
      for (EpMode mode : kAllModes) {
        const EpConfig ep{.num_ranks = R, .mode = mode, .max_tokens_per_rank = t_max};
        Tensor none;
        for (OverlapKind kind : kAllKinds) {
          SCOPED_TRACE(fmt::format("seed {} R {} mode {} {} shared {} fuse {} scale {} tokens {}",
                                   seed, R, ep_mode_name(mode), overlap_name(kind), v.n_shared,
                                   v.fuse, v.scale, fmt::join(tokens, ",")));
          // Twice through the same layers: windows, flags and sequence numbers are reused.
          const LayerRunResult res =
              run_layer_cpu(wts, ep, inputs, LayerRunOptions{.overlap = kind, .iters = 2});
          const Tensor y = testing::gather_rows(res.y, cfg.hidden);
          if (kind == OverlapKind::kNone) none = testing::gather_rows(res.y, cfg.hidden);
          const int64_t bad = testing::first_mismatch(y, none);
          ASSERT_EQ(bad, -1) << "vs none: token " << bad / cfg.hidden << ", column "
                             << bad % cfg.hidden;
          const int64_t bad1 = testing::first_mismatch(y, one_rank);
          ASSERT_EQ(bad1, -1) << "vs one rank: token " << bad1 / cfg.hidden << ", column "
                              << bad1 % cfg.hidden;
        }
      }
    }
  }
}

// The gate in the layer (not a given routing), the preset shape, eight ranks with empty and
// one-token ranks; the traffic of a split forward is the traffic of the whole one.
TEST(Overlap, PresetWithGateEveryStrategyBitwise) {
  const MoeWeights wts = random_moe_weights(find_preset("deepseek-v3-tiny").config, fresh_seed());
  std::mt19937_64 rng(fresh_seed());
  const std::vector<int64_t> tokens = {30, 0, 17, 64, 1, 0, 9, 41};
  Tensor x = testing::random_tensor(DType::kBF16, {162, 256}, rng);
  const LayerResult ref = moe_forward_cpu(wts, x);
  const auto inputs = testing::rank_inputs(x, nullptr, nullptr, tokens);
  for (EpMode mode : kAllModes) {
    std::vector<EpTraffic> none_traffic;
    for (OverlapKind kind : kAllKinds) {
      SCOPED_TRACE(fmt::format("{} {}", overlap_name(kind), ep_mode_name(mode)));
      const LayerRunResult res = run_layer_cpu(wts, EpConfig{.num_ranks = 8, .mode = mode}, inputs,
                                               LayerRunOptions{.overlap = kind});
      const Tensor y = testing::gather_rows(res.y, 256);
      ASSERT_EQ(testing::first_mismatch(y, ref.y), -1);
      int64_t row = 0;
      for (int r = 0; r < 8; ++r) {
        const int64_t n = tokens[size_t(r)] * ref.topk_ids.shape()[1];
        EXPECT_TRUE(std::equal(res.topk_ids[size_t(r)].as<int32_t>(),
                               res.topk_ids[size_t(r)].as<int32_t>() + n,
                               ref.topk_ids.as<int32_t>() + row))
            << "rank " << r;
        row += n;
      }
      if (kind == OverlapKind::kNone) none_traffic = res.traffic;
      for (int r = 0; r < 8; ++r) {
        EXPECT_EQ(res.traffic[size_t(r)].dispatch_tokens, none_traffic[size_t(r)].dispatch_tokens);
        EXPECT_EQ(res.traffic[size_t(r)].dispatch_bytes, none_traffic[size_t(r)].dispatch_bytes);
        EXPECT_EQ(res.traffic[size_t(r)].combine_bytes, none_traffic[size_t(r)].combine_bytes);
      }
      EXPECT_EQ(res.traffic[1].dispatch_bytes, 0);  // an empty rank sends nothing
      EXPECT_NE(res.strategy.find(overlap_name(kind)), std::string::npos);
    }
  }
}

// An FP8 expert bank (block scales) through the layer: every strategy and rank count gives
// bitwise the output of the same bank dequantised to f32.
TEST(Overlap, Fp8BankEqualsItsDequantisedBank) {
  std::mt19937_64 rng(fresh_seed());
  for (bool fuse : {false, true}) {
    MoeConfig cfg = testing::small_config(1, fuse);
    cfg.moe_intermediate = 128;  // fused shared slices are whole 128-blocks
    const uint64_t wseed = rng();
    const MoeWeights fp8 = quantize_moe_weights_fp8(random_moe_weights(cfg, wseed));
    ASSERT_TRUE(fp8.fp8());
    const MoeWeights f32 =
        dequantize_moe_weights(quantize_moe_weights_fp8(random_moe_weights(cfg, wseed)));
    const std::vector<int64_t> tokens = {6, 0, 1, 9};
    Tensor x = testing::random_tensor(DType::kBF16, {16, cfg.hidden}, rng);
    Tensor ids, w;
    testing::random_routing(cfg, 16, rng, &ids, &w);
    const Tensor ref = moe_experts_cpu(f32, x, ids, w, 1);
    const auto inputs = testing::rank_inputs(x, &ids, &w, tokens);
    for (EpMode mode : kAllModes)
      for (OverlapKind kind : kAllKinds) {
        SCOPED_TRACE(fmt::format("fuse {} {} {}", fuse, ep_mode_name(mode), overlap_name(kind)));
        const LayerRunResult res = run_layer_cpu(fp8, EpConfig{.num_ranks = 4, .mode = mode},
                                                 inputs, LayerRunOptions{.overlap = kind});
        ASSERT_EQ(testing::first_mismatch(testing::gather_rows(res.y, cfg.hidden), ref), -1);
      }
  }
}

// ---------------------------------------------------------------------------------------------
// Misuse and faults.

TEST(Overlap, OperationsOutOfOrderAreRefused) {
  const MoeConfig cfg = testing::small_config(1, false);
  const MoeWeights wts = random_moe_weights(cfg, 21);
  std::mt19937_64 rng(fresh_seed());
  Tensor x = testing::random_tensor(DType::kBF16, {4, cfg.hidden}, rng);
  ThreadGroup group(1);
  group.run([&](Communicator& comm) {
    MoeLayerRankCpu layer(comm, wts, EpConfig{.num_ranks = 1, .max_tokens_per_rank = 4});
    auto expect_error = [](const std::function<void()>& f, const std::string& needle) {
      try {
        f();
        ADD_FAILURE() << "accepted; expected an error with '" << needle << "'";
      } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
      }
    };
    expect_error([&] { layer.begin_forward(ForwardPlan{}); }, "begin_forward before set_input");
    layer.set_input(x);
    layer.begin_forward(ForwardPlan{.num_micro_batches = 2});
    expect_error([&] { layer.run(LayerOp::kDispatchRecv, 1); },
                 "rank 0, micro-batch B, dispatch_recv");
    expect_error([&] { layer.run(LayerOp::kDispatchRecv, 1); }, "needs dispatch_send");
    expect_error([&] { layer.run(LayerOp::kOutput, 0); }, "needs combine_recv");
    expect_error([&] { layer.end_forward(); }, "micro-batch A's output has not run");
    expect_error([&] { (void)layer.output(); }, "no complete forward");
    layer.run(LayerOp::kGate, 0);
    expect_error([&] { layer.run(LayerOp::kGate, 0); }, "gate ran twice");
    layer.begin_forward(ForwardPlan{.num_micro_batches = 1});
    expect_error([&] { layer.run(LayerOp::kGate, 1); }, "the forward has 1");
    // A complete forward after the refused calls.
    execute(layer, make_strategy(OverlapKind::kSbo, EpMode::kNormal));
    EXPECT_EQ(layer.output().shape(), Shape({4, cfg.hidden}));
  });
}

// Rank 0 runs micro-batch A's operations of the strategy and stops; rank 1 must fail within its
// wait budget with an error that names micro-batch B, itself and the peer.
TEST(Overlap, PeerThatSkipsMicroBatchBIsNamed) {
  const MoeConfig cfg = testing::small_config(1, true);
  const MoeWeights wts = random_moe_weights(cfg, 23);
  std::mt19937_64 rng(fresh_seed());
  Tensor x = testing::random_tensor(DType::kBF16, {9, cfg.hidden}, rng);
  const std::vector<int64_t> tokens = {5, 4};
  for (EpMode mode : kAllModes) {
    SCOPED_TRACE(ep_mode_name(mode));
    const Strategy s = make_strategy(OverlapKind::kTbo, mode);
    const EpConfig ep{.num_ranks = 2, .mode = mode, .max_tokens_per_rank = 5};
    ThreadGroup group(2);
    const auto start = std::chrono::steady_clock::now();
    try {
      group.run([&](Communicator& comm) {
        comm.set_wait_timeout_ms(300);
        MoeLayerRankCpu layer(comm, wts, ep);
        layer.set_input(split_rows(x, tokens)[size_t(comm.rank())]);
        if (comm.rank() == 1) {
          execute(layer, s);
          return;
        }
        layer.begin_forward(s.plan);
        for (const auto& [mb, name] : issue_order(s))
          for (int op = 0; op < kNumLayerOps; ++op)
            if (mb == 0 && name == layer_op_name(LayerOp(op))) layer.run(LayerOp(op), 0);
      });
      ADD_FAILURE() << "a peer that skipped micro-batch B went unnoticed";
    } catch (const Error& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find("micro-batch B"), std::string::npos) << what;
      if (mode == EpMode::kLowLatency) {
        // The flag wait: "rank 1, micro-batch B, dispatch_recv: ... peer 0: expected ..."
        EXPECT_EQ(e.kind(), ErrorKind::kTimeout) << what;
        EXPECT_NE(what.find("rank 1, micro-batch B, dispatch_recv"), std::string::npos) << what;
        EXPECT_NE(what.find("from peer 0"), std::string::npos) << what;
        EXPECT_NE(what.find("expected"), std::string::npos) << what;
      } else {
        // The collective pairs B's dispatch counts with A's combine counts: named, not mixed.
        EXPECT_NE(what.find("different operation lists"), std::string::npos) << what;
        EXPECT_TRUE(what.find("peer 0") != std::string::npos ||
                    what.find("peer 1") != std::string::npos)
            << what;
      }
    }
    EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
  }
}

// A peer that never arrives at all: normal mode's count exchange names it (barrier).
TEST(Overlap, SilentPeerInNormalModeIsNamed) {
  const MoeConfig cfg = testing::small_config(0, false);
  const MoeWeights wts = random_moe_weights(cfg, 29);
  std::mt19937_64 rng(fresh_seed());
  Tensor x = testing::random_tensor(DType::kBF16, {3, cfg.hidden}, rng);
  ThreadGroup group(2);
  const auto start = std::chrono::steady_clock::now();
  try {
    group.run([&](Communicator& comm) {
      comm.set_wait_timeout_ms(300);
      MoeLayerRankCpu layer(comm, wts, EpConfig{.num_ranks = 2, .max_tokens_per_rank = 3});
      if (comm.rank() == 0) return;  // never forwards
      layer.set_input(x);
      execute(layer, make_strategy(OverlapKind::kTbo, EpMode::kNormal));
    });
    ADD_FAILURE() << "a silent peer went unnoticed";
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_EQ(e.kind(), ErrorKind::kTimeout) << what;
    EXPECT_NE(what.find("rank 1, micro-batch A, dispatch_recv"), std::string::npos) << what;
    EXPECT_NE(what.find("missing 0"), std::string::npos) << what;
  }
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
}

}  // namespace
}  // namespace epmoe
