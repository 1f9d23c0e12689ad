// Internal: the two backends of the dispatch ops (pack, unpack, row maps). Arguments are validated
// by dispatch.cpp before either backend runs.
#pragma once

#include <cstdint>

#include "fp8flow/dispatch.h"

namespace fp8flow::detail {

enum class WireScale : int { None = 0, Col = 1, Row = 2 };

// One pack or unpack: rows <-> records. "rows" are the token-order or permuted tensors; the map
// is applied on the gathering side (pack: record i <- row map[i] / k; unpack: row r <- record
// map[r], identity when map is null).
struct WireArgs {
  uint8_t* rows_data = nullptr;  // [rows][D] bytes (null: prob-only)
  int64_t rows = 0;              // rows of the row tensor (FP8 scale leading dimension)
  int64_t data_bytes = 0;        // D
  WireScale scale = WireScale::None;
  void* rows_scale = nullptr;  // Col: F32 [tiles][rows]; Row: bytes [rows][scale_bytes]
  int64_t scale_bytes = 0;     // S (Col: 4 * tiles)
  float* prob = nullptr;       // pack: flat, indexed by map entry; unpack: [out rows]
  int64_t prob_len = 0;        // pack: entries of prob
  int64_t prob_offset = -1;    // in the record; -1: none
  uint8_t* wire = nullptr;
  int64_t wire_rows = 0;  // pack: records written; unpack: records available
  int64_t row_bytes = 0;  // record size
  const int32_t* map = nullptr;
  int64_t map_rows = 0;  // unpack: out rows R (map entries read); pack: = wire_rows
  int32_t k = 1;         // pack only
};

}  // namespace fp8flow::detail

namespace fp8flow::ref {
void dispatch_pack(const detail::WireArgs& a);
void dispatch_unpack(const detail::WireArgs& a);
void dispatch_maps(const DispatchLayout& l, int32_t* perm_to_recv, int64_t perm_len,
                   int32_t* recv_to_perm);
}  // namespace fp8flow::ref

namespace fp8flow::sm90 {
void dispatch_pack(const detail::WireArgs& a, Stream stream);
void dispatch_unpack(const detail::WireArgs& a, Stream stream);
void dispatch_maps(const DispatchLayout& l, int64_t* table_dev, int32_t* perm_to_recv,
                   int64_t perm_len, int32_t* recv_to_perm, Stream stream);
}  // namespace fp8flow::sm90
