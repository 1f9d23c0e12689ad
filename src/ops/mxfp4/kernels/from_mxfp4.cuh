// MXFP4 -> FP8 E4M3 with 1x128 power-of-two scales (device code):
//   sm90_mxfp4_to_e4m3_1x128:            row-wise, out [M][K], scale [K/128][M] (mxfp4_to_fp8)
//   sm90_mxfp4_to_e4m3_1x128_transposed: column-wise, out_t [K][M], scale [tiles][K], 128-token
//                                        tiles restarting at each group (mxfp4_to_fp8_transposed)
//
// Row-wise: a thread owns one 32-block per unit (16 B packed in: one LDG.128 + its E8M0 byte;
// 32 B out: two STG.128); 4 lanes own a 128-tile and combine their amax with two __shfl_xor. The
// element step is a __byte_perm table lookup (4 elements per PRMT, kernels/mxfp4_tables.h).
//
// Transposed: one CTA (128 threads) per token tile and two 128-channel blocks (items; the second's
// loads fly while the first is computed). Per item it stages the tile's 128 tokens x 64 B of packed
// codes (8 KB, cp.async, swizzled: conflict-free both ways) and the 128 x 4 E8M0 bytes in shared
// memory. Thread (channel group cg of 8, token chunk of 16) folds its 16 tokens
// into 16-bit column keys (exact log2 of |value|), the 8 lanes sharing a column reduce with
// __shfl_xor (column scales from the keys in closed form), and it writes 8 output rows k of 16
// tokens each (one STG.128 per row when the address is 16-byte aligned, else bytes). Elements: in
// a warp whose every element has D = X - T in [-5, 22] (mx::int_path_ok; the common case: block
// exponents spread over <= ~11 binades in the tile) by byte adds, four codes per add
// (mx::e2m1x8_to_e4m3_int: the results are normal E4M3, exact); otherwise through the FP16 unit
// two at a time: e2m1(c) 2^-6 from a PRMT table, times 2^(X - T + 6) (one DPX clamp of the
// per-token and per-column exponents), then the hardware E4M3x2 conversion, which also rounds the
// subnormal outputs (mx::f16hi_pair_to_e4m3x2).
//
// NOTES (session 9, H100): 0.1743 ms, 70% of copy, ALU-bound (ALU pipe ~75% busy; the fast path
// is ~11 SASS instructions per element: per 128 elements and thread 260 PRMT, 260 LOP3, 164 SHF,
// 145 IMAD.SHL, 140 VIMNMX/VIADDMNMX, 64 F2FP, 32 HMUL2). The column keys are ~26% of it:
// PRMT + IMAD.SHL + VIADDMNMX(min) + VIMNMX(max) per two elements. An untried lever: a PRMT in
// sign-replicate mode (raw prmt.b32: __byte_perm drops selector bit 3) giving a "no element" lane
// of -128 for code 0, so one VIADDMNMX.S16 max(base + key, acc) replaces the min/max pair; exact
// only while a tile's block exponents X span less than 64 (else the old path), and an all-zero
// column must be told apart from the -128 lanes (acc below the tile's smallest base + 1).
// Session 12 (H100, commit 7b79c85, reverted by 8de40a1): the lever above, done as "gap
// keys" (nonzero keys 248..255 above 2 sb so zero codes never win; tiles with a NaN block or an
// exponent span > 123 keep the old path), cut the fast path from ~10.8 to ~8.6 static SASS per
// element, but the time did not move: 0.1749-0.1750 ms vs 0.1738 (ops, 2 rounds each), ncu 171.3
// vs 171.9 us, issue slots 59 -> 52%, ALU 78 -> 70%, with 24 B of spills at 96 registers (also with
// the old paths outlined). So the kernel is no longer bound by ALU issue alone: at 5 CTAs of 4
// warps per SM (30% occupancy) each CTA computes its items after their loads landed, and DRAM sits
// at 68%. Tried next, same session (commit 3a0a277, reverted by 9bb5c6d): a persistent kernel
// (SMs x 5 CTAs) walking the items with a ring of 3 or 4 cp.async stages, 2-3 items' loads in
// flight during every item's math, one barrier per item, the same mx_tr_item: slower, 0.1775-0.1780
// ms (3 stages) and 0.1814-0.1816 (4) against 0.1742-0.1745 for this kernel, same bits
// (Mxfp4Gpu 9 tests, memcheck 0, racecheck 0). Neither fewer ALU instructions nor more bytes in
// flight moved it alone; what binds is not yet identified (ncu source-level stall sampling of
// both variants is the next step).
// Session 13: ncu source-level sampling (H100) put 26% of the warp samples on the first use of
// the per-token scale bytes (a full DRAM latency per CTA before any compute) next to an ALU pipe
// at 78%: latency and ALU pressure at once. Both attempts came back as variants in one binary
// with their combinations and a kLean form (mx_tr_item: no token's code word or scale byte kept
// across the column reduction; 80 registers, 6 CTAs per SM, no spills). Measured (H100,
// `fp8flow-bench ops --only mxfp4_to_fp8_transposed --reps 100`, 2 rounds, ms): this kernel
// 0.1741-0.1743; persistent ring channel-blocks-fastest 0.1780, + gap keys 0.1724-0.1730;
// ring token-tiles-fastest 0.1864-0.1868, + gap keys 0.1810-0.1812, + lean (7 CTAs) 0.2055-0.2059;
// gap keys alone 0.1759; lean alone 0.1893; **lean + gap keys 0.1706-0.1707 (71.5% of copy), the
// session-13 default**; the persistent kernel is gone again (its code: commit 4db836e). Still 10%
// short of the 80% target (0.153 ms): each lever is worth 1-2%, none unlocks the DRAM rate. (What
// did, session 14 below: the scale bytes' DRAM over-fetch, not the instructions.)
// Session 14 (H100): the integer element path (variant 2 of that session's binary) cut the
// instructions 11% (ncu: 95.6M -> 85.1M, ALU pipe 85 -> 77%) but the time only 1.3% (0.1711 ->
// 0.1690 ms). A null kernel (the same loads and stores, no arithmetic) ran at 0.177 ms: the
// memory traffic itself was the limit. Its culprit: the per-token scale bytes were read one byte at
// a time with __ldcs (evict-first), and each 32-byte sector of them serves the CTAs of 4
// channel-block pairs, launched ~1/3 wave apart: DRAM read 165.9 MB for 124.7 MB of input (ncu).
// kCachedScales (default caching, both items' 8 bytes in one 8-byte load where aligned): DRAM
// reads 128.8 MB, and on one H100 (`--only mxfp4_to_fp8_transposed --reps 100`, 3 rounds) the
// session-13 kernel 0.1811-0.1815 ms, with cached scales 0.1532-0.1534, with cached scales and the
// integer path (the default now) 0.1474-0.1477 ms: 82.7% of the 1 GiB copy, 84.8% of a same-size
// copy. Tried and dropped: 7 and 8 CTAs per SM (72 / 64 registers, spills: slower), plain instead
// of streaming stores (same).
// Napkin math at 32768 x 7168: reads 0.5 + 1/32 B/elem, writes 1 + 4/128 B/elem = 1.56 B/elem =
// 367 MB; at 2.4 TB/s (80% of an H100's copy bandwidth) 0.153 ms for either kernel.
// Bench: fp8flow-bench ops (mxfp4_to_fp8, mxfp4_to_fp8_transposed rows).
#pragma once

