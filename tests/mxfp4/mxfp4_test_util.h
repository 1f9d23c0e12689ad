// Helpers for the MXFP4 tests: owned scaled tensors (data + scale + groups) on the host, made by
// the library's own CPU quantizers or from raw random bytes, and their device mirrors.
#pragma once

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "common/test_util.h"

namespace fp8flow::test {

// A scaled tensor with its storage. Move-only in practice: HostTensor views point into buf.
struct HostScaled {
  HostTensor data, scale;
  ScaleLayout layout = ScaleLayout::Rowwise1x128;
  std::vector<int64_t> groups;
  ScaledTensor st() const { return ScaledTensor{data.v, scale.v, layout, groups}; }
};

// Output buffers (poisoned 0xA5) of an MXFP4 tensor [M][K].
inline HostScaled alloc_mx(int64_t M, int64_t K) {
  HostScaled h;
  h.layout = ScaleLayout::Mx1x32;
  h.data = HostTensor(DType::E2M1x2, M, K);
  h.scale = HostTensor(DType::E8M0, M, K / 32);
  return h;
}

// Output buffers of an E4M3 Rowwise1x128 tensor [R][C] with column groups.
inline HostScaled alloc_fp8(int64_t R, int64_t C, std::vector<int64_t> groups = {}) {
  HostScaled h;
  h.groups = std::move(groups);
  h.data = HostTensor(DType::E4M3, R, C);
  h.scale = HostTensor(DType::F32, rowwise_tiles(C, h.groups), R);
  return h;
}

// E4M3 row-wise [M][K] from values, by the library's CPU quantize.
inline HostScaled fp8_from_values(const std::vector<float>& x, int64_t M, int64_t K) {
  HostTensor in = host_from_values(x, DType::F32, M, K);
  HostScaled h = alloc_fp8(M, K);
  quantize(in.v, h.st());
  return h;
}

// MXFP4 [M][K] from values, by the library's CPU quantize_mxfp4.
inline HostScaled mx_from_values(const std::vector<float>& x, int64_t M, int64_t K) {
  HostTensor in = host_from_values(x, DType::F32, M, K);
  HostScaled h = alloc_mx(M, K);
  quantize_mxfp4(in.v, h.st());
  return h;
}

// Shapes and column groups of the transposed-conversion tests (mxfp4_to_fp8_transposed): the GPU
// test runs them all, the CPU emulation only those marked `emu` (one CPU thread per CUDA thread).
struct TransposedCase {
  int64_t M, K;
  std::vector<int64_t> groups;
  bool emu;
};
inline std::vector<TransposedCase> transposed_cases(bool emu_only) {
  const std::vector<TransposedCase> all = {
      {510, 256, {0, 128, 5, 300, 0, 77}, true},  // unaligned group offsets: byte stores
      {512, 384, {128, 256, 64, 64}, true},       // 16-aligned: vector stores, partial tiles
      {512, 256, {}, false},                      // one group, full tiles
      {1, 128, {}, true},                         // one token
      {200, 128, {200}, true},                    // all in one group, partial last tile
      {131, 256, {0, 0, 131, 0}, true},           // empty groups around
      {64, 128, {1, 1, 1, 61}, true},             // tiny groups
      {1024, 1024, {}, false},
      {333, 7168, {100, 0, 233}, false},
  };
  std::vector<TransposedCase> out;
  for (const TransposedCase& c : all)
    if (c.emu || !emu_only) out.push_back(c);
  return out;
}

// Raw random MXFP4 blocks: per block one uniform draw p, then (unless p < zero_frac: a zero block,
// scale kept) 16 uniform code bytes, then the scale byte scale_byte(rng, p).
template <class ScaleByte>
HostScaled mx_random_blocks(int64_t M, int64_t K, uint64_t seed, double zero_frac,
                            ScaleByte scale_byte) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> byte(0, 255);
  std::uniform_real_distribution<double> u(0, 1);
  HostScaled h = alloc_mx(M, K);
  for (int64_t r = 0; r < M; ++r)
    for (int64_t b = 0; b < K / 32; ++b) {
      const double p = u(rng);
      uint8_t* d = h.data.ptr<uint8_t>() + (r * K + b * 32) / 2;
      for (int i = 0; i < 16; ++i) d[i] = p < zero_frac ? 0 : static_cast<uint8_t>(byte(rng));
      h.scale.ptr<uint8_t>()[r * (K / 32) + b] = scale_byte(rng, p);
    }
  return h;
}

// Raw random MXFP4: uniform nibbles; scale bytes uniform in [lo, hi], with a fraction of zero
// blocks (scale kept) and of NaN blocks (0xFF).
inline HostScaled mx_random(int64_t M, int64_t K, uint64_t seed, int lo, int hi,
                            double zero_frac = 0.05, double nan_frac = 0.0) {
  std::uniform_int_distribution<int> sc(lo, hi);
  return mx_random_blocks(M, K, seed, zero_frac, [&](std::mt19937_64& rng, double p) {
    return p > 1.0 - nan_frac ? fmt::kE8M0NaN : static_cast<uint8_t>(sc(rng));
  });
}

