// Helpers shared by the permute tests: routing generators, plan buffers (host and device), and an
// error matcher. Every GPU test compares with the CPU reference bit for bit.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "../common/test_data.h"
#include "../common/test_util.h"
#include "fp8flow/permute.h"

namespace fp8flow::test {

// ---------------------------------------------------------------------------------------------
// Routing generators: topk_idx [T][k] as a flat vector.
inline std::vector<int32_t> route_uniform(int64_t T, int64_t k, int64_t E, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> idx(static_cast<size_t>(T * k));
  std::vector<int32_t> perm(static_cast<size_t>(E));
  std::iota(perm.begin(), perm.end(), 0);
  for (int64_t t = 0; t < T; ++t) {
    if (k <= E) {  // k distinct experts in random slot order (partial Fisher-Yates)
      for (int64_t j = 0; j < k; ++j) {
        std::uniform_int_distribution<int64_t> d(j, E - 1);
        std::swap(perm[static_cast<size_t>(j)], perm[static_cast<size_t>(d(rng))]);
        idx[static_cast<size_t>(t * k + j)] = perm[static_cast<size_t>(j)];
      }
    } else {
      std::uniform_int_distribution<int32_t> d(0, static_cast<int32_t>(E - 1));
      for (int64_t j = 0; j < k; ++j) idx[static_cast<size_t>(t * k + j)] = d(rng);
    }
  }
  return idx;
}

// Zipf-like skew: expert e drawn with weight 1 / (e + 1)^1.5 (duplicates within a token allowed).
inline std::vector<int32_t> route_skewed(int64_t T, int64_t k, int64_t E, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<double> w(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; ++e) w[static_cast<size_t>(e)] = 1.0 / std::pow(double(e + 1), 1.5);
  std::discrete_distribution<int32_t> d(w.begin(), w.end());
  std::vector<int32_t> idx(static_cast<size_t>(T * k));
  for (auto& v : idx) v = d(rng);
  return idx;
}

inline std::vector<int32_t> route_constant(int64_t T, int64_t k, int32_t e) {
  return std::vector<int32_t>(static_cast<size_t>(T * k), e);
}

// Uniform routing with ~frac of the ids replaced by out-of-range values.
inline std::vector<int32_t> route_with_invalid(int64_t T, int64_t k, int64_t E, uint64_t seed,
                                               double frac = 0.1) {
  auto idx = route_uniform(T, k, E, seed);
  std::mt19937_64 rng(seed ^ 0x9E3779B97F4A7C15ull);
  std::uniform_real_distribution<double> u(0, 1);
  const int32_t bad[] = {
      -1, static_cast<int32_t>(E), static_cast<int32_t>(E) + 100, INT_MIN, INT_MAX, -7};
  size_t b = 0;
  for (auto& v : idx)
    if (u(rng) < frac) v = bad[b++ % 6];
  return idx;
}

inline HostTensor host_i32(const std::vector<int32_t>& v, int64_t rows, int64_t cols) {
  HostTensor h(DType::I32, rows, cols);
  if (!v.empty()) std::memcpy(h.buf.data(), v.data(), v.size() * 4);
  return h;
}

inline HostTensor random_weights(int64_t T, int64_t k, uint64_t seed) {
  HostTensor h(DType::F32, T, k);
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> u(0.f, 1.f);
  for (int64_t i = 0; i < T * k; ++i) h.ptr<float>()[i] = u(rng);
  return h;
}

// Routing cases shared by the reference and GPU tests.
struct RouteCase {
  const char* name;
  int64_t T, k, E;
  std::vector<int32_t> idx;
};

inline std::vector<RouteCase> route_cases() {
  std::vector<RouteCase> c;
  c.push_back({"uniform", 1000, 8, 32, route_uniform(1000, 8, 32, 1)});
  c.push_back({"uniform_T4099_E256", 4099, 8, 256, route_uniform(4099, 8, 256, 2)});
  c.push_back({"skewed", 777, 6, 64, route_skewed(777, 6, 64, 3)});
  c.push_back({"one_expert", 300, 4, 16, route_constant(300, 4, 5)});
  c.push_back({"one_expert_last", 129, 1, 7, route_constant(129, 1, 6)});
  c.push_back({"one_token", 1, 8, 32, route_uniform(1, 8, 32, 4)});
  c.push_back({"k1", 513, 1, 8, route_uniform(513, 1, 8, 5)});
  c.push_back({"E1", 37, 2, 1, route_constant(37, 2, 0)});
  c.push_back({"no_tokens", 0, 8, 32, {}});
  c.push_back({"invalid_ids", 1001, 8, 32, route_with_invalid(1001, 8, 32, 6)});
  c.push_back({"all_invalid", 50, 3, 4, route_constant(50, 3, -1)});
  c.push_back({"k32_E1024", 65, 32, 1024, route_uniform(65, 32, 1024, 7)});
  // Empty experts: only even ids.
  auto even = route_uniform(500, 4, 16, 8);
  for (auto& e : even) e = (e / 2) * 2;
  c.push_back({"empty_experts", 500, 4, 16, even});
  return c;
}

// ---------------------------------------------------------------------------------------------
// Plan storage. src_slot has `src_len` entries (default: the max-rows bound).
struct HostPlan {
  HostTensor tpe, off, dest, src, inv;
  HostPlan(int64_t T, int64_t k, int64_t E, int64_t src_len, DType off_dtype = DType::I64)
      : tpe(DType::I32, 1, E),
        off(off_dtype, 1, E + 1),
        dest(DType::I32, T, k),
        src(DType::I32, 1, src_len),
        inv(DType::I32, 1, 1) {}
  PermutationPlan view() const { return {tpe.v, off.v, dest.v, src.v, inv.v}; }
  int64_t offset(int64_t e) const {
    return off.v.dtype == DType::I64 ? reinterpret_cast<const int64_t*>(off.buf.data())[e]
                                     : reinterpret_cast<const int32_t*>(off.buf.data())[e];
  }
  int64_t m_pad(int64_t E) const { return offset(E); }
  const int32_t* src_slot() const { return reinterpret_cast<const int32_t*>(src.buf.data()); }
  const int32_t* dest_row() const { return reinterpret_cast<const int32_t*>(dest.buf.data()); }
  int32_t invalid() const { return reinterpret_cast<const int32_t*>(inv.buf.data())[0]; }
  int32_t count(int64_t e) const { return reinterpret_cast<const int32_t*>(tpe.buf.data())[e]; }
};

inline HostPlan make_host_plan(const std::vector<int32_t>& idx, int64_t T, int64_t k, int64_t E,
                               int align, DType off_dtype = DType::I64, int64_t src_len = -1) {
  if (src_len < 0) src_len = permutation_max_rows(T, k, E, align);
  HostPlan p(T, k, E, src_len, off_dtype);
  const HostTensor ids = host_i32(idx, T, k);
  make_permutation(ids.v, E, p.view(), nullptr, 0, PermutationOptions{align});
  return p;
}

#if FP8FLOW_WITH_CUDA
struct DevicePlan {
  DeviceTensor tpe, off, dest, src, inv;
  DevicePlan(int64_t T, int64_t k, int64_t E, int64_t src_len, DType off_dtype = DType::I64)
      : tpe(DType::I32, 1, E),
        off(off_dtype, 1, E + 1),
        dest(DType::I32, T, k),
        src(DType::I32, 1, src_len),
        inv(DType::I32, 1, 1) {}
  PermutationPlan view() const { return {tpe.v, off.v, dest.v, src.v, inv.v}; }
};

// Device buffer of raw bytes (workspace).
struct DeviceBytes {
  void* p = nullptr;
  size_t n = 0;
  explicit DeviceBytes(size_t bytes) : n(bytes) {
    if (n) EXPECT_EQ(cudaMalloc(&p, n), cudaSuccess);
    if (n) EXPECT_EQ(cudaMemset(p, 0xA5, n), cudaSuccess);
  }
  DeviceBytes(const DeviceBytes&) = delete;
  DeviceBytes& operator=(const DeviceBytes&) = delete;
  ~DeviceBytes() {
    if (p) cudaFree(p);
  }
};

inline DevicePlan make_device_plan(const std::vector<int32_t>& idx, int64_t T, int64_t k, int64_t E,
                                   int align, DType off_dtype = DType::I64, int64_t src_len = -1) {
  if (src_len < 0) src_len = permutation_max_rows(T, k, E, align);
  DevicePlan p(T, k, E, src_len, off_dtype);
  const DeviceTensor ids(host_i32(idx, T, k));
  DeviceBytes ws(permutation_workspace_bytes(T, k, E));
  make_permutation(ids.v, E, p.view(), ws.p, ws.n, PermutationOptions{align});
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  return p;
}
#endif

// ---------------------------------------------------------------------------------------------
// Runs f, expects fp8flow::Error whose message starts "fp8flow::<op>: " and names `arg`.
inline void expect_error(const std::function<void()>& f, const std::string& op,
                         const std::string& arg, ErrorKind kind = ErrorKind::InvalidArgument) {
  try {
    f();
    ADD_FAILURE() << "expected fp8flow::Error from " << op << " naming " << arg;
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_EQ(msg.rfind("fp8flow::" + op + ": ", 0), 0u) << msg;
    EXPECT_NE(msg.find(arg), std::string::npos) << "argument " << arg << " not in: " << msg;
    EXPECT_EQ(e.kind(), kind) << msg;
  }
}

}  // namespace fp8flow::test
