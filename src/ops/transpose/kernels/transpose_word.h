// Integer building blocks of the scaling-aware transpose kernel: exact per-element rescale of an
// E4M3 code by 2^d, and the SIMD-within-a-register fast path that rescales four codes at once in
// two u16x2 words. __host__ __device__ on purpose: tests/transpose/transpose_word_test.cpp proves
// every function here against the fmt:: definitions (fmt::e4m3_mul_pow2, fmt::scale_exponent)
// exhaustively on the CPU, so the kernel's fast path is the reference's rounding, not a copy of it.
//
// NOTES: exponents. Row exponents t_m (of in.scale), the tile's largest row exponent Tbase and the
// column exponents T_k all lie in [-127, 127] (the transpose clamps t_m there). Per row the kernel
// keeps P_m = 8 * (t_m - Tbase + 256) in both 16-bit lanes of a word ("row word"), in [16, 2048];
// per column it keeps B_k = 8 * (Tbase - T_k) in [0, 2032]. Then for a code of magnitude `mag`:
//   key  = mag + P_m         : (key + 1) >> 3 == t_m + scale_exponent(code) - Tbase + 271
//                              for normal codes, so the max over a column's keys gives T_k;
//   lane = mag + P_m + B_k   : == mag + 8 * d + 2048 with d = t_m - T_k; its low byte is the
//                              rescaled code whenever the result stays normal (lane >= 2056).
// Every lane stays in [16, 4207]: no carries between lanes, no wrap-around.
#pragma once

#include <cstdint>

#include "fp8flow/formats.h"

#if defined(__CUDACC__)
#define FP8FLOW_TW_UNROLL _Pragma("unroll")
// The exact (slow) paths are called from several unrolled places; one out-of-line copy keeps the
// kernel's instruction footprint small.
#define FP8FLOW_TW_SLOW __host__ __device__ __noinline__
#else
#define FP8FLOW_TW_UNROLL
#define FP8FLOW_TW_SLOW inline
#endif

namespace fp8flow::sm90::tw {

// ---------------------------------------------------------------------------------------------
// Portable SIMD primitives: device intrinsics on the GPU, plain emulation on the host.

// PRMT: output byte i is byte (s >> 4i) & 7 of {b:a} (a = bytes 0-3); bit 3 of the selector
// nibble replicates that byte's sign bit instead.
FP8FLOW_HD uint32_t byte_perm(uint32_t a, uint32_t b, uint32_t s) {
#if defined(__CUDA_ARCH__)
  return __byte_perm(a, b, s);
#else
  const uint64_t ab = (static_cast<uint64_t>(b) << 32) | a;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) {
    const uint32_t n = (s >> (4 * i)) & 0xFu;
    uint32_t byte = static_cast<uint32_t>(ab >> (8 * (n & 7u))) & 0xFFu;
    if (n & 8u) byte = (byte & 0x80u) ? 0xFFu : 0u;
    r |= byte << (8 * i);
  }
  return r;
#endif
}

// Per 16-bit lane, unsigned: max(a + b, c) (the caller guarantees a + b does not wrap).
FP8FLOW_HD uint32_t add_max_u16x2(uint32_t a, uint32_t b, uint32_t c) {
#if defined(__CUDA_ARCH__)
  return __viaddmax_u16x2(a, b, c);
#else
  uint32_t r = 0;
  for (int i = 0; i < 2; ++i) {
    const uint32_t s = ((a >> (16 * i)) + (b >> (16 * i))) & 0xFFFFu;
    const uint32_t m = (c >> (16 * i)) & 0xFFFFu;
    r |= (s > m ? s : m) << (16 * i);
  }
  return r;
#endif
}

// Per 16-bit lane, unsigned: max(a, b).
FP8FLOW_HD uint32_t max_u16x2(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __vmaxu2(a, b);
#else
  uint32_t r = 0;
  for (int i = 0; i < 2; ++i) {
    const uint32_t x = (a >> (16 * i)) & 0xFFFFu, y = (b >> (16 * i)) & 0xFFFFu;
    r |= (x > y ? x : y) << (16 * i);
  }
  return r;
#endif
}

