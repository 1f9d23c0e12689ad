// CPU reference backend of the MXFP4 ops: the definition the CUDA kernels are tested against, bit
// for bit. Plain loops, written for reading, not speed.
//
// Values. Every conversion works on the values the two-step path would see: v = decode(code) *
// scale as one FP32 multiply, which is exactly what dequantize computes (for the power-of-two
// scales fp8flow produces it is the exact value code * 2^t). So each direct conversion equals
// "dequantize to F32, then quantize" bit for bit, always, with one convention of our own: an MXFP4
// NaN block (scale 0xFF) decodes to the FP8 NaN code 0x7F.
#include <algorithm>

#include "common/groups.h"
#include "common/ref_access.h"
#include "ops/mxfp4/mxfp4_backends.h"

namespace fp8flow::ref {
namespace {

constexpr int kMxBlock = 32;

// The MX rule on one block of 32 FP32 values: a NaN or Inf anywhere gives the NaN scale 0xFF and
// zero codes; otherwise X = floor(log2(amax)) - 2 (fmt::mx_shared_exponent) and each element is
// RNE(v / 2^X) to E2M1, saturating at 6.
// sr: stochastic rounding of element i with fmt::sr_bits(seed, index0 + i) (nullptr: RNE).
struct SrIndex {
  uint64_t seed, index0;
};
void encode_mx_block(const float* v, uint8_t* codes, uint8_t& scale, const SrIndex* sr = nullptr) {
  bool nonfinite = false;
  float amax = 0.f;
  for (int i = 0; i < kMxBlock; ++i) {
    if (!fmt::f32_is_finite(v[i]))
      nonfinite = true;
    else
      amax = std::max(amax, fmt::f32_abs(v[i]));
  }
  if (nonfinite) {
    scale = fmt::kE8M0NaN;
    std::fill(codes, codes + kMxBlock, uint8_t{0});
    return;
  }
  const int x = fmt::mx_shared_exponent(amax);
  scale = fmt::e8m0_from_exponent(x);
  for (int i = 0; i < kMxBlock; ++i) {
    const float y = fmt::mul_pow2(v[i], -x);
    codes[i] = sr ? fmt::e2m1_from_f32_sr(y, fmt::sr_bits(sr->seed, sr->index0 + i))
                  : fmt::e2m1_from_f32(y);
  }
}

void store_mx_block(const ScaledTensor& out, int64_t r, int64_t b, const uint8_t* codes,
                    uint8_t scale) {
  for (int i = 0; i < kMxBlock; ++i) store_e2m1(out.data, r, b * kMxBlock + i, codes[i]);
  static_cast<uint8_t*>(out.scale.data)[r * out.scale.stride() + b] = scale;
}

uint8_t mx_scale_byte(const ScaledTensor& in, int64_t r, int64_t c) {
  return static_cast<const uint8_t*>(in.scale.data)[r * in.scale.stride() + c / kMxBlock];
}

// Element (r, c) of an MXFP4 tensor as dequantize computes it (NaN for a NaN block).
float mx_value(const ScaledTensor& in, int64_t r, int64_t c) {
  return fmt::e2m1_to_f32(load_e2m1(in.data, r, c)) * fmt::e8m0_to_f32(mx_scale_byte(in, r, c));
}

// E4M3 code of MXFP4 element (r, c) at the FP8 scale 2^t.
uint8_t mx_to_e4m3(const ScaledTensor& in, int64_t r, int64_t c, int t) {
  if (mx_scale_byte(in, r, c) == fmt::kE8M0NaN) return 0x7F;
  return fmt::e4m3_from_f32(fmt::mul_pow2(mx_value(in, r, c), -t));
}

}  // namespace

void quantize_mxfp4(const TensorView& in, const ScaledTensor& out) {
  float v[kMxBlock];
  uint8_t codes[kMxBlock], scale;
  for (int64_t r = 0; r < in.rows; ++r)
    for (int64_t b = 0; b < in.cols / kMxBlock; ++b) {
      for (int i = 0; i < kMxBlock; ++i) v[i] = load_f32(in, r, b * kMxBlock + i);
      encode_mx_block(v, codes, scale);
      store_mx_block(out, r, b, codes, scale);
    }
}

void fp8_to_mxfp4(const ScaledTensor& in, const ScaledTensor& out, const Mxfp4Rounding& rounding) {
  float v[kMxBlock];
  uint8_t codes[kMxBlock], scale;
  for (int64_t r = 0; r < in.data.rows; ++r)
    for (int64_t b = 0; b < in.data.cols / kMxBlock; ++b) {
      const float s = scale_at(in.scale, b * kMxBlock / 128, r);
      for (int i = 0; i < kMxBlock; ++i)
        v[i] = fmt::e4m3_to_f32(byte_at(in.data, r, b * kMxBlock + i)) * s;
      const SrIndex sr{rounding.seed, static_cast<uint64_t>(r * in.data.cols + b * kMxBlock)};
      encode_mx_block(v, codes, scale, rounding.stochastic ? &sr : nullptr);
      store_mx_block(out, r, b, codes, scale);
    }
}

void mxfp4_to_fp8(const ScaledTensor& in, const ScaledTensor& out) {
  const int64_t M = in.data.rows, K = in.data.cols;
  for (int64_t r = 0; r < M; ++r)
    for (int64_t k0 = 0; k0 < K; k0 += 128) {
      float amax = 0.f;
      for (int64_t k = k0; k < k0 + 128; ++k) amax = std::max(amax, finite_abs(mx_value(in, r, k)));
      const int t = fmt::scale_exponent(amax);
      scale_at(out.scale, k0 / 128, r) = fmt::exp2i(t);
      for (int64_t k = k0; k < k0 + 128; ++k) byte_at(out.data, r, k) = mx_to_e4m3(in, r, k, t);
    }
}

void mxfp4_to_fp8_transposed(const ScaledTensor& in, const ScaledTensor& out_t) {
  const int64_t M = in.data.rows, K = in.data.cols;
  const detail::GroupTiles g = detail::make_group_tiles(out_t.col_groups, M);
  for (int32_t tile = 0; tile < g.total_tiles; ++tile) {
    int32_t m0, w;
    g.tile_cols(tile, m0, w);
    for (int64_t k = 0; k < K; ++k) {
      float amax = 0.f;
      for (int64_t m = m0; m < m0 + w; ++m) amax = std::max(amax, finite_abs(mx_value(in, m, k)));
      const int t = fmt::scale_exponent(amax);
      scale_at(out_t.scale, tile, k) = fmt::exp2i(t);
      for (int64_t m = m0; m < m0 + w; ++m) byte_at(out_t.data, k, m) = mx_to_e4m3(in, m, k, t);
    }
  }
}

}  // namespace fp8flow::ref
