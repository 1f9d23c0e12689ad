// Permute + pad (also unpermute-bwd, and the weighted unpermute's dy): output row r of [R][H] is
// input row src_slot[r] / k, or zeros on pad rows, moved with 16-byte loads/stores; the row's FP8
// 1x128 scales (F32 [tiles][rows]) or MX E8M0 scales (bytes [rows][H/32]) and its routing
// probability move in the same CTA. permute() with the plan's dest_row scatters the data of every
// row the plan confirms from its token row, read once (permute_scatter_body), and the row CTAs
// (permute_rows_body) write the rest (session 4, H100, T 4096, k 8, H 7168: FP8 0.139 -> 0.113 ms,
// BF16 0.296 -> 0.210 ms); both halves run in one launch (permute_fused_kernel).
//
// Grid: one CTA (8 warps) per G = 8 * rows_per_warp consecutive output rows; warp w copies rows
// w, w + 8, ... of its CTA, each lane 8 x 16 B loads in flight (128 B/lane, 32 KB/CTA). Rows are
// gathered from X (read k times overall; X fits L2 at T = 4096), the output is written once with
// evict-first stores so it does not push X out of L2.
// Napkin math (FP8, T = 4096, k = 8, H = 7168, E = 32, align 16): 32768 + ~240 pad rows x 7168 B
// = 237 MB written + 235 MB gathered (+ 7.4 MB scales, 128 KB probs); at ~2.6 TB/s (80-85% of the
// H100's 3.0 TB/s copy bandwidth, counting reads + writes) ~0.18 ms; the published kernel takes
// 1.127 ms. Bench: `fp8flow-bench ops` (permute rows), PermuteBench.* in tests/permute.
#pragma once

#include <cstdint>

#include "common/hd_math.h"
#include "fp8flow/formats.h"

