// Device vocabulary shared by the quantize kernels: 16-byte vector loads/stores, element access in
// a 16-byte vector of F32 or BF16, the FP8 encoders (hardware cvt for finite values, fmt:: for
// everything else) and a byte-row store that copes with any destination alignment.
//
// NOTES: bit-exactness against fp8flow::ref. The reference encodes fmt::e4m3_from_f32(mul_pow2(x,
// -e)). Device code keeps exactly that for any thread that holds a NaN or Inf ("slow" path). For
// finite inputs it uses cvt.rn.satfinite.{e4m3x2,e5m2x2}.f32, which rounds to nearest-even,
// handles subnormals and keeps the sign of zero, i.e. the same function on finite inputs; the
// satfinite clamp never triggers here since |x * 2^-e| <= max by the choice of e. fmt:: rounding
// costs ~25 instructions per element, which would make quantize_both issue-bound on an H100;
// cvt is one instruction per two elements. tests/quantize/quantize_gpu_test.cpp
// (EncodeSweep*) checks both encoders against fmt:: over every exponent and rounding pattern.
// Build with -DFP8FLOW_QUANTIZE_HW_CVT=0 to use fmt:: everywhere (slower, same bits).
//
// Also: for finite amax, e = scale_exponent(amax) <= 120 (amax < 2^128), so -e >= -120 and
// fmt::mul_pow2(x, -e) is the single multiply x * exp2i(-e); the fast path uses that form.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "fp8flow/formats.h"

#ifndef FP8FLOW_QUANTIZE_HW_CVT
#define FP8FLOW_QUANTIZE_HW_CVT 1
#endif

