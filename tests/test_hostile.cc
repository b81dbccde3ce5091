// Hostile input, table-driven: command-line arguments, crafted layer files and environment
// variables as an attacker or a careless user would give them. Every case must end with a
// non-zero exit, exactly one `epmoe: error: ...` line on stderr naming the problem, within a time
// bound and (outside sanitizer builds, whose shadow memory needs the address space) a bound on
// the address space. scripts/test.sh runs this suite a second time under ASan + UBSan, where a
// sanitizer report in the spawned CLI is counted as a failure.
// Also here: the communicator's failing-rank teardown (no window freed under a writing peer).
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "epmoe/comm/thread_comm.h"
#include "epmoe/core/checked.h"
#include "epmoe/core/env.h"
#include "epmoe/core/tensor.h"
#include "epmoe/layer/moe_layer_cpu.h"
#include "epmoe/weights/moe_weights.h"
#include "epmoe/weights/safetensors.h"

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define EPMOE_HOSTILE_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define EPMOE_HOSTILE_SANITIZED 1
#endif
#endif

namespace epmoe {
namespace {

using json = nlohmann::json;

constexpr int kTimeLimitS = 30;             // per case, enforced by timeout(1)
constexpr long kAddressSpaceKiB = 6 << 20;  // 6 GiB of address space (ulimit -v)

std::string dir() {
  static const std::string d = [] {
    std::string p = ::testing::TempDir() + "epmoe_hostile_" + std::to_string(::getpid());
    ::mkdir(p.c_str(), 0755);
    return p;
  }();
  return d;
}
std::string path_of(const std::string& name) { return dir() + "/" + name; }

std::string shell_quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

struct Outcome {
  int code = -1;
  std::string err;  // stderr
  double seconds = 0;
};

// Runs `epmoe <args>` with `env` (VAR=value ...) under timeout(1) and ulimit -v; stdout is
// dropped, stderr captured.
Outcome run_cli(const std::string& args, const std::string& env) {
  std::string limit;
#ifndef EPMOE_HOSTILE_SANITIZED
  limit = "ulimit -v " + std::to_string(kAddressSpaceKiB) + "; ";
#endif
  const std::string inner = limit + "exec env " + env + " timeout -k 5 " +
                            std::to_string(kTimeLimitS) + " " + EPMOE_CLI_PATH + " " + args +
                            " 2>&1 >/dev/null";
  const std::string cmd = "sh -c " + shell_quote(inner) + " </dev/null";
  const auto start = std::chrono::steady_clock::now();
  FILE* p = popen(cmd.c_str(), "r");
  Outcome o;
  if (p == nullptr) return o;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) o.err.append(buf.data(), n);
  const int status = pclose(p);
  o.code =
      WIFEXITED(status) ? WEXITSTATUS(status) : 128 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
  o.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return o;
}

// ---------------------------------------------------------------------------------------------
// Crafted files.

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f << bytes;
}

std::string le64(uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[size_t(i)] = char((v >> (8 * i)) & 0xff);
  return s;
}

// A safetensors file from a header text and a data section.
std::string raw_file(const std::string& header, const std::string& data = "") {
  return le64(header.size()) + header + data;
}

// The small layer every file case starts from: H=64, I=32, 8 routed experts (top-2 of 2 groups),
// one shared expert; weights in checkpoint naming plus the golden tensors of 6 tokens.
MoeConfig small_config() {
  MoeConfig c;
  c.hidden = 64;
  c.moe_intermediate = 32;
  c.n_routed_experts = 8;
  c.top_k = 2;
  c.n_group = 2;
  c.topk_group = 1;
  c.n_shared_experts = 1;
  c.routed_scaling_factor = 2.5f;
  c.norm_topk_prob = true;
  c.scoring = Scoring::kSigmoid;
  return c;
}

struct LayerFile {
  std::map<std::string, Tensor> tensors;
  std::map<std::string, std::string> metadata;
};

