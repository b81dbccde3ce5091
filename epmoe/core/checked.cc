#include "epmoe/core/checked.h"

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <limits>

#include "epmoe/core/env.h"

namespace epmoe {

int64_t checked_mul(int64_t a, int64_t b, const char* what) {
  int64_t r = 0;
  EPMOE_CHECK(a >= 0 && b >= 0 && !__builtin_mul_overflow(a, b, &r), kInvalidArgument,
              "{} overflows: {} x {}", what, a, b);
  return r;
}

int64_t checked_add(int64_t a, int64_t b, const char* what) {
  int64_t r = 0;
  EPMOE_CHECK(a >= 0 && b >= 0 && !__builtin_add_overflow(a, b, &r), kInvalidArgument,
              "{} overflows: {} + {}", what, a, b);
  return r;
}

size_t checked_mul(size_t a, size_t b, const char* what) {
  size_t r = 0;
  EPMOE_CHECK(!__builtin_mul_overflow(a, b, &r), kInvalidArgument, "{} overflows: {} x {}", what, a,
              b);
  return r;
}

size_t checked_add(size_t a, size_t b, const char* what) {
  size_t r = 0;
  EPMOE_CHECK(!__builtin_add_overflow(a, b, &r), kInvalidArgument, "{} overflows: {} + {}", what, a,
              b);
  return r;
}

int64_t parse_int_in_range(const std::string& text, int64_t lo, int64_t hi,
                           const std::string& what) {
  const char* s = text.c_str();
  bool ok = !text.empty() && (s[0] == '-' ? lo < 0 && text.size() > 1 : s[0] >= '0' && s[0] <= '9');
  long long v = 0;
  if (ok) {
    char* end = nullptr;
    errno = 0;
    v = std::strtoll(s, &end, 10);
    ok = errno == 0 && end != nullptr && *end == '\0';
  }
  if (!(ok && v >= lo && v <= hi)) {
    if (lo == 0)
      EPMOE_FAIL(kInvalidArgument, "{}: '{}' is not a non-negative integer (at most {})", what,
                 text, hi);
    EPMOE_FAIL(kInvalidArgument, "{}: '{}' is not an integer in [{}, {}]", what, text, lo, hi);
  }
  return int64_t(v);
}

int64_t max_buffer_bytes() {
  constexpr int64_t kDefault = int64_t(16) << 30;
  return env_int_in_range("MAX_BUFFER_BYTES", kDefault, 1, std::numeric_limits<int64_t>::max());
}

void check_buffer_budget(int64_t bytes, const std::string& what) {
  const int64_t budget = max_buffer_bytes();
  EPMOE_CHECK(bytes <= budget, kInvalidConfig,
              "{} needs {} bytes ({:.2f} GiB), more than the buffer budget of {} bytes ({:.2f} "
              "GiB, EPMOE_MAX_BUFFER_BYTES)",
              what, bytes, double(bytes) / double(1 << 30), budget,
              double(budget) / double(1 << 30));
}

namespace {
std::atomic<int64_t> g_reserved{0};
}  // namespace

BufferReservation::BufferReservation(int64_t bytes, const std::string& what) {
  check_buffer_budget(bytes, what);
  const int64_t budget = max_buffer_bytes();
  int64_t held = g_reserved.load();
  while (true) {
    EPMOE_CHECK(held <= budget - bytes, kInvalidConfig,
                "{} needs {} bytes ({:.2f} GiB), but {} bytes of the buffer budget of {} bytes "
                "({:.2f} GiB, EPMOE_MAX_BUFFER_BYTES) are already held",
                what, bytes, double(bytes) / double(1 << 30), held, budget,
                double(budget) / double(1 << 30));
    if (g_reserved.compare_exchange_weak(held, held + bytes)) break;
  }
  bytes_ = bytes;
}

BufferReservation::~BufferReservation() {
  if (bytes_ > 0) g_reserved.fetch_sub(bytes_);
}

BufferReservation::BufferReservation(BufferReservation&& other) noexcept : bytes_(other.bytes_) {
  other.bytes_ = 0;
}

BufferReservation& BufferReservation::operator=(BufferReservation&& other) noexcept {
  if (this != &other) {
    if (bytes_ > 0) g_reserved.fetch_sub(bytes_);
    bytes_ = other.bytes_;
    other.bytes_ = 0;
  }
  return *this;
}

}  // namespace epmoe
