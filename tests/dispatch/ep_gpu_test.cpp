// GPU tests of the dispatch ops and the expert-parallel layer.
// - DispatchGpu.KernelsMatchCpu (1 GPU): pack, unpack and the row maps on the device against the
//   CPU reference, bit for bit (FP8 / MXFP4 / BF16 / prob-only records, pad rows, gaps).
// - EpLayerGpu.MatchesSingleGpu (>= 2 GPUs, NCCL): one process, one thread per GPU, NCCL
//   communicators from one unique id; the EP layer on 2 (and 4 when present) GPUs against the
//   comm-less layer on GPU 0 over the concatenated tokens: y, dx and each rank's dW1/dW2 slice bit
//   for bit for bf16, fp8-blockwise and fp8-flow; fp8-flow-mxfp4 against the 1-rank EP layer.
//   dgate: sum over ranks vs the single-GPU one (FP32 order).
// - DispatchGpu.PipelinedChunksMatchCpu (>= 1 GPU, NCCL): chunked dispatch / combine on
//   min(GPUs, 4) ranks, every chunk count against chunks = 1, and that against InProcess ranks.
// - DispatchGpu.InPlaceMatchesCpu (>= 1 GPU, NCCL): in-place dispatch / combine
//   (DispatchOptions::in_place = On) through NCCL against the record path on InProcess ranks.
// All skip with a printed reason where the hardware is missing.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <random>
#include <thread>
#include <vector>

#include "common/nccl_test_util.h"
#include "common/test_data.h"
#include "common/test_util.h"
#include "dispatch/ep_test_util.h"
#include "fp8flow/comm.h"
#include "fp8flow/dispatch.h"
#include "fp8flow/moe.h"
#include "fp8flow/permute.h"
#include "permute/permute_test_util.h"

