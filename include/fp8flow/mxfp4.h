// MXFP4 (OCP MX: 32 E2M1 values sharing one E8M0 exponent) and direct conversions to and from the
// FP8 1x128 forms. Hopper has no FP4 tensor cores: MXFP4 is a storage and transport format.
//
// Rules (all exact power-of-two arithmetic, no BF16 in between, deterministic, bit-exact between
// backends):
// - To MXFP4 from values v: per 32-block X = floor(log2(amax)) - 2 (clamped to E8M0), elements
//   RNE(v / 2^X) to E2M1, saturating at 6. A block holding NaN or Inf gets the NaN scale 0xFF.
// - To FP8 from MXFP4: per 128-element tile, the standard FP8 rule on the decoded values
//   (T = ceil(log2(amax / 448))). Each E2M1 value has 2 significant bits and E4M3 has 4, so the
//   result is exact unless a block sits far below its tile's largest (then RNE to subnormal/0).
//   A NaN block decodes to NaN codes.
// Consequence, tested: fp8_to_mxfp4(x) == quantize_mxfp4(dequantize(x)) and
// mxfp4_to_fp8(y) == quantize(dequantize(y)), bit for bit.
#pragma once

#include "fp8flow/types.h"

namespace fp8flow {

// F32/BF16 [M][K] -> MXFP4 (out.layout Mx1x32; data E2M1x2 [M][K]; scale E8M0 [M][K/32]).
// K % 32 == 0. The reference path from high precision.
void quantize_mxfp4(const TensorView& in, const ScaledTensor& out, Stream stream = nullptr);

// FP8 row-wise (E4M3, Rowwise1x128 [M][K]) -> MXFP4 [M][K] directly. K % 128 == 0.
void fp8_to_mxfp4(const ScaledTensor& in, const ScaledTensor& out, Stream stream = nullptr);

// Element rounding of fp8_to_mxfp4. Default: RNE (the rule above). Stochastic: each element
// v / 2^X rounds to one of its two neighbouring E2M1 values, up with probability (distance from
// the lower one) / (gap), by fmt::e2m1_from_f32_sr with the random bits fmt::sr_bits(seed,
// r * K + k) of element (r, k): a pure function of (input, seed), the same bits on both backends,
// unbiased per element except where v / 2^X is clipped to 6 (the block's largest magnitudes in
// (6, 8) * 2^X, as under RNE). The shared exponents are RNE's. For tensors that only feed
// weight-gradient GEMMs, where rounding bias accumulates over tokens (MoEConfig::mxfp4_stochastic:
// the layer's saved activations).
struct Mxfp4Rounding {
  bool stochastic = false;
  uint64_t seed = 0;
};
void fp8_to_mxfp4(const ScaledTensor& in, const ScaledTensor& out, const Mxfp4Rounding& rounding,
                  Stream stream = nullptr);

// MXFP4 [M][K] -> FP8 row-wise (E4M3, Rowwise1x128 [M][K], scale [K/128][M]) directly.
// K % 128 == 0.
void mxfp4_to_fp8(const ScaledTensor& in, const ScaledTensor& out, Stream stream = nullptr);

// MXFP4 row-wise [M][K] -> FP8 column-wise, stored transposed: out_t E4M3 Rowwise1x128
// [K][M], scale [tiles][K], tiles restarting at each group of out_t.col_groups (m_splits).
// K % 128 == 0. Equals quantize_transposed(dequantize(in)) bit for bit.
void mxfp4_to_fp8_transposed(const ScaledTensor& in, const ScaledTensor& out_t,
                             Stream stream = nullptr);

}  // namespace fp8flow
