// Hopper grouped GEMMs (experts/sm90/sm90_grouped_gemm.cuh) vs the CPU reference
// (linear_rows_cpu, f32): bf16 and FP8 block-scaled, both layouts, bf16 and f32 outputs; counts
// 0, 1, 63, 64, 65, 127, M_max, all experts empty, one hot expert; the N, K of DeepSeek-V3,
// Qwen3-30B-A3B and Mixtral; poison left in rows that must not be written; bitwise row
// independence (a row alone and among 10 000 others, both layouts); CUDA-graph replay with new
// device counts; host-side validation. FP8 is compared with the reference run on the same
// quantised values (dequantised exactly). Skipped without a GPU or without the sm90 build.
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "epmoe/cuda/cuda_check.h"
#include "epmoe/experts/linear_cpu.h"
#include "epmoe/experts/sm90/sm90_grouped_gemm.cuh"
#include "epmoe/weights/fp8_block.h"
#include "tests/gpu/sm90_signal_probe.h"
#include "tests/gpu/test_common.h"

namespace epmoe::cuda {
namespace {

using testing::fresh_seed;
using testing::poisoned;

#define EPMOE_REQUIRE_SM90()                                                       \
  do {                                                                             \
    EPMOE_REQUIRE_GPU();                                                           \
    if (!sm90_gemm_available())                                                    \
      GTEST_SKIP() << "no sm90 GEMM (built without CUTLASS, or not an sm_90 GPU)"; \
  } while (0)

// bf16 output: its rounding; f32 output: the order of the sums, and for FP8 the tensor cores'
// reduced-precision accumulation within each 128-wide K block (promoted to f32 between blocks).
double tolerance(DType out, bool fp8) {
  if (out == DType::kBF16) return 1e-2;
  return fp8 ? 1e-3 : 1e-4;
}

Tensor i32_tensor(const std::vector<int32_t>& v) {
  Tensor t(DType::kI32, {int64_t(v.size())});
  std::copy(v.begin(), v.end(), t.as<int32_t>());
  return t;
}

// Relative L2 of rows [row0, row0 + rows) of got (bf16|f32 [*, cols]) against ref (f32).
double rel_l2_rows(const Tensor& got, const Tensor& ref, int64_t row0, int64_t rows) {
  const int64_t cols = got.shape()[got.shape().rank - 1];
  const Tensor g = to_f32(got.view());
  double num = 0, den = 0;
  for (int64_t i = row0 * cols; i < (row0 + rows) * cols; ++i) {
    const double d = double(g.as<float>()[i]) - double(ref.as<float>()[i]);
    if (std::isnan(d)) return INFINITY;
    num += d * d;
    den += double(ref.as<float>()[i]) * double(ref.as<float>()[i]);
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

// True when rows [row0, row0 + rows) of t still hold the 0xff poison in every byte.
bool poisoned_rows(const Tensor& t, int64_t row0, int64_t rows) {
  const int64_t row_bytes = t.shape()[t.shape().rank - 1] * int64_t(dtype_size(t.dtype()));
  const auto* p = static_cast<const unsigned char*>(t.view().data) + row0 * row_bytes;
  return std::all_of(p, p + rows * row_bytes, [](unsigned char b) { return b == 0xff; });
}

bool same_row_bytes(const Tensor& a, int64_t ra, const Tensor& b, int64_t rb) {
  const int64_t row_bytes = a.shape()[a.shape().rank - 1] * int64_t(dtype_size(a.dtype()));
  return std::memcmp(static_cast<const char*>(a.view().data) + ra * row_bytes,
                     static_cast<const char*>(b.view().data) + rb * row_bytes,
                     size_t(row_bytes)) == 0;
}

// Activations and weights of one call, on the host and the device, in the kernel's dtype; `in32`
// and `w32` are what the kernel computes with (bf16 widened, or FP8 dequantised exactly).
struct Operands {
  bool fp8;
  Tensor in32, w32;                       // [rows..., K] f32, [E_bank, Nout, K] f32
  DeviceTensor in, in_scale, w, w_scale;  // in/w bf16|f8e4m3; scales f32 (FP8 only)
};

// Counter-hash random numbers (splitmix64 of seed and index): the weight banks of the model
// shapes hold hundreds of millions of values, too many for <random> in a test.
uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
uint64_t hash_at(uint64_t seed, int64_t i) {
  return mix64(seed + uint64_t(i) * 0x9e3779b97f4a7c15ull);
}

// bf16 values uniform in [-1, 1).
Tensor fast_bf16(const Shape& s, uint64_t seed) {
  Tensor t(DType::kBF16, s);
  bf16* p = t.as<bf16>();
  for (int64_t i = 0; i < t.numel(); ++i)
    p[i] = f32_to_bf16(float(hash_at(seed, i) >> 40) * 0x1p-23f - 1.f);
  return t;
}
// Random e4m3 bytes (every finite value, never NaN).
Tensor fast_fp8(const Shape& s, uint64_t seed) {
  Tensor t(DType::kF8E4M3, s);
  fp8e4m3* p = t.as<fp8e4m3>();
  for (int64_t i = 0; i < t.numel(); ++i) {
    uint8_t b = uint8_t(hash_at(seed, i));
    if ((b & 0x7f) == 0x7f) b = 0x38;  // NaN -> 1.0
    p[i] = fp8e4m3{b};
  }
  return t;
}
// Block scales 2^-8 · 2^j, j in [-3, 3] (several octaves, so a misplaced scale shows).
Tensor octave_scales(const Shape& s, uint64_t seed) {
  Tensor t(DType::kF32, s);
  for (int64_t i = 0; i < t.numel(); ++i)
    t.as<float>()[i] = std::ldexp(1.f, int(hash_at(seed, i) % 7) - 3 - 8);
  return t;
}

// Random activations [lead..., K] and weights [E_bank, Nout, K]: bf16, or FP8 with per-row-128
// activation scales and 128 x 128 weight scales; in32/w32 are their exact f32 values.
Operands make_operands(bool fp8, const Shape& in_shape, int64_t e_bank, int64_t n_out,
                       std::mt19937_64& rng) {
  const int64_t K = in_shape[in_shape.rank - 1];
  Operands o{fp8, {}, {}, {}, {}, {}, {}};
  if (!fp8) {
    const Tensor in = fast_bf16(in_shape, rng());
    const Tensor w = fast_bf16({e_bank, n_out, K}, rng());
    o.in32 = to_f32(in.view());
    o.w32 = to_f32(w.view());
    o.in = DeviceTensor::from_host(in);
    o.w = DeviceTensor::from_host(w);
    return o;
  }
  Shape sshape = in_shape;
  sshape.dims[in_shape.rank - 1] = (K + kFp8BlockSize - 1) / kFp8BlockSize;
  const Tensor qi = fast_fp8(in_shape, rng()), si = octave_scales(sshape, rng());
  const Tensor qw = fast_fp8({e_bank, n_out, K}, rng());
  const Tensor sw = octave_scales({e_bank, (n_out + kFp8BlockSize - 1) / kFp8BlockSize,
                                   (K + kFp8BlockSize - 1) / kFp8BlockSize},
                                  rng());
  o.in32 = dequantize_fp8_rows128(qi.view(), si.view());
  o.w32 = dequantize_fp8_block128(qw.view(), sw.view());
  o.in = DeviceTensor::from_host(qi);
  o.in_scale = DeviceTensor::from_host(si);
  o.w = DeviceTensor::from_host(qw);
  o.w_scale = DeviceTensor::from_host(sw);
  return o;
}

TensorView expert_w32(const Operands& o, int64_t e) {
  const int64_t n = o.w32.shape()[1], k = o.w32.shape()[2];
  return TensorView{o.w32.as<float>() + e * n * k, Shape({n, k}), DType::kF32, Device::kCpu};
}

void run_contiguous(const TensorView& out, const Operands& o, const TensorView& seg,
                    int bank_offset, Sm90GemmWorkspace& ws, cudaStream_t stream) {
  if (o.fp8)
    sm90_grouped_gemm_fp8_contiguous(out, o.in.view(), o.in_scale.view(), o.w.view(),
                                     o.w_scale.view(), seg, bank_offset, ws, stream);
  else
    sm90_grouped_gemm_contiguous(out, o.in.view(), o.w.view(), seg, bank_offset, ws, stream);
}

void run_masked(const TensorView& out, const Operands& o, const TensorView& count, int bank_offset,
                Sm90GemmWorkspace& ws, cudaStream_t stream) {
  if (o.fp8)
    sm90_grouped_gemm_fp8_masked(out, o.in.view(), o.in_scale.view(), o.w.view(), o.w_scale.view(),
                                 count, bank_offset, ws, stream);
  else
    sm90_grouped_gemm_masked(out, o.in.view(), o.w.view(), count, bank_offset, ws, stream);
}

struct Case {
  std::string name;
  int64_t k, n_out;
  std::vector<int32_t> counts;  // per local expert
};

std::vector<Case> cases(std::mt19937_64& rng) {
  std::uniform_int_distribution<int> d(0, 40);
  std::vector<int32_t> many(32);
  for (auto& x : many) x = d(rng);
  std::vector<Case> c = {
      {"all experts empty", 256, 256, {0, 0, 0}},
      {"counts 0 1 63 64 65 127 128 129", 512, 384, {0, 1, 63, 64, 65, 127, 128, 129}},
      {"one hot expert", 1024, 256, {0, 0, 700, 0}},
      {"32 experts, random counts", 768, 512, many},
      // N, K of the models' expert GEMMs: gate_up (N = 2I, K = H) and down (N = H, K = I).
      {"DeepSeek-V3 gate_up", 7168, 4096, {3, 0, 65}},
      {"DeepSeek-V3 down", 2048, 7168, {64, 1, 0}},
      {"Qwen3-30B-A3B gate_up", 2048, 1536, {127, 0, 9}},
      {"Qwen3-30B-A3B down", 768, 2048, {1, 130, 0}},
      {"Mixtral gate_up", 4096, 28672, {17}},  // one expert: 117M weights each
      {"Mixtral down", 14336, 4096, {33}},
  };
  if (testing::quick()) {  // compute-sanitizer pass: the small shapes only
    c.erase(std::remove_if(c.begin(), c.end(),
                           [](const Case& x) { return x.k * x.n_out > 1024 * 1024; }),
            c.end());
  }
  return c;
}

class Sm90Gemm : public ::testing::TestWithParam<bool> {};  // parameter: FP8

TEST_P(Sm90Gemm, ContiguousMatchesReference) {
  EPMOE_REQUIRE_SM90();
  const bool fp8 = GetParam();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  Sm90GemmWorkspace ws(64);
  for (const Case& c : cases(rng)) {
    SCOPED_TRACE(c.name);
    const int e_loc = int(c.counts.size()), offset = 1, e_bank = e_loc + 1;
    std::vector<int32_t> seg(size_t(e_loc) + 1, 0);
    for (int e = 0; e < e_loc; ++e) seg[e + 1] = seg[e] + c.counts[e];
    const int64_t used = seg[e_loc], N = used + 5;  // spare rows past the experts' rows
    const Operands o = make_operands(fp8, {N, c.k}, e_bank, c.n_out, rng);
    Tensor ref(DType::kF32, {N, c.n_out});
    for (int e = 0; e < e_loc; ++e)
      if (c.counts[e] > 0)
        linear_rows_cpu(ref.as<float>() + seg[e] * c.n_out, c.n_out,
                        o.in32.as<float>() + seg[e] * c.k, c.k, c.counts[e],
                        expert_w32(o, offset + e));
    const DeviceTensor dseg = DeviceTensor::from_host(i32_tensor(seg));
    for (DType odt : {DType::kBF16, DType::kF32}) {
      SCOPED_TRACE(dtype_name(odt));
      DeviceTensor out = poisoned(odt, {N, c.n_out});
      run_contiguous(out.view(), o, dseg.view(), offset, ws, nullptr);
      EPMOE_CUDA_CHECK(cudaDeviceSynchronize());
      const Tensor got = out.to_host();
      for (int e = 0; e < e_loc; ++e) {
        SCOPED_TRACE("expert " + std::to_string(e) + " count " + std::to_string(c.counts[e]));
        if (c.counts[e] > 0) {
          EXPECT_LE(rel_l2_rows(got, ref, seg[e], c.counts[e]), tolerance(odt, fp8));
        }
      }
      EXPECT_TRUE(poisoned_rows(got, used, N - used)) << "rows past seg_indptr[E_loc] written";
    }
  }
}

TEST_P(Sm90Gemm, MaskedMatchesReference) {
  EPMOE_REQUIRE_SM90();
  const bool fp8 = GetParam();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  Sm90GemmWorkspace ws(64);
  for (Case c : cases(rng)) {
    SCOPED_TRACE(c.name);
    const int e_loc = int(c.counts.size()), offset = 1, e_bank = e_loc + 1;
    // M_max a little above the largest count (every expert has unused rows), except one case
    // where an expert fills M_max exactly.
    int64_t m_max = *std::max_element(c.counts.begin(), c.counts.end()) + 3;
    if (c.counts.size() == 8) {
      m_max = 129;  // the 129-row expert fills it
    }
    const Operands o = make_operands(fp8, {e_loc, m_max, c.k}, e_bank, c.n_out, rng);
    Tensor ref(DType::kF32, {e_loc * m_max, c.n_out});
    for (int e = 0; e < e_loc; ++e)
      if (c.counts[e] > 0)
        linear_rows_cpu(ref.as<float>() + e * m_max * c.n_out, c.n_out,
                        o.in32.as<float>() + e * m_max * c.k, c.k, c.counts[e],
                        expert_w32(o, offset + e));
    const DeviceTensor dcount = DeviceTensor::from_host(i32_tensor(c.counts));
    for (DType odt : {DType::kBF16, DType::kF32}) {
      SCOPED_TRACE(dtype_name(odt));
      DeviceTensor out = poisoned(odt, {e_loc, m_max, c.n_out});
      run_masked(out.view(), o, dcount.view(), offset, ws, nullptr);
      EPMOE_CUDA_CHECK(cudaDeviceSynchronize());
      const Tensor got = out.to_host();
      for (int e = 0; e < e_loc; ++e) {
        SCOPED_TRACE("expert " + std::to_string(e) + " count " + std::to_string(c.counts[e]));
        if (c.counts[e] > 0) {
          EXPECT_LE(rel_l2_rows(got, ref, e * m_max, c.counts[e]), tolerance(odt, fp8));
        }
        EXPECT_TRUE(poisoned_rows(got, e * m_max + c.counts[e], m_max - c.counts[e]))
            << "rows >= count were written";
      }
    }
  }
}

// Probe rows computed (a) among 10 000 others over 8 experts (contiguous), (b) in the masked
// layout at other positions among other rows, (c) alone (a one-row, one-expert call): every copy
// of a row must be bitwise identical.
TEST_P(Sm90Gemm, RowsAreIndependentBitwise) {
  EPMOE_REQUIRE_SM90();
  const bool fp8 = GetParam();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const int64_t K = 7168, n_out = 512;
  const int e_loc = 8;
  const int64_t total = testing::quick() ? 1000 : 10000;
  std::vector<int32_t> seg(e_loc + 1, 0);
  for (int e = 0; e < e_loc; ++e)  // random splits of the 10 000 rows over 8 experts
    seg[e + 1] = e + 1 == e_loc ? int32_t(total)
                                : std::min<int32_t>(int32_t(total),
                                                    seg[e] + int32_t(rng() % (2 * total / e_loc)));
  const Operands o = make_operands(fp8, {total, K}, e_loc, n_out, rng);
  const int64_t in_row = K * (fp8 ? 1 : 2), sc_row = K / kFp8BlockSize;
  Sm90GemmWorkspace ws(e_loc);
  const DeviceTensor dseg = DeviceTensor::from_host(i32_tensor(seg));
  for (DType odt : {DType::kBF16, DType::kF32}) {
    SCOPED_TRACE(dtype_name(odt));
    DeviceTensor big = poisoned(odt, {total, n_out});
    run_contiguous(big.view(), o, dseg.view(), 0, ws, nullptr);
    EPMOE_CUDA_CHECK(cudaDeviceSynchronize());
    const Tensor a = big.to_host();

    std::vector<int64_t> probe = {0, 1, 127, 128, total - 1};
    for (int i = 0; i < 6; ++i) probe.push_back(int64_t(rng() % uint64_t(total)));
    for (int64_t r : probe) {
      const int e = int(std::upper_bound(seg.begin(), seg.end(), int32_t(r)) - seg.begin()) - 1;
      SCOPED_TRACE("row " + std::to_string(r) + " expert " + std::to_string(e));
      // One row alone: a sub-view of the device operands (row r of in and of its scales).
      Operands one{fp8, {}, {}, {}, {}, {}, {}};
      auto copy_rows = [&](const DeviceTensor& src, int64_t row_bytes, int64_t r0, int64_t rows,
                           DType dt, const Shape& s) {
        DeviceTensor d(dt, s);
        EPMOE_CUDA_CHECK(cudaMemcpy(d.view().data,
                                    static_cast<const char*>(src.view().data) + r0 * row_bytes,
                                    size_t(rows * row_bytes), cudaMemcpyDeviceToDevice));
        return d;
      };
      const DType in_dt = fp8 ? DType::kF8E4M3 : DType::kBF16;
      one.in = copy_rows(o.in, in_row, r, 1, in_dt, {1, K});
      if (fp8) one.in_scale = copy_rows(o.in_scale, sc_row * 4, r, 1, DType::kF32, {1, sc_row});
      one.w = copy_rows(o.w, n_out * in_row, e, 1, in_dt, {1, n_out, K});
      if (fp8)
        one.w_scale = copy_rows(o.w_scale, (n_out / kFp8BlockSize) * sc_row * 4, e, 1, DType::kF32,
                                {1, n_out / kFp8BlockSize, sc_row});
      const DeviceTensor seg1 = DeviceTensor::from_host(i32_tensor({0, 1}));
      DeviceTensor out1 = poisoned(odt, {1, n_out});
      run_contiguous(out1.view(), one, seg1.view(), 0, ws, nullptr);

      // Masked: the row at position 77 of slot `slot` of 4 (bank experts bank0..bank0+3), the
      // other rows other tokens.
      const int64_t m_max = 200, pos = 77;
      const int bank0 = std::min(e, e_loc - 4), slot = e - bank0;
      std::vector<int32_t> counts = {150, 3, 190, 0};
      counts[size_t(slot)] = std::max<int32_t>(counts[size_t(slot)], int32_t(pos + 1));
      auto masked_copy = [&](const DeviceTensor& src, int64_t row_bytes, DType dt, int64_t cols) {
        DeviceTensor d(dt, {4, m_max, cols});
        EPMOE_CUDA_CHECK(cudaMemcpy(d.view().data, src.view().data,
                                    size_t(std::min<int64_t>(total, 4 * m_max) * row_bytes),
                                    cudaMemcpyDeviceToDevice));
        EPMOE_CUDA_CHECK(
            cudaMemcpy(static_cast<char*>(d.view().data) + (slot * m_max + pos) * row_bytes,
                       static_cast<const char*>(src.view().data) + r * row_bytes, size_t(row_bytes),
                       cudaMemcpyDeviceToDevice));
        return d;
      };
      Operands m{fp8, {}, {}, {}, {}, {}, {}};
      m.in = masked_copy(o.in, in_row, in_dt, K);
      if (fp8) m.in_scale = masked_copy(o.in_scale, sc_row * 4, DType::kF32, sc_row);
      m.w = DeviceTensor();  // the weights are o's
      const DeviceTensor count = DeviceTensor::from_host(i32_tensor(counts));
      DeviceTensor outm = poisoned(odt, {4, m_max, n_out});
      if (fp8)
        sm90_grouped_gemm_fp8_masked(outm.view(), m.in.view(), m.in_scale.view(), o.w.view(),
                                     o.w_scale.view(), count.view(), bank0, ws, nullptr);
      else
        sm90_grouped_gemm_masked(outm.view(), m.in.view(), o.w.view(), count.view(), bank0, ws,
                                 nullptr);
      EPMOE_CUDA_CHECK(cudaDeviceSynchronize());
      EXPECT_TRUE(same_row_bytes(a, r, out1.to_host(), 0)) << "differs when computed alone";
      const Tensor om = outm.to_host();
      const Tensor om2d = [&] {
        Tensor t(odt, {4 * m_max, n_out});
        std::memcpy(t.view().data, om.view().data, om.nbytes());
        return t;
      }();
      EXPECT_TRUE(same_row_bytes(a, r, om2d, slot * m_max + pos)) << "differs in the masked layout";
    }
  }
}

// Captured in a CUDA graph (global capture mode: a host synchronisation or an allocation would
// fail the capture), replayed with new counts written on the device: the same bytes as a direct
// call, and the reference.
TEST_P(Sm90Gemm, GraphReplayWithNewCounts) {
  EPMOE_REQUIRE_SM90();
  const bool fp8 = GetParam();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const int e_loc = 8;
  const int64_t m_max = 200, K = 1024, n_out = 512;
  const Operands o = make_operands(fp8, {e_loc, m_max, K}, e_loc, n_out, rng);
  DeviceTensor dcount(DType::kI32, {e_loc});
  dcount.fill_bytes(0);
  DeviceTensor dseg(DType::kI32, {e_loc + 1});
  dseg.fill_bytes(0);
  DeviceTensor out_m(DType::kBF16, {e_loc, m_max, n_out});
  DeviceTensor out_c(DType::kBF16, {e_loc * m_max, n_out});
  Sm90GemmWorkspace ws_m(e_loc), ws_c(e_loc);
  // The contiguous call reads the masked buffer as [E_loc·M_max, K] rows.
  Operands oc{fp8, {}, {}, {}, {}, {}, {}};
  const TensorView in_c{o.in.view().data, Shape({e_loc * m_max, K}), o.in.dtype(), Device::kCuda};
  const TensorView sc_c{fp8 ? o.in_scale.view().data : nullptr,
                        Shape({e_loc * m_max, K / kFp8BlockSize}), DType::kF32, Device::kCuda};
  auto contiguous_call = [&](const TensorView& out, cudaStream_t s) {
    if (fp8)
      sm90_grouped_gemm_fp8_contiguous(out, in_c, sc_c, o.w.view(), o.w_scale.view(), dseg.view(),
                                       0, ws_c, s);
    else
      sm90_grouped_gemm_contiguous(out, in_c, o.w.view(), dseg.view(), 0, ws_c, s);
  };
  cudaStream_t stream = nullptr;
  EPMOE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  EPMOE_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  run_masked(out_m.view(), o, dcount.view(), 0, ws_m, stream);
  contiguous_call(out_c.view(), stream);
  EPMOE_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  EPMOE_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));

  const std::vector<std::vector<int32_t>> count_sets = {
      {0, 0, 0, 0, 0, 0, 0, 0},
      {200, 0, 1, 129, 7, 128, 0, 200},
      {1, 1, 1, 1, 1, 1, 1, 1},
      {63, 64, 65, 127, 0, 0, 0, 199},
  };
  for (const auto& counts : count_sets) {
    std::string s;
    for (int32_t c : counts) s += std::to_string(c) + " ";
    SCOPED_TRACE("counts " + s);
    std::vector<int32_t> seg(e_loc + 1, 0);  // contiguous: expert e's rows start at e·M_max
    for (int e = 0; e < e_loc; ++e) seg[e + 1] = seg[e] + counts[e];
    dcount.copy_from_host(i32_tensor(counts));
    dseg.copy_from_host(i32_tensor(seg));
    out_m.fill_bytes(0xff);
    out_c.fill_bytes(0xff);
    EPMOE_CUDA_CHECK(cudaDeviceSynchronize());
    EPMOE_CUDA_CHECK(cudaGraphLaunch(exec, stream));
    EPMOE_CUDA_CHECK(cudaStreamSynchronize(stream));
    const Tensor replay_m = out_m.to_host(), replay_c = out_c.to_host();
    DeviceTensor direct_m = poisoned(DType::kBF16, {e_loc, m_max, n_out});
    DeviceTensor direct_c = poisoned(DType::kBF16, {e_loc * m_max, n_out});
    run_masked(direct_m.view(), o, dcount.view(), 0, ws_m, stream);
    contiguous_call(direct_c.view(), stream);
    EPMOE_CUDA_CHECK(cudaStreamSynchronize(stream));
    EXPECT_TRUE(testing::bitwise_equal(replay_m, direct_m.to_host(), "masked: replay vs direct"));
    EXPECT_TRUE(
        testing::bitwise_equal(replay_c, direct_c.to_host(), "contiguous: replay vs direct"));
    Tensor ref(DType::kF32, {e_loc * m_max, n_out});
    for (int e = 0; e < e_loc; ++e) {
      if (counts[e] > 0) {
        linear_rows_cpu(ref.as<float>() + e * m_max * n_out, n_out,
                        o.in32.as<float>() + e * m_max * K, K, counts[e], expert_w32(o, e));
        EXPECT_LE(rel_l2_rows(replay_m, ref, e * m_max, counts[e]), 1e-2);
      }
      EXPECT_TRUE(poisoned_rows(replay_m, e * m_max + counts[e], m_max - counts[e]));
    }
    EXPECT_TRUE(poisoned_rows(replay_c, seg[e_loc], e_loc * m_max - seg[e_loc]));
  }
  EPMOE_CUDA_CHECK(cudaGraphExecDestroy(exec));
  EPMOE_CUDA_CHECK(cudaGraphDestroy(graph));
  EPMOE_CUDA_CHECK(cudaStreamDestroy(stream));
}

void run_masked_signal(const TensorView& out, const TensorView& signal, const Operands& o,
                       const TensorView& count, int bank_offset, Sm90GemmWorkspace& ws,
                       cudaStream_t stream) {
  if (o.fp8)
    sm90_grouped_gemm_fp8_masked_signal(out, signal, o.in.view(), o.in_scale.view(), o.w.view(),
                                        o.w_scale.view(), count, bank_offset, ws, stream);
  else
    sm90_grouped_gemm_masked_signal(out, signal, o.in.view(), o.w.view(), count, bank_offset, ws,
                                    stream);
}

// Per-tile completion signals: every m-block with rows ends at the threshold, the others at 0;
// the output is bitwise that of the call without signals; a second call (signals zeroed again)
// does the same.
TEST_P(Sm90Gemm, SignalsCountStoredTiles) {
  EPMOE_REQUIRE_SM90();
  const bool fp8 = GetParam();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const std::vector<int32_t> counts = {0, 1, 128, 129, 300, 0, 77};
  const int e_loc = int(counts.size());
  const int64_t m_max = 300, K = 1024, n_out = 1152;  // 1152: a partial bf16 n-block
  const Operands o = make_operands(fp8, {e_loc, m_max, K}, e_loc + 1, n_out, rng);
  Sm90GemmWorkspace ws(e_loc);
  const Sm90SignalInfo info = sm90_gemm_signal_info(fp8 ? DType::kF8E4M3 : DType::kBF16, n_out);
  EXPECT_EQ(info.block_m, 128);
  EXPECT_EQ(info.threshold, fp8 ? 9 : 5);
  const int64_t nb = (m_max + info.block_m - 1) / info.block_m;
  const DeviceTensor count = DeviceTensor::from_host(i32_tensor(counts));
  DeviceTensor plain = poisoned(DType::kBF16, {e_loc, m_max, n_out});
  run_masked(plain.view(), o, count.view(), 1, ws, nullptr);
  for (int pass = 0; pass < 2; ++pass) {
    SCOPED_TRACE("pass " + std::to_string(pass));
    DeviceTensor signal(DType::kI32, {e_loc * nb});
    signal.fill_bytes(0);
    DeviceTensor out = poisoned(DType::kBF16, {e_loc, m_max, n_out});
    run_masked_signal(out.view(), signal.view(), o, count.view(), 1, ws, nullptr);
    EPMOE_CUDA_CHECK(cudaDeviceSynchronize());
    EXPECT_TRUE(testing::bitwise_equal(out.to_host(), plain.to_host(), "signalled vs plain"));
    const Tensor sig = signal.to_host();
    for (int e = 0; e < e_loc; ++e)
      for (int64_t m = 0; m < nb; ++m) {
        const int want = m * info.block_m < counts[size_t(e)] ? info.threshold : 0;
        EXPECT_EQ(sig.as<int32_t>()[e * nb + m], want) << "expert " << e << " m-block " << m;
      }
  }
}

// A consumer on another stream copies each block's rows the moment its signal reaches the
// threshold, while the GEMM runs (on SMs left free for the consumer): every copy is the final
// output, bitwise. DeepSeek-V3's down GEMM (Nout 7168, K 2048), 8 experts, random counts.
TEST_P(Sm90Gemm, SignalledRowsAreFinalWhenRead) {
  EPMOE_REQUIRE_SM90();
  const bool fp8 = GetParam();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const int e_loc = 8;
  const int64_t m_max = testing::quick() ? 128 : 512, K = 2048,
                n_out = testing::quick() ? 1024 : 7168;
  const Operands o = make_operands(fp8, {e_loc, m_max, K}, e_loc, n_out, rng);
  Sm90GemmWorkspace ws(e_loc);
  const int consumer_blocks = 8;
  ws.set_max_sms(ws.sm_count() - 2 * consumer_blocks);
  const Sm90SignalInfo info = sm90_gemm_signal_info(fp8 ? DType::kF8E4M3 : DType::kBF16, n_out);
  const int64_t nb = (m_max + info.block_m - 1) / info.block_m;
  cudaStream_t gemm_stream = nullptr, comm_stream = nullptr;
  EPMOE_CUDA_CHECK(cudaStreamCreateWithFlags(&gemm_stream, cudaStreamNonBlocking));
  EPMOE_CUDA_CHECK(cudaStreamCreateWithFlags(&comm_stream, cudaStreamNonBlocking));
  for (int round = 0; round < 3; ++round) {
    std::vector<int32_t> counts(e_loc);
    for (auto& c : counts) c = int32_t(rng() % uint64_t(m_max + 1));
    counts[size_t(round)] = 0;
    std::string cs;
    for (int32_t c : counts) cs += std::to_string(c) + " ";
    SCOPED_TRACE("counts " + cs);
    const DeviceTensor count = DeviceTensor::from_host(i32_tensor(counts));
    DeviceTensor signal(DType::kI32, {e_loc * nb}), failed(DType::kI32, {1});
    signal.fill_bytes(0);
    failed.fill_bytes(0xff);  // -1
    DeviceTensor out = poisoned(DType::kBF16, {e_loc, m_max, n_out});
    DeviceTensor snapshot = poisoned(DType::kBF16, {e_loc, m_max, n_out});
    EPMOE_CUDA_CHECK(cudaDeviceSynchronize());
    testing::launch_signal_consumer(
        static_cast<uint16_t*>(snapshot.view().data), failed.as<int32_t>(),
        static_cast<const uint16_t*>(out.view().data), signal.as<int32_t>(), count.as<int32_t>(),
        e_loc, m_max, n_out, info.block_m, info.threshold,
        /*timeout_cycles=*/4'000'000'000LL, consumer_blocks, comm_stream);
    EPMOE_CUDA_CHECK(cudaGetLastError());
    run_masked_signal(out.view(), signal.view(), o, count.view(), 0, ws, gemm_stream);
    EPMOE_CUDA_CHECK(cudaStreamSynchronize(gemm_stream));
    EPMOE_CUDA_CHECK(cudaStreamSynchronize(comm_stream));
    EXPECT_EQ(failed.to_host().as<int32_t>()[0], -1) << "a signal never reached the threshold";
    const Tensor final_out = out.to_host(), snap = snapshot.to_host();
    // Row by row over the flattened [E_loc · M_max, Nout] buffers.
    int64_t bad = 0;
    const size_t row_bytes = size_t(n_out) * 2;
    for (int e = 0; e < e_loc; ++e)
      for (int64_t r = 0; r < counts[size_t(e)]; ++r) {
        const size_t off = size_t(e * m_max + r) * row_bytes;
        bad += std::memcmp(static_cast<const char*>(final_out.view().data) + off,
                           static_cast<const char*>(snap.view().data) + off, row_bytes) != 0;
      }
    EXPECT_EQ(bad, 0) << "rows read after their signal differ from the final output";
  }
  EPMOE_CUDA_CHECK(cudaStreamDestroy(gemm_stream));
  EPMOE_CUDA_CHECK(cudaStreamDestroy(comm_stream));
}

INSTANTIATE_TEST_SUITE_P(Sm90, Sm90Gemm, ::testing::Values(false, true),
                         [](const ::testing::TestParamInfo<bool>& i) {
                           return i.param ? std::string("Fp8") : std::string("Bf16");
                         });

TEST(Sm90GemmChecks, RejectsBadArgumentsOnTheHost) {
  EPMOE_REQUIRE_SM90();
  auto dev = [](DType dt, const Shape& s) { return DeviceTensor(dt, s); };
  Sm90GemmWorkspace ws(2);
  const DeviceTensor in = dev(DType::kBF16, {4, 64}), w = dev(DType::kBF16, {3, 32, 64}),
                     out = dev(DType::kBF16, {4, 32});
  const DeviceTensor seg = DeviceTensor::from_host(i32_tensor({0, 2, 4}));
  EXPECT_NO_THROW(
      sm90_grouped_gemm_contiguous(out.view(), in.view(), w.view(), seg.view(), 0, ws, nullptr));
  const DeviceTensor in60 = dev(DType::kBF16, {4, 60}), w60 = dev(DType::kBF16, {3, 32, 60});
  EXPECT_THROW(
      sm90_grouped_gemm_contiguous(out.view(), in60.view(), w60.view(), seg.view(), 0, ws, nullptr),
      Error);  // K = 60
  const DeviceTensor w48 = dev(DType::kBF16, {3, 32, 48});
  EXPECT_THROW(
      sm90_grouped_gemm_contiguous(out.view(), in.view(), w48.view(), seg.view(), 0, ws, nullptr),
      Error);  // K mismatch
  EXPECT_THROW(
      sm90_grouped_gemm_contiguous(out.view(), in.view(), w.view(), seg.view(), 2, ws, nullptr),
      Error);  // experts [2, 4) of a bank of 3
  Tensor host_seg = i32_tensor({0, 2, 4});
  EXPECT_THROW(sm90_grouped_gemm_contiguous(out.view(), in.view(), w.view(), host_seg.view(), 0, ws,
                                            nullptr),
               Error);  // counts on the host
  const DeviceTensor seg4 = dev(DType::kI32, {4});
  EXPECT_THROW(
      sm90_grouped_gemm_contiguous(out.view(), in.view(), w.view(), seg4.view(), 0, ws, nullptr),
      Error);  // 3 experts, workspace for 2
  Sm90GemmWorkspace none;
  EXPECT_THROW(
      sm90_grouped_gemm_contiguous(out.view(), in.view(), w.view(), seg.view(), 0, none, nullptr),
      Error);  // no workspace
  // FP8: K, Nout multiples of 128; scale shapes.
  const DeviceTensor qi = dev(DType::kF8E4M3, {4, 256}), si = dev(DType::kF32, {4, 2}),
                     qw = dev(DType::kF8E4M3, {3, 128, 256}), sw = dev(DType::kF32, {3, 1, 2}),
                     o8 = dev(DType::kBF16, {4, 128});
  EXPECT_NO_THROW(sm90_grouped_gemm_fp8_contiguous(o8.view(), qi.view(), si.view(), qw.view(),
                                                   sw.view(), seg.view(), 0, ws, nullptr));
  const DeviceTensor si_bad = dev(DType::kF32, {4, 1}), sw_bad = dev(DType::kF32, {3, 2, 2});
  EXPECT_THROW(sm90_grouped_gemm_fp8_contiguous(o8.view(), qi.view(), si_bad.view(), qw.view(),
                                                sw.view(), seg.view(), 0, ws, nullptr),
               Error);
  EXPECT_THROW(sm90_grouped_gemm_fp8_contiguous(o8.view(), qi.view(), si.view(), qw.view(),
                                                sw_bad.view(), seg.view(), 0, ws, nullptr),
               Error);
  const DeviceTensor qi64 = dev(DType::kF8E4M3, {4, 64}), si64 = dev(DType::kF32, {4, 1}),
                     qw64 = dev(DType::kF8E4M3, {3, 128, 64}), sw64 = dev(DType::kF32, {3, 1, 1});
  EXPECT_THROW(sm90_grouped_gemm_fp8_contiguous(o8.view(), qi64.view(), si64.view(), qw64.view(),
                                                sw64.view(), seg.view(), 0, ws, nullptr),
               Error);  // K = 64
  EXPECT_THROW(
      sm90_grouped_gemm_contiguous(o8.view(), qi.view(), qw.view(), seg.view(), 0, ws, nullptr),
      Error);  // FP8 operands to the bf16 entry point
  // Signals: [E_loc · ceil(M_max / 128)] i32 on the device, bf16 output only.
  {
    const DeviceTensor in3 = dev(DType::kBF16, {2, 130, 64}),
                       out3 = dev(DType::kBF16, {2, 130, 32}),
                       out3f = dev(DType::kF32, {2, 130, 32}), sig = dev(DType::kI32, {4}),
                       sig3 = dev(DType::kI32, {3});
    const DeviceTensor count2 = DeviceTensor::from_host(i32_tensor({0, 0}));
    EXPECT_NO_THROW(sm90_grouped_gemm_masked_signal(out3.view(), sig.view(), in3.view(), w.view(),
                                                    count2.view(), 0, ws, nullptr));
    EXPECT_THROW(sm90_grouped_gemm_masked_signal(out3.view(), sig3.view(), in3.view(), w.view(),
                                                 count2.view(), 0, ws, nullptr),
                 Error);
    EXPECT_THROW(sm90_grouped_gemm_masked_signal(out3f.view(), sig.view(), in3.view(), w.view(),
                                                 count2.view(), 0, ws, nullptr),
                 Error);
    EXPECT_THROW(ws.set_max_sms(0), Error);
    EXPECT_THROW(ws.set_max_sms(ws.sm_count() + 1), Error);
  }
  // Masked: count length must be E_loc.
  const DeviceTensor in3 = dev(DType::kBF16, {2, 5, 64}), out3 = dev(DType::kF32, {2, 5, 32}),
                     count3 = dev(DType::kI32, {3});
  EXPECT_THROW(
      sm90_grouped_gemm_masked(out3.view(), in3.view(), w.view(), count3.view(), 0, ws, nullptr),
      Error);
  EPMOE_CUDA_CHECK(cudaDeviceSynchronize());
}

}  // namespace
}  // namespace epmoe::cuda
