// Safetensors reader/writer, checkpoint loader and random init (epmoe/weights).
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "epmoe/core/config.h"
#include "epmoe/core/tensor.h"
#include "epmoe/experts/experts_cpu.h"
#include "epmoe/weights/fp8_block.h"
#include "epmoe/weights/moe_weights.h"
#include "epmoe/weights/safetensors.h"

namespace epmoe {
namespace {

namespace fs = std::filesystem;

// Runs fn, expects an epmoe::Error of `kind` whose message contains every string of `parts`.
void expect_error(const std::function<void()>& fn, ErrorKind kind,
                  const std::vector<std::string>& parts) {
  try {
    fn();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), kind) << "message: " << e.what();
    for (const std::string& p : parts) {
      EXPECT_NE(std::string(e.what()).find(p), std::string::npos)
          << "message lacks '" << p << "': " << e.what();
    }
    return;
  }
  ADD_FAILURE() << "no epmoe::Error of kind " << error_kind_name(kind) << " thrown";
}

class TempDir {
 public:
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "epmoe_weights_XXXXXX").string();
    EXPECT_NE(::mkdtemp(tmpl.data()), nullptr);
    path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string file(const std::string& name) const { return (fs::path(path_) / name).string(); }

 private:
  std::string path_;
};

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(bytes.data(), std::streamsize(bytes.size()));
}

// 8-byte little-endian length + header + `data_bytes` zero bytes of data section.
std::string raw_file(const std::string& header, size_t data_bytes) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = char(uint64_t(header.size()) >> (8 * i));
  return s + header + std::string(data_bytes, '\0');
}

void fill_random_bytes(const Tensor& t, uint32_t seed) {
  std::mt19937 rng(seed);
  auto* p = static_cast<uint8_t*>(t.view().data);
  for (size_t i = 0; i < t.nbytes(); ++i) p[i] = uint8_t(rng());
}

bool same_bytes(const TensorView& a, const TensorView& b) {
  return a.dtype == b.dtype && a.shape == b.shape && std::memcmp(a.data, b.data, a.nbytes()) == 0;
}

// Row r, columns [c0, c0 + n) of a row-major [rows, cols] tensor equal to those of another.
bool same_row(const TensorView& a, int64_t ra, int64_t ca, const TensorView& b, int64_t rb,
              int64_t cb, int64_t n) {
  const size_t es = dtype_size(a.dtype);
  const auto* pa = static_cast<const uint8_t*>(a.data) + (ra * a.shape[a.shape.rank - 1] + ca) * es;
  const auto* pb = static_cast<const uint8_t*>(b.data) + (rb * b.shape[b.shape.rank - 1] + cb) * es;
  return std::memcmp(pa, pb, size_t(n) * es) == 0;
}

// Bank expert e as views: gate/up [I, H], down [H, I].
TensorView bank_part(const Tensor& bank, int64_t e, int part, const MoeConfig& c) {
  const int64_t I = c.moe_intermediate, H = c.hidden;
  const size_t es = dtype_size(bank.dtype());
  auto* base = static_cast<uint8_t*>(bank.view().data);
  if (part == 2) return TensorView{base + size_t(e * H * I) * es, Shape{H, I}, bank.dtype()};
  return TensorView{base + size_t((e * 2 + part) * I * H) * es, Shape{I, H}, bank.dtype()};
}

MoeWeights clone(const MoeWeights& w) {
  MoeWeights c;
  c.config = w.config;
  c.gate = to_dtype(w.gate, w.gate.dtype());
  c.gate_bias = to_dtype(w.gate_bias, w.gate_bias.dtype());
  c.w13 = to_dtype(w.w13, w.w13.dtype());
  c.w2 = to_dtype(w.w2, w.w2.dtype());
  c.shared_w13 = to_dtype(w.shared_w13, w.shared_w13.dtype());
  c.shared_w2 = to_dtype(w.shared_w2, w.shared_w2.dtype());
  c.w13_scale = to_dtype(w.w13_scale, w.w13_scale.dtype());
  c.w2_scale = to_dtype(w.w2_scale, w.w2_scale.dtype());
  return c;
}

MoeConfig small_config(int n_shared) {
  return MoeConfig{.hidden = 16,
                   .moe_intermediate = 8,
                   .n_routed_experts = 4,
                   .top_k = 2,
                   .n_group = 2,
                   .topk_group = 1,
                   .n_shared_experts = n_shared,
                   .routed_scaling_factor = 2.5f,
                   .norm_topk_prob = true,
                   .scoring = Scoring::kSigmoid};
}

// Copies a file's tensors (zero-copy views) and metadata, lets `edit` change them, writes `dst`.
// The source stays mapped until the copy is written.
void rewrite(const std::string& src, const std::string& dst,
             const std::function<void(std::map<std::string, TensorView>&)>& edit) {
  SafetensorsFile f(src);
  std::map<std::string, TensorView> t;
  for (const auto& n : f.names()) t[n] = f.tensor(n);
  edit(t);
  write_safetensors(dst, t, f.metadata());
}

// ---------------------------------------------------------------------------------------------
// Safetensors

TEST(Safetensors, RoundTripEveryDtype) {
  TempDir dir;
  std::map<std::string, Tensor> owned;
  owned["f32"] = Tensor(DType::kF32, Shape{2, 3});
  owned["bf16_odd"] = Tensor(DType::kBF16, Shape{5});
  owned["f16"] = Tensor(DType::kF16, Shape{3, 1});
  owned["fp8"] = Tensor(DType::kF8E4M3, Shape{7});
  owned["i32_rank4"] = Tensor(DType::kI32, Shape{1, 2, 3, 1});
  owned["i64"] = Tensor(DType::kI64, Shape{4});
  owned["scalar"] = Tensor(DType::kF32, Shape{});
  owned["empty"] = Tensor(DType::kBF16, Shape{0, 4});
  std::map<std::string, TensorView> views;
  uint32_t seed = 1;
  for (auto& [name, t] : owned) {
    fill_random_bytes(t, seed++);
    views[name] = t.view();
  }
  const std::map<std::string, std::string> meta = {{"format", "pt"}, {"note", "x\"y"}};
  const std::string path = dir.file("all.safetensors");
  write_safetensors(path, views, meta);

  SafetensorsFile f(path);
  EXPECT_EQ(f.path(), path);
  EXPECT_EQ(f.metadata(), meta);
  EXPECT_EQ(f.num_tensors(), owned.size());
  std::vector<std::string> expect_names;
  for (const auto& kv : owned) expect_names.push_back(kv.first);
  EXPECT_EQ(f.names(), expect_names);
  for (const auto& [name, t] : owned) {
    SCOPED_TRACE(name);
    const TensorView v = f.tensor(name);
    EXPECT_EQ(v.device, Device::kCpu);
    EXPECT_TRUE(same_bytes(v, t.view()));
    EXPECT_TRUE(f.is_aligned(name));  // the writer orders tensors by element size
    EXPECT_EQ(f.entry(name).nbytes, t.nbytes());
  }
  // The header is padded so the data section starts 8-byte aligned.
  std::ifstream in(path, std::ios::binary);
  uint64_t n = 0;
  in.read(reinterpret_cast<char*>(&n), 8);
  EXPECT_EQ((8 + n) % 8, 0u);

  // Moving keeps the mapping alive.
  SafetensorsFile g = std::move(f);
  EXPECT_TRUE(same_bytes(g.tensor("i64"), owned["i64"].view()));
}

