// InProcess communicator: N simulated ranks in one process, one thread per rank, host memory.
// What the CPU test suite uses to run dispatch/combine and the MoE layer with EP > 1 without NCCL.
//
// Every collective is a two-phase rendezvous on one shared state (mutex + condition variable):
//   phase 1  each rank publishes its arguments (call name, pointers, counts) and waits until all
//            ranks have published; then every rank checks the whole group's arguments (same call,
//            consistent counts) and copies what it receives straight from the peers' send buffers;
//   phase 2  each rank waits until all ranks have finished copying, so a sender's buffer (and its
//            published slot) stays valid until nobody reads it any more.
// Ranks count their arrivals (monotonic per-rank counters), so there is no generation to reuse:
// the k-th collective's phases are 2k+1 and 2k+2, and a rank waits for every counter >= its phase.
//
// Faults never hang: every wait has a deadline (timeout_ms); a rank that throws (in a collective or
// in its own code) or returns while others wait for it aborts the group, and the waiting ranks
// throw ErrorKind::Comm naming the rank and the reason. run_in_process re-throws the root cause.
//
// NOTES: the cross-rank checks (same call, send/recv counts agree) run on every rank over the
// whole group's published arguments, so every rank reaches the same verdict and throws the same
// message; nobody is left waiting on a rank that bailed out.
#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "comm/comm_check.h"
#include "common/check.h"
#include "fp8flow/comm.h"

namespace fp8flow {
namespace {

using Clock = std::chrono::steady_clock;
using detail::cat;

// What a rank publishes for the collective it is in. Counts are copied: a rank that fails a check
// returns while others may still read its slot. `send` is read only between phases 1 and 2.
struct Slot {
  const char* call = "";
  const void* send = nullptr;
  std::vector<int64_t> send_bytes, send_offsets;
  std::vector<int64_t> recv_bytes;
  std::vector<int64_t> gather;            // all_gather: this rank's values
  std::vector<CommSegment> sends, recvs;  // all_to_all_segments: the non-empty segments
};

struct Shared {
  explicit Shared(int n, int64_t timeout_ms)
      : n(n), timeout(timeout_ms), arrived(n, 0), finished(n, false), busy(n, false), slots(n) {}

  const int n;
  const std::chrono::milliseconds timeout;
  std::mutex m;
  std::condition_variable cv;
  std::vector<int64_t> arrived;  // phases each rank has reached
  std::vector<bool> finished;    // the rank's function returned
  std::vector<bool> busy;        // the rank is copying between phases 1 and 2 of all_to_all_v
  std::vector<Slot> slots;
  int64_t completed = 0;  // the last phase every rank reached before any abort
  bool aborted = false;
  int abort_rank = -1;  // the rank whose failure aborted the group (-1: none)
  std::string abort_reason;

  // Under `m`: marks the group aborted (first reason wins) and wakes every waiter.
  void abort_locked(int rank, const std::string& reason) {
    if (!aborted) {
      aborted = true;
      abort_rank = rank;
      abort_reason = reason;
    }
    cv.notify_all();
  }
};

class InProcessCommunicator final : public Communicator {
 public:
  InProcessCommunicator(Shared& s, int rank) : s_(s), rank_(rank) {}

  int rank() const override { return rank_; }
  int size() const override { return s_.n; }
  Device device() const override { return Device::Cpu; }
  const char* backend() const override { return "inprocess"; }

