// Token permutation (DESIGN §4) and the canonical reduction order: invariants, round trips,
// awkward cases, and the property that makes EP bitwise reproducible.
#include <gtest/gtest.h>

#include <algorithm>
#include <set>

#include "epmoe/permute/permute_cpu.h"
#include "epmoe/permute/reduce_plan.h"
#include "tests/test_util.h"

namespace epmoe {
namespace {

using testing::fresh_seed;

Tensor random_ids(int64_t T, int K, int num_ids, std::mt19937_64& rng, double p_invalid) {
  Tensor ids(DType::kI32, {T, K});
  std::uniform_int_distribution<int> e(0, num_ids - 1);
  std::bernoulli_distribution inv(p_invalid);
  for (int64_t i = 0; i < T * K; ++i) ids.as<int32_t>()[i] = inv(rng) ? -1 : e(rng);
  return ids;
}

struct Layout {
  Tensor seg, s2d;
};
Layout preprocess(const Tensor& ids, int start, int end) {
  Layout l{Tensor(DType::kI32, {end - start + 1}), Tensor(DType::kI32, ids.shape())};
  preprocess_cpu(l.seg, l.s2d, ids, start, end);
  return l;
}

TEST(Permute, PreprocessIsAStableSortByExpert) {
  std::mt19937_64 rng(fresh_seed());
  for (int64_t T : {0, 1, 7, 128, 1000}) {
    const int K = 9, E = 257;
    Tensor ids = random_ids(T, K, E + 20, rng, 0.1);  // some ids beyond the range too
    for (auto [start, end] : {std::pair{0, E}, std::pair{64, 96}}) {
      Layout l = preprocess(ids, start, end);
      const int32_t* seg = l.seg.as<int32_t>();
      const int32_t* s2d = l.s2d.as<int32_t>();
      const int32_t* id = ids.as<int32_t>();
      const int64_t n = seg[end - start];
      ASSERT_EQ(seg[0], 0);
      std::vector<int> seen(size_t(n), 0);
      std::vector<int64_t> last(size_t(end - start), -1);
      for (int64_t i = 0; i < T * K; ++i) {
        const bool in = id[i] >= start && id[i] < end;
        if (!in) {
          ASSERT_EQ(s2d[i], -1) << i;
          continue;
        }
        const int e = id[i] - start;
        ASSERT_GE(s2d[i], seg[e]);
        ASSERT_LT(s2d[i], seg[e + 1]);
        ASSERT_GT(s2d[i], last[size_t(e)]) << "not stable at pair " << i;
        last[size_t(e)] = s2d[i];
        ++seen[size_t(s2d[i])];
      }
      for (int64_t r = 0; r < n; ++r) ASSERT_EQ(seen[size_t(r)], 1) << "row " << r;
      for (int e = 0; e < end - start; ++e) ASSERT_LE(seg[e], seg[e + 1]);
    }
  }
}

TEST(Permute, PreReorderRoundTripsAndFp8Quantises) {
  std::mt19937_64 rng(fresh_seed());
  const int64_t T = 53, H = 200, K = 4;  // H not a multiple of 128
  Tensor x = testing::random_tensor(DType::kBF16, {T, H}, rng, 3.f);
  Tensor ids = random_ids(T, K, 16, rng, 0.2);
  Layout l = preprocess(ids, 0, 16);
  const int64_t n = l.seg.as<int32_t>()[16];
  Tensor sorted(DType::kBF16, {n, H});
  pre_reorder_cpu(sorted, x, l.s2d);
  for (int64_t i = 0; i < T * K; ++i) {
    const int32_t r = l.s2d.as<int32_t>()[i];
    if (r < 0) continue;
    ASSERT_EQ(std::memcmp(sorted.as<bf16>() + r * H, x.as<bf16>() + (i / K) * H, H * 2), 0);
  }
  Tensor q(DType::kF8E4M3, {n, H}), sc(DType::kF32, {n, 2});
  pre_reorder_fp8_cpu(q, sc, x, l.s2d);
  double num = 0, den = 0;
  for (int64_t i = 0; i < T * K; ++i) {
    const int32_t r = l.s2d.as<int32_t>()[i];
    if (r < 0) continue;
    for (int64_t j = 0; j < H; ++j) {
      const float v = bf16_to_f32(x.as<bf16>()[(i / K) * H + j]);
      const float d = fp8e4m3_to_f32(q.as<fp8e4m3>()[r * H + j]) * sc.as<float>()[r * 2 + j / 128];
      num += (d - v) * (d - v);
      den += v * v;
    }
  }
  EXPECT_LT(std::sqrt(num / den), 0.04);  // e4m3 has 3 mantissa bits
}

// post_reorder against a double-precision weighted sum, with -1 ids and empty tokens.
TEST(Permute, PostReorderWeightedSum) {
  std::mt19937_64 rng(fresh_seed());
  for (int64_t H : {1, 7, 256}) {
    const int64_t T = 41;
    const int K = 9, E = 32;
    Tensor ids = random_ids(T, K, E + 1, rng, 0.15);  // id E plays a fused shared expert
    for (int k = 0; k < K; ++k) ids.as<int32_t>()[5 * K + k] = -1;  // token 5: nothing
    Tensor w = testing::random_tensor(DType::kF32, {T, K}, rng);
    Layout l = preprocess(ids, 0, E + 1);
    const int64_t n = l.seg.as<int32_t>()[E + 1];
    Tensor down = testing::random_tensor(DType::kF32, {n, H}, rng);
    Tensor out(DType::kF32, {T, H});
    std::fill(out.as<float>(), out.as<float>() + T * H, NAN);  // poison
    post_reorder_cpu(out, down, l.s2d, ids, w, E);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j < H; ++j) {
        double ref = 0;
        for (int k = 0; k < K; ++k) {
          const int32_t r = l.s2d.as<int32_t>()[t * K + k];
          if (r >= 0) ref += double(w.as<float>()[t * K + k]) * down.as<float>()[r * H + j];
        }
        ASSERT_NEAR(out.as<float>()[t * H + j], ref, 1e-5 * (1 + std::fabs(ref))) << t << "," << j;
      }
    for (int64_t j = 0; j < H; ++j) EXPECT_EQ(out.as<float>()[5 * H + j], 0.f);
  }
}

// The canonical order: reducing per rank node and then across ranks gives the same bits as
// reducing all slots at once, for every power-of-two R dividing E (and for duplicate ids).
TEST(ReducePlan, RankPartialsReproduceTheSingleRankSum) {
  std::mt19937_64 rng(fresh_seed());
  std::uniform_real_distribution<float> val(-10.f, 10.f);
  for (int E : {8, 48, 256}) {
    for (int trial = 0; trial < 300; ++trial) {
      const int K = 1 + int(rng() % 12), n_shared = int(rng() % 3);
      std::vector<int> ids(size_t(K + n_shared));
      std::vector<float> v(ids.size());
      for (int k = 0; k < K; ++k) ids[size_t(k)] = int(rng() % 6 == 0 ? -1 : rng() % E);
      for (int j = 0; j < n_shared; ++j) ids[size_t(K + j)] = E + j;
      for (auto& x : v) x = val(rng) * std::pow(10.f, float(int(rng() % 7) - 3));
      auto reduce = [&](const std::vector<int>& keys, std::vector<float> acc) {
        ReducePlan p;
        plan_reduce(p, keys.data(), int(keys.size()), E);
        for (int m = 0; m < p.num_merges; ++m) acc[size_t(p.dst[m])] += acc[size_t(p.src[m])];
        return p.root < 0 ? 0.f : acc[size_t(p.root)];
      };
      const float single = reduce(ids, v);
      for (int R = 1; R <= E; R *= 2) {
        if (E % R) break;
        const int e_loc = E / R;
        std::vector<int> keys;
        std::vector<float> parts;
        for (int r = 0; r < R; ++r) {
          std::vector<int> local(ids.size(), -1);
          bool any = false;
          for (size_t k = 0; k < ids.size(); ++k)
            if (ids[k] >= r * e_loc && ids[k] < (r + 1) * e_loc) local[k] = ids[k], any = true;
          if (!any) continue;
          keys.push_back(r * e_loc);
          parts.push_back(reduce(local, v));
        }
        for (size_t k = 0; k < ids.size(); ++k)
          if (ids[k] >= E) keys.push_back(ids[k]), parts.push_back(v[k]);
        const float ep = reduce(keys, parts);
        ASSERT_EQ(std::memcmp(&ep, &single, 4), 0) << "E=" << E << " R=" << R << " trial " << trial;
      }
    }
  }
}

TEST(Permute, BadInputNamesTheProblem) {
  Tensor ids(DType::kI32, {2, 2});
  Tensor seg(DType::kI32, {5}), s2d(DType::kI32, {2, 3});
  EXPECT_THROW(preprocess_cpu(seg, s2d, ids, 0, 4), Error);  // src2dst shape
  Tensor x(DType::kBF16, {2, 8}), sorted(DType::kBF16, {1, 8}), good(DType::kI32, {2, 2});
  good.as<int32_t>()[0] = 0;
  good.as<int32_t>()[1] = 5;  // row 5 of a 1-row buffer
  good.as<int32_t>()[2] = good.as<int32_t>()[3] = -1;
  try {
    pre_reorder_cpu(sorted, x, good);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("src2dst[0, 1] = 5"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace epmoe
