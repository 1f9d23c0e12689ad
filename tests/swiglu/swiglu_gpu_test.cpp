// SwiGLU ops, CUDA backend: GPU == CPU reference bit for bit (codes, scales, BF16, dprob) over
// shapes, fills, output kinds, the unweighted variant and the saved-FP8-input variants (whose
// saved copy must also equal the GPU quantize()'s bytes); the hardware conversions the kernels use
// against formats.h over all 2^32 inputs; streams, empty inputs, device-side bad arguments.
// Skips with a printed reason where no GPU is visible.
#include <gtest/gtest.h>

#include <cstdio>
#include <functional>
#include <string>

#include "ops/swiglu/swiglu_backends.h"
#include "swiglu/swiglu_cases.h"

#if FP8FLOW_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace fp8flow {
namespace {

#if FP8FLOW_WITH_CUDA

using test::DeviceTensor;

struct DeviceScaled {
  DeviceTensor data, scale;
  DeviceScaled(DType d, int64_t rows, int64_t cols)
      : data(d, rows, cols), scale(DType::F32, cols / 128, rows) {}
  explicit DeviceScaled(const SwigluHostScaled& h) : data(h.data), scale(h.scale) {}
  ScaledTensor view() const { return ScaledTensor{data.v, scale.v, ScaleLayout::Rowwise1x128, {}}; }
};

struct GpuCase {
  DeviceTensor in, dy, prob;
  explicit GpuCase(const SwigluCase& c) : in(c.in), dy(c.dy), prob(c.prob) {}
};

// The CPU reference's saved E4M3 copy of c.in (the forward overload with in_q).
SwigluHostScaled saved_copy(const SwigluCase& c) {
  SwigluHostScaled out(DType::E4M3, c.M, c.F), in_q(DType::E4M3, c.M, 2 * c.F);
  swiglu(c.in.v, c.prob.v, out.view(), in_q.view());
  return in_q;
}

// The forward overload that also writes the saved copy: out and in_q equal the reference, and
// in_q equals the GPU quantize() of the same input.
void expect_forward_saved_equal(const SwigluCase& c, DType kind, bool weighted,
                                Stream stream = nullptr) {
  const SwigluOptions opt{weighted};
  GpuCase g(c);
  SwigluHostScaled want(kind, c.M, c.F), want_q(DType::E4M3, c.M, 2 * c.F);
  swiglu(c.in.v, weighted ? c.prob.v : TensorView{}, want.view(), want_q.view(), opt);
  DeviceScaled got(kind, c.M, c.F), got_q(DType::E4M3, c.M, 2 * c.F),
      quant(DType::E4M3, c.M, 2 * c.F);
  swiglu(g.in.v, weighted ? g.prob.v : TensorView{}, got.view(), got_q.view(), opt, stream);
  quantize(g.in.v, quant.view(), {}, stream);
  const HostTensor q_data = got_q.data.to_host(), q_scale = got_q.scale.to_host();
  EXPECT_TRUE(test::bytes_equal(got.data.to_host(), want.data)) << "codes";
  EXPECT_TRUE(test::bytes_equal(got.scale.to_host(), want.scale)) << "scales";
  EXPECT_TRUE(test::bytes_equal(q_data, want_q.data)) << "saved codes";
  EXPECT_TRUE(test::bytes_equal(q_scale, want_q.scale)) << "saved scales";
  EXPECT_TRUE(test::bytes_equal(q_data, quant.data.to_host())) << "saved codes vs quantize";
  EXPECT_TRUE(test::bytes_equal(q_scale, quant.scale.to_host())) << "saved scales vs quantize";
}

// out kind: E4M3, E5M2 (scaled) or BF16.
void expect_forward_equal(const SwigluCase& c, DType kind, bool weighted, Stream stream = nullptr) {
  const SwigluOptions opt{weighted};
  const TensorView prob = weighted ? c.prob.v : TensorView{};
  GpuCase g(c);
  const TensorView prob_gpu = weighted ? g.prob.v : TensorView{};
  if (kind == DType::BF16) {
    HostTensor want(DType::BF16, c.M, c.F);
    swiglu(c.in.v, prob, want.v, opt);
    DeviceTensor got(DType::BF16, c.M, c.F);
    swiglu(g.in.v, prob_gpu, got.v, opt, stream);
    EXPECT_TRUE(test::bytes_equal(got.to_host(), want)) << "BF16 out";
    return;
  }
  SwigluHostScaled want(kind, c.M, c.F);
  swiglu(c.in.v, prob, want.view(), opt);
  DeviceScaled got(kind, c.M, c.F);
  swiglu(g.in.v, prob_gpu, got.view(), opt, stream);
  EXPECT_TRUE(test::bytes_equal(got.data.to_host(), want.data)) << "codes";
  EXPECT_TRUE(test::bytes_equal(got.scale.to_host(), want.scale)) << "scales";
}

// saved_in: the backward from the saved E4M3 copy of c.in (FP8 kinds only).
void expect_backward_equal(const SwigluCase& c, DType kind, bool weighted, Stream stream = nullptr,
                           bool saved_in = false) {
  const SwigluOptions opt{weighted};
  const TensorView prob = weighted ? c.prob.v : TensorView{};
  GpuCase g(c);
  const TensorView prob_gpu = weighted ? g.prob.v : TensorView{};
  HostTensor dprob_want(DType::F32, c.M, 1);
  DeviceTensor dprob_got(DType::F32, c.M, 1);
  const TensorView dpw = weighted ? dprob_want.v : TensorView{};
  const TensorView dpg = weighted ? dprob_got.v : TensorView{};
  if (kind == DType::BF16) {
    HostTensor want(DType::BF16, c.M, 2 * c.F);
    swiglu_backward(c.dy.v, c.in.v, prob, want.v, dpw, opt);
    DeviceTensor got(DType::BF16, c.M, 2 * c.F);
    swiglu_backward(g.dy.v, g.in.v, prob_gpu, got.v, dpg, opt, stream);
    EXPECT_TRUE(test::bytes_equal(got.to_host(), want)) << "BF16 din";
  } else {
    SwigluHostScaled want(kind, c.M, 2 * c.F);
    DeviceScaled got(kind, c.M, 2 * c.F);
    if (saved_in) {
      const SwigluHostScaled q = saved_copy(c);
      const DeviceScaled gq(q);
      swiglu_backward(c.dy.v, q.view(), prob, want.view(), dpw, opt);
      swiglu_backward(g.dy.v, gq.view(), prob_gpu, got.view(), dpg, opt, stream);
    } else {
      swiglu_backward(c.dy.v, c.in.v, prob, want.view(), dpw, opt);
      swiglu_backward(g.dy.v, g.in.v, prob_gpu, got.view(), dpg, opt, stream);
    }
    EXPECT_TRUE(test::bytes_equal(got.data.to_host(), want.data)) << "din codes";
    EXPECT_TRUE(test::bytes_equal(got.scale.to_host(), want.scale)) << "din scales";
  }
  // Unweighted: dprob untouched on both sides (host poison 0xA5 vs device poison 0xA5).
  EXPECT_TRUE(test::bytes_equal(dprob_got.to_host(), dprob_want)) << "dprob";
}

struct Shape {
  int64_t M, F;
};
// F % 256 == 128 and == 0; one row; partial last block of rows/items; the DeepSeek-V3 F.
const Shape kShapes[] = {{1, 128},  {3, 128},     {3, 256},    {300, 512},   {37, 384},
                         {5, 1280}, {1024, 2048}, {129, 4096}, {2, 128 * 37}};
const Fill kFills[] = {Fill::Normal, Fill::WideRange, Fill::Adversarial};
const DType kKinds[] = {DType::E4M3, DType::E5M2, DType::BF16};

TEST(SwigluGpu, HardwareCvtMatchesFormats) {
  FP8FLOW_REQUIRE_GPU();
  for (DType d : kKinds) {
    uint32_t example = 0;
    EXPECT_EQ(sm90::swiglu_hw_cvt_mismatches(d, &example), 0)
        << to_string(d) << ": e.g. x = 0x" << std::hex << example;
  }
}

TEST(SwigluGpu, BranchFreeSiluEqualsHdExhaustive) {
  FP8FLOW_REQUIRE_GPU();
  uint32_t example = 0;
  EXPECT_EQ(sm90::swiglu_silu_mismatches(&example), 0) << "e.g. x = 0x" << std::hex << example;
}

TEST(SwigluGpu, SigmoidFastEqualsHdExhaustive) {
  FP8FLOW_REQUIRE_GPU();
  uint32_t example = 0;
  EXPECT_EQ(sm90::swiglu_sigmoid_fast_mismatches(&example), 0)
      << "e.g. bits 0x" << std::hex << example;
}

// Runs check(case, out kind, weighted) over kShapes x kFills x `kinds` x {weighted, unweighted},
// seeds from `seed` on; with `specials`, adversarial cases also get test::add_bf16_specials.
template <typename Check>
void for_each_case(uint64_t seed, std::initializer_list<DType> kinds, bool specials, Check check) {
  for (const Shape& s : kShapes)
    for (Fill f : kFills) {
      SwigluCase c = test::make_case(s.M, s.F, f, ++seed);
      if (specials && f == Fill::Adversarial) test::add_bf16_specials(c);
      for (DType k : kinds)
        for (bool weighted : {true, false}) {
          SCOPED_TRACE(testing::Message() << "M " << s.M << " F " << s.F << " fill " << int(f)
                                          << " out " << to_string(k) << " weighted " << weighted);
          check(c, k, weighted);
        }
    }
}

TEST(SwigluGpu, ForwardMatchesReference) {
  FP8FLOW_REQUIRE_GPU();
  for_each_case(1000, {DType::E4M3, DType::E5M2, DType::BF16}, false,
                [](const SwigluCase& c, DType k, bool w) { expect_forward_equal(c, k, w); });
}

TEST(SwigluGpu, BackwardMatchesReference) {
  FP8FLOW_REQUIRE_GPU();
  for_each_case(2000, {DType::E4M3, DType::E5M2, DType::BF16}, false,
                [](const SwigluCase& c, DType k, bool w) { expect_backward_equal(c, k, w); });
}

// The saved-input variants: adversarial inputs also get BF16 specials (NaNs of both signs, +-Inf,
// the largest and the subnormal values, an all-tiny row), whose saved codes must keep their signs.
TEST(SwigluGpu, ForwardSavedInputMatchesReference) {
  FP8FLOW_REQUIRE_GPU();
  for_each_case(3000, {DType::E4M3, DType::E5M2}, true,
                [](const SwigluCase& c, DType k, bool w) { expect_forward_saved_equal(c, k, w); });
}

TEST(SwigluGpu, BackwardSavedInputMatchesReference) {
  FP8FLOW_REQUIRE_GPU();
  for_each_case(4000, {DType::E4M3, DType::E5M2}, true, [](const SwigluCase& c, DType k, bool w) {
    expect_backward_equal(c, k, w, nullptr, /*saved_in=*/true);
  });
}

// Pad rows whose dy is not zero (signed zeros), and rows without padding at all.
TEST(SwigluGpu, PaddingVariantsMatchReference) {
  FP8FLOW_REQUIRE_GPU();
  const SwigluCase with_dy = test::make_case(64, 384, Fill::Normal, 7, true, true);
  const SwigluCase no_pad = test::make_case(64, 384, Fill::Normal, 8, false);
  for (DType k : kKinds) {
    expect_forward_equal(with_dy, k, true);
    expect_backward_equal(with_dy, k, true);
    expect_forward_equal(no_pad, k, true);
    expect_backward_equal(no_pad, k, true);
    if (k == DType::BF16) continue;
    for (const SwigluCase* c : {&with_dy, &no_pad}) {
      expect_forward_saved_equal(*c, k, true);
      expect_backward_equal(*c, k, true, nullptr, /*saved_in=*/true);
    }
  }
}

// Gate inputs around the backward's fast-sigmoid bound (-86.5; sigmoid subnormal below -87.34,
// 0 below -88.73): rows where some warp takes the exact path for a chunk and rows where none does,
// next to rows of ordinary values, NaN and -Inf. Every kind, weighted and not, BF16 and saved h.
SwigluCase fast_sigmoid_bound_case() {
  SwigluCase c = test::make_case(48, 640, Fill::Normal, 11, false);
  std::mt19937_64 rng(12);
  std::uniform_real_distribution<float> u(-95.f, -80.f);
  auto* h = c.in.ptr<uint16_t>();
  const int64_t n = 2 * c.F;
  for (int64_t m = 0; m < c.M; ++m) {
    if (m % 3 == 0) continue;  // ordinary rows; m % 3 == 2: 2 values a row, some chunks without
    for (int64_t j = 0; j < c.F; j += (m % 3 == 1 ? 1 : 331))
      h[m * n + j] = fmt::bf16_from_f32(u(rng));
    if (m % 8 == 5) h[m * n + 7] = 0x7FC0;    // NaN gate
    if (m % 8 == 6) h[m * n + 300] = 0xFF80;  // -Inf gate
  }
  return c;
}

TEST(SwigluGpu, BackwardAroundFastSigmoidBound) {
  FP8FLOW_REQUIRE_GPU();
  const SwigluCase c = fast_sigmoid_bound_case();
  for (DType k : kKinds) {
    for (bool w : {true, false}) {
      SCOPED_TRACE(testing::Message() << "out " << to_string(k) << " weighted " << w);
      expect_backward_equal(c, k, w);
      if (k != DType::BF16) expect_backward_equal(c, k, w, nullptr, /*saved_in=*/true);
    }
  }
}

// Every backward kernel variant in one process (sm90::swiglu_set_backward_variant: 0 the
// session-12 kernel, 1 (the default) branch-free tile scale and shared-memory staged scale
// words), FP8 out from BF16 h and from the saved E4M3 h, bit
// for bit against the reference. kShapes has M % 8 != 0 (a last block of fewer than 8 rows: M = 1,
// 2, 3, 5, 37, 129, 300) and F % 256 == 128 (128, 384, 128 * 37); plus the fast-sigmoid bound rows
// and M = 1031 at the DeepSeek-V3 F.
TEST(SwigluGpu, BackwardVariantsMatchReference) {
  FP8FLOW_REQUIRE_GPU();
  const SwigluCase bound = fast_sigmoid_bound_case();
  const SwigluCase large = test::make_case(1031, 2048, Fill::WideRange, 13);
  for (int v : {0, 1}) {
    SCOPED_TRACE(testing::Message() << "backward variant " << v);
    const test::ScopedKernelVariant scoped(sm90::swiglu_set_backward_variant, v);
    for_each_case(5000, {DType::E4M3, DType::E5M2}, true, [](const SwigluCase& c, DType k, bool w) {
      expect_backward_equal(c, k, w);
      expect_backward_equal(c, k, w, nullptr, /*saved_in=*/true);
    });
    for (DType k : {DType::E4M3, DType::E5M2})
      for (bool w : {true, false})
        for (const SwigluCase* c : {&bound, &large}) {
          expect_backward_equal(*c, k, w);
          expect_backward_equal(*c, k, w, nullptr, /*saved_in=*/true);
        }
  }
}

// A larger problem (DeepSeek-V3 F, many blocks per SM) on a non-default stream.
TEST(SwigluGpu, LargeOnStream) {
  FP8FLOW_REQUIRE_GPU();
  cudaStream_t s = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), cudaSuccess);
  const SwigluCase c = test::make_case(4096, 2048, Fill::Normal, 9);
  expect_forward_equal(c, DType::E4M3, true, reinterpret_cast<Stream>(s));
  expect_backward_equal(c, DType::E4M3, true, reinterpret_cast<Stream>(s));
  expect_forward_saved_equal(c, DType::E4M3, true, reinterpret_cast<Stream>(s));
  expect_backward_equal(c, DType::E4M3, true, reinterpret_cast<Stream>(s), /*saved_in=*/true);
  EXPECT_EQ(cudaStreamSynchronize(s), cudaSuccess);
  EXPECT_EQ(cudaStreamDestroy(s), cudaSuccess);
}

