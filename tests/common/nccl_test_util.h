// Multi-GPU NCCL test helper (CUDA builds only): one thread per GPU, each with its own rank of one
// NCCL communicator.
#pragma once

#if FP8FLOW_WITH_CUDA
#include <cuda_runtime_api.h>

#include <cstdint>
#include <exception>
#include <functional>
#include <stdexcept>
#include <thread>
#include <vector>

#include "fp8flow/comm.h"

namespace fp8flow::test {

// Runs fn(rank, comm) on n threads, thread r on GPU r with rank r of one NCCL communicator of n
// ranks (timeout_ms: its timeout); returns each rank's exception (nullptr if none). The
// communicators are destroyed on their threads.
inline std::vector<std::exception_ptr> run_on_gpus(
    int n, int64_t timeout_ms, const std::function<void(int, Communicator&)>& fn) {
  const NcclUniqueIdBytes id = nccl_unique_id();
  std::vector<std::exception_ptr> errors(n);
  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r)
    threads.emplace_back([&, r] {
      try {
        if (cudaSetDevice(r) != cudaSuccess) throw std::runtime_error("cudaSetDevice");
        auto comm = make_nccl_communicator(id, r, n, timeout_ms);
        fn(r, *comm);
      } catch (...) {
        errors[r] = std::current_exception();
      }
    });
  for (auto& t : threads) t.join();
  return errors;
}

}  // namespace fp8flow::test
#endif  // FP8FLOW_WITH_CUDA
