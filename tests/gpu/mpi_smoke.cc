// The NCCL transport under mpirun, one process per GPU: the same checks as the thread-per-GPU
// suite. Prints "mpi smoke: rank r/R ok"; exit 0 ok, 77 skipped (no GPU, or fewer GPUs than
// node-local ranks), 1 failed.
//   mpirun --allow-run-as-root --oversubscribe -np 2 build/epmoe_mpi_smoke
#include <cstdio>
#include <exception>

#include "epmoe/comm/nccl_transport.h"
#include "epmoe/cuda/device.h"
#include "tests/gpu/nccl_checks.h"

int main() {
  using namespace epmoe;
  using namespace epmoe::cuda;
  if (!launched_by_mpi()) {
    std::fprintf(stderr, "mpi smoke: not started by mpirun; running as a single rank\n");
  }
  if (device_count() == 0) {
    std::printf("mpi smoke: SKIPPED (no CUDA GPU)\n");
    return 77;
  }
  int rank = -1, size = 0;
  try {
    std::unique_ptr<NcclTransport> t = make_nccl_transport_mpi();
    rank = t->rank();
    size = t->size();
    std::string exchange = testing::check_symmetric_exchange(*t);
    bool window = testing::check_nccl_window_view(*t);
    testing::check_all_to_all(*t);
    testing::check_all_gather(*t);
    t->barrier();
    std::printf("mpi smoke: %s; window %s; %s\n", exchange.c_str(), window ? "yes" : "no",
                testing::nccl_env_summary().c_str());
    t.reset();
    std::printf("mpi smoke: rank %d/%d ok\n", rank, size);
    return 0;
  } catch (const Error& e) {
    if (e.kind() == ErrorKind::kUnsupported) {
      std::printf("mpi smoke: SKIPPED (%s)\n", e.what());
      return 77;
    }
    std::fprintf(stderr, "mpi smoke: rank %d/%d FAILED: [%s] %s\n", rank, size,
                 error_kind_name(e.kind()), e.what());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "mpi smoke: rank %d/%d FAILED: %s\n", rank, size, e.what());
  }
  return 1;
}
