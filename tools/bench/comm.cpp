// fp8flow-bench comm: expert-parallel communication on N ranks. First NCCL's own all-to-all
// bandwidth (equal splits, grouped ncclSend/ncclRecv as nccl-tests' alltoall does it, 1 MiB ..
// 1 GiB sent per rank), then every registered communication case (comm_bench.h; dispatch and
// combine per payload), each compared with that all-to-all at the same bytes.
//
//   fp8flow-bench comm [--gpus N]                    one process, one thread per GPU (N GPUs)
//   mpirun -np N fp8flow-bench comm                  one process per GPU (device = local rank)
//   fp8flow-bench comm  (no GPU / CPU-only build)    InProcess simulated ranks on the CPU
//   common: [--quick] [--reps N] [--warmup N] [--only TEXT] [--json FILE]
//
// Timing: per repetition, a barrier, then `inner` back-to-back operations between two CUDA events
// (inner chosen so that a batch moves ~1 GiB, at least 4 operations: it amortizes the ranks' start
// skew and the host's enqueue of the first operation after the barrier, which at inner = 1 were
// +-5% run to run on a 0.6 ms dispatch; nccl-tests likewise times back-to-back iterations);
// time per operation = batch / inner; per repetition the slowest rank counts; median (and min)
// over repetitions. algbw = bytes sent per rank / time, busbw = algbw (n-1)/n (nccl-tests'
// alltoall definitions). Each all-to-all size is verified once (every segment's first, middle and
// last byte on every rank) before it is timed.
//
// NOTES: the all-to-all goes through fp8flow::Communicator::all_to_all_v (the NCCL communicator:
// one ncclSend + ncclRecv per peer in a group), the same path dispatch/combine use, so the
// reference is exactly "what NCCL's transport reaches" for this communicator.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "cli.h"
#include "comm_bench.h"
#include "fp8flow/comm.h"
#include "fp8flow/version.h"
#include "harness.h"
#include "ranks.h"

#if FP8FLOW_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace fp8flow::bench {

std::vector<CommCase>& comm_cases() {
  static std::vector<CommCase> list;
  return list;
}

namespace {

constexpr int64_t kMiB = int64_t{1} << 20;

#if FP8FLOW_WITH_CUDA
void cuda_ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("fp8flow-bench comm: ") + what + ": " +
                             cudaGetErrorString(e));
}
#endif

