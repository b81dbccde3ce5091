// Checked size arithmetic and the host buffer budget: every size computed from user input (CLI
// numbers, file headers, configs) goes through these, so a hostile value ends in an Error that
// names what overflowed instead of a tiny buffer and an out-of-bounds access.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "epmoe/core/error.h"

namespace epmoe {

// a · b and a + b for non-negative int64 (sizes, counts). Throws Error(kInvalidArgument)
// "<what> overflows: a x b" when an operand is negative or the result does not fit in int64.
int64_t checked_mul(int64_t a, int64_t b, const char* what);
int64_t checked_add(int64_t a, int64_t b, const char* what);
// The same for byte counts.
size_t checked_mul(size_t a, size_t b, const char* what);
size_t checked_add(size_t a, size_t b, const char* what);

// Parses a whole decimal integer in [lo, hi]; `what` names it in the error ("--tokens",
// "EPMOE_TIMEOUT_MS"). Rejects empty strings, signs where lo >= 0 forbids them, trailing
// characters and values that do not fit (a 20-digit number is an error, not INT64_MAX).
int64_t parse_int_in_range(const std::string& text, int64_t lo, int64_t hi,
                           const std::string& what);

// The budget of host buffers sized from the input (receive buffers, low-latency windows, token
// activations): EPMOE_MAX_BUFFER_BYTES, default 16 GiB. Weights are not counted (they are checked
// against the available memory at load).
int64_t max_buffer_bytes();
// Throws Error(kInvalidConfig) naming `what`, the bytes it asks for and the budget when
// `bytes` exceeds max_buffer_bytes().
void check_buffer_budget(int64_t bytes, const std::string& what);

// Bytes of the budget held for as long as the buffers they size live; the sum over the process
// (every rank thread) stays within max_buffer_bytes(). Move-only.
class BufferReservation {
 public:
  BufferReservation() = default;
  // Throws Error(kInvalidConfig) naming `what`, its bytes, the bytes already held and the budget.
  BufferReservation(int64_t bytes, const std::string& what);
  ~BufferReservation();
  BufferReservation(BufferReservation&& other) noexcept;
  BufferReservation& operator=(BufferReservation&& other) noexcept;
  BufferReservation(const BufferReservation&) = delete;
  BufferReservation& operator=(const BufferReservation&) = delete;

 private:
  int64_t bytes_ = 0;
};

}  // namespace epmoe
