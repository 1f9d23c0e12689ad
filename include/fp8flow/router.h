// MoE router: gate logits -> top-k experts per token, their weights, per-expert token counts and
// the sequence-wise auxiliary load-balancing loss; and the backward pass to the logits.
// Two score kinds: DeepSeek-V3 (sigmoid scores, selection on scores + bias, optional group-limited
// selection, normalized weights times a scaling factor) and Mixtral/Qwen (softmax scores, top-k,
// optional renormalization). All math is FP32 with a fixed operation order (src/common/hd_math.h),
// so the CUDA backend reproduces the CPU reference bit for bit, and every result is deterministic.
#pragma once

#include <cstddef>
#include <cstdint>

#include "fp8flow/types.h"

namespace fp8flow {

enum class RouterKind : uint8_t {
  // DeepSeek-V3: s = sigmoid(logit); selection on s + bias; w = s / sum_selected(s) * scaling.
  SigmoidBias,
  // Mixtral / Qwen: s = softmax(logits); selection on s (+ bias when given); w = s (optionally
  // renormalized over the k selected) * scaling.
  Softmax,
};

const char* to_string(RouterKind);

// Top-k routing configuration. Checked on every call (fp8flow::Error naming the field).
struct RouterConfig {
  RouterKind kind = RouterKind::SigmoidBias;
  int top_k = 8;  // 1..8, <= experts
  // Group-limited selection: experts split into n_groups contiguous groups of E / n_groups; a
  // group's score is the sum of its two largest selection values (s + bias); only experts of the
  // topk_groups best groups can be selected. n_groups == 1: off. Supported group sizes: 2, 4, or a
  // multiple of 8 whose eighth is a power of two (8, 16, 32, 64, 128); topk_groups * group size
  // must be >= top_k.
  int n_groups = 1;
  int topk_groups = 1;
  // Weights of the selected experts: w_j = s_j / (sum_j s_j + 1e-20) * scaling when true (always
  // the case for DeepSeek-V3), s_j * scaling when false.
  bool renormalize = true;
  float scaling = 1.0f;
  // Sequence-wise auxiliary loss (DeepSeek-V3 "complementary sequence-wise balance loss"); on when
  // aux_alpha != 0. Tokens form T / seq_len consecutive sequences of seq_len tokens (T % seq_len
  // == 0). For each sequence b and expert i:
  //   f_bi = E / (k * S) * (number of the sequence's (token, slot) pairs that selected i)
  //   P_bi = mean over the sequence's tokens of s_ti / (sum_j s_tj + 1e-20)   (unbiased scores)
  //   aux_loss = aux_alpha * mean over sequences of sum_i f_bi * P_bi.
  float aux_alpha = 0.0f;
  int64_t seq_len = 0;

  bool aux_enabled() const { return aux_alpha != 0.0f; }

  // DeepSeek-V3: sigmoid + bias, 8 of 256 experts, 8 groups / top-4 groups, scaling 2.5.
  static RouterConfig deepseek_v3(float aux_alpha = 0.0f, int64_t seq_len = 0) {
    RouterConfig c;
    c.kind = RouterKind::SigmoidBias;
    c.top_k = 8;
    c.n_groups = 8;
    c.topk_groups = 4;
    c.renormalize = true;
    c.scaling = 2.5f;
    c.aux_alpha = aux_alpha;
    c.seq_len = seq_len;
    return c;
  }
  // Softmax top-k (Mixtral: k = 2, renormalize; Qwen2-MoE: renormalize = false).
  static RouterConfig softmax_topk(int k, bool renormalize) {
    RouterConfig c;
    c.kind = RouterKind::Softmax;
    c.top_k = k;
    c.renormalize = renormalize;
    return c;
  }
};

// Outputs of router_forward. All on the device of the logits; rows are tokens.
struct RouterOutputs {
  TensorView topk_idx;           // I32 [T][k]: experts in descending selection value (s + bias),
                                 //   ties to the lower expert index
  TensorView topk_weight;        // F32 [T][k]: weights of those experts (from s, not s + bias)
  TensorView tokens_per_expert;  // I32 [1][E]: (token, slot) pairs per expert; overwritten
  TensorView scores;             // F32 [T][E] s, optional (empty view: not written)
  // Aux loss only (aux_alpha != 0), else empty:
  TensorView seq_counts;  // I32 [T/S][E]: per-sequence counts; saved for router_backward
  TensorView aux_loss;    // F32 [1][1]
};

// Workspace (bytes) router_forward needs on a Cuda device for these sizes; 0 when the aux loss is
// off. The Cpu backend needs none. Pure host function.
size_t router_workspace_bytes(int64_t tokens, int64_t experts, const RouterConfig& cfg);

// logits F32 [T][E] (contiguous; 4 <= E <= 256, E % 4 == 0) -> outputs. On Cuda, logits and
// scores must be 16-byte aligned (the kernels move rows as float4).
// bias: empty, or F32 [1][E] (selection bias, not differentiated).
// workspace: Cuda: >= router_workspace_bytes(T, E, cfg) bytes of device memory, 16-byte aligned
// (any dtype; empty when 0 bytes are needed). Cpu: ignored.
// NaN: a NaN selection value ranks below every number (it is never selected unless fewer than k
// numbers are available; NaNs then go in index order). A NaN logit makes that token's softmax, and
// its aux-loss row, NaN. Every NaN written is the canonical quiet NaN 0x7FC00000.
// Deterministic: same inputs, same bits, on either backend (counts use integer atomics; every FP32
// sum has a fixed tree). Asynchronous on Cuda (no host synchronization).
void router_forward(const TensorView& logits, const TensorView& bias, const RouterOutputs& out,
                    const RouterConfig& cfg, const TensorView& workspace = {},
                    Stream stream = nullptr);

// Gradient of sum_tj d_topk_weight[t][j] * topk_weight[t][j] + d_aux_loss * aux_loss with respect
// to the logits, with the selection held fixed (not differentiated). Scores are recomputed from the
// logits (bit-identical to the forward), so the forward's `scores` need not be kept.
//   logits F32 [T][E], topk_idx I32 [T][k] (from router_forward; entries outside [0, E) are
//   ignored), d_topk_weight F32 [T][k], d_logits F32 [T][E] (overwritten; must not overlap inputs;
//   on Cuda, logits and d_logits 16-byte aligned).
//   Aux loss on: seq_counts I32 [T/S][E] from router_forward, d_aux_loss F32 [1][1] (empty: no
//   aux-loss gradient). Aux loss off: both must be empty.
// Deterministic, bit-identical between backends.
void router_backward(const TensorView& logits, const TensorView& topk_idx,
                     const TensorView& d_topk_weight, const TensorView& seq_counts,
                     const TensorView& d_aux_loss, const TensorView& d_logits,
                     const RouterConfig& cfg, Stream stream = nullptr);

}  // namespace fp8flow
