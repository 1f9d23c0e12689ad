// Bad arguments to quantize / quantize_transposed / quantize_both / dequantize: each raises
// fp8flow::Error whose message names the op and the offending argument. Host-memory cases run
// everywhere; device cases (host pointer passed as Cuda, misaligned device pointers) need a GPU.
#include <gtest/gtest.h>

#include <functional>
#include <string>
#include <vector>

#include "common/test_util.h"

namespace fp8flow::test {
namespace {

// Expects fn() to throw fp8flow::Error of `kind` whose message starts with "fp8flow::<op>: <arg>".
void expect_error(const std::function<void()>& fn, const std::string& op, const std::string& arg,
                  ErrorKind kind = ErrorKind::InvalidArgument) {
  const std::string prefix = "fp8flow::" + op + ": " + arg;
  try {
    fn();
    ADD_FAILURE() << "no error; expected one starting with '" << prefix << "'";
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()).rfind(prefix, 0), 0u)
        << "message '" << e.what() << "' does not start with '" << prefix << "'";
    EXPECT_EQ(e.kind(), kind) << e.what();
  }
}

// A consistent set of host buffers for X [M][K] and its outputs; tests then break one thing.
struct ArgSet {
  int64_t M = 40, K = 256;
  HostTensor in{DType::BF16, 40, 256};
  HostTensor data{DType::E4M3, 40, 256};
  HostTensor scale{DType::F32, 2, 40};  // [K/128][M]
  HostTensor data_t{DType::E4M3, 256, 40};
  HostTensor scale_t{DType::F32, 1, 256};  // [tiles][K]
  std::vector<int64_t> groups;
  ScaledTensor out() const { return {data.v, scale.v, ScaleLayout::Rowwise1x128}; }
  ScaledTensor out_t() const { return {data_t.v, scale_t.v, ScaleLayout::Rowwise1x128, groups}; }
};

TEST(QuantizeArgs, InputDtype) {
  ArgSet s;
  TensorView in = s.in.v;
  in.dtype = DType::E4M3;
  expect_error([&] { quantize(in, s.out()); }, "quantize", "in");
  expect_error([&] { quantize_transposed(in, s.out_t()); }, "quantize_transposed", "in");
  expect_error([&] { quantize_both(in, s.out(), s.out_t()); }, "quantize_both", "in");
}

TEST(QuantizeArgs, InputColsMultipleOf16) {
  ArgSet s;
  TensorView in = s.in.v;
  in.cols = 120;  // 40 x 120 fits the buffer; 120 % 16 != 0
  expect_error([&] { quantize(in, s.out()); }, "quantize", "in");
}

TEST(QuantizeArgs, InputNotContiguous) {
  ArgSet s;
  TensorView in = s.in.v;
  in.cols = 128;
  in.ld = 256;
  expect_error([&] { quantize(in, s.out()); }, "quantize", "in");
}

TEST(QuantizeArgs, OutputDtypeAndLayout) {
  ArgSet s;
  ScaledTensor out = s.out();
  out.data.dtype = DType::BF16;
  expect_error([&] { quantize(s.in.v, out); }, "quantize", "out.data");
  out = s.out();
  out.layout = ScaleLayout::Mx1x32;
  expect_error([&] { quantize(s.in.v, out); }, "quantize", "out.layout");
  ScaledTensor out_t = s.out_t();
  out_t.data.dtype = DType::E2M1x2;
  expect_error([&] { quantize_transposed(s.in.v, out_t); }, "quantize_transposed", "out_t.data");
  out = s.out();
  out.layout = ScaleLayout::Block128x128;
  HostTensor bscale(DType::F32, 1, 2);
  out.scale = bscale.v;
  expect_error([&] { quantize_both(s.in.v, out, s.out_t()); }, "quantize_both", "out.layout");
}

TEST(QuantizeArgs, ScaleShapeAndDtype) {
  ArgSet s;
  ScaledTensor out = s.out();
  out.scale.rows = 1;  // needs [2][40]
  expect_error([&] { quantize(s.in.v, out); }, "quantize", "out.scale");
  out = s.out();
  out.scale.dtype = DType::E8M0;
  expect_error([&] { quantize(s.in.v, out); }, "quantize", "out.scale");
  ScaledTensor out_t = s.out_t();
  out_t.scale.cols = 40;  // needs [1][256]
  expect_error([&] { quantize_transposed(s.in.v, out_t); }, "quantize_transposed", "out_t.scale");
  // Block128x128 wants [ceil(M/128)][ceil(K/128)] = [1][2], not the row-wise [2][40].
  out = s.out();
  out.layout = ScaleLayout::Block128x128;
  expect_error([&] { quantize(s.in.v, out); }, "quantize", "out.scale");
}

TEST(QuantizeArgs, DataShape) {
  ArgSet s;
  ScaledTensor out_t = s.out_t();
  out_t.data.rows = 40;
  out_t.data.cols = 256;    // not transposed
  out_t.scale = s.scale.v;  // [2][40]: consistent with the (wrong) data shape
  expect_error([&] { quantize_transposed(s.in.v, out_t); }, "quantize_transposed", "out_t.data");
}

TEST(QuantizeArgs, NullPointer) {
  ArgSet s;
  TensorView in = s.in.v;
  in.data = nullptr;
  expect_error([&] { quantize(in, s.out()); }, "quantize", "in");
  ScaledTensor out = s.out();
  out.scale.data = nullptr;
  expect_error([&] { quantize(s.in.v, out); }, "quantize", "out.scale");
  ScaledTensor out_t = s.out_t();
  out_t.data.data = nullptr;
  expect_error([&] { quantize_both(s.in.v, s.out(), out_t); }, "quantize_both", "out_t.data");
}

