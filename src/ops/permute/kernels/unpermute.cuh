// Unpermute + unpad ("combine" on one GPU; also permute-bwd) and the weighted unpermute's weight
// gradient.
//
// unpermute_kernel: out[t] = sum_j (w[t][j] *) y[dest_row[t][j]] in FP32, slots in order j = 0..k-1
// (the first valid contribution initializes the sum; a single unweighted one with y and out of
// one dtype is copied as raw bits).
// Grid (ceil(T / 8), segments of H): one warp per (token, column segment); the token's valid rows
// are compacted into shared memory once, then each lane owns 8-element chunks (16 B of BF16) and
// issues the loads of up to 8 slots at once (128 B in flight per lane).
// Napkin math (T = 4096, k = 8, H = 7168, BF16): reads 32768 x 14 KB = 470 MB, writes 59 MB; at
// ~2.6 TB/s ~0.2 ms. Bench: `fp8flow-bench ops` (unpermute), PermuteBench.* in tests/permute.
//
// weight_grad_kernel: dweight[t][j] = <dout[t], y[dest_row[t][j]]>, one warp per pair: lane l
// accumulates chunks l, l + 32, ... with FMA, then a fixed shuffle tree (the CPU reference does
// the same operations in the same order).
#pragma once

#include <cstdint>
#include <type_traits>

#include "common/hd_math.h"
#include "fp8flow/formats.h"
#include "ops/permute/kernels/rows.cuh"

namespace fp8flow::sm90::kernels {

constexpr int kUnpermuteWarps = 8;
constexpr int kUnpermuteBatch = 8;  // slots loaded at once

// 8 consecutive elements (BF16: 16 B, F32: 32 B), loaded raw, unpacked later.
template <typename T>
struct Raw8;
template <>
struct Raw8<uint16_t> {
  uint4 v;
  __device__ __forceinline__ void load(const uint16_t* p) {
    v = __ldg(reinterpret_cast<const uint4*>(p));
  }
  __device__ __forceinline__ void store(uint16_t* p) const { *reinterpret_cast<uint4*>(p) = v; }
  __device__ __forceinline__ void unpack(float f[8]) const {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = fmt::bf16_to_f32(static_cast<uint16_t>(w[i]));
      f[2 * i + 1] = fmt::bf16_to_f32(static_cast<uint16_t>(w[i] >> 16));
    }
  }
};
template <>
struct Raw8<float> {
  float4 a, b;
  __device__ __forceinline__ void load(const float* p) {
    a = __ldg(reinterpret_cast<const float4*>(p));
    b = __ldg(reinterpret_cast<const float4*>(p) + 1);
  }
  __device__ __forceinline__ void store(float* p) const {
    reinterpret_cast<float4*>(p)[0] = a;
    reinterpret_cast<float4*>(p)[1] = b;
  }
  __device__ __forceinline__ void unpack(float f[8]) const {
    f[0] = a.x, f[1] = a.y, f[2] = a.z, f[3] = a.w, f[4] = b.x, f[5] = b.y, f[6] = b.z, f[7] = b.w;
  }
};