TEST(Safetensors, MissingTensorNamesTensorAndFile) {
  TempDir dir;
  const std::string path = dir.file("one.safetensors");
  Tensor t = Tensor::zeros(DType::kF32, Shape{2});
  write_safetensors(path, {{"a", t.view()}});
  SafetensorsFile f(path);
  EXPECT_TRUE(f.contains("a"));
  EXPECT_FALSE(f.contains("b"));
  expect_error([&] { f.tensor("experts.9.up_proj.weight"); }, ErrorKind::kMissingTensor,
               {"experts.9.up_proj.weight", path});
}

TEST(Safetensors, UnalignedTensorsAreReadable) {
  // Other writers may place an F32 tensor at an odd offset; the format allows it.
  TempDir dir;
  std::string header = R"({"a": {"dtype": "BF16", "shape": [1], "data_offsets": [0, 2]},)"
                       R"( "b": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}})";
  header.append((8 - header.size() % 8) % 8, ' ');
  std::string bytes = raw_file(header, 0);
  const float v = 3.25f;
  bytes += std::string("\x80\x3f", 2) + std::string(reinterpret_cast<const char*>(&v), 4);
  const std::string path = dir.file("odd.safetensors");
  write_bytes(path, bytes);
  SafetensorsFile f(path);
  EXPECT_TRUE(f.is_aligned("a"));
  EXPECT_FALSE(f.is_aligned("b"));
  float got = 0;
  std::memcpy(&got, f.tensor("b").data, 4);
  EXPECT_EQ(got, 3.25f);
}

struct MalformedCase {
  const char* what;
  std::string bytes;
  std::string message;  // a fragment the error must contain
};

TEST(Safetensors, MalformedFilesThrowBadFile) {
  TempDir dir;
  auto entry = [](const std::string& body) { return "{\"t\": {" + body + "}}"; };
  std::string huge_len(8, '\0');
  huge_len[0] = char(0xe8);  // 1000
  huge_len[1] = char(0x03);
  const std::vector<MalformedCase> cases = {
      {"empty file", "", "shorter than the 8-byte header length"},
      {"4-byte file", std::string(4, '\x10'), "shorter than the 8-byte header length"},
      {"header length beyond EOF", huge_len + "{}  ", "header length 1000 exceeds"},
      {"garbage JSON", raw_file("{\"t\": [1, ", 0), "not valid JSON"},
      {"header an array", raw_file("[1, 2]", 0), "not a JSON object"},
      {"entry not an object", raw_file("{\"t\": 3}", 0), "entry is not a JSON object"},
      {"missing dtype", raw_file(entry("\"shape\": [2], \"data_offsets\": [0, 8]"), 8),
       "has no 'dtype'"},
      {"missing shape", raw_file(entry("\"dtype\": \"F32\", \"data_offsets\": [0, 8]"), 8),
       "has no 'shape'"},
      {"missing data_offsets", raw_file(entry("\"dtype\": \"F32\", \"shape\": [2]"), 8),
       "has no 'data_offsets'"},
      {"bad dtype",
       raw_file(entry("\"dtype\": \"Q4_K\", \"shape\": [2], \"data_offsets\": [0, 8]"), 8),
       "unsupported dtype 'Q4_K'"},
      {"unsupported F64",
       raw_file(entry("\"dtype\": \"F64\", \"shape\": [1], \"data_offsets\": [0, 8]"), 8),
       "unsupported dtype 'F64'"},
      {"negative dim",
       raw_file(entry("\"dtype\": \"F32\", \"shape\": [-1, 2], \"data_offsets\": [0, 8]"), 8),
       "negative or non-integer dimension -1"},
      {"non-integer dim",
       raw_file(entry("\"dtype\": \"F32\", \"shape\": [2.5], \"data_offsets\": [0, 8]"), 8),
       "negative or non-integer dimension 2.5"},
      {"rank 5",
       raw_file(entry("\"dtype\": \"F32\", \"shape\": [1,1,1,1,2], \"data_offsets\": [0, 8]"), 8),
       "rank 5"},
      {"size mismatch",
       raw_file(entry("\"dtype\": \"F32\", \"shape\": [2, 2], \"data_offsets\": [0, 12]"), 16),
       "holds 12 bytes but F32 [2, 2] needs 16 bytes"},
      {"offsets beyond the data",
       raw_file(entry("\"dtype\": \"BF16\", \"shape\": [4], \"data_offsets\": [8, 16]"), 8),
       "reach beyond the data section of 8 bytes"},
      {"offsets out of order",
       raw_file(entry("\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [8, 0]"), 8),
       "out of order"},
      {"offsets not integers",
       raw_file(entry("\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0]"), 8),
       "not a pair of non-negative integers"},
      {"overlap",
       raw_file("{\"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]}, "
                "\"b\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [4, 12]}}",
                12),
       "overlap"},
      {"metadata not strings", raw_file("{\"__metadata__\": {\"k\": 3}}", 0),
       "__metadata__ value of 'k'"},
  };
  int i = 0;
  for (const MalformedCase& c : cases) {
    SCOPED_TRACE(c.what);
    const std::string path = dir.file("bad" + std::to_string(i++) + ".safetensors");
    write_bytes(path, c.bytes);
    expect_error([&] { SafetensorsFile f(path); }, ErrorKind::kBadFile, {c.message, path});
  }
  expect_error([&] { SafetensorsFile f(dir.file("does_not_exist.safetensors")); },
               ErrorKind::kBadFile, {"cannot open", "does_not_exist.safetensors"});
}

TEST(Safetensors, WriterRejectsBadTensors) {
  TempDir dir;
  Tensor t = Tensor::zeros(DType::kF32, Shape{2});
  expect_error(
      [&] {
        write_safetensors(dir.file("x"), {{"__metadata__", t.view()}});
      },
      ErrorKind::kInvalidArgument, {"__metadata__"});
  TensorView null_view{nullptr, Shape{2}, DType::kF32, Device::kCpu};
  expect_error(
      [&] {
        write_safetensors(dir.file("x"), {{"n", null_view}});
      },
      ErrorKind::kInvalidArgument, {"has no data"});
  expect_error(
      [&] {
        write_safetensors(dir.file("no/such/dir/x"), {{"t", t.view()}});
      },
      ErrorKind::kBadFile, {"no/such/dir/x"});
}

