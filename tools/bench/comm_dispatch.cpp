// fp8flow-bench comm cases `dispatch` and `combine`: the expert-parallel dispatch (pack -> NCCL
// all_to_all_v of the records -> unpack into the permuted + padded layout) per payload, at the
// papers' shape: T = 4096 tokens per rank, top-8 (32768 routed rows per rank), H = 7168, 256
// global experts split over the ranks, uniform random routing (seeded per rank). Rows:
//   dispatch       bf16 / fp8 / mxfp4: the whole op; bf16 / fp8 carry the prob in the record
//   dispatch-a2a   the all_to_all_v of the records alone (no pack/unpack)
//   dispatch       mxfp4+conv: fp8_to_mxfp4 on the tokens, the MXFP4 dispatch, mxfp4_to_fp8 on
//                  the permuted rows (what fp8-flow-mxfp4 pays at the dispatch point)
//   combine        bf16: the expert outputs back (pack -> all_to_all_v), as the layer does
//   "<payload> c1" the same op with DispatchOptions{1} (no pipelining), for comparison; the
//                  default rows run the default chunking (pipelined on GPUs: DispatchOptions) and
//                  are verified ("ok") against a chunks = 1 run: outputs bit-identical per rank
//   "<payload> inplace" the same op with DispatchOptions{1, InPlace::On}: data blocks received
//                  straight into the permuted rows (all_to_all_segments), only scales / probs /
//                  pad rows unpacked (combine: no pack); outputs poisoned first, then verified
//                  against the chunks = 1 record-path run
// bytes_per_rank = records a rank sends (T k, every pair is routed) x record size (combine: the
// mean records a rank sends back, also T k); the note gives routed rows per second (T k / time) and
// the ratio to the BF16 dispatch (targets on 4 H100s: FP8 >= 1.8x, MXFP4 >= 3x). Without GPUs:
// InProcess ranks on a small shape (T 64, top-4, H 256).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <initializer_list>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "comm_bench.h"
#include "fp8flow/dispatch.h"
#include "fp8flow/mxfp4.h"
#include "fp8flow/permute.h"

