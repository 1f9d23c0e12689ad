// Table-driven element steps of the MXFP4 kernels, host + device. No rounding is derived here:
// every table is filled on the host by the fmt:: functions, and the functions below only look codes
// up or count thresholds, several elements per 32-bit instruction.
// tests/mxfp4/mxfp4_tables_test.cpp checks exhaustively, over each step's whole domain, that it
// equals the fmt:: definition.
//
// NOTES: why tables. Hopper has no FP4 conversion instructions and the INT32 pipe runs at half the
// FP32 rate, so a generic per-element encode (~25 integer ops) would cap these kernels near 1 TB/s.
// Each step below costs 1-6 integer ops per element.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common/byte_perm.h"
#include "fp8flow/formats.h"

// Full unrolling on the device keeps small arrays in registers (no local memory).
#if defined(__CUDA_ARCH__)
#define FP8FLOW_MX_UNROLL _Pragma("unroll")
#else
#define FP8FLOW_MX_UNROLL
#endif

namespace fp8flow::sm90::mx {

// ---------------------------------------------------------------------------------------------
// Lane helpers: the device intrinsics, with host versions of the same semantics for the tests.

// __byte_perm, with host semantics for the CPU tests (src/common/byte_perm.h).
FP8FLOW_HD uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  return ::fp8flow::detail::byte_perm(a, b, sel);
}

// Unsigned 16x2 lane-wise max, and min(a + b, c) (DPX instructions on sm_90).
FP8FLOW_HD uint32_t vmax_u16x2(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  uint32_t r;
  asm("max.u16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  return r;
#else
  const uint32_t lo = (a & 0xFFFF) > (b & 0xFFFF) ? (a & 0xFFFF) : (b & 0xFFFF);
  const uint32_t hi = (a >> 16) > (b >> 16) ? (a >> 16) : (b >> 16);
  return lo | (hi << 16);
#endif
}
FP8FLOW_HD uint32_t vmax3_u16x2(uint32_t a, uint32_t b, uint32_t c) {
#if defined(__CUDA_ARCH__)
  return __vimax3_u16x2(a, b, c);
#else
  return vmax_u16x2(vmax_u16x2(a, b), c);
#endif
}
FP8FLOW_HD uint32_t vaddmin_u16x2(uint32_t a, uint32_t b, uint32_t c) {
#if defined(__CUDA_ARCH__)
  return __viaddmin_u16x2(a, b, c);
#else
  const uint32_t slo = ((a & 0xFFFF) + (b & 0xFFFF)) & 0xFFFF,
                 shi = ((a >> 16) + (b >> 16)) & 0xFFFF;
  const uint32_t lo = slo < (c & 0xFFFF) ? slo : (c & 0xFFFF);
  const uint32_t hi = shi < (c >> 16) ? shi : (c >> 16);
  return lo | (hi << 16);
#endif
}

// Unsigned 16x2 lane-wise max(a + b, c), the sum taken modulo 2^16 (one DPX instruction,
// VIADDMNMX, on sm_90).
FP8FLOW_HD uint32_t vaddmax_u16x2(uint32_t a, uint32_t b, uint32_t c) {
#if defined(__CUDA_ARCH__)
  return __viaddmax_u16x2(a, b, c);
#else
  const uint32_t slo = ((a & 0xFFFF) + (b & 0xFFFF)) & 0xFFFF,
                 shi = ((a >> 16) + (b >> 16)) & 0xFFFF;
  const uint32_t lo = slo > (c & 0xFFFF) ? slo : (c & 0xFFFF);
  const uint32_t hi = shi > (c >> 16) ? shi : (c >> 16);
  return lo | (hi << 16);
#endif
}

// Signed 16x2 lane-wise max(min(a + b, c), 0) (one DPX instruction, VIADDMNMX, on sm_90). Callers
// keep every lane's a + b inside the int16 range (the host version computes it exactly).
FP8FLOW_HD uint32_t vaddmin_relu_s16x2(uint32_t a, uint32_t b, uint32_t c) {
#if defined(__CUDA_ARCH__)
  return __viaddmin_s16x2_relu(a, b, c);
#else
  uint32_t r = 0;
  for (int s = 0; s < 32; s += 16) {
    const int32_t sum = static_cast<int16_t>(a >> s) + static_cast<int16_t>(b >> s);
    const int32_t m =
        std::max(std::min(sum, static_cast<int32_t>(static_cast<int16_t>(c >> s))), 0);
    r |= (static_cast<uint32_t>(m) & 0xFFFFu) << s;
  }
  return r;
#endif
}

// The FP32 value of FP16 bits h (exact; the host models below).
inline float f16_bits_to_f32(uint32_t h) {
  const uint32_t m = h & 0x7FFFu;
  const float v =
      m >= 0x7C00u ? (m == 0x7C00u ? INFINITY : NAN) : fmt::decode_minifloat<5, 10, 15>(m);
  return (h & 0x8000u) ? -v : v;
}

// FP16x2 lane-wise product, round to nearest even, subnormals kept (mul.rn.f16x2). The host
// version decodes both lanes, multiplies exactly (an FP16 x FP16 product fits an FP32) and rounds
// to FP16 with fmt's encoder (overflow to Inf, NaN canonical).
FP8FLOW_HD uint32_t hmul2_rn(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  uint32_t r;
  asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  return r;
#else
  uint32_t r = 0;
  for (int s = 0; s < 32; s += 16) {
    const float p = f16_bits_to_f32((a >> s) & 0xFFFFu) * f16_bits_to_f32((b >> s) & 0xFFFFu);
    const uint32_t u = fmt::f32_bits(p), abs = u & 0x7FFFFFFFu;
    uint32_t h = abs > 0x7F800000u    ? 0x7E00u
                 : abs == 0x7F800000u ? 0x7C00u
                                      : fmt::encode_magnitude_rne<5, 10, 15>(abs);
    if (h > 0x7C00u && abs <= 0x7F800000u) h = 0x7C00u;  // overflow rounds to Inf
    r |= (h | ((u >> 16) & 0x8000u)) << s;
  }
  return r;
#endif
}

// FP16x2 -> two E4M3 codes (byte 0 from the low lane), round to nearest even, finite values
// saturated to +-448, NaN to 0x7F (cvt.rn.satfinite.e4m3x2.f16x2).
FP8FLOW_HD uint32_t f16x2_to_e4m3x2(uint32_t a) {
#if defined(__CUDA_ARCH__)
  uint16_t r;
  asm("cvt.rn.satfinite.e4m3x2.f16x2 %0, %1;" : "=h"(r) : "r"(a));
  return r;
#else
  uint32_t r = 0;
  for (int s = 0; s < 2; ++s) {
    const uint32_t h = (a >> (16 * s)) & 0xFFFFu, m = h & 0x7FFFu;
    const uint32_t sign = (h >> 8) & 0x80u;
    const uint32_t c = m > 0x7C00u    ? 0x7Fu
                       : m == 0x7C00u ? (sign | 0x7Eu)
                                      : fmt::e4m3_from_f32(f16_bits_to_f32(h));
    r |= c << (8 * s);
  }
  return r;
#endif
}

// Largest of the 16 byte magnitudes (bits 0-6) of 4 words of E4M3 codes; 0x7F means a NaN code.
FP8FLOW_HD uint32_t max_e4m3_magnitude(uint32_t w0, uint32_t w1, uint32_t w2, uint32_t w3) {
  constexpr uint32_t kM = 0x007F007Fu;  // even bytes into 16-bit lanes, odd bytes likewise
  const uint32_t a = vmax3_u16x2(w0 & kM, (w0 >> 8) & kM, w1 & kM);
  const uint32_t b = vmax3_u16x2((w1 >> 8) & kM, w2 & kM, (w2 >> 8) & kM);
  const uint32_t c = vmax3_u16x2(w3 & kM, (w3 >> 8) & kM, vmax_u16x2(a, b));
  return (c & 0xFFFF) > (c >> 16) ? (c & 0xFFFF) : (c >> 16);
}

// Largest of the 32 nibble magnitudes (bits 0-2) of 4 words of packed E2M1 codes.
FP8FLOW_HD uint32_t max_e2m1_magnitude(uint32_t w0, uint32_t w1, uint32_t w2, uint32_t w3) {
  // Nibble-wise max of 3-bit values: bit 3 of (a | 8) - b is set iff a >= b (no borrow escapes).
  auto vmax_nib = [](uint32_t a, uint32_t b) {
    const uint32_t ge = (((a | 0x88888888u) - b) >> 3) & 0x11111111u;
    const uint32_t sel = ge * 0xFu;
    return (a & sel) | (b & ~sel);
  };
  constexpr uint32_t kMag = 0x77777777u;
  uint32_t m = vmax_nib(vmax_nib(w0 & kMag, w1 & kMag), vmax_nib(w2 & kMag, w3 & kMag));
  m = vmax_nib(m, m >> 16);
  m = vmax_nib(m, m >> 8);
  m = vmax_nib(m, m >> 4);
  return m & 0x7u;
}

// n / d for 0 <= n < 2^31 by a multiply-high and a shift (Granlund-Montgomery); d >= 1.
struct FastDiv {
  uint32_t d = 1, mul = 0, shift = 0;
  static FastDiv make(uint32_t d) {
    FastDiv f;
    f.d = d;
    while ((uint64_t{1} << f.shift) < d) ++f.shift;  // ceil(log2(d))
    f.mul = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << f.shift) - d)) / d + 1);
    return f;
  }
  FP8FLOW_HD uint32_t div(uint32_t n) const {
#if defined(__CUDA_ARCH__)
    const uint32_t hi = __umulhi(n, mul);
#else
    const uint32_t hi = static_cast<uint32_t>((static_cast<uint64_t>(n) * mul) >> 32);
#endif
    return (hi + n) >> shift;
  }
};

