// fp8flow public types: dtypes, non-owning tensor views, scaled (quantized) tensor views, errors.
// Framework-free: no torch, no CUDA headers. A view says where its memory lives (Device), and
// every op runs on the backend of its tensors' device: Cpu -> the reference backend (fp8flow::ref),
// Cuda -> the sm_90a backend (fp8flow::sm90). Mixing devices in one call is an error.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>

// A stream handle without including CUDA headers (same type as cudaStream_t).
struct CUstream_st;

namespace fp8flow {

using Stream = CUstream_st*;

enum class DType : uint8_t {
  F32,     // IEEE binary32
  BF16,    // bfloat16 stored as uint16
  E4M3,    // float8 e4m3fn (no Inf, NaN = S.1111.111)
  E5M2,    // float8 e5m2 (IEEE-like)
  E2M1x2,  // two float4 e2m1 values per byte; element 2i in the low nibble, 2i+1 in the high
  E8M0,    // unsigned 8-bit exponent, value 2^(b-127), 0xFF = NaN
  I32,
  I64,
};

enum class Device : uint8_t { Cpu, Cuda };

const char* to_string(DType);
const char* to_string(Device);

// Bits per element of a dtype (4 for E2M1x2, whose views count elements, not bytes).
int dtype_bits(DType);

enum class ErrorKind : uint8_t { InvalidArgument, Unsupported, Cuda, Comm };
const char* to_string(ErrorKind);

// Every failure fp8flow reports is an Error. The message names the op, the argument, what was
// expected and what came, e.g. "fp8flow::quantize: out.scale: expected dtype F32, got BF16".
class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& what) : std::runtime_error(what), kind_(kind) {}
  ErrorKind kind() const noexcept { return kind_; }

 private:
  ErrorKind kind_;
};

// A 2-D row-major tensor that fp8flow does not own. Element (r, c) lives at
// data + (r * ld + c) * dtype_bits / 8. `ld` (leading dimension, in elements) defaults to cols.
// For E2M1x2, rows/cols/ld count logical 4-bit elements; cols and ld must be even.
struct TensorView {
  void* data = nullptr;
  DType dtype = DType::F32;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t ld = -1;  // -1: contiguous rows (ld = cols)
  Device device = Device::Cpu;

  int64_t stride() const { return ld < 0 ? cols : ld; }
  int64_t numel() const { return rows * cols; }
  size_t row_bytes() const { return static_cast<size_t>(stride()) * dtype_bits(dtype) / 8; }
  size_t bytes() const { return static_cast<size_t>(rows) * row_bytes(); }
  template <typename T>
  T* ptr() const {
    return static_cast<T*>(data);
  }
};

// How a quantized tensor's scales are laid out. All FP8 scales are FP32 powers of two, stored as
// multipliers (dequantized value = code * scale), the form cuBLASLt consumes.
enum class ScaleLayout : uint8_t {
  // 1x128 tiles along each storage row. data [R][C]; scale F32 [tiles][R] with R contiguous
  // (cuBLASLt CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F). Tiles restart at every column group
  // boundary (ScaledTensor::col_groups), so tiles = sum_g ceil(C_g / 128); one group when empty.
  // Row-wise activations X [M][K] use it directly; a "column-wise" (128x1) copy of X is stored as
  // X^T [K][M] in this layout, with the token splits (m_splits) as its column groups.
  Rowwise1x128,
  // 128x128 blocks (weights). data [N][K]; scale F32 [ceil(N/128)][ceil(K/128)], K-blocks
  // contiguous (cuBLASLt CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F).
  Block128x128,
  // OCP MX: 32 consecutive elements of a row share one E8M0 exponent. data E2M1x2 [R][C]
  // (C logical elements, C % 32 == 0); scale E8M0 [R][C/32], row-major.
  Mx1x32,
};

const char* to_string(ScaleLayout);

// A quantized tensor: codes plus scales plus how they relate. Non-owning.
struct ScaledTensor {
  TensorView data;
  TensorView scale;
  ScaleLayout layout = ScaleLayout::Rowwise1x128;
  // Rowwise1x128 only: sizes of consecutive column groups (e.g. tokens per expert for X^T);
  // must sum to data.cols; zeros allowed. Host memory. Empty means one group.
  std::span<const int64_t> col_groups = {};
};

// Number of 1x128 tiles along a row of `cols` elements split into `groups` (empty = one group).
int64_t rowwise_tiles(int64_t cols, std::span<const int64_t> groups = {});

// Shape [rows, cols] the scale tensor of `layout` must have for data of `data_rows x data_cols`.
struct Shape2D {
  int64_t rows = 0;
  int64_t cols = 0;
};
Shape2D scale_shape(ScaleLayout layout, int64_t data_rows, int64_t data_cols,
                    std::span<const int64_t> col_groups = {});

// True when fp8flow was built with its CUDA backend and a CUDA device is visible now.
bool cuda_available();

}  // namespace fp8flow
