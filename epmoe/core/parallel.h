// Row-parallel loops for the CPU backend (OpenMP). Work items never share outputs, so the result
// does not depend on the thread count.
#pragma once

#include <cstdint>
#include <functional>

namespace epmoe {

// Threads used by CPU kernels when a caller passes 0: EPMOE_CPU_THREADS or all hardware threads.
int default_cpu_threads();

// Calls fn(begin, end) over [0, n) in chunks of `grain`, on up to `threads` threads
// (0 = default_cpu_threads()).
void parallel_for(int64_t n, int64_t grain, int threads,
                  const std::function<void(int64_t, int64_t)>& fn);

}  // namespace epmoe