#include <cuda_runtime.h>

#include "common/cp_async.cuh"
#include "common/groups.h"
#include "ops/mxfp4/kernels/mxfp4_tables.h"
#include "ops/mxfp4/kernels/to_mxfp4.cuh"

namespace fp8flow::sm90 {

constexpr int kFromMxThreads = 256;

struct MxToFp8Params {
  const uint4* in;          // E2M1x2 [M][K]: block u at in[u]
  const uint8_t* in_scale;  // E8M0 [M][K/32]: block u at in_scale[u]
  uint4* out;               // E4M3 [M][K]: block u at out[2u], out[2u + 1]
  float* out_scale;         // F32 [K/128][M]
  uint32_t rows;            // M
  uint32_t blocks_per_row;  // K/32
  mx::FastDiv div_blocks;
  uint32_t code[mx::E2m1ToE4m3::kShifts][2];
};

template <int kUnits>
__global__ void __launch_bounds__(kFromMxThreads)
    sm90_mxfp4_to_e4m3_1x128(const __grid_constant__ MxToFp8Params p) {
  constexpr int kRows = mx::E2m1ToE4m3::kShifts;
  __shared__ __align__(8) uint32_t s_code[kRows][2];
  for (int i = threadIdx.x; i < kRows * 2; i += kFromMxThreads)
    s_code[i / 2][i % 2] = p.code[i / 2][i % 2];

  const UnitCursor cur(p.div_blocks, p.blocks_per_row, kFromMxThreads * kUnits);
  uint4 v[kUnits];
  uint8_t sb[kUnits];
  uint32_t row[kUnits], col[kUnits];
#pragma unroll
  for (int j = 0; j < kUnits; ++j) {
    cur.at(p.div_blocks, p.blocks_per_row, j * kFromMxThreads + threadIdx.x, row[j], col[j]);
    v[j] = make_uint4(0, 0, 0, 0);
    sb[j] = 0;
    if (row[j] < p.rows) {
      const size_t u = static_cast<size_t>(row[j]) * p.blocks_per_row + col[j];
      v[j] = __ldcs(p.in + u);
      sb[j] = __ldcs(p.in_scale + u);
    }
  }
  __syncthreads();  // s_code

#pragma unroll
  for (int j = 0; j < kUnits; ++j) {
    const uint32_t w[4] = {v[j].x, v[j].y, v[j].z, v[j].w};
    float amax = mx::mx_block_amax(w, sb[j]);
    amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, 1));
    amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, 2));
    const int t = fmt::scale_exponent(amax);
    const int r = mx::mx_code_row(sb[j], t);
    uint32_t o[8];
    mx::mx_block_encode(w, sb[j], t, s_code[r][0], s_code[r][1], o);
    if (row[j] < p.rows) {
      const size_t u = static_cast<size_t>(row[j]) * p.blocks_per_row + col[j];
      __stcs(p.out + 2 * u, make_uint4(o[0], o[1], o[2], o[3]));
      __stcs(p.out + 2 * u + 1, make_uint4(o[4], o[5], o[6], o[7]));
      if ((threadIdx.x & 3) == 0)
        p.out_scale[static_cast<size_t>(col[j] / 4) * p.rows + row[j]] = fmt::exp2i(t);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Transposed.

constexpr int kTrThreads = 128;
constexpr int kTrItems = 2;  // channel blocks per CTA (see the kernel)
static_assert(kTrItems >= 1 && kTrItems <= 4, "the waits below are written for up to 4 items");

struct MxToFp8TParams {
  const uint8_t* in;        // E2M1x2 [M][K]: row m at in + m * K/2
  const uint8_t* in_scale;  // E8M0 [M][K/32]
  uint8_t* out;             // E4M3 [K][M]
  float* out_scale;         // F32 [tiles][K]
  uint32_t M, K;
  mx::E2m1Key key;
  detail::GroupTiles groups;  // by value; tile_cols(blockIdx.x)
};

// Shared-memory swizzle of the staged tile (row m = token, 16 words of 8 channels each). Thread
// (cg, chunk) reads word cg of rows chunk*16 + i: the 8 chunks of a warp step hit rows 16 apart.
// Flipping the row parity for m >= 64 and XOR-ing the word with ((m >> 4) & 3) << 2 puts those 32
// reads in 32 distinct banks, and keeps each 16-byte quarter of a row contiguous for STS.128.
__device__ __forceinline__ uint32_t tr_word_offset(uint32_t m, uint32_t word) {
  const uint32_t prow = m ^ ((m >> 6) & 1u);
  return prow * 16u + (word ^ (((m >> 4) & 3u) << 2));
}

// One (token tile, 128-channel block) item from its staged codes and scale bytes: column keys,
// scales, elements, stores. `tile` indexes the scale rows ([tiles][K]). kGap: the gap-key path
// (below) is compiled in and taken where cta_gap says the tile allows it (bmax = 2 sb_max).
// kLean (fewer registers, for more CTAs per SM): no token's code word or scale byte stays in a
// register across the column reduction; the element phase reads them again from shared memory
// (volatile, so the compiler cannot keep the first reads instead) and runs in two column halves
// (pairs 0-1 then 2-3, output rows 0-3 then 4-7: half the o[] registers, 16-byte stores still).
// kInt (with kGap): on gap tiles, a warp whose 32 columns and the tile's block exponents pass
// mx::int_path_ok (sb_lo: the tile's smallest scale byte inside its width) takes the integer
// element path; the condition and the column addends cost ~30 instructions per item and thread.
template <bool kGap, bool kLean = false, bool kInt = false>
__device__ __forceinline__ void mx_tr_item(const MxToFp8TParams& p, const uint32_t* s_data,
                                           const uint8_t (*s_sb)[128], bool cta_slow, bool cta_gap,
                                           uint32_t bmax, uint32_t sb_lo, int32_t m0, int32_t width,
                                           uint32_t kb, uint32_t tile) {
  const uint32_t tid = threadIdx.x;
  const uint32_t lane = tid & 31, cg = (tid >> 5) * 4 + (lane & 3), chunk = lane >> 2;
  const uint32_t blk = cg >> 2;  // the 32-block of these 8 channels (same for the whole warp)
  const uint4 sbv = *reinterpret_cast<const uint4*>(&s_sb[blk][chunk * 16]);
  const uint32_t sbw[4] = {sbv.x, sbv.y, sbv.z, sbv.w};
  uint32_t word[16];
  if constexpr (!kLean) {
#pragma unroll
    for (int i = 0; i < 16; ++i) word[i] = s_data[tr_word_offset(chunk * 16 + i, cg)];
  }
  // Token i's code word (kLean: read again; NaN tokens' as 0 where nan0, as the old paths need).
  auto code_word = [&](int i, bool nan0) -> uint32_t {
    if constexpr (kLean) {
      const uint32_t w =
          static_cast<const volatile uint32_t*>(s_data)[tr_word_offset(chunk * 16 + i, cg)];
      return nan0 && ((sbw[i / 4] >> (8 * (i % 4))) & 0xFFu) == fmt::kE8M0NaN ? 0u : w;
    } else {
      return word[i];
    }
  };
  // The element phase's scale words (kLean: read again).
  auto scale_words = [&](uint32_t sbc[4]) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if constexpr (kLean)
        sbc[k] = reinterpret_cast<const volatile uint32_t*>(&s_sb[blk][chunk * 16])[k];
      else
        sbc[k] = sbw[k];
    }
  };
  constexpr int kHalves = kLean ? 2 : 1, kPairs = 4 / kHalves;  // element phase: column halves

  // Output rows k = kb*128 + cg*8 + j, tokens m0 + chunk*16 .. +15 (16-byte stores when aligned).
  const int32_t valid = width - static_cast<int32_t>(chunk * 16);
  const bool vec = valid >= 16 && (p.M % 16 == 0) && (m0 % 16 == 0);
  float* scale_row_out = p.out_scale + static_cast<size_t>(tile) * p.K + kb * 128 + cg * 8;
  auto store_row = [&](int j, uint32_t o[4]) {
    if (valid <= 0) return;
    uint8_t* dst = p.out + static_cast<size_t>(kb * 128 + cg * 8 + j) * p.M + m0 + chunk * 16;
    if (vec) {
      __stcs(reinterpret_cast<uint4*>(dst), make_uint4(o[0], o[1], o[2], o[3]));
    } else {
#pragma unroll
      for (int i = 0; i < 16; ++i)
        if (i < valid) dst[i] = static_cast<uint8_t>(o[i / 4] >> (8 * (i % 4)));
    }
  };

  if constexpr (kGap) {
    if (cta_gap) {
      // Gap keys (mx::kGapTable): no NaN tokens (every sb <= 252) and no masking of zero codes.
      // Its element phase repeats the regular path's below (other FP16 exponent operands, no NaN
      // mask): one shared lambda for both made NVVM keep t_col in local memory (a 32 B stack
      // frame at 80 registers, session 13), so each path keeps its own copy.
      uint32_t sbl[16];  // each token's sb in both lanes: key base (doubled) and FP16 exponent
#pragma unroll
      for (int i = 0; i < 16; ++i) sbl[i] = mx::sb_lanes(sbw[i / 4], i % 4);
      uint32_t acc[4] = {0, 0, 0, 0};
#pragma unroll
      for (int i = 0; i < 16; ++i)
        mx::gap_key_accumulate(code_word(i, false), sbl[i] << 1, p.key.glo, p.key.ghi, acc);
#pragma unroll
      for (int off = 4; off < 32; off *= 2)
#pragma unroll
        for (int a = 0; a < 4; ++a)
          acc[a] = mx::vmax_u16x2(acc[a], __shfl_xor_sync(0xFFFFFFFFu, acc[a], off));
      int t_col[8];
#pragma unroll
      for (int j = 0; j < 8; ++j)
        t_col[j] = mx::gap_key_scale_exponent(mx::column_key(acc, j), bmax);
      int t_mine = t_col[0];
#pragma unroll
      for (int j = 1; j < 8; ++j) t_mine = chunk == static_cast<uint32_t>(j) ? t_col[j] : t_mine;
      scale_row_out[chunk] = fmt::exp2i(t_mine);

      if constexpr (kInt) {
        // The integer path (mx::e2m1x8_to_e4m3_int) where the whole warp's elements allow it.
        int tmin = t_col[0], tmax = t_col[0];
#pragma unroll
        for (int j = 1; j < 8; ++j) {
          tmin = min(tmin, t_col[j]);
          tmax = max(tmax, t_col[j]);
        }
        const int xlo5 = static_cast<int>(sb_lo) - 127 + mx::kIntBias;
        const int spread = static_cast<int>(bmax >> 1) - static_cast<int>(sb_lo);
        if (__all_sync(0xFFFFFFFFu, mx::int_path_ok(xlo5, spread, tmin, tmax))) {
          const uint32_t ca[2] = {
              mx::int_column_addends(xlo5, t_col[0], t_col[1], t_col[2], t_col[3]),
              mx::int_column_addends(xlo5, t_col[4], t_col[5], t_col[6], t_col[7])};
          const uint32_t lo4 = sb_lo * 0x01010101u;
          uint32_t sbc[4];
          scale_words(sbc);
          uint32_t o[8][4];
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            uint32_t r[4][2];  // [token x][h]: E4M3 codes of columns 4h .. 4h + 3
#pragma unroll
            for (int x = 0; x < 4; ++x)
              mx::e2m1x8_to_e4m3_int(code_word(4 * q + x, false),
                                     mx::int_token_addend(sbc[q], x, lo4), ca, r[x]);
#pragma unroll
            for (int h = 0; h < 2; ++h)  // 4 tokens x 4 columns, bytes transposed
              detail::transpose4x4(r[0][h], r[1][h], r[2][h], r[3][h], o[4 * h][q], o[4 * h + 1][q],
                                   o[4 * h + 2][q], o[4 * h + 3][q]);
          }
#pragma unroll
          for (int j = 0; j < 8; ++j) store_row(j, o[j]);
          return;
        }
      }
      uint32_t nt[4];
#pragma unroll
      for (int pp = 0; pp < 4; ++pp)
        nt[pp] = mx::f16_column_exps_sb(t_col[2 * pp], t_col[2 * pp + 1]);
#pragma unroll
      for (int hf = 0; hf < kHalves; ++hf) {
        uint32_t sbc[4];
        scale_words(sbc);
        uint32_t o[2 * kPairs][4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          uint32_t r[4][kPairs];
#pragma unroll
          for (int x = 0; x < 4; ++x) {
            const int i = 4 * q + x;
            const uint32_t xb = kLean ? mx::sb_lanes(sbc[q], x) : sbl[i];
            uint32_t h[2];
            mx::e2m1x8_to_f16hi(code_word(i, false), h);
#pragma unroll
            for (int pl = 0; pl < kPairs; ++pl) {
              const int pp = hf * kPairs + pl;
              r[x][pl] = mx::f16hi_pair_to_e4m3x2(h[pp / 2], pp, xb, nt[pp]);
            }
          }
#pragma unroll
          for (int pl = 0; pl < kPairs; ++pl) {
            const uint32_t u01 = mx::prmt(r[0][pl], r[1][pl], 0x5140u);
            const uint32_t u23 = mx::prmt(r[2][pl], r[3][pl], 0x5140u);
            o[2 * pl][q] = mx::prmt(u01, u23, 0x5410u);
            o[2 * pl + 1][q] = mx::prmt(u01, u23, 0x7632u);
          }
        }
#pragma unroll
        for (int j = 0; j < 2 * kPairs; ++j) store_row(hf * 2 * kPairs + j, o[j]);
      }
      return;
    }
  }

  uint32_t nanmask[4] = {0, 0, 0, 0};
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    const uint32_t sb = (sbw[i / 4] >> (8 * (i % 4))) & 0xFFu;
    if (sb == fmt::kE8M0NaN) {
      if constexpr (!kLean) word[i] = 0;  // kLean: code_word(i, true)
      nanmask[i / 4] |= 0x7Fu << (8 * (i % 4));
    }
  }

  if (!cta_slow) {
    // Column keys over the 16 tokens, then over the 8 lanes (chunks) sharing the columns.
    uint32_t acc[4] = {0, 0, 0, 0};
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const int x = fmt::e8m0_exponent(static_cast<uint8_t>(sbw[i / 4] >> (8 * (i % 4))));
      mx::key_accumulate(code_word(i, true), mx::e2m1_key_base(x) * 0x00010001u, p.key.lo, p.key.hi,
                         acc);
    }
