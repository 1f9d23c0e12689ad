// sm_90a backend of transpose_block_weights: W [N][K] FP8 -> W^T [K][N], 128x128 block scales
// transposed with it (every block moves whole, so its scale moves unchanged). dgrad needs W^T
// because Hopper's FP8 GEMMs are TN only.
// Bench: fp8flow_tests --gtest_also_run_disabled_tests --gtest_filter='GemmBench*'.
// Napkin: one read + one write of the codes, 2*N*K bytes: the 32 FC1 experts of DeepSeek-V3
// (4096 x 7168 each) are 1.9 GB, ~0.65 ms at 2.9 TB/s on an H100.
//
// Kernel sm90_transpose_fp8_block128: one CTA per 128x128 block, 256 threads, 16 KB smem.
//   Load: each thread reads four 16-byte row chunks (64 B in flight per thread), stored to smem
//   with the 16-byte chunks XOR-swizzled by (row / 16) % 8. Store: each thread reads 16 4-byte
//   words (16 rows x 4 columns; conflict-free thanks to the swizzle), transposes the 4x4 byte
//   blocks with byte permutes, and writes four 16-byte output chunks; the 8 threads sharing an
//   output row write 128 contiguous bytes.
// NOTES: N, K are multiples of 16 (validated), so every 16-byte chunk is wholly inside or outside.
// transpose_block_weights_batched (internal, used by MoELayer::refresh_weights): a stack of B
// matrices in one launch, blockIdx.z = matrix. One launch per W1 / W2 instead of one per expert:
// at the DeepSeek-V3 shard shape a single expert's W1 is 1792 CTAs, 1.7 waves of 8 CTAs/SM, so
// every per-expert launch ended on a partly empty wave (plus a launch gap); the stacked grid is
// 57344 CTAs, ~54 waves.
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_check.h"
#include "ops/gemm/gemm_backends.h"

namespace fp8flow::sm90 {
namespace {

__global__ void __launch_bounds__(256)
    sm90_transpose_fp8_block128(const uint8_t* __restrict__ w, uint8_t* __restrict__ wt,
                                const float* __restrict__ s, float* __restrict__ st, int N, int K,
                                int nb, int kb) {
  __shared__ alignas(16) uint32_t tile[128 * 32];  // [row n][32 words], chunk-swizzled
  // blockIdx.z: matrix of a stack (transpose_block_weights_batched); 0 for one matrix.
  {
    const size_t z = blockIdx.z;
    w += z * static_cast<size_t>(N) * K;
    wt += z * static_cast<size_t>(N) * K;
    s += z * static_cast<size_t>(nb) * kb;
    st += z * static_cast<size_t>(nb) * kb;
  }
  const int kt = static_cast<int>(blockIdx.x), nt = static_cast<int>(blockIdx.y);
  const int n0 = nt * 128, k0 = kt * 128;
  const int t = static_cast<int>(threadIdx.x);

  uint4 v[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = (t >> 3) + 32 * i, ch = t & 7;
    const int n = n0 + r, k = k0 + ch * 16;
    v[i] = (n < N && k < K) ? *reinterpret_cast<const uint4*>(w + static_cast<size_t>(n) * K + k)
                            : make_uint4(0u, 0u, 0u, 0u);
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = (t >> 3) + 32 * i, ch = t & 7;
    *reinterpret_cast<uint4*>(&tile[r * 32 + ((ch ^ ((r >> 4) & 7)) << 2)]) = v[i];
  }
  if (t == 0) st[static_cast<size_t>(kt) * nb + nt] = s[static_cast<size_t>(nt) * kb + kt];
  __syncthreads();

  // Thread -> (q, p): output rows k0 + 4q .. 4q+3, output columns n0 + 16p .. 16p+15.
  const int lane = t & 31, wp = t >> 5;
  const int ql = lane & 3, p = lane >> 2, q = wp * 4 + ql;
  uint32_t x[16];
#pragma unroll
  for (int j = 0; j < 16; ++j) x[j] = tile[(16 * p + j) * 32 + (((wp ^ p) << 2) | ql)];
  // x[j] byte b = W[n0 + 16p + j][k0 + 4q + b]; output row 4q + b, word g = bytes b of x[4g..4g+3].
  uint32_t o[4][4];
#pragma unroll
  for (int g = 0; g < 4; ++g) {
    const uint32_t lo_ab = __byte_perm(x[4 * g], x[4 * g + 1], 0x5140);
    const uint32_t lo_cd = __byte_perm(x[4 * g + 2], x[4 * g + 3], 0x5140);
    const uint32_t hi_ab = __byte_perm(x[4 * g], x[4 * g + 1], 0x7362);
    const uint32_t hi_cd = __byte_perm(x[4 * g + 2], x[4 * g + 3], 0x7362);
    o[0][g] = __byte_perm(lo_ab, lo_cd, 0x5410);
    o[1][g] = __byte_perm(lo_ab, lo_cd, 0x7632);
    o[2][g] = __byte_perm(hi_ab, hi_cd, 0x5410);
    o[3][g] = __byte_perm(hi_ab, hi_cd, 0x7632);
  }
  const int n = n0 + 16 * p;
#pragma unroll
  for (int b = 0; b < 4; ++b) {
    const int k = k0 + 4 * q + b;
    if (k < K && n < N)
      *reinterpret_cast<uint4*>(wt + static_cast<size_t>(k) * N + n) =
          make_uint4(o[b][0], o[b][1], o[b][2], o[b][3]);
  }
}

}  // namespace

void transpose_block_weights(const ScaledTensor& w, const ScaledTensor& w_t, Stream stream) {
  transpose_block_weights_batched(w, w_t, 1, stream);
}

void transpose_block_weights_batched(const ScaledTensor& w, const ScaledTensor& w_t, int64_t batch,
                                     Stream stream) {
  const int64_t N = w.data.rows / batch, K = w.data.cols;
  if (N == 0 || K == 0) return;
  const int64_t nb = detail::ceil_div(N, 128), kb = detail::ceil_div(K, 128);
  const dim3 grid(static_cast<unsigned>(kb), static_cast<unsigned>(nb),
                  static_cast<unsigned>(batch));
  sm90_transpose_fp8_block128<<<grid, 256, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      static_cast<const uint8_t*>(w.data.data), static_cast<uint8_t*>(w_t.data.data),
      static_cast<const float*>(w.scale.data), static_cast<float*>(w_t.scale.data),
      static_cast<int>(N), static_cast<int>(K), static_cast<int>(nb), static_cast<int>(kb));
  FP8FLOW_CUDA_CHECK_LAUNCH("transpose_block_weights");
}

}  // namespace fp8flow::sm90
