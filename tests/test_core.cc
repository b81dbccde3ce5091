#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "epmoe/core/config.h"
#include "epmoe/core/dtype.h"
#include "epmoe/core/env.h"
#include "epmoe/core/error.h"
#include "epmoe/core/exact_math.h"
#include "epmoe/core/tensor.h"

namespace epmoe {
namespace {

TEST(DType, Bf16RoundsToNearestEven) {
  // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1.0).
  EXPECT_EQ(f32_to_bf16(1.0f + std::ldexp(1.0f, -8)).bits, 0x3f80);
  // 1 + 3*2^-8 is halfway between 1+2^-7 and 1+2^-6: ties to even (1+2^-6).
  EXPECT_EQ(f32_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)).bits, 0x3f82);
  EXPECT_EQ(f32_to_bf16(-2.5f).bits, 0xc020);
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(NAN))));
  EXPECT_TRUE(std::isinf(bf16_to_f32(f32_to_bf16(3.4e38f))));
  std::mt19937 rng(7);
  std::normal_distribution<float> d(0.f, 10.f);
  for (int i = 0; i < 100000; ++i) {
    float x = d(rng);
    float r = round_bf16(x);
    EXPECT_EQ(round_bf16(r), r);
    EXPECT_LE(std::fabs(r - x), std::fabs(x) * std::ldexp(1.0f, -8) * 1.0001f);
  }
}

TEST(DType, F16ExactAndRne) {
  EXPECT_EQ(f32_to_f16(1.0f).bits, 0x3c00);
  EXPECT_EQ(f32_to_f16(65504.0f).bits, 0x7bff);
  EXPECT_EQ(f32_to_f16(65520.0f).bits, 0x7c00);                      // rounds to inf
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -24)).bits, 0x0001);         // smallest subnormal
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -25)).bits, 0x0000);         // tie to even -> 0
  EXPECT_EQ(f32_to_f16(1.0f + std::ldexp(1.0f, -11)).bits, 0x3c00);  // tie to even
  for (uint32_t b = 0; b < 0x7c00; ++b)                              // every finite f16 round-trips
    ASSERT_EQ(f32_to_f16(f16_to_f32(f16{uint16_t(b)})).bits, b);
}

TEST(DType, Fp8E4M3SaturatesAndRoundTrips) {
  EXPECT_EQ(f32_to_fp8e4m3(448.0f).bits, 0x7e);
  EXPECT_EQ(f32_to_fp8e4m3(1e6f).bits, 0x7e);
  EXPECT_EQ(f32_to_fp8e4m3(-1e6f).bits, 0xfe);
  EXPECT_EQ(f32_to_fp8e4m3(INFINITY).bits, 0x7e);
  EXPECT_EQ(f32_to_fp8e4m3(NAN).bits, 0x7f);
  EXPECT_EQ(fp8e4m3_to_f32(fp8e4m3{0x01}), std::ldexp(1.0f, -9));
  EXPECT_EQ(f32_to_fp8e4m3(1.0625f).bits, 0x38);  // tie between 1 and 1.125 -> even (1.0)
  for (int b = 0; b < 256; ++b) {
    if ((b & 0x7f) == 0x7f) continue;  // NaN
    ASSERT_EQ(f32_to_fp8e4m3(fp8e4m3_to_f32(fp8e4m3{uint8_t(b)})).bits, b) << b;
  }
}

TEST(ExactMath, ExpAndSigmoidAccurate) {
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> d(-80.f, 80.f);
  for (int i = 0; i < 100000; ++i) {
    float x = d(rng);
    double ref = std::exp(double(x));
    EXPECT_LE(std::fabs(exact_expf(x) - ref), ref * 2e-7) << x;
  }
  EXPECT_EQ(exact_sigmoidf(-200.f), 0.0f);
  EXPECT_EQ(exact_sigmoidf(200.f), 1.0f);
  EXPECT_NEAR(exact_sigmoidf(0.3f), 1.0 / (1.0 + std::exp(-0.3)), 1e-7);
}

TEST(Tensor, ShapeAndDtypeChecks) {
  Tensor t(DType::kBF16, {3, 5});
  EXPECT_EQ(t.nbytes(), 30u);
  EXPECT_THROW(t.as<float>(), Error);
  EXPECT_NO_THROW(t.view().expect("t", DType::kBF16, {3, 5}));
  EXPECT_THROW(t.view().expect("t", DType::kBF16, {5, 3}), Error);
  Tensor e(DType::kF32, {0, 7});
  EXPECT_EQ(e.numel(), 0);
}

TEST(Config, PresetsValidate) {
  for (const auto& p : presets()) {
    EXPECT_NO_THROW(p.config.validate()) << p.name;
  }
  EXPECT_THROW(find_preset("nope"), Error);
}

MoeConfig dsv3_tiny() { return find_preset("deepseek-v3-tiny").config; }

void expect_config_error(const MoeConfig& c, const char* needle) {
  try {
    c.validate();
    ADD_FAILURE() << "expected a configuration error mentioning '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kInvalidConfig);
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(Config, BadConfigurationsNameTheProblem) {
  MoeConfig c = dsv3_tiny();
  c.n_group = 3;
  expect_config_error(c, "n_group (3) must divide n_routed_experts (256)");
  c = dsv3_tiny();
  c.topk_group = 9;
  expect_config_error(c, "topk_group (9)");
  c = dsv3_tiny();
  c.topk_group = 1;
  c.top_k = 40;  // one kept group holds 32 experts
  expect_config_error(c, "top_k (40) exceeds the 32 experts");
  c = dsv3_tiny();
  c.hidden = 0;
  expect_config_error(c, "hidden");
  c = dsv3_tiny();
  c.routed_scaling_factor = NAN;
  expect_config_error(c, "routed_scaling_factor");
  c = dsv3_tiny();
  c.scale_on_output = true;
  expect_config_error(c, "scale_on_output");
  EpConfig ep{.num_ranks = 3, .mode = EpMode::kNormal, .max_tokens_per_rank = 8};
  EXPECT_THROW(ep.validate(dsv3_tiny()), Error);
  ep.num_ranks = 8;
  EXPECT_NO_THROW(ep.validate(dsv3_tiny()));
}

// Tunables are read once and cached; env_reload makes the next read see the environment again.
TEST(Env, CachedUntilReloadedAndTyped) {
  setenv("EPMOE_TEST_TUNABLE", "7", 1);
  env_reload();
  EXPECT_EQ(env_int("TEST_TUNABLE", 1), 7);
  setenv("EPMOE_TEST_TUNABLE", "9", 1);
  EXPECT_EQ(env_int("TEST_TUNABLE", 1), 7);
  env_reload();
  EXPECT_EQ(env_int("TEST_TUNABLE", 1), 9);
  setenv("EPMOE_TEST_TUNABLE", "9ms", 1);
  env_reload();
  try {
    env_int("TEST_TUNABLE", 1);
    ADD_FAILURE() << "a non-integer tunable was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kInvalidConfig);
    EXPECT_NE(std::string(e.what()).find("EPMOE_TEST_TUNABLE='9ms'"), std::string::npos)
        << e.what();
  }
  unsetenv("EPMOE_TEST_TUNABLE");
  env_reload();
  EXPECT_EQ(env_int("TEST_TUNABLE", 1), 1);
}

}  // namespace
}  // namespace epmoe
