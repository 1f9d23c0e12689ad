// sm_90a backend of router_forward / router_backward: picks the row geometry (G lanes per token
// row, G = lanes_for(E)), zeroes the integer counters, launches the forward kernel and the aux-loss
// reduction chain, or the backward kernel. No host synchronization; every launch is checked.
// Bench: fp8flow-bench ops (rows "router fwd", "router bwd").
#include <type_traits>

#include "common/cuda_check.h"
#include "ops/router/kernels/router_aux.cuh"
#include "ops/router/kernels/router_bwd.cuh"
#include "ops/router/kernels/router_fwd.cuh"
#include "ops/router/router_backends.h"

namespace fp8flow::sm90 {
namespace {

using namespace router_kernels;
using fp8flow::router::AuxPlan;

int log2_exact(int64_t v) {
  int l = 0;
  while ((int64_t{1} << l) < v) ++l;
  return l;
}

template <typename F>
void dispatch_lanes(int lanes, F&& f) {
  switch (lanes) {
    case 1:
      return f(std::integral_constant<int, 1>{});
    case 2:
      return f(std::integral_constant<int, 2>{});
    case 4:
      return f(std::integral_constant<int, 4>{});
    case 8:
      return f(std::integral_constant<int, 8>{});
    case 16:
      return f(std::integral_constant<int, 16>{});
    default:
      return f(std::integral_constant<int, 32>{});
  }
}

unsigned blocks_for(int64_t threads, int block) {
  return static_cast<unsigned>((threads + block - 1) / block);
}

}  // namespace

void router_forward(const TensorView& logits, const TensorView& bias, const RouterOutputs& out,
                    const RouterConfig& cfg, const TensorView& workspace, Stream stream) {
  constexpr const char* kOp = "router_forward";
  const int64_t T = logits.rows;
  const int E = static_cast<int>(logits.cols);
  const bool aux = cfg.aux_enabled();
  cudaStream_t st = stream;
  FP8FLOW_CUDA_CHECK(kOp, cudaMemsetAsync(out.tokens_per_expert.data, 0, E * sizeof(int32_t), st));
  if (aux && T > 0)
    FP8FLOW_CUDA_CHECK(kOp, cudaMemsetAsync(out.seq_counts.data, 0, out.seq_counts.bytes(), st));
  if (T == 0) {
    if (aux) FP8FLOW_CUDA_CHECK(kOp, cudaMemsetAsync(out.aux_loss.data, 0, sizeof(float), st));
    return;
  }

  const int lanes = router::lanes_for(E);
  const int64_t S = aux ? cfg.seq_len : T;
  const int64_t chunk = router::fwd_chunk_tokens(lanes);
  const int64_t chunks_per_seq = (S + chunk - 1) / chunk;
  const AuxPlan plan = router::make_aux_plan(T, E, cfg);
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
  const unsigned grid = static_cast<unsigned>((T / S) * chunks_per_seq);
  dispatch_lanes(lanes, [&](auto g) {
    router_fwd_sm90_f32<decltype(g)::value><<<grid, router::kFwdWarps * 32, 0, st>>>(p);
  });
  FP8FLOW_CUDA_CHECK_LAUNCH(kOp);
  if (!aux) return;

  // Column sums per chunk -> per sequence -> per-sequence losses -> mean.
  const int64_t B = plan.seqs;
  for (size_t l = 1; l < plan.col_rows.size(); ++l) {
    const int64_t n = B * plan.col_rows[l] * E;
    router_aux_reduce_sm90<<<blocks_for(n, 256), 256, 0, st>>>(
        ws + plan.col_off[l - 1], ws + plan.col_off[l], B, plan.col_rows[l - 1], plan.col_rows[l],
        E);
    FP8FLOW_CUDA_CHECK_LAUNCH(kOp);
  }
  const float fscale = hd::div(static_cast<float>(E), static_cast<float>(int64_t{cfg.top_k} * S));
  router_aux_terms_sm90<<<blocks_for(B * 32, 256), 256, 0, st>>>(
      ws + plan.col_off.back(), p.seq_counts, ws + plan.loss_off[0], B, E, S, fscale);
  FP8FLOW_CUDA_CHECK_LAUNCH(kOp);
  for (size_t l = 1; l < plan.loss_rows.size(); ++l) {
    router_aux_reduce_sm90<<<blocks_for(plan.loss_rows[l], 256), 256, 0, st>>>(
        ws + plan.loss_off[l - 1], ws + plan.loss_off[l], 1, plan.loss_rows[l - 1],
        plan.loss_rows[l], 1);
    FP8FLOW_CUDA_CHECK_LAUNCH(kOp);
  }
  router_aux_final_sm90<<<1, 1, 0, st>>>(ws + plan.loss_off.back(), out.aux_loss.ptr<float>(),
                                         cfg.aux_alpha, B);
  FP8FLOW_CUDA_CHECK_LAUNCH(kOp);
}

void router_backward(const TensorView& logits, const TensorView& topk_idx,
                     const TensorView& d_topk_weight, const TensorView& seq_counts,
                     const TensorView& d_aux_loss, const TensorView& d_logits,
                     const RouterConfig& cfg, Stream stream) {
  constexpr const char* kOp = "router_backward";
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

  int dev = 0, sms = 0;
  FP8FLOW_CUDA_CHECK(kOp, cudaGetDevice(&dev));
  FP8FLOW_CUDA_CHECK(kOp, cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  const int lanes = router::lanes_for(E);
  dispatch_lanes(lanes, [&](auto g) {
    constexpr int kG = decltype(g)::value;
    auto kernel = router_bwd_sm90_f32<kG>;
    int per_sm = 0;
    FP8FLOW_CUDA_CHECK(kOp, cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, 256, 0));
    // Enough CTAs to fill the GPU once; each warp then walks ~2+ rows with its prefetch.
    const int64_t rows_per_cta = 8 * (32 / kG);
    const int64_t need = (T + rows_per_cta - 1) / rows_per_cta;
    const int64_t cap = static_cast<int64_t>(sms) * (per_sm > 0 ? per_sm : 1);
    const unsigned grid = static_cast<unsigned>(need < cap ? need : cap);
    kernel<<<grid, 256, 0, stream>>>(p);
  });
  FP8FLOW_CUDA_CHECK_LAUNCH(kOp);
}

}  // namespace fp8flow::sm90
