// Routing-plan kernels (make_permutation): expert ids -> per-expert counts, padded offsets, and
// the two row maps, deterministic (stable: pairs keep their flat order t * k + j inside an
// expert), with no sort and no float atomics.
//
//   1. plan_chunk_kernel<false>: one warp per chunk of consecutive pairs counts its pairs per
//      expert (column E counts invalid ids) -> hist [chunks][E + 1] (workspace).
//   2. plan_scan_kernel (one CTA): per-expert exclusive prefix over chunks, padded sizes,
//      exclusive scan over experts (cub::BlockScan) -> tokens_per_expert, offsets, invalid; turns
//      hist into each chunk's first row per expert; writes -1 into every pad row of src_slot.
//   3. plan_chunk_kernel<true>: each warp walks its chunk again, 32 pairs a round; lanes with the
//      same expert find each other with __match_any_sync and take consecutive rows in lane order
//      -> dest_row, src_slot.
// Napkin math (T = 4096, k = 8, E = 32): reads 2 x 128 KB of ids, writes 128 KB + 128 KB of row
// maps; a few microseconds each, launch-latency bound. Bench: `fp8flow-bench ops` (permute plan
// row), and PermuteBench.* in tests/permute.
// NOTES: a histogram + scan + stable rank instead of cub::DeviceRadixSort::SortPairs: the
// workspace size is then a pure host function of (T, k, E) (CUB's size query needs the device),
// stability and the -1 / out-of-range id rule are explicit, and it is 3 launches instead of the
// sort's 3-4 plus a histogram, a scan and a scatter around it.
#pragma once

#include <cstdint>
#include <cub/block/block_scan.cuh>

#include "common/check.h"

