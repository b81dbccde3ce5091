// One error vocabulary for the whole library: every failure is an epmoe::Error carrying a
// category and a message that names the bad value. The library never exits the process.
#pragma once

#include <fmt/format.h>

#include <stdexcept>
#include <string>

namespace epmoe {

enum class ErrorKind {
  kInvalidArgument,  // a caller passed a value outside the contract
  kInvalidConfig,    // a MoE / EP configuration that cannot work
  kBadFile,          // malformed, truncated or inconsistent weight file
  kMissingTensor,    // a checkpoint lacks a tensor the layer needs
  kNumeric,          // NaN / Inf where a finite value is required
  kTimeout,          // a bounded wait ran out
  kCuda,             // CUDA runtime / driver / cuBLAS failure
  kNccl,             // NCCL failure
  kUnsupported,      // valid request this build or device cannot serve
  kInternal,         // broken invariant inside epmoe
};

const char* error_kind_name(ErrorKind kind);

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& message) : std::runtime_error(message), kind_(kind) {}
  ErrorKind kind() const { return kind_; }

 private:
  ErrorKind kind_;
};

namespace detail {
[[noreturn]] void throw_error(ErrorKind kind, const char* file, int line, const std::string& msg);
}  // namespace detail

}  // namespace epmoe

// EPMOE_CHECK(cond, kind, "fmt", args...): throws epmoe::Error(kind, "file:line: message").
#define EPMOE_CHECK(cond, kind, ...)                                             \
  do {                                                                           \
    if (!(cond)) {                                                               \
      ::epmoe::detail::throw_error(::epmoe::ErrorKind::kind, __FILE__, __LINE__, \
                                   ::fmt::format(__VA_ARGS__));                  \
    }                                                                            \
  } while (0)

#define EPMOE_FAIL(kind, ...)                                                \
  ::epmoe::detail::throw_error(::epmoe::ErrorKind::kind, __FILE__, __LINE__, \
                               ::fmt::format(__VA_ARGS__))