const LayerFile& base_layer() {
  static const LayerFile base = [] {
    const MoeConfig cfg = small_config();
    const MoeWeights w = random_moe_weights(cfg, 5);
    const std::string saved = path_of("base_weights.safetensors");
    save_moe_weights(saved, w);
    const SafetensorsFile f(saved);
    LayerFile lf;
    lf.metadata = f.metadata();
    for (const std::string& name : f.names())
      lf.tensors[name] = to_dtype(f.tensor(name), f.tensor(name).dtype);
    Tensor x(DType::kBF16, {6, cfg.hidden});
    for (int64_t i = 0; i < x.numel(); ++i)
      x.as<bf16>()[i] = f32_to_bf16(std::sin(0.37f * float(i)));
    LayerResult r = moe_forward_cpu(w, x);
    lf.tensors["input"] = std::move(x);
    lf.tensors["output"] = std::move(r.y);
    lf.tensors["topk_ids"] = std::move(r.topk_ids);
    lf.tensors["topk_weights"] = std::move(r.topk_weights);
    return lf;
  }();
  return base;
}

std::string write_layer(const std::string& name, const std::function<void(LayerFile&)>& edit) {
  LayerFile lf;
  lf.metadata = base_layer().metadata;
  for (const auto& [n, t] : base_layer().tensors) lf.tensors[n] = to_dtype(t, t.dtype());
  edit(lf);
  std::map<std::string, TensorView> views;
  for (const auto& [n, t] : lf.tensors) views[n] = t.view();
  const std::string p = path_of(name);
  write_safetensors(p, views, lf.metadata);
  return p;
}

// The valid layer file's header and data, for header-level corruption.
void base_header(json* header, std::string* data) {
  const std::string p = write_layer("valid.safetensors", [](LayerFile&) {});
  std::ifstream in(p, std::ios::binary);
  const std::string bytes((std::istreambuf_iterator<char>(in)), {});
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | uint8_t(bytes[size_t(i)]);
  *header = json::parse(bytes.substr(8, n));
  *data = bytes.substr(8 + n);
}

std::string write_with_header(const std::string& name, const std::function<void(json&)>& edit) {
  json h;
  std::string data;
  base_header(&h, &data);
  edit(h);
  const std::string p = path_of(name);
  write_bytes(p, raw_file(h.dump(), data));
  return p;
}

void poke_f32_or_bf16(Tensor& t, int64_t i, float v) {
  if (t.dtype() == DType::kF32)
    t.as<float>()[i] = v;
  else
    t.as<bf16>()[i] = f32_to_bf16(v);
}

// ---------------------------------------------------------------------------------------------
// The table.

struct Case {
  std::string name;
  std::function<std::string()> args;  // built lazily (files are written when the case runs)
  std::string env;                    // VAR=value ...
  std::string needle;                 // the problem the error line must name
};

std::string fifo_path() {
  const std::string p = path_of("fifo");
  ::unlink(p.c_str());
  ::mkfifo(p.c_str(), 0644);
  return p;
}

