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

// exp(x) within ~2 ulp over the FP32 range; +Inf above 88.72, 0 below -103.97, NaN -> NaN.
// Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, degree-7 Taylor polynomial in Horner form
// (fma), scaled by 2^n with an exact exponent shift.
FP8FLOW_HD float exp(float x) {
  if (x != x) return x;
  if (x > 88.72283f) return fmt::f32_from_bits(0x7F800000u);
  if (x < -103.97208f) return 0.0f;
  const float n = rintf(mul(x, 1.44269504f));
  float r = fma(n, -0.693145752f, x);  // ln2 high part (exact product for |n| < 2^11)
  r = fma(n, -1.42860677e-6f, r);      // ln2 low part
  float p = 1.98412698e-4f;            // 1/7!
  p = fma(p, r, 1.38888889e-3f);       // 1/6!
  p = fma(p, r, 8.33333333e-3f);       // 1/5!
  p = fma(p, r, 4.16666667e-2f);       // 1/4!
  p = fma(p, r, 1.66666667e-1f);       // 1/3!
  p = fma(p, r, 0.5f);
  p = fma(p, r, 1.0f);
  p = fma(p, r, 1.0f);
  return fmt::mul_pow2(p, static_cast<int>(n));
}

// 1 / (1 + exp(-x)).
FP8FLOW_HD float sigmoid(float x) {
  return div(1.0f, add(1.0f, exp(-x)));
}

// x * sigmoid(x).
FP8FLOW_HD float silu(float x) {
  return mul(x, sigmoid(x));
}

}  // namespace fp8flow::hd
