// sm90_quantize_tile: X [M][K] (F32/BF16) -> FP8 row-wise (1x128 along K), column-wise (128x1
// along tokens, written transposed as X^T [K][M]), or both, from ONE read of X. One CTA per
// (128-token tile, 128-channel tile); token tiles restart at every group of out_t.col_groups.
//
// Napkin math (32768 x 7168 BF16, H100 copy 3.0 TB/s read+write): read 470 MB; write 235 MB per
// FP8 output plus 7.3 MB of scales each. Row-wise or column-wise alone: 712 MB, 0.24 ms at copy
// speed (0.30 ms at the 80% target); both: 955 MB, 0.32 ms (0.40 ms at 80%).
// Bench: fp8flow-bench ops --op quantize | quantize_transposed | quantize_both (32768 x 7168 BF16).
//
// Thread layout (kThreads = 8 * kTpr): thread (cc, tc) holds 16 tokens tc*16..tc*16+15 of kVec
// channels cc*kVec.. (BF16: kVec 8, kTpr 16, 128 threads; F32: kVec 4, kTpr 32, 256 threads),
// loaded as 16 row-contiguous 16-byte vectors: each warp load covers 256-byte (BF16) or 512-byte
// (F32) row segments, 256 bytes in flight per thread.
//   rows:    token amax = local max over kVec, then __shfl_xor over the kTpr lanes of the row;
//            codes go out as kVec bytes per token (8-byte / 4-byte stores, a warp covers 128 B of
//            a row); scale of token j stored by lane j (coalesced along M).
//   columns: channel amax = local max over 16 tokens, then the 8 token chunks (different warps)
//            meet in 4 KB of shared memory; each thread then writes, per channel, its 16 tokens as
//            one 16-byte store into row k of X^T (narrower when the address is not 16-byte aligned
//            or the tile ends inside the chunk).
// NOTES:
// - No shared-memory staging of the tile: the register tile is already the transpose's unit
//   (16 tokens x kVec channels), so there is no bank-conflict problem to solve, and the only
//   cross-warp traffic is 8 partial maxima per channel.
// - Padding tokens (past the tile end) and channels (past K) are loaded as 0: they never raise an
//   amax and are never stored. Tokens of another group are outside the tile, so never touched.
// - amax uses a NaN-propagating max, so a thread learns "my values are all finite" for free.
//   Threads holding a NaN/Inf ("slow") recompute a finite-only amax and patch the codes of their
//   non-finite elements with fmt:: (see fp8_device.cuh); finite elements always go through cvt.
// - 1-D grid, blockIdx = token_tile * tiles_k + k_tile (no 65535 limit on either count); adjacent
//   CTAs read adjacent 256-byte pieces of the same 128 rows. ptxas: 122-128 registers, no spills,
//   so 4 CTAs (BF16) or 2 CTAs (F32) = 512 threads per SM, 128 KB of loads in flight per SM.
#pragma once

#include <cstdint>

#include "common/groups.h"
#include "fp8flow/formats.h"
#include "ops/quantize/kernels/fp8_device.cuh"