// Raw random MXFP4 for the transposed kernel's gap-key test (mx::gap_keys_exact): like mx_random
// without NaN blocks, but a fraction small_frac of the blocks takes a scale byte in [0, small_hi]
// (tiny values, the bytes that test ignores up to 6) instead of one in [lo, hi].
inline HostScaled mx_random_gap(int64_t M, int64_t K, uint64_t seed, int lo, int hi,
                                double small_frac, int small_hi, double zero_frac = 0.1) {
  std::uniform_int_distribution<int> sc(lo, hi), small(0, small_hi);
  std::uniform_real_distribution<double> u(0, 1);
  return mx_random_blocks(M, K, seed, zero_frac, [&](std::mt19937_64& rng, double) {
    return static_cast<uint8_t>(u(rng) < small_frac ? small(rng) : sc(rng));
  });
}

// Sparse raw MXFP4 for the transposed kernel's integer path (mx::int_path_ok): scale bytes uniform
// in [lo, hi]; each code nonzero with probability nz_prob, magnitude uniform in 1..max_mag, random
// sign; the rest +0 or -0. Columns with only small codes of low-exponent tokens test the path's
// upper edge, all-zero columns its zero-column case.
inline HostScaled mx_random_sparse(int64_t M, int64_t K, uint64_t seed, int lo, int hi,
                                   double nz_prob, int max_mag) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> sc(lo, hi), mag(1, max_mag), bit(0, 1);
  std::uniform_real_distribution<double> u(0, 1);
  HostScaled h = alloc_mx(M, K);
  auto code = [&] {
    return (u(rng) < nz_prob ? static_cast<uint32_t>(mag(rng)) : 0u) | (bit(rng) ? 8u : 0u);
  };
  for (int64_t i = 0; i < M * K / 2; ++i) {
    const uint32_t c0 = code();
    h.data.ptr<uint8_t>()[i] = static_cast<uint8_t>(c0 | (code() << 4));
  }
  for (int64_t i = 0; i < M * (K / 32); ++i)
    h.scale.ptr<uint8_t>()[i] = static_cast<uint8_t>(sc(rng));
  return h;
}

// Raw random E4M3 row-wise [M][K]: uniform bytes (NaN codes allowed when with_nan), scales 2^t
// with t uniform in [tlo, thi] (E8M0-range exponents; the FP32 power of two may be subnormal).
inline HostScaled fp8_random(int64_t M, int64_t K, uint64_t seed, int tlo, int thi, bool with_nan) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> byte(0, 255), te(tlo, thi);
  HostScaled h = alloc_fp8(M, K);
  for (int64_t i = 0; i < M * K; ++i) {
    uint8_t q = static_cast<uint8_t>(byte(rng));
    if (!with_nan && fmt::e4m3_is_nan(q)) q &= 0xFE;
    h.data.ptr<uint8_t>()[i] = q;
  }
  for (int64_t i = 0; i < (K / 128) * M; ++i) h.scale.ptr<float>()[i] = fmt::exp2i(te(rng));
  return h;
}

// dequantize (CPU) to F32.
inline HostTensor dequant_f32(const HostScaled& h) {
  HostTensor out(DType::F32, h.data.v.rows, h.data.v.cols);
  dequantize(h.st(), out.v);
  return out;
}

inline ::testing::AssertionResult scaled_equal(const HostScaled& a, const HostScaled& b) {
  auto d = bytes_equal(a.data, b.data);
  if (!d) return ::testing::AssertionFailure() << "data: " << d.message();
  auto s = bytes_equal(a.scale, b.scale);
  if (!s) return ::testing::AssertionFailure() << "scale: " << s.message();
  return ::testing::AssertionSuccess();
}

#if FP8FLOW_WITH_CUDA
// A scaled tensor on the device: copies of the host buffers (or poisoned outputs).
struct DeviceScaled {
  DeviceTensor data, scale;
  ScaleLayout layout = ScaleLayout::Rowwise1x128;
  std::vector<int64_t> groups;
  explicit DeviceScaled(const HostScaled& h, bool copy = true)
      : data(copy ? DeviceTensor(h.data)
                  : DeviceTensor(h.data.v.dtype, h.data.v.rows, h.data.v.cols)),
        scale(copy ? DeviceTensor(h.scale)
                   : DeviceTensor(h.scale.v.dtype, h.scale.v.rows, h.scale.v.cols)),
        layout(h.layout),
        groups(h.groups) {}
  ScaledTensor st() const { return ScaledTensor{data.v, scale.v, layout, groups}; }
  HostScaled to_host() const {
    HostScaled h;
    h.data = data.to_host();
    h.scale = scale.to_host();
    h.layout = layout;
    h.groups = groups;
    return h;
  }
};
#endif

}  // namespace fp8flow::test
