#include "epmoe/experts/grouped_gemm_checks.h"

#include <cstdint>

#include "epmoe/core/error.h"

namespace epmoe::cuda {

namespace {
bool aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }
}  // namespace

GemmOperandDims check_grouped_gemm_operands(const char* fn, DType in_dtype, int64_t multiple,
                                            const TensorView& out, const TensorView& in,
                                            const TensorView& w, const TensorView& counts,
                                            const char* counts_name, int64_t e_loc,
                                            int bank_offset) {
  const struct {
    const char* name;
    const TensorView& t;
  } all[] = {{"out", out}, {"in", in}, {"w", w}, {counts_name, counts}};
  for (const auto& a : all)
    EPMOE_CHECK(a.t.device == Device::kCuda, kInvalidArgument,
                "{}: {} must be a device tensor (counts are read on the device)", fn, a.name);
  EPMOE_CHECK(in.dtype == in_dtype, kInvalidArgument, "{}: in must be {}, got {}", fn,
              dtype_name(in_dtype), dtype_name(in.dtype));
  EPMOE_CHECK(w.shape.rank == 3 && w.dtype == in_dtype, kInvalidArgument,
              "{}: w must be [E_bank, Nout, K] {}, got {} {}", fn, dtype_name(in_dtype),
              w.shape.str(), dtype_name(w.dtype));
  const int64_t K = in.shape[in.shape.rank - 1], n_out = w.shape[1];
  EPMOE_CHECK(w.shape[2] == K, kInvalidArgument, "{}: w {} has K = {} but in {} has K = {}", fn,
              w.shape.str(), w.shape[2], in.shape.str(), K);
  EPMOE_CHECK(K > 0 && K % multiple == 0 && K <= INT32_MAX, kUnsupported,
              "{}: K = {} (in {}) must be a positive multiple of {}", fn, K, in.shape.str(),
              multiple);
  EPMOE_CHECK(n_out > 0 && n_out % multiple == 0 && n_out <= INT32_MAX, kUnsupported,
              "{}: Nout = {} (w {}) must be a positive multiple of {}", fn, n_out, w.shape.str(),
              multiple);
  EPMOE_CHECK(out.dtype == DType::kBF16 || out.dtype == DType::kF32, kInvalidArgument,
              "{}: out must be bf16 or f32, got {}", fn, dtype_name(out.dtype));
  Shape want = in.shape;
  want.dims[in.shape.rank - 1] = n_out;
  EPMOE_CHECK(out.shape == want, kInvalidArgument, "{}: out must be {}, got {}", fn, want.str(),
              out.shape.str());
  EPMOE_CHECK(bank_offset >= 0 && bank_offset + e_loc <= w.shape[0], kInvalidArgument,
              "{}: local experts [{}, {}) exceed the bank of {} (w {})", fn, bank_offset,
              bank_offset + e_loc, w.shape[0], w.shape.str());
  EPMOE_CHECK(aligned(in.data, 16) && aligned(w.data, 16) && aligned(out.data, 16) &&
                  aligned(counts.data, 4),
              kInvalidArgument, "{}: in, w and out must be 16-byte aligned (in {}, w {}, out {})",
              fn, in.data, w.data, out.data);
  return GemmOperandDims{K, n_out};
}

}  // namespace epmoe::cuda
