// NCCL communicator: expert-parallel all-to-all over NCCL's own transport (grouped ncclSend /
// ncclRecv), small host all_gather and barrier, with timeouts that never let a dead or absent peer
// hang the caller.
//
// Non-blocking NCCL (config.blocking = 0): every NCCL call returns at once; ncclInProgress is
// polled through ncclCommGetAsyncError with a growing sleep (yield, then 10 us .. 1 ms) until the
// timeout. That covers the host side (init, connection setup inside ncclGroupEnd). The device side
// - a kernel waiting forever for a peer that never posts its half - is covered by a watchdog thread
// per communicator: each collective is bracketed by two CUDA events on its stream; the clock of a
// collective starts when its start event completes (work queued before it does not count), and
// when it has run longer than the timeout, or NCCL reports an asynchronous error, the watchdog
// aborts the communicator (ncclCommAbort makes the stuck kernels exit, so even a caller blocked in
// cudaStreamSynchronize returns) and the next call throws ErrorKind::Comm with the reason.
// all_gather and barrier wait on the host themselves (polling, same timeout).
//
// A wrapped communicator (wrap_nccl_communicator, e.g. PyTorch's) is not ours to free: on a
// timeout it is marked failed and calls throw, but it is not aborted (the owner must abort it;
// ncclCommAbort frees the handle the owner still holds).
//
// NOTES: only NCCL API present since 2.19 is used (the GPU machine runs 2.28.3, this machine
// builds against 2.28.9). The NCCL mutex is never held while sleeping, and the watchdog never
// holds its queue lock while taking the NCCL mutex.
#include <memory>

#include "comm/comm_check.h"
#include "common/check.h"
#include "fp8flow/comm.h"

#if FP8FLOW_WITH_NCCL
#include <cuda_runtime_api.h>
#include <nccl.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <vector>
#endif

namespace fp8flow {

#if FP8FLOW_WITH_NCCL

namespace {

using Clock = std::chrono::steady_clock;
using detail::cat;

static_assert(sizeof(ncclUniqueId) == sizeof(NcclUniqueIdBytes), "NCCL unique id size changed");

// Poll pacing: the first 100 us only yield (an all_gather of counts or an InProgress state
// usually clears within tens of microseconds, and a sleep would overshoot it), then sleeps that
// grow from 20 us to 1 ms, so a long wait does not burn a core.
class Backoff {
 public:
  void pause() {
    const auto spent = Clock::now() - start_;
    if (spent < std::chrono::microseconds(100)) {
      std::this_thread::yield();
      return;
    }
    sleep_us_ = std::min(1000, sleep_us_ + 20);
    std::this_thread::sleep_for(std::chrono::microseconds(sleep_us_));
  }

