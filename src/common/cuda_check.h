// CUDA error checking for launchers (.cu files only): every runtime call and every launch is
// checked, and failures become fp8flow::Error(Cuda) naming the op.
#pragma once

#include <cuda_runtime.h>

#include "common/check.h"

#define FP8FLOW_CUDA_CHECK(op, expr)                                              \
  do {                                                                            \
    const cudaError_t fp8flow_err_ = (expr);                                      \
    if (fp8flow_err_ != cudaSuccess)                                              \
      ::fp8flow::detail::throw_error(                                             \
          ::fp8flow::ErrorKind::Cuda,                                             \
          ::fp8flow::detail::cat("fp8flow::", op, ": ", #expr,                    \
                                 " failed: ", cudaGetErrorString(fp8flow_err_))); \
  } while (0)

#define FP8FLOW_CUDA_CHECK_LAUNCH(op) FP8FLOW_CUDA_CHECK(op, cudaGetLastError())
