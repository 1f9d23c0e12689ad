// Exhaustive check of dequantize's hardware path on the CUDA backend (kernels/dequantize.cuh: cvt
// f16x2 <- e4m3x2/e5m2x2, cvt f32 <- f16, mul.rn.f32, cvt bf16x2 <- f32): every E4M3 and E5M2
// code times every power-of-two scale 2^-149..2^127 and special scales (non-powers, negative,
// +-0, +-Inf, NaN, FLT_MAX, subnormal), F32 and BF16 out, Rowwise1x128 (one group and grouped)
// and Block128x128, equals the CPU reference bit for bit.
//
// Data [4][128 * S]: column tile t (128 columns) has scale t (Rowwise scale[t][r] for every row,
// Block scale[0][t]). Rows 0-1 hold the codes 0..255 in order (row r, column 128t + j: code
// 128r + j), so the 16-code chunks holding NaN codes take the generic path and the others the
// hardware path. Rows 2-3 hold the same with NaN codes replaced by 0x00, so every non-NaN code
// also goes through the hardware path (for finite scales) next to its neighbours. Special scales
// (NaN, Inf, 0 for E5M2) send their tiles to the generic path.
//
// Skips without a GPU.
#include <gtest/gtest.h>

#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "common/test_util.h"

#if FP8FLOW_WITH_CUDA

