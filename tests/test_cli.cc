// The epmoe CLI as a user meets it: the bare run, --check, JSON, and one readable error line with
// a non-zero exit for every kind of bad input.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>

#include "epmoe/core/tensor.h"
#include "epmoe/weights/moe_weights.h"
#include "epmoe/weights/safetensors.h"
#include "tests/test_util.h"

namespace epmoe {
namespace {

struct Result {
  int code;
  std::string out;
};

Result run_cli(const std::string& args) {
  const std::string cmd = std::string(EPMOE_CLI_PATH) + " " + args + " 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  EXPECT_NE(p, nullptr);
  std::string out;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) out.append(buf.data(), n);
  const int status = pclose(p);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}

std::string tmp_path(const std::string& name) { return ::testing::TempDir() + "epmoe_cli_" + name; }

TEST(Cli, BareRunIsCheckedAndPasses) {
  const std::string json = tmp_path("bare.json");
  Result r = run_cli("run --json " + json);
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("PASS"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("dispatch"), std::string::npos);
  std::ifstream f(json);
  const auto j = nlohmann::json::parse(f);
  EXPECT_EQ(j["ranks"], 4);
  EXPECT_TRUE(j["check"]["pass"].get<bool>());
  EXPECT_EQ(j["per_rank"].size(), 4u);
  EXPECT_EQ(j["per_rank"][1]["tokens"], 0);
  EXPECT_EQ(j["per_rank"][1]["dispatch_bytes"], 0);  // an empty rank sends nothing
}

TEST(Cli, LowLatencyGoldenSplitAcrossRanks) {
  const std::string g = testing::golden_dir() + "/dsv3_small_grouped.safetensors";
  if (!std::ifstream(g).good()) GTEST_SKIP() << "golden file not found: " << g;
  Result r =
      run_cli("run --golden " + g + " --ranks 8 --tokens 5,0,0,12,1,0,19,0 --mode low-latency");
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("check vs golden output"), std::string::npos) << r.out;
}

