// Environment tunables, all prefixed EPMOE_, read once and cached. The README lists them.
#pragma once

#include <cstdint>
#include <string>

namespace epmoe {

// Integer tunable `EPMOE_<name>`; `fallback` when unset. Throws Error(kInvalidConfig) when the
// variable is set but not an integer.
int64_t env_int(const char* name, int64_t fallback);
// The same, range-checked: Error(kInvalidConfig) naming the variable, its value and [lo, hi]
// when the value is not an integer in range (a 20-digit number does not fit, it is not clamped).
int64_t env_int_in_range(const char* name, int64_t fallback, int64_t lo, int64_t hi);
std::string env_str(const char* name, const std::string& fallback);

// Forgets the cached values: the next read sees the environment as it is now (tests that change
// a tunable for one scope).
void env_reload();

// Budget for every bounded wait (flags, counters, barriers): EPMOE_TIMEOUT_MS, default 10000,
// in [1, 86400000] (a day; 0 or a negative value would time out at once, a huge one overflows
// the deadline).
int64_t wait_timeout_ms();

}  // namespace epmoe