std::vector<Case> cases() {
  auto a = [](std::string s) { return [s] { return s; }; };
  auto golden = [](std::function<std::string()> file, std::string extra = "") {
    return [file, extra] { return "run --golden " + file() + " " + extra; };
  };
  auto layer = [](std::string name, std::function<void(LayerFile&)> edit) {
    return [name, edit] { return write_layer(name, edit); };
  };
  auto header = [](std::string name, std::function<void(json&)> edit) {
    return [name, edit] { return write_with_header(name, edit); };
  };
  auto rawf = [](std::string name, std::string bytes) {
    return [name, bytes] {
      write_bytes(path_of(name), bytes);
      return path_of(name);
    };
  };
  const std::string deep_array = std::string(200000, '[') + std::string(200000, ']');
  std::string deep_object;
  for (int i = 0; i < 50000; ++i) deep_object += "{\"a\":";
  deep_object += "1" + std::string(50000, '}');
  const std::string expert = "experts.1.down_proj.weight";

  return {
      // ---- command line: numbers ----
      {"ranks_int_max", a("run --ranks 2147483647"), "", "--ranks must be in [1, 4096]"},
      {"ranks_zero", a("run --ranks 0"), "", "--ranks must be in"},
      {"ranks_negative", a("run --ranks -1"), "", "--ranks"},
      {"ranks_not_a_number", a("run --ranks abc"), "", "--ranks"},
      {"ranks_beyond_int", a("run --ranks 99999999999"), "", "--ranks"},
      {"ranks_not_dividing", a("run --ranks 3"), "", "must divide n_routed_experts"},
      {"tokens_2_pow_59", a("run --tokens 576460752303423488"), "",
       "--tokens: '576460752303423488'"},
      {"tokens_20_digits", a("run --tokens 99999999999999999999"), "",
       "--tokens: '99999999999999999999'"},
      {"tokens_negative", a("run --tokens -5"), "", "--tokens: '-5'"},
      {"tokens_hex", a("run --tokens 0x10"), "", "--tokens: '0x10'"},
      {"tokens_float", a("run --tokens 1e3"), "", "--tokens: '1e3'"},
      {"tokens_empty_item", a("run --tokens 1,,2,3"), "", "--tokens: ''"},
      {"tokens_empty", a("run --tokens ''"), "", "--tokens is empty"},
      {"tokens_count_mismatch", a("run --tokens 1,2"), "", "--tokens lists 2 counts for 4 ranks"},
      {"tokens_sum_over_budget", a("run --ranks 1 --tokens 2147483647"), "", "buffer budget"},
      {"tokens_over_max_tokens", a("run --tokens 20 --max-tokens 10"), "",
       "more than max_tokens_per_rank = 10"},
      {"max_tokens_2_pow_59", a("run --max-tokens 576460752303423488 --mode low-latency"), "",
       "--max-tokens must be in"},
      {"max_tokens_negative", a("run --max-tokens -1"), "", "--max-tokens must be in"},
      {"max_tokens_over_budget", a("run --max-tokens 1000000 --mode low-latency"), "",
       "buffer budget"},
      {"max_tokens_over_small_budget", a("run --max-tokens 20000 --mode low-latency"),
       "EPMOE_MAX_BUFFER_BYTES=100000000", "buffer budget of 100000000 bytes"},
      {"iters_zero", a("run --iters 0"), "", "--iters must be >= 1"},
      {"iters_negative", a("run --iters -3"), "", "--iters must be >= 1"},
      {"iters_huge", a("run --iters 2000000000"), "", "--iters must be >= 1 and at most 1000000"},
      {"iters_beyond_int", a("run --iters 99999999999"), "", "--iters"},
      {"threads_negative", a("run --threads -1"), "", "--threads must be in [0, 4096]"},
      {"threads_huge", a("run --threads 100000"), "", "--threads must be in [0, 4096]"},
      {"seed_negative", a("run --seed -1"), "", "--seed"},
      {"seed_beyond_u64", a("run --seed 99999999999999999999999"), "", "--seed"},
      // ---- command line: words and options that do not apply ----
      {"mode_unknown", a("run --mode fast"), "", "mode must be 'normal' or 'low-latency'"},
      {"backend_unknown", a("run --backend tpu"), "", "--backend must be 'cpu' or 'cuda'"},
      {"transport_on_cpu", a("run --transport nccl"), "",
       "--transport applies to --backend cuda only"},
      {"ll_transfer_on_cpu", a("run --ll-transfer host"), "",
       "--ll-transfer applies to --backend cuda only"},
      {"fp8_dispatch_on_cpu", a("run --fp8-dispatch"), "",
       "--fp8-dispatch applies to --backend cuda only"},
      {"weights_on_cpu", a("run --weights fp8"), "", "--weights applies to --backend cuda only"},
      {"weights_unknown", a("run --backend cuda --weights fp4"), "", "--weights"},
      {"transport_unknown", a("run --transport carrier-pigeon"), "",
       "--transport must be auto, nccl or loopback"},
      {"ll_transfer_unknown", a("run --ll-transfer warp"), "", "--ll-transfer"},
      {"scale_on_output_alone", a("run --scale-on-output"), "",
       "--scale-on-output applies with --fuse-shared only"},
      {"preset_unknown", a("run --preset nope"), "", "unknown preset 'nope'"},
      {"preset_empty", a("run --preset ''"), "", "unknown preset ''"},
      {"unknown_option", a("run --bogus 1"), "", "--bogus"},
      {"no_subcommand", a(""), "", "subcommand"},
      // ---- command line: paths ----
      {"golden_empty", a("run --golden ''"), "", "--golden names no file"},
      {"golden_missing", a("run --golden /nonexistent/layer.safetensors"), "",
       "/nonexistent/layer.safetensors"},
      {"golden_directory", [] { return "run --golden " + dir(); }, "",
       "is not a regular file but a directory"},
      {"golden_fifo", [] { return "run --golden " + fifo_path(); }, "",
       "is not a regular file but a FIFO"},
      {"golden_char_device", a("run --golden /dev/zero"), "",
       "is not a regular file but a character device"},
      {"golden_with_preset",
       golden(layer("with_preset.safetensors", [](LayerFile&) {}), "--preset deepseek-v3-tiny"), "",
       "--preset does not apply with --golden"},
      {"golden_with_seed", golden(layer("with_seed.safetensors", [](LayerFile&) {}), "--seed 3"),
       "", "--seed does not apply with --golden"},
      {"json_empty", a("run --json ''"), "", "--json names no file"},
      {"json_dev_full", a("run --tokens 2 --json /dev/full"), "",
       "writing --json file '/dev/full' failed"},
      {"json_missing_dir", a("run --json /nonexistent/dir/out.json"), "",
       "cannot write --json file '/nonexistent/dir/out.json'"},
      {"json_directory", [] { return "run --json " + dir(); }, "", "Is a directory"},
      {"json_fifo", [] { return "run --json " + fifo_path(); }, "", "cannot write --json file"},
      // ---- environment ----
      {"timeout_zero", a("run"), "EPMOE_TIMEOUT_MS=0",
       "EPMOE_TIMEOUT_MS='0' is not an integer in [1, 86400000]"},
      {"timeout_negative", a("run"), "EPMOE_TIMEOUT_MS=-1", "EPMOE_TIMEOUT_MS='-1'"},
      {"timeout_int64_max", a("run"), "EPMOE_TIMEOUT_MS=9223372036854775807",
       "EPMOE_TIMEOUT_MS='9223372036854775807'"},
      {"timeout_20_digits", a("run"), "EPMOE_TIMEOUT_MS=99999999999999999999", "EPMOE_TIMEOUT_MS="},
      {"timeout_word", a("run"), "EPMOE_TIMEOUT_MS=soon", "EPMOE_TIMEOUT_MS='soon'"},
      {"timeout_empty", a("run"), "EPMOE_TIMEOUT_MS=", "EPMOE_TIMEOUT_MS=''"},
      {"cpu_threads_negative", a("run"), "EPMOE_CPU_THREADS=-4", "EPMOE_CPU_THREADS='-4'"},
      {"cpu_threads_huge", a("run"), "EPMOE_CPU_THREADS=99999999999999999999",
       "EPMOE_CPU_THREADS="},
      {"budget_zero", a("run"), "EPMOE_MAX_BUFFER_BYTES=0", "EPMOE_MAX_BUFFER_BYTES='0'"},
      {"budget_word", a("run"), "EPMOE_MAX_BUFFER_BYTES=lots", "EPMOE_MAX_BUFFER_BYTES='lots'"},
      {"budget_tiny", a("run"), "EPMOE_MAX_BUFFER_BYTES=1000", "buffer budget of 1000 bytes"},
      // ---- layer files: the container ----
      {"file_empty", golden(rawf("empty.safetensors", "")), "",
       "shorter than the 8-byte header length"},
      {"file_5_bytes", golden(rawf("five.safetensors", "\x05\x00\x00\x00\x00")), "",
       "shorter than the 8-byte header length"},
      {"header_len_huge", golden(rawf("hlen.safetensors", le64(~0ull) + "{}")), "",
       "header length"},
      {"header_len_past_end", golden(rawf("hpast.safetensors", le64(1000) + "{}")), "",
       "exceeds the 2 bytes that follow"},
      {"header_not_json", golden(rawf("notjson.safetensors", raw_file("this is not json"))), "",
       "header is not valid JSON"},
      {"header_array", golden(rawf("array.safetensors", raw_file("[1,2,3]"))), "",
       "header is not a JSON object"},
      {"header_nested_arrays", golden(rawf("deep_array.safetensors", raw_file(deep_array))), "",
       "header nests deeper than 8 levels"},
      {"header_nested_objects", golden(rawf("deep_object.safetensors", raw_file(deep_object))), "",
       "header nests deeper than 8 levels"},
      {"header_nested_in_shape",
       golden(rawf("deep_shape.safetensors",
                   raw_file("{\"a\":{\"dtype\":\"F32\",\"shape\":" + std::string(5000, '[') +
                            std::string(5000, ']') + ",\"data_offsets\":[0,0]}}"))),
       "", "nests deeper"},
      {"header_duplicate_name",
       golden(rawf("dup.safetensors",
                   raw_file("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},\"a\":"
                            "{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
                            std::string(8, '\0')))),
       "", "names tensor 'a' more than once"},
      {"dtype_f64",
       golden(header("f64.safetensors", [](json& h) { h["gate.weight"]["dtype"] = "F64"; })), "",
       "unsupported dtype 'F64'"},
      {"dtype_not_string",
       golden(header("dtype_num.safetensors", [](json& h) { h["gate.weight"]["dtype"] = 7; })), "",
       "dtype is not a string"},
      {"shape_negative",
       golden(header("negdim.safetensors",
                     [](json& h) {
                       h["gate.weight"]["shape"] = {-8, 64};
                     })),
       "", "negative or non-integer dimension"},
      {"shape_float",
       golden(header("floatdim.safetensors",
                     [](json& h) {
                       h["gate.weight"]["shape"] = {8.5, 64};
                     })),
       "", "negative or non-integer dimension"},
      {"shape_overflow",
       golden(header("bigshape.safetensors",
                     [](json& h) {
                       h["gate.weight"]["shape"] = {uint64_t(1) << 40, uint64_t(1) << 40};
                     })),
       "", "overflows"},
      {"shape_rank_5",
       golden(header("rank5.safetensors",
                     [](json& h) {
                       h["gate.weight"]["shape"] = {1, 1, 1, 1, 512};
                     })),
       "", "rank 5"},
      {"offsets_missing",
       golden(header("nooff.safetensors", [](json& h) { h["gate.weight"].erase("data_offsets"); })),
       "", "has no 'data_offsets'"},
      {"offsets_not_pair",
       golden(header("offnum.safetensors", [](json& h) { h["gate.weight"]["data_offsets"] = 5; })),
       "", "data_offsets"},
      {"offsets_reversed",
       golden(header("offrev.safetensors",
                     [](json& h) {
                       auto& o = h["gate.weight"]["data_offsets"];
                       o = {o[1], o[0]};
                     })),
       "", "out of order"},
      {"offsets_beyond_data",
       golden(header(
           "offbig.safetensors",
           [](json& h) {
             h["gate.weight"]["data_offsets"] = {uint64_t(1) << 62, (uint64_t(1) << 62) + 1024};
           })),
       "", "reach beyond the data section"},
      {"offsets_overlap",
       golden(header("overlap.safetensors",
                     [](json& h) {
                       h["input"]["data_offsets"] = h["output"]["data_offsets"];
                       h["input"]["dtype"] = "F32";
                     })),
       "", "overlap"},
      {"offsets_wrong_size",
       golden(header("offsize.safetensors",
                     [](json& h) {
                       h["gate.weight"]["shape"] = {4, 64};
                     })),
       "", "bytes but"},
      {"file_truncated",
       [] {
         const std::string p = write_layer("full.safetensors", [](LayerFile&) {});
         std::ifstream in(p, std::ios::binary);
         const std::string bytes((std::istreambuf_iterator<char>(in)), {});
         write_bytes(path_of("truncated.safetensors"), bytes.substr(0, bytes.size() * 2 / 3));
         return "run --golden " + path_of("truncated.safetensors");
       },
       "", "reach beyond the data section"},
      // ---- layer files: metadata ----
      {"metadata_missing",
       golden(layer("nometa.safetensors", [](LayerFile& f) { f.metadata.clear(); })), "",
       "__metadata__ has no 'config' entry"},
      {"metadata_config_not_json",
       golden(
           layer("badmeta.safetensors", [](LayerFile& f) { f.metadata["config"] = "{hidden:"; })),
       "", "__metadata__.config is not valid JSON"},
      {"metadata_hidden_negative",
       golden(layer("neghidden.safetensors",
                    [](LayerFile& f) {
                      json c = json::parse(f.metadata["config"]);
                      c["hidden"] = -64;
                      f.metadata["config"] = c.dump();
                    })),
       "", "invalid layer"},
      {"metadata_hidden_huge",
       golden(layer("hugehidden.safetensors",
                    [](LayerFile& f) {
                      json c = json::parse(f.metadata["config"]);
                      c["hidden"] = int64_t(1) << 40;
                      f.metadata["config"] = c.dump();
                    })),
       "", "'hidden' must be an integer"},
      {"metadata_experts_string",
       golden(layer("strexperts.safetensors",
                    [](LayerFile& f) {
                      json c = json::parse(f.metadata["config"]);
                      c["n_routed_experts"] = "8";
                      f.metadata["config"] = c.dump();
                    })),
       "", "'n_routed_experts' must be an integer"},
      // ---- layer files: weights ----
      {"weight_missing",
       golden(layer("noexpert.safetensors",
                    [](LayerFile& f) { f.tensors.erase("experts.3.up_proj.weight"); })),
       "", "experts.3.up_proj.weight"},
      {"weight_wrong_shape",
       golden(layer("gateshape.safetensors",
                    [](LayerFile& f) {
                      f.tensors["gate.weight"] = Tensor::zeros(DType::kBF16, {8, 32});
                    })),
       "", "'gate.weight' has shape [8, 32], expected [8, 64]"},
      {"weight_int_dtype",
       golden(
           layer("intweight.safetensors",
                 [](LayerFile& f) {
                   f.tensors["experts.2.gate_proj.weight"] = Tensor::zeros(DType::kI32, {32, 64});
                 })),
       "", "'experts.2.gate_proj.weight' holds i32, expected a float dtype"},
      {"weight_extra_expert",
       golden(
           layer("extra.safetensors",
                 [](LayerFile& f) {
                   f.tensors["experts.8.gate_proj.weight"] = Tensor::zeros(DType::kBF16, {32, 64});
                 })),
       "", "more routed experts than the configured 8"},
      {"weight_nan",
       golden(layer("nan.safetensors",
                    [expert](LayerFile& f) { poke_f32_or_bf16(f.tensors[expert], 70, NAN); })),
       "", "'experts.1.down_proj.weight' holds a non-finite value"},
      {"weight_inf",
       golden(layer("inf.safetensors",
                    [](LayerFile& f) { poke_f32_or_bf16(f.tensors["gate.weight"], 3, INFINITY); })),
       "", "'gate.weight' holds a non-finite value"},
      {"weight_nan_shared",
       golden(layer("nanshared.safetensors",
                    [](LayerFile& f) {
                      poke_f32_or_bf16(f.tensors["shared_experts.up_proj.weight"], 0, NAN);
                    })),
       "", "'shared_experts.up_proj.weight' holds a non-finite value"},
      {"weight_nan_shared_fused",
       golden(layer("nanfused.safetensors",
                    [](LayerFile& f) {
                      poke_f32_or_bf16(f.tensors["shared_experts.down_proj.weight"], 5, -NAN);
                    }),
              "--fuse-shared"),
       "", "'shared_experts.down_proj.weight' holds a non-finite value"},
      {"bias_nan",
       golden(layer(
           "nanbias.safetensors",
           [](LayerFile& f) { f.tensors["gate.e_score_correction_bias"].as<float>()[2] = NAN; })),
       "", "'gate.e_score_correction_bias' holds a non-finite value"},
      // ---- layer files: golden tensors ----
      {"input_missing",
       golden(layer("noinput.safetensors", [](LayerFile& f) { f.tensors.erase("input"); })), "",
       "tensor 'input' not found"},
      {"input_wrong_hidden",
       golden(layer("inputshape.safetensors",
                    [](LayerFile& f) {
                      f.tensors["input"] = Tensor::zeros(DType::kBF16, {6, 32});
                    })),
       "", "'input' has shape [6, 32], expected [T, 64]"},
      {"input_int",
       golden(layer("inputint.safetensors",
                    [](LayerFile& f) {
                      f.tensors["input"] = Tensor::zeros(DType::kI32, {6, 64});
                    })),
       "", "'input' holds i32"},
      {"output_wrong_rows",
       golden(layer("outshape.safetensors",
                    [](LayerFile& f) {
                      f.tensors["output"] = Tensor::zeros(DType::kF32, {5, 64});
                    })),
       "", "'output' has shape [5, 64], expected [6, 64]"},
      {"output_nan",
       golden(layer("outnan.safetensors",
                    [](LayerFile& f) { f.tensors["output"].as<float>()[9] = NAN; })),
       "", "'output' holds nan"},
      {"topk_ids_1x1",
       golden(layer("ids11.safetensors",
                    [](LayerFile& f) {
                      f.tensors["topk_ids"] = Tensor::zeros(DType::kI32, {1, 1});
                    })),
       "", "'topk_ids' has shape [1, 1], expected [6, 2]"},
      {"topk_ids_float",
       golden(layer("idsf.safetensors",
                    [](LayerFile& f) {
                      f.tensors["topk_ids"] = Tensor::zeros(DType::kF32, {6, 2});
                    })),
       "", "'topk_ids' holds f32, expected an integer dtype"},
      {"topk_ids_out_of_range",
       golden(layer("idsrange.safetensors",
                    [](LayerFile& f) { f.tensors["topk_ids"].as<int32_t>()[3] = 8; })),
       "", "'topk_ids' holds 8 at [1, 1]"},
      {"topk_ids_negative",
       golden(layer("idsneg.safetensors",
                    [](LayerFile& f) { f.tensors["topk_ids"].as<int32_t>()[0] = -1; })),
       "", "'topk_ids' holds -1 at [0, 0]"},
      {"topk_ids_i64_huge",
       golden(layer("ids64.safetensors",
                    [](LayerFile& f) {
                      Tensor t = Tensor::zeros(DType::kI64, {6, 2});
                      t.as<int64_t>()[5] = int64_t(1) << 40;
                      f.tensors["topk_ids"] = std::move(t);
                    })),
       "", "'topk_ids' holds 1099511627776 at [2, 1]"},
      {"topk_weights_wrong_shape",
       golden(layer("wshape.safetensors",
                    [](LayerFile& f) {
                      f.tensors["topk_weights"] = Tensor::zeros(DType::kF32, {6, 3});
                    })),
       "", "'topk_weights' has shape [6, 3], expected [6, 2]"},
      {"topk_weights_int",
       golden(layer("wint.safetensors",
                    [](LayerFile& f) {
                      f.tensors["topk_weights"] = Tensor::zeros(DType::kI64, {6, 2});
                    })),
       "", "'topk_weights' holds i64"},
      // ---- a rank fails in the middle of the layer (its input holds a NaN) ----
      {"input_nan_low_latency",
       golden(layer("xnan_ll.safetensors",
                    [](LayerFile& f) {
                      f.tensors["input"].as<bf16>()[5 * 64 + 1] = f32_to_bf16(NAN);
                    }),
              "--ranks 2 --mode low-latency"),
       "", "NaN"},
      {"input_nan_normal",
       golden(layer("xnan_n.safetensors",
                    [](LayerFile& f) { f.tensors["input"].as<bf16>()[0] = f32_to_bf16(NAN); }),
              "--ranks 4"),
       "", "NaN"},
  };
}

