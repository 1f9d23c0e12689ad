// CPU side of the MoE layer's internal helpers: host pool memory, and the reference gate GEMMs
// (sequential hd::fma order, identical to the CUDA kernels' order).
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "common/check.h"
#include "common/hd_math.h"
#include "fp8flow/formats.h"
#include "moe/moe_backends.h"

#if FP8FLOW_WITH_CUDA
#include <cuda_runtime.h>

#include "common/cuda_check.h"
#endif

namespace fp8flow::detail {

void* moe_alloc(Device dev, size_t bytes, Stream stream) {
  if (bytes == 0) bytes = 256;
  if (dev == Device::Cpu) {
    void* p = std::aligned_alloc(256, (bytes + 255) / 256 * 256);
    if (!p)
      throw_error(ErrorKind::InvalidArgument,
                  cat("fp8flow::MoELayer: host pool of ", bytes, " bytes: allocation failed"));
    std::memset(p, 0, bytes);
    return p;
  }
#if FP8FLOW_WITH_CUDA
  void* p = nullptr;
  FP8FLOW_CUDA_CHECK("MoELayer", cudaMalloc(&p, bytes));
  FP8FLOW_CUDA_CHECK("MoELayer", cudaMemsetAsync(p, 0, bytes, stream));
  // Construction-time only: the zero fill is complete before any stream uses the pool.
  FP8FLOW_CUDA_CHECK("MoELayer", cudaStreamSynchronize(stream));
  return p;
#else
  (void)stream;
  throw_error(ErrorKind::Unsupported,
              "fp8flow::MoELayer: device: expected Cpu, got Cuda (CPU-only build)");
#endif
}

void moe_free(Device dev, void* p) {
  if (!p) return;
  if (dev == Device::Cpu) return std::free(p);
#if FP8FLOW_WITH_CUDA
  cudaFree(p);
#endif
}

void moe_copy_to_host(Device dev, void* dst, const void* src, size_t bytes, Stream stream,
                      bool sync) {
  if (dev == Device::Cpu) {
    std::memcpy(dst, src, bytes);
    return;
  }
#if FP8FLOW_WITH_CUDA
  FP8FLOW_CUDA_CHECK("MoELayer", cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream));
  if (sync) FP8FLOW_CUDA_CHECK("MoELayer", cudaStreamSynchronize(stream));
#else
  (void)stream;
  (void)sync;
#endif
}

void moe_copy_from_host(Device dev, void* dst, const void* src, size_t bytes, Stream stream) {
  if (dev == Device::Cpu) {
    std::memcpy(dst, src, bytes);
    return;
  }
#if FP8FLOW_WITH_CUDA
  FP8FLOW_CUDA_CHECK("MoELayer", cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream));
  FP8FLOW_CUDA_CHECK("MoELayer", cudaStreamSynchronize(stream));
#else
  (void)stream;
#endif
}

