// Fused (and unfused) CUDA gate vs select_experts_cpu: ids bitwise per slot, weights to 1e-6.
#include <cmath>

#include "epmoe/core/config.h"
#include "epmoe/cuda/cuda_check.h"
#include "epmoe/routing/gate.cuh"
#include "epmoe/routing/gate_cpu.h"
#include "tests/gpu/test_common.h"

namespace epmoe::cuda {
namespace {

using testing::bitwise_equal;
using testing::fresh_seed;
using testing::poisoned;
using testing::random_tensor;

struct GateCase {
  std::string name;
  MoeConfig cfg;
};

std::vector<GateCase> gate_cases() {
  std::vector<GateCase> cases;
  for (const Preset& p : presets()) {
    cases.push_back({p.name, p.config});
    if (p.config.n_shared_experts > 0) {
      MoeConfig f = p.config;
      f.fuse_shared = true;
      cases.push_back({p.name + "+fused", f});
      f.scale_on_output = true;
      cases.push_back({p.name + "+fused+scale_out", f});
    }
  }
  auto add = [&](const char* name, int E, int K, int G, int kg, Scoring s, bool norm) {
    MoeConfig c{.hidden = 64,
                .moe_intermediate = 64,
                .n_routed_experts = E,
                .top_k = K,
                .n_group = G,
                .topk_group = kg,
                .routed_scaling_factor = 1.5f,
                .norm_topk_prob = norm,
                .scoring = s};
    cases.push_back({name, c});
  };
  add("E512_G16_kg4_K8", 512, 8, 16, 4, Scoring::kSigmoid, true);
  add("E512_G1_K32", 512, 32, 1, 1, Scoring::kSigmoid, false);
  add("E72_G9_kg3_K6", 72, 6, 9, 3, Scoring::kSigmoid, true);      // general group path
  add("E256_G64_kg8_K8", 256, 8, 64, 8, Scoring::kSigmoid, true);  // several groups per lane
  add("E100_G5_kg2_K7_softmax", 100, 7, 5, 2, Scoring::kSoftmax, true);
  add("E128_G8_kg3_K8_softmax", 128, 8, 8, 3, Scoring::kSoftmax, false);
  add("E1_K1", 1, 1, 1, 1, Scoring::kSigmoid, true);
  add("E37_K5", 37, 5, 1, 1, Scoring::kSigmoid, false);
  add("E16_G16_kg4_K4", 16, 4, 16, 4, Scoring::kSigmoid, true);  // one expert per group
  add("E384_G1_K8", 384, 8, 1, 1, Scoring::kSoftmax, true);
  return cases;
}

// Runs CPU, fused and unfused gates on the same logits and compares.
void check_gate(const MoeConfig& cfg, const Tensor& logits, const Tensor& bias,
                const std::string& label) {
  SCOPED_TRACE(label);
  const int64_t T = logits.shape()[0];
  const int Kp = cfg.num_slots();
  Tensor ids_ref(DType::kI32, {T, Kp}), w_ref(DType::kF32, {T, Kp});
  select_experts_cpu(ids_ref, w_ref, logits, bias, cfg);
  DeviceTensor d_logits = DeviceTensor::from_host(logits);
  DeviceTensor d_bias = bias.numel() ? DeviceTensor::from_host(bias) : DeviceTensor();
  const TensorView bias_view = bias.numel() ? d_bias.view() : TensorView{};
  for (int variant = 0; variant < 2; ++variant) {
    SCOPED_TRACE(variant == 0 ? "fused" : "unfused");
    DeviceTensor ids = poisoned(DType::kI32, {T, Kp}), w = poisoned(DType::kF32, {T, Kp});
    DeviceTensor ws;
    if (variant == 0) {
      select_experts(ids.view(), w.view(), d_logits.view(), bias_view, cfg, nullptr);
    } else {
      ws = DeviceTensor(DType::kI32, {int64_t(unfused_gate_workspace_bytes(T, cfg) / 4) + 1});
      select_experts_unfused(ids.view(), w.view(), d_logits.view(), bias_view, cfg,
                             carve_unfused_gate_workspace(ws.view().data, T, cfg), nullptr);
    }
    EPMOE_CUDA_CHECK(cudaDeviceSynchronize());
    Tensor ids_h = ids.to_host(), w_h = w.to_host();
    EXPECT_TRUE(bitwise_equal(ids_h, ids_ref, "topk_ids"));
    for (int64_t i = 0; i < T * Kp; ++i) {
      const float a = w_h.as<float>()[i], b = w_ref.as<float>()[i];
      if (!(std::fabs(a - b) <= 1e-6f * std::fmax(1.f, std::fabs(b)))) {
        ADD_FAILURE() << "topk_weights: first mismatch at token " << i / Kp << ", slot " << i % Kp
                      << ": got " << a << ", want " << b;
        break;
      }
    }
  }
}

TEST(GpuGate, FusedMatchesCpuOnEveryShape) {
  EPMOE_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (const GateCase& c : gate_cases()) {
    for (int64_t T : testing::token_sweep()) {
      if (T > 4096 && c.cfg.n_routed_experts < 256) continue;  // big T: the 256+ shapes
      Tensor logits = random_tensor(DType::kF32, {T, c.cfg.n_routed_experts}, rng, 4.f);
      Tensor bias(DType::kF32, {0});
      if (c.cfg.scoring == Scoring::kSigmoid && c.name != "E37_K5")
        bias = random_tensor(DType::kF32, {c.cfg.n_routed_experts}, rng, 0.2f);
      check_gate(c.cfg, logits, bias, c.name + " T=" + std::to_string(T));
    }
  }
}

// Logits from a handful of values: ties between experts and between groups everywhere, so the
// lower-index rule is exercised on every token.
TEST(GpuGate, TiesResolveLikeTheReference) {
  EPMOE_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> pick(-2, 2);
  for (const GateCase& c : gate_cases()) {
    const int64_t T = 300, E = c.cfg.n_routed_experts;
    Tensor logits(DType::kF32, {T, E});
    for (int64_t i = 0; i < T * E; ++i) logits.as<float>()[i] = 0.5f * float(pick(rng));
    // Some exact +-0 pairs too (the reference treats -0 == +0).
    for (int64_t i = 0; i < T * E; i += 7) logits.as<float>()[i] = (i & 8) ? -0.0f : 0.0f;
    check_gate(c.cfg, logits, Tensor(DType::kF32, {0}), c.name + " ties");
  }
}

TEST(GpuGate, GateGemmMatchesCpu) {
  EPMOE_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  cublasHandle_t handle;
  EPMOE_CUBLAS_CHECK(cublasCreate(&handle));
  for (DType dt : {DType::kBF16, DType::kF32}) {
    for (int64_t T : {int64_t(0), int64_t(1), int64_t(7), int64_t(128), int64_t(1000)}) {
      const int64_t H = 7168, E = 256;
      Tensor x = random_tensor(dt, {T, H}, rng), w = random_tensor(dt, {E, H}, rng, 0.05f);
      Tensor ref(DType::kF32, {T, E});
      gate_gemm_cpu(ref, x, w);
      DeviceTensor dx = DeviceTensor::from_host(x), dw = DeviceTensor::from_host(w);
      DeviceTensor out = poisoned(DType::kF32, {T, E});
      gate_gemm(out.view(), dx.view(), dw.view(), handle, nullptr);
      EPMOE_CUDA_CHECK(cudaDeviceSynchronize());
      EXPECT_LE(testing::rel_l2(out.to_host(), ref), 1e-5) << "T=" << T << " " << dtype_name(dt);
    }
  }
  cublasDestroy(handle);
}

TEST(GpuGate, BadShapesThrow) {
  EPMOE_REQUIRE_GPU();
  const MoeConfig cfg = find_preset("deepseek-v3").config;
  DeviceTensor logits(DType::kF32, {4, 255}), ids(DType::kI32, {4, 8}), w(DType::kF32, {4, 8});
  EXPECT_THROW(select_experts(ids.view(), w.view(), logits.view(), TensorView{}, cfg, nullptr),
               Error);
  DeviceTensor good(DType::kF32, {4, 256}), short_ids(DType::kI32, {4, 7});
  EXPECT_THROW(select_experts(short_ids.view(), w.view(), good.view(), TensorView{}, cfg, nullptr),
               Error);
  MoeConfig big = cfg;
  big.n_routed_experts = 1024;
  DeviceTensor big_logits(DType::kF32, {4, 1024});
  EXPECT_THROW(select_experts(ids.view(), w.view(), big_logits.view(), TensorView{}, big, nullptr),
               Error);
}

}  // namespace
}  // namespace epmoe::cuda
