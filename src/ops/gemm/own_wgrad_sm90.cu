// sm90_own_wgrad: the FP8 block-scaled grouped weight-gradient GEMM of our own (own_wgrad.h):
// dW_e [N][K] (+)= sum over expert e's tokens m of dY^T[n][m] X^T[k][m], both operands the
// column-wise copies ([N][M] and [K][M], tokens contiguous: the K-major form wgmma reads) with one
// F32 scale per (128-token tile of the expert, row), F32 out.
//
// Why our own: cuBLASLt 13.1 has no grouped block-scaled FP8 matmul on Hopper, and its per-expert
// wgrad with F32 out ran at ~624 TFLOP/s at the DeepSeek-V3 shard (4.6 of the 12.3 ms fp8-flow
// step, bench/RESULTS.md session 7): each expert contracts only ~1024 tokens (8 K blocks) into a
// 128 x 128 F32 tile (64 KB to store), so a kernel that stops the math for every epilogue is
// epilogue-bound. Napkin math (FC1 + FC2 at the shard): 2.89 TFLOP of math and 5.6 GB of dW
// written: 2.9 ms at 1000 TFLOP/s, 1.9 ms at 3 TB/s; overlapped, the math bounds it.
//
// Structure (as own_fprop_sm90.cu): persistent CTAs, one per SM, loop over the 128 x 128 output
// tiles of all experts (per expert, groups of kRasterN n tiles, k tiles outer within a group).
// Warpgroup 0: one thread issues per K block (128 tokens) two TMA tensor loads (A = dY^T rows, B =
// X^T rows, 128-byte swizzle) and two 512-byte bulk loads of the block's 128 row scales of each
// operand into a kStages-deep ring (mbarrier full/empty). The tensor maps are per expert and end at
// the expert's last token, so the partial last K block of an expert reads zeros past it (not the
// next expert's tokens). Warpgroups 1 and 2 multiply 64 rows each: four wgmma m64n128k32 into a
// temporary accumulator, then acc += tmp * (scale_a[row] * scale_b[col]) (per-K-block FP32
// promotion; both scales vary per element, so two FP32 ops per element where fprop needs one).
// Epilogue: the F32 tile goes through shared memory (64 KB, so 4 stages) to TMA stores, or TMA
// add-reductions when accumulating, issued by one thread per warpgroup; they drain while the
// warpgroup runs the next tile's mainloop (the producer has already loaded its first K blocks).
// Storing straight from registers instead ran at 590 TFLOP/s where cuBLASLt runs 730 (H100, FC1
// balanced): the warps stalled on the full store queue, math and stores did not overlap.
// Bench: `FP8FLOW_OWN_WGRAD=0|1 fp8flow-bench ops --only "fp8 wgrad f32"` and `fp8flow-bench
// layer`.
//
// NOTES (H100, session 9, bench/RESULTS.md): 0.75-0.98x cuBLASLt (FC1 balanced 2.91-3.06 ms vs
// 2.70, skewed 3.85 vs 2.97, dense 2.37-2.51 vs 2.09-2.13; FC2 balanced 1.35-1.46 vs 1.32), so it
// stays opt-in. Nsight Compute (FC1 balanced): tensor pipe busy 36% of the time, DRAM writes 1.33
// TB/s, L2 6.4 TB/s (51%), issue slots 36%: neither bandwidth nor issue bound. Napkin math for the
// shared memory: per 128-token K block the two consumer warpgroups' wgmmas read 48 KB (B is read
// by both), TMA writes 33 KB and the epilogue moves ~16 KB (128 KB per 8-block tile): ~100 KB at
// 128 B per clock is ~790 clocks against 512 clocks of tensor work, so 128 x 128 tiles of
// m64n128 wgmmas cannot keep the tensor pipe full; m64n256 would need 128 accumulator registers
// plus 128 for the promotion's temporary. Skewed routing is worse still: a tiny expert's tile is
// all epilogue (64 KB of dW for one K block of math) and one epilogue buffer per CTA serializes
// those stores. Tried: two temporaries so that the next block's wgmmas run during the promotion
// (ptxas serialized the wgmmas, C7514: 3-9% slower).
#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <memory>

#include "common/check.h"
#include "common/cuda_check.h"
#include "ops/gemm/kernels/own_sm90.cuh"
#include "ops/gemm/own_tma.h"
#include "ops/gemm/own_wgrad.h"

