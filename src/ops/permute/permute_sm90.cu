// sm_90a backend of the permute ops: launch configuration (a pure function of the shapes) and the
// launches. Device code lives in kernels/: plan.cuh (routing plan), rows.cuh (permute + pad,
// probs backward), unpermute.cuh (unpermute + unpad, weight gradient).
// Bench: `fp8flow-bench ops` (permute rows), PermuteBench.* in tests/permute.
#include <cuda_runtime.h>

#include <algorithm>

#include "common/cuda_check.h"
#include "ops/permute/kernels/plan.cuh"
#include "ops/permute/kernels/rows.cuh"
#include "ops/permute/kernels/unpermute.cuh"
#include "ops/permute/permute_backends.h"

namespace fp8flow::sm90 {
namespace {

cudaStream_t cu(Stream s) {
  return reinterpret_cast<cudaStream_t>(s);
}

// Largest power of two <= 16 dividing x.
int pow2_divisor16(uint64_t x) {
  int w = 16;
  while (w > 1 && x % static_cast<uint64_t>(w) != 0) w /= 2;
  return w;
}

}  // namespace

void make_permutation(const TensorView& topk_idx, int64_t num_experts, const PermutationPlan& plan,
                      int align, void* workspace, Stream stream) {
  const int64_t pairs = topk_idx.numel();
  const detail::PlanChunks pc = detail::plan_chunks(pairs, num_experts);
  kernels::PlanArgs a{};
  a.topk_idx = topk_idx.ptr<const int32_t>();
  a.num_pairs = static_cast<int32_t>(pairs);
  a.num_experts = static_cast<int32_t>(num_experts);
  a.chunk = pc.chunk;
  a.num_chunks = pc.num_chunks;
  a.align = align;
  a.hist = static_cast<int32_t*>(workspace);
  a.tokens_per_expert = plan.tokens_per_expert.ptr<int32_t>();
  a.offsets = plan.offsets.data;
  a.offsets64 = plan.offsets.dtype == DType::I64;
  a.dest_row = plan.dest_row.ptr<int32_t>();
  a.src_slot = plan.src_slot.ptr<int32_t>();
  a.src_slot_len = static_cast<int32_t>(plan.src_slot.numel());
  a.invalid = plan.invalid.ptr<int32_t>();
  const size_t smem =
      static_cast<size_t>(kernels::kPlanWarps) * (num_experts + 1) * sizeof(int32_t);
  const int blocks = (pc.num_chunks + kernels::kPlanWarps - 1) / kernels::kPlanWarps;
  if (pairs > 0) {
    kernels::plan_chunk_kernel<false><<<blocks, kernels::kPlanWarps * 32, smem, cu(stream)>>>(a);
    FP8FLOW_CUDA_CHECK_LAUNCH("make_permutation");
  }
  kernels::plan_scan_kernel<<<1, kernels::kScanThreads, 0, cu(stream)>>>(a);
  FP8FLOW_CUDA_CHECK_LAUNCH("make_permutation");
  if (pairs > 0) {
    kernels::plan_chunk_kernel<true><<<blocks, kernels::kPlanWarps * 32, smem, cu(stream)>>>(a);
    FP8FLOW_CUDA_CHECK_LAUNCH("make_permutation");
  }
}

void permute_rows(const detail::PermuteRowsArgs& p, Stream stream) {
  const int64_t R = p.out.rows;
  if (R == 0) return;
  kernels::RowsArgs a{};
  a.in = static_cast<const uint8_t*>(p.in.data);
  a.out = static_cast<uint8_t*>(p.out.data);
  a.row_bytes = static_cast<int64_t>(p.in.row_bytes());
  a.rows_out = static_cast<int32_t>(R);
  a.num_pairs = static_cast<int32_t>(p.in.rows * p.k);
  a.k = static_cast<int32_t>(p.k);
  a.tokens = static_cast<int32_t>(p.in.rows);
  // NOTES: a warp per row for rows of >= 64 16-byte vectors (1 KB); narrower rows share a warp so
  // each lane still moves >= 2 vectors. G = 8 * rows_per_warp >= 8 rows per CTA keeps the FP8
  // scale writes (one F32 per row and tile, rows contiguous) in whole 32-byte sectors.
  const int64_t nvec = a.row_bytes / 16;
  // Scatter mode (below): the scatter half moves the data of every confirmed row, so the row half
  // is left with scales, probabilities and pad rows, too little for a CTA per 8 rows: 4 rows per
  // warp there (H100, T 4096, k 8, H 7168, one launch: FP8 84 -> 87%, MXFP4 77-79 -> 83-85% of
  // copy; 16 rows per warp: 84-86% / 79-82%, too few CTAs).
  const bool scatter = !p.scale_by_prob && p.dest_row.data != nullptr && p.k <= 32 && p.in.rows > 0;
  int rpw = 1;
  while (rpw < kernels::kMaxRowsPerWarp && rpw * nvec < 64) rpw *= 2;
  if (scatter) rpw = std::max(rpw, 4);
  a.rows_per_warp = rpw;
  int log2g = 0;
  while ((1 << log2g) < kernels::kRowsWarps * rpw) ++log2g;
  a.log2_rows_per_cta = log2g;
  a.src_slot = p.src_slot.ptr<const int32_t>();
  a.topk_weight = (p.probs || p.scale_by_prob) ? p.topk_weight.ptr<const float>() : nullptr;
  a.prob = p.probs ? p.prob.ptr<float>() : nullptr;
  if (p.col_scale) {
    a.in_cscale = p.in_scale.ptr<const float>();
    a.out_cscale = p.out_scale.ptr<float>();
    a.ctiles = static_cast<int32_t>(p.in_scale.rows);
  }
  if (p.row_scale) {
    a.in_rscale = static_cast<const uint8_t*>(p.in_scale.data);
    a.out_rscale = static_cast<uint8_t*>(p.out_scale.data);
    a.rscale_bytes = static_cast<int32_t>(p.in_scale.cols);
    a.rscale_vec = pow2_divisor16(static_cast<uint64_t>(a.rscale_bytes) |
                                  reinterpret_cast<uintptr_t>(a.in_rscale) |
                                  reinterpret_cast<uintptr_t>(a.out_rscale) | 16u);
    a.rscale_vec = std::min(a.rscale_vec, 16);
  }
  const auto grid = static_cast<unsigned>((R + (int64_t{1} << log2g) - 1) >> log2g);
  const dim3 block(kernels::kRowsThreads);
  // Unscaled rows with the plan's inverse map: each token row read once and scattered to its rows;
  // in the same launch the row CTAs write scales, probabilities and pad rows
  // (permute_fused_kernel).
  if (scatter) {
    a.dest_row = p.dest_row.ptr<const int32_t>();
    const int64_t sctas = (p.in.rows + kernels::kRowsWarps - 1) / kernels::kRowsWarps;
    const auto fgrid = static_cast<unsigned>(sctas + grid);
    using kernels::permute_fused_kernel;
    if (p.col_scale)
      permute_fused_kernel<kernels::kColScale><<<fgrid, block, 0, cu(stream)>>>(a, sctas);
    else if (p.row_scale)
      permute_fused_kernel<kernels::kRowScale><<<fgrid, block, 0, cu(stream)>>>(a, sctas);
    else
      permute_fused_kernel<kernels::kNoScale><<<fgrid, block, 0, cu(stream)>>>(a, sctas);
    FP8FLOW_CUDA_CHECK_LAUNCH("permute");
    return;
  }
  using kernels::permute_rows_kernel;
  if (p.col_scale) {
    permute_rows_kernel<kernels::kColScale, kernels::kNoMul><<<grid, block, 0, cu(stream)>>>(a);
  } else if (p.row_scale) {
    permute_rows_kernel<kernels::kRowScale, kernels::kNoMul><<<grid, block, 0, cu(stream)>>>(a);
  } else if (!p.scale_by_prob) {
    permute_rows_kernel<kernels::kNoScale, kernels::kNoMul><<<grid, block, 0, cu(stream)>>>(a);
  } else if (p.in.dtype == DType::BF16) {
    permute_rows_kernel<kernels::kNoScale, kernels::kMulBF16><<<grid, block, 0, cu(stream)>>>(a);
  } else {
    permute_rows_kernel<kernels::kNoScale, kernels::kMulF32><<<grid, block, 0, cu(stream)>>>(a);
  }
  FP8FLOW_CUDA_CHECK_LAUNCH("permute");
}

namespace {

template <typename YT, typename OT>
void launch_unpermute(const kernels::UnpermuteArgs& a, bool weighted, dim3 grid, cudaStream_t s) {
  if (weighted)
    kernels::unpermute_kernel<YT, OT, true><<<grid, kernels::kUnpermuteWarps * 32, 0, s>>>(a);
  else
    kernels::unpermute_kernel<YT, OT, false><<<grid, kernels::kUnpermuteWarps * 32, 0, s>>>(a);
}

}  // namespace

void unpermute(const TensorView& y, const TensorView* topk_weight, const TensorView& out,
               const TensorView& dest_row, Stream stream) {
  const int64_t T = out.rows, H = out.cols;
  if (T == 0 || H == 0) return;
  kernels::UnpermuteArgs a{};
  a.y = y.data;
  a.out = out.data;
  a.dest_row = dest_row.ptr<const int32_t>();
  a.topk_weight = topk_weight ? topk_weight->ptr<const float>() : nullptr;
  a.tokens = static_cast<int32_t>(T);
  a.k = static_cast<int32_t>(dest_row.cols);
  a.y_rows = static_cast<int32_t>(y.rows);
  a.cols = static_cast<int32_t>(H);
  // NOTES: split H into segments so T * segments warps fill the GPU twice over (16K warps),
  // keeping >= 32 chunks (one per lane) per segment.
  const int64_t nchunks = H / 8;
  const int64_t max_seg = std::max<int64_t>(1, std::min<int64_t>(65535, nchunks / 32));
  const int64_t want = std::max<int64_t>(1, (16384 + T - 1) / T);
  int64_t nseg = std::min(want, max_seg);
  const int64_t seg = (nchunks + nseg - 1) / nseg;
  nseg = (nchunks + seg - 1) / seg;
  a.seg = static_cast<int32_t>(seg);
  const dim3 grid(
      static_cast<unsigned>((T + kernels::kUnpermuteWarps - 1) / kernels::kUnpermuteWarps),
      static_cast<unsigned>(nseg));
  const bool w = topk_weight != nullptr;
  const bool ybf = y.dtype == DType::BF16, obf = out.dtype == DType::BF16;
  if (ybf && obf)
    launch_unpermute<uint16_t, uint16_t>(a, w, grid, cu(stream));
  else if (ybf)
    launch_unpermute<uint16_t, float>(a, w, grid, cu(stream));
  else if (obf)
    launch_unpermute<float, uint16_t>(a, w, grid, cu(stream));
  else
    launch_unpermute<float, float>(a, w, grid, cu(stream));
  FP8FLOW_CUDA_CHECK_LAUNCH(w ? "unpermute_weighted" : "unpermute");
}

void permute_probs_backward(const TensorView& dprob, const TensorView& dest_row,
                            const TensorView& dweight, Stream stream) {
  const int64_t n = dest_row.numel();
  if (n == 0) return;
  const int64_t blocks = std::min<int64_t>((n + 255) / 256, 4096);
  kernels::probs_backward_kernel<<<static_cast<unsigned>(blocks), 256, 0, cu(stream)>>>(
      dprob.ptr<const float>(), static_cast<int32_t>(dprob.numel()), dest_row.ptr<const int32_t>(),
      dweight.ptr<float>(), static_cast<int32_t>(n));
  FP8FLOW_CUDA_CHECK_LAUNCH("permute_probs_backward");
}

void unpermute_weight_grad(const TensorView& dout, const TensorView& y, const TensorView& dest_row,
                           const TensorView& dweight, Stream stream) {
  const int64_t pairs = dest_row.numel();
  if (pairs == 0) return;
  const unsigned grid = static_cast<unsigned>((pairs + 7) / 8);
  const auto k = static_cast<int32_t>(dest_row.cols);
  const auto yr = static_cast<int32_t>(y.rows), H = static_cast<int32_t>(dout.cols);
  const auto* dr = dest_row.ptr<const int32_t>();
  auto* dw = dweight.ptr<float>();
  const auto n = static_cast<int32_t>(pairs);
  const bool dbf = dout.dtype == DType::BF16, ybf = y.dtype == DType::BF16;
  if (dbf && ybf)
    kernels::weight_grad_kernel<<<grid, 256, 0, cu(stream)>>>(
        dout.ptr<const uint16_t>(), y.ptr<const uint16_t>(), dr, dw, n, k, yr, H);
  else if (dbf)
    kernels::weight_grad_kernel<<<grid, 256, 0, cu(stream)>>>(
        dout.ptr<const uint16_t>(), y.ptr<const float>(), dr, dw, n, k, yr, H);
  else if (ybf)
    kernels::weight_grad_kernel<<<grid, 256, 0, cu(stream)>>>(
        dout.ptr<const float>(), y.ptr<const uint16_t>(), dr, dw, n, k, yr, H);
  else
    kernels::weight_grad_kernel<<<grid, 256, 0, cu(stream)>>>(
        dout.ptr<const float>(), y.ptr<const float>(), dr, dw, n, k, yr, H);
  FP8FLOW_CUDA_CHECK_LAUNCH("unpermute_weighted_backward");
}

}  // namespace fp8flow::sm90
