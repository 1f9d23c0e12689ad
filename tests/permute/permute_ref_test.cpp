// CPU reference of the permute ops, checked against independent properties: the plan's invariants
// (stable expert order, padding, inverse row maps, invalid ids), row moves, the unpermute sum and
// its round trip, the backward passes; and the padding waste of each alignment at DeepSeek-V3
// shapes (printed).
#include <cinttypes>
#include <cstdio>

#include "permute_test_util.h"

namespace fp8flow::test {
namespace {

int64_t round_up(int64_t x, int64_t a) {
  return (x + a - 1) / a * a;
}

// Independent check of every plan field against the routing.
void check_plan(const std::vector<int32_t>& idx, int64_t T, int64_t k, int64_t E, int align,
                const HostPlan& p) {
  std::vector<int64_t> cnt(static_cast<size_t>(E), 0);
  int64_t invalid = 0;
  for (int32_t e : idx) {
    if (e >= 0 && e < E)
      ++cnt[static_cast<size_t>(e)];
    else
      ++invalid;
  }
  ASSERT_EQ(p.invalid(), invalid);
  ASSERT_EQ(p.offset(0), 0);
  for (int64_t e = 0; e < E; ++e) {
    ASSERT_EQ(p.count(e), cnt[static_cast<size_t>(e)]) << "expert " << e;
    ASSERT_EQ(p.offset(e + 1) - p.offset(e), round_up(cnt[static_cast<size_t>(e)], align)) << e;
    ASSERT_EQ(p.offset(e) % align, 0);
  }
  const int64_t m_pad = p.m_pad(E);
  ASSERT_LE(m_pad, permutation_max_rows(T, k, E, align));
  const int32_t* dest = p.dest_row();
  const int32_t* src = p.src_slot();
  for (int64_t i = 0; i < T * k; ++i) {
    const int32_t e = idx[static_cast<size_t>(i)];
    if (e < 0 || e >= E) {
      ASSERT_EQ(dest[i], -1) << "dropped pair " << i;
      continue;
    }
    ASSERT_GE(dest[i], p.offset(e));
    ASSERT_LT(dest[i], p.offset(e) + cnt[static_cast<size_t>(e)]);
    ASSERT_EQ(src[dest[i]], i);
  }
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = p.offset(e), n = cnt[static_cast<size_t>(e)];
    for (int64_t r = r0; r < r0 + n; ++r) {
      ASSERT_GE(src[r], 0);
      ASSERT_EQ(idx[static_cast<size_t>(src[r])], e);
      if (r > r0) ASSERT_GT(src[r], src[r - 1]) << "stable order inside expert " << e;
    }
    for (int64_t r = r0 + n; r < p.offset(e + 1); ++r) ASSERT_EQ(src[r], -1) << "pad row " << r;
  }
  for (int64_t r = m_pad; r < p.src.v.numel(); ++r) ASSERT_EQ(src[r], -1) << "row past M_pad";
}

TEST(PermutePlan, ReferenceInvariants) {
  for (const auto& rc : route_cases()) {
    for (int align : {1, 2, 8, 16, 32, 64, 128}) {
      for (DType od : {DType::I64, DType::I32}) {
        SCOPED_TRACE(std::string(rc.name) + " align " + std::to_string(align) + " offsets " +
                     to_string(od));
        // src_slot larger than the bound: the tail must be -1 too.
        const int64_t len = permutation_max_rows(rc.T, rc.k, rc.E, align) + 5;
        const HostPlan p = make_host_plan(rc.idx, rc.T, rc.k, rc.E, align, od, len);
        check_plan(rc.idx, rc.T, rc.k, rc.E, align, p);
      }
    }
  }
}

TEST(PermutePlan, ExactOrderSmallExample) {
  // T = 3, k = 2, E = 3, align 4: pairs (flat) 0:e2 1:e0 2:e0 3:e2 4:e9(invalid) 5:e2.
  const std::vector<int32_t> idx = {2, 0, 0, 2, 9, 2};
  const HostPlan p = make_host_plan(idx, 3, 2, 3, 4);
  EXPECT_EQ(p.count(0), 2);
  EXPECT_EQ(p.count(1), 0);
  EXPECT_EQ(p.count(2), 3);
  EXPECT_EQ(p.invalid(), 1);
  EXPECT_EQ(p.offset(1), 4);
  EXPECT_EQ(p.offset(2), 4);
  EXPECT_EQ(p.offset(3), 8);
  const std::vector<int32_t> dest(p.dest_row(), p.dest_row() + 6);
  EXPECT_EQ(dest, (std::vector<int32_t>{4, 0, 1, 5, -1, 6}));
  const std::vector<int32_t> src(p.src_slot(), p.src_slot() + 8);
  EXPECT_EQ(src, (std::vector<int32_t>{1, 2, -1, -1, 0, 3, 5, -1}));
}

// Padding waste of each alignment at the DeepSeek-V3 shard shape (T = 4096 tokens, top-8):
// E = 32 local experts and E = 256 experts, uniform and skewed routing. Printed for the docs.
TEST(PermutePlan, PaddingWaste) {
  const int64_t T = 4096, k = 8;
  std::printf("[padding waste] T=%" PRId64 " k=%" PRId64 " (rows = T*k = %" PRId64 ")\n", T, k,
              T * k);
  for (int64_t E : {32, 256}) {
    for (int skew = 0; skew < 2; ++skew) {
      const auto idx = skew ? route_skewed(T, k, E, 11) : route_uniform(T, k, E, 11);
      for (int align : {1, 8, 16, 32, 64, 128}) {
        const HostPlan p = make_host_plan(idx, T, k, E, align);
        const int64_t m_pad = p.m_pad(E);
        const double waste = 100.0 * double(m_pad - T * k) / double(T * k);
        std::printf("[padding waste] E=%-4" PRId64 " %-7s align=%-4d M_pad=%-6" PRId64
                    " pad rows=%-6" PRId64 " waste=%6.2f%%  (bound %" PRId64 ")\n",
                    E, skew ? "skewed" : "uniform", align, m_pad, m_pad - T * k, waste,
                    permutation_max_rows(T, k, E, align));
        EXPECT_LE(m_pad - T * k, E * (align - 1));
        if (align == 1) EXPECT_EQ(m_pad, T * k);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Row moves.

// Checks out row r against in row src_slot[r] / k (bytes), zeros on pad rows.
void check_rows(const HostTensor& in, const HostTensor& out, const HostPlan& p, int64_t k) {
  const size_t rb = in.v.row_bytes();
  const int64_t pairs = in.v.rows * k;
  for (int64_t r = 0; r < out.v.rows; ++r) {
    const int32_t s = p.src_slot()[r];
    const uint8_t* o = out.buf.data() + r * rb;
    if (s >= 0 && s < pairs) {
      ASSERT_EQ(std::memcmp(o, in.buf.data() + (s / k) * rb, rb), 0) << "row " << r;
    } else {
      for (size_t b = 0; b < rb; ++b) ASSERT_EQ(o[b], 0) << "pad row " << r;
    }
  }
}

void check_probs(const HostTensor& w, const HostTensor& prob, const HostPlan& p, int64_t pairs) {
  for (int64_t r = 0; r < prob.v.numel(); ++r) {
    const int32_t s = p.src_slot()[r];
    const float want = s >= 0 && s < pairs ? reinterpret_cast<const float*>(w.buf.data())[s] : 0.0f;
    ASSERT_EQ(fmt::f32_bits(reinterpret_cast<const float*>(prob.buf.data())[r]),
              fmt::f32_bits(want))
        << r;
  }
}

TEST(Permute, ReferenceFp8MovesRowsScalesProbs) {
  for (int64_t H : {128, 7168, 176}) {
    for (int align : {16, 128}) {
      const int64_t T = H == 7168 ? 67 : 301, k = 4, E = 8;
      SCOPED_TRACE("H " + std::to_string(H) + " align " + std::to_string(align));
      const auto idx = route_with_invalid(T, k, E, H + align, 0.05);
      const HostPlan p = make_host_plan(idx, T, k, E, align);
      const int64_t tiles = (H + 127) / 128;
      for (int64_t R : {p.m_pad(E), permutation_max_rows(T, k, E, align)}) {
        HostTensor x = random_bytes(DType::E4M3, T, H, 1), xs = random_pow2_scales(tiles, T, 2);
        HostTensor y(DType::E4M3, R, H), ys(DType::F32, tiles, R);
        HostTensor w = random_weights(T, k, 3), prob(DType::F32, 1, R);
        permute(ScaledTensor{x.v, xs.v}, ScaledTensor{y.v, ys.v}, p.view(), {w.v, prob.v});
        check_rows(x, y, p, k);
        check_probs(w, prob, p, T * k);
        for (int64_t b = 0; b < tiles; ++b)
          for (int64_t r = 0; r < R; ++r) {
            const int32_t s = p.src_slot()[r];
            const float want = s >= 0 ? xs.ptr<float>()[b * T + s / k] : fmt::exp2i(-127);
            ASSERT_EQ(fmt::f32_bits(ys.ptr<float>()[b * R + r]), fmt::f32_bits(want));
          }
      }
    }
  }
}

TEST(Permute, ReferenceMxfp4MovesRowsAndE8M0) {
  for (int64_t H : {128, 7168, 160}) {
    const int64_t T = 45, k = 3, E = 5;
    const auto idx = route_skewed(T, k, E, 9);
    const HostPlan p = make_host_plan(idx, T, k, E, 16);
    const int64_t R = p.m_pad(E);
    HostTensor x = random_bytes(DType::E2M1x2, T, H, 4),
               xs = random_bytes(DType::E8M0, T, H / 32, 5);
    HostTensor y(DType::E2M1x2, R, H), ys(DType::E8M0, R, H / 32);
    permute(ScaledTensor{x.v, xs.v, ScaleLayout::Mx1x32},
            ScaledTensor{y.v, ys.v, ScaleLayout::Mx1x32}, p.view());
    check_rows(x, y, p, k);
    check_rows(xs, ys, p, k);
  }
}

TEST(Permute, ReferenceBf16KeepsNaNPayloads) {
  const int64_t T = 33, k = 2, E = 4, H = 24;
  const auto idx = route_uniform(T, k, E, 12);
  const HostPlan p = make_host_plan(idx, T, k, E, 8);
  HostTensor x = random_bytes(DType::BF16, T, H, 6);
  for (int i = 0; i < 20; ++i)
    x.ptr<uint16_t>()[i * 7] = static_cast<uint16_t>(0x7F81 + i);  // NaNs
  HostTensor y(DType::BF16, p.m_pad(E), H);
  permute(x.v, y.v, p.view());
  check_rows(x, y, p, k);
}

// ---------------------------------------------------------------------------------------------
// Unpermute.

TEST(Unpermute, RoundTripK1ReturnsXBitForBit) {
  const int64_t T = 91, k = 1, E = 6, H = 64;
  const auto idx = route_uniform(T, k, E, 13);
  const HostPlan p = make_host_plan(idx, T, k, E, 16);
  HostTensor x = random_bytes(DType::BF16, T, H, 7);  // NaN payloads, -0, Inf, subnormals
  HostTensor y(DType::BF16, p.m_pad(E), H), back(DType::BF16, T, H);
  permute(x.v, y.v, p.view());
  unpermute(y.v, back.v, p.view());
  EXPECT_TRUE(bytes_equal(back, x));
}

// Unpermute of permute with k slots of the same row: sum of k copies in FP32 is exactly k * x.
TEST(Unpermute, RoundTripKSlotsSumsExactly) {
  for (int64_t k : {2, 3, 8}) {
    const int64_t T = 40, E = 16, H = 32;
    const auto idx = route_uniform(T, k, E, 14 + k);
    const HostPlan p = make_host_plan(idx, T, k, E, 8);
    const auto vals = make_values(T, H, Fill::Adversarial, 15);
    HostTensor x = host_from_values(vals, DType::BF16, T, H);
    HostTensor y(DType::BF16, p.m_pad(E), H), back(DType::F32, T, H);
    permute(x.v, y.v, p.view());
    unpermute(y.v, back.v, p.view());
    for (int64_t i = 0; i < T * H; ++i) {
      const float xv = fmt::bf16_to_f32(x.ptr<uint16_t>()[i]);
      const float got = back.ptr<float>()[i];
      if (std::isnan(xv)) {
        ASSERT_EQ(fmt::f32_bits(got), 0x7FC00000u) << "canonical NaN";
      } else {
        ASSERT_EQ(fmt::f32_bits(got), fmt::f32_bits(xv * float(k))) << i;
      }
    }
  }
}

TEST(Unpermute, WeightedDroppedSlotsAndOrder) {
  const int64_t T = 57, k = 4, E = 8, H = 16;
  const auto idx = route_with_invalid(T, k, E, 16, 0.25);
  const HostPlan p = make_host_plan(idx, T, k, E, 16);
  const int64_t R = p.m_pad(E);
  HostTensor yv = host_from_values(make_values(R, H, Fill::Adversarial, 17), DType::BF16, R, H);
  HostTensor w = random_weights(T, k, 18), out(DType::BF16, T, H), out_u(DType::F32, T, H);
  unpermute_weighted(yv.v, w.v, out.v, p.view());
  unpermute(yv.v, out_u.v, p.view());
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < H; ++h) {
      float acc = 0.f, acc_u = 0.f;
      int n = 0;
      for (int64_t j = 0; j < k; ++j) {
        const int32_t d = p.dest_row()[t * k + j];
        if (d < 0) continue;
        const float v = fmt::bf16_to_f32(yv.ptr<uint16_t>()[d * H + h]);
        const float vw = v * w.ptr<float>()[t * k + j];
        acc = n ? acc + vw : vw;
        acc_u = n ? acc_u + v : v;
        ++n;
      }
      if (std::isnan(acc)) acc = fmt::f32_from_bits(0x7FC00000u);
      if (n >= 2 && std::isnan(acc_u)) acc_u = fmt::f32_from_bits(0x7FC00000u);
      ASSERT_EQ(out.ptr<uint16_t>()[t * H + h], fmt::bf16_from_f32(acc)) << t << "," << h;
      ASSERT_EQ(fmt::f32_bits(out_u.ptr<float>()[t * H + h]), fmt::f32_bits(acc_u))
          << t << "," << h;
    }
}

// The sum runs in slot order j = 0, 1, 2: (1 + 1e8) - 1e8 = 0 in FP32 (any other order gives 1).
TEST(Unpermute, SumsInSlotOrder) {
  const std::vector<int32_t> idx = {0, 1, 2};
  const HostPlan p = make_host_plan(idx, 1, 3, 3, 1);
  HostTensor yv(DType::F32, 3, 8), out(DType::F32, 1, 8), w(DType::F32, 1, 3);
  for (int h = 0; h < 8; ++h) {
    yv.ptr<float>()[h] = 1.f;
    yv.ptr<float>()[8 + h] = 1e8f;
    yv.ptr<float>()[16 + h] = -1e8f;
  }
  for (int j = 0; j < 3; ++j) w.ptr<float>()[j] = 1.f;
  unpermute(yv.v, out.v, p.view());
  for (int h = 0; h < 8; ++h) EXPECT_EQ(out.ptr<float>()[h], 0.f);
  unpermute_weighted(yv.v, w.v, out.v, p.view());
  for (int h = 0; h < 8; ++h) EXPECT_EQ(out.ptr<float>()[h], 0.f);
}

TEST(Unpermute, TokenWithNoValidSlotGetsZeros) {
  const int64_t T = 3, k = 2, E = 2, H = 8;
  const std::vector<int32_t> idx = {0, 1, -1, 5, 1, 1};
  const HostPlan p = make_host_plan(idx, T, k, E, 1);
  HostTensor yv = random_bytes(DType::BF16, p.m_pad(E), H, 19);
  HostTensor out(DType::F32, T, H, 0x77);
  unpermute(yv.v, out.v, p.view());
  for (int64_t h = 0; h < H; ++h) EXPECT_EQ(fmt::f32_bits(out.ptr<float>()[H + h]), 0u);
}

// ---------------------------------------------------------------------------------------------
// Backward helpers.

TEST(PermuteBackward, ProbsRoundTrip) {
  const int64_t T = 211, k = 8, E = 32;
  const auto idx = route_with_invalid(T, k, E, 20);
  const HostPlan p = make_host_plan(idx, T, k, E, 16);
  const int64_t R = permutation_max_rows(T, k, E, 16);
  HostTensor x(DType::BF16, T, 8, 0), y(DType::BF16, R, 8);
  HostTensor w = random_weights(T, k, 21), prob(DType::F32, 1, R), dw(DType::F32, T, k);
  permute(x.v, y.v, p.view(), {w.v, prob.v});
  permute_probs_backward(prob.v, p.view(), dw.v);
  for (int64_t i = 0; i < T * k; ++i) {
    const bool valid = idx[static_cast<size_t>(i)] >= 0 && idx[static_cast<size_t>(i)] < E;
    ASSERT_EQ(fmt::f32_bits(dw.ptr<float>()[i]), valid ? fmt::f32_bits(w.ptr<float>()[i]) : 0u)
        << i;
  }
}

TEST(PermuteBackward, WeightedUnpermuteGradients) {
  const int64_t T = 29, k = 3, E = 4, H = 520;  // H / 8 = 65 chunks: partials wrap around lanes
  const auto idx = route_with_invalid(T, k, E, 22, 0.1);
  const HostPlan p = make_host_plan(idx, T, k, E, 8);
  const int64_t R = p.m_pad(E);
  HostTensor dout = host_from_values(make_values(T, H, Fill::Normal, 23), DType::BF16, T, H);
  HostTensor yv = host_from_values(make_values(R, H, Fill::Normal, 24), DType::BF16, R, H);
  HostTensor w = random_weights(T, k, 25), dy(DType::BF16, R, H), dw(DType::F32, T, k);
  unpermute_weighted_backward(dout.v, yv.v, w.v, p.view(), dy.v, dw.v);
  for (int64_t r = 0; r < R; ++r) {
    const int32_t s = p.src_slot()[r];
    for (int64_t h = 0; h < H; ++h) {
      const uint16_t want =
          s < 0 ? 0
                : fmt::bf16_from_f32(fmt::bf16_to_f32(dout.ptr<uint16_t>()[(s / k) * H + h]) *
                                     w.ptr<float>()[s]);
      ASSERT_EQ(dy.ptr<uint16_t>()[r * H + h], want) << r << "," << h;
    }
  }
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < k; ++j) {
      const int32_t d = p.dest_row()[t * k + j];
      const float got = dw.ptr<float>()[t * k + j];
      if (d < 0) {
        ASSERT_EQ(fmt::f32_bits(got), 0u);
        continue;
      }
      double want = 0, mag = 0;
      for (int64_t h = 0; h < H; ++h) {
        const double a = fmt::bf16_to_f32(dout.ptr<uint16_t>()[t * H + h]);
        const double b = fmt::bf16_to_f32(yv.ptr<uint16_t>()[d * H + h]);
        want += a * b;
        mag += std::fabs(a * b);
      }
      ASSERT_NEAR(got, want, 1e-6 * mag + 1e-30) << t << "," << j;
    }
}

}  // namespace
}  // namespace fp8flow::test
