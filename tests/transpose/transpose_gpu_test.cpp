// transpose_scaled on the CUDA backend against the CPU reference, bit for bit: data, scales and the
// underflow count, both policies, every fill, single and grouped tokens (aligned, unaligned, empty
// groups, partial tiles), plus the CUDA-only argument checks. Skips without a GPU.
#include <gtest/gtest.h>

#include "transpose/transpose_test_util.h"

namespace fp8flow::test {
namespace {

#if FP8FLOW_WITH_CUDA

struct GpuResult {
  HostTensor data, scale;
  int64_t count;
};

GpuResult run_gpu(const RowwiseFp8& in, int64_t M, int64_t K, const std::vector<int64_t>& groups,
                  TransposeScalePolicy policy, bool with_count) {
  DeviceTensor x(in.data), xs(in.scale);
  DeviceTensor y(DType::E4M3, K, M), ys(DType::F32, rowwise_tiles(M, groups), K);
  DeviceTensor cnt(DType::I64, 1, 1);  // poisoned: the op must overwrite it
  TransposeOptions o;
  o.policy = policy;
  o.underflow_count = with_count ? static_cast<int64_t*>(cnt.p) : nullptr;
  const ScaledTensor din{x.v, xs.v, ScaleLayout::Rowwise1x128, {}};
  const ScaledTensor dout{y.v, ys.v, ScaleLayout::Rowwise1x128, groups};
  transpose_scaled(din, dout, o, nullptr);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  GpuResult r{y.to_host(), ys.to_host(), -1};
  if (with_count) r.count = *cnt.to_host().ptr<int64_t>();
  return r;
}

void compare_case(const TransposeCase& cs, Fill fill, TransposeScalePolicy policy, uint64_t seed) {
  SCOPED_TRACE(cs.name() + " " + fill_name(fill) + " " + policy_name(policy));
  const RowwiseFp8 in = make_rowwise(cs.M, cs.K, fill, seed);
  ColwiseFp8 want(cs.M, cs.K, cs.groups);
  int64_t n_want = -1;
  TransposeOptions o;
  o.policy = policy;
  o.underflow_count = &n_want;
  transpose_scaled(in.view(), want.view(), o);
  const GpuResult got = run_gpu(in, cs.M, cs.K, cs.groups, policy, true);
  EXPECT_TRUE(bytes_equal(got.data, want.data));
  EXPECT_TRUE(bytes_equal(got.scale, want.scale));
  EXPECT_EQ(got.count, n_want);
  // The kernel instance without the count (its own code path for partial tiles and underflow).
  const GpuResult plain = run_gpu(in, cs.M, cs.K, cs.groups, policy, false);
  EXPECT_TRUE(bytes_equal(plain.data, want.data));
  EXPECT_TRUE(bytes_equal(plain.scale, want.scale));
}

const Fill kFills[] = {Fill::Normal, Fill::WideRange, Fill::Adversarial, Fill::Zeros};
const TransposeScalePolicy kPolicies[] = {TransposeScalePolicy::TileMax,
                                          TransposeScalePolicy::ColumnTight};

TEST(TransposeGpu, MatchesReferenceSingleGroup) {
  FP8FLOW_REQUIRE_GPU();
  const TransposeCase cases[] = {
      {128, 128, {}},
      {300, 256, {}},
      {1000, 1280, {}},
      {1, 128, {}},
      {4096, 7168, {}},
      // 3584 tiles: ColumnTight's persistent CTAs take 9 each on an H100/H200
      {8192, 7168, {}},
  };
  for (const auto& cs : cases)
    for (Fill fill : kFills)
      for (auto policy : kPolicies) compare_case(cs, fill, policy, 1000 + cs.M);
}

TEST(TransposeGpu, MatchesReferenceGrouped) {
  FP8FLOW_REQUIRE_GPU();
  const TransposeCase cases[] = {
      // aligned groups (multiples of 128 and of 16)
      {1024, 256, {256, 0, 512, 256}},
      {512, 384, {16, 112, 128, 256}},
      // unaligned group offsets, partial tiles, empty groups
      {510, 256, {0, 128, 5, 300, 0, 77}},
      {1000, 1280, {1, 999}},
      {4096, 1024, {300, 0, 1700, 33, 2063}},
      {777, 128, {777}},
      {130, 128, {2, 0, 0, 128}},
      // a layer's segments: multiples of 16, starts at 16 mod 32, partial tiles of 16k rows
      {2048, 512, {144, 400, 1008, 496}},
      // the same kind of segments, many tiles per persistent CTA (73 x 48 pairs)
      {9000, 6144, {1100, 0, 2016, 944, 3000, 1940}},
  };
  for (const auto& cs : cases)
    for (Fill fill : kFills)
      for (auto policy : kPolicies) compare_case(cs, fill, policy, 2000 + cs.M);
}

TEST(TransposeGpu, WithoutCounterAndDefaultPolicy) {
  FP8FLOW_REQUIRE_GPU();
  const int64_t M = 640, K = 256;
  const RowwiseFp8 in = make_rowwise(M, K, Fill::WideRange, 5);
  ColwiseFp8 want(M, K);
  transpose_scaled(in.view(), want.view());
  const GpuResult got = run_gpu(in, M, K, {}, TransposeOptions{}.policy, false);
  EXPECT_TRUE(bytes_equal(got.data, want.data));
  EXPECT_TRUE(bytes_equal(got.scale, want.scale));
}

TEST(TransposeGpu, EmptyTensorZeroesTheCounter) {
  FP8FLOW_REQUIRE_GPU();
  DeviceTensor x(DType::E4M3, 0, 128), xs(DType::F32, 1, 0), y(DType::E4M3, 128, 0),
      ys(DType::F32, 0, 128), cnt(DType::I64, 1, 1);
  TransposeOptions o;
  o.underflow_count = static_cast<int64_t*>(cnt.p);
  transpose_scaled({x.v, xs.v, ScaleLayout::Rowwise1x128, {}},
                   {y.v, ys.v, ScaleLayout::Rowwise1x128, {}}, o);
  EXPECT_EQ(*cnt.to_host().ptr<int64_t>(), 0);
}

template <typename F>
void expect_error(F&& f, const std::string& arg) {
  try {
    f();
    ADD_FAILURE() << "expected fp8flow::Error naming " << arg;
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("fp8flow::transpose_scaled"), std::string::npos) << msg;
    EXPECT_NE(msg.find(arg), std::string::npos) << msg;
  }
}

TEST(TransposeGpu, RejectsBadDevicePointers) {
  FP8FLOW_REQUIRE_GPU();
  const int64_t M = 256, K = 256;
  DeviceTensor x(DType::E4M3, M + 16, K), xs(DType::F32, K / 128, M), y(DType::E4M3, K + 1, M),
      ys(DType::F32, 2, K);
  TensorView xv = x.v;  // 16 spare rows: room for the misaligned-pointer case below
  xv.rows = M;
  const ScaledTensor in{xv, xs.v, ScaleLayout::Rowwise1x128, {}};
  TensorView yv = y.v;
  yv.rows = K;
  const ScaledTensor out{yv, ys.v, ScaleLayout::Rowwise1x128, {}};
  transpose_scaled(in, out);  // the good call works
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);

