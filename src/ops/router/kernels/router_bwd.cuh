// router_bwd_sm90_f32<G>: d logits from d topk_weight (and the aux loss's gradient), recomputing
// the scores from the logits. Per token row (G lanes): scores; the selected experts' scores
// gathered by shuffle from their owner lanes; the renormalization's Jacobian; the
// aux term (a_i - sum_m a_m shat_m) / (sum_j s_j + eps); then the sigmoid or softmax derivative.
//
// Grid: CTAs of 8 warps, grid-stride over rows (32 / G rows per warp at a time), prefetching the
// next row's logits, indices and upstream gradients while the current one is computed.
// NOTES (H100, session 9, fp8flow-bench ops, 32768 x 256): latency-bound, not bandwidth-bound.
// Loading the indices and gradients with the logits instead of where used took it from 75 to 59
// us. Computing only the k selected sigmoids (all that a sigmoid router without the aux gradient
// needs) made it slower (79 us without the prefetch, 71 with): it puts a gather, a sigmoid and a
// broadcast on the row's dependency chain, where the eight independent sigmoids per lane overlap.
// Napkin math (T = 65536, E = 256, k = 8): reads 64 MiB of logits + 4 MiB of idx / d weights,
// writes 64 MiB of d logits: ~44 us at 3 TB/s.
// Bench: fp8flow-bench ops (row "router bwd").
#pragma once

#include "ops/router/kernels/router_row.cuh"

namespace fp8flow::sm90::FP8FLOW_ROUTER_KERNELS {

constexpr int kBwdWarps = 8;

struct BwdParams {
  const float* logits;        // [T][E]
  const int32_t* idx;         // [T][k]
  const float* d_weight;      // [T][k]
  const int32_t* seq_counts;  // [B][E] (aux only)
  const float* d_aux;         // [1] or null: no aux gradient
  float* d_logits;            // [T][E]
  int64_t tokens, seq_len;
  int experts, top_k;
  bool softmax, renormalize;
  float scaling, aux_alpha, fscale;  // fscale = E / (k S), as the forward computes it
};

template <int G>
__global__ void __launch_bounds__(kBwdWarps * 32, G == 1 ? 2 : 3)
    router_bwd_sm90_f32(const __grid_constant__ BwdParams p) {
  using L_t = Lanes<G>;
  const L_t L;
  const int E = p.experts, k = p.top_k;
  const int nv = L.valid(E);
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x >> 5);
  const int64_t stride = warps * L_t::kRowsPerWarp;
  int64_t t = (static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5)) *
                  L_t::kRowsPerWarp +
              L.q;
  const int64_t warp_t0 = t - L.q;  // group 0's row: warp-uniform loop control

  const bool aux = p.d_aux != nullptr;
  constexpr int kOut = (kRouterMaxTopK + G - 1) / G;  // selection slots per lane
  const float coef_aux =
      aux ? hd::div(hd::mul(__ldg(p.d_aux), p.aux_alpha), static_cast<float>(p.tokens)) : 0.0f;

  // The row's k indices and upstream gradients travel with its logits, one row ahead: lane li
  // holds slots li, li + G, ... (index -1 and gradient 0 past the rows), and every use takes them
  // by shuffle, so no global load sits on a row's dependency chain.
  auto load_sel = [&](int64_t row, int32_t(&ix)[kOut], float(&gw)[kOut]) {
#pragma unroll
    for (int o = 0; o < kOut; ++o) {
      const int j = L.li + o * G;
      const bool in = row < p.tokens && j < k;
      ix[o] = in ? __ldg(p.idx + row * k + j) : -1;
      gw[o] = in ? __ldg(p.d_weight + row * k + j) : 0.0f;
    }
  };
  float4 ca = {}, cb = {}, na = {}, nb = {};
  int32_t ci[kOut], ni[kOut];
  float cg[kOut], ng[kOut];
  if (t < p.tokens) load_row(p.logits + t * E, L.e0, nv, ca, cb);
  load_sel(t, ci, cg);