TEST(QuantizeArgs, GroupsMustSumToTokens) {
  ArgSet s;
  s.groups = {10, 20};  // sum 30, M = 40
  expect_error([&] { quantize_transposed(s.in.v, s.out_t()); }, "quantize_transposed",
               "out_t.col_groups");
  s.groups = {50, -10};
  expect_error([&] { quantize_transposed(s.in.v, s.out_t()); }, "quantize_transposed",
               "out_t.col_groups[1]");
  // Row-wise output of X takes no groups.
  ScaledTensor out = s.out();
  const std::vector<int64_t> g = {40};
  out.col_groups = g;
  expect_error([&] { quantize(s.in.v, out); }, "quantize", "out.col_groups");
}

TEST(QuantizeArgs, MixedDevices) {
  ArgSet s;
  ScaledTensor out = s.out();
  out.data.device = Device::Cuda;
  out.scale.device = Device::Cuda;
  expect_error([&] { quantize(s.in.v, out); }, "quantize", "out.data");
  out = s.out();
  out.scale.device = Device::Cuda;
  expect_error([&] { quantize(s.in.v, out); }, "quantize", "out.scale");
}

TEST(QuantizeArgs, CudaTensorsWithoutGpu) {
  if (cuda_available()) GTEST_SKIP() << "a GPU is present: covered by QuantizeArgsGpu";
  ArgSet s;
  TensorView in = s.in.v;
  ScaledTensor out = s.out();
  in.device = out.data.device = out.scale.device = Device::Cuda;
  expect_error([&] { quantize(in, out); }, "quantize", "device", ErrorKind::Unsupported);
}

TEST(DequantizeArgs, BadInputs) {
  ArgSet s;
  HostTensor o(DType::F32, 40, 256);
  expect_error(
      [&] {
        dequantize(s.out(), TensorView{o.v.data, DType::E4M3, 40, 256});
      },
      "dequantize", "out");
  expect_error(
      [&] {
        dequantize(s.out(), TensorView{o.v.data, DType::F32, 40, 128});
      },
      "dequantize", "out");
  ScaledTensor in = s.out();
  in.layout = ScaleLayout::Mx1x32;  // E4M3 data under an MX layout
  expect_error([&] { dequantize(in, o.v); }, "dequantize", "in.data");
  in = s.out();
  in.scale.rows = 3;
  expect_error([&] { dequantize(in, o.v); }, "dequantize", "in.scale");
  // MXFP4 scales are E8M0 [R][C/32].
  HostTensor mx(DType::E2M1x2, 40, 256), mxs(DType::F32, 40, 8);
  expect_error(
      [&] {
        dequantize(ScaledTensor{mx.v, mxs.v, ScaleLayout::Mx1x32}, o.v);
      },
      "dequantize", "in.scale");
}

#if FP8FLOW_WITH_CUDA
// Device-side checks: run only where a GPU is visible (they come after the backend check).
TEST(QuantizeArgsGpu, HostPointerPassedAsCuda) {
  FP8FLOW_REQUIRE_GPU();
  ArgSet s;
  DeviceTensor din(s.in), ddata(s.data.v.dtype, 40, 256), dscale(DType::F32, 2, 40);
  TensorView in = s.in.v;
  in.device = Device::Cuda;  // host memory labelled Cuda
  expect_error([&] { quantize(in, ScaledTensor{ddata.v, dscale.v}); }, "quantize", "in");
  TensorView sc = s.scale.v;
  sc.device = Device::Cuda;
  expect_error([&] { quantize(din.v, ScaledTensor{ddata.v, sc}); }, "quantize", "out.scale");
}

TEST(QuantizeArgsGpu, MisalignedPointers) {
  FP8FLOW_REQUIRE_GPU();
  const int64_t M = 40, K = 256;
  DeviceTensor big(DType::BF16, M + 1, K);  // room to offset
  DeviceTensor data(DType::E4M3, M + 1, K), scale(DType::F32, 3, M);
  DeviceTensor data_t(DType::E4M3, K, M), scale_t(DType::F32, 1, K + 4);
  auto off = [](const TensorView& t, size_t bytes) {
    TensorView v = t;
    v.data = static_cast<uint8_t*>(t.data) + bytes;
    return v;
  };
  TensorView in = big.v;
  in.rows = M;
  TensorView d = data.v;
  d.rows = M;
  TensorView s = scale.v;
  s.rows = 2;
  TensorView dt = data_t.v;
  TensorView st = scale_t.v;
  st.cols = K;
  expect_error([&] { quantize(off(in, 8), ScaledTensor{d, s}); }, "quantize", "in");
  expect_error([&] { quantize(in, ScaledTensor{off(d, 4), s}); }, "quantize", "out.data");
  expect_error([&] { quantize(in, ScaledTensor{d, off(s, 2)}); }, "quantize", "out.scale");
  expect_error(
      [&] {
        quantize_transposed(off(in, 2), ScaledTensor{dt, st});
      },
      "quantize_transposed", "in");
  expect_error(
      [&] {
        quantize_both(in, ScaledTensor{d, s}, ScaledTensor{dt, off(st, 1)});
      },
      "quantize_both", "out_t.scale");
  // dequantize: element alignment of the output and the FP32 scales.
  DeviceTensor o(DType::F32, M + 1, K);
  TensorView ov = o.v;
  ov.rows = M;
  expect_error([&] { dequantize(ScaledTensor{d, s}, off(ov, 2)); }, "dequantize", "out");
  expect_error([&] { dequantize(ScaledTensor{d, off(s, 1)}, ov); }, "dequantize", "in.scale");
}
#endif

}  // namespace
}  // namespace fp8flow::test
