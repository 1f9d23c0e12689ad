// sm90_transpose_scaled_e4m3_1x128: the scaling-aware transpose kernel. Row-wise (1x128) E4M3
// X [M][K] -> column-wise E4M3 X^T [K][M] with one scale per (128-token tile, channel), staying in
// FP8: every code keeps sign and mantissa, its exponent moves by t_m - T_k (integer work only).
//
// Work: (128-token tile, 128-channel block) pairs (tiles restart at each group of
// out_t.col_groups); ColumnTight takes them in groups of 16 channel blocks (token tiles within a
// group, channel block fastest; with the underflow count channel block fastest over all), TileMax
// token tile fastest. Block: 256 threads, one 128 x 128 tile
// at a time (16 KB of codes + 128 row scales). ColumnTight launches persistent CTAs (as many as
// fit) that loop over the pairs with a double-buffered tile: the next pair's cp.async copies and
// row scale fly while one is computed (75% -> 79% of copy at 32768 x 7168 on an H100). TileMax
// launches one CTA per pair (its loop runs once): persistent it measured slower (90% -> 80%).
// Napkin math: one read and one write of the codes, plus 4 B per 128 codes of scales each way:
// bytes = 2 * M * K * (1 + 4/128). At 32768 x 7168 that is 484 MB; at the H100's 2.4-3.0 TB/s copy
// bandwidth 0.16-0.20 ms (the published Triton kernel: 0.52-0.59 ms). Bench: `fp8flow-bench ops`
// (transpose_scaled rows), or the GPU tests in tests/transpose/transpose_gpu_test.cpp for
// correctness.
//
// NOTES:
// - Load: 4 x 16-byte cp.async per thread, all in flight before any use, into shared memory with
//   16-byte chunk c of row r stored at chunk c ^ ((r / 16) % 8): the 8 threads writing one row hit
//   8 distinct chunk slots, and the column reads below are conflict-free.
// - Thread (j = lane % 8, wd = lane / 8 + 4 * warp) owns tokens 16j..16j+15 x channels
//   4wd..4wd+3: it reads 16 words (one per token row; word wd of row r lives at
//   r * 32 + (wd ^ 4j), so for one row index the 32 lanes hit 32 distinct banks), rescales them
//   as rows, then transposes 4x4 byte blocks with PRMT so it holds, per channel, 16 consecutive
//   tokens: one 16-byte store; the 8 lanes of a channel write 128 contiguous bytes.
// - ColumnTight: a column's exponent is the max over its tokens of t_m + scale_exponent(code),
//   an integer formula per code, reduced over the 8 lanes sharing the channels with 3 xor-shuffles.
//   TileMax: T = max_m t_m, no per-code work.
// - Rescale: each code becomes |code| * 2^(t_m - T) as an exact FP32 (an exponent add for normal
//   codes), re-encoded by the hardware's cvt.rn.satfinite.e4m3x2.f32 (RNE onto the subnormal grid,
//   the same bits as fmt::e4m3_from_f32); zero and NaN codes are kept. About 10 integer/FP ops per
//   code, under the memory time. (An earlier integer-SIMD version with three tiers passed a CPU
//   emulation but not the H100: the plain version replaced it.)
// - Partial tiles (group tails) zero-fill the missing rows (cp.async src-size 0) and store only
//   valid tokens; outputs not 16-byte aligned (M or the group offset not a multiple of 16) use
//   4-byte or byte stores, and so does the one lane holding a tile end that is not a multiple of
//   16 tokens. Every other lane takes 16-byte stores.
// - Group starts not on a 32-byte boundary (m0 % 32 == 16, e.g. MoEConfig::align 16) leave the
//   first and last 32-byte sector of every 128-token row of a tile half written by each of two
//   CTAs: measured 1.5x slower than 32-aligned starts (H100, bench/RESULTS.md).
// - Underflow count: per-CTA integer sum, one atomicAdd per CTA with a nonzero count
//   (deterministic: integer addition).
// - Session 13 (H100; ncu before: issue 64%, stalls "wait" 22%, "no instruction" 10%, IMAD 23% and
//   BSSY/BSYNC/BRA 8% of the instructions): ColumnTight's FP16 column pass tests NaN and deep rows
//   once per 16 words (OR-ed witnesses) on sign-cleared codes, and the FP16 rescale builds its
//   2^d words with one IMAD each (F16Shifts::lo/hi). `fp8flow-bench ops --only "transpose_scaled
//   col_tight" --reps 100` (% of a same-size copy, before -> after, 2 rounds each, two calls):
//   28672x1280 75.1 -> 82.1, 24576x2048 76.6 -> 79.2-81.4, 24576x5120 79.5 -> 78.3, 32768x7168
//   79.8 -> 78.5, 32768x8192 80.3 -> 78.7, 32768x9216 79.6 -> 78.9; with the underflow count
//   (col_tight+count) 32768x7168 67.4 -> 78.2. Also tried: one warp-uniform choice of the FP16
//   rescale path per tile instead of the per-word test (rows transposed four at a time; it needed
//   __syncwarp fences against 104 B of spills at 80 registers): 83 at the smallest shape, 0.5-1
//   point lower everywhere else; removed.
// - Session 14 (H100; `--only "transpose_scaled col_tight" --reps 100`, % of a same-size copy,
//   two rounds per binary or order in one call, five cards): the persistent CTAs' pair order in
//   groups of kb_group channel blocks (token tiles within a group) instead of channel block
//   fastest over all K/128 blocks (the 396 resident CTAs then wrote each output row in 896-byte
//   runs; in groups of 16, 3.2 KB). Same card, the binary before against this one: 79.2-80.0 ->
//   81.5-82.3 at the four large shapes, 24576x5120 79.1-79.2 -> 81.1-81.4, 24576x2048 81.1-81.2
//   -> 82.5, 28672x1280 81.8-82.0 -> 81.5-82.1 (c35; c33 on another card alike). But the same
//   binary with FP8FLOW_TR_KB_GROUP=65536 (the old order) measured within a point of it on two
//   cards (+3 points on a third): most of the gain came with the new split code, not the order.
//   The underflow-count instance lost 3 points with the grouped split (code generation), so it
//   keeps the old one (78.0-78.4, the same as before). A shift-based split for power-of-two groups
//   measured no better. 4 CTAs per SM (64 registers, no spills): 3 points slower.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "common/cp_async.cuh"
#include "common/groups.h"
#include "fp8flow/transpose.h"
#include "ops/transpose/kernels/transpose_word.h"