  void all_to_all_v(const void* send, std::span<const int64_t> send_bytes,
                    std::span<const int64_t> send_offsets, void* recv,
                    std::span<const int64_t> recv_bytes, std::span<const int64_t> recv_offsets,
                    Stream) override {
    const char* call = "all_to_all_v";
    guarded(call, [&] {
      validate_a2a_args(call, send, send_bytes, send_offsets, recv, recv_bytes, recv_offsets);
      Slot mine;
      mine.call = call;
      mine.send = send;
      mine.send_bytes.assign(send_bytes.begin(), send_bytes.end());
      mine.send_offsets.assign(send_offsets.begin(), send_offsets.end());
      mine.recv_bytes.assign(recv_bytes.begin(), recv_bytes.end());
      std::unique_lock lock(s_.m);
      publish_and_wait(lock, call, std::move(mine));
      // Cross-rank consistency, checked by every rank over the whole matrix (same verdict
      // everywhere).
      for (int i = 0; i < s_.n; ++i)
        for (int j = 0; j < s_.n; ++j) {
          const int64_t sent = s_.slots[i].send_bytes[j];
          const int64_t expected = s_.slots[j].recv_bytes[i];
          if (sent != expected)
            fail_group(lock, cat("fp8flow::Communicator::all_to_all_v: recv_bytes[", i, "]: rank ",
                                 j, " expects ", expected, " bytes from rank ", i, ", but rank ", i,
                                 " sends ", sent, " bytes to rank ", j, " (send_bytes[", j, "])"));
        }
      std::vector<std::pair<const void*, int64_t>> from(s_.n);
      for (int j = 0; j < s_.n; ++j) {
        const Slot& peer = s_.slots[j];
        from[j] = {static_cast<const uint8_t*>(peer.send) + peer.send_offsets[rank_],
                   peer.send_bytes[rank_]};
      }
      // The copies run outside the lock (the peers' buffers are pinned until phase 2).
      lock.unlock();
      for (int j = 0; j < s_.n; ++j)
        if (from[j].second > 0)
          std::memcpy(static_cast<uint8_t*>(recv) + recv_offsets[j], from[j].first,
                      static_cast<size_t>(from[j].second));
      lock.lock();
      arrive_and_wait(lock, call);
    });
  }

  void all_to_all_segments(std::span<const CommSegment> sends, std::span<const CommSegment> recvs,
                           Stream) override {
    const char* call = "all_to_all_segments";
    guarded(call, [&] {
      detail::validate_segments(s_.n, sends, recvs);
      Slot mine;
      mine.call = call;
      for (const CommSegment& g : sends)
        if (g.bytes > 0) mine.sends.push_back(g);
      for (const CommSegment& g : recvs)
        if (g.bytes > 0) mine.recvs.push_back(g);
      std::unique_lock lock(s_.m);
      publish_and_wait(lock, call, std::move(mine));
      // Cross-rank matching, checked by every rank over the whole group (same verdict
      // everywhere): the k-th send of i to j against the k-th receive of j from i.
      for (int i = 0; i < s_.n; ++i)
        for (int j = 0; j < s_.n; ++j) {
          std::vector<int64_t> sent, expected;
          for (const CommSegment& g : s_.slots[i].sends)
            if (g.peer == j) sent.push_back(g.bytes);
          for (const CommSegment& g : s_.slots[j].recvs)
            if (g.peer == i) expected.push_back(g.bytes);
          if (sent == expected) continue;
          size_t k = 0;
          while (k < sent.size() && k < expected.size() && sent[k] == expected[k]) ++k;
          const auto what = [](const std::vector<int64_t>& v, size_t k) {
            return k < v.size() ? cat(v[k], " bytes") : std::string("nothing");
          };
          fail_group(lock, cat("fp8flow::Communicator::all_to_all_segments: recvs: rank ", j,
                               " expects ", what(expected, k), " in its transfer #", k,
                               " from rank ", i, ", but rank ", i, " sends ", what(sent, k), " (",
                               sent.size(), " sends vs ", expected.size(), " receives)"));
        }
      // This rank's receives, each paired with its sender's matching segment.
      struct Copy {
        uint8_t* dst;
        const uint8_t* src;
        int64_t bytes;
      };
      std::vector<Copy> copies;
      std::vector<size_t> next(s_.n, 0);  // per peer: next send of that peer to this rank
      for (const CommSegment& g : s_.slots[rank_].recvs) {
        const Slot& peer = s_.slots[g.peer];
        size_t& k = next[g.peer];
        while (peer.sends[k].peer != rank_) ++k;
        copies.push_back({static_cast<uint8_t*>(g.data),
                          static_cast<const uint8_t*>(peer.sends[k].data), g.bytes});
        ++k;
      }
      // The copies run outside the lock (the peers' buffers are pinned until phase 2).
      lock.unlock();
      for (const Copy& cp : copies) std::memcpy(cp.dst, cp.src, static_cast<size_t>(cp.bytes));
      lock.lock();
      arrive_and_wait(lock, call);
    });
  }