// ---------------------------------------------------------------------------------------------
// FP32 -> E2M1 magnitude (quantize_mxfp4). e2m1_from_f32 is nondecreasing in the bits of |y|, so
// its magnitude is #{j : bits >= th_j} for the seven smallest bit patterns th_j reaching j, found
// by binary search over fmt::e2m1_from_f32. Three compares (a binary search) per element.
struct E2m1Thresholds {
  uint32_t th[7];
};

inline E2m1Thresholds make_e2m1_thresholds() {
  E2m1Thresholds t{};
  for (uint32_t j = 1; j <= 7; ++j) {
    uint32_t lo = 0, hi = 0x7F800000u;  // code(hi) = 7 >= j (Inf saturates)
    while (lo < hi) {
      const uint32_t mid = lo + (hi - lo) / 2;
      if ((fmt::e2m1_from_f32(fmt::f32_from_bits(mid)) & 7u) >= j)
        hi = mid;
      else
        lo = mid + 1;
    }
    t.th[j - 1] = lo;
  }
  return t;
}

// E2M1 magnitude code of a finite |y| given as bits a.
FP8FLOW_HD uint32_t e2m1_magnitude_from_bits(uint32_t a, const uint32_t* th) {
  const bool b2 = a >= th[3];
  const bool b1 = a >= (b2 ? th[5] : th[1]);
  const bool b0 = a >= (b2 ? (b1 ? th[6] : th[4]) : (b1 ? th[2] : th[0]));
  return (b2 ? 4u : 0u) | (b1 ? 2u : 0u) | (b0 ? 1u : 0u);
}

