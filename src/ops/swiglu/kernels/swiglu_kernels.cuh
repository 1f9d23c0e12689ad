// Device code of the SwiGLU ops (sm_90a): the fused forward (SwiGLU -> FP8 + 1x128 scales, or BF16;
// optionally also the saved E4M3 1x128 copy of its input) and the fused backward (da, db -> FP8 +
// scales or BF16, plus dprob; from the BF16 input or from its saved E4M3 copy). Memory-bound
// elementwise kernels; the element math is swiglu_math.h, shared with the CPU reference.
//
// Napkin math at the DeepSeek-V3 shard shape M = 32768, F = 2048 (bench: `fp8flow-bench ops`):
//   forward  reads 4 B per output element (a, b BF16) and writes 1 B (+ scales, 1/32 B):
//            268 MB + 67 MB + 2 MB = 337 MB -> 0.112 ms at 3.0 TB/s (H100 copy ceiling).
//            Saving the input as E4M3 (+ scales) writes 2 B (+ 1/16 B) more per output element:
//            +134 MB + 4 MB = 475 MB -> 0.158 ms (+0.046 ms).
//   backward reads 6 B per element pair (dy, a, b BF16), writes 2 B (da, db) + scales + dprob:
//            403 MB + 134 MB + 4 MB = 541 MB -> 0.180 ms at 3.0 TB/s. From the saved E4M3 input
//            it reads 4 B per pair (dy BF16, a, b E4M3) + scales: 272 + 138 = 410 MB -> 0.137 ms.
//   Published fused kernels (FP8-Flow artifact, Hopper): 0.118 ms forward, 0.211 ms backward.
//
// NOTES:
// - Forward: a half-warp (16 threads) owns one (row, 1x128 tile) item; each thread loads 8 gate and
//   8 up values with one 16-byte load each, computes 8 results, the tile amax is 4 __shfl_xor steps
//   inside the half-warp, then each thread stores 8 codes (8 bytes; a half-warp writes the tile's
//   128 contiguous bytes) and lane 0 of the half-warp the scale. Items are numbered row-major
//   (row, tile), so a block streams whole rows of in and out; every thread takes kFwdItems items
//   and issues all their loads before any math (2 * kFwdItems 16-byte loads in flight).
// - Backward: a warp owns a row, so dprob's row sum stays inside one warp and its order is fixed:
//   lane l accumulates the 8-column chunks l, l + 32, ... (the next step's loads issued first),
//   then a butterfly over lanes (16, 8, 4, 2, 1). The CPU reference reproduces exactly this order.
//   Half-warps again own 1x128 tiles (da and db tiles at the same columns), so the scale logic is
//   the forward's. F % 256 == 128 leaves the upper half-warp without work on the last chunk; it
//   still joins the (half-warp-local) shuffles with zeros and skips its loads and stores.
// - No atomics: every output element and scale has exactly one writer; no shared memory except
//   the backward's kNext scale staging.
// - Inputs are read once: loads use the streaming (evict-first) cache hint.
// - Saved input (forward kSaveIn): the half-warp that owns output tile t of a row already holds
//   that row's gate tile t and up tile t of h, which are exactly the 1x128 tiles t and F/128 + t
//   of h's quantized copy: two more half-warp amaxes and two 8-byte stores per thread, no extra
//   loads. Encoded with NanCode::AsQuantize so the bytes are quantize()'s.
// - Backward from the saved input (kFp8In): a thread's 8 gate (up) values are 8 E4M3 codes, one
//   8-byte load, and its tile's scale (the 16 lanes of a half-warp load the same word). Decoded by
//   the dequantize kernel's hardware path (cvt.rn.f16x2.e4m3x2, cvt.f32.f16, mul.rn.f32: exact,
//   = fmt::e4m3_to_f32(code) * scale) for every code: a NaN code decodes to a NaN with other bits
//   than the reference's, which no output shows (every result it reaches is NaN, and NaN results
//   are written canonically), so no per-chunk NaN test is needed.
// - Backward sigmoid (hd::sigmoid_fast, session 12): the kernels are instruction-bound (the saved-h
//   backward ran at 70.5% of copy on an H100), and the IEEE divide in the sigmoid was the largest
//   single item (BSSY, MUFU.RCP, FCHK, 5 FFMA, BRA, BSYNC per element, plus the call stubs of its
//   slow path). hd::sigmoid_fast replaces it by MUFU.RCP + 2 FFMA (rcp.rn.f32's own fast path,
//   hd::rcp_in_range), drops the FRND + F2I of the exp's rint and the upper clamp and Inf/NaN
//   selects; a chunk where some lane of the warp has a gate input below -86.5 takes the old exact
//   sigmoid (warp-uniform branch). Hot-path SASS of the weighted E4M3 saved-h kernel (16 element
//   pairs per loop iteration plus prologue, non-finite fallbacks excluded): 1291 -> 1066
//   instructions, 50 -> 60 registers (still 4 blocks of 256 per SM). Same outputs bit for bit.
//   (The IEEE-divide kernels stayed as an A/B switch until session 13.)
// - Measured (H100, session 12, `fp8flow-bench ops --only "swiglu bwd" --reps 100`, 2 rounds):
//   from the saved E4M3 h 0.1936 ms (70.6% of copy) -> fast sigmoid 0.1864 (73.3%) -> + prefetch
//   (double-buffered steps, see the kernel) 0.1825-0.1828 (74.9%); BF16
//   out 0.2420 -> 0.2402; E4M3 out from BF16 h 0.2039 -> 0.2060 (the one variant 1% slower).
//   ncu (fast, no prefetch): issue slots 81 -> 72%, DRAM 60 -> 64%, 9.9 cycles per issued
//   instruction at 50% occupancy (60 registers); capping at 48 registers (5 blocks per SM, 8 B of
//   spills) gave 0.1829 and slowed the BF16-out kernel 7%, so not kept. What was left to reach
//   80% (0.171 ms): the per-row scale words (4 B at a stride of M: 20% of the store sectors, ncu
//   reports 26 of 32 bytes used per sector) through shared memory as whole sectors, and the
//   per-tile scale arithmetic of quantize8: kNext below.
// - kNext (the default for FP8 out since session 13; FP8FLOW_SWIGLU_BWD_NEXT=0 turns it off): both
//   items above. Measured (H100, session 13, same command, 2 rounds): from the saved E4M3 h
//   0.1846-0.1847 -> 0.1694-0.1696 ms (74.1 -> 80.7% of copy), E4M3 out from BF16 h 0.2058-0.2061
//   -> 0.1957-0.1959 (87.3 -> 91.9%). quantize8<..., kFastScale> takes the scale and its inverse
//   from sd::scale_pair (5-6 integer ops on amax's bits, no branches; equal to
//   exp2i(+-scale_exponent) for every finite amax >= 0, swiglu_test.cpp sweeps all of them) instead
//   of scale_exponent's branches and two exp2i. The scale words of each 256-column step go to
//   shared memory (stage[2][4][8]: da / db x lower / upper half-warp tile x warp); after a block
//   barrier one warp (rotating with the step) writes them, each tile's 8 rows m0.. one 32-byte
//   sector (with M % 8 == 0), instead of 8 warps writing 4 B each at a stride of M. For the
//   barriers every warp runs to the end: a warp past the last row has its loads and stores off (lim
//   = 0). in_scale is still read per half-warp (one __ldg per chunk, L1 hits for the block's other
//   7 rows: a cooperative load would have to be staged a step ahead of the barrier to stay off the
//   critical path). Static SASS of the weighted E4M3 saved-h kernel (whole .text; up to the last
//   EXIT): 3424 -> 3384 (3256 -> 3217); BRA 229 -> 209, BSSY/BSYNC 103 -> 93, ISETP 324 -> 311; 64
//   registers, no spills (4 blocks of 256 per SM), 256 B shared, 1 barrier.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "ops/quantize/kernels/dequantize.cuh"
#include "ops/swiglu/kernels/fast_div.h"
#include "ops/swiglu/kernels/hw_cvt.cuh"
#include "ops/swiglu/swiglu_math.h"