void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

class Hostile : public ::testing::TestWithParam<Case> {};

TEST_P(Hostile, OneClearErrorLineInBoundedTimeAndMemory) {
  const Case& c = GetParam();
  const std::string args = c.args();
  const Outcome o = run_cli(args, c.env);
  SCOPED_TRACE("epmoe " + args + (c.env.empty() ? "" : " with " + c.env));
  EXPECT_NE(o.code, 0) << o.err;
  EXPECT_NE(o.code, 124) << "timed out after " << kTimeLimitS << " s";
  EXPECT_LT(o.code, 128) << "killed by a signal: " << o.err;
  EXPECT_LT(o.seconds, double(kTimeLimitS));
  // Exactly one line on stderr: "epmoe: error: ..." naming the problem.
  EXPECT_EQ(std::count(o.err.begin(), o.err.end(), '\n'), 1) << o.err;
  EXPECT_EQ(o.err.rfind("epmoe: error: ", 0), 0u) << o.err;
  EXPECT_NE(o.err.find(c.needle), std::string::npos)
      << "expected '" << c.needle << "' in: " << o.err;
  EXPECT_EQ(o.err.find("Sanitizer"), std::string::npos) << o.err;
  EXPECT_EQ(o.err.find("runtime error"), std::string::npos) << o.err;  // UBSan
}

