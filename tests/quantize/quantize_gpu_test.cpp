// CUDA backend of quantize / quantize_transposed / quantize_both / dequantize == CPU reference,
// bit for bit (codes and scales), over both input dtypes, both FP8 formats, odd shapes, grouped
// token splits, realistic / wide-range / adversarial inputs, misaligned X^T rows, strided
// dequantize outputs, and an encode sweep over every exponent and rounding pattern. Outputs are
// poisoned before the run on both sides (device 0xA5, host 0x5A), so an element that either side
// leaves unwritten shows up as a difference.
//
// Skips without a GPU. FP8FLOW_QUANTIZE_TEST_SELF=1 runs the same harness with the CPU backend as
// the "device under test" (a check of the harness itself on a machine without a GPU).
#include <gtest/gtest.h>

#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "common/test_util.h"
#include "quantize/block_edge_values.h"

#if FP8FLOW_WITH_CUDA

namespace fp8flow::test {
namespace {

Device dut() {
  const char* e = std::getenv("FP8FLOW_QUANTIZE_TEST_SELF");
  return e && e[0] == '1' ? Device::Cpu : Device::Cuda;
}

// Poison of unwritten bytes in the device-under-test's buffers.
uint8_t dut_poison() {
  return dut() == Device::Cuda ? 0xA5 : 0x5A;
}

#define REQUIRE_DUT()                                 \
  do {                                                \
    if (dut() == Device::Cuda) FP8FLOW_REQUIRE_GPU(); \
  } while (0)

HostTensor copy_of(const HostTensor& h) {
  HostTensor c(h.v.dtype, h.v.rows, h.v.cols);
  std::copy(h.buf.begin(), h.buf.end(), c.buf.begin());
  return c;
}

// A tensor on the device under test (or, for the reference, on the host), readable as host bytes.
class Buf {
 public:
  Buf(Device dev, DType d, int64_t rows, int64_t cols, uint8_t host_poison = 0x5A) : dev_(dev) {
    if (dev == Device::Cuda) {
      dev_t_ = std::make_unique<DeviceTensor>(d, rows, cols);
      v = dev_t_->v;
    } else {
      host_ = HostTensor(d, rows, cols, host_poison);
      v = host_.v;
    }
  }
  Buf(Device dev, const HostTensor& h) : dev_(dev) {
    if (dev == Device::Cuda) {
      dev_t_ = std::make_unique<DeviceTensor>(h);
      v = dev_t_->v;
    } else {
      host_ = copy_of(h);
      v = host_.v;
    }
  }
  HostTensor read() const { return dev_ == Device::Cuda ? dev_t_->to_host() : copy_of(host_); }
  TensorView v;

