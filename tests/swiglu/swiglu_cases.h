// Shared inputs and output buffers of the SwiGLU tests (CPU reference tests and GPU == CPU tests).
#pragma once

#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "common/test_util.h"
#include "fp8flow/swiglu.h"

namespace fp8flow::test {

// One SwiGLU problem: in BF16 [M][2F], dy BF16 [M][F], prob F32 [M][1].
// prob: U[0, 1) with every 4th row exactly 0. Padding rows (m % 5 == 4 when `padding`): all-zero
// in, prob 0, and dy zero too (what unpermute-bwd gives pad rows) unless `pad_dy`.
struct SwigluCase {
  int64_t M = 0, F = 0;
  HostTensor in, dy, prob;
};

inline bool is_pad_row(int64_t m) {
  return m % 5 == 4;
}

inline SwigluCase make_case(int64_t M, int64_t F, Fill fill, uint64_t seed, bool padding = true,
                            bool pad_dy = false) {
  SwigluCase c;
  c.M = M;
  c.F = F;
  std::vector<float> x = make_values(M, 2 * F, fill, seed);
  std::vector<float> g =
      make_values(M, F, fill == Fill::Adversarial ? Fill::Normal : fill, seed * 7 + 1);
  if (fill == Fill::Adversarial) {  // a few non-finite gradients too, in rows of their own
    for (int64_t m = 0; m < M; m += 11) g[static_cast<size_t>(m * F + (m % F))] = NAN;
    for (int64_t m = 5; m < M; m += 13) g[static_cast<size_t>(m * F + (m * 3 % F))] = INFINITY;
  }
  std::mt19937_64 rng(seed ^ 0x5eed);
  std::uniform_real_distribution<float> u(0.f, 1.f);
  std::vector<float> p(static_cast<size_t>(M));
  for (int64_t m = 0; m < M; ++m) p[m] = (m % 4 == 1) ? 0.f : u(rng);
  if (padding) {
    for (int64_t m = 0; m < M; ++m) {
      if (!is_pad_row(m)) continue;
      for (int64_t j = 0; j < 2 * F; ++j) x[static_cast<size_t>(m * 2 * F + j)] = 0.f;
      if (!pad_dy)
        for (int64_t j = 0; j < F; ++j) g[static_cast<size_t>(m * F + j)] = 0.f;
      p[m] = 0.f;
    }
  }
  c.in = host_from_values(x, DType::BF16, M, 2 * F);
  c.dy = host_from_values(g, DType::BF16, M, F);
  c.prob = host_from_values(p, DType::F32, M, 1);
  return c;
}

// Raw BF16 specials written into `in` (for the saved-input tests, whose FP8 copy must keep what
// quantize() keeps): NaNs of both signs and with payloads, +-Inf, the largest finite values, the
// smallest subnormals, and (when M > 2) row 2 made all-tiny (every |h| < 2^-126: the tile scale
// clamps at 2^-127). Non-padding rows only.
inline void add_bf16_specials(SwigluCase& c) {
  const uint16_t specials[] = {0x7FC0, 0xFFC0, 0x7F81, 0xFF81, 0x7F80, 0xFF80,
                               0x7F7F, 0xFF7F, 0x0001, 0x8001, 0x0080, 0x8000};
  auto* h = c.in.ptr<uint16_t>();
  const int64_t n = 2 * c.F;
  int k = 0;
  for (int64_t m = 0; m < c.M; m += 3) {
    if (is_pad_row(m)) continue;
    for (int64_t j = (m * 37) % 61; j < n; j += 97) h[m * n + j] = specials[k++ % 12];
  }
  if (c.M > 2 && !is_pad_row(2))
    for (int64_t j = 0; j < n; ++j) h[2 * n + j] = static_cast<uint16_t>((j * 7919) % 0x100);
}

// Host output buffers (poisoned 0xA5) for a quantized [rows][cols] result.
struct SwigluHostScaled {
  HostTensor data, scale;
  SwigluHostScaled(DType d, int64_t rows, int64_t cols)
      : data(d, rows, cols), scale(DType::F32, cols / 128, rows) {}
  ScaledTensor view() const { return ScaledTensor{data.v, scale.v, ScaleLayout::Rowwise1x128, {}}; }
};

inline float bf16_at(const HostTensor& t, int64_t r, int64_t c) {
  return fmt::bf16_to_f32(reinterpret_cast<const uint16_t*>(t.buf.data())[r * t.v.cols + c]);
}
inline float f32_at(const HostTensor& t, int64_t i) {
  return reinterpret_cast<const float*>(t.buf.data())[i];
}
inline uint8_t u8_at(const HostTensor& t, int64_t r, int64_t c) {
  return t.buf[static_cast<size_t>(r * t.v.cols + c)];
}
inline uint16_t u16_at(const HostTensor& t, int64_t r, int64_t c) {
  return reinterpret_cast<const uint16_t*>(t.buf.data())[r * t.v.cols + c];
}

// Expects f to throw fp8flow::Error whose message starts "fp8flow::<op>: <arg>: " and contains
// `what` (if given).
inline void expect_error(const std::function<void()>& f, const std::string& op,
                         const std::string& arg, const std::string& what = "") {
  try {
    f();
    ADD_FAILURE() << "no error; expected one about " << arg;
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_EQ(msg.rfind("fp8flow::" + op + ": " + arg + ": ", 0), 0u) << msg;
    if (!what.empty()) EXPECT_NE(msg.find(what), std::string::npos) << msg;
  }
}

}  // namespace fp8flow::test

// The swiglu test files live in namespace fp8flow (next to the ops) and name these unqualified.
namespace fp8flow {
using test::Fill;
using test::HostTensor;
using test::SwigluCase;
using test::SwigluHostScaled;
}  // namespace fp8flow