// ---------------------------------------------------------------------------------------------
// Golden files (transformers DeepseekV3MoE layers)

std::string golden_dir() {
  if (const char* env = std::getenv("EPMOE_GOLDEN_DIR")) return env;
  return std::string(EPMOE_SOURCE_DIR) + "/../shared/golden";
}

struct GoldenCase {
  const char* name;
  int64_t H, I;
  int E, K, n_group, topk_group, n_shared;
  float rsf;
  bool norm;
};

class WeightsGolden : public ::testing::TestWithParam<GoldenCase> {};

TEST_P(WeightsGolden, LoadsWithBothFusionSettings) {
  const GoldenCase& g = GetParam();
  const std::string path = golden_dir() + "/" + g.name + ".safetensors";
  if (!fs::exists(path)) GTEST_SKIP() << "golden file not found: " << path;
  const SafetensorsFile file(path);

  const MoeConfig c = config_from_safetensors_metadata(file);
  EXPECT_EQ(c.hidden, g.H);
  EXPECT_EQ(c.moe_intermediate, g.I);
  EXPECT_EQ(c.n_routed_experts, g.E);
  EXPECT_EQ(c.top_k, g.K);
  EXPECT_EQ(c.n_group, g.n_group);
  EXPECT_EQ(c.topk_group, g.topk_group);
  EXPECT_EQ(c.n_shared_experts, g.n_shared);
  EXPECT_EQ(c.routed_scaling_factor, g.rsf);
  EXPECT_EQ(c.norm_topk_prob, g.norm);
  EXPECT_EQ(c.scoring, Scoring::kSigmoid);
  EXPECT_FALSE(c.fuse_shared);

  const int64_t E = c.n_routed_experts, H = c.hidden, I = c.moe_intermediate;
  const int64_t ns = c.n_shared_experts;
  const TensorView sg = file.tensor("shared_experts.gate_proj.weight");
  const TensorView su = file.tensor("shared_experts.up_proj.weight");
  const TensorView sd = file.tensor("shared_experts.down_proj.weight");

  MoeWeights unfused;
  for (bool fuse : {false, true}) {
    SCOPED_TRACE(fuse ? "fused" : "unfused");
    MoeConfig cf = c;
    cf.fuse_shared = fuse;
    MoeWeights w = load_moe_weights(file, cf);
    validate_moe_weights(w);
    EXPECT_EQ(w.bank_size(), E + (fuse ? ns : 0));
    EXPECT_EQ(w.w13.dtype(), DType::kBF16);
    EXPECT_EQ(w.w13.shape(), (Shape{w.bank_size(), 2 * I, H}));
    EXPECT_EQ(w.w2.shape(), (Shape{w.bank_size(), H, I}));
    EXPECT_TRUE(same_bytes(w.gate.view(), file.tensor("gate.weight")));
    ASSERT_TRUE(w.has_bias());
    EXPECT_TRUE(same_bytes(w.gate_bias.view(), file.tensor("gate.e_score_correction_bias")));
    for (int64_t e = 0; e < E; ++e) {
      const std::string base = "experts." + std::to_string(e) + ".";
      ASSERT_TRUE(same_bytes(bank_part(w.w13, e, 0, cf), file.tensor(base + "gate_proj.weight")));
      ASSERT_TRUE(same_bytes(bank_part(w.w13, e, 1, cf), file.tensor(base + "up_proj.weight")));
      ASSERT_TRUE(same_bytes(bank_part(w.w2, e, 2, cf), file.tensor(base + "down_proj.weight")));
    }
    if (fuse) {
      EXPECT_EQ(w.shared_w13.numel(), 0);
      EXPECT_EQ(w.shared_w2.numel(), 0);
      for (int64_t j = 0; j < ns; ++j) {
        const TensorView bg = bank_part(w.w13, E + j, 0, cf), bu = bank_part(w.w13, E + j, 1, cf);
        const TensorView bd = bank_part(w.w2, E + j, 2, cf);
        for (int64_t r = 0; r < I; ++r) {
          ASSERT_TRUE(same_row(bg, r, 0, sg, j * I + r, 0, H)) << "slice " << j << " row " << r;
          ASSERT_TRUE(same_row(bu, r, 0, su, j * I + r, 0, H)) << "slice " << j << " row " << r;
        }
        for (int64_t h = 0; h < H; ++h) ASSERT_TRUE(same_row(bd, h, 0, sd, h, j * I, I));
      }
      // Fusing the unfused load gives the same bank.
      const MoeWeights refused = with_shared_fusion(clone(unfused), true, false);
      EXPECT_TRUE(same_bytes(refused.w13.view(), w.w13.view()));
      EXPECT_TRUE(same_bytes(refused.w2.view(), w.w2.view()));
    } else {
      EXPECT_EQ(w.shared_w13.shape(), (Shape{2 * ns * I, H}));
      EXPECT_EQ(w.shared_w2.shape(), (Shape{H, ns * I}));
      const size_t half = size_t(ns * I * H) * 2;
      EXPECT_EQ(std::memcmp(w.shared_w13.view().data, sg.data, half), 0);
      EXPECT_EQ(std::memcmp(static_cast<uint8_t*>(w.shared_w13.view().data) + half, su.data, half),
                0);
      EXPECT_TRUE(same_bytes(w.shared_w2.view(), sd));
      // A spot value, decoded: the first element of expert 0's up_proj.
      EXPECT_EQ(bf16_to_f32(bank_part(w.w13, 0, 1, cf).as<bf16>()[0]),
                bf16_to_f32(file.tensor("experts.0.up_proj.weight").as<bf16>()[0]));
      unfused = std::move(w);
    }
  }
  // The path overload reads the same numbers.
  const MoeWeights by_path = load_moe_weights(path, c);
  EXPECT_TRUE(same_bytes(by_path.w13.view(), unfused.w13.view()));
  EXPECT_EQ(config_from_safetensors_metadata(path).summary(), c.summary());
}

INSTANTIATE_TEST_SUITE_P(
    Golden, WeightsGolden,
    ::testing::Values(GoldenCase{"dsv3_small_grouped", 256, 128, 32, 4, 4, 2, 1, 2.5f, true},
                      GoldenCase{"dsv3_routing_256e", 128, 64, 256, 8, 8, 4, 1, 2.5f, true},
                      GoldenCase{"ungrouped_2shared_noscale", 192, 96, 16, 2, 1, 1, 2, 1.0f,
                                 false}),
    [](const ::testing::TestParamInfo<GoldenCase>& info) { return std::string(info.param.name); });

// ---------------------------------------------------------------------------------------------
// Loader on hand-made files

