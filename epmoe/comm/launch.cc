#include "epmoe/comm/launch.h"

#include <fmt/format.h>

#include <cstdlib>

#include "epmoe/core/error.h"
#include "epmoe/cuda/device.h"
#ifdef EPMOE_WITH_NCCL
#include "epmoe/comm/nccl_transport.h"
#endif

namespace epmoe::cuda {

void apply_process_settings() {
  setenv("CUDA_MODULE_LOADING", "EAGER", 0);
  setenv("CUDA_DEVICE_MAX_CONNECTIONS", "32", 0);
  setenv("NCCL_NVLS_ENABLE", "0", 0);
}

LaunchInfo launch_ranks(const std::string& transport_opt, int R,
                        const std::function<void(GpuTransport&)>& fn) {
  apply_process_settings();
  EPMOE_CHECK(transport_opt == "auto" || transport_opt == "nccl" || transport_opt == "loopback",
              kInvalidArgument, "--transport must be auto, nccl or loopback, got '{}'",
              transport_opt);
  require_device();
  LaunchInfo info;
#ifdef EPMOE_WITH_NCCL
  if (launched_by_mpi()) {
    auto t = make_nccl_transport_mpi();
    EPMOE_CHECK(t->size() == R, kInvalidConfig, "mpirun started {} processes for {} ranks",
                t->size(), R);
    info.transport = "nccl (mpirun, one process per GPU)";
    info.mpi = true;
    info.local_rank = t->rank();
    fn(*t);
    return info;
  }
  const bool have_nccl = true;
#else
  const bool have_nccl = false;
#endif
  std::string transport = transport_opt;
  if (transport == "auto") transport = have_nccl && device_count() >= R ? "nccl" : "loopback";
  if (transport == "loopback") {
    info.transport = fmt::format("loopback ({} virtual rank{} on GPU 0)", R, R == 1 ? "" : "s");
    run_loopback(R, 0, fn);
    return info;
  }
  EPMOE_CHECK(device_count() >= R, kUnsupported,
              "--transport nccl needs one GPU per rank: {} ranks, {} GPU(s) (use --transport "
              "loopback to run the ranks on one GPU)",
              R, device_count());
#ifdef EPMOE_WITH_NCCL
  info.transport = fmt::format("nccl ({} GPU{}, a thread each)", R, R == 1 ? "" : "s");
  run_nccl_threads(R, fn);
  return info;
#else
  EPMOE_FAIL(kUnsupported, "this epmoe was built without NCCL (--transport loopback works)");
#endif
}

}  // namespace epmoe::cuda