INSTANTIATE_TEST_SUITE_P(Cases, Hostile, ::testing::ValuesIn(cases()),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           return info.param.name;
                         });

// ---------------------------------------------------------------------------------------------
// The communicator: a failing rank frees nothing a peer still writes into, and its peers stop
// at once naming it (ASan and TSan run these).

TEST(HostileComm, FailingRankFreesNoWindowUnderWritingPeers) {
  for (int round = 0; round < 20; ++round) {
    ThreadGroup group(4);
    std::atomic<int> writes{0};
    try {
      group.run([&](Communicator& comm) {
        comm.set_wait_timeout_ms(5000);
        std::unique_ptr<Window> w = comm.create_window(4096);
        if (comm.rank() == 2) throw Error(ErrorKind::kNumeric, "rank 2 found a NaN");
        // Peers keep writing into their slices of rank 2's window while rank 2 unwinds, then
        // wait for a flag it never raises (and learn that it failed).
        char* slice = static_cast<char*>(w->peer(2)) + 1024 * comm.rank();
        for (int i = 0; i < 2000; ++i) {
          std::memset(slice, i & 0xff, 1024);
          ++writes;
        }
        const uint64_t* flag = static_cast<const uint64_t*>(w->local());
        comm.wait_flag(flag, 1, 2, "a flag rank 2 never raises");
      });
      FAIL() << "the failure went unnoticed";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::kNumeric) << e.what();  // the root cause, not a peer's wait
      EXPECT_NE(std::string(e.what()).find("rank 2 found a NaN"), std::string::npos);
    }
  }
}

