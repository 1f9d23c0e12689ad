// Hardware conversions (F2FP) used on the kernels' fast path, two FP32 values per instruction.
// They must equal fmt:: (formats.h, the library's one definition of rounding) on every input they
// are given: finite FP32. swiglu_hw_cvt_mismatches (swiglu_sm90.cu) checks that exhaustively over
// all 2^32 bit patterns on the GPU (test SwigluGpu.HardwareCvtMatchesFormats); non-finite values
// never reach these (the kernels fall back to fmt:: for them, where the conventions differ:
// satfinite turns Inf into the largest finite code, and NaN bits are not fmt's).
#pragma once

#include <cstdint>

#include "ops/swiglu/swiglu_math.h"

namespace fp8flow::sm90::swiglu_kernels {

// NOTES: flip to false to build the kernels with fmt:: encoders only (about 20 more instructions
// per FP8 element; same results).
constexpr bool kHardwareCvt = true;

// Two FP8 codes, `lo` in bits 0-7 and `hi` in bits 8-15: RNE, saturating to the largest finite.
template <swiglu_detail::OutKind K>
__device__ __forceinline__ uint32_t hw_fp8x2(float lo, float hi) {
  uint16_t r;
  if constexpr (K == swiglu_detail::OutKind::E4M3)
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
  else
    asm("cvt.rn.satfinite.e5m2x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
  return r;
}

// Two BF16 values, `lo` in bits 0-15 and `hi` in bits 16-31: RNE (overflow to Inf).
__device__ __forceinline__ uint32_t hw_bf16x2(float lo, float hi) {
  uint32_t r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

}  // namespace fp8flow::sm90::swiglu_kernels