namespace fp8flow::sm90::dev {

// ---------------------------------------------------------------------------------------------
// Memory access. Inputs are read once: .cs (evict-first) keeps them from crowding L2.
__device__ __forceinline__ uint4 load16_stream(const void* p) {
  return __ldcs(static_cast<const uint4*>(p));
}
__device__ __forceinline__ void store16(void* p, uint4 v) {
  *static_cast<uint4*>(p) = v;
}
__device__ __forceinline__ void store8(void* p, uint2 v) {
  *static_cast<uint2*>(p) = v;
}
__device__ __forceinline__ void store4(void* p, uint32_t v) {
  *static_cast<uint32_t*>(p) = v;
}

// max that propagates NaN (PTX max.NaN), so one pass finds "all finite?" and amax together.
__device__ __forceinline__ float max_nan(float a, float b) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else  // host build of the device code (emulation checks): same semantics
  if (fmt::f32_is_nan(a) || fmt::f32_is_nan(b)) return fmt::f32_from_bits(0x7FFFFFFFu);
  return a > b ? a : b;
#endif
}
__device__ __forceinline__ uint32_t max_nan_bf16x2(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  uint32_t r;
  asm("max.NaN.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  return r;
#else
  uint32_t r = 0;
  for (int h = 0; h < 2; ++h) {
    const float x = fmt::bf16_to_f32(static_cast<uint16_t>(a >> (16 * h)));
    const float y = fmt::bf16_to_f32(static_cast<uint16_t>(b >> (16 * h)));
    const uint32_t m = fmt::f32_is_nan(x) || fmt::f32_is_nan(y) ? 0x7FFFu
                       : x > y                                  ? (a >> (16 * h)) & 0xFFFFu
                                                                : (b >> (16 * h)) & 0xFFFFu;
    r |= m << (16 * h);
  }
  return r;
#endif
}

// Input element types: float (F32) and uint16_t (BF16 bits). A 16-byte vector holds kVec of them.
// get() and get_t() return the same value; they are spelled differently so that the compiler
// does not keep 128 unpacked floats alive between the row-wise and the column-wise pass (it
// recomputes the one-instruction unpack instead). absmax() is the NaN-propagating max of |x| over
// the vector; colmax() folds |x| into per-channel maxima kept as Acc words.
template <typename In>
struct InVec;

template <>
struct InVec<float> {
  static constexpr int kVec = 4;
  using Acc = float;  // one channel per Acc
  static constexpr int kAcc = 4;
  __device__ __forceinline__ static uint32_t word(const uint4& v, int h) {
    return h == 0 ? v.x : h == 1 ? v.y : h == 2 ? v.z : v.w;
  }
  __device__ __forceinline__ static float get(const uint4& v, int i) {
    return __uint_as_float(word(v, i));
  }
  __device__ __forceinline__ static float get_t(const uint4& v, int i) { return get(v, i); }
  __device__ __forceinline__ static float absmax(const uint4& v) {
    return max_nan(max_nan(fabsf(get(v, 0)), fabsf(get(v, 1))),
                   max_nan(fabsf(get(v, 2)), fabsf(get(v, 3))));
  }
  __device__ __forceinline__ static void colmax(Acc (&acc)[kAcc], const uint4& v) {
#pragma unroll
    for (int h = 0; h < kAcc; ++h) acc[h] = max_nan(acc[h], fabsf(get(v, h)));
  }
  __device__ __forceinline__ static float acc_get(const Acc (&acc)[kAcc], int i) {
    return acc[i];
  }
};

template <>
struct InVec<uint16_t> {
  static constexpr int kVec = 8;
  using Acc = uint32_t;  // two channels (bf16x2) per Acc
  static constexpr int kAcc = 4;
  __device__ __forceinline__ static uint32_t word(const uint4& v, int h) {
    return h == 0 ? v.x : h == 1 ? v.y : h == 2 ? v.z : v.w;
  }
  __device__ __forceinline__ static float get(const uint4& v, int i) {
    const uint32_t w = word(v, i >> 1);
    return __uint_as_float((i & 1) ? (w & 0xFFFF0000u) : (w << 16));
  }
  __device__ __forceinline__ static float get_t(const uint4& v, int i) {
    return __uint_as_float(__byte_perm(word(v, i >> 1), 0u, (i & 1) ? 0x3244u : 0x1044u));
  }
  __device__ __forceinline__ static float absmax(const uint4& v) {
    const uint32_t m = max_nan_bf16x2(max_nan_bf16x2(v.x & 0x7FFF7FFFu, v.y & 0x7FFF7FFFu),
                                      max_nan_bf16x2(v.z & 0x7FFF7FFFu, v.w & 0x7FFF7FFFu));
    return max_nan(__uint_as_float(m << 16), __uint_as_float(m & 0xFFFF0000u));
  }
  __device__ __forceinline__ static void colmax(Acc (&acc)[kAcc], const uint4& v) {
#pragma unroll
    for (int h = 0; h < kAcc; ++h) acc[h] = max_nan_bf16x2(acc[h], word(v, h) & 0x7FFF7FFFu);
  }
  __device__ __forceinline__ static float acc_get(const Acc (&acc)[kAcc], int i) {
    return __uint_as_float((i & 1) ? (acc[i >> 1] & 0xFFFF0000u) : (acc[i >> 1] << 16));
  }
};

// ---------------------------------------------------------------------------------------------
// True when x is neither NaN nor Inf (false for NaN since the compare is unordered).
__device__ __forceinline__ bool finite_le_max(float x) {
  return fabsf(x) <= 3.40282347e38f;
}
// |x| if finite, else 0 (the reference's finite_abs).
__device__ __forceinline__ float finite_abs(float x) {
  return fmt::f32_is_finite(x) ? fabsf(x) : 0.0f;
}

// ---------------------------------------------------------------------------------------------
// FP8 formats as compile-time tags.
template <bool kE5M2>
struct Fp8 {
  static constexpr int kMaxExp = kE5M2 ? fmt::kE5M2MaxExp : fmt::kE4M3MaxExp;

  __device__ __forceinline__ static uint32_t encode_fmt(float y) {
    return kE5M2 ? fmt::e5m2_from_f32(y) : fmt::e4m3_from_f32(y);
  }
  // The reference's encoder: any input (NaN/Inf included), any scale exponent. A non-finite x is
  // encoded unscaled: the host's x * 2^d keeps a NaN's sign, a GPU multiply would not (it returns
  // the canonical NaN), and the codes only depend on the sign and the kind of non-finite.
  __device__ __forceinline__ static uint32_t encode_ref(float x, int e) {
    return fmt::f32_is_finite(x) ? encode_fmt(fmt::mul_pow2(x, -e)) : encode_nonfinite(x);
  }

  // Two FINITE already-scaled values -> two codes (a in bits 0-7, b in bits 8-15).
  __device__ __forceinline__ static uint32_t encode2_finite(float a, float b) {
#if FP8FLOW_QUANTIZE_HW_CVT && defined(__CUDA_ARCH__)
    uint16_t r;
    if constexpr (kE5M2) {
      asm("cvt.rn.satfinite.e5m2x2.f32 %0, %1, %2;" : "=h"(r) : "f"(b), "f"(a));
    } else {
      asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(b), "f"(a));
    }
    return r;
#else
    const uint32_t ca = kE5M2 ? fmt::e5m2_from_f32(a) : fmt::e4m3_from_f32(a);
    const uint32_t cb = kE5M2 ? fmt::e5m2_from_f32(b) : fmt::e4m3_from_f32(b);
    return ca | (cb << 8);
#endif
  }

  // Four finite values times f (= 2^-e, e <= 120) -> four codes, element 0 in the low byte.
  __device__ __forceinline__ static uint32_t encode4_fast(float a, float b, float c, float d,
                                                          float f) {
    return encode2_finite(a * f, b * f) | (encode2_finite(c * f, d * f) << 16);
  }
  // Code of a non-finite x. fmt:: maps NaN and Inf by sign and kind only (formats.h), so evaluate
  // it on the four representatives: constants after folding, where fmt::e4m3_from_f32(x) on an
  // unknown x would inline its whole rounding path.
  __device__ __forceinline__ static uint32_t encode_nonfinite(float x) {
    const bool neg = (fmt::f32_bits(x) >> 31) != 0;
    if (fmt::f32_is_nan(x))
      return neg ? encode_fmt(fmt::f32_from_bits(0xFFC00000u))
                 : encode_fmt(fmt::f32_from_bits(0x7FC00000u));
    return neg ? encode_fmt(fmt::f32_from_bits(0xFF800000u))
               : encode_fmt(fmt::f32_from_bits(0x7F800000u));
  }
  // Patch the codes of non-finite inputs into q (from encode4_fast, which only handles finite
  // ones).
  __device__ __forceinline__ static uint32_t fix_nonfinite4(uint32_t q, float a, float b, float c,
                                                            float d) {
    if (!fmt::f32_is_finite(a)) q = (q & 0xFFFFFF00u) | encode_nonfinite(a);
    if (!fmt::f32_is_finite(b)) q = (q & 0xFFFF00FFu) | (encode_nonfinite(b) << 8);
    if (!fmt::f32_is_finite(c)) q = (q & 0xFF00FFFFu) | (encode_nonfinite(c) << 16);
    if (!fmt::f32_is_finite(d)) q = (q & 0x00FFFFFFu) | (encode_nonfinite(d) << 24);
    return q;
  }
  // Same with the reference encoder (any values, any e).
  __device__ __forceinline__ static uint32_t encode4_ref(float a, float b, float c, float d,
                                                         int e) {
    return encode_ref(a, e) | (encode_ref(b, e) << 8) | (encode_ref(c, e) << 16) |
           (encode_ref(d, e) << 24);
  }
};

