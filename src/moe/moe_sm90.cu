// CUDA side of the MoE layer's internal helpers: the router-gate GEMMs (logits = x . W_g^T and its
// backward), the non-finite counter and the F32 -> BF16 weight copy.
//
// Gate GEMMs: tiled shared-memory SIMT kernels, bit-identical to the CPU reference (moe_ref.cpp):
// every output is ONE sequential hd::fma chain from +0 over the contraction index in ascending
// order (h for logits, e for dx, t for dW), exactly as the reference loops. Tiling only changes
// which thread owns a chain and where its operands come from (shared memory), never the order of
// its terms: each thread walks the contraction dimension chunk by chunk, ascending, and inside a
// chunk ascending. No split-K (it would change the order), no tensor cores (different rounding),
// no atomics. So the router sees the same logits, and picks the same experts, on both backends.
//
//   gate_logits_kernel<TM>  logits[T][E] = x[T][H] (BF16) . W_g[E][H]^T (F32), chains over h.
//     128 threads (4 warps), block tile (16 TM tokens) x 32 experts, h chunks of 32 through a
//     3-stage cp.async pipeline (16-byte copies; x rows 80 B and W rows 144 B in smem, so the
//     LDS.128 reads below are conflict-free). Thread tile TM tokens x 4 experts (tokens
//     tg + 4i, experts eg + 8j): per 8 h it reads its TM x rows (LDS.128 of 8 BF16) and, twice,
//     4 W rows (LDS.128 of 4 F32), then TM*4*8 FMAs. Lane bit 0 picks the expert group and lane
//     bit 1 the token group, so both operand loads are pair-uniform (lanes n, n^1 read the same x
//     address; lanes n, n^2 the same W address) and smem returns them at 2 registers per cycle.
//     TM = 8 / 4 / 2 picked by problem size (enough CTAs for the SMs). Registers: see below.
//   gate_dx_kernel  dx[T][H] = bf16(dx_exp + dl[T][E] . W_g[E][H]), chains over e.
//     256 threads, block tile 64 tokens x 128 h; e chunks of 32: W rows [32][128] copied by
//     cp.async, dl transposed into smem [32 e][64 t]. Thread tile 8 tokens x 4 h (lane = 4 h,
//     warp = 8 tokens): per e one LDS.128 of W (the warp reads 512 contiguous bytes) and two
//     broadcast LDS.128 of dl, 32 FMAs. dx_exp (32 floats per thread) is loaded at kernel start so
//     that its HBM latency hides under the staging and the FMAs; dx goes out as 8-byte stores
//     (256 contiguous bytes per warp and token).
//   gate_dw_kernel<TM,TN>  dW_g[E][H] = dl[T][E]^T . x[T][H], chains over t.
//     128 threads, block tile 32 experts x (4 warps * TM lanes * TN) h, t chunks of 32 rows of dl
//     and x through a 3-stage cp.async pipeline (both copied as stored: row segments of 128 B /
//     64-256 B). Thread tile TM experts x TN h (TM=2,TN=4 for E*H too small to fill the GPU with
//     bigger tiles, else TM=4,TN=8): per t one LDS.64/128 of dl and one of x, TM*TN FMAs. Lane
//     bit 0 is an h bit and bit 1 an expert bit (pair-uniform loads again). A partial last chunk
//     (T is any size) runs a loop bounded by the valid rows: padding rows must not add terms
//     (fma(0, 0, -0.0) is +0.0, not -0.0).
//
// Napkin math (H100 SXM: 3.0 TB/s copy, ~31 TFMA/s FP32 SIMT = 132 SMs x 128 lanes x 1.83 GHz; a
// chain cannot be split, so only T*E (logits), T*H (dx), E*H (dW) chains run in parallel):
//   T 4096, E 32, H 7168 (profiled dsv3-shard shape; 0.94 GFMA per GEMM):
//     logits: x read once 58.7 MB (20 us), W_g 0.9 MB L2-resident; FMA floor 30 us. Only 131k
//       chains: TM=2 -> 128 CTAs x 4 warps, issue-bound at ~90 slots per 64 FMAs -> ~45-55 us
//       (was 3.94 ms: uncoalesced W_g reads, one output per thread).
//     dx: dx_exp F32 117 MB + dx BF16 58.7 MB = 176 MB -> 59 us at copy speed; FMA 30 us, smem
//       ~30 us, both under the memory time -> ~65-75 us (was 0.44 ms). Reading dx_exp (F32) is
//       the floor here, not reading x.
//     dW: x read once 58.7 MB (20 us), dl 0.5 MB re-read from L2 by each of the 224 CTAs; FMA
//       floor 30 us; 229k chains of length T: TM=2,TN=4 -> 224 CTAs x 4 warps -> ~50-60 us (was
//       1.32 ms).
//   T 32768, E 256, H 7168 (full DeepSeek-V3 gate): 60 GFMA per GEMM -> FMA floor ~1.9 ms each;
//     logits TM=8 (2048 CTAs), dW TM=4,TN=8 (448 CTAs), dx memory 1.4 GB (0.47 ms) + FMA 1.9 ms:
//     ~2.2-2.6 ms each. Only a non-bit-exact path (tensor cores) would go below the FMA floor.
// Non-finite counter: one read of the tensor at near copy speed: grid = 4 CTAs per SM, each thread
// keeps four 16-byte loads in flight (64 B; 64 KB per SM), integer counts reduced per warp by
// shuffles, one 64-bit atomicAdd per CTA. dW1 (3.76 GB F32) ~1.25 ms, dW2 ~0.63 ms when asked for
// (MoEBackwardOptions); the BF16 boundary tensors (58.7 MB each at T 4096) ~20 us each.
// Bench: fp8flow-bench layer --config dsv3-shard --recipe fp8-flow (forward + backward step).
// NOTES: no float atomics anywhere (deterministic); counters use integer atomics only.
// ptxas (sm_90a, -Xptxas=-v), no spills: logits TM=2/4/8 85/115/128 registers, 21/29/44 KB smem
// (launch bounds 128 x 4 CTAs); dx 114 registers, 24 KB (256 x 2); dW 48 (TM=2,TN=4, 18 KB) / 80
// (TM=4,TN=8, 36 KB) (128 x 4); non-finite counter 32. Operand reads are ld.shared.v4/v2 and
// cp.async.cg 16-byte copies; the counter and dx_exp use ld.global.cs.v4 (PTX checked; no
// cuobjdump on the build machine for the SASS).
// CPU emulation of all of the above, bit-exact vs the reference: tests/moe/cpu_emulation/run.sh.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <utility>

