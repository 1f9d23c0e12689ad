// STUB: sm_90a backend of the quantize ops (to be written).
#include "common/check.h"
#include "ops/quantize/quantize_backends.h"

namespace fp8flow::sm90 {
namespace {
[[noreturn]] void todo(const char* op) {
  detail::throw_error(ErrorKind::Unsupported, detail::cat("fp8flow::", op, ": CUDA backend not implemented yet"));
}
}  // namespace
void quantize(const TensorView&, const ScaledTensor&, Stream) { todo("quantize"); }
void quantize_transposed(const TensorView&, const ScaledTensor&, Stream) { todo("quantize_transposed"); }
void quantize_both(const TensorView&, const ScaledTensor&, const ScaledTensor&, Stream) { todo("quantize_both"); }
void dequantize(const ScaledTensor&, const TensorView&, Stream) { todo("dequantize"); }
}  // namespace fp8flow::sm90
