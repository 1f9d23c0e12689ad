// The expert side's row map, shared by the CPU reference and the CUDA kernel (__host__
// __device__): which received row lands in permuted row r.
//
// Table (int64, built by make_dispatch_layout, E = local experts, N = ranks):
//   [0, E + 1)                       off[e]: padded segment starts; off[E] = M_pad
//   [E + 1, E + 1 + E (N + 1))       pre[e][s]: rows of expert e from sources < s (pre[e][N] =
//                                    rows received for e)
//   [E + 1 + E (N + 1), + E N)       start[e][s]: received row of the first row source s sent
//                                    for expert e (recv_offsets[s] + rows s sent for experts < e)
// Permuted row r: e = the segment holding r; i = r - off[e]; pad if i >= pre[e][N]; else s = the
// last source with pre[e][s] <= i (empty chunks skipped), received row start[e][s] + i - pre[e][s].
#pragma once

#include <cstdint>

#include "common/search.h"
#include "fp8flow/formats.h"  // FP8FLOW_HD

namespace fp8flow::detail {

struct DispatchTable {
  const int64_t* t = nullptr;
  int32_t experts = 0;  // E (local)
  int32_t ranks = 0;    // N

  FP8FLOW_HD const int64_t* off() const { return t; }
  FP8FLOW_HD const int64_t* pre(int32_t e) const { return t + (experts + 1) + e * (ranks + 1); }
  FP8FLOW_HD const int64_t* start(int32_t e) const {
    return t + (experts + 1) + experts * (ranks + 1) + e * ranks;
  }
};

constexpr int64_t dispatch_table_size(int64_t experts, int64_t ranks) {
  return (experts + 1) + experts * (ranks + 1) + experts * ranks;
}

// Received row landing in permuted row r in [0, off[E]), or -1 for a pad row.
FP8FLOW_HD int64_t dispatch_recv_row(const DispatchTable& tb, int64_t r) {
  const int32_t e = last_le(tb.off(), tb.experts + 1, r);
  const int64_t i = r - tb.off()[e];
  const int64_t* pre = tb.pre(e);
  if (e >= tb.experts || i >= pre[tb.ranks]) return -1;
  const int32_t s = last_le(pre, tb.ranks + 1, i);
  return tb.start(e)[s] + (i - pre[s]);
}

}  // namespace fp8flow::detail
