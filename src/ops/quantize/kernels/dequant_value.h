// The element rule of dequantize, shared by the CPU reference and the CUDA kernels (host and
// device): value = decode(code) * scale as one FP32 multiply, with NaN results made canonical.
// NOTES: a NaN from a multiply is not portable: an x86 mulss returns its NaN operand (or
// 0xFFC00000 for Inf * 0), a GPU FMUL returns 0x7FFFFFFF. So a NaN code keeps its decoded NaN
// (fmt:: gives 0x7FC00000 | sign), and any other NaN result (NaN scale, Inf * 0) becomes
// 0x7FC00000. Finite and infinite results are the IEEE product on both sides.
#pragma once

#include "fp8flow/formats.h"

namespace fp8flow::detail {

FP8FLOW_HD float dequant_value(float decoded, float scale) {
  if (fmt::f32_is_nan(decoded)) return decoded;
  const float y = decoded * scale;
  return fmt::f32_is_nan(y) ? fmt::f32_from_bits(0x7FC00000u) : y;
}

}  // namespace fp8flow::detail
