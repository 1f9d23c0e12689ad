// InProcess communicator: simulated ranks in threads. Data movement of all_to_all_v / all_gather
// against an independently computed expectation (1..8 ranks, random counts with zeros and gaps),
// and every fault path: a rank that throws, never arrives, returns early, calls another collective,
// passes inconsistent counts or bad arguments; check_same_on_all_ranks.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <functional>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "fp8flow/comm.h"

namespace fp8flow {
namespace {

using Clock = std::chrono::steady_clock;

// The byte rank `src` puts at position k of its message to rank `dst` (distinct per pair).
uint8_t pattern(int src, int dst, int64_t k) {
  return static_cast<uint8_t>((src * 37 + dst * 11 + k * 7 + (k >> 8) * 3) & 0xFF);
}

// A random message-size matrix bytes[src][dst], the same on every rank (seeded), ~30% zeros.
std::vector<std::vector<int64_t>> random_counts(int n, uint32_t seed, int64_t max_bytes) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int64_t> len(1, max_bytes);
  std::uniform_int_distribution<int> zero(0, 9);
  std::vector<std::vector<int64_t>> c(n, std::vector<int64_t>(n));
  for (auto& row : c)
    for (auto& v : row) v = zero(rng) < 3 ? 0 : len(rng);
  return c;
}

struct Layout {
  std::vector<int64_t> bytes, offsets;
  int64_t total = 0;  // buffer size including the gaps
};
// Offsets as prefix sums with a gap of `gap` bytes after each segment (exercises offsets).
Layout layout(std::vector<int64_t> bytes, int64_t gap) {
  Layout l;
  l.bytes = std::move(bytes);
  for (int64_t b : l.bytes) {
    l.offsets.push_back(l.total);
    l.total += b + gap;
  }
  return l;
}

// One all_to_all_v per call with the counts matrix c; returns true if the received buffer is
// exactly as expected, gaps untouched.
void exchange_and_check(Communicator& comm, const std::vector<std::vector<int64_t>>& c,
                        int64_t gap) {
  const int n = comm.size(), me = comm.rank();
  std::vector<int64_t> sb(n), rb(n);
  for (int j = 0; j < n; ++j) {
    sb[j] = c[me][j];
    rb[j] = c[j][me];
  }
  const Layout s = layout(sb, gap), r = layout(rb, gap + 3);
  std::vector<uint8_t> send(s.total + 1, 0xEE), recv(r.total + 1, 0xCD);
  for (int j = 0; j < n; ++j)
    for (int64_t k = 0; k < sb[j]; ++k) send[s.offsets[j] + k] = pattern(me, j, k);
  comm.all_to_all_v(send.data(), s.bytes, s.offsets, recv.data(), r.bytes, r.offsets, nullptr);
  std::vector<uint8_t> want(r.total + 1, 0xCD);
  for (int j = 0; j < n; ++j)
    for (int64_t k = 0; k < rb[j]; ++k) want[r.offsets[j] + k] = pattern(j, me, k);
  ASSERT_EQ(recv, want) << "rank " << me << " of " << n;
}

TEST(CommInProcess, AllToAllVRandomCounts1To8Ranks) {
  for (int n = 1; n <= 8; ++n) {
    for (uint32_t seed = 1; seed <= 3; ++seed) {
      const auto c = random_counts(n, seed * 100 + n, 3000);
      std::atomic<int> done{0};
      run_in_process(n, [&](Communicator& comm) {
        EXPECT_EQ(comm.size(), n);
        EXPECT_EQ(comm.device(), Device::Cpu);
        EXPECT_STREQ(comm.backend(), "inprocess");
        exchange_and_check(comm, c, seed == 1 ? 0 : 5);
        ++done;
      });
      EXPECT_EQ(done.load(), n);
    }
  }
}

TEST(CommInProcess, RankSeesItsOwnIndex) {
  std::mutex m;
  std::vector<int> seen;
  run_in_process(5, [&](Communicator& comm) {
    std::lock_guard lock(m);
    seen.push_back(comm.rank());
  });
  std::sort(seen.begin(), seen.end());
  EXPECT_EQ(seen, (std::vector<int>{0, 1, 2, 3, 4}));
}

TEST(CommInProcess, AllZeroAndNullBuffers) {
  run_in_process(4, [&](Communicator& comm) {
    const std::vector<int64_t> z(4, 0);
    comm.all_to_all_v(nullptr, z, z, nullptr, z, z, nullptr);
  });
}

// Many back-to-back collectives of all kinds: the phase counters never mix two calls up.
TEST(CommInProcess, ManyMixedCollectives) {
  const int n = 6;
  run_in_process(n, [&](Communicator& comm) {
    for (int it = 0; it < 60; ++it) {
      const auto c = random_counts(n, 7000 + it, 200);
      exchange_and_check(comm, c, it % 3);
      const std::vector<int64_t> mine{comm.rank(), it, -comm.rank() * it};
      const auto all = comm.all_gather(mine, nullptr);
      ASSERT_EQ(all.size(), 3u * n);
      for (int r = 0; r < n; ++r) {
        EXPECT_EQ(all[3 * r], r);
        EXPECT_EQ(all[3 * r + 1], it);
        EXPECT_EQ(all[3 * r + 2], -r * it);
      }
      if (it % 5 == 0) comm.barrier(nullptr);
    }
  });
}

TEST(CommInProcess, AllGatherEmptyAndSingle) {
  run_in_process(3, [&](Communicator& comm) {
    EXPECT_TRUE(comm.all_gather({}, nullptr).empty());
    const int64_t v = 100 + comm.rank();
    EXPECT_EQ(comm.all_gather(std::span<const int64_t>(&v, 1), nullptr),
              (std::vector<int64_t>{100, 101, 102}));
  });
}

// Runs fn on n ranks, collecting every rank's exception message and kind; returns what
// run_in_process re-threw ("" if nothing).
struct Outcome {
  std::string rethrown;
  bool rethrown_comm = false;
  std::vector<std::string> msg;    // per rank, "" if it returned normally
  std::vector<ErrorKind> kind;     // per rank (valid when msg non-empty and is_error)
  std::vector<bool> is_error;      // the rank threw an fp8flow::Error
  std::vector<double> elapsed_ms;  // per rank, time until it returned or threw
};
Outcome run_collecting(int n, const std::function<void(Communicator&)>& fn, int64_t timeout_ms) {
  Outcome o;
  o.msg.assign(n, "");
  o.kind.assign(n, ErrorKind::InvalidArgument);
  o.is_error.assign(n, false);
  o.elapsed_ms.assign(n, 0);
  std::mutex m;
  const auto start = Clock::now();
  try {
    run_in_process(
        n,
        [&](Communicator& comm) {
          const int r = comm.rank();
          auto record = [&](const std::string& w, bool err, ErrorKind k) {
            std::lock_guard lock(m);
            o.msg[r] = w;
            o.is_error[r] = err;
            o.kind[r] = k;
            o.elapsed_ms[r] =
                std::chrono::duration<double, std::milli>(Clock::now() - start).count();
          };
          try {
            fn(comm);
            record("", false, ErrorKind::InvalidArgument);
          } catch (const Error& e) {
            record(e.what(), true, e.kind());
            throw;
          } catch (const std::exception& e) {
            record(e.what(), false, ErrorKind::InvalidArgument);
            throw;
          }
        },
        timeout_ms);
  } catch (const Error& e) {
    o.rethrown = e.what();
    o.rethrown_comm = e.kind() == ErrorKind::Comm;
  } catch (const std::exception& e) {
    o.rethrown = e.what();
  }
  return o;
}

bool has(const std::string& s, const std::string& sub) {
  return s.find(sub) != std::string::npos;
}

TEST(CommInProcess, ThrowingRankReleasesTheOthers) {
  const int n = 4;
  const auto o = run_collecting(
      n,
      [](Communicator& comm) {
        if (comm.rank() == 2) throw std::runtime_error("rank two exploded");
        std::vector<int64_t> z(comm.size(), 0);
        comm.all_to_all_v(nullptr, z, z, nullptr, z, z, nullptr);
      },
      60000);  // a long timeout: the release must come from the abort, not the deadline
  EXPECT_EQ(o.rethrown, "rank two exploded");
  for (int r = 0; r < n; ++r) {
    if (r == 2) continue;
    ASSERT_TRUE(o.is_error[r]) << "rank " << r << ": " << o.msg[r];
    EXPECT_EQ(o.kind[r], ErrorKind::Comm);
    EXPECT_TRUE(has(o.msg[r], "fp8flow::Communicator::all_to_all_v")) << o.msg[r];
    EXPECT_TRUE(has(o.msg[r], "aborted by rank 2")) << o.msg[r];
    EXPECT_TRUE(has(o.msg[r], "rank two exploded")) << o.msg[r];
    EXPECT_LT(o.elapsed_ms[r], 10000);
  }
}

TEST(CommInProcess, NonStdExceptionIsRethrown) {
  bool caught = false;
  try {
    run_in_process(3, [](Communicator& comm) {
      if (comm.rank() == 1) throw 42;
      comm.barrier(nullptr);
    });
  } catch (int v) {
    caught = v == 42;
  } catch (...) {
  }
  EXPECT_TRUE(caught);
}

TEST(CommInProcess, RankThatNeverArrivesTimesOut) {
  const int n = 4;
  const int64_t timeout_ms = 40;
  const auto o = run_collecting(
      n,
      [&](Communicator& comm) {
        if (comm.rank() == 3)  // arrives far too late
          std::this_thread::sleep_for(std::chrono::milliseconds(500));
        comm.barrier(nullptr);
      },
      timeout_ms);
  EXPECT_TRUE(o.rethrown_comm) << o.rethrown;
  EXPECT_TRUE(has(o.rethrown, " ms for rank 3")) << o.rethrown;
  EXPECT_TRUE(has(o.rethrown, "fp8flow::Communicator::barrier")) << o.rethrown;
  for (int r = 0; r < 3; ++r) {
    ASSERT_TRUE(o.is_error[r]) << "rank " << r;
    EXPECT_EQ(o.kind[r], ErrorKind::Comm);
    // The first to time out says it waited; the rest were released by its abort.
    EXPECT_TRUE(has(o.msg[r], "rank 3")) << o.msg[r];
    EXPECT_GE(o.elapsed_ms[r], timeout_ms * 0.9);
    EXPECT_LT(o.elapsed_ms[r], 400) << o.msg[r];  // not stuck until rank 3 came
  }
  // The late rank is told the group is gone when it finally arrives.
  ASSERT_TRUE(o.is_error[3]);
  EXPECT_EQ(o.kind[3], ErrorKind::Comm);
  EXPECT_TRUE(has(o.msg[3], "aborted")) << o.msg[3];
}

TEST(CommInProcess, TimeoutMessageNamesWaiterAndLateRank) {
  const auto o = run_collecting(
      2,
      [](Communicator& comm) {
        if (comm.rank() == 1) std::this_thread::sleep_for(std::chrono::milliseconds(300));
        std::vector<int64_t> z(2, 0);
        comm.all_to_all_v(nullptr, z, z, nullptr, z, z, nullptr);
      },
      40);
  EXPECT_TRUE(has(o.rethrown, "fp8flow::Communicator::all_to_all_v: rank 0 waited ")) << o.rethrown;
  EXPECT_TRUE(has(o.rethrown, " ms for rank 1 (timeout 40 ms)")) << o.rethrown;
}

TEST(CommInProcess, RankThatReturnsEarlyReleasesTheOthers) {
  const auto o = run_collecting(
      3,
      [](Communicator& comm) {
        comm.barrier(nullptr);
        if (comm.rank() == 0) return;  // skips the second collective
        comm.all_gather({}, nullptr);
      },
      60000);
  EXPECT_TRUE(o.rethrown_comm);
  EXPECT_TRUE(has(o.rethrown, "rank 0, which returned without calling collective #2 (all_gather)"))
      << o.rethrown;
  EXPECT_EQ(o.msg[0], "");
  EXPECT_TRUE(o.is_error[1] && o.is_error[2]);
}

TEST(CommInProcess, DifferentCollectivesAreCaught) {
  const auto o = run_collecting(
      3,
      [](Communicator& comm) {
        if (comm.rank() == 1)
          comm.all_gather({}, nullptr);
        else
          comm.barrier(nullptr);
      },
      60000);
  EXPECT_TRUE(o.rethrown_comm);
  EXPECT_TRUE(has(o.rethrown, "called barrier but rank 1 called all_gather") ||
              has(o.rethrown, "rank 1 called all_gather but rank 0 called barrier"))
      << o.rethrown;
  for (int r = 0; r < 3; ++r) EXPECT_EQ(o.kind[r], ErrorKind::Comm) << o.msg[r];
}

TEST(CommInProcess, RecvBytesMismatchNamesBothRanks) {
  const auto o = run_collecting(
      3,
      [](Communicator& comm) {
        const int me = comm.rank();
        std::vector<int64_t> sb{4, 4, 4}, so{0, 4, 8}, rb{4, 4, 4}, ro{0, 8, 16};
        if (me == 1) rb[0] = 5;  // rank 1 expects 5 bytes from rank 0, which sends 4
        std::vector<uint8_t> send(12, 1), recv(24, 0);
        comm.all_to_all_v(send.data(), sb, so, recv.data(), rb, ro, nullptr);
      },
      60000);
  const std::string want =
      "fp8flow::Communicator::all_to_all_v: recv_bytes[0]: rank 1 expects 5 bytes from rank 0, "
      "but rank 0 sends 4 bytes to rank 1 (send_bytes[1])";
  EXPECT_EQ(o.rethrown, want);
  for (int r = 0; r < 3; ++r) {  // every rank reaches the same verdict
    EXPECT_EQ(o.kind[r], ErrorKind::Comm);
    EXPECT_TRUE(o.msg[r] == want || has(o.msg[r], "aborted")) << o.msg[r];
  }
}

// Bad local arguments: InvalidArgument naming the op and argument; the other ranks are released.
// Rank 1 of 3 makes a bad Communicator::<op> call while ranks 0 and 2 make a valid one: rank 1
// gets InvalidArgument naming the op and `arg`, the others a Comm error (the communicator aborts).
void expect_bad_call(const std::string& op, const std::function<void(Communicator&)>& bad_call,
                     const std::function<void(Communicator&)>& good_call, const std::string& arg) {
  const auto o = run_collecting(
      3,
      [&](Communicator& comm) {
        if (comm.rank() == 1)
          bad_call(comm);
        else
          good_call(comm);
      },
      60000);
  EXPECT_TRUE(has(o.rethrown, "fp8flow::Communicator::" + op + ": " + arg + ": expected"))
      << arg << " -> " << o.rethrown;
  ASSERT_TRUE(o.is_error[1]);
  EXPECT_EQ(o.kind[1], ErrorKind::InvalidArgument);
  EXPECT_EQ(o.kind[0], ErrorKind::Comm);
  EXPECT_EQ(o.kind[2], ErrorKind::Comm);
}

void expect_bad_args(const std::function<void(Communicator&)>& bad_call, const std::string& arg) {
  expect_bad_call(
      "all_to_all_v", bad_call,
      [](Communicator& comm) {
        std::vector<int64_t> z(3, 0);
        comm.all_to_all_v(nullptr, z, z, nullptr, z, z, nullptr);
      },
      arg);
}

TEST(CommInProcess, BadArguments) {
  uint8_t buf[64] = {};
  const std::vector<int64_t> z3(3, 0), z2(2, 0);
  expect_bad_args([&](Communicator& c) { c.all_to_all_v(buf, z2, z3, buf, z3, z3, nullptr); },
                  "send_bytes");
  expect_bad_args([&](Communicator& c) { c.all_to_all_v(buf, z3, z2, buf, z3, z3, nullptr); },
                  "send_offsets");
  expect_bad_args([&](Communicator& c) { c.all_to_all_v(buf, z3, z3, buf, z2, z3, nullptr); },
                  "recv_bytes");
  expect_bad_args([&](Communicator& c) { c.all_to_all_v(buf, z3, z3, buf, z3, z2, nullptr); },
                  "recv_offsets");
  const std::vector<int64_t> neg{0, -1, 0};
  expect_bad_args([&](Communicator& c) { c.all_to_all_v(buf, neg, z3, buf, z3, z3, nullptr); },
                  "send_bytes[1]");
  expect_bad_args([&](Communicator& c) { c.all_to_all_v(buf, z3, z3, buf, neg, z3, nullptr); },
                  "recv_bytes[1]");
  expect_bad_args([&](Communicator& c) { c.all_to_all_v(buf, z3, neg, buf, z3, z3, nullptr); },
                  "send_offsets[1]");
  const std::vector<int64_t> one{0, 1, 0};
  expect_bad_args([&](Communicator& c) { c.all_to_all_v(nullptr, one, z3, buf, z3, z3, nullptr); },
                  "send");
  expect_bad_args([&](Communicator& c) { c.all_to_all_v(buf, z3, z3, nullptr, one, z3, nullptr); },
                  "recv");
  // Overlapping receive ranges: [0, 8) from rank 0 and [4, 8) from rank 2.
  const std::vector<int64_t> rb{8, 0, 4}, ro{0, 0, 4};
  expect_bad_args([&](Communicator& c) { c.all_to_all_v(buf, z3, z3, buf, rb, ro, nullptr); },
                  "recv_offsets[2]");
}

TEST(CommInProcess, AllGatherCountMismatch) {
  const auto o = run_collecting(
      3,
      [](Communicator& comm) {
        std::vector<int64_t> v(comm.rank() == 2 ? 2 : 1, 7);
        comm.all_gather(v, nullptr);
      },
      60000);
  EXPECT_TRUE(o.rethrown_comm);
  EXPECT_TRUE(has(o.rethrown,
                  "fp8flow::Communicator::all_gather: mine: expected the same count on "
                  "every rank, got 1 on rank 0 and 2 on rank 2"))
      << o.rethrown;
}

TEST(CommInProcess, CollectiveAfterAbortThrowsAtOnce) {
  std::atomic<bool> second_threw{false};
  EXPECT_THROW(run_in_process(2,
                              [&](Communicator& comm) {
                                if (comm.rank() == 0) throw std::runtime_error("x");
                                try {
                                  comm.barrier(nullptr);
                                } catch (const Error&) {
                                }
                                try {
                                  comm.barrier(nullptr);
                                } catch (const Error& e) {
                                  second_threw = e.kind() == ErrorKind::Comm;
                                }
                              }),
               std::runtime_error);
  EXPECT_TRUE(second_threw.load());
}

TEST(CommInProcess, RunInProcessArguments) {
  auto fn = [](Communicator&) {};
  try {
    run_in_process(0, fn);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::InvalidArgument);
    EXPECT_TRUE(has(e.what(), "fp8flow::run_in_process: ranks: expected 1..1024, got 0"))
        << e.what();
  }
  EXPECT_THROW(run_in_process(2, fn, 0), Error);
  EXPECT_THROW(run_in_process(2, {}), Error);
}

