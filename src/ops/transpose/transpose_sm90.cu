// sm_90a backend of transpose_scaled: zero the optional underflow counter, then one launch of
// sm90_transpose_scaled_e4m3_1x128 (kernels/transpose_1x128.cuh) per call; no host sync.
// Bench: `fp8flow-bench ops`.
#include "common/cuda_check.h"
#include "common/groups.h"
#include "ops/transpose/kernels/transpose_1x128.cuh"
#include "ops/transpose/transpose_backends.h"

namespace fp8flow::sm90 {

namespace {

template <TransposeScalePolicy kPolicy, bool kCount>
void launch(const dim3 grid, Stream stream, const uint8_t* x, const float* xs, uint8_t* y,
            float* ys, unsigned long long* counter, int32_t m, int32_t k,
            const detail::GroupTiles& groups) {
  sm90_transpose_scaled_e4m3_1x128_kernel<kPolicy, kCount>
      <<<grid, kTransposeThreads, 0, stream>>>(x, xs, y, ys, counter, m, k, groups);
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
  const dim3 grid(static_cast<unsigned>(groups.total_tiles), static_cast<unsigned>(K / 128));
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
