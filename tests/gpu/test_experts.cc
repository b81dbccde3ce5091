// SiLU-and-mul (bf16 / FP8, contiguous / masked) and the cuBLAS grouped GEMM vs experts_cpu.
#include <algorithm>
#include <cstring>
#include <functional>

#include "epmoe/core/exact_math.h"
#include "epmoe/cuda/cuda_check.h"
#include "epmoe/experts/experts.cuh"
#include "epmoe/experts/experts_cpu.h"
#include "epmoe/experts/linear_cpu.h"
#include "epmoe/permute/permute_cpu.h"
#include "tests/gpu/test_common.h"

namespace epmoe::cuda {
namespace {

using testing::bitwise_equal;
using testing::fresh_seed;
using testing::poisoned;
using testing::random_tensor;

// Reference activation of one row: f32 exact_silu_mul of the row's gate and up halves.
std::vector<float> act_row(const Tensor& in, int64_t row, int64_t inter) {
  std::vector<float> a(static_cast<size_t>(inter));
  const bf16* p = in.as<bf16>() + row * 2 * inter;
  for (int64_t i = 0; i < inter; ++i)
    a[size_t(i)] = exact_silu_mul(bf16_to_f32(p[i]), bf16_to_f32(p[inter + i]));
  return a;
}

// Expected outputs of the first `valid(row)` rows; other rows keep the 0xff poison.
void expected_silu(Tensor& out_bf, Tensor& q, Tensor& sc, const Tensor& in, int64_t rows,
                   int64_t inter, const std::function<bool(int64_t)>& valid) {
  const int64_t nb = (inter + 127) / 128;
  std::memset(out_bf.view().data, 0xff, out_bf.nbytes());
  std::memset(q.view().data, 0xff, q.nbytes());
  std::memset(sc.view().data, 0xff, sc.nbytes());
  for (int64_t r = 0; r < rows; ++r) {
    if (!valid(r)) continue;
    const std::vector<float> a = act_row(in, r, inter);
    for (int64_t i = 0; i < inter; ++i)
      out_bf.as<bf16>()[r * inter + i] = f32_to_bf16(a[size_t(i)]);
    quantize_row_fp8(q.as<fp8e4m3>() + r * inter, sc.as<float>() + r * nb, a.data(), inter);
  }
}

TEST(GpuExperts, SiluContiguousAndMasked) {
  EPMOE_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (int64_t inter : {8, 64, 200, 2048}) {
    for (int64_t M : {int64_t(0), int64_t(1), int64_t(7), int64_t(300)}) {
      SCOPED_TRACE("I=" + std::to_string(inter) + " M=" + std::to_string(M));
      const int64_t nb = (inter + 127) / 128;
      Tensor in = random_tensor(DType::kBF16, {M, 2 * inter}, rng, 6.f);
      DeviceTensor din = DeviceTensor::from_host(in);
      // Contiguous: only the first m rows exist (m read from the device).
      const int32_t m = int32_t(M * 2 / 3);
      Tensor mt(DType::kI32, {1});
      mt.as<int32_t>()[0] = m;
      DeviceTensor dm = DeviceTensor::from_host(mt);
      Tensor ob(DType::kBF16, {M, inter}), q(DType::kF8E4M3, {M, inter}), sc(DType::kF32, {M, nb});
      expected_silu(ob, q, sc, in, M, inter, [&](int64_t r) { return r < m; });
      DeviceTensor gob = poisoned(DType::kBF16, {M, inter}),
                   gq = poisoned(DType::kF8E4M3, {M, inter}), gsc = poisoned(DType::kF32, {M, nb});
      silu_and_mul(gob.view(), din.view(), dm.as<int32_t>(), nullptr);
      silu_and_mul_fp8(gq.view(), gsc.view(), din.view(), dm.as<int32_t>(), nullptr);
      EPMOE_CUDA_CHECK(cudaDeviceSynchronize());
      EXPECT_TRUE(bitwise_equal(gob.to_host(), ob, "silu bf16 contiguous"));
      EXPECT_TRUE(bitwise_equal(gq.to_host(), q, "silu fp8 contiguous"));
      EXPECT_TRUE(bitwise_equal(gsc.to_host(), sc, "silu fp8 scales contiguous"));
    }
    // Masked [E, M_max, 2I] with counts 0..M_max.
    const int64_t E = 5, m_max = 9;
    SCOPED_TRACE("masked I=" + std::to_string(inter));
    Tensor in = random_tensor(DType::kBF16, {E, m_max, 2 * inter}, rng, 6.f);
    Tensor count(DType::kI32, {E});
    const int32_t counts[E] = {0, 9, 3, 1, 8};
    std::copy(counts, counts + E, count.as<int32_t>());
    const int64_t nb = (inter + 127) / 128;
    Tensor ob(DType::kBF16, {E, m_max, inter}), q(DType::kF8E4M3, {E, m_max, inter}),
        sc(DType::kF32, {E, m_max, nb});
    Tensor in2d(DType::kBF16, {E * m_max, 2 * inter});
    std::memcpy(in2d.view().data, in.view().data, in.nbytes());
    expected_silu(ob, q, sc, in2d, E * m_max, inter,
                  [&](int64_t r) { return r % m_max < counts[r / m_max]; });
    DeviceTensor din = DeviceTensor::from_host(in), dc = DeviceTensor::from_host(count);
    DeviceTensor gob = poisoned(DType::kBF16, {E, m_max, inter}),
                 gq = poisoned(DType::kF8E4M3, {E, m_max, inter}),
                 gsc = poisoned(DType::kF32, {E, m_max, nb});
    silu_and_mul_masked(gob.view(), din.view(), dc.view(), nullptr);
    silu_and_mul_fp8_masked(gq.view(), gsc.view(), din.view(), dc.view(), nullptr);
    EPMOE_CUDA_CHECK(cudaDeviceSynchronize());
    EXPECT_TRUE(bitwise_equal(gob.to_host(), ob, "silu bf16 masked"));
    EXPECT_TRUE(bitwise_equal(gq.to_host(), q, "silu fp8 masked"));
    EXPECT_TRUE(bitwise_equal(gsc.to_host(), sc, "silu fp8 scales masked"));
  }
}

// Reference rows: out[r] = in[r] · W[e]ᵀ in f32 (linear_rows_cpu).
void ref_rows(float* out, const Tensor& in_f32, int64_t row0, int64_t rows, const TensorView& w,
              int64_t k, int64_t n_out) {
  if (rows > 0)
    linear_rows_cpu(out + row0 * n_out, n_out, in_f32.as<float>() + row0 * k, k, rows, w);
}

TEST(GpuExperts, GroupedGemmContiguous) {
  EPMOE_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  GroupedGemmRunner runner;
  for (int skew = 0; skew < 2; ++skew) {
    const int E_bank = 12, e_loc = 8, offset = 3;
    const int64_t K = 256, n_out = 192;
    std::vector<int32_t> seg(e_loc + 1, 0);
    std::uniform_int_distribution<int> cnt(0, 40);
    for (int e = 0; e < e_loc; ++e) {
      const int c = skew ? (e == 5 ? 777 : 0) : (e == 2 ? 0 : cnt(rng));
      seg[e + 1] = seg[e] + c;
    }
    const int64_t N = seg[e_loc] + 5;  // a few spare rows past the experts' rows
    Tensor in = random_tensor(DType::kBF16, {N, K}, rng);
    Tensor w = random_tensor(DType::kBF16, {E_bank, n_out, K}, rng, 0.1f);
    Tensor in32 = to_f32(in.view()), ref(DType::kF32, {N, n_out});
    for (int e = 0; e < e_loc; ++e)
      ref_rows(ref.as<float>(), in32, seg[e], seg[e + 1] - seg[e], bank_slice(w, offset + e), K,
               n_out);
    DeviceTensor din = DeviceTensor::from_host(in), dw = DeviceTensor::from_host(w);
    for (auto impl :
         {GroupedGemmImpl::kGrouped, GroupedGemmImpl::kPerExpert, GroupedGemmImpl::kAuto})
      for (DType odt : {DType::kBF16, DType::kF32}) {
        SCOPED_TRACE(std::string(impl == GroupedGemmImpl::kGrouped ? "grouped " : "per-expert ") +
                     dtype_name(odt) + (skew ? " skewed" : ""));
        DeviceTensor out = poisoned(odt, {N, n_out});
        runner.contiguous(out.view(), din.view(), dw.view(), seg.data(), e_loc, offset, nullptr,
                          impl);
        EPMOE_CUDA_CHECK(cudaDeviceSynchronize());
        Tensor got = to_f32(out.to_host().view());
        const int64_t used = seg[e_loc] * n_out;
        Tensor g_used(DType::kF32, {used}), r_used(DType::kF32, {used});
        std::memcpy(g_used.view().data, got.view().data, size_t(used) * 4);
        std::memcpy(r_used.view().data, ref.view().data, size_t(used) * 4);
        EXPECT_LE(testing::rel_l2(g_used, r_used), odt == DType::kBF16 ? 5e-3 : 1e-5);
        // Spare rows past seg[E_loc] are never written.
        bool untouched = true;
        for (int64_t i = used; i < N * n_out; ++i) untouched &= std::isnan(got.as<float>()[i]);
        EXPECT_TRUE(untouched) << "rows past seg_indptr[E_loc] were written";
      }
  }
}

TEST(GpuExperts, GroupedGemmMasked) {
  EPMOE_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  GroupedGemmRunner runner;
  const int e_loc = 6;
  const int64_t m_max = 32, K = 128, n_out = 64;
  const int32_t count[e_loc] = {0, 32, 5, 1, 17, 0};
  Tensor in = random_tensor(DType::kBF16, {e_loc, m_max, K}, rng);
  Tensor w = random_tensor(DType::kBF16, {e_loc, n_out, K}, rng, 0.1f);
  Tensor in32 = to_f32(in.view()), ref(DType::kF32, {e_loc, m_max, n_out});
  for (int e = 0; e < e_loc; ++e)
    ref_rows(ref.as<float>(), in32, e * m_max, count[e], bank_slice(w, e), K, n_out);
  // Rows >= count hold NaN in the input: they must be neither read nor written.
  for (int e = 0; e < e_loc; ++e)
    for (int64_t r = count[e]; r < m_max; ++r)
      for (int64_t k = 0; k < K; ++k) in.as<bf16>()[(e * m_max + r) * K + k] = bf16{0x7fc0};
  DeviceTensor din = DeviceTensor::from_host(in), dw = DeviceTensor::from_host(w);
  for (auto impl : {GroupedGemmImpl::kGrouped, GroupedGemmImpl::kPerExpert}) {
    DeviceTensor out = poisoned(DType::kBF16, {e_loc, m_max, n_out});
    runner.masked(out.view(), din.view(), dw.view(), count, 0, nullptr, impl);
    EPMOE_CUDA_CHECK(cudaDeviceSynchronize());
    Tensor got = to_f32(out.to_host().view());
    double num = 0, den = 0;
    bool untouched = true;
    for (int e = 0; e < e_loc; ++e)
      for (int64_t r = 0; r < m_max; ++r)
        for (int64_t c = 0; c < n_out; ++c) {
          const int64_t i = (e * m_max + r) * n_out + c;
          if (r < count[e]) {
            const double d = got.as<float>()[i] - ref.as<float>()[i];
            num += d * d;
            den += double(ref.as<float>()[i]) * ref.as<float>()[i];
          } else {
            untouched &= std::isnan(got.as<float>()[i]);
          }
        }
    EXPECT_LE(std::sqrt(num / den), 5e-3);
    EXPECT_TRUE(untouched) << "rows >= count were written";
  }
}

TEST(GpuExperts, BadShapesThrow) {
  EPMOE_REQUIRE_GPU();
  DeviceTensor in(DType::kBF16, {4, 20}), out(DType::kBF16, {4, 10});
  EXPECT_THROW(silu_and_mul(out.view(), in.view(), nullptr, nullptr), Error);  // I % 8
  DeviceTensor in2(DType::kBF16, {4, 32}), out2(DType::kBF16, {4, 8});
  EXPECT_THROW(silu_and_mul(out2.view(), in2.view(), nullptr, nullptr), Error);
  GroupedGemmRunner runner;
  DeviceTensor a(DType::kBF16, {10, 64}), w(DType::kBF16, {2, 32, 64}), c(DType::kBF16, {10, 32});
  const int32_t bad_seg[3] = {0, 6, 11};  // past the buffer
  EXPECT_THROW(runner.contiguous(c.view(), a.view(), w.view(), bad_seg, 2, 0, nullptr), Error);
  const int32_t seg[3] = {0, 6, 10};
  EXPECT_THROW(runner.contiguous(c.view(), a.view(), w.view(), seg, 2, 1, nullptr), Error);
}

}  // namespace
}  // namespace epmoe::cuda
