// CPU reference backend of quantize / quantize_transposed / dequantize: the definition the CUDA
// kernels are tested against, bit for bit. Plain loops, written for reading, not speed.
#include <algorithm>

#include "common/groups.h"
#include "common/ref_access.h"
#include "ops/quantize/kernels/dequant_value.h"
#include "ops/quantize/quantize_backends.h"

namespace fp8flow::ref {

void quantize(const TensorView& in, const ScaledTensor& out) {
  const DType od = out.data.dtype;
  const int max_exp = fp8_max_exp(od);
  const int64_t M = in.rows, K = in.cols;
  const bool block = out.layout == ScaleLayout::Block128x128;
  for (int64_t r0 = 0; r0 < M; r0 += block ? 128 : 1) {
    const int64_t r1 = std::min(M, r0 + (block ? 128 : 1));
    for (int64_t k0 = 0; k0 < K; k0 += 128) {
      const int64_t k1 = std::min(K, k0 + 128);
      float amax = 0.f;
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t k = k0; k < k1; ++k) amax = std::max(amax, finite_abs(load_f32(in, r, k)));
      const int e = fmt::scale_exponent(amax, max_exp);
      if (block)
        scale_at(out.scale, r0 / 128, k0 / 128) = fmt::exp2i(e);
      else
        scale_at(out.scale, k0 / 128, r0) = fmt::exp2i(e);
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t k = k0; k < k1; ++k)
          byte_at(out.data, r, k) = fp8_encode(od, fmt::mul_pow2(load_f32(in, r, k), -e));
    }
  }
}

void quantize_transposed(const TensorView& in, const ScaledTensor& out_t) {
  const DType od = out_t.data.dtype;
  const int max_exp = fp8_max_exp(od);
  const int64_t M = in.rows, K = in.cols;
  const detail::GroupTiles g = detail::make_group_tiles(out_t.col_groups, M);
  for (int32_t t = 0; t < g.total_tiles; ++t) {
    int32_t m0, w;
    g.tile_cols(t, m0, w);
    for (int64_t k = 0; k < K; ++k) {
      float amax = 0.f;
      for (int64_t m = m0; m < m0 + w; ++m) amax = std::max(amax, finite_abs(load_f32(in, m, k)));
      const int e = fmt::scale_exponent(amax, max_exp);
      scale_at(out_t.scale, t, k) = fmt::exp2i(e);
      for (int64_t m = m0; m < m0 + w; ++m)
        byte_at(out_t.data, k, m) = fp8_encode(od, fmt::mul_pow2(load_f32(in, m, k), -e));
    }
  }
}

void dequantize(const ScaledTensor& in, const TensorView& out) {
  const int64_t R = in.data.rows, C = in.data.cols;
  const DType d = in.data.dtype;
  if (in.layout == ScaleLayout::Mx1x32) {
    const auto* s = static_cast<const uint8_t*>(in.scale.data);
    for (int64_t r = 0; r < R; ++r)
      for (int64_t c = 0; c < C; ++c) {
        const float sc = fmt::e8m0_to_f32(s[r * in.scale.stride() + c / 32]);
        store_f32(out, r, c, detail::dequant_value(fmt::e2m1_to_f32(load_e2m1(in.data, r, c)), sc));
      }
    return;
  }
  if (in.layout == ScaleLayout::Block128x128) {
    for (int64_t r = 0; r < R; ++r)
      for (int64_t c = 0; c < C; ++c)
        store_f32(out, r, c,
                  detail::dequant_value(fp8_decode(d, byte_at(in.data, r, c)),
                                        scale_at(in.scale, r / 128, c / 128)));
    return;
  }
  const detail::GroupTiles g = detail::make_group_tiles(in.col_groups, C);
  for (int32_t t = 0; t < g.total_tiles; ++t) {
    int32_t c0, w;
    g.tile_cols(t, c0, w);
    for (int64_t r = 0; r < R; ++r)
      for (int64_t c = c0; c < c0 + w; ++c)
        store_f32(
            out, r, c,
            detail::dequant_value(fp8_decode(d, byte_at(in.data, r, c)), scale_at(in.scale, t, r)));
  }
}

}  // namespace fp8flow::ref
