// CPU reference of quantize / quantize_transposed / dequantize: checked against properties that do
// not restate its code (smallest fitting power-of-two scale, nearest code, non-finite handling,
// round-trip error bound, transposed == row-wise of the transpose, groups == per-group slices).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/test_util.h"

namespace fp8flow::test {
namespace {

// A quantized host tensor: codes + scales (+ column groups), poisoned before use.
struct QHost {
  HostTensor data, scale;
  ScaleLayout layout = ScaleLayout::Rowwise1x128;
  std::vector<int64_t> groups;
  QHost(DType fp8, int64_t rows, int64_t cols, ScaleLayout l = ScaleLayout::Rowwise1x128,
        std::vector<int64_t> g = {})
      : layout(l), groups(std::move(g)) {
    const Shape2D s = scale_shape(l, rows, cols, groups);
    data = HostTensor(fp8, rows, cols);
    scale = HostTensor(l == ScaleLayout::Mx1x32 ? DType::E8M0 : DType::F32, s.rows, s.cols);
  }
  ScaledTensor view() const { return ScaledTensor{data.v, scale.v, layout, groups}; }
  uint8_t code(int64_t r, int64_t c) const {
    return data.buf[static_cast<size_t>(r * data.v.cols + c)];
  }
  float s(int64_t r, int64_t c) const {
    return reinterpret_cast<const float*>(scale.buf.data())[r * scale.v.cols + c];
  }
};

struct Fmt {
  DType d;
  int max_exp;
  float fmax;
  int mant;      // mantissa bits
  int sub_step;  // log2 of the smallest subnormal (relative to the scale)
  float decode(uint8_t q) const {
    return d == DType::E4M3 ? fmt::e4m3_to_f32(q) : fmt::e5m2_to_f32(q);
  }
};
const Fmt kE4M3{DType::E4M3, fmt::kE4M3MaxExp, fmt::kE4M3Max, 3, -9};
const Fmt kE5M2{DType::E5M2, fmt::kE5M2MaxExp, fmt::kE5M2Max, 2, -16};

// Input values as the op sees them (BF16-rounded for BF16 inputs).
std::vector<float> as_seen(const HostTensor& in) {
  std::vector<float> x(static_cast<size_t>(in.v.numel()));
  for (size_t i = 0; i < x.size(); ++i)
    x[i] = in.v.dtype == DType::F32
               ? reinterpret_cast<const float*>(in.buf.data())[i]
               : fmt::bf16_to_f32(reinterpret_cast<const uint16_t*>(in.buf.data())[i]);
  return x;
}

bool is_finite(float x) {
  return std::isfinite(x);
}

// One tile's elements (values and their codes), and its scale.
// Checks: the scale is a power of two in [2^-127, 2^127]; it is the smallest one that fits
// (amax <= fmax * s, amax > fmax * s / 2 unless s is the floor); an all-zero tile gets 2^-127;
// each finite element's code is a nearest code of x / s; non-finite elements get NaN (Inf for
// E5M2 infinities) with their sign.
void check_tile(const Fmt& f, const std::vector<float>& xs, const std::vector<uint8_t>& qs, float s,
                const ::testing::Message& where) {
  SCOPED_TRACE(where);
  const int e = fmt::pow2_exponent(s);
  ASSERT_EQ(s, std::ldexp(1.f, e)) << "scale " << s << " is not a power of two";
  ASSERT_GE(e, -127);
  ASSERT_LE(e, 127);
  float amax = 0.f;
  for (float x : xs)
    if (is_finite(x)) amax = std::max(amax, std::fabs(x));
  EXPECT_LE(static_cast<double>(amax), static_cast<double>(f.fmax) * std::ldexp(1.0, e));
  if (e > -127)
    EXPECT_GT(static_cast<double>(amax), static_cast<double>(f.fmax) * std::ldexp(1.0, e - 1));
  if (amax == 0.f) EXPECT_EQ(e, -127) << "all-zero tile";
  for (size_t i = 0; i < xs.size(); ++i) {
    const float x = xs[i];
    const uint8_t q = qs[i];
    const bool neg = std::signbit(x);
    ASSERT_EQ((q & 0x80) != 0, neg) << "sign of element " << i << " x=" << x;
    if (std::isnan(x) || (std::isinf(x) && f.d == DType::E4M3)) {
      ASSERT_EQ(q & 0x7F, 0x7F) << "element " << i << " x=" << x;
      continue;
    }
    if (std::isinf(x)) {
      ASSERT_EQ(q & 0x7F, 0x7C) << "element " << i;
      continue;
    }
    // Nearest: no neighbouring magnitude code is strictly closer to |x| / s.
    const double t = std::fabs(static_cast<double>(x)) / std::ldexp(1.0, e);
    const uint8_t m = q & 0x7F;
    const double d0 = std::fabs(f.decode(m) - t);
    ASSERT_LE(f.decode(m), f.fmax);
    if (m > 0) ASSERT_LE(d0, std::fabs(f.decode(static_cast<uint8_t>(m - 1)) - t)) << "x=" << x;
    if (f.decode(static_cast<uint8_t>(m + 1)) <= f.fmax)
      ASSERT_LE(d0, std::fabs(f.decode(static_cast<uint8_t>(m + 1)) - t)) << "x=" << x;
  }
}

class RefQuantize : public ::testing::TestWithParam<DType> {
 protected:
  const Fmt& f() const { return GetParam() == DType::E4M3 ? kE4M3 : kE5M2; }
};

TEST_P(RefQuantize, RowwiseScaleIsSmallestFittingPowerOfTwo) {
  for (Fill fill : {Fill::Normal, Fill::WideRange, Fill::Adversarial, Fill::Zeros}) {
    for (DType in_dt : {DType::F32, DType::BF16}) {
      const int64_t M = 37, K = 400;  // K % 128 != 0: a partial last tile
      HostTensor in = host_from_values(make_values(M, K, fill, 11), in_dt, M, K);
      const std::vector<float> x = as_seen(in);
      QHost q(f().d, M, K);
      quantize(in.v, q.view());
      for (int64_t m = 0; m < M; ++m)
        for (int64_t k0 = 0; k0 < K; k0 += 128) {
          std::vector<float> xs;
          std::vector<uint8_t> qs;
          for (int64_t k = k0; k < std::min(K, k0 + 128); ++k) {
            xs.push_back(x[static_cast<size_t>(m * K + k)]);
            qs.push_back(q.code(m, k));
          }
          check_tile(f(), xs, qs, q.s(k0 / 128, m),
                     ::testing::Message() << "fill " << int(fill) << " row " << m << " k0 " << k0);
          if (HasFatalFailure()) return;
        }
    }
  }
}

TEST_P(RefQuantize, Block128ScaleIsSmallestFittingPowerOfTwo) {
  for (Fill fill : {Fill::Normal, Fill::WideRange, Fill::Adversarial}) {
    const int64_t M = 200, K = 272;
    HostTensor in = host_from_values(make_values(M, K, fill, 12), DType::BF16, M, K);
    const std::vector<float> x = as_seen(in);
    QHost q(f().d, M, K, ScaleLayout::Block128x128);
    quantize(in.v, q.view());
    for (int64_t m0 = 0; m0 < M; m0 += 128)
      for (int64_t k0 = 0; k0 < K; k0 += 128) {
        std::vector<float> xs;
        std::vector<uint8_t> qs;
        for (int64_t m = m0; m < std::min(M, m0 + 128); ++m)
          for (int64_t k = k0; k < std::min(K, k0 + 128); ++k) {
            xs.push_back(x[static_cast<size_t>(m * K + k)]);
            qs.push_back(q.code(m, k));
          }
        check_tile(f(), xs, qs, q.s(m0 / 128, k0 / 128),
                   ::testing::Message() << "fill " << int(fill) << " block " << m0 << "," << k0);
        if (HasFatalFailure()) return;
      }
  }
}

TEST_P(RefQuantize, TransposedScaleIsSmallestFittingPowerOfTwo) {
  const std::vector<int64_t> groups = {0, 128, 5, 300, 0, 77};
  const int64_t M = 510, K = 48;
  HostTensor in = host_from_values(make_values(M, K, Fill::Adversarial, 13), DType::BF16, M, K);
  const std::vector<float> x = as_seen(in);
  QHost qt(f().d, K, M, ScaleLayout::Rowwise1x128, groups);
  quantize_transposed(in.v, qt.view());
  int64_t tile = 0, m_start = 0;
  for (int64_t n : groups) {
    for (int64_t m0 = m_start; m0 < m_start + n; m0 += 128, ++tile) {
      const int64_t m1 = std::min(m_start + n, m0 + 128);  // a tile never crosses its group's end
      for (int64_t k = 0; k < K; ++k) {
        std::vector<float> xs;
        std::vector<uint8_t> qs;
        for (int64_t m = m0; m < m1; ++m) {
          xs.push_back(x[static_cast<size_t>(m * K + k)]);
          qs.push_back(qt.code(k, m));
        }
        check_tile(f(), xs, qs, qt.s(tile, k),
                   ::testing::Message() << "tile " << tile << " k " << k);
        if (HasFatalFailure()) return;
      }
    }
    m_start += n;
  }
  EXPECT_EQ(tile, qt.scale.v.rows);
}

TEST_P(RefQuantize, ZeroTileGetsMinimumScale) {
  const int64_t M = 3, K = 256;
  std::vector<float> x(static_cast<size_t>(M * K), 0.f);
  for (int64_t k = 0; k < 128; ++k) x[static_cast<size_t>(1 * K + k)] = -0.f;  // row 1, tile 0
  x[static_cast<size_t>(2 * K + 200)] = 3.f;                                   // row 2, tile 1
  HostTensor in = host_from_values(x, DType::F32, M, K);
  QHost q(f().d, M, K);
  quantize(in.v, q.view());
  const float floor = std::ldexp(1.f, -127);
  // scale [tiles][rows]: everything is zero except row 2's second tile.
  for (int64_t t = 0; t < 2; ++t)
    for (int64_t m = 0; m < M; ++m)
      if (!(t == 1 && m == 2)) EXPECT_EQ(q.s(t, m), floor) << t << "," << m;
  // 3 needs 2^-7 in E4M3 (448 / 128 = 3.5) and 2^-14 in E5M2 (57344 / 16384 = 3.5).
  EXPECT_EQ(q.s(1, 2), std::ldexp(1.f, f().d == DType::E4M3 ? -7 : -14));
  EXPECT_EQ(q.code(0, 5), 0x00);
  EXPECT_EQ(q.code(1, 5), 0x80);  // -0 keeps its sign
  EXPECT_EQ(q.code(2, 0), 0x00);
}

TEST_P(RefQuantize, NonFiniteGivesNaNWithoutTouchingNeighbours) {
  const int64_t M = 4, K = 256;
  std::vector<float> clean = make_values(M, K, Fill::Normal, 14);
  std::vector<float> dirty = clean;
  dirty[3] = NAN;
  dirty[static_cast<size_t>(1 * K + 7)] = -NAN;
  dirty[static_cast<size_t>(2 * K + 130)] = INFINITY;
  dirty[static_cast<size_t>(3 * K + 255)] = -INFINITY;
  // Make the non-finite element the largest of its tile: it must not set the scale.
  for (size_t i : {size_t{3}, size_t(1 * K + 7), size_t(2 * K + 130), size_t(3 * K + 255)})
    clean[i] = 0.f;
  HostTensor in_c = host_from_values(clean, DType::F32, M, K);
  HostTensor in_d = host_from_values(dirty, DType::F32, M, K);
  QHost qc(f().d, M, K), qd(f().d, M, K);
  quantize(in_c.v, qc.view());
  quantize(in_d.v, qd.view());
  EXPECT_EQ(qc.scale.buf, qd.scale.buf) << "a non-finite element changed a scale";
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) {
      const float xd = dirty[static_cast<size_t>(m * K + k)];
      if (std::isfinite(xd)) {
        ASSERT_EQ(qc.code(m, k), qd.code(m, k)) << m << "," << k;
        continue;
      }
      const uint8_t q = qd.code(m, k);
      const uint8_t sign = std::signbit(xd) ? 0x80 : 0x00;
      if (f().d == DType::E4M3 || std::isnan(xd))
        EXPECT_EQ(q, sign | 0x7F) << m << "," << k;
      else
        EXPECT_EQ(q, sign | 0x7C) << m << "," << k;
    }
  // Same for the column-wise copy.
  QHost tc(f().d, K, M), td(f().d, K, M);
  quantize_transposed(in_c.v, tc.view());
  quantize_transposed(in_d.v, td.view());
  EXPECT_EQ(tc.scale.buf, td.scale.buf);
  EXPECT_EQ(td.code(7, 1), 0xFF);  // -NaN
  EXPECT_EQ(td.code(130, 2), f().d == DType::E4M3 ? 0x7F : 0x7C);
  EXPECT_EQ(tc.code(0, 0), td.code(0, 0));
}

TEST_P(RefQuantize, DequantizeRoundTripWithinFormatError) {
  for (Fill fill : {Fill::Normal, Fill::WideRange}) {
    for (ScaleLayout layout : {ScaleLayout::Rowwise1x128, ScaleLayout::Block128x128}) {
      const int64_t M = 130, K = 272;
      HostTensor in = host_from_values(make_values(M, K, fill, 15), DType::F32, M, K);
      QHost q(f().d, M, K, layout);
      quantize(in.v, q.view());
      HostTensor out(DType::F32, M, K);
      dequantize(q.view(), out.v);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t k = 0; k < K; ++k) {
          const double x = in.ptr<float>()[m * K + k];
          const double y = out.ptr<float>()[m * K + k];
          const float s =
              layout == ScaleLayout::Block128x128 ? q.s(m / 128, k / 128) : q.s(k / 128, m);
          const double normal_min =
              std::ldexp(static_cast<double>(s), 1 - (f().d == DType::E4M3 ? 7 : 15));
          const double bound = std::fabs(x) >= normal_min
                                   ? std::ldexp(std::fabs(x), -(f().mant + 1))
                                   : std::ldexp(static_cast<double>(s), f().sub_step - 1);
          ASSERT_LE(std::fabs(y - x), bound) << "fill " << int(fill) << " at " << m << "," << k
                                             << " x=" << x << " y=" << y << " s=" << s;
        }
    }
  }
}

