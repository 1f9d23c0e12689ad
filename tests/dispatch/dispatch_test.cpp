// Dispatch / combine on the CPU: the counts layout against a direct construction (random routing,
// empty experts, all pairs on one expert, a rank receiving nothing, token counts not multiple of
// anything), the wire format, and the whole dispatch -> combine round trip on N simulated ranks
// (explicit byte exchange between the ranks' buffers, no communicator) against the single-GPU
// permute / unpermute of the same global routing: bit for bit, for BF16, FP8 and MXFP4 payloads.
// Bad inputs name the op and the argument.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <iterator>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "../permute/permute_test_util.h"
#include "common/test_data.h"
#include "common/test_util.h"
#include "dispatch/ep_test_util.h"
#include "fp8flow/dispatch.h"
#include "fp8flow/permute.h"

namespace fp8flow::test {
namespace {

// Per-rank counts [ranks][E] from each rank's routing.
std::vector<int64_t> counts_of(const std::vector<std::vector<int32_t>>& idx, int64_t E) {
  std::vector<int64_t> c(idx.size() * E, 0);
  for (size_t s = 0; s < idx.size(); ++s)
    for (int32_t e : idx[s])
      if (e >= 0 && e < E) ++c[s * E + e];
  return c;
}

// Direct construction of the permuted -> received map of rank r.
std::vector<int64_t> direct_map(const std::vector<int64_t>& cnt, int N, int r, int64_t E,
                                int align) {
  const int64_t El = E / N;
  std::vector<int64_t> recv_off(N + 1, 0);
  for (int s = 0; s < N; ++s) {
    int64_t n = 0;
    for (int64_t e = r * El; e < (r + 1) * El; ++e) n += cnt[s * E + e];
    recv_off[s + 1] = recv_off[s] + n;
  }
  std::vector<int64_t> map;
  for (int64_t e = 0; e < El; ++e) {
    int64_t n = 0;
    for (int s = 0; s < N; ++s) {
      int64_t first = recv_off[s];
      for (int64_t e2 = r * El; e2 < r * El + e; ++e2) first += cnt[s * E + e2];
      for (int64_t i = 0; i < cnt[s * E + r * El + e]; ++i) map.push_back(first + i);
      n += cnt[s * E + r * El + e];
    }
    for (int64_t p = n; p % align != 0; ++p) map.push_back(-1);
  }
  return map;
}

void check_layout(const std::vector<int64_t>& cnt, int N, int64_t E, int align) {
  std::vector<int64_t> sent_total(N, 0), recv_total(N, 0);
  for (int r = 0; r < N; ++r) {
    SCOPED_TRACE(::testing::Message()
                 << "rank " << r << " of " << N << ", E " << E << ", align " << align);
    const DispatchLayout l = make_dispatch_layout(cnt, N, r, E, align);
    const std::vector<int64_t> want = direct_map(cnt, N, r, E, align);
    ASSERT_EQ(l.padded_rows, static_cast<int64_t>(want.size()));
    for (int64_t p = 0; p < l.padded_rows; ++p) ASSERT_EQ(dispatch_recv_row(l, p), want[p]) << p;
    EXPECT_EQ(dispatch_recv_row(l, l.padded_rows), -1);
    // Every received row lands exactly once.
    std::vector<int> seen(l.recv_total, 0);
    for (int64_t q : want)
      if (q >= 0) ++seen[q];
    for (int64_t q = 0; q < l.recv_total; ++q) ASSERT_EQ(seen[q], 1) << q;
    // The device-side maps (CPU backend) agree.
    HostTensor p2r(DType::I32, 1, l.padded_rows + 3), r2p(DType::I32, 1, l.recv_total + 1);
    make_dispatch_maps(l, {}, p2r.v, r2p.v);
    for (int64_t p = 0; p < l.padded_rows + 3; ++p)
      ASSERT_EQ(p2r.ptr<int32_t>()[p], p < l.padded_rows ? want[p] : -1);
    for (int64_t p = 0; p < l.padded_rows; ++p)
      if (want[p] >= 0) ASSERT_EQ(r2p.ptr<int32_t>()[want[p]], p);
    // Sizes.
    int64_t ms = 0;
    for (int64_t e = 0; e < l.local_experts; ++e) {
      EXPECT_EQ(l.m_splits[e] % align, 0);
      EXPECT_EQ(l.offsets[e], ms);
      ms += l.m_splits[e];
    }
    EXPECT_EQ(ms, l.padded_rows);
    sent_total[r] = l.send_total;
    recv_total[r] = l.recv_total;
    for (int j = 0; j < N; ++j) {
      const DispatchLayout lj = make_dispatch_layout(cnt, N, j, E, align);
      EXPECT_EQ(l.send_rows[j], lj.recv_rows[r]) << "rank " << r << " -> " << j;
      EXPECT_EQ(l.max_recv_total, lj.max_recv_total);
    }
  }
  EXPECT_EQ(std::accumulate(sent_total.begin(), sent_total.end(), int64_t{0}),
            std::accumulate(recv_total.begin(), recv_total.end(), int64_t{0}));
}

TEST(DispatchLayout, MatchesDirectConstruction) {
  for (int N : {1, 2, 3, 4}) {
    for (int64_t El : {1, 2, 5}) {
      const int64_t E = El * N;
      for (int align : {1, 16}) {
        std::vector<std::vector<int32_t>> idx;
        for (int s = 0; s < N; ++s)
          idx.push_back(route_uniform(37 + 11 * s, std::min<int64_t>(3, E), E, 7 * s + N));
        check_layout(counts_of(idx, E), N, E, align);
      }
    }
  }
}

TEST(DispatchLayout, AdversarialCounts) {
  const int N = 4;
  const int64_t E = 8;
  // All pairs of every rank on one expert (rank 2's first).
  std::vector<int64_t> one(N * E, 0);
  for (int s = 0; s < N; ++s) one[s * E + 4] = 100 + s;
  check_layout(one, N, E, 16);
  // Nothing at all.
  check_layout(std::vector<int64_t>(N * E, 0), N, E, 16);
  // Rank 1 receives nothing, rank 3 sends nothing, empty experts inside segments.
  std::vector<int64_t> c(N * E, 0);
  for (int s = 0; s < 3; ++s)
    for (int64_t e : {0, 1, 5, 7}) c[s * E + e] = 3 * s + e + 1;
  check_layout(c, N, E, 8);
  const DispatchLayout l1 = make_dispatch_layout(c, N, 1, E, 8);
  EXPECT_EQ(l1.recv_total, 0);
  EXPECT_EQ(l1.padded_rows, 0);
  const DispatchLayout l3 = make_dispatch_layout(c, N, 3, E, 8);
  EXPECT_EQ(l3.send_total, 0);
}

// FP8 scales travel as E8M0 codes: every power of two of the scale range arrives with its exact
// F32 bits (2^-127 is an F32 subnormal); anything else arrives as NaN, never as another scale.
TEST(DispatchWireScale, PowersOfTwoExactOthersNaN) {
  const float pow2[] = {0x1p-127f, 0x1p-126f, 0x1p-9f, 1.0f, 2.0f, 0x1p100f, 0x1p127f};
  const float odd[] = {1.5f,      0.0f, -1.0f, -0.0f,        std::numeric_limits<float>::infinity(),
                       0x1p-130f, NAN,  3.0f,  0x1.000002p0f};
  std::vector<float> all(std::begin(pow2), std::end(pow2));
  all.insert(all.end(), std::begin(odd), std::end(odd));
  const int64_t T = static_cast<int64_t>(all.size()), H = 160;  // 2 tiles: the last one partial
  HostTensor x = random_bytes(DType::E4M3, T, H, 1), sc(DType::F32, 2, T);
  for (int64_t t = 0; t < T; ++t) {
    sc.ptr<float>()[t] = all[t];
    sc.ptr<float>()[T + t] = all[T - 1 - t];
  }
  const DispatchWire w = dispatch_wire(DType::E4M3, H, false);
  EXPECT_EQ(w.scale_bytes, 4);
  HostTensor map(DType::I32, 1, T), wire(DType::E4M3, T, w.row_bytes);
  for (int64_t t = 0; t < T; ++t) map.ptr<int32_t>()[t] = static_cast<int32_t>(t);
  dispatch_pack({x.v, sc.v, {}}, map.v, 1, wire.v);
  HostTensor ox(DType::E4M3, T, H), os(DType::F32, 2, T);
  dispatch_unpack(wire.v, map.v, {ox.v, os.v, {}});
  EXPECT_TRUE(bytes_equal(ox, x));
  for (int64_t i = 0; i < 2 * T; ++i) {
    const float in = sc.ptr<float>()[i], out = os.ptr<float>()[i];
    const int64_t t = i % T, v = i < T ? t : T - 1 - t;
    SCOPED_TRACE(::testing::Message() << "scale " << in);
    EXPECT_EQ(wire.ptr<uint8_t>()[t * w.row_bytes + H + i / T],
              v < static_cast<int64_t>(std::size(pow2)) ? fmt::e8m0_from_f32(in) : 0xFF);
    if (v < static_cast<int64_t>(std::size(pow2)))
      EXPECT_EQ(fmt::f32_bits(out), fmt::f32_bits(in));
    else
      EXPECT_TRUE(std::isnan(out));
  }
}

TEST(DispatchLayout, WireFormat) {
  const DispatchWire bf = dispatch_wire(DType::BF16, 7168, true);
  const DispatchWire f8 = dispatch_wire(DType::E4M3, 7168, true);
  const DispatchWire mx = dispatch_wire(DType::E2M1x2, 7168, true);
  EXPECT_EQ(bf.row_bytes, 14352);
  EXPECT_EQ(f8.row_bytes, 7232);  // 7168 + 56 E8M0 scale codes + 4 -> 16s
  EXPECT_EQ(f8.scale_bytes, 56);
  EXPECT_EQ(f8.prob_offset, 7168 + 56);
  EXPECT_EQ(mx.row_bytes, 3824);
  EXPECT_EQ(dispatch_wire(DType::BF16, 7168, false).row_bytes, 14336);
  EXPECT_EQ(dispatch_wire(DType::E4M3, 144, false).row_bytes, 160);  // 144 + 2 (-> 4) -> 16s
  EXPECT_EQ(dispatch_wire(DType::E4M3, 144, false).scale_bytes, 4);
  const DispatchWire p = dispatch_wire(DType::F32, 0, true);
  EXPECT_EQ(p.row_bytes, 4);
  EXPECT_EQ(p.prob_offset, 0);
  EXPECT_EQ(dispatch_max_recv_rows(4, 100, 8, 2), 800);
}

// ---------------------------------------------------------------------------------------------
// N simulated ranks, one thread of control: each step of every rank runs in turn, and the
// all-to-all is a byte copy between the ranks' buffers.

void exchange(const std::vector<DispatchLayout>& ls, const std::vector<std::vector<uint8_t>>& send,
              std::vector<std::vector<uint8_t>>& recv, int64_t B, bool reverse) {
  const int N = static_cast<int>(ls.size());
  for (int r = 0; r < N; ++r) {
    for (int s = 0; s < N; ++s) {
      // s -> r: forward uses s's send_rows[r] at send_offsets[r], landing at r's recv_offsets[s].
      const int64_t n = reverse ? ls[s].recv_rows[r] : ls[s].send_rows[r];
      const int64_t src = reverse ? ls[s].recv_offsets[r] : ls[s].send_offsets[r];
      const int64_t dst = reverse ? ls[r].send_offsets[s] : ls[r].recv_offsets[s];
      const int64_t expect = reverse ? ls[r].send_rows[s] : ls[r].recv_rows[s];
      ASSERT_EQ(n, expect);
      if (n) std::memcpy(recv[r].data() + dst * B, send[s].data() + src * B, n * B);
    }
  }
}

struct Plan {
  HostTensor tpe, off, dest, src, inv;
  PermutationPlan p;
  Plan(int64_t T, int64_t k, int64_t E, int align)
      : tpe(DType::I32, 1, E),
        off(DType::I64, 1, E + 1),
        dest(DType::I32, T, k),
        src(DType::I32, 1, permutation_max_rows(T, k, E, align)),
        inv(DType::I32, 1, 1) {
    p = {tpe.v, off.v, dest.v, src.v, inv.v};
  }
  int64_t rows() const {
    return off.buf.empty() ? 0 : reinterpret_cast<const int64_t*>(off.buf.data())[off.v.cols - 1];
  }
};

// Columns [c0, c0 + n) of a [rows][cols] tensor (the FP8 scales of a row range).
HostTensor slice_cols(const HostTensor& t, int64_t c0, int64_t n) {
  HostTensor o(t.v.dtype, t.v.rows, n);
  const size_t el = dtype_bits(t.v.dtype) / 8;
  for (int64_t r = 0; r < t.v.rows; ++r)
    std::memcpy(o.buf.data() + r * n * el, t.buf.data() + (r * t.v.cols + c0) * el, n * el);
  return o;
}

enum class Kind { Bf16, Fp8, Mx };

struct RoundTripCase {
  int N = 2;
  int64_t El = 2, H = 256, k = 2;
  std::vector<int64_t> T;  // tokens per rank
  Kind kind = Kind::Fp8;
  bool probs = true;
  int align = 16;
  int routing = 0;  // 0 uniform, 1 skewed, 2 all on expert 1, 3 rank 0's experts get nothing
  uint64_t seed = 1;
};

void round_trip(const RoundTripCase& cs) {
  const int N = cs.N;
  const int64_t El = cs.El, E = El * N, H = cs.H, k = cs.k;
  const DType dd = cs.kind == Kind::Bf16  ? DType::BF16
                   : cs.kind == Kind::Fp8 ? DType::E4M3
                                          : DType::E2M1x2;
  // Routing and inputs per rank; the global problem is their concatenation.
  std::vector<std::vector<int32_t>> idx(N);
  std::vector<int32_t> gidx;
  int64_t Tg = 0;
  for (int s = 0; s < N; ++s) {
    const int64_t T = cs.T[s];
    switch (cs.routing) {
      case 0:
        idx[s] = route_uniform(T, k, E, cs.seed * 100 + s);
        break;
      case 1:
        idx[s] = route_skewed(T, k, E, cs.seed * 100 + s);
        break;
      case 2:
        idx[s] = route_constant(T, k, 1);
        break;
      default: {
        idx[s] = route_uniform(T, k, E, cs.seed * 100 + s);
        for (auto& e : idx[s])
          if (e < El) e = static_cast<int32_t>(El + e % (E - El));
      }
    }
    gidx.insert(gidx.end(), idx[s].begin(), idx[s].end());
    Tg += T;
  }
  HostTensor gx = random_bytes(dd, Tg, H, cs.seed + 1);
  const int64_t tiles = (H + 127) / 128;
  HostTensor gsc = cs.kind == Kind::Fp8  ? random_pow2_scales(tiles, Tg, cs.seed + 2)
                   : cs.kind == Kind::Mx ? random_bytes(DType::E8M0, Tg, H / 32, cs.seed + 2)
                                         : HostTensor();
  std::vector<float> wv = make_values(Tg, k, Fill::Normal, cs.seed + 3);
  HostTensor gw = host_from_values(wv, DType::F32, Tg, k);

  // Single-GPU reference: the global plan and permute.
  HostTensor gidx_t(DType::I32, Tg, k);
  std::memcpy(gidx_t.buf.data(), gidx.data(), gidx.size() * 4);
  Plan gp(Tg, k, E, cs.align);
  make_permutation(gidx_t.v, E, gp.p, nullptr, 0, {cs.align});
  const int64_t Mg = gp.rows();
  HostTensor gxp(dd, Mg, H), gprob(DType::F32, 1, Mg);
  HostTensor gscp = cs.kind == Kind::Fp8  ? HostTensor(DType::F32, tiles, Mg)
                    : cs.kind == Kind::Mx ? HostTensor(DType::E8M0, Mg, H / 32)
                                          : HostTensor();
  PermutationPlan gpl = gp.p;
  gpl.src_slot.cols = Mg;
  const PermuteProbs gpr = cs.probs ? PermuteProbs{gw.v, gprob.v} : PermuteProbs{};
  if (cs.kind == Kind::Bf16)
    permute(gx.v, gxp.v, gpl, gpr);
  else
    permute(
        ScaledTensor{
            gx.v, gsc.v, cs.kind == Kind::Mx ? ScaleLayout::Mx1x32 : ScaleLayout::Rowwise1x128, {}},
        ScaledTensor{gxp.v,
                     gscp.v,
                     cs.kind == Kind::Mx ? ScaleLayout::Mx1x32 : ScaleLayout::Rowwise1x128,
                     {}},
        gpl, gpr);
  // Expert outputs (random BF16) and their single-GPU combine.
  HostTensor gyp = random_bytes(DType::BF16, Mg, H, cs.seed + 4);
  for (size_t i = 0; i < gyp.buf.size(); i += 2) gyp.buf[i + 1] &= 0x3F;  // finite, |v| < 2
  HostTensor gy(DType::BF16, Tg, H);
  unpermute(gyp.v, gy.v, gpl);
  HostTensor gdprob =
      host_from_values(make_values(1, Mg, Fill::Normal, cs.seed + 5), DType::F32, 1, Mg);
  HostTensor gdw(DType::F32, Tg, k);
  permute_probs_backward(gdprob.v, gpl, gdw.v);
  const int64_t* goff = reinterpret_cast<const int64_t*>(gp.off.buf.data());

  // EP: per-rank source plans (align 1 over E), layouts, pack.
  std::vector<Plan> sp;
  std::vector<DispatchLayout> ls;
  std::vector<HostTensor> x(N), sc(N), w(N);
  int64_t t0 = 0;
  std::vector<int64_t> tok0(N);
  for (int s = 0; s < N; ++s) {
    const int64_t T = cs.T[s];
    tok0[s] = t0;
    HostTensor it(DType::I32, T, k);
    if (!idx[s].empty()) std::memcpy(it.buf.data(), idx[s].data(), idx[s].size() * 4);
    sp.emplace_back(T, k, E, 1);
    make_permutation(it.v, E, sp.back().p, nullptr, 0, {1});
    x[s] = slice_rows(gx, t0, T);
    w[s] = slice_rows(gw, t0, T);
    if (cs.kind == Kind::Fp8) sc[s] = slice_cols(gsc, t0, T);
    if (cs.kind == Kind::Mx) sc[s] = slice_rows(gsc, t0, T);
    t0 += T;
  }
  const std::vector<int64_t> cnt = counts_of(idx, E);
  for (int s = 0; s < N; ++s) ls.push_back(make_dispatch_layout(cnt, N, s, E, cs.align));
  for (int s = 0; s < N; ++s) {
    std::vector<int64_t> mine(cnt.begin() + s * E, cnt.begin() + (s + 1) * E);
    for (int64_t e = 0; e < E; ++e)
      ASSERT_EQ(mine[e], reinterpret_cast<const int32_t*>(sp[s].tpe.buf.data())[e]);
  }
  const DispatchWire wire = dispatch_wire(dd, H, cs.probs);
  const int64_t B = wire.row_bytes;
  std::vector<std::vector<uint8_t>> send(N), recv(N);
  for (int s = 0; s < N; ++s) {
    send[s].assign(std::max<int64_t>(1, ls[s].send_total) * B, 0xA5);
    recv[s].assign(std::max<int64_t>(1, ls[s].recv_total) * B, 0xA5);
    const DispatchRows in{x[s].v, sc[s].v, cs.probs ? w[s].v : TensorView{}};
    const TensorView wt{send[s].data(), DType::E4M3, ls[s].send_total, B, -1, Device::Cpu};
    dispatch_pack(in, sp[s].src.v, static_cast<int>(k), wt);
  }
  exchange(ls, send, recv, B, false);

  // Expert side: unpack into the permuted layout and compare with the global permute.
  std::vector<HostTensor> p2r(N), r2p(N), yp(N), dpr(N);
  for (int r = 0; r < N; ++r) {
    SCOPED_TRACE(::testing::Message() << "expert rank " << r);
    const DispatchLayout& l = ls[r];
    p2r[r] = HostTensor(DType::I32, 1, l.padded_rows + 5);
    r2p[r] = HostTensor(DType::I32, 1, std::max<int64_t>(1, l.recv_total));
    make_dispatch_maps(l, {}, p2r[r].v, r2p[r].v);
    const int64_t M = l.padded_rows + 5;  // extra rows: written as pad rows
    HostTensor xp(dd, M, H), prob(DType::F32, 1, M);
    HostTensor scp = cs.kind == Kind::Fp8  ? HostTensor(DType::F32, tiles, M)
                     : cs.kind == Kind::Mx ? HostTensor(DType::E8M0, M, H / 32)
                                           : HostTensor();
    const TensorView wt{recv[r].data(), DType::E4M3, l.recv_total, B, -1, Device::Cpu};
    dispatch_unpack(wt, p2r[r].v, DispatchRows{xp.v, scp.v, cs.probs ? prob.v : TensorView{}});
    const int64_t m0 = goff[r * El], Ml = goff[(r + 1) * El] - m0;
    ASSERT_EQ(Ml, l.padded_rows);
    EXPECT_TRUE(bytes_equal(slice_rows(xp, 0, Ml), slice_rows(gxp, m0, Ml)));
    HostTensor zero_pad(dd, 5, H, 0);
    EXPECT_TRUE(bytes_equal(slice_rows(xp, Ml, 5), zero_pad));
    if (cs.kind == Kind::Fp8) {
      EXPECT_TRUE(bytes_equal(slice_cols(scp, 0, Ml), slice_cols(gscp, m0, Ml)));
      for (int64_t b = 0; b < tiles; ++b)
        for (int64_t i = Ml; i < M; ++i)
          EXPECT_EQ(scp.ptr<float>()[b * M + i], std::ldexp(1.0f, -127));
    }
    if (cs.kind == Kind::Mx)
      EXPECT_TRUE(bytes_equal(slice_rows(scp, 0, Ml), slice_rows(gscp, m0, Ml)));
    if (cs.probs) {
      EXPECT_TRUE(bytes_equal(slice_cols(prob, 0, Ml), slice_cols(gprob, m0, Ml)));
      for (int64_t i = Ml; i < M; ++i) EXPECT_EQ(prob.ptr<float>()[i], 0.0f);
    }
    yp[r] = slice_rows(gyp, m0, Ml);
    dpr[r] = slice_cols(gdprob, m0, Ml);
  }

  // Combine: rows and a prob vector back, then unpermute / permute_probs_backward per source.
  const DispatchWire rw = dispatch_wire(DType::BF16, H, false);
  std::vector<std::vector<uint8_t>> csend(N), crecv(N), psend(N), precv(N);
  for (int r = 0; r < N; ++r) {
    const DispatchLayout& l = ls[r];
    csend[r].assign(std::max<int64_t>(1, l.recv_total) * rw.row_bytes, 0xA5);
    crecv[r].assign(std::max<int64_t>(1, l.send_total) * rw.row_bytes, 0xA5);
    psend[r].assign(std::max<int64_t>(1, l.recv_total) * 4, 0xA5);
    precv[r].assign(std::max<int64_t>(1, l.send_total) * 4, 0xA5);
    dispatch_pack(
        DispatchRows{yp[r].v, {}, {}}, r2p[r].v, 1,
        TensorView{csend[r].data(), DType::E4M3, l.recv_total, rw.row_bytes, -1, Device::Cpu});
    dispatch_pack(DispatchRows{{}, {}, dpr[r].v}, r2p[r].v, 1,
                  TensorView{psend[r].data(), DType::E4M3, l.recv_total, 4, -1, Device::Cpu});
  }
  exchange(ls, csend, crecv, rw.row_bytes, true);
  exchange(ls, psend, precv, 4, true);
  for (int s = 0; s < N; ++s) {
    SCOPED_TRACE(::testing::Message() << "source rank " << s);
    const int64_t T = cs.T[s], n = ls[s].send_total;
    HostTensor y(DType::BF16, T, H), dw(DType::F32, T, k);
    unpermute(TensorView{crecv[s].data(), DType::BF16, n, H, -1, Device::Cpu}, y.v, sp[s].p);
    permute_probs_backward(TensorView{precv[s].data(), DType::F32, 1, n, -1, Device::Cpu}, sp[s].p,
                           dw.v);
    EXPECT_TRUE(bytes_equal(y, slice_rows(gy, tok0[s], T)));
    EXPECT_TRUE(bytes_equal(dw, slice_rows(gdw, tok0[s], T)));
  }
}

TEST(Dispatch, RoundTripEqualsSingleGpuPermute) {
  for (Kind kind : {Kind::Bf16, Kind::Fp8, Kind::Mx}) {
    for (int N : {1, 2, 3, 4}) {
      for (int routing : {0, 1, 2, 3}) {
        if (routing == 3 && N == 1) continue;
        RoundTripCase cs;
        cs.N = N;
        cs.kind = kind;
        cs.routing = routing;
        cs.El = routing == 1 ? 3 : 2;
        cs.k = routing == 0 ? 3 : 2;
        cs.H = kind == Kind::Mx ? 256 : (kind == Kind::Fp8 ? 144 : 200);
        cs.probs = (N + routing) % 2 == 0;
        for (int s = 0; s < N; ++s) cs.T.push_back(s == 1 ? 1 : 13 + 7 * s);
        cs.seed = 10 * N + routing;
        SCOPED_TRACE(::testing::Message()
                     << "kind " << int(kind) << " N " << N << " routing " << routing);
        round_trip(cs);
      }
    }
  }
}

TEST(Dispatch, RoundTripAlignOneAndLargerK) {
  RoundTripCase cs;
  cs.N = 4;
  cs.El = 3;
  cs.k = 8;
  cs.align = 1;
  cs.T = {5, 0, 9, 2};
  cs.kind = Kind::Fp8;
  cs.H = 384;
  round_trip(cs);
  cs.align = 128;
  cs.kind = Kind::Bf16;
  cs.H = 64;
  round_trip(cs);
}

// ---------------------------------------------------------------------------------------------
// Pipelined dispatch / combine (DispatchOptions::chunks) on InProcess ranks: every chunk count
// gives the bytes of chunks = 1 (which the round trip above pins to the single-GPU permute), for
// every payload, with ranks of 0 and 1 tokens (peers sending 0 rows, or fewer rows than chunks).
struct PipeOut {
  HostTensor xp, sc, prob, y, dprob;
};

// routing: 0 uniform, 1 skewed, 2 rank 0's experts get nothing, 3 every pair on the last rank's
// first expert. in_place On: the buffers are exactly the in-place minimum (dispatch_in_place).
std::vector<PipeOut> run_pipe(Kind kind, bool probs, int N, const std::vector<int64_t>& T,
                              int routing, int chunks, int align = 16,
                              InPlace in_place = InPlace::Auto, bool dedup = false,
                              int64_t k_pairs = 2) {
  const int64_t El = 3, E = El * N, k = k_pairs;
  const int64_t H = kind == Kind::Mx ? 256 : (kind == Kind::Fp8 ? 144 : 200);
  const DType dd = kind == Kind::Bf16  ? DType::BF16
                   : kind == Kind::Fp8 ? DType::E4M3
                                       : DType::E2M1x2;
  const int64_t tiles = (H + 127) / 128;
  std::vector<PipeOut> outs(N);
  run_in_process(N, [&](Communicator& comm) {
    const int s = comm.rank();
    const uint64_t seed = 1000 * s + 7;
    std::vector<int32_t> idx =
        routing == 1 ? route_skewed(T[s], k, E, seed) : route_uniform(T[s], k, E, seed);
    if (routing == 2)
      for (auto& e : idx)
        if (e < El) e = static_cast<int32_t>(El + e % (E - El));
    if (routing == 3) idx = route_constant(T[s], 1, static_cast<int32_t>((N - 1) * El));
    const int64_t kk = routing == 3 ? 1 : k;
    HostTensor it(DType::I32, T[s], kk);
    if (!idx.empty()) std::memcpy(it.buf.data(), idx.data(), idx.size() * 4);
    Plan sp(T[s], kk, E, 1);
    make_permutation(it.v, E, sp.p, nullptr, 0, {1});
    std::vector<int64_t> mine(E, 0);
    for (int32_t e : idx) ++mine[e];
    const DispatchLayout l = exchange_dispatch_counts(comm, mine, E, align);
    HostTensor x = random_bytes(dd, T[s], H, seed + 1);
    HostTensor sc = kind == Kind::Fp8  ? random_pow2_scales(tiles, T[s], seed + 2)
                    : kind == Kind::Mx ? random_bytes(DType::E8M0, T[s], H / 32, seed + 2)
                                       : HostTensor();
    HostTensor w = random_bytes(DType::F32, T[s], kk, seed + 3);
    HostTensor p2r(DType::I32, 1, l.padded_rows + 3), r2p(DType::I32, 1, l.recv_total + 1);
    make_dispatch_maps(l, {}, p2r.v, r2p.v);
    const int64_t M = l.padded_rows + 3;
    PipeOut& o = outs[s];
    o.xp = HostTensor(dd, M, H);
    o.sc = kind == Kind::Fp8  ? HostTensor(DType::F32, tiles, M)
           : kind == Kind::Mx ? HostTensor(DType::E8M0, M, H / 32)
                              : HostTensor();
    o.prob = HostTensor(DType::F32, 1, M);
    const int64_t B = dispatch_wire(dd, H, probs).row_bytes;
    HostTensor send(DType::E4M3, l.send_total + 1, B), recv(DType::E4M3, l.recv_total + 1, B);
    DispatchBuffers buf{send.buf.data(), send.buf.size(), recv.buf.data(), recv.buf.size()};
    const DispatchOptions opts{chunks, in_place};
    std::vector<uint8_t> ip_send, ip_recv;
    if (dispatch_in_place(opts)) {  // exactly the in-place need (data + side records)
      const DispatchWire wi = dispatch_wire(dd, H, probs);
      const int64_t side = wi.scale_bytes + (probs ? 4 : 0);
      ip_send.assign(l.send_total * (wi.data_bytes + side), 0xA5);
      ip_recv.assign(l.recv_total * side, 0xA5);
      buf = {ip_send.empty() ? nullptr : ip_send.data(), ip_send.size(),
             ip_recv.empty() ? nullptr : ip_recv.data(), ip_recv.size()};
    }
    if (dedup) {  // one record per (token, rank); buffers exactly the dedup need
      const DedupPlan plan = exchange_dedup_plan(comm, l, idx, static_cast<int>(kk));
      const int64_t Bd = dispatch_dedup_wire(dd, H, static_cast<int>(kk)).row_bytes;
      std::vector<uint8_t> ds(plan.send_total * Bd, 0xA5), dr(plan.recv_total * Bd, 0xA5);
      HostTensor pdev(DType::I32, 1, plan.device_words() + 1), map(DType::I32, 1, M);
      upload_dedup_plan(plan, pdev.v);
      dispatch_dedup(comm, l, plan, {x.v, sc.v, probs ? w.v : TensorView{}}, pdev.v, map.v,
                     {o.xp.v, o.sc.v, probs ? o.prob.v : TensorView{}},
                     {ds.empty() ? nullptr : ds.data(), ds.size(), dr.empty() ? nullptr : dr.data(),
                      dr.size()});
    } else {
      dispatch(comm, l, {x.v, sc.v, probs ? w.v : TensorView{}}, sp.src.v, static_cast<int>(kk),
               p2r.v, {o.xp.v, o.sc.v, probs ? o.prob.v : TensorView{}}, buf, nullptr, opts);
    }
    // Combine: BF16 rows and a prob vector back.
    HostTensor yp = random_bytes(DType::BF16, M, 64, seed + 4);
    HostTensor dp = random_bytes(DType::F32, 1, M, seed + 5);
    o.y = HostTensor(DType::BF16, l.send_total, 64);
    o.dprob = HostTensor(DType::F32, 1, l.send_total);
    HostTensor csend(DType::E4M3, l.recv_total + 1, 128);
    DispatchBuffers cbuf{csend.buf.data(), csend.buf.size(), nullptr, 0};
    if (dispatch_in_place(opts)) cbuf = {};  // combine in place needs no buffer
    combine(comm, l, {yp.v, {}, {}}, r2p.v, o.y.v, cbuf, nullptr, opts);
    combine(comm, l, {{}, {}, dp.v}, r2p.v, o.dprob.v, cbuf, nullptr, opts);
  });
  return outs;
}

// One pipeline case: payload kind, with/without probs, ranks, tokens per rank, routing pattern.
struct PipeCase {
  Kind kind;
  bool probs;
  int N;
  std::vector<int64_t> T;
  int routing;
};

// Every output of every rank of `got` equals `ref` bit for bit (scales only for FP8/MXFP4).
void expect_pipes_equal(const std::vector<PipeOut>& got, const std::vector<PipeOut>& ref,
                        const PipeCase& cs) {
  for (int r = 0; r < cs.N; ++r) {
    SCOPED_TRACE(::testing::Message() << "rank " << r);
    EXPECT_TRUE(bytes_equal(got[r].xp, ref[r].xp)) << "xp";
    if (cs.kind != Kind::Bf16) EXPECT_TRUE(bytes_equal(got[r].sc, ref[r].sc)) << "scales";
    EXPECT_TRUE(bytes_equal(got[r].prob, ref[r].prob)) << "prob";
    EXPECT_TRUE(bytes_equal(got[r].y, ref[r].y)) << "combine";
    EXPECT_TRUE(bytes_equal(got[r].dprob, ref[r].dprob)) << "combine prob";
  }
}

TEST(Dispatch, PipelinedChunksAreBitIdentical) {
  const std::vector<PipeCase> cases = {
      {Kind::Bf16, true, 1, {9}, 0},           {Kind::Bf16, true, 2, {13, 1}, 0},
      {Kind::Fp8, true, 3, {0, 11, 1}, 1},     {Kind::Fp8, false, 4, {5, 0, 9, 2}, 2},
      {Kind::Mx, false, 4, {17, 1, 0, 6}, 0},  {Kind::Mx, true, 2, {1, 1}, 2},
      {Kind::Bf16, false, 3, {40, 23, 31}, 1},
  };
  for (const PipeCase& cs : cases) {
    SCOPED_TRACE(::testing::Message() << "kind " << int(cs.kind) << " N " << cs.N << " routing "
                                      << cs.routing << " probs " << cs.probs);
    const std::vector<PipeOut> ref = run_pipe(cs.kind, cs.probs, cs.N, cs.T, cs.routing, 1);
    for (int chunks : {0, 2, 3, 4, 7}) {
      SCOPED_TRACE(::testing::Message() << "chunks " << chunks);
      expect_pipes_equal(run_pipe(cs.kind, cs.probs, cs.N, cs.T, cs.routing, chunks), ref, cs);
    }
  }
}

// The cases of the in-place and dedup tests: every payload with and without probs, 1-4 ranks,
// ranks with 0 / 1 tokens, empty experts (routing 2), every pair on one expert (routing 3).
const std::vector<PipeCase>& variant_cases() {
  static const std::vector<PipeCase> cases = {
      {Kind::Bf16, true, 1, {9}, 0},
      {Kind::Bf16, false, 2, {13, 1}, 1},
      {Kind::Fp8, true, 3, {0, 11, 1}, 1},
      {Kind::Fp8, false, 4, {5, 0, 9, 2}, 2},
      {Kind::Fp8, true, 4, {40, 23, 31, 7}, 3},
      {Kind::Mx, false, 4, {17, 1, 0, 6}, 0},
      {Kind::Mx, true, 2, {1, 1}, 2},
      {Kind::Mx, true, 3, {30, 0, 12}, 3},
      {Kind::Bf16, true, 4, {0, 0, 0, 0}, 0},
      {Kind::Bf16, false, 3, {40, 23, 31}, 3},
      {Kind::Bf16, false, 3, {40, 23, 31}, 1},
  };
  return cases;
}

// In-place dispatch / combine (DispatchOptions::in_place = On) against the record path (Off,
// chunks 1), bit for bit, including the pad rows and the rows past padded_rows (outputs start
// poisoned, so a row the in-place path forgets shows): 1-4 ranks, every payload with and without
// probs, ranks with 0 / 1 tokens (peers sending nothing), empty experts, all pairs on one expert,
// align 1 / 16 / 128, chunks 1 and 3 (run blocks cut inside (peer, expert) blocks).
TEST(Dispatch, InPlaceIsBitIdentical) {
  for (const PipeCase& cs : variant_cases()) {
    for (int align : {1, 16, 128}) {
      SCOPED_TRACE(::testing::Message()
                   << "kind " << int(cs.kind) << " N " << cs.N << " routing " << cs.routing
                   << " probs " << cs.probs << " align " << align);
      const std::vector<PipeOut> ref =
          run_pipe(cs.kind, cs.probs, cs.N, cs.T, cs.routing, 1, align, InPlace::Off);
      for (int chunks : {1, 3}) {
        SCOPED_TRACE(::testing::Message() << "chunks " << chunks);
        expect_pipes_equal(
            run_pipe(cs.kind, cs.probs, cs.N, cs.T, cs.routing, chunks, align, InPlace::On), ref,
            cs);
      }
    }
  }
}

// Dedup dispatch (one record per (token, rank), expanded on the destination) against the record
// path, bit for bit, for every payload with and without probs, 1-4 ranks, ranks with 0 / 1
// tokens, empty experts, every pair on one expert, align 1 / 16 / 128, k 1 / 2 / 3 (a token with
// several experts on one rank: one record, several rows).
TEST(Dispatch, DedupIsBitIdentical) {
  for (const PipeCase& cs : variant_cases()) {
    for (int align : {1, 16, 128}) {
      for (int64_t k : {1, 2, 3}) {
        SCOPED_TRACE(::testing::Message()
                     << "kind " << int(cs.kind) << " N " << cs.N << " routing " << cs.routing
                     << " probs " << cs.probs << " align " << align << " k " << k);
        const std::vector<PipeOut> ref =
            run_pipe(cs.kind, cs.probs, cs.N, cs.T, cs.routing, 1, align, InPlace::Off, false, k);
        expect_pipes_equal(
            run_pipe(cs.kind, cs.probs, cs.N, cs.T, cs.routing, 1, align, InPlace::Off, true, k),
            ref, cs);
      }
    }
  }
}

// The plan: records per (token, rank), the slots' rows are the record path's permuted rows of the
// pairs, and bad routings / counts are rejected with the argument named.
TEST(Dispatch, DedupPlan) {
  // 2 ranks, 2 experts each (E 4), k 3; rank 0's tokens: t0 -> {0, 1, 2}, t1 -> {3, 2, 0},
  // t2 -> {1, 0, 3}; rank 1 routes 1 token -> {2, 3, 1}.
  const std::vector<int32_t> idx0 = {0, 1, 2, 3, 2, 0, 1, 0, 3}, idx1 = {2, 3, 1};
  std::vector<int64_t> counts(8, 0);
  for (int32_t e : idx0) ++counts[e];
  for (int32_t e : idx1) ++counts[4 + e];
  const DispatchLayout l0 = make_dispatch_layout(counts, 2, 0, 4, 1);
  const DispatchLayout l1 = make_dispatch_layout(counts, 2, 1, 4, 1);
  EXPECT_EQ(dedup_token_counts(l0, idx0, 3), (std::vector<int64_t>{3, 3}));
  EXPECT_EQ(dedup_token_counts(l1, idx1, 3), (std::vector<int64_t>{1, 1}));
  const std::vector<int64_t> all = {3, 3, 1, 1};
  const DedupPlan p = make_dedup_plan(l0, idx0, 3, all);
  EXPECT_EQ(p.send_total, 6);  // 9 pairs, 6 (token, rank) records
  EXPECT_EQ(p.recv_total, 4);  // 3 from itself, 1 from rank 1
  EXPECT_EQ(p.token, (std::vector<int32_t>{0, 1, 2, 0, 1, 2}));
  // On rank 0 (align 1): expert 0 gets rank 0's (t0 j0), (t1 j2), (t2 j1): rows 0, 1, 2; expert 1
  // rank 0's (t0 j1), (t2 j0), then rank 1's (t0 j2): rows 3, 4, 5. Record 0 is token 0 to rank
  // 0: slot rows (0, 3, none); record 2 is token 2: (4, 2, none); record 3 is token 0 to rank 1
  // (experts 2, 3 there; expert 2's segment on rank 1 starts at 0): (none, none, 0).
  EXPECT_EQ(p.slots.size(), 6u * 3u);
  EXPECT_EQ(std::vector<int32_t>(p.slots.begin(), p.slots.begin() + 3),
            (std::vector<int32_t>{0, 3, -1}));
  EXPECT_EQ(std::vector<int32_t>(p.slots.begin() + 6, p.slots.begin() + 12),
            (std::vector<int32_t>{4, 2, -1, -1, -1, 0}));
  EXPECT_EQ(p.device_words(), 6 * (1 + 3));
  EXPECT_EQ(dedup_plan_max_words(3, 3, 2), 3 * 2 * (1 + 3));
  // Bad input: routing that is not the layout's, wrong all_tokens, out-of-range experts.
  auto msg = [](auto&& f) {
    try {
      f();
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  const std::vector<int32_t> other = {0, 1, 2, 3, 2, 0, 1, 0, 2};
  EXPECT_NE(msg([&] {
              make_dedup_plan(l0, other, 3, all);
            }).find("make_dedup_plan: topk_idx: expected the routing of the layout's counts"),
            std::string::npos);
  EXPECT_NE(msg([&] {
              make_dedup_plan(l0, idx0, 3, std::vector<int64_t>{3, 2, 1, 1});
            }).find("make_dedup_plan: all_tokens: expected this rank's dedup_token_counts"),
            std::string::npos);
  const std::vector<int32_t> bad = {0, 1, 4};
  EXPECT_NE(msg([&] {
              dedup_token_counts(l0, bad, 3);
            }).find("dedup_token_counts: topk_idx: expected experts in [0, 4), got 4 at [0][2]"),
            std::string::npos);
  EXPECT_NE(msg([&] {
              dispatch_dedup_wire(DType::E4M3, 0, 8);
            }).find("dispatch_dedup_wire: hidden: expected > 0"),
            std::string::npos);
  EXPECT_EQ(dispatch_dedup_wire(DType::E4M3, 7168, 8).row_bytes, 7296);  // 7168 + 56 + 64 -> 16s
  EXPECT_EQ(dispatch_dedup_wire(DType::BF16, 7168, 8).row_bytes, 14336 + 64);
}

TEST(Dispatch, InPlaceOption) {
  EXPECT_EQ(dispatch_in_place({}), DispatchOptions::kAutoInPlace);
  EXPECT_FALSE(DispatchOptions::kAutoInPlace);  // the record path stays the default for now
  EXPECT_TRUE(dispatch_in_place({0, InPlace::On}));
  EXPECT_FALSE(dispatch_in_place({0, InPlace::Off}));
  DispatchOptions bad;
  bad.in_place = static_cast<InPlace>(7);
  EXPECT_THROW(dispatch_in_place(bad), Error);
}

TEST(Dispatch, ChunkCount) {
  std::vector<int64_t> cnt(4 * 8, 0);
  cnt[3] = 1000;  // 1000 rows over 4 ranks: 250 mean
  const DispatchLayout l = make_dispatch_layout(cnt, 4, 0, 8, 1);
  EXPECT_EQ(dispatch_chunks(l, 14352, Device::Cpu), 1);   // auto on Cpu: 1
  EXPECT_EQ(dispatch_chunks(l, 14352, Device::Cuda), 1);  // 3.6 MB mean: 1
  EXPECT_EQ(dispatch_chunks(l, 65536, Device::Cuda), DispatchOptions::kAutoChunks);  // 16 MB mean
  EXPECT_EQ(dispatch_chunks(l, 16, Device::Cpu, {7}), 7);
  EXPECT_THROW(dispatch_chunks(l, 16, Device::Cpu, {-1}), Error);
  EXPECT_THROW(dispatch_chunks(l, 16, Device::Cpu, {65}), Error);
}

void expect_error(const std::function<void()>& f, const std::string& op, const std::string& arg) {
  try {
    f();
    ADD_FAILURE() << "no error (" << op << ", " << arg << ")";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("fp8flow::" + op + ":"), std::string::npos) << m;
    EXPECT_NE(m.find(arg), std::string::npos) << m;
  }
}

// build_dedup_plan (the device-side plan; here its CPU backend) writes the words
// upload_dedup_plan(make_dedup_plan(...)) writes, for random routings of 1-5 ranks, top-1..4,
// align 1/16/128, skewed (all of a rank's tokens on one expert) and with tokens of no pair on a
// rank; and make_dedup_plan_sizes gives make_dedup_plan's sizes. Also its argument checks.
TEST(Dispatch, DedupBuildMatchesHostPlan) {
  std::mt19937 rng(17);
  int cases = 0;
  for (int N : {1, 2, 3, 5})
    for (int k : {1, 2, 4})
      for (int align : {1, 16, 128})
        for (bool skew : {false, true}) {
          const int64_t El = 3, E = El * N;
          if (k > E) continue;
          const eptest::DedupRoutings d = eptest::dedup_routings(
              N, k, El, rng,
              [&](int s) { return s == 1 ? int64_t{0} : 1 + static_cast<int64_t>(rng() % 40); },
              skew);
          const auto& T = d.T;
          const auto& idx = d.idx;
          const auto& counts = d.counts;
          const auto& all = d.all_tokens;
          for (int s = 0; s < N; ++s) {
            SCOPED_TRACE(::testing::Message() << "N " << N << " k " << k << " align " << align
                                              << " skew " << skew << " rank " << s);
            const DispatchLayout l = make_dispatch_layout(counts, N, s, E, align);
            const DedupPlan want = make_dedup_plan(l, idx[s], k, all);
            const DedupPlan sizes = make_dedup_plan_sizes(l, T[s], k, all);
            EXPECT_TRUE(sizes.token.empty() && sizes.slots.empty());
            EXPECT_EQ(sizes.send_rows, want.send_rows);
            EXPECT_EQ(sizes.send_offsets, want.send_offsets);
            EXPECT_EQ(sizes.recv_rows, want.recv_rows);
            EXPECT_EQ(sizes.recv_offsets, want.recv_offsets);
            EXPECT_EQ(sizes.send_total, want.send_total);
            EXPECT_EQ(sizes.recv_total, want.recv_total);
            // The source plan: make_permutation(topk_idx, E_g, align 1).
            const HostPlan src = make_host_plan(idx[s], T[s], k, E, 1);
            std::vector<int64_t> off(static_cast<size_t>(E + 1));
            for (int64_t e = 0; e <= E; ++e) off[e] = src.offset(e);
            const HostTensor ids = host_i32(idx[s], T[s], k);
            HostTensor ref_words(DType::I32, 1, std::max<int64_t>(1, want.device_words()), 0x5A),
                got(DType::I32, 1, std::max<int64_t>(1, want.device_words()), 0xA5),
                work(DType::I32, 1, dedup_build_work_words(E, N));
            upload_dedup_plan(want, ref_words.v);
            build_dedup_plan(sizes, l, ids.v, src.dest.v, off, work.v, got.v);
            EXPECT_EQ(0, std::memcmp(got.buf.data(), ref_words.buf.data(),
                                     static_cast<size_t>(want.device_words()) * 4));
            ++cases;
          }
        }
  EXPECT_GT(cases, 100);
  // Argument checks.
  const std::vector<int32_t> idx = {0, 1, 1, 0};
  const std::vector<int64_t> cnt = {2, 2};
  const DispatchLayout l = make_dispatch_layout(cnt, 1, 0, 2, 1);
  const DedupPlan p = make_dedup_plan_sizes(l, 2, 2, std::vector<int64_t>{2});
  const HostPlan src = make_host_plan(idx, 2, 2, 2, 1);
  const HostTensor ids = host_i32(idx, 2, 2);
  HostTensor work(DType::I32, 1, dedup_build_work_words(2, 1)), pd(DType::I32, 1, p.device_words());
  const std::vector<int64_t> off = {0, 2, 4};
  build_dedup_plan(p, l, ids.v, src.dest.v, off, work.v, pd.v);  // the valid call
  HostTensor short_pd(DType::I32, 1, p.device_words() - 1), short_w(DType::I32, 1, 1);
  expect_error([&] { build_dedup_plan(p, l, ids.v, src.dest.v, off, work.v, short_pd.v); },
               "build_dedup_plan", "plan_dev");
  expect_error([&] { build_dedup_plan(p, l, ids.v, src.dest.v, off, short_w.v, pd.v); },
               "build_dedup_plan", "work");
  expect_error(
      [&] {
        build_dedup_plan(p, l, ids.v, src.dest.v, std::vector<int64_t>{0, 2}, work.v, pd.v);
      },
      "build_dedup_plan", "src_offsets");
  const HostTensor ids3 = host_i32({0, 1, 1}, 3, 1);
  expect_error([&] { build_dedup_plan(p, l, ids3.v, src.dest.v, off, work.v, pd.v); },
               "build_dedup_plan", "topk_idx");
  expect_error([&] { make_dedup_plan_sizes(l, 2, 2, std::vector<int64_t>{-1}); },
               "make_dedup_plan_sizes", "all_tokens");
}

// dispatch_dedup's argument checks, each naming the argument: a plan of another layout, rows
// that are not the plan's tokens, a wrong top-k weight count, short buffers and scratch, an
// output of another payload.
TEST(Dispatch, DedupBadInputs) {
  run_in_process(1, [&](Communicator& comm) {
    const int64_t T = 5, H = 144, E = 4, k = 2;
    std::vector<int32_t> idx = {0, 1, 2, 3, 0, 2, 1, 3, 3, 0};
    std::vector<int64_t> cnt(E, 0);
    for (int32_t e : idx) ++cnt[e];
    const DispatchLayout l = exchange_dispatch_counts(comm, cnt, E, 16);
    const DedupPlan plan = exchange_dedup_plan(comm, l, idx, static_cast<int>(k));
    const int64_t B = dispatch_dedup_wire(DType::E4M3, H, static_cast<int>(k)).row_bytes,
                  M = l.padded_rows;
    HostTensor x = random_bytes(DType::E4M3, T, H, 1), sc = random_pow2_scales(2, T, 2),
               w = random_bytes(DType::F32, T, k, 3), xp(DType::E4M3, M, H), sp(DType::F32, 2, M),
               pp(DType::F32, 1, M);
    HostTensor pdev(DType::I32, 1, plan.device_words()), map(DType::I32, 1, M);
    std::vector<uint8_t> snd(plan.send_total * B), rcv(plan.recv_total * B);
    const DispatchBuffers buf{snd.data(), snd.size(), rcv.data(), rcv.size()};
    const DispatchRows in{x.v, sc.v, w.v}, out{xp.v, sp.v, pp.v};
    auto run = [&](const DedupPlan& p, const DispatchRows& i, const TensorView& pd,
                   const TensorView& mp, const DispatchRows& o,
                   const DispatchBuffers& b) { dispatch_dedup(comm, l, p, i, pd, mp, o, b); };
    upload_dedup_plan(plan, pdev.v);
    run(plan, in, pdev.v, map.v, out, buf);  // the valid call
    DedupPlan other = plan;
    other.rank = 1;
    expect_error([&] { run(other, in, pdev.v, map.v, out, buf); }, "dispatch_dedup", "plan");
    HostTensor x4 = random_bytes(DType::E4M3, T - 1, H, 1), w4 = random_bytes(DType::F32, T, 1, 3);
    HostTensor sc4 = random_pow2_scales(2, T - 1, 2);
    expect_error(
        [&] {
          run(plan, {x4.v, sc4.v, {}}, pdev.v, map.v, {xp.v, sp.v, {}}, buf);
        },
        "dispatch_dedup", "in.data: expected 5 rows");
    expect_error(
        [&] {
          run(plan, {x.v, sc.v, w4.v}, pdev.v, map.v, out, buf);
        },
        "dispatch_dedup", "in.prob");
    expect_error(
        [&] {
          run(plan, in, pdev.v, map.v, out, {snd.data(), snd.size() - 1, rcv.data(), rcv.size()});
        },
        "dispatch_dedup", "buffers.send_bytes");
    HostTensor small(DType::I32, 1, 3);
    expect_error([&] { run(plan, in, small.v, map.v, out, buf); }, "dispatch_dedup", "plan_dev");
    expect_error([&] { upload_dedup_plan(plan, small.v); }, "upload_dedup_plan", "plan_dev");
    DedupPlan torn = plan;
    torn.slots.pop_back();
    expect_error([&] { upload_dedup_plan(torn, pdev.v); }, "upload_dedup_plan", "plan");
    expect_error([&] { run(plan, in, pdev.v, small.v, out, buf); }, "dispatch_dedup", "map");
    HostTensor xb(DType::BF16, M, H);
    expect_error(
        [&] {
          run(plan, in, pdev.v, map.v, {xb.v, {}, pp.v}, buf);
        },
        "dispatch_dedup", "out");
    expect_error(
        [&] {
          run(plan, {{}, {}, w.v}, pdev.v, map.v, out, buf);
        },
        "dispatch_dedup", "in.data");
  });
}

TEST(Dispatch, BadInputs) {
  std::vector<int64_t> cnt(2 * 4, 1);
  expect_error([&] { make_dispatch_layout(cnt, 2, 0, 5, 16); }, "make_dispatch_layout", "experts");
  expect_error([&] { make_dispatch_layout(cnt, 2, 2, 4, 16); }, "make_dispatch_layout", "rank");
  expect_error([&] { make_dispatch_layout(cnt, 2, 0, 4, 12); }, "make_dispatch_layout", "align");
  expect_error([&] { make_dispatch_layout(std::vector<int64_t>(7, 1), 2, 0, 4, 16); },
               "make_dispatch_layout", "all_counts");
  std::vector<int64_t> neg = cnt;
  neg[3] = -1;
  expect_error([&] { make_dispatch_layout(neg, 2, 0, 4, 16); }, "make_dispatch_layout",
               "all_counts");
  expect_error([&] { dispatch_wire(DType::E4M3, 100, true); }, "dispatch_wire", "hidden");
  expect_error([&] { dispatch_wire(DType::E2M1x2, 96, true); }, "dispatch_wire", "hidden");
  expect_error([&] { dispatch_wire(DType::I32, 128, true); }, "dispatch_wire", "data_dtype");
  expect_error([&] { dispatch_wire(DType::BF16, 0, false); }, "dispatch_wire", "with_prob");

  HostTensor x(DType::E4M3, 4, 128), sc(DType::F32, 1, 4), w(DType::F32, 4, 2);
  HostTensor map(DType::I32, 1, 8), wire(DType::E4M3, 8, 144), bad_wire(DType::E4M3, 8, 160);
  for (int i = 0; i < 8; ++i) map.ptr<int32_t>()[i] = i;
  dispatch_pack({x.v, sc.v, w.v}, map.v, 2, wire.v);  // valid
  auto pack_error = [&](const DispatchRows& in, const HostTensor& m, int k, const HostTensor& out,
                        const char* arg) {
    expect_error([&] { dispatch_pack(in, m.v, k, out.v); }, "dispatch_pack", arg);
  };
  pack_error({x.v, sc.v, w.v}, map, 2, bad_wire, "wire.cols");
  pack_error({x.v, sc.v, w.v}, map, 2, HostTensor(DType::BF16, 8, 72), "wire.dtype");
  pack_error({x.v, HostTensor(DType::F32, 2, 4).v, w.v}, map, 2, wire, "in.scale");
  pack_error({x.v, sc.v, w.v}, HostTensor(DType::I32, 1, 3), 2, wire, "map");
  pack_error({x.v, sc.v, w.v}, map, 0, wire, "k");
  HostTensor xb(DType::BF16, 4, 128);
  pack_error({xb.v, sc.v, {}}, map, 1, HostTensor(DType::E4M3, 8, 256), "in.scale");
  expect_error(
      [&] {
        dispatch_unpack(bad_wire.v, map.v, {x.v, sc.v, {}});
      },
      "dispatch_unpack", "wire.cols");
  pack_error({{}, {}, {}}, map, 1, wire, "in.prob");
  const DispatchLayout l = make_dispatch_layout(cnt, 2, 0, 4, 16);
  HostTensor p2r(DType::I32, 1, 3), r2p(DType::I32, 1, 64);
  expect_error([&] { make_dispatch_maps(l, {}, p2r.v, r2p.v); }, "make_dispatch_maps",
               "perm_to_recv");
}

}  // namespace
}  // namespace fp8flow::test