// quantize_mxfp4 element: the E2M1 code of v in a block with exponent x, down = 2^-x (which makes
// v * down == fmt::mul_pow2(v, -x): -x is in [-125, 127] for a finite amax).
FP8FLOW_HD uint32_t quantize_e2m1(float v, float down, const uint32_t* th) {
  const uint32_t y = fmt::f32_bits(v * down);
  return e2m1_magnitude_from_bits(y & 0x7FFFFFFFu, th) | ((y >> 28) & 8u);
}

// ---------------------------------------------------------------------------------------------
// BF16 -> E2M1 magnitude, two elements per 32-bit word (quantize_mxfp4 from BF16).
//
// A BF16 v is FP32 bits b << 16. In a block with exponent x, the FP32 path encodes y = v * 2^-x
// by #{j : bits(|y|) >= th_j}. When y is a normal FP32, bits(|y|) = bits(|v|) - (x << 23), so
// bits(|y|) >= th_j  <=>  b >= ceil(th_j / 2^16) + (x << 7) =: T_j(x), a compare of 16-bit lanes;
// when y is below the normal range it is far below th_0 (0.25) and both sides are false. For
// x >= kBf16MinX every T_j(x) is a normal BF16 pattern in [0x81, 0x7F21], so a - T_j(x) + 1 stays
// in the int16 range for any finite magnitude a < 0x7F80, and
//   [a >= T_j(x)] = max(min(a + (1 - T_j(x)), 1), 0)     (one VIADDMNMX for both lanes).
// Blocks with x < kBf16MinX (amax < 2^-122) take quantize_e2m1.
constexpr int kBf16MinX = -124;

struct Bf16E2m1 {
  uint32_t base[7];  // 1 - ceil(th_j / 2^16), modulo 2^32
};

inline Bf16E2m1 make_bf16_e2m1(const E2m1Thresholds& t) {
  Bf16E2m1 b{};
  for (int j = 0; j < 7; ++j) b.base[j] = 1u - ((t.th[j] + 0xFFFFu) >> 16);
  return b;
}

// The seven lane-pair constants 1 - T_j(x), both 16-bit lanes, of a block with exponent x.
FP8FLOW_HD void bf16_e2m1_consts(const uint32_t* base, int x, uint32_t* cst) {
  for (int j = 0; j < 7; ++j) {
    const uint32_t c = base[j] - (static_cast<uint32_t>(x) << 7);
    cst[j] = prmt(c, c, 0x1010);
  }
}

// Two BF16 elements (word w: element 2i in the low half, 2i + 1 in the high half) of a finite block
// with exponent x >= kBf16MinX -> their E2M1 codes in the low byte (element 2i in the low nibble,
// as E2M1x2), sign bits included (-0 -> 0x8). Higher bytes are garbage.
FP8FLOW_HD uint32_t bf16x2_to_e2m1x2(uint32_t w, const uint32_t* cst) {
  const uint32_t a = w & 0x7FFF7FFFu;
  constexpr uint32_t kOne = 0x00010001u;
  const uint32_t n = ((w >> 12) & 0x00080008u) + vaddmin_relu_s16x2(a, cst[0], kOne) +
                     vaddmin_relu_s16x2(a, cst[1], kOne) + vaddmin_relu_s16x2(a, cst[2], kOne) +
                     vaddmin_relu_s16x2(a, cst[3], kOne) + vaddmin_relu_s16x2(a, cst[4], kOne) +
                     vaddmin_relu_s16x2(a, cst[5], kOne) + vaddmin_relu_s16x2(a, cst[6], kOne);
  return n | (n >> 12);
}

// Largest BF16 magnitude (bits) of 8 words (16 elements); >= 0x7F80 means a NaN or Inf.
FP8FLOW_HD uint32_t max_bf16_magnitude(const uint32_t* w) {
  constexpr uint32_t kM = 0x7FFF7FFFu;
  const uint32_t m =
      vmax_u16x2(vmax3_u16x2(w[0] & kM, w[1] & kM, w[2] & kM),
                 vmax3_u16x2(w[3] & kM, w[4] & kM, vmax3_u16x2(w[5] & kM, w[6] & kM, w[7] & kM)));
  return (m & 0xFFFFu) > (m >> 16) ? (m & 0xFFFFu) : (m >> 16);
}

// ---------------------------------------------------------------------------------------------
// E4M3 -> E2M1 (fp8_to_mxfp4).
//
// In a block with shared exponent X of a tile with FP8 scale 2^t, the element of E4M3 magnitude
// code m becomes the E2M1 magnitude G(m, d) = e2m1(e4m3(m) * 2^d), d = t - X. This is exact (no
// FP32 rounding anywhere) when 2^t is in [2^-140, 2^119], and then d lies in [kShiftMin,
// kShiftMax] for every block with a nonzero element (an all-zero block may get any d: clamp it).
// G is nondecreasing in m, so G(m, d) = #{j : m >= theta_j(d)}: seven thresholds per d, compared
// four bytes at a time.
struct E4m3ToE2m1 {
  static constexpr int kShiftMin = -13, kShiftMax = 11;
  static constexpr int kShifts = kShiftMax - kShiftMin + 1;
  static constexpr int kMinExactT = -140, kMaxExactT = 119;
  // theta[d - kShiftMin][j - 1] = theta_j(d) * 0x01010101 for j = 1..7; [7] = never (0x80).
  uint32_t theta[kShifts][8];
};

