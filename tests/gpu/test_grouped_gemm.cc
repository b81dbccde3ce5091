// Deterministic grouped GEMM (grouped_gemm.cuh) vs the CPU reference (linear_rows_cpu, f32):
// both layouts, awkward counts and shapes, poison left in rows that must not be written,
// bitwise row independence (batch, position, neighbours, layout), CUDA-graph replay with new
// device counts, and the host-side validation.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "epmoe/bench/gemm_bench.cuh"
#include "epmoe/cuda/cuda_check.h"
#include "epmoe/experts/experts_cpu.h"
#include "epmoe/experts/grouped_gemm.cuh"
#include "epmoe/experts/linear_cpu.h"
#include "tests/gpu/test_common.h"

namespace epmoe::cuda {
namespace {

using testing::fresh_seed;
using testing::poisoned;
using testing::random_tensor;

double tolerance(DType out) { return out == DType::kBF16 ? 1e-2 : 1e-3; }

Tensor i32_tensor(const std::vector<int32_t>& v) {
  Tensor t(DType::kI32, {int64_t(v.size())});
  std::copy(v.begin(), v.end(), t.as<int32_t>());
  return t;
}

// Relative L2 of rows [row0, row0 + rows) of got (bf16|f32 [*, cols]) against ref (f32, same
// row numbering).
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

struct Case {
  const char* name;
  int64_t k, n_out;
  std::vector<int32_t> counts;  // per local expert
};

// Random counts in [0, hi] for e_loc experts.
std::vector<int32_t> random_counts(int e_loc, int hi, std::mt19937_64& rng) {
  std::uniform_int_distribution<int> d(0, hi);
  std::vector<int32_t> c(size_t(e_loc), 0);
  for (auto& x : c) x = d(rng);
  return c;
}

std::vector<Case> cases(std::mt19937_64& rng) {
  std::vector<Case> c = {
      {"zero rows", 128, 128, {0, 0, 0}},
      {"one row", 128, 128, {0, 1, 0}},
      {"odd counts", 2048, 136, {7, 129, 0, 1, 130}},
      {"all rows in one expert", 7168, 128, {0, 257, 0}},
      {"K=8*13 Nout=2048, 32 experts", 104, 2048, random_counts(32, 20, rng)},
      {"K=8*17 Nout=7168", 136, 7168, {3, 0, 65}},
      {"256 experts", 128, 256, random_counts(256, 5, rng)},
      {"K=7168 Nout=2048", 7168, 2048, {2, 5}},
      {"K=2048 Nout=7168", 2048, 7168, {9, 0, 1}},
  };
  if (testing::quick()) {  // compute-sanitizer pass: the small shapes only
    c.erase(std::remove_if(c.begin(), c.end(),
                           [](const Case& x) { return x.k * x.n_out > 2048 * 2048; }),
            c.end());
  }
  return c;
}

TEST(GpuGroupedGemm, ContiguousMatchesReference) {
  EPMOE_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (const Case& c : cases(rng)) {
    SCOPED_TRACE(c.name);
    const int e_loc = int(c.counts.size()), offset = 1, e_bank = e_loc + 2;
    std::vector<int32_t> seg(size_t(e_loc) + 1, 0);
    for (int e = 0; e < e_loc; ++e) seg[e + 1] = seg[e] + c.counts[e];
    const int64_t used = seg[e_loc], N = used + 5;  // spare rows past the experts' rows
    Tensor in = random_tensor(DType::kBF16, {N, c.k}, rng);
    Tensor w = random_tensor(DType::kBF16, {e_bank, c.n_out, c.k}, rng);
    const Tensor in32 = to_f32(in.view());
    Tensor ref(DType::kF32, {N, c.n_out});
    for (int e = 0; e < e_loc; ++e)
      if (c.counts[e] > 0)
        linear_rows_cpu(ref.as<float>() + seg[e] * c.n_out, c.n_out,
                        in32.as<float>() + seg[e] * c.k, c.k, c.counts[e],
                        bank_slice(w.view(), offset + e));
    DeviceTensor din = DeviceTensor::from_host(in), dw = DeviceTensor::from_host(w),
                 dseg = DeviceTensor::from_host(i32_tensor(seg));
    for (DType odt : {DType::kBF16, DType::kF32}) {
      SCOPED_TRACE(dtype_name(odt));
      DeviceTensor out = poisoned(odt, {N, c.n_out});
      grouped_gemm_contiguous(out.view(), din.view(), dw.view(), dseg.view(), offset, nullptr);
      EPMOE_CUDA_CHECK(cudaDeviceSynchronize());
      const Tensor got = out.to_host();
      if (used > 0) {
        EXPECT_LE(rel_l2_rows(got, ref, 0, used), tolerance(odt));
      }
      EXPECT_TRUE(poisoned_rows(got, used, N - used)) << "rows past seg_indptr[E_loc] written";
    }
  }
}

TEST(GpuGroupedGemm, MaskedMatchesReference) {
  EPMOE_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (const Case& c : cases(rng)) {
    SCOPED_TRACE(c.name);
    const int e_loc = int(c.counts.size()), offset = 1, e_bank = e_loc + 2;
    // An odd M_max a little above the largest count, so every expert has unused rows.
    const int64_t m_max = *std::max_element(c.counts.begin(), c.counts.end()) + 3;
    Tensor in = random_tensor(DType::kBF16, {e_loc, m_max, c.k}, rng);
    Tensor w = random_tensor(DType::kBF16, {e_bank, c.n_out, c.k}, rng);
    const Tensor in32 = to_f32(in.view());
    Tensor ref(DType::kF32, {e_loc * m_max, c.n_out});
    for (int e = 0; e < e_loc; ++e)
      if (c.counts[e] > 0)
        linear_rows_cpu(ref.as<float>() + e * m_max * c.n_out, c.n_out,
                        in32.as<float>() + e * m_max * c.k, c.k, c.counts[e],
                        bank_slice(w.view(), offset + e));
    DeviceTensor din = DeviceTensor::from_host(in), dw = DeviceTensor::from_host(w),
                 dcount = DeviceTensor::from_host(i32_tensor(c.counts));
    for (DType odt : {DType::kBF16, DType::kF32}) {
      SCOPED_TRACE(dtype_name(odt));
      DeviceTensor out = poisoned(odt, {e_loc, m_max, c.n_out});
      grouped_gemm_masked(out.view(), din.view(), dw.view(), dcount.view(), offset, nullptr);
      EPMOE_CUDA_CHECK(cudaDeviceSynchronize());
      const Tensor got = out.to_host();
      for (int e = 0; e < e_loc; ++e) {
        SCOPED_TRACE("expert " + std::to_string(e) + " count " + std::to_string(c.counts[e]));
        if (c.counts[e] > 0) {
          EXPECT_LE(rel_l2_rows(got, ref, e * m_max, c.counts[e]), tolerance(odt));
        }
        EXPECT_TRUE(poisoned_rows(got, e * m_max + c.counts[e], m_max - c.counts[e]))
            << "rows >= count were written";
      }
    }
  }
}

// The same rows (a) in a big contiguous batch, (b) shuffled among fresh rows behind an extra
// expert (other positions, other neighbours, other counts, other grid), (c) in the masked
// layout at shuffled positions, (d) alone: every copy of a row must be bitwise identical.
TEST(GpuGroupedGemm, RowsAreIndependentBitwise) {
  EPMOE_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  struct Shape2 {
    int64_t k, n_out;
  };
  for (const Shape2 s : {Shape2{7168, 256}, Shape2{2056, 264}}) {
    SCOPED_TRACE("K=" + std::to_string(s.k) + " Nout=" + std::to_string(s.n_out));
    const std::vector<int32_t> counts = {300, 1, 0, 77};
    const int e_loc = 4, e_bank = 6, offset = 1;
    std::vector<int32_t> seg(e_loc + 1, 0);
    for (int e = 0; e < e_loc; ++e) seg[e + 1] = seg[e] + counts[e];
    const int64_t N = seg[e_loc] + 3, K = s.k, row_bytes = K * 2;
    Tensor in = random_tensor(DType::kBF16, {N, K}, rng);
    Tensor w = random_tensor(DType::kBF16, {e_bank, s.n_out, K}, rng);
    DeviceTensor din = DeviceTensor::from_host(in), dw = DeviceTensor::from_host(w);
    auto copy_row = [&](Tensor& dst, int64_t dr, int64_t sr) {
      std::memcpy(static_cast<char*>(dst.view().data) + dr * row_bytes,
                  static_cast<const char*>(in.view().data) + sr * row_bytes, size_t(row_bytes));
    };

    // (b) contiguous, E_loc + 1 experts from bank 0: bank expert 0 gets 50 fresh rows; bank
    // expert 1 + e gets the rows of expert e plus 0..40 fresh ones, shuffled.
    std::vector<int32_t> seg_b = {0, 50};
    std::vector<std::vector<int64_t>> order(e_loc);  // order[e][i]: source row or -1 (fresh)
    for (int e = 0; e < e_loc; ++e) {
      for (int32_t j = seg[e]; j < seg[e + 1]; ++j) order[e].push_back(j);
      order[e].resize(order[e].size() + size_t(rng() % 41), -1);
      std::shuffle(order[e].begin(), order[e].end(), rng);
      seg_b.push_back(seg_b.back() + int32_t(order[e].size()));
    }
    Tensor in_b = random_tensor(DType::kBF16, {seg_b.back(), K}, rng);
    std::vector<int64_t> pos_b(size_t(N), -1);  // row of `in` -> row of in_b
    for (int e = 0; e < e_loc; ++e)
      for (size_t i = 0; i < order[e].size(); ++i)
        if (order[e][i] >= 0) {
          copy_row(in_b, seg_b[e + 1] + int64_t(i), order[e][i]);
          pos_b[size_t(order[e][i])] = seg_b[e + 1] + int64_t(i);
        }

    // (c) masked [E_loc, M_max, K]: the rows of expert e at the same shuffled positions.
    int64_t m_max = 0;
    std::vector<int32_t> count_c(e_loc);
    for (int e = 0; e < e_loc; ++e) {
      count_c[e] = int32_t(order[e].size());
      m_max = std::max<int64_t>(m_max, count_c[e] + 1);
    }
    Tensor in_c = random_tensor(DType::kBF16, {e_loc, m_max, K}, rng);
    std::vector<int64_t> pos_c(size_t(N), -1);
    for (int e = 0; e < e_loc; ++e)
      for (size_t i = 0; i < order[e].size(); ++i)
        if (order[e][i] >= 0) {
          copy_row(in_c, e * m_max + int64_t(i), order[e][i]);
          pos_c[size_t(order[e][i])] = e * m_max + int64_t(i);
        }

    DeviceTensor din_b = DeviceTensor::from_host(in_b), din_c = DeviceTensor::from_host(in_c);
    DeviceTensor dseg = DeviceTensor::from_host(i32_tensor(seg)),
                 dseg_b = DeviceTensor::from_host(i32_tensor(seg_b)),
                 dcount_c = DeviceTensor::from_host(i32_tensor(count_c));
    for (DType odt : {DType::kBF16, DType::kF32}) {
      SCOPED_TRACE(dtype_name(odt));
      DeviceTensor out_a = poisoned(odt, {N, s.n_out}),
                   out_b = poisoned(odt, {seg_b.back(), s.n_out}),
                   out_c = poisoned(odt, {e_loc, m_max, s.n_out});
      grouped_gemm_contiguous(out_a.view(), din.view(), dw.view(), dseg.view(), offset, nullptr);
      grouped_gemm_contiguous(out_b.view(), din_b.view(), dw.view(), dseg_b.view(), 0, nullptr);
      grouped_gemm_masked(out_c.view(), din_c.view(), dw.view(), dcount_c.view(), offset, nullptr);
      EPMOE_CUDA_CHECK(cudaDeviceSynchronize());
      const Tensor a = out_a.to_host(), b = out_b.to_host(), cm = out_c.to_host();
      const Tensor c2d = [&] {
        Tensor t(odt, {e_loc * m_max, s.n_out});
        std::memcpy(t.view().data, cm.view().data, cm.nbytes());
        return t;
      }();
      int bad_b = 0, bad_c = 0;
      for (int64_t r = 0; r < seg[e_loc]; ++r) {
        bad_b += !same_row_bytes(a, r, b, pos_b[size_t(r)]);
        bad_c += !same_row_bytes(a, r, c2d, pos_c[size_t(r)]);
      }
      EXPECT_EQ(bad_b, 0) << "rows differ when moved within a contiguous batch";
      EXPECT_EQ(bad_c, 0) << "rows differ between the contiguous and the masked layout";

      // (d) a few rows alone: a one-row, one-expert call on bank expert offset + e.
      std::vector<int64_t> probe = {0, 1, 299, 300, 301, 377};
      for (int i = 0; i < 4; ++i) probe.push_back(int64_t(rng() % uint64_t(seg[e_loc])));
      for (int64_t r : probe) {
        const int e = int(std::upper_bound(seg.begin(), seg.end(), int32_t(r)) - seg.begin()) - 1;
        Tensor one(DType::kBF16, {1, K});
        copy_row(one, 0, r);
        DeviceTensor d_one = DeviceTensor::from_host(one),
                     d_seg1 = DeviceTensor::from_host(i32_tensor({0, 1})),
                     out1 = poisoned(odt, {1, s.n_out});
        grouped_gemm_contiguous(out1.view(), d_one.view(), dw.view(), d_seg1.view(), offset + e,
                                nullptr);
        EPMOE_CUDA_CHECK(cudaDeviceSynchronize());
        EXPECT_TRUE(same_row_bytes(a, r, out1.to_host(), 0))
            << "row " << r << " (expert " << e << ") differs when computed alone";
      }
    }
  }
}

// One masked call captured in a CUDA graph (strict global capture mode: a host
// synchronisation would fail the capture), replayed with new counts written on the device.
TEST(GpuGroupedGemm, MaskedGraphReplayWithNewCounts) {
  EPMOE_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const int e_loc = 8;
  const int64_t m_max = 200, K = 1024, n_out = 512;
  Tensor in = random_tensor(DType::kBF16, {e_loc, m_max, K}, rng);
  Tensor w = random_tensor(DType::kBF16, {e_loc, n_out, K}, rng);
  DeviceTensor din = DeviceTensor::from_host(in), dw = DeviceTensor::from_host(w);
  DeviceTensor dcount(DType::kI32, {e_loc});
  dcount.fill_bytes(0);
  DeviceTensor out(DType::kBF16, {e_loc, m_max, n_out});
  cudaStream_t stream = nullptr;
  EPMOE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  EPMOE_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  grouped_gemm_masked(out.view(), din.view(), dw.view(), dcount.view(), 0, stream);
  EPMOE_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  EPMOE_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));