namespace fp8flow::sm90::swiglu_kernels {

using swiglu_detail::FastDiv;
using swiglu_detail::NanCode;
using swiglu_detail::OutKind;
namespace sd = swiglu_detail;

constexpr int kThreads = 256;
constexpr int kFwdItems = 2;  // (row, tile) items per half-warp (loads in flight: 2 per item)
constexpr int kHalf = 16;     // threads per 1x128 tile (16 x 8 columns)
// NOTES: the forward that also writes the saved input needs 54 registers unbounded (4 blocks of
// 256 per SM); capped at 5 blocks per SM it fits 48 with no spills, the occupancy of the plain
// FP8 forward (43 -> 48 allocated). 0: no cap. Untimed choice: A/B it with `fp8flow-bench ops
// --only "swiglu fwd"`.
constexpr int kFwdSaveMinBlocks = 5;
static_assert(kHalf * sd::kChunk == sd::kTile, "a half-warp covers one 1x128 tile");
static_assert(2 * kHalf == sd::kLanes, "a warp's lanes are the dprob partial sums");

struct FwdParams {
  const uint16_t* in;  // BF16 [M][2F]
  const float* prob;   // F32 [M], nullptr: unweighted (p = 1)
  void* out;           // FP8 codes or BF16 [M][F]
  float* scale;        // F32 [F/128][M] (FP8 only)
  void* in_q;          // E4M3 [M][2F], the saved copy of in (kSaveIn kernels only)
  float* in_q_scale;   // F32 [2F/128][M] (kSaveIn kernels only)
  uint32_t rows;       // M
  uint32_t items;      // M * F/128 (host-checked < 2^32)
  uint32_t F;
  FastDiv tiles;  // divides by F/128
};

struct BwdParams {
  const uint16_t* dy;     // BF16 [M][F]
  const void* in;         // BF16 [M][2F], or (kFp8In kernels) its saved E4M3 copy
  const float* in_scale;  // F32 [2F/128][M] (kFp8In kernels only)
  const float* prob;      // F32 [M] (weighted kernels only)
  void* din;              // FP8 codes or BF16 [M][2F]
  float* scale;           // F32 [2F/128][M] (FP8 only)
  float* dprob;           // F32 [M] (weighted kernels only)
  uint32_t rows;
  uint32_t F;
};

// ------------------------------------------------------------------------------------------------
// Small device vocabulary.

__device__ __forceinline__ uint4 load_stream(const uint16_t* p) {
  return __ldcs(reinterpret_cast<const uint4*>(p));
}

// The 8 BF16 values of a 16-byte vector as FP32 (exact).
__device__ __forceinline__ void unpack_bf16x8(const uint4& v, float (&x)[8]) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    x[2 * i] = __uint_as_float(w[i] << 16);
    x[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
  }
}

