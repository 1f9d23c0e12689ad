// router_forward / router_backward: validate every argument on the host, then route to the
// reference backend (Cpu tensors) or the sm_90a backend (Cuda tensors).
#include "fp8flow/router.h"

#include <cmath>

#include "common/backend.h"
#include "ops/router/router_backends.h"

namespace fp8flow {

const char* to_string(RouterKind k) {
  switch (k) {
    case RouterKind::SigmoidBias:
      return "SigmoidBias";
    case RouterKind::Softmax:
      return "Softmax";
  }
  return "?";
}

namespace {

using detail::cat;
using detail::Check;

bool is_empty(const TensorView& t) {
  return t.data == nullptr && t.numel() == 0;
}

// Logits (or d_logits) [T][E]: F32, contiguous, 4 <= E <= 256, E % 4 == 0.
void check_rows(const Check& c, const TensorView& t, const char* arg) {
  c.view(t, arg, {DType::F32});
  c.contiguous(t, arg);
  c.that(t.cols >= 4 && t.cols <= router::kMaxExperts && t.cols % 4 == 0, cat(arg, ".cols"),
         cat("a number of experts in [4, ", router::kMaxExperts, "] divisible by 4"), cat(t.cols));
}

void check_config(const Check& c, const RouterConfig& cfg, int64_t T, int64_t E) {
  c.that(cfg.kind == RouterKind::SigmoidBias || cfg.kind == RouterKind::Softmax, "cfg.kind",
         "SigmoidBias or Softmax", cat(static_cast<int>(cfg.kind)));
  c.that(cfg.top_k >= 1 && cfg.top_k <= router::kRouterMaxTopK, "cfg.top_k",
         cat("1 <= top_k <= ", router::kRouterMaxTopK), cat(cfg.top_k));
  c.that(cfg.top_k <= E, "cfg.top_k", cat("top_k <= experts (", E, ")"), cat(cfg.top_k));
  c.that(std::isfinite(cfg.scaling), "cfg.scaling", "a finite value", cat(cfg.scaling));
  c.that(cfg.n_groups >= 1 && E % cfg.n_groups == 0, "cfg.n_groups",
         cat("a divisor of experts (", E, ")"), cat(cfg.n_groups));
  if (cfg.n_groups > 1) {
    const int64_t gsize = E / cfg.n_groups;
    c.that(router::group_size_supported(gsize), "cfg.n_groups",
           "a group size (experts / n_groups) of 2, 4, 8, 16, 32, 64 or 128",
           cat("group size ", gsize));
    c.that(cfg.topk_groups >= 1 && cfg.topk_groups <= cfg.n_groups, "cfg.topk_groups",
           cat("1 <= topk_groups <= n_groups (", cfg.n_groups, ")"), cat(cfg.topk_groups));
    c.that(cfg.topk_groups * gsize >= cfg.top_k, "cfg.topk_groups",
           cat("topk_groups * group size >= top_k (", cfg.top_k, ")"),
           cat(cfg.topk_groups, " * ", gsize));
  }
  c.that(std::isfinite(cfg.aux_alpha), "cfg.aux_alpha", "a finite value", cat(cfg.aux_alpha));
  if (cfg.aux_enabled()) {
    c.that(cfg.seq_len >= 1, "cfg.seq_len", "seq_len >= 1 when the aux loss is on (aux_alpha != 0)",
           cat(cfg.seq_len));
    c.that(T % cfg.seq_len == 0, "cfg.seq_len", cat("a divisor of the token count (", T, ")"),
           cat(cfg.seq_len));
  }
}

// An optional argument: empty, or a view of the given dtype and shape on `ref`'s device.
void check_tensor(const Check& c, const TensorView& t, const char* arg, DType d, int64_t rows,
                  int64_t cols, const TensorView& ref, const char* ref_arg) {
  c.view(t, arg, {d});
  c.shape(t, arg, rows, cols);
  c.contiguous(t, arg);
  c.same_device(ref, ref_arg, t, arg);
}

void check_absent(const Check& c, const TensorView& t, const char* arg, const char* why) {
  c.that(is_empty(t), arg, cat("an empty view (", why, ")"),
         cat("[", t.rows, ", ", t.cols, "]", t.data ? " with data" : ""));
}

void check_cuda(const Check& c,
                std::initializer_list<std::pair<const TensorView*, const char*>> ts) {
  detail::require_cuda_backend(c);
  for (auto [t, name] : ts) detail::require_device_pointer(c, *t, name);
}

}  // namespace

size_t router_workspace_bytes(int64_t tokens, int64_t experts, const RouterConfig& cfg) {
  return router::make_aux_plan(tokens, experts, cfg).floats * sizeof(float);
}

void router_forward(const TensorView& logits, const TensorView& bias, const RouterOutputs& out,
                    const RouterConfig& cfg, const TensorView& workspace, Stream stream) {
  const Check c("router_forward");
  check_rows(c, logits, "logits");
  const int64_t T = logits.rows, E = logits.cols;
  check_config(c, cfg, T, E);
  const int64_t k = cfg.top_k;
  if (!is_empty(bias)) check_tensor(c, bias, "bias", DType::F32, 1, E, logits, "logits");
  check_tensor(c, out.topk_idx, "out.topk_idx", DType::I32, T, k, logits, "logits");
  check_tensor(c, out.topk_weight, "out.topk_weight", DType::F32, T, k, logits, "logits");
  check_tensor(c, out.tokens_per_expert, "out.tokens_per_expert", DType::I32, 1, E, logits,
               "logits");
  if (!is_empty(out.scores))
    check_tensor(c, out.scores, "out.scores", DType::F32, T, E, logits, "logits");
  if (cfg.aux_enabled()) {
    check_tensor(c, out.seq_counts, "out.seq_counts", DType::I32, T / cfg.seq_len, E, logits,
                 "logits");
    check_tensor(c, out.aux_loss, "out.aux_loss", DType::F32, 1, 1, logits, "logits");
  } else {
    check_absent(c, out.seq_counts, "out.seq_counts", "the aux loss is off");
    check_absent(c, out.aux_loss, "out.aux_loss", "the aux loss is off");
  }
  if (logits.device == Device::Cpu) return ref::router_forward(logits, bias, out, cfg);

  const size_t need = router_workspace_bytes(T, E, cfg);
  if (need > 0) {
    c.view(workspace, "workspace");
    c.same_device(logits, "logits", workspace, "workspace");
    c.that(workspace.bytes() >= need, "workspace", cat(need, " bytes (router_workspace_bytes)"),
           cat(workspace.bytes(), " bytes"));
    c.aligned(workspace, "workspace", 16);
  }
  c.aligned(logits, "logits", 16);
  if (!is_empty(out.scores)) c.aligned(out.scores, "out.scores", 16);
  check_cuda(c, {{&logits, "logits"},
                 {&bias, "bias"},
                 {&out.topk_idx, "out.topk_idx"},
                 {&out.topk_weight, "out.topk_weight"},
                 {&out.tokens_per_expert, "out.tokens_per_expert"},
                 {&out.scores, "out.scores"},
                 {&out.seq_counts, "out.seq_counts"},
                 {&out.aux_loss, "out.aux_loss"}});
  if (need > 0) detail::require_device_pointer(c, workspace, "workspace");
#if FP8FLOW_WITH_CUDA  // a CPU-only build has no sm90 backend; check_cuda has thrown already
  sm90::router_forward(logits, bias, out, cfg, workspace, stream);
#else
  (void)stream;
#endif
}

void router_backward(const TensorView& logits, const TensorView& topk_idx,
                     const TensorView& d_topk_weight, const TensorView& seq_counts,
                     const TensorView& d_aux_loss, const TensorView& d_logits,
                     const RouterConfig& cfg, Stream stream) {
  const Check c("router_backward");
  check_rows(c, logits, "logits");
  const int64_t T = logits.rows, E = logits.cols;
  check_config(c, cfg, T, E);
  const int64_t k = cfg.top_k;
  check_tensor(c, topk_idx, "topk_idx", DType::I32, T, k, logits, "logits");
  check_tensor(c, d_topk_weight, "d_topk_weight", DType::F32, T, k, logits, "logits");
  check_tensor(c, d_logits, "d_logits", DType::F32, T, E, logits, "logits");
  if (cfg.aux_enabled()) {
    check_tensor(c, seq_counts, "seq_counts", DType::I32, T / cfg.seq_len, E, logits, "logits");
    if (!is_empty(d_aux_loss))
      check_tensor(c, d_aux_loss, "d_aux_loss", DType::F32, 1, 1, logits, "logits");
  } else {
    check_absent(c, seq_counts, "seq_counts", "the aux loss is off");
    check_absent(c, d_aux_loss, "d_aux_loss", "the aux loss is off");
  }
  if (logits.device == Device::Cpu)
    return ref::router_backward(logits, topk_idx, d_topk_weight, seq_counts, d_aux_loss, d_logits,
                                cfg);
  c.aligned(logits, "logits", 16);
  c.aligned(d_logits, "d_logits", 16);
  check_cuda(c, {{&logits, "logits"},
                 {&topk_idx, "topk_idx"},
                 {&d_topk_weight, "d_topk_weight"},
                 {&seq_counts, "seq_counts"},
                 {&d_aux_loss, "d_aux_loss"},
                 {&d_logits, "d_logits"}});
#if FP8FLOW_WITH_CUDA
  sm90::router_backward(logits, topk_idx, d_topk_weight, seq_counts, d_aux_loss, d_logits, cfg,
                        stream);
#else
  (void)stream;
#endif
}

}  // namespace fp8flow
