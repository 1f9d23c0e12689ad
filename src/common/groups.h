// Column groups (tokens per expert) as prefix sums, the form both backends index with. Built on the
// host from ScaledTensor::col_groups; passed to kernels by value.
#pragma once

#include <cstdint>
#include <span>

#include "common/check.h"
#include "fp8flow/formats.h"

namespace fp8flow::detail {

struct GroupTiles {
  int32_t num_groups = 1;
  int32_t total_tiles = 0;
  int32_t col_start[kMaxGroups + 1];   // first column of group g; col_start[num_groups] = cols
  int32_t tile_start[kMaxGroups + 1];  // first 128-tile of group g; tile_start[num_groups] = tiles

  // Group of 128-tile `tile` (binary search; tile < total_tiles).
  FP8FLOW_HD int group_of_tile(int32_t tile) const {
    int lo = 0, hi = num_groups - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) >> 1;
      if (tile_start[mid] <= tile)
        lo = mid;
      else
        hi = mid - 1;
    }
    return lo;
  }
  // First column and width (<= 128) of tile `tile`.
  FP8FLOW_HD void tile_cols(int32_t tile, int32_t& col0, int32_t& width) const {
    const int g = group_of_tile(tile);
    col0 = col_start[g] + (tile - tile_start[g]) * 128;
    const int32_t end = col_start[g + 1];
    width = end - col0 < 128 ? end - col0 : 128;
  }
  // tile_cols for a caller that visits tiles mostly in nondecreasing order (a persistent CTA): g
  // holds the previous call's group (-1 before the first: one binary search) and walks forward,
  // usually 0 or 1 steps instead of a binary search of dependent constant loads on every call; a
  // step back to an earlier group searches again.
  FP8FLOW_HD void tile_cols_walk(int32_t tile, int& g, int32_t& col0, int32_t& width) const {
    if (g < 0 || tile < tile_start[g]) g = group_of_tile(tile);
    while (g + 1 < num_groups && tile_start[g + 1] <= tile) ++g;
    col0 = col_start[g] + (tile - tile_start[g]) * 128;
    const int32_t end = col_start[g + 1];
    width = end - col0 < 128 ? end - col0 : 128;
  }
};

// Requires groups validated (Check::groups). Empty groups: one group of `cols`.
GroupTiles make_group_tiles(std::span<const int64_t> groups, int64_t cols);

}  // namespace fp8flow::detail
