// Fake CUDA runtime for the MoE kernels' C++ on the CPU: the quantize emulation's runtime
// (tests/quantize/cpu_emulation/fake_cuda) plus what moe_sm90.cu uses on top of it.
#pragma once
#include "../../../quantize/cpu_emulation/fake_cuda/cuda_runtime.h"

#define __align__(n) __attribute__((aligned(n)))
#define gridDim (::emu::gDim)

struct float2 {
  float x, y;
};

namespace emu {
inline int sm_count = 132;  // what cudaDevAttrMultiProcessorCount reports (tests vary it)
inline std::vector<unsigned long long> shfl64(1024);
}  // namespace emu

inline unsigned long long __shfl_xor_sync(unsigned, unsigned long long v, int off) {
  emu::shfl64[emu::tid] = v;
  emu::bar->arrive_and_wait();
  const int lane = emu::tid % 32;
  const unsigned long long r = emu::shfl64[emu::tid - lane + (lane ^ off)];
  emu::bar->arrive_and_wait();
  return r;
}
// Only thread 0 of a block adds, and blocks run one at a time: no race.
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  const unsigned long long old = *p;
  *p = old + v;
  return old;
}

enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) {
  *v = emu::sm_count;
  return cudaSuccess;
}