 private:
  Clock::time_point start_ = Clock::now();
  int sleep_us_ = 0;
};

std::string nccl_text(ncclResult_t r, ncclComm_t comm) {
  std::string s = cat(ncclGetErrorString(r), " (ncclResult_t ", static_cast<int>(r), ")");
  const char* last = ncclGetLastError(comm);
  if (last && *last) s += cat(": ", last);
  return s;
}

std::string cuda_text(cudaError_t e) {
  return cat(cudaGetErrorName(e), ": ", cudaGetErrorString(e));
}

// Makes `device` current for the scope (restores the previous one).
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    if (cudaGetDevice(&prev_) == cudaSuccess && prev_ != device) {
      cudaSetDevice(device);
    } else {
      prev_ = -1;
    }
  }
  ~DeviceScope() {
    if (prev_ >= 0) cudaSetDevice(prev_);
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int prev_ = -1;
};

// Polls ncclCommGetAsyncError until the communicator leaves ncclInProgress or `deadline` passes.
// Returns the final state (ncclInProgress on timeout).
ncclResult_t poll_ready(ncclComm_t comm, Clock::time_point deadline) {
  Backoff backoff;
  for (;;) {
    ncclResult_t state = ncclSuccess;
    const ncclResult_t r = ncclCommGetAsyncError(comm, &state);
    if (r != ncclSuccess) return r;
    if (state != ncclInProgress) return state;
    if (Clock::now() >= deadline) return ncclInProgress;
    backoff.pause();
  }
}

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(ncclComm_t comm, bool owned, int64_t timeout_ms)
      : comm_(comm), owned_(owned), timeout_(timeout_ms) {
    ncclResult_t r = ncclCommCount(comm_, &size_);
    if (r == ncclSuccess) r = ncclCommUserRank(comm_, &rank_);
    if (r == ncclSuccess) r = ncclCommCuDevice(comm_, &device_);
    if (r != ncclSuccess) {
      if (owned_) ncclCommAbort(comm_);
      throw Error(ErrorKind::Comm, cat("fp8flow::wrap_nccl_communicator: querying the NCCL "
                                       "communicator failed: ",
                                       nccl_text(r, comm_)));
    }
    DeviceScope dev(device_);
    cudaError_t e = cudaMalloc(&dev_buf_, staging_bytes_);
    if (e == cudaSuccess) e = cudaMallocHost(&host_buf_, staging_bytes_);
    if (e != cudaSuccess) {
      release_buffers();
      if (owned_) ncclCommAbort(comm_);
      throw Error(ErrorKind::Cuda,
                  cat("fp8flow::make_nccl_communicator: staging buffers: ", cuda_text(e)));
    }
    watchdog_ = std::thread([this] { watchdog_loop(); });
  }

