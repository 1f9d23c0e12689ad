// Bad arguments to the MXFP4 ops: each raises fp8flow::Error naming the op and the argument.
#include <string>

#include "mxfp4/mxfp4_test_util.h"

namespace fp8flow::test {
namespace {

#define EXPECT_FP8FLOW_ERROR(stmt, substr)                                          \
  do {                                                                              \
    try {                                                                           \
      stmt;                                                                         \
      ADD_FAILURE() << "no error from " #stmt;                                      \
    } catch (const ::fp8flow::Error& e) {                                           \
      EXPECT_NE(std::string(e.what()).find(substr), std::string::npos) << e.what(); \
    }                                                                               \
  } while (0)

constexpr int64_t M = 5, K = 256;

struct Bufs {
  HostTensor x = HostTensor(DType::F32, M, K);
  HostScaled fp8 = alloc_fp8(M, K);
  HostScaled mx = alloc_mx(M, K);
  HostScaled fp8_t = alloc_fp8(K, M);
  Bufs() {
    // Valid contents: zeros (the ops must not read poison as a reason to fail).
    std::fill(x.buf.begin(), x.buf.end(), 0);
    std::fill(fp8.data.buf.begin(), fp8.data.buf.end(), 0);
    for (int64_t i = 0; i < (K / 128) * M; ++i) fp8.scale.ptr<float>()[i] = 1.f;
    std::fill(mx.data.buf.begin(), mx.data.buf.end(), 0);
    std::fill(mx.scale.buf.begin(), mx.scale.buf.end(), 127);
  }
};

TEST(Mxfp4Args, ValidCallsPass) {
  Bufs b;
  EXPECT_NO_THROW(quantize_mxfp4(b.x.v, b.mx.st()));
  EXPECT_NO_THROW(fp8_to_mxfp4(b.fp8.st(), b.mx.st()));
  EXPECT_NO_THROW(mxfp4_to_fp8(b.mx.st(), b.fp8.st()));
  EXPECT_NO_THROW(mxfp4_to_fp8_transposed(b.mx.st(), b.fp8_t.st()));
  // Empty tensors are fine.
  HostTensor x0(DType::F32, 0, K);
  HostScaled mx0 = alloc_mx(0, K), f0 = alloc_fp8(0, K), t0 = alloc_fp8(K, 0, {0, 0});
  EXPECT_NO_THROW(quantize_mxfp4(x0.v, mx0.st()));
  EXPECT_NO_THROW(fp8_to_mxfp4(f0.st(), mx0.st()));
  EXPECT_NO_THROW(mxfp4_to_fp8(mx0.st(), f0.st()));
  EXPECT_NO_THROW(mxfp4_to_fp8_transposed(mx0.st(), t0.st()));
}

TEST(Mxfp4Args, QuantizeMxfp4) {
  Bufs b;
  const char* op = "fp8flow::quantize_mxfp4: ";
  TensorView x = b.x.v;
  x.dtype = DType::E4M3;
  EXPECT_FP8FLOW_ERROR(quantize_mxfp4(x, b.mx.st()),
                       std::string(op) + "in: expected dtype F32 or BF16, got E4M3");
  x = b.x.v;
  x.cols = 48;
  EXPECT_FP8FLOW_ERROR(quantize_mxfp4(x, b.mx.st()),
                       std::string(op) + "in: expected cols divisible by 32");
  x = b.x.v;
  x.cols = 224;
  x.ld = 256;
  EXPECT_FP8FLOW_ERROR(quantize_mxfp4(x, b.mx.st()), std::string(op) + "in: expected contiguous");
  x = b.x.v;
  x.data = nullptr;
  EXPECT_FP8FLOW_ERROR(quantize_mxfp4(x, b.mx.st()), std::string(op) + "in: expected a non-null");
  ScaledTensor o = b.mx.st();
  o.layout = ScaleLayout::Rowwise1x128;
  EXPECT_FP8FLOW_ERROR(quantize_mxfp4(b.x.v, o), std::string(op) + "out.layout: expected Mx1x32");
  o = b.mx.st();
  o.data.dtype = DType::E4M3;
  EXPECT_FP8FLOW_ERROR(quantize_mxfp4(b.x.v, o),
                       std::string(op) + "out.data: expected dtype E2M1x2");
  o = b.mx.st();
  o.scale.dtype = DType::F32;
  EXPECT_FP8FLOW_ERROR(quantize_mxfp4(b.x.v, o),
                       std::string(op) + "out.scale: expected dtype E8M0");
  o = b.mx.st();
  o.scale.cols = K / 32 - 1;
  EXPECT_FP8FLOW_ERROR(quantize_mxfp4(b.x.v, o),
                       std::string(op) + "out.scale: expected shape [5, 8]");
  o = b.mx.st();
  o.data.rows = M - 1;
  o.scale.rows = M - 1;
  EXPECT_FP8FLOW_ERROR(quantize_mxfp4(b.x.v, o),
                       std::string(op) + "out.data: expected shape [5, 256]");
  o = b.mx.st();
  o.data.device = o.scale.device = Device::Cuda;
  EXPECT_FP8FLOW_ERROR(quantize_mxfp4(b.x.v, o), std::string(op) + "out.data: expected device Cpu");
}

TEST(Mxfp4Args, Fp8ToMxfp4) {
  Bufs b;
  const std::string op = "fp8flow::fp8_to_mxfp4: ";
  ScaledTensor in = b.fp8.st();
  in.data.dtype = DType::E5M2;
  EXPECT_FP8FLOW_ERROR(fp8_to_mxfp4(in, b.mx.st()), op + "in.data: expected dtype E4M3, got E5M2");
  in = b.fp8.st();
  in.layout = ScaleLayout::Block128x128;
  EXPECT_FP8FLOW_ERROR(fp8_to_mxfp4(in, b.mx.st()), op + "in.layout: expected Rowwise1x128");
  in = b.fp8.st();
  const int64_t g[] = {128, 128};
  in.col_groups = g;
  EXPECT_FP8FLOW_ERROR(fp8_to_mxfp4(in, b.mx.st()), op + "in.col_groups: expected empty");
  in = b.fp8.st();
  in.scale.dtype = DType::BF16;
  EXPECT_FP8FLOW_ERROR(fp8_to_mxfp4(in, b.mx.st()), op + "in.scale: expected dtype F32");
  in = b.fp8.st();
  in.scale.rows = 1;
  EXPECT_FP8FLOW_ERROR(fp8_to_mxfp4(in, b.mx.st()), op + "in.scale: expected shape [2, 5]");
  // K a multiple of 32 but not of 128.
  HostScaled f96 = alloc_fp8(M, 96), m96 = alloc_mx(M, 96);
  EXPECT_FP8FLOW_ERROR(fp8_to_mxfp4(f96.st(), m96.st()),
                       op + "in.data: expected cols divisible by 128");
  HostScaled m512 = alloc_mx(M, 512);
  EXPECT_FP8FLOW_ERROR(fp8_to_mxfp4(b.fp8.st(), m512.st()),
                       op + "out.data: expected shape [5, 256]");
  ScaledTensor o = b.mx.st();
  o.scale.dtype = DType::E4M3;
  EXPECT_FP8FLOW_ERROR(fp8_to_mxfp4(b.fp8.st(), o), op + "out.scale: expected dtype E8M0");
  o = b.mx.st();
  o.data.ld = 2 * K;
  EXPECT_FP8FLOW_ERROR(fp8_to_mxfp4(b.fp8.st(), o), op + "out.data: expected contiguous");
  o = b.mx.st();
  o.scale.device = Device::Cuda;
  EXPECT_FP8FLOW_ERROR(fp8_to_mxfp4(b.fp8.st(), o), op + "out.scale: expected device Cpu");
}

TEST(Mxfp4Args, Mxfp4ToFp8) {
  Bufs b;
  const std::string op = "fp8flow::mxfp4_to_fp8: ";
  ScaledTensor in = b.mx.st();
  in.data.dtype = DType::E4M3;
  EXPECT_FP8FLOW_ERROR(mxfp4_to_fp8(in, b.fp8.st()),
                       op + "in.data: expected dtype E2M1x2, got E4M3");
  in = b.mx.st();
  in.layout = ScaleLayout::Rowwise1x128;
  EXPECT_FP8FLOW_ERROR(mxfp4_to_fp8(in, b.fp8.st()), op + "in.layout: expected Mx1x32");
  in = b.mx.st();
  in.scale.rows = M + 1;
  EXPECT_FP8FLOW_ERROR(mxfp4_to_fp8(in, b.fp8.st()), op + "in.scale: expected shape [5, 8]");
  HostScaled f96 = alloc_fp8(M, 96), m96 = alloc_mx(M, 96);
  EXPECT_FP8FLOW_ERROR(mxfp4_to_fp8(m96.st(), f96.st()),
                       op + "in.data: expected cols divisible by 128");
  ScaledTensor o = b.fp8.st();
  o.data.dtype = DType::E5M2;
  EXPECT_FP8FLOW_ERROR(mxfp4_to_fp8(b.mx.st(), o), op + "out.data: expected dtype E4M3, got E5M2");
  o = b.fp8.st();
  const int64_t g[] = {200, 56};
  o.col_groups = g;
  EXPECT_FP8FLOW_ERROR(mxfp4_to_fp8(b.mx.st(), o), op + "out.col_groups: expected empty");
  o = b.fp8.st();
  o.scale.cols = M + 1;
  EXPECT_FP8FLOW_ERROR(mxfp4_to_fp8(b.mx.st(), o), op + "out.scale: expected shape [2, 5]");
  o = b.fp8.st();
  o.layout = ScaleLayout::Block128x128;
  EXPECT_FP8FLOW_ERROR(mxfp4_to_fp8(b.mx.st(), o), op + "out.layout: expected Rowwise1x128");
}

TEST(Mxfp4Args, Mxfp4ToFp8Transposed) {
  Bufs b;
  const std::string op = "fp8flow::mxfp4_to_fp8_transposed: ";
  EXPECT_FP8FLOW_ERROR(mxfp4_to_fp8_transposed(b.mx.st(), b.fp8.st()),
                       op + "out_t.data: expected shape [256, 5]");
  ScaledTensor o = b.fp8_t.st();
  const int64_t bad_sum[] = {2, 2};
  o.col_groups = bad_sum;
  EXPECT_FP8FLOW_ERROR(mxfp4_to_fp8_transposed(b.mx.st(), o),
                       op + "out_t.col_groups: expected sizes summing to 5");
  const int64_t negative[] = {6, -1};
  o.col_groups = negative;
  EXPECT_FP8FLOW_ERROR(mxfp4_to_fp8_transposed(b.mx.st(), o),
                       op + "out_t.col_groups[1]: expected a non-negative size");
  // Three non-empty groups need three 128-token scale tiles.
  const int64_t three[] = {1, 0, 2, 2};
  o.col_groups = three;
  EXPECT_FP8FLOW_ERROR(mxfp4_to_fp8_transposed(b.mx.st(), o),
                       op + "out_t.scale: expected shape [3, 256]");
  o = b.fp8_t.st();
  o.data.dtype = DType::E5M2;
  EXPECT_FP8FLOW_ERROR(mxfp4_to_fp8_transposed(b.mx.st(), o),
                       op + "out_t.data: expected dtype E4M3");
  o = b.fp8_t.st();
  o.data.cols = 4;
  o.data.ld = 5;
  o.scale.cols = 256;
  HostScaled mx4 = alloc_mx(4, K);
  EXPECT_FP8FLOW_ERROR(mxfp4_to_fp8_transposed(mx4.st(), o),
                       op + "out_t.data: expected contiguous");
  ScaledTensor in = b.mx.st();
  in.scale.dtype = DType::F32;
  EXPECT_FP8FLOW_ERROR(mxfp4_to_fp8_transposed(in, b.fp8_t.st()),
                       op + "in.scale: expected dtype E8M0");
  HostScaled m96 = alloc_mx(M, 96), t96 = alloc_fp8(96, M);
  EXPECT_FP8FLOW_ERROR(mxfp4_to_fp8_transposed(m96.st(), t96.st()),
                       op + "in.data: expected cols divisible by 128");
}

// Tensors marked Cuda: on a machine without a GPU (or a CPU-only build) the op raises Unsupported;
// with a GPU, host memory marked Cuda is rejected by name.
TEST(Mxfp4Args, CudaTensorsNeedADeviceAndDeviceMemory) {
  Bufs b;
  auto cuda = [](ScaledTensor t) {
    t.data.device = t.scale.device = Device::Cuda;
    return t;
  };
  TensorView x = b.x.v;
  x.device = Device::Cuda;
  try {
    quantize_mxfp4(x, cuda(b.mx.st()));
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_EQ(m.rfind("fp8flow::quantize_mxfp4: ", 0), 0u) << m;
    if (cuda_available())
      EXPECT_NE(m.find("in: expected device memory"), std::string::npos) << m;
    else
      EXPECT_EQ(e.kind(), ErrorKind::Unsupported) << m;
  }
  try {
    mxfp4_to_fp8_transposed(cuda(b.mx.st()), cuda(b.fp8_t.st()));
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()).rfind("fp8flow::mxfp4_to_fp8_transposed: ", 0), 0u) << e.what();
  }
}

}  // namespace
}  // namespace fp8flow::test
