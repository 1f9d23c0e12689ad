// CUDA side of the MoE layer's internal helpers: the router-gate GEMMs (logits = x . W_g^T and its
// backward) and the non-finite counter. Deliberately simple (the gate is E <= 256 columns wide):
// one thread per output element, a sequential hd::fma loop in the same order as the CPU reference,
// so logits (and therefore the router's selection) are bit-identical between backends.
// Napkin math (DeepSeek-V3 shard, T 32768, E 256, H 7168): 60 GFMA per gate GEMM, x re-read from
// L2 by the E threads of a token (~1 ms-class at FP32 CUDA-core rate, not tuned; a cuBLASLt call
// would be the fast path, at the price of bitwise CPU agreement). Exercised by fp8flow-bench layer
// (later). Non-finite counter: one read of the tensor, one integer atomic per block.
// NOTES: no float atomics anywhere (deterministic); counters use integer atomicAdd only.
#include <cuda_runtime.h>

#include "common/cuda_check.h"
#include "common/hd_math.h"
#include "moe/moe_backends.h"

namespace fp8flow::sm90 {
namespace {

__device__ __forceinline__ float ld_bf16(const uint16_t* p, int64_t i) {
  return fmt::bf16_to_f32(p[i]);
}

// One thread per (t, e); consecutive threads take consecutive e, so a warp shares a row of x.
__global__ void gate_logits_kernel(const uint16_t* __restrict__ x, const float* __restrict__ wg,
                                   float* __restrict__ out, int64_t T, int64_t H, int64_t E) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= T * E) return;
  const int64_t t = i / E, e = i % E;
  const uint16_t* xr = x + t * H;
  const float* wr = wg + e * H;
  float acc = 0.0f;
  for (int64_t h = 0; h < H; ++h) acc = hd::fma(ld_bf16(xr, h), wr[h], acc);
  out[i] = acc;
}

// One thread per (t, h): dx = bf16(dx_exp + sum_e dl[t][e] * wg[e][h]).
__global__ void gate_dx_kernel(const float* __restrict__ dl, const float* __restrict__ wg,
                               const float* __restrict__ dx_exp, uint16_t* __restrict__ dx,
                               int64_t T, int64_t H, int64_t E) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= T * H) return;
  const int64_t t = i / H, h = i % H;
  float acc = 0.0f;
  for (int64_t e = 0; e < E; ++e) acc = hd::fma(dl[t * E + e], wg[e * H + h], acc);
  dx[i] = fmt::bf16_from_f32(hd::add(dx_exp[i], acc));
}

// One thread per (e, h): dwg = sum_t dl[t][e] * x[t][h], t ascending.
__global__ void gate_dw_kernel(const float* __restrict__ dl, const uint16_t* __restrict__ x,
                               float* __restrict__ dwg, int64_t T, int64_t H, int64_t E) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= E * H) return;
  const int64_t e = i / H, h = i % H;
  float acc = 0.0f;
  for (int64_t t = 0; t < T; ++t) acc = hd::fma(dl[t * E + e], ld_bf16(x, t * H + h), acc);
  dwg[i] = acc;
}

template <typename U, U kMask>
__global__ void nonfinite_kernel(const U* __restrict__ p, int64_t n,
                                 unsigned long long* __restrict__ count) {
  __shared__ unsigned int block_count;
  if (threadIdx.x == 0) block_count = 0;
  __syncthreads();
  unsigned int local = 0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    local += (p[i] & kMask) == kMask;
  if (local) atomicAdd(&block_count, local);
  __syncthreads();
  if (threadIdx.x == 0 && block_count)
    atomicAdd(count, static_cast<unsigned long long>(block_count));
}

__global__ void to_bf16_kernel(const float* __restrict__ in, uint16_t* __restrict__ out,
                               int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = fmt::bf16_from_f32(in[i]);
}

constexpr int kThreads = 256;
unsigned blocks_for(int64_t n) {
  return static_cast<unsigned>((n + kThreads - 1) / kThreads);
}

}  // namespace

void moe_gate_logits(const TensorView& x, const TensorView& wg, const TensorView& logits,
                     Stream stream) {
  const int64_t T = x.rows, H = x.cols, E = wg.rows;
  if (T * E == 0) return;
  gate_logits_kernel<<<blocks_for(T * E), kThreads, 0, stream>>>(
      x.ptr<const uint16_t>(), wg.ptr<const float>(), logits.ptr<float>(), T, H, E);
  FP8FLOW_CUDA_CHECK_LAUNCH("MoELayer::forward (gate)");
}

void moe_gate_backward(const TensorView& dl, const TensorView& wg, const TensorView& x,
                       const TensorView& dx_exp, const TensorView& dx, const TensorView& dwg,
                       Stream stream) {
  const int64_t T = x.rows, H = x.cols, E = wg.rows;
  if (T * H > 0) {
    gate_dx_kernel<<<blocks_for(T * H), kThreads, 0, stream>>>(
        dl.ptr<const float>(), wg.ptr<const float>(), dx_exp.ptr<const float>(), dx.ptr<uint16_t>(),
        T, H, E);
    FP8FLOW_CUDA_CHECK_LAUNCH("MoELayer::backward (gate dx)");
  }
  if (E * H > 0) {
    gate_dw_kernel<<<blocks_for(E * H), kThreads, 0, stream>>>(
        dl.ptr<const float>(), x.ptr<const uint16_t>(), dwg.ptr<float>(), T, H, E);
    FP8FLOW_CUDA_CHECK_LAUNCH("MoELayer::backward (gate dW)");
  }
}

void moe_count_nonfinite(const TensorView& t, int64_t* count, Stream stream) {
  const int64_t n = t.numel();
  if (n == 0) return;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(blocks_for(n), 1024));
  auto* c = reinterpret_cast<unsigned long long*>(count);
  if (t.dtype == DType::BF16)
    nonfinite_kernel<uint16_t, 0x7F80u>
        <<<blocks, kThreads, 0, stream>>>(t.ptr<const uint16_t>(), n, c);
  else
    nonfinite_kernel<uint32_t, 0x7F800000u>
        <<<blocks, kThreads, 0, stream>>>(t.ptr<const uint32_t>(), n, c);
  FP8FLOW_CUDA_CHECK_LAUNCH("MoELayer (non-finite count)");
}

void moe_to_bf16(const TensorView& in, const TensorView& out, Stream stream) {
  const int64_t n = in.numel();
  if (n == 0) return;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(blocks_for(n), 4096));
  to_bf16_kernel<<<blocks, kThreads, 0, stream>>>(in.ptr<const float>(), out.ptr<uint16_t>(), n);
  FP8FLOW_CUDA_CHECK_LAUNCH("MoELayer::refresh_weights (BF16 copy)");
}

}  // namespace fp8flow::sm90
