// sm90_dequantize: scaled tensor -> F32/BF16 of the same storage shape, value = decode(code) *
// scale as one FP32 multiply (exactly ref::dequantize), BF16 through fmt::bf16_from_f32.
// Layouts: FP8 (E4M3/E5M2) Rowwise1x128 (column groups allowed) or Block128x128; MXFP4 Mx1x32.
//
// Vector kernel: a thread owns one 16-byte chunk of codes (16 FP8 or 32 E2M1 elements) in each
// of 4 rows (4 x 16 B loads in flight), writes 64/128 B (F32) or 32/64 B (BF16) per row with
// 16-byte stores. CTA = 256 threads as (lanes along the row) x (rows), sized to the row length.
// Scalar kernel (same math, one element per thread) for views whose rows are not 16-byte aligned,
// e.g. X^T [K][M] with M % 16 != 0.
// Napkin math: 32768 x 7168 E4M3 -> BF16: 235 MB + 470 MB = 705 MB, 0.24 ms at 3.0 TB/s.
// Bench: fp8flow-bench ops --op dequantize.
// NOTES: NaN results follow detail::dequant_value (kernels/dequant_value.h), the reference's rule.
#pragma once

#include <cstdint>
#include <type_traits>

#include "common/groups.h"
#include "fp8flow/formats.h"
#include "ops/quantize/kernels/dequant_value.h"

namespace fp8flow::sm90 {

enum class DqCodes : uint8_t { E4M3, E5M2, E2M1 };
enum class DqLayout : uint8_t { RowwiseUniform, RowwiseGrouped, Block, Mx };

struct DequantArgs {
  const uint8_t* in;
  int64_t in_pitch;  // bytes between rows of codes
  const void* scale;
  int64_t scale_ld;  // elements between scale rows
  void* out;
  int64_t out_ld;   // elements between output rows
  int32_t R, C;     // logical elements
  int32_t tiles_c;  // Block: ceil(C / 128)
  int32_t lanes_c;  // vector kernel: chunks per row; scalar kernel: C
  int32_t nb_c;     // CTAs along a row
};

namespace dq {

template <DqCodes kCodes>
__device__ __forceinline__ float decode(uint32_t code) {
  if constexpr (kCodes == DqCodes::E4M3)
    return fmt::e4m3_to_f32(static_cast<uint8_t>(code));
  else if constexpr (kCodes == DqCodes::E5M2)
    return fmt::e5m2_to_f32(static_cast<uint8_t>(code));
  else
    return fmt::e2m1_to_f32(static_cast<uint8_t>(code));
}

// 128-tile of column c of a grouped Rowwise1x128 tensor.
__device__ __forceinline__ int32_t tile_of_col(const detail::GroupTiles& g, int32_t c) {
  int lo = 0, hi = g.num_groups - 1;  // last group whose start <= c (skips empty groups)
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (g.col_start[mid] <= c)
      lo = mid;
    else
      hi = mid - 1;
  }
  return g.tile_start[lo] + ((c - g.col_start[lo]) >> 7);
}

// Layout-dependent kernel parameter: GroupTiles only where columns are grouped.
template <DqLayout kLayout>
using DqTilesParam =
    std::conditional_t<kLayout == DqLayout::RowwiseGrouped, detail::GroupTiles, int32_t>;

// Scale of element (r, c) as FP32.
template <DqLayout kLayout>
__device__ __forceinline__ float scale_at(const DequantArgs& a, const DqTilesParam<kLayout>& tp,
                                          int32_t r, int32_t c) {
  if constexpr (kLayout == DqLayout::Mx) {
    const uint8_t* s = static_cast<const uint8_t*>(a.scale);
    return fmt::e8m0_to_f32(s[static_cast<int64_t>(r) * a.scale_ld + (c >> 5)]);
  } else {
    const float* s = static_cast<const float*>(a.scale);
    int64_t idx;
    if constexpr (kLayout == DqLayout::Block)
      idx = static_cast<int64_t>(r >> 7) * a.scale_ld + (c >> 7);
    else if constexpr (kLayout == DqLayout::RowwiseUniform)
      idx = static_cast<int64_t>(c >> 7) * a.scale_ld + r;
    else
      idx = static_cast<int64_t>(tile_of_col(tp, c)) * a.scale_ld + r;
    return s[idx];
  }
}

template <typename Out>
__device__ __forceinline__ void store_one(Out* p, float v) {
  if constexpr (sizeof(Out) == 4)
    *p = v;
  else
    *p = fmt::bf16_from_f32(v);
}

// kN values to 16-byte-aligned p: F32 (kN / 4 stores) or BF16 (kN / 8 stores).
template <typename Out, int kN>
__device__ __forceinline__ void store_vec(Out* p, const float (&v)[kN]) {
  if constexpr (sizeof(Out) == 4) {
#pragma unroll
    for (int i = 0; i < kN; i += 4)
      *reinterpret_cast<float4*>(p + i) = make_float4(v[i], v[i + 1], v[i + 2], v[i + 3]);
  } else {
    uint32_t h[kN / 2];
#pragma unroll
    for (int i = 0; i < kN / 2; ++i)
      h[i] = fmt::bf16_from_f32(v[2 * i]) |
             (static_cast<uint32_t>(fmt::bf16_from_f32(v[2 * i + 1])) << 16);
#pragma unroll
    for (int i = 0; i < kN / 2; i += 4)
      *reinterpret_cast<uint4*>(p + 2 * i) = make_uint4(h[i], h[i + 1], h[i + 2], h[i + 3]);
  }
}

}  // namespace dq

