// The table-driven element steps of the MXFP4 kernels (src/ops/mxfp4/kernels/mxfp4_tables.h),
// checked on the CPU: each step against the fmt:: definition over its whole domain, and the
// kernels' block logic, emulated with the same steps, against the CPU reference on random tiles
// (all scale exponents, NaN/zero blocks, subnormal scales). The GPU tests then only have the
// plumbing left.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>

#include "common/ref_access.h"
#include "mxfp4/mxfp4_test_util.h"
#include "ops/mxfp4/kernels/mxfp4_tables.h"

namespace fp8flow::test {
namespace {

namespace mx = ::fp8flow::sm90::mx;

uint32_t byte_of(const uint32_t* w, int i) {
  return (w[i / 4] >> (8 * (i % 4))) & 0xFFu;
}
uint32_t nib_of(const uint32_t* w, int i) {
  return (w[i / 8] >> (4 * (i % 8))) & 0xFu;
}

TEST(Mxfp4Tables, LaneHelpers) {
  std::mt19937 rng(1);
  for (int it = 0; it < 20000; ++it) {
    uint32_t w[4] = {uint32_t(rng()), uint32_t(rng()), uint32_t(rng()), uint32_t(rng())};
    uint32_t m8 = 0, m4 = 0;
    for (int i = 0; i < 16; ++i) m8 = std::max(m8, byte_of(w, i) & 0x7F);
    for (int i = 0; i < 32; ++i) m4 = std::max(m4, nib_of(w, i) & 0x7);
    ASSERT_EQ(mx::max_e4m3_magnitude(w[0], w[1], w[2], w[3]), m8);
    ASSERT_EQ(mx::max_e2m1_magnitude(w[0], w[1], w[2], w[3]), m4);
    const uint32_t a = rng(), b = rng(), s = rng();
    for (int i = 0; i < 4; ++i) {
      const uint32_t k = (s >> (4 * i)) & 7;
      const uint32_t want = ((k < 4 ? a >> (8 * k) : b >> (8 * (k - 4))) & 0xFF);
      ASSERT_EQ((mx::prmt(a, b, s) >> (8 * i)) & 0xFF, want);
    }
  }
}

// The DPX lane helpers' host versions against the PTX definitions (per 16-bit lane: unsigned
// max / min of (a + b) mod 2^16 and c; signed max(min(a + b, c), 0)).
TEST(Mxfp4Tables, DpxLaneHelpers) {
  std::mt19937 rng(3);
  const uint32_t edge[] = {0, 1, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF};
  for (int it = 0; it < 20000; ++it) {
    uint32_t a = rng(), b = rng(), c = rng();
    if (it % 4 == 0) a = (edge[rng() % 6] << 16) | edge[rng() % 6];
    if (it % 8 == 1) b = (edge[rng() % 6] << 16) | edge[rng() % 6];
    uint32_t wmax = 0, wmin = 0, wmx = 0;
    for (int s = 0; s < 32; s += 16) {
      const uint32_t sum = (((a >> s) & 0xFFFF) + ((b >> s) & 0xFFFF)) & 0xFFFF,
                     cl = (c >> s) & 0xFFFF;
      const uint32_t mb = std::max((a >> s) & 0xFFFF, (b >> s) & 0xFFFF);
      wmax |= std::max(sum, cl) << s;
      wmin |= std::min(sum, cl) << s;
      wmx |= mb << s;
    }
    ASSERT_EQ(mx::vaddmax_u16x2(a, b, c), wmax) << a << " " << b << " " << c;
    ASSERT_EQ(mx::vaddmin_u16x2(a, b, c), wmin) << a << " " << b << " " << c;
    ASSERT_EQ(mx::vmax_u16x2(a, b), wmx);
  }
}

TEST(Mxfp4Tables, FastDiv) {
  std::mt19937 rng(9);
  std::vector<uint32_t> ds = {1, 2, 3, 4, 5, 7, 8, 14, 28, 56, 112, 224, 448, 1000, 65535, 65536};
  for (int i = 0; i < 200; ++i) ds.push_back(1 + rng() % (1u << 21));
  for (uint32_t d : ds) {
    const mx::FastDiv f = mx::FastDiv::make(d);
    for (uint32_t n : {0u, 1u, d - 1, d, d + 1, 2 * d - 1, 0x7FFFFFFFu, 0x7FFFFFFFu - d})
      ASSERT_EQ(f.div(n), n / d) << n << " / " << d;
    for (int i = 0; i < 2000; ++i) {
      const uint32_t n = static_cast<uint32_t>(rng()) & 0x7FFFFFFFu;
      ASSERT_EQ(f.div(n), n / d) << n << " / " << d;
    }
  }
}

TEST(Mxfp4Tables, F32ToE2m1ThresholdsMatchFmt) {
  const mx::E2m1Thresholds t = mx::make_e2m1_thresholds();
  auto check = [&](uint32_t a) {
    const uint32_t want = fmt::e2m1_from_f32(fmt::f32_from_bits(a)) & 7u;
    ASSERT_EQ(mx::e2m1_magnitude_from_bits(a, t.th), want) << std::hex << a;
  };
  for (uint32_t th : t.th)
    for (uint32_t a = th - 4096; a != th + 4096; ++a) check(a);
  for (uint32_t hi = 0; hi < 0x7F80; ++hi) check(hi << 16);  // every BF16 magnitude
  std::mt19937 rng(11);
  for (int i = 0; i < 2000000; ++i) check(static_cast<uint32_t>(rng()) % 0x7F800000u);
  for (int i = 0; i < 2000000; ++i) check(0x3E000000u + static_cast<uint32_t>(rng()) % 0x3000000u);
}

// The BF16 lane-pair encoder of quantize_mxfp4: every finite BF16 in both lanes at every block
// exponent it serves, against e2m1(mul_pow2(v, -x)), the reference's element step.
TEST(Mxfp4Tables, Bf16PairEncoderMatchesFmtEverywhere) {
  const mx::Bf16E2m1 bf = mx::make_bf16_e2m1(mx::make_e2m1_thresholds());
  int64_t checked = 0;
  for (int x = mx::kBf16MinX; x <= 125; ++x) {
    uint32_t cst[7];
    mx::bf16_e2m1_consts(bf.base, x, cst);
    auto want = [&](uint32_t b) {
      return static_cast<uint32_t>(
          fmt::e2m1_from_f32(fmt::mul_pow2(fmt::f32_from_bits(b << 16), -x)));
    };
    for (uint32_t b = 0; b < 0x10000u; ++b) {
      if ((b & 0x7FFFu) >= 0x7F80u) continue;  // NaN / Inf: the block is flagged, never encoded
      uint32_t o = (b * 40503u + static_cast<uint32_t>(x) * 977u) & 0xFFFFu;  // the other lane
      if ((o & 0x7FFFu) >= 0x7F80u) o &= 0x807Fu;
      const uint32_t lo = mx::bf16x2_to_e2m1x2(b | (o << 16), cst) & 0xFFu;
      const uint32_t hi = mx::bf16x2_to_e2m1x2(o | (b << 16), cst) & 0xFFu;
      ASSERT_EQ(lo & 0xFu, want(b)) << "x " << x << " bf16 " << std::hex << b;
      ASSERT_EQ(lo >> 4, want(o)) << "x " << x << " bf16 " << std::hex << o;
      ASSERT_EQ(hi >> 4, want(b)) << "x " << x << " bf16 " << std::hex << b;
      ++checked;
    }
  }
  EXPECT_EQ(checked, int64_t{250} * (0x10000 - 2 * 0x80));
  // The block key: largest magnitude over 16 lanes, NaN / Inf above 0x7F80.
  std::mt19937 rng(5);
  for (int it = 0; it < 100000; ++it) {
    uint32_t w[8], m = 0;
    for (uint32_t& v : w) {
      v = static_cast<uint32_t>(rng());
      m = std::max({m, v & 0x7FFFu, (v >> 16) & 0x7FFFu});
    }
    ASSERT_EQ(mx::max_bf16_magnitude(w), m);
  }
}

TEST(Mxfp4Tables, E4m3ToE2m1MatchesFmtEverywhere) {
  const mx::E4m3ToE2m1 tab = mx::make_e4m3_to_e2m1();
  std::mt19937 rng(2);
  for (int d = mx::E4m3ToE2m1::kShiftMin; d <= mx::E4m3ToE2m1::kShiftMax; ++d) {
    const uint32_t* th = tab.theta[d - mx::E4m3ToE2m1::kShiftMin];
    for (uint32_t q = 0; q < 256; ++q) {
      if (fmt::e4m3_is_nan(static_cast<uint8_t>(q))) continue;
      for (int pos = 0; pos < 8; ++pos) {
        uint8_t b[8];
        for (uint8_t& x : b) {
          x = static_cast<uint8_t>(rng());
          if (fmt::e4m3_is_nan(x)) x = 0x7E;
        }
        b[pos] = static_cast<uint8_t>(q);
        const uint32_t w0 = b[0] | b[1] << 8 | b[2] << 16 | uint32_t(b[3]) << 24;
        const uint32_t w1 = b[4] | b[5] << 8 | b[6] << 16 | uint32_t(b[7]) << 24;
        const uint32_t got = mx::e4m3x8_to_e2m1x8(w0, w1, th);
        for (int i = 0; i < 8; ++i) {
          const uint8_t want = fmt::e2m1_from_f32(fmt::mul_pow2(fmt::e4m3_to_f32(b[i]), d));
          ASSERT_EQ((got >> (4 * i)) & 0xF, want)
              << "d " << d << " code 0x" << std::hex << int(b[i]);
        }
      }
    }
  }
}

TEST(Mxfp4Tables, E2m1ToE4m3MatchesFmtEverywhere) {
  const mx::E2m1ToE4m3 tab = mx::make_e2m1_to_e4m3();
  for (int d = mx::E2m1ToE4m3::kShiftMin; d <= mx::E2m1ToE4m3::kShiftMax; ++d) {
    const int row = d - mx::E2m1ToE4m3::kShiftMin;
    for (uint32_t nib4 = 0; nib4 < 65536; ++nib4) {
      const uint32_t got =
          mx::e2m1x4_to_e4m3x4(nib4 | 0xABCD0000u, tab.code[row][0], tab.code[row][1]);
      for (int i = 0; i < 4; ++i) {
        const uint8_t c = static_cast<uint8_t>((nib4 >> (4 * i)) & 0xF);
        const uint8_t want = fmt::e4m3_from_f32(fmt::mul_pow2(fmt::e2m1_to_f32(c), d));
        ASSERT_EQ((got >> (8 * i)) & 0xFF, want) << "D " << d << " code " << int(c);
      }
    }
  }
}

// The transposed kernel's FP16 element step: every code, in either lane of a column pair and
// either pair of a word, at every block exponent X of the fast path and every column exponent T
// under which the element can occur (a column scale made from a maximum that includes it: nonzero
// elements need e2m1(c) 2^(X - T) <= 448; zeros occur under any T), against fmt: the code of
// e4m3(e2m1(c) 2^X 2^-T). The neighbours are random occurring elements.
TEST(Mxfp4Tables, F16PairStepMatchesFmtEverywhere) {
  std::mt19937 rng(9);
  auto want_code = [](uint32_t c, int x, int t) {
    const float v = fmt::e2m1_to_f32(static_cast<uint8_t>(c)) * fmt::exp2i(x);
    return static_cast<uint32_t>(fmt::e4m3_from_f32(fmt::mul_pow2(v, -t)));
  };
  auto occurs = [](uint32_t c, int x, int t) {
    return (c & 7) == 0 ||
           std::fabs(fmt::mul_pow2(fmt::e2m1_to_f32(static_cast<uint8_t>(c)), x - t)) <= 448.0f;
  };
  int64_t checked = 0;
  for (int x = fmt::kMinScaleExp; x <= mx::E2m1ToE4m3::kMaxExactX; ++x)
    for (int t = fmt::kMinScaleExp; t <= fmt::kMaxScaleExp; ++t)
      for (uint32_t c = 0; c < 16; ++c) {
        if (!occurs(c, x, t)) continue;
        const int lane = static_cast<int>(rng() % 2), p = static_cast<int>(rng() % 4);
        // The other lane: a random column exponent and an occurring code under it.
        const int t2 = fmt::kMinScaleExp + static_cast<int>(rng() % 255);
        uint32_t c2 = static_cast<uint32_t>(rng() % 16);
        while (!occurs(c2, x, t2)) c2 = static_cast<uint32_t>(rng() % 16);
        // The token's word: random codes, c and c2 in columns 2p + lane and 2p + 1 - lane.
        uint32_t w = static_cast<uint32_t>(rng());
        const int ja = 2 * p + lane, jb = 2 * p + 1 - lane;
        w = (w & ~(0xFu << (4 * ja))) | (c << (4 * ja));
        w = (w & ~(0xFu << (4 * jb))) | (c2 << (4 * jb));
        uint32_t h[2];
        mx::e2m1x8_to_f16hi(w, h);
        const int t_lo = lane == 0 ? t : t2, t_hi = lane == 0 ? t2 : t;
        const uint32_t got = mx::f16hi_pair_to_e4m3x2(h[p / 2], p, mx::f16_token_exp(x),
                                                      mx::f16_column_exps(t_lo, t_hi));
        ASSERT_EQ(got >> 16, 0u);
        ASSERT_EQ((got >> (8 * lane)) & 0xFFu, want_code(c, x, t))
            << "code " << c << " X " << x << " T " << t << " lane " << lane << " pair " << p;
        ASSERT_EQ((got >> (8 * (1 - lane))) & 0xFFu, want_code(c2, x, t2))
            << "code " << c2 << " X " << x << " T " << t2;
        ++checked;
      }
  EXPECT_GT(checked, 500000);
}

// The integer element step (the transposed kernel's integer path): every code at every a = D + 5
// in [0, kIntMaxA] where it occurs (|value| <= 448, or a zero), in every column, the token part and
// the column part of a split every way, the other seven columns random codes at random occurring
// a (so a carry between bytes would show); also the token addend and the column addends.
TEST(Mxfp4Tables, IntElementStepMatchesFmtEverywhere) {
  std::mt19937 rng(21);
  auto want_code = [](uint32_t c, int a) {
    return static_cast<uint32_t>(fmt::e4m3_from_f32(
        fmt::mul_pow2(fmt::e2m1_to_f32(static_cast<uint8_t>(c)), a - mx::kIntBias)));
  };
  auto occurs = [](uint32_t c, int a) {
    return (c & 7) == 0 || std::fabs(fmt::mul_pow2(fmt::e2m1_to_f32(static_cast<uint8_t>(c)),
                                                   a - mx::kIntBias)) <= 448.0f;
  };
  int64_t checked = 0;
  for (int a = 0; a <= mx::kIntMaxA; ++a)
    for (int u = 0; u <= a; ++u)  // token part u, column part a - u
      for (uint32_t c = 0; c < 16; ++c)
        for (int j = 0; j < 8; ++j) {
          if (!occurs(c, a)) continue;
          int aj[8];
          uint32_t w = static_cast<uint32_t>(rng());
          for (int k = 0; k < 8; ++k) {
            aj[k] = k == j ? a : u + static_cast<int>(rng() % (mx::kIntMaxA - u + 1));
            uint32_t ck = k == j ? c : static_cast<uint32_t>(rng() % 16);
            while (!occurs(ck, aj[k])) ck = static_cast<uint32_t>(rng() % 16);
            w = (w & ~(0xFu << (4 * k))) | (ck << (4 * k));
          }
          // The addends as the kernel forms them: X_lo = 0 (xlo5 = 5), the token's byte u above
          // sb_lo, columns T_k = 5 - (a_k - u).
          const uint32_t sb_lo = 100, k4 = static_cast<uint32_t>(rng() % 4);
          const uint32_t sbw = (static_cast<uint32_t>(rng()) & ~(0xFFu << (8 * k4))) |
                               ((sb_lo + static_cast<uint32_t>(u)) << (8 * k4));
          const uint32_t xa = mx::int_token_addend(sbw, static_cast<int>(k4), sb_lo * 0x01010101u);
          ASSERT_EQ(xa, static_cast<uint32_t>(8 * u) * 0x01010101u);
          int t[8];
          for (int k = 0; k < 8; ++k) t[k] = 5 - (aj[k] - u);
          const uint32_t ca[2] = {mx::int_column_addends(5, t[0], t[1], t[2], t[3]),
                                  mx::int_column_addends(5, t[4], t[5], t[6], t[7])};
          uint32_t out[2];
          mx::e2m1x8_to_e4m3_int(w, xa, ca, out);
          for (int k = 0; k < 8; ++k)
            ASSERT_EQ((out[k / 4] >> (8 * (k % 4))) & 0xFFu,
                      want_code((w >> (4 * k)) & 0xFu, aj[k]))
                << "code " << ((w >> (4 * k)) & 0xFu) << " a " << aj[k] << " column " << k
                << " (tested: code " << c << " a " << a << " column " << j << ")";
          ++checked;
        }
  EXPECT_GT(checked, 15000);
}

// The host models of the two FP16 instructions the step uses, on cases with known answers:
// subnormal products and their ties, overflow, signed zeros, and the E4M3 conversion's rounding,
// subnormals and saturation.
TEST(Mxfp4Tables, F16InstructionModels) {
  auto h2 = [](uint32_t lo, uint32_t hi) { return lo | (hi << 16); };
  EXPECT_EQ(mx::hmul2_rn(h2(0x3C00, 0x4000), h2(0x3C00, 0x4200)), h2(0x3C00, 0x4600));  // 1*1, 2*3
  EXPECT_EQ(mx::hmul2_rn(h2(0x0400, 0x0400), h2(0x1400, 0x1000)),
            h2(0x0001, 0x0000));  // 2^-24; 2^-25 ties to 0
  EXPECT_EQ(mx::hmul2_rn(h2(0x0600, 0xB800), h2(0x1400, 0x0000)),
            h2(0x0002, 0x8000));  // 1.5*2^-24 -> 2^-23; -0.5*0
  EXPECT_EQ(mx::hmul2_rn(h2(0x7800, 0x3C00), h2(0x7800, 0x7C00)),
            h2(0x7C00, 0x7C00));                                // overflow; Inf
  EXPECT_EQ(mx::f16x2_to_e4m3x2(h2(0x3C00, 0xC600)), 0xCC38u);  // 1 -> 0x38, -6 -> 0xCC
  EXPECT_EQ(mx::f16x2_to_e4m3x2(h2(0x1800, 0x1C00)), 0x0201u);  // 2^-9 -> 0x01, 2^-8 -> 0x02
  EXPECT_EQ(mx::f16x2_to_e4m3x2(h2(0x1A00, 0x9400)),
            0x8002u);  // 1.5*2^-9 ties to 0x02; -2^-10 to -0
  EXPECT_EQ(mx::f16x2_to_e4m3x2(h2(0x5FD0, 0xFC00)), 0xFE7Eu);  // 500 -> 448; -Inf -> -448
  EXPECT_EQ(mx::f16x2_to_e4m3x2(h2(0x7E00, 0x8000)), 0x807Fu);  // NaN -> 0x7F; -0 -> 0x80
}

TEST(Mxfp4Tables, KeysOrderValuesExactly) {
  const mx::E2m1Key k = mx::make_e2m1_key();
  float prev = -1.f;
  for (int x = -127; x <= mx::E2m1ToE4m3::kMaxExactX; ++x)
    for (uint32_t c = 1; c < 8; ++c) {
      const uint32_t byte = ((c < 4 ? k.lo >> (8 * c) : k.hi >> (8 * (c - 4))) & 0xFF);
      ASSERT_GE(byte, 1u);
      const uint32_t key = mx::e2m1_key_base(x) + byte;
      ASSERT_GT(key, mx::E2m1Key::kNoKey);
      ASSERT_LT(key, mx::kKeyBig);
      const float v = fmt::e2m1_to_f32(static_cast<uint8_t>(c)) *
                      fmt::e8m0_to_f32(static_cast<uint8_t>(x + 127));
      ASSERT_EQ(fmt::f32_bits(mx::key_to_amax(key)), fmt::f32_bits(v)) << x << " " << c;
      (void)prev;
    }
  EXPECT_EQ(mx::key_to_amax(mx::E2m1Key::kNoKey), 0.f);
  // The kernel's branch-free column scale, for every key up to 1023.
  for (uint32_t key = 0; key < 1024; ++key)
    ASSERT_EQ(mx::key_scale_exponent(key), fmt::scale_exponent(mx::key_to_amax(key))) << key;
  EXPECT_EQ(k.lo & 0xFF, 0u);  // c = 0 has no key
}

// ---------------------------------------------------------------------------------------------
// The kernels' block logic, emulated, against the CPU reference.

// A random FP8 row of one 128 tile: mixed magnitudes, some NaN codes, zero blocks.
void random_fp8_tile(std::mt19937& rng, uint8_t* q, bool with_nan) {
  for (int b = 0; b < 4; ++b) {
    const uint32_t kind = rng() % 6;
    const uint32_t cap = kind == 0 ? 0 : (kind == 1 ? 0x08 : (kind == 2 ? 0x40 : 0x7F));
    for (int i = 0; i < 32; ++i) {
      uint8_t x = static_cast<uint8_t>(cap ? (rng() % cap) | (rng() & 0x80) : 0);
      if (fmt::e4m3_is_nan(x) && !(with_nan && rng() % 4 == 0)) x &= 0xFE;
      q[b * 32 + i] = x;
    }
  }
}

TEST(Mxfp4Tables, Fp8ToMxfp4BlockLogicMatchesReference) {
  const mx::E4m3ToE2m1 tab = mx::make_e4m3_to_e2m1();
  std::mt19937 rng(3);
  std::vector<float> scales;
  for (int t = -152; t <= 128; ++t) scales.push_back(fmt::exp2i(t));
  for (float s : {3.0f, 0.7f, -2.0f, 0.0f, 1e-44f, INFINITY, NAN, 448.f * 1e30f})
    scales.push_back(s);
  int exact_tiles = 0;
  for (float s : scales)
    for (int rep = 0; rep < 6; ++rep) {
      HostScaled x = alloc_fp8(1, 128);
      random_fp8_tile(rng, x.data.buf.data(), rep % 2 == 1);
      x.scale.ptr<float>()[0] = s;
      HostScaled want = alloc_mx(1, 128);
      fp8_to_mxfp4(x.st(), want.st());
      int t;
      const bool exact = mx::e4m3_scale_exact(s, t);
      exact_tiles += exact;
      for (int b = 0; b < 4; ++b) {
        uint32_t w[2][4];
        std::memcpy(w, x.data.buf.data() + 32 * b, 32);
        const uint32_t key =
            std::max(mx::fp8_half_key(w[0], s, exact), mx::fp8_half_key(w[1], s, exact));
        int xe = 0;
        const bool finite = mx::fp8_block_exponent(key, s, exact, xe);
        uint8_t scale = fmt::kE8M0NaN;
        uint32_t out[2][2] = {};
        if (finite) {
          scale = fmt::e8m0_from_exponent(xe);
          const uint32_t* th = tab.theta[mx::fp8_theta_row(t, xe)];
          mx::fp8_half_encode(w[0], s, exact, xe, th, out[0]);
          mx::fp8_half_encode(w[1], s, exact, xe, th, out[1]);
        }
        ASSERT_EQ(scale, want.scale.buf[b]) << "scale " << s << " block " << b;
        ASSERT_EQ(0, std::memcmp(out, want.data.buf.data() + 16 * b, 16))
            << "scale " << s << " block " << b;
      }
    }
  EXPECT_GT(exact_tiles, 1000);
}

TEST(Mxfp4Tables, QuantizeBlockLogicMatchesReference) {
  const mx::E2m1Thresholds th = mx::make_e2m1_thresholds();
  const mx::Bf16E2m1 bf = mx::make_bf16_e2m1(th);
  int64_t bf16_fast = 0;
  uint64_t seed = 12;
  for (Fill f : {Fill::Normal, Fill::WideRange, Fill::Adversarial, Fill::Zeros})
    for (DType d : {DType::F32, DType::BF16}) {
      const int64_t M = 64, K = 1024;
      const HostTensor x = host_from_values(make_values(M, K, f, seed++), d, M, K);
      HostScaled want = alloc_mx(M, K);
      quantize_mxfp4(x.v, want.st());
      for (int64_t r = 0; r < M; ++r)
        for (int64_t b = 0; b < K / 32; ++b) {
          float v[32];
          uint32_t key = 0;  // the kernel's key: largest |bits|; >= Inf bits flags NaN/Inf
          for (int i = 0; i < 32; ++i) {
            v[i] = ref::load_f32(x.v, r, b * 32 + i);
            key = std::max(key, fmt::f32_bits(v[i]) & 0x7FFFFFFFu);
          }
          const bool finite = key < 0x7F800000u;
          const int xe = fmt::mx_shared_exponent(fmt::f32_from_bits(key));
          uint32_t out[4] = {0, 0, 0, 0};
          if (finite && d == DType::BF16 && xe >= mx::kBf16MinX) {
            ++bf16_fast;
            uint32_t cst[7];
            mx::bf16_e2m1_consts(bf.base, xe, cst);
            for (int i = 0; i < 32; i += 2) {
              const uint32_t w =
                  (fmt::f32_bits(v[i]) >> 16) | (fmt::f32_bits(v[i + 1]) & 0xFFFF0000u);
              out[i / 8] |= (mx::bf16x2_to_e2m1x2(w, cst) & 0xFFu) << (4 * (i % 8));
            }
          } else if (finite) {
            for (int i = 0; i < 32; ++i)
              out[i / 8] |= mx::quantize_e2m1(v[i], fmt::exp2i(-xe), th.th) << (4 * (i % 8));
          }
          ASSERT_EQ(finite ? fmt::e8m0_from_exponent(xe) : fmt::kE8M0NaN,
                    want.scale.buf[static_cast<size_t>(r * (K / 32) + b)]);
          ASSERT_EQ(0, std::memcmp(out, want.data.buf.data() + (r * K + b * 32) / 2, 16))
              << "fill " << int(f) << " row " << r << " block " << b;
        }
    }
  EXPECT_GT(bf16_fast, 1000);  // the BF16 lane-pair path is exercised
}

TEST(Mxfp4Tables, Mxfp4ToFp8BlockLogicMatchesReference) {
  const mx::E2m1ToE4m3 tab = mx::make_e2m1_to_e4m3();
  std::mt19937 rng(4);
  for (int rep = 0; rep < 6000; ++rep) {
    HostScaled y = alloc_mx(1, 128);
    const int base = static_cast<int>(rng() % 256);
    for (int b = 0; b < 4; ++b) {
      const uint32_t kind = rng() % 8;
      int sb = kind == 0 ? 255 : std::clamp(base - static_cast<int>(rng() % (kind * 3)), 0, 254);
      y.scale.buf[b] = static_cast<uint8_t>(sb);
      for (int i = 0; i < 16; ++i)
        y.data.buf[16 * b + i] = kind == 1 ? 0 : static_cast<uint8_t>(rng());
    }
    HostScaled want = alloc_fp8(1, 128);
    mxfp4_to_fp8(y.st(), want.st());
    uint32_t w[4][4];
    std::memcpy(w, y.data.buf.data(), 64);
    float amax = 0;
    for (int b = 0; b < 4; ++b) amax = std::max(amax, mx::mx_block_amax(w[b], y.scale.buf[b]));
    const int t = fmt::scale_exponent(amax);
    ASSERT_EQ(fmt::exp2i(t), want.scale.ptr<float>()[0]);
    for (int b = 0; b < 4; ++b) {
      const uint8_t sb = y.scale.buf[b];
      const int row = mx::mx_code_row(sb, t);
      uint32_t out[8];
      mx::mx_block_encode(w[b], sb, t, tab.code[row][0], tab.code[row][1], out);
      ASSERT_EQ(0, std::memcmp(out, want.data.buf.data() + 32 * b, 32))
          << "rep " << rep << " block " << b << " scale byte " << int(sb) << " t " << t;
    }
  }
}

TEST(Mxfp4Tables, TransposedColumnLogicMatchesReference) {
  const mx::E2m1Key keys = mx::make_e2m1_key();
  std::mt19937 rng(5);
  for (int rep = 0; rep < 300; ++rep) {
    const int w = 1 + static_cast<int>(rng() % 128);
    HostScaled y = alloc_mx(w, 128);
    const int base = static_cast<int>(rng() % 253);
    const int spread = static_cast<int>(rng() % 40);
    for (int m = 0; m < w; ++m)
      for (int b = 0; b < 4; ++b) {
        const uint32_t kind = rng() % 16;
        const int sb =
            kind == 0 ? 255 : std::clamp(base - static_cast<int>(rng() % (spread + 1)), 0, 252);
        y.scale.buf[m * 4 + b] = static_cast<uint8_t>(sb);
        for (int i = 0; i < 16; ++i)
          y.data.buf[m * 64 + b * 16 + i] = kind == 1 ? 0 : static_cast<uint8_t>(rng());
      }
    HostScaled want = alloc_fp8(128, w);
    mxfp4_to_fp8_transposed(y.st(), want.st());
    for (int g = 0; g < 16; ++g) {  // 8-column groups, as one kernel thread sees them
      uint32_t acc[4] = {0, 0, 0, 0};
      std::vector<uint32_t> word(w);
      std::vector<uint32_t> xb(w);
      std::vector<bool> nan(w);
      for (int m = 0; m < w; ++m) {
        const uint8_t sb = y.scale.buf[m * 4 + g / 4];
        nan[m] = sb == fmt::kE8M0NaN;
        std::memcpy(&word[m], y.data.buf.data() + m * 64 + g * 4, 4);
        if (nan[m]) word[m] = 0;
        const int x = fmt::e8m0_exponent(sb);
        xb[m] = mx::f16_token_exp(x);
        const uint32_t base2 = mx::e2m1_key_base(x) * 0x00010001u;
        mx::key_accumulate(word[m], base2, keys.lo, keys.hi, acc);
      }
      int t[8];
      for (int j = 0; j < 8; ++j) {
        t[j] = mx::key_scale_exponent(mx::column_key(acc, j));
        ASSERT_EQ(t[j], fmt::scale_exponent(mx::key_to_amax(mx::column_key(acc, j))));
        ASSERT_EQ(fmt::exp2i(t[j]), want.scale.ptr<float>()[g * 8 + j])
            << "rep " << rep << " column " << g * 8 + j;
      }
      for (int j = 0; j < 8; ++j) {
        const int k = g * 8 + j, p = j / 2;
        const uint32_t nt = mx::f16_column_exps(t[2 * p], t[2 * p + 1]);
        for (int m = 0; m < w; ++m) {
          uint32_t h[2];
          mx::e2m1x8_to_f16hi(word[m], h);
          const uint32_t pair = mx::f16hi_pair_to_e4m3x2(h[p / 2], p, xb[m], nt);
          const uint8_t code = nan[m] ? 0x7F : static_cast<uint8_t>(pair >> (8 * (j & 1)));
          ASSERT_EQ(code, want.data.buf[k * w + m])
              << "rep " << rep << " column " << k << " token " << m;
        }
      }
    }
  }
}

// The transposed kernel's gap-key path (mx::kGapTable), emulated like the test above, on tiles of
// random spans around mx::kGapMaxSpan with tiny-value blocks (bytes <= 7), zero blocks and sparse
// tiles (columns with a few +-0.5 codes: the edge cases of the test); every
// tile that passes gap_keys_exact must match the reference (and enough of them do).
TEST(Mxfp4Tables, TransposedGapKeysMatchReference) {
  const mx::E2m1Key keys = mx::make_e2m1_key();
  for (uint32_t c = 0; c < 8; ++c) {
    const uint32_t g = ((c < 4 ? keys.glo >> (8 * c) : keys.ghi >> (8 * (c - 4))) & 0xFF);
    const uint32_t k = ((c < 4 ? keys.lo >> (8 * c) : keys.hi >> (8 * (c - 4))) & 0xFF);
    ASSERT_EQ(g, c == 0 ? 0u : k + mx::kGapTable);
  }
  std::mt19937 rng(7);
  int taken = 0;
  for (int rep = 0; rep < 1000; ++rep) {
    const int w = 1 + static_cast<int>(rng() % 128);
    HostScaled y = alloc_mx(w, 128);
    const int span = 118 + static_cast<int>(rng() % 10);
    const int lo = static_cast<int>(rng() % (253 - span));
    const int small_hi = rep % 3 == 0 ? 7 : 6;
    const bool sparse = rep % 2 == 1;
    uint32_t sb_max = 0, sb_min = 255;
    for (int m = 0; m < w; ++m)
      for (int b = 0; b < 4; ++b) {
        const uint32_t kind = rng() % 16;
        const int sb = kind < 2   ? static_cast<int>(rng() % (small_hi + 1))
                       : kind < 4 ? (kind == 2 ? lo : lo + span)
                                  : lo + static_cast<int>(rng() % (span + 1));
        y.scale.buf[m * 4 + b] = static_cast<uint8_t>(sb);
        sb_max = std::max(sb_max, static_cast<uint32_t>(sb));
        if (sb > static_cast<int>(mx::kGapIgnoreSb))
          sb_min = std::min(sb_min, static_cast<uint32_t>(sb));
        for (int i = 0; i < 16; ++i) {
          uint8_t d = kind == 4 || (kind == 5 && i % 2) ? 0 : static_cast<uint8_t>(rng());
          if (sparse) {  // mostly zeros; the few nonzero codes mostly +-0.5 (the smallest keys)
            d = 0;
            for (int n = 0; n < 2; ++n)
              if (rng() % 48 == 0)
                d |= static_cast<uint8_t>((rng() % 3 ? (rng() % 2 ? 0x1 : 0x9) : rng() % 16)
                                          << (4 * n));
          }
          y.data.buf[m * 64 + b * 16 + i] = d;
        }
      }
    if (!mx::gap_keys_exact(sb_max, sb_min)) continue;
    ++taken;
    HostScaled want = alloc_fp8(128, w);
    mxfp4_to_fp8_transposed(y.st(), want.st());
    for (int g = 0; g < 16; ++g) {
      uint32_t acc[4] = {0, 0, 0, 0};
      std::vector<uint32_t> word(w), sbl(w);
      for (int m = 0; m < w; ++m) {
        const uint32_t sbw = y.scale.buf[m * 4 + g / 4] << 8;  // the byte as token 1 of a word
        sbl[m] = mx::sb_lanes(sbw, 1);
        ASSERT_EQ(sbl[m], y.scale.buf[m * 4 + g / 4] * 0x00010001u);
        std::memcpy(&word[m], y.data.buf.data() + m * 64 + g * 4, 4);
        mx::gap_key_accumulate(word[m], sbl[m] << 1, keys.glo, keys.ghi, acc);
      }
      int t[8];
      for (int j = 0; j < 8; ++j) {
        t[j] = mx::gap_key_scale_exponent(mx::column_key(acc, j), 2 * sb_max);
        ASSERT_EQ(fmt::exp2i(t[j]), want.scale.ptr<float>()[g * 8 + j])
            << "rep " << rep << " column " << g * 8 + j;
      }
      for (int j = 0; j < 8; ++j) {
        const int k = g * 8 + j, p = j / 2;
        const uint32_t nt = mx::f16_column_exps_sb(t[2 * p], t[2 * p + 1]);
        for (int m = 0; m < w; ++m) {
          uint32_t h[2];
          mx::e2m1x8_to_f16hi(word[m], h);
          const uint32_t pair = mx::f16hi_pair_to_e4m3x2(h[p / 2], p, sbl[m], nt);
          ASSERT_EQ(static_cast<uint8_t>(pair >> (8 * (j & 1))), want.data.buf[k * w + m])
              << "rep " << rep << " column " << k << " token " << m;
        }
      }
    }
  }
  EXPECT_GT(taken, 300);
}

// The transposed kernel's integer path, emulated per 8-column group (the kernel asks it of a whole
// warp's 32 columns) on gap-key tiles of block-exponent spreads around its edge (about 11 when the
// columns' maxima are large codes), sparse tiles (columns whose largest element is a small code of
// a low-exponent token: the a <= kIntMaxA edge; and all-zero columns), zero blocks, partial
// widths: every group that passes int_path_ok must match the reference, enough groups pass and
// enough fail.
TEST(Mxfp4Tables, TransposedIntPathMatchesReference) {
  const mx::E2m1Key keys = mx::make_e2m1_key();
  std::mt19937 rng(11);
  int taken = 0, refused = 0;
  for (int rep = 0; rep < 1500; ++rep) {
    const int w = 1 + static_cast<int>(rng() % 128);
    HostScaled y = alloc_mx(w, 128);
    const int spread = 6 + static_cast<int>(rng() % 12);
    const int lo = 1 + static_cast<int>(rng() % (252 - spread));
    const int sparse = rep % 3;  // 1: a few small codes; 2: a few codes of any size
    uint32_t sb_max = 0, sb_min = 255, sb_lo = 255;
    for (int m = 0; m < w; ++m)
      for (int b = 0; b < 4; ++b) {
        const uint32_t kind = rng() % 16;
        const int sb = kind == 0   ? lo
                       : kind == 1 ? lo + spread
                                   : lo + static_cast<int>(rng() % (spread + 1));
        y.scale.buf[m * 4 + b] = static_cast<uint8_t>(sb);
        sb_max = std::max(sb_max, static_cast<uint32_t>(sb));
        sb_lo = std::min(sb_lo, static_cast<uint32_t>(sb));
        if (sb > static_cast<int>(mx::kGapIgnoreSb))
          sb_min = std::min(sb_min, static_cast<uint32_t>(sb));
        for (int i = 0; i < 16; ++i) {
          uint8_t d = kind == 2 ? 0 : static_cast<uint8_t>(rng());
          if (sparse) {
            d = 0;
            for (int n = 0; n < 2; ++n)
              if (rng() % 40 == 0) {
                const uint32_t c = sparse == 1 ? 1 + rng() % 2 : rng() % 8;
                d |= static_cast<uint8_t>((c | (rng() % 2 ? 8u : 0u)) << (4 * n));
              }
          }
          y.data.buf[m * 64 + b * 16 + i] = d;
        }
      }
    if (!mx::gap_keys_exact(sb_max, sb_min)) continue;
    HostScaled want = alloc_fp8(128, w);
    mxfp4_to_fp8_transposed(y.st(), want.st());
    const int xlo5 = static_cast<int>(sb_lo) - 127 + mx::kIntBias;
    const int spread_cta = static_cast<int>(sb_max - sb_lo);
    const uint32_t lo4 = sb_lo * 0x01010101u;
    for (int g = 0; g < 16; ++g) {
      uint32_t acc[4] = {0, 0, 0, 0};
      std::vector<uint32_t> word(w), sbw(w);
      for (int m = 0; m < w; ++m) {
        sbw[m] = y.scale.buf[m * 4 + g / 4] << 16;  // the byte as token 2 of a word
        std::memcpy(&word[m], y.data.buf.data() + m * 64 + g * 4, 4);
        mx::gap_key_accumulate(word[m], mx::sb_lanes(sbw[m], 2) << 1, keys.glo, keys.ghi, acc);
      }
      int t[8];
      for (int j = 0; j < 8; ++j)
        t[j] = mx::gap_key_scale_exponent(mx::column_key(acc, j), 2 * sb_max);
      const int tmin = *std::min_element(t, t + 8), tmax = *std::max_element(t, t + 8);
      if (!mx::int_path_ok(xlo5, spread_cta, tmin, tmax)) {
        ++refused;
        continue;
      }
      ++taken;
      const uint32_t ca[2] = {mx::int_column_addends(xlo5, t[0], t[1], t[2], t[3]),
                              mx::int_column_addends(xlo5, t[4], t[5], t[6], t[7])};
      for (int m = 0; m < w; ++m) {
        uint32_t out[2];
        mx::e2m1x8_to_e4m3_int(word[m], mx::int_token_addend(sbw[m], 2, lo4), ca, out);
        for (int j = 0; j < 8; ++j)
          ASSERT_EQ((out[j / 4] >> (8 * (j % 4))) & 0xFFu, want.data.buf[(g * 8 + j) * w + m])
              << "rep " << rep << " column " << g * 8 + j << " token " << m << " spread " << spread
              << " sparse " << sparse;
      }
    }
  }
  EXPECT_GT(taken, 3000);
  EXPECT_GT(refused, 3000);
}

}  // namespace
}  // namespace fp8flow::test
