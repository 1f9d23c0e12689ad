// Fake CUDA runtime for the dispatch kernels' C++ on the CPU: the quantize emulation's runtime
// (one CPU thread per CUDA thread, blocks one at a time) plus what dispatch_sm90.cu uses on top:
// warp ballots and __shfl_sync (a barrier per warp, so a ballot inside `if (tid < 32)` works),
// __popc, __ffs, __ldg,
// gridDim, and synchronous stand-ins for the stream, event, memset and memcpy calls.
#pragma once
#include "../../../quantize/cpu_emulation/fake_cuda/cuda_runtime.h"

#include <bit>
#include <cstring>
#include <deque>

#define gridDim (::emu::gDim)

namespace emu {
// One barrier and one ballot slot array per warp of the current launch (<= 1024 threads).
inline std::deque<std::barrier<>> warp_bars;
inline std::vector<int> ballot_slots(1024);
// The warp barriers for blocks of n threads; the driver calls it before the first launch (every
// dispatch kernel runs 256-thread blocks).
inline void make_warps(int n) {
  warp_bars.clear();
  for (int w = 0; w < (n + 31) / 32; ++w) warp_bars.emplace_back(std::min(32, n - 32 * w));
}
}  // namespace emu

// Every lane of the calling warp must call it (as on the GPU with a full mask).
inline unsigned __ballot_sync(unsigned, int pred) {
  const int w = emu::tid / 32, lane = emu::tid % 32;
  emu::ballot_slots[emu::tid] = pred ? 1 : 0;
  emu::warp_bars[w].arrive_and_wait();
  unsigned r = 0;
  for (int l = 0; l < 32 && 32 * w + l < static_cast<int>(emu::ballot_slots.size()); ++l)
    if (emu::ballot_slots[32 * w + l]) r |= 1u << l;
  emu::warp_bars[w].arrive_and_wait();
  (void)lane;
  return r;
}
// Lane `src`'s v, for every lane of the calling warp (all 32 must call it, as with a full mask).
inline int32_t __shfl_sync(unsigned, int32_t v, int src) {
  const int w = emu::tid / 32;
  emu::ballot_slots[emu::tid] = v;
  emu::warp_bars[w].arrive_and_wait();
  const int32_t r = emu::ballot_slots[32 * w + src];
  emu::warp_bars[w].arrive_and_wait();
  return r;
}
inline int __popc(unsigned v) {
  return std::popcount(v);
}
inline int __ffs(unsigned v) {
  return v ? std::countr_zero(v) + 1 : 0;
}
using std::min;
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

typedef struct CUevent_st* cudaEvent_t;
enum cudaMemcpyKind { cudaMemcpyHostToDevice = 1 };
constexpr unsigned cudaEventDisableTiming = 2, cudaStreamNonBlocking = 1;
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t = nullptr) {
  std::memset(p, v, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, cudaMemcpyKind,
                                   cudaStream_t = nullptr) {
  std::memcpy(d, s, n);
  return cudaSuccess;
}
inline cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned) {
  *e = nullptr;
  return cudaSuccess;
}
inline cudaError_t cudaEventDestroy(cudaEvent_t) {
  return cudaSuccess;
}
inline cudaError_t cudaEventRecord(cudaEvent_t, cudaStream_t) {
  return cudaSuccess;
}
inline cudaError_t cudaStreamWaitEvent(cudaStream_t, cudaEvent_t, unsigned) {
  return cudaSuccess;
}
inline cudaError_t cudaStreamDestroy(cudaStream_t) {
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetStreamPriorityRange(int* lo, int* hi) {
  *lo = *hi = 0;
  return cudaSuccess;
}
inline cudaError_t cudaStreamCreateWithPriority(cudaStream_t* s, unsigned, int) {
  *s = nullptr;
  return cudaSuccess;
}