inline E4m3ToE2m1 make_e4m3_to_e2m1() {
  E4m3ToE2m1 t{};
  for (int d = E4m3ToE2m1::kShiftMin; d <= E4m3ToE2m1::kShiftMax; ++d) {
    uint32_t* th = t.theta[d - E4m3ToE2m1::kShiftMin];
    for (uint32_t j = 1; j <= 8; ++j) {
      uint32_t first = 0x80;  // smallest magnitude code reaching E2M1 magnitude j (0x80: none)
      for (uint32_t m = 0; m <= 0x7E && j <= 7; ++m) {
        const float y = fmt::mul_pow2(fmt::e4m3_to_f32(static_cast<uint8_t>(m)), d);
        if ((fmt::e2m1_from_f32(y) & 7u) >= j) {
          first = m;
          break;
        }
      }
      th[j - 1] = first * 0x01010101u;
    }
  }
  return t;
}

// The table applies to a tile whose FP32 scale s is 2^t exactly, t in [kMinExactT, kMaxExactT].
FP8FLOW_HD bool e4m3_scale_exact(float s, int& t) {
  t = fmt::pow2_exponent(s);
  return fmt::f32_bits(s) == fmt::f32_bits(fmt::exp2i(t)) && t >= E4m3ToE2m1::kMinExactT &&
         t <= E4m3ToE2m1::kMaxExactT;
}

// E2M1 magnitude counts (bits 0-2 of each byte) of four E4M3 codes; th = theta row.
FP8FLOW_HD uint32_t e2m1_count4(uint32_t q, const uint32_t* th) {
  const uint32_t wm = q | 0x80808080u;  // magnitude + 0x80: a byte-wise subtract cannot borrow
  // Bit 7 of each byte of s_j: magnitude >= theta_j. The flags are a thermometer code (nested), so
  // the count's bits are: bit 2 = s4, bit 1 = s2 & ~s4 | s6, bit 0 = parity of all seven.
  const uint32_t s1 = wm - th[0], s2 = wm - th[1], s3 = wm - th[2], s4 = wm - th[3];
  const uint32_t s5 = wm - th[4], s6 = wm - th[5], s7 = wm - th[6];
  const uint32_t b0 = s1 ^ s2 ^ s3 ^ s4 ^ s5 ^ s6 ^ s7;
  const uint32_t b1 = (s2 & ~s4) | s6;
  return ((b0 >> 7) & 0x01010101u) | ((b1 >> 6) & 0x02020202u) | ((s4 >> 5) & 0x04040404u);
}

// Eight E4M3 codes (elements 0-3 in w0, 4-7 in w1, memory order) -> eight E2M1 codes packed as
// E2M1x2 (element 2i in the low nibble of byte i).
FP8FLOW_HD uint32_t e4m3x8_to_e2m1x8(uint32_t w0, uint32_t w1, const uint32_t* th) {
  const uint32_t ev = prmt(w0, w1, 0x6420);                             // elements 0, 2, 4, 6
  const uint32_t od = prmt(w0, w1, 0x7531);                             // elements 1, 3, 5, 7
  const uint32_t ce = e2m1_count4(ev, th) | ((ev >> 4) & 0x08080808u);  // + sign
  const uint32_t co = e2m1_count4(od, th) | ((od >> 4) & 0x08080808u);
  return ce | (co << 4);
}

// ---------------------------------------------------------------------------------------------
// E2M1 -> E4M3 (mxfp4_to_fp8, mxfp4_to_fp8_transposed).
//
// An element of E2M1 code c in a block with exponent X, written at the FP8 tile exponent T,
// becomes H(c, D) = e4m3(e2m1(c) * 2^D), D = X - T. For blocks with X <= 125 every FP32 product is
// finite and exact, and D <= kShiftMax for every nonzero element; every D below kShiftMin gives
// (signed) zero, as kShiftMin does. Eight magnitudes per D: a __byte_perm table.
struct E2m1ToE4m3 {
  static constexpr int kShiftMin = -13, kShiftMax = 9;
  static constexpr int kShifts = kShiftMax - kShiftMin + 1;
  static constexpr int kMaxExactX = 125;
  // code[D - kShiftMin][i]: bytes 4i..4i+3 = H(c, D) for magnitudes c = 4i..4i+3 (positive).
  uint32_t code[kShifts][2];
};

inline E2m1ToE4m3 make_e2m1_to_e4m3() {
  E2m1ToE4m3 t{};
  for (int d = E2m1ToE4m3::kShiftMin; d <= E2m1ToE4m3::kShiftMax; ++d) {
    const int row = d - E2m1ToE4m3::kShiftMin;
    for (uint32_t c = 0; c < 8; ++c) {
      const float v = fmt::mul_pow2(fmt::e2m1_to_f32(static_cast<uint8_t>(c)), d);
      const uint8_t h = fmt::e4m3_from_f32(v);
      t.code[row][c / 4] |= static_cast<uint32_t>(h) << (8 * (c % 4));
    }
  }
  return t;
}

// Four packed E2M1 codes (the low 16 bits of nib4, element i in bits 4i..4i+3) -> four E4M3 codes
// (element i in byte i), with the table row (lo, hi) of their D.
FP8FLOW_HD uint32_t e2m1x4_to_e4m3x4(uint32_t nib4, uint32_t lo, uint32_t hi) {
  // Magnitude: the selector's 3 low bits per nibble index the table. Sign: shifted right by 3,
  // each selector's bit 0 is the element's sign, and bytes at odd indices of the second table
  // are 0x80.
  return prmt(lo, hi, nib4) | prmt(0x80008000u, 0x80008000u, nib4 >> 3);
}

