// Emulated sm90 quantize kernels (CPU threads, fake_cuda/) vs fp8flow::ref, bit for bit. Run with
// tests/quantize/cpu_emulation/run.sh; see there for what it does and does not check.
#include <gtest/gtest.h>
#include "common/test_util.h"
#include "ops/quantize/quantize_backends.h"
#include "quantize/block_edge_values.h"
using namespace fp8flow;
using namespace fp8flow::test;

struct Q {
  HostTensor d, s;
  ScaleLayout l;
  std::vector<int64_t> g;
  Q(DType fp8, int64_t r, int64_t c, ScaleLayout l_ = ScaleLayout::Rowwise1x128,
    std::vector<int64_t> g_ = {}, uint8_t poison = 0x5A)
      : l(l_), g(std::move(g_)) {
    auto ss = scale_shape(l, r, c, g);
    d = HostTensor(fp8, r, c, poison);
    s = HostTensor(DType::F32, ss.rows, ss.cols, poison);
  }
  ScaledTensor v() const { return {d.v, s.v, l, g}; }
};

struct Shape {
  int64_t M, K;
  std::vector<int64_t> g;
};
static const std::vector<Shape> shapes = {{1, 16, {}},
                                          {127, 144, {}},
                                          {300, 2064, {}},
                                          {510, 144, {0, 128, 5, 300, 0, 77}},
                                          {127, 144, {1, 126}},
                                          {1, 16, {0, 1, 0}},
                                          {300, 272, {7, 0, 293}},
                                          {256, 400, {128, 128}}};

TEST(Emu, AllQuantize) {
  for (auto& sh : shapes)
    for (Fill f : {Fill::Normal, Fill::WideRange, Fill::Adversarial})
      for (DType in_dt : {DType::BF16, DType::F32})
        for (DType fp8 : {DType::E4M3, DType::E5M2}) {
          SCOPED_TRACE(::testing::Message()
                       << sh.M << "x" << sh.K << " fill " << int(f) << " " << to_string(in_dt)
                       << " " << to_string(fp8) << " groups " << sh.g.size());
          HostTensor in = host_from_values(make_values(sh.M, sh.K, f, 5 + sh.M), in_dt, sh.M, sh.K);
          // rowwise
          Q r1(fp8, sh.M, sh.K), r2(fp8, sh.M, sh.K, ScaleLayout::Rowwise1x128, {}, 0xA5);
          ref::quantize(in.v, r1.v());
          sm90::quantize(in.v, r2.v(), nullptr);
          ASSERT_TRUE(bytes_equal(r1.d, r2.d));
          ASSERT_TRUE(bytes_equal(r1.s, r2.s));
          // block
          Q b1(fp8, sh.M, sh.K, ScaleLayout::Block128x128),
              b2(fp8, sh.M, sh.K, ScaleLayout::Block128x128, {}, 0xA5);
          ref::quantize(in.v, b1.v());
          sm90::quantize(in.v, b2.v(), nullptr);
          ASSERT_TRUE(bytes_equal(b1.d, b2.d));
          ASSERT_TRUE(bytes_equal(b1.s, b2.s));
          // transposed
          Q t1(fp8, sh.K, sh.M, ScaleLayout::Rowwise1x128, sh.g),
              t2(fp8, sh.K, sh.M, ScaleLayout::Rowwise1x128, sh.g, 0xA5);
          ref::quantize_transposed(in.v, t1.v());
          sm90::quantize_transposed(in.v, t2.v(), nullptr);
          ASSERT_TRUE(bytes_equal(t1.d, t2.d));
          ASSERT_TRUE(bytes_equal(t1.s, t2.s));
          // both
          Q r3(fp8, sh.M, sh.K, ScaleLayout::Rowwise1x128, {}, 0xA5),
              t3(fp8, sh.K, sh.M, ScaleLayout::Rowwise1x128, sh.g, 0xA5);
          sm90::quantize_both(in.v, r3.v(), t3.v(), nullptr);
          ASSERT_TRUE(bytes_equal(r1.d, r3.d));
          ASSERT_TRUE(bytes_equal(r1.s, r3.s));
          ASSERT_TRUE(bytes_equal(t1.d, t3.d));
          ASSERT_TRUE(bytes_equal(t1.s, t3.s));
        }
}