#include "common/cp_async.cuh"
#include "common/cuda_check.h"
#include "common/hd_math.h"
#include "moe/moe_backends.h"

namespace fp8flow::sm90 {
namespace {

// ---------------------------------------------------------------------------------------------

// f(integral_constant<int, 0>) ... f(integral_constant<int, N - 1>), in order.
template <int N, typename F>
__device__ __forceinline__ void unrolled(F&& f) {
  [&]<int... I>(std::integer_sequence<int, I...>) {
    (f(std::integral_constant<int, I>{}), ...);
  }
  (std::make_integer_sequence<int, N>{});
}

// Element i (0..7) of 8 BF16 in a 16-byte vector, as F32 (exact, = fmt::bf16_to_f32).
__device__ __forceinline__ float bf16_at(const uint4& v, int i) {
  const uint32_t w = (i >> 1) == 0 ? v.x : (i >> 1) == 1 ? v.y : (i >> 1) == 2 ? v.z : v.w;
  return __uint_as_float((i & 1) ? (w & 0xFFFF0000u) : (w << 16));
}
__device__ __forceinline__ float bf16_at(const uint2& v, int i) {
  const uint32_t w = (i >> 1) == 0 ? v.x : v.y;
  return __uint_as_float((i & 1) ? (w & 0xFFFF0000u) : (w << 16));
}
__device__ __forceinline__ float f4_at(const float4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// ---------------------------------------------------------------------------------------------
// logits = x . W_g^T
constexpr int kStages = 3;  // cp.async pipeline depth (logits, dW)
constexpr int kLgThreads = 128;
constexpr int kLgBK = 32;              // h per stage
constexpr int kLgBE = 32;              // experts per CTA
constexpr int kLgXStride = kLgBK + 8;  // BF16 per smem row of x: 80 B
constexpr int kLgWStride = kLgBK + 4;  // F32 per smem row of W: 144 B

template <int TM>
__global__ void __launch_bounds__(kLgThreads, 4)
    gate_logits_kernel(const uint16_t* __restrict__ x, const float* __restrict__ wg,
                       float* __restrict__ out, int32_t T, int32_t H, int32_t E, int32_t e_tiles) {
  constexpr int kBT = 16 * TM;  // tokens per CTA: 4 warps x 4 token groups x TM
  __shared__ __align__(16) uint16_t xs[kStages][kBT][kLgXStride];
  __shared__ __align__(16) float ws[kStages][kLgBE][kLgWStride];

  const int32_t b = static_cast<int32_t>(blockIdx.x);
  const int32_t tt = b / e_tiles, et = b - tt * e_tiles;
  const int32_t t0 = tt * kBT, e0 = et * kLgBE;
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31, warp = tid >> 5;
  const int eg = (lane & 1) | ((lane >> 1) & 6);         // lane bits 0, 2, 3
  const int tg = ((lane >> 1) & 1) | ((lane >> 3) & 2);  // lane bits 1, 4
  const int row0 = warp * 4 * TM + tg;                   // local token rows row0 + 4 i

  auto load_stage = [&](int st, int32_t c) {
    const int32_t k0 = c * kLgBK;
    static_assert(kBT * 4 % kLgThreads == 0 && kLgBE * 8 % kLgThreads == 0, "copy split");
#pragma unroll
    for (int it = 0; it < kBT * 4 / kLgThreads; ++it) {  // kBT rows x 4 chunks of 8 BF16
      const int q = tid + it * kLgThreads;
      const int r = q >> 2, ch = q & 3;
      const bool ok = t0 + r < T;
      const uint16_t* src = ok ? x + static_cast<int64_t>(t0 + r) * H + k0 + ch * 8 : x;
      cp_async_16(&xs[st][r][ch * 8], src, ok ? 16u : 0u);
    }
#pragma unroll
    for (int it = 0; it < kLgBE * 8 / kLgThreads; ++it) {  // 32 rows x 8 chunks of 4 F32
      const int q = tid + it * kLgThreads;
      const int r = q >> 3, ch = q & 7;
      const bool ok = e0 + r < E;
      const float* src = ok ? wg + static_cast<int64_t>(e0 + r) * H + k0 + ch * 4 : wg;
      cp_async_16(&ws[st][r][ch * 4], src, ok ? 16u : 0u);
    }
  };

  float acc[TM][4];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

  const int32_t n = H / kLgBK;
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n) load_stage(s, s);
    cp_async_commit();
  }
  for (int32_t c = 0; c < n; ++c) {
    cp_async_wait<kStages - 2>();  // chunk c has landed (this thread's copies) ...
    __syncthreads();               // ... everyone's; and everyone is done with chunk c - 1
    {
      const int32_t cn = c + kStages - 1;
      if (cn < n) load_stage(cn % kStages, cn);  // into the stage chunk c - 1 used
      cp_async_commit();
    }
    const int st = c % kStages;
    // Compile-time indices throughout (nvcc left the plain loops rolled, with run-time selects).
    unrolled<kLgBK / 8>([&](auto kk_) {
      constexpr int kk = 8 * decltype(kk_)::value;
      uint4 xv[TM];
#pragma unroll
      for (int i = 0; i < TM; ++i)
        xv[i] = *reinterpret_cast<const uint4*>(&xs[st][row0 + 4 * i][kk]);
      unrolled<2>([&](auto half_) {
        constexpr int half = decltype(half_)::value;
        float4 wv[4];
#pragma unroll
        for (int j = 0; j < 4; ++j)
          wv[j] = *reinterpret_cast<const float4*>(&ws[st][eg + 8 * j][kk + 4 * half]);
        unrolled<4>([&](auto q_) {
          constexpr int q = decltype(q_)::value;
#pragma unroll
          for (int i = 0; i < TM; ++i) {
            const float xf = bf16_at(xv[i], 4 * half + q);
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] = hd::fma(xf, f4_at(wv[j], q), acc[i][j]);
          }
        });
      });
    });
  }
  cp_async_wait<0>();

#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int32_t t = t0 + row0 + 4 * i;
    if (t >= T) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int32_t e = e0 + eg + 8 * j;
      if (e < E) out[static_cast<int64_t>(t) * E + e] = acc[i][j];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// dx = bf16(dx_exp + dl . W_g)
constexpr int kDxThreads = 256;
constexpr int kDxBT = 64;   // tokens per CTA (8 warps x 8)
constexpr int kDxBH = 128;  // h per CTA (32 lanes x 4)
constexpr int kDxBE = 32;   // experts per smem chunk

__global__ void __launch_bounds__(kDxThreads, 2)
    gate_dx_kernel(const float* __restrict__ dl, const float* __restrict__ wg,
                   const float* __restrict__ dx_exp, uint16_t* __restrict__ dx, int32_t T,
                   int32_t H, int32_t E, int32_t h_tiles) {
  __shared__ __align__(16) float ws[kDxBE][kDxBH];  // W_g rows e0.., columns h0..
  __shared__ __align__(16) float ds[kDxBE][kDxBT];  // dl transposed: ds[e][t]

  const int32_t b = static_cast<int32_t>(blockIdx.x);
  const int32_t tt = b / h_tiles, ht = b - tt * h_tiles;
  const int32_t t0 = tt * kDxBT, h0 = ht * kDxBH;
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31, warp = tid >> 5;
  const int32_t h = h0 + lane * 4;
  const int tl = warp * 8;  // local tokens tl .. tl + 7

  // dx_exp of this thread's 8 x 4 outputs, issued first (read once: streaming loads).
  float4 pre[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int32_t t = t0 + tl + i;
    pre[i] = t < T
                 ? __ldcs(reinterpret_cast<const float4*>(dx_exp + static_cast<int64_t>(t) * H + h))
                 : make_float4(0.f, 0.f, 0.f, 0.f);
  }

  float acc[8][4];
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

  for (int32_t e0 = 0; e0 < E; e0 += kDxBE) {
    const int ce = E - e0 < kDxBE ? E - e0 : kDxBE;  // multiple of 4
    if (e0 > 0) __syncthreads();                     // everyone is done with the last chunk
    for (int q = tid; q < ce * (kDxBH / 4); q += kDxThreads) {
      const int r = q >> 5, ch = q & 31;
      cp_async_16(&ws[r][ch * 4], wg + static_cast<int64_t>(e0 + r) * H + h0 + ch * 4, 16u);
    }
    cp_async_commit();
    {
      const int t = tid & (kDxBT - 1);
      const bool ok = t0 + t < T;
      const float* src = dl + static_cast<int64_t>(t0 + t) * E + e0;
      for (int e4 = tid / kDxBT; 4 * e4 < ce; e4 += kDxThreads / kDxBT) {
        const float4 v =
            ok ? *reinterpret_cast<const float4*>(src + 4 * e4) : make_float4(0.f, 0.f, 0.f, 0.f);
        ds[4 * e4 + 0][t] = v.x;
        ds[4 * e4 + 1][t] = v.y;
        ds[4 * e4 + 2][t] = v.z;
        ds[4 * e4 + 3][t] = v.w;
      }
    }
    cp_async_wait<0>();
    __syncthreads();
    for (int e = 0; e < ce; e += 4) {
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const float4 w = *reinterpret_cast<const float4*>(&ws[e + u][lane * 4]);
        const float4 d0 = *reinterpret_cast<const float4*>(&ds[e + u][tl]);
        const float4 d1 = *reinterpret_cast<const float4*>(&ds[e + u][tl + 4]);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const float d = i < 4 ? f4_at(d0, i) : f4_at(d1, i - 4);
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = hd::fma(d, f4_at(w, j), acc[i][j]);
        }
      }
    }
  }

