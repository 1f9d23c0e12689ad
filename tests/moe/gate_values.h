// Inputs for the MoE gate GEMM tests (moe_gate_test.cpp and the CPU emulation driver
// cpu_emulation/emu_driver.cpp), chosen so that the summation order shows in the bits.
#pragma once

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

namespace fp8flow::test {

// Normal: N(0, sd). Wide: 2^U(-20, 20) with random signs (any change of summation order shows in
// the bits). Tiny: +-1e-25, whose products underflow to signed zeros (the sign of a zero result
// depends on the last term: catches extra or missing terms).
enum class GateFill { Normal, Wide, Tiny };

inline std::vector<float> gate_values(int64_t n, GateFill k, uint64_t seed, float sd = 1.0f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.f, sd);
  std::uniform_real_distribution<float> ud(0.f, 1.f);
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& f : v) {
    const float s = ud(rng) < 0.5f ? -1.f : 1.f;
    switch (k) {
      case GateFill::Normal:
        f = nd(rng);
        break;
      case GateFill::Wide:
        f = s * std::ldexp(1.f + ud(rng), static_cast<int>(ud(rng) * 40) - 20);
        break;
      case GateFill::Tiny:
        f = s * 1e-25f;
        break;
    }
  }
  return v;
}

}  // namespace fp8flow::test