  // Host memory labelled Cuda.
  HostTensor h(DType::E4M3, M, K);
  ScaledTensor bad = in;
  bad.data.data = h.buf.data();
  expect_error([&] { transpose_scaled(bad, out); }, "in.data");
  HostTensor hs(DType::F32, 2, K);
  ScaledTensor bad_out = out;
  bad_out.scale.data = hs.buf.data();
  expect_error([&] { transpose_scaled(in, bad_out); }, "out_t.scale");
  // Misaligned base pointers.
  bad = in;
  bad.data.data = static_cast<uint8_t*>(x.p) + 8;
  expect_error([&] { transpose_scaled(bad, out); }, "in.data");
  bad_out = out;
  bad_out.data.data = static_cast<uint8_t*>(y.p) + 4;
  expect_error([&] { transpose_scaled(in, bad_out); }, "out_t.data");
  // A host counter for a Cuda call.
  int64_t host_count = 0;
  TransposeOptions o;
  o.underflow_count = &host_count;
  expect_error([&] { transpose_scaled(in, out, o); }, "opts.underflow_count");
}

#else

TEST(TransposeGpu, SkippedInCpuOnlyBuild) {
  GTEST_SKIP() << "CPU-only build (FP8FLOW_WITH_CUDA=0): GPU tests skipped";
}

#endif

}  // namespace
}  // namespace fp8flow::test
