// Inputs for the 128x128 block quantize edge tests (GPU test and CPU emulation driver).
#pragma once

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

namespace fp8flow::test {

// 128x128 blocks at the edges of the formats, one pattern per block: all zeros (scale 2^-127),
// only NaN/Inf (finite amax 0), only subnormals, magnitudes near FLT_MAX (scale exponent at the top
// of its range) with one Inf, one NaN among normal values, signed zeros around one tiny value,
// wide-range and normal values. 257 x 400 also leaves a 1-row block band and a 16-channel block
// column; 128 x 16 is one narrow block.
inline std::vector<float> block_edge_values(int64_t M, int64_t K, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> ud(0.f, 1.f);
  std::normal_distribution<float> nd(0.f, 1.f);
  const int64_t tk = (K + 127) / 128;
  std::vector<float> v(static_cast<size_t>(M * K));
  for (int64_t r = 0; r < M; ++r)
    for (int64_t c = 0; c < K; ++c) {
      const int64_t b = (r / 128) * tk + c / 128;
      const bool first = r % 128 == 0 && c % 128 == 0, mid = r % 128 == 5 && c % 128 == 9;
      const float sign = ud(rng) < 0.5f ? -1.f : 1.f;
      float& x = v[static_cast<size_t>(r * K + c)];
      switch (b % 8) {
        case 0:
          x = 0.f;
          break;
        case 1: {
          const float nf[] = {std::nanf(""), INFINITY, -INFINITY, -std::nanf("")};
          x = nf[(r + c) % 4];
          break;
        }
        case 2:
          x = sign * std::ldexp(1.f + ud(rng), -140 + static_cast<int>(ud(rng) * 8));
          break;
        case 3:
          x = first ? INFINITY : sign * 3.0e38f * (0.5f + 0.5f * ud(rng));
          break;
        case 4:
          x = mid ? std::nanf("") : nd(rng);
          break;
        case 5:
          x = mid ? 1e-30f : (ud(rng) < 0.5f ? -0.f : 0.f);
          break;
        case 6:
          x = sign * std::ldexp(1.f + ud(rng), static_cast<int>(ud(rng) * 80) - 40);
          break;
        default:
          x = nd(rng);
      }
    }
  return v;
}

}  // namespace fp8flow::test