TEST(SwigluGpu, DeterministicAcrossRuns) {
  FP8FLOW_REQUIRE_GPU();
  const SwigluCase c = test::make_case(333, 2048, Fill::WideRange, 10);
  GpuCase g(c);
  DeviceScaled a(DType::E4M3, c.M, 2 * c.F), b(DType::E4M3, c.M, 2 * c.F);
  DeviceTensor pa(DType::F32, c.M, 1), pb(DType::F32, c.M, 1);
  swiglu_backward(g.dy.v, g.in.v, g.prob.v, a.view(), pa.v);
  swiglu_backward(g.dy.v, g.in.v, g.prob.v, b.view(), pb.v);
  EXPECT_TRUE(test::bytes_equal(a.data.to_host(), b.data.to_host()));
  EXPECT_TRUE(test::bytes_equal(pa.to_host(), pb.to_host()));
}

TEST(SwigluGpu, EmptyLaunchesNothing) {
  FP8FLOW_REQUIRE_GPU();
  const SwigluCase c = test::make_case(0, 256, Fill::Normal, 1);
  GpuCase g(c);
  DeviceScaled out(DType::E4M3, 0, 256), din(DType::E4M3, 0, 512);
  DeviceTensor dprob(DType::F32, 0, 1);
  swiglu(g.in.v, g.prob.v, out.view());
  swiglu_backward(g.dy.v, g.in.v, g.prob.v, din.view(), dprob.v);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
}