#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int32_t t = t0 + tl + i;
    if (t >= T) continue;
    uint32_t o[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) o[j] = fmt::bf16_from_f32(hd::add(f4_at(pre[i], j), acc[i][j]));
    *reinterpret_cast<uint2*>(dx + static_cast<int64_t>(t) * H + h) =
        make_uint2(o[0] | (o[1] << 16), o[2] | (o[3] << 16));
  }
}

// ---------------------------------------------------------------------------------------------
// dW_g = dl^T . x
constexpr int kDwThreads = 128;
constexpr int kDwBK = 32;  // token rows per stage
constexpr int kDwBE = 32;  // experts per CTA

template <int TM, int TN>
struct DwCfg {
  static constexpr int kLanesH = TM;  // 32 experts per warp: 32 / TM expert lanes
  static constexpr int kBH = 4 * kLanesH * TN;
  static constexpr int kXChunks = kBH / 8;  // 16-byte chunks per x row
  using XVec = std::conditional_t<TN == 8, uint4, uint2>;
  static_assert((TM == 2 && TN == 4) || (TM == 4 && TN == 8), "tile");
};

template <int TM, int TN>
__global__ void __launch_bounds__(kDwThreads, 4)
    gate_dw_kernel(const float* __restrict__ dl, const uint16_t* __restrict__ x,
                   float* __restrict__ dwg, int32_t T, int32_t H, int32_t E, int32_t h_tiles) {
  using Cfg = DwCfg<TM, TN>;
  constexpr int kBH = Cfg::kBH;
  __shared__ __align__(16) float ds[kStages][kDwBK][kDwBE];
  __shared__ __align__(16) uint16_t xs[kStages][kDwBK][kBH];

  const int32_t b = static_cast<int32_t>(blockIdx.x);
  const int32_t et = b / h_tiles, ht = b - et * h_tiles;
  const int32_t e0 = et * kDwBE, h0 = ht * kBH;
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31, warp = tid >> 5;
  // Lane bit 0 -> h, bit 1 -> expert; TM == 2: h {0}, e {1..4}; TM == 4: h {0, 2}, e {1, 3, 4}.
  int hg, eg;
  if constexpr (TM == 2) {
    hg = lane & 1;
    eg = lane >> 1;
  } else {
    hg = (lane & 1) | ((lane >> 1) & 2);
    eg = ((lane >> 1) & 1) | ((lane >> 2) & 6);
  }
  const int ecol = eg * TM;                          // local experts ecol .. + TM - 1
  const int hcol = (warp * Cfg::kLanesH + hg) * TN;  // local h hcol .. + TN - 1

  auto load_stage = [&](int st, int32_t c) {
    const int32_t r0 = c * kDwBK;
    static_assert(kDwBK * 8 % kDwThreads == 0 && kDwBK * Cfg::kXChunks % kDwThreads == 0,
                  "copy split");
#pragma unroll
    for (int it = 0; it < kDwBK * 8 / kDwThreads; ++it) {  // 32 rows x 8 chunks of 4 F32
      const int q = tid + it * kDwThreads;
      const int r = q >> 3, ch = q & 7;
      const bool ok = r0 + r < T && e0 + ch * 4 < E;
      const float* src = ok ? dl + static_cast<int64_t>(r0 + r) * E + e0 + ch * 4 : dl;
      cp_async_16(&ds[st][r][ch * 4], src, ok ? 16u : 0u);
    }
#pragma unroll
    for (int it = 0; it < kDwBK * Cfg::kXChunks / kDwThreads; ++it) {
      const int q = tid + it * kDwThreads;
      const int r = q / Cfg::kXChunks, ch = q % Cfg::kXChunks;
      const bool ok = r0 + r < T;
      const uint16_t* src = ok ? x + static_cast<int64_t>(r0 + r) * H + h0 + ch * 8 : x;
      cp_async_16(&xs[st][r][ch * 8], src, ok ? 16u : 0u);
    }
  };

  float acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = 0.0f;

  auto step = [&](int st, int r) {
    float d[TM];
    if constexpr (TM == 2) {
      const float2 v = *reinterpret_cast<const float2*>(&ds[st][r][ecol]);
      d[0] = v.x;
      d[1] = v.y;
    } else {
      const float4 v = *reinterpret_cast<const float4*>(&ds[st][r][ecol]);
      d[0] = v.x;
      d[1] = v.y;
      d[2] = v.z;
      d[3] = v.w;
    }
    const typename Cfg::XVec xv = *reinterpret_cast<const typename Cfg::XVec*>(&xs[st][r][hcol]);
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const float xf = bf16_at(xv, j);
#pragma unroll
      for (int i = 0; i < TM; ++i) acc[i][j] = hd::fma(d[i], xf, acc[i][j]);
    }
  };

  const int32_t n = (T + kDwBK - 1) / kDwBK;
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n) load_stage(s, s);
    cp_async_commit();
  }
  for (int32_t c = 0; c < n; ++c) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    {
      const int32_t cn = c + kStages - 1;
      if (cn < n) load_stage(cn % kStages, cn);
      cp_async_commit();
    }
    const int st = c % kStages;
    const int32_t rows = T - c * kDwBK;
    if (rows >= kDwBK) {
#pragma unroll
      for (int r = 0; r < kDwBK; ++r) step(st, r);
    } else {
      for (int r = 0; r < rows; ++r) step(st, r);  // only real tokens add terms
    }
  }
  cp_async_wait<0>();

