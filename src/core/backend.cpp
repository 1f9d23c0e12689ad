// Checks that a Cuda call can run here (backend built, Hopper device, device pointers).
#include "common/backend.h"

#if FP8FLOW_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace fp8flow::detail {

void require_cuda_backend(const Check& c) {
#if FP8FLOW_WITH_CUDA
  int dev = -1;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    c.fail(ErrorKind::Unsupported, "device",
           cat("a CUDA device, got none (", cudaGetErrorString(e), ")"));
  }
  int major = 0, minor = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
  c.that(major == 9 && minor == 0, "device", "a Hopper GPU (sm_90; kernels are built for sm_90a)",
         cat("sm_", major, minor), ErrorKind::Unsupported);
#else
  c.fail(ErrorKind::Unsupported, "device",
         "a build with the CUDA backend for Cuda tensors, got a CPU-only build "
         "(FP8FLOW_WITH_CUDA=OFF)");
#endif
}

void require_device_pointer(const Check& c, const TensorView& t, const std::string& arg) {
#if FP8FLOW_WITH_CUDA
  if (t.numel() == 0) return;
  cudaPointerAttributes attr{};
  cudaError_t e = cudaPointerGetAttributes(&attr, t.data);
  if (e != cudaSuccess) (void)cudaGetLastError();
  const bool ok =
      e == cudaSuccess && (attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged);
  c.that(ok, arg, "device memory (device == Cuda)",
         e != cudaSuccess ? std::string(cudaGetErrorString(e)) : std::string("host memory"));
#else
  (void)t;
  (void)arg;
  require_cuda_backend(c);
#endif
}

}  // namespace fp8flow::detail
