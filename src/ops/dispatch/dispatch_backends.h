// Internal: the two backends of the dispatch ops (pack, unpack, row maps). Arguments are validated
// by dispatch.cpp before either backend runs.
#pragma once

#include <cstdint>

#include <memory>
#include <vector>

#include "fp8flow/dispatch.h"
#include "fp8flow/formats.h"  // FP8FLOW_HD

namespace fp8flow::detail {

enum class WireScale : int { None = 0, Col = 1, Row = 2 };

// FP8 rows' 1x128 scales travel as E8M0 codes (one byte per tile instead of an F32): every scale
// fp8flow writes is a power of two in [2^-127, 2^127], which E8M0 holds exactly (code = the F32
// exponent field; 2^-127, an F32 subnormal, is code 0). Any other F32 (not a power of two, zero,
// negative, Inf, NaN) becomes the NaN code and arrives as NaN: loud, never a silently different
// scale. The decode gives back the exact F32 bits of every power of two.
FP8FLOW_HD uint8_t wire_scale_code(uint32_t bits) {
  if (bits == 0x00400000u) return 0;  // 2^-127
  const uint32_t field = bits >> 23;  // sign 0 required
  return (bits & 0x7FFFFFu) == 0 && field >= 1 && field <= 254 ? static_cast<uint8_t>(field)
                                                               : fmt::kE8M0NaN;
}
FP8FLOW_HD uint32_t wire_scale_bits(uint8_t code) {
  if (code == fmt::kE8M0NaN) return 0x7FC00000u;
  return code == 0 ? 0x00400000u : static_cast<uint32_t>(code) << 23;
}
// Four tiles' codes in one record word (tile 4 w + i in byte i), and back.
FP8FLOW_HD uint32_t wire_scale_word(const uint32_t (&bits)[4], int n) {
  uint32_t w = 0;
  for (int i = 0; i < 4; ++i)
    if (i < n) w |= static_cast<uint32_t>(wire_scale_code(bits[i])) << (8 * i);
  return w;
}

// Chunk filter of the pipelined dispatch / combine (DispatchOptions::chunks): records are grouped
// in `segments` peer segments (seg: prefix offsets, seg[segments] = the total), and chunk c of a
// segment of n records is its rows [n c / C, n (c + 1) / C) (floor). With chunks <= 1 every record
// passes. The segments fit the kernel parameters (more ranks than kMaxChunkSegments: no chunking).
constexpr int kMaxChunkSegments = 256;
struct ChunkFilter {
  int32_t chunks = 1;
  int32_t chunk = 0;
  int32_t segments = 0;
  int32_t seg[kMaxChunkSegments + 1] = {};
};

// First row of chunk c of a segment of n rows (C chunks).
FP8FLOW_HD int64_t chunk_begin(int64_t n, int64_t c, int64_t C) {
  return n * c / C;
}

// Whether record q (an index into the segmented record range) belongs to the filter's chunk.
// Records outside [0, total) (unpack: pad rows, invalid map entries) belong to chunk 0.
FP8FLOW_HD bool in_chunk(const ChunkFilter& f, int64_t q) {
  if (f.chunks <= 1) return true;
  if (q < 0 || q >= f.seg[f.segments]) return f.chunk == 0;
  int lo = 0, hi = f.segments - 1;  // the last s with seg[s] <= q
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (f.seg[mid] <= q)
      lo = mid;
    else
      hi = mid - 1;
  }
  const int64_t n = f.seg[lo + 1] - f.seg[lo], i = q - f.seg[lo];
  // i in [n c / C, n (c + 1) / C)  <=>  c = floor(((i + 1) C - 1) / n)
  return ((i + 1) * f.chunks - 1) / n == f.chunk;
}

// build_dedup_plan: the token and slot words of a dedup plan from the routing, the way
// make_dedup_plan makes them on the host. table: base[E] (first row of this rank's pairs of
// expert e on e's rank minus the source plan's offset of e: slot = base[e] + dest_row), then
// send_offsets[N] and send_end[N] (records [send_offsets[r], send_end[r]) go to rank r).
// plan: token[send_total], then slots[send_total][k]. Entries outside [0, E) are skipped, and
// records past send_end[r] are not written (the host sizes come from all_tokens).
constexpr int kMaxBuildRanks = kDedupBuildMaxRanks;  // ranks per destination mask (one word)
// First permuted row of this rank's pairs for every global expert e, on e's rank [E] (the padded
// segment start of e's local expert there plus the pairs of lower source ranks; dispatch.h:
// segments are source-rank major; pairs of one (source, expert) follow in flat t k + j order).
std::vector<int64_t> dedup_first_rows(const DispatchLayout& layout);
struct DedupBuildArgs {
  const int32_t* idx = nullptr;       // [T][k]
  const int32_t* dest_row = nullptr;  // [T][k]: the source plan (make_permutation, align 1)
  const int32_t* table = nullptr;     // base[E], send_offsets[N], send_end[N]
  int32_t tokens = 0, k = 1, ranks = 1, local_experts = 1, experts = 1;
  int32_t send_total = 0;
  int32_t* plan = nullptr;
};

