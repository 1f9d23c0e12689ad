// MoE permute + pad and unpermute + unpad, forward and backward, on one GPU.
//
// A routing plan (make_permutation) turns the router's top-k choices into row maps; permute
// gathers token rows into per-expert segments, each padded with zero rows to a multiple of
// `align`, moving FP8 rows + their 1x128 scales (or MXFP4 rows + E8M0 scales, or BF16/F32 rows)
// and the routing probabilities together in one pass; unpermute sums each token's k expert
// outputs back into token order. The backward passes reuse the same two data movements.
//
// Notation: T tokens, k slots per token (top-k), E local experts, H hidden size. Pair (t, j) is
// slot j of token t; its flat index is t * k + j.
//
// Permuted layout (the "plan"): rows grouped by expert ascending; inside an expert, pairs in
// ascending flat index (token, then slot); expert e's segment is rows [offsets[e], offsets[e+1]),
// its first tokens_per_expert[e] rows real, the rest padding (zero rows, probability 0).
// M_pad = offsets[E] depends on the routing; it is at most permutation_max_rows(T, k, E, align),
// so callers can allocate without waiting for the device. The layer copies the E + 1 offsets to
// the host once per step to drive the grouped GEMMs (m_splits[e] = offsets[e+1] - offsets[e]).
//
// Expert ids outside [0, E) (e.g. -1 for a capacity-dropped pair) are never an error and never
// touch memory out of bounds: such a pair is dropped (dest_row = -1, no row in the permuted
// tensor, contributes nothing to unpermute, gets weight gradient 0) and counted in plan.invalid.
//
// Determinism: every output is a pure function of the inputs (no float atomics, fixed summation
// order); the CUDA backend matches the CPU reference bit for bit, NaN payloads included (moved
// bytes are never reinterpreted; where FP32 arithmetic produces a NaN it is written as the
// canonical quiet NaN 0x7FC00000 / BF16 0x7FC0 so both backends agree).
//
// 1-D tensors are TensorViews with numel() == n, contiguous ([1][n] or [n][1]). All tensors of
// one call are on one device (Cpu -> reference backend, Cuda -> sm_90a backend); every call takes
// the stream last and never synchronizes the host.
#pragma once

#include <cstddef>
#include <cstdint>

#include "fp8flow/types.h"

