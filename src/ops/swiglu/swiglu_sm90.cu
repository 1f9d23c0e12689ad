// sm_90a backend of the SwiGLU ops: builds kernel parameters from validated views and launches the
// fused kernels of kernels/swiglu_kernels.cuh on the caller's stream (no host sync).
// Napkin math and design: see the kernel file. Bench: `fp8flow-bench ops` (swiglu fwd / bwd rows).
#include <cstdlib>

#include <type_traits>

#include "common/cuda_check.h"
#include "common/kernel_variant.h"
#include "ops/swiglu/kernels/swiglu_kernels.cuh"
#include "ops/swiglu/swiglu_backends.h"

namespace fp8flow::sm90 {
namespace {

namespace k = swiglu_kernels;
using swiglu_detail::FastDiv;
using swiglu_detail::OutKind;

cudaStream_t to_cuda(Stream s) {
  return reinterpret_cast<cudaStream_t>(s);
}

// The backward kernel variant (A/B timing in one binary; same results): 0 the session-12 kernel
// (FP8FLOW_SWIGLU_BWD_NEXT=0), 1 the default, kNext (the branch-free tile scale and the scale
// words through shared memory; FP8 out only, BF16 out runs 0; H100 session 13: 0.1846 -> 0.1696
// ms from the saved E4M3 h). swiglu_set_backward_variant overrides the environment (tests).
detail::KernelVariant g_bwd_variant([] {
  const char* n = std::getenv("FP8FLOW_SWIGLU_BWD_NEXT");
  return n && n[0] == '0' ? 0 : 1;
});

// kSaveIn: also writes in_q, the saved E4M3 copy of in (data, scale).
template <OutKind K, bool kSaveIn = false>
void launch_forward(const char* op, const TensorView& in, const TensorView& prob, void* out,
                    float* scale, bool weighted, Stream stream,
                    const ScaledTensor* in_q = nullptr) {
  const int64_t M = in.rows, F = in.cols / 2;
  const int64_t items = M * (F / 128);
  if (items == 0) return;
  // kMaxNumel (2^40 elements of in) bounds items by 2^32; the kernel indexes items in 32 bits.
  FP8FLOW_CHECK(
      items <= int64_t{0xFFFFFF00} && F < (int64_t{1} << 30), InvalidArgument,
      detail::cat("fp8flow::", op, ": in: expected M * F / 128 < 2^32 - 256, got ", items));
  k::FwdParams p{};
  p.in = static_cast<const uint16_t*>(in.data);
  p.prob = weighted ? static_cast<const float*>(prob.data) : nullptr;
  p.out = out;
  p.scale = scale;
  p.in_q = in_q ? in_q->data.data : nullptr;
  p.in_q_scale = in_q ? static_cast<float*>(in_q->scale.data) : nullptr;
  p.rows = static_cast<uint32_t>(M);
  p.items = static_cast<uint32_t>(items);
  p.F = static_cast<uint32_t>(F);
  p.tiles = FastDiv(static_cast<uint32_t>(F / 128));
  constexpr int64_t kItemsPerBlock = k::kThreads / k::kHalf * k::kFwdItems;
  const dim3 grid(static_cast<unsigned>((items + kItemsPerBlock - 1) / kItemsPerBlock));
  k::sm90_swiglu_fwd_bf16_1x128<K, kSaveIn><<<grid, k::kThreads, 0, to_cuda(stream)>>>(p);
  FP8FLOW_CUDA_CHECK_LAUNCH(op);
}

// in: h BF16 [M][2F], or (kFp8In) its saved E4M3 copy with in_scale F32 [2F/128][M].
template <OutKind K, bool kFp8In = false>
void launch_backward(const char* op, const TensorView& dy, const TensorView& in,
                     const TensorView& prob, void* din, float* scale, const TensorView& dprob,
                     bool weighted, Stream stream, const float* in_scale = nullptr) {
  const int64_t M = in.rows, F = in.cols / 2;
  if (M == 0) return;
  FP8FLOW_CHECK(F < (int64_t{1} << 30), InvalidArgument,
                detail::cat("fp8flow::", op, ": in: expected F < 2^30, got ", F));
  k::BwdParams p{};
  p.dy = static_cast<const uint16_t*>(dy.data);
  p.in = in.data;
  p.in_scale = in_scale;
  p.prob = weighted ? static_cast<const float*>(prob.data) : nullptr;
  p.din = din;
  p.scale = scale;
  p.dprob = weighted ? static_cast<float*>(dprob.data) : nullptr;
  p.rows = static_cast<uint32_t>(M);
  p.F = static_cast<uint32_t>(F);
  constexpr int64_t kRowsPerBlock = k::kThreads / 32;
  const dim3 grid(static_cast<unsigned>((M + kRowsPerBlock - 1) / kRowsPerBlock));
  const int mode = g_bwd_variant.get();
  cudaStream_t s = to_cuda(stream);
  auto go = [&](auto weighted_c) {
    constexpr bool kW = decltype(weighted_c)::value;
    if (K == OutKind::BF16 || mode == 0)
      k::sm90_swiglu_bwd_1x128<K, kW, kFp8In><<<grid, k::kThreads, 0, s>>>(p);
    else if constexpr (K != OutKind::BF16)
      k::sm90_swiglu_bwd_1x128<K, kW, kFp8In, true><<<grid, k::kThreads, 0, s>>>(p);
  };
  if (weighted)
    go(std::true_type{});
  else
    go(std::false_type{});
  FP8FLOW_CUDA_CHECK_LAUNCH(op);
}

// Exhaustive check of the hardware conversions (test hook): thread i of the grid-stride loop tests
// x = i as the low half and the bijection x * 2654435761 (odd) as the high half of one pair.
template <OutKind K>
__global__ void hw_cvt_check(unsigned long long* count, unsigned int* example) {
  namespace sd = swiglu_detail;
  unsigned long long bad = 0;
  const uint64_t n = uint64_t{1} << 32;
  for (uint64_t i = blockIdx.x * uint64_t{blockDim.x} + threadIdx.x; i < n;
       i += uint64_t{gridDim.x} * blockDim.x) {
    const uint32_t xl = static_cast<uint32_t>(i), xh = xl * 2654435761u;
    float lo = __uint_as_float(xl), hi = __uint_as_float(xh);
    if (!fmt::f32_is_finite(lo)) lo = 0.0f;
    if (!fmt::f32_is_finite(hi)) hi = 0.0f;
    uint32_t hw, sw;
    if constexpr (K == OutKind::BF16) {
      hw = k::hw_bf16x2(lo, hi);
      sw = uint32_t{fmt::bf16_from_f32(lo)} | (uint32_t{fmt::bf16_from_f32(hi)} << 16);
    } else {
      hw = k::hw_fp8x2<K>(lo, hi);
      sw = uint32_t{K == OutKind::E4M3 ? fmt::e4m3_from_f32(lo) : fmt::e5m2_from_f32(lo)} |
           (uint32_t{K == OutKind::E4M3 ? fmt::e4m3_from_f32(hi) : fmt::e5m2_from_f32(hi)} << 8);
    }
    if (hw != sw) {
      ++bad;
      const uint32_t low_mask = K == OutKind::BF16 ? 0xFFFFu : 0xFFu;
      *example = ((hw ^ sw) & low_mask) ? xl : xh;
    }
  }
  if (bad) atomicAdd(count, bad);
}

// Exhaustive check of swiglu_detail's branch-free exp/sigmoid/silu against hd:: (test hook).
__global__ void silu_check(unsigned long long* count, unsigned int* example) {
  namespace sd = swiglu_detail;
  unsigned long long bad = 0;
  for (uint64_t i = blockIdx.x * uint64_t{blockDim.x} + threadIdx.x; i < (uint64_t{1} << 32);
       i += uint64_t{gridDim.x} * blockDim.x) {
    const float x = __uint_as_float(static_cast<uint32_t>(i));
    const bool same = __float_as_uint(sd::exp(x)) == __float_as_uint(hd::exp(x)) &&
                      __float_as_uint(sd::sigmoid(x)) == __float_as_uint(hd::sigmoid(x)) &&
                      __float_as_uint(sd::silu(x)) == __float_as_uint(hd::silu(x));
    if (!same) {
      ++bad;
      *example = static_cast<uint32_t>(i);
    }
  }
  if (bad) atomicAdd(count, bad);
}

// Exhaustive check of the backward's fast sigmoid (test hook): i < 2^32 tests x = i (in the
// domain of hd::sigmoid_fast) against hd::sigmoid; i >= 2^32 tests d = 1.0f + (i - 2^32) ulps, up
// to 2^126, against rcp.rn.f32 and div.rn.f32.
__global__ void sigmoid_fast_check(unsigned long long* count, unsigned int* example) {
  unsigned long long bad = 0;
  constexpr uint32_t kOne = 0x3F800000u, kEnd = 0x7E800000u;  // 1.0f, 2^126
  const uint64_t n = (uint64_t{1} << 32) + (kEnd - kOne);
  for (uint64_t i = blockIdx.x * uint64_t{blockDim.x} + threadIdx.x; i < n;
       i += uint64_t{gridDim.x} * blockDim.x) {
    uint32_t bits;
    bool same;
    if (i < (uint64_t{1} << 32)) {
      bits = static_cast<uint32_t>(i);
      const float x = __uint_as_float(bits);
      same = !(x >= hd::kSigmoidFastMinX) ||
             __float_as_uint(hd::sigmoid_fast(x)) == __float_as_uint(hd::sigmoid(x));
    } else {
      bits = kOne + static_cast<uint32_t>(i - (uint64_t{1} << 32));
      const float d = __uint_as_float(bits);
      const uint32_t r = __float_as_uint(hd::rcp_in_range(d));
      same = r == __float_as_uint(__frcp_rn(d)) && r == __float_as_uint(__fdiv_rn(1.0f, d));
    }
    if (!same) {
      ++bad;
      *example = bits;
    }
  }
  if (bad) atomicAdd(count, bad);
}

// Runs a (count, example) check kernel and returns the count.
template <typename Launch>
int64_t run_check(const char* op, Launch launch, uint32_t* example) {
  unsigned long long* d_count = nullptr;
  FP8FLOW_CUDA_CHECK(op, cudaMalloc(&d_count, 2 * sizeof(*d_count)));
  auto* d_example = reinterpret_cast<unsigned int*>(d_count + 1);
  FP8FLOW_CUDA_CHECK(op, cudaMemset(d_count, 0, 2 * sizeof(*d_count)));
  launch(d_count, d_example);
  FP8FLOW_CUDA_CHECK_LAUNCH(op);
  unsigned long long count = 0;
  unsigned int ex = 0;
  FP8FLOW_CUDA_CHECK(op, cudaMemcpy(&count, d_count, sizeof(count), cudaMemcpyDeviceToHost));
  FP8FLOW_CUDA_CHECK(op, cudaMemcpy(&ex, d_example, sizeof(ex), cudaMemcpyDeviceToHost));
  FP8FLOW_CUDA_CHECK(op, cudaFree(d_count));
  if (example) *example = ex;
  return static_cast<int64_t>(count);
}

}  // namespace

void swiglu_set_backward_variant(int variant) {
  g_bwd_variant.set(variant);
}

int64_t swiglu_silu_mismatches(uint32_t* example) {
  return run_check(
      "swiglu_silu_mismatches",
      [](unsigned long long* c, unsigned int* e) { silu_check<<<132 * 16, 256>>>(c, e); }, example);
}

int64_t swiglu_sigmoid_fast_mismatches(uint32_t* example) {
  return run_check(
      "swiglu_sigmoid_fast_mismatches",
      [](unsigned long long* c, unsigned int* e) { sigmoid_fast_check<<<132 * 16, 256>>>(c, e); },
      example);
}

int64_t swiglu_hw_cvt_mismatches(DType dtype, uint32_t* example) {
  return run_check(
      "swiglu_hw_cvt_mismatches",
      [dtype](unsigned long long* c, unsigned int* e) {
        const dim3 grid(132 * 16), block(256);
        if (dtype == DType::E4M3)
          hw_cvt_check<OutKind::E4M3><<<grid, block>>>(c, e);
        else if (dtype == DType::E5M2)
          hw_cvt_check<OutKind::E5M2><<<grid, block>>>(c, e);
        else
          hw_cvt_check<OutKind::BF16><<<grid, block>>>(c, e);
      },
      example);
}

void swiglu(const TensorView& in, const TensorView& prob, const ScaledTensor& out, bool weighted,
            Stream stream) {
  auto* scale = static_cast<float*>(out.scale.data);
  if (out.data.dtype == DType::E4M3)
    launch_forward<OutKind::E4M3>("swiglu", in, prob, out.data.data, scale, weighted, stream);
  else
    launch_forward<OutKind::E5M2>("swiglu", in, prob, out.data.data, scale, weighted, stream);
}

void swiglu(const TensorView& in, const TensorView& prob, const TensorView& out, bool weighted,
            Stream stream) {
  launch_forward<OutKind::BF16>("swiglu", in, prob, out.data, nullptr, weighted, stream);
}

void swiglu_backward(const TensorView& dy, const TensorView& in, const TensorView& prob,
                     const ScaledTensor& din, const TensorView& dprob, bool weighted,
                     Stream stream) {
  auto* scale = static_cast<float*>(din.scale.data);
  if (din.data.dtype == DType::E4M3)
    launch_backward<OutKind::E4M3>("swiglu_backward", dy, in, prob, din.data.data, scale, dprob,
                                   weighted, stream);
  else
    launch_backward<OutKind::E5M2>("swiglu_backward", dy, in, prob, din.data.data, scale, dprob,
                                   weighted, stream);
}

void swiglu_backward(const TensorView& dy, const TensorView& in, const TensorView& prob,
                     const TensorView& din, const TensorView& dprob, bool weighted, Stream stream) {
  launch_backward<OutKind::BF16>("swiglu_backward", dy, in, prob, din.data, nullptr, dprob,
                                 weighted, stream);
}

void swiglu(const TensorView& in, const TensorView& prob, const ScaledTensor& out,
            const ScaledTensor& in_q, bool weighted, Stream stream) {
  auto* scale = static_cast<float*>(out.scale.data);
  if (out.data.dtype == DType::E4M3)
    launch_forward<OutKind::E4M3, true>("swiglu", in, prob, out.data.data, scale, weighted, stream,
                                        &in_q);
  else
    launch_forward<OutKind::E5M2, true>("swiglu", in, prob, out.data.data, scale, weighted, stream,
                                        &in_q);
}

void swiglu_backward(const TensorView& dy, const ScaledTensor& in, const TensorView& prob,
                     const ScaledTensor& din, const TensorView& dprob, bool weighted,
                     Stream stream) {
  auto* scale = static_cast<float*>(din.scale.data);
  const auto* in_scale = static_cast<const float*>(in.scale.data);
  if (din.data.dtype == DType::E4M3)
    launch_backward<OutKind::E4M3, true>("swiglu_backward", dy, in.data, prob, din.data.data, scale,
                                         dprob, weighted, stream, in_scale);
  else
    launch_backward<OutKind::E5M2, true>("swiglu_backward", dy, in.data, prob, din.data.data, scale,
                                         dprob, weighted, stream, in_scale);
}

}  // namespace fp8flow::sm90