  std::vector<int64_t> all_gather(std::span<const int64_t> mine_values, Stream) override {
    const char* call = "all_gather";
    std::vector<int64_t> out;
    guarded(call, [&] {
      Slot mine;
      mine.call = call;
      mine.gather.assign(mine_values.begin(), mine_values.end());
      std::unique_lock lock(s_.m);
      publish_and_wait(lock, call, std::move(mine));
      for (int j = 0; j < s_.n; ++j)
        if (s_.slots[j].gather.size() != s_.slots[0].gather.size())
          fail_group(lock, cat("fp8flow::Communicator::all_gather: mine: expected the same count "
                               "on every rank, got ",
                               s_.slots[0].gather.size(), " on rank 0 and ",
                               s_.slots[j].gather.size(), " on rank ", j));
      out.reserve(s_.slots[0].gather.size() * s_.n);
      for (int j = 0; j < s_.n; ++j)
        out.insert(out.end(), s_.slots[j].gather.begin(), s_.slots[j].gather.end());
      arrive_and_wait(lock, call);
    });
    return out;
  }

  void barrier(Stream) override {
    const char* call = "barrier";
    guarded(call, [&] {
      Slot mine;
      mine.call = call;
      std::unique_lock lock(s_.m);
      publish_and_wait(lock, call, std::move(mine));
      arrive_and_wait(lock, call);
    });
  }

 private:
  // Local argument checks (before anything is published); InvalidArgument.
  void validate_a2a_args(const char* call, const void* send, std::span<const int64_t> send_bytes,
                         std::span<const int64_t> send_offsets, void* recv,
                         std::span<const int64_t> recv_bytes,
                         std::span<const int64_t> recv_offsets) const {
    (void)call;
    detail::check_all_to_all_v_args(s_.n, send, send_bytes, send_offsets, recv, recv_bytes,
                                    recv_offsets);
    const auto n = static_cast<size_t>(s_.n);
    detail::Check check("Communicator::all_to_all_v");
    // Receive ranges must not overlap (each byte of recv written by one peer at most).
    std::vector<std::pair<int64_t, size_t>> ranges;
    for (size_t j = 0; j < n; ++j)
      if (recv_bytes[j] > 0) ranges.push_back({recv_offsets[j], j});
    std::sort(ranges.begin(), ranges.end());
    for (size_t k = 1; k < ranges.size(); ++k) {
      const size_t a = ranges[k - 1].second, b = ranges[k].second;
      if (!(recv_offsets[a] + recv_bytes[a] <= recv_offsets[b]))
        check.that(false, cat("recv_offsets[", b, "]"),
                   cat("receive ranges that do not overlap; the range from rank ", a, " ends at ",
                       recv_offsets[a] + recv_bytes[a]),
                   cat(recv_offsets[b]));
    }
  }

  // Runs a collective's body; any exception aborts the group first (so the other ranks are
  // released), then propagates. A collective on an aborted group throws at once.
  template <typename F>
  void guarded(const char* call, F&& body) {
    {
      std::lock_guard lock(s_.m);
      if (s_.aborted) throw Error(ErrorKind::Comm, aborted_message(call));
    }
    try {
      body();
    } catch (const std::exception& e) {
      std::lock_guard lock(s_.m);
      s_.abort_locked(rank_, e.what());
      throw;
    }
  }

  std::string aborted_message(const char* call) const {
    return cat("fp8flow::Communicator::", call, ": rank ", rank_, ": the group was aborted",
               s_.abort_rank >= 0 ? cat(" by rank ", s_.abort_rank) : std::string(), ": ",
               s_.abort_reason);
  }

  // Throws the same group-wide error on this rank (the others reach the same verdict).
  [[noreturn]] void fail_group(std::unique_lock<std::mutex>& lock, const std::string& msg) {
    s_.abort_locked(rank_, msg);
    lock.unlock();
    throw Error(ErrorKind::Comm, msg);
  }

  void publish_and_wait(std::unique_lock<std::mutex>& lock, const char* call, Slot&& mine) {
    s_.slots[rank_] = std::move(mine);
    arrive_and_wait(lock, call);
    for (int j = 0; j < s_.n; ++j)
      if (std::strcmp(s_.slots[j].call, call) != 0)
        fail_group(lock,
                   cat("fp8flow::Communicator::", call, ": collective #", collective_, ": rank ",
                       rank_, " called ", call, " but rank ", j, " called ", s_.slots[j].call,
                       " (all ranks must call collectives in the same "
                       "order)"));
  }