namespace fp8flow::sm90 {

// Token tiles without groups: tile t covers tokens [128 t, min(128 t + 128, rows)).
struct UniformTiles {
  int32_t rows = 0;
  __device__ __forceinline__ void tile_cols(int32_t t, int32_t& m0, int32_t& w) const {
    m0 = t * 128;
    w = rows - m0 < 128 ? rows - m0 : 128;
  }
};

template <typename In>
struct TileCfg {
  static constexpr int kVec = dev::InVec<In>::kVec;  // channels per thread
  static constexpr int kTpr = 128 / kVec;            // threads per token row
  static constexpr int kChunks = 8;                  // token chunks per tile
  static constexpr int kTok = 128 / kChunks;         // tokens per thread (16)
  static constexpr int kThreads = kTpr * kChunks;
  // 512 resident threads per SM at <= 128 registers each: 128 KB of loads in flight per SM.
  static constexpr int kMinBlocks = 512 / kThreads;
};

struct TileArgs {
  const void* in;
  int32_t M, K;
  int32_t tiles_k;  // ceil(K / 128)
  uint8_t* out;     // [M][K] row-wise codes (kRow)
  float* scale;     // [tiles_k][M] (kRow)
  uint8_t* out_t;   // [K][M] column-wise codes (kCol)
  float* scale_t;   // [token tiles][K] (kCol)
};

template <typename In, bool kE5M2, bool kRow, bool kCol, typename Tiles>
__global__ void __launch_bounds__(TileCfg<In>::kThreads, TileCfg<In>::kMinBlocks)
    sm90_quantize_tile_kernel(const TileArgs a, const __grid_constant__ Tiles tiles) {
  static_assert(kRow || kCol, "nothing to do");
  using Cfg = TileCfg<In>;
  using V = dev::InVec<In>;
  using F = dev::Fp8<kE5M2>;
  constexpr int kVec = Cfg::kVec, kTok = Cfg::kTok;

  __shared__ float col_part[Cfg::kChunks][128];

  const int32_t t = static_cast<int32_t>(blockIdx.x / static_cast<uint32_t>(a.tiles_k));
  const int32_t kt = static_cast<int32_t>(blockIdx.x - static_cast<uint32_t>(t) * a.tiles_k);
  int32_t m0, w;
  tiles.tile_cols(t, m0, w);
  const int cc = threadIdx.x % Cfg::kTpr;
  const int tc = threadIdx.x / Cfg::kTpr;
  const int32_t k0 = kt * 128;
  const int32_t ch0 = k0 + cc * kVec;  // first channel of this thread
  const bool ch_ok = ch0 < a.K;        // K % 16 == 0: a thread's channels are all in or all out
  const int tok0 = tc * kTok;          // first token of this thread, relative to m0

  // ---- load 16 tokens x kVec channels (all loads issued before any use)
  uint4 v[kTok];
  const In* src = static_cast<const In*>(a.in) + (static_cast<int64_t>(m0) + tok0) * a.K + ch0;
#pragma unroll
  for (int j = 0; j < kTok; ++j) {
    v[j] = make_uint4(0, 0, 0, 0);
    if (ch_ok && tok0 + j < w) v[j] = dev::load16_stream(src + static_cast<int64_t>(j) * a.K);
  }

  // ---- amax: NaN-propagating max finds "all finite" on the way (BF16: packed bf16x2 maxima)
  float rmax[kTok];
  float cmax[kVec];
  float all = 0.f;
  {
    typename V::Acc cacc[V::kAcc];
#pragma unroll
    for (int h = 0; h < V::kAcc; ++h) cacc[h] = 0;
#pragma unroll
    for (int j = 0; j < kTok; ++j) {
      if constexpr (kRow) {
        rmax[j] = V::absmax(v[j]);
        all = dev::max_nan(all, rmax[j]);
      }
      if constexpr (kCol) V::colmax(cacc, v[j]);
    }
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      cmax[i] = V::acc_get(cacc, i);
      if constexpr (!kRow) all = dev::max_nan(all, cmax[i]);
    }
  }
  const bool slow = !dev::finite_le_max(all);  // this thread holds a NaN or Inf
  if (slow) {
#pragma unroll
    for (int i = 0; i < kVec; ++i) cmax[i] = 0.f;
#pragma unroll
    for (int j = 0; j < kTok; ++j) {
      rmax[j] = 0.f;
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        const float x = dev::finite_abs(V::get(v[j], i));
        rmax[j] = fmaxf(rmax[j], x);
        cmax[i] = fmaxf(cmax[i], x);
      }
    }
  }

  // ---- row-wise: reduce over the kTpr lanes of each token row, then encode kVec codes per token
  if constexpr (kRow) {
    float mine = 0.f;  // amax of token `cc` (lanes 0..15 publish the scales)
#pragma unroll
    for (int j = 0; j < kTok; ++j) {
#pragma unroll
      for (int off = Cfg::kTpr / 2; off > 0; off >>= 1)
        rmax[j] = fmaxf(rmax[j], __shfl_xor_sync(0xFFFFFFFFu, rmax[j], off));
      if (cc == j) mine = rmax[j];
    }
    if (cc < kTok && tok0 + cc < w)
      a.scale[static_cast<int64_t>(kt) * a.M + m0 + tok0 + cc] =
          fmt::exp2i(fmt::scale_exponent(mine, F::kMaxExp));
    if (ch_ok) {
      uint8_t* dst = a.out + (static_cast<int64_t>(m0) + tok0) * a.K + ch0;
#pragma unroll
      for (int j = 0; j < kTok; ++j) {
        if (tok0 + j >= w) break;
        const int e = fmt::scale_exponent(rmax[j], F::kMaxExp);
        const float f = dev::inv_scale(e);
        uint32_t q[kVec / 4];
#pragma unroll
        for (int i = 0; i < kVec / 4; ++i) {
          const float x0 = V::get(v[j], 4 * i), x1 = V::get(v[j], 4 * i + 1);
          const float x2 = V::get(v[j], 4 * i + 2), x3 = V::get(v[j], 4 * i + 3);
          q[i] = F::encode4_fast(x0, x1, x2, x3, f);
          if (slow) q[i] = F::fix_nonfinite4(q[i], x0, x1, x2, x3);
        }
        uint8_t* p = dst + static_cast<int64_t>(j) * a.K;
        if constexpr (kVec == 8)
          dev::store8(p, make_uint2(q[0], q[1]));
        else
          dev::store4(p, q[0]);
      }
    }
  }

  // ---- column-wise: combine the 8 token chunks in shared memory, encode 16 tokens per channel
  if constexpr (kCol) {
#pragma unroll
    for (int i = 0; i < kVec; ++i) col_part[tc][cc * kVec + i] = cmax[i];
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      float m = col_part[0][cc * kVec + i];
#pragma unroll
      for (int c = 1; c < Cfg::kChunks; ++c) m = fmaxf(m, col_part[c][cc * kVec + i]);
      cmax[i] = m;
    }
    if (ch_ok) {
      if (tc == 0) {
        float* s = a.scale_t + static_cast<int64_t>(t) * a.K + ch0;
#pragma unroll
        for (int i = 0; i < kVec; ++i) s[i] = fmt::exp2i(fmt::scale_exponent(cmax[i], F::kMaxExp));
      }
      const int n = w - tok0 < kTok ? w - tok0 : kTok;
      if (n > 0) {
        uint8_t* dst = a.out_t + static_cast<int64_t>(ch0) * a.M + m0 + tok0;
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          const int e = fmt::scale_exponent(cmax[i], F::kMaxExp);
          const float f = dev::inv_scale(e);
          uint32_t q[4];
#pragma unroll
          for (int g = 0; g < 4; ++g) {
            const float x0 = V::get_t(v[4 * g], i), x1 = V::get_t(v[4 * g + 1], i);
            const float x2 = V::get_t(v[4 * g + 2], i), x3 = V::get_t(v[4 * g + 3], i);
            q[g] = F::encode4_fast(x0, x1, x2, x3, f);
            if (slow) q[g] = F::fix_nonfinite4(q[g], x0, x1, x2, x3);
          }
          dev::store_bytes16(dst + static_cast<int64_t>(i) * a.M, q, n);
        }
      }
    }
  }
}

}  // namespace fp8flow::sm90
