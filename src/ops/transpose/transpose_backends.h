// Internal: the two backends of transpose_scaled. Arguments are validated by transpose.cpp; the
// underflow counter is a host pointer for ref:: and a device pointer for sm90:: (nullptr: none).
#pragma once

#include "fp8flow/transpose.h"

namespace fp8flow::ref {
void transpose_scaled(const ScaledTensor& in, const ScaledTensor& out_t,
                      TransposeScalePolicy policy, int64_t* underflow_count);
}  // namespace fp8flow::ref

namespace fp8flow::sm90 {
void transpose_scaled(const ScaledTensor& in, const ScaledTensor& out_t,
                      TransposeScalePolicy policy, int64_t* underflow_count, Stream stream);
}  // namespace fp8flow::sm90
