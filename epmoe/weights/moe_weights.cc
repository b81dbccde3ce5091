#include "epmoe/weights/moe_weights.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <type_traits>
#include <vector>

#include "epmoe/core/parallel.h"
#include "epmoe/weights/fp8_block.h"
#include "epmoe/weights/safetensors.h"

namespace epmoe {

namespace {

using json = nlohmann::json;

constexpr int64_t kFp8Block = 128;  // DeepSeek's weight_scale_inv granularity (rows and cols)
constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

// "Empty" means numel() == 0: a default Tensor has rank 0 and therefore numel() == 1.
Tensor empty_tensor(DType dtype) { return Tensor(dtype, Shape{0}); }

uint8_t* bytes_of(const Tensor& t) { return static_cast<uint8_t*>(t.view().data); }

// ---------------------------------------------------------------------------------------------
// Random init: one splitmix64 stream per (seed, stream id), so every expert's numbers depend only
// on the seed and its index, never on the thread that fills it.

uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

struct SplitMix64 {
  uint64_t state;
  uint64_t next() { return mix64(state += 0x9e3779b97f4a7c15ull); }
  // Uniform in [-a, a): variance a²/3.
  float uniform(float a) { return (float(next() >> 40) * 0x1p-23f - 1.0f) * a; }
};

// Stream ids: experts (bank slots, and shared slices as slot E + j) use their index; the router
// takes ids no expert can reach.
constexpr uint64_t kGateStream = 1ull << 62;
constexpr uint64_t kBiasStream = kGateStream + 1;

SplitMix64 make_stream(uint64_t seed, uint64_t id) {
  return SplitMix64{mix64(seed ^ mix64(id + 0x632be59bd9b4e019ull))};
}

void fill_bf16(SplitMix64& rng, float a, bf16* dst, int64_t rows, int64_t cols, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) dst[r * ld + c] = f32_to_bf16(rng.uniform(a));
  }
}

// One expert of size I from stream `id`: gate [I, H], up [I, H] (row stride H) and down [H, I]
// (row stride ld_down). Shared slices use the same routine, so fused and unfused random shared
// experts hold the same numbers.
void random_expert(uint64_t seed, uint64_t id, int64_t H, int64_t I, bf16* gate, bf16* up,
                   bf16* down, int64_t ld_down) {
  SplitMix64 rng = make_stream(seed, id);
  // Uniform with the variance of N(0, 1/fan_in): a = sqrt(3 / fan_in).
  const float a_in = std::sqrt(3.0f / float(H));
  const float a_down = std::sqrt(3.0f / float(I));
  fill_bf16(rng, a_in, gate, I, H, H);
  fill_bf16(rng, a_in, up, I, H, H);
  fill_bf16(rng, a_down, down, H, I, ld_down);
}

// ---------------------------------------------------------------------------------------------
// Moving shared slices between the bank and the unfused shared MLP (plain row copies).

struct Dims {
  int64_t E, ns, I, H;
  size_t esz;  // bytes per element
};

// Bank experts E..E+ns-1 <- shared_w13 [2·ns·I, H], shared_w2 [H, ns·I].
void shared_into_bank(const Dims& d, const uint8_t* sw13, const uint8_t* sw2, uint8_t* w13,
                      uint8_t* w2) {
  const size_t half = size_t(d.I * d.H) * d.esz;  // one [I, H] block
  const size_t row_i = size_t(d.I) * d.esz;       // one row of [., I]
  for (int64_t j = 0; j < d.ns; ++j) {
    uint8_t* g = w13 + size_t(d.E + j) * 2 * half;
    std::memcpy(g, sw13 + size_t(j) * half, half);
    std::memcpy(g + half, sw13 + size_t(d.ns + j) * half, half);
    uint8_t* dn = w2 + size_t(d.E + j) * size_t(d.H) * row_i;
    for (int64_t h = 0; h < d.H; ++h) {
      std::memcpy(dn + h * row_i, sw2 + (size_t(h) * d.ns + j) * row_i, row_i);
    }
  }
}

