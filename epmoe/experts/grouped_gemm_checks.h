// The host-side operand checks every grouped GEMM makes before it launches (the portable kernel
// in grouped_gemm.cu and the sm90 family): devices, dtypes, shapes, K/Nout multiples, the bank
// range and alignment, each failure a typed Error naming the call and the operand.
#pragma once

#include <cstdint>

#include "epmoe/core/tensor.h"

namespace epmoe::cuda {

struct GemmOperandDims {
  int64_t k = 0, n_out = 0;
};

// out: [..., Nout] bf16|f32 with in's leading dims; in: [..., K] of `in_dtype`;
// w: [E_bank, Nout, K] of `in_dtype`; counts (named `counts_name`): device i32 read by the
// kernel. K and Nout must be positive multiples of `multiple`; experts
// [bank_offset, bank_offset + e_loc) must lie in the bank. in's rank and the counts' shape are
// the caller's to check.
GemmOperandDims check_grouped_gemm_operands(const char* fn, DType in_dtype, int64_t multiple,
                                            const TensorView& out, const TensorView& in,
                                            const TensorView& w, const TensorView& counts,
                                            const char* counts_name, int64_t e_loc,
                                            int bank_offset);

}  // namespace epmoe::cuda
