// Internal: the two backends of the MXFP4 ops. Arguments are validated by mxfp4.cpp.
#pragma once

#include "fp8flow/mxfp4.h"

namespace fp8flow::ref {
void quantize_mxfp4(const TensorView& in, const ScaledTensor& out);
void fp8_to_mxfp4(const ScaledTensor& in, const ScaledTensor& out, const Mxfp4Rounding& rounding);
void mxfp4_to_fp8(const ScaledTensor& in, const ScaledTensor& out);
void mxfp4_to_fp8_transposed(const ScaledTensor& in, const ScaledTensor& out_t);
}  // namespace fp8flow::ref

namespace fp8flow::sm90 {
void quantize_mxfp4(const TensorView& in, const ScaledTensor& out, Stream stream);
void fp8_to_mxfp4(const ScaledTensor& in, const ScaledTensor& out, const Mxfp4Rounding& rounding,
                  Stream stream);
void mxfp4_to_fp8(const ScaledTensor& in, const ScaledTensor& out, Stream stream);
void mxfp4_to_fp8_transposed(const ScaledTensor& in, const ScaledTensor& out_t, Stream stream);
}  // namespace fp8flow::sm90