// The inverse: shared_w13 / shared_w2 <- bank experts E..E+ns-1.
void bank_into_shared(const Dims& d, const uint8_t* w13, const uint8_t* w2, uint8_t* sw13,
                      uint8_t* sw2) {
  const size_t half = size_t(d.I * d.H) * d.esz;
  const size_t row_i = size_t(d.I) * d.esz;
  for (int64_t j = 0; j < d.ns; ++j) {
    const uint8_t* g = w13 + size_t(d.E + j) * 2 * half;
    std::memcpy(sw13 + size_t(j) * half, g, half);
    std::memcpy(sw13 + size_t(d.ns + j) * half, g + half, half);
    const uint8_t* dn = w2 + size_t(d.E + j) * size_t(d.H) * row_i;
    for (int64_t h = 0; h < d.H; ++h) {
      std::memcpy(sw2 + (size_t(h) * d.ns + j) * row_i, dn + h * row_i, row_i);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Loader: a stored matrix and its optional FP8 block scales, converted block by block.

struct Source {
  std::string name;
  const uint8_t* data = nullptr;  // [rows, cols] of dtype, possibly unaligned (memcpy loads)
  DType dtype = DType::kBF16;
  int64_t rows = 0, cols = 0;
  // FP8 only: weight_scale_inv [ceil(rows/128), ceil(cols/128)] f32 or bf16.
  const uint8_t* scale = nullptr;
  DType scale_dtype = DType::kF32;
  int64_t scale_cols = 0;
};

template <typename T>
float load_as_f32(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  if constexpr (std::is_same_v<T, float>) return v;
  if constexpr (std::is_same_v<T, bf16>) return bf16_to_f32(v);
  if constexpr (std::is_same_v<T, f16>) return f16_to_f32(v);
  if constexpr (std::is_same_v<T, fp8e4m3>) return fp8e4m3_to_f32(v);
}

float load_scale(const Source& s, int64_t r, int64_t c) {
  const uint8_t* p =
      s.scale + size_t((r / kFp8Block) * s.scale_cols + c / kFp8Block) * dtype_size(s.scale_dtype);
  return s.scale_dtype == DType::kF32 ? load_as_f32<float>(p) : load_as_f32<bf16>(p);
}

template <typename Src>
void convert_block(const Source& s, int64_t r0, int64_t c0, int64_t rows, int64_t cols,
                   uint8_t* dst, DType dst_dtype, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* src = s.data + (size_t(r0 + r) * s.cols + c0) * sizeof(Src);
    for (int64_t c = 0; c < cols; ++c) {
      float v = load_as_f32<Src>(src + size_t(c) * sizeof(Src));
      // Dequantise in f32 as DeepSeek's weight_dequant does, then round once to the bank dtype.
      if (s.scale != nullptr) v *= load_scale(s, r0 + r, c0 + c);
      if (dst_dtype == DType::kF32) {
        std::memcpy(dst + (size_t(r) * ld + c) * 4, &v, 4);
      } else {
        const bf16 b = f32_to_bf16(v);
        std::memcpy(dst + (size_t(r) * ld + c) * 2, &b, 2);
      }
    }
  }
}

// dst [rows, cols] (row stride ld elements, dtype f32|bf16) <- s[r0:r0+rows, c0:c0+cols].
void copy_block(const Source& s, int64_t r0, int64_t c0, int64_t rows, int64_t cols, uint8_t* dst,
                DType dst_dtype, int64_t ld) {
  if (s.dtype == dst_dtype && s.scale == nullptr) {
    const size_t esz = dtype_size(s.dtype);
    for (int64_t r = 0; r < rows; ++r) {
      std::memcpy(dst + size_t(r) * ld * esz, s.data + (size_t(r0 + r) * s.cols + c0) * esz,
                  size_t(cols) * esz);
    }
    return;
  }
  switch (s.dtype) {
    case DType::kF32:
      return convert_block<float>(s, r0, c0, rows, cols, dst, dst_dtype, ld);
    case DType::kBF16:
      return convert_block<bf16>(s, r0, c0, rows, cols, dst, dst_dtype, ld);
    case DType::kF16:
      return convert_block<f16>(s, r0, c0, rows, cols, dst, dst_dtype, ld);
    case DType::kF8E4M3:
      return convert_block<fp8e4m3>(s, r0, c0, rows, cols, dst, dst_dtype, ld);
    default:
      EPMOE_FAIL(kInternal, "cannot convert {} weights", dtype_name(s.dtype));
  }
}

// The dtype a stored float tensor keeps in memory without losing a bit: f16 does not fit bf16's
// mantissa (f32 instead); FP8 times its f32 block scale is dequantised exactly in f32 (fp8 -> f32,
// one f32 multiply, as transformers does: rounding it to bf16 cost the golden FP8 case 2.7e-3).
DType natural_dtype(DType stored) {
  return (stored == DType::kF32 || stored == DType::kF16 || stored == DType::kF8E4M3)
             ? DType::kF32
             : DType::kBF16;
}

class Loader {
 public:
  Loader(const SafetensorsFile& file, const MoeConfig& config, const std::string& prefix,
         bool keep_fp8)
      : file_(file), config_(config), prefix_(prefix), keep_fp8_(keep_fp8) {}

  // Looks `name` up, checks shape [rows, cols] and a float dtype, and picks up FP8 scales.
  Source matrix(const std::string& name, int64_t rows, int64_t cols) const {
    const std::string full = prefix_ + name;
    const SafetensorsEntry& e = file_.entry(full);
    check_float(e);
    check_shape(e, Shape{rows, cols});
    Source s;
    s.name = full;
    s.data = static_cast<const uint8_t*>(file_.tensor(full).data);
    s.dtype = e.dtype;
    s.rows = rows;
    s.cols = cols;
    if (e.dtype == DType::kF8E4M3) {
      // DeepSeek: `...weight` is accompanied by `...weight_scale_inv`.
      const std::string sname = full + "_scale_inv";
      const SafetensorsEntry& se = file_.entry(sname);
      EPMOE_CHECK(se.dtype == DType::kF32 || se.dtype == DType::kBF16, kBadFile,
                  "'{}': FP8 scale tensor '{}' is {}, expected f32", file_.path(), sname,
                  dtype_name(se.dtype));
      const int64_t sr = (rows + kFp8Block - 1) / kFp8Block;
      const int64_t sc = (cols + kFp8Block - 1) / kFp8Block;
      check_shape(se, Shape{sr, sc});
      s.scale = static_cast<const uint8_t*>(file_.tensor(sname).data);
      s.scale_dtype = se.dtype;
      s.scale_cols = sc;
    }
    return s;
  }

  void check_float(const SafetensorsEntry& e) const {
    EPMOE_CHECK(e.dtype != DType::kI32 && e.dtype != DType::kI64, kBadFile,
                "'{}': tensor '{}' holds {}, expected a float dtype", file_.path(), e.name,
                dtype_name(e.dtype));
  }

  void check_shape(const SafetensorsEntry& e, const Shape& expected) const {
    EPMOE_CHECK(e.shape == expected, kBadFile,
                "'{}': tensor '{}' has shape {}, expected {} for the layer {}", file_.path(),
                e.name, e.shape.str(), expected.str(), config_.summary());
  }

  MoeWeights load() const;

 private:
  // Throws Error(kNumeric) naming the first stored tensor (in load order) that holds a NaN or an
  // Inf: checked on the converted bank (every source passed through it; FP8 scales included).
  void reject_nonfinite(const MoeWeights& w, const Source& gate, const std::vector<Source>& gp,
                        const std::vector<Source>& up, const std::vector<Source>& down,
                        const Source& sgate, const Source& sup, const Source& sdown,
                        const std::string& bias_name) const;

  const SafetensorsFile& file_;
  const MoeConfig& config_;
  const std::string& prefix_;
  const bool keep_fp8_;
};

// FP8 bank rows: dst [rows, cols] f8e4m3 (row stride cols) <- s[r0:r0+rows, c0:c0+cols] as stored,
// dst_scale [ceil(rows/128), ceil(cols/128)] f32 <- the scales of those blocks. r0 and c0 are
// multiples of 128 (whole blocks).
void copy_fp8_block(const Source& s, int64_t r0, int64_t c0, int64_t rows, int64_t cols,
                    uint8_t* dst, float* dst_scale) {
  for (int64_t r = 0; r < rows; ++r)
    std::memcpy(dst + size_t(r) * cols, s.data + size_t(r0 + r) * s.cols + c0, size_t(cols));
  const int64_t rb = (rows + kFp8Block - 1) / kFp8Block, cb = (cols + kFp8Block - 1) / kFp8Block;
  for (int64_t i = 0; i < rb; ++i)
    for (int64_t j = 0; j < cb; ++j)
      dst_scale[i * cb + j] = load_scale(s, r0 + i * kFp8Block, c0 + j * kFp8Block);
}

// Index of the first non-finite value of [n] bf16|f32|f8e4m3 at p, or -1.
int64_t first_nonfinite(const uint8_t* p, DType dt, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    float v;
    if (dt == DType::kF8E4M3) {
      if ((p[i] & 0x7f) == 0x7f) return i;  // e4m3fn: NaN is S.1111.111, there is no Inf
      continue;
    }
    if (dt == DType::kF32) {
      std::memcpy(&v, p + size_t(i) * 4, 4);
    } else {
      bf16 b;
      std::memcpy(&b, p + size_t(i) * 2, 2);
      v = bf16_to_f32(b);
    }
    if (!std::isfinite(v)) return i;
  }
  return -1;
}

void Loader::reject_nonfinite(const MoeWeights& w, const Source& gate,
                              const std::vector<Source>& gp, const std::vector<Source>& up,
                              const std::vector<Source>& down, const Source& sgate,
                              const Source& sup, const Source& sdown,
                              const std::string& bias_name) const {
  const int64_t E = config_.n_routed_experts, H = config_.hidden, I = config_.moe_intermediate;
  auto fail_at = [&](const std::string& name, int64_t i, int64_t cols) {
    EPMOE_FAIL(kNumeric, "'{}': tensor '{}' holds a non-finite value (NaN or Inf) at [{}, {}]",
               file_.path(), name, i / cols, i % cols);
  };
  int64_t i = first_nonfinite(bytes_of(w.gate), w.gate.dtype(), E * H);
  if (i >= 0) fail_at(gate.name, i, H);
  if (!bias_name.empty() && (i = first_nonfinite(bytes_of(w.gate_bias), DType::kF32, E)) >= 0)
    fail_at(bias_name, i, E);
  // The bank: [nb] experts of (gate [I, H], up [I, H]) and down [H, I]; flags first (in
  // parallel), then the message of the lowest expert, so it does not depend on the threads.
  const int64_t nb = w.w13.shape()[0];
  const DType dt = w.w13.dtype();
  const size_t half = size_t(I * H) * dtype_size(dt);
  std::vector<char> bad(size_t(nb), 0);
  parallel_for(nb, 1, 0, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e)
      bad[size_t(e)] =
          first_nonfinite(bytes_of(w.w13) + size_t(e) * 2 * half, dt, 2 * I * H) >= 0 ||
          first_nonfinite(bytes_of(w.w2) + size_t(e) * half, dt, H * I) >= 0;
  });
  for (int64_t e = 0; e < nb; ++e) {
    if (!bad[size_t(e)]) continue;
    const bool routed = e < E;
    const uint8_t* g = bytes_of(w.w13) + size_t(e) * 2 * half;
    if ((i = first_nonfinite(g, dt, I * H)) >= 0) fail_at(routed ? gp[e].name : sgate.name, i, H);
    if ((i = first_nonfinite(g + half, dt, I * H)) >= 0)
      fail_at(routed ? up[e].name : sup.name, i, H);
    if ((i = first_nonfinite(bytes_of(w.w2) + size_t(e) * half, dt, H * I)) >= 0)
      fail_at(routed ? down[e].name : sdown.name, i, I);
  }
  // Unfused shared MLP: its sources are converted below; scan them as stored here.
  if (!config_.fuse_shared && config_.n_shared_experts > 0) {
    for (const Source* s : {&sgate, &sup, &sdown}) {
      for (int64_t r = 0; r < s->rows; ++r) {
        Tensor row(DType::kF32, Shape{s->cols});
        copy_block(*s, r, 0, 1, s->cols, bytes_of(row), DType::kF32, s->cols);
        if ((i = first_nonfinite(bytes_of(row), DType::kF32, s->cols)) >= 0)
          fail_at(s->name, r * s->cols + i, s->cols);
      }
    }
  }
}