namespace fp8flow {

// Default row alignment of each expert's segment: 16.
// - 16 is what the FP8 GEMMs need: an expert's slice of the column-wise copy X^T [H][M_pad]
//   starts m0 bytes into each row, so m0 % 16 == 0 keeps every slice 16-byte aligned for
//   cuBLASLt and TMA, and its contraction length (the segment) a multiple of 16 as FP8 cuBLASLt
//   wants; the row-wise slice X[m0:] and its scale columns [m0:] (m0 * 4 bytes) are aligned too.
// - 128 additionally makes every 128-token scale tile of X^T full, at a large padding cost when
//   experts are small: at T = 4096, k = 8 (uniform random routing, measured by
//   PermutePlan.PaddingWaste) align 16 adds 0.6% rows at E = 32 and 5.9% at E = 256; align 128
//   adds 5.1% and 48% (83% with skewed routing). Column groups restart per expert
//   (ScaledTensor::col_groups), so partial tiles are already correct without 128-alignment.
// Any power of two in [1, 128] is accepted.
constexpr int kDefaultPermuteAlign = 16;
constexpr int kMaxPermuteAlign = 128;
// Largest top-k the CUDA kernels support (unpermute keeps a token's k row indices in a warp).
constexpr int kMaxTopK = 32;

// The routing plan: row maps between token order and the padded, expert-grouped order.
struct PermutationPlan {
  TensorView tokens_per_expert;  // I32 [E]: valid pairs routed to each expert (unpadded counts)
  TensorView offsets;            // I64 or I32 [E + 1]: padded segment starts; offsets[E] = M_pad
  TensorView dest_row;           // I32 [T][k]: permuted row of pair (t, j); -1 if dropped
  TensorView src_slot;           // I32 [R]: flat pair index t * k + j of permuted row r; -1 on
                                 //   pad rows and rows >= M_pad. R >= permutation_max_rows(...)
  TensorView invalid;            // I32 [1]: number of dropped pairs (ids outside [0, E))
};

struct PermutationOptions {
  int align = kDefaultPermuteAlign;  // power of two in [1, kMaxPermuteAlign]
};

// Upper bound on M_pad for any routing: T * k + E * (align - 1). Pure host function.
int64_t permutation_max_rows(int64_t num_tokens, int64_t topk, int64_t num_experts,
                             int align = kDefaultPermuteAlign);

// Device workspace make_permutation needs (Cuda backend; the Cpu backend needs none). Pure host
// function of the shape only (no device query, no CUB query), so it can size a pool up front.
size_t permutation_workspace_bytes(int64_t num_tokens, int64_t topk, int64_t num_experts);

// Routing plan from topk_idx I32 [T][k] (expert ids; out-of-range ids are dropped, see above).
// Writes every field of `plan` (plan.src_slot entirely, -1 past M_pad). E in [1, 1024];
// T * k + E * (align - 1) < 2^31. workspace: device memory of permutation_workspace_bytes(T, k, E)
// bytes, 16-byte aligned (ignored for Cpu tensors, may be null there). Deterministic.
// CUDA: three small kernels (per-chunk expert histograms, one-CTA scans, stable ranking with warp
// match), no sort, no host sync.
void make_permutation(const TensorView& topk_idx, int64_t num_experts, const PermutationPlan& plan,
                      void* workspace, size_t workspace_bytes, const PermutationOptions& = {},
                      Stream stream = nullptr);

// Routing probabilities moved by permute (optional): prob[r] = topk_weight[src_slot[r]], 0 on pad
// rows. Leave both views empty (data == nullptr) to move no probabilities.
struct PermuteProbs {
  TensorView topk_weight;  // F32 [T][k]
  TensorView prob;         // F32 [R], R = out rows
};

// Permute + pad: out row r = in row src_slot[r] / k for r in [0, R), zero on pad rows
// (src_slot[r] < 0), R = out rows <= plan.src_slot.numel() (R = M_pad exactly, or the
// permutation_max_rows bound when the host does not know M_pad yet). T = plan.dest_row rows.
// Also the backward of unpermute (permute the incoming gradient).
//
// FP8 (in.layout == Rowwise1x128, E4M3 or E5M2): in.data [T][H], in.scale F32 [ceil(H/128)][T]
//   -> out.data [R][H], out.scale F32 [ceil(H/128)][R]; pad rows: code 0, scale 2^-127 (the
//   all-zero-tile convention). H % 16 == 0. No col_groups.
// MXFP4 (in.layout == Mx1x32, E2M1x2): in.data [T][H], in.scale E8M0 [T][H/32]
//   -> out.data [R][H], out.scale E8M0 [R][H/32]; pad rows: code 0, scale byte 0. H % 32 == 0.
// CUDA: data rows 16-byte aligned (pointer and row pitch); one pass with 16-byte loads/stores.
void permute(const ScaledTensor& in, const ScaledTensor& out, const PermutationPlan& plan,
             const PermuteProbs& probs = {}, Stream stream = nullptr);

// Same for unscaled rows: BF16 or F32 in [T][H] -> out [R][H] of the same dtype. Row bytes % 16
// == 0 (H % 8 BF16, H % 4 F32).
void permute(const TensorView& in, const TensorView& out, const PermutationPlan& plan,
             const PermuteProbs& probs = {}, Stream stream = nullptr);

// Unpermute + unpad ("combine" on one GPU; also the backward of permute):
//   out[t] = sum over j = 0..k-1 of y[dest_row[t][j]]   (FP32, slots in order j = 0, 1, ...)
// y BF16 or F32 [R][H] (R >= M_pad), out BF16 or F32 [T][H], H % 8 == 0. Pairs with dest_row
// outside [0, R) contribute nothing; a token with none gets zeros. A single contribution with
// y and out of one dtype is copied bit for bit (round trip permute -> unpermute with k = 1
// returns X exactly, NaN payloads included); otherwise values go through FP32. Unweighted:
// the weighted SwiGLU already applied the probabilities. k <= kMaxTopK on CUDA.
void unpermute(const TensorView& y, const TensorView& out, const PermutationPlan& plan,
               Stream stream = nullptr);

// Weighted variant: out[t] = sum_j topk_weight[t][j] * y[dest_row[t][j]] (FP32 multiply, then
// the same ordered sum). topk_weight F32 [T][k].
void unpermute_weighted(const TensorView& y, const TensorView& topk_weight, const TensorView& out,
                        const PermutationPlan& plan, Stream stream = nullptr);

// Backward of the probability move: dweight[t][j] = dprob[dest_row[t][j]] (0 for dropped pairs).
// dprob F32 [R], dweight F32 [T][k].
void permute_probs_backward(const TensorView& dprob, const PermutationPlan& plan,
                            const TensorView& dweight, Stream stream = nullptr);

// Backward of unpermute_weighted, given dout [T][H] (BF16 or F32):
//   dy[r]          = dout[t] * topk_weight[t][j] for r = dest_row[t][j]; 0 on pad rows
//                    (dy [R][H], the dtype of dout)
//   dweight[t][j]  = <dout[t], y[dest_row[t][j]]>, 0 for dropped pairs (F32 [T][k])
// The dot product is FP32 in a fixed order: 8-element chunks c go to partial c % 32, each partial
// accumulates its chunks in order with FMA, the 32 partials are added as a binary tree
// (p[l] += p[l + s] for s = 16, 8, 4, 2, 1), identically on both backends. y: BF16 or F32 [R][H].
void unpermute_weighted_backward(const TensorView& dout, const TensorView& y,
                                 const TensorView& topk_weight, const PermutationPlan& plan,
                                 const TensorView& dy, const TensorView& dweight,
                                 Stream stream = nullptr);

}  // namespace fp8flow
