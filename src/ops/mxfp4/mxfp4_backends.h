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
// Backend-internal, for tests and A/B timing in one process: which kernel mxfp4_to_fp8_transposed
// launches from now on (0 .. mxfp4_transposed_variant_count() - 1, listed in mxfp4_sm90.cu: 0 the
// default, lean with the gap-key fast path; 1 the kernel before it); -1: back to what
// FP8FLOW_MX_TR_VARIANT chose (the default: 0). Same bits either way. Not thread-safe against
// running ops; CUDA builds only (defined in mxfp4_sm90.cu).
void set_mxfp4_transposed_variant(int variant);
int mxfp4_transposed_variant_count();
}  // namespace fp8flow::sm90