TEST(Emu, TransposedMisaligned) {
  for (auto& sh : std::vector<Shape>{{160, 144, {}}, {300, 272, {7, 0, 293}}})
    for (int off : {1, 2, 3, 4, 5, 8, 12}) {
      SCOPED_TRACE(off);
      HostTensor in =
          host_from_values(make_values(sh.M, sh.K, Fill::Normal, 3), DType::BF16, sh.M, sh.K);
      Q t1(DType::E4M3, sh.K, sh.M, ScaleLayout::Rowwise1x128, sh.g);
      ref::quantize_transposed(in.v, t1.v());
      HostTensor big(DType::E4M3, sh.K + 1, sh.M, 0xA5);
      Q t2(DType::E4M3, sh.K, sh.M, ScaleLayout::Rowwise1x128, sh.g, 0xA5);
      ScaledTensor st = t2.v();
      st.data.data = big.buf.data() + off;
      sm90::quantize_transposed(in.v, st, nullptr);
      ASSERT_EQ(0, std::memcmp(big.buf.data() + off, t1.d.buf.data(), t1.d.bytes()));
      for (int i = 0; i < off; ++i) ASSERT_EQ(big.buf[i], 0xA5);
      for (size_t i = off + t1.d.bytes(); i < big.bytes(); ++i) ASSERT_EQ(big.buf[i], 0xA5);
      ASSERT_TRUE(bytes_equal(t1.s, t2.s));
    }
}

TEST(Emu, Dequantize) {
  struct C {
    DType codes;
    ScaleLayout l;
    int64_t R, Cc;
    std::vector<int64_t> g;
  };
  std::vector<C> cs = {{DType::E4M3, ScaleLayout::Rowwise1x128, 300, 2064, {}},
                       {DType::E5M2, ScaleLayout::Rowwise1x128, 127, 144, {}},
                       {DType::E4M3, ScaleLayout::Rowwise1x128, 144, 510, {0, 128, 5, 300, 0, 77}},
                       {DType::E5M2, ScaleLayout::Rowwise1x128, 33, 256, {5, 27, 0, 96, 128}},
                       {DType::E4M3, ScaleLayout::Block128x128, 300, 2064, {}},
                       {DType::E5M2, ScaleLayout::Block128x128, 129, 100, {}},
                       {DType::E2M1x2, ScaleLayout::Mx1x32, 33, 4096, {}},
                       {DType::E2M1x2, ScaleLayout::Mx1x32, 5, 32, {}}};
  uint64_t seed = 1;
  for (auto& c : cs) {
    HostTensor codes(c.codes, c.R, c.Cc);
    std::mt19937_64 rng(++seed);
    for (auto& b : codes.buf) b = uint8_t(rng());
    auto ss = scale_shape(c.l, c.R, c.Cc, c.g);
    HostTensor sc(c.l == ScaleLayout::Mx1x32 ? DType::E8M0 : DType::F32, ss.rows, ss.cols);
    if (c.l == ScaleLayout::Mx1x32)
      for (auto& b : sc.buf) b = uint8_t(rng());
    else
      for (int64_t i = 0; i < ss.rows * ss.cols; ++i) {
        uint64_t r = rng();
        sc.ptr<float>()[i] =
            r % 5 == 0 ? 0.3f * float(r % 1000) : std::ldexp(1.f, int(r % 255) - 127);
      }
    ScaledTensor in{codes.v, sc.v, c.l, c.g};
    for (DType od : {DType::F32, DType::BF16})
      for (int pad : {0, 1, 16}) {
        SCOPED_TRACE(::testing::Message() << to_string(c.codes) << " " << c.R << "x" << c.Cc << " "
                                          << to_string(od) << " pad " << pad);
        HostTensor o1(od, c.R, c.Cc + pad, 0x5A), o2(od, c.R, c.Cc + pad, 0x5A);
        TensorView v1 = o1.v, v2 = o2.v;
        v1.cols = v2.cols = c.Cc;
        v1.ld = v2.ld = c.Cc + pad;
        ref::dequantize(in, v1);
        sm90::dequantize(in, v2, nullptr);
        ASSERT_TRUE(bytes_equal(o1, o2));
      }
  }
}

// 128x128 block quantize at the edges of the formats (the GPU test's Block128EdgeBlocks inputs).
TEST(Emu, Block128EdgeBlocks) {
  for (auto [M, K] : {std::pair<int64_t, int64_t>{257, 400}, {128, 16}})
    for (DType in_dt : {DType::BF16, DType::F32})
      for (DType fp8 : {DType::E4M3, DType::E5M2}) {
        SCOPED_TRACE(::testing::Message()
                     << M << "x" << K << " " << to_string(in_dt) << " " << to_string(fp8));
        const HostTensor in = host_from_values(block_edge_values(M, K, 300 + M), in_dt, M, K);
        Q b1(fp8, M, K, ScaleLayout::Block128x128),
            b2(fp8, M, K, ScaleLayout::Block128x128, {}, 0xA5);
        ref::quantize(in.v, b1.v());
        sm90::quantize(in.v, b2.v(), nullptr);
        ASSERT_TRUE(bytes_equal(b1.d, b2.d));
        ASSERT_TRUE(bytes_equal(b1.s, b2.s));
      }
}