namespace fp8flow::sm90::own {

namespace {

using namespace dev;

constexpr int kBM = 128, kBN = 128, kBK = 128;  // dW rows (n), dW cols (k), tokens per K block
constexpr int kStages = 4;   // + the 64 KB epilogue tile: 197 KB of shared memory
constexpr int kRasterN = 8;  // n tiles per raster group
constexpr int kThreads = 384;
constexpr int kTileBytes = kBM * kBK;                   // one A or B tile, E4M3
constexpr int kScaleBytes = 128 * 4;                    // one operand's 128 row scales
constexpr int kStageBytes = 2 * kTileBytes + 2 * 1024;  // tiles, then scales (1 KB aligned)
constexpr int kEpiBytes = kBM * kBN * 4;                // the F32 output tile
constexpr int kEpiChunk = 64 * 32 * 4;  // a warpgroup's 64 rows x 32 columns: one TMA store box
constexpr int kMaxActive = 64;          // tensor maps travel as kernel parameters
constexpr size_t kSmemBytes = 1024 + size_t{kStages} * kStageBytes + kEpiBytes + 2 * kStages * 8;
static_assert(kSmemBytes <= 232448, "shared memory over the sm_90 limit");
static_assert(kBK == 128, "mma_k128_e4m3 multiplies one 128-deep K block");
static_assert(kStageBytes % 1024 == 0, "128-byte swizzled tiles need 1 KB aligned stages");

// Per non-empty ("active") expert a: two tensor maps, its tiles, K blocks and scale rows.
struct Maps {
  CUtensorMap a[kMaxActive];  // dY^T [N][M_e] of the expert's tokens
  CUtensorMap b[kMaxActive];  // X^T [K][M_e]
  CUtensorMap d[kMaxActive];  // dW_e [N][K] F32, 64 x 32 boxes
};
struct Params {
  int active, N, K, n_tiles, k_tiles;
  int tile_start[kMaxActive + 1];
  int kblocks[kMaxActive];    // ceil(M_e / 128)
  int scale_row[kMaxActive];  // the expert's first row of the [tiles][.] scale tensors
  int64_t ldd;
  const float* scale_a;  // [tiles][N]
  const float* scale_b;  // [tiles][K]
  int accumulate;
};

struct TileCoord {
  int a, n0, k0;
};
__device__ __forceinline__ TileCoord tile_coord(const Params& p, int t) {
  const int lo = detail::last_le(p.tile_start, p.active, t);
  const int local = t - p.tile_start[lo];
  const int group = local / (kRasterN * p.k_tiles);
  const int gn = min(kRasterN, p.n_tiles - group * kRasterN);
  const int in_group = local - group * kRasterN * p.k_tiles;
  TileCoord c;
  c.a = lo;
  c.n0 = (group * kRasterN + in_group % gn) * kBM;
  c.k0 = (in_group / gn) * kBN;
  return c;
}

__global__ void __launch_bounds__(kThreads, 1)
    sm90_own_wgrad_kernel(const __grid_constant__ Maps maps, const __grid_constant__ Params p) {
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) &
                                             ~static_cast<uintptr_t>(1023));
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kStages * kStageBytes + kEpiBytes);
  uint64_t* empty = full + kStages;

  const int total = p.tile_start[p.active];
  const int tid = static_cast<int>(threadIdx.x), wg = tid / 128;
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], 256);  // every consumer thread, after its reads of the stage
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  // `it` counts K blocks over all of this CTA's tiles: the ring runs on into the next tile.
  if (wg == 0) {
    regs_dec<40>();
    if (tid == 0) {
      int it = 0;
      for (int tile = static_cast<int>(blockIdx.x); tile < total;
           tile += static_cast<int>(gridDim.x)) {
        const TileCoord tc = tile_coord(p, tile);
        const int nk = p.kblocks[tc.a], srow = p.scale_row[tc.a];
        for (int kb = 0; kb < nk; ++kb, ++it) {
          const int s = it % kStages;
          if (it >= kStages) mbar_wait(&empty[s], ((it / kStages) & 1) ^ 1);
          uint8_t* st = smem + s * kStageBytes;
          mbar_expect_tx(&full[s], 2 * kTileBytes + 2 * kScaleBytes);
          tma_load_2d(st, &maps.a[tc.a], kb * kBK, tc.n0, &full[s]);
          tma_load_2d(st + kTileBytes, &maps.b[tc.a], kb * kBK, tc.k0, &full[s]);
          bulk_load(st + 2 * kTileBytes, p.scale_a + static_cast<int64_t>(srow + kb) * p.N + tc.n0,
                    kScaleBytes, &full[s]);
          bulk_load(st + 2 * kTileBytes + 1024,
                    p.scale_b + static_cast<int64_t>(srow + kb) * p.K + tc.k0, kScaleBytes,
                    &full[s]);
        }
      }
    }
    return;
  }

  // Consumers: warpgroup c = wg - 1 owns dW rows 64c .. 64c + 63 of each tile; this thread holds
  // rows lr, lr + 8 and columns 8j + 2 (lane % 4) + {0, 1}, j < 16 (the m64n128 F32 fragment).
  regs_inc<232>();  // 128 x 40 + 256 x 232 <= 64 K: acc, tmp and the promotion without spills
  const int c = wg - 1, t = tid - 128 * wg, warp = t / 32, lane = t % 32;
  const int lr = 64 * c + 16 * warp + lane / 4;
  uint8_t* epi = smem + kStages * kStageBytes + c * (kEpiBytes / 2);
  int it = 0;
  for (int tile = static_cast<int>(blockIdx.x); tile < total; tile += static_cast<int>(gridDim.x)) {
    const TileCoord tc = tile_coord(p, tile);
    const int nk = p.kblocks[tc.a];
    float acc[64], tmp[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = 0.0f;
    for (int kb = 0; kb < nk; ++kb, ++it) {
      const int s = it % kStages;
      mbar_wait(&full[s], (it / kStages) & 1);
      const uint8_t* st = smem + s * kStageBytes;
      mma_k128_e4m3(tmp, sw128_desc(st + c * 64 * kBK), sw128_desc(st + kTileBytes));
      // acc += tmp * scale_a[row] * scale_b[col] with this block's scales, read from the stage
      // before the warp releases it. (Two temporaries, so that block kb + 1's wgmmas run during
      // block kb's promotion, made ptxas serialize the wgmmas (C7514) and ran 3-9% slower.)
      const float* sa = reinterpret_cast<const float*>(st + 2 * kTileBytes);
      const float2* sb = reinterpret_cast<const float2*>(st + 2 * kTileBytes + 1024);
      const float sa0 = sa[lr], sa1 = sa[lr + 8];
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        const float2 b = sb[4 * j + lane % 4];
        acc[4 * j + 0] = fmaf(tmp[4 * j + 0], sa0 * b.x, acc[4 * j + 0]);
        acc[4 * j + 1] = fmaf(tmp[4 * j + 1], sa0 * b.y, acc[4 * j + 1]);
        acc[4 * j + 2] = fmaf(tmp[4 * j + 2], sa1 * b.x, acc[4 * j + 2]);
        acc[4 * j + 3] = fmaf(tmp[4 * j + 3], sa1 * b.y, acc[4 * j + 3]);
      }
      // Every thread arrives after its own scale reads (a warp-level arrive after __syncwarp
      // orders them too, but compute-sanitizer's racecheck flags the other lanes' reads against
      // the next bulk copy into the stage).
      mbar_arrive(&empty[s]);
    }

    // Epilogue: the fragment -> this warpgroup's 64 x 128 F32 slab of shared memory, as four
    // 64 x 32 boxes in the 128-byte swizzle (16-byte unit u of row r at u ^ (r % 8): the 8 rows a
    // warp writes per instruction hit 8 different units, no bank conflict) -> four TMA stores (or
    // add-reductions, accumulate) issued by one thread. The stores drain while the warpgroup runs
    // the next tile's mainloop; the slab is rewritten only after they have read it.
    if (t == 0) bulk_wait_read0();
    named_sync(1 + c, 128);
    const int r = 16 * warp + lane / 4, q = lane % 4;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const int unit = 2 * (j % 4) + q / 2;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int rr = r + 8 * h;
        uint8_t* dst =
            epi + (j / 4) * kEpiChunk + rr * 128 + ((unit ^ (rr % 8)) << 4) + 8 * (q % 2);
        *reinterpret_cast<float2*>(dst) = make_float2(acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1]);
      }
    }
    fence_proxy_async_shared();
    named_sync(1 + c, 128);
    if (t == 0) {
#pragma unroll
      for (int ch = 0; ch < 4; ++ch) {
        if (p.accumulate)
          tma_store_2d<true>(&maps.d[tc.a], epi + ch * kEpiChunk, tc.k0 + 32 * ch, tc.n0 + 64 * c);
        else
          tma_store_2d<false>(&maps.d[tc.a], epi + ch * kEpiChunk, tc.k0 + 32 * ch, tc.n0 + 64 * c);
      }
      bulk_commit();
    }
  }
  if (t == 0) bulk_wait0();
}

}  // namespace