TEST(HostileComm, PeersOfAFailedRankStopAtOnceNamingIt) {
  ThreadGroup group(3);
  std::vector<std::string> peer_errors(3);
  const auto start = std::chrono::steady_clock::now();
  EXPECT_THROW(group.run([&](Communicator& comm) {
    comm.set_wait_timeout_ms(60000);
    if (comm.rank() == 1) throw Error(ErrorKind::kBadFile, "rank 1 cannot read");
    try {
      comm.barrier();
    } catch (const Error& e) {
      peer_errors[size_t(comm.rank())] = e.what();
      throw;
    }
  }),
               Error);
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
  for (int r : {0, 2})
    EXPECT_NE(peer_errors[size_t(r)].find("peer rank 1 failed"), std::string::npos)
        << peer_errors[size_t(r)];
}

TEST(HostileComm, SetupTimeoutLeaksNoWindow) {
  // Rank 1 never creates its window: the others time out in the collective; under ASan's leak
  // checker an unowned block would be reported at exit.
  ThreadGroup group(3);
  try {
    group.run([&](Communicator& comm) {
      comm.set_wait_timeout_ms(200);
      if (comm.rank() == 1) return;
      (void)comm.create_window(1 << 16);
    });
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kTimeout);
    EXPECT_NE(std::string(e.what()).find("missing 1"), std::string::npos) << e.what();
  }
  // The group is usable again.
  group.run([&](Communicator& comm) { (void)comm.create_window(64); });
}

