#include "epmoe/comm/communicator.h"

#include <chrono>
#include <thread>

#include "epmoe/core/env.h"
#include "epmoe/core/error.h"

namespace epmoe {

namespace {
using Clock = std::chrono::steady_clock;
}  // namespace

void flag_store_release(uint64_t* flag, uint64_t value) {
  __atomic_store_n(flag, value, __ATOMIC_RELEASE);
}

uint64_t flag_load_acquire(const uint64_t* flag) { return __atomic_load_n(flag, __ATOMIC_ACQUIRE); }

int64_t Communicator::wait_timeout() const {
  return timeout_ms_ >= 0 ? timeout_ms_ : wait_timeout_ms();
}

uint64_t Communicator::wait_flag(const uint64_t* flag, uint64_t expected, int peer,
                                 const char* what, uint64_t mask) {
  uint64_t seen = flag_load_acquire(flag);
  if ((seen & mask) == expected) return seen;
  const int64_t budget = wait_timeout();
  const auto deadline = Clock::now() + std::chrono::milliseconds(budget);
  for (uint64_t spin = 0;; ++spin) {
    seen = flag_load_acquire(flag);
    if ((seen & mask) == expected) return seen;
    if ((spin & 63) == 63) {
      const int failed = failed_peer();
      if (failed >= 0)
        EPMOE_FAIL(kTimeout, "rank {} stopped waiting for {} from peer {}: rank {} failed", rank(),
                   what, peer, failed);
      if (Clock::now() > deadline)
        EPMOE_FAIL(kTimeout,
                   "rank {} waited {} ms for {} from peer {}: expected {:#x}, observed {:#x}",
                   rank(), budget, what, peer, expected, seen);
      std::this_thread::yield();
    }
  }
}

}  // namespace epmoe