 private:
  Device dev_;
  HostTensor host_;
  std::unique_ptr<DeviceTensor> dev_t_;
};

struct QBuf {
  Buf data, scale;
  ScaleLayout layout;
  std::vector<int64_t> groups;
  QBuf(Device dev, DType fp8, int64_t rows, int64_t cols, ScaleLayout l = ScaleLayout::Rowwise1x128,
       std::vector<int64_t> g = {})
      : data(dev, fp8, rows, cols),
        scale(dev, l == ScaleLayout::Mx1x32 ? DType::E8M0 : DType::F32,
              scale_shape(l, rows, cols, g).rows, scale_shape(l, rows, cols, g).cols),
        layout(l),
        groups(std::move(g)) {}
  ScaledTensor view() const { return ScaledTensor{data.v, scale.v, layout, groups}; }
};

::testing::AssertionResult same(const QBuf& a, const QBuf& b) {
  auto d = bytes_equal(a.data.read(), b.data.read());
  if (!d) return d << " (codes)";
  auto s = bytes_equal(a.scale.read(), b.scale.read());
  if (!s) return s << " (scales)";
  return ::testing::AssertionSuccess();
}

struct Shape {
  int64_t M, K;
};
const std::vector<Shape> kShapes = {{1, 16}, {127, 144}, {300, 2064}, {1024, 7168}};
const DType kInTypes[] = {DType::BF16, DType::F32};
const DType kFp8Types[] = {DType::E4M3, DType::E5M2};
const Fill kFills[] = {Fill::Normal, Fill::WideRange, Fill::Adversarial};

// The large shape only with BF16 input (the production case) to keep the CPU reference cheap.
bool big(const Shape& s) {
  return s.M * s.K > 1'000'000;
}
bool skip_combo(const Shape& s, DType in_dt) {
  return s.M * s.K > 1'000'000 && in_dt == DType::F32;
}

std::string name(const Shape& s, DType in, DType fp8, Fill f) {
  return ::testing::PrintToString(s.M) + "x" + ::testing::PrintToString(s.K) + " " + to_string(in) +
         "->" + to_string(fp8) + " fill " + ::testing::PrintToString(int(f));
}

// ---------------------------------------------------------------------------------------------
TEST(GpuQuantize, RowwiseMatchesReference) {
  REQUIRE_DUT();
  for (const Shape& s : kShapes)
    for (Fill fill : kFills) {
      const std::vector<float> x = make_values(s.M, s.K, fill, 100 + s.M);
      for (DType in_dt : kInTypes) {
        if (skip_combo(s, in_dt)) continue;
        const HostTensor h = host_from_values(x, in_dt, s.M, s.K);
        const Buf in_ref(Device::Cpu, h), in_dut(dut(), h);
        for (DType fp8 : kFp8Types) {
          SCOPED_TRACE(name(s, in_dt, fp8, fill));
          QBuf ref(Device::Cpu, fp8, s.M, s.K), got(dut(), fp8, s.M, s.K);
          quantize(in_ref.v, ref.view());
          quantize(in_dut.v, got.view());
          ASSERT_TRUE(same(ref, got));
        }
      }
    }
}

TEST(GpuQuantize, Block128MatchesReference) {
  REQUIRE_DUT();
  for (const Shape& s : {Shape{1, 16}, Shape{127, 144}, Shape{300, 2064}, Shape{256, 512}})
    for (Fill fill : kFills) {
      const std::vector<float> x = make_values(s.M, s.K, fill, 200 + s.M);
      for (DType in_dt : kInTypes) {
        const HostTensor h = host_from_values(x, in_dt, s.M, s.K);
        const Buf in_ref(Device::Cpu, h), in_dut(dut(), h);
        for (DType fp8 : kFp8Types) {
          SCOPED_TRACE(name(s, in_dt, fp8, fill));
          QBuf ref(Device::Cpu, fp8, s.M, s.K, ScaleLayout::Block128x128);
          QBuf got(dut(), fp8, s.M, s.K, ScaleLayout::Block128x128);
          quantize(in_ref.v, ref.view());
          quantize(in_dut.v, got.view());
          ASSERT_TRUE(same(ref, got));
        }
      }
    }
}

// 128x128 blocks at the edges of the formats (block_edge_values): see block_edge_values.h.
TEST(GpuQuantize, Block128EdgeBlocks) {
  REQUIRE_DUT();
  for (const Shape& s : {Shape{257, 400}, Shape{128, 16}, Shape{1024, 1024}}) {
    const std::vector<float> x = block_edge_values(s.M, s.K, 300 + s.M);
    for (DType in_dt : kInTypes) {
      const HostTensor h = host_from_values(x, in_dt, s.M, s.K);
      const Buf in_ref(Device::Cpu, h), in_dut(dut(), h);
      for (DType fp8 : kFp8Types) {
        SCOPED_TRACE(::testing::Message()
                     << s.M << "x" << s.K << " " << to_string(in_dt) << "->" << to_string(fp8));
        QBuf ref(Device::Cpu, fp8, s.M, s.K, ScaleLayout::Block128x128);
        QBuf got(dut(), fp8, s.M, s.K, ScaleLayout::Block128x128);
        quantize(in_ref.v, ref.view());
        quantize(in_dut.v, got.view());
        ASSERT_TRUE(same(ref, got));
        HostTensor sc = ref.scale.read();
        EXPECT_EQ(sc.ptr<float>()[0], std::ldexp(1.f, -127));  // the all-zero block
      }
    }
  }
}

// Token splits (m_splits) for X^T: none, zeros, sizes that are not multiples of 128 or 16.
struct GroupCase {
  Shape s;
  std::vector<int64_t> groups;
};
std::vector<GroupCase> group_cases() {
  std::vector<GroupCase> c;
  for (const Shape& s : kShapes) c.push_back({s, {}});
  c.push_back({{510, 144}, {0, 128, 5, 300, 0, 77}});
  c.push_back({{300, 2064}, {300}});
  c.push_back({{1, 16}, {0, 1, 0}});
  c.push_back({{127, 144}, {1, 126}});
  c.push_back({{1024, 256}, {128, 128, 128, 128, 128, 128, 128, 128}});
  c.push_back({{1024, 7168}, {100, 412, 0, 512}});
  return c;
}

TEST(GpuQuantize, TransposedMatchesReference) {
  REQUIRE_DUT();
  for (const GroupCase& gc : group_cases())
    for (Fill fill : kFills) {
      const Shape s = gc.s;
      const std::vector<float> x = make_values(s.M, s.K, fill, 300 + s.M);
      for (DType in_dt : kInTypes) {
        if (skip_combo(s, in_dt)) continue;
        const HostTensor h = host_from_values(x, in_dt, s.M, s.K);
        const Buf in_ref(Device::Cpu, h), in_dut(dut(), h);
        for (DType fp8 : kFp8Types) {
          SCOPED_TRACE(name(s, in_dt, fp8, fill) + " groups " +
                       ::testing::PrintToString(gc.groups));
          QBuf ref(Device::Cpu, fp8, s.K, s.M, ScaleLayout::Rowwise1x128, gc.groups);
          QBuf got(dut(), fp8, s.K, s.M, ScaleLayout::Rowwise1x128, gc.groups);
          quantize_transposed(in_ref.v, ref.view());
          quantize_transposed(in_dut.v, got.view());
          ASSERT_TRUE(same(ref, got));
        }
      }
    }
}

// quantize_both == quantize + quantize_transposed (reference), for one and for two FP8 formats.
TEST(GpuQuantize, BothMatchesSeparateReference) {
  REQUIRE_DUT();
  for (const GroupCase& gc : group_cases())
    for (Fill fill : kFills) {
      const Shape s = gc.s;
      const std::vector<float> x = make_values(s.M, s.K, fill, 400 + s.M);
      for (DType in_dt : kInTypes) {
        if (skip_combo(s, in_dt)) continue;
        const HostTensor h = host_from_values(x, in_dt, s.M, s.K);
        const Buf in_ref(Device::Cpu, h), in_dut(dut(), h);
        for (auto [fp8, fp8_t] :
             {std::pair{DType::E4M3, DType::E4M3}, std::pair{DType::E5M2, DType::E5M2},
              std::pair{DType::E4M3, DType::E5M2}}) {
          if (big(s) && (fp8 != fp8_t || fill == Fill::WideRange)) continue;
          SCOPED_TRACE(name(s, in_dt, fp8, fill) + " out_t " + to_string(fp8_t) + " groups " +
                       ::testing::PrintToString(gc.groups));
          QBuf ref(Device::Cpu, fp8, s.M, s.K), got(dut(), fp8, s.M, s.K);
          QBuf ref_t(Device::Cpu, fp8_t, s.K, s.M, ScaleLayout::Rowwise1x128, gc.groups);
          QBuf got_t(dut(), fp8_t, s.K, s.M, ScaleLayout::Rowwise1x128, gc.groups);
          quantize(in_ref.v, ref.view());
          quantize_transposed(in_ref.v, ref_t.view());
          quantize_both(in_dut.v, got.view(), got_t.view());
          ASSERT_TRUE(same(ref, got)) << "row-wise output";
          ASSERT_TRUE(same(ref_t, got_t)) << "column-wise output";
        }
      }
    }
}

// Rows of X^T start at k * M + group offset: exercise every destination alignment.
TEST(GpuQuantize, TransposedAnyOutputAlignment) {
  REQUIRE_DUT();
  for (const GroupCase& gc : std::vector<GroupCase>{{{160, 144}, {}}, {{300, 272}, {7, 0, 293}}}) {
    const Shape s = gc.s;
    const HostTensor h =
        host_from_values(make_values(s.M, s.K, Fill::Normal, 7), DType::BF16, s.M, s.K);
    const Buf in_ref(Device::Cpu, h), in_dut(dut(), h);
    QBuf ref(Device::Cpu, DType::E4M3, s.K, s.M, ScaleLayout::Rowwise1x128, gc.groups);
    quantize_transposed(in_ref.v, ref.view());
    const HostTensor want = ref.data.read();
    for (int64_t offset : {1, 2, 3, 4, 5, 8, 12}) {
      SCOPED_TRACE(::testing::Message() << "M " << s.M << " offset " << offset);
      Buf big(dut(), DType::E4M3, s.K + 1, s.M);  // room for the offset
      QBuf got(dut(), DType::E4M3, s.K, s.M, ScaleLayout::Rowwise1x128, gc.groups);
      ScaledTensor t = got.view();
      t.data = big.v;
      t.data.rows = s.K;
      t.data.data = static_cast<uint8_t*>(big.v.data) + offset;
      quantize_transposed(in_dut.v, t);
      const HostTensor all = big.read();
      HostTensor codes(DType::E4M3, s.K, s.M);
      std::copy(all.buf.begin() + offset,
                all.buf.begin() + offset + static_cast<int64_t>(codes.bytes()), codes.buf.begin());
      ASSERT_TRUE(bytes_equal(want, codes));
      ASSERT_TRUE(bytes_equal(ref.scale.read(), got.scale.read()));
      for (int64_t i = 0; i < offset; ++i)
        ASSERT_EQ(all.buf[static_cast<size_t>(i)], dut_poison()) << "wrote before the start";
      const size_t end = static_cast<size_t>(offset) + codes.bytes();
      for (size_t i = end; i < all.bytes(); ++i)
        ASSERT_EQ(all.buf[i], dut_poison()) << "wrote past the end";
    }
  }
}

TEST(GpuQuantize, EmptyAndStream) {
  REQUIRE_DUT();
  for (const Shape& s : {Shape{0, 16}, Shape{5, 0}, Shape{0, 0}}) {
    const HostTensor h = host_from_values({}, DType::BF16, s.M, s.K);
    const Buf in(dut(), h);
    QBuf q(dut(), DType::E4M3, s.M, s.K), qt(dut(), DType::E4M3, s.K, s.M);
    EXPECT_NO_THROW(quantize(in.v, q.view()));
    EXPECT_NO_THROW(quantize_transposed(in.v, qt.view()));
    EXPECT_NO_THROW(quantize_both(in.v, q.view(), qt.view()));
    EXPECT_NO_THROW(dequantize(q.view(), Buf(dut(), DType::F32, s.M, s.K).v));
  }
  if (dut() != Device::Cuda) return;
  // A non-default stream: results land after a sync of that stream.
  cudaStream_t st;
  ASSERT_EQ(cudaStreamCreate(&st), cudaSuccess);
  const Shape s{257, 400};
  const HostTensor h =
      host_from_values(make_values(s.M, s.K, Fill::Normal, 9), DType::BF16, s.M, s.K);
  const Buf in_ref(Device::Cpu, h), in_dut(Device::Cuda, h);
  QBuf ref(Device::Cpu, DType::E4M3, s.M, s.K), got(Device::Cuda, DType::E4M3, s.M, s.K);
  QBuf ref_t(Device::Cpu, DType::E4M3, s.K, s.M), got_t(Device::Cuda, DType::E4M3, s.K, s.M);
  quantize_both(in_ref.v, ref.view(), ref_t.view());
  quantize_both(in_dut.v, got.view(), got_t.view(), {}, st);
  ASSERT_EQ(cudaStreamSynchronize(st), cudaSuccess);
  EXPECT_TRUE(same(ref, got));
  EXPECT_TRUE(same(ref_t, got_t));
  cudaStreamDestroy(st);
}

// Every exponent and rounding pattern through the encoder: rows of 128 F32 values whose first
// element is the format's max (so the scale is exactly 1) and whose others are built from
// (sign, exponent field, top 8 mantissa bits, low-bit pattern): ties, ties +- 1 ulp, FP32
// subnormals, zeros. Checks the device's finite-value encoder against fmt:: on ~400K values.
TEST(GpuQuantize, EncodeSweep) {
  REQUIRE_DUT();
  for (DType fp8 : kFp8Types) {
    SCOPED_TRACE(to_string(fp8));
    const float fmax = fp8 == DType::E4M3 ? fmt::kE4M3Max : fmt::kE5M2Max;
    std::vector<float> vals;
    for (uint32_t sign : {0u, 0x80000000u})
      for (uint32_t e = 0; e < 255; ++e)
        for (uint32_t top = 0; top < 256; ++top)
          for (uint32_t low : {0u, 1u, 0x3FFFu, 0x4000u, 0x4001u, 0x7FFFu}) {
            const float v = fmt::f32_from_bits(sign | (e << 23) | (top << 15) | low);
            if (std::fabs(v) <= fmax) vals.push_back(v);
          }
    const int64_t K = 128, M = (static_cast<int64_t>(vals.size()) + K - 2) / (K - 1);
    std::vector<float> x(static_cast<size_t>(M * K), 0.f);
    for (int64_t m = 0, i = 0; m < M; ++m) {
      x[static_cast<size_t>(m * K)] = fmax;
      for (int64_t k = 1; k < K && i < static_cast<int64_t>(vals.size()); ++k, ++i)
        x[static_cast<size_t>(m * K + k)] = vals[static_cast<size_t>(i)];
    }
    const HostTensor h = host_from_values(x, DType::F32, M, K);
    const Buf in_ref(Device::Cpu, h), in_dut(dut(), h);
    QBuf ref(Device::Cpu, fp8, M, K), got(dut(), fp8, M, K);
    quantize(in_ref.v, ref.view());
    quantize(in_dut.v, got.view());
    ASSERT_TRUE(same(ref, got)) << "row-wise encoder";
    const HostTensor sc = ref.scale.read();
    ASSERT_EQ(reinterpret_cast<const float*>(sc.buf.data())[0], 1.f);
    // The column-wise kernel encodes through its own path: sweep it too (tiles of 128 tokens,
    // first token of each tile pinned to the max).
    const int64_t Mt = ((M + 127) / 128) * 128, Kt = 128;
    std::vector<float> xt(static_cast<size_t>(Mt * Kt), 0.f);
    for (int64_t m = 0, i = 0; m < Mt; ++m)
      for (int64_t k = 0; k < Kt; ++k) {
        float& d = xt[static_cast<size_t>(m * Kt + k)];
        if (m % 128 == 0)
          d = fmax;
        else if (i < static_cast<int64_t>(vals.size()))
          d = vals[static_cast<size_t>(i++)];
      }
    const HostTensor ht = host_from_values(xt, DType::F32, Mt, Kt);
    const Buf tin_ref(Device::Cpu, ht), tin_dut(dut(), ht);
    QBuf tref(Device::Cpu, fp8, Kt, Mt), tgot(dut(), fp8, Kt, Mt);
    quantize_transposed(tin_ref.v, tref.view());
    quantize_transposed(tin_dut.v, tgot.view());
    ASSERT_TRUE(same(tref, tgot)) << "column-wise encoder";
  }
}

// ---------------------------------------------------------------------------------------------
// dequantize: random codes (all 256 byte values, NaN included) and random scales.
HostTensor random_bytes(DType d, int64_t rows, int64_t cols, uint64_t seed) {
  HostTensor h(d, rows, cols);
  std::mt19937_64 rng(seed);
  for (size_t i = 0; i < h.bytes(); ++i) h.buf[i] = static_cast<uint8_t>(rng());
  return h;
}
HostTensor random_scales(int64_t rows, int64_t cols, uint64_t seed) {
  HostTensor h(DType::F32, rows, cols);
  std::mt19937_64 rng(seed);
  float* p = h.ptr<float>();
  for (int64_t i = 0; i < rows * cols; ++i) {
    const uint64_t r = rng();
    // Mostly powers of two over the full range (subnormal results included), some arbitrary.
    p[i] = r % 5 == 0 ? 0.3f * static_cast<float>(r % 1000)
                      : std::ldexp(1.f, static_cast<int>(r % 255) - 127);
  }
  return h;
}

struct DqCase {
  DType codes;
  ScaleLayout layout;
  int64_t R, C;
  std::vector<int64_t> groups;
};

TEST(GpuDequantize, MatchesReference) {
  REQUIRE_DUT();
  const std::vector<DqCase> cases = {
      {DType::E4M3, ScaleLayout::Rowwise1x128, 300, 2064, {}},
      {DType::E5M2, ScaleLayout::Rowwise1x128, 127, 144, {}},
      {DType::E4M3, ScaleLayout::Rowwise1x128, 1, 16, {}},
      {DType::E4M3, ScaleLayout::Rowwise1x128, 144, 510, {0, 128, 5, 300, 0, 77}},  // scalar path
      {DType::E5M2, ScaleLayout::Rowwise1x128, 33, 256, {5, 27, 0, 96, 128}},  // tiles split chunks
      {DType::E4M3, ScaleLayout::Rowwise1x128, 7168, 1024, {100, 412, 0, 512}},
      {DType::E4M3, ScaleLayout::Block128x128, 300, 2064, {}},
      {DType::E5M2, ScaleLayout::Block128x128, 129, 100, {}},  // scalar path
      {DType::E2M1x2, ScaleLayout::Mx1x32, 33, 4096, {}},
      {DType::E2M1x2, ScaleLayout::Mx1x32, 5, 32, {}},
  };
  uint64_t seed = 1;
  for (const DqCase& c : cases) {
    const HostTensor codes = random_bytes(c.codes, c.R, c.C, ++seed);
    const Shape2D ss = scale_shape(c.layout, c.R, c.C, c.groups);
    const HostTensor scales = c.layout == ScaleLayout::Mx1x32
                                  ? random_bytes(DType::E8M0, ss.rows, ss.cols, ++seed)
                                  : random_scales(ss.rows, ss.cols, ++seed);
    const Buf cr(Device::Cpu, codes), sr(Device::Cpu, scales), cd(dut(), codes), sd(dut(), scales);
    const ScaledTensor in_ref{cr.v, sr.v, c.layout, c.groups},
        in_dut{cd.v, sd.v, c.layout, c.groups};
    for (DType out_dt : {DType::F32, DType::BF16})
      for (int64_t pad : {0, 1, 16}) {  // pad: output row stride = C + pad
        SCOPED_TRACE(::testing::Message()
                     << to_string(c.codes) << " " << to_string(c.layout) << " " << c.R << "x" << c.C
                     << " groups " << ::testing::PrintToString(c.groups) << " -> "
                     << to_string(out_dt) << " ld pad " << pad);
        Buf ref(Device::Cpu, out_dt, c.R, c.C + pad), got(dut(), out_dt, c.R, c.C + pad);
        TensorView ov_ref = ref.v, ov_dut = got.v;
        ov_ref.cols = ov_dut.cols = c.C;
        ov_ref.ld = ov_dut.ld = c.C + pad;
        dequantize(in_ref, ov_ref);
        dequantize(in_dut, ov_dut);
        const HostTensor a = ref.read(), b = got.read();
        // Compare the logical elements; padding columns are never written (device poison 0xA5,
        // host poison 0x5A), so check them separately.
        const size_t eb = static_cast<size_t>(dtype_bits(out_dt) / 8);
        for (int64_t r = 0; r < c.R; ++r) {
          const size_t row = static_cast<size_t>(r * (c.C + pad)) * eb;
          for (size_t i = 0; i < static_cast<size_t>(c.C) * eb; ++i)
            ASSERT_EQ(a.buf[row + i], b.buf[row + i]) << "row " << r << " byte " << i;
          for (size_t i = static_cast<size_t>(c.C) * eb; i < static_cast<size_t>(c.C + pad) * eb;
               ++i)
            ASSERT_EQ(b.buf[row + i], dut_poison()) << "padding written, row " << r;
        }
      }
  }
}

// A quantize -> dequantize round trip on the device equals the same on the host.
TEST(GpuDequantize, RoundTripOfDeviceQuantize) {
  REQUIRE_DUT();
  const Shape s{300, 2064};
  const HostTensor h =
      host_from_values(make_values(s.M, s.K, Fill::Adversarial, 5), DType::BF16, s.M, s.K);
  const Buf in_ref(Device::Cpu, h), in_dut(dut(), h);
  QBuf ref(Device::Cpu, DType::E4M3, s.M, s.K), got(dut(), DType::E4M3, s.M, s.K);
  quantize(in_ref.v, ref.view());
  quantize(in_dut.v, got.view());
  Buf oref(Device::Cpu, DType::BF16, s.M, s.K), odut(dut(), DType::BF16, s.M, s.K);
  dequantize(ref.view(), oref.v);
  dequantize(got.view(), odut.v);
  EXPECT_TRUE(bytes_equal(oref.read(), odut.read()));
}

}  // namespace
}  // namespace fp8flow::test

#endif  // FP8FLOW_WITH_CUDA
