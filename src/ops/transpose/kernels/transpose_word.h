// Host/device building blocks of the scaling-aware transpose kernel (kernels/transpose_1x128.cuh):
// row exponents, the per-code scale exponent, the shared-memory tile geometry and the 4x4 byte
// transpose. __host__ __device__ so that tests/transpose/transpose_word_test.cpp checks them on the
// CPU (against fmt::, exhaustively where the domain is small, and the swizzle for bank conflicts).
#pragma once

#include <cstdint>

#include "common/byte_perm.h"
#include "fp8flow/formats.h"

#if defined(__CUDACC__)
#define FP8FLOW_TW_UNROLL _Pragma("unroll")
#else
#define FP8FLOW_TW_UNROLL
#endif

namespace fp8flow::sm90::tw {

// PRMT with host semantics for the CPU tests (src/common/byte_perm.h).
using ::fp8flow::detail::byte_perm;

constexpr int kExpMin = fmt::kMinScaleExp;  // -127
constexpr int kExpMax = fmt::kMaxScaleExp;  // 127

// Row exponent of a power-of-two scale, clamped to [-127, 127] (the range of every scale fp8flow
// writes; the clamp only matters for out-of-contract scales and keeps the integer math bounded).
FP8FLOW_HD int row_exponent(float scale) {
  const int e = fmt::pow2_exponent(scale);
  return e < kExpMin ? kExpMin : (e > kExpMax ? kExpMax : e);
}

FP8FLOW_HD bool e4m3_mag_is_value(uint32_t mag) {
  return mag != 0 && mag != 0x7Fu;
}

// fmt::scale_exponent(|decode(code)|) for a nonzero, non-NaN E4M3 magnitude (1..126):
// normal codes E - 15 + (M == 7); subnormal M * 2^-9: -17 (M = 1), -16 (M = 2, 3), -15 (M >= 4).
FP8FLOW_HD int e4m3_mag_scale_exponent(uint32_t mag) {
  if (mag >= 8) return static_cast<int>((mag + 1) >> 3) - 15;
  return mag >= 4 ? -15 : (mag >= 2 ? -16 : -17);
}

// Transposes a 4x4 block of bytes: out[c] byte i = in[i] byte c (src/common/byte_perm.h).
using ::fp8flow::detail::transpose4x4;

// ---------------------------------------------------------------------------------------------
// Work order.

// ColumnTight's (token tile, channel block) pair number `pair` of ntiles x nkb pairs: channel
// blocks in groups of kb_group (>= 1; the last group may be short; kb_group >= nkb: channel block
// fastest over all), token tiles within a group, channel block fastest within a tile. A bijection
// onto [0, ntiles) x [0, nkb) (transpose_word_test).
FP8FLOW_HD void tight_pair(int pair, int ntiles, int nkb, int kb_group, int& tile, int& kb) {
  const int kg = kb_group < nkb ? kb_group : nkb, span = kg * ntiles, grp = pair / span;
  const int r = pair - grp * span, rest = nkb - grp * kg, gs = kg < rest ? kg : rest;
  tile = r / gs;
  kb = grp * kg + (r - tile * gs);
}

// ---------------------------------------------------------------------------------------------
// Tile geometry.

// 16-byte chunk slot (in words) of chunk c (0..7) of tile row r (0..127) in shared memory.
FP8FLOW_HD int tile_chunk_word(int r, int c) {
  return r * 32 + 4 * (c ^ ((r >> 4) & 7));
}
// Word index of row i (0..15) of thread (j, wd): token row 16j + i, channels 4wd..4wd+3.
FP8FLOW_HD int tile_thread_word(int j, int wd, int i) {
  return (16 * j + i) * 32 + (wd ^ (4 * j));
}
// Rows -> channels: z[c][g] holds tokens 4g..4g+3 of channel c.
FP8FLOW_HD void thread_transpose(const uint32_t (&x)[16], uint32_t (&z)[4][4]) {
  FP8FLOW_TW_UNROLL
  for (int g = 0; g < 4; ++g)
    transpose4x4(x[4 * g], x[4 * g + 1], x[4 * g + 2], x[4 * g + 3], z[0][g], z[1][g], z[2][g],
                 z[3][g]);
}

}  // namespace fp8flow::sm90::tw
