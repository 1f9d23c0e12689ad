// router_fwd_sm90_f32<G>: the router forward for one chunk of tokens per CTA. Scores (sigmoid or
// softmax), selection values s + bias, optional group-limited masking, k rounds of row argmax (ties
// to the lower expert), weights, per-CTA expert histogram (shared-memory integer atomics, then one
// global atomic per expert), and the aux loss's per-chunk column sums of s / sum(s).
//
// Grid: one CTA of 8 warps per chunk; a chunk is 8 warps x (32 / G) runs x 8 tokens of one
// sequence (the whole tensor is one sequence when the aux loss is off). Each row group of G lanes
// walks its run of 8 consecutive tokens in order, prefetching the next token's logits while it
// works on the current one. E = 256 (G = 32): 1 KiB of logits per warp-token, ~2 KiB in flight per
// warp, 64 tokens per CTA.
// Napkin math (T = 65536, E = 256, k = 8): reads 64 MiB of logits, writes 4 MiB of idx/weights,
// 64 MiB of scores when asked for, 1 MiB of aux partials: ~22 us at 3 TB/s without scores. But
// each token costs the warp ~1000 instructions (8 sigmoids per lane through an exp and an IEEE
// divide, k argmax rounds of ~35 instructions, group scores, the aux divides), ~65M warp
// instructions in all: at 4 issues per clock on 132 SMs that is ~70 us, so expect this kernel
// to be issue-bound at E = 256, not bandwidth-bound (to be measured).
// Bench: fp8flow-bench ops (row "router fwd").
// NOTES: the run/chunk shape is part of the aux loss's summation tree (router_math.h): changing
// kRunTokens or the warp count changes the tree, and the CPU reference with it.
// Measured (H100, session 9, 32768 x 256, DeepSeek-V3 config): 94 -> 83 us with the sigmoid
// written without branches (hd::sigmoid_branch_free, the same bits); 4 CTAs per SM instead of 3
// (one wave at this size, 44 bytes of spills) changed nothing. Issue-bound and latency-bound, far
// from the bandwidth floor: the exact FP32 sigmoid (polynomial exp, IEEE divide) and the k argmax
// rounds cost ~1000 warp instructions per token, ~35 us at full issue. Nsight Compute: 1437 per
// token, issue 60% busy. Each argmax round is ~60 instructions (the lane's max, its position by
// 7 compare/selects, REDUX, ballot, two shuffles, the pick of s and the clear by 8 selects); the
// lever: sort each lane's 8 (key, slot) pairs once (19 compare-exchanges with payload) so a round
// is two REDUX plus popping one lane's head: the kSort variant below, the default since session 13
// (80 registers at G = 32, no spills, 16 KiB more shared memory per CTA; FP8FLOW_ROUTER_FWD_SORT=0
// runs the rounds above). Session 13 (H100, `fp8flow-bench ops --only router --reps 100`, 2
// rounds): hd::sigmoid_fast in row_scores 0.0830 -> 0.0790 ms (backward 0.0594 -> 0.0557), kSort
// 0.0790 -> 0.0616 ms (19.2% of copy). ncu before both (source-level): stalls "wait" 35%, ISETP +
// SEL 34% of the instructions.
#pragma once

#include "ops/router/kernels/router_row.cuh"
#include "ops/router/router_backends.h"

