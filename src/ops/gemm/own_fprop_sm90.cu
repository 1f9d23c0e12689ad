// sm90_own_fprop: an experimental FP8 block-scaled grouped GEMM of our own for fprop / dgrad
// (opt-in: FP8FLOW_OWN_GEMM=1 routes grouped_gemm_fprop/dgrad here; off by default because it is
// still slower than cuBLASLt, bench/RESULTS.md): Y [M][N] = X [M][K] . W_e^T per expert segment, X
// row-wise 1x128 scaled ([K/128][M] F32), W_e 128x128 block scaled, BF16 out.
//
// One CTA per 128 x 128 output tile, or (ctas > 0, FP8FLOW_OWN_GEMM_PERSISTENT=1) fewer CTAs that
// loop over the tiles. Tiles are rastered per expert in groups of 8 m tiles (n tiles outer, m tiles
// inner within a group), so the CTAs in flight share a few A row blocks and weight blocks that stay
// in L2 (a dense 32768-row problem otherwise rereads A from DRAM once per n tile).
// 3 warpgroups: warpgroup 0 issues TMA loads (128-byte swizzle) into a kStages-deep ring guarded by
// mbarriers; warpgroups 1 and 2 each multiply 64 rows: per 128-wide K block, four wgmma
// m64n128k32 into a temporary accumulator, then acc += tmp * scale_a[row] * scale_b (the
// DeepSeek-V3 recipe's FP32 promotion per K block; the scales loaded two K blocks ahead).
// Epilogue: BF16 through shared memory, 16-byte coalesced stores of the rows inside the expert's
// segment. (2-CTA clusters sharing the A tile by TMA multicast, commit d3af681, gained nothing on
// an H200 and lost 5% where K is short.)
//
// Requirements (checked on the host): E4M3 operands, N % 128 == 0, K % 128 == 0, the E weight views
// one contiguous [E N][K] tensor with contiguous scales, y BF16 with ld % 8 == 0, E <= 256.
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>

#include "common/check.h"
#include "common/cuda_check.h"
#include "ops/gemm/kernels/own_sm90.cuh"
#include "ops/gemm/own_fprop.h"
#include "ops/gemm/own_tma.h"

namespace fp8flow::sm90::own {

namespace {

using namespace dev;

constexpr int kBM = 128, kBN = 128, kBK = 128;
constexpr int kStages = 5;         // 6 made FC2 (K 2048) 4-7% slower on an H100
constexpr int kScalePrefetch = 2;  // K blocks ahead (H100: 2 beat 1 and 3 by 5-10%)
constexpr int kRasterM = 8;        // m tiles per raster group (A and B of a group stay in L2)
constexpr int kThreads = 384;
constexpr int kTileBytes = kBM * kBK;        // one A or B tile, E4M3
constexpr int kStageBytes = 2 * kTileBytes;  // A + B
constexpr int kEpiBytes = kBM * kBN * 2;     // BF16 output tile
constexpr int kMaxExperts = 256;
constexpr size_t kSmemBytes = 1024 + size_t{kStages} * kStageBytes + kEpiBytes + 2 * kStages * 8;
static_assert(kSmemBytes <= 232448, "shared memory over the sm_90 limit");
static_assert(kBK == 128, "mma_k128_e4m3 multiplies one 128-deep K block");

struct Params {
  int E, N, K, M;
  int n_tiles;                      // N / 128
  int tile_start[kMaxExperts + 1];  // CTA index where expert e starts (m_tiles_e * n_tiles each)
  int row_start[kMaxExperts + 1];   // first row of expert e; row_start[E] = M
  const float* scale_a;             // [K/128][M]
  const float* scale_b;             // [E][N/128][K/128]
  __nv_bfloat16* y;
  int64_t ldy;
};

// Tile t -> (expert, rows, n tile). Raster: per expert, groups of kRasterM m tiles; within a group,
// n tiles outer and m tiles inner, so the tiles in flight share a few A row blocks and weight
// blocks (all L2-resident).
struct TileCoord {
  int e, m0, n0, n_tile, valid_rows;
};
__device__ __forceinline__ TileCoord tile_coord(const Params& p, int t) {
  const int e = detail::last_le(p.tile_start, p.E, t);  // the expert of tile t
  const int rows_e = p.row_start[e + 1] - p.row_start[e];
  const int m_tiles = (rows_e + kBM - 1) / kBM;
  const int local = t - p.tile_start[e];
  const int group = local / (kRasterM * p.n_tiles);
  const int gm = min(kRasterM, m_tiles - group * kRasterM);
  const int in_group = local - group * kRasterM * p.n_tiles;
  const int n_tile = in_group / gm, m_tile = group * kRasterM + in_group % gm;
  TileCoord c;
  c.e = e;
  c.m0 = p.row_start[e] + m_tile * kBM;
  c.n_tile = n_tile;
  c.n0 = n_tile * kBN;
  c.valid_rows = min(kBM, p.row_start[e + 1] - c.m0);
  return c;
}

__global__ void __launch_bounds__(kThreads, 1)
    sm90_own_fprop_kernel(const __grid_constant__ CUtensorMap map_a,
                          const __grid_constant__ CUtensorMap map_b,
                          const __grid_constant__ Params p) {
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) &
                                             ~static_cast<uintptr_t>(1023));
  uint8_t* epi = smem + kStages * kStageBytes;
  uint64_t* full = reinterpret_cast<uint64_t*>(epi + kEpiBytes);
  uint64_t* empty = full + kStages;