  ~NcclCommunicator() override {
    {
      std::lock_guard lock(wmu_);
      stop_ = true;
    }
    wcv_.notify_all();
    if (watchdog_.joinable()) watchdog_.join();
    DeviceScope dev(device_);
    {
      std::lock_guard lock(mu_);
      if (comm_ && owned_) {
        if (error_.empty()) {
          // Flush outstanding work, bounded by the timeout; abort if a peer never finishes.
          ncclResult_t r = ncclCommFinalize(comm_);
          if (r == ncclSuccess || r == ncclInProgress)
            r = poll_ready(comm_, Clock::now() + timeout_);
          if (r == ncclSuccess)
            ncclCommDestroy(comm_);
          else
            ncclCommAbort(comm_);
        } else {
          ncclCommAbort(comm_);
        }
      }
      comm_ = nullptr;
    }
    for (auto& p : pending_) {
      cudaEventDestroy(p.start);
      cudaEventDestroy(p.end);
    }
    for (cudaEvent_t ev : free_events_) cudaEventDestroy(ev);
    release_buffers();
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  Device device() const override { return Device::Cuda; }
  const char* backend() const override { return "nccl"; }

  void all_to_all_v(const void* send, std::span<const int64_t> send_bytes,
                    std::span<const int64_t> send_offsets, void* recv,
                    std::span<const int64_t> recv_bytes, std::span<const int64_t> recv_offsets,
                    Stream stream) override {
    validate_a2a(send, send_bytes, send_offsets, recv, recv_bytes, recv_offsets);
    grouped_send_recv("all_to_all_v", stream, [&](auto&& keep) {
      for (int j = 0; j < size_; ++j) {
        if (send_bytes[j] > 0)
          keep(ncclSend(static_cast<const uint8_t*>(send) + send_offsets[j],
                        static_cast<size_t>(send_bytes[j]), ncclUint8, j, comm_,
                        stream_of(stream)));
        if (recv_bytes[j] > 0)
          keep(ncclRecv(static_cast<uint8_t*>(recv) + recv_offsets[j],
                        static_cast<size_t>(recv_bytes[j]), ncclUint8, j, comm_,
                        stream_of(stream)));
      }
    });
  }

  void all_to_all_segments(std::span<const CommSegment> sends, std::span<const CommSegment> recvs,
                           Stream stream) override {
    detail::validate_segments(size_, sends, recvs);
    // NCCL matches the sends / receives of one peer pair in the order they are posted.
    grouped_send_recv("all_to_all_segments", stream, [&](auto&& keep) {
      for (const CommSegment& g : sends)
        if (g.bytes > 0)
          keep(ncclSend(g.data, static_cast<size_t>(g.bytes), ncclUint8, g.peer, comm_,
                        stream_of(stream)));
      for (const CommSegment& g : recvs)
        if (g.bytes > 0)
          keep(ncclRecv(g.data, static_cast<size_t>(g.bytes), ncclUint8, g.peer, comm_,
                        stream_of(stream)));
    });
  }

  std::vector<int64_t> all_gather(std::span<const int64_t> mine, Stream stream) override {
    return gather(mine, stream, "all_gather");
  }

  void barrier(Stream stream) override { gather({}, stream, "barrier"); }

 private:
  struct Pending {
    cudaEvent_t start = nullptr, end = nullptr;
    const char* call = "";
    int64_t seq = 0;
    bool running = false;
    Clock::time_point started;
  };

  static cudaStream_t stream_of(Stream stream) { return reinterpret_cast<cudaStream_t>(stream); }

  // One NCCL group of point-to-point calls on `stream`: post(keep) posts them, passing each
  // ncclResult_t to keep. Inside the group an error is remembered and the group closed before
  // failing (aborting a communicator with ops still queued in an open group would leave them
  // dangling); the watchdog tracks the group like any collective.
  template <class Post>
  void grouped_send_recv(const char* call, Stream stream, Post&& post) {
    DeviceScope dev(device_);
    cudaStream_t s = stream_of(stream);
    {
      std::unique_lock lock(mu_);
      throw_if_failed(lock, call);
    }
    cudaEvent_t ev = track_begin(call, s);
    try {
      std::unique_lock lock(mu_);
      throw_if_failed(lock, call);
      nccl(lock, call, ncclGroupStart());
      ncclResult_t first = ncclSuccess;
      post([&](ncclResult_t r) {
        if (r != ncclSuccess && r != ncclInProgress && first == ncclSuccess) first = r;
      });
      const ncclResult_t end = ncclGroupEnd();
      if (first != ncclSuccess)
        fail_and_throw(lock, call, cat("NCCL error: ", nccl_text(first, comm_)));
      nccl(lock, call, end);
    } catch (...) {
      give_back(ev);
      throw;
    }
    track_end(ev, s);
  }

  void release_buffers() {
    if (dev_buf_) cudaFree(dev_buf_);
    if (host_buf_) cudaFreeHost(host_buf_);
    dev_buf_ = nullptr;
    host_buf_ = nullptr;
  }

  void validate_a2a(const void* send, std::span<const int64_t> send_bytes,
                    std::span<const int64_t> send_offsets, void* recv,
                    std::span<const int64_t> recv_bytes,
                    std::span<const int64_t> recv_offsets) const {
    detail::check_all_to_all_v_args(size_, send, send_bytes, send_offsets, recv, recv_bytes,
                                    recv_offsets);
  }

  std::string where() const {
    return cat("rank ", rank_, " of ", size_, " (device ", device_, ")");
  }

  // Under mu_: throws if the communicator has failed (aborted, timed out, NCCL error).
  void throw_if_failed(std::unique_lock<std::mutex>& lock, const char* call) {
    if (error_.empty()) return;
    const std::string msg = cat("fp8flow::Communicator::", call, ": ", where(),
                                ": the communicator failed earlier and is unusable: ", error_);
    lock.unlock();
    throw Error(ErrorKind::Comm, msg);
  }

  // Under mu_: records the failure (first reason wins), aborts an owned communicator.
  void fail_locked(const std::string& reason) {
    if (!error_.empty()) return;
    error_ = reason;
    if (owned_ && comm_) {
      ncclCommAbort(comm_);
      comm_ = nullptr;
      error_ += " [communicator aborted]";
    } else if (!owned_) {
      error_ += " [wrapped communicator not aborted: its owner must call ncclCommAbort]";
    }
  }

  [[noreturn]] void fail_and_throw(std::unique_lock<std::mutex>& lock, const char* call,
                                   const std::string& why) {
    const std::string msg = cat("fp8flow::Communicator::", call, ": ", where(), ": ", why);
    fail_locked(msg);
    const std::string full = error_;
    lock.unlock();
    throw Error(ErrorKind::Comm, full);
  }

  // Under mu_: checks an NCCL return; ncclInProgress is polled (releasing mu_ between polls) until
  // the communicator is ready again or the timeout passes.
  void nccl(std::unique_lock<std::mutex>& lock, const char* call, ncclResult_t r) {
    if (r == ncclSuccess) return;
    if (r != ncclInProgress) fail_and_throw(lock, call, cat("NCCL error: ", nccl_text(r, comm_)));
    const auto start = Clock::now();
    const auto deadline = start + timeout_;
    Backoff backoff;
    for (;;) {
      ncclResult_t state = ncclSuccess;
      const ncclResult_t q = ncclCommGetAsyncError(comm_, &state);
      if (q != ncclSuccess)
        fail_and_throw(lock, call, cat("ncclCommGetAsyncError: ", nccl_text(q, comm_)));
      if (state == ncclSuccess) return;
      if (state != ncclInProgress)
        fail_and_throw(lock, call, cat("NCCL error: ", nccl_text(state, comm_)));
      if (Clock::now() >= deadline)
        fail_and_throw(lock, call,
                       cat("NCCL still in progress after ", timeout_.count(),
                           " ms (timeout): a peer never arrived, died or called collectives in "
                           "another order"));
      lock.unlock();
      backoff.pause();
      lock.lock();
      throw_if_failed(lock, call);  // the watchdog may have aborted meanwhile
    }
  }

  cudaEvent_t take_event() {
    std::lock_guard lock(wmu_);
    if (!free_events_.empty()) {
      cudaEvent_t ev = free_events_.back();
      free_events_.pop_back();
      return ev;
    }
    cudaEvent_t ev = nullptr;
    const cudaError_t e = cudaEventCreateWithFlags(&ev, cudaEventDisableTiming);
    if (e != cudaSuccess)
      throw Error(ErrorKind::Cuda, cat("fp8flow::Communicator: cudaEventCreate: ", cuda_text(e)));
    return ev;
  }

  void give_back(cudaEvent_t ev) {
    if (!ev) return;
    std::lock_guard lock(wmu_);
    free_events_.push_back(ev);
  }

  // Records the start event of a tracked collective (none while the stream is being captured).
  cudaEvent_t track_begin(const char* call, cudaStream_t s) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(s, &capture) != cudaSuccess || capture != cudaStreamCaptureStatusNone)
      return nullptr;
    cudaEvent_t ev = take_event();
    const cudaError_t e = cudaEventRecord(ev, s);
    if (e != cudaSuccess)
      throw Error(ErrorKind::Cuda,
                  cat("fp8flow::Communicator::", call, ": cudaEventRecord: ", cuda_text(e)));
    last_call_ = call;
    return ev;
  }

  // Records the end event and hands the pair to the watchdog.
  void track_end(cudaEvent_t start, cudaStream_t s) {
    if (!start) return;
    cudaEvent_t end = take_event();
    const cudaError_t e = cudaEventRecord(end, s);
    if (e != cudaSuccess)
      throw Error(ErrorKind::Cuda, cat("fp8flow::Communicator: cudaEventRecord: ", cuda_text(e)));
    {
      std::lock_guard lock(wmu_);
      Pending p;
      p.start = start;
      p.end = end;
      p.call = last_call_;
      p.seq = ++seq_;
      pending_.push_back(p);
    }
    // No notify: the watchdog polls on its own (2 ms while work is pending), so a stream of small
    // collectives does not wake it each time.
  }

  // all_gather (and barrier, with no values): each rank's segment is [count, values...]; the
  // count lets a rank that passed a different number of values be caught instead of producing
  // garbage (NCCL needs equal counts; a mismatch may also end in the timeout).
  std::vector<int64_t> gather(std::span<const int64_t> mine, Stream stream, const char* call) {
    const size_t k = mine.size() + 1;
    const size_t bytes = k * size_ * sizeof(int64_t);
    DeviceScope dev(device_);
    auto s = reinterpret_cast<cudaStream_t>(stream);
    std::unique_lock lock(mu_);
    throw_if_failed(lock, call);
    if (bytes > staging_bytes_) {
      // Grow (rare; the previous gather has completed, so nothing uses the old buffers).
      release_buffers();
      staging_bytes_ = std::max(bytes, 2 * staging_bytes_);
      cudaError_t e = cudaMalloc(&dev_buf_, staging_bytes_);
      if (e == cudaSuccess) e = cudaMallocHost(&host_buf_, staging_bytes_);
      if (e != cudaSuccess) {
        release_buffers();
        staging_bytes_ = 0;
        lock.unlock();
        throw Error(ErrorKind::Cuda, cat("fp8flow::Communicator::", call, ": staging buffers of ",
                                         bytes, " bytes: ", cuda_text(e)));
      }
    }
    int64_t* const host = host_buf_;
    // The pinned staging buffer is only touched under mu_ and fully synchronized below.
    host[rank_ * k] = static_cast<int64_t>(mine.size());
    std::copy(mine.begin(), mine.end(), host + rank_ * k + 1);
    int64_t* const seg = dev_buf_ + rank_ * k;
    auto cuda = [&](cudaError_t e, const char* what) {
      if (e != cudaSuccess) fail_and_throw(lock, call, cat(what, ": ", cuda_text(e)));
    };
    cuda(cudaMemcpyAsync(seg, host + rank_ * k, k * sizeof(int64_t), cudaMemcpyHostToDevice, s),
         "cudaMemcpyAsync");
    lock.unlock();
    cudaEvent_t start = track_begin(call, s);
    lock.lock();
    throw_if_failed(lock, call);
    nccl(lock, call, ncclAllGather(seg, dev_buf_, k, ncclInt64, comm_, s));
    cuda(cudaMemcpyAsync(host, dev_buf_, bytes, cudaMemcpyDeviceToHost, s), "cudaMemcpyAsync");
    lock.unlock();
    track_end(start, s);
    // Wait on the host. The watchdog times the collective itself (from when it starts on the GPU)
    // and fails the communicator, which ends this loop; the deadline here is only a backstop for
    // a stream that never reaches the collective (work queued before it that never finishes).
    cudaEvent_t done = take_event();
    lock.lock();
    cuda(cudaEventRecord(done, s), "cudaEventRecord");
    lock.unlock();
    const auto deadline = Clock::now() + 2 * timeout_ + std::chrono::seconds(1);
    Backoff backoff;
    for (;;) {
      const cudaError_t e = cudaEventQuery(done);
      if (e == cudaSuccess) break;
      lock.lock();
      throw_if_failed(lock, call);
      if (e != cudaErrorNotReady) cuda(e, "cudaEventQuery");
      if (Clock::now() >= deadline)
        fail_and_throw(lock, call,
                       cat("not complete after ", 2 * timeout_.count() + 1000,
                           " ms (2 x timeout + 1 s): the stream never reached it, or a peer never "
                           "arrived, died or called collectives in another order"));
      lock.unlock();
      backoff.pause();
    }
    give_back(done);
    lock.lock();
    throw_if_failed(lock, call);  // an abort during the wait leaves garbage in `host`
    std::vector<int64_t> out;
    out.reserve(mine.size() * size_);
    for (int j = 0; j < size_; ++j) {
      const int64_t count = host[j * k];
      if (count != static_cast<int64_t>(mine.size()))
        fail_and_throw(lock, call,
                       cat("mine: expected the same count on every rank, got ", mine.size(),
                           " on rank ", rank_, " and ", count, " on rank ", j));
      out.insert(out.end(), host + j * k + 1, host + (j + 1) * k);
    }
    return out;
  }

  void watchdog_loop() {
    cudaSetDevice(device_);
    std::unique_lock wl(wmu_);
    while (!stop_) {
      wcv_.wait_for(wl, std::chrono::milliseconds(pending_.empty() ? 20 : 2));
      if (stop_) break;
      std::string reason;
      while (!pending_.empty() && reason.empty()) {
        Pending& p = pending_.front();
        if (!p.running) {
          const cudaError_t e = cudaEventQuery(p.start);
          if (e == cudaErrorNotReady) break;
          if (e != cudaSuccess) {
            reason = cat("CUDA error while waiting for ", p.call, ": ", cuda_text(e));
            break;
          }
          p.running = true;
          p.started = Clock::now();
        }
        const cudaError_t e = cudaEventQuery(p.end);
        if (e == cudaSuccess) {
          free_events_.push_back(p.start);
          free_events_.push_back(p.end);
          pending_.pop_front();
          continue;
        }
        if (e != cudaErrorNotReady) {
          reason = cat("CUDA error while waiting for ", p.call, ": ", cuda_text(e));
        } else if (Clock::now() - p.started > timeout_) {
          reason = cat(p.call, " (collective #", p.seq, ") has not completed ", timeout_.count(),
                       " ms after it started on the GPU (timeout): a peer never arrived, died or "
                       "called collectives in another order");
        }
        break;
      }
      wl.unlock();
      {
        std::lock_guard lock(mu_);
        if (error_.empty() && comm_) {
          ncclResult_t state = ncclSuccess;
          const ncclResult_t q = ncclCommGetAsyncError(comm_, &state);
          if (reason.empty() && q != ncclSuccess)
            reason = cat("ncclCommGetAsyncError: ", nccl_text(q, comm_));
          else if (reason.empty() && state != ncclSuccess && state != ncclInProgress)
            reason = cat("NCCL asynchronous error: ", nccl_text(state, comm_));
          if (!reason.empty())
            fail_locked(cat("fp8flow::Communicator (watchdog): ", where(), ": ", reason));
        }
      }
      wl.lock();
      if (!reason.empty()) {
        // The communicator is gone; stop tracking (events stay allocated until destruction).
        while (!pending_.empty()) {
          free_events_.push_back(pending_.front().start);
          free_events_.push_back(pending_.front().end);
          pending_.pop_front();
        }
      }
    }
  }

  std::mutex mu_;  // NCCL calls, comm_, error_, the staging buffers
  ncclComm_t comm_ = nullptr;
  const bool owned_;
  int rank_ = 0, size_ = 0, device_ = 0;
  const std::chrono::milliseconds timeout_;
  std::string error_;           // non-empty once failed
  int64_t* dev_buf_ = nullptr;  // all_gather staging: device and pinned host, grown on demand
  int64_t* host_buf_ = nullptr;
  size_t staging_bytes_ = size_t{1} << 16;

  std::mutex wmu_;  // the watchdog's queue and the event pool
  std::condition_variable wcv_;
  bool stop_ = false;
  std::deque<Pending> pending_;
  std::vector<cudaEvent_t> free_events_;
  int64_t seq_ = 0;
  const char* last_call_ = "";
  std::thread watchdog_;
};

}  // namespace