TEST(Weights, SaveLoadRoundTripWithPrefix) {
  TempDir dir;
  for (bool fuse : {false, true}) {
    MoeConfig c = small_config(2);
    c.fuse_shared = fuse;
    const MoeWeights w = random_moe_weights(c, 7);
    const std::string path = dir.file("layer.safetensors");
    const std::string prefix = "model.layers.3.mlp.";
    save_moe_weights(path, w, prefix);
    const MoeWeights r = load_moe_weights(path, c, LoadOptions{.prefix = prefix});
    EXPECT_TRUE(same_bytes(r.gate.view(), w.gate.view()));
    EXPECT_TRUE(same_bytes(r.gate_bias.view(), w.gate_bias.view()));
    EXPECT_TRUE(same_bytes(r.w13.view(), w.w13.view()));
    EXPECT_TRUE(same_bytes(r.w2.view(), w.w2.view()));
    EXPECT_TRUE(same_bytes(r.shared_w13.view(), w.shared_w13.view()));
    EXPECT_TRUE(same_bytes(r.shared_w2.view(), w.shared_w2.view()));
    // The metadata describes the layer (always unfused in checkpoint naming).
    MoeConfig meta = config_from_safetensors_metadata(path);
    meta.fuse_shared = fuse;
    EXPECT_EQ(meta.summary(), c.summary());
    // Without the prefix nothing is found.
    expect_error([&] { load_moe_weights(path, c); }, ErrorKind::kMissingTensor,
                 {"'gate.weight'", path});
  }
}

TEST(Weights, MissingExpertTensorIsNamed) {
  TempDir dir;
  const MoeConfig c = small_config(1);
  const std::string full = dir.file("full.safetensors"), cut = dir.file("cut.safetensors");
  save_moe_weights(full, random_moe_weights(c, 1));
  rewrite(full, cut, [](auto& t) { t.erase("experts.2.up_proj.weight"); });
  expect_error([&] { load_moe_weights(cut, c); }, ErrorKind::kMissingTensor,
               {"experts.2.up_proj.weight", cut});
  rewrite(full, cut, [](auto& t) { t.erase("shared_experts.down_proj.weight"); });
  expect_error([&] { load_moe_weights(cut, c); }, ErrorKind::kMissingTensor,
               {"shared_experts.down_proj.weight"});
  // The bias is optional.
  rewrite(full, cut, [](auto& t) { t.erase("gate.e_score_correction_bias"); });
  const MoeWeights w = load_moe_weights(cut, c);
  EXPECT_FALSE(w.has_bias());
  EXPECT_EQ(w.gate_bias.numel(), 0);
}

TEST(Weights, WrongShapeIsNamed) {
  TempDir dir;
  const MoeConfig c = small_config(1);
  const std::string full = dir.file("full.safetensors"), bad = dir.file("bad.safetensors");
  save_moe_weights(full, random_moe_weights(c, 1));
  // Transposed down_proj: same bytes, [I, H] instead of [H, I].
  rewrite(full, bad, [](auto& t) { t["experts.1.down_proj.weight"].shape = Shape{8, 16}; });
  expect_error([&] { load_moe_weights(bad, c); }, ErrorKind::kBadFile,
               {"experts.1.down_proj.weight", "has shape [8, 16], expected [16, 8]", bad});
  rewrite(full, bad, [](auto& t) { t["gate.e_score_correction_bias"].shape = Shape{2, 2}; });
  expect_error([&] { load_moe_weights(bad, c); }, ErrorKind::kBadFile,
               {"gate.e_score_correction_bias", "[2, 2]", "expected [4]"});
  // A config with fewer experts / no shared expert than the file is a mismatch, not a subset.
  MoeConfig fewer = c;
  fewer.n_routed_experts = 2;
  fewer.n_group = 1;
  expect_error([&] { load_moe_weights(full, fewer); }, ErrorKind::kBadFile, {"gate.weight"});
  MoeConfig no_shared = c;
  no_shared.n_shared_experts = 0;
  expect_error([&] { load_moe_weights(full, no_shared); }, ErrorKind::kBadFile,
               {"shared_experts.gate_proj.weight", "n_shared_experts = 0"});
  // Integer weights are not weights.
  Tensor ints = Tensor::zeros(DType::kI32, Shape{8, 16});
  rewrite(full, bad, [&](auto& t) { t["experts.0.gate_proj.weight"] = ints.view(); });
  expect_error([&] { load_moe_weights(bad, c); }, ErrorKind::kBadFile,
               {"experts.0.gate_proj.weight", "i32"});
}

// Random FP8 e4m3 bytes (never NaN) and block scales.
Tensor random_fp8(int64_t rows, int64_t cols, std::mt19937& rng) {
  Tensor t(DType::kF8E4M3, Shape{rows, cols});
  auto* p = t.as<fp8e4m3>();
  for (int64_t i = 0; i < t.numel(); ++i) {
    uint8_t b = uint8_t(rng());
    if ((b & 0x7f) == 0x7f) b = 0x38;
    p[i] = fp8e4m3{b};
  }
  return t;
}

Tensor random_scales(int64_t rows, int64_t cols, std::mt19937& rng) {
  Tensor s(DType::kF32, Shape{(rows + 127) / 128, (cols + 127) / 128});
  std::uniform_real_distribution<float> d(1e-3f, 3e-2f);
  for (int64_t i = 0; i < s.numel(); ++i) s.as<float>()[i] = d(rng);
  return s;
}

// The value the loader must produce for element (r, c) of an FP8 weight with block scales: exact
// in f32 (fp8 -> f32, one f32 multiply, as transformers dequantises).
float dequant(const Tensor& q, const Tensor& s, int64_t r, int64_t c) {
  const float v = fp8e4m3_to_f32(q.as<fp8e4m3>()[r * q.shape()[1] + c]);
  return v * s.as<float>()[(r / 128) * s.shape()[1] + c / 128];
}

