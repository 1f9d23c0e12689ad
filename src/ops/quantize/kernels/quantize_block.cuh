// sm90_quantize_block128: X [M][K] (F32/BF16) -> FP8 with one power-of-two scale per 128x128 block
// (weights). One CTA of 256 threads per block, ONE read of the block: every thread loads its whole
// share into registers up front (BF16: 8, F32: 16 independent 16-byte loads in flight, 128 or
// 256 bytes per thread), reduces the finite amax (NaN-propagating max, so "all finite?" comes for
// free; warp shuffles, then 8 warp maxima through shared memory), and encodes from the same
// registers with the hardware cvt (fp8_device.cuh: bit-identical to fmt:: on finite values;
// threads holding a NaN/Inf patch those codes with fmt::). Global memory is never re-read.
//
// Thread layout: kTpr = 128 / kVec threads per block row (BF16: 16 threads x 8 channels, F32:
// 32 x 4), 256 / kTpr rows per pass, 128 / (256 / kTpr) passes (BF16 8, F32 16); thread (rr, cc)
// holds rows rr, rr + rows_per_pass, ... of channels cc * kVec ... Each warp load covers two
// (BF16) or one (F32) full 256/512-byte row segments; codes go out as 8-byte (BF16) / 4-byte (F32)
// stores, 128 contiguous bytes per row per warp.
//
// Napkin math (DeepSeek-V3 shard W1, 32 x 4096 x 7168 BF16): read 1.88 GB, write 0.94 GB codes +
// 229 KB scales: 2.82 GB, 0.94 ms at 3.0 TB/s copy speed, 1.17 ms at the 80% target (the previous
// two-pass kernel with the fmt:: encoder: 2.36 ms, 1.2 TB/s). W2 (half the size): ~0.5 ms.
// Occupancy: BF16 4 CTAs/SM (<= 64 registers), F32 2 CTAs/SM (<= 128): 128 KB of loads in flight
// per SM either way, while other CTAs of the SM reduce and store.
// Bench: fp8flow-bench ops --op quantize --layout block128x128.
// NOTES: M, K need not be multiples of 128 (K % 16 == 0 is validated, so a thread's 16-byte chunk
// is wholly inside or outside K); rows and channels past the edge load as 0 (never raise the amax)
// and are never stored.
#pragma once

#include <cstdint>

#include "fp8flow/formats.h"
#include "ops/quantize/kernels/fp8_device.cuh"

namespace fp8flow::sm90 {

constexpr int kBlockQuantThreads = 256;

template <typename In>
struct BlockQuantCfg {
  static constexpr int kVec = dev::InVec<In>::kVec;               // channels per thread
  static constexpr int kTpr = 128 / kVec;                         // threads per block row
  static constexpr int kRowsPerPass = kBlockQuantThreads / kTpr;  // 16 (BF16) / 8 (F32)
  static constexpr int kPasses = 128 / kRowsPerPass;              // 8 / 16 loads per thread
  static constexpr int kMinBlocks = sizeof(In) == 2 ? 4 : 2;      // register budget 64 / 128
};

template <typename In, bool kE5M2>
__global__ void __launch_bounds__(kBlockQuantThreads, BlockQuantCfg<In>::kMinBlocks)
    sm90_quantize_block128_kernel(const In* __restrict__ in, int32_t M, int32_t K, int32_t tiles_k,
                                  uint8_t* __restrict__ out, float* __restrict__ scale) {
  using Cfg = BlockQuantCfg<In>;
  using V = dev::InVec<In>;
  using F = dev::Fp8<kE5M2>;
  constexpr int kVec = Cfg::kVec, kPasses = Cfg::kPasses, kRowsPerPass = Cfg::kRowsPerPass;

  __shared__ float warp_max[kBlockQuantThreads / 32];

  const int32_t mt = static_cast<int32_t>(blockIdx.x / static_cast<uint32_t>(tiles_k));
  const int32_t kt = static_cast<int32_t>(blockIdx.x - static_cast<uint32_t>(mt) * tiles_k);
  const int32_t r0 = mt * 128, k0 = kt * 128;
  const int32_t rows = M - r0 < 128 ? M - r0 : 128;
  const int cc = threadIdx.x % Cfg::kTpr;
  const int rr = threadIdx.x / Cfg::kTpr;
  const int32_t ch0 = k0 + cc * kVec;
  const bool ch_ok = ch0 < K;
  const int64_t base = (static_cast<int64_t>(r0) + rr) * K + ch0;  // element (r0 + rr, ch0)
  const int64_t pass_stride = static_cast<int64_t>(kRowsPerPass) * K;

  // ---- the whole share of the block, all loads issued before any use
  uint4 v[kPasses];
#pragma unroll
  for (int p = 0; p < kPasses; ++p) {
    v[p] = make_uint4(0u, 0u, 0u, 0u);
    if (ch_ok && rr + p * kRowsPerPass < rows)
      v[p] = dev::load16_stream(in + base + p * pass_stride);
  }

  // ---- finite amax: NaN-propagating max first; a thread that met NaN/Inf redoes it finite-only
  float amax = 0.f;
#pragma unroll
  for (int p = 0; p < kPasses; ++p) amax = dev::max_nan(amax, V::absmax(v[p]));
  const bool slow = !dev::finite_le_max(amax);
  if (slow) {
    amax = 0.f;
#pragma unroll
    for (int p = 0; p < kPasses; ++p)
#pragma unroll
      for (int i = 0; i < kVec; ++i) amax = fmaxf(amax, dev::finite_abs(V::get(v[p], i)));
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

  // ---- encode from registers (finite amax: e <= 120, so 2^-e is one normal multiplier)
  if (!ch_ok) return;
  const float f = dev::inv_scale(e);
#pragma unroll
  for (int p = 0; p < kPasses; ++p) {
    if (rr + p * kRowsPerPass >= rows) break;
    uint32_t q[kVec / 4];
#pragma unroll
    for (int i = 0; i < kVec / 4; ++i) {
      const float x0 = V::get(v[p], 4 * i), x1 = V::get(v[p], 4 * i + 1);
      const float x2 = V::get(v[p], 4 * i + 2), x3 = V::get(v[p], 4 * i + 3);
      q[i] = F::encode4_fast(x0, x1, x2, x3, f);
      if (slow) q[i] = F::fix_nonfinite4(q[i], x0, x1, x2, x3);
    }
    uint8_t* dst = out + base + p * pass_stride;
    if constexpr (kVec == 8)
      dev::store8(dst, make_uint2(q[0], q[1]));
    else
      dev::store4(dst, q[0]);
  }
}

}  // namespace fp8flow::sm90
