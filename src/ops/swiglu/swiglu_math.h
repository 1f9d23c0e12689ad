// The element math of the SwiGLU ops, __host__ __device__, written once: the CPU reference and the
// kernels call these same functions, so GPU == CPU bit for bit is a property of one definition.
// Every FP32 operation goes through hd:: (no contraction, no reordering); see include/fp8flow/
// swiglu.h for the formulas and the dprob summation order.
#pragma once

#include <cstdint>

#include "common/hd_math.h"
#include "fp8flow/formats.h"

namespace fp8flow::swiglu_detail {

// Output element kinds. FP8 kinds are written with a per-1x128-tile power-of-two scale.
enum class OutKind : uint8_t { E4M3, E5M2, BF16 };

constexpr int kTile = 128;  // 1x128 scale tile
constexpr int kChunk = 8;   // columns per chunk (one 16-byte BF16 load)
constexpr int kLanes = 32;  // dprob partial sums (one per lane of the backward kernel's warp)

// NOTES: exp, sigmoid and silu here return exactly the bits of hd::exp, hd::sigmoid and hd::silu
// (src/common/hd_math.h) for every input, but are written without data-dependent branches, which
// cost a memory-bound kernel issue slots (and reconvergence) on every element: the range checks
// become selects, and the final scaling by 2^n becomes one multiply by a power of two built from
// bits (exact for normal results; for subnormal results the same single rounding hd::exp's
// fmt::mul_pow2 does). Checked against hd:: on a dense sample of all 2^32 inputs on the CPU
// (SwigluRef.BranchFreeSiluEqualsHd) and exhaustively on the GPU
// (SwigluGpu.BranchFreeSiluEqualsHdExhaustive). kBranchFree = false uses hd:: directly.
constexpr bool kBranchFree = true;

FP8FLOW_HD float exp(float x) {
  if constexpr (!kBranchFree) return hd::exp(x);
  // Same reduction and polynomial as hd::exp, on x clamped so that n stays a small integer (the
  // clamp changes nothing in hd::exp's range [-103.97208, 88.72283]; outside it, selects below).
  const float xc = x >= -104.0f ? (x <= 89.0f ? x : 89.0f) : -104.0f;  // NaN -> -104
  const float n = rintf(hd::mul(xc, 1.44269504f));
  const float q = hd::exp_poly(xc, n);
  // q * 2^n as fmt::mul_pow2 does it: q (positive, normal) = q1 * 2^(field - 127), q1 in [1, 2);
  // result = q1 * 2^k, k = field - 127 + n, with 2^k built from bits (Inf for k = 128, 0 below
  // 2^-149): one rounding, exact when the result is normal.
  const uint32_t u = fmt::f32_bits(q);
  const float q1 = fmt::f32_from_bits((u & 0x007FFFFFu) | (127u << 23));
  const int k = static_cast<int>(u >> 23) - 127 + static_cast<int>(n);
  const uint32_t pk =
      k >= -126 ? static_cast<uint32_t>(k + 127) << 23 : (k >= -149 ? 1u << (k + 149) : 0u);
  float res = hd::mul(q1, fmt::f32_from_bits(pk));
  res = x > 88.72283f ? fmt::f32_from_bits(0x7F800000u) : res;
  res = x < -103.97208f ? 0.0f : res;
  return x != x ? x : res;
}

FP8FLOW_HD float sigmoid(float x) {
  if constexpr (!kBranchFree) return hd::sigmoid(x);
  return hd::sigmoid_branch_free(x);
}

FP8FLOW_HD float silu(float x) {
  if constexpr (!kBranchFree) return hd::silu(x);
  return hd::mul(x, sigmoid(x));
}

// Forward: y = (silu(a) * b) * p.
FP8FLOW_HD float forward(float a, float b, float p) {
  return hd::mul(hd::mul(silu(a), b), p);
}

struct Grad {
  float da, db, dp;  // dp: this element's term of dprob, (dy * silu) * b
};

// Backward of one element whose s = sigmoid(a) is given (the backward kernel computes it through
// hd::sigmoid_fast where that applies).
FP8FLOW_HD Grad backward_with_sigmoid(float dy, float a, float b, float p, float s) {
  const float silu = hd::mul(a, s);
  const float dsilu = hd::mul(s, hd::add(1.0f, hd::mul(a, hd::sub(1.0f, s))));
  const float dya = hd::mul(dy, p);
  Grad g;
  g.da = hd::mul(hd::mul(dya, b), dsilu);
  g.db = hd::mul(dya, silu);
  g.dp = hd::mul(hd::mul(dy, silu), b);
  return g;
}

// Backward of one element.
FP8FLOW_HD Grad backward(float dy, float a, float b, float p) {
  return backward_with_sigmoid(dy, a, b, p, sigmoid(a));
}

// |y| when finite, else 0: the amax contribution of one result (a float compare, one instruction
// on the device; NaN compares false).
FP8FLOW_HD float amax_term(float y) {
  const float a = fmt::f32_abs(y);
  return a < fmt::f32_from_bits(0x7F800000u) ? a : 0.0f;
}

// max for amax: both operands are finite and >= 0 (amax_term), so plain comparison suffices.
FP8FLOW_HD float amax_max(float x, float y) {
  return x > y ? x : y;
}

template <OutKind K>
FP8FLOW_HD int scale_exponent(float amax) {
  return fmt::scale_exponent(amax, K == OutKind::E4M3 ? fmt::kE4M3MaxExp : fmt::kE5M2MaxExp);
}

// A tile's scale 2^e and its inverse 2^-e for e = scale_exponent<K>(amax), from amax's bits with
// a few integer ops and no branches, for the amaxes the kernels produce (finite, sign bit clear);
// equal bit for bit to fmt::exp2i(e) and fmt::exp2i(-e) there (swiglu_test.cpp sweeps every such
// bit pattern). Why it holds: exponent field + (significand > 1.75) is the field of bits +
// (2^23 - 0x600001) (the carry out of the significand), so e + 127 = max(f, max_exp) - max_exp
// with f = (bits + 0x1FFFFF) >> 23 <= 255: the lower clamp (-127, also every amax < 2^-126)
// is the max, the upper one (127) is never reached (e <= 255 - 127 - 8 = 120). 2^e is normal
// except 2^-127 (bits 0x400000), 2^-e always normal: (254 - (e + 127)) << 23.
struct ScalePair {
  float scale, inv;
};
template <OutKind K>
FP8FLOW_HD ScalePair scale_pair(float amax) {
  constexpr uint32_t kMaxExp = K == OutKind::E4M3 ? fmt::kE4M3MaxExp : fmt::kE5M2MaxExp;
  const uint32_t f = (fmt::f32_bits(amax) + 0x1FFFFFu) >> 23;
  const uint32_t sb = ((f > kMaxExp ? f : kMaxExp) - kMaxExp) << 23;  // (e + 127) << 23
  return {fmt::f32_from_bits(sb > 0x400000u ? sb : 0x400000u),
          fmt::f32_from_bits(0x7F000000u - sb)};
}

// How an FP8 output encodes NaN. Canonical: results of the SwiGLU math, whose NaN bits differ
// between the CPU's and the GPU's arithmetic, get the canonical NaN code 0x7F. AsQuantize: the
// saved FP8 copy of the BF16 input, whose NaNs have a definite sign, is encoded exactly as
// fp8flow::quantize encodes it (fmt::e4m3_from_f32 of the value: sign | 0x7F for NaN and +-Inf).
enum class NanCode : uint8_t { Canonical, AsQuantize };

// One FP8 code of value y in a tile of exponent e: RNE(y * 2^-e), saturating; the multiply by an
// exact power of two is a single IEEE rounding (== fmt::mul_pow2 for finite y, and keeps +-Inf).
// NaN: see NanCode.
template <OutKind K, NanCode N = NanCode::Canonical>
FP8FLOW_HD uint8_t encode_fp8(float y, float inv_scale) {
  if constexpr (N == NanCode::AsQuantize) {
    // fmt::mul_pow2 passes NaN and Inf through unchanged; encode them as they are.
    if (!fmt::f32_is_finite(y))
      return K == OutKind::E4M3 ? fmt::e4m3_from_f32(y) : fmt::e5m2_from_f32(y);
  } else if (fmt::f32_is_nan(y)) {
    return 0x7F;
  }
  const float v = hd::mul(y, inv_scale);
  return K == OutKind::E4M3 ? fmt::e4m3_from_f32(v) : fmt::e5m2_from_f32(v);
}

// BF16 of result y (RNE), NaN canonical.
FP8FLOW_HD uint16_t encode_bf16(float y) {
  return fmt::f32_is_nan(y) ? uint16_t{0x7FC0} : fmt::bf16_from_f32(y);
}

// F32 result with NaN canonical (dprob).
FP8FLOW_HD float canonical_f32(float y) {
  return fmt::f32_is_nan(y) ? fmt::f32_from_bits(0x7FC00000u) : y;
}

}  // namespace fp8flow::swiglu_detail
