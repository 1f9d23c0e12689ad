// Small host-side data helpers shared by test suites (random inputs, row slices).
#pragma once

#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "common/test_util.h"

namespace fp8flow::test {

// n values drawn from N(0, sd^2) with a mt19937_64 seeded by `seed`.
inline std::vector<float> normal_values(int64_t n, float sd, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.f, sd);
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& f : v) f = nd(rng);
  return v;
}

// Random bytes (every FP8 / E2M1 / E8M0 / BF16 code, NaNs included); the padding after the
// tensor's bytes keeps HostTensor's fill.
inline HostTensor random_bytes(DType d, int64_t rows, int64_t cols, uint64_t seed) {
  HostTensor h(d, rows, cols);
  std::mt19937_64 rng(seed);
  for (size_t i = 0; i < h.bytes(); ++i) h.buf[i] = static_cast<uint8_t>(rng());
  return h;
}

// F32 [rows][cols] of powers of two 2^U(-127, 127) (FP8 scales; 2^-127, an F32 subnormal, is
// what all-zero tiles get). With odd > 0, about that fraction of the entries are random F32 bits
// instead (mostly not powers of two), for wire formats that must flag them.
inline HostTensor random_pow2_scales(int64_t rows, int64_t cols, uint64_t seed, double odd = 0.0) {
  HostTensor h(DType::F32, rows, cols);
  std::mt19937_64 rng(seed), rng_odd(seed ^ 0x9E3779B97F4A7C15ull);
  std::uniform_int_distribution<int> d(-127, 127);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  for (int64_t i = 0; i < rows * cols; ++i) {
    h.ptr<float>()[i] = fmt::exp2i(d(rng));
    if (odd > 0 && u(rng_odd) < odd) {
      const auto bits = static_cast<uint32_t>(rng_odd());
      std::memcpy(&h.ptr<float>()[i], &bits, 4);
    }
  }
  return h;
}

// A copy of rows [r0, r0 + n) of t.
inline HostTensor slice_rows(const HostTensor& t, int64_t r0, int64_t n) {
  HostTensor o(t.v.dtype, n, t.v.cols);
  std::memcpy(o.buf.data(), t.buf.data() + r0 * t.v.row_bytes(), n * t.v.row_bytes());
  return o;
}

}  // namespace fp8flow::test
