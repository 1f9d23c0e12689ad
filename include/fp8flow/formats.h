// fp8flow number formats: encode/decode for E4M3, E5M2, E2M1 (FP4), E8M0, BF16 and the power-of-two
// scale rules, written once for host and device. Every quantizer, converter and reference in the
// library rounds through these functions, which is what makes GPU == CPU bit for bit.
//
// Rounding: round-to-nearest, ties to even, on the exact binary value (no double rounding: every
// narrow format here is exactly representable in FP32). Saturating: a finite input never becomes
// NaN or Inf in E4M3/E5M2/E2M1; it clamps to the largest finite magnitude. Non-finite inputs:
//   E4M3: NaN and +-Inf -> NaN (0x7F | sign), as PyTorch and ml_dtypes do (the format has no Inf).
//   E5M2: NaN -> 0x7F | sign, +-Inf -> +-Inf (0x7C | sign).
//   E2M1: no Inf/NaN in the format. +-Inf saturates to +-6, NaN -> +0. MX blocks carry NaN in their
//         E8M0 scale (0xFF) instead; see mx_block_nan below.
//   E8M0: the sign is ignored; NaN/Inf -> 0xFF (NaN); zero and values below 2^-127 -> 0x00
//         (2^-127); values past 2^127 saturate to 0xFE.
// Sign of zero is kept (-0.0 -> 0x80 in E4M3/E5M2, 0x8 in E2M1).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FP8FLOW_HD __host__ __device__ __forceinline__
#else
#define FP8FLOW_HD inline
#endif

namespace fp8flow::fmt {

// ---------------------------------------------------------------------------------------------
// Bit casts and exact powers of two.
FP8FLOW_HD uint32_t f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

FP8FLOW_HD float f32_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

FP8FLOW_HD bool f32_is_nan(float f) {
  return (f32_bits(f) & 0x7FFFFFFFu) > 0x7F800000u;
}
FP8FLOW_HD bool f32_is_finite(float f) {
  return (f32_bits(f) & 0x7F800000u) != 0x7F800000u;
}
FP8FLOW_HD float f32_abs(float f) {
  return f32_from_bits(f32_bits(f) & 0x7FFFFFFFu);
}

// Exactly 2^e as FP32: normal for e in [-126, 127], subnormal for e in [-149, -127], 0 below.
FP8FLOW_HD float exp2i(int e) {
  if (e > 127) return f32_from_bits(0x7F800000u);
  if (e >= -126) return f32_from_bits(static_cast<uint32_t>(e + 127) << 23);
  if (e >= -149) return f32_from_bits(1u << (e + 149));
  return 0.0f;
}

// Exponent of a positive power-of-two FP32 (normal or subnormal). Other values: floor(log2(|s|)).
FP8FLOW_HD int pow2_exponent(float s) {
  const uint32_t u = f32_bits(s) & 0x7FFFFFFFu;
  const int field = static_cast<int>(u >> 23);
  if (field != 0) return field - 127;
  if (u == 0) return -150;
  int msb = 31;
  while (!((u >> msb) & 1u)) --msb;
  return msb - 149;
}

// ---------------------------------------------------------------------------------------------
// Generic minifloat encoder: magnitude of a finite, non-negative FP32 (given as bits) to a code of
// kE exponent bits, kM mantissa bits and bias kBias, round-to-nearest-even. The result can exceed
// the format's largest finite code (overflow); callers saturate.
template <int kE, int kM, int kBias>
FP8FLOW_HD uint32_t encode_magnitude_rne(uint32_t abs_bits) {
  if (abs_bits < 0x00800000u) return 0;  // FP32 zero/subnormal: far below any code here
  const int exp = static_cast<int>(abs_bits >> 23) - 127;
  const uint32_t sig = (abs_bits & 0x7FFFFFu) | 0x800000u;  // value = sig * 2^(exp - 23)
  constexpr int kMinExp = 1 - kBias;
  const bool normal = exp >= kMinExp;
  const int shift = normal ? 23 - kM : 23 - kM + (kMinExp - exp);
  if (shift >= 25) return 0;  // below half the smallest subnormal
  uint32_t q = sig >> shift;
  const uint32_t rem = sig & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1);
  if (rem > half || (rem == half && (q & 1u))) ++q;
  if (!normal) return q;  // q == 1 << kM is the smallest normal: correct as a code
  return (static_cast<uint32_t>(exp + kBias) << kM) + (q - (1u << kM));
}