MoeWeights Loader::load() const {
  config_.validate();
  const int64_t E = config_.n_routed_experts, H = config_.hidden, I = config_.moe_intermediate;
  const int64_t ns = config_.n_shared_experts;
  const int64_t nb = E + config_.fused_shared();

  // 1. Every name, dtype and shape first (header only, in a fixed order), so a bad file fails
  //    with the same message whatever the thread count, and before any large allocation.
  const Source gate = matrix("gate.weight", E, H);
  std::vector<Source> up(E), gp(E), down(E);
  for (int64_t e = 0; e < E; ++e) {
    const std::string base = fmt::format("experts.{}.", e);
    gp[e] = matrix(base + "gate_proj.weight", I, H);
    up[e] = matrix(base + "up_proj.weight", I, H);
    down[e] = matrix(base + "down_proj.weight", H, I);
  }
  const std::string extra = fmt::format("{}experts.{}.gate_proj.weight", prefix_, E);
  EPMOE_CHECK(!file_.contains(extra), kBadFile,
              "'{}' holds '{}': more routed experts than the configured {}", file_.path(), extra,
              E);
  Source sgate, sup, sdown;
  if (ns > 0) {
    sgate = matrix("shared_experts.gate_proj.weight", ns * I, H);
    sup = matrix("shared_experts.up_proj.weight", ns * I, H);
    sdown = matrix("shared_experts.down_proj.weight", H, ns * I);
  } else {
    const std::string shared = prefix_ + "shared_experts.gate_proj.weight";
    EPMOE_CHECK(!file_.contains(shared), kBadFile,
                "'{}' holds '{}' but the config has no shared expert (n_shared_experts = 0)",
                file_.path(), shared);
  }
  const std::string bias_name = prefix_ + "gate.e_score_correction_bias";
  const bool has_bias = file_.contains(bias_name);
  if (has_bias) {
    const SafetensorsEntry& be = file_.entry(bias_name);
    check_float(be);
    EPMOE_CHECK(be.dtype != DType::kF8E4M3, kBadFile, "'{}': tensor '{}' is FP8, expected f32",
                file_.path(), bias_name);
    check_shape(be, Shape{E});
  }

  // 2. The bank keeps the widest stored dtype, so no weight loses a bit.
  DType bank = DType::kBF16;
  for (const auto* list : {&gp, &up, &down}) {
    for (const Source& s : *list) {
      if (natural_dtype(s.dtype) == DType::kF32) bank = DType::kF32;
    }
  }
  for (const Source* s : {&sgate, &sup, &sdown}) {
    if (s->data != nullptr && natural_dtype(s->dtype) == DType::kF32) bank = DType::kF32;
  }
  // keep_fp8: an FP8 bank with its block scales when every bank tensor is FP8; the unfused
  // shared MLP is then dequantised into f32.
  bool keep = keep_fp8_;
  for (const auto* list : {&gp, &up, &down})
    for (const Source& s : *list) keep = keep && s.dtype == DType::kF8E4M3;
  if (config_.fuse_shared)
    for (const Source* s : {&sgate, &sup, &sdown})
      keep = keep && (s->data == nullptr || s->dtype == DType::kF8E4M3);
  if (keep) {
    EPMOE_CHECK(!config_.fuse_shared || ns <= 1 || I % kFp8Block == 0, kUnsupported,
                "'{}': keeping FP8 weights with {} fused shared experts needs moe_intermediate "
                "% 128 == 0 (each slice whole blocks), got {}",
                file_.path(), ns, I);
    bank = DType::kF8E4M3;
  }
  const DType shared_dt = keep ? DType::kF32 : bank;
  const size_t esz = dtype_size(bank);
  const uint64_t bank_bytes = uint64_t(nb + (config_.fuse_shared ? 0 : ns)) * 3 * I * H * esz;
  check_host_memory(bank_bytes, fmt::format("the expert bank of '{}' ({} experts of {}x{} {})",
                                            file_.path(), nb, I, H, dtype_name(bank)));

  MoeWeights w;
  w.config = config_;
  const DType gate_dtype = natural_dtype(gate.dtype);
  w.gate = Tensor(gate_dtype, Shape{E, H});
  copy_block(gate, 0, 0, E, H, bytes_of(w.gate), gate_dtype, H);
  if (has_bias) {
    // The bias steers expert choice in f32 (DESIGN §2); bf16/f16 storage converts exactly.
    const SafetensorsEntry& be = file_.entry(bias_name);
    Source b;
    b.name = bias_name;
    b.data = static_cast<const uint8_t*>(file_.tensor(bias_name).data);
    b.dtype = be.dtype;
    b.rows = 1;
    b.cols = E;
    w.gate_bias = Tensor(DType::kF32, Shape{E});
    copy_block(b, 0, 0, 1, E, bytes_of(w.gate_bias), DType::kF32, E);
  } else {
    w.gate_bias = empty_tensor(DType::kF32);
  }

  // 3. Convert, one expert per work item (disjoint outputs: thread count does not matter).
  w.w13 = Tensor(bank, Shape{nb, 2 * I, H});
  w.w2 = Tensor(bank, Shape{nb, H, I});
  uint8_t* w13 = bytes_of(w.w13);
  uint8_t* w2 = bytes_of(w.w2);
  const size_t half = size_t(I * H) * esz;
  const int64_t ib = (I + kFp8Block - 1) / kFp8Block, hb = (H + kFp8Block - 1) / kFp8Block;
  w.w13_scale = keep ? Tensor(DType::kF32, Shape{nb, 2 * ib, hb}) : empty_tensor(DType::kF32);
  w.w2_scale = keep ? Tensor(DType::kF32, Shape{nb, hb, ib}) : empty_tensor(DType::kF32);
  if (keep) {
    float* s13 = w.w13_scale.as<float>();
    float* s2 = w.w2_scale.as<float>();
    parallel_for(nb, 1, 0, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) {
        uint8_t* g = w13 + size_t(e) * 2 * half;
        float* gs = s13 + e * 2 * ib * hb;
        const bool routed = e < E;
        const int64_t r0 = routed ? 0 : (e - E) * I;  // shared slice j: rows/cols [jI, (j+1)I)
        copy_fp8_block(routed ? gp[e] : sgate, r0, 0, I, H, g, gs);
        copy_fp8_block(routed ? up[e] : sup, r0, 0, I, H, g + half, gs + ib * hb);
        copy_fp8_block(routed ? down[e] : sdown, 0, r0, H, I, w2 + size_t(e) * half,
                       s2 + e * hb * ib);
      }
    });
    for (const Tensor* t : {&w.w13_scale, &w.w2_scale}) {
      const int64_t i = first_nonfinite(bytes_of(*t), DType::kF32, t->numel());
      EPMOE_CHECK(i < 0, kNumeric,
                  "'{}': an FP8 weight_scale_inv holds a non-finite value ({} blocks of the "
                  "bank, flat index {})",
                  file_.path(), t == &w.w13_scale ? "gate/up" : "down", i);
    }
  } else {
    parallel_for(nb, 1, 0, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) {
        uint8_t* g = w13 + size_t(e) * 2 * half;
        uint8_t* d = w2 + size_t(e) * half;
        if (e < E) {
          copy_block(gp[e], 0, 0, I, H, g, bank, H);
          copy_block(up[e], 0, 0, I, H, g + half, bank, H);
          copy_block(down[e], 0, 0, H, I, d, bank, I);
        } else {
          // Shared slice j: gate/up rows [j·I, (j+1)·I), down columns [j·I, (j+1)·I) (DESIGN §2).
          const int64_t j = e - E;
          copy_block(sgate, j * I, 0, I, H, g, bank, H);
          copy_block(sup, j * I, 0, I, H, g + half, bank, H);
          copy_block(sdown, 0, j * I, H, I, d, bank, I);
        }
      }
    });
  }
  reject_nonfinite(w, gate, gp, up, down, sgate, sup, sdown, has_bias ? bias_name : "");
  if (ns > 0 && !config_.fuse_shared) {
    w.shared_w13 = Tensor(shared_dt, Shape{2 * ns * I, H});
    w.shared_w2 = Tensor(shared_dt, Shape{H, ns * I});
    uint8_t* s13 = bytes_of(w.shared_w13);
    const size_t shalf = size_t(I * H) * dtype_size(shared_dt);
    copy_block(sgate, 0, 0, ns * I, H, s13, shared_dt, H);
    copy_block(sup, 0, 0, ns * I, H, s13 + size_t(ns) * shalf, shared_dt, H);
    copy_block(sdown, 0, 0, H, ns * I, bytes_of(w.shared_w2), shared_dt, ns * I);
  } else {
    w.shared_w13 = empty_tensor(shared_dt);
    w.shared_w2 = empty_tensor(shared_dt);
  }
  return w;
}

