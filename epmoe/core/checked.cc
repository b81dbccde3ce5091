#include "epmoe/core/checked.h"

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
  EPMOE_CHECK(!__builtin_mul_overflow(a, b, &r), kInvalidArgument, "{} overflows: {} x {}", what,
              a, b);
  return r;
}

size_t checked_add(size_t a, size_t b, const char* what) {
  size_t r = 0;
  EPMOE_CHECK(!__builtin_add_overflow(a, b, &r), kInvalidArgument, "{} overflows: {} + {}", what,
              a, b);
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
  EPMOE_CHECK(ok && v >= lo && v <= hi, kInvalidArgument,
              "{} must be an integer in [{}, {}], got '{}'", what, lo, hi, text);
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

}  // namespace epmoe
