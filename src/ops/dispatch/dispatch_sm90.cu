// sm_90a backend of the dispatch ops: pack (rows -> wire records, a gather), unpack (records ->
// permuted rows, pad rows written), and the row maps.
//
// Pack / unpack: one CTA (256 threads) per 32 records / rows. The 32 row indices are resolved
// once into shared memory; then the CTA streams the rows' data as 16-byte vectors (4 in flight per
// thread, loads issued before stores), then the record tails (scales, prob, zero pad) as 4-byte
// words. FP8 column scales ([tiles][rows], rows contiguous) are read (pack) / written (unpack) with
// consecutive threads on consecutive rows of one tile, so the permuted side's scale writes are
// coalesced; the record side is row-contiguous.
// Napkin math (FP8 + prob, 32768 records, H = 7168, record 7408 B): pack reads 7168 + 224 + 4 B per
// row (gathered; X fits L2 at T = 4096) and writes 7408 B: ~485 MB moved, ~0.2 ms at 2.5 TB/s;
// unpack the same plus ~240 pad rows. BF16 (14352 B records) twice that, MXFP4 (3824 B) half.
// Bench: `fp8flow-bench comm` (dispatch rows, "pack"/"unpack" columns).
#include <cuda_runtime.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "common/cuda_check.h"
#include "fp8flow/formats.h"
#include "ops/dispatch/dispatch_backends.h"
#include "ops/dispatch/dispatch_map.h"

