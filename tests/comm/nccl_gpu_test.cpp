// NCCL communicator. On the CPU: the stubs of a build without NCCL/MPI, and argument checks that
// run before any NCCL call. On >= 2 GPUs (one thread per GPU, one communicator each, made from a
// shared unique id): all_to_all_v with random counts (zeros included) against the expected bytes,
// all_gather/barrier, bad arguments, and the fault paths (a peer that never calls a collective or
// never joins: the waiting rank throws ErrorKind::Comm within the timeout plus slack, no hang).
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <exception>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "common/nccl_test_util.h"
#include "fp8flow/comm.h"

#if FP8FLOW_WITH_CUDA
#include <cuda_runtime_api.h>
#if __has_include(<nccl.h>)
#include <nccl.h>
#define FP8FLOW_TEST_HAS_NCCL_H 1
#endif
#endif

namespace fp8flow {
namespace {

using Clock = std::chrono::steady_clock;

bool has(const std::string& s, const std::string& sub) {
  return s.find(sub) != std::string::npos;
}

template <typename F>
Error catch_error(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e;
  }
  return Error(ErrorKind::InvalidArgument, "<no error thrown>");
}

TEST(CommNccl, StubsOrArgumentChecks) {
  if (!built_with_nccl()) {
    EXPECT_EQ(catch_error([] { nccl_unique_id(); }).kind(), ErrorKind::Unsupported);
    const Error e = catch_error([] { make_nccl_communicator(NcclUniqueIdBytes{}, 0, 2); });
    EXPECT_EQ(e.kind(), ErrorKind::Unsupported);
    EXPECT_TRUE(has(e.what(), "fp8flow::make_nccl_communicator: fp8flow was built without NCCL"))
        << e.what();
    EXPECT_EQ(catch_error([] { wrap_nccl_communicator(nullptr); }).kind(), ErrorKind::Unsupported);
  } else {
    // Checked before NCCL is touched (no GPU needed).
    Error e = catch_error([] { make_nccl_communicator(NcclUniqueIdBytes{}, 2, 2); });
    EXPECT_EQ(e.kind(), ErrorKind::InvalidArgument);
    EXPECT_TRUE(has(e.what(), "fp8flow::make_nccl_communicator: rank: expected 0..1, got 2"))
        << e.what();
    e = catch_error([] { make_nccl_communicator(NcclUniqueIdBytes{}, 0, 0); });
    EXPECT_TRUE(has(e.what(), "fp8flow::make_nccl_communicator: size: expected >= 1, got 0"))
        << e.what();
    e = catch_error([] { make_nccl_communicator(NcclUniqueIdBytes{}, 0, 2, 0); });
    EXPECT_TRUE(has(e.what(), "timeout_ms: expected > 0, got 0")) << e.what();
    e = catch_error([] { wrap_nccl_communicator(nullptr); });
    EXPECT_TRUE(has(e.what(), "fp8flow::wrap_nccl_communicator: nccl_comm: expected an ncclComm_t"))
        << e.what();
  }
  if (!built_with_mpi()) {
    const Error e = catch_error([] { make_nccl_communicator_mpi(); });
    EXPECT_EQ(e.kind(), ErrorKind::Unsupported);
    EXPECT_TRUE(has(e.what(), "fp8flow::make_nccl_communicator_mpi: fp8flow was built without MPI"))
        << e.what();
  } else {
    EXPECT_EQ(catch_error([] { make_nccl_communicator_mpi(0); }).kind(),
              ErrorKind::InvalidArgument);
  }
}

#if FP8FLOW_WITH_CUDA

int gpu_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
  return n;
}

#define FP8FLOW_REQUIRE_NCCL_GPUS(n)                                                     \
  do {                                                                                   \
    if (!built_with_nccl()) GTEST_SKIP() << "built without NCCL: NCCL GPU test skipped"; \
    if (gpu_count() < (n))                                                               \
      GTEST_SKIP() << "needs " << (n) << " CUDA devices, " << gpu_count()                \
                   << " visible: NCCL GPU test skipped";                                 \
  } while (0)

using test::run_on_gpus;

std::string what_of(const std::exception_ptr& e) {
  if (!e) return "";
  try {
    std::rethrow_exception(e);
  } catch (const std::exception& x) {
    return x.what();
  } catch (...) {
    return "non-std exception";
  }
}

uint8_t pattern(int src, int dst, int64_t k) {
  return static_cast<uint8_t>((src * 37 + dst * 11 + k * 7 + (k >> 8) * 3) & 0xFF);
}

