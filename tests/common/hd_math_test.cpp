// hd_math: the reproducible exp/sigmoid/silu against the C library (accuracy), NaN/Inf edges.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "common/hd_math.h"

namespace fp8flow {
namespace {

TEST(HdMath, ExpWithinTwoUlp) {
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> u(-100.f, 88.f);
  for (int i = 0; i < 200000; ++i) {
    const float x = u(rng);
    const double want = std::exp(double(x));
    const float got = hd::exp(x);
    if (want < 1.17549435e-38) {  // FP32 subnormal results: absolute error
      EXPECT_NEAR(double(got), want, 2e-45) << x;
      continue;
    }
    const double ulp = std::ldexp(1.0, std::ilogb(want) - 23);
    EXPECT_LE(std::fabs(double(got) - want), 2 * ulp) << x;
  }
  EXPECT_TRUE(std::isinf(hd::exp(100.f)));
  EXPECT_EQ(hd::exp(-200.f), 0.f);
  EXPECT_TRUE(std::isnan(hd::exp(NAN)));
  EXPECT_EQ(hd::exp(0.f), 1.f);
}

TEST(HdMath, SigmoidAndSilu) {
  for (float x = -30.f; x <= 30.f; x += 0.01f) {
    const double s = 1.0 / (1.0 + std::exp(-double(x)));
    EXPECT_NEAR(hd::sigmoid(x), s, 4e-7 * s + 1e-30) << x;
    EXPECT_NEAR(hd::silu(x), x * s, 4e-7 * std::fabs(x * s) + 1e-30) << x;
  }
  EXPECT_EQ(hd::sigmoid(-1000.f), 0.f);
  EXPECT_EQ(hd::sigmoid(1000.f), 1.f);
}

}  // namespace
}  // namespace fp8flow