#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int32_t e = e0 + ecol + i;
    if (e >= E) continue;
    float* dst = dwg + static_cast<int64_t>(e) * H + h0 + hcol;
#pragma unroll
    for (int j = 0; j < TN; j += 4)
      *reinterpret_cast<float4*>(dst + j) =
          make_float4(acc[i][j], acc[i][j + 1], acc[i][j + 2], acc[i][j + 3]);
  }
}

// ---------------------------------------------------------------------------------------------
// Non-finite count: elements whose exponent field is all ones (NaN or +-Inf). 16-byte vectors;
// the mask 0x7F800000 tests an F32 word, and the high BF16 of a 32-bit word alike.
constexpr int kNfThreads = 256;
constexpr int kNfUnroll = 4;

template <bool kBf16>
__device__ __forceinline__ uint32_t nonfinite_in(const uint4& v) {
  auto f = [](uint32_t w) -> uint32_t {
    uint32_t n = (w & 0x7F800000u) == 0x7F800000u;
    if constexpr (kBf16) n += (w & 0x7F80u) == 0x7F80u;
    return n;
  };
  return f(v.x) + f(v.y) + f(v.z) + f(v.w);
}

template <bool kBf16>
__global__ void __launch_bounds__(kNfThreads)
    nonfinite_kernel(const uint4* __restrict__ p, int64_t nvec, const void* __restrict__ tail,
                     int ntail, unsigned long long* __restrict__ count) {
  __shared__ unsigned long long warp_sum[kNfThreads / 32];
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kNfThreads;
  int64_t i = static_cast<int64_t>(blockIdx.x) * kNfThreads + threadIdx.x;
  uint32_t local = 0;  // <= 8 * (nvec / stride + 1) per thread: far from overflow
  for (; i + (kNfUnroll - 1) * stride < nvec; i += kNfUnroll * stride) {
    uint4 v[kNfUnroll];
#pragma unroll
    for (int u = 0; u < kNfUnroll; ++u) v[u] = __ldcs(p + i + u * stride);
#pragma unroll
    for (int u = 0; u < kNfUnroll; ++u) local += nonfinite_in<kBf16>(v[u]);
  }
  for (; i < nvec; i += stride) local += nonfinite_in<kBf16>(__ldcs(p + i));
  if (blockIdx.x == 0 && static_cast<int>(threadIdx.x) < ntail) {  // numel % (16 B) elements
    if constexpr (kBf16) {
      const uint32_t w = static_cast<const uint16_t*>(tail)[threadIdx.x];
      local += (w & 0x7F80u) == 0x7F80u;
    } else {
      const uint32_t w = static_cast<const uint32_t*>(tail)[threadIdx.x];
      local += (w & 0x7F800000u) == 0x7F800000u;
    }
  }
  unsigned long long s = local;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xFFFFFFFFu, s, off);
  if ((threadIdx.x & 31) == 0) warp_sum[threadIdx.x >> 5] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned long long total = 0;