namespace fp8flow::sm90 {

constexpr int kTransposeThreads = 256;
// ColumnTight's pair order: channel blocks in groups of this many (see NOTES, session 14; the
// launcher passes it as kb_group, FP8FLOW_TR_KB_GROUP overrides it for A/B timing).
constexpr int kTightKbGroup = 16;
// CTAs per SM the register budget allows: 4 for TileMax (<= 64 registers), 3 for ColumnTight.

namespace tdev {

// Stores the 16 tokens (4 words) of one channel of a partial tile or unaligned output: `n` valid
// tokens (0..16), 4-byte stores where the address allows.
__device__ __forceinline__ void store_tokens_slow(uint8_t* dst, const uint32_t (&z)[4], int n,
                                                  bool aligned4) {
#pragma unroll
  for (int g = 0; g < 4; ++g) {
    if (aligned4 && 4 * g + 4 <= n) {
      *reinterpret_cast<uint32_t*>(dst + 4 * g) = z[g];
    } else {
#pragma unroll
      for (int b = 0; b < 4; ++b)
        if (4 * g + b < n) dst[4 * g + b] = static_cast<uint8_t>(z[g] >> (8 * b));
    }
  }
}

// scale_exponent(|code|) for a nonzero, non-NaN E4M3 code (low byte of b), -1000 otherwise.
__device__ __forceinline__ int code_key(uint32_t b) {
  const uint32_t m = b & 0x7Fu;
  return tw::e4m3_mag_is_value(m) ? tw::e4m3_mag_scale_exponent(m) : -1000;
}

// Two finite FP32 -> two E4M3 codes (a in bits 0-7), RNE, saturating (same bits as
// fmt::e4m3_from_f32; checked by the quantize GPU tests' encode sweep).
__device__ __forceinline__ uint32_t e4m3x2_from_f32(float a, float b) {
  uint16_t r;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(b), "f"(a));
  return r;
}

// FP16 fast path. Every E4M3 value times 2^d, d in [-14, 15], is an exact FP16 value (4
// significant bits, multiples of 2^-24 within the FP16 range), so decode (cvt f16x2.e4m3x2, exact),
// one FP16 multiply by 2^d (exact) and re-encode (cvt e4m3x2.f16x2: RNE, saturating) equal
// fmt::e4m3_mul_pow2 bit for bit; zero codes keep their sign. NaN codes take the FP32 path.
struct F16Shifts {
  int e[4];        // 15 - tcol[c]: the FP16 exponent field of 2^d is t + e[c]
  int tmin, tmax;  // min and max of tcol[]
  // (e[0] << 10) + (e[1] << 26) and the same of e[2], e[3]: the FP16x2 words of 2^d for a row
  // exponent t are lo + t * 0x04000400 and hi + t * 0x04000400 (one IMAD each; mod-2^32
  // arithmetic, exact whenever both fields end in [1, 30], which the fast path guarantees).
  uint32_t lo, hi;
};

__device__ __forceinline__ F16Shifts make_f16_shifts(const int (&tcol)[4]) {
  F16Shifts s;
#pragma unroll
  for (int c = 0; c < 4; ++c) s.e[c] = 15 - tcol[c];
  s.tmin = min(min(tcol[0], tcol[1]), min(tcol[2], tcol[3]));
  s.tmax = max(max(tcol[0], tcol[1]), max(tcol[2], tcol[3]));
  s.lo = (static_cast<uint32_t>(s.e[0]) << 10) + (static_cast<uint32_t>(s.e[1]) << 26);
  s.hi = (static_cast<uint32_t>(s.e[2]) << 10) + (static_cast<uint32_t>(s.e[3]) << 26);
  return s;
}

// Shifts d = t - tcol[c] all in [-14, 15], and no NaN code (magnitude 0x7F) in the word.
__device__ __forceinline__ bool f16_path_ok(uint32_t x, int t, const F16Shifts& s) {
  const bool nan = (((x & 0x7F7F7F7Fu) + 0x01010101u) & 0x80808080u) != 0u;
  return !nan && t - s.tmax >= -14 && t - s.tmin <= 15;
}

__device__ __forceinline__ uint32_t f16x2_from_e4m3x2(uint32_t two_codes) {
  uint32_t r;
  const uint16_t v = static_cast<uint16_t>(two_codes);
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(r) : "h"(v));
  return r;
}
__device__ __forceinline__ uint32_t e4m3x2_from_f16x2(uint32_t v) {
  uint16_t r;
  asm("cvt.rn.satfinite.e4m3x2.f16x2 %0, %1;" : "=h"(r) : "r"(v));
  return r;
}
__device__ __forceinline__ uint32_t max_f16x2(uint32_t a, uint32_t b) {
  uint32_t r;
  asm("max.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  return r;
}
__device__ __forceinline__ float f16_to_f32(uint32_t h) {
  float f;
  const uint16_t v = static_cast<uint16_t>(h);
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
  return f;
}
__device__ __forceinline__ uint32_t mul_f16x2(uint32_t a, uint32_t b) {
  uint32_t r;
  asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  return r;
}

template <bool kCount>
__device__ __forceinline__ uint32_t rescale_word_f16(uint32_t x, int t, const F16Shifts& s,
                                                     uint32_t& changed) {
  // 2^d in FP16: exponent field d + 15 = t + e[c], in [1, 30] on this path.
  const uint32_t tt = static_cast<uint32_t>(t) * 0x04000400u;
  const uint32_t s_lo = s.lo + tt, s_hi = s.hi + tt;
  const uint32_t p_lo = mul_f16x2(f16x2_from_e4m3x2(x), s_lo);
  const uint32_t p_hi = mul_f16x2(f16x2_from_e4m3x2(x >> 16), s_hi);
  const uint32_t y = e4m3x2_from_f16x2(p_lo) | (e4m3x2_from_f16x2(p_hi) << 16);
  if constexpr (kCount) {
    // A value changed iff the re-decoded code differs from the exact product; that is rare
    // (an underflow), so the per-element count runs only for a word that has one.
    const uint32_t d_lo = f16x2_from_e4m3x2(y) ^ p_lo, d_hi = f16x2_from_e4m3x2(y >> 16) ^ p_hi;
    if ((d_lo | d_hi) != 0u)
      changed += ((d_lo & 0xFFFFu) != 0u) + ((d_lo >> 16) != 0u) + ((d_hi & 0xFFFFu) != 0u) +
                 ((d_hi >> 16) != 0u);
  }
  return y;
}

// The 4 codes of one token row (channels c = byte c) times 2^(t - tcol[c]), each exactly
// fmt::e4m3_mul_pow2(code, t - tcol[c]); zero and NaN codes are kept as they are. s_val[m] holds
// the FP32 bits of E4M3 magnitude m (0 for zero and NaN), so a scaled value is one integer add on
// the exponent field (exact: the result stays a normal FP32 for d in [-100, 40]). kCount: adds the
// number of codes whose value changed (rounded to a subnormal or zero).
template <bool kCount>
__device__ __forceinline__ uint32_t rescale_word(uint32_t x, int t, const int (&tcol)[4],
                                                 const uint32_t* s_val, uint32_t& changed) {
  uint32_t vb[4], mag[4];
  float v[4];
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    const uint32_t code = (x >> (8 * c)) & 0xFFu;
    const int d = min(40, max(-100, t - tcol[c]));
    vb[c] = s_val[code & 0x7Fu];
    mag[c] = vb[c] + (static_cast<uint32_t>(d) << 23);
    v[c] = __uint_as_float(mag[c] | ((code & 0x80u) << 24));
  }
  const uint32_t r = e4m3x2_from_f32(v[0], v[1]) | (e4m3x2_from_f32(v[2], v[3]) << 16);
  uint32_t y = 0;
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    const uint32_t code = (x >> (8 * c)) & 0xFFu;
    const uint32_t out = (r >> (8 * c)) & 0xFFu;
    const bool keep = vb[c] == 0u;  // zero or NaN code
    y |= (keep ? code : out) << (8 * c);
    if constexpr (kCount) {
      if (!keep && s_val[out & 0x7Fu] != mag[c]) ++changed;
    }
  }
  return y;
}

}  // namespace tdev