// One pack or unpack: rows <-> records. "rows" are the token-order or permuted tensors; the map
// is applied on the gathering side (pack: record i <- row map[i] / k; unpack: row r <- record
// map[r], identity when map is null).
struct WireArgs {
  uint8_t* rows_data = nullptr;  // [rows][D] bytes (null: prob-only)
  int64_t rows = 0;              // rows of the row tensor (FP8 scale leading dimension)
  int64_t data_bytes = 0;        // D
  WireScale scale = WireScale::None;
  void* rows_scale = nullptr;  // Col: F32 [tiles][rows]; Row: bytes [rows][scale_bytes]
  int64_t scale_bytes = 0;     // S (Col: tiles E8M0 codes, padded to 4 bytes)
  int64_t tiles = 0;           // Col: 128-column tiles of a row
  float* prob = nullptr;       // pack: flat, indexed by map entry; unpack: [out rows]
  int64_t prob_len = 0;        // pack: entries of prob
  int64_t prob_offset = -1;    // in the record; -1: none
  uint8_t* wire = nullptr;
  int64_t wire_rows = 0;  // pack: records written; unpack: records available
  int64_t row_bytes = 0;  // record size
  const int32_t* map = nullptr;
  int64_t map_rows = 0;  // unpack: out rows R (map entries read); pack: = wire_rows
  int32_t k = 1;         // pack only
  // In-place dispatch (DispatchOptions::in_place): the data part travels apart from the record.
  // Records are then [scales][prob] only (row_bytes = S (+ 4), scales at record offset 0,
  // prob_offset = S). Pack writes record i's data to data_wire + i * data_bytes (send order, so a
  // (peer, expert) block is contiguous); unpack leaves the data of received rows alone (it
  // arrived in its permuted row) and writes only the pad rows' zero data.
  bool data_apart = false;
  uint8_t* data_wire = nullptr;  // pack with data_apart: [wire_rows][data_bytes]
  FP8FLOW_HD int64_t rec_data() const { return data_apart ? 0 : data_bytes; }
  // Pack: only records i in the chunk are written (others untouched); unpack: only rows r whose
  // record map[r] is in the chunk (pad rows: chunk 0).
  ChunkFilter filter;
  // Dedup records (dispatch_dedup): after the scales, slot_k slots of 8 bytes, (I32 destination
  // row, F32 prob). Pack: slot j of record i is (slots[i slot_k + j], prob[map[i] slot_k + j]),
  // prob 0 where the row is -1 (or without prob); the scatter reads them on the receiving side.
  const int32_t* slots = nullptr;
  int32_t slot_k = 0;
  FP8FLOW_HD int64_t slot_offset() const { return rec_data() + scale_bytes; }
  // Unpack: the received rows' data is already in place (dispatch_dedup_expand wrote it); only the
  // pad rows' zero data is written (records keep their data at offset 0, unlike data_apart).
  bool data_done = false;
};

}  // namespace fp8flow::detail

namespace fp8flow::ref {
void dispatch_pack(const detail::WireArgs& a);
void dispatch_unpack(const detail::WireArgs& a);
// Dedup expansion: map[0, map_len) = -1 and prob[0, map_len) = 0 (prob may be null), then for
// every slot (row, p) of received records q in [0, a.wire_rows) with row in [0, map_len):
// map[row] = q, prob[row] = p, and row `row` of a.rows_data gets record q's data (a.data_bytes).
// A valid plan gives every real row exactly one slot; the pad rows stay for the unpack
// (WireArgs::data_done), which also writes every row's scales.
void dispatch_dedup_expand(const detail::WireArgs& a, int32_t* map, int64_t map_len, float* prob);
void dispatch_maps(const DispatchLayout& l, int32_t* perm_to_recv, int64_t perm_len,
                   int32_t* recv_to_perm);
void dispatch_dedup_build(const detail::DedupBuildArgs& a);
}  // namespace fp8flow::ref

namespace fp8flow::sm90 {
void dispatch_pack(const detail::WireArgs& a, Stream stream);
void dispatch_unpack(const detail::WireArgs& a, Stream stream);
void dispatch_dedup_expand(const detail::WireArgs& a, int32_t* map, int64_t map_len, float* prob,
                           Stream stream);
// Host-to-device copy of the plan's token [send_total] and slot [send_total][k][2] arrays to dst.
void dispatch_dedup_upload(const DedupPlan& plan, int32_t* dst, Stream stream);
// build_dedup_plan: copies the host table (E + 2N words) to table_dev, then one single-CTA kernel.
void dispatch_dedup_build(const detail::DedupBuildArgs& a, const std::vector<int32_t>& table,
                          int32_t* table_dev, Stream stream);
void dispatch_maps(const DispatchLayout& l, int64_t* table_dev, int32_t* perm_to_recv,
                   int64_t perm_len, int32_t* recv_to_perm, Stream stream);

// Pipeline resources of one communicator: a non-blocking, highest-priority side stream on the
// current device and per-chunk events (grown on demand), released with the returned pointer.
std::shared_ptr<void> pipe_create();
Stream pipe_side(void* state);
// Records event `which` (0: packed, 1: arrived) of chunk c on `from`; makes `to` wait for it.
void pipe_record(void* state, int which, int c, Stream from);
void pipe_wait(void* state, int which, int c, Stream to);
}  // namespace fp8flow::sm90
