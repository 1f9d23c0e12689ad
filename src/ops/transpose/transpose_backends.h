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
// Backend-internal, for tests and A/B timing in one process: 1 runs ColumnTight (without the
// count) through its kHoist kernel instance from now on, 0 through the other, -1 goes back to
// FP8FLOW_TR_TIGHT_HOIST (default 0). Same bits either way. Not thread-safe against running ops;
// CUDA builds only (defined in transpose_sm90.cu).
void transpose_set_tight_hoist(int hoist);
}  // namespace fp8flow::sm90