namespace fp8flow::sm90::FP8FLOW_ROUTER_KERNELS {

struct FwdParams {
  const float* logits;  // [T][E]
  const float* bias;    // [E] or null
  int32_t* idx;         // [T][k]
  float* weight;        // [T][k]
  float* scores;        // [T][E] or null
  int32_t* counts;      // [E], zeroed before launch
  int32_t* seq_counts;  // [B][E], zeroed before launch (aux only)
  float* partials;      // [B][chunks_per_seq][E] (aux only)
  int64_t seq_len;      // tokens per sequence (T when the aux loss is off)
  int64_t chunks_per_seq;
  int experts, top_k, n_groups, topk_groups, group_log2;
  bool softmax, renormalize, aux;
  float scaling;
};

// G == 1 keeps 8 outputs per lane in registers: allow 2 CTAs/SM there (E <= 8: little traffic).
// Group-limited selection, groups of 2^group_log2 experts: per-group Top2 of the keys, topk_groups
// rounds of row argmax over the group keys (ties to the lower group), then the keys of the groups
// not kept become kKeyNone. gsh = min(group_log2, 3): element j is in group slot j >> gsh; the lane
// holds ns = 8 >> gsh group slots.
template <int G>
__device__ __forceinline__ void group_mask(const FwdParams& p, const Lanes<G>& L, int gsh, int ns,
                                           uint32_t (&key)[kSlots]) {
  uint32_t gk[4];
  int gid[4];
#pragma unroll
  for (int g = 0; g < 4; ++g) {
    gid[g] = -1;
    gk[g] = kKeyNone;
    if (g >= ns) continue;  // uniform: ns depends on the config only
    Top2 t;
#pragma unroll
    for (int j = 0; j < kSlots; ++j)
      if ((j >> gsh) == g) t = top2_push(t, key[j]);
    if (gsh == 3) {  // a group spans 2^(group_log2 - 3) aligned lanes
      for (int o = 1; o < (1 << (p.group_log2 - 3)); o <<= 1) {
        Top2 u;
        u.first = __shfl_xor_sync(kFull, t.first, o);
        u.second = __shfl_xor_sync(kFull, t.second, o);
        t = top2_merge(t, u);
      }
    }
    const int id = (L.e0 + (g << gsh)) >> p.group_log2;
    if (id < p.n_groups) gid[g] = id, gk[g] = group_key(t);
  }
  unsigned keep = 0;  // bit g: group slot g selected
  for (int r = 0; r < p.topk_groups; ++r) {
    uint32_t best = kKeyNone;
    int bs = 0;
#pragma unroll
    for (int g = 0; g < 4; ++g)
      if (gk[g] > best) best = gk[g], bs = g;
    const uint32_t m = row_umax<G>(best);
    const int wl = row_first_lane<G>(L, best == m);
    int my_gid = gid[0];
#pragma unroll
    for (int g = 1; g < 4; ++g) my_gid = bs == g ? gid[g] : my_gid;
    const int win = __shfl_sync(kFull, my_gid, L.base + wl);
#pragma unroll
    for (int g = 0; g < 4; ++g)
      if (gid[g] == win) keep |= 1u << g, gk[g] = kKeyNone;
  }
#pragma unroll
  for (int j = 0; j < kSlots; ++j)
    if (!((keep >> (j >> gsh)) & 1u)) key[j] = kKeyNone;
}

// One compare-exchange of the sort below: the pair (key, n) with n = ~expert, ordered as the 64-bit
// number key:n, larger first (so a larger key first, and among equal keys the lower expert first).
__device__ __forceinline__ void sort_cx(uint32_t& ka, uint32_t& na, uint32_t& kb, uint32_t& nb) {
  const uint64_t a = (static_cast<uint64_t>(ka) << 32) | na;
  const uint64_t b = (static_cast<uint64_t>(kb) << 32) | nb;
  const bool sw = b > a;
  const uint32_t k0 = sw ? kb : ka, n0 = sw ? nb : na;
  kb = sw ? ka : kb;
  nb = sw ? na : nb;
  ka = k0;
  na = n0;
}

// Sorts the lane's 8 (key, ~expert) pairs into the selection order (key descending, ties to the
// lower expert): the 19-comparator network of depth 6 (the pairs are distinct: any sorting network
// gives the one order).
__device__ __forceinline__ void sort8_sel(uint32_t (&k)[kSlots], uint32_t (&n)[kSlots]) {
  constexpr int kNet[19][2] = {{0, 2}, {1, 3}, {4, 6}, {5, 7}, {0, 4}, {1, 5}, {2, 6},
                               {3, 7}, {0, 1}, {2, 3}, {4, 5}, {6, 7}, {2, 4}, {3, 5},
                               {1, 4}, {3, 6}, {1, 2}, {3, 4}, {5, 6}};
#pragma unroll
  for (int c = 0; c < 19; ++c) sort_cx(k[kNet[c][0]], n[kNet[c][0]], k[kNet[c][1]], n[kNet[c][1]]);
}

// kSort (the default; FP8FLOW_ROUTER_FWD_SORT=0 turns it off; the same outputs): each lane sorts
// its 8 (key, expert) pairs once; a selection round is then two row maxima (the largest head key,
// then the lowest expert among the lanes whose head has it: the winner, known to every lane) and
// the winning lane popping its head; the winner's score is read from a per-warp shared-memory copy
// of the row's scores. Groups of >= 8 experts take their two largest keys from the sorted heads and
// mask only the head of the lanes not kept (their keys then never win); smaller groups are masked
// before the sort.
template <int G, bool kSort = false>
__global__ void __launch_bounds__(kFwdWarps * 32, G == 1 ? 2 : 3)
    router_fwd_sm90_f32(const __grid_constant__ FwdParams p) {
  using L_t = Lanes<G>;
  constexpr int kOut =
      (kRouterMaxTopK + G - 1) / G;  // outputs each lane writes (slot j: lane j % G)
  __shared__ int hist[kMaxExperts];
  __shared__ float part[kFwdWarps][kSlots * G];

  const L_t L;
  const int warp = static_cast<int>(threadIdx.x >> 5);
  const int E = p.experts, k = p.top_k;
  for (int i = threadIdx.x; i < E; i += blockDim.x) hist[i] = 0;
  __syncthreads();

  const int64_t seq = blockIdx.x / p.chunks_per_seq;
  const int64_t chunk = blockIdx.x % p.chunks_per_seq;
  const int64_t warp_run = (chunk * kFwdWarps + warp) * L_t::kRowsPerWarp;
  const int64_t pos0 = (warp_run + L.q) * kRunTokens;  // this group's first token in the sequence
  const int64_t left = p.seq_len - pos0;
  const int n_tok = left <= 0 ? 0 : (left >= kRunTokens ? kRunTokens : static_cast<int>(left));
  const int64_t warp_left = p.seq_len - warp_run * kRunTokens;  // group 0 has the most tokens
  const int warp_tok = warp_left >= kRunTokens ? kRunTokens : static_cast<int>(warp_left);
  const float* row = p.logits + (seq * p.seq_len + pos0) * E;
  const int nv = L.valid(E);

  float bias[kSlots];
#pragma unroll
  for (int j = 0; j < kSlots; ++j) bias[j] = (p.bias && j < nv) ? __ldg(p.bias + L.e0 + j) : 0.0f;

  // Group-limited selection geometry: group size 2^group_log2; this lane holds ns group slots.
  const int gsh = p.group_log2 < 3 ? p.group_log2 : 3;  // element j is in slot j >> gsh
  const int ns = kSlots >> gsh;

  float acc[kSlots];
#pragma unroll
  for (int j = 0; j < kSlots; ++j) acc[j] = 0.0f;

  float4 ca = {}, cb = {}, na = {}, nb = {};
  if (n_tok > 0) load_row(row, L.e0, nv, ca, cb);
#pragma unroll 1
  for (int it = 0; it < warp_tok; ++it) {
    const bool active = it < n_tok;
    if (it + 1 < n_tok) load_row(row + E, L.e0, nv, na, nb);
    float x[kSlots], s[kSlots];
    unpack(ca, cb, x);
    row_scores<G>(p.softmax, x, nv, s);
    if (p.scores && active) store_row(p.scores + (row - p.logits), L.e0, nv, s);

    uint32_t key[kSlots];
#pragma unroll
    for (int j = 0; j < kSlots; ++j)
      key[j] = j < nv ? sel_key(p.bias ? hd::add(s[j], bias[j]) : s[j]) : kKeyNone;

    // k rounds of row argmax; output slot r is kept by lane r % G.
    int out_e[kOut];
    float out_s[kOut];             // (kSort: read from s_row at the stores)
    const float* s_row = nullptr;  // kSort: the row's scores by expert
    float zsum = 0.0f;
    if constexpr (!kSort) {
      if (p.n_groups > 1) group_mask<G>(p, L, gsh, ns, key);
#pragma unroll
      for (int r = 0; r < kRouterMaxTopK; ++r) {
        if (r < k) {
          uint32_t lm = key[0];
#pragma unroll
          for (int j = 1; j < kSlots; ++j) lm = umax(lm, key[j]);
          int lp = kSlots - 1;
#pragma unroll
          for (int j = kSlots - 2; j >= 0; --j) lp = key[j] == lm ? j : lp;
          const uint32_t m = row_umax<G>(lm);
          const int wl = row_first_lane<G>(L, lm == m);
          const unsigned src = L.base + static_cast<unsigned>(wl);
          const int e = __shfl_sync(kFull, L.e0 + lp, src);
          const float sv = __shfl_sync(kFull, pick8(s, lp), src);
          if (L.li == wl) {
#pragma unroll
            for (int j = 0; j < kSlots; ++j) key[j] = j == lp ? kKeyNone : key[j];
          }
          if (r % G == L.li) out_e[r / G] = e, out_s[r / G] = sv;
          zsum = r == 0 ? sv : hd::add(zsum, sv);
        }
      }
    } else {
      // The row's scores by expert, for the winners' scores (two buffers: the __syncwarp after the
      // stores of one token also orders the reads of the previous token before the next stores).
      __shared__ float4 s_sh[kFwdWarps][2][2 * 32];
      if (p.n_groups > 1 && gsh < 3) group_mask<G>(p, L, gsh, ns, key);  // groups in the lane
      uint32_t nk[kSlots];  // ~expert: the tie-break and the payload
#pragma unroll
      for (int j = 0; j < kSlots; ++j) nk[j] = ~static_cast<uint32_t>(L.e0 + j);
      sort8_sel(key, nk);
      if (p.n_groups > 1 && gsh == 3) {
        // A group spans 2^lsh aligned lanes; its two largest keys from the lanes' sorted heads.
        const int lsh = p.group_log2 - 3;
        Top2 t{key[0], key[1]};
        for (int o = 1; o < (1 << lsh); o <<= 1) {
          Top2 u;
          u.first = __shfl_xor_sync(kFull, t.first, o);
          u.second = __shfl_xor_sync(kFull, t.second, o);
          t = top2_merge(t, u);
        }
        const int id = L.e0 >> p.group_log2;
        const uint32_t gn = ~static_cast<uint32_t>(id);
        uint32_t gk = id < p.n_groups ? group_key(t) : kKeyNone;
        bool keep = false;
        for (int r = 0; r < p.topk_groups; ++r) {
          // The largest group key; among the groups that have it, the lowest group.
          const uint32_t m = row_umax<G>(gk);
          const uint32_t w = row_umax<G>(gk == m ? gn : 0u);
          if (gn == w) keep = true, gk = kKeyNone;
        }
        // A lane not kept gets a kKeyNone head: its keys never win (k <= the experts kept).
        if (!keep) key[0] = kKeyNone;
      }
      float4* s_mine = &s_sh[warp][it & 1][2 * L.lane];
      s_mine[0] = make_float4(s[0], s[1], s[2], s[3]);
      s_mine[1] = make_float4(s[4], s[5], s[6], s[7]);
      __syncwarp();
      s_row = reinterpret_cast<const float*>(&s_sh[warp][it & 1][2 * L.base]);
#pragma unroll
      for (int r = 0; r < kRouterMaxTopK; ++r) {
        if (r < k) {
          // The largest head key; among the lanes that have it, the lowest expert (~expert is
          // >= 0xFFFFFF00 > 0: no lane without the key can win).
          const uint32_t m = row_umax<G>(key[0]);
          const uint32_t w = row_umax<G>(key[0] == m ? nk[0] : 0u);
          const bool pop = nk[0] == w;
          // Pop the head; later rounds read positions < 7 - r at most.
#pragma unroll
          for (int j = 0; j < kSlots - 1 - r; ++j) {
            key[j] = pop ? key[j + 1] : key[j];
            nk[j] = pop ? nk[j + 1] : nk[j];
          }
          const int e = static_cast<int>(~w);
          const float sv = s_row[e];
          if (r % G == L.li) out_e[r / G] = e;
          zsum = r == 0 ? sv : hd::add(zsum, sv);
        }
      }
    }
    if (active) {
      const float denom = hd::add(zsum, kNormEps);
      const int64_t t = seq * p.seq_len + pos0 + it;
#pragma unroll
      for (int o = 0; o < kOut; ++o) {
        const int j = L.li + o * G;
        if (j < k) {
          p.idx[t * k + j] = out_e[o];
          const float so = kSort ? s_row[out_e[o]] : out_s[o];
          p.weight[t * k + j] = canon(topk_weight(so, denom, p.renormalize, p.scaling));
          atomicAdd(&hist[out_e[o]], 1);
        }
      }
    }

    if (p.aux) {  // column sums of s / (sum_j s_j + eps) over the run, in token order
      const float denom = hd::add(row_sum<G>(s), kNormEps);
      if (active) {
#pragma unroll
        for (int j = 0; j < kSlots; ++j)
          if (j < nv) acc[j] = hd::add(acc[j], hd::div(s[j], denom));
      }
    }
    row += E;
    ca = na, cb = nb;
  }

  __syncthreads();
  for (int i = threadIdx.x; i < E; i += blockDim.x) {
    const int h = hist[i];
    if (h) {
      atomicAdd(p.counts + i, h);
      if (p.aux) atomicAdd(p.seq_counts + seq * E + i, h);
    }
  }
  if (!p.aux) return;

    // Runs of this warp (aligned, adjacent first), then the 8 warps, in the stride-doubling tree.
#pragma unroll
  for (int o = G; o < 32; o <<= 1)
#pragma unroll
    for (int j = 0; j < kSlots; ++j) acc[j] = hd::add(acc[j], __shfl_xor_sync(kFull, acc[j], o));
  if (L.q == 0)
#pragma unroll
    for (int j = 0; j < kSlots; ++j) part[warp][L.e0 + j] = acc[j];
  __syncthreads();
  static_assert(kFwdWarps == 8, "the warp tree below is written for 8 warps");
  for (int i = threadIdx.x; i < E; i += blockDim.x) {
    const float v =
        hd::add(hd::add(hd::add(part[0][i], part[1][i]), hd::add(part[2][i], part[3][i])),
                hd::add(hd::add(part[4][i], part[5][i]), hd::add(part[6][i], part[7][i])));
    p.partials[static_cast<int64_t>(blockIdx.x) * E + i] = v;
  }
}

}  // namespace fp8flow::sm90::FP8FLOW_ROUTER_KERNELS
