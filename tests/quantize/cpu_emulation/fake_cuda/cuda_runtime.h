// Fake CUDA runtime for running the quantize kernels' C++ on the CPU (development check only).
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#define __device__
#define __global__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __shared__ static
#define __restrict__

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct uint3 {
  unsigned x, y, z;
};
struct uint4 {
  unsigned x, y, z, w;
};
struct uint2 {
  unsigned x, y;
};
struct float4 {
  float x, y, z, w;
};
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) {
  return {a, b, c, d};
}
inline uint2 make_uint2(unsigned a, unsigned b) {
  return {a, b};
}
inline float4 make_float4(float a, float b, float c, float d) {
  return {a, b, c, d};
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t v = (uint64_t(y) << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= unsigned((v >> (8 * ((s >> (4 * i)) & 7))) & 0xFF) << (8 * i);
  return r;
}
template <typename T>
inline T __ldcs(const T* p) {
  return *p;
}

typedef int cudaError_t;
constexpr cudaError_t cudaSuccess = 0;
typedef struct CUstream_st* cudaStream_t;
inline cudaError_t cudaGetLastError() {
  return cudaSuccess;
}
inline const char* cudaGetErrorString(cudaError_t) {
  return "ok";
}

namespace emu {
inline thread_local dim3 tIdx, bIdx;
inline dim3 bDim, gDim;
inline std::barrier<>* bar = nullptr;
inline std::vector<float> shfl;
inline std::vector<int> lane_ids;
inline thread_local int tid;

template <typename K>
struct Launch {
  K k;
  dim3 grid, block;
  template <typename... A>
  void operator()(const A&... args) {
    bDim = block;
    gDim = grid;
    const int n = block.x * block.y * block.z;
    shfl.assign(n, 0.f);
    // n threads live for the whole launch and walk the blocks in step (one block at a time, so a
    // function-level static is that block's shared memory). A thread that returns early from the
    // kernel still takes part in the barriers between blocks.
    std::barrier<> br(n);
    bar = &br;
    std::vector<std::thread> ts;
    for (int t = 0; t < n; ++t)
      ts.emplace_back([&, t] {
        tid = t;
        tIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
        for (unsigned z = 0; z < grid.z; ++z)
          for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
              bIdx = dim3(x, y, z);
              k(args...);
              br.arrive_and_wait();
            }
      });
    for (auto& th : ts) th.join();
  }
};
template <typename K>
Launch<K> launch(K k, dim3 g, dim3 b) {
  return Launch<K>{k, g, b};
}
}  // namespace emu

#define threadIdx (::emu::tIdx)
#define blockIdx (::emu::bIdx)
#define blockDim (::emu::bDim)
inline void __syncthreads() {
  emu::bar->arrive_and_wait();
}
inline float __shfl_xor_sync(unsigned, float v, int off) {
  emu::shfl[emu::tid] = v;
  emu::bar->arrive_and_wait();
  const int lane = emu::tid % 32;
  const float r = emu::shfl[emu::tid - lane + (lane ^ off)];
  emu::bar->arrive_and_wait();
  return r;
}