TEST(CommInProcess, CheckSameOnAllRanks) {
  // Same values: no error, on 1..5 ranks.
  for (int n = 1; n <= 5; ++n)
    run_in_process(n, [](Communicator& comm) {
      const std::vector<int64_t> cfg{7168, 2048, 256, 8};
      check_same_on_all_ranks(comm, cfg, "MoEConfig");
    });
  // One rank differs in one field.
  auto o = run_collecting(
      4,
      [](Communicator& comm) {
        std::vector<int64_t> cfg{7168, 2048, 256, 8};
        if (comm.rank() == 2) cfg[1] = 1024;
        check_same_on_all_ranks(comm, cfg, "MoEConfig");
      },
      60000);
  const std::string want =
      "fp8flow::check_same_on_all_ranks: MoEConfig[1]: expected the same value on every rank, got "
      "2048 on rank 0 and 1024 on rank 2";
  EXPECT_EQ(o.rethrown, want);
  EXPECT_TRUE(o.rethrown_comm);
  for (int r = 0; r < 4; ++r) EXPECT_EQ(o.msg[r], want) << "rank " << r;  // all ranks, same text
  // Different number of values.
  o = run_collecting(
      3,
      [](Communicator& comm) {
        std::vector<int64_t> cfg(comm.rank() == 1 ? 3 : 4, 1);
        check_same_on_all_ranks(comm, cfg, "MoEConfig");
      },
      60000);
  EXPECT_TRUE(has(o.rethrown,
                  "MoEConfig: expected the same values on every rank, got 4 values on "
                  "rank 0 and 3 on rank 1"))
      << o.rethrown;
}