namespace fp8flow::sm90::kernels {

constexpr int kPlanWarps = 4;  // warps (chunks) per CTA of plan_chunk_kernel
constexpr int kPlanBatch = 8;  // rounds of 32 ids loaded ahead per lane
constexpr int kScanThreads = 1024;

struct PlanArgs {
  const int32_t* topk_idx;
  int32_t num_pairs;  // T * k
  int32_t num_experts;
  int32_t chunk;  // pairs per warp chunk
  int32_t num_chunks;
  int32_t align;  // power of two
  int32_t* hist;  // workspace [num_chunks][E + 1]
  int32_t* tokens_per_expert;
  void* offsets;
  bool offsets64;
  int32_t* dest_row;
  int32_t* src_slot;
  int32_t src_slot_len;
  int32_t* invalid;
};

// kRank == false: count pass. kRank == true: ranking pass (hist holds each chunk's first rows).
template <bool kRank>
__global__ void __launch_bounds__(kPlanWarps * 32)
    plan_chunk_kernel(const __grid_constant__ PlanArgs a) {
  extern __shared__ int32_t s_count[];  // [kPlanWarps][E + 1]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int chunk_id = blockIdx.x * kPlanWarps + warp;
  if (chunk_id >= a.num_chunks) return;  // whole warps; no CTA-wide sync below
  const int E = a.num_experts, ncols = E + 1;
  int32_t* cnt = s_count + warp * ncols;
  int32_t* hist_row = a.hist + static_cast<int64_t>(chunk_id) * ncols;
  for (int e = lane; e < ncols; e += 32) cnt[e] = kRank ? hist_row[e] : 0;
  __syncwarp();
  const int begin = chunk_id * a.chunk;  // < num_pairs
  const int end = static_cast<int>(
      min(static_cast<int64_t>(a.num_pairs), static_cast<int64_t>(begin) + a.chunk));
  const unsigned lt = (1u << lane) - 1u;
  for (int64_t base = begin; base < end; base += 32 * kPlanBatch) {
    int32_t ids[kPlanBatch];
#pragma unroll
    for (int u = 0; u < kPlanBatch; ++u) {
      const int64_t i = base + u * 32 + lane;
      ids[u] = __ldg(a.topk_idx +
                     min(i, static_cast<int64_t>(end) - 1));  // clamped: loads stay unconditional
    }
#pragma unroll
    for (int u = 0; u < kPlanBatch; ++u) {
      if (base + u * 32 >= end) break;  // warp-uniform
      const int64_t i64 = base + u * 32 + lane;
      const bool in_range = i64 < end;
      const int i = static_cast<int>(i64);  // used only when in_range
      // Match key: the expert, E for an invalid id, -1 past the chunk end.
      const int key = !in_range ? -1 : (ids[u] >= 0 && ids[u] < E ? ids[u] : E);
      const unsigned peers = __match_any_sync(0xFFFFFFFFu, key);
      const bool leader = (peers & lt) == 0;
      if constexpr (kRank) {
        const bool valid = key >= 0 && key < E;
        const int row = valid ? cnt[key] + __popc(peers & lt) : -1;
        __syncwarp();
        if (valid && leader) cnt[key] += __popc(peers);
        __syncwarp();
        if (in_range) {
          a.dest_row[i] = row;
          if (valid) a.src_slot[row] = i;
        }
      } else {
        if (key >= 0 && leader) cnt[key] += __popc(peers);
        __syncwarp();
      }
    }
  }
  if constexpr (!kRank) {
    for (int e = lane; e < ncols; e += 32) hist_row[e] = cnt[e];
  }
}

__global__ void __launch_bounds__(kScanThreads)
    plan_scan_kernel(const __grid_constant__ PlanArgs a) {
  constexpr int kCols = detail::kMaxGroups + 1;
  constexpr int kPart = kScanThreads > kCols ? kScanThreads : kCols;
  __shared__ int32_t s_part[kPart];  // [S][E + 1]: segment partial sums, then exclusive prefixes
  __shared__ int32_t s_total[kCols];
  __shared__ int32_t s_off[kCols];
  using Scan = cub::BlockScan<int32_t, kScanThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;

  const int E = a.num_experts, ncols = E + 1, W = a.num_chunks;
  // Columns (experts) x segments of chunks: S * ncols <= max(1024, ncols) threads of work.
  const int S = max(1, min(W, kScanThreads / ncols));
  const int L = (W + S - 1) / S;
  const int work = S * ncols;

  // A: per (segment, column) sums, 8 loads in flight.
  for (int idx = threadIdx.x; idx < work; idx += kScanThreads) {
    const int c = idx % ncols, s = idx / ncols;
    const int w0 = s * L, w1 = min(W, w0 + L);
    int32_t sum = 0;
    for (int w = w0; w < w1; w += 8) {
      int32_t v[8];
#pragma unroll
      for (int u = 0; u < 8; ++u)
        v[u] = w + u < w1 ? a.hist[static_cast<int64_t>(w + u) * ncols + c] : 0;
#pragma unroll
      for (int u = 0; u < 8; ++u) sum += v[u];
    }
    s_part[idx] = sum;
  }
  __syncthreads();
  // B: exclusive prefix over segments per column; column totals.
  for (int c = threadIdx.x; c < ncols; c += kScanThreads) {
    int32_t run = 0;
    for (int s = 0; s < S; ++s) {
      const int32_t v = s_part[s * ncols + c];
      s_part[s * ncols + c] = run;
      run += v;
    }
    s_total[c] = run;
  }
  __syncthreads();
  // C: padded segment sizes -> offsets (E <= 1024: one expert per thread).
  const int e = threadIdx.x;
  const int32_t padded = e < E ? (s_total[e] + a.align - 1) & ~(a.align - 1) : 0;
  int32_t start = 0, m_pad = 0;
  Scan(scan_tmp).ExclusiveSum(padded, start, m_pad);
  if (e < E) {
    s_off[e] = start;
    a.tokens_per_expert[e] = s_total[e];
    if (a.offsets64)
      static_cast<int64_t*>(a.offsets)[e] = start;
    else
      static_cast<int32_t*>(a.offsets)[e] = start;
  }
  if (e == 0) {
    s_off[E] = m_pad;
    if (a.offsets64)
      static_cast<int64_t*>(a.offsets)[E] = m_pad;
    else
      static_cast<int32_t*>(a.offsets)[E] = m_pad;
    a.invalid[0] = s_total[E];
  }
  __syncthreads();
  // D: hist[w][c] <- first row of chunk w's pairs of expert c (offset + earlier chunks' pairs).
  for (int idx = threadIdx.x; idx < work; idx += kScanThreads) {
    const int c = idx % ncols, s = idx / ncols;
    const int w0 = s * L, w1 = min(W, w0 + L);
    int32_t run = s_part[idx] + (c < E ? s_off[c] : 0);
    for (int w = w0; w < w1; w += 8) {
      int32_t v[8];
#pragma unroll
      for (int u = 0; u < 8; ++u)
        v[u] = w + u < w1 ? a.hist[static_cast<int64_t>(w + u) * ncols + c] : 0;
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        if (w + u < w1) a.hist[static_cast<int64_t>(w + u) * ncols + c] = run;
        run += v[u];
      }
    }
  }
  // E: -1 into every pad row (each expert's tail, then everything past M_pad).
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int x = warp; x < E; x += kScanThreads / 32) {
    for (int r = s_off[x] + s_total[x] + lane; r < s_off[x + 1]; r += 32) a.src_slot[r] = -1;
  }
  for (int64_t r = m_pad + threadIdx.x; r < a.src_slot_len; r += kScanThreads) a.src_slot[r] = -1;
}

}  // namespace fp8flow::sm90::kernels