#pragma unroll
    for (int off = 4; off < 32; off *= 2)
#pragma unroll
      for (int a = 0; a < 4; ++a)
        acc[a] = mx::vmax_u16x2(acc[a], __shfl_xor_sync(0xFFFFFFFFu, acc[a], off));
    int t_col[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) t_col[j] = mx::key_scale_exponent(mx::column_key(acc, j));
    // Scales: lane (cg, chunk) writes column cg*8 + chunk.
    int t_mine = t_col[0];
#pragma unroll
    for (int j = 1; j < 8; ++j) t_mine = chunk == static_cast<uint32_t>(j) ? t_col[j] : t_mine;
    scale_row_out[chunk] = fmt::exp2i(t_mine);

    // -T of the column pairs (2p, 2p + 1), one per 16-bit lane.
    uint32_t nt[4];
#pragma unroll
    for (int p = 0; p < 4; ++p) nt[p] = mx::f16_column_exps(t_col[2 * p], t_col[2 * p + 1]);
      // Per 4 tokens: each token's 8 codes through the FP16 unit in 4 column pairs, then the pairs
      // of the 4 tokens rearranged into 4-token words of each column (2 PRMT levels).
#pragma unroll
    for (int hf = 0; hf < kHalves; ++hf) {
      uint32_t sbc[4];
      scale_words(sbc);
      uint32_t o[2 * kPairs][4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        uint32_t r[4][kPairs];  // [token x][pair p]: E4M3 codes of columns 2p, 2p + 1
#pragma unroll
        for (int x = 0; x < 4; ++x) {
          const int i = 4 * q + x;
          const uint32_t xb = mx::f16_token_exp(
              fmt::e8m0_exponent(static_cast<uint8_t>(sbc[i / 4] >> (8 * (i % 4)))));
          uint32_t h[2];
          mx::e2m1x8_to_f16hi(code_word(i, true), h);
#pragma unroll
          for (int pl = 0; pl < kPairs; ++pl) {
            const int pp = hf * kPairs + pl;
            r[x][pl] = mx::f16hi_pair_to_e4m3x2(h[pp / 2], pp, xb, nt[pp]);
          }
        }
#pragma unroll
        for (int pl = 0; pl < kPairs; ++pl) {
          const uint32_t u01 = mx::prmt(r[0][pl], r[1][pl], 0x5140u);  // x0 c0, x1 c0, x0 c1, x1 c1
          const uint32_t u23 = mx::prmt(r[2][pl], r[3][pl], 0x5140u);
          // NaN tokens: their codes were zeroed (-> 0x00); make them 0x7F.
          o[2 * pl][q] = mx::prmt(u01, u23, 0x5410u) | nanmask[q];
          o[2 * pl + 1][q] = mx::prmt(u01, u23, 0x7632u) | nanmask[q];
        }
      }
#pragma unroll
      for (int j = 0; j < 2 * kPairs; ++j) store_row(hf * 2 * kPairs + j, o[j]);
    }
    return;
  }

  // Some token has X >= 126 (large elements decode to Inf): plain fmt:: math, one column at a
  // time; Inf elements are excluded from the maxima and encode as NaN.
