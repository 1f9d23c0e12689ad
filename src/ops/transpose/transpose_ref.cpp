// CPU reference backend of transpose_scaled: the definition the CUDA kernel is tested against, bit
// for bit. Plain loops over (token tile, 128-channel block, channel), using only fmt:: rounding.
#include <algorithm>

#include "common/groups.h"
#include "common/ref_access.h"
#include "ops/transpose/transpose_backends.h"

namespace fp8flow::ref {
namespace {

// Row exponent of a power-of-two scale, clamped to the E8M0 range [-127, 127] every fp8flow scale
// lies in (the clamp only touches out-of-contract scales; the kernel does the same).
int row_exponent(float s) {
  return std::clamp(fmt::pow2_exponent(s), fmt::kMinScaleExp, fmt::kMaxScaleExp);
}

}  // namespace

void transpose_scaled(const ScaledTensor& in, const ScaledTensor& out_t,
                      TransposeScalePolicy policy, int64_t* underflow_count) {
  const int64_t M = in.data.rows, K = in.data.cols;
  const detail::GroupTiles g = detail::make_group_tiles(out_t.col_groups, M);
  int64_t changed = 0;
  for (int32_t tile = 0; tile < g.total_tiles; ++tile) {
    int32_t m0, w;
    g.tile_cols(tile, m0, w);
    for (int64_t k0 = 0; k0 < K; k0 += 128) {
      // Row exponents of this (token tile, channel block) and the paper's tile exponent: their
      // max. All-zero rows have scale 2^-127, the floor, so they never raise it.
      int t[128];
      int tile_max = fmt::kMinScaleExp;
      for (int i = 0; i < w; ++i) {
        t[i] = row_exponent(scale_at(in.scale, k0 / 128, m0 + i));
        tile_max = std::max(tile_max, t[i]);
      }
      for (int64_t k = k0; k < k0 + 128; ++k) {
        int T = tile_max;
        if (policy == TransposeScalePolicy::ColumnTight) {
          // Smallest power of two whose range holds the column's largest value: the max over the
          // column's values (NaN and zero codes excluded) of t_m + scale_exponent(|code|).
          T = fmt::kMinScaleExp;
          for (int i = 0; i < w; ++i) {
            const uint8_t q = byte_at(in.data, m0 + i, k);
            if (fmt::e4m3_is_nan(q) || (q & 0x7F) == 0) continue;
            T = std::max(T, t[i] + fmt::scale_exponent(fmt::f32_abs(fmt::e4m3_to_f32(q))));
          }
        }
        scale_at(out_t.scale, tile, k) = fmt::exp2i(T);
        for (int i = 0; i < w; ++i) {
          const uint8_t q = byte_at(in.data, m0 + i, k);
          const uint8_t r = fmt::e4m3_mul_pow2(q, t[i] - T);
          byte_at(out_t.data, k, m0 + i) = r;
          if (fmt::e4m3_is_nan(q) || (q & 0x7F) == 0) continue;
          // Exact comparison of the represented values (both are >= 2^-136 or zero: no rounding).
          if (fmt::mul_pow2(fmt::e4m3_to_f32(r), T) != fmt::mul_pow2(fmt::e4m3_to_f32(q), t[i]))
            ++changed;
        }
      }
    }
  }
  if (underflow_count) *underflow_count = changed;
}

}  // namespace fp8flow::ref