template <int kE, int kM, int kBias>
FP8FLOW_HD float decode_minifloat(uint32_t mag_code) {
  const uint32_t e = (mag_code >> kM) & ((1u << kE) - 1u);
  const uint32_t m = mag_code & ((1u << kM) - 1u);
  if (e == 0) return static_cast<float>(m) * exp2i(1 - kBias - kM);
  return static_cast<float>((1u << kM) | m) * exp2i(static_cast<int>(e) - kBias - kM);
}

// ---------------------------------------------------------------------------------------------
// E4M3 (fn): bias 7, max 448 (0x7E), NaN 0x7F/0xFF, no Inf.
constexpr float kE4M3Max = 448.0f;
constexpr int kE4M3MaxExp = 8;  // 448 = 1.75 * 2^8

FP8FLOW_HD uint8_t e4m3_from_f32(float x) {
  const uint32_t u = f32_bits(x);
  const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80u);
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a >= 0x7F800000u) return sign | 0x7F;  // NaN, Inf
  uint32_t c = encode_magnitude_rne<4, 3, 7>(a);
  if (c > 0x7Eu) c = 0x7Eu;
  return sign | static_cast<uint8_t>(c);
}

FP8FLOW_HD float e4m3_to_f32(uint8_t code) {
  const uint32_t mag = code & 0x7Fu;
  if (mag == 0x7Fu) return f32_from_bits(0x7FC00000u | (static_cast<uint32_t>(code & 0x80u) << 24));
  const float v = decode_minifloat<4, 3, 7>(mag);
  return (code & 0x80u) ? -v : v;
}

FP8FLOW_HD bool e4m3_is_nan(uint8_t code) {
  return (code & 0x7Fu) == 0x7Fu;
}

// ---------------------------------------------------------------------------------------------
// E5M2: bias 15, max 57344 (0x7B), Inf 0x7C, NaN 0x7D-0x7F.
constexpr float kE5M2Max = 57344.0f;
constexpr int kE5M2MaxExp = 15;  // 57344 = 1.75 * 2^15

FP8FLOW_HD uint8_t e5m2_from_f32(float x) {
  const uint32_t u = f32_bits(x);
  const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80u);
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return sign | 0x7F;
  if (a == 0x7F800000u) return sign | 0x7C;
  uint32_t c = encode_magnitude_rne<5, 2, 15>(a);
  if (c > 0x7Bu) c = 0x7Bu;
  return sign | static_cast<uint8_t>(c);
}

FP8FLOW_HD float e5m2_to_f32(uint8_t code) {
  const uint32_t mag = code & 0x7Fu;
  const uint32_t sign = static_cast<uint32_t>(code & 0x80u) << 24;
  if (mag == 0x7Cu) return f32_from_bits(0x7F800000u | sign);
  if (mag > 0x7Cu) return f32_from_bits(0x7FC00000u | sign);
  const float v = decode_minifloat<5, 2, 15>(mag);
  return (code & 0x80u) ? -v : v;
}

// ---------------------------------------------------------------------------------------------
// E2M1 (4-bit code in the low nibble): bias 1, values +-{0, .5, 1, 1.5, 2, 3, 4, 6}.
constexpr float kE2M1Max = 6.0f;
constexpr int kE2M1MaxPow2 = 2;  // floor(log2(6)): the OCP "emax" of E2M1

FP8FLOW_HD uint8_t e2m1_from_f32(float x) {
  const uint32_t u = f32_bits(x);
  const uint8_t sign = static_cast<uint8_t>((u >> 28) & 0x8u);
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return 0;            // NaN -> +0 (MX blocks flag NaN in the scale)
  if (a == 0x7F800000u) return sign | 0x7;  // Inf saturates
  uint32_t c = encode_magnitude_rne<2, 1, 1>(a);
  if (c > 0x7u) c = 0x7u;
  return sign | static_cast<uint8_t>(c);
}