#pragma unroll 1
  for (int j = 0; j < 8; ++j) {
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const uint8_t sb = static_cast<uint8_t>(sbw[i / 4] >> (8 * (i % 4)));
      const float v =
          fmt::e2m1_to_f32(static_cast<uint8_t>((code_word(i, true) >> (4 * j)) & 0xFu)) *
          fmt::e8m0_to_f32(sb);
      if (sb != fmt::kE8M0NaN && fmt::f32_is_finite(v)) amax = fmaxf(amax, fabsf(v));
    }
#pragma unroll
    for (int off = 4; off < 32; off *= 2)
      amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, off));
    const int t = fmt::scale_exponent(amax);
    if (chunk == static_cast<uint32_t>(j)) scale_row_out[j] = fmt::exp2i(t);
    uint32_t o[4] = {0, 0, 0, 0};
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const uint8_t sb = static_cast<uint8_t>(sbw[i / 4] >> (8 * (i % 4)));
      const float v =
          fmt::e2m1_to_f32(static_cast<uint8_t>((code_word(i, true) >> (4 * j)) & 0xFu)) *
          fmt::e8m0_to_f32(sb);
      const uint32_t c = sb == fmt::kE8M0NaN ? 0x7Fu : fmt::e4m3_from_f32(fmt::mul_pow2(v, -t));
      o[i / 4] |= c << (8 * (i % 4));
    }
    store_row(j, o);
  }
}

