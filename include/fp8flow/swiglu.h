// Weighted SwiGLU, fused with the quantization of its output (forward) and of its input gradient
// (backward): the MoE expert's activation between FC1 and FC2. FP32 math, one kernel per call, one
// read of every input. Deterministic, and the CUDA backend equals the CPU reference bit for bit.
//
// Shapes: M rows (tokens, including padding rows), F expert FFN width, F % 128 == 0.
//   in    BF16 [M][2F]  the FC1 output: columns [0, F) are the gate a, [F, 2F) the up projection b
//   prob  F32  [M]      per-row routing weight p, as a [M][1] or [1][M] view (0 on padding rows)
//
// Forward, per element j < F of row m, in FP32 with round-to-nearest-even after every operation:
//   y = (silu(a) * b) * p,   silu(a) = a * sigmoid(a),   sigmoid(a) = 1 / (1 + exp(-a))
// (exp, sigmoid, silu are fp8flow's reproducible host/device functions, src/common/hd_math.h).
//
// Backward, with dy = dL/dy BF16 [M][F] (the FC2 dgrad output), same conventions:
//   s = sigmoid(a);  silu = a * s;  dsilu = s * (1 + a * (1 - s))
//   dya = dy * p;  da = (dya * b) * dsilu;  db = dya * silu
//   dprob[m] = sum_j (dy * silu) * b, summed in this fixed order: 32 partial sums, partial l
//     (l = 0..31) adds the 8-column chunks l, l + 32, l + 64, ... (columns 8c .. 8c + 7 of chunk c)
//     in increasing column order starting from +0; then the partials are added pairwise as a
//     butterfly: for d = 16, 8, 4, 2, 1: partial[l] = partial[l] + partial[l + d] for l < d.
//
// Quantized outputs (FP8, ScaleLayout::Rowwise1x128) use the library's scale rule per 1x128 tile:
// s = 2^ceil(log2(amax / fmt_max)) with amax over the tile's FINITE results, code = RNE(y * 2^-e)
// saturating; an all-zero tile (padding rows) gets s = 2^-127. Non-finite results: NaN encodes as
// the canonical NaN (E4M3 0x7F, E5M2 0x7F, BF16 0x7FC0, F32 0x7FC00000, whatever NaN the arithmetic
// produced), +-Inf as the format's Inf/NaN with its sign (E4M3: 0x7F/0xFF; E5M2: 0x7C/0xFC; BF16:
// Inf). One NaN/Inf element never changes its tile's scale, and no scale is ever NaN or Inf.
// Padding rows (all-zero input, p = 0) give all-zero outputs, scale 2^-127 and dprob = 0.
//
// Unweighted SwiGLU (y = silu(a) * b): set SwigluOptions::weighted = false and pass empty views
// ({}) for prob and dprob. Its results are those of the weighted op with p = 1 (bit for bit).
//
// Saved FP8 input (the fp8-flow recipes' SwiGLU input cached for backward, as DeepSeek-V3 caches
// it, report sec. 3.3): the forward overload with `in_q` also writes the FP8 copy of its BF16
// input, in_q.data E4M3 [M][2F], in_q.layout Rowwise1x128, in_q.scale F32 [2F/128][M] (M
// contiguous), in_q.col_groups empty, bit for bit what quantize(in, in_q) writes (same scale rule;
// NaN/Inf inputs encode as sign | 0x7F, as quantize encodes them), from the same read of `in`. Its
// 1x128 tiles are the gate tiles [0, F) and the up tiles [F, 2F). The backward overload taking a
// ScaledTensor `in` uses that copy instead of the BF16 input: a = code * scale and b likewise,
// decoded exactly as dequantize() decodes them (one FP32 multiply), then the same math as above.
// So the forward sees the exact BF16 h and the backward its E4M3 rounding (relative error up to
// 2^-4 per element in E4M3's normal range, absolute error up to 2^-10 * scale below it).
//
// Tensors must be contiguous, must not overlap each other, and (Cuda) be 16-byte aligned.
// Devices: all Cpu (reference backend) or all Cuda (sm_90a backend, asynchronous on `stream`).
#pragma once

#include "fp8flow/types.h"

namespace fp8flow {

struct SwigluOptions {
  // true: multiply by the per-row probability (prob, and dprob in backward, required).
  // false: p = 1; prob and dprob must be empty views ({}), dprob is not computed.
  bool weighted = true;
};

// Forward, FP8 out (fp8-flow recipe): out.data E4M3 or E5M2 [M][F], out.layout Rowwise1x128,
// out.scale F32 [F/128][M] (M contiguous), out.col_groups empty.
void swiglu(const TensorView& in, const TensorView& prob, const ScaledTensor& out,
            const SwigluOptions& = {}, Stream stream = nullptr);

// Forward, BF16 out (bf16 / fp8-blockwise recipes): out BF16 [M][F], y rounded to nearest even.
void swiglu(const TensorView& in, const TensorView& prob, const TensorView& out,
            const SwigluOptions& = {}, Stream stream = nullptr);

// Forward, FP8 out, also writing in_q, the E4M3 1x128 copy of `in` (see above; E4M3 only).
// out as in the overload above. One kernel, one read of `in`.
void swiglu(const TensorView& in, const TensorView& prob, const ScaledTensor& out,
            const ScaledTensor& in_q, const SwigluOptions& = {}, Stream stream = nullptr);

// Backward, FP8 out: din.data E4M3 or E5M2 [M][2F] holding da in columns [0, F) and db in
// [F, 2F), din.layout Rowwise1x128, din.scale F32 [2F/128][M]; dprob F32 [M] ([M][1] or [1][M]).
void swiglu_backward(const TensorView& dy, const TensorView& in, const TensorView& prob,
                     const ScaledTensor& din, const TensorView& dprob, const SwigluOptions& = {},
                     Stream stream = nullptr);

// Backward, BF16 out: din BF16 [M][2F] (da | db, each rounded to nearest even); dprob as above.
void swiglu_backward(const TensorView& dy, const TensorView& in, const TensorView& prob,
                     const TensorView& din, const TensorView& dprob, const SwigluOptions& = {},
                     Stream stream = nullptr);

// Backward from the saved FP8 input: in E4M3 [M][2F] Rowwise1x128 as written by the forward's
// in_q (scale F32 [2F/128][M], col_groups empty); dy, prob, din, dprob as in the FP8-out overload.
void swiglu_backward(const TensorView& dy, const ScaledTensor& in, const TensorView& prob,
                     const ScaledTensor& din, const TensorView& dprob, const SwigluOptions& = {},
                     Stream stream = nullptr);

}  // namespace fp8flow
