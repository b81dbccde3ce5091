#include "epmoe/core/parallel.h"

#include <omp.h>

#include <algorithm>
#include <exception>
#include <mutex>
#include <thread>

#include "epmoe/core/env.h"

namespace epmoe {

int default_cpu_threads() {
  static const int n = [] {
    int64_t v = env_int_in_range("CPU_THREADS", 0, 0, 4096);
    if (v > 0) return int(v);
    return int(std::max(1u, std::thread::hardware_concurrency()));
  }();
  return n;
}

void parallel_for(int64_t n, int64_t grain, int threads,
                  const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  if (grain < 1) grain = 1;
  if (threads <= 0) threads = default_cpu_threads();
  const int64_t chunks = (n + grain - 1) / grain;
  if (threads == 1 || chunks == 1) {
    fn(0, n);
    return;
  }
  std::exception_ptr error;
  std::mutex error_mutex;
#pragma omp parallel for schedule(dynamic, 1) num_threads(int(std::min <int64_t>(threads, chunks)))
  for (int64_t c = 0; c < chunks; ++c) {
    try {
      fn(c * grain, std::min(n, (c + 1) * grain));
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace epmoe