// Per 16-bit lane, unsigned: min(a, b, c).
FP8FLOW_HD uint32_t min3_u16x2(uint32_t a, uint32_t b, uint32_t c) {
#if defined(__CUDA_ARCH__)
  return __vimin3_u16x2(a, b, c);
#else
  uint32_t r = 0;
  for (int i = 0; i < 2; ++i) {
    uint32_t x = (a >> (16 * i)) & 0xFFFFu;
    const uint32_t y = (b >> (16 * i)) & 0xFFFFu, z = (c >> (16 * i)) & 0xFFFFu;
    if (y < x) x = y;
    if (z < x) x = z;
    r |= x << (16 * i);
  }
  return r;
#endif
}

// Per 16-bit lane, unsigned: min(a, b).
FP8FLOW_HD uint32_t min_u16x2(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __vminu2(a, b);
#else
  uint32_t r = 0;
  for (int i = 0; i < 2; ++i) {
    const uint32_t x = (a >> (16 * i)) & 0xFFFFu, y = (b >> (16 * i)) & 0xFFFFu;
    r |= (x < y ? x : y) << (16 * i);
  }
  return r;
#endif
}

#if !defined(__CUDA_ARCH__)
namespace host {
inline int16_t lane_s16(uint32_t w, int i) {
  return static_cast<int16_t>(static_cast<uint16_t>(w >> (16 * i)));
}
// FP16 bits -> value (exact in double).
inline double f16_value(uint32_t h) {
  const int e = static_cast<int>((h >> 10) & 0x1Fu);
  const double m = static_cast<double>(h & 0x3FFu);
  double v;
  if (e == 0)
    v = m * 0x1p-24;
  else if (e == 31)
    v = m ? __builtin_nan("") : __builtin_inf();
  else
    v = (1024.0 + m) * __builtin_ldexp(1.0, e - 25);
  return (h & 0x8000u) ? -v : v;
}
// Finite double -> FP16 bits, round to nearest even (overflow -> Inf).
inline uint32_t f16_bits_rne(double v) {
  const uint32_t sign = __builtin_signbit(v) ? 0x8000u : 0u;
  double a = v < 0 ? -v : v;
  int e;
  (void)__builtin_frexp(a, &e);                               // a = f * 2^e, f in [0.5, 1)
  const int q_exp = (a == 0 || e - 11 < -24) ? -24 : e - 11;  // quantum 2^q_exp
  a = __builtin_nearbyint(__builtin_ldexp(a, -q_exp)) * __builtin_ldexp(1.0, q_exp);
  if (a >= 65520.0) return sign | 0x7C00u;
  if (a < 0x1p-14) return sign | static_cast<uint32_t>(__builtin_ldexp(a, 24));
  (void)__builtin_frexp(a, &e);
  const uint32_t field = static_cast<uint32_t>(e - 1 + 15);
  const uint32_t mant = static_cast<uint32_t>(__builtin_ldexp(a, 11 - e)) - 1024u;
  return sign | (field << 10) | mant;
}
}  // namespace host
#endif

// Per 16-bit lane, signed: max(0, min(a + b, c)) (the add wraps per lane). DPX on sm_90.
FP8FLOW_HD uint32_t add_min_relu_s16x2(uint32_t a, uint32_t b, uint32_t c) {
#if defined(__CUDA_ARCH__)
  return __viaddmin_s16x2_relu(a, b, c);
#else
  uint32_t r = 0;
  for (int i = 0; i < 2; ++i) {
    const int s = static_cast<int16_t>(static_cast<uint16_t>((a >> (16 * i)) + (b >> (16 * i))));
    int v = s < host::lane_s16(c, i) ? s : host::lane_s16(c, i);
    if (v < 0) v = 0;
    r |= static_cast<uint32_t>(v) << (16 * i);
  }
  return r;
#endif
}

// Per 16-bit lane, signed: max(a + b, c) (the add wraps per lane). DPX on sm_90.
FP8FLOW_HD uint32_t add_max_s16x2(uint32_t a, uint32_t b, uint32_t c) {
#if defined(__CUDA_ARCH__)
  return __viaddmax_s16x2(a, b, c);
#else
  uint32_t r = 0;
  for (int i = 0; i < 2; ++i) {
    const int s = static_cast<int16_t>(static_cast<uint16_t>((a >> (16 * i)) + (b >> (16 * i))));
    const int v = s > host::lane_s16(c, i) ? s : host::lane_s16(c, i);
    r |= (static_cast<uint32_t>(v) & 0xFFFFu) << (16 * i);
  }
  return r;
#endif
}