// Every overlap strategy, both modes: the CLI compares the overlapped run with `none` on the same
// tokens (bitwise) and with the single-rank reference, and says which strategy ran.
TEST(Cli, OverlapRunsAreCheckedBitwiseAgainstNone) {
  for (const char* mode : {"normal", "low-latency"})
    for (const char* overlap : {"tbo", "sbo"}) {
      SCOPED_TRACE(std::string(mode) + " " + overlap);
      const std::string json = tmp_path(std::string("overlap_") + overlap + ".json");
      Result r = run_cli(std::string("run --overlap ") + overlap + " --mode " + mode +
                         " --tokens 7,0,1,12 --iters 2 --check --json " + json);
      EXPECT_EQ(r.code, 0) << r.out;
      EXPECT_NE(r.out.find(std::string("overlap ") + overlap), std::string::npos) << r.out;
      EXPECT_NE(r.out.find(std::string("check ") + overlap + " vs none"), std::string::npos)
          << r.out;
      EXPECT_NE(r.out.find("dispatch_recv"), std::string::npos) << r.out;  // the per-op table
      EXPECT_NE(r.out.find("PASS"), std::string::npos) << r.out;
      std::ifstream f(json);
      const auto j = nlohmann::json::parse(f);
      EXPECT_EQ(j["overlap"], overlap);
      EXPECT_EQ(j["overlap_vs_none_mismatches"], 0);
      EXPECT_TRUE(j["check"]["pass"].get<bool>());
      EXPECT_EQ(j["per_rank"][1]["dispatch_bytes"], 0);
    }
  // `auto` resolves through the overlap thresholds and names what it picked.
  Result a = run_cli("run --overlap auto --tokens 3 --iters 1");
  EXPECT_EQ(a.code, 0) << a.out;
  EXPECT_NE(a.out.find("overlap "), std::string::npos) << a.out;
  const std::string g = testing::golden_dir() + "/dsv3_small_grouped.safetensors";
  if (std::ifstream(g).good()) {
    Result r = run_cli("run --golden " + g +
                       " --ranks 8 --tokens 5,0,0,12,1,0,19,0 --mode low-latency --overlap tbo");
    EXPECT_EQ(r.code, 0) << r.out;
    EXPECT_NE(r.out.find("check vs golden output"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("check tbo vs none"), std::string::npos) << r.out;
  }
}

void expect_one_line_error(const std::string& args, const std::string& needle) {
  Result r = run_cli(args);
  EXPECT_NE(r.code, 0) << args << "\n" << r.out;
  EXPECT_NE(r.out.find(needle), std::string::npos) << args << "\n" << r.out;
  EXPECT_NE(r.out.find("epmoe: error: "), std::string::npos) << r.out;
  EXPECT_EQ(std::count(r.out.begin(), r.out.end(), '\n'), 1) << r.out;
}

TEST(Cli, BadInputGivesOneClearLine) {
  expect_one_line_error("run --preset nope", "unknown preset 'nope'");
  expect_one_line_error("run --ranks 3", "the rank count (3) must divide n_routed_experts (256)");
  expect_one_line_error("run --ranks 2 --tokens 1,2,3", "--tokens lists 3 counts for 2 ranks");
  expect_one_line_error("run --tokens 5,x,1,1", "'x' is not a non-negative integer");
  expect_one_line_error("run --mode fast", "mode must be 'normal' or 'low-latency'");
  expect_one_line_error("run --tokens 20 --max-tokens 10", "more than max_tokens_per_rank = 10");
  expect_one_line_error("run --golden /nonexistent.safetensors", "/nonexistent.safetensors");
  expect_one_line_error("run --iters 0", "--iters must be >= 1");
  expect_one_line_error("run --overlap fast", "--overlap");

  // Malformed and truncated files.
  const std::string junk = tmp_path("junk.safetensors");
  std::ofstream(junk) << "not a safetensors file at all";
  expect_one_line_error("run --golden " + junk, junk);
  const std::string g = testing::golden_dir() + "/dsv3_small_grouped.safetensors";
  if (std::ifstream(g).good()) {
    const std::string cut = tmp_path("cut.safetensors");
    std::ifstream in(g, std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), {});
    std::ofstream(cut, std::ios::binary) << bytes.substr(0, bytes.size() / 2);
    expect_one_line_error("run --golden " + cut, "bad file");
    // A layer file with one expert tensor missing.
    SafetensorsFile f(g);
    std::map<std::string, TensorView> tensors;
    for (const auto& name : f.names())
      if (name != "experts.3.up_proj.weight") tensors[name] = f.tensor(name);
    const std::string missing = tmp_path("missing.safetensors");
    write_safetensors(missing, tensors, f.metadata());
    expect_one_line_error("run --golden " + missing, "experts.3.up_proj.weight");
  }
}

TEST(Cli, PresetsListsEveryPreset) {
  Result r = run_cli("presets");
  EXPECT_EQ(r.code, 0);
  for (const char* p :
       {"deepseek-v3", "deepseek-v3-tiny", "deepseek-v2-lite", "qwen3-30b-a3b", "mixtral-8x7b"})
    EXPECT_NE(r.out.find(p), std::string::npos) << p;
}

TEST(Cli, CudaBackendWithoutGpuSaysSo) {
  Result r = run_cli("run --backend cuda --ranks 1 --tokens 4");
  if (r.code == 0) GTEST_SKIP() << "a GPU is present";
  EXPECT_NE(r.out.find("epmoe: error: "), std::string::npos) << r.out;
  EXPECT_EQ(std::count(r.out.begin(), r.out.end(), '\n'), 1) << r.out;
  EXPECT_TRUE(r.out.find("no CUDA GPU") != std::string::npos ||
              r.out.find("without CUDA") != std::string::npos)
      << r.out;
}

}  // namespace
}  // namespace epmoe
