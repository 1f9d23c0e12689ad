// The aux loss's tail after router_fwd_sm90_f32 wrote one column-sum row per CTA chunk:
// - router_aux_reduce_sm90: per segment, tree-sums aligned blocks of 32 rows (one thread per output
//   element, 32 coalesced loads in flight), repeated until one row per segment is left;
// - router_aux_terms_sm90: per sequence (one warp), loss_b = sum_i f_bi * P_bi over a 256-slot
// tree;
// - router_aux_final_sm90: aux_loss = alpha * (sum_b loss_b) / B.
// All trees are the stride-doubling tree of router_math.h (blocks of 32 aligned, pads +0).
// Napkin math (T = 65536, E = 256, one sequence): 1 MiB of partials read once, then 32 KiB: a few
// microseconds, launch-bound. Bench: fp8flow-bench ops (row "router fwd", aux on).
#pragma once

#include "ops/router/kernels/router_row.cuh"
#include "ops/router/router_backends.h"

namespace fp8flow::sm90::FP8FLOW_ROUTER_KERNELS {

// out[seg][r][c] = tree over in[seg][32 r + i][c], i < 32 and 32 r + i < rows_in.
__global__ void __launch_bounds__(256)
    router_aux_reduce_sm90(const float* __restrict__ in, float* __restrict__ out, int64_t segs,
                           int64_t rows_in, int64_t rows_out, int64_t cols) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= segs * rows_out * cols) return;
  const int64_t c = i % cols, r = (i / cols) % rows_out, seg = i / (cols * rows_out);
  float v[kReduceFanIn];
#pragma unroll
  for (int j = 0; j < kReduceFanIn; ++j) {
    const int64_t rr = r * kReduceFanIn + j;
    v[j] = rr < rows_in ? in[(seg * rows_in + rr) * cols + c] : 0.0f;
  }
#pragma unroll
  for (int st = 1; st < kReduceFanIn; st *= 2)
#pragma unroll
    for (int j = 0; j + st < kReduceFanIn; j += 2 * st) v[j] = hd::add(v[j], v[j + st]);
  out[i] = v[0];
}

// loss[b] = tree over experts of (E / (k S) * count_bi) * (P_sum_bi / S); one warp per sequence.
__global__ void __launch_bounds__(256)
    router_aux_terms_sm90(const float* __restrict__ psum, const int32_t* __restrict__ seq_counts,
                          float* __restrict__ loss, int64_t seqs, int experts, int64_t seq_len,
                          float fscale) {
  const int64_t b = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (b >= seqs) return;  // whole warps exit together
  const int lane = static_cast<int>(threadIdx.x & 31);
  float v[kSlots];
#pragma unroll
  for (int j = 0; j < kSlots; ++j) {
    const int e = lane * kSlots + j;
    v[j] = 0.0f;
    if (e < experts) {
      const float f = hd::mul(static_cast<float>(seq_counts[b * experts + e]), fscale);
      v[j] = hd::mul(f, hd::div(psum[b * experts + e], static_cast<float>(seq_len)));
    }
  }
  const float sum = row_sum<32>(v);
  if (lane == 0) loss[b] = sum;
}

__global__ void router_aux_final_sm90(const float* __restrict__ total, float* __restrict__ loss,
                                      float alpha, int64_t seqs) {
  loss[0] = canon(hd::mul(alpha, hd::div(total[0], static_cast<float>(seqs))));
}

}  // namespace fp8flow::sm90::FP8FLOW_ROUTER_KERNELS