namespace fp8flow::sm90 {
namespace {

using detail::WireArgs;
using detail::WireScale;

constexpr int kThreads = 256;
constexpr int kRowsPerCta = 32;
constexpr int kUnroll = 4;

cudaStream_t cu(Stream s) {
  return reinterpret_cast<cudaStream_t>(s);
}

// NOTES: row indices of the CTA's 32 rows are resolved once (map reads are scattered int32 loads)
// so the data loop is pure address arithmetic; divisions by the chunk count per row use the
// hardware integer path (a few instructions, far below the memory time of a 16-byte access).
__global__ void __launch_bounds__(kThreads) pack_kernel(const __grid_constant__ WireArgs a) {
  __shared__ int32_t s_row[kRowsPerCta];  // source row, -1: zero record
  __shared__ int32_t s_map[kRowsPerCta];  // map entry (prob index), -1: none
  __shared__ int32_t s_idx[kRowsPerCta];  // record (offset from r0) of compacted row j
  __shared__ int s_n;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kRowsPerCta;
  const int n_all =
      static_cast<int>(a.wire_rows - r0 < kRowsPerCta ? a.wire_rows - r0 : kRowsPerCta);
  const int tid = threadIdx.x;
  if (tid < kRowsPerCta) {  // warp 0: the records of this CTA in the chunk, compacted
    const bool take = tid < n_all && detail::in_chunk(a.filter, r0 + tid);
    const unsigned mask = __ballot_sync(0xffffffffu, take);
    if (take) {
      const int j = __popc(mask & ((1u << tid) - 1u));
      const int32_t m = a.map[r0 + tid];
      const int64_t limit = a.rows_data ? a.rows * a.k : a.prob_len;
      const bool valid = m >= 0 && m < limit;
      s_row[j] = valid ? m / a.k : -1;
      s_map[j] = valid ? m : -1;
      s_idx[j] = tid;
    }
    if (tid == 0) s_n = __popc(mask);
  }
  __syncthreads();
  const int n = s_n;
  if (n == 0) return;

  const int64_t cpr = a.data_bytes / 16;  // 16-byte chunks per row
  const int64_t chunks = n * cpr;
  for (int64_t c0 = tid; c0 < chunks; c0 += static_cast<int64_t>(kThreads) * kUnroll) {
    uint4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t c = c0 + static_cast<int64_t>(u) * kThreads;
      v[u] = make_uint4(0, 0, 0, 0);
      if (c < chunks) {
        const int row = static_cast<int>(c / cpr);
        const int64_t col = c - row * cpr;
        const int32_t src = s_row[row];
        if (src >= 0)
          v[u] = __ldg(reinterpret_cast<const uint4*>(a.rows_data + src * a.data_bytes) + col);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t c = c0 + static_cast<int64_t>(u) * kThreads;
      if (c < chunks) {
        const int row = static_cast<int>(c / cpr);
        const int64_t col = c - row * cpr;
        uint8_t* dst = a.data_apart ? a.data_wire + (r0 + s_idx[row]) * a.data_bytes
                                    : a.wire + (r0 + s_idx[row]) * a.row_bytes;
        reinterpret_cast<uint4*>(dst)[col] = v[u];
      }
    }
  }

  // Record tails: scales, prob, zero pad, as 4-byte words.
  const int64_t rec_data = a.rec_data();
  const int64_t tail_words = (a.row_bytes - rec_data) / 4;
  const int64_t scale_words = a.scale_bytes / 4;
  const int64_t prob_word = a.prob_offset >= 0 ? (a.prob_offset - rec_data) / 4 : -1;
  const int64_t words = n * tail_words;
  for (int64_t c = tid; c < words; c += kThreads) {
    // Column scales: consecutive threads take consecutive rows of one word (tile).
    const int row = static_cast<int>(c % n);
    const int64_t w = c / n;
    const int32_t src = s_row[row];
    uint32_t val = 0;
    if (w < scale_words) {
      if (src >= 0) {
        if (a.scale == WireScale::Col) {  // tiles 4 w .. 4 w + 3 as E8M0 codes
          const uint32_t* sc = static_cast<const uint32_t*>(a.rows_scale) + 4 * w * a.rows + src;
          const int nt = static_cast<int>(a.tiles - 4 * w < 4 ? a.tiles - 4 * w : 4);
          uint32_t b[4];
#pragma unroll
          for (int i = 0; i < 4; ++i) b[i] = i < nt ? __ldg(sc + i * a.rows) : 0u;
          val = detail::wire_scale_word(b, nt);
        } else
          val = __ldg(reinterpret_cast<const uint32_t*>(static_cast<const uint8_t*>(a.rows_scale) +
                                                        src * a.scale_bytes) +
                      w);
      }
    } else if (w == prob_word) {
      const int32_t m = s_map[row];
      if (m >= 0 && m < a.prob_len) val = __float_as_uint(__ldg(a.prob + m));
    } else if (w - scale_words < 2 * static_cast<int64_t>(a.slot_k)) {
      // Dedup slots (prob_word is -1 then): (destination row, prob of pair token k + j).
      const int64_t sw = w - scale_words, j = sw / 2;
      const int32_t dest = __ldg(a.slots + (r0 + s_idx[row]) * a.slot_k + j);
      const int64_t pair = static_cast<int64_t>(s_map[row]) * a.slot_k + j;
      if ((sw & 1) == 0)
        val = static_cast<uint32_t>(dest);
      else if (a.prob && dest >= 0 && s_map[row] >= 0 && pair < a.prob_len)
        val = __float_as_uint(__ldg(a.prob + pair));
    }
    reinterpret_cast<uint32_t*>(a.wire + (r0 + s_idx[row]) * a.row_bytes + rec_data)[w] = val;
  }
}

// NOTES: with data_apart (in-place dispatch) the data loop runs over the pad rows only (a second
// compaction), so a CTA of received rows moves just the scales and probs.
__global__ void __launch_bounds__(kThreads) unpack_kernel(const __grid_constant__ WireArgs a) {
  __shared__ int32_t s_rec[kRowsPerCta];   // record of compacted row j, -1: pad row
  __shared__ int32_t s_out[kRowsPerCta];   // out row (offset from r0) of compacted row j
  __shared__ int32_t s_drec[kRowsPerCta];  // the same for the rows whose data this CTA writes
  __shared__ int32_t s_dout[kRowsPerCta];
  __shared__ int s_n, s_nd;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kRowsPerCta;
  const int n_all = static_cast<int>(a.map_rows - r0 < kRowsPerCta ? a.map_rows - r0 : kRowsPerCta);
  const int tid = threadIdx.x;
  if (tid < kRowsPerCta) {  // warp 0: the rows of this CTA whose record is in the chunk
    int64_t q = -1;
    if (tid < n_all) {
      q = a.map ? a.map[r0 + tid] : r0 + tid;
      if (q < 0 || q >= a.wire_rows) q = -1;
    }
    const bool take = tid < n_all && detail::in_chunk(a.filter, q);
    const unsigned mask = __ballot_sync(0xffffffffu, take);
    if (take) {
      const int j = __popc(mask & ((1u << tid) - 1u));
      s_rec[j] = static_cast<int32_t>(q);
      s_out[j] = tid;
    }
    const bool dtake = take && (!(a.data_apart || a.data_done) || q < 0);
    const unsigned dmask = __ballot_sync(0xffffffffu, dtake);
    if (dtake) {
      const int j = __popc(dmask & ((1u << tid) - 1u));
      s_drec[j] = static_cast<int32_t>(q);
      s_dout[j] = tid;
    }
    if (tid == 0) {
      s_n = __popc(mask);
      s_nd = __popc(dmask);
    }
  }
  __syncthreads();
  const int n = s_n;
  if (n == 0) return;

  const int64_t cpr = a.data_bytes / 16;
  const int64_t chunks = s_nd * cpr;
  for (int64_t c0 = tid; c0 < chunks; c0 += static_cast<int64_t>(kThreads) * kUnroll) {
    uint4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t c = c0 + static_cast<int64_t>(u) * kThreads;
      v[u] = make_uint4(0, 0, 0, 0);
      if (c < chunks) {
        const int row = static_cast<int>(c / cpr);
        const int64_t col = c - row * cpr;
        const int32_t q = s_drec[row];
        if (q >= 0) v[u] = __ldg(reinterpret_cast<const uint4*>(a.wire + q * a.row_bytes) + col);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t c = c0 + static_cast<int64_t>(u) * kThreads;
      if (c < chunks) {
        const int row = static_cast<int>(c / cpr);
        const int64_t col = c - row * cpr;
        reinterpret_cast<uint4*>(a.rows_data + (r0 + s_dout[row]) * a.data_bytes)[col] = v[u];
      }
    }
  }

  const int64_t scale_words = a.scale_bytes / 4;
  const int64_t rec_data = a.rec_data();
  if (a.scale == WireScale::Col) {
    const uint32_t pad = __float_as_uint(fmt::exp2i(fmt::kMinScaleExp));  // 2^-127
    float* out = static_cast<float*>(a.rows_scale);
    for (int64_t c = tid; c < n * scale_words; c += kThreads) {
      const int row = static_cast<int>(c % n);
      const int64_t w = c / n;
      const int32_t q = s_rec[row];
      const uint32_t codes =
          q >= 0 ? __ldg(reinterpret_cast<const uint32_t*>(a.wire + q * a.row_bytes + rec_data) + w)
                 : 0u;
      const int nt = static_cast<int>(a.tiles - 4 * w < 4 ? a.tiles - 4 * w : 4);
      uint32_t* o = reinterpret_cast<uint32_t*>(out) + 4 * w * a.rows + r0 + s_out[row];
#pragma unroll
      for (int i = 0; i < 4; ++i)
        if (i < nt)
          o[i * a.rows] =
              q >= 0 ? detail::wire_scale_bits(static_cast<uint8_t>(codes >> (8 * i))) : pad;
    }
  } else if (a.scale == WireScale::Row) {
    uint8_t* out = static_cast<uint8_t*>(a.rows_scale);
    for (int64_t c = tid; c < n * scale_words; c += kThreads) {
      const int row = static_cast<int>(c / scale_words);
      const int64_t w = c - row * scale_words;
      const int32_t q = s_rec[row];
      const uint32_t val =
          q >= 0 ? __ldg(reinterpret_cast<const uint32_t*>(a.wire + q * a.row_bytes + rec_data) + w)
                 : 0u;
      reinterpret_cast<uint32_t*>(out + (r0 + s_out[row]) * a.scale_bytes)[w] = val;
    }
  }
  if (a.prob_offset >= 0 && tid < n) {
    const int32_t q = s_rec[tid];
    a.prob[r0 + s_out[tid]] =
        q >= 0 ? __ldg(reinterpret_cast<const float*>(a.wire + q * a.row_bytes + a.prob_offset))
               : 0.0f;
  }
}

// Dedup expansion (after map = -1, prob = 0): one warp per received record, 32 slots at a time.
// Lane j reads slot j (row, prob) and writes map / prob; then the warp reads the record's data
// once (4 x 16 B per lane in flight) and stores it to every valid slot's row. NOTES: the unpack
// that followed a plain slot scatter re-read a record once per row it fills (~2.2 rows per record
// at dsv3 EP4 sizes); reading it once here saves that much of the receive buffer's traffic.
constexpr int kExpandThreads = 256;
__global__ void __launch_bounds__(kExpandThreads)
    dedup_expand_kernel(const __grid_constant__ WireArgs a, int32_t* map, int64_t map_len,
                        float* prob) {
  const int lane = static_cast<int>(threadIdx.x & 31u);
  constexpr int kWarps = kExpandThreads / 32;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kWarps;
  const int64_t cpr = a.rows_data ? a.data_bytes / 16 : 0;  // 16-byte chunks of the data
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); q < a.wire_rows;
       q += step) {
    const uint8_t* rec = a.wire + q * a.row_bytes;
    for (int32_t j0 = 0; j0 < a.slot_k; j0 += 32) {
      int32_t row = -1;
      if (j0 + lane < a.slot_k) {
        const auto* sl = reinterpret_cast<const uint32_t*>(rec + a.slot_offset() + 8 * (j0 + lane));
        row = static_cast<int32_t>(__ldg(sl));
        if (row >= 0 && row < map_len) {
          map[row] = static_cast<int32_t>(q);
          if (prob) prob[row] = __uint_as_float(__ldg(sl + 1));
        } else {
          row = -1;
        }
      }
      const unsigned valid = __ballot_sync(0xFFFFFFFFu, row >= 0);
      if (valid == 0 || cpr == 0) continue;
      const uint4* src = reinterpret_cast<const uint4*>(rec);
      for (int64_t base = 0; base < cpr; base += 32 * 4) {  // warp-uniform trip count (shuffles)
        const int64_t c0 = base + lane;
        uint4 v[4];
#pragma unroll
        for (int u = 0; u < 4; ++u)
          if (c0 + 32 * u < cpr) v[u] = __ldg(src + c0 + 32 * u);
        for (unsigned m = valid; m != 0; m &= m - 1) {
          const int32_t r = __shfl_sync(0xFFFFFFFFu, row, __ffs(m) - 1);
          uint4* dst = reinterpret_cast<uint4*>(a.rows_data + r * a.data_bytes);
#pragma unroll
          for (int u = 0; u < 4; ++u)
            if (c0 + 32 * u < cpr) dst[c0 + 32 * u] = v[u];
        }
      }
    }
  }
}

