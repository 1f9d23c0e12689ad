// Properties of transpose_scaled on the CPU backend (the reference): exactness against
// dequantize, ColumnTight == quantize_transposed(dequantize(in)) bit for bit, ColumnTight never
// coarser than TileMax, underflow counts against brute force, groups, NaN, zeros, and what the
// naive BF16 round trip costs by comparison.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "transpose/transpose_test_util.h"

namespace fp8flow::test {
namespace {

constexpr TransposeScalePolicy kTileMax = TransposeScalePolicy::TileMax;
constexpr TransposeScalePolicy kTight = TransposeScalePolicy::ColumnTight;

HostTensor dequant(const ScaledTensor& t) {
  HostTensor out(DType::F32, t.data.rows, t.data.cols);
  dequantize(t, out.v);
  return out;
}

int64_t run(const RowwiseFp8& in, const ColwiseFp8& out, TransposeScalePolicy policy) {
  int64_t n = -12345;
  TransposeOptions o;
  o.policy = policy;
  o.underflow_count = &n;
  transpose_scaled(in.view(), out.view(), o);
  return n;
}

// Compares dequantize(out_t)^T with dequantize(in) element by element: NaN must stay NaN, every
// other element must be equal unless it underflowed, and an underflowed element must be the
// nearest value on out's grid (|diff| <= half its smallest subnormal step, 2^-10 * 2^T).
struct ExactnessReport {
  int64_t changed = 0;  // non-NaN nonzero inputs whose value changed
  int64_t bad = 0;      // violations
};
ExactnessReport check_exact(const RowwiseFp8& in, const ColwiseFp8& out) {
  const int64_t M = in.data.v.rows, K = in.data.v.cols;
  const HostTensor a = dequant(in.view()), b = dequant(out.view());
  const detail::GroupTiles g = detail::make_group_tiles(out.groups, M);
  ExactnessReport rep;
  for (int32_t tile = 0; tile < g.total_tiles; ++tile) {
    int32_t m0, w;
    g.tile_cols(tile, m0, w);
    for (int64_t m = m0; m < m0 + w; ++m) {
      for (int64_t k = 0; k < K; ++k) {
        const float x = cptr<float>(a)[m * K + k], y = cptr<float>(b)[k * M + m];
        if (std::isnan(x) || std::isnan(y)) {
          rep.bad += std::isnan(x) != std::isnan(y);
          continue;
        }
        if (x == y) continue;
        ++rep.changed;
        const float out_scale = cptr<float>(out.scale)[int64_t(tile) * K + k];
        if (std::fabs(double(x) - double(y)) > std::ldexp(double(out_scale), -10)) ++rep.bad;
      }
    }
  }
  return rep;
}

const TransposeCase kCases[] = {
    {128, 128, {}},
    {300, 256, {}},
    {1000, 1280, {}},
    {1, 128, {}},
    {510, 256, {0, 128, 5, 300, 0, 77}},
    {300, 128, {300}},
    {131, 384, {1, 0, 130}},
};
const Fill kFills[] = {Fill::Normal, Fill::WideRange, Fill::Adversarial, Fill::Zeros};

TEST(TransposeRef, ExactExceptCountedUnderflow) {
  for (const auto& cs : kCases) {
    for (Fill fill : kFills) {
      const RowwiseFp8 in = make_rowwise(cs.M, cs.K, fill, 100 + cs.M);
      for (auto policy : {kTileMax, kTight}) {
        SCOPED_TRACE(cs.name() + " " + fill_name(fill) + " " + policy_name(policy));
        ColwiseFp8 out(cs.M, cs.K, cs.groups);
        const int64_t n = run(in, out, policy);
        const ExactnessReport rep = check_exact(in, out);
        EXPECT_EQ(rep.bad, 0);
        EXPECT_EQ(n, rep.changed);  // the count is the brute-force count
        if (fill == Fill::Zeros) EXPECT_EQ(n, 0);
      }
    }
  }
}

// The "double quantization is gone" property: ColumnTight writes exactly what quantizing the
// dequantized tensor column-wise would write, data and scales, bit for bit.
TEST(TransposeRef, ColumnTightEqualsQuantizeTransposedOfDequantized) {
  for (const auto& cs : kCases) {
    for (Fill fill : kFills) {
      SCOPED_TRACE(cs.name() + " " + fill_name(fill));
      const RowwiseFp8 in = make_rowwise(cs.M, cs.K, fill, 200 + cs.M);
      ColwiseFp8 ours(cs.M, cs.K, cs.groups), direct(cs.M, cs.K, cs.groups);
      run(in, ours, kTight);
      const HostTensor x = dequant(in.view());
      quantize_transposed(x.v, direct.view());
      EXPECT_TRUE(bytes_equal(ours.data, direct.data));
      EXPECT_TRUE(bytes_equal(ours.scale, direct.scale));
    }
  }
}

TEST(TransposeRef, ColumnTightNeverCoarserThanTileMax) {
  int64_t finer = 0;
  for (const auto& cs : kCases) {
    for (Fill fill : kFills) {
      SCOPED_TRACE(cs.name() + " " + fill_name(fill));
      const RowwiseFp8 in = make_rowwise(cs.M, cs.K, fill, 300 + cs.M);
      ColwiseFp8 tm(cs.M, cs.K, cs.groups), ct(cs.M, cs.K, cs.groups);
      const int64_t n_tm = run(in, tm, kTileMax), n_ct = run(in, ct, kTight);
      EXPECT_LE(n_ct, n_tm);
      for (int64_t i = 0; i < tm.scale.v.numel(); ++i) {
        const float s_tm = cptr<float>(tm.scale)[i], s_ct = cptr<float>(ct.scale)[i];
        ASSERT_LE(s_ct, s_tm) << "scale " << i;
        finer += s_ct < s_tm;
      }
    }
  }
  EXPECT_GT(finer, 0);  // and it is tighter somewhere
}

// TileMax's exponent per (tile, block) is the max row exponent over rows whose block has a
// nonzero code; all-zero blocks have scale 2^-127 (quantize's rule), so a plain max agrees.
TEST(TransposeRef, TileMaxIgnoresAllZeroRows) {
  const int64_t M = 300, K = 256;
  const RowwiseFp8 in = make_rowwise(M, K, Fill::Adversarial, 5);  // rows 3, 10, 17... all zero
  for (int64_t m = 0; m < M; ++m) {
    if (m % 7 != 3) continue;
    for (int64_t kb = 0; kb < K / 128; ++kb)
      ASSERT_EQ(cptr<float>(in.scale)[kb * M + m], std::ldexp(1.f, -127));
  }
  ColwiseFp8 out(M, K);
  run(in, out, kTileMax);
  const detail::GroupTiles g = detail::make_group_tiles(std::span<const int64_t>{}, M);
  for (int32_t tile = 0; tile < g.total_tiles; ++tile) {
    int32_t m0, w;
    g.tile_cols(tile, m0, w);
    for (int64_t kb = 0; kb < K / 128; ++kb) {
      int want = -127;
      for (int64_t m = m0; m < m0 + w; ++m) {
        bool nonzero = false;
        for (int64_t k = kb * 128; k < kb * 128 + 128; ++k)
          nonzero |= (cptr<uint8_t>(in.data)[m * K + k] & 0x7F) != 0;
        if (nonzero) want = std::max(want, fmt::pow2_exponent(cptr<float>(in.scale)[kb * M + m]));
      }
      for (int64_t k = kb * 128; k < kb * 128 + 128; ++k)
        EXPECT_EQ(cptr<float>(out.scale)[tile * K + k], fmt::exp2i(want));
    }
  }
}

// Independent oracle for the element step: code * 2^d rounded to nearest-even on the E4M3 grid
// (subnormal step 2^-9), computed in double; exhaustive over codes and d in [-60, 60] without
// overflow. The reference and the kernel both round through fmt::e4m3_mul_pow2.
TEST(TransposeRef, ElementRescaleIsRneOnTheE4M3Grid) {
  for (int code = 0; code < 256; ++code) {
    const float v = fmt::e4m3_to_f32(uint8_t(code));
    for (int d = -60; d <= 60; ++d) {
      const uint8_t r = fmt::e4m3_mul_pow2(uint8_t(code), d);
      if (std::isnan(v)) {
        ASSERT_EQ(r, code);
        continue;
      }
      const double exact = std::ldexp(double(v), d);
      if (std::fabs(exact) > 448.0) continue;  // saturation: never happens in the transpose
      double want;
      if (std::fabs(exact) >= std::ldexp(1.0, -6)) {
        want = exact;  // normal range: 4 significant bits survive a power-of-two shift
      } else {
        want = std::nearbyint(std::ldexp(exact, 9)) * std::ldexp(1.0, -9);  // RNE (default mode)
      }
      ASSERT_EQ(double(fmt::e4m3_to_f32(r)), want) << "code " << code << " d " << d;
      ASSERT_EQ(r & 0x80, code & 0x80);  // sign kept, also for zeros
    }
  }
}

TEST(TransposeRef, GroupsTilesRestartPerGroup) {
  // Tiles: group 128 -> 1, group 5 -> 1, group 300 -> 3, group 77 -> 1: 6 scale rows.
  const TransposeCase cs{510, 128, {0, 128, 5, 300, 0, 77}};
  const RowwiseFp8 in = make_rowwise(cs.M, cs.K, Fill::Normal, 8);
  ColwiseFp8 out(cs.M, cs.K, cs.groups);
  ASSERT_EQ(out.scale.v.rows, 6);
  run(in, out, kTileMax);
  // Tile 1 is group 1 (tokens 128..132) alone: its exponent is the max over exactly those rows.
  int want = -127;
  for (int64_t m = 128; m < 133; ++m)
    want = std::max(want, fmt::pow2_exponent(cptr<float>(in.scale)[m]));
  EXPECT_EQ(cptr<float>(out.scale)[1 * cs.K + 0], fmt::exp2i(want));
  EXPECT_EQ(check_exact(in, out).bad, 0);
  // The output is fully written: no poison bytes left in the data.
  ColwiseFp8 again(cs.M, cs.K, cs.groups);
  std::fill(again.data.buf.begin(), again.data.buf.end(), 0x5A);
  run(in, again, kTileMax);
  EXPECT_TRUE(bytes_equal(again.data, out.data));
}

TEST(TransposeRef, NaNCodesStayAndDoNotMoveScales) {
  const int64_t M = 256, K = 128;
  RowwiseFp8 in = make_rowwise(M, K, Fill::Normal, 9);
  RowwiseFp8 zeroed = make_rowwise(M, K, Fill::Normal, 9);
  for (int64_t i = 0; i < M * K; i += 37) {
    const uint8_t sign = uint8_t(i & 1) << 7;
    in.data.ptr<uint8_t>()[i] = sign | 0x7F;
    zeroed.data.ptr<uint8_t>()[i] = 0;
  }
  for (auto policy : {kTileMax, kTight}) {
    ColwiseFp8 a(M, K), b(M, K);
    run(in, a, policy);
    run(zeroed, b, policy);
    EXPECT_TRUE(bytes_equal(a.scale, b.scale)) << policy_name(policy);
    for (int64_t i = 0; i < M * K; i += 37) {
      const int64_t m = i / K, k = i % K;
      EXPECT_EQ(a.data.ptr<uint8_t>()[k * M + m], cptr<uint8_t>(in.data)[i]);
    }
  }
}

TEST(TransposeRef, AllZeroTiles) {
  const int64_t M = 200, K = 256;
  RowwiseFp8 in = make_rowwise(M, K, Fill::Zeros, 1);
  for (int64_t i = 0; i < M * K; i += 3) in.data.ptr<uint8_t>()[i] = 0x80;  // -0 stays -0
  for (auto policy : {kTileMax, kTight}) {
    ColwiseFp8 out(M, K);
    EXPECT_EQ(run(in, out, policy), 0);
    for (int64_t i = 0; i < out.scale.v.numel(); ++i)
      ASSERT_EQ(cptr<float>(out.scale)[i], std::ldexp(1.f, -127));
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k)
        ASSERT_EQ(out.data.ptr<uint8_t>()[k * M + m], cptr<uint8_t>(in.data)[m * K + k]);
  }
}

TEST(TransposeRef, OneTokenAndEmpty) {
  const RowwiseFp8 in = make_rowwise(1, 256, Fill::WideRange, 3);
  ColwiseFp8 out(1, 256);
  run(in, out, kTight);
  EXPECT_EQ(check_exact(in, out).bad, 0);
  // One token: its own exponents per column; every value is exact (no underflow possible).
  EXPECT_EQ(check_exact(in, out).changed, 0);
  const RowwiseFp8 empty = make_rowwise(0, 128, Fill::Normal, 3);
  ColwiseFp8 out0(0, 128);
  EXPECT_EQ(run(empty, out0, kTight), 0);
}

// Memory vs. the naive flow. Two naive variants:
//  (a) dequantize -> BF16 -> quantize_transposed: BF16 holds every E4M3 value times a power of two
//      exactly, so this is bit-identical to ColumnTight (checked) and loses only the same
//      underflowed elements: nonzero error on WideRange, and all of it is what we count;
//  (b) the naive flow as TE runs it: the column-wise copy quantized from the original BF16 data,
//      a second rounding of every element at another scale: fprop and wgrad see different values.
TEST(TransposeRef, NaiveFlowErrorsVersusOurs) {
  const int64_t M = 1024, K = 512;
  for (Fill fill : {Fill::Normal, Fill::WideRange}) {
    const std::vector<float> vals = make_values(M, K, fill, 77);
    const HostTensor x_bf16 = host_from_values(vals, DType::BF16, M, K);
    RowwiseFp8 in{HostTensor(DType::E4M3, M, K), HostTensor(DType::F32, K / 128, M)};
    quantize(x_bf16.v, in.view());
    const HostTensor row_vals = dequant(in.view());

    ColwiseFp8 ours(M, K);
    const int64_t counted = run(in, ours, kTight);
    const ExactnessReport rep = check_exact(in, ours);

    // (a) dequantize -> BF16 -> quantize_transposed
    HostTensor deq_bf16(DType::BF16, M, K);
    dequantize(in.view(), deq_bf16.v);
    ColwiseFp8 naive_a(M, K);
    quantize_transposed(deq_bf16.v, naive_a.view());
    const ExactnessReport rep_a = check_exact(in, naive_a);

    // (b) column-wise quantized from the original BF16 values
    ColwiseFp8 naive_b(M, K);
    quantize_transposed(x_bf16.v, naive_b.view());
    const HostTensor col_b = dequant(naive_b.view());
    int64_t differ_b = 0;
    double max_rel_b = 0;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) {
        const float r = cptr<float>(row_vals)[m * K + k], c = cptr<float>(col_b)[k * M + m];
        if (r == c || (std::isnan(r) && std::isnan(c))) continue;
        ++differ_b;
        if (r != 0) max_rel_b = std::max(max_rel_b, std::fabs(double(c) - r) / std::fabs(r));
      }

    const std::string tag = fill_name(fill);
    std::printf(
        "[naive vs ours] %s %lldx%lld: ours (ColumnTight) changed %lld = counted %lld; "
        "(a) dequant->BF16->quantize_transposed changed %lld (bit-identical to ours: %s); "
        "(b) quantize_transposed(original BF16) differs from the row-wise values at %lld of %lld "
        "elements, max rel diff %.3g\n",
        tag.c_str(), (long long)M, (long long)K, (long long)rep.changed, (long long)counted,
        (long long)rep_a.changed, bytes_equal(ours.data, naive_a.data) ? "yes" : "no",
        (long long)differ_b, (long long)(M * K), max_rel_b);
    ::testing::Test::RecordProperty(tag + "_ours_changed", std::to_string(rep.changed));
    ::testing::Test::RecordProperty(tag + "_naive_a_changed", std::to_string(rep_a.changed));
    ::testing::Test::RecordProperty(tag + "_naive_b_differ", std::to_string(differ_b));

    EXPECT_EQ(rep.bad, 0);
    EXPECT_EQ(rep.changed, counted);
    EXPECT_TRUE(bytes_equal(ours.data, naive_a.data));
    EXPECT_GT(differ_b, 0);  // the naive flow's second rounding changes values
    if (fill == Fill::WideRange) {
      EXPECT_GT(rep_a.changed, 0);        // the dequant/requant round trip is not free either...
      EXPECT_EQ(rep_a.changed, counted);  // ...and its loss is exactly the underflow we count
      EXPECT_GT(differ_b, counted);
    }
  }
}

}  // namespace
}  // namespace fp8flow::test