SideStream moe_side_create(Device dev) {
  SideStream s;
  if (dev == Device::Cpu) return s;
#if FP8FLOW_WITH_CUDA
  cudaStream_t st = nullptr;
  cudaEvent_t f = nullptr, j = nullptr;
  FP8FLOW_CUDA_CHECK("MoELayer", cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  s.stream = reinterpret_cast<Stream>(st);
  try {
    FP8FLOW_CUDA_CHECK("MoELayer", cudaEventCreateWithFlags(&f, cudaEventDisableTiming));
    s.fork = f;
    FP8FLOW_CUDA_CHECK("MoELayer", cudaEventCreateWithFlags(&j, cudaEventDisableTiming));
    s.join = j;
  } catch (...) {
    moe_side_destroy(s);
    throw;
  }
#endif
  return s;
}

void moe_side_destroy(SideStream& s) {
#if FP8FLOW_WITH_CUDA
  if (s.fork) cudaEventDestroy(static_cast<cudaEvent_t>(s.fork));
  if (s.join) cudaEventDestroy(static_cast<cudaEvent_t>(s.join));
  if (s.stream) cudaStreamDestroy(reinterpret_cast<cudaStream_t>(s.stream));
#endif
  s = SideStream{};
}

void moe_side_fork(const SideStream& s, Stream from) {
  if (!s.stream) return;
#if FP8FLOW_WITH_CUDA
  const auto ev = static_cast<cudaEvent_t>(s.fork);
  FP8FLOW_CUDA_CHECK("MoELayer", cudaEventRecord(ev, reinterpret_cast<cudaStream_t>(from)));
  FP8FLOW_CUDA_CHECK("MoELayer",
                     cudaStreamWaitEvent(reinterpret_cast<cudaStream_t>(s.stream), ev, 0));
#else
  (void)from;
#endif
}

void moe_side_join(const SideStream& s, Stream into) {
  if (!s.stream) return;
#if FP8FLOW_WITH_CUDA
  const auto ev = static_cast<cudaEvent_t>(s.join);
  FP8FLOW_CUDA_CHECK("MoELayer", cudaEventRecord(ev, reinterpret_cast<cudaStream_t>(s.stream)));
  FP8FLOW_CUDA_CHECK("MoELayer", cudaStreamWaitEvent(reinterpret_cast<cudaStream_t>(into), ev, 0));
#else
  (void)into;
#endif
}

void moe_memset0(Device dev, void* p, size_t bytes, Stream stream) {
  if (dev == Device::Cpu) {
    std::memset(p, 0, bytes);
    return;
  }
#if FP8FLOW_WITH_CUDA
  FP8FLOW_CUDA_CHECK("MoELayer", cudaMemsetAsync(p, 0, bytes, stream));
#else
  (void)stream;
#endif
}

}  // namespace fp8flow::detail

namespace fp8flow::ref {

void moe_gate_logits(const TensorView& x, const TensorView& wg, const TensorView& logits) {
  const int64_t T = x.rows, H = x.cols, E = wg.rows;
  const uint16_t* xp = x.ptr<const uint16_t>();
  const float* w = wg.ptr<const float>();
  float* out = logits.ptr<float>();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t e = 0; e < E; ++e) {
      float acc = 0.0f;
      for (int64_t h = 0; h < H; ++h)
        acc = hd::fma(fmt::bf16_to_f32(xp[t * H + h]), w[e * H + h], acc);
      out[t * E + e] = acc;
    }
}

void moe_gate_backward(const TensorView& dl, const TensorView& wg, const TensorView& x,
                       const TensorView& dx_exp, const TensorView& dx, const TensorView& dwg) {
  const int64_t T = x.rows, H = x.cols, E = wg.rows;
  const float* d = dl.ptr<const float>();
  const float* w = wg.ptr<const float>();
  const uint16_t* xp = x.ptr<const uint16_t>();
  const float* de = dx_exp.ptr<const float>();
  uint16_t* o = dx.ptr<uint16_t>();
  float* dw = dwg.ptr<float>();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < H; ++h) {
      float acc = 0.0f;
      for (int64_t e = 0; e < E; ++e) acc = hd::fma(d[t * E + e], w[e * H + h], acc);
      o[t * H + h] = fmt::bf16_from_f32(hd::add(de[t * H + h], acc));
    }
  for (int64_t e = 0; e < E; ++e)
    for (int64_t h = 0; h < H; ++h) {
      float acc = 0.0f;
      for (int64_t t = 0; t < T; ++t)
        acc = hd::fma(d[t * E + e], fmt::bf16_to_f32(xp[t * H + h]), acc);
      dw[e * H + h] = acc;
    }
}

void moe_count_nonfinite(const TensorView& t, int64_t* count) {
  int64_t n = 0;
  const int64_t N = t.numel();
  if (t.dtype == DType::BF16) {
    const uint16_t* p = t.ptr<const uint16_t>();
    for (int64_t i = 0; i < N; ++i) n += (p[i] & 0x7F80u) == 0x7F80u;
  } else {
    const uint32_t* p = t.ptr<const uint32_t>();
    for (int64_t i = 0; i < N; ++i) n += (p[i] & 0x7F800000u) == 0x7F800000u;
  }
  *count += n;
}

void moe_to_bf16(const TensorView& in, const TensorView& out) {
  const float* a = in.ptr<const float>();
  uint16_t* b = out.ptr<uint16_t>();
  for (int64_t i = 0, n = in.numel(); i < n; ++i) b[i] = fmt::bf16_from_f32(a[i]);
}

}  // namespace fp8flow::ref