// ---------------------------------------------------------------------------------------------
// __metadata__.config

class ConfigReader {
 public:
  ConfigReader(const json& j, const std::string& path) : j_(j), path_(path) {}

  const json& get(const char* key) const {
    EPMOE_CHECK(j_.contains(key), kBadFile, "'{}': __metadata__.config has no '{}'", path_, key);
    return j_.at(key);
  }
  int64_t integer(const char* key) const {
    const json& v = get(key);
    EPMOE_CHECK(v.is_number_integer() && v.get<int64_t>() >= std::numeric_limits<int>::min() &&
                    v.get<int64_t>() <= std::numeric_limits<int>::max(),
                kBadFile, "'{}': __metadata__.config '{}' must be an integer, got {}", path_, key,
                v.dump());
    return v.get<int64_t>();
  }
  double number(const char* key) const {
    const json& v = get(key);
    EPMOE_CHECK(v.is_number(), kBadFile, "'{}': __metadata__.config '{}' must be a number, got {}",
                path_, key, v.dump());
    return v.get<double>();
  }
  bool boolean(const char* key) const {
    const json& v = get(key);
    EPMOE_CHECK(v.is_boolean(), kBadFile,
                "'{}': __metadata__.config '{}' must be true or false, got {}", path_, key,
                v.dump());
    return v.get<bool>();
  }
  std::string string(const char* key) const {
    const json& v = get(key);
    EPMOE_CHECK(v.is_string(), kBadFile, "'{}': __metadata__.config '{}' must be a string, got {}",
                path_, key, v.dump());
    return v.get<std::string>();
  }