#define CUDA_OK(x) ASSERT_EQ((x), cudaSuccess) << #x

void exchange_and_check(int me, Communicator& comm, const std::vector<std::vector<int64_t>>& c,
                        cudaStream_t stream) {
  const int n = comm.size();
  std::vector<int64_t> sb(n), so(n), rb(n), ro(n);
  int64_t st = 0, rt = 0;
  for (int j = 0; j < n; ++j) {
    sb[j] = c[me][j];
    rb[j] = c[j][me];
    so[j] = st;
    ro[j] = rt;
    st += sb[j] + 16;  // gaps exercise the offsets
    rt += rb[j] + 32;
  }
  std::vector<uint8_t> hs(st + 1, 0xEE), want(rt + 1, 0xCD), got(rt + 1);
  for (int j = 0; j < n; ++j) {
    for (int64_t k = 0; k < sb[j]; ++k) hs[so[j] + k] = pattern(me, j, k);
    for (int64_t k = 0; k < rb[j]; ++k) want[ro[j] + k] = pattern(j, me, k);
  }
  void *ds = nullptr, *dr = nullptr;
  CUDA_OK(cudaMalloc(&ds, hs.size()));
  CUDA_OK(cudaMalloc(&dr, want.size()));
  CUDA_OK(cudaMemcpy(ds, hs.data(), hs.size(), cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemset(dr, 0xCD, want.size()));
  comm.all_to_all_v(ds, sb, so, dr, rb, ro, reinterpret_cast<Stream>(stream));
  CUDA_OK(cudaStreamSynchronize(stream));
  CUDA_OK(cudaMemcpy(got.data(), dr, got.size(), cudaMemcpyDeviceToHost));
  cudaFree(ds);
  cudaFree(dr);
  ASSERT_TRUE(got == want) << "rank " << me << " of " << n << ": received bytes differ";
}

TEST(CommNcclGpu, AllToAllVRandomCounts) {
  FP8FLOW_REQUIRE_NCCL_GPUS(2);
  std::vector<int> sizes{2};
  if (gpu_count() >= 3) sizes.push_back(3);
  if (gpu_count() >= 4) sizes.push_back(gpu_count());
  for (int n : sizes) {
    // The same counts on every rank (seeded): ~30% zeros, odd sizes up to ~3 MB.
    std::vector<std::vector<std::vector<int64_t>>> rounds;
    std::mt19937 rng(1234 + n);
    for (int round = 0; round < 4; ++round) {
      std::vector<std::vector<int64_t>> c(n, std::vector<int64_t>(n));
      for (auto& row : c)
        for (auto& v : row) v = rng() % 10 < 3 ? 0 : 1 + rng() % (round == 0 ? 100 : (3 << 20));
      rounds.push_back(c);
    }
    auto errors = run_on_gpus(n, 60000, [&](int r, Communicator& comm) {
      EXPECT_EQ(comm.rank(), r);
      EXPECT_EQ(comm.size(), n);
      EXPECT_EQ(comm.device(), Device::Cuda);
      EXPECT_STREQ(comm.backend(), "nccl");
      cudaStream_t s;
      ASSERT_EQ(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), cudaSuccess);
      for (const auto& c : rounds) exchange_and_check(r, comm, c, s);
      // all_gather / barrier / check_same_on_all_ranks on the same stream.
      const std::vector<int64_t> mine{r, 10 * r, -1};
      const auto all = comm.all_gather(mine, reinterpret_cast<Stream>(s));
      ASSERT_EQ(all.size(), 3u * n);
      for (int j = 0; j < n; ++j) {
        EXPECT_EQ(all[3 * j], j);
        EXPECT_EQ(all[3 * j + 1], 10 * j);
        EXPECT_EQ(all[3 * j + 2], -1);
      }
      comm.barrier(reinterpret_cast<Stream>(s));
      const std::vector<int64_t> cfg{7168, 256, 8};
      check_same_on_all_ranks(comm, cfg, "cfg", reinterpret_cast<Stream>(s));
      cudaStreamDestroy(s);
    });
    for (int r = 0; r < n; ++r)
      EXPECT_FALSE(errors[r]) << "rank " << r << ": " << what_of(errors[r]);
  }
}