__device__ __forceinline__ void store8(uint16_t* p, const float f[8]) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
    w[i] = fmt::bf16_from_f32(f[2 * i]) |
           (static_cast<uint32_t>(fmt::bf16_from_f32(f[2 * i + 1])) << 16);
  *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
}
__device__ __forceinline__ void store8(float* p, const float f[8]) {
  reinterpret_cast<float4*>(p)[0] = make_float4(f[0], f[1], f[2], f[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(f[4], f[5], f[6], f[7]);
}

struct UnpermuteArgs {
  const void* y;
  void* out;
  const int32_t* dest_row;   // [T][k]
  const float* topk_weight;  // [T][k] (weighted only)
  int32_t tokens;
  int32_t k;
  int32_t y_rows;
  int32_t cols;  // H
  int32_t seg;   // 8-element chunks per column segment (blockIdx.y)
};

template <typename YT, typename OT, bool kWeighted>
__global__ void __launch_bounds__(kUnpermuteWarps * 32)
    unpermute_kernel(const __grid_constant__ UnpermuteArgs a) {
  __shared__ int32_t s_row[kUnpermuteWarps][32];
  __shared__ float s_w[kUnpermuteWarps][32];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kUnpermuteWarps + warp;
  if (t >= a.tokens) return;  // whole warps; no CTA-wide sync
  int32_t d = -1;
  float w = 0.0f;
  if (lane < a.k) {
    d = a.dest_row[t * a.k + lane];
    if (d < 0 || d >= a.y_rows) d = -1;
    if constexpr (kWeighted) w = a.topk_weight[t * a.k + lane];
  }
  const unsigned valid = __ballot_sync(0xFFFFFFFFu, d >= 0);
  const int n = __popc(valid);
  if (d >= 0) {  // compact the valid slots, keeping slot order
    const int pos = __popc(valid & ((1u << lane) - 1u));
    s_row[warp][pos] = d;
    s_w[warp][pos] = w;
  }
  __syncwarp();
  const bool arith = kWeighted || n >= 2;
  const int nchunks = a.cols >> 3;
  const int c0 = blockIdx.y * a.seg, c1 = min(nchunks, c0 + a.seg);
  const YT* y = static_cast<const YT*>(a.y);
  OT* out = static_cast<OT*>(a.out) + t * a.cols;
  if constexpr (!kWeighted && std::is_same_v<YT, OT>) {
    if (n == 1) {  // one contribution: copied, bits unchanged (BF16 signaling NaNs included)
      const YT* src = y + static_cast<int64_t>(s_row[warp][0]) * a.cols;
      for (int c = c0 + lane; c < c1; c += 32) {
        Raw8<YT> raw;
        raw.load(src + c * 8);
        raw.store(out + c * 8);
      }
      return;
    }
  }
  for (int c = c0 + lane; c < c1; c += 32) {
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int p0 = 0; p0 < n; p0 += kUnpermuteBatch) {
      Raw8<YT> raw[kUnpermuteBatch];
      // Unconditional loads (clamped to the last valid slot) so all of them are in flight.
#pragma unroll
      for (int u = 0; u < kUnpermuteBatch; ++u)
        raw[u].load(y + static_cast<int64_t>(s_row[warp][min(p0 + u, n - 1)]) * a.cols + c * 8);
#pragma unroll
      for (int u = 0; u < kUnpermuteBatch; ++u) {
        if (p0 + u < n) {
          float f[8];
          raw[u].unpack(f);
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            float v = f[i];
            if constexpr (kWeighted) v = hd::mul(v, s_w[warp][p0 + u]);
            acc[i] = p0 + u == 0 ? v : hd::add(acc[i], v);
          }
        }
      }
    }
    if (arith) {
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] = canonical_nan(acc[i]);
    }
    store8(out + c * 8, acc);
  }
}

template <typename DT, typename YT>
__global__ void __launch_bounds__(256)
    weight_grad_kernel(const DT* dout, const YT* y, const int32_t* dest_row, float* dweight,
                       int32_t pairs, int32_t k, int32_t y_rows, int32_t cols) {
  constexpr int kU = 4;  // chunks in flight per lane
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * 8 + warp;
  if (i >= pairs) return;
  const int32_t d = dest_row[i];
  if (d < 0 || d >= y_rows) {
    if (lane == 0) dweight[i] = 0.0f;
    return;
  }
  const int64_t t = i / k;
  const int nchunks = cols >> 3;
  const DT* a = dout + t * cols;
  const YT* b = y + static_cast<int64_t>(d) * cols;
  float p = 0.0f;
  for (int c0 = lane; c0 < nchunks; c0 += 32 * kU) {
    Raw8<DT> ra[kU];
    Raw8<YT> rb[kU];
#pragma unroll
    for (int u = 0; u < kU; ++u) {  // unconditional (clamped) loads: all in flight
      const int c = min(c0 + u * 32, nchunks - 1);
      ra[u].load(a + c * 8);
      rb[u].load(b + c * 8);
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      if (c0 + u * 32 < nchunks) {
        float fa[8], fb[8];
        ra[u].unpack(fa);
        rb[u].unpack(fb);
#pragma unroll
        for (int e = 0; e < 8; ++e) p = hd::fma(fa[e], fb[e], p);
      }
    }
  }
#pragma unroll
  for (int s = 16; s >= 1; s >>= 1) p = hd::add(p, __shfl_down_sync(0xFFFFFFFFu, p, s));
  if (lane == 0) dweight[i] = canonical_nan(p);
}

}  // namespace fp8flow::sm90::kernels