#if FP8FLOW_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace fp8flow::bench {
namespace {

void to_device(const CommBuffer& dst, const void* src, size_t bytes) {
  if (bytes == 0) return;  // src may be an empty vector's null data()
#if FP8FLOW_WITH_CUDA
  if (dst.device() == Device::Cuda) {
    if (cudaMemcpy(dst.data(), src, bytes, cudaMemcpyHostToDevice) != cudaSuccess)
      throw std::runtime_error("cudaMemcpy to device failed");
    return;
  }
#endif
  std::memcpy(dst.data(), src, bytes);
}

void to_host(void* dst, const CommBuffer& src, size_t bytes) {
  if (bytes == 0) return;  // dst may be an empty vector's null data()
#if FP8FLOW_WITH_CUDA
  if (src.device() == Device::Cuda) {
    if (cudaMemcpy(dst, src.data(), bytes, cudaMemcpyDeviceToHost) != cudaSuccess)
      throw std::runtime_error("cudaMemcpy to host failed");
    return;
  }
#endif
  std::memcpy(dst, src.data(), bytes);
}

CommBuffer random_buffer(CommBench& b, size_t bytes, uint64_t seed, uint8_t mask = 0xFF) {
  std::vector<uint8_t> h(bytes);
  std::mt19937_64 rng(seed);
  for (auto& v : h) v = static_cast<uint8_t>(rng()) & mask;
  CommBuffer d = b.alloc(std::max<size_t>(bytes, 16));
  to_device(d, h.data(), bytes);
  return d;
}

TensorView view(const CommBuffer& buf, DType d, int64_t r, int64_t c) {
  return TensorView{buf.data(), d, r, c, -1, buf.device()};
}

// The first `bytes` of each buffer, on the host (after the stream is synchronized).
std::vector<std::vector<uint8_t>> snapshot(
    CommBench& b, std::initializer_list<std::pair<const CommBuffer*, size_t>> bufs) {
  b.sync();
  std::vector<std::vector<uint8_t>> out;
  for (auto [buf, bytes] : bufs) {
    out.emplace_back(bytes);
    to_host(out.back().data(), *buf, bytes);
  }
  return out;
}

// Whether every rank saw `ok` (collective).
bool everyone(CommBench& b, bool ok) {
  const int64_t mine = ok ? 1 : 0;
  for (int64_t v : b.comm().all_gather(std::span<const int64_t>(&mine, 1), b.stream()))
    if (!v) return false;
  return true;
}

void dispatch_cases(CommBench& b) {
  const bool gpu = b.gpu();
  const int N = b.size();
  const int64_t T = gpu ? (b.quick() ? 1024 : 4096) : 64, k = gpu ? 8 : 4, H = gpu ? 7168 : 256;
  const int64_t Eg = gpu ? 256 : 8 * N;
  if (Eg % N != 0) return;
  const std::string shape = std::to_string(T) + "x" + std::to_string(H) + " k" + std::to_string(k) +
                            " E" + std::to_string(Eg);
  const Device dev = b.device();
  const Stream st = b.stream();

  // Routing: k distinct experts per token, uniform; the source plan (align 1 over E_g).
  std::vector<int32_t> idx(static_cast<size_t>(T * k));
  {
    std::mt19937_64 rng(1234 + b.rank());
    std::vector<int32_t> perm(static_cast<size_t>(Eg));
    for (int64_t e = 0; e < Eg; ++e) perm[e] = static_cast<int32_t>(e);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j < k; ++j) {
        std::uniform_int_distribution<int64_t> d(j, Eg - 1);
        std::swap(perm[j], perm[d(rng)]);
        idx[t * k + j] = perm[j];
      }
  }
  CommBuffer didx = b.alloc(idx.size() * 4);
  to_device(didx, idx.data(), idx.size() * 4);
  CommBuffer tpe = b.alloc(Eg * 4), off = b.alloc((Eg + 1) * 8), dest = b.alloc(T * k * 4),
             src = b.alloc(T * k * 4), inv = b.alloc(16);
  const size_t wsb = dev == Device::Cuda ? permutation_workspace_bytes(T, k, Eg) : 0;
  CommBuffer ws = b.alloc(std::max<size_t>(wsb, 16));
  PermutationPlan plan{view(tpe, DType::I32, 1, Eg), view(off, DType::I64, 1, Eg + 1),
                       view(dest, DType::I32, T, k), view(src, DType::I32, 1, T * k),
                       view(inv, DType::I32, 1, 1)};
  make_permutation(view(didx, DType::I32, T, k), Eg, plan, ws.data(), wsb, {1}, st);
  b.sync();
  std::vector<int64_t> o(static_cast<size_t>(Eg + 1)), counts(static_cast<size_t>(Eg));
  to_host(o.data(), off, o.size() * 8);
  for (int64_t e = 0; e < Eg; ++e) counts[e] = o[e + 1] - o[e];
  const DispatchLayout l = exchange_dispatch_counts(b.comm(), counts, Eg, 16, st);
  const int64_t M = std::max<int64_t>(l.max_padded_rows, 1), R = std::max<int64_t>(l.recv_total, 1);
  CommBuffer table = b.alloc(l.table.size() * 8), p2r = b.alloc(M * 4), r2p = b.alloc(R * 4);
  make_dispatch_maps(l, view(table, DType::I64, 1, static_cast<int64_t>(l.table.size())),
                     view(p2r, DType::I32, 1, M), view(r2p, DType::I32, 1, R), st);

