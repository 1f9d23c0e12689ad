// Shared helpers of the transpose tests: row-wise FP8 inputs made with fp8flow::quantize on the
// CPU, column-wise outputs, and a named list of cases.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/groups.h"
#include "common/test_util.h"
#include "fp8flow/fp8flow.h"

namespace fp8flow::test {

// Read-only element pointer of a host tensor (HostTensor::ptr is non-const).
template <typename T>
const T* cptr(const HostTensor& h) {
  return reinterpret_cast<const T*>(h.buf.data());
}

// Row-wise E4M3 X [M][K] (scale [K/128][M]) quantized on the CPU from make_values(M, K, fill).
struct RowwiseFp8 {
  HostTensor data, scale;
  ScaledTensor view() const { return ScaledTensor{data.v, scale.v, ScaleLayout::Rowwise1x128, {}}; }
};

inline RowwiseFp8 make_rowwise(int64_t M, int64_t K, Fill fill, uint64_t seed) {
  RowwiseFp8 r{HostTensor(DType::E4M3, M, K), HostTensor(DType::F32, K / 128, M)};
  const HostTensor x = host_from_values(make_values(M, K, fill, seed), DType::F32, M, K);
  quantize(x.v, r.view());
  return r;
}

// Column-wise E4M3 X^T [K][M] with scale [tiles][K]; `groups` (m_splits) must outlive the view.
struct ColwiseFp8 {
  HostTensor data, scale;
  std::vector<int64_t> groups;
  ColwiseFp8(int64_t M, int64_t K, std::vector<int64_t> g = {})
      : data(DType::E4M3, K, M), scale(DType::F32, rowwise_tiles(M, g), K), groups(std::move(g)) {}
  ColwiseFp8(const ColwiseFp8&) = delete;
  ColwiseFp8& operator=(const ColwiseFp8&) = delete;
  ScaledTensor view() const {
    return ScaledTensor{data.v, scale.v, ScaleLayout::Rowwise1x128, groups};
  }
};

inline const char* fill_name(Fill f) {
  switch (f) {
    case Fill::Normal:
      return "Normal";
    case Fill::WideRange:
      return "WideRange";
    case Fill::Adversarial:
      return "Adversarial";
    case Fill::Zeros:
      return "Zeros";
  }
  return "?";
}

inline const char* policy_name(TransposeScalePolicy p) {
  return p == TransposeScalePolicy::TileMax ? "TileMax" : "ColumnTight";
}

// A shape with optional token groups (empty: one group).
struct TransposeCase {
  int64_t M, K;
  std::vector<int64_t> groups;
  std::string name() const {
    std::string s = std::to_string(M) + "x" + std::to_string(K);
    if (!groups.empty()) {
      s += " groups{";
      for (size_t i = 0; i < groups.size(); ++i) s += (i ? "," : "") + std::to_string(groups[i]);
      s += "}";
    }
    return s;
  }
};

}  // namespace fp8flow::test
