// Emulated sm90 dispatch kernels (CPU threads, fake_cuda/) vs fp8flow::ref, bit for bit: the
// record path's pack and unpack (every payload, with and without prob, invalid map entries, pad
// rows, chunk filters), the row maps, and the dedup path (pack with slot words, the expansion
// of each record into its rows, unpack of scales and pad rows by the expanded map) on plans of
// several ranks. Run with tests/dispatch/cpu_emulation/run.sh; see there for what it does and does
// not check.
#include <gtest/gtest.h>

#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "common/test_data.h"
#include "common/test_util.h"
#include "fp8flow/dispatch.h"
#include "ops/dispatch/dispatch_backends.h"
// Last: the fake runtime; its macros must not touch the headers above.
#include <cuda_runtime.h>

using namespace fp8flow;
using namespace fp8flow::test;
using detail::WireArgs;
using detail::WireScale;

namespace {

struct Payload {
  DType dtype;
  int64_t H;
};

const Payload kPayloads[] = {{DType::BF16, 200}, {DType::E4M3, 656}, {DType::E2M1x2, 256}};

// The rows of one payload: data [R][H], scales (E4M3: F32 [tiles][R]; E2M1x2: E8M0 [R][H/32]),
// prob F32 [n_prob].
struct Rows {
  HostTensor data, scale, prob;
};

Rows make_rows(const Payload& p, int64_t R, int64_t n_prob, uint64_t seed) {
  Rows r;
  r.data = random_bytes(p.dtype, R, p.H, seed);
  const int64_t tiles = (p.H + 127) / 128;
  if (p.dtype == DType::E4M3) r.scale = random_pow2_scales(tiles, R, seed + 1, 0.1);
  if (p.dtype == DType::E2M1x2) r.scale = random_bytes(DType::E8M0, R, p.H / 32, seed + 1);
  r.prob = random_bytes(DType::F32, 1, std::max<int64_t>(n_prob, 1), seed + 2);
  return r;
}

// The row side of WireArgs for rows r (R rows) and wire w.
WireArgs row_args(Rows& r, const Payload& p, const DispatchWire& w, int64_t R, bool prob) {
  WireArgs a;
  a.rows_data = r.data.buf.data();
  a.rows = R;
  a.data_bytes = w.data_bytes;
  a.scale = p.dtype == DType::E4M3     ? WireScale::Col
            : p.dtype == DType::E2M1x2 ? WireScale::Row
                                       : WireScale::None;
  a.rows_scale = a.scale == WireScale::None ? nullptr : r.scale.buf.data();
  a.scale_bytes = w.scale_bytes;
  if (a.scale == WireScale::Col) a.tiles = (p.H + 127) / 128;
  if (prob) {
    a.prob = r.prob.ptr<float>();
    a.prob_len = r.prob.v.numel();
    a.prob_offset = w.prob_offset;
  }
  a.row_bytes = w.row_bytes;
  return a;
}

detail::ChunkFilter filter(int chunks, int chunk, const std::vector<int32_t>& seg) {
  detail::ChunkFilter f;
  if (chunks <= 1) return f;
  f.chunks = chunks;
  f.chunk = chunk;
  f.segments = static_cast<int32_t>(seg.size()) - 1;
  for (size_t i = 0; i < seg.size(); ++i) f.seg[i] = seg[i];
  return f;
}

TEST(DispatchEmu, PackMatchesReference) {
  emu::make_warps(256);
  std::mt19937 rng(7);
  for (const Payload& p : kPayloads)
    for (bool prob : {true, false})
      for (int chunks : {1, 3}) {
        SCOPED_TRACE(::testing::Message()
                     << to_string(p.dtype) << " prob " << prob << " chunks " << chunks);
        const int64_t T = 45, k = 3, n = 100;  // 100 records over 45 tokens x 3 slots
        Rows in = make_rows(p, T, T * k, 11);
        const DispatchWire w = dispatch_wire(p.dtype, p.H, prob);
        HostTensor map(DType::I32, 1, n);
        for (int64_t i = 0; i < n; ++i)  // some invalid entries: zero records
          map.ptr<int32_t>()[i] =
              i % 17 == 5 ? -1 : (i % 23 == 7 ? int32_t(T * k + 3) : int32_t(rng() % (T * k)));
        std::vector<uint8_t> w_ref(n * w.row_bytes, 0x5A), w_emu(n * w.row_bytes, 0x5A);
        for (int chunk = 0; chunk < chunks; ++chunk) {
          WireArgs a = row_args(in, p, w, T, prob);
          a.map = map.ptr<int32_t>();
          a.k = static_cast<int32_t>(k);
          a.wire_rows = a.map_rows = n;
          a.filter = filter(chunks, chunk, {0, 40, 40, n});
          a.wire = w_ref.data();
          ref::dispatch_pack(a);
          a.wire = w_emu.data();
          sm90::dispatch_pack(a, nullptr);
        }
        EXPECT_EQ(w_ref, w_emu);
      }
}

TEST(DispatchEmu, UnpackMatchesReference) {
  emu::make_warps(256);
  std::mt19937 rng(8);
  for (const Payload& p : kPayloads)
    for (bool prob : {true, false})
      for (int chunks : {1, 2}) {
        SCOPED_TRACE(::testing::Message()
                     << to_string(p.dtype) << " prob " << prob << " chunks " << chunks);
        const int64_t n = 70, M = 97;  // 70 records into 97 rows (pads, invalid entries)
        const DispatchWire w = dispatch_wire(p.dtype, p.H, prob);
        HostTensor wire = random_bytes(DType::E4M3, n, w.row_bytes, 21);
        HostTensor map(DType::I32, 1, M);
        for (int64_t r = 0; r < M; ++r)
          map.ptr<int32_t>()[r] =
              r % 9 == 4 ? -1 : (r % 31 == 3 ? int32_t(n + 2) : int32_t(rng() % n));
        Rows o_ref = make_rows(p, M, M, 31), o_emu = make_rows(p, M, M, 31);
        for (int chunk = 0; chunk < chunks; ++chunk)
          for (Rows* o : {&o_ref, &o_emu}) {
            WireArgs a = row_args(*o, p, w, M, prob);
            a.wire = wire.buf.data();
            a.wire_rows = n;
            a.map = map.ptr<int32_t>();
            a.map_rows = M;
            a.filter = filter(chunks, chunk, {0, 33, n});
            if (o == &o_ref)
              ref::dispatch_unpack(a);
            else
              sm90::dispatch_unpack(a, nullptr);
          }
        EXPECT_TRUE(bytes_equal(o_ref.data, o_emu.data)) << "data";
        if (p.dtype != DType::BF16) EXPECT_TRUE(bytes_equal(o_ref.scale, o_emu.scale)) << "scale";
        if (prob) EXPECT_TRUE(bytes_equal(o_ref.prob, o_emu.prob)) << "prob";
      }
}

TEST(DispatchEmu, MapsMatchReference) {
  emu::make_warps(256);
  // 3 ranks routing to 12 experts (4 per rank), empty ones included.
  std::vector<int64_t> counts(3 * 12);
  for (size_t i = 0; i < counts.size(); ++i) counts[i] = (i * 7 + 3) % 11 == 0 ? 0 : (i * 5) % 13;
  for (int rank = 0; rank < 3; ++rank) {
    const DispatchLayout l = make_dispatch_layout(counts, 3, rank, 12, 16);
    const int64_t P = l.padded_rows + 5;
    std::vector<int32_t> p_ref(P, 7), r_ref(l.recv_total + 1, 7), p_emu(P, 7),
        r_emu(l.recv_total + 1, 7);
    std::vector<int64_t> table(l.table.size());
    ref::dispatch_maps(l, p_ref.data(), P, r_ref.data());
    sm90::dispatch_maps(l, table.data(), p_emu.data(), P, r_emu.data(), nullptr);
    EXPECT_EQ(p_ref, p_emu) << "rank " << rank;
    EXPECT_EQ(r_ref, r_emu) << "rank " << rank;
  }
}

// Dedup: the plans of N ranks; each rank packs its records with slot words (emulated vs
// reference), the records rank 1 receives are assembled from the packed wires (what the
// all-to-all does), then the expansion and the unpack by its map. Cases: 3 ranks, k 3 of 6
// experts (2 per rank); and 2 ranks, k 36 of 72 (36 slots per record: the expansion's second
// round of 32 slots).
void dedup_case(int N, int k, int64_t E, const std::vector<int64_t>& T) {
  emu::make_warps(256);
  const int64_t H = 656;  // E4M3: 6 scale tiles, a partial record word
  std::vector<std::vector<int32_t>> idx(N);
  std::vector<int64_t> counts(N * E, 0);
  std::mt19937 rng(5);
  for (int s = 0; s < N; ++s)
    for (int64_t t = 0; t < T[s]; ++t) {
      std::vector<int32_t> e(static_cast<size_t>(E));
      for (int64_t i = 0; i < E; ++i) e[i] = static_cast<int32_t>(i);
      std::shuffle(e.begin(), e.end(), rng);
      for (int j = 0; j < k; ++j) {
        // 3 ranks: rank 2's tokens t % 4 == 0 all go to rank 1's experts 2, 3 and rank 0's 0.
        idx[s].push_back(N == 3 && s == 2 && t % 4 == 0 ? std::vector<int32_t>{2, 3, 0}[j] : e[j]);
        ++counts[s * E + idx[s].back()];
      }
    }
  std::vector<int64_t> all_tokens;
  for (int s = 0; s < N; ++s) {
    const std::vector<int64_t> c = dedup_token_counts(idx[s], k, N, E);
    all_tokens.insert(all_tokens.end(), c.begin(), c.end());
  }
  for (const Payload& p0 : kPayloads) {
    const Payload p{p0.dtype, p0.dtype == DType::E2M1x2 ? 256 : H};
    for (bool prob : {true, false}) {
      SCOPED_TRACE(::testing::Message() << to_string(p.dtype) << " prob " << prob);
      const DispatchWire w = dispatch_dedup_wire(p.dtype, p.H, k);
      std::vector<std::vector<uint8_t>> wires(N);
      std::vector<DedupPlan> plans(N);
      for (int s = 0; s < N; ++s) {
        const DispatchLayout l = make_dispatch_layout(counts, N, s, E, 16);
        plans[s] = make_dedup_plan(l, idx[s], k, all_tokens);
        const DedupPlan& pl = plans[s];
        Rows in = make_rows(p, T[s], T[s] * k, 40 + s);
        std::vector<int32_t> dev(pl.device_words() + 1);
        std::copy(pl.token.begin(), pl.token.end(), dev.begin());
        std::copy(pl.slots.begin(), pl.slots.end(), dev.begin() + pl.send_total);
        std::vector<uint8_t> w_ref(pl.send_total * w.row_bytes + 16, 0x5A),
            w_emu(pl.send_total * w.row_bytes + 16, 0x5A);
        for (std::vector<uint8_t>* out : {&w_ref, &w_emu}) {
          WireArgs a = row_args(in, p, w, T[s], prob);
          a.prob_offset = -1;
          a.map = dev.data();
          a.k = 1;
          a.slots = dev.data() + pl.send_total;
          a.slot_k = k;
          a.wire = out->data();
          a.wire_rows = a.map_rows = pl.send_total;
          if (out == &w_ref)
            ref::dispatch_pack(a);
          else
            sm90::dispatch_pack(a, nullptr);
        }
        EXPECT_EQ(w_ref, w_emu) << "pack of rank " << s;
        wires[s] = w_ref;
      }
      // Rank 1's receive buffer: from each source, its block of records to rank 1.
      const int me = 1;
      const DispatchLayout l = make_dispatch_layout(counts, N, me, E, 16);
      std::vector<uint8_t> recv;
      for (int s = 0; s < N; ++s) {
        const DedupPlan& pl = plans[s];
        const auto* b = wires[s].data() + pl.send_offsets[me] * w.row_bytes;
        recv.insert(recv.end(), b, b + pl.send_rows[me] * w.row_bytes);
      }
      ASSERT_EQ(static_cast<int64_t>(recv.size()), plans[me].recv_total * w.row_bytes);
      recv.resize(recv.size() + 16);
      const int64_t M = l.padded_rows + 3;
      Rows o_ref = make_rows(p, M, M, 60), o_emu = make_rows(p, M, M, 61);
      std::vector<int32_t> m_ref(M, 7), m_emu(M, 9);
      for (Rows* o : {&o_ref, &o_emu}) {
        WireArgs a = row_args(*o, p, w, M, false);
        a.wire = recv.data();
        a.wire_rows = plans[me].recv_total;
        a.slot_k = k;
        a.map_rows = M;
        a.data_done = true;  // as dispatch_dedup: the expansion writes the received rows' data
        float* out_prob = prob ? o->prob.ptr<float>() : nullptr;
        if (o == &o_ref) {
          a.map = m_ref.data();
          ref::dispatch_dedup_expand(a, m_ref.data(), M, out_prob);
          ref::dispatch_unpack(a);
        } else {
          a.map = m_emu.data();
          sm90::dispatch_dedup_expand(a, m_emu.data(), M, out_prob, nullptr);
          sm90::dispatch_unpack(a, nullptr);
        }
      }
      EXPECT_EQ(m_ref, m_emu) << "map";
      int rows = 0;
      for (int32_t q : m_ref) rows += q >= 0;
      int64_t want_rows = 0;
      for (int64_t e : l.tokens_per_expert) want_rows += e;
      EXPECT_EQ(rows, want_rows) << "every received pair lands in one row";
      EXPECT_TRUE(bytes_equal(o_ref.data, o_emu.data)) << "data";
      if (p.dtype != DType::BF16) EXPECT_TRUE(bytes_equal(o_ref.scale, o_emu.scale)) << "scale";
      if (prob) EXPECT_TRUE(bytes_equal(o_ref.prob, o_emu.prob)) << "prob";
    }
  }
}

TEST(DispatchEmu, DedupMatchesReference) {
  dedup_case(3, 3, 6, {21, 1, 34});
  dedup_case(2, 36, 72, {9, 5});
}

// build_dedup_plan's kernel against its reference: random routings of 1-5 ranks, top-1..8,
// tokens with pairs on one or every rank, an entry out of range (skipped by both), and a table
// whose send ends cut rank 0's records short (both stop writing there).
TEST(DispatchEmu, DedupBuildMatchesReference) {
  std::mt19937 rng(23);
  for (int N : {1, 2, 4, 5})
    for (int k : {1, 3, 8})
      for (int64_t T : {int64_t{1}, int64_t{37}, int64_t{700}}) {
        SCOPED_TRACE(::testing::Message() << "N " << N << " k " << k << " T " << T);
        const int El = 2;
        const int E = El * N;
        if (k > E) continue;
        std::vector<int32_t> idx;
        for (int64_t t = 0; t < T; ++t) {
          std::vector<int32_t> e(static_cast<size_t>(E));
          std::iota(e.begin(), e.end(), 0);
          std::shuffle(e.begin(), e.end(), rng);
          for (int j = 0; j < k; ++j) idx.push_back(e[j]);
        }
        if (T > 30) idx[7] = E + 3;  // out of range: skipped
        // A source-plan stand-in (any distinct rows do: both sides add them to base[e]).
        std::vector<int32_t> dest(idx.size());
        for (size_t i = 0; i < dest.size(); ++i) dest[i] = static_cast<int32_t>(3 * i + 1);
        std::vector<int32_t> table(static_cast<size_t>(E + 2 * N));
        for (int e = 0; e < E; ++e) table[e] = 100 * e - 5;
        std::vector<int64_t> per(N, 0);
        for (int64_t t = 0; t < T; ++t) {
          uint32_t m = 0;
          for (int j = 0; j < k; ++j) {
            const int32_t e = idx[t * k + j];
            if (e >= 0 && e < E) m |= 1u << (e / El);
          }
          for (int r = 0; r < N; ++r) per[r] += m >> r & 1u;
        }
        int64_t off = 0;
        for (int r = 0; r < N; ++r) {
          table[E + r] = static_cast<int32_t>(off);
          off += per[r];
          table[E + N + r] = static_cast<int32_t>(off - (r == 0 && per[r] > 2 ? 2 : 0));
        }
        const int64_t total = off;
        std::vector<int32_t> p_ref(total * (1 + k) + 1, 7), p_emu(total * (1 + k) + 1, 7),
            t_dev(table.size(), 0);
        detail::DedupBuildArgs a;
        a.idx = idx.data();
        a.dest_row = dest.data();
        a.tokens = static_cast<int32_t>(T);
        a.k = k;
        a.ranks = N;
        a.local_experts = El;
        a.experts = E;
        a.send_total = static_cast<int32_t>(total);
        a.table = table.data();
        a.plan = p_ref.data();
        ref::dispatch_dedup_build(a);
        a.table = t_dev.data();
        a.plan = p_emu.data();
        sm90::dispatch_dedup_build(a, table, t_dev.data(), nullptr);
        EXPECT_EQ(t_dev, table);
        EXPECT_EQ(p_emu, p_ref);
      }
}

}  // namespace