// The same conversion through the FP16 unit, for elements that each have their own D (the
// transposed kernel: D = X_token - T_column). e2m1(c) 2^-6 is a normal FP16 whose low byte is zero
// (high bytes: kF16Hi*). Times the FP16 2^(D + 6) the product e2m1(c) 2^D is exact for D in
// [-20, 9] (smallest 2^-21, FP16 subnormals reach 2^-24; largest 6 * 2^9), and the hardware's
// E4M3 conversion rounds it exactly as fmt does. D < -20 gives the multiplier +0 (the exponent
// field clamps at 0): e2m1(c) 2^D < 2^-10 rounds to a signed zero either way. D > 9 clamps to
// 2^15: only zero elements have it under a column scale made from the column's maximum (a nonzero
// element e2m1(c) 2^X >= 2^(X-1) forces T >= X - 9), and 0 times a finite value is 0.
constexpr uint32_t kF16HiLo = 0x26242000u;  // c = 0..3: 0, 2^-7, 2^-6, 1.5 * 2^-6
constexpr uint32_t kF16HiHi = 0x2E2C2A28u;  // c = 4..7: 2^-5, 1.5 * 2^-5, 2^-4, 1.5 * 2^-4
constexpr uint32_t kF16ExpBias = 21;        // FP16 exponent field of 2^(D + 6) = D + 21
constexpr uint32_t kF16ExpMax = 30;         // the largest finite FP16 exponent field

// A token's 8 E2M1 codes (nibble j = column j) as the FP16 high bytes of e2m1(c) 2^-6 with the
// sign: h[0] byte j = column j, h[1] byte j = column 4 + j (one table lookup per 4 codes).
FP8FLOW_HD void e2m1x8_to_f16hi(uint32_t w, uint32_t h[2]) {
  const uint32_t m = w & 0x77777777u, ws = w << 4;  // ws: even nibbles' signs at bit 7 of a byte
  h[0] = prmt(kF16HiLo, kF16HiHi, m) | (prmt(w, ws, 0x1504u) & 0x80808080u);
  h[1] = prmt(kF16HiLo, kF16HiHi, m >> 16) | (prmt(w, ws, 0x3726u) & 0x80808080u);
}

// Selector of e2m1x8_to_f16hi's word for the column pair (2p, 2p + 1): FP16 high bytes of the
// pair in bits 8-15 and 24-31, zero low bytes.
FP8FLOW_HD uint32_t f16hi_pair_selector(int p) {
  return (p & 1) ? 0x3424u : 0x1404u;
}

// The operands of f16hi_pair_to_e4m3x2: X + kF16ExpBias in both 16-bit lanes for a token's block
// exponent X <= 125, and -T of two columns (lane 0: the first), T in the E8M0 range.
FP8FLOW_HD uint32_t f16_token_exp(int x) {
  return (static_cast<uint32_t>(x + static_cast<int>(kF16ExpBias)) & 0xFFFFu) * 0x00010001u;
}
FP8FLOW_HD uint32_t f16_column_exps(int t0, int t1) {
  return (static_cast<uint32_t>(-t0) & 0xFFFFu) | (static_cast<uint32_t>(-t1) << 16);
}

// The E4M3 codes of a token's elements in columns 2p and 2p + 1 (byte 0 and byte 1): hp is
// h[p / 2] of e2m1x8_to_f16hi, xb = f16_token_exp(X), nt = f16_column_exps(T_2p, T_2p+1).
FP8FLOW_HD uint32_t f16hi_pair_to_e4m3x2(uint32_t hp, int p, uint32_t xb, uint32_t nt) {
  const uint32_t v = prmt(hp, 0u, f16hi_pair_selector(p));  // e2m1(c) 2^-6, FP16x2
  const uint32_t e = vaddmin_relu_s16x2(xb, nt, kF16ExpMax * 0x00010001u) << 10;  // 2^(D + 6)
  return f16x2_to_e4m3x2(hmul2_rn(v, e));
}

// The same with byte adds, for tiles where every element has D = X - T in [-5, 22] (the transposed
// kernel's integer path). For D >= -5 a nonzero e2m1(c) 2^D (>= 2^-6) is a normal E4M3 value,
// exact (E2M1 has one mantissa bit), whose code is code(e2m1(c)) + 8 D. With a = D + 5 in [0,
// kIntMaxA] that is kIntBase[c] + 8 a, kIntBase[c] = code(e2m1(c)) - 40 in [8, 36]: every byte sum
// stays below 256 (36 + 216), so four codes take one 32-bit add without carries between bytes, and
// the zero codes are masked to +-0 after it. a splits into a token part and a column part: a = (X -
// X_lo) + (X_lo + 5 - T), each >= 0 where the tile allows the path (int_path_ok).
constexpr uint32_t kIntBaseLo = 0x14100800u;  // c = 0..3: -, 8 (0.5), 16 (1), 20 (1.5)
constexpr uint32_t kIntBaseHi = 0x24201C18u;  // c = 4..7: 24 (2), 28 (3), 32 (4), 36 (6)
constexpr uint32_t kIntNzLo = 0x7F7F7F00u;    // magnitude mask: 0 for c = 0
constexpr uint32_t kIntNzHi = 0x7F7F7F7Fu;
constexpr int kIntBias = 5;   // a = D + kIntBias
constexpr int kIntMaxA = 27;  // 8 * 27 + 36 < 256

// A token's 8 codes (nibble j = column j) -> E4M3 codes, out[0] byte j = column j, out[1] byte j =
// column 4 + j. xa = 8 (X - X_lo) in every byte; ca[h] byte j = 8 (X_lo + 5 - T) of column 4h + j.
FP8FLOW_HD void e2m1x8_to_e4m3_int(uint32_t w, uint32_t xa, const uint32_t ca[2], uint32_t out[2]) {
  const uint32_t m = w & 0x77777777u, mh = m >> 16, ws = w << 4;
  out[0] = ((prmt(kIntBaseLo, kIntBaseHi, m) + xa + ca[0]) & prmt(kIntNzLo, kIntNzHi, m)) |
           (prmt(w, ws, 0x1504u) & 0x80808080u);  // signs: bit 3 of each nibble to bit 7
  out[1] = ((prmt(kIntBaseLo, kIntBaseHi, mh) + xa + ca[1]) & prmt(kIntNzLo, kIntNzHi, mh)) |
           (prmt(w, ws, 0x3726u) & 0x80808080u);
}

