// Backend routing and CUDA-side host checks. An op validates its arguments, then runs the
// reference backend for Cpu tensors or the sm_90a backend for Cuda tensors; a build without CUDA
// raises Unsupported for Cuda tensors instead of falling back.
#pragma once

#include <string>

#include "common/check.h"

namespace fp8flow::detail {

// For Cuda tensors: the build has a CUDA backend, a device is current and it is sm_90 (Hopper),
// and each pointer is device-accessible memory. Throws Unsupported / InvalidArgument otherwise.
void require_cuda_backend(const Check& c);
void require_device_pointer(const Check& c, const TensorView& t, const std::string& arg);

}  // namespace fp8flow::detail

// Calls into fp8flow::sm90:: exist only in CUDA builds; require_cuda_backend() has already thrown
// Unsupported in a CPU-only build before such a call is reached.
#if FP8FLOW_WITH_CUDA
#define FP8FLOW_SM90(call) call
#else
#define FP8FLOW_SM90(call) \
  do {                     \
    if constexpr (false) { \
      call;                \
    }                      \
  } while (0)  // discarded: never odr-used, so never linked
#endif
