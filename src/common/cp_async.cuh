// cp.async (sm_80+) for kernels that stage tiles in shared memory: 16-byte global -> shared copies
// in per-thread commit groups; src_bytes 0 zero-fills the destination (nothing is read, but the
// source must still be a valid address). Host builds of the device code (the CPU emulations in
// tests/*/cpu_emulation) get a synchronous copy, so a wait has nothing left to wait for, unless
// the fake runtime defines FP8FLOW_EMU_CP_ASYNC_DEFERRED and emu::cp_async_{copy,commit,wait}:
// then copies land only at the wait that covers their group (a read before it sees stale data).
#pragma once

#include <cstdint>
#include <cstring>

namespace fp8flow::sm90 {

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, uint32_t src_bytes) {
#if defined(__CUDA_ARCH__)
  const auto s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes)
               : "memory");
#elif defined(FP8FLOW_EMU_CP_ASYNC_DEFERRED)
  ::emu::cp_async_copy(smem, gmem, 16, src_bytes);
#else
  if (src_bytes)
    std::memcpy(smem, gmem, 16);
  else
    std::memset(smem, 0, 16);
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#elif defined(FP8FLOW_EMU_CP_ASYNC_DEFERRED)
  ::emu::cp_async_commit();
#endif
}
// Until at most N of this thread's newest commit groups are still pending.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#elif defined(FP8FLOW_EMU_CP_ASYNC_DEFERRED)
  ::emu::cp_async_wait(N);
#endif
}

}  // namespace fp8flow::sm90
