// SwiGLU ops, CPU reference backend: against an FP64 evaluation of the same formulas (error bounds
// stated per test), the BF16 backward against finite differences of the FP64 forward, padding rows,
// NaN/Inf handling, the documented dprob order, the unweighted variant, and every bad argument.
#include <gtest/gtest.h>

#include <cfloat>
#include <cmath>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "ops/swiglu/kernels/fast_div.h"
#include "ops/swiglu/swiglu_math.h"
#include "swiglu/swiglu_cases.h"

namespace fp8flow {
namespace {

double silu64(double a) {
  return a / (1.0 + std::exp(-a));
}
double dsilu64(double a) {
  const double s = 1.0 / (1.0 + std::exp(-a));
  return s * (1.0 + a * (1.0 - s));
}

// Error bound of one quantized element against its FP64 value v (inputs are the exact BF16/F32
// inputs): the FP32 math is within `delta` relative of v, plus `delta_abs` absolute (cancellation
// in dsilu near its zero); rounding to the format adds half an ulp: 2^-(mbits+1) relative in the
// normal range, half the smallest subnormal times the tile scale below it.
struct Bound {
  double rel;      // 2^-(mbits+1)
  double sub_abs;  // half the smallest subnormal (unscaled)
};
constexpr Bound kE4M3{0.0625, 0x1p-10};
constexpr Bound kE5M2{0.125, 0x1p-17};
constexpr Bound kBF16{0x1p-8, 0x1p-134};
constexpr double kDelta = 2e-6;

double allowed(const Bound& b, double v, double scale, double delta_abs = 0.0) {
  return std::max(b.rel * std::fabs(v) * (1 + kDelta), b.sub_abs * scale) + kDelta * std::fabs(v) +
         delta_abs;
}

// sigmoid(a) = 1 / (1 + exp(-a)) leaves FP32's normal range for a < -87 (exp(-a) > 2^126, and
// exp overflows to Inf past 88.7, where sigmoid becomes 0): there the FP32 result only promises
// to lie between 0 and the exact value. Slack for that, by the gate value a.
double underflow_slack(float a, double v) {
  return a < -80.f ? std::fabs(v) : 0.0;
}

bool finite3(float a, float b, float c) {
  return std::isfinite(a) && std::isfinite(b) && std::isfinite(c);
}

float prob_of(const SwigluCase& c, int64_t m) {
  return test::f32_at(c.prob, m);
}

// Dequantized element (r, col) of a Rowwise1x128 FP8 output.
double deq(const SwigluHostScaled& o, DType d, int64_t r, int64_t col) {
  const uint8_t q = test::u8_at(o.data, r, col);
  const double s = test::f32_at(o.scale, (col / 128) * o.data.v.rows + r);
  return (d == DType::E4M3 ? double(fmt::e4m3_to_f32(q)) : double(fmt::e5m2_to_f32(q))) * s;
}
double scale_of(const SwigluHostScaled& o, int64_t r, int64_t col) {
  return test::f32_at(o.scale, (col / 128) * o.data.v.rows + r);
}

// Every scale a finite power of two in [2^-127, 2^127].
void expect_scales_pow2(const SwigluHostScaled& o) {
  const int64_t n = o.scale.v.rows * o.scale.v.cols;
  for (int64_t i = 0; i < n; ++i) {
    const float s = test::f32_at(o.scale, i);
    ASSERT_TRUE(std::isfinite(s) && s > 0) << i << ": " << s;
    int e;
    ASSERT_EQ(std::frexp(s, &e), 0.5f) << i << ": " << s;
  }
}

struct Shape {
  int64_t M, F;
};
// (M, F): F % 256 == 128 (upper half-warp idle on the last chunk) and == 0, one row, one tile.
const Shape kShapes[] = {{1, 128}, {3, 128}, {3, 256}, {300, 512}, {37, 384}, {64, 2048}};

// ------------------------------------------------------------------------------------------------
// Forward against FP64.

void check_forward_fp8(const SwigluCase& c, DType d) {
  SwigluHostScaled out(d, c.M, c.F);
  swiglu(c.in.v, c.prob.v, out.view());
  expect_scales_pow2(out);
  const Bound b = d == DType::E4M3 ? kE4M3 : kE5M2;
  int64_t checked = 0;
  for (int64_t m = 0; m < c.M; ++m) {
    const float p = prob_of(c, m);
    for (int64_t j = 0; j < c.F; ++j) {
      const float a = test::bf16_at(c.in, m, j), bb = test::bf16_at(c.in, m, c.F + j);
      if (!finite3(a, bb, p)) continue;
      const double v = silu64(a) * bb * p;
      const double got = deq(out, d, m, j);
      ASSERT_LE(std::fabs(got - v), allowed(b, v, scale_of(out, m, j), underflow_slack(a, v)))
          << "m " << m << " j " << j << " a " << a << " b " << bb << " p " << p << " got " << got
          << " want " << v << " scale " << scale_of(out, m, j);
      ++checked;
    }
  }
  EXPECT_GT(checked, 0);
}

// The kernels' branch-free tile scale (swiglu_detail::scale_pair, the saved-h backward's
// default kNext backward) equals fmt::exp2i(+-scale_exponent) for every amax they can
// produce: all 2^31 - 2^23 finite non-negative FP32 bit patterns (0, subnormals, every value
// around each 1.75 * 2^k threshold, the clamp ends), both FP8 kinds. Exhaustive, on 8 threads.
using swiglu_detail::OutKind;

template <OutKind K>
void expect_scale_pair_exhaustive() {
  constexpr uint32_t kEnd = 0x7F800000u;  // +Inf: the sweep is [0, kEnd)
  constexpr int kThreads = 8;
  std::vector<uint64_t> bad(kThreads, 0);
  std::vector<uint32_t> example(kThreads, 0);
  std::vector<std::thread> pool;
  for (int t = 0; t < kThreads; ++t)
    pool.emplace_back([&, t] {
      const uint32_t lo = static_cast<uint32_t>(uint64_t{kEnd} * t / kThreads);
      const uint32_t hi = static_cast<uint32_t>(uint64_t{kEnd} * (t + 1) / kThreads);
      uint64_t n = 0;
      for (uint32_t u = lo; u < hi; ++u) {
        const float amax = fmt::f32_from_bits(u);
        const int e = swiglu_detail::scale_exponent<K>(amax);
        const swiglu_detail::ScalePair sp = swiglu_detail::scale_pair<K>(amax);
        if (fmt::f32_bits(sp.scale) != fmt::f32_bits(fmt::exp2i(e)) ||
            fmt::f32_bits(sp.inv) != fmt::f32_bits(fmt::exp2i(-e))) {
          ++n;
          example[t] = u;
        }
      }
      bad[t] = n;
    });
  for (std::thread& th : pool) th.join();
  for (int t = 0; t < kThreads; ++t)
    EXPECT_EQ(bad[t], 0u) << "amax bits e.g. 0x" << std::hex << example[t];
}

TEST(SwigluRef, ScalePairEqualsExp2iExhaustive) {
  expect_scale_pair_exhaustive<OutKind::E4M3>();
  expect_scale_pair_exhaustive<OutKind::E5M2>();
  // The edges by name: zero, the largest subnormal, 2^-126, the E4M3 threshold 1.75 * 2^-119 and
  // the next float (e = -127 and -126 after the clamp), 448 and its successor, FLT_MAX.
  using swiglu_detail::scale_pair;
  EXPECT_EQ(fmt::f32_bits(scale_pair<OutKind::E4M3>(0.0f).scale), 0x00400000u);
  EXPECT_EQ(fmt::f32_bits(scale_pair<OutKind::E4M3>(0.0f).inv), 0x7F000000u);
  EXPECT_EQ(scale_pair<OutKind::E4M3>(fmt::f32_from_bits(0x007FFFFFu)).scale, 0x1p-127f);
  EXPECT_EQ(scale_pair<OutKind::E4M3>(0x1p-126f).scale, 0x1p-127f);
  EXPECT_EQ(scale_pair<OutKind::E4M3>(0x1.cp-119f).scale, 0x1p-127f);
  EXPECT_EQ(scale_pair<OutKind::E4M3>(std::nextafter(0x1.cp-119f, 1.0f)).scale, 0x1p-126f);
  EXPECT_EQ(scale_pair<OutKind::E4M3>(448.0f).scale, 1.0f);
  EXPECT_EQ(scale_pair<OutKind::E4M3>(std::nextafter(448.0f, 1e9f)).scale, 2.0f);
  EXPECT_EQ(scale_pair<OutKind::E4M3>(FLT_MAX).scale, 0x1p120f);
  EXPECT_EQ(scale_pair<OutKind::E4M3>(FLT_MAX).inv, 0x1p-120f);
  EXPECT_EQ(scale_pair<OutKind::E5M2>(FLT_MAX).scale, 0x1p113f);
}

TEST(SwigluRef, ForwardFp8WithinHalfUlpOfFp64) {
  uint64_t seed = 1;
  for (const Shape& s : kShapes)
    for (Fill f : {Fill::Normal, Fill::WideRange})
      for (DType d : {DType::E4M3, DType::E5M2}) {
        SCOPED_TRACE(testing::Message() << "M " << s.M << " F " << s.F << " fill " << int(f)
                                        << " dtype " << to_string(d));
        check_forward_fp8(test::make_case(s.M, s.F, f, ++seed), d);
      }
}

TEST(SwigluRef, ForwardBf16WithinHalfUlpOfFp64) {
  uint64_t seed = 100;
  for (const Shape& s : kShapes)
    for (Fill f : {Fill::Normal, Fill::WideRange}) {
      SCOPED_TRACE(testing::Message() << "M " << s.M << " F " << s.F << " fill " << int(f));
      const SwigluCase c = test::make_case(s.M, s.F, f, ++seed);
      HostTensor out(DType::BF16, c.M, c.F);
      swiglu(c.in.v, c.prob.v, out.v);
      for (int64_t m = 0; m < c.M; ++m)
        for (int64_t j = 0; j < c.F; ++j) {
          const float a = test::bf16_at(c.in, m, j), b = test::bf16_at(c.in, m, c.F + j);
          const double v = silu64(a) * b * prob_of(c, m);
          ASSERT_LE(std::fabs(test::bf16_at(out, m, j) - v),
                    allowed(kBF16, v, 1.0, underflow_slack(a, v)))
              << m << " " << j << " a " << a << " b " << b;
        }
    }
}

// The forward computes exactly y = (silu(a) * b) * p with hd:: in that order, then the standard
// scale rule: checked on the bits against an independent per-tile quantization of those values.
TEST(SwigluRef, ForwardFp8IsQuantizeOfFormula) {
  const SwigluCase c = test::make_case(7, 384, Fill::Normal, 3);
  SwigluHostScaled out(DType::E4M3, c.M, c.F);
  swiglu(c.in.v, c.prob.v, out.view());
  for (int64_t m = 0; m < c.M; ++m)
    for (int64_t t = 0; t < c.F / 128; ++t) {
      float y[128], amax = 0.f;
      for (int k = 0; k < 128; ++k) {
        const int64_t j = t * 128 + k;
        y[k] =
            hd::mul(hd::mul(hd::silu(test::bf16_at(c.in, m, j)), test::bf16_at(c.in, m, c.F + j)),
                    prob_of(c, m));
        amax = std::max(amax, std::fabs(y[k]));
      }
      const int e = fmt::scale_exponent(amax);
      ASSERT_EQ(scale_of(out, m, t * 128), std::ldexp(1.0, e));
      for (int k = 0; k < 128; ++k)
        ASSERT_EQ(test::u8_at(out.data, m, t * 128 + k), fmt::e4m3_from_f32(std::ldexp(y[k], -e)))
            << m << " " << t << " " << k;
    }
}

// The FP32 operation order is part of the definition (GPU == CPU relies on it), but random data
// rarely shows it after rounding to 8 or 4 significant bits. Search inputs where the documented
// order and a re-association give different BF16 results, and check the op follows the former.
struct OrderHit {
  float dy, a, b, p;
};
template <typename Want, typename Alt>
std::vector<OrderHit> order_sensitive_inputs(Want want, Alt alt, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.f, 2.f);
  std::uniform_real_distribution<float> u(0.f, 1.f);
  auto bf = [](float x) { return fmt::bf16_to_f32(fmt::bf16_from_f32(x)); };
  std::vector<OrderHit> hits;
  for (int i = 0; i < 4000000 && hits.size() < 6; ++i) {
    const OrderHit h{bf(nd(rng)), bf(nd(rng)), bf(nd(rng)), u(rng)};
    if (fmt::bf16_from_f32(want(h)) != fmt::bf16_from_f32(alt(h))) hits.push_back(h);
  }
  return hits;
}

TEST(SwigluRef, OperationOrderIsPinned) {
  auto run = [](const std::vector<OrderHit>& hits, int which, auto want) {
    ASSERT_GE(hits.size(), 2u) << "no order-sensitive inputs found";
    const int64_t M = static_cast<int64_t>(hits.size()), F = 128;
    HostTensor in =
        test::host_from_values(std::vector<float>(M * 2 * F, 0.f), DType::BF16, M, 2 * F);
    HostTensor dy = test::host_from_values(std::vector<float>(M * F, 0.f), DType::BF16, M, F);
    HostTensor prob(DType::F32, M, 1);
    for (int64_t m = 0; m < M; ++m) {
      in.ptr<uint16_t>()[m * 2 * F] = fmt::bf16_from_f32(hits[m].a);
      in.ptr<uint16_t>()[m * 2 * F + F] = fmt::bf16_from_f32(hits[m].b);
      dy.ptr<uint16_t>()[m * F] = fmt::bf16_from_f32(hits[m].dy);
      prob.ptr<float>()[m] = hits[m].p;
    }
    HostTensor out(DType::BF16, M, which == 0 ? F : 2 * F), dprob(DType::F32, M, 1);
    if (which == 0)
      swiglu(in.v, prob.v, out.v);
    else
      swiglu_backward(dy.v, in.v, prob.v, out.v, dprob.v);
    const int64_t col = which == 2 ? F : 0;
    for (int64_t m = 0; m < M; ++m)
      EXPECT_EQ(test::u16_at(out, m, col), fmt::bf16_from_f32(want(hits[m]))) << which << " " << m;
  };
  auto y = [](const OrderHit& h) { return hd::mul(hd::mul(hd::silu(h.a), h.b), h.p); };
  auto y_alt = [](const OrderHit& h) { return hd::mul(hd::silu(h.a), hd::mul(h.b, h.p)); };
  run(order_sensitive_inputs(y, y_alt, 1), 0, y);
  // The documented backward (swiglu.h), spelled out here independently of swiglu_math.h.
  auto dsilu = [](float a) {
    const float s = hd::sigmoid(a);
    return hd::mul(s, hd::add(1.0f, hd::mul(a, hd::sub(1.0f, s))));
  };
  auto da = [&](const OrderHit& h) {
    return hd::mul(hd::mul(hd::mul(h.dy, h.p), h.b), dsilu(h.a));
  };
  auto da_alt = [&](const OrderHit& h) {
    return hd::mul(hd::mul(h.dy, h.p), hd::mul(h.b, dsilu(h.a)));
  };
  run(order_sensitive_inputs(da, da_alt, 2), 1, da);
  auto db = [](const OrderHit& h) { return hd::mul(hd::mul(h.dy, h.p), hd::silu(h.a)); };
  auto db_alt = [](const OrderHit& h) { return hd::mul(h.dy, hd::mul(h.p, hd::silu(h.a))); };
  run(order_sensitive_inputs(db, db_alt, 3), 2, db);
}

// ------------------------------------------------------------------------------------------------
// Backward against FP64.

struct Fp64Grad {
  double da, db, dp;
};
Fp64Grad grad64(float dy, float a, float b, float p) {
  return {double(dy) * p * b * dsilu64(a), double(dy) * p * silu64(a), double(dy) * silu64(a) * b};
}

// dprob: |got - exact| <= 1e-5 * sum_j |dy * silu * b| (relative to the magnitude of the terms:
// the FP32 sum of F terms in a 32-way split has error <= (F/32 + 5) * 2^-24 * sum|terms| + the
// per-term FP32 error, below 1e-5 for F <= 2048; relative to |exact| it is unbounded under
// cancellation).
void expect_dprob(const SwigluCase& c, const HostTensor& dprob) {
  for (int64_t m = 0; m < c.M; ++m) {
    const float p = prob_of(c, m);
    double exact = 0, mag = 0;
    bool finite = true;
    for (int64_t j = 0; j < c.F; ++j) {
      const float dy = test::bf16_at(c.dy, m, j), a = test::bf16_at(c.in, m, j),
                  b = test::bf16_at(c.in, m, c.F + j);
      finite &= finite3(dy, a, b);
      const double t = grad64(dy, a, b, p).dp;
      exact += t;
      mag += std::fabs(t);
    }
    const float got = test::f32_at(dprob, m);
    if (!finite || !std::isfinite(mag)) continue;
    ASSERT_LE(std::fabs(got - exact), 1e-5 * mag + 1e-38)
        << "row " << m << " got " << got << " want " << exact;
  }
}

void check_backward_fp8(const SwigluCase& c, DType d) {
  SwigluHostScaled din(d, c.M, 2 * c.F);
  HostTensor dprob(DType::F32, c.M, 1);
  swiglu_backward(c.dy.v, c.in.v, c.prob.v, din.view(), dprob.v);
  expect_scales_pow2(din);
  const Bound bd = d == DType::E4M3 ? kE4M3 : kE5M2;
  for (int64_t m = 0; m < c.M; ++m) {
    const float p = prob_of(c, m);
    for (int64_t j = 0; j < c.F; ++j) {
      const float dy = test::bf16_at(c.dy, m, j), a = test::bf16_at(c.in, m, j),
                  b = test::bf16_at(c.in, m, c.F + j);
      if (!finite3(dy, a, b)) continue;
      const Fp64Grad g = grad64(dy, a, b, p);
      const double dpb = std::fabs(double(dy) * p * b);
      ASSERT_LE(std::fabs(deq(din, d, m, j) - g.da),
                allowed(bd, g.da, scale_of(din, m, j), kDelta * dpb))
          << "da m " << m << " j " << j << " a " << a << " b " << b << " dy " << dy;
      ASSERT_LE(std::fabs(deq(din, d, m, c.F + j) - g.db),
                allowed(bd, g.db, scale_of(din, m, c.F + j), underflow_slack(a, g.db)))
          << "db m " << m << " j " << j << " a " << a << " b " << b << " dy " << dy;
    }
  }
  expect_dprob(c, dprob);
}

TEST(SwigluRef, BackwardFp8WithinHalfUlpOfFp64) {
  uint64_t seed = 200;
  for (const Shape& s : kShapes)
    for (Fill f : {Fill::Normal, Fill::WideRange})
      for (DType d : {DType::E4M3, DType::E5M2}) {
        SCOPED_TRACE(testing::Message() << "M " << s.M << " F " << s.F << " fill " << int(f)
                                        << " dtype " << to_string(d));
        check_backward_fp8(test::make_case(s.M, s.F, f, ++seed), d);
      }
}

TEST(SwigluRef, BackwardBf16WithinHalfUlpOfFp64) {
  uint64_t seed = 300;
  for (const Shape& s : kShapes) {
    SCOPED_TRACE(testing::Message() << "M " << s.M << " F " << s.F);
    const SwigluCase c = test::make_case(s.M, s.F, Fill::Normal, ++seed);
    HostTensor din(DType::BF16, c.M, 2 * c.F), dprob(DType::F32, c.M, 1);
    swiglu_backward(c.dy.v, c.in.v, c.prob.v, din.v, dprob.v);
    for (int64_t m = 0; m < c.M; ++m)
      for (int64_t j = 0; j < c.F; ++j) {
        const float dy = test::bf16_at(c.dy, m, j), a = test::bf16_at(c.in, m, j),
                    b = test::bf16_at(c.in, m, c.F + j), p = prob_of(c, m);
        const Fp64Grad g = grad64(dy, a, b, p);
        const double dpb = std::fabs(double(dy) * p * b);
        ASSERT_LE(std::fabs(test::bf16_at(din, m, j) - g.da),
                  allowed(kBF16, g.da, 1.0, kDelta * dpb))
            << m << " " << j;
        ASSERT_LE(std::fabs(test::bf16_at(din, m, c.F + j) - g.db),
                  allowed(kBF16, g.db, 1.0, underflow_slack(a, g.db)))
            << m << " " << j;
      }
    expect_dprob(c, dprob);
  }
}

// The BF16 backward against central finite differences of the FP64 forward
// L = sum_{m,j} dy * silu(a) * b * p: an independent check of the derivative formulas
// (dsilu, the chain through p). FD error (h = 1e-5 * max(1, |x|)) is ~1e-10 relative.
TEST(SwigluRef, BackwardBf16MatchesFiniteDifferences) {
  const SwigluCase c = test::make_case(40, 256, Fill::Normal, 17);
  HostTensor din(DType::BF16, c.M, 2 * c.F), dprob(DType::F32, c.M, 1);
  swiglu_backward(c.dy.v, c.in.v, c.prob.v, din.v, dprob.v);
  auto y64 = [](double a, double b, double p) { return silu64(a) * b * p; };
  for (int64_t m = 0; m < c.M; ++m) {
    const double p = prob_of(c, m);
    double dp_fd = 0, mag = 0;
    for (int64_t j = 0; j < c.F; ++j) {
      const double dy = test::bf16_at(c.dy, m, j), a = test::bf16_at(c.in, m, j),
                   b = test::bf16_at(c.in, m, c.F + j);
      const double ha = 1e-5 * std::max(1.0, std::fabs(a)), hb = 1e-5 * std::max(1.0, std::fabs(b));
      const double da_fd = dy * (y64(a + ha, b, p) - y64(a - ha, b, p)) / (2 * ha);
      const double db_fd = dy * (y64(a, b + hb, p) - y64(a, b - hb, p)) / (2 * hb);
      const double hp = 1e-5;
      dp_fd += dy * (y64(a, b, p + hp) - y64(a, b, p - hp)) / (2 * hp);
      mag += std::fabs(dy * silu64(a) * b);
      const double dpb = std::fabs(dy * p * b);
      ASSERT_LE(std::fabs(test::bf16_at(din, m, j) - da_fd),
                0x1p-8 * std::fabs(da_fd) + kDelta * dpb + 1e-30)
          << "da m " << m << " j " << j << " a " << a;
      ASSERT_LE(std::fabs(test::bf16_at(din, m, c.F + j) - db_fd),
                0x1p-8 * std::fabs(db_fd) + kDelta * std::fabs(dy * p * silu64(a)) + 1e-30)
          << "db m " << m << " j " << j << " a " << a;
    }
    ASSERT_LE(std::fabs(test::f32_at(dprob, m) - dp_fd), 1e-5 * mag + 1e-30) << "dprob m " << m;
  }
}

// dprob follows the documented order (swiglu.h): 32 partials over 8-column chunks, then a
// butterfly. Recomputed here from the element terms; on this data a plain left-to-right sum
// differs in the last bits, so the order is really pinned.
TEST(SwigluRef, DprobFollowsDocumentedOrder) {
  const SwigluCase c = test::make_case(16, 2048, Fill::Normal, 23, /*padding=*/false);
  SwigluHostScaled din(DType::E4M3, c.M, 2 * c.F);
  HostTensor dprob(DType::F32, c.M, 1);
  swiglu_backward(c.dy.v, c.in.v, c.prob.v, din.view(), dprob.v);
  int differs_from_sequential = 0;
  for (int64_t m = 0; m < c.M; ++m) {
    std::vector<float> t(static_cast<size_t>(c.F));
    float seq = 0.f;
    for (int64_t j = 0; j < c.F; ++j) {
      t[j] = swiglu_detail::backward(test::bf16_at(c.dy, m, j), test::bf16_at(c.in, m, j),
                                     test::bf16_at(c.in, m, c.F + j), prob_of(c, m))
                 .dp;
      seq += t[j];
    }
    float part[32] = {};
    for (int64_t j = 0; j < c.F; ++j) part[(j / 8) % 32] += t[j];
    for (int d = 16; d >= 1; d /= 2)
      for (int l = 0; l < d; ++l) part[l] += part[l + d];
    EXPECT_EQ(fmt::f32_bits(test::f32_at(dprob, m)), fmt::f32_bits(part[0])) << m;
    differs_from_sequential += fmt::f32_bits(seq) != fmt::f32_bits(part[0]);
  }
  EXPECT_GT(differs_from_sequential, 0);
}

// ------------------------------------------------------------------------------------------------
// Padding rows, non-finite inputs, unweighted.

TEST(SwigluRef, PaddingRowsGiveZerosAndZeroTileScale) {
  for (bool pad_dy : {false, true}) {
    const SwigluCase c = test::make_case(20, 384, Fill::Normal, 31, true, pad_dy);
    SwigluHostScaled out(DType::E4M3, c.M, c.F), din(DType::E4M3, c.M, 2 * c.F);
    HostTensor out16(DType::BF16, c.M, c.F), din16(DType::BF16, c.M, 2 * c.F);
    HostTensor dprob(DType::F32, c.M, 1), dprob16(DType::F32, c.M, 1);
    swiglu(c.in.v, c.prob.v, out.view());
    swiglu(c.in.v, c.prob.v, out16.v);
    swiglu_backward(c.dy.v, c.in.v, c.prob.v, din.view(), dprob.v);
    swiglu_backward(c.dy.v, c.in.v, c.prob.v, din16.v, dprob16.v);
    const float zero_scale = std::ldexp(1.f, -127);
    int pads = 0;
    for (int64_t m = 0; m < c.M; ++m) {
      if (!test::is_pad_row(m)) continue;
      ++pads;
      for (int64_t j = 0; j < c.F; ++j) {
        EXPECT_EQ(test::u8_at(out.data, m, j), 0) << m << " " << j;
        EXPECT_EQ(test::u16_at(out16, m, j), 0) << m << " " << j;
      }
      for (int64_t j = 0; j < 2 * c.F; ++j) {
        // dy != 0 on a pad row: dya = dy * 0 is a signed zero, so the sign may be set.
        const uint8_t mask = pad_dy ? 0x7F : 0xFF;
        EXPECT_EQ(test::u8_at(din.data, m, j) & mask, 0) << m << " " << j;
        EXPECT_EQ(test::u16_at(din16, m, j) & (pad_dy ? 0x7FFF : 0xFFFF), 0) << m << " " << j;
      }
      for (int64_t t = 0; t < c.F / 128; ++t) EXPECT_EQ(scale_of(out, m, t * 128), zero_scale);
      for (int64_t t = 0; t < 2 * c.F / 128; ++t) EXPECT_EQ(scale_of(din, m, t * 128), zero_scale);
      EXPECT_EQ(fmt::f32_bits(test::f32_at(dprob, m)), 0u) << m;
      EXPECT_EQ(fmt::f32_bits(test::f32_at(dprob16, m)), 0u) << m;
    }
    EXPECT_EQ(pads, 4);
  }
}

// A non-finite input element gives a NaN/Inf code (NaN canonical: 0x7F), never a finite one, and
// never a non-finite or NaN-driven scale; its tile's other elements keep the finite amax scale.
TEST(SwigluRef, NonFiniteInputsGiveNanCodesAndFiniteScales) {
  const SwigluCase c = test::make_case(50, 384, Fill::Adversarial, 41);
  SwigluHostScaled out(DType::E4M3, c.M, c.F), din(DType::E4M3, c.M, 2 * c.F);
  HostTensor out16(DType::BF16, c.M, c.F), dprob(DType::F32, c.M, 1);
  swiglu(c.in.v, c.prob.v, out.view());
  swiglu(c.in.v, c.prob.v, out16.v);
  swiglu_backward(c.dy.v, c.in.v, c.prob.v, din.view(), dprob.v);
  expect_scales_pow2(out);
  expect_scales_pow2(din);
  int nonfinite = 0, nan_rows = 0;
  for (int64_t m = 0; m < c.M; ++m) {
    bool row_bad = false;
    double mag = 0;  // FP64 sum of |dy * silu * b| over the row: dprob must be finite below 1e37
    for (int64_t j = 0; j < c.F; ++j) {
      const float a = test::bf16_at(c.in, m, j), b = test::bf16_at(c.in, m, c.F + j);
      const float dy = test::bf16_at(c.dy, m, j);
      const bool bad = !std::isfinite(a) || !std::isfinite(b);
      row_bad |= bad || !std::isfinite(dy);
      mag += std::fabs(double(dy) * silu64(a) * b);
      if (bad) {
        ++nonfinite;
        EXPECT_EQ(test::u8_at(out.data, m, j) & 0x7F, 0x7F)
            << m << " " << j << " " << a << " " << b;
        EXPECT_FALSE(std::isfinite(test::bf16_at(out16, m, j))) << m << " " << j;
      }
      if (std::isnan(a) || (std::isnan(b))) {  // NaN propagates: canonical codes
        EXPECT_EQ(test::u8_at(out.data, m, j), 0x7F) << m << " " << j;
        EXPECT_EQ(test::u16_at(out16, m, j), 0x7FC0) << m << " " << j;
        EXPECT_EQ(test::u8_at(din.data, m, j), 0x7F) << m << " " << j;
      }
      if (std::isnan(dy)) {
        EXPECT_EQ(test::u8_at(din.data, m, j), 0x7F) << m << " " << j;
        EXPECT_EQ(test::u8_at(din.data, m, c.F + j), 0x7F) << m << " " << j;
      }
    }
    const float dp = test::f32_at(dprob, m);
    if (std::isnan(dp)) {
      ++nan_rows;
      EXPECT_EQ(fmt::f32_bits(dp), 0x7FC00000u) << m;
    }
    if (!row_bad && mag < 1e37) EXPECT_TRUE(std::isfinite(dp)) << m;
  }
  EXPECT_GT(nonfinite, 100);
  EXPECT_GT(nan_rows, 5);
}

TEST(SwigluRef, UnweightedEqualsProbOne) {
  const SwigluCase c = test::make_case(9, 384, Fill::Normal, 51, /*padding=*/false);
  HostTensor ones(DType::F32, c.M, 1);
  for (int64_t m = 0; m < c.M; ++m) ones.ptr<float>()[m] = 1.f;
  const SwigluOptions unweighted{false};
  SwigluHostScaled a(DType::E4M3, c.M, c.F), b(DType::E4M3, c.M, c.F);
  swiglu(c.in.v, ones.v, a.view());
  swiglu(c.in.v, {}, b.view(), unweighted);
  EXPECT_TRUE(test::bytes_equal(a.data, b.data));
  EXPECT_TRUE(test::bytes_equal(a.scale, b.scale));
  SwigluHostScaled da(DType::E4M3, c.M, 2 * c.F), db(DType::E4M3, c.M, 2 * c.F);
  HostTensor dprob(DType::F32, c.M, 1);
  swiglu_backward(c.dy.v, c.in.v, ones.v, da.view(), dprob.v);
  swiglu_backward(c.dy.v, c.in.v, {}, db.view(), {}, unweighted);
  EXPECT_TRUE(test::bytes_equal(da.data, db.data));
  EXPECT_TRUE(test::bytes_equal(da.scale, db.scale));
  HostTensor d16a(DType::BF16, c.M, 2 * c.F), d16b(DType::BF16, c.M, 2 * c.F);
  swiglu_backward(c.dy.v, c.in.v, ones.v, d16a.v, dprob.v);
  swiglu_backward(c.dy.v, c.in.v, {}, d16b.v, {}, unweighted);
  EXPECT_TRUE(test::bytes_equal(d16a, d16b));
  // ... and differs from the weighted op with the case's own probabilities.
  SwigluHostScaled w(DType::E4M3, c.M, c.F);
  swiglu(c.in.v, c.prob.v, w.view());
  EXPECT_FALSE(test::bytes_equal(a.data, w.data));
}

TEST(SwigluRef, EmptyRows) {
  const SwigluCase c = test::make_case(0, 256, Fill::Normal, 1);
  SwigluHostScaled out(DType::E4M3, 0, 256), din(DType::E4M3, 0, 512);
  HostTensor dprob(DType::F32, 0, 1);
  swiglu(c.in.v, c.prob.v, out.view());
  swiglu_backward(c.dy.v, c.in.v, c.prob.v, din.view(), dprob.v);
}

// The prob vector may also be given as a [1][M] view.
TEST(SwigluRef, ProbAsRowVector) {
  const SwigluCase c = test::make_case(6, 128, Fill::Normal, 61);
  TensorView prow = c.prob.v;
  prow.rows = 1;
  prow.cols = c.M;
  SwigluHostScaled a(DType::E4M3, c.M, c.F), b(DType::E4M3, c.M, c.F);
  swiglu(c.in.v, c.prob.v, a.view());
  swiglu(c.in.v, prow, b.view());
  EXPECT_TRUE(test::bytes_equal(a.data, b.data));
}

// swiglu_detail::exp / silu (branch-free) return hd::exp / hd::silu's bits: every 65521st bit
// pattern of all 2^32, every float within 2^17 ulps of each range edge (overflow, flush to zero,
// the subnormal results below x = -87.34), and random values over the interesting range. A NaN
// result only has to be a NaN: its sign and payload come from whichever NaN operand the host
// compiler's instruction keeps (x86 takes the first of two), which inlining can change, and every
// output of the ops canonicalizes NaN (swiglu_math.h: NanCode) as the GPU's arithmetic does.
TEST(SwigluRef, BranchFreeSiluEqualsHd) {
  auto same = [](float a, float b) {
    return (a != a && b != b) || fmt::f32_bits(a) == fmt::f32_bits(b);
  };
  auto check = [&](float x) {
    ASSERT_TRUE(same(swiglu_detail::exp(x), hd::exp(x))) << x;
    ASSERT_TRUE(same(swiglu_detail::silu(x), hd::silu(x))) << x;
    ASSERT_TRUE(same(swiglu_detail::sigmoid(x), hd::sigmoid(x))) << x;
  };
  for (uint64_t i = 0; i < (uint64_t{1} << 32); i += 65521) check(fmt::f32_from_bits(uint32_t(i)));
  for (float edge : {88.72283f, -103.97208f, -87.33655f, 103.97208f, -88.72283f, 87.33655f, 0.f,
                     86.0f, -86.0f, 88.376f, -88.376f, 89.0f, -89.0f}) {
    const uint32_t e = fmt::f32_bits(edge);
    for (uint32_t d = 0; d < (1u << 17); ++d) {
      check(fmt::f32_from_bits(e + d));
      check(fmt::f32_from_bits(e - d));
    }
  }
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> u(-110.f, 95.f);
  for (int i = 0; i < 1000000; ++i) check(u(rng));
  for (float x : {NAN, -NAN, INFINITY, -INFINITY, 0.f, -0.f, 1e-45f, -1e-45f, FLT_MAX, -FLT_MAX})
    check(x);
}

// hd::sigmoid_fast (the backward kernel's sigmoid) against hd::sigmoid over its domain
// x >= kSigmoidFastMinX: a dense sample of all bit patterns, the neighbourhoods of the clamp and
// the bound, and inputs whose rint argument x * log2(e) lies near a tie (k + 1/2: the magic-number
// rint must round them as rintf does). On the host its reciprocal is the IEEE division, so this
// checks the reduction, the rint and the exponent add; the device reciprocal is checked
// exhaustively on the GPU (SwigluGpu.SigmoidFastEqualsHdExhaustive).
TEST(SwigluRef, SigmoidFastEqualsHd) {
  int64_t checked = 0;
  auto check = [&](float x) {
    if (!(x >= hd::kSigmoidFastMinX)) return;  // outside the domain (and NaN)
    ++checked;
    ASSERT_EQ(fmt::f32_bits(hd::sigmoid_fast(x)), fmt::f32_bits(hd::sigmoid(x))) << x;
  };
  for (uint64_t i = 0; i < (uint64_t{1} << 32); i += 4099) check(fmt::f32_from_bits(uint32_t(i)));
  for (float edge : {-86.5f, -86.0f, 86.0f, 0.f, -0.f, 88.72283f, 87.33655f}) {
    const uint32_t e = fmt::f32_bits(edge);
    for (uint32_t d = 0; d < (1u << 16); ++d) {
      check(fmt::f32_from_bits(e + d));
      check(fmt::f32_from_bits(e - d));
    }
  }
  for (int k = -126; k <= 126; ++k) {  // y = -x with y * log2(e) near k + 1/2
    const uint32_t y = fmt::f32_bits(static_cast<float>((k + 0.5) / 1.4426950408889634));
    for (uint32_t d = 0; d < 4096; ++d) {
      check(-fmt::f32_from_bits(y + d));
      check(-fmt::f32_from_bits(y - d));
    }
  }
  for (float x : {INFINITY, FLT_MAX, 1e-45f, -1e-45f, FLT_MIN, -FLT_MIN}) check(x);
  EXPECT_GT(checked, 1000000);
}

TEST(SwigluRef, FastDivIsExact) {
  std::mt19937_64 rng(7);
  std::vector<uint32_t> divisors = {1,       2,    3,     5,     7,     15,
                                    16,      17,   48,    56,    127,   128,
                                    129,     1000, 65535, 65536, 65537, (1u << 31) - 1,
                                    1u << 31};
  for (int i = 0; i < 200; ++i) divisors.push_back(1 + rng() % (1u << 31));
  for (int i = 0; i < 100; ++i) divisors.push_back(1 + rng() % 4096);
  for (uint32_t d : divisors) {
    const swiglu_detail::FastDiv fd(d);
    std::vector<uint32_t> ns = {0,     1,           d - 1,       d,           d + 1,      2 * d - 1,
                                2 * d, 0xFFFFFFFFu, 0xFFFFFFFEu, 0x80000000u, 0x7FFFFFFFu};
    for (int k = 0; k < 2000; ++k) ns.push_back(static_cast<uint32_t>(rng()));
    for (uint32_t n : ns) ASSERT_EQ(fd.div(n), n / d) << n << " / " << d;
  }
}

// ------------------------------------------------------------------------------------------------
// Bad arguments: each names the op and the argument.

using test::expect_error;

struct BadArgs : testing::Test {
  static constexpr int64_t M = 4, F = 256;
  SwigluCase c = test::make_case(M, F, Fill::Normal, 71);
  SwigluHostScaled out{DType::E4M3, M, F}, din{DType::E4M3, M, 2 * F};
  HostTensor out16{DType::BF16, M, F}, din16{DType::BF16, M, 2 * F}, dprob{DType::F32, M, 1};
};

TEST_F(BadArgs, Forward) {
  const std::string op = "swiglu";
  TensorView in = c.in.v;
  in.dtype = DType::F32;
  expect_error([&] { swiglu(in, c.prob.v, out.view()); }, op, "in", "dtype BF16");
  in = c.in.v;
  in.cols = 2 * F - 2;  // odd F
  expect_error([&] { swiglu(in, c.prob.v, out.view()); }, op, "in", "F a multiple of 128");
  in.cols = 2 * 192;  // F % 128 != 0
  expect_error([&] { swiglu(in, c.prob.v, out.view()); }, op, "in", "F a multiple of 128");
  in = c.in.v;
  in.ld = 2 * F + 16;
  expect_error([&] { swiglu(in, c.prob.v, out.view()); }, op, "in", "contiguous");
  in = c.in.v;
  in.data = nullptr;
  expect_error([&] { swiglu(in, c.prob.v, out.view()); }, op, "in", "non-null");

  TensorView prob = c.prob.v;
  prob.dtype = DType::BF16;
  expect_error([&] { swiglu(c.in.v, prob, out.view()); }, op, "prob", "dtype F32");
  prob = c.prob.v;
  prob.rows = M + 1;
  expect_error([&] { swiglu(c.in.v, prob, out.view()); }, op, "prob", "shape [4, 1]");
  prob = c.prob.v;
  prob.data = nullptr;
  expect_error([&] { swiglu(c.in.v, prob, out.view()); }, op, "prob", "non-null");
  expect_error([&] { swiglu(c.in.v, {}, out.view()); }, op, "prob", "shape");
  expect_error([&] { swiglu(c.in.v, c.prob.v, out.view(), SwigluOptions{false}); }, op, "prob",
               "empty view");

  ScaledTensor o = out.view();
  o.data.dtype = DType::BF16;
  expect_error([&] { swiglu(c.in.v, c.prob.v, o); }, op, "out.data", "dtype E4M3 or E5M2");
  o = out.view();
  o.data.cols = F + 128;
  o.scale.rows = (F + 128) / 128;
  expect_error([&] { swiglu(c.in.v, c.prob.v, o); }, op, "out.data", "shape [4, 256]");
  o = out.view();
  o.scale.rows = 1;
  expect_error([&] { swiglu(c.in.v, c.prob.v, o); }, op, "out.scale", "shape [2, 4]");
  o = out.view();
  o.scale.dtype = DType::BF16;
  expect_error([&] { swiglu(c.in.v, c.prob.v, o); }, op, "out.scale", "dtype F32");
  o = out.view();
  o.layout = ScaleLayout::Block128x128;
  expect_error([&] { swiglu(c.in.v, c.prob.v, o); }, op, "out.layout", "Rowwise1x128");
  o = out.view();
  const int64_t groups[] = {128, 128};
  o.col_groups = groups;
  expect_error([&] { swiglu(c.in.v, c.prob.v, o); }, op, "out.col_groups", "empty");
  o = out.view();
  o.data.data = nullptr;
  expect_error([&] { swiglu(c.in.v, c.prob.v, o); }, op, "out.data", "non-null");

  TensorView o16 = out16.v;
  o16.dtype = DType::F32;
  expect_error([&] { swiglu(c.in.v, c.prob.v, o16); }, op, "out", "dtype BF16");
  o16 = out16.v;
  o16.rows = M - 1;
  expect_error([&] { swiglu(c.in.v, c.prob.v, o16); }, op, "out", "shape [4, 256]");
}

TEST_F(BadArgs, Backward) {
  const std::string op = "swiglu_backward";
  TensorView dy = c.dy.v;
  dy.cols = 2 * F;
  expect_error([&] { swiglu_backward(dy, c.in.v, c.prob.v, din.view(), dprob.v); }, op, "dy",
               "shape [4, 256]");
  dy = c.dy.v;
  dy.dtype = DType::F32;
  expect_error([&] { swiglu_backward(dy, c.in.v, c.prob.v, din.view(), dprob.v); }, op, "dy",
               "dtype BF16");
  dy = c.dy.v;
  dy.data = nullptr;
  expect_error([&] { swiglu_backward(dy, c.in.v, c.prob.v, din16.v, dprob.v); }, op, "dy",
               "non-null");
  TensorView in = c.in.v;
  in.cols = 2 * 200;
  expect_error([&] { swiglu_backward(c.dy.v, in, c.prob.v, din.view(), dprob.v); }, op, "in",
               "F a multiple of 128");
  ScaledTensor d = din.view();
  d.data.cols = F;
  d.scale.rows = F / 128;
  expect_error([&] { swiglu_backward(c.dy.v, c.in.v, c.prob.v, d, dprob.v); }, op, "din.data",
               "shape [4, 512]");
  d = din.view();
  d.scale.cols = M + 1;
  expect_error([&] { swiglu_backward(c.dy.v, c.in.v, c.prob.v, d, dprob.v); }, op, "din.scale",
               "shape [4, 4]");
  TensorView d16 = din16.v;
  d16.cols = F;
  expect_error([&] { swiglu_backward(c.dy.v, c.in.v, c.prob.v, d16, dprob.v); }, op, "din",
               "shape [4, 512]");
  expect_error([&] { swiglu_backward(c.dy.v, c.in.v, c.prob.v, din.view(), {}); }, op, "dprob",
               "shape");
  TensorView dp = dprob.v;
  dp.dtype = DType::BF16;
  expect_error([&] { swiglu_backward(c.dy.v, c.in.v, c.prob.v, din16.v, dp); }, op, "dprob",
               "dtype F32");
  expect_error(
      [&] { swiglu_backward(c.dy.v, c.in.v, {}, din.view(), dprob.v, SwigluOptions{false}); }, op,
      "dprob", "empty view");
}

TEST_F(BadArgs, Devices) {
  TensorView cuda_out = out16.v;
  cuda_out.device = Device::Cuda;
  expect_error([&] { swiglu(c.in.v, c.prob.v, cuda_out); }, "swiglu", "out", "device Cpu");
  TensorView cuda_prob = c.prob.v;
  cuda_prob.device = Device::Cuda;
  expect_error([&] { swiglu(c.in.v, cuda_prob, out.view()); }, "swiglu", "prob", "device Cpu");
  TensorView cuda_dy = c.dy.v;
  cuda_dy.device = Device::Cuda;
  expect_error([&] { swiglu_backward(cuda_dy, c.in.v, c.prob.v, din.view(), dprob.v); },
               "swiglu_backward", "dy", "device Cpu");
  ScaledTensor d = din.view();
  d.scale.device = Device::Cuda;
  expect_error([&] { swiglu_backward(c.dy.v, c.in.v, c.prob.v, d, dprob.v); }, "swiglu_backward",
               "din.scale", "device Cpu");
  if (!cuda_available()) {
    // All-Cuda views with no usable CUDA backend/device: Unsupported, naming the device.
    TensorView in = c.in.v, p = c.prob.v, o = out16.v;
    in.device = p.device = o.device = Device::Cuda;
    try {
      swiglu(in, p, o);
      ADD_FAILURE() << "no error";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::Unsupported);
      EXPECT_EQ(std::string(e.what()).rfind("fp8flow::swiglu: device: ", 0), 0u) << e.what();
    }
  }
}

}  // namespace
}  // namespace fp8flow