#pragma unroll
    for (int w = 0; w < kNfThreads / 32; ++w) total += warp_sum[w];
    if (total) atomicAdd(count, total);
  }
}

__global__ void to_bf16_kernel(const float* __restrict__ in, uint16_t* __restrict__ out,
                               int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = fmt::bf16_from_f32(in[i]);
}

int sm_count(const char* op) {
  int dev = 0, sms = 0;
  FP8FLOW_CUDA_CHECK(op, cudaGetDevice(&dev));
  FP8FLOW_CUDA_CHECK(op, cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return sms > 0 ? sms : 1;
}

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

}  // namespace

void moe_gate_logits(const TensorView& x, const TensorView& wg, const TensorView& logits,
                     Stream stream) {
  const char* op = "MoELayer::forward (gate)";
  const int64_t T = x.rows, H = x.cols, E = wg.rows;
  if (T * E == 0) return;
  const int64_t e_tiles = ceil_div(E, kLgBE);
  const int64_t sms = sm_count(op);
  // Largest token tile that still gives every SM work (chains cannot be split along h).
  auto ctas = [&](int tm) { return ceil_div(T, 16 * tm) * e_tiles; };
  const int tm = ctas(8) >= 4 * sms ? 8 : ctas(4) >= 2 * sms ? 4 : 2;
  auto launch = [&](auto tm_tag) {
    constexpr int kTM = decltype(tm_tag)::value;
    gate_logits_kernel<kTM><<<static_cast<unsigned>(ctas(kTM)), kLgThreads, 0, stream>>>(
        x.ptr<const uint16_t>(), wg.ptr<const float>(), logits.ptr<float>(),
        static_cast<int32_t>(T), static_cast<int32_t>(H), static_cast<int32_t>(E),
        static_cast<int32_t>(e_tiles));
  };
  if (tm == 8)
    launch(std::integral_constant<int, 8>{});
  else if (tm == 4)
    launch(std::integral_constant<int, 4>{});
  else
    launch(std::integral_constant<int, 2>{});
  FP8FLOW_CUDA_CHECK_LAUNCH(op);
}

