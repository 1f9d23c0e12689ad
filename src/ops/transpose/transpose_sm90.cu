// sm_90a backend of transpose_scaled: zero the optional underflow counter, then one launch of
// sm90_transpose_scaled_e4m3_1x128 (kernels/transpose_1x128.cuh) per call; no host sync.
// Bench: `fp8flow-bench ops`.
#include <algorithm>
#include <cstdlib>

#include "common/check.h"
#include "common/cuda_check.h"
#include "common/groups.h"
#include "common/kernel_variant.h"
#include "ops/transpose/kernels/transpose_1x128.cuh"
#include "ops/transpose/transpose_backends.h"

namespace fp8flow::sm90 {

namespace {

// ColumnTight: persistent CTAs, as many as fit on the device at once (at most one per tile pair),
// each prefetching its next pair while it computes one. TileMax: one CTA per pair (the kernel's
// loop runs once): measured faster for it (H100, 32768 x 7168: 0.179 ms one-shot, 0.200 ms
// persistent; ColumnTight 0.217 ms one-shot, 0.204 ms persistent). Small ColumnTight calls stay
// persistent too: one CTA per pair measured slower there (28672 x 1280: 0.0392 -> 0.0420 ms,
// 24576 x 2048: 0.0499 -> 0.0542 ms).
// ColumnTight's pair order (the kernel's kb_group): kTightKbGroup, or FP8FLOW_TR_KB_GROUP for A/B
// timing (read once; a positive integer; 65536 gives the pre-session-14 order, channel block
// fastest over all).
detail::KernelVariant g_tight_kb_group([] {
  const char* v = std::getenv("FP8FLOW_TR_KB_GROUP");
  const int n = v ? std::atoi(v) : 0;
  return n > 0 ? n : kTightKbGroup;
});

template <TransposeScalePolicy kPolicy, bool kCount>
void launch(int64_t pairs, Stream stream, const uint8_t* x, const float* xs, uint8_t* y, float* ys,
            unsigned long long* counter, int32_t m, int32_t k, const detail::GroupTiles& groups) {
  const auto kernel = sm90_transpose_scaled_e4m3_1x128_kernel<kPolicy, kCount>;
  int64_t grid = pairs;
  if constexpr (kPolicy == TransposeScalePolicy::ColumnTight) {
    const char* op = "transpose_scaled";
    int dev = 0, sms = 0, per_sm = 0;
    FP8FLOW_CUDA_CHECK(op, cudaGetDevice(&dev));
    FP8FLOW_CUDA_CHECK(op, cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    FP8FLOW_CUDA_CHECK(
        op, cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kTransposeThreads, 0));
    grid = std::min<int64_t>(pairs, int64_t{sms} * std::max(per_sm, 1));
  }
  kernel<<<static_cast<unsigned>(grid), kTransposeThreads, 0, stream>>>(
      x, xs, y, ys, counter, m, k, groups, g_tight_kb_group.get());
}

}  // namespace

void transpose_scaled(const ScaledTensor& in, const ScaledTensor& out_t,
                      TransposeScalePolicy policy, int64_t* underflow_count, Stream stream) {
  const char* op = "transpose_scaled";
  const int64_t M = in.data.rows, K = in.data.cols;
  auto* counter = reinterpret_cast<unsigned long long*>(underflow_count);
  if (counter) FP8FLOW_CUDA_CHECK(op, cudaMemsetAsync(counter, 0, sizeof(*counter), stream));
  if (M == 0 || K == 0) return;
  const detail::GroupTiles groups = detail::make_group_tiles(out_t.col_groups, M);
  const int64_t grid = int64_t{groups.total_tiles} * (K / 128);  // tile pairs
  if (grid >= (int64_t{1} << 30))
    detail::throw_error(ErrorKind::Unsupported,
                        detail::cat("fp8flow::", op,
                                    ": in: expected fewer than 2^30 128 x 128 tiles for the "
                                    "CUDA backend, got ",
                                    grid));
  const auto* x = static_cast<const uint8_t*>(in.data.data);
  const auto* xs = static_cast<const float*>(in.scale.data);
  auto* y = static_cast<uint8_t*>(out_t.data.data);
  auto* ys = static_cast<float*>(out_t.scale.data);
  const auto m = static_cast<int32_t>(M), k = static_cast<int32_t>(K);
  // Four instances: {TileMax, ColumnTight} x {without, with the underflow count}.
  constexpr auto kTileMax = TransposeScalePolicy::TileMax;
  constexpr auto kTight = TransposeScalePolicy::ColumnTight;
  const bool tight = policy == kTight;
  if (tight && counter)
    launch<kTight, true>(grid, stream, x, xs, y, ys, counter, m, k, groups);
  else if (tight)
    launch<kTight, false>(grid, stream, x, xs, y, ys, counter, m, k, groups);
  else if (counter)
    launch<kTileMax, true>(grid, stream, x, xs, y, ys, counter, m, k, groups);
  else
    launch<kTileMax, false>(grid, stream, x, xs, y, ys, counter, m, k, groups);
  FP8FLOW_CUDA_CHECK_LAUNCH(op);
}

}  // namespace fp8flow::sm90
