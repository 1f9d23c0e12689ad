// Experimental FP8 block-scaled grouped GEMM of our own (sm_90a): the fprop / dgrad form of
// grouped_gemm_fprop (X 1x128 . W_e 128x128, BF16 out) in one launch for all experts. Off by
// default; the environment variable FP8FLOW_OWN_GEMM=1 makes grouped_gemm_fprop/dgrad use it where
// it applies (so the layer and fp8flow-bench can A/B it). GemmGpu.OwnFpropMatchesReference
// (tests/gemm/gemm_test.cpp) checks it against the CPU reference and cuBLASLt; bench/RESULTS.md
// (session 8) has its speed against cuBLASLt (0.78-0.84x on an H100) and what was tried.
#pragma once

#include <cstdint>
#include <span>

#include "fp8flow/types.h"

namespace fp8flow::sm90::own {

// Whether the operands fit the kernel: E4M3, N and K multiples of 128, the E weight views (and
// their scales) one contiguous tensor, y BF16 with ld % 8 == 0, E <= 256, dense X and dense scales.
bool own_fprop_supported(const ScaledTensor& x, std::span<const ScaledTensor> w,
                         const TensorView& y);
// y = x . w_e^T per expert segment (m_splits), on `stream`. Throws fp8flow::Error (Unsupported)
// outside own_fprop_supported. ctas > 0: at most that many CTAs, each looping over tiles
// (persistent); 0: one CTA per 128 x 128 tile, or one per SM if FP8FLOW_OWN_GEMM_PERSISTENT=1.
void own_grouped_fprop(const ScaledTensor& x, std::span<const ScaledTensor> w, const TensorView& y,
                       std::span<const int64_t> m_splits, Stream stream, int ctas = 0);

}  // namespace fp8flow::sm90::own
