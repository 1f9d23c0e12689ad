// Host side of fp8flow's own sm_90a GEMM kernels: TMA tensor maps (through the driver's
// cuTensorMapEncodeTiled, fetched once via cudaGetDriverEntryPointByVersion, so the library does
// not link libcuda), and the launch facts they share (dynamic shared memory limit, SM count).
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>
#include <set>
#include <utility>

#include "common/check.h"
#include "common/cuda_check.h"

namespace fp8flow::sm90::own {

using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                                 const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                                 const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                                 CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

inline EncodeTiled encode_fn() {
  static EncodeTiled fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault,
                                         &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
      f = nullptr;
    return reinterpret_cast<EncodeTiled>(f);
  }();
  return fn;
}

// A 2D tensor [rows][cols] of `type` (row pitch `pitch` bytes) in boxes of box_rows x box_cols
// elements with 128-byte swizzle (box_cols * element size <= 128); loads of boxes reaching past
// `cols` or `rows` read zeros (what own_wgrad relies on at an expert's end), stores skip them.
inline CUtensorMap make_map_2d(const char* op, CUtensorMapDataType type, const void* data,
                               int64_t rows, int64_t cols, int64_t pitch, uint32_t box_rows,
                               uint32_t box_cols) {
  EncodeTiled enc = encode_fn();
  if (!enc)
    detail::throw_error(ErrorKind::Cuda,
                        detail::cat("fp8flow::", op, ": cuTensorMapEncodeTiled not available"));
  CUtensorMap m;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(pitch)};
  const cuuint32_t box[2] = {box_cols, box_rows}, elem[2] = {1, 1};
  const CUresult r = enc(&m, type, 2, const_cast<void*>(data), dims, strides, box, elem,
                         CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                         CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    detail::throw_error(
        ErrorKind::Cuda,
        detail::cat("fp8flow::", op, ": cuTensorMapEncodeTiled failed (", int(r), ")"));
  return m;
}

// An E4M3 [rows][cols] operand in the 128 x 128 boxes the wgmma kernels load.
inline CUtensorMap make_map(const char* op, const void* data, int64_t rows, int64_t cols,
                            int64_t pitch) {
  return make_map_2d(op, CU_TENSOR_MAP_DATA_TYPE_UINT8, data, rows, cols, pitch, 128, 128);
}

// Raises `kernel`'s dynamic shared memory limit to `bytes` on the current device (once per
// device: the attribute belongs to the device's context); throws fp8flow::Error (Cuda) if refused.
// The CUDA call runs outside this function's lock `mu` (shared by all devices): it may load the
// kernel's module and wait for the device to drain (lazy loading), which must not hold up other
// devices' threads (the locking rule of gemm_mutex in gemm_sm90.cu). Two threads of one device may
// both set it: harmless.
inline void allow_dynamic_smem(const char* op, const void* kernel, size_t bytes) {
  int dev = 0;
  FP8FLOW_CUDA_CHECK(op, cudaGetDevice(&dev));
  static std::mutex mu;
  static std::set<std::pair<const void*, int>> done;
  {
    const std::lock_guard<std::mutex> lock(mu);
    if (done.count({kernel, dev})) return;
  }
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(bytes)) != cudaSuccess)
    detail::throw_error(ErrorKind::Cuda, detail::cat("fp8flow::", op, ": cannot set ", bytes,
                                                     " bytes of dynamic shared memory"));
  const std::lock_guard<std::mutex> lock(mu);
  done.insert({kernel, dev});
}

// Multiprocessors of the current device (one persistent CTA each).
inline int sm_count(const char* op) {
  int dev = 0, sms = 0;
  FP8FLOW_CUDA_CHECK(op, cudaGetDevice(&dev));
  FP8FLOW_CUDA_CHECK(op, cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return sms;
}

}  // namespace fp8flow::sm90::own
