// Internal: the two backends of the SwiGLU ops. Arguments are validated by swiglu.cpp; `prob` and
// `dprob` are empty views when `weighted` is false (then p = 1 and dprob is not written).
// `in_q` / a ScaledTensor `in`: the E4M3 Rowwise1x128 copy of the BF16 input (swiglu.h).
#pragma once

#include "fp8flow/swiglu.h"

namespace fp8flow::ref {
void swiglu(const TensorView& in, const TensorView& prob, const ScaledTensor& out, bool weighted);
void swiglu(const TensorView& in, const TensorView& prob, const TensorView& out, bool weighted);
void swiglu_backward(const TensorView& dy, const TensorView& in, const TensorView& prob,
                     const ScaledTensor& din, const TensorView& dprob, bool weighted);
void swiglu_backward(const TensorView& dy, const TensorView& in, const TensorView& prob,
                     const TensorView& din, const TensorView& dprob, bool weighted);
void swiglu(const TensorView& in, const TensorView& prob, const ScaledTensor& out,
            const ScaledTensor& in_q, bool weighted);
void swiglu_backward(const TensorView& dy, const ScaledTensor& in, const TensorView& prob,
                     const ScaledTensor& din, const TensorView& dprob, bool weighted);
}  // namespace fp8flow::ref

namespace fp8flow::sm90 {
void swiglu(const TensorView& in, const TensorView& prob, const ScaledTensor& out, bool weighted,
            Stream stream);
void swiglu(const TensorView& in, const TensorView& prob, const TensorView& out, bool weighted,
            Stream stream);
void swiglu_backward(const TensorView& dy, const TensorView& in, const TensorView& prob,
                     const ScaledTensor& din, const TensorView& dprob, bool weighted,
                     Stream stream);
void swiglu_backward(const TensorView& dy, const TensorView& in, const TensorView& prob,
                     const TensorView& din, const TensorView& dprob, bool weighted, Stream stream);
void swiglu(const TensorView& in, const TensorView& prob, const ScaledTensor& out,
            const ScaledTensor& in_q, bool weighted, Stream stream);
void swiglu_backward(const TensorView& dy, const ScaledTensor& in, const TensorView& prob,
                     const ScaledTensor& din, const TensorView& dprob, bool weighted,
                     Stream stream);
}  // namespace fp8flow::sm90

namespace fp8flow::sm90 {
// Test hook (synchronizes): over all 2^32 FP32 bit patterns x that are finite, counts those where
// the kernels' hardware conversion of x to `dtype` (E4M3, E5M2 or BF16; kernels/hw_cvt.cuh), as
// low or as high half of a pair, differs from fmt::. `example` receives one such x (or 0).
int64_t swiglu_hw_cvt_mismatches(DType dtype, uint32_t* example);
}  // namespace fp8flow::sm90

namespace fp8flow::sm90 {
// Test hook (synchronizes): over all 2^32 FP32 bit patterns x, counts those where the kernels'
// branch-free swiglu_detail::exp / sigmoid / silu give other bits than hd::exp / sigmoid / silu
// on the device. `example` receives one such x (or 0).
int64_t swiglu_silu_mismatches(uint32_t* example);
}  // namespace fp8flow::sm90

namespace fp8flow::sm90 {
// Test hook (synchronizes): counts the FP32 bit patterns where the backward kernel's fast sigmoid
// differs from hd::sigmoid on the device: every x >= hd::kSigmoidFastMinX (hd::sigmoid_fast), and
// every d in [1, 2^126) (hd::rcp_in_range against rcp.rn.f32 and against div.rn.f32 1 / d).
// `example` receives one such pattern (or 0).
int64_t swiglu_sigmoid_fast_mismatches(uint32_t* example);
}  // namespace fp8flow::sm90

namespace fp8flow::sm90 {
// Test hook: the swiglu_backward kernel variant every later call launches (0 the session-12 kernel
// of FP8FLOW_SWIGLU_BWD_NEXT=0, 1 the default; both give the same bits), overriding the
// environment switches of swiglu_sm90.cu; -1 returns to them. Not thread-safe against running ops.
void swiglu_set_backward_variant(int variant);
}  // namespace fp8flow::sm90
