// Element types and exact scalar conversions (round-to-nearest-even everywhere; FP8 e4m3
// saturates to +-448, as the "fn" variant used by DeepSeek checkpoints and Hopper's cvt does).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

namespace epmoe {

enum class DType : uint8_t { kF32, kBF16, kF16, kF8E4M3, kI32, kI64 };

size_t dtype_size(DType t);
const char* dtype_name(DType t);
// Parses "f32", "bf16", ... and the safetensors spellings "F32", "BF16", "F16", "F8_E4M3",
// "I32", "I64". Throws Error(kInvalidArgument) naming the unknown string.
DType parse_dtype(const std::string& s);

// Storage-only 16-bit / 8-bit types: arithmetic always happens in f32.
struct bf16 {
  uint16_t bits;
};
struct f16 {
  uint16_t bits;
};
struct fp8e4m3 {
  uint8_t bits;
};

inline float bits_to_f32(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
inline uint32_t f32_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

inline float bf16_to_f32(bf16 v) { return bits_to_f32(uint32_t(v.bits) << 16); }
inline bf16 f32_to_bf16(float f) {
  uint32_t b = f32_to_bits(f);
  if ((b & 0x7fffffffu) > 0x7f800000u) return bf16{uint16_t((b >> 16) | 0x40)};  // quiet NaN
  b += 0x7fffu + ((b >> 16) & 1u);  // round to nearest even; overflow rounds to inf correctly
  return bf16{uint16_t(b >> 16)};
}
inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

float f16_to_f32(f16 v);
f16 f32_to_f16(float f);
float fp8e4m3_to_f32(fp8e4m3 v);
fp8e4m3 f32_to_fp8e4m3(float f);  // saturating, NaN -> 0x7f

constexpr float kFp8E4M3Max = 448.0f;

}  // namespace epmoe