void expect_error(const std::function<void()>& f, const std::string& prefix,
                  const std::string& what) {
  try {
    f();
    ADD_FAILURE() << "no error; expected " << prefix;
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_EQ(msg.rfind(prefix, 0), 0u) << msg;
    EXPECT_NE(msg.find(what), std::string::npos) << msg;
  }
}

TEST(SwigluGpu, BadDeviceArguments) {
  FP8FLOW_REQUIRE_GPU();
  const SwigluCase c = test::make_case(4, 256, Fill::Normal, 3);
  GpuCase g(c);
  DeviceScaled out(DType::E4M3, 4, 256), din(DType::E4M3, 4, 512);
  DeviceTensor dprob(DType::F32, 4, 1);
  DeviceTensor big(DType::BF16, 4, 512 + 8);
  TensorView mis = g.in.v;
  mis.data = static_cast<char*>(big.p) + 2;  // device memory, 2-byte aligned only
  expect_error([&] { swiglu(mis, g.prob.v, out.view()); }, "fp8flow::swiglu: in: ", "aligned");
  TensorView host_in = c.in.v;
  host_in.device = Device::Cuda;  // host memory marked Cuda
  expect_error([&] { swiglu(host_in, g.prob.v, out.view()); },
               "fp8flow::swiglu: in: ", "device memory");
  TensorView host_prob = c.prob.v;
  host_prob.device = Device::Cuda;
  expect_error([&] { swiglu_backward(g.dy.v, g.in.v, host_prob, din.view(), dprob.v); },
               "fp8flow::swiglu_backward: prob: ", "device memory");
  ScaledTensor d = din.view();
  d.data.data = static_cast<char*>(big.p) + 8;
  expect_error([&] { swiglu_backward(g.dy.v, g.in.v, g.prob.v, d, dprob.v); },
               "fp8flow::swiglu_backward: din.data: ", "aligned");
  // The saved-input overloads.
  DeviceScaled in_q(DType::E4M3, 4, 512);
  ScaledTensor q = in_q.view();
  q.data.data = static_cast<char*>(big.p) + 8;
  expect_error([&] { swiglu(g.in.v, g.prob.v, out.view(), q); },
               "fp8flow::swiglu: in_q.data: ", "aligned");
  q = in_q.view();
  HostTensor host_scale(DType::F32, 4, 4);
  q.scale.data = host_scale.buf.data();  // host memory marked Cuda
  expect_error([&] { swiglu(g.in.v, g.prob.v, out.view(), q); },
               "fp8flow::swiglu: in_q.scale: ", "device memory");
  expect_error([&] { swiglu_backward(g.dy.v, q, g.prob.v, din.view(), dprob.v); },
               "fp8flow::swiglu_backward: in.scale: ", "device memory");
  q = in_q.view();
  q.data.data = static_cast<char*>(big.p) + 8;
  expect_error([&] { swiglu_backward(g.dy.v, q, g.prob.v, din.view(), dprob.v); },
               "fp8flow::swiglu_backward: in.data: ", "aligned");
}

