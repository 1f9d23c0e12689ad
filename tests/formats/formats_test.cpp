// Number formats (include/fp8flow/formats.h): every code of every format, ties, saturation,
// non-finite inputs, and the encoders against a brute-force nearest-value search. Host side; the
// device side runs the same functions and is compared bit for bit by every op's GPU test.
#include <gtest/gtest.h>

#include <cfloat>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "fp8flow/formats.h"

namespace fp8flow {
namespace {

using namespace fmt;

// Positive finite values of a format, indexed by magnitude code, in increasing order.
struct FormatTable {
  std::vector<double> values;  // values[code] for code in [0, max_code]
  uint32_t max_code;
};

FormatTable e4m3_table() {
  FormatTable t{{}, 0x7E};
  for (uint32_t c = 0; c <= 0x7E; ++c) {
    const uint32_t e = c >> 3, m = c & 7;
    t.values.push_back(e == 0 ? std::ldexp(double(m), -9) : std::ldexp(1.0 + m / 8.0, int(e) - 7));
  }
  return t;
}
FormatTable e5m2_table() {
  FormatTable t{{}, 0x7B};
  for (uint32_t c = 0; c <= 0x7B; ++c) {
    const uint32_t e = c >> 2, m = c & 3;
    t.values.push_back(e == 0 ? std::ldexp(double(m), -16)
                              : std::ldexp(1.0 + m / 4.0, int(e) - 15));
  }
  return t;
}
FormatTable e2m1_table() {
  return {{0, 0.5, 1, 1.5, 2, 3, 4, 6}, 7};
}

// Nearest representable magnitude code, ties to the even code, saturating at max_code.
uint32_t brute_nearest(const FormatTable& t, double a) {
  if (a >= t.values[t.max_code]) return t.max_code;
  uint32_t lo = 0;
  while (lo + 1 <= t.max_code && t.values[lo + 1] <= a) ++lo;
  if (t.values[lo] == a || lo == t.max_code) return lo;
  const double d_lo = a - t.values[lo], d_hi = t.values[lo + 1] - a;
  if (d_lo < d_hi) return lo;
  if (d_hi < d_lo) return lo + 1;
  return (lo % 2 == 0) ? lo : lo + 1;
}

TEST(Formats, E4M3DecodesEveryCode) {
  const FormatTable t = e4m3_table();
  for (int c = 0; c < 256; ++c) {
    const float v = e4m3_to_f32(uint8_t(c));
    const uint32_t mag = c & 0x7F;
    if (mag == 0x7F) {
      EXPECT_TRUE(std::isnan(v)) << c;
      continue;
    }
    EXPECT_EQ(double(std::fabs(v)), t.values[mag]) << c;
    EXPECT_EQ(std::signbit(v), (c & 0x80) != 0) << c;
    EXPECT_EQ(e4m3_from_f32(v), uint8_t(c)) << "round trip of code " << c;
  }
  EXPECT_EQ(e4m3_to_f32(0x7E), 448.f);
  EXPECT_EQ(e4m3_to_f32(0x01), std::ldexp(1.f, -9));
  EXPECT_EQ(e4m3_to_f32(0x08), std::ldexp(1.f, -6));
  EXPECT_EQ(e4m3_to_f32(0x38), 1.f);
}

TEST(Formats, E5M2DecodesEveryCode) {
  const FormatTable t = e5m2_table();
  for (int c = 0; c < 256; ++c) {
    const float v = e5m2_to_f32(uint8_t(c));
    const uint32_t mag = c & 0x7F;
    if (mag == 0x7C) {
      EXPECT_TRUE(std::isinf(v)) << c;
    } else if (mag > 0x7C) {
      EXPECT_TRUE(std::isnan(v)) << c;
      continue;
    } else {
      EXPECT_EQ(double(std::fabs(v)), t.values[mag]) << c;
    }
    EXPECT_EQ(std::signbit(v), (c & 0x80) != 0) << c;
    EXPECT_EQ(e5m2_from_f32(v), uint8_t(c)) << "round trip of code " << c;
  }
  EXPECT_EQ(e5m2_to_f32(0x7B), 57344.f);
}

TEST(Formats, E2M1DecodesEveryCode) {
  const float expect[8] = {0, 0.5f, 1, 1.5f, 2, 3, 4, 6};
  for (int c = 0; c < 16; ++c) {
    const float v = e2m1_to_f32(uint8_t(c));
    EXPECT_EQ(std::fabs(v), expect[c & 7]) << c;
    EXPECT_EQ(std::signbit(v), (c & 8) != 0) << c;
    EXPECT_EQ(e2m1_from_f32(v), uint8_t(c)) << c;
  }
}

// Midpoints between consecutive representable values round to the even code; a hair above or below
// goes to the nearer one. Covers subnormals and the normal/subnormal boundary.
template <typename Enc>
void check_ties(const FormatTable& t, Enc enc, uint32_t sign_bit) {
  for (uint32_t c = 0; c < t.max_code; ++c) {
    const double mid = 0.5 * (t.values[c] + t.values[c + 1]);
    const float f = float(mid);
    ASSERT_EQ(double(f), mid) << "midpoint not exact in FP32";
    const uint32_t even = (c % 2 == 0) ? c : c + 1;
    EXPECT_EQ(enc(f), even) << "tie above code " << c;
    EXPECT_EQ(enc(-f), even | sign_bit) << "negative tie above code " << c;
    EXPECT_EQ(enc(std::nextafter(f, 0.f)), c) << "just below tie above code " << c;
    EXPECT_EQ(enc(std::nextafter(f, 1e30f)), c + 1) << "just above tie above code " << c;
  }
}

TEST(Formats, TiesRoundToEven) {
  check_ties(
      e4m3_table(), [](float x) { return uint32_t(e4m3_from_f32(x)); }, 0x80);
  check_ties(
      e5m2_table(), [](float x) { return uint32_t(e5m2_from_f32(x)); }, 0x80);
  check_ties(
      e2m1_table(), [](float x) { return uint32_t(e2m1_from_f32(x)); }, 0x8);
  EXPECT_EQ(e2m1_from_f32(0.25f), 0);
  EXPECT_EQ(e2m1_from_f32(0.75f), 2);  // 1.0
  EXPECT_EQ(e2m1_from_f32(2.5f), 4);   // 2.0
  EXPECT_EQ(e2m1_from_f32(5.0f), 6);   // 4.0
}

TEST(Formats, SaturationAndNonFinite) {
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (float big : {448.5f, 463.99f, 464.f, 479.f, 480.f, 1e6f, FLT_MAX}) {
    EXPECT_EQ(e4m3_from_f32(big), 0x7E) << big;
    EXPECT_EQ(e4m3_from_f32(-big), 0xFE) << big;
  }
  EXPECT_EQ(e4m3_from_f32(inf), 0x7F);
  EXPECT_EQ(e4m3_from_f32(-inf), 0xFF);
  EXPECT_TRUE(e4m3_is_nan(e4m3_from_f32(nan)));
  EXPECT_TRUE(e4m3_is_nan(e4m3_from_f32(-nan)));
  for (float big : {57345.f, 61440.f, 1e10f, FLT_MAX}) {
    EXPECT_EQ(e5m2_from_f32(big), 0x7B) << big;
    EXPECT_EQ(e5m2_from_f32(-big), 0xFB) << big;
  }
  EXPECT_EQ(e5m2_from_f32(inf), 0x7C);
  EXPECT_EQ(e5m2_from_f32(-inf), 0xFC);
  EXPECT_TRUE(std::isnan(e5m2_to_f32(e5m2_from_f32(nan))));
  EXPECT_EQ(e2m1_from_f32(7.f), 7);
  EXPECT_EQ(e2m1_from_f32(-1e30f), 0xF);
  EXPECT_EQ(e2m1_from_f32(inf), 7);
  EXPECT_EQ(e2m1_from_f32(nan), 0);
  // Signed zeros and FP32 subnormals.
  EXPECT_EQ(e4m3_from_f32(-0.f), 0x80);
  EXPECT_EQ(e4m3_from_f32(1e-40f), 0x00);
  EXPECT_EQ(e4m3_from_f32(-1e-40f), 0x80);
  EXPECT_EQ(e2m1_from_f32(-0.f), 0x8);
}

TEST(Formats, SubnormalRounding) {
  EXPECT_EQ(e4m3_from_f32(std::ldexp(1.f, -10)), 0x00);      // half of min: tie to 0
  EXPECT_EQ(e4m3_from_f32(std::ldexp(1.0001f, -10)), 0x01);  // just above half
  EXPECT_EQ(e4m3_from_f32(std::ldexp(3.f, -10)), 0x02);      // 1.5 ulp: tie to even 2
  EXPECT_EQ(e4m3_from_f32(std::ldexp(15.f, -10)), 0x08);     // 7.5 ulp: up to min normal
  EXPECT_EQ(e5m2_from_f32(std::ldexp(1.f, -17)), 0x00);
  EXPECT_EQ(e5m2_from_f32(std::ldexp(1.5f, -17)), 0x01);
}

// Random FP32 bit patterns and values at every scale against the brute-force nearest search.
TEST(Formats, EncodersMatchBruteForceNearest) {
  std::mt19937 rng(1234);
  const FormatTable t4 = e4m3_table(), t5 = e5m2_table(), t2 = e2m1_table();
  std::uniform_int_distribution<int> ex(-30, 20);
  std::uniform_real_distribution<float> mant(1.f, 2.f);
  for (int i = 0; i < 200000; ++i) {
    float x = std::ldexp(mant(rng), ex(rng));
    if (i % 3 == 0) {
      uint32_t bits = rng() & 0x7FFFFFFFu;
      x = f32_from_bits(bits);
      if (!std::isfinite(x)) continue;
    }
    EXPECT_EQ(e4m3_from_f32(x), brute_nearest(t4, x)) << x;
    EXPECT_EQ(e5m2_from_f32(x), brute_nearest(t5, x)) << x;
    EXPECT_EQ(e2m1_from_f32(x), brute_nearest(t2, x)) << x;
    EXPECT_EQ(e4m3_from_f32(-x), brute_nearest(t4, x) | 0x80) << x;
    if (HasFailure()) return;
  }
}

TEST(Formats, Bf16RoundsToNearestEven) {
  std::mt19937 rng(7);
  for (int i = 0; i < 100000; ++i) {
    const float x = f32_from_bits(rng());
    if (std::isnan(x)) {
      EXPECT_TRUE(std::isnan(bf16_to_f32(bf16_from_f32(x))));
      continue;
    }
    const uint16_t h = bf16_from_f32(x);
    const double got = bf16_to_f32(h);
    // Neighbours: the result is one of the two bf16 values bracketing x, the nearer one.
    const float lo = f32_from_bits(f32_bits(x) & 0xFFFF0000u);
    const uint32_t hi_bits = (f32_bits(x) & 0xFFFF0000u) + 0x10000u;
    const bool hi_overflows = (hi_bits & 0x7F800000u) == 0x7F800000u;  // next bf16 is Inf: 2^128
    const double hi_val =
        hi_overflows ? std::copysign(std::ldexp(1.0, 128), x) : double(f32_from_bits(hi_bits));
    const float hi = f32_from_bits(hi_bits);
    const double dlo = std::fabs(double(x) - lo), dhi = std::fabs(hi_val - x);
    if (dlo < dhi)
      EXPECT_EQ(got, double(lo)) << x;
    else if (dhi < dlo)
      EXPECT_EQ(got, double(hi)) << x;
    else
      EXPECT_EQ(h & 1, 0) << x;
  }
  EXPECT_EQ(bf16_from_f32(1.0f), 0x3F80);
  EXPECT_EQ(bf16_from_f32(f32_from_bits(0x3F808000u)), 0x3F80);  // tie to even
  EXPECT_EQ(bf16_from_f32(f32_from_bits(0x3F818000u)), 0x3F82);  // tie to even (up)
}

TEST(Formats, E8M0) {
  for (int b = 0; b < 255; ++b) {
    EXPECT_EQ(e8m0_to_f32(uint8_t(b)), float(std::ldexp(1.0, b - 127))) << b;
    EXPECT_EQ(e8m0_from_f32(e8m0_to_f32(uint8_t(b))), b) << b;
  }
  EXPECT_TRUE(std::isnan(e8m0_to_f32(0xFF)));
  EXPECT_EQ(e8m0_from_f32(std::numeric_limits<float>::quiet_NaN()), 0xFF);
  EXPECT_EQ(e8m0_from_f32(std::numeric_limits<float>::infinity()), 0xFF);
  EXPECT_EQ(e8m0_from_f32(1.4f), 127);
  EXPECT_EQ(e8m0_from_f32(1.5f), 128);  // mantissa >= .5 rounds up (PyTorch's rule)
  EXPECT_EQ(e8m0_from_f32(3.0f), 129);
  EXPECT_EQ(e8m0_from_f32(0.f), 0);
  EXPECT_EQ(e8m0_from_f32(FLT_MAX), 0xFE);  // saturates instead of becoming NaN
}

TEST(Formats, PackedE2M1NibbleOrder) {
  const uint8_t b = pack_e2m1x2(0x2, 0xB);
  EXPECT_EQ(b, 0xB2);
  EXPECT_EQ(e2m1x2_first(b), 0x2);
  EXPECT_EQ(e2m1x2_second(b), 0xB);
}

// Stochastic E2M1 rounding: grid values never move; between neighbours lo < hi the code is hi
// exactly for the u below frac * 2^24, so the mean over all u is the input; saturation, NaN, sign.
TEST(Formats, E2M1StochasticRounding) {
  const float grid[] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  for (int c = 0; c < 8; ++c)
    for (uint32_t u : {0u, 1u, 0x800000u, 0xFFFFFFu}) {
      EXPECT_EQ(fmt::e2m1_from_f32_sr(grid[c], u), c) << grid[c];
      EXPECT_EQ(fmt::e2m1_from_f32_sr(-grid[c], u), c == 0 ? 0x8 : (0x8 | c)) << -grid[c];
    }
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> d(0.0f, 6.0f);
  for (int n = 0; n < 2000; ++n) {
    const float x = n < 8 ? 0.25f + 0.5f * static_cast<float>(n) * 0.25f : d(rng);
    int lo = 0;
    while (lo < 7 && grid[lo + 1] <= x) ++lo;
    if (grid[lo] == x) continue;
    const float frac = (x - grid[lo]) / (grid[lo + 1] - grid[lo]);
    const auto cut = static_cast<uint32_t>(std::ceil(static_cast<double>(frac) * 16777216.0));
    SCOPED_TRACE(::testing::Message() << "x " << x << " cut " << cut);
    EXPECT_EQ(fmt::e2m1_from_f32_sr(x, 0), lo + 1);
    EXPECT_EQ(fmt::e2m1_from_f32_sr(x, cut - 1), lo + 1);
    EXPECT_EQ(fmt::e2m1_from_f32_sr(x, cut), lo);
    EXPECT_EQ(fmt::e2m1_from_f32_sr(x, 0xFFFFFFu), lo);
    EXPECT_EQ(fmt::e2m1_from_f32_sr(-x, 0), 0x8 | (lo + 1));
    // Mean over every u: (cut * hi + (2^24 - cut) * lo) / 2^24 == x to 2^-24 of the gap.
    const double mean = (cut * static_cast<double>(grid[lo + 1]) +
                         (16777216.0 - cut) * static_cast<double>(grid[lo])) /
                        16777216.0;
    EXPECT_NEAR(mean, x, (grid[lo + 1] - grid[lo]) * 6e-8);
  }
  EXPECT_EQ(fmt::e2m1_from_f32_sr(6.5f, 0), 0x7);
  EXPECT_EQ(fmt::e2m1_from_f32_sr(-1e30f, 0), 0xF);
  EXPECT_EQ(fmt::e2m1_from_f32_sr(INFINITY, 0), 0x7);
  EXPECT_EQ(fmt::e2m1_from_f32_sr(NAN, 0), 0x0);
  EXPECT_EQ(fmt::e2m1_from_f32_sr(1e-30f, 0), 0x1);  // any positive fraction can round up
  EXPECT_EQ(fmt::e2m1_from_f32_sr(1e-30f, 1), 0x0);
  // The random bits: deterministic, 24 bits, spread over seeds and indices.
  EXPECT_EQ(fmt::sr_bits(7, 11), fmt::sr_bits(7, 11));
  EXPECT_NE(fmt::sr_bits(7, 11), fmt::sr_bits(8, 11));
  EXPECT_NE(fmt::sr_bits(7, 11), fmt::sr_bits(7, 12));
  double sum = 0;
  for (uint64_t i = 0; i < 100000; ++i) {
    const uint32_t b = fmt::sr_bits(42, i);
    ASSERT_LT(b, 1u << 24);
    sum += b;
  }
  EXPECT_NEAR(sum / 100000 / 16777216.0, 0.5, 0.005);
}

TEST(Formats, PowersOfTwo) {
  for (int e = -149; e <= 127; ++e) {
    EXPECT_EQ(exp2i(e), float(std::ldexp(1.0, e))) << e;
    EXPECT_EQ(pow2_exponent(exp2i(e)), e) << e;
  }
  EXPECT_EQ(exp2i(-150), 0.f);
  for (int d : {-200, -127, -1, 0, 1, 127, 200}) {
    EXPECT_TRUE(std::isnan(mul_pow2(NAN, d))) << d;
    EXPECT_EQ(mul_pow2(INFINITY, d), INFINITY) << d;
    EXPECT_EQ(mul_pow2(-INFINITY, d), -INFINITY) << d;
    EXPECT_EQ(mul_pow2(0.f, d), 0.f) << d;
    EXPECT_TRUE(std::signbit(mul_pow2(-0.f, d))) << d;
  }
  EXPECT_EQ(pow2_exponent(3.0f), 1);
  std::mt19937 rng(3);
  for (int i = 0; i < 10000; ++i) {
    const float x = std::ldexp(1.f + (rng() % 1000) / 1000.f, int(rng() % 200) - 100);
    const int d = int(rng() % 300) - 150;
    const double want = std::ldexp(double(x), d);
    if (std::fabs(want) < std::ldexp(1.0, -149)) continue;    // documented: flushes below 2^-149
    EXPECT_EQ(mul_pow2(x, d), float(want)) << x << " " << d;  // float(): one RNE rounding
  }
}

TEST(Formats, ScaleExponentIsSmallestFittingPowerOfTwo) {
  EXPECT_EQ(scale_exponent(448.f), 0);
  EXPECT_EQ(scale_exponent(std::nextafter(448.f, 1e9f)), 1);
  EXPECT_EQ(scale_exponent(449.f), 1);
  EXPECT_EQ(scale_exponent(224.f), -1);
  EXPECT_EQ(scale_exponent(1.f), -8);  // 1 / 2^-8 = 256 <= 448, 1 / 2^-9 = 512 > 448
  EXPECT_EQ(scale_exponent(0.f), kMinScaleExp);
  EXPECT_EQ(scale_exponent(57344.f, kE5M2MaxExp), 0);
  EXPECT_EQ(scale_exponent(FLT_MAX), 120);
  std::mt19937 rng(11);
  for (int i = 0; i < 100000; ++i) {
    const float a = std::ldexp(1.f + (rng() % 100000) / 100000.f, int(rng() % 236) - 110);
    const int e = scale_exponent(a);
    ASSERT_LE(double(a), 448.0 * std::ldexp(1.0, e)) << a;
    if (e > kMinScaleExp) ASSERT_GT(double(a), 448.0 * std::ldexp(1.0, e - 1)) << a;
  }
}

TEST(Formats, MxSharedExponent) {
  EXPECT_EQ(mx_shared_exponent(6.f), 0);
  EXPECT_EQ(mx_shared_exponent(4.f), 0);
  EXPECT_EQ(mx_shared_exponent(7.99f), 0);
  EXPECT_EQ(mx_shared_exponent(8.f), 1);
  EXPECT_EQ(mx_shared_exponent(1.f), -2);
  EXPECT_EQ(mx_shared_exponent(0.f), kMinScaleExp);
  EXPECT_EQ(mx_shared_exponent(1e-39f), kMinScaleExp);
}

// The scaling-aware transpose's element step: exact wherever the result is a normal E4M3 value,
// RNE otherwise, for every code and every shift.
TEST(Formats, E4M3MulPow2EveryCodeAndShift) {
  for (int c = 0; c < 256; ++c) {
    for (int d = -60; d <= 12; ++d) {
      const uint8_t got = e4m3_mul_pow2(uint8_t(c), d);
      if (e4m3_is_nan(uint8_t(c))) {
        EXPECT_TRUE(e4m3_is_nan(got));
        continue;
      }
      const double want = std::ldexp(double(e4m3_to_f32(uint8_t(c))), d);
      EXPECT_EQ(got, e4m3_from_f32(float(want))) << c << " " << d;
      if (std::fabs(want) >= std::ldexp(1.0, -6) && std::fabs(want) <= 448.0)
        EXPECT_EQ(double(e4m3_to_f32(got)), want) << "not exact: " << c << " " << d;
    }
  }
}

}  // namespace
}  // namespace fp8flow
