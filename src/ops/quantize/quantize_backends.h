// Internal: the two backends of the quantize ops. Arguments are validated by quantize.cpp.
#pragma once

#include "fp8flow/quantize.h"

namespace fp8flow::ref {
void quantize(const TensorView& in, const ScaledTensor& out);
void quantize_transposed(const TensorView& in, const ScaledTensor& out_t);
void dequantize(const ScaledTensor& in, const TensorView& out);
}  // namespace fp8flow::ref

namespace fp8flow::sm90 {
void quantize(const TensorView& in, const ScaledTensor& out, Stream stream);
void quantize_transposed(const TensorView& in, const ScaledTensor& out_t, Stream stream);
void quantize_both(const TensorView& in, const ScaledTensor& out, const ScaledTensor& out_t,
                   Stream stream);
void dequantize(const ScaledTensor& in, const TensorView& out, Stream stream);
}  // namespace fp8flow::sm90
