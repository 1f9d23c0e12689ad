// Internal helpers of the MoE layer that are not public ops: memory (pool allocation, host copies)
// and the small router-gate GEMMs, on the CPU (moe_ref.cpp) and on CUDA (moe_sm90.cu).
#pragma once

#include <cstddef>
#include <cstdint>

#include "fp8flow/types.h"

namespace fp8flow::detail {

// Pool memory on `dev` (Cpu: host heap; Cuda: cudaMalloc), 256-byte aligned. Zero-filled.
void* moe_alloc(Device dev, size_t bytes, Stream stream);
void moe_free(Device dev, void* p);
// Device (or host) -> host copy of `bytes`; on Cuda enqueued on `stream`, which is then
// synchronized unless sync == false (then dst is valid after a later synchronizing copy).
void moe_copy_to_host(Device dev, void* dst, const void* src, size_t bytes, Stream stream,
                      bool sync = true);
// Host -> pool memory.
void moe_copy_from_host(Device dev, void* dst, const void* src, size_t bytes, Stream stream);
void moe_memset0(Device dev, void* p, size_t bytes, Stream stream);

// A second stream of the layer (Cuda): side work forked from the caller's stream and joined back
// into it with events (legal inside CUDA graph capture). All no-ops on the Cpu (empty handles).
struct SideStream {
  Stream stream = nullptr;
  void* fork = nullptr;  // cudaEvent_t
  void* join = nullptr;  // cudaEvent_t
};
SideStream moe_side_create(Device dev);
void moe_side_destroy(SideStream& s);
// s.stream waits for the work issued to `from` so far.
void moe_side_fork(const SideStream& s, Stream from);
// `into` waits for the work issued to s.stream so far.
void moe_side_join(const SideStream& s, Stream into);

}  // namespace fp8flow::detail

// Gate GEMMs. All FP32 with hd::fma in a fixed sequential order (from +0), so both backends give
// the same bits (the router's top-k selection then agrees too).
//   logits[t][e] = sum_h x[t][h] * wg[e][h]                       x BF16 [T][H], wg F32 [E][H]
//   dx[t][h]     = bf16(dx_exp[t][h] + sum_e dl[t][e] * wg[e][h])  dx_exp F32, dx BF16 [T][H]
//   dwg[e][h]    = sum_t dl[t][e] * x[t][h]                        dwg F32 [E][H]
// count_nonfinite: *count += number of NaN/Inf elements of t (BF16 or F32, contiguous; on Cuda
// 16-byte aligned); count is an int64 on t's device.
namespace fp8flow::ref {
void moe_gate_logits(const TensorView& x, const TensorView& wg, const TensorView& logits);
void moe_gate_backward(const TensorView& dl, const TensorView& wg, const TensorView& x,
                       const TensorView& dx_exp, const TensorView& dx, const TensorView& dwg);
void moe_count_nonfinite(const TensorView& t, int64_t* count);
// F32 -> BF16 (RNE, fmt::bf16_from_f32), contiguous, same numel: BF16 copies of F32 masters.
void moe_to_bf16(const TensorView& in, const TensorView& out);
}  // namespace fp8flow::ref

// Declared in every build; defined only with CUDA (calls go through FP8FLOW_SM90).
namespace fp8flow::sm90 {
void moe_gate_logits(const TensorView& x, const TensorView& wg, const TensorView& logits,
                     Stream stream);
void moe_gate_backward(const TensorView& dl, const TensorView& wg, const TensorView& x,
                       const TensorView& dx_exp, const TensorView& dx, const TensorView& dwg,
                       Stream stream);
void moe_count_nonfinite(const TensorView& t, int64_t* count, Stream stream);
void moe_to_bf16(const TensorView& in, const TensorView& out, Stream stream);
}  // namespace fp8flow::sm90
