// Division of 32-bit unsigned integers by a run-time invariant divisor with one multiply-high, an
// add and a shift (Granlund-Montgomery / Hacker's Delight 10-9): kernels map a flat work index to
// (row, tile) without an integer division. Host and device; the host emulates __umulhi.
#pragma once

#include <cstdint>

#include "fp8flow/formats.h"

namespace fp8flow::swiglu_detail {

struct FastDiv {
  uint32_t d = 1;
  uint32_t mul = 1;  // ceil-based magic: floor(2^32 * (2^shift - d) / d) + 1
  uint32_t shift = 0;

  FastDiv() = default;
  // d in [1, 2^31].
  explicit FastDiv(uint32_t divisor) : d(divisor) {
    shift = 0;
    while ((uint64_t{1} << shift) < d) ++shift;
    mul = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << shift) - d)) / d + 1);
  }

  // floor(n / d) for every n < 2^32.
  FP8FLOW_HD uint32_t div(uint32_t n) const {
#if defined(__CUDA_ARCH__)
    const uint32_t hi = __umulhi(n, mul);
#else
    const uint32_t hi = static_cast<uint32_t>((uint64_t{n} * mul) >> 32);
#endif
    return static_cast<uint32_t>((uint64_t{hi} + n) >> shift);
  }
};

}  // namespace fp8flow::swiglu_detail
