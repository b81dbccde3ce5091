// NVTX ranges: every layer operation and kernel launcher opens one, so that a profile (nsys, ncu)
// reads like the data flow. Header-only NVTX 3 (ships with the CUDA toolkit).
#pragma once

#include <nvtx3/nvToolsExt.h>

namespace epmoe::cuda {

// An NVTX range for the lifetime of a scope. `name` must outlive the scope (a literal).
class NvtxRange {
 public:
  explicit NvtxRange(const char* name) { nvtxRangePushA(name); }
  ~NvtxRange() { nvtxRangePop(); }
  NvtxRange(const NvtxRange&) = delete;
  NvtxRange& operator=(const NvtxRange&) = delete;
};

}  // namespace epmoe::cuda