TEST_P(RefQuantize, TransposedEqualsRowwiseOfTranspose) {
  const int64_t M = 272, K = 144;  // M % 16 == 0 so that X^T is a valid quantize input
  for (Fill fill : {Fill::Normal, Fill::Adversarial}) {
    const std::vector<float> x = make_values(M, K, fill, 16);
    std::vector<float> xt(x.size());
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k)
        xt[static_cast<size_t>(k * M + m)] = x[static_cast<size_t>(m * K + k)];
    HostTensor in = host_from_values(x, DType::BF16, M, K);
    HostTensor in_t = host_from_values(xt, DType::BF16, K, M);
    QHost a(f().d, K, M), b(f().d, K, M);
    quantize_transposed(in.v, a.view());
    quantize(in_t.v, b.view());
    EXPECT_TRUE(bytes_equal(a.data, b.data));
    EXPECT_TRUE(bytes_equal(a.scale, b.scale));
  }
}

// Grouped column-wise copy == each group's slice quantized on its own, tiles numbered in order.
TEST_P(RefQuantize, GroupsRestartTiles) {
  const int64_t K = 32;
  for (const std::vector<int64_t>& groups : std::vector<std::vector<int64_t>>{
           {0, 128, 5, 300, 0, 77}, {1}, {0, 0, 129}, {256, 0}, {3, 3, 3}}) {
    int64_t M = 0;
    for (int64_t n : groups) M += n;
    const std::vector<float> x = make_values(M, K, Fill::WideRange, 17);
    HostTensor in = host_from_values(x, DType::F32, M, K);
    QHost q(f().d, K, M, ScaleLayout::Rowwise1x128, groups);
    quantize_transposed(in.v, q.view());
    ASSERT_EQ(q.scale.v.rows, rowwise_tiles(M, groups));
    int64_t m_start = 0, tile = 0;
    for (int64_t n : groups) {
      if (n > 0) {
        std::vector<float> xs(x.begin() + m_start * K, x.begin() + (m_start + n) * K);
        HostTensor slice = host_from_values(xs, DType::F32, n, K);
        QHost qs(f().d, K, n);
        quantize_transposed(slice.v, qs.view());
        for (int64_t k = 0; k < K; ++k)
          for (int64_t m = 0; m < n; ++m) ASSERT_EQ(q.code(k, m_start + m), qs.code(k, m));
        for (int64_t t = 0; t < qs.scale.v.rows; ++t)
          for (int64_t k = 0; k < K; ++k) ASSERT_EQ(q.s(tile + t, k), qs.s(t, k));
        tile += qs.scale.v.rows;
      }
      m_start += n;
    }
    EXPECT_EQ(tile, q.scale.v.rows);
  }
}