// xa of token k (0..3) of the scale-byte word sbw; lo4 = sb_lo in every byte (sb >= sb_lo).
FP8FLOW_HD uint32_t int_token_addend(uint32_t sbw, int k, uint32_t lo4) {
  return (prmt(sbw, 0u, 0x1111u * static_cast<uint32_t>(k)) - lo4) * 8u;
}

// ca of four columns of scale exponents t[0..3]; xlo5 = X_lo + 5 (int_path_ok holds).
FP8FLOW_HD uint32_t int_column_addends(int xlo5, int t0, int t1, int t2, int t3) {
  const uint32_t d0 = static_cast<uint32_t>(xlo5 - t0), d1 = static_cast<uint32_t>(xlo5 - t1),
                 d2 = static_cast<uint32_t>(xlo5 - t2), d3 = static_cast<uint32_t>(xlo5 - t3);
  return 8u * (d0 | (d1 << 8) | (d2 << 16) | (d3 << 24));
}

// The integer path applies to a thread's 8 columns (scale exponents in [tmin, tmax]) and tokens
// with block exponents in [X_lo, X_lo + spread] when every a = X + 5 - T lies in [0, kIntMaxA].
FP8FLOW_HD bool int_path_ok(int xlo5, int spread, int tmin, int tmax) {
  return xlo5 - tmax >= 0 && xlo5 - tmin + spread <= kIntMaxA;
}

// ---------------------------------------------------------------------------------------------
// Column maxima of E2M1 values with per-token exponents (mxfp4_to_fp8_transposed).
//
// |e2m1(c)| for c = 1..7 is (1 or 1.5) * 2^g, so |e2m1(c)| * 2^X orders like the integer
// L = 2(X + g) + (mantissa 1.5 ? 1 : 0). The kernel keeps K = L + kKeyOffset in unsigned 16-bit
// lanes (0 = no nonzero element) and maxes them; key_to_amax turns the winner back into the value.
struct E2m1Key {
  static constexpr uint32_t kKeyOffset = 300;  // keys of X in [-127, 125] lie in [44, 555]
  static constexpr uint32_t kNoKey = 0;
  // byte c of (lo, hi): 0 for c = 0, else L(c, X=0) + 3 (in 1..8).
  uint32_t lo, hi;
  // The gap keys below: byte c of (glo, ghi) is 0 for c = 0, else kGapTable + byte c of (lo, hi).
  uint32_t glo, ghi;
};

// Gap keys (the transposed kernel's fast path). A token with scale byte sb keys its element of
// code c as 2 sb + G(c), G(0) = 0, G(c) = kGapTable + (byte c of lo, hi) in [248, 255]: for c != 0
// that is the key above plus kGapDelta (e2m1_key_base(sb - 127) = 2 sb + 43), for c = 0 just 2 sb.
// One add-and-max (VIADDMNMX) per two columns then folds a token in without masking its zeros.
// Exact for a tile whose bytes are all <= 252 and whose bytes > kGapIgnoreSb lie in [lo, lo +
// kGapMaxSpan]: every zero element's key 2 sb <= bmax = 2 sb_max, and every nonzero element of a
// token with sb > kGapIgnoreSb keys >= 2 lo + 248 > bmax, so a column holding one gets its true
// maximum key, above bmax. A column without one has at most nonzero elements of tokens with
// sb <= kGapIgnoreSb (|value| <= 6 * 2^(6 - 127) = 1.5 * 2^-119), whose scale clamps to 2^-127,
// which is also what any maximum <= bmax (read as no element) or above it (one of those) gives.
// (All-zero blocks, e.g. padding rows, have sb = 0 and so never narrow the span.)
constexpr uint32_t kGapTable = 247;
constexpr uint32_t kGapDelta = kGapTable + 2 * 127 + 3 - E2m1Key::kKeyOffset;  // 204
constexpr uint32_t kGapMaxSpan = 123;
constexpr uint32_t kGapIgnoreSb = 6;

// The tile test of the gap keys from the largest byte and the smallest byte > kGapIgnoreSb (255
// if none).
FP8FLOW_HD bool gap_keys_exact(uint32_t sb_max, uint32_t sb_min_counted) {
  return sb_max <= 252 && sb_max <= sb_min_counted + kGapMaxSpan;
}

inline E2m1Key make_e2m1_key() {
  E2m1Key k{};
  for (uint32_t c = 1; c < 8; ++c) {
    const uint32_t b = fmt::f32_bits(fmt::e2m1_to_f32(static_cast<uint8_t>(c)));
    const int g = static_cast<int>(b >> 23) - 127;
    const int l = 2 * g + ((b & 0x7FFFFFu) ? 1 : 0);
    const uint32_t byte = static_cast<uint32_t>(l + 3);
    const uint32_t gap = (kGapTable + byte) << (8 * (c % 4));
    if (c < 4) {
      k.lo |= byte << (8 * c);
      k.glo |= gap;
    } else {
      k.hi |= byte << (8 * (c - 4));
      k.ghi |= gap;
    }
  }
  return k;
}

// Key base of a token with block exponent X: key = base + byte (c != 0).
FP8FLOW_HD uint32_t e2m1_key_base(int x) {
  return static_cast<uint32_t>(2 * x + static_cast<int>(E2m1Key::kKeyOffset) - 3);
}