TEST(CommNcclGpu, MismatchedConfigAndBadArguments) {
  FP8FLOW_REQUIRE_NCCL_GPUS(2);
  std::vector<std::string> msgs(2);
  auto errors = run_on_gpus(2, 30000, [&](int r, Communicator& comm) {
    const std::vector<int64_t> cfg{7168, r == 1 ? 512 : 256};
    try {
      check_same_on_all_ranks(comm, cfg, "MoEConfig");
    } catch (const Error& e) {
      msgs[r] = e.what();
    }
    // Local argument errors: InvalidArgument before anything is enqueued.
    const std::vector<int64_t> three(3, 0), two(2, 0);
    const Error e =
        catch_error([&] { comm.all_to_all_v(nullptr, three, two, nullptr, two, two, {}); });
    EXPECT_EQ(e.kind(), ErrorKind::InvalidArgument);
    EXPECT_TRUE(
        has(e.what(), "fp8flow::Communicator::all_to_all_v: send_bytes: expected 2 entries"))
        << e.what();
    comm.barrier(nullptr);  // still usable
  });
  for (int r = 0; r < 2; ++r) {
    EXPECT_FALSE(errors[r]) << what_of(errors[r]);
    EXPECT_EQ(msgs[r],
              "fp8flow::check_same_on_all_ranks: MoEConfig[1]: expected the same value on every "
              "rank, got 256 on rank 0 and 512 on rank 1");
  }
}

// Rank 1 never posts its half of the exchange: rank 0 must get a Comm error within the timeout
// plus slack (from all_to_all_v itself, or from the all_gather that follows it), not hang.
TEST(CommNcclGpu, PeerThatNeverCallsTimesOut) {
  FP8FLOW_REQUIRE_NCCL_GPUS(2);
  const int64_t timeout_ms = 3000;
  std::atomic<bool> rank0_done{false};
  double elapsed_ms = -1;
  std::string msg;
  ErrorKind kind = ErrorKind::InvalidArgument;
  auto errors = run_on_gpus(2, timeout_ms, [&](int r, Communicator& comm) {
    comm.barrier(nullptr);  // both up
    if (r == 1) {
      while (!rank0_done) std::this_thread::sleep_for(std::chrono::milliseconds(10));
      return;
    }
    void* buf = nullptr;
    ASSERT_EQ(cudaMalloc(&buf, 2 << 20), cudaSuccess);
    const std::vector<int64_t> bytes{0, 1 << 20}, offs{0, 1 << 20};
    const auto start = Clock::now();
    try {
      comm.all_to_all_v(buf, bytes, offs, buf, bytes, std::vector<int64_t>{0, 0}, nullptr);
      comm.all_gather({}, nullptr);
    } catch (const Error& e) {
      msg = e.what();
      kind = e.kind();
    }
    elapsed_ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
    rank0_done = true;
    cudaDeviceSynchronize();  // the aborted kernels have exited
    cudaFree(buf);
  });
  EXPECT_EQ(kind, ErrorKind::Comm) << msg;
  EXPECT_TRUE(has(msg, "timeout")) << msg;
  EXPECT_TRUE(has(msg, "rank 0 of 2")) << msg;
  EXPECT_GE(elapsed_ms, 0.9 * timeout_ms) << msg;
  EXPECT_LT(elapsed_ms, timeout_ms + 5000) << msg;
  std::printf("rank 0 failed after %.0f ms (timeout %lld ms): %s\n", elapsed_ms,
              static_cast<long long>(timeout_ms), msg.c_str());
  EXPECT_FALSE(errors[0]) << what_of(errors[0]);
  EXPECT_FALSE(errors[1]) << what_of(errors[1]);
}

