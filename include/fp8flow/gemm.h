// Grouped GEMMs of the MoE expert FFNs: one GEMM per expert over that expert's segment of rows
// (tokens), FP8 block-scaled (DeepSeek-V3 recipe: 1x128 activations/gradients, 128x128 weights,
// FP32 accumulation) and plain BF16 for the baseline recipe; forward (fprop), input gradient
// (dgrad) and weight gradient (wgrad). The CUDA backend runs cuBLASLt per expert (block-scaled
// FP8: CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F / BLK128x128_32F), spread over several streams;
// the CPU backend is the FP64 reference.
//
// Shapes (MoE convention, see notes): E experts, expert e owns rows [m0_e, m0_e + M_e) of the
// permuted activations, m0_e = M_0 + ... + M_{e-1}, sum M_e = M; M_e = 0 is allowed (skipped).
// Weights W_e are [N][K] for every expert (FC1: N = 2F, K = H; FC2: N = H, K = F).
//   fprop: Y [M][N]   = X [M][K]  . W_e^T     per expert segment
//   dgrad: dX [M][K]  = dY [M][N] . W_e       per expert segment
//   wgrad: dW_e [N][K] = dY_e^T . X_e         contracted over the expert's M_e tokens
//
// Determinism: each expert's GEMM runs one cuBLASLt algorithm chosen once per problem shape and
// cached (same shape -> same algorithm -> same bits, run to run and whatever the other experts'
// sizes), with split-K / in-place reductions excluded (CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK =
// NONE). Experts write disjoint outputs, so the stream they run on does not change any bit. The CPU
// reference is deterministic. GPU and CPU results agree to FP32-accumulation accuracy, not bitwise.
//
// Streams and graphs: work is ordered on `stream`; inside a call, experts are spread over
// `options.streams` internal streams forked from and joined back into `stream` with events, which
// is legal inside CUDA graph capture. Make one call of each shape before capturing (the first call
// creates the internal streams and cuBLASLt plans). Calls are thread-safe (serialized on the host;
// see GroupedGemmOptions::threaded_enqueue for the library's own enqueue threads).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

#include "fp8flow/types.h"