bool built_with_nccl() {
  return true;
}

NcclUniqueIdBytes nccl_unique_id() {
  ncclUniqueId id;
  const ncclResult_t r = ncclGetUniqueId(&id);
  if (r != ncclSuccess)
    throw Error(ErrorKind::Comm, cat("fp8flow::nccl_unique_id: ncclGetUniqueId: ",
                                     ncclGetErrorString(r), ": ", ncclGetLastError(nullptr)));
  NcclUniqueIdBytes out;
  std::memcpy(out.bytes, &id, sizeof(id));
  return out;
}

std::unique_ptr<Communicator> make_nccl_communicator(const NcclUniqueIdBytes& id, int rank,
                                                     int size, int64_t timeout_ms) {
  detail::Check check("make_nccl_communicator");
  check.that(size >= 1, "size", ">= 1", cat(size));
  check.that(rank >= 0 && rank < size, "rank", cat("0..", size - 1), cat(rank));
  check.that(timeout_ms > 0, "timeout_ms", "> 0", cat(timeout_ms));
  int device = -1;
  const cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess)
    throw Error(ErrorKind::Cuda,
                cat("fp8flow::make_nccl_communicator: cudaGetDevice: ", cuda_text(e)));
  ncclUniqueId uid;
  std::memcpy(&uid, id.bytes, sizeof(uid));
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  ncclComm_t comm = nullptr;
  const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  ncclResult_t r = ncclCommInitRankConfig(&comm, size, uid, rank, &config);
  if ((r == ncclSuccess || r == ncclInProgress) && comm) r = poll_ready(comm, deadline);
  if (r != ncclSuccess) {
    std::string why = r == ncclInProgress
                          ? cat("not ready after ", timeout_ms,
                                " ms (timeout): a rank never arrived, or the ranks disagree on "
                                "the size or the unique id")
                          : cat("ncclCommInitRankConfig: ", nccl_text(r, comm));
    if (comm) ncclCommAbort(comm);
    throw Error(ErrorKind::Comm, cat("fp8flow::make_nccl_communicator: rank ", rank, " of ", size,
                                     " (device ", device, "): ", why));
  }
  auto out = std::make_unique<NcclCommunicator>(comm, /*owned=*/true, timeout_ms);
  // Every rank must have joined with the same size and a distinct rank: gather (rank, size).
  const int64_t me[2] = {rank, size};
  const std::vector<int64_t> all = out->all_gather(me, nullptr);
  for (int j = 0; j < size; ++j)
    if (all[2 * j] != j || all[2 * j + 1] != size)
      throw Error(ErrorKind::Comm,
                  cat("fp8flow::make_nccl_communicator: rank ", rank, ": expected rank ", j, " of ",
                      size, " at position ", j, ", got rank ", all[2 * j], " of ", all[2 * j + 1]));
  return out;
}

