// The one place that chooses how GPU ranks are launched and which transport joins them:
//   mpirun        one process per GPU (this process is one rank), NCCL;
//   nccl          one thread per GPU in this process, NCCL;
//   loopback      R virtual ranks on GPU 0, a thread each, plain device pointers.
// "auto": mpirun when launched by an MPI launcher, nccl when there is a GPU per rank and NCCL is
// built in, loopback otherwise. Also applies the process settings the GPU transports depend on.
#pragma once

#include <functional>
#include <string>

#include "epmoe/comm/gpu_transport.h"

namespace epmoe::cuda {

// Settings the engine needs before CUDA starts: eager module loading (a lazily loaded kernel can
// wait for the device while a peer's kernel spins), a hardware queue per stream
// (CUDA_DEVICE_MAX_CONNECTIONS=32) and NVLink multicast off. Leaves variables the user set.
// Called by launch_ranks and by the CLI's main() before anything touches CUDA; a program that
// created a CUDA context earlier should set them itself.
void apply_process_settings();

struct LaunchInfo {
  std::string transport;  // "nccl (mpirun, one process per GPU)", "loopback (4 virtual ...)"
  bool mpi = false;       // this process is one rank of an mpirun job
  int local_rank = -1;    // mpirun: the rank this process runs; -1 otherwise (all ranks here)
};

// Runs fn(transport) for every rank this process hosts and joins; the first failure is rethrown
// (the other ranks' bounded waits end early). Throws Error(kInvalidArgument) for an unknown
// transport, Error(kUnsupported) when the machine cannot host it.
LaunchInfo launch_ranks(const std::string& transport, int num_ranks,
                        const std::function<void(GpuTransport&)>& fn);

}  // namespace epmoe::cuda
