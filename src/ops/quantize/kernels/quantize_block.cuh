// sm90_quantize_block128: X [M][K] (F32/BF16) -> FP8 with one power-of-two scale per 128x128 block
// (weights). One CTA of 256 threads per block: pass 1 reads the block and reduces its finite amax
// (warp shuffles, then 8 warp results in shared memory); pass 2 re-reads it (L2-hot) and encodes
// with the reference encoder.
//
// Napkin math: weights are small (7168 x 4096 BF16 = 59 MB read twice, 29 MB written): ~30 us at
// copy speed; not a hot path, written for obvious correctness.
// Bench: fp8flow-bench ops --op quantize --layout block128x128.
#pragma once

#include <cstdint>

#include "fp8flow/formats.h"
#include "ops/quantize/kernels/fp8_device.cuh"

namespace fp8flow::sm90 {

constexpr int kBlockQuantThreads = 256;

template <typename In, bool kE5M2>
__global__ void __launch_bounds__(kBlockQuantThreads)
    sm90_quantize_block128_kernel(const In* __restrict__ in, int32_t M, int32_t K, int32_t tiles_k,
                                  uint8_t* __restrict__ out, float* __restrict__ scale) {
  using V = dev::InVec<In>;
  using F = dev::Fp8<kE5M2>;
  constexpr int kVec = V::kVec;
  constexpr int kTpr = 128 / kVec;  // threads per row of the block
  constexpr int kRowsPerPass = kBlockQuantThreads / kTpr;

  __shared__ float warp_max[kBlockQuantThreads / 32];

  const int32_t mt = static_cast<int32_t>(blockIdx.x / static_cast<uint32_t>(tiles_k));
  const int32_t kt = static_cast<int32_t>(blockIdx.x - static_cast<uint32_t>(mt) * tiles_k);
  const int32_t r0 = mt * 128, k0 = kt * 128;
  const int32_t rows = M - r0 < 128 ? M - r0 : 128;
  const int cc = threadIdx.x % kTpr;
  const int rr = threadIdx.x / kTpr;
  const int32_t ch0 = k0 + cc * kVec;
  const bool ch_ok = ch0 < K;

  float amax = 0.f;
  for (int r = rr; r < rows; r += kRowsPerPass) {
    if (!ch_ok) break;
    const uint4 v = *reinterpret_cast<const uint4*>(in + (static_cast<int64_t>(r0) + r) * K + ch0);
#pragma unroll
    for (int i = 0; i < kVec; ++i) amax = fmaxf(amax, dev::finite_abs(V::get(v, i)));
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1)
    amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, off));
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = amax;
  __syncthreads();
  amax = warp_max[0];
#pragma unroll
  for (int i = 1; i < kBlockQuantThreads / 32; ++i) amax = fmaxf(amax, warp_max[i]);
  const int e = fmt::scale_exponent(amax, F::kMaxExp);
  if (threadIdx.x == 0) scale[static_cast<int64_t>(mt) * tiles_k + kt] = fmt::exp2i(e);

  for (int r = rr; r < rows; r += kRowsPerPass) {
    if (!ch_ok) break;
    const int64_t off = (static_cast<int64_t>(r0) + r) * K + ch0;
    const uint4 v = *reinterpret_cast<const uint4*>(in + off);
    uint32_t q[kVec / 4];
#pragma unroll
    for (int i = 0; i < kVec / 4; ++i)
      q[i] = F::encode4_ref(V::get(v, 4 * i), V::get(v, 4 * i + 1), V::get(v, 4 * i + 2),
                            V::get(v, 4 * i + 3), e);
    if constexpr (kVec == 8)
      dev::store8(out + off, make_uint2(q[0], q[1]));
    else
      dev::store4(out + off, q[0]);
  }
}

}  // namespace fp8flow::sm90
