// sm_90a backend of router_forward / router_backward: the launch chains of
// kernels/router_launch.cuh run by a CUDA launcher (kernel<<<>>> on the caller's stream). Row
// geometry: G = lanes_for(E) lanes per token row, one template instance per G in {1, ..., 32}.
// No host synchronization; every runtime call and launch is checked.
// Bench: fp8flow-bench ops (rows "router fwd", "router bwd").
#include <cstdlib>
#include <type_traits>

#include "common/cuda_check.h"
#include "common/kernel_variant.h"
#include "ops/router/kernels/router_launch.cuh"
#include "ops/router/router_backends.h"

namespace fp8flow::sm90 {
namespace {

using namespace router_kernels;

// Calls f(std::integral_constant<int, G>) for the run-time lane count G.
template <typename F>
void dispatch_lanes(int lanes, F&& f) {
  switch (lanes) {
    case 1:
      return f(std::integral_constant<int, 1>{});
    case 2:
      return f(std::integral_constant<int, 2>{});
    case 4:
      return f(std::integral_constant<int, 4>{});
    case 8:
      return f(std::integral_constant<int, 8>{});
    case 16:
      return f(std::integral_constant<int, 16>{});
    default:
      return f(std::integral_constant<int, 32>{});
  }
}

// The forward kernel variant (A/B timing in one binary; the same outputs): 0 the argmax rounds over
// the lane's 8 keys (FP8FLOW_ROUTER_FWD_SORT=0), 1 the lane's keys sorted once, popped by the
// rounds (the default since session 13: H100, 32768 x 256 DeepSeek-V3 config, 0.0790 -> 0.0616
// ms). Environment read once; router_set_forward_variant overrides it (tests).
detail::KernelVariant g_fwd_variant([] {
  const char* v = std::getenv("FP8FLOW_ROUTER_FWD_SORT");
  return v && v[0] == '0' ? 0 : 1;
});

struct CudaLauncher {
  const char* op;
  cudaStream_t stream;

  void memset_zero(void* p, size_t bytes) {
    if (bytes) FP8FLOW_CUDA_CHECK(op, cudaMemsetAsync(p, 0, bytes, stream));
  }
  void fwd(int lanes, unsigned grid, const FwdParams& p) {
    const bool sort = g_fwd_variant.get() == 1;
    dispatch_lanes(lanes, [&](auto g) {
      if (sort)
        router_fwd_sm90_f32<decltype(g)::value, true><<<grid, kFwdWarps * 32, 0, stream>>>(p);
      else
        router_fwd_sm90_f32<decltype(g)::value, false><<<grid, kFwdWarps * 32, 0, stream>>>(p);
    });
    FP8FLOW_CUDA_CHECK_LAUNCH(op);
  }
  void reduce(unsigned grid, const float* in, float* out, int64_t segs, int64_t rows_in,
              int64_t rows_out, int64_t cols) {
    router_aux_reduce_sm90<<<grid, kAuxBlock, 0, stream>>>(in, out, segs, rows_in, rows_out, cols);
    FP8FLOW_CUDA_CHECK_LAUNCH(op);
  }
  void terms(unsigned grid, const float* psum, const int32_t* seq_counts, float* loss, int64_t seqs,
             int experts, int64_t seq_len, float fscale) {
    router_aux_terms_sm90<<<grid, kAuxBlock, 0, stream>>>(psum, seq_counts, loss, seqs, experts,
                                                          seq_len, fscale);
    FP8FLOW_CUDA_CHECK_LAUNCH(op);
  }
  void final(const float* total, float* loss, float alpha, int64_t seqs) {
    router_aux_final_sm90<<<1, 1, 0, stream>>>(total, loss, alpha, seqs);
    FP8FLOW_CUDA_CHECK_LAUNCH(op);
  }
  unsigned bwd_max_ctas(int lanes) {
    int dev = 0, sms = 0, per_sm = 0;
    FP8FLOW_CUDA_CHECK(op, cudaGetDevice(&dev));
    FP8FLOW_CUDA_CHECK(op, cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    dispatch_lanes(lanes, [&](auto g) {
      FP8FLOW_CUDA_CHECK(op,
                         cudaOccupancyMaxActiveBlocksPerMultiprocessor(
                             &per_sm, router_bwd_sm90_f32<decltype(g)::value>, kBwdWarps * 32, 0));
    });
    return static_cast<unsigned>(sms * (per_sm > 0 ? per_sm : 1));
  }
  void bwd(int lanes, unsigned grid, const BwdParams& p) {
    dispatch_lanes(lanes, [&](auto g) {
      router_bwd_sm90_f32<decltype(g)::value><<<grid, kBwdWarps * 32, 0, stream>>>(p);
    });
    FP8FLOW_CUDA_CHECK_LAUNCH(op);
  }
};

}  // namespace

void router_set_forward_variant(int variant) {
  g_fwd_variant.set(variant);
}

void router_forward(const TensorView& logits, const TensorView& bias, const RouterOutputs& out,
                    const RouterConfig& cfg, const TensorView& workspace, Stream stream) {
  CudaLauncher launch{"router_forward", stream};
  forward_chain(launch, logits, bias, out, cfg, workspace);
}

void router_backward(const TensorView& logits, const TensorView& topk_idx,
                     const TensorView& d_topk_weight, const TensorView& seq_counts,
                     const TensorView& d_aux_loss, const TensorView& d_logits,
                     const RouterConfig& cfg, Stream stream) {
  CudaLauncher launch{"router_backward", stream};
  backward_chain(launch, logits, topk_idx, d_topk_weight, seq_counts, d_aux_loss, d_logits, cfg);
}

}  // namespace fp8flow::sm90
