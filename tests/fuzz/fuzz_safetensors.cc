// libFuzzer target: the safetensors reader and the layer loader on arbitrary bytes. Every input
// must end in a parsed file or an epmoe::Error; a crash, a sanitizer report, a hang or an
// exception of another type is a finding. scripts/test.sh runs it for a bounded time over the
// seed corpus in tests/fuzz/corpus/safetensors.
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "epmoe/core/error.h"
#include "epmoe/weights/golden.h"
#include "epmoe/weights/moe_weights.h"
#include "epmoe/weights/safetensors.h"

namespace {

// The reader takes a path: one scratch file per process, rewritten for every input.
const std::string& scratch_path() {
  static const std::string p = [] {
    const char* dir = std::getenv("TMPDIR");
    return std::string(dir && *dir ? dir : "/tmp") + "/epmoe_fuzz_" + std::to_string(::getpid()) +
           ".safetensors";
  }();
  return p;
}

void load_all(const std::string& path) {
  const epmoe::SafetensorsFile file(path);
  for (const std::string& name : file.names()) (void)file.tensor(name);
  if (!file.metadata().count("config")) return;
  epmoe::MoeConfig cfg = epmoe::config_from_safetensors_metadata(file);
  // Layers the file's own bytes could hold: bigger ones fail the shape checks anyway, after an
  // allocation that would only slow the fuzzer down.
  const double weights = double(cfg.n_routed_experts + cfg.n_shared_experts) * 3.0 *
                         double(cfg.hidden) * double(cfg.moe_intermediate);
  if (weights > double(file.file_size()) + 1e6) return;
  for (bool fuse : {false, true}) {
    cfg.fuse_shared = fuse && cfg.n_shared_experts > 0;
    (void)epmoe::load_moe_weights(file, cfg);
    (void)epmoe::read_golden_tensors(file, cfg);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string& path = scratch_path();
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) std::abort();
  if (size > 0 && std::fwrite(data, 1, size, f) != size) std::abort();
  std::fclose(f);
  try {
    load_all(path);
  } catch (const epmoe::Error&) {
    // expected: a clean, typed error
  }
  return 0;
}
