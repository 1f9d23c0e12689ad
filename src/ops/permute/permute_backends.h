// Internal: the two backends of the permute ops, and the shape facts both share. Arguments are
// validated by permute.cpp before either backend runs.
#pragma once

#include <cstdint>

#include "fp8flow/permute.h"

namespace fp8flow::detail {

// Chunking of the T * k routing pairs for the CUDA plan kernels (one warp per chunk). A pure
// function of the shape, shared by permutation_workspace_bytes and the launcher.
struct PlanChunks {
  int32_t chunk = 256;     // pairs per warp chunk (multiple of 32)
  int32_t num_chunks = 0;  // ceil(T * k / chunk); 0 when there are no pairs
};
PlanChunks plan_chunks(int64_t num_pairs, int64_t num_experts);

// One row-gather pass (permute, unpermute-bwd, weighted-unpermute-bwd's dy): out row r = in row
// src_slot[r] / k, or zeros where src_slot[r] is outside [0, T * k). Data rows move as bytes.
struct PermuteRowsArgs {
  TensorView in, out;  // data [T][H] -> [R][H], same dtype
  TensorView in_scale,
      out_scale;               // FP8: F32 [tiles][T] -> [tiles][R]; MX: E8M0 [T][H/32] -> [R][.]
  bool col_scale = false;      // FP8 1x128 scales (pad rows: 2^-127)
  bool row_scale = false;      // MX scales (pad rows: byte 0)
  TensorView topk_weight;      // F32 [T][k] (probs or scale_by_prob)
  TensorView prob;             // F32 [R] (probs)
  bool probs = false;          // write prob[r] = topk_weight[slot], 0 on pad rows
  bool scale_by_prob = false;  // BF16/F32 data: out row = in row * topk_weight[slot]
  TensorView src_slot;         // I32, >= R entries (the first R are read)
  int64_t k = 1;
  // Optional I32 [T][k], the plan's inverse map (CUDA backend: with it, each token row is read once
  // and written to its rows, instead of gathered once per pair; same results for any plan).
  TensorView dest_row;
};

}  // namespace fp8flow::detail

namespace fp8flow::ref {
void make_permutation(const TensorView& topk_idx, int64_t num_experts, const PermutationPlan& plan,
                      int align);
void permute_rows(const detail::PermuteRowsArgs& a);
// topk_weight null: unweighted.
void unpermute(const TensorView& y, const TensorView* topk_weight, const TensorView& out,
               const TensorView& dest_row);
void permute_probs_backward(const TensorView& dprob, const TensorView& dest_row,
                            const TensorView& dweight);
void unpermute_weight_grad(const TensorView& dout, const TensorView& y, const TensorView& dest_row,
                           const TensorView& dweight);
}  // namespace fp8flow::ref

namespace fp8flow::sm90 {
void make_permutation(const TensorView& topk_idx, int64_t num_experts, const PermutationPlan& plan,
                      int align, void* workspace, Stream stream);
void permute_rows(const detail::PermuteRowsArgs& a, Stream stream);
void unpermute(const TensorView& y, const TensorView* topk_weight, const TensorView& out,
               const TensorView& dest_row, Stream stream);
void permute_probs_backward(const TensorView& dprob, const TensorView& dest_row,
                            const TensorView& dweight, Stream stream);
void unpermute_weight_grad(const TensorView& dout, const TensorView& y, const TensorView& dest_row,
                           const TensorView& dweight, Stream stream);
}  // namespace fp8flow::sm90