 private:
  const json& j_;
  const std::string& path_;
};

json config_to_json(const MoeConfig& c) {
  return json{{"hidden", c.hidden},
              {"moe_intermediate", c.moe_intermediate},
              {"n_routed_experts", c.n_routed_experts},
              {"top_k", c.top_k},
              {"n_group", c.n_group},
              {"topk_group", c.topk_group},
              {"n_shared_experts", c.n_shared_experts},
              {"routed_scaling_factor", c.routed_scaling_factor},
              {"norm_topk_prob", c.norm_topk_prob},
              {"scoring", scoring_name(c.scoring)},
              {"source", "epmoe save_moe_weights"}};
}

}  // namespace

// ---------------------------------------------------------------------------------------------

uint64_t available_host_memory() {
  uint64_t avail = 0;
  {
    std::ifstream meminfo("/proc/meminfo");
    std::string key;
    uint64_t kb = 0;
    std::string unit;
    while (meminfo >> key >> kb) {
      std::getline(meminfo, unit);
      if (key == "MemAvailable:") {  // counts reclaimable page cache, unlike MemFree
        avail = kb * 1024;
        break;
      }
    }
  }
  if (avail == 0) {
    const long pages = ::sysconf(_SC_AVPHYS_PAGES), page = ::sysconf(_SC_PAGESIZE);
    if (pages > 0 && page > 0) avail = uint64_t(pages) * uint64_t(page);
  }
  // A container's limit is lower than what the host reports.
  std::ifstream max_file("/sys/fs/cgroup/memory.max"), cur_file("/sys/fs/cgroup/memory.current");
  uint64_t limit = 0, current = 0;
  if ((max_file >> limit) && (cur_file >> current) && limit > current) {
    avail = avail == 0 ? limit - current : std::min(avail, limit - current);
  }
  return avail;
}

void check_host_memory(uint64_t bytes, const std::string& what) {
  const uint64_t avail = available_host_memory();
  if (avail == 0) return;  // unknown: let the allocation decide
  EPMOE_CHECK(bytes <= avail / 4 * 3, kUnsupported,
              "{} needs {:.2f} GiB of host memory, but only {:.2f} GiB is available (epmoe uses "
              "at most 3/4 of it, leaving room for activations)",
              what, double(bytes) / kGiB, double(avail) / kGiB);
}