  // Advances this rank's phase and waits (with the timeout) until every rank has reached it.
  // Completion and abort are both decided under the lock, and the first one wins: a phase that
  // completed before an abort is done for everyone (a rank may fail right after a collective),
  // one that did not is failed for everyone (nobody copies from a rank that gave up).
  // Between phases 1 and 2 every rank is `busy` (running our code, copying from the peers'
  // buffers): waiting for a busy rank does not time out, so no sender leaves while being read.
  void arrive_and_wait(std::unique_lock<std::mutex>& lock, const char* call) {
    const int64_t phase = ++s_.arrived[rank_];
    s_.busy[rank_] = false;
    collective_ = (phase + 1) / 2;
    if (!s_.aborted && *std::min_element(s_.arrived.begin(), s_.arrived.end()) >= phase) {
      s_.completed = phase;
      if (phase % 2 == 1) std::fill(s_.busy.begin(), s_.busy.end(), true);
    }
    s_.cv.notify_all();
    const auto start = Clock::now();
    auto deadline = start + s_.timeout;
    for (;;) {
      if (s_.completed >= phase) return;
      int behind = -1;
      for (int j = 0; j < s_.n && behind < 0; ++j)
        if (s_.arrived[j] < phase) behind = j;
      if (s_.aborted || behind < 0) {  // behind < 0 without completion: aborted meanwhile
        const std::string msg = aborted_message(call);
        lock.unlock();
        throw Error(ErrorKind::Comm, msg);
      }
      if (s_.finished[behind])
        fail_group(lock, cat("fp8flow::Communicator::", call, ": rank ", rank_, " waits for rank ",
                             behind, ", which returned without calling collective #", collective_,
                             " (", call, ")"));
      if (Clock::now() >= deadline) {
        if (s_.busy[behind]) {  // still copying from/to our buffers: give it more time
          deadline = Clock::now() + s_.timeout;
          continue;
        }
        const auto waited =
            std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start).count();
        fail_group(lock, cat("fp8flow::Communicator::", call, ": rank ", rank_, " waited ", waited,
                             " ms for rank ", behind, " (timeout ", s_.timeout.count(),
                             " ms) in collective #", collective_,
                             "; the rank is stuck, dead or calls collectives in another order"));
      }
      s_.cv.wait_until(lock, deadline);
    }
  }

  Shared& s_;
  const int rank_;
  int64_t collective_ = 0;  // 1-based index of the collective in progress (for messages)
};

}  // namespace

void run_in_process(int ranks, const std::function<void(Communicator&)>& fn, int64_t timeout_ms) {
  detail::Check check("run_in_process");
  check.that(ranks >= 1 && ranks <= 1024, "ranks", "1..1024", cat(ranks));
  check.that(timeout_ms > 0, "timeout_ms", "> 0", cat(timeout_ms));
  check.that(static_cast<bool>(fn), "fn", "a callable", "an empty std::function");
  Shared shared(ranks, timeout_ms);
  std::vector<std::exception_ptr> errors(ranks);
  std::vector<int64_t> error_order(ranks, -1);
  int64_t next_error = 0;
  auto body = [&](int r) {
    InProcessCommunicator comm(shared, r);
    try {
      fn(comm);
      std::lock_guard lock(shared.m);
      shared.finished[r] = true;
      shared.cv.notify_all();
    } catch (...) {
      std::lock_guard lock(shared.m);
      errors[r] = std::current_exception();
      error_order[r] = next_error++;
      shared.finished[r] = true;
      std::string what = "an exception that is not a std::exception";
      try {
        throw;
      } catch (const std::exception& e) {
        what = e.what();
      } catch (...) {
      }
      shared.abort_locked(r, what);
    }
  };
  if (ranks == 1) {
    body(0);
  } else {
    std::vector<std::thread> threads;
    threads.reserve(ranks);
    for (int r = 0; r < ranks; ++r) threads.emplace_back(body, r);
    for (auto& t : threads) t.join();
  }
  // The root cause: the rank that aborted the group, else the first exception thrown.
  int pick = -1;
  if (shared.abort_rank >= 0 && errors[shared.abort_rank]) pick = shared.abort_rank;
  for (int r = 0; r < ranks && pick < 0; ++r)
    if (errors[r] && error_order[r] == 0) pick = r;
  if (pick >= 0) std::rethrow_exception(errors[pick]);
}

}  // namespace fp8flow
