// Fake CUDA runtime for the MXFP4 kernels' C++ on the CPU: the MoE emulation's runtime (which
// builds on the quantize one) plus what mxfp4_sm90.cu uses on top of it.
#pragma once
#include <algorithm>

#include "../../../moe/cpu_emulation/fake_cuda/cuda_runtime.h"

using std::max;
using std::min;

namespace emu {
inline std::vector<unsigned> shfl32(1024);
inline std::vector<int> vote(1024);
}  // namespace emu

inline unsigned __shfl_xor_sync(unsigned, unsigned v, int off) {
  emu::shfl32[emu::tid] = v;
  emu::bar->arrive_and_wait();
  const int lane = emu::tid % 32;
  const unsigned r = emu::shfl32[emu::tid - lane + (lane ^ off)];
  emu::bar->arrive_and_wait();
  return r;
}
inline int __syncthreads_or(int pred) {
  emu::vote[emu::tid] = pred != 0;
  emu::bar->arrive_and_wait();
  const int n = static_cast<int>(emu::bDim.x * emu::bDim.y * emu::bDim.z);
  int any = 0;
  for (int t = 0; t < n; ++t) any |= emu::vote[t];
  emu::bar->arrive_and_wait();
  return any;
}
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
template <typename T>
inline void __stcs(T* p, const T& v) {
  *p = v;
}
