// Bit-reproducible FP32 math for host and device: the same operations in the same order with the
// same rounding on the CPU reference and in kernels, so fused compute ops (SwiGLU, router) can be
// tested GPU == CPU bit for bit. Device code uses the _rn intrinsics so nvcc cannot contract or
// reorder them; host code relies on -ffp-contract=off (set for the library) and std::fma.
#pragma once

#include <cmath>

#include "fp8flow/formats.h"

namespace fp8flow::hd {

FP8FLOW_HD float mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
FP8FLOW_HD float add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
FP8FLOW_HD float sub(float a, float b) {
  return add(a, -b);
}
FP8FLOW_HD float fma(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}
FP8FLOW_HD float div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
FP8FLOW_HD float max(float a, float b) {
  return a > b ? a : (b == b ? b : a);
}

// exp's reduction and polynomial: q with e^x = q * 2^n for n = rint(x log2 e): Cody-Waite
// reduction x = n ln2 + r (ln2 in a high part, exact in the product for |n| < 2^11, and a low
// part), then the degree-7 Taylor polynomial of e^r in Horner form (fma).
FP8FLOW_HD float exp_poly(float x, float n) {
  float r = fma(n, -0.693145752f, x);
  r = fma(n, -1.42860677e-6f, r);
  float q = 1.98412698e-4f;  // 1/7!
  q = fma(q, r, 1.38888889e-3f);
  q = fma(q, r, 8.33333333e-3f);
  q = fma(q, r, 4.16666667e-2f);
  q = fma(q, r, 1.66666667e-1f);
  q = fma(q, r, 0.5f);
  q = fma(q, r, 1.0f);
  return fma(q, r, 1.0f);
}

// exp(x) within ~2 ulp over the FP32 range; +Inf above 88.72, 0 below -103.97, NaN -> NaN.
// Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, degree-7 Taylor polynomial in Horner form
// (fma), scaled by 2^n with an exact exponent shift.
FP8FLOW_HD float exp(float x) {
  if (x != x) return x;
  if (x > 88.72283f) return fmt::f32_from_bits(0x7F800000u);
  if (x < -103.97208f) return 0.0f;
  const float n = rintf(mul(x, 1.44269504f));
  return fmt::mul_pow2(exp_poly(x, n), static_cast<int>(n));
}

// 1 / (1 + exp(-x)).
FP8FLOW_HD float sigmoid(float x) {
  return div(1.0f, add(1.0f, exp(-x)));
}

// x * sigmoid(x).
FP8FLOW_HD float silu(float x) {
  return mul(x, sigmoid(x));
}

// e^y for sigmoid's y = -x, cheaper than exp: hd::exp's reduction and polynomial on y clamped to
// [-86, 89]. In [-86, 88.72283] the result is normal (q in [0.7, 1.42] times 2^n, n in
// [-124, 128], and n = 128 only with q < 1 there), so the scaling is an integer add to the
// exponent field, exact as fmt::mul_pow2 is: hd::exp's bits. Below -86 hd::exp gives a value under
// e^-86 < 2^-124 (or 0) and so does this (e^-86): 1 + either rounds to 1, the same sigmoid. Above
// 88.72283 hd::exp is +Inf (a select here); NaN passes through. So sigmoid below returns
// hd::sigmoid's bits for every input (SwigluRef.BranchFreeSiluEqualsHd, and exhaustively on the
// GPU: SwigluGpu.BranchFreeSiluEqualsHdExhaustive), about 8 instructions fewer per element than
// through exp.
FP8FLOW_HD float exp_for_sigmoid(float y) {
  const float yc = y >= -86.0f ? (y <= 89.0f ? y : 89.0f) : -86.0f;  // NaN -> -86
  const float n = rintf(mul(yc, 1.44269504f));
  const float q = exp_poly(yc, n);
  float res =
      fmt::f32_from_bits(fmt::f32_bits(q) + (static_cast<uint32_t>(static_cast<int>(n)) << 23));
  res = y > 88.72283f ? fmt::f32_from_bits(0x7F800000u) : res;
  return y != y ? y : res;
}

// sigmoid's bits for every input without data-dependent branches (the SwiGLU and router kernels):
// see exp_for_sigmoid.
FP8FLOW_HD float sigmoid_branch_free(float x) {
  return div(1.0f, add(1.0f, exp_for_sigmoid(-x)));
}

// NOTES: sigmoid_fast is hd::sigmoid for x >= kSigmoidFastMinX (and any x > that, +Inf included),
// cheaper again than sigmoid_branch_free; the SwiGLU backward kernel uses it and takes
// sigmoid_branch_free for a chunk where some lane of the warp has an input below the bound (or
// -Inf). NaN x gives a finite value (not NaN): callers must not depend on it (the SwiGLU backward
// multiplies by x, so every result is NaN either way). Three changes against sigmoid_branch_free:
// - e^y only for y = -x <= 86.5: no upper clamp and no Inf or NaN selects.
// - rint(m) (|m| <= 125 here) as (m + 1.5 * 2^23) - 1.5 * 2^23: the sum lies in [2^23, 2^24),
//   where the spacing is 1, so its rounding is rint's (ties to even: 1.5 * 2^23 is even); its bits
//   are those of 1.5 * 2^23 plus n, and shifting them left by 23 leaves n << 23 (the bits of
//   1.5 * 2^23 shift out), the exponent-field add. No FRND and F2I (conversion pipe) per element.
//   rint gives -0 where this gives +0: r = fma(n, -ln2_hi, x) then differs only in the sign of a
//   zero, which the polynomial's q * r + c absorbs: the same q.
// - 1 / d for d = 1 + e^y in [1, 2^125.0] (e^86.5 < 2^124.8): hd::rcp_in_range, see there.
// Checked against hd::sigmoid on a dense sample on the CPU (SwigluRef.SigmoidFastEqualsHd, with
// the host's IEEE division) and exhaustively on the GPU (SwigluGpu.SigmoidFastEqualsHdExhaustive,
// which also checks hd::rcp_in_range against rcp.rn.f32 for every d in [1, 2^126)).
constexpr float kSigmoidFastMinX = -86.5f;

// e^y for y <= 86.5 (see sigmoid_fast): exp_for_sigmoid's bits there.
FP8FLOW_HD float exp_for_sigmoid_fast(float y) {
  constexpr float kRint = 12582912.0f;  // 1.5 * 2^23
  const float yc = fmaxf(y, -86.0f);    // NaN -> -86
  const float t = add(mul(yc, 1.44269504f), kRint);
  const float q = exp_poly(yc, sub(t, kRint));
  return fmt::f32_from_bits(fmt::f32_bits(q) + (fmt::f32_bits(t) << 23));
}

// 1 / d rounded to nearest even, for d in [1, 2^126) (other d: wrong results). On the device:
// MUFU.RCP, then one Newton step with two fma, which is how ptxas (CUDA 13, sm_90a) expands the
// IEEE-exact rcp.rn.f32 for every d whose exponent field is in [1, 252] (we read its SASS:
// MUFU.RCP r; FFMA e = d * r - 1; FADD.FTZ e = -e; FFMA r = r * e + r; outside that range a
// subroutine). Here e is never subnormal (d * r is within 2^-22 of 1 and a multiple of 2^-47, or
// exactly 1), so the FTZ negation is a plain one, folded into the last fma; what remains is the
// same operations on the same values, i.e. rcp.rn's result, without its range test and branch.
// SwigluGpu.SigmoidFastEqualsHdExhaustive compares it with rcp.rn.f32 for all such d.
FP8FLOW_HD float rcp_in_range(float d) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(d));
  const float e = fma(d, r, -1.0f);
  return fma(-e, r, r);
#else
  return 1.0f / d;
#endif
}

// hd::sigmoid's bits for x >= kSigmoidFastMinX, not NaN (see the NOTES above).
FP8FLOW_HD float sigmoid_fast(float x) {
  return rcp_in_range(add(1.0f, exp_for_sigmoid_fast(-x)));
}

}  // namespace fp8flow::hd