// Max over the 16 lanes of this thread's half-warp (all 32 lanes must call it).
__device__ __forceinline__ float half_warp_max(float v) {
#pragma unroll
  for (int d = kHalf / 2; d >= 1; d /= 2) v = sd::amax_max(v, __shfl_xor_sync(0xFFFFFFFFu, v, d));
  return v;
}

// True when all 8 results are finite (the hardware conversions' domain).
__device__ __forceinline__ bool all_finite8(const float (&y)[8]) {
  bool ok = true;
#pragma unroll
  for (int k = 0; k < 8; ++k) ok &= fabsf(y[k]) < __int_as_float(0x7F800000);
  return ok;
}

// max that returns NaN when either operand is NaN (max.NaN.f32, one FMNMX).
__device__ __forceinline__ float max_nan(float a, float b) {
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

// Quantizes this thread's 8 values of one tile (the half-warp holds the whole tile) and returns
// the packed codes; `scale_out` receives the tile's scale (the same on all 16 lanes). kFastScale:
// the scale and its inverse through sd::scale_pair (integer ops on amax's bits, no branches; the
// same values, swiglu_test.cpp sweeps every amax); false: scale_exponent + exp2i (the forward's).
template <OutKind K, NanCode N, bool kFastScale = false>
__device__ __forceinline__ uint2 quantize8(const float (&y)[8], float& scale_out) {
  // amax over finite results (== sd::amax_term / sd::amax_max). Common case, one instruction per
  // element: a NaN-propagating max of |y| over the tile; when it is finite on every lane of the
  // warp (so every result of both half-warps' tiles is finite) it is the amax. Otherwise (a warp-
  // uniform branch: the shuffles need all 32 lanes) the per-element finiteness test.
  float m = 0.0f;
#pragma unroll
  for (int k = 0; k < 8; ++k) m = max_nan(m, fabsf(y[k]));
#pragma unroll
  for (int d = kHalf / 2; d >= 1; d /= 2) m = max_nan(m, __shfl_xor_sync(0xFFFFFFFFu, m, d));
  float amax = m;
  bool finite = true;
  if (!__all_sync(0xFFFFFFFFu, m < __int_as_float(0x7F800000))) {
    amax = 0.0f;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const float a = fabsf(y[k]);
      const bool f = a < __int_as_float(0x7F800000);
      finite &= f;
      amax = f ? sd::amax_max(amax, a) : amax;
    }
    amax = half_warp_max(amax);
  }
  float inv;
  if constexpr (kFastScale) {
    const sd::ScalePair sp = sd::scale_pair<K>(amax);
    scale_out = sp.scale;
    inv = sp.inv;
  } else {
    const int e = sd::scale_exponent<K>(amax);
    scale_out = fmt::exp2i(e);
    inv = fmt::exp2i(-e);
  }
  uint32_t w[2];
  if (kHardwareCvt && finite) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
      w[i] = hw_fp8x2<K>(hd::mul(y[4 * i], inv), hd::mul(y[4 * i + 1], inv)) |
             (hw_fp8x2<K>(hd::mul(y[4 * i + 2], inv), hd::mul(y[4 * i + 3], inv)) << 16);
  } else {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      w[i] = 0;
#pragma unroll
      for (int k = 0; k < 4; ++k)
        w[i] |= uint32_t{sd::encode_fp8<K, N>(y[4 * i + k], inv)} << (8 * k);
    }
  }
  return make_uint2(w[0], w[1]);
}

