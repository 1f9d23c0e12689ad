// The router's launch chains, written once over a launcher policy: router_sm90.cu's CUDA launcher
// (kernel<<<>>> on a stream), and the host emulation in tests/router/router_emu_test.cpp, which
// runs the same grids, parameters and reduction levels. Forward: zero the counters, one
// router_fwd CTA per chunk, then (aux loss on) reduce the chunk column sums to one row per
// sequence, per-sequence losses, reduce those, final scale. Backward: one grid-stride kernel.
//
// A launcher L provides:
//   void memset_zero(void* p, size_t bytes);
//   void fwd(int lanes, unsigned grid, const FwdParams&);
//   void reduce(unsigned grid, const float* in, float* out, int64_t segs, int64_t rows_in,
//               int64_t rows_out, int64_t cols);
//   void terms(unsigned grid, const float* psum, const int32_t* seq_counts, float* loss,
//              int64_t seqs, int experts, int64_t seq_len, float fscale);
//   void final(const float* total, float* loss, float alpha, int64_t seqs);
//   unsigned bwd_max_ctas(int lanes);   // CTAs that fill the GPU once
//   void bwd(int lanes, unsigned grid, const BwdParams&);
#pragma once

#include "ops/router/kernels/router_aux.cuh"
#include "ops/router/kernels/router_bwd.cuh"
#include "ops/router/kernels/router_fwd.cuh"
#include "ops/router/router_backends.h"

namespace fp8flow::sm90::FP8FLOW_ROUTER_KERNELS {

constexpr int kAuxBlock = 256;

inline unsigned blocks_for(int64_t threads, int block) {
  return static_cast<unsigned>((threads + block - 1) / block);
}

inline int log2_exact(int64_t v) {
  int l = 0;
  while ((int64_t{1} << l) < v) ++l;
  return l;
}

template <class L>
void forward_chain(L& launch, const TensorView& logits, const TensorView& bias,
                   const RouterOutputs& out, const RouterConfig& cfg, const TensorView& workspace) {
  const int64_t T = logits.rows;
  const int E = static_cast<int>(logits.cols);
  const bool aux = cfg.aux_enabled();
  launch.memset_zero(out.tokens_per_expert.data, E * sizeof(int32_t));
  if (aux && T > 0) launch.memset_zero(out.seq_counts.data, out.seq_counts.bytes());
  if (T == 0) {
    if (aux) launch.memset_zero(out.aux_loss.data, sizeof(float));
    return;
  }

  const int lanes = lanes_for(E);
  const int64_t S = aux ? cfg.seq_len : T;
  const int64_t chunk = fwd_chunk_tokens(lanes);
  const int64_t chunks_per_seq = (S + chunk - 1) / chunk;
  const AuxPlan plan = make_aux_plan(T, E, cfg);
  float* ws = static_cast<float*>(workspace.data);

  FwdParams p{};
  p.logits = logits.ptr<const float>();
  p.bias = bias.data ? bias.ptr<const float>() : nullptr;
  p.idx = out.topk_idx.ptr<int32_t>();
  p.weight = out.topk_weight.ptr<float>();
  p.scores = out.scores.data ? out.scores.ptr<float>() : nullptr;
  p.counts = out.tokens_per_expert.ptr<int32_t>();
  p.seq_counts = aux ? out.seq_counts.ptr<int32_t>() : nullptr;
  p.partials = aux ? ws + plan.col_off[0] : nullptr;
  p.seq_len = S;
  p.chunks_per_seq = chunks_per_seq;
  p.experts = E;
  p.top_k = cfg.top_k;
  p.n_groups = cfg.n_groups;
  p.topk_groups = cfg.topk_groups;
  p.group_log2 = log2_exact(E / cfg.n_groups);
  p.softmax = cfg.kind == RouterKind::Softmax;
  p.renormalize = cfg.renormalize;
  p.aux = aux;
  p.scaling = cfg.scaling;
  launch.fwd(lanes, static_cast<unsigned>((T / S) * chunks_per_seq), p);
  if (!aux) return;

  // Column sums per chunk -> per sequence -> per-sequence losses -> their mean.
  const int64_t B = plan.seqs;
  for (size_t l = 1; l < plan.col_rows.size(); ++l)
    launch.reduce(blocks_for(B * plan.col_rows[l] * E, kAuxBlock), ws + plan.col_off[l - 1],
                  ws + plan.col_off[l], B, plan.col_rows[l - 1], plan.col_rows[l], E);
  const float fscale = hd::div(static_cast<float>(E), static_cast<float>(int64_t{cfg.top_k} * S));
  launch.terms(blocks_for(B * 32, kAuxBlock), ws + plan.col_off.back(), p.seq_counts,
               ws + plan.loss_off[0], B, E, S, fscale);
  for (size_t l = 1; l < plan.loss_rows.size(); ++l)
    launch.reduce(blocks_for(plan.loss_rows[l], kAuxBlock), ws + plan.loss_off[l - 1],
                  ws + plan.loss_off[l], 1, plan.loss_rows[l - 1], plan.loss_rows[l], 1);
  launch.final(ws + plan.loss_off.back(), out.aux_loss.ptr<float>(), cfg.aux_alpha, B);
}

template <class L>
void backward_chain(L& launch, const TensorView& logits, const TensorView& topk_idx,
                    const TensorView& d_topk_weight, const TensorView& seq_counts,
                    const TensorView& d_aux_loss, const TensorView& d_logits,
                    const RouterConfig& cfg) {
  const int64_t T = logits.rows;
  const int E = static_cast<int>(logits.cols);
  if (T == 0) return;
  const bool aux = cfg.aux_enabled() && d_aux_loss.data != nullptr;

  BwdParams p{};
  p.logits = logits.ptr<const float>();
  p.idx = topk_idx.ptr<const int32_t>();
  p.d_weight = d_topk_weight.ptr<const float>();
  p.seq_counts = aux ? seq_counts.ptr<const int32_t>() : nullptr;
  p.d_aux = aux ? d_aux_loss.ptr<const float>() : nullptr;
  p.d_logits = d_logits.ptr<float>();
  p.tokens = T;
  p.seq_len = aux ? cfg.seq_len : T;
  p.experts = E;
  p.top_k = cfg.top_k;
  p.softmax = cfg.kind == RouterKind::Softmax;
  p.renormalize = cfg.renormalize;
  p.scaling = cfg.scaling;
  p.aux_alpha = cfg.aux_alpha;
  p.fscale =
      aux ? hd::div(static_cast<float>(E), static_cast<float>(int64_t{cfg.top_k} * cfg.seq_len))
          : 0.0f;
  const int lanes = lanes_for(E);
  const int64_t rows_per_cta = int64_t{kBwdWarps} * (32 / lanes);
  const int64_t need = (T + rows_per_cta - 1) / rows_per_cta;
  const int64_t cap = launch.bwd_max_ctas(lanes);
  launch.bwd(lanes, static_cast<unsigned>(need < cap ? need : cap), p);
}

}  // namespace fp8flow::sm90::FP8FLOW_ROUTER_KERNELS