// build_dedup_plan in one CTA: thread th owns a contiguous range of tokens. (1) tokens per
// destination rank in its range (a column of s_cnt), (2) per rank, an exclusive scan of the
// columns from send_offsets[r] (thread r), (3) each thread walks its tokens again, opening one
// record per (token, destination rank) at its column's running index and writing the pairs'
// rows. Records per rank come out in token order, as make_dedup_plan's; integer work only, no
// atomics. NOTES: one CTA is enough at the sizes a layer sees (T 4096 x k 8: 16 tokens a thread);
// the host version took 0.1-0.4 ms between the step's host sync and the dispatch.
constexpr int kBuildThreads = 256;
__global__ void __launch_bounds__(kBuildThreads)
    dedup_build_kernel(const __grid_constant__ detail::DedupBuildArgs a) {
  __shared__ int32_t s_cnt[detail::kMaxBuildRanks][kBuildThreads];
  const int th = static_cast<int>(threadIdx.x), N = a.ranks, k = a.k;
  const int per = (a.tokens + kBuildThreads - 1) / kBuildThreads;
  const int t0 = min(th * per, a.tokens), t1 = min(t0 + per, a.tokens);
  const int32_t *base = a.table, *soff = a.table + a.experts, *send = soff + N;
  auto mask_of = [&](int t) {
    uint32_t m = 0;
    for (int j = 0; j < k; ++j) {
      const int32_t e = a.idx[t * k + j];
      if (e >= 0 && e < a.experts) m |= 1u << (e / a.local_experts);
    }
    return m;
  };
  for (int r = 0; r < N; ++r) s_cnt[r][th] = 0;
  for (int t = t0; t < t1; ++t)
    for (uint32_t m = mask_of(t); m != 0u; m &= m - 1) ++s_cnt[__ffs(m) - 1][th];
  __syncthreads();
  if (th < N) {
    int32_t run = soff[th];
    for (int i = 0; i < kBuildThreads; ++i) {
      const int32_t v = s_cnt[th][i];
      s_cnt[th][i] = run;
      run += v;
    }
  }
  __syncthreads();
  int32_t* token = a.plan;
  int32_t* slots = a.plan + a.send_total;
  for (int t = t0; t < t1; ++t) {
    for (uint32_t m = mask_of(t); m != 0u; m &= m - 1) {
      const int r = __ffs(m) - 1;
      const int32_t q = s_cnt[r][th]++;
      if (q >= send[r]) continue;
      token[q] = t;
      for (int j = 0; j < k; ++j) slots[static_cast<int64_t>(q) * k + j] = -1;
    }
    for (int j = 0; j < k; ++j) {
      const int32_t e = a.idx[t * k + j];
      if (e < 0 || e >= a.experts) continue;
      const int r = e / a.local_experts;
      const int32_t q = s_cnt[r][th] - 1;  // this token's record to rank r
      if (q < send[r]) slots[static_cast<int64_t>(q) * k + j] = base[e] + a.dest_row[t * k + j];
    }
  }
}