// The gap-key tile test (kGap kernels), in two halves around the item's barrier. Publish: token
// tid's 4 scale bytes `sb` (0 past the tile's width: neutral); each warp's largest byte and
// 255 - its smallest byte > mx::kGapIgnoreSb (REDUX) in one shared word per warp; with kInt also
// 255 - the smallest byte of the tokens inside the width (`valid`) in a second word. Read (after
// the barrier): the CTA's range, whether the gap path is exact for it, bmax = 2 sb_max, and
// (kInt) the smallest byte sb_lo (255 where kInt is off).
template <bool kInt>
__device__ __forceinline__ void tr_gap_publish(uint32_t sb, bool valid, uint32_t* s_rng) {
  uint32_t hi = 0, lo = 255, lo_all = 255;
#pragma unroll
  for (int b = 0; b < 4; ++b) {
    const uint32_t x = (sb >> (8 * b)) & 0xFFu;
    hi = max(hi, x);
    lo = x > mx::kGapIgnoreSb ? min(lo, x) : lo;
    lo_all = min(lo_all, x);
  }
  hi = __reduce_max_sync(0xFFFFFFFFu, hi);
  lo = 255 - __reduce_max_sync(0xFFFFFFFFu, 255 - lo);
  if ((threadIdx.x & 31) == 0) s_rng[threadIdx.x >> 5] = hi | ((255 - lo) << 16);
  if constexpr (kInt) {
    const uint32_t nlo = __reduce_max_sync(0xFFFFFFFFu, valid ? 255 - lo_all : 0u);
    if ((threadIdx.x & 31) == 0) s_rng[kTrThreads / 32 + (threadIdx.x >> 5)] = nlo;
  }
}
template <bool kInt>
__device__ __forceinline__ void tr_gap_read(const uint32_t* s_rng, bool& cta_gap, uint32_t& bmax,
                                            uint32_t& sb_lo) {
  static_assert(kTrThreads == 128, "s_rng is read as uint4s");
  const uint4 r = *reinterpret_cast<const uint4*>(s_rng);
  const uint32_t m = mx::vmax_u16x2(mx::vmax_u16x2(r.x, r.y), mx::vmax_u16x2(r.z, r.w));
  const uint32_t sb_max = m & 0xFFFFu, sb_min = 255 - (m >> 16);
  cta_gap = mx::gap_keys_exact(sb_max, sb_min);
  bmax = 2 * sb_max;
  sb_lo = 255;
  if constexpr (kInt) {
    const uint4 n = *reinterpret_cast<const uint4*>(s_rng + kTrThreads / 32);
    sb_lo = 255 - max(max(n.x, n.y), max(n.z, n.w));
  }
}