bool own_wgrad_supported(const ScaledTensor& dy_t, const ScaledTensor& x_t,
                         std::span<const TensorView> dw, std::span<const int64_t> m_splits) {
  const int64_t N = dy_t.data.rows, K = x_t.data.rows, M = dy_t.data.cols;
  if (dy_t.data.dtype != DType::E4M3 || x_t.data.dtype != DType::E4M3) return false;
  if (N % 128 || K % 128 || N == 0 || K == 0 || x_t.data.cols != M) return false;
  if (dy_t.data.stride() % 16 || x_t.data.stride() % 16) return false;
  if (reinterpret_cast<uintptr_t>(dy_t.data.data) % 16 ||
      reinterpret_cast<uintptr_t>(x_t.data.data) % 16)
    return false;
  // The kernel indexes the scales as dense [tiles][N] and [tiles][K].
  if (dy_t.scale.stride() != N || x_t.scale.stride() != K) return false;
  if (dw.size() != m_splits.size() || dw.empty()) return false;
  const int64_t ld = dw[0].stride();
  int active = 0;
  for (size_t e = 0; e < dw.size(); ++e) {
    const TensorView& d = dw[e];
    if (d.dtype != DType::F32 || d.rows != N || d.cols != K || d.stride() != ld) return false;
    if (ld % 4 || reinterpret_cast<uintptr_t>(d.data) % 16) return false;  // TMA stores
    if (m_splits[e] % 16) return false;
    active += m_splits[e] > 0 ? 1 : 0;
  }
  return active <= kMaxActive;
}