TEST(HostileComm, WindowsWithinTheBufferBudget) {
  ::setenv("EPMOE_MAX_BUFFER_BYTES", "100000", 1);
  env_reload();
  ThreadGroup group(2);
  try {
    group.run([&](Communicator& comm) { (void)comm.create_window(80000); });
    FAIL() << "two 80000-byte windows fit a 100000-byte budget";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("buffer budget of 100000 bytes"), std::string::npos)
        << e.what();
  }
  ::unsetenv("EPMOE_MAX_BUFFER_BYTES");
  env_reload();
  group.run([&](Communicator& comm) { (void)comm.create_window(80000); });
}

TEST(HostileCore, CheckedArithmetic) {
  EXPECT_EQ(checked_mul(int64_t(1) << 31, int64_t(1) << 31, "x"), int64_t(1) << 62);
  EXPECT_THROW(checked_mul(int64_t(1) << 32, int64_t(1) << 32, "x"), Error);
  EXPECT_THROW(checked_add(std::numeric_limits<int64_t>::max(), int64_t(1), "x"), Error);
  EXPECT_THROW(checked_mul(int64_t(-1), int64_t(2), "x"), Error);
  EXPECT_THROW(checked_mul(~size_t(0), size_t(2), "x"), Error);
  EXPECT_THROW(Shape({int64_t(1) << 40, int64_t(1) << 40}).numel(), Error);
  EXPECT_THROW(Tensor(DType::kF32, {int64_t(1) << 62, 4}), Error);
  EXPECT_EQ(parse_int_in_range("42", 0, 100, "n"), 42);
  for (const char* bad : {"", "-", "+1", " 1", "1 ", "0x1", "101", "-1", "99999999999999999999"})
    EXPECT_THROW(parse_int_in_range(bad, 0, 100, "n"), Error) << bad;
  try {
    checked_mul(int64_t(1) << 40, int64_t(1) << 40, "the window size");
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("the window size overflows"), std::string::npos);
  }
}

}  // namespace
}  // namespace epmoe