  const Tensor in32 = to_f32(in.view());
  const std::vector<std::vector<int32_t>> count_sets = {
      {0, 0, 0, 0, 0, 0, 0, 0},
      {200, 0, 1, 129, 7, 128, 0, 200},
      random_counts(e_loc, int(m_max), rng),
      {1, 1, 1, 1, 1, 1, 1, 1},
  };
  for (const auto& counts : count_sets) {
    std::string s;
    for (int32_t c : counts) s += std::to_string(c) + " ";
    SCOPED_TRACE("counts " + s);
    dcount.copy_from_host(i32_tensor(counts));
    out.fill_bytes(0xff);
    EPMOE_CUDA_CHECK(cudaDeviceSynchronize());
    EPMOE_CUDA_CHECK(cudaGraphLaunch(exec, stream));
    EPMOE_CUDA_CHECK(cudaStreamSynchronize(stream));
    const Tensor replay = out.to_host();
    // The same call made directly must give the same bytes, poison included.
    DeviceTensor direct = poisoned(DType::kBF16, {e_loc, m_max, n_out});
    EPMOE_CUDA_CHECK(cudaDeviceSynchronize());
    grouped_gemm_masked(direct.view(), din.view(), dw.view(), dcount.view(), 0, stream);
    EPMOE_CUDA_CHECK(cudaStreamSynchronize(stream));
    EXPECT_TRUE(testing::bitwise_equal(replay, direct.to_host(), "graph replay vs direct call"));
    // And both against the reference, with untouched rows past each count.
    Tensor ref(DType::kF32, {e_loc * m_max, n_out});
    for (int e = 0; e < e_loc; ++e) {
      if (counts[e] > 0) {
        linear_rows_cpu(ref.as<float>() + e * m_max * n_out, n_out,
                        in32.as<float>() + e * m_max * K, K, counts[e], bank_slice(w.view(), e));
        EXPECT_LE(rel_l2_rows(replay, ref, e * m_max, counts[e]), 1e-2);
      }
      EXPECT_TRUE(poisoned_rows(replay, e * m_max + counts[e], m_max - counts[e]));
    }
  }
  EPMOE_CUDA_CHECK(cudaGraphExecDestroy(exec));
  EPMOE_CUDA_CHECK(cudaGraphDestroy(graph));
  EPMOE_CUDA_CHECK(cudaStreamDestroy(stream));
}

