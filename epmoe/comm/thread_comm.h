// R ranks as threads of one process over host memory: the CPU backend's transport, and the way
// tests run the whole expert-parallel protocol on one machine.
#pragma once

#include <functional>
#include <memory>

#include "epmoe/comm/communicator.h"

namespace epmoe {

class ThreadGroup {
 public:
  explicit ThreadGroup(int num_ranks);
  ~ThreadGroup();
  int size() const;
  // Runs fn(comm) on one thread per rank and joins them. If a rank throws, the others' waits fail
  // fast ("peer rank r failed") instead of timing out, and the first error is rethrown here.
  void run(const std::function<void(Communicator&)>& fn);

  struct State;

 private:
  std::shared_ptr<State> state_;
};

}  // namespace epmoe