TEST(Weights, Fp8WithBlockScalesDequantises) {
  TempDir dir;
  // Sizes that are not multiples of 128, and a second shared slice that starts inside a block.
  const MoeConfig c{.hidden = 200,
                    .moe_intermediate = 160,
                    .n_routed_experts = 2,
                    .top_k = 1,
                    .n_shared_experts = 2,
                    .scoring = Scoring::kSigmoid};
  const int64_t E = 2, H = 200, I = 160, ns = 2;
  std::mt19937 rng(11);
  std::map<std::string, Tensor> owned;
  auto add_fp8 = [&](const std::string& name, int64_t rows, int64_t cols) {
    owned[name] = random_fp8(rows, cols, rng);
    owned[name + "_scale_inv"] = random_scales(rows, cols, rng);
  };
  owned["gate.weight"] = Tensor::zeros(DType::kBF16, Shape{E, H});
  owned["gate.e_score_correction_bias"] = Tensor(DType::kBF16, Shape{E});
  owned["gate.e_score_correction_bias"].as<bf16>()[0] = f32_to_bf16(0.25f);
  owned["gate.e_score_correction_bias"].as<bf16>()[1] = f32_to_bf16(-1.5f);
  for (int64_t e = 0; e < E; ++e) {
    const std::string base = "experts." + std::to_string(e) + ".";
    add_fp8(base + "gate_proj.weight", I, H);
    add_fp8(base + "up_proj.weight", I, H);
    add_fp8(base + "down_proj.weight", H, I);
  }
  add_fp8("shared_experts.gate_proj.weight", ns * I, H);
  add_fp8("shared_experts.up_proj.weight", ns * I, H);
  add_fp8("shared_experts.down_proj.weight", H, ns * I);
  std::map<std::string, TensorView> views(owned.begin(), owned.end());
  const std::string path = dir.file("fp8.safetensors");
  write_safetensors(path, views);

  for (bool fuse : {false, true}) {
    SCOPED_TRACE(fuse ? "fused" : "unfused");
    MoeConfig cf = c;
    cf.fuse_shared = fuse;
    const MoeWeights w = load_moe_weights(path, cf);
    ASSERT_EQ(w.w13.dtype(), DType::kF32);
    EXPECT_EQ(w.gate_bias.dtype(), DType::kF32);
    EXPECT_EQ(w.gate_bias.as<float>()[0], 0.25f);
    EXPECT_EQ(w.gate_bias.as<float>()[1], -1.5f);
    auto check = [&](const TensorView& got, const std::string& name, int64_t r0, int64_t c0) {
      const Tensor& q = owned[name];
      const Tensor& s = owned[name + "_scale_inv"];
      for (int64_t r = 0; r < got.shape[0]; ++r) {
        for (int64_t k = 0; k < got.shape[1]; ++k) {
          ASSERT_EQ(got.as<float>()[r * got.shape[1] + k], dequant(q, s, r0 + r, c0 + k))
              << name << " at (" << r0 + r << ", " << c0 + k << ")";
        }
      }
    };
    for (int64_t e = 0; e < E; ++e) {
      const std::string base = "experts." + std::to_string(e) + ".";
      check(bank_part(w.w13, e, 0, cf), base + "gate_proj.weight", 0, 0);
      check(bank_part(w.w13, e, 1, cf), base + "up_proj.weight", 0, 0);
      check(bank_part(w.w2, e, 2, cf), base + "down_proj.weight", 0, 0);
    }
    if (fuse) {
      for (int64_t j = 0; j < ns; ++j) {
        check(bank_part(w.w13, E + j, 0, cf), "shared_experts.gate_proj.weight", j * I, 0);
        check(bank_part(w.w13, E + j, 1, cf), "shared_experts.up_proj.weight", j * I, 0);
        check(bank_part(w.w2, E + j, 2, cf), "shared_experts.down_proj.weight", 0, j * I);
      }
    } else {
      auto* base = static_cast<uint8_t*>(w.shared_w13.view().data);
      check(TensorView{base, Shape{ns * I, H}, DType::kF32}, "shared_experts.gate_proj.weight", 0,
            0);
      check(TensorView{base + ns * I * H * 4, Shape{ns * I, H}, DType::kF32},
            "shared_experts.up_proj.weight", 0, 0);
      check(w.shared_w2.view(), "shared_experts.down_proj.weight", 0, 0);
    }
  }

  // keep_fp8: the bank as stored, its scales as stored; dequantised, bitwise the default load.
  // Two fused shared slices of I = 160 would split a block: refused.
  {
    const MoeWeights kept = load_moe_weights(path, c, LoadOptions{.keep_fp8 = true});
    ASSERT_TRUE(kept.fp8());
    validate_moe_weights(kept);
    EXPECT_EQ(kept.w13_scale.shape(), (Shape{E, 4, 2}));
    EXPECT_EQ(kept.w2_scale.shape(), (Shape{E, 2, 2}));
    EXPECT_EQ(kept.shared_w13.dtype(), DType::kF32);
    for (int64_t e = 0; e < E; ++e) {
      const std::string base = "experts." + std::to_string(e) + ".";
      const auto* q13 = kept.w13.as<fp8e4m3>() + e * 2 * I * H;
      EXPECT_EQ(std::memcmp(q13, owned[base + "gate_proj.weight"].view().data, size_t(I * H)), 0);
      EXPECT_EQ(std::memcmp(q13 + I * H, owned[base + "up_proj.weight"].view().data, size_t(I * H)),
                0);
      const float* s13 = kept.w13_scale.as<float>() + e * 8;
      EXPECT_EQ(std::memcmp(s13, owned[base + "gate_proj.weight_scale_inv"].view().data, 16), 0);
      EXPECT_EQ(std::memcmp(s13 + 4, owned[base + "up_proj.weight_scale_inv"].view().data, 16), 0);
    }
    const MoeWeights deq = dequantize_moe_weights(clone(kept));
    const MoeWeights plain = load_moe_weights(path, c);
    ASSERT_EQ(deq.w13.dtype(), DType::kF32);
    EXPECT_EQ(std::memcmp(deq.w13.view().data, plain.w13.view().data, plain.w13.nbytes()), 0);
    EXPECT_EQ(std::memcmp(deq.w2.view().data, plain.w2.view().data, plain.w2.nbytes()), 0);
    EXPECT_EQ(std::memcmp(kept.shared_w13.view().data, plain.shared_w13.view().data,
                          plain.shared_w13.nbytes()),
              0);
    MoeConfig cf = c;
    cf.fuse_shared = true;
    expect_error([&] { load_moe_weights(path, cf, LoadOptions{.keep_fp8 = true}); },
                 ErrorKind::kUnsupported, {"moe_intermediate % 128"});
    expect_error([&] { save_moe_weights(dir.file("x.safetensors"), kept); },
                 ErrorKind::kUnsupported, {"FP8"});
  }

  // A missing or mis-shaped scale is named.
  const std::string bad = dir.file("bad.safetensors");
  rewrite(path, bad, [](auto& t) { t.erase("experts.1.up_proj.weight_scale_inv"); });
  expect_error([&] { load_moe_weights(bad, c); }, ErrorKind::kMissingTensor,
               {"experts.1.up_proj.weight_scale_inv"});
  rewrite(path, bad, [](auto& t) { t["experts.0.down_proj.weight_scale_inv"].shape = Shape{4}; });
  expect_error([&] { load_moe_weights(bad, c); }, ErrorKind::kBadFile,
               {"experts.0.down_proj.weight_scale_inv", "expected [2, 2]"});
}

