// Kernel benchmark driver (disabled by default; scripts/gpu-check.sh runs it with
// --gtest_also_run_disabled_tests). EPMOE_BENCH_JSON names the JSON file to write,
// EPMOE_BENCH_KERNEL the kernel (default all).
#include <cstdlib>
#include <fstream>

#include "epmoe/bench/kernel_bench.h"
#include "tests/gpu/gpu_test_util.h"

namespace epmoe::cuda {
namespace {

TEST(GpuBench, DISABLED_KernelBench) {
  EPMOE_REQUIRE_GPU();
  KernelBenchOptions opts;
  const char* k = std::getenv("EPMOE_BENCH_KERNEL");
  opts.kernel = k ? k : "all";
  const nlohmann::json j = run_kernel_bench(opts);
  if (const char* path = std::getenv("EPMOE_BENCH_JSON")) std::ofstream(path) << j.dump(2) << "\n";
  EXPECT_FALSE(j.at("rows").empty());
}

TEST(GpuBench, UnknownKernelThrows) {
  EPMOE_REQUIRE_GPU();
  KernelBenchOptions opts;
  opts.kernel = "nope";
  EXPECT_THROW(run_kernel_bench(opts), Error);
}

}  // namespace
}  // namespace epmoe::cuda
