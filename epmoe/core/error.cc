#include "epmoe/core/error.h"

#include <cstring>

namespace epmoe {

const char* error_kind_name(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::kInvalidArgument:
      return "invalid argument";
    case ErrorKind::kInvalidConfig:
      return "invalid configuration";
    case ErrorKind::kBadFile:
      return "bad file";
    case ErrorKind::kMissingTensor:
      return "missing tensor";
    case ErrorKind::kNumeric:
      return "numeric error";
    case ErrorKind::kTimeout:
      return "timeout";
    case ErrorKind::kCuda:
      return "CUDA error";
    case ErrorKind::kNccl:
      return "NCCL error";
    case ErrorKind::kUnsupported:
      return "unsupported";
    case ErrorKind::kInternal:
      return "internal error";
  }
  return "error";
}

namespace detail {
void throw_error(ErrorKind kind, const char* file, int line, const std::string& msg) {
  const char* base = std::strrchr(file, '/');
  throw Error(kind, fmt::format("{} ({}:{}): {}", error_kind_name(kind), base ? base + 1 : file,
                                line, msg));
}
}  // namespace detail

}  // namespace epmoe