std::unique_ptr<Communicator> wrap_nccl_communicator(void* nccl_comm, int64_t timeout_ms) {
  detail::Check check("wrap_nccl_communicator");
  check.that(nccl_comm != nullptr, "nccl_comm", "an ncclComm_t", "nullptr");
  check.that(timeout_ms > 0, "timeout_ms", "> 0", cat(timeout_ms));
  return std::make_unique<NcclCommunicator>(static_cast<ncclComm_t>(nccl_comm), /*owned=*/false,
                                            timeout_ms);
}

#else  // !FP8FLOW_WITH_NCCL

namespace {
[[noreturn]] void no_nccl(const char* fn) {
  throw Error(ErrorKind::Unsupported, detail::cat("fp8flow::", fn,
                                                  ": fp8flow was built without NCCL "
                                                  "(FP8FLOW_WITH_NCCL=OFF)"));
}
}  // namespace

bool built_with_nccl() {
  return false;
}
NcclUniqueIdBytes nccl_unique_id() {
  no_nccl("nccl_unique_id");
}
std::unique_ptr<Communicator> make_nccl_communicator(const NcclUniqueIdBytes&, int, int, int64_t) {
  no_nccl("make_nccl_communicator");
}
std::unique_ptr<Communicator> wrap_nccl_communicator(void*, int64_t) {
  no_nccl("wrap_nccl_communicator");
}

#endif

}  // namespace fp8flow