namespace fp8flow::test {
namespace {

#if FP8FLOW_WITH_CUDA

using namespace eptest;

int gpu_count() {
  int n = 0;
  if (!cuda_available() || cudaGetDeviceCount(&n) != cudaSuccess) return 0;
  return n;
}

// Runs body(comm, q) on N threads, thread q on GPU q with rank q of one NCCL communicator of N
// ranks (default timeout); then back on GPU 0, rethrows the lowest rank's exception, if any.
template <typename F>
void on_nccl_ranks(int N, F&& body) {
  const std::vector<std::exception_ptr> errs =
      run_on_gpus(N, 120000, [&](int q, Communicator& comm) { body(comm, q); });
  cudaSetDevice(0);
  for (auto& e : errs)
    if (e) std::rethrow_exception(e);
}

TEST(DispatchGpu, KernelsMatchCpu) {
  FP8FLOW_REQUIRE_GPU();
  // Layout of rank 1 of 3 with empty experts and a rank sending nothing.
  const int N = 3;
  const int64_t E = 6;
  std::vector<int64_t> cnt = {5, 0, 7, 1, 0, 3, 0, 0, 0, 0, 0, 0, 2, 9, 0, 40, 1, 0};
  const DispatchLayout l = make_dispatch_layout(cnt, N, 1, E, 16);
  HostTensor p2r(DType::I32, 1, l.padded_rows + 7), r2p(DType::I32, 1, l.recv_total);
  make_dispatch_maps(l, {}, p2r.v, r2p.v);
  DeviceTensor table(DType::I64, 1, static_cast<int64_t>(l.table.size()));
  DeviceTensor dp2r(DType::I32, 1, l.padded_rows + 7), dr2p(DType::I32, 1, l.recv_total);
  make_dispatch_maps(l, table.v, dp2r.v, dr2p.v);
  EXPECT_TRUE(bytes_equal(dp2r.to_host(), p2r));
  EXPECT_TRUE(bytes_equal(dr2p.to_host(), r2p));

  for (DType dd : {DType::E4M3, DType::E2M1x2, DType::BF16, DType::F32}) {
    for (bool prob : {true, false}) {
      SCOPED_TRACE(::testing::Message() << to_string(dd) << (prob ? " + prob" : ""));
      const int64_t T = 77, k = 3, H = dd == DType::E2M1x2 ? 640 : 656, n = 150;  // 6 tiles
      const DispatchWire w = dispatch_wire(dd, H, prob);
      HostTensor x = random_bytes(dd, T, H, 1);
      HostTensor sc = dd == DType::E4M3     ? random_pow2_scales((H + 127) / 128, T, 2, 0.1)
                      : dd == DType::E2M1x2 ? random_bytes(DType::E8M0, T, H / 32, 2)
                                            : HostTensor();
      HostTensor pr = random_bytes(DType::F32, T, k, 3);
      HostTensor map(DType::I32, 1, n);
      std::mt19937 rng(4);
      for (int64_t i = 0; i < n; ++i)
        map.ptr<int32_t>()[i] = i % 17 == 5 ? -1 : static_cast<int32_t>(rng() % (T * k));
      HostTensor wire(DType::E4M3, n, w.row_bytes);
      dispatch_pack({x.v, sc.v, prob ? pr.v : TensorView{}}, map.v, static_cast<int>(k), wire.v);
      DeviceTensor dx(x), dpr(pr), dmap(map), dwire(DType::E4M3, n, w.row_bytes);
      DeviceTensor dsc = sc.buf.empty() ? DeviceTensor() : DeviceTensor(sc);
      dispatch_pack({dx.v, dsc.v, prob ? dpr.v : TensorView{}}, dmap.v, static_cast<int>(k),
                    dwire.v);
      EXPECT_TRUE(bytes_equal(dwire.to_host(), wire)) << "pack";
      // Unpack with a map that has pad rows and out-of-range entries.
      const int64_t R = 190;
      HostTensor umap(DType::I32, 1, R);
      for (int64_t r = 0; r < R; ++r)
        umap.ptr<int32_t>()[r] = r % 11 == 3 ? -1 : static_cast<int32_t>((r * 7) % (n + 4));
      HostTensor ox(dd, R, H), op(DType::F32, 1, R);
      HostTensor os = dd == DType::E4M3     ? HostTensor(DType::F32, (H + 127) / 128, R)
                      : dd == DType::E2M1x2 ? HostTensor(DType::E8M0, R, H / 32)
                                            : HostTensor();
      dispatch_unpack(wire.v, umap.v, {ox.v, os.v, prob ? op.v : TensorView{}});
      DeviceTensor dumap(umap), dox(dd, R, H), dop(DType::F32, 1, R);
      DeviceTensor dos =
          os.buf.empty() ? DeviceTensor() : DeviceTensor(os.v.dtype, os.v.rows, os.v.cols);
      dispatch_unpack(dwire.v, dumap.v, {dox.v, dos.v, prob ? dop.v : TensorView{}});
      EXPECT_TRUE(bytes_equal(dox.to_host(), ox)) << "unpack data";
      if (!os.buf.empty()) EXPECT_TRUE(bytes_equal(dos.to_host(), os)) << "unpack scales";
      if (prob) EXPECT_TRUE(bytes_equal(dop.to_host(), op)) << "unpack prob";
    }
  }
  // Prob-only records.
  HostTensor dp = random_bytes(DType::F32, 1, 50, 9), map(DType::I32, 1, 40);
  for (int i = 0; i < 40; ++i) map.ptr<int32_t>()[i] = (i * 13) % 50;
  HostTensor wire(DType::E4M3, 40, 4);
  dispatch_pack({{}, {}, dp.v}, map.v, 1, wire.v);
  DeviceTensor ddp(dp), dmap(map), dwire(DType::E4M3, 40, 4);
  dispatch_pack({{}, {}, ddp.v}, dmap.v, 1, dwire.v);
  EXPECT_TRUE(bytes_equal(dwire.to_host(), wire));
}

// ---------------------------------------------------------------------------------------------
// Pipelined dispatch / combine (DispatchOptions::chunks) through NCCL on min(GPUs, 4) ranks (one
// thread per GPU; 1 GPU: a 1-rank communicator, sends to itself): chunks 0 (auto), 3, 4 and 7 give
// the bytes of chunks 1, and chunks 1 gives the bytes of the same ranks on InProcess (CPU).

struct PipeGpuOut {
  HostTensor xp, sc, prob, y;
};

// Rank q's part (inputs seeded by q): dispatch of E4M3 / BF16 / E2M1x2 rows (+ prob for the first
// two) and a BF16 combine back, with tensors on `dev`.
PipeGpuOut pipe_rank(Communicator& comm, Device dev, DType dd, int chunks,
                     InPlace in_place = InPlace::Auto, bool dedup = false) {
  const int q = comm.rank(), N = comm.size();
  const int64_t T = q == 1 ? 1 : 300 + 37 * q, k = 4, El = 5, E = El * N;
  const int64_t H = dd == DType::BF16 ? 520 : 640, tiles = (H + 127) / 128;
  const bool prob = dd != DType::E2M1x2;
  std::mt19937 rng(100 + q);
  std::vector<int32_t> idx(T * k);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < k; ++j) {
      int32_t e;
      bool dup;
      do {
        // Skewed: rank 0's experts are rare, the last rank's first expert common.
        e = static_cast<int32_t>(rng() % 3 == 0 ? (N - 1) * El : rng() % E);
        dup = false;
        for (int64_t i = 0; i < j; ++i) dup |= idx[t * k + i] == e;
      } while (dup);
      idx[t * k + j] = e;
    }
  std::vector<int64_t> mine(E, 0);
  for (int32_t e : idx) ++mine[e];
  HostTensor smap(DType::I32, 1, T * k + 1);
  int64_t n = 0;
  for (int64_t e = 0; e < E; ++e)
    for (int64_t i = 0; i < T * k; ++i)
      if (idx[i] == e) smap.ptr<int32_t>()[n++] = static_cast<int32_t>(i);
  const DispatchLayout l = exchange_dispatch_counts(comm, mine, E, 16);
  HostTensor p2r(DType::I32, 1, l.padded_rows + 3), r2p(DType::I32, 1, l.recv_total + 1);
  make_dispatch_maps(l, {}, p2r.v, r2p.v);
  const int64_t M = l.padded_rows + 3;
  HostTensor x = random_bytes(dd, T, H, 10 * q + 1);
  HostTensor sc = dd == DType::E4M3     ? random_pow2_scales(tiles, T, 10 * q + 2, 0.1)
                  : dd == DType::E2M1x2 ? random_bytes(DType::E8M0, T, H / 32, 10 * q + 2)
                                        : HostTensor();
  HostTensor w = random_bytes(DType::F32, T, k, 10 * q + 3);
  HostTensor yp = random_bytes(DType::BF16, M, 256, 10 * q + 4);
  const int64_t B = dispatch_wire(dd, H, prob).row_bytes;
  const DispatchOptions opts{chunks, in_place};
  PipeGpuOut o;
  auto out_scale = [&] {
    return dd == DType::E4M3     ? HostTensor(DType::F32, tiles, M)
           : dd == DType::E2M1x2 ? HostTensor(DType::E8M0, M, H / 32)
                                 : HostTensor();
  };
  if (dev == Device::Cpu) {
    o.xp = HostTensor(dd, M, H);
    o.sc = out_scale();
    o.prob = HostTensor(DType::F32, 1, M);
    o.y = HostTensor(DType::BF16, l.send_total, 256);
    HostTensor send(DType::E4M3, l.send_total + 1, B), recv(DType::E4M3, l.recv_total + 1, B);
    HostTensor csend(DType::E4M3, l.recv_total + 1, 512);
    dispatch(comm, l, {x.v, sc.v, prob ? w.v : TensorView{}}, smap.v, static_cast<int>(k), p2r.v,
             {o.xp.v, o.sc.v, prob ? o.prob.v : TensorView{}},
             {send.buf.data(), send.buf.size(), recv.buf.data(), recv.buf.size()}, nullptr, opts);
    combine(comm, l, {yp.v, {}, {}}, r2p.v, o.y.v, {csend.buf.data(), csend.buf.size(), nullptr, 0},
            nullptr, opts);
    return o;
  }
  cudaStream_t st = nullptr;
  EXPECT_EQ(cudaStreamCreate(&st), cudaSuccess);
  const Stream stream = reinterpret_cast<Stream>(st);
  DeviceTensor dx(x), dw(w), dsmap(smap), dp2r(p2r), dr2p(r2p), dyp(yp);
  DeviceTensor dsc = sc.buf.empty() ? DeviceTensor() : DeviceTensor(sc);
  HostTensor osc = out_scale();
  DeviceTensor dxp(dd, M, H), dprob(DType::F32, 1, M), dy(DType::BF16, l.send_total, 256);
  DeviceTensor dosc =
      osc.buf.empty() ? DeviceTensor() : DeviceTensor(osc.v.dtype, osc.v.rows, osc.v.cols);
  DeviceTensor send(DType::E4M3, l.send_total + 1, B), recv(DType::E4M3, l.recv_total + 1, B);
  DeviceTensor csend(DType::E4M3, l.recv_total + 1, 512);
  if (dedup) {  // one record per (token, rank), expanded on the destination
    const DedupPlan plan = exchange_dedup_plan(comm, l, idx, static_cast<int>(k), stream);
    const int64_t Bd = dispatch_dedup_wire(dd, H, static_cast<int>(k)).row_bytes;
    DeviceTensor ds(DType::E4M3, plan.send_total + 1, Bd), dr(DType::E4M3, plan.recv_total + 1, Bd);
    DeviceTensor pdev(DType::I32, 1, plan.device_words() + 1), map(DType::I32, 1, M);
    upload_dedup_plan(plan, pdev.v, stream);
    dispatch_dedup(comm, l, plan, {dx.v, dsc.v, prob ? dw.v : TensorView{}}, pdev.v, map.v,
                   {dxp.v, dosc.v, prob ? dprob.v : TensorView{}},
                   {ds.v.data, ds.n, dr.v.data, dr.n}, stream);
    EXPECT_EQ(cudaStreamSynchronize(st), cudaSuccess);  // before the scratch tensors go
  } else {
    dispatch(comm, l, {dx.v, dsc.v, prob ? dw.v : TensorView{}}, dsmap.v, static_cast<int>(k),
             dp2r.v, {dxp.v, dosc.v, prob ? dprob.v : TensorView{}},
             {send.v.data, send.n, recv.v.data, recv.n}, stream, opts);
  }
  combine(comm, l, {dyp.v, {}, {}}, dr2p.v, dy.v, {csend.v.data, csend.n, nullptr, 0}, stream,
          opts);
  EXPECT_EQ(cudaStreamSynchronize(st), cudaSuccess);
  cudaStreamDestroy(st);
  o.xp = dxp.to_host();
  if (!osc.buf.empty()) o.sc = dosc.to_host();
  o.prob = prob ? dprob.to_host() : HostTensor(DType::F32, 1, M);
  o.y = dy.to_host();
  return o;
}

std::vector<PipeGpuOut> pipe_nccl(int N, DType dd, int chunks, InPlace in_place = InPlace::Auto,
                                  bool dedup = false) {
  std::vector<PipeGpuOut> outs(N);
  on_nccl_ranks(N, [&](Communicator& comm, int q) {
    outs[q] = pipe_rank(comm, Device::Cuda, dd, chunks, in_place, dedup);
  });
  return outs;
}

// The rank outputs of a GPU run equal the CPU's, bit for bit (scales and probs where the payload
// has them).
void expect_gpu_pipes_equal(const std::vector<PipeGpuOut>& got, const std::vector<PipeGpuOut>& want,
                            DType dd) {
  for (size_t q = 0; q < got.size(); ++q) {
    SCOPED_TRACE(::testing::Message() << "rank " << q);
    EXPECT_TRUE(bytes_equal(got[q].xp, want[q].xp)) << "xp";
    if (dd != DType::BF16) EXPECT_TRUE(bytes_equal(got[q].sc, want[q].sc)) << "scales";
    if (dd != DType::E2M1x2) EXPECT_TRUE(bytes_equal(got[q].prob, want[q].prob)) << "prob";
    EXPECT_TRUE(bytes_equal(got[q].y, want[q].y)) << "combine";
  }
}

// The record path (chunks 1, not in place) on N InProcess ranks: the CPU reference.
std::vector<PipeGpuOut> record_path_on_cpu(int N, DType dd) {
  std::vector<PipeGpuOut> cpu(N);
  run_in_process(N, [&](Communicator& comm) {
    cpu[comm.rank()] = pipe_rank(comm, Device::Cpu, dd, 1, InPlace::Off);
  });
  return cpu;
}

TEST(DispatchGpu, PipelinedChunksMatchCpu) {
  FP8FLOW_REQUIRE_GPU();
  if (!built_with_nccl()) GTEST_SKIP() << "built without NCCL: pipelined dispatch test skipped";
  const int N = std::min(gpu_count(), 4);
  for (DType dd : {DType::E4M3, DType::BF16, DType::E2M1x2}) {
    SCOPED_TRACE(::testing::Message() << to_string(dd) << ", " << N << " ranks");
    std::vector<PipeGpuOut> cpu(N);
    run_in_process(
        N, [&](Communicator& comm) { cpu[comm.rank()] = pipe_rank(comm, Device::Cpu, dd, 1); });
    const std::vector<PipeGpuOut> one = pipe_nccl(N, dd, 1);
    for (int chunks : {1, 0, 3, 4, 7}) {
      SCOPED_TRACE(::testing::Message() << "chunks " << chunks);
      const std::vector<PipeGpuOut> got = chunks == 1 ? one : pipe_nccl(N, dd, chunks);
      expect_gpu_pipes_equal(got, chunks == 1 ? cpu : one, dd);
    }
  }
}

// In-place dispatch / combine (DispatchOptions::in_place = On: data blocks received straight into
// the permuted rows through all_to_all_segments, combine without pack) through NCCL on
// min(GPUs, 4) ranks, chunks 1, 3 and 0 (auto), against the record path on InProcess ranks (CPU),
// bit for bit: rows, pad rows and rows past padded_rows, scales, probs, the combined rows.
TEST(DispatchGpu, InPlaceMatchesCpu) {
  FP8FLOW_REQUIRE_GPU();
  if (!built_with_nccl()) GTEST_SKIP() << "built without NCCL: in-place dispatch test skipped";
  const int N = std::min(gpu_count(), 4);
  for (DType dd : {DType::E4M3, DType::BF16, DType::E2M1x2}) {
    SCOPED_TRACE(::testing::Message() << to_string(dd) << ", " << N << " ranks");
    const std::vector<PipeGpuOut> cpu = record_path_on_cpu(N, dd);
    for (int chunks : {1, 3, 0}) {
      SCOPED_TRACE(::testing::Message() << "chunks " << chunks);
      expect_gpu_pipes_equal(pipe_nccl(N, dd, chunks, InPlace::On), cpu, dd);
    }
  }
}

// Dedup dispatch (one record per (token, rank): pack with slots, NCCL all-to-all, expansion,
// unpack) through NCCL on min(GPUs, 4) ranks against the record path on InProcess ranks (CPU),
// bit for bit: rows, pad rows and rows past padded_rows, scales, probs.
TEST(DispatchGpu, DedupMatchesCpu) {
  FP8FLOW_REQUIRE_GPU();
  if (!built_with_nccl()) GTEST_SKIP() << "built without NCCL: dedup dispatch test skipped";
  const int N = std::min(gpu_count(), 4);
  for (DType dd : {DType::E4M3, DType::BF16, DType::E2M1x2}) {
    SCOPED_TRACE(::testing::Message() << to_string(dd) << ", " << N << " ranks");
    const std::vector<PipeGpuOut> cpu = record_path_on_cpu(N, dd);
    expect_gpu_pipes_equal(pipe_nccl(N, dd, 1, InPlace::Off, true), cpu, dd);
  }
}

// build_dedup_plan on the GPU (one GPU, no communicator: the plan of each simulated rank) writes
// the words upload_dedup_plan(make_dedup_plan(...)) writes; source plans by the GPU's own
// make_permutation. T up to 5000 (more tokens than the kernel's threads), 1-8 ranks, top-1..8.
TEST(DispatchGpu, DedupBuildMatchesHostPlan) {
  FP8FLOW_REQUIRE_GPU();
  std::mt19937 rng(31);
  for (int N : {1, 3, 8})
    for (int k : {1, 8})
      for (int64_t T0 : {int64_t{1}, int64_t{300}, int64_t{5000}}) {
        SCOPED_TRACE(::testing::Message() << "N " << N << " k " << k << " T " << T0);
        const int64_t El = 4, E = El * N;
        if (k > E) continue;
        const DedupRoutings d = dedup_routings(N, k, El, rng, [&](int s) {
          return s == 0 ? T0 : 1 + static_cast<int64_t>(rng() % 200);
        });
        const auto& T = d.T;
        const auto& idx = d.idx;
        const auto& counts = d.counts;
        const auto& all = d.all_tokens;
        for (int s = 0; s < N; ++s) {
          const DispatchLayout l = make_dispatch_layout(counts, N, s, E, 16);
          const DedupPlan want = make_dedup_plan(l, idx[s], k, all);
          const DedupPlan sizes = make_dedup_plan_sizes(l, T[s], k, all);
          // The source plan on the GPU (align 1), and its offsets on the host.
          const DeviceTensor ids(host_i32(idx[s], T[s], k));
          DeviceTensor tpe(DType::I32, 1, E), off(DType::I64, 1, E + 1), dest(DType::I32, T[s], k),
              src(DType::I32, 1, T[s] * k), inv(DType::I32, 1, 1);
          void* ws = nullptr;
          const size_t wsn = permutation_workspace_bytes(T[s], k, E);
          ASSERT_EQ(cudaMalloc(&ws, std::max<size_t>(wsn, 16)), cudaSuccess);
          make_permutation(ids.v, E, {tpe.v, off.v, dest.v, src.v, inv.v}, ws, wsn,
                           PermutationOptions{1});
          const HostTensor off_h = off.to_host();
          std::vector<int64_t> off_v(reinterpret_cast<const int64_t*>(off_h.buf.data()),
                                     reinterpret_cast<const int64_t*>(off_h.buf.data()) + E + 1);
          const int64_t W = std::max<int64_t>(1, want.device_words());
          HostTensor ref_words(DType::I32, 1, W, 0x5A);
          upload_dedup_plan(want, ref_words.v);
          DeviceTensor work(DType::I32, 1, dedup_build_work_words(E, N)), got(DType::I32, 1, W);
          build_dedup_plan(sizes, l, ids.v, dest.v, off_v, work.v, got.v);
          ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
          const HostTensor got_h = got.to_host();
          EXPECT_EQ(0, std::memcmp(got_h.buf.data(), ref_words.buf.data(),
                                   static_cast<size_t>(want.device_words()) * 4))
              << "rank " << s;
          cudaFree(ws);
        }
      }
}

// ---------------------------------------------------------------------------------------------
// The EP layer on N GPUs vs the layer on GPU 0.

// Runs on the current device: tokens [t0, t0 + T), experts [e0, e0 + El).
Out run_layer(const Global& g, Recipe r, Communicator* comm, int ep, int64_t t0, int64_t T,
              int64_t e0, int64_t El, int64_t max_tokens) {
  const EpProblem& p = g.p;
  const int64_t H = p.H, F = p.F;
  cudaStream_t st = nullptr;
  EXPECT_EQ(cudaStreamCreate(&st), cudaSuccess);
  const Stream stream = reinterpret_cast<Stream>(st);
  DeviceTensor gate(g.gate), w1(slice_rows(g.w1, e0 * 2 * F, El * 2 * F)),
      w2(slice_rows(g.w2, e0 * H, El * H));
  DeviceTensor x(slice_rows(g.x, t0, T)), dy(slice_rows(g.dy, t0, T));
  DeviceTensor y(DType::BF16, T, H), dx(DType::BF16, T, H), dw1(DType::F32, El * 2 * F, H),
      dw2(DType::F32, El * H, F), dgate(DType::F32, p.Eg, H);
  Out o;
  {
    MoELayer layer(config(p, r, ep, max_tokens), MoEWeights{gate.v, {}, w1.v, w2.v}, comm, stream);
    MoEContext ctx = layer.make_context();
    layer.forward(x.v, y.v, ctx, {}, stream);
    layer.backward(dy.v, MoEGrads{dx.v, dw1.v, dw2.v, dgate.v, {}}, ctx, stream);
    EXPECT_EQ(cudaStreamSynchronize(st), cudaSuccess);
  }
  o.y = y.to_host();
  o.dx = dx.to_host();
  o.dw1 = dw1.to_host();
  o.dw2 = dw2.to_host();
  o.dgate = dgate.to_host();
  cudaStreamDestroy(st);
  return o;
}

// N threads, thread q on GPU q with an NCCL communicator of N ranks.
std::vector<Out> run_ep(const Global& g, Recipe r, int N, bool all_tokens_on_one = false) {
  std::vector<Out> outs(N);
  on_nccl_ranks(N, [&](Communicator& comm, int q) {
    int64_t t0 = 0;
    for (int s = 0; s < q; ++s) t0 += g.p.T[s];
    const int64_t El = g.p.Eg / N;
    if (all_tokens_on_one)
      outs[q] = run_layer(g, r, &comm, N, 0, g.p.tg(), 0, g.p.Eg, g.p.tg());
    else
      outs[q] = run_layer(g, r, &comm, N, t0, g.p.T[q], q * El, El, g.p.tmax());
  });
  return outs;
}

TEST(EpLayerGpu, MatchesSingleGpu) {
  if (!built_with_nccl()) GTEST_SKIP() << "built without NCCL: EP GPU test skipped";
  const int gpus = gpu_count();
  if (gpus < 2)
    GTEST_SKIP() << "needs >= 2 CUDA devices, found " << gpus << ": EP GPU test skipped";
  for (int N : {2, 4}) {
    if (N > gpus) {
      std::printf("EpLayerGpu: %d GPUs present, EP %d skipped\n", gpus, N);
      continue;
    }
    EpProblem p;
    p.T = N == 2 ? std::vector<int64_t>{300, 177} : std::vector<int64_t>{129, 1, 256, 200};
    p.H = 1024;
    p.F = 512;
    p.seed = 3;
    if (N == 4) p.router = RouterConfig::softmax_topk(4, false);
    const Global g = make_global(p, /*draw_bias=*/false);
    const int64_t T = p.tg(), E = p.Eg;
    for (Recipe r : {Recipe::Bf16, Recipe::Fp8Blockwise, Recipe::Fp8Flow, Recipe::Fp8FlowMxfp4}) {
      SCOPED_TRACE(::testing::Message() << to_string(r) << ", EP " << N);
      cudaSetDevice(0);
      const bool mx = r == Recipe::Fp8FlowMxfp4;
      // Reference on GPU 0: the comm-less layer, or (mxfp4) the 1-rank EP layer.
      const Out ref = mx ? run_ep(g, r, 1, /*all_tokens_on_one=*/true)[0]
                         : run_layer(g, r, nullptr, 1, 0, T, 0, E, T);
      compare(g, run_ep(g, r, N), ref, /*bitwise=*/true, 0);
      Global gd = g;  // dedup dispatch (MoEConfig::ep_dedup): the same bits
      gd.p.dedup = true;
      SCOPED_TRACE("ep_dedup");
      compare(gd, run_ep(gd, r, N), ref, /*bitwise=*/true, 0);
    }
  }
}

#endif  // FP8FLOW_WITH_CUDA

}  // namespace
}  // namespace fp8flow::test