INSTANTIATE_TEST_SUITE_P(Fp8, RefQuantize, ::testing::Values(DType::E4M3, DType::E5M2),
                         [](const auto& p) { return std::string(to_string(p.param)); });

// ---------------------------------------------------------------------------------------------
TEST(RefDequantize, KnownValues) {
  // E4M3 0x38 = 1.0, 0xB9 = -1.125, 0x7F = NaN; E5M2 0x3C = 1.0.
  QHost q(DType::E4M3, 2, 16, ScaleLayout::Rowwise1x128, {3, 13});
  std::fill(q.data.buf.begin(), q.data.buf.end(), 0x38);
  q.data.buf[0] = 0xB9;
  q.data.buf[16 + 4] = 0x7F;
  float* s = q.scale.ptr<float>();  // [tiles = 2][rows = 2]
  s[0] = 0.5f;                      // tile 0 (cols 0-2), row 0
  s[1] = 2.f;                       // tile 0, row 1
  s[2] = 4.f;                       // tile 1 (cols 3-15), row 0
  s[3] = 0.25f;                     // tile 1, row 1
  HostTensor out(DType::F32, 2, 16);
  dequantize(q.view(), out.v);
  const float* o = out.ptr<float>();
  EXPECT_EQ(o[0], -0.5625f);
  EXPECT_EQ(o[2], 0.5f);
  EXPECT_EQ(o[3], 4.f);
  EXPECT_EQ(o[16 + 2], 2.f);
  EXPECT_TRUE(std::isnan(o[16 + 4]));
  EXPECT_EQ(o[16 + 15], 0.25f);
}

TEST(RefDequantize, Mxfp4KnownValues) {
  QHost q(DType::E2M1x2, 1, 64, ScaleLayout::Mx1x32);
  // Block 0: elements 0,1 = 0.5, 6 (byte 0x71); others -6 (0xF each nibble). Scale 2^1.
  std::fill(q.data.buf.begin(), q.data.buf.begin() + 32, 0xFF);
  q.data.buf[0] = 0x71;
  q.scale.buf[0] = 128;   // 2^1
  q.scale.buf[1] = 0xFF;  // NaN block
  HostTensor out(DType::BF16, 1, 64);
  dequantize(q.view(), out.v);
  const uint16_t* o = out.ptr<uint16_t>();
  EXPECT_EQ(fmt::bf16_to_f32(o[0]), 1.f);
  EXPECT_EQ(fmt::bf16_to_f32(o[1]), 12.f);
  EXPECT_EQ(fmt::bf16_to_f32(o[2]), -12.f);
  EXPECT_TRUE(std::isnan(fmt::bf16_to_f32(o[40])));
}

}  // namespace
}  // namespace fp8flow::test