__global__ void maps_kernel(const int64_t* table, int32_t experts, int32_t ranks,
                            int64_t padded_rows, int32_t* perm_to_recv, int64_t perm_len,
                            int32_t* recv_to_perm) {
  const detail::DispatchTable tb{table, experts, ranks};
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < perm_len;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t q = r < padded_rows ? detail::dispatch_recv_row(tb, r) : -1;
    perm_to_recv[r] = static_cast<int32_t>(q);
    if (q >= 0) recv_to_perm[q] = static_cast<int32_t>(r);
  }
}

int grid_for(int64_t rows) {
  return static_cast<int>((rows + kRowsPerCta - 1) / kRowsPerCta);
}

}  // namespace

void dispatch_pack(const WireArgs& a, Stream stream) {
  if (a.wire_rows == 0) return;
  pack_kernel<<<grid_for(a.wire_rows), kThreads, 0, cu(stream)>>>(a);
  FP8FLOW_CUDA_CHECK_LAUNCH("dispatch_pack");
}

void dispatch_unpack(const WireArgs& a, Stream stream) {
  if (a.map_rows == 0) return;
  unpack_kernel<<<grid_for(a.map_rows), kThreads, 0, cu(stream)>>>(a);
  FP8FLOW_CUDA_CHECK_LAUNCH("dispatch_unpack");
}

