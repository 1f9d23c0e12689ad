// Scaling-aware transpose: row-wise (1x128) FP8 in, column-wise FP8 out, without leaving FP8.
// Every output element equals its input element exactly (value = code * scale), except elements
// that fall below E4M3's normal range at the new scale: those are rounded to nearest-even
// subnormals or zero, and counted. No BF16 round trip, hence no double quantization.
// Deterministic: same inputs, same bits and the same count.
#pragma once

#include "fp8flow/types.h"

namespace fp8flow {

enum class TransposeScalePolicy : uint8_t {
  // One exponent per 128x128 tile: the largest row exponent in it (the FP8-Flow paper). Exponents
  // only drop, never overflow.
  TileMax,
  // One exponent per column of each 128-token tile: the smallest power of two whose range holds
  // that column's largest value, i.e. exactly what quantizing the column directly would choose.
  // Never coarser than TileMax, so never more underflow. The default.
  ColumnTight,
};

struct TransposeOptions {
  TransposeScalePolicy policy = TransposeScalePolicy::ColumnTight;
  // Optional: receives the number of nonzero elements whose value changed (underflow), overwritten.
  // Same device as the tensors (device memory for Cuda, host memory for Cpu).
  int64_t* underflow_count = nullptr;
};

// in:  E4M3, Rowwise1x128, data [M][K], scale F32 [K/128][M] (powers of two), K % 128 == 0.
// out_t: E4M3, Rowwise1x128, data [K][M], scale F32 [tiles][K]; out_t.col_groups = tokens per
//   expert (m_splits, sum M, zeros allowed), so that no 128-token scale tile spans two experts.
void transpose_scaled(const ScaledTensor& in, const ScaledTensor& out_t,
                      const TransposeOptions& = {}, Stream stream = nullptr);

}  // namespace fp8flow