void validate_moe_weights(const MoeWeights& w) {
  const MoeConfig& c = w.config;
  c.validate();
  const int64_t E = c.n_routed_experts, H = c.hidden, I = c.moe_intermediate;
  const int64_t ns = c.n_shared_experts;
  const DType wd = w.w13.dtype();
  EPMOE_CHECK(wd == DType::kBF16 || wd == DType::kF32 || wd == DType::kF8E4M3, kInvalidArgument,
              "w13 must be bf16, f32 or f8e4m3, got {}", dtype_name(wd));
  EPMOE_CHECK(w.gate.dtype() == DType::kBF16 || w.gate.dtype() == DType::kF32, kInvalidArgument,
              "gate must be bf16 or f32, got {}", dtype_name(w.gate.dtype()));
  w.gate.view().expect("gate", w.gate.dtype(), Shape{E, H});
  if (w.has_bias()) w.gate_bias.view().expect("gate_bias", DType::kF32, Shape{E});
  w.w13.view().expect("w13", wd, Shape{int64_t(w.bank_size()), 2 * I, H});
  w.w2.view().expect("w2", wd, Shape{int64_t(w.bank_size()), H, I});
  const int64_t ib = (I + kFp8Block - 1) / kFp8Block, hb = (H + kFp8Block - 1) / kFp8Block;
  if (wd == DType::kF8E4M3) {
    w.w13_scale.view().expect("w13_scale", DType::kF32, Shape{int64_t(w.bank_size()), 2 * ib, hb});
    w.w2_scale.view().expect("w2_scale", DType::kF32, Shape{int64_t(w.bank_size()), hb, ib});
  } else {
    EPMOE_CHECK(w.w13_scale.numel() == 0 && w.w2_scale.numel() == 0, kInvalidArgument,
                "w13_scale/w2_scale must be empty for a {} bank", dtype_name(wd));
  }
  // The unfused shared MLP of an FP8 layer is f32.
  const DType sd = wd == DType::kF8E4M3 ? DType::kF32 : wd;
  if (ns > 0 && !c.fuse_shared) {
    w.shared_w13.view().expect("shared_w13", sd, Shape{2 * ns * I, H});
    w.shared_w2.view().expect("shared_w2", sd, Shape{H, ns * I});
  } else {
    EPMOE_CHECK(w.shared_w13.numel() == 0 && w.shared_w2.numel() == 0, kInvalidArgument,
                "shared_w13/shared_w2 must be empty when the shared expert is {}",
                ns == 0 ? "absent" : "fused into the bank");
  }
}

MoeWeights random_moe_weights(const MoeConfig& config, uint64_t seed) {
  config.validate();
  const int64_t E = config.n_routed_experts, H = config.hidden, I = config.moe_intermediate;
  const int64_t ns = config.n_shared_experts;
  const int64_t nb = E + config.fused_shared();
  const int64_t n_unfused = config.fuse_shared ? 0 : ns;
  const uint64_t bytes = uint64_t(nb + n_unfused) * 3 * I * H * 2 + uint64_t(E) * H * 2;
  check_host_memory(bytes, fmt::format("random weights for {}", config.summary()));

  MoeWeights w;
  w.config = config;
  w.gate = Tensor(DType::kBF16, Shape{E, H});
  SplitMix64 g = make_stream(seed, kGateStream);
  fill_bf16(g, std::sqrt(3.0f / float(H)), w.gate.as<bf16>(), E, H, H);
  if (config.scoring == Scoring::kSigmoid) {
    w.gate_bias = Tensor(DType::kF32, Shape{E});
    SplitMix64 b = make_stream(seed, kBiasStream);
    float* bias = w.gate_bias.as<float>();
    for (int64_t e = 0; e < E; ++e) bias[e] = b.uniform(0.1f);
  } else {
    w.gate_bias = empty_tensor(DType::kF32);
  }

  w.w13 = Tensor(DType::kBF16, Shape{nb, 2 * I, H});
  w.w2 = Tensor(DType::kBF16, Shape{nb, H, I});
  if (n_unfused > 0) {
    w.shared_w13 = Tensor(DType::kBF16, Shape{2 * ns * I, H});
    w.shared_w2 = Tensor(DType::kBF16, Shape{H, ns * I});
  } else {
    w.shared_w13 = empty_tensor(DType::kBF16);
    w.shared_w2 = empty_tensor(DType::kBF16);
  }
  bf16* w13 = w.w13.as<bf16>();
  bf16* w2 = w.w2.as<bf16>();
  bf16* s13 = n_unfused > 0 ? w.shared_w13.as<bf16>() : nullptr;
  bf16* s2 = n_unfused > 0 ? w.shared_w2.as<bf16>() : nullptr;
  // Items [0, nb) are bank slots; [nb, nb + n_unfused) the unfused shared slices, which draw from
  // stream E + j exactly as bank slot E + j would.
  parallel_for(nb + n_unfused, 1, 0, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      if (e < nb) {
        bf16* g13 = w13 + e * 2 * I * H;
        random_expert(seed, uint64_t(e), H, I, g13, g13 + I * H, w2 + e * H * I, I);
      } else {
        const int64_t j = e - nb;
        random_expert(seed, uint64_t(E + j), H, I, s13 + j * I * H, s13 + (ns + j) * I * H,
                      s2 + j * I, ns * I);
      }
    }
  });
  return w;
}