void moe_gate_backward(const TensorView& dl, const TensorView& wg, const TensorView& x,
                       const TensorView& dx_exp, const TensorView& dx, const TensorView& dwg,
                       Stream stream) {
  const int64_t T = x.rows, H = x.cols, E = wg.rows;
  if (T * H > 0) {
    const int64_t h_tiles = H / kDxBH;  // H % 128 == 0
    gate_dx_kernel<<<static_cast<unsigned>(ceil_div(T, kDxBT) * h_tiles), kDxThreads, 0, stream>>>(
        dl.ptr<const float>(), wg.ptr<const float>(), dx_exp.ptr<const float>(), dx.ptr<uint16_t>(),
        static_cast<int32_t>(T), static_cast<int32_t>(H), static_cast<int32_t>(E),
        static_cast<int32_t>(h_tiles));
    FP8FLOW_CUDA_CHECK_LAUNCH("MoELayer::backward (gate dx)");
  }
  if (E * H > 0) {
    const char* op = "MoELayer::backward (gate dW)";
    const int64_t e_tiles = ceil_div(E, kDwBE);
    const int64_t sms = sm_count(op);
    auto launch = [&](auto tm_tag, auto tn_tag) {
      constexpr int kTM = decltype(tm_tag)::value, kTN = decltype(tn_tag)::value;
      const int64_t h_tiles = H / DwCfg<kTM, kTN>::kBH;  // kBH divides 128
      gate_dw_kernel<kTM, kTN><<<static_cast<unsigned>(e_tiles * h_tiles), kDwThreads, 0, stream>>>(
          dl.ptr<const float>(), x.ptr<const uint16_t>(), dwg.ptr<float>(), static_cast<int32_t>(T),
          static_cast<int32_t>(H), static_cast<int32_t>(E), static_cast<int32_t>(h_tiles));
    };
    // T == 0 still writes zeros (empty chains), like the reference.
    if (e_tiles * (H / DwCfg<4, 8>::kBH) >= 2 * sms)
      launch(std::integral_constant<int, 4>{}, std::integral_constant<int, 8>{});
    else
      launch(std::integral_constant<int, 2>{}, std::integral_constant<int, 4>{});
    FP8FLOW_CUDA_CHECK_LAUNCH(op);
  }
}