__device__ __forceinline__ uint4 pack_bf16x8(const float (&y)[8]) {
  uint32_t w[4];
  if (kHardwareCvt && all_finite8(y)) {
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = hw_bf16x2(y[2 * i], y[2 * i + 1]);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i)
      w[i] = uint32_t{sd::encode_bf16(y[2 * i])} | (uint32_t{sd::encode_bf16(y[2 * i + 1])} << 16);
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// Stores 8 values of one tile at element offset `off` of a row-major [M][cols] output; FP8 also
// writes the scale of (tile, row) when this is lane 0 of the half-warp (scale may point to shared
// memory: the backward's kNext staging).
template <OutKind K, NanCode N = NanCode::Canonical, bool kFastScale = false>
__device__ __forceinline__ void store8(void* out, float* scale, uint64_t off, const float (&y)[8],
                                       bool active, bool scale_lane, uint64_t scale_idx) {
  if constexpr (K == OutKind::BF16) {
    if (active) *reinterpret_cast<uint4*>(static_cast<uint16_t*>(out) + off) = pack_bf16x8(y);
  } else {
    float s;
    const uint2 q = quantize8<K, N, kFastScale>(y, s);  // all lanes: shuffles inside
    if (active) {
      *reinterpret_cast<uint2*>(static_cast<uint8_t*>(out) + off) = q;
      if (scale_lane) scale[scale_idx] = s;
    }
  }
}

// 8 consecutive values of the SwiGLU input h [M][2F] (one thread's chunk of a gate or up tile):
// BF16 (16-byte load) or, kFp8, the saved E4M3 copy (8-byte load + the tile's scale). Zero when
// not loaded.
template <bool kFp8>
struct InChunk {
  uint4 v = make_uint4(0, 0, 0, 0);
  __device__ __forceinline__ void load(const BwdParams& p, uint64_t row_off, uint32_t m,
                                       uint32_t col) {
    v = load_stream(static_cast<const uint16_t*>(p.in) + row_off + col);
  }
  __device__ __forceinline__ void unpack(float (&x)[8]) const { unpack_bf16x8(v, x); }
};
template <>
struct InChunk<true> {
  uint2 q = make_uint2(0, 0);
  float s = 0.0f;
  __device__ __forceinline__ void load(const BwdParams& p, uint64_t row_off, uint32_t m,
                                       uint32_t col) {
    q = __ldcs(reinterpret_cast<const uint2*>(static_cast<const uint8_t*>(p.in) + row_off + col));
    s = __ldg(p.in_scale + uint64_t{col / sd::kTile} * p.rows + m);
  }
  // code * scale, exactly (see NOTES).
  __device__ __forceinline__ void unpack(float (&x)[8]) const {
    dq::decode4_hw<DqCodes::E4M3>(q.x, x[0], x[1], x[2], x[3]);
    dq::decode4_hw<DqCodes::E4M3>(q.y, x[4], x[5], x[6], x[7]);
#pragma unroll
    for (int k = 0; k < 8; ++k) x[k] = dq::mul_rn(x[k], s);
  }
};

// s = sigmoid(a) (hd::sigmoid's bits) for one thread's chunk: hd::sigmoid_fast, replaced for the
// whole chunk by the exact branch-free sigmoid when some lane of the warp has an input below
// hd::kSigmoidFastMinX (a warp-uniform branch, taken only where a < -86.5 or -Inf is somewhere in
// the warp's 256 columns). NaN inputs stay on the fast path: see sigmoid_fast.
__device__ __forceinline__ void sigmoid8(const float (&a)[8], float (&s)[8]) {
  float lo = 0.0f;  // min over the chunk (fminf ignores NaN)
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    s[k] = hd::sigmoid_fast(a[k]);
    lo = fminf(lo, a[k]);
  }
  if (__any_sync(0xFFFFFFFFu, lo < hd::kSigmoidFastMinX)) {
#pragma unroll
    for (int k = 0; k < 8; ++k) s[k] = sd::sigmoid(a[k]);
  }
}

