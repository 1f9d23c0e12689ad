// Binary search shared by host and device code.
#pragma once

#include <cstdint>

#include "fp8flow/formats.h"  // FP8FLOW_HD

namespace fp8flow::detail {

// Index of the last element <= v in the ascending array a[0, n) (a[0] <= v assumed): which
// segment of a prefix-sum table (expert rows, tiles, ...) a flat index falls in.
template <typename T>
FP8FLOW_HD int32_t last_le(const T* a, int32_t n, T v) {
  int32_t lo = 0, hi = n;  // invariant: a[lo] <= v, answer in [lo, hi)
  while (hi - lo > 1) {
    const int32_t mid = (lo + hi) / 2;
    if (a[mid] <= v)
      lo = mid;
    else
      hi = mid;
  }
  return lo;
}

}  // namespace fp8flow::detail
