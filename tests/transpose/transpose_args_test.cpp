// Bad inputs to transpose_scaled: each raises fp8flow::Error whose message names the op and the
// argument. CPU tensors (the checks run before routing); the CUDA-only checks (device pointers,
// alignment, counter) are in transpose_gpu_test.cpp.
#include <gtest/gtest.h>

#include <cmath>

#include "transpose/transpose_test_util.h"

namespace fp8flow::test {
namespace {

struct Args {
  HostTensor x{DType::E4M3, 300, 256}, xs{DType::F32, 2, 300};
  HostTensor y{DType::E4M3, 256, 300}, ys{DType::F32, 3, 256};
  std::vector<int64_t> groups;
  ScaledTensor in() const { return {x.v, xs.v, ScaleLayout::Rowwise1x128, {}}; }
  ScaledTensor out() const { return {y.v, ys.v, ScaleLayout::Rowwise1x128, groups}; }
  Args() {
    std::fill(x.buf.begin(), x.buf.end(), 0x38);
    for (int64_t i = 0; i < xs.v.numel(); ++i) xs.ptr<float>()[i] = 1.0f;
  }
};

template <typename F>
void expect_error(F&& f, const std::string& arg, ErrorKind kind = ErrorKind::InvalidArgument) {
  try {
    f();
    ADD_FAILURE() << "expected fp8flow::Error naming " << arg;
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_EQ(e.kind(), kind) << msg;
    EXPECT_NE(msg.find("fp8flow::transpose_scaled: "), std::string::npos) << msg;
    EXPECT_NE(msg.find(arg + ":"), std::string::npos) << "wanted '" << arg << "' in: " << msg;
  }
}

TEST(TransposeArgs, GoodCallWorks) {
  Args a;
  int64_t n = -1;
  TransposeOptions o;
  o.underflow_count = &n;
  transpose_scaled(a.in(), a.out(), o);
  EXPECT_EQ(n, 0);
  // Every value is 1.0: ColumnTight picks 2^-8 (448 * 2^-8 >= 1), so the code is 256 = 0x78.
  EXPECT_EQ(a.y.ptr<uint8_t>()[0], 0x78);
  EXPECT_EQ(a.ys.ptr<float>()[0], std::ldexp(1.0f, -8));
}

TEST(TransposeArgs, RejectsBadInput) {
  Args a;
  ScaledTensor in = a.in();
  in.layout = ScaleLayout::Block128x128;
  expect_error([&] { transpose_scaled(in, a.out()); }, "in.layout");

  in = a.in();
  in.data.dtype = DType::E5M2;
  expect_error([&] { transpose_scaled(in, a.out()); }, "in.data");

  const int64_t g[] = {300};
  in = a.in();
  in.col_groups = g;
  expect_error([&] { transpose_scaled(in, a.out()); }, "in.col_groups");

  in = a.in();
  in.scale.dtype = DType::BF16;
  expect_error([&] { transpose_scaled(in, a.out()); }, "in.scale");

  in = a.in();
  in.scale.rows = 3;  // [K/128][M] is [2][300]
  expect_error([&] { transpose_scaled(in, a.out()); }, "in.scale");

  in = a.in();
  in.scale.cols = 299;
  expect_error([&] { transpose_scaled(in, a.out()); }, "in.scale");

  in = a.in();
  in.data.ld = 384;  // rows not contiguous
  in.data.rows = 100;
  in.scale.cols = 100;
  expect_error([&] { transpose_scaled(in, a.out()); }, "in.data");

  in = a.in();
  in.data.data = nullptr;
  expect_error([&] { transpose_scaled(in, a.out()); }, "in.data");

  in = a.in();
  in.data.rows = -1;
  expect_error([&] { transpose_scaled(in, a.out()); }, "in.data");
}

TEST(TransposeArgs, RejectsColumnsNotMultipleOf128) {
  HostTensor x(DType::E4M3, 64, 192), xs(DType::F32, 2, 64), y(DType::E4M3, 192, 64),
      ys(DType::F32, 1, 192);
  expect_error(
      [&] {
        transpose_scaled({x.v, xs.v, ScaleLayout::Rowwise1x128, {}},
                         {y.v, ys.v, ScaleLayout::Rowwise1x128, {}});
      },
      "in.data");
}

TEST(TransposeArgs, RejectsBadOutput) {
  Args a;
  ScaledTensor out = a.out();
  out.layout = ScaleLayout::Block128x128;
  expect_error([&] { transpose_scaled(a.in(), out); }, "out_t.layout");

  out = a.out();
  out.data.dtype = DType::E5M2;
  expect_error([&] { transpose_scaled(a.in(), out); }, "out_t.data");

  out = a.out();
  out.data.rows = 300;  // [M][K] instead of [K][M]
  out.data.cols = 256;
  expect_error([&] { transpose_scaled(a.in(), out); }, "out_t.data");

  out = a.out();
  out.data.ld = 301;
  expect_error([&] { transpose_scaled(a.in(), out); }, "out_t.data");

  out = a.out();
  out.scale.rows = 2;  // 300 tokens in one group: 3 tiles
  expect_error([&] { transpose_scaled(a.in(), out); }, "out_t.scale");

  out = a.out();
  out.scale.dtype = DType::E8M0;
  expect_error([&] { transpose_scaled(a.in(), out); }, "out_t.scale");

  out = a.out();
  out.data.device = Device::Cuda;  // data and scale on different devices
  expect_error([&] { transpose_scaled(a.in(), out); }, "out_t.scale");

  out = a.out();
  out.data.device = Device::Cuda;
  out.scale.device = Device::Cuda;  // out_t on the GPU, in on the CPU
  expect_error([&] { transpose_scaled(a.in(), out); }, "out_t.data");
}

TEST(TransposeArgs, RejectsBadGroups) {
  Args a;
  a.groups = {100, 100};  // sums to 200, not 300
  expect_error([&] { transpose_scaled(a.in(), a.out()); }, "out_t.col_groups");
  a.groups = {400, -100};
  expect_error([&] { transpose_scaled(a.in(), a.out()); }, "out_t.col_groups[1]");
  // Valid groups, but the scale was sized for one group: {5, 295} needs 1 + 3 = 4 tiles.
  a.groups = {5, 295};
  expect_error([&] { transpose_scaled(a.in(), a.out()); }, "out_t.scale");
  a.groups = std::vector<int64_t>(1025, 0);
  a.groups[0] = 300;
  expect_error([&] { transpose_scaled(a.in(), a.out()); }, "out_t.col_groups");
}

TEST(TransposeArgs, RejectsBadPolicy) {
  Args a;
  TransposeOptions o;
  o.policy = static_cast<TransposeScalePolicy>(7);
  expect_error([&] { transpose_scaled(a.in(), a.out(), o); }, "opts.policy");
}

TEST(TransposeArgs, CudaTensorsWithoutGpuAreUnsupported) {
  if (cuda_available()) GTEST_SKIP() << "a GPU is present: covered by transpose_gpu_test";
  Args a;
  ScaledTensor in = a.in(), out = a.out();
  for (TensorView* t : {&in.data, &in.scale, &out.data, &out.scale}) t->device = Device::Cuda;
  expect_error([&] { transpose_scaled(in, out); }, "device", ErrorKind::Unsupported);
}

}  // namespace
}  // namespace fp8flow::test