// ---- all_to_all_segments ------------------------------------------------------------------
// Every ordered pair (src, dst) exchanges a random number of segments (0..3, some of 0 bytes),
// scattered over both buffers in a pair-dependent order; the k-th non-empty send of src to dst
// must land in the k-th non-empty receive of dst from src.
struct SegPlan {
  // seg[src][dst]: sizes of the segments src sends to dst, in order (the same on every rank).
  std::vector<std::vector<std::vector<int64_t>>> seg;
};
SegPlan random_segments(int n, uint32_t seed) {
  std::mt19937 rng(seed);
  SegPlan p;
  p.seg.assign(n, std::vector<std::vector<int64_t>>(n));
  for (auto& row : p.seg)
    for (auto& v : row) {
      const int k = static_cast<int>(rng() % 4);
      for (int i = 0; i < k; ++i) v.push_back(rng() % 5 == 0 ? 0 : 1 + rng() % 300);
    }
  return p;
}

TEST(CommInProcess, AllToAllSegmentsRandom1To6Ranks) {
  for (int n = 1; n <= 6; ++n) {
    for (uint32_t seed = 1; seed <= 4; ++seed) {
      SCOPED_TRACE(::testing::Message() << n << " ranks, seed " << seed);
      const SegPlan p = random_segments(n, seed * 31 + n);
      run_in_process(n, [&](Communicator& comm) {
        const int me = comm.rank();
        // Send buffer: segments to peers in reverse peer order, gaps of 3 bytes; the bytes of a
        // segment encode (me, dst, segment index, position).
        std::vector<uint8_t> send(1, 0), recv(1, 0);
        auto fill = [](int src, int dst, size_t k, int64_t b) {
          return static_cast<uint8_t>(pattern(src, dst, b) + 13 * static_cast<int>(k));
        };
        std::vector<CommSegment> sends, recvs;
        std::vector<std::pair<size_t, int64_t>> send_at;  // (offset, bytes) per send
        int64_t total = 0;
        for (int dst = n - 1; dst >= 0; --dst)
          for (int64_t b : p.seg[me][dst]) {
            send_at.push_back({static_cast<size_t>(total), b});
            total += b + 3;
          }
        send.assign(static_cast<size_t>(total) + 1, 0xEE);
        size_t i = 0;
        for (int dst = n - 1; dst >= 0; --dst)
          for (size_t k = 0; k < p.seg[me][dst].size(); ++k, ++i) {
            const auto [off, b] = send_at[i];
            for (int64_t x = 0; x < b; ++x) send[off + x] = fill(me, dst, k, x);
            sends.push_back({dst, send.data() + off, b});
          }
        // Receive buffer: from peers in ascending order, gaps of 5 bytes.
        int64_t rtotal = 0;
        for (int src = 0; src < n; ++src)
          for (int64_t b : p.seg[src][me]) rtotal += b + 5;
        recv.assign(static_cast<size_t>(rtotal) + 1, 0xEE);
        int64_t at = 0;
        for (int src = 0; src < n; ++src)
          for (int64_t b : p.seg[src][me]) {
            recvs.push_back({src, recv.data() + at, b});
            at += b + 5;
          }
        comm.all_to_all_segments(sends, recvs, nullptr);
        at = 0;
        for (int src = 0; src < n; ++src)
          for (size_t k = 0; k < p.seg[src][me].size(); ++k) {
            const int64_t b = p.seg[src][me][k];
            for (int64_t x = 0; x < b; ++x)
              ASSERT_EQ(recv[at + x], fill(src, me, k, x)) << src << " seg " << k << " byte " << x;
            for (int64_t x = b; x < b + 5; ++x) ASSERT_EQ(recv[at + x], 0xEE) << "gap touched";
            at += b + 5;
          }
      });
    }
  }
}