TEST(Weights, F16AndF32KeepEveryBit) {
  TempDir dir;
  const MoeConfig c = small_config(1);
  const MoeWeights ref = random_moe_weights(c, 3);
  const std::string full = dir.file("full.safetensors"), conv = dir.file("conv.safetensors");
  save_moe_weights(full, ref);
  // Experts in F16 with values bf16 cannot hold (11-bit mantissas): the bank must become f32.
  // Gate in F32 stays f32; a BF16 bias converts to f32.
  std::map<std::string, Tensor> owned;
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> d(-1.f, 1.f);
  rewrite(full, conv, [&](auto& t) {
    for (auto& [name, v] : t) {
      if (name.rfind("experts.", 0) == 0 || name.rfind("shared_experts.", 0) == 0) {
        Tensor h(DType::kF16, v.shape);
        for (int64_t i = 0; i < h.numel(); ++i) h.as<f16>()[i] = f32_to_f16(d(rng));
        owned[name] = std::move(h);
        v = owned[name].view();
      }
    }
    owned["gate"] = to_f32(t["gate.weight"]);
    t["gate.weight"] = owned["gate"].view();
    owned["bias"] = to_dtype(t["gate.e_score_correction_bias"], DType::kBF16);
    t["gate.e_score_correction_bias"] = owned["bias"].view();
  });
  const MoeWeights w = load_moe_weights(conv, c);
  EXPECT_EQ(w.w13.dtype(), DType::kF32);
  EXPECT_EQ(w.shared_w13.dtype(), DType::kF32);
  EXPECT_EQ(w.gate.dtype(), DType::kF32);
  EXPECT_TRUE(same_bytes(w.gate.view(), owned["gate"].view()));
  const char* parts[] = {"gate_proj", "up_proj", "down_proj"};
  for (int64_t e = 0; e < c.n_routed_experts; ++e) {
    for (int p = 0; p < 3; ++p) {
      const Tensor& src = owned["experts." + std::to_string(e) + "." + parts[p] + ".weight"];
      const TensorView got = bank_part(p == 2 ? w.w2 : w.w13, e, p, c);
      for (int64_t k = 0; k < src.numel(); ++k)
        ASSERT_EQ(got.as<float>()[k], f16_to_f32(src.as<f16>()[k])) << parts[p] << " " << e;
    }
  }
  for (int64_t e = 0; e < c.n_routed_experts; ++e)
    EXPECT_EQ(w.gate_bias.as<float>()[e], round_bf16(ref.gate_bias.as<float>()[e]));
}

TEST(Weights, ConfigFromMetadataNamesBadKeys) {
  TempDir dir;
  Tensor t = Tensor::zeros(DType::kF32, Shape{1});
  const std::string good =
      R"({"hidden": 256, "moe_intermediate": 128, "n_routed_experts": 32, "top_k": 4,
          "n_group": 4, "topk_group": 2, "n_shared_experts": 1, "routed_scaling_factor": 2.5,
          "norm_topk_prob": true, "scoring": "sigmoid", "tokens": 37})";
  auto with_config = [&](const std::string& name, const std::map<std::string, std::string>& m) {
    const std::string path = dir.file(name);
    write_safetensors(path, {{"t", t.view()}}, m);
    return path;
  };
  const MoeConfig c = config_from_safetensors_metadata(with_config("good", {{"config", good}}));
  EXPECT_EQ(c.n_routed_experts, 32);
  EXPECT_EQ(c.routed_scaling_factor, 2.5f);

  auto replace = [&](const std::string& from, const std::string& to) {
    std::string s = good;
    s.replace(s.find(from), from.size(), to);
    return s;
  };
  const std::string no_meta = with_config("none", {});
  expect_error([&] { config_from_safetensors_metadata(no_meta); }, ErrorKind::kBadFile,
               {"no 'config'", no_meta});
  struct Case {
    std::string config, message;
  };
  const std::vector<Case> cases = {
      {"not json", "not valid JSON"},
      {"[1]", "not a JSON object"},
      {replace("\"top_k\": 4,", ""), "has no 'top_k'"},
      {replace("\"hidden\": 256", "\"hidden\": \"256\""), "'hidden' must be an integer"},
      {replace("\"n_group\": 4", "\"n_group\": 4.5"), "'n_group' must be an integer"},
      {replace("\"routed_scaling_factor\": 2.5", "\"routed_scaling_factor\": null"),
       "'routed_scaling_factor' must be a number"},
      {replace("\"norm_topk_prob\": true", "\"norm_topk_prob\": 1"),
       "'norm_topk_prob' must be true or false"},
      {replace("\"sigmoid\"", "\"relu\""), "'scoring' must be"},
      {replace("\"n_group\": 4", "\"n_group\": 5"), "invalid layer"},
  };
  int i = 0;
  for (const Case& k : cases) {
    SCOPED_TRACE(k.config);
    const std::string path = with_config("bad" + std::to_string(i++), {{"config", k.config}});
    expect_error([&] { config_from_safetensors_metadata(path); }, ErrorKind::kBadFile,
                 {k.message, path});
  }
}

// ---------------------------------------------------------------------------------------------
// Random init and shared-expert fusion

TEST(Weights, RandomIsDeterministicAndScaled) {
  const MoeConfig c = find_preset("deepseek-v3-tiny").config;
  const auto t0 = std::chrono::steady_clock::now();
  const MoeWeights a = random_moe_weights(c, 42);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  RecordProperty("deepseek_v3_tiny_init_ms", std::to_string(int(secs * 1000)));
  EXPECT_LT(secs, 5.0) << "random init of deepseek-v3-tiny took " << secs << " s";
  validate_moe_weights(a);
  const MoeWeights b = random_moe_weights(c, 42);
  EXPECT_TRUE(same_bytes(a.w13.view(), b.w13.view()));
  EXPECT_TRUE(same_bytes(a.w2.view(), b.w2.view()));
  EXPECT_TRUE(same_bytes(a.gate.view(), b.gate.view()));
  EXPECT_TRUE(same_bytes(a.gate_bias.view(), b.gate_bias.view()));
  EXPECT_TRUE(same_bytes(a.shared_w13.view(), b.shared_w13.view()));
  const MoeWeights other = random_moe_weights(c, 43);
  EXPECT_FALSE(same_bytes(a.w13.view(), other.w13.view()));
  EXPECT_FALSE(same_bytes(a.gate_bias.view(), other.gate_bias.view()));

  // Variance 1/fan_in: H for gate/up, I for down.
  auto moments = [](const TensorView& v, double* mean, double* var) {
    double s = 0, s2 = 0;
    const bf16* p = v.as<bf16>();
    for (int64_t i = 0; i < v.numel(); ++i) {
      const double x = bf16_to_f32(p[i]);
      s += x;
      s2 += x * x;
    }
    *mean = s / double(v.numel());
    *var = s2 / double(v.numel()) - *mean * *mean;
  };
  double mean, var;
  moments(a.w13.view(), &mean, &var);
  EXPECT_NEAR(mean, 0.0, 1e-3);
  EXPECT_NEAR(var * double(c.hidden), 1.0, 0.02);
  moments(a.w2.view(), &mean, &var);
  EXPECT_NEAR(var * double(c.moe_intermediate), 1.0, 0.02);
  moments(a.gate.view(), &mean, &var);
  EXPECT_NEAR(var * double(c.hidden), 1.0, 0.05);
  ASSERT_TRUE(a.has_bias());
  for (int64_t e = 0; e < c.n_routed_experts; ++e) {
    EXPECT_GE(a.gate_bias.as<float>()[e], -0.1f);
    EXPECT_LE(a.gate_bias.as<float>()[e], 0.1f);
  }

  MoeConfig soft = small_config(0);
  soft.scoring = Scoring::kSoftmax;
  const MoeWeights s = random_moe_weights(soft, 1);
  EXPECT_FALSE(s.has_bias());
  EXPECT_EQ(s.shared_w13.numel(), 0);
}

