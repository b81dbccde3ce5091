// The whole layer on the CPU path against the golden files (an independent implementation):
// relative L2 < 1e-5 and exact expert-id sets, single rank; split across ranks under every
// overlap strategy, bitwise the single-rank output.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>

#include "epmoe/layer/layer_runner_cpu.h"
#include "epmoe/layer/moe_layer_cpu.h"
#include "epmoe/weights/moe_weights.h"
#include "epmoe/weights/safetensors.h"
#include "tests/test_util.h"

namespace epmoe {
namespace {

class GoldenLayer : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    path_ = testing::golden_dir() + "/" + GetParam() + ".safetensors";
    if (!std::filesystem::exists(path_)) GTEST_SKIP() << "golden file not found: " << path_;
  }
  std::string path_;
};

int64_t tokens_with_different_ids(const TensorView& ids, const TensorView& ref_ids, int K) {
  int64_t bad = 0;
  const int64_t T = ids.shape[0], ka = ids.shape[1], kb = ref_ids.shape[1];
  for (int64_t t = 0; t < T; ++t) {
    std::vector<int> a(ids.as<int32_t>() + t * ka, ids.as<int32_t>() + t * ka + K);
    std::vector<int> b(ref_ids.as<int32_t>() + t * kb, ref_ids.as<int32_t>() + t * kb + K);
    std::sort(a.begin(), a.end());
    std::sort(b.begin(), b.end());
    bad += a != b;
  }
  return bad;
}

TEST_P(GoldenLayer, CpuPathMatchesSingleRankAndSplit) {
  SafetensorsFile file(path_);
  const Tensor expected = to_f32(file.tensor("output"));
  const Tensor exp_ids = to_dtype(file.tensor("topk_ids"), DType::kI32);
  const Tensor exp_w = to_f32(file.tensor("topk_weights"));
  const TensorView x = file.tensor("input");
  for (bool fuse : {false, true}) {
    SCOPED_TRACE(fuse ? "fused shared expert" : "separate shared expert");
    MoeConfig cfg = config_from_safetensors_metadata(file);
    cfg.fuse_shared = fuse;
    const MoeWeights w = load_moe_weights(file, cfg);
    const LayerResult r = moe_forward_cpu(w, x);
    const int64_t n = expected.numel();
    EXPECT_LT(testing::rel_l2(r.y.as<float>(), expected.as<float>(), n), 1e-5);
    EXPECT_EQ(tokens_with_different_ids(r.topk_ids, exp_ids, cfg.top_k), 0);
    // Weights, matched by id.
    const int K = cfg.top_k, kp = cfg.num_slots();
    for (int64_t t = 0; t < x.shape[0]; ++t)
      for (int k = 0; k < K; ++k)
        for (int j = 0; j < K; ++j)
          if (exp_ids.as<int32_t>()[t * K + j] == r.topk_ids.as<int32_t>()[t * kp + k]) {
            EXPECT_NEAR(r.topk_weights.as<float>()[t * kp + k], exp_w.as<float>()[t * K + j], 1e-6);
          }

    // Split over ranks, unevenly, with empty ranks: bitwise the single-rank output.
    const int64_t T = x.shape[0];
    for (int R : {2, 4, 8}) {
      if (cfg.n_routed_experts % R) continue;
      std::vector<int64_t> tokens(size_t(R), 0);
      tokens[0] = T / 3;
      tokens[size_t(R - 1)] = T - T / 3;  // middle ranks empty
      if (R > 2) std::swap(tokens[0], tokens[1]);
      std::vector<RankInput> inputs;
      for (const TensorView& xr : split_rows(x, tokens)) inputs.push_back(RankInput{.x = xr});
      for (EpMode mode : {EpMode::kNormal, EpMode::kLowLatency})
        for (OverlapKind kind : {OverlapKind::kNone, OverlapKind::kTbo, OverlapKind::kSbo}) {
          // Every strategy at R = 8; the others at one rank count each (cheap enough).
          if (kind != OverlapKind::kNone && R != 8) continue;
          const LayerRunResult res = run_layer_cpu(w, EpConfig{.num_ranks = R, .mode = mode},
                                                   inputs, LayerRunOptions{.overlap = kind});
          int64_t row = 0;
          for (int rk = 0; rk < R; ++rk) {
            const int64_t nr = tokens[size_t(rk)];
            TensorView ref_r{
                r.y.as<float>() + row * cfg.hidden, {nr, cfg.hidden}, DType::kF32, Device::kCpu};
            ASSERT_EQ(testing::first_mismatch(res.y[size_t(rk)], ref_r), -1)
                << "R " << R << " " << ep_mode_name(mode) << " " << overlap_name(kind) << " rank "
                << rk;
            row += nr;
          }
        }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Golden, GoldenLayer,
                         ::testing::Values("dsv3_small_grouped", "dsv3_routing_256e",
                                           "ungrouped_2shared_noscale", "dsv3_fp8_block128"));

}  // namespace
}  // namespace epmoe
