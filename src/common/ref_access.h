// CPU reference helpers: typed element access on views, shared by every <op>_ref.cpp.
#pragma once

#include <cstdint>

#include "fp8flow/formats.h"
#include "fp8flow/types.h"

namespace fp8flow::ref {

// Element (r, c) of an F32 or BF16 view as FP32.
inline float load_f32(const TensorView& t, int64_t r, int64_t c) {
  const int64_t i = r * t.stride() + c;
  if (t.dtype == DType::F32) return static_cast<const float*>(t.data)[i];
  return fmt::bf16_to_f32(static_cast<const uint16_t*>(t.data)[i]);
}

// Store FP32 into an F32 or BF16 view (BF16: RNE).
inline void store_f32(const TensorView& t, int64_t r, int64_t c, float v) {
  const int64_t i = r * t.stride() + c;
  if (t.dtype == DType::F32)
    static_cast<float*>(t.data)[i] = v;
  else
    static_cast<uint16_t*>(t.data)[i] = fmt::bf16_from_f32(v);
}

inline uint8_t& byte_at(const TensorView& t, int64_t r, int64_t c) {
  return static_cast<uint8_t*>(t.data)[r * t.stride() + c];
}

// E2M1 code (low nibble) of logical element (r, c) of a packed E2M1x2 view.
inline uint8_t load_e2m1(const TensorView& t, int64_t r, int64_t c) {
  const uint8_t b = static_cast<const uint8_t*>(t.data)[(r * t.stride() + c) / 2];
  return (c & 1) ? fmt::e2m1x2_second(b) : fmt::e2m1x2_first(b);
}
inline void store_e2m1(const TensorView& t, int64_t r, int64_t c, uint8_t code) {
  uint8_t& b = static_cast<uint8_t*>(t.data)[(r * t.stride() + c) / 2];
  b = (c & 1) ? static_cast<uint8_t>((b & 0x0F) | (code << 4))
              : static_cast<uint8_t>((b & 0xF0) | (code & 0x0F));
}

inline float& scale_at(const TensorView& s, int64_t r, int64_t c) {
  return static_cast<float*>(s.data)[r * s.stride() + c];
}

// FP8 encode/decode by dtype (E4M3 or E5M2) and the matching scale rule.
inline uint8_t fp8_encode(DType d, float x) {
  return d == DType::E4M3 ? fmt::e4m3_from_f32(x) : fmt::e5m2_from_f32(x);
}
inline float fp8_decode(DType d, uint8_t q) {
  return d == DType::E4M3 ? fmt::e4m3_to_f32(q) : fmt::e5m2_to_f32(q);
}
inline int fp8_max_exp(DType d) {
  return d == DType::E4M3 ? fmt::kE4M3MaxExp : fmt::kE5M2MaxExp;
}

// |x| if finite, else 0: amax is taken over finite elements only.
inline float finite_abs(float x) {
  return fmt::f32_is_finite(x) ? fmt::f32_abs(x) : 0.0f;
}

}  // namespace fp8flow::ref
