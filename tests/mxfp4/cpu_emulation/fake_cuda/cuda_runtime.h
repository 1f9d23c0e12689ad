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
inline unsigned __reduce_max_sync(unsigned, unsigned v) {
  emu::shfl32[emu::tid] = v;
  emu::bar->arrive_and_wait();
  const int w0 = emu::tid - emu::tid % 32;
  unsigned r = 0;
  for (int l = 0; l < 32; ++l) r = std::max(r, emu::shfl32[w0 + l]);
  emu::bar->arrive_and_wait();
  return r;
}
inline int __all_sync(unsigned, int pred) {
  emu::vote[emu::tid] = pred != 0;
  emu::bar->arrive_and_wait();
  const int w0 = emu::tid - emu::tid % 32;
  int all = 1;
  for (int l = 0; l < 32; ++l) all &= emu::vote[w0 + l];
  emu::bar->arrive_and_wait();
  return all;
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

// cp.async with its asynchrony (src/common/cp_async.cuh): each thread queues its copies in commit
// groups and a wait_group N performs all but its N newest groups, so a kernel that reads a staged
// tile before the wait covering it sees stale shared memory and fails the comparison.
#define FP8FLOW_EMU_CP_ASYNC_DEFERRED 1
namespace emu {
struct CpAsyncCopy {
  void* dst;
  const void* src;
  unsigned bytes, src_bytes;
};
inline thread_local std::vector<CpAsyncCopy> cp_open;                 // not yet committed
inline thread_local std::vector<std::vector<CpAsyncCopy>> cp_groups;  // committed, oldest first
inline void cp_async_copy(void* dst, const void* src, unsigned bytes, unsigned src_bytes) {
  cp_open.push_back({dst, src, bytes, src_bytes});
}
inline void cp_async_commit() {
  cp_groups.push_back(std::move(cp_open));
  cp_open.clear();
}
inline void cp_async_wait(int n) {
  while (static_cast<int>(cp_groups.size()) > n) {
    for (const CpAsyncCopy& c : cp_groups.front()) {
      if (c.src_bytes)
        std::memcpy(c.dst, c.src, c.bytes);
      else
        std::memset(c.dst, 0, c.bytes);
    }
    cp_groups.erase(cp_groups.begin());
  }
}
}  // namespace emu