TEST(GpuGroupedGemm, RejectsBadShapesOnTheHost) {
  EPMOE_REQUIRE_GPU();
  auto dev = [](DType dt, const Shape& s) { return DeviceTensor(dt, s); };
  const DeviceTensor in = dev(DType::kBF16, {4, 64}), w = dev(DType::kBF16, {3, 32, 64}),
                     out = dev(DType::kBF16, {4, 32}), seg = dev(DType::kI32, {3});
  // K = 60 and Nout = 12 are not multiples of 8.
  const DeviceTensor in60 = dev(DType::kBF16, {4, 60}), w60 = dev(DType::kBF16, {3, 32, 60});
  EXPECT_THROW(grouped_gemm_contiguous(out.view(), in60.view(), w60.view(), seg.view(), 0, nullptr),
               Error);
  const DeviceTensor w12 = dev(DType::kBF16, {3, 12, 64}), out12 = dev(DType::kBF16, {4, 12});
  EXPECT_THROW(grouped_gemm_contiguous(out12.view(), in.view(), w12.view(), seg.view(), 0, nullptr),
               Error);
  // K mismatch, output shape, output dtype, bank overflow, host counts.
  const DeviceTensor w48 = dev(DType::kBF16, {3, 32, 48});
  EXPECT_THROW(grouped_gemm_contiguous(out.view(), in.view(), w48.view(), seg.view(), 0, nullptr),
               Error);
  const DeviceTensor out_bad = dev(DType::kBF16, {4, 40}), out_i32 = dev(DType::kI32, {4, 32});
  EXPECT_THROW(grouped_gemm_contiguous(out_bad.view(), in.view(), w.view(), seg.view(), 0, nullptr),
               Error);
  EXPECT_THROW(grouped_gemm_contiguous(out_i32.view(), in.view(), w.view(), seg.view(), 0, nullptr),
               Error);
  EXPECT_THROW(grouped_gemm_contiguous(out.view(), in.view(), w.view(), seg.view(), 2, nullptr),
               Error);  // experts [2, 4) of a bank of 3
  Tensor host_seg = i32_tensor({0, 2, 4});
  EXPECT_THROW(
      grouped_gemm_contiguous(out.view(), in.view(), w.view(), host_seg.view(), 0, nullptr), Error);
  // Masked: count length must be E_loc.
  const DeviceTensor in3 = dev(DType::kBF16, {2, 5, 64}), out3 = dev(DType::kF32, {2, 5, 32}),
                     count3 = dev(DType::kI32, {3});
  EXPECT_THROW(grouped_gemm_masked(out3.view(), in3.view(), w.view(), count3.view(), 0, nullptr),
               Error);
  const DeviceTensor w60b = dev(DType::kBF16, {3, 32, 60}), in3b = dev(DType::kBF16, {2, 5, 60}),
                     count2 = dev(DType::kI32, {2});
  EXPECT_THROW(
      grouped_gemm_masked(out3.view(), in3b.view(), w60b.view(), count2.view(), 0, nullptr), Error);
}

// The grouped-GEMM benchmark (disabled by default; run with --gtest_also_run_disabled_tests).
// EPMOE_BENCH_JSON names the JSON file to write.
TEST(GpuGroupedGemm, DISABLED_Bench) {
  EPMOE_REQUIRE_GPU();
  const nlohmann::json j = run_grouped_gemm_bench({128, 4096, 16384}, 20, 5);
  if (const char* path = std::getenv("EPMOE_BENCH_JSON")) std::ofstream(path) << j.dump(2) << "\n";
  EXPECT_FALSE(j.at("rows").empty());
}

}  // namespace
}  // namespace epmoe::cuda