template <TransposeScalePolicy kPolicy, bool kCount>
__global__ void __launch_bounds__(kTransposeThreads,
                                  kPolicy == TransposeScalePolicy::ColumnTight ? 3 : 4)
    sm90_transpose_scaled_e4m3_1x128_kernel(
        const uint8_t* __restrict__ in, const float* __restrict__ in_scale,
        uint8_t* __restrict__ out, float* __restrict__ out_scale,
        unsigned long long* __restrict__ underflow, const int32_t M, const int32_t K,
        const __grid_constant__ detail::GroupTiles groups, const int kb_group) {
  constexpr bool kTight = kPolicy == TransposeScalePolicy::ColumnTight;
  __shared__ alignas(16) uint32_t s_tiles[2][128 * 32];
  __shared__ int s_t[128];
  __shared__ uint32_t s_val[128];
  __shared__ int s_wmax[4];
  __shared__ unsigned s_wcnt[kTransposeThreads / 32];

  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int nkb = K / 128, ntiles = groups.total_tiles;
  const int total = ntiles * nkb;  // (token tile, channel block) pairs
  // Pair order: ColumnTight (persistent) in groups of kb_group channel blocks (>= 1; >= K/128:
  // channel block fastest over all), token tiles within a group, channel block fastest; with the
  // underflow count channel block fastest over all (its fewer instructions measured faster there).
  // TileMax (one CTA per pair): token tile fastest. Each the fastest one measured (see NOTES).
  auto split = [&](int pair, int& tile, int& kb) {
    if constexpr (kTight && kCount) {
      tile = pair / nkb;
      kb = pair - tile * nkb;
    } else if constexpr (kTight) {
      tw::tight_pair(pair, ntiles, nkb, kb_group, tile, kb);
    } else {
      kb = pair / ntiles;
      tile = pair - kb * ntiles;
    }
  };
  if (tid < 128) {
    const uint32_t mag = static_cast<uint32_t>(tid);
    s_val[tid] = tw::e4m3_mag_is_value(mag) ? fmt::f32_bits(fmt::e4m3_to_f32(mag)) : 0u;
  }

  // 1. Tile `pair` into buffer b: 1024 chunks of 16 bytes, 4 per thread, swizzled; missing rows
  // zero-filled; one cp.async group (empty past the end). Its row scale goes to `scale`, its
  // token range to (m0, w); g: the group cursor (a CTA's pairs come in nondecreasing tile order
  // within a channel-block group).
  auto prefetch = [&](int pair, int b, float& scale, int& g, int32_t& m0, int32_t& w) {
    if (pair < total) {
      int tl, kb;
      split(pair, tl, kb);
      groups.tile_cols_walk(tl, g, m0, w);
      const uint8_t* src = in + static_cast<int64_t>(m0) * K + kb * 128;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int q = tid + kTransposeThreads * i, r = q >> 3, c = q & 7;
        const bool valid = r < w;
        cp_async_16(s_tiles[b] + tw::tile_chunk_word(r, c),
                    valid ? src + static_cast<int64_t>(r) * K + 16 * c : src, valid ? 16u : 0u);
      }
      if (tid < w) scale = __ldg(in_scale + static_cast<int64_t>(kb) * M + m0 + tid);
    }
    cp_async_commit();
  };

  // Persistent CTAs: pairs blockIdx.x, + gridDim.x, ...; the next pair's copies fly while this one
  // is computed (double-buffered tile).
  uint32_t changed = 0;
  float scale_next = 0.0f;
  int g_next = -1;
  int32_t m0_next = 0, w_next = 0;
  prefetch(static_cast<int>(blockIdx.x), 0, scale_next, g_next, m0_next, w_next);
  int it = 0;
  for (int pair = static_cast<int>(blockIdx.x); pair < total;
       pair += static_cast<int>(gridDim.x), ++it) {
    const uint32_t* s_tile = s_tiles[it & 1];
    int tile, kb;
    split(pair, tile, kb);
    const int k0 = kb * 128;
    const int32_t m0 = m0_next, w = w_next;
    const float scale = scale_next;
    scale_next = 0.0f;
    prefetch(pair + static_cast<int>(gridDim.x), (it & 1) ^ 1, scale_next, g_next, m0_next, w_next);

    // 2. Row exponents (overlapping the copies) and the tile's max.
    if (tid < 128) {
      const int t = tid < w ? tw::row_exponent(scale) : tw::kExpMin;
      s_t[tid] = t;
      const int wm = __reduce_max_sync(0xFFFFFFFFu, t);
      if (lane == 0) s_wmax[warp] = wm;
    }
    cp_async_wait<1>();  // this tile's group (the next one may still fly)
    __syncthreads();
    const int tbase = max(max(s_wmax[0], s_wmax[1]), max(s_wmax[2], s_wmax[3]));

    // 3. This thread's 16 token rows x 4 channels, and the rows' exponents.
    const int j = lane & 7, wd = (lane >> 3) + 4 * warp;
    uint32_t x[16];  // filled in step 5; steps 4 and 5 read the words from shared memory
    const int* trow = s_t + 16 * j;  // re-read from shared memory: keeps registers for x

    // 4. Column exponents. ColumnTight: max over the column's nonzero, non-NaN codes of
    // t_m + scale_exponent(|code|), then over the 8 lanes sharing the channels. TileMax: the max
    // row exponent.
    int tcol[4];
    if constexpr (kTight) {
      // FP16 pass (two codes per instruction): per column the max of |v| * 2^(t_m - tbase + 7),
      // exact in FP16 while t_m - tbase >= -21 (<= 448 * 2^7 < 65504 above; multiples of 2^-24
      // below). Used unless a warp holds a NaN code or a nonzero code more than 21 binades below
      // tbase.
      // Per word: the magnitudes (sign bits cleared before the decode, so the products are
      // non-negative), a NaN witness (a magnitude 0x7F carries into its byte's top bit) and a
      // deep witness (the magnitudes of rows more than 21 binades down), both OR-ed over the 16
      // words and tested once.
      uint32_t klo = 0u, khi = 0u;  // +0.0 in both halves
      uint32_t nan_acc = 0u, deep_acc = 0u;
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        const uint32_t xa = s_tile[tw::tile_thread_word(j, wd, i)] & 0x7F7F7F7Fu;
        const int d = trow[i] - tbase + 7;
        nan_acc |= xa + 0x01010101u;
        deep_acc |= d < -14 ? xa : 0u;
        const uint32_t sc = (static_cast<uint32_t>(max(d, -14) + 15) << 10) * 0x00010001u;
        klo = tdev::max_f16x2(klo, tdev::mul_f16x2(tdev::f16x2_from_e4m3x2(xa), sc));
        khi = tdev::max_f16x2(khi, tdev::mul_f16x2(tdev::f16x2_from_e4m3x2(xa >> 16), sc));
      }
      const bool slow16 = (nan_acc & 0x80808080u) != 0u || deep_acc != 0u;
      if (!__any_sync(0xFFFFFFFFu, slow16)) {
#pragma unroll
        for (int sh = 1; sh < 8; sh <<= 1) {
          klo = tdev::max_f16x2(klo, __shfl_xor_sync(0xFFFFFFFFu, klo, sh));
          khi = tdev::max_f16x2(khi, __shfl_xor_sync(0xFFFFFFFFu, khi, sh));
        }
        const float f[4] = {tdev::f16_to_f32(klo & 0xFFFFu), tdev::f16_to_f32(klo >> 16),
                            tdev::f16_to_f32(khi & 0xFFFFu), tdev::f16_to_f32(khi >> 16)};
#pragma unroll
        for (int c = 0; c < 4; ++c)
          tcol[c] =
              f[c] > 0.0f ? max(tw::kExpMin, tbase - 7 + fmt::scale_exponent(f[c])) : tw::kExpMin;
      } else {
        // FP32 pass: the column max as FP32 bits, value * 2^(t_m - tbase) = s_val + (d << 23) (an
        // int max orders positive floats; zero/NaN codes give d << 23 <= 0 and never win). Exact
        // while d >= -100; a warp holding a nonzero code more than 100 binades below tbase redoes
        // it exactly.
        int kmax[4] = {0, 0, 0, 0};
        bool deep = false;
#pragma unroll
        for (int i = 0; i < 16; ++i) {
          const uint32_t xi = s_tile[tw::tile_thread_word(j, wd, i)];
          const int d = trow[i] - tbase;
          deep |= d < -100 && (xi & 0x7F7F7F7Fu) != 0u;
          const int dk = max(d, -100) * (1 << 23);
#pragma unroll
          for (int c = 0; c < 4; ++c)
            kmax[c] = max(kmax[c], static_cast<int>(s_val[(xi >> (8 * c)) & 0x7Fu]) + dk);
        }
        if (!__any_sync(0xFFFFFFFFu, deep)) {
#pragma unroll
          for (int c = 0; c < 4; ++c) {
#pragma unroll
            for (int sh = 1; sh < 8; sh <<= 1)
              kmax[c] = max(kmax[c], __shfl_xor_sync(0xFFFFFFFFu, kmax[c], sh));
            tcol[c] = kmax[c] > 0
                          ? max(tw::kExpMin, tbase + fmt::scale_exponent(__int_as_float(kmax[c])))
                          : tw::kExpMin;
          }
        } else {
#pragma unroll
          for (int c = 0; c < 4; ++c) tcol[c] = tw::kExpMin;
#pragma unroll
          for (int i = 0; i < 16; ++i) {
            const int ti = trow[i];
            const uint32_t xi = s_tile[tw::tile_thread_word(j, wd, i)];
#pragma unroll
            for (int c = 0; c < 4; ++c) tcol[c] = max(tcol[c], ti + tdev::code_key(xi >> (8 * c)));
          }
#pragma unroll
          for (int c = 0; c < 4; ++c) {
#pragma unroll
            for (int sh = 1; sh < 8; sh <<= 1)
              tcol[c] = max(tcol[c], __shfl_xor_sync(0xFFFFFFFFu, tcol[c], sh));
          }
        }
      }
    } else {
#pragma unroll
      for (int c = 0; c < 4; ++c) tcol[c] = tbase;
    }

    // 5. Rescale every code by 2^(t_m - T_c): exact, or RNE to a subnormal/zero (hardware cvt).
    // Fast path (FP16, two codes per instruction) for words whose four shifts lie in [-14, 15] and
    // that hold no NaN; the FP32 path otherwise.
    // Partial tiles (w < 128): the zero-filled rows past w, never stored, take the exponent
    // sh.tmax instead of kExpMin, which keeps their (zero) words on the fast path; with kExpMin
    // every word of those rows failed f16_path_ok and the warps ran both paths.
    const tdev::F16Shifts sh = tdev::make_f16_shifts(tcol);
    auto rescale_rows = [&](auto partial) {
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        const uint32_t xi = s_tile[tw::tile_thread_word(j, wd, i)];
        int ti = trow[i];
        if constexpr (decltype(partial)::value) ti = 16 * j + i < w ? ti : sh.tmax;
        uint32_t y;
        if (tdev::f16_path_ok(xi, ti, sh)) {
          y = tdev::rescale_word_f16<kCount>(xi, ti, sh, changed);
        } else {
          y = tdev::rescale_word<kCount>(xi, ti, tcol, s_val, changed);
        }
        x[i] = y;
      }
    };
    if (w == 128)
      rescale_rows(std::false_type{});
    else
      rescale_rows(std::true_type{});

    // 6. Scales: lanes j < 4 of each channel group write channel 4wd + j.
    if (j < 4) {
      const int tj = j == 0 ? tcol[0] : j == 1 ? tcol[1] : j == 2 ? tcol[2] : tcol[3];
      out_scale[static_cast<int64_t>(tile) * K + k0 + 4 * wd + j] = fmt::exp2i(tj);
    }

    // 7. Transpose 4x4 byte blocks and store: channel c's 16 tokens are z[c][0..3].
    uint32_t z[4][4];
    tw::thread_transpose(x, z);
    uint8_t* dst = out + static_cast<int64_t>(k0 + 4 * wd) * M + m0 + 16 * j;
    // 16-byte stores for every lane whose 16 tokens are all valid (also in partial tiles: with
    // 4-byte stores there, a partial tile's 32-byte sectors were written piecemeal, which measured
    // slow); the lane holding a tile end that is not a multiple of 16 takes the slow stores.
    const int n = min(16, w - 16 * j);
    if (n == 16 && ((M | m0) & 15) == 0) {
#pragma unroll
      for (int c = 0; c < 4; ++c)
        *reinterpret_cast<uint4*>(dst + static_cast<int64_t>(c) * M) =
            make_uint4(z[c][0], z[c][1], z[c][2], z[c][3]);
    } else {
      const bool aligned4 = ((M | m0) & 3) == 0;
      if (n > 0) {
#pragma unroll
        for (int c = 0; c < 4; ++c)
          tdev::store_tokens_slow(dst + static_cast<int64_t>(c) * M, z[c], n, aligned4);
      }
    }
    __syncthreads();  // s_tiles[it & 1], s_t and s_wmax are free again
  }

  // 8. Underflow count: one integer atomic per CTA that has any.
  if constexpr (kCount) {
    const unsigned wsum = __reduce_add_sync(0xFFFFFFFFu, changed);
    if (lane == 0) s_wcnt[warp] = wsum;
    __syncthreads();
    if (tid == 0) {
      unsigned long long sum = 0;
#pragma unroll
      for (int i = 0; i < kTransposeThreads / 32; ++i) sum += s_wcnt[i];
      if (sum) atomicAdd(underflow, sum);
    }
  }
}

}  // namespace fp8flow::sm90