namespace fp8flow::sm90::kernels {

constexpr int kRowsThreads = 256;  // 8 warps
constexpr int kRowsWarps = kRowsThreads / 32;
constexpr int kRowsUnroll = 8;  // 16-byte vectors in flight per lane
constexpr int kMaxRowsPerWarp = 16;
constexpr int kMaxRowsPerCta = kRowsWarps * kMaxRowsPerWarp;

enum RowsScale : int { kNoScale = 0, kColScale = 1, kRowScale = 2 };
enum RowsMul : int { kNoMul = 0, kMulBF16 = 1, kMulF32 = 2 };

struct RowsArgs {
  const uint8_t* in;
  uint8_t* out;
  int64_t row_bytes;  // multiple of 16
  int32_t rows_out;   // R
  int32_t num_pairs;  // T * k
  int32_t k;
  int32_t tokens;             // T (leading dimension of the FP8 input scales)
  int32_t rows_per_warp;      // power of two <= kMaxRowsPerWarp
  int32_t log2_rows_per_cta;  // log2(8 * rows_per_warp)
  const int32_t* src_slot;
  const float* topk_weight;  // null: probability 0 (prob) / unused
  float* prob;               // null: no probabilities written
  const float* in_cscale;    // FP8: [ctiles][T]
  float* out_cscale;         // FP8: [ctiles][R]
  int32_t ctiles;
  const uint8_t* in_rscale;  // MX: [T][rscale_bytes]
  uint8_t* out_rscale;       // MX: [R][rscale_bytes]
  int32_t rscale_bytes;
  int32_t rscale_vec;  // 1, 2, 4, 8 or 16: widest access dividing the MX row and both pointers
  // Scatter mode (permute_scatter_body runs in the same launch): the plan's [T][k] map.
  // Rows r whose pair s = src_slot[r] maps back (dest_row[s] == r) get their data from the scatter
  // kernel; this kernel then writes only their scales and probability, and the data of pad rows
  // and of rows the map does not confirm. Null: every row's data is gathered here.
  const int32_t* dest_row;
};

__device__ __forceinline__ float canonical_nan(float x) {
  return fmt::f32_is_nan(x) ? fmt::f32_from_bits(0x7FC00000u) : x;
}

// 16 bytes of BF16 or F32 elements times p (FP32 multiply, NaN canonical, RNE back to BF16).
template <int kMul>
__device__ __forceinline__ uint4 mul_vec(uint4 v, float p) {
  uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (kMul == kMulBF16) {
      const float lo = canonical_nan(hd::mul(fmt::bf16_to_f32(static_cast<uint16_t>(w[i])), p));
      const float hi =
          canonical_nan(hd::mul(fmt::bf16_to_f32(static_cast<uint16_t>(w[i] >> 16)), p));
      w[i] = fmt::bf16_from_f32(lo) | (static_cast<uint32_t>(fmt::bf16_from_f32(hi)) << 16);
    } else {
      w[i] = fmt::f32_bits(canonical_nan(hd::mul(fmt::f32_from_bits(w[i]), p)));
    }
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// One row's MX scale bytes, kW bytes per access (zeros for a pad row).
template <int kW, typename V>
__device__ __forceinline__ void copy_row_scale(const uint8_t* src, uint8_t* dst, int n, bool pad,
                                               int lane) {
  for (int o = lane * kW; o < n; o += 32 * kW) {
    V v{};
    if (!pad) v = *reinterpret_cast<const V*>(src + o);
    *reinterpret_cast<V*>(dst + o) = v;
  }
}

// One row of nvec 16-byte vectors, kRowsUnroll loads in flight per lane. NOTES: the loads must
// be unconditional for ptxas to keep them in flight (guarded loads were issued one at a time):
// full batches need no guard, and the tail batch clamps its addresses to the last vector and only
// guards the stores.
template <int kMul>
__device__ __forceinline__ void copy_row(const uint4* __restrict__ src, uint4* __restrict__ dst,
                                         int64_t nvec, float p, int lane) {
  int64_t base = 0;  // warp-uniform
  for (; base + 32 * kRowsUnroll <= nvec; base += 32 * kRowsUnroll) {
    uint4 buf[kRowsUnroll];
#pragma unroll
    for (int u = 0; u < kRowsUnroll; ++u) buf[u] = __ldg(src + base + u * 32 + lane);
#pragma unroll
    for (int u = 0; u < kRowsUnroll; ++u) {
      if constexpr (kMul != kNoMul) buf[u] = mul_vec<kMul>(buf[u], p);
      __stcs(dst + base + u * 32 + lane, buf[u]);
    }
  }
  if (base >= nvec) return;
  uint4 buf[kRowsUnroll];
#pragma unroll
  for (int u = 0; u < kRowsUnroll; ++u) buf[u] = __ldg(src + min(base + u * 32 + lane, nvec - 1));
#pragma unroll
  for (int u = 0; u < kRowsUnroll; ++u) {
    if (base + u * 32 + lane < nvec) {
      if constexpr (kMul != kNoMul) buf[u] = mul_vec<kMul>(buf[u], p);
      __stcs(dst + base + u * 32 + lane, buf[u]);
    }
  }
}

// Row half of permute, for the CTA `block` of G = 2^log2_rows_per_cta output rows.
template <int kScale, int kMul>
__device__ __forceinline__ void permute_rows_body(const RowsArgs& a, int64_t block) {
  __shared__ int32_t s_tok[kMaxRowsPerCta];  // source token; -1 pad row; -2 past the last row
  __shared__ float s_p[kMaxRowsPerCta];
  __shared__ bool s_scattered[kMaxRowsPerCta];  // data written by permute_scatter_body
  const int G = 1 << a.log2_rows_per_cta;
  const int64_t r0 = block << a.log2_rows_per_cta;
  if (threadIdx.x < G) {
    const int64_t r = r0 + threadIdx.x;
    int tok = -2;
    float p = 0.0f;
    bool scattered = false;
    if (r < a.rows_out) {
      const int32_t slot = a.src_slot[r];
      const bool valid = slot >= 0 && slot < a.num_pairs;
      tok = valid ? slot / a.k : -1;
      if (valid && a.topk_weight) p = a.topk_weight[slot];
      if (a.prob) a.prob[r] = p;
      scattered = valid && a.dest_row && a.dest_row[slot] == r;
    }
    s_tok[threadIdx.x] = tok;
    s_p[threadIdx.x] = p;
    s_scattered[threadIdx.x] = scattered;
  }
  __syncthreads();

  if constexpr (kScale == kColScale) {
    // G consecutive rows per scale row: 32-byte sectors when G >= 8.
    const float pad_scale = fmt::exp2i(fmt::kMinScaleExp);
    for (int idx = threadIdx.x; idx < a.ctiles * G; idx += kRowsThreads) {
      const int b = idx >> a.log2_rows_per_cta, g = idx & (G - 1);
      const int tok = s_tok[g];
      if (tok == -2) continue;
      const float s =
          tok >= 0 ? __ldg(a.in_cscale + static_cast<int64_t>(b) * a.tokens + tok) : pad_scale;
      a.out_cscale[static_cast<int64_t>(b) * a.rows_out + r0 + g] = s;
    }
  }

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t nvec = a.row_bytes >> 4;
  for (int i = 0; i < a.rows_per_warp; ++i) {
    const int g = i * kRowsWarps + warp;
    const int tok = s_tok[g];
    if (tok == -2) break;  // rows past R form a suffix of the CTA's rows
    const int64_t r = r0 + g;
    const uint4* src = reinterpret_cast<const uint4*>(
        a.in + static_cast<int64_t>(tok < 0 ? 0 : tok) * a.row_bytes);
    uint4* dst = reinterpret_cast<uint4*>(a.out + r * a.row_bytes);
    if (tok < 0) {  // pad row (warp-uniform)
      for (int64_t v = lane; v < nvec; v += 32) __stcs(dst + v, make_uint4(0u, 0u, 0u, 0u));
    } else if (!s_scattered[g]) {
      copy_row<kMul>(src, dst, nvec, s_p[g], lane);
    }
    if constexpr (kScale == kRowScale) {
      const uint8_t* s = a.in_rscale + static_cast<int64_t>(tok < 0 ? 0 : tok) * a.rscale_bytes;
      uint8_t* d = a.out_rscale + r * a.rscale_bytes;
      const bool pad = tok < 0;
      const int n = a.rscale_bytes, w = a.rscale_vec;
      if (w == 16)
        copy_row_scale<16, uint4>(s, d, n, pad, lane);
      else if (w == 8)
        copy_row_scale<8, uint2>(s, d, n, pad, lane);
      else if (w == 4)
        copy_row_scale<4, uint32_t>(s, d, n, pad, lane);
      else if (w == 2)
        copy_row_scale<2, uint16_t>(s, d, n, pad, lane);
      else
        copy_row_scale<1, uint8_t>(s, d, n, pad, lane);
    }
  }
}

// Scatter half of permute (no scaling): a warp per token reads the token's row once and writes it
// to each of its rows d = dest_row[t][j] that the plan confirms (src_slot[d] == t k + j, so no row
// is written twice, whatever the plan holds); permute_rows_body with a.dest_row set writes the
// rest. Reading X once instead of k times (X [4096][7168] BF16 is 59 MB, more than the L2) is the
// point: the gather form re-read it from DRAM per pair. Each lane keeps kRowsUnroll 16-byte loads
// in flight, then stores each to every confirmed row (k <= 32: one lane per pair).
__device__ __forceinline__ void permute_scatter_body(const RowsArgs& a, int64_t block) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t t = block * kRowsWarps + warp;
  if (t >= a.tokens) return;
  int32_t d = -1;
  if (lane < a.k) {
    const int32_t pair = static_cast<int32_t>(t * a.k + lane);
    const int32_t r = a.dest_row[pair];
    if (r >= 0 && r < a.rows_out && a.src_slot[r] == pair) d = r;
  }
  const uint32_t confirmed = __ballot_sync(0xFFFFFFFFu, d >= 0);  // warp-uniform
  if (confirmed == 0u) return;
  const int64_t nvec = a.row_bytes >> 4;
  const uint4* src = reinterpret_cast<const uint4*>(a.in + t * a.row_bytes);
  for (int64_t base = 0; base < nvec; base += 32 * kRowsUnroll) {
    uint4 buf[kRowsUnroll];
#pragma unroll
    for (int u = 0; u < kRowsUnroll; ++u)
      buf[u] = __ldcs(src + min(base + u * 32 + lane, nvec - 1));
    for (uint32_t m = confirmed; m != 0u; m &= m - 1) {
      const int32_t r = __shfl_sync(0xFFFFFFFFu, d, __ffs(m) - 1);
      uint4* dst = reinterpret_cast<uint4*>(a.out + static_cast<int64_t>(r) * a.row_bytes);
#pragma unroll
      for (int u = 0; u < kRowsUnroll; ++u)
        if (base + u * 32 + lane < nvec) __stcs(dst + base + u * 32 + lane, buf[u]);
    }
  }
}

template <int kScale, int kMul>
__global__ void __launch_bounds__(kRowsThreads)
    permute_rows_kernel(const __grid_constant__ RowsArgs a) {
  permute_rows_body<kScale, kMul>(a, blockIdx.x);
}

// Both halves in one launch: CTAs [0, scatter_ctas) scatter token rows, the rest write the row
// half (scales, probabilities, pad rows and rows the scatter does not confirm). They write disjoint
// bytes, so the row CTAs start as soon as the first scatter CTAs retire instead of after the whole
// scatter grid and a second launch. H100, T 4096, k 8, H 7168, two launches -> one: FP8 0.113 ->
// 0.108 ms (80.0-80.7% -> 84.1-84.4% of copy), BF16 0.210 -> 0.201 ms; MXFP4 rows only gained
// once the row CTAs took 4 rows per warp (permute_sm90.cu).
template <int kScale>
__global__ void __launch_bounds__(kRowsThreads)
    permute_fused_kernel(const __grid_constant__ RowsArgs a, int64_t scatter_ctas) {
  const int64_t b = blockIdx.x;
  if (b < scatter_ctas)
    permute_scatter_body(a, b);
  else
    permute_rows_body<kScale, kNoMul>(a, b - scatter_ctas);
}

// permute_probs_backward: dweight[i] = dprob[dest_row[i]] (0 where dest_row is outside [0, R)).
__global__ void __launch_bounds__(256)
    probs_backward_kernel(const float* dprob, int32_t rows, const int32_t* dest_row, float* dweight,
                          int32_t n) {
  for (int64_t i = blockIdx.x * 256ll + threadIdx.x; i < n; i += 256ll * gridDim.x) {
    const int32_t d = dest_row[i];
    dweight[i] = d >= 0 && d < rows ? dprob[d] : 0.0f;
  }
}

}  // namespace fp8flow::sm90::kernels