void dispatch_dedup_expand(const WireArgs& a, int32_t* map, int64_t map_len, float* prob,
                           Stream stream) {
  if (map_len == 0) return;
  FP8FLOW_CUDA_CHECK("dispatch_dedup",
                     cudaMemsetAsync(map, 0xFF, map_len * sizeof(int32_t), cu(stream)));
  if (prob)
    FP8FLOW_CUDA_CHECK("dispatch_dedup",
                       cudaMemsetAsync(prob, 0, map_len * sizeof(float), cu(stream)));
  if (a.wire_rows == 0 || a.slot_k == 0) return;
  constexpr int kWarps = kExpandThreads / 32;
  const int blocks = static_cast<int>(std::min<int64_t>((a.wire_rows + kWarps - 1) / kWarps, 4096));
  dedup_expand_kernel<<<blocks, kExpandThreads, 0, cu(stream)>>>(a, map, map_len, prob);
  FP8FLOW_CUDA_CHECK_LAUNCH("dispatch_dedup");
}

void dispatch_dedup_upload(const DedupPlan& plan, int32_t* dst, Stream stream) {
  // NOTES: pageable-memory async copies are staged before the call returns (as dispatch_maps'
  // table), so the plan may die right after; ~70 B per record (k = 8).
  FP8FLOW_CUDA_CHECK("dispatch_dedup",
                     cudaMemcpyAsync(dst, plan.token.data(), plan.token.size() * sizeof(int32_t),
                                     cudaMemcpyHostToDevice, cu(stream)));
  FP8FLOW_CUDA_CHECK("dispatch_dedup", cudaMemcpyAsync(dst + plan.token.size(), plan.slots.data(),
                                                       plan.slots.size() * sizeof(int32_t),
                                                       cudaMemcpyHostToDevice, cu(stream)));
}

