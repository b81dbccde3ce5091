// CUDA preprocess / pre_reorder / post_reorder vs permute_cpu: layouts bitwise, sums bitwise
// (f32 output: the same f32 operations in the same tree order) or by relative L2 (bf16 output).
#include "epmoe/core/config.h"
#include "epmoe/cuda/cuda_check.h"
#include "epmoe/permute/permute.cuh"
#include "epmoe/permute/permute_cpu.h"
#include "tests/gpu/test_common.h"

namespace epmoe::cuda {
namespace {

using testing::bitwise_equal;
using testing::fresh_seed;
using testing::poisoned;
using testing::random_tensor;

enum class Routing { kUniform, kSkewed, kWithInvalid };

// topk_ids [T, K]: distinct ids per token from [0, num_ids) (uniform), all tokens on expert 3
// for slot 0 (skewed: every slot of a token then takes consecutive ids), or with ~15% -1 ids.
Tensor make_ids(int64_t T, int K, int num_ids, Routing r, std::mt19937_64& rng) {
  Tensor ids(DType::kI32, {T, K});
  std::uniform_int_distribution<int> pick(0, num_ids - 1);
  std::uniform_real_distribution<float> coin(0.f, 1.f);
  for (int64_t t = 0; t < T; ++t) {
    int32_t* row = ids.as<int32_t>() + t * K;
    for (int k = 0; k < K; ++k) {
      if (r == Routing::kSkewed) {
        row[k] = (3 + k) % num_ids;
        continue;
      }
      int id;
      bool dup;
      do {
        id = pick(rng);
        dup = false;
        for (int j = 0; j < k; ++j) dup |= row[j] == id;
      } while (dup && K <= num_ids);
      row[k] = (r == Routing::kWithInvalid && coin(rng) < 0.15f) ? -1 : id;
    }
  }
  return ids;
}

struct PermCase {
  int K, num_ids, start, end;
};

void check_preprocess(const Tensor& ids, int start, int end, const std::string& label) {
  SCOPED_TRACE(label);
  const int64_t T = ids.shape()[0], K = ids.shape()[1];
  const int e_loc = end - start;
  Tensor seg_ref(DType::kI32, {e_loc + 1}), s2d_ref(DType::kI32, {T, K});
  preprocess_cpu(seg_ref, s2d_ref, ids, start, end);
  DeviceTensor d_ids = DeviceTensor::from_host(ids);
  DeviceTensor seg = poisoned(DType::kI32, {e_loc + 1}), s2d = poisoned(DType::kI32, {T, K});
  DeviceTensor ws =
      poisoned(DType::kI32, {int64_t(preprocess_workspace_bytes(T * K, e_loc) / 4) + 1});
  preprocess(seg.view(), s2d.view(), d_ids.view(), start, end, ws.view().data, nullptr);
  EPMOE_CUDA_CHECK(cudaDeviceSynchronize());
  EXPECT_TRUE(bitwise_equal(seg.to_host(), seg_ref, "seg_indptr"));
  EXPECT_TRUE(bitwise_equal(s2d.to_host(), s2d_ref, "src2dst"));
}

TEST(GpuPermute, PreprocessMatchesCpu) {
  EPMOE_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  std::vector<PermCase> cases;
  for (const Preset& p : presets()) {  // every preset's routing shape (+ fused shared slots)
    const MoeConfig& c = p.config;
    cases.push_back({c.top_k, c.n_routed_experts, 0, c.n_routed_experts});
    if (c.n_shared_experts)
      cases.push_back({c.top_k + c.n_shared_experts, c.n_routed_experts + c.n_shared_experts, 0,
                       c.n_routed_experts + c.n_shared_experts});
  }
  cases.push_back({8, 256, 64, 96});     // an EP rank's range: other ids get -1
  cases.push_back({8, 256, 100, 100});   // empty range
  cases.push_back({32, 1000, 0, 1000});  // many experts, max slots
  for (const PermCase& c : cases)
    for (Routing r : {Routing::kUniform, Routing::kSkewed, Routing::kWithInvalid})
      for (int64_t T : testing::token_sweep()) {
        Tensor ids = make_ids(T, c.K, c.num_ids, r, rng);
        check_preprocess(ids, c.start, c.end,
                         "K=" + std::to_string(c.K) + " ids=" + std::to_string(c.num_ids) +
                             " range=[" + std::to_string(c.start) + "," + std::to_string(c.end) +
                             ") routing=" + std::to_string(int(r)) + " T=" + std::to_string(T));
      }
}

// Runs preprocess on the CPU (already checked above) and both reorders on the GPU.
void check_reorders(int64_t T, int64_t H, int K, int num_ids, Routing r, std::mt19937_64& rng) {
  const std::string label = "T=" + std::to_string(T) + " H=" + std::to_string(H) +
                            " K=" + std::to_string(K) + " routing=" + std::to_string(int(r));
  SCOPED_TRACE(label);
  Tensor ids = make_ids(T, K, num_ids, r, rng);
  Tensor seg(DType::kI32, {num_ids + 1}), s2d(DType::kI32, {T, K});
  preprocess_cpu(seg, s2d, ids, 0, num_ids);
  const int64_t N = seg.as<int32_t>()[num_ids];
  Tensor x = random_tensor(DType::kBF16, {T, H}, rng, 3.f);
  DeviceTensor dx = DeviceTensor::from_host(x), ds2d = DeviceTensor::from_host(s2d);
  DeviceTensor dids = DeviceTensor::from_host(ids);

  // pre_reorder (bf16): bitwise.
  Tensor sorted_ref(DType::kBF16, {N, H});
  pre_reorder_cpu(sorted_ref, x, s2d);
  DeviceTensor sorted = poisoned(DType::kBF16, {N, H});
  pre_reorder(sorted.view(), dx.view(), ds2d.view(), nullptr);
  // FP8 with per-128 scales: bitwise.
  const int64_t nb = (H + 127) / 128;
  Tensor q_ref(DType::kF8E4M3, {N, H}), sc_ref(DType::kF32, {N, nb});
  pre_reorder_fp8_cpu(q_ref, sc_ref, x, s2d);
  DeviceTensor q = poisoned(DType::kF8E4M3, {N, H}), sc = poisoned(DType::kF32, {N, nb});
  pre_reorder_fp8(q.view(), sc.view(), dx.view(), ds2d.view(), nullptr);
  EPMOE_CUDA_CHECK(cudaDeviceSynchronize());
  EXPECT_TRUE(bitwise_equal(sorted.to_host(), sorted_ref, "pre_reorder sorted"));
  EXPECT_TRUE(bitwise_equal(q.to_host(), q_ref, "pre_reorder_fp8 values"));
  EXPECT_TRUE(bitwise_equal(sc.to_host(), sc_ref, "pre_reorder_fp8 scales"));

  // post_reorder from a random bf16 down buffer.
  Tensor down = random_tensor(DType::kBF16, {N, H}, rng, 2.f);
  std::uniform_real_distribution<float> uw(0.f, 1.f);
  Tensor w(DType::kF32, {T, K});
  for (int64_t i = 0; i < T * K; ++i) w.as<float>()[i] = uw(rng);
  DeviceTensor ddown = DeviceTensor::from_host(down), dw = DeviceTensor::from_host(w);
  Tensor out_ref(DType::kF32, {T, H}), out_ref_bf(DType::kBF16, {T, H});
  post_reorder_cpu(out_ref, down, s2d, ids, w, num_ids);
  post_reorder_cpu(out_ref_bf, down, s2d, ids, w, num_ids);
  DeviceTensor out = poisoned(DType::kF32, {T, H}), out_bf = poisoned(DType::kBF16, {T, H});
  post_reorder(out.view(), ddown.view(), ds2d.view(), dids.view(), dw.view(), num_ids, 0, nullptr);
  post_reorder(out_bf.view(), ddown.view(), ds2d.view(), dids.view(), dw.view(), num_ids, 0,
               nullptr);
  EPMOE_CUDA_CHECK(cudaDeviceSynchronize());
  EXPECT_TRUE(bitwise_equal(out.to_host(), out_ref, "post_reorder f32"));
  EXPECT_TRUE(bitwise_equal(out_bf.to_host(), out_ref_bf, "post_reorder bf16"));
}

TEST(GpuPermute, ReordersMatchCpuOverTokens) {
  EPMOE_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (int64_t T : testing::token_sweep())
    for (Routing r : {Routing::kUniform, Routing::kSkewed, Routing::kWithInvalid})
      check_reorders(T, 256, 9, 257, r, rng);  // DeepSeek-V3 with the fused shared expert
}

TEST(GpuPermute, ReordersMatchCpuOverHidden) {
  EPMOE_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (int64_t H : {128, 2048, 7168, 7176 /* odd multiple of 8 */})
    for (int64_t T : {int64_t(1), int64_t(7), int64_t(128)})
      check_reorders(T, H, 8, 64, Routing::kWithInvalid, rng);
  if (!testing::quick()) check_reorders(4096, 7168, 8, 256, Routing::kUniform, rng);
}

TEST(GpuPermute, PostReorderAnyHidden) {
  EPMOE_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (int64_t H : {1, 3, 100, 7177}) {  // not multiples of the vector width
    SCOPED_TRACE("H=" + std::to_string(H));
    const int64_t T = 77;
    const int K = 6, E = 64;
    Tensor ids = make_ids(T, K, E, Routing::kWithInvalid, rng);
    Tensor seg(DType::kI32, {E + 1}), s2d(DType::kI32, {T, K});
    preprocess_cpu(seg, s2d, ids, 0, E);
    const int64_t N = seg.as<int32_t>()[E];
    Tensor down = random_tensor(DType::kF32, {N, H}, rng);
    Tensor w = random_tensor(DType::kF32, {T, K}, rng);
    Tensor ref(DType::kF32, {T, H});
    post_reorder_cpu(ref, down, s2d, ids, w, E);
    DeviceTensor out = poisoned(DType::kF32, {T, H});
    DeviceTensor dd = DeviceTensor::from_host(down), ds = DeviceTensor::from_host(s2d),
                 di = DeviceTensor::from_host(ids), dw = DeviceTensor::from_host(w);
    post_reorder(out.view(), dd.view(), ds.view(), di.view(), dw.view(), E, 0, nullptr);
    EPMOE_CUDA_CHECK(cudaDeviceSynchronize());
    EXPECT_TRUE(bitwise_equal(out.to_host(), ref, "post_reorder f32<-f32"));
  }
}

// An EP-style call: ids of another rank's range, offset back to global ids for the tree.
TEST(GpuPermute, PostReorderIdOffset) {
  EPMOE_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const int64_t T = 50, H = 64;
  const int K = 8, E_loc = 32, offset = 64, E = 256;
  Tensor ids = make_ids(T, K, E_loc, Routing::kUniform, rng);
  Tensor seg(DType::kI32, {E_loc + 1}), s2d(DType::kI32, {T, K});
  preprocess_cpu(seg, s2d, ids, 0, E_loc);
  const int64_t N = seg.as<int32_t>()[E_loc];
  Tensor down = random_tensor(DType::kBF16, {N, H}, rng),
         w = random_tensor(DType::kF32, {T, K}, rng);
  Tensor ref(DType::kF32, {T, H});
  post_reorder_cpu(ref, down, s2d, ids, w, E, offset);
  DeviceTensor out = poisoned(DType::kF32, {T, H});
  DeviceTensor dd = DeviceTensor::from_host(down), ds = DeviceTensor::from_host(s2d),
               di = DeviceTensor::from_host(ids), dw = DeviceTensor::from_host(w);
  post_reorder(out.view(), dd.view(), ds.view(), di.view(), dw.view(), E, offset, nullptr);
  EPMOE_CUDA_CHECK(cudaDeviceSynchronize());
  EXPECT_TRUE(bitwise_equal(out.to_host(), ref, "post_reorder with id offset"));
}

TEST(GpuPermute, BadShapesThrow) {
  EPMOE_REQUIRE_GPU();
  DeviceTensor x(DType::kBF16, {4, 100}), sorted(DType::kBF16, {8, 100}), s2d(DType::kI32, {4, 2});
  EXPECT_THROW(pre_reorder(sorted.view(), x.view(), s2d.view(), nullptr), Error);  // H % 8
  DeviceTensor x2(DType::kBF16, {4, 128}), sorted2(DType::kBF16, {8, 64});
  EXPECT_THROW(pre_reorder(sorted2.view(), x2.view(), s2d.view(), nullptr), Error);
  DeviceTensor ids(DType::kI32, {4, 2}), seg(DType::kI32, {10});
  EXPECT_THROW(preprocess(seg.view(), s2d.view(), ids.view(), 0, 8, nullptr, nullptr), Error);
  DeviceTensor out(DType::kF32, {4, 128}), down(DType::kBF16, {8, 128}), w(DType::kF32, {4, 3});
  EXPECT_THROW(
      post_reorder(out.view(), down.view(), s2d.view(), ids.view(), w.view(), 8, 0, nullptr),
      Error);
}

}  // namespace
}  // namespace epmoe::cuda
