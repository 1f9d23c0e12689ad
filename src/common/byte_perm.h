// PRMT (__byte_perm) on the device, with the same semantics on the host so that kernel building
// blocks that shuffle bytes can be tested on the CPU. Output byte i is byte (s >> 4i) & 7 of the
// 8-byte value {b:a} (a = bytes 0-3); like __byte_perm, only the low 3 bits of each selector nibble
// are used (no sign-replication mode).
#pragma once

#include <cstdint>

#include "fp8flow/formats.h"

namespace fp8flow::detail {

FP8FLOW_HD uint32_t byte_perm(uint32_t a, uint32_t b, uint32_t s) {
#if defined(__CUDA_ARCH__)
  return __byte_perm(a, b, s);
#else
  const uint64_t ab = (static_cast<uint64_t>(b) << 32) | a;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) {
    const uint32_t n = (s >> (4 * i)) & 7u;
    r |= (static_cast<uint32_t>(ab >> (8 * n)) & 0xFFu) << (8 * i);
  }
  return r;
#endif
}

// Transposes a 4x4 block of bytes: out[c] byte i = in[i] byte c (four PRMT pairs; the scaling-aware
// transpose and mxfp4_to_fp8_transposed use it to turn token rows into channel rows).
FP8FLOW_HD void transpose4x4(uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t& b0,
                             uint32_t& b1, uint32_t& b2, uint32_t& b3) {
  const uint32_t t0 = byte_perm(a0, a1, 0x5140u), t1 = byte_perm(a2, a3, 0x5140u);
  const uint32_t t2 = byte_perm(a0, a1, 0x7362u), t3 = byte_perm(a2, a3, 0x7362u);
  b0 = byte_perm(t0, t1, 0x5410u);
  b1 = byte_perm(t0, t1, 0x7632u);
  b2 = byte_perm(t2, t3, 0x5410u);
  b3 = byte_perm(t2, t3, 0x7632u);
}

}  // namespace fp8flow::detail
