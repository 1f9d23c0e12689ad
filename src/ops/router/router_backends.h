// Internal: the two backends of the router ops (arguments validated by router.cpp) and the
// host-side plan of the CUDA aux-loss reduction (shared by router_workspace_bytes and the
// launcher).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "fp8flow/router.h"
#include "ops/router/router_math.h"

namespace fp8flow::ref {
void router_forward(const TensorView& logits, const TensorView& bias, const RouterOutputs& out,
                    const RouterConfig& cfg);
void router_backward(const TensorView& logits, const TensorView& topk_idx,
                     const TensorView& d_topk_weight, const TensorView& seq_counts,
                     const TensorView& d_aux_loss, const TensorView& d_logits,
                     const RouterConfig& cfg);
}  // namespace fp8flow::ref

namespace fp8flow::sm90 {
void router_forward(const TensorView& logits, const TensorView& bias, const RouterOutputs& out,
                    const RouterConfig& cfg, const TensorView& workspace, Stream stream);
void router_backward(const TensorView& logits, const TensorView& topk_idx,
                     const TensorView& d_topk_weight, const TensorView& seq_counts,
                     const TensorView& d_aux_loss, const TensorView& d_logits,
                     const RouterConfig& cfg, Stream stream);
// Test hook: the router_forward kernel variant every later call launches (0 the argmax rounds of
// FP8FLOW_ROUTER_FWD_SORT=0, 1 the sorted lanes, the default; both give the same bits), overriding
// the environment switch of router_sm90.cu; -1 returns to it. Not thread-safe against running ops.
void router_set_forward_variant(int variant);
}  // namespace fp8flow::sm90

namespace fp8flow::router {

// Tokens one forward CTA covers: 8 warps x (32 / G) runs x kRunTokens tokens.
constexpr int kFwdWarps = 8;
constexpr int kReduceFanIn = 32;
inline int64_t fwd_chunk_tokens(int lanes) {
  return int64_t{kFwdWarps} * (32 / lanes) * kRunTokens;
}

// How the CUDA backend reduces the aux loss, with workspace offsets (in floats, each 16-byte
// aligned). Level 0 holds one partial column sum per forward CTA ([B][chunks][E]); each further
// level tree-sums aligned blocks of kReduceFanIn rows per sequence until one row per sequence is
// left (P_sum [B][E]); then per-sequence losses [B][1] are reduced the same way to one value.
struct AuxPlan {
  int64_t seqs = 0, seq_len = 0, experts = 0, chunks_per_seq = 0;
  std::vector<int64_t> col_rows;   // rows per sequence at each column-sum level (last == 1)
  std::vector<size_t> col_off;     // offset of each level's buffer
  std::vector<int64_t> loss_rows;  // rows at each per-sequence-loss level (first == seqs, last 1)
  std::vector<size_t> loss_off;
  size_t floats = 0;
};

inline AuxPlan make_aux_plan(int64_t tokens, int64_t experts, const RouterConfig& cfg) {
  AuxPlan p;
  if (!cfg.aux_enabled() || tokens == 0 || cfg.seq_len <= 0) return p;
  p.seq_len = cfg.seq_len;
  p.seqs = tokens / cfg.seq_len;
  p.experts = experts;
  const int64_t chunk = fwd_chunk_tokens(lanes_for(experts));
  p.chunks_per_seq = (p.seq_len + chunk - 1) / chunk;
  auto alloc = [&](int64_t n) {
    const size_t off = p.floats;
    p.floats += (static_cast<size_t>(n) + 3) / 4 * 4;
    return off;
  };
  for (int64_t r = p.chunks_per_seq;; r = (r + kReduceFanIn - 1) / kReduceFanIn) {
    p.col_rows.push_back(r);
    p.col_off.push_back(alloc(p.seqs * r * experts));
    if (r == 1) break;
  }
  for (int64_t r = p.seqs;; r = (r + kReduceFanIn - 1) / kReduceFanIn) {
    p.loss_rows.push_back(r);
    p.loss_off.push_back(alloc(r));
    if (r == 1) break;
  }
  return p;
}

}  // namespace fp8flow::router