void dispatch_dedup_build(const detail::DedupBuildArgs& a, const std::vector<int32_t>& table,
                          int32_t* table_dev, Stream stream) {
  // NOTES: a pageable-memory async copy is staged before the call returns (as dispatch_maps'
  // table); E + 2N words.
  FP8FLOW_CUDA_CHECK("build_dedup_plan",
                     cudaMemcpyAsync(table_dev, table.data(), table.size() * sizeof(int32_t),
                                     cudaMemcpyHostToDevice, cu(stream)));
  if (a.tokens == 0 || a.send_total == 0) return;
  dedup_build_kernel<<<1, kBuildThreads, 0, cu(stream)>>>(a);
  FP8FLOW_CUDA_CHECK_LAUNCH("build_dedup_plan");
}

void dispatch_maps(const DispatchLayout& l, int64_t* table_dev, int32_t* perm_to_recv,
                   int64_t perm_len, int32_t* recv_to_perm, Stream stream) {
  // NOTES: a pageable-memory async copy is staged by the driver before this call returns, so the
  // layout's vector may die right after; the table is a few KB.
  FP8FLOW_CUDA_CHECK("make_dispatch_maps",
                     cudaMemcpyAsync(table_dev, l.table.data(), l.table.size() * sizeof(int64_t),
                                     cudaMemcpyHostToDevice, cu(stream)));
  if (perm_len == 0) return;
  const int blocks = static_cast<int>(std::min<int64_t>((perm_len + 255) / 256, 4096));
  maps_kernel<<<blocks, 256, 0, cu(stream)>>>(table_dev, static_cast<int32_t>(l.local_experts),
                                              static_cast<int32_t>(l.ranks), l.padded_rows,
                                              perm_to_recv, perm_len, recv_to_perm);
  FP8FLOW_CUDA_CHECK_LAUNCH("make_dispatch_maps");
}

namespace {

struct PipeState {
  cudaStream_t side = nullptr;
  std::vector<cudaEvent_t> ev[2];  // [packed, arrived][chunk]
  ~PipeState() {
    for (auto& v : ev)
      for (cudaEvent_t e : v) cudaEventDestroy(e);
    if (side) cudaStreamDestroy(side);
  }
  cudaEvent_t event(int which, int c) {
    auto& v = ev[which];
    while (static_cast<int>(v.size()) <= c) {
      cudaEvent_t e = nullptr;
      FP8FLOW_CUDA_CHECK("dispatch (pipeline)",
                         cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
      v.push_back(e);
    }
    return v[static_cast<size_t>(c)];
  }
};

}  // namespace

// NOTES: the side stream carries the all-to-alls; it is non-blocking (no implicit sync with the
// legacy default stream a caller may pass) and of the highest priority, so the NCCL kernels get
// SMs ahead of queued pack/unpack CTAs. One event per chunk and direction: each is recorded once
// per call and waited on right after, so reuse across calls is safe.
std::shared_ptr<void> pipe_create() {
  auto st = std::make_shared<PipeState>();
  int lo = 0, hi = 0;
  FP8FLOW_CUDA_CHECK("dispatch (pipeline)", cudaDeviceGetStreamPriorityRange(&lo, &hi));
  FP8FLOW_CUDA_CHECK("dispatch (pipeline)",
                     cudaStreamCreateWithPriority(&st->side, cudaStreamNonBlocking, hi));
  return st;
}

Stream pipe_side(void* state) {
  return static_cast<PipeState*>(state)->side;
}

void pipe_record(void* state, int which, int c, Stream from) {
  auto* st = static_cast<PipeState*>(state);
  FP8FLOW_CUDA_CHECK("dispatch (pipeline)", cudaEventRecord(st->event(which, c), cu(from)));
}

void pipe_wait(void* state, int which, int c, Stream to) {
  auto* st = static_cast<PipeState*>(state);
  FP8FLOW_CUDA_CHECK("dispatch (pipeline)", cudaStreamWaitEvent(cu(to), st->event(which, c), 0));
}

}  // namespace fp8flow::sm90