  const int total = p.tile_start[p.E], nk = p.K / kBK;
  const int tid = static_cast<int>(threadIdx.x), wg = tid / 128;
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], 2);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  // CTA b takes tiles b, b + gridDim.x, ... (one tile per CTA when the grid covers them all);
  // `it` counts K blocks over all of them, so the ring runs on into the next tile: the producer
  // loads it while the consumers write the previous tile's epilogue.
  if (wg == 0) {
    // Producer: one thread issues every TMA load.
    if (tid == 0) {
      int it = 0;
      for (int tile = static_cast<int>(blockIdx.x); tile < total;
           tile += static_cast<int>(gridDim.x)) {
        const TileCoord tc = tile_coord(p, tile);
        for (int kb = 0; kb < nk; ++kb, ++it) {
          const int s = it % kStages;
          if (it >= kStages) mbar_wait(&empty[s], ((it / kStages) & 1) ^ 1);
          uint8_t* a = smem + s * kStageBytes;
          mbar_expect_tx(&full[s], kStageBytes);
          tma_load_2d(a, &map_a, kb * kBK, tc.m0, &full[s]);
          tma_load_2d(a + kTileBytes, &map_b, kb * kBK, tc.e * p.N + tc.n0, &full[s]);
        }
      }
    }
    return;
  }

  // Consumers: warpgroup c = wg - 1 owns rows 64c .. 64c + 63 of each tile.
  const int c = wg - 1, t = tid - 128 * wg, warp = t / 32, lane = t % 32;
  const int r0 = 64 * c + 16 * warp + lane / 4;  // this thread's rows r0 and r0 + 8
  auto* slab = reinterpret_cast<__nv_bfloat162*>(epi + c * 64 * kBN * 2);
  const uint4* slab16 = reinterpret_cast<const uint4*>(epi + c * 64 * kBN * 2);
  int it = 0;
  for (int tile = static_cast<int>(blockIdx.x); tile < total; tile += static_cast<int>(gridDim.x)) {
    const TileCoord tc = tile_coord(p, tile);
    float acc[64], tmp[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = 0.0f;
    const float* sb_base = p.scale_b + (static_cast<int64_t>(tc.e) * p.n_tiles + tc.n_tile) * nk;
    const int ga0 = min(tc.m0 + r0, p.M - 1), ga1 = min(tc.m0 + r0 + 8, p.M - 1);
    // The scales are loaded kScalePrefetch K blocks ahead: loaded just before their use, their L2
    // latency stalled the promotion (Nsight Compute: 36% of the consumer warps' stall cycles;
    // H100, FC1 fprop at the DeepSeek-V3 shard shape 830-870 -> 950-980 TFLOP/s).
    float pa0[kScalePrefetch], pa1[kScalePrefetch], pb[kScalePrefetch];
    auto load_scales = [&](int kb, float& a0, float& a1, float& b) {
      const int k = min(kb, nk - 1);
      a0 = __ldg(p.scale_a + static_cast<int64_t>(k) * p.M + ga0);
      a1 = __ldg(p.scale_a + static_cast<int64_t>(k) * p.M + ga1);
      b = __ldg(sb_base + k);
    };
#pragma unroll
    for (int i = 0; i < kScalePrefetch; ++i) load_scales(i, pa0[i], pa1[i], pb[i]);
    for (int kb = 0; kb < nk; ++kb, ++it) {
      const int s = it % kStages;
      const float sa0 = pa0[0], sa1 = pa1[0], sb = pb[0];
#pragma unroll
      for (int i = 0; i + 1 < kScalePrefetch; ++i) {
        pa0[i] = pa0[i + 1];
        pa1[i] = pa1[i + 1];
        pb[i] = pb[i + 1];
      }
      load_scales(kb + kScalePrefetch, pa0[kScalePrefetch - 1], pa1[kScalePrefetch - 1],
                  pb[kScalePrefetch - 1]);
      mbar_wait(&full[s], (it / kStages) & 1);
      const uint8_t* a = smem + s * kStageBytes + c * 64 * kBK;
      const uint8_t* b = smem + s * kStageBytes + kTileBytes;
      mma_k128_e4m3(tmp, sw128_desc(a), sw128_desc(b));
      if (t == 0) mbar_arrive(&empty[s]);
      const float s0 = sa0 * sb, s1 = sa1 * sb;
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        acc[4 * j + 0] = fmaf(tmp[4 * j + 0], s0, acc[4 * j + 0]);
        acc[4 * j + 1] = fmaf(tmp[4 * j + 1], s0, acc[4 * j + 1]);
        acc[4 * j + 2] = fmaf(tmp[4 * j + 2], s1, acc[4 * j + 2]);
        acc[4 * j + 3] = fmaf(tmp[4 * j + 3], s1, acc[4 * j + 3]);
      }
    }

    // Epilogue: BF16 fragments -> this warpgroup's 64 x 128 slab of shared memory (256-byte rows)
    // -> 16-byte coalesced stores of the rows inside the expert's segment. The first barrier keeps
    // the slab until every thread of the warpgroup has stored the previous tile from it.
    asm volatile("bar.sync %0, 128;" ::"r"(1 + c) : "memory");
    const int lr = 16 * warp + lane / 4;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const int col2 = 4 * j + lane % 4;  // in bf16 pairs
      slab[lr * (kBN / 2) + col2] = __floats2bfloat162_rn(acc[4 * j + 0], acc[4 * j + 1]);
      slab[(lr + 8) * (kBN / 2) + col2] = __floats2bfloat162_rn(acc[4 * j + 2], acc[4 * j + 3]);
    }
    asm volatile("bar.sync %0, 128;" ::"r"(1 + c) : "memory");
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int idx = t + 128 * i, row = idx / 16, chunk = idx % 16;  // 16 chunks of 16 B per row
      const int tr = 64 * c + row;
      if (tr < tc.valid_rows)
        *reinterpret_cast<uint4*>(p.y + static_cast<int64_t>(tc.m0 + tr) * p.ldy + tc.n0 +
                                  8 * chunk) = slab16[idx];
    }
  }
}

}  // namespace