TEST(CommInProcess, AllToAllSegmentsEmpty) {
  run_in_process(3, [&](Communicator& comm) {
    comm.all_to_all_segments({}, {}, nullptr);
    // Zero-byte segments with null data are ignored (and need no partner).
    const std::vector<CommSegment> z{{(comm.rank() + 1) % 3, nullptr, 0}};
    comm.all_to_all_segments(z, {}, nullptr);
    comm.all_to_all_segments({}, z, nullptr);
  });
}

TEST(CommInProcess, AllToAllSegmentsMismatchNamesBothRanks) {
  // Rank 0 sends 4 then 6 bytes to rank 1; rank 1 expects 4 then 7.
  const auto o = run_collecting(
      3,
      [](Communicator& comm) {
        std::vector<uint8_t> buf(64, 1);
        std::vector<CommSegment> sends, recvs;
        if (comm.rank() == 0) sends = {{1, buf.data(), 4}, {1, buf.data() + 8, 6}};
        if (comm.rank() == 1) recvs = {{0, buf.data(), 4}, {0, buf.data() + 8, 7}};
        comm.all_to_all_segments(sends, recvs, nullptr);
      },
      60000);
  const std::string want =
      "fp8flow::Communicator::all_to_all_segments: recvs: rank 1 expects 7 bytes in its transfer "
      "#1 from rank 0, but rank 0 sends 6 bytes (2 sends vs 2 receives)";
  EXPECT_EQ(o.rethrown, want);
  for (int r = 0; r < 3; ++r) EXPECT_EQ(o.kind[r], ErrorKind::Comm) << o.msg[r];
  // A missing receive.
  const auto o2 = run_collecting(
      2,
      [](Communicator& comm) {
        std::vector<uint8_t> buf(64, 1);
        std::vector<CommSegment> sends;
        if (comm.rank() == 1) sends = {{0, buf.data(), 4}};
        comm.all_to_all_segments(sends, {}, nullptr);
      },
      60000);
  EXPECT_TRUE(has(o2.rethrown,
                  "rank 0 expects nothing in its transfer #0 from rank 1, but rank 1 "
                  "sends 4 bytes (1 sends vs 0 receives)"))
      << o2.rethrown;
}

