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

}  // namespace fp8flow::detail