TEST(Weights, SharedFusionRoundTrip) {
  const MoeConfig c = small_config(2);
  const int64_t E = c.n_routed_experts, H = c.hidden, I = c.moe_intermediate, ns = 2;
  const MoeWeights unfused = random_moe_weights(c, 9);
  MoeConfig cf = c;
  cf.fuse_shared = true;
  const MoeWeights fused_direct = random_moe_weights(cf, 9);

  const MoeWeights fused = with_shared_fusion(clone(unfused), true, false);
  validate_moe_weights(fused);
  EXPECT_TRUE(fused.config.fuse_shared);
  EXPECT_EQ(fused.bank_size(), E + ns);
  EXPECT_EQ(fused.shared_w13.numel(), 0);
  // Random init draws shared slices the same way in both layouts.
  EXPECT_TRUE(same_bytes(fused.w13.view(), fused_direct.w13.view()));
  EXPECT_TRUE(same_bytes(fused.w2.view(), fused_direct.w2.view()));
  // Slice j: gate rows [jI, (j+1)I), up rows nsI + [jI, (j+1)I), down columns [jI, (j+1)I).
  for (int64_t j = 0; j < ns; ++j) {
    const TensorView g = bank_part(fused.w13, E + j, 0, cf), u = bank_part(fused.w13, E + j, 1, cf);
    const TensorView d = bank_part(fused.w2, E + j, 2, cf);
    for (int64_t r = 0; r < I; ++r) {
      ASSERT_TRUE(same_row(g, r, 0, unfused.shared_w13, j * I + r, 0, H));
      ASSERT_TRUE(same_row(u, r, 0, unfused.shared_w13, (ns + j) * I + r, 0, H));
    }
    for (int64_t h = 0; h < H; ++h) ASSERT_TRUE(same_row(d, h, 0, unfused.shared_w2, h, j * I, I));
  }

  const MoeWeights back = with_shared_fusion(clone(fused), false, false);
  validate_moe_weights(back);
  EXPECT_FALSE(back.config.fuse_shared);
  EXPECT_TRUE(same_bytes(back.w13.view(), unfused.w13.view()));
  EXPECT_TRUE(same_bytes(back.w2.view(), unfused.w2.view()));
  EXPECT_TRUE(same_bytes(back.shared_w13.view(), unfused.shared_w13.view()));
  EXPECT_TRUE(same_bytes(back.shared_w2.view(), unfused.shared_w2.view()));
  EXPECT_TRUE(same_bytes(back.gate.view(), unfused.gate.view()));
  EXPECT_TRUE(same_bytes(back.gate_bias.view(), unfused.gate_bias.view()));

  // Only the flag changes when the layout already matches.
  const MoeWeights scaled = with_shared_fusion(clone(fused), true, true);
  EXPECT_TRUE(scaled.config.scale_on_output);
  EXPECT_TRUE(same_bytes(scaled.w13.view(), fused.w13.view()));

  // Without a shared expert there is nothing to fuse; scale_on_output needs fusion.
  const MoeWeights none = random_moe_weights(small_config(0), 9);
  expect_error([&] { with_shared_fusion(clone(none), true, false); }, ErrorKind::kInvalidConfig,
               {"n_shared_experts"});
  expect_error([&] { with_shared_fusion(clone(unfused), false, true); }, ErrorKind::kInvalidConfig,
               {"scale_on_output"});
  // Inconsistent weights are named.
  MoeWeights broken = clone(unfused);
  broken.shared_w2 = Tensor(DType::kBF16, Shape{H, I});
  expect_error([&] { with_shared_fusion(std::move(broken), true, false); },
               ErrorKind::kInvalidArgument, {"shared_w2", "[16, 16]", "[16, 8]"});
}

TEST(Weights, HostMemoryCheck) {
  EXPECT_GT(available_host_memory(), 0u);
  expect_error([] { check_host_memory(uint64_t(1) << 60, "a test bank"); }, ErrorKind::kUnsupported,
               {"a test bank", "1073741824.00 GiB"});
  check_host_memory(1 << 20, "one MiB");  // fits anywhere
  // The full DeepSeek-V3 bank (~21 GiB bf16) must fail cleanly where it does not fit, before
  // allocating; where it would fit, this test does not spend the memory.
  const MoeConfig v3 = find_preset("deepseek-v3").config;
  const uint64_t bank = uint64_t(v3.n_routed_experts + 1) * 3 * v3.moe_intermediate * v3.hidden * 2;
  if (bank <= available_host_memory() / 4 * 3) GTEST_SKIP() << "enough memory for deepseek-v3";
  expect_error([&] { random_moe_weights(v3, 1); }, ErrorKind::kUnsupported, {"GiB", "H=7168"});
}

// ---------------------------------------------------------------------------------------------
// FP8 banks: block quantisation, the golden FP8 checkpoint kept as FP8, the CPU reference on FP8

// A NaN or an Inf anywhere in a block is refused (std::max skips NaN, so it is tested apart),
// also in a bank big enough for the parallel loop.
TEST(Fp8Block, NonFiniteWeightsAreRefused) {
  for (const float bad : {std::nanf(""), INFINITY, -INFINITY})
    for (const int64_t rows : {int64_t(200), int64_t(1) << 17}) {
      Tensor w = Tensor::zeros(DType::kF32, Shape{rows, 256});
      w.as<float>()[(rows / 2) * 256 + 77] = bad;
      expect_error([&] { quantize_fp8_block128(w.view()); }, ErrorKind::kNumeric, {"NaN or Inf"});
    }
}