// Multiplier 2^-e for the fast path (e <= 120 there, so it is a normal FP32).
__device__ __forceinline__ float inv_scale(int e) {
  return fmt::exp2i(-e);
}

// ---------------------------------------------------------------------------------------------
// Store the first n (1..16) bytes of w[0..3] (byte i = byte i%4 of w[i/4]) at p, any alignment.
// 16 aligned bytes: one 16-byte store. Otherwise 4-byte words where possible, single bytes for the
// unaligned head and tail (a row of X^T [K][M] starts at k*M + m0, aligned only when M and the
// group offsets allow).
__device__ __forceinline__ void store_bytes16(uint8_t* p, const uint32_t (&w)[4], int n) {
  const uint32_t mis = static_cast<uint32_t>(reinterpret_cast<uintptr_t>(p)) & 15u;
  if (n == 16 && mis == 0) {
    store16(p, make_uint4(w[0], w[1], w[2], w[3]));
    return;
  }
  if (n == 16 && (mis & 3u) == 0) {
    store4(p, w[0]);
    store4(p + 4, w[1]);
    store4(p + 8, w[2]);
    store4(p + 12, w[3]);
    return;
  }
  if (n == 16) {
    // h head bytes (1..3) bring p + h to a 4-byte boundary; then 3 words, then 4 - h tail bytes.
    const uint32_t h = (4u - (mis & 3u)) & 3u;
    for (uint32_t i = 0; i < h; ++i) p[i] = static_cast<uint8_t>(w[0] >> (8 * i));
    const uint32_t sel = 0x3210u + 0x1111u * h;  // bytes h..h+3 of the pair {hi:lo}
    store4(p + h, __byte_perm(w[0], w[1], sel));
    store4(p + h + 4, __byte_perm(w[1], w[2], sel));
    store4(p + h + 8, __byte_perm(w[2], w[3], sel));
    for (uint32_t i = h + 12; i < 16; ++i) p[i] = static_cast<uint8_t>(w[3] >> (8 * (i - 12)));
    return;
  }
  // Partial chunk (the end of a token tile): bytes one by one.
  for (int i = 0; i < n; ++i) {
    const uint32_t word = i < 4 ? w[0] : i < 8 ? w[1] : i < 12 ? w[2] : w[3];
    p[i] = static_cast<uint8_t>(word >> (8 * (i & 3)));
  }
}

}  // namespace fp8flow::sm90::dev