void own_grouped_wgrad(const ScaledTensor& dy_t, const ScaledTensor& x_t,
                       std::span<const TensorView> dw, std::span<const int64_t> m_splits,
                       bool accumulate, Stream stream_, int ctas) {
  const char* op = "own_grouped_wgrad";
  if (!own_wgrad_supported(dy_t, x_t, dw, m_splits))
    detail::throw_error(ErrorKind::Unsupported,
                        detail::cat("fp8flow::", op, ": operands outside the kernel's contract"));
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_);
  const int64_t N = dy_t.data.rows, K = x_t.data.rows;
  const auto mp = std::make_unique<Maps>();  // 24 KB: keep them off the stack frame
  const auto pp = std::make_unique<Params>();
  Params& p = *pp;
  p.N = static_cast<int>(N);
  p.K = static_cast<int>(K);
  p.n_tiles = static_cast<int>(N / kBM);
  p.k_tiles = static_cast<int>(K / kBN);
  p.ldd = dw[0].stride();
  p.scale_a = static_cast<const float*>(dy_t.scale.data);
  p.scale_b = static_cast<const float*>(x_t.scale.data);
  p.accumulate = accumulate ? 1 : 0;
  int a = 0, tiles = 0;
  int64_t m0 = 0, srow = 0;
  for (size_t e = 0; e < m_splits.size(); ++e) {
    const int64_t me = m_splits[e];
    if (me == 0) {
      if (!accumulate)  // an empty contraction is zero
        FP8FLOW_CUDA_CHECK(
            op, cudaMemset2DAsync(dw[e].data, dw[e].row_bytes(), 0, static_cast<size_t>(K) * 4,
                                  static_cast<size_t>(N), stream));
      continue;
    }
    mp->a[a] =
        make_map(op, static_cast<const uint8_t*>(dy_t.data.data) + m0, N, me, dy_t.data.stride());
    mp->b[a] =
        make_map(op, static_cast<const uint8_t*>(x_t.data.data) + m0, K, me, x_t.data.stride());
    p.tile_start[a] = tiles;
    p.kblocks[a] = static_cast<int>((me + kBK - 1) / kBK);
    p.scale_row[a] = static_cast<int>(srow);
    mp->d[a] =
        make_map_2d(op, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, dw[e].data, N, K, p.ldd * 4, 64, 32);
    tiles += p.n_tiles * p.k_tiles;
    srow += (me + kBK - 1) / kBK;
    m0 += me;
    ++a;
  }
  p.active = a;
  p.tile_start[a] = tiles;
  if (tiles == 0) return;
  allow_dynamic_smem(op, reinterpret_cast<const void*>(sm90_own_wgrad_kernel), kSmemBytes);
  if (ctas <= 0) ctas = sm_count(op);
  const int grid = std::min(tiles, ctas);
  sm90_own_wgrad_kernel<<<grid, kThreads, kSmemBytes, stream>>>(*mp, p);
  FP8FLOW_CUDA_CHECK_LAUNCH(op);
}

}  // namespace fp8flow::sm90::own