namespace fp8flow {

struct GroupedGemmOptions {
  // out = out + result instead of out = result (cuBLASLt beta = 1). F32 outputs only: the
  // weight-gradient accumulation of micro-batches into an FP32 main grad.
  bool accumulate = false;
  // Internal CUDA streams the experts are spread over (1..8). 1 runs everything on `stream`.
  int streams = 4;
  // The internal streams a call uses are [first_stream, first_stream + streams) of the 8 per
  // device (first_stream + streams <= 8; ignored when streams == 1). Two calls that may run at the
  // same time (issued on different caller streams) must use disjoint ranges and separate
  // workspaces; calls on one caller stream may share both.
  int first_stream = 0;
  // With streams > 1 and at least 2 non-empty experts per stream, the per-expert cuBLASLt calls
  // are issued by one host thread per internal stream instead of the caller alone (cuBLASLt costs
  // ~11-17 us of host time per call, which bounds steps with many small experts). Same kernels in
  // the same streams: results are bit-identical either way. Not inside CUDA graph capture (the
  // caller issues everything there). The environment variable FP8FLOW_GEMM_THREADS=0 turns it off
  // for every call.
  bool threaded_enqueue = true;
  // Which cuBLASLt algorithm each expert's GEMM runs: an index into cuBLASLt's heuristic list for
  // the expert's problem (cublasLtMatmulAlgoGetHeuristic, up to 16 results, split-K / reductions
  // excluded as above; results the heuristic marks unusable are skipped before indexing). 0 (the
  // default) is today's choice, the heuristic's first. An index past the list throws fp8flow::Error
  // (InvalidArgument) naming options.algo and how many results there are; negative throws too.
  // A fixed index is deterministic for a given cuBLASLt version, problem shape and pointer
  // alignment (same bits run to run); different indices may differ in the last bits (different
  // tiles, K order or stage split). Plans are cached per (problem, algo). For tuning and
  // benchmarks (fp8flow-bench ops --gemm-algos N); the index means nothing across library versions.
  // The CPU reference ignores it (beyond rejecting a negative value).
  int algo = 0;
};

// Device scratch memory the caller provides for a Cuda call: 256-byte aligned, at least
// grouped_gemm_workspace_bytes(...) bytes, not touched by other work until the call's stream work
// is done. Ignored by the CPU backend (may be empty there).
struct Workspace {
  void* data = nullptr;
  size_t bytes = 0;
};

enum class GroupedGemmKind : uint8_t {
  Fp8Fprop,
  Fp8Dgrad,
  Fp8Wgrad,
  Bf16Fprop,
  Bf16Dgrad,
  Bf16Wgrad
};
const char* to_string(GroupedGemmKind);

// Workspace bytes a Cuda call of `kind` needs, for weights [n][k] and these m_splits. A pure host
// function of its arguments (use the same options as the call).
size_t grouped_gemm_workspace_bytes(GroupedGemmKind kind, int64_t n, int64_t k,
                                    std::span<const int64_t> m_splits,
                                    const GroupedGemmOptions& options = {});

// ---------------------------------------------------------------------------------------------
// FP8 block-scaled. Operands are E4M3 or E5M2 (not both E5M2); FP32 accumulation; out is BF16 or
// F32 (row-major, ld allowed). Alignment (CUDA and CPU alike, so both backends accept the same
// calls): N % 16 == 0, K % 16 == 0, every M_e % 16 == 0 (cuBLASLt's 1x128 operand needs M_e % 8;
// wgrad's column slices of dY^T / X^T need 16-byte aligned starts); data and scale pointers 16-byte
// aligned and data row pitches multiples of 16 bytes. N and K need not be multiples of 128
// (partial scale blocks). Scales are FP32 multipliers (value = code * scale), powers of two in
// fp8flow but any positive value works. Hopper's FP8 GEMMs are TN only: see dgrad and wgrad.

// x: Rowwise1x128, data [M][K], scale [ceil(K/128)][M] (no col_groups).
// w: E views, Block128x128, data [N][K], scale [ceil(N/128)][ceil(K/128)].
// y: [M][N].
void grouped_gemm_fprop(const ScaledTensor& x, std::span<const ScaledTensor> w, const TensorView& y,
                        std::span<const int64_t> m_splits, const Workspace& workspace,
                        const GroupedGemmOptions& options = {}, Stream stream = nullptr);

// dy: Rowwise1x128, data [M][N], scale [ceil(N/128)][M].
// w_t: E views of W_e^T, Block128x128, data [K][N], scale [ceil(K/128)][ceil(N/128)]; make them
//   with transpose_block_weights (Hopper's FP8 tensor-core GEMMs are TN only, so cuBLASLt cannot
//   read W_e [N][K] transposed).
// dx: [M][K].
void grouped_gemm_dgrad(const ScaledTensor& dy, std::span<const ScaledTensor> w_t,
                        const TensorView& dx, std::span<const int64_t> m_splits,
                        const Workspace& workspace, const GroupedGemmOptions& options = {},
                        Stream stream = nullptr);

// The column-wise (128x1 along tokens) copies, stored transposed, tiles restarting per expert:
// dy_t: Rowwise1x128, data [N][M], scale [tiles][N], col_groups == m_splits.
// x_t:  Rowwise1x128, data [K][M], scale [tiles][K], col_groups == m_splits.
// dw: E views [N][K] (BF16 or F32; accumulate needs F32). An expert with M_e == 0 gets dW_e = 0
//   (left unchanged with accumulate).
void grouped_gemm_wgrad(const ScaledTensor& dy_t, const ScaledTensor& x_t,
                        std::span<const TensorView> dw, std::span<const int64_t> m_splits,
                        const Workspace& workspace, const GroupedGemmOptions& options = {},
                        Stream stream = nullptr);

// ---------------------------------------------------------------------------------------------
// BF16 (baseline recipe): BF16 operands, FP32 accumulation, BF16 or F32 out. Alignment: N % 8 == 0,
// K % 8 == 0, data pointers 16-byte aligned, row pitches multiples of 16 bytes; M_e any.
// fprop: x [M][K], w: E views [N][K], y [M][N].
void grouped_gemm_fprop_bf16(const TensorView& x, std::span<const TensorView> w,
                             const TensorView& y, std::span<const int64_t> m_splits,
                             const Workspace& workspace, const GroupedGemmOptions& options = {},
                             Stream stream = nullptr);
// dgrad: dy [M][N], w: E views [N][K] (used as is), dx [M][K].
void grouped_gemm_dgrad_bf16(const TensorView& dy, std::span<const TensorView> w,
                             const TensorView& dx, std::span<const int64_t> m_splits,
                             const Workspace& workspace, const GroupedGemmOptions& options = {},
                             Stream stream = nullptr);
// wgrad: dy [M][N], x [M][K] (row-major, no transposed copies), dw: E views [N][K].
void grouped_gemm_wgrad_bf16(const TensorView& dy, const TensorView& x,
                             std::span<const TensorView> dw, std::span<const int64_t> m_splits,
                             const Workspace& workspace, const GroupedGemmOptions& options = {},
                             Stream stream = nullptr);

// Diagnostics: the cuBLASLt algorithms the latest Cuda grouped GEMM call on the current device ran
// (one entry per distinct plan, "m=.. n=.. k=.. algo#i id=.. tile=.. stages=.. splitk=.. ..."; the
// tile/stages/cluster numbers are cublasLtMatmulTile_t / cublasLtMatmulStages_t /
// cublasLtClusterShape_t values). Empty before any call and in CPU-only builds.
std::string grouped_gemm_last_algos();

// ---------------------------------------------------------------------------------------------
// W [N][K] -> W^T [K][N], both Block128x128 FP8 (E4M3 or E5M2, same dtype). Exact: every 128x128
// block moves whole and keeps its scale (w_t.scale[j][i] = w.scale[i][j]); the codes are a byte
// transpose. N % 16 == 0, K % 16 == 0, contiguous data. Deterministic, bit-identical backends.
void transpose_block_weights(const ScaledTensor& w, const ScaledTensor& w_t,
                             Stream stream = nullptr);

}  // namespace fp8flow
