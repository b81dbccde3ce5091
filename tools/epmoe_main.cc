// The epmoe command-line tool: thin front end over the library.
#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <cstdlib>
#include <exception>

#include "epmoe/core/checked.h"
#include "epmoe/core/config.h"
#include "epmoe/core/error.h"
#include "tools/run_command.h"

namespace {

// Every option of `epmoe run` checked before anything is loaded, allocated or looped over:
// numbers in range, options that do not apply to the chosen backend or mode refused, the --json
// file opened for writing now (not after a long run). Throws epmoe::Error naming the option.
void check_run_options(const CLI::App& cmd, const epmoe::cli::RunOptions& o) {
  using epmoe::ErrorKind;
  auto given = [&](const char* name) { return cmd.count(name) > 0; };
  EPMOE_CHECK(o.ranks >= 1 && o.ranks <= epmoe::cli::kMaxRanks, kInvalidArgument,
              "--ranks must be in [1, {}], got {}", epmoe::cli::kMaxRanks, o.ranks);
  EPMOE_CHECK(o.iters >= 1 && o.iters <= 1000000, kInvalidArgument,
              "--iters must be >= 1 and at most 1000000, got {}", o.iters);
  EPMOE_CHECK(o.threads >= 0 && o.threads <= 4096, kInvalidArgument,
              "--threads must be in [0, 4096] (0: every core), got {}", o.threads);
  EPMOE_CHECK(o.max_tokens >= 0 && o.max_tokens <= INT32_MAX, kInvalidArgument,
              "--max-tokens must be in [0, {}], got {}", INT32_MAX, o.max_tokens);
  EPMOE_CHECK(o.backend == "cpu" || o.backend == "cuda", kInvalidArgument,
              "--backend must be 'cpu' or 'cuda', got '{}'", o.backend);
  EPMOE_CHECK(o.transport == "auto" || o.transport == "nccl" || o.transport == "loopback",
              kInvalidArgument, "--transport must be auto, nccl or loopback, got '{}'",
              o.transport);
  EPMOE_CHECK(!given("--golden") || !o.golden.empty(), kInvalidArgument,
              "--golden names no file (an empty path)");
  EPMOE_CHECK(!given("--json") || !o.json.empty(), kInvalidArgument,
              "--json names no file (an empty path)");
  EPMOE_CHECK(!given("--tokens") || !o.tokens.empty(), kInvalidArgument,
              "--tokens is empty (give N, or one count per rank: a,b,c)");
  if (o.backend == "cpu") {
    for (const char* opt : {"--transport", "--ll-transfer", "--fp8-dispatch", "--weights"})
      EPMOE_CHECK(!given(opt), kInvalidArgument,
                  "{} applies to --backend cuda only (this run uses the cpu backend)", opt);
  }
  EPMOE_CHECK(!given("--ll-transfer") || epmoe::parse_ep_mode(o.mode) == epmoe::EpMode::kLowLatency,
              kInvalidArgument, "--ll-transfer applies to --mode low-latency only");
  EPMOE_CHECK(!o.scale_on_output || o.fuse_shared, kInvalidArgument,
              "--scale-on-output applies with --fuse-shared only");
  if (!o.golden.empty()) {
    for (const char* opt : {"--preset", "--seed"})
      EPMOE_CHECK(!given(opt), kInvalidArgument,
                  "{} does not apply with --golden (the file holds the layer and its input)", opt);
  }
  if (!o.json.empty()) epmoe::cli::open_json_output(o.json);
}

}  // namespace