#pragma unroll 1
  for (int64_t w0 = warp_t0; w0 < p.tokens; w0 += stride, t += stride) {
    const bool active = t < p.tokens;
    if (t + stride < p.tokens) load_row(p.logits + (t + stride) * E, L.e0, nv, na, nb);
    load_sel(t + stride, ni, ng);
    auto sel_e = [&](int j) { return __shfl_sync(kFull, ci[j / G], L.base + j % G); };
    auto sel_g = [&](int j) { return __shfl_sync(kFull, cg[j / G], L.base + j % G); };
    float x[kSlots], s[kSlots], ds[kSlots];
    unpack(ca, cb, x);
    row_scores<G>(p.softmax, x, nv, s);
#pragma unroll
    for (int j = 0; j < kSlots; ++j) ds[j] = 0.0f;

    // Selected experts' scores, gathered from their owner lanes (indices outside [0, E): 0).
    float z[kRouterMaxTopK];
#pragma unroll
    for (int j = 0; j < kRouterMaxTopK; ++j) {
      if (j < k) {
        const int e = sel_e(j);
        const bool ok = e >= 0 && e < E;
        const float v = __shfl_sync(kFull, pick8(s, e & 7), L.base + (ok ? (e >> 3) : 0));
        z[j] = ok ? v : 0.0f;
      }
    }
    float dot = 0.0f, D = 1.0f;
    if (p.renormalize) {
      float zs = z[0];
#pragma unroll
      for (int j = 1; j < kRouterMaxTopK; ++j)
        if (j < k) zs = hd::add(zs, z[j]);
      D = hd::add(zs, kNormEps);
#pragma unroll
      for (int j = 0; j < kRouterMaxTopK; ++j) {
        if (j < k) {
          const float g = hd::mul(sel_g(j), p.scaling);
          const float term = hd::mul(g, hd::div(z[j], D));
          dot = j == 0 ? term : hd::add(dot, term);
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kRouterMaxTopK; ++j) {
      if (j < k) {
        const int e = sel_e(j);
        float g = hd::mul(sel_g(j), p.scaling);
        if (p.renormalize) g = hd::div(hd::sub(g, dot), D);
        if (e >= 0 && e < E && (e >> 3) == L.li) {
          const int pos = e & 7;
#pragma unroll
          for (int i = 0; i < kSlots; ++i) ds[i] = i == pos ? hd::add(ds[i], g) : ds[i];
        }
      }
    }

    if (aux) {  // d aux / d shat_i = a_i = coef_aux * f_i
      const float Dr = hd::add(row_sum<G>(s), kNormEps);
      const int32_t* c = p.seq_counts + (active ? t / p.seq_len : 0) * E + L.e0;
      float a[kSlots], prod[kSlots];
#pragma unroll
      for (int j = 0; j < kSlots; ++j) {
        a[j] = (active && j < nv)
                   ? hd::mul(coef_aux, hd::mul(static_cast<float>(__ldg(c + j)), p.fscale))
                   : 0.0f;
        prod[j] = j < nv ? hd::mul(a[j], hd::div(s[j], Dr)) : 0.0f;
      }
      const float dot = row_sum<G>(prod);
#pragma unroll
      for (int j = 0; j < kSlots; ++j)
        if (j < nv) ds[j] = hd::add(ds[j], hd::div(hd::sub(a[j], dot), Dr));
    }

    float dx[kSlots];
    if (!p.softmax) {
#pragma unroll
      for (int j = 0; j < kSlots; ++j) dx[j] = hd::mul(ds[j], hd::mul(s[j], hd::sub(1.0f, s[j])));
    } else {
      float prod[kSlots];
#pragma unroll
      for (int j = 0; j < kSlots; ++j) prod[j] = j < nv ? hd::mul(ds[j], s[j]) : 0.0f;
      const float dot = row_sum<G>(prod);
#pragma unroll
      for (int j = 0; j < kSlots; ++j) dx[j] = hd::mul(s[j], hd::sub(ds[j], dot));
    }
    if (active) store_row(p.d_logits + t * E, L.e0, nv, dx);
    ca = na, cb = nb;
#pragma unroll
    for (int o = 0; o < kOut; ++o) ci[o] = ni[o], cg[o] = ng[o];
  }
}

}  // namespace fp8flow::sm90::FP8FLOW_ROUTER_KERNELS