// The magnitude a key stands for (0 for kNoKey).
FP8FLOW_HD float key_to_amax(uint32_t key) {
  if (key == E2m1Key::kNoKey) return 0.0f;
  const int l = static_cast<int>(key) - static_cast<int>(E2m1Key::kKeyOffset);
  const int g = l >= 0 ? l / 2 : -((-l + 1) / 2);  // floor(l / 2)
  return fmt::mul_pow2((l - 2 * g) ? 1.5f : 1.0f, g);
}

// fmt::scale_exponent(key_to_amax(key)) without branches (the transposed kernel's column scales).
// A key stands for (1 or 1.5) * 2^g, g = floor((key - kKeyOffset) / 2): scale_exponent of that is
// g - 8 (no significand above 1.75), clamped to the E8M0 range, with g capped at 128 (where the
// value overflows to Inf, whose exponent field reads as 128); keys whose value is subnormal or
// zero clamp to kMinScaleExp like the no-key 0. Equal for every key in [0, 1024)
// (mxfp4_tables_test).
FP8FLOW_HD int key_scale_exponent(uint32_t key) {
  const int g = (static_cast<int>(key) - static_cast<int>(E2m1Key::kKeyOffset)) >> 1;  // floor
  const int e = (g < 128 ? g : 128) - fmt::kE4M3MaxExp;
  const int c =
      e < fmt::kMinScaleExp ? fmt::kMinScaleExp : (e > fmt::kMaxScaleExp ? fmt::kMaxScaleExp : e);
  return key == E2m1Key::kNoKey ? fmt::kMinScaleExp : c;
}

// ---------------------------------------------------------------------------------------------
// Block steps shared by the kernels and by the CPU tests that emulate them (the kernels add only
// indexing, shuffles and memory traffic).

// fp8_to_mxfp4, per half block (16 E4M3 codes in 4 words) of a tile with FP32 scale s. The key two
// threads combine with max: exact scale -> the largest magnitude code (0x7F = a NaN code);
// otherwise -> 0xFFFFFFFF if a value is not finite, else the bits of the largest |value|.
FP8FLOW_HD uint32_t fp8_half_key(const uint32_t w[4], float s, bool exact) {
  if (exact) return max_e4m3_magnitude(w[0], w[1], w[2], w[3]);
  uint32_t key = 0;
  FP8FLOW_MX_UNROLL
  for (int i = 0; i < 16; ++i) {
    const float v = fmt::e4m3_to_f32(static_cast<uint8_t>(w[i / 4] >> (8 * (i % 4)))) * s;
    if (!fmt::f32_is_finite(v)) return 0xFFFFFFFFu;
    const uint32_t a = fmt::f32_bits(fmt::f32_abs(v));
    key = a > key ? a : key;
  }
  return key;
}

// Shared exponent of the block from the combined key; false for a NaN block.
FP8FLOW_HD bool fp8_block_exponent(uint32_t key, float s, bool exact, int& x) {
  float amax;
  if (exact) {
    if (key == 0x7Fu) return false;
    amax = fmt::e4m3_to_f32(static_cast<uint8_t>(key)) * s;  // = the largest |value|, exactly
  } else {
    if (key == 0xFFFFFFFFu) return false;
    amax = fmt::f32_from_bits(key);
  }
  x = fmt::mx_shared_exponent(amax);
  return true;
}

// Theta row of the exact path (an all-zero block may produce any d; any row gives it zeros).
FP8FLOW_HD int fp8_theta_row(int t, int x) {
  const int r = t - x - E4m3ToE2m1::kShiftMin;
  return r < 0 ? 0 : (r >= E4m3ToE2m1::kShifts ? E4m3ToE2m1::kShifts - 1 : r);
}

// The two output words (16 E2M1 codes) of a half block. th: theta row (exact path only).
FP8FLOW_HD void fp8_half_encode(const uint32_t w[4], float s, bool exact, int x, const uint32_t* th,
                                uint32_t out[2]) {
  if (exact) {
    out[0] = e4m3x8_to_e2m1x8(w[0], w[1], th);
    out[1] = e4m3x8_to_e2m1x8(w[2], w[3], th);
    return;
  }
  out[0] = out[1] = 0;
  FP8FLOW_MX_UNROLL
  for (int i = 0; i < 16; ++i) {
    const float v = fmt::e4m3_to_f32(static_cast<uint8_t>(w[i / 4] >> (8 * (i % 4)))) * s;
    out[i / 8] |= static_cast<uint32_t>(fmt::e2m1_from_f32(fmt::mul_pow2(v, -x))) << (4 * (i % 8));
  }
}

// mxfp4_to_fp8: the largest finite |value| of a block (32 E2M1 codes in 4 words, scale byte sb);
// 0 for a NaN block.
FP8FLOW_HD float mx_block_amax(const uint32_t w[4], uint8_t sb) {
  if (sb == fmt::kE8M0NaN) return 0.0f;
  const int x = fmt::e8m0_exponent(sb);
  if (x <= E2m1ToE4m3::kMaxExactX) {
    const uint32_t m = max_e2m1_magnitude(w[0], w[1], w[2], w[3]);
    return fmt::mul_pow2(fmt::e2m1_to_f32(static_cast<uint8_t>(m)), x);
  }
  float amax = 0.0f;  // X = 126, 127: the largest elements overflow to Inf and do not count
  FP8FLOW_MX_UNROLL
  for (int i = 0; i < 32; ++i) {
    const uint8_t c = static_cast<uint8_t>((w[i / 8] >> (4 * (i % 8))) & 0xFu);
    const float v = fmt::e2m1_to_f32(c) * fmt::e8m0_to_f32(sb);
    if (fmt::f32_is_finite(v) && fmt::f32_abs(v) > amax) amax = fmt::f32_abs(v);
  }
  return amax;
}

