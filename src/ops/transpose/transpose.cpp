// STUB (being written): scaling-aware transpose.
#include "fp8flow/transpose.h"

#include "common/check.h"

namespace fp8flow {
void transpose_scaled(const ScaledTensor&, const ScaledTensor&, const TransposeOptions&, Stream) {
  detail::throw_error(ErrorKind::Unsupported, "fp8flow::transpose_scaled: not implemented yet");
}
}  // namespace fp8flow