void moe_count_nonfinite(const TensorView& t, int64_t* count, Stream stream) {
  const char* op = "MoELayer (non-finite count)";
  const int64_t n = t.numel();
  if (n == 0) return;
  const bool bf16 = t.dtype == DType::BF16;
  const int64_t per_vec = bf16 ? 8 : 4;  // 16 bytes; t.data is 16-byte aligned (checked)
  const int64_t nvec = n / per_vec;
  const int ntail = static_cast<int>(n - nvec * per_vec);
  const void* tail = static_cast<const uint8_t*>(t.data) + nvec * 16;
  const int64_t sms = sm_count(op);
  const unsigned blocks =
      static_cast<unsigned>(std::max<int64_t>(1, std::min(ceil_div(nvec, kNfThreads), 4 * sms)));
  auto* c = reinterpret_cast<unsigned long long*>(count);
  const auto* p = static_cast<const uint4*>(t.data);
  if (bf16)
    nonfinite_kernel<true><<<blocks, kNfThreads, 0, stream>>>(p, nvec, tail, ntail, c);
  else
    nonfinite_kernel<false><<<blocks, kNfThreads, 0, stream>>>(p, nvec, tail, ntail, c);
  FP8FLOW_CUDA_CHECK_LAUNCH(op);
}

void moe_to_bf16(const TensorView& in, const TensorView& out, Stream stream) {
  const int64_t n = in.numel();
  if (n == 0) return;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(n, 256), 4096));
  to_bf16_kernel<<<blocks, 256, 0, stream>>>(in.ptr<const float>(), out.ptr<uint16_t>(), n);
  FP8FLOW_CUDA_CHECK_LAUNCH("MoELayer::refresh_weights (BF16 copy)");
}

}  // namespace fp8flow::sm90