// ------------------------------------------------------------------------------------------------
// Forward: grid ceil(items / (16 * kFwdItems)), block kThreads. kSaveIn: also the E4M3 copy of in.
template <OutKind K, bool kSaveIn>
__global__ void __launch_bounds__(kThreads, kSaveIn ? kFwdSaveMinBlocks : 0)
    sm90_swiglu_fwd_bf16_1x128(const __grid_constant__ FwdParams p) {
  const uint32_t half = threadIdx.x / kHalf;
  const uint32_t lane = threadIdx.x % kHalf;
  const uint32_t base = blockIdx.x * (kThreads / kHalf * kFwdItems) + half;
  const uint32_t F = p.F;

  uint4 va[kFwdItems], vb[kFwdItems];
  float pr[kFwdItems];
  uint32_t row[kFwdItems], tile[kFwdItems];
#pragma unroll
  for (int u = 0; u < kFwdItems; ++u) {
    const uint32_t item = base + u * (kThreads / kHalf);
    row[u] = p.tiles.div(item);
    tile[u] = item - row[u] * p.tiles.d;
    va[u] = vb[u] = make_uint4(0, 0, 0, 0);
    pr[u] = 1.0f;
    if (item < p.items) {
      const uint16_t* a = p.in + uint64_t{row[u]} * (2 * F) + tile[u] * sd::kTile + lane * 8;
      va[u] = load_stream(a);
      vb[u] = load_stream(a + F);
      if (p.prob != nullptr) pr[u] = __ldg(p.prob + row[u]);
    }
  }
#pragma unroll
  for (int u = 0; u < kFwdItems; ++u) {
    const bool active = base + u * (kThreads / kHalf) < p.items;
    float a[8], b[8], y[8];
    unpack_bf16x8(va[u], a);
    unpack_bf16x8(vb[u], b);
#pragma unroll
    for (int k = 0; k < 8; ++k) y[k] = sd::forward(a[k], b[k], pr[u]);
    const uint64_t scale_idx = uint64_t{tile[u]} * p.rows + row[u];
    store8<K>(p.out, p.scale, uint64_t{row[u]} * F + tile[u] * sd::kTile + lane * 8, y, active,
              lane == 0, scale_idx);
    if constexpr (kSaveIn) {  // h's tiles t (gate) and F/128 + t (up), quantize()'s encoding
      const uint64_t off = uint64_t{row[u]} * (2 * F) + tile[u] * sd::kTile + lane * 8;
      store8<OutKind::E4M3, NanCode::AsQuantize>(p.in_q, p.in_q_scale, off, a, active, lane == 0,
                                                 scale_idx);
      store8<OutKind::E4M3, NanCode::AsQuantize>(p.in_q, p.in_q_scale, off + F, b, active,
                                                 lane == 0,
                                                 scale_idx + uint64_t{p.tiles.d} * p.rows);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// One warp iteration's inputs: kG 256-column steps of dy and of h's gate and up halves.
template <bool kFp8In, int kG>
struct BwdGroup {
  uint4 vdy[kG];
  InChunk<kFp8In> va[kG], vb[kG];
  // Issues the loads of the steps starting at column c0 (zeros at columns >= lim: F, or 0 for a
  // kNext warp past the last row).
  __device__ __forceinline__ void load(const BwdParams& p, const uint16_t* dy_row, uint64_t row_off,
                                       uint32_t m, uint32_t lane, uint32_t c0, uint32_t lim) {
#pragma unroll
    for (int u = 0; u < kG; ++u) {
      const uint32_t c = c0 + (u * 32 + lane) * sd::kChunk;
      vdy[u] = make_uint4(0, 0, 0, 0);
      if (c < lim) {
        vdy[u] = load_stream(dy_row + c);
        va[u].load(p, row_off, m, c);
        vb[u].load(p, row_off, m, p.F + c);
      }
    }
  }
};

// kNext: the scales go to `stage` (shared, [4][8]: da lower / upper half-warp tile, db lower /
// upper, by warp) for flush_scales; lim: see BwdGroup::load.
template <OutKind K, bool kWeighted, bool kFp8In, bool kNext, int kG>
__device__ __forceinline__ void bwd_compute(const BwdParams& p, const BwdGroup<kFp8In, kG>& g,
                                            uint32_t c0, uint32_t m, uint32_t lane,
                                            uint64_t row_off, float pr, float& part, uint32_t lim,
                                            float* stage) {
  const uint32_t F = p.F;
#pragma unroll
  for (int u = 0; u < kG; ++u) {
    const uint32_t c = c0 + (u * 32 + lane) * sd::kChunk;
    if (c0 + u * 32 * sd::kChunk >= F) break;  // warp-uniform: nothing left for either half
    const bool active = c < lim;               // half-warp-uniform
    float dy[8], a[8], b[8], s[8], da[8], db[8];
    unpack_bf16x8(g.vdy[u], dy);
    g.va[u].unpack(a);
    g.vb[u].unpack(b);
    sigmoid8(a, s);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const sd::Grad gr = sd::backward_with_sigmoid(dy[k], a[k], b[k], pr, s[k]);
      da[k] = gr.da;
      db[k] = gr.db;
      if (kWeighted && active) part = hd::add(part, gr.dp);
    }
    const uint32_t t = c / sd::kTile;
    const bool scale_lane = lane % kHalf == 0;
    if constexpr (kNext) {
      static_assert(kG == 1, "one 256-column step per stage");
      const uint32_t slot = lane / kHalf * 8 + threadIdx.x / 32;
      store8<K, NanCode::Canonical, true>(p.din, stage, row_off + c, da, active, scale_lane, slot);
      store8<K, NanCode::Canonical, true>(p.din, stage, row_off + F + c, db, active, scale_lane,
                                          slot + 16);
    } else {
      store8<K>(p.din, p.scale, row_off + c, da, active, scale_lane, uint64_t{t} * p.rows + m);
      store8<K>(p.din, p.scale, row_off + F + c, db, active, scale_lane,
                uint64_t{F / sd::kTile + t} * p.rows + m);
    }
  }
}

// kNext, after the block barrier that follows the step at column c0: one warp writes the step's
// staged scales of the block's 8 rows m0.. (lane i: stage[i], tile i / 8 as in bwd_compute, row
// m0 + i % 8), each tile's 8 words one 32-byte sector (when M % 8 == 0). Rows >= M and the upper
// half-warp's tile of a last step of 128 columns are not written.
__device__ __forceinline__ void flush_scales(const BwdParams& p, const float* stage, uint32_t c0,
                                             uint32_t m0, uint32_t lane) {
  const uint32_t j = lane / 8, r = lane % 8;
  const uint32_t c = c0 + j % 2 * sd::kTile;
  if (c < p.F && m0 + r < p.rows) {
    const uint32_t t = c / sd::kTile + j / 2 * (p.F / sd::kTile);
    p.scale[uint64_t{t} * p.rows + m0 + r] = stage[lane];
  }
}

// Backward: grid ceil(M / 8), block kThreads (8 warps, one row each). kWeighted false: p = 1 and
// no dprob (its products are not computed). kFp8In: h is the saved E4M3 copy. The sigmoid goes
// through hd::sigmoid_fast (sigmoid8). The row's 256-column steps are double-buffered: step i + 1's
// loads are issued before step i is computed. NOTES (H100, session 12): without that a warp had
// its loads in flight only while it waited for them (~1 us of each ~6 us iteration), too few bytes
// in flight per SM for the DRAM rate (ncu: DRAM 64%, issue 72%). The session-12 A/B variants
// (FP8FLOW_SWIGLU_BWD_OLD=1: the IEEE-divide sigmoid; FP8FLOW_SWIGLU_BWD_PF=0: no prefetch), slower
// in both sessions' measurements, were removed in session 13 (code in commit 626337a).
// kNext (FP8 out; the default, FP8FLOW_SWIGLU_BWD_NEXT=0 turns it off): quantize8's scales through
// sd::scale_pair, and the scale words staged in shared memory and written by one warp per step as
// whole sectors after a block barrier (flush_scales); every warp stays to the end for the
// barriers, a warp past the last row with its loads and stores off (lim = 0).
template <OutKind K, bool kWeighted, bool kFp8In, bool kNext = false>
__global__ void __launch_bounds__(kThreads)
    sm90_swiglu_bwd_1x128(const __grid_constant__ BwdParams p) {
  static_assert(!kNext || K != OutKind::BF16, "kNext: FP8 out");
  const uint32_t lane = threadIdx.x % 32;
  const uint32_t warp = threadIdx.x / 32;
  const uint32_t m0 = blockIdx.x * (kThreads / 32);
  const uint32_t m = m0 + warp;
  if constexpr (!kNext) {
    if (m >= p.rows) return;  // whole warp
  }
  const bool row_ok = !kNext || m < p.rows;
  const uint32_t F = p.F;
  const uint32_t lim = row_ok ? F : 0;
  const float pr = kWeighted && row_ok ? __ldg(p.prob + m) : 1.0f;
  const uint16_t* dy_row = p.dy + uint64_t{m} * F;
  const uint64_t row_off = uint64_t{m} * (2 * F);  // of row m in h and in din (elements)
  float part = 0.0f;

  constexpr uint32_t kStep = 32 * sd::kChunk;
  // kNext: the scales of steps 2i (stage[0]) and 2i + 1 (stage[1]); one barrier per step (the
  // flush of a buffer is done before its warp reaches the next barrier, so before the buffer is
  // written again). The flushing warp rotates with the step.
  __shared__ float stage[kNext ? 2 : 1][kNext ? 32 : 1];
  auto flush = [&](int b, uint32_t c) {
    if constexpr (kNext) {
      __syncthreads();
      if (warp == c / kStep % (kThreads / 32)) flush_scales(p, stage[b], c, m0, lane);
    }
  };
  BwdGroup<kFp8In, 1> g0, g1;
  g0.load(p, dy_row, row_off, m, lane, 0, lim);
  for (uint32_t c0 = 0; c0 < F; c0 += 2 * kStep) {
    g1.load(p, dy_row, row_off, m, lane, c0 + kStep, lim);
    bwd_compute<K, kWeighted, kFp8In, kNext>(p, g0, c0, m, lane, row_off, pr, part, lim, stage[0]);
    flush(0, c0);
    if (c0 + kStep >= F) break;
    g0.load(p, dy_row, row_off, m, lane, c0 + 2 * kStep, lim);
    bwd_compute<K, kWeighted, kFp8In, kNext>(p, g1, c0 + kStep, m, lane, row_off, pr, part, lim,
                                             stage[kNext ? 1 : 0]);
    flush(1, c0 + kStep);
  }
  if constexpr (kWeighted) {
#pragma unroll
    for (int d = 16; d >= 1; d /= 2) part = hd::add(part, __shfl_xor_sync(0xFFFFFFFFu, part, d));
    if (lane == 0 && row_ok) p.dprob[m] = sd::canonical_f32(part);
  }
}

}  // namespace fp8flow::sm90::swiglu_kernels
