// placeholder while the kernels are written
#include "common/check.h"
#include "ops/mxfp4/mxfp4_backends.h"
namespace fp8flow::sm90 {
void quantize_mxfp4(const TensorView&, const ScaledTensor&, Stream) {}
void fp8_to_mxfp4(const ScaledTensor&, const ScaledTensor&, Stream) {}
void mxfp4_to_fp8(const ScaledTensor&, const ScaledTensor&, Stream) {}
void mxfp4_to_fp8_transposed(const ScaledTensor&, const ScaledTensor&, Stream) {}
}  // namespace fp8flow::sm90
