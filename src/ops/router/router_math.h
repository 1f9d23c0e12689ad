// The router's numeric definitions shared by the CPU reference and the kernels (host + device):
// the total order used for selection (NaN lowest, ties to the lower index), the canonical NaN, the
// lane layout that fixes every per-row FP32 sum, and the constants of the aux-loss tree.
//
// Fixed summation orders (both backends implement exactly these):
// - Row sums over experts (softmax denominator, aux normalization sum_j s_j, backward dot
//   products): experts are laid out in 8 * G slots, G = lanes_for(E) (a power of two), slots >= E
//   hold +0. The sum is the stride-doubling pairwise tree over the slots: level 0 adds slot 2i+1
//   into 2i, level 1 adds 4i+2 into 4i, ... (the kernel: an 8-slot tree in each lane, then
//   shuffle-xor with offsets 1, 2, 4, ... across the G lanes of the token).
// - Sum of the k selected scores: sequential in selection order, s_0 + s_1 + ... + s_{k-1}.
// - Aux loss: per sequence, tokens form runs of kRunTokens consecutive tokens (the last run may be
//   shorter); a run's column sums are sequential in token order starting from +0; run sums, then
//   per-sequence terms over experts, then per-sequence losses are each combined by the
//   stride-doubling tree (with absent elements skipped; the kernels pad with +0, the same bits for
//   these non-negative sums).
#pragma once

#include <cstdint>

#include "common/hd_math.h"
#include "fp8flow/formats.h"

namespace fp8flow::router {

constexpr int kMaxExperts = 256;
constexpr int kRouterMaxTopK = 8;
constexpr int kSlots = 8;      // experts per lane (two float4)
constexpr int kRunTokens = 8;  // tokens per aux-loss run
constexpr float kNormEps = 1e-20f;
constexpr uint32_t kKeyNone = 0;  // unavailable (taken, masked group, padding slot)
constexpr uint32_t kKeyNaN = 1;   // NaN: below every number, above kKeyNone

// Lanes per token row: the power of two >= ceil(E / 8), in [1, 32] for E <= 256.
FP8FLOW_HD int lanes_for(int64_t experts) {
  const int64_t need = (experts + kSlots - 1) / kSlots;
  int g = 1;
  while (g < need) g <<= 1;
  return g;
}

// Order-preserving map of an FP32 selection value to uint32: larger value -> larger key; +0 and -0
// map to the same key; every NaN maps to kKeyNaN (below -Inf); finite numbers and +-Inf are
// > kKeyNaN. Comparing keys gives the selection order; ties (equal keys) go to the lower index.
FP8FLOW_HD uint32_t sel_key(float v) {
  if (v != v) return kKeyNaN;
  uint32_t u = fmt::f32_bits(v);
  if ((u & 0x7FFFFFFFu) == 0) u = 0;  // -0 -> +0
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Inverse of sel_key for keys of numbers; kKeyNaN (and kKeyNone) -> NaN.
FP8FLOW_HD float key_value(uint32_t k) {
  if (k <= kKeyNaN) return fmt::f32_from_bits(0x7FC00000u);
  return fmt::f32_from_bits((k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k);
}

// Every NaN an output holds is this one (the CPU and GPU produce different NaN payloads).
FP8FLOW_HD float canon(float x) {
  return x != x ? fmt::f32_from_bits(0x7FC00000u) : x;
}

// NaN-ignoring maximum, symmetric in its arguments (+0 wins over -0): the softmax row maximum.
FP8FLOW_HD float max_num(float a, float b) {
  if (a != a) return b;
  if (b != b) return a;
  if (a > b) return a;
  if (b > a) return b;
  return fmt::f32_bits(a) < fmt::f32_bits(b) ? a : b;
}

FP8FLOW_HD uint32_t umax(uint32_t a, uint32_t b) {
  return a > b ? a : b;
}
FP8FLOW_HD uint32_t umin(uint32_t a, uint32_t b) {
  return a < b ? a : b;
}

// The two largest keys of a multiset (first >= second), merged from two such pairs.
struct Top2 {
  uint32_t first = kKeyNone;
  uint32_t second = kKeyNone;
};
FP8FLOW_HD Top2 top2_push(Top2 t, uint32_t k) {
  return Top2{umax(t.first, k), umax(t.second, umin(t.first, k))};
}
FP8FLOW_HD Top2 top2_merge(Top2 a, Top2 b) {
  return Top2{umax(a.first, b.first), umax(umin(a.first, b.first), umax(a.second, b.second))};
}
// Group score key: the sum of the group's two largest selection values (NaN if either is NaN).
FP8FLOW_HD uint32_t group_key(Top2 t) {
  return sel_key(hd::add(key_value(t.first), key_value(t.second)));
}

// Group sizes the group-limited selection supports (see RouterConfig::n_groups).
FP8FLOW_HD bool group_size_supported(int64_t gsize) {
  if (gsize == 2 || gsize == 4) return true;
  if (gsize < 8 || gsize % 8 != 0) return false;
  const int64_t lanes = gsize / 8;
  return (lanes & (lanes - 1)) == 0;
}

// Selected-weight formula: w = s / (Z + eps) * scaling (renormalize) or s * scaling.
FP8FLOW_HD float topk_weight(float s, float denom, bool renormalize, float scaling) {
  return renormalize ? hd::mul(hd::div(s, denom), scaling) : hd::mul(s, scaling);
}

}  // namespace fp8flow::router
