// Test helpers: host/device buffers, views over them, seeded random and adversarial inputs, and
// the GPU-skip macro. Every GPU test compares the CUDA backend with the CPU reference bit for bit.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "fp8flow/fp8flow.h"

#if FP8FLOW_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace fp8flow::test {

// Skips the current test, with the reason printed, where no CUDA device (or backend) exists.
#define FP8FLOW_REQUIRE_GPU()                                                         \
  do {                                                                                \
    if (!::fp8flow::cuda_available())                                                 \
      GTEST_SKIP() << "no CUDA device visible (or CPU-only build): GPU test skipped"; \
  } while (0)

inline size_t bytes_for(DType d, int64_t rows, int64_t cols) {
  return static_cast<size_t>(rows) * static_cast<size_t>(cols) * dtype_bits(d) / 8;
}

// Host tensor storage (bytes) with a view.
struct HostTensor {
  std::vector<uint8_t> buf;
  TensorView v;
  HostTensor() = default;
  HostTensor(DType d, int64_t rows, int64_t cols, uint8_t fill = 0xA5)
      : buf(bytes_for(d, rows, cols) + 16, fill) {
    v = TensorView{buf.data(), d, rows, cols, -1, Device::Cpu};
  }
  template <typename T>
  T* ptr() {
    return reinterpret_cast<T*>(buf.data());
  }
  size_t bytes() const { return bytes_for(v.dtype, v.rows, v.cols); }
};

#if FP8FLOW_WITH_CUDA
// Device buffer mirroring a HostTensor; poisoned (0xA5) on allocation so unwritten outputs show.
// Both constructors end with a device synchronize: the poison memset and the upload run on the
// legacy default stream, which does not order work on a cudaStreamNonBlocking stream, so without
// it a kernel on such a stream could run before them (seen once: SwigluGpu.LargeOnStream's
// forward scales overwritten by the poison while the GPU was busy with other processes).
struct DeviceTensor {
  void* p = nullptr;
  size_t n = 0;
  TensorView v;
  DeviceTensor() = default;
  DeviceTensor(DType d, int64_t rows, int64_t cols) : n(bytes_for(d, rows, cols)) {
    EXPECT_EQ(cudaMalloc(&p, n ? n : 1), cudaSuccess);
    EXPECT_EQ(cudaMemset(p, 0xA5, n ? n : 1), cudaSuccess);
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    v = TensorView{p, d, rows, cols, -1, Device::Cuda};
  }
  explicit DeviceTensor(const HostTensor& h) : DeviceTensor(h.v.dtype, h.v.rows, h.v.cols) {
    EXPECT_EQ(cudaMemcpy(p, h.buf.data(), n, cudaMemcpyHostToDevice), cudaSuccess);
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  }
  DeviceTensor(const DeviceTensor&) = delete;
  DeviceTensor& operator=(const DeviceTensor&) = delete;
  DeviceTensor(DeviceTensor&& o) noexcept : p(o.p), n(o.n), v(o.v) { o.p = nullptr; }
  DeviceTensor& operator=(DeviceTensor&& o) noexcept {
    std::swap(p, o.p);
    n = o.n;
    v = o.v;
    return *this;
  }
  ~DeviceTensor() {
    if (p) cudaFree(p);
  }
  HostTensor to_host() const {
    HostTensor h(v.dtype, v.rows, v.cols);
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(h.buf.data(), p, n, cudaMemcpyDeviceToHost), cudaSuccess);
    return h;
  }
};

// An op's kernel variant for a scope, through its backend test hook (set(v) from now on; set(-1)
// at scope exit returns to what the environment chose).
struct ScopedKernelVariant {
  void (*set)(int);
  ScopedKernelVariant(void (*set_variant)(int), int v) : set(set_variant) { set(v); }
  ~ScopedKernelVariant() { set(-1); }
  ScopedKernelVariant(const ScopedKernelVariant&) = delete;
  ScopedKernelVariant& operator=(const ScopedKernelVariant&) = delete;
};
#endif

// Byte-exact comparison of two host tensors of the same shape; reports the first mismatches.
inline ::testing::AssertionResult bytes_equal(const HostTensor& a, const HostTensor& b) {
  if (a.v.dtype != b.v.dtype || a.v.rows != b.v.rows || a.v.cols != b.v.cols)
    return ::testing::AssertionFailure() << "shape/dtype differ";
  const size_t n = a.bytes();
  size_t bad = 0, first = n;
  for (size_t i = 0; i < n; ++i)
    if (a.buf[i] != b.buf[i]) {
      if (!bad) first = i;
      ++bad;
    }
  if (!bad) return ::testing::AssertionSuccess();
  char msg[160];
  std::snprintf(msg, sizeof msg, "%zu of %zu bytes differ; first at byte %zu (0x%02x vs 0x%02x)",
                bad, n, first, unsigned(a.buf[first]), unsigned(b.buf[first]));
  return ::testing::AssertionFailure() << msg;
}

// Input generators. `kind` picks the distribution; all are seeded and reproducible.
enum class Fill {
  Normal,       // N(0, 1) scaled per row by 2^U(-8, 8): realistic activations with outlier rows
  WideRange,    // magnitudes 2^U(-40, 40), random signs: stresses scale and subnormal paths
  Adversarial,  // mix: zeros, NaN, +-Inf, huge (1e38), tiny (1e-40), exact ties, all-zero rows
  Zeros,
};

inline std::vector<float> make_values(int64_t rows, int64_t cols, Fill kind, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::uniform_real_distribution<float> ud(0.f, 1.f);
  std::vector<float> x(static_cast<size_t>(rows * cols), 0.f);
  for (int64_t r = 0; r < rows; ++r) {
    const float row_scale = std::ldexp(1.f, static_cast<int>(ud(rng) * 16) - 8);
    const bool zero_row = kind == Fill::Adversarial && (r % 7 == 3);
    for (int64_t c = 0; c < cols; ++c) {
      float& v = x[static_cast<size_t>(r * cols + c)];
      switch (kind) {
        case Fill::Normal:
          v = nd(rng) * row_scale;
          break;
        case Fill::WideRange:
          v = std::ldexp(1.f + ud(rng), static_cast<int>(ud(rng) * 80) - 40) *
              (ud(rng) < 0.5f ? -1.f : 1.f);
          break;
        case Fill::Adversarial: {
          if (zero_row) break;
          const float u = ud(rng);
          if (u < 0.02f)
            v = NAN;
          else if (u < 0.03f)
            v = INFINITY;
          else if (u < 0.04f)
            v = -INFINITY;
          else if (u < 0.06f)
            v = 1e38f;
          else if (u < 0.08f)
            v = 1e-40f;
          else if (u < 0.15f)
            v = 0.f;
          else if (u < 0.20f)
            v = -0.f;
          else if (u < 0.30f)
            v = 1.0625f * std::ldexp(1.f, static_cast<int>(ud(rng) * 20) - 10);
          else
            v = nd(rng) * row_scale;
          break;
        }
        case Fill::Zeros:
          break;
      }
    }
  }
  return x;
}

// F32 values into a host tensor of dtype F32 or BF16 (RNE).
inline HostTensor host_from_values(const std::vector<float>& x, DType d, int64_t rows,
                                   int64_t cols) {
  HostTensor h(d, rows, cols);
  for (size_t i = 0; i < x.size(); ++i) {
    if (d == DType::F32)
      h.ptr<float>()[i] = x[i];
    else
      h.ptr<uint16_t>()[i] = fmt::bf16_from_f32(x[i]);
  }
  return h;
}

}  // namespace fp8flow::test