  // Inputs (token order) and outputs (permuted), per payload.
  const int64_t tiles = H / 128;
  CommBuffer x8 = random_buffer(b, T * H, 1, 0x77);  // finite E4M3 codes
  CommBuffer s8 = b.alloc(tiles * T * 4);
  {
    std::vector<float> s(static_cast<size_t>(tiles * T), 1.0f / 64);
    to_device(s8, s.data(), s.size() * 4);
  }
  CommBuffer xb = random_buffer(b, T * H * 2, 2, 0x3F), x4 = random_buffer(b, T * H / 2, 3),
             s4 = random_buffer(b, T * H / 32, 4, 0x7F), w = random_buffer(b, T * k * 4, 5, 0x3F);
  CommBuffer p8 = b.alloc(M * H), ps8 = b.alloc(tiles * M * 4), pb = b.alloc(M * H * 2),
             p4 = b.alloc(M * H / 2), ps4 = b.alloc(M * H / 32), prob = b.alloc(M * 4),
             yb = b.alloc(T * k * H * 2);
  const int64_t Bmax = dispatch_wire(DType::BF16, H, true).row_bytes;
  CommBuffer send = b.alloc(std::max(T * k, R) * Bmax), recv = b.alloc(R * Bmax);
  const DispatchBuffers buf{send.data(), send.size(), recv.data(), recv.size()};
  const TensorView wt = view(w, DType::F32, T, k), pr = view(prob, DType::F32, 1, M);
  const TensorView sm = plan.src_slot, pm = view(p2r, DType::I32, 1, M);
  TensorView s_src = sm;
  s_src.cols = std::max<int64_t>(l.send_total, 1);