// E2M1 with stochastic rounding: |x| between neighbouring E2M1 magnitudes lo < hi becomes hi
// with probability (|x| - lo) / (hi - lo), decided by u, 24 uniform random bits (hi iff
// u < frac * 2^24, exact in FP32: frac has at most 24 significant bits). Values on the grid never
// move; over u the expectation is x (to 2^-24 of the step) for |x| <= 6. Saturates at 6 (a
// clipped value is biased); NaN -> +0 and Inf saturates, as e2m1_from_f32.
FP8FLOW_HD uint8_t e2m1_from_f32_sr(float x, uint32_t u) {
  const uint32_t b = f32_bits(x);
  const uint8_t sign = static_cast<uint8_t>((b >> 28) & 0x8u);
  const uint32_t a = b & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return 0;
  const float m = f32_from_bits(a);
  if (m >= kE2M1Max) return sign | 0x7;
  // Magnitude index i of lo and the fraction toward the next: steps of 0.5 below 2, 1 below 4, 2.
  float lo_pos, frac;
  uint32_t i;
  if (m < 2.0f) {
    lo_pos = static_cast<float>(static_cast<int>(m * 2.0f));  // m * 2 exact
    i = static_cast<uint32_t>(lo_pos);
    frac = m * 2.0f - lo_pos;
  } else if (m < 4.0f) {
    lo_pos = static_cast<float>(static_cast<int>(m - 2.0f));
    i = 4u + static_cast<uint32_t>(lo_pos);
    frac = (m - 2.0f) - lo_pos;
  } else {
    i = 6u;
    frac = (m - 4.0f) * 0.5f;
  }
  const bool up = static_cast<float>(u & 0xFFFFFFu) < frac * 16777216.0f;
  return sign | static_cast<uint8_t>(i + (up ? 1u : 0u));
}

