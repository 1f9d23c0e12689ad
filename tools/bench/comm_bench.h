// fp8flow-bench comm: the per-rank context every communication case runs in, and the registry
// that makes a case one file. The subcommand (comm.cpp) sets up the ranks - one thread per GPU
// (`--gpus N`), one process per GPU under mpirun, or simulated ranks on the CPU (InProcess) without
// GPUs - and runs every registered case on every rank, in the same order.
//
// A case is `void my_case(CommBench& b)`, registered with
//   FP8FLOW_BENCH_COMM_CASE(name, "one-line summary", my_case);
// in its own tools/bench/comm_*.cpp file (CMake globs tools/bench/*.cpp). It runs on EVERY rank;
// everything collective in it (b.time, b.reference, b.row, b.comm() calls) must be called by
// every rank in the same order with the same arguments - keep the case's control flow independent
// of the rank. Only rank 0's rows are printed. The built-in case `nccl-a2a` (NCCL's own all-to-all
// bandwidth, equal splits) always runs first; `--only TEXT` selects cases whose name contains
// TEXT (nccl-a2a is kept as the reference).
//
// Units: bytes_per_rank is the payload each rank sends in one operation (all destinations,
// itself included), as nccl-tests counts alltoall "size"; algbw = bytes_per_rank / time,
// busbw = algbw * (n - 1) / n. vs_nccl = algbw / algbw of nccl-a2a at the same bytes_per_rank
// (measured in the same run on demand).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "cli.h"
#include "fp8flow/comm.h"
#include "harness.h"

namespace fp8flow::bench {

// An owned buffer on this rank's device (Cuda: cudaMalloc on the current device, which the
// subcommand set to the rank's GPU; Cpu: host memory), filled with `fill`. Move-only.
class CommBuffer {
 public:
  CommBuffer() = default;
  CommBuffer(Device device, size_t bytes, uint8_t fill = 0);
  CommBuffer(CommBuffer&& o) noexcept;
  CommBuffer& operator=(CommBuffer&& o) noexcept;
  CommBuffer(const CommBuffer&) = delete;
  CommBuffer& operator=(const CommBuffer&) = delete;
  ~CommBuffer();
  void* data() const { return data_; }
  uint8_t* bytes() const { return static_cast<uint8_t*>(data_); }
  size_t size() const { return size_; }
  Device device() const { return device_; }

 private:
  void* data_ = nullptr;
  size_t size_ = 0;
  Device device_ = Device::Cpu;
};

// One timed operation, aggregated over ranks: per repetition the slowest rank's time, then the
// median and minimum over repetitions (identical on every rank).
struct CommTiming {
  double median_ms = 0;
  double min_ms = 0;
  int reps = 0;
  int inner = 1;  // back-to-back operations per timed batch (time is per operation)
};

struct CommRow {
  std::string kase;            // "nccl-a2a", "dispatch", "combine", ...
  std::string payload;         // "bytes", "bf16", "fp8", "mxfp4", ...
  std::string shape;           // free text, e.g. "4096x7168 top-8"
  int64_t bytes_per_rank = 0;  // bytes each rank sends per operation (GB/s counts these)
  CommTiming timing;
  bool verified = false;  // the case checked the received data
  std::string note;
  std::string error;  // non-empty: the row failed (printed instead of numbers)
};

class CommBench {
 public:
  CommBench(Communicator& comm, Stream stream, const Options& opt, int warmup, int reps,
            Report* report);

  Communicator& comm() { return comm_; }
  Stream stream() const { return stream_; }         // this rank's stream (nullptr: InProcess)
  Device device() const { return comm_.device(); }  // where the case's buffers must live
  bool gpu() const { return comm_.device() == Device::Cuda; }
  int rank() const { return comm_.rank(); }
  int size() const { return comm_.size(); }
  bool root() const { return comm_.rank() == 0; }
  const Options& options() const { return opt_; }
  bool quick() const { return opt_.quick; }
  int warmup() const { return warmup_; }
  int reps() const { return reps_; }

  CommBuffer alloc(size_t bytes, uint8_t fill = 0) const {
    return CommBuffer(device(), bytes, fill);
  }
  // Waits for this rank's stream (no-op on the CPU).
  void sync() const;

  // Collective. Times `op` (which enqueues one operation on stream(), or runs it on the CPU):
  // `warmup` untimed calls, then `reps` batches, each after a barrier, of `inner` back-to-back
  // calls between two CUDA events (host clock on the CPU). inner <= 0 picks it from
  // bytes_per_rank so that a batch moves about 1 GiB (4..50 operations).
  CommTiming time(const std::function<void()>& op, int64_t bytes_per_rank, int inner = 0);

  // Collective. NCCL's own all-to-all (equal splits, grouped send/recv through comm()) of
  // bytes_per_rank per rank (a multiple of size(), else rounded down): timed once per size and
  // cached; `verified` says whether the
  // received bytes were right on every rank.
  CommTiming reference(int64_t bytes_per_rank, bool* verified = nullptr);

  // Collective (it may measure the reference). Adds the row to rank 0's table with GB/s and
  // vs_nccl filled in.
  void row(const CommRow& r);

  // Collective: true on every rank iff `ok` is true on every rank.
  bool all_ok(bool ok);

 private:
  CommTiming measure_a2a(int64_t bytes_per_rank, bool& verified);

  Communicator& comm_;
  Stream stream_;
  const Options& opt_;
  int warmup_, reps_;
  Report* report_;  // rank 0 only
  std::map<int64_t, std::pair<CommTiming, bool>> reference_;
};

using CommCaseFn = void (*)(CommBench&);
struct CommCase {
  const char* name;
  const char* summary;
  CommCaseFn run;
};
std::vector<CommCase>& comm_cases();

struct CommCaseRegistrar {
  CommCaseRegistrar(const char* name, const char* summary, CommCaseFn fn) {
    comm_cases().push_back({name, summary, fn});
  }
};

#define FP8FLOW_BENCH_COMM_CASE(name, summary, fn)                                                \
  static const ::fp8flow::bench::CommCaseRegistrar fp8flow_bench_comm_case_##name(#name, summary, \
                                                                                  fn)

}  // namespace fp8flow::bench