MoeWeights with_shared_fusion(MoeWeights weights, bool fuse, bool scale_on_output) {
  validate_moe_weights(weights);
  MoeConfig next = weights.config;
  next.fuse_shared = fuse;
  next.scale_on_output = scale_on_output;
  next.validate();
  const bool was_fused = weights.config.fuse_shared;
  weights.config = next;
  if (was_fused == fuse || next.n_shared_experts == 0) return weights;
  EPMOE_CHECK(!weights.fp8(), kUnsupported,
              "with_shared_fusion: an FP8 bank cannot move the shared expert (load with the "
              "fusion setting, or fuse before quantize_moe_weights_fp8)");

  const Dims d{next.n_routed_experts, next.n_shared_experts, next.moe_intermediate, next.hidden,
               dtype_size(weights.w13.dtype())};
  const DType dt = weights.w13.dtype();
  const size_t routed13 = size_t(d.E) * 2 * d.I * d.H * d.esz;  // bytes of the routed experts
  const size_t routed2 = size_t(d.E) * d.H * d.I * d.esz;
  // NOTES: a Tensor cannot grow or shrink, so the bank is copied once (peak: two banks).
  if (fuse) {
    Tensor w13(dt, Shape{d.E + d.ns, 2 * d.I, d.H});
    Tensor w2(dt, Shape{d.E + d.ns, d.H, d.I});
    std::memcpy(bytes_of(w13), bytes_of(weights.w13), routed13);
    std::memcpy(bytes_of(w2), bytes_of(weights.w2), routed2);
    shared_into_bank(d, bytes_of(weights.shared_w13), bytes_of(weights.shared_w2), bytes_of(w13),
                     bytes_of(w2));
    weights.w13 = std::move(w13);
    weights.w2 = std::move(w2);
    weights.shared_w13 = empty_tensor(dt);
    weights.shared_w2 = empty_tensor(dt);
  } else {
    Tensor w13(dt, Shape{d.E, 2 * d.I, d.H});
    Tensor w2(dt, Shape{d.E, d.H, d.I});
    Tensor s13(dt, Shape{2 * d.ns * d.I, d.H});
    Tensor s2(dt, Shape{d.H, d.ns * d.I});
    std::memcpy(bytes_of(w13), bytes_of(weights.w13), routed13);
    std::memcpy(bytes_of(w2), bytes_of(weights.w2), routed2);
    bank_into_shared(d, bytes_of(weights.w13), bytes_of(weights.w2), bytes_of(s13), bytes_of(s2));
    weights.w13 = std::move(w13);
    weights.w2 = std::move(w2);
    weights.shared_w13 = std::move(s13);
    weights.shared_w2 = std::move(s2);
  }
  return weights;
}

MoeWeights load_moe_weights(const SafetensorsFile& file, const MoeConfig& config,
                            const LoadOptions& options) {
  return Loader(file, config, options.prefix, options.keep_fp8).load();
}

MoeWeights load_moe_weights(const std::string& path, const MoeConfig& config,
                            const LoadOptions& options) {
  const SafetensorsFile file(path);
  return load_moe_weights(file, config, options);
}

MoeConfig config_from_safetensors_metadata(const SafetensorsFile& file) {
  const auto it = file.metadata().find("config");
  EPMOE_CHECK(it != file.metadata().end(), kBadFile, "'{}': __metadata__ has no 'config' entry",
              file.path());
  json j;
  try {
    j = json::parse(it->second);
  } catch (const json::exception& e) {
    EPMOE_FAIL(kBadFile, "'{}': __metadata__.config is not valid JSON ({})", file.path(), e.what());
  }
  EPMOE_CHECK(j.is_object(), kBadFile, "'{}': __metadata__.config is not a JSON object",
              file.path());
  const ConfigReader r(j, file.path());
  MoeConfig c;
  c.hidden = r.integer("hidden");
  c.moe_intermediate = r.integer("moe_intermediate");
  c.n_routed_experts = int(r.integer("n_routed_experts"));
  c.top_k = int(r.integer("top_k"));
  c.n_group = int(r.integer("n_group"));
  c.topk_group = int(r.integer("topk_group"));
  c.n_shared_experts = int(r.integer("n_shared_experts"));
  c.routed_scaling_factor = float(r.number("routed_scaling_factor"));
  c.norm_topk_prob = r.boolean("norm_topk_prob");
  const std::string scoring = r.string("scoring");
  EPMOE_CHECK(scoring == "sigmoid" || scoring == "softmax", kBadFile,
              "'{}': __metadata__.config 'scoring' must be \"sigmoid\" or \"softmax\", got \"{}\"",
              file.path(), scoring);
  c.scoring = parse_scoring(scoring);
  c.fuse_shared = false;
  try {
    c.validate();
  } catch (const Error& e) {
    EPMOE_FAIL(kBadFile, "'{}': __metadata__.config describes an invalid layer: {}", file.path(),
               e.what());
  }
  return c;
}

MoeConfig config_from_safetensors_metadata(const std::string& path) {
  return config_from_safetensors_metadata(SafetensorsFile(path));
}

void save_moe_weights(const std::string& path, const MoeWeights& weights,
                      const std::string& prefix) {
  validate_moe_weights(weights);
  EPMOE_CHECK(!weights.fp8(), kUnsupported,
              "save_moe_weights: FP8 banks are not written (dequantize_moe_weights first)");
  const MoeConfig& c = weights.config;
  const int64_t E = c.n_routed_experts, H = c.hidden, I = c.moe_intermediate;
  const int64_t ns = c.n_shared_experts;
  const DType dt = weights.w13.dtype();
  const size_t esz = dtype_size(dt);
  std::map<std::string, TensorView> tensors;
  tensors[prefix + "gate.weight"] = weights.gate.view();
  if (weights.has_bias()) tensors[prefix + "gate.e_score_correction_bias"] = weights.gate_bias;
  // Checkpoint tensors are zero-copy views: gate and up rows of one expert are contiguous halves.
  auto at = [](const Tensor& t, size_t byte_offset, const Shape& s) {
    return TensorView{static_cast<uint8_t*>(t.view().data) + byte_offset, s, t.dtype(),
                      Device::kCpu};
  };
  const size_t half = size_t(I * H) * esz;
  for (int64_t e = 0; e < E; ++e) {
    const std::string base = fmt::format("{}experts.{}.", prefix, e);
    tensors[base + "gate_proj.weight"] = at(weights.w13, size_t(e) * 2 * half, Shape{I, H});
    tensors[base + "up_proj.weight"] = at(weights.w13, size_t(e) * 2 * half + half, Shape{I, H});
    tensors[base + "down_proj.weight"] = at(weights.w2, size_t(e) * half, Shape{H, I});
  }
  Tensor s13, s2;  // the merged shared MLP when it lives in the bank
  if (ns > 0) {
    const Tensor* src13 = &weights.shared_w13;
    const Tensor* src2 = &weights.shared_w2;
    if (c.fuse_shared) {
      s13 = Tensor(dt, Shape{2 * ns * I, H});
      s2 = Tensor(dt, Shape{H, ns * I});
      bank_into_shared(Dims{E, ns, I, H, esz}, bytes_of(weights.w13), bytes_of(weights.w2),
                       bytes_of(s13), bytes_of(s2));
      src13 = &s13;
      src2 = &s2;
    }
    tensors[prefix + "shared_experts.gate_proj.weight"] = at(*src13, 0, Shape{ns * I, H});
    tensors[prefix + "shared_experts.up_proj.weight"] =
        at(*src13, size_t(ns) * half, Shape{ns * I, H});
    tensors[prefix + "shared_experts.down_proj.weight"] = src2->view();
  }
  write_safetensors(path, tensors, {{"config", config_to_json(c).dump()}});
}