int main(int argc, char** argv) {
  // Before any CUDA call: kernels load eagerly (a lazy first launch can wait for the device while
  // a loopback rank spins on a flag), and NVLink multicast stays off.
  setenv("CUDA_MODULE_LOADING", "EAGER", 0);
  setenv("NCCL_NVLS_ENABLE", "0", 0);
  // One hardware queue per stream for up to 32 loopback ranks: shared queues would serialise a
  // rank's sends behind another rank's spinning receive.
  setenv("CUDA_DEVICE_MAX_CONNECTIONS", "32", 0);
  CLI::App app{"epmoe: Mixture-of-Experts layers under expert parallelism"};
  app.require_subcommand(1);

  auto* presets = app.add_subcommand("presets", "list the built-in model presets");

  epmoe::cli::RunOptions run;
  auto* run_cmd = app.add_subcommand("run",
                                     "run one MoE layer forward (default: deepseek-v3-tiny, "
                                     "4 CPU ranks, uneven tokens, checked)");
  run_cmd->add_option("--preset", run.preset, "model preset (see `epmoe presets`)");
  run_cmd->add_option("--golden", run.golden, "safetensors layer file with expected outputs");
  run_cmd->add_option("--ranks", run.ranks, "expert-parallel ranks");
  run_cmd->add_option("--tokens", run.tokens,
                      "tokens per rank: N for every rank, or a comma list (one per rank)");
  run_cmd->add_option("--max-tokens", run.max_tokens, "T_max, the per-rank buffer capacity");
  run_cmd->add_option("--mode", run.mode, "normal | low-latency");
  run_cmd->add_option("--backend", run.backend, "cpu | cuda");
  run_cmd->add_option(
      "--transport", run.transport,
      "cuda ranks: auto (nccl with a GPU per rank, else loopback) | nccl | loopback");
  run_cmd->add_flag("--fp8-dispatch", run.fp8_dispatch, "cuda ranks: FP8 dispatch payload");
  run_cmd
      ->add_option("--weights", run.weights,
                   "cuda: expert GEMMs in bf16 | fp8 (e4m3 with 128x128 block scales: FP8 "
                   "checkpoints as they are, bf16 ones quantised at load)")
      ->check(CLI::IsMember({"bf16", "fp8"}));
  run_cmd
      ->add_option("--ll-transfer", run.ll_transfer,
                   "cuda ranks, low-latency: auto (load/store when every peer is reachable, "
                   "else host API) | device | host")
      ->check(CLI::IsMember({"auto", "device", "host"}));
  run_cmd
      ->add_option("--overlap", run.overlap,
                   "none | tbo (two-batch overlap) | sbo (single-batch overlap) | auto")
      ->check(CLI::IsMember({"none", "tbo", "sbo", "auto"}));
  run_cmd->add_option("--iters", run.iters, "timed iterations (median reported)");
  run_cmd->add_flag("--check,!--no-check", run.check,
                    "compare with the single-rank reference (and the golden output)");
  run_cmd->add_flag("--fuse-shared", run.fuse_shared, "run the shared expert as fused experts");
  run_cmd->add_flag("--scale-on-output", run.scale_on_output,
                    "with --fuse-shared: routed weights exclude rsf, output scaled by rsf");
  run_cmd->add_option("--threads", run.threads, "CPU threads in all (default: every core)");
  run_cmd->add_option("--seed", run.seed, "seed of the random weights and inputs")
      ->check(CLI::Validator(
          [](std::string& v) {  // CLI11 would saturate a 24-digit seed; refuse it instead
            try {
              epmoe::parse_int_in_range(v, 0, INT64_MAX, "--seed");
              return std::string();
            } catch (const epmoe::Error& e) {
              return std::string(e.what());
            }
          },
          "SEED"));
  run_cmd->add_option("--json", run.json, "write machine-readable results to this file");

  epmoe::cli::BenchOptions bench;
  auto* bench_cmd = app.add_subcommand(
      "bench", "GPU benchmarks: kernels, grouped GEMMs, dispatch/combine, the layer");
  bench_cmd->add_option(
      "--kernel", bench.kernel,
      "gate | permute | post_reorder | silu | grouped_gemm | all | gemm (sm90, portable, cuBLAS) "
      "| dispatch | combine | layer (the whole layer under none/tbo/sbo)");
  bench_cmd->add_option("--preset", bench.preset, "model preset");
  bench_cmd->add_option("--tokens", bench.tokens,
                        "comma list of token counts (per rank for dispatch/combine)");
  bench_cmd->add_option("--iters", bench.iters, "timed iterations (median reported)");
  bench_cmd->add_option("--warmup", bench.warmup, "untimed iterations first");
  bench_cmd->add_option("--ranks", bench.ranks, "dispatch/combine: ranks");
  bench_cmd->add_option("--transport", bench.transport, "dispatch/combine: loopback | nccl");
  bench_cmd->add_option("--mode", bench.mode, "dispatch/combine: low-latency | normal");
  bench_cmd->add_flag("--fp8", bench.fp8, "dispatch/combine, layer: FP8 dispatch payload");
  bench_cmd->add_option("--weights", bench.weights, "layer: expert GEMMs in bf16 | fp8")
      ->check(CLI::IsMember({"bf16", "fp8"}));
  bench_cmd
      ->add_option("--ll-transfer", bench.ll_transfer,
                   "dispatch/combine, low-latency: auto | device | host")
      ->check(CLI::IsMember({"auto", "device", "host"}));
  bench_cmd->add_option("--overlap", bench.overlap,
                        "layer: strategies to compare with none (none,tbo,sbo | all)");
  bench_cmd
      ->add_option("--attn-us", bench.attn_us,
                   "layer: attention stand-in (us per layer at the full batch; -1: as long "
                   "as the sequential MoE layer)")
      ->check(CLI::Range(-1.0, 1e7));
  bench_cmd
      ->add_option("--experts-per-rank", bench.experts_per_rank,
                   "layer: the large-EP slice (ranks x N routed experts of the preset's size)")
      ->check(CLI::Range(0, 4096));
  bench_cmd->add_flag("--graph", bench.graph, "layer: capture each strategy in a CUDA graph");
  bench_cmd
      ->add_option("--comm-blocks", bench.comm_blocks,
                   "layer: blocks per communication kernel (0 = unbounded)")
      ->check(CLI::Range(0, 4096));
  bench_cmd->add_option("--trace", bench.trace,
                        "layer: write a Chrome/Perfetto trace of the first overlapped strategy");
  bench_cmd->add_option("--json", bench.json, "write the results to this file");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help
    // One line, like every other error (CLI11 adds a "Run with --help" line of its own).
    fmt::print(stderr, "epmoe: error: {}\n", e.what());
    return 2;
  }
  try {
    if (run_cmd->parsed()) check_run_options(*run_cmd, run);
    if (presets->parsed()) {
      for (const auto& p : epmoe::presets())
        fmt::print("{:18} {}\n{:18} {}\n", p.name, p.description, "", p.config.summary());
      return 0;
    }
    if (run_cmd->parsed()) return epmoe::cli::run_command(run);
    if (bench_cmd->parsed()) return epmoe::cli::bench_command(bench);
  } catch (const epmoe::Error& e) {
    fmt::print(stderr, "epmoe: error: {}\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    fmt::print(stderr, "epmoe: error: {}\n", e.what());
    return 2;
  }
  return 0;
}