TEST(Fp8Block, QuantiseDequantiseRules) {
  std::mt19937 rng(5);
  std::normal_distribution<float> d(0.f, 1.f);
  Tensor w(DType::kF32, Shape{2, 200, 300});  // partial blocks in both dimensions
  for (int64_t i = 0; i < w.numel(); ++i) w.as<float>()[i] = d(rng) * (i % 7 == 0 ? 30.f : 1.f);
  for (int64_t i = 0; i < 200 * 300; ++i) w.as<float>()[i] = 0.f;  // matrix 0 block 0 ... all zero
  const Fp8Tensor f = quantize_fp8_block128(w.view());
  ASSERT_EQ(f.scale.shape(), (Shape{2, 2, 3}));
  EXPECT_EQ(f.scale.as<float>()[0], 1.f);  // an all-zero block gets scale 1
  // Every other block: scale = amax / 448, the amax element maps to ±448.
  for (int64_t bi = 0; bi < 2; ++bi)
    for (int64_t bj = 0; bj < 3; ++bj) {
      float amax = 0;
      for (int64_t r = bi * 128; r < std::min<int64_t>(200, bi * 128 + 128); ++r)
        for (int64_t c = bj * 128; c < std::min<int64_t>(300, bj * 128 + 128); ++c)
          amax = std::max(amax, std::fabs(w.as<float>()[(200 + r) * 300 + c]));
      EXPECT_EQ(f.scale.as<float>()[6 + bi * 3 + bj], amax / 448.f);
    }
  const Tensor back = dequantize_fp8_block128(f.q.view(), f.scale.view());
  double num = 0, den = 0;
  for (int64_t i = 0; i < w.numel(); ++i) {
    const float q = fp8e4m3_to_f32(f.q.as<fp8e4m3>()[i]);
    const int64_t e = i / (200 * 300), r = i / 300 % 200, c = i % 300;
    ASSERT_EQ(back.as<float>()[i], q * f.scale.as<float>()[e * 6 + (r / 128) * 3 + c / 128]);
    num += std::pow(double(back.as<float>()[i]) - w.as<float>()[i], 2);
    den += std::pow(double(w.as<float>()[i]), 2);
  }
  EXPECT_LT(std::sqrt(num / den), 0.05);  // e4m3: 3 mantissa bits
  // Rows: one scale per row per 128 values.
  const Fp8Tensor fr =
      quantize_fp8_rows128(TensorView{w.as<float>(), Shape{400, 300}, DType::kF32});
  ASSERT_EQ(fr.scale.shape(), (Shape{400, 3}));
  const Tensor rb = dequantize_fp8_rows128(fr.q.view(), fr.scale.view());
  for (int64_t r = 0; r < 400; r += 37)
    for (int64_t c = 0; c < 300; ++c)
      ASSERT_EQ(rb.as<float>()[r * 300 + c], fp8e4m3_to_f32(fr.q.as<fp8e4m3>()[r * 300 + c]) *
                                                 fr.scale.as<float>()[r * 3 + c / 128]);
}

// The golden FP8 checkpoint: the default load is the exact f32 dequantisation; keep_fp8 keeps the
// file's bytes and scales; the CPU experts on the FP8 bank are bitwise those on the f32 bank.
TEST(Weights, GoldenFp8KeptAsFp8) {
  const std::string path = golden_dir() + "/dsv3_fp8_block128.safetensors";
  if (!fs::exists(path)) GTEST_SKIP() << "golden file not found: " << path;
  const SafetensorsFile file(path);
  for (bool fuse : {false, true}) {
    SCOPED_TRACE(fuse ? "fused" : "unfused");
    MoeConfig c = config_from_safetensors_metadata(file);
    c.fuse_shared = fuse;
    const int64_t E = c.n_routed_experts, H = c.hidden, I = c.moe_intermediate;
    const MoeWeights plain = load_moe_weights(file, c);
    const MoeWeights kept = load_moe_weights(file, c, LoadOptions{.keep_fp8 = true});
    ASSERT_EQ(plain.w13.dtype(), DType::kF32);
    ASSERT_TRUE(kept.fp8());
    validate_moe_weights(kept);
    const TensorView q = file.tensor("experts.3.down_proj.weight");
    const TensorView sc = file.tensor("experts.3.down_proj.weight_scale_inv");
    ASSERT_EQ(q.dtype, DType::kF8E4M3);
    EXPECT_EQ(std::memcmp(kept.w2.as<fp8e4m3>() + 3 * H * I, q.data, size_t(H * I)), 0);
    EXPECT_EQ(std::memcmp(kept.w2_scale.as<float>() + 3 * sc.numel(), sc.data, sc.nbytes()), 0);
    const MoeWeights deq = dequantize_moe_weights(clone(kept));
    EXPECT_TRUE(same_bytes(deq.w13.view(), plain.w13.view()));
    EXPECT_TRUE(same_bytes(deq.w2.view(), plain.w2.view()));

    // CPU experts, contiguous layout, every bank expert: FP8 bank + scales vs the f32 bank.
    const int64_t nb = plain.bank_size(), rows = 5 * nb;
    std::mt19937 rng(3);
    std::uniform_real_distribution<float> u(-1.f, 1.f);
    Tensor x(DType::kF32, Shape{rows, H});
    for (int64_t i = 0; i < x.numel(); ++i) x.as<float>()[i] = u(rng);
    Tensor seg(DType::kI32, Shape{nb + 1});
    for (int64_t e = 0; e <= nb; ++e) seg.as<int32_t>()[e] = int32_t(5 * e);
    Tensor a(DType::kF32, Shape{rows, H}), b(DType::kF32, Shape{rows, H});
    experts_contiguous_cpu(a.view(), x.view(), seg.view(), plain.w13.view(), plain.w2.view(), 0);
    experts_contiguous_cpu(b.view(), x.view(), seg.view(), kept.w13.view(), kept.w2.view(), 0, 0,
                           kept.w13_scale.view(), kept.w2_scale.view());
    EXPECT_TRUE(same_bytes(a.view(), b.view())) << "FP8 bank differs from its f32 dequantisation";
    EXPECT_THROW(
        experts_contiguous_cpu(b.view(), x.view(), seg.view(), kept.w13.view(), kept.w2.view(), 0),
        Error);  // an FP8 bank without its scales
    (void)E;
  }
}

// bf16 banks quantised at load (FP8 runs on bf16 checkpoints): shapes, validation, closeness.
TEST(Weights, QuantiseBankToFp8) {
  const MoeConfig c{.hidden = 256,
                    .moe_intermediate = 128,
                    .n_routed_experts = 4,
                    .top_k = 2,
                    .n_shared_experts = 1,
                    .scoring = Scoring::kSigmoid,
                    .fuse_shared = true};
  const MoeWeights w = random_moe_weights(c, 17);
  const MoeWeights q = quantize_moe_weights_fp8(clone(w));
  ASSERT_TRUE(q.fp8());
  validate_moe_weights(q);
  EXPECT_EQ(q.w13_scale.shape(), (Shape{5, 2, 2}));
  EXPECT_EQ(q.w2_scale.shape(), (Shape{5, 2, 1}));
  const MoeWeights d = dequantize_moe_weights(clone(q));
  const Tensor ref = to_f32(w.w13.view());
  double num = 0, den = 0;
  for (int64_t i = 0; i < ref.numel(); ++i) {
    num += std::pow(double(d.w13.as<float>()[i]) - ref.as<float>()[i], 2);
    den += std::pow(double(ref.as<float>()[i]), 2);
  }
  EXPECT_LT(std::sqrt(num / den), 0.05);
  EXPECT_GT(std::sqrt(num / den), 0.0);
  // An FP8 bank cannot move its shared expert.
  expect_error([&] { with_shared_fusion(clone(q), false, false); }, ErrorKind::kUnsupported,
               {"FP8"});
}

}  // namespace
}  // namespace epmoe