// Table row of a block with scale byte sb at tile exponent t (exact blocks: sb <= 252).
FP8FLOW_HD int mx_code_row(uint8_t sb, int t) {
  const int r = fmt::e8m0_exponent(sb) - t - E2m1ToE4m3::kShiftMin;
  return r < 0 ? 0 : (r >= E2m1ToE4m3::kShifts ? E2m1ToE4m3::kShifts - 1 : r);
}

// The 32 E4M3 codes (8 words) of a block at tile exponent t. (lo, hi): code row (exact blocks).
FP8FLOW_HD void mx_block_encode(const uint32_t w[4], uint8_t sb, int t, uint32_t lo, uint32_t hi,
                                uint32_t out[8]) {
  if (sb == fmt::kE8M0NaN) {
    FP8FLOW_MX_UNROLL
    for (int i = 0; i < 8; ++i) out[i] = 0x7F7F7F7Fu;
    return;
  }
  if (fmt::e8m0_exponent(sb) <= E2m1ToE4m3::kMaxExactX) {
    FP8FLOW_MX_UNROLL
    for (int i = 0; i < 4; ++i) {
      out[2 * i] = e2m1x4_to_e4m3x4(w[i], lo, hi);
      out[2 * i + 1] = e2m1x4_to_e4m3x4(w[i] >> 16, lo, hi);
    }
    return;
  }
  FP8FLOW_MX_UNROLL
  for (int i = 0; i < 8; ++i) out[i] = 0;
  FP8FLOW_MX_UNROLL
  for (int i = 0; i < 32; ++i) {
    const uint8_t c = static_cast<uint8_t>((w[i / 8] >> (4 * (i % 8))) & 0xFu);
    const float v = fmt::e2m1_to_f32(c) * fmt::e8m0_to_f32(sb);
    out[i / 4] |= static_cast<uint32_t>(fmt::e4m3_from_f32(fmt::mul_pow2(v, -t))) << (8 * (i % 4));
  }
}

// mxfp4_to_fp8_transposed, exact tiles (every token's X <= 125). One token's word w (8 columns,
// nibble j = column j) folded into the column keys: acc[0] = columns (0, 2) as u16x2 lanes,
// acc[1] = (4, 6), acc[2] = (1, 3), acc[3] = (5, 7). base2 = e2m1_key_base(X) in both lanes.
constexpr uint32_t kKeyBig = 1024;  // > every key: min(base + byte, byte * kKeyBig) is 0 for c = 0
FP8FLOW_HD void key_accumulate(uint32_t w, uint32_t base2, uint32_t klo, uint32_t khi,
                               uint32_t acc[4]) {
  const uint32_t sel[4] = {w & 0x0F0Fu, (w >> 16) & 0x0F0Fu, (w >> 4) & 0x0F0Fu,
                           (w >> 20) & 0x0F0Fu};
  FP8FLOW_MX_UNROLL
  for (int i = 0; i < 4; ++i) {
    const uint32_t kb = prmt(klo, khi, sel[i]);  // [byte(c_a), 0, byte(c_b), 0]
    acc[i] = vmax_u16x2(acc[i], vaddmin_u16x2(base2, kb, kb * kKeyBig));
  }
}

// The same with gap keys (E2m1Key::glo, ghi): sb2 = the token's scale byte sb in both 16-bit lanes,
// twice (2 sb, 2 sb). One PRMT and one VIADDMNMX per two columns.
FP8FLOW_HD void gap_key_accumulate(uint32_t w, uint32_t sb2, uint32_t glo, uint32_t ghi,
                                   uint32_t acc[4]) {
  const uint32_t sel[4] = {w & 0x0F0Fu, (w >> 16) & 0x0F0Fu, (w >> 4) & 0x0F0Fu,
                           (w >> 20) & 0x0F0Fu};
  FP8FLOW_MX_UNROLL
  for (int i = 0; i < 4; ++i) acc[i] = vaddmax_u16x2(sb2, prmt(glo, ghi, sel[i]), acc[i]);
}

// Column scale exponent from a gap-key column maximum; bmax = 2 sb_max of the tile (the bound
// that tells an all-zero column, see kGapTable). Equals key_scale_exponent of the plain key.
FP8FLOW_HD int gap_key_scale_exponent(uint32_t key, uint32_t bmax) {
  return key_scale_exponent(key > bmax ? key - kGapDelta : E2m1Key::kNoKey);
}

// A token's scale byte in both 16-bit lanes (word sbw holds the bytes of 4 tokens; k = 0..3).
FP8FLOW_HD uint32_t sb_lanes(uint32_t sbw, int k) {
  return prmt(sbw, 0u, 0x4040u + 0x0101u * static_cast<uint32_t>(k));
}

// f16_column_exps for operands made of scale bytes: xb = sb_lanes(...) (sb = X + 127) gives the
// same f16hi_pair_to_e4m3x2 as f16_token_exp(X) with f16_column_exps(t0, t1).
FP8FLOW_HD uint32_t f16_column_exps_sb(int t0, int t1) {
  constexpr int kBias = static_cast<int>(kF16ExpBias) - 127;
  return f16_column_exps(t0 - kBias, t1 - kBias);
}

// Key of column j (0..7) from the accumulators.
FP8FLOW_HD uint32_t column_key(const uint32_t acc[4], int j) {
  const uint32_t a = acc[(j & 1) * 2 + (j >> 2)];
  return (j & 2) ? a >> 16 : a & 0xFFFFu;
}

}  // namespace fp8flow::sm90::mx
