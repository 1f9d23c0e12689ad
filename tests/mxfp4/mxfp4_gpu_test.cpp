// CUDA backend of the MXFP4 ops == CPU reference, bit for bit (data and scales), on poisoned
// outputs: every fill (Adversarial: NaN/Inf/huge/tiny), raw codes over the whole E8M0/FP32 scale
// range (the kernels' exact and generic paths), awkward shapes, grouped and unaligned groups.
// Skips with a printed reason where no GPU is visible.
#include <string>

#include "mxfp4/mxfp4_test_util.h"

#if FP8FLOW_WITH_CUDA
#include <cuda_runtime.h>

#include "ops/mxfp4/mxfp4_backends.h"  // sm90::set_mxfp4_transposed_variant

namespace fp8flow::test {
namespace {

struct Shape {
  int64_t M, K;
};

const Fill kFills[] = {Fill::Normal, Fill::WideRange, Fill::Adversarial, Fill::Zeros};

std::string label(const char* what, int64_t M, int64_t K, int extra = -1) {
  return std::string(what) + " M=" + std::to_string(M) + " K=" + std::to_string(K) +
         (extra >= 0 ? " case " + std::to_string(extra) : "");
}

// ---------------------------------------------------------------------------------------------

void check_quantize_mxfp4(const HostTensor& x, const std::string& what) {
  HostScaled want = alloc_mx(x.v.rows, x.v.cols);
  quantize_mxfp4(x.v, want.st());
  const DeviceTensor dx(x);
  DeviceScaled got(want, /*copy=*/false);
  quantize_mxfp4(dx.v, got.st());
  EXPECT_TRUE(scaled_equal(got.to_host(), want)) << what;
}

TEST(Mxfp4Gpu, QuantizeMxfp4) {
  FP8FLOW_REQUIRE_GPU();
  const Shape shapes[] = {{1, 32}, {3, 96}, {1000, 32}, {77, 640}, {130, 7168}, {513, 4096}};
  uint64_t seed = 10;
  for (const Shape& s : shapes)
    for (Fill f : kFills)
      for (DType d : {DType::F32, DType::BF16}) {
        const HostTensor x = host_from_values(make_values(s.M, s.K, f, seed++), d, s.M, s.K);
        check_quantize_mxfp4(x, label(d == DType::F32 ? "F32" : "BF16", s.M, s.K, int(f)));
      }
}

// ---------------------------------------------------------------------------------------------

void check_fp8_to_mxfp4(const HostScaled& x, const std::string& what, cudaStream_t stream = nullptr,
                        const Mxfp4Rounding& rounding = {}) {
  HostScaled want = alloc_mx(x.data.v.rows, x.data.v.cols);
  fp8_to_mxfp4(x.st(), want.st(), rounding);
  const DeviceScaled dx(x);
  DeviceScaled got(want, /*copy=*/false);
  fp8_to_mxfp4(dx.st(), got.st(), rounding, stream);
  EXPECT_TRUE(scaled_equal(got.to_host(), want)) << what;
}

TEST(Mxfp4Gpu, Fp8ToMxfp4) {
  FP8FLOW_REQUIRE_GPU();
  const Shape shapes[] = {{1, 128}, {3, 256}, {1000, 128}, {77, 640}, {130, 7168}, {257, 2048}};
  uint64_t seed = 20;
  for (const Shape& s : shapes) {
    for (Fill f : kFills)
      check_fp8_to_mxfp4(fp8_from_values(make_values(s.M, s.K, f, seed++), s.M, s.K),
                         label("from values", s.M, s.K, int(f)));
    // Raw codes (NaN codes included), scales 2^t over the whole E8M0 range: exact tiles and
    // tiles whose FP32 products overflow (t >= 120) take different kernel paths.
    check_fp8_to_mxfp4(fp8_random(s.M, s.K, seed++, -127, 127, true), label("raw", s.M, s.K));
    // Scales the exact path refuses: not powers of two, below 2^-140, zero, negative, Inf, NaN.
    HostScaled x = fp8_random(s.M, s.K, seed++, -20, 20, true);
    const float odd[] = {3.0f, 0.7f, 1e-44f, 0.0f, -2.0f, INFINITY, NAN, fmt::exp2i(-141)};
    for (int64_t i = 0; i < x.scale.v.numel(); i += 3) x.scale.ptr<float>()[i] = odd[(i / 3) % 8];
    check_fp8_to_mxfp4(x, label("odd scales", s.M, s.K));
  }
}

// Stochastic rounding: the kernel's per-element path == the reference's, bit for bit, on every
// fill, raw codes over the whole scale range, and odd scales.
TEST(Mxfp4Gpu, Fp8ToMxfp4Stochastic) {
  FP8FLOW_REQUIRE_GPU();
  const Shape shapes[] = {{1, 128}, {77, 640}, {130, 7168}, {257, 2048}};
  uint64_t seed = 60;
  for (const Shape& s : shapes) {
    for (Fill f : kFills)
      check_fp8_to_mxfp4(fp8_from_values(make_values(s.M, s.K, f, seed++), s.M, s.K),
                         label("SR from values", s.M, s.K, int(f)), nullptr,
                         Mxfp4Rounding{true, 0x123456789ull + seed});
    check_fp8_to_mxfp4(fp8_random(s.M, s.K, seed++, -127, 127, true), label("SR raw", s.M, s.K),
                       nullptr, Mxfp4Rounding{true, seed});
    HostScaled x = fp8_random(s.M, s.K, seed++, -20, 20, true);
    const float odd[] = {3.0f, 0.7f, 1e-44f, 0.0f, -2.0f, INFINITY, NAN, fmt::exp2i(-141)};
    for (int64_t i = 0; i < x.scale.v.numel(); i += 3) x.scale.ptr<float>()[i] = odd[(i / 3) % 8];
    check_fp8_to_mxfp4(x, label("SR odd scales", s.M, s.K), nullptr, Mxfp4Rounding{true, seed});
  }
}

TEST(Mxfp4Gpu, Fp8ToMxfp4OnAStream) {
  FP8FLOW_REQUIRE_GPU();
  cudaStream_t st;
  ASSERT_EQ(cudaStreamCreate(&st), cudaSuccess);
  check_fp8_to_mxfp4(fp8_random(300, 1024, 5, -127, 127, true), "stream", st);
  ASSERT_EQ(cudaStreamDestroy(st), cudaSuccess);
}

// ---------------------------------------------------------------------------------------------

void check_mxfp4_to_fp8(const HostScaled& y, const std::string& what) {
  HostScaled want = alloc_fp8(y.data.v.rows, y.data.v.cols);
  mxfp4_to_fp8(y.st(), want.st());
  const DeviceScaled dy(y);
  DeviceScaled got(want, /*copy=*/false);
  mxfp4_to_fp8(dy.st(), got.st());
  EXPECT_TRUE(scaled_equal(got.to_host(), want)) << what;
}

TEST(Mxfp4Gpu, Mxfp4ToFp8) {
  FP8FLOW_REQUIRE_GPU();
  const Shape shapes[] = {{1, 128}, {3, 256}, {1000, 128}, {77, 640}, {130, 7168}, {257, 2048}};
  uint64_t seed = 30;
  for (const Shape& s : shapes) {
    for (Fill f : kFills)
      check_mxfp4_to_fp8(mx_from_values(make_values(s.M, s.K, f, seed++), s.M, s.K),
                         label("from values", s.M, s.K, int(f)));
    // Every scale byte: NaN blocks, 253/254 (elements overflowing to Inf: the generic path).
    check_mxfp4_to_fp8(mx_random(s.M, s.K, seed++, 0, 254, 0.05, 0.05), label("raw", s.M, s.K));
    check_mxfp4_to_fp8(mx_random(s.M, s.K, seed++, 100, 140, 0.1, 0.02),
                       label("raw narrow", s.M, s.K));
  }
}

// ---------------------------------------------------------------------------------------------

void check_transposed(const HostScaled& y, std::vector<int64_t> groups, const std::string& what) {
  HostScaled want = alloc_fp8(y.data.v.cols, y.data.v.rows, std::move(groups));
  mxfp4_to_fp8_transposed(y.st(), want.st());
  const DeviceScaled dy(y);
  DeviceScaled got(want, /*copy=*/false);
  mxfp4_to_fp8_transposed(dy.st(), got.st());
  EXPECT_TRUE(scaled_equal(got.to_host(), want)) << what;
}

// Every case with each kernel variant (sm90::set_mxfp4_transposed_variant; mxfp4_sm90.cu lists
// them: 0 the default, with the integer path; 1 the session-9 kernel; 2 the session-13 default).
TEST(Mxfp4Gpu, Mxfp4ToFp8Transposed) {
  FP8FLOW_REQUIRE_GPU();
  const std::vector<TransposedCase> cases = transposed_cases(/*emu_only=*/false);
  for (int variant = 0; variant < sm90::mxfp4_transposed_variant_count(); ++variant) {
    SCOPED_TRACE(testing::Message() << "transposed variant " << variant);
    const ScopedKernelVariant scoped(sm90::set_mxfp4_transposed_variant, variant);
    const std::string v = " variant " + std::to_string(variant);
    uint64_t seed = 40;
    for (size_t ci = 0; ci < cases.size(); ++ci) {
      const TransposedCase& c = cases[ci];
      for (Fill f : kFills)
        check_transposed(mx_from_values(make_values(c.M, c.K, f, seed++), c.M, c.K), c.groups,
                         label("from values", c.M, c.K, int(ci * 10) + int(f)) + v);
      check_transposed(mx_random(c.M, c.K, seed++, 0, 254, 0.05, 0.05), c.groups,
                       label("raw, X >= 126 present", c.M, c.K, int(ci)) + v);
      check_transposed(mx_random(c.M, c.K, seed++, 60, 252, 0.1, 0.03), c.groups,
                       label("raw, exact tiles", c.M, c.K, int(ci)) + v);
      // The gap-key path (variants 0 and 2) and its edges (see the CPU emulation's cases).
      check_transposed(mx_random_gap(c.M, c.K, seed++, 129, 252, 0.0, 0), c.groups,
                       label("raw, span 123", c.M, c.K, int(ci)) + v);
      check_transposed(mx_random_gap(c.M, c.K, seed++, 128, 252, 0.0, 0), c.groups,
                       label("raw, span 124", c.M, c.K, int(ci)) + v);
      check_transposed(mx_random_gap(c.M, c.K, seed++, 110, 140, 0.2, 6, 0.3), c.groups,
                       label("raw, narrow + tiny", c.M, c.K, int(ci)) + v);
      check_transposed(mx_random_gap(c.M, c.K, seed++, 130, 252, 0.2, 7), c.groups,
                       label("raw, wide + tiny 7", c.M, c.K, int(ci)) + v);
      // The integer path (variant 0, the default) and its edges: block-exponent spreads 11
      // (mostly taken) and 12 (refused where both ends meet a full-size column maximum), sparse
      // small codes, half zeros.
      check_transposed(mx_random_gap(c.M, c.K, seed++, 120, 131, 0.0, 0, 0.02), c.groups,
                       label("raw, spread 11", c.M, c.K, int(ci)) + v);
      check_transposed(mx_random_gap(c.M, c.K, seed++, 120, 132, 0.0, 0, 0.02), c.groups,
                       label("raw, spread 12", c.M, c.K, int(ci)) + v);
      check_transposed(mx_random_sparse(c.M, c.K, seed++, 100, 114, 0.03, 2), c.groups,
                       label("raw, sparse small codes", c.M, c.K, int(ci)) + v);
      check_transposed(mx_random_sparse(c.M, c.K, seed++, 100, 108, 0.5, 7), c.groups,
                       label("raw, half zeros", c.M, c.K, int(ci)) + v);
    }
  }
}

// A large problem in 3 groups, one empty, one with a partial tail tile: 8192 x 7168, 65 token
// tiles x 28 CTA columns of the one-shot grid.
TEST(Mxfp4Gpu, Mxfp4ToFp8TransposedLargeGrouped) {
  FP8FLOW_REQUIRE_GPU();
  const int64_t M = 8192, K = 7168;
  const std::vector<int64_t> groups = {3000, 0, 5192};
  for (int variant = 0; variant < sm90::mxfp4_transposed_variant_count(); ++variant) {
    const ScopedKernelVariant scoped(sm90::set_mxfp4_transposed_variant, variant);
    const std::string v = " variant " + std::to_string(variant);
    check_transposed(mx_random(M, K, 77, 60, 252, 0.1, 0.03), groups,
                     label("raw, exact tiles", M, K) + v);
    check_transposed(mx_random(M, K, 78, 0, 254, 0.05, 0.05), groups,
                     label("raw, X >= 126 present", M, K) + v);
    check_transposed(mx_random_gap(M, K, 79, 129, 252, 0.0, 0), groups,
                     label("raw, span 123", M, K) + v);
  }
}

// ---------------------------------------------------------------------------------------------

TEST(Mxfp4Gpu, EmptyTensorsLaunchNothing) {
  FP8FLOW_REQUIRE_GPU();
  const HostScaled y0 = alloc_mx(0, 256);
  const DeviceScaled dy0(y0);
  DeviceScaled f0(alloc_fp8(0, 256), false), t0(alloc_fp8(256, 0, {0, 0}), false);
  EXPECT_NO_THROW(mxfp4_to_fp8(dy0.st(), f0.st()));
  EXPECT_NO_THROW(mxfp4_to_fp8_transposed(dy0.st(), t0.st()));
  EXPECT_NO_THROW(fp8_to_mxfp4(f0.st(), dy0.st()));
  const DeviceTensor x0(DType::BF16, 0, 64);
  DeviceScaled m0(alloc_mx(0, 64), false);
  EXPECT_NO_THROW(quantize_mxfp4(x0.v, m0.st()));
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
}

TEST(Mxfp4Gpu, MisalignedPointersAreRejected) {
  FP8FLOW_REQUIRE_GPU();
  const HostScaled x = fp8_random(4, 256, 1, -3, 3, false);
  const DeviceScaled dx(x);
  DeviceScaled out(alloc_mx(4, 256), false);
  ScaledTensor in = dx.st();
  in.data.data = static_cast<uint8_t*>(in.data.data) + 4;
  try {
    fp8_to_mxfp4(in, out.st());
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("fp8flow::fp8_to_mxfp4: in.data: expected data pointer "
                                         "aligned to 16 bytes"),
              std::string::npos)
        << e.what();
  }
  const DeviceScaled y(alloc_mx(4, 256), false);
  DeviceScaled t(alloc_fp8(256, 4), false);
  ScaledTensor ot = t.st();
  ot.data.data = static_cast<uint8_t*>(ot.data.data) + 1;
  try {
    mxfp4_to_fp8_transposed(y.st(), ot);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("fp8flow::mxfp4_to_fp8_transposed: out_t.data: expected "
                                         "data pointer aligned to 16 bytes"),
              std::string::npos)
        << e.what();
  }
  // Host memory marked Cuda.
  HostScaled h = alloc_mx(4, 256);
  ScaledTensor hs = h.st();
  hs.data.device = hs.scale.device = Device::Cuda;
  DeviceScaled f(alloc_fp8(4, 256), false);
  try {
    mxfp4_to_fp8(hs, f.st());
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("fp8flow::mxfp4_to_fp8: in.data: expected device memory"),
              std::string::npos)
        << e.what();
  }
}

}  // namespace
}  // namespace fp8flow::test

#else
TEST(Mxfp4Gpu, SkippedInCpuOnlyBuild) {
  GTEST_SKIP() << "CPU-only build: no CUDA backend";
}
#endif