// FP16x2 a + b and a - b, round to nearest even (IEEE, subnormals kept).
FP8FLOW_HD uint32_t hadd2_rn(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  uint32_t r;
  asm("add.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  return r;
#else
  uint32_t r = 0;
  for (int i = 0; i < 2; ++i)
    r |= host::f16_bits_rne(host::f16_value((a >> (16 * i)) & 0xFFFFu) +
                            host::f16_value((b >> (16 * i)) & 0xFFFFu))
         << (16 * i);
  return r;
#endif
}
FP8FLOW_HD uint32_t hsub2_rn(uint32_t a, uint32_t b) {
  return hadd2_rn(a, b ^ 0x80008000u);
}

// ---------------------------------------------------------------------------------------------
// Exact per-element path (the kernel's slow path; also the definition the fast path is tested
// against, next to fmt::e4m3_mul_pow2).

constexpr int kExpMin = fmt::kMinScaleExp;  // -127
constexpr int kExpMax = fmt::kMaxScaleExp;  // 127

// Row exponent of a power-of-two scale, clamped to [-127, 127] (the range of every scale fp8flow
// writes; the clamp only matters for out-of-contract scales and keeps the integer math bounded).
FP8FLOW_HD int row_exponent(float scale) {
  const int e = fmt::pow2_exponent(scale);
  return e < kExpMin ? kExpMin : (e > kExpMax ? kExpMax : e);
}

FP8FLOW_HD bool e4m3_mag_is_value(uint32_t mag) {
  return mag != 0 && mag != 0x7Fu;
}

// fmt::scale_exponent(|decode(code)|) for a nonzero, non-NaN E4M3 magnitude (1..126):
// normal codes E - 15 + (M == 7); subnormal M * 2^-9: -17 (M = 1), -16 (M = 2, 3), -15 (M >= 4).
FP8FLOW_HD int e4m3_mag_scale_exponent(uint32_t mag) {
  if (mag >= 8) return static_cast<int>((mag + 1) >> 3) - 15;
  return mag >= 4 ? -15 : (mag >= 2 ? -16 : -17);
}

// fmt::e4m3_mul_pow2(code, d) with integers only; *changed is set when the value is not exactly
// code * 2^d (rounded to a subnormal or zero, or saturated). Zero and NaN codes come back as they
// are, unchanged.
FP8FLOW_HD uint32_t e4m3_rescale(uint32_t code, int d, bool* changed) {
  const uint32_t sign = code & 0x80u, mag = code & 0x7Fu;
  *changed = false;
  if (!e4m3_mag_is_value(mag)) return code;
  // Normalize: value = s * 2^(e - 10) with s in [8, 15] (e <= 0 for subnormal codes).
  uint32_t s = mag >> 3 ? (8u | (mag & 7u)) : mag;
  int e = mag >> 3 ? static_cast<int>(mag >> 3) : 1;
  while (s < 8u) {
    s <<= 1;
    --e;
  }
  if (d > 40) d = 40;  // keeps e + d in int range; saturates either way
  if (d < -40) d = -40;
  const int en = e + d;
  if (en >= 1) {
    const uint32_t r = (static_cast<uint32_t>(en) << 3) | (s & 7u);
    if (en > 15 || r > 0x7Eu) {
      *changed = true;
      return sign | 0x7Eu;
    }
    return sign | r;
  }
  const int sh = 1 - en;  // >= 1: result is s / 2^sh units of 2^-9, rounded to nearest even
  if (sh > 4) {           // s / 2^5 < 0.5
    *changed = true;
    return sign;
  }
  uint32_t q = s >> sh;
  const uint32_t rem = s & ((1u << sh) - 1u), half = 1u << (sh - 1);
  if (rem > half || (rem == half && (q & 1u))) ++q;
  *changed = rem != 0;
  return sign | q;  // q == 8 is the smallest normal code, also correct
}

// ---------------------------------------------------------------------------------------------
// SIMD fast path: four codes (one per byte) of a word.

// Row word P_m for a = t_m - Tbase in [-254, 0]: 8 * (a + 256) in both 16-bit lanes.
FP8FLOW_HD uint32_t row_word(int a) {
  const uint32_t p = 8u * static_cast<uint32_t>(a + 256);
  return p | (p << 16);
}
FP8FLOW_HD int row_word_exponent(uint32_t p) {
  return static_cast<int>(p & 0xFFFFu) / 8 - 256;
}

// Bit 7 of each byte set where that code is finite and normal (magnitude in [8, 126]); the fast
// path applies to a word when this is 0x80808080.
FP8FLOW_HD uint32_t normal_bits(uint32_t x) {
  const uint32_t mag = x & 0x7F7F7F7Fu;
  return (mag + 0x78787878u) & ~(mag + 0x01010101u) & 0x80808080u;
}

// Magnitudes of bytes 0, 2 (lo) and 1, 3 (hi) in 16-bit lanes.
FP8FLOW_HD uint32_t mag_lo(uint32_t x) {
  return x & 0x007F007Fu;
}
FP8FLOW_HD uint32_t mag_hi(uint32_t x) {
  return (x >> 8) & 0x007F007Fu;
}

// Column-exponent keys of a normal word, max-accumulated into (klo: bytes 0, 2; khi: bytes 1, 3).
FP8FLOW_HD void key_word(uint32_t x, uint32_t p, uint32_t& klo, uint32_t& khi) {
  klo = add_max_u16x2(mag_lo(x), p, klo);
  khi = add_max_u16x2(mag_hi(x), p, khi);
}

// Key of one code by the exact path (any nonzero, non-NaN magnitude, subnormals included): the
// same value of (key + 1) >> 3 as key_word gives for normal codes.
FP8FLOW_HD uint32_t key_exact(uint32_t mag, uint32_t p) {
  return (p & 0xFFFFu) + 8u * static_cast<uint32_t>(e4m3_mag_scale_exponent(mag) + 15);
}

// key_word for any word, by the exact path: zero and NaN codes are skipped, subnormal codes get
// their exact keys. The kernel's slow path for words that are not all normal.
struct KeyPair {
  uint32_t lo, hi;  // keys of bytes 0, 2 and of bytes 1, 3
};
FP8FLOW_TW_SLOW KeyPair key_word_exact(uint32_t x, uint32_t p, KeyPair k) {
  if ((x & 0x7F7F7F7Fu) == 0) return k;
  for (int c = 0; c < 4; ++c) {
    const uint32_t mag = (x >> (8 * c)) & 0x7Fu;
    if (!e4m3_mag_is_value(mag)) continue;
    const uint32_t key = key_exact(mag, p) << (16 * (c >> 1));  // bytes 0,1 -> lane 0; 2,3 -> 1
    if (c & 1)
      k.hi = max_u16x2(k.hi, key);
    else
      k.lo = max_u16x2(k.lo, key);
  }
  return k;
}

// Column exponent T_k from the column's max key (0 when the column has no value).
FP8FLOW_HD int column_exponent(uint32_t key, int tbase) {
  const int t = static_cast<int>((key + 1u) >> 3) + tbase - 271;
  return t < kExpMin ? kExpMin : t;
}

// Column word for bytes (b0, b2) or (b1, b3): 8 * (Tbase - T) per lane.
FP8FLOW_HD uint32_t col_word(int tbase, int t_a, int t_b) {
  return (8u * static_cast<uint32_t>(tbase - t_a)) |
         ((8u * static_cast<uint32_t>(tbase - t_b)) << 16);
}

// Rescales the four codes of x (row word p, column words blo for bytes 0/2 and bhi for 1/3).
// Exact for normal codes whose result stays normal; `mn` min-accumulates the lanes so that
// rescale_ok(mn) tells whether every result stayed normal. Assumes no overflow (d <= -scale
// exponent of each code, which both policies guarantee for the codes they let through).
FP8FLOW_HD uint32_t rescale_word(uint32_t x, uint32_t p, uint32_t blo, uint32_t bhi, uint32_t& mn) {
  const uint32_t lo = mag_lo(x) + p + blo;  // mag + 8 d + 2048 per lane
  const uint32_t hi = mag_hi(x) + p + bhi;
  mn = min3_u16x2(lo, hi, mn);
  return byte_perm(lo, hi, 0x6240u) | (x & 0x80808080u);
}
// rescale_word by the exact path, for any word: byte c is rescaled by 2^(t_m - t_c);
// `changed` counts the values that did not survive exactly (underflow).
struct RescaledWord {
  uint32_t y;        // the four rescaled codes
  uint32_t changed;  // how many of them underflowed
};
FP8FLOW_TW_SLOW RescaledWord rescale_word_exact(uint32_t x, int t_m, int t0, int t1, int t2,
                                                int t3) {
  if ((x & 0x7F7F7F7Fu) == 0) return {x, 0};
  const int t_col[4] = {t0, t1, t2, t3};
  RescaledWord r{0, 0};
  for (int c = 0; c < 4; ++c) {
    bool ch;
    r.y |= e4m3_rescale((x >> (8 * c)) & 0xFFu, t_m - t_col[c], &ch) << (8 * c);
    r.changed += ch ? 1u : 0u;
  }
  return r;
}
constexpr uint32_t kRescaleMinInit = 0xFFFFFFFFu;
// Every lane >= 2056 (= 2048 + 8: the result's exponent field is >= 1).
FP8FLOW_HD bool rescale_ok(uint32_t mn) {
  return ((mn - 0x08080808u) & 0x80008000u) == 0;
}

// Transposes a 4x4 block of bytes: out[c] byte i = in[i] byte c.
FP8FLOW_HD void transpose4x4(uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t& b0,
                             uint32_t& b1, uint32_t& b2, uint32_t& b3) {
  const uint32_t t0 = byte_perm(a0, a1, 0x5140u), t1 = byte_perm(a2, a3, 0x5140u);
  const uint32_t t2 = byte_perm(a0, a1, 0x7362u), t3 = byte_perm(a2, a3, 0x7362u);
  b0 = byte_perm(t0, t1, 0x5410u);
  b1 = byte_perm(t0, t1, 0x7632u);
  b2 = byte_perm(t2, t3, 0x5410u);
  b3 = byte_perm(t2, t3, 0x7632u);
}

// ---------------------------------------------------------------------------------------------
// Tile geometry and the per-thread steps of the kernel (host-callable so that a CPU emulation of
// the whole kernel can run in the tests).

// 16-byte chunk slot (in words) of chunk c (0..7) of tile row r (0..127) in shared memory.
FP8FLOW_HD int tile_chunk_word(int r, int c) {
  return r * 32 + 4 * (c ^ ((r >> 4) & 7));
}
// Word index of row i (0..15) of thread (j, wd): token row 16j + i, channels 4wd..4wd+3.
FP8FLOW_HD int tile_thread_word(int j, int wd, int i) {
  return (16 * j + i) * 32 + (wd ^ (4 * j));
}
// Row-word slot of token m (padded: the 8 blocks of 16 rows land on distinct banks).
FP8FLOW_HD int row_slot(int m) {
  return m + 4 * (m >> 4);
}
constexpr int kRowSlots = 128 + 4 * 8;

struct alignas(16) Words4 {
  uint32_t v[4];
};

// Column-exponent keys of a thread's 16 rows, exact path: NaN and zero codes skipped, subnormal
// codes with their exact keys.
FP8FLOW_HD void thread_keys_exact(const uint32_t (&x)[16], const Words4* prow, uint32_t& klo,
                                  uint32_t& khi) {
  FP8FLOW_TW_UNROLL
  for (int g = 0; g < 4; ++g) {
    const Words4 p = prow[g];
    FP8FLOW_TW_UNROLL
    for (int i = 0; i < 4; ++i) {
      const KeyPair k = key_word_exact(x[4 * g + i], p.v[i], KeyPair{klo, khi});
      klo = k.lo;
      khi = k.hi;
    }
  }
}

// Column-exponent keys of a thread's 16 rows, fast path: every byte through key_word. Normal codes
// get their exact keys; zero and subnormal codes get keys claiming at most t_m - 14 <= Tbase - 14,
// which column_keys_trusted() rules out; NaN codes would claim too much, so a thread holding one
// redoes its rows by the exact path.
FP8FLOW_HD void thread_keys(const uint32_t (&x)[16], const Words4* prow, uint32_t& klo,
                            uint32_t& khi) {
  uint32_t nan = 0;
  FP8FLOW_TW_UNROLL
  for (int g = 0; g < 4; ++g) {
    const Words4 p = prow[g];
    FP8FLOW_TW_UNROLL
    for (int i = 0; i < 4; ++i) {
      key_word(x[4 * g + i], p.v[i], klo, khi);
      nan |= (x[4 * g + i] & 0x7F7F7F7Fu) + 0x01010101u;  // bit 7 set for 0x7F magnitudes
    }
  }
  if (nan & 0x80808080u) {
    klo = khi = 0;
    thread_keys_exact(x, prow, klo, khi);
  }
}

// Column exponents of the thread's 4 channels from the keys reduced over its 8 token blocks.
FP8FLOW_HD void thread_column_exponents(uint32_t klo, uint32_t khi, int tbase, int (&tcol)[4],
                                        uint32_t& blo, uint32_t& bhi) {
  tcol[0] = column_exponent(klo & 0xFFFFu, tbase);
  tcol[1] = column_exponent(khi & 0xFFFFu, tbase);
  tcol[2] = column_exponent(klo >> 16, tbase);
  tcol[3] = column_exponent(khi >> 16, tbase);
  blo = col_word(tbase, tcol[0], tcol[2]);
  bhi = col_word(tbase, tcol[1], tcol[3]);
}

// True when column exponents from thread_keys are exact: each is >= Tbase - 13, above anything a
// zero or subnormal code's stand-in key can claim. Else the warp redoes its keys exactly (only
// for columns whose largest value is 2^13 below the tile's largest row scale, or empty ones).
FP8FLOW_HD bool column_keys_trusted(const int (&tcol)[4], int tbase) {
  const int lo = tbase - 13;
  return tcol[0] >= lo && tcol[1] >= lo && tcol[2] >= lo && tcol[3] >= lo;
}

// Wide SIMD path for one word (the lanes rl, rh of rescale_word: mag + 8 d + 2048): zero and NaN
// codes stay as they are, normal results as in rescale_word, and results below E4M3's normal
// range are rounded to nearest even by an FP16 add of 1024 (unit = the smallest subnormal):
// u = clamp(mag + 8 d + 136, 1, 144) as FP16 bits u << 7 is |code| * 2^(d + 9) there (8.0 for
// normal results, tiny when the value drops below half a unit). Subnormal input codes are not
// handled: `bad` gets bit 7 set in their bytes (and for NaN), and the caller takes the exact
// path. With kCount, `cnt` (u16x2) accumulates the values that did not survive exactly.
template <bool kCount>
FP8FLOW_HD uint32_t rescale_word_wide(uint32_t x, uint32_t rl, uint32_t rh, uint32_t& bad,
                                      uint32_t& cnt) {
  const uint32_t mag = x & 0x7F7F7F7Fu;
  const uint32_t t1 = mag + 0x7F7F7F7Fu;  // bit 7: nonzero
  const uint32_t t2 = mag + 0x01010101u;  // bit 7: NaN
  const uint32_t t3 = mag + 0x78787878u;  // bit 7: exponent field >= 1
  bad |= (t1 & ~t3) | t2;
  const uint32_t vb = t1 & ~t2 & 0x80808080u;     // bit 7: a value (nonzero, not NaN)
  const uint32_t vm = byte_perm(vb, 0, 0xBA98u);  // 0xFF per value byte
  const uint32_t ul = add_min_relu_s16x2(rl, 0xF887F887u, 0x008F008Fu) * 128u + 0x00800080u;
  const uint32_t uh = add_min_relu_s16x2(rh, 0xF887F887u, 0x008F008Fu) * 128u + 0x00800080u;
  const uint32_t hl = hadd2_rn(ul, 0x64006400u);  // 1024 + RNE(|code| * 2^(d + 9))
  const uint32_t hh = hadd2_rn(uh, 0x64006400u);
  const uint32_t ol = add_max_s16x2(rl, 0x5C005C00u, hl);  // low byte: the rescaled magnitude
  const uint32_t oh = add_max_s16x2(rh, 0x5C005C00u, hh);
  const uint32_t y = byte_perm(ol, oh, 0x6240u) | (x & 0x80808080u);
  if constexpr (kCount) {
    // Exact iff the FP16 add did not round: (h - 1024) == u.
    const uint32_t cl = (hsub2_rn(hl, 0x64006400u) ^ ul) & byte_perm(vb, 0, 0xAA88u);
    const uint32_t ch = (hsub2_rn(hh, 0x64006400u) ^ uh) & byte_perm(vb, 0, 0xBB99u);
    cnt += min_u16x2(cl, 0x00010001u) + min_u16x2(ch, 0x00010001u);
  }
  return (vm & y) | (~vm & x);
}

// Which path each group of 4 rows took (tests).
struct RescalePaths {
  uint32_t wide = 0, exact = 0;
};

// Rescales the thread's 16 rows in place, group by group: the plain SIMD path when every code is
// normal and stays normal, else the wide SIMD path (zeros, underflow), else (subnormal or NaN
// codes) the exact path. Returns the number of underflowed values (counted when kCount).
template <bool kCount>
FP8FLOW_HD uint32_t thread_rescale(uint32_t (&x)[16], const Words4* prow, int tbase,
                                   const int (&tcol)[4], uint32_t blo, uint32_t bhi,
                                   RescalePaths* paths = nullptr) {
  uint32_t changed = 0;
  FP8FLOW_TW_UNROLL
  for (int g = 0; g < 4; ++g) {
    const Words4 p = prow[g];
    uint32_t rl[4], rh[4], mn = kRescaleMinInit, nb = 0x80808080u;
    FP8FLOW_TW_UNROLL
    for (int i = 0; i < 4; ++i) {
      const uint32_t w = x[4 * g + i];
      rl[i] = mag_lo(w) + p.v[i] + blo;  // mag + 8 d + 2048 per lane
      rh[i] = mag_hi(w) + p.v[i] + bhi;
      mn = min3_u16x2(rl[i], rh[i], mn);
      nb &= normal_bits(w);
    }
    if (nb == 0x80808080u && rescale_ok(mn)) {
      FP8FLOW_TW_UNROLL
      for (int i = 0; i < 4; ++i)
        x[4 * g + i] = byte_perm(rl[i], rh[i], 0x6240u) | (x[4 * g + i] & 0x80808080u);
      continue;
    }
    uint32_t bad = 0, cnt = 0, y[4];
    FP8FLOW_TW_UNROLL
    for (int i = 0; i < 4; ++i)
      y[i] = rescale_word_wide<kCount>(x[4 * g + i], rl[i], rh[i], bad, cnt);
    if (bad & 0x80808080u) {
      if (paths) ++paths->exact;
      cnt = 0;
      FP8FLOW_TW_UNROLL
      for (int i = 0; i < 4; ++i) {
        const RescaledWord r = rescale_word_exact(x[4 * g + i], row_word_exponent(p.v[i]) + tbase,
                                                  tcol[0], tcol[1], tcol[2], tcol[3]);
        y[i] = r.y;
        changed += r.changed;
      }
    } else if (paths) {
      ++paths->wide;
    }
    changed += (cnt & 0xFFFFu) + (cnt >> 16);
    FP8FLOW_TW_UNROLL
    for (int i = 0; i < 4; ++i) x[4 * g + i] = y[i];
  }
  return changed;
}

// Rows -> channels: z[c][g] holds tokens 4g..4g+3 of channel c.
FP8FLOW_HD void thread_transpose(const uint32_t (&x)[16], uint32_t (&z)[4][4]) {
  FP8FLOW_TW_UNROLL
  for (int g = 0; g < 4; ++g)
    transpose4x4(x[4 * g], x[4 * g + 1], x[4 * g + 2], x[4 * g + 3], z[0][g], z[1][g], z[2][g],
                 z[3][g]);
}

}  // namespace fp8flow::sm90::tw
