// Device vocabulary of the router kernels: one token row is held by G lanes (G = lanes_for(E), a
// power of two), each lane owning 8 consecutive experts [8 li, 8 li + 8) as two float4 (slots past
// E are padding). Row-wide reductions are an 8-slot tree in the lane, then shuffle-xor across the G
// lanes with offsets 1, 2, 4, ...: exactly the stride-doubling tree router_math.h defines, and
// every lane of the row ends with the same bits. Device code only.
#pragma once

// FP8FLOW_ROUTER_HOST_EMULATION: tests/router/router_emu_test.cpp compiles these kernels as host
// code (warps emulated by threads) to test their lane logic without a GPU; it supplies the CUDA
// vocabulary itself, and the kernels land in their own namespace so no symbol is shared with
// the real ones.
#if !defined(FP8FLOW_ROUTER_HOST_EMULATION)
#include <cuda_runtime.h>
#define FP8FLOW_ROUTER_KERNELS router_kernels
#else
#define FP8FLOW_ROUTER_KERNELS router_kernels_host_emulation
#endif

#include <cstdint>

#include "fp8flow/router.h"
#include "ops/router/router_math.h"

namespace fp8flow::sm90::FP8FLOW_ROUTER_KERNELS {

using namespace fp8flow::router;

constexpr unsigned kFull = 0xFFFFFFFFu;

// Lane-group geometry of the calling thread for rows of G lanes.
template <int G>
struct Lanes {
  static constexpr int kRowsPerWarp = 32 / G;
  static constexpr unsigned kMask = G == 32 ? kFull : ((1u << G) - 1u);
  int lane, q, li, e0;
  unsigned base;  // first lane of this row's group
  __device__ __forceinline__ Lanes() {
    lane = static_cast<int>(threadIdx.x & 31);
    q = lane / G;
    li = lane % G;
    e0 = li * kSlots;
    base = static_cast<unsigned>(q * G);
  }
  // Experts of this lane that exist: 0, 4 or 8 (E % 4 == 0).
  __device__ __forceinline__ int valid(int experts) const {
    const int n = experts - e0;
    return n <= 0 ? 0 : (n >= kSlots ? kSlots : n);
  }
};

__device__ __forceinline__ float tree8_sum(const float (&v)[kSlots]) {
  return hd::add(hd::add(hd::add(v[0], v[1]), hd::add(v[2], v[3])),
                 hd::add(hd::add(v[4], v[5]), hd::add(v[6], v[7])));
}

// Sum over the row's 8 * G slots (pads must be +0).
template <int G>
__device__ __forceinline__ float row_sum(const float (&v)[kSlots]) {
  float s = tree8_sum(v);
#pragma unroll
  for (int o = 1; o < G; o <<= 1) s = hd::add(s, __shfl_xor_sync(kFull, s, o));
  return s;
}

// NaN-ignoring maximum over the row (pads must be NaN).
template <int G>
__device__ __forceinline__ float row_max(const float (&v)[kSlots]) {
  float m = max_num(max_num(max_num(v[0], v[1]), max_num(v[2], v[3])),
                    max_num(max_num(v[4], v[5]), max_num(v[6], v[7])));
#pragma unroll
  for (int o = 1; o < G; o <<= 1) m = max_num(m, __shfl_xor_sync(kFull, m, o));
  return m;
}

// Maximum of a uint32 over the row's G lanes.
template <int G>
__device__ __forceinline__ uint32_t row_umax(uint32_t v) {
  if constexpr (G == 32) {
    return __reduce_max_sync(kFull, v);
  } else {
#pragma unroll
    for (int o = 1; o < G; o <<= 1) v = umax(v, __shfl_xor_sync(kFull, v, o));
    return v;
  }
}

// Lowest lane (within the row's group) whose predicate holds; the predicate must hold somewhere.
template <int G>
__device__ __forceinline__ int row_first_lane(const Lanes<G>& L, bool pred) {
  const unsigned bits = (__ballot_sync(kFull, pred) >> L.base) & Lanes<G>::kMask;
  return __ffs(static_cast<int>(bits)) - 1;
}

// v[i] for a run-time i in [0, 8) without local memory.
__device__ __forceinline__ float pick8(const float (&v)[kSlots], int i) {
  float r = v[0];
#pragma unroll
  for (int j = 1; j < kSlots; ++j) r = i == j ? v[j] : r;
  return r;
}

// The lane's 8 logits of row `row` (pads 0). Streaming loads: each logit is read once per pass.
__device__ __forceinline__ void load_row(const float* row, int e0, int nv, float4& a, float4& b) {
  a = nv > 0 ? __ldcs(reinterpret_cast<const float4*>(row + e0)) : make_float4(0.f, 0.f, 0.f, 0.f);
  b = nv > 4 ? __ldcs(reinterpret_cast<const float4*>(row + e0 + 4))
             : make_float4(0.f, 0.f, 0.f, 0.f);
}

__device__ __forceinline__ void unpack(const float4& a, const float4& b, float (&x)[kSlots]) {
  x[0] = a.x, x[1] = a.y, x[2] = a.z, x[3] = a.w;
  x[4] = b.x, x[5] = b.y, x[6] = b.z, x[7] = b.w;
}

// Scores of the lane's experts from its logits (pads +0): sigmoid (hd::sigmoid's bits without its
// branches), or softmax over the row.
template <int G>
__device__ __forceinline__ void row_scores(bool softmax, const float (&x)[kSlots], int nv,
                                           float (&s)[kSlots]) {
  if (!softmax) {
    // hd::sigmoid_fast (hd::sigmoid's bits for x >= kSigmoidFastMinX, no IEEE divide) unless a
    // lane of the warp holds a logit below the bound or NaN: then the branch-free exact one.
    bool fast = true;
#pragma unroll
    for (int j = 0; j < kSlots; ++j) fast &= j >= nv || x[j] >= hd::kSigmoidFastMinX;
    if (__ballot_sync(kFull, !fast) == 0u) {
#pragma unroll
      for (int j = 0; j < kSlots; ++j) s[j] = j < nv ? hd::sigmoid_fast(x[j]) : 0.0f;
    } else {
#pragma unroll
      for (int j = 0; j < kSlots; ++j) s[j] = j < nv ? hd::sigmoid_branch_free(x[j]) : 0.0f;
    }
    return;
  }
  float m[kSlots];
#pragma unroll
  for (int j = 0; j < kSlots; ++j) m[j] = j < nv ? x[j] : __uint_as_float(0x7FC00000u);
  const float mx = row_max<G>(m);
#pragma unroll
  for (int j = 0; j < kSlots; ++j) s[j] = j < nv ? hd::exp(hd::sub(x[j], mx)) : 0.0f;
  const float sum = row_sum<G>(s);
#pragma unroll
  for (int j = 0; j < kSlots; ++j) s[j] = j < nv ? hd::div(s[j], sum) : 0.0f;
}

// Store the lane's 8 values of a row (canonical NaN), pads skipped.
__device__ __forceinline__ void store_row(float* row, int e0, int nv, const float (&v)[kSlots]) {
  if (nv > 0)
    __stcs(reinterpret_cast<float4*>(row + e0),
           make_float4(canon(v[0]), canon(v[1]), canon(v[2]), canon(v[3])));
  if (nv > 4)
    __stcs(reinterpret_cast<float4*>(row + e0 + 4),
           make_float4(canon(v[4]), canon(v[5]), canon(v[6]), canon(v[7])));
}

}  // namespace fp8flow::sm90::FP8FLOW_ROUTER_KERNELS