// ---------------------------------------------------------------------------------------------
// FP8 banks

MoeWeights quantize_moe_weights_fp8(MoeWeights w) {
  validate_moe_weights(w);
  if (w.fp8()) return w;
  const int64_t nb = w.bank_size(), H = w.config.hidden, I = w.config.moe_intermediate;
  const int64_t ib = (I + kFp8Block - 1) / kFp8Block, hb = (H + kFp8Block - 1) / kFp8Block;
  Tensor q13(DType::kF8E4M3, Shape{nb, 2 * I, H}), q2(DType::kF8E4M3, Shape{nb, H, I});
  Tensor s13(DType::kF32, Shape{nb, 2 * ib, hb}), s2(DType::kF32, Shape{nb, hb, ib});
  const DType dt = w.w13.dtype();
  const size_t esz = dtype_size(dt);
  // One matrix [rows, cols] of the source at `src` -> q at `dst`, its scales at `dst_scale`.
  auto one = [&](const uint8_t* src, int64_t rows, int64_t cols, uint8_t* dst, float* dst_scale) {
    const Fp8Tensor f = quantize_fp8_block128(
        TensorView{const_cast<uint8_t*>(src), Shape{rows, cols}, dt, Device::kCpu});
    std::memcpy(dst, f.q.view().data, f.q.nbytes());
    std::memcpy(dst_scale, f.scale.view().data, f.scale.nbytes());
  };
  parallel_for(nb, 1, 0, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      const uint8_t* g = bytes_of(w.w13) + size_t(e * 2 * I * H) * esz;
      uint8_t* qg = bytes_of(q13) + size_t(e * 2 * I * H);
      float* sg = s13.as<float>() + e * 2 * ib * hb;
      one(g, I, H, qg, sg);                                                  // gate_proj
      one(g + size_t(I * H) * esz, I, H, qg + size_t(I * H), sg + ib * hb);  // up_proj
      one(bytes_of(w.w2) + size_t(e * H * I) * esz, H, I, bytes_of(q2) + size_t(e * H * I),
          s2.as<float>() + e * hb * ib);
    }
  });
  if (w.shared_w13.numel() > 0 && dt != DType::kF32) {  // the shared MLP of FP8 layers is f32
    w.shared_w13 = to_f32(w.shared_w13.view());
    w.shared_w2 = to_f32(w.shared_w2.view());
  } else if (w.shared_w13.numel() == 0) {
    w.shared_w13 = empty_tensor(DType::kF32);
    w.shared_w2 = empty_tensor(DType::kF32);
  }
  w.w13 = std::move(q13);
  w.w2 = std::move(q2);
  w.w13_scale = std::move(s13);
  w.w2_scale = std::move(s2);
  return w;
}

MoeWeights dequantize_moe_weights(MoeWeights w) {
  validate_moe_weights(w);
  if (!w.fp8()) return w;
  const int64_t nb = w.bank_size(), H = w.config.hidden, I = w.config.moe_intermediate;
  const int64_t ib = (I + kFp8Block - 1) / kFp8Block, hb = (H + kFp8Block - 1) / kFp8Block;
  Tensor d13(DType::kF32, Shape{nb, 2 * I, H}), d2(DType::kF32, Shape{nb, H, I});
  auto one = [](const uint8_t* q, const float* scale, int64_t rows, int64_t cols, float* dst) {
    const int64_t rb = (rows + kFp8Block - 1) / kFp8Block, cb = (cols + kFp8Block - 1) / kFp8Block;
    const Tensor f = dequantize_fp8_block128(
        TensorView{const_cast<uint8_t*>(q), Shape{rows, cols}, DType::kF8E4M3, Device::kCpu},
        TensorView{const_cast<float*>(scale), Shape{rb, cb}, DType::kF32, Device::kCpu});
    std::memcpy(dst, f.view().data, f.nbytes());
  };
  parallel_for(nb, 1, 0, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      const uint8_t* g = bytes_of(w.w13) + size_t(e * 2 * I * H);
      const float* sg = w.w13_scale.as<float>() + e * 2 * ib * hb;
      float* dg = d13.as<float>() + e * 2 * I * H;
      one(g, sg, I, H, dg);
      one(g + size_t(I * H), sg + ib * hb, I, H, dg + I * H);
      one(bytes_of(w.w2) + size_t(e * H * I), w.w2_scale.as<float>() + e * hb * ib, H, I,
          d2.as<float>() + e * H * I);
    }
  });
  w.w13 = std::move(d13);
  w.w2 = std::move(d2);
  w.w13_scale = empty_tensor(DType::kF32);
  w.w2_scale = empty_tensor(DType::kF32);
  return w;
}

}  // namespace epmoe
