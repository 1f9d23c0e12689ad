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

// A copy of rows [r0, r0 + n) of t.
inline HostTensor slice_rows(const HostTensor& t, int64_t r0, int64_t n) {
  HostTensor o(t.v.dtype, n, t.v.cols);
  std::memcpy(o.buf.data(), t.buf.data() + r0 * t.v.row_bytes(), n * t.v.row_bytes());
  return o;
}

}  // namespace fp8flow::test