// Registers: unbounded the FP16 path takes 125 (4 CTAs per SM); capped at 5 CTAs per SM (96, a few
// spill bytes, L1-resident) ncu measured 180 us vs 186 us at 32768x7168 on an H100 (session 5).
// Items: a CTA takes kTrItems channel blocks of one token tile, all their codes requested up front
// (cp.async straight into the swizzled shared tiles), so item i + 1's loads fly while item i is
// computed. Session 9 (H100, 32768 x 7168): ncu had the one-item CTAs stalled on their loads (long
// scoreboard the top stall, ALU pipe 75%); 2 items 0.1874 -> 0.1743 ms (64.7 -> 70.0% of copy),
// 4 items 0.2023 ms.
// kGap (commit 7b79c85): tiles that pass mx::gap_keys_exact take the gap-key path
// (tr_gap_publish / tr_gap_read around the item's barrier); the others the paths above.
// kLean (see mx_tr_item): kTrLeanMinBlocks CTAs per SM (80 registers, no spills; at 7 CTAs, 72
// registers, ptxas spilled 36-40 bytes, at 8, 64 registers, 76-104). kInt: the integer element
// path (mx_tr_item). kCachedScales: the scale bytes with default caching, 8 bytes per load where
// aligned (see the session-14 note above). <true, true, true, true> is the default kernel
// (FP8FLOW_MX_TR_VARIANT: mxfp4_sm90.cu lists the others).
constexpr int kTrMinBlocks = 5;
constexpr int kTrLeanMinBlocks = 6;
template <bool kGap, bool kLean = false, bool kInt = false, bool kCachedScales = false>
__global__ void __launch_bounds__(kTrThreads, kLean ? kTrLeanMinBlocks : kTrMinBlocks)
    sm90_mxfp4_to_e4m3_1x128_transposed(const __grid_constant__ MxToFp8TParams p) {
  __shared__ __align__(16) uint32_t s_data[kTrItems][128 * 16];
  __shared__ __align__(16) uint8_t s_sb[kTrItems][4][128];
  __shared__ __align__(16) uint32_t s_rng[kTrItems][2 * kTrThreads / 32];

  const uint32_t tid = threadIdx.x;
  int32_t m0, width;
  p.groups.tile_cols(static_cast<int32_t>(blockIdx.x), m0, width);
  const uint32_t w = static_cast<uint32_t>(width);
  const uint32_t kb0 = blockIdx.y * kTrItems, nkb = p.K / 128;
  const uint32_t items = nkb - kb0 < kTrItems ? nkb - kb0 : kTrItems;
  const size_t row_bytes = p.K / 2, scale_row = p.K / 32;

  // Stage every item: 4 x 16 B per thread (rows tid/4 + 32j, quarter tid%4), zeros past the
  // tile's width; one commit group per item (empty past `items`, so the waits count alike).
#pragma unroll
  for (int it = 0; it < kTrItems; ++it) {
    if (static_cast<uint32_t>(it) < items) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint32_t r = (tid >> 2) + 32 * j;
        const uint8_t* src =
            p.in + (m0 + (r < w ? r : 0)) * row_bytes + (kb0 + it) * 64 + (tid & 3) * 16;
        cp_async_16(&s_data[it][tr_word_offset(r, (tid & 3) * 4)], src, r < w ? 16u : 0u);
      }
    }
    cp_async_commit();
  }
  // Scale bytes of token tid for every item (0 past the width: X = -127, no effect).
  uint32_t sb4[kTrItems];
  bool slow[kTrItems];
  // kCachedScales: default caching (the CTAs of the next 3 channel-block pairs read the rest of
  // each 32-byte sector), and both items' 8 bytes in one load where aligned.
  const uint8_t* sp0 = p.in_scale + (m0 + tid) * scale_row + kb0 * 4;
  bool vec_sb = false;
  if constexpr (kCachedScales && kTrItems == 2)
    vec_sb = items == kTrItems && (reinterpret_cast<uintptr_t>(sp0) & 7u) == 0;
  if (vec_sb) {
    uint2 v = make_uint2(0, 0);
    if (tid < w) v = __ldg(reinterpret_cast<const uint2*>(sp0));
    sb4[0] = v.x;
    sb4[kTrItems - 1] = v.y;
  }
