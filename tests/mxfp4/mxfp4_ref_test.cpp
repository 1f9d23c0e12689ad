// CPU reference of the MXFP4 ops: the bit-exact identities with the two-step paths (dequantize,
// then quantize), the MX rule checked by an independent nearest-value search, round trips, and the
// FP8 -> MXFP4 error printed for the log.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>

#include "common/ref_access.h"
#include "mxfp4/mxfp4_test_util.h"

namespace fp8flow::test {
namespace {

using ref::load_e2m1;

struct Shape {
  int64_t M, K;
};
// K from 128 to 7168; M not a multiple of 128.
const Shape kShapes[] = {{1, 128}, {3, 256}, {77, 640}, {130, 384}, {131, 7168}};

HostScaled quantize_fp8(const HostTensor& x) {
  HostScaled h = alloc_fp8(x.v.rows, x.v.cols);
  quantize(x.v, h.st());
  return h;
}

HostScaled quantize_fp8_transposed(const HostTensor& x, std::vector<int64_t> groups) {
  HostScaled h = alloc_fp8(x.v.cols, x.v.rows, std::move(groups));
  quantize_transposed(x.v, h.st());
  return h;
}

HostScaled quantize_mx(const HostTensor& x) {
  HostScaled h = alloc_mx(x.v.rows, x.v.cols);
  quantize_mxfp4(x.v, h.st());
  return h;
}

// ---------------------------------------------------------------------------------------------
// The three identities.

TEST(Mxfp4Ref, Fp8ToMxfp4EqualsQuantizeMxfp4OfDequantize) {
  uint64_t seed = 1;
  for (Fill f : {Fill::Normal, Fill::WideRange})
    for (const Shape& s : kShapes) {
      const HostScaled x = fp8_from_values(make_values(s.M, s.K, f, seed++), s.M, s.K);
      HostScaled direct = alloc_mx(s.M, s.K);
      fp8_to_mxfp4(x.st(), direct.st());
      EXPECT_TRUE(scaled_equal(direct, quantize_mx(dequant_f32(x))))
          << "fill " << int(f) << " M " << s.M << " K " << s.K;
    }
  // Raw codes (NaN codes included) and scales over the whole E8M0 range, where FP32 products
  // overflow or go subnormal: the identity still holds, since both sides use the same products.
  const HostScaled x = fp8_random(67, 512, 7, -127, 127, /*with_nan=*/true);
  HostScaled direct = alloc_mx(67, 512);
  fp8_to_mxfp4(x.st(), direct.st());
  EXPECT_TRUE(scaled_equal(direct, quantize_mx(dequant_f32(x))));
}

TEST(Mxfp4Ref, Mxfp4ToFp8EqualsQuantizeOfDequantize) {
  uint64_t seed = 100;
  for (Fill f : {Fill::Normal, Fill::WideRange})
    for (const Shape& s : kShapes) {
      const HostScaled y = mx_from_values(make_values(s.M, s.K, f, seed++), s.M, s.K);
      HostScaled direct = alloc_fp8(s.M, s.K);
      mxfp4_to_fp8(y.st(), direct.st());
      EXPECT_TRUE(scaled_equal(direct, quantize_fp8(dequant_f32(y))))
          << "fill " << int(f) << " M " << s.M << " K " << s.K;
    }
  // Raw MXFP4 with every non-NaN scale byte, 253 and 254 included (their large elements decode
  // to Inf, which both sides encode as NaN), and zero blocks.
  const HostScaled y = mx_random(67, 1024, 8, 0, 254);
  HostScaled direct = alloc_fp8(67, 1024);
  mxfp4_to_fp8(y.st(), direct.st());
  EXPECT_TRUE(scaled_equal(direct, quantize_fp8(dequant_f32(y))));
}

TEST(Mxfp4Ref, TransposedEqualsQuantizeTransposedOfDequantize) {
  struct Case {
    int64_t M, K;
    std::vector<int64_t> groups;
  };
  const std::vector<Case> cases = {
      {510, 256, {0, 128, 5, 300, 0, 77}},
      {510, 128, {}},
      {1, 128, {}},
      {200, 384, {200}},
      {130, 7168, {}},
      {131, 256, {0, 0, 131, 0}},
      {64, 128, {1, 1, 1, 61}},
  };
  uint64_t seed = 200;
  for (const Case& c : cases)
    for (Fill f : {Fill::Normal, Fill::WideRange}) {
      const HostScaled y = mx_from_values(make_values(c.M, c.K, f, seed++), c.M, c.K);
      HostScaled direct = alloc_fp8(c.K, c.M, c.groups);
      mxfp4_to_fp8_transposed(y.st(), direct.st());
      EXPECT_TRUE(scaled_equal(direct, quantize_fp8_transposed(dequant_f32(y), c.groups)))
          << "fill " << int(f) << " M " << c.M << " K " << c.K;
    }
  const HostScaled y = mx_random(300, 256, 9, 0, 254);
  HostScaled direct = alloc_fp8(256, 300, {0, 128, 5, 90, 0, 77});
  mxfp4_to_fp8_transposed(y.st(), direct.st());
  EXPECT_TRUE(scaled_equal(direct, quantize_fp8_transposed(dequant_f32(y), direct.groups)));
}

// ---------------------------------------------------------------------------------------------
// The MX rule, checked without fmt::'s encoders.

// Nearest E2M1 code to a (any magnitude; beyond 6 the nearest is 6), ties to the even code.
uint8_t nearest_e2m1(double a) {
  static const double kMag[8] = {0, 0.5, 1, 1.5, 2, 3, 4, 6};
  const double m = std::fabs(a);
  int best = 0;
  for (int c = 1; c < 8; ++c) {
    const double d = std::fabs(m - kMag[c]), db = std::fabs(m - kMag[best]);
    if (d < db || (d == db && c % 2 == 0)) best = c;
  }
  return static_cast<uint8_t>(best | (std::signbit(a) ? 8 : 0));
}

void check_mx_rule(const std::vector<float>& x, int64_t M, int64_t K, const HostScaled& y) {
  int64_t nan_blocks = 0, zero_blocks = 0, blocks = 0;
  for (int64_t r = 0; r < M; ++r)
    for (int64_t b = 0; b < K / 32; ++b, ++blocks) {
      const float* v = &x[static_cast<size_t>(r * K + b * 32)];
      const uint8_t s = y.scale.buf[static_cast<size_t>(r * (K / 32) + b)];
      bool finite = true;
      double amax = 0;
      for (int i = 0; i < 32; ++i) {
        finite = finite && std::isfinite(v[i]);
        if (std::isfinite(v[i])) amax = std::max(amax, std::fabs(double(v[i])));
      }
      auto code = [&](int i) { return load_e2m1(y.data.v, r, b * 32 + i); };
      if (!finite) {
        ++nan_blocks;
        ASSERT_EQ(s, 0xFF) << "row " << r << " block " << b;
        for (int i = 0; i < 32; ++i) ASSERT_EQ(code(i), 0);
        continue;
      }
      if (amax == 0) ++zero_blocks;
      // OCP: X = floor(log2(amax)) - 2, clamped to the E8M0 range (FP32 subnormals clamp to -127).
      const int x_exp =
          amax < std::ldexp(1.0, -126) ? -127 : std::clamp(std::ilogb(amax) - 2, -127, 127);
      ASSERT_EQ(s, x_exp + 127) << "row " << r << " block " << b << " amax " << amax;
      if (amax >= std::ldexp(1.0, -125)) {
        const double top = amax / std::ldexp(1.0, x_exp);  // the OCP exponent puts amax in [4, 8)
        ASSERT_TRUE(top >= 4 && top < 8) << top;
      }
      for (int i = 0; i < 32; ++i) {
        const double scaled = std::ldexp(double(v[i]), -x_exp);
        ASSERT_EQ(code(i), nearest_e2m1(scaled))
            << "row " << r << " elem " << b * 32 + i << " value " << v[i] << " X " << x_exp;
        ASSERT_LE(std::fabs(fmt::e2m1_to_f32(code(i))), 6.0f);
      }
    }
  ::testing::Test::RecordProperty("nan_blocks", static_cast<int>(nan_blocks));
  (void)zero_blocks;
}

TEST(Mxfp4Ref, QuantizeFollowsTheOcpRule) {
  uint64_t seed = 300;
  for (Fill f : {Fill::Normal, Fill::WideRange, Fill::Adversarial, Fill::Zeros})
    for (DType d : {DType::F32, DType::BF16}) {
      const int64_t M = 37, K = 512;
      std::vector<float> x = make_values(M, K, f, seed++);
      const HostTensor in = host_from_values(x, d, M, K);
      if (d == DType::BF16)
        for (size_t i = 0; i < x.size(); ++i)
          x[i] = fmt::bf16_to_f32(reinterpret_cast<const uint16_t*>(in.buf.data())[i]);
      const HostScaled y = quantize_mx(in);
      check_mx_rule(x, M, K, y);
    }
}

TEST(Mxfp4Ref, SpecialBlocks) {
  const int64_t K = 32 * 6;
  std::vector<float> x(K, 0.f);
  // Block 0: nibble order and the exponent. amax 6 -> X = 0; element 0 = 6 (code 7) in the low
  // nibble of byte 0; element 3 = -1 (code 0xA) in the high nibble of byte 1.
  x[0] = 6.f;
  x[3] = -1.f;
  // Block 1: a NaN. Block 2: an Inf. Block 3: zeros and a negative zero. Block 4: tiny values
  // (FP32 subnormal amax -> X = -127). Block 5: ties: 2.5 -> 2 (even), 3.5 -> 4, 5 -> 4, 7 -> 6.
  x[32 + 5] = NAN;
  x[64 + 9] = -INFINITY;
  x[96 + 1] = -0.f;
  for (int i = 0; i < 32; ++i) x[128 + i] = std::ldexp(float(i % 5), -140);
  const float ties[] = {4.f, 2.5f, 3.5f, 5.f, 7.f, 0.25f, 0.75f, 1.25f, 1.75f};
  for (int i = 0; i < 9; ++i) x[160 + i] = ties[i];
  const HostTensor in = host_from_values(x, DType::F32, 1, K);
  const HostScaled y = quantize_mx(in);
  const uint8_t* d = y.data.buf.data();
  const uint8_t* s = y.scale.buf.data();
  EXPECT_EQ(s[0], 127);
  EXPECT_EQ(d[0], 0x07);
  EXPECT_EQ(d[1], 0xA0);
  EXPECT_EQ(s[1], 0xFF);
  EXPECT_EQ(s[2], 0xFF);
  for (int i = 16; i < 48; ++i) EXPECT_EQ(d[i], 0) << i;
  EXPECT_EQ(s[3], 0);      // zero block: the smallest scale, 2^-127
  EXPECT_EQ(d[48], 0x80);  // element 1 is -0: code 0x8 in the high nibble
  EXPECT_EQ(s[4], 0);      // amax 4 * 2^-140 is an FP32 subnormal: X clamps to -127
  EXPECT_EQ(s[5], 127);    // amax 7 -> X = 0
  const uint8_t want[] = {6, 4, 6, 6, 7, 0, 2, 2, 4};  // 4, 2, 4, 4, 6, 0, 1, 1, 2
  for (int i = 0; i < 9; ++i) EXPECT_EQ(load_e2m1(y.data.v, 0, 160 + i), want[i]) << ties[i];
}

// ---------------------------------------------------------------------------------------------
// Round trips.

// FP8 values that MXFP4 represents exactly: per block an exponent within 4 binades of its tile's
// largest and random E2M1 codes with the largest one present. fp8 -> mxfp4 -> fp8 gives x back.
TEST(Mxfp4Ref, RoundTripIsExactOnMxfp4Values) {
  const int64_t M = 45, K = 1024;
  std::mt19937_64 rng(400);
  std::uniform_int_distribution<int> code(0, 15), xe(-4, 0), tile_e(-60, 60);
  std::vector<float> v(static_cast<size_t>(M * K));
  for (int64_t r = 0; r < M; ++r)
    for (int64_t t = 0; t < K / 128; ++t) {
      const int e_tile = tile_e(rng);
      for (int b = 0; b < 4; ++b) {
        const int e = e_tile + (b == 0 ? 0 : xe(rng));
        for (int i = 0; i < 32; ++i) {
          const uint8_t c = i == 0 ? 7 : static_cast<uint8_t>(code(rng));
          v[static_cast<size_t>(r * K + t * 128 + b * 32 + i)] = std::ldexp(fmt::e2m1_to_f32(c), e);
        }
      }
    }
  const HostScaled x = fp8_from_values(v, M, K);
  EXPECT_TRUE(bytes_equal(dequant_f32(x), host_from_values(v, DType::F32, M, K)))
      << "test setup: the values must be exact in FP8";
  HostScaled mx = alloc_mx(M, K), back = alloc_fp8(M, K);
  fp8_to_mxfp4(x.st(), mx.st());
  mxfp4_to_fp8(mx.st(), back.st());
  EXPECT_TRUE(scaled_equal(back, x));
}

// MXFP4 from quantize_mxfp4 of realistic data -> FP8 -> MXFP4 gives the same MXFP4 (the FP8 step
// is exact when no block sits far below its tile's largest).
TEST(Mxfp4Ref, RoundTripFromMxfp4IsExact) {
  const int64_t M = 64, K = 2048;
  const HostScaled y = mx_from_values(make_values(M, K, Fill::Normal, 401), M, K);
  HostScaled x = alloc_fp8(M, K), back = alloc_mx(M, K);
  mxfp4_to_fp8(y.st(), x.st());
  fp8_to_mxfp4(x.st(), back.st());
  EXPECT_TRUE(scaled_equal(back, y));
}

// Stochastic rounding (Mxfp4Rounding): the shared exponents and NaN blocks are RNE's; every
// element lands on one of the two E2M1 neighbours of its exact value (RNE's code or the one across
// the value); same seed, same bits; another seed, other bits; averaged over many seeds the decoded
// values approach the FP8 values (RNE's error does not shrink), including the small elements that
// RNE flushes to zero.
TEST(Mxfp4Ref, StochasticRoundingIsUnbiased) {
  const int64_t M = 16, K = 512;
  HostScaled x = fp8_from_values(make_values(M, K, Fill::Normal, 403), M, K);
  x.data.ptr<uint8_t>()[5 * K + 7] = 0x7F;  // a NaN code: its block gets the NaN scale
  HostScaled rne = alloc_mx(M, K);
  fp8_to_mxfp4(x.st(), rne.st());
  const HostTensor fx = dequant_f32(x), frne = dequant_f32(rne);
  const int kSeeds = 256;
  std::vector<double> mean(static_cast<size_t>(M * K), 0.0);
  HostScaled first = alloc_mx(M, K);
  for (int sd = 0; sd < kSeeds; ++sd) {
    HostScaled sr = alloc_mx(M, K);
    fp8_to_mxfp4(x.st(), sr.st(), Mxfp4Rounding{true, 1000u + static_cast<uint64_t>(sd)});
    ASSERT_TRUE(bytes_equal(sr.scale, rne.scale)) << "seed " << sd;
    if (sd == 0) {
      first = alloc_mx(M, K);
      fp8_to_mxfp4(x.st(), first.st(), Mxfp4Rounding{true, 1000u});
      EXPECT_TRUE(scaled_equal(first, sr)) << "same seed, same bits";
    }
    if (sd == 1) EXPECT_FALSE(bytes_equal(first.data, sr.data)) << "another seed, other bits";
    const HostTensor f = dequant_f32(sr);
    for (int64_t i = 0; i < M * K; ++i) {
      const float v = fx.v.ptr<float>()[i], q = f.v.ptr<float>()[i], r = frne.v.ptr<float>()[i];
      if (std::isnan(v) || std::isnan(r)) continue;
      // One of the two neighbours: within one E2M1 step of the value, on RNE's side or across.
      const uint8_t sb = sr.scale.ptr<uint8_t>()[(i / K) * (K / 32) + (i % K) / 32];
      const double step = std::ldexp(2.0, fmt::e8m0_exponent(sb));  // the widest gap, 2 * 2^X
      ASSERT_LE(std::fabs(q - v), step) << i;
      mean[static_cast<size_t>(i)] += q / static_cast<double>(kSeeds);
    }
  }
  double err_sr = 0, err_rne = 0, scale = 0;
  int64_t flushed = 0, flushed_kept = 0;
  double flushed_abs = 0, flushed_err = 0;  // |v| and mean(SR) - v over RNE's flushed elements
  for (int64_t i = 0; i < M * K; ++i) {
    const double v = fx.v.ptr<float>()[i], r = frne.v.ptr<float>()[i];
    if (std::isnan(v) || std::isnan(r)) continue;
    err_sr += mean[static_cast<size_t>(i)] - v;  // signed: bias
    err_rne += std::fabs(r - v);
    scale += std::fabs(v);
    if (r == 0.0 && v != 0.0) {
      ++flushed;
      flushed_kept += mean[static_cast<size_t>(i)] != 0.0;
      flushed_abs += std::fabs(v);
      flushed_err += (mean[static_cast<size_t>(i)] - v) * (v < 0 ? -1.0 : 1.0);
    }
  }
  // Mean of 256 draws: per element the SR error shrinks ~16x; summed signed over 8192 elements
  // the bias is far below RNE's mean absolute error.
  EXPECT_LT(std::fabs(err_sr) / scale, 0.002);
  EXPECT_GT(err_rne / scale, 0.02);
  // Elements RNE flushes to zero (RNE loses all of them): nearly all come up in some draw, and
  // on average their magnitude is kept (a few with tiny probabilities may stay at zero).
  EXPECT_GT(flushed, 100);
  EXPECT_GT(flushed_kept, flushed * 95 / 100);
  EXPECT_LT(std::fabs(flushed_err) / flushed_abs, 0.1);
  // Off: exactly RNE.
  HostScaled off = alloc_mx(M, K);
  fp8_to_mxfp4(x.st(), off.st(), Mxfp4Rounding{false, 99});
  EXPECT_TRUE(scaled_equal(off, rne));
}

// The error FP8 -> MXFP4 adds, relative RMS against the FP8 values, printed for the log.
TEST(Mxfp4Ref, Fp8ToMxfp4ErrorIsReported) {
  const int64_t M = 256, K = 7168;
  const std::vector<float> v = make_values(M, K, Fill::Normal, 402);
  const HostScaled x = fp8_from_values(v, M, K);
  HostScaled mx = alloc_mx(M, K);
  fp8_to_mxfp4(x.st(), mx.st());
  const HostTensor a = dequant_f32(x), b = dequant_f32(mx);
  double num = 0, den = 0, num8 = 0;
  for (int64_t i = 0; i < M * K; ++i) {
    const double fa = a.v.ptr<float>()[i], fb = b.v.ptr<float>()[i], f = v[static_cast<size_t>(i)];
    num += (fb - fa) * (fb - fa);
    den += fa * fa;
    num8 += (fa - f) * (fa - f);
  }
  const double rel = std::sqrt(num / den), rel8 = std::sqrt(num8 / den);
  std::printf(
      "[ MXFP4    ] N(0,1) rows x 2^U(-8,8), %lldx%lld: FP8->MXFP4 relative RMS error %.4f "
      "(FP8 vs F32: %.4f)\n",
      static_cast<long long>(M), static_cast<long long>(K), rel, rel8);
  RecordProperty("fp8_to_mxfp4_rel_rms", std::to_string(rel));
  // E2M1 keeps 1 mantissa bit: expect ~0.1 on Gaussian data; FP8 (3 bits) ~0.02.
  EXPECT_GT(rel, 0.02);
  EXPECT_LT(rel, 0.2);
  EXPECT_LT(rel8, 0.05);
}

}  // namespace
}  // namespace fp8flow::test
