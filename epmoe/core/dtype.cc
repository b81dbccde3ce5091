#include "epmoe/core/dtype.h"

#include <cmath>

#include "epmoe/core/error.h"

namespace epmoe {

size_t dtype_size(DType t) {
  switch (t) {
    case DType::kF32:
      return 4;
    case DType::kBF16:
      return 2;
    case DType::kF16:
      return 2;
    case DType::kF8E4M3:
      return 1;
    case DType::kI32:
      return 4;
    case DType::kI64:
      return 8;
  }
  EPMOE_FAIL(kInternal, "unknown dtype {}", int(t));
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::kF32:
      return "f32";
    case DType::kBF16:
      return "bf16";
    case DType::kF16:
      return "f16";
    case DType::kF8E4M3:
      return "fp8_e4m3";
    case DType::kI32:
      return "i32";
    case DType::kI64:
      return "i64";
  }
  return "?";
}

DType parse_dtype(const std::string& s) {
  if (s == "f32" || s == "F32") return DType::kF32;
  if (s == "bf16" || s == "BF16") return DType::kBF16;
  if (s == "f16" || s == "F16") return DType::kF16;
  if (s == "fp8_e4m3" || s == "F8_E4M3") return DType::kF8E4M3;
  if (s == "i32" || s == "I32") return DType::kI32;
  if (s == "i64" || s == "I64") return DType::kI64;
  EPMOE_FAIL(kInvalidArgument, "unknown dtype '{}'", s);
}

// Generic float -> small float with round-to-nearest-even. `man_bits` explicit mantissa bits,
// `bias` exponent bias, `max_biased_exp` largest exponent field holding finite numbers.
// Returns the magnitude bits (sign handled by callers). Values beyond `max_finite_bits` are
// reported through `overflow`.
namespace {
uint32_t round_to_small(float a, int man_bits, int bias, uint32_t max_finite_bits, bool* overflow) {
  // a is finite and >= 0.
  *overflow = false;
  if (a == 0.0f) return 0;
  int e;
  std::frexp(a, &e);         // a = m * 2^e, m in [0.5, 1)
  int exp_unbiased = e - 1;  // a = 1.f * 2^exp_unbiased
  int min_normal_exp = 1 - bias;
  // Quantum (spacing of representable values) near a.
  int q_exp = (exp_unbiased < min_normal_exp ? min_normal_exp : exp_unbiased) - man_bits;
  double scaled = std::ldexp(double(a), -q_exp);  // exact: a has 24 bits
  double r = std::nearbyint(scaled);              // FE_TONEAREST = ties to even
  uint64_t units = uint64_t(r);
  // units * 2^q_exp is the rounded value; encode it.
  uint32_t bits;
  if (exp_unbiased < min_normal_exp) {
    // subnormal range; units <= 2^man_bits (== 2^man_bits means it rounded up to min normal).
    bits = uint32_t(units);  // exponent field 0 or 1 falls out naturally
  } else {
    int exp_field = exp_unbiased + bias;
    if (units == (uint64_t(1) << (man_bits + 1))) {  // rounded up to next binade
      exp_field += 1;
      units >>= 1;
    }
    bits = (uint32_t(exp_field) << man_bits) | uint32_t(units & ((1u << man_bits) - 1));
  }
  if (bits > max_finite_bits) *overflow = true;
  return bits;
}
}  // namespace

float f16_to_f32(f16 v) {
  uint32_t sign = (v.bits >> 15) & 1, exp = (v.bits >> 10) & 0x1f, man = v.bits & 0x3ff;
  float mag;
  if (exp == 0)
    mag = std::ldexp(float(man), -24);
  else if (exp == 31)
    mag = man ? NAN : INFINITY;
  else
    mag = std::ldexp(float(man | 0x400), int(exp) - 25);
  return sign ? -mag : mag;
}

f16 f32_to_f16(float f) {
  uint16_t sign = (f32_to_bits(f) >> 16) & 0x8000;
  if (std::isnan(f)) return f16{uint16_t(0x7e00)};
  float a = std::fabs(f);
  if (std::isinf(a)) return f16{uint16_t(sign | 0x7c00)};
  bool overflow;
  uint32_t bits = round_to_small(a, 10, 15, 0x7bff, &overflow);
  if (overflow) return f16{uint16_t(sign | 0x7c00)};  // IEEE: round to inf
  return f16{uint16_t(sign | bits)};
}

float fp8e4m3_to_f32(fp8e4m3 v) {
  uint32_t sign = (v.bits >> 7) & 1, exp = (v.bits >> 3) & 0xf, man = v.bits & 0x7;
  float mag;
  if (exp == 15 && man == 7)
    mag = NAN;
  else if (exp == 0)
    mag = std::ldexp(float(man), -9);
  else
    mag = std::ldexp(float(man | 0x8), int(exp) - 10);
  return sign ? -mag : mag;
}

fp8e4m3 f32_to_fp8e4m3(float f) {
  if (std::isnan(f)) return fp8e4m3{0x7f};
  uint8_t sign = (f32_to_bits(f) >> 24) & 0x80;
  float a = std::fabs(f);
  if (a >= kFp8E4M3Max) return fp8e4m3{uint8_t(sign | 0x7e)};  // saturate (inf too)
  bool overflow;
  uint32_t bits = round_to_small(a, 3, 7, 0x7e, &overflow);
  if (overflow) bits = 0x7e;
  return fp8e4m3{uint8_t(sign | bits)};
}

}  // namespace epmoe
