// STUB (being written): MXFP4 conversions.
#include "fp8flow/mxfp4.h"

#include "common/check.h"

namespace fp8flow {
namespace {
[[noreturn]] void todo(const char* op) {
  detail::throw_error(ErrorKind::Unsupported, detail::cat("fp8flow::", op, ": not implemented yet"));
}
}  // namespace
void quantize_mxfp4(const TensorView&, const ScaledTensor&, Stream) { todo("quantize_mxfp4"); }
void fp8_to_mxfp4(const ScaledTensor&, const ScaledTensor&, Stream) { todo("fp8_to_mxfp4"); }
void mxfp4_to_fp8(const ScaledTensor&, const ScaledTensor&, Stream) { todo("mxfp4_to_fp8"); }
void mxfp4_to_fp8_transposed(const ScaledTensor&, const ScaledTensor&, Stream) {
  todo("mxfp4_to_fp8_transposed");
}
}  // namespace fp8flow
