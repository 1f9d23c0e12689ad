// Internal: the two backends of the grouped GEMMs and of transpose_block_weights, plus the layout
// rules both the validator (gemm.cpp) and the CUDA backend need. Arguments are validated by
// gemm.cpp before any backend runs.
#pragma once

#include <cstdint>
#include <span>
#include <string>

#include "fp8flow/gemm.h"

namespace fp8flow::detail {

// Every FP8 expert segment is a multiple of this many rows (cuBLASLt's 1x128 operand and the
// 16-byte alignment of X^T column slices in wgrad).
constexpr int64_t kFp8RowAlign = 16;
// N and K of FP8 GEMMs: FP8 leading dimensions must be multiples of 16 bytes.
constexpr int64_t kFp8DimAlign = 16;
// N and K of BF16 GEMMs: leading dimensions multiples of 16 bytes.
constexpr int64_t kBf16DimAlign = 8;
// Workspace each internal stream (lane) hands to cuBLASLt.
constexpr size_t kLaneWorkspaceBytes = size_t{8} << 20;
constexpr int kMaxLanes = 8;
// Sub-buffers inside the workspace start on this boundary.
constexpr size_t kWorkspaceAlign = 256;

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}
inline size_t align_up(size_t a, size_t b) {
  return (a + b - 1) / b * b;
}

// cuBLASLt reads a 128x128 block-scale tensor [blocks_outer][blocks_inner] with the inner (K)
// blocks padded to a multiple of 4 (16 bytes). fp8flow stores them unpadded
// ([ceil(N/128)][ceil(K/128)], types.h), so the CUDA backend repacks when ceil(K/128) % 4 != 0.
inline int64_t padded_k_blocks(int64_t k) {
  return (ceil_div(k, 128) + 3) / 4 * 4;
}

// Layout of the FP8 fprop/dgrad workspace (after the lane workspaces): per expert, the packed
// activation scales [ceil(Kc/128)][M_e]; then, if needed, per expert the padded weight scales.
struct Fp8RowwiseWorkspace {
  size_t lanes_bytes = 0;
  size_t scales_offset = 0;   // packed activation scales start here
  size_t wscales_offset = 0;  // padded weight scales start here (if pad_weights)
  size_t wscales_stride = 0;  // bytes between two experts' padded weight scales
  bool pad_weights = false;
  size_t total = 0;
};
// nout: output columns (weight rows), kc: contraction (weight cols).
Fp8RowwiseWorkspace fp8_rowwise_workspace(int64_t nout, int64_t kc,
                                          std::span<const int64_t> m_splits, int lanes);
// Byte offset of expert e's packed activation scales relative to scales_offset.
size_t packed_scale_offset(int64_t kc, std::span<const int64_t> m_splits, size_t e);

}  // namespace fp8flow::detail

namespace fp8flow::ref {
// fprop and dgrad are the same computation: out [M][Nout] = a [M][Kc] . b_e^T, b_e [Nout][Kc].
void grouped_gemm_rowwise(const ScaledTensor& a, std::span<const ScaledTensor> b,
                          const TensorView& out, std::span<const int64_t> m_splits,
                          bool accumulate);
void grouped_gemm_wgrad(const ScaledTensor& dy_t, const ScaledTensor& x_t,
                        std::span<const TensorView> dw, std::span<const int64_t> m_splits,
                        bool accumulate);
void grouped_gemm_fprop_bf16(const TensorView& x, std::span<const TensorView> w,
                             const TensorView& y, std::span<const int64_t> m_splits,
                             bool accumulate);
void grouped_gemm_dgrad_bf16(const TensorView& dy, std::span<const TensorView> w,
                             const TensorView& dx, std::span<const int64_t> m_splits,
                             bool accumulate);
void grouped_gemm_wgrad_bf16(const TensorView& dy, const TensorView& x,
                             std::span<const TensorView> dw, std::span<const int64_t> m_splits,
                             bool accumulate);
void transpose_block_weights(const ScaledTensor& w, const ScaledTensor& w_t);
}  // namespace fp8flow::ref

namespace fp8flow::sm90 {
void grouped_gemm_rowwise(const char* op, const ScaledTensor& a, std::span<const ScaledTensor> b,
                          const TensorView& out, std::span<const int64_t> m_splits,
                          const Workspace& ws, const GroupedGemmOptions& opt, Stream stream);
void grouped_gemm_wgrad(const ScaledTensor& dy_t, const ScaledTensor& x_t,
                        std::span<const TensorView> dw, std::span<const int64_t> m_splits,
                        const Workspace& ws, const GroupedGemmOptions& opt, Stream stream);
void grouped_gemm_fprop_bf16(const TensorView& x, std::span<const TensorView> w,
                             const TensorView& y, std::span<const int64_t> m_splits,
                             const Workspace& ws, const GroupedGemmOptions& opt, Stream stream);
void grouped_gemm_dgrad_bf16(const TensorView& dy, std::span<const TensorView> w,
                             const TensorView& dx, std::span<const int64_t> m_splits,
                             const Workspace& ws, const GroupedGemmOptions& opt, Stream stream);
void grouped_gemm_wgrad_bf16(const TensorView& dy, const TensorView& x,
                             std::span<const TensorView> dw, std::span<const int64_t> m_splits,
                             const Workspace& ws, const GroupedGemmOptions& opt, Stream stream);
void transpose_block_weights(const ScaledTensor& w, const ScaledTensor& w_t, Stream stream);
// grouped_gemm_last_algos(): the plans of the latest call on the current device.
std::string last_algos();
// Internal (no validation; MoELayer::refresh_weights): `batch` stacked matrices in one launch.
// w: data [batch * N][K], scale [batch * ceil(N/128)][ceil(K/128)]; w_t: data [batch * K][N],
// scale [batch * ceil(K/128)][ceil(N/128)]; matrix b of w_t is the transpose of matrix b of w.
// N % 128 == 0 when batch > 1 (so that each matrix's scale rows are whole); K % 16 == 0.
void transpose_block_weights_batched(const ScaledTensor& w, const ScaledTensor& w_t, int64_t batch,
                                     Stream stream);
}  // namespace fp8flow::sm90
