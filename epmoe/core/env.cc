#include "epmoe/core/env.h"

#include <cstdlib>
#include <map>
#include <mutex>

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
  std::string v;
  if (!lookup(name, &v)) return fallback;
  char* end = nullptr;
  long long x = std::strtoll(v.c_str(), &end, 10);
  EPMOE_CHECK(!v.empty() && end && *end == '\0', kInvalidConfig,
              "EPMOE_{}='{}' is not an integer", name, v);
  return x;
}

std::string env_str(const char* name, const std::string& fallback) {
  std::string v;
  return lookup(name, &v) ? v : fallback;
}

void env_reload() {
  std::lock_guard<std::mutex> lock(g_mutex);
  cache().clear();
}

int64_t wait_timeout_ms() { return env_int("TIMEOUT_MS", 10000); }

}  // namespace epmoe