  struct Payload {
    const char* name;
    DispatchRows in, out;
    const CommBuffer *data, *scale;  // the outputs
    size_t data_bytes, scale_bytes;
  };
  const size_t Ms = static_cast<size_t>(M), Hs = static_cast<size_t>(H);
  const Payload pays[] = {
      {"bf16",
       {view(xb, DType::BF16, T, H), {}, wt},
       {view(pb, DType::BF16, M, H), {}, pr},
       &pb,
       &prob,
       Ms * Hs * 2,
       0},
      {"fp8",
       {view(x8, DType::E4M3, T, H), view(s8, DType::F32, tiles, T), wt},
       {view(p8, DType::E4M3, M, H), view(ps8, DType::F32, tiles, M), pr},
       &p8,
       &ps8,
       Ms * Hs,
       static_cast<size_t>(tiles) * Ms * 4},
      {"mxfp4",
       {view(x4, DType::E2M1x2, T, H), view(s4, DType::E8M0, T, H / 32), wt},
       {view(p4, DType::E2M1x2, M, H), view(ps4, DType::E8M0, M, H / 32), pr},
       &p4,
       &ps4,
       Ms * Hs / 2,
       Ms * Hs / 32},
  };
  // Pipelining: the default rows use the default chunking (DispatchOptions{}); "<payload> c1"
  // rows force one run (pack -> a2a -> unpack serialized), for comparison. The default rows are
  // verified against a chunks = 1 run (outputs bit-identical on every rank).
  const DispatchOptions one{1};
  auto make_row = [&](const char* kase, const std::string& payload, int64_t bytes) {
    CommRow r;
    r.kase = kase;
    r.payload = payload;
    r.shape = shape;
    r.bytes_per_rank = bytes;
    return r;
  };
  // run(opts) writes outputs(): a chunks = 1 run gives the reference outputs, then the default
  // chunking is timed and its outputs verified against them on every rank. Returns the reference
  // outputs (the in-place rows are verified against them too).
  auto time_vs_one = [&](CommRow& r, const auto& run, const auto& outputs) {
    run(one);
    auto want = outputs();
    r.timing = b.time([&] { run(DispatchOptions{}); }, r.bytes_per_rank);
    r.verified = everyone(b, outputs() == want);
    return want;
  };
  // Variant rows ("<payload> inplace", "<payload> dedup"): the listed outputs poisoned, one
  // run_once() verified against the record path's reference outputs `want`, then timed (at the
  // record path's bytes, so that rates compare).
  using Poisoned = std::pair<const CommBuffer*, size_t>;
  auto variant_row = [&](const CommRow& r, const char* suffix, const auto& run_once,
                         const auto& outputs, const auto& want,
                         std::initializer_list<Poisoned> poisoned) {
    for (auto [buf_p, n] : poisoned) {
      if (!buf_p || n == 0) continue;
      const std::vector<uint8_t> poison(n, 0xA5);
      to_device(*buf_p, poison.data(), n);
    }
    CommRow vr = r;
    vr.payload = r.payload + " " + suffix;
    run_once();
    vr.verified = everyone(b, outputs() == want);
    vr.timing = b.time(run_once, r.bytes_per_rank);
    return vr;
  };
  auto in_place_row = [&](const CommRow& r, const auto& run, const auto& outputs, const auto& want,
                          std::initializer_list<Poisoned> poisoned) {
    return variant_row(
        r, "inplace",
        [&] {
          run(DispatchOptions{1, InPlace::On});
        },
        outputs, want, poisoned);
  };
  // Dedup dispatch: one record per (token, destination rank); the plan is made and uploaded once
  // (not in the timed loop; the layer makes it from the counts exchange it already does and
  // uploads it once per forward for both of its dispatches).
  const DedupPlan dplan = exchange_dedup_plan(b.comm(), l, idx, static_cast<int>(k), st);
  const int64_t Bd = dispatch_dedup_wire(DType::BF16, H, static_cast<int>(k)).row_bytes;
  CommBuffer dsend = b.alloc(std::max<int64_t>(dplan.send_total, 1) * Bd),
             drecv = b.alloc(std::max<int64_t>(dplan.recv_total, 1) * Bd),
             dpdev = b.alloc((dplan.device_words() + 1) * 4), dmap = b.alloc(M * 4);
  const DispatchBuffers dbuf{dsend.data(), dsend.size(), drecv.data(), drecv.size()};
  const TensorView dplan_dev = view(dpdev, DType::I32, 1, dplan.device_words() + 1);
  upload_dedup_plan(dplan, dplan_dev, st);  // once per plan (the layer: once per forward)
  // The plan's host cost per forward (make_dedup_plan + upload_dedup_plan; the layer gets the
  // token counts with its counts exchange): host wall clock, mean of 10, reported with the rows.
  double plan_ms = 0;
  {
    const std::vector<int64_t> mine = dedup_token_counts(l, idx, static_cast<int>(k));
    const std::vector<int64_t> all_tokens = b.comm().all_gather(mine, st);
    b.sync();
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < 10; ++i)
      upload_dedup_plan(make_dedup_plan(l, idx, static_cast<int>(k), all_tokens), dplan_dev, st);
    plan_ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() /
        10;
    b.sync();
  }
  // The layer's way (device-built plan): make_dedup_plan_sizes on the host + build_dedup_plan on
  // the stream, wall clock to the stream's end, mean of 10; its words checked against the upload.
  double dplan_ms = 0;
  bool dplan_same = false;
  {
    const std::vector<int64_t> mine = dedup_token_counts(l, idx, static_cast<int>(k));
    const std::vector<int64_t> all_tokens = b.comm().all_gather(mine, st);
    const int64_t words = dplan.device_words();
    CommBuffer dwork = b.alloc(dedup_build_work_words(Eg, l.ranks) * 4),
               dbuilt = b.alloc((words + 1) * 4);
    auto build = [&] {
      const DedupPlan sz = make_dedup_plan_sizes(l, T, static_cast<int>(k), all_tokens);
      build_dedup_plan(sz, l, view(didx, DType::I32, T, k), plan.dest_row, o,
                       view(dwork, DType::I32, 1, dedup_build_work_words(Eg, l.ranks)),
                       view(dbuilt, DType::I32, 1, words + 1), st);
    };
    build();
    b.sync();
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < 10; ++i) {
      build();
      b.sync();
    }
    dplan_ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() /
        10;
    std::vector<int32_t> a(static_cast<size_t>(words)), c(static_cast<size_t>(words));
    to_host(a.data(), dbuilt, a.size() * 4);
    to_host(c.data(), dpdev, c.size() * 4);
    dplan_same = everyone(b, a == c);
  }
  double bf16_rows_per_s = 0;
  for (const Payload& p : pays) {
    const DispatchWire wire = dispatch_wire(p.in.data.dtype, H, true);
    const int64_t bytes = l.send_total * wire.row_bytes;
    // is_reference: the default bf16 row sets the rows/s every "x bf16" ratio divides by.
    auto rows_note = [&](const CommTiming& t, bool is_reference) {
      const double rps = t.median_ms > 0 ? l.send_total / (t.median_ms * 1e-3) : 0;
      if (is_reference && std::string(p.name) == "bf16") bf16_rows_per_s = rps;
      char s[160];
      std::snprintf(s, sizeof s, "%.3g rows/s; %.2fx bf16 rows/s; record %lld B", rps,
                    bf16_rows_per_s > 0 ? rps / bf16_rows_per_s : 0.0,
                    static_cast<long long>(wire.row_bytes));
      return std::string(s);
    };
    CommRow r = make_row("dispatch", p.name, bytes);
    const int chunks = dispatch_chunks(l, wire.row_bytes, dev);
    auto run = [&](const DispatchOptions& o) {
      dispatch(b.comm(), l, p.in, s_src, static_cast<int>(k), pm, p.out, buf, st, o);
    };
    auto outputs = [&] {
      return snapshot(b, {{p.data, p.data_bytes}, {p.scale, p.scale_bytes}, {&prob, Ms * 4}});
    };
    const auto want = time_vs_one(r, run, outputs);
    r.note = rows_note(r.timing, true) + "; chunks " + std::to_string(chunks) +
             " (vs chunks 1: " + (r.verified ? "identical)" : "DIFFERENT)");
    b.row(r);
    for (int c : {2, 4}) {  // the pipelined record path next to the default (one run)
      if (chunks != 1 || !b.gpu()) break;
      const std::string name = "c" + std::to_string(c);
      CommRow pr = variant_row(r, name.c_str(), [&] { run(DispatchOptions{c}); }, outputs, want,
                               {Poisoned{p.data, p.data_bytes}, Poisoned{p.scale, p.scale_bytes},
                                Poisoned{&prob, Ms * 4}});
      pr.note = rows_note(pr.timing, false) + "; chunks " + std::to_string(c) +
                ": pack c+1 / unpack c-1 beside a2a c (vs chunks 1: " +
                (pr.verified ? "identical)" : "DIFFERENT)");
      b.row(pr);
    }
    {
      CommRow ipr = in_place_row(r, run, outputs, want,
                                 {Poisoned{p.data, p.data_bytes}, Poisoned{p.scale, p.scale_bytes},
                                  Poisoned{&prob, Ms * 4}});
      const DispatchWire wn = dispatch_wire(p.in.data.dtype, H, true);
      ipr.note = rows_note(ipr.timing, false) + "; in place: data " +
                 std::to_string(wn.data_bytes) + " B/row by segments, side record " +
                 std::to_string(wn.scale_bytes + 4) +
                 " B/row (vs chunks 1 record path: " + (ipr.verified ? "identical)" : "DIFFERENT)");
      b.row(ipr);
    }
    {
      const int64_t db = dispatch_dedup_wire(p.in.data.dtype, H, static_cast<int>(k)).row_bytes;
      CommRow dr = variant_row(r, "dedup",
                               [&] {
                                 dispatch_dedup(b.comm(), l, dplan, p.in, dplan_dev,
                                                view(dmap, DType::I32, 1, M), p.out, dbuf, st);
                               },
                               outputs, want,
                               {Poisoned{p.data, p.data_bytes}, Poisoned{p.scale, p.scale_bytes},
                                Poisoned{&prob, Ms * 4}});
      char s[384];
      std::snprintf(s, sizeof s,
                    "; dedup: %lld records of %lld B sent (%.2fx fewer bytes than %lld pairs of "
                    "%lld B; vs record path: %s); plan per forward (not timed here): host "
                    "%.3f ms, device-built %.3f ms (%s)",
                    static_cast<long long>(dplan.send_total), static_cast<long long>(db),
                    dplan.send_total > 0
                        ? static_cast<double>(bytes) / static_cast<double>(dplan.send_total * db)
                        : 0.0,
                    static_cast<long long>(l.send_total), static_cast<long long>(wire.row_bytes),
                    dr.verified ? "identical" : "DIFFERENT", plan_ms, dplan_ms,
                    dplan_same ? "same words" : "DIFFERENT words");
      // The bytes the dedup path really puts on the wire (the busiest rank's records) against
      // NCCL's own all-to-all of that size: the transport efficiency behind the rows/s above.
      int64_t wire_max = 0;
      const std::vector<int64_t> mine_wire{dplan.send_total * db};
      for (int64_t v : b.comm().all_gather(mine_wire, st)) wire_max = std::max(wire_max, v);
      const CommTiming ref = b.reference(wire_max);
      char w[160];
      std::snprintf(w, sizeof w,
                    "; wire: %.1f MiB/rank (busiest), NCCL a2a of that size %.3f ms = %.0f%% of "
                    "this time",
                    static_cast<double>(wire_max) / (1024.0 * 1024.0), ref.median_ms,
                    dr.timing.median_ms > 0 ? 100.0 * ref.median_ms / dr.timing.median_ms : 0.0);
      dr.note = rows_note(dr.timing, false) + s + w;
      b.row(dr);
    }
    if (std::string(p.name) == "bf16" || chunks != 1) {
      CommRow c1 = r;
      c1.payload = std::string(p.name) + " c1";
      c1.timing = b.time([&] { run(one); }, bytes);
      c1.verified = r.verified;
      c1.note = "chunks 1: pack, a2a, unpack serialized";
      b.row(c1);
    }
    CommRow a = make_row("dispatch-a2a", p.name, bytes);
    std::vector<int64_t> sb(N), so(N), rb(N), ro(N);
    for (int j = 0; j < N; ++j) {
      sb[j] = l.send_rows[j] * wire.row_bytes;
      so[j] = l.send_offsets[j] * wire.row_bytes;
      rb[j] = l.recv_rows[j] * wire.row_bytes;
      ro[j] = l.recv_offsets[j] * wire.row_bytes;
    }
    // Verified: the received records equal those of the dispatch above (recv poisoned first).
    const size_t recv_bytes = static_cast<size_t>(l.recv_total * wire.row_bytes);
    const auto got = snapshot(b, {{&recv, recv_bytes}});
    {
      const std::vector<uint8_t> poison(recv_bytes, 0xA5);
      to_device(recv, poison.data(), recv_bytes);
    }
    a.timing =
        b.time([&] { b.comm().all_to_all_v(send.data(), sb, so, recv.data(), rb, ro, st); }, bytes);
    a.verified = everyone(b, snapshot(b, {{&recv, recv_bytes}}) == got);
    a.note = "records only (no pack/unpack)";
    b.row(a);
  }
  {
    // MXFP4 with the conversion kernels of fp8-flow-mxfp4's dispatch point.
    const DispatchWire wire = dispatch_wire(DType::E2M1x2, H, true);
    const int64_t bytes = l.send_total * wire.row_bytes;
    const ScaledTensor q8{
        view(x8, DType::E4M3, T, H), view(s8, DType::F32, tiles, T), ScaleLayout::Rowwise1x128, {}};
    const ScaledTensor q4{
        view(x4, DType::E2M1x2, T, H), view(s4, DType::E8M0, T, H / 32), ScaleLayout::Mx1x32, {}};
    const int64_t Ml = std::max<int64_t>(l.padded_rows, 1);
    const ScaledTensor o4{view(p4, DType::E2M1x2, Ml, H),
                          view(ps4, DType::E8M0, Ml, H / 32),
                          ScaleLayout::Mx1x32,
                          {}};
    const ScaledTensor o8{view(p8, DType::E4M3, Ml, H),
                          view(ps8, DType::F32, tiles, Ml),
                          ScaleLayout::Rowwise1x128,
                          {}};
    CommRow r = make_row("dispatch", "mxfp4+conv", bytes);
    auto run = [&](const DispatchOptions& o) {
      fp8_to_mxfp4(q8, q4, st);
      dispatch(b.comm(), l, {q4.data, q4.scale, wt}, s_src, static_cast<int>(k), pm,
               {o4.data, o4.scale, view(prob, DType::F32, 1, Ml)}, buf, st, o);
      mxfp4_to_fp8(o4, o8, st);
    };
    const size_t Mls = static_cast<size_t>(Ml);
    auto outputs = [&] {
      return snapshot(b, {{&p8, Mls * Hs}, {&ps8, static_cast<size_t>(tiles) * Mls * 4}});
    };
    const auto want = time_vs_one(r, run, outputs);
    const double rps = r.timing.median_ms > 0 ? l.send_total / (r.timing.median_ms * 1e-3) : 0;
    char s[160];
    std::snprintf(s, sizeof s, "%.3g rows/s; %.2fx bf16 rows/s; fp8->mxfp4 + dispatch + mxfp4->fp8",
                  rps, bf16_rows_per_s > 0 ? rps / bf16_rows_per_s : 0.0);
    r.note = s;
    b.row(r);
    CommRow ipr = in_place_row(r, run, outputs, want, {Poisoned{&p8, Mls * Hs}});
    ipr.note = "in-place MXFP4 dispatch between the conversions";
    b.row(ipr);
  }
  {
    // Combine: BF16 expert outputs back to the tokens' ranks (send order).
    const int64_t Ml = std::max<int64_t>(l.padded_rows, 1);
    const int64_t B = dispatch_wire(DType::BF16, H, false).row_bytes;
    // Same bytes on every rank (b.time needs them equal): the mean records per rank, T k.
    const int64_t bytes = T * k * B;
    CommRow r = make_row("combine", "bf16", bytes);
    auto run = [&](const DispatchOptions& o) {
      combine(b.comm(), l, {view(pb, DType::BF16, Ml, H), {}, {}}, view(r2p, DType::I32, 1, R),
              view(yb, DType::BF16, std::max<int64_t>(l.send_total, 1), H), buf, st, o);
    };
    const size_t yb_bytes = static_cast<size_t>(l.send_total) * Hs * 2;
    auto outputs = [&] { return snapshot(b, {{&yb, yb_bytes}}); };
    const auto want = time_vs_one(r, run, outputs);
    const int chunks = dispatch_chunks(l, B, dev);
    char s[160];
    std::snprintf(s, sizeof s, "%.3g rows/s; then unpermute (not timed here); chunks %d",
                  r.timing.median_ms > 0 ? T * k / (r.timing.median_ms * 1e-3) : 0.0, chunks);
    r.note = s;
    b.row(r);
    CommRow c1 = r;
    c1.payload = "bf16 c1";
    c1.timing = b.time([&] { run(one); }, bytes);
    c1.note = "chunks 1: pack, a2a serialized";
    b.row(c1);
    CommRow ipr = in_place_row(r, run, outputs, want, {Poisoned{&yb, yb_bytes}});
    ipr.note = "in place: no pack, (source, expert) blocks straight from the permuted rows";
    b.row(ipr);
  }
}

}  // namespace

FP8FLOW_BENCH_COMM_CASE(dispatch,
                        "EP dispatch/combine per payload (bf16, fp8, mxfp4 +- conversions)",
                        dispatch_cases);

}  // namespace fp8flow::bench