// Not a correctness test: prints achieved bandwidth (bytes read + written per second) of each
// variant at the DeepSeek-V3 shard shape M = 32768, F = 2048, next to a device-to-device copy
// (cudaMemcpyAsync, counted as read + write) on the same GPU. Run it with
//   --gtest_also_run_disabled_tests --gtest_filter='SwigluGpu.DISABLED_BandwidthReport'
TEST(SwigluGpu, DISABLED_BandwidthReport) {
  FP8FLOW_REQUIRE_GPU();
  const int64_t M = 32768, F = 2048, kRep = 256;
  const SwigluCase blk = test::make_case(kRep, F, Fill::Normal, 5);
  DeviceTensor in(DType::BF16, M, 2 * F), dy(DType::BF16, M, F), prob(DType::F32, M, 1);
  for (int64_t m0 = 0; m0 < M; m0 += kRep) {
    ASSERT_EQ(cudaMemcpy(static_cast<uint16_t*>(in.p) + m0 * 2 * F, blk.in.buf.data(),
                         blk.in.bytes(), cudaMemcpyHostToDevice),
              cudaSuccess);
    ASSERT_EQ(cudaMemcpy(static_cast<uint16_t*>(dy.p) + m0 * F, blk.dy.buf.data(), blk.dy.bytes(),
                         cudaMemcpyHostToDevice),
              cudaSuccess);
    ASSERT_EQ(cudaMemcpy(static_cast<float*>(prob.p) + m0, blk.prob.buf.data(), blk.prob.bytes(),
                         cudaMemcpyHostToDevice),
              cudaSuccess);
  }
  DeviceScaled out(DType::E4M3, M, F), din(DType::E4M3, M, 2 * F), in_q(DType::E4M3, M, 2 * F);
  DeviceTensor out16(DType::BF16, M, F), din16(DType::BF16, M, 2 * F), dprob(DType::F32, M, 1);
  swiglu(in.v, prob.v, out.view(), in_q.view());  // a valid saved copy for the backward row
  cudaEvent_t t0, t1;
  ASSERT_EQ(cudaEventCreate(&t0), cudaSuccess);
  ASSERT_EQ(cudaEventCreate(&t1), cudaSuccess);
  auto time_ms = [&](const std::function<void()>& f) {
    for (int i = 0; i < 3; ++i) f();
    const int iters = 20;
    cudaEventRecord(t0);
    for (int i = 0; i < iters; ++i) f();
    cudaEventRecord(t1);
    cudaEventSynchronize(t1);
    float ms = 0;
    cudaEventElapsedTime(&ms, t0, t1);
    return double(ms) / iters;
  };
  auto report = [&](const char* name, double bytes, double ms) {
    std::printf("  %-26s %8.4f ms  %6.3f TB/s  (%.0f MB)\n", name, ms, bytes / ms * 1e-9,
                bytes * 1e-6);
  };
  const double mf = double(M) * F;
  const double fwd8 = mf * 4 + M * 4 + mf + mf / 128 * 4, fwd16 = mf * 4 + M * 4 + mf * 2;
  const double bwd8 = mf * 6 + M * 4 + mf * 2 + mf / 64 * 4 + M * 4,
               bwd16 = mf * 6 + M * 8 + mf * 4;
  std::printf("SwiGLU at M %lld, F %lld:\n", static_cast<long long>(M), static_cast<long long>(F));
  const double copy = time_ms([&] {
    cudaMemcpyAsync(din16.p, in.p, static_cast<size_t>(fwd8 / 2), cudaMemcpyDeviceToDevice);
  });
  report("d2d copy (same bytes)", fwd8, copy);
  report("fwd E4M3 1x128", fwd8, time_ms([&] { swiglu(in.v, prob.v, out.view()); }));
  report("fwd BF16", fwd16, time_ms([&] { swiglu(in.v, prob.v, out16.v); }));
  report("bwd E4M3 1x128 + dprob", bwd8,
         time_ms([&] { swiglu_backward(dy.v, in.v, prob.v, din.view(), dprob.v); }));
  report("bwd BF16 + dprob", bwd16,
         time_ms([&] { swiglu_backward(dy.v, in.v, prob.v, din16.v, dprob.v); }));
  report("fwd E4M3 unweighted", fwd8 - M * 4,
         time_ms([&] { swiglu(in.v, {}, out.view(), SwigluOptions{false}); }));
  // The fp8-flow recipes' variants: forward also writing the saved E4M3 h (+ 2 B per output
  // element and its scales), backward reading it (a, b: 2 B instead of 4 B, + scales).
  report("fwd E4M3 + saved E4M3 h", fwd8 + mf * 2 + mf / 64 * 4,
         time_ms([&] { swiglu(in.v, prob.v, out.view(), in_q.view()); }));
  report("bwd E4M3 from saved h", bwd8 - mf * 2 + mf / 64 * 4,
         time_ms([&] { swiglu_backward(dy.v, in_q.view(), prob.v, din.view(), dprob.v); }));
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  cudaEventDestroy(t0);
  cudaEventDestroy(t1);
}

#else

TEST(SwigluGpu, SkippedInCpuOnlyBuild) {
  GTEST_SKIP() << "CPU-only build: GPU tests skipped";
}

#endif

}  // namespace
}  // namespace fp8flow
