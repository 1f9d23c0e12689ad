// Block quantization to FP8 with power-of-two scales, and dequantization.
// Scale rule for every FP8 tile: s = 2^ceil(log2(amax / fmt_max)), q = RNE(x / s), saturating;
// amax is taken over the tile's finite elements, so one NaN/Inf element becomes a NaN code without
// poisoning the scale of its neighbours; an all-zero tile gets s = 2^-127 (fmt::scale_exponent).
// All ops here are deterministic (same inputs, same bits) and bit-exact between backends.
#pragma once

#include "fp8flow/types.h"

namespace fp8flow {

struct QuantizeOptions {};

// X [M][K] (F32 or BF16) -> FP8 (E4M3 or E5M2) with:
//   out.layout == Rowwise1x128: out.data [M][K], out.scale F32 [ceil(K/128)][M]  (activations)
//   out.layout == Block128x128: out.data [M][K], out.scale F32 [ceil(M/128)][ceil(K/128)] (weights)
// K % 16 == 0; M any. Partial tiles at the edges use the elements that exist.
void quantize(const TensorView& in, const ScaledTensor& out, const QuantizeOptions& = {},
              Stream stream = nullptr);

// X [M][K] -> the column-wise (128x1, along tokens) FP8 copy, stored transposed:
// out_t.data [K][M], out_t.layout == Rowwise1x128, out_t.scale F32 [tiles][K] where tiles counts
// 128-token tiles restarting at each group of out_t.col_groups (tokens per expert, sum M).
// K % 16 == 0, M any. This is the naive flow's way to make a wgrad operand (a second rounding of
// the BF16 values); fp8-flow uses transpose_scaled instead.
void quantize_transposed(const TensorView& in, const ScaledTensor& out_t,
                         const QuantizeOptions& = {}, Stream stream = nullptr);

// Both of the above from one read of X (what a TransformerEngine-style baseline does).
void quantize_both(const TensorView& in, const ScaledTensor& out, const ScaledTensor& out_t,
                   const QuantizeOptions& = {}, Stream stream = nullptr);

// Scaled tensor (any layout, FP8 or MXFP4) -> F32 or BF16 of the same storage shape.
void dequantize(const ScaledTensor& in, const TensorView& out, Stream stream = nullptr);

}  // namespace fp8flow
