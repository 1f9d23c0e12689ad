// fp8flow-bench rank setup (see ranks.h).
#include "ranks.h"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if FP8FLOW_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace fp8flow::bench {
namespace {

#if FP8FLOW_WITH_CUDA
void cuda_ok(cudaError_t e, const char* tool, const char* what) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string(tool) + ": " + what + ": " + cudaGetErrorString(e));
}
#endif

void print_error(const char* tool, int rank, const std::exception_ptr& p) {
  try {
    std::rethrow_exception(p);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: rank %d: %s\n", tool, rank, e.what());
  } catch (...) {
    std::fprintf(stderr, "%s: rank %d: unknown error\n", tool, rank);
  }
}

}  // namespace

bool under_mpirun() {
  return std::getenv("OMPI_COMM_WORLD_SIZE") || std::getenv("PMI_SIZE") || std::getenv("PMIX_RANK");
}

bool mpirun_mode_available(const char* sub, const char* alt_flag, bool gpus) {
  const char* missing = !built_with_mpi() ? "fp8flow was built without MPI (FP8FLOW_WITH_MPI=OFF)"
                        : !built_with_nccl() ? "fp8flow was built without NCCL"
                        : !gpus              ? "no CUDA device found"
                                             : nullptr;
  if (!missing) return true;
  std::fprintf(stderr,
               "fp8flow-bench %s: started under mpirun, but mpirun mode (one rank per GPU) is "
               "unavailable: %s; run `fp8flow-bench %s %s N` without mpirun instead (%s)\n",
               sub, missing, sub, alt_flag,
               gpus ? "one thread per GPU" : "N simulated ranks on the CPU");
  return false;
}

int gpu_count() {
#if FP8FLOW_WITH_CUDA
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
  return n;
#else
  return 0;
#endif
}

namespace {

constexpr int kMaxProgressRanks = 64;
struct Progress {
  std::mutex mu;
  const char* what[kMaxProgressRanks] = {};
  int64_t n[kMaxProgressRanks] = {};
  std::chrono::steady_clock::time_point at[kMaxProgressRanks];
  std::chrono::steady_clock::time_point latest = std::chrono::steady_clock::now();
  bool armed = false;  // a subcommand that reports nothing is never called stalled
};
Progress& progress() {
  static Progress p;
  return p;
}

double stall_limit_s() {
  const char* v = std::getenv("FP8FLOW_BENCH_STALL_S");
  if (!v || !*v) return 300.0;
  char* end = nullptr;
  const double s = std::strtod(v, &end);
  return end != v && s >= 0 ? s : 300.0;
}

// Watches progress() until `done`; on a stall prints every rank's last report and exits (3).
[[maybe_unused]] void monitor(int ranks, const char* tool, const std::atomic<bool>& done) {
  const double limit = stall_limit_s();
  if (limit <= 0) return;
  using clk = std::chrono::steady_clock;
  while (!done.load()) {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    Progress& p = progress();
    std::lock_guard<std::mutex> lk(p.mu);
    const clk::time_point now = clk::now();
    if (!p.armed || std::chrono::duration<double>(now - p.latest).count() < limit) continue;
    std::fprintf(stderr, "%s: no rank made progress for %.0f s (FP8FLOW_BENCH_STALL_S): stalled\n",
                 tool, limit);
    for (int r = 0; r < ranks && r < kMaxProgressRanks; ++r)
      std::fprintf(stderr, "%s: rank %d: last: %s%s%s (%.1f s ago)\n", tool, r,
                   p.what[r] ? p.what[r] : "(nothing reported)", p.n[r] >= 0 ? " " : "",
                   p.n[r] >= 0 ? std::to_string(p.n[r]).c_str() : "",
                   p.what[r] ? std::chrono::duration<double>(now - p.at[r]).count() : -1.0);
    std::fflush(stderr);
    std::_Exit(3);
  }
}

}  // namespace

void rank_progress(int rank, const char* what, int64_t n) {
  if (rank < 0 || rank >= kMaxProgressRanks) return;
  Progress& p = progress();
  std::lock_guard<std::mutex> lk(p.mu);
  p.what[rank] = what;
  p.n[rank] = n;
  p.at[rank] = p.latest = std::chrono::steady_clock::now();
  p.armed = true;
}

int run_ranks_threads(int ranks, const RankFn& fn, const char* tool) {
#if FP8FLOW_WITH_CUDA
  cuda_ok(cudaSetDevice(0), tool, "cudaSetDevice");
  {
    Progress& p = progress();
    std::lock_guard<std::mutex> lk(p.mu);
    p.latest = std::chrono::steady_clock::now();
    p.armed = false;
  }
  std::atomic<bool> done{false};
  std::thread watcher([&] { monitor(ranks, tool, done); });
  const NcclUniqueIdBytes id = nccl_unique_id();
  std::vector<std::exception_ptr> errors(ranks);
  std::vector<std::thread> threads;
  for (int r = 0; r < ranks; ++r)
    threads.emplace_back([&, r] {
      cudaStream_t s = nullptr;
      try {
        cuda_ok(cudaSetDevice(r), tool, "cudaSetDevice");
        cuda_ok(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), tool, "cudaStreamCreate");
        auto comm = make_nccl_communicator(id, r, ranks, kRankTimeoutMs);
        fn(*comm, reinterpret_cast<Stream>(s));
      } catch (...) {
        errors[r] = std::current_exception();
      }
      if (s) cudaStreamDestroy(s);
    });
  for (auto& t : threads) t.join();
  done = true;
  watcher.join();
  int failed = 0;
  for (int r = 0; r < ranks; ++r)
    if (errors[r]) {
      ++failed;
      print_error(tool, r, errors[r]);
    }
  return failed;
#else
  (void)ranks, (void)fn;
  std::fprintf(stderr, "%s: thread-per-GPU ranks need a CUDA build\n", tool);
  return 1;
#endif
}

int run_ranks_mpi(const RankFn& fn, const char* tool, int* rank) {
  if (rank) *rank = -1;
#if FP8FLOW_WITH_CUDA
  auto comm = make_nccl_communicator_mpi(kRankTimeoutMs);
  if (rank) *rank = comm->rank();
  cudaStream_t s = nullptr;
  int failed = 0;
  try {
    cuda_ok(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), tool, "cudaStreamCreate");
    fn(*comm, reinterpret_cast<Stream>(s));
  } catch (...) {
    print_error(tool, comm->rank(), std::current_exception());
    failed = 1;
  }
  if (s) cudaStreamDestroy(s);
  return failed;
#else
  (void)fn;
  std::fprintf(stderr, "%s: mpirun ranks need a CUDA build\n", tool);
  return 1;
#endif
}

int run_ranks_inprocess(int ranks, const RankFn& fn, const char* tool) {
  try {
    run_in_process(ranks, [&](Communicator& comm) { fn(comm, nullptr); });
  } catch (...) {
    print_error(tool, -1, std::current_exception());
    return 1;
  }
  return 0;
}

}  // namespace fp8flow::bench