// The byte rank `src` sends to rank `dst` in the verified all-to-all.
uint8_t fill_byte(int src, int dst) {
  return static_cast<uint8_t>((src * 31 + dst * 7 + 1) & 0xFF);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// CommBuffer

CommBuffer::CommBuffer(Device device, size_t bytes, uint8_t fill) : size_(bytes), device_(device) {
  const size_t n = bytes ? bytes : 1;
  if (device == Device::Cuda) {
#if FP8FLOW_WITH_CUDA
    cuda_ok(cudaMalloc(&data_, n), "cudaMalloc");
    cuda_ok(cudaMemset(data_, fill, n), "cudaMemset");
#else
    throw std::runtime_error("fp8flow-bench comm: device buffer in a CPU-only build");
#endif
  } else {
    data_ = std::malloc(n);
    if (!data_) throw std::bad_alloc();
    std::memset(data_, fill, n);
  }
}

CommBuffer::CommBuffer(CommBuffer&& o) noexcept
    : data_(o.data_), size_(o.size_), device_(o.device_) {
  o.data_ = nullptr;
  o.size_ = 0;
}

CommBuffer& CommBuffer::operator=(CommBuffer&& o) noexcept {
  std::swap(data_, o.data_);
  std::swap(size_, o.size_);
  std::swap(device_, o.device_);
  return *this;
}

CommBuffer::~CommBuffer() {
  if (!data_) return;
  if (device_ == Device::Cuda) {
#if FP8FLOW_WITH_CUDA
    cudaFree(data_);
#endif
  } else {
    std::free(data_);
  }
}

// ---------------------------------------------------------------------------------------------
// CommBench

CommBench::CommBench(Communicator& comm, Stream stream, const Options& opt, int warmup, int reps,
                     Report* report)
    : comm_(comm), stream_(stream), opt_(opt), warmup_(warmup), reps_(reps), report_(report) {}

void CommBench::sync() const {
#if FP8FLOW_WITH_CUDA
  if (gpu()) cuda_ok(cudaStreamSynchronize(reinterpret_cast<cudaStream_t>(stream_)), "sync");
#endif
}

bool CommBench::all_ok(bool ok) {
  const int64_t mine = ok ? 1 : 0;
  const auto all = comm_.all_gather(std::span<const int64_t>(&mine, 1), stream_);
  return std::all_of(all.begin(), all.end(), [](int64_t v) { return v == 1; });
}

CommTiming CommBench::time(const std::function<void()>& op, int64_t bytes_per_rank, int inner) {
  if (inner <= 0) {
    const int64_t target = 1024 * kMiB;
    inner = static_cast<int>(
        std::clamp<int64_t>(bytes_per_rank > 0 ? target / bytes_per_rank : 50, 4, 50));
  }
  for (int i = 0; i < warmup_; ++i) op();
  sync();
  std::vector<int64_t> ns(reps_);
#if FP8FLOW_WITH_CUDA
  cudaEvent_t ev[2] = {nullptr, nullptr};
  if (gpu()) {
    cuda_ok(cudaEventCreate(&ev[0]), "cudaEventCreate");
    cuda_ok(cudaEventCreate(&ev[1]), "cudaEventCreate");
  }
#endif
  try {
    for (int r = 0; r < reps_; ++r) {
      comm_.barrier(stream_);
      if (gpu()) {
#if FP8FLOW_WITH_CUDA
        auto s = reinterpret_cast<cudaStream_t>(stream_);
        cuda_ok(cudaEventRecord(ev[0], s), "cudaEventRecord");
        for (int i = 0; i < inner; ++i) op();
        cuda_ok(cudaEventRecord(ev[1], s), "cudaEventRecord");
        cuda_ok(cudaEventSynchronize(ev[1]), "cudaEventSynchronize");
        float ms = 0;
        cuda_ok(cudaEventElapsedTime(&ms, ev[0], ev[1]), "cudaEventElapsedTime");
        ns[r] = static_cast<int64_t>(static_cast<double>(ms) * 1e6);
#endif
      } else {
        const auto t0 = std::chrono::steady_clock::now();
        for (int i = 0; i < inner; ++i) op();
        const auto t1 = std::chrono::steady_clock::now();
        ns[r] = std::chrono::duration_cast<std::chrono::nanoseconds>(t1 - t0).count();
      }
    }
  } catch (...) {
#if FP8FLOW_WITH_CUDA
    for (auto e : ev)
      if (e) cudaEventDestroy(e);
#endif
    throw;
  }
#if FP8FLOW_WITH_CUDA
  for (auto e : ev)
    if (e) cudaEventDestroy(e);
#endif
  // Per repetition the slowest rank; median and min over repetitions.
  const auto all = comm_.all_gather(ns, stream_);
  std::vector<double> per_rep(reps_, 0.0);
  for (int q = 0; q < size(); ++q)
    for (int r = 0; r < reps_; ++r)
      per_rep[r] = std::max(per_rep[r], static_cast<double>(all[q * reps_ + r]) / 1e6 / inner);
  CommTiming t;
  t.reps = reps_;
  t.inner = inner;
  t.min_ms = *std::min_element(per_rep.begin(), per_rep.end());
  t.median_ms = median_of(per_rep);
  return t;
}

CommTiming CommBench::measure_a2a(int64_t bytes_per_rank, bool& verified) {
  const int n = size(), me = rank();
  const int64_t seg = bytes_per_rank / n;
  const int64_t total = seg * n;
  // Allocation is agreed on collectively, so a rank that runs out of memory does not leave the
  // others waiting in the exchange: every rank throws the same way.
  CommBuffer send, recv;
  std::string alloc_error;
  try {
    send = alloc(static_cast<size_t>(total), 0);
    recv = alloc(static_cast<size_t>(total), 0);
  } catch (const std::exception& e) {
    alloc_error = e.what();
  }
  if (!all_ok(alloc_error.empty()))
    throw std::runtime_error(alloc_error.empty() ? "allocation failed on another rank"
                                                 : alloc_error);
  std::vector<int64_t> bytes(n, seg), offsets(n);
  for (int j = 0; j < n; ++j) offsets[j] = j * seg;
  // Segment j of `send` holds fill_byte(me, j); after the exchange segment j of `recv` must hold
  // fill_byte(j, me) (spot-checked: first, middle, last byte of each segment).
  for (int j = 0; j < n; ++j) {
    if (gpu()) {
#if FP8FLOW_WITH_CUDA
      cuda_ok(cudaMemset(send.bytes() + offsets[j], fill_byte(me, j), seg), "cudaMemset");
#endif
    } else {
      std::memset(send.bytes() + offsets[j], fill_byte(me, j), seg);
    }
  }
  auto op = [&] {
    comm_.all_to_all_v(send.data(), bytes, offsets, recv.data(), bytes, offsets, stream_);
  };
  op();
  sync();
  bool ok = true;
  for (int j = 0; j < n && seg > 0; ++j) {
    for (int64_t k : {int64_t{0}, seg / 2, seg - 1}) {
      uint8_t v = 0;
      if (gpu()) {
#if FP8FLOW_WITH_CUDA
        cuda_ok(cudaMemcpy(&v, recv.bytes() + offsets[j] + k, 1, cudaMemcpyDeviceToHost),
                "cudaMemcpy");
#endif
      } else {
        v = recv.bytes()[offsets[j] + k];
      }
      ok = ok && v == fill_byte(j, me);
    }
  }
  verified = all_ok(ok);
  return time(op, total);
}

CommTiming CommBench::reference(int64_t bytes_per_rank, bool* verified) {
  const int64_t total = bytes_per_rank / size() * size();
  auto it = reference_.find(total);
  if (it == reference_.end()) {
    bool ok = false;
    const CommTiming t = measure_a2a(total, ok);
    it = reference_.emplace(total, std::make_pair(t, ok)).first;
  }
  if (verified) *verified = it->second.second;
  return it->second.first;
}

void CommBench::row(const CommRow& r) {
  double ref_algbw = 0;
  if (r.error.empty() && r.kase != "nccl-a2a" && r.bytes_per_rank >= size()) {
    const CommTiming ref = reference(r.bytes_per_rank);
    const int64_t ref_bytes = r.bytes_per_rank / size() * size();
    if (ref.median_ms > 0) ref_algbw = static_cast<double>(ref_bytes) / (ref.median_ms * 1e6);
  }
  if (!report_) return;
  Report& rep = *report_;
  const size_t i = rep.add_row();
  rep.set(i, "case", r.kase);
  rep.set(i, "payload", r.payload);
  rep.set(i, "shape", r.shape);
  rep.set(i, "ranks", static_cast<int64_t>(size()));
  rep.set(i, "bytes_per_rank", r.bytes_per_rank);
  rep.set(i, "mib_per_rank", static_cast<double>(r.bytes_per_rank) / static_cast<double>(kMiB));
  if (!r.note.empty()) rep.set(i, "note", r.note);
  if (!r.error.empty()) {
    rep.set(i, "error", r.error);
    return;
  }
  const double ms = r.timing.median_ms;
  rep.set(i, "ms", ms);
  rep.set(i, "min_ms", r.timing.min_ms);
  rep.set(i, "inner", static_cast<int64_t>(r.timing.inner));
  rep.set(i, "reps", static_cast<int64_t>(r.timing.reps));
  rep.set(i, "verified", r.verified);
  if (ms > 0) {
    const double algbw = static_cast<double>(r.bytes_per_rank) / (ms * 1e6);  // GB/s
    rep.set(i, "algbw_gbps", algbw);
    rep.set(i, "busbw_gbps", algbw * (size() - 1) / size());
    if (ref_algbw > 0) rep.set(i, "vs_nccl_pct", 100.0 * algbw / ref_algbw);
  }
}

// ---------------------------------------------------------------------------------------------
// The subcommand.

namespace {

// NCCL's own all-to-all, equal splits: the reference sweep (always first).
void reference_sweep(CommBench& b) {
  std::vector<int64_t> sizes;
  if (!b.gpu())
    sizes = {64 << 10, kMiB, 4 * kMiB};
  else if (b.quick())
    sizes = {kMiB, 16 * kMiB, 256 * kMiB};
  else
    sizes = {kMiB, 4 * kMiB, 16 * kMiB, 64 * kMiB, 256 * kMiB, 1024 * kMiB};
  for (int64_t bytes : sizes) {
    CommRow r;
    r.kase = "nccl-a2a";
    r.payload = "bytes";
    r.shape = "equal splits";
    r.bytes_per_rank = bytes / b.size() * b.size();
    try {
      r.timing = b.reference(bytes, &r.verified);
    } catch (const Error& e) {
      if (e.kind() == ErrorKind::Comm) throw;  // the communicator is gone: stop the run
      r.error = e.what();
    } catch (const std::runtime_error& e) {  // e.g. out of memory, on every rank alike
      r.error = e.what();
    }
    b.row(r);
  }
}

bool selected(const Options& opt, const std::string& name) {
  return opt.only.empty() || name.find(opt.only) != std::string::npos;
}

// Runs the reference and every selected case on one rank.
void run_rank(Communicator& comm, Stream stream, const Options& opt, int warmup, int reps,
              Report* report) {
  // Mismatched command lines across processes (mpirun) are caught here.
  std::vector<int64_t> cfg{warmup, reps, opt.quick ? 1 : 0,
                           static_cast<int64_t>(comm_cases().size())};
  for (char c : opt.only) cfg.push_back(c);
  check_same_on_all_ranks(comm, cfg, "fp8flow-bench comm options", stream);
  CommBench b(comm, stream, opt, warmup, reps, report);
  reference_sweep(b);
  for (const auto& c : comm_cases()) {
    if (!selected(opt, c.name)) continue;
    c.run(b);
  }
}

void fill_meta(Report& rep, const std::string& mode, int ranks, int warmup, int reps) {
  rep.meta("tool", std::string("fp8flow-bench comm"));
  rep.meta("fp8flow", std::string(version_string()));
  rep.meta("git", git_rev());
  rep.meta("date", utc_now());
  rep.meta("mode", mode);
  rep.meta("ranks", static_cast<int64_t>(ranks));
  const DeviceInfo dev = query_device();
  if (dev.gpu) {
    rep.meta("device", dev.name);
    rep.meta("visible_gpus", static_cast<int64_t>(gpu_count()));
    rep.meta("cuda_runtime", dev.runtime);
    rep.meta("cuda_driver", dev.driver);
  }
  rep.meta("reps", static_cast<int64_t>(reps));
  rep.meta("warmup", static_cast<int64_t>(warmup));
  std::string cases = "nccl-a2a";
  for (const auto& c : comm_cases()) cases += std::string(", ") + c.name;
  rep.meta("cases", cases);
}

void set_columns(Report& rep) {
  rep.columns({
      {"case", "case", 10, true, 0, true},
      {"payload", "payload", 7, true, 0, true},
      {"shape", "shape", 22, true, 0, true},
      {"mib_per_rank", "MiB/rank", 9, false, 2, true},
      {"inner", "inner", 5, false, 0},
      {"ms", "ms", 9, false, 4},
      {"min_ms", "min ms", 9, false, 4},
      {"algbw_gbps", "algbw GB/s", 10, false, 1},
      {"busbw_gbps", "busbw GB/s", 10, false, 1},
      {"vs_nccl_pct", "vs nccl %", 9, false, 1},
      {"verified", "ok", 3, false, 0},
  });
}

void print_report(const Report& rep, const Options& opt, const std::string& mode, int ranks) {
  std::printf("%s", rep.table().c_str());
  std::printf(
      "# %s, %d ranks. ms: median per operation (per repetition the slowest rank; a batch of\n"
      "# `inner` back-to-back operations after a barrier, CUDA events; host clock on the CPU).\n"
      "# MiB/rank = bytes each rank sends per operation (itself included); algbw = that / ms;\n"
      "# busbw = algbw (n-1)/n (nccl-tests alltoall). vs nccl %% = algbw / nccl-a2a algbw at the\n"
      "# same bytes, measured in this run. ok = received bytes verified on every rank.\n",
      mode.c_str(), ranks);
  if (!opt.json_path.empty()) {
    rep.write_json(opt.json_path);
    std::printf("wrote %s\n", opt.json_path.c_str());
  }
}

int run_inprocess(const Options& opt, int ranks, const std::string& why) {
  const int reps = opt.reps_given ? opt.reps : 5;
  const int warmup = opt.warmup_given ? opt.warmup : 1;
  std::printf(
      "fp8flow-bench comm: %s: running %d simulated ranks (InProcess communicator, host memory)\n"
      "on small sizes; times are host memcpy between threads, not a GPU interconnect.\n",
      why.c_str(), ranks);
  Report rep;
  const std::string mode = "inprocess (CPU, simulated ranks)";
  fill_meta(rep, mode, ranks, warmup, reps);
  set_columns(rep);
  const int failed = run_ranks_inprocess(
      ranks,
      [&](Communicator& comm, Stream) {
        run_rank(comm, nullptr, opt, warmup, reps, comm.rank() == 0 ? &rep : nullptr);
      },
      "fp8flow-bench comm");
  print_report(rep, opt, mode, ranks);
  return failed ? 1 : 0;
}

#if FP8FLOW_WITH_CUDA
// One process, one thread per GPU.
int run_threads(const Options& opt, int ranks, int warmup, int reps) {
  Report rep;
  const std::string mode = "nccl, one process, one thread per GPU";
  fill_meta(rep, mode, ranks, warmup, reps);
  rep.meta("timeout_ms", kRankTimeoutMs);
  set_columns(rep);
  const int failed = run_ranks_threads(
      ranks,
      [&](Communicator& comm, Stream s) {
        run_rank(comm, s, opt, warmup, reps, comm.rank() == 0 ? &rep : nullptr);
      },
      "fp8flow-bench comm");
  print_report(rep, opt, mode, ranks);
  return failed ? 1 : 0;
}

// One process per GPU under mpirun.
int run_mpi(const Options& opt, int warmup, int reps) {
  Report rep;
  const std::string mode = "nccl, mpirun, one process per GPU";
  int rank = -1, ranks = 0;
  const int failed = run_ranks_mpi(
      [&](Communicator& comm, Stream s) {
        ranks = comm.size();
        if (comm.rank() == 0) {
          fill_meta(rep, mode, ranks, warmup, reps);
          rep.meta("timeout_ms", kRankTimeoutMs);
          set_columns(rep);
        }
        run_rank(comm, s, opt, warmup, reps, comm.rank() == 0 ? &rep : nullptr);
      },
      "fp8flow-bench comm", &rank);
  if (failed) return 1;
  if (rank == 0) print_report(rep, opt, mode, ranks);
  return 0;
}
#endif

int run_comm(const Options& opt) {
  if (opt.list) {
    std::printf("nccl-a2a\n");
    for (const auto& c : comm_cases()) std::printf("%s\n", c.name);
    return 0;
  }
  [[maybe_unused]] const int reps = std::min(opt.reps_given ? opt.reps : 20, 500);
  [[maybe_unused]] const int warmup = opt.warmup_given ? opt.warmup : 5;
  const int gpus = gpu_count();
  const bool nccl = built_with_nccl() && cuda_available();
  if (under_mpirun()) {
    if (!mpirun_mode_available("comm", "--gpus", nccl)) return 2;
#if FP8FLOW_WITH_CUDA
    return run_mpi(opt, warmup, reps);
#endif
  }
  if (!nccl || gpus < 2) {
    std::string why = !built_with_nccl() ? "fp8flow built without NCCL"
                      : gpus == 0        ? "no CUDA device found"
                                         : "only 1 CUDA device (an all-to-all needs >= 2)";
    return run_inprocess(opt, opt.gpus > 0 ? std::min(opt.gpus, 16) : 4, why);
  }
#if FP8FLOW_WITH_CUDA
  const int ranks = opt.gpus > 0 ? opt.gpus : gpus;
  if (ranks < 2 || ranks > gpus) {
    std::fprintf(stderr, "fp8flow-bench comm: --gpus: expected 2..%d (visible GPUs), got %d\n",
                 gpus, ranks);
    return 2;
  }
  return run_threads(opt, ranks, warmup, reps);
#else
  return 0;
#endif
}

}  // namespace

FP8FLOW_BENCH_SUBCOMMAND(
    comm, "EP communication: NCCL all-to-all GB/s, then dispatch/combine per payload", run_comm);

}  // namespace fp8flow::bench
