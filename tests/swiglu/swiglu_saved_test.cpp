// SwiGLU with the saved FP8 input (the fp8-flow recipes' cached SwiGLU input), CPU reference
// backend: the forward's E4M3 copy of h equals quantize()'s bytes (adversarial values included),
// the forward's own output is unchanged by the extra output, the backward from the saved copy
// equals an independent computation on dequantize()'s values of that copy (bit for bit, written
// here from the formulas of swiglu.h), its error against FP64 on the exact h, padding rows, the
// unweighted variant, and every bad argument of the two new overloads.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <string>

#include "common/hd_math.h"
#include "swiglu/swiglu_cases.h"

namespace fp8flow {
namespace {

struct Shape {
  int64_t M, F;
};
// F = 128 (one gate and one up tile), F % 256 == 128, the DeepSeek-V3 F; M one row, primes, not a
// multiple of 8 (the backward's rows per block) nor of 32 (the forward's items per block).
const Shape kShapes[] = {{1, 128}, {3, 128}, {37, 384}, {101, 256}, {13, 2048}, {64, 2048}};

// The saved copy of `in` written by the forward, and the forward's FP8 output.
struct Saved {
  SwigluHostScaled out, in_q;
  Saved(const SwigluCase& c, DType out_kind, bool weighted = true)
      : out(out_kind, c.M, c.F), in_q(DType::E4M3, c.M, 2 * c.F) {
    swiglu(c.in.v, weighted ? c.prob.v : TensorView{}, out.view(), in_q.view(),
           SwigluOptions{weighted});
  }
};

SwigluCase make_adversarial_case(int64_t M, int64_t F, uint64_t seed) {
  SwigluCase c = test::make_case(M, F, Fill::Adversarial, seed);
  test::add_bf16_specials(c);
  return c;
}

// ------------------------------------------------------------------------------------------------
// Forward.

// The saved copy is quantize(in) byte for byte (codes and scales), and the FP8 output is the one
// the plain overload writes.
TEST(SwigluSavedRef, InputCopyEqualsQuantize) {
  uint64_t seed = 10;
  for (const Shape& s : kShapes)
    for (Fill f : {Fill::Normal, Fill::WideRange, Fill::Adversarial})
      for (DType d : {DType::E4M3, DType::E5M2}) {
        SCOPED_TRACE(testing::Message() << "M " << s.M << " F " << s.F << " fill " << int(f)
                                        << " out " << to_string(d));
        const SwigluCase c = f == Fill::Adversarial ? make_adversarial_case(s.M, s.F, ++seed)
                                                    : test::make_case(s.M, s.F, f, ++seed);
        const Saved saved(c, d);
        SwigluHostScaled want(DType::E4M3, c.M, 2 * c.F), out(d, c.M, c.F);
        quantize(c.in.v, want.view());
        swiglu(c.in.v, c.prob.v, out.view());
        EXPECT_TRUE(test::bytes_equal(saved.in_q.data, want.data)) << "codes";
        EXPECT_TRUE(test::bytes_equal(saved.in_q.scale, want.scale)) << "scales";
        EXPECT_TRUE(test::bytes_equal(saved.out.data, out.data)) << "out codes";
        EXPECT_TRUE(test::bytes_equal(saved.out.scale, out.scale)) << "out scales";
      }
}

// The specials really are in the data and keep their signs: a negative NaN or -Inf gives 0xFF
// (the plain SwiGLU output writes NaN results as 0x7F), the all-tiny row gets scale 2^-127 with
// nonzero codes, and the largest BF16 values stay finite codes (no overflow in the scale rule).
TEST(SwigluSavedRef, InputCopyKeepsSignsOfNonFinite) {
  const SwigluCase c = make_adversarial_case(40, 256, 5);
  const Saved saved(c, DType::E4M3);
  int neg_nan = 0, pos_nan = 0, huge = 0;
  for (int64_t m = 0; m < c.M; ++m)
    for (int64_t j = 0; j < 2 * c.F; ++j) {
      const uint16_t h = test::u16_at(c.in, m, j);
      const uint8_t q = test::u8_at(saved.in_q.data, m, j);
      if ((h & 0x7F80) == 0x7F80) {  // NaN or Inf
        EXPECT_EQ(q, (h & 0x8000) ? 0xFF : 0x7F) << m << " " << j << " 0x" << std::hex << h;
        ((h & 0x8000) ? neg_nan : pos_nan)++;
      } else if ((h & 0x7FFF) == 0x7F7F) {
        // The tile's amax: 0x1.FEp127 at scale 2^120 (significand 1.99 > 1.75) is 255 -> 256.
        EXPECT_EQ(q & 0x7F, 0x78) << m << " " << j;
        ++huge;
      }
    }
  EXPECT_GT(neg_nan, 10);
  EXPECT_GT(pos_nan, 10);
  EXPECT_GT(huge, 2);
  int nonzero = 0;
  for (int64_t t = 0; t < 2 * c.F / 128; ++t)
    EXPECT_EQ(test::f32_at(saved.in_q.scale, t * c.M + 2), std::ldexp(1.f, -127)) << t;
  for (int64_t j = 0; j < 2 * c.F; ++j) nonzero += test::u8_at(saved.in_q.data, 2, j) != 0;
  EXPECT_GT(nonzero, 100);
}

TEST(SwigluSavedRef, PaddingRowsSaveZeros) {
  const SwigluCase c = test::make_case(23, 384, Fill::Normal, 8);
  const Saved saved(c, DType::E4M3);
  HostTensor dprob(DType::F32, c.M, 1);
  SwigluHostScaled din(DType::E4M3, c.M, 2 * c.F);
  swiglu_backward(c.dy.v, saved.in_q.view(), c.prob.v, din.view(), dprob.v);
  int pads = 0;
  for (int64_t m = 0; m < c.M; ++m) {
    if (!test::is_pad_row(m)) continue;
    ++pads;
    for (int64_t j = 0; j < 2 * c.F; ++j) {
      EXPECT_EQ(test::u8_at(saved.in_q.data, m, j), 0) << m << " " << j;
      EXPECT_EQ(test::u8_at(din.data, m, j), 0) << m << " " << j;
    }
    for (int64_t t = 0; t < 2 * c.F / 128; ++t) {
      EXPECT_EQ(test::f32_at(saved.in_q.scale, t * c.M + m), std::ldexp(1.f, -127));
      EXPECT_EQ(test::f32_at(din.scale, t * c.M + m), std::ldexp(1.f, -127));
    }
    EXPECT_EQ(fmt::f32_bits(test::f32_at(dprob, m)), 0u) << m;
  }
  EXPECT_EQ(pads, 4);
}

// ------------------------------------------------------------------------------------------------
// Backward from the saved copy.

// The documented backward of one element (swiglu.h), spelled out with hd:: here.
struct Grad {
  float da, db, dp;
};
Grad grad_hd(float dy, float a, float b, float p) {
  const float s = hd::sigmoid(a);
  const float silu = hd::mul(a, s);
  const float dsilu = hd::mul(s, hd::add(1.0f, hd::mul(a, hd::sub(1.0f, s))));
  const float dya = hd::mul(dy, p);
  return {hd::mul(hd::mul(dya, b), dsilu), hd::mul(dya, silu), hd::mul(hd::mul(dy, silu), b)};
}

// Row r's values y [0, n) quantized per 1x128 tile with the library's rule (NaN results -> 0x7F),
// compared with columns [col0, col0 + n) of `got`.
void expect_quantized_row(const std::vector<float>& y, const SwigluHostScaled& got, int64_t r,
                          int64_t col0) {
  const int64_t M = got.data.v.rows;
  for (size_t t0 = 0; t0 < y.size(); t0 += 128) {
    float amax = 0.f;
    for (size_t k = t0; k < t0 + 128; ++k)
      if (std::isfinite(y[k])) amax = std::max(amax, std::fabs(y[k]));
    const int e = fmt::scale_exponent(amax);
    const int64_t tile = (col0 + int64_t(t0)) / 128;
    ASSERT_EQ(test::f32_at(got.scale, tile * M + r), std::ldexp(1.f, e)) << r << " tile " << tile;
    for (size_t k = t0; k < t0 + 128; ++k) {
      const uint8_t want = std::isnan(y[k]) ? 0x7F : fmt::e4m3_from_f32(fmt::mul_pow2(y[k], -e));
      ASSERT_EQ(test::u8_at(got.data, r, col0 + int64_t(k)), want)
          << r << " col " << col0 + int64_t(k) << " y " << y[k];
    }
  }
}

// din and dprob of the backward from the saved copy equal the documented formulas evaluated on
// dequantize(in_q) (the library's decoding, F32), bit for bit.
void check_backward_saved(const SwigluCase& c, bool weighted) {
  const Saved saved(c, DType::E4M3, weighted);
  HostTensor h(DType::F32, c.M, 2 * c.F), dprob(DType::F32, c.M, 1);
  dequantize(saved.in_q.view(), h.v);
  SwigluHostScaled din(DType::E4M3, c.M, 2 * c.F);
  swiglu_backward(c.dy.v, saved.in_q.view(), weighted ? c.prob.v : TensorView{}, din.view(),
                  weighted ? dprob.v : TensorView{}, SwigluOptions{weighted});
  std::vector<float> da(c.F), db(c.F), dp(c.F);
  for (int64_t m = 0; m < c.M; ++m) {
    const float p = weighted ? test::f32_at(c.prob, m) : 1.f;
    for (int64_t j = 0; j < c.F; ++j) {
      const Grad g = grad_hd(test::bf16_at(c.dy, m, j), h.ptr<float>()[m * 2 * c.F + j],
                             h.ptr<float>()[m * 2 * c.F + c.F + j], p);
      da[j] = g.da;
      db[j] = g.db;
      dp[j] = g.dp;
    }
    expect_quantized_row(da, din, m, 0);
    expect_quantized_row(db, din, m, c.F);
    if (!weighted) continue;
    float part[32] = {};
    for (int64_t j = 0; j < c.F; ++j) part[(j / 8) % 32] = hd::add(part[(j / 8) % 32], dp[j]);
    for (int d = 16; d >= 1; d /= 2)
      for (int l = 0; l < d; ++l) part[l] = hd::add(part[l], part[l + d]);
    const uint32_t want = std::isnan(part[0]) ? 0x7FC00000u : fmt::f32_bits(part[0]);
    ASSERT_EQ(fmt::f32_bits(test::f32_at(dprob, m)), want) << "dprob row " << m;
  }
}

TEST(SwigluSavedRef, BackwardIsFormulaOnDequantizedCopy) {
  uint64_t seed = 40;
  for (const Shape& s : kShapes)
    for (Fill f : {Fill::Normal, Fill::WideRange, Fill::Adversarial})
      for (bool weighted : {true, false}) {
        SCOPED_TRACE(testing::Message()
                     << "M " << s.M << " F " << s.F << " fill " << int(f) << " w " << weighted);
        check_backward_saved(f == Fill::Adversarial ? make_adversarial_case(s.M, s.F, ++seed)
                                                    : test::make_case(s.M, s.F, f, ++seed),
                             weighted);
      }
}

// Where the dequantized copy is BF16-representable (normal ranges), the backward from the saved
// copy is the BF16 backward on those values, bit for bit, E4M3 and E5M2 out: the decoding is the
// only difference between the two overloads.
TEST(SwigluSavedRef, BackwardEqualsBf16BackwardOnDequantizedValues) {
  uint64_t seed = 70;
  for (const Shape& s : kShapes)
    for (DType d : {DType::E4M3, DType::E5M2}) {
      SCOPED_TRACE(testing::Message() << "M " << s.M << " F " << s.F << " " << to_string(d));
      const SwigluCase c = test::make_case(s.M, s.F, Fill::Normal, ++seed);
      const Saved saved(c, DType::E4M3);
      HostTensor h16(DType::BF16, c.M, 2 * c.F), h32(DType::F32, c.M, 2 * c.F);
      dequantize(saved.in_q.view(), h16.v);
      dequantize(saved.in_q.view(), h32.v);
      for (int64_t i = 0; i < c.M * 2 * c.F; ++i)
        ASSERT_EQ(fmt::bf16_to_f32(h16.ptr<uint16_t>()[i]), h32.ptr<float>()[i]) << i;
      SwigluHostScaled a(d, c.M, 2 * c.F), b(d, c.M, 2 * c.F);
      HostTensor pa(DType::F32, c.M, 1), pb(DType::F32, c.M, 1);
      swiglu_backward(c.dy.v, saved.in_q.view(), c.prob.v, a.view(), pa.v);
      swiglu_backward(c.dy.v, h16.v, c.prob.v, b.view(), pb.v);
      EXPECT_TRUE(test::bytes_equal(a.data, b.data));
      EXPECT_TRUE(test::bytes_equal(a.scale, b.scale));
      EXPECT_TRUE(test::bytes_equal(pa, pb));
    }
}

// What saving h as E4M3 costs the backward: da, db (dequantized E4M3 outputs) against FP64 on the
// exact BF16 h, relative L2 over each problem. E4M3 rounding of an input or output is ~2.4% RMS
// relative (uniform within +-2^-4); input rounding of a and b plus output rounding stays under 6%
// (measured 3.8-3.9%); the same check with the BF16 h stays under 3.5% (output rounding only;
// measured 2.6-2.8%).
TEST(SwigluSavedRef, BackwardErrorVsFp64OnExactInput) {
  uint64_t seed = 90;
  for (const Shape& s : {Shape{64, 2048}, Shape{37, 384}}) {
    const SwigluCase c = test::make_case(s.M, s.F, Fill::Normal, ++seed);
    const Saved saved(c, DType::E4M3);
    SwigluHostScaled d8(DType::E4M3, c.M, 2 * c.F), d16(DType::E4M3, c.M, 2 * c.F);
    HostTensor dprob(DType::F32, c.M, 1);
    swiglu_backward(c.dy.v, saved.in_q.view(), c.prob.v, d8.view(), dprob.v);
    swiglu_backward(c.dy.v, c.in.v, c.prob.v, d16.view(), dprob.v);
    HostTensor g8(DType::F32, c.M, 2 * c.F), g16(DType::F32, c.M, 2 * c.F);
    dequantize(d8.view(), g8.v);
    dequantize(d16.view(), g16.v);
    double e8 = 0, e16 = 0, den = 0;
    for (int64_t m = 0; m < c.M; ++m) {
      const double p = test::f32_at(c.prob, m);
      for (int64_t j = 0; j < c.F; ++j) {
        const double dy = test::bf16_at(c.dy, m, j), a = test::bf16_at(c.in, m, j),
                     b = test::bf16_at(c.in, m, c.F + j);
        const double sg = 1.0 / (1.0 + std::exp(-a));
        const double want[2] = {dy * p * b * sg * (1.0 + a * (1.0 - sg)), dy * p * a * sg};
        for (int k = 0; k < 2; ++k) {
          const int64_t i = m * 2 * c.F + k * c.F + j;
          e8 += std::pow(g8.ptr<float>()[i] - want[k], 2);
          e16 += std::pow(g16.ptr<float>()[i] - want[k], 2);
          den += want[k] * want[k];
        }
      }
    }
    e8 = std::sqrt(e8 / den);
    e16 = std::sqrt(e16 / den);
    std::printf("[ swiglu ] M %lld F %lld: din rel L2 vs FP64, saved E4M3 h %.3e, BF16 h %.3e\n",
                static_cast<long long>(c.M), static_cast<long long>(c.F), e8, e16);
    EXPECT_LT(e8, 0.06);
    EXPECT_LT(e16, 0.035);
    EXPECT_GT(e8, e16);  // the input rounding shows
  }
}

TEST(SwigluSavedRef, EmptyRows) {
  const SwigluCase c = test::make_case(0, 256, Fill::Normal, 1);
  SwigluHostScaled out(DType::E4M3, 0, 256), in_q(DType::E4M3, 0, 512), din(DType::E4M3, 0, 512);
  HostTensor dprob(DType::F32, 0, 1);
  swiglu(c.in.v, c.prob.v, out.view(), in_q.view());
  swiglu_backward(c.dy.v, in_q.view(), c.prob.v, din.view(), dprob.v);
}

// ------------------------------------------------------------------------------------------------
// Bad arguments: each names the op and the argument.

using test::expect_error;

struct SwigluSavedBadArgs : testing::Test {
  static constexpr int64_t M = 4, F = 256;
  SwigluCase c = test::make_case(M, F, Fill::Normal, 71);
  SwigluHostScaled out{DType::E4M3, M, F}, in_q{DType::E4M3, M, 2 * F}, din{DType::E4M3, M, 2 * F};
  HostTensor dprob{DType::F32, M, 1};
  void fwd(const ScaledTensor& q) { swiglu(c.in.v, c.prob.v, out.view(), q); }
  void bwd(const ScaledTensor& in) { swiglu_backward(c.dy.v, in, c.prob.v, din.view(), dprob.v); }
};

TEST_F(SwigluSavedBadArgs, ForwardInQ) {
  const std::string op = "swiglu";
  ScaledTensor q = in_q.view();
  q.data.dtype = DType::E5M2;
  expect_error([&] { fwd(q); }, op, "in_q.data", "dtype E4M3");
  q = in_q.view();
  q.data.cols = F;
  q.scale.rows = F / 128;
  expect_error([&] { fwd(q); }, op, "in_q.data", "shape [4, 512]");
  q = in_q.view();
  q.scale.rows = 2;
  expect_error([&] { fwd(q); }, op, "in_q.scale", "shape [4, 4]");
  q = in_q.view();
  q.scale.dtype = DType::BF16;
  expect_error([&] { fwd(q); }, op, "in_q.scale", "dtype F32");
  q = in_q.view();
  q.layout = ScaleLayout::Block128x128;
  expect_error([&] { fwd(q); }, op, "in_q.layout", "Rowwise1x128");
  q = in_q.view();
  const int64_t groups[] = {256, 256};
  q.col_groups = groups;
  expect_error([&] { fwd(q); }, op, "in_q.col_groups", "empty");
  q = in_q.view();
  q.data.data = nullptr;
  expect_error([&] { fwd(q); }, op, "in_q.data", "non-null");
  q = in_q.view();
  q.data.ld = 2 * F + 16;
  expect_error([&] { fwd(q); }, op, "in_q.data", "contiguous");
  q = in_q.view();
  q.data.device = q.scale.device = Device::Cuda;
  expect_error([&] { fwd(q); }, op, "in_q.data", "device Cpu");
  // The other arguments are still checked first.
  TensorView in = c.in.v;
  in.dtype = DType::F32;
  expect_error([&] { swiglu(in, c.prob.v, out.view(), in_q.view()); }, op, "in", "dtype BF16");
  ScaledTensor o = out.view();
  o.data.cols = 2 * F;
  o.scale.rows = 2 * F / 128;
  expect_error([&] { swiglu(c.in.v, c.prob.v, o, in_q.view()); }, op, "out.data", "shape [4, 256]");
  expect_error([&] { swiglu(c.in.v, {}, out.view(), in_q.view()); }, op, "prob", "shape");
}

TEST_F(SwigluSavedBadArgs, BackwardIn) {
  const std::string op = "swiglu_backward";
  swiglu(c.in.v, c.prob.v, out.view(), in_q.view());
  ScaledTensor q = in_q.view();
  q.data.dtype = DType::E5M2;
  expect_error([&] { bwd(q); }, op, "in.data", "dtype E4M3");
  q = in_q.view();
  q.data.cols = 2 * 192;
  q.scale.rows = 3;
  expect_error([&] { bwd(q); }, op, "in.data", "F a multiple of 128");
  q = in_q.view();
  q.scale.cols = M + 1;
  expect_error([&] { bwd(q); }, op, "in.scale", "shape [4, 4]");
  q = in_q.view();
  q.layout = ScaleLayout::Mx1x32;
  expect_error([&] { bwd(q); }, op, "in.layout", "Rowwise1x128");
  q = in_q.view();
  const int64_t groups[] = {512};
  q.col_groups = groups;
  expect_error([&] { bwd(q); }, op, "in.col_groups", "empty");
  q = in_q.view();
  q.data.data = nullptr;
  expect_error([&] { bwd(q); }, op, "in.data", "non-null");
  q = in_q.view();
  q.data.rows = M + 1;
  q.scale.cols = M + 1;
  expect_error([&] { bwd(q); }, op, "dy", "shape [5, 256]");
  TensorView dy = c.dy.v;
  dy.dtype = DType::F32;
  expect_error([&] { swiglu_backward(dy, in_q.view(), c.prob.v, din.view(), dprob.v); }, op, "dy",
               "dtype BF16");
  ScaledTensor d = din.view();
  d.data.cols = F;
  d.scale.rows = F / 128;
  expect_error([&] { swiglu_backward(c.dy.v, in_q.view(), c.prob.v, d, dprob.v); }, op, "din.data",
               "shape [4, 512]");
  expect_error([&] { swiglu_backward(c.dy.v, in_q.view(), c.prob.v, din.view(), {}); }, op, "dprob",
               "shape");
  expect_error(
      [&] { swiglu_backward(c.dy.v, in_q.view(), {}, din.view(), dprob.v, SwigluOptions{false}); },
      op, "dprob", "empty view");
  TensorView cuda_prob = c.prob.v;
  cuda_prob.device = Device::Cuda;
  expect_error([&] { swiglu_backward(c.dy.v, in_q.view(), cuda_prob, din.view(), dprob.v); }, op,
               "prob", "device Cpu");
}

}  // namespace
}  // namespace fp8flow