void expect_bad_segments(const std::function<void(Communicator&)>& bad_call,
                         const std::string& arg) {
  expect_bad_call(
      "all_to_all_segments", bad_call,
      [](Communicator& comm) { comm.all_to_all_segments({}, {}, nullptr); }, arg);
}

TEST(CommInProcess, AllToAllSegmentsBadArguments) {
  uint8_t buf[64] = {};
  using V = std::vector<CommSegment>;
  expect_bad_segments(
      [&](Communicator& c) {
        c.all_to_all_segments(V{{3, buf, 1}}, {}, nullptr);
      },
      "sends[0].peer");
  expect_bad_segments(
      [&](Communicator& c) {
        c.all_to_all_segments({}, V{{0, buf, 1}, {-1, buf, 1}}, nullptr);
      },
      "recvs[1].peer");
  expect_bad_segments(
      [&](Communicator& c) {
        c.all_to_all_segments(V{{0, buf, -2}}, {}, nullptr);
      },
      "sends[0].bytes");
  expect_bad_segments(
      [&](Communicator& c) {
        c.all_to_all_segments({}, V{{0, nullptr, 4}}, nullptr);
      },
      "recvs[0].data");
  expect_bad_segments(
      [&](Communicator& c) {
        c.all_to_all_segments({}, V{{0, buf + 8, 8}, {2, buf + 20, 4}, {1, buf, 9}}, nullptr);
      },
      "recvs[0].data");
}

}  // namespace
}  // namespace fp8flow