// The connections are warm (one exchange done), then rank 1 skips the next one: rank 0's
// all_to_all_v is enqueued and its kernel waits forever on the GPU. The watchdog must abort the
// communicator after the timeout, which releases rank 0 even from a plain cudaStreamSynchronize;
// the next call throws a Comm error saying so.
TEST(CommNcclGpu, StuckKernelIsAbortedByTheWatchdog) {
  FP8FLOW_REQUIRE_NCCL_GPUS(2);
  const int64_t timeout_ms = 3000;
  std::atomic<bool> rank0_done{false};
  double sync_ms = -1;
  std::string msg;
  ErrorKind kind = ErrorKind::InvalidArgument;
  auto errors = run_on_gpus(2, timeout_ms, [&](int r, Communicator& comm) {
    void* buf = nullptr;
    ASSERT_EQ(cudaMalloc(&buf, 4 << 20), cudaSuccess);
    cudaStream_t s;
    ASSERT_EQ(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), cudaSuccess);
    const auto st = reinterpret_cast<Stream>(s);
    const std::vector<int64_t> bytes{1 << 20, 1 << 20}, offs{0, 1 << 20};
    uint8_t* b = static_cast<uint8_t*>(buf);  // send: first 2 MiB, receive: the next 2 MiB
    uint8_t* rb = b + (2 << 20);
    comm.all_to_all_v(b, bytes, offs, rb, bytes, offs, st);  // warm-up: both ranks
    comm.barrier(st);
    if (r == 1) {
      while (!rank0_done) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    } else {
      const auto start = Clock::now();
      try {
        comm.all_to_all_v(b, bytes, offs, rb, bytes, offs, st);  // rank 1 never posts its half
        EXPECT_EQ(cudaStreamSynchronize(s), cudaSuccess);        // returns once the watchdog aborts
        sync_ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
        comm.barrier(st);
      } catch (const Error& e) {
        msg = e.what();
        kind = e.kind();
      }
      rank0_done = true;
    }
    cudaStreamDestroy(s);
    cudaFree(buf);
  });
  EXPECT_EQ(kind, ErrorKind::Comm) << msg;
  EXPECT_TRUE(has(msg, "watchdog") || has(msg, "timeout")) << msg;
  EXPECT_TRUE(has(msg, "aborted")) << msg;
  std::printf("cudaStreamSynchronize returned after %.0f ms (timeout %lld ms); then: %s\n", sync_ms,
              static_cast<long long>(timeout_ms), msg.c_str());
  if (sync_ms >= 0) {
    EXPECT_GE(sync_ms, 0.9 * timeout_ms);
    EXPECT_LT(sync_ms, timeout_ms + 5000);
  }
  EXPECT_FALSE(errors[0]) << what_of(errors[0]);
  EXPECT_FALSE(errors[1]) << what_of(errors[1]);
}

// Rank 1 never joins: make_nccl_communicator on rank 0 throws within the timeout plus slack.
TEST(CommNcclGpu, RankThatNeverJoinsTimesOut) {
  FP8FLOW_REQUIRE_NCCL_GPUS(2);
  const int64_t timeout_ms = 2000;
  const NcclUniqueIdBytes id = nccl_unique_id();
  ASSERT_EQ(cudaSetDevice(0), cudaSuccess);
  const auto start = Clock::now();
  const Error e = catch_error([&] { make_nccl_communicator(id, 0, 2, timeout_ms); });
  const double ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
  EXPECT_EQ(e.kind(), ErrorKind::Comm) << e.what();
  EXPECT_TRUE(has(e.what(), "fp8flow::make_nccl_communicator: rank 0 of 2")) << e.what();
  EXPECT_TRUE(has(e.what(), "timeout")) << e.what();
  EXPECT_LT(ms, timeout_ms + 5000);
  std::printf("make_nccl_communicator failed after %.0f ms: %s\n", ms, e.what());
}

#if FP8FLOW_TEST_HAS_NCCL_H
// A communicator the caller made (as PyTorch does), wrapped: not owned, same results.
TEST(CommNcclGpu, WrapExistingCommunicator) {
  FP8FLOW_REQUIRE_NCCL_GPUS(2);
  const int n = 2;
  std::vector<ncclComm_t> raw(n);
  int devs[2] = {0, 1};
  ASSERT_EQ(ncclCommInitAll(raw.data(), n, devs), ncclSuccess);
  std::vector<std::exception_ptr> errors(n);
  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r)
    threads.emplace_back([&, r] {
      try {
        cudaSetDevice(r);
        auto comm = wrap_nccl_communicator(raw[r], 30000);
        EXPECT_EQ(comm->rank(), r);
        EXPECT_EQ(comm->size(), n);
        cudaStream_t s;
        cudaStreamCreate(&s);
        exchange_and_check(r, *comm, {{5, 1000}, {77, 0}}, s);
        cudaStreamDestroy(s);
      } catch (...) {
        errors[r] = std::current_exception();
      }
    });
  for (auto& t : threads) t.join();
  for (int r = 0; r < n; ++r) EXPECT_FALSE(errors[r]) << what_of(errors[r]);
  for (auto c : raw) EXPECT_EQ(ncclCommDestroy(c), ncclSuccess);  // still ours to destroy
}
#endif

#else
TEST(CommNcclGpu, SkippedInCpuOnlyBuild) {
  GTEST_SKIP() << "CPU-only build: NCCL tests skipped";
}
#endif

}  // namespace
}  // namespace fp8flow