#pragma unroll
  for (int it = 0; it < kTrItems; ++it) {
    if (!vec_sb) {
      sb4[it] = 0;
      if (tid < w && static_cast<uint32_t>(it) < items) {
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          const uint8_t* q = sp0 + 4 * it + b;
          const uint32_t x = kCachedScales ? __ldg(q) : __ldcs(q);
          sb4[it] |= x << (8 * b);
        }
      }
    }
    slow[it] = false;
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const uint32_t x = (sb4[it] >> (8 * b)) & 0xFFu;
      slow[it] |= x == 253 || x == 254;  // X >= 126: large elements decode to Inf
    }
  }
#pragma unroll 1
  for (int it = 0; it < static_cast<int>(items); ++it) {
    // Wait for item it's group: at most kTrItems - 1 - it newer groups may still be pending.
    if (it == 0) cp_async_wait<kTrItems - 1>();
    if (it == 1) cp_async_wait<(kTrItems > 2 ? kTrItems - 2 : 0)>();
    if (it == 2) cp_async_wait<(kTrItems > 3 ? kTrItems - 3 : 0)>();
    if (it == 3) cp_async_wait<0>();
    uint32_t sb = sb4[0];
    bool sl = slow[0];
#pragma unroll
    for (int i = 1; i < kTrItems; ++i) {
      sb = it == i ? sb4[i] : sb;
      sl = it == i ? slow[i] : sl;
    }
#pragma unroll
    for (int b = 0; b < 4; ++b) s_sb[it][b][tid] = static_cast<uint8_t>(sb >> (8 * b));
    if constexpr (kGap) tr_gap_publish<kInt>(sb, tid < w, s_rng[it]);
    const bool cta_slow = __syncthreads_or(sl);
    bool cta_gap = false;
    uint32_t bmax = 0, sb_lo = 255;
    if constexpr (kGap) tr_gap_read<kInt>(s_rng[it], cta_gap, bmax, sb_lo);
    mx_tr_item<kGap, kLean, kInt>(p, s_data[it], s_sb[it], cta_slow, cta_gap, bmax, sb_lo, m0,
                                  width, kb0 + it, blockIdx.x);
  }
}

}  // namespace fp8flow::sm90
