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
// NOTES: hot path (FP8 codes, vector kernel). Decoding each code through fmt:: costs ~25
// instructions per element and made the kernel issue-bound (SM 95%, DRAM 55% on an H100). A
// 16-byte chunk whose codes hold no NaN code, with a scale s for which no product can be NaN
// (s finite; for E5M2, which has Inf codes, also s != 0), takes the hardware path instead:
// cvt.rn.f16x2.{e4m3x2,e5m2x2} (exact: every E4M3/E5M2 value is an FP16 value), cvt.f32.f16
// (exact), mul.rn.f32 by s (the reference's single FP32 rounding, no FTZ), and for BF16 out
// cvt.rn.bf16x2.f32 (RNE, overflow to Inf, like fmt::bf16_from_f32 on non-NaN inputs). No NaN can
// appear on that path, so the hardware's NaN encodings (cvt returns the canonical 0x7FFF,
// dropping the code's sign) never reach the output. Every other chunk, every MXFP4 chunk and the
// scalar kernel use the generic fmt:: path. About 3.5 instructions per element instead of ~30.
// tests/quantize/dequantize_fast_gpu_test.cpp checks all 256 codes of both formats times
// powers of two 2^-149..2^127 and special scales against the reference, on both paths.
// Build with -DFP8FLOW_DEQUANT_HW_CVT=0 to use fmt:: everywhere (slower, same bits).
#pragma once

#include <cstdint>
#include <type_traits>

#include "common/groups.h"
#include "fp8flow/formats.h"
#include "ops/quantize/kernels/dequant_value.h"

#ifndef FP8FLOW_DEQUANT_HW_CVT
#define FP8FLOW_DEQUANT_HW_CVT 1
#endif

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

// ---------------------------------------------------------------------------------------------
// Hardware path for FP8 codes (see NOTES at the top).

// True when one of the 16 codes in v is a NaN code (E4M3: |c| == 0x7F; E5M2: |c| > 0x7C). Per
// byte, (c & 0x7F) + k sets bit 7 exactly for those codes, and no carry crosses a byte.
template <DqCodes kCodes>
__device__ __forceinline__ bool has_nan_code(const uint4& v) {
  constexpr uint32_t k = kCodes == DqCodes::E4M3 ? 0x01010101u : 0x03030303u;
  const uint32_t m = ((v.x & 0x7F7F7F7Fu) + k) | ((v.y & 0x7F7F7F7Fu) + k) |
                     ((v.z & 0x7F7F7F7Fu) + k) | ((v.w & 0x7F7F7F7Fu) + k);
  return (m & 0x80808080u) != 0u;
}

// True when no non-NaN code times s is NaN: finite codes * finite s is finite or +-Inf
// (overflow); E5M2's +-Inf codes * 0 would be NaN. NaN s fails the compare.
template <DqCodes kCodes>
__device__ __forceinline__ bool scale_allows_hw(float s) {
  const bool finite = fabsf(s) <= 3.40282347e38f;
  if constexpr (kCodes == DqCodes::E5M2)
    return finite && s != 0.0f;
  else
    return finite;
}

// Four non-NaN codes (element 0 in the low byte) -> four exact FP32 values. cvt.rn.f16x2.e4m3x2
// d, a converts the low byte of a into the low half of d (PTX ISA; cuda_fp8.hpp's fallback for
// __nv_cvt_fp8x2_to_halfraw2 agrees), and mov.b32 {lo, hi} splits a word low half first.
template <DqCodes kCodes>
__device__ __forceinline__ void decode4_hw(uint32_t w, float& f0, float& f1, float& f2, float& f3) {
  uint32_t h01, h23;
  if constexpr (kCodes == DqCodes::E4M3)
    asm("{\n\t.reg .b16 lo, hi;\n\tmov.b32 {lo, hi}, %2;\n\t"
        "cvt.rn.f16x2.e4m3x2 %0, lo;\n\tcvt.rn.f16x2.e4m3x2 %1, hi;\n\t}"
        : "=r"(h01), "=r"(h23)
        : "r"(w));
  else
    asm("{\n\t.reg .b16 lo, hi;\n\tmov.b32 {lo, hi}, %2;\n\t"
        "cvt.rn.f16x2.e5m2x2 %0, lo;\n\tcvt.rn.f16x2.e5m2x2 %1, hi;\n\t}"
        : "=r"(h01), "=r"(h23)
        : "r"(w));
  asm("{\n\t.reg .b16 lo, hi;\n\tmov.b32 {lo, hi}, %2;\n\t"
      "cvt.f32.f16 %0, lo;\n\tcvt.f32.f16 %1, hi;\n\t}"
      : "=f"(f0), "=f"(f1)
      : "r"(h01));
  asm("{\n\t.reg .b16 lo, hi;\n\tmov.b32 {lo, hi}, %2;\n\t"
      "cvt.f32.f16 %0, lo;\n\tcvt.f32.f16 %1, hi;\n\t}"
      : "=f"(f2), "=f"(f3)
      : "r"(h23));
}

// x * s rounded once to nearest-even, subnormals kept (explicitly, whatever -ftz says).
__device__ __forceinline__ float mul_rn(float x, float s) {
  float y;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(y) : "f"(x), "f"(s));
  return y;
}

// 16 non-NaN codes times s (see scale_allows_hw) -> f[0..15], element 0 from the low byte of v.x.
template <DqCodes kCodes>
__device__ __forceinline__ void decode16_mul_hw(const uint4& v, float s, float (&f)[16]) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    decode4_hw<kCodes>(w[j], f[4 * j], f[4 * j + 1], f[4 * j + 2], f[4 * j + 3]);
#pragma unroll
    for (int e = 4 * j; e < 4 * j + 4; ++e) f[e] = mul_rn(f[e], s);
  }
}

// Two non-NaN FP32 values -> BF16 pair (lo in bits 0-15), RNE: fmt::bf16_from_f32 on each.
// cvt.rn.bf16x2.f32 d, a, b puts a in the upper half of d.
__device__ __forceinline__ uint32_t bf16x2_rn(float lo, float hi) {
  uint32_t d;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
  return d;
}

// store_vec for non-NaN values: BF16 through cvt.rn.bf16x2.f32.
template <typename Out, int kN>
__device__ __forceinline__ void store_vec_hw(Out* p, const float (&v)[kN]) {
  if constexpr (sizeof(Out) == 4) {
    store_vec<Out, kN>(p, v);
  } else {
    uint32_t h[kN / 2];
#pragma unroll
    for (int i = 0; i < kN / 2; ++i) h[i] = bf16x2_rn(v[2 * i], v[2 * i + 1]);
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
    float s = dq::scale_at<kLayout>(a, tp, r, c0);
    Out* const o = static_cast<Out*>(a.out) + static_cast<int64_t>(r) * a.out_ld + c0;
    if constexpr (!kMx && FP8FLOW_DEQUANT_HW_CVT) {
      if (one_scale && dq::scale_allows_hw<kCodes>(s) && !dq::has_nan_code<kCodes>(v[i])) {
        float f[kElems];
        dq::decode16_mul_hw<kCodes>(v[i], s, f);
        dq::store_vec_hw<Out, kElems>(o, f);
        continue;
      }
    }
    // Generic path: MXFP4, NaN codes, scales that can make NaN, a tile boundary inside the chunk.
    const uint32_t w[4] = {v[i].x, v[i].y, v[i].z, v[i].w};
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
    dq::store_vec<Out, kElems>(o, f);
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