bool own_fprop_supported(const ScaledTensor& x, std::span<const ScaledTensor> w,
                         const TensorView& y) {
  if (w.empty() || w.size() > kMaxExperts) return false;
  const int64_t N = w[0].data.rows, K = w[0].data.cols;
  if (x.data.dtype != DType::E4M3 || w[0].data.dtype != DType::E4M3) return false;
  if (N % 128 || K % 128 || y.dtype != DType::BF16 || y.stride() % 8) return false;
  if (x.data.stride() != K || w[0].data.stride() != K) return false;
  // The kernel indexes the scales as dense [K/128][M] and [E][N/128][K/128].
  if (x.scale.stride() != x.data.rows) return false;
  const auto* d0 = static_cast<const uint8_t*>(w[0].data.data);
  const auto* s0 = static_cast<const float*>(w[0].scale.data);
  for (size_t e = 0; e < w.size(); ++e) {
    if (w[e].data.data != d0 + static_cast<int64_t>(e) * N * K) return false;
    if (w[e].data.stride() != K || w[e].scale.stride() != K / 128) return false;
    if (w[e].scale.data != s0 + static_cast<int64_t>(e) * (N / 128) * (K / 128)) return false;
  }
  return true;
}

void own_grouped_fprop(const ScaledTensor& x, std::span<const ScaledTensor> w, const TensorView& y,
                       std::span<const int64_t> m_splits, Stream stream, int ctas) {
  const char* op = "own_grouped_fprop";
  if (!own_fprop_supported(x, w, y))
    detail::throw_error(ErrorKind::Unsupported,
                        detail::cat("fp8flow::", op, ": operands outside the kernel's contract"));
  const int64_t N = w[0].data.rows, K = w[0].data.cols, M = x.data.rows;
  const int E = static_cast<int>(w.size());
  const auto pp = std::make_unique<Params>();  // large: keep it off the stack frame
  Params& p = *pp;
  p.E = E;
  p.N = static_cast<int>(N);
  p.K = static_cast<int>(K);
  p.M = static_cast<int>(M);
  p.n_tiles = static_cast<int>(N / kBN);
  int tiles = 0, row = 0;
  for (int e = 0; e < E; ++e) {
    p.tile_start[e] = tiles;
    p.row_start[e] = row;
    tiles += static_cast<int>((m_splits[e] + kBM - 1) / kBM) * p.n_tiles;
    row += static_cast<int>(m_splits[e]);
  }
  p.tile_start[E] = tiles;
  p.row_start[E] = row;
  p.scale_a = static_cast<const float*>(x.scale.data);
  p.scale_b = static_cast<const float*>(w[0].scale.data);
  p.y = static_cast<__nv_bfloat16*>(y.data);
  p.ldy = y.stride();
  if (tiles == 0 || M == 0) return;
  const CUtensorMap ma = make_map(op, x.data.data, M, K, K);
  const CUtensorMap mb = make_map(op, w[0].data.data, int64_t{E} * N, K, K);
  allow_dynamic_smem(op, reinterpret_cast<const void*>(sm90_own_fprop_kernel), kSmemBytes);
  // ctas 0: one CTA per tile, or one per SM with FP8FLOW_OWN_GEMM_PERSISTENT=1 (A/B).
  static const bool persistent = [] {
    const char* v = std::getenv("FP8FLOW_OWN_GEMM_PERSISTENT");
    return v != nullptr && v[0] == '1';
  }();
  if (ctas <= 0 && persistent) ctas = sm_count(op);
  const int grid = ctas > 0 ? std::min(tiles, ctas) : tiles;
  sm90_own_fprop_kernel<<<grid, kThreads, kSmemBytes, stream>>>(ma, mb, p);
  FP8FLOW_CUDA_CHECK_LAUNCH(op);
}

}  // namespace fp8flow::sm90::own