constexpr int kDqThreads = 256;
constexpr int kDqRowsPerThread = 4;

// blockDim = (lanes, rows): lanes * rows == kDqThreads; each thread kDqRowsPerThread rows.
template <DqCodes kCodes, DqLayout kLayout, typename Out>
__global__ void __launch_bounds__(kDqThreads)
    sm90_dequantize_vec_kernel(const DequantArgs a,
                               const __grid_constant__ dq::DqTilesParam<kLayout> tp) {
  constexpr bool kMx = kCodes == DqCodes::E2M1;
  constexpr int kElems = kMx ? 32 : 16;  // elements per 16-byte chunk
  const int32_t bc = static_cast<int32_t>(blockIdx.x % static_cast<uint32_t>(a.nb_c));
  const int32_t br = static_cast<int32_t>(blockIdx.x / static_cast<uint32_t>(a.nb_c));
  const int32_t chunk = bc * static_cast<int32_t>(blockDim.x) + threadIdx.x;
  if (chunk >= a.lanes_c) return;
  const int32_t c0 = chunk * kElems;
  const int32_t rstep = blockDim.y;
  const int32_t rbase = br * rstep * kDqRowsPerThread + threadIdx.y;

  uint4 v[kDqRowsPerThread] = {};
#pragma unroll
  for (int i = 0; i < kDqRowsPerThread; ++i) {
    const int32_t r = rbase + i * rstep;
    if (r < a.R)
      v[i] = __ldcs(reinterpret_cast<const uint4*>(a.in + static_cast<int64_t>(r) * a.in_pitch +
                                                   (kMx ? c0 / 2 : c0)));
  }
  // One scale per (row, chunk) unless a grouped tile boundary falls inside the chunk.
  bool one_scale = true;
  if constexpr (kLayout == DqLayout::RowwiseGrouped)
    one_scale = dq::tile_of_col(tp, c0) == dq::tile_of_col(tp, c0 + kElems - 1);

#pragma unroll
  for (int i = 0; i < kDqRowsPerThread; ++i) {
    const int32_t r = rbase + i * rstep;
    if (r >= a.R) break;
    const uint32_t w[4] = {v[i].x, v[i].y, v[i].z, v[i].w};
    float s = dq::scale_at<kLayout>(a, tp, r, c0);
    float f[kElems];
#pragma unroll
    for (int e = 0; e < kElems; ++e) {
      uint32_t code;
      if constexpr (kMx)
        code = (w[e / 8] >> (4 * (e % 8))) & 0xFu;
      else
        code = (w[e / 4] >> (8 * (e % 4))) & 0xFFu;
      if constexpr (kLayout == DqLayout::RowwiseGrouped)
        if (!one_scale) s = dq::scale_at<kLayout>(a, tp, r, c0 + e);
      f[e] = detail::dequant_value(dq::decode<kCodes>(code), s);
    }
    dq::store_vec<Out, kElems>(static_cast<Out*>(a.out) + static_cast<int64_t>(r) * a.out_ld + c0,
                               f);
  }
}

// One element per thread; blockDim = (32, 8), CTA covers 32 columns x 8 rows.
template <DqCodes kCodes, DqLayout kLayout, typename Out>
__global__ void __launch_bounds__(kDqThreads)
    sm90_dequantize_scalar_kernel(const DequantArgs a,
                                  const __grid_constant__ dq::DqTilesParam<kLayout> tp) {
  const int32_t bc = static_cast<int32_t>(blockIdx.x % static_cast<uint32_t>(a.nb_c));
  const int32_t br = static_cast<int32_t>(blockIdx.x / static_cast<uint32_t>(a.nb_c));
  const int32_t c = bc * 32 + threadIdx.x;
  const int32_t r = br * 8 + threadIdx.y;
  if (c >= a.C || r >= a.R) return;
  uint32_t code;
  if constexpr (kCodes == DqCodes::E2M1) {
    const uint8_t b = a.in[static_cast<int64_t>(r) * a.in_pitch + c / 2];
    code = (c & 1) ? fmt::e2m1x2_second(b) : fmt::e2m1x2_first(b);
  } else {
    code = a.in[static_cast<int64_t>(r) * a.in_pitch + c];
  }
  const float v =
      detail::dequant_value(dq::decode<kCodes>(code), dq::scale_at<kLayout>(a, tp, r, c));
  dq::store_one(static_cast<Out*>(a.out) + static_cast<int64_t>(r) * a.out_ld + c, v);
}

}  // namespace fp8flow::sm90
