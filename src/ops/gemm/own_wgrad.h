// FP8 block-scaled grouped weight-gradient GEMM of our own (sm_90a): the wgrad form of
// grouped_gemm_wgrad (dW_e [N][K] = dY_e^T . X_e over the expert's tokens, both operands the
// column-wise copies with 128x1 scales along tokens, tiles restarting per expert), F32 out, in one
// persistent launch for all experts. Off by default: FP8FLOW_OWN_WGRAD=1 makes grouped_gemm_wgrad
// use it where it applies (it is correct, but on an H100 0.75-0.98x cuBLASLt's per-expert calls,
// bench/RESULTS.md session 9). GemmGpu.OwnWgradMatchesReference (tests/gemm/gemm_test.cpp)
// checks it against the CPU reference.
#pragma once

#include <cstdint>
#include <span>

#include "fp8flow/types.h"

namespace fp8flow::sm90::own {

// Whether the operands fit the kernel: E4M3 dy_t and x_t (Rowwise1x128, data [N][M] / [K][M],
// scales dense [tiles][N] / [tiles][K]), N and K multiples of 128, every dw[e] F32 [N][K] with one
// common even ld and 8-byte aligned, at most 64 non-empty experts.
bool own_wgrad_supported(const ScaledTensor& dy_t, const ScaledTensor& x_t,
                         std::span<const TensorView> dw, std::span<const int64_t> m_splits);
// dw[e] (+)= dy_t_e^T . x_t_e per expert segment (m_splits), on `stream`; empty experts get zeros
// (left unchanged with accumulate). Throws fp8flow::Error (Unsupported) outside
// own_wgrad_supported. ctas > 0: at most that many persistent CTAs (0: one per SM).
// Deterministic: each dW element is summed by one CTA in K-block order.
void own_grouped_wgrad(const ScaledTensor& dy_t, const ScaledTensor& x_t,
                       std::span<const TensorView> dw, std::span<const int64_t> m_splits,
                       bool accumulate, Stream stream, int ctas = 0);

}  // namespace fp8flow::sm90::own