// 24 uniform random bits for element `index` under `seed` (a SplitMix64-style mix: a fixed
// function of both, the same on host and device, so stochastic rounding is reproducible).
FP8FLOW_HD uint32_t sr_bits(uint64_t seed, uint64_t index) {
  uint64_t z = seed + (index + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<uint32_t>(z >> 40);
}

FP8FLOW_HD float e2m1_to_f32(uint8_t code) {
  const float v = decode_minifloat<2, 1, 1>(code & 0x7u);
  return (code & 0x8u) ? -v : v;
}

// Two E2M1 codes in one byte: the element with the lower index in bits 0-3 (PyTorch
// float4_e2m1fn_x2 and the OCP/MX convention).
FP8FLOW_HD uint8_t pack_e2m1x2(uint8_t first, uint8_t second) {
  return static_cast<uint8_t>((first & 0xFu) | ((second & 0xFu) << 4));
}
FP8FLOW_HD uint8_t e2m1x2_first(uint8_t b) {
  return b & 0xFu;
}
FP8FLOW_HD uint8_t e2m1x2_second(uint8_t b) {
  return b >> 4;
}

// ---------------------------------------------------------------------------------------------
// E8M0: value 2^(b - 127), 0xFF NaN. Encoding from an arbitrary FP32 rounds the significand to
// the nearest power of two (a mantissa of exactly 1.5 rounds up), the rule of PyTorch's
// float8_e8m0fnu cast; sign is ignored. Exact for powers of two, which is all fp8flow encodes.
constexpr int kE8M0Bias = 127;
constexpr uint8_t kE8M0NaN = 0xFF;

FP8FLOW_HD uint8_t e8m0_from_f32(float x) {
  const uint32_t u = f32_bits(x) & 0x7FFFFFFFu;
  uint32_t field = u >> 23;
  if (field == 0xFFu) return kE8M0NaN;
  const uint32_t guard = (u >> 22) & 1u;
  const uint32_t rest = u & 0x3FFFFFu;
  const uint32_t lsb = field > 0 ? 1u : 0u;
  if (guard && (rest || lsb)) ++field;
  if (field >= 0xFFu) return 0xFE;
  return static_cast<uint8_t>(field);
}

FP8FLOW_HD float e8m0_to_f32(uint8_t b) {
  if (b == kE8M0NaN) return f32_from_bits(0x7FC00000u);
  return exp2i(static_cast<int>(b) - kE8M0Bias);
}

FP8FLOW_HD uint8_t e8m0_from_exponent(int e) {
  return static_cast<uint8_t>(e + kE8M0Bias);
}
FP8FLOW_HD int e8m0_exponent(uint8_t b) {
  return static_cast<int>(b) - kE8M0Bias;
}

// ---------------------------------------------------------------------------------------------
// BF16 (stored as uint16): RNE from FP32, NaN stays NaN (quiet), overflow rounds to Inf (IEEE).
FP8FLOW_HD uint16_t bf16_from_f32(float x) {
  const uint32_t u = f32_bits(x);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  const uint32_t rounded = u + 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(rounded >> 16);
}
FP8FLOW_HD float bf16_to_f32(uint16_t h) {
  return f32_from_bits(static_cast<uint32_t>(h) << 16);
}

// ---------------------------------------------------------------------------------------------
// Scale rules.
constexpr int kMinScaleExp = -127;  // the E8M0 range: every scale fits an 8-bit exponent
constexpr int kMaxScaleExp = 127;

// Power-of-two scale exponent for a block with largest finite magnitude `amax`, for a format whose
// largest value is 1.75 * 2^max_exp (E4M3: 8, E5M2: 15): the smallest e with amax <= max * 2^e,
// i.e. e = ceil(log2(amax / max)), computed exactly on the bits. amax == 0 (or below 2^-126)
// gives kMinScaleExp: an all-zero tile gets the smallest scale, so it never raises a shared
// exponent chosen as a maximum over tiles.
FP8FLOW_HD int scale_exponent(float amax, int max_exp = kE4M3MaxExp) {
  const uint32_t a = f32_bits(amax) & 0x7FFFFFFFu;
  if (a < 0x00800000u) return kMinScaleExp;
  const int exp = static_cast<int>(a >> 23) - 127;
  const bool over_1p75 = (a & 0x7FFFFFu) > 0x600000u;  // significand > 1.75
  int e = exp - max_exp + (over_1p75 ? 1 : 0);
  if (e < kMinScaleExp) e = kMinScaleExp;
  if (e > kMaxScaleExp) e = kMaxScaleExp;
  return e;
}

// OCP MX shared exponent for a 32-block with largest finite magnitude amax (E2M1 elements):
// floor(log2(amax)) - 2, clamped to the E8M0 range; amax == 0 gives kMinScaleExp.
FP8FLOW_HD int mx_shared_exponent(float amax) {
  const uint32_t a = f32_bits(amax) & 0x7FFFFFFFu;
  if (a < 0x00800000u) return kMinScaleExp;
  int e = static_cast<int>(a >> 23) - 127 - kE2M1MaxPow2;
  if (e < kMinScaleExp) e = kMinScaleExp;
  if (e > kMaxScaleExp) e = kMaxScaleExp;
  return e;
}

// x * 2^d for an FP32 x (NaN and Inf pass through) and any int d, with a single rounding: exact
// whenever the result is a normal FP32 (the case for every scale application in fp8flow); a
// subnormal result is correctly rounded down to 2^-149; below that it is a signed zero; above the
// range, Inf.
FP8FLOW_HD float mul_pow2(float x, int d) {
  const uint32_t u = f32_bits(x);
  const int field = static_cast<int>((u >> 23) & 0xFFu);
  if (field == 0xFF) return x;  // NaN, Inf
  if (field != 0) {
    const int nf = field + d;
    if (nf >= 1 && nf <= 254)
      return f32_from_bits((u & 0x807FFFFFu) | (static_cast<uint32_t>(nf) << 23));
    if (nf > 254) return f32_from_bits((u & 0x80000000u) | 0x7F800000u);
    // Subnormal result: put x in [1, 2) (exact), then one multiply by a subnormal power of two.
    const int k = field - 127 + d;  // result = x1 * 2^k, k <= -127
    if (k < -149) return f32_from_bits(u & 0x80000000u);
    return f32_from_bits((u & 0x807FFFFFu) | (127u << 23)) * exp2i(k);
  }
  if (d > 127) return x * exp2i(127) * exp2i(d - 127 > 127 ? 127 : d - 127);  // subnormal x: exact
  return x * exp2i(d < -149 ? -150 : d);
}

// E4M3 code times 2^d, re-rounded to E4M3 (RNE to a subnormal or zero when it falls below the
// normal range, saturating above). Exact whenever the result stays in the normal range. NaN stays
// NaN. This is the element step of the scaling-aware transpose.
FP8FLOW_HD uint8_t e4m3_mul_pow2(uint8_t code, int d) {
  if (e4m3_is_nan(code) || (code & 0x7Fu) == 0) return code;
  if (d < -40) return code & 0x80u;  // |x| <= 448 * 2^-40 rounds to zero
  if (d > 40) d = 40;                // saturates either way
  return e4m3_from_f32(e4m3_to_f32(code) * exp2i(d));
}

}  // namespace fp8flow::fmt
