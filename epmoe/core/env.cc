#include "epmoe/core/env.h"

#include <cstdlib>
#include <limits>
#include <map>
#include <mutex>

#include "epmoe/core/checked.h"
#include "epmoe/core/error.h"

namespace epmoe {

namespace {
std::mutex g_mutex;
std::map<std::string, std::string>& cache() {
  static std::map<std::string, std::string> c;
  return c;
}
// Returns true and the value when EPMOE_<name> is set; caches the first read.
bool lookup(const char* name, std::string* value) {
  std::lock_guard<std::mutex> lock(g_mutex);
  std::string key = std::string("EPMOE_") + name;
  auto it = cache().find(key);
  if (it == cache().end()) {
    const char* v = std::getenv(key.c_str());
    it = cache().emplace(key, v ? std::string(v) : std::string("\x01unset")).first;
  }
  if (it->second == "\x01unset") return false;
  *value = it->second;
  return true;
}
}  // namespace

int64_t env_int(const char* name, int64_t fallback) {
  return env_int_in_range(name, fallback, std::numeric_limits<int64_t>::min(),
                          std::numeric_limits<int64_t>::max());
}

int64_t env_int_in_range(const char* name, int64_t fallback, int64_t lo, int64_t hi) {
  std::string v;
  if (!lookup(name, &v)) return fallback;
  try {
    return parse_int_in_range(v, lo, hi, fmt::format("EPMOE_{}", name));
  } catch (const Error&) {
    EPMOE_FAIL(kInvalidConfig, "EPMOE_{}='{}' is not an integer in [{}, {}]", name, v, lo, hi);
  }
}

std::string env_str(const char* name, const std::string& fallback) {
  std::string v;
  return lookup(name, &v) ? v : fallback;
}

void env_reload() {
  std::lock_guard<std::mutex> lock(g_mutex);
  cache().clear();
}

int64_t wait_timeout_ms() { return env_int_in_range("TIMEOUT_MS", 10000, 1, 86400000); }

}  // namespace epmoe
