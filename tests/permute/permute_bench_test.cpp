// Timings of the permute ops at the DeepSeek-V3 shard shape (T = 4096 tokens, top-8, H = 7168,
// E = 32 local experts and E = 256), printed with achieved bandwidth (bytes read + written, each
// row counted once per move) next to a device-to-device copy measured in the same run. The routing
// plan is timed separately. Published FP8 permute+pad at this shape: 1.127 ms (Hopper).
// GPU only; a few hundred milliseconds. Run: fp8flow_tests --gtest_filter='PermuteBench*'.
#include <cinttypes>
#include <cstdio>

#include "permute_test_util.h"

#if FP8FLOW_WITH_CUDA

namespace fp8flow::test {
namespace {

double time_ms(const std::function<void()>& f, int iters = 20) {
  for (int i = 0; i < 3; ++i) f();
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  cudaEventRecord(a);
  for (int i = 0; i < iters; ++i) f();
  cudaEventRecord(b);
  cudaEventSynchronize(b);
  float ms = 0;
  cudaEventElapsedTime(&ms, a, b);
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  return double(ms) / iters;
}

void report(const char* what, double ms, double bytes, double copy_gbs) {
  const double gbs = bytes / (ms * 1e-3) / 1e9;
  std::printf("[bench] %-44s %8.4f ms  %7.1f GB/s  (%5.1f%% of D2D copy %.0f GB/s)\n", what, ms,
              gbs, 100.0 * gbs / copy_gbs, copy_gbs);
}

TEST(PermuteBench, DeepSeekV3Shapes) {
  FP8FLOW_REQUIRE_GPU();
  const int64_t T = 4096, k = 8, H = 7168, tiles = H / 128, pairs = T * k;
  int dev = 0;
  cudaDeviceProp prop{};
  cudaGetDevice(&dev);
  cudaGetDeviceProperties(&prop, dev);
  std::printf("[bench] device: %s\n", prop.name);
  for (int64_t E : {32, 256}) {
    for (int align : {16, 128}) {
      const auto idx = route_uniform(T, k, E, 100 + E);
      const DeviceTensor ids(host_i32(idx, T, k));
      const int64_t bound = permutation_max_rows(T, k, E, align);
      DevicePlan dp(T, k, E, bound);
      DeviceBytes ws(permutation_workspace_bytes(T, k, E));
      const auto plan = [&] {
        make_permutation(ids.v, E, dp.view(), ws.p, ws.n, PermutationOptions{align});
      };
      const double plan_ms = time_ms(plan);
      const HostTensor off = dp.off.to_host();
      const int64_t R = reinterpret_cast<const int64_t*>(off.buf.data())[E];
      std::printf("[bench] E=%" PRId64 " align=%d: M_pad=%" PRId64 " (%.2f%% padding)\n", E, align,
                  R, 100.0 * double(R - pairs) / double(pairs));
      char name[128];
      std::snprintf(name, sizeof name, "plan (make_permutation) E=%" PRId64, E);
      std::printf("[bench] %-44s %8.4f ms\n", name, plan_ms);

      // D2D copy ceiling for the FP8 output size (read + write).
      DeviceBytes c0(static_cast<size_t>(R * H)), c1(static_cast<size_t>(R * H));
      const double copy_ms =
          time_ms([&] { cudaMemcpyAsync(c1.p, c0.p, c0.n, cudaMemcpyDeviceToDevice); });
      const double copy_gbs = 2.0 * double(c0.n) / (copy_ms * 1e-3) / 1e9;

      const HostTensor w = random_weights(T, k, 1);
      const DeviceTensor dw(w);
      {  // FP8 rows + 1x128 scales + probs
        const DeviceTensor x(random_bytes(DType::E4M3, T, H, 2)),
            xs(random_pow2_scales(tiles, T, 3));
        DeviceTensor y(DType::E4M3, R, H), ys(DType::F32, tiles, R), prob(DType::F32, 1, R);
        const double ms = time_ms([&] {
          permute(ScaledTensor{x.v, xs.v}, ScaledTensor{y.v, ys.v}, dp.view(), {dw.v, prob.v});
        });
        const double bytes = double(pairs) * H + double(R) * H + double(pairs) * tiles * 4 +
                             double(R) * tiles * 4 + double(R) * 8 + double(pairs) * 4;
        std::snprintf(name, sizeof name, "permute FP8+scales+probs E=%" PRId64 " align=%d", E,
                      align);
        report(name, ms, bytes, copy_gbs);
      }
      {  // MXFP4 rows + E8M0 scales + probs
        const DeviceTensor x(random_bytes(DType::E2M1x2, T, H, 4)),
            xs(random_bytes(DType::E8M0, T, H / 32, 5));
        DeviceTensor y(DType::E2M1x2, R, H), ys(DType::E8M0, R, H / 32), prob(DType::F32, 1, R);
        const double ms = time_ms([&] {
          permute(ScaledTensor{x.v, xs.v, ScaleLayout::Mx1x32},
                  ScaledTensor{y.v, ys.v, ScaleLayout::Mx1x32}, dp.view(), {dw.v, prob.v});
        });
        const double rb = H / 2 + H / 32;
        const double bytes =
            double(pairs) * rb + double(R) * rb + double(R) * 8 + double(pairs) * 4;
        std::snprintf(name, sizeof name, "permute MXFP4+E8M0+probs E=%" PRId64 " align=%d", E,
                      align);
        report(name, ms, bytes, copy_gbs);
      }
      DeviceTensor yb(DType::BF16, R, H);
      {  // BF16 rows
        const DeviceTensor x(random_bytes(DType::BF16, T, H, 6));
        const double ms = time_ms([&] { permute(x.v, yb.v, dp.view()); });
        const double bytes = double(pairs) * H * 2 + double(R) * H * 2 + double(R) * 4;
        std::snprintf(name, sizeof name, "permute BF16 E=%" PRId64 " align=%d", E, align);
        report(name, ms, bytes, copy_gbs);
      }
      {  // unpermute BF16 -> BF16, unweighted and weighted
        DeviceTensor out(DType::BF16, T, H);
        const double bytes = double(pairs) * H * 2 + double(T) * H * 2 + double(pairs) * 4;
        double ms = time_ms([&] { unpermute(yb.v, out.v, dp.view()); });
        std::snprintf(name, sizeof name, "unpermute BF16 E=%" PRId64 " align=%d", E, align);
        report(name, ms, bytes, copy_gbs);
        ms = time_ms([&] { unpermute_weighted(yb.v, dw.v, out.v, dp.view()); });
        std::snprintf(name, sizeof name, "unpermute_weighted BF16 E=%" PRId64 " align=%d", E,
                      align);
        report(name, ms, bytes + double(pairs) * 4, copy_gbs);
      }
    }
  }
}

}  // namespace
}  // namespace fp8flow::test

#endif  // FP8FLOW_WITH_CUDA