namespace fp8flow::test {
namespace {

std::vector<float> sweep_scales() {
  std::vector<float> s;
  for (int e = -149; e <= 127; ++e) s.push_back(std::ldexp(1.0f, e));
  const float inf = std::numeric_limits<float>::infinity();
  const float qnan = std::numeric_limits<float>::quiet_NaN();
  uint32_t snan_bits = 0x7F800001u, neg_nan_bits = 0xFFC00000u;
  float snan, neg_nan;
  std::memcpy(&snan, &snan_bits, 4);
  std::memcpy(&neg_nan, &neg_nan_bits, 4);
  for (float x :
       {3.0f, 0.1f, 1.0f / 3.0f, -1.0f, -0.1f, -std::ldexp(1.0f, -127), std::ldexp(1.5f, -140),
        std::ldexp(0.75f, 127), std::ldexp(1.3f, 120), FLT_MAX, -FLT_MAX,
        std::numeric_limits<float>::denorm_min(), 0.0f, -0.0f, inf, -inf, qnan, neg_nan, snan})
    s.push_back(x);
  return s;
}

bool is_nan_code(DType d, uint32_t c) {
  return d == DType::E4M3 ? (c & 0x7Fu) == 0x7Fu : (c & 0x7Fu) > 0x7Cu;
}

HostTensor sweep_codes(DType d, int64_t S) {
  HostTensor h(d, 4, 128 * S);
  for (int64_t r = 0; r < 4; ++r)
    for (int64_t c = 0; c < 128 * S; ++c) {
      uint32_t code = static_cast<uint32_t>(128 * (r & 1) + c % 128);
      if (r >= 2 && is_nan_code(d, code)) code = 0;
      h.buf[static_cast<size_t>(r * 128 * S + c)] = static_cast<uint8_t>(code);
    }
  return h;
}

struct SweepCase {
  DType codes;
  ScaleLayout layout;
  bool grouped;
};

std::string name(const SweepCase& c, DType out) {
  return std::string(to_string(c.codes)) + " " + to_string(c.layout) +
         (c.grouped ? " grouped" : "") + " -> " + to_string(out);
}

void run_sweep(const SweepCase& c) {
  const std::vector<float> scales = sweep_scales();
  const int64_t S = static_cast<int64_t>(scales.size()), R = 4, C = 128 * S;
  const HostTensor codes = sweep_codes(c.codes, S);
  // Groups of whole tiles (one empty) give the same tiles as one group, on the grouped kernel.
  const std::vector<int64_t> groups =
      c.grouped ? std::vector<int64_t>{128, 0, 128 * (S - 2), 128} : std::vector<int64_t>{};
  const Shape2D ss = scale_shape(c.layout, R, C, groups);
  HostTensor sc(DType::F32, ss.rows, ss.cols);
  float* sp = sc.ptr<float>();
  if (c.layout == ScaleLayout::Block128x128) {
    ASSERT_EQ(ss.rows, 1);
    ASSERT_EQ(ss.cols, S);
    for (int64_t t = 0; t < S; ++t) sp[t] = scales[static_cast<size_t>(t)];
  } else {
    ASSERT_EQ(ss.rows, S);
    ASSERT_EQ(ss.cols, R);
    for (int64_t t = 0; t < S; ++t)
      for (int64_t r = 0; r < R; ++r) sp[t * R + r] = scales[static_cast<size_t>(t)];
  }
  DeviceTensor codes_d(codes), sc_d(sc);
  const ScaledTensor in_ref{codes.v, sc.v, c.layout, groups};
  const ScaledTensor in_dev{codes_d.v, sc_d.v, c.layout, groups};
  for (DType out : {DType::F32, DType::BF16}) {
    SCOPED_TRACE(name(c, out));
    HostTensor ref(out, R, C, 0x5A);
    DeviceTensor got_d(out, R, C);
    dequantize(in_ref, ref.v);
    dequantize(in_dev, got_d.v);
    const HostTensor got = got_d.to_host();
    const int64_t eb = dtype_bits(out) / 8;
    int64_t bad = 0;
    for (int64_t r = 0; r < R; ++r)
      for (int64_t col = 0; col < C; ++col) {
        const size_t off = static_cast<size_t>((r * C + col) * eb);
        uint32_t a = 0, b = 0;
        std::memcpy(&a, ref.buf.data() + off, static_cast<size_t>(eb));
        std::memcpy(&b, got.buf.data() + off, static_cast<size_t>(eb));
        if (a == b) continue;
        if (++bad <= 8) {
          const float s = scales[static_cast<size_t>(col / 128)];
          uint32_t sb;
          std::memcpy(&sb, &s, 4);
          ADD_FAILURE() << "code 0x" << std::hex
                        << unsigned(codes.buf[static_cast<size_t>(r * C + col)]) << " scale " << s
                        << " (0x" << sb << "), row " << std::dec << r << " col " << col
                        << ": ref 0x" << std::hex << a << " gpu 0x" << b;
        }
      }
    EXPECT_EQ(bad, 0) << "mismatching elements";
  }
}

TEST(GpuDequantizeFast, SweepE4M3Rowwise) {
  FP8FLOW_REQUIRE_GPU();
  run_sweep({DType::E4M3, ScaleLayout::Rowwise1x128, false});
}
TEST(GpuDequantizeFast, SweepE5M2Rowwise) {
  FP8FLOW_REQUIRE_GPU();
  run_sweep({DType::E5M2, ScaleLayout::Rowwise1x128, false});
}
TEST(GpuDequantizeFast, SweepE4M3RowwiseGrouped) {
  FP8FLOW_REQUIRE_GPU();
  run_sweep({DType::E4M3, ScaleLayout::Rowwise1x128, true});
}
TEST(GpuDequantizeFast, SweepE5M2RowwiseGrouped) {
  FP8FLOW_REQUIRE_GPU();
  run_sweep({DType::E5M2, ScaleLayout::Rowwise1x128, true});
}
TEST(GpuDequantizeFast, SweepE4M3Block) {
  FP8FLOW_REQUIRE_GPU();
  run_sweep({DType::E4M3, ScaleLayout::Block128x128, false});
}
TEST(GpuDequantizeFast, SweepE5M2Block) {
  FP8FLOW_REQUIRE_GPU();
  run_sweep({DType::E5M2, ScaleLayout::Block128x128, false});
}

// The CPU reference of the sweep itself (no GPU needed): spot values that the hardware path must
// reproduce, so a reference change that would make the sweep vacuous shows up here too.
TEST(GpuDequantizeFast, ReferenceSpotValues) {
  const std::vector<float> scales = sweep_scales();
  const int64_t S = static_cast<int64_t>(scales.size());
  const HostTensor codes = sweep_codes(DType::E4M3, S);
  HostTensor sc(DType::F32, S, 4);
  for (int64_t t = 0; t < S; ++t)
    for (int64_t r = 0; r < 4; ++r) sc.ptr<float>()[t * 4 + r] = scales[static_cast<size_t>(t)];
  HostTensor f(DType::F32, 4, 128 * S), h(DType::BF16, 4, 128 * S);
  dequantize(ScaledTensor{codes.v, sc.v, ScaleLayout::Rowwise1x128, {}}, f.v);
  dequantize(ScaledTensor{codes.v, sc.v, ScaleLayout::Rowwise1x128, {}}, h.v);
  auto f_at = [&](int64_t r, int64_t c) {
    uint32_t u;
    std::memcpy(&u, f.buf.data() + 4 * (r * 128 * S + c), 4);
    return u;
  };
  auto h_at = [&](int64_t r, int64_t c) {
    uint16_t u;
    std::memcpy(&u, h.buf.data() + 2 * (r * 128 * S + c), 2);
    return u;
  };
  const int64_t t1 = 149;  // scale 2^0
  EXPECT_EQ(scales[t1], 1.0f);
  EXPECT_EQ(f_at(0, 128 * t1 + 0x38), 0x3F800000u);  // E4M3 0x38 = 1.0
  EXPECT_EQ(f_at(1, 128 * t1 + 0x7E), 0xC3E00000u);  // row 1: code 0xFE = -448
  EXPECT_EQ(f_at(0, 128 * t1 + 0x7F), 0x7FC00000u);  // NaN code keeps fmt's NaN
  EXPECT_EQ(f_at(1, 128 * t1 + 0x7F), 0xFFC00000u);  // with its sign
  EXPECT_EQ(h_at(1, 128 * t1 + 0x7F), 0xFFC0u);
  EXPECT_EQ(f_at(2, 128 * t1 + 0x7F), 0u);                // rows 2-3: NaN codes replaced by 0
  EXPECT_EQ(f_at(0, 128 * 0 + 0x01), 0u);                 // 2^-9 * 2^-149 underflows to +0
  EXPECT_EQ(f_at(0, 128 * 22 + 0x08), 0x00010000u);       // 2^-6 (0x08) * 2^-127 (tile 22) = 2^-133
  EXPECT_EQ(f_at(0, 128 * (S - 1) + 0x10), 0x7FC00000u);  // 2^-5 * sNaN -> canonical NaN
  EXPECT_EQ(h_at(0, 128 * (S - 1) + 0x10), 0x7FC0u);
}

}  // namespace
}  // namespace fp8flow::test

#endif  // FP8FLOW_WITH_CUDA
