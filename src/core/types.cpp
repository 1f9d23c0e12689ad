// Names, sizes and scale-shape rules of the public types (include/fp8flow/types.h).
#include "fp8flow/types.h"

#include "common/check.h"
#include "fp8flow/version.h"

#if FP8FLOW_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace fp8flow {

const char* to_string(DType d) {
  switch (d) {
    case DType::F32:
      return "F32";
    case DType::BF16:
      return "BF16";
    case DType::E4M3:
      return "E4M3";
    case DType::E5M2:
      return "E5M2";
    case DType::E2M1x2:
      return "E2M1x2";
    case DType::E8M0:
      return "E8M0";
    case DType::I32:
      return "I32";
    case DType::I64:
      return "I64";
  }
  return "?";
}

const char* to_string(Device d) {
  return d == Device::Cpu ? "Cpu" : "Cuda";
}

const char* to_string(ErrorKind k) {
  switch (k) {
    case ErrorKind::InvalidArgument:
      return "InvalidArgument";
    case ErrorKind::Unsupported:
      return "Unsupported";
    case ErrorKind::Cuda:
      return "Cuda";
    case ErrorKind::Comm:
      return "Comm";
  }
  return "?";
}

const char* to_string(ScaleLayout l) {
  switch (l) {
    case ScaleLayout::Rowwise1x128:
      return "Rowwise1x128";
    case ScaleLayout::Block128x128:
      return "Block128x128";
    case ScaleLayout::Mx1x32:
      return "Mx1x32";
  }
  return "?";
}

int dtype_bits(DType d) {
  switch (d) {
    case DType::F32:
      return 32;
    case DType::BF16:
      return 16;
    case DType::E4M3:
    case DType::E5M2:
    case DType::E8M0:
      return 8;
    case DType::E2M1x2:
      return 4;
    case DType::I32:
      return 32;
    case DType::I64:
      return 64;
  }
  return 0;
}

int64_t rowwise_tiles(int64_t cols, std::span<const int64_t> groups) {
  if (groups.empty()) return (cols + 127) / 128;
  int64_t tiles = 0;
  for (int64_t g : groups) tiles += (g + 127) / 128;
  return tiles;
}

Shape2D scale_shape(ScaleLayout layout, int64_t rows, int64_t cols,
                    std::span<const int64_t> groups) {
  switch (layout) {
    case ScaleLayout::Rowwise1x128:
      return {rowwise_tiles(cols, groups), rows};
    case ScaleLayout::Block128x128:
      return {(rows + 127) / 128, (cols + 127) / 128};
    case ScaleLayout::Mx1x32:
      return {rows, cols / 32};
  }
  return {};
}

bool cuda_available() {
#if FP8FLOW_WITH_CUDA
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return n > 0;
#else
  return false;
#endif
}

const char* version_string() {
#if FP8FLOW_WITH_CUDA
  return "0.1.0+cuda";
#else
  return "0.1.0+cpu";
#endif
}

}  // namespace fp8flow
